//! Stopping a worker at any moment of its life: a SIGTERM in its first milliseconds (a pod
//! deleted as it starts) still ends in a clean drain and exit 0, never in death by the signal.

use std::time::{Duration, Instant};

use streamfleet_tests::scenario::config;
use streamfleet_tests::*;

/// Whether the process runs its own code: Rust's runtime, before `main`, sets SIGPIPE to be
/// ignored (its `SigIgn` mask in /proc). Before that the dynamic loader is still at work (about
/// a millisecond or two for these debug builds, measured), and no process can catch a signal.
fn runs_its_own_code(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (13 - 1)) != 0)
}

/// Starts `binary` with `env`, sends SIGTERM `after` it started running its own code, and
/// returns how it ended.
async fn stopped_after(binary: &str, env: &WorkerEnv, after: Duration) -> std::process::ExitStatus {
    let mut worker = env.spawn_only(binary).await;
    let spawned = Instant::now();
    while !runs_its_own_code(worker.pid()) {
        assert!(
            spawned.elapsed() < Duration::from_secs(5),
            "{binary} never started"
        );
        std::thread::yield_now();
    }
    let started = Instant::now();
    while started.elapsed() < after {
        std::thread::yield_now();
    }
    worker.signal("TERM").await;
    worker.wait(Duration::from_secs(30)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_the_first_milliseconds_drains_and_exits_0() {
    let database = fresh_database().await;
    let projector = config(
        "[[route]]\npattern = \"flow.#\"\nactions = [{ latest = \"{stream}:state:{channel}\" }]",
    );
    let stream = unique("early-stop:");
    let envs = [
        ("persister", WorkerEnv::new(&stream, &database)),
        (
            "projector",
            WorkerEnv::new(&stream, "")
                .unset("FLEET_DATABASE_URL")
                .set("FLEET_CONFIG", &projector),
        ),
        (
            "notifier",
            WorkerEnv::new(&stream, "").unset("FLEET_DATABASE_URL"),
        ),
    ];
    let mut failures = Vec::new();
    for round in 0..2 {
        for micros in [0u64, 100, 250, 500, 1_000, 2_000, 5_000] {
            for (binary, env) in &envs {
                let env = env
                    .clone()
                    .set("FLEET_CONSUMER", &format!("c{round}-{micros}"));
                let status = stopped_after(binary, &env, Duration::from_micros(micros)).await;
                if status.code() != Some(0) {
                    failures.push(format!(
                        "{binary} stopped {micros} µs after it started: {status}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The contract's sketch is one file: every worker reads its own route settings from it and
/// leaves the others' to them, and a field no worker owns stops every worker with exit 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_file_serves_the_whole_fleet_and_a_typo_stops_every_worker() {
    let database = fresh_database().await;
    let stream = unique("one-file:");
    let routes = |actions: &str| {
        format!(
            "[[route]]\npattern = \"user.#\"\nstrict = true\n\
             [[route]]\npattern = \"flow.*.progress\"\n\
             {actions} = [{{ latest = \"{stream}:state:{{channel[1]}}\" }}]\n\
             publish = \"{stream}:{{channel}}\"\nsharded = false\n\
             gateway = {{ latest = \"{stream}:state:{{channel[1]}}\" }}\n\
             [[backpressure]]\npattern = \"flow.*.progress\"\nmode = \"coalesce\"\nwindow_ms = 50"
        )
    };
    let env = WorkerEnv::new(&stream, &database)
        .set("FLEET_CONFIG", &config(&routes("actions")))
        .set("FLEET_GATEWAY_ANONYMOUS_TOPICS", "flow.#");
    let received = subscriber_at(&redis_url(), &format!("{stream}:*")).await;
    let mut workers = Vec::new();
    for binary in ["persister", "projector", "notifier", "gateway"] {
        let env = env.clone().set("FLEET_HTTP_ADDR", &free_addr());
        workers.push(env.start(binary).await);
    }
    let mut browser =
        streamfleet_tests::sse::connect(&workers[3].http, "/events?topic=flow.f1.progress", &[])
            .await
            .unwrap();
    assert_eq!(browser.status, 200);
    let user = uuid::Uuid::new_v4();
    publish_lines(
        &stream,
        &[
            serde_json::json!({"v": 1, "id": user.to_string(), "type": "user.signed_up",
                "channel": "user.42", "source": "tests", "time": "2026-12-07T00:00:00Z",
                "data": {"n": 1}})
            .to_string(),
            streamfleet_tests::projector::flow_event(
                uuid::Uuid::new_v4(),
                "f1",
                "2026-12-07T00:00:00Z",
                serde_json::json!({"step": 3}),
            ),
        ],
    )
    .await;
    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    let mut conn = redis().await;
    let state = format!("{stream}:state:f1");
    wait_until(Duration::from_secs(30), "every worker's effect", || {
        let (pool, mut conn, received) = (pool.clone(), conn.clone(), received.clone());
        let state = state.clone();
        async move {
            let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_id = $1")
                .bind(user)
                .fetch_one(&pool)
                .await
                .unwrap();
            let event: Option<String> = redis::cmd("HGET")
                .arg(&state)
                .arg("event")
                .query_async(&mut conn)
                .await
                .unwrap();
            let projected = event.is_some_and(|e| e.contains(r#""step":3"#));
            rows == 1 && projected && !received.lock().unwrap().is_empty()
        }
    })
    .await;
    assert_eq!(
        received.lock().unwrap()[0].0,
        format!("{stream}:flow.f1.progress")
    );
    let sent = browser
        .next(Duration::from_secs(10))
        .await
        .expect("the gateway's message");
    assert_eq!(sent.json()["data"]["step"], 3);
    drop(browser);
    let _: () = redis::cmd("DEL")
        .arg(&state)
        .query_async(&mut conn)
        .await
        .unwrap();
    for w in &mut workers {
        w.stop_cleanly().await;
    }

    let typo = env.set("FLEET_CONFIG", &config(&routes("acitons")));
    for binary in ["persister", "projector", "notifier", "gateway"] {
        let (status, stderr) = typo.run_to_end(binary).await;
        assert_eq!(status.code(), Some(2), "{binary}: {stderr}");
        assert!(
            stderr.contains("route[1] (flow.*.progress): unknown field `acitons`"),
            "{binary}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{binary}: {stderr}");
    }
}
