//! `fleetctl publish`: one event from flags, entries from JSON lines, or a generated load.
//!
//! JSON lines are published field by field (a string value verbatim, any other value as JSON
//! text). Every event is checked against the v1 contract with the workers' own decoder before
//! anything is written: an invalid line is refused with its line number and reason, and nothing is
//! published (`--no-validate` publishes entries as they are, to exercise dead letters on purpose).

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::output::Output;
use crate::progress::Progress;
use streamfleet::event::{decode, Limits, DEFAULT_MAX_DATA_BYTES};
use streamfleet::runtime::conn::Conn;
use streamfleet::runtime::connect::RedisTarget;
use streamfleet::stream::keys::{shard_of, shard_stream};
use streamfleet::EntryId;

/// Entries per pipelined round trip.
const CHUNK: usize = 1000;

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Stream key to publish to (with --shards: the prefix of the shards' streams).
    #[arg(long, env = "FLEET_STREAM")]
    stream: String,

    /// Shard the events by key over N streams `<stream>:{<tag>}` (see `fleetctl shards`): each
    /// event goes to the shard of its `key`, or else its `channel`, so a key's events keep their
    /// order in one stream.
    #[arg(long, value_name = "N")]
    shards: Option<usize>,

    /// JSON lines to publish, one entry per line (`-` for standard input).
    #[arg(long, conflicts_with_all = ["generate", "event_type"])]
    file: Option<PathBuf>,

    /// Publish N generated v1 events (for load tests and benchmarks).
    #[arg(long, value_name = "N", conflicts_with = "event_type")]
    generate: Option<u64>,

    /// With --generate: publish at this many events per second, a slice every millisecond (a
    /// steady load), instead of at once.
    #[arg(long, value_name = "EVENTS_PER_SECOND", requires = "generate")]
    rate: Option<u64>,

    /// With --generate: share of events on strict `user.*` channels (the rest on `flow.*`).
    #[arg(long, default_value_t = 0.5)]
    user_share: f64,

    /// Event type of the single event to publish.
    #[arg(long = "type", value_name = "TYPE")]
    event_type: Option<String>,

    /// Channel of the single event.
    #[arg(long, requires = "event_type")]
    channel: Option<String>,

    /// `data` of the single event, a JSON object.
    #[arg(long, default_value = "{}")]
    data: String,

    /// `source` of the event(s).
    #[arg(long, default_value = "fleetctl")]
    source: String,

    /// Event id of the single event [default: a new UUIDv7].
    #[arg(long)]
    id: Option<Uuid>,

    /// `key` of the single event.
    #[arg(long)]
    key: Option<String>,

    /// `correlation_id` of the single event.
    #[arg(long)]
    correlation_id: Option<String>,

    /// Publish --file entries as they are, without checking them against the v1 contract (to
    /// exercise dead letters on purpose).
    #[arg(long, requires = "file")]
    no_validate: bool,

    /// Largest `data` accepted when checking, in bytes (the workers' `tuning.max_data_bytes`).
    #[arg(long, default_value_t = DEFAULT_MAX_DATA_BYTES)]
    max_data_bytes: usize,
}

impl PublishArgs {
    /// Exactly one of --file, --generate or --type must say what to publish.
    pub fn validate(&self) -> Result<(), String> {
        crate::streams::validate_key(&self.stream, "--stream")?;
        let given = [
            self.file.is_some(),
            self.generate.is_some(),
            self.event_type.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(
                "publish: give exactly one of --file, --generate or --type (with --channel)".into(),
            );
        }
        if self.event_type.is_some() && self.channel.is_none() {
            return Err("publish: --type needs --channel".into());
        }
        if self.shards == Some(0) {
            return Err("publish: --shards must be at least 1".into());
        }
        if self.shards.is_some() && self.stream.contains(['{', '}']) {
            return Err(
                "publish: with --shards, --stream is the prefix, without braces: the shard is the hash tag"
                    .into(),
            );
        }
        if self.rate == Some(0) {
            return Err("publish: --rate must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.user_share) {
            return Err("publish: --user-share must be between 0 and 1".into());
        }
        Ok(())
    }
}

type Fields = Vec<(String, String)>;

/// What `publish` will write, checked before anything is.
pub enum Prepared {
    /// One event from flags.
    One(Fields),
    /// Checked lines of a file, read again while publishing (memory stays small).
    File { path: PathBuf, count: u64 },
    /// Lines from standard input (read once: kept).
    Lines(Vec<Fields>),
    /// `--generate`.
    Generate,
}

/// Why an event is not a v1 event: the workers' decoder's verdict, with its dead letter reason.
fn check(fields: &Fields, limits: &Limits) -> Result<(), String> {
    let pairs: streamfleet::Fields = fields
        .iter()
        .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
        .collect();
    decode("", EntryId { ms: 0, seq: 0 }, &pairs, limits)
        .map(|_| ())
        .map_err(|e| format!("{} ({})", e, e.reason().as_str()))
}

/// The fields of one JSON line, or why it is not a JSON object.
fn parse_line(line: &str) -> Result<Fields, String> {
    serde_json::from_str::<Map<String, Value>>(line)
        .map(fields_of)
        .map_err(|e| format!("not a JSON object: {e}"))
}

impl PublishArgs {
    /// Checks everything that will be published (for a file: every line, before any is
    /// published). The error names the line and the reason.
    pub fn prepare(&self) -> Result<Prepared, String> {
        let limits = Limits {
            max_data_bytes: self.max_data_bytes,
        };
        if self.generate.is_some() {
            return Ok(Prepared::Generate);
        }
        let Some(path) = &self.file else {
            let fields = self.single();
            check(&fields, &limits).map_err(|e| format!("publish: the event is not valid: {e}"))?;
            return Ok(Prepared::One(fields));
        };
        let stdin = path.as_os_str() == "-";
        let name = if stdin {
            "standard input".to_owned()
        } else {
            path.display().to_string()
        };
        let reader: Box<dyn BufRead> = if stdin {
            Box::new(std::io::stdin().lock())
        } else {
            Box::new(std::io::BufReader::new(
                std::fs::File::open(path).map_err(|e| format!("publish: {name}: {e}"))?,
            ))
        };
        let mut kept = Vec::new();
        let mut count = 0;
        for (n, line) in reader.lines().enumerate() {
            let line = line.map_err(|e| format!("publish: {name} line {}: {e}", n + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            let fields = parse_line(&line)
                .map_err(|e| format!("publish: {name} line {}: {e}; nothing published", n + 1))?;
            if !self.no_validate {
                check(&fields, &limits).map_err(|e| {
                    format!("publish: {name} line {}: {e}; nothing published", n + 1)
                })?;
            }
            count += 1;
            if stdin {
                kept.push(fields);
            }
        }
        Ok(if stdin {
            Prepared::Lines(kept)
        } else {
            Prepared::File {
                path: path.clone(),
                count,
            }
        })
    }

    /// The event given by flags.
    fn single(&self) -> Fields {
        let mut fields: Fields = vec![
            ("v".into(), "1".into()),
            (
                "id".into(),
                self.id.unwrap_or_else(Uuid::now_v7).to_string(),
            ),
            ("type".into(), self.event_type.clone().unwrap_or_default()),
            ("channel".into(), self.channel.clone().unwrap_or_default()),
            ("source".into(), self.source.clone()),
            ("time".into(), now()),
            ("data".into(), self.data.clone()),
        ];
        if let Some(k) = &self.key {
            fields.push(("key".into(), k.clone()));
        }
        if let Some(c) = &self.correlation_id {
            fields.push(("correlation_id".into(), c.clone()));
        }
        fields
    }
}

fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn fields_of(object: Map<String, Value>) -> Fields {
    object
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            (k, v)
        })
        .collect()
}

fn generated(i: u64, user_share: f64, source: &str) -> Fields {
    // Deterministic spread: event i is a user event when its fractional position says so.
    let user = ((i as f64 + 0.5) * user_share).floor() != ((i as f64 - 0.5) * user_share).floor()
        || user_share >= 1.0;
    let (event_type, channel) = if user {
        ("user.updated", format!("user.{}.profile", i % 1000))
    } else {
        ("flow.progress", format!("flow.{}.progress", i % 1000))
    };
    vec![
        ("v".into(), "1".into()),
        ("id".into(), Uuid::now_v7().to_string()),
        ("type".into(), event_type.into()),
        ("channel".into(), channel),
        ("source".into(), source.into()),
        ("time".into(), now()),
        (
            "data".into(),
            format!(
                r#"{{"seq":{i},"step":{},"note":"generated by fleetctl"}}"#,
                i % 17
            ),
        ),
    ]
}

/// Where the published entries went: how many, the first and the last entry id.
#[derive(Debug, Default)]
struct Published {
    count: u64,
    first: Option<String>,
    last: Option<String>,
}

/// Where entries go: one stream, or the shard of each entry's ordering key.
#[derive(Debug, Clone)]
struct Destination {
    stream: String,
    shards: Option<usize>,
}

impl Destination {
    /// The stream `fields` go to: with shards, the one of its `key`, or else its `channel`.
    fn stream_of(&self, fields: &Fields) -> String {
        let Some(n) = self.shards else {
            return self.stream.clone();
        };
        let field = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let key = field("key")
            .or_else(|| field("channel"))
            .unwrap_or_default();
        shard_stream(&self.stream, shard_of(key, n), n)
    }
}

/// Publishes `batch` in one pipelined round trip (one per node on a cluster), and empties it.
async fn flush(
    conn: &mut Conn,
    to: &Destination,
    batch: &mut Vec<Fields>,
    published: &mut Published,
) -> anyhow::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for fields in batch.iter() {
        pipe.cmd("XADD")
            .arg(to.stream_of(fields))
            .arg("*")
            .arg(fields.as_slice());
    }
    let ids: Vec<String> = pipe.query_async(conn).await.context("XADD")?;
    published.count += ids.len() as u64;
    if published.first.is_none() {
        published.first = ids.first().cloned();
    }
    published.last = ids.last().cloned().or(published.last.take());
    batch.clear();
    Ok(())
}

/// Publishes checked entries, `CHUNK` per round trip, showing progress.
async fn publish_all(
    conn: &mut Conn,
    stream: &Destination,
    count: u64,
    entries: impl Iterator<Item = anyhow::Result<Fields>>,
    published: &mut Published,
) -> anyhow::Result<()> {
    let mut progress = Progress::new("publish", Some(count));
    let mut batch: Vec<Fields> = Vec::with_capacity(CHUNK);
    for fields in entries {
        batch.push(fields?);
        if batch.len() == CHUNK {
            progress.add(CHUNK as u64);
            flush(conn, stream, &mut batch, published).await?;
        }
    }
    flush(conn, stream, &mut batch, published).await?;
    progress.finish();
    Ok(())
}

/// Publishes what `prepare` checked, and prints what was published.
pub async fn run(
    target: RedisTarget,
    args: PublishArgs,
    prepared: Prepared,
    output: Output,
) -> anyhow::Result<()> {
    // Pipelines of 1000 XADDs can take longer than redis-rs's 500 ms default on a busy host:
    // the connection's response timeout is fleetctl's generous one.
    let mut conn = crate::redis_read::connect(&target).await?;
    let mut batch: Vec<Fields> = Vec::with_capacity(CHUNK);
    let mut published = Published::default();
    let mut event_id = None;
    let to = Destination {
        stream: args.stream.clone(),
        shards: args.shards,
    };
    match prepared {
        Prepared::One(fields) => {
            event_id = fields
                .iter()
                .find(|(k, _)| k == "id")
                .map(|(_, v)| v.clone());
            batch.push(fields);
            flush(&mut conn, &to, &mut batch, &mut published).await?;
        }
        Prepared::Generate => {
            let n = args.generate.unwrap_or(0);
            let mut progress = Progress::new("publish", Some(n));
            // Paced: one slice every millisecond, each event timestamped as it is sent.
            let slice = args.rate.map(|r| (r / 1000).max(1) as usize);
            let started = tokio::time::Instant::now();
            for i in 0..n {
                batch.push(generated(i, args.user_share, &args.source));
                if batch.len() == slice.unwrap_or(CHUNK) {
                    progress.add(batch.len() as u64);
                    flush(&mut conn, &to, &mut batch, &mut published).await?;
                    if let Some(rate) = args.rate {
                        let sent = (i + 1) as f64;
                        let due = started + std::time::Duration::from_secs_f64(sent / rate as f64);
                        tokio::time::sleep_until(due).await;
                    }
                }
            }
            flush(&mut conn, &to, &mut batch, &mut published).await?;
            progress.finish();
        }
        Prepared::Lines(lines) => {
            let n = lines.len() as u64;
            let lines = lines.into_iter().map(Ok);
            publish_all(&mut conn, &to, n, lines, &mut published).await?;
        }
        Prepared::File { path, count } => {
            let file = std::fs::File::open(&path).with_context(|| format!("{}", path.display()))?;
            let lines = std::io::BufReader::new(file)
                .lines()
                .filter(|l| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
                .map(|line| {
                    parse_line(&line?)
                        .map_err(anyhow::Error::msg)
                        .with_context(|| format!("{} changed while publishing", path.display()))
                });
            publish_all(&mut conn, &to, count, lines, &mut published).await?;
        }
    };
    match output {
        Output::Json => {
            let mut doc = json!({
                "stream": args.stream,
                "published": published.count,
                "first_entry_id": published.first,
                "last_entry_id": published.last,
            });
            if let Some(id) = event_id {
                doc["event_id"] = json!(id);
            }
            if let Some(n) = args.shards {
                doc["shards"] = json!(n);
            }
            crate::output::json(&doc);
        }
        // One event: its entry id alone, for a shell's `$(fleetctl publish …)`.
        Output::Table if event_id.is_some() => {
            println!("{}", published.first.as_deref().unwrap_or(""))
        }
        Output::Table => match args.shards {
            Some(n) => println!(
                "published {} entries to {n} shards of {} (fleetctl shards --stream {} --count {n})",
                published.count, args.stream, args.stream
            ),
            None => println!("published {} entries to {}", published.count, args.stream),
        },
    }
    Ok(())
}
