//! `fleetctl groups create`: the streams and consumer groups a deployment needs, created before
//! its workers start (the setup Job). KEDA's scaler, among others, misreads a group that does not
//! exist yet.

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::output::Output;
use streamfleet::runtime::conn::Conn;
use streamfleet::runtime::connect::RedisTarget;
use streamfleet::store::{redis_checkpoints, EventStore};
use streamfleet::EntryId;
use streamfleet::StartFrom;

#[derive(Debug, Subcommand)]
pub enum GroupsCommand {
    /// Create each stream (if missing) and its consumer group (if missing), idempotently.
    Create(CreateArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Comma-separated stream keys (not globs: a glob's streams appear with their first entry).
    #[arg(long, env = "FLEET_STREAMS", value_delimiter = ',', required = true)]
    streams: Vec<String>,

    /// Consumer group name.
    #[arg(long, env = "FLEET_GROUP")]
    group: String,

    /// Where a new group starts when the stream has no checkpoint: oldest (0) | newest ($).
    #[arg(long, value_parser = ["oldest", "newest"], default_value = "oldest")]
    start_from: String,
}

impl CreateArgs {
    /// Rejects globs and empty names before anything connects.
    pub fn validate(&self) -> Result<(), String> {
        for s in &self.streams {
            if s.trim().is_empty() {
                return Err("FLEET_STREAMS: an empty stream name".into());
            }
            if s.contains(['*', '?', '[']) {
                return Err(format!(
                    "FLEET_STREAMS: {s} is a glob; name the streams (their groups are created by the workers as they appear)"
                ));
            }
        }
        if self.group.trim().is_empty() {
            return Err("FLEET_GROUP: must not be empty".into());
        }
        Ok(())
    }
}

/// Where the checkpoint of `group` on `stream` is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// The `checkpoints` table (the persister's).
    Postgres,
    /// `<stream>:checkpoints` (workers without PostgreSQL).
    Redis,
}

impl Kept {
    pub fn as_str(self) -> &'static str {
        match self {
            Kept::Postgres => "postgres",
            Kept::Redis => "redis",
        }
    }
}

/// The checkpoint of `group` on `stream`: in PostgreSQL when `store` is given and has one, else
/// beside the stream in Redis.
pub async fn checkpoint(
    store: Option<&EventStore>,
    conn: &mut Conn,
    stream: &str,
    group: &str,
) -> anyhow::Result<Option<(EntryId, Kept)>> {
    if let Some(store) = store {
        if let Some(position) = store
            .checkpoint(stream, group)
            .await
            .with_context(|| format!("reading the checkpoint of {stream} in PostgreSQL"))?
        {
            return Ok(Some((position, Kept::Postgres)));
        }
    }
    let position = redis_checkpoints::read(conn, stream, group)
        .await
        .with_context(|| {
            format!(
                "reading the checkpoint of {stream} in {} (HGET)",
                redis_checkpoints::key(stream)
            )
        })?;
    Ok(position.map(|p| (p, Kept::Redis)))
}

/// Creates what is missing. A group starts at the stream's checkpoint (a group destroyed and
/// created again resumes there): in PostgreSQL when `store` is given and has one (the persister's),
/// else beside the stream in Redis (`<stream>:checkpoints`, workers without PostgreSQL), else at
/// `--start-from`.
pub async fn create(
    target: RedisTarget,
    store: Option<EventStore>,
    args: CreateArgs,
    output: Output,
) -> anyhow::Result<()> {
    let mut conn = crate::redis_read::connect(&target).await?;
    let mut done = Vec::new();
    let default = match args.start_from.as_str() {
        "newest" => StartFrom::Newest,
        _ => StartFrom::Oldest,
    };
    for stream in args.streams.iter().map(|s| s.trim()) {
        let checkpoint = checkpoint(store.as_ref(), &mut conn, stream, &args.group)
            .await?
            .map(|(position, _)| position);
        let start = checkpoint.map_or_else(|| default.as_id().to_owned(), |c| c.to_string());
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(&args.group)
            .arg(&start)
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        let created = match created {
            Ok(()) => true,
            Err(e) if e.code() == Some("BUSYGROUP") => false,
            Err(e) => {
                return Err(e).with_context(|| format!("creating group {} on {stream}", args.group))
            }
        };
        if output == Output::Table {
            match created {
                true => println!("{stream}: group {} created at {start}", args.group),
                false => println!("{stream}: group {} already exists", args.group),
            }
        }
        done.push(json!({
            "stream": stream,
            "created": created,
            "at": created.then_some(start),
        }));
    }
    if output == Output::Json {
        crate::output::json(&json!({"group": args.group, "streams": done}));
    }
    Ok(())
}
