//! The entries read and not yet settled, across the pipeline's stages, kept "alive" in the
//! pending entry list while they wait, like a Kafka consumer's heartbeat: without it a long sink
//! outage, a settlement waiting for Redis or a handler retry would let a reclaimer (another
//! consumer's, or this one's) take them over and process them a second time, counting
//! redeliveries against valid events. The heartbeat runs on a timer of its own, whatever the
//! stages are doing.
//!
//! Entries waiting for their channel (backpressure's `block`, a coalescing window) outlive the
//! part they were read in: they are registered one by one as *waiting*, kept alive the same way,
//! and counted with the parts towards `max_in_flight`, which the reader waits for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::runtime::conn::Conn;

use crate::source::entry::Entry;

/// The entry ids of one batch, per stream, formatted once when the batch is read.
pub type BatchIds = Vec<(Arc<str>, Vec<String>)>;

#[derive(Debug, Default)]
struct State {
    next: u64,
    batches: BTreeMap<u64, BatchIds>,
    /// Entries that outlive their part, by stream.
    waiting: HashMap<Arc<str>, HashSet<String>>,
    /// How many entries `waiting` holds.
    waiting_len: usize,
    /// Entries of the batches plus waiting entries.
    len: usize,
}

/// A registry of in-flight batches shared by the reader, the processor and the acker.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    state: Arc<Mutex<State>>,
    /// Signalled when entries leave, for a reader waiting under `max_in_flight`.
    freed: Arc<tokio::sync::Notify>,
}

impl InFlight {
    /// Registers a batch (a part of a read) just read; returns its ticket.
    pub fn register(&self, entries: &[Entry]) -> u64 {
        let ids = entries
            .chunk_by(|a, b| a.stream == b.stream)
            .map(|run| {
                (
                    run[0].stream.clone(),
                    run.iter().map(|e| e.id.to_string()).collect(),
                )
            })
            .collect();
        let mut s = self.state.lock().expect("in-flight lock");
        let ticket = s.next;
        s.next += 1;
        s.len += entries.len();
        s.batches.insert(ticket, ids);
        ticket
    }

    /// Registers entries that outlive their part (waiting for their channel); they stay in
    /// flight until [`InFlight::unwait`].
    pub fn wait<'a>(&self, entries: impl IntoIterator<Item = &'a Entry>) {
        let mut s = self.state.lock().expect("in-flight lock");
        for e in entries {
            if s.waiting
                .entry(e.stream.clone())
                .or_default()
                .insert(e.id.to_string())
            {
                s.len += 1;
                s.waiting_len += 1;
            }
        }
    }

    /// Forgets waiting entries: released (in a part of their own by now) or settled.
    pub fn unwait<'a>(&self, entries: impl IntoIterator<Item = &'a Entry>) {
        let mut s = self.state.lock().expect("in-flight lock");
        for e in entries {
            let Some(ids) = s.waiting.get_mut(&e.stream) else {
                continue;
            };
            let removed = ids.remove(&e.id.to_string());
            if ids.is_empty() {
                s.waiting.remove(&e.stream);
            }
            if removed {
                s.len -= 1;
                s.waiting_len -= 1;
            }
        }
        drop(s);
        self.freed.notify_waiters();
    }

    /// Returns once `more` entries fit under `max` (or nothing is in flight at all). Parts
    /// alone are bounded by the stages' queues (`lanes::queue_len`), as they always were: the
    /// count is only waited for while entries wait for their channel, which nothing else bounds.
    pub async fn room_for(&self, more: usize, max: usize) {
        loop {
            let freed = self.freed.notified();
            {
                let s = self.state.lock().expect("in-flight lock");
                if s.waiting_len == 0 || s.len == 0 || s.len + more <= max {
                    return;
                }
            }
            freed.await;
        }
    }

    /// Runs `f` on the ids of a batch still in flight (the acker builds its XACKs from them, so no
    /// id is formatted twice). `None` if the ticket is unknown.
    pub fn with_ids<R>(&self, ticket: u64, f: impl FnOnce(&BatchIds) -> R) -> Option<R> {
        self.state
            .lock()
            .expect("in-flight lock")
            .batches
            .get(&ticket)
            .map(f)
    }

    /// Appends the ids of batch `from` to batch `into`, whose entries a lane applies together.
    pub fn merge(&self, into: u64, from: u64) {
        let mut s = self.state.lock().expect("in-flight lock");
        if let Some(ids) = s.batches.remove(&from) {
            s.batches.entry(into).or_default().extend(ids);
        }
    }

    /// Forgets a batch: settled, or left pending for redelivery.
    pub fn release(&self, ticket: u64) {
        let mut s = self.state.lock().expect("in-flight lock");
        if let Some(ids) = s.batches.remove(&ticket) {
            s.len -= ids.iter().map(|(_, ids)| ids.len()).sum::<usize>();
        }
        drop(s);
        self.freed.notify_waiters();
    }

    /// Whether the entry `id` of `stream` is in flight here (a reclaim may return entries this
    /// worker is still processing: they must not be processed twice).
    pub fn contains(&self, stream: &str, id: &str) -> bool {
        let s = self.state.lock().expect("in-flight lock");
        s.waiting.get(stream).is_some_and(|ids| ids.contains(id))
            || s.batches
                .values()
                .flatten()
                .any(|(st, ids)| &**st == stream && ids.iter().any(|i| i == id))
    }

    /// Every `claim_idle / 4`, resets the idle time of the entries in flight idle for at least
    /// `claim_idle / 2` (XCLAIM JUSTID: no delivery is counted), until the task is dropped: an
    /// entry is then never idle for `claim_idle` while this worker holds it. An entry another
    /// consumer took over meanwhile, and keeps alive the same way, is never that idle: it is left
    /// to it.
    pub async fn keep_alive(
        self,
        mut conn: Conn,
        group: String,
        consumer: String,
        claim_idle: Duration,
    ) {
        let every = claim_idle / 4;
        let min_idle = (claim_idle / 2).as_millis() as u64;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let mut pipe = redis::pipe();
            {
                let s = self.state.lock().expect("in-flight lock");
                if s.batches.is_empty() && s.waiting.is_empty() {
                    continue;
                }
                let waiting = s
                    .waiting
                    .iter()
                    .map(|(stream, ids)| (stream, ids.iter().collect::<Vec<_>>()));
                let batches = s
                    .batches
                    .values()
                    .flatten()
                    .map(|(stream, ids)| (stream, ids.iter().collect()));
                for (stream, ids) in batches.chain(waiting) {
                    pipe.cmd("XCLAIM")
                        .arg(&**stream)
                        .arg(&group)
                        .arg(&consumer)
                        .arg(min_idle)
                        .arg(ids)
                        .arg("JUSTID")
                        .ignore();
                }
            }
            if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                tracing::debug!(error = %e, "could not refresh the entries in flight");
            }
        }
    }
}
