//! The PrivateCluster harness itself: a key on every master, a master killed, its replica
//! promoted, every key read back through a cluster client, the old master back as a replica.

use redis::AsyncCommands;
use streamfleet_tests::servers::PrivateCluster;
use streamfleet_tests::unique;

#[tokio::test]
async fn a_private_cluster_fails_over_and_takes_its_old_master_back() {
    let mut cluster = PrivateCluster::start(3);
    let masters: Vec<String> = cluster.masters().into_iter().map(|m| m.addr).collect();
    assert_eq!(masters.len(), 3);
    assert_eq!(cluster.replicas().len(), 3);
    assert_eq!(cluster.url(), format!("redis://{}", masters[0]));

    // One key per master. The tags are picked by their master: {0}, {1}, {2} are not on three
    // masters (slots 13907, 9842, 5649: {1} and {2} share the second master).
    let prefix = unique("harness:");
    let keys: Vec<String> = masters
        .iter()
        .map(|master| {
            (0..100)
                .map(|tag| format!("{prefix}:{{{tag}}}"))
                .find(|key| cluster.master_of(key) == *master)
                .expect("a tag on every master")
        })
        .collect();

    let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("cluster client");
    let mut conn = client.get_async_connection().await.expect("connect");
    for key in &keys {
        let () = conn.set(key, key).await.expect("SET");
    }
    // Asynchronous replication: the writes are on the replicas before a master is killed.
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut conn)
        .await
        .expect("WAIT");
    assert_eq!(acked, 1, "every master's replica has the writes");

    let victim = cluster.master_of(&keys[0]);
    cluster.kill_master(&victim);
    let successor = cluster.wait_failover(&victim);
    assert_ne!(successor, victim);
    assert_eq!(cluster.master_of(&keys[0]), successor);
    assert_eq!(cluster.masters().len(), 3);

    for key in &keys {
        let value: Option<String> = conn.get(key).await.expect("GET after the failover");
        assert_eq!(value.as_deref(), Some(key.as_str()));
    }

    cluster.restart(&victim);
    let replicas: Vec<String> = cluster.replicas().into_iter().map(|m| m.addr).collect();
    assert!(replicas.contains(&victim), "{victim} in {replicas:?}");
    assert_eq!(cluster.master_of(&keys[0]), successor);
}
