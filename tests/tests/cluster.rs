//! The workers on a Redis Cluster (`scripts/services cluster`: three masters, three replicas),
//! given one node's URL: streams with a hash tag on every master, read by per-slot readers, every
//! other command sent to the master of its key. The persister lands every strict event once
//! through a kill -9; the projector keeps its state in its streams' slots (`{tag}`) and refuses a
//! route that could not; the notifier publishes every event, with `PUBLISH` (every node's
//! subscribers) and with `SPUBLISH` (sharded: the channel's node).

use std::collections::HashMap;
use std::time::Duration;

use redis::cluster_async::ClusterConnection;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use streamfleet_tests::corpus;
use streamfleet_tests::scenario::{conclude, config, wait_settled, GROUP};
use streamfleet_tests::*;

/// Streams named `<prefix>:{tag}`, one per master (the tag is the hash tag).
async fn streams_on_every_master(conn: &mut ClusterConnection, prefix: &str) -> Vec<String> {
    tags_per_master(conn)
        .await
        .into_iter()
        .map(|tag| format!("{prefix}:{{{tag}}}"))
        .collect()
}

/// A worker on the shared cluster, consuming `streams` (a glob or keys).
fn on_cluster(streams: &str, database_url: &str) -> WorkerEnv {
    WorkerEnv::new(streams, database_url).set("FLEET_REDIS_URL", &cluster_url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_persisters_on_a_cluster_land_every_strict_event_once_through_a_kill_9() {
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let mut conn = cluster().await;
    let prefix = unique("cl-persist");
    let streams = streams_on_every_master(&mut conn, &prefix).await;
    let corpora: Vec<corpus::Corpus> = streams.iter().map(|_| corpus::mixed(3_000, 5, 1)).collect();
    let env = on_cluster(&format!("{prefix}:*"), &db).set("FLEET_CONFIG", &config(""));
    let mut a = env
        .clone()
        .set("FLEET_CONSUMER", "a")
        .start("persister")
        .await;
    let mut b = env
        .clone()
        .set("FLEET_CONSUMER", "b")
        .start("persister")
        .await;
    let publishers: Vec<_> = streams
        .iter()
        .zip(&corpora)
        .map(|(stream, c)| {
            tokio::spawn(publish_in_chunks(
                cluster_url(),
                stream.clone(),
                c.lines.clone(),
                500,
                Duration::from_millis(100),
            ))
        })
        .collect();
    // kill -9 of one consumer mid-load; the other carries on, then it comes back.
    tokio::time::sleep(Duration::from_millis(random_between(300, 900))).await;
    a.signal("KILL").await;
    a.wait(Duration::from_secs(10)).await;
    for p in publishers {
        p.await.unwrap();
    }
    let mut a = env
        .clone()
        .set("FLEET_CONSUMER", "a")
        .start("persister")
        .await;
    for (stream, c) in streams.iter().zip(&corpora) {
        wait_settled(&conn, stream, GROUP).await;
        conclude(
            "cluster: 2 persisters, kill -9 of one, streams on 3 masters",
            &mut conn,
            &pool,
            stream,
            c,
        )
        .await;
    }
    a.stop_cleanly().await;
    b.stop_cleanly().await;
}

/// A projector on the shared cluster with routes `actions` on `flow.*.progress`.
fn projector_on_cluster(streams: &str, actions: &str) -> WorkerEnv {
    on_cluster(streams, "").unset("FLEET_DATABASE_URL").set(
        "FLEET_CONFIG",
        &config(&format!(
            "[[route]]\npattern = \"flow.*.progress\"\nactions = [{actions}]"
        )),
    )
}

fn flow_line(flow: &str, i: usize) -> String {
    json!({"v": 1, "id": Uuid::now_v7().to_string(), "type": "flow.progress",
        "channel": format!("flow.{flow}.progress"), "source": "tests",
        "time": "2026-12-07T12:00:00Z", "data": {"i": i}})
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_keeps_its_state_in_its_streams_slots_and_refuses_a_route_that_could_not() {
    let mut conn = cluster().await;
    let prefix = unique("cl-proj");
    let streams = streams_on_every_master(&mut conn, &prefix).await;
    // Keys `{tag}:<prefix>:…`: in their stream's slot, and this run's own.
    let actions = format!(
        r#"{{ latest = "{{tag}}:{prefix}:state:{{channel[1]}}" }}, {{ count = "{{tag}}:{prefix}:count:{{channel[1]}}" }}, {{ history = "{{tag}}:{prefix}:history:{{channel[1]}}", maxlen = 100000 }}, {{ latest = "{{tag}}:{prefix}:flows", field = "{{channel[1]}}", ttl_s = 600, group = "{{tag}}:{prefix}:group" }}"#
    );
    let mut worker = projector_on_cluster(&format!("{prefix}:*"), &actions)
        .start("projector")
        .await;
    let per_stream = 1_000;
    for stream in &streams {
        let lines: Vec<String> = (0..per_stream)
            .map(|i| flow_line(&format!("f{}", i % 7), i))
            .collect();
        publish_lines_to(&cluster_url(), stream, &lines).await;
    }
    for stream in &streams {
        wait_settled(&conn, stream, "projector").await;
    }
    for stream in &streams {
        let tag = &stream[stream.find('{').unwrap()..];
        let mut total = 0;
        for f in 0..7 {
            let count: i64 = redis::cmd("GET")
                .arg(format!("{tag}:{prefix}:count:f{f}"))
                .query_async(&mut conn)
                .await
                .unwrap();
            let history = read_stream(&mut conn, &format!("{tag}:{prefix}:history:f{f}")).await;
            assert_eq!(count as usize, history.len(), "{stream} f{f}");
            total += count;
            let state: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(format!("{tag}:{prefix}:state:f{f}"))
                .query_async(&mut conn)
                .await
                .unwrap();
            let event: serde_json::Value = serde_json::from_str(&state["event"]).unwrap();
            // The newest of flow f is the last i with i % 7 == f.
            let last = (0..per_stream).rev().find(|i| i % 7 == f).unwrap();
            assert_eq!(event["data"]["i"], last, "{stream} f{f}");
        }
        assert_eq!(
            total as usize, per_stream,
            "{stream}: every event counted once"
        );
        // One field per flow in one hash, registered in its group, all in the stream's slot.
        let flows: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(format!("{tag}:{prefix}:flows"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(flows.len(), 7, "{stream}");
        for (f, value) in &flows {
            let value: serde_json::Value = serde_json::from_str(value).unwrap();
            let f: usize = f[1..].parse().unwrap();
            let last = (0..per_stream).rev().find(|i| i % 7 == f).unwrap();
            assert_eq!(value["event"]["data"]["i"], last, "{stream} f{f}");
        }
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(format!("{tag}:{prefix}:group"))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(members, [format!("{tag}:{prefix}:flows")]);
    }
    worker.stop_cleanly().await;

    // A group's reset on a cluster: the script deletes keys it reads from the group (in its slot).
    let reset = config(&format!(
        "[[route]]\npattern = \"reset.#\"\nactions = [{{ invalidate_groups = [\"{{tag}}:{prefix}:group\"] }}]"
    ));
    let mut worker = on_cluster(&format!("{prefix}:*"), "")
        .unset("FLEET_DATABASE_URL")
        .set("FLEET_CONFIG", &reset)
        .start("projector")
        .await;
    let line = json!({"v": 1, "id": Uuid::now_v7().to_string(), "type": "reset",
        "channel": "reset.all", "source": "tests", "time": "2026-12-07T12:00:00Z", "data": {}})
    .to_string();
    for stream in &streams {
        publish_lines_to(&cluster_url(), stream, std::slice::from_ref(&line)).await;
    }
    for stream in &streams {
        wait_settled(&conn, stream, "projector").await;
        let tag = &stream[stream.find('{').unwrap()..];
        for key in [
            format!("{tag}:{prefix}:flows"),
            format!("{tag}:{prefix}:group"),
        ] {
            let exists: i64 = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(exists, 0, "{key}");
        }
    }
    worker.stop_cleanly().await;

    // A group is a key too: one without the stream's tag is refused at start.
    let (status, stderr) = projector_on_cluster(
        &format!("{prefix}:*"),
        r#"{ latest = "{tag}:s:{channel[1]}", group = "group:{channel[1]}" }"#,
    )
    .set("FLEET_HTTP_ADDR", &free_addr())
    .run_to_end("projector")
    .await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("template \"group:{channel[1]}\""),
        "{stderr}"
    );

    // A key without the stream's tag could land in any slot: refused at start, naming the route.
    let (status, stderr) = projector_on_cluster(
        &format!("{prefix}:*"),
        r#"{ count = "count:{channel[1]}" }"#,
    )
    .set("FLEET_HTTP_ADDR", &free_addr())
    .run_to_end("projector")
    .await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.contains("route[0] (flow.*.progress).actions[0]") && last.contains("{tag}"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notifier_publishes_every_event_on_a_cluster_plain_and_sharded() {
    let mut conn = cluster().await;
    let prefix = unique("cl-noti");
    let streams = streams_on_every_master(&mut conn, &prefix).await;
    // PUBLISH reaches every node's subscribers: one subscriber on one node sees every message.
    let plain = subscriber_at(&cluster_url(), &format!("{prefix}:plain:*")).await;
    let sharded_channel = format!("{prefix}:sharded");
    let sharded = sharded_subscriber(&sharded_channel).await;
    let worker = on_cluster(&format!("{prefix}:*"), "")
        .unset("FLEET_DATABASE_URL")
        .set(
            "FLEET_CONFIG",
            &config(&format!(
                "[[route]]\npattern = \"flow.plain.*\"\npublish = \"{prefix}:plain:{{channel}}\"\n\
                 [[route]]\npattern = \"flow.sharded.*\"\npublish = \"{sharded_channel}\"\nsharded = true"
            )),
        );
    let mut worker = worker.start("notifier").await;
    let mut ids = Vec::new();
    for stream in &streams {
        let mut lines = Vec::new();
        for i in 0..200 {
            let flow = if i % 2 == 0 { "plain" } else { "sharded" };
            let line = flow_line(flow, i);
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            ids.push((flow, v["id"].as_str().unwrap().to_owned()));
            lines.push(line);
        }
        publish_lines_to(&cluster_url(), stream, &lines).await;
    }
    for stream in &streams {
        wait_settled(&conn, stream, "notifier").await;
    }
    let received = |r: &Received| -> std::collections::HashSet<String> {
        r.lock()
            .unwrap()
            .iter()
            .map(|(_, m)| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    wait_until(Duration::from_secs(30), "every message received", || {
        let (plain, sharded) = (received(&plain), received(&sharded));
        let all = ids.iter().all(|(flow, id)| {
            if *flow == "plain" {
                plain.contains(id)
            } else {
                sharded.contains(id)
            }
        });
        async move { all }
    })
    .await;
    worker.stop_cleanly().await;
}

/// A sharded subscriber (`SSUBSCRIBE`) of `channel` on the node that serves it.
async fn sharded_subscriber(channel: &str) -> Received {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let client = redis::cluster::ClusterClientBuilder::new(vec![cluster_url()])
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(tx)
        .build()
        .unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    conn.ssubscribe(channel).await.unwrap();
    let received = Received::default();
    let sink = received.clone();
    tokio::spawn(async move {
        let _keep = conn;
        while let Some(push) = rx.recv().await {
            if push.kind != redis::PushKind::SMessage {
                continue;
            }
            if let [redis::Value::BulkString(ch), redis::Value::BulkString(payload)] =
                &push.data[..]
            {
                sink.lock().unwrap().push((
                    String::from_utf8_lossy(ch).into_owned(),
                    serde_json::from_slice(payload).unwrap(),
                ));
            }
        }
    });
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_shards_by_key_and_a_keys_events_stay_in_order_in_one_stream() {
    let mut conn = cluster().await;
    let prefix = unique("cl-shards");
    let lines: Vec<String> = (0..300)
        .map(|i| flow_line(&format!("k{}", i % 10), i))
        .collect();
    let file = std::env::temp_dir().join(format!("{prefix}.jsonl"));
    std::fs::write(&file, lines.join("\n")).unwrap();
    let fleetctl = |args: &[&str]| {
        let out = std::process::Command::new(bin("fleetctl"))
            .env("FLEET_REDIS_URL", cluster_url())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    fleetctl(&[
        "publish",
        "--stream",
        &prefix,
        "--shards",
        "3",
        "--file",
        file.to_str().unwrap(),
    ]);
    let keys: Vec<String> = (0..10).map(|k| format!("flow.k{k}.progress")).collect();
    let mut args = vec![
        "--output", "json", "shards", "--stream", &prefix, "--count", "3",
    ];
    for k in &keys {
        args.extend(["--key", k.as_str()]);
    }
    let shards: serde_json::Value = serde_json::from_str(&fleetctl(&args)).unwrap();
    let streams: Vec<String> = shards["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream"].as_str().unwrap().to_owned())
        .collect();
    // The three shards are on three masters.
    let masters: std::collections::HashSet<String> = {
        let mut out = std::collections::HashSet::new();
        for s in &streams {
            let slot: i64 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(s)
                .query_async(&mut conn)
                .await
                .unwrap();
            out.insert((slot * 3 / 16384).to_string());
        }
        out
    };
    assert_eq!(masters.len(), 3, "{streams:?}");
    let mut seen = 0;
    for expected in shards["keys"].as_array().unwrap() {
        let (key, stream) = (
            expected["key"].as_str().unwrap(),
            expected["stream"].as_str().unwrap(),
        );
        for s in &streams {
            let order: Vec<u64> = read_stream(&mut conn, s)
                .await
                .into_iter()
                .filter(|(_, f)| f["channel"] == key)
                .map(|(_, f)| {
                    serde_json::from_str::<serde_json::Value>(&f["data"]).unwrap()["i"]
                        .as_u64()
                        .unwrap()
                })
                .collect();
            if s == stream {
                assert_eq!(order.len(), 30, "{key} in {s}");
                assert!(order.windows(2).all(|w| w[0] < w[1]), "{key}: {order:?}");
                seen += order.len();
            } else {
                assert!(order.is_empty(), "{key} also in {s}");
            }
        }
    }
    assert_eq!(seen, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_a_cluster_live_and_resumes_from_a_history_in_its_streams_slot() {
    let mut conn = cluster().await;
    let tag: String = unique("clgw")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_lowercase();
    let stream = format!("{{{tag}}}:events");
    // Keys under the stream's hash tag (a literal one: the gateway names keys from the topic).
    let cfg = config(&format!(
        "[[route]]\npattern = \"{tag}.*.progress\"\n\
         actions = [{{ latest = \"{{{{{tag}}}}}:state:{{channel[1]}}\" }}, {{ history = \"{{{{{tag}}}}}:hist:{{channel[1]}}\" }}]\n\
         gateway = {{ history = \"{{{{{tag}}}}}:hist:{{channel[1]}}\", latest = \"{{{{{tag}}}}}:state:{{channel[1]}}\" }}\n"
    ));
    let env = |name: &str| {
        on_cluster(&stream, "")
            .unset("FLEET_DATABASE_URL")
            .set("FLEET_CONFIG", &cfg)
            .set("FLEET_CONSUMER", name)
    };
    let mut projector = env("p").start("projector").await;
    let mut notifier = env("n").start("notifier").await;
    let mut gateway = env("g")
        .unset("FLEET_STREAMS")
        .set("FLEET_GATEWAY_ANONYMOUS_TOPICS", &format!("{tag}.#"))
        .set("FLEET_GATEWAY_REGISTRY_KEY", &format!("{{{tag}}}:gateways"))
        .start("gateway")
        .await;
    let topic = format!("{tag}.f1.progress");
    let line = |i: usize| {
        json!({"v": 1, "id": Uuid::now_v7().to_string(), "type": "flow.progress",
            "channel": topic, "source": "tests", "time": "2026-12-07T12:00:00Z", "data": {"i": i}})
        .to_string()
    };
    let numbers = |m: &[streamfleet_tests::sse::Message]| -> Vec<u64> {
        m.iter()
            .map(|m| m.json()["data"]["i"].as_u64().unwrap())
            .collect()
    };
    let path = format!("/events?topic={topic}");
    let mut client = streamfleet_tests::sse::connect(&gateway.http, &path, &[])
        .await
        .unwrap();
    assert_eq!(client.status, 200);
    publish_lines_to(
        &cluster_url(),
        &stream,
        &(0..10).map(line).collect::<Vec<_>>(),
    )
    .await;
    let wait = Duration::from_secs(20);
    assert_eq!(
        numbers(&client.take(10, wait).await),
        (0..10).collect::<Vec<_>>()
    );
    let last = client.last_event_id().to_owned();
    drop(client);
    publish_lines_to(
        &cluster_url(),
        &stream,
        &(10..20).map(line).collect::<Vec<_>>(),
    )
    .await;
    let history = format!("{{{tag}}}:hist:f1");
    wait_until(wait, "the history of 20", || {
        let (mut conn, history) = (conn.clone(), history.clone());
        async move {
            redis::cmd("XLEN")
                .arg(&history)
                .query_async::<u64>(&mut conn)
                .await
                .unwrap_or(0)
                == 20
        }
    })
    .await;
    let mut back =
        streamfleet_tests::sse::connect(&gateway.http, &path, &[("Last-Event-ID", &last)])
            .await
            .unwrap();
    assert_eq!(
        numbers(&back.take(10, wait).await),
        (10..20).collect::<Vec<_>>()
    );
    assert_eq!(gateway.metric("fleet_gateway_resumes_total", "").await, 1.0);
    let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    drop(back);
    gateway.stop_cleanly().await;
    notifier.stop_cleanly().await;
    projector.stop_cleanly().await;
}
