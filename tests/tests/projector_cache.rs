//! The projector as a flow-state cache (`latest`'s `ttl_s`, `ttl_by`/`ttl_s_for`, `field`,
//! `fields` and `group`, and `invalidate_groups`), against a real redis-server: TTLs by status,
//! one field per agent out of order, projections, groups deleted together, each exact through
//! redeliveries, replays and a kill -9, and refused before the acknowledgement when Redis would
//! refuse the write.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use streamfleet_tests::projector::*;
use streamfleet_tests::scenario::{config, wait_settled};
use streamfleet_tests::*;

async fn ttl(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("TTL").arg(key).query_async(conn).await.unwrap()
}

async fn pttl(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(conn).await.unwrap()
}

async fn exists(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(conn)
        .await
        .unwrap()
        == 1
}

async fn group_members(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<String> {
    let mut members: Vec<String> = redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap();
    members.sort();
    members
}

/// A `<kind>.<flow>.progress` event at `time` (seconds past 12:00) with `data`.
fn event(kind: &str, flow: &str, second: u32, data: Value) -> String {
    json!({"v": 1, "id": Uuid::now_v7().to_string(), "type": format!("{kind}.progress"),
        "channel": format!("{kind}.{flow}.progress"), "source": "tests",
        "time": format!("2026-11-26T12:{:02}:{:02}Z", second / 60, second % 60), "data": data})
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_flow_expires_by_its_status_and_a_running_one_is_kept() {
    let stream = unique("cache-ttl:");
    let cfg = config(
        r#"[[route]]
pattern = "flow.*.progress"
actions = [{ latest = "{stream}:state:{channel[1]}", version = "time", ttl_s = 3600,
  ttl_by = "{data.status}", ttl_s_for = { completed = 5, archived = 0 } }]"#,
    );
    let lines = vec![
        // done: running, then completed: 5 s.
        event("flow", "done", 1, json!({"status": "running"})),
        event("flow", "done", 2, json!({"status": "completed"})),
        // late: completed, then an older running arrives after it: no newer version, no refresh.
        event("flow", "late", 5, json!({"status": "completed"})),
        event("flow", "late", 4, json!({"status": "running"})),
        // running; a status no rule names; no status at all: the default, an hour.
        event("flow", "run", 1, json!({"status": "running"})),
        event("flow", "odd", 1, json!({"status": "paused"})),
        event("flow", "bare", 1, json!({"step": 1})),
        // archived (0: no TTL) after a completed one: the TTL is removed.
        event("flow", "arch", 1, json!({"status": "completed"})),
        event("flow", "arch", 2, json!({"status": "archived"})),
    ];
    publish_lines(&stream, &lines).await;
    let mut worker = projector(&stream, &cfg).start("projector").await;
    let mut conn = redis().await;
    wait_settled(&conn, &stream, GROUP).await;
    let key = |flow: &str| format!("{stream}:state:{flow}");
    for flow in ["done", "late"] {
        let t = ttl(&mut conn, &key(flow)).await;
        assert!((1..=5).contains(&t), "{flow}: TTL {t}");
        let state = hgetall(&mut conn, &key(flow)).await;
        assert_eq!(event_of(&state)["data"]["status"], "completed", "{flow}");
    }
    for flow in ["run", "odd", "bare"] {
        let t = ttl(&mut conn, &key(flow)).await;
        assert!((3590..=3600).contains(&t), "{flow}: TTL {t}");
    }
    assert_eq!(ttl(&mut conn, &key("arch")).await, -1, "archived: no TTL");
    // The finished flows expire; the others stay.
    wait_until(
        Duration::from_secs(15),
        "the finished flows expired",
        || {
            let (mut conn, done, late) = (conn.clone(), key("done"), key("late"));
            async move { !exists(&mut conn, &done).await && !exists(&mut conn, &late).await }
        },
    )
    .await;
    for flow in ["run", "odd", "bare", "arch"] {
        assert!(exists(&mut conn, &key(flow)).await, "{flow}");
    }
    // A flow that runs again after its state expired starts a new state, with its TTL.
    publish_lines(
        &stream,
        &[event("flow", "done", 3, json!({"status": "running"}))],
    )
    .await;
    wait_settled(&conn, &stream, GROUP).await;
    assert!(ttl(&mut conn, &key("done")).await > 3000);
    assert!(dead_letters(&mut conn, &stream).await.is_empty());
    worker.stop_cleanly().await;
}

/// A `tenant.<tenant>.reset` event with no data (what a group's reset is routed by).
fn reset(tenant: &str) -> String {
    control("tenant", tenant, "reset")
}

/// A `<kind>.<name>.<action>` event of type `<kind>.<action>` with no data.
fn control(kind: &str, name: &str, action: &str) -> String {
    json!({"v": 1, "id": Uuid::now_v7().to_string(), "type": format!("{kind}.{action}"),
        "channel": format!("{kind}.{name}.{action}"), "source": "tests",
        "time": "2026-11-26T12:00:00Z", "data": {}})
    .to_string()
}

/// Agents' steps (agent, step, second), in an order where later entries often carry older times.
fn agent_steps(agents: usize, steps: u32) -> Vec<(usize, u32, u32)> {
    let mut all: Vec<(usize, u32, u32)> = (0..agents)
        .flat_map(|a| (1..=steps).map(move |s| (a, s, s)))
        .collect();
    // A fixed shuffle: deterministic, and far from sorted.
    for i in 0..all.len() {
        let j = (i * 7919 + 13) % all.len();
        all.swap(i, j);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_field_per_agent_keeps_each_agents_newest_step_out_of_order_through_kill_9_and_a_replay(
) {
    let stream = unique("cache-agents:");
    // Small batches: most comparisons are against versions already in Redis, not within a call.
    let cfg = config(
        r#"batch_size = 7
[[route]]
pattern = "agent.*.progress"
actions = [
  { latest = "{stream}:agents:{channel[1]}", field = "{data.agent_id}", version = "time", ttl_s = 3600 },
  { latest = "{stream}:steps:{channel[1]}", field = "{data.agent_id}", version = "time", fields = ["step", "note"] },
]"#,
    );
    let (agents, steps) = (12, 40);
    let order = agent_steps(agents, steps);
    let lines: Vec<String> = order
        .iter()
        .map(|(a, s, second)| {
            let mut data = json!({"agent_id": format!("agent-{a}"), "step": s});
            if s % 2 == 0 {
                data["note"] = json!(format!("even {s}"));
            }
            event("agent", "f1", *second, data)
        })
        .collect();
    let env = projector(&stream, &cfg);
    let publisher = tokio::spawn(publish_in_chunks(
        redis_url(),
        stream.clone(),
        lines,
        40,
        Duration::from_millis(20),
    ));
    for _ in 0..3 {
        let mut worker = env.start("projector").await;
        tokio::time::sleep(Duration::from_millis(random_between(100, 400))).await;
        worker.signal("KILL").await;
        worker.wait(Duration::from_secs(10)).await;
    }
    publisher.await.unwrap();
    let mut worker = env.start("projector").await;
    let mut conn = redis().await;
    wait_settled(&conn, &stream, GROUP).await;

    let agents_key = format!("{stream}:agents:f1");
    let steps_key = format!("{stream}:steps:f1");
    let check = |all: HashMap<String, String>, projected: HashMap<String, String>| {
        assert_eq!(all.len(), agents, "one field per agent: {all:?}");
        assert_eq!(projected.len(), agents);
        for a in 0..agents {
            let name = format!("agent-{a}");
            let whole: Value = serde_json::from_str(&all[&name]).unwrap();
            assert_eq!(whole["event"]["data"]["step"], steps, "{name}: {whole}");
            assert_eq!(whole["stream"], stream);
            assert!(whole["version"].as_str().unwrap().starts_with('t'));
            assert!(whole["entry_id"].as_str().unwrap().contains('-'));
            // The version first (the script reads it from there), then the fields in order.
            let raw = &projected[&name];
            assert!(raw.starts_with(r#"{"_version":"t"#), "{raw}");
            assert!(
                raw.ends_with(&format!(r#","step":{steps},"note":"even {steps}"}}"#)),
                "{raw}"
            );
        }
    };
    let before = (
        hgetall(&mut conn, &agents_key).await,
        hgetall(&mut conn, &steps_key).await,
    );
    check(before.0.clone(), before.1.clone());
    assert!(ttl(&mut conn, &agents_key).await > 3500);
    assert_eq!(ttl(&mut conn, &steps_key).await, -1, "no ttl_s: none");
    // A step without a note after the newest one: its projection leaves the note out.
    publish_lines(
        &stream,
        &[event(
            "agent",
            "f1",
            100,
            json!({"agent_id": "agent-0", "step": 41}),
        )],
    )
    .await;
    wait_settled(&conn, &stream, GROUP).await;
    let part: Value =
        serde_json::from_str(&hgetall(&mut conn, &steps_key).await["agent-0"]).unwrap();
    assert_eq!(part.as_object().unwrap().len(), 2, "{part}");
    assert_eq!(part["step"], 41);
    // A replay of the whole stream writes nothing: no version is newer.
    worker.stop_cleanly().await;
    let after = (
        hgetall(&mut conn, &agents_key).await,
        hgetall(&mut conn, &steps_key).await,
    );
    move_group(&mut conn, &stream, GROUP, "0").await;
    let mut worker = env.start("projector").await;
    wait_settled(&conn, &stream, GROUP).await;
    assert_eq!(hgetall(&mut conn, &agents_key).await, after.0);
    assert_eq!(hgetall(&mut conn, &steps_key).await, after.1);
    assert!(dead_letters(&mut conn, &stream).await.is_empty());
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projections_keep_the_fields_a_reader_needs_and_metadata_apart() {
    let stream = unique("cache-proj:");
    let cfg = config(
        r#"[[route]]
pattern = "flow.*.progress"
actions = [
  { latest = "{stream}:state:{channel[1]}", fields = ["status", "progress", "detail"], ttl_s = 3600 },
  { latest = "{stream}:meta:{channel[1]}", fields = ["owner", "title", "detail.step"], ttl_s = 86400 },
]"#,
    );
    let first = event(
        "flow",
        "f1",
        1,
        json!({"status": "running", "progress": 40.50, "detail": {"step": [1, "two"]},
            "owner": "ana", "title": "Quarterly \"report\"", "blob": "x".repeat(2000)}),
    );
    // Written as a producer writes it (fleetctl re-serializes `data`): `40.50` stays `40.50`.
    let mut conn = redis().await;
    let mut xadd = redis::cmd("XADD");
    xadd.arg(&stream).arg("*");
    let parsed: serde_json::Map<String, Value> = serde_json::from_str(&first).unwrap();
    for (field, value) in parsed {
        let text = match value {
            Value::String(s) => s,
            Value::Object(_) => value.to_string().replace("40.5,", "40.50,"),
            other => other.to_string(),
        };
        xadd.arg(field).arg(text);
    }
    let _: String = xadd.query_async(&mut conn).await.unwrap();
    let mut worker = projector(&stream, &cfg).start("projector").await;
    wait_settled(&conn, &stream, GROUP).await;
    let state_key = format!("{stream}:state:f1");
    let meta_key = format!("{stream}:meta:f1");
    let state = hgetall(&mut conn, &state_key).await;
    let fields: BTreeMap<&str, &str> = state
        .iter()
        .filter(|(k, _)| *k != "_version")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    // Strings as their text, anything else as the producer's JSON, byte for byte.
    assert_eq!(
        fields,
        BTreeMap::from([
            ("status", "running"),
            ("progress", "40.50"),
            ("detail", r#"{"step":[1,"two"]}"#),
        ])
    );
    assert!(state["_version"].starts_with('e'));
    let meta = hgetall(&mut conn, &meta_key).await;
    assert_eq!(meta["owner"], "ana");
    assert_eq!(meta["title"], "Quarterly \"report\"");
    // A dotted name reaches into `data` as templates do.
    assert_eq!(meta["detail.step"], r#"[1,"two"]"#);
    assert_eq!(meta.len(), 4);
    assert!(ttl(&mut conn, &meta_key).await > 86_000);
    assert!(ttl(&mut conn, &state_key).await <= 3600);
    // What a projection saves: the 2 kB field the reader does not need is not stored.
    let usage = |key: String| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&key)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
        }
    };
    assert!(usage(state_key.clone()).await < 500);
    // A newer event without `detail`: the field is removed, not left stale.
    publish_lines(
        &stream,
        &[event(
            "flow",
            "f1",
            2,
            json!({"status": "completed", "progress": 100}),
        )],
    )
    .await;
    wait_settled(&conn, &stream, GROUP).await;
    let state = hgetall(&mut conn, &state_key).await;
    assert_eq!(state.len(), 3, "{state:?}");
    assert_eq!(state["status"], "completed");
    assert_eq!(state["progress"], "100");
    // The metadata projection lost its fields too: the event had neither.
    assert_eq!(hgetall(&mut conn, &meta_key).await.len(), 1);
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_keys_is_deleted_together_in_stream_order_and_forgets_expired_keys() {
    let stream = unique("cache-group:");
    // One lane: a group's reset is ordered with other keys' writes only within a lane.
    let cfg = config(
        r#"handler_concurrency = 1
[[route]]
pattern = "flow.*.progress"
actions = [{ latest = "{stream}:state:{channel[1]}", group = "{stream}:flows:{data.tenant}",
  ttl_s = 3600, ttl_by = "{data.status}", ttl_s_for = { completed = 1, pinned = 0 } }]
[[route]]
pattern = "tenant.*.reset"
actions = [{ invalidate_groups = ["{stream}:flows:{channel[1]}"] }]
[[route]]
pattern = "cache.*.drop"
actions = [{ invalidate = ["{stream}:state:{channel[1]}"] }]"#,
    );
    let drop = |flow: &str| control("cache", flow, "drop");
    let flow = |name: &str, tenant: &str, status: &str| {
        event("flow", name, 1, json!({"tenant": tenant, "status": status}))
    };
    // One batch, in stream order: a1..a50 and b1..b10 written, tenant a reset (a1..a50 deleted,
    // though written in this very call), then a-late written after the reset (kept); x written
    // then dropped (deleted); y dropped then written (kept).
    let mut lines: Vec<String> = (1..=50)
        .map(|i| flow(&format!("a{i}"), "a", "running"))
        .collect();
    lines.extend((1..=10).map(|i| flow(&format!("b{i}"), "b", "running")));
    lines.push(reset("a"));
    lines.push(flow("a-late", "a", "running"));
    lines.push(flow("x", "c", "running"));
    lines.push(drop("x"));
    lines.push(drop("y"));
    lines.push(flow("y", "c", "running"));
    publish_lines(&stream, &lines).await;
    let mut worker = projector(&stream, &cfg).start("projector").await;
    let mut conn = redis().await;
    wait_settled(&conn, &stream, GROUP).await;
    let key = |f: &str| format!("{stream}:state:{f}");
    let group = |t: &str| format!("{stream}:flows:{t}");
    for i in 1..=50 {
        assert!(!exists(&mut conn, &key(&format!("a{i}"))).await, "a{i}");
    }
    assert_eq!(group_members(&mut conn, &group("a")).await, [key("a-late")]);
    assert!(exists(&mut conn, &key("a-late")).await);
    assert_eq!(group_members(&mut conn, &group("b")).await.len(), 10);
    assert!(!exists(&mut conn, &key("x")).await, "written, then dropped");
    assert!(exists(&mut conn, &key("y")).await, "dropped, then written");
    // The group expires with its last key (an hour), and a key without a TTL keeps it.
    let (g, s) = (
        pttl(&mut conn, &group("b")).await,
        pttl(&mut conn, &key("b1")).await,
    );
    assert!(
        (g - s).abs() < 2000 && g > 3_500_000,
        "group {g} ms, key {s} ms"
    );
    // Tenant b's reset, now in its own call: every key of the group and the group are gone.
    publish_lines(&stream, &[reset("b")]).await;
    wait_settled(&conn, &stream, GROUP).await;
    for i in 1..=10 {
        assert!(!exists(&mut conn, &key(&format!("b{i}"))).await, "b{i}");
    }
    assert!(!exists(&mut conn, &group("b")).await);
    // Keys that expire leave the group as it is written: memory follows the live keys, not every
    // key the group ever had.
    let done: Vec<String> = (1..=300)
        .map(|i| flow(&format!("d{i}"), "d", "completed"))
        .collect();
    publish_lines(&stream, &done).await;
    wait_settled(&conn, &stream, GROUP).await;
    assert_eq!(group_members(&mut conn, &group("d")).await.len(), 300);
    assert!(
        pttl(&mut conn, &group("d")).await <= 1000,
        "expires with its keys"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    publish_lines(
        &stream,
        &[flow("d-new", "d", "running"), flow("d-pin", "d", "pinned")],
    )
    .await;
    wait_settled(&conn, &stream, GROUP).await;
    assert_eq!(
        group_members(&mut conn, &group("d")).await,
        [key("d-new"), key("d-pin")]
    );
    assert_eq!(
        pttl(&mut conn, &group("d")).await,
        -1,
        "a key without a TTL: none"
    );
    assert!(dead_letters(&mut conn, &stream).await.is_empty());
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_another_type_dead_letter_their_events_before_the_acknowledgement() {
    let stream = unique("cache-types:");
    let cfg = config(
        r#"[[route]]
pattern = "flow.*.progress"
actions = [{ latest = "{stream}:agents:{channel[1]}", field = "{data.agent}", group = "{stream}:g:{data.tenant}" }]
[[route]]
pattern = "tenant.*.reset"
actions = [{ invalidate_groups = ["{stream}:g:{channel[1]}"] }]"#,
    );
    let mut conn = redis().await;
    // A string where the agents' hash goes; a hash where a group goes.
    let _: () = redis::cmd("SET")
        .arg(format!("{stream}:agents:bad"))
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(format!("{stream}:g:hashed"))
        .arg("f")
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    let lines = vec![
        event("flow", "bad", 1, json!({"agent": "a", "tenant": "t"})),
        event("flow", "ok", 1, json!({"agent": "a", "tenant": "hashed"})),
        event("flow", "ok", 2, json!({"agent": "b", "tenant": "t"})),
        event("flow", "ok", 3, json!({"tenant": "t"})),
        reset("hashed"),
    ];
    publish_lines(&stream, &lines).await;
    let mut worker = projector(&stream, &cfg).start("projector").await;
    let letters = wait_for_dead_letters(&mut conn, &stream, 4).await;
    wait_settled(&conn, &stream, GROUP).await;
    let errors: Vec<&str> = letters.iter().map(|(_, e)| e.as_str()).collect();
    let has = |s: &str| errors.iter().any(|e| e.contains(s));
    assert!(
        has(&format!(
            "{stream}:agents:bad holds a string, not a hash (latest)"
        )),
        "{errors:?}"
    );
    assert!(
        has(&format!(
            "{stream}:g:hashed holds a hash, not a sorted set (latest group)"
        )),
        "{errors:?}"
    );
    assert!(
        has(&format!(
            "{stream}:g:hashed holds a hash, not a sorted set (invalidate_groups)"
        )),
        "{errors:?}"
    );
    assert!(has("the event has no data.agent"), "{errors:?}");
    // Nothing of the refused events was written; the rest of the batch was.
    let ok = hgetall(&mut conn, &format!("{stream}:agents:ok")).await;
    assert_eq!(ok.keys().collect::<Vec<_>>(), ["b"], "{ok:?}");
    assert_eq!(
        group_members(&mut conn, &format!("{stream}:g:t")).await,
        [format!("{stream}:agents:ok")]
    );
    assert_eq!(
        hgetall(&mut conn, &format!("{stream}:g:hashed")).await["f"],
        "v"
    );
    worker.stop_cleanly().await;
}

async fn wait_for_dead_letters(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    n: usize,
) -> Vec<(String, String)> {
    wait_until(Duration::from_secs(30), "dead letters", || {
        let mut conn = conn.clone();
        let stream = stream.to_owned();
        async move { dead_letters(&mut conn, &stream).await.len() >= n }
    })
    .await;
    dead_letters(conn, stream).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cache_settings_exit_2_with_one_line_naming_the_setting() {
    for (action, expected) in [
        (
            r#"{ latest = "s", ttl_by = "{data.status}" }"#,
            "actions[0].ttl_by needs ttl_s_for",
        ),
        (
            r#"{ latest = "s", ttl_s_for = { done = 5 } }"#,
            "actions[0].ttl_s_for needs ttl_by",
        ),
        (
            r#"{ latest = "s", ttl_by = "{data.status}", ttl_s_for = { done = 315360001 } }"#,
            "actions[0].ttl_s_for.done (315360001) must be at most",
        ),
        (
            r#"{ latest = "s", fields = [] }"#,
            "actions[0].fields names no field",
        ),
        (
            r#"{ latest = "s", fields = ["a", "_version"] }"#,
            "_version is where the projection keeps its version",
        ),
        (
            r#"{ latest = "s", fields = ["a", "a"] }"#,
            "names \"a\" twice",
        ),
        (
            r#"{ latest = "s", fields = ["a..b"] }"#,
            "empty field name (or path segment)",
        ),
        (
            r#"{ count = "c", group = "g" }"#,
            "actions[0].group does not apply to this action (only to latest)",
        ),
        (
            r#"{ invalidate_groups = [] }"#,
            "invalidate_groups names no key",
        ),
        (r#"{ latest = "s", field = "{data.x" }"#, "without its `}`"),
    ] {
        let cfg = config(&format!(
            "[[route]]\npattern = \"flow.*.progress\"\nactions = [{action}]"
        ));
        let (status, stderr) = projector("s", &cfg).run_to_end("projector").await;
        assert_eq!(status.code(), Some(2), "{action}: {stderr}");
        assert!(stderr.contains(expected), "{action}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_someone_else_filled_with_any_score_never_fails_the_call_after_its_acknowledgements(
) {
    let stream = unique("cache-foreign:");
    let cfg = config(
        r#"[[route]]
pattern = "flow.*.progress"
actions = [{ latest = "{stream}:state:{channel[1]}", ttl_s = 60, group = "{stream}:g:{data.tenant}" }]
[[route]]
pattern = "tenant.*.reset"
actions = [{ invalidate_groups = ["{stream}:g:{channel[1]}"] }]"#,
    );
    let mut conn = redis().await;
    // Sorted sets the projector did not write: a score past any expiry Redis takes, one with a
    // fraction, and a name that is no key of ours.
    for (tenant, score, member) in [
        ("huge", "1e300", "foreign"),
        ("frac", "4000000000000.5", "foreign"),
    ] {
        let _: () = redis::cmd("ZADD")
            .arg(format!("{stream}:g:{tenant}"))
            .arg(score)
            .arg(member)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let lines = vec![
        event("flow", "a", 1, json!({"tenant": "huge"})),
        event("flow", "b", 1, json!({"tenant": "frac"})),
    ];
    publish_lines(&stream, &lines).await;
    let mut worker = projector(&stream, &cfg).start("projector").await;
    wait_settled(&conn, &stream, GROUP).await;
    let key = |f: &str| format!("{stream}:state:{f}");
    assert_eq!(
        group_members(&mut conn, &format!("{stream}:g:huge")).await,
        [key("a"), "foreign".to_owned()]
    );
    // The group expires with its last entry, taken as an integer; one out of range is left alone.
    assert_eq!(pttl(&mut conn, &format!("{stream}:g:huge")).await, -1);
    let frac: i64 = redis::cmd("PEXPIRETIME")
        .arg(format!("{stream}:g:frac"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(frac, 4_000_000_000_000);
    // Its reset deletes what it can and the group, and the call goes on.
    publish_lines(
        &stream,
        &[
            reset("frac"),
            event("flow", "c", 2, json!({"tenant": "huge"})),
        ],
    )
    .await;
    wait_settled(&conn, &stream, GROUP).await;
    assert!(!exists(&mut conn, &key("b")).await);
    assert!(!exists(&mut conn, &format!("{stream}:g:frac")).await);
    assert!(exists(&mut conn, &key("c")).await);
    assert!(dead_letters(&mut conn, &stream).await.is_empty());
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_deleted_then_written_as_another_type_in_one_batch_applies_in_stream_order() {
    let stream = unique("cache-order:");
    // One lane, one batch: a key registered in the group, the group deleted as a plain key, then
    // counted under the group's name. In stream order the group is gone and the counter is 1;
    // registering the key after the deletion would make the INCRBY fail after the XACKs.
    let cfg = config(
        r#"handler_concurrency = 1
[[route]]
pattern = "flow.*.progress"
actions = [{ latest = "{stream}:state:{channel[1]}", group = "{stream}:{data.group}" }]
[[route]]
pattern = "cache.*.drop"
actions = [{ invalidate = ["{stream}:{channel[1]}"] }]
[[route]]
pattern = "tally.*.add"
actions = [{ count = "{stream}:{channel[1]}" }]"#,
    );
    // One key for the three: one part of one lane, so one script call (after the first read,
    // which takes one entry to learn their size: a warm-up event).
    let lines: Vec<String> = [
        event("flow", "warm-up", 0, json!({"group": "w"})),
        event("flow", "a", 1, json!({"group": "g"})),
        control("cache", "g", "drop"),
        control("tally", "g", "add"),
    ]
    .iter()
    .map(|line| {
        let mut e: Value = serde_json::from_str(line).unwrap();
        e["key"] = json!("one");
        e.to_string()
    })
    .collect();
    publish_lines(&stream, &lines).await;
    let mut worker = projector(&stream, &cfg).start("projector").await;
    let mut conn = redis().await;
    wait_settled(&conn, &stream, GROUP).await;
    assert_eq!(get_int(&mut conn, &format!("{stream}:g")).await, 1);
    assert!(exists(&mut conn, &format!("{stream}:state:a")).await);
    assert!(dead_letters(&mut conn, &stream).await.is_empty());
    worker.stop_cleanly().await;
}
