//! The pipeline every worker runs: source → decode/validate → dedup → route → backpressure →
//! handler → confirm → acknowledge and checkpoint.
//!
//! One batch is in flight at a time, so memory is bounded by the batch size whatever the backlog.
//! Nothing of a batch is acknowledged before the handler has confirmed it (its effects and the
//! checkpoints are durable); then the dead letters and the XACKs go to Redis in one MULTI/EXEC
//! round trip, so a crash leaves either both or neither. A crash anywhere before that leaves the
//! whole batch pending: it is redelivered and, effects being idempotent, applied once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use redis::aio::ConnectionManager;

use crate::backpressure::BackpressureStage;
use crate::config::FileConfig;
use crate::dlq::{add_dead_letter, DlqReason};
use crate::entry::Entry;
use crate::event::{decode, Event, Limits};
use crate::handler::{Applied, Batch, Checkpoint, Handler, HandlerError, Routed};
use crate::health::{Dependency, Health};
use crate::metrics as m;
use crate::shutdown::Shutdown;
use crate::source::Source;

/// A worker's running pipeline around its handler.
pub struct Pipeline<H> {
    /// The consumer group.
    pub group: String,
    /// Reads batches (dedicated connection: it blocks).
    pub source: Source,
    /// Writes dead letters and acknowledgements.
    pub writer: ConnectionManager,
    /// Routes, backpressure rules and tuning.
    pub config: Arc<FileConfig>,
    /// The worker's job.
    pub handler: H,
    /// Shared with `/readyz`.
    pub health: Arc<Health>,
}

fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// How often an idle worker checks that its sink is reachable.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// An entry that leaves through the dead letter stream.
struct DeadLetter {
    index: usize,
    reason: DlqReason,
    error: String,
}

impl<H: Handler> Pipeline<H> {
    /// Runs until the shutdown is triggered, then returns once the batch in flight is settled.
    /// Fails only when the handler reports a fatal error while preparing.
    pub async fn run(mut self, shutdown: Shutdown) -> Result<(), HandlerError> {
        if !self.prepare(&shutdown).await? {
            self.health.drain();
            return Ok(());
        }
        let limits = Limits {
            max_data_bytes: self.config.tuning.max_data_bytes,
        };
        let backpressure = BackpressureStage::new(self.config.backpressure.clone());
        let mut delays = backoff();
        let mut last_probe = Instant::now();
        while !shutdown.is_triggered() {
            let entries = match self.source.read().await {
                Ok(entries) => {
                    self.health.up(Dependency::Redis);
                    delays = backoff();
                    entries
                }
                Err(e) => {
                    self.health.down(Dependency::Redis, &e);
                    shutdown.sleep(delays.next().unwrap_or_default()).await;
                    continue;
                }
            };
            if !entries.is_empty() {
                self.process(&entries, &limits, &backpressure, &shutdown)
                    .await;
            } else if last_probe.elapsed() >= PROBE_INTERVAL {
                // Idle: probe the sink so /readyz tells the truth without traffic.
                last_probe = Instant::now();
                match self.handler.check().await {
                    Ok(()) => self.health.up(Dependency::Sink),
                    Err(e) => self.health.down(Dependency::Sink, &e),
                }
            }
        }
        self.health.drain();
        tracing::info!("drained: no batch in flight");
        Ok(())
    }

    /// Runs the handler's preparation, retrying transient failures. Ok(false) if the drain
    /// started first.
    async fn prepare(&mut self, shutdown: &Shutdown) -> Result<bool, HandlerError> {
        let mut delays = backoff();
        loop {
            match self.handler.prepare().await {
                Ok(()) => {
                    self.health.up(Dependency::Sink);
                    return Ok(true);
                }
                Err(HandlerError::Fatal(e)) => return Err(HandlerError::Fatal(e)),
                Err(e) => {
                    self.health.down(Dependency::Sink, &e);
                    if !shutdown.sleep(delays.next().unwrap_or_default()).await {
                        return Ok(false);
                    }
                }
            }
        }
    }

    async fn process(
        &mut self,
        entries: &[Entry],
        limits: &Limits,
        backpressure: &BackpressureStage,
        shutdown: &Shutdown,
    ) {
        let started = Instant::now();
        let mut dead: Vec<DeadLetter> = Vec::new();
        let mut decoded: Vec<(usize, Event)> = Vec::with_capacity(entries.len());
        let mut deleted = 0usize;
        let max_deliveries = self.config.tuning.max_deliveries;
        for (index, entry) in entries.iter().enumerate() {
            let Some(fields) = &entry.fields else {
                deleted += 1;
                continue;
            };
            if entry.deliveries > max_deliveries {
                dead.push(DeadLetter {
                    index,
                    reason: DlqReason::MaxDeliveries,
                    error: format!(
                        "delivered {} times, more than max_deliveries = {max_deliveries}",
                        entry.deliveries
                    ),
                });
                continue;
            }
            match decode(&entry.stream, &entry.id.to_string(), fields, limits) {
                Ok(event) => decoded.push((index, event)),
                Err(e) => {
                    let correlation_id = fields
                        .iter()
                        .find(|(k, _)| k == b"correlation_id")
                        .map(|(_, v)| String::from_utf8_lossy(v))
                        .unwrap_or_default();
                    tracing::warn!(stream = %entry.stream, entry_id = %entry.id, %correlation_id, reason = e.reason().as_str(), error = %e, "dead-lettering entry");
                    dead.push(DeadLetter {
                        index,
                        reason: e.reason(),
                        error: e.to_string(),
                    });
                }
            }
        }

        // Dedup within the batch; across batches the handler's sink is idempotent on the id.
        let mut seen = HashSet::with_capacity(decoded.len());
        let before = decoded.len();
        decoded.retain(|(_, e)| seen.insert(e.id));
        let batch_duplicates = before - decoded.len();

        let config = self.config.clone();
        let mut routed = Vec::with_capacity(decoded.len());
        let mut unrouted = 0usize;
        for (index, event) in &decoded {
            let entry = &entries[*index];
            match config.routes.lookup(&event.channel) {
                Some((_, route)) => routed.push(Routed {
                    event,
                    route,
                    stream: &entry.stream,
                    entry_id: entry.id,
                }),
                None => unrouted += 1,
            }
        }
        let (routed, shed) = backpressure.admit(routed).await;

        let group = self.group.clone();
        let batch = Batch {
            group: &group,
            events: routed,
            checkpoints: checkpoints(entries),
        };
        let Some(applied) = self.confirm(&batch, shutdown).await else {
            return; // draining while the sink is down: the batch stays pending
        };
        if !self.settle(entries, &dead, shutdown).await {
            return;
        }

        for e in &decoded {
            if tracing::enabled!(tracing::Level::DEBUG) {
                tracing::debug!(event_id = %e.1.id, channel = %e.1.channel, correlation_id = e.1.correlation_id.as_deref().unwrap_or(""), "settled");
            }
        }
        record(
            entries,
            &dead,
            applied,
            batch_duplicates,
            unrouted,
            shed,
            deleted,
        );
        metrics::histogram!(m::BATCH_DURATION).record(started.elapsed().as_secs_f64());
    }

    /// Applies the batch, retrying with backoff until it succeeds. `None` if the drain started
    /// before it could (nothing acknowledged: the entries stay pending for redelivery).
    async fn confirm(&mut self, batch: &Batch<'_>, shutdown: &Shutdown) -> Option<Applied> {
        let timeout = Duration::from_millis(self.config.tuning.handler_timeout_ms);
        let mut delays = backoff();
        loop {
            let started = Instant::now();
            let outcome = match tokio::time::timeout(timeout, self.handler.apply(batch)).await {
                Ok(r) => r,
                Err(_) => Err(HandlerError::Transient(format!(
                    "handler took longer than handler_timeout_ms = {}",
                    timeout.as_millis()
                ))),
            };
            metrics::histogram!(m::HANDLER_DURATION).record(started.elapsed().as_secs_f64());
            match outcome {
                Ok(applied) => {
                    self.health.up(Dependency::Sink);
                    return Some(applied);
                }
                Err(e) => {
                    metrics::counter!(m::HANDLER_ERRORS).increment(1);
                    self.health.down(Dependency::Sink, &e);
                    if shutdown.is_triggered()
                        || !shutdown.sleep(delays.next().unwrap_or_default()).await
                    {
                        tracing::warn!(
                            events = batch.events.len(),
                            "draining with the sink down: batch left pending for redelivery"
                        );
                        return None;
                    }
                }
            }
        }
    }

    /// Dead letters and acknowledgements in one atomic round trip. Retried until Redis answers;
    /// false if the drain started first.
    async fn settle(
        &mut self,
        entries: &[Entry],
        dead: &[DeadLetter],
        shutdown: &Shutdown,
    ) -> bool {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for d in dead {
            add_dead_letter(
                &mut pipe,
                &entries[d.index],
                &self.group,
                d.reason,
                &d.error,
            );
        }
        for run in entries.chunk_by(|a, b| a.stream == b.stream) {
            let cmd = pipe.cmd("XACK").arg(&*run[0].stream).arg(&self.group);
            for e in run {
                cmd.arg(e.id.to_string());
            }
            cmd.ignore();
        }
        let mut delays = backoff();
        loop {
            match pipe.query_async::<()>(&mut self.writer).await {
                Ok(()) => {
                    self.health.up(Dependency::Redis);
                    return true;
                }
                Err(e) => {
                    self.health.down(Dependency::Redis, &e);
                    if !shutdown.sleep(delays.next().unwrap_or_default()).await {
                        return false;
                    }
                }
            }
        }
    }
}

/// The highest entry id read per stream.
fn checkpoints(entries: &[Entry]) -> Vec<Checkpoint> {
    let mut out: Vec<Checkpoint> = Vec::new();
    for e in entries {
        match out.iter_mut().find(|c| c.stream == e.stream) {
            Some(c) => c.position = c.position.max(e.id),
            None => out.push(Checkpoint {
                stream: e.stream.clone(),
                position: e.id,
            }),
        }
    }
    out.sort_by(|a, b| a.stream.cmp(&b.stream));
    out
}

fn record(
    entries: &[Entry],
    dead: &[DeadLetter],
    applied: Applied,
    batch_duplicates: usize,
    unrouted: usize,
    shed: usize,
    deleted: usize,
) {
    for run in entries.chunk_by(|a, b| a.stream == b.stream) {
        let stream = run[0].stream.to_string();
        metrics::counter!(m::EVENTS_READ, "stream" => stream.clone()).increment(run.len() as u64);
        metrics::counter!(m::EVENTS_ACKNOWLEDGED, "stream" => stream).increment(run.len() as u64);
    }
    for d in dead {
        metrics::counter!(m::EVENTS_DEAD_LETTERED, "stream" => entries[d.index].stream.to_string(), "reason" => d.reason.as_str()).increment(1);
    }
    metrics::counter!(m::EVENTS_APPLIED).increment(applied.applied as u64);
    metrics::counter!(m::EVENTS_DEDUPLICATED, "stage" => "batch")
        .increment(batch_duplicates as u64);
    metrics::counter!(m::EVENTS_DEDUPLICATED, "stage" => "sink")
        .increment(applied.duplicates as u64);
    metrics::counter!(m::EVENTS_SKIPPED, "reason" => "unrouted").increment(unrouted as u64);
    metrics::counter!(m::EVENTS_SKIPPED, "reason" => "not_for_worker")
        .increment(applied.skipped as u64);
    metrics::counter!(m::EVENTS_SKIPPED, "reason" => "backpressure").increment(shed as u64);
    metrics::counter!(m::EVENTS_SKIPPED, "reason" => "deleted").increment(deleted as u64);
}
