//! streamfleet: the pipeline every worker shares.
//!
//! The folders follow an event through a worker:
//! - [`stream`]: the base: entry ids, fields, the names and hash slots of the keys kept beside a
//!   stream;
//! - [`event`]: the v1 contract, pure: decoding and validation, legacy upcasting, channels and
//!   channel patterns;
//! - `source`: consumer-group input: the reader connection and its reply parser, entries,
//!   reclaiming, the consumer's identity, lag;
//! - `pipeline`: decode → dedup → route → backpressure → handler → acknowledge, with the handler
//!   trait, the lanes that keep order per key, the retry/isolation/poison policy, the checkpoint
//!   watermark and dead letters;
//! - [`runtime`]: process plumbing any binary uses (flags, configuration, connections, signals,
//!   health, the HTTP server, metrics, logging); it knows nothing of the pipeline;
//! - [`store`]: the PostgreSQL `events` and `checkpoints` tables (the persister and fleetctl), and
//!   the checkpoints of workers without PostgreSQL, beside each stream in Redis.
//!
//! A worker is the pipeline plus one [`Handler`]; everything a handler must not do (acknowledge,
//! retry, sleep for backpressure, dead-letter, count metrics) lives here. [`Worker`] composes the
//! runtime with the pipeline.

pub mod event;
pub(crate) mod pipeline;
pub mod runtime;
pub(crate) mod source;
pub mod store;
pub mod stream;
mod worker;

pub use pipeline::dlq::REDRIVE_GROUP_FIELD;
pub use pipeline::handler::{Applied, Batch, Checkpoint, Handler, HandlerError, Rejected, Routed};
pub use runtime::config::{Route, StartFrom};
#[doc(hidden)]
pub use runtime::shutdown::hold_stop_signals;
pub use source::{scan_streams, scan_streams_page};
pub use stream::keys::DLQ_SUFFIX;
pub use stream::{EntryId, Fields};
pub use worker::Worker;
