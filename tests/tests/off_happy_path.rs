//! The persister off the happy path: bad input and odd server states a careful operator meets.
//! Each scenario ends with nothing lost, nothing applied or dead-lettered twice, the worker alive
//! and recovering by itself once the cause is gone, and `/readyz` and the log telling the truth;
//! each reports its line in the fault table (scripts/test prints it).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};
use sqlx::PgPool;
use streamfleet_tests::corpus::{self, Corpus, Expect};
use streamfleet_tests::outcome::{judge, report, Outcome};
use streamfleet_tests::scenario::{
    conclude, config, install_poison_trigger, migrated_database, rows, wait_checkpointed, GROUP,
};
use streamfleet_tests::servers::{PrivatePostgres, PrivateRedis};
use streamfleet_tests::*;
use uuid::Uuid;

/// A valid strict (user) event as a JSON line.
fn user_event(id: Uuid, time: &str, data: Value) -> String {
    json!({"v": 1, "id": id.to_string(), "type": "user.updated", "channel": "user.7",
        "source": "tests", "time": time, "data": data, "correlation_id": "req-odd"})
    .to_string()
}

/// Waits until the group has settled everything on `stream`, failing at once if the worker dies.
async fn settle(worker: &mut Worker, conn: &MultiplexedConnection, stream: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        worker.assert_running();
        let mut c = conn.clone();
        if lag(&mut c, stream, GROUP).await == Some(0) && pending(&mut c, stream, GROUP).await == 0
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not settled within {within:?}:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `/readyz` answers `code` with a body containing `text`.
async fn wait_readyz(worker: &mut Worker, code: u16, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        worker.assert_running();
        let (c, body) = worker.readyz().await;
        if c == code && body.contains(text) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never answered {code} with {text:?} (last: {c} {body:?}):\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn xlen(conn: &mut MultiplexedConnection, key: &str) -> u64 {
    redis::cmd("XLEN").arg(key).query_async(conn).await.unwrap()
}

/// Lines of the log at level ERROR (text format) that contain `text`.
fn error_lines(log: &str, text: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("ERROR") && l.contains(text))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_past_year_9999_in_utc_is_dead_lettered_as_invalid_and_the_worker_carries_on() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("time:");
    let mut corpus = corpus::mixed(2000, 0, 0);
    // Valid RFC 3339, but in UTC the first is in the year 10000 and the second in the year -1.
    for (i, t) in [
        (300, "9999-12-31T23:59:59-01:00"),
        (900, "0000-01-01T00:00:00+00:01"),
    ] {
        corpus
            .lines
            .insert(i, user_event(Uuid::now_v7(), t, json!({})));
        corpus.expected.insert(i, Expect::Dead("invalid"));
    }
    publish_lines(&stream, &corpus.lines).await;
    let mut worker = WorkerEnv::new(&stream, &db)
        .set("FLEET_CONFIG", &config(""))
        .start("persister")
        .await;
    let mut conn = redis().await;
    settle(&mut worker, &conn, &stream, Duration::from_secs(60)).await;
    let o = conclude(
        "time past year 9999 in UTC",
        &mut conn,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    assert_eq!(o.dead_lettered, 2);
    for (_, f) in read_stream(&mut conn, &format!("{stream}:dlq")).await {
        assert!(
            f["dlq_error"].contains("0000 to 9999"),
            "{}",
            f["dlq_error"]
        );
    }
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_blocked_by_a_key_of_another_type_leave_their_entries_pending_until_fixed() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("wrongtype:");
    let dlq = format!("{stream}:dlq");
    let corpus = corpus::mixed(2000, 0, 2);
    let malformed = corpus
        .expected
        .iter()
        .filter(|e| matches!(e, Expect::Dead(_)))
        .count() as u64;
    let mut conn = redis().await;
    let _: () = redis::cmd("SET")
        .arg(&dlq)
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    publish_lines(&stream, &corpus.lines).await;
    let env = WorkerEnv::new(&stream, &db).set(
        "FLEET_CONFIG",
        &config("handler_timeout_ms = 500\nclaim_idle_ms = 1500\nclaim_interval_ms = 200\n"),
    );
    // Unready from its first batch on: wait for /livez only.
    let mut worker = env.start_live("persister").await;
    wait_readyz(&mut worker, 503, "holds another type").await;
    wait_until(Duration::from_secs(60), "valid events persisted", || {
        let pool = pool.clone();
        let want = corpus.expected_rows().len() as i64;
        async move { rows(&pool).await == want }
    })
    .await;
    // The malformed entries wait, unacknowledged, for their dead letters to be possible.
    wait_until(
        Duration::from_secs(30),
        "only the malformed entries pending",
        || {
            let (mut c, stream) = (conn.clone(), stream.clone());
            async move {
                lag(&mut c, &stream, GROUP).await == Some(0)
                    && pending(&mut c, &stream, GROUP).await == malformed
            }
        },
    )
    .await;
    let log = worker.log_text();
    assert_eq!(
        error_lines(&log, "dead_letters_blocked"),
        1,
        "one error line:\n{log}"
    );
    assert!(
        !log.contains("unreachable"),
        "Redis answered all along:\n{log}"
    );
    // The drain does not try the failing dead letters again: a prompt exit, nothing acknowledged.
    let asked = Instant::now();
    worker.stop_cleanly().await;
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "drained in {:?}",
        asked.elapsed()
    );
    assert_eq!(pending(&mut conn, &stream, GROUP).await, malformed);

    // Once the key is fixed, the restarted worker writes each dead letter once.
    let _: () = redis::cmd("DEL")
        .arg(&dlq)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut worker = env.start("persister").await;
    settle(&mut worker, &conn, &stream, Duration::from_secs(60)).await;
    conclude(
        "dead letter key of another type, then fixed",
        &mut conn,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    wait_readyz(&mut worker, 200, "").await;
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_at_maxmemory_keeps_reading_and_acknowledging_and_dead_letters_once_it_can() {
    let server = PrivateRedis::start();
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("oom:");
    let corpus = corpus::mixed(2000, 0, 2);
    let malformed = corpus
        .expected
        .iter()
        .filter(|e| matches!(e, Expect::Dead(_)))
        .count() as u64;
    publish_lines_to(&server.url(), &stream, &corpus.lines).await;
    let mut conn = redis_at(&server.url()).await;
    // The group exists (a deployment creates it up front); then Redis fills up.
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(GROUP)
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    for (k, v) in [("maxmemory-policy", "noeviction"), ("maxmemory", "1")] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let env = WorkerEnv::new(&stream, &db)
        .set("FLEET_REDIS_URL", &server.url())
        .set(
            "FLEET_CONFIG",
            &config("handler_timeout_ms = 500\nclaim_idle_ms = 1500\nclaim_interval_ms = 200\n"),
        );
    let mut worker = env.start_live("persister").await;
    wait_until(
        Duration::from_secs(60),
        "valid events persisted and acknowledged",
        || {
            let (mut c, stream, pool) = (conn.clone(), stream.clone(), pool.clone());
            let want = corpus.expected_rows().len() as i64;
            async move {
                rows(&pool).await == want
                    && lag(&mut c, &stream, GROUP).await == Some(0)
                    && pending(&mut c, &stream, GROUP).await == malformed
            }
        },
    )
    .await;
    wait_readyz(&mut worker, 503, "Redis out of memory").await;
    let log = worker.log_text();
    assert_eq!(
        error_lines(&log, "redis_out_of_memory"),
        1,
        "one error line:\n{log}"
    );
    assert!(
        !log.contains("unreachable"),
        "Redis answered all along:\n{log}"
    );

    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    settle(&mut worker, &conn, &stream, Duration::from_secs(60)).await;
    conclude(
        "redis at maxmemory (noeviction), then freed",
        &mut conn,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    wait_readyz(&mut worker, 200, "").await;
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_number_of_poison_events_reach_the_dlq_once_each_while_the_worker_stays_ready() {
    let db = fresh_database().await;
    let pool = migrated_database(&db).await;
    // The sink fails on these events every time, with an error that looks transient, while it
    // answers every other statement.
    install_poison_trigger(&pool).await;
    let stream = unique("poisons:");
    let mut corpus = corpus::mixed(1500, 0, 0);
    // Three together (reclaimed together, as one batch where every event fails), two apart.
    for i in [500, 501, 502, 900, 1300] {
        corpus.lines.insert(
            i,
            user_event(Uuid::now_v7(), "2026-11-24T10:00:00Z", json!({"poison": i})),
        );
        corpus.expected.insert(i, Expect::Dead("max_deliveries"));
    }
    publish_lines(&stream, &corpus.lines).await;
    let mut worker = WorkerEnv::new(&stream, &db)
        .set("FLEET_SKIP_MIGRATIONS", "true")
        .set("FLEET_CONFIG", &config("max_deliveries = 3\nhandler_timeout_ms = 1000\nclaim_idle_ms = 1500\nclaim_interval_ms = 200\n"))
        .start("persister")
        .await;
    let started = Instant::now();
    // Ready all along: the sink answers; only these events fail.
    let http = worker.http.clone();
    let watch = tokio::spawn(async move {
        let mut unready = 0;
        loop {
            if http_get(&http, "/readyz").await.map(|(c, _)| c) == Some(503) {
                unready += 1;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if unready > 0 {
                return unready;
            }
        }
    });
    let mut conn = redis().await;
    settle(&mut worker, &conn, &stream, Duration::from_secs(60)).await;
    let took = started.elapsed();
    assert!(
        !watch.is_finished(),
        "/readyz said 503 while the sink answered:\n{}",
        worker.log_text()
    );
    watch.abort();
    let o = conclude(
        "5 poison events, 3 of them together",
        &mut conn,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    assert_eq!(o.dead_lettered, 5);
    for (_, f) in read_stream(&mut conn, &format!("{stream}:dlq")).await {
        assert_eq!(f["dlq_reason"], "max_deliveries");
    }
    // About max_deliveries x claim_idle_ms (4.5 s here), with room for a slow machine.
    assert!(took < Duration::from_secs(30), "took {took:?}");
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_live_process_with_the_same_consumer_name_is_refused_at_start() {
    let db = fresh_database().await;
    let stream = unique("twins:");
    let env = WorkerEnv::new(&stream, &db).set("FLEET_CONFIG", &config(""));
    let mut first = env.start("persister").await;
    let (status, stderr) = env.run_to_end("persister").await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("persister: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("FLEET_CONSUMER") && lines[0].contains("already in use"),
        "{}",
        lines[0]
    );
    // A process killed a moment ago is no obstacle: its connection is gone.
    first.signal("KILL").await;
    first.wait(Duration::from_secs(10)).await;
    let mut again = env.start("persister").await;
    again.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_paused_past_claim_idle_writes_no_second_dead_letter_for_what_another_took_over()
{
    let db = fresh_database().await;
    let pool = migrated_database(&db).await;
    // Slow commits, so the first consumer holds batches in flight when it is paused.
    sqlx::raw_sql(
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
           PERFORM pg_sleep(0.3); RETURN NULL; END $$;
         CREATE TRIGGER slow BEFORE INSERT ON events FOR EACH STATEMENT EXECUTE FUNCTION slow();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let stream = unique("paused:");
    let corpus = corpus::mixed(3000, 0, 10);
    publish_lines(&stream, &corpus.lines).await;
    let env = WorkerEnv::new(&stream, &db)
        .set("FLEET_SKIP_MIGRATIONS", "true")
        .set("FLEET_CONFIG", &config("batch_size = 100\nhandler_timeout_ms = 2000\nclaim_idle_ms = 3000\nclaim_interval_ms = 200\n"));
    let mut a = env
        .clone()
        .set("FLEET_CONSUMER", "a")
        .start("persister")
        .await;
    wait_until(
        Duration::from_secs(30),
        "the first consumer committing",
        || {
            let pool = pool.clone();
            async move { rows(&pool).await > 0 }
        },
    )
    .await;
    a.signal("STOP").await;
    let mut b = env.set("FLEET_CONSUMER", "b").start("persister").await;
    let mut conn = redis().await;
    settle(&mut b, &conn, &stream, Duration::from_secs(90)).await;
    // The first one wakes up with batches it read long ago, all settled by the other meanwhile.
    a.signal("CONT").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.assert_running();
    settle(&mut b, &conn, &stream, Duration::from_secs(30)).await;
    conclude(
        "consumer paused past claim_idle_ms, then resumed",
        &mut conn,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    a.stop_cleanly().await;
    b.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_postgres_is_down_exits_0_at_once_and_nothing_is_lost() {
    let pg = PrivatePostgres::start();
    let pool = PgPool::connect(&pg.url()).await.unwrap();
    let stream = unique("termdown:");
    let corpus = corpus::mixed(20_000, 0, 1);
    let env = WorkerEnv::new(&stream, &pg.url()).set("FLEET_CONFIG", &config("batch_size = 100\n"));
    let mut worker = env.start("persister").await;
    let publisher = tokio::spawn(publish_in_chunks(
        redis_url(),
        stream.clone(),
        corpus.lines.clone(),
        2000,
        Duration::from_millis(100),
    ));
    wait_until(Duration::from_secs(60), "rows before the outage", || {
        let pool = pool.clone();
        async move { rows(&pool).await > 1000 }
    })
    .await;
    pool.close().await;
    pg.stop();
    wait_readyz(&mut worker, 503, "sink=false").await;
    publisher.await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    worker.signal("TERM").await;
    let asked = Instant::now();
    let status = worker.wait(Duration::from_secs(30)).await;
    assert!(status.success(), "exit {status}:\n{}", worker.log_text());
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "drained in {:?}",
        asked.elapsed()
    );
    eprintln!(
        "SIGTERM while postgres is down: exit 0 after {:?}",
        asked.elapsed()
    );

    pg.start_again();
    let pool = PgPool::connect(&pg.url()).await.unwrap();
    let mut worker = env.start("persister").await;
    let mut conn = redis().await;
    settle(&mut worker, &conn, &stream, Duration::from_secs(120)).await;
    conclude(
        "SIGTERM while postgres is down",
        &mut conn,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    worker.stop_cleanly().await;
}

/// What became of several loads published on one stream whose entries may be gone since (a
/// deleted stream): rows by event id, dead letters by entry id, against what the loads expect.
async fn judge_loads(
    conn: &mut MultiplexedConnection,
    pool: &PgPool,
    stream: &str,
    loads: &[(Vec<String>, Corpus)],
) -> Outcome {
    let mut want_rows = HashSet::new();
    let mut want_dead = HashSet::new();
    for (ids, corpus) in loads {
        for (id, e) in ids.iter().zip(&corpus.expected) {
            match e {
                Expect::Valid { id, user: true } => {
                    want_rows.insert(*id);
                }
                Expect::Dead(_) => {
                    want_dead.insert(id.clone());
                }
                _ => {}
            }
        }
    }
    let mut o = judge(conn, pool, stream, GROUP, &want_rows, &want_dead).await;
    o.published = loads.iter().map(|(ids, _)| ids.len()).sum();
    o
}

/// Publishes a load and returns its entry ids with it.
async fn load(
    conn: &mut MultiplexedConnection,
    stream: &str,
    corpus: Corpus,
) -> (Vec<String>, Corpus) {
    let before = xlen(conn, stream).await as usize;
    publish_lines(stream, &corpus.lines).await;
    let ids = read_stream(conn, stream).await[before..]
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    (ids, corpus)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_destroyed_or_a_stream_deleted_under_a_glob_is_created_again_at_the_checkpoint() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let prefix = unique("glob");
    let stream = format!("{prefix}:flow");
    let mut conn = redis().await;
    let mut loads = vec![load(&mut conn, &stream, corpus::mixed(500, 0, 2)).await];
    let mut worker = WorkerEnv::new(&format!("{prefix}:*"), &db)
        .set("FLEET_CONFIG", &config("discover_interval_ms = 500\n"))
        .start("persister")
        .await;
    settle(&mut worker, &conn, &stream, Duration::from_secs(60)).await;
    wait_checkpointed(&conn, &pool, &stream).await;

    // An operator destroys the group; new entries arrive.
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&stream)
        .arg(GROUP)
        .query_async(&mut conn)
        .await
        .unwrap();
    loads.push(load(&mut conn, &stream, corpus::mixed(500, 0, 2)).await);
    settle(&mut worker, &conn, &stream, Duration::from_secs(60)).await;
    wait_checkpointed(&conn, &pool, &stream).await;
    // The stream expires (as the seed bus's 24 h EXPIRE does), and is written again before the
    // next discovery pass.
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    loads.push(load(&mut conn, &stream, corpus::mixed(500, 0, 2)).await);
    settle(&mut worker, &conn, &stream, Duration::from_secs(60)).await;

    let o = judge_loads(&mut conn, &pool, &stream, &loads).await;
    report("group destroyed, stream deleted (glob)", &o);
    assert_eq!((o.lost, o.doubled), (0, 0), "{o:?}");
    let log = worker.log_text();
    let missing = log
        .lines()
        .filter(|l| l.contains("consumer group missing"))
        .count();
    assert!(
        (1..=4).contains(&missing),
        "{missing} lines about the missing group:\n{log}"
    );
    wait_readyz(&mut worker, 200, "").await;
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_destroyed_on_a_named_stream_resumes_at_the_checkpoint_not_from_0() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("destroyed:");
    let mut corpus = corpus::mixed(1000, 0, 2);
    publish_lines(&stream, &corpus.lines).await;
    let mut worker = WorkerEnv::new(&stream, &db)
        .set("FLEET_CONFIG", &config(""))
        .start("persister")
        .await;
    let mut conn = redis().await;
    settle(&mut worker, &conn, &stream, Duration::from_secs(60)).await;
    wait_checkpointed(&conn, &pool, &stream).await;
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&stream)
        .arg(GROUP)
        .query_async(&mut conn)
        .await
        .unwrap();
    let more = corpus::mixed(1000, 0, 2);
    publish_lines(&stream, &more.lines).await;
    corpus.lines.extend(more.lines);
    corpus.expected.extend(more.expected);
    settle(&mut worker, &conn, &stream, Duration::from_secs(60)).await;
    // Starting again from 0 would dead-letter the first load's malformed entries a second time.
    conclude(
        "group destroyed on a named stream",
        &mut conn,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_key_that_is_not_utf8_is_skipped_with_one_warning() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let prefix = unique("bytes");
    let stream = format!("{prefix}:ok");
    let mut conn = redis().await;
    let bad: Vec<u8> = [format!("{prefix}:").as_bytes(), &[0xff, 0xfe]].concat();
    let _: String = redis::cmd("XADD")
        .arg(&bad)
        .arg("*")
        .arg("v")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let corpus = corpus::mixed(500, 0, 2);
    publish_lines(&stream, &corpus.lines).await;
    let mut worker = WorkerEnv::new(&format!("{prefix}:*"), &db)
        .set("FLEET_CONFIG", &config("discover_interval_ms = 300\n"))
        .start("persister")
        .await;
    settle(&mut worker, &conn, &stream, Duration::from_secs(60)).await;
    conclude(
        "a stream key that is not UTF-8",
        &mut conn,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await; // a few more discovery passes
    let log = worker.log_text();
    assert_eq!(
        log.lines().filter(|l| l.contains("not UTF-8")).count(),
        1,
        "{log}"
    );
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_privilege_stops_the_start_and_at_run_time_makes_the_worker_wait_unready() {
    let db = fresh_database().await;
    let admin = migrated_database(&db).await;
    let role = unique("app_");
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA public TO {role};
         GRANT SELECT ON events TO {role}; GRANT SELECT, INSERT, UPDATE ON checkpoints TO {role};"
    ))
    .execute(&admin)
    .await
    .unwrap();
    let url = db.replacen("postgres@", &format!("{role}@"), 1);
    let stream = unique("grants:");
    let env = WorkerEnv::new(&stream, &url)
        .set("FLEET_SKIP_MIGRATIONS", "true")
        .set("FLEET_CONFIG", &config(""));
    let (status, stderr) = env.run_to_end("persister").await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("persister: error:"))
        .unwrap_or_default();
    assert!(
        line.contains(&role) && line.contains("events"),
        "names the role and the table: {stderr}"
    );

    let grant = |sql: String| {
        let admin = admin.clone();
        async move { sqlx::raw_sql(&sql).execute(&admin).await.unwrap() }
    };
    grant(format!("GRANT INSERT ON events TO {role}")).await;
    let mut corpus = corpus::mixed(500, 0, 0);
    publish_lines(&stream, &corpus.lines).await;
    let mut worker = env.start("persister").await;
    let mut conn = redis().await;
    settle(&mut worker, &conn, &stream, Duration::from_secs(60)).await;

    // Revoked while running: a configuration fault, waited out whole, with no per-event churn.
    grant(format!("REVOKE INSERT ON events FROM {role}")).await;
    let more = corpus::mixed(2000, 0, 0);
    publish_lines(&stream, &more.lines).await;
    corpus.lines.extend(more.lines);
    corpus.expected.extend(more.expected);
    wait_readyz(&mut worker, 503, "sink_misconfigured").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = worker.log_text();
    assert_eq!(
        error_lines(&log, "sink_misconfigured"),
        1,
        "one error line:\n{log}"
    );
    for churn in ["isolating", "keeps failing", "dead-lettering"] {
        assert!(!log.contains(churn), "no per-event churn ({churn}):\n{log}");
    }
    assert_eq!(xlen(&mut conn, &format!("{stream}:dlq")).await, 0);
    grant(format!("GRANT INSERT ON events TO {role}")).await;
    settle(&mut worker, &conn, &stream, Duration::from_secs(60)).await;
    wait_readyz(&mut worker, 200, "").await;
    conclude(
        "INSERT privilege revoked, then granted",
        &mut conn,
        &admin,
        &stream,
        &corpus,
    )
    .await;
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_50_mb_cost_little_memory_and_their_dead_letters_keep_a_prefix() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("huge:");
    let mut corpus = corpus::mixed(1000, 0, 0);
    let blob = "x".repeat(50 * 1024 * 1024);
    for i in [100, 500, 501] {
        corpus.lines.insert(
            i,
            user_event(
                Uuid::now_v7(),
                "2026-11-24T10:00:00Z",
                json!({"blob": blob}),
            ),
        );
        corpus.expected.insert(i, Expect::Dead("too_large"));
    }
    drop(blob);
    publish_lines(&stream, &corpus.lines).await;
    let mut worker = WorkerEnv::new(&stream, &db)
        .set("FLEET_CONFIG", &config(""))
        .start("persister")
        .await;
    let mut conn = redis().await;
    settle(&mut worker, &conn, &stream, Duration::from_secs(120)).await;
    let peak = worker.peak_rss();
    assert!(peak < 64 << 20, "peak RSS {} MiB", peak >> 20);
    let dead = read_stream(&mut conn, &format!("{stream}:dlq")).await;
    assert_eq!(dead.len(), 3);
    for (_, f) in &dead {
        assert_eq!(f["dlq_reason"], "too_large");
        assert_eq!(f["data"].len(), 4096, "a prefix of the value");
        assert!(f["data"].starts_with("{\"blob\":\"xxx"));
        let size: usize = f["dlq_size"].parse().unwrap();
        assert!(size > 50 << 20, "the entry's true size: {size}");
        assert!(
            f["dlq_truncated"].starts_with("data="),
            "{}",
            f["dlq_truncated"]
        );
        assert_eq!(f["channel"], "user.7", "the envelope travels whole");
    }
    let o = conclude("three entries of 50 MB", &mut conn, &pool, &stream, &corpus).await;
    assert_eq!(o.dead_lettered, 3);
    eprintln!(
        "peak RSS with 50 MB entries: {:.1} MiB",
        peak as f64 / 1048576.0
    );
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_streams_read_in_slices_reclaimed_in_one_pass_with_bounded_series() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let prefix = unique("many");
    const STREAMS: usize = 2000;
    let mut conn = redis().await;
    // One event on each stream, and the group on each.
    let mut pipe = redis::pipe();
    for i in 0..STREAMS {
        let key = format!("{prefix}:{i:05}");
        pipe.cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg("v")
            .arg("1")
            .arg("id")
            .arg(Uuid::now_v7().to_string())
            .arg("type")
            .arg("user.updated")
            .arg("channel")
            .arg(format!("user.{i}"))
            .arg("source")
            .arg("tests")
            .arg("time")
            .arg("2026-11-24T10:00:00Z")
            .arg("data")
            .arg("{}")
            .ignore();
        pipe.cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg(GROUP)
            .arg("0")
            .ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    // A consumer that died holding the entries of the last 500 streams.
    let mut read = redis::cmd("XREADGROUP");
    read.arg("GROUP").arg(GROUP).arg("dead").arg("STREAMS");
    for i in STREAMS - 500..STREAMS {
        read.arg(format!("{prefix}:{i:05}"));
    }
    for _ in 0..500 {
        read.arg(">");
    }
    let _: redis::Value = read.query_async(&mut conn).await.unwrap();
    let mut worker = WorkerEnv::new(&format!("{prefix}:*"), &db)
        .set("FLEET_CONFIG", &config("batch_size = 100\nhandler_timeout_ms = 2000\nclaim_idle_ms = 3000\nclaim_interval_ms = 500\nlag_interval_ms = 500\n"))
        .start("persister")
        .await;
    wait_until(
        Duration::from_secs(150),
        "every stream's event persisted",
        || {
            let pool = pool.clone();
            async move { rows(&pool).await == STREAMS as i64 }
        },
    )
    .await;
    worker.assert_running();
    // Rows are committed before their batch is settled (and counted): wait for the settlements.
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker.metric("fleet_events_read_total", "").await < STREAMS as f64 {
        assert!(Instant::now() < deadline, "every entry settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // batch_size holds: 2000 entries took at least 20 batches.
    let batches = worker
        .metric("fleet_batch_duration_seconds_count", "")
        .await;
    assert!(
        batches >= 20.0,
        "{batches} batches for {STREAMS} entries of batch_size 100"
    );
    assert!(worker.metric("fleet_events_reclaimed_total", "").await >= 500.0);
    // Series are labelled by the FLEET_STREAMS item, not by stream.
    let (_, metrics) = http_get(&worker.http, "/metrics").await.unwrap();
    let labels: HashSet<&str> = metrics
        .lines()
        .filter_map(|l| l.split("stream=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(
        labels,
        HashSet::from([format!("{prefix}:*").as_str()]),
        "stream labels"
    );
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_vanishing_between_polling_slices_do_not_stop_the_worker() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let prefix = unique("vanish");
    let kept = format!("{prefix}:kept");
    let mut conn = redis().await;
    // One stream per read, so the worker polls in slices.
    let mut worker = WorkerEnv::new(&format!("{prefix}:*"), &db)
        .set(
            "FLEET_CONFIG",
            &config("streams_per_read = 1\npoll_interval_ms = 20\ndiscover_interval_ms = 50\n"),
        )
        .start("persister")
        .await;
    let mut corpus = Corpus::default();
    // Five streams come and go around `kept` and `z` (a glob's streams expire in normal
    // operation): reads, discovery and group repair meet them half-gone, in every order.
    let _: String = redis::cmd("XADD")
        .arg(format!("{prefix}:z"))
        .arg("*")
        .arg("v")
        .arg("2")
        .query_async(&mut conn)
        .await
        .unwrap();
    for round in 0..30 {
        for name in ["x1", "x2", "x3", "x4", "x5"] {
            let _: String = redis::cmd("XADD")
                .arg(format!("{prefix}:{name}"))
                .arg("*")
                .arg("v")
                .arg("2")
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        let line = corpus::valid_line(Uuid::now_v7(), true, round);
        publish_lines(&kept, std::slice::from_ref(&line)).await;
        corpus.expected.push(Expect::Valid {
            id: serde_json::from_str::<Value>(&line).unwrap()["id"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap(),
            user: true,
        });
        corpus.lines.push(line);
        tokio::time::sleep(Duration::from_millis(60)).await;
        for name in ["x1", "x2", "x3", "x4", "x5"] {
            let _: () = redis::cmd("DEL")
                .arg(format!("{prefix}:{name}"))
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
        worker.assert_running();
    }
    settle(&mut worker, &conn, &kept, Duration::from_secs(60)).await;
    conclude(
        "streams vanishing between slices",
        &mut conn,
        &pool,
        &kept,
        &corpus,
    )
    .await;
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_large_valid_entries_is_read_a_few_at_a_time() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("large:");
    // 120 valid events of ~1 MB each (under the default 1 MiB `data` limit): 500 to a read would
    // be a 120 MB reply, and several batches are in flight.
    let mut corpus = Corpus::default();
    let blob = "x".repeat(1_000_000);
    for _ in 0..120 {
        let id = Uuid::now_v7();
        corpus.lines.push(user_event(
            id,
            "2026-11-24T10:00:00Z",
            json!({ "blob": blob }),
        ));
        corpus.expected.push(Expect::Valid { id, user: true });
    }
    drop(blob);
    publish_lines(&stream, &corpus.lines).await;
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("cfg")));
    std::fs::write(&cfg, "[tuning]\nblock_ms = 200\n").unwrap();
    let mut worker = WorkerEnv::new(&stream, &db)
        .set("FLEET_CONFIG", &cfg.display().to_string())
        .start("persister")
        .await;
    let mut conn = redis().await;
    settle(&mut worker, &conn, &stream, Duration::from_secs(120)).await;
    let peak = worker.peak_rss();
    eprintln!(
        "peak RSS with 120 entries of 1 MB: {:.1} MiB",
        peak as f64 / 1048576.0
    );
    assert!(peak < 64 << 20, "peak RSS {} MiB", peak >> 20);
    conclude(
        "120 valid entries of 1 MB",
        &mut conn,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_cannot_be_created_again_keeps_the_worker_unready_until_it_can() {
    let server = PrivateRedis::start();
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("regroup:");
    let corpus = corpus::mixed(600, 0, 2);
    publish_lines_to(&server.url(), &stream, &corpus.lines).await;
    let mut worker = WorkerEnv::new(&stream, &db)
        .set("FLEET_REDIS_URL", &server.url())
        .set("FLEET_CONFIG", &config(""))
        .start("persister")
        .await;
    let mut conn = redis_at(&server.url()).await;
    settle(&mut worker, &conn, &stream, Duration::from_secs(60)).await;
    wait_checkpointed(&conn, &pool, &stream).await;
    // Redis fills up and the group is destroyed: creating it again needs memory.
    for (k, v) in [("maxmemory-policy", "noeviction"), ("maxmemory", "1")] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&stream)
        .arg(GROUP)
        .query_async(&mut conn)
        .await
        .unwrap();
    wait_readyz(&mut worker, 503, "group_missing").await;
    // Memory again: the worker creates the group (at the checkpoint) by itself and carries on.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    settle(&mut worker, &conn, &stream, Duration::from_secs(60)).await;
    wait_readyz(&mut worker, 200, "").await;
    conclude(
        "group missing and not creatable (OOM), then created",
        &mut conn,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    let log = worker.log_text();
    assert_eq!(
        error_lines(&log, "group_missing"),
        1,
        "one error line:\n{log}"
    );
    worker.stop_cleanly().await;
}
