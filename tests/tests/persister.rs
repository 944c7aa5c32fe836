//! Black-box tests of the real `persister` binary against real Redis and PostgreSQL.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::PgPool;
use streamfleet_tests::corpus::{self, Corpus, Expect, TEST_MAX_DATA_BYTES};
use streamfleet_tests::scenario::{checkpoint, migrated_database};
use streamfleet_tests::*;
use uuid::Uuid;

const GROUP: &str = "persister";

fn config_file(body: &str) -> String {
    let path = std::env::temp_dir().join(format!("{}.toml", unique("cfg")));
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

fn test_config() -> String {
    config_file(&format!(
        "[tuning]\nmax_data_bytes = {TEST_MAX_DATA_BYTES}\nblock_ms = 200\n"
    ))
}

/// Waits until every entry of `stream` is delivered, acknowledged and checkpointed.
async fn wait_drained(pool: &PgPool, stream: &str) {
    let mut conn = redis().await;
    let last = read_stream(&mut conn, stream)
        .await
        .last()
        .unwrap()
        .0
        .clone();
    wait_until(Duration::from_secs(120), "the stream to be drained", || {
        let mut conn = conn.clone();
        let last = last.clone();
        async move {
            lag(&mut conn, stream, GROUP).await == Some(0)
                && pending(&mut conn, stream, GROUP).await == 0
                && checkpoint(pool, stream).await.as_deref() == Some(last.as_str())
        }
    })
    .await;
}

/// Checks, from PostgreSQL and Redis alone, that the corpus landed exactly as it must:
/// every distinct valid strict event once, every malformed entry in the DLQ once with its reason,
/// nothing pending, and the checkpoint at the last entry.
async fn assert_landed(pool: &PgPool, stream: &str, corpus: &Corpus, single_consumer: bool) {
    let mut conn = redis().await;
    let entries = read_stream(&mut conn, stream).await;
    assert_eq!(entries.len(), corpus.lines.len(), "entries on the stream");

    let rows: Vec<(Uuid, String, String, Option<String>)> =
        sqlx::query_as("SELECT event_id, stream, stream_id, correlation_id FROM events")
            .fetch_all(pool)
            .await
            .unwrap();
    let expected = corpus.expected_rows();
    assert_eq!(
        rows.len(),
        expected.len(),
        "rows: each distinct valid user event exactly once"
    );
    let mut ids_by_entry: HashMap<&str, Uuid> = HashMap::new();
    for (i, (entry_id, _)) in entries.iter().enumerate() {
        if let Expect::Valid { id, .. } = corpus.expected[i] {
            ids_by_entry.insert(entry_id, id);
        }
    }
    for (id, row_stream, stream_id, correlation) in &rows {
        let first = *expected
            .get(id)
            .unwrap_or_else(|| panic!("unexpected row {id}"));
        assert_eq!(row_stream, stream);
        assert!(correlation
            .as_deref()
            .is_some_and(|c| c.starts_with("req-")));
        if single_consumer {
            assert_eq!(
                stream_id, &entries[first].0,
                "row traceable to its first entry"
            );
        } else {
            assert_eq!(
                ids_by_entry.get(stream_id.as_str()),
                Some(id),
                "row traceable to an entry of its id"
            );
        }
    }

    let dead = read_stream(&mut conn, &format!("{stream}:dlq")).await;
    let expected_dead: Vec<(usize, &str)> = corpus
        .expected
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e {
            Expect::Dead(reason) => Some((i, *reason)),
            _ => None,
        })
        .collect();
    assert_eq!(
        dead.len(),
        expected_dead.len(),
        "dead letters: each malformed entry exactly once"
    );
    let by_entry: HashMap<&str, &HashMap<String, String>> = dead
        .iter()
        .map(|(_, f)| (f["dlq_entry_id"].as_str(), f))
        .collect();
    for (i, reason) in expected_dead {
        let f = by_entry
            .get(entries[i].0.as_str())
            .unwrap_or_else(|| panic!("entry {} not dead-lettered", entries[i].0));
        assert_eq!(
            f["dlq_reason"],
            reason,
            "reason of {}",
            corpus.lines[i].chars().take(200).collect::<String>()
        );
        assert_eq!(f["dlq_stream"], stream);
        assert_eq!(f["dlq_group"], GROUP);
        assert!(!f["dlq_error"].is_empty());
        assert!(f.contains_key("dlq_at") && f.contains_key("dlq_deliveries"));
        // The original fields travel unchanged; in the dead letter of a too large entry, a long
        // value keeps only its first 4 KiB, and is named with its size.
        for (k, v) in &entries[i].1 {
            if reason == "too_large" && v.len() > 4096 {
                assert!(f[k].len() == 4096 && v.starts_with(&f[k]), "prefix of {k}");
                assert!(
                    f["dlq_truncated"].contains(&format!("{k}={}", v.len())),
                    "{k} named in dlq_truncated: {}",
                    f["dlq_truncated"]
                );
            } else {
                assert!(f.get(k) == Some(v), "original field {k} unchanged");
            }
        }
    }

    assert_eq!(
        pending(&mut conn, stream, GROUP).await,
        0,
        "nothing pending"
    );
    assert_eq!(
        checkpoint(pool, stream).await.as_deref(),
        Some(entries.last().unwrap().0.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_load_of_20000_lands_exactly_once_with_dead_letters() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("mixed:");
    let corpus = corpus::mixed(20_000, 5, 1);
    publish_lines(&stream, &corpus.lines).await;

    let env = WorkerEnv::new(&stream, &db).set("FLEET_CONFIG", &test_config());
    let mut worker = env.start("persister").await;
    wait_drained(&pool, &stream).await;
    assert_landed(&pool, &stream, &corpus, true).await;

    assert_eq!(worker.metric("fleet_events_read_total", "").await, 20_000.0);
    assert_eq!(
        worker.metric("fleet_events_dead_lettered_total", "").await,
        200.0
    );
    assert!(worker.metric("fleet_events_deduplicated_total", "").await > 0.0);
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_persisters_in_one_group_share_the_work_with_no_double_rows() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("shared:");
    let corpus = corpus::mixed(10_000, 10, 1);
    // Small batches so both consumers get a share.
    let cfg = config_file(&format!(
        "[tuning]\nmax_data_bytes = {TEST_MAX_DATA_BYTES}\nbatch_size = 50\nblock_ms = 100\n"
    ));
    let env = WorkerEnv::new(&stream, &db).set("FLEET_CONFIG", &cfg);
    let mut a = env
        .clone()
        .set("FLEET_CONSUMER", "a")
        .start("persister")
        .await;
    let mut b = env.set("FLEET_CONSUMER", "b").start("persister").await;
    publish_lines(&stream, &corpus.lines).await;
    wait_drained(&pool, &stream).await;
    assert_landed(&pool, &stream, &corpus, false).await;

    let (read_a, read_b) = (
        a.metric("fleet_events_read_total", "").await,
        b.metric("fleet_events_read_total", "").await,
    );
    assert!(
        read_a > 0.0 && read_b > 0.0,
        "both consumers worked: {read_a} / {read_b}"
    );
    assert_eq!(
        read_a + read_b,
        10_000.0,
        "each entry delivered to one consumer"
    );
    for w in [&mut a, &mut b] {
        w.stop_cleanly().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_steady_publish_exits_0_and_restart_loses_and_doubles_nothing() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("steady:");
    let corpus = corpus::mixed(12_000, 5, 1);
    let env = WorkerEnv::new(&stream, &db)
        .set("FLEET_CONFIG", &config_file(&format!("[tuning]\nmax_data_bytes = {TEST_MAX_DATA_BYTES}\nbatch_size = 100\nblock_ms = 100\n")))
        .set("FLEET_SHUTDOWN_GRACE_MS", "10000");

    // A steady publisher: 40 chunks of 300 entries, 50 ms apart.
    let lines = corpus.lines.clone();
    let stream_key = stream.clone();
    let publisher = tokio::spawn(async move {
        for chunk in lines.chunks(300) {
            publish_lines(&stream_key, chunk).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    let mut first = env.start("persister").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    first.signal("TERM").await;
    let started = std::time::Instant::now();
    let status = first.wait(Duration::from_secs(12)).await;
    assert!(
        status.success(),
        "exit 0 on SIGTERM, got {status}:\n{}",
        first.log_text()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "drained within the grace period"
    );
    assert!(first.log_text().contains("stopped cleanly"));
    let rows_after_first: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(rows_after_first > 0, "the first run persisted something");

    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut second = env.start("persister").await;
    publisher.await.unwrap();
    wait_drained(&pool, &stream).await;
    assert_landed(&pool, &stream, &corpus, true).await;
    second.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_pending_entries_are_reapplied_first_after_a_crash() {
    // A consumer that crashed after reading leaves entries pending under its name; a restart with
    // the same name re-reads them before anything new, and applies them once.
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("crash:");
    let corpus = corpus::mixed(300, 0, 0);
    publish_lines(&stream, &corpus.lines).await;
    let mut conn = redis().await;
    // Simulate the crashed run: 120 entries delivered to c1 and never acknowledged.
    abandon_entries(&mut conn, &stream, GROUP, "c1", 120).await;

    let env = WorkerEnv::new(&stream, &db).set("FLEET_CONFIG", &test_config());
    let mut worker = env.start("persister").await;
    wait_drained(&pool, &stream).await;
    assert_landed(&pool, &stream, &corpus, true).await;
    assert!(worker.log_text().contains("own pending entries re-read"));
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_bus_entries_are_upcast_and_replays_deduplicate() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let flow = unique("f");
    let stream = format!("flow:events:{flow}");
    let lines: Vec<String> = (0..50)
        .map(|i| {
            serde_json::json!({
                "event_type": "AGENT_PROGRESS", "payload": {"step": i},
                "timestamp": "2024-05-01T12:30:45.123456", "source": "orchestrator", "correlation_id": "",
            })
            .to_string()
        })
        .collect();
    publish_lines(&stream, &lines).await;
    let cfg = config_file("[[route]]\npattern = \"flow.*.agent_progress\"\nstrict = true\n");
    let env = WorkerEnv::new(&format!("flow:events:{flow}*"), &db)
        .set("FLEET_CONFIG", &cfg)
        .set("FLEET_GROUP", GROUP);
    let mut worker = env.start("persister").await;
    wait_drained(&pool, &stream).await;

    let mut conn = redis().await;
    let entries = read_stream(&mut conn, &stream).await;
    let rows: Vec<(Uuid, String, String, String, Option<String>, serde_json::Value)> = sqlx::query_as(
        "SELECT event_id, stream_id, channel, type, correlation_id, data FROM events WHERE stream = $1",
    )
    .bind(&stream)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 50);
    assert_eq!(entries.len(), 50);
    for (id, entry_id, channel, ty, correlation, data) in &rows {
        assert!(
            entries.iter().any(|(e, _)| e == entry_id),
            "row traceable to entry {entry_id}"
        );
        let name = format!("{stream}/{entry_id}");
        assert_eq!(
            *id,
            Uuid::new_v5(&streamfleet_legacy_namespace(), name.as_bytes())
        );
        assert_eq!(channel, &format!("flow.{flow}.agent_progress"));
        assert_eq!(ty, "agent_progress");
        assert_eq!(correlation, &None);
        assert!(data.get("step").is_some());
    }

    // Replaying the same entries (a new group reading from the start) adds no row.
    worker.stop_cleanly().await;
    let mut again = WorkerEnv::new(&format!("flow:events:{flow}*"), &db)
        .set("FLEET_CONFIG", &cfg)
        .set("FLEET_GROUP", "replay")
        .start("persister")
        .await;
    wait_until(Duration::from_secs(60), "the replay group to drain", || {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move {
            lag(&mut conn, &stream, "replay").await == Some(0)
                && pending(&mut conn, &stream, "replay").await == 0
        }
    })
    .await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 50);
    assert!(
        again
            .metric("fleet_events_deduplicated_total", "stage=\"sink\"")
            .await
            >= 50.0
    );
    again.stop_cleanly().await;
}

/// The documented legacy namespace (schemas/events/README.md), restated so a change to it in the
/// code fails this test.
fn streamfleet_legacy_namespace() -> Uuid {
    Uuid::parse_str("5f1c3d2e-8a47-4b6e-9c0d-7e2f4a1b3c59").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_2_with_one_line_naming_the_setting() {
    let db = fresh_database().await;
    let base = WorkerEnv::new("cfg:stream", &db).set("FLEET_HTTP_ADDR", "127.0.0.1:0");
    let cases: Vec<(WorkerEnv, &str)> = vec![
        (
            base.clone().set("FLEET_REDIS_URL", "http://localhost:6379"),
            "FLEET_REDIS_URL",
        ),
        (
            base.clone().set("FLEET_HTTP_ADDR", "not-an-address"),
            "--http-addr",
        ),
        (base.clone().unset("FLEET_STREAMS"), "--streams"),
        (base.clone().set("FLEET_STREAMS", " , "), "FLEET_STREAMS"),
        (
            base.clone().unset("FLEET_DATABASE_URL"),
            "FLEET_DATABASE_URL",
        ),
        (
            base.clone().set("FLEET_DATABASE_URL", "mysql://nope"),
            "FLEET_DATABASE_URL",
        ),
        (
            base.clone().set("FLEET_CONFIG", "/nonexistent/fleet.toml"),
            "FLEET_CONFIG",
        ),
        (
            base.clone()
                .set("FLEET_CONFIG", &config_file("[tuning]\nbatch_sise = 10\n")),
            "batch_sise",
        ),
        (
            base.clone().set(
                "FLEET_CONFIG",
                &config_file("[tuning]\nclaim_idle_ms = 100\nhandler_timeout_ms = 200\n"),
            ),
            "claim_idle_ms",
        ),
        (
            base.clone().set(
                "FLEET_CONFIG",
                &config_file("[[route]]\npattern = \"user.**\"\n"),
            ),
            "user.**",
        ),
        (
            base.clone().set(
                "FLEET_CONFIG",
                &config_file("[[backpressure]]\npattern = \"a\"\nmode = \"coalesce\"\n"),
            ),
            "window_ms",
        ),
        (base.clone().set("FLEET_LOG_FORMAT", "xml"), "--log-format"),
        (base.clone().set("FLEET_LOG", "[[["), "FLEET_LOG"),
        (
            base.clone().set("FLEET_STREAMS", "orders:dlq"),
            "FLEET_STREAMS",
        ),
    ];
    for (env, needle) in cases {
        let (status, stderr) = env.run_to_end("persister").await;
        assert_eq!(
            status.code(),
            Some(2),
            "{needle}: status {status}, stderr {stderr:?}"
        );
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{needle}: one line, got {stderr:?}");
        assert!(lines[0].contains(needle), "{needle}: {:?}", lines[0]);
        assert!(lines[0].starts_with("persister: error:"), "{:?}", lines[0]);
    }
}

/// Calls of one command on a server, from INFO commandstats.
async fn command_calls(conn: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reclaimer_scans_once_per_interval_not_once_per_batch() {
    let server = streamfleet_tests::servers::PrivateRedis::start();
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("claims:");
    let corpus = corpus::mixed(20_000, 0, 0);
    publish_lines_to(&server.url(), &stream, &corpus.lines).await;
    let env = WorkerEnv::new(&stream, &db)
        .set("FLEET_REDIS_URL", &server.url())
        .set(
            "FLEET_CONFIG",
            &config_file("[tuning]\nbatch_size = 100\nclaim_interval_ms = 60000\n"),
        );
    let mut worker = env.start("persister").await;
    let mut conn = redis_at(&server.url()).await;
    wait_until(Duration::from_secs(60), "the stream to be drained", || {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move {
            lag(&mut conn, &stream, GROUP).await == Some(0)
                && pending(&mut conn, &stream, GROUP).await == 0
        }
    })
    .await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows as usize, corpus.expected_rows().len());
    let reads = command_calls(&mut conn, "xreadgroup").await;
    let claims = command_calls(&mut conn, "xautoclaim").await;
    assert!(reads >= 200, "{reads} reads for 200 batches");
    assert!(
        claims <= 3,
        "XAUTOCLAIM ran {claims} times during one claim interval ({reads} reads)"
    );
    worker.stop_cleanly().await;
}

/// Makes the six first entries of `stream` look as if they had crashed their consumer `c1` four
/// times in a row: read, then re-read three times by restarts that died before settling them.
async fn crash_loop_six(conn: &mut redis::aio::MultiplexedConnection, stream: &str) {
    abandon_entries(conn, stream, GROUP, "c1", 6).await;
    for _ in 0..3 {
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg("c1")
            .arg("STREAMS")
            .arg(stream)
            .arg("0")
            .query_async(conn)
            .await
            .unwrap();
    }
}

async fn rows_of(pool: &PgPool, stream: &str) -> usize {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE stream = $1")
        .bind(stream)
        .fetch_one(pool)
        .await
        .unwrap() as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn innocent_entries_redelivered_by_crashes_past_max_deliveries_are_applied() {
    // Each crash and restart re-reads the consumer's own pending entries, and each re-read counts
    // as a delivery. Past max_deliveries an entry is only a suspect: applied alone, it succeeds,
    // so it is applied, not dead-lettered with the entry that caused the crashes.
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("crashloop:");
    let corpus = corpus::mixed(60, 0, 0);
    publish_lines(&stream, &corpus.lines).await;
    let mut conn = redis().await;
    crash_loop_six(&mut conn, &stream).await;
    let env = WorkerEnv::new(&stream, &db).set(
        "FLEET_CONFIG",
        &config_file("[tuning]\nmax_deliveries = 3\n"),
    );
    let mut worker = env.start("persister").await;
    wait_drained(&pool, &stream).await;
    let dead = read_stream(&mut conn, &format!("{stream}:dlq")).await;
    assert!(dead.is_empty(), "no innocent entry dead-lettered: {dead:?}");
    assert_eq!(rows_of(&pool, &stream).await, corpus.expected_rows().len());
    let marks: u64 = redis::cmd("HLEN")
        .arg(format!("{stream}:trials"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(marks, 0, "no trial marker left behind");
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_kills_the_worker_while_applied_alone_is_dead_lettered_and_its_neighbours_are_not(
) {
    let db = fresh_database().await;
    let pool = migrated_database(&db).await;
    // Applying this one event hangs the worker (then fails): the test kills the worker meanwhile,
    // as an out-of-memory kill or a segfault would.
    sqlx::raw_sql(
        "CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
           IF NEW.data ? 'stall' THEN PERFORM pg_sleep(5); RAISE EXCEPTION 'stalled'; END IF;
           RETURN NEW; END $$;
         CREATE TRIGGER stall BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION stall();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let stream = unique("killer:");
    let mut corpus = corpus::mixed(60, 0, 0);
    let killer = Uuid::now_v7();
    corpus.lines[2] = serde_json::json!({"v": 1, "id": killer.to_string(), "type": "user.updated",
        "channel": "user.1", "source": "tests", "time": "2026-11-24T10:00:00Z",
        "data": {"stall": true}, "correlation_id": "req-killer"})
    .to_string();
    corpus.expected[2] = Expect::Dead("max_deliveries");
    publish_lines(&stream, &corpus.lines).await;
    let mut conn = redis().await;
    crash_loop_six(&mut conn, &stream).await;
    let entries = read_stream(&mut conn, &stream).await;
    let killer_entry = entries[2].0.clone();

    let env = WorkerEnv::new(&stream, &db)
        .set("FLEET_SKIP_MIGRATIONS", "true")
        .set(
            "FLEET_CONFIG",
            &config_file(
                "[tuning]\nmax_deliveries = 3\nhandler_timeout_ms = 20000\nclaim_idle_ms = 30000\n",
            ),
        );
    let mut worker = env.start("persister").await;
    // The worker marks the entry it tries alone, then hangs on it: kill it there.
    wait_until(Duration::from_secs(30), "the killer's trial", || {
        let mut conn = conn.clone();
        let (stream, field) = (stream.clone(), format!("{GROUP}:{killer_entry}"));
        async move {
            redis::cmd("HEXISTS")
                .arg(format!("{stream}:trials"))
                .arg(field)
                .query_async::<bool>(&mut conn)
                .await
                .unwrap()
        }
    })
    .await;
    worker.signal("KILL").await;
    worker.wait(Duration::from_secs(10)).await;

    let mut worker = env.start("persister").await;
    wait_drained(&pool, &stream).await;
    let dead = read_stream(&mut conn, &format!("{stream}:dlq")).await;
    assert_eq!(
        dead.len(),
        1,
        "only the entry that killed the worker: {dead:?}"
    );
    let f = &dead[0].1;
    assert_eq!(f["dlq_entry_id"], killer_entry);
    assert_eq!(f["dlq_reason"], "max_deliveries");
    assert!(
        f["dlq_error"].contains("stopped while applying it alone"),
        "{}",
        f["dlq_error"]
    );
    assert_eq!(
        rows_of(&pool, &stream).await,
        corpus.expected_rows().len(),
        "its neighbours are applied"
    );
    worker.stop_cleanly().await;
}

/// The reader has its own connection (`read_conn`): it must select the URL's database as the
/// other connections do, or it would read (and create groups on) database 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_database_other_than_0_is_read_and_acknowledged_there() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let url = format!("{}/7", redis_url());
    let stream = unique("db7:");
    let lines: Vec<String> = (0..300)
        .map(|n| corpus::valid_line(Uuid::now_v7(), true, n))
        .collect();
    publish_lines_to(&url, &stream, &lines).await;
    let mut worker = WorkerEnv::new(&stream, &db)
        .set("FLEET_REDIS_URL", &url)
        .set("FLEET_CONFIG", &test_config())
        .start("persister")
        .await;
    let mut conn = redis_at(&url).await;
    wait_until(Duration::from_secs(60), "database 7 to be drained", || {
        let mut conn = conn.clone();
        let (pool, stream) = (pool.clone(), stream.clone());
        async move {
            pending(&mut conn, &stream, GROUP).await == 0
                && lag(&mut conn, &stream, GROUP).await == Some(0)
                && sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE stream = $1")
                    .bind(&stream)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
                    == 300
        }
    })
    .await;
    let last = read_stream(&mut conn, &stream)
        .await
        .last()
        .unwrap()
        .0
        .clone();
    assert_eq!(checkpoint(&pool, &stream).await, Some(last));
    let mut db0 = redis().await;
    let exists: bool = redis::cmd("EXISTS")
        .arg(&stream)
        .query_async(&mut db0)
        .await
        .unwrap();
    assert!(!exists, "nothing was created in database 0");
    worker.stop_cleanly().await;
}
