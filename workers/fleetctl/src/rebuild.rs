//! `fleetctl replay --from-postgres`: a stream rebuilt from the `events` table after Redis lost
//! its data (a `FLUSHALL`, a failover to an empty replica). Every row persisted from the stream
//! goes back as a v1 entry, in its original entry order, with its event id (entry ids are new):
//! a group that reads them again deduplicates by event id (the persister writes no second row),
//! and the groups named with `--group` are placed after them, so they are not delivered again.
//!
//! Only what PostgreSQL holds comes back: the strict events (the persister's), without `key`
//! (not a column: their order key becomes their channel). A rebuild refuses a stream that is not
//! empty (an interrupted rebuild would be doubled) unless `--force`.

use anyhow::Context;
use serde_json::json;
use time::format_description::well_known::Rfc3339;

use crate::output::{print, Output, Table};
use crate::progress::Progress;
use streamfleet::runtime::conn::Conn;
use streamfleet::store::read::StoredEvent;
use streamfleet::store::EventStore;
use streamfleet::EntryId;

/// Rows read and entries written per round trip.
const PAGE: i64 = 1000;

/// The v1 fields of a stored event.
fn fields(e: &StoredEvent) -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("v", "1".to_owned()),
        ("id", e.event_id.to_string()),
        ("type", e.event_type.clone()),
        ("channel", e.channel.clone()),
        ("source", e.source.clone()),
        ("time", e.occurred_at.format(&Rfc3339).unwrap_or_default()),
        ("data", e.data.clone()),
    ];
    if let Some(c) = &e.correlation_id {
        out.push(("correlation_id", c.clone()));
    }
    out
}

pub async fn run(
    conn: &mut Conn,
    store: &EventStore,
    stream: &str,
    groups: &[String],
    force: bool,
    dry_run: bool,
    output: Output,
) -> anyhow::Result<()> {
    let length: u64 = redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .with_context(|| format!("XLEN {stream}"))?;
    if length > 0 && !force && !dry_run {
        anyhow::bail!(
            "{stream} holds {length} entries: replay --from-postgres rebuilds a stream Redis lost. Its rows would be added again (consumers deduplicate them by event id); pass --force if that is what you want"
        );
    }
    let mut progress = Progress::new("rebuild", None);
    let mut after: Option<EntryId> = None;
    let (mut written, mut first, mut last): (u64, Option<String>, Option<String>) = (0, None, None);
    loop {
        let rows = store
            .events_of_stream(stream, after, PAGE)
            .await
            .context("reading events from PostgreSQL")?;
        let Some(tail) = rows.last() else { break };
        after =
            Some(tail.stream_id.parse().with_context(|| {
                format!("events.stream_id {} is not an entry id", tail.stream_id)
            })?);
        if !dry_run {
            let mut pipe = redis::pipe();
            for e in &rows {
                pipe.cmd("XADD").arg(stream).arg("*").arg(fields(e));
            }
            let ids: Vec<String> = pipe
                .query_async(conn)
                .await
                .with_context(|| format!("XADD to {stream}"))?;
            first = first.or_else(|| ids.first().cloned());
            last = ids.last().cloned().or(last);
        }
        written += rows.len() as u64;
        progress.add(rows.len() as u64);
        if (rows.len() as i64) < PAGE {
            break;
        }
    }
    progress.finish();
    let mut placed = Vec::new();
    if let (Some(last), false) = (&last, dry_run) {
        for group in groups {
            // Created at the last rebuilt entry, or moved there if a worker created it meanwhile.
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(group)
                .arg(last)
                .query_async(conn)
                .await;
            match created {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {
                    let () = redis::cmd("XGROUP")
                        .arg("SETID")
                        .arg(stream)
                        .arg(group)
                        .arg(last)
                        .query_async(conn)
                        .await
                        .with_context(|| format!("XGROUP SETID {stream} {group} {last}"))?;
                }
                Err(e) => return Err(e).with_context(|| format!("XGROUP CREATE {stream} {group}")),
            }
            placed.push(group.clone());
        }
    }
    let json = json!({
        "stream": stream,
        "events": written,
        "dry_run": dry_run,
        "first_entry_id": first,
        "last_entry_id": last,
        "groups_after_them": placed,
    });
    match output {
        Output::Json => print(output, &json, &Table::new(&[]), ""),
        Output::Table if dry_run => {
            println!(
                "dry run: {written} events of {stream} in PostgreSQL would be added back to it"
            )
        }
        Output::Table => {
            println!(
                "{stream}: {written} events added back from PostgreSQL ({} .. {}), event ids kept",
                first.as_deref().unwrap_or("-"),
                last.as_deref().unwrap_or("-")
            );
            for g in &placed {
                println!("  group {g} placed after them: they are not delivered to it again");
            }
            println!("  other groups read them as their workers create them, and deduplicate by event id");
        }
    }
    Ok(())
}
