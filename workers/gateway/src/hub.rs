//! Live events: one Pub/Sub pattern subscription per distinct pattern the connected browsers'
//! topics need, however many browsers share it, and a fan-out of each message to the
//! connections whose topics match its channel, each through a bounded buffer.
//!
//! Each message is framed once (`sse::message`) and shared. A connection whose buffer is full is
//! too slow: it is marked and dropped (it resumes with its `Last-Event-ID`), never waited for, so
//! a slow browser never delays the others. The Pub/Sub connection itself is one task
//! (`subscriber`): when it is lost, every stream is ended, since what was published meanwhile
//! reached nobody; browsers reconnect and resume from the history instead of silently missing it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::Deserialize;
use streamfleet::event::pattern::ChannelPattern;
use streamfleet::EntryId;
use tokio::sync::{mpsc, oneshot};

use streamfleet::runtime::http::Disconnect;

use crate::cursor;
use crate::metrics as m;
use crate::sse;

/// One event, framed, with what routes it to topics and deduplicates it per connection.
#[derive(Debug)]
pub struct Frame {
    pub channel: Box<str>,
    /// Its order key (the channel unless the event names one): events of one key come in stream
    /// order; of two keys, in any order (the notifier's lanes publish keys side by side).
    pub key: Box<str>,
    pub stream: Arc<str>,
    pub entry_id: EntryId,
    pub bytes: Bytes,
}

/// The fields of a notifier message the gateway needs (the rest goes out verbatim).
#[derive(Deserialize)]
struct Live<'a> {
    #[serde(rename = "type", borrow)]
    event_type: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    channel: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    key: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    stream: std::borrow::Cow<'a, str>,
    entry_id: &'a str,
}

/// Frames a notifier message (or a history entry completed the same way): `None` for a payload
/// that is not one.
pub fn frame(payload: &str) -> Option<Frame> {
    let live: Live<'_> = serde_json::from_str(payload).ok()?;
    let entry_id: EntryId = live.entry_id.parse().ok()?;
    let id = cursor::format(&live.stream, live.entry_id);
    Some(Frame {
        key: live.key.as_deref().unwrap_or(&live.channel).into(),
        channel: live.channel.into(),
        stream: Arc::from(&*live.stream),
        entry_id,
        bytes: sse::message(Some(&id), &live.event_type, payload),
    })
}

/// A connection's end of the fan-out.
struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Arc<Frame>>,
    /// Set when its buffer was full: the connection ends.
    dropped: Arc<AtomicBool>,
    /// Closes its HTTP connection: a client too slow to read has a full socket, so its stream is
    /// not polled again and could not end by itself.
    disconnect: Option<Disconnect>,
}

impl Subscriber {
    /// Ends the connection; true the first time.
    fn drop_connection(&self) -> bool {
        if let Some(d) = &self.disconnect {
            d.now();
        }
        !self.dropped.swap(true, Ordering::Relaxed)
    }
}

struct Topic {
    pattern: ChannelPattern,
    globs: Vec<String>,
    subscribers: Vec<Subscriber>,
}

#[derive(Default)]
struct Glob {
    /// Topics (by text) that need it.
    topics: Vec<String>,
    /// Whether Redis confirmed the subscription; until then, who waits for it.
    confirmed: bool,
    waiters: Vec<oneshot::Sender<()>>,
}

#[derive(Default)]
struct State {
    topics: HashMap<String, Topic>,
    globs: HashMap<String, Glob>,
    next_id: u64,
    connections: usize,
}

/// What the subscriber task is asked to do.
#[derive(Debug)]
pub enum Command {
    Subscribe(String),
    Unsubscribe(String),
}

/// The registry of live subscriptions, shared by every connection and the subscriber task.
pub struct Hub {
    state: Mutex<State>,
    commands: mpsc::UnboundedSender<Command>,
    buffer: usize,
}

/// A connection's subscription: frames arrive on `rx`; dropping it unsubscribes.
pub struct Subscription {
    hub: Arc<Hub>,
    id: u64,
    topics: Vec<String>,
    pub rx: mpsc::Receiver<Arc<Frame>>,
    pub dropped: Arc<AtomicBool>,
    /// Resolve once every pattern this subscription needs is confirmed by Redis.
    pub confirmed: Vec<oneshot::Receiver<()>>,
}

impl Hub {
    /// A hub giving each connection `buffer` frames of slack; the subscriber task reads
    /// `Command`s from the returned receiver.
    pub fn new(buffer: usize) -> (Arc<Hub>, mpsc::UnboundedReceiver<Command>) {
        let (commands, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Hub {
                state: Mutex::new(State::default()),
                commands,
                buffer,
            }),
            rx,
        )
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes a new connection to `topics`, each with the Pub/Sub patterns (`globs`) that
    /// carry it.
    pub fn subscribe(
        self: &Arc<Self>,
        topics: &[(ChannelPattern, Vec<String>)],
        disconnect: Option<Disconnect>,
    ) -> Subscription {
        let (tx, rx) = mpsc::channel(self.buffer);
        let dropped = Arc::new(AtomicBool::new(false));
        let mut confirmed = Vec::new();
        let mut state = self.state();
        let id = state.next_id;
        state.next_id += 1;
        state.connections += 1;
        for (pattern, globs) in topics {
            let key = pattern.as_str().to_owned();
            let topic = state.topics.entry(key.clone()).or_insert_with(|| Topic {
                pattern: pattern.clone(),
                globs: globs.clone(),
                subscribers: Vec::new(),
            });
            let new_topic = topic.subscribers.is_empty();
            topic.subscribers.push(Subscriber {
                id,
                tx: tx.clone(),
                dropped: dropped.clone(),
                disconnect: disconnect.clone(),
            });
            for glob in globs {
                let g = state.globs.entry(glob.clone()).or_default();
                if new_topic {
                    g.topics.push(key.clone());
                    if g.topics.len() == 1 {
                        let _ = self.commands.send(Command::Subscribe(glob.clone()));
                    }
                }
                if !g.confirmed {
                    let (done, wait) = oneshot::channel();
                    g.waiters.push(done);
                    confirmed.push(wait);
                }
            }
        }
        metrics::gauge!(m::CONNECTIONS).set(state.connections as f64);
        metrics::gauge!(m::SUBSCRIPTIONS).set(state.globs.len() as f64);
        drop(state);
        Subscription {
            hub: self.clone(),
            id,
            topics: topics.iter().map(|(p, _)| p.as_str().to_owned()).collect(),
            rx,
            dropped,
            confirmed,
        }
    }

    fn unsubscribe(&self, id: u64, topics: &[String]) {
        let mut state = self.state();
        state.connections -= 1;
        for key in topics {
            let Some(topic) = state.topics.get_mut(key) else {
                continue;
            };
            topic.subscribers.retain(|s| s.id != id);
            if !topic.subscribers.is_empty() {
                continue;
            }
            let topic = state.topics.remove(key).expect("present");
            for glob in topic.globs {
                if let Some(g) = state.globs.get_mut(&glob) {
                    g.topics.retain(|t| t != key);
                    if g.topics.is_empty() {
                        state.globs.remove(&glob);
                        let _ = self.commands.send(Command::Unsubscribe(glob));
                    }
                }
            }
        }
        metrics::gauge!(m::CONNECTIONS).set(state.connections as f64);
        metrics::gauge!(m::SUBSCRIPTIONS).set(state.globs.len() as f64);
    }

    /// Redis confirmed `glob`: the connections waiting for it may read their history. False
    /// when no connection needs it any more (it is to be unsubscribed).
    pub fn confirmed(&self, glob: &str) -> bool {
        let mut state = self.state();
        let Some(g) = state.globs.get_mut(glob) else {
            return false;
        };
        g.confirmed = true;
        for w in g.waiters.drain(..) {
            let _ = w.send(());
        }
        true
    }

    /// Every pattern subscribed now (to subscribe again on a new connection).
    pub fn globs(&self) -> Vec<String> {
        self.state().globs.keys().cloned().collect()
    }

    /// The Pub/Sub connection was lost: every connection is ended so that it resumes (what was
    /// published meanwhile reached no one), and nothing is subscribed any more.
    pub fn lost(&self) {
        let mut state = self.state();
        for topic in state.topics.values() {
            for s in &topic.subscribers {
                s.drop_connection();
            }
        }
        // Dropping every sender ends every stream at once, and every waiter's confirmation.
        state.topics.clear();
        state.globs.clear();
        metrics::gauge!(m::SUBSCRIPTIONS).set(0.0);
    }

    /// Delivers one message received on `glob` to every connection whose topic matches it.
    pub fn dispatch(&self, glob: &str, payload: &[u8]) {
        let Some(frame) = std::str::from_utf8(payload).ok().and_then(frame) else {
            metrics::counter!(m::UNREADABLE).increment(1);
            return;
        };
        let frame = Arc::new(frame);
        let mut state = self.state();
        let State { topics, globs, .. } = &mut *state;
        let Some(g) = globs.get(glob) else { return };
        for key in &g.topics {
            let Some(topic) = topics.get_mut(key) else {
                continue;
            };
            if !topic.pattern.matches(&frame.channel) {
                continue;
            }
            topic
                .subscribers
                .retain(|s| match s.tx.try_send(frame.clone()) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        if s.drop_connection() {
                            metrics::counter!(m::SLOW_DROPS).increment(1);
                        }
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                });
        }
    }

    /// Connections now, and per topic.
    pub fn counts(&self) -> (usize, Vec<(String, usize)>) {
        let state = self.state();
        (
            state.connections,
            state
                .topics
                .iter()
                .map(|(k, t)| (k.clone(), t.subscribers.len()))
                .collect(),
        )
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.id, &self.topics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(channel: &str, id: &str) -> String {
        format!(
            r#"{{"v":1,"id":"x","type":"progress","channel":"{channel}","source":"s","time":"2026-12-07T00:00:00Z","data":{{}},"stream":"events","entry_id":"{id}"}}"#
        )
    }

    fn topic(t: &str, globs: &[&str]) -> (ChannelPattern, Vec<String>) {
        (
            t.parse().unwrap(),
            globs.iter().map(|g| g.to_string()).collect(),
        )
    }

    #[tokio::test]
    async fn one_subscription_per_pattern_and_each_connection_gets_its_topics() {
        let (hub, mut commands) = Hub::new(8);
        let a = topic("flow.1.progress", &["fleet:flow.1.progress"]);
        let any = topic("flow.*.progress", &["fleet:flow.*.progress"]);
        let mut first = hub.subscribe(std::slice::from_ref(&a), None);
        let mut second = hub.subscribe(std::slice::from_ref(&a), None);
        let mut wide = hub.subscribe(std::slice::from_ref(&any), None);
        let subscribed: Vec<String> = std::iter::from_fn(|| commands.try_recv().ok())
            .map(|c| format!("{c:?}"))
            .collect();
        assert_eq!(
            subscribed,
            [
                "Subscribe(\"fleet:flow.1.progress\")",
                "Subscribe(\"fleet:flow.*.progress\")"
            ]
        );
        hub.confirmed("fleet:flow.1.progress");
        assert!(first.confirmed.pop().unwrap().await.is_ok());
        hub.dispatch(
            "fleet:flow.1.progress",
            payload("flow.1.progress", "1-0").as_bytes(),
        );
        hub.dispatch(
            "fleet:flow.*.progress",
            payload("flow.2.progress", "2-0").as_bytes(),
        );
        hub.dispatch("fleet:flow.*.progress", b"not json");
        assert_eq!(first.rx.try_recv().unwrap().entry_id.to_string(), "1-0");
        assert_eq!(second.rx.try_recv().unwrap().entry_id.to_string(), "1-0");
        assert_eq!(wide.rx.try_recv().unwrap().entry_id.to_string(), "2-0");
        assert!(first.rx.try_recv().is_err() && wide.rx.try_recv().is_err());
        drop(first);
        assert!(commands.try_recv().is_err(), "still needed by the second");
        drop(second);
        assert_eq!(
            format!("{:?}", commands.try_recv().unwrap()),
            "Unsubscribe(\"fleet:flow.1.progress\")"
        );
        assert_eq!(hub.counts().0, 1);
    }

    #[tokio::test]
    async fn a_full_buffer_drops_that_connection_only() {
        let (hub, _commands) = Hub::new(2);
        let t = topic("a", &["fleet:a"]);
        let slow = hub.subscribe(std::slice::from_ref(&t), None);
        let mut fast = hub.subscribe(std::slice::from_ref(&t), None);
        for i in 1..=3 {
            hub.dispatch("fleet:a", payload("a", &format!("{i}-0")).as_bytes());
            assert!(fast.rx.try_recv().is_ok());
        }
        assert!(slow.dropped.load(Ordering::Relaxed));
        assert!(!fast.dropped.load(Ordering::Relaxed));
        hub.dispatch("fleet:a", payload("a", "4-0").as_bytes());
        assert_eq!(fast.rx.try_recv().unwrap().entry_id.to_string(), "4-0");
    }

    #[test]
    fn frames_carry_the_cursor_and_the_type() {
        let f = frame(&payload("flow.1.progress", "5-1")).unwrap();
        assert_eq!(&*f.channel, "flow.1.progress");
        let text = std::str::from_utf8(&f.bytes).unwrap();
        assert!(
            text.starts_with("id: 5-1@events\nevent: progress\ndata: {\"v\":1"),
            "{text}"
        );
        assert!(frame(r#"{"type":"t","channel":"c","stream":"s","entry_id":"bad"}"#).is_none());
    }
}
