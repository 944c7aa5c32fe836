//! notifier: every routed event published on Redis Pub/Sub, so that any number of SSE or
//! WebSocket servers receive it; at least once, acknowledged after the publish. All logic lives
//! in the `streamfleet` library and `sink`; this file wires it.

mod channel;
mod sink;

use std::process::ExitCode;

use clap::Parser;
use sink::PubSubSink;
use streamfleet::runtime::cli::{self, WorkerArgs};
use streamfleet::Worker;

// A SIGTERM in the first milliseconds still drains and exits 0 (see the macro).
streamfleet::hold_stop_signals_from_start!();

/// See the persister: many small buffers per entry.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NAME: &str = "notifier";

/// Publish events from Redis Streams on Redis Pub/Sub (`fleet:{channel}`, or a route's own
/// template), at least once, with per-channel backpressure rules.
#[derive(Debug, Parser)]
#[command(name = NAME, version)]
struct Cli {
    #[command(flatten)]
    worker: WorkerArgs,
}

/// One runtime thread: publishing is redis-server's work.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli: Cli = cli::parse(NAME);
    let worker = match Worker::new(NAME, cli.worker) {
        Ok(w) => w,
        Err(e) => return cli::config_exit(NAME, &e),
    };
    let channels = match worker
        .config()
        .route_settings::<channel::NotifierRoute>(NAME)
    {
        Ok(channels) => channels,
        Err(e) => return cli::config_exit(NAME, &e),
    };
    let sink = PubSubSink::new(worker.redis_target().clone(), channels);
    cli::finish(NAME, worker.run(sink).await)
}
