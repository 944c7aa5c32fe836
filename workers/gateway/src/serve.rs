//! The gateway's life: the runtime (metrics, health, HTTP, signals) with `/events` added, the
//! Pub/Sub subscriber, the command connection and the registry; on SIGTERM every stream ends
//! (browsers reconnect to another instance, resuming), the registry entries are removed, exit 0.

use std::sync::Arc;
use std::time::{Duration, Instant};

use streamfleet::runtime::cli::RuntimeArgs;
use streamfleet::runtime::connect::{self, RedisTarget};
use streamfleet::runtime::health::Dependency;
use streamfleet::runtime::process::Runtime;
use tokio::sync::OnceCell;

use crate::args::GatewayArgs;
use crate::auth::Auth;
use crate::events::{self, App, Cors};
use crate::hub::Hub;
use crate::registry::Registry;
use crate::routes::Routes;

/// How long the drain waits for the streams it ended to be written out.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// Everything checked before anything connects.
pub struct Gateway {
    pub runtime: RuntimeArgs,
    pub args: GatewayArgs,
    pub routes: Routes,
    pub auth: Auth,
    pub target: RedisTarget,
}

impl Gateway {
    /// Serves until SIGTERM/SIGINT.
    pub async fn run(self) -> anyhow::Result<()> {
        let (hub, commands) = Hub::new(self.args.buffer);
        // The router is built before the runtime that arms the signals: its streams watch a handle
        // of their own, triggered when the runtime's is.
        let runtime_shutdown = streamfleet::runtime::shutdown::Shutdown::default();
        let app = Arc::new(App {
            hub: hub.clone(),
            routes: self.routes,
            auth: self.auth,
            cors: Cors::new(&self.args.cors_origins),
            redis: OnceCell::new(),
            shutdown: runtime_shutdown.clone(),
            keepalive: Duration::from_millis(self.args.keepalive_ms),
            retry_ms: self.args.retry_ms,
            max_resume: self.args.max_resume,
            max_topics: self.args.max_topics,
        });
        let runtime = Runtime::start(&self.runtime, events::router(app.clone())).await?;
        crate::metrics::register();
        let (health, shutdown) = (runtime.health.clone(), runtime.shutdown.clone());
        {
            let (from, to) = (shutdown.clone(), runtime_shutdown.clone());
            tokio::spawn(async move {
                from.triggered().await;
                to.trigger();
            });
        }
        for pattern in app.routes.sharded() {
            tracing::warn!(route = %pattern, "route published with SPUBLISH: the gateway cannot subscribe to it by pattern; its topics get no live events");
        }
        let instance = match &self.args.instance {
            Some(i) => i.clone(),
            None => gethostname::gethostname().to_string_lossy().into_owned(),
        };
        tracing::info!(
            instance = %instance,
            redis = %connect::redact(&self.runtime.redis.redis_url),
            "gateway starting"
        );
        let subscriber = tokio::spawn(crate::subscriber::run(
            hub.clone(),
            commands,
            self.target.clone(),
            health.clone(),
            shutdown.clone(),
        ));
        // The command connection: history reads, states, the registry.
        let mut delays = streamfleet::runtime::backoff::backoff();
        let conn = loop {
            match self.target.connect(Duration::from_secs(5)).await {
                Ok(conn) => break Some(conn),
                Err(e) => {
                    health.down(Dependency::Redis, &e);
                    if !shutdown.sleep(delays.next().unwrap_or_default()).await {
                        break None;
                    }
                }
            }
        };
        let registry = conn.map(|conn| {
            health.up(Dependency::Redis);
            let _ = app.redis.set(conn.clone());
            tokio::spawn(
                Registry {
                    key: self.args.registry_key.clone(),
                    instance,
                    interval: Duration::from_millis(self.args.registry_interval_ms),
                }
                .run(hub.clone(), conn, health.clone(), shutdown.clone()),
            )
        });
        shutdown.triggered().await;
        health.drain();
        tracing::info!(
            connections = hub.counts().0,
            "stop requested: ending every stream"
        );
        let started = Instant::now();
        while hub.counts().0 > 0 && started.elapsed() < DRAIN_WAIT {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(registry) = registry {
            let _ = tokio::time::timeout(DRAIN_WAIT, registry).await;
        }
        subscriber.abort();
        drop(runtime);
        tracing::info!("stopped cleanly");
        Ok(())
    }
}
