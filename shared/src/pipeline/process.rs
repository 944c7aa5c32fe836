//! One handler lane: a part of a read through decode → dedup → route → backpressure → handler, to
//! a settlement for the acker. Each lane is a clone; what a handler failure means is `policy`'s
//! job, what a suspect is `trial`'s.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::runtime::conn::Conn;
use futures_util::FutureExt;
use tokio::sync::mpsc;

use crate::event::DlqReason;
use crate::event::{decode, Event, Limits};
use crate::pipeline::ack::{Counts, DeadLetter, Settlement};
use crate::pipeline::backpressure::Admission;
use crate::pipeline::backpressure::{BackpressureStage, Room};
use crate::pipeline::dlq::REDRIVE_GROUP_FIELD;
use crate::pipeline::handler::{Batch, Handler, HandlerError, Routed};
use crate::pipeline::inflight::InFlight;
use crate::pipeline::policy::Applier;
use crate::pipeline::trial::Trial;
use crate::pipeline::watermark::Watermarks;
use crate::runtime::backoff::backoff;
use crate::runtime::config::FileConfig;
use crate::runtime::health::{Dependency, Fault, Health};
use crate::runtime::shutdown::Shutdown;
use crate::source::entry::Entry;
use crate::source::READ_BUDGET;

/// How often an idle lane checks that its sink is reachable (and the first lane writes the
/// checkpoints that moved).
const IDLE_INTERVAL: Duration = Duration::from_secs(5);

/// A part of one read, for one lane: a ticket (for the in-flight registry) and its entries.
pub(crate) type Part = (u64, Vec<Entry>);

/// A routed event and its index in the part's entries.
type Indexed<'a> = (usize, Routed<'a>);

/// One lane of the processor stage.
#[derive(Clone)]
pub(crate) struct Processor<H> {
    pub group: String,
    pub consumer: String,
    /// For trial markers and settling suspects.
    pub writer: Conn,
    pub limits: Limits,
    pub backpressure: Arc<BackpressureStage>,
    pub config: Arc<FileConfig>,
    pub applier: Applier<H>,
    pub health: Arc<Health>,
    pub in_flight: InFlight,
    pub watermarks: Watermarks,
    /// Events waiting for their channel (this lane's own: see `backpressure`).
    pub room: Room,
    /// The room's size last added to the waiting gauge (shared by the lanes).
    pub waiting_reported: usize,
}

/// A part decoded: the events (by index into the part's entries) and what was counted on the way.
struct Decoded<'a> {
    events: Vec<(usize, Event<'a>)>,
    dead: Vec<DeadLetter>,
    counts: Counts,
}

impl<H: Handler> Processor<H> {
    /// Processes parts until the reader closes the lane, or the drain leaves it.
    pub async fn run(
        &mut self,
        mut parts: mpsc::Receiver<Part>,
        settlements: mpsc::Sender<Settlement>,
        shutdown: &Shutdown,
        first: bool,
    ) {
        let watermarks = self.watermarks.clone();
        loop {
            let wake = self.room.next_wake();
            let never = tokio::time::Instant::now() + IDLE_INTERVAL * 1000;
            let next = tokio::select! {
                biased;
                // Waiting events due: released in a part of their own.
                _ = tokio::time::sleep_until(wake.unwrap_or(never)), if wake.is_some() => {
                    if !self.release(&settlements, shutdown).await {
                        break;
                    }
                    continue;
                }
                next = tokio::time::timeout(IDLE_INTERVAL, parts.recv()) => next,
                // Out of work, the acker sampled watermarks that moved: write them now.
                _ = watermarks.moved(), if first => {
                    self.write_checkpoints(shutdown).await;
                    continue;
                }
            };
            match next {
                Ok(Some(part)) => {
                    let (ticket, entries) = self.gather(part, &mut parts);
                    let settled = self.process(ticket, entries, shutdown, false).await;
                    if !self.settle(ticket, settled, &settlements).await {
                        break;
                    }
                }
                Ok(None) => break,
                // Idle (but never hold up the drain: a sink that is down may take seconds to say so).
                Err(_) if shutdown.is_triggered() => {}
                Err(_) => self.idle(shutdown, first).await,
            }
        }
        // Waiting events are left pending: redelivered after the restart.
        let left = self.room.clear();
        self.report_waiting();
        if !left.is_empty() {
            tracing::info!(
                entries = left.len(),
                "draining: events waiting for their channel are left pending"
            );
            self.in_flight.unwait(&left);
        }
    }

    /// Sends a part's settlement to the acker (or forgets the part, left pending), then the
    /// settlement of the waiting entries shed (a newer event of their key replaced them, or they
    /// were dropped as they left): acknowledged with no effect. False once the acker is gone.
    async fn settle(
        &mut self,
        ticket: u64,
        settled: Option<Settlement>,
        settlements: &mpsc::Sender<Settlement>,
    ) -> bool {
        match settled {
            Some(settlement) => {
                if settlements.send(settlement).await.is_err() {
                    return false;
                }
            }
            // Left pending: the keep-alive forgets it, the reclaimer brings it back.
            None => self.in_flight.release(ticket),
        }
        self.settle_shed(settlements).await
    }

    /// Sends the settlement of the waiting entries shed since the last one, if any. False once
    /// the acker is gone.
    async fn settle_shed(&mut self, settlements: &mpsc::Sender<Settlement>) -> bool {
        self.report_waiting();
        let shed = self.room.take_shed();
        if shed.is_empty() {
            return true;
        }
        let ticket = self.in_flight.register(&shed);
        self.in_flight.unwait(&shed);
        let settlement = Settlement {
            ticket,
            counts: Counts {
                shed: shed.len(),
                ..Counts::default()
            },
            entries: shed,
            dead: Vec::new(),
            held: Vec::new(),
            by_sink: Vec::new(),
            deferred: Vec::new(),
            released: true,
            started: Instant::now(),
        };
        settlements.send(settlement).await.is_ok()
    }

    /// Moves the waiting gauge by this room's change since last reported.
    fn report_waiting(&mut self) {
        let now = self.room.len();
        if now == self.waiting_reported {
            return;
        }
        let gauge = metrics::gauge!(crate::runtime::metrics::BACKPRESSURE_WAITING);
        if now > self.waiting_reported {
            gauge.increment((now - self.waiting_reported) as f64);
        } else if now < self.waiting_reported {
            gauge.decrement((self.waiting_reported - now) as f64);
        }
        self.waiting_reported = now;
    }

    /// Processes the waiting events that are due, as a part of their own (their channels'
    /// budgets already spent), their deliveries counted again. False once the acker is gone.
    async fn release(
        &mut self,
        settlements: &mpsc::Sender<Settlement>,
        shutdown: &Shutdown,
    ) -> bool {
        let entries = self
            .backpressure
            .release(&mut self.room, tokio::time::Instant::now())
            .await;
        if entries.is_empty() {
            // Some may have been shed as they left.
            return self.settle_shed(settlements).await;
        }
        let restore = self.delivery_counts(&entries, 0);
        if let Err(e) = restore.query_async::<()>(&mut self.writer).await {
            tracing::debug!(error = %e, "delivery counts of released events not restored");
        }
        let ticket = self.in_flight.register(&entries);
        self.in_flight.unwait(&entries);
        let settled = self.process(ticket, entries, shutdown, true).await;
        self.settle(ticket, settled, settlements).await
    }

    /// The part, with the parts queued behind it for this lane, up to about what one read brings
    /// (`batch_size` entries; while under half of `READ_BUDGET` bytes): a read is split across the lanes, so under a
    /// backlog a lane still applies a read's worth per statement (measured: parts of half a read
    /// alone cost a third of the drain, as many more commits). Order is kept: parts are queued
    /// in read order. Large entries are not gathered: every part taken frees a queue slot the
    /// reader fills, so memory would grow by the parts taken.
    fn gather(&self, (ticket, mut entries): Part, parts: &mut mpsc::Receiver<Part>) -> Part {
        let size = |part: &[Entry]| -> usize {
            part.iter()
                .filter_map(|e| e.fields.as_ref())
                .map(|f| f.byte_size())
                .sum()
        };
        let mut bytes = size(&entries);
        while entries.len() < self.config.tuning.batch_size && bytes < READ_BUDGET / 2 {
            let Ok((next, more)) = parts.try_recv() else {
                break;
            };
            self.in_flight.merge(ticket, next);
            bytes += size(&more);
            entries.extend(more);
        }
        (ticket, entries)
    }

    /// While idle: probe the sink so that /readyz tells the truth without traffic, and (first
    /// lane) write the checkpoints that moved since the last batch.
    async fn idle(&mut self, shutdown: &Shutdown, first: bool) {
        let answer = tokio::select! {
            biased;
            answer = self.applier.handler.check() => answer,
            _ = shutdown.triggered() => return,
        };
        match answer {
            Ok(()) => {
                self.health.up(Dependency::Sink);
                self.health.clear(Fault::SinkMisconfigured);
            }
            Err(HandlerError::Misconfigured(e)) => {
                return self.health.raise(Fault::SinkMisconfigured, &e)
            }
            Err(e) => return self.health.down(Dependency::Sink, &e),
        }
        if first {
            // Samples that failed are taken again here, and written within IDLE_INTERVAL.
            let mut conn = self.writer.clone();
            self.watermarks.sample_dirty(&mut conn, &self.group).await;
            self.write_checkpoints(shutdown).await;
        }
    }

    /// Writes the watermarks that moved since they were last written, in one attempt, never on a
    /// sink that is down nor during the drain (a failure leaves them to the next batch or the next
    /// idle interval: the checkpoint written stays safe, only older).
    async fn write_checkpoints(&mut self, shutdown: &Shutdown) {
        if shutdown.is_triggered() || !self.health.is_up(Dependency::Sink) {
            return;
        }
        let checkpoints = self.watermarks.unwritten();
        if checkpoints.is_empty() {
            return;
        }
        let batch = Batch {
            group: &self.group,
            consumer: &self.consumer,
            events: Vec::new(),
            checkpoints,
        };
        // A panic is caught as in every attempt: it must not take the lane down with it.
        let apply = AssertUnwindSafe(self.applier.handler.apply(&batch)).catch_unwind();
        let attempt = tokio::time::timeout(self.applier.timeout, apply);
        let outcome = tokio::select! {
            outcome = attempt => outcome,
            _ = shutdown.triggered() => return,
        };
        match outcome {
            Ok(Ok(Ok(_))) => self.watermarks.written(&batch.checkpoints),
            Ok(Ok(Err(e))) => tracing::debug!(error = %e, "checkpoints not written"),
            Ok(Err(_)) => tracing::warn!("the handler panicked writing checkpoints"),
            Err(_) => tracing::debug!("checkpoints not written in handler_timeout_ms"),
        }
    }

    /// Runs the handler's preparation, retrying while the sink is unreachable. Ok(false) if the
    /// drain started first; a fatal or configuration error stops the worker.
    pub async fn prepare(&mut self, shutdown: &Shutdown) -> Result<bool, HandlerError> {
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

    /// One part through every stage up to the handler's confirmation. `None` if the drain
    /// started while the handler was failing: the part stays pending. A part of `released`
    /// events (they waited in the room) has been through backpressure already.
    async fn process(
        &mut self,
        ticket: u64,
        entries: Vec<Entry>,
        shutdown: &Shutdown,
        released: bool,
    ) -> Option<Settlement> {
        let started = Instant::now();
        let Decoded {
            mut events,
            mut dead,
            mut counts,
        } = self.decode(&entries);
        counts.batch_duplicates = dedup(&mut events);
        let config = self.config.clone();
        let routed = self.route(&config, &entries, &events, &mut counts);
        let admission = if released {
            Admission {
                now: routed,
                ..Admission::default()
            }
        } else {
            self.backpressure
                .admit(routed, &entries, &mut self.room)
                .await
        };
        counts.shed = admission.shed;
        let deferred = admission.deferred;
        if !deferred.is_empty() {
            self.in_flight.wait(deferred.iter().map(|i| &entries[*i]));
            // Waiting is not a delivery that may have crashed the worker: should it stop now,
            // the redelivery must not count against the event. Sent beside the batch, not
            // before it (the events going now do not wait for it).
            let waiting = self.delivery_counts(deferred.iter().map(|i| &entries[*i]), 1);
            let mut conn = self.writer.clone();
            tokio::spawn(async move {
                if let Err(e) = waiting.query_async::<()>(&mut conn).await {
                    tracing::debug!(error = %e, "delivery counts of waiting events not set");
                }
            });
        }
        // Suspects (delivered more than max_deliveries times) passed backpressure like any
        // event; they are applied alone, after the batch.
        let max = config.tuning.max_deliveries;
        let (routed, suspects): (Vec<_>, Vec<_>) = admission
            .now
            .into_iter()
            .partition(|(i, _)| entries[*i].deliveries <= max);
        // A sink that acknowledges settles what it is given.
        let mut by_sink = Vec::new();
        if H::ACKNOWLEDGES {
            by_sink = vec![false; entries.len()];
            for (i, _) in &routed {
                by_sink[*i] = true;
            }
        }
        let routed: Vec<Routed<'_>> = routed.into_iter().map(|(_, r)| r).collect();

        let batch = Batch {
            group: &self.group,
            consumer: &self.consumer,
            events: routed,
            checkpoints: self.watermarks.checkpoints(
                entries
                    .chunk_by(|a, b| a.stream == b.stream)
                    .map(|run| &run[0].stream),
            ),
        };
        let confirmed = self.applier.confirm(&batch, shutdown).await?;
        if confirmed.whole {
            self.watermarks.written(&batch.checkpoints);
        }
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
                Trial::Applied(applied) => {
                    if H::ACKNOWLEDGES {
                        by_sink[index] = true;
                    }
                    counts.applied += applied;
                }
                Trial::Dead(error) => dead.push(DeadLetter {
                    index,
                    reason: DlqReason::MaxDeliveries,
                    error,
                }),
                Trial::Pending => held.push((entry.stream.clone(), entry.id)),
            }
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            for (_, e) in &events {
                tracing::debug!(event_id = %e.id, channel = %e.channel, correlation_id = e.correlation_id.as_deref().unwrap_or(""), "confirmed");
            }
        }
        drop(events);
        Some(Settlement {
            ticket,
            entries,
            dead,
            held,
            by_sink,
            deferred,
            released,
            counts,
            started,
        })
    }

    /// Decodes every entry; malformed ones become dead letters for what they are, however often
    /// they were delivered. Deleted entries (nothing left to apply) and entries redriven for
    /// another group are counted and acknowledged.
    fn decode<'a>(&self, entries: &'a [Entry]) -> Decoded<'a> {
        let mut out = Decoded {
            events: Vec::with_capacity(entries.len()),
            dead: Vec::new(),
            counts: Counts::default(),
        };
        for (index, entry) in entries.iter().enumerate() {
            let Some(fields) = &entry.fields else {
                out.counts.deleted += 1;
                continue;
            };
            // Redriven from another group's dead letters: this group settled the original.
            if let Some(group) = fields.get(REDRIVE_GROUP_FIELD.as_bytes()) {
                if group != self.group.as_bytes() {
                    out.counts.other_group += 1;
                    continue;
                }
            }
            match decode(&entry.stream, entry.id, fields, &self.limits) {
                Ok(event) => out.events.push((index, event)),
                Err(e) => {
                    let correlation_id = fields
                        .get(b"correlation_id")
                        .map(String::from_utf8_lossy)
                        .unwrap_or_default();
                    tracing::warn!(stream = %entry.stream, entry_id = %entry.id, %correlation_id, reason = e.reason().as_str(), error = %e, "dead-lettering entry");
                    out.dead.push(DeadLetter {
                        index,
                        reason: e.reason(),
                        error: e.to_string(),
                    });
                }
            }
        }
        out
    }

    /// Routes the events: unrouted ones are counted.
    fn route<'a>(
        &self,
        config: &'a FileConfig,
        entries: &'a [Entry],
        events: &'a [(usize, Event<'a>)],
        counts: &mut Counts,
    ) -> Vec<Indexed<'a>> {
        let mut routed = Vec::with_capacity(events.len());
        for (index, event) in events {
            let entry = &entries[*index];
            let Some((_, route)) = config.routes.lookup(&event.channel) else {
                counts.unrouted += 1;
                continue;
            };
            let r = Routed {
                event,
                route,
                stream: &entry.stream,
                entry_id: entry.id,
            };
            routed.push((*index, r));
        }
        routed
    }

    /// The commands that set the delivery count of `entries`, in the pending list, to what they
    /// were delivered with less `less`: 1 while they wait (a wait is not a delivery that could
    /// have crashed the worker), 0 once released to the handler (a crash then counts). A failure
    /// only leaves a count one too high or too low, for one delivery.
    fn delivery_counts<'e>(
        &self,
        entries: impl IntoIterator<Item = &'e Entry>,
        less: u64,
    ) -> redis::Pipeline {
        let mut runs: Vec<(&str, u64, Vec<String>)> = Vec::new();
        for e in entries {
            let count = e.deliveries.saturating_sub(less);
            match runs
                .iter_mut()
                .find(|(s, c, _)| *s == &*e.stream && *c == count)
            {
                Some((_, _, ids)) => ids.push(e.id.to_string()),
                None => runs.push((&e.stream, count, vec![e.id.to_string()])),
            }
        }
        let mut pipe = redis::pipe();
        for (stream, count, ids) in &runs {
            pipe.cmd("XCLAIM")
                .arg(*stream)
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(0)
                .arg(ids)
                .arg("RETRYCOUNT")
                .arg(*count)
                .arg("JUSTID")
                .ignore();
        }
        pipe
    }
}

/// Keeps the first entry of each event id in the part (copies of one event carry its key, so
/// they are in one part); across parts the handler's sink is idempotent on the id. Returns how
/// many were dropped.
fn dedup(events: &mut Vec<(usize, Event<'_>)>) -> usize {
    let mut seen = HashSet::with_capacity(events.len());
    let before = events.len();
    events.retain(|(_, e)| seen.insert(e.id));
    before - events.len()
}
