//! `fleetctl dlq`: browse, redrive and purge dead letters.
//!
//! Dead letters are per stream (`<stream>:dlq`, beside it in its hash slot) and each belongs to
//! the group that dead-lettered it (`dlq_group`): two groups that both fail an entry write two
//! dead letters. A redrive puts the original entry back into its stream, with a new entry id, its
//! event id unchanged, and the field `redrive_group` naming that group: every group reads the
//! stream, and the others acknowledge it with no effect (they settled the original). Each dead
//! letter moves in one server-side script with the `XADD` and the `XDEL` together, so a crash
//! mid-redrive (fleetctl killed, Redis restarted) neither loses nor doubles one: run it again.

use std::collections::BTreeMap;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Map};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::entry_ids;
use crate::output::{cut, print, Output, Table};
use crate::progress::Progress;
use crate::redis_read::Pages;
use streamfleet::runtime::conn::Conn;
use streamfleet::runtime::connect::RedisTarget;
use streamfleet::stream::keys;
use streamfleet::REDRIVE_GROUP_FIELD;

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// The dead letters of a stream, oldest first, filtered by group, reason, time or id.
    List(ListArgs),
    /// Every field of one dead letter.
    Show(ShowArgs),
    /// Put dead letters back into their stream, for their group to try again, and remove them
    /// from the DLQ (atomically per entry).
    Redrive(ActArgs),
    /// Delete dead letters.
    Purge(ActArgs),
}

/// Which dead letters.
#[derive(Debug, Args)]
pub struct Selection {
    /// The stream whose dead letters these are (its DLQ is `<stream>:dlq`).
    #[arg(long, env = "FLEET_STREAM")]
    stream: String,

    /// Only these dead letter ids (repeat, or comma-separated).
    #[arg(long = "id", value_delimiter = ',')]
    ids: Vec<String>,

    /// Only dead letters of this group (`dlq_group`).
    #[arg(long)]
    group: Option<String>,

    /// Only dead letters with this reason: invalid, unsupported_version, too_large,
    /// max_deliveries, handler_error.
    #[arg(long)]
    reason: Option<String>,

    /// Only dead letters written at or after this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    since: Option<OffsetDateTime>,

    /// Only dead letters written before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    until: Option<OffsetDateTime>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    select: Selection,

    /// At most this many (at least 1; `fleetctl status` counts them all).
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The stream whose dead letter this is.
    #[arg(long, env = "FLEET_STREAM")]
    stream: String,

    /// The dead letter's id (in `<stream>:dlq`).
    id: String,
}

#[derive(Debug, Args)]
pub struct ActArgs {
    #[command(flatten)]
    select: Selection,

    /// Every dead letter of the stream (required when nothing else selects).
    #[arg(long)]
    all: bool,

    /// Say what would be done, and do nothing.
    #[arg(long)]
    dry_run: bool,
}

fn parse_time(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|e| format!("{text}: not an RFC 3339 time (e.g. 2026-11-26T12:00:00Z): {e}"))
}

const REASONS: [&str; 5] = [
    "invalid",
    "unsupported_version",
    "too_large",
    "max_deliveries",
    "handler_error",
];

impl DlqCommand {
    /// Refuses, before connecting, what cannot be right.
    pub fn validate(&self) -> Result<(), String> {
        let (select, act) = match self {
            DlqCommand::List(a) => {
                // 0 is refused rather than read as "no limit": a DLQ can hold millions, each
                // shown with its fields, and an empty answer would say there are none.
                if a.limit == 0 {
                    return Err("--limit 0: must be at least 1 (the most dead letters to show; `fleetctl status --streams S` counts them all)".into());
                }
                (&a.select, None)
            }
            DlqCommand::Show(a) => {
                crate::streams::validate_key(&a.stream, "--stream")?;
                return entry_ids::parse_arg("dlq show ID", &a.id).map(|_| ());
            }
            DlqCommand::Redrive(a) | DlqCommand::Purge(a) => (&a.select, Some(a)),
        };
        crate::streams::validate_key(&select.stream, "--stream")?;
        if let Some(reason) = &select.reason {
            if !REASONS.contains(&reason.as_str()) {
                return Err(format!(
                    "--reason {reason}: not a dead letter reason ({})",
                    REASONS.join(", ")
                ));
            }
        }
        for id in &select.ids {
            entry_ids::parse_arg("--id", id)?;
        }
        if let Some(act) = act {
            let selects = !select.ids.is_empty()
                || select.group.is_some()
                || select.reason.is_some()
                || select.since.is_some()
                || select.until.is_some();
            if !selects && !act.all {
                return Err(
                    "say which dead letters: --id, --group, --reason, --since/--until, or --all"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

/// One dead letter as stored.
struct DeadLetter {
    id: String,
    fields: Vec<(String, String)>,
}

impl DeadLetter {
    fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        let mut fields = Map::new();
        for (k, v) in &self.fields {
            fields.insert(k.clone(), json!(v));
        }
        json!({"id": self.id, "fields": fields})
    }
}

fn dlq_key(stream: &str) -> String {
    format!("{stream}{}", streamfleet::DLQ_SUFFIX)
}

/// Entries of `key` from `start` (exclusive with `(`), `count` at most.
async fn range(
    conn: &mut Conn,
    key: &str,
    start: &str,
    end: &str,
    count: usize,
) -> anyhow::Result<Vec<DeadLetter>> {
    let reply: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(key)
        .arg(start)
        .arg(end)
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await
        .with_context(|| format!("reading {key}"))?;
    Ok(reply
        .into_iter()
        .map(|(id, fields)| DeadLetter { id, fields })
        .collect())
}

/// The id bounds of a time range (dead letter ids are the times they were written).
fn bounds(select: &Selection) -> (String, String) {
    let ms = |t: OffsetDateTime| (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
    let start = select
        .since
        .map(|t| format!("{}-0", ms(t)))
        .unwrap_or_else(|| "-".into());
    let end = select
        .until
        .map(|t| format!("({}-0", ms(t)))
        .unwrap_or_else(|| "+".into());
    (start, end)
}

impl Selection {
    fn matches(&self, d: &DeadLetter) -> bool {
        (self.ids.is_empty() || self.ids.contains(&d.id))
            && self
                .group
                .as_deref()
                .is_none_or(|g| d.get("dlq_group") == Some(g))
            && self
                .reason
                .as_deref()
                .is_none_or(|r| d.get("dlq_reason") == Some(r))
    }

    /// Calls `each` with the matching dead letters, a page at a time, oldest first, until it
    /// returns false. Pages are read after `each` ran on the previous one, so that it may delete.
    async fn scan(
        &self,
        conn: &mut Conn,
        mut each: impl AsyncFnMut(&mut Conn, Vec<DeadLetter>) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let key = dlq_key(&self.stream);
        if !self.ids.is_empty() {
            let mut found = Vec::new();
            for id in &self.ids {
                found.extend(range(conn, &key, id, id, 1).await?);
            }
            found.retain(|d| self.matches(d));
            each(conn, found).await?;
            return Ok(());
        }
        let (start, end) = bounds(self);
        let mut pages = Pages::new(&key, &start, &end, PAGE);
        while let Some(page) = pages.next::<Vec<(String, String)>>(conn).await? {
            let matching: Vec<DeadLetter> = page
                .into_iter()
                .map(|(id, fields)| DeadLetter { id, fields })
                .filter(|d| self.matches(d))
                .collect();
            if !matching.is_empty() && !each(conn, matching).await? {
                break;
            }
        }
        Ok(())
    }
}

/// Dead letters read per `XRANGE`, and moved per script call.
const PAGE: usize = 200;

/// Runs one `dlq` command.
pub async fn run(target: RedisTarget, command: DlqCommand, output: Output) -> anyhow::Result<()> {
    let mut conn = crate::redis_read::connect(&target).await?;
    match command {
        DlqCommand::List(args) => list(&mut conn, args, output).await,
        DlqCommand::Show(args) => show(&mut conn, args, output).await,
        DlqCommand::Redrive(args) => redrive(&mut conn, args, output).await,
        DlqCommand::Purge(args) => purge(&mut conn, args, output).await,
    }
}

async fn list(conn: &mut Conn, args: ListArgs, output: Output) -> anyhow::Result<()> {
    let mut found: Vec<DeadLetter> = Vec::new();
    let limit = args.limit;
    args.select
        .scan(conn, async |_, page| {
            found.extend(page);
            Ok(found.len() < limit)
        })
        .await?;
    found.truncate(limit);
    let mut table = Table::new(&[
        "ID",
        "AT",
        "GROUP",
        "REASON",
        "ENTRY",
        "DELIVERIES",
        "CHANNEL",
        "ERROR",
    ]);
    for d in &found {
        let f = |name| d.get(name).unwrap_or("").to_owned();
        table.row(vec![
            d.id.clone(),
            f("dlq_at"),
            f("dlq_group"),
            f("dlq_reason"),
            f("dlq_entry_id"),
            f("dlq_deliveries"),
            f("channel"),
            cut(d.get("dlq_error").unwrap_or(""), 60),
        ]);
    }
    let json = json!({
        "stream": args.select.stream,
        "dead_letters": found.iter().map(DeadLetter::json).collect::<Vec<_>>(),
    });
    print(
        output,
        &json,
        &table,
        &format!("no dead letters in {}", dlq_key(&args.select.stream)),
    );
    Ok(())
}

async fn show(conn: &mut Conn, args: ShowArgs, output: Output) -> anyhow::Result<()> {
    let key = dlq_key(&args.stream);
    let Some(d) = range(conn, &key, &args.id, &args.id, 1).await?.pop() else {
        anyhow::bail!(
            "no dead letter {} in {key} (fleetctl dlq list --stream {} lists them)",
            args.id,
            args.stream
        );
    };
    let mut table = Table::new(&["FIELD", "VALUE"]);
    table.row(vec!["(id)".into(), d.id.clone()]);
    for (k, v) in &d.fields {
        table.row(vec![k.clone(), v.clone()]);
    }
    print(output, &d.json(), &table, "");
    Ok(())
}

/// KEYS[1] the dead letter stream, KEYS[2] its stream; ARGV the dead letter ids. Per id, in one
/// atomic step: the original fields (ours removed, a producer's `dlq_*` field restored from
/// `orig_dlq_*`) plus `redrive_group` are added to the stream, and the dead letter is deleted.
/// Returns per id the new entry id, `gone` when it is no longer in the DLQ (another redrive or a
/// purge took it first), or why it was not moved.
/// A script stopped by a refused command keeps what it did before: both grants are checked first,
/// so that a user who may `XADD` but not `XDEL` doubles nothing.
const REDRIVE_SCRIPT: &str = r#"
if not (redis.acl_check_cmd('XADD', KEYS[2], '*', 'f', 'v') and redis.acl_check_cmd('XDEL', KEYS[1], '0-1')) then
  return redis.error_reply('NOPERM the user may not XADD to ' .. KEYS[2] .. ' and XDEL from ' .. KEYS[1] .. ': nothing redriven')
end
local ours = {dlq_reason = 1, dlq_error = 1, dlq_stream = 1, dlq_entry_id = 1, dlq_group = 1,
  dlq_deliveries = 1, dlq_at = 1, dlq_size = 1, dlq_truncated = 1}
local out = {}
for i, id in ipairs(ARGV) do
  local found = redis.call('XRANGE', KEYS[1], id, id)
  if #found == 0 then
    out[i] = 'gone'
  else
    local f = found[1][2]
    local fields, meta = {}, {}
    for j = 1, #f, 2 do
      local k, v = f[j], f[j + 1]
      if ours[k] then
        meta[k] = v
      elseif k ~= 'redrive_group' then
        if string.sub(k, 1, 9) == 'orig_dlq_' then k = string.sub(k, 6) end
        fields[#fields + 1] = k
        fields[#fields + 1] = v
      end
    end
    if meta['dlq_truncated'] then
      out[i] = 'not redriven: its values were cut (too_large), the original is not in the dead letter'
    elseif meta['dlq_stream'] ~= KEYS[2] then
      out[i] = 'not redriven: it comes from another stream (' .. tostring(meta['dlq_stream']) .. ')'
    elseif #fields == 0 then
      out[i] = 'not redriven: the entry had no fields'
    else
      if meta['dlq_group'] then
        fields[#fields + 1] = 'redrive_group'
        fields[#fields + 1] = meta['dlq_group']
      end
      out[i] = redis.call('XADD', KEYS[2], '*', unpack(fields))
      redis.call('XDEL', KEYS[1], id)
    end
  end
end
return out
"#;

/// What became of one selected dead letter.
enum Outcome {
    /// Redriven (with its new entry id) or purged; with `--dry-run`, would be.
    Done(Option<String>),
    /// No longer in the DLQ when this run came to it: another redrive or a purge, running at the
    /// same time, took it. Not a failure: it is not left behind.
    Gone,
    /// Left in the DLQ, with why.
    Refused(String),
}

/// What an action did, per dead letter, and per group what it did.
#[derive(Default)]
struct Tally {
    done: Vec<(String, Option<String>)>,
    gone: u64,
    refused: Vec<(String, String)>,
    /// Dead letters this run redrove or purged (would, with `--dry-run`), by `dlq_group`.
    by_group: BTreeMap<String, u64>,
}

impl Tally {
    fn record(&mut self, d: DeadLetter, outcome: Outcome) {
        match outcome {
            Outcome::Done(entry_id) => {
                let group = d.get("dlq_group").unwrap_or("").to_owned();
                *self.by_group.entry(group).or_default() += 1;
                self.done.push((d.id, entry_id));
            }
            Outcome::Gone => self.gone += 1,
            Outcome::Refused(why) => self.refused.push((d.id, why)),
        }
    }
}

async fn redrive(conn: &mut Conn, args: ActArgs, output: Output) -> anyhow::Result<()> {
    let stream = args.select.stream.clone();
    let key = dlq_key(&stream);
    // One script moves a dead letter: on a cluster, both keys must be in one slot, which the
    // stream's hash tag gives (`{orders}:events` and `{orders}:events:dlq`).
    if conn.is_cluster() && keys::slot(&key) != keys::slot(&stream) {
        anyhow::bail!(
            "{stream} has no hash tag: on a Redis Cluster {key} is in another hash slot than {stream}, and a dead letter is moved by one script over both (name streams with a hash tag, such as {{orders}}:events)"
        );
    }
    let script = redis::Script::new(REDRIVE_SCRIPT);
    let mut tally = Tally::default();
    let mut progress = Progress::new("redrive", None);
    args.select
        .scan(conn, async |conn, page| {
            if args.dry_run {
                for d in page {
                    tally.record(d, Outcome::Done(None));
                }
                return Ok(true);
            }
            let ids: Vec<&str> = page.iter().map(|d| d.id.as_str()).collect();
            let results: Vec<String> = script
                .key(&key)
                .key(&stream)
                .arg(&ids)
                .invoke_async(conn)
                .await
                .with_context(|| format!("redriving dead letters of {stream}"))?;
            progress.add(ids.len() as u64);
            for (d, result) in page.into_iter().zip(results) {
                let outcome = if entry_ids::parse(&result).is_some() {
                    Outcome::Done(Some(result))
                } else if result == "gone" {
                    Outcome::Gone
                } else {
                    Outcome::Refused(result)
                };
                tally.record(d, outcome);
            }
            Ok(true)
        })
        .await?;
    progress.finish();
    report("redrive", &stream, &args, &tally, output);
    if !tally.refused.is_empty() {
        anyhow::bail!(
            "{} dead letter(s) not redriven (listed above); they stay in {key}",
            tally.refused.len()
        );
    }
    Ok(())
}

async fn purge(conn: &mut Conn, args: ActArgs, output: Output) -> anyhow::Result<()> {
    let stream = args.select.stream.clone();
    let key = dlq_key(&stream);
    let mut tally = Tally::default();
    let mut progress = Progress::new("purge", None);
    args.select
        .scan(conn, async |conn, page| {
            if args.dry_run {
                for d in page {
                    tally.record(d, Outcome::Done(None));
                }
                return Ok(true);
            }
            // One XDEL per id, pipelined: each says whether this run deleted it.
            let mut pipe = redis::pipe();
            for d in &page {
                pipe.cmd("XDEL").arg(&key).arg(&d.id);
            }
            let deleted: Vec<u64> = pipe
                .query_async(conn)
                .await
                .with_context(|| format!("deleting from {key}"))?;
            progress.add(page.len() as u64);
            for (d, n) in page.into_iter().zip(deleted) {
                tally.record(
                    d,
                    if n > 0 {
                        Outcome::Done(None)
                    } else {
                        Outcome::Gone
                    },
                );
            }
            Ok(true)
        })
        .await?;
    progress.finish();
    report("purge", &stream, &args, &tally, output);
    Ok(())
}

/// Prints what a redrive or purge did (or would do).
fn report(verb: &str, stream: &str, args: &ActArgs, tally: &Tally, output: Output) {
    let json = json!({
        "stream": stream,
        "action": verb,
        "dry_run": args.dry_run,
        "selected": tally.done.len() as u64 + tally.gone + tally.refused.len() as u64,
        "by_group": tally.by_group.iter().map(|(g, n)| json!({"group": g, "dead_letters": n})).collect::<Vec<_>>(),
        "done": tally.done.iter().map(|(id, new)| match new {
            Some(new) => json!({"id": id, "entry_id": new}),
            None => json!({"id": id}),
        }).collect::<Vec<_>>(),
        "already_gone": tally.gone,
        "refused": tally.refused.iter().map(|(id, why)| json!({"id": id, "reason": why})).collect::<Vec<_>>(),
    });
    if output == Output::Json {
        crate::output::json(&json);
        return;
    }
    let done = tally.done.len();
    let summary = match (verb, args.dry_run) {
        ("redrive", true) => format!("would redrive {done} dead letter(s) of {stream}"),
        ("redrive", false) => format!("redriven: {done} dead letter(s) back into {stream}"),
        (_, true) => format!("would purge {done} dead letter(s) of {stream}"),
        _ => format!("purged {done} dead letter(s) of {stream}"),
    };
    println!("{summary}");
    for (group, n) in &tally.by_group {
        let who = if group.is_empty() {
            "(no group)"
        } else {
            group
        };
        println!("  {who}: {n}");
    }
    if tally.gone > 0 {
        println!(
            "{} of the selection already gone: redriven or purged by someone else meanwhile (not counted above, not a failure)",
            tally.gone
        );
    }
    if verb == "redrive" && done > 0 {
        println!(
            "each is back in {stream} with field {REDRIVE_GROUP_FIELD} = its group: that group applies it, the others acknowledge it with no effect"
        );
    }
    if !tally.refused.is_empty() {
        let mut table = Table::new(&["ID", "NOT DONE"]);
        for (id, why) in &tally.refused {
            table.row(vec![id.clone(), why.clone()]);
        }
        eprint!("{}", table.render());
    }
}
