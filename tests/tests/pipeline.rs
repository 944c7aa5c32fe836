//! The pipeline's fleet semantics, black-box: order per key across handler lanes, and a checkpoint
//! that is a safe resume point (never ahead of an entry still pending), with one consumer and two.

use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use streamfleet_tests::corpus;
use streamfleet_tests::corpus::valid_line;
use streamfleet_tests::scenario::{
    checkpoint, conclude, config, install_poison_trigger, migrated_database, rows,
    wait_checkpointed, wait_settled, GROUP,
};
use streamfleet_tests::*;

/// A strict event whose ordering key is `key` (the channel, or a `key` field), with the key in
/// `data` so that a trigger can record it.
fn keyed_event(n: usize, channel: &str, key: Option<&str>) -> String {
    let order_key = key.unwrap_or(channel);
    let mut e = json!({"v": 1, "id": Uuid::now_v7().to_string(), "type": "user.updated",
        "channel": channel, "source": "tests", "time": "2026-11-26T10:00:00Z",
        "data": {"n": n, "order_key": order_key}});
    if let Some(k) = key {
        e["key"] = json!(k);
    }
    e.to_string()
}

/// Two events of one key out of order: (key, earlier entry, later entry) where the later entry's
/// row was inserted first.
async fn out_of_order(pool: &PgPool) -> Vec<(String, String, String)> {
    let applied: Vec<(String, String)> =
        sqlx::query_as("SELECT order_key, stream_id FROM applied ORDER BY seq")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut last: std::collections::HashMap<String, String> = Default::default();
    let mut wrong = Vec::new();
    for (key, id) in applied {
        if let Some(prev) = last.get(&key) {
            if entry_id_key(prev) > entry_id_key(&id) {
                wrong.push((key.clone(), id.clone(), prev.clone()));
            }
        }
        last.insert(key, id);
    }
    wrong
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_key_are_applied_in_stream_order_with_2_and_4_lanes() {
    for lanes in [2, 4] {
        let db = fresh_database().await;
        let pool = migrated_database(&db).await;
        // The order rows are inserted in, by ordering key.
        sqlx::raw_sql(
            "CREATE TABLE applied (seq bigserial PRIMARY KEY, order_key text, stream_id text);
             CREATE FUNCTION record() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
               INSERT INTO applied (order_key, stream_id) VALUES (NEW.data->>'order_key', NEW.stream_id);
               RETURN NEW; END $$;
             CREATE TRIGGER record AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION record();",
        )
        .execute(&pool)
        .await
        .unwrap();
        let stream = unique("ordered:");
        // 100 000 events over 1 000 channels; one in ten ordered by a `key` of its own instead.
        let lines: Vec<String> = (0..100_000)
            .map(|n| {
                let channel = format!("user.{}.profile", n % 1000);
                let key = (n % 10 == 0).then(|| format!("account-{}", n % 7));
                keyed_event(n, &channel, key.as_deref())
            })
            .collect();
        publish_lines(&stream, &lines).await;
        let mut worker = WorkerEnv::new(&stream, &db)
            .set("FLEET_SKIP_MIGRATIONS", "true")
            .set(
                "FLEET_CONFIG",
                &config(&format!("handler_concurrency = {lanes}\n")),
            )
            .start("persister")
            .await;
        let conn = redis().await;
        wait_settled(&conn, &stream, GROUP).await;
        worker.assert_running();
        assert_eq!(rows(&pool).await, 100_000);
        let wrong = out_of_order(&pool).await;
        assert!(
            wrong.is_empty(),
            "{lanes} lanes: {} pairs of one key applied out of stream order, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(3)]
        );
        worker.stop_cleanly().await;
    }
}

/// Whether entry `id` is pending in the group.
async fn is_pending(conn: &mut MultiplexedConnection, stream: &str, id: &str) -> bool {
    let entries: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(GROUP)
        .arg(id)
        .arg(id)
        .arg(1)
        .query_async(conn)
        .await
        .unwrap_or_default();
    !entries.is_empty()
}

/// 100 events, one that fails every time (held pending, redelivered until dead-lettered), then
/// 10 000 more, with `consumers` persisters in one group: while the failing one is pending, the
/// checkpoint never passes it and reaches the entry just below it; once it is dead-lettered, the
/// checkpoint reaches the last entry.
async fn checkpoint_stays_below_a_pending_entry(consumers: usize) {
    let db = fresh_database().await;
    let pool = migrated_database(&db).await;
    install_poison_trigger(&pool).await;
    let stream = unique("watermark:");
    let mut lines: Vec<String> = (0..100)
        .map(|n| valid_line(Uuid::now_v7(), true, n))
        .collect();
    lines.push(
        json!({"v": 1, "id": Uuid::now_v7().to_string(), "type": "user.updated", "channel": "user.7",
            "source": "tests", "time": "2026-11-26T10:00:00Z", "data": {"poison": 1}})
        .to_string(),
    );
    lines.extend((0..10_000).map(|n| valid_line(Uuid::now_v7(), true, n)));
    publish_lines(&stream, &lines).await;
    let mut conn = redis().await;
    let entries = read_stream(&mut conn, &stream).await;
    let (below, poison, last) = (
        entries[99].0.clone(),
        entries[100].0.clone(),
        entries.last().unwrap().0.clone(),
    );
    let mut workers = Vec::new();
    for c in 0..consumers {
        workers.push(
            WorkerEnv::new(&stream, &db)
                .set("FLEET_SKIP_MIGRATIONS", "true")
                .set("FLEET_CONSUMER", &format!("c{c}"))
                .set(
                    "FLEET_CONFIG",
                    &config("batch_size = 100\nmax_deliveries = 2\nhandler_timeout_ms = 1000\nclaim_idle_ms = 8000\nclaim_interval_ms = 200\n"),
                )
                .start("persister")
                .await,
        );
    }
    // Until the failing entry is dead-lettered: never ahead of it.
    let started = Instant::now();
    let mut reached_below = false;
    loop {
        for w in &mut workers {
            w.assert_running();
        }
        let position = checkpoint(&pool, &stream).await;
        let pending = is_pending(&mut conn, &stream, &poison).await;
        if !pending {
            break;
        }
        if let Some(p) = &position {
            assert!(
                entry_id_key(p) < entry_id_key(&poison),
                "checkpoint {p} is past entry {poison}, still pending"
            );
            reached_below |= *p == below;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "entry {poison} still pending after 90 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        reached_below,
        "the checkpoint never reached {below}, the entry below the pending one, while it was pending ({} rows)",
        rows(&pool).await
    );
    wait_settled(&conn, &stream, GROUP).await;
    assert_eq!(rows(&pool).await, 10_100);
    // Idle, the workers write the watermark that moved: the last entry.
    wait_until(
        Duration::from_secs(30),
        "checkpoint at the last entry",
        || {
            let (pool, stream, last) = (pool.clone(), stream.clone(), last.clone());
            async move { checkpoint(&pool, &stream).await == Some(last) }
        },
    )
    .await;
    for mut w in workers {
        w.stop_cleanly().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_never_passes_an_entry_held_pending() {
    checkpoint_stays_below_a_pending_entry(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_never_passes_an_entry_pending_under_another_consumer() {
    checkpoint_stays_below_a_pending_entry(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_flushed_from_redis_are_loaded_again() {
    // The pipeline calls its scripts by SHA; Redis forgets them on a restart or a SCRIPT FLUSH.
    let server = streamfleet_tests::servers::PrivateRedis::start();
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("flushed:");
    let mut corpus = corpus::mixed(1000, 0, 2);
    publish_lines_to(&server.url(), &stream, &corpus.lines).await;
    let mut worker = WorkerEnv::new(&stream, &db)
        .set("FLEET_REDIS_URL", &server.url())
        .set("FLEET_CONFIG", &config(""))
        .start("persister")
        .await;
    let mut conn = redis_at(&server.url()).await;
    wait_settled(&conn, &stream, GROUP).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let more = corpus::mixed(1000, 0, 2);
    publish_lines_to(&server.url(), &stream, &more.lines).await;
    corpus.lines.extend(more.lines);
    corpus.expected.extend(more.expected);
    wait_settled(&conn, &stream, GROUP).await;
    worker.assert_running();
    // Dead letters of the second load written, each once, and the checkpoint at the last entry.
    conclude(
        "scripts flushed, then loaded again",
        &mut conn,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    wait_checkpointed(&conn, &pool, &stream).await;
    worker.stop_cleanly().await;
}
