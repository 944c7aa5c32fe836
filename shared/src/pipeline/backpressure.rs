//! The backpressure stage: per-channel rules (drop, coalesce, rate limit) decide, for each event
//! of a part, whether it reaches the handler now, is shed (acknowledged with no effect), or
//! waits, so that a hot channel cannot flood a sink nor hold up a quiet one.
//!
//! Waiting happens in each lane's [`Room`], never by stalling the lane: an event over its
//! channel's rate limit (`over_limit = "block"` or `"coalesce"`) or inside a coalescing window
//! stays unacknowledged in the room, kept alive in the pending list, while the lane goes on with
//! the other channels; it is released in a later part of its own once its time comes. Events of
//! a key with an event waiting wait behind it, whatever their channel: order per key holds (a
//! lane has every event of its keys). Waiting entries count towards `max_in_flight`: when the
//! room fills it, reading pauses, and everything is delayed.
//!
//! Lossy decisions (drop, coalesce) never apply to events on strict routes: a user event is never
//! discarded to relieve pressure; over a rate limit it waits instead, and a coalescing rule lets
//! it through at once.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::event::pattern::PatternTable;
use crate::pipeline::handler::Routed;
use crate::runtime::config::{Backpressure, OverLimit};
use crate::runtime::metrics as m;
use crate::source::entry::Entry;

/// Applies the `[[backpressure]]` rules; holds one rate limiter per rate-limited rule, with a
/// budget per channel: a hot channel spends its own, never a quiet one's.
pub struct BackpressureStage {
    rules: PatternTable<Backpressure>,
    limiters: HashMap<String, DefaultKeyedRateLimiter<String>>,
}

/// Channels a limiter remembers before it forgets those whose budget is full again (their state
/// is then the same as a new channel's): memory bounded by the channels recently busy.
const CHANNELS_KEPT: usize = 10_000;

/// What admission decided for the events of a part.
#[derive(Debug, Default)]
pub(crate) struct Admission<'a> {
    /// For the handler now, in part order.
    pub now: Vec<Routed<'a>>,
    /// Acknowledged with no effect (dropped, or replaced by a newer event of their key).
    pub shed: usize,
    /// Indices (into the part's entries) of the events that wait in the room.
    pub deferred: Vec<usize>,
}

/// One event waiting in a room.
#[derive(Debug)]
struct Waiting {
    /// Its own copy (not its read's reply buffer).
    entry: Entry,
    channel: String,
    /// Not released before (the end of its coalescing window, or when its channel's budget is
    /// expected back).
    not_before: Instant,
    /// The rate-limited rule whose budget it still has to spend when released.
    limit: Option<String>,
    /// The coalescing rule under which a newer event of its key replaces it while it waits.
    coalesce: Option<String>,
}

/// The events of one ordering key waiting, in stream order, and when the first is due.
#[derive(Debug, Default)]
struct Queue {
    waiting: VecDeque<Waiting>,
    wake: Option<Instant>,
}

/// A lane's waiting room: the events that wait for their channel, per ordering key, with the
/// times they are due. Bounded by `max_in_flight` (the reader waits while it is full).
#[derive(Debug, Default)]
pub(crate) struct Room {
    queues: HashMap<String, Queue>,
    /// When each queue's first event is due (entries whose time no longer matches their queue's
    /// `wake` are stale and skipped).
    wakes: BinaryHeap<Reverse<(Instant, String)>>,
    len: usize,
    /// Entries replaced by a newer event of their key: to be acknowledged as coalesced.
    superseded: Vec<Entry>,
}

impl Clone for Room {
    /// Each lane has a room of its own: a clone starts empty.
    fn clone(&self) -> Self {
        Room::default()
    }
}

impl Room {
    /// Events waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// When the next event may be due.
    pub fn next_wake(&self) -> Option<Instant> {
        self.wakes.peek().map(|Reverse((at, _))| *at)
    }

    /// The entries replaced since last asked, to be acknowledged as coalesced.
    pub fn take_superseded(&mut self) -> Vec<Entry> {
        std::mem::take(&mut self.superseded)
    }

    /// Every entry waiting (the drain leaves them pending).
    pub fn clear(&mut self) -> Vec<Entry> {
        self.wakes.clear();
        self.len = 0;
        self.queues
            .drain()
            .flat_map(|(_, q)| q.waiting.into_iter().map(|w| w.entry))
            .collect()
    }

    fn schedule(&mut self, key: &str, at: Instant) {
        let queue = self.queues.get_mut(key).expect("a queue to schedule");
        if queue.wake != Some(at) {
            queue.wake = Some(at);
            self.wakes.push(Reverse((at, key.to_owned())));
        }
    }

    /// Puts an event behind its key's waiting ones. A coalescing event replaces the last one
    /// waiting if that one coalesces under the same rule (it keeps its place and time): returns
    /// true then.
    fn enqueue(&mut self, key: &str, w: Waiting) -> bool {
        let queue = self.queues.entry(key.to_owned()).or_default();
        if let (Some(rule), Some(last)) = (&w.coalesce, queue.waiting.back_mut()) {
            if last.coalesce.as_ref() == Some(rule) {
                let old = std::mem::replace(&mut last.entry, w.entry);
                last.channel = w.channel;
                self.superseded.push(old);
                return true;
            }
        }
        let first = queue.waiting.is_empty();
        let at = w.not_before;
        queue.waiting.push_back(w);
        self.len += 1;
        if first {
            self.schedule(key, at);
        }
        false
    }

    /// Takes the events due at `now`, spending their channels' budgets: per key in stream order,
    /// stopping at the first one not due yet.
    pub fn release(&mut self, now: Instant, stage: &BackpressureStage) -> Vec<Entry> {
        let mut out = Vec::new();
        while let Some(Reverse((at, _))) = self.wakes.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, key))) = self.wakes.pop() else {
                break;
            };
            let Some(queue) = self.queues.get_mut(&key) else {
                continue;
            };
            if queue.wake != Some(at) {
                continue;
            }
            queue.wake = None;
            let mut next = None;
            while let Some(head) = queue.waiting.front_mut() {
                if head.not_before > now {
                    next = Some(head.not_before);
                    break;
                }
                if let Some(rule) = &head.limit {
                    if let Err(wait) = stage.spend(rule, &head.channel, true) {
                        head.not_before = now + wait;
                        next = Some(head.not_before);
                        break;
                    }
                    head.limit = None;
                }
                let released = queue.waiting.pop_front().expect("a head");
                out.push(released.entry);
                self.len -= 1;
            }
            match next {
                Some(at) => self.schedule(&key, at),
                None => {
                    self.queues.remove(&key);
                }
            }
        }
        out
    }
}

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

    /// Spends one unit of `channel`'s budget under `rule`, or says how long until one is back
    /// (`wait`: only asked when the event will wait; a dropped one needs no time).
    fn spend(&self, rule: &str, channel: &str, wait: bool) -> Result<(), Duration> {
        let Some(limiter) = self.limiters.get(rule) else {
            return Ok(());
        };
        // A String key per check: governor's keyed state owns its keys. The limiter's own clock
        // tells the time: building one per refusal (it calibrates) cost ~25 µs per event here.
        limiter.check_key(&channel.to_owned()).map_err(|not_until| {
            if wait {
                not_until.wait_time_from(limiter.clock().now())
            } else {
                Duration::ZERO
            }
        })
    }

    /// Decides for each routed event (with its index in the part's `entries`): now, shed, or wait
    /// in `room`. Events of a key already waiting wait behind it.
    pub(crate) fn admit<'a>(
        &self,
        events: Vec<(usize, Routed<'a>)>,
        entries: &[Entry],
        room: &mut Room,
    ) -> Admission<'a> {
        let mut out = Admission::default();
        if self.is_empty() && room.is_empty() {
            out.now = events.into_iter().map(|(_, r)| r).collect();
            return out;
        }
        let now = Instant::now();
        let wall = OffsetDateTime::now_utc();
        let count = |pattern: &str, action: &'static str| {
            metrics::counter!(m::BACKPRESSURE_ACTIONS, "rule" => pattern.to_owned(), "action" => action).increment(1);
        };
        for (index, r) in events {
            let key = r.event.key();
            let channel = &*r.event.channel;
            let lossy = !r.route.strict;
            let rule = self.rules.lookup(channel);
            let behind = room.queues.contains_key(key);
            // The decision, allocating nothing for an event that goes now.
            let mut not_before = now;
            let (mut limit, mut coalesce): (Option<&str>, Option<&str>) = (None, None);
            match rule {
                None | Some((_, Backpressure::Block)) => {}
                Some((pattern, Backpressure::Drop { max_age_ms })) => {
                    if lossy && wall - r.event.time > Duration::from_millis(*max_age_ms) {
                        count(pattern.as_str(), "dropped");
                        out.shed += 1;
                        continue;
                    }
                }
                Some((pattern, Backpressure::Coalesce { window_ms })) => {
                    if lossy {
                        not_before = now + Duration::from_millis(*window_ms);
                        coalesce = Some(pattern.as_str());
                    }
                }
                Some((pattern, Backpressure::RateLimit { over_limit, .. })) => {
                    let over_limit = if lossy { *over_limit } else { OverLimit::Block };
                    if behind && over_limit != OverLimit::Drop {
                        // Its budget is spent when it reaches the front.
                        limit = Some(pattern.as_str());
                    } else if let Err(until) =
                        self.spend(pattern.as_str(), channel, over_limit != OverLimit::Drop)
                    {
                        if over_limit == OverLimit::Drop {
                            count(pattern.as_str(), "dropped");
                            out.shed += 1;
                            continue;
                        }
                        not_before = now + until;
                        limit = Some(pattern.as_str());
                    }
                    if limit.is_some() && over_limit == OverLimit::Coalesce {
                        coalesce = limit;
                    }
                }
            }
            if !behind && coalesce.is_none() && limit.is_none() {
                out.now.push(r);
                continue;
            }
            let wait = Waiting {
                entry: entries[index].detached(),
                channel: channel.to_owned(),
                not_before,
                limit: limit.map(str::to_owned),
                coalesce: coalesce.map(str::to_owned),
            };
            if room.enqueue(key, wait) {
                if let Some((pattern, _)) = rule {
                    count(pattern.as_str(), "coalesced");
                }
            } else if let Some((pattern, Backpressure::RateLimit { .. })) = rule {
                count(pattern.as_str(), "delayed");
            }
            out.deferred.push(index);
        }
        for limiter in self.limiters.values() {
            if limiter.len() > CHANNELS_KEPT {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;
    use std::sync::Arc;

    use crate::event::Event;
    use crate::runtime::config::FileConfig;
    use crate::source::entry::{EntryId, Fields};

    fn stage(rules: &str) -> (FileConfig, BackpressureStage) {
        let config = FileConfig::parse(
            &format!("[[route]]\npattern = \"flow.#\"\n[[route]]\npattern = \"user.#\"\nstrict = true\n{rules}"),
            "test",
        )
        .unwrap();
        let stage = BackpressureStage::new(config.backpressure.clone());
        (config, stage)
    }

    /// One event per (channel, key) given, as entries and decoded events.
    fn events(specs: &[(&'static str, Option<&'static str>)]) -> (Vec<Entry>, Vec<Event<'static>>) {
        let stream: Arc<str> = "s".into();
        let mut entries = Vec::new();
        let mut events = Vec::new();
        for (i, (channel, key)) in specs.iter().enumerate() {
            entries.push(Entry {
                stream: stream.clone(),
                id: EntryId {
                    ms: 1,
                    seq: i as u64,
                },
                fields: Some([("channel", *channel)].into_iter().collect::<Fields>()),
                deliveries: 1,
            });
            events.push(Event {
                id: uuid::Uuid::now_v7(),
                event_type: Cow::Borrowed("flow.progress"),
                channel: Cow::Borrowed(channel),
                source: Cow::Borrowed("tests"),
                time: OffsetDateTime::now_utc(),
                data: Cow::Borrowed("{}"),
                key: key.map(Cow::Borrowed),
                correlation_id: None,
            });
        }
        (entries, events)
    }

    fn routed<'a>(
        config: &'a FileConfig,
        entries: &'a [Entry],
        events: &'a [Event<'static>],
    ) -> Vec<(usize, Routed<'a>)> {
        events
            .iter()
            .enumerate()
            .map(|(i, event)| {
                let (_, route) = config.routes.lookup(&event.channel).unwrap();
                (
                    i,
                    Routed {
                        event,
                        route,
                        stream: &entries[i].stream,
                        entry_id: entries[i].id,
                    },
                )
            })
            .collect()
    }

    fn seqs(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.id.seq).collect()
    }

    #[tokio::test]
    async fn a_rate_limit_is_a_budget_per_channel() {
        let (config, stage) = stage(
            "[[backpressure]]\npattern = \"flow.*\"\nmode = \"rate_limit\"\nper_second = 1\nburst = 2\nover_limit = \"drop\"",
        );
        let (entries, events) = events(&[
            ("flow.hot", None),
            ("flow.hot", None),
            ("flow.hot", None),
            ("flow.hot", None),
            ("flow.hot", None),
            ("flow.quiet", None),
            ("flow.quiet", None),
        ]);
        let mut room = Room::default();
        let admitted = stage.admit(routed(&config, &entries, &events), &entries, &mut room);
        let channels: Vec<&str> = admitted.now.iter().map(|r| &*r.event.channel).collect();
        // The hot channel spent its burst of 2; the quiet one still has its own.
        assert_eq!(
            channels,
            ["flow.hot", "flow.hot", "flow.quiet", "flow.quiet"]
        );
        assert_eq!(admitted.shed, 3);
        assert!(room.is_empty() && admitted.deferred.is_empty());
    }

    /// Rate limiters keep their own (real) clock: these tests wait for real.
    async fn release_within(
        room: &mut Room,
        stage: &BackpressureStage,
        limit: Duration,
    ) -> Vec<u64> {
        let started = Instant::now();
        let mut out = Vec::new();
        while !room.is_empty() && started.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(5)).await;
            out.extend(seqs(&room.release(Instant::now(), stage)));
        }
        out
    }

    #[tokio::test]
    async fn block_defers_a_channel_over_its_budget_and_lets_the_others_through() {
        let (config, stage) = stage(
            "[[backpressure]]\npattern = \"flow.*\"\nmode = \"rate_limit\"\nper_second = 10\nburst = 1\nover_limit = \"block\"",
        );
        let (entries, events) = events(&[
            ("flow.hot", None),
            ("flow.hot", None),
            ("flow.hot", None),
            ("flow.quiet", None),
        ]);
        let mut room = Room::default();
        let admitted = stage.admit(routed(&config, &entries, &events), &entries, &mut room);
        let now: Vec<u64> = admitted.now.iter().map(|r| r.entry_id.seq).collect();
        assert_eq!(now, [0, 3], "the first hot event and the quiet one go now");
        assert_eq!(admitted.deferred, [1, 2]);
        assert_eq!(room.len(), 2);
        // Nothing is due before the budget is back (100 ms per event at 10/s).
        assert!(room.release(Instant::now(), &stage).is_empty());
        let started = Instant::now();
        let released = release_within(&mut room, &stage, Duration::from_secs(2)).await;
        assert_eq!(released, [1, 2], "released in stream order, none lost");
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "at the channel's rate: {:?}",
            started.elapsed()
        );
        assert!(room.next_wake().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_coalescing_window_keeps_the_newest_event_per_key_until_its_end() {
        let (config, stage) =
            stage("[[backpressure]]\npattern = \"flow.*\"\nmode = \"coalesce\"\nwindow_ms = 100");
        let (entries, events) = events(&[
            ("flow.a", None),
            ("flow.b", None),
            ("flow.a", None),
            ("flow.a", None),
            ("user.1", None),
        ]);
        let mut room = Room::default();
        let admitted = stage.admit(routed(&config, &entries, &events), &entries, &mut room);
        // user.1 is strict: never coalesced, never delayed.
        assert_eq!(admitted.now.len(), 1);
        assert_eq!(admitted.deferred, [0, 1, 2, 3]);
        assert_eq!(seqs(&room.take_superseded()), [0, 2]);
        assert_eq!(room.len(), 2);
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(room.release(Instant::now(), &stage).is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        let mut out = seqs(&room.release(Instant::now(), &stage));
        out.sort();
        assert_eq!(
            out,
            [1, 3],
            "the newest of each key, at the end of the window"
        );
        assert!(room.is_empty());
    }

    #[tokio::test]
    async fn events_of_a_waiting_key_wait_behind_it_whatever_their_channel() {
        let (config, stage) = stage(
            "[[backpressure]]\npattern = \"flow.hot\"\nmode = \"rate_limit\"\nper_second = 10\nburst = 1\nover_limit = \"block\"",
        );
        let (entries, events) = events(&[
            ("flow.hot", Some("k")),
            ("flow.hot", Some("k")),
            ("flow.other", Some("k")),
            ("flow.other", None),
        ]);
        let mut room = Room::default();
        let admitted = stage.admit(routed(&config, &entries, &events), &entries, &mut room);
        let now: Vec<u64> = admitted.now.iter().map(|r| r.entry_id.seq).collect();
        assert_eq!(now, [0, 3]);
        assert_eq!(admitted.deferred, [1, 2]);
        let released = release_within(&mut room, &stage, Duration::from_secs(2)).await;
        assert_eq!(released, [1, 2]);
    }

    #[tokio::test]
    async fn over_limit_coalesce_sends_the_newest_state_at_the_limited_rate() {
        let (config, stage) = stage(
            "[[backpressure]]\npattern = \"flow.*\"\nmode = \"rate_limit\"\nper_second = 10\nburst = 1\nover_limit = \"coalesce\"",
        );
        let (entries, events) = events(&[
            ("flow.a", None),
            ("flow.a", None),
            ("flow.a", None),
            ("flow.a", None),
        ]);
        let mut room = Room::default();
        let admitted = stage.admit(routed(&config, &entries, &events), &entries, &mut room);
        assert_eq!(admitted.now.len(), 1);
        assert_eq!(seqs(&room.take_superseded()), [1, 2]);
        let released = release_within(&mut room, &stage, Duration::from_secs(2)).await;
        assert_eq!(released, [3]);
    }
}
