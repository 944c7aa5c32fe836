//! Checkpoints that are safe resume points: per stream and group, the group's low watermark, the
//! highest entry id at or below which every entry delivered to the group is settled (applied,
//! skipped or dead-lettered), never the highest id read.
//!
//! Redis already knows which entries are unsettled: the group's pending entry list holds every
//! entry delivered and not acknowledged, and an entry is acknowledged only once settled. Held
//! entries, entries in another lane, entries owned by another consumer or by one that died are
//! all in it. So after acknowledging, the acker asks Redis for the oldest pending entry (one
//! read-only script per stream, in the same round trip) and the watermark is the entry just below
//! it; with nothing pending, it is the highest id this worker settled. A watermark stays safe
//! however old it gets (entries delivered later have higher ids than any pending now), so it is
//! sampled at most every `SAMPLE_EVERY` per stream, and once more when the acker runs out of work.
//! A handler writes the watermark with the effects of its next batch; once the acker runs out of
//! work, the first lane writes the ones still unwritten at once (`unwritten`), like a Kafka
//! consumer's commit: under load the checkpoint trails the acknowledgements by the parts in
//! flight; idle, it is the last entry settled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::Value;

use crate::pipeline::handler::Checkpoint;
use crate::source::entry::EntryId;

/// How often a stream's watermark is sampled while its entries are being settled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// KEYS[1] the stream, ARGV[1] the group. Nothing pending: `''` and the group's last delivered id
/// (every entry delivered is settled, whoever read it). Else the oldest pending entry id and, if
/// the stream still holds one, the id of the entry just below it. Read-only (`no-writes`),
/// so Redis runs it at `maxmemory` too; one key, so it runs in the stream's hash slot.
pub(crate) const SAMPLE_SCRIPT: &str = r#"#!lua flags=no-writes
local p = redis.call('XPENDING', KEYS[1], ARGV[1])
if p[1] == 0 then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f['name'] == ARGV[1] then return {'', f['last-delivered-id']} end
  end
  return false
end
local below = redis.call('XREVRANGE', KEYS[1], '(' .. p[2], '-', 'COUNT', 1)
if #below == 0 then return {p[2]} end
return {p[2], below[1][1]}
"#;

/// The command that samples `stream`'s watermark for `group`.
pub(crate) fn sample_command(stream: &str, group: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(SAMPLE_SCRIPT).arg(1).arg(stream).arg(group);
    cmd
}

#[derive(Debug, Default)]
struct Mark {
    /// The group's low watermark as last sampled.
    position: Option<EntryId>,
    /// The highest id this worker has settled: the watermark when nothing is pending.
    settled: Option<EntryId>,
    /// The checkpoint last written by the handler.
    written: Option<EntryId>,
    /// When the last sample was sent.
    sampled: Option<Instant>,
    /// Entries settled since the last sample.
    dirty: bool,
}

/// The watermarks of this worker's streams, shared by the acker (which samples them) and the
/// handler lanes (which write them as checkpoints).
#[derive(Debug, Clone, Default)]
pub(crate) struct Watermarks {
    marks: Arc<Mutex<HashMap<Arc<str>, Mark>>>,
    /// Signalled when the acker, out of work, sampled watermarks that moved: an idle worker writes
    /// them at once, so that its checkpoints reach its last settled entries within milliseconds.
    moved: Arc<tokio::sync::Notify>,
}

/// A stream to sample, and the watermark to take if nothing is pending.
#[derive(Debug)]
pub(crate) struct Due {
    pub stream: Arc<str>,
    pub settled: Option<EntryId>,
}

impl Watermarks {
    /// Notes that this worker settled entries of `stream` up to `highest` (before the sample that
    /// follows their acknowledgement is sent).
    pub fn settled(&self, stream: &Arc<str>, highest: EntryId) {
        let mut marks = self.marks.lock().expect("watermarks lock");
        let mark = marks.entry(stream.clone()).or_default();
        mark.settled = mark.settled.max(Some(highest));
        mark.dirty = true;
    }

    /// The streams among `streams` to sample now (`all`: every stream settled since its last
    /// sample, however recent), marked as sampled.
    pub fn due<'a>(&self, streams: impl Iterator<Item = &'a Arc<str>>, all: bool) -> Vec<Due> {
        let now = Instant::now();
        let mut marks = self.marks.lock().expect("watermarks lock");
        let mut due: Vec<Due> = Vec::new();
        for stream in streams {
            let Some(mark) = marks.get_mut(stream) else {
                continue;
            };
            let recent = mark
                .sampled
                .is_some_and(|at| now.duration_since(at) < SAMPLE_EVERY);
            if mark.dirty && (all || !recent) {
                mark.dirty = false;
                mark.sampled = Some(now);
                due.push(Due {
                    stream: stream.clone(),
                    settled: mark.settled,
                });
            }
        }
        due
    }

    /// Tells the idle lane that watermarks moved.
    pub fn notify_moved(&self) {
        self.moved.notify_one();
    }

    /// Waits until the acker says watermarks moved (see `notify_moved`).
    pub async fn moved(&self) {
        self.moved.notified().await
    }

    /// Samples in one round trip every stream settled since its last sample (`every`: every
    /// stream this worker settled entries of), and tells the idle lane. A failure is not retried:
    /// the watermarks stay where they were, which is safe.
    pub async fn sample_now(&self, conn: &mut ConnectionManager, group: &str, every: bool) {
        let due: Vec<Due> = {
            let now = Instant::now();
            let mut marks = self.marks.lock().expect("watermarks lock");
            marks
                .iter_mut()
                .filter(|(_, m)| every || m.dirty)
                .map(|(stream, m)| {
                    m.dirty = false;
                    m.sampled = Some(now);
                    Due {
                        stream: stream.clone(),
                        settled: m.settled,
                    }
                })
                .collect()
        };
        if due.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for d in &due {
            pipe.add_command(sample_command(&d.stream, group));
        }
        if let Ok(results) = pipe
            .query_async::<Vec<redis::RedisResult<Value>>>(conn)
            .await
        {
            for (d, result) in due.iter().zip(results) {
                if let Ok(reply) = result {
                    self.sampled(d, &reply);
                }
            }
            self.notify_moved();
        }
    }

    /// Takes in the reply of `SAMPLE_SCRIPT` for `due`. A reply it cannot read changes nothing (nor
    /// does an error, which the acker does not pass on): the previous watermark is still safe.
    pub fn sampled(&self, due: &Due, reply: &Value) {
        let position = match reply {
            Value::Nil => due.settled,
            Value::Array(ids) => {
                let id = |i: usize| match ids.get(i) {
                    Some(Value::BulkString(b)) => std::str::from_utf8(b)
                        .ok()
                        .and_then(|s| s.parse::<EntryId>().ok()),
                    _ => None,
                };
                match (id(0), id(1)) {
                    (_, Some(below)) => Some(below),
                    (Some(oldest), None) => before(oldest),
                    (None, None) => return,
                }
            }
            _ => return,
        };
        let mut marks = self.marks.lock().expect("watermarks lock");
        if let Some(mark) = marks.get_mut(&due.stream) {
            // The latest sample is the truth: the group may have been moved back (a replay).
            mark.position = position;
        }
    }

    /// The checkpoints to write with a batch of `streams`: the watermarks that moved since they
    /// were last written.
    pub fn checkpoints<'a>(&self, streams: impl Iterator<Item = &'a Arc<str>>) -> Vec<Checkpoint> {
        let marks = self.marks.lock().expect("watermarks lock");
        let mut out: Vec<Checkpoint> = Vec::new();
        for stream in streams {
            if out.last().is_some_and(|c| c.stream == *stream) {
                continue;
            }
            if let Some(c) = marks.get(stream).and_then(|m| moved(stream, m)) {
                out.push(c);
            }
        }
        out.sort_by(|a, b| a.stream.cmp(&b.stream));
        out.dedup_by(|a, b| a.stream == b.stream);
        out
    }

    /// Every watermark that moved since it was last written (for an idle worker to write).
    pub fn unwritten(&self) -> Vec<Checkpoint> {
        let marks = self.marks.lock().expect("watermarks lock");
        let mut out: Vec<Checkpoint> = marks.iter().filter_map(|(s, m)| moved(s, m)).collect();
        out.sort_by(|a, b| a.stream.cmp(&b.stream));
        out
    }

    /// Notes that the handler made `checkpoints` durable.
    pub fn written(&self, checkpoints: &[Checkpoint]) {
        let mut marks = self.marks.lock().expect("watermarks lock");
        for c in checkpoints {
            if let Some(mark) = marks.get_mut(&c.stream) {
                mark.written = mark.written.max(Some(c.position));
            }
        }
    }

    /// Forgets the streams no longer read (deleted, or out of a glob's reach).
    pub fn retain(&self, streams: &[Arc<str>]) {
        let mut marks = self.marks.lock().expect("watermarks lock");
        marks.retain(|s, _| streams.binary_search(s).is_ok());
    }
}

/// The checkpoint of a mark whose watermark moved past the one written.
fn moved(stream: &Arc<str>, m: &Mark) -> Option<Checkpoint> {
    let position = m.position?;
    (Some(position) > m.written).then(|| Checkpoint {
        stream: stream.clone(),
        position,
    })
}

/// The highest possible id below `id` (when no entry below it is stored any more).
fn before(id: EntryId) -> Option<EntryId> {
    match id {
        EntryId { ms: 0, seq: 0 } => None,
        EntryId { ms, seq: 0 } => Some(EntryId {
            ms: ms - 1,
            seq: u64::MAX,
        }),
        EntryId { ms, seq } => Some(EntryId { ms, seq: seq - 1 }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64, seq: u64) -> EntryId {
        EntryId { ms, seq }
    }

    fn ids(list: &[&str]) -> Value {
        Value::Array(
            list.iter()
                .map(|s| Value::BulkString(s.as_bytes().to_vec()))
                .collect(),
        )
    }

    #[test]
    fn the_watermark_is_the_entry_below_the_oldest_pending_one() {
        let w = Watermarks::default();
        let s: Arc<str> = Arc::from("{orders}:events");
        assert!(
            w.due([&s].into_iter(), true).is_empty(),
            "nothing settled yet"
        );
        w.settled(&s, id(50, 0));
        let due = w.due([&s].into_iter(), false);
        assert_eq!(due.len(), 1);
        // Entry 10-0 is held pending while 11-0..50-0 are settled: the watermark stays below it.
        w.sampled(&due[0], &ids(&["10-0", "9-3"]));
        assert_eq!(
            w.checkpoints([&s, &s].into_iter()),
            [Checkpoint {
                stream: s.clone(),
                position: id(9, 3)
            }]
        );
        w.written(&w.checkpoints([&s].into_iter()));
        assert!(
            w.checkpoints([&s].into_iter()).is_empty(),
            "written: not again"
        );
        assert!(w.unwritten().is_empty());

        // Sampled again only once SAMPLE_EVERY has passed, unless the acker is idle.
        w.settled(&s, id(60, 0));
        assert!(w.due([&s].into_iter(), false).is_empty());
        let due = w.due([&s].into_iter(), true);
        // Nothing below the oldest pending entry is stored any more (trimmed).
        w.sampled(&due[0], &ids(&["20-0"]));
        assert_eq!(
            w.unwritten(),
            [Checkpoint {
                stream: s.clone(),
                position: id(19, u64::MAX)
            }]
        );

        // Nothing pending: the highest id this worker settled.
        w.settled(&s, id(70, 1));
        let due = w.due([&s].into_iter(), true);
        w.sampled(&due[0], &Value::Nil);
        assert_eq!(w.unwritten()[0].position, id(70, 1));

        // A reply it cannot read keeps the last watermark (errors never reach it: see the acker).
        w.settled(&s, id(80, 0));
        let due = w.due([&s].into_iter(), true);
        w.sampled(&due[0], &Value::Okay);
        assert_eq!(w.unwritten()[0].position, id(70, 1));
        assert_eq!(before(id(0, 0)), None);
    }
}
