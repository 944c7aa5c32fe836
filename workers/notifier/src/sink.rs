//! The notifier's handler: each routed event of a batch is one `PUBLISH` (`SPUBLISH` on a
//! `sharded` route) of its v1 JSON plus
//! `stream` and `entry_id`, all in one round trip with the checkpoints (beside each stream, as the
//! projector keeps them). The pipeline acknowledges after the round trip: delivery is at least
//! once (a crash before the acknowledgement, a retried batch, a Redis restart that forgot the
//! checkpoint script all publish again), and a subscriber drops an `entry_id` of a stream it has
//! already seen.

use std::sync::Arc;
use std::time::Duration;

use redis::{RedisError, Value};
use streamfleet::event::template::Scope;
use streamfleet::runtime::conn::Conn;
use streamfleet::runtime::connect::RedisTarget;
use streamfleet::runtime::scripts::query_loading;
use streamfleet::store::redis_checkpoints::{self, FORWARD_SCRIPT};
use streamfleet::{Applied, Batch, EntryId, Handler, HandlerError, Rejected, Routed};
use tokio::sync::OnceCell;

use crate::channel::Channel;

/// Publishes on the Redis the streams live on.
#[derive(Clone)]
pub struct PubSubSink {
    target: RedisTarget,
    /// Each route's channel, by the route's index.
    channels: Arc<[Channel]>,
    /// Shared by every clone (lanes, the checkpoint reader): connected once.
    conn: Arc<OnceCell<Conn>>,
}

impl PubSubSink {
    /// A sink on the Redis `target` names, publishing each route's events on its channel.
    pub fn new(target: RedisTarget, channels: Vec<Channel>) -> Self {
        PubSubSink {
            target,
            channels: channels.into(),
            conn: Arc::new(OnceCell::new()),
        }
    }

    async fn conn(&self) -> Result<Conn, HandlerError> {
        self.conn
            .get_or_try_init(|| self.target.connect(Duration::from_secs(10)))
            .await
            .cloned()
            .map_err(|e| HandlerError::from_redis(&e))
    }
}

/// The message for one event: its v1 JSON object with `stream` (given as JSON text, encoded
/// once per stream) and `entry_id` added.
pub fn message(r: &Routed<'_>, stream_json: &str) -> String {
    use std::fmt::Write;
    let mut json = String::with_capacity(r.event.data.len() + 320);
    r.event.write_json(&mut json);
    json.pop(); // the closing brace
    json.push_str(r#","stream":"#);
    json.push_str(stream_json);
    let _ = write!(json, r#","entry_id":"{}"}}"#, r.entry_id);
    json
}

/// The stream's name as JSON text, encoded once per run of events of one stream.
fn stream_json<'a>(cache: &'a mut (Option<Arc<str>>, String), stream: &Arc<str>) -> &'a str {
    if cache.0.as_ref() != Some(stream) {
        *cache = (
            Some(stream.clone()),
            serde_json::to_string(&**stream).unwrap_or_default(),
        );
    }
    &cache.1
}

impl Handler for PubSubSink {
    /// Connects and loads the checkpoint script: were it missing when a batch is published, the
    /// whole round trip would run again (publishing its events twice).
    async fn prepare(&mut self) -> Result<(), HandlerError> {
        let mut conn = self.conn().await?;
        let loaded: Result<String, RedisError> = FORWARD_SCRIPT.load().query_async(&mut conn).await;
        loaded.map(drop).map_err(|e| HandlerError::from_redis(&e))
    }

    /// One round trip. A `PUBLISH` refused on its channel (outside the ACL user's channel
    /// pattern), or refused while others in the batch went out, rejects its event alone (a
    /// `handler_error` dead letter): retrying the batch would publish the others again, every
    /// time. Refused everywhere for another reason (no `+publish` at all), the batch fails and
    /// waits, nothing published. A checkpoint that could not be written is
    /// left to a later batch (it stays older, so still safe) rather than publishing again.
    async fn apply(&mut self, batch: &Batch<'_>) -> Result<Applied, HandlerError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut applied = Applied::default();
        let mut published: Vec<&Routed<'_>> = Vec::with_capacity(batch.events.len());
        let mut channel = String::new();
        let mut stream = (None, String::new());
        for r in &batch.events {
            let route = &self.channels[r.route.index];
            if let Err(e) = route
                .template
                .render(&mut Scope::new(r.event, r.stream), &mut channel)
            {
                applied.rejected.push(Rejected {
                    stream: r.stream.clone(),
                    entry_id: r.entry_id,
                    error: e.to_string(),
                });
                continue;
            }
            pipe.cmd(if route.sharded { "SPUBLISH" } else { "PUBLISH" })
                .arg(&channel)
                .arg(message(r, stream_json(&mut stream, r.stream)));
            published.push(r);
        }
        for c in &batch.checkpoints {
            pipe.add_command(redis_checkpoints::forward(
                &c.stream,
                batch.group,
                c.position,
            ));
        }
        if published.is_empty() && batch.checkpoints.is_empty() {
            return Ok(applied);
        }
        let mut conn = self.conn().await?;
        let replies = query_loading(&pipe, &mut conn, &[&FORWARD_SCRIPT])
            .await
            .map_err(|e| HandlerError::from_redis(&e))?;
        let (publishes, checkpoints) = replies.split_at(published.len().min(replies.len()));
        // A channel outside the user's ACL pattern is that event's fault; anything else refused
        // everywhere (no +publish at all, say) is the worker's, and the batch waits.
        // (Redis 7: "NOPERM this user has no permissions to access one of the channels used as
        // arguments"; the command refused says "to run the 'publish' command".)
        let channel_refused =
            |e: &RedisError| e.code() == Some("NOPERM") && e.to_string().contains("channel");
        if !publishes.is_empty()
            && publishes
                .iter()
                .all(|r| matches!(r, Err(e) if !channel_refused(e)))
        {
            if let Some(Err(e)) = publishes.first() {
                return Err(HandlerError::from_redis(e));
            }
        }
        for (r, reply) in published.iter().zip(publishes) {
            match reply {
                Ok(_) => applied.applied += 1,
                Err(e) => applied.rejected.push(Rejected {
                    stream: r.stream.clone(),
                    entry_id: r.entry_id,
                    error: format!("PUBLISH refused: {e}"),
                }),
            }
        }
        if let Some(Err(e)) = checkpoints.iter().find(|r| r.is_err()) {
            tracing::warn!(error = %e, "checkpoints not written with this batch (its events are published)");
        }
        Ok(applied)
    }

    async fn check(&self) -> Result<(), HandlerError> {
        let mut conn = self.conn().await?;
        let pong: Result<Value, RedisError> = redis::cmd("PING").query_async(&mut conn).await;
        pong.map(drop)
            .map_err(|e| match HandlerError::from_redis(&e) {
                m @ HandlerError::Misconfigured(_) => m,
                other => HandlerError::Unavailable(other.to_string()),
            })
    }

    async fn checkpoint(&self, stream: &str, group: &str) -> Result<Option<EntryId>, HandlerError> {
        let mut conn = self.conn().await?;
        redis_checkpoints::read(&mut conn, stream, group)
            .await
            .map_err(|e| HandlerError::from_redis(&e))
    }
}
