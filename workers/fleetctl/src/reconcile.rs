//! `fleetctl reconcile`: the auditor's check after an incident. Every strict event in a range of
//! the stream must have its row in PostgreSQL (unless it is still in flight for the persister's
//! group, or was dead-lettered by it), and every row persisted from that range must still have
//! its event in the stream. Exit 1 when something is missing on either side.
//!
//! A range may hold millions of entries, so both sides are walked together in chunks, in entry
//! order (the stream with `XRANGE`, the rows by their `stream_id`), and only a chunk is held at
//! once: a chunk's events are looked up in PostgreSQL by event id (a strict one must have its
//! row), and the rows whose `stream_id` falls in the chunk are matched against its entries. A row
//! whose own entry is not there with its event may still have its event elsewhere in the range
//! (after `replay --from-postgres`, every row names an entry that no longer exists, and its event
//! is under a new one): such rows are set aside, and looked up by event id in a further read of
//! the range, a batch of them at a time. That read is skipped when no event of the range sat away
//! from its row's entry, which is the common case: the rows set aside are then simply missing.
//!
//! Memory is a chunk, a batch of rows set aside, the group's dead-lettered entry ids (read only
//! if a strict event has no row) and the gaps found, whatever the length of the range. A
//! producer's retry (a second entry with the same event id) is counted once within a chunk, and
//! again if it lands in another one.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::ser::SerializeSeq;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::entry_ids;
use crate::groups_info::groups;
use crate::output::Output;
use crate::progress::Progress;
use crate::redis_read::{connect, pages, Pages};
use streamfleet::event::{decode, Limits};
use streamfleet::runtime::config::FileConfig;
use streamfleet::runtime::conn::Conn;
use streamfleet::runtime::connect::RedisTarget;
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

    /// Entries compared per step (and rows read per page): what is held at once. Hidden: a
    /// setting for tests, which need ranges of many chunks.
    #[arg(long, hide = true, default_value_t = CHUNK)]
    chunk: usize,
}

/// Entries compared per step.
const CHUNK: usize = 1000;

/// Rows set aside (not found at their own entry) are looked up this many chunks' worth at a
/// time: each batch costs one more read of the range.
const LOOKUP_CHUNKS: usize = 50;

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
        if self.chunk == 0 {
            return Err("--chunk: must be at least 1".into());
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

/// One entry of the range, as the comparison needs it.
struct Entry {
    id: EntryId,
    /// Its event id, when it decodes (a malformed entry is a dead letter, never a row).
    event: Option<Uuid>,
    /// A strict event the group must persist (not a redrive for another group).
    strict: bool,
}

/// An entry's field/value pairs as read (bytes: nothing forces a producer to write UTF-8).
type Pairs = Vec<(Vec<u8>, Vec<u8>)>;
/// An entry as `XRANGE` returns it: its id and its pairs.
type RawEntry = (String, Pairs);

/// What the walk found: the figures, and the gaps on either side.
#[derive(Debug, Default)]
struct Findings {
    entries: u64,
    strict: u64,
    persisted: u64,
    in_flight: u64,
    dead_lettered: u64,
    rows: u64,
    missing_in_pg: Vec<(EntryId, Uuid)>,
    missing_in_stream: Vec<(EntryId, Uuid)>,
}

/// The rows persisted from the stream, walked in entry order a page at a time.
struct Rows {
    /// Read and not yet matched (at most one page).
    ahead: VecDeque<(EntryId, Uuid)>,
    /// The last `stream_id` read (`events_of_stream` starts after it).
    after: Option<EntryId>,
    exhausted: bool,
    page: i64,
}

impl Rows {
    /// The rows from `from` on.
    fn new(from: Option<EntryId>, page: usize) -> Self {
        // `events_of_stream` starts after its bound: start just below `from`.
        let after = from.and_then(|f| match (f.ms, f.seq) {
            (0, 0) => None,
            (ms, 0) => Some(EntryId {
                ms: ms - 1,
                seq: u64::MAX,
            }),
            (ms, seq) => Some(EntryId { ms, seq: seq - 1 }),
        });
        Rows {
            ahead: VecDeque::new(),
            after,
            exhausted: false,
            page: page as i64,
        }
    }

    /// The next row whose entry is at most `upto`, if any.
    async fn next_upto(
        &mut self,
        store: &EventStore,
        stream: &str,
        upto: EntryId,
    ) -> anyhow::Result<Option<(EntryId, Uuid)>> {
        if self.ahead.is_empty() && !self.exhausted {
            let page = store
                .events_of_stream(stream, self.after, self.page)
                .await
                .context("reading events from PostgreSQL")?;
            self.exhausted = (page.len() as i64) < self.page;
            for row in page {
                let entry = row.stream_id.parse::<EntryId>().with_context(|| {
                    format!("events.stream_id {} is not an entry id", row.stream_id)
                })?;
                self.after = Some(entry);
                self.ahead.push_back((entry, row.event_id));
            }
        }
        match self.ahead.front() {
            Some((entry, _)) if *entry <= upto => Ok(self.ahead.pop_front()),
            _ => Ok(None),
        }
    }
}

/// The comparison in progress.
struct Reconcile<'a> {
    args: &'a ReconcileArgs,
    config: &'a FileConfig,
    store: &'a EventStore,
    conn: Conn,
    limits: Limits,
    /// The group's last delivered entry when the walk began (`None`: no such group).
    last_delivered: Option<EntryId>,
    /// Entry ids the group dead-lettered, read when first needed.
    dead: Option<HashSet<EntryId>>,
    rows: Rows,
    /// Rows not found at their own entry, to look up by event id.
    set_aside: Vec<(EntryId, Uuid)>,
    /// An event with a row was seen at an entry no row of the stream names: rows set aside may
    /// have their event elsewhere in the range.
    displaced: bool,
    found: Findings,
}

impl Reconcile<'_> {
    /// The bound of the range's last entry.
    fn to(&self) -> EntryId {
        self.args.to.unwrap_or(EntryId {
            ms: u64::MAX,
            seq: u64::MAX,
        })
    }

    fn xrange_bounds(&self) -> (String, String) {
        (
            self.args.from.map_or("-".to_owned(), |f| f.to_string()),
            self.args.to.map_or("+".to_owned(), |t| t.to_string()),
        )
    }

    /// What one entry is for the group.
    fn entry(&self, (id, pairs): RawEntry) -> Option<Entry> {
        let id = id.parse::<EntryId>().ok()?;
        let fields: streamfleet::Fields = pairs.into_iter().collect();
        let Ok(event) = decode(&self.args.stream, id, &fields, &self.limits) else {
            return Some(Entry {
                id,
                event: None,
                strict: false,
            });
        };
        let other_group = fields
            .get(REDRIVE_GROUP_FIELD.as_bytes())
            .is_some_and(|g| g != self.args.group.as_bytes());
        let strict = self
            .config
            .routes
            .lookup(&event.channel)
            .is_some_and(|(_, route)| route.strict);
        Some(Entry {
            id,
            event: Some(event.id),
            strict: strict && !other_group,
        })
    }

    /// Compares one chunk of entries, with the rows up to `upto` (its last entry).
    async fn chunk(&mut self, raw: Vec<RawEntry>, upto: EntryId) -> anyhow::Result<()> {
        self.found.entries += raw.len() as u64;
        let entries: Vec<Entry> = raw.into_iter().filter_map(|e| self.entry(e)).collect();
        // Pending before the rows: an entry settled in between then has its row when looked up,
        // rather than being neither pending nor persisted.
        let pending = self.pending(&entries).await?;
        let events: Vec<Uuid> = entries.iter().filter_map(|e| e.event).collect();
        let with_rows = if events.is_empty() {
            HashSet::new()
        } else {
            self.store
                .existing(&events)
                .await
                .context("reading events from PostgreSQL")?
        };

        // PostgreSQL → stream: each row whose entry is in this stretch, at its own entry.
        let mut at_own_entry = HashSet::new();
        while let Some((row_entry, event)) = self
            .rows
            .next_upto(self.store, &self.args.stream, upto.min(self.to()))
            .await?
        {
            self.found.rows += 1;
            let here = entries
                .binary_search_by_key(&row_entry, |e| e.id)
                .ok()
                .and_then(|i| entries[i].event);
            if here == Some(event) {
                at_own_entry.insert(row_entry);
            } else {
                self.set_aside.push((row_entry, event));
                if self.set_aside.len() >= self.args.chunk * LOOKUP_CHUNKS {
                    self.look_up_set_aside(false).await?;
                }
            }
        }

        // Stream → PostgreSQL: each strict event has its row, or is in flight or dead-lettered.
        let mut counted = HashSet::new();
        for e in &entries {
            let Some(event) = e.event else { continue };
            if with_rows.contains(&event) && !at_own_entry.contains(&e.id) {
                self.displaced = true;
            }
            if !e.strict || !counted.insert(event) {
                continue;
            }
            self.found.strict += 1;
            if with_rows.contains(&event) {
                self.found.persisted += 1;
            } else if self.last_delivered.is_none_or(|l| e.id > l) || pending.contains(&e.id) {
                self.found.in_flight += 1;
            } else if self.dead_lettered().await?.contains(&e.id) {
                self.found.dead_lettered += 1;
            } else {
                self.found.missing_in_pg.push((e.id, event));
            }
        }
        Ok(())
    }

    /// The entries of the chunk pending in the group (delivered, not acknowledged).
    async fn pending(&mut self, entries: &[Entry]) -> anyhow::Result<HashSet<EntryId>> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(HashSet::new());
        };
        if self.last_delivered.is_none_or(|l| first.id > l) {
            return Ok(HashSet::new()); // nothing of it delivered yet
        }
        let (stream, group) = (&self.args.stream, &self.args.group);
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg(first.id.to_string())
            .arg(last.id.to_string())
            .arg(entries.len())
            .query_async(&mut self.conn)
            .await
            .with_context(|| format!("XPENDING {stream} {group}"))?;
        Ok(pending
            .iter()
            .filter_map(|(id, ..)| id.parse().ok())
            .collect())
    }

    /// Entry ids the group dead-lettered.
    async fn dead_lettered(&mut self) -> anyhow::Result<&HashSet<EntryId>> {
        if self.dead.is_none() {
            let mut out = HashSet::new();
            let key = format!("{}{}", self.args.stream, streamfleet::DLQ_SUFFIX);
            let group = self.args.group.as_str();
            pages(
                &mut self.conn,
                &key,
                "-",
                "+",
                1000,
                |page: Vec<(String, HashMap<String, String>)>| {
                    for (_, fields) in page {
                        if fields.get("dlq_group").map(String::as_str) == Some(group) {
                            out.extend(
                                fields
                                    .get("dlq_entry_id")
                                    .and_then(|i| i.parse::<EntryId>().ok()),
                            );
                        }
                    }
                    true
                },
            )
            .await?;
            self.dead = Some(out);
        }
        Ok(self.dead.get_or_insert_default())
    }

    /// Looks the rows set aside up by event id in the whole range; those not found are missing
    /// in the stream. At the end of the walk (`last`), no read is needed if no event sat away
    /// from its row's entry.
    async fn look_up_set_aside(&mut self, last: bool) -> anyhow::Result<()> {
        if self.set_aside.is_empty() {
            return Ok(());
        }
        if !last || self.displaced {
            let mut wanted: HashSet<Uuid> = self.set_aside.iter().map(|(_, e)| *e).collect();
            let (start, end) = self.xrange_bounds();
            let mut range = Pages::new(&self.args.stream, &start, &end, self.args.chunk);
            while !wanted.is_empty() {
                let Some(page) = range.next::<Pairs>(&mut self.conn).await? else {
                    break;
                };
                for raw in page {
                    if let Some(event) = self.entry(raw).and_then(|e| e.event) {
                        wanted.remove(&event);
                    }
                }
            }
            self.set_aside.retain(|(_, e)| wanted.contains(e));
        }
        self.found.missing_in_stream.append(&mut self.set_aside);
        Ok(())
    }
}

pub async fn run(
    target: RedisTarget,
    store: EventStore,
    args: ReconcileArgs,
    config: FileConfig,
    output: Output,
) -> anyhow::Result<()> {
    let mut conn = connect(&target).await?;
    // No group (yet): nothing delivered, so every entry is in flight, not missing.
    let last_delivered = groups(&mut conn, &args.stream)
        .await
        .unwrap_or_default()
        .into_iter()
        .find(|g| g.name == args.group)
        .map(|g| g.last_delivered);
    let whole = args.from.is_none() && args.to.is_none();
    let length: Option<u64> = match whole {
        true => Some(
            redis::cmd("XLEN")
                .arg(&args.stream)
                .query_async(&mut conn)
                .await
                .with_context(|| format!("XLEN {}", args.stream))?,
        ),
        false => None,
    };
    let mut r = Reconcile {
        args: &args,
        config: &config,
        store: &store,
        conn,
        limits: Limits {
            max_data_bytes: config.tuning.max_data_bytes,
        },
        last_delivered,
        dead: None,
        rows: Rows::new(args.from, args.chunk),
        set_aside: Vec::new(),
        displaced: false,
        found: Findings::default(),
    };
    let (start, end) = r.xrange_bounds();
    let mut range = Pages::new(&args.stream, &start, &end, args.chunk);
    let mut progress = Progress::new("reconcile", length);
    while let Some(page) = range.next::<Pairs>(&mut r.conn).await? {
        let n = page.len() as u64;
        let upto = page.last().and_then(|(id, _)| id.parse().ok());
        r.chunk(page, upto.unwrap_or_else(|| r.to())).await?;
        progress.add(n);
    }
    // The rows after the last entry: none of them is at its own entry.
    let to = r.to();
    r.chunk(Vec::new(), to).await?;
    r.look_up_set_aside(true).await?;
    progress.finish();
    report(&args, r.found, output)
}

/// Gaps as JSON objects (`{<id_field>: entry id, "event_id": …}`), serialised one by one: an
/// incident can leave hundreds of thousands.
struct Gaps<'a> {
    gaps: &'a [(EntryId, Uuid)],
    id_field: &'static str,
}

impl Serialize for Gaps<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.gaps.len()))?;
        for (entry, event) in self.gaps {
            let mut gap = BTreeMap::new();
            gap.insert(self.id_field, entry.to_string());
            gap.insert("event_id", event.to_string());
            seq.serialize_element(&gap)?;
        }
        seq.end()
    }
}

/// What reconcile prints under `--output json`.
#[derive(Serialize)]
struct Report<'a> {
    stream: &'a str,
    group: &'a str,
    entries: u64,
    strict_events: u64,
    rows: u64,
    persisted: u64,
    in_flight: u64,
    dead_lettered: u64,
    missing_in_postgres: Gaps<'a>,
    missing_in_stream: Gaps<'a>,
}

/// Prints the findings; an error when something is missing on either side.
fn report(args: &ReconcileArgs, found: Findings, output: Output) -> anyhow::Result<()> {
    let (missing_in_pg, missing_in_stream) = (&found.missing_in_pg, &found.missing_in_stream);
    if output == Output::Json {
        crate::output::json(&Report {
            stream: &args.stream,
            group: &args.group,
            entries: found.entries,
            strict_events: found.strict,
            rows: found.rows,
            persisted: found.persisted,
            in_flight: found.in_flight,
            dead_lettered: found.dead_lettered,
            missing_in_postgres: Gaps {
                gaps: missing_in_pg,
                id_field: "entry_id",
            },
            missing_in_stream: Gaps {
                gaps: missing_in_stream,
                id_field: "stream_id",
            },
        });
    } else {
        println!(
            "{}: {} entries read, {} strict events; {} rows persisted from it",
            args.stream, found.entries, found.strict, found.rows
        );
        println!(
            "  in flight for group {} (pending or not delivered yet): {}; dead-lettered by it: {}",
            args.group, found.in_flight, found.dead_lettered
        );
        print_gaps(missing_in_pg, missing_in_stream);
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

/// The gaps as a table (the columns `Table` gives), a line at a time rather than rendered whole.
fn print_gaps(missing_in_pg: &[(EntryId, Uuid)], missing_in_stream: &[(EntryId, Uuid)]) {
    if missing_in_pg.is_empty() && missing_in_stream.is_empty() {
        println!("  nothing missing on either side");
        return;
    }
    let all = || {
        let pg = missing_in_pg.iter().map(|g| ("postgres", g));
        pg.chain(missing_in_stream.iter().map(|g| ("stream", g)))
    };
    let width = all()
        .map(|(_, (entry, _))| entry.to_string().len())
        .fold("ENTRY".len(), usize::max);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let _ = writeln!(out, "{:<10}  {:<width$}  EVENT ID", "MISSING IN", "ENTRY");
    for (side, (entry, event)) in all() {
        let _ = writeln!(out, "{side:<10}  {:<width$}  {event}", entry.to_string());
    }
}
