//! The source stage: one consumer in one consumer group, reading batches from one or many streams.
//!
//! On start the consumer first re-reads its own pending entries (id `0`): they were delivered to
//! it before a crash or restart and never acknowledged. Only then does it read new entries (`>`).
//! Streams are named keys (created with the group, `MKSTREAM`) or glob patterns, rescanned
//! periodically so new streams are picked up without a restart. Dead letter streams never match.
//!
//! Every `claim_interval_ms` the reclaimer takes over entries pending longer than `claim_idle_ms`
//! (XAUTOCLAIM), whichever consumer owns them (a crashed one, or this one for an entry it could
//! not apply), and hands them to the pipeline like new ones, with their delivery count from the
//! pending entry list, so an entry that keeps failing reaches `max_deliveries`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis_protocol::resp2::types::RangeFrame;

use crate::config::Tuning;
use crate::dlq::is_dlq_stream;
use crate::entry::{frame_text, parse_entry_list, parse_read_frame, Entry, EntryId, ReplyError};
use crate::metrics as m;
use crate::read_conn::{ReadConn, ReadError};

/// A failure to read; the pipeline backs off and tries again.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Reply(#[from] ReplyError),
}

impl SourceError {
    /// The error code of an error reply from Redis (`NOGROUP`).
    fn code(&self) -> Option<&str> {
        match self {
            SourceError::Redis(e) => e.code(),
            SourceError::Read(e) => e.code(),
            SourceError::Reply(_) => None,
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
    streams: Vec<Arc<str>>,
    /// Streams whose own pending entries are still being re-read, with the cursor.
    history: HashMap<Arc<str>, EntryId>,
    next_discovery: Instant,
    /// XAUTOCLAIM cursor per stream; a full pass ends when every cursor is back at `0-0`.
    claim_cursors: HashMap<Arc<str>, String>,
    next_claim: Instant,
    published: tokio::sync::watch::Sender<Vec<Arc<str>>>,
}

impl Source {
    /// A source reading on `reads` and managing the group on `conn`; both must be dedicated to
    /// it: its reads block.
    pub fn new(
        reads: ReadConn,
        conn: ConnectionManager,
        group: String,
        consumer: String,
        specs: Vec<StreamSpec>,
        tuning: Tuning,
    ) -> Self {
        Source {
            reads,
            conn,
            group,
            consumer,
            specs,
            tuning,
            streams: Vec::new(),
            history: HashMap::new(),
            next_discovery: Instant::now(),
            claim_cursors: HashMap::new(),
            next_claim: Instant::now(),
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

    /// Finds the streams to consume and makes sure the group exists on each (idempotent).
    pub async fn discover(&mut self) -> Result<(), SourceError> {
        let mut found: Vec<String> = Vec::new();
        let specs = self.specs.clone();
        for spec in &specs {
            match spec {
                StreamSpec::Key(key) => {
                    self.ensure_group(key, true).await?;
                    found.push(key.clone());
                }
                StreamSpec::Glob(glob) => {
                    let mut cursor: u64 = 0;
                    loop {
                        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(glob)
                            .arg("COUNT")
                            .arg(1000)
                            .arg("TYPE")
                            .arg("stream")
                            .query_async(&mut self.conn)
                            .await?;
                        for key in keys {
                            if !is_dlq_stream(&key) && !found.contains(&key) {
                                if !self.streams.iter().any(|s| **s == *key) {
                                    self.ensure_group(&key, false).await?;
                                }
                                found.push(key);
                            }
                        }
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                }
            }
        }
        found.sort();
        found.dedup();
        let known: Vec<Arc<str>> = std::mem::take(&mut self.streams);
        for key in found {
            let stream = match known.iter().find(|s| ***s == *key) {
                Some(s) => s.clone(),
                None => {
                    tracing::info!(stream = %key, group = %self.group, "consuming stream");
                    let s: Arc<str> = Arc::from(key.as_str());
                    self.history.insert(s.clone(), EntryId { ms: 0, seq: 0 });
                    s
                }
            };
            self.streams.push(stream);
        }
        self.history.retain(|k, _| self.streams.contains(k));
        metrics::gauge!(m::STREAMS).set(self.streams.len() as f64);
        self.published.send_replace(self.streams.clone());
        self.next_discovery =
            Instant::now() + Duration::from_millis(self.tuning.discover_interval_ms);
        Ok(())
    }

    async fn ensure_group(&mut self, key: &str, create_stream: bool) -> Result<(), SourceError> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(key)
            .arg(&self.group)
            .arg(self.tuning.start_from.as_id());
        if create_stream {
            cmd.arg("MKSTREAM");
        }
        match cmd.query_async::<()>(&mut self.conn).await {
            Ok(()) => {
                tracing::info!(stream = key, group = %self.group, "consumer group created");
                Ok(())
            }
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The next batch: own pending entries first, then new ones (blocking up to `block_ms`).
    /// An empty batch means nothing arrived in time.
    pub async fn read(&mut self) -> Result<Vec<Entry>, SourceError> {
        if Instant::now() >= self.next_discovery || self.streams.is_empty() {
            self.discover().await?;
            if self.streams.is_empty() {
                // Only globs that match nothing yet: wait as a blocking read would.
                tokio::time::sleep(Duration::from_millis(self.tuning.block_ms)).await;
                return Ok(Vec::new());
            }
        }
        let result = if !self.history.is_empty() {
            self.read_history().await
        } else if Instant::now() >= self.next_claim {
            match self.reclaim().await {
                Ok(claimed) if claimed.is_empty() => self.read_new().await,
                other => other,
            }
        } else {
            self.read_new().await
        };
        match result {
            Err(e) if e.code() == Some("NOGROUP") => {
                // A stream or its group was deleted under us: recreate on the next read.
                tracing::warn!(error = %e, "consumer group missing: rediscovering streams");
                self.next_discovery = Instant::now();
                Ok(Vec::new())
            }
            other => other,
        }
    }

    /// `XREADGROUP GROUP g c COUNT n` for a read over `streams` streams: the batch size is split
    /// across them, so one read stays near `batch_size` entries however many streams there are.
    fn xreadgroup(&self, streams: usize) -> redis::Cmd {
        let count = self.tuning.batch_size.div_ceil(streams.max(1)).max(1);
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        cmd
    }

    async fn read_new(&mut self) -> Result<Vec<Entry>, SourceError> {
        let mut cmd = self.xreadgroup(self.streams.len());
        cmd.arg("BLOCK").arg(self.tuning.block_ms).arg("STREAMS");
        for s in &self.streams {
            cmd.arg(&**s);
        }
        for _ in &self.streams {
            cmd.arg(">");
        }
        let (buf, reply) = self.reads.query(&cmd).await?;
        let mut out = Vec::new();
        for (_, entries) in parse_read_frame(&buf, reply, &self.streams)? {
            out.extend(entries);
        }
        Ok(out)
    }

    async fn read_history(&mut self) -> Result<Vec<Entry>, SourceError> {
        let mut keys: Vec<Arc<str>> = self.history.keys().cloned().collect();
        keys.sort();
        let mut cmd = self.xreadgroup(keys.len());
        cmd.arg("STREAMS");
        for s in &keys {
            cmd.arg(&**s);
        }
        for s in &keys {
            cmd.arg(self.history[s].to_string());
        }
        let (buf, reply) = self.reads.query(&cmd).await?;
        let mut out = Vec::new();
        let mut replied: Vec<Arc<str>> = Vec::new();
        for (stream, mut entries) in parse_read_frame(&buf, reply, &keys)? {
            match entries.last() {
                Some(last) => {
                    self.history.insert(stream.clone(), last.id);
                    self.set_deliveries(&stream, &mut entries).await?;
                    replied.push(stream);
                    out.extend(entries);
                }
                None => {
                    self.history.remove(&stream);
                }
            }
        }
        // Streams absent from the reply have no pending entries left either.
        self.history.retain(|k, _| replied.contains(k));
        if self.history.is_empty() {
            tracing::info!(consumer = %self.consumer, "own pending entries re-read: now reading new entries");
        }
        Ok(out)
    }

    /// One XAUTOCLAIM step on the next stream with a pass in progress. Returns what was claimed
    /// (possibly nothing); when every stream's pass is complete, waits `claim_interval_ms`.
    async fn reclaim(&mut self) -> Result<Vec<Entry>, SourceError> {
        if self.claim_cursors.is_empty() {
            for s in &self.streams {
                self.claim_cursors.insert(s.clone(), "0-0".to_owned());
            }
        }
        let Some(stream) = self
            .streams
            .iter()
            .find(|s| self.claim_cursors.contains_key(*s))
            .cloned()
        else {
            self.claim_cursors.clear();
            self.next_claim = Instant::now() + Duration::from_millis(self.tuning.claim_interval_ms);
            return Ok(Vec::new());
        };
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(&*stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(self.tuning.claim_idle_ms)
            .arg(&self.claim_cursors[&stream])
            .arg("COUNT")
            .arg(self.tuning.batch_size);
        // `[cursor, [entries], [deleted ids]]`, read like XREADGROUP's entries.
        let (buf, reply) = self.reads.query(&cmd).await?;
        let RangeFrame::Array(parts) = reply else {
            return Err(ReplyError("XAUTOCLAIM reply").into());
        };
        let mut parts = parts.into_iter();
        let next = match parts.next() {
            Some(cursor) => String::from_utf8_lossy(frame_text(&buf, &cursor)?).into_owned(),
            None => return Err(ReplyError("XAUTOCLAIM cursor").into()),
        };
        let mut entries =
            parse_entry_list(&buf, &stream, parts.next().unwrap_or(RangeFrame::Null))?;
        if next == "0-0" {
            self.claim_cursors.remove(&stream);
            if self.claim_cursors.is_empty() {
                // The pass is complete: the next one starts after claim_interval_ms.
                self.next_claim =
                    Instant::now() + Duration::from_millis(self.tuning.claim_interval_ms);
            }
        } else {
            self.claim_cursors.insert(stream.clone(), next);
        }
        if !entries.is_empty() {
            tracing::info!(stream = %stream, entries = entries.len(), "reclaimed idle pending entries");
            metrics::counter!(m::RECLAIMED, "stream" => stream.to_string())
                .increment(entries.len() as u64);
            self.set_deliveries(&stream, &mut entries).await?;
        }
        Ok(entries)
    }

    /// Pending entries re-read at start have been delivered before: take their delivery count
    /// from the group's pending entry list.
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
