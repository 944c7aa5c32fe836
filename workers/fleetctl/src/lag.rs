//! `fleetctl lag` and `fleetctl pending`: how far each consumer group is behind, as
//! `kafka-consumer-groups --describe` says it for Kafka. `lag` is one line per group (entries not
//! delivered yet, entries delivered and not acknowledged, the age of the oldest of those, the
//! consumers); `pending` one line per consumer (what it owns, how long it has been silent, and
//! whether it is gone while owning entries: nothing delivers those again until another consumer
//! of the group reclaims them).
//!
//! The lag is the one KEDA's redis-streams scaler reads (`XINFO GROUPS` `lag`), shown as
//! `unknown` where Redis cannot tell (entries deleted after the group's position), never guessed.

use std::time::Duration;

use clap::Args;
use serde_json::{json, Value as Json};

use crate::duration::{self, human};
use crate::output::{print, Output, Table};
use crate::snapshot::{self, Snapshot};
use crate::streams::{self, Found, Selection};
use streamfleet::runtime::connect::RedisTarget;

#[derive(Debug, Args)]
pub struct LagArgs {
    #[command(flatten)]
    pub select: Selection,

    /// A consumer silent this long while owning pending entries is dead (its process is gone).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration::parse)]
    pub dead_after: Duration,
}

/// Which view of the groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// One line per group.
    Lag,
    /// One line per consumer.
    Pending,
}

/// The lag figure as shown: a count, or `unknown`.
pub fn lag_text(lag: Option<u64>) -> String {
    lag.map_or_else(|| "unknown".into(), |n| n.to_string())
}

/// The oldest pending age as shown: an age, or `-` when nothing is pending.
pub fn age_text(age_ms: Option<u64>) -> String {
    age_ms.map_or_else(|| "-".into(), human)
}

/// The JSON document `lag` and `pending` print (and `status` extends).
pub fn snapshot_json(snap: &Snapshot, found: &Found, dead_after_ms: u64) -> Json {
    let (missing, unmatched) = found.json();
    json!({
        "redis_time_ms": snap.now_ms,
        "dead_after_ms": dead_after_ms,
        "streams": snap.streams.iter().map(|s| s.json(snap.now_ms, dead_after_ms)).collect::<Vec<_>>(),
        "streams_without_groups": snap.without_groups,
        "missing": missing,
        "unmatched": unmatched,
    })
}

pub async fn run(
    target: RedisTarget,
    args: LagArgs,
    view: View,
    output: Output,
) -> anyhow::Result<()> {
    let mut conn = crate::redis_read::connect(&target).await?;
    let found = streams::resolve(&mut conn, &args.select.streams).await?;
    let snap = snapshot::take(&mut conn, &found, args.select.group.as_deref(), false).await?;
    let dead_after_ms = args.dead_after.as_millis() as u64;
    let table = match view {
        View::Lag => lag_table(&snap, dead_after_ms),
        View::Pending => pending_table(&snap, dead_after_ms),
    };
    print(
        output,
        &snapshot_json(&snap, &found, dead_after_ms),
        &table,
        "no streams",
    );
    if output == Output::Table {
        if let Some(note) = snap.without_groups_note(args.select.group.as_deref()) {
            println!("{note}");
        }
        for glob in &found.unmatched {
            eprintln!("no stream matches {glob}");
        }
        if view == View::Pending
            && snap
                .streams
                .iter()
                .flat_map(|s| &s.groups)
                .any(|g| g.dead(dead_after_ms).next().is_some())
        {
            println!(
                "dead: silent over {} while owning entries; a running consumer of its group reclaims them after claim_idle_ms (start one if none runs)",
                human(dead_after_ms)
            );
        }
    }
    if let Some(missing) = found.missing_error() {
        anyhow::bail!("{missing}");
    }
    Ok(())
}

/// One line per group; a stream without groups (or without `--group`'s) gets a line saying so.
pub fn lag_table(snap: &Snapshot, dead_after_ms: u64) -> Table {
    let mut t = Table::new(&[
        "STREAM",
        "GROUP",
        "LENGTH",
        "LAG",
        "PENDING",
        "OLDEST",
        "CONSUMERS",
    ]);
    for s in &snap.streams {
        let mut dash = |group: String, note: &str| {
            t.row(vec![
                s.stream.clone(),
                group,
                s.length.to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                note.into(),
            ])
        };
        if let Some(g) = &s.group_missing {
            dash(g.clone(), "no such group");
            continue;
        }
        if s.groups.is_empty() {
            dash("-".into(), "no groups");
        }
        for g in &s.groups {
            t.row(vec![
                s.stream.clone(),
                g.info.name.clone(),
                s.length.to_string(),
                lag_text(g.info.lag),
                g.info.pending.to_string(),
                age_text(g.oldest_pending_age_ms(snap.now_ms)),
                g.consumers_summary(dead_after_ms),
            ]);
        }
    }
    t
}

/// One line per consumer (a group without consumers gets one line with `-`).
pub fn pending_table(snap: &Snapshot, dead_after_ms: u64) -> Table {
    let mut t = Table::new(&["STREAM", "GROUP", "CONSUMER", "PENDING", "IDLE", "STATE"]);
    for s in &snap.streams {
        if let Some(g) = &s.group_missing {
            t.row(vec![
                s.stream.clone(),
                g.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "no such group".into(),
            ]);
        }
        for g in &s.groups {
            if g.consumers.is_empty() {
                t.row(vec![
                    s.stream.clone(),
                    g.info.name.clone(),
                    "-".into(),
                    g.info.pending.to_string(),
                    "-".into(),
                    "no consumers".into(),
                ]);
            }
            for c in &g.consumers {
                t.row(vec![
                    s.stream.clone(),
                    g.info.name.clone(),
                    c.name.clone(),
                    c.pending.to_string(),
                    human(c.idle_ms),
                    c.state(dead_after_ms).into(),
                ]);
            }
        }
    }
    t
}
