//! What a load did, judged from PostgreSQL and Redis alone: every stream entry is classified by
//! its content (so a publisher retry that adds an entry twice is judged correctly), then compared
//! with the rows and the dead letters.

use std::collections::{BTreeMap, HashMap, HashSet};

use redis::aio::ConnectionLike;
use sqlx::PgPool;
use uuid::Uuid;

use crate::corpus::{Corpus, Expect};
use crate::read_stream;

/// One scenario's figures.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub published: usize,
    pub persisted: usize,
    pub dead_lettered: usize,
    /// Valid strict events missing from PostgreSQL, plus malformed entries missing from the DLQ.
    pub lost: usize,
    /// Dead letters beyond one per entry, plus rows that should not exist.
    pub doubled: usize,
    /// Entries still pending in the group.
    pub pending: u64,
}

/// The entry fields a JSON line publishes (as `fleetctl publish --file` does), order-free.
fn key_of_line(line: &str) -> BTreeMap<String, String> {
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
    v.into_iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (k, v)
        })
        .collect()
}

/// What must become of an entry, looked up by its fields.
fn expectations(corpus: &Corpus) -> HashMap<BTreeMap<String, String>, &Expect> {
    corpus
        .lines
        .iter()
        .zip(&corpus.expected)
        .map(|(l, e)| (key_of_line(l), e))
        .collect()
}

/// Measures the outcome of publishing `corpus` on `stream` (any number of times, in any order).
pub async fn measure<C: ConnectionLike + Send>(
    conn: &mut C,
    pool: &PgPool,
    stream: &str,
    group: &str,
    corpus: &Corpus,
) -> Outcome {
    let expect = expectations(corpus);
    let entries = read_stream(conn, stream).await;
    let mut want_rows: HashSet<Uuid> = HashSet::new();
    let mut want_dead: HashSet<String> = HashSet::new();
    for (id, fields) in &entries {
        let key: BTreeMap<String, String> = fields.clone().into_iter().collect();
        match expect.get(&key) {
            Some(Expect::Valid { id, user: true }) => {
                want_rows.insert(*id);
            }
            Some(Expect::Valid { .. }) => {}
            Some(Expect::Dead(_)) => {
                want_dead.insert(id.clone());
            }
            None => panic!("entry {id} is not from the corpus"),
        }
    }
    let mut o = judge(conn, pool, stream, group, &want_rows, &want_dead).await;
    o.published = entries.len();
    o.pending = crate::pending(conn, stream, group).await;
    o
}

/// What PostgreSQL and `group`'s dead letters hold for `stream`, against the event ids that must
/// have a row and the entry ids that must have a dead letter (`published` and `pending` are left
/// to the caller).
pub async fn judge<C: ConnectionLike + Send>(
    conn: &mut C,
    pool: &PgPool,
    stream: &str,
    group: &str,
    want_rows: &HashSet<Uuid>,
    want_dead: &HashSet<String>,
) -> Outcome {
    let rows: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM events WHERE stream = $1")
        .bind(stream)
        .fetch_all(pool)
        .await
        .unwrap();
    // Dead letters are per group: other groups on the stream write their own.
    let dead: Vec<_> = read_stream(conn, &format!("{stream}:dlq"))
        .await
        .into_iter()
        .filter(|(_, f)| f.get("dlq_group").map(String::as_str) == Some(group))
        .collect();
    let mut dead_count: HashMap<String, usize> = HashMap::new();
    for (_, f) in &dead {
        *dead_count.entry(f["dlq_entry_id"].clone()).or_default() += 1;
    }
    let row_set: HashSet<Uuid> = rows.iter().copied().collect();
    let lost = want_rows.difference(&row_set).count()
        + want_dead
            .iter()
            .filter(|id| !dead_count.contains_key(*id))
            .count();
    let doubled = dead_count.values().map(|n| n - 1).sum::<usize>()
        + dead_count
            .keys()
            .filter(|id| !want_dead.contains(*id))
            .count()
        + row_set.difference(want_rows).count()
        + (rows.len() - row_set.len());
    Outcome {
        published: 0,
        persisted: rows.len(),
        dead_lettered: dead.len(),
        lost,
        doubled,
        pending: 0,
    }
}

/// Prints the scenario's line and appends it to `target/fault-report.txt` (scripts/test shows it).
pub fn report(scenario: &str, o: &Outcome) {
    let line = format!(
        "{scenario:<44} published {:>6}  persisted {:>6}  dead-lettered {:>4}  lost {}  doubled {}",
        o.published, o.persisted, o.dead_lettered, o.lost, o.doubled
    );
    eprintln!("{line}");
    if let Some(target) = std::env::current_exe()
        .ok()
        .and_then(|p| p.ancestors().nth(3).map(|p| p.to_path_buf()))
    {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(target.join("fault-report.txt"))
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Entries acknowledged by `group` (delivered, no longer pending) whose effect is missing: valid
/// strict events without a row, malformed entries without a dead letter. Must always be empty:
/// an acknowledgement comes only after the effect is durable.
pub async fn acknowledged_but_missing<C: ConnectionLike + Send>(
    conn: &mut C,
    pool: &PgPool,
    stream: &str,
    group: &str,
    corpus: &Corpus,
) -> Vec<String> {
    use crate::entry_id_key;
    let expect = expectations(corpus);
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap();
    let last_delivered = groups
        .iter()
        .find(
            |g| matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n == group.as_bytes()),
        )
        .and_then(|g| match g.get("last-delivered-id") {
            Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .expect("the group exists");
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(1_000_000)
        .query_async(conn)
        .await
        .unwrap();
    let pending: HashSet<String> = pending.into_iter().map(|p| p.0).collect();
    let rows: HashSet<Uuid> = sqlx::query_scalar("SELECT event_id FROM events WHERE stream = $1")
        .bind(stream)
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let dead: HashSet<String> = read_stream(conn, &format!("{stream}:dlq"))
        .await
        .into_iter()
        .map(|(_, f)| f["dlq_entry_id"].clone())
        .collect();
    let mut missing = Vec::new();
    for (id, fields) in read_stream(conn, stream).await {
        if entry_id_key(&id) > entry_id_key(&last_delivered) || pending.contains(&id) {
            continue; // not delivered yet, or delivered and still pending
        }
        let key: BTreeMap<String, String> = fields.into_iter().collect();
        let ok = match expect.get(&key) {
            Some(Expect::Valid { id, user: true }) => rows.contains(id),
            Some(Expect::Dead(_)) => dead.contains(&id),
            _ => true,
        };
        if !ok {
            missing.push(id);
        }
    }
    missing
}
