//! The notifier, black-box with real subscribers: every routed event published on Redis Pub/Sub
//! as its v1 JSON with `stream` and `entry_id`, in stream order per key, at least once through
//! kill -9 (a duplicate carries the same `entry_id`).

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use streamfleet_tests::scenario::{config, wait_settled};
use streamfleet_tests::*;

const GROUP: &str = "notifier";

/// A subscriber of `pattern` on the test Redis.
async fn subscriber(pattern: &str) -> Received {
    subscriber_at(&redis_url(), pattern).await
}

/// `n` flow events over `flows` channels; returns the lines and their ids.
fn flow_events(n: usize, flows: usize) -> (Vec<String>, Vec<String>) {
    let mut lines = Vec::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = Uuid::now_v7().to_string();
        lines.push(
            json!({"v": 1, "id": id, "type": "flow.progress",
                "channel": format!("flow.{}.progress", i % flows), "source": "tests",
                "time": "2026-11-26T12:00:00Z", "data": {"i": i}})
            .to_string(),
        );
        ids.push(id);
    }
    (lines, ids)
}

/// A notifier on `stream` publishing flow events on `<stream>:<channel>` (tests keep apart).
fn notifier(stream: &str) -> WorkerEnv {
    WorkerEnv::new(stream, "").unset("FLEET_DATABASE_URL").set(
        "FLEET_CONFIG",
        &config("[[route]]\npattern = \"flow.*.progress\"\npublish = \"{stream}:{channel}\""),
    )
}

/// Waits until every id has been received at least once; returns the messages per event id.
async fn every_id_received(received: &Received, ids: &[String]) -> HashMap<String, Vec<Value>> {
    wait_until(Duration::from_secs(60), "every event received", || {
        let received = received.clone();
        let want = ids.len();
        async move {
            let got: std::collections::HashSet<String> = received
                .lock()
                .unwrap()
                .iter()
                .map(|(_, m)| m["id"].as_str().unwrap().to_owned())
                .collect();
            got.len() >= want
        }
    })
    .await;
    let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
    for (_, m) in received.lock().unwrap().iter() {
        by_id
            .entry(m["id"].as_str().unwrap().to_owned())
            .or_default()
            .push(m.clone());
    }
    for id in ids {
        assert!(by_id.contains_key(id), "{id} never received");
    }
    by_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_sees_every_event_of_an_unlimited_channel_in_stream_order_per_key() {
    let stream = unique("notify:");
    let received = subscriber(&format!("{stream}:*")).await;
    let (lines, ids) = flow_events(5_000, 20);
    publish_lines(&stream, &lines).await;
    let mut worker = notifier(&stream).start("notifier").await;
    let conn = redis().await;
    wait_settled(&conn, &stream, GROUP).await;
    let by_id = every_id_received(&received, &ids).await;
    assert!(by_id.values().all(|m| m.len() == 1), "no crash: each once");
    let messages = received.lock().unwrap().clone();
    let mut last: HashMap<String, (u64, u64)> = HashMap::new();
    for (channel, m) in &messages {
        assert_eq!(
            *channel,
            format!("{stream}:{}", m["channel"].as_str().unwrap())
        );
        assert_eq!(m["stream"], stream.as_str());
        assert_eq!(m["v"], 1);
        let at = entry_id_key(m["entry_id"].as_str().unwrap());
        if let Some(prev) = last.insert(channel.clone(), at) {
            assert!(prev < at, "{channel}: {prev:?} then {at:?}");
        }
    }
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_publishes_every_event_at_least_once_with_its_entry_id() {
    let stream = unique("notify-kill:");
    let received = subscriber(&format!("{stream}:*")).await;
    let (lines, ids) = flow_events(20_000, 50);
    let env = notifier(&stream);
    let publisher = tokio::spawn(publish_in_chunks(
        redis_url(),
        stream.clone(),
        lines,
        2000,
        Duration::from_millis(150),
    ));
    for _ in 0..3 {
        let mut worker = env.start("notifier").await;
        tokio::time::sleep(Duration::from_millis(random_between(150, 600))).await;
        worker.signal("KILL").await;
        worker.wait(Duration::from_secs(10)).await;
    }
    publisher.await.unwrap();
    let mut worker = env.start("notifier").await;
    let conn = redis().await;
    wait_settled(&conn, &stream, GROUP).await;
    let by_id = every_id_received(&received, &ids).await;
    for (id, copies) in &by_id {
        let entry_ids: std::collections::HashSet<&str> = copies
            .iter()
            .map(|m| m["entry_id"].as_str().unwrap())
            .collect();
        assert_eq!(entry_ids.len(), 1, "{id}: duplicates carry one entry id");
    }
    let duplicates: usize = by_id.values().map(|c| c.len() - 1).sum();
    eprintln!(
        "kill -9 x3: {} events, {duplicates} published again",
        ids.len()
    );
    worker.stop_cleanly().await;
}
