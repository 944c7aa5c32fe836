//! Samples consumer-group lag and pending counts per stream into gauges, beside the pipeline, so
//! lag is visible (and KEDA can scale on it) without touching the hot path.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Value;
use tokio::sync::watch;

use crate::metrics as m;

/// Lag and pending of one group on one stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupState {
    /// Entries not yet delivered to the group; `None` when Redis cannot tell (after deletions).
    pub lag: Option<u64>,
    /// Entries delivered and not yet acknowledged.
    pub pending: u64,
}

/// Reads `XINFO GROUPS` for `stream` and returns the state of `group`, if it exists.
pub async fn group_state(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
) -> redis::RedisResult<Option<GroupState>> {
    let groups: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await?;
    let int = |v: Option<&Value>| match v {
        Some(Value::Int(n)) => u64::try_from(*n).ok(),
        _ => None,
    };
    Ok(groups
        .iter()
        .find(|g| matches!(g.get("name"), Some(Value::BulkString(n)) if n == group.as_bytes()))
        .map(|g| GroupState {
            lag: int(g.get("lag")),
            pending: int(g.get("pending")).unwrap_or(0),
        }))
}

/// Samples every `interval` until the task is dropped.
pub fn spawn_sampler(
    mut conn: ConnectionManager,
    group: String,
    streams: watch::Receiver<Vec<Arc<str>>>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            let current = streams.borrow().clone();
            for stream in current {
                match group_state(&mut conn, &stream, &group).await {
                    Ok(Some(state)) => {
                        let label = stream.to_string();
                        if let Some(lag) = state.lag {
                            metrics::gauge!(m::GROUP_LAG, "stream" => label.clone())
                                .set(lag as f64);
                        }
                        metrics::gauge!(m::GROUP_PENDING, "stream" => label)
                            .set(state.pending as f64);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::debug!(error = %e, %stream, "lag sample failed"),
                }
            }
        }
    })
}
