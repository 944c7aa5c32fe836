//! The one thing a worker brings to the pipeline: a [`Handler`] that applies a batch's effects.
//!
//! A handler only applies effects and reports what it did. It never acknowledges, retries,
//! sleeps for backpressure, dead-letters or counts metrics: the pipeline does all of that around
//! it, identically for every worker.

use std::future::Future;
use std::sync::Arc;

use crate::event::Event;
use crate::runtime::config::Route;
use crate::stream::EntryId;

/// A valid, routed event and where it came from.
#[derive(Debug, Clone, Copy)]
pub struct Routed<'a> {
    pub event: &'a Event<'a>,
    pub route: &'a Route,
    pub stream: &'a Arc<str>,
    pub entry_id: EntryId,
}

/// The highest entry id of a stream covered by a batch: where a replay would resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub stream: Arc<str>,
    pub position: EntryId,
}

/// What the handler is asked to apply. Its effects and the checkpoints must be made durable
/// together (e.g. one PostgreSQL transaction), or not at all.
#[derive(Debug)]
pub struct Batch<'a> {
    /// The consumer group, part of the checkpoint key.
    pub group: &'a str,
    /// The consumer reading it: a sink that acknowledges ([`Handler::ACKNOWLEDGES`]) puts an entry
    /// it acknowledged but then could not apply back in the pending list under this name.
    pub consumer: &'a str,
    /// Events to apply, in stream order per stream; ids are unique within the batch.
    pub events: Vec<Routed<'a>>,
    /// One per stream read in this batch, including streams whose entries were all skipped.
    pub checkpoints: Vec<Checkpoint>,
}

/// What a successful apply did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Events whose effect was made now.
    pub applied: usize,
    /// Events whose effect already existed (their id was seen before): no second effect.
    pub duplicates: usize,
    /// Events this handler has nothing to do for (e.g. a non-strict route in the persister).
    pub skipped: usize,
    /// Events the sink cannot apply, found without failing the batch (e.g. a key template that
    /// needs a `data` field the event lacks): left unapplied and unacknowledged, the rest applied.
    /// The pipeline dead-letters them (`handler_error`) with the error given.
    pub rejected: Vec<Rejected>,
}

/// An event of the batch the sink cannot apply, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub stream: Arc<str>,
    pub entry_id: EntryId,
    pub error: String,
}

/// Why a batch could not be applied. The variant decides what the pipeline does next, so a
/// handler classifies its sink's errors with care: waiting out a fault is always safe, while
/// blaming events sends them to the dead letter stream.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// This attempt failed and another may succeed (a deadlock, a serialization failure, a
    /// timeout). The pipeline retries with backoff; if the sink still answers other statements
    /// and the batch keeps failing, it applies the events one by one to find the ones at fault.
    #[error("{0}")]
    Transient(String),
    /// Some event of the batch can never be applied (e.g. a value the sink rejects). The pipeline
    /// applies the batch event by event to find it, and dead-letters it alone (`handler_error`).
    #[error("{0}")]
    Permanent(String),
    /// The sink cannot take anything now (unreachable, read-only, out of disk): the whole batch
    /// waits, with nothing counted against its events, and the worker is not ready meanwhile.
    #[error("{0}")]
    Unavailable(String),
    /// The sink's Redis is at `maxmemory` and cannot evict: it answers, but refuses writes. The
    /// batch waits whole, as for `Unavailable`, and the worker reports the `redis_out_of_memory`
    /// fault (an operator must free memory or raise the limit) until a batch goes through.
    #[error("{0}")]
    OutOfMemory(String),
    /// The sink answers but refuses the worker's statements (a missing privilege or table): only
    /// an operator can fix it. At start the worker exits 2; while running, batches wait whole, as
    /// for `Unavailable`, and the fault is reported as an error.
    #[error("{0}")]
    Misconfigured(String),
    /// Retrying cannot help (e.g. the database schema is newer than this build): the worker stops.
    #[error("{0}")]
    Fatal(String),
}

impl HandlerError {
    /// What an error of a Redis sink (the projector's, the notifier's) means for the batch:
    /// unreachable, loading, read-only or out of memory: the batch waits; a command or key the
    /// ACL user may not use (also inside a script, where the error carries no code): an operator
    /// must fix it; a key in another hash slot than its stream (`CROSSSLOT`): the event's fault;
    /// anything else: retried.
    pub fn from_redis(e: &redis::RedisError) -> Self {
        let text = e.to_string();
        let refused = text.to_lowercase();
        if e.code() == Some("NOPERM")
            || refused.contains("no permissions to")
            || refused.contains("can't run this command")
        {
            return HandlerError::Misconfigured(format!(
                "FLEET_REDIS_URL: the user may not run the worker's commands: {text}"
            ));
        }
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_timeout()
            || e.is_connection_refusal()
        {
            return HandlerError::Unavailable(format!("redis: {text}"));
        }
        match e.code() {
            Some("OOM") => HandlerError::OutOfMemory(
                "Redis out of memory (maxmemory reached): effects wait, their entries stay pending"
                    .into(),
            ),
            Some("READONLY" | "LOADING" | "MASTERDOWN" | "CLUSTERDOWN" | "TRYAGAIN") => {
                HandlerError::Unavailable(format!("redis: {text}"))
            }
            Some("CROSSSLOT") => HandlerError::Permanent(format!(
                "redis: {text} (on Redis Cluster, keys keep the stream's hash tag, e.g. {{stream}})"
            )),
            _ => HandlerError::Transient(format!("redis: {text}")),
        }
    }
}

/// A worker's job. Cloned once per handler lane (`handler_concurrency`): clones share the sink
/// (e.g. a connection pool) and may apply batches at the same time.
pub trait Handler: Clone + Send + Sync + 'static {
    /// A transactional sink: `apply` acknowledges (`XACK`) every event of `batch.events` it
    /// applies or finds already settled, in the same atomic step as its effects (e.g. one Redis
    /// script beside the stream, as Kafka Streams commits state and offsets together), and leaves
    /// the ones it rejects pending. An entry is then acknowledged exactly when its effects are
    /// made, so a redelivered one, whoever reads it, applies nothing. The pipeline never
    /// acknowledges those entries again; it still owns everything else: the entries the handler
    /// never sees (unrouted, malformed, shed), dead letters, retries and checkpoints.
    const ACKNOWLEDGES: bool = false;

    /// Applies the batch idempotently: applying the same events again must have no second effect.
    fn apply(
        &mut self,
        batch: &Batch<'_>,
    ) -> impl Future<Output = Result<Applied, HandlerError>> + Send;

    /// Gets the sink ready before the first read (e.g. migrations). Retried while transient.
    fn prepare(&mut self) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async { Ok(()) }
    }

    /// Whether the handler's sink is reachable, for `/readyz` while the worker is idle.
    fn check(&self) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// The checkpoint of `stream` for `group`, if the handler keeps checkpoints: where a consumer
    /// group that has to be created again (deleted, or its stream expired) resumes, so that what
    /// was settled before is not delivered again.
    fn checkpoint(
        &self,
        _stream: &str,
        _group: &str,
    ) -> impl Future<Output = Result<Option<EntryId>, HandlerError>> + Send {
        async { Ok(None) }
    }
}

impl std::ops::AddAssign for Applied {
    fn add_assign(&mut self, other: Applied) {
        self.applied += other.applied;
        self.duplicates += other.duplicates;
        self.skipped += other.skipped;
        self.rejected.extend(other.rejected);
    }
}
