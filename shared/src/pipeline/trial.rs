//! Suspects: entries delivered more than `max_deliveries` times. Crashes and restarts redeliver
//! whole batches, so most suspects are innocent neighbours of the entry that caused them. A suspect
//! is applied alone, after a *trial marker* (a field of `<stream>:trials`) says so in Redis; if it
//! fails alone it is dead-lettered (`max_deliveries`), if it succeeds it is acknowledged at once. A
//! suspect found with its marker already set was being applied alone when the worker died: that
//! one is the culprit, and goes to the dead letter stream without another try. So an entry that
//! crashes the process is dead-lettered after `max_deliveries`, and the events read with it are not.

use crate::pipeline::handler::{Applied, Batch, Handler, Routed};
use crate::pipeline::policy::Alone;
use crate::pipeline::process::Processor;
use crate::runtime::backoff::backoff;
use crate::runtime::health::{Dependency, Fault};
use crate::runtime::shutdown::Shutdown;
use crate::source::entry::Entry;
use crate::stream::keys::{trial_field, trials_key};

/// How long a trial marker outlives its last use: a marker whose entry was settled by another
/// consumer is not removed by this one, and must not stay for ever.
const TRIALS_TTL_S: u64 = 7 * 24 * 3600;

/// What became of a suspect applied alone.
pub(crate) enum Trial {
    Applied(Applied),
    Dead(String),
    /// Not decided (Redis refused the marker, or the drain started): left pending.
    Pending,
}

impl<H: Handler> Processor<H> {
    /// A suspect (delivered more than `max_deliveries` times) applied alone, under a trial marker
    /// (see the module doc).
    pub(crate) async fn trial(
        &mut self,
        suspect: Routed<'_>,
        entry: &Entry,
        shutdown: &Shutdown,
    ) -> Trial {
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
            consumer: &self.consumer,
            events: vec![suspect],
            checkpoints: Vec::new(),
        };
        let outcome = match self.applier.alone(&single, shutdown).await {
            // A sink that rejects the event without failing (it stays pending): as a failure.
            Some(Alone::Applied(mut applied)) if !applied.rejected.is_empty() => {
                Some(Alone::Rejected(applied.rejected.remove(0).error))
            }
            other => other,
        };
        match outcome {
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
