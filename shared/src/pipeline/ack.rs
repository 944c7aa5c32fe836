//! The acknowledge stage: once the handler has confirmed a part, its entries are acknowledged,
//! its dead letters written and its streams' watermarks sampled, in one round trip shared with the
//! other settlements already waiting. Parts are settled in the order they were confirmed.
//!
//! The plain `XACK`s of applied entries need no memory, so they go through even when Redis is at
//! `maxmemory` (a `MULTI` would be refused whole). Dead letters go through one script per stream
//! (`dlq::DEAD_LETTER_SCRIPT`) that acknowledges an entry only once its dead letter exists, and
//! writes it only while the entry is still pending: a failed dead letter (out of memory, a `:dlq`
//! key of another type) leaves its entries pending, unacknowledged, for the reclaimer to bring
//! back once it can be written, and is reported by name; a retry never writes one twice.

use std::sync::Arc;
use std::time::Instant;

use crate::runtime::conn::Conn;
use redis::RedisError;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::event::DlqReason;
use crate::pipeline::dlq::{dead_letter_fields, dead_letter_keys, DEAD_LETTER_SCRIPT};
use crate::pipeline::handler::Applied;
use crate::pipeline::inflight::{BatchIds, InFlight};
use crate::pipeline::watermark::{sample_command, Watermarks, SAMPLE_SCRIPT};
use crate::runtime::health::{Dependency, Fault, Health};
use crate::runtime::metrics as m;
use crate::runtime::scripts::query_loading;
use crate::runtime::shutdown::Shutdown;
use crate::source::entry::Entry;
use crate::source::StreamLabels;
use crate::stream::keys::dlq_stream;
use crate::stream::EntryId;

/// An entry that leaves through the dead letter stream.
#[derive(Debug)]
pub struct DeadLetter {
    /// Index into the batch's entries.
    pub index: usize,
    pub reason: DlqReason,
    pub error: String,
}

/// What a batch did, for the metrics.
#[derive(Debug, Default)]
pub struct Counts {
    pub applied: Applied,
    pub batch_duplicates: usize,
    pub unrouted: usize,
    /// Redriven for another group (`dlq::REDRIVE_GROUP_FIELD`).
    pub other_group: usize,
    pub shed: usize,
    pub deleted: usize,
}

/// A confirmed batch, ready to be acknowledged.
#[derive(Debug)]
pub struct Settlement {
    pub ticket: u64,
    pub entries: Vec<Entry>,
    pub dead: Vec<DeadLetter>,
    /// Kept failing: left pending (not acknowledged) for the reclaimer to redeliver.
    pub held: Vec<(Arc<str>, EntryId)>,
    /// Per entry (empty unless the handler acknowledges): acknowledged by the sink with its
    /// effects, never again here.
    pub by_sink: Vec<bool>,
    /// Indices of the entries waiting for their channel (backpressure): neither acknowledged nor
    /// counted now; a later settlement of their own settles them.
    pub deferred: Vec<usize>,
    /// Entries read before, that waited (released, or replaced by a newer event of their key):
    /// not counted as read a second time.
    pub released: bool,
    pub counts: Counts,
    pub started: Instant,
}

/// What becomes of one entry of a settlement. Settlement is per entry and per part: an entry
/// deferred by backpressure (a rate limit's `block`, a coalescing window) is settled later, in a
/// settlement of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Ack,
    /// Acknowledged by the sink with its effects (`Handler::ACKNOWLEDGES`): counted and sampled
    /// like `Ack`, never acknowledged a second time.
    Sink,
    Held,
    Dead,
    /// Waiting for its channel: untouched now.
    Deferred,
}

impl Fate {
    /// Whether the entry leaves the pending list with this settlement.
    fn settles(self) -> bool {
        !matches!(self, Fate::Held | Fate::Deferred)
    }
}

/// One command of the settlement's round trip, to read its reply.
#[derive(Debug)]
enum Step {
    Ack,
    DeadLetters {
        /// Which settlement of the round trip they belong to.
        settlement: usize,
        stream: Arc<str>,
        entries: usize,
    },
    /// The stream's watermark, sampled after its entries are acknowledged.
    Sample(Arc<str>),
}

/// Why dead letters could not be written: the fault to report.
fn dead_letter_fault(stream: &str, e: &RedisError) -> (Fault, String) {
    match e.code() {
        Some("OOM") => (
            Fault::RedisOutOfMemory,
            "Redis out of memory (maxmemory reached): dead letters cannot be written; their entries stay pending".into(),
        ),
        Some("WRONGTYPE") => (
            Fault::DeadLetters,
            format!(
                "{} holds another type than a stream: dead letters of {stream} cannot be written; their entries stay pending",
                dlq_stream(stream)
            ),
        ),
        _ => (
            Fault::DeadLetters,
            format!("dead letters of {stream} cannot be written: {e}"),
        ),
    }
}

impl Settlement {
    fn fates(&self) -> Vec<Fate> {
        let mut fates = vec![Fate::Ack; self.entries.len()];
        for (fate, by_sink) in fates.iter_mut().zip(&self.by_sink) {
            if *by_sink {
                *fate = Fate::Sink;
            }
        }
        for d in &self.dead {
            fates[d.index] = Fate::Dead;
        }
        for i in &self.deferred {
            fates[*i] = Fate::Deferred;
        }
        if !self.held.is_empty() {
            for (i, e) in self.entries.iter().enumerate() {
                if self
                    .held
                    .iter()
                    .any(|(s, id)| *s == e.stream && *id == e.id)
                {
                    fates[i] = Fate::Held;
                }
            }
        }
        fates
    }

    /// Adds this settlement's commands to a round trip, from its ids as registered in flight
    /// (each formatted once), with what each command is; notes the streams it settles.
    fn commands(
        &self,
        settlement: usize,
        (pipe, steps): (&mut redis::Pipeline, &mut Vec<Step>),
        group: &str,
        ids: &BatchIds,
        fates: &[Fate],
        watermarks: &Watermarks,
    ) {
        let at = OffsetDateTime::now_utc();
        let mut index = 0;
        for (stream, ids) in ids {
            let run = index..index + ids.len();
            index = run.end;
            let ack: Vec<&String> = ids
                .iter()
                .zip(&fates[run.clone()])
                .filter(|(_, f)| **f == Fate::Ack)
                .map(|(id, _)| id)
                .collect();
            if !ack.is_empty() {
                pipe.cmd("XACK").arg(&**stream).arg(group).arg(ack);
                steps.push(Step::Ack);
            }
            let dead: Vec<&DeadLetter> = self
                .dead
                .iter()
                .filter(|d| run.contains(&d.index))
                .collect();
            if !dead.is_empty() {
                let cmd = pipe
                    .add_command(DEAD_LETTER_SCRIPT.call())
                    .arg(3)
                    .arg(&dead_letter_keys(stream)[..])
                    .arg(group);
                for d in &dead {
                    let entry = &self.entries[d.index];
                    let fields = dead_letter_fields(entry, group, d.reason, &d.error, at);
                    cmd.arg(&ids[d.index - run.start])
                        .arg(fields.len())
                        .arg(fields);
                }
                steps.push(Step::DeadLetters {
                    settlement,
                    stream: stream.clone(),
                    entries: dead.len(),
                });
            }
            if fates[run].iter().any(|f| f.settles()) {
                watermarks.settled(stream);
            }
        }
    }

    fn record(&self, fates: &[Fate], labels: &StreamLabels, group: &str) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut start = 0;
        for run in self.entries.chunk_by(|a, b| a.stream == b.stream) {
            let stream = labels.of(&run[0].stream).to_string();
            let run_fates = &fates[start..start + run.len()];
            let acked = run_fates.iter().filter(|f| f.settles()).count();
            // The id's time is the producer's XADD on Redis's clock; a clock behind it is 0.
            let age = metrics::histogram!(m::EVENT_AGE, "stream" => stream.clone(), "group" => group.to_owned());
            for (entry, fate) in run.iter().zip(run_fates) {
                if fate.settles() {
                    age.record(now_ms.saturating_sub(entry.id.ms) as f64 / 1000.0);
                }
            }
            start += run.len();
            if !self.released {
                metrics::counter!(m::EVENTS_READ, "stream" => stream.clone())
                    .increment(run.len() as u64);
            }
            metrics::counter!(m::EVENTS_ACKNOWLEDGED, "stream" => stream).increment(acked as u64);
        }
        for d in &self.dead {
            if fates[d.index] == Fate::Dead {
                metrics::counter!(m::EVENTS_DEAD_LETTERED, "stream" => labels.of(&self.entries[d.index].stream).to_string(), "reason" => d.reason.as_str()).increment(1);
            }
        }
        let c = &self.counts;
        metrics::counter!(m::EVENTS_APPLIED).increment(c.applied.applied as u64);
        metrics::counter!(m::EVENTS_DEDUPLICATED, "stage" => "batch")
            .increment(c.batch_duplicates as u64);
        metrics::counter!(m::EVENTS_DEDUPLICATED, "stage" => "sink")
            .increment(c.applied.duplicates as u64);
        metrics::counter!(m::EVENTS_SKIPPED, "reason" => "unrouted").increment(c.unrouted as u64);
        metrics::counter!(m::EVENTS_SKIPPED, "reason" => "other_group")
            .increment(c.other_group as u64);
        metrics::counter!(m::EVENTS_SKIPPED, "reason" => "not_for_worker")
            .increment(c.applied.skipped as u64);
        metrics::counter!(m::EVENTS_SKIPPED, "reason" => "backpressure").increment(c.shed as u64);
        metrics::counter!(m::EVENTS_SKIPPED, "reason" => "deleted").increment(c.deleted as u64);
        metrics::histogram!(m::BATCH_DURATION).record(self.started.elapsed().as_secs_f64());
    }
}

/// Adds the watermark samples of `due` to a round trip.
fn sample(pipe: &mut redis::Pipeline, steps: &mut Vec<Step>, group: &str, due: Vec<Arc<str>>) {
    for stream in due {
        pipe.add_command(sample_command(&stream, group));
        steps.push(Step::Sample(stream));
    }
}

/// Most settlements acknowledged in one round trip: the lanes confirm parts of one read at about
/// the same time, so the acker takes together those already waiting.
const SETTLEMENTS_PER_TRIP: usize = 8;

/// Where the acknowledge stage reports and what it must know.
pub struct Acker {
    pub conn: Conn,
    pub group: String,
    pub health: Arc<Health>,
    pub shutdown: Shutdown,
    pub in_flight: InFlight,
    pub labels: StreamLabels,
    pub watermarks: Watermarks,
}

impl Acker {
    /// Settles batches until the processor closes the channel. A Redis outage is retried with
    /// backoff; once the drain has started a failed round trip is not tried again: the rest stays
    /// pending (its effects are durable, so the redelivery is a no-op).
    pub async fn run(mut self, mut settlements: mpsc::Receiver<Settlement>) {
        while let Some(first) = settlements.recv().await {
            // The settlements already waiting go in the same round trip.
            let mut batch = vec![first];
            while batch.len() < SETTLEMENTS_PER_TRIP {
                match settlements.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
            }
            let mut fates: Vec<Vec<Fate>> = batch.iter().map(Settlement::fates).collect();
            if self.settle(&batch, &mut fates).await {
                for (s, fates) in batch.iter().zip(&fates) {
                    s.record(fates, &self.labels, &self.group);
                }
            }
            for s in &batch {
                self.in_flight.release(s.ticket);
            }
            if settlements.is_empty() {
                // Out of work: the streams settled since their last sample get one now, so that
                // the checkpoints an idle worker writes reach its last entries.
                self.watermarks
                    .sample_dirty(&mut self.conn, &self.group)
                    .await;
            }
        }
    }

    /// Settlements in one round trip; false if it was given up (drain), leaving every entry
    /// pending.
    async fn settle(&mut self, batch: &[Settlement], fates: &mut [Vec<Fate>]) -> bool {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut steps = Vec::new();
        let mut streams: Vec<Arc<str>> = Vec::new();
        for (i, s) in batch.iter().enumerate() {
            let added = self.in_flight.with_ids(s.ticket, |ids| {
                s.commands(
                    i,
                    (&mut pipe, &mut steps),
                    &self.group,
                    ids,
                    &fates[i],
                    &self.watermarks,
                );
                streams.extend(ids.iter().map(|(stream, _)| stream.clone()));
            });
            if added.is_none() {
                return false;
            }
        }
        streams.sort();
        streams.dedup();
        let due = self.watermarks.due(streams.iter());
        sample(&mut pipe, &mut steps, &self.group, due);
        if steps.is_empty() {
            return true;
        }
        let mut delays = crate::runtime::backoff::backoff();
        let results = loop {
            match query_loading(
                &pipe,
                &mut self.conn,
                &[&DEAD_LETTER_SCRIPT, &SAMPLE_SCRIPT],
            )
            .await
            {
                Ok(results) => break results,
                Err(e) => {
                    self.health.down(Dependency::Redis, &e);
                    if self.shutdown.is_triggered()
                        || !self.shutdown.sleep(delays.next().unwrap_or_default()).await
                    {
                        tracing::info!("draining: the batch is left pending for redelivery");
                        return false;
                    }
                }
            }
        };
        self.health.up(Dependency::Redis);
        for (step, result) in steps.iter().zip(results) {
            match (step, result) {
                (Step::DeadLetters { .. }, Ok(_)) => {
                    self.health.clear(Fault::DeadLetters);
                    self.health.clear(Fault::RedisOutOfMemory);
                }
                (
                    Step::DeadLetters {
                        settlement,
                        stream,
                        entries,
                    },
                    Err(e),
                ) => {
                    if e.code() == Some("NOGROUP") {
                        // The group was destroyed while the batch was in flight, its pending
                        // entries with it: the group created again delivers what it starts before.
                        tracing::warn!(%stream, entries, "consumer group gone while settling: dead letters left to the group created again");
                    } else {
                        let (fault, detail) = dead_letter_fault(stream, &e);
                        self.health.raise(fault, &detail);
                        tracing::debug!(%stream, entries, error = %e, "dead letters not written");
                    }
                    let s = &batch[*settlement];
                    for (i, f) in fates[*settlement].iter_mut().enumerate() {
                        if *f == Fate::Dead && s.entries[i].stream == *stream {
                            *f = Fate::Held;
                        }
                    }
                }
                (Step::Ack, Err(e)) => {
                    // NOGROUP: the group was deleted meanwhile, and its pending entries with it.
                    tracing::warn!(error = %e, "acknowledgement refused");
                }
                (Step::Ack, Ok(_)) => {}
                (Step::Sample(stream), Ok(reply)) => self.watermarks.sampled(stream, &reply),
                (Step::Sample(stream), Err(e)) => {
                    tracing::debug!(%stream, error = %e, "watermark not sampled");
                    self.watermarks.unsampled(stream);
                }
            }
        }
        true
    }
}
