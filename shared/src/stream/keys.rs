//! The names of the keys the fleet keeps beside a stream, and their hash slots.
//!
//! Every key written beside a stream is the stream's name plus a suffix, so it keeps the stream's
//! Redis Cluster hash tag (`{orders}:events` → `{orders}:events:dlq`): it lives in the stream's
//! slot, on the stream's master, and one script can touch both.

/// Suffix of a dead letter stream.
pub const DLQ_SUFFIX: &str = ":dlq";
/// Suffix of the hash that marks the entries being tried alone after `max_deliveries` (see
/// `pipeline`): one field per entry under trial, removed when it is settled.
pub const TRIALS_SUFFIX: &str = ":trials";

/// The dead letter stream of `stream`.
pub fn dlq_stream(stream: &str) -> String {
    format!("{stream}{DLQ_SUFFIX}")
}

/// Whether `key` is itself a dead letter stream (never consumed by a glob).
pub fn is_dlq_stream(key: &str) -> bool {
    key.ends_with(DLQ_SUFFIX)
}

/// The trial markers of `stream` (a hash; see `pipeline`).
pub fn trials_key(stream: &str) -> String {
    format!("{stream}{TRIALS_SUFFIX}")
}

/// The field of one entry's trial marker: entry ids contain no `:`, so the pair is unambiguous.
pub fn trial_field(group: &str, entry_id: &str) -> String {
    format!("{group}:{entry_id}")
}

/// The hash of the checkpoints of every group of `stream` (workers without PostgreSQL).
pub fn checkpoints_key(stream: &str) -> String {
    format!("{stream}:checkpoints")
}

/// The projector's dedup set of `stream` for `group` and one window `bucket` of event time.
pub fn dedup_key(stream: &str, group: &str, bucket: i64) -> String {
    format!("{stream}:dedup:{group}:{bucket}")
}

/// A key's hash tag as Redis Cluster reads it: what is between its first `{` and the first `}`
/// after it, if that is not empty.
pub fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let len = key[open + 1..].find('}')?;
    (len > 0).then(|| &key[open + 1..open + 1 + len])
}

/// Number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The hash slot of `key`: CRC16 (XMODEM) of its hash tag, or of the whole key without one.
pub fn slot(key: &str) -> u16 {
    let hashed = hash_tag(key).unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(hashed.as_bytes()) % SLOTS
}

/// The shard of an event whose ordering key is `key`, among `shards` (a producer sharding its
/// input over tagged streams, as Kafka partitions by key): CRC16-XMODEM of the key (Redis's own
/// hash, which every Redis client library can compute) modulo the number of shards, so every
/// event of a key goes to one stream and keeps its order.
pub fn shard_of(key: &str, shards: usize) -> usize {
    usize::from(crc16::State::<crc16::XMODEM>::calculate(key.as_bytes())) % shards.max(1)
}

/// The hash tag of shard `index` of `shards`: the first of `index`, `index.1`, `index.2`, …
/// whose slot lies in the shard's share of the 16 384 slots, so that N shards spread over the
/// masters of a cluster whose slots are split evenly (`redis-cli --cluster create`): one shard
/// per master when N is the number of masters (`{0}`, `{1}`, `{2}` alone do not: two of them share
/// a master of three).
pub fn shard_tag(index: usize, shards: usize) -> String {
    let shards = shards.max(1);
    let per = f64::from(SLOTS) / shards as f64;
    let (low, high) = (
        (index as f64 * per) as u16,
        ((index + 1) as f64 * per) as u16,
    );
    (0..)
        .map(|j| {
            if j == 0 {
                index.to_string()
            } else {
                format!("{index}.{j}")
            }
        })
        .find(|tag| (low..high.max(low + 1)).contains(&slot(&format!("{{{tag}}}"))))
        .expect("every range of slots has a tag")
}

/// The stream of shard `index` of `shards` named after `prefix`: `<prefix>:{<shard_tag>}`.
pub fn shard_stream(prefix: &str, index: usize, shards: usize) -> String {
    format!("{prefix}:{{{}}}", shard_tag(index, shards))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_beside_a_stream_keep_its_hash_slot() {
        let stream = "{orders}:events";
        for key in [
            dlq_stream(stream),
            trials_key(stream),
            checkpoints_key(stream),
            dedup_key(stream, "projector", 5_900_000),
        ] {
            assert_eq!(slot(&key), slot(stream), "{key}");
        }
        assert!(is_dlq_stream(&dlq_stream(stream)));
    }

    #[test]
    fn slots_are_redis_clusters() {
        // Values from the Redis Cluster specification (`CLUSTER KEYSLOT foo` is 12182).
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("user1000"));
        assert_eq!(slot("user1000"), 3443);
        assert_eq!(slot("somekey"), 11058);
        assert_eq!(
            slot("{}foo"),
            slot("{}foo"),
            "an empty tag hashes the whole key"
        );
        assert_eq!(hash_tag("{}foo"), None);
        assert_eq!(hash_tag("a{b}c{d}"), Some("b"));
        assert_eq!(hash_tag("a{b"), None);
    }

    #[test]
    fn shards_spread_over_equal_shares_of_the_slots_and_keep_a_key_on_one() {
        for n in [1, 2, 3, 4, 8, 16] {
            let share = usize::from(SLOTS) / n;
            for i in 0..n {
                let s = slot(&shard_stream("events", i, n)) as usize;
                assert!(
                    s / share.max(1) == i || (i == n - 1 && s >= i * share),
                    "shard {i} of {n}: slot {s}"
                );
            }
        }
        assert_eq!(shard_stream("events", 0, 1), "events:{0}");
        assert_eq!(shard_of("flow.7f3c", 4), shard_of("flow.7f3c", 4));
        assert!(shard_of("anything", 3) < 3);
    }
}
