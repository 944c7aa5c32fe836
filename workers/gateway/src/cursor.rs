//! The SSE `id:` of an event, which a browser sends back as `Last-Event-ID`: the stream entry
//! the event was read from, `<entry id>@<stream>`. The stream is part of it because a topic's
//! history can gather several streams (the shards of one), whose entry ids may coincide.
//!
//! What makes a resume safe is that the id names one entry exactly: a history that was lost
//! (expired, a failover to an empty replica) or rebuilt (`replay --from-postgres` gives every
//! entry a new id) no longer holds it, and the resume becomes a reset instead of a replay of
//! another sequence (see `resume`).

use std::fmt::Write;

use streamfleet::EntryId;

/// Where a browser left off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub stream: String,
    pub entry_id: EntryId,
}

/// Bytes of a stream name written as they are in an id; the rest is percent-encoded, so that no
/// id holds a line break, a NUL or a byte a header cannot carry.
fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.:{}/".contains(&b)
}

/// The id of the event read at `entry_id` of `stream`.
pub fn format(stream: &str, entry_id: &str) -> String {
    let mut id = String::with_capacity(entry_id.len() + 1 + stream.len());
    id.push_str(entry_id);
    id.push('@');
    for b in stream.bytes() {
        if plain(b) {
            id.push(b as char);
        } else {
            let _ = write!(id, "%{b:02X}");
        }
    }
    id
}

/// The entry an id names; `None` for anything this gateway did not write (a resume from it is
/// a reset, never a guess).
pub fn parse(id: &str) -> Option<Cursor> {
    let (entry_id, stream) = id.trim().split_once('@')?;
    let entry_id = entry_id.parse().ok()?;
    let mut bytes = Vec::with_capacity(stream.len());
    let mut rest = stream.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    if bytes.is_empty() {
        return None;
    }
    Some(Cursor {
        stream: String::from_utf8(bytes).ok()?,
        entry_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_the_entry_and_survive_any_stream_name() {
        for stream in ["events", "{orders}:events", "a b\nc%d@e", "ünï"] {
            let id = format(stream, "1733550000000-7");
            assert!(
                id.bytes().all(|b| b.is_ascii_graphic()),
                "{id:?} is one header-safe token"
            );
            assert_eq!(
                parse(&id),
                Some(Cursor {
                    stream: stream.into(),
                    entry_id: "1733550000000-7".parse().unwrap()
                })
            );
        }
        assert_eq!(format("{orders}:events", "5-0"), "5-0@{orders}:events");
    }

    #[test]
    fn anything_else_is_no_cursor() {
        for bad in [
            "", "5-0", "@s", "x-0@s", "5-0@", "5-0@%4", "5-0@%zz", "5-0@%FF",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
