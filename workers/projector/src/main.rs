//! projector: materialized state in Redis from the event streams (latest state, invalidations,
//! counters, history), each entry's effects and its acknowledgement in one atomic script. All
//! logic lives in the `streamfleet` library and `sink`; this file wires it.

mod actions;
mod plan;
mod projection;
mod sink;
mod slots;

use std::process::ExitCode;

use clap::Parser;
use sink::RedisSink;
use streamfleet::runtime::cli::{self, WorkerArgs};
use streamfleet::runtime::config::ConfigError;
use streamfleet::Worker;

// A SIGTERM in the first milliseconds still drains and exits 0 (see the macro).
streamfleet::hold_stop_signals_from_start!();

/// See the persister: many small buffers per entry.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NAME: &str = "projector";

/// Project events from Redis Streams into Redis state (latest, invalidate, count, history), each
/// event's effects applied once, atomically with its acknowledgement.
#[derive(Debug, Parser)]
#[command(name = NAME, version)]
struct Cli {
    #[command(flatten)]
    worker: WorkerArgs,
}

/// One runtime thread: the work is redis-server's (the scripts), not the worker's.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli: Cli = cli::parse(NAME);
    let worker = match Worker::new(NAME, cli.worker) {
        Ok(w) => w,
        Err(e) => return cli::config_exit(NAME, &e),
    };
    let config = worker.config();
    let actions = match config.route_settings::<actions::ProjectorRoute>(NAME) {
        Ok(actions) => actions,
        Err(e) => return cli::config_exit(NAME, &e),
    };
    if actions.iter().all(Vec::is_empty) {
        let e = ConfigError(
            "FLEET_CONFIG: no route declares actions: the projector would acknowledge every event with no effect".into(),
        );
        return cli::config_exit(NAME, &e);
    }
    // On a Redis Cluster (found out when connecting) every key must share its stream's slot.
    let streams: Vec<&str> = worker.streams().collect();
    let co_partitioned = slots::check(config, &actions, &streams);
    let sink = RedisSink::new(
        worker.redis_target().clone(),
        config.tuning.dedup_window_s,
        co_partitioned,
        std::sync::Arc::new(actions),
    );
    cli::finish(NAME, worker.run(sink).await)
}
