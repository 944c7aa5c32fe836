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
//! room fills it, reading pauses, and everything is delayed. An event whose own rule is `drop`
//! is checked against its `max_age_ms` again when it leaves the room.
//!
//! Rate limits spend budgets (`budget`): the group's, in Redis, asked once per part for all its
//! channels (and once per release for the events due), unless a rule keeps them per replica.
//!
//! Lossy decisions (drop, coalesce) never apply to events on strict routes: a user event is never
//! discarded to relieve pressure; over a rate limit it waits instead, and a coalescing rule lets
//! it through at once.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Duration;

use crate::runtime::conn::Conn;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::event::pattern::PatternTable;
use crate::pipeline::budget::{Budgets, Grants, Refusal};
use crate::pipeline::handler::Routed;
use crate::runtime::config::{Backpressure, OverLimit};
use crate::runtime::metrics as m;
use crate::source::entry::Entry;

/// Applies the `[[backpressure]]` rules, with the budgets of the rate-limited ones (a budget per
/// channel: a hot channel spends its own, never a quiet one's).
pub struct BackpressureStage {
    rules: PatternTable<Backpressure>,
    budgets: Budgets,
}

/// What admission decided for the events of a part.
#[derive(Debug, Default)]
pub(crate) struct Admission<'a> {
    /// For the handler now, in part order, with their indices into the part's entries.
    pub now: Vec<(usize, Routed<'a>)>,
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
    /// Whether it is dropped rather than kept waiting when that budget refuses it (`over_limit =
    /// "drop"`, waiting only because the budget could not be read).
    drop_over_limit: bool,
    /// The coalescing rule under which a newer event of its key replaces it while it waits.
    coalesce: Option<String>,
    /// Its own rule is `drop`: past this time it is shed instead of released.
    expires: Option<OffsetDateTime>,
    /// The drop rule, for the count.
    rule: Option<String>,
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
    /// Entries shed while waiting (replaced by a newer event of their key, or dropped when they
    /// left): to be acknowledged with no effect.
    shed: Vec<Entry>,
}

impl Clone for Room {
    /// Each lane has a room of its own: a clone starts empty.
    fn clone(&self) -> Self {
        Room::default()
    }
}

/// Queues due for release, with the budget units their heads ask for: (rule, channel, units).
pub(crate) struct Due {
    keys: Vec<String>,
    asks: Vec<(String, String, u32)>,
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

    /// The entries shed since last asked, to be acknowledged with no effect.
    pub fn take_shed(&mut self) -> Vec<Entry> {
        std::mem::take(&mut self.shed)
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
                self.shed.push(old);
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

    /// The queues whose first event is due at `now`, and what their release asks of the budgets:
    /// per queue, its leading due events that need no budget, then the run of due events after
    /// them that spend one rule's budget on one channel (a queue goes no further in one round:
    /// budget asked for events that then could not go, in key order, would be wasted).
    pub fn due(&mut self, now: Instant) -> Due {
        let mut due = Due {
            keys: Vec::new(),
            asks: Vec::new(),
        };
        let mut asks: HashMap<(&str, &str), u32> = HashMap::new();
        while let Some(Reverse((at, _))) = self.wakes.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, key))) = self.wakes.pop() else {
                break;
            };
            match self.queues.get_mut(&key) {
                Some(queue) if queue.wake == Some(at) => queue.wake = None,
                _ => continue,
            }
            due.keys.push(key);
        }
        for key in &due.keys {
            let queue = &self.queues[key];
            let mut run: Option<(&str, &str)> = None;
            for w in queue.waiting.iter().take_while(|w| w.not_before <= now) {
                match (&w.limit, run) {
                    (None, None) => continue,
                    (Some(rule), None) => run = Some((rule, &w.channel)),
                    (Some(rule), Some(r)) if r == (rule.as_str(), w.channel.as_str()) => {}
                    _ => break,
                }
                *asks.entry(run.expect("a run")).or_default() += 1;
            }
        }
        due.asks = asks
            .into_iter()
            .map(|((rule, channel), n)| (rule.to_owned(), channel.to_owned(), n))
            .collect();
        due
    }

    /// Takes the events of the `due` queues that may go at `now` with `grants`: per key in stream
    /// order, stopping at the first one not due yet, or refused its budget (it is then due again
    /// when the budget is expected back). Events of a `drop` rule past their age are shed.
    pub fn take(&mut self, now: Instant, due: Due, grants: &mut Grants) -> Vec<Entry> {
        let wall = OffsetDateTime::now_utc();
        let mut out = Vec::new();
        for key in due.keys {
            let Some(queue) = self.queues.get_mut(&key) else {
                continue;
            };
            let mut next = None;
            while let Some(head) = queue.waiting.front_mut() {
                if head.not_before > now {
                    next = Some(head.not_before);
                    break;
                }
                let mut shed = head.expires.is_some_and(|at| wall > at);
                if shed {
                    if let Some(rule) = &head.rule {
                        count(rule, "dropped");
                    }
                } else if let Some(rule) = &head.limit {
                    match grants.spend(rule, &head.channel) {
                        Ok(()) => head.limit = None,
                        Err(Refusal::Spent(_)) if head.drop_over_limit => {
                            count(rule, "dropped");
                            shed = true;
                        }
                        Err(refusal) => {
                            head.not_before = now + refusal.retry();
                            next = Some(head.not_before);
                            break;
                        }
                    }
                }
                let left = queue.waiting.pop_front().expect("a head");
                self.len -= 1;
                if shed {
                    self.shed.push(left.entry);
                } else {
                    out.push(left.entry);
                }
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

/// Counts a backpressure decision under its rule.
fn count(rule: &str, action: &'static str) {
    metrics::counter!(m::BACKPRESSURE_ACTIONS, "rule" => rule.to_owned(), "action" => action)
        .increment(1);
}

impl BackpressureStage {
    /// Builds the stage; the group's rate-limit budgets live under `budget_prefix`
    /// (`budget::key_prefix`) on the Redis `conn` reaches.
    pub fn new(
        rules: PatternTable<Backpressure>,
        budget_prefix: String,
        conn: Option<Conn>,
    ) -> Self {
        let budgets = Budgets::new(&rules, budget_prefix, conn);
        BackpressureStage { rules, budgets }
    }

    /// Whether the worker may run what its rate-limit budgets need: `Err` names what it may not.
    pub async fn check_grants(&self) -> Result<(), String> {
        match self.budgets.refused().await {
            Ok(refused) if refused.is_empty() => Ok(()),
            Ok(refused) => Err(format!(
                "FLEET_REDIS_URL: the user may not run {} (the rate limits' budgets need them; see deploy/redis/users.acl)",
                refused.join(", ")
            )),
            // Unreachable now: the budgets say so when they are asked.
            Err(_) => Ok(()),
        }
    }

    /// Whether any rule exists (the stage costs nothing otherwise).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Takes the waiting events of `room` due at `now`, spending their budgets (one round trip
    /// for the fleet's).
    pub async fn release(&self, room: &mut Room, now: Instant) -> Vec<Entry> {
        let due = room.due(now);
        if due.keys.is_empty() {
            return Vec::new();
        }
        let mut grants = if due.asks.is_empty() {
            Grants::default()
        } else {
            let asks: Vec<(&str, &str, u32)> = due
                .asks
                .iter()
                .map(|(rule, channel, n)| (rule.as_str(), channel.as_str(), *n))
                .collect();
            self.budgets.take(&asks).await
        };
        room.take(now, due, &mut grants)
    }

    /// Decides for each routed event (with its index in the part's `entries`): now, shed, or wait
    /// in `room`. Events of a key already waiting wait behind it. The part's rate-limited events
    /// ask their budgets in one round: one unit each, but for those already behind a waiting
    /// event of their key, which spend theirs when they reach the front.
    pub(crate) async fn admit<'a>(
        &self,
        events: Vec<(usize, Routed<'a>)>,
        entries: &[Entry],
        room: &mut Room,
    ) -> Admission<'a> {
        let mut out = Admission::default();
        if self.is_empty() && room.is_empty() {
            out.now = events;
            return out;
        }
        let now = Instant::now();
        let wall = OffsetDateTime::now_utc();
        let rules: Vec<_> = events
            .iter()
            .map(|(_, r)| self.rules.lookup(&r.event.channel))
            .collect();
        // Which events ask for a unit, and the round's asks.
        let mut asked = vec![false; events.len()];
        let mut asks: HashMap<(&str, &str), u32> = HashMap::new();
        for (i, ((_, r), rule)) in events.iter().zip(&rules).enumerate() {
            if let Some((pattern, Backpressure::RateLimit { over_limit, .. })) = rule {
                let over = if r.route.strict {
                    OverLimit::Block
                } else {
                    *over_limit
                };
                if over == OverLimit::Drop || !room.queues.contains_key(r.event.key()) {
                    asked[i] = true;
                    *asks
                        .entry((pattern.as_str(), &r.event.channel))
                        .or_default() += 1;
                }
            }
        }
        let mut grants = if asks.is_empty() {
            Grants::default()
        } else {
            let asks: Vec<(&str, &str, u32)> =
                asks.into_iter().map(|((r, c), n)| (r, c, n)).collect();
            self.budgets.take(&asks).await
        };
        for (((index, r), rule), asked) in events.into_iter().zip(rules).zip(asked) {
            let key = r.event.key();
            let channel = &*r.event.channel;
            let lossy = !r.route.strict;
            // The decision, allocating nothing for an event that goes now.
            let mut not_before = now;
            let (mut limit, mut coalesce): (Option<&str>, Option<&str>) = (None, None);
            let (mut drop_over_limit, mut expires) = (false, None);
            match rule {
                None | Some((_, Backpressure::Block)) => {}
                Some((pattern, Backpressure::Drop { max_age_ms })) => {
                    let max_age = Duration::from_millis(*max_age_ms);
                    if lossy && wall - r.event.time > max_age {
                        count(pattern.as_str(), "dropped");
                        out.shed += 1;
                        continue;
                    }
                    if lossy {
                        expires = Some(r.event.time + max_age);
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
                    if !asked {
                        // Behind a waiting event of its key: spends its unit at the front.
                        limit = Some(pattern.as_str());
                    } else {
                        match grants.spend(pattern.as_str(), channel) {
                            // Paid: now, or behind its key's waiting events.
                            Ok(()) => {}
                            Err(Refusal::Spent(_)) if over_limit == OverLimit::Drop => {
                                count(pattern.as_str(), "dropped");
                                out.shed += 1;
                                continue;
                            }
                            Err(refusal) => {
                                not_before = now + refusal.retry();
                                limit = Some(pattern.as_str());
                                drop_over_limit = over_limit == OverLimit::Drop;
                            }
                        }
                    }
                    if limit.is_some() && over_limit == OverLimit::Coalesce {
                        coalesce = limit;
                    }
                }
            }
            let behind = room.queues.contains_key(key);
            if !behind && coalesce.is_none() && limit.is_none() {
                out.now.push((index, r));
                continue;
            }
            let wait = Waiting {
                entry: entries[index].detached(),
                channel: channel.to_owned(),
                not_before,
                limit: limit.map(str::to_owned),
                drop_over_limit,
                coalesce: coalesce.map(str::to_owned),
                expires,
                rule: expires.and(rule.map(|(p, _)| p.as_str().to_owned())),
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
    use crate::stream::{EntryId, Fields};

    fn stage(rules: &str) -> (FileConfig, BackpressureStage) {
        let config = FileConfig::parse(
            &format!("[[route]]\npattern = \"flow.#\"\n[[route]]\npattern = \"user.#\"\nstrict = true\n{rules}"),
            "test",
        )
        .unwrap();
        let stage = BackpressureStage::new(config.backpressure.clone(), "t:".into(), None);
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
            "[[backpressure]]\npattern = \"flow.*\"\nmode = \"rate_limit\"\nscope = \"replica\"\nper_second = 1\nburst = 2\nover_limit = \"drop\"",
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
        let admitted = stage
            .admit(routed(&config, &entries, &events), &entries, &mut room)
            .await;
        let channels: Vec<&str> = admitted
            .now
            .iter()
            .map(|(_, r)| &*r.event.channel)
            .collect();
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
            out.extend(seqs(&stage.release(room, Instant::now()).await));
        }
        out
    }

    #[tokio::test]
    async fn block_defers_a_channel_over_its_budget_and_lets_the_others_through() {
        let (config, stage) = stage(
            "[[backpressure]]\npattern = \"flow.*\"\nmode = \"rate_limit\"\nscope = \"replica\"\nper_second = 10\nburst = 1\nover_limit = \"block\"",
        );
        let (entries, events) = events(&[
            ("flow.hot", None),
            ("flow.hot", None),
            ("flow.hot", None),
            ("flow.quiet", None),
        ]);
        let mut room = Room::default();
        let admitted = stage
            .admit(routed(&config, &entries, &events), &entries, &mut room)
            .await;
        let now: Vec<u64> = admitted.now.iter().map(|(_, r)| r.entry_id.seq).collect();
        assert_eq!(now, [0, 3], "the first hot event and the quiet one go now");
        assert_eq!(admitted.deferred, [1, 2]);
        assert_eq!(room.len(), 2);
        // Nothing is due before the budget is back (100 ms per event at 10/s).
        assert!(stage.release(&mut room, Instant::now()).await.is_empty());
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
        let admitted = stage
            .admit(routed(&config, &entries, &events), &entries, &mut room)
            .await;
        // user.1 is strict: never coalesced, never delayed.
        assert_eq!(admitted.now.len(), 1);
        assert_eq!(admitted.deferred, [0, 1, 2, 3]);
        assert_eq!(seqs(&room.take_shed()), [0, 2]);
        assert_eq!(room.len(), 2);
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(stage.release(&mut room, Instant::now()).await.is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        let mut out = seqs(&stage.release(&mut room, Instant::now()).await);
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
            "[[backpressure]]\npattern = \"flow.hot\"\nmode = \"rate_limit\"\nscope = \"replica\"\nper_second = 10\nburst = 1\nover_limit = \"block\"",
        );
        let (entries, events) = events(&[
            ("flow.hot", Some("k")),
            ("flow.hot", Some("k")),
            ("flow.other", Some("k")),
            ("flow.other", None),
        ]);
        let mut room = Room::default();
        let admitted = stage
            .admit(routed(&config, &entries, &events), &entries, &mut room)
            .await;
        let now: Vec<u64> = admitted.now.iter().map(|(_, r)| r.entry_id.seq).collect();
        assert_eq!(now, [0, 3]);
        assert_eq!(admitted.deferred, [1, 2]);
        let released = release_within(&mut room, &stage, Duration::from_secs(2)).await;
        assert_eq!(released, [1, 2]);
    }

    #[tokio::test]
    async fn over_limit_coalesce_sends_the_newest_state_at_the_limited_rate() {
        let (config, stage) = stage(
            "[[backpressure]]\npattern = \"flow.*\"\nmode = \"rate_limit\"\nscope = \"replica\"\nper_second = 10\nburst = 1\nover_limit = \"coalesce\"",
        );
        let (entries, events) = events(&[
            ("flow.a", None),
            ("flow.a", None),
            ("flow.a", None),
            ("flow.a", None),
        ]);
        let mut room = Room::default();
        let admitted = stage
            .admit(routed(&config, &entries, &events), &entries, &mut room)
            .await;
        assert_eq!(admitted.now.len(), 1);
        assert_eq!(seqs(&room.take_shed()), [1, 2]);
        let released = release_within(&mut room, &stage, Duration::from_secs(2)).await;
        assert_eq!(released, [3]);
    }

    #[tokio::test]
    async fn an_event_of_a_drop_rule_waiting_behind_its_key_is_shed_once_past_its_age() {
        let (config, stage) = stage(
            "[[backpressure]]\npattern = \"flow.hot\"\nmode = \"rate_limit\"\nscope = \"replica\"\nper_second = 5\nburst = 1\nover_limit = \"block\"\n[[backpressure]]\npattern = \"flow.fresh\"\nmode = \"drop\"\nmax_age_ms = 100",
        );
        let (entries, events) = events(&[
            ("flow.hot", Some("k")),
            ("flow.hot", Some("k")),
            ("flow.fresh", Some("k")),
        ]);
        let mut room = Room::default();
        let admitted = stage
            .admit(routed(&config, &entries, &events), &entries, &mut room)
            .await;
        assert_eq!(admitted.now.len(), 1);
        assert_eq!(
            admitted.deferred,
            [1, 2],
            "fresh enough to wait behind its key"
        );
        // The second hot event waits 200 ms for its budget: by then the third is too old.
        let released = release_within(&mut room, &stage, Duration::from_secs(2)).await;
        assert_eq!(released, [1]);
        assert_eq!(seqs(&room.take_shed()), [2], "dropped as it left the room");
    }
}
