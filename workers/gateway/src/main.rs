//! gateway: server-sent events to browsers, from the notifier's Pub/Sub messages, resumed from
//! the projector's histories after a reconnect, on any instance. The logic lives in the modules
//! below; this file wires them.

mod args;
mod auth;
mod cursor;
mod events;
mod hub;
mod live;
mod metrics;
mod registry;
mod resume;
mod routes;
mod serve;
mod sse;
mod subscriber;

use std::process::ExitCode;

use clap::Parser;
use streamfleet::runtime::cli::{self, RuntimeArgs};
use streamfleet::runtime::config::FileConfig;

// A SIGTERM in the first milliseconds still exits 0 (see the macro).
streamfleet::hold_stop_signals_from_start!();

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NAME: &str = "gateway";

/// Serve the fleet's events to browsers over server-sent events (`GET /events?topic=…`), live
/// from Redis Pub/Sub and resumed from the projector's histories.
#[derive(Debug, Parser)]
#[command(name = NAME, version)]
struct Cli {
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    gateway: args::GatewayArgs,
}

fn main() -> ExitCode {
    // Ten thousand connections each hold buffers mostly untouched: backed by transparent huge
    // pages, the allocator's memory turns resident 2 MiB at a time (305 MiB of RSS for 10 000
    // streams, 197 MiB without; docs/src/performance.md).
    // SAFETY: PR_SET_THP_DISABLE only changes this process's huge page policy.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    serve_until_stopped()
}

#[tokio::main]
async fn serve_until_stopped() -> ExitCode {
    let cli: Cli = cli::parse(NAME);
    let gateway = match configure(cli) {
        Ok(g) => g,
        Err(e) => return cli::config_exit(NAME, &e),
    };
    cli::finish(NAME, gateway.run().await)
}

/// Every setting checked, so that a bad one exits 2 before anything connects.
fn configure(cli: Cli) -> Result<serve::Gateway, streamfleet::runtime::config::ConfigError> {
    let rt = &cli.runtime;
    streamfleet::runtime::logging::init(rt.log_format, &rt.log)?;
    cli.gateway.validate()?;
    let config = match &rt.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let routes = routes::Routes::new(config.route_settings::<routes::GatewayRoute>(NAME)?);
    let auth = auth::Auth::new(
        cli.gateway.jwt_secret.as_deref(),
        cli.gateway.jwks_file.as_deref(),
        &cli.gateway.jwt_claim,
        cli.gateway.jwt_audience.as_deref(),
        &cli.gateway.anonymous_topics,
    )?;
    let target = rt.redis.target()?;
    if target.sentinel().is_some() {
        // Its subscribers would connect to a sentinel (which accepts SUBSCRIBE and never
        // publishes the fleet's messages): refused rather than silent.
        return Err(streamfleet::runtime::config::ConfigError(
            "FLEET_REDIS_URL: the gateway does not follow a Sentinel-managed Redis (redis+sentinel://) yet; give it the master's redis:// URL".into(),
        ));
    }
    Ok(serve::Gateway {
        runtime: cli.runtime,
        args: cli.gateway,
        routes,
        auth,
        target,
    })
}
