//! The Redis the fleet needs, checked at start and while running: a `maxmemory-policy` that
//! evicts keys is refused (exit 2) unless allowed, and a fault if it appears later; an AOF that
//! would lose acknowledged writes is a warning; a Redis that refuses `CONFIG` is said to be
//! unchecked.

use std::time::Duration;

use streamfleet_tests::scenario::config;
use streamfleet_tests::servers::PrivateRedis;
use streamfleet_tests::*;

/// A notifier (no database) on `server`.
fn notifier(server: &PrivateRedis) -> WorkerEnv {
    WorkerEnv::new(&unique("needs:"), "")
        .unset("FLEET_DATABASE_URL")
        .set("FLEET_REDIS_URL", &server.url())
        .set(
            "FLEET_CONFIG",
            &config("lag_interval_ms = 200\n[[route]]\npattern = \"flow.#\""),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_may_evict_keys_is_refused_unless_allowed() {
    let server = PrivateRedis::start_with(&["--maxmemory-policy".into(), "allkeys-lru".into()]);
    let (status, stderr) = notifier(&server).run_to_end("notifier").await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    // The last line, the only error: what is wrong and how to fix or override it.
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("notifier: error: Redis maxmemory-policy is not noeviction (allkeys-lru)")
            && last.contains("FLEET_REDIS_ALLOW_EVICTION"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("error").count(), 1, "{stderr}");
    let mut allowed = notifier(&server)
        .set("FLEET_REDIS_ALLOW_EVICTION", "true")
        .start("notifier")
        .await;
    assert!(
        allowed.log_text().contains("running anyway"),
        "{}",
        allowed.log_text()
    );
    allowed.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_policy_set_while_running_makes_the_worker_unready_until_undone() {
    let server = PrivateRedis::start();
    let mut worker = notifier(&server).start("notifier").await;
    assert!(
        !worker.log_text().contains("Redis persistence"),
        "AOF on: no warning"
    );
    let mut admin = redis_at(&server.url()).await;
    let set = |policy: &'static str| {
        let mut admin = admin.clone();
        async move {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory-policy")
                .arg(policy)
                .query_async(&mut admin)
                .await
                .unwrap();
        }
    };
    set("volatile-lru").await;
    wait_until(Duration::from_secs(10), "unready", || {
        let w = &worker;
        async move {
            let (code, body) = w.readyz().await;
            code == 503 && body.contains("maxmemory-policy evicts keys (volatile-lru)")
        }
    })
    .await;
    assert!(worker.log_text().contains("no longer noeviction"));
    set("noeviction").await;
    worker.wait_ready().await;
    let _: () = redis::cmd("PING").query_async(&mut admin).await.unwrap();
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aof_that_loses_writes_is_a_warning_and_a_refused_config_is_unchecked() {
    let server = PrivateRedis::start();
    let mut admin = redis_at(&server.url()).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendonly")
        .arg("no")
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut worker = notifier(&server).start("notifier").await;
    assert!(
        worker.log_text().contains("appendonly no"),
        "{}",
        worker.log_text()
    );
    worker.stop_cleanly().await;

    // A user without `config|get` (a managed Redis refuses CONFIG): started, said unchecked.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("noconfig")
        .arg("on")
        .arg(">pw")
        .arg("allkeys")
        .arg("allchannels")
        .arg("+@all")
        .arg("-config")
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = server.url().replace("redis://", "redis://noconfig:pw@");
    let mut worker = notifier(&server)
        .set("FLEET_REDIS_URL", &url)
        .start("notifier")
        .await;
    assert!(
        worker
            .log_text()
            .contains("not checked: CONFIG GET is not among this ACL user's commands"),
        "{}",
        worker.log_text()
    );
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producers_maxlen_cutting_unread_entries_is_reported() {
    // A notifier behind its stream (a rate limit that blocks: it reads no further than
    // max_in_flight), and a producer that caps the stream with MAXLEN.
    let server = PrivateRedis::start();
    let stream = unique("cut:");
    let worker = WorkerEnv::new(&stream, "")
        .unset("FLEET_DATABASE_URL")
        .set("FLEET_REDIS_URL", &server.url())
        .set(
            "FLEET_CONFIG",
            &config(
                "lag_interval_ms = 200\nbatch_size = 50\nmax_in_flight = 100\n\
                 [[route]]\npattern = \"flow.#\"\n\
                 [[backpressure]]\npattern = \"flow.#\"\nmode = \"rate_limit\"\nper_second = 5\nover_limit = \"block\"",
            ),
        )
        .start("notifier")
        .await;
    let lines: Vec<String> = (0..1000)
        .map(|i| {
            serde_json::json!({"v": 1, "id": uuid::Uuid::now_v7().to_string(), "type": "flow.progress",
                "channel": "flow.1.progress", "source": "tests", "time": "2026-12-07T00:00:00Z",
                "data": {"i": i}})
            .to_string()
        })
        .collect();
    publish_lines_to(&server.url(), &stream, &lines).await;
    let mut admin = redis_at(&server.url()).await;
    wait_until(Duration::from_secs(10), "the notifier is behind", || {
        let (mut admin, stream) = (admin.clone(), stream.clone());
        async move { lag(&mut admin, &stream, "notifier").await.unwrap_or(0) > 500 }
    })
    .await;
    assert_eq!(worker.readyz().await.0, 200);
    // The producer's next XADD keeps the last 300 entries (exactly, `=`).
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("MAXLEN")
        .arg("=")
        .arg(300)
        .arg("*")
        .arg("v")
        .arg("1")
        .query_async(&mut admin)
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "the cut reported", || {
        let w = &worker;
        async move {
            let (code, body) = w.readyz().await;
            code == 503 && body.contains("entries deleted before group notifier read them")
        }
    })
    .await;
    let log = worker.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("deleted before this group read them"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains(&stream) && line.contains("through="),
        "{line}"
    );
    assert_eq!(
        worker
            .metric(
                "fleet_entries_cut_unread_total",
                &format!("stream=\"{stream}\"")
            )
            .await,
        1.0,
        "said once"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        log.matches("deleted before this group read them").count(),
        worker
            .log_text()
            .matches("deleted before this group read them")
            .count(),
        "not repeated"
    );
    worker.signal("KILL").await;
}
