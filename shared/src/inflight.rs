//! The entries read and not yet settled, across the pipeline's stages, kept "alive" in the
//! pending entry list while they wait, like a Kafka consumer's heartbeat: without it a long sink
//! outage would let another consumer's reclaimer take them over and count redeliveries against
//! valid events.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

use crate::entry::Entry;

/// The entry ids of one batch, per stream, formatted once when the batch is read.
pub type BatchIds = Vec<(Arc<str>, Vec<String>)>;

#[derive(Debug)]
struct State {
    next: u64,
    batches: BTreeMap<u64, BatchIds>,
    touched: Instant,
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
                touched: Instant::now(),
            })),
        }
    }
}

impl InFlight {
    /// Registers a batch just read; returns its ticket. Tickets count up from 0 in read order,
    /// one per batch: `overlap` gives batches their turn by them.
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

    /// Forgets a batch: settled, or left pending for redelivery.
    pub fn release(&self, ticket: u64) {
        self.state
            .lock()
            .expect("in-flight lock")
            .batches
            .remove(&ticket);
    }

    /// Resets the idle time of every in-flight entry (XCLAIM JUSTID: no delivery is counted) once
    /// `every` has passed since the last reset. Entries another consumer has claimed meanwhile
    /// (idle less than `every`) are left to it.
    pub async fn keep_alive(
        &self,
        conn: &mut ConnectionManager,
        group: &str,
        consumer: &str,
        every: Duration,
    ) {
        let mut pipe = redis::pipe();
        {
            let mut s = self.state.lock().expect("in-flight lock");
            if s.touched.elapsed() < every || s.batches.is_empty() {
                return;
            }
            s.touched = Instant::now();
            for (stream, ids) in s.batches.values().flatten() {
                pipe.cmd("XCLAIM")
                    .arg(&**stream)
                    .arg(group)
                    .arg(consumer)
                    .arg(every.as_millis() as u64)
                    .arg(ids)
                    .arg("JUSTID")
                    .ignore();
            }
        }
        if let Err(e) = pipe.query_async::<()>(conn).await {
            tracing::debug!(error = %e, "could not refresh the entries in flight");
        }
    }
}
