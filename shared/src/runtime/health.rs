//! Liveness and readiness state, updated by the pipeline as it talks to Redis and the sink.
//! Transitions are logged once each (not once per retry), and recoveries counted as reconnects.
//!
//! Two kinds of trouble make a worker unready. A dependency that does not answer (an outage: the
//! worker waits it out, logged as a warning) and a [`Fault`]: a dependency that answers but
//! refuses what the worker needs (Redis out of memory, a dead letter key of the wrong type, a
//! missing privilege). A fault needs an operator, so it is logged as an error, and `/readyz` names
//! it with its detail until it clears.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;

use crate::runtime::metrics as m;

// States of a dependency; 0 (the default) means not yet known.
const UP: u8 = 1;
const DOWN: u8 = 2;

/// A dependency whose reachability is tracked.
#[derive(Debug, Clone, Copy)]
pub enum Dependency {
    Redis,
    Sink,
}

impl Dependency {
    fn name(self) -> &'static str {
        match self {
            Dependency::Redis => "redis",
            Dependency::Sink => "sink",
        }
    }
}

/// Something that answers but refuses what the worker needs; it lasts until an operator (or time)
/// fixes it, and the worker is not ready meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Redis is at `maxmemory` and cannot evict: writes that need memory (dead letters, group
    /// creation) are refused, while reads and acknowledgements go on.
    RedisOutOfMemory,
    /// Dead letters cannot be written (e.g. the `:dlq` key holds another type); the entries
    /// concerned stay pending until they can be.
    DeadLetters,
    /// The consumer group is missing on a stream and could not be created yet.
    GroupMissing,
    /// The sink answers but refuses the worker's statements (a missing privilege or table).
    SinkMisconfigured,
    /// Another live process consumes the same streams under the same group and consumer name.
    ConsumerNameInUse,
    /// Redis's `maxmemory-policy` was changed to one that evicts keys while the worker runs (it
    /// refuses to start on one unless `FLEET_REDIS_ALLOW_EVICTION`).
    RedisMayEvict,
    /// Entries of a stream were deleted (a producer's `MAXLEN`, an `XTRIM`) before the group read
    /// them: lost to it. Cleared once the group has read past the cut.
    EntriesCut,
}

impl Fault {
    const ALL: [Fault; 7] = [
        Fault::RedisOutOfMemory,
        Fault::DeadLetters,
        Fault::GroupMissing,
        Fault::SinkMisconfigured,
        Fault::ConsumerNameInUse,
        Fault::RedisMayEvict,
        Fault::EntriesCut,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::RedisOutOfMemory => "redis_out_of_memory",
            Fault::DeadLetters => "dead_letters_blocked",
            Fault::GroupMissing => "group_missing",
            Fault::SinkMisconfigured => "sink_misconfigured",
            Fault::ConsumerNameInUse => "consumer_name_in_use",
            Fault::RedisMayEvict => "redis_may_evict",
            Fault::EntriesCut => "entries_cut_unread",
        }
    }

    fn bit(self) -> u8 {
        1 << Fault::ALL.iter().position(|f| *f == self).unwrap_or(0)
    }
}

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Health {
    redis: AtomicU8,
    sink: AtomicU8,
    draining: AtomicBool,
    /// One bit per fault raised, so the hot path checks a single atomic.
    faults: AtomicU8,
    /// The detail of each fault raised, by position in `Fault::ALL`.
    details: Mutex<[Option<String>; 7]>,
}

impl Health {
    fn state(&self, dep: Dependency) -> &AtomicU8 {
        match dep {
            Dependency::Redis => &self.redis,
            Dependency::Sink => &self.sink,
        }
    }

    /// Records that `dep` answered; logs the transition, and counts a reconnect after an outage.
    pub fn up(&self, dep: Dependency) {
        match self.state(dep).swap(UP, Ordering::Relaxed) {
            UP => {}
            DOWN => {
                tracing::info!(dependency = dep.name(), "reachable again");
                metrics::counter!(m::RECONNECTS, "target" => dep.name()).increment(1);
            }
            _ => tracing::info!(dependency = dep.name(), "reachable"),
        }
    }

    /// Records a failure talking to `dep`; logs only on the transition to down.
    pub fn down(&self, dep: Dependency, error: &dyn std::fmt::Display) {
        if self.state(dep).swap(DOWN, Ordering::Relaxed) != DOWN {
            tracing::warn!(dependency = dep.name(), %error, "unreachable: retrying with backoff");
        } else {
            tracing::debug!(dependency = dep.name(), %error, "still unreachable");
        }
    }

    /// Whether `dep` answered last time.
    pub fn is_up(&self, dep: Dependency) -> bool {
        self.state(dep).load(Ordering::Relaxed) == UP
    }

    /// Raises `fault` with what an operator needs to know; logs an error when it is new (or its
    /// detail changed), a debug line otherwise.
    pub fn raise(&self, fault: Fault, detail: &dyn std::fmt::Display) {
        let detail = detail.to_string();
        let index = Fault::ALL.iter().position(|f| *f == fault).unwrap_or(0);
        let mut details = self.details.lock().expect("health lock");
        if details[index].as_deref() == Some(detail.as_str()) {
            tracing::debug!(fault = fault.name(), %detail, "still failing");
            return;
        }
        tracing::error!(fault = fault.name(), %detail, "not ready");
        details[index] = Some(detail);
        self.faults.fetch_or(fault.bit(), Ordering::Relaxed);
    }

    /// Clears `fault` if it was raised, logging the recovery once.
    pub fn clear(&self, fault: Fault) {
        if self.faults.load(Ordering::Relaxed) & fault.bit() == 0 {
            return;
        }
        let index = Fault::ALL.iter().position(|f| *f == fault).unwrap_or(0);
        let mut details = self.details.lock().expect("health lock");
        if details[index].take().is_some() {
            tracing::info!(fault = fault.name(), "recovered");
        }
        self.faults.fetch_and(!fault.bit(), Ordering::Relaxed);
    }

    /// Whether `fault` is raised.
    pub fn has(&self, fault: Fault) -> bool {
        self.faults.load(Ordering::Relaxed) & fault.bit() != 0
    }

    /// Marks the worker as draining: no longer ready.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Redis answered last time, the sink answered last time, no fault is raised, and not
    /// draining.
    pub fn is_ready(&self) -> bool {
        self.is_up(Dependency::Redis)
            && self.is_up(Dependency::Sink)
            && self.faults.load(Ordering::Relaxed) == 0
            && !self.draining.load(Ordering::Relaxed)
    }

    /// Sets the `fleet_ready` and `fleet_fault` gauges from the state now.
    pub fn record(&self) {
        metrics::gauge!(m::READY).set(if self.is_ready() { 1.0 } else { 0.0 });
        for fault in Fault::ALL {
            metrics::gauge!(m::FAULT, "fault" => fault.name()).set(if self.has(fault) {
                1.0
            } else {
                0.0
            });
        }
    }

    /// A short text for `/readyz`: the state of each dependency, then one line per fault.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "redis={} sink={} draining={}\n",
            self.is_up(Dependency::Redis),
            self.is_up(Dependency::Sink),
            self.draining.load(Ordering::Relaxed)
        );
        let details = self.details.lock().expect("health lock");
        for (fault, detail) in Fault::ALL.iter().zip(details.iter()) {
            if let Some(detail) = detail {
                out.push_str(&format!("{}: {detail}\n", fault.name()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_both_answered_no_fault_and_not_draining() {
        let h = Health::default();
        assert!(!h.is_ready());
        h.up(Dependency::Redis);
        assert!(!h.is_ready(), "the sink has not answered yet");
        h.up(Dependency::Sink);
        assert!(h.is_ready());
        h.down(Dependency::Sink, &"gone");
        assert!(!h.is_ready());
        h.up(Dependency::Sink);
        h.raise(Fault::RedisOutOfMemory, &"Redis out of memory");
        assert!(!h.is_ready());
        assert!(h
            .describe()
            .contains("redis_out_of_memory: Redis out of memory"));
        h.clear(Fault::DeadLetters); // not raised: no effect
        assert!(h.has(Fault::RedisOutOfMemory));
        h.clear(Fault::RedisOutOfMemory);
        assert!(h.is_ready());
        assert!(!h.describe().contains("memory"));
        h.drain();
        assert!(!h.is_ready());
    }
}
