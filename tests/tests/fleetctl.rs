//! fleetctl against the real servers: dead letters redriven into their stream (each once, for
//! its own group, through kill -9), replays of a group to its checkpoint or a time, the rebuild
//! of a stream from PostgreSQL, reconcile and trace, and the commands that look at the fleet
//! (lag, pending, status --check, checkpoints, tail) checked against what Redis itself says.

use std::collections::{HashMap, HashSet};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};
use uuid::Uuid;

use streamfleet_tests::fleetctl::{fleetctl_at, group_json, reject_trigger, user_line};
use streamfleet_tests::scenario::{config, migrated_database, rows, wait_settled};
use streamfleet_tests::servers::PrivateRedis;
use streamfleet_tests::*;

/// Runs fleetctl with `args` against the test Redis (and `database` when given); returns its
/// status, stdout and stderr.
async fn fleetctl(args: &[&str], database: Option<&str>) -> (ExitStatus, String, String) {
    fleetctl_at(&redis_url(), args, database).await
}

async fn xlen(conn: &mut MultiplexedConnection, key: &str) -> usize {
    redis::cmd("XLEN").arg(key).query_async(conn).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_is_applied_once_by_its_group_and_skipped_by_the_others() {
    let db = fresh_database().await;
    let pool = migrated_database(&db).await;
    reject_trigger(&pool, true).await;
    let stream = unique("redrive:");
    let lines: Vec<String> = (0..50)
        .map(|n| user_line(Uuid::now_v7(), n, n % 5 == 0))
        .collect();
    // A second group on the stream: a notifier publishing every user event.
    let received = subscriber_at(&redis_url(), &format!("{stream}:*")).await;
    let notifier_env = WorkerEnv::new(&stream, "").unset("FLEET_DATABASE_URL").set(
        "FLEET_CONFIG",
        &config("[[route]]\npattern = \"user.#\"\npublish = \"{stream}:{channel}\""),
    );
    let mut notifier = notifier_env.start("notifier").await;
    let mut persister = WorkerEnv::new(&stream, &db)
        .set("FLEET_CONFIG", &config(""))
        .start("persister")
        .await;
    publish_lines(&stream, &lines).await;
    let mut conn = redis().await;
    wait_settled(&conn, &stream, "persister").await;
    wait_settled(&conn, &stream, "notifier").await;
    assert_eq!(rows(&pool).await, 40);

    let (status, out, err) = fleetctl(
        &["dlq", "list", "--stream", &stream, "--output", "json"],
        None,
    )
    .await;
    assert!(status.success(), "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    let letters = listed["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 10);
    assert!(letters
        .iter()
        .all(|d| d["fields"]["dlq_reason"] == "handler_error"
            && d["fields"]["dlq_group"] == "persister"));
    let (status, out, _) = fleetctl(
        &[
            "dlq",
            "show",
            "--stream",
            &stream,
            letters[0]["id"].as_str().unwrap(),
        ],
        None,
    )
    .await;
    assert!(status.success() && out.contains("dlq_error") && out.contains("rejected event"));

    // Nothing selected: refused before anything is done.
    let (status, _, err) = fleetctl(&["dlq", "redrive", "--stream", &stream], None).await;
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--all"), "{err}");

    reject_trigger(&pool, false).await;
    let (status, out, err) = fleetctl(
        &[
            "dlq",
            "redrive",
            "--stream",
            &stream,
            "--group",
            "persister",
            "--dry-run",
        ],
        None,
    )
    .await;
    assert!(
        status.success() && out.contains("would redrive 10"),
        "{out}{err}"
    );
    assert_eq!(xlen(&mut conn, &format!("{stream}:dlq")).await, 10);
    let (status, out, err) = fleetctl(
        &[
            "dlq",
            "redrive",
            "--stream",
            &stream,
            "--group",
            "persister",
        ],
        None,
    )
    .await;
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("redriven: 10"), "{out}");
    assert_eq!(xlen(&mut conn, &format!("{stream}:dlq")).await, 0);
    wait_settled(&conn, &stream, "persister").await;
    wait_settled(&conn, &stream, "notifier").await;
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT event_id) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((rows(&pool).await, distinct), (50, 50), "each event once");
    // The notifier settled the originals: the redriven entries are not published again.
    assert_eq!(received.lock().unwrap().len(), 50);
    assert_eq!(
        notifier
            .metric("fleet_events_skipped_total", "reason=\"other_group\"")
            .await,
        10.0
    );
    assert_eq!(xlen(&mut conn, &format!("{stream}:dlq")).await, 0);
    persister.stop_cleanly().await;
    notifier.stop_cleanly().await;
}

/// `n` dead letters of `stream` written as the persister writes them, for valid user events.
async fn dead_letters(conn: &mut MultiplexedConnection, stream: &str, n: usize) -> Vec<Uuid> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    for (chunk_no, chunk) in ids.chunks(1000).enumerate() {
        let mut pipe = redis::pipe();
        for (i, id) in chunk.iter().enumerate() {
            let n = chunk_no * 1000 + i;
            pipe.cmd("XADD")
                .arg(format!("{stream}:dlq"))
                .arg("*")
                .arg(&[
                    ("v", "1".to_owned()),
                    ("id", id.to_string()),
                    ("type", "user.updated".into()),
                    ("channel", format!("user.{}.profile", n % 7)),
                    ("source", "tests".into()),
                    ("time", "2026-11-26T10:00:00Z".into()),
                    ("data", format!("{{\"n\":{n}}}")),
                    ("dlq_reason", "handler_error".into()),
                    ("dlq_error", "rejected event".into()),
                    ("dlq_stream", stream.to_owned()),
                    ("dlq_entry_id", format!("1-{n}")),
                    ("dlq_group", "persister".into()),
                    ("dlq_deliveries", "1".into()),
                    ("dlq_at", "2026-11-26T10:00:01Z".into()),
                ])
                .ignore();
        }
        pipe.query_async::<()>(conn).await.unwrap();
    }
    ids
}

/// Event ids of the entries of `stream`, with how often each appears.
async fn event_ids(conn: &mut MultiplexedConnection, stream: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for (_, fields) in read_stream(conn, stream).await {
        *out.entry(fields["id"].clone()).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_redrive_of_10_000_then_again_loses_and_doubles_nothing() {
    let stream = unique("redrive-kill:");
    let mut conn = redis().await;
    let ids = dead_letters(&mut conn, &stream, 10_000).await;
    let dlq = format!("{stream}:dlq");
    let mut partial = 0;
    for attempt in 0..20 {
        if xlen(&mut conn, &dlq).await == 0 {
            break;
        }
        let mut child = tokio::process::Command::new(bin("fleetctl"))
            .env_clear()
            .env("FLEET_REDIS_URL", redis_url())
            .args(["dlq", "redrive", "--stream", &stream, "--all"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(random_between(10, 40 + attempt * 10))).await;
        let _ = child.start_kill();
        let _ = child.wait().await;
        // At every instant, each dead letter is in exactly one place.
        let (left, moved) = (xlen(&mut conn, &dlq).await, xlen(&mut conn, &stream).await);
        assert_eq!(left + moved, 10_000, "after kill -9 #{attempt}");
        if left > 0 && moved > 0 {
            partial += 1;
        }
    }
    eprintln!("kill -9 mid-redrive: {partial} kill(s) left it half done");
    assert!(partial > 0, "no kill landed mid-redrive");
    let (status, out, err) =
        fleetctl(&["dlq", "redrive", "--stream", &stream, "--all"], None).await;
    assert!(status.success(), "{out}{err}");
    assert_eq!(xlen(&mut conn, &dlq).await, 0);
    let copies = event_ids(&mut conn, &stream).await;
    assert_eq!(copies.len(), 10_000, "none lost");
    assert!(copies.values().all(|n| *n == 1), "none doubled");
    let want: HashSet<String> = ids.iter().map(Uuid::to_string).collect();
    assert_eq!(copies.keys().cloned().collect::<HashSet<_>>(), want);
    // The persister then applies each once.
    let db = fresh_database().await;
    let pool = migrated_database(&db).await;
    let mut persister = WorkerEnv::new(&stream, &db)
        .set("FLEET_CONFIG", &config(""))
        .start("persister")
        .await;
    wait_settled(&conn, &stream, "persister").await;
    assert_eq!(rows(&pool).await, 10_000);
    persister.stop_cleanly().await;
}

/// A stream with entries at ids `1000-0`, `2000-0`, … `10000-0`, a group `g` that read and
/// acknowledged them all as consumer `c1`.
async fn read_stream_of_ten(conn: &mut MultiplexedConnection) -> String {
    let stream = unique("replay:");
    for i in 1..=10 {
        let () = redis::cmd("XADD")
            .arg(&stream)
            .arg(format!("{}-0", i * 1000))
            .arg("n")
            .arg(i)
            .query_async(conn)
            .await
            .unwrap();
    }
    create_group(conn, &stream, "g").await;
    let ids = read_new(conn, &stream).await;
    assert_eq!(ids.len(), 10);
    stream
}

/// Reads what the group `g` has not been delivered yet (as `c1`), acknowledges it, returns ids.
async fn read_new(conn: &mut MultiplexedConnection, stream: &str) -> Vec<String> {
    let ids = deliver(conn, stream, "g", "c1", 100).await;
    if !ids.is_empty() {
        ack(conn, stream, "g", &ids).await;
    }
    ids
}

fn thousands(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range.map(|i| format!("{}-0", i * 1000)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_to_the_checkpoint_delivers_again_exactly_the_entries_after_it() {
    let mut conn = redis().await;
    let stream = read_stream_of_ten(&mut conn).await;
    let () = redis::cmd("HSET")
        .arg(format!("{stream}:checkpoints"))
        .arg("g")
        .arg("4000-0")
        .query_async(&mut conn)
        .await
        .map(|_: u64| ())
        .unwrap();
    let to_checkpoint =
        |flags: &[&'static str]| [&["--group", "g", "--to-checkpoint"], flags].concat();
    // c1 just read: an active consumer.
    let (status, _, err) = replay(&stream, &to_checkpoint(&[])).await;
    assert!(!status.success());
    assert!(
        err.contains("active consumers: c1") && err.contains("--force"),
        "{err}"
    );
    let dry_run = to_checkpoint(&["--force", "--dry-run", "--output", "json"]);
    let (status, out, err) = replay(&stream, &dry_run).await;
    assert!(status.success(), "{err}");
    let plan: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            plan["entries"].as_u64(),
            plan["from"].as_str(),
            plan["to"].as_str()
        ),
        (Some(6), Some("10000-0"), Some("4000-0"))
    );
    assert!(
        read_new(&mut conn, &stream).await.is_empty(),
        "a dry run changes nothing"
    );
    let (status, out, err) = replay(&stream, &to_checkpoint(&["--force"])).await;
    assert!(status.success(), "{err}");
    assert!(out.contains("delivers 6 entries again"), "{out}");
    assert_eq!(
        lag(&mut conn, &stream, "g").await,
        Some(6),
        "the lag stays known"
    );
    assert_eq!(read_new(&mut conn, &stream).await, thousands(5..=10));

    // To a time: from the first entry at or after it.
    let (status, _, err) = replay(
        &stream,
        &[
            "--group",
            "g",
            "--to-time",
            "1970-01-01T00:00:06.500Z",
            "--force",
        ],
    )
    .await;
    assert!(status.success(), "{err}");
    assert_eq!(read_new(&mut conn, &stream).await, thousands(7..=10));
    let (status, _, err) = replay(
        &stream,
        &[
            "--group",
            "g",
            "--to-time",
            "1970-01-01T00:00:03Z",
            "--force",
        ],
    )
    .await;
    assert!(status.success(), "{err}");
    assert_eq!(read_new(&mut conn, &stream).await, thousands(3..=10));

    // Forward skips entries: refused without --force; an unknown group is named.
    let (status, _, err) =
        replay(&stream, &["--group", "g", "--to-id", "20000-0", "--force"]).await;
    assert!(status.success(), "{err}");
    let () = redis::cmd("XGROUP")
        .arg("SETID")
        .arg(&stream)
        .arg("g")
        .arg("5000-0")
        .query_async(&mut conn)
        .await
        .unwrap();
    // No consumer left (c1 owns nothing): nothing active.
    let _: u64 = redis::cmd("XGROUP")
        .arg("DELCONSUMER")
        .arg(&stream)
        .arg("g")
        .arg("c1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (status, _, err) = replay(&stream, &["--group", "g", "--to-id", "9000-0"]).await;
    assert!(
        !status.success() && err.contains("skips 4 entries"),
        "{err}"
    );
    let (status, _, err) = replay(&stream, &["--group", "nope", "--to-id", "1-0"]).await;
    assert!(!status.success() && err.contains("no group nope"), "{err}");
    let (status, _, err) = replay(&stream, &["--group", "g", "--to-id", "soon"]).await;
    assert_eq!(status.code(), Some(2), "{err}");
}

/// `fleetctl replay --stream <stream> <args>`.
async fn replay(stream: &str, args: &[&str]) -> (ExitStatus, String, String) {
    fleetctl(&[&["replay", "--stream", stream], args].concat(), None).await
}

/// Runs fleetctl with `input` on its standard input.
async fn fleetctl_stdin(args: &[&str], input: &str) -> (ExitStatus, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(bin("fleetctl"))
        .env_clear()
        .env("FLEET_REDIS_URL", redis_url())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_checks_every_line_before_writing_any() {
    let mut conn = redis().await;
    let stream = unique("publish-check:");
    let good: Vec<String> = (0..3)
        .map(|n| user_line(Uuid::now_v7(), n, false))
        .collect();
    let bad = r#"{"v":1,"id":"not-a-uuid","type":"user.signup","channel":"user.1","source":"t","time":"2026-11-26T10:00:00Z","data":{}}"#;
    let file = std::env::temp_dir().join(format!("{}.jsonl", unique("lines")));
    let path = file.display().to_string();

    // Line 3 of 4 is invalid: refused with its number and reason, nothing published.
    std::fs::write(
        &file,
        format!("{}\n{}\n{bad}\n{}\n", good[0], good[1], good[2]),
    )
    .unwrap();
    let (status, _, err) = fleetctl(&["publish", "--stream", &stream, "--file", &path], None).await;
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("line 3") && err.contains("invalid") && err.contains("nothing published"),
        "{err}"
    );
    assert_eq!(xlen(&mut conn, &stream).await, 0);
    // Not JSON at all, from standard input.
    let (status, _, err) = fleetctl_stdin(
        &["publish", "--stream", &stream, "--file", "-"],
        &format!("{}\n{{oops\n", good[0]),
    )
    .await;
    assert_eq!(status.code(), Some(2));
    assert!(
        err.contains("standard input line 2: not a JSON object"),
        "{err}"
    );
    assert_eq!(xlen(&mut conn, &stream).await, 0);

    // Valid lines, from a file and from standard input.
    std::fs::write(&file, good.join("\n")).unwrap();
    let (status, out, err) =
        fleetctl(&["publish", "--stream", &stream, "--file", &path], None).await;
    assert!(
        status.success() && out.contains("published 3 entries"),
        "{out}{err}"
    );
    let (status, _, err) = fleetctl_stdin(
        &["publish", "--stream", &stream, "--file", "-"],
        &good.join("\n"),
    )
    .await;
    assert!(status.success(), "{err}");
    assert_eq!(xlen(&mut conn, &stream).await, 6);
    // On purpose, as it is.
    std::fs::write(&file, bad).unwrap();
    let (status, _, err) = fleetctl(
        &[
            "publish",
            "--no-validate",
            "--stream",
            &stream,
            "--file",
            &path,
        ],
        None,
    )
    .await;
    assert!(status.success(), "{err}");
    assert_eq!(xlen(&mut conn, &stream).await, 7);
    // One event from flags is checked too.
    let (status, _, err) = fleetctl(
        &[
            "publish",
            "--stream",
            &stream,
            "--type",
            "user.x",
            "--channel",
            "user.1",
            "--data",
            "[1]",
        ],
        None,
    )
    .await;
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("not valid") && err.contains("data"), "{err}");
    assert_eq!(xlen(&mut conn, &stream).await, 7);
    let _ = std::fs::remove_file(file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_flushall_replay_from_postgres_brings_the_strict_events_back_once() {
    let server = PrivateRedis::start();
    let url = server.url();
    let db = fresh_database().await;
    let pool = migrated_database(&db).await;
    let stream = unique("rebuild:");
    let lines: Vec<String> = (0..200)
        .map(|n| streamfleet_tests::corpus::valid_line(Uuid::now_v7(), n % 2 == 0, n))
        .collect();
    publish_lines_to(&url, &stream, &lines).await;
    let env = WorkerEnv::new(&stream, &db)
        .set("FLEET_REDIS_URL", &url)
        .set("FLEET_CONFIG", &config(""));
    let mut persister = env.start("persister").await;
    let mut conn = redis_at(&url).await;
    wait_settled(&conn, &stream, "persister").await;
    persister.stop_cleanly().await;
    assert_eq!(rows(&pool).await, 100);
    let (status, out, err) =
        fleetctl_at(&url, &["reconcile", "--stream", &stream], Some(&db)).await;
    assert!(status.success(), "{out}{err}");
    assert!(
        out.contains("100 strict events") && out.contains("nothing missing"),
        "{out}"
    );

    // Redis loses everything: reconcile says so.
    let () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let (status, out, _) = fleetctl_at(
        &url,
        &["reconcile", "--stream", &stream, "--output", "json"],
        Some(&db),
    )
    .await;
    assert_eq!(status.code(), Some(1));
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["missing_in_stream"].as_array().unwrap().len(), 100);

    let (status, out, err) = fleetctl_at(
        &url,
        &["replay", "--from-postgres", "--stream", &stream],
        Some(&db),
    )
    .await;
    assert!(status.success(), "{err}");
    assert!(out.contains("100 events added back"), "{out}");
    assert_eq!(xlen(&mut conn, &stream).await, 100);
    // The persister's group comes back at its checkpoint: it reads them all, writes no second row.
    let mut persister = env.start("persister").await;
    wait_settled(&conn, &stream, "persister").await;
    assert_eq!(rows(&pool).await, 100);
    assert_eq!(
        persister
            .metric("fleet_events_deduplicated_total", "stage=\"sink\"")
            .await,
        100.0
    );
    persister.stop_cleanly().await;
    let (status, out, err) =
        fleetctl_at(&url, &["reconcile", "--stream", &stream], Some(&db)).await;
    assert!(
        status.success() && out.contains("nothing missing"),
        "{out}{err}"
    );
    // A rebuild again would double the stream: refused.
    let (status, _, err) = fleetctl_at(
        &url,
        &["replay", "--from-postgres", "--stream", &stream],
        Some(&db),
    )
    .await;
    assert!(!status.success() && err.contains("--force"), "{err}");

    // A row lost from PostgreSQL is reported, by event id.
    let lost: Uuid = sqlx::query_scalar("DELETE FROM events WHERE event_id = (SELECT event_id FROM events ORDER BY event_id LIMIT 1) RETURNING event_id")
        .fetch_one(&pool)
        .await
        .unwrap();
    let (status, out, _) = fleetctl_at(&url, &["reconcile", "--stream", &stream], Some(&db)).await;
    assert_eq!(status.code(), Some(1));
    assert!(
        out.contains("postgres") && out.contains(&lost.to_string()),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_shows_a_persisted_a_pending_and_a_dead_lettered_event() {
    let db = fresh_database().await;
    let pool = migrated_database(&db).await;
    let stream = unique("trace:");
    let (persisted, pending, dead) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let bad = json!({"v": 1, "id": dead.to_string(), "type": "user.updated", "channel": "User.1",
        "source": "tests", "time": "2026-11-26T10:00:00Z", "data": {}, "correlation_id": "req-dead"})
    .to_string();
    publish_lines(&stream, &[user_line(persisted, 1, false), bad]).await;
    let mut persister = WorkerEnv::new(&stream, &db)
        .set("FLEET_CONFIG", &config(""))
        .start("persister")
        .await;
    let mut conn = redis().await;
    wait_settled(&conn, &stream, "persister").await;
    persister.stop_cleanly().await;
    assert_eq!(rows(&pool).await, 1);
    // A group (from here on) whose consumer reads the next event and never acknowledges it.
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("slow")
        .arg("$")
        .query_async(&mut conn)
        .await
        .unwrap();
    publish_lines(&stream, &[user_line(pending, 2, false)]).await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("slow")
        .arg("c9")
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();

    let trace = |id: Uuid| {
        let (stream, db) = (stream.clone(), db.clone());
        async move {
            let id = id.to_string();
            fleetctl(
                &["trace", &id, "--streams", &stream, "--output", "json"],
                Some(&db),
            )
            .await
        }
    };
    let state = |t: &Value, group: &str| -> Value {
        t["entries"][0]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["group"] == group)
            .unwrap()["state"]
            .clone()
    };
    let (status, out, err) = trace(persisted).await;
    assert!(status.success(), "{err}");
    let t: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(t["postgres"]["stream"], stream.as_str());
    assert_eq!(t["postgres"]["stream_id"], t["entries"][0]["entry_id"]);
    assert_eq!(state(&t, "persister")["state"], "acknowledged");
    assert_eq!(state(&t, "slow")["state"], "acknowledged");

    let (status, out, err) = trace(pending).await;
    assert!(status.success(), "{err}");
    let t: Value = serde_json::from_str(&out).unwrap();
    let slow = state(&t, "slow");
    assert_eq!(
        (slow["state"].as_str(), slow["consumer"].as_str()),
        (Some("pending"), Some("c9"))
    );
    assert_eq!(slow["deliveries"], 1);
    assert_eq!(state(&t, "persister")["state"], "not_delivered");
    assert!(t["postgres"].is_null());

    let (status, out, err) = trace(dead).await;
    assert!(status.success(), "{err}");
    let t: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(state(&t, "persister")["state"], "dead_lettered");
    assert_eq!(state(&t, "persister")["reason"], "invalid");
    assert_eq!(t["dead_letters"].as_array().unwrap().len(), 1);
    assert_eq!(t["correlation_id"], "req-dead");
    // The table, for people.
    let (status, out, _) = fleetctl(
        &["trace", &dead.to_string(), "--streams", &stream],
        Some(&db),
    )
    .await;
    assert!(status.success());
    assert!(
        out.contains("dead-lettered (invalid") && out.contains("correlation id: req-dead"),
        "{out}"
    );
    let (status, _, err) = fleetctl(
        &["trace", &Uuid::now_v7().to_string(), "--streams", &stream],
        None,
    )
    .await;
    assert!(!status.success() && err.contains("not found"), "{err}");
}

/// Adds entries with the given ids (`<ms>-<seq>`) to `stream`, one field each.
async fn add_ids(conn: &mut MultiplexedConnection, stream: &str, ids: &[&str]) {
    for id in ids {
        let () = redis::cmd("XADD")
            .arg(stream)
            .arg(*id)
            .arg("n")
            .arg(*id)
            .query_async(conn)
            .await
            .map(|_: String| ())
            .unwrap();
    }
}

async fn ack(conn: &mut MultiplexedConnection, stream: &str, group: &str, ids: &[String]) {
    let _: u64 = redis::cmd("XACK")
        .arg(stream)
        .arg(group)
        .arg(ids)
        .query_async(conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_and_pending_say_what_xinfo_says() {
    let mut conn = redis().await;
    let prefix = unique("lag:");
    let stream = format!("{prefix}:a");
    let ids: Vec<String> = (1..=10).map(|i| format!("{}-0", i * 1000)).collect();
    add_ids(
        &mut conn,
        &stream,
        &ids.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    create_group(&mut conn, &stream, "g").await;
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("late")
        .arg("$")
        .query_async(&mut conn)
        .await
        .unwrap();
    // c1 is delivered 4 entries and acknowledges the first: 3 pending from 2000-0, lag 6.
    let delivered = deliver(&mut conn, &stream, "g", "c1", 4).await;
    ack(&mut conn, &stream, "g", &delivered[..1]).await;
    // Beside it, its dead letter stream and a stream of another glob match.
    add_ids(&mut conn, &format!("{stream}:dlq"), &["1-0"]).await;
    let other = format!("{prefix}:b");
    add_ids(&mut conn, &other, &["1-0"]).await;
    create_group(&mut conn, &other, "g").await;

    let (status, out, err) = fleetctl(
        &[
            "lag",
            "--streams",
            &format!("{prefix}:*"),
            "--output",
            "json",
        ],
        None,
    )
    .await;
    assert!(status.success(), "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    let streams: Vec<&str> = doc["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream"].as_str().unwrap())
        .collect();
    assert_eq!(streams, [stream.as_str(), other.as_str()], "no :dlq");
    let g = group_json(&doc, &stream, "g");
    assert_eq!(
        (g["lag"].as_u64(), g["pending"].as_u64()),
        (
            lag(&mut conn, &stream, "g").await,
            Some(pending(&mut conn, &stream, "g").await)
        )
    );
    assert_eq!(
        (g["lag"].as_u64(), g["pending"].as_u64()),
        (Some(6), Some(3))
    );
    assert_eq!(g["oldest_pending_id"], "2000-0");
    // Its age on Redis's clock: the entry was "written" at 2 s past the epoch.
    let age = g["oldest_pending_age_ms"].as_u64().unwrap();
    assert!(age > doc["redis_time_ms"].as_u64().unwrap() - 3000, "{age}");
    assert_eq!(g["last_delivered_id"], "4000-0");
    assert_eq!(group_json(&doc, &stream, "late")["lag"].as_u64(), Some(0));

    let (status, out, err) = fleetctl(
        &[
            "pending",
            "--streams",
            &stream,
            "--group",
            "g",
            "--output",
            "json",
        ],
        None,
    )
    .await;
    assert!(status.success(), "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    let consumers = &group_json(&doc, &stream, "g")["consumers"];
    assert_eq!(consumers.as_array().unwrap().len(), 1);
    assert_eq!(
        (&consumers[0]["name"], consumers[0]["pending"].as_u64()),
        (&json!("c1"), Some(3))
    );
    assert_eq!(consumers[0]["state"], "active");
    let (status, out, _) = fleetctl(&["pending", "--streams", &stream], None).await;
    assert!(status.success());
    let row = out.lines().find(|l| l.contains(" c1 ")).expect(&out);
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        (cells[1], cells[3], cells[5]),
        ("g", "3", "active"),
        "{out}"
    );

    // An entry deleted after the group's position: Redis cannot tell the lag any more.
    let _: u64 = redis::cmd("XDEL")
        .arg(&stream)
        .arg("9000-0")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(lag(&mut conn, &stream, "g").await, None);
    let (status, out, _) = fleetctl(&["lag", "--streams", &stream, "--group", "g"], None).await;
    assert!(status.success());
    let row = out.lines().find(|l| l.starts_with(&stream)).expect(&out);
    assert_eq!(row.split_whitespace().nth(3), Some("unknown"), "{out}");
    let (_, out, _) = fleetctl(
        &[
            "lag",
            "--streams",
            &stream,
            "--group",
            "g",
            "--output",
            "json",
        ],
        None,
    )
    .await;
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert!(group_json(&doc, &stream, "g")["lag"].is_null());

    // A named stream that does not exist is an error that names it, after the rest is shown.
    let missing = format!("{prefix}:nope");
    let (status, out, err) =
        fleetctl(&["lag", "--streams", &format!("{stream},{missing}")], None).await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(out.contains(&stream), "{out}");
    assert!(err.contains(&format!("{missing}: no such stream")), "{err}");
    let (status, _, err) = fleetctl(&["lag", "--streams", ""], None).await;
    assert_eq!(status.code(), Some(2), "{err}");
    let (status, _, err) = fleetctl(
        &["pending", "--streams", &stream, "--dead-after", "soon"],
        None,
    )
    .await;
    assert_eq!(status.code(), Some(2), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_check_fails_on_a_dead_consumer_owning_entries_and_passes_when_healthy() {
    let mut conn = redis().await;
    let stream = unique("status:");
    let ids: Vec<String> = (1..=5).map(|i| format!("{i}-0")).collect();
    add_ids(
        &mut conn,
        &stream,
        &ids.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    create_group(&mut conn, &stream, "g").await;
    // Healthy: everything delivered is acknowledged.
    let delivered = deliver(&mut conn, &stream, "g", "c1", 5).await;
    ack(&mut conn, &stream, "g", &delivered).await;
    let status_check = |extra: &'static [&'static str]| {
        let stream = stream.clone();
        async move {
            let mut args = vec!["status", "--streams", &stream, "--check"];
            args.extend(extra);
            fleetctl(&args, None).await
        }
    };
    let (status, out, err) = status_check(&[]).await;
    assert!(status.success(), "{out}{err}");
    assert!(err.is_empty(), "{err}");
    assert!(out.contains(&stream) && out.contains("1 active"), "{out}");

    // A consumer takes 3 new entries and dies: its entries stay pending, nobody delivers them.
    add_ids(&mut conn, &stream, &["6-0", "7-0", "8-0"]).await;
    assert_eq!(deliver(&mut conn, &stream, "g", "gone", 3).await.len(), 3);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // (Entries written at the epoch: their age is no problem here.)
    let (status, _, err) =
        status_check(&["--dead-after", "1s", "--max-pending-age", "100000d"]).await;
    assert_eq!(status.code(), Some(1), "{err}");
    let problems: Vec<&str> = err.lines().collect();
    assert_eq!(problems.len(), 1, "{err}");
    assert!(
        problems[0].contains("consumer gone is dead") && problems[0].contains("3 pending"),
        "{err}"
    );
    // Under the default --dead-after (60 s) it is not dead yet, and its entries are young; the
    // oldest pending entry (6-0, written at the epoch) is old by any --max-pending-age, though.
    let (status, _, err) = status_check(&["--max-pending-age", "100000d"]).await;
    assert!(status.success(), "{err}");
    let (status, _, err) = status_check(&[]).await;
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("oldest pending entry 6-0"), "{err}");
    let (status, out, err) = fleetctl(
        &[
            "status",
            "--streams",
            &stream,
            "--dead-after",
            "1s",
            "--output",
            "json",
        ],
        None,
    )
    .await;
    assert!(status.success(), "without --check: {err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["healthy"], false);
    assert_eq!(doc["problems"].as_array().unwrap().len(), 2);
    let g = group_json(&doc, &stream, "g");
    assert_eq!(g["pending"], 3);
    assert_eq!(g["consumers"][1]["state"], "dead", "{g}");

    // Settled again (a worker reclaimed and applied them): healthy, whatever the thresholds.
    ack(
        &mut conn,
        &stream,
        "g",
        &["6-0".into(), "7-0".into(), "8-0".into()],
    )
    .await;
    let (status, _, err) = status_check(&["--dead-after", "1s", "--max-pending-age", "1s"]).await;
    assert!(status.success(), "{err}");
    // A dead letter needs attention.
    add_ids(&mut conn, &format!("{stream}:dlq"), &["1-0"]).await;
    let (status, _, err) = status_check(&[]).await;
    assert_eq!(status.code(), Some(1));
    assert!(
        err.contains(&format!("1 dead letter(s) in {stream}:dlq")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_show_postgres_and_redis_beside_the_group() {
    let db = fresh_database().await;
    let pool = migrated_database(&db).await;
    let mut conn = redis().await;
    let stream = unique("checkpoints:");
    add_ids(&mut conn, &stream, &["1-0", "2-0", "3-0", "4-0"]).await;
    create_group(&mut conn, &stream, "persister").await;
    deliver(&mut conn, &stream, "persister", "c1", 3).await;
    sqlx::query(
        "INSERT INTO checkpoints (stream, group_name, position) VALUES ($1, 'persister', '2-0')",
    )
    .bind(&stream)
    .execute(&pool)
    .await
    .unwrap();
    let () = redis::cmd("HSET")
        .arg(format!("{stream}:checkpoints"))
        .arg("persister")
        .arg("1-0")
        .query_async(&mut conn)
        .await
        .map(|_: u64| ())
        .unwrap();
    let (status, out, err) = fleetctl(
        &["checkpoints", "--streams", &stream, "--output", "json"],
        Some(&db),
    )
    .await;
    assert!(status.success(), "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        doc["checkpoints"],
        json!([{"stream": stream, "group": "persister", "postgres": "2-0", "redis": "1-0",
            "last_delivered_id": "3-0", "lag": 1}])
    );
    let (status, out, _) = fleetctl(&["checkpoints", "--streams", &stream], None).await;
    assert!(status.success());
    let row = out.lines().find(|l| l.starts_with(&stream)).expect(&out);
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>()[1..],
        ["persister", "-", "1-0", "3-0", "1"]
    );
    // status shows the one replay would use: PostgreSQL's when given.
    let (_, out, _) = fleetctl(&["status", "--streams", &stream], Some(&db)).await;
    assert!(out.contains("2-0 (postgres)"), "{out}");
}

/// A valid v1 entry's fields on `channel`.
fn v1_fields(channel: &str, n: u32) -> Vec<(String, String)> {
    vec![
        ("v".into(), "1".into()),
        ("id".into(), Uuid::now_v7().to_string()),
        ("type".into(), "test.tick".into()),
        ("channel".into(), channel.into()),
        ("source".into(), "tests".into()),
        ("time".into(), "2026-11-26T10:00:00Z".into()),
        ("data".into(), format!("{{\"n\":{n}}}")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_shows_the_entries_from_an_id_or_a_time_filtered_by_channel() {
    let mut conn = redis().await;
    let stream = unique("tail:");
    let channels = ["flow.7f3c.progress", "flow.7f3c.logs", "user.1.profile"];
    for i in 1..=9u32 {
        let () = redis::cmd("XADD")
            .arg(&stream)
            .arg(format!("{}-0", i * 1000))
            .arg(v1_fields(channels[(i as usize - 1) % 3], i))
            .query_async(&mut conn)
            .await
            .map(|_: String| ())
            .unwrap();
    }
    let tail = |extra: Vec<&'static str>| {
        let stream = stream.clone();
        async move {
            let mut args = vec!["tail", "--stream", stream.as_str()];
            args.extend(extra);
            fleetctl(&args, None).await
        }
    };
    let entries = |out: &str| -> Vec<(String, String)> {
        out.lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (
                    v["entry_id"].as_str().unwrap().to_owned(),
                    v["channel"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    // progress events are at 1000-0, 4000-0, 7000-0.
    let (status, out, err) = tail(vec![
        "--from",
        "2000-0",
        "--channel",
        "flow.*.progress",
        "--count",
        "2",
        "--output",
        "json",
    ])
    .await;
    assert!(status.success(), "{err}");
    assert_eq!(
        entries(&out),
        [
            ("4000-0".into(), "flow.7f3c.progress".into()),
            ("7000-0".into(), "flow.7f3c.progress".into())
        ]
    );
    // From an id: that entry included; from a time: the first entry at or after it.
    let (_, out, _) = tail(vec!["--from", "4000-0", "--count", "1", "--output", "json"]).await;
    assert_eq!(entries(&out)[0].0, "4000-0");
    let (_, out, _) = tail(vec![
        "--from",
        "1970-01-01T00:00:05.500Z",
        "--channel",
        "flow.#",
        "--count",
        "2",
        "--output",
        "json",
    ])
    .await;
    let ids: Vec<String> = entries(&out).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["7000-0", "8000-0"]);

    // The table: one line per event with its channel, type and data.
    let (_, out, _) = tail(vec![
        "--from",
        "-",
        "--type",
        "test.tick",
        "--channel",
        "user.#",
        "--count",
        "1",
    ])
    .await;
    let line = out.lines().next().expect(&out);
    assert!(
        line.contains("3000-0")
            && line.contains("user.1.profile")
            && line.contains("test.tick")
            && line.contains("{\"n\":3}"),
        "{line}"
    );

    // Default `$`: only what is written after the tail started.
    let child = tokio::spawn(tail(vec![
        "--channel",
        "flow.*.progress",
        "--count",
        "1",
        "--output",
        "json",
    ]));
    let mut added = Vec::new();
    while !child.is_finished() {
        let id: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg(v1_fields("flow.7f3c.progress", 0))
            .query_async(&mut conn)
            .await
            .unwrap();
        added.push(id);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (status, out, err) = child.await.unwrap();
    assert!(status.success(), "{err}");
    let shown = entries(&out);
    assert_eq!(shown.len(), 1);
    assert!(added.contains(&shown[0].0), "{out}");
}

/// The `--help` of the inspecting commands and the `status` screen, pinned (insta snapshots under
/// tests/tests/snapshots/): a change to what an operator reads shows up in review. Fixed stream
/// names; ages, which grow with the clock, are redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_and_the_status_screen_are_as_pinned() {
    for command in ["status", "lag", "pending", "checkpoints", "tail"] {
        let (status, out, err) = fleetctl(&[command, "--help"], None).await;
        assert!(status.success(), "{err}");
        insta::assert_snapshot!(format!("help_{command}"), out);
    }
    for command in [
        &[][..],
        &["publish"],
        &["replay"],
        &["trace"],
        &["reconcile"],
        &["dlq"],
        &["dlq", "list"],
        &["dlq", "redrive"],
        &["groups", "create"],
        &["shards"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let (status, out, err) = fleetctl(&args, None).await;
        assert!(status.success(), "{err}");
        let name = if command.is_empty() {
            "fleetctl".to_owned()
        } else {
            command.join("_")
        };
        insta::assert_snapshot!(format!("help_{name}"), out);
    }

    let mut conn = redis().await;
    let (orders, flows) = ("snapshot:orders", "snapshot:flows");
    let () = redis::cmd("DEL")
        .arg(&[
            orders,
            flows,
            "snapshot:orders:dlq",
            "snapshot:orders:checkpoints",
        ])
        .query_async(&mut conn)
        .await
        .map(|_: u64| ())
        .unwrap();
    add_ids(
        &mut conn,
        orders,
        &["1000-0", "2000-0", "3000-0", "4000-0", "5000-0"],
    )
    .await;
    // The persister is 2 entries behind with 2 pending; the projector is caught up.
    create_group(&mut conn, orders, "persister").await;
    let delivered = deliver(&mut conn, orders, "persister", "persister-0", 3).await;
    ack(&mut conn, orders, "persister", &delivered[..1]).await;
    create_group(&mut conn, orders, "projector").await;
    let delivered = deliver(&mut conn, orders, "projector", "projector-0", 5).await;
    ack(&mut conn, orders, "projector", &delivered).await;
    let () = redis::cmd("HSET")
        .arg("snapshot:orders:checkpoints")
        .arg("projector")
        .arg("5000-0")
        .query_async(&mut conn)
        .await
        .map(|_: u64| ())
        .unwrap();
    let () = redis::cmd("XADD")
        .arg("snapshot:orders:dlq")
        .arg("1-0")
        .arg(&[("dlq_group", "persister"), ("dlq_reason", "invalid")])
        .query_async(&mut conn)
        .await
        .map(|_: String| ())
        .unwrap();
    add_ids(&mut conn, flows, &["1000-0", "2000-0"]).await;
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(flows)
        .arg("notifier")
        .arg("$")
        .query_async(&mut conn)
        .await
        .unwrap();

    let (status, out, err) =
        fleetctl(&["status", "--streams", &format!("{orders},{flows}")], None).await;
    assert!(status.success(), "{err}");
    insta::with_settings!({filters => vec![(r"\b\d+d\d{2}h\b", "[age]")]}, {
        insta::assert_snapshot!("status_table", out);
    });
}

/// `fleetctl <args> --output json`, its stdout parsed as one JSON document.
async fn fleetctl_json(args: &[&str], database: Option<&str>) -> (ExitStatus, Value, String) {
    let args = [args, &["--output", "json"]].concat();
    let (status, out, err) = fleetctl(&args, database).await;
    let doc = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("{args:?}: stdout is not one JSON document ({e}): {out}{err}"));
    (status, doc, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_that_cannot_be_right_exit_2_with_one_line_naming_them() {
    let mut conn = redis().await;
    let stream = unique("bad-args:");
    dead_letters(&mut conn, &stream, 6).await;
    let empty_key_before = xlen(&mut conn, "").await;
    let cases: [(&[&str], &str); 7] = [
        (
            &["dlq", "list", "--stream", &stream, "--limit", "0"],
            "--limit",
        ),
        (&["dlq", "show", "--stream", &stream, "12-x"], "12-x"),
        (&["dlq", "show", "--stream", &stream, "1700000000000"], "ID"),
        (
            &["dlq", "redrive", "--stream", &stream, "--id", "+1-0"],
            "--id",
        ),
        (
            &[
                "reconcile",
                "--stream",
                &stream,
                "--from",
                "2000-0",
                "--to",
                "1000-0",
            ],
            "--from 2000-0 is after --to 1000-0",
        ),
        (
            &[
                "publish",
                "--stream",
                "",
                "--type",
                "user.updated",
                "--channel",
                "user.1",
            ],
            "--stream",
        ),
        (&["dlq", "purge", "--stream", "", "--all"], "--stream"),
    ];
    for (args, names) in cases {
        let (status, out, err) = fleetctl(args, None).await;
        assert_eq!(status.code(), Some(2), "{args:?}: {out}{err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: {err}");
    }
    assert_eq!(
        xlen(&mut conn, "").await,
        empty_key_before,
        "nothing published"
    );
    assert_eq!(xlen(&mut conn, &format!("{stream}:dlq")).await, 6);
    let (status, doc, err) =
        fleetctl_json(&["dlq", "list", "--stream", &stream, "--limit", "1"], None).await;
    assert!(status.success(), "{err}");
    assert_eq!(doc["dead_letters"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_to_id_0_delivers_the_whole_stream_again() {
    let mut conn = redis().await;
    let stream = read_stream_of_ten(&mut conn).await;
    for to in ["0", "0-0"] {
        let (status, out, err) = replay(&stream, &["--group", "g", "--to-id", to, "--force"]).await;
        assert!(status.success(), "--to-id {to}: {err}");
        assert!(
            out.contains("delivers 10 entries again")
                && out.contains("the beginning of the stream"),
            "{out}"
        );
        assert_eq!(
            lag(&mut conn, &stream, "g").await,
            Some(10),
            "the lag stays known"
        );
        assert_eq!(read_new(&mut conn, &stream).await, thousands(1..=10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_key_without_a_stream_fails_status_lag_pending_and_checkpoints_alike() {
    let mut conn = redis().await;
    let prefix = unique("named:");
    let stream = format!("{prefix}:s");
    add_ids(&mut conn, &stream, &["1-0"]).await;
    create_group(&mut conn, &stream, "g").await;
    let text = format!("{prefix}:text");
    let () = redis::cmd("SET")
        .arg(&text)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let missing = format!("{prefix}:nope");
    for command in ["status", "lag", "pending", "checkpoints"] {
        for (key, says) in [
            (&missing, "no such stream"),
            (&text, "holds a string, not a stream"),
        ] {
            let (status, out, err) =
                fleetctl(&[command, "--streams", &format!("{stream},{key}")], None).await;
            assert_eq!(status.code(), Some(1), "{command} {key}: {out}{err}");
            assert!(out.contains(&stream), "{command}: the rest is shown: {out}");
            let lines: Vec<&str> = err.lines().collect();
            assert_eq!(lines.len(), 1, "{command}: one line: {err}");
            assert!(
                lines[0].contains(&format!("{key}: {says}")),
                "{command}: {err}"
            );
        }
    }
    // Without such a key: all is well (exit 0), for each.
    for command in ["status", "lag", "pending", "checkpoints"] {
        let (status, _, err) = fleetctl(&[command, "--streams", &stream], None).await;
        assert!(status.success(), "{command}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_prints_one_json_document_under_output_json() {
    let db = fresh_database().await;
    let mut conn = redis().await;
    let stream = unique("json:");

    let (status, doc, err) = fleetctl_json(&["migrate"], Some(&db)).await;
    assert!(status.success(), "{err}");
    assert_eq!(doc["migrated"], true);
    assert!(doc["migrations"].as_u64() >= Some(2), "{doc}");

    let create = ["groups", "create", "--streams", &stream, "--group", "g"];
    let (status, doc, err) = fleetctl_json(&create, None).await;
    assert!(status.success(), "{err}");
    assert_eq!(
        doc,
        json!({"group": "g", "streams": [{"stream": stream, "created": true, "at": "0"}]})
    );
    let (_, doc, _) = fleetctl_json(&create, None).await;
    assert_eq!(doc["streams"][0]["created"], false);

    let event_id = Uuid::now_v7().to_string();
    let one = [
        "publish",
        "--stream",
        &stream,
        "--type",
        "user.updated",
        "--channel",
        "user.1.profile",
        "--id",
        &event_id,
    ];
    let (status, doc, err) = fleetctl_json(&one, None).await;
    assert!(status.success(), "{err}");
    let written = read_stream(&mut conn, &stream).await;
    assert_eq!(written.len(), 1);
    assert_eq!(
        doc,
        json!({"stream": stream, "published": 1, "event_id": event_id,
            "first_entry_id": written[0].0, "last_entry_id": written[0].0})
    );
    let (status, doc, err) =
        fleetctl_json(&["publish", "--stream", &stream, "--generate", "5"], None).await;
    assert!(status.success(), "{err}");
    let written = read_stream(&mut conn, &stream).await;
    assert_eq!(
        (
            &doc["published"],
            &doc["first_entry_id"],
            &doc["last_entry_id"]
        ),
        (&json!(5), &json!(written[1].0), &json!(written[5].0))
    );
    let lines = format!(
        "{}\n{}\n",
        user_line(Uuid::now_v7(), 1, false),
        user_line(Uuid::now_v7(), 2, false)
    );
    let (status, out, err) = fleetctl_stdin(
        &[
            "publish", "--stream", &stream, "--file", "-", "--output", "json",
        ],
        &lines,
    )
    .await;
    assert!(status.success(), "{err}");
    let doc: Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(doc["published"], 2);

    // A failure too: the error as a document on stdout, its line on stderr.
    let (status, doc, err) =
        fleetctl_json(&["dlq", "show", "--stream", &stream, "1-1"], None).await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        doc["error"]
            .as_str()
            .unwrap()
            .contains("no dead letter 1-1"),
        "{doc}"
    );
    assert!(err.contains("no dead letter 1-1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_replay_still_prints_its_plan_and_why_under_output_json() {
    let mut conn = redis().await;
    // c1 just read: an active consumer.
    let stream = read_stream_of_ten(&mut conn).await;
    let (status, out, err) = replay(
        &stream,
        &[
            "--group",
            "g",
            "--to-id",
            "5000-0",
            "--dry-run",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(status.code(), Some(1), "{out}{err}");
    let plan: Value = serde_json::from_str(&out).expect(&out);
    assert!(
        plan["refused"]
            .as_str()
            .is_some_and(|r| r.contains("active consumers: c1")),
        "{plan}"
    );
    assert_eq!(
        (&plan["entries"], &plan["dry_run"]),
        (&json!(5), &json!(true))
    );
    assert!(err.contains("refused") && err.contains("--force"), "{err}");
    assert!(
        read_new(&mut conn, &stream).await.is_empty(),
        "nothing moved"
    );
}

/// Deletes the rows of `events` from PostgreSQL.
async fn delete_rows(pool: &sqlx::PgPool, events: &[Uuid]) {
    sqlx::query("DELETE FROM events WHERE event_id = ANY($1)")
        .bind(events)
        .execute(pool)
        .await
        .unwrap();
}

/// (entry id, event id) pairs as reconcile's JSON lists them under `list`, with `id_field`.
fn gaps(doc: &Value, list: &str, id_field: &str) -> Vec<(String, String)> {
    doc[list]
        .as_array()
        .unwrap_or_else(|| panic!("{list} in {doc}"))
        .iter()
        .map(|g| {
            (
                g[id_field].as_str().unwrap().to_owned(),
                g["event_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Reconcile compares a range a chunk at a time (the hidden `--chunk`): in chunks of 1, 2 and 7
/// entries it finds exactly what it finds in chunks of 1 000, with runs of gaps on both sides
/// that span chunk boundaries, rows whose event moved to another entry, events in flight and
/// dead-lettered, over the whole stream and over a range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_in_small_chunks_finds_the_same_gaps_across_chunk_boundaries() {
    let db = fresh_database().await;
    let pool = migrated_database(&db).await;
    reject_trigger(&pool, true).await;
    let mut conn = redis().await;
    let stream = unique("reconcile-chunks:");
    // 180 entries: every sixth a flow event (not strict), the others strict user events, two of
    // them rejected by PostgreSQL (dead letters).
    let rejected = [31, 32];
    let lines: Vec<String> = (0..180)
        .map(|n| match n % 6 {
            5 => streamfleet_tests::corpus::valid_line(Uuid::now_v7(), false, n),
            _ => user_line(Uuid::now_v7(), n, rejected.contains(&n)),
        })
        .collect();
    publish_lines(&stream, &lines).await;
    let mut persister = WorkerEnv::new(&stream, &db)
        .set("FLEET_CONFIG", &config(""))
        .start("persister")
        .await;
    wait_settled(&conn, &stream, "persister").await;
    persister.stop_cleanly().await;
    let entries = read_stream(&mut conn, &stream).await;
    let user = |n: usize| n % 6 != 5;
    let persisted = |n: usize| user(n) && !rejected.contains(&n);
    assert_eq!(
        rows(&pool).await,
        (0..180).filter(|n| persisted(*n)).count() as i64
    );
    let event = |n: usize| entries[n].1["id"].clone();
    let pair = |n: usize| (entries[n].0.clone(), event(n));

    // PostgreSQL loses the rows of a run of 13 entries, of the first and of one more.
    let lost_rows: Vec<usize> = [0, 97]
        .into_iter()
        .chain(40..=52)
        .filter(|n| persisted(*n))
        .collect();
    let lost: Vec<Uuid> = lost_rows
        .iter()
        .map(|n| event(*n).parse().unwrap())
        .collect();
    delete_rows(&pool, &lost).await;
    // The stream loses a run of 60 entries and one near the end; two of those events come back
    // under new entries (as a producer's retry would), so their rows are not missing.
    let gone: Vec<usize> = (100..160).chain([178]).collect();
    let _: u64 = redis::cmd("XDEL")
        .arg(&stream)
        .arg(
            gone.iter()
                .map(|n| entries[*n].0.as_str())
                .collect::<Vec<_>>(),
        )
        .query_async(&mut conn)
        .await
        .unwrap();
    let moved = [110, 150];
    for n in moved {
        let fields: Vec<(&String, &String)> = entries[n].1.iter().collect();
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg(fields)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // Five strict events the persister has not read yet.
    let late: Vec<String> = (0..5)
        .map(|n| user_line(Uuid::now_v7(), n, false))
        .collect();
    publish_lines(&stream, &late).await;

    let mut missing_in_pg: Vec<(String, String)> = lost_rows.iter().map(|n| pair(*n)).collect();
    missing_in_pg.sort_by_key(|(e, _)| entry_id_key(e));
    let missing_in_stream: Vec<(String, String)> = gone
        .iter()
        .filter(|n| persisted(**n) && !moved.contains(*n))
        .map(|n| pair(*n))
        .collect();
    let reconcile = |extra: Vec<String>| {
        let db = db.clone();
        let stream = stream.clone();
        async move {
            let mut args = vec!["reconcile", "--stream", &stream];
            args.extend(extra.iter().map(String::as_str));
            fleetctl_json(&args, Some(&db)).await
        }
    };
    let (status, whole, err) = reconcile(vec![]).await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(
        gaps(&whole, "missing_in_postgres", "entry_id"),
        missing_in_pg
    );
    assert_eq!(
        gaps(&whole, "missing_in_stream", "stream_id"),
        missing_in_stream
    );
    assert_eq!(
        (&whole["in_flight"], &whole["dead_lettered"]),
        (&json!(5), &json!(2)),
        "{whole}"
    );
    let remaining = 180 - gone.len() + moved.len() + late.len();
    assert_eq!(whole["entries"], remaining);
    for chunk in ["1", "2", "7"] {
        let (status, doc, err) = reconcile(vec!["--chunk".into(), chunk.into()]).await;
        assert_eq!(status.code(), Some(1), "{err}");
        assert_eq!(doc, whole, "in chunks of {chunk}");
    }

    // A range, from inside the first run of lost rows to inside the run of lost entries: the
    // moved events are outside it, so their rows are missing from it.
    let (from, to) = (entries[45].0.clone(), entries[120].0.clone());
    let within =
        |id: &String| (entry_id_key(&from)..=entry_id_key(&to)).contains(&entry_id_key(id));
    let range = vec![
        "--from".to_owned(),
        from.clone(),
        "--to".to_owned(),
        to.clone(),
    ];
    let (status, ranged, err) = reconcile(range.clone()).await;
    assert_eq!(status.code(), Some(1), "{err}");
    let in_range = |list: &[(String, String)]| -> Vec<(String, String)> {
        list.iter().filter(|(e, _)| within(e)).cloned().collect()
    };
    assert_eq!(
        gaps(&ranged, "missing_in_postgres", "entry_id"),
        in_range(&missing_in_pg)
    );
    let mut expected_stream: Vec<(String, String)> = gone
        .iter()
        .filter(|n| persisted(**n))
        .map(|n| pair(*n))
        .collect();
    expected_stream.retain(|(e, _)| within(e));
    assert_eq!(
        gaps(&ranged, "missing_in_stream", "stream_id"),
        expected_stream
    );
    for chunk in ["1", "3"] {
        let mut args = range.clone();
        args.extend(["--chunk".into(), chunk.into()]);
        let (_, doc, _) = reconcile(args).await;
        assert_eq!(doc, ranged, "the range in chunks of {chunk}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_redrives_move_each_dead_letter_once_and_both_succeed() {
    let mut conn = redis().await;
    // The two runs must overlap for this to prove anything; they nearly always do at once.
    for attempt in 0..5 {
        let stream = unique("redrive-race:");
        let ids = dead_letters(&mut conn, &stream, 5000).await;
        let redrive = ["dlq", "redrive", "--stream", &stream, "--all"];
        let json_run = [&redrive[..], &["--output", "json"]].concat();
        let ((status_a, out_a, err_a), (status_b, out_b, err_b)) =
            tokio::join!(fleetctl(&json_run, None), fleetctl(&redrive, None));
        assert!(status_a.success(), "{err_a}");
        assert!(status_b.success(), "{out_b}{err_b}");
        assert!(err_a.len() + err_b.len() < 500, "stderr:\n{err_a}\n{err_b}");
        // Each run's counts are what it moved: together, every dead letter once.
        let a: Value = serde_json::from_str(&out_a).expect(&out_a);
        let done_a = a["done"].as_array().unwrap().len() as u64;
        assert_eq!(
            a["by_group"],
            json!([{"group": "persister", "dead_letters": done_a}]),
            "{a}"
        );
        assert_eq!(a["refused"], json!([]));
        let gone_a = a["already_gone"].as_u64().unwrap();
        assert_eq!(done_a + gone_a, a["selected"].as_u64().unwrap());
        let done_b: u64 = out_b
            .lines()
            .find_map(|l| l.strip_prefix("redriven: "))
            .and_then(|l| l.split(' ').next())
            .and_then(|n| n.parse().ok())
            .expect(&out_b);
        if done_b > 0 {
            assert!(
                out_b.contains(&format!("  persister: {done_b}\n")),
                "{out_b}"
            );
        }
        assert_eq!(done_a + done_b, 5000, "{out_b}");
        assert_eq!(xlen(&mut conn, &format!("{stream}:dlq")).await, 0);
        let copies = event_ids(&mut conn, &stream).await;
        assert!(copies.values().all(|n| *n == 1), "none doubled");
        let want: HashSet<String> = ids.iter().map(Uuid::to_string).collect();
        assert_eq!(copies.into_keys().collect::<HashSet<_>>(), want);
        if gone_a > 0 || out_b.contains("already gone") {
            eprintln!("the redrives overlapped at attempt {attempt}: {done_a} + {done_b}");
            return;
        }
    }
    panic!("the two redrives never overlapped");
}
