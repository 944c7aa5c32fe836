//! The workers on a Redis Cluster that speaks TLS alone, under the cluster overlay's ACL users
//! (deploy/kustomize/overlays/example-cluster/users.acl), the default user off: TLS and ACL users
//! work per node as on one server (issue 22, item 1). Given one node's `rediss://` URL and the CA
//! file, the persister lands every strict event of streams on every master once, fleetctl
//! publishes to them, and the projector applies `{tag}` effects in its streams' slots; with a
//! client certificate when the nodes ask for one. Every master serves each worker's reader, a
//! connection of its own verifying the node's certificate against the address the cluster
//! announces.

use std::time::Duration;

use redis::cluster_async::ClusterConnection;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use streamfleet_tests::corpus;
use streamfleet_tests::scenario::{conclude, config, wait_settled, GROUP};
use streamfleet_tests::servers::{Certs, PrivateCluster, CLUSTER_ADMIN, CLUSTER_ADMIN_PASSWORD};
use streamfleet_tests::*;

/// The cluster overlay's users with the test's key prefix instead of `app` (`~app:*` covers the
/// shards `app:events:{…}` and the projector's keys `app:{tag}:…`) and passwords `pw-<user>`.
fn overlay_users(prefix: &str) -> String {
    std::fs::read_to_string(repo_path(
        "deploy/kustomize/overlays/example-cluster/users.acl",
    ))
    .unwrap()
    .replace("~app:", &format!("~{prefix}:"))
    .replace("&app:", &format!("&{prefix}:"))
    .replace("CHANGE-ME-", "pw-")
}

/// A TLS cluster of 3 masters under the overlay's users, and how to reach it.
struct Secure {
    cluster: PrivateCluster,
    certs: Certs,
    /// The nodes ask for a client certificate (`certs`' own, see [`PrivateCluster::start_mtls`]).
    client_cert: bool,
}

impl Secure {
    fn start(prefix: &str, client_cert: bool) -> Self {
        let certs = Certs::make();
        let users = overlay_users(prefix);
        let cluster = if client_cert {
            PrivateCluster::start_mtls(3, &certs, &users)
        } else {
            PrivateCluster::start_tls(3, &certs, &users)
        };
        Secure {
            cluster,
            certs,
            client_cert,
        }
    }

    /// The CA, and the client certificate if the nodes ask for one.
    fn tls(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self.client_cert.then(|| redis::ClientTlsConfig {
                client_cert: std::fs::read(&self.certs.cert).unwrap(),
                client_key: std::fs::read(&self.certs.key).unwrap(),
            }),
            root_cert: Some(std::fs::read(&self.certs.ca).unwrap()),
        }
    }

    /// A cluster connection for the test's own checks, as the admin user.
    async fn admin(&self) -> ClusterConnection {
        redis::cluster::ClusterClientBuilder::new(vec![self
            .cluster
            .url_as(CLUSTER_ADMIN, CLUSTER_ADMIN_PASSWORD)])
        .certs(self.tls())
        .response_timeout(Duration::from_secs(30))
        .build()
        .unwrap()
        .get_async_connection()
        .await
        .expect("the TLS cluster as the admin user")
    }

    /// A connection to the node at `addr` alone (not routed), as the admin user.
    async fn node(&self, addr: &str) -> redis::aio::MultiplexedConnection {
        let url = format!("rediss://{CLUSTER_ADMIN}:{CLUSTER_ADMIN_PASSWORD}@{addr}");
        redis::Client::build_with_tls(url, self.tls())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// A worker (or fleetctl) on the cluster as `user`: one node's `rediss://` URL, the CA file,
    /// and the client certificate when asked for.
    fn as_user(&self, user: &str, streams: &str, db: &str) -> WorkerEnv {
        let env = WorkerEnv::new(streams, db)
            .set(
                "FLEET_REDIS_URL",
                &self.cluster.url_as(user, &format!("pw-{user}")),
            )
            .set("FLEET_REDIS_CA_FILE", &self.certs.ca.display().to_string());
        if !self.client_cert {
            return env;
        }
        env.set(
            "FLEET_REDIS_CLIENT_CERT",
            &self.certs.cert.display().to_string(),
        )
        .set(
            "FLEET_REDIS_CLIENT_KEY",
            &self.certs.key.display().to_string(),
        )
    }

    /// fleetctl as `operator`.
    fn operator(&self) -> WorkerEnv {
        self.as_user("operator", "unused", "")
            .unset("FLEET_DATABASE_URL")
    }

    /// Asserts that every master has a reader of each of `users`' workers: a connection of its
    /// own, named after the worker, blocked in XREADGROUP, authenticated as the worker's user.
    async fn assert_readers_on_every_master(&self, users: &[&str]) {
        for master in self.cluster.masters() {
            let clients: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(&mut self.node(&master.addr).await)
                .await
                .unwrap();
            for user in users {
                assert!(
                    clients.lines().any(|client| {
                        let field = |name: &str| {
                            client
                                .split(' ')
                                .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                                .unwrap_or_default()
                        };
                        field("user") == *user
                            && field("name").starts_with(&format!("streamfleet:{user}:"))
                            && field("cmd") == "xreadgroup"
                    }),
                    "a reader of the {user} on {}: {clients}",
                    master.addr
                );
            }
        }
    }
}

fn flow_line(flow: &str, i: usize) -> String {
    json!({"v": 1, "id": Uuid::now_v7().to_string(), "type": "flow.progress",
        "channel": format!("flow.{flow}.progress"), "source": "tests",
        "time": "2026-12-07T12:00:00Z", "data": {"i": i}})
    .to_string()
}

/// Publishes a mixed corpus to `<prefix>:events:{tag}` for each tag with fleetctl as `operator`,
/// runs the persister as `persister` over the glob until each stream is settled, and asserts
/// every strict event landed once. Returns the persister, still running.
async fn persist_on_every_master(secure: &Secure, prefix: &str, tags: &[String]) -> Worker {
    let mut conn = secure.admin().await;
    let db = fresh_database().await;
    let pool = PgPool::connect(&db).await.unwrap();
    let streams: Vec<String> = tags
        .iter()
        .map(|tag| format!("{prefix}:events:{{{tag}}}"))
        .collect();
    let corpora: Vec<corpus::Corpus> = streams.iter().map(|_| corpus::mixed(1_500, 5, 1)).collect();
    for (stream, c) in streams.iter().zip(&corpora) {
        secure.operator().publish(stream, &c.lines).await;
    }
    let persister = secure
        .as_user("persister", &format!("{prefix}:events:*"), &db)
        .set("FLEET_CONFIG", &config(""))
        .start("persister")
        .await;
    let scenario = if secure.client_cert {
        "cluster over TLS, client cert, ACL users"
    } else {
        "cluster over TLS, ACL users: 3 masters"
    };
    for (stream, c) in streams.iter().zip(&corpora) {
        wait_settled(&conn, stream, GROUP).await;
        conclude(scenario, &mut conn, &pool, stream, c).await;
    }
    persister
}

/// Asserts that `worker`'s log never showed the password of `user`.
fn assert_password_unprinted(worker: &Worker, user: &str) {
    assert!(
        !worker.log_text().contains(&format!("pw-{user}")),
        "the password reached the {user}'s log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_acl_users_work_on_every_node_of_a_cluster() {
    let prefix = unique("tlscl");
    let secure = Secure::start(&prefix, false);
    let mut conn = secure.admin().await;
    let tags = tags_per_master(&mut conn).await;
    assert_eq!(tags.len(), 3);

    // Nothing but TLS with a user: no plain port, and the default user is off.
    let mut anonymous = redis::Client::build_with_tls(secure.cluster.url(), secure.tls())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("a TLS connection without credentials");
    let refused: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut anonymous).await;
    assert!(refused.is_err(), "the default user is off: {refused:?}");

    // The projector, as `projector`, on streams of its own on every master: its keys start with
    // `{tag}` after the prefix, in the slot of the stream the event came from.
    let flows: Vec<String> = tags
        .iter()
        .map(|tag| format!("{prefix}:flows:{{{tag}}}"))
        .collect();
    let actions = format!(
        r#"{{ latest = "{prefix}:{{tag}}:state:{{channel[1]}}" }}, {{ count = "{prefix}:{{tag}}:count:{{channel[1]}}" }}"#
    );
    let per_stream = 500;
    for stream in &flows {
        let lines: Vec<String> = (0..per_stream)
            .map(|i| flow_line(&format!("f{}", i % 7), i))
            .collect();
        secure.operator().publish(stream, &lines).await;
    }
    let mut projector = secure
        .as_user("projector", &format!("{prefix}:flows:*"), "")
        .unset("FLEET_DATABASE_URL")
        .set(
            "FLEET_CONFIG",
            &config(&format!(
                "[[route]]\npattern = \"flow.*.progress\"\nactions = [{actions}]"
            )),
        )
        .start("projector")
        .await;

    // The persister, as `persister`, on streams on every master, published by fleetctl as
    // `operator`.
    let mut persister = persist_on_every_master(&secure, &prefix, &tags).await;

    for stream in &flows {
        wait_settled(&conn, stream, "projector").await;
    }
    for (tag, stream) in tags.iter().zip(&flows) {
        let mut total = 0;
        for f in 0..7 {
            let count: i64 = redis::cmd("GET")
                .arg(format!("{prefix}:{{{tag}}}:count:f{f}"))
                .query_async(&mut conn)
                .await
                .unwrap();
            total += count;
            let event: String = redis::cmd("HGET")
                .arg(format!("{prefix}:{{{tag}}}:state:f{f}"))
                .arg("event")
                .query_async(&mut conn)
                .await
                .unwrap();
            let event: serde_json::Value = serde_json::from_str(&event).unwrap();
            let last = (0..per_stream).rev().find(|i| i % 7 == f).unwrap();
            assert_eq!(event["data"]["i"], last, "{stream} f{f}");
        }
        assert_eq!(
            total as usize, per_stream,
            "{stream}: every event counted once"
        );
    }

    secure
        .assert_readers_on_every_master(&["persister", "projector"])
        .await;
    persister.stop_cleanly().await;
    projector.stop_cleanly().await;
    assert_password_unprinted(&persister, "persister");
    assert_password_unprinted(&projector, "projector");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_reaches_every_node_of_a_cluster_that_asks_for_one() {
    let prefix = unique("mtlscl");
    let secure = Secure::start(&prefix, true);
    let mut conn = secure.admin().await;
    let tags = tags_per_master(&mut conn).await;

    // Without a client certificate, no connection (the CA and the user are right).
    let no_cert = redis::Client::build_with_tls(
        secure.cluster.url_as(CLUSTER_ADMIN, CLUSTER_ADMIN_PASSWORD),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&secure.certs.ca).unwrap()),
        },
    )
    .unwrap();
    let refused = async {
        let mut c = no_cert.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut c).await
    }
    .await;
    assert!(refused.is_err(), "a node without client auth: {refused:?}");

    let mut persister = persist_on_every_master(&secure, &prefix, &tags).await;
    secure.assert_readers_on_every_master(&["persister"]).await;
    persister.stop_cleanly().await;
    assert_password_unprinted(&persister, "persister");
}
