//! What the fleetctl tests share, on one server or a cluster: running the real binary, the
//! strict events PostgreSQL is made to reject, and reading its JSON documents.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::bin;

/// Runs fleetctl with `args` against the Redis at `url` (one server, or a cluster node) and
/// `database` when given; returns its status, stdout and stderr.
pub async fn fleetctl_at(
    url: &str,
    args: &[&str],
    database: Option<&str>,
) -> (ExitStatus, String, String) {
    let mut cmd = tokio::process::Command::new(bin("fleetctl"));
    cmd.env_clear()
        .env("FLEET_REDIS_URL", url)
        .args(args)
        .stdin(Stdio::null());
    if let Some(url) = database {
        cmd.env("FLEET_DATABASE_URL", url);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("fleetctl within 60 s")
        .expect("run fleetctl");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A strict user event, rejected by PostgreSQL (`reject_trigger`) when `reject`.
pub fn user_line(id: Uuid, n: usize, reject: bool) -> String {
    let data = if reject {
        json!({"n": n, "reject": true})
    } else {
        json!({"n": n})
    };
    json!({"v": 1, "id": id.to_string(), "type": "user.updated",
        "channel": format!("user.{}.profile", n % 7), "source": "tests",
        "time": "2026-11-26T10:00:00Z", "data": data})
    .to_string()
}

/// Events whose `data` has `reject` fail with a data exception (SQLSTATE 23514): the persister
/// dead-letters them as `handler_error`.
pub async fn reject_trigger(pool: &sqlx::PgPool, on: bool) {
    let sql = if on {
        "CREATE FUNCTION reject() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
           IF NEW.data ? 'reject' THEN RAISE EXCEPTION 'rejected event' USING ERRCODE = '23514'; END IF;
           RETURN NEW; END $$;
         CREATE TRIGGER reject BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION reject();"
    } else {
        "DROP TRIGGER reject ON events;"
    };
    sqlx::raw_sql(sql).execute(pool).await.unwrap();
}

/// The group `group` of `stream` in a `lag`/`pending`/`status` JSON document.
pub fn group_json<'a>(doc: &'a Value, stream: &str, group: &str) -> &'a Value {
    doc["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == stream)
        .unwrap_or_else(|| panic!("{stream} in {doc}"))["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == group)
        .unwrap_or_else(|| panic!("{group} in {doc}"))
}
