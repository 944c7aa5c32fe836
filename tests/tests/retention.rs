//! Retention (`[[retention]]`, `fleetctl trim`): the caps trim below the lowest watermark of a
//! stream's groups, never an entry some group has not settled unless the rule says `cut_unread`;
//! streams without groups (dead letters, histories) are capped as they are.

use redis::aio::MultiplexedConnection;
use serde_json::Value;
use streamfleet_tests::scenario::config;
use streamfleet_tests::*;

/// `fleetctl --output json trim` with `cfg`: status, the JSON document, stderr.
async fn trim(cfg: &str, dry_run: bool) -> (i32, Value, String) {
    let mut cmd = tokio::process::Command::new(bin("fleetctl"));
    cmd.env("FLEET_REDIS_URL", redis_url())
        .env("FLEET_CONFIG", cfg)
        .args(["--output", "json", "--quiet", "trim"]);
    if dry_run {
        cmd.arg("--dry-run");
    }
    let out = cmd.output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `n` entries appended to `stream`, their ids.
async fn append(conn: &mut MultiplexedConnection, stream: &str, n: usize) -> Vec<String> {
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.cmd("XADD").arg(stream).arg("*").arg("i").arg(i);
    }
    pipe.query_async(conn).await.unwrap()
}

async fn xlen(conn: &mut MultiplexedConnection, stream: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap()
}

async fn first_id(conn: &mut MultiplexedConnection, stream: &str) -> String {
    let page: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await
        .unwrap();
    page[0].0.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_never_removes_an_entry_a_group_has_not_settled_unless_told_to() {
    let mut conn = redis().await;
    let prefix = unique("ret");
    let stream = format!("{prefix}:events");
    let ids = append(&mut conn, &stream, 1000).await;
    // A group that read 700 entries and acknowledged the first 600: 100 pending, 300 unread.
    create_group(&mut conn, &stream, "g").await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("c")
        .arg("COUNT")
        .arg(700)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: u64 = redis::cmd("XACK")
        .arg(&stream)
        .arg("g")
        .arg(&ids[..600])
        .query_async(&mut conn)
        .await
        .unwrap();
    // Dead letters and another stream without groups, under their own rules.
    let dlq = format!("{stream}:dlq");
    append(&mut conn, &dlq, 50).await;

    let keep_100 = config(&format!(
        "[[retention]]\nstreams = \"{prefix}:*:dlq\"\nmax_len = 10\n\
         [[retention]]\nstreams = \"{prefix}:*\"\nmax_len = 100\n"
    ));
    let (code, plan, stderr) = trim(&keep_100, true).await;
    assert_eq!(code, 0, "{stderr}");
    let of = |doc: &Value, s: &str| {
        doc["streams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["stream"] == s)
            .cloned()
            .unwrap_or_else(|| panic!("{s} in {doc}"))
    };
    let p = of(&plan, &stream);
    assert_eq!(
        p["min_id"],
        ids[600].as_str(),
        "held at the oldest pending: {p}"
    );
    assert_eq!(p["held_by"]["group"], "g");
    assert_eq!(p["removed"], Value::Null);
    assert_eq!(
        xlen(&mut conn, &stream).await,
        1000,
        "a dry run removes nothing"
    );

    // fleetctl status shows the rule and what the next trim would remove, and who holds it.
    let status = tokio::process::Command::new(bin("fleetctl"))
        .env("FLEET_REDIS_URL", redis_url())
        .args([
            "--output",
            "json",
            "--quiet",
            "status",
            "--streams",
            &stream,
            "--config",
            &keep_100,
        ])
        .output()
        .await
        .unwrap();
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let shown = &status["retention"][0];
    assert_eq!(shown["stream"], stream.as_str(), "{status}");
    assert_eq!(shown["rule"], format!("{prefix}:*"));
    assert_eq!(shown["next_trim_before"], ids[600].as_str());
    assert_eq!(shown["held_by"]["group"], "g");

    let (code, done, stderr) = trim(&keep_100, false).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(of(&done, &stream)["removed"], 600);
    assert_eq!(xlen(&mut conn, &stream).await, 400);
    assert_eq!(
        first_id(&mut conn, &stream).await,
        ids[600],
        "every unsettled entry kept"
    );
    // The dead letter stream, with no group, is capped as its rule says (the first that matches).
    assert_eq!(of(&done, &dlq)["removed"], 40);
    assert_eq!(of(&done, &dlq)["rule"], format!("{prefix}:*:dlq"));
    assert_eq!(xlen(&mut conn, &dlq).await, 10);
    // Again: nothing more to remove while the group has not moved.
    let (_, again, _) = trim(&keep_100, false).await;
    assert_eq!(of(&again, &stream)["removed"], 0);

    // Told to cut unread entries, the cap holds whatever the group.
    let cut = config(&format!(
        "[[retention]]\nstreams = \"{stream}\"\nmax_len = 100\ncut_unread = true\n"
    ));
    let (_, done, _) = trim(&cut, false).await;
    assert_eq!(of(&done, &stream)["removed"], 300);
    assert_eq!(first_id(&mut conn, &stream).await, ids[900]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_older_than_max_age_go_and_bad_rules_exit_2() {
    let mut conn = redis().await;
    let prefix = unique("age");
    let stream = format!("{prefix}:events");
    // 300 entries from 1970 (explicit ids), then 200 of now.
    let mut pipe = redis::pipe();
    for i in 1..=300u64 {
        pipe.cmd("XADD")
            .arg(&stream)
            .arg(format!("{i}-0"))
            .arg("i")
            .arg(i);
    }
    let _: Vec<String> = pipe.query_async(&mut conn).await.unwrap();
    append(&mut conn, &stream, 200).await;
    let week = config(&format!(
        "[[retention]]\nstreams = \"{stream}\"\nmax_age_s = 604800\n"
    ));
    let (code, done, stderr) = trim(&week, false).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(done["streams"][0]["removed"], 300, "{done}");
    assert_eq!(xlen(&mut conn, &stream).await, 200);

    for (rule, expect) in [
        (
            "[[retention]]\nstreams = \"x\"\n",
            "sets neither max_age_s nor max_len",
        ),
        (
            "[[retention]]\nstreams = \"x\"\nmax_len = 0\n",
            "max_len must be at least 1",
        ),
        (
            "[[retention]]\nstreams = \"x\"\nmax_len = 5\nmaxlen = 4\n",
            "unknown field `maxlen`",
        ),
        ("[tuning]\n", "no [[retention]] rule"),
    ] {
        let path = std::env::temp_dir().join(format!("{}.toml", unique("bad")));
        std::fs::write(&path, rule).unwrap();
        let (code, _, stderr) = trim(&path.display().to_string(), false).await;
        assert_eq!(code, 2, "{rule}: {stderr}");
        assert!(stderr.contains(expect), "{rule}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}
