//! `fleetctl tail`: follow a stream (or the streams of a glob) without joining a consumer group:
//! plain `XREAD`, so nothing is delivered, claimed or acknowledged on anyone's behalf, and the
//! workers never see the difference. Each entry is decoded by the workers' own decoder (legacy
//! entries upcast as the workers see them), filtered by channel pattern and type, and printed one
//! line per event (`--output json`: one JSON object per line, the event's v1 JSON with `stream`
//! and `entry_id`, as the notifier publishes it). Entries that are not valid events are shown
//! with the reason a worker would dead-letter them.
//!
//! On a Redis Cluster, one `XREAD` may only name streams of one hash slot: a glob's streams are
//! read with one `XREAD` per slot, sent to their masters at once (see `read`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::{json, Map, Value as Json};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::output::{cut, Output};
use crate::progress::Progress;
use crate::snapshot::redis_now_ms;
use crate::streams;
use streamfleet::event::pattern::ChannelPattern;
use streamfleet::event::{decode, Limits};
use streamfleet::runtime::conn::Conn;
use streamfleet::runtime::connect::RedisTarget;
use streamfleet::stream::keys;
use streamfleet::EntryId;

#[derive(Debug, Args)]
pub struct TailArgs {
    /// The stream, or a glob over streams (dead letter streams never match; new matches are
    /// picked up as they appear).
    #[arg(long, env = "FLEET_STREAM")]
    stream: String,

    /// Where to start: `$` (new entries only), `-` (the first entry), an entry id (from it on),
    /// or an RFC 3339 time (from the first entry at or after it).
    #[arg(long, default_value = "$", value_parser = parse_from)]
    from: From,

    /// Only events on channels matching this pattern (`*` one segment, `#` zero or more).
    #[arg(long, value_name = "PATTERN", value_parser = parse_pattern)]
    channel: Option<ChannelPattern>,

    /// Only events of this type.
    #[arg(long = "type", value_name = "TYPE")]
    event_type: Option<String>,

    /// Stop after this many events (those that pass the filters).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,

    /// Longest `data` shown in a line, in characters (the JSON output is never cut).
    #[arg(long, value_name = "CHARS", default_value_t = 80)]
    data_width: usize,
}

impl TailArgs {
    pub fn validate(&self) -> Result<(), String> {
        if self.stream.trim().is_empty() {
            return Err("--stream: must not be empty".into());
        }
        Ok(())
    }
}

/// Where a tail starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// Entries written from now on.
    New,
    /// The stream's first entry.
    First,
    /// From this entry id on (inclusive).
    Id(EntryId),
    /// From the first entry at or after this time (ms since the epoch).
    Time(u64),
}

fn parse_from(text: &str) -> Result<From, String> {
    match text {
        "$" => Ok(From::New),
        "-" | "0" | "0-0" => Ok(From::First),
        _ => {
            if let Ok(id) = text.parse::<EntryId>() {
                return Ok(From::Id(id));
            }
            OffsetDateTime::parse(text, &Rfc3339)
                .map(|t| From::Time((t.unix_timestamp_nanos() / 1_000_000).max(0) as u64))
                .map_err(|_| {
                    format!(
                        "{text}: not $, -, an entry id (<ms>-<seq>) or an RFC 3339 time (e.g. 2026-11-26T12:00:00Z)"
                    )
                })
        }
    }
}

fn parse_pattern(text: &str) -> Result<ChannelPattern, String> {
    text.parse().map_err(|e| format!("{e}"))
}

/// The id just before `id`: `XREAD` returns entries after the id it is given.
fn before(id: EntryId) -> EntryId {
    match id {
        EntryId { ms: 0, seq: 0 } => id,
        EntryId { ms, seq: 0 } => EntryId {
            ms: ms - 1,
            seq: u64::MAX,
        },
        EntryId { ms, seq } => EntryId { ms, seq: seq - 1 },
    }
}

/// Entries per `XREAD`, and how long one blocks.
const READ_COUNT: usize = 500;
const BLOCK_MS: u64 = 1000;
/// How often streams of several slots of a cluster are read again while none has new entries.
const POLL_MS: u64 = 200;
/// How often a glob is matched again for new streams.
const RESCAN: Duration = Duration::from_secs(5);

/// One stream being followed: the last id seen.
struct Cursor {
    stream: String,
    after: EntryId,
}

pub async fn run(target: RedisTarget, args: TailArgs, output: Output) -> anyhow::Result<()> {
    // The response timeout must outlast the BLOCK.
    let mut conn =
        crate::redis_read::connect_with(&target, Duration::from_millis(BLOCK_MS + 10_000)).await?;
    let glob = streams::is_glob(&args.stream).then(|| args.stream.trim().to_owned());
    let started_ms = redis_now_ms(&mut conn).await?;
    let names = match &glob {
        Some(glob) => {
            let mut progress = Progress::new("scanning for streams", None);
            let found = streams::scan(&mut conn, glob, &mut progress).await?;
            progress.finish();
            found
        }
        None => vec![args.stream.trim().to_owned()],
    };
    let mut cursors = Vec::new();
    for stream in names {
        let after = start(&mut conn, &stream, args.from, None).await?;
        cursors.push(Cursor { stream, after });
    }
    let several = glob.is_some();
    let mut shown = 0u64;
    let mut last_scan = Instant::now();
    loop {
        if let Some(glob) = &glob {
            if cursors.is_empty() || last_scan.elapsed() >= RESCAN {
                last_scan = Instant::now();
                let mut quiet = Progress::new("scanning for streams", None);
                let found = streams::scan(&mut conn, glob, &mut quiet).await?;
                quiet.finish();
                for stream in found {
                    if !cursors.iter().any(|c| c.stream == stream) {
                        // Appeared after the tail started: from then on (or --from's position).
                        let after = start(&mut conn, &stream, args.from, Some(started_ms)).await?;
                        cursors.push(Cursor { stream, after });
                    }
                }
            }
            if cursors.is_empty() {
                tokio::time::sleep(Duration::from_millis(BLOCK_MS)).await;
                continue;
            }
        }
        let reply = read(&mut conn, &cursors)
            .await
            .with_context(|| format!("XREAD {}", args.stream))?;
        let mut batch: Vec<(EntryId, String, Pairs)> = Vec::new();
        for (stream, entries) in reply {
            for (id, fields) in entries {
                let Ok(id) = id.parse::<EntryId>() else {
                    continue;
                };
                if let Some(c) = cursors.iter_mut().find(|c| c.stream == stream) {
                    c.after = c.after.max(id);
                }
                batch.push((id, stream.clone(), fields));
            }
        }
        // Several streams: in the order their entries were written.
        batch.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        for (id, stream, pairs) in batch {
            let Some(line) = render(&args, output, several, &stream, id, &pairs) else {
                continue;
            };
            println!("{line}");
            shown += 1;
            if args.count.is_some_and(|n| shown >= n) {
                return Ok(());
            }
        }
    }
}

/// The streams one `XREAD` may name together, as indices into `cursors`: all of them on one
/// server; on a cluster, those of one hash slot (one command may not name keys of two slots).
fn by_slot(cursors: &[Cursor], cluster: bool) -> Vec<Vec<usize>> {
    if !cluster {
        return vec![(0..cursors.len()).collect()];
    }
    let mut groups: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
    for (i, c) in cursors.iter().enumerate() {
        groups.entry(keys::slot(&c.stream)).or_default().push(i);
    }
    groups.into_values().collect()
}

/// The `XREAD` of the streams `indices` of `cursors`, each after its cursor.
fn xread(cursors: &[Cursor], indices: &[usize], block: bool) -> redis::Cmd {
    let mut read = redis::cmd("XREAD");
    read.arg("COUNT").arg(READ_COUNT);
    if block {
        read.arg("BLOCK").arg(BLOCK_MS);
    }
    read.arg("STREAMS");
    for &i in indices {
        read.arg(&cursors[i].stream);
    }
    for &i in indices {
        read.arg(cursors[i].after.to_string());
    }
    read
}

/// What the streams hold after their cursors. One `XREAD` (all streams of one server, or of one
/// slot of a cluster) blocks up to `BLOCK_MS` for new entries. Streams of several slots are read
/// with one non-blocking `XREAD` per slot, pipelined (sent to their masters at once), and polled
/// every `POLL_MS` while none has anything new: blocking reads would wait one behind the other on
/// a node's connection.
async fn read(conn: &mut Conn, cursors: &[Cursor]) -> redis::RedisResult<Vec<Read>> {
    let groups = by_slot(cursors, conn.is_cluster());
    if let [one] = groups.as_slice() {
        let reply: Option<Vec<Read>> = xread(cursors, one, true).query_async(conn).await?;
        return Ok(reply.unwrap_or_default());
    }
    let mut pipe = redis::pipe();
    for indices in &groups {
        pipe.add_command(xread(cursors, indices, false));
    }
    let replies: Vec<Option<Vec<Read>>> = pipe.query_async(conn).await?;
    let out: Vec<Read> = replies.into_iter().flatten().flatten().collect();
    if out.is_empty() {
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
    Ok(out)
}

/// An entry's field/value pairs as read (bytes: nothing forces a producer to write UTF-8).
type Pairs = Vec<(Vec<u8>, Vec<u8>)>;
/// An entry as `XREAD` returns it: its id and pairs.
type Entry = (String, Pairs);
/// What `XREAD` returns of one stream: its name and entries.
type Read = (String, Vec<Entry>);

impl TailArgs {
    /// Whether an event on `channel` of type `kind` passes `--channel` and `--type`.
    fn passes(&self, channel: Option<&str>, kind: Option<&str>) -> bool {
        let channel_ok = match (&self.channel, channel) {
            (None, _) => true,
            (Some(p), Some(c)) => p.matches(c),
            (Some(_), None) => false,
        };
        channel_ok && self.event_type.as_deref().is_none_or(|t| kind == Some(t))
    }
}

/// The line of one entry, or `None` when the filters leave it out.
fn render(
    args: &TailArgs,
    output: Output,
    several: bool,
    stream: &str,
    id: EntryId,
    pairs: &Pairs,
) -> Option<String> {
    let fields: streamfleet::Fields = pairs.iter().map(|(k, v)| (k, v)).collect();
    let mut cells = Vec::with_capacity(7);
    match decode(stream, id, &fields, &Limits::default()) {
        Ok(event) => {
            if !args.passes(Some(&event.channel), Some(&event.event_type)) {
                return None;
            }
            if output == Output::Json {
                let mut j = event.to_json();
                j["stream"] = json!(stream);
                j["entry_id"] = json!(id.to_string());
                return Some(j.to_string());
            }
            cells.push(event.time.format(&Rfc3339).unwrap_or_default());
            cells.push(id.to_string());
            if several {
                cells.push(stream.to_owned());
            }
            cells.extend([
                format!("{:<24}", event.channel),
                format!("{:<16}", event.event_type),
                event.id.to_string(),
                cut(&event.data, args.data_width),
            ]);
        }
        Err(e) => {
            let raw = |name: &[u8]| {
                pairs
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            };
            let (channel, kind) = (raw(b"channel"), raw(b"type"));
            if !args.passes(channel.as_deref(), kind.as_deref()) {
                return None;
            }
            let why = format!("{} ({})", e, e.reason().as_str());
            if output == Output::Json {
                let f: Map<String, Json> = pairs
                    .iter()
                    .map(|(k, v)| {
                        (
                            String::from_utf8_lossy(k).into_owned(),
                            json!(String::from_utf8_lossy(v)),
                        )
                    })
                    .collect();
                return Some(
                    json!({"stream": stream, "entry_id": id.to_string(), "invalid": why, "fields": f})
                        .to_string(),
                );
            }
            cells.push(entry_time(id));
            cells.push(id.to_string());
            if several {
                cells.push(stream.to_owned());
            }
            cells.extend([
                format!("{:<24}", channel.as_deref().unwrap_or("-")),
                format!("{:<16}", kind.as_deref().unwrap_or("-")),
                format!("{:<36}", "-"),
                format!("not a valid event: {}", cut(&why, args.data_width)),
            ]);
        }
    }
    Some(cells.join("  "))
}

/// When an entry was written, from its id (an invalid entry may have no `time`).
fn entry_time(id: EntryId) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(id.ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| id.ms.to_string())
}

/// The id to read `stream` after. `$` is resolved once, to the stream's last entry, so that
/// nothing written between two reads is missed (`$` in every `XREAD` would skip those); for a
/// stream found after the start (`appeared_after`), from the start's time.
async fn start(
    conn: &mut Conn,
    stream: &str,
    from: From,
    appeared_after: Option<u64>,
) -> anyhow::Result<EntryId> {
    Ok(match from {
        From::First => EntryId { ms: 0, seq: 0 },
        From::Id(id) => before(id),
        From::Time(ms) => before(EntryId { ms, seq: 0 }),
        From::New => match appeared_after {
            Some(ms) => before(EntryId { ms, seq: 0 }),
            None => {
                let last: Vec<(String, redis::Value)> = redis::cmd("XREVRANGE")
                    .arg(stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(conn)
                    .await
                    .with_context(|| format!("XREVRANGE {stream} (is it a stream?)"))?;
                last.first()
                    .and_then(|(id, _)| id.parse().ok())
                    .unwrap_or(EntryId { ms: 0, seq: 0 })
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_reads_from_the_entry_it_names() {
        assert_eq!(
            before(EntryId { ms: 5, seq: 0 }),
            EntryId {
                ms: 4,
                seq: u64::MAX
            }
        );
        assert_eq!(before(EntryId { ms: 5, seq: 3 }), EntryId { ms: 5, seq: 2 });
        assert_eq!(parse_from("$"), Ok(From::New));
        assert_eq!(parse_from("-"), Ok(From::First));
        assert_eq!(parse_from("12-3"), Ok(From::Id(EntryId { ms: 12, seq: 3 })));
        assert_eq!(parse_from("1970-01-01T00:00:01.5Z"), Ok(From::Time(1500)));
        assert!(parse_from("yesterday").is_err());
    }

    #[test]
    fn one_xread_names_every_stream_of_a_server_but_only_one_slots_of_a_cluster() {
        let cursors: Vec<Cursor> = ["o:{a}:1", "o:{b}:1", "o:{a}:2", "untagged"]
            .into_iter()
            .map(|stream| Cursor {
                stream: stream.into(),
                after: EntryId { ms: 0, seq: 0 },
            })
            .collect();
        assert_eq!(by_slot(&cursors, false), vec![vec![0, 1, 2, 3]]);
        let mut groups = by_slot(&cursors, true);
        groups.sort();
        assert_eq!(groups, vec![vec![0, 2], vec![1], vec![3]]);
        let read = xread(&cursors, &[0, 2], false);
        let args: Vec<String> = read
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(a) => String::from_utf8_lossy(a).into_owned(),
                _ => String::new(),
            })
            .collect();
        assert_eq!(
            args,
            ["XREAD", "COUNT", "500", "STREAMS", "o:{a}:1", "o:{a}:2", "0-0", "0-0"]
        );
    }
}
