//! Handler lanes, and the order per key they keep.
//!
//! A batch's commit in one lane overlaps the next batch's statement in another (measured: +20 % on
//! the persister's drain). Whole batches in lanes would apply two events of one key at once, in
//! either order; so, as Kafka orders a partition, each read is split by ordering key (the event's
//! `key`, else its channel) and every key always goes to the same lane, which applies its parts one
//! after the other: two events of one key are applied in stream order whatever the number of lanes.
//! Copies of one event (a producer's retry) carry its key, so the first copy is applied first and
//! the later ones are duplicates. Only a redelivered entry (held after failures, reclaimed from a
//! consumer that died, or tried alone past `max_deliveries`) can be applied after later events of
//! its key, as a Kafka consumer's retry topic does: see docs/src/semantics.md.

use std::hash::{Hash, Hasher};

use crate::event::ordering_key;
use crate::runtime::config::Tuning;
use crate::source::entry::Entry;

/// How many lanes apply parts at once: `handler_concurrency`, as far as `max_in_flight` holds the
/// parts in the lanes besides the batch being read.
pub(crate) fn lanes(t: &Tuning) -> usize {
    t.handler_concurrency
        .min((t.max_in_flight / t.batch_size).saturating_sub(1))
        .max(1)
}

/// How many parts may wait for each lane: up to 2, within `max_in_flight` (the parts in the lanes
/// and one being acknowledged count too).
pub(crate) fn queue_len(t: &Tuning) -> usize {
    (t.max_in_flight / t.batch_size)
        .saturating_sub(1 + lanes(t))
        .clamp(1, 2)
}

/// The lane of an entry: a hash of its ordering key (`DefaultHasher::new()` has fixed keys: the
/// same key always lands in the same lane).
fn lane_of(entry: &Entry, lanes: usize) -> usize {
    let Some(fields) = &entry.fields else {
        return 0; // deleted while pending: nothing to apply, any lane acknowledges it
    };
    let mut h = std::hash::DefaultHasher::new();
    ordering_key(&entry.stream, fields).hash(&mut h);
    (h.finish() % lanes as u64) as usize
}

/// Splits a read into one part per lane, each in read order.
pub(crate) fn split(entries: Vec<Entry>, lanes: usize) -> Vec<Vec<Entry>> {
    if lanes == 1 {
        return vec![entries];
    }
    let mut parts: Vec<Vec<Entry>> = (0..lanes)
        .map(|_| Vec::with_capacity(entries.len() / lanes + 8))
        .collect();
    for e in entries {
        let lane = lane_of(&e, lanes);
        parts[lane].push(e);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::config::Tuning;
    use crate::stream::{EntryId, Fields};
    use std::sync::Arc;

    fn entry(seq: u64, channel: &str, key: Option<&str>) -> Entry {
        let mut pairs = vec![("v", "1"), ("channel", channel)];
        if let Some(k) = key {
            pairs.push(("key", k));
        }
        Entry {
            stream: Arc::from("events"),
            id: EntryId { ms: 1, seq },
            fields: Some(pairs.into_iter().collect::<Fields>()),
            deliveries: 1,
        }
    }

    #[test]
    fn handler_lanes_fit_in_max_in_flight() {
        let t = Tuning::default();
        assert_eq!((lanes(&t), queue_len(&t)), (2, 2));
        let tight = Tuning {
            max_in_flight: 500,
            ..Tuning::default()
        };
        assert_eq!((lanes(&tight), queue_len(&tight)), (1, 1));
        let three = Tuning {
            max_in_flight: 1500,
            handler_concurrency: 4,
            ..Tuning::default()
        };
        assert_eq!(lanes(&three), 2);
    }

    #[test]
    fn every_key_goes_to_one_lane_in_read_order() {
        let entries: Vec<Entry> = (0..1000)
            .map(|i| {
                let channel = format!("flow.{}.progress", i % 37);
                let key = (i % 5 == 0).then(|| format!("k{}", i % 3));
                entry(i, &channel, key.as_deref())
            })
            .collect();
        let parts = split(entries.clone(), 3);
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 1000);
        assert!(
            parts.iter().all(|p| p.len() > 100),
            "keys spread over the lanes"
        );
        let key = |e: &Entry| ordering_key(&e.stream, e.fields.as_ref().unwrap()).into_owned();
        for (lane, part) in parts.iter().enumerate() {
            assert!(
                part.windows(2).all(|w| w[0].id < w[1].id),
                "read order kept"
            );
            for e in part {
                let k = key(e);
                // No entry of this key is in another lane.
                for (other, p) in parts.iter().enumerate() {
                    if other != lane {
                        assert!(p.iter().all(|o| key(o) != k));
                    }
                }
            }
        }
        assert_eq!(split(entries, 1)[0].len(), 1000);
    }
}
