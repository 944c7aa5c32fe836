//! The gateways' connection registry, for `fleetctl status`: each live gateway instance keeps
//! its connection counts per topic in `<key>:<instance>` (expiring three heartbeats after its
//! last write) and its name in the sorted set `<key>`. An instance whose hash has expired is gone
//! and is not shown.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use streamfleet::runtime::conn::Conn;

use crate::output::Table;

/// The field of an instance's hash that holds its total (no topic is spelled so).
const TOTAL_FIELD: &str = "@connections";

/// One live instance.
pub struct Instance {
    pub name: String,
    pub connections: u64,
    pub topics: BTreeMap<String, u64>,
}

/// Every live instance registered under `key`, by name.
pub async fn read(conn: &mut Conn, key: &str) -> redis::RedisResult<Vec<Instance>> {
    let names: Vec<String> = redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await?;
    let mut out = Vec::new();
    for name in names {
        let fields: BTreeMap<String, u64> = redis::cmd("HGETALL")
            .arg(format!("{key}:{name}"))
            .query_async(conn)
            .await?;
        let Some(&connections) = fields.get(TOTAL_FIELD) else {
            continue;
        };
        let topics = fields
            .into_iter()
            .filter(|(k, n)| k != TOTAL_FIELD && *n > 0)
            .collect();
        out.push(Instance {
            name,
            connections,
            topics,
        });
    }
    Ok(out)
}

/// The instances as JSON: each one, and the connections per topic across all.
pub fn to_json(instances: &[Instance]) -> Value {
    let mut per_topic: BTreeMap<&str, u64> = BTreeMap::new();
    for i in instances {
        for (t, n) in &i.topics {
            *per_topic.entry(t).or_default() += n;
        }
    }
    json!({
        "connections": instances.iter().map(|i| i.connections).sum::<u64>(),
        "topics": per_topic,
        "instances": instances
            .iter()
            .map(|i| json!({"instance": i.name, "connections": i.connections, "topics": i.topics}))
            .collect::<Vec<_>>(),
    })
}

/// One row per instance, its busiest topics first.
pub fn table(instances: &[Instance]) -> Table {
    let mut table = Table::new(&["GATEWAY", "CONNECTIONS", "TOPICS"]);
    for i in instances {
        let mut topics: Vec<(&String, &u64)> = i.topics.iter().collect();
        topics.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let shown: Vec<String> = topics
            .iter()
            .take(5)
            .map(|(t, n)| format!("{t}={n}"))
            .collect();
        let more = topics.len().saturating_sub(5);
        let mut cell = shown.join(" ");
        if more > 0 {
            cell.push_str(&format!(" (+{more} more)"));
        }
        table.row(vec![i.name.clone(), i.connections.to_string(), cell]);
    }
    table
}
