//! Rate-limit budgets, per channel: how many of a channel's events may go now. A channel's limit
//! is what its subscribers see, whatever the number of replicas, so by default a rule's budgets
//! belong to the consumer group and live in Redis, shared by every replica: one theoretical
//! arrival time (GCRA) per rule and channel, asked for a whole batch in one script call. A rule
//! with `scope = "replica"` keeps its budgets in this process instead (governor), each replica
//! then allowing the full rate.
//!
//! A rule's budgets are one hash, a field per channel recently busy (a channel whose budget is
//! full again is forgotten), so Redis memory follows the channels, never the events. Its name
//! (`key_prefix`, then the rule's pattern) carries the hash tag the consumed streams share,
//! `{app}:rate:<group>:<pattern>`, so that it sits in their slot and under the ACL key pattern of
//! the deployment (`~{app}:*`); streams without one tag give `streamfleet:rate:{<group>}:…`.
//! Either way a batch's budgets are one slot: one call, on Redis Cluster too.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::LazyLock;
use std::time::Duration;

use crate::runtime::conn::Conn;
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use redis::Value;

use crate::event::pattern::PatternTable;
use crate::runtime::config::{Backpressure, LimitScope};
use crate::runtime::scripts::{query_loading, Lua};
use crate::stream::keys::hash_tag;

/// Channels a replica's limiter remembers before it forgets those whose budget is full again
/// (their state is then the same as a new channel's): memory bounded by the channels recently
/// busy.
const CHANNELS_KEPT: usize = 10_000;

/// How long events wait before asking again when the fleet's budgets cannot be read (Redis
/// unreachable): they are neither sent nor dropped meanwhile.
const UNKNOWN_RETRY: Duration = Duration::from_millis(250);

/// One script call grants a whole batch's asks: per rule and channel, as many units as are free
/// (up to what is asked), and the time until the next unit is back.
///
/// GCRA: `tat`, the theoretical arrival time of a channel's next unit, in microseconds of the
/// server's clock (`TIME`: one clock for every replica); at `now` with interval `T` and burst
/// `b`, `floor((now + b*T - max(tat, now)) / T)` units are free. A rule's channels are fields of
/// one hash, read with one HMGET and written with one HSET per call: a key per channel cost
/// redis-server a SET and, when it expired, a DEL, each propagated to the AOF (~5 µs of its CPU
/// per channel asked; docs/src/performance.md). A channel's field is useless once its bucket is full
/// again (`tat <= now`): each call sweeps on (HSCAN, from the cursor kept in the `#sweep` field,
/// which no channel can be named) over as many fields as it wrote (16 at least), and deletes those, so the hash
/// holds about the channels recently busy; the hash itself expires when every bucket is full. A
/// key holding another type fails the call (WRONGTYPE): the events wait, and the worker says so.
///
/// KEYS: per rule asked, its hash. ARGV: per rule, the interval (µs per unit), the burst, the
/// number n of its channels asked, then n pairs (channel, units asked). Returns per channel, in
/// the order asked: units granted, µs until the next unit is free (0 when all were granted).
static BUDGET_SCRIPT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"#!lua
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local SWEEP = '#sweep'
-- `command key items...` in chunks of `per` (Lua's unpack has a stack limit), replies joined.
local function chunked(command, key, items, per)
  local replies = {}
  for i = 1, #items, per do
    local r = redis.call(command, key, unpack(items, i, math.min(i + per - 1, #items)))
    if type(r) == 'table' then
      for _, v in ipairs(r) do replies[#replies + 1] = v end
    end
  end
  return replies
end
local out = {}
local a = 1
for _, key in ipairs(KEYS) do
  local interval, burst, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local fields = {}
  for j = 1, n do fields[j] = ARGV[a + 2 * j - 2] end
  fields[n + 1] = SWEEP
  local stored = chunked('HMGET', key, fields, 1000)
  local set, longest = {}, 0
  for j = 1, n do
    local asked = tonumber(ARGV[a + 2 * j - 1])
    local tat = tonumber(stored[j]) or now
    if tat < now then tat = now end
    local free = math.floor((now + burst * interval - tat) / interval)
    local granted = math.max(0, math.min(asked, free))
    tat = tat + granted * interval
    if granted > 0 then
      set[#set + 1] = fields[j]
      set[#set + 1] = string.format('%.0f', tat)
      if tat - now > longest then longest = tat - now end
    end
    local retry = 0
    if granted < asked then retry = math.max(0, math.ceil(tat - (burst - 1) * interval - now)) end
    out[#out + 1] = granted
    out[#out + 1] = retry
  end
  a = a + 2 * n
  local swept = redis.call('HSCAN', key, stored[n + 1] or '0', 'COUNT', math.max(#set / 2, 16))
  local stale = {}
  for i = 1, #swept[2], 2 do
    local f = swept[2][i]
    if f ~= SWEEP and (tonumber(swept[2][i + 1]) or 0) <= now then stale[#stale + 1] = f end
  end
  if #stale > 0 then chunked('HDEL', key, stale, 1000) end
  if #set > 0 or #stale > 0 then
    set[#set + 1] = SWEEP
    set[#set + 1] = swept[1]
    chunked('HSET', key, set, 2000)
  end
  if longest > 0 then
    local ms = math.floor(longest / 1000) + 1
    if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
  end
end
return out
"#,
    )
});

/// Where a rule's budgets are kept.
enum Limiter {
    /// The group's, in Redis: `interval_us` per unit, bursts of `burst`.
    Fleet { interval_us: f64, burst: u32 },
    /// This replica's own.
    Replica(DefaultKeyedRateLimiter<String>),
}

/// What a budget granted: units to spend now, and when to ask again for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grant {
    pub units: u32,
    pub retry: Duration,
    /// False when the budget could not be read (Redis unreachable): nothing was refused.
    pub known: bool,
}

/// Why an event may not spend a unit now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its budget is spent: the next unit is back after this long.
    Spent(Duration),
    /// Its budget could not be read: ask again after this long.
    Unknown(Duration),
    /// Its budget was not asked for in this round: ask now.
    NotAsked,
}

impl Refusal {
    /// How long to wait before asking again.
    pub fn retry(self) -> Duration {
        match self {
            Refusal::Spent(d) | Refusal::Unknown(d) => d,
            Refusal::NotAsked => Duration::ZERO,
        }
    }
}

/// Units granted per rule and channel, spent one event at a time in the order asked.
#[derive(Debug, Default)]
pub(crate) struct Grants {
    grants: HashMap<String, HashMap<String, Grant>>,
}

impl Grants {
    fn insert(&mut self, rule: &str, channel: &str, grant: Grant) {
        self.grants
            .entry(rule.to_owned())
            .or_default()
            .insert(channel.to_owned(), grant);
    }

    /// Spends one unit of `rule` and `channel`'s grant, or says why not.
    pub fn spend(&mut self, rule: &str, channel: &str) -> Result<(), Refusal> {
        match self.grants.get_mut(rule).and_then(|c| c.get_mut(channel)) {
            Some(g) if g.units > 0 => {
                g.units -= 1;
                Ok(())
            }
            Some(g) if g.known => Err(Refusal::Spent(g.retry)),
            Some(g) => Err(Refusal::Unknown(g.retry)),
            None => Err(Refusal::NotAsked),
        }
    }
}

/// The budgets of every rate-limited rule.
pub(crate) struct Budgets {
    limiters: HashMap<String, Limiter>,
    /// Prefix of the fleet's budget keys (`key_prefix`).
    prefix: String,
    /// For the fleet's budgets (`None` in unit tests with replica budgets only).
    conn: Option<Conn>,
    /// When the last warning that they cannot be read was logged (seconds since 1970).
    warned_at: std::sync::atomic::AtomicU64,
}

impl Budgets {
    /// The budgets of `rules`, the fleet's under keys starting with `prefix` (`key_prefix`) on
    /// the Redis `conn` reaches.
    pub fn new(rules: &PatternTable<Backpressure>, prefix: String, conn: Option<Conn>) -> Self {
        let mut limiters = HashMap::new();
        for (pattern, rule) in rules.iter() {
            if let Backpressure::RateLimit {
                per_second,
                burst,
                scope,
                ..
            } = rule
            {
                let per_second = (*per_second).max(1);
                let burst = (*burst).max(1);
                let limiter = match scope {
                    LimitScope::Fleet => Limiter::Fleet {
                        interval_us: 1e6 / f64::from(per_second),
                        burst,
                    },
                    LimitScope::Replica => {
                        let quota = Quota::per_second(
                            NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN),
                        )
                        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
                        Limiter::Replica(RateLimiter::keyed(quota))
                    }
                };
                limiters.insert(pattern.as_str().to_owned(), limiter);
            }
        }
        Budgets {
            limiters,
            prefix,
            conn,
            warned_at: Default::default(),
        }
    }

    /// The commands the fleet's budgets need that the ACL user may not run, or keys it may not
    /// touch (`runtime::grants`): checked at start, since a refusal while running would leave
    /// rate-limited events waiting for ever.
    pub async fn refused(&self) -> redis::RedisResult<Vec<String>> {
        let Some(conn) = &self.conn else {
            return Ok(Vec::new());
        };
        if !self
            .limiters
            .values()
            .any(|l| matches!(l, Limiter::Fleet { .. }))
        {
            return Ok(Vec::new());
        }
        let probe = format!("{}acl-probe", self.prefix);
        let on_probe = |name: &str, args: &[&str]| {
            let mut cmd = redis::cmd(name);
            cmd.arg(&probe).arg(args);
            cmd
        };
        let checks: [(&str, redis::Cmd); 9] = [
            ("HMGET", on_probe("HMGET", &["c"])),
            ("HSET", on_probe("HSET", &["c", "0"])),
            ("HSCAN", on_probe("HSCAN", &["0"])),
            ("HDEL", on_probe("HDEL", &["c"])),
            ("PTTL", on_probe("PTTL", &[])),
            ("PEXPIRE", on_probe("PEXPIRE", &["1"])),
            ("TIME", redis::cmd("TIME")),
            ("EVALSHA", BUDGET_SCRIPT.call().arg(0).clone()),
            ("SCRIPT LOAD", BUDGET_SCRIPT.load()),
        ];
        let mut conn = conn.clone();
        crate::runtime::grants::refused(&mut conn, &checks).await
    }

    /// Grants what `asks` (with the units each asks for) can have now: the fleet's budgets in one
    /// round trip, the replica's in memory. Budgets Redis could not be asked for grant nothing,
    /// to be asked again shortly: a limit is never exceeded because Redis was unreachable.
    /// `asks`: (rule, channel, units), each pair once.
    pub async fn take(&self, asks: &[(&str, &str, u32)]) -> Grants {
        let mut grants = Grants::default();
        let mut fleet: Vec<(&str, &str, u32, f64, u32)> = Vec::new();
        for &(rule, channel, units) in asks {
            match self.limiters.get(rule) {
                None => grants.insert(
                    rule,
                    channel,
                    Grant {
                        units,
                        retry: Duration::ZERO,
                        known: true,
                    },
                ),
                Some(Limiter::Replica(limiter)) => {
                    grants.insert(rule, channel, replica_grant(limiter, channel, units))
                }
                Some(Limiter::Fleet { interval_us, burst }) => {
                    fleet.push((rule, channel, units, *interval_us, *burst))
                }
            }
        }
        if !fleet.is_empty() {
            let granted = self.fleet_grants(&fleet).await.unwrap_or_else(|e| {
                self.unread(&e);
                vec![UNKNOWN; fleet.len()]
            });
            for ((rule, channel, ..), grant) in fleet.iter().zip(granted) {
                grants.insert(rule, channel, grant);
            }
        }
        for limiter in self.limiters.values() {
            if let Limiter::Replica(limiter) = limiter {
                if limiter.len() > CHANNELS_KEPT {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
            }
        }
        grants
    }

    /// Says why the fleet's budgets could not be read: an outage at debug level (the worker's
    /// readiness says it), anything else (a budget key of another type) as a warning, at most
    /// once a minute.
    fn unread(&self, e: &redis::RedisError) {
        if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
            tracing::debug!(error = %e, "rate-limit budgets not read: the events wait");
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.warned_at.load(std::sync::atomic::Ordering::Relaxed);
        if now >= last + 60 {
            self.warned_at
                .store(now, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %e, prefix = %self.prefix, "rate-limit budgets cannot be read: rate-limited events wait");
        }
    }

    /// One script call for the fleet's budgets: (rule, channel, units, interval, burst) each; the
    /// grants in the same order.
    async fn fleet_grants(
        &self,
        asks: &[(&str, &str, u32, f64, u32)],
    ) -> redis::RedisResult<Vec<Grant>> {
        let Some(conn) = &self.conn else {
            return Ok(vec![UNKNOWN; asks.len()]);
        };
        // Per rule, its channels: the script answers rule by rule.
        let mut rules: Vec<(&str, f64, u32, Vec<usize>)> = Vec::new();
        for (i, &(rule, _, _, interval_us, burst)) in asks.iter().enumerate() {
            match rules.iter_mut().find(|r| r.0 == rule) {
                Some(r) => r.3.push(i),
                None => rules.push((rule, interval_us, burst, vec![i])),
            }
        }
        let mut cmd = BUDGET_SCRIPT.call();
        cmd.arg(rules.len());
        for (rule, ..) in &rules {
            cmd.arg(format!("{}{rule}", self.prefix));
        }
        for (_, interval_us, burst, channels) in &rules {
            cmd.arg(*interval_us).arg(*burst).arg(channels.len());
            for &i in channels {
                cmd.arg(asks[i].1).arg(asks[i].2);
            }
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors().add_command(cmd);
        let mut conn = conn.clone();
        let reply = query_loading(&pipe, &mut conn, &[&BUDGET_SCRIPT])
            .await?
            .pop()
            .unwrap_or(Ok(Value::Nil))?;
        let numbers: Vec<u64> = redis::from_redis_value(reply)?;
        if numbers.len() != 2 * asks.len() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "unexpected reply from the budget script",
            )));
        }
        let mut grants = vec![UNKNOWN; asks.len()];
        let order = rules.iter().flat_map(|r| r.3.iter().copied());
        for (i, pair) in order.zip(numbers.chunks(2)) {
            grants[i] = Grant {
                units: pair[0] as u32,
                retry: Duration::from_micros(pair[1]),
                known: true,
            };
        }
        Ok(grants)
    }
}

/// What a budget Redis could not be asked for grants: nothing, to be asked again shortly.
const UNKNOWN: Grant = Grant {
    units: 0,
    retry: UNKNOWN_RETRY,
    known: false,
};

/// Where the fleet's budget keys of `group` start: after the hash tag every consumed stream
/// shares (`{app}:rate:<group>:`), else after a tag of the group's own
/// (`streamfleet:rate:{<group>}:`).
pub(crate) fn key_prefix(streams: &[&str], group: &str) -> String {
    let mut tags = streams.iter().map(|s| hash_tag(s));
    match tags.next() {
        Some(Some(tag)) if tags.all(|t| t == Some(tag)) => format!("{{{tag}}}:rate:{group}:"),
        _ => format!("streamfleet:rate:{{{group}}}:"),
    }
}

/// A replica budget: up to `units` one by one, then the time until the next.
fn replica_grant(limiter: &DefaultKeyedRateLimiter<String>, channel: &str, units: u32) -> Grant {
    // A String key: governor's keyed state owns its keys. The limiter's own clock tells the time
    // (building one per refusal, it calibrates, cost ~25 µs per event here).
    let key = channel.to_owned();
    let mut granted = 0;
    while granted < units {
        match limiter.check_key(&key) {
            Ok(()) => granted += 1,
            Err(not_until) => {
                return Grant {
                    units: granted,
                    retry: not_until.wait_time_from(limiter.clock().now()),
                    known: true,
                }
            }
        }
    }
    Grant {
        units,
        retry: Duration::ZERO,
        known: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_keys_share_the_streams_hash_tag_or_take_the_groups() {
        assert_eq!(
            key_prefix(&["{app}:events"], "notifier"),
            "{app}:rate:notifier:"
        );
        assert_eq!(
            key_prefix(&["{app}:events", "{app}:orders:*"], "notifier"),
            "{app}:rate:notifier:"
        );
        for streams in [&["events"][..], &["{a}:x", "{b}:y"], &["{}:x"], &["x{"]] {
            assert_eq!(
                key_prefix(streams, "notifier"),
                "streamfleet:rate:{notifier}:",
                "{streams:?}"
            );
        }
    }

    #[test]
    fn grants_are_spent_one_unit_at_a_time_then_refused_with_their_retry() {
        let mut grants = Grants::default();
        let retry = Duration::from_millis(40);
        grants.insert(
            "r",
            "c",
            Grant {
                units: 2,
                retry,
                known: true,
            },
        );
        grants.insert("r", "u", UNKNOWN);
        assert_eq!(grants.spend("r", "c"), Ok(()));
        assert_eq!(grants.spend("r", "c"), Ok(()));
        assert_eq!(grants.spend("r", "c"), Err(Refusal::Spent(retry)));
        assert_eq!(grants.spend("r", "u"), Err(Refusal::Unknown(UNKNOWN_RETRY)));
        assert_eq!(grants.spend("r", "other"), Err(Refusal::NotAsked));
        assert_eq!(Refusal::NotAsked.retry(), Duration::ZERO);
    }
}
