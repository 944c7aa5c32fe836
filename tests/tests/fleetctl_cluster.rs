//! fleetctl against the shared Redis Cluster (`scripts/services cluster`), given one node's URL
//! as an operator gives it: every command family end to end over streams whose hash tags put
//! them on all three masters, each figure checked against what Redis itself says on each stream.

use std::collections::{BTreeSet, HashMap};
use std::process::ExitStatus;
use std::time::Duration;

use redis::cluster_async::ClusterConnection;
use serde_json::{json, Value};
use uuid::Uuid;

use streamfleet_tests::fleetctl::{fleetctl_at, group_json, reject_trigger, user_line};
use streamfleet_tests::scenario::{
    config, migrated_database, rows, wait_checkpointed, wait_settled,
};
use streamfleet_tests::*;

/// `fleetctl <args> --output json` against one node of the cluster, which must succeed; its
/// stdout parsed as one JSON document.
async fn fleetctl_json(args: &[&str], database: Option<&str>) -> Value {
    let (status, doc, err) = fleetctl_json_status(args, database).await;
    assert!(status.success(), "{args:?}: {err}");
    doc
}

/// As [`fleetctl_json`], whatever the exit status.
async fn fleetctl_json_status(
    args: &[&str],
    database: Option<&str>,
) -> (ExitStatus, Value, String) {
    let args = [args, &["--output", "json"]].concat();
    let (status, out, err) = fleetctl_at(&cluster_url(), &args, database).await;
    let doc = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("{args:?}: stdout is not one JSON document ({e}): {out}{err}"));
    (status, doc, err)
}

/// One stream per master: `<prefix>:{tag}` with a tag on each master, so that one glob
/// (`<prefix>:*`) spans the whole cluster.
async fn streams_on_every_master(conn: &mut ClusterConnection, prefix: &str) -> Vec<String> {
    let streams: Vec<String> = tags_per_master(conn)
        .await
        .into_iter()
        .map(|tag| format!("{prefix}:{{{tag}}}"))
        .collect();
    assert_eq!(streams.len(), 3, "the test cluster has three masters");
    streams
}

async fn xlen(conn: &mut ClusterConnection, key: &str) -> u64 {
    redis::cmd("XLEN").arg(key).query_async(conn).await.unwrap()
}

/// The `XPENDING <stream> <group>` summary: the oldest pending id, and per consumer its count.
async fn xpending(
    conn: &mut ClusterConnection,
    stream: &str,
    group: &str,
) -> (Option<String>, HashMap<String, u64>) {
    type Summary = (
        u64,
        Option<String>,
        Option<String>,
        Option<Vec<(String, u64)>>,
    );
    let (_, oldest, _, consumers): Summary = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await
        .unwrap();
    (oldest, consumers.unwrap_or_default().into_iter().collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_groups_and_the_fleets_figures_cover_every_master_as_xinfo_says() {
    let mut conn = cluster().await;
    let prefix = unique("fc-look:");
    let streams = streams_on_every_master(&mut conn, &prefix).await;
    let glob = format!("{prefix}:*");

    // publish: a file of events onto each stream, and one event from flags.
    for (i, stream) in streams.iter().enumerate() {
        let lines: Vec<String> = (0..4 + i)
            .map(|n| corpus::valid_line(Uuid::now_v7(), n % 2 == 0, n))
            .collect();
        publish_lines_to(&cluster_url(), stream, &lines).await;
    }
    let one = fleetctl_json(
        &[
            "publish",
            "--stream",
            &streams[2],
            "--type",
            "user.created",
            "--channel",
            "user.7.profile",
        ],
        None,
    )
    .await;
    assert_eq!(one["published"], 1);
    let mut lengths = Vec::new();
    for stream in &streams {
        lengths.push(xlen(&mut conn, stream).await);
    }
    assert_eq!(lengths, [4, 5, 7]);

    // groups create: one command over the three masters, idempotent.
    let all = streams.join(",");
    for created in [true, false] {
        let doc = fleetctl_json(
            &["groups", "create", "--streams", &all, "--group", "g"],
            None,
        )
        .await;
        let each: Vec<&Value> = doc["streams"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| &s["created"])
            .collect();
        assert_eq!(each, [&json!(created); 3], "{doc}");
    }

    // Each stream: c1 is delivered 3 entries and acknowledges the first; c2 one more; the first
    // stream gets a dead letter, the second a checkpoint beside it.
    for stream in &streams {
        let delivered = deliver(&mut conn, stream, "g", "c1", 3).await;
        let _: u64 = redis::cmd("XACK")
            .arg(stream)
            .arg("g")
            .arg(&delivered[0])
            .query_async(&mut conn)
            .await
            .unwrap();
        deliver(&mut conn, stream, "g", "c2", 1).await;
    }
    let _: String = redis::cmd("XADD")
        .arg(format!("{}:dlq", streams[0]))
        .arg("*")
        .arg(&[("dlq_group", "g"), ("dlq_reason", "invalid")])
        .query_async(&mut conn)
        .await
        .unwrap();
    let checkpoint: String = read_stream(&mut conn, &streams[1]).await[0].0.clone();
    let _: u64 = redis::cmd("HSET")
        .arg(format!("{}:checkpoints", streams[1]))
        .arg("g")
        .arg(&checkpoint)
        .query_async(&mut conn)
        .await
        .unwrap();

    // lag, through several seeds of which the first is down: every stream of the glob, on
    // every master, with XINFO's lag and XPENDING's count and oldest entry.
    let seeds = format!("redis://127.0.0.1:1,{}", cluster_url());
    let (status, out, err) = fleetctl_at(
        &seeds,
        &["lag", "--streams", &glob, "--output", "json"],
        None,
    )
    .await;
    assert!(status.success(), "{err}");
    let lag_doc: Value = serde_json::from_str(&out).unwrap();
    let shown: Vec<&str> = lag_doc["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream"].as_str().unwrap())
        .collect();
    let mut sorted = streams.clone();
    sorted.sort();
    assert_eq!(shown, sorted, "every master's stream, sorted, no :dlq");
    let pending_doc = fleetctl_json(&["pending", "--streams", &glob], None).await;
    let status_doc = fleetctl_json(&["status", "--streams", &glob], None).await;
    for stream in &streams {
        let lag_now = lag(&mut conn, stream, "g").await;
        let pending_now = pending(&mut conn, stream, "g").await;
        let (oldest, per_consumer) = xpending(&mut conn, stream, "g").await;
        for doc in [&lag_doc, &status_doc] {
            let g = group_json(doc, stream, "g");
            assert_eq!(
                (g["lag"].as_u64(), g["pending"].as_u64()),
                (lag_now, Some(pending_now)),
                "{stream}"
            );
            assert_eq!(g["oldest_pending_id"].as_str(), oldest.as_deref());
        }
        assert_eq!(
            (lag_now, pending_now),
            (Some(xlen(&mut conn, stream).await - 4), 3)
        );
        let consumers: HashMap<String, u64> = group_json(&pending_doc, stream, "g")["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_owned(),
                    c["pending"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(consumers, per_consumer, "{stream}");
        let dead = &status_doc["streams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stream"] == stream.as_str())
            .unwrap()["dead_letters"];
        assert_eq!(
            dead["total"].as_u64(),
            Some(xlen(&mut conn, &format!("{stream}:dlq")).await)
        );
    }
    assert_eq!(
        status_doc["problems"].as_array().unwrap().len(),
        1,
        "the one dead letter: {status_doc}"
    );

    // checkpoints: the one in Redis beside the second stream, none elsewhere.
    let doc = fleetctl_json(&["checkpoints", "--streams", &glob], None).await;
    let by_stream: HashMap<&str, &Value> = doc["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["stream"].as_str().unwrap(), &c["redis"]))
        .collect();
    assert_eq!(
        by_stream,
        HashMap::from([
            (streams[0].as_str(), &Value::Null),
            (streams[1].as_str(), &json!(checkpoint)),
            (streams[2].as_str(), &Value::Null),
        ])
    );

    // tail from the first entry: every entry of the three masters, in the order written.
    let mut expected = BTreeSet::new();
    for stream in &streams {
        for (id, _) in read_stream(&mut conn, stream).await {
            expected.insert((stream.clone(), id));
        }
    }
    let tailed: Vec<(String, String)> = tail(glob.clone(), "-", 16)
        .await
        .into_iter()
        .map(|(stream, entry, _)| (stream, entry))
        .collect();
    assert_eq!(tailed.iter().cloned().collect::<BTreeSet<_>>(), expected);
    let mut sorted = tailed.clone();
    sorted.sort_by_key(|(_, id)| entry_id_key(id));
    assert_eq!(tailed, sorted, "in the order written");

    // tail from now on: what is published to each master afterwards.
    let follow = tokio::spawn(tail(glob.clone(), "$", 3));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut published = BTreeSet::new();
    for stream in streams.iter().rev() {
        let id = Uuid::now_v7();
        publish_lines_to(&cluster_url(), stream, &[corpus::valid_line(id, true, 1)]).await;
        published.insert((stream.clone(), id.to_string()));
    }
    let followed: BTreeSet<(String, String)> = follow
        .await
        .unwrap()
        .into_iter()
        .map(|(stream, _, event)| (stream, event))
        .collect();
    assert_eq!(followed, published);
}

/// `fleetctl tail --stream <stream> --from <from> --count <count> --output json` on the
/// cluster, which must succeed: per line its stream, entry id and event id.
async fn tail(stream: String, from: &str, count: u32) -> Vec<(String, String, String)> {
    let count = count.to_string();
    let (status, out, err) = fleetctl_at(
        &cluster_url(),
        &[
            "tail", "--stream", &stream, "--from", from, "--count", &count, "--output", "json",
        ],
        None,
    )
    .await;
    assert!(status.success(), "{err}");
    out.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let text = |name: &str| v[name].as_str().unwrap().to_owned();
            (text("stream"), text("entry_id"), text("id"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_replays_reconcile_and_trace_work_on_every_master_with_the_persister() {
    let db = fresh_database().await;
    let pool = migrated_database(&db).await;
    reject_trigger(&pool, true).await;
    let mut conn = cluster().await;
    let prefix = unique("fc-act:");
    let streams = streams_on_every_master(&mut conn, &prefix).await;
    // Per stream 12 strict events, every fourth rejected by PostgreSQL: 3 dead letters each.
    let mut events: HashMap<String, Vec<Uuid>> = HashMap::new();
    for stream in &streams {
        let ids: Vec<Uuid> = (0..12).map(|_| Uuid::now_v7()).collect();
        let lines: Vec<String> = ids
            .iter()
            .enumerate()
            .map(|(n, id)| user_line(*id, n, n % 4 == 0))
            .collect();
        publish_lines_to(&cluster_url(), stream, &lines).await;
        events.insert(stream.clone(), ids);
    }
    let persister_env = WorkerEnv::new(&streams.join(","), &db)
        .set("FLEET_REDIS_URL", &cluster_url())
        .set("FLEET_CONFIG", &config(""));
    let mut persister = persister_env.start("persister").await;
    for stream in &streams {
        wait_settled(&conn, stream, "persister").await;
    }
    assert_eq!(rows(&pool).await, 27);

    // dlq list and show, on each master.
    for stream in &streams {
        let listed = fleetctl_json(&["dlq", "list", "--stream", stream], None).await;
        let letters = listed["dead_letters"].as_array().unwrap();
        assert_eq!(
            letters.len() as u64,
            xlen(&mut conn, &format!("{stream}:dlq")).await
        );
        assert_eq!(letters.len(), 3, "{listed}");
        assert!(letters
            .iter()
            .all(|d| d["fields"]["dlq_group"] == "persister"
                && d["fields"]["dlq_reason"] == "handler_error"));
        let id = letters[0]["id"].as_str().unwrap();
        let shown = fleetctl_json(&["dlq", "show", "--stream", stream, id], None).await;
        assert_eq!(
            shown["fields"]["dlq_error"],
            letters[0]["fields"]["dlq_error"]
        );
    }

    // dlq redrive: the dead letters of every stream back, each applied once.
    reject_trigger(&pool, false).await;
    for stream in &streams {
        let redriven = fleetctl_json(
            &["dlq", "redrive", "--stream", stream, "--group", "persister"],
            None,
        )
        .await;
        assert_eq!(redriven["done"].as_array().unwrap().len(), 3, "{redriven}");
        assert_eq!(xlen(&mut conn, &format!("{stream}:dlq")).await, 0);
    }
    for stream in &streams {
        wait_settled(&conn, stream, "persister").await;
    }
    assert_eq!(rows(&pool).await, 36);
    // A stream without a hash tag has its :dlq in another slot: a redrive (one script over both)
    // is refused, not half done.
    let untagged = loop {
        let name = unique("fc-untagged:");
        let mut slots = Vec::new();
        for key in [name.clone(), format!("{name}:dlq")] {
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            slots.push(slot);
        }
        if slots[0] != slots[1] {
            break name;
        }
    };
    let _: String = redis::cmd("XADD")
        .arg(format!("{untagged}:dlq"))
        .arg("*")
        .arg(&[
            ("dlq_group", "persister"),
            ("dlq_stream", untagged.as_str()),
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    let (status, doc, err) =
        fleetctl_json_status(&["dlq", "redrive", "--stream", &untagged, "--all"], None).await;
    assert_eq!(status.code(), Some(1), "{doc}");
    assert!(err.contains("has no hash tag"), "{err}");
    assert_eq!(xlen(&mut conn, &format!("{untagged}:dlq")).await, 1);
    wait_checkpointed(&conn, &pool, &streams[1]).await;

    // trace: a redriven event, found at both its entries with its row.
    let traced = events[&streams[1]][4];
    let t = fleetctl_json(
        &[
            "trace",
            &traced.to_string(),
            "--streams",
            &streams.join(","),
        ],
        Some(&db),
    )
    .await;
    let entries = t["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "the original and the redriven entry: {t}");
    assert!(entries.iter().all(|e| e["stream"] == streams[1].as_str()));
    assert!(
        entries
            .iter()
            .all(|e| e["groups"][0]["state"]["state"] == "acknowledged"),
        "{t}"
    );
    assert_eq!(t["postgres"]["stream"], streams[1].as_str());

    // reconcile: every stream whole; then a row lost on the third master is named.
    for stream in &streams {
        let doc = fleetctl_json(&["reconcile", "--stream", stream], Some(&db)).await;
        assert_eq!(doc["missing_in_postgres"], json!([]), "{doc}");
    }
    let lost = events[&streams[2]][5];
    sqlx::query("DELETE FROM events WHERE event_id = $1")
        .bind(lost)
        .execute(&pool)
        .await
        .unwrap();
    let (status, doc, err) =
        fleetctl_json_status(&["reconcile", "--stream", &streams[2]], Some(&db)).await;
    assert_eq!(status.code(), Some(1), "{err}");
    let gaps = doc["missing_in_postgres"].as_array().unwrap();
    assert_eq!(gaps.len(), 1, "{doc}");
    assert_eq!(gaps[0]["event_id"], lost.to_string());
    persister.stop_cleanly().await;

    // replay --to-id on the first master's stream: the group back to its sixth entry (with
    // --force: the persister's consumer talked to Redis less than 10 s ago, so counts as active).
    let entries = read_stream(&mut conn, &streams[0]).await;
    let to = entries[5].0.clone();
    let plan = fleetctl_json(
        &[
            "replay",
            "--stream",
            &streams[0],
            "--group",
            "persister",
            "--to-id",
            &to,
            "--force",
        ],
        None,
    )
    .await;
    assert_eq!(
        plan["entries"].as_u64(),
        Some(entries.len() as u64 - 6),
        "{plan}"
    );
    let info: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&streams[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        redis::from_redis_value::<String>(info[0]["last-delivered-id"].clone()).unwrap(),
        to
    );
    assert_eq!(
        lag(&mut conn, &streams[0], "persister").await,
        Some(entries.len() as u64 - 6)
    );

    // replay --to-checkpoint on the second: PostgreSQL's checkpoint, the stream's last entry.
    let plan = fleetctl_json(
        &[
            "replay",
            "--stream",
            &streams[1],
            "--group",
            "persister",
            "--to-checkpoint",
            "--force",
        ],
        Some(&db),
    )
    .await;
    assert_eq!(
        (plan["entries"].as_u64(), &plan["to_what"]),
        (Some(0), &json!("its checkpoint (postgres)"))
    );

    // replay --from-postgres: the third master's stream lost, rebuilt from its rows, then whole
    // again for reconcile (matched by event id).
    let _: u64 = redis::cmd("DEL")
        .arg(&streams[2])
        .query_async(&mut conn)
        .await
        .unwrap();
    let rebuilt = fleetctl_json(
        &[
            "replay",
            "--from-postgres",
            "--stream",
            &streams[2],
            "--group",
            "persister",
        ],
        Some(&db),
    )
    .await;
    assert_eq!(rebuilt["events"], 11, "{rebuilt}");
    assert_eq!(xlen(&mut conn, &streams[2]).await, 11);
    assert_eq!(lag(&mut conn, &streams[2], "persister").await, Some(0));
    let doc = fleetctl_json(&["reconcile", "--stream", &streams[2]], Some(&db)).await;
    assert_eq!(
        (&doc["missing_in_postgres"], &doc["missing_in_stream"]),
        (&json!([]), &json!([])),
        "{doc}"
    );
}
