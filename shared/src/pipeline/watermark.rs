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
//! flight; idle, it is the last entry settled. A sample that fails is taken again (by the acker,
//! or by the idle lane every few seconds).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use crate::runtime::conn::Conn;
use redis::Value;

use crate::pipeline::handler::Checkpoint;
use crate::runtime::scripts::{query_loading, Lua};
use crate::stream::EntryId;

/// How often a stream's watermark is sampled while its entries are being settled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// KEYS[1] the stream, ARGV[1] the group. Nothing pending: `''` and the group's last delivered id
/// (every entry delivered is settled, whoever read it). Else the oldest pending entry id and, if
/// the stream still holds one, the id of the entry just below it. Read-only (`no-writes`),
/// so Redis runs it at `maxmemory` too; one key, so it runs in the stream's hash slot.
pub(crate) static SAMPLE_SCRIPT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"#!lua flags=no-writes
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
"#,
    )
});

/// The command that samples `stream`'s watermark for `group`.
pub(crate) fn sample_command(stream: &str, group: &str) -> redis::Cmd {
    let mut cmd = SAMPLE_SCRIPT.call();
    cmd.arg(1).arg(stream).arg(group);
    cmd
}

#[derive(Debug, Default)]
struct Mark {
    /// The group's low watermark as last sampled.
    position: Option<EntryId>,
    /// The checkpoint last written by the handler.
    written: Option<EntryId>,
    /// When the last sample was sent.
    sampled: Option<Instant>,
    /// Entries settled since the last sample (or its sample failed).
    dirty: bool,
}

/// The watermarks of this worker's streams, shared by the acker (which samples them) and the
/// handler lanes (which write them as checkpoints).
#[derive(Debug, Clone, Default)]
pub(crate) struct Watermarks {
    marks: Arc<Mutex<HashMap<Arc<str>, Mark>>>,
    /// Signalled when watermarks were sampled while the acker had no more work: an idle worker
    /// writes them at once, so that its checkpoints reach its last settled entries within
    /// milliseconds.
    moved: Arc<tokio::sync::Notify>,
}

impl Watermarks {
    /// Notes that this worker settled entries of `stream` (before the sample that follows their
    /// acknowledgement is sent).
    pub fn settled(&self, stream: &Arc<str>) {
        let mut marks = self.marks.lock().expect("watermarks lock");
        marks.entry(stream.clone()).or_default().dirty = true;
    }

    /// The streams among `streams` settled since their last sample and not sampled in the last
    /// `SAMPLE_EVERY`, marked as sampled.
    pub fn due<'a>(&self, streams: impl Iterator<Item = &'a Arc<str>>) -> Vec<Arc<str>> {
        let now = Instant::now();
        let mut marks = self.marks.lock().expect("watermarks lock");
        let mut due = Vec::new();
        for stream in streams {
            let Some(mark) = marks.get_mut(stream) else {
                continue;
            };
            let recent = mark
                .sampled
                .is_some_and(|at| now.duration_since(at) < SAMPLE_EVERY);
            if mark.dirty && !recent {
                mark.dirty = false;
                mark.sampled = Some(now);
                due.push(stream.clone());
            }
        }
        due
    }

    /// Every stream settled since its last sample, however recent, marked as sampled.
    fn dirty(&self) -> Vec<Arc<str>> {
        let now = Instant::now();
        let mut marks = self.marks.lock().expect("watermarks lock");
        marks
            .iter_mut()
            .filter(|(_, m)| m.dirty)
            .map(|(stream, m)| {
                m.dirty = false;
                m.sampled = Some(now);
                stream.clone()
            })
            .collect()
    }

    /// A sample of `stream` failed (Redis refused, or did not answer): it is taken again later.
    pub fn unsampled(&self, stream: &Arc<str>) {
        if let Some(mark) = self.marks.lock().expect("watermarks lock").get_mut(stream) {
            mark.dirty = true;
        }
    }

    /// Waits until watermarks were sampled with the acker out of work (see `sample_dirty`).
    pub async fn moved(&self) {
        self.moved.notified().await
    }

    /// Samples in one round trip every stream settled since its last sample, then wakes the idle
    /// lane to write what moved. A failure leaves them to be sampled again; meanwhile the
    /// watermarks stay where they were, which is safe.
    pub async fn sample_dirty(&self, conn: &mut Conn, group: &str) {
        let due = self.dirty();
        if due.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for stream in &due {
            pipe.add_command(sample_command(stream, group));
        }
        match query_loading(&pipe, conn, &[&SAMPLE_SCRIPT]).await {
            Ok(results) => {
                for (stream, result) in due.iter().zip(results) {
                    match result {
                        Ok(reply) => self.sampled(stream, &reply),
                        Err(_) => self.unsampled(stream),
                    }
                }
                self.moved.notify_one();
            }
            Err(_) => due.iter().for_each(|s| self.unsampled(s)),
        }
    }

    /// Takes in the reply of `SAMPLE_SCRIPT` for `stream`. A reply it cannot read changes nothing:
    /// the previous watermark is still safe.
    pub fn sampled(&self, stream: &Arc<str>, reply: &Value) {
        let position = match reply {
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
        if let Some(mark) = marks.get_mut(stream) {
            // The latest sample is the truth: the group may have been moved back (a replay).
            mark.position = position;
        }
    }

    /// The checkpoints to write with a part of `streams` (each named once or more): the
    /// watermarks that moved since they were last written.
    pub fn checkpoints<'a>(&self, streams: impl Iterator<Item = &'a Arc<str>>) -> Vec<Checkpoint> {
        let marks = self.marks.lock().expect("watermarks lock");
        let mut out: Vec<Checkpoint> = streams
            .filter_map(|s| marks.get(s).and_then(|m| moved(s, m)))
            .collect();
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
        assert!(w.due([&s].into_iter()).is_empty(), "nothing settled yet");
        w.settled(&s);
        assert_eq!(w.due([&s].into_iter()), std::slice::from_ref(&s));
        // Entry 10-0 is held pending while later ones are settled: the watermark stays below it.
        w.sampled(&s, &ids(&["10-0", "9-3"]));
        let at = |position| {
            [Checkpoint {
                stream: s.clone(),
                position,
            }]
        };
        assert_eq!(w.checkpoints([&s, &s].into_iter()), at(id(9, 3)));
        w.written(&w.checkpoints([&s].into_iter()));
        assert!(
            w.checkpoints([&s].into_iter()).is_empty(),
            "written: not again"
        );
        assert!(w.unwritten().is_empty());

        // Sampled again only once SAMPLE_EVERY has passed, unless the acker is out of work.
        w.settled(&s);
        assert!(w.due([&s].into_iter()).is_empty());
        assert_eq!(w.dirty(), std::slice::from_ref(&s));
        // Nothing below the oldest pending entry is stored any more (trimmed).
        w.sampled(&s, &ids(&["20-0"]));
        assert_eq!(w.unwritten(), at(id(19, u64::MAX)));

        // Nothing pending: the group's last delivered id.
        w.sampled(&s, &ids(&["", "70-1"]));
        assert_eq!(w.unwritten(), at(id(70, 1)));

        // A reply it cannot read keeps the last watermark; a failed sample is taken again.
        w.sampled(&s, &Value::Nil);
        w.sampled(&s, &Value::Okay);
        assert_eq!(w.unwritten(), at(id(70, 1)));
        assert!(w.dirty().is_empty());
        w.unsampled(&s);
        assert_eq!(w.dirty(), std::slice::from_ref(&s));
        assert_eq!(before(id(0, 0)), None);
    }
}
