//! Watches the consumer group beside the pipeline: lag and pending into gauges (so lag is visible
//! and KEDA can scale on it), consumers active and idle, the safe removal of idle consumers that
//! own no pending entries, and no other live process under this consumer name. Figures are summed
//! per `FLEET_STREAMS` item, so a glob over thousands of streams is a handful of series.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use crate::runtime::conn::Conn;
use crate::stream::groups::{find_group, GroupsReplyError};
use crate::stream::EntryId;
use redis::Value;
use tokio::sync::watch;

use crate::runtime::health::{Fault, Health};
use crate::runtime::metrics as m;
use crate::runtime::scripts::{query_loading, Lua};
use crate::source::identity::Identity;
use crate::source::StreamLabels;

/// Lag and pending of one group on one stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupState {
    /// Entries not yet delivered to the group; `None` when Redis cannot tell (after deletions).
    pub lag: Option<u64>,
    /// Entries delivered and not yet acknowledged.
    pub pending: u64,
}

/// The state of `group` in an `XINFO GROUPS` reply, and its position.
fn parse_group_state(
    reply: &Value,
    group: &str,
) -> Result<Option<(GroupState, EntryId)>, GroupsReplyError> {
    Ok(find_group(reply, group)?.map(|g| {
        (
            GroupState {
                lag: g.lag,
                pending: g.pending,
            },
            g.last_delivered,
        )
    }))
}

/// Deletes, atomically, the consumers other than ARGV[3] that have been idle at least ARGV[2] ms
/// and own no pending entries (a consumer that owns entries is never deleted: they would vanish
/// from the pending list). Returns {deleted names, active count, idle count}.
static CLEAN_CONSUMERS: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r#"
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
"#,
    )
});

/// What the watcher needs to know about this worker.
#[derive(Debug, Clone)]
pub struct Watch {
    pub group: String,
    pub consumer: String,
    pub interval: Duration,
    pub consumer_idle_ms: u64,
    /// To check that no other live process uses this consumer name.
    pub identity: Identity,
    pub health: Arc<Health>,
    /// The `stream` label of each stream's metrics.
    pub labels: StreamLabels,
    /// Per stream, the end of the last cut reported (each cut is said once).
    pub reported_cuts: BTreeMap<Arc<str>, EntryId>,
}

/// Streams sampled per round trip.
const SAMPLE_CHUNK: usize = 100;

/// The figures of one label (a `FLEET_STREAMS` item) summed over its streams.
#[derive(Debug, Default)]
struct Totals {
    lag: Option<u64>,
    /// Some stream's lag is unknown (Redis reports nil after deletions in the stream).
    lag_unknown: bool,
    pending: u64,
    /// Age of the oldest pending entry, in milliseconds.
    oldest_ms: Option<u64>,
    active: u64,
    idle: u64,
    deleted: u64,
}

impl Watch {
    /// One sample: lag, pending and consumers of every stream, summed per label, one pipelined
    /// round trip per chunk of streams; and the duplicate consumer check.
    async fn sample(&mut self, conn: &mut Conn, streams: &[Arc<str>]) {
        let mut totals: BTreeMap<Arc<str>, Totals> = BTreeMap::new();
        // Streams whose lag Redis cannot tell (entries deleted past the group's position), and
        // those whose lag exceeds their length (unread entries trimmed).
        let mut unknown: Vec<(Arc<str>, EntryId)> = Vec::new();
        let mut trimmed: Vec<(Arc<str>, EntryId, u64, u64)> = Vec::new();
        for chunk in streams.chunks(SAMPLE_CHUNK) {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for stream in chunk {
                pipe.cmd("XINFO").arg("GROUPS").arg(&**stream);
                pipe.cmd("XPENDING").arg(&**stream).arg(&self.group);
                pipe.add_command(CLEAN_CONSUMERS.call())
                    .arg(1)
                    .arg(&**stream)
                    .arg(&self.group)
                    .arg(self.consumer_idle_ms)
                    .arg(&self.consumer);
                pipe.cmd("XLEN").arg(&**stream);
            }
            let replies = match query_loading(&pipe, conn, &[&CLEAN_CONSUMERS]).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "lag sample failed");
                    return;
                }
            };
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            for (stream, replies) in chunk.iter().zip(replies.chunks(4)) {
                let (info, summary, cleaned) = (&replies[0], &replies[1], &replies[2]);
                let length = replies[3]
                    .as_ref()
                    .ok()
                    .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok());
                let t = totals.entry(self.labels.of(stream)).or_default();
                let state = info
                    .as_ref()
                    .map_err(|e| e.to_string())
                    .and_then(|v| parse_group_state(v, &self.group).map_err(|e| e.to_string()));
                match state {
                    Ok(Some((state, last_delivered))) => {
                        match state.lag {
                            Some(lag) => {
                                t.lag = Some(t.lag.unwrap_or(0) + lag);
                                if let Some(length) = length.filter(|len| lag > *len) {
                                    trimmed.push((stream.clone(), last_delivered, lag, length));
                                }
                            }
                            None => {
                                t.lag_unknown = true;
                                unknown.push((stream.clone(), last_delivered));
                            }
                        }
                        t.pending += state.pending;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::debug!(error = %e, %stream, "lag sample failed"),
                }
                // XPENDING's summary: `[count, smallest id, greatest id, consumers]`; the smallest
                // id's time is when the oldest pending entry was written.
                if let Ok(Value::Array(parts)) = summary {
                    if let Some(Value::BulkString(id)) = parts.get(1) {
                        let ms = std::str::from_utf8(id)
                            .ok()
                            .and_then(|id| id.split('-').next()?.parse::<u64>().ok());
                        if let Some(ms) = ms {
                            let age = now_ms.saturating_sub(ms);
                            t.oldest_ms = Some(t.oldest_ms.map_or(age, |o| o.max(age)));
                        }
                    }
                }
                let cleaned = cleaned.as_ref().map_err(|e| e.to_string()).and_then(|v| {
                    redis::from_redis_value_ref::<(Vec<String>, u64, u64)>(v)
                        .map_err(|e| e.to_string())
                });
                match cleaned {
                    Ok((deleted, active, idle)) => {
                        for name in &deleted {
                            tracing::info!(%stream, consumer = %name, "deleted idle consumer with no pending entries");
                        }
                        t.deleted += deleted.len() as u64;
                        t.active += active;
                        t.idle += idle;
                    }
                    Err(e) => tracing::debug!(error = %e, %stream, "consumer clean-up failed"),
                }
            }
        }
        for (label, t) in totals {
            let label = label.to_string();
            // Unknown is NaN (a gap on a graph, false in any comparison), never the last value
            // seen: a stale lag would page "no progress" on a stream that has none to make.
            let lag = match t.lag {
                Some(lag) if !t.lag_unknown => lag as f64,
                _ => f64::NAN,
            };
            metrics::gauge!(m::GROUP_LAG, "stream" => label.clone()).set(lag);
            metrics::gauge!(m::GROUP_PENDING, "stream" => label.clone()).set(t.pending as f64);
            metrics::gauge!(m::GROUP_OLDEST_PENDING, "stream" => label.clone())
                .set(t.oldest_ms.unwrap_or(0) as f64 / 1000.0);
            metrics::counter!(m::CONSUMERS_DELETED, "stream" => label.clone()).increment(t.deleted);
            metrics::gauge!(m::GROUP_CONSUMERS, "stream" => label.clone(), "state" => "active")
                .set(t.active as f64);
            metrics::gauge!(m::GROUP_CONSUMERS, "stream" => label, "state" => "idle")
                .set(t.idle as f64);
        }
        self.cuts(conn, &unknown, &trimmed).await;
        match self.identity.duplicates(conn).await {
            Some(d) if !d.is_empty() => self.health.raise(
                Fault::ConsumerNameInUse,
                &format!(
                    "consumer {} of group {} is also used by a live process ({}): entries may be processed twice",
                    self.consumer, self.group, d[0]
                ),
            ),
            Some(_) => self.health.clear(Fault::ConsumerNameInUse),
            None => {}
        }
    }
}

impl Watch {
    /// Looks, where the lag is unknown, for entries deleted before the group read them; says each
    /// cut once (an ERROR line naming the range, a metric) and keeps the worker unready while the
    /// group has not read past one.
    async fn cuts(
        &mut self,
        conn: &mut Conn,
        unknown: &[(Arc<str>, EntryId)],
        trimmed: &[(Arc<str>, EntryId, u64, u64)],
    ) {
        use crate::stream::cut;
        let mut found: Vec<(Arc<str>, cut::Cut)> = Vec::new();
        let names: Vec<&Arc<str>> = unknown.iter().map(|(s, _)| s).collect();
        let Some(infos) = stream_infos(conn, &names).await else {
            return;
        };
        for ((stream, last_delivered), info) in unknown.iter().zip(infos) {
            if let Some(c) = info.and_then(|r| cut::cut(*last_delivered, &r)) {
                found.push((stream.clone(), c));
            }
        }
        // The first entry's id, where a trim is seen (its fields come along).
        let names: Vec<&Arc<str>> = trimmed.iter().map(|(s, ..)| s).collect();
        let Some(infos) = stream_infos(conn, &names).await else {
            return;
        };
        for ((stream, last_delivered, lag, length), info) in trimmed.iter().zip(infos) {
            let first = info
                .and_then(|r| cut::deleted_and_first(&r))
                .and_then(|(_, first)| first);
            if let Some(c) = cut::trimmed(*last_delivered, *lag, *length, first) {
                found.push((stream.clone(), c));
            }
        }
        let mut open = Vec::new();
        for (stream, cut) in found {
            open.push(format!("{stream}: {cut}"));
            if self
                .reported_cuts
                .get(&stream)
                .is_some_and(|r| *r >= cut.through)
            {
                continue;
            }
            tracing::error!(
                %stream,
                group = %self.group,
                after = %cut.after,
                through = %cut.through,
                first = ?cut.first.map(|f| f.to_string()),
                "entries were deleted before this group read them (a producer's MAXLEN, an XTRIM or XDEL): {cut} are lost to it; `fleetctl reconcile` names those PostgreSQL holds"
            );
            metrics::counter!(m::ENTRIES_CUT, "stream" => self.labels.of(&stream).to_string())
                .increment(1);
            self.reported_cuts.insert(stream, cut.through);
        }
        if open.is_empty() {
            self.health.clear(Fault::EntriesCut);
        } else {
            self.health.raise(
                Fault::EntriesCut,
                &format!(
                    "entries deleted before group {} read them: {}",
                    self.group,
                    open.join("; ")
                ),
            );
        }
    }
}

/// `XINFO STREAM` of each stream (`None` where it failed), a round trip per chunk; `None` if
/// Redis did not answer.
async fn stream_infos(conn: &mut Conn, streams: &[&Arc<str>]) -> Option<Vec<Option<Value>>> {
    let mut out = Vec::with_capacity(streams.len());
    for chunk in streams.chunks(SAMPLE_CHUNK) {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for stream in chunk {
            pipe.cmd("XINFO").arg("STREAM").arg(&***stream);
        }
        let replies = pipe
            .query_async::<Vec<redis::RedisResult<Value>>>(conn)
            .await
            .ok()?;
        out.extend(replies.into_iter().map(Result::ok));
    }
    Some(out)
}

/// Samples every `interval` until the task is dropped.
pub fn spawn_sampler(
    mut conn: Conn,
    mut watch: Watch,
    streams: watch::Receiver<Vec<Arc<str>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(watch.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let current = streams.borrow().clone();
            watch.sample(&mut conn, &current).await;
        }
    })
}
