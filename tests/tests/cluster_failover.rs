//! A master of a Redis Cluster killed (SIGKILL) while the persister, the projector and the
//! notifier work through streams on every master: its replica takes over, the workers find the
//! new master by themselves and carry on, and nothing is lost or doubled: every strict event is
//! one row, every counter counts each of its events once, every flow event reaches a subscriber
//! at least once. What replication is asynchronous about is kept out of the verdict the way a
//! careful producer keeps it out: the producer waits for its entries to reach a replica (`WAIT`)
//! before the master dies; the workers' own writes (acknowledgements, the projector's effects with
//! their `XACK`, dead letters) may be lost with the master, and are then simply done again.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use redis::cluster_async::ClusterConnection;
use sqlx::PgPool;

use streamfleet_tests::corpus::{self, Expect};
use streamfleet_tests::scenario::{conclude, config, wait_settled, GROUP};
use streamfleet_tests::servers::PrivateCluster;
use streamfleet_tests::*;

async fn connect(urls: Vec<String>) -> ClusterConnection {
    redis::cluster::ClusterClientBuilder::new(urls)
        .response_timeout(Duration::from_secs(30))
        .retries(10)
        .build()
        .unwrap()
        .get_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masters_failover_mid_load_loses_and_doubles_nothing_for_any_worker() {
    let mut cluster = tokio::task::spawn_blocking(|| PrivateCluster::start(3))
        .await
        .unwrap();
    let seeds = cluster.urls().join(",");
    let mut conn = connect(cluster.urls()).await;
    let prefix = unique("fo");
    let streams: Vec<String> = tags_per_master(&mut conn)
        .await
        .into_iter()
        .map(|tag| format!("{prefix}:{{{tag}}}"))
        .collect();
    let corpora: Vec<corpus::Corpus> = streams.iter().map(|_| corpus::mixed(4_000, 5, 1)).collect();
    for (stream, c) in streams.iter().zip(&corpora) {
        publish_lines_to(&cluster.url(), stream, &c.lines).await;
    }
    // The producer's own safety: its entries are on a replica before anything fails.
    let replicated: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(10_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(replicated, 1);

    let victim = cluster.master_of(&streams[0]);
    let survivor = cluster
        .masters()
        .into_iter()
        .map(|m| m.addr)
        .find(|m| *m != victim)
        .unwrap();
    // PUBLISH reaches every node: a subscriber on a master that stays up sees every message.
    let received =
        subscriber_at(&format!("redis://{survivor}"), &format!("{prefix}:fleet:*")).await;

    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let glob = format!("{prefix}:*");
    let on_cluster = |tuning: &str| {
        WorkerEnv::new(&glob, &db)
            .set("FLEET_REDIS_URL", &seeds)
            .set("FLEET_CONFIG", &config(tuning))
    };
    let mut persister = on_cluster("batch_size = 100").start("persister").await;
    let mut projector = on_cluster(
        "batch_size = 100\n[[route]]\npattern = \"flow.*.progress\"\nactions = [{ count = \"{tag}:count:{channel[1]}\" }]",
    )
    .unset("FLEET_DATABASE_URL")
    .start("projector")
    .await;
    let mut notifier = on_cluster(&format!(
        "batch_size = 100\n[[route]]\npattern = \"flow.*.progress\"\npublish = \"{prefix}:fleet:{{channel}}\""
    ))
    .unset("FLEET_DATABASE_URL")
    .start("notifier")
    .await;

    // Mid-load: the master of the first stream dies; its replica takes over.
    tokio::time::sleep(Duration::from_millis(random_between(200, 600))).await;
    let mut unsettled = 0;
    for group in [GROUP, "projector", "notifier"] {
        unsettled += lag(&mut conn, &streams[0], group).await.unwrap_or(1);
    }
    assert!(
        unsettled > 0,
        "the load was over before the failover: make it longer"
    );
    eprintln!(
        "failover with {unsettled} entries of {} not read yet",
        streams[0]
    );
    // What /readyz says meanwhile.
    let watch = {
        let http = persister.http.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..100 {
                if let Some((code, body)) = http_get(&http, "/readyz").await {
                    if code != 200 && !seen.contains(&body) {
                        seen.push(body);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        })
    };
    let successor = tokio::task::spawn_blocking(move || {
        cluster.kill_master(&victim);
        let successor = cluster.wait_failover(&victim);
        (cluster, successor)
    })
    .await
    .unwrap();
    let (cluster, successor) = successor;
    eprintln!("failover: {} took over", successor);

    for stream in &streams {
        wait_settled(&conn, stream, GROUP).await;
        wait_settled(&conn, stream, "projector").await;
        wait_settled(&conn, stream, "notifier").await;
    }
    // The persister: every strict event once, every malformed entry dead-lettered once.
    for (stream, c) in streams.iter().zip(&corpora) {
        conclude(
            "cluster failover: a master killed mid-load",
            &mut conn,
            &pool,
            stream,
            c,
        )
        .await;
    }
    // The projector: each flow's counter is its distinct events (producer retries included in
    // the corpus are caught by the dedup window).
    for (stream, c) in streams.iter().zip(&corpora) {
        let tag = &stream[stream.find('{').unwrap()..];
        let mut per_flow: HashMap<String, HashSet<String>> = HashMap::new();
        for (line, expect) in c.lines.iter().zip(&c.expected) {
            if let Expect::Valid { id, user: false } = expect {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                let flow = v["channel"]
                    .as_str()
                    .unwrap()
                    .split('.')
                    .nth(1)
                    .unwrap()
                    .to_owned();
                per_flow.entry(flow).or_default().insert(id.to_string());
            }
        }
        for (flow, ids) in &per_flow {
            let count: Option<i64> = redis::cmd("GET")
                .arg(format!("{tag}:count:{flow}"))
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(
                count.unwrap_or(0) as usize,
                ids.len(),
                "{stream}: flow {flow}"
            );
        }
    }
    // The notifier: every flow event at least once.
    let want: HashSet<String> = corpora
        .iter()
        .flat_map(|c| {
            c.expected.iter().filter_map(|e| match e {
                Expect::Valid { id, user: false } => Some(id.to_string()),
                _ => None,
            })
        })
        .collect();
    wait_until(
        Duration::from_secs(60),
        "every flow event published",
        || {
            let got: HashSet<String> = received
                .lock()
                .unwrap()
                .iter()
                .map(|(_, m)| m["id"].as_str().unwrap().to_owned())
                .collect();
            let done = want.is_subset(&got);
            async move { done }
        },
    )
    .await;
    // Every worker found the new master (its readers planned again), is ready, and drains on
    // SIGTERM with exit 0.
    let said = watch.await.unwrap();
    eprintln!("/readyz of the persister during the failover: {said:?}");
    assert!(
        said.iter().any(|body| body.contains("redis=false")),
        "/readyz never said Redis was unreachable: {said:?}"
    );
    for worker in [&mut persister, &mut projector, &mut notifier] {
        worker.wait_ready().await;
        assert!(
            worker.log_text().contains("planning the readers again"),
            "{}",
            worker.log_text()
        );
        worker.stop_cleanly().await;
    }
    drop(cluster);
}
