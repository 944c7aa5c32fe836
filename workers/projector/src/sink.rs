//! The projector's handler: a transactional sink on the Redis the streams live on. Each batch is
//! one `effects.lua` call per stream, in one round trip: the script applies the effects of exactly
//! the entries still pending in the group and acknowledges them in the same atomic step, so an
//! entry redelivered (after a crash, or reclaimed by another replica) applies nothing, with any
//! number of replicas and with Redis memory bounded by keys, not by events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::{RedisError, Value};
use streamfleet::runtime::conn::Conn;
use streamfleet::runtime::connect::RedisTarget;
use streamfleet::runtime::grants;
use streamfleet::runtime::scripts::query_loading;
use streamfleet::store::redis_checkpoints;
use streamfleet::{Applied, Batch, EntryId, Handler, HandlerError, Rejected};
use tokio::sync::OnceCell;

use crate::actions::Action;
use crate::plan::{Call, Refreshes, Settings, EFFECTS};

/// Effects in Redis, acknowledged with them.
#[derive(Clone)]
pub struct RedisSink {
    target: RedisTarget,
    /// Shared by every clone (lanes, the checkpoint reader): connected once.
    conn: Arc<OnceCell<Conn>>,
    dedup_window_s: u64,
    /// Whether every route's keys can share their stream's slot (`slots::check`): a start
    /// error on a cluster when not.
    co_partitioned: Result<(), String>,
    /// Each route's actions, by route index (the projector's own settings of the routes).
    actions: Arc<Vec<Vec<Action>>>,
    /// Shared by the lanes: each plans under the lock, and records what its batch did.
    refreshes: Arc<std::sync::Mutex<Refreshes>>,
}

impl RedisSink {
    /// A sink on the Redis `target` names; `dedup_window_s` (0: off) is how long a producer's retry
    /// of an event is recognised; `co_partitioned` says whether the routes' keys can share their
    /// streams' slots (required on a cluster); `actions` are each route's, by route index.
    pub fn new(
        target: RedisTarget,
        dedup_window_s: u64,
        co_partitioned: Result<(), String>,
        actions: Arc<Vec<Vec<Action>>>,
    ) -> Self {
        RedisSink {
            target,
            conn: Arc::new(OnceCell::new()),
            dedup_window_s,
            co_partitioned,
            actions,
            refreshes: Arc::default(),
        }
    }

    async fn conn(&self) -> Result<Conn, HandlerError> {
        self.conn
            .get_or_try_init(|| self.target.connect(Duration::from_secs(10)))
            .await
            .cloned()
            .map_err(|e| classify(&e))
    }
}

/// Every command `effects.lua` runs, in a form that could run harmlessly: checked at start (see
/// `refused_commands`).
const SCRIPT_COMMANDS: &[&[&str]] = &[
    &["XACK", PROBE_KEY, "g", "0-1"],
    &["TYPE", PROBE_KEY],
    &["GET", PROBE_KEY],
    &["HGET", PROBE_KEY, "version"],
    &["HSET", PROBE_KEY, "f", "v"],
    &["SMISMEMBER", PROBE_KEY, "m"],
    &["SADD", PROBE_KEY, "m"],
    &["EXPIRE", PROBE_KEY, "1"],
    &["XADD", PROBE_KEY, "*", "f", "v"],
    &["XDEL", PROBE_KEY, "0-1"],
    &["XCLAIM", PROBE_KEY, "g", "c", "0", "0-1", "FORCE", "JUSTID"],
    &["DEL", PROBE_KEY],
    &["INCRBY", PROBE_KEY, "0"],
    &["HDEL", PROBE_KEY, "f"],
    &["PERSIST", PROBE_KEY],
    &["TIME"],
    &["ZADD", PROBE_KEY, "1", "m"],
    &["ZRANGE", PROBE_KEY, "0", "-1"],
    &["ZREMRANGEBYSCORE", PROBE_KEY, "-inf", "0"],
    &["PEXPIREAT", PROBE_KEY, "1"],
];
const PROBE_KEY: &str = "streamfleet:acl-probe";

/// The commands of `effects.lua` the ACL user may not run (`runtime::grants`): a script refused
/// a command half-way would keep what it did before, entries acknowledged included, and lose the
/// rest of their effects; so a missing grant stops the worker at start instead. (A key outside
/// the user's patterns is refused for the whole script before it runs: that is the batch's, not
/// a start error, so the probe key's own refusals are not counted.)
async fn refused_commands(conn: &mut Conn) -> Result<Vec<String>, RedisError> {
    let checks: Vec<(&str, redis::Cmd)> = SCRIPT_COMMANDS
        .iter()
        .map(|command| {
            let mut cmd = redis::cmd(command[0]);
            for arg in &command[1..] {
                cmd.arg(*arg);
            }
            (command[0], cmd)
        })
        .collect();
    Ok(grants::refused(conn, &checks)
        .await?
        .into_iter()
        .filter(|refused| !refused.contains(" on "))
        .collect())
}

/// What a Redis error means for the batch.
fn classify(e: &RedisError) -> HandlerError {
    HandlerError::from_redis(e)
}

impl RedisSink {
    /// The batch as one call per stream; the events no template can be rendered for are
    /// rejected. Under the refreshes' lock, with no await.
    fn plan(
        &self,
        batch: &Batch<'_>,
        settings: &Settings<'_>,
    ) -> (Vec<Call>, Vec<Rejected>, HashMap<String, u64>) {
        let mut calls: Vec<Call> = Vec::new();
        let mut rejected = Vec::new();
        let shared = self.refreshes.lock().unwrap_or_else(|e| e.into_inner());
        let mut refreshes = shared.plan();
        for r in &batch.events {
            let call = match calls.iter_mut().position(|c| c.stream == *r.stream) {
                Some(i) => &mut calls[i],
                None => {
                    calls.push(Call::new(r.stream.clone()));
                    calls.last_mut().expect("just pushed")
                }
            };
            if let Err(error) = call.add(r, settings, &mut refreshes) {
                tracing::warn!(stream = %r.stream, entry_id = %r.entry_id, event_id = %r.event.id, %error, "dead-lettering an event the projector cannot apply");
                rejected.push(Rejected {
                    stream: r.stream.clone(),
                    entry_id: r.entry_id,
                    error,
                });
            }
        }
        (calls, rejected, refreshes.into_planned())
    }
}

impl Handler for RedisSink {
    const ACKNOWLEDGES: bool = true;

    /// Connects, checks that the user may run every command of the script and loads it: a
    /// missing grant stops the worker at start (exit 2), naming the commands.
    async fn prepare(&mut self) -> Result<(), HandlerError> {
        let mut conn = self.conn().await?;
        if conn.is_cluster() {
            if let Err(why) = &self.co_partitioned {
                return Err(HandlerError::Misconfigured(why.clone()));
            }
        }
        let refused = refused_commands(&mut conn)
            .await
            .map_err(|e| classify(&e))?;
        if !refused.is_empty() {
            return Err(HandlerError::Misconfigured(format!(
                "FLEET_REDIS_URL: the user may not run {} (the projector's script needs them; see deploy/redis/users.acl)",
                refused.join(", ")
            )));
        }
        let loaded: Result<String, RedisError> = EFFECTS.load().query_async(&mut conn).await;
        loaded.map(drop).map_err(|e| classify(&e))
    }

    async fn apply(&mut self, batch: &Batch<'_>) -> Result<Applied, HandlerError> {
        let settings = Settings {
            group: batch.group,
            consumer: batch.consumer,
            dedup_window_s: self.dedup_window_s,
            cluster: self.conn().await?.is_cluster(),
            actions: &self.actions,
        };
        let (mut calls, rejected, refreshed) = self.plan(batch, &settings);
        for c in &batch.checkpoints {
            match calls.iter_mut().find(|call| call.stream == c.stream) {
                Some(call) => call.checkpoint = Some(c.position),
                None => {
                    let mut call = Call::new(c.stream.clone());
                    call.checkpoint = Some(c.position);
                    calls.push(call);
                }
            }
        }
        let mut applied = Applied {
            rejected,
            ..Applied::default()
        };
        if calls.is_empty() {
            return Ok(applied);
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for call in &calls {
            pipe.add_command(call.command(&settings));
        }
        let mut conn = self.conn().await?;
        let replies = query_loading(&pipe, &mut conn, &[&EFFECTS])
            .await
            .map_err(|e| classify(&e))?;
        // A call that failed leaves the batch to be retried whole: the calls that succeeded
        // acknowledged their entries, which then apply nothing the second time.
        for (call, reply) in calls.iter().zip(replies) {
            let reply = reply.map_err(|e| classify(&e))?;
            read_reply(call, reply, &mut applied)?;
        }
        self.refreshes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .applied(refreshed);
        Ok(applied)
    }

    async fn check(&self) -> Result<(), HandlerError> {
        let mut conn = self.conn().await?;
        let pong: Result<String, RedisError> = redis::cmd("PING").query_async(&mut conn).await;
        pong.map(drop).map_err(|e| match classify(&e) {
            m @ HandlerError::Misconfigured(_) => m,
            other => HandlerError::Unavailable(other.to_string()),
        })
    }

    async fn checkpoint(&self, stream: &str, group: &str) -> Result<Option<EntryId>, HandlerError> {
        let mut conn = self.conn().await?;
        redis_checkpoints::read(&mut conn, stream, group)
            .await
            .map_err(|e| classify(&e))
    }
}

/// Adds what one call did: `{applied, duplicates, skipped, checkpoint, entry number, error,
/// ...}`, or
/// `{-1, error}` when the group is gone (its entries with it: nothing was applied, the group
/// created again delivers them from its checkpoint).
fn read_reply(call: &Call, reply: Value, applied: &mut Applied) -> Result<(), HandlerError> {
    let bad = || {
        HandlerError::Transient(format!(
            "unexpected reply from the projector's script for {}",
            call.stream
        ))
    };
    let Value::Array(items) = reply else {
        return Err(bad());
    };
    let int = |v: &Value| match v {
        Value::Int(n) => Some(*n),
        _ => None,
    };
    let head: Vec<i64> = items.iter().take(4).map_while(int).collect();
    if head.first() == Some(&-1) {
        tracing::warn!(stream = %call.stream, entries = call.sent.len() + call.plain.len(), "consumer group gone while applying: left to the group created again");
        applied.duplicates += call.sent.len() + call.plain.len();
        return Ok(());
    }
    let &[done, duplicates, skipped, checkpoint] = &head[..] else {
        return Err(bad());
    };
    if checkpoint < 0 {
        tracing::warn!(stream = %call.stream, key = %streamfleet::store::redis_checkpoints::key(&call.stream), "the checkpoints key holds another type than a hash: the checkpoint is not written");
    }
    for pair in items[4..].chunks(2) {
        let (Some(n), Some(Value::BulkString(why))) = (pair.first().and_then(int), pair.get(1))
        else {
            return Err(bad());
        };
        let entry_id = *call
            .sent
            .get((n as usize).wrapping_sub(1))
            .ok_or_else(bad)?;
        let error = String::from_utf8_lossy(why).into_owned();
        tracing::warn!(stream = %call.stream, %entry_id, %error, "dead-lettering an event whose effect Redis would refuse");
        applied.rejected.push(Rejected {
            stream: call.stream.clone(),
            entry_id,
            error,
        });
    }
    applied.applied += done as usize;
    applied.duplicates += duplicates as usize;
    applied.skipped += skipped as usize;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_of_the_script_is_checked_at_start() {
        let script = include_str!("effects.lua");
        let mut used: Vec<&str> = Vec::new();
        for call in ["call('", "try('", "must('", "chunked('"] {
            for part in script.split(call).skip(1) {
                let name = part.split('\'').next().unwrap();
                if name.chars().all(|c| c.is_ascii_uppercase()) {
                    used.push(name);
                }
            }
        }
        used.sort();
        used.dedup();
        let mut checked: Vec<&str> = SCRIPT_COMMANDS.iter().map(|c| c[0]).collect();
        checked.sort();
        assert_eq!(used, checked);
    }
}
