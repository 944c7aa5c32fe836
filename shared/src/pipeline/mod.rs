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
//! checkpoints are durable); a crash anywhere before the acknowledgement leaves the batch pending:
//! it is redelivered and, effects being idempotent, applied once. Memory is bounded by the few
//! batches in flight, whatever the backlog. What a failure of the handler means is `apply`'s job.
//!
//! An entry delivered more than `max_deliveries` times is a suspect, not a culprit: crashes and
//! restarts redeliver whole batches, so most suspects are innocent neighbours of the entry that
//! caused them. A suspect is applied alone, after a *trial marker* (a field of `<stream>:trials`)
//! says so in Redis; if it fails alone it is dead-lettered (`max_deliveries`), if it succeeds it is
//! applied like any event. A suspect found with its marker already set was being applied alone
//! when the worker died: that one is the culprit, and goes to the dead letter stream without
//! another try. So an entry that crashes the process is dead-lettered after `max_deliveries`, and
//! the events read with it are not.

pub(crate) mod ack;
pub(crate) mod backpressure;
pub(crate) mod dlq;
pub(crate) mod handler;
pub(crate) mod inflight;
pub(crate) mod overlap;
pub(crate) mod policy;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use crate::event::{decode, Event, Limits};
use crate::pipeline::ack::{Acker, Counts, DeadLetter, Settlement};
use crate::pipeline::backpressure::BackpressureStage;
use crate::pipeline::dlq::{trial_field, trials_key, DlqReason};
use crate::pipeline::handler::{Applied, Batch, Checkpoint, Handler, HandlerError, Routed};
use crate::pipeline::inflight::InFlight;
use crate::pipeline::overlap::Overlap;
use crate::pipeline::policy::{Alone, Applier};
use crate::runtime::backoff::backoff;
use crate::runtime::config::{FileConfig, Tuning};
use crate::runtime::health::{Dependency, Fault, Health};
use crate::runtime::shutdown::Shutdown;
use crate::source::entry::Entry;
use crate::source::Source;

/// A worker's pipeline around its handler.
pub struct Pipeline<H> {
    /// The consumer group.
    pub group: String,
    /// Reads batches (dedicated connection: it blocks).
    pub source: Source,
    /// Writes dead letters, acknowledgements and trial markers; keeps entries alive.
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
/// How long a trial marker outlives its last use: a marker whose entry was settled by another
/// consumer is not removed by this one, and must not stay for ever.
const TRIALS_TTL_S: u64 = 7 * 24 * 3600;

impl<H: Handler> Pipeline<H> {
    /// Runs until the shutdown is triggered, then returns once every batch read is settled or
    /// left pending. Fails only when the handler reports a fatal (or configuration) error while
    /// preparing.
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
        let labels = source.labels();
        let in_flight = InFlight::default();
        let mut processor = Processor {
            group: group.clone(),
            consumer: consumer.clone(),
            writer: writer.clone(),
            limits: Limits {
                max_data_bytes: config.tuning.max_data_bytes,
            },
            backpressure: Arc::new(BackpressureStage::new(config.backpressure.clone())),
            config: config.clone(),
            applier: Applier {
                handler,
                health: health.clone(),
                timeout: Duration::from_millis(config.tuning.handler_timeout_ms),
            },
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
        let keeper = tokio::spawn(in_flight.clone().keep_alive(
            writer.clone(),
            group.clone(),
            consumer,
            Duration::from_millis(config.tuning.claim_idle_ms),
        ));
        let reader = tokio::spawn(read(
            source,
            batches_tx,
            health.clone(),
            shutdown.clone(),
            in_flight.clone(),
        ));
        let acker = tokio::spawn(
            Acker {
                conn: writer,
                group,
                health: health.clone(),
                shutdown: shutdown.clone(),
                in_flight,
                labels,
            }
            .run(settle_rx),
        );
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
        keeper.abort();
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
            Ok(mut read) => {
                health.up(Dependency::Redis);
                delays = backoff();
                if read.reclaimed {
                    // Entries still being processed here (their keep-alive lost a race) are not
                    // processed a second time.
                    read.entries
                        .retain(|e| !in_flight.contains(&e.stream, &e.id.to_string()));
                }
                if read.entries.is_empty() {
                    continue;
                }
                let ticket = in_flight.register(&read.entries);
                if batches.send((ticket, read.entries)).await.is_err() {
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

/// The processor stage: decode, route, backpressure, and the handler with its policy. Each lane
/// is a clone.
#[derive(Clone)]
struct Processor<H> {
    group: String,
    consumer: String,
    /// For trial markers.
    writer: ConnectionManager,
    limits: Limits,
    backpressure: Arc<BackpressureStage>,
    config: Arc<FileConfig>,
    applier: Applier<H>,
    health: Arc<Health>,
    in_flight: InFlight,
    overlap: Overlap,
}

/// What became of a suspect applied alone.
enum Trial {
    Applied(Applied),
    Dead(String),
    /// Not decided (Redis refused the marker, or the drain started): left pending.
    Pending,
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
                        // Left pending: the keep-alive forgets it, the reclaimer brings it back.
                        None => self.in_flight.release(ticket),
                    }
                }
                Ok(None) => break,
                // Idle: probe the sink so /readyz tells the truth without traffic (but never
                // hold up the drain: a sink that is down may take seconds to say so).
                Err(_) if shutdown.is_triggered() => {}
                Err(_) => match tokio::select! {
                    biased;
                    answer = self.applier.handler.check() => answer,
                    _ = shutdown.triggered() => continue,
                } {
                    Ok(()) => {
                        self.health.up(Dependency::Sink);
                        self.health.clear(Fault::SinkMisconfigured);
                    }
                    Err(HandlerError::Misconfigured(e)) => {
                        self.health.raise(Fault::SinkMisconfigured, &e)
                    }
                    Err(e) => self.health.down(Dependency::Sink, &e),
                },
            }
        }
    }

    /// Runs the handler's preparation, retrying while the sink is unreachable. Ok(false) if the
    /// drain started first; a fatal or configuration error stops the worker.
    async fn prepare(&mut self, shutdown: &Shutdown) -> Result<bool, HandlerError> {
        let mut delays = backoff();
        loop {
            match self.applier.handler.prepare().await {
                Ok(()) => {
                    self.health.up(Dependency::Sink);
                    return Ok(true);
                }
                Err(e @ (HandlerError::Fatal(_) | HandlerError::Misconfigured(_))) => {
                    return Err(e)
                }
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
        for (index, entry) in entries.iter().enumerate() {
            let Some(fields) = &entry.fields else {
                counts.deleted += 1;
                continue;
            };
            // Malformed entries are dead-lettered for what they are, however often delivered.
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
        let max_deliveries = config.tuning.max_deliveries;
        let mut routed = Vec::with_capacity(decoded.len());
        let mut suspects = Vec::new();
        for (index, event) in &decoded {
            let entry = &entries[*index];
            match config.routes.lookup(&event.channel) {
                Some((_, route)) => {
                    let r = Routed {
                        event,
                        route,
                        stream: &entry.stream,
                        entry_id: entry.id,
                    };
                    if entry.deliveries > max_deliveries {
                        suspects.push((*index, r));
                    } else {
                        routed.push(r);
                    }
                }
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
        let confirmed = self.applier.confirm(&batch, shutdown).await?;
        drop(batch);
        counts.applied = confirmed.applied;
        let mut held = confirmed.held;
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
        for (index, suspect) in suspects {
            let entry = &entries[index];
            match self.trial(suspect, entry, shutdown).await {
                Trial::Applied(applied) => counts.applied += applied,
                Trial::Dead(error) => dead.push(DeadLetter {
                    index,
                    reason: DlqReason::MaxDeliveries,
                    error,
                }),
                Trial::Pending => held.push((entry.stream.clone(), entry.id)),
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
            held,
            counts,
            started,
        })
    }

    /// A suspect (delivered more than `max_deliveries` times) applied alone, under a trial marker
    /// (see the module doc).
    async fn trial(&mut self, suspect: Routed<'_>, entry: &Entry, shutdown: &Shutdown) -> Trial {
        let max = self.config.tuning.max_deliveries;
        let key = trials_key(&entry.stream);
        let field = trial_field(&self.group, &entry.id.to_string());
        let marked: redis::RedisResult<Option<String>> = redis::cmd("HGET")
            .arg(&key)
            .arg(&field)
            .query_async(&mut self.writer)
            .await;
        match marked {
            Ok(Some(by)) => {
                tracing::error!(stream = %entry.stream, entry_id = %entry.id, event_id = %suspect.event.id, deliveries = entry.deliveries, consumer = %by, "the worker stopped while applying this entry alone: dead-lettering it");
                return Trial::Dead(format!(
                    "delivered {} times, more than max_deliveries = {max}; the worker ({by}) stopped while applying it alone",
                    entry.deliveries
                ));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, "trial marker not read: the entry stays pending");
                return Trial::Pending;
            }
        }
        let mark: redis::RedisResult<()> = redis::pipe()
            .cmd("HSET")
            .arg(&key)
            .arg(&field)
            .arg(&self.consumer)
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(TRIALS_TTL_S)
            .ignore()
            .query_async(&mut self.writer)
            .await;
        if mark.is_ok() {
            // Writing the marker needed memory: Redis has some again.
            self.health.clear(Fault::RedisOutOfMemory);
        }
        if let Err(e) = mark {
            if e.code() == Some("OOM") {
                self.health.raise(
                    Fault::RedisOutOfMemory,
                    &"Redis out of memory (maxmemory reached): entries past max_deliveries wait to be tried",
                );
            }
            tracing::debug!(error = %e, "trial marker not written: the entry stays pending");
            return Trial::Pending;
        }
        let single = Batch {
            group: &self.group,
            events: vec![suspect],
            checkpoints: Vec::new(),
        };
        match self.applier.alone(&single, shutdown).await {
            Some(Alone::Applied(applied)) => {
                tracing::info!(stream = %entry.stream, entry_id = %entry.id, deliveries = entry.deliveries, "entry past max_deliveries applied alone: it was not at fault");
                // Settled at once, not with the batch: a crash while a later suspect is tried
                // must not find this one's marker and take it for the culprit.
                let mut delays = backoff();
                loop {
                    let settled: redis::RedisResult<()> = redis::pipe()
                        .cmd("XACK")
                        .arg(&*entry.stream)
                        .arg(&self.group)
                        .arg(entry.id.to_string())
                        .ignore()
                        .cmd("HDEL")
                        .arg(&key)
                        .arg(&field)
                        .ignore()
                        .query_async(&mut self.writer)
                        .await;
                    match settled {
                        Ok(()) => break,
                        Err(e) => {
                            self.health.down(Dependency::Redis, &e);
                            if !shutdown.sleep(delays.next().unwrap_or_default()).await {
                                break;
                            }
                        }
                    }
                }
                Trial::Applied(applied)
            }
            Some(Alone::Rejected(e) | Alone::KeptFailing(e)) => {
                tracing::warn!(stream = %entry.stream, entry_id = %entry.id, event_id = %suspect.event.id, deliveries = entry.deliveries, error = %e, "dead-lettering an entry past max_deliveries that fails alone");
                Trial::Dead(format!(
                    "delivered {} times, more than max_deliveries = {max}; alone: {e}",
                    entry.deliveries
                ))
            }
            None => {
                // The drain cut the trial short: it proved nothing.
                let _: redis::RedisResult<()> = redis::cmd("HDEL")
                    .arg(&key)
                    .arg(&field)
                    .query_async(&mut self.writer)
                    .await;
                Trial::Pending
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
