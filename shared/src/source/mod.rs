//! The source stage: one consumer in one consumer group, reading batches from one or many
//! streams, on one Redis server or a Redis Cluster. One file per job: `discover` (which streams),
//! `groups` (the consumer group on each), `read` (a reader: own pending entries first, then new
//! ones, in slices), `reclaim` (idle pending entries of any consumer), `nodes` (a cluster's
//! readers).
//!
//! On one server, one reader reads every stream. On a cluster, each master that serves consumed
//! streams gets readers of its own, each on a connection of its own and in a task of its own (a
//! blocking read waiting on one master never holds up another's entries, nor the commands the
//! other stages send), reading per hash slot (Redis refuses one command over keys of several
//! slots). Streams go to readers by the slot map; a `MOVED` (a reshard), a master that stops
//! answering (a failover) or `CLUSTERDOWN` re-reads the map and re-plans the readers. Entries are
//! never skipped: a reader reads from its group's position on the master that serves the stream
//! now, and what a failed master delivered but could not replicate is delivered again.

pub(crate) mod discover;
pub(crate) mod entry;
pub(crate) mod groups;
pub(crate) mod identity;
pub(crate) mod lag;
pub(crate) mod nodes;
pub(crate) mod read;
pub(crate) mod read_conn;
pub(crate) mod reclaim;
pub(crate) mod reply;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use crate::runtime::config::Tuning;
use crate::runtime::conn::Conn;
use crate::runtime::health::Health;
use crate::source::entry::{Entry, EntryId, ReplyError};
use crate::source::nodes::ClusterReaders;
use crate::source::read::{Consumer, NodeReader};
use crate::source::read_conn::{ReadConn, ReadError};

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

    /// Whether the cluster's slot map may have changed under the read: a slot moved (`MOVED`,
    /// `ASK`), the cluster is failing over (`CLUSTERDOWN`, `TRYAGAIN`), or a node does not answer.
    pub fn may_have_moved(&self) -> bool {
        matches!(
            self.code(),
            Some("MOVED" | "ASK" | "CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN" | "READONLY")
        ) || matches!(
            self,
            SourceError::Read(
                ReadError::Connect { .. }
                    | ReadError::Io(_)
                    | ReadError::Timeout(_)
                    | ReadError::Closed
                    | ReadError::Sentinel(_)
            )
        ) || matches!(self, SourceError::Redis(e) if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal())
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

/// Reads batches for one consumer of one group.
pub struct Source {
    who: Arc<Consumer>,
    specs: Vec<StreamSpec>,
    /// Everything but the reads (group creation, discovery, XPENDING).
    conn: Conn,
    health: Arc<Health>,
    resume_from: ResumeFrom,
    /// The streams consumed, sorted.
    streams: Vec<Arc<str>>,
    labels: StreamLabels,
    /// Streams whose group is missing and could not be created yet: when to try again, and why.
    missing: BTreeMap<Arc<str>, (Instant, String)>,
    next_discovery: Instant,
    /// Keys that are not UTF-8 and were reported once.
    warned: HashSet<Vec<u8>>,
    published: tokio::sync::watch::Sender<Vec<Arc<str>>>,
    readers: Readers,
}

/// Who reads the streams: one reader on one server, readers per master and slot on a cluster.
enum Readers {
    One(Box<NodeReader>),
    Cluster(Box<ClusterReaders>),
}

/// What a source reads, as whom.
pub struct Reading {
    pub group: String,
    pub consumer: String,
    pub specs: Vec<StreamSpec>,
    pub tuning: Tuning,
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
    scan_streams_cmd(cursor, glob).query_async(conn).await
}

/// Every stream key matching `glob`, as raw bytes: on a cluster, on every master (a `SCAN` sees
/// one node's keys). Workers' discovery and fleetctl share it, so both see the same streams.
pub async fn scan_streams(conn: &mut Conn, glob: &str) -> redis::RedisResult<Vec<Vec<u8>>> {
    let nodes = match conn.masters().await? {
        Some(masters) => masters
            .into_iter()
            .map(|m| Some((m.host, m.port)))
            .collect(),
        None => vec![None],
    };
    let mut out = Vec::new();
    for node in nodes {
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = match &node {
                None => scan_streams_page(conn, cursor, glob).await?,
                Some((host, port)) => {
                    conn.on_node(host, *port, &scan_streams_cmd(cursor, glob))
                        .await?
                }
            };
            out.extend(keys);
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(out)
}

/// The `SCAN` of `scan_streams_page`, to send to one node of a cluster.
fn scan_streams_cmd(cursor: u64, glob: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("SCAN");
    cmd.arg(cursor)
        .arg("MATCH")
        .arg(glob)
        .arg("COUNT")
        .arg(1000)
        .arg("TYPE")
        .arg("stream");
    cmd
}
impl Source {
    /// A source whose reads go over `reads` (a connection dedicated to them: they block; on a
    /// cluster, the settings of one per reader) and the rest over `conn`.
    pub fn new(
        reading: Reading,
        reads: ReadConn,
        conn: Conn,
        health: Arc<Health>,
        resume_from: ResumeFrom,
    ) -> Self {
        let who = Arc::new(Consumer {
            group: reading.group,
            consumer: reading.consumer,
            tuning: reading.tuning,
        });
        let labels = StreamLabels::default();
        let readers = if conn.is_cluster() {
            Readers::Cluster(Box::new(ClusterReaders::new(
                reads,
                conn.clone(),
                who.clone(),
                labels.clone(),
            )))
        } else {
            Readers::One(Box::new(NodeReader::new(
                reads,
                conn.clone(),
                who.clone(),
                labels.clone(),
                false,
            )))
        };
        Source {
            who,
            specs: reading.specs,
            conn,
            health,
            resume_from,
            streams: Vec::new(),
            labels,
            missing: BTreeMap::new(),
            next_discovery: Instant::now(),
            warned: HashSet::new(),
            published: tokio::sync::watch::channel(Vec::new()).0,
            readers,
        }
    }

    /// This consumer's name.
    pub fn consumer(&self) -> &str {
        &self.who.consumer
    }

    /// Follows the list of streams consumed, as discovery changes it (for the lag sampler).
    pub fn watch_streams(&self) -> tokio::sync::watch::Receiver<Vec<Arc<str>>> {
        self.published.subscribe()
    }

    /// The metric label of each stream, kept up to date by discovery.
    pub fn labels(&self) -> StreamLabels {
        self.labels.clone()
    }

    /// What `FLEET_STREAMS` names.
    pub(crate) fn specs(&self) -> &[StreamSpec] {
        &self.specs
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
        let readable = self.readable();
        if self.streams.is_empty() {
            // Only globs that match nothing yet: wait as a read would.
            tokio::time::sleep(Duration::from_millis(self.who.tuning.block_ms)).await;
            return Ok(Read::default());
        }
        let (result, slice) = match &mut self.readers {
            Readers::One(reader) => {
                let result = reader.read(&self.streams, &readable).await;
                (result, std::mem::take(&mut reader.last_slice))
            }
            Readers::Cluster(readers) => readers.read(&self.streams, &readable).await,
        };
        match result {
            Err(e) if matches!(e.code(), Some("NOGROUP" | "UNBLOCKED")) => {
                // A group (or its stream) was deleted, before or during the read: find on which
                // of the streams just read, and create it again there, at the checkpoint.
                tracing::warn!(error = %e, group = %self.who.group, "consumer group missing: creating it again");
                self.repair(&slice).await?;
                Ok(Read::default())
            }
            other => other,
        }
    }
}
