//! The deployment's least privilege, as shipped in deploy/: the persister runs under its Redis ACL
//! user (deploy/redis/users.acl) and its PostgreSQL role (deploy/postgres/roles.sql and the
//! migrations' grants), the projector and the notifier under their Redis ACL users alone, the
//! setup steps under theirs, and what lies outside is refused.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

use sqlx::PgPool;
use streamfleet_tests::corpus::{self, Expect};
use streamfleet_tests::scenario::{
    conclude, config, wait_checkpointed_in_redis, wait_settled, GROUP,
};
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

/// The projector's group (its default, and the deployment's FLEET_GROUP).
const PROJECTOR_GROUP: &str = "projector";

/// The commands `effects.lua` issues (`call`, `try`, `chunked`, `must` with a literal name).
fn effects_commands() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo_path("workers/projector/src/effects.lua")).unwrap();
    let mut out = BTreeSet::new();
    for head in ["call('", "try('", "chunked('", "must('"] {
        for (at, _) in text.match_indices(head) {
            let name: String = text[at + head.len()..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase())
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_runs_under_its_shipped_acl_user_and_nothing_more() {
    let prefix = unique("lpp");
    let server = PrivateRedis::start_with(&["--aclfile".into(), acl_file(&prefix)]);
    let stream = format!("{{{prefix}}}:events");
    let mut admin = redis_at(&server.url()).await;

    // The keys of the shipped example's shape: every template starts with the stream's hash tag
    // (`{{prefix}}` renders `{prefix}`), invalidated keys under `{prefix}:cache:`.
    let cfg = config(
        &r#"lag_interval_ms = 200
[[route]]
pattern = "flow.*.progress"
actions = [
  { latest = "{{TAG}}:flow:{channel[1]}:state" },
  { invalidate = ["{{TAG}}:cache:flow:{channel[1]}"] },
  { count = "{{TAG}}:count:{channel[1]}" },
  { history = "{{TAG}}:flow:{channel[1]}:history", maxlen = 100000 },
]
"#
        .replace("TAG", &prefix),
    );
    let state = |flow: &str| format!("{{{prefix}}}:flow:{flow}:state");
    let cache = |flow: &str| format!("{{{prefix}}}:cache:flow:{flow}");
    let count = |flow: &str| format!("{{{prefix}}}:count:{flow}");
    let history = |flow: &str| format!("{{{prefix}}}:flow:{flow}:history");

    // The setup Job's step, as shipped: the projector's group, as `setup`, with no database.
    let setup = WorkerEnv::new(&stream, "")
        .unset("FLEET_DATABASE_URL")
        .set("FLEET_REDIS_URL", &url_as(&server.url(), "setup"));
    let (status, stderr) = setup
        .run_to_end_with_args(
            "fleetctl",
            &[
                "groups",
                "create",
                "--streams",
                &stream,
                "--group",
                PROJECTOR_GROUP,
                "--start-from",
                "oldest",
            ],
        )
        .await;
    assert!(status.success(), "groups create as `setup`: {stderr}");

    // A mixed load: flow events (projected), user events (no route: skipped), producer retries
    // (the dedup window), malformed entries (dead letters).
    let corpus = corpus::mixed(3000, 5, 1);
    let mut ids: HashMap<String, HashSet<String>> = HashMap::new();
    for (line, expect) in corpus.lines.iter().zip(&corpus.expected) {
        if let Expect::Valid { id, user: false } = expect {
            let event: serde_json::Value = serde_json::from_str(line).unwrap();
            let flow = event["channel"]
                .as_str()
                .unwrap()
                .split('.')
                .nth(1)
                .unwrap();
            ids.entry(flow.to_owned())
                .or_default()
                .insert(id.to_string());
        }
    }
    let dead = corpus
        .expected
        .iter()
        .filter(|e| matches!(e, Expect::Dead(_)))
        .count();
    assert!(
        ids.len() > 50 && dead > 10,
        "{} flows, {dead} dead",
        ids.len()
    );
    // Cached entries to invalidate, and one of a flow with no event, which stays.
    for flow in ids.keys().map(String::as_str).chain(["none"]) {
        let _: () = redis::cmd("SET")
            .arg(cache(flow))
            .arg("stale")
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    publish_lines_to(&server.url(), &stream, &corpus.lines).await;

    // The projector under its own user only (no database at all).
    let mut worker = WorkerEnv::new(&stream, "")
        .unset("FLEET_DATABASE_URL")
        .set("FLEET_REDIS_URL", &url_as(&server.url(), "projector"))
        .set("FLEET_GROUP", PROJECTOR_GROUP)
        .set("FLEET_CONFIG", &cfg)
        .start("projector")
        .await;
    wait_settled(&admin, &stream, PROJECTOR_GROUP).await;

    // Every effect, each event once. (A command the ACL refuses inside the script, after it
    // acknowledged entries, shows here: their later effects are missing, yet nothing is pending.)
    for (flow, flow_ids) in &ids {
        let n: Option<usize> = redis::cmd("GET")
            .arg(count(flow))
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(
            n,
            Some(flow_ids.len()),
            "count of flow {flow}:\n{}",
            worker.log_text()
        );
        let appended: Vec<String> = read_stream(&mut admin, &history(flow))
            .await
            .into_iter()
            .map(|(_, f)| {
                let event: serde_json::Value = serde_json::from_str(&f["event"]).unwrap();
                event["id"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(appended.len(), flow_ids.len(), "history of flow {flow}");
        assert_eq!(&appended.iter().cloned().collect::<HashSet<_>>(), flow_ids);
        let latest: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(state(flow))
            .query_async(&mut admin)
            .await
            .unwrap();
        let event: serde_json::Value = serde_json::from_str(&latest["event"]).unwrap();
        assert!(
            flow_ids.contains(event["id"].as_str().unwrap()),
            "{latest:?}"
        );
        assert_eq!(latest["stream"], stream);
        let cached: bool = redis::cmd("EXISTS")
            .arg(cache(flow))
            .query_async(&mut admin)
            .await
            .unwrap();
        assert!(!cached, "{} not invalidated", cache(flow));
    }
    let kept: bool = redis::cmd("EXISTS")
        .arg(cache("none"))
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(kept, "an unrelated cache key was deleted");
    let dead_letters: usize = redis::cmd("XLEN")
        .arg(format!("{stream}:dlq"))
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(dead_letters, dead, "dead letters");
    // The checkpoint reaches the last entry, in Redis (the projector has no database).
    wait_checkpointed_in_redis(&admin, &stream, PROJECTOR_GROUP).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // a lag sample and a consumer clean-up
                                                          // A command refused inside the script is not a NOPERM reply but an error of the script.
    let log = worker.log_text();
    for refusal in [
        "NOPERM",
        "NoPerm",
        "no permissions",
        "can't run this command",
    ] {
        assert!(!log.contains(refusal), "{refusal}:\n{log}");
    }
    let (code, body) = worker.readyz().await;
    assert_eq!(code, 200, "{body}");
    worker.stop_cleanly().await;

    // Inside its ACL: every command its scripts can run, also on paths this load did not take
    // (a history append refused: XDEL, XCLAIM ... FORCE; a key's type read: TYPE, GET).
    let (dlq, trials, checkpoints) = (
        format!("{stream}:dlq"),
        format!("{stream}:trials"),
        format!("{stream}:checkpoints"),
    );
    let dedup = format!("{stream}:dedup:{PROJECTOR_GROUP}:5900000");
    let (state, cache, count, history) = (state("f"), cache("f"), count("f"), history("f"));
    let allowed: Vec<Vec<&str>> = vec![
        // effects.lua
        vec!["XACK", &stream, PROJECTOR_GROUP, "1-0"],
        vec!["TYPE", &count],
        vec!["GET", &count],
        vec!["HGET", &state, "version"],
        vec!["SMISMEMBER", &dedup, "a", "b"],
        vec!["SADD", &dedup, "a"],
        vec!["EXPIRE", &dedup, "300"],
        vec!["XADD", &history, "MAXLEN", "~", "10", "*", "event", "{}"],
        vec!["XDEL", &history, "1-0"],
        vec![
            "XCLAIM",
            &stream,
            PROJECTOR_GROUP,
            "c1",
            "0",
            "1-0",
            "FORCE",
            "JUSTID",
        ],
        vec!["DEL", &cache],
        vec!["HSET", &state, "event", "{}", "version", "e1"],
        vec!["INCRBY", &count, "3"],
        vec!["EXPIRE", &count, "60"],
        vec!["EXPIRE", &history, "60"],
        vec!["HGET", &checkpoints, PROJECTOR_GROUP],
        vec!["HSET", &checkpoints, PROJECTOR_GROUP, "1-0"],
        // latest's TTLs, projections and groups.
        vec!["HDEL", &state, "status"],
        vec!["PERSIST", &state],
        vec!["TIME"],
        vec!["ZADD", &cache, "inf", &state],
        vec!["ZRANGE", &cache, "-1", "-1", "WITHSCORES"],
        vec!["ZREMRANGEBYSCORE", &cache, "-inf", "(1"],
        vec!["PEXPIREAT", &cache, "1"],
        // The pipeline's scripts and calls, as for the persister.
        vec!["XPENDING", &stream, PROJECTOR_GROUP],
        vec!["XREVRANGE", &stream, "+", "-", "COUNT", "1"],
        vec!["XINFO", "GROUPS", &stream],
        vec!["XINFO", "CONSUMERS", &stream, PROJECTOR_GROUP],
        vec!["XGROUP", "DELCONSUMER", &stream, PROJECTOR_GROUP, "gone"],
        vec!["XADD", &dlq, "*", "a", "1"],
        vec!["TYPE", &dlq],
        vec!["HSET", &trials, "f", "1"],
        vec!["HDEL", &trials, "f"],
        vec![
            "EVALSHA",
            "0000000000000000000000000000000000000000",
            "2",
            &stream,
            &checkpoints,
        ],
        vec!["SCRIPT", "LOAD", "return 1"],
    ];
    let tried: BTreeSet<String> = allowed.iter().map(|a| a[0].to_owned()).collect();
    let untried: Vec<String> = effects_commands().difference(&tried).cloned().collect();
    assert!(
        untried.is_empty(),
        "effects.lua runs {untried:?}: dry-run them here (and grant them in deploy/redis/users.acl)"
    );
    for args in &allowed {
        let verdict: String = redis::cmd("ACL")
            .arg("DRYRUN")
            .arg("projector")
            .arg(args)
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(
            verdict, "OK",
            "the projector's ACL refuses {args:?}: {verdict}"
        );
    }

    // Outside its ACL: other keys (also as the keys of its script: refused before it runs, so
    // nothing of a batch is applied), other commands.
    let mut as_projector = redis_at(&url_as(&server.url(), "projector")).await;
    for cmd in [
        redis::cmd("GET").arg("other:key").clone(),
        redis::cmd("GET").arg("{other}:flow:f:state").clone(),
        redis::cmd("DEL").arg("{other}:cache:flow:f").clone(),
        redis::cmd("EVALSHA")
            .arg("0000000000000000000000000000000000000000")
            .arg(2)
            .arg(&stream)
            .arg("{other}:count:f")
            .clone(),
        redis::cmd("SET")
            .arg(format!("{{{prefix}}}:x"))
            .arg("1")
            .clone(),
        redis::cmd("EVAL").arg("return 1").arg(0).clone(),
        redis::cmd("FLUSHALL").clone(),
        redis::cmd("XADD")
            .arg("other:events")
            .arg("*")
            .arg("a")
            .arg("1")
            .clone(),
    ] {
        let refused = cmd
            .query_async::<redis::Value>(&mut as_projector)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Some("NOPERM"), "{cmd:?}: {refused}");
    }
}

/// The notifier's group (its default, and the deployment's FLEET_GROUP).
const NOTIFIER_GROUP: &str = "notifier";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notifier_runs_under_its_shipped_acl_user_and_nothing_more() {
    let prefix = unique("lpn");
    let server = PrivateRedis::start_with(&["--aclfile".into(), acl_file(&prefix)]);
    let stream = format!("{{{prefix}}}:events");
    let mut admin = redis_at(&server.url()).await;

    // The shipped configuration, as is, with the test's prefix: flow.*.progress published on
    // `{{prefix}}:fleet:{channel}`, which renders `{prefix}:fleet:flow.<n>.progress`.
    let shipped =
        std::fs::read_to_string(repo_path("deploy/kustomize/base/notifier/fleet.toml")).unwrap();
    assert!(shipped.contains("{{app}}:fleet:{channel}"), "{shipped}");
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("notifier")));
    std::fs::write(
        &cfg,
        shipped.replace("{{app}}", &format!("{{{{{prefix}}}}}")),
    )
    .unwrap();
    let channel_pattern = format!("{{{prefix}}}:fleet:*");

    // The setup Job's step, as shipped: the notifier's group, as `setup`, with no database.
    let setup = WorkerEnv::new(&stream, "")
        .unset("FLEET_DATABASE_URL")
        .set("FLEET_REDIS_URL", &url_as(&server.url(), "setup"));
    let (status, stderr) = setup
        .run_to_end_with_args(
            "fleetctl",
            &[
                "groups",
                "create",
                "--streams",
                &stream,
                "--group",
                NOTIFIER_GROUP,
                "--start-from",
                "newest",
            ],
        )
        .await;
    assert!(status.success(), "groups create as `setup`: {stderr}");

    // The notifier user may not subscribe (it only publishes): a subscribers' user of the shape
    // deploy/redis/README.md documents does, on exactly the notifier's channel pattern.
    let as_notifier_client = redis::Client::open(url_as(&server.url(), "notifier")).unwrap();
    let mut refused_sub = as_notifier_client.get_async_pubsub().await.unwrap();
    let refused = refused_sub.psubscribe(&channel_pattern).await.unwrap_err();
    assert_eq!(refused.code(), Some("NOPERM"), "{refused}");
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("fanout")
        .arg("on")
        .arg(">pw-fanout")
        .arg("resetkeys")
        .arg("resetchannels")
        .arg(format!("&{channel_pattern}"))
        .arg("-@all")
        .arg("+auth")
        .arg("+hello")
        .arg("+ping")
        .arg("+subscribe")
        .arg("+psubscribe")
        .arg("+unsubscribe")
        .arg("+punsubscribe")
        .query_async(&mut admin)
        .await
        .unwrap();
    let received = subscriber_at(&url_as(&server.url(), "fanout"), &channel_pattern).await;

    // The notifier under its own user only (no database at all).
    let mut worker = WorkerEnv::new(&stream, "")
        .unset("FLEET_DATABASE_URL")
        .set("FLEET_REDIS_URL", &url_as(&server.url(), "notifier"))
        .set("FLEET_GROUP", NOTIFIER_GROUP)
        .set("FLEET_CONFIG", &cfg.display().to_string())
        .start("notifier")
        .await;

    // Flow events (published), user events (no route: acknowledged with no effect), malformed
    // entries (dead letters), after the group was created at the stream's end.
    let corpus = corpus::mixed(2000, 5, 1);
    let mut flows: HashMap<String, String> = HashMap::new(); // event id -> its channel
    for (line, expect) in corpus.lines.iter().zip(&corpus.expected) {
        if let Expect::Valid { id, user: false } = expect {
            let event: serde_json::Value = serde_json::from_str(line).unwrap();
            let channel = event["channel"].as_str().unwrap().to_owned();
            if channel.starts_with("flow.") && channel.ends_with(".progress") {
                flows.insert(id.to_string(), channel);
            }
        }
    }
    assert!(flows.len() > 100, "{} flow progress events", flows.len());
    publish_lines_to(&server.url(), &stream, &corpus.lines).await;
    wait_settled(&admin, &stream, NOTIFIER_GROUP).await;

    // Every flow progress event received (at least once), on its channel, with its stream.
    wait_until(Duration::from_secs(60), "every flow event received", || {
        let (received, want) = (received.clone(), flows.len());
        async move {
            let got: HashSet<String> = received
                .lock()
                .unwrap()
                .iter()
                .map(|(_, m)| m["id"].as_str().unwrap_or_default().to_owned())
                .collect();
            got.len() >= want
        }
    })
    .await;
    for (channel, message) in received.lock().unwrap().iter() {
        let id = message["id"].as_str().unwrap();
        let flow = flows
            .get(id)
            .unwrap_or_else(|| panic!("{id} is not a flow progress event: {message}"));
        assert_eq!(channel, &format!("{{{prefix}}}:fleet:{flow}"));
        assert_eq!(message["stream"], stream.as_str());
        assert!(message["entry_id"].is_string(), "{message}");
    }

    // The checkpoint reaches the last entry, in `<stream>:checkpoints` (the notifier has no
    // database): the checkpoint script ran under the notifier user.
    wait_checkpointed_in_redis(&admin, &stream, NOTIFIER_GROUP).await;
    let dead = corpus
        .expected
        .iter()
        .filter(|e| matches!(e, Expect::Dead(_)))
        .count();
    let dead_letters: usize = redis::cmd("XLEN")
        .arg(format!("{stream}:dlq"))
        .query_async(&mut admin)
        .await
        .unwrap();
    // Malformed entries dead-lettered under the notifier's user (the shipped configuration keeps
    // the default max_data_bytes, so the corpus's oversized entries pass: fewer than the test's).
    assert!(
        dead_letters > 0 && dead_letters <= dead,
        "{dead_letters} dead letters, {dead} malformed at most"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = worker.log_text();
    for refusal in [
        "NOPERM",
        "NoPerm",
        "no permissions",
        "can't run this command",
    ] {
        assert!(!log.contains(refusal), "{refusal}:\n{log}");
    }
    let (code, body) = worker.readyz().await;
    assert_eq!(code, 200, "{body}");
    worker.stop_cleanly().await;

    // Outside its ACL: a channel outside its pattern (the default `fleet:{channel}` among them),
    // the projector's effect commands, other keys, subscribing.
    let mut as_notifier = redis_at(&url_as(&server.url(), "notifier")).await;
    let n: usize = redis::cmd("PUBLISH")
        .arg(format!("{{{prefix}}}:fleet:flow.x.progress"))
        .arg("{}")
        .query_async(&mut as_notifier)
        .await
        .unwrap();
    assert_eq!(n, 1, "the subscriber receives a channel inside the pattern");
    for cmd in [
        redis::cmd("PUBLISH")
            .arg("fleet:flow.x.progress")
            .arg("{}")
            .clone(),
        redis::cmd("PUBLISH")
            .arg(format!("{{{prefix}}}:other"))
            .arg("{}")
            .clone(),
        redis::cmd("PUBLISH")
            .arg("{other}:fleet:flow.x.progress")
            .arg("{}")
            .clone(),
        redis::cmd("INCRBY")
            .arg(format!("{{{prefix}}}:x"))
            .arg(1)
            .clone(),
        redis::cmd("DEL").arg(format!("{{{prefix}}}:x")).clone(),
        redis::cmd("SADD")
            .arg(format!("{{{prefix}}}:x"))
            .arg("a")
            .clone(),
        redis::cmd("HGET")
            .arg("other:checkpoints")
            .arg("notifier")
            .clone(),
        redis::cmd("EVAL").arg("return 1").arg(0).clone(),
        redis::cmd("FLUSHALL").clone(),
    ] {
        let refused = cmd
            .query_async::<redis::Value>(&mut as_notifier)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Some("NOPERM"), "{cmd:?}: {refused}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleetctl_runs_under_the_shipped_operator_user() {
    let prefix = unique("lpo");
    let server = PrivateRedis::start_with(&["--aclfile".into(), acl_file(&prefix)]);
    let stream = format!("{{{prefix}}}:events");
    let mut admin = redis_at(&server.url()).await;
    // A stream with a group whose consumer holds entries, and one dead letter of that group.
    let ids: Vec<String> = (0..5).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    for (i, id) in ids.iter().enumerate() {
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg(&[
                ("v", "1"),
                ("id", id),
                ("type", "user.updated"),
                ("channel", "user.1.profile"),
                ("source", "tests"),
                ("time", "2026-11-26T10:00:00Z"),
                ("data", if i == 0 { "{\"a\":1}" } else { "{}" }),
            ])
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    create_group(&mut admin, &stream, "g").await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("c1")
        .arg("COUNT")
        .arg(3)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(format!("{stream}:dlq"))
        .arg("*")
        .arg(&[
            ("v", "1"),
            ("id", &uuid::Uuid::now_v7().to_string()),
            ("type", "user.updated"),
            ("channel", "user.2.profile"),
            ("source", "tests"),
            ("time", "2026-11-26T10:00:00Z"),
            ("data", "{}"),
            ("dlq_reason", "handler_error"),
            ("dlq_error", "rejected"),
            ("dlq_stream", &stream),
            ("dlq_entry_id", "1-1"),
            ("dlq_group", "g"),
            ("dlq_deliveries", "1"),
            ("dlq_at", "2026-11-26T10:00:01Z"),
        ])
        .query_async(&mut admin)
        .await
        .unwrap();

    let operator = WorkerEnv::new(&stream, "")
        .unset("FLEET_DATABASE_URL")
        .set("FLEET_REDIS_URL", &url_as(&server.url(), "operator"));
    let glob = format!("{{{prefix}}}:*");
    for args in [
        vec!["status", "--streams", &stream],
        vec!["lag", "--streams", &glob],
        vec!["pending", "--streams", &stream],
        vec!["checkpoints", "--streams", &stream],
        vec!["tail", "--stream", &stream, "--from", "-", "--count", "2"],
        vec!["trace", &ids[0], "--streams", &stream],
        vec!["dlq", "list", "--stream", &stream],
        vec!["dlq", "redrive", "--stream", &stream, "--all"],
        vec![
            "replay", "--stream", &stream, "--group", "g", "--to-id", "0-0", "--force",
        ],
        vec![
            "publish",
            "--stream",
            &stream,
            "--type",
            "user.x",
            "--channel",
            "user.3",
        ],
        vec!["dlq", "purge", "--stream", &stream, "--all"],
    ] {
        let (status, stderr) = operator.run_to_end_with_args("fleetctl", &args).await;
        assert!(
            status.success() && !stderr.contains("NOPERM"),
            "fleetctl {args:?} as `operator`: {stderr}"
        );
    }
    // A user who may add to the stream but not delete dead letters redrives nothing (a script
    // stopped half-way would keep its XADD).
    let dead = |conn: &mut redis::aio::MultiplexedConnection, key: String| {
        let mut c = redis::cmd("XLEN");
        c.arg(key);
        let mut conn = conn.clone();
        async move { c.query_async::<u64>(&mut conn).await.unwrap() }
    };
    let _: String = redis::cmd("XADD")
        .arg(format!("{stream}:dlq"))
        .arg("*")
        .arg(&[
            ("v", "1"),
            ("dlq_stream", stream.as_str()),
            ("dlq_group", "g"),
        ])
        .query_async(&mut admin)
        .await
        .unwrap();
    let acl_line = std::fs::read_to_string(acl_file(&prefix)).unwrap();
    let operator_rules = acl_line
        .lines()
        .find(|l| l.starts_with("user operator "))
        .unwrap()
        .replace("user operator ", "")
        .replace(" +xdel", "");
    let mut setuser = redis::cmd("ACL");
    setuser.arg("SETUSER").arg("no_xdel");
    for rule in operator_rules.split_whitespace() {
        setuser.arg(rule.replace(">pw-operator", ">pw-no_xdel"));
    }
    let () = setuser.query_async(&mut admin).await.unwrap();
    let before = (
        dead(&mut admin, format!("{stream}:dlq")).await,
        dead(&mut admin, stream.clone()).await,
    );
    let (status, stderr) = operator
        .clone()
        .set("FLEET_REDIS_URL", &url_as(&server.url(), "no_xdel"))
        .run_to_end_with_args(
            "fleetctl",
            &["dlq", "redrive", "--stream", &stream, "--all"],
        )
        .await;
    assert!(
        !status.success() && stderr.contains("nothing redriven"),
        "{stderr}"
    );
    let after = (
        dead(&mut admin, format!("{stream}:dlq")).await,
        dead(&mut admin, stream.clone()).await,
    );
    assert_eq!(before, after, "nothing moved, nothing doubled");

    // What it may not do.
    let operator_conn = redis_at(&url_as(&server.url(), "operator")).await;
    for cmd in [
        redis::cmd("FLUSHALL"),
        {
            let mut c = redis::cmd("XGROUP");
            c.arg("DESTROY").arg(&stream).arg("g");
            c
        },
        {
            let mut c = redis::cmd("XREADGROUP");
            c.arg("GROUP")
                .arg("g")
                .arg("c2")
                .arg("STREAMS")
                .arg(&stream)
                .arg(">");
            c
        },
        {
            let mut c = redis::cmd("DEL");
            c.arg(&stream);
            c
        },
    ] {
        let refused: redis::RedisResult<redis::Value> =
            cmd.query_async(&mut operator_conn.clone()).await;
        assert!(
            matches!(&refused, Err(e) if e.code() == Some("NOPERM")),
            "{refused:?}"
        );
    }
}

/// A shipped FLEET_CONFIG with the test's prefix for `{{app}}`.
fn shipped_config(worker: &str, prefix: &str) -> String {
    let shipped = std::fs::read_to_string(repo_path(&format!(
        "deploy/kustomize/base/{worker}/fleet.toml"
    )))
    .unwrap();
    let path = std::env::temp_dir().join(format!("{}.toml", unique(worker)));
    std::fs::write(
        &path,
        shipped.replace("{{app}}", &format!("{{{{{prefix}}}}}")),
    )
    .unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_runs_under_its_shipped_acl_user_and_nothing_more() {
    let prefix = unique("lpg");
    let server = PrivateRedis::start_with(&["--aclfile".into(), acl_file(&prefix)]);
    let stream = format!("{{{prefix}}}:events");
    let registry = format!("{{{prefix}}}:gateways");
    let mut admin = redis_at(&server.url()).await;
    let setup = WorkerEnv::new(&stream, "")
        .unset("FLEET_DATABASE_URL")
        .set("FLEET_REDIS_URL", &url_as(&server.url(), "setup"));
    for group in [PROJECTOR_GROUP, NOTIFIER_GROUP] {
        let args = [
            "groups",
            "create",
            "--streams",
            &stream,
            "--group",
            group,
            "--start-from",
            "oldest",
        ];
        let (status, stderr) = setup.run_to_end_with_args("fleetctl", &args).await;
        assert!(status.success(), "groups create as `setup`: {stderr}");
    }
    // The projector, the notifier and the gateway under their own users, shipped configurations.
    let worker = |name: &str| {
        WorkerEnv::new(&stream, "")
            .unset("FLEET_DATABASE_URL")
            .set("FLEET_REDIS_URL", &url_as(&server.url(), name))
            .set("FLEET_CONFIG", &shipped_config(name, &prefix))
    };
    let mut projector = worker("projector").start("projector").await;
    let mut notifier = worker("notifier").start("notifier").await;
    let mut gateway = worker("gateway")
        .unset("FLEET_STREAMS")
        .unset("FLEET_CONSUMER")
        .set("FLEET_GATEWAY_ANONYMOUS_TOPICS", "flow.#")
        .set("FLEET_GATEWAY_REGISTRY_KEY", &registry)
        .set("FLEET_GATEWAY_REGISTRY_INTERVAL_MS", "200")
        .set("FLEET_GATEWAY_INSTANCE", "gw")
        .start("gateway")
        .await;
    let events = |range: std::ops::Range<u32>| -> Vec<String> {
        range
            .map(|i| {
                streamfleet_tests::projector::flow_event(
                    uuid::Uuid::now_v7(),
                    "f1",
                    &format!("2026-12-07T00:{:02}:{:02}Z", i / 60, i % 60),
                    serde_json::json!({"i": i}),
                )
            })
            .collect()
    };
    let numbers = |messages: &[streamfleet_tests::sse::Message]| -> Vec<u64> {
        messages
            .iter()
            .map(|m| m.json()["data"]["i"].as_u64().unwrap())
            .collect()
    };
    let open = |path: String, last: Option<String>| {
        let http = gateway.http.clone();
        async move {
            let headers: Vec<(&str, &str)> =
                last.iter().map(|l| ("Last-Event-ID", l.as_str())).collect();
            let c = streamfleet_tests::sse::connect(&http, &path, &headers)
                .await
                .unwrap();
            assert_eq!(c.status, 200);
            c
        }
    };
    let wait = Duration::from_secs(20);

    // Live: an exact topic (SUBSCRIBE) and a wildcard one (PSUBSCRIBE).
    let mut exact = open("/events?topic=flow.f1.progress".into(), None).await;
    let mut wide = open("/events?topic=flow.*.progress".into(), None).await;
    publish_lines_to(&server.url(), &stream, &events(0..20)).await;
    assert_eq!(
        numbers(&exact.take(20, wait).await),
        (0..20).collect::<Vec<_>>()
    );
    assert_eq!(
        numbers(&wide.take(20, wait).await),
        (0..20).collect::<Vec<_>>()
    );
    let last = exact.last_event_id().to_owned();
    drop(exact);

    // A resume from the history (XREVRANGE), its seam (XRANGE), a reset with the state (HGETALL).
    publish_lines_to(&server.url(), &stream, &events(20..30)).await;
    assert_eq!(
        numbers(&wide.take(10, wait).await),
        (20..30).collect::<Vec<_>>()
    );
    let history = format!("{{{prefix}}}:flow:f1:history");
    wait_until(wait, "the history holds 30", || {
        let (mut admin, history) = (admin.clone(), history.clone());
        async move {
            redis::cmd("XLEN")
                .arg(&history)
                .query_async::<u64>(&mut admin)
                .await
                .unwrap_or(0)
                == 30
        }
    })
    .await;
    let mut back = open("/events?topic=flow.f1.progress".into(), Some(last)).await;
    assert_eq!(
        numbers(&back.take(10, wait).await),
        (20..30).collect::<Vec<_>>()
    );
    publish_lines_to(&server.url(), &stream, &events(30..35)).await;
    assert_eq!(
        numbers(&back.take(5, wait).await),
        (30..35).collect::<Vec<_>>()
    );
    let mut reset = open(
        "/events?topic=flow.f1.progress".into(),
        Some("nothing".into()),
    )
    .await;
    let m = reset.next(wait).await.unwrap();
    assert_eq!(
        (m.event.as_str(), m.json()["latest"]["data"]["i"].as_u64()),
        ("reset", Some(34))
    );
    assert_eq!(gateway.metric("fleet_gateway_resumes_total", "").await, 1.0);

    // The registry, written under the user.
    wait_until(wait, "the registry entry", || {
        let (mut admin, key) = (admin.clone(), format!("{registry}:gw"));
        async move {
            let h: HashMap<String, u64> = redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut admin)
                .await
                .unwrap_or_default();
            h.get("@connections") == Some(&3)
        }
    })
    .await;
    assert_eq!(
        gateway.readyz().await.0,
        200,
        "ready: every registry write is allowed"
    );

    // Outside its ACL: publishing, writing the projector's keys.
    let mut as_gateway = redis_at(&url_as(&server.url(), "gateway")).await;
    for args in [
        vec![
            "PUBLISH".to_owned(),
            format!("{{{prefix}}}:fleet:flow.f1.progress"),
            "x".into(),
        ],
        vec![
            "HSET".to_owned(),
            format!("{{{prefix}}}:flow:f1:state"),
            "a".into(),
            "b".into(),
        ],
        vec![
            "XADD".to_owned(),
            history.clone(),
            "*".into(),
            "a".into(),
            "b".into(),
        ],
    ] {
        let refused = redis::cmd(&args[0])
            .arg(&args[1..])
            .query_async::<redis::Value>(&mut as_gateway)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Some("NOPERM"), "{args:?}: {refused}");
    }
    drop((wide, back, reset));
    gateway.stop_cleanly().await;
    let left: u64 = redis::cmd("EXISTS")
        .arg(format!("{registry}:gw"))
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(left, 0, "the drain removed its entry (DEL under the user)");
    notifier.stop_cleanly().await;
    projector.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleetctl_trim_runs_under_the_shipped_retention_user_with_the_shipped_rules() {
    let prefix = unique("lpr");
    let server = PrivateRedis::start_with(&["--aclfile".into(), acl_file(&prefix)]);
    let mut admin = redis_at(&server.url()).await;
    let tag = format!("{{{prefix}}}");
    let (stream, dlq, history) = (
        format!("{tag}:events"),
        format!("{tag}:events:dlq"),
        format!("{tag}:flow:f1:history"),
    );
    // The input with a group that settled part of it, dead letters, and a history whose first
    // 100 entries are from 1970 (explicit ids) and the rest from now.
    let mut pipe = redis::pipe();
    for i in 0..300 {
        pipe.cmd("XADD").arg(&stream).arg("*").arg("i").arg(i);
        pipe.cmd("XADD").arg(&dlq).arg("*").arg("i").arg(i);
    }
    for i in 1..=100u64 {
        pipe.cmd("XADD")
            .arg(&history)
            .arg(format!("{i}-0"))
            .arg("i")
            .arg(i);
    }
    for i in 0..50 {
        pipe.cmd("XADD").arg(&history).arg("*").arg("i").arg(i);
    }
    let _: redis::Value = pipe.query_async(&mut admin).await.unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("persister")
        .arg("0")
        .query_async(&mut admin)
        .await
        .unwrap();
    let shipped =
        std::fs::read_to_string(repo_path("deploy/kustomize/base/retention/retention.toml"))
            .unwrap();
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("retention")));
    std::fs::write(&cfg, shipped.replace("{app}", &tag)).unwrap();
    let out = tokio::process::Command::new(bin("fleetctl"))
        .env("FLEET_REDIS_URL", url_as(&server.url(), "retention"))
        .env("FLEET_CONFIG", &cfg)
        .args(["--output", "json", "--quiet", "trim"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let removed = |key: &str| {
        doc["streams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stream"] == key)
            .map(|s| s["removed"].clone())
            .unwrap_or_else(|| panic!("{key} in {doc}"))
    };
    assert_eq!(removed(&history), 100, "the 1970 entries, by age: {doc}");
    assert_eq!(
        removed(&stream),
        0,
        "nothing is old, nothing settled: {doc}"
    );
    assert_eq!(removed(&dlq), 0);
    let log: Vec<redis::Value> = redis::cmd("ACL")
        .arg("LOG")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(log.is_empty(), "no command refused: {log:?}");
}
