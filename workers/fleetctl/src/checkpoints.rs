//! `fleetctl checkpoints`: each group's checkpoint where it is kept, PostgreSQL's `checkpoints`
//! table (the persister's, with `--database-url`) and `<stream>:checkpoints` in Redis (workers
//! without PostgreSQL), beside the group's last delivered id and lag. Both are shown, not the one
//! `replay --to-checkpoint` would pick, so that a checkpoint that stopped moving, or a group
//! written by two kinds of worker, is seen before a replay relies on it.

use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::lag::lag_text;
use crate::output::{print, Output, Table};
use crate::progress::Progress;
use crate::snapshot;
use crate::streams::{self, Selection};
use streamfleet::runtime::connect::RedisTarget;
use streamfleet::store::{redis_checkpoints, EventStore};

#[derive(Debug, Args)]
pub struct CheckpointsArgs {
    #[command(flatten)]
    select: Selection,
}

impl CheckpointsArgs {
    pub fn validate(&self) -> Result<(), String> {
        self.select.validate()
    }
}

pub async fn run(
    target: RedisTarget,
    store: Option<EventStore>,
    args: CheckpointsArgs,
    output: Output,
) -> anyhow::Result<()> {
    let mut conn = crate::redis_read::connect(&target).await?;
    let found = streams::resolve(&mut conn, &args.select.streams).await?;
    let snap = snapshot::take(&mut conn, &found, args.select.group.as_deref(), false).await?;
    let mut table = Table::new(&[
        "STREAM",
        "GROUP",
        "POSTGRES",
        "REDIS",
        "LAST-DELIVERED",
        "LAG",
    ]);
    let mut rows = Vec::new();
    let pairs: u64 = snap.streams.iter().map(|s| s.groups.len() as u64).sum();
    let mut progress = Progress::new("reading checkpoints", Some(pairs));
    let mut store_error: Option<sqlx::Error> = None;
    for s in &snap.streams {
        if let Some(g) = &s.group_missing {
            table.row(vec![
                s.stream.clone(),
                g.clone(),
                "-".into(),
                "-".into(),
                "no such group".into(),
                "-".into(),
            ]);
        }
        for g in &s.groups {
            let (stream, group) = (s.stream.as_str(), g.info.name.as_str());
            // A PostgreSQL failure is said once, at the end, after what Redis holds is shown.
            let postgres = match (&store, &store_error) {
                (Some(store), None) => match store.checkpoint(stream, group).await {
                    Ok(id) => id,
                    Err(e) => {
                        store_error = Some(e);
                        None
                    }
                },
                _ => None,
            };
            let redis = redis_checkpoints::read(&mut conn, stream, group)
                .await
                .with_context(|| format!("HGET {} {group}", redis_checkpoints::key(stream)))?;
            progress.add(1);
            let shown = |id: Option<streamfleet::EntryId>| {
                id.map_or_else(|| "none".into(), |id| id.to_string())
            };
            table.row(vec![
                stream.to_owned(),
                group.to_owned(),
                match (&store, &store_error) {
                    (Some(_), None) => shown(postgres),
                    (Some(_), Some(_)) => "unreadable".into(),
                    (None, _) => "-".into(),
                },
                shown(redis),
                g.info.last_delivered.to_string(),
                lag_text(g.info.lag),
            ]);
            rows.push(json!({
                "stream": stream,
                "group": group,
                "postgres": postgres.map(|id| id.to_string()),
                "redis": redis.map(|id| id.to_string()),
                "last_delivered_id": g.info.last_delivered.to_string(),
                "lag": g.info.lag,
            }));
        }
    }
    progress.finish();
    let (missing, unmatched) = found.json();
    let json = json!({
        "postgres_read": store.is_some() && store_error.is_none(),
        "checkpoints": rows,
        "missing": missing,
        "unmatched": unmatched,
    });
    print(output, &json, &table, "no consumer groups");
    if output == Output::Table {
        if store.is_none() && !rows.is_empty() {
            println!("POSTGRES -: not read (give --database-url or FLEET_DATABASE_URL for the persister's)");
        }
        if let Some(note) = snap.without_groups_note(args.select.group.as_deref()) {
            println!("{note}");
        }
    }
    let mut errors: Vec<String> = found.missing_error().into_iter().collect();
    if let Some(e) = store_error {
        errors.push(format!(
            "reading the checkpoints in PostgreSQL: {e} (check --database-url, run `fleetctl migrate`, or leave --database-url out)"
        ));
    }
    if !errors.is_empty() {
        anyhow::bail!("{}", errors.join("; "));
    }
    Ok(())
}
