//! Liveness and readiness state, updated by the pipeline as it talks to Redis and the sink.
//! Transitions are logged once each (not once per retry) and counted as reconnects.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::metrics as m;

/// What `/readyz` reports.
#[derive(Debug)]
pub struct Health {
    redis: AtomicBool,
    sink: AtomicBool,
    draining: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            redis: AtomicBool::new(false),
            sink: AtomicBool::new(true),
            draining: AtomicBool::new(false),
        }
    }
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
    fn flag(&self, dep: Dependency) -> &AtomicBool {
        match dep {
            Dependency::Redis => &self.redis,
            Dependency::Sink => &self.sink,
        }
    }

    /// Records that `dep` answered; logs and counts a reconnect if it was down.
    pub fn up(&self, dep: Dependency) {
        if !self.flag(dep).swap(true, Ordering::Relaxed) {
            tracing::info!(dependency = dep.name(), "reachable");
            metrics::counter!(m::RECONNECTS, "target" => dep.name()).increment(1);
        }
    }

    /// Records a failure talking to `dep`; logs only on the transition to down.
    pub fn down(&self, dep: Dependency, error: &dyn std::fmt::Display) {
        if self.flag(dep).swap(false, Ordering::Relaxed) {
            tracing::warn!(dependency = dep.name(), %error, "unreachable: retrying with backoff");
        } else {
            tracing::debug!(dependency = dep.name(), %error, "still unreachable");
        }
    }

    /// Marks the worker as draining: no longer ready.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Redis reachable, the sink reachable, and not draining.
    pub fn is_ready(&self) -> bool {
        self.redis.load(Ordering::Relaxed)
            && self.sink.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
    }

    /// A short text for `/readyz`.
    pub fn describe(&self) -> String {
        format!(
            "redis={} sink={} draining={}\n",
            self.redis.load(Ordering::Relaxed),
            self.sink.load(Ordering::Relaxed),
            self.draining.load(Ordering::Relaxed)
        )
    }
}
