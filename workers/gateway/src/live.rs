//! One browser's stream, after its start (`events`): what was missed first, then the live
//! events, each once per stream entry, keep-alives when idle; ended by the drain, a full buffer
//! or a lost subscription.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use streamfleet::event::pattern::ChannelPattern;
use streamfleet::runtime::conn::Conn;
use streamfleet::runtime::shutdown::Shutdown;
use streamfleet::EntryId;

use crate::cursor::Cursor;
use crate::hub::{Frame, Subscription};
use crate::metrics as m;
use crate::resume::{self, Resumed};
use crate::routes::Routes;
use crate::sse;

/// Most keys a connection remembers the last entry of.
const SEEN_MAX: usize = 4096;

/// Most bytes written at once when events are waiting.
const WRITE_BATCH: usize = 64 * 1024;

/// A resumed topic whose history has not yet been seen to reach the live events. The projector
/// and the notifier read the stream independently: an event the notifier published before this
/// connection subscribed may not be in the history yet when it was read. Until a live event of
/// the topic is found in the history, each one waits for the history to reach it, and what the
/// history gained meanwhile goes out first; a projector further behind than `SEAM_WAIT` is a
/// reset, never a silent gap.
struct Seam {
    topic: ChannelPattern,
    history: String,
    latest: Option<String>,
    /// The history entry read last.
    after: Option<String>,
    opened: Instant,
}

/// Longest a live event waits for the projector's history to reach it after a resume.
const SEAM_WAIT: Duration = Duration::from_secs(5);
/// How often a seam's history is read again while no live event arrives.
const SEAM_POLL: Duration = Duration::from_millis(100);

/// One browser's stream: what was missed first, then the live events, keep-alives when idle.
pub struct Live {
    sub: Subscription,
    /// The last entry id sent per stream and key: an entry not after it is a duplicate (the seam
    /// between history and live, a topic matched twice, a notifier's redelivery). Bounded: past
    /// `SEEN_MAX` keys it starts again, so a duplicate may then pass, never an event be dropped.
    seen: HashMap<Arc<str>, HashMap<Box<str>, EntryId>>,
    seen_keys: usize,
    /// What goes out before the live events: `retry:`, the missed events, resets.
    first: VecDeque<Bytes>,
    keepalive: tokio::time::Interval,
    shutdown: Shutdown,
    seams: Vec<Seam>,
    redis: Conn,
}

impl Live {
    /// A stream of `sub`'s live events, `retry:` first.
    pub fn new(
        sub: Subscription,
        retry: Bytes,
        keepalive: Duration,
        shutdown: Shutdown,
        redis: Conn,
    ) -> Live {
        Live {
            sub,
            seen: HashMap::new(),
            seen_keys: 0,
            first: VecDeque::from([retry]),
            keepalive: tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive),
            shutdown,
            seams: Vec::new(),
            redis,
        }
    }

    /// What each of `topics` missed after `cursor` (a browser's `Last-Event-ID`; `None`: one this
    /// gateway did not write), or its reset, goes out first; a topic with a history keeps a seam
    /// until its history reaches the live events. The topic whose history could not be read, and
    /// why, on failure.
    pub async fn resume(
        &mut self,
        routes: &Routes,
        topics: &[ChannelPattern],
        cursor: Option<Cursor>,
        max: usize,
    ) -> Result<(), (ChannelPattern, redis::RedisError)> {
        let mut conn = self.redis.clone();
        for topic in topics {
            let keys = routes.resume_keys(topic);
            let resumed = resume::resume(&mut conn, topic, &keys, cursor.as_ref(), max)
                .await
                .map_err(|e| (topic.clone(), e))?;
            let end = match resumed {
                Resumed::Events(frames, end) => {
                    metrics::counter!(m::RESUMES).increment(1);
                    let before = self.first.len();
                    for f in frames {
                        if self.fresh(&f) {
                            self.first.push_back(f.bytes);
                        }
                    }
                    metrics::counter!(m::MESSAGES_SENT, "origin" => "history")
                        .increment((self.first.len() - before) as u64);
                    end
                }
                Resumed::Reset(frame, end) => {
                    metrics::counter!(m::RESETS).increment(1);
                    if !frame.stream.is_empty() {
                        self.fresh(&frame);
                    }
                    self.first.push_back(frame.bytes);
                    end
                }
            };
            if let Some(history) = keys.history {
                self.seams.push(Seam {
                    topic: topic.clone(),
                    history,
                    latest: keys.latest,
                    after: end,
                    opened: Instant::now(),
                });
            }
        }
        Ok(())
    }

    /// Whether `f` comes after everything sent of its stream and key; it then counts as sent.
    fn fresh(&mut self, f: &Frame) -> bool {
        if self.sent(f) {
            return false;
        }
        if self.seen_keys >= SEEN_MAX {
            self.seen.clear();
            self.seen_keys = 0;
        }
        let keys = self.seen.entry(f.stream.clone()).or_default();
        if keys.insert(f.key.clone(), f.entry_id).is_none() {
            self.seen_keys += 1;
        }
        true
    }

    fn sent(&self, f: &Frame) -> bool {
        self.seen
            .get(&f.stream)
            .and_then(|keys| keys.get(&*f.key))
            .is_some_and(|last| *last >= f.entry_id)
    }

    /// Adds a live frame to `out`, after what its topic's history holds before it if the topic
    /// is still at its seam.
    async fn admit(&mut self, f: &Frame, out: &mut Vec<Bytes>) {
        if let Some(i) = self.seams.iter().position(|s| s.topic.matches(&f.channel)) {
            self.close_seam(i, f, out).await;
        }
        if self.fresh(f) {
            metrics::counter!(m::MESSAGES_SENT, "origin" => "live").increment(1);
            out.push(f.bytes.clone());
        }
    }

    /// Sends what seam `i`'s history gained since it was last read.
    async fn catch_up(&mut self, i: usize, out: &mut Vec<Bytes>) -> redis::RedisResult<()> {
        loop {
            let seam = &self.seams[i];
            let page = resume::since(&mut self.redis, &seam.history, seam.after.as_deref()).await?;
            let full = page.len() >= resume::PAGE;
            for (id, frame) in page {
                self.seams[i].after = Some(id);
                if let Some(frame) = frame {
                    if self.fresh(&frame) {
                        metrics::counter!(m::MESSAGES_SENT, "origin" => "history").increment(1);
                        out.push(frame.bytes);
                    }
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Holds the live frame `f` until seam `i`'s history reaches it (what it gained goes out
    /// first), then closes the seam; a history still behind after `SEAM_WAIT` is a reset.
    async fn close_seam(&mut self, i: usize, f: &Frame, out: &mut Vec<Bytes>) {
        loop {
            if let Err(e) = self.catch_up(i, out).await {
                tracing::warn!(error = %e, history = %self.seams[i].history, "history unreadable at the seam");
                break;
            }
            if self.sent(f) {
                // The history reached the live events: from now on they follow directly.
                break;
            }
            let seam = &self.seams[i];
            if seam.opened.elapsed() > SEAM_WAIT {
                tracing::warn!(topic = %seam.topic, "the history is behind the live events: reset");
                let (topic, latest) = (seam.topic.clone(), seam.latest.clone());
                if let Ok(reset) = resume::reset(&mut self.redis, &topic, latest.as_deref()).await {
                    metrics::counter!(m::RESETS).increment(1);
                    if !reset.stream.is_empty() {
                        self.fresh(&reset);
                    }
                    out.push(reset.bytes);
                }
                break;
            }
            if !self.shutdown.sleep(Duration::from_millis(10)).await {
                break;
            }
        }
        self.seams.remove(i);
    }

    /// With no live event to wait for, the seams' histories are read again every `SEAM_POLL`:
    /// what the projector appended after the resume read reaches the browser now, not at the
    /// topic's next live event. A seam is closed after `SEAM_WAIT`.
    async fn poll_seams(&mut self, out: &mut Vec<Bytes>) {
        let mut i = 0;
        while i < self.seams.len() {
            if let Err(e) = self.catch_up(i, out).await {
                tracing::warn!(error = %e, history = %self.seams[i].history, "history unreadable at the seam");
            }
            if self.seams[i].opened.elapsed() > SEAM_WAIT {
                self.seams.remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// `parts` as one write (the keep-alive starts again), or `None` if there are none.
    fn written(&mut self, mut parts: Vec<Bytes>) -> Option<Bytes> {
        if parts.is_empty() {
            return None;
        }
        self.keepalive.reset();
        if parts.len() == 1 {
            return parts.pop();
        }
        let mut joined = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
        for p in parts {
            joined.extend_from_slice(&p);
        }
        Some(joined.freeze())
    }

    /// The next bytes to write; `None` ends the stream (the drain, a slow client, a lost
    /// subscription).
    pub async fn next(&mut self) -> Option<Bytes> {
        if let Some(b) = self.first.pop_front() {
            return Some(b);
        }
        loop {
            if self.sub.dropped.load(std::sync::atomic::Ordering::Relaxed) {
                return None;
            }
            tokio::select! {
                biased;
                _ = self.shutdown.triggered() => return None,
                frame = self.sub.rx.recv() => {
                    let frame = frame?;
                    let mut parts: Vec<Bytes> = Vec::new();
                    self.admit(&frame, &mut parts).await;
                    // Events already waiting go out in one write.
                    let mut size: usize = parts.iter().map(Bytes::len).sum();
                    while size < WRITE_BATCH {
                        let Ok(f) = self.sub.rx.try_recv() else { break };
                        let before = parts.len();
                        self.admit(&f, &mut parts).await;
                        size += parts[before..].iter().map(Bytes::len).sum::<usize>();
                    }
                    if let Some(bytes) = self.written(parts) {
                        return Some(bytes);
                    }
                }
                _ = tokio::time::sleep(SEAM_POLL), if !self.seams.is_empty() => {
                    let mut parts = Vec::new();
                    self.poll_seams(&mut parts).await;
                    if let Some(bytes) = self.written(parts) {
                        return Some(bytes);
                    }
                }
                _ = self.keepalive.tick() => return Some(Bytes::from_static(sse::KEEPALIVE)),
            }
        }
    }
}
