//! Liveness and readiness state, updated by the pipeline as it talks to Redis and the sink.
//! Transitions are logged once each (not once per retry), and recoveries counted as reconnects.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use crate::metrics as m;

// States of a dependency; 0 (the default) means not yet known.
const UP: u8 = 1;
const DOWN: u8 = 2;

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Health {
    redis: AtomicU8,
    sink: AtomicU8,
    draining: AtomicBool,
}

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

    /// Marks the worker as draining: no longer ready.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    fn is_up(&self, dep: Dependency) -> bool {
        self.state(dep).load(Ordering::Relaxed) == UP
    }

    /// Redis answered last time, the sink answered last time, and not draining.
    pub fn is_ready(&self) -> bool {
        self.is_up(Dependency::Redis)
            && self.is_up(Dependency::Sink)
            && !self.draining.load(Ordering::Relaxed)
    }

    /// A short text for `/readyz`.
    pub fn describe(&self) -> String {
        format!(
            "redis={} sink={} draining={}\n",
            self.is_up(Dependency::Redis),
            self.is_up(Dependency::Sink),
            self.draining.load(Ordering::Relaxed)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_both_answered_and_not_draining() {
        let h = Health::default();
        assert!(!h.is_ready());
        h.up(Dependency::Redis);
        assert!(!h.is_ready(), "the sink has not answered yet");
        h.up(Dependency::Sink);
        assert!(h.is_ready());
        h.down(Dependency::Sink, &"gone");
        assert!(!h.is_ready());
        h.up(Dependency::Sink);
        h.drain();
        assert!(!h.is_ready());
    }
}
