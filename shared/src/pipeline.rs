//! The pipeline every worker runs: source → decode/validate → dedup → route → backpressure →
//! handler → confirm → acknowledge and checkpoint.
//!
//! Three stages overlap, joined by bounded channels: the reader fetches the next batch while the
//! processor has the handler commit the current one and the acker acknowledges the previous one.
//! The processor runs `handler_concurrency` lanes (default 2): a lane's commit overlaps the next
//! batch's statement in another, so batches may commit and be acknowledged out of read order;
//! a batch sharing an event id with an earlier one still being applied waits for it (`overlap`),
//! so the first entry of an id still wins.
//! Nothing of a batch is acknowledged before the handler has confirmed it (its effects and the
//! checkpoints are durable);
//! a crash anywhere before the acknowledgement leaves the batch pending: it is redelivered and,
//! effects being idempotent, applied once. Memory is bounded by the few batches in flight,
//! whatever the backlog.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use crate::ack::{Counts, DeadLetter, Settlement};
use crate::backoff::backoff;
use crate::backpressure::BackpressureStage;
use crate::config::{FileConfig, Tuning};
use crate::dlq::DlqReason;
use crate::entry::{Entry, EntryId};
use crate::event::{decode, Event, Limits};
use crate::handler::{Applied, Batch, Checkpoint, Handler, HandlerError, Routed};
use crate::health::{Dependency, Health};
use crate::inflight::InFlight;
use crate::overlap::Overlap;
use crate::shutdown::Shutdown;
use crate::source::Source;

/// A worker's pipeline around its handler.
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

/// How many batches the handler applies at once: `handler_concurrency`, as far as
/// `max_in_flight` holds them besides the batch being read.
pub fn lanes(t: &Tuning) -> usize {
    t.handler_concurrency
        .min((t.max_in_flight / t.batch_size).saturating_sub(1))
        .max(1)
}

/// How many batches the reader may run ahead of the processor: up to 2, within `max_in_flight`
/// (the batches in the handler lanes and one being acknowledged count too).
pub fn read_ahead(t: &Tuning) -> usize {
    (t.max_in_flight / t.batch_size)
        .saturating_sub(1 + lanes(t))
        .clamp(1, 2)
}

/// How often an idle worker checks that its sink is reachable.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Failed attempts, while the sink answers, before a batch is applied event by event.
const ISOLATE_AFTER: u32 = 3;

impl<H: Handler> Pipeline<H> {
    /// Runs until the shutdown is triggered, then returns once every batch read is settled or
    /// left pending. Fails only when the handler reports a fatal error while preparing.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), HandlerError> {
        let Pipeline {
            group,
            source,
            writer,
            config,
            handler,
            health,
        } = self;
        let consumer = source.consumer().to_owned();
        let in_flight = InFlight::default();
        let mut processor = Processor {
            group: group.clone(),
            consumer,
            writer: writer.clone(),
            limits: Limits {
                max_data_bytes: config.tuning.max_data_bytes,
            },
            backpressure: Arc::new(BackpressureStage::new(config.backpressure.clone())),
            config: config.clone(),
            handler,
            health: health.clone(),
            in_flight: in_flight.clone(),
            overlap: Overlap::default(),
        };
        if !processor.prepare(&shutdown).await? {
            health.drain();
            return Ok(());
        }
        let (batches_tx, batches_rx) = mpsc::channel(read_ahead(&config.tuning));
        let (settle_tx, settle_rx) = mpsc::channel(1);
        let reader = tokio::spawn(read(
            source,
            batches_tx,
            health.clone(),
            shutdown.clone(),
            in_flight.clone(),
        ));
        let acker = tokio::spawn(crate::ack::run(
            writer,
            group,
            settle_rx,
            health.clone(),
            shutdown.clone(),
            in_flight,
        ));
        // Lanes share the batches (and the backpressure stage, so rate limits stay global).
        let batches_rx = Arc::new(tokio::sync::Mutex::new(batches_rx));
        let mut lanes_running = tokio::task::JoinSet::new();
        for _ in 1..lanes(&config.tuning) {
            let mut lane = processor.clone();
            let (batches, settle, shutdown) =
                (batches_rx.clone(), settle_tx.clone(), shutdown.clone());
            lanes_running.spawn(async move { lane.run(batches, settle, &shutdown).await });
        }
        processor.run(batches_rx, settle_tx, &shutdown).await;
        lanes_running.join_all().await;
        let _ = reader.await;
        let _ = acker.await;
        health.drain();
        tracing::info!("drained: no batch in flight");
        Ok(())
    }
}

/// The reader stage: batches in, until the drain starts.
async fn read(
    mut source: Source,
    batches: mpsc::Sender<(u64, Vec<Entry>)>,
    health: Arc<Health>,
    shutdown: Shutdown,
    in_flight: InFlight,
) {
    let mut delays = backoff();
    while !shutdown.is_triggered() {
        match source.read().await {
            Ok(entries) => {
                health.up(Dependency::Redis);
                delays = backoff();
                if entries.is_empty() {
                    continue;
                }
                let ticket = in_flight.register(&entries);
                if batches.send((ticket, entries)).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                health.down(Dependency::Redis, &e);
                shutdown.sleep(delays.next().unwrap_or_default()).await;
            }
        }
    }
}

/// The reader's output, shared by the processor's lanes: a ticket (for the in-flight registry)
/// and the entries of one read.
type SharedBatches = Arc<tokio::sync::Mutex<mpsc::Receiver<(u64, Vec<Entry>)>>>;

/// The processor stage: decode, route, backpressure, and the handler with its retries. Each
/// lane is a clone.
#[derive(Clone)]
struct Processor<H> {
    group: String,
    consumer: String,
    writer: ConnectionManager,
    limits: Limits,
    backpressure: Arc<BackpressureStage>,
    config: Arc<FileConfig>,
    handler: H,
    health: Arc<Health>,
    in_flight: InFlight,
    overlap: Overlap,
}

/// What became of a batch's events once the handler confirmed it.
#[derive(Debug, Default)]
struct Confirmed {
    applied: Applied,
    /// Rejected by the sink: dead letters with reason `handler_error`.
    rejected: Vec<(Arc<str>, EntryId, String)>,
    /// Kept failing: left pending (not acknowledged) for redelivery.
    held: Vec<(Arc<str>, EntryId)>,
}

impl<H: Handler> Processor<H> {
    async fn run(
        &mut self,
        batches: SharedBatches,
        settlements: mpsc::Sender<Settlement>,
        shutdown: &Shutdown,
    ) {
        loop {
            let next = {
                let mut batches = batches.lock().await;
                tokio::time::timeout(PROBE_INTERVAL, batches.recv()).await
            };
            match next {
                Ok(Some((ticket, entries))) => {
                    match self.process(ticket, entries, shutdown).await {
                        Some(settlement) => {
                            if settlements.send(settlement).await.is_err() {
                                break;
                            }
                        }
                        None => self.in_flight.release(ticket),
                    }
                }
                Ok(None) => break,
                // Idle: probe the sink so /readyz tells the truth without traffic.
                Err(_) => match self.handler.check().await {
                    Ok(()) => self.health.up(Dependency::Sink),
                    Err(e) => self.health.down(Dependency::Sink, &e),
                },
            }
        }
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

    /// One batch through every stage up to the handler's confirmation. `None` if the drain
    /// started while the handler was failing: the batch stays pending.
    async fn process(
        &mut self,
        ticket: u64,
        entries: Vec<Entry>,
        shutdown: &Shutdown,
    ) -> Option<Settlement> {
        let started = Instant::now();
        let mut dead: Vec<DeadLetter> = Vec::new();
        let mut decoded: Vec<(usize, Event<'_>)> = Vec::with_capacity(entries.len());
        let mut counts = Counts::default();
        let max_deliveries = self.config.tuning.max_deliveries;
        for (index, entry) in entries.iter().enumerate() {
            let Some(fields) = &entry.fields else {
                counts.deleted += 1;
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
            match decode(&entry.stream, entry.id, fields, &self.limits) {
                Ok(event) => decoded.push((index, event)),
                Err(e) => {
                    let correlation_id = fields
                        .get(b"correlation_id")
                        .map(String::from_utf8_lossy)
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
        counts.batch_duplicates = before - decoded.len();

        let config = self.config.clone();
        let mut routed = Vec::with_capacity(decoded.len());
        for (index, event) in &decoded {
            let entry = &entries[*index];
            match config.routes.lookup(&event.channel) {
                Some((_, route)) => routed.push(Routed {
                    event,
                    route,
                    stream: &entry.stream,
                    entry_id: entry.id,
                }),
                None => counts.unrouted += 1,
            }
        }
        let (routed, shed) = self.backpressure.admit(routed).await;
        counts.shed = shed;

        let group = self.group.clone();
        let batch = Batch {
            group: &group,
            events: routed,
            checkpoints: checkpoints(&entries),
        };
        // Of two entries of one id in different batches, the earlier one's is applied.
        let _turn = self.overlap.enter(ticket, seen).await;
        let confirmed = self.confirm(&batch, shutdown).await?;
        drop(batch);
        counts.applied = confirmed.applied;
        for (stream, id, error) in confirmed.rejected {
            if let Some(index) = entries
                .iter()
                .position(|e| e.stream == stream && e.id == id)
            {
                dead.push(DeadLetter {
                    index,
                    reason: DlqReason::HandlerError,
                    error,
                });
            }
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            for (_, e) in &decoded {
                tracing::debug!(event_id = %e.id, channel = %e.channel, correlation_id = e.correlation_id.as_deref().unwrap_or(""), "confirmed");
            }
        }
        drop(decoded);
        Some(Settlement {
            ticket,
            entries,
            dead,
            held: confirmed.held,
            counts,
            started,
        })
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
        metrics::histogram!(crate::metrics::HANDLER_DURATION)
            .record(started.elapsed().as_secs_f64());
        if outcome.is_err() {
            metrics::counter!(crate::metrics::HANDLER_ERRORS).increment(1);
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

    /// Sleeps for the next backoff step, keeping the entries in flight owned; false if the drain
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
        let every = Duration::from_millis(self.config.tuning.claim_idle_ms / 3);
        self.in_flight
            .keep_alive(&mut self.writer, &self.group, &self.consumer, every)
            .await;
        true
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
