//! The gateway, black-box: real projector, notifier and gateways on a real redis-server, and SSE
//! clients over TCP. Live events through the notifier, resumes from the projector's history on
//! another instance (each event once, in order), resets instead of gaps, authorisation, slow
//! clients, the drain and the connection registry.

use std::time::Duration;

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use uuid::Uuid;

use streamfleet_tests::gateway::{history_holds, token, Fleet};
use streamfleet_tests::scenario::config;
use streamfleet_tests::sse::{self, Client, Message};
use streamfleet_tests::*;

const WAIT: Duration = Duration::from_secs(20);

fn new_fleet() -> Fleet {
    Fleet::new("gwt")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Opens `/events` for `topics` on a gateway with a token granting them.
async fn open(gateway: &Worker, topics: &[&str], last_event_id: Option<&str>) -> Client {
    let query: Vec<String> = topics.iter().map(|t| format!("topic={t}")).collect();
    let bearer = format!("Bearer {}", token(topics, 300));
    let mut headers = vec![("Authorization", bearer.as_str())];
    if let Some(id) = last_event_id {
        headers.push(("Last-Event-ID", id));
    }
    let client = sse::connect(
        &gateway.http,
        &format!("/events?{}", query.join("&")),
        &headers,
    )
    .await
    .expect("connect to the gateway");
    assert_eq!(client.status, 200, "{:?}", client.headers);
    client
}

/// The `data.i` of each message.
fn numbers(messages: &[Message]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m.json()["data"]["i"].as_u64().expect("data.i"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_events_reach_browsers_through_the_notifier_with_one_subscription_per_pattern() {
    let fleet = new_fleet();
    let mut notifier = fleet.worker("n1").start("notifier").await;
    let mut gateway = fleet
        .gateway()
        .set("FLEET_GATEWAY_KEEPALIVE_MS", "300")
        .start("gateway")
        .await;
    let one = fleet.flow(1);
    let any = fleet.any();
    let mut a = open(&gateway, &[&one], None).await;
    let mut b = open(&gateway, &[&one], None).await;
    let mut wide = open(&gateway, &[&any], None).await;
    assert_eq!(
        a.headers.get("content-type").map(String::as_str),
        Some("text/event-stream")
    );
    assert_eq!(
        a.headers.get("x-accel-buffering").map(String::as_str),
        Some("no")
    );
    assert!(
        !a.headers.contains_key("content-encoding"),
        "never compressed"
    );
    // Three browsers, two distinct topics: two Pub/Sub subscriptions.
    assert_eq!(gateway.metric("fleet_gateway_subscriptions", "").await, 2.0);
    assert_eq!(gateway.metric("fleet_gateway_connections", "").await, 3.0);

    let mut lines = fleet.events(1, 0..20);
    lines.extend(fleet.events(2, 100..105));
    fleet.publish(&lines).await;
    let got_a = a.take(20, WAIT).await;
    let got_b = b.take(20, WAIT).await;
    let got_wide = wide.take(25, WAIT).await;
    assert_eq!(numbers(&got_a), (0..20).collect::<Vec<_>>());
    assert_eq!(numbers(&got_b), (0..20).collect::<Vec<_>>());
    let mut all = numbers(&got_wide);
    all.sort();
    assert_eq!(all, (0..20).chain(100..105).collect::<Vec<_>>());
    let m = &got_a[0];
    assert_eq!(m.event, "flow.progress");
    let data = m.json();
    assert_eq!(data["channel"], one.as_str());
    assert_eq!(data["stream"], fleet.stream.as_str());
    assert_eq!(
        m.id,
        format!("{}@{}", data["entry_id"].as_str().unwrap(), fleet.stream),
        "the id is the entry and its stream"
    );
    assert_eq!(a.retry, Some(1000));
    // Idle, the stream carries keep-alive comments (no message).
    let before = a.comments;
    assert!(
        a.next(Duration::from_millis(1000)).await.is_none(),
        "nothing more"
    );
    assert!(
        a.comments >= before + 2,
        "keep-alives: {}",
        a.comments - before
    );
    drop((a, b, wide));
    wait_until(WAIT, "subscriptions released", || {
        let g = &gateway;
        async move { g.metric("fleet_gateway_subscriptions", "").await == 0.0 }
    })
    .await;
    gateway.stop_cleanly().await;
    notifier.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_with_last_event_id_resumes_every_missed_event_once_on_another_instance() {
    let fleet = new_fleet();
    let mut projector = fleet.worker("p1").start("projector").await;
    let mut notifier = fleet.worker("n1").start("notifier").await;
    let mut first = fleet.gateway().start("gateway").await;
    let mut second = fleet.gateway().start("gateway").await;
    let topic = fleet.flow(7);
    let mut client = open(&first, &[&topic], None).await;
    fleet.publish(&fleet.events(7, 0..20)).await;
    let seen = client.take(20, WAIT).await;
    assert_eq!(numbers(&seen), (0..20).collect::<Vec<_>>());
    let last = client.last_event_id().to_owned();

    // The instance dies; meanwhile 1 000 events are published (the projector keeps them).
    first.signal("KILL").await;
    first.wait(WAIT).await;
    drop(client);
    fleet.publish(&fleet.events(7, 20..1020)).await;
    let conn = redis().await;
    let history = fleet.history_key(7);
    history_holds(&conn, &history, 1020, WAIT).await;

    // The browser reconnects to the other instance with its Last-Event-ID.
    let mut again = open(&second, &[&topic], Some(&last)).await;
    let resumed = again.take(1000, WAIT).await;
    assert_eq!(
        numbers(&resumed),
        (20..1020).collect::<Vec<_>>(),
        "every missed event, once, in order"
    );
    fleet.publish(&fleet.events(7, 1020..1030)).await;
    let live = again.take(10, WAIT).await;
    assert_eq!(
        numbers(&live),
        (1020..1030).collect::<Vec<_>>(),
        "then the live ones, no seam"
    );
    assert!(
        again.next(Duration::from_millis(500)).await.is_none(),
        "no duplicate"
    );
    assert_eq!(second.metric("fleet_gateway_resumes_total", "").await, 1.0);
    // The live ones may come from the history too, if the projector wrote them first.
    assert!(
        second
            .metric("fleet_gateway_messages_sent_total", "origin=\"history\"")
            .await
            >= 1000.0
    );
    // `?last_event_id=` does the same on a first connect (a page that kept the id).
    let query = format!(
        "/events?topic={topic}&last_event_id={}&access_token={}",
        last.replace('{', "%7B").replace('}', "%7D"),
        token(&[&topic], 60)
    );
    let mut by_query = sse::connect(&second.http, &query, &[]).await.unwrap();
    assert_eq!(by_query.status, 200);
    assert_eq!(
        numbers(&by_query.take(1010, WAIT).await),
        (20..1030).collect::<Vec<_>>()
    );
    drop((again, by_query));
    second.stop_cleanly().await;
    notifier.stop_cleanly().await;
    projector.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_waits_for_a_history_behind_the_live_events_and_skips_nothing() {
    // The projector and the notifier read the stream apart: events the notifier published while
    // the browser was away may reach the projector's history only after the browser is back.
    let fleet = new_fleet();
    let mut projector = fleet.worker("p1").start("projector").await;
    let mut notifier = fleet.worker("n1").start("notifier").await;
    let mut gateway = fleet.gateway().start("gateway").await;
    let topic = fleet.flow(4);
    let mut client = open(&gateway, &[&topic], None).await;
    fleet.publish(&fleet.events(4, 0..10)).await;
    assert_eq!(client.take(10, WAIT).await.len(), 10);
    let last = client.last_event_id().to_owned();
    drop(client);
    let conn = redis().await;
    history_holds(&conn, &fleet.history_key(4), 10, WAIT).await;

    let notified = |n: usize| {
        let (conn, stream) = (conn.clone(), fleet.stream.clone());
        async move {
            wait_until(WAIT, "the notifier published them (to no one)", || {
                let (mut conn, stream) = (conn.clone(), stream.clone());
                async move {
                    lag(&mut conn, &stream, "notifier").await == Some(0)
                        && pending(&mut conn, &stream, "notifier").await == 0
                }
            })
            .await;
            n
        }
    };

    // The history behind, and no live event after the browser is back: the seam is read again
    // until the projector catches up.
    projector.signal("STOP").await;
    fleet.publish(&fleet.events(4, 10..20)).await;
    notified(0).await;
    let mut back = open(&gateway, &[&topic], Some(&last)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    projector.signal("CONT").await;
    let got = back.take(10, WAIT).await;
    assert_eq!(
        numbers(&got),
        (10..20).collect::<Vec<_>>(),
        "delivered without a live event"
    );
    let last = back.last_event_id().to_owned();
    drop(back);
    history_holds(&conn, &fleet.history_key(4), 20, WAIT).await;

    // The history behind, and live events arriving meanwhile: each waits for the history.
    projector.signal("STOP").await;
    fleet.publish(&fleet.events(4, 20..30)).await;
    notified(0).await;
    let mut back = open(&gateway, &[&topic], Some(&last)).await;
    fleet.publish(&fleet.events(4, 30..40)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    projector.signal("CONT").await;
    let got = back.take(20, WAIT).await;
    assert_eq!(
        numbers(&got),
        (20..40).collect::<Vec<_>>(),
        "nothing skipped at the seam"
    );
    assert!(back.next(Duration::from_millis(300)).await.is_none());
    drop(back);
    gateway.stop_cleanly().await;
    notifier.stop_cleanly().await;
    projector.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_outlives_the_subscriptions_health_checks() {
    // The Pub/Sub connection is checked with a PING every 5 s; subscribed, Redis answers it
    // with an array, which must not read as a lost connection (every stream would end).
    let fleet = new_fleet();
    let mut notifier = fleet.worker("n1").start("notifier").await;
    let mut gateway = fleet.gateway().start("gateway").await;
    let topic = fleet.flow(1);
    let mut client = open(&gateway, &[&topic], None).await;
    assert!(client.next(Duration::from_millis(6_500)).await.is_none());
    assert!(!client.ended(), "{}", gateway.log_text());
    fleet.publish(&fleet.events(1, 0..1)).await;
    assert_eq!(numbers(&client.take(1, WAIT).await), [0]);
    assert!(!gateway.log_text().contains("connection lost"));
    assert_eq!(gateway.metric("fleet_gateway_resets_total", "").await, 0.0);
    drop(client);
    gateway.stop_cleanly().await;
    notifier.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_cannot_serve_yet_tells_the_browser_to_retry_not_to_give_up() {
    // An EventSource gives up for good on any status but 200: "later" is a 200 stream with
    // `retry:` that ends at once, so the browser reconnects.
    let fleet = new_fleet();
    let mut gateway = fleet
        .gateway()
        .set("FLEET_REDIS_URL", &format!("redis://{}", free_addr()))
        .spawn_only("gateway")
        .await;
    let path = format!("/events?topic={}", fleet.flow(1));
    let bearer = format!("Bearer {}", token(&[&fleet.flow(1)], 60));
    let mut client = loop {
        match sse::connect(&gateway.http, &path, &[("Authorization", &bearer)]).await {
            Ok(c) => break c,
            Err(_) => {
                gateway.assert_running();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(client.status, 200);
    assert!(client.next(WAIT).await.is_none() && client.ended());
    assert_eq!(client.retry, Some(1000));
    assert!(client.body_text().is_empty() || client.comments == 1);
    assert_eq!(
        gateway
            .metric("fleet_gateway_refusals_total", "reason=\"unavailable\"")
            .await,
        1.0
    );
    gateway.signal("KILL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_the_history_no_longer_holds_is_a_reset_with_the_latest_state_never_a_gap() {
    let fleet = new_fleet();
    let mut projector = fleet.worker("p1").start("projector").await;
    let mut notifier = fleet.worker("n1").start("notifier").await;
    let mut gateway = fleet.gateway().start("gateway").await;
    let topic = fleet.flow(3);
    let mut client = open(&gateway, &[&topic], None).await;
    fleet.publish(&fleet.events(3, 0..10)).await;
    assert_eq!(client.take(10, WAIT).await.len(), 10);
    let old = client.last_event_id().to_owned();
    drop(client);
    fleet.publish(&fleet.events(3, 10..50)).await;
    let mut conn = redis().await;
    let history = fleet.history_key(3);
    history_holds(&conn, &history, 50, WAIT).await;

    // The history is trimmed past the browser's id: a reset carrying the newest state.
    let _: u64 = redis::cmd("XTRIM")
        .arg(&history)
        .arg("MAXLEN")
        .arg(5)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut c = open(&gateway, &[&topic], Some(&old)).await;
    let reset = c.next(WAIT).await.expect("a reset");
    assert_eq!(reset.event, "reset");
    let body = reset.json();
    assert_eq!(body["topic"], topic.as_str());
    assert_eq!(body["latest"]["data"]["i"], 49, "the latest state: {body}");
    assert_eq!(
        reset.id,
        format!(
            "{}@{}",
            body["latest"]["entry_id"].as_str().unwrap(),
            fleet.stream
        )
    );
    fleet.publish(&fleet.events(3, 50..52)).await;
    assert_eq!(numbers(&c.take(2, WAIT).await), [50, 51], "then live");
    drop(c);
    history_holds(&conn, &history, 7, WAIT).await;

    // The history is lost and rebuilt with new ids (a replay): the old id is not there, a reset.
    let _: () = redis::cmd("DEL")
        .arg(&history)
        .query_async(&mut conn)
        .await
        .unwrap();
    fleet.publish(&fleet.events(3, 52..60)).await;
    history_holds(&conn, &history, 8, WAIT).await;
    let mut c = open(&gateway, &[&topic], Some(&old)).await;
    let reset = c.next(WAIT).await.unwrap();
    assert_eq!(
        (
            reset.event.as_str(),
            reset.json()["latest"]["data"]["i"].as_u64()
        ),
        ("reset", Some(59))
    );

    // An id this gateway never wrote, and a topic with no history (a wildcard): resets too.
    let mut c = open(&gateway, &[&topic], Some("garbage")).await;
    assert_eq!(c.next(WAIT).await.unwrap().event, "reset");
    let any = fleet.any();
    let mut c = open(&gateway, &[&any], Some(&old)).await;
    let reset = c.next(WAIT).await.unwrap();
    assert_eq!(reset.event, "reset");
    assert_eq!(reset.json(), json!({"topic": any, "latest": null}));
    assert!(gateway.metric("fleet_gateway_resets_total", "").await >= 4.0);
    drop(c);
    gateway.stop_cleanly().await;
    notifier.stop_cleanly().await;
    projector.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_origins_and_topics_are_checked_before_anything_is_sent() {
    let fleet = new_fleet();
    let mut gateway = fleet
        .gateway()
        .set("FLEET_GATEWAY_CORS_ORIGINS", "https://app.example")
        .set("FLEET_GATEWAY_ANONYMOUS_TOPICS", "public.#")
        .start("gateway")
        .await;
    let topic = fleet.flow(1);
    let get = |path: String, headers: Vec<(&'static str, String)>| {
        let http = gateway.http.clone();
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let mut c = sse::connect(&http, &path, &h).await.unwrap();
            let body = if c.status == 200 {
                String::new()
            } else {
                c.read_body(Duration::from_secs(2)).await
            };
            (c.status, c.headers.clone(), body)
        }
    };
    let path = format!("/events?topic={topic}");
    let bearer = |t: String| vec![("Authorization", format!("Bearer {t}"))];
    let (status, headers, body) = get(path.clone(), vec![]).await;
    assert_eq!((status, body.trim()), (401, "a bearer token is required"));
    assert_eq!(
        headers.get("www-authenticate").map(String::as_str),
        Some("Bearer")
    );
    let (status, _, body) = get(path.clone(), bearer(token(&[&topic], -120))).await;
    assert_eq!(status, 401, "expired: {body}");
    let forged = encode(
        &Header::default(),
        &json!({"exp": now() + 60, "topics": ["#"]}),
        &EncodingKey::from_secret(b"another secret of at least 32 bytes"),
    )
    .unwrap();
    assert_eq!(get(path.clone(), bearer(forged)).await.0, 401);
    let other = fleet.flow(2);
    let (status, _, body) = get(path.clone(), bearer(token(&[&other], 60))).await;
    assert_eq!(
        (status, body.trim()),
        (403, format!("topic {topic} is not granted").as_str())
    );
    let (status, _, _) = get(
        format!("{path}&topic={}", fleet.any()),
        bearer(token(&[&topic], 60)),
    )
    .await;
    assert_eq!(
        status, 403,
        "one topic outside the claim refuses the request"
    );
    assert_eq!(get("/events?topic=Bad!".into(), vec![]).await.0, 400);
    assert_eq!(get("/events".into(), vec![]).await.0, 400);
    // Origins: a page of the configured origin gets the CORS header; another is refused.
    let mut with_origin = bearer(token(&[&topic], 60));
    with_origin.push(("Origin", "https://app.example".into()));
    let (status, headers, _) = get(path.clone(), with_origin).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers
            .get("access-control-allow-origin")
            .map(String::as_str),
        Some("https://app.example")
    );
    let mut evil = bearer(token(&[&topic], 60));
    evil.push(("Origin", "https://evil.example".into()));
    assert_eq!(get(path.clone(), evil).await.0, 403);
    // Anonymous topics need no token; the granted wildcard covers a narrower topic.
    assert_eq!(get("/events?topic=public.news".into(), vec![]).await.0, 200);
    let everything = format!("{}.#", fleet.tag);
    assert_eq!(
        get(path.clone(), bearer(token(&[&everything], 60))).await.0,
        200
    );
    assert!(
        gateway
            .metric("fleet_gateway_refusals_total", "reason=\"unauthenticated\"")
            .await
            >= 3.0
    );
    assert_eq!(
        gateway
            .metric("fleet_gateway_refusals_total", "reason=\"origin\"")
            .await,
        1.0
    );
    gateway.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_and_the_others_keep_up() {
    let fleet = new_fleet();
    let mut notifier = fleet.worker("n1").start("notifier").await;
    let mut gateway = fleet
        .gateway()
        .set("FLEET_GATEWAY_BUFFER", "600")
        .start("gateway")
        .await;
    let topic = fleet.flow(1);
    // The slow one never reads: once the socket buffers are full, its 600 slots fill (more than
    // the notifier's batch of 500, which arrives at once).
    let slow = open(&gateway, &[&topic], None).await;
    let mut fast = open(&gateway, &[&topic], None).await;
    // 24 MB in all: more than the loopback socket buffers hold.
    let pad = "x".repeat(3000);
    let lines: Vec<String> = (0..8000)
        .map(|i| {
            json!({"v": 1, "id": Uuid::now_v7().to_string(), "type": "flow.progress",
                "channel": topic, "source": "tests", "time": "2026-12-07T12:00:00Z",
                "data": {"i": i, "pad": pad}})
            .to_string()
        })
        .collect();
    let publish = fleet.publish(&lines);
    let read = fast.take(8000, Duration::from_secs(60));
    let (_, got) = tokio::join!(publish, read);
    assert!(
        numbers(&got) == (0..8000).collect::<Vec<_>>(),
        "the fast client got everything ({} events)",
        got.len()
    );
    wait_until(WAIT, "the slow client dropped", || {
        let g = &gateway;
        async move { g.metric("fleet_gateway_slow_client_drops_total", "").await == 1.0 }
    })
    .await;
    // Its connection is closed at once, though its full socket means its stream is never
    // polled again: the slow client sees the end, and the gateway holds one connection.
    wait_until(WAIT, "the slow client's connection closed", || {
        let g = &gateway;
        async move { g.metric("fleet_gateway_connections", "").await == 1.0 }
    })
    .await;
    let mut slow = slow;
    let drained = slow.take(usize::MAX, Duration::from_secs(30)).await;
    assert!(slow.ended(), "closed after {} events", drained.len());
    assert!(drained.len() < 8000);
    drop((slow, fast));
    gateway.stop_cleanly().await;
    notifier.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_every_stream_cleanly_and_the_registry_forgets_the_instance() {
    let fleet = new_fleet();
    let registry = fleet.registry();
    let mut a = fleet
        .gateway()
        .set("FLEET_GATEWAY_INSTANCE", "gw-a")
        .start("gateway")
        .await;
    let mut b = fleet
        .gateway()
        .set("FLEET_GATEWAY_INSTANCE", "gw-b")
        .start("gateway")
        .await;
    let (one, two) = (fleet.flow(1), fleet.flow(2));
    let mut clients = [
        open(&a, &[&one], None).await,
        open(&a, &[&one, &two], None).await,
        open(&b, &[&one], None).await,
    ];
    let mut conn = redis().await;
    wait_until(WAIT, "both instances registered", || {
        let (mut conn, registry) = (conn.clone(), registry.clone());
        async move {
            let a: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
                .arg(format!("{registry}:gw-a"))
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            let b: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
                .arg(format!("{registry}:gw-b"))
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            a.get("@connections") == Some(&2) && b.get("@connections") == Some(&1)
        }
    })
    .await;
    let per_topic: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
        .arg(format!("{registry}:gw-a"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(per_topic.get(&one), Some(&2));
    assert_eq!(per_topic.get(&two), Some(&1));
    // fleetctl status shows the connections across instances.
    let (status, out) = fleetctl_status(&registry).await;
    assert!(status, "{out}");
    assert!(out.contains("gw-a") && out.contains("gw-b"), "{out}");

    a.signal("TERM").await;
    let started = std::time::Instant::now();
    for c in clients.iter_mut().take(2) {
        assert!(c.next(WAIT).await.is_none());
        assert!(c.ended(), "the stream ended (not a timeout)");
    }
    assert!(a.wait(WAIT).await.success(), "exit 0:\n{}", a.log_text());
    assert!(started.elapsed() < Duration::from_secs(5));
    let gone: bool = redis::cmd("EXISTS")
        .arg(format!("{registry}:gw-a"))
        .query_async::<u64>(&mut conn)
        .await
        .unwrap()
        == 0;
    assert!(gone, "its registry entry is removed");
    // The other instance keeps serving; killed, its entry expires by itself.
    assert!(clients[2].next(Duration::from_millis(300)).await.is_none() && !clients[2].ended());
    b.signal("KILL").await;
    b.wait(WAIT).await;
    wait_until(WAIT, "a dead instance's counts expire", || {
        let (mut conn, registry) = (conn.clone(), registry.clone());
        async move {
            redis::cmd("EXISTS")
                .arg(format!("{registry}:gw-b"))
                .query_async::<u64>(&mut conn)
                .await
                .unwrap_or(1)
                == 0
        }
    })
    .await;
}

/// `fleetctl status --gateway-registry <registry>` (plain text): success and output.
async fn fleetctl_status(registry: &str) -> (bool, String) {
    let out = tokio::process::Command::new(bin("fleetctl"))
        .env("FLEET_REDIS_URL", redis_url())
        .args([
            "status",
            "--gateway-registry",
            registry,
            "--streams",
            "gwt:nothing:*",
        ])
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn bad_settings_exit_2_with_one_line_naming_them() {
    let fleet = new_fleet();
    for (key, value, expect) in [
        (
            "FLEET_GATEWAY_JWT_SECRET",
            "short",
            "FLEET_GATEWAY_JWT_SECRET",
        ),
        ("FLEET_GATEWAY_BUFFER", "0", "FLEET_GATEWAY_BUFFER"),
        (
            "FLEET_GATEWAY_JWKS_FILE",
            "/nonexistent.json",
            "FLEET_GATEWAY_JWKS_FILE",
        ),
        (
            "FLEET_GATEWAY_ANONYMOUS_TOPICS",
            "Bad!",
            "FLEET_GATEWAY_ANONYMOUS_TOPICS",
        ),
    ] {
        let (status, stderr) = fleet.gateway().set(key, value).run_to_end("gateway").await;
        assert_eq!(status.code(), Some(2), "{key}={value}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expect), "{stderr}");
    }
    let (status, stderr) = fleet
        .gateway()
        .unset("FLEET_GATEWAY_JWT_SECRET")
        .run_to_end("gateway")
        .await;
    assert_eq!(status.code(), Some(2));
    assert!(
        stderr.contains("every request would be refused"),
        "{stderr}"
    );
    let typo = config("[[route]]\npattern = \"a.*\"\ngateway = { histroy = \"h:{channel[1]}\" }");
    let (status, stderr) = fleet
        .gateway()
        .set("FLEET_CONFIG", &typo)
        .run_to_end("gateway")
        .await;
    assert_eq!(status.code(), Some(2));
    assert!(
        stderr.contains("route[0] (a.*): unknown field `histroy`"),
        "{stderr}"
    );
}
