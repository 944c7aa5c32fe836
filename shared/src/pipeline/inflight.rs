//! The entries read and not yet settled, across the pipeline's stages, kept "alive" in the
//! pending entry list while they wait, like a Kafka consumer's heartbeat: without it a long sink
//! outage, a settlement waiting for Redis or a handler retry would let a reclaimer (another
//! consumer's, or this one's) take them over and process them a second time, counting
//! redeliveries against valid events. The heartbeat runs on a timer of its own, whatever the
//! stages are doing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::source::entry::Entry;

/// The entry ids of one batch, per stream, formatted once when the batch is read.
pub type BatchIds = Vec<(Arc<str>, Vec<String>)>;

#[derive(Debug)]
struct State {
    next: u64,
    batches: BTreeMap<u64, BatchIds>,
}

/// A registry of in-flight batches shared by the reader, the processor and the acker.
#[derive(Debug, Clone)]
pub struct InFlight {
    state: Arc<Mutex<State>>,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            state: Arc::new(Mutex::new(State {
                next: 0,
                batches: BTreeMap::new(),
            })),
        }
    }
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
        s.batches.insert(ticket, ids);
        ticket
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
        self.state
            .lock()
            .expect("in-flight lock")
            .batches
            .remove(&ticket);
    }

    /// Whether the entry `id` of `stream` is in flight here (a reclaim may return entries this
    /// worker is still processing: they must not be processed twice).
    pub fn contains(&self, stream: &str, id: &str) -> bool {
        let s = self.state.lock().expect("in-flight lock");
        s.batches
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
        mut conn: ConnectionManager,
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
                if s.batches.is_empty() {
                    continue;
                }
                for (stream, ids) in s.batches.values().flatten() {
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
