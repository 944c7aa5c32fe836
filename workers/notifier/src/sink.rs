//! The notifier's handler: each routed event of a batch is one `PUBLISH` of its v1 JSON plus
//! `stream` and `entry_id`, all in one round trip with the checkpoints (beside each stream, as the
//! projector keeps them). The pipeline acknowledges after the round trip: delivery is at least
//! once (a crash before the acknowledgement, a retried batch, a Redis restart that forgot the
//! checkpoint script all publish again), and a subscriber drops an `entry_id` of a stream it has
//! already seen.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{RedisError, Value};
use streamfleet::event::template::{Scope, Template};
use streamfleet::runtime::connect::redis_connection;
use streamfleet::runtime::scripts::query_loading;
use streamfleet::store::redis_checkpoints::{self, FORWARD_SCRIPT};
use streamfleet::{Applied, Batch, EntryId, Handler, HandlerError, Rejected, Routed};
use tokio::sync::OnceCell;

/// The Pub/Sub channel of a route that names none (contract section 6).
pub static DEFAULT_CHANNEL: LazyLock<Template> =
    LazyLock::new(|| "fleet:{channel}".parse().expect("a valid template"));

/// Publishes on the Redis the streams live on.
#[derive(Clone)]
pub struct PubSubSink {
    client: redis::Client,
    /// Shared by every clone (lanes, the checkpoint reader): connected once.
    conn: Arc<OnceCell<ConnectionManager>>,
}

impl PubSubSink {
    /// A sink on `client`'s Redis.
    pub fn new(client: redis::Client) -> Self {
        PubSubSink {
            client,
            conn: Arc::new(OnceCell::new()),
        }
    }

    async fn conn(&self) -> Result<ConnectionManager, HandlerError> {
        self.conn
            .get_or_try_init(|| redis_connection(&self.client, Duration::from_secs(10)))
            .await
            .cloned()
            .map_err(|e| HandlerError::from_redis(&e))
    }
}

/// The message for one event: its v1 JSON object with `stream` and `entry_id` added.
pub fn message(r: &Routed<'_>) -> String {
    let mut json = String::with_capacity(r.event.data.len() + 320);
    r.event.write_json(&mut json);
    json.pop(); // the closing brace
    json.push_str(r#","stream":"#);
    json.push_str(&serde_json::to_string(&**r.stream).unwrap_or_default());
    json.push_str(&format!(r#","entry_id":"{}"}}"#, r.entry_id));
    json
}

impl Handler for PubSubSink {
    /// Connects and loads the checkpoint script: were it missing when a batch is published, the
    /// whole round trip would run again (publishing its events twice).
    async fn prepare(&mut self) -> Result<(), HandlerError> {
        let mut conn = self.conn().await?;
        let loaded: Result<String, RedisError> = FORWARD_SCRIPT.load().query_async(&mut conn).await;
        loaded.map(drop).map_err(|e| HandlerError::from_redis(&e))
    }

    async fn apply(&mut self, batch: &Batch<'_>) -> Result<Applied, HandlerError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut applied = Applied::default();
        let mut channel = String::new();
        for r in &batch.events {
            let template = r.route.publish.as_ref().unwrap_or(&DEFAULT_CHANNEL);
            if let Err(e) = template.render(&mut Scope::new(r.event, r.stream), &mut channel) {
                applied.rejected.push(Rejected {
                    stream: r.stream.clone(),
                    entry_id: r.entry_id,
                    error: e.to_string(),
                });
                continue;
            }
            pipe.cmd("PUBLISH").arg(&channel).arg(message(r));
            applied.applied += 1;
        }
        for c in &batch.checkpoints {
            pipe.add_command(redis_checkpoints::forward(
                &c.stream,
                batch.group,
                c.position,
            ));
        }
        if applied.applied == 0 && batch.checkpoints.is_empty() {
            return Ok(applied);
        }
        let mut conn = self.conn().await?;
        let replies = query_loading(&pipe, &mut conn, &[&FORWARD_SCRIPT])
            .await
            .map_err(|e| HandlerError::from_redis(&e))?;
        if let Some(Err(e)) = replies.into_iter().find(|r| r.is_err()) {
            return Err(HandlerError::from_redis(&e));
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
