//! `fleetctl status`: the fleet on one screen, per stream and group: lag, pending entries and the
//! age of the oldest, dead letters, the checkpoint and the consumers. `--check` turns it into a
//! health check for scripts and CI (exit 1, one line per problem on stderr), so the judgement of
//! what needs attention lives in one place rather than in every operator's head.

use std::time::Duration;

use clap::Args;
use serde_json::json;

use crate::duration::{self, human};
use crate::groups::checkpoint;
use crate::lag::{age_text, lag_text, snapshot_json};
use crate::output::{print, Output, Table};
use crate::progress::Progress;
use crate::snapshot::{self, DeadLetters, Snapshot};
use crate::streams::{self, Found, Selection};
use streamfleet::runtime::connect::RedisTarget;
use streamfleet::store::EventStore;

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    select: Selection,

    /// Exit 1, with one line per problem on stderr, when something needs attention (the checks
    /// are listed below); exit 0 when healthy.
    #[arg(long)]
    check: bool,

    /// A consumer silent this long while owning pending entries is dead (its process is gone).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration::parse)]
    dead_after: Duration,

    /// The gateways' connection registry (their FLEET_GATEWAY_REGISTRY_KEY): live instances and
    /// their connections per topic are shown when there are any.
    #[arg(
        long,
        env = "FLEET_GATEWAY_REGISTRY_KEY",
        value_name = "KEY",
        default_value = "streamfleet:gateways"
    )]
    gateway_registry: String,

    /// The configuration whose `[[retention]]` rules are shown per stream, with what the next
    /// `fleetctl trim` would remove.
    #[arg(long, env = "FLEET_CONFIG")]
    config: Option<std::path::PathBuf>,

    /// A pending entry older than this (by its id's time, on Redis's clock) needs attention.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = duration::parse)]
    max_pending_age: Duration,
}

impl StatusArgs {
    pub fn validate(&self) -> Result<(), String> {
        self.select.validate()
    }
}

/// What `--check` judges, one line each (also the command's long help).
pub const CHECKS: &str = "\
--check exits 1, with one line per problem on stderr, when:
  - a consumer owns pending entries and has been silent longer than --dead-after (it is gone);
  - a stream has dead letters (<stream>:dlq is not empty), or its :dlq key is not a stream;
  - a group's oldest pending entry is older than --max-pending-age;
  - a group's lag is unknown (KEDA cannot scale on it);
  - a named stream does not exist or has no consumer group, a glob matches no stream, or
    --group's group is missing on a named stream;
  - with --database-url, PostgreSQL's checkpoints cannot be read;
and exits 0 when none of these holds.";

/// Everything that needs attention, one line each saying what is wrong and what to do.
pub fn problems(
    snap: &Snapshot,
    found: &Found,
    dead_after_ms: u64,
    max_age_ms: u64,
) -> Vec<String> {
    let mut out = found.missing_lines();
    for glob in &found.unmatched {
        out.push(format!(
            "{glob}: no stream matches (check the glob; streams appear with their first entry)"
        ));
    }
    for s in &snap.streams {
        let st = &s.stream;
        match &s.dead_letters {
            DeadLetters::WrongType(kind) => out.push(format!(
                "{st}: {} holds a {kind}, not a stream: workers cannot write dead letters and leave those entries pending; rename or delete that key",
                s.dlq_key()
            )),
            DeadLetters::Count { total, by_group } if *total > 0 => {
                let whose = by_group.as_ref().map_or_else(String::new, |by| {
                    let parts: Vec<String> = by
                        .iter()
                        .map(|(g, n)| format!("{}: {n}", if g.is_empty() { "(no group)" } else { g }))
                        .collect();
                    format!(" ({})", parts.join(", "))
                });
                out.push(format!(
                    "{st}: {total} dead letter(s) in {}{whose}: see `fleetctl dlq list --stream {st}`, then redrive or purge them",
                    s.dlq_key()
                ));
            }
            DeadLetters::Count { .. } => {}
        }
        if let Some(g) = &s.group_missing {
            out.push(format!(
                "{st}: no group {g} (`fleetctl groups create --streams {st} --group {g}` creates it)"
            ));
        } else if s.groups.is_empty() {
            out.push(format!(
                "{st}: no consumer group reads it (`fleetctl groups create --streams {st} --group <group>`)"
            ));
        }
        for g in &s.groups {
            let name = &g.info.name;
            for c in g.dead(dead_after_ms) {
                out.push(format!(
                    "{st} {name}: consumer {} is dead: silent {} while owning {} pending entries; a running consumer of {name} reclaims them after its claim_idle_ms: start one if none runs",
                    c.name,
                    human(c.idle_ms),
                    c.pending
                ));
            }
            if let (Some(id), Some(age)) = (g.oldest_pending, g.oldest_pending_age_ms(snap.now_ms))
            {
                if age > max_age_ms {
                    out.push(format!(
                        "{st} {name}: oldest pending entry {id} is {} old (over {}): a stuck or failing consumer? see `fleetctl pending --streams {st} --group {name}` and the workers' logs",
                        human(age),
                        human(max_age_ms)
                    ));
                }
            }
            if g.info.lag.is_none() {
                out.push(format!(
                    "{st} {name}: lag unknown (entries were deleted after the group's position, or Redis is older than 7.0): KEDA cannot scale on it; it is known again once the group has read to the stream's end"
                ));
            }
        }
    }
    out
}

pub async fn run(
    target: RedisTarget,
    store: Option<EventStore>,
    args: StatusArgs,
    output: Output,
) -> anyhow::Result<bool> {
    let mut conn = crate::redis_read::connect(&target).await?;
    let found = streams::resolve(&mut conn, &args.select.streams).await?;
    let snap = snapshot::take(&mut conn, &found, args.select.group.as_deref(), true).await?;
    let pairs: u64 = snap.streams.iter().map(|s| s.groups.len() as u64).sum();
    let mut progress = Progress::new("reading checkpoints", Some(pairs));
    let mut checkpoints = Vec::new();
    // PostgreSQL failing (down, not migrated) must not hide the rest of the screen: it is said
    // once, and the checkpoints in Redis are shown meanwhile.
    let mut store = store;
    let mut store_error = None;
    for s in &snap.streams {
        for g in &s.groups {
            let read = checkpoint(store.as_ref(), &mut conn, &s.stream, &g.info.name).await;
            let read = match read {
                Err(e) if store.is_some() => {
                    store_error = Some(format!(
                        "PostgreSQL's checkpoints unreadable ({e:#}): only those in Redis are shown; check --database-url, run `fleetctl migrate`, or leave --database-url out"
                    ));
                    store = None;
                    checkpoint(None, &mut conn, &s.stream, &g.info.name).await?
                }
                read => read?,
            };
            checkpoints.push(read);
            progress.add(1);
        }
    }
    progress.finish();
    let dead_after_ms = args.dead_after.as_millis() as u64;
    let max_age_ms = args.max_pending_age.as_millis() as u64;
    let mut problems = problems(&snap, &found, dead_after_ms, max_age_ms);
    problems.extend(store_error);

    let mut json = snapshot_json(&snap, &found, dead_after_ms);
    let mut next = checkpoints.iter();
    for s in json["streams"].as_array_mut().into_iter().flatten() {
        for g in s["groups"].as_array_mut().into_iter().flatten() {
            g["checkpoint"] = match next.next().copied().flatten() {
                Some((id, kept)) => json!({"id": id.to_string(), "kept_in": kept.as_str()}),
                None => json!(null),
            };
        }
    }
    // Without read access to the registry (an ACL user for the streams only), the rest is shown.
    let gateways = crate::gateways::read(&mut conn, &args.gateway_registry)
        .await
        .unwrap_or_default();
    json["gateways"] = crate::gateways::to_json(&gateways);
    let retention = match &args.config {
        Some(path) => retention(&mut conn, path, &snap).await?,
        None => Vec::new(),
    };
    json["retention"] = json!(retention
        .iter()
        .map(|p| json!({
            "stream": p.stream,
            "rule": p.rule,
            "length": p.length,
            "next_trim_before": p.min_id.map(|id| id.to_string()),
            "removes": p.removes,
            "held_by": p.held_by.as_ref().map(|(g, mark)| json!({"group": g, "unsettled_from": mark.to_string()})),
        }))
        .collect::<Vec<_>>());
    json["problems"] = json!(problems);
    json["healthy"] = json!(problems.is_empty());

    let mut table = Table::new(&[
        "STREAM",
        "GROUP",
        "LAG",
        "PENDING",
        "OLDEST",
        "DLQ",
        "CHECKPOINT",
        "CONSUMERS",
    ]);
    let mut next = checkpoints.iter();
    for s in &snap.streams {
        let dlq = |group: Option<&str>| match (&s.dead_letters, group) {
            (DeadLetters::WrongType(kind), _) => format!("not a stream ({kind})"),
            (d, Some(g)) if d.of_group(g).is_some() => d.of_group(g).unwrap_or(0).to_string(),
            (d, _) if d.total() == 0 => "0".into(),
            (d, _) => format!("{} (all groups)", d.total()),
        };
        let missing_group = s
            .group_missing
            .clone()
            .or_else(|| s.groups.is_empty().then(|| "-".into()));
        if let Some(g) = missing_group {
            let note = if g == "-" {
                "no groups"
            } else {
                "no such group"
            };
            table.row(vec![
                s.stream.clone(),
                g,
                "-".into(),
                "-".into(),
                "-".into(),
                dlq(None),
                "-".into(),
                note.into(),
            ]);
        }
        for g in &s.groups {
            let checkpoint = match next.next().copied().flatten() {
                Some((id, kept)) => format!("{id} ({})", kept.as_str()),
                None => "none".into(),
            };
            table.row(vec![
                s.stream.clone(),
                g.info.name.clone(),
                lag_text(g.info.lag),
                g.info.pending.to_string(),
                age_text(g.oldest_pending_age_ms(snap.now_ms)),
                dlq(Some(&g.info.name)),
                checkpoint,
                g.consumers_summary(dead_after_ms),
            ]);
        }
    }
    print(output, &json, &table, "no streams");
    if output == Output::Table && !retention.is_empty() {
        let mut t = Table::new(&["STREAM", "RETENTION", "NEXT TRIM", "HELD BY"]);
        for p in &retention {
            let next = match (p.min_id, p.removes) {
                (None, _) => "nothing".to_owned(),
                (Some(id), Some(n)) => format!("{n} entries, before {id}"),
                (Some(id), None) => format!("entries before {id}"),
            };
            let held = p
                .held_by
                .as_ref()
                .map(|(g, mark)| format!("{g} (unsettled from {mark})"))
                .unwrap_or_else(|| "-".into());
            t.row(vec![p.stream.clone(), p.rule.clone(), next, held]);
        }
        println!();
        print!("{}", t.render());
    }
    if output == Output::Table && !gateways.is_empty() {
        println!();
        print!("{}", crate::gateways::table(&gateways).render());
    }
    if output == Output::Table {
        if let Some(note) = snap.without_groups_note(args.select.group.as_deref()) {
            println!("{note}");
        }
    }
    if args.check {
        // Every problem on stderr, a named key that holds no stream among them: exit 1.
        for p in &problems {
            eprintln!("{p}");
        }
        return Ok(problems.is_empty());
    }
    if output == Output::Table && !problems.is_empty() {
        println!("\nneeds attention:");
        for p in &problems {
            println!("  - {p}");
        }
    }
    // As `lag`, `pending` and `checkpoints`: a named key that holds no stream is an error.
    if let Some(missing) = found.missing_error() {
        anyhow::bail!("{missing}");
    }
    Ok(true)
}

/// What the next `fleetctl trim` would do to the streams shown, by the rules of `path`.
async fn retention(
    conn: &mut streamfleet::runtime::conn::Conn,
    path: &std::path::Path,
    snap: &Snapshot,
) -> anyhow::Result<Vec<crate::trim::Plan>> {
    let config = streamfleet::runtime::config::FileConfig::load(path)?;
    if config.retention.is_empty() {
        return Ok(Vec::new());
    }
    let now_ms = crate::trim::redis_now_ms(conn).await?;
    let mut out = Vec::new();
    for (stream, rule) in crate::trim::matched(conn, &config).await? {
        if snap.streams.iter().any(|s| s.stream == stream) {
            out.push(crate::trim::plan(conn, &stream, &rule, now_ms).await?);
        }
    }
    Ok(out)
}
