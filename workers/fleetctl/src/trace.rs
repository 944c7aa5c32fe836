//! `fleetctl trace <event-id>`: where one event is. Its stream entries (a producer's retry gives
//! several), each group's state for each (pending at a consumer and how often delivered,
//! acknowledged, dead-lettered, not delivered yet), its dead letters, its PostgreSQL row and its
//! correlation id.
//!
//! Streams have no index by event id: a UUIDv7's time says where to look (entries within
//! `--window` of it), and the PostgreSQL row names its entry; another UUID means reading the whole
//! stream.

use std::collections::HashMap;

use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::groups_info::{groups, GroupInfo};
use crate::output::{print, Output, Table};
use crate::progress::Progress;
use crate::redis_read::{connect, pages};
use streamfleet::runtime::conn::Conn;
use streamfleet::runtime::connect::RedisTarget;
use streamfleet::store::EventStore;
use streamfleet::{EntryId, REDRIVE_GROUP_FIELD};

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The event id (the v1 `id` field).
    event_id: Uuid,

    /// The streams to look in (comma-separated keys).
    #[arg(long, env = "FLEET_STREAMS", value_delimiter = ',', required = true)]
    streams: Vec<String>,

    /// For a UUIDv7: look at entries within this many seconds of its time.
    #[arg(long, default_value_t = 3600)]
    window_s: u64,
}

/// One stream entry of the event.
struct Found {
    stream: String,
    id: EntryId,
    fields: HashMap<String, String>,
}

/// Entries read per `XRANGE`.
const PAGE: usize = 1000;

async fn find(
    conn: &mut Conn,
    stream: &str,
    event_id: &str,
    (start, end): (String, String),
) -> anyhow::Result<Vec<Found>> {
    let mut out = Vec::new();
    let mut progress = Progress::new("searching", None);
    pages(
        conn,
        stream,
        &start,
        &end,
        PAGE,
        |page: Vec<(String, HashMap<String, String>)>| {
            progress.add(page.len() as u64);
            for (id, fields) in page {
                if fields.get("id").map(String::as_str) == Some(event_id) {
                    if let Ok(id) = id.parse() {
                        out.push(Found {
                            stream: stream.to_owned(),
                            id,
                            fields,
                        });
                    }
                }
            }
            true
        },
    )
    .await?;
    progress.finish();
    Ok(out)
}

/// The dead letters of `stream` for entries `ids` (written after the oldest of them).
async fn dead_letters(
    conn: &mut Conn,
    stream: &str,
    ids: &[EntryId],
) -> anyhow::Result<Vec<(String, HashMap<String, String>)>> {
    let Some(oldest) = ids.iter().min() else {
        return Ok(Vec::new());
    };
    let wanted: Vec<String> = ids.iter().map(EntryId::to_string).collect();
    let key = format!("{stream}{}", streamfleet::DLQ_SUFFIX);
    let mut out = Vec::new();
    let start = format!("{}-0", oldest.ms);
    pages(
        conn,
        &key,
        &start,
        "+",
        PAGE,
        |page: Vec<(String, HashMap<String, String>)>| {
            out.extend(page.into_iter().filter(|(_, f)| {
                f.get("dlq_entry_id").is_some_and(|e| wanted.contains(e))
                    && f.get("dlq_stream").map(String::as_str) == Some(stream)
            }));
            true
        },
    )
    .await?;
    Ok(out)
}

/// What group `group` did with entry `id`.
async fn state(
    conn: &mut Conn,
    found: &Found,
    group: &GroupInfo,
    dead: &[(String, HashMap<String, String>)],
) -> anyhow::Result<Value> {
    let (id, name) = (found.id.to_string(), group.name.as_str());
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(&found.stream)
        .arg(name)
        .arg(&id)
        .arg(&id)
        .arg(1)
        .query_async(conn)
        .await
        .with_context(|| format!("XPENDING {} {name}", found.stream))?;
    if let Some((_, consumer, idle_ms, deliveries)) = pending.into_iter().next() {
        return Ok(
            json!({"state": "pending", "consumer": consumer, "idle_ms": idle_ms, "deliveries": deliveries}),
        );
    }
    if found.id > group.last_delivered {
        return Ok(json!({"state": "not_delivered"}));
    }
    if let Some((dlq_id, f)) = dead.iter().find(|(_, f)| {
        f.get("dlq_entry_id") == Some(&id) && f.get("dlq_group").map(String::as_str) == Some(name)
    }) {
        return Ok(
            json!({"state": "dead_lettered", "dead_letter": dlq_id, "reason": f.get("dlq_reason")}),
        );
    }
    if let Some(for_group) = found.fields.get(REDRIVE_GROUP_FIELD) {
        if for_group != name {
            return Ok(
                json!({"state": "skipped", "why": format!("redriven for group {for_group}")}),
            );
        }
    }
    Ok(json!({"state": "acknowledged"}))
}

fn describe(state: &Value) -> String {
    match state["state"].as_str().unwrap_or("") {
        "pending" => format!(
            "pending at {} (idle {} ms, delivered {} time(s))",
            state["consumer"].as_str().unwrap_or(""),
            state["idle_ms"],
            state["deliveries"]
        ),
        "not_delivered" => "not delivered yet".into(),
        "dead_lettered" => format!(
            "dead-lettered ({}, {})",
            state["reason"].as_str().unwrap_or(""),
            state["dead_letter"].as_str().unwrap_or("")
        ),
        "skipped" => format!(
            "acknowledged, skipped: {}",
            state["why"].as_str().unwrap_or("")
        ),
        other => other.to_owned(),
    }
}

pub async fn run(
    target: RedisTarget,
    store: Option<EventStore>,
    args: TraceArgs,
    output: Output,
) -> anyhow::Result<()> {
    let mut conn = connect(&target).await?;
    let event_id = args.event_id.to_string();
    let row = match &store {
        Some(store) => store
            .event(args.event_id)
            .await
            .context("reading the event from PostgreSQL")?,
        None => None,
    };
    // Where to look: around a UUIDv7's time, else everywhere.
    let range = args
        .event_id
        .get_timestamp()
        .filter(|_| args.event_id.get_version_num() == 7)
        .map(|ts| {
            let (s, n) = ts.to_unix();
            let ms = s * 1000 + u64::from(n) / 1_000_000;
            let w = args.window_s * 1000;
            (format!("{}-0", ms.saturating_sub(w)), format!("{}", ms + w))
        })
        .unwrap_or_else(|| ("-".into(), "+".into()));
    let mut found = Vec::new();
    for stream in &args.streams {
        found.extend(find(&mut conn, stream, &event_id, range.clone()).await?);
        // The row names its entry, wherever it is.
        if let Some(r) = row.as_ref().filter(|r| &r.stream == stream) {
            if !found
                .iter()
                .any(|f| f.stream == r.stream && f.id.to_string() == r.stream_id)
            {
                let exact = (r.stream_id.clone(), r.stream_id.clone());
                found.extend(find(&mut conn, stream, &event_id, exact).await?);
            }
        }
    }
    let mut entries = Vec::new();
    let mut table = Table::new(&["STREAM", "ENTRY", "GROUP", "STATE"]);
    let mut all_dead = Vec::new();
    for stream in &args.streams {
        let here: Vec<&Found> = found.iter().filter(|f| &f.stream == stream).collect();
        if here.is_empty() {
            continue;
        }
        let ids: Vec<EntryId> = here.iter().map(|f| f.id).collect();
        let dead = dead_letters(&mut conn, stream, &ids).await?;
        // A stream without groups answers XINFO GROUPS with an empty list; a missing one is an error.
        let groups = groups(&mut conn, stream).await.unwrap_or_default();
        for f in here {
            let mut states = Vec::new();
            for g in &groups {
                let s = state(&mut conn, f, g, &dead).await?;
                table.row(vec![
                    stream.clone(),
                    f.id.to_string(),
                    g.name.clone(),
                    describe(&s),
                ]);
                states.push(json!({"group": g.name, "state": s}));
            }
            if groups.is_empty() {
                table.row(vec![
                    stream.clone(),
                    f.id.to_string(),
                    "(no group)".into(),
                    String::new(),
                ]);
            }
            entries.push(json!({"stream": stream, "entry_id": f.id.to_string(), "fields": f.fields, "groups": states}));
        }
        all_dead.extend(
            dead.into_iter()
                .map(|(id, f)| json!({"stream": stream, "id": id, "fields": f})),
        );
    }
    let first = found.first().map(|f| &f.fields);
    let correlation = first
        .and_then(|f| f.get("correlation_id").cloned())
        .or_else(|| row.as_ref().and_then(|r| r.correlation_id.clone()));
    let json = json!({
        "event_id": event_id,
        "type": first.and_then(|f| f.get("type")),
        "channel": first.and_then(|f| f.get("channel")),
        "correlation_id": correlation,
        "entries": entries,
        "dead_letters": all_dead,
        "postgres": row.as_ref().map(|r| json!({
            "stream": r.stream, "stream_id": r.stream_id,
            "persisted_at": r.persisted_at.format(&Rfc3339).unwrap_or_default(),
        })),
    });
    if output == Output::Json {
        print(output, &json, &Table::new(&[]), "");
    } else {
        let what = first.map_or(String::new(), |f| {
            format!(
                ": {} on {}",
                f.get("type").map_or("?", String::as_str),
                f.get("channel").map_or("?", String::as_str)
            )
        });
        println!("event {event_id}{what}");
        if let Some(c) = &correlation {
            println!("correlation id: {c}");
        }
        print(
            output,
            &json,
            &table,
            "no stream entry found (look in other streams, or widen --window-s)",
        );
        for d in &all_dead {
            println!(
                "dead letter {} in {}:dlq: {} by group {}: {}",
                d["id"].as_str().unwrap_or(""),
                d["stream"].as_str().unwrap_or(""),
                d["fields"]["dlq_reason"].as_str().unwrap_or(""),
                d["fields"]["dlq_group"].as_str().unwrap_or(""),
                d["fields"]["dlq_error"].as_str().unwrap_or("")
            );
        }
        match (&row, &store) {
            (Some(r), _) => println!(
                "postgres: persisted at {} from {} {}",
                r.persisted_at.format(&Rfc3339).unwrap_or_default(),
                r.stream,
                r.stream_id
            ),
            (None, Some(_)) => println!("postgres: no row"),
            (None, None) => println!("postgres: not asked (give --database-url)"),
        }
    }
    if found.is_empty() && row.is_none() {
        anyhow::bail!("event {event_id} not found in {}", args.streams.join(", "));
    }
    Ok(())
}
