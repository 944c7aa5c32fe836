//! The gateway's one Pub/Sub connection: it subscribes to what the hub asks for, hands every
//! message to the hub, and notices its own loss (a closed connection, or a `PING` left
//! unanswered) so that the hub ends every stream. On a Redis Cluster, `PUBLISH` reaches every
//! node, so any node of `FLEET_REDIS_URL` serves; the next one is tried when one fails.
//!
//! A subscription without a wildcard (an exact topic under a `fleet:{channel}` template) is a
//! `SUBSCRIBE`: Redis finds its subscribers of a `PUBLISH` by a hash lookup, whereas it matches
//! every `PSUBSCRIBE` pattern of every client against each channel published, so ten thousand
//! browsers on ten thousand flows would cost each `PUBLISH` ten thousand glob matches. (An ACL
//! user's channel patterns also admit any channel they match, but a `PSUBSCRIBE` pattern only
//! when granted literally.)

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::PubSubSink;
use streamfleet::runtime::connect::RedisTarget;
use streamfleet::runtime::health::{Dependency, Health};
use streamfleet::runtime::shutdown::Shutdown;
use tokio::sync::mpsc;

use crate::hub::{Command, Hub};

/// How often the connection is checked, and how long a check may take.
const PING_EVERY: Duration = Duration::from_secs(5);

/// Runs until the drain starts. `health`'s sink is the subscription: not ready without it.
pub async fn run(
    hub: Arc<Hub>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    target: RedisTarget,
    health: Arc<Health>,
    shutdown: Shutdown,
) {
    let mut delays = streamfleet::runtime::backoff::backoff();
    let mut seed = 0;
    loop {
        let client = &target.seeds()[seed % target.seeds().len()];
        let connected = tokio::time::timeout(PING_EVERY, client.get_async_pubsub()).await;
        let pubsub = match connected {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                health.down(Dependency::Sink, &format!("Pub/Sub: {e}"));
                seed += 1;
                if !shutdown.sleep(delays.next().unwrap_or_default()).await {
                    return;
                }
                continue;
            }
            Err(_) => {
                health.down(Dependency::Sink, &"Pub/Sub: connect timed out");
                seed += 1;
                continue;
            }
        };
        let (mut sink, mut messages) = pubsub.split();
        let outcome: Result<(), String> = async {
            for glob in hub.globs() {
                subscribe(&hub, &mut sink, &glob).await?;
            }
            health.up(Dependency::Sink);
            delays = streamfleet::runtime::backoff::backoff();
            let mut ping = tokio::time::interval(PING_EVERY);
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.triggered() => return Ok(()),
                    msg = messages.next() => match msg {
                        Some(msg) => {
                            let key: String = if msg.from_pattern() {
                                msg.get_pattern().unwrap_or_default()
                            } else {
                                msg.get_channel_name().to_owned()
                            };
                            hub.dispatch(&key, msg.get_payload_bytes());
                        }
                        None => return Err("connection closed".into()),
                    },
                    command = commands.recv() => match command {
                        Some(Command::Subscribe(glob)) => subscribe(&hub, &mut sink, &glob).await?,
                        Some(Command::Unsubscribe(glob)) => unsubscribe(&mut sink, &glob).await?,
                        None => return Ok(()),
                    },
                    _ = ping.tick() => {
                        // Subscribed, Redis answers PING with ["pong", ""] (RESP2): any answer
                        // will do.
                        let pong =
                            tokio::time::timeout(PING_EVERY, sink.ping::<redis::Value>()).await;
                        match pong {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => return Err(e.to_string()),
                            Err(_) => return Err("PING unanswered".into()),
                        }
                    }
                }
            }
        }
        .await;
        match outcome {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "Pub/Sub connection lost: every stream ends, browsers resume");
                health.down(Dependency::Sink, &format!("Pub/Sub: {e}"));
                hub.lost();
                seed += 1;
                if !shutdown.sleep(delays.next().unwrap_or_default()).await {
                    return;
                }
            }
        }
    }
}

/// Whether `glob` has a wildcard (an escaped character counts: it is a pattern's syntax).
fn is_pattern(glob: &str) -> bool {
    glob.contains(['*', '?', '[', '\\'])
}

/// Subscribes to `glob` and tells the hub; one no connection needs any more by then is
/// unsubscribed again.
async fn subscribe(hub: &Hub, sink: &mut PubSubSink, glob: &str) -> Result<(), String> {
    let done = if is_pattern(glob) {
        sink.psubscribe(glob).await
    } else {
        sink.subscribe(glob).await
    };
    done.map_err(|e| e.to_string())?;
    if !hub.confirmed(glob) {
        unsubscribe(sink, glob).await?;
    }
    Ok(())
}

async fn unsubscribe(sink: &mut PubSubSink, glob: &str) -> Result<(), String> {
    let done = if is_pattern(glob) {
        sink.punsubscribe(glob).await
    } else {
        sink.unsubscribe(glob).await
    };
    done.map_err(|e| e.to_string())
}
