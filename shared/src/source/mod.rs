//! The source stage: one consumer in one consumer group, reading batches from one or many streams.
//!
//! On start the consumer first re-reads its own pending entries (id `0`): they were delivered to
//! it before a crash or restart and never acknowledged. Only then does it read new entries (`>`).
//! Streams are named keys (created with the group, `MKSTREAM`) or glob patterns, rescanned
//! periodically so new streams are picked up without a restart. Dead letter streams never match.
//!
//! A group is created only where it is missing (creating one needs memory, which a Redis at
//! `maxmemory` refuses, while reading does not). A group that disappears (`XGROUP DESTROY`, or a
//! stream deleted or expired and written again) is found by the `NOGROUP` of the next read and
//! created again where the stream's checkpoint says, not from the start, so that nothing settled
//! is delivered again; until then the worker is not ready and the other streams keep flowing.
//!
//! The cost of a read must not grow with the number of streams: up to `streams_per_read` streams
//! are read with one blocking XREADGROUP; beyond, reads poll rotating slices of that many streams
//! (non-blocking), and a round over all of them starts at most every `poll_interval_ms` unless the
//! last round filled a batch. A batch never exceeds `batch_size` entries, nor, when entries are
//! large, about `READ_BUDGET` bytes: 500 entries of 1 MiB would be a 500 MiB reply.
//!
//! Every `claim_interval_ms` the reclaimer takes over entries pending longer than `claim_idle_ms`
//! (XAUTOCLAIM, one pipelined round trip per slice of streams), whichever consumer owns them (a
//! crashed one, or this one for an entry it could not apply), and hands them to the pipeline like
//! new ones, with their delivery count from the pending entry list, so an entry that keeps failing
//! reaches `max_deliveries`.

pub(crate) mod entry;
pub(crate) mod identity;
pub(crate) mod lag;
pub(crate) mod read_conn;
pub(crate) mod reply;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use redis::aio::ConnectionManager;
use redis::{RedisResult, Value};

use crate::runtime::config::Tuning;
use crate::runtime::health::{Fault, Health};
use crate::runtime::metrics as m;
use crate::source::entry::{
    frame_text, parse_entry_list, parse_read_frame, Entry, EntryId, ReplyBuf, ReplyError,
};
use crate::source::read_conn::{ReadConn, ReadError};
use crate::source::reply::Frame;
use crate::stream::keys::is_dlq_stream;

/// A failure to read; the pipeline backs off and tries again.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Reply(#[from] ReplyError),
    /// Where a group must start could not be read (the checkpoint store is down).
    #[error("reading the checkpoint of {stream}: {error}")]
    Checkpoint { stream: Arc<str>, error: String },
}

impl SourceError {
    /// The error code of an error reply from Redis (`NOGROUP`).
    pub fn code(&self) -> Option<&str> {
        match self {
            SourceError::Redis(e) => e.code(),
            SourceError::Read(e) => e.code(),
            SourceError::Reply(_) | SourceError::Checkpoint { .. } => None,
        }
    }
}

/// One `FLEET_STREAMS` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamSpec {
    /// A stream key, created if missing.
    Key(String),
    /// A glob (`*`, `?`, `[`), matched with SCAN against existing streams.
    Glob(String),
}

impl StreamSpec {
    /// Reads one comma-separated item.
    pub fn parse(s: &str) -> StreamSpec {
        if s.contains(['*', '?', '[']) {
            StreamSpec::Glob(s.to_owned())
        } else {
            StreamSpec::Key(s.to_owned())
        }
    }

    /// The item as written: the `stream` label of the metrics of every stream it matches, so
    /// that the number of series stays bounded by the configuration, not by the streams.
    pub fn as_str(&self) -> &str {
        match self {
            StreamSpec::Key(s) | StreamSpec::Glob(s) => s,
        }
    }
}

/// The `FLEET_STREAMS` item each stream was found by: the `stream` label of its metrics.
#[derive(Debug, Clone, Default)]
pub struct StreamLabels(Arc<RwLock<HashMap<Arc<str>, Arc<str>>>>);

impl StreamLabels {
    /// The label of `stream` (the stream itself if unknown).
    pub fn of(&self, stream: &Arc<str>) -> Arc<str> {
        self.0
            .read()
            .expect("labels lock")
            .get(stream)
            .cloned()
            .unwrap_or_else(|| stream.clone())
    }

    fn set(&self, stream: &Arc<str>, label: &Arc<str>) {
        self.0
            .write()
            .expect("labels lock")
            .insert(stream.clone(), label.clone());
    }

    fn retain(&self, streams: &[Arc<str>]) {
        self.0
            .write()
            .expect("labels lock")
            .retain(|k, _| streams.binary_search(k).is_ok());
    }
}

/// Where a consumer group that has to be created starts: the stream's checkpoint, if the worker
/// keeps checkpoints. An error means it cannot be known now (the store is down): the group is not
/// created until it can be.
pub type ResumeFrom =
    Arc<dyn Fn(Arc<str>) -> BoxFuture<'static, Result<Option<EntryId>, String>> + Send + Sync>;

/// What one read brought.
#[derive(Debug, Default)]
pub struct Read {
    pub entries: Vec<Entry>,
    /// Taken over from idle pending entries (XAUTOCLAIM): some may still be in flight here.
    pub reclaimed: bool,
}

/// A polling round over the slices of the streams (when there are more than one read takes).
#[derive(Debug)]
struct Round {
    /// Index of the next stream to read.
    cursor: usize,
    started: Instant,
    /// Whether the round filled a batch (then the next round need not wait).
    filled: bool,
}

/// Reads batches for one consumer of one group.
pub struct Source {
    /// The commands that return entries (XREADGROUP, XAUTOCLAIM): large replies.
    reads: ReadConn,
    /// Everything else (group creation, discovery, XPENDING).
    conn: ConnectionManager,
    group: String,
    consumer: String,
    specs: Vec<StreamSpec>,
    tuning: Tuning,
    health: Arc<Health>,
    resume_from: ResumeFrom,
    /// The streams consumed, sorted.
    streams: Vec<Arc<str>>,
    labels: StreamLabels,
    /// Streams whose group is missing and could not be created yet: when to try again, and why.
    missing: BTreeMap<Arc<str>, (Instant, String)>,
    /// Streams whose own pending entries are still being re-read, with the cursor.
    history: BTreeMap<Arc<str>, EntryId>,
    round: Round,
    next_discovery: Instant,
    /// XAUTOCLAIM cursor per stream; a full pass ends when every cursor is back at `0-0`.
    claim_cursors: BTreeMap<Arc<str>, String>,
    next_claim: Instant,
    /// Keys that are not UTF-8 and were reported once.
    warned: HashSet<Vec<u8>>,
    /// The streams named by the last read: where a `NOGROUP` came from.
    last_slice: Vec<Arc<str>>,
    /// Bytes per entry of recent replies (grows at once, shrinks by halves), once known: bounds
    /// reads in bytes.
    entry_bytes: Option<usize>,
    published: tokio::sync::watch::Sender<Vec<Arc<str>>>,
}

/// About how many bytes one read may bring: with large entries, reads take fewer of them (each
/// byte read is held a few times over while in flight: read buffer, batch, statement; measured,
/// 1 MiB keeps a backlog of 1 MB entries under the 64 MiB target).
pub(crate) const READ_BUDGET: usize = 1024 * 1024;

/// One `SCAN` page of the stream keys matching `glob` (`TYPE stream`: keys of other types never
/// come back), as raw bytes: the next cursor (0 at the end) and the keys. Workers' discovery and
/// fleetctl share it, so both see the same streams.
pub async fn scan_streams_page<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    cursor: u64,
    glob: &str,
) -> redis::RedisResult<(u64, Vec<Vec<u8>>)> {
    redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(glob)
        .arg("COUNT")
        .arg(1000)
        .arg("TYPE")
        .arg("stream")
        .query_async(conn)
        .await
}
/// Entries the first read may take, before their size is known.
const FIRST_READ: usize = 1;

/// How long a stream whose group could not be created waits before the next attempt.
const GROUP_RETRY: Duration = Duration::from_secs(1);
/// Most keys reported as not UTF-8 (each once); beyond, they are skipped silently.
const MAX_WARNED_KEYS: usize = 1000;

impl Source {
    /// A source reading on `reads` and managing the group on `conn`; both must be dedicated to
    /// it: its reads block.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        reads: ReadConn,
        conn: ConnectionManager,
        group: String,
        consumer: String,
        specs: Vec<StreamSpec>,
        tuning: Tuning,
        health: Arc<Health>,
        resume_from: ResumeFrom,
    ) -> Self {
        Source {
            reads,
            conn,
            group,
            consumer,
            specs,
            tuning,
            health,
            resume_from,
            streams: Vec::new(),
            labels: StreamLabels::default(),
            missing: BTreeMap::new(),
            history: BTreeMap::new(),
            round: Round {
                cursor: 0,
                started: Instant::now(),
                filled: true,
            },
            next_discovery: Instant::now(),
            claim_cursors: BTreeMap::new(),
            next_claim: Instant::now(),
            warned: HashSet::new(),
            last_slice: Vec::new(),
            entry_bytes: None,
            published: tokio::sync::watch::Sender::new(Vec::new()),
        }
    }

    /// This consumer's name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Follows the list of streams consumed, as discovery changes it (for the lag sampler).
    pub fn watch_streams(&self) -> tokio::sync::watch::Receiver<Vec<Arc<str>>> {
        self.published.subscribe()
    }

    /// The metric label of each stream, kept up to date by discovery.
    pub fn labels(&self) -> StreamLabels {
        self.labels.clone()
    }

    /// Finds the streams to consume; makes sure the group exists on streams not seen before.
    pub async fn discover(&mut self) -> Result<(), SourceError> {
        let mut found: BTreeMap<Arc<str>, Arc<str>> = BTreeMap::new();
        for spec in self.specs.clone() {
            let label: Arc<str> = Arc::from(spec.as_str());
            match &spec {
                StreamSpec::Key(key) => {
                    found.entry(Arc::from(key.as_str())).or_insert(label);
                }
                StreamSpec::Glob(glob) => {
                    for key in self.scan(glob).await? {
                        if !is_dlq_stream(&key) {
                            found
                                .entry(Arc::from(key.as_str()))
                                .or_insert(label.clone());
                        }
                    }
                }
            }
        }
        let known = std::mem::take(&mut self.streams);
        let mut new = Vec::new();
        for (key, label) in &found {
            match known.binary_search(key) {
                Ok(i) => self.streams.push(known[i].clone()),
                Err(_) => {
                    new.push(key.clone());
                    self.streams.push(key.clone());
                }
            }
            self.labels.set(key, label);
        }
        if !new.is_empty() {
            for stream in &new {
                tracing::info!(stream = %stream, group = %self.group, "consuming stream");
                self.history
                    .insert(stream.clone(), EntryId { ms: 0, seq: 0 });
            }
            self.repair(&new).await?;
        }
        let streams = &self.streams;
        self.history.retain(|k, _| streams.binary_search(k).is_ok());
        self.missing.retain(|k, _| streams.binary_search(k).is_ok());
        self.claim_cursors
            .retain(|k, _| streams.binary_search(k).is_ok());
        self.labels.retain(streams);
        self.report_missing();
        metrics::gauge!(m::STREAMS).set(self.streams.len() as f64);
        self.published.send_replace(self.streams.clone());
        self.next_discovery =
            Instant::now() + Duration::from_millis(self.tuning.discover_interval_ms);
        Ok(())
    }

    /// The stream keys matching `glob` (keys that are not UTF-8 are skipped, each reported once).
    async fn scan(&mut self, glob: &str) -> Result<Vec<String>, SourceError> {
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys) = scan_streams_page(&mut self.conn, cursor, glob).await?;
            for key in keys {
                match String::from_utf8(key) {
                    Ok(key) => out.push(key),
                    Err(e) => {
                        let key = e.into_bytes();
                        if self.warned.len() < MAX_WARNED_KEYS && self.warned.insert(key.clone()) {
                            tracing::warn!(key = %String::from_utf8_lossy(&key), glob, "skipping a stream whose name is not UTF-8");
                        }
                    }
                }
            }
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// Makes sure the group exists on each of `keys`, creating it where it is missing (at the
    /// stream's checkpoint if there is one). Streams where it cannot be created now are kept out
    /// of the reads until it can; glob matches whose key is gone are dropped.
    async fn repair(&mut self, keys: &[Arc<str>]) -> Result<(), SourceError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for key in keys {
            pipe.cmd("XINFO").arg("GROUPS").arg(&**key);
        }
        let infos: Vec<RedisResult<Vec<HashMap<String, Value>>>> =
            pipe.query_async(&mut self.conn).await?;
        let mut gone = Vec::new();
        for (key, info) in keys.iter().zip(infos) {
            let exists = match info {
                Ok(groups) => {
                    if groups.iter().any(|g| {
                        matches!(g.get("name"), Some(Value::BulkString(n)) if n == self.group.as_bytes())
                    }) {
                        self.missing.remove(key);
                        continue;
                    }
                    true
                }
                Err(e) if e.to_string().contains("no such key") => false,
                Err(e) => {
                    // E.g. the key holds another type: only an operator can fix it.
                    self.missing
                        .insert(key.clone(), (Instant::now() + GROUP_RETRY, e.to_string()));
                    continue;
                }
            };
            let is_key = self
                .specs
                .iter()
                .any(|s| *s == StreamSpec::Key(key.to_string()));
            if !exists && !is_key {
                gone.push(key.clone());
                continue;
            }
            match self.create_group(key, !exists).await {
                Ok(()) => {
                    self.missing.remove(key);
                    // Creating a group needs memory: Redis has some again.
                    self.health.clear(Fault::RedisOutOfMemory);
                }
                Err(e) => {
                    if e.code() == Some("OOM") {
                        self.health
                            .raise(Fault::RedisOutOfMemory, &"Redis out of memory (maxmemory reached): consumer groups cannot be created");
                    }
                    tracing::debug!(stream = %key, error = %e, "consumer group not created yet");
                    self.missing
                        .insert(key.clone(), (Instant::now() + GROUP_RETRY, e.to_string()));
                }
            }
        }
        if !gone.is_empty() {
            self.streams.retain(|s| !gone.contains(s));
            self.missing.retain(|k, _| !gone.contains(k));
            self.history.retain(|k, _| !gone.contains(k));
            for key in gone {
                tracing::info!(stream = %key, "stream gone: no longer consumed");
            }
        }
        self.report_missing();
        Ok(())
    }

    /// Creates the group on `key` where its checkpoint says (else `start_from`).
    async fn create_group(&mut self, key: &Arc<str>, mkstream: bool) -> Result<(), SourceError> {
        let checkpoint =
            (self.resume_from)(key.clone())
                .await
                .map_err(|error| SourceError::Checkpoint {
                    stream: key.clone(),
                    error,
                })?;
        let start = match checkpoint {
            Some(id) => id.to_string(),
            None => self.tuning.start_from.as_id().to_owned(),
        };
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE").arg(&**key).arg(&self.group).arg(&start);
        if mkstream {
            cmd.arg("MKSTREAM");
        }
        match cmd.query_async::<()>(&mut self.conn).await {
            Ok(()) => {
                let from = if checkpoint.is_some() {
                    "its checkpoint"
                } else {
                    "start_from"
                };
                tracing::info!(stream = %key, group = %self.group, start = %start, from, "consumer group created");
                Ok(())
            }
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Raises or clears the missing-group fault.
    fn report_missing(&self) {
        match self.missing.iter().next() {
            None => self.health.clear(Fault::GroupMissing),
            Some((first, (_, why))) => self.health.raise(
                Fault::GroupMissing,
                &format!(
                    "consumer group {} missing on {} stream(s) and not created yet (first: {first}: {why})",
                    self.group,
                    self.missing.len()
                ),
            ),
        }
    }

    /// The streams that can be read now.
    fn readable(&self) -> Vec<Arc<str>> {
        if self.missing.is_empty() {
            return self.streams.clone();
        }
        self.streams
            .iter()
            .filter(|s| !self.missing.contains_key(*s))
            .cloned()
            .collect()
    }

    /// The next batch: own pending entries first, then idle entries to reclaim when a pass is
    /// due, then new ones (waiting up to `block_ms`). An empty batch means nothing arrived in time.
    pub async fn read(&mut self) -> Result<Read, SourceError> {
        let now = Instant::now();
        if now >= self.next_discovery || self.streams.is_empty() {
            self.discover().await?;
        }
        let due: Vec<Arc<str>> = self
            .missing
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        if !due.is_empty() {
            self.repair(&due).await?;
        }
        let streams = self.readable();
        if streams.is_empty() {
            // Only globs that match nothing yet (or groups not created): wait as a read would.
            tokio::time::sleep(Duration::from_millis(self.tuning.block_ms)).await;
            return Ok(Read::default());
        }
        let result = if !self.history.is_empty() {
            self.read_history().await.map(|entries| Read {
                entries,
                reclaimed: false,
            })
        } else if now >= self.next_claim {
            match self.reclaim(&streams).await {
                Ok(claimed) if claimed.entries.is_empty() => self.read_new(&streams).await,
                Ok(claimed) => Ok(claimed),
                Err(e) => Err(e),
            }
        } else {
            self.read_new(&streams).await
        };
        match result {
            Err(e) if matches!(e.code(), Some("NOGROUP" | "UNBLOCKED")) => {
                // A group (or its stream) was deleted, before or during the read: find on which
                // of the streams just read, and create it again there, at the checkpoint.
                tracing::warn!(error = %e, group = %self.group, "consumer group missing: creating it again");
                let suspects = std::mem::take(&mut self.last_slice);
                self.repair(&suspects).await?;
                Ok(Read::default())
            }
            other => other,
        }
    }

    /// `XREADGROUP GROUP g c COUNT n`.
    fn xreadgroup(&self, count: usize) -> redis::Cmd {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count.max(1));
        cmd
    }

    /// Entries one read may bring: `batch_size`, fewer when entries are large.
    fn budget(&self) -> usize {
        match self.entry_bytes {
            None => FIRST_READ,
            Some(bytes) => READ_BUDGET / bytes.max(1),
        }
        .clamp(1, self.tuning.batch_size)
    }

    /// Learns the size of entries from a reply of `bytes` that brought `entries`.
    fn sized(&mut self, bytes: usize, entries: usize) {
        if let Some(sample) = bytes.checked_div(entries) {
            self.entry_bytes = Some(match self.entry_bytes {
                Some(known) if sample < known => (known + sample) / 2,
                _ => sample,
            });
        }
    }

    /// How many streams one read names.
    fn slice_len(&self) -> usize {
        self.tuning.streams_per_read.min(self.budget()).max(1)
    }

    async fn read_new(&mut self, streams: &[Arc<str>]) -> Result<Read, SourceError> {
        let per_read = self.slice_len();
        if streams.len() <= per_read {
            // Few streams: one blocking read over all of them.
            let mut cmd = self.xreadgroup(self.budget() / streams.len());
            cmd.arg("BLOCK").arg(self.tuning.block_ms);
            return self.read_slice(cmd, streams, ">").await;
        }
        // Many streams: poll rotating slices, a round at most every poll_interval_ms.
        if self.round.cursor == 0 && !self.round.filled {
            let next = self.round.started + Duration::from_millis(self.tuning.poll_interval_ms);
            tokio::time::sleep_until(next.into()).await;
        }
        let mut out = Read::default();
        loop {
            if self.round.cursor >= streams.len() {
                // Discovery dropped streams since the last read: the round is over.
                self.round.cursor = 0;
            }
            if self.round.cursor == 0 {
                self.round.started = Instant::now();
                self.round.filled = false;
            }
            let budget = self.budget().saturating_sub(out.entries.len()).max(1);
            let start = self.round.cursor;
            let end = (start + per_read.min(budget)).min(streams.len());
            let slice = &streams[start..end];
            let cmd = self.xreadgroup(budget / slice.len());
            let read = self.read_slice(cmd, slice, ">").await?;
            out.entries.extend(read.entries);
            self.round.cursor = if end >= streams.len() { 0 } else { end };
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

    async fn read_history(&mut self) -> Result<Vec<Entry>, SourceError> {
        let keys: Vec<Arc<str>> = self
            .history
            .keys()
            .filter(|k| !self.missing.contains_key(*k))
            .take(self.slice_len())
            .cloned()
            .collect();
        if keys.is_empty() {
            self.history.clear();
            return Ok(Vec::new());
        }
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
            tracing::info!(consumer = %self.consumer, "own pending entries re-read: now reading new entries");
        }
        self.sized(buf.len(), out.len());
        Ok(out)
    }

    /// XAUTOCLAIM over the next slices of streams with a pass in progress, one pipelined round
    /// trip per slice, until something is claimed or the pass is complete (then the next pass
    /// starts after `claim_interval_ms`).
    async fn reclaim(&mut self, streams: &[Arc<str>]) -> Result<Read, SourceError> {
        if self.claim_cursors.is_empty() {
            for s in streams {
                self.claim_cursors.insert(s.clone(), "0-0".to_owned());
            }
        }
        loop {
            let slice: Vec<(Arc<str>, String)> = self
                .claim_cursors
                .iter()
                .filter(|(k, _)| !self.missing.contains_key(*k))
                .take(self.slice_len())
                .map(|(k, c)| (k.clone(), c.clone()))
                .collect();
            if slice.is_empty() {
                // The pass is complete: the next one starts after claim_interval_ms.
                self.claim_cursors.clear();
                self.next_claim =
                    Instant::now() + Duration::from_millis(self.tuning.claim_interval_ms);
                return Ok(Read::default());
            }
            let count = (self.budget() / slice.len()).max(1);
            let cmds: Vec<redis::Cmd> = slice
                .iter()
                .map(|(stream, cursor)| {
                    let mut cmd = redis::cmd("XAUTOCLAIM");
                    cmd.arg(&**stream)
                        .arg(&self.group)
                        .arg(&self.consumer)
                        .arg(self.tuning.claim_idle_ms)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(count);
                    cmd
                })
                .collect();
            self.last_slice = slice.iter().map(|(k, _)| k.clone()).collect();
            let replies = self.reads.pipeline(&cmds).await?;
            let reply = ReplyBuf {
                buf: &replies.buf,
                elided: &replies.elided,
            };
            let mut out = Read {
                entries: Vec::new(),
                reclaimed: true,
            };
            for ((stream, _), frame) in slice.iter().zip(replies.frames) {
                // `[cursor, [entries], [deleted ids]]`, read like XREADGROUP's entries.
                let parts = match frame {
                    Frame::Array(parts) => parts,
                    Frame::Error(r) => {
                        return Err(ReadError::Server(
                            String::from_utf8_lossy(&replies.buf[r]).into_owned(),
                        )
                        .into())
                    }
                    _ => return Err(ReplyError("XAUTOCLAIM reply").into()),
                };
                let mut parts = parts.into_iter();
                let next = match parts.next() {
                    Some(cursor) => {
                        String::from_utf8_lossy(frame_text(&replies.buf, &cursor)?).into_owned()
                    }
                    None => return Err(ReplyError("XAUTOCLAIM cursor").into()),
                };
                if next == "0-0" {
                    self.claim_cursors.remove(stream);
                } else {
                    self.claim_cursors.insert(stream.clone(), next);
                }
                let mut entries =
                    parse_entry_list(reply, stream, parts.next().unwrap_or(Frame::Null))?;
                if !entries.is_empty() {
                    tracing::info!(stream = %stream, entries = entries.len(), "reclaimed idle pending entries");
                    metrics::counter!(m::RECLAIMED, "stream" => self.labels.of(stream).to_string())
                        .increment(entries.len() as u64);
                    self.set_deliveries(stream, &mut entries).await?;
                    out.entries.extend(entries);
                }
            }
            self.sized(replies.buf.len(), out.entries.len());
            if !out.entries.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Pending entries re-read at start or reclaimed have been delivered before: take their
    /// delivery count from the group's pending entry list.
    async fn set_deliveries(
        &mut self,
        stream: &str,
        entries: &mut [Entry],
    ) -> Result<(), SourceError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(&self.group)
            .arg(first.id.to_string())
            .arg(last.id.to_string())
            .arg(entries.len())
            .arg(&self.consumer)
            .query_async(&mut self.conn)
            .await?;
        let counts: HashMap<String, u64> = rows.into_iter().map(|(id, _, _, n)| (id, n)).collect();
        for e in entries.iter_mut() {
            e.deliveries = counts.get(&e.id.to_string()).copied().unwrap_or(1);
        }
        Ok(())
    }
}
impl Source {
    /// What `FLEET_STREAMS` names.
    pub(crate) fn specs(&self) -> &[StreamSpec] {
        &self.specs
    }
}
