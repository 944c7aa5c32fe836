//! `fleetctl replay`: move a consumer group back (`XGROUP SETID`) to its checkpoint, an entry id
//! or a time, so that the entries after it are delivered to the group again. Effects are
//! idempotent (the persister's rows, the projector's `XACK`-gated effects, within their documented
//! limits), so a replay re-applies nothing already applied, except what docs/src/semantics.md says (the
//! projector's counters and history beyond the dedup window, the notifier's messages).
//!
//! Like `kafka-consumer-groups --reset-offsets`, it refuses while consumers of the group are
//! active (their reads in flight would interleave with the replay) unless `--force`, and
//! `--dry-run` says what would happen.

use anyhow::Context;
use clap::{ArgGroup, Args};
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::entry_ids::{self, BEGINNING};
use crate::groups::checkpoint;
use crate::groups_info::{active_consumers, group_info, ACTIVE_MS};
use crate::output::Output;
use crate::progress::Progress;
use streamfleet::runtime::conn::Conn;
use streamfleet::runtime::connect::RedisTarget;
use streamfleet::store::EventStore;
use streamfleet::EntryId;

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("to").required(true).args(["to_checkpoint", "to_id", "to_time", "from_postgres"])))]
pub struct ReplayArgs {
    /// The stream.
    #[arg(long, env = "FLEET_STREAM")]
    stream: String,

    /// The consumer group to move (with --from-postgres: the groups to place after the rebuilt
    /// entries, comma-separated; none is fine).
    #[arg(long, env = "FLEET_GROUP", value_delimiter = ',')]
    group: Vec<String>,

    /// To the group's checkpoint (PostgreSQL's with --database-url, else the one beside the
    /// stream in Redis): entries after it are delivered again.
    #[arg(long)]
    to_checkpoint: bool,

    /// To this entry id: entries after it are delivered again (0: from the beginning of the
    /// stream, every entry).
    #[arg(long, value_name = "ENTRY_ID")]
    to_id: Option<String>,

    /// To this time (RFC 3339): entries from the first one at or after it are delivered again.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    to_time: Option<OffsetDateTime>,

    /// Rebuild the stream from PostgreSQL's `events` table after Redis lost it (event ids kept,
    /// entry ids new); needs --database-url.
    #[arg(long)]
    from_postgres: bool,

    /// Say what would happen, change nothing.
    #[arg(long)]
    dry_run: bool,

    /// Replay although consumers of the group are active, or forward (skipping entries); rebuild
    /// into a stream that is not empty.
    #[arg(long)]
    force: bool,
}

fn parse_time(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|e| format!("{text}: not an RFC 3339 time (e.g. 2026-11-26T12:00:00Z): {e}"))
}

impl ReplayArgs {
    pub fn validate(&self, database: bool) -> Result<(), String> {
        crate::streams::validate_key(&self.stream, "--stream")?;
        if self.from_postgres {
            if !database {
                return Err(
                    "replay --from-postgres needs FLEET_DATABASE_URL (--database-url)".into(),
                );
            }
        } else if self.group.len() != 1 {
            return Err("replay: give one consumer group (--group or FLEET_GROUP)".into());
        }
        if let Some(id) = &self.to_id {
            entry_ids::parse_position("--to-id", id)?;
        }
        Ok(())
    }
}

/// Entries of `stream` with ids in (`after`, `upto`], counted a page at a time.
async fn count_between(
    conn: &mut Conn,
    stream: &str,
    after: EntryId,
    upto: EntryId,
) -> anyhow::Result<u64> {
    let mut count = 0;
    let mut progress = Progress::new("counting", None);
    let start = format!("({after}");
    // Only the ids are needed: each entry's fields are read as an opaque value.
    crate::redis_read::pages(
        conn,
        stream,
        &start,
        &upto.to_string(),
        10_000,
        |page: Vec<(String, redis::Value)>| {
            count += page.len() as u64;
            progress.add(page.len() as u64);
            true
        },
    )
    .await?;
    progress.finish();
    Ok(count)
}

/// The position that delivers again every entry at or after `t`: the highest possible id of the
/// millisecond before.
fn before_time(t: OffsetDateTime) -> EntryId {
    let ms = (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
    match ms {
        0 => EntryId { ms: 0, seq: 0 },
        ms => EntryId {
            ms: ms - 1,
            seq: u64::MAX,
        },
    }
}

pub async fn run(
    target: RedisTarget,
    store: Option<EventStore>,
    args: ReplayArgs,
    output: Output,
) -> anyhow::Result<()> {
    let mut conn = crate::redis_read::connect(&target).await?;
    if args.from_postgres {
        let store = store.expect("validated: a database URL");
        return crate::rebuild::run(
            &mut conn,
            &store,
            &args.stream,
            &args.group,
            args.force,
            args.dry_run,
            output,
        )
        .await;
    }
    let (stream, group) = (args.stream.as_str(), args.group[0].as_str());
    let info = group_info(&mut conn, stream, group).await?;
    let (target, why) = if args.to_checkpoint {
        match checkpoint(store.as_ref(), &mut conn, stream, group).await? {
            Some((position, kept)) => (position, format!("its checkpoint ({})", kept.as_str())),
            None => anyhow::bail!(
                "no checkpoint of group {group} on {stream}{}: use --to-id or --to-time",
                if store.is_none() {
                    " in Redis (the persister's are in PostgreSQL: give --database-url)"
                } else {
                    ""
                }
            ),
        }
    } else if let Some(id) = &args.to_id {
        match entry_ids::parse_position("--to-id", id).map_err(anyhow::Error::msg)? {
            BEGINNING => (BEGINNING, "the beginning of the stream".to_owned()),
            id => (id, format!("entry {id}")),
        }
    } else {
        let t = args.to_time.expect("one of the three, by clap");
        (before_time(t), t.format(&Rfc3339).unwrap_or_default())
    };
    let forward = target > info.last_delivered;
    let entries = if forward {
        count_between(&mut conn, stream, info.last_delivered, target).await?
    } else {
        count_between(&mut conn, stream, target, info.last_delivered).await?
    };
    let active = active_consumers(&mut conn, stream, group).await?;
    let json = json!({
        "stream": stream,
        "group": group,
        "from": info.last_delivered.to_string(),
        "to": target.to_string(),
        "to_what": why,
        "direction": if forward { "forward" } else { "back" },
        "entries": entries,
        "pending": info.pending,
        "active_consumers": active.iter().map(|c| json!({"name": c.name, "idle_ms": c.idle_ms})).collect::<Vec<_>>(),
        "dry_run": args.dry_run,
    });
    let what = if forward {
        format!(
            "skips {entries} entries never delivered to group {group}: they will not be processed"
        )
    } else {
        format!("delivers {entries} entries again to group {group}")
    };
    let summary = format!(
        "{stream}: group {group} from {} to {target} ({why}) {what}",
        info.last_delivered
    );
    let refused = if !active.is_empty() && !args.force {
        let names: Vec<String> = active
            .iter()
            .map(|c| format!("{} (idle {} ms)", c.name, c.idle_ms))
            .collect();
        Some(format!(
            "group {group} has active consumers: {}. Their reads in flight would interleave with the replay: stop the workers (scale them to 0), wait {} s, and run this again, or pass --force",
            names.join(", "),
            ACTIVE_MS / 1000
        ))
    } else if forward && !args.force {
        Some("moving a group forward skips entries; pass --force if that is what you want".into())
    } else {
        None
    };
    if let Some(reason) = refused {
        // A script reading the plan gets it, with why nothing was done, as a dry run that is
        // refused must not look like one that printed nothing.
        if output == Output::Json {
            let mut json = json;
            json["refused"] = json!(reason);
            crate::output::json(&json);
        }
        anyhow::bail!("{summary}; refused: {reason}");
    }
    if args.dry_run {
        print_result(output, &json, &format!("dry run: {summary}"));
        return Ok(());
    }
    let mut setid = redis::cmd("XGROUP");
    setid
        .arg("SETID")
        .arg(stream)
        .arg(group)
        .arg(target.to_string());
    // Keep the group's lag known (KEDA scales on it): the entries read move by what is replayed.
    if let Some(read) = info.entries_read {
        let read = if forward {
            read + entries
        } else {
            read.saturating_sub(entries)
        };
        setid.arg("ENTRIESREAD").arg(read);
    }
    let () = setid
        .query_async(&mut conn)
        .await
        .with_context(|| format!("XGROUP SETID {stream} {group} {target}"))?;
    print_result(output, &json, &format!("{summary}: done"));
    if info.pending > 0 && output == Output::Table {
        println!(
            "{} entries still pending in the group are delivered again by the workers' reclaim, as before",
            info.pending
        );
    }
    Ok(())
}

fn print_result(output: Output, json: &serde_json::Value, line: &str) {
    match output {
        Output::Json => crate::output::json(json),
        Output::Table => println!("{line}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_replays_from_the_first_entry_at_or_after_it() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(2_500_000_000).unwrap();
        let p = before_time(t);
        assert_eq!(
            p,
            EntryId {
                ms: 2499,
                seq: u64::MAX
            }
        );
        assert!(p < EntryId { ms: 2500, seq: 0 });
        assert!(p >= EntryId { ms: 2499, seq: 7 });
        assert_eq!(
            before_time(OffsetDateTime::UNIX_EPOCH),
            EntryId { ms: 0, seq: 0 }
        );
    }
}
