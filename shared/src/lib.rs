//! streamfleet: the pipeline every worker shares.
//!
//! source → decode/validate → dedup → route → backpressure → handler → confirm → ack/checkpoint.
//! A worker is this pipeline plus one [`handler::Handler`]; everything a handler must not do
//! (acknowledge, retry, sleep for backpressure, dead-letter, count metrics) lives here.

pub mod channel;
pub mod config;
pub mod dlq;
pub mod entry;
pub mod event;
pub mod legacy;
pub mod pattern;
