//! The projector never acknowledges an entry without its effect: what Redis would refuse (a
//! counter value `INCRBY` cannot parse or would overflow, a key of another type) is found before
//! the entry's `XACK`, the event is dead-lettered naming the key, and the rest of its batch is
//! applied exactly once. The counters' check is held against real `INCRBY` on generated values.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use redis::aio::MultiplexedConnection;
use serde_json::json;
use uuid::Uuid;

use streamfleet_tests::projector::*;
use streamfleet_tests::scenario::{config, wait_settled};
use streamfleet_tests::*;

/// Counter values Redis's `INCRBY` refuses, each as a key's value.
const REFUSED: &[&str] = &[
    "007",
    " 1",
    "1 ",
    "1e3",
    "+1",
    "-0",
    "00",
    "",
    "12a",
    "0x10",
    "1.0",
    "99999999999999999999",
    "9223372036854775808",
    "-9223372036854775809",
    "9223372036854775807",
];

async fn set(conn: &mut MultiplexedConnection, args: &[&str]) {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let _: redis::Value = cmd.query_async(conn).await.unwrap();
}

async fn dump(conn: &mut MultiplexedConnection, key: &str) -> Option<Vec<u8>> {
    redis::cmd("DUMP").arg(key).query_async(conn).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_values_incrby_refuses_dead_letter_their_events_and_the_rest_count_once() {
    let stream = unique("proj-refused:");
    let cfg = config(&format!(
        "[[route]]\npattern = \"flow.*.progress\"\nactions = [{{ count = \"{stream}:c:{{data.c}}\" }}, {{ history = \"{stream}:h:{{channel[1]}}\", maxlen = 100000 }}]"
    ));
    let mut conn = redis().await;
    let key = |name: &str| format!("{stream}:c:{name}");
    // Bad keys: values INCRBY refuses, and keys of every other type.
    let mut bad: Vec<String> = Vec::new();
    for (i, value) in REFUSED.iter().enumerate() {
        set(&mut conn, &["SET", &key(&format!("v{i}")), value]).await;
        bad.push(format!("v{i}"));
    }
    set(&mut conn, &["HSET", &key("hash"), "field", "1"]).await;
    set(&mut conn, &["RPUSH", &key("list"), "1"]).await;
    set(&mut conn, &["SADD", &key("set"), "1"]).await;
    set(&mut conn, &["ZADD", &key("zset"), "1", "1"]).await;
    set(&mut conn, &["XADD", &key("stream"), "*", "f", "1"]).await;
    bad.extend(["hash", "list", "set", "zset", "stream"].map(String::from));
    // Good keys: values INCRBY accepts, to the edges of its range.
    set(&mut conn, &["SET", &key("good"), "41"]).await;
    set(
        &mut conn,
        &["SET", &key("negative"), "-9223372036854775808"],
    )
    .await;
    set(&mut conn, &["SET", &key("zero"), "0"]).await;
    // One below the largest: its first event fits, its second would overflow.
    set(&mut conn, &["SET", &key("edge"), "9223372036854775806"]).await;
    let before: HashMap<String, Option<Vec<u8>>> = {
        let mut m = HashMap::new();
        for b in &bad {
            m.insert(b.clone(), dump(&mut conn, &key(b)).await);
        }
        m
    };

    // 1 000 events, most on good counters, every bad key hit twice among them.
    let goods = ["good", "negative", "zero", "fresh"];
    let mut lines = Vec::new();
    let mut refused_ids = HashSet::new();
    let mut good_ids = HashSet::new();
    let mut per_counter: HashMap<&str, i64> = HashMap::new();
    for i in 0..1000 {
        let id = Uuid::now_v7();
        let counter: String = if i % 25 == 7 && !bad.is_empty() {
            bad[(i / 25) % bad.len()].clone()
        } else if i == 500 || i == 900 {
            "edge".into()
        } else {
            goods[i % goods.len()].into()
        };
        let is_bad = bad.contains(&counter) || (counter == "edge" && i == 900);
        if is_bad {
            refused_ids.insert(id.to_string());
        } else {
            good_ids.insert(id.to_string());
            *per_counter
                .entry(
                    goods
                        .iter()
                        .find(|g| **g == counter)
                        .copied()
                        .unwrap_or("edge"),
                )
                .or_default() += 1;
        }
        lines.push(flow_event(
            id,
            "f",
            "2026-11-26T12:00:00Z",
            json!({ "c": counter, "i": i }),
        ));
    }
    assert!(
        bad.iter()
            .all(|b| lines.iter().any(|l| l.contains(&format!("\"c\":\"{b}\"")))),
        "every bad key is hit"
    );
    publish_lines(&stream, &lines).await;
    let mut worker = projector(&stream, &cfg).start("projector").await;
    wait_settled(&conn, &stream, GROUP).await;

    assert_eq!(
        get_int(&mut conn, &key("good")).await,
        41 + per_counter["good"]
    );
    assert_eq!(
        get_int(&mut conn, &key("negative")).await,
        i64::MIN + per_counter["negative"]
    );
    assert_eq!(get_int(&mut conn, &key("zero")).await, per_counter["zero"]);
    assert_eq!(
        get_int(&mut conn, &key("fresh")).await,
        per_counter["fresh"]
    );
    assert_eq!(get_int(&mut conn, &key("edge")).await, i64::MAX);
    for b in &bad {
        assert_eq!(
            dump(&mut conn, &key(b)).await,
            before[b],
            "{b} is left as it was"
        );
    }
    // Each refused event is a dead letter naming its key; the others are each in the history once.
    let dead = read_stream(&mut conn, &format!("{stream}:dlq")).await;
    let dead_ids: HashSet<String> = dead
        .iter()
        .map(|(_, f)| {
            assert_eq!(f["dlq_reason"], "handler_error", "{f:?}");
            let event: serde_json::Value = serde_json::from_str(&f["data"]).unwrap();
            let counter = event["c"].as_str().unwrap();
            assert!(
                f["dlq_error"].contains(&key(counter)),
                "the error names the key: {f:?}"
            );
            f["id"].clone()
        })
        .collect();
    assert_eq!(
        dead.len(),
        refused_ids.len(),
        "one dead letter per refused event"
    );
    assert_eq!(dead_ids, refused_ids);
    let history = history_ids(&mut conn, &format!("{stream}:h:f")).await;
    assert_eq!(history.len(), good_ids.len(), "each applied event once");
    assert_eq!(history.into_iter().collect::<HashSet<_>>(), good_ids);
    assert!(
        dead.iter()
            .any(|(_, f)| f["dlq_error"].contains("would overflow a 64-bit integer")),
        "{dead:?}"
    );
    assert!(
        dead.iter()
            .any(|(_, f)| f["dlq_error"].contains("'007', which INCRBY refuses")),
        "{dead:?}"
    );
    assert!(
        dead.iter()
            .any(|(_, f)| f["dlq_error"].contains(":c:hash holds a hash, not a counter (count)")),
        "{dead:?}"
    );
    assert_eq!(worker.readyz().await.0, 200);
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_stream_with_no_id_left_dead_letters_its_events_whole() {
    // `XADD *` fails on a stream whose last id is the largest possible one: the one write that can
    // still fail after an XACK. The entry is put back whole (its earlier appends deleted).
    let stream = unique("proj-exhausted:");
    let cfg = config(&format!(
        "[[route]]\npattern = \"flow.*.progress\"\nactions = [{{ count = \"{stream}:c\" }}, {{ history = \"{stream}:h:all\" }}, {{ history = \"{stream}:h:{{channel[1]}}\" }}]"
    ));
    let mut conn = redis().await;
    set(
        &mut conn,
        &[
            "XADD",
            &format!("{stream}:h:full"),
            "18446744073709551615-18446744073709551615",
            "f",
            "1",
        ],
    )
    .await;
    let lines: Vec<String> = ["a", "full", "b"]
        .iter()
        .map(|flow| flow_event(Uuid::now_v7(), flow, "2026-11-26T12:00:00Z", json!({})))
        .collect();
    publish_lines(&stream, &lines).await;
    let mut worker = projector(&stream, &cfg).start("projector").await;
    wait_settled(&conn, &stream, GROUP).await;
    assert_eq!(get_int(&mut conn, &format!("{stream}:c")).await, 2);
    assert_eq!(
        history_ids(&mut conn, &format!("{stream}:h:all"))
            .await
            .len(),
        2,
        "the refused event's first append was taken back"
    );
    let dead = read_stream(&mut conn, &format!("{stream}:dlq")).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].1["dlq_error"].contains(":h:full"), "{dead:?}");
    worker.stop_cleanly().await;
}

/// counter.lua's verdict for each (value, increment): whether `INCRBY` would take it.
fn lua_verdicts(conn: &mut redis::Connection, cases: &[(String, i64)]) -> Vec<bool> {
    let check = std::fs::read_to_string(repo_path("workers/projector/src/counter.lua")).unwrap();
    let driver = "local out = {}\nfor i = 1, #ARGV, 2 do\n  local r = headroom(ARGV[i])\n  out[#out + 1] = (r and r >= tonumber(ARGV[i + 1])) and 1 or 0\nend\nreturn out\n";
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(format!("{check}{driver}")).arg(0);
    for (v, add) in cases {
        cmd.arg(v).arg(add);
    }
    let out: Vec<i64> = cmd.query(conn).unwrap();
    out.into_iter().map(|v| v == 1).collect()
}

/// Real `INCRBY`'s verdict for each (value, increment).
fn incrby_verdicts(conn: &mut redis::Connection, key: &str, cases: &[(String, i64)]) -> Vec<bool> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for (v, add) in cases {
        pipe.cmd("SET").arg(key).arg(v).ignore();
        pipe.cmd("INCRBY").arg(key).arg(add);
    }
    pipe.cmd("DEL").arg(key).ignore();
    let out: Vec<redis::RedisResult<i64>> = pipe.query(conn).unwrap();
    out.into_iter().map(|r| r.is_ok()).collect()
}

/// Values around everything `string2ll` looks at: signs, leading zeros, spaces, other characters,
/// lengths up to 21, and the edges of a signed 64-bit integer.
fn counter_value() -> impl Strategy<Value = String> {
    let near = |edge: i128| (-3000i128..3000).prop_map(move |d| (edge + d).to_string());
    prop_oneof![
        "[-+ 0-9a-e.]{0,4}",
        "-?[0-9]{1,21}",
        "[0 +-]{0,2}[0-9]{1,19}[ ]?",
        any::<i64>().prop_map(|v| v.to_string()),
        near(i64::MAX as i128),
        near(i64::MIN as i128),
        near(0),
        near(i64::MAX as i128).prop_map(|v| format!("0{v}")),
    ]
}

/// A value and an increment: any value with any increment a call can make, and values just below
/// the largest with the increment that reaches it exactly or passes it by one.
fn case() -> impl Strategy<Value = (String, i64)> {
    prop_oneof![
        (counter_value(), 1i64..=3000),
        (1i64..=3000, 0i64..=1).prop_map(|(k, over)| ((i64::MAX - k).to_string(), k + over)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn counter_check_agrees_with_incrby(
        cases in prop::collection::vec(case(), 200)
    ) {
        let mut conn = redis::Client::open(redis_url()).unwrap().get_connection().unwrap();
        let key = unique("counter-check:");
        let lua = lua_verdicts(&mut conn, &cases);
        let real = incrby_verdicts(&mut conn, &key, &cases);
        for ((case, lua), real) in cases.iter().zip(lua).zip(real) {
            prop_assert_eq!(lua, real, "value {:?} + {}", case.0, case.1);
        }
    }
}
