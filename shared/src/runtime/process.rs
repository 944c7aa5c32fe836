//! A running process: metrics, health, the HTTP server and the drain on SIGTERM/SIGINT, for any
//! binary. A consumer-group worker composes it with the pipeline; a binary that reads no group
//! (a gateway) serves its own routes on it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::runtime::cli::RuntimeArgs;
use crate::runtime::health::Health;
use crate::runtime::shutdown::Shutdown;

/// What a running binary shares with its parts.
pub struct Runtime {
    /// Readiness and faults, served on `/readyz` and `/metrics`.
    pub health: Arc<Health>,
    /// Triggered by SIGTERM/SIGINT: the drain starts.
    pub shutdown: Shutdown,
    http: tokio::task::JoinHandle<()>,
}

impl Runtime {
    /// Installs TLS and the metrics recorder, arms the signals and binds the HTTP server with
    /// `routes` added (a taken port fails here, naming `FLEET_HTTP_ADDR`).
    pub async fn start(args: &RuntimeArgs, routes: axum::Router) -> anyhow::Result<Runtime> {
        crate::runtime::connect::init_tls();
        let metrics = crate::runtime::metrics::install().context("metrics recorder")?;
        let health = Arc::new(Health::default());
        let shutdown = Shutdown::on_signals(Duration::from_millis(args.shutdown_grace_ms));
        let http = crate::runtime::http::serve(args.http_addr, health.clone(), metrics, routes)
            .await
            .with_context(|| format!("FLEET_HTTP_ADDR {}", args.http_addr))?;
        Ok(Runtime {
            health,
            shutdown,
            http,
        })
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.http.abort();
    }
}
