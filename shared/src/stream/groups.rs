//! A stream's consumer groups as `XINFO GROUPS` reports them, parsed once for every reader of the
//! reply: the source (does the group exist), the lag sampler (lag and pending), fleetctl (every
//! figure). A field an older Redis lacks (`lag`, `entries-read` before 7.0) or reports as nil is
//! `None`, never a guess.

use std::collections::HashMap;

use redis::Value;

use crate::stream::EntryId;

/// One group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub name: String,
    pub consumers: u64,
    /// Entries delivered and not yet acknowledged.
    pub pending: u64,
    pub last_delivered: EntryId,
    pub entries_read: Option<u64>,
    /// Entries not yet delivered to the group: the figure KEDA's redis-streams scaler reads.
    /// `None` when Redis cannot tell (entries deleted after the group's position).
    pub lag: Option<u64>,
}

/// Why an `XINFO GROUPS` reply could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected XINFO GROUPS reply: {0}")]
pub struct GroupsReplyError(pub String);

/// A field of one group, if present, of that type, and not nil.
fn field<T: redis::FromRedisValue>(fields: &HashMap<String, Value>, name: &str) -> Option<T> {
    fields
        .get(name)
        .filter(|v| !matches!(v, Value::Nil))
        .and_then(|v| redis::from_redis_value_ref(v).ok())
}

/// Every group of an `XINFO GROUPS` reply.
pub fn parse_groups(reply: &Value) -> Result<Vec<GroupInfo>, GroupsReplyError> {
    let groups: Vec<HashMap<String, Value>> =
        redis::from_redis_value_ref(reply).map_err(|e| GroupsReplyError(e.to_string()))?;
    groups
        .iter()
        .map(|g| {
            let name: String = field(g, "name")
                .ok_or_else(|| GroupsReplyError("a group without a name".into()))?;
            let last_delivered = field::<String>(g, "last-delivered-id")
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| GroupsReplyError(format!("no last-delivered-id for {name}")))?;
            Ok(GroupInfo {
                consumers: field(g, "consumers").unwrap_or(0),
                pending: field(g, "pending").unwrap_or(0),
                last_delivered,
                entries_read: field(g, "entries-read"),
                lag: field(g, "lag"),
                name,
            })
        })
        .collect()
}

/// `group` in an `XINFO GROUPS` reply, if it exists.
pub fn find_group(reply: &Value, group: &str) -> Result<Option<GroupInfo>, GroupsReplyError> {
    Ok(parse_groups(reply)?.into_iter().find(|g| g.name == group))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, lag: Value) -> Value {
        let kv = |k: &str, v: Value| [Value::BulkString(k.as_bytes().to_vec()), v];
        Value::Array(
            [
                kv("name", Value::BulkString(name.as_bytes().to_vec())),
                kv("consumers", Value::Int(2)),
                kv("pending", Value::Int(5)),
                kv("last-delivered-id", Value::BulkString(b"10-0".to_vec())),
                kv("entries-read", Value::Int(12)),
                kv("lag", lag),
            ]
            .concat(),
        )
    }

    #[test]
    fn every_figure_of_each_group_and_nil_as_none() {
        let reply = Value::Array(vec![group("a", Value::Int(3)), group("b", Value::Nil)]);
        let groups = parse_groups(&reply).unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(
            groups[0],
            GroupInfo {
                name: "a".into(),
                consumers: 2,
                pending: 5,
                last_delivered: EntryId { ms: 10, seq: 0 },
                entries_read: Some(12),
                lag: Some(3),
            }
        );
        assert_eq!(groups[1].lag, None, "nil: Redis cannot tell");
        assert_eq!(find_group(&reply, "b").unwrap().unwrap().name, "b");
        assert!(find_group(&reply, "c").unwrap().is_none());
        assert!(parse_groups(&Value::Int(1)).is_err());
    }
}
