//! What the projector's black-box tests share: a projector on a stream, its events, and reading
//! back what it wrote.

use std::collections::HashMap;

use redis::aio::MultiplexedConnection;
use serde_json::json;
use uuid::Uuid;

use crate::{read_stream, WorkerEnv};

/// The projector's default group.
pub const GROUP: &str = "projector";

/// A projector on `stream` with the configuration file `config` (no PostgreSQL).
pub fn projector(stream: &str, config: &str) -> WorkerEnv {
    WorkerEnv::new(stream, "")
        .unset("FLEET_DATABASE_URL")
        .set("FLEET_CONFIG", config)
}

/// A `flow.<flow>.progress` event with `data`.
pub fn flow_event(id: Uuid, flow: &str, time: &str, data: serde_json::Value) -> String {
    json!({"v": 1, "id": id.to_string(), "type": "flow.progress",
        "channel": format!("flow.{flow}.progress"), "source": "tests", "time": time, "data": data})
    .to_string()
}

/// A hash, whole.
pub async fn hgetall(conn: &mut MultiplexedConnection, key: &str) -> HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

/// A counter (0 when missing).
pub async fn get_int(conn: &mut MultiplexedConnection, key: &str) -> i64 {
    let v: Option<i64> = redis::cmd("GET").arg(key).query_async(conn).await.unwrap();
    v.unwrap_or(0)
}

/// The event ids in a history stream, in order (each entry: the event's JSON and where it was
/// read).
pub async fn history_ids(conn: &mut MultiplexedConnection, key: &str) -> Vec<String> {
    read_stream(conn, key)
        .await
        .into_iter()
        .map(|(_, f)| {
            assert!(
                f.contains_key("stream") && f.contains_key("entry_id"),
                "{f:?}"
            );
            event_of(&f)["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// The event a latest hash or a history entry holds.
pub fn event_of(fields: &HashMap<String, String>) -> serde_json::Value {
    serde_json::from_str(&fields["event"]).unwrap()
}

/// Dead letters of `stream`: (reason, error) per entry.
pub async fn dead_letters(conn: &mut MultiplexedConnection, stream: &str) -> Vec<(String, String)> {
    read_stream(conn, &format!("{stream}:dlq"))
        .await
        .into_iter()
        .map(|(_, f)| (f["dlq_reason"].clone(), f["dlq_error"].clone()))
        .collect()
}
