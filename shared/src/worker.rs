//! A consumer-group worker: the runtime (metrics, health, HTTP, signals) composed with the pipeline
//! around the worker's handler, after its configuration, connections and identity. A worker's
//! `main.rs` is a few lines over this.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::pipeline::handler::{Handler, HandlerError};
use crate::pipeline::Pipeline;
use crate::runtime::cli::WorkerArgs;
use crate::runtime::config::{ConfigError, FileConfig, Tuning};
use crate::runtime::connect::{self, RedisTarget};
use crate::runtime::health::{Dependency, Health};
use crate::runtime::process::Runtime;
use crate::runtime::shutdown::Shutdown;
use crate::source::identity::Identity;
use crate::source::read_conn::ReadConn;
use crate::source::{Reading, ResumeFrom, Source, StreamSpec};

/// A configured worker, ready to run.
pub struct Worker {
    name: &'static str,
    args: WorkerArgs,
    config: Arc<FileConfig>,
    redis: RedisTarget,
    /// Built with the other settings, so a URL it cannot use exits 2 before anything connects;
    /// taken by `run`.
    reads: Option<ReadConn>,
    group: String,
    consumer: String,
    specs: Vec<StreamSpec>,
}

impl Worker {
    /// Validates every setting (so a bad one exits 2 before anything connects) and starts logging.
    pub fn new(name: &'static str, args: WorkerArgs) -> Result<Self, ConfigError> {
        let rt = &args.runtime;
        crate::runtime::logging::init(rt.log_format, &rt.log)?;
        let config = match &rt.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let redis = rt.redis.target()?;
        let reads = ReadConn::new(
            redis.first(),
            connect::read_tls(&rt.redis)?,
            read_timeout(&config.tuning),
            crate::event::Limits {
                max_data_bytes: config.tuning.max_data_bytes,
            }
            .max_entry_bytes(),
        )?
        .following(redis.sentinel().cloned());
        let specs: Vec<StreamSpec> = args
            .streams
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(StreamSpec::parse)
            .collect();
        if specs.is_empty() {
            return Err(ConfigError("FLEET_STREAMS: no stream given".into()));
        }
        if let Some(dlq) = specs.iter().find_map(|s| match s {
            StreamSpec::Key(k) if crate::stream::keys::is_dlq_stream(k) => Some(k),
            _ => None,
        }) {
            return Err(ConfigError(format!(
                "FLEET_STREAMS: {dlq} is a dead letter stream; use `fleetctl` to redrive it"
            )));
        }
        let group = args.group.clone().unwrap_or_else(|| name.to_owned());
        let consumer = match &args.consumer {
            Some(c) => c.clone(),
            None => gethostname::gethostname().to_string_lossy().into_owned(),
        };
        for (setting, value) in [("FLEET_GROUP", &group), ("FLEET_CONSUMER", &consumer)] {
            if value.trim().is_empty() {
                return Err(ConfigError(format!("{setting}: must not be empty")));
            }
        }
        Ok(Worker {
            name,
            args,
            config: Arc::new(config),
            redis,
            reads: Some(reads),
            group,
            consumer,
            specs,
        })
    }

    /// The validated file configuration.
    pub fn config(&self) -> &FileConfig {
        &self.config
    }

    /// What `FLEET_STREAMS` names (keys and globs).
    pub fn streams(&self) -> impl Iterator<Item = &str> {
        self.specs.iter().map(|s| s.as_str())
    }

    /// Where the fleet's Redis is (`FLEET_REDIS_URL`), for a handler whose sink is Redis itself.
    pub fn redis_target(&self) -> &RedisTarget {
        &self.redis
    }

    /// `FLEET_DATABASE_URL`, required by workers that write to PostgreSQL.
    pub fn database_url(&self) -> Result<&str, ConfigError> {
        self.args.database_url.as_deref().ok_or_else(|| {
            ConfigError(format!(
                "FLEET_DATABASE_URL (--database-url) is required by the {}",
                self.name
            ))
        })
    }

    /// Runs until SIGTERM/SIGINT and a clean drain. Redis or sink outages are waited out.
    pub async fn run<H: Handler>(mut self, handler: H) -> anyhow::Result<()> {
        let runtime = Runtime::start(&self.args.runtime, axum::Router::new()).await?;
        let (health, shutdown) = (runtime.health.clone(), runtime.shutdown.clone());
        crate::runtime::metrics::register_zeroes(
            &self.specs.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            &self
                .config
                .backpressure
                .iter()
                .map(|(p, _)| p.as_str())
                .collect::<Vec<_>>(),
        );
        tracing::info!(
            worker = self.name,
            group = %self.group,
            consumer = %self.consumer,
            redis = %connect::redact(&self.args.runtime.redis.redis_url),
            "starting"
        );
        let tuning = &self.config.tuning;
        let Some(reader) = self.connect(read_timeout(tuning), &health, &shutdown).await else {
            return Ok(());
        };
        let Some(writer) = self
            .connect(Duration::from_secs(10), &health, &shutdown)
            .await
        else {
            return Ok(());
        };
        let identity = Identity::new(
            self.name,
            &self.group,
            &self.consumer,
            &self.specs.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            self.redis
                .first()
                .get_connection_info()
                .redis_settings()
                .db(),
        );
        let mut writer = writer;
        let allow_eviction = self.args.runtime.redis_allow_eviction;
        requirements(&mut writer, allow_eviction).await?;
        // A policy changed while running (CONFIG SET, a new managed tier) is a fault.
        let watch = (!allow_eviction).then(|| {
            tokio::spawn(watch_eviction(
                writer.clone(),
                health.clone(),
                Duration::from_millis(tuning.lag_interval_ms),
            ))
        });
        if let Some(first) = duplicate(&identity, &mut writer).await {
            return Err(ConfigError(format!(
                "FLEET_CONSUMER: {} of group {} is already in use on these streams by a live process ({first}); give each process its own consumer name",
                self.consumer, self.group
            ))
            .into());
        }
        let mut reads = self.reads.take().context("the worker runs once")?;
        reads.set_name(identity.client_name().to_owned());
        let source = Source::new(
            Reading {
                group: self.group.clone(),
                consumer: self.consumer.clone(),
                specs: self.specs.clone(),
                tuning: tuning.clone(),
            },
            reads,
            reader,
            health.clone(),
            resume_from(&handler, &self.group),
        );
        let sampler = crate::source::lag::spawn_sampler(
            writer.clone(),
            crate::source::lag::Watch {
                group: self.group.clone(),
                consumer: self.consumer.clone(),
                interval: Duration::from_millis(tuning.lag_interval_ms),
                consumer_idle_ms: tuning.consumer_idle_ms,
                identity,
                health: health.clone(),
                labels: source.labels(),
                reported_cuts: Default::default(),
            },
            source.watch_streams(),
        );
        let pipeline = Pipeline {
            group: self.group.clone(),
            source,
            writer,
            config: self.config.clone(),
            handler,
            health,
        };
        let result = pipeline.run(shutdown).await;
        sampler.abort();
        if let Some(watch) = watch {
            watch.abort();
        }
        drop(runtime);
        match result {
            Ok(()) => {}
            // Only an operator can fix it: a configuration error, exit 2.
            Err(HandlerError::Misconfigured(e)) => return Err(ConfigError(e).into()),
            Err(e) => return Err(e.into()),
        }
        tracing::info!(worker = self.name, "stopped cleanly");
        Ok(())
    }

    async fn connect(
        &self,
        response_timeout: Duration,
        health: &Health,
        shutdown: &Shutdown,
    ) -> Option<crate::runtime::conn::Conn> {
        let mut delays = crate::runtime::backoff::backoff();
        loop {
            match self.redis.connect(response_timeout).await {
                Ok(conn) => return Some(conn),
                Err(e) => {
                    health.down(Dependency::Redis, &e);
                    if !shutdown.sleep(delays.next().unwrap_or_default()).await {
                        return None;
                    }
                }
            }
        }
    }
}

/// Refuses a Redis that may evict keys (unless allowed), warns of one whose AOF would lose
/// acknowledged writes, says when neither could be checked. A Redis that does not answer is left
/// to the pipeline, which waits for it.
async fn requirements(
    conn: &mut crate::runtime::conn::Conn,
    allow_eviction: bool,
) -> Result<(), ConfigError> {
    use crate::runtime::requirements::{check, Checked};
    let checked = match check(conn).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "Redis's configuration could not be read; not checked");
            return Ok(());
        }
    };
    if let Checked::Unchecked(why) = &checked {
        tracing::warn!("Redis's maxmemory-policy and AOF are not checked: {why}");
    }
    let evicting = checked.evicting();
    if !evicting.is_empty() {
        let what = format!(
            "Redis maxmemory-policy is not noeviction ({}): under memory pressure Redis would evict streams, consumer groups and pending entries, silently",
            evicting.join(", ")
        );
        if !allow_eviction {
            return Err(ConfigError(format!(
                "{what}; set `maxmemory-policy noeviction` (or FLEET_REDIS_ALLOW_EVICTION=true to run anyway)"
            )));
        }
        tracing::warn!("{what} (FLEET_REDIS_ALLOW_EVICTION=true: running anyway)");
    }
    for risk in checked.unsafe_persistence() {
        tracing::warn!("Redis persistence: {risk}: acknowledged events may be lost with it; run with `appendonly yes` and `appendfsync everysec`");
    }
    Ok(())
}

/// Raises `RedisMayEvict` while some master's policy evicts keys, every `every`.
async fn watch_eviction(
    mut conn: crate::runtime::conn::Conn,
    health: Arc<Health>,
    every: Duration,
) {
    use crate::runtime::health::Fault;
    loop {
        tokio::time::sleep(every).await;
        let Ok(checked) = crate::runtime::requirements::check(&mut conn).await else {
            continue;
        };
        let evicting = checked.evicting();
        if evicting.is_empty() {
            health.clear(Fault::RedisMayEvict);
        } else if !health.has(Fault::RedisMayEvict) {
            tracing::error!(nodes = %evicting.join(", "), "Redis maxmemory-policy is no longer noeviction: streams, consumer groups and pending entries may be evicted; set `maxmemory-policy noeviction`");
            health.raise(
                Fault::RedisMayEvict,
                &format!("maxmemory-policy evicts keys ({})", evicting.join(", ")),
            );
        }
    }
}

/// Another live process with this identity, if there is one. A process killed an instant ago may
/// still be listed until Redis notices its closed connection: a duplicate counts only if it is
/// still there a moment later.
async fn duplicate(
    identity: &Identity,
    conn: &mut crate::runtime::conn::Conn,
) -> Option<crate::source::identity::Duplicate> {
    identity.duplicates(conn).await?.first()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    identity.duplicates(conn).await?.first().cloned()
}

/// Where a group that has to be created starts: the handler's checkpoint of the stream.
fn resume_from<H: Handler>(handler: &H, group: &str) -> ResumeFrom {
    let (handler, group) = (handler.clone(), group.to_owned());
    Arc::new(move |stream| {
        let (handler, group) = (handler.clone(), group.clone());
        Box::pin(async move {
            handler
                .checkpoint(&stream, &group)
                .await
                .map_err(|e| e.to_string())
        })
    })
}

/// How long a read may take: its BLOCK, and then some.
fn read_timeout(t: &Tuning) -> Duration {
    Duration::from_millis(t.block_ms) + Duration::from_secs(5)
}
