//! The deployment's least privilege, as shipped in deploy/: the persister runs under its Redis ACL
//! user (deploy/redis/users.acl) and its PostgreSQL role (deploy/postgres/roles.sql and the
//! migrations' grants), the setup steps under theirs, and what lies outside is refused.

use std::process::Command;
use std::time::Duration;

use sqlx::PgPool;
use streamfleet_tests::corpus;
use streamfleet_tests::scenario::{conclude, config, GROUP};
use streamfleet_tests::servers::PrivateRedis;
use streamfleet_tests::*;

/// The shipped ACL file with the test's key prefix and passwords.
fn acl_file(prefix: &str) -> String {
    let text = std::fs::read_to_string(repo_path("deploy/redis/users.acl")).unwrap();
    let text = text
        .replace("{app}", &format!("{{{prefix}}}"))
        .replace("CHANGE-ME-", "pw-");
    let path = std::env::temp_dir().join(format!("{}.acl", unique("users")));
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn url_as(url: &str, user: &str) -> String {
    url.replacen("redis://", &format!("redis://{user}:pw-{user}@"), 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_persister_runs_under_its_shipped_acl_user_and_role_and_nothing_more() {
    let prefix = unique("lp");
    let server = PrivateRedis::start_with(&["--aclfile".into(), acl_file(&prefix)]);
    let stream = format!("{{{prefix}}}:events");

    // PostgreSQL: the shipped roles, then the migrations as the owner (they grant the persister).
    let db = fresh_database().await;
    let out = Command::new("psql")
        .args([&db, "-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .args([
            "-v",
            "owner_password=pw-owner",
            "-v",
            "persister_password=pw-persister",
        ])
        .args(["-f", &repo_path("deploy/postgres/roles.sql")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "roles.sql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let owner_db = db.replacen("postgres@", "streamfleet_owner:pw-owner@", 1);
    let persister_db = db.replacen("postgres@", "streamfleet_persister:pw-persister@", 1);
    let setup =
        WorkerEnv::new(&stream, &owner_db).set("FLEET_REDIS_URL", &url_as(&server.url(), "setup"));
    let (status, stderr) = setup.run_to_end_with_args("fleetctl", &["migrate"]).await;
    assert!(status.success(), "migrate as the owner: {stderr}");
    let (status, stderr) = setup
        .run_to_end_with_args(
            "fleetctl",
            &["groups", "create", "--streams", &stream, "--group", GROUP],
        )
        .await;
    assert!(status.success(), "groups create as `setup`: {stderr}");

    // The persister under its own user and role: a mixed load lands exactly once.
    let corpus = corpus::mixed(3000, 5, 1);
    publish_lines_to(&server.url(), &stream, &corpus.lines).await;
    let mut worker = WorkerEnv::new(&stream, &persister_db)
        .set("FLEET_REDIS_URL", &url_as(&server.url(), "persister"))
        .set("FLEET_SKIP_MIGRATIONS", "true")
        .set("FLEET_CONFIG", &config("lag_interval_ms = 200\n"))
        .start("persister")
        .await;
    let mut admin = redis_at(&server.url()).await;
    let pool = PgPool::connect(&db).await.unwrap();
    streamfleet_tests::scenario::wait_settled(&admin, &stream, GROUP).await;
    conclude(
        "persister under its ACL user and role",
        &mut admin,
        &pool,
        &stream,
        &corpus,
    )
    .await;
    // The checkpoint reaches the last entry: the watermark script runs under the ACL too.
    streamfleet_tests::scenario::wait_checkpointed(&admin, &pool, &stream).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // a lag sample and a consumer clean-up
    let log = worker.log_text();
    assert!(
        !log.contains("NOPERM") && !log.contains("permission denied"),
        "{log}"
    );
    worker.stop_cleanly().await;

    // Inside its ACL: the commands its scripts run, which a load may not reach (XREVRANGE runs
    // only while entries are pending; a refusal there only stalls the checkpoint).
    let (dlq, trials) = (format!("{stream}:dlq"), format!("{stream}:trials"));
    let script_commands: [&[&str]; 11] = [
        &["XPENDING", &stream, GROUP],
        &["XREVRANGE", &stream, "+", "-", "COUNT", "1"],
        &["XINFO", "GROUPS", &stream],
        &["XINFO", "CONSUMERS", &stream, GROUP],
        &["XGROUP", "DELCONSUMER", &stream, GROUP, "gone"],
        &["XADD", &dlq, "*", "a", "1"],
        &["XACK", &stream, GROUP, "1-0"],
        &["HDEL", &trials, "f"],
        &["TYPE", &dlq],
        &[
            "EVALSHA",
            "0000000000000000000000000000000000000000",
            "1",
            &stream,
        ],
        &["SCRIPT", "LOAD", "return 1"],
    ];
    for args in script_commands {
        let verdict: String = redis::cmd("ACL")
            .arg("DRYRUN")
            .arg("persister")
            .arg(args)
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(
            verdict, "OK",
            "the persister's ACL refuses {args:?}: {verdict}"
        );
    }

    // Outside its ACL: other commands, other keys.
    let mut as_persister = redis_at(&url_as(&server.url(), "persister")).await;
    for cmd in [
        redis::cmd("FLUSHALL").clone(),
        redis::cmd("GET").arg(&stream).clone(),
        redis::cmd("XADD")
            .arg("other:events")
            .arg("*")
            .arg("a")
            .arg("1")
            .clone(),
        redis::cmd("DEL").arg(&stream).clone(),
    ] {
        let refused = cmd
            .query_async::<redis::Value>(&mut as_persister)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Some("NOPERM"), "{cmd:?}: {refused}");
    }
    // KEDA's user reads the lag, nothing more.
    let mut as_keda = redis_at(&url_as(&server.url(), "keda")).await;
    assert_eq!(lag(&mut as_keda, &stream, GROUP).await, Some(0));
    let refused = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("a")
        .arg("1")
        .query_async::<redis::Value>(&mut as_keda)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("NOPERM"));

    // Outside its role: no UPDATE or DELETE of events, no DDL.
    let role = PgPool::connect(&persister_db).await.unwrap();
    for sql in [
        "DELETE FROM events",
        "UPDATE events SET source = 'x'",
        "CREATE TABLE intruder (x int)",
        "DROP TABLE checkpoints",
    ] {
        let refused = sqlx::raw_sql(sql).execute(&role).await.unwrap_err();
        let code = refused
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        assert!(
            matches!(code.as_deref(), Some("42501") | Some("42P01")),
            "{sql}: {refused}"
        );
    }
}
