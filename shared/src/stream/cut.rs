//! Entries deleted before a group read them: a producer's `MAXLEN`, an `XTRIM` or an `XDEL`
//! past the group's position. Two symptoms, both read cheaply each sample:
//! - a trim (`MAXLEN`, `XTRIM`) leaves the group's `lag` counting the entries it removed (Redis 7
//!   computes it as entries added less entries read): a lag above the stream's length means at
//!   least that many unread entries are gone, those between the group's position and the first
//!   entry left;
//! - an `XDEL` past the group's position raises the stream's `max-deleted-entry-id` above the
//!   group's `last-delivered-id`, and turns its `lag` nil.

use redis::Value;

use crate::stream::EntryId;

/// A cut: entries after `after` (the group's position) and up to `through` were deleted unread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub after: EntryId,
    pub through: EntryId,
    /// The stream's first entry now, if any.
    pub first: Option<EntryId>,
    /// How many at least, when Redis's counts say (a trim).
    pub at_least: Option<u64>,
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.at_least {
            Some(n) => write!(
                f,
                "at least {n} entries after {} and before {}",
                self.after,
                self.first
                    .map_or_else(|| "the end".to_owned(), |e| e.to_string())
            ),
            None => write!(f, "ids after {} through {}", self.after, self.through),
        }
    }
}

/// The cut a trim made, from the group's `lag` and position, the stream's length and first
/// entry: `None` while the lag fits in the stream.
pub fn trimmed(
    last_delivered: EntryId,
    lag: u64,
    length: u64,
    first: Option<EntryId>,
) -> Option<Cut> {
    (lag > length).then(|| Cut {
        after: last_delivered,
        // The last id before the first entry left (or the group's position, past an emptied one).
        through: first.map_or(last_delivered, |f| {
            if f.seq > 0 {
                EntryId {
                    ms: f.ms,
                    seq: f.seq - 1,
                }
            } else {
                EntryId {
                    ms: f.ms.saturating_sub(1),
                    seq: u64::MAX,
                }
            }
        }),
        first,
        at_least: Some(lag - length),
    })
}

/// `max-deleted-entry-id` and the first entry's id of an `XINFO STREAM` reply.
pub fn deleted_and_first(reply: &Value) -> Option<(EntryId, Option<EntryId>)> {
    let pairs: Vec<(String, Value)> = match reply {
        Value::Map(pairs) => pairs
            .iter()
            .filter_map(|(k, v)| Some((redis::from_redis_value_ref::<String>(k).ok()?, v.clone())))
            .collect(),
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|kv| {
                Some((
                    redis::from_redis_value_ref::<String>(kv.first()?).ok()?,
                    kv.get(1)?.clone(),
                ))
            })
            .collect(),
        _ => return None,
    };
    let get = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let deleted: EntryId = get("max-deleted-entry-id")
        .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())?
        .parse()
        .ok()?;
    // `first-entry`: [id, [field, value, ...]], or nil on an empty stream.
    let first = get("first-entry").and_then(|v| match v {
        Value::Array(entry) => entry
            .first()
            .and_then(|id| redis::from_redis_value_ref::<String>(id).ok())
            .and_then(|id| id.parse().ok()),
        _ => None,
    });
    Some((deleted, first))
}

/// The cut a group at `last_delivered` suffers, given its stream's `XINFO STREAM` reply.
pub fn cut(last_delivered: EntryId, stream_info: &Value) -> Option<Cut> {
    let (deleted, first) = deleted_and_first(stream_info)?;
    (deleted > last_delivered).then_some(Cut {
        after: last_delivered,
        through: deleted,
        first,
        at_least: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(deleted: &str, first: Option<&str>) -> Value {
        let s = |t: &str| Value::BulkString(t.as_bytes().to_vec());
        Value::Array(vec![
            s("length"),
            Value::Int(3),
            s("max-deleted-entry-id"),
            s(deleted),
            s("first-entry"),
            match first {
                Some(id) => Value::Array(vec![s(id), Value::Array(vec![s("f"), s("v")])]),
                None => Value::Nil,
            },
        ])
    }

    #[test]
    fn a_deletion_past_the_groups_position_is_a_cut() {
        let at = |s: &str| s.parse::<EntryId>().unwrap();
        assert_eq!(
            cut(at("5-0"), &info("9-0", Some("10-0"))),
            Some(Cut {
                after: at("5-0"),
                through: at("9-0"),
                first: Some(at("10-0")),
                at_least: None,
            })
        );
        assert_eq!(
            cut(at("9-0"), &info("9-0", Some("10-0"))),
            None,
            "read, then trimmed"
        );
        assert_eq!(cut(at("5-0"), &info("0-0", None)), None);
        assert_eq!(cut(at("5-0"), &Value::Nil), None);
        assert_eq!(
            cut(at("5-0"), &info("9-0", None)).unwrap().to_string(),
            "ids after 5-0 through 9-0"
        );
        // A trim: 901 entries unread by the count, 300 left.
        let t = trimmed(at("100-0"), 901, 300, Some(at("702-0"))).unwrap();
        assert_eq!(
            t.to_string(),
            "at least 601 entries after 100-0 and before 702-0"
        );
        assert_eq!(t.through, at("701-18446744073709551615"));
        assert_eq!(trimmed(at("100-0"), 300, 300, Some(at("702-0"))), None);
    }
}
