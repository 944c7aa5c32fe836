//! The fault suite: the real persister under crashes, outages, poison and stops. Each scenario
//! publishes a known set of events and ends by checking, from PostgreSQL and Redis alone, that
//! every valid strict event is present exactly once, every invalid one is in the DLQ exactly once,
//! and nothing remains pending; it then reports its figures (scripts/test prints them all).

use std::time::{Duration, Instant};

use sqlx::PgPool;
use streamfleet_tests::corpus;
use streamfleet_tests::outcome::{acknowledged_but_missing, measure};
use streamfleet_tests::scenario::{
    conclude, config, install_poison_trigger, migrated_database, rows, wait_settled, GROUP,
};
use streamfleet_tests::servers::{PrivatePostgres, PrivateRedis};
use streamfleet_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_five_times_during_a_load_of_50000_loses_and_doubles_nothing() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("kill9:");
    let corpus = corpus::mixed(50_000, 5, 1);
    let env = WorkerEnv::new(&stream, &db).set("FLEET_CONFIG", &config(""));
    let publisher = tokio::spawn(publish_in_chunks(
        redis_url(),
        stream.clone(),
        corpus.lines.clone(),
        2500,
        Duration::from_millis(150),
    ));
    for round in 0..5 {
        let worker = env.start("persister").await;
        tokio::time::sleep(Duration::from_millis(random_between(150, 900))).await;
        worker.signal("KILL").await;
        let mut worker = worker;
        worker.wait(Duration::from_secs(10)).await;
        eprintln!("kill -9 round {round}: {} rows so far", rows(&pool).await);
        if lag(&mut redis().await, &stream, GROUP).await.is_some() {
            let missing =
                acknowledged_but_missing(&mut redis().await, &pool, &stream, GROUP, &corpus).await;
            assert!(
                missing.is_empty(),
                "round {round}: acknowledged without effect: {missing:?}"
            );
        }
    }
    publisher.await.unwrap();
    let mut last = env.start("persister").await;
    let mut conn = redis().await;
    wait_settled(&conn, &stream, GROUP).await;
    let o = conclude(
        "kill -9 x5 during 50k load",
        &mut conn,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    assert_eq!(o.published, 50_000);
    last.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_10s_mid_load_is_waited_out() {
    let pg = PrivatePostgres::start();
    let pool = PgPool::connect(&pg.url()).await.unwrap();
    let stream = unique("pgdown:");
    let corpus = corpus::mixed(30_000, 5, 1);
    // Small batches so the load is still in progress when PostgreSQL stops.
    let env = WorkerEnv::new(&stream, &pg.url()).set("FLEET_CONFIG", &config("batch_size = 100\n"));
    let mut worker = env.start("persister").await;
    let publisher = tokio::spawn(publish_in_chunks(
        redis_url(),
        stream.clone(),
        corpus.lines.clone(),
        2000,
        Duration::from_millis(100),
    ));
    wait_until(
        Duration::from_secs(60),
        "some rows before the outage",
        || {
            let pool = pool.clone();
            async move { rows(&pool).await > 1000 }
        },
    )
    .await;
    pool.close().await;
    pg.stop();
    let down_at = Instant::now();
    wait_until(Duration::from_secs(15), "/readyz to turn 503", || {
        let http = worker.http.clone();
        async move { http_get(&http, "/readyz").await.map(|(c, _)| c) == Some(503) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down_at.elapsed())).await;
    pg.start_again();
    publisher.await.unwrap();
    let pool = PgPool::connect(&pg.url()).await.unwrap();
    let mut conn = redis().await;
    wait_settled(&conn, &stream, GROUP).await;
    worker.wait_ready().await;
    conclude(
        "postgres stopped 10 s mid-load",
        &mut conn,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    // One line per change of state, not one per retry.
    let log = worker.log_text();
    let down_lines = log
        .lines()
        .filter(|l| l.contains("unreachable: retrying"))
        .count();
    assert!(
        (1..=3).contains(&down_lines),
        "{down_lines} outage lines:\n{log}"
    );
    assert!(worker.metric("fleet_handler_errors_total", "").await > 0.0);
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_load_with_aof_loses_and_doubles_nothing() {
    let mut server = PrivateRedis::start();
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("redisrestart:");
    let corpus = corpus::mixed(30_000, 5, 1);
    let (first, second) = corpus.lines.split_at(15_000);
    publish_lines_to(&server.url(), &stream, first).await;
    let env = WorkerEnv::new(&stream, &db)
        .set("FLEET_REDIS_URL", &server.url())
        .set("FLEET_CONFIG", &config("batch_size = 100\n"));
    let mut worker = env.start("persister").await;
    wait_until(
        Duration::from_secs(60),
        "some rows before the restart",
        || {
            let pool = pool.clone();
            async move { rows(&pool).await > 500 }
        },
    )
    .await;
    server.restart();
    publish_lines_to(&server.url(), &stream, second).await;
    let mut conn = redis_at(&server.url()).await;
    wait_settled(&conn, &stream, GROUP).await;
    conclude(
        "redis-server restarted mid-load (AOF)",
        &mut conn,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    assert!(
        worker.metric("fleet_reconnects_total", "redis").await >= 1.0,
        "reconnected after the restart"
    );
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumers_pending_entries_are_reclaimed_and_it_is_removed_once_empty() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("reclaim:");
    let corpus = corpus::mixed(3000, 5, 1);
    publish_lines(&stream, &corpus.lines).await;
    let mut conn = redis().await;
    // The consumer that died: it read 800 entries and never acknowledged them.
    abandon_entries(&mut conn, &stream, GROUP, "dead", 800).await;

    let env = WorkerEnv::new(&stream, &db)
        .set("FLEET_CONSUMER", "alive")
        .set("FLEET_CONFIG", &config("handler_timeout_ms = 500\nclaim_idle_ms = 1000\nclaim_interval_ms = 200\nconsumer_idle_ms = 3000\nlag_interval_ms = 300\n"));
    let mut worker = env.start("persister").await;
    wait_settled(&conn, &stream, GROUP).await;
    conclude(
        "consumer killed owning 800 pending entries",
        &mut conn,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    assert!(worker.metric("fleet_events_reclaimed_total", "").await >= 800.0);
    // Once it owns nothing and has been idle long enough, the dead consumer is removed.
    wait_until(
        Duration::from_secs(30),
        "the dead consumer to be deleted",
        || {
            let mut conn = conn.clone();
            let stream = stream.clone();
            async move {
                let consumers: Vec<std::collections::HashMap<String, redis::Value>> =
                    redis::cmd("XINFO")
                        .arg("CONSUMERS")
                        .arg(&stream)
                        .arg(GROUP)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                consumers.len() == 1
            }
        },
    )
    .await;
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_reaches_the_dlq_after_max_deliveries_without_holding_up_the_rest() {
    let db = fresh_database().await;
    let pool = migrated_database(&db).await;
    // The sink fails on this one event every time, with an error that looks transient.
    install_poison_trigger(&pool).await;
    let stream = unique("poison:");
    let mut corpus = corpus::mixed(2000, 0, 0);
    let poison = uuid::Uuid::now_v7();
    let rejected = uuid::Uuid::now_v7();
    let event = |id: uuid::Uuid, data: serde_json::Value| {
        serde_json::json!({"v": 1, "id": id.to_string(), "type": "user.updated", "channel": "user.1",
            "source": "tests", "time": "2026-11-24T10:00:00Z", "data": data, "correlation_id": "req-x"}).to_string()
    };
    corpus
        .lines
        .insert(700, event(poison, serde_json::json!({"poison": true})));
    corpus
        .expected
        .insert(700, corpus::Expect::Dead("max_deliveries"));
    // PostgreSQL rejects \u0000 in jsonb: a permanent error for that event alone.
    corpus.lines.insert(
        1200,
        event(rejected, serde_json::json!({"text": "nul \u{0} byte"})),
    );
    corpus
        .expected
        .insert(1200, corpus::Expect::Dead("handler_error"));
    publish_lines(&stream, &corpus.lines).await;

    let env = WorkerEnv::new(&stream, &db).set("FLEET_SKIP_MIGRATIONS", "true").set(
        "FLEET_CONFIG",
        &config("max_deliveries = 3\nhandler_timeout_ms = 1000\nclaim_idle_ms = 1500\nclaim_interval_ms = 200\n"),
    );
    let mut worker = env.start("persister").await;
    let mut conn = redis().await;
    wait_settled(&conn, &stream, GROUP).await;
    let o = conclude(
        "poison event (fails every time)",
        &mut conn,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    assert_eq!(o.dead_lettered, 2);

    let dead = read_stream(&mut conn, &format!("{stream}:dlq")).await;
    let find = |id: uuid::Uuid| {
        dead.iter()
            .find(|(_, f)| f["id"] == id.to_string())
            .unwrap()
            .1
            .clone()
    };
    let p = find(poison);
    assert_eq!(p["dlq_reason"], "max_deliveries");
    assert!(p["dlq_deliveries"].parse::<u64>().unwrap() > 3);
    assert_eq!(find(rejected)["dlq_reason"], "handler_error");
    // Not held up: every other event was committed before the poison event was given up on.
    let last_commit: time::OffsetDateTime =
        sqlx::query_scalar("SELECT max(persisted_at) FROM events")
            .fetch_one(&pool)
            .await
            .unwrap();
    let given_up =
        time::OffsetDateTime::parse(&p["dlq_at"], &time::format_description::well_known::Rfc3339)
            .unwrap();
    assert!(
        last_commit < given_up,
        "the rest committed at {last_commit}, poison given up at {given_up}"
    );
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_0_and_leaves_everything_acknowledged_or_pending() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("term:");
    let corpus = corpus::mixed(30_000, 5, 1);
    publish_lines(&stream, &corpus.lines).await;
    // Small batches: the stop must find the load half done however fast the machine is today.
    let env = WorkerEnv::new(&stream, &db)
        .set(
            "FLEET_CONFIG",
            &config(
                "batch_size = 100
",
            ),
        )
        .set("FLEET_SHUTDOWN_GRACE_MS", "5000");
    let mut worker = env.start("persister").await;
    // Stop on progress, not on a clock: a fast machine drains 30 000 events in under a second.
    let target = random_between(500, 5_000);
    let mut conn = redis().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while 30_000 - lag(&mut conn, &stream, GROUP).await.unwrap_or(30_000) < target {
        assert!(
            Instant::now() < deadline,
            "no progress:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    worker.signal("TERM").await;
    let asked = Instant::now();
    assert!(
        worker.wait(Duration::from_secs(10)).await.success(),
        "exit 0:\n{}",
        worker.log_text()
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "within the grace period"
    );

    // Everything delivered is either settled (row or dead letter) or still pending.
    let mid = measure(&mut conn, &pool, &stream, GROUP, &corpus).await;
    assert_eq!(mid.doubled, 0);
    let missing = acknowledged_but_missing(&mut conn, &pool, &stream, GROUP, &corpus).await;
    assert!(
        missing.is_empty(),
        "acknowledged without effect: {missing:?}"
    );
    let delivered = 30_000 - lag(&mut conn, &stream, GROUP).await.unwrap() as usize;
    assert!(
        delivered > 0 && delivered < 30_000,
        "stopped mid-load ({delivered} delivered)"
    );

    let mut again = env.start("persister").await;
    wait_settled(&conn, &stream, GROUP).await;
    conclude(
        "SIGTERM under load, then restart",
        &mut conn,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    again.stop_cleanly().await;
}
