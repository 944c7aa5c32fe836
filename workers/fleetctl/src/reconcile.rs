//! `fleetctl reconcile`: the auditor's check after an incident. Every strict event in a range of
//! the stream must have its row in PostgreSQL (unless it is still in flight for the persister's
//! group, or was dead-lettered by it), and every row persisted from that range must still have
//! its event in the stream. Exit 1 when something is missing on either side.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use redis::aio::MultiplexedConnection;
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::entry_ids;
use crate::groups_info::groups;
use crate::output::{print, Output, Table};
use crate::progress::Progress;
use crate::redis_read::{connect, pages};
use streamfleet::event::{decode, Limits};
use streamfleet::runtime::config::FileConfig;
use streamfleet::store::EventStore;
use streamfleet::{EntryId, REDRIVE_GROUP_FIELD};

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// The stream.
    #[arg(long, env = "FLEET_STREAM")]
    stream: String,

    /// The persister's consumer group (what is in flight or dead-lettered there is not missing).
    #[arg(long, env = "FLEET_GROUP", default_value = "persister")]
    group: String,

    /// The persister's configuration file: its strict routes say which events belong in
    /// PostgreSQL [default: the built-in routes, `user.#` strict].
    #[arg(long, env = "FLEET_CONFIG")]
    config: Option<PathBuf>,

    /// From this entry id or time (RFC 3339) [default: the stream's first entry].
    #[arg(long, value_parser = parse_bound)]
    from: Option<EntryId>,

    /// Up to this entry id or time (RFC 3339), included [default: the stream's last entry].
    #[arg(long, value_parser = parse_bound)]
    to: Option<EntryId>,
}

/// An entry id, or the first id of a time's millisecond.
fn parse_bound(text: &str) -> Result<EntryId, String> {
    if let Some(id) = entry_ids::parse(text) {
        return Ok(id);
    }
    OffsetDateTime::parse(text, &Rfc3339)
        .map(|t| EntryId {
            ms: (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
            seq: 0,
        })
        .map_err(|_| format!("{text}: neither an entry id (<ms>-<seq>) nor an RFC 3339 time"))
}

impl ReconcileArgs {
    /// Refuses, before connecting, a range that cannot hold anything.
    pub fn validate(&self) -> Result<(), String> {
        crate::streams::validate_key(&self.stream, "--stream")?;
        if let (Some(from), Some(to)) = (self.from, self.to) {
            if from > to {
                return Err(format!(
                    "--from {from} is after --to {to}: the range is empty (swap them?)"
                ));
            }
        }
        Ok(())
    }

    /// The strict routes, read before connecting.
    pub fn load(&self) -> Result<FileConfig, String> {
        match &self.config {
            Some(path) => FileConfig::load(path).map_err(|e| e.to_string()),
            None => FileConfig::parse("", "the built-in routes").map_err(|e| e.to_string()),
        }
    }
}

/// What one stream entry in the range is, for the persister's group.
#[derive(Debug, Default)]
struct StreamSide {
    /// Strict events: event id → its first entry id.
    strict: HashMap<Uuid, EntryId>,
    /// Every decodable event id in the range (a row's event may come back under a new entry).
    all: HashSet<Uuid>,
    entries: u64,
}

/// An entry as `XRANGE` returns it: its id and its field/value pairs.
type RawEntry = (String, Vec<(Vec<u8>, Vec<u8>)>);

async fn scan_stream(
    conn: &mut MultiplexedConnection,
    args: &ReconcileArgs,
    config: &FileConfig,
) -> anyhow::Result<StreamSide> {
    let limits = Limits {
        max_data_bytes: config.tuning.max_data_bytes,
    };
    let mut side = StreamSide::default();
    let start = args.from.map_or("-".to_owned(), |f| f.to_string());
    let end = args.to.map_or("+".to_owned(), |t| t.to_string());
    let mut progress = Progress::new("reading the stream", None);
    pages(
        conn,
        &args.stream,
        &start,
        &end,
        1000,
        |page: Vec<RawEntry>| {
            side.entries += page.len() as u64;
            progress.add(page.len() as u64);
            for (id, pairs) in page {
                let Ok(entry_id) = id.parse::<EntryId>() else {
                    continue;
                };
                let fields: streamfleet::Fields = pairs.into_iter().collect();
                let Ok(event) = decode(&args.stream, entry_id, &fields, &limits) else {
                    continue; // malformed: a dead letter, never a row
                };
                side.all.insert(event.id);
                let other_group = fields
                    .get(REDRIVE_GROUP_FIELD.as_bytes())
                    .is_some_and(|g| g != args.group.as_bytes());
                let strict = config
                    .routes
                    .lookup(&event.channel)
                    .is_some_and(|(_, route)| route.strict);
                if strict && !other_group {
                    side.strict.entry(event.id).or_insert(entry_id);
                }
            }
            true
        },
    )
    .await?;
    progress.finish();
    Ok(side)
}

/// Entries of the range the group has not settled: pending, or not delivered yet.
async fn in_flight(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
) -> anyhow::Result<(HashSet<EntryId>, Option<EntryId>)> {
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(1_000_000)
        .query_async(conn)
        .await
        .unwrap_or_default();
    // No group (yet): nothing delivered, so every entry is in flight, not missing.
    let last_delivered = groups(conn, stream)
        .await
        .unwrap_or_default()
        .into_iter()
        .find(|g| g.name == group)
        .map(|g| g.last_delivered);
    Ok((
        pending
            .iter()
            .filter_map(|(id, ..)| id.parse().ok())
            .collect(),
        last_delivered,
    ))
}

/// Entry ids the group dead-lettered.
async fn dead_lettered(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
) -> anyhow::Result<HashSet<EntryId>> {
    let mut out = HashSet::new();
    let key = format!("{stream}{}", streamfleet::DLQ_SUFFIX);
    pages(
        conn,
        &key,
        "-",
        "+",
        1000,
        |page: Vec<(String, HashMap<String, String>)>| {
            for (_, fields) in page {
                if fields.get("dlq_group").map(String::as_str) == Some(group) {
                    if let Some(id) = fields.get("dlq_entry_id").and_then(|i| i.parse().ok()) {
                        out.insert(id);
                    }
                }
            }
            true
        },
    )
    .await?;
    Ok(out)
}

pub async fn run(
    client: redis::Client,
    store: EventStore,
    args: ReconcileArgs,
    config: FileConfig,
    output: Output,
) -> anyhow::Result<()> {
    let mut conn = connect(&client).await?;
    let side = scan_stream(&mut conn, &args, &config).await?;
    let (pending, last_delivered) = in_flight(&mut conn, &args.stream, &args.group).await?;
    let dead = dead_lettered(&mut conn, &args.stream, &args.group).await?;

    // Stream → PostgreSQL.
    let ids: Vec<Uuid> = side.strict.keys().copied().collect();
    let mut persisted = HashSet::new();
    for chunk in ids.chunks(1000) {
        persisted.extend(
            store
                .existing(chunk)
                .await
                .context("reading events from PostgreSQL")?,
        );
    }
    let (mut missing_in_pg, mut unsettled, mut dead_count) = (Vec::new(), 0u64, 0u64);
    for (id, entry) in &side.strict {
        if persisted.contains(id) {
            continue;
        }
        if pending.contains(entry) || last_delivered.is_none_or(|l| *entry > l) {
            unsettled += 1;
        } else if dead.contains(entry) {
            dead_count += 1;
        } else {
            missing_in_pg.push((*entry, *id));
        }
    }
    missing_in_pg.sort();

    // PostgreSQL → stream: rows persisted from the range whose event is no longer in it.
    let mut missing_in_stream = Vec::new();
    // `events_of_stream` is exclusive: start just below `from`.
    let mut after = args.from.and_then(|f| match (f.ms, f.seq) {
        (0, 0) => None,
        (ms, 0) => Some(EntryId {
            ms: ms - 1,
            seq: u64::MAX,
        }),
        (ms, seq) => Some(EntryId { ms, seq: seq - 1 }),
    });
    let mut rows = 0u64;
    'rows: loop {
        let page = store
            .events_of_stream(&args.stream, after, 1000)
            .await
            .context("reading events from PostgreSQL")?;
        let Some(tail) = page.last() else { break };
        after = tail.stream_id.parse().ok();
        let full = page.len() == 1000;
        for row in page {
            let Ok(entry) = row.stream_id.parse::<EntryId>() else {
                continue;
            };
            if args.to.is_some_and(|to| entry > to) {
                break 'rows;
            }
            rows += 1;
            if !side.all.contains(&row.event_id) {
                missing_in_stream.push((entry, row.event_id));
            }
        }
        if !full {
            break;
        }
    }

    let json = json!({
        "stream": args.stream,
        "group": args.group,
        "entries": side.entries,
        "strict_events": side.strict.len(),
        "rows": rows,
        "persisted": side.strict.len() - missing_in_pg.len() - unsettled as usize - dead_count as usize,
        "in_flight": unsettled,
        "dead_lettered": dead_count,
        "missing_in_postgres": missing_in_pg.iter().map(|(e, id)| json!({"entry_id": e.to_string(), "event_id": id.to_string()})).collect::<Vec<_>>(),
        "missing_in_stream": missing_in_stream.iter().map(|(e, id)| json!({"stream_id": e.to_string(), "event_id": id.to_string()})).collect::<Vec<_>>(),
    });
    if output == Output::Json {
        print(output, &json, &Table::new(&[]), "");
    } else {
        println!(
            "{}: {} entries read, {} strict events; {} rows persisted from it",
            args.stream,
            side.entries,
            side.strict.len(),
            rows
        );
        println!(
            "  in flight for group {} (pending or not delivered yet): {unsettled}; dead-lettered by it: {dead_count}",
            args.group
        );
        let mut table = Table::new(&["MISSING IN", "ENTRY", "EVENT ID"]);
        for (e, id) in &missing_in_pg {
            table.row(vec!["postgres".into(), e.to_string(), id.to_string()]);
        }
        for (e, id) in &missing_in_stream {
            table.row(vec!["stream".into(), e.to_string(), id.to_string()]);
        }
        print(output, &json, &table, "  nothing missing on either side");
    }
    if !missing_in_pg.is_empty() || !missing_in_stream.is_empty() {
        anyhow::bail!(
            "{} strict event(s) missing in PostgreSQL, {} row(s) whose event is missing in the stream",
            missing_in_pg.len(),
            missing_in_stream.len()
        );
    }
    Ok(())
}
