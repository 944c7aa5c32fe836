//! Dead letters (contract section 4): an entry that cannot be applied leaves the pipeline for
//! `<stream>:dlq` with its original fields and a reason, so it never wedges the stream and is
//! never lost.
//!
//! The dead letter stream is the stream's name plus a suffix (`stream::keys`), so it keeps the
//! stream's Redis Cluster hash tag and one script can touch both.

use std::sync::LazyLock;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::event::DlqReason;
use crate::runtime::scripts::Lua;
use crate::source::entry::Entry;
use crate::stream::keys::{dlq_stream, trials_key};

/// The field a redriven entry carries (`fleetctl dlq redrive`): the one group it is for. A dead
/// letter is one group's (`dlq_group`), while the stream it goes back to is read by every group:
/// the other groups acknowledge the entry with no effect (`fleet_events_skipped_total{reason =
/// "other_group"}`), as they already settled the original.
pub const REDRIVE_GROUP_FIELD: &str = "redrive_group";
use crate::stream::fields::TRUNCATED_VALUE_BYTES;
/// At most this many field/value pairs of an entry are copied into its dead letter (a script's
/// arguments are bounded); the rest are counted in `dlq_truncated`.
const MAX_PAIRS: usize = 1000;

/// The keys of `DEAD_LETTER_SCRIPT` for `stream`: the stream, its dead letter stream and its trial
/// markers. Suffixes keep a stream's hash tag (`{orders}:events:dlq`), so on Redis Cluster the
/// script runs in one hash slot when stream names carry a tag (pinned by a test below).
pub fn dead_letter_keys(stream: &str) -> [String; 3] {
    [stream.to_owned(), dlq_stream(stream), trials_key(stream)]
}

/// Writes the dead letters of one stream and acknowledges their entries, in one script, so that:
/// - an entry is acknowledged only once its dead letter exists: if the `XADD` fails (the key
///   holds another type, Redis is out of memory) the script stops before any `XACK`;
/// - a dead letter is written only while its entry is still pending for the group, and the
///   entry is acknowledged in the same step: a retry after a lost reply, or a second consumer
///   that processed the same entry, finds it acknowledged and writes nothing. One dead letter per
///   entry and group, whatever happens.
///
/// KEYS: stream, its dead letter stream, its trial markers. ARGV: group, then per dead letter
/// its entry id, the number of field/value arguments and those arguments. Returns how many dead
/// letters were written.
pub static DEAD_LETTER_SCRIPT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[2] .. ' holds a ' .. kind .. ', not a stream: dead letters cannot be written')
end
local group = ARGV[1]
local written, settled = 0, {}
local i = 2
while i <= #ARGV do
  local id, n = ARGV[i], tonumber(ARGV[i + 1])
  if #redis.call('XPENDING', KEYS[1], group, id, id, 1) == 1 then
    redis.call('XADD', KEYS[2], '*', unpack(ARGV, i + 2, i + 1 + n))
    redis.call('XACK', KEYS[1], group, id)
    written = written + 1
  end
  settled[#settled + 1] = group .. ':' .. id
  i = i + 2 + n
end
redis.call('HDEL', KEYS[3], unpack(settled))
return written
"#,
    )
});

/// The fields of one dead letter: the entry's own, then ours.
pub fn dead_letter_fields(
    entry: &Entry,
    group: &str,
    reason: DlqReason,
    error: &str,
    at: OffsetDateTime,
) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut truncated: Vec<String> = Vec::new();
    let mut size = 0;
    if let Some(fields) = &entry.fields {
        size = fields.byte_size();
        let mut omitted = 0;
        for (i, (k, v)) in fields.iter().enumerate() {
            if i >= MAX_PAIRS {
                omitted += 1;
                continue;
            }
            // The original fields stay unchanged; a field that collides with ours is kept under a
            // prefixed name rather than silently overwritten.
            let name = if k.starts_with(b"dlq_") {
                [b"orig_".as_slice(), k].concat()
            } else {
                k.to_vec()
            };
            let full = fields.value_len(i);
            let value = if reason == DlqReason::TooLarge && full > TRUNCATED_VALUE_BYTES {
                truncated.push(format!("{}={full}", String::from_utf8_lossy(&name)));
                &v[..TRUNCATED_VALUE_BYTES.min(v.len())]
            } else {
                v
            };
            out.push(name);
            out.push(value.to_vec());
        }
        if omitted > 0 {
            truncated.push(format!("{omitted} more fields"));
        }
    }
    let at = at.format(&Rfc3339).unwrap_or_default();
    for (k, v) in [
        ("dlq_reason", reason.as_str().to_owned()),
        ("dlq_error", error.to_owned()),
        ("dlq_stream", entry.stream.to_string()),
        ("dlq_entry_id", entry.id.to_string()),
        ("dlq_group", group.to_owned()),
        ("dlq_deliveries", entry.deliveries.to_string()),
        ("dlq_at", at),
    ] {
        out.push(k.as_bytes().to_vec());
        out.push(v.into_bytes());
    }
    if !truncated.is_empty() {
        out.push(b"dlq_size".to_vec());
        out.push(size.to_string().into_bytes());
        out.push(b"dlq_truncated".to_vec());
        out.push(truncated.join(",").into_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    /// Every key one command or script of the pipeline touches at once, for `stream`: they must
    /// share the stream's hash slot whenever its name carries a hash tag.
    fn keys_together(stream: &str) -> Vec<Vec<String>> {
        vec![
            dead_letter_keys(stream).to_vec(),
            vec![stream.to_owned()], // SAMPLE_SCRIPT, XACK, XAUTOCLAIM, XCLAIM, XPENDING, XINFO
            vec![trials_key(stream)], // HGET/HSET/HDEL/EXPIRE of a trial marker
        ]
    }

    #[test]
    fn keys_written_beside_a_stream_keep_its_hash_tag() {
        for stream in [
            "{orders}:events",
            "{orders}",
            "shop:{7f3c}:events",
            "{a}b{c}",
            "flow:{x}",
        ] {
            let slot = Slot::for_key(stream);
            for keys in keys_together(stream) {
                for key in keys {
                    assert_eq!(
                        Slot::for_key(&key),
                        slot,
                        "{key} is not in the slot of {stream}"
                    );
                }
            }
        }
        // Untagged (or an empty tag: the whole name is hashed), the dead letter stream may land in
        // another slot: on Redis Cluster stream names must carry a tag (docs/src/redis-cluster.md).
        assert_ne!(
            Slot::for_key("orders:events"),
            Slot::for_key(dlq_stream("orders:events"))
        );
        assert_ne!(
            Slot::for_key("{}orders"),
            Slot::for_key(dlq_stream("{}orders"))
        );
    }
    use crate::stream::{EntryId, Fields};
    use std::sync::Arc;

    fn entry(pairs: &[(&str, &str)]) -> Entry {
        Entry {
            stream: Arc::from("{orders}:events"),
            id: EntryId { ms: 5, seq: 1 },
            fields: Some(pairs.iter().copied().collect::<Fields>()),
            deliveries: 2,
        }
    }

    fn as_map(fields: &[Vec<u8>]) -> std::collections::HashMap<String, String> {
        fields
            .chunks(2)
            .map(|p| {
                (
                    String::from_utf8_lossy(&p[0]).into_owned(),
                    String::from_utf8_lossy(&p[1]).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn names_beside_a_stream() {
        assert_eq!(dlq_stream("{orders}:events"), "{orders}:events:dlq");
        assert_eq!(trials_key("{orders}:events"), "{orders}:events:trials");
        assert_eq!(
            crate::stream::keys::trial_field("persister", "5-1"),
            "persister:5-1"
        );
    }

    #[test]
    fn original_fields_travel_unchanged_beside_ours() {
        let at = OffsetDateTime::UNIX_EPOCH;
        let e = entry(&[("v", "1"), ("dlq_reason", "theirs"), ("data", "{}")]);
        let f = as_map(&dead_letter_fields(&e, "g", DlqReason::Invalid, "bad", at));
        assert_eq!(f["v"], "1");
        assert_eq!(f["orig_dlq_reason"], "theirs");
        assert_eq!(f["dlq_reason"], "invalid");
        assert_eq!(f["dlq_entry_id"], "5-1");
        assert_eq!(f["dlq_deliveries"], "2");
        assert_eq!(f["dlq_stream"], "{orders}:events");
        assert!(!f.contains_key("dlq_truncated"));
    }

    #[test]
    fn a_too_large_entry_keeps_its_envelope_and_a_prefix_of_big_values() {
        let big = "x".repeat(TRUNCATED_VALUE_BYTES * 3);
        let e = entry(&[("id", "abc"), ("data", &big)]);
        let f = as_map(&dead_letter_fields(
            &e,
            "g",
            DlqReason::TooLarge,
            "too big",
            OffsetDateTime::UNIX_EPOCH,
        ));
        assert_eq!(f["id"], "abc");
        assert_eq!(f["data"].len(), TRUNCATED_VALUE_BYTES);
        assert_eq!(f["dlq_truncated"], format!("data={}", big.len()));
        assert_eq!(f["dlq_size"], (big.len() + 9).to_string());
    }
}
