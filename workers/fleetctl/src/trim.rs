//! `fleetctl trim`: the `[[retention]]` rules of FLEET_CONFIG applied (a CronJob runs it), Kafka's
//! retention apart from consumption. Per stream: the oldest entry some consumer group has not
//! settled (its oldest pending entry, else the one after its last delivered) is the low
//! watermark; the age and length caps trim below it only (`XTRIM MINID`), unless the rule says
//! `cut_unread`. A stream without groups (a dead letter stream, a projector's history) has no
//! watermark: its caps apply as they are. Every trim is counted, per stream, in the output.

use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::output::{print, Output, Table};
use crate::streams;
use streamfleet::runtime::config::{FileConfig, Retention};
use streamfleet::runtime::conn::Conn;
use streamfleet::stream::groups::parse_groups;
use streamfleet::EntryId;

/// Entries read per round trip when a length cap needs the id it keeps from.
const PAGE: usize = 10_000;

#[derive(Debug, Args)]
pub struct TrimArgs {
    /// The configuration file whose `[[retention]]` rules apply.
    #[arg(long, env = "FLEET_CONFIG")]
    config: std::path::PathBuf,

    /// Say what each stream would lose, remove nothing.
    #[arg(long)]
    dry_run: bool,
}

/// What a rule means for one stream now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub stream: String,
    pub rule: String,
    pub length: u64,
    /// Entries before this id go (`XTRIM MINID`); `None`: nothing to trim.
    pub min_id: Option<EntryId>,
    /// The group whose unsettled entries held the caps back, and its watermark.
    pub held_by: Option<(String, EntryId)>,
    /// How many entries go, when the length cap decides it (else only a trim says).
    pub removes: Option<u64>,
}

/// The successor of `id` in stream order: `MINID` keeps ids from it on.
fn after(id: EntryId) -> EntryId {
    match id.seq.checked_add(1) {
        Some(seq) => EntryId { ms: id.ms, seq },
        None => EntryId {
            ms: id.ms + 1,
            seq: 0,
        },
    }
}

/// The lowest watermark of `stream`'s groups: the first entry each has not settled.
async fn watermark(conn: &mut Conn, stream: &str) -> anyhow::Result<Option<(String, EntryId)>> {
    let reply: redis::Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .with_context(|| format!("XINFO GROUPS {stream}"))?;
    let mut low: Option<(String, EntryId)> = None;
    for g in parse_groups(&reply)? {
        let mark = if g.pending > 0 {
            let summary: (u64, Option<String>, Option<String>, redis::Value) =
                redis::cmd("XPENDING")
                    .arg(stream)
                    .arg(&g.name)
                    .query_async(conn)
                    .await
                    .with_context(|| format!("XPENDING {stream} {}", g.name))?;
            match summary.1.and_then(|id| id.parse().ok()) {
                Some(oldest) => oldest,
                None => after(g.last_delivered),
            }
        } else {
            after(g.last_delivered)
        };
        if low.as_ref().is_none_or(|(_, l)| mark < *l) {
            low = Some((g.name, mark));
        }
    }
    Ok(low)
}

/// The id from which the newest `keep` of `length` entries start: read from the head, a page at
/// a time (its cost is the entries the cap removes).
async fn keep_from(
    conn: &mut Conn,
    stream: &str,
    length: u64,
    keep: u64,
) -> anyhow::Result<Option<EntryId>> {
    let mut skip = length.saturating_sub(keep);
    if skip == 0 {
        return Ok(None);
    }
    let mut start = "-".to_owned();
    loop {
        let count = (skip as usize + 1).min(PAGE);
        let page: Vec<(String, redis::Value)> = redis::cmd("XRANGE")
            .arg(stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(conn)
            .await
            .with_context(|| format!("XRANGE {stream}"))?;
        if page.is_empty() {
            return Ok(None);
        }
        if (page.len() as u64) > skip {
            return Ok(page[skip as usize].0.parse().ok());
        }
        skip -= page.len() as u64;
        start = format!("({}", page[page.len() - 1].0);
    }
}

/// The plan for `stream` under `rule` at `now_ms` (Redis's clock).
pub async fn plan(
    conn: &mut Conn,
    stream: &str,
    rule: &Retention,
    now_ms: u64,
) -> anyhow::Result<Plan> {
    let length: u64 = redis::cmd("XLEN").arg(stream).query_async(conn).await?;
    let by_age = rule.max_age_s.map(|s| EntryId {
        ms: now_ms.saturating_sub(s * 1000),
        seq: 0,
    });
    let by_len = match rule.max_len {
        Some(keep) => keep_from(conn, stream, length, keep).await?,
        None => None,
    };
    let wanted = by_age.max(by_len);
    let low = watermark(conn, stream).await?;
    let (min_id, held_by) = match (wanted, low) {
        (Some(w), Some((group, mark))) if !rule.cut_unread && w > mark => {
            (Some(mark), Some((group, mark)))
        }
        (w, _) => (w, None),
    };
    let removes = match (rule.max_len, by_len) {
        (Some(keep), Some(l)) if min_id == Some(l) => Some(length.saturating_sub(keep)),
        _ if min_id.is_none() => Some(0),
        _ => None,
    };
    Ok(Plan {
        stream: stream.to_owned(),
        rule: rule.streams.clone(),
        length,
        min_id,
        held_by,
        removes,
    })
}

/// Every stream the rules match, each with its (first) rule.
pub async fn matched(
    conn: &mut Conn,
    config: &FileConfig,
) -> anyhow::Result<Vec<(String, Retention)>> {
    let mut out: Vec<(String, Retention)> = Vec::new();
    for rule in &config.retention {
        let found = streams::resolve_with_dlq(conn, &rule.streams).await?;
        for stream in found {
            if !out.iter().any(|(s, _)| *s == stream) {
                out.push((stream, rule.clone()));
            }
        }
    }
    Ok(out)
}

/// Redis's clock, in milliseconds.
pub async fn redis_now_ms(conn: &mut Conn) -> anyhow::Result<u64> {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(s * 1000 + us / 1000)
}

impl TrimArgs {
    /// The configuration, checked: bad, or without a rule, it is a configuration error.
    pub fn load(&self) -> Result<FileConfig, streamfleet::runtime::config::ConfigError> {
        let config = FileConfig::load(&self.config)?;
        if config.retention.is_empty() {
            return Err(streamfleet::runtime::config::ConfigError(format!(
                "FLEET_CONFIG {}: no [[retention]] rule to apply",
                self.config.display()
            )));
        }
        Ok(config)
    }
}

pub async fn run(
    target: streamfleet::runtime::connect::RedisTarget,
    config: FileConfig,
    args: TrimArgs,
    output: Output,
) -> anyhow::Result<()> {
    let mut conn = crate::redis_read::connect(&target).await?;
    let now_ms = redis_now_ms(&mut conn).await?;
    let mut rows = Vec::new();
    let mut table = Table::new(&[
        "STREAM",
        "RULE",
        "LENGTH",
        "REMOVED",
        "KEPT FROM",
        "HELD BY",
    ]);
    let mut failed = Vec::new();
    for (stream, rule) in matched(&mut conn, &config).await? {
        // One stream's failure does not stop the others' trims; a stream that vanished since
        // the scan (a history that expired) is no failure at all.
        let trimmed = async {
            let plan = plan(&mut conn, &stream, &rule, now_ms).await?;
            let removed: u64 = match (plan.min_id, args.dry_run) {
                (Some(id), false) => redis::cmd("XTRIM")
                    .arg(&stream)
                    .arg("MINID")
                    .arg(id.to_string())
                    .query_async(&mut conn)
                    .await
                    .with_context(|| format!("XTRIM {stream} MINID {id}"))?,
                _ => 0,
            };
            anyhow::Ok((plan, removed))
        }
        .await;
        let (plan, removed) = match trimmed {
            Ok(done) => done,
            Err(e) => {
                let kind: String = redis::cmd("TYPE")
                    .arg(&stream)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                if kind != "none" {
                    eprintln!("{stream}: {e:#}");
                    failed.push(stream);
                }
                continue;
            }
        };
        let held = plan
            .held_by
            .as_ref()
            .map(|(g, mark)| format!("{g} (unsettled from {mark})"))
            .unwrap_or_else(|| "-".into());
        table.row(vec![
            stream.clone(),
            plan.rule.clone(),
            plan.length.to_string(),
            if args.dry_run {
                "-".into()
            } else {
                removed.to_string()
            },
            plan.min_id.map_or_else(|| "-".into(), |id| id.to_string()),
            held,
        ]);
        rows.push(json!({
            "stream": stream,
            "rule": plan.rule,
            "length": plan.length,
            "removed": if args.dry_run { json!(null) } else { json!(removed) },
            "min_id": plan.min_id.map(|id| id.to_string()),
            "held_by": plan.held_by.map(|(g, mark)| json!({"group": g, "unsettled_from": mark.to_string()})),
        }));
    }
    let doc = json!({"dry_run": args.dry_run, "streams": rows, "failed": failed});
    print(output, &doc, &table, "no stream matches a retention rule");
    if !failed.is_empty() {
        anyhow::bail!(
            "{} stream(s) not trimmed: {}",
            failed.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minid_keeps_from_the_entry_after() {
        let at = |s: &str| s.parse::<EntryId>().unwrap();
        assert_eq!(after(at("5-3")), at("5-4"));
        assert_eq!(
            after(EntryId {
                ms: 5,
                seq: u64::MAX
            }),
            at("6-0")
        );
    }
}
