//! Watches the consumer group beside the pipeline: lag and pending per stream into gauges (so lag
//! is visible and KEDA can scale on it), consumers active and idle, and the safe removal of idle
//! consumers that own no pending entries.

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

/// Deletes, atomically, the consumers other than ARGV[3] that have been idle at least ARGV[2] ms
/// and own no pending entries (a consumer that owns entries is never deleted: they would vanish
/// from the pending list). Returns {deleted names, active count, idle count}.
const CLEAN_CONSUMERS: &str = r#"
local deleted, active, idle = {}, 0, 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['idle'] >= tonumber(ARGV[2]) and f['name'] ~= ARGV[3] then
    if f['pending'] == 0 then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
      table.insert(deleted, f['name'])
    else
      idle = idle + 1
    end
  else
    active = active + 1
  end
end
return {deleted, active, idle}
"#;

/// The group's consumers on one stream after a clean-up pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Consumers {
    /// Idle consumers removed by this pass (they owned nothing).
    pub deleted: Vec<String>,
    /// Consumers seen recently (this one included).
    pub active: u64,
    /// Idle consumers that still own pending entries (the reclaimer takes those over).
    pub idle: u64,
}

/// Runs one clean-up pass on `stream`.
pub async fn clean_consumers(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
    idle_ms: u64,
    own: &str,
) -> redis::RedisResult<Consumers> {
    let (deleted, active, idle): (Vec<String>, u64, u64) = redis::cmd("EVAL")
        .arg(CLEAN_CONSUMERS)
        .arg(1)
        .arg(stream)
        .arg(group)
        .arg(idle_ms)
        .arg(own)
        .query_async(conn)
        .await?;
    Ok(Consumers {
        deleted,
        active,
        idle,
    })
}

/// What the watcher needs to know about this worker.
#[derive(Debug, Clone)]
pub struct Watch {
    pub group: String,
    pub consumer: String,
    pub interval: Duration,
    pub consumer_idle_ms: u64,
}

/// Samples every `interval` until the task is dropped.
pub fn spawn_sampler(
    mut conn: ConnectionManager,
    watch: Watch,
    streams: watch::Receiver<Vec<Arc<str>>>,
) -> tokio::task::JoinHandle<()> {
    let Watch {
        group,
        consumer,
        interval,
        consumer_idle_ms,
    } = watch;
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
                match clean_consumers(&mut conn, &stream, &group, consumer_idle_ms, &consumer).await
                {
                    Ok(c) => {
                        let label = stream.to_string();
                        for name in &c.deleted {
                            tracing::info!(%stream, consumer = %name, "deleted idle consumer with no pending entries");
                        }
                        metrics::counter!(m::CONSUMERS_DELETED, "stream" => label.clone())
                            .increment(c.deleted.len() as u64);
                        metrics::gauge!(m::GROUP_CONSUMERS, "stream" => label.clone(), "state" => "active").set(c.active as f64);
                        metrics::gauge!(m::GROUP_CONSUMERS, "stream" => label, "state" => "idle")
                            .set(c.idle as f64);
                    }
                    Err(e) => tracing::debug!(error = %e, %stream, "consumer clean-up failed"),
                }
            }
        }
    })
}
