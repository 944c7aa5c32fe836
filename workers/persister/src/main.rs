//! persister: strict user events from Redis Streams into PostgreSQL `events`, acknowledged only
//! after commit. All logic lives in the `streamfleet` library; this file wires it.

mod sink;

use std::process::ExitCode;

use clap::Parser;
use sink::StrictSink;
use streamfleet::runtime::cli::{self, WorkerArgs};
use streamfleet::runtime::config::NoRouteSettings;
use streamfleet::store::EventStore;
use streamfleet::Worker;

// A SIGTERM in the first milliseconds still drains and exits 0 (see the macro).
streamfleet::hold_stop_signals_from_start!();

/// mimalloc: the pipeline allocates and frees many small buffers per entry (Redis replies);
/// glibc's allocator spent a quarter of the CPU on them in profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NAME: &str = "persister";

/// Persist strict (user) events from Redis Streams into PostgreSQL, exactly once per event id.
#[derive(Debug, Parser)]
#[command(name = NAME, version)]
struct Cli {
    #[command(flatten)]
    worker: WorkerArgs,

    /// Do not apply the embedded migrations at start (apply them with `fleetctl migrate`).
    #[arg(long, env = "FLEET_SKIP_MIGRATIONS", num_args = 0..=1, default_missing_value = "true", default_value_t = false)]
    skip_migrations: bool,
}

/// One runtime thread: the persister needs ~2.3 µs of CPU per event (a core would allow
/// ~400 000 events/s, more than one redis-server serves), and on a small machine shared with
/// both servers, a second thread only added cross-thread wake-ups (A/B in docs/src/performance.md).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli: Cli = cli::parse(NAME);
    let worker = match Worker::new(NAME, cli.worker) {
        Ok(w) => w,
        Err(e) => return cli::config_exit(NAME, &e),
    };
    // The persister has no settings of its own per route: a field no worker owns is refused.
    if let Err(e) = worker.config().route_settings::<NoRouteSettings>(NAME) {
        return cli::config_exit(NAME, &e);
    }
    let store = match worker
        .database_url()
        .and_then(|url| EventStore::connect_lazy(url, "FLEET_DATABASE_URL"))
    {
        Ok(s) => s,
        Err(e) => return cli::config_exit(NAME, &e),
    };
    let sink = StrictSink::new(store, !cli.skip_migrations);
    cli::finish(NAME, worker.run(sink).await)
}
