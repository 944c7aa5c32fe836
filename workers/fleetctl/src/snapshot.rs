//! The state of streams and their consumer groups, read together, as `lag`, `pending`, `status`
//! and `checkpoints` show it: per stream its length and dead letters, per group the figures of
//! `XINFO GROUPS` (lag as KEDA reads it), the oldest pending entry and the consumers.
//!
//! Ages are measured on Redis's clock (`TIME`), not this machine's: an entry id is the time Redis
//! wrote it, so a skewed laptop clock does not make a backlog look older or younger than it is.
//! Reads are pipelined per slice of streams (two round trips per slice whatever its size), so
//! a glob over thousands of streams stays quick; on a Redis Cluster each pipeline is split by
//! hash slot and sent to every master at once (`Conn`), so the figures of every master are read
//! in the same two round trips. `TIME` is asked of one node (any): on a cluster, ages assume the
//! nodes' clocks in step (NTP), since each entry id is its own master's time.

use std::collections::BTreeMap;

use anyhow::Context;
use redis::{RedisResult, Value};
use serde_json::{json, Value as Json};

use crate::groups_info::{parse_consumers, parse_groups, parse_oldest_pending};
use crate::groups_info::{ConsumerInfo, GroupInfo};
use crate::progress::Progress;
use crate::streams::Found;
use streamfleet::runtime::conn::Conn;
use streamfleet::{EntryId, DLQ_SUFFIX};

/// Streams read per pipelined round trip.
const SLICE: usize = 100;
/// Dead letter streams at most this long are read whole to count their dead letters by group;
/// longer ones give their total only (reading them would cost more than the answer is worth).
pub const DLQ_COUNT_MAX: u64 = 1000;

/// One group of one stream.
#[derive(Debug, Clone)]
pub struct GroupView {
    pub info: GroupInfo,
    pub oldest_pending: Option<EntryId>,
    pub consumers: Vec<ConsumerInfo>,
}

impl GroupView {
    /// Age of the oldest pending entry at `now_ms` (Redis's clock), from its id's time.
    pub fn oldest_pending_age_ms(&self, now_ms: u64) -> Option<u64> {
        self.oldest_pending.map(|id| now_ms.saturating_sub(id.ms))
    }

    /// Consumers that are gone while owning entries.
    pub fn dead(&self, dead_after_ms: u64) -> impl Iterator<Item = &ConsumerInfo> {
        self.consumers
            .iter()
            .filter(move |c| c.is_dead(dead_after_ms))
    }

    /// `2 active, 1 idle, 1 dead` (states that have none left out), or `none`.
    pub fn consumers_summary(&self, dead_after_ms: u64) -> String {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &self.consumers {
            *counts.entry(c.state(dead_after_ms)).or_default() += 1;
        }
        let parts: Vec<String> = ["active", "idle", "dead"]
            .iter()
            .filter_map(|s| counts.get(s).map(|n| format!("{n} {s}")))
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }

    pub fn json(&self, now_ms: u64, dead_after_ms: u64) -> Json {
        let i = &self.info;
        json!({
            "group": i.name,
            "lag": i.lag,
            "pending": i.pending,
            "oldest_pending_id": self.oldest_pending.map(|id| id.to_string()),
            "oldest_pending_age_ms": self.oldest_pending_age_ms(now_ms),
            "last_delivered_id": i.last_delivered.to_string(),
            "entries_read": i.entries_read,
            "consumers": self.consumers.iter().map(|c| json!({
                "name": c.name,
                "pending": c.pending,
                "idle_ms": c.idle_ms,
                "state": c.state(dead_after_ms),
            })).collect::<Vec<_>>(),
        })
    }
}

/// Dead letters of a stream (`<stream>:dlq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetters {
    /// Its length, and per `dlq_group` when it is short enough to count.
    Count {
        total: u64,
        by_group: Option<BTreeMap<String, u64>>,
    },
    /// The key holds something else: the workers cannot write dead letters (their entries stay
    /// pending, `/readyz` reports `dead_letters_blocked`).
    WrongType(String),
}

impl DeadLetters {
    pub fn total(&self) -> u64 {
        match self {
            DeadLetters::Count { total, .. } => *total,
            DeadLetters::WrongType(_) => 0,
        }
    }

    /// The dead letters of `group`, when counted.
    pub fn of_group(&self, group: &str) -> Option<u64> {
        match self {
            DeadLetters::Count {
                by_group: Some(by), ..
            } => Some(by.get(group).copied().unwrap_or(0)),
            _ => None,
        }
    }

    pub fn json(&self) -> Json {
        match self {
            DeadLetters::Count { total, by_group } => json!({"total": total, "by_group": by_group}),
            DeadLetters::WrongType(kind) => {
                json!({"total": null, "error": format!("the key holds a {kind}, not a stream")})
            }
        }
    }
}

/// One stream and the groups looked at.
#[derive(Debug, Clone)]
pub struct StreamView {
    pub stream: String,
    pub length: u64,
    pub dead_letters: DeadLetters,
    pub groups: Vec<GroupView>,
    /// `--group` was given and the stream has no such group.
    pub group_missing: Option<String>,
}

impl StreamView {
    pub fn dlq_key(&self) -> String {
        format!("{}{DLQ_SUFFIX}", self.stream)
    }

    pub fn json(&self, now_ms: u64, dead_after_ms: u64) -> Json {
        json!({
            "stream": self.stream,
            "length": self.length,
            "dead_letters": self.dead_letters.json(),
            "groups": self.groups.iter().map(|g| g.json(now_ms, dead_after_ms)).collect::<Vec<_>>(),
            "group_missing": self.group_missing,
        })
    }
}

/// Streams and groups at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Redis's clock when the reading started, in ms since the epoch.
    pub now_ms: u64,
    pub streams: Vec<StreamView>,
    /// Streams matched by a glob that no group looked at reads (the projector's history
    /// streams, say): left out, only counted, or a glob over them would bury the fleet.
    pub without_groups: u64,
}

impl Snapshot {
    /// The note under a table about the streams left out.
    pub fn without_groups_note(&self, group: Option<&str>) -> Option<String> {
        (self.without_groups > 0).then(|| {
            let whose =
                group.map_or_else(|| "no consumer group".into(), |g| format!("no group {g}"));
            format!(
                "{} stream(s) matched by a glob have {whose} (history streams, say): not shown",
                self.without_groups
            )
        })
    }
}

/// Redis's clock, in ms since the epoch.
pub async fn redis_now_ms(conn: &mut Conn) -> anyhow::Result<u64> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.context("TIME")?;
    Ok(secs * 1000 + micros / 1000)
}

/// Reads the streams `found` (every group, or `group` only). A stream matched by a glob without
/// such a group is left out (counted); a named one is shown with what it lacks. With
/// `count_dead_letters`, short dead letter streams are read to count their dead letters per group.
pub async fn take(
    conn: &mut Conn,
    found: &Found,
    group: Option<&str>,
    count_dead_letters: bool,
) -> anyhow::Result<Snapshot> {
    let now_ms = redis_now_ms(conn).await?;
    let streams = &found.streams;
    let mut out = Vec::with_capacity(streams.len());
    let mut without_groups = 0;
    let mut progress = Progress::new("reading streams", Some(streams.len() as u64));
    for slice in streams.chunks(SLICE) {
        for view in read_slice(conn, slice, group, count_dead_letters).await? {
            let lacks = view.groups.is_empty() || view.group_missing.is_some();
            if lacks && !found.named.contains(&view.stream) {
                without_groups += 1;
            } else {
                out.push(view);
            }
        }
        progress.add(slice.len() as u64);
    }
    progress.finish();
    Ok(Snapshot {
        now_ms,
        streams: out,
        without_groups,
    })
}

async fn read_slice(
    conn: &mut Conn,
    slice: &[String],
    group: Option<&str>,
    count_dead_letters: bool,
) -> anyhow::Result<Vec<StreamView>> {
    // First round trip: per stream its length, groups and dead letters.
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for stream in slice {
        let dlq = format!("{stream}{DLQ_SUFFIX}");
        pipe.cmd("XLEN")
            .arg(stream)
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .cmd("TYPE")
            .arg(&dlq)
            .cmd("XLEN")
            .arg(&dlq);
    }
    let replies: Vec<RedisResult<Value>> = pipe
        .query_async(conn)
        .await
        .context("reading the streams' groups (XINFO GROUPS)")?;
    let mut views = Vec::with_capacity(slice.len());
    for (stream, r) in slice.iter().zip(replies.chunks(4)) {
        let [length, groups, dlq_type, dlq_len] = r else {
            unreachable!("four replies per stream")
        };
        let groups = match groups {
            Ok(v) => parse_groups(v.clone())?,
            // Deleted since it was found (a flow stream expiring): nothing to show.
            Err(e) if e.to_string().contains("no such key") => continue,
            Err(e) => return Err(anyhow::anyhow!("XINFO GROUPS {stream}: {e}")),
        };
        let length =
            redis::from_redis_value::<u64>(length.clone().unwrap_or(Value::Int(0))).unwrap_or(0);
        let dlq_type: String = dlq_type
            .as_ref()
            .ok()
            .and_then(|v| redis::from_redis_value(v.clone()).ok())
            .unwrap_or_else(|| "none".into());
        let dead_letters = match dlq_type.as_str() {
            "stream" | "none" => DeadLetters::Count {
                total: dlq_len
                    .as_ref()
                    .ok()
                    .and_then(|v| redis::from_redis_value(v.clone()).ok())
                    .unwrap_or(0),
                by_group: None,
            },
            other => DeadLetters::WrongType(other.to_owned()),
        };
        let (groups, group_missing) = match group {
            Some(g) => {
                let kept: Vec<GroupInfo> = groups.into_iter().filter(|i| i.name == g).collect();
                let missing = kept.is_empty().then(|| g.to_owned());
                (kept, missing)
            }
            None => (groups, None),
        };
        views.push((
            StreamView {
                stream: stream.clone(),
                length,
                dead_letters,
                groups: Vec::new(),
                group_missing,
            },
            groups,
        ));
    }
    // Second round trip: per group its oldest pending entry and consumers; short dead letter
    // streams read whole.
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut asked = 0;
    for (view, groups) in &views {
        for g in groups {
            pipe.cmd("XPENDING")
                .arg(&view.stream)
                .arg(&g.name)
                .cmd("XINFO")
                .arg("CONSUMERS")
                .arg(&view.stream)
                .arg(&g.name);
            asked += 2;
        }
        if wants_dlq_read(view, count_dead_letters) {
            pipe.cmd("XRANGE").arg(view.dlq_key()).arg("-").arg("+");
            asked += 1;
        }
    }
    let replies: Vec<RedisResult<Value>> = if asked == 0 {
        Vec::new()
    } else {
        pipe.query_async(conn)
            .await
            .context("reading the groups' pending entries and consumers")?
    };
    let mut replies = replies.into_iter();
    let mut next = || replies.next().expect("one reply per command");
    let mut out = Vec::with_capacity(views.len());
    for (mut view, groups) in views {
        for info in groups {
            let (summary, consumers) = (next(), next());
            // A group destroyed between the two round trips has neither.
            let (Ok(summary), Ok(consumers)) = (summary, consumers) else {
                continue;
            };
            view.groups.push(GroupView {
                oldest_pending: parse_oldest_pending(&summary),
                consumers: parse_consumers(consumers)?,
                info,
            });
        }
        if wants_dlq_read(&view, count_dead_letters) {
            // Bytes: a dead letter keeps its entry's fields, which need not be UTF-8.
            type Letters = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;
            let read = next().ok().map(redis::from_redis_value::<Letters>);
            if let Some(Ok(letters)) = read {
                let mut by_group = BTreeMap::new();
                for (_, fields) in &letters {
                    let g = fields
                        .iter()
                        .find(|(k, _)| k == b"dlq_group")
                        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default();
                    *by_group.entry(g).or_default() += 1;
                }
                view.dead_letters = DeadLetters::Count {
                    total: letters.len() as u64,
                    by_group: Some(by_group),
                };
            }
        }
        out.push(view);
    }
    Ok(out)
}

fn wants_dlq_read(view: &StreamView, count_dead_letters: bool) -> bool {
    count_dead_letters
        && matches!(view.dead_letters, DeadLetters::Count { total, .. } if total > 0 && total <= DLQ_COUNT_MAX)
}
