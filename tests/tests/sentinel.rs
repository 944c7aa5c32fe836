//! A Sentinel-managed Redis (`FLEET_REDIS_URL=redis+sentinel://...`): the master killed (SIGKILL),
//! or demoted alive (`SENTINEL FAILOVER`), while the persister works through a backlog; the
//! sentinels promote the replica, the persister moves to the new master (at the sentinels'
//! announcement, or at the errors of the lost master) and carries on within seconds, and nothing
//! acknowledged is lost or doubled. As in the cluster's failover test, the producer waits for its
//! entries to reach the replica (`WAIT`) before the master dies; the persister's acknowledgements
//! lost with the master are simply done again (PostgreSQL holds each event once). fleetctl works
//! through the sentinels too, and a sentinel URL it cannot use exits 2.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;

use streamfleet_tests::corpus;
use streamfleet_tests::scenario::{conclude, config, wait_settled, GROUP};
use streamfleet_tests::servers::PrivateSentinels;
use streamfleet_tests::*;

/// How long the persister may take to be ready again after the fault: the sentinels need about
/// 1 s to agree a master is down and a few to promote the replica.
const BACK_WITHIN: Duration = Duration::from_secs(20);

/// How the master stops being the master.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGKILL: the sentinels see it down after a second and promote the replica.
    Kill,
    /// `SENTINEL FAILOVER`: the replica is promoted and the master, alive, becomes its replica
    /// seconds later (until then it still answers as a master).
    Demote,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_killed_mid_load_is_followed_and_nothing_is_lost_or_doubled() {
    failover_mid_load("sentinel failover: master killed mid-load", Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_demoted_mid_load_is_followed_and_nothing_is_lost_or_doubled() {
    failover_mid_load("sentinel failover: master demoted mid-load", Fault::Demote).await;
}

async fn failover_mid_load(scenario: &str, fault: Fault) {
    let mut redis = tokio::task::spawn_blocking(PrivateSentinels::start)
        .await
        .unwrap();
    let url = redis.url();
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let stream = unique("sentinel:");
    let corpus = corpus::mixed(20_000, 5, 1);
    let (before, after) = corpus.lines.split_at(15_000);
    // The producer goes through the sentinels too.
    publish_lines_to(&url, &stream, before).await;
    let mut old = redis_at(&redis.master.url()).await;
    // The producer's own safety: its entries are on the replica before anything fails.
    let replicated: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(10_000)
        .query_async(&mut old)
        .await
        .unwrap();
    assert_eq!(replicated, 1);

    let env = WorkerEnv::new(&stream, &db)
        .set("FLEET_REDIS_URL", &url)
        .set(
            "FLEET_CONFIG",
            // Entries delivered on a master that is lost are redelivered once idle this long.
            &config("batch_size = 100\nhandler_timeout_ms = 2000\nclaim_idle_ms = 5000\nclaim_interval_ms = 500\n"),
        );
    let mut persister = env.start("persister").await;
    tokio::time::sleep(Duration::from_millis(random_between(200, 600))).await;
    let unsettled = lag(&mut old, &stream, GROUP).await.unwrap_or(1);
    assert!(
        unsettled > 0,
        "the load was over before the failover: make it longer"
    );
    eprintln!("{fault:?} with {unsettled} entries not read yet");
    drop(old);

    // What /readyz says from the fault on.
    let since = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let watch = {
        let (http, stop) = (persister.http.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some((code, body)) = http_get(&http, "/readyz").await {
                    if code != 200 && !seen.contains(&body) {
                        seen.push(body);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen
        })
    };
    redis = tokio::task::spawn_blocking(move || {
        match fault {
            Fault::Kill => redis.kill_master(),
            Fault::Demote => redis.failover(),
        }
        redis.wait_failover();
        redis
    })
    .await
    .unwrap();
    let promoted = since.elapsed();
    // The persister moves to the new master (it says so), and is ready there.
    wait_until(
        BACK_WITHIN,
        "the persister following the new master",
        || {
            let moved = persister
                .log_text()
                .contains("Redis failover: following the new master");
            async move { moved }
        },
    )
    .await;
    let followed = since.elapsed();
    persister.wait_ready().await;
    let back = since.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let said = watch.await.unwrap();
    eprintln!(
        "{fault:?}: replica promoted {promoted:?} after the fault; the persister on the new master after {followed:?}, ready there after {back:?}; /readyz meanwhile: {said:?}"
    );
    assert!(
        back <= BACK_WITHIN,
        "the persister took {back:?} to be ready again (bound {BACK_WITHIN:?})"
    );
    if let Fault::Kill = fault {
        assert!(
            said.iter().any(|body| body.contains("redis=false")),
            "/readyz never said Redis was unreachable: {said:?}"
        );
    }

    // The rest of the load, through the sentinels (to the new master).
    publish_lines_to(&url, &stream, after).await;
    let mut conn = redis_at(&redis.replica.url()).await;
    wait_settled(&conn, &stream, GROUP).await;
    conclude(scenario, &mut conn, &pool, &stream, &corpus).await;

    // fleetctl through the sentinels.
    let (status, stderr) = env
        .run_to_end_with_args("fleetctl", &["status", "--streams", &stream])
        .await;
    assert!(status.success(), "fleetctl status: {stderr}");

    persister.wait_ready().await;
    persister.stop_cleanly().await;
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_url_that_cannot_be_used_exits_2_naming_fleet_redis_url() {
    for url in [
        "redis+sentinel://127.0.0.1:26379",
        "redis+sentinel://127.0.0.1:26379/",
        "redis+sentinel:///fleet",
        "redis+sentinel://127.0.0.1:notaport/fleet",
        "redis+sentinel://u:s3cret@127.0.0.1:26379/fleet/notadb",
    ] {
        let env = WorkerEnv::new("s", "postgres://x@127.0.0.1:1/x")
            .set("FLEET_REDIS_URL", url)
            .set("FLEET_HTTP_ADDR", &free_addr());
        for (binary, args) in [
            ("persister", &[][..]),
            ("fleetctl", &["status", "--streams", "s"][..]),
        ] {
            let (status, stderr) = env.run_to_end_with_args(binary, args).await;
            assert_eq!(status.code(), Some(2), "{binary} with {url}: {stderr}");
            let last = stderr.trim().lines().last().unwrap_or_default();
            assert!(
                last.contains("FLEET_REDIS_URL") && !stderr.contains("s3cret"),
                "{binary} with {url}: {stderr}"
            );
        }
    }
    // The gateway does not follow a sentinel's master yet: it says so rather than subscribe to
    // a sentinel.
    let (status, stderr) = WorkerEnv::new("s", "")
        .unset("FLEET_STREAMS")
        .unset("FLEET_DATABASE_URL")
        .set("FLEET_REDIS_URL", "redis+sentinel://127.0.0.1:26379/fleet")
        .set("FLEET_GATEWAY_ANONYMOUS_TOPICS", "x.#")
        .set("FLEET_HTTP_ADDR", &free_addr())
        .run_to_end("gateway")
        .await;
    assert_eq!(status.code(), Some(2), "gateway: {stderr}");
    assert!(
        stderr.contains("FLEET_REDIS_URL") && stderr.contains("Sentinel"),
        "gateway: {stderr}"
    );
}
