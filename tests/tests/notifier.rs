//! The notifier, black-box with real subscribers: every routed event published on Redis Pub/Sub
//! as its v1 JSON with `stream` and `entry_id`, in stream order per key, at least once through
//! kill -9 (a duplicate carries the same `entry_id`).

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
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

/// A message published again (after a crash, a restart) carries the entry id of its first copy.
fn assert_one_entry_id_each(by_id: &HashMap<String, Vec<Value>>) {
    for (id, copies) in by_id {
        let entry_ids: std::collections::HashSet<&str> = copies
            .iter()
            .map(|m| m["entry_id"].as_str().unwrap())
            .collect();
        assert_eq!(entry_ids.len(), 1, "{id}: duplicates carry one entry id");
    }
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
    assert_one_entry_id_each(&by_id);
    let duplicates: usize = by_id.values().map(|c| c.len() - 1).sum();
    eprintln!(
        "kill -9 x3: {} events, {duplicates} published again",
        ids.len()
    );
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_load_the_notifier_resumes_and_publishes_what_follows() {
    // Pub/Sub keeps nothing for a subscriber that is not connected: what the notifier published
    // while the subscribers were away is theirs to catch up on (the projector's history). What
    // it owes: every entry acknowledged once published, and everything after the restart
    // published with its entry id.
    let mut server = streamfleet_tests::servers::PrivateRedis::start();
    let stream = unique("notify-restart:");
    let before = subscriber_at(&server.url(), &format!("{stream}:*")).await;
    let (lines, ids) = flow_events(20_000, 50);
    let (first, second) = lines.split_at(10_000);
    publish_lines_to(&server.url(), &stream, first).await;
    let mut worker = notifier(&stream)
        // 50 a second per channel, waiting (`block`): ~2 500 a second over the 50 channels, so
        // the restart comes mid-load, with events waiting for their channel.
        .set(
            "FLEET_CONFIG",
            &config(
                "batch_size = 100\n[[route]]\npattern = \"flow.*.progress\"\npublish = \"{stream}:{channel}\"\n\
                 [[backpressure]]\npattern = \"flow.*.progress\"\nmode = \"rate_limit\"\n\
                 per_second = 50\nburst = 50\nover_limit = \"block\"",
            ),
        )
        .set("FLEET_REDIS_URL", &server.url())
        .start("notifier")
        .await;
    wait_until(
        Duration::from_secs(60),
        "messages before the restart",
        || {
            let before = before.clone();
            async move { before.lock().unwrap().len() >= 1_000 }
        },
    )
    .await;
    server.restart();
    let after = subscriber_at(&server.url(), &format!("{stream}:*")).await;
    publish_lines_to(&server.url(), &stream, second).await;
    let conn = redis_at(&server.url()).await;
    wait_settled(&conn, &stream, GROUP).await;
    let by_id = every_id_received(&after, &ids[10_000..]).await;
    assert_one_entry_id_each(&by_id);
    let seen_before = before.lock().unwrap().len();
    assert!(
        seen_before < 10_000,
        "the restart came mid-load ({seen_before} received before it)"
    );
    assert_eq!(
        dead_letters_at(&server.url(), &stream).await,
        0,
        "waiting is never a failure"
    );
    assert!(
        worker.metric("fleet_reconnects_total", "redis").await >= 1.0,
        "reconnected after the restart"
    );
    worker.stop_cleanly().await;
}

/// A message received, with when (this machine's clock, as the event's `time` at publishing).
type Timed = std::sync::Arc<std::sync::Mutex<Vec<(Value, time::OffsetDateTime)>>>;

/// A subscriber of `pattern` that notes when each message arrived.
async fn timed_subscriber(pattern: &str) -> Timed {
    use futures_util::StreamExt;
    let client = redis::Client::open(redis_url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.psubscribe(pattern).await.unwrap();
    let received = Timed::default();
    let sink = received.clone();
    tokio::spawn(async move {
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let at = time::OffsetDateTime::now_utc();
            let payload: String = msg.get_payload().unwrap();
            sink.lock()
                .unwrap()
                .push((serde_json::from_str(&payload).unwrap(), at));
        }
    });
    received
}

/// One flow event on `channel`, `data.i = i`, timed now.
fn timed_line(channel: &str, i: usize) -> String {
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    json!({"v": 1, "id": Uuid::now_v7().to_string(), "type": "flow.progress",
        "channel": channel, "source": "tests", "time": now, "data": {"i": i}})
    .to_string()
}

/// Publishes `per_tick` events on each channel every 10 ms for `ticks` ticks (data.i counts per
/// channel); returns how many were published per channel.
async fn publish_steadily(stream: String, channels: Vec<(String, usize)>, ticks: usize) {
    let mut n: HashMap<String, usize> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for t in 0..ticks {
        tick.tick().await;
        let mut lines = Vec::new();
        for (channel, every) in &channels {
            // `every`: one event per that many ticks (a quiet channel), 0 for none.
            if *every > 0 && t % every == 0 {
                let i = n.entry(channel.clone()).or_default();
                lines.push(timed_line(channel, *i));
                *i += 1;
            }
        }
        if !lines.is_empty() {
            publish_lines(&stream, &lines).await;
        }
    }
}

/// A notifier on `stream` with backpressure `rules` (and `tuning` lines), in a group of its
/// own (`limited_group`): rate-limit budgets are the group's, and tests run at once.
fn limited_notifier(stream: &str, tuning: &str, rules: &str) -> WorkerEnv {
    WorkerEnv::new(stream, "")
        .unset("FLEET_DATABASE_URL")
        .set("FLEET_GROUP", &limited_group(stream))
        .set(
            "FLEET_CONFIG",
            &config(&format!(
                "{tuning}\n[[route]]\npattern = \"flow.*.progress\"\npublish = \"{{stream}}:{{channel}}\"\n{rules}"
            )),
        )
}

/// The group of `limited_notifier(stream, ..)`.
fn limited_group(stream: &str) -> String {
    format!("notifier:{stream}")
}

/// The messages of `channel`, in arrival order.
fn of_channel(received: &Timed, channel: &str) -> Vec<(Value, time::OffsetDateTime)> {
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|(m, _)| m["channel"] == channel)
        .cloned()
        .collect()
}

/// Publish-to-subscriber latencies in ms, sorted.
fn latencies(messages: &[(Value, time::OffsetDateTime)]) -> Vec<f64> {
    let mut out: Vec<f64> = messages
        .iter()
        .map(|(m, at)| {
            let sent = time::OffsetDateTime::parse(
                m["time"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap();
            (*at - sent).as_seconds_f64() * 1000.0
        })
        .collect();
    out.sort_by(f64::total_cmp);
    out
}

fn p99(sorted: &[f64]) -> f64 {
    sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalesced_channel_delivers_the_newest_state_of_every_key_in_far_fewer_messages() {
    let stream = unique("notify-coalesce:");
    let received = timed_subscriber(&format!("{stream}:*")).await;
    let mut worker = limited_notifier(
        &stream,
        "",
        "[[backpressure]]\npattern = \"flow.*.progress\"\nmode = \"coalesce\"\nwindow_ms = 200",
    )
    .start("notifier")
    .await;
    worker.wait_ready().await;
    // 10 keys (channels), 1 event each per 10 ms tick for 2 s: 2 000 events.
    let channels: Vec<(String, usize)> =
        (0..10).map(|k| (format!("flow.{k}.progress"), 1)).collect();
    let started = std::time::Instant::now();
    publish_steadily(stream.clone(), channels.clone(), 200).await;
    let windows = started.elapsed().as_millis() as usize / 200 + 2;
    let conn = redis().await;
    wait_settled(&conn, &stream, &limited_group(&stream)).await;
    let total = received.lock().unwrap().len();
    for (channel, _) in &channels {
        let got = of_channel(&received, channel);
        let last = got.last().expect("each key delivered");
        assert_eq!(last.0["data"]["i"], 199, "{channel}: the newest state last");
        let order: Vec<u64> = got
            .iter()
            .map(|(m, _)| m["data"]["i"].as_u64().unwrap())
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "{channel}: {order:?}"
        );
    }
    // One message per key per 200 ms window: about 10 per key over 2 s, not 200.
    assert!(
        (10..=10 * windows).contains(&total),
        "{total} messages for 2 000 events ({windows} windows at most per key)"
    );
    let coalesced = worker
        .metric("fleet_backpressure_actions_total", "action=\"coalesced\"")
        .await;
    assert_eq!(
        coalesced as usize,
        2000 - total,
        "each replaced event counted"
    );
    assert_eq!(dead_letters(&stream).await, 0);
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_channel_stays_within_its_rate_and_a_quiet_channel_flows() {
    let stream = unique("notify-rate:");
    let received = timed_subscriber(&format!("{stream}:*")).await;
    let mut worker = limited_notifier(
        &stream,
        "",
        "[[backpressure]]\npattern = \"flow.hot.*\"\nmode = \"rate_limit\"\nper_second = 50\nburst = 10\nover_limit = \"drop\"",
    )
    .start("notifier")
    .await;
    worker.wait_ready().await;
    // The hot channel at 1 000/s for 3 s, the quiet one at 10/s.
    let started = time::OffsetDateTime::now_utc();
    publish_steadily(
        stream.clone(),
        vec![
            ("flow.hot.progress".into(), 1),
            ("flow.hot.progress".into(), 1),
            ("flow.hot.progress".into(), 1),
            ("flow.hot.progress".into(), 1),
            ("flow.hot.progress".into(), 1),
            ("flow.hot.progress".into(), 1),
            ("flow.hot.progress".into(), 1),
            ("flow.hot.progress".into(), 1),
            ("flow.hot.progress".into(), 1),
            ("flow.hot.progress".into(), 1),
            ("flow.quiet.progress".into(), 10),
        ],
        300,
    )
    .await;
    let conn = redis().await;
    wait_settled(&conn, &stream, &limited_group(&stream)).await;
    let elapsed = (time::OffsetDateTime::now_utc() - started).as_seconds_f64();
    let hot = of_channel(&received, "flow.hot.progress");
    // At most the burst plus 50/s over the time the load lasted.
    let most = 10.0 + 50.0 * elapsed;
    assert!(
        (hot.len() as f64) <= most && hot.len() >= 100,
        "{} hot messages in {elapsed:.1} s (limit 50/s, burst 10)",
        hot.len()
    );
    let quiet = of_channel(&received, "flow.quiet.progress");
    assert_eq!(quiet.len(), 30, "every quiet event, none dropped");
    let lat = latencies(&quiet);
    eprintln!(
        "quiet channel beside a rate-limited hot one: p50 {:.1} ms, p99 {:.1} ms; hot {} delivered",
        lat[lat.len() / 2],
        p99(&lat),
        hot.len()
    );
    // The bench measures the 50 ms target on a quiet machine; here the bound says the quiet
    // channel never waits for the hot one's budget (that would be seconds).
    assert!(p99(&lat) < 250.0, "quiet p99 {:.1} ms", p99(&lat));
    assert_eq!(dead_letters(&stream).await, 0);
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_publishes_every_waiting_event_later_while_a_quiet_channel_flows() {
    let stream = unique("notify-block:");
    let received = timed_subscriber(&format!("{stream}:*")).await;
    let mut worker = limited_notifier(
        &stream,
        "",
        "[[backpressure]]\npattern = \"flow.hot.*\"\nmode = \"rate_limit\"\nper_second = 100\nburst = 10\nover_limit = \"block\"",
    )
    .start("notifier")
    .await;
    worker.wait_ready().await;
    // 400 hot events at once (4 s of budget), and the quiet channel at 10/s meanwhile.
    let hot_lines: Vec<String> = (0..400)
        .map(|i| timed_line("flow.hot.progress", i))
        .collect();
    let started = std::time::Instant::now();
    publish_lines(&stream, &hot_lines).await;
    publish_steadily(
        stream.clone(),
        vec![("flow.quiet.progress".into(), 10)],
        300,
    )
    .await;
    let conn = redis().await;
    wait_settled(&conn, &stream, &limited_group(&stream)).await;
    let took = started.elapsed();
    let hot = of_channel(&received, "flow.hot.progress");
    let order: Vec<u64> = hot
        .iter()
        .map(|(m, _)| m["data"]["i"].as_u64().unwrap())
        .collect();
    assert_eq!(
        order,
        (0..400).collect::<Vec<u64>>(),
        "every hot event, once, in order"
    );
    assert!(
        took >= Duration::from_millis(3_500),
        "published at the channel's rate: 400 events in {took:?}"
    );
    let quiet = of_channel(&received, "flow.quiet.progress");
    assert_eq!(quiet.len(), 30);
    let lat = latencies(&quiet);
    eprintln!(
        "quiet channel beside a blocked hot one: p50 {:.1} ms, p99 {:.1} ms",
        lat[lat.len() / 2],
        p99(&lat)
    );
    assert!(p99(&lat) < 250.0, "quiet p99 {:.1} ms", p99(&lat));
    assert!(
        worker
            .metric("fleet_backpressure_actions_total", "action=\"delayed\"")
            .await
            >= 300.0
    );
    assert_eq!(worker.metric("fleet_backpressure_waiting", "").await, 0.0);
    assert_eq!(dead_letters(&stream).await, 0);
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_max_in_flight_under_block_pauses_reading_and_loses_nothing() {
    let stream = unique("notify-flood:");
    let received = timed_subscriber(&format!("{stream}:*")).await;
    let env = limited_notifier(
        &stream,
        "batch_size = 50\nmax_in_flight = 200\nhandler_timeout_ms = 1000\nclaim_idle_ms = 2000",
        "[[backpressure]]\npattern = \"flow.hot.*\"\nmode = \"rate_limit\"\nper_second = 200\nburst = 1\nover_limit = \"block\"",
    );
    let mut worker = env.start("notifier").await;
    worker.wait_ready().await;
    let lines: Vec<String> = (0..1000)
        .map(|i| timed_line("flow.hot.progress", i))
        .collect();
    publish_lines(&stream, &lines).await;
    // Read but not settled stays within max_in_flight and one read, whatever the backlog.
    let mut conn = redis().await;
    let mut most = 0;
    let mut killed = false;
    for round in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        most = most.max(pending(&mut conn, &stream, &limited_group(&stream)).await);
        if round == 15 && !killed {
            // kill -9 while events wait: they are delivered again after the restart.
            worker.signal("KILL").await;
            worker.wait(Duration::from_secs(10)).await;
            worker = env.start("notifier").await;
            killed = true;
        }
    }
    assert!(
        most <= 250,
        "{most} pending at most (max_in_flight 200, batch 50)"
    );
    wait_settled(&conn, &stream, &limited_group(&stream)).await;
    let mut seen: Vec<u64> = of_channel(&received, "flow.hot.progress")
        .iter()
        .map(|(m, _)| m["data"]["i"].as_u64().unwrap())
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, (0..1000).collect::<Vec<u64>>(), "none lost");
    assert_eq!(dead_letters(&stream).await, 0);
    worker.stop_cleanly().await;
}

/// Entries in `<stream>:dlq`.
async fn dead_letters(stream: &str) -> usize {
    dead_letters_at(&redis_url(), stream).await
}

/// The length of `stream`'s dead letter stream on the Redis at `url`.
async fn dead_letters_at(url: &str, stream: &str) -> usize {
    let mut conn = redis_at(url).await;
    redis::cmd("XLEN")
        .arg(format!("{stream}:dlq"))
        .query_async::<usize>(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_outside_the_acl_dead_letters_its_events_and_publishes_the_others_once() {
    let stream = unique("notify-acl:");
    let user = unique("notifier_acl_");
    let mut conn = redis().await;
    // Every command, but Pub/Sub only on the stream's `ok` channels.
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(">pw")
        .arg("~*")
        .arg("+@all")
        .arg("resetchannels")
        .arg(format!("&{stream}:ok:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let received = subscriber(&format!("{stream}:*")).await;
    let lines: Vec<String> = (0..20)
        .map(|i| {
            let channel = if i % 2 == 0 {
                "flow.ok.progress"
            } else {
                "flow.bad.progress"
            };
            timed_line(channel, i)
        })
        .collect();
    publish_lines(&stream, &lines).await;
    let url = redis_url().replacen("redis://", &format!("redis://{user}:pw@"), 1);
    let mut worker = WorkerEnv::new(&stream, "")
        .unset("FLEET_DATABASE_URL")
        .set("FLEET_REDIS_URL", &url)
        .set(
            "FLEET_CONFIG",
            &config("[[route]]\npattern = \"flow.ok.*\"\npublish = \"{stream}:ok:{channel}\"\n[[route]]\npattern = \"flow.bad.*\"\npublish = \"{stream}:bad:{channel}\""),
        )
        .start("notifier")
        .await;
    wait_settled(&conn, &stream, GROUP).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got: Vec<u64> = received
        .lock()
        .unwrap()
        .iter()
        .map(|(_, m)| m["data"]["i"].as_u64().unwrap())
        .collect();
    assert_eq!(
        got,
        (0..20).step_by(2).collect::<Vec<u64>>(),
        "the ok channel's events, each once"
    );
    let dead: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(format!("{stream}:dlq"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(dead.len(), 10);
    assert!(dead.iter().all(|(_, f)| f["dlq_reason"] == "handler_error"
        && f["dlq_error"].contains("PUBLISH refused")
        && f["channel"] == "flow.bad.progress"));
    worker.stop_cleanly().await;
    let _: u64 = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// The most messages received within any `window` (arrival times at the subscriber).
fn most_within(messages: &[(Value, time::OffsetDateTime)], window: Duration) -> usize {
    let mut at: Vec<time::OffsetDateTime> = messages.iter().map(|(_, t)| *t).collect();
    at.sort();
    let mut most = 0;
    let mut first = 0;
    for last in 0..at.len() {
        while at[last] - at[first] > window {
            first += 1;
        }
        most = most.max(last - first + 1);
    }
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_channel_keeps_its_rate_through_restarts_and_waiting_is_not_a_delivery() {
    // Events waiting for their channel's budget are no crashing events: five kill -9 while they
    // wait neither make them suspects (applied alone, past the limit) nor dead letters, and the
    // channel never goes faster than its limit, restarts or not.
    let stream = unique("notify-restarts:");
    let received = timed_subscriber(&format!("{stream}:*")).await;
    let env = limited_notifier(
        &stream,
        "max_deliveries = 3\nhandler_timeout_ms = 1000\nclaim_idle_ms = 2000",
        "[[backpressure]]\npattern = \"flow.hot.*\"\nmode = \"rate_limit\"\nper_second = 4\nburst = 1\nover_limit = \"block\"",
    );
    let lines: Vec<String> = (0..40)
        .map(|i| timed_line("flow.hot.progress", i))
        .collect();
    publish_lines(&stream, &lines).await;
    let mut conn = redis().await;
    let group = limited_group(&stream);
    let mut logs = String::new();
    let mut most_deliveries = 0;
    for _ in 0..5 {
        let mut worker = env.start("notifier").await;
        tokio::time::sleep(Duration::from_millis(random_between(500, 900))).await;
        let deliveries: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(&stream)
            .arg(&group)
            .arg("-")
            .arg("+")
            .arg(100)
            .query_async(&mut conn)
            .await
            .unwrap();
        most_deliveries = deliveries
            .iter()
            .map(|d| d.3)
            .max()
            .unwrap_or(0)
            .max(most_deliveries);
        worker.signal("KILL").await;
        worker.wait(Duration::from_secs(10)).await;
        logs.push_str(&worker.log_text());
    }
    let mut worker = env.start("notifier").await;
    wait_settled(&conn, &stream, &group).await;
    logs.push_str(&worker.log_text());
    let hot = of_channel(&received, "flow.hot.progress");
    let mut seen: Vec<u64> = hot
        .iter()
        .map(|(m, _)| m["data"]["i"].as_u64().unwrap())
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen,
        (0..40).collect::<Vec<u64>>(),
        "every event, none lost"
    );
    assert_eq!(dead_letters(&stream).await, 0);
    assert!(
        !logs.contains("past max_deliveries"),
        "a waiting event was taken for a suspect:\n{logs}"
    );
    assert!(
        most_deliveries <= 2,
        "a waiting event's deliveries reached {most_deliveries}"
    );
    // 4/s with a burst of 1: at most 5 in any second (one more for the subscriber's jitter).
    let most = most_within(&hot, Duration::from_secs(1));
    assert!(
        most <= 6,
        "{most} messages within one second (limit 4/s, burst 1)"
    );
    worker.stop_cleanly().await;
}

/// Publishes `per_tick` hot events every 10 ms for `ticks` ticks.
async fn publish_hot(stream: String, per_tick: usize, ticks: usize) {
    publish_steadily(
        stream,
        vec![("flow.hot.progress".to_owned(), 1); per_tick],
        ticks,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_for_the_group_across_replicas_unless_a_rule_keeps_it_per_replica() {
    // Two replicas of one group on a channel at 400 events/s for 4 s, limited to 20/s (burst 5,
    // drop): the subscriber sees the group's limit, not twice it. With `scope = "replica"`, each
    // replica allows the full rate, as asked.
    let rule = |scope: &str| {
        format!("[[backpressure]]\npattern = \"flow.hot.*\"\nmode = \"rate_limit\"\nper_second = 20\nburst = 5\nover_limit = \"drop\"\n{scope}")
    };
    for scope in ["", "scope = \"replica\""] {
        let stream = unique("notify-fleet:");
        let received = timed_subscriber(&format!("{stream}:*")).await;
        let env = limited_notifier(&stream, "", &rule(scope));
        let mut a = env
            .clone()
            .set("FLEET_CONSUMER", "a")
            .start("notifier")
            .await;
        let mut b = env.set("FLEET_CONSUMER", "b").start("notifier").await;
        let started = std::time::Instant::now();
        publish_hot(stream.clone(), 4, 400).await;
        let conn = redis().await;
        wait_settled(&conn, &stream, &limited_group(&stream)).await;
        let elapsed = started.elapsed().as_secs_f64();
        let got = of_channel(&received, "flow.hot.progress").len() as f64;
        let limit = 5.0 + 20.0 * elapsed;
        if scope.is_empty() {
            assert!(
                got <= limit * 1.1 && got >= 20.0 * (elapsed - 1.0),
                "fleet scope: {got} messages in {elapsed:.1} s with 2 replicas (limit {limit:.0})"
            );
        } else {
            assert!(
                got > 1.5 * limit,
                "replica scope: {got} messages in {elapsed:.1} s with 2 replicas (each allows 20/s)"
            );
        }
        a.stop_cleanly().await;
        b.stop_cleanly().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_of_a_drop_rule_that_waited_behind_its_key_is_dropped_once_too_old() {
    // `drop`'s max_age_ms holds for an event that waited in the room (here behind a rate-limited
    // event of its key): it is checked again as it leaves, not only as it is read.
    let stream = unique("notify-age:");
    let received = timed_subscriber(&format!("{stream}:*")).await;
    let mut worker = limited_notifier(
        &stream,
        "",
        "[[backpressure]]\npattern = \"flow.hot.*\"\nmode = \"rate_limit\"\nper_second = 2\nburst = 1\nover_limit = \"block\"\n[[backpressure]]\npattern = \"flow.fresh.*\"\nmode = \"drop\"\nmax_age_ms = 300",
    )
    .start("notifier")
    .await;
    // One key for all: the fresh event waits behind two hot ones (~500 ms for the second).
    let line = |channel: &str, i: usize| {
        let mut v: Value = serde_json::from_str(&timed_line(channel, i)).unwrap();
        v["key"] = json!("k");
        v.to_string()
    };
    publish_lines(
        &stream,
        &[
            line("flow.hot.progress", 0),
            line("flow.hot.progress", 1),
            line("flow.fresh.progress", 2),
        ],
    )
    .await;
    let conn = redis().await;
    wait_settled(&conn, &stream, &limited_group(&stream)).await;
    assert_eq!(of_channel(&received, "flow.hot.progress").len(), 2);
    assert!(
        of_channel(&received, "flow.fresh.progress").is_empty(),
        "published after waiting past its max_age_ms"
    );
    assert_eq!(
        worker
            .metric("fleet_backpressure_actions_total", "action=\"dropped\"")
            .await,
        1.0
    );
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_refused_what_the_rate_limits_need_stops_the_notifier_at_start() {
    // A refusal while running would leave rate-limited events waiting for ever: the grant is
    // checked before anything is read.
    let server = streamfleet_tests::servers::PrivateRedis::start();
    let mut conn = redis_at(&server.url()).await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("limited")
        .arg("on")
        .arg(">pw")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-hscan")
        .query_async(&mut conn)
        .await
        .unwrap();
    let url = server.url().replacen("redis://", "redis://limited:pw@", 1);
    let (status, stderr) = limited_notifier(
        "{app}:events",
        "",
        "[[backpressure]]\npattern = \"flow.*.progress\"\nmode = \"rate_limit\"\nper_second = 5",
    )
    .set("FLEET_REDIS_URL", &url)
    .set("FLEET_HTTP_ADDR", &free_addr())
    .run_to_end("notifier")
    .await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("notifier: error: FLEET_REDIS_URL: the user may not run HSCAN"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_budgets_in_redis_hold_the_channels_recently_busy_not_every_channel_seen() {
    let stream = unique("notify-budgets:");
    let _received = timed_subscriber(&format!("{stream}:*")).await;
    let mut worker = limited_notifier(
        &stream,
        "",
        "[[backpressure]]\npattern = \"flow.*.progress\"\nmode = \"rate_limit\"\nper_second = 5\nburst = 5\nover_limit = \"drop\"",
    )
    .start("notifier")
    .await;
    let budgets = format!(
        "streamfleet:rate:{{{}}}:flow.*.progress",
        limited_group(&stream)
    );
    let conn = redis().await;
    let hlen = {
        let budgets = budgets.clone();
        move |conn: &MultiplexedConnection| {
            let (mut conn, key) = (conn.clone(), budgets.clone());
            async move {
                redis::cmd("HLEN")
                    .arg(key)
                    .query_async::<usize>(&mut conn)
                    .await
                    .unwrap()
            }
        }
    };
    // 3 000 channels, 5 events each (their budget: spent for a second), then one channel only
    // for a while: the fields of the others are forgotten as their budgets are full again.
    let lines: Vec<String> = (0..15_000)
        .map(|i| timed_line(&format!("flow.c{}.progress", i % 3000), i))
        .collect();
    let watch = {
        let conn = conn.clone();
        let hlen = hlen.clone();
        tokio::spawn(async move {
            let mut most = 0;
            for _ in 0..150 {
                most = most.max(hlen(&conn).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            most
        })
    };
    publish_lines(&stream, &lines).await;
    wait_settled(&conn, &stream, &limited_group(&stream)).await;
    let after_burst = watch.await.unwrap();
    assert!(
        after_burst >= 1000,
        "{after_burst} channels' budgets in Redis at most"
    );
    publish_hot(stream.clone(), 1, 300).await;
    wait_settled(&conn, &stream, &limited_group(&stream)).await;
    let after_steady = hlen(&conn).await;
    assert!(
        after_steady < 100,
        "{after_steady} channels remembered after 3 s of one channel ({after_burst} at most before)"
    );
    // Idle: the whole hash goes once every budget is full again (a second at 5/s, burst 5).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let exists: bool = redis::cmd("EXISTS")
        .arg(&budgets)
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    assert!(!exists, "{budgets} outlived its budgets");
    worker.stop_cleanly().await;
}
