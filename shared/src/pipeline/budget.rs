//! Rate-limit budgets, per channel: how many of a channel's events may go now. A channel's limit
//! is what its subscribers see, whatever the number of replicas, so by default a rule's budgets
//! belong to the consumer group and live in Redis, shared by every replica: one theoretical
//! arrival time (GCRA) per rule and channel, asked for a whole batch in one script call. A rule
//! with `scope = "replica"` keeps its budgets in this process instead (governor), each replica
//! then allowing the full rate.
//!
//! A budget key lives only while its bucket is not full again (its TTL is the time until it
//! refills), so Redis holds one key per channel recently busy, never one per event. Its name
//! (`key_prefix`) carries the hash tag the consumed streams share, `{app}:rate:<group>:…`, so that
//! it sits in their slot and under the ACL key pattern of the deployment (`~{app}:*`); streams
//! without one tag give `streamfleet:rate:{<group>}:…`. Either way a batch's budgets are one slot:
//! one call, on Redis Cluster too.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::LazyLock;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use redis::aio::ConnectionManager;
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

/// One script call grants a whole batch's asks: per budget key, as many units as are free (up to
/// what is asked), and the time until the next unit is back.
///
/// GCRA: `tat`, the theoretical arrival time of the next unit, is stored in microseconds of the
/// server's clock (`TIME`: one clock for every replica); at `now` with interval `T` and burst
/// `b`, `floor((now + b*T - max(tat, now)) / T)` units are free. The key expires when the bucket
/// is full again. A key holding anything else is overwritten (`SET`), never an error.
///
/// KEYS: the budget keys. ARGV: per key, the interval (µs per unit), the burst, the units asked.
/// Returns per key: units granted, µs until the next unit is free (0 when all were granted).
static BUDGET_SCRIPT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"#!lua
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local interval, burst, asked = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  local stored = redis.pcall('GET', key)
  local tat = (type(stored) == 'string' and tonumber(stored)) or now
  if tat < now then tat = now end
  local free = math.floor((now + burst * interval - tat) / interval)
  local granted = math.max(0, math.min(asked, free))
  tat = tat + granted * interval
  if granted > 0 then
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1)
  end
  local retry = 0
  if granted < asked then retry = math.max(0, math.ceil(tat - (burst - 1) * interval - now)) end
  out[#out + 1] = granted
  out[#out + 1] = retry
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
    conn: Option<ConnectionManager>,
}

impl Budgets {
    /// The budgets of `rules`, the fleet's under keys starting with `prefix` (`key_prefix`) on
    /// the Redis `conn` reaches.
    pub fn new(
        rules: &PatternTable<Backpressure>,
        prefix: String,
        conn: Option<ConnectionManager>,
    ) -> Self {
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
        }
    }

    /// The commands the fleet's budgets need that the ACL user may not run, or keys it may not
    /// touch: checked at start (a refusal while running would leave rate-limited events waiting
    /// for ever). Each command is queued in a `MULTI` then discarded: Redis checks permissions as
    /// it queues, and runs nothing.
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
        let checks: [(&str, redis::Cmd); 5] = [
            ("GET", redis::cmd("GET").arg(&probe).clone()),
            ("SET", redis::cmd("SET").arg(&probe).arg("0").clone()),
            ("TIME", redis::cmd("TIME")),
            ("EVALSHA", BUDGET_SCRIPT.call().arg(0).clone()),
            ("SCRIPT LOAD", BUDGET_SCRIPT.load()),
        ];
        let mut pipe = redis::pipe();
        pipe.ignore_errors().cmd("MULTI");
        for (_, cmd) in &checks {
            pipe.add_command(cmd.clone());
        }
        pipe.cmd("DISCARD");
        let mut conn = conn.clone();
        let replies: Vec<redis::RedisResult<Value>> = pipe.query_async(&mut conn).await?;
        Ok(checks
            .iter()
            .zip(replies.iter().skip(1))
            .filter(|(_, reply)| matches!(reply, Err(e) if e.code() == Some("NOPERM")))
            .map(|((name, _), reply)| match reply {
                Err(e) if e.to_string().contains("key") => format!("{name} on {probe}"),
                _ => (*name).to_owned(),
            })
            .collect())
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
                tracing::debug!(error = %e, "rate-limit budgets not read: the events wait");
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

    /// One script call for the fleet's budgets: (rule, channel, units, interval, burst) each.
    async fn fleet_grants(
        &self,
        asks: &[(&str, &str, u32, f64, u32)],
    ) -> redis::RedisResult<Vec<Grant>> {
        let Some(conn) = &self.conn else {
            return Ok(vec![UNKNOWN; asks.len()]);
        };
        let mut cmd = BUDGET_SCRIPT.call();
        cmd.arg(asks.len());
        for (rule, channel, ..) in asks {
            cmd.arg(format!("{}{rule}:{channel}", self.prefix));
        }
        for (_, _, units, interval_us, burst) in asks {
            cmd.arg(*interval_us).arg(*burst).arg(*units);
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
        Ok(numbers
            .chunks(2)
            .map(|pair| Grant {
                units: pair[0] as u32,
                retry: Duration::from_micros(pair[1]),
                known: true,
            })
            .collect())
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
