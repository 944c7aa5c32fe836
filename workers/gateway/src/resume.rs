//! What a browser missed: the events after its `Last-Event-ID` in its topic's history stream
//! (the projector's `history` action, each entry holding the event and its source `stream` and
//! `entry_id`), read newest first until that entry is found. An id the history does not hold
//! (trimmed past, expired, lost with its Redis, rebuilt with new ids) or a topic without a history
//! is a reset: `event: reset` with the topic's latest state, never a silent gap.

use std::collections::HashMap;

use redis::Value;
use streamfleet::event::pattern::ChannelPattern;
use streamfleet::runtime::conn::Conn;

use crate::cursor::{self, Cursor};
use crate::hub::{self, Frame};
use crate::routes::ResumeKeys;
use crate::sse;

/// Entries read per round trip while looking for the cursor.
pub const PAGE: usize = 1000;

/// The outcome for one topic.
#[derive(Debug)]
pub enum Resumed {
    /// The missed events, oldest first, and the history's newest entry when it was read.
    Events(Vec<Frame>, Option<String>),
    /// `event: reset` and the entry of the state it carries, if any, and the history's newest
    /// entry when it was read.
    Reset(Frame, Option<String>),
}

/// Reads what `topic` missed after `cursor`: at most `max` events, or a reset.
pub async fn resume(
    conn: &mut Conn,
    topic: &ChannelPattern,
    keys: &ResumeKeys,
    cursor: Option<&Cursor>,
    max: usize,
) -> redis::RedisResult<Resumed> {
    let mut end = None;
    if let Some(history) = &keys.history {
        if let Some(cursor) = cursor {
            let (events, newest) = after(conn, history, cursor, max).await?;
            if let Some(events) = events {
                return Ok(Resumed::Events(events, newest));
            }
            end = newest;
        } else {
            end = newest(conn, history).await?;
        }
    }
    let frame = reset(conn, topic, keys.latest.as_deref()).await?;
    Ok(Resumed::Reset(frame, end))
}

/// The id of the newest entry of `history`, if any.
async fn newest(conn: &mut Conn, history: &str) -> redis::RedisResult<Option<String>> {
    let page: Vec<(String, HashMap<String, String>)> = redis::cmd("XREVRANGE")
        .arg(history)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    Ok(page.into_iter().next().map(|(id, _)| id))
}

/// The events after `cursor` in `history`, oldest first (`None` when it is not there, or more
/// than `max` events behind), and the id of the history's newest entry.
async fn after(
    conn: &mut Conn,
    history: &str,
    cursor: &Cursor,
    max: usize,
) -> redis::RedisResult<(Option<Vec<Frame>>, Option<String>)> {
    let target = cursor.entry_id.to_string();
    let mut newer: Vec<Frame> = Vec::new();
    let mut end = "+".to_owned();
    let mut newest = None;
    loop {
        let page: Vec<(String, HashMap<String, String>)> = redis::cmd("XREVRANGE")
            .arg(history)
            .arg(&end)
            .arg("-")
            .arg("COUNT")
            .arg(PAGE)
            .query_async(conn)
            .await?;
        let last_page = page.len() < PAGE;
        for (id, fields) in &page {
            newest.get_or_insert_with(|| id.clone());
            end = format!("({id}");
            let (Some(stream), Some(entry_id), Some(event)) = (
                fields.get("stream"),
                fields.get("entry_id"),
                fields.get("event"),
            ) else {
                continue;
            };
            if *stream == cursor.stream && *entry_id == target {
                newer.reverse();
                return Ok((Some(newer), newest));
            }
            if newer.len() == max {
                return Ok((None, newest));
            }
            if let Some(frame) = completed(event, stream, entry_id) {
                newer.push(frame);
            }
        }
        if last_page {
            return Ok((None, newest));
        }
    }
}

/// The entries of `history` after the entry `from` (exclusive; `None`: from the start), oldest
/// first, at most `PAGE`, with their history ids: what the projector appended since it was read.
pub async fn since(
    conn: &mut Conn,
    history: &str,
    from: Option<&str>,
) -> redis::RedisResult<Vec<(String, Option<Frame>)>> {
    let start = from.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
    let page: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(history)
        .arg(start)
        .arg("+")
        .arg("COUNT")
        .arg(PAGE)
        .query_async(conn)
        .await?;
    Ok(page
        .into_iter()
        .map(|(id, fields)| {
            let frame = match (
                fields.get("stream"),
                fields.get("entry_id"),
                fields.get("event"),
            ) {
                (Some(stream), Some(entry_id), Some(event)) => completed(event, stream, entry_id),
                _ => None,
            };
            (id, frame)
        })
        .collect())
}

/// A history entry framed as the live message of the same event would be: the event's JSON with
/// `stream` and `entry_id` added.
fn completed(event: &str, stream: &str, entry_id: &str) -> Option<Frame> {
    let json = with_source(event, stream, entry_id)?;
    hub::frame(&json)
}

fn with_source(event: &str, stream: &str, entry_id: &str) -> Option<String> {
    let body = event.trim_end().strip_suffix('}')?;
    let stream = serde_json::to_string(stream).ok()?;
    let entry_id = serde_json::to_string(entry_id).ok()?;
    Some(format!(
        r#"{body},"stream":{stream},"entry_id":{entry_id}}}"#
    ))
}

/// `event: reset` for `topic`: `{"topic": …, "latest": <event or null>}`, with the state's id
/// (so that the next resume starts after it) when there is a state.
pub async fn reset(
    conn: &mut Conn,
    topic: &ChannelPattern,
    latest: Option<&str>,
) -> redis::RedisResult<Frame> {
    let state: HashMap<String, String> = match latest {
        Some(key) => match redis::cmd("HGETALL")
            .arg(key)
            .query_async::<Value>(conn)
            .await?
        {
            v @ (Value::Map(_) | Value::Array(_)) => redis::from_redis_value(v).unwrap_or_default(),
            _ => HashMap::new(),
        },
        None => HashMap::new(),
    };
    let source = match (
        state.get("event"),
        state.get("stream"),
        state.get("entry_id"),
    ) {
        (Some(event), Some(stream), Some(entry_id)) => {
            with_source(event, stream, entry_id).and_then(|json| Some((hub::frame(&json)?, json)))
        }
        _ => None,
    };
    let topic_json = serde_json::to_string(topic.as_str()).unwrap_or_default();
    Ok(match source {
        // The state's entry: the id, and what the live events after it are compared with.
        Some((state, json)) => Frame {
            bytes: sse::message(
                Some(&cursor::format(&state.stream, &state.entry_id.to_string())),
                "reset",
                &format!(r#"{{"topic":{topic_json},"latest":{json}}}"#),
            ),
            ..state
        },
        None => Frame {
            bytes: sse::message(
                None,
                "reset",
                &format!(r#"{{"topic":{topic_json},"latest":null}}"#),
            ),
            channel: topic.as_str().into(),
            key: "".into(),
            stream: "".into(),
            entry_id: streamfleet::EntryId { ms: 0, seq: 0 },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_entry_is_framed_as_its_live_message() {
        let event = r#"{"v":1,"id":"e1","type":"progress","channel":"flow.1.progress","source":"s","time":"2026-12-07T00:00:00Z","data":{"pct":5}}"#;
        let f = completed(event, "{flows}:events", "7-0").unwrap();
        assert_eq!(f.entry_id.to_string(), "7-0");
        let text = std::str::from_utf8(&f.bytes).unwrap();
        assert!(
            text.starts_with("id: 7-0@{flows}:events\nevent: progress\n"),
            "{text}"
        );
        assert!(
            text.contains(r#""data":{"pct":5},"stream":"{flows}:events","entry_id":"7-0"}"#),
            "{text}"
        );
        assert!(completed("not json", "s", "1-0").is_none());
    }
}
