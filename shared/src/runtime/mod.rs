//! Process plumbing any binary uses, consumer-group worker or not: flags with environment twins,
//! the configuration file, connections, signals and the drain, health, the HTTP server, metrics
//! and logging. Nothing here knows of the pipeline, so a binary that reads no consumer group (a
//! gateway) runs on the runtime alone.

pub mod backoff;
pub mod cli;
pub mod config;
pub mod conn;
pub mod connect;
pub mod grants;
pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod requirements;
pub mod scripts;
pub mod sentinel;
pub mod shutdown;
