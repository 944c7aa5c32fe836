//! The handler's retry, isolation and poison policy: everything between "here is a batch" and "its
//! effects are durable", with no Redis in it.
//!
//! What a failure means decides what happens next, and waiting is always the safe answer:
//! - the sink cannot take anything (down, read-only, a missing privilege): the whole batch waits
//!   with backoff and nothing is counted against its events;
//! - the sink rejects something in the batch, or the handler panics: the events are applied one
//!   by one, and the ones at fault are dead-lettered (`handler_error`);
//! - the batch keeps failing although the sink answers other statements: the events are applied
//!   one by one, and the ones that keep failing are *held*: left pending, so that the reclaimer
//!   redelivers them and their delivery count rises to `max_deliveries`. Any number of such events,
//!   together or apart, end up in the dead letter stream, each once; the rest is never held up.
//!
//! During a drain, a batch whose sink is down is left pending at once (its entries are redelivered
//! after the restart), and a retry in progress is cancelled: only a first attempt on a healthy
//! sink is allowed to finish.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;

use crate::pipeline::handler::{Applied, Batch, Handler, HandlerError};
use crate::runtime::backoff::backoff;
use crate::runtime::health::{Dependency, Fault, Health};
use crate::runtime::shutdown::Shutdown;
use crate::stream::EntryId;

/// Failed attempts, while the sink answers, before a batch is applied event by event (and before
/// an event applied alone is held for redelivery).
pub const STRIKES: u32 = 3;
/// How long a first attempt still in progress when the drain starts may take to finish: a
/// commit takes milliseconds; one that hangs (a frozen sink) is cancelled.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// What became of a batch's events once the handler confirmed it.
#[derive(Debug, Default)]
pub struct Confirmed {
    pub applied: Applied,
    /// Rejected by the sink (or made the handler panic): dead letters with reason `handler_error`.
    pub rejected: Vec<(Arc<str>, EntryId, String)>,
    /// Kept failing while the sink answered: left pending for redelivery.
    pub held: Vec<(Arc<str>, EntryId)>,
    /// Applied as one batch, its checkpoints with it; event by event, they were not written (they
    /// assumed every event applied): a later batch writes them.
    pub whole: bool,
}

impl Confirmed {
    /// The events the handler rejected in a batch it applied join the rejected ones.
    fn with_rejected(mut self) -> Self {
        for r in std::mem::take(&mut self.applied.rejected) {
            self.rejected.push((r.stream, r.entry_id, r.error));
        }
        self
    }
}

/// What one failed attempt says about the batch.
#[derive(Debug)]
enum Verdict {
    /// Something in the batch is at fault: find it event by event.
    BlameEvents(String),
    /// The sink answers, yet this attempt failed: try again, and count a strike.
    Strike(String),
    /// The sink cannot take anything now: wait, counting nothing against the events.
    Wait,
}

/// The handler with its policy. Each handler lane has its own.
#[derive(Clone)]
pub struct Applier<H> {
    pub handler: H,
    pub health: Arc<Health>,
    /// Longest one attempt may take.
    pub timeout: Duration,
    /// Whether this lane reported the sink's Redis out of memory: its next success clears it.
    pub out_of_memory: bool,
}

impl<H: Handler> Applier<H> {
    /// One attempt, bounded by the handler timeout. A panic in the handler is caught and reported
    /// as a permanent failure of the batch (so it is isolated), never allowed to kill the
    /// process: a crash would count a delivery against every event of the batch. The drain
    /// cancels the attempt: at once with `cancel_on_drain` (a retry), else after `DRAIN_GRACE`
    /// (its effects are idempotent: the batch stays pending and is applied after the restart).
    async fn attempt(
        &mut self,
        batch: &Batch<'_>,
        shutdown: &Shutdown,
        cancel_on_drain: bool,
    ) -> Option<Result<Applied, HandlerError>> {
        let started = Instant::now();
        let apply = AssertUnwindSafe(self.handler.apply(batch)).catch_unwind();
        let bounded = tokio::time::timeout(self.timeout, apply);
        let grace = if cancel_on_drain {
            Duration::ZERO
        } else {
            DRAIN_GRACE
        };
        let drained = async {
            shutdown.triggered().await;
            tokio::time::sleep(grace).await;
        };
        let outcome = tokio::select! {
            biased;
            outcome = bounded => outcome,
            _ = drained => {
                tracing::info!("draining: the attempt in progress is cancelled, its batch left pending");
                return None;
            }
        };
        let outcome = match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(panic)) => Err(HandlerError::Permanent(format!(
                "the handler panicked: {}",
                panic_message(&*panic)
            ))),
            Err(_) => Err(HandlerError::Transient(format!(
                "handler took longer than handler_timeout_ms = {}",
                self.timeout.as_millis()
            ))),
        };
        metrics::histogram!(crate::runtime::metrics::HANDLER_DURATION)
            .record(started.elapsed().as_secs_f64());
        if outcome.is_err() {
            metrics::counter!(crate::runtime::metrics::HANDLER_ERRORS).increment(1);
        } else {
            self.health.up(Dependency::Sink);
            self.health.clear(Fault::SinkMisconfigured);
            if std::mem::take(&mut self.out_of_memory) {
                self.health.clear(Fault::RedisOutOfMemory);
            }
        }
        Some(outcome)
    }

    /// Reads a failure, marking readiness: an outage or a configuration fault makes the worker
    /// unready; a failure while the sink answers does not. Asking the sink may take long while
    /// it is down: the drain does not wait for the answer (the batch then waits, i.e. stays
    /// pending).
    async fn judge(&mut self, error: HandlerError, shutdown: &Shutdown) -> Verdict {
        match error {
            HandlerError::Permanent(e) => Verdict::BlameEvents(e),
            HandlerError::Unavailable(e) => {
                self.health.down(Dependency::Sink, &e);
                Verdict::Wait
            }
            HandlerError::OutOfMemory(e) => {
                self.health.up(Dependency::Sink);
                self.health.raise(Fault::RedisOutOfMemory, &e);
                self.out_of_memory = true;
                Verdict::Wait
            }
            HandlerError::Misconfigured(e) | HandlerError::Fatal(e) => {
                self.health.up(Dependency::Sink);
                self.health.raise(Fault::SinkMisconfigured, &e);
                Verdict::Wait
            }
            HandlerError::Transient(e) => match tokio::select! {
                biased;
                answer = self.handler.check() => answer,
                _ = shutdown.triggered() => return Verdict::Wait,
            } {
                Ok(()) => Verdict::Strike(e),
                Err(HandlerError::Misconfigured(m)) => {
                    self.health.raise(Fault::SinkMisconfigured, &m);
                    Verdict::Wait
                }
                Err(_) => {
                    self.health.down(Dependency::Sink, &e);
                    Verdict::Wait
                }
            },
        }
    }

    /// Whether a first attempt may start during a drain: only on a sink that answered last time.
    fn may_start(&self, shutdown: &Shutdown) -> bool {
        !shutdown.is_triggered()
            || (self.health.is_up(Dependency::Sink) && !self.health.has(Fault::SinkMisconfigured))
    }

    /// Applies the batch: see the module doc. `None` if the drain started first (nothing is
    /// acknowledged then: the entries stay pending for redelivery).
    pub async fn confirm(&mut self, batch: &Batch<'_>, shutdown: &Shutdown) -> Option<Confirmed> {
        if !self.may_start(shutdown) {
            tracing::info!(
                events = batch.events.len(),
                "draining while the sink is down: the batch is left pending"
            );
            return None;
        }
        let mut delays = backoff();
        let mut strikes = 0;
        let mut retry = false;
        loop {
            let error = match self.attempt(batch, shutdown, retry).await? {
                Ok(applied) => {
                    return Some(
                        Confirmed {
                            applied,
                            whole: true,
                            ..Confirmed::default()
                        }
                        .with_rejected(),
                    )
                }
                Err(e) => e,
            };
            retry = true;
            match self.judge(error, shutdown).await {
                Verdict::BlameEvents(e) => {
                    tracing::warn!(error = %e, events = batch.events.len(), "the batch failed because of its content: isolating the event(s) at fault");
                    break;
                }
                Verdict::Strike(e) => {
                    strikes += 1;
                    tracing::warn!(error = %e, attempt = strikes, "batch failed although the sink answers");
                    if strikes >= STRIKES && !batch.events.is_empty() {
                        break;
                    }
                }
                Verdict::Wait => {}
            }
            pause(&mut delays, shutdown).await?;
        }
        Some(self.isolate(batch, shutdown).await?.with_rejected())
    }

    /// Applies each event alone: rejected ones become dead letters, ones that keep failing are
    /// held, the rest are applied.
    async fn isolate(&mut self, batch: &Batch<'_>, shutdown: &Shutdown) -> Option<Confirmed> {
        let mut out = Confirmed::default();
        for routed in &batch.events {
            let single = Batch {
                group: batch.group,
                consumer: batch.consumer,
                events: vec![*routed],
                checkpoints: Vec::new(),
            };
            match self.alone(&single, shutdown).await? {
                Alone::Applied(applied) => out.applied += applied,
                Alone::Rejected(e) => {
                    tracing::warn!(event_id = %routed.event.id, entry_id = %routed.entry_id, correlation_id = routed.event.correlation_id.as_deref().unwrap_or(""), error = %e, "dead-lettering the event the sink rejects");
                    out.rejected
                        .push((routed.stream.clone(), routed.entry_id, e));
                }
                Alone::KeptFailing(e) => {
                    tracing::warn!(event_id = %routed.event.id, entry_id = %routed.entry_id, error = %e, "event keeps failing: left pending for redelivery");
                    out.held.push((routed.stream.clone(), routed.entry_id));
                }
            }
        }
        Some(out)
    }

    /// One event alone (`batch` holds one), retried while the sink cannot take it.
    pub async fn alone(&mut self, batch: &Batch<'_>, shutdown: &Shutdown) -> Option<Alone> {
        let mut delays = backoff();
        let mut strikes = 0;
        loop {
            let error = match self.attempt(batch, shutdown, true).await? {
                Ok(applied) => return Some(Alone::Applied(applied)),
                Err(e) => e,
            };
            match self.judge(error, shutdown).await {
                Verdict::BlameEvents(e) => return Some(Alone::Rejected(e)),
                Verdict::Strike(e) => {
                    strikes += 1;
                    if strikes >= STRIKES {
                        return Some(Alone::KeptFailing(e));
                    }
                }
                Verdict::Wait => {}
            }
            pause(&mut delays, shutdown).await?;
        }
    }
}

/// What became of one event applied alone.
#[derive(Debug)]
pub enum Alone {
    Applied(Applied),
    /// The sink rejects it (or the handler panicked on it).
    Rejected(String),
    /// It failed on every attempt although the sink answered.
    KeptFailing(String),
}

/// Sleeps for the next backoff step; `None` if the drain started (stop retrying).
async fn pause(delays: &mut impl Iterator<Item = Duration>, shutdown: &Shutdown) -> Option<()> {
    if shutdown.is_triggered() || !shutdown.sleep(delays.next().unwrap_or_default()).await {
        tracing::info!("draining during retries: the batch is left pending for redelivery");
        return None;
    }
    Some(())
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use time::OffsetDateTime;
    use uuid::Uuid;

    use crate::event::Event;
    use crate::pipeline::handler::Routed;
    use crate::runtime::config::Route;

    /// A sink that fails on some events, or on everything, as told.
    #[derive(Clone, Default)]
    struct Fake {
        /// Fails with a transient error every time, while the sink answers.
        poison: Arc<HashSet<Uuid>>,
        /// Rejected: a permanent error.
        reject: Arc<HashSet<Uuid>>,
        /// Makes the handler panic.
        panics: Arc<HashSet<Uuid>>,
        /// Reported as rejected in a batch applied otherwise (a transactional sink's verdict).
        refuse: Arc<HashSet<Uuid>>,
        /// The sink does not answer at all (until this many more attempts).
        down_for: Arc<AtomicUsize>,
        /// The sink refuses every statement (until this many more attempts).
        refused_for: Arc<AtomicUsize>,
        attempts: Arc<AtomicUsize>,
        /// Applied events, one entry per application.
        applied: Arc<std::sync::Mutex<Vec<Uuid>>>,
        /// Set when the drain should start at the next attempt.
        drain_at_attempt: Arc<AtomicUsize>,
        shutdown: Shutdown,
    }

    fn countdown(n: &AtomicUsize) -> bool {
        n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
            .is_ok()
    }

    impl Handler for Fake {
        async fn apply(&mut self, batch: &Batch<'_>) -> Result<Applied, HandlerError> {
            let n = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
            if self.drain_at_attempt.load(Ordering::Relaxed) == n {
                self.shutdown.trigger();
            }
            if countdown(&self.down_for) {
                return Err(HandlerError::Unavailable("connection refused".into()));
            }
            if countdown(&self.refused_for) {
                return Err(HandlerError::Misconfigured("permission denied".into()));
            }
            for r in &batch.events {
                if self.panics.contains(&r.event.id) {
                    panic!("boom");
                }
                if self.reject.contains(&r.event.id) {
                    return Err(HandlerError::Permanent("rejected".into()));
                }
                if self.poison.contains(&r.event.id) {
                    return Err(HandlerError::Transient("serialization failure".into()));
                }
            }
            let mut applied = self.applied.lock().unwrap();
            let (refused, fine): (Vec<&Routed<'_>>, Vec<&Routed<'_>>) = batch
                .events
                .iter()
                .partition(|r| self.refuse.contains(&r.event.id));
            applied.extend(fine.iter().map(|r| r.event.id));
            Ok(Applied {
                applied: fine.len(),
                rejected: refused
                    .iter()
                    .map(|r| crate::pipeline::handler::Rejected {
                        stream: r.stream.clone(),
                        entry_id: r.entry_id,
                        error: "no data.step".into(),
                    })
                    .collect(),
                ..Applied::default()
            })
        }

        async fn check(&self) -> Result<(), HandlerError> {
            if self.down_for.load(Ordering::Relaxed) > 0 {
                Err(HandlerError::Unavailable("connection refused".into()))
            } else {
                Ok(())
            }
        }
    }

    fn event(id: Uuid) -> Event<'static> {
        Event {
            id,
            event_type: Cow::Borrowed("user.updated"),
            channel: Cow::Borrowed("user.1"),
            source: Cow::Borrowed("tests"),
            time: OffsetDateTime::UNIX_EPOCH,
            data: Cow::Borrowed("{}"),
            key: None,
            correlation_id: None,
        }
    }

    /// Runs `confirm` on `n` events (ids in order) with `fake` and returns the outcome, the ids,
    /// and the health.
    async fn confirm(
        fake: impl FnOnce(&[Uuid]) -> Fake,
        n: usize,
    ) -> (Option<Confirmed>, Vec<Uuid>, Fake, Arc<Health>) {
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
        let fake = fake(&ids);
        let events: Vec<Event<'static>> = ids.iter().map(|id| event(*id)).collect();
        let route = Route {
            pattern: "user.#".parse().unwrap(),
            strict: true,
            index: 0,
        };
        let stream: Arc<str> = Arc::from("s");
        let batch = Batch {
            group: "g",
            consumer: "c",
            events: events
                .iter()
                .enumerate()
                .map(|(i, e)| Routed {
                    event: e,
                    route: &route,
                    stream: &stream,
                    entry_id: EntryId {
                        ms: 1,
                        seq: i as u64,
                    },
                })
                .collect(),
            checkpoints: Vec::new(),
        };
        let health = Arc::new(Health::default());
        health.up(Dependency::Redis);
        health.up(Dependency::Sink);
        let mut applier = Applier {
            handler: fake.clone(),
            health: health.clone(),
            timeout: Duration::from_secs(5),
            out_of_memory: false,
        };
        let out = applier.confirm(&batch, &fake.shutdown).await;
        (out, ids, fake, health)
    }

    fn held(c: &Confirmed) -> Vec<u64> {
        c.held.iter().map(|(_, id)| id.seq).collect()
    }

    fn set(ids: &[Uuid], at: &[usize]) -> Arc<HashSet<Uuid>> {
        Arc::new(at.iter().map(|i| ids[*i]).collect())
    }

    #[tokio::test(start_paused = true)]
    async fn one_two_or_three_poison_events_together_are_held_and_the_rest_applied() {
        for poison in [vec![3], vec![3, 4], vec![0, 1, 2]] {
            let n = if poison == [0, 1, 2] { 3 } else { 10 };
            let (out, ids, fake, health) = confirm(
                |ids| Fake {
                    poison: set(ids, &poison),
                    ..Fake::default()
                },
                n,
            )
            .await;
            let out = out.expect("confirmed");
            assert_eq!(
                held(&out),
                poison.iter().map(|i| *i as u64).collect::<Vec<_>>()
            );
            assert_eq!(out.applied.applied, n - poison.len());
            let applied = fake.applied.lock().unwrap();
            assert!(poison.iter().all(|i| !applied.contains(&ids[*i])));
            assert!(health.is_ready(), "the sink answers: still ready");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn every_event_failing_while_the_sink_answers_holds_them_all() {
        let (out, _, _, health) = confirm(
            |ids| Fake {
                poison: set(ids, &(0..6).collect::<Vec<_>>()),
                ..Fake::default()
            },
            6,
        )
        .await;
        assert_eq!(held(&out.unwrap()), vec![0, 1, 2, 3, 4, 5]);
        assert!(health.is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn rejected_and_panicking_events_are_dead_lettered_alone() {
        let (out, ids, fake, _) = confirm(
            |ids| Fake {
                reject: set(ids, &[1]),
                panics: set(ids, &[4]),
                ..Fake::default()
            },
            6,
        )
        .await;
        let out = out.unwrap();
        let rejected: Vec<(u64, &str)> = out
            .rejected
            .iter()
            .map(|(_, id, e)| (id.seq, e.as_str()))
            .collect();
        assert_eq!(
            rejected,
            vec![(1, "rejected"), (4, "the handler panicked: boom")]
        );
        assert_eq!(out.applied.applied, 4);
        assert!(!fake.applied.lock().unwrap().contains(&ids[1]));
    }

    #[tokio::test(start_paused = true)]
    async fn events_a_sink_rejects_in_a_batch_it_applies_are_dead_letters_without_isolation() {
        let (out, ids, fake, _) = confirm(
            |ids| Fake {
                refuse: Arc::new([ids[0], ids[3]].into()),
                ..Fake::default()
            },
            5,
        )
        .await;
        let out = out.unwrap();
        let rejected: Vec<u64> = out.rejected.iter().map(|(_, id, _)| id.seq).collect();
        assert_eq!(rejected, vec![0, 3]);
        assert!(out.whole && out.applied.rejected.is_empty());
        assert_eq!(out.applied.applied, 3);
        assert_eq!(fake.attempts.load(Ordering::Relaxed), 1, "one attempt");
        assert!(!fake.applied.lock().unwrap().contains(&ids[3]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sink_that_does_not_answer_is_waited_out_with_nothing_counted() {
        let (out, _, fake, health) = confirm(
            |_| Fake {
                down_for: Arc::new(AtomicUsize::new(20)),
                ..Fake::default()
            },
            5,
        )
        .await;
        let out = out.unwrap();
        assert!(out.held.is_empty() && out.rejected.is_empty());
        assert_eq!(out.applied.applied, 5);
        // Whole-batch attempts only: no event was tried alone.
        assert_eq!(fake.attempts.load(Ordering::Relaxed), 21);
        assert!(health.is_ready(), "ready again once it answers");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusing_sink_is_waited_out_whole_and_reported_as_a_fault() {
        let (out, _, fake, health) = confirm(
            |_| Fake {
                refused_for: Arc::new(AtomicUsize::new(4)),
                ..Fake::default()
            },
            5,
        )
        .await;
        assert_eq!(out.unwrap().applied.applied, 5);
        // Four whole-batch attempts refused, then the one that worked: no event tried alone.
        assert_eq!(fake.attempts.load(Ordering::Relaxed), 5);
        assert!(
            !health.has(Fault::SinkMisconfigured),
            "cleared once it works"
        );
        // While it lasts, the fault is raised (and the worker unready).
        let health = Health::default();
        let mut applier = Applier {
            handler: Fake {
                refused_for: Arc::new(AtomicUsize::new(1)),
                ..Fake::default()
            },
            health: Arc::new(health),
            timeout: Duration::from_secs(5),
            out_of_memory: false,
        };
        let verdict = applier
            .judge(
                HandlerError::Misconfigured("permission denied".into()),
                &Shutdown::default(),
            )
            .await;
        assert!(matches!(verdict, Verdict::Wait));
        assert!(applier.health.has(Fault::SinkMisconfigured));
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_leaves_a_failing_batch_pending_at_once() {
        let down = |_: &[Uuid]| Fake {
            down_for: Arc::new(AtomicUsize::new(usize::MAX)),
            ..Fake::default()
        };
        let isolating = |ids: &[Uuid]| Fake {
            poison: set(ids, &[0, 1]),
            ..Fake::default()
        };
        let refusing = |_: &[Uuid]| Fake {
            refused_for: Arc::new(AtomicUsize::new(usize::MAX)),
            ..Fake::default()
        };
        // (while, the sink, events, drain at attempt, attempts made in all)
        type Sink<'a> = &'a dyn Fn(&[Uuid]) -> Fake;
        let cases: [(&str, Sink, usize, usize, Option<usize>); 3] = [
            ("the sink is down", &down, 5, 3, Some(3)),
            ("events are being isolated", &isolating, 4, 5, Some(5)),
            ("a refusing sink is waited out", &refusing, 4, 2, None),
        ];
        for (during, sink, events, drain_at, attempts) in cases {
            let (out, _, fake, _) = confirm(
                |ids| Fake {
                    drain_at_attempt: Arc::new(AtomicUsize::new(drain_at)),
                    ..sink(ids)
                },
                events,
            )
            .await;
            assert!(out.is_none(), "drained while {during}: left pending");
            if let Some(attempts) = attempts {
                assert_eq!(fake.attempts.load(Ordering::Relaxed), attempts, "{during}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn during_the_drain_a_batch_starts_only_on_a_sink_that_answered() {
        let ids: Vec<Uuid> = vec![Uuid::now_v7()];
        let shutdown = Shutdown::default();
        shutdown.trigger();
        let fake = Fake {
            shutdown: shutdown.clone(),
            ..Fake::default()
        };
        let ev = event(ids[0]);
        let route = Route {
            pattern: "user.#".parse().unwrap(),
            strict: true,
            index: 0,
        };
        let stream: Arc<str> = Arc::from("s");
        let batch = Batch {
            group: "g",
            consumer: "c",
            events: vec![Routed {
                event: &ev,
                route: &route,
                stream: &stream,
                entry_id: EntryId { ms: 1, seq: 0 },
            }],
            checkpoints: Vec::new(),
        };
        let health = Arc::new(Health::default());
        let mut applier = Applier {
            handler: fake.clone(),
            health: health.clone(),
            timeout: Duration::from_secs(5),
            out_of_memory: false,
        };
        health.down(Dependency::Sink, &"gone");
        assert!(applier.confirm(&batch, &shutdown).await.is_none());
        assert_eq!(
            fake.attempts.load(Ordering::Relaxed),
            0,
            "no attempt on a sink that is down"
        );
        health.up(Dependency::Sink);
        assert!(
            applier.confirm(&batch, &shutdown).await.is_some(),
            "finished on a healthy sink"
        );
    }
}
