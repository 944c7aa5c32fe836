//! What Redis says about a stream's consumer groups, read from `XINFO GROUPS`, `XINFO CONSUMERS`
//! and the `XPENDING` summary, for every command that shows or moves a group (replay, lag,
//! pending, status, checkpoints). Field names are Redis's; a field an older Redis lacks (`lag`,
//! `entries-read` before 7.0) or reports as nil is `None`, never a guess.

use std::collections::HashMap;

use anyhow::Context;
use redis::Value;

use streamfleet::runtime::conn::Conn;
use streamfleet::EntryId;

/// A consumer that interacted with Redis within this many ms is active: a worker reads at least
/// every `block_ms` (1 s by default) and refreshes its entries in flight.
pub const ACTIVE_MS: u64 = 10_000;

/// A field of an `XINFO` reply, if present and of that type (`nil` is absent).
pub fn field<T: redis::FromRedisValue>(fields: &HashMap<String, Value>, name: &str) -> Option<T> {
    fields
        .get(name)
        .filter(|v| !matches!(v, Value::Nil))
        .and_then(|v| redis::from_redis_value(v.clone()).ok())
}

pub use streamfleet::stream::groups::GroupInfo;

/// Every group of an `XINFO GROUPS` reply.
pub fn parse_groups(reply: Value) -> anyhow::Result<Vec<GroupInfo>> {
    Ok(streamfleet::stream::groups::parse_groups(&reply)?)
}

/// The groups of `stream`.
pub async fn groups(conn: &mut Conn, stream: &str) -> anyhow::Result<Vec<GroupInfo>> {
    let reply: Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .with_context(|| format!("XINFO GROUPS {stream} (does the stream exist?)"))?;
    parse_groups(reply)
}

/// `group` of `stream`, or an error saying how to create it.
pub async fn group_info(conn: &mut Conn, stream: &str, group: &str) -> anyhow::Result<GroupInfo> {
    groups(conn, stream)
        .await?
        .into_iter()
        .find(|g| g.name == group)
        .with_context(|| {
            format!(
                "no group {group} on {stream} (fleetctl groups create --streams {stream} --group {group} creates it)"
            )
        })
}

/// One consumer as `XINFO CONSUMERS` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerInfo {
    pub name: String,
    /// Entries delivered to it and not acknowledged.
    pub pending: u64,
    /// Milliseconds since it last talked to Redis about the group (read, claim).
    pub idle_ms: u64,
}

impl ConsumerInfo {
    /// Talked to Redis within [`ACTIVE_MS`]: a running worker.
    pub fn is_active(&self) -> bool {
        self.idle_ms < ACTIVE_MS
    }

    /// Silent longer than `dead_after_ms` while owning entries: its process is gone, and nothing
    /// delivers its entries again until another consumer of the group reclaims them.
    pub fn is_dead(&self, dead_after_ms: u64) -> bool {
        self.pending > 0 && self.idle_ms >= dead_after_ms
    }

    /// `active`, `dead` or `idle`.
    pub fn state(&self, dead_after_ms: u64) -> &'static str {
        if self.is_dead(dead_after_ms) {
            "dead"
        } else if self.is_active() {
            "active"
        } else {
            "idle"
        }
    }
}

/// Every consumer of an `XINFO CONSUMERS` reply.
pub fn parse_consumers(reply: Value) -> anyhow::Result<Vec<ConsumerInfo>> {
    let consumers: Vec<HashMap<String, Value>> =
        redis::from_redis_value(reply).context("XINFO CONSUMERS reply")?;
    Ok(consumers
        .iter()
        .map(|c| ConsumerInfo {
            name: field(c, "name").unwrap_or_default(),
            pending: field(c, "pending").unwrap_or(0),
            idle_ms: field(c, "idle").unwrap_or(u64::MAX),
        })
        .collect())
}

/// The consumers of `group` on `stream`.
pub async fn consumers(
    conn: &mut Conn,
    stream: &str,
    group: &str,
) -> anyhow::Result<Vec<ConsumerInfo>> {
    let reply: Value = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await
        .with_context(|| format!("XINFO CONSUMERS {stream} {group}"))?;
    parse_consumers(reply)
}

/// The consumers of the group that are active (see [`ACTIVE_MS`]).
pub async fn active_consumers(
    conn: &mut Conn,
    stream: &str,
    group: &str,
) -> anyhow::Result<Vec<ConsumerInfo>> {
    let mut all = consumers(conn, stream, group).await?;
    all.retain(ConsumerInfo::is_active);
    Ok(all)
}

/// The oldest entry still pending in a group: the smallest id of an `XPENDING <stream> <group>`
/// summary (`[count, smallest, greatest, per consumer]`; nils when nothing is pending).
pub fn parse_oldest_pending(reply: &Value) -> Option<EntryId> {
    match reply {
        Value::Array(parts) => match parts.get(1) {
            Some(Value::BulkString(id)) => std::str::from_utf8(id).ok()?.parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn a_nil_lag_is_unknown_and_a_missing_one_too() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("name"),
                bulk("g"),
                bulk("consumers"),
                Value::Int(2),
                bulk("pending"),
                Value::Int(3),
                bulk("last-delivered-id"),
                bulk("10-1"),
                bulk("entries-read"),
                Value::Int(7),
                bulk("lag"),
                Value::Nil,
            ]),
            Value::Array(vec![
                bulk("name"),
                bulk("old"),
                bulk("last-delivered-id"),
                bulk("0-0"),
            ]),
        ]);
        let groups = parse_groups(reply).unwrap();
        assert_eq!(
            groups[0],
            GroupInfo {
                name: "g".into(),
                consumers: 2,
                pending: 3,
                last_delivered: EntryId { ms: 10, seq: 1 },
                entries_read: Some(7),
                lag: None,
            }
        );
        assert_eq!((groups[1].lag, groups[1].entries_read), (None, None));
    }

    #[test]
    fn the_oldest_pending_is_the_summarys_smallest_id() {
        let summary = Value::Array(vec![
            Value::Int(2),
            bulk("5-0"),
            bulk("9-0"),
            Value::Array(vec![]),
        ]);
        assert_eq!(
            parse_oldest_pending(&summary),
            Some(EntryId { ms: 5, seq: 0 })
        );
        let none = Value::Array(vec![Value::Int(0), Value::Nil, Value::Nil, Value::Nil]);
        assert_eq!(parse_oldest_pending(&none), None);
    }

    #[test]
    fn a_consumer_is_dead_only_while_it_owns_entries() {
        let c = |pending, idle_ms| ConsumerInfo {
            name: "c".into(),
            pending,
            idle_ms,
        };
        assert_eq!(c(0, 999_999).state(60_000), "idle");
        assert_eq!(c(3, 60_000).state(60_000), "dead");
        assert_eq!(c(3, 500).state(60_000), "active");
        assert_eq!(c(3, 30_000).state(60_000), "idle");
    }
}
