//! streamfleet: the pipeline every worker shares.
//!
//! source → decode/validate → dedup → route → backpressure → handler → confirm → ack/checkpoint.
//! A worker is this pipeline plus one [`handler::Handler`]; everything a handler must not do
//! (acknowledge, retry, sleep for backpressure, dead-letter, count metrics) lives here.

pub mod ack;
pub mod apply;
pub mod backoff;
pub mod backpressure;
pub mod channel;
pub mod cli;
pub mod config;
pub mod connect;
pub mod dlq;
pub mod entry;
pub mod event;
pub mod handler;
pub mod health;
pub mod http;
pub mod identity;
pub mod inflight;
pub mod lag;
pub mod legacy;
pub mod logging;
pub mod metrics;
pub mod overlap;
pub mod pattern;
pub mod pipeline;
pub mod read_conn;
pub mod reply;
pub mod shutdown;
pub mod source;
pub mod store;
pub mod strict;
pub mod worker;
