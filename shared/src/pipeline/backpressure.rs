//! The backpressure stage: per-channel rules (block, drop, coalesce, rate limit) applied to a
//! batch before the handler sees it, so a hot channel cannot flood a sink.
//!
//! Memory stays bounded because the reader never runs ahead of the handler: "block" simply means
//! the next read waits. Lossy decisions (drop, coalesce, rate limit with `over_limit = "drop"`)
//! never apply to events on strict routes: a user event is never discarded to relieve pressure;
//! such events are delayed instead.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use time::OffsetDateTime;

use crate::event::pattern::PatternTable;
use crate::pipeline::handler::Routed;
use crate::runtime::config::{Backpressure, OverLimit};
use crate::runtime::metrics as m;

/// Applies the `[[backpressure]]` rules; holds one rate limiter per rate-limited rule, with a
/// budget per channel: a hot channel spends its own, never a quiet one's.
pub struct BackpressureStage {
    rules: PatternTable<Backpressure>,
    limiters: HashMap<String, DefaultKeyedRateLimiter<String>>,
}

/// Channels a limiter remembers before it forgets those whose budget is full again (their state
/// is then the same as a new channel's): memory bounded by the channels recently busy.
const CHANNELS_KEPT: usize = 10_000;

impl BackpressureStage {
    /// Builds the stage and its limiters.
    pub fn new(rules: PatternTable<Backpressure>) -> Self {
        let mut limiters = HashMap::new();
        for (pattern, rule) in rules.iter() {
            if let Backpressure::RateLimit {
                per_second, burst, ..
            } = rule
            {
                let quota =
                    Quota::per_second(NonZeroU32::new(*per_second).unwrap_or(NonZeroU32::MIN))
                        .allow_burst(NonZeroU32::new(*burst).unwrap_or(NonZeroU32::MIN));
                limiters.insert(pattern.as_str().to_owned(), RateLimiter::keyed(quota));
            }
        }
        BackpressureStage { rules, limiters }
    }

    /// Whether any rule exists (the stage costs nothing otherwise).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Keeps the events that should reach the handler, waiting where a rule says block.
    /// Returns the kept events and how many were skipped.
    pub async fn admit<'a>(&self, events: Vec<Routed<'a>>) -> (Vec<Routed<'a>>, usize) {
        if self.is_empty() {
            return (events, 0);
        }
        let now = OffsetDateTime::now_utc();
        // Coalescing keeps the newest event per key among those read together.
        let mut newest: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, r) in events.iter().enumerate() {
            if let Some((p, Backpressure::Coalesce { .. })) = self.rules.lookup(&r.event.channel) {
                if !r.route.strict {
                    newest.insert((p.as_str(), r.event.key()), i);
                }
            }
        }
        let mut kept = Vec::with_capacity(events.len());
        let mut skipped = 0;
        for (i, r) in events.into_iter().enumerate() {
            let Some((pattern, rule)) = self.rules.lookup(&r.event.channel) else {
                kept.push(r);
                continue;
            };
            let lossy_ok = !r.route.strict;
            let action = match rule {
                Backpressure::Block => None,
                Backpressure::Drop { max_age_ms } => {
                    let age = now - r.event.time;
                    (lossy_ok && age > Duration::from_millis(*max_age_ms)).then_some("dropped")
                }
                Backpressure::Coalesce { .. } => {
                    let latest = newest.get(&(pattern.as_str(), r.event.key())) == Some(&i);
                    (lossy_ok && !latest).then_some("coalesced")
                }
                Backpressure::RateLimit { over_limit, .. } => {
                    let limiter = &self.limiters[pattern.as_str()];
                    let channel = r.event.channel.to_string();
                    if limiter.check_key(&channel).is_ok() {
                        None
                    } else if *over_limit == OverLimit::Drop && lossy_ok {
                        Some("dropped")
                    } else {
                        limiter.until_key_ready(&channel).await;
                        metrics::counter!(m::BACKPRESSURE_ACTIONS, "rule" => pattern.as_str().to_owned(), "action" => "delayed").increment(1);
                        None
                    }
                }
            };
            match action {
                Some(action) => {
                    metrics::counter!(m::BACKPRESSURE_ACTIONS, "rule" => pattern.as_str().to_owned(), "action" => action).increment(1);
                    skipped += 1;
                }
                None => kept.push(r),
            }
        }
        for limiter in self.limiters.values() {
            if limiter.len() > CHANNELS_KEPT {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
        (kept, skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;
    use std::sync::Arc;

    use crate::event::Event;
    use crate::runtime::config::FileConfig;

    #[tokio::test]
    async fn a_rate_limit_is_a_budget_per_channel() {
        let config = FileConfig::parse(
            "[[route]]\npattern = \"flow.#\"\n[[backpressure]]\npattern = \"flow.*\"\nmode = \"rate_limit\"\nper_second = 1\nburst = 2\nover_limit = \"drop\"",
            "test",
        )
        .unwrap();
        let stage = BackpressureStage::new(config.backpressure.clone());
        let (_, route) = config.routes.lookup("flow.a").unwrap();
        let stream: Arc<str> = "s".into();
        let events: Vec<Event<'static>> = ["flow.hot"; 5]
            .into_iter()
            .chain(["flow.quiet"; 2])
            .map(|channel| Event {
                id: uuid::Uuid::now_v7(),
                event_type: Cow::Borrowed("flow.progress"),
                channel: Cow::Borrowed(channel),
                source: Cow::Borrowed("tests"),
                time: OffsetDateTime::now_utc(),
                data: Cow::Borrowed("{}"),
                key: None,
                correlation_id: None,
            })
            .collect();
        let routed = events
            .iter()
            .enumerate()
            .map(|(i, event)| Routed {
                event,
                route,
                stream: &stream,
                entry_id: crate::source::entry::EntryId {
                    ms: 1,
                    seq: i as u64,
                },
            })
            .collect();
        let (kept, dropped) = stage.admit(routed).await;
        let channels: Vec<&str> = kept.iter().map(|r| &*r.event.channel).collect();
        // The hot channel spent its burst of 2; the quiet one still has its own.
        assert_eq!(
            channels,
            ["flow.hot", "flow.hot", "flow.quiet", "flow.quiet"]
        );
        assert_eq!(dropped, 3);
    }
}
