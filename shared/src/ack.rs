//! The acknowledge stage: once the handler has confirmed a batch, its dead letters and the XACK of
//! every entry (but those held for redelivery) go to Redis in one MULTI/EXEC round trip, so a
//! crash leaves both or neither. Batches are settled in the order they were confirmed.

use std::sync::Arc;
use std::time::Instant;

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use crate::dlq::{add_dead_letter, DlqReason};
use crate::entry::{Entry, EntryId};
use crate::handler::Applied;
use crate::health::{Dependency, Health};
use crate::inflight::{BatchIds, InFlight};
use crate::metrics as m;
use crate::shutdown::Shutdown;

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
    pub counts: Counts,
    pub started: Instant,
}

impl Settlement {
    fn is_held(&self, e: &Entry) -> bool {
        self.held
            .iter()
            .any(|(s, id)| *s == e.stream && *id == e.id)
    }

    /// The MULTI/EXEC pipeline, from the batch's ids as registered in flight; `None` when there
    /// is nothing to send (everything held).
    fn commands(&self, group: &str, ids: &BatchIds) -> Option<redis::Pipeline> {
        let held: Vec<(&Arc<str>, String)> = self
            .held
            .iter()
            .map(|(s, id)| (s, id.to_string()))
            .collect();
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut commands = self.dead.len();
        for d in &self.dead {
            add_dead_letter(&mut pipe, &self.entries[d.index], group, d.reason, &d.error);
        }
        for (stream, ids) in ids {
            let ack: Vec<&String> = ids
                .iter()
                .filter(|id| !held.iter().any(|(s, h)| *s == stream && h == *id))
                .collect();
            if !ack.is_empty() {
                pipe.cmd("XACK").arg(&**stream).arg(group).arg(ack).ignore();
                commands += 1;
            }
        }
        (commands > 0).then_some(pipe)
    }

    fn record(&self) {
        for run in self.entries.chunk_by(|a, b| a.stream == b.stream) {
            let stream = run[0].stream.to_string();
            let kept = run.iter().filter(|e| self.is_held(e)).count();
            metrics::counter!(m::EVENTS_READ, "stream" => stream.clone())
                .increment(run.len() as u64);
            metrics::counter!(m::EVENTS_ACKNOWLEDGED, "stream" => stream)
                .increment((run.len() - kept) as u64);
        }
        for d in &self.dead {
            metrics::counter!(m::EVENTS_DEAD_LETTERED, "stream" => self.entries[d.index].stream.to_string(), "reason" => d.reason.as_str()).increment(1);
        }
        let c = &self.counts;
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
        metrics::histogram!(m::BATCH_DURATION).record(self.started.elapsed().as_secs_f64());
    }
}

/// Settles batches until the processor closes the channel. A Redis outage is retried with
/// backoff; if the drain starts first, the rest stays pending (its effects are already durable,
/// so the redelivery is a no-op).
pub async fn run(
    mut conn: ConnectionManager,
    group: String,
    mut settlements: mpsc::Receiver<Settlement>,
    health: Arc<Health>,
    shutdown: Shutdown,
    in_flight: InFlight,
) {
    while let Some(s) = settlements.recv().await {
        let mut settled = true;
        let pipe = in_flight
            .with_ids(s.ticket, |ids| s.commands(&group, ids))
            .flatten();
        if let Some(pipe) = pipe {
            let mut delays = crate::backoff::backoff();
            loop {
                match pipe.query_async::<()>(&mut conn).await {
                    Ok(()) => {
                        health.up(Dependency::Redis);
                        break;
                    }
                    Err(e) => {
                        health.down(Dependency::Redis, &e);
                        if !shutdown.sleep(delays.next().unwrap_or_default()).await {
                            settled = false;
                            break;
                        }
                    }
                }
            }
        }
        in_flight.release(s.ticket);
        if settled {
            s.record();
        }
    }
}
