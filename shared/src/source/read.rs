//! One reader: the reads of a set of streams on one Redis node, on a connection of its own (its
//! reads block). Own pending entries first (id `0`: delivered before a crash or restart and never
//! acknowledged), then, when a reclaim pass is due, idle entries of any consumer (`reclaim`), then
//! new entries (`>`).
//!
//! The cost of a read must not grow with the number of streams: up to `streams_per_read` streams
//! of one slot are read with one blocking XREADGROUP; beyond, or over several slots of a cluster
//! (Redis refuses one command over keys of several slots), reads poll rotating slices of at most
//! that many streams of one slot (non-blocking), and a round over all of them starts at most every
//! `poll_interval_ms` unless the last round filled a batch. A batch never exceeds `batch_size`
//! entries, nor, when entries are large, about `READ_BUDGET` bytes: 500 entries of 1 MiB would be
//! a 500 MiB reply.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::runtime::config::Tuning;
use crate::runtime::conn::Conn;
use crate::source::entry::{parse_read_frame, Entry, EntryId, ReplyBuf};
use crate::source::read_conn::ReadConn;
use crate::source::{Read, SourceError, StreamLabels, READ_BUDGET};
use crate::stream::keys::slot;

/// Entries the first read may take, before their size is known.
const FIRST_READ: usize = 1;

/// A polling round over the slices of the streams (when one read cannot take them all).
#[derive(Debug)]
struct Round {
    /// Index of the next slice to read.
    cursor: usize,
    started: Instant,
    /// Whether the round filled a batch (then the next round need not wait).
    filled: bool,
}

/// Who reads: the group, this consumer, and the tuning.
#[derive(Debug, Clone)]
pub(crate) struct Consumer {
    pub group: String,
    pub consumer: String,
    pub tuning: Tuning,
}

/// The reads of some streams on one node.
pub(crate) struct NodeReader {
    /// The commands that return entries (XREADGROUP, XAUTOCLAIM): large replies.
    pub(crate) reads: ReadConn,
    /// For the pending entry list (delivery counts).
    pub(crate) conn: Conn,
    pub(crate) who: Arc<Consumer>,
    pub(crate) labels: StreamLabels,
    /// Whether one read must name streams of one hash slot only (a cluster).
    by_slot: bool,
    /// The streams given so far: a new one has its own pending entries re-read first.
    known: BTreeSet<Arc<str>>,
    /// Streams whose own pending entries are still being re-read, with the cursor.
    pub(crate) history: BTreeMap<Arc<str>, EntryId>,
    round: Round,
    /// XAUTOCLAIM cursor per stream; a full pass ends when every cursor is back at `0-0`.
    pub(crate) claim_cursors: BTreeMap<Arc<str>, String>,
    pub(crate) next_claim: Instant,
    /// The streams named by the last read: where a `NOGROUP` came from.
    pub(crate) last_slice: Vec<Arc<str>>,
    /// Bytes per entry of recent replies (grows at once, shrinks by halves), once known: bounds
    /// reads in bytes.
    entry_bytes: Option<usize>,
}

impl NodeReader {
    /// A reader on `reads`; `by_slot` on a cluster.
    pub fn new(
        reads: ReadConn,
        conn: Conn,
        who: Arc<Consumer>,
        labels: StreamLabels,
        by_slot: bool,
    ) -> Self {
        NodeReader {
            reads,
            conn,
            who,
            labels,
            by_slot,
            known: BTreeSet::new(),
            history: BTreeMap::new(),
            round: Round {
                cursor: 0,
                started: Instant::now(),
                filled: true,
            },
            claim_cursors: BTreeMap::new(),
            next_claim: Instant::now(),
            last_slice: Vec::new(),
            entry_bytes: None,
        }
    }

    /// The next batch of `assigned` (the streams this reader has, sorted) that it may read now
    /// (`readable`: those whose group exists): own pending entries first, then idle entries to
    /// reclaim when a pass is due, then new ones (waiting up to `block_ms`). An empty batch means
    /// nothing arrived in time.
    pub async fn read(
        &mut self,
        assigned: &[Arc<str>],
        readable: &[Arc<str>],
    ) -> Result<Read, SourceError> {
        self.learn(assigned);
        if readable.is_empty() {
            // Only groups not created yet: wait as a read would.
            tokio::time::sleep(Duration::from_millis(self.who.tuning.block_ms)).await;
            return Ok(Read::default());
        }
        if !self.history.is_empty() {
            return self.read_history(readable).await.map(|entries| Read {
                entries,
                reclaimed: false,
            });
        }
        if Instant::now() >= self.next_claim {
            let claimed = self.reclaim(readable).await?;
            if !claimed.entries.is_empty() {
                return Ok(claimed);
            }
        }
        self.read_new(readable).await
    }

    /// Takes note of the streams given: new ones have their own pending entries re-read first;
    /// those no longer given are forgotten.
    fn learn(&mut self, assigned: &[Arc<str>]) {
        if self.known.len() == assigned.len() && self.known.iter().eq(assigned.iter()) {
            return;
        }
        for stream in assigned {
            if self.known.insert(stream.clone()) {
                self.history
                    .insert(stream.clone(), EntryId { ms: 0, seq: 0 });
            }
        }
        self.known.retain(|s| assigned.binary_search(s).is_ok());
        let known = &self.known;
        self.history.retain(|k, _| known.contains(k));
        self.claim_cursors.retain(|k, _| known.contains(k));
    }

    /// `XREADGROUP GROUP g c COUNT n`.
    pub(crate) fn xreadgroup(&self, count: usize) -> redis::Cmd {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.who.group)
            .arg(&self.who.consumer)
            .arg("COUNT")
            .arg(count.max(1));
        cmd
    }

    /// Entries one read may bring: `batch_size`, fewer when entries are large.
    pub(crate) fn budget(&self) -> usize {
        match self.entry_bytes {
            None => FIRST_READ,
            Some(bytes) => READ_BUDGET / bytes.max(1),
        }
        .clamp(1, self.who.tuning.batch_size)
    }

    /// Learns the size of entries from a reply of `bytes` that brought `entries`.
    pub(crate) fn sized(&mut self, bytes: usize, entries: usize) {
        if let Some(sample) = bytes.checked_div(entries) {
            self.entry_bytes = Some(match self.entry_bytes {
                Some(known) if sample < known => (known + sample) / 2,
                _ => sample,
            });
        }
    }

    /// How many streams one read names.
    pub(crate) fn slice_len(&self) -> usize {
        self.who.tuning.streams_per_read.min(self.budget()).max(1)
    }

    /// The streams in the order reads take them: by hash slot on a cluster (a read names streams
    /// of one slot), else as given.
    fn ordered<'s>(&self, streams: &'s [Arc<str>]) -> std::borrow::Cow<'s, [Arc<str>]> {
        if !self.by_slot {
            return streams.into();
        }
        let mut by_slot: Vec<(u16, Arc<str>)> =
            streams.iter().map(|s| (slot(s), s.clone())).collect();
        by_slot.sort();
        by_slot
            .into_iter()
            .map(|(_, s)| s)
            .collect::<Vec<_>>()
            .into()
    }

    /// Where the read starting at `start` of `ordered` ends: at most `most` streams, of one slot
    /// on a cluster.
    fn slice_end(&self, ordered: &[Arc<str>], start: usize, most: usize) -> usize {
        let end = (start + most).min(ordered.len());
        if !self.by_slot {
            return end;
        }
        let first = slot(&ordered[start]);
        (start + 1..end)
            .find(|&i| slot(&ordered[i]) != first)
            .unwrap_or(end)
    }

    async fn read_new(&mut self, streams: &[Arc<str>]) -> Result<Read, SourceError> {
        let per_read = self.slice_len();
        let ordered = self.ordered(streams);
        if self.slice_end(&ordered, 0, per_read) == ordered.len() {
            // One read names them all: it blocks until something arrives.
            let mut cmd = self.xreadgroup(self.budget() / ordered.len());
            cmd.arg("BLOCK").arg(self.who.tuning.block_ms);
            return self.read_slice(cmd, &ordered, ">").await;
        }
        // More: poll rotating slices, a round at most every poll_interval_ms.
        if self.round.cursor == 0 && !self.round.filled {
            let next = self.round.started + Duration::from_millis(self.who.tuning.poll_interval_ms);
            tokio::time::sleep_until(next.into()).await;
        }
        let mut out = Read::default();
        loop {
            if self.round.cursor >= ordered.len() {
                // Discovery dropped streams since the last read: the round is over.
                self.round.cursor = 0;
            }
            if self.round.cursor == 0 {
                self.round.started = Instant::now();
                self.round.filled = false;
            }
            let budget = self.budget().saturating_sub(out.entries.len()).max(1);
            let start = self.round.cursor;
            let end = self.slice_end(&ordered, start, per_read.min(budget));
            let slice = &ordered[start..end];
            let cmd = self.xreadgroup(budget / slice.len());
            let read = self.read_slice(cmd, slice, ">").await?;
            out.entries.extend(read.entries);
            self.round.cursor = if end >= ordered.len() { 0 } else { end };
            if out.entries.len() >= self.budget() {
                self.round.filled = true;
                return Ok(out);
            }
            if self.round.cursor == 0 {
                return Ok(out); // the round is over: what it found, or nothing
            }
        }
    }

    /// One XREADGROUP over `slice` from `id` (`>` or an entry id for every stream).
    async fn read_slice(
        &mut self,
        mut cmd: redis::Cmd,
        slice: &[Arc<str>],
        id: &str,
    ) -> Result<Read, SourceError> {
        cmd.arg("STREAMS");
        for s in slice {
            cmd.arg(&**s);
        }
        for _ in slice {
            cmd.arg(id);
        }
        self.last_slice = slice.to_vec();
        let (buf, frame, elided) = self.reads.query(&cmd).await?;
        let reply = ReplyBuf {
            buf: &buf,
            elided: &elided,
        };
        let mut out = Read::default();
        for (_, entries) in parse_read_frame(reply, frame, slice)? {
            out.entries.extend(entries);
        }
        self.sized(buf.len(), out.entries.len());
        Ok(out)
    }

    /// Own pending entries, from each stream's cursor, a slice (of one slot) at a time.
    async fn read_history(&mut self, readable: &[Arc<str>]) -> Result<Vec<Entry>, SourceError> {
        let pending: Vec<Arc<str>> = self
            .history
            .keys()
            .filter(|k| readable.binary_search(k).is_ok())
            .cloned()
            .collect();
        if pending.is_empty() {
            self.history.clear();
            return Ok(Vec::new());
        }
        let ordered = self.ordered(&pending);
        let keys = ordered[..self.slice_end(&ordered, 0, self.slice_len())].to_vec();
        let mut cmd = self.xreadgroup(self.budget() / keys.len());
        cmd.arg("STREAMS");
        for s in &keys {
            cmd.arg(&**s);
        }
        for s in &keys {
            cmd.arg(self.history[s].to_string());
        }
        self.last_slice = keys.clone();
        let (buf, frame, elided) = self.reads.query(&cmd).await?;
        let reply = ReplyBuf {
            buf: &buf,
            elided: &elided,
        };
        let mut out = Vec::new();
        let mut replied: Vec<Arc<str>> = Vec::new();
        for (stream, mut entries) in parse_read_frame(reply, frame, &keys)? {
            if let Some(last) = entries.last() {
                self.history.insert(stream.clone(), last.id);
                self.set_deliveries(&stream, &mut entries).await?;
                replied.push(stream);
                out.extend(entries);
            }
        }
        // Streams of this read with nothing in the reply have no pending entries left.
        for k in &keys {
            if !replied.contains(k) {
                self.history.remove(k);
            }
        }
        if self.history.is_empty() {
            tracing::info!(consumer = %self.who.consumer, "own pending entries re-read: now reading new entries");
        }
        self.sized(buf.len(), out.len());
        Ok(out)
    }
}
