//! What every fault scenario shares: its configuration file, waiting until the group has settled
//! everything, and the verdict (exactly once, from PostgreSQL and Redis alone) with its line in
//! the fault report.

use std::time::Duration;

use redis::aio::ConnectionLike;
use sqlx::PgPool;

use crate::corpus::{Corpus, TEST_MAX_DATA_BYTES};
use crate::outcome::{measure, report, Outcome};
use crate::{lag, pending, unique, wait_until};

/// The persister's default group.
pub const GROUP: &str = "persister";

/// A configuration file with the tests' small `data` limit, short blocking reads and `extra`
/// (more `[tuning]` lines, then any other table).
pub fn config(extra: &str) -> String {
    let path = std::env::temp_dir().join(format!("{}.toml", unique("cfg")));
    std::fs::write(
        &path,
        format!("[tuning]\nmax_data_bytes = {TEST_MAX_DATA_BYTES}\nblock_ms = 200\n{extra}"),
    )
    .unwrap();
    path.display().to_string()
}

/// Waits (at most 180 s) until the group has no lag and nothing pending on `stream`.
pub async fn wait_settled<C: ConnectionLike + Clone + Send + Sync>(
    conn: &C,
    stream: &str,
    group: &str,
) {
    wait_until(
        Duration::from_secs(180),
        "lag 0 and nothing pending",
        || {
            let mut conn = conn.clone();
            async move {
                lag(&mut conn, stream, group).await == Some(0)
                    && pending(&mut conn, stream, group).await == 0
            }
        },
    )
    .await;
}

/// Rows in `events`.
pub async fn rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// Asserts exactly-once (nothing lost, nothing doubled, nothing pending) and reports the scenario.
pub async fn conclude<C: ConnectionLike + Send>(
    scenario: &str,
    conn: &mut C,
    pool: &PgPool,
    stream: &str,
    corpus: &Corpus,
) -> Outcome {
    let o = measure(conn, pool, stream, GROUP, corpus).await;
    report(scenario, &o);
    assert_eq!(o.lost, 0, "{scenario}: lost");
    assert_eq!(o.doubled, 0, "{scenario}: doubled");
    assert_eq!(o.pending, 0, "{scenario}: pending");
    o
}

/// Makes PostgreSQL fail every insert of an event whose `data` has a `poison` key, with an error
/// that looks transient (a serialization failure), while it answers every other statement.
pub async fn install_poison_trigger(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
           IF NEW.data ? 'poison' THEN RAISE EXCEPTION 'poison event' USING ERRCODE = '40001'; END IF;
           RETURN NEW; END $$;
         CREATE TRIGGER poison BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION poison();",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// Waits (at most 30 s) until the group's checkpoint of `stream` is its last entry: an idle
/// worker writes it within milliseconds of its last acknowledgement (docs/src/semantics.md, "Checkpoints").
pub async fn wait_checkpointed<C: ConnectionLike + Clone + Send + Sync>(
    conn: &C,
    pool: &PgPool,
    stream: &str,
) {
    wait_until(
        Duration::from_secs(30),
        "checkpoint at the last entry",
        || {
            let (mut conn, pool) = (conn.clone(), pool.clone());
            async move {
                let last: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
                    .arg(stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                let position: Option<String> = sqlx::query_scalar(
                    "SELECT position FROM checkpoints WHERE stream = $1 AND group_name = $2",
                )
                .bind(stream)
                .bind(GROUP)
                .fetch_optional(&pool)
                .await
                .unwrap_or(None);
                last.first().map(|(id, _)| id) == position.as_ref()
            }
        },
    )
    .await;
}

/// A fresh database with the migrations applied by the real `fleetctl migrate`.
pub async fn migrated_database(url: &str) -> PgPool {
    let out = crate::WorkerEnv::new("x", url)
        .run_to_end_with_args("fleetctl", &["migrate"])
        .await;
    assert!(out.0.success(), "migrate: {}", out.1);
    PgPool::connect(url).await.unwrap()
}

/// The persister group's checkpoint of `stream`, if written.
pub async fn checkpoint(pool: &PgPool, stream: &str) -> Option<String> {
    sqlx::query_scalar("SELECT position FROM checkpoints WHERE stream = $1 AND group_name = $2")
        .bind(stream)
        .bind(GROUP)
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
}

/// Waits (at most 30 s) until `group`'s checkpoint in `<stream>:checkpoints` (a worker without
/// PostgreSQL) is the stream's last entry.
pub async fn wait_checkpointed_in_redis<C: ConnectionLike + Clone + Send + Sync>(
    conn: &C,
    stream: &str,
    group: &str,
) {
    wait_until(
        Duration::from_secs(30),
        "the checkpoint in Redis at the last entry",
        || {
            let mut conn = conn.clone();
            async move {
                let last: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
                    .arg(stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                let at: Option<String> = redis::cmd("HGET")
                    .arg(format!("{stream}:checkpoints"))
                    .arg(group)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or(None);
                last.first().map(|(id, _)| id) == at.as_ref()
            }
        },
    )
    .await;
}
