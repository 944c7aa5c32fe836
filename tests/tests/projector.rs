//! The projector, black-box against a real redis-server: state that keeps the newest version
//! whatever the delivery order, effects applied once per event however often an entry is
//! delivered (replicas frozen mid-batch, kill -9, producer retries), dead letters for what a
//! template cannot name, and configuration errors at start.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde_json::json;
use uuid::Uuid;

use streamfleet_tests::projector::*;
use streamfleet_tests::scenario::{config, wait_checkpointed_in_redis, wait_settled};
use streamfleet_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_keeps_version_3_after_versions_3_1_2_by_time() {
    let stream = unique("latest-time:");
    let cfg = config(
        "[[route]]\npattern = \"flow.*.progress\"\nactions = [{ latest = \"{stream}:state:{channel[1]}\", version = \"time\" }]",
    );
    // Appended (and so delivered) in the order 3, 1, 2: the times say which is newest.
    let lines: Vec<String> = [(3, "12:00:03"), (1, "12:00:01"), (2, "12:00:02")]
        .iter()
        .map(|(step, t)| {
            flow_event(
                Uuid::now_v7(),
                "f1",
                &format!("2026-11-26T{t}Z"),
                json!({"step": step, "nested": {"a": [1, 2]}}),
            )
        })
        .collect();
    publish_lines(&stream, &lines).await;
    let mut worker = projector(&stream, &cfg).start("projector").await;
    let mut conn = redis().await;
    wait_settled(&conn, &stream, GROUP).await;
    let state = hgetall(&mut conn, &format!("{stream}:state:f1")).await;
    let event = event_of(&state);
    assert_eq!(event["data"]["step"], 3, "{state:?}");
    assert_eq!(event["data"]["nested"], json!({"a": [1, 2]}));
    assert_eq!(event["time"], "2026-11-26T12:00:03Z");
    assert_eq!(state["stream"], stream);
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_keeps_version_3_after_versions_3_1_2_by_entry_id() {
    let stream = unique("latest-id:");
    let cfg = config(
        "handler_timeout_ms = 1000\nclaim_idle_ms = 1500\nclaim_interval_ms = 200\n[[route]]\npattern = \"flow.*.progress\"\nactions = [{ latest = \"{stream}:state:{channel[1]}\" }]",
    );
    // Versions 1, 2, 3 in stream order; a consumer that died holds 1 and 2, so the projector
    // applies 3 first, then 1 and 2 once it reclaims them.
    let lines: Vec<String> = (1..=3)
        .map(|step| {
            flow_event(
                Uuid::now_v7(),
                "f1",
                "2026-11-26T12:00:00Z",
                json!({ "step": step }),
            )
        })
        .collect();
    publish_lines(&stream, &lines).await;
    let mut conn = redis().await;
    abandon_entries(&mut conn, &stream, GROUP, "crashed", 2).await;
    let mut worker = projector(&stream, &cfg).start("projector").await;
    wait_until(Duration::from_secs(30), "version 3 applied first", || {
        let (mut conn, key) = (conn.clone(), format!("{stream}:state:f1"));
        async move {
            let state = hgetall(&mut conn, &key).await;
            state.contains_key("event") && event_of(&state)["data"]["step"] == 3
        }
    })
    .await;
    wait_settled(&conn, &stream, GROUP).await;
    assert!(
        worker.metric("fleet_events_reclaimed_total", "").await >= 2.0,
        "versions 1 and 2 were reclaimed after 3 was applied"
    );
    let state = hgetall(&mut conn, &format!("{stream}:state:f1")).await;
    let last = read_stream(&mut conn, &stream).await.pop().unwrap().0;
    assert_eq!(event_of(&state)["data"]["step"], 3, "{state:?}");
    assert_eq!(state["entry_id"], last);
    worker.stop_cleanly().await;
}

/// Counters, history, latest and an invalidation per flow: the configuration of the delivery
/// tests. Every key starts with the stream's name (`{stream}`), so tests running at once on one
/// Redis keep apart.
fn effects_config(extra_tuning: &str) -> String {
    config(&format!(
        "{extra_tuning}\n[[route]]\npattern = \"flow.*.progress\"\nactions = [\
         {{ latest = \"{{stream}}:state:{{channel[1]}}\" }}, \
         {{ invalidate = [\"{{stream}}:cache:{{channel[1]}}\"] }}, \
         {{ count = \"{{stream}}:count:{{channel[1]}}\" }}, \
         {{ count = \"{{stream}}:count:all:{{minute}}\", ttl_s = 600 }}, \
         {{ history = \"{{stream}}:history:{{channel[1]}}\", maxlen = 100000 }}]"
    ))
}

/// `n` events over `flows` flows, with a producer retry (the same event again) every `retry_every`.
/// Returns the lines and the distinct event ids per flow.
fn load(
    n: usize,
    flows: usize,
    retry_every: usize,
) -> (Vec<String>, HashMap<String, HashSet<String>>) {
    let mut lines = Vec::with_capacity(n);
    let mut ids: HashMap<String, HashSet<String>> = HashMap::new();
    for i in 0..n {
        let flow = format!("f{}", i % flows);
        let id = Uuid::now_v7();
        let line = flow_event(id, &flow, "2026-11-26T12:00:00Z", json!({ "i": i }));
        if retry_every > 0 && i % retry_every == 0 {
            lines.push(line.clone());
        }
        lines.push(line);
        ids.entry(flow).or_default().insert(id.to_string());
    }
    (lines, ids)
}

/// Every counter equals the number of distinct events it counts; every history holds each of its
/// events once.
async fn assert_exactly_once(
    conn: &mut MultiplexedConnection,
    stream: &str,
    ids: &HashMap<String, HashSet<String>>,
) {
    let total: usize = ids.values().map(HashSet::len).sum();
    assert_eq!(
        get_int(conn, &format!("{stream}:count:all:2026-11-26T12:00")).await as usize,
        total,
        "the per-minute counter"
    );
    for (flow, expected) in ids {
        assert_eq!(
            get_int(conn, &format!("{stream}:count:{flow}")).await as usize,
            expected.len(),
            "count:{flow}"
        );
        let history = history_ids(conn, &format!("{stream}:history:{flow}")).await;
        let distinct: HashSet<String> = history.iter().cloned().collect();
        assert_eq!(
            distinct.len(),
            history.len(),
            "history:{flow} holds an event twice"
        );
        assert_eq!(&distinct, expected, "history:{flow}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_five_times_during_a_load_of_50000_applies_every_effect_once() {
    let stream = unique("proj-kill9:");
    // 50 000 events (and 1 % producer retries of them) over 50 flows.
    let (lines, ids) = load(50_000, 50, 100);
    let env = projector(&stream, &effects_config(""));
    let publisher = tokio::spawn(publish_in_chunks(
        redis_url(),
        stream.clone(),
        lines,
        2500,
        Duration::from_millis(150),
    ));
    let mut conn = redis().await;
    for round in 0..5 {
        let mut worker = env.start("projector").await;
        tokio::time::sleep(Duration::from_millis(random_between(150, 900))).await;
        worker.signal("KILL").await;
        worker.wait(Duration::from_secs(10)).await;
        eprintln!(
            "kill -9 round {round}: {} counted so far",
            get_int(&mut conn, &format!("{stream}:count:all:2026-11-26T12:00")).await
        );
    }
    publisher.await.unwrap();
    let mut last = env.start("projector").await;
    wait_settled(&conn, &stream, GROUP).await;
    assert_exactly_once(&mut conn, &stream, &ids).await;
    assert!(dead_letters(&mut conn, &stream).await.is_empty());
    last.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_then_killed_mid_load_applies_every_effect_once() {
    // A script's effects and its acknowledgements reach the AOF as one transaction: after a
    // clean restart, and after a SIGKILL of redis-server itself (`appendfsync always`), an entry
    // is either applied and acknowledged or neither.
    let mut server = streamfleet_tests::servers::PrivateRedis::start();
    let stream = unique("proj-restart:");
    // No producer retries and no dedup window: the acknowledgement in the script alone keeps it
    // exact.
    let (lines, ids) = load(30_000, 30, 0);
    let (first, rest) = lines.split_at(lines.len() / 3);
    let (second, third) = rest.split_at(rest.len() / 2);
    publish_lines_to(&server.url(), &stream, first).await;
    let mut worker = projector(&stream, &effects_config(
        "batch_size = 100\ndedup_window_s = 0\nhandler_timeout_ms = 2000\nclaim_idle_ms = 3000\nclaim_interval_ms = 500",
    ))
        .set("FLEET_REDIS_URL", &server.url())
        .start("projector")
        .await;
    // The server keeps its port across the restart and the crash.
    let (url, key) = (server.url(), format!("{stream}:count:all:2026-11-26T12:00"));
    let counted = |at_least: i64| {
        let (url, key) = (url.clone(), key.clone());
        async move { get_int(&mut redis_at(&url).await, &key).await >= at_least }
    };
    wait_until(
        Duration::from_secs(60),
        "effects before the restart",
        || counted(500),
    )
    .await;
    server.restart();
    publish_lines_to(&server.url(), &stream, second).await;
    wait_until(Duration::from_secs(60), "effects after the restart", || {
        counted(first.len() as i64 + 500)
    })
    .await;
    server.crash();
    publish_lines_to(&server.url(), &stream, third).await;
    let mut conn = redis_at(&server.url()).await;
    wait_settled(&conn, &stream, GROUP).await;
    assert_exactly_once(&mut conn, &stream, &ids).await;
    assert!(dead_letters(&mut conn, &stream).await.is_empty());
    assert!(
        worker.metric("fleet_reconnects_total", "redis").await >= 2.0,
        "reconnected after the restart and the crash"
    );
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_frozen_mid_batch_while_another_reclaims_its_entries_doubles_nothing() {
    let stream = unique("proj-frozen:");
    let (lines, ids) = load(30_000, 20, 0);
    // Entries idle for 1.5 s are reclaimed: a replica frozen longer loses its batch in flight to
    // the other, then, thawed, applies it: its script must find the entries settled.
    let env = projector(
        &stream,
        // No dedup window: the acknowledgement in the script alone must keep it exact.
        &effects_config("handler_timeout_ms = 1000\nclaim_idle_ms = 1500\nclaim_interval_ms = 200\nbatch_size = 200\ndedup_window_s = 0"),
    );
    let publisher = tokio::spawn(publish_in_chunks(
        redis_url(),
        stream.clone(),
        lines,
        1000,
        Duration::from_millis(100),
    ));
    let mut a = env
        .clone()
        .set("FLEET_CONSUMER", "a")
        .start("projector")
        .await;
    let mut b = env
        .clone()
        .set("FLEET_CONSUMER", "b")
        .start("projector")
        .await;
    let mut conn = redis().await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(random_between(300, 700))).await;
        a.signal("STOP").await;
        tokio::time::sleep(Duration::from_millis(3000)).await;
        a.signal("CONT").await;
    }
    publisher.await.unwrap();
    wait_settled(&conn, &stream, GROUP).await;
    assert_exactly_once(&mut conn, &stream, &ids).await;
    let settled_elsewhere = a
        .metric("fleet_events_deduplicated_total", "stage=\"sink\"")
        .await
        + b.metric("fleet_events_deduplicated_total", "stage=\"sink\"")
            .await;
    assert!(
        settled_elsewhere > 0.0,
        "no batch was found settled by the other replica: the test did not exercise a redelivery"
    );
    a.stop_cleanly().await;
    b.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_within_the_dedup_window_applies_nothing_again_and_without_it_counts_again() {
    for window in [300, 0] {
        let stream = unique("proj-replay:");
        let (lines, ids) = load(2_000, 4, 0);
        publish_lines(&stream, &lines).await;
        let cfg = effects_config(&format!("dedup_window_s = {window}"));
        let mut worker = projector(&stream, &cfg).start("projector").await;
        let mut conn = redis().await;
        wait_settled(&conn, &stream, GROUP).await;
        assert_exactly_once(&mut conn, &stream, &ids).await;
        let state = hgetall(&mut conn, &format!("{stream}:state:f1")).await;
        worker.stop_cleanly().await;
        // The group moved back to the start (what `fleetctl replay` does).
        move_group(&mut conn, &stream, GROUP, "0").await;
        let mut worker = projector(&stream, &cfg).start("projector").await;
        wait_settled(&conn, &stream, GROUP).await;
        assert_eq!(
            hgetall(&mut conn, &format!("{stream}:state:f1")).await,
            state,
            "latest never changes"
        );
        if window > 0 {
            assert_exactly_once(&mut conn, &stream, &ids).await;
        } else {
            // As documented: without the window, counters and history apply again.
            assert_eq!(
                get_int(&mut conn, &format!("{stream}:count:f1")).await,
                1_000
            );
            assert_eq!(
                history_ids(&mut conn, &format!("{stream}:history:f1"))
                    .await
                    .len(),
                1_000
            );
        }
        worker.stop_cleanly().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_by_glob_in_batches_of_3000_apply_every_effect_once_and_invalidate_caches() {
    // Two streams matched by one glob, each its own script call and checkpoint; batches beyond
    // the script's chunks of 1 000 (entries acknowledged with no effect, the dedup window's
    // lookups and adds); and `invalidate`, which deletes each flow's cache key.
    let prefix = unique("proj-glob:");
    let cfg = effects_config("batch_size = 3000\nmax_in_flight = 12000\nhandler_concurrency = 1");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&cfg)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"\n[[route]]\npattern = \"user.#\"\n"))
        .unwrap();
    let mut conn = redis().await;
    let mut expected = Vec::new();
    for name in ["a", "b"] {
        let stream = format!("{prefix}:{name}");
        let (flows, ids) = load(4_000, 40, 0);
        let mut lines = Vec::new();
        for (i, line) in flows.into_iter().enumerate() {
            lines.push(line);
            if i % 4 != 3 {
                lines.push(streamfleet_tests::corpus::valid_line(
                    Uuid::now_v7(),
                    true,
                    i,
                ));
            }
        }
        publish_lines(&stream, &lines).await;
        for flow in ids.keys() {
            let _: () = redis::cmd("SET")
                .arg(format!("{stream}:cache:{flow}"))
                .arg("stale")
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        expected.push((stream, ids));
    }
    let mut worker = projector(&format!("{prefix}:*"), &cfg)
        .start("projector")
        .await;
    for (stream, ids) in &expected {
        wait_settled(&conn, stream, GROUP).await;
        assert_exactly_once(&mut conn, stream, ids).await;
        wait_checkpointed_in_redis(&conn, stream, GROUP).await;
        for flow in ids.keys() {
            let cached: bool = redis::cmd("EXISTS")
                .arg(format!("{stream}:cache:{flow}"))
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(!cached, "{stream}:cache:{flow} invalidated");
        }
        // TTLs: a counter's (ttl_s = 600; a day by default) set when it is created, a history's
        // refreshed (a day, plus the refresh interval of an hour).
        let flow = ids.keys().next().unwrap();
        for (key, low, high) in [
            (format!("{stream}:count:all:2026-11-26T12:00"), 1, 600),
            (format!("{stream}:count:{flow}"), 86_000, 86_400),
            (format!("{stream}:history:{flow}"), 89_000, 90_000),
        ] {
            let ttl: i64 = redis::cmd("TTL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!((low..=high).contains(&ttl), "{key}: TTL {ttl}");
        }
        assert!(dead_letters(&mut conn, stream).await.is_empty());
    }
    assert_eq!(
        worker.metric("fleet_events_acknowledged_total", "").await,
        2.0 * 7_000.0,
        "every entry acknowledged once"
    );
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_created_again_resumes_from_the_checkpoint_in_redis() {
    let stream = unique("proj-checkpoint:");
    // No dedup window: only the checkpoint keeps settled entries from being applied again.
    let cfg = effects_config("dedup_window_s = 0");
    let (first, mut ids) = load(1_000, 4, 0);
    publish_lines(&stream, &first).await;
    let mut worker = projector(&stream, &cfg).start("projector").await;
    let mut conn = redis().await;
    wait_settled(&conn, &stream, GROUP).await;
    let last = read_stream(&mut conn, &stream).await.pop().unwrap().0;
    wait_checkpointed_in_redis(&conn, &stream, GROUP).await;
    worker.stop_cleanly().await;
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&stream)
        .arg(GROUP)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (more, more_ids) = load(100, 4, 0);
    publish_lines(&stream, &more).await;
    for (flow, set) in more_ids {
        ids.entry(flow).or_default().extend(set);
    }
    // The setup Job's way: `fleetctl groups create` (no PostgreSQL) reads the checkpoint in Redis.
    let (status, stderr) = projector(&stream, &cfg)
        .run_to_end_with_args("fleetctl", &["groups", "create", "--group", GROUP])
        .await;
    assert!(status.success(), "{stderr}");
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        groups[0]["last-delivered-id"],
        redis::Value::BulkString(last.clone().into_bytes()),
        "created at the checkpoint"
    );
    let mut worker = projector(&stream, &cfg).start("projector").await;
    wait_settled(&conn, &stream, GROUP).await;
    assert_exactly_once(&mut conn, &stream, &ids).await;
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_a_template_cannot_name_is_a_dead_letter_and_its_batch_is_applied() {
    let stream = unique("proj-missing:");
    let cfg = config(
        "[[route]]\npattern = \"flow.*.progress\"\nactions = [{ count = \"{stream}:by-user:{data.user}\" }, { history = \"{stream}:h:{channel[1]}\" }]",
    );
    let mut conn = redis().await;
    // A key of another type than its effect needs is refused too, before anything is written.
    let _: () = redis::cmd("SET")
        .arg(format!("{stream}:h:wrongtype"))
        .arg("a string")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut lines: Vec<String> = (0..20)
        .map(|i| {
            flow_event(
                Uuid::now_v7(),
                "f",
                "2026-11-26T12:00:00Z",
                json!({"user": "ana", "i": i}),
            )
        })
        .collect();
    lines.insert(
        7,
        flow_event(Uuid::now_v7(), "f", "2026-11-26T12:00:00Z", json!({"i": 7})),
    );
    lines.insert(
        9,
        flow_event(
            Uuid::now_v7(),
            "wrongtype",
            "2026-11-26T12:00:00Z",
            json!({"user": "bob"}),
        ),
    );
    publish_lines(&stream, &lines).await;
    let mut worker = projector(&stream, &cfg).start("projector").await;
    wait_settled(&conn, &stream, GROUP).await;
    assert_eq!(
        get_int(&mut conn, &format!("{stream}:by-user:ana")).await,
        20
    );
    assert_eq!(
        get_int(&mut conn, &format!("{stream}:by-user:bob")).await,
        0,
        "nothing of a refused event"
    );
    assert_eq!(
        history_ids(&mut conn, &format!("{stream}:h:f")).await.len(),
        20
    );
    let dead = dead_letters(&mut conn, &stream).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(
        dead.iter().all(|(reason, _)| reason == "handler_error"),
        "{dead:?}"
    );
    assert!(
        dead.iter()
            .any(|(_, e)| e.contains(":by-user:{data.user}") && e.contains("no data.user")),
        "{dead:?}"
    );
    assert!(
        dead.iter()
            .any(|(_, e)| e.contains(":h:wrongtype holds a string")),
        "{dead:?}"
    );
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_templates_exit_2_with_one_line_naming_the_route_and_template() {
    for (actions, expected) in [
        (
            r#"{ latest = "s:{channel[3]}" }"#,
            r#"route[0] (flow.*.progress).actions[0]: template "s:{channel[3]}": {channel[3]} is past the end"#,
        ),
        (r#"{ count = "c:{flow}" }"#, "unknown placeholder {flow}"),
        (r#"{ history = "h:{channel" }"#, "without its `}`"),
    ] {
        let cfg = config(&format!(
            "[[route]]\npattern = \"flow.*.progress\"\nactions = [{actions}]"
        ));
        let (status, stderr) = projector("s", &cfg).run_to_end("projector").await;
        assert_eq!(status.code(), Some(2), "{actions}: {stderr}");
        assert!(stderr.contains(expected), "{actions}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
    let (status, stderr) = projector("s", &config("")).run_to_end("projector").await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no route declares actions"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_past_max_deliveries_that_a_template_cannot_name_is_dead_lettered_not_lost() {
    let stream = unique("proj-suspect:");
    let cfg = config(
        "handler_timeout_ms = 1000\nclaim_idle_ms = 1500\nclaim_interval_ms = 200\n[[route]]\npattern = \"flow.*.progress\"\nactions = [{ count = \"{stream}:by-user:{data.user}\" }]",
    );
    let lines = vec![
        flow_event(Uuid::now_v7(), "f", "2026-11-26T12:00:00Z", json!({"i": 0})),
        flow_event(
            Uuid::now_v7(),
            "f",
            "2026-11-26T12:00:00Z",
            json!({"user": "ana"}),
        ),
    ];
    publish_lines(&stream, &lines).await;
    let mut conn = redis().await;
    // A consumer that died holding both, delivered often enough to be suspects.
    abandon_entries(&mut conn, &stream, GROUP, "crashed", 2).await;
    for (id, _) in read_stream(&mut conn, &stream).await {
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(&stream)
            .arg(GROUP)
            .arg("crashed")
            .arg(0)
            .arg(&id)
            .arg("RETRYCOUNT")
            .arg(9)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let mut worker = projector(&stream, &cfg).start("projector").await;
    wait_settled(&conn, &stream, GROUP).await;
    assert_eq!(
        get_int(&mut conn, &format!("{stream}:by-user:ana")).await,
        1
    );
    let dead = dead_letters(&mut conn, &stream).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].1.contains("no data.user"), "{dead:?}");
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_at_maxmemory_refuses_whole_batches_and_nothing_is_lost_or_doubled_once_freed() {
    let server = streamfleet_tests::servers::PrivateRedis::start();
    let stream = unique("proj-oom:");
    let (lines, ids) = load(2_000, 4, 0);
    publish_lines_to(&server.url(), &stream, &lines).await;
    let mut conn = redis_at(&server.url()).await;
    create_group(&mut conn, &stream, GROUP).await;
    let admin = conn.clone();
    let set = |k: &'static str, v: &'static str| {
        let mut conn = admin.clone();
        async move {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg(k)
                .arg(v)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    };
    set("maxmemory-policy", "noeviction").await;
    set("maxmemory", "1").await;
    let mut worker = projector(&stream, &effects_config(""))
        .set("FLEET_REDIS_URL", &server.url())
        .start_live("projector")
        .await;
    // The script is refused up front (`#!lua`, no allow-oom): nothing half-applied, the batch
    // waits, the worker says so.
    wait_until(Duration::from_secs(30), "/readyz 503", || {
        let w = &worker;
        async move { w.readyz().await.0 == 503 }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        get_int(&mut conn, &format!("{stream}:count:all:2026-11-26T12:00")).await,
        0
    );
    // Named as what it is: a fault (Redis answers, but refuses writes), not an unreachable sink.
    let (_, body) = worker.readyz().await;
    assert!(body.contains("redis_out_of_memory"), "{body}");
    assert_eq!(
        worker
            .metric("fleet_fault", "fault=\"redis_out_of_memory\"")
            .await,
        1.0
    );
    assert!(
        worker.log_text().contains("out of memory"),
        "{}",
        worker.log_text()
    );
    set("maxmemory", "0").await;
    wait_settled(&conn, &stream, GROUP).await;
    assert_exactly_once(&mut conn, &stream, &ids).await;
    worker.wait_ready().await;
    assert_eq!(
        worker
            .metric("fleet_fault", "fault=\"redis_out_of_memory\"")
            .await,
        0.0
    );
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_refused_a_command_of_the_script_stops_the_projector_at_start() {
    // A script refused a command half-way would keep what it did before, acknowledgements
    // included: the grant is checked before anything is read.
    let server = streamfleet_tests::servers::PrivateRedis::start();
    let mut conn = redis_at(&server.url()).await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("proj")
        .arg("on")
        .arg(">pw")
        .arg("~*")
        .arg("+@all")
        .arg("-incrby")
        .query_async(&mut conn)
        .await
        .unwrap();
    let url = server.url().replacen("redis://", "redis://proj:pw@", 1);
    let (status, stderr) = projector("s", &effects_config(""))
        .set("FLEET_REDIS_URL", &url)
        .set("FLEET_HTTP_ADDR", &free_addr())
        .run_to_end("projector")
        .await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("projector: error: FLEET_REDIS_URL: the user may not run INCRBY"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_by_time_keeps_the_newer_event_in_any_year_the_contract_accepts() {
    let stream = unique("latest-years:");
    let cfg = config(
        "[[route]]\npattern = \"flow.*.progress\"\nactions = [{ latest = \"{stream}:state:{channel[1]}\", version = \"time\" }]",
    );
    // Per flow, the newer event first, then the older one.
    let pairs = [
        ("f1600", "1600-01-01T00:00:00Z", "1500-01-01T00:00:00Z"),
        ("f9000", "9000-01-01T00:00:00Z", "5000-01-01T00:00:00Z"),
        ("f0001", "0001-01-02T00:00:00Z", "0001-01-01T00:00:00Z"),
        ("f0000", "0000-01-01T00:00:00Z", "0000-01-01T00:00:00+01:00"),
        ("f9999", "9999-12-31T23:59:59Z", "9999-12-31T23:59:58Z"),
        (
            "fnano",
            "2026-12-07T12:00:00.000000002Z",
            "2026-12-07T12:00:00.000000001Z",
        ),
    ];
    let mut lines = Vec::new();
    for (flow, newer, older) in pairs {
        for (label, time) in [("newer", newer), ("older", older)] {
            lines.push(flow_event(
                Uuid::now_v7(),
                flow,
                time,
                json!({ "is": label }),
            ));
        }
    }
    publish_lines(&stream, &lines).await;
    let mut worker = projector(&stream, &cfg).start("projector").await;
    let mut conn = redis().await;
    wait_settled(&conn, &stream, GROUP).await;
    for (flow, newer, _) in pairs {
        let state = hgetall(&mut conn, &format!("{stream}:state:{flow}")).await;
        let event = event_of(&state);
        assert_eq!(event["data"]["is"], "newer", "{flow}: {state:?}");
        assert_eq!(event["time"], newer);
    }
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_version_mode_lets_the_next_event_replace_the_state_then_orders_by_the_new_mode()
{
    let stream = unique("latest-mode:");
    let route = |mode: &str| {
        config(&format!(
            "[[route]]\npattern = \"flow.*.progress\"\nactions = [{{ latest = \"{{stream}}:state:{{channel[1]}}\", version = \"{mode}\" }}]"
        ))
    };
    let mut conn = redis().await;
    let state = |conn: &MultiplexedConnection, flow: &str| {
        let (mut conn, key) = (conn.clone(), format!("{stream}:state:{flow}"));
        async move { event_of(&hgetall(&mut conn, &key).await)["data"]["step"].clone() }
    };
    let publish = |steps: &[(i64, &str)]| {
        let lines: Vec<String> = steps
            .iter()
            .map(|(step, time)| flow_event(Uuid::now_v7(), "f", time, json!({ "step": step })))
            .collect();
        let stream = stream.clone();
        async move { publish_lines(&stream, &lines).await }
    };
    // By time: step 1 has the latest time.
    publish(&[(1, "2030-01-01T00:00:00Z")]).await;
    let mut worker = projector(&stream, &route("time")).start("projector").await;
    wait_settled(&conn, &stream, GROUP).await;
    worker.stop_cleanly().await;
    // The route now orders by entry id: the next event wins although its time is older, and
    // the mode then orders (a later entry wins whatever its time).
    publish(&[(2, "2020-01-01T00:00:00Z")]).await;
    let mut worker = projector(&stream, &route("entry_id"))
        .start("projector")
        .await;
    wait_settled(&conn, &stream, GROUP).await;
    assert_eq!(
        state(&conn, "f").await,
        2,
        "the first event after the change"
    );
    publish(&[(3, "2010-01-01T00:00:00Z")]).await;
    wait_settled(&conn, &stream, GROUP).await;
    assert_eq!(state(&conn, "f").await, 3, "entry id order");
    worker.stop_cleanly().await;
    // And back to time: the next event wins, then time orders (an older time loses).
    publish(&[(4, "2001-01-01T00:00:00Z")]).await;
    let mut worker = projector(&stream, &route("time")).start("projector").await;
    wait_settled(&conn, &stream, GROUP).await;
    assert_eq!(
        state(&conn, "f").await,
        4,
        "the first event after the change back"
    );
    publish(&[(5, "2000-01-01T00:00:00Z"), (6, "2002-01-01T00:00:00Z")]).await;
    wait_settled(&conn, &stream, GROUP).await;
    assert_eq!(state(&conn, "f").await, 6, "time order: 5 is older than 4");
    // A release before this one wrote time versions in another format (61 bytes): not
    // comparable either, so replaced by the next event.
    let old_format = format!("t{:020}{:020}{:020}", 1u128 << 64, 0, 0);
    assert_eq!(old_format.len(), 61);
    let _: () = redis::cmd("HSET")
        .arg(format!("{stream}:state:f"))
        .arg("version")
        .arg(&old_format)
        .query_async(&mut conn)
        .await
        .unwrap();
    publish(&[(7, "2001-06-01T00:00:00Z")]).await;
    wait_settled(&conn, &stream, GROUP).await;
    assert_eq!(
        state(&conn, "f").await,
        7,
        "an old-format version is replaced"
    );
    worker.stop_cleanly().await;
}
