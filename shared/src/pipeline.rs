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
use crate::entry::{Entry, EntryId};
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
    /// The batch in flight (ids per stream) and when its idle time was last reset.
    pub in_flight: InFlight,
}

/// The entries of the batch in flight, kept "alive" in the pending entry list while the handler
/// is retried, like a Kafka consumer's heartbeat: otherwise a long sink outage would let the
/// reclaimer of another consumer take them over and count redeliveries against valid events.
#[derive(Debug)]
pub struct InFlight {
    ids: Vec<(Arc<str>, Vec<String>)>,
    touched: Instant,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            ids: Vec::new(),
            touched: Instant::now(),
        }
    }
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

        self.in_flight = InFlight {
            ids: entries
                .chunk_by(|a, b| a.stream == b.stream)
                .map(|run| {
                    (
                        run[0].stream.clone(),
                        run.iter().map(|e| e.id.to_string()).collect(),
                    )
                })
                .collect(),
            touched: started,
        };
        let group = self.group.clone();
        let batch = Batch {
            group: &group,
            events: routed,
            checkpoints: checkpoints(entries),
        };
        let Some(confirmed) = self.confirm(&batch, shutdown).await else {
            return; // draining while the sink is down: the batch stays pending
        };
        for (stream, id, error) in &confirmed.rejected {
            if let Some(index) = entries
                .iter()
                .position(|e| &e.stream == stream && e.id == *id)
            {
                dead.push(DeadLetter {
                    index,
                    reason: DlqReason::HandlerError,
                    error: error.clone(),
                });
            }
        }
        if !self.settle(entries, &dead, &confirmed.held, shutdown).await {
            return;
        }

        if tracing::enabled!(tracing::Level::DEBUG) {
            for (_, e) in &decoded {
                tracing::debug!(event_id = %e.id, channel = %e.channel, correlation_id = e.correlation_id.as_deref().unwrap_or(""), "settled");
            }
        }
        let counts = Counts {
            applied: confirmed.applied,
            batch_duplicates,
            unrouted,
            shed,
            deleted,
        };
        record(entries, &dead, &confirmed.held, counts);
        metrics::histogram!(m::BATCH_DURATION).record(started.elapsed().as_secs_f64());
    }

    /// One handler attempt, bounded by the handler timeout.
    async fn attempt(&mut self, batch: &Batch<'_>) -> Result<Applied, HandlerError> {
        let timeout = Duration::from_millis(self.config.tuning.handler_timeout_ms);
        let started = Instant::now();
        let outcome = match tokio::time::timeout(timeout, self.handler.apply(batch)).await {
            Ok(r) => r,
            Err(_) => Err(HandlerError::Transient(format!(
                "handler took longer than handler_timeout_ms = {}",
                timeout.as_millis()
            ))),
        };
        metrics::histogram!(m::HANDLER_DURATION).record(started.elapsed().as_secs_f64());
        if outcome.is_err() {
            metrics::counter!(m::HANDLER_ERRORS).increment(1);
        }
        outcome
    }

    /// After a transient failure: whether the sink itself answers (then the batch, not the sink,
    /// is the problem). Marks readiness either way.
    async fn sink_answers(&mut self, error: &HandlerError) -> bool {
        match self.handler.check().await {
            Ok(()) => true,
            Err(_) => {
                self.health.down(Dependency::Sink, error);
                false
            }
        }
    }

    /// Applies the batch, retrying with backoff while the sink is down (nothing is counted against
    /// the events then). When the batch keeps failing although the sink answers, or the sink
    /// rejects something in it, the events are isolated one by one. `None` if the drain started
    /// first (nothing acknowledged: the entries stay pending for redelivery).
    async fn confirm(&mut self, batch: &Batch<'_>, shutdown: &Shutdown) -> Option<Confirmed> {
        let mut delays = backoff();
        loop {
            let mut strikes = 0;
            loop {
                match self.attempt(batch).await {
                    Ok(applied) => {
                        self.health.up(Dependency::Sink);
                        return Some(Confirmed {
                            applied,
                            ..Confirmed::default()
                        });
                    }
                    Err(HandlerError::Permanent(e)) => {
                        tracing::warn!(error = %e, events = batch.events.len(), "the sink rejected the batch: isolating the event(s) at fault");
                        break;
                    }
                    Err(e) => {
                        if self.sink_answers(&e).await {
                            strikes += 1;
                            tracing::warn!(error = %e, attempt = strikes, "batch failed although the sink answers");
                            if strikes >= ISOLATE_AFTER && !batch.events.is_empty() {
                                break;
                            }
                        }
                        if !self.pause(&mut delays, shutdown).await {
                            return None;
                        }
                    }
                }
            }
            let confirmed = self.isolate(batch, shutdown).await?;
            if confirmed.held.len() > 1 && confirmed.held.len() == batch.events.len() {
                // Every event fails: the sink is the problem, not one poison event. Wait it out
                // rather than letting redeliveries count against every event.
                tracing::error!(
                    events = batch.events.len(),
                    "every event of the batch fails: treating the sink as down"
                );
                self.health.down(Dependency::Sink, &"every event fails");
                if !self.pause(&mut delays, shutdown).await {
                    return None;
                }
                continue;
            }
            self.health.up(Dependency::Sink);
            return Some(confirmed);
        }
    }

    /// Applies each event alone: rejected ones become dead letters, ones that keep failing are
    /// held (left pending, so the reclaimer redelivers them and their delivery count rises to
    /// `max_deliveries`), the rest are applied; then the checkpoints are written.
    async fn isolate(&mut self, batch: &Batch<'_>, shutdown: &Shutdown) -> Option<Confirmed> {
        let mut out = Confirmed::default();
        for routed in &batch.events {
            let single = Batch {
                group: batch.group,
                events: vec![*routed],
                checkpoints: Vec::new(),
            };
            let mut delays = backoff();
            let mut strikes = 0;
            loop {
                match self.attempt(&single).await {
                    Ok(applied) => {
                        out.applied += applied;
                        break;
                    }
                    Err(HandlerError::Permanent(e)) => {
                        tracing::warn!(event_id = %routed.event.id, entry_id = %routed.entry_id, correlation_id = routed.event.correlation_id.as_deref().unwrap_or(""), error = %e, "dead-lettering the event the sink rejects");
                        out.rejected
                            .push((routed.stream.clone(), routed.entry_id, e));
                        break;
                    }
                    Err(e) => {
                        if self.sink_answers(&e).await {
                            strikes += 1;
                            if strikes >= ISOLATE_AFTER {
                                tracing::warn!(event_id = %routed.event.id, entry_id = %routed.entry_id, error = %e, "event keeps failing: left pending for redelivery");
                                out.held.push((routed.stream.clone(), routed.entry_id));
                                break;
                            }
                        }
                        if !self.pause(&mut delays, shutdown).await {
                            return None;
                        }
                    }
                }
            }
        }
        let checkpoints = Batch {
            group: batch.group,
            events: Vec::new(),
            checkpoints: batch.checkpoints.clone(),
        };
        let mut delays = backoff();
        while let Err(e) = self.attempt(&checkpoints).await {
            self.health.down(Dependency::Sink, &e);
            if !self.pause(&mut delays, shutdown).await {
                return None;
            }
        }
        Some(out)
    }

    /// Sleeps for the next backoff step, keeping the batch's entries owned; false if the drain
    /// started (stop retrying).
    async fn pause(
        &mut self,
        delays: &mut impl Iterator<Item = Duration>,
        shutdown: &Shutdown,
    ) -> bool {
        if shutdown.is_triggered() || !shutdown.sleep(delays.next().unwrap_or_default()).await {
            tracing::warn!("draining during retries: the batch is left pending for redelivery");
            return false;
        }
        self.keep_alive().await;
        true
    }

    /// Resets the idle time of the entries in flight (XCLAIM JUSTID: no delivery is counted)
    /// once a third of `claim_idle_ms` has passed since the last reset.
    async fn keep_alive(&mut self) {
        let every = Duration::from_millis(self.config.tuning.claim_idle_ms / 3);
        if self.in_flight.touched.elapsed() < every {
            return;
        }
        let mut pipe = redis::pipe();
        for (stream, ids) in &self.in_flight.ids {
            pipe.cmd("XCLAIM")
                .arg(&**stream)
                .arg(&self.group)
                .arg(self.source.consumer())
                .arg(every.as_millis() as u64)
                .arg(ids)
                .arg("JUSTID")
                .ignore();
        }
        match pipe.query_async::<()>(&mut self.writer).await {
            Ok(()) => self.in_flight.touched = Instant::now(),
            Err(e) => tracing::debug!(error = %e, "could not refresh the batch in flight"),
        }
    }

    /// Dead letters and acknowledgements (all entries but the held ones) in one atomic round
    /// trip. Retried until Redis answers; false if the drain started first.
    async fn settle(
        &mut self,
        entries: &[Entry],
        dead: &[DeadLetter],
        held: &[(Arc<str>, EntryId)],
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
        let mut commands = dead.len();
        for run in entries.chunk_by(|a, b| a.stream == b.stream) {
            let ids: Vec<String> = run
                .iter()
                .filter(|e| !held.iter().any(|(s, id)| *s == e.stream && *id == e.id))
                .map(|e| e.id.to_string())
                .collect();
            if !ids.is_empty() {
                pipe.cmd("XACK")
                    .arg(&*run[0].stream)
                    .arg(&self.group)
                    .arg(ids)
                    .ignore();
                commands += 1;
            }
        }
        if commands == 0 {
            return true; // everything held: nothing to settle now
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

/// Failed attempts, while the sink answers, before a batch is applied event by event.
const ISOLATE_AFTER: u32 = 3;

/// What became of a batch's events once the handler confirmed it.
#[derive(Debug, Default)]
struct Confirmed {
    applied: Applied,
    /// Rejected by the sink: dead letters with reason `handler_error`.
    rejected: Vec<(Arc<str>, EntryId, String)>,
    /// Kept failing: left pending (not acknowledged) for redelivery.
    held: Vec<(Arc<str>, EntryId)>,
}

/// What a batch did, for the metrics.
struct Counts {
    applied: Applied,
    batch_duplicates: usize,
    unrouted: usize,
    shed: usize,
    deleted: usize,
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

fn record(entries: &[Entry], dead: &[DeadLetter], held: &[(Arc<str>, EntryId)], c: Counts) {
    for run in entries.chunk_by(|a, b| a.stream == b.stream) {
        let stream = run[0].stream.to_string();
        let kept = held.iter().filter(|(s, _)| *s == run[0].stream).count();
        metrics::counter!(m::EVENTS_READ, "stream" => stream.clone()).increment(run.len() as u64);
        metrics::counter!(m::EVENTS_ACKNOWLEDGED, "stream" => stream)
            .increment((run.len() - kept) as u64);
    }
    for d in dead {
        metrics::counter!(m::EVENTS_DEAD_LETTERED, "stream" => entries[d.index].stream.to_string(), "reason" => d.reason.as_str()).increment(1);
    }
    metrics::counter!(m::EVENTS_APPLIED).increment(c.applied.applied as u64);
    metrics::counter!(m::EVENTS_DEDUPLICATED, "stage" => "batch")
        .increment(c.batch_duplicates as u64);
    metrics::counter!(m::EVENTS_DEDUPLICATED, "stage" => "sink")
        .increment(c.applied.duplicates as u64);
    metrics::counter!(m::EVENTS_SKIPPED, "reason" => "unrouted").increment(c.unrouted as u64);
    metrics::counter!(m::EVENTS_SKIPPED, "reason" => "not_for_worker")
        .increment(c.applied.skipped as u64);
    metrics::counter!(m::EVENTS_SKIPPED, "reason" => "backpressure").increment(c.shed as u64);
    metrics::counter!(m::EVENTS_SKIPPED, "reason" => "deleted").increment(c.deleted as u64);
}
