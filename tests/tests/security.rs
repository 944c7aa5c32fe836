//! Connections over TLS with credentials: Redis with TLS and an ACL user, PostgreSQL accepting
//! only TLS with the server certificate verified, and secrets never printed.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use sqlx::PgPool;
use streamfleet_tests::corpus;
use streamfleet_tests::servers::{Certs, PrivatePostgres, PrivateRedis};
use streamfleet_tests::*;

const USER: &str = "fleet";
const PASSWORD: &str = "pw-5ecret-9f2c";

async fn tls_redis(url: &str, certs: &Certs) -> MultiplexedConnection {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&certs.ca).unwrap()),
        },
    )
    .unwrap();
    client
        .get_multiplexed_async_connection_with_config(&slow_ok())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persister_over_tls_with_acl_user_and_verified_postgres_tls() {
    let certs = Certs::make();
    let redis_server = PrivateRedis::start_tls(&certs, USER, PASSWORD);
    let pg = PrivatePostgres::start_tls(&certs);
    let redis_url = format!("rediss://{USER}:{PASSWORD}@localhost:{}", redis_server.port);
    let database_url = format!(
        "postgres://postgres@localhost:{}/fleet?sslmode=verify-full&sslrootcert={}",
        pg.port,
        certs.ca.display()
    );
    let stream = unique("tls:");
    let corpus = corpus::mixed(2000, 5, 1);
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("cfg")));
    std::fs::write(
        &cfg,
        format!(
            "[tuning]\nmax_data_bytes = {}\n",
            corpus::TEST_MAX_DATA_BYTES
        ),
    )
    .unwrap();
    let env = WorkerEnv::new(&stream, &database_url)
        .set("FLEET_CONFIG", &cfg.display().to_string())
        .set("FLEET_REDIS_URL", &redis_url)
        .set("FLEET_REDIS_CA_FILE", &certs.ca.display().to_string());

    // fleetctl publishes over the same TLS connection settings.
    env.publish(&stream, &corpus.lines).await;

    let mut worker = env.start("persister").await;
    let conn = tls_redis(&redis_url, &certs).await;
    wait_until(Duration::from_secs(60), "the TLS load to drain", || {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move {
            lag(&mut conn, &stream, "persister").await == Some(0)
                && pending(&mut conn, &stream, "persister").await == 0
        }
    })
    .await;
    let pool = PgPool::connect(&format!(
        "postgres://postgres@localhost:{}/fleet?sslmode=require",
        pg.port
    ))
    .await
    .unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows as usize, corpus.expected_rows().len());
    // Every connection the server has is encrypted (it accepts no other kind).
    let plain: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_ssl WHERE NOT ssl AND pid <> pg_backend_pid()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(plain, 0);
    worker.stop_cleanly().await;
    assert!(
        !worker.log_text().contains(PASSWORD),
        "the password reached the log"
    );

    // --help never shows secret values from the environment.
    let help_out = std::process::Command::new(bin("persister"))
        .arg("--help")
        .env("FLEET_REDIS_URL", &redis_url)
        .env("FLEET_DATABASE_URL", "postgres://u:db-pa55@localhost/x")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&help_out.stdout);
    assert!(
        text.contains("FLEET_REDIS_URL") && !text.contains(PASSWORD) && !text.contains("db-pa55"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_or_plain_text_keep_the_worker_unready_and_the_password_unprinted() {
    let certs = Certs::make();
    let redis_server = PrivateRedis::start_tls(&certs, USER, PASSWORD);
    let db = fresh_database().await;
    let stream = unique("tlsbad:");
    for (url, ca) in [
        (
            format!(
                "rediss://{USER}:wrong-pa55word@localhost:{}",
                redis_server.port
            ),
            true,
        ),
        (
            format!("redis://{USER}:{PASSWORD}@localhost:{}", redis_server.port),
            false,
        ),
    ] {
        let http = free_addr();
        let mut env = WorkerEnv::new(&stream, &db)
            .set("FLEET_REDIS_URL", &url)
            .set("FLEET_HTTP_ADDR", &http);
        if ca {
            env = env.set("FLEET_REDIS_CA_FILE", &certs.ca.display().to_string());
        }
        let log = std::env::temp_dir().join(format!("{}.log", unique("bad")));
        let mut child = tokio::process::Command::new(bin("persister"))
            .env_clear()
            .envs(env.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Alive and answering, but not ready, for a few seconds: an outage is waited out.
        wait_until(Duration::from_secs(15), "/readyz to answer", || {
            let http = http.clone();
            async move { http_get(&http, "/readyz").await.is_some() }
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            http_get(&http, "/readyz").await.map(|(c, _)| c),
            Some(503),
            "{url}"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the worker must not exit on a Redis it cannot use"
        );
        child.kill().await.unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("unreachable"), "{text}");
        assert!(
            !text.contains("wrong-pa55word") && !text.contains(PASSWORD),
            "{text}"
        );
    }
}
