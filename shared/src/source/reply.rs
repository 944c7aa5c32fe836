//! RESP2 replies parsed as they arrive, into frames that are spans of the receive buffer.
//!
//! Two things a general-purpose client cannot do for the reader: the batch's entries share the one
//! buffer their reply landed in (no allocation per field, see `read_conn`), and a value longer
//! than any acceptable entry is cut to its first bytes *while it streams in*: a 50 MB entry costs
//! the worker a few KiB, never 50 MB, and is dead-lettered as `too_large` with its true size.
//! The parser also knows exactly when a reply is complete, so nothing is decoded twice.

use std::ops::Range;

use bytes::BytesMut;

/// One element of a reply; strings are spans of the buffer the reply was read into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Simple(Range<usize>),
    Error(Range<usize>),
    Integer(i64),
    Bulk(Range<usize>),
    Null,
    Array(Vec<Frame>),
}

/// A reply that breaks RESP2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed RESP2 reply: {0}")]
pub struct ProtocolError(pub &'static str);

/// A value that was cut while it streamed in: its kept prefix starts at `at` in the buffer, and
/// it was `len` bytes long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elided {
    pub at: usize,
    pub len: usize,
}

/// Where the parser stopped inside an element.
#[derive(Debug, Clone, Copy)]
enum Partial {
    None,
    /// A bulk string whose content ends at `end` (its CRLF follows).
    Bulk {
        start: usize,
        end: usize,
    },
    /// An oversized bulk string: keep bytes up to `kept_end`, then drop `left` more.
    Cut {
        start: usize,
        kept_end: usize,
        left: usize,
    },
}

/// Parses `expected` replies from a buffer that grows as bytes arrive.
#[derive(Debug)]
pub struct ReplyParser {
    /// Values longer than this are cut...
    limit: usize,
    /// ...to their first `keep` bytes.
    keep: usize,
    expected: usize,
    pos: usize,
    partial: Partial,
    /// Open arrays: elements still expected, and those parsed.
    stack: Vec<(usize, Vec<Frame>)>,
    replies: Vec<Frame>,
    elided: Vec<Elided>,
}

impl ReplyParser {
    /// A parser for `expected` replies, cutting values longer than `limit` to `keep` bytes.
    pub fn new(expected: usize, limit: usize, keep: usize) -> Self {
        ReplyParser {
            limit,
            keep: keep.min(limit),
            expected,
            pos: 0,
            partial: Partial::None,
            stack: Vec::new(),
            replies: Vec::with_capacity(expected),
            elided: Vec::new(),
        }
    }

    /// Parses what `buf` holds beyond what was parsed before (the buffer may shrink where a value
    /// is cut). True once every expected reply is complete; the bytes parsed are then `..used()`.
    pub fn feed(&mut self, buf: &mut BytesMut) -> Result<bool, ProtocolError> {
        loop {
            match self.partial {
                Partial::None => {}
                Partial::Bulk { start, end } => {
                    if buf.len() < end + 2 {
                        return Ok(false);
                    }
                    if &buf[end..end + 2] != b"\r\n" {
                        return Err(ProtocolError("bulk string without CRLF"));
                    }
                    self.pos = end + 2;
                    self.partial = Partial::None;
                    self.complete(Frame::Bulk(start..end));
                }
                Partial::Cut {
                    start,
                    kept_end,
                    left,
                } => {
                    if buf.len() <= kept_end {
                        return Ok(false);
                    }
                    let drop = (buf.len() - kept_end).min(left);
                    remove(buf, kept_end..kept_end + drop);
                    self.partial = if left == drop {
                        Partial::Bulk {
                            start,
                            end: kept_end,
                        }
                    } else {
                        Partial::Cut {
                            start,
                            kept_end,
                            left: left - drop,
                        }
                    };
                    continue;
                }
            }
            if self.replies.len() == self.expected {
                return Ok(true);
            }
            let Some(eol) = buf[self.pos..].windows(2).position(|w| w == b"\r\n") else {
                return Ok(false);
            };
            let (start, line_end) = (self.pos, self.pos + eol);
            let next = line_end + 2;
            match buf.get(start).copied() {
                Some(b'+') => {
                    self.pos = next;
                    self.complete(Frame::Simple(start + 1..line_end));
                }
                Some(b'-') => {
                    self.pos = next;
                    self.complete(Frame::Error(start + 1..line_end));
                }
                Some(b':') => {
                    let n = integer(&buf[start + 1..line_end])?;
                    self.pos = next;
                    self.complete(Frame::Integer(n));
                }
                Some(b'$') => {
                    let n = integer(&buf[start + 1..line_end])?;
                    if n < 0 {
                        self.pos = next;
                        self.complete(Frame::Null);
                    } else if n as usize > self.limit {
                        let len = n as usize;
                        let header = format!("${}\r\n", self.keep);
                        replace(buf, start..next, header.as_bytes());
                        let value = start + header.len();
                        self.elided.push(Elided { at: value, len });
                        self.pos = value;
                        self.partial = Partial::Cut {
                            start: value,
                            kept_end: value + self.keep,
                            left: len - self.keep,
                        };
                    } else {
                        self.pos = next;
                        self.partial = Partial::Bulk {
                            start: next,
                            end: next + n as usize,
                        };
                    }
                }
                Some(b'*') => {
                    let n = integer(&buf[start + 1..line_end])?;
                    self.pos = next;
                    match n {
                        ..=-1 => self.complete(Frame::Null),
                        0 => self.complete(Frame::Array(Vec::new())),
                        n => self
                            .stack
                            .push((n as usize, Vec::with_capacity((n as usize).min(1024)))),
                    }
                }
                _ => return Err(ProtocolError("unknown type byte")),
            }
        }
    }

    /// Bytes of the buffer taken by the replies parsed so far.
    pub fn used(&self) -> usize {
        self.pos
    }

    /// The replies, in order, and the values cut while they arrived.
    pub fn finish(self) -> (Vec<Frame>, Vec<Elided>) {
        (self.replies, self.elided)
    }

    fn complete(&mut self, mut frame: Frame) {
        loop {
            match self.stack.last_mut() {
                None => {
                    self.replies.push(frame);
                    return;
                }
                Some((left, items)) => {
                    items.push(frame);
                    *left -= 1;
                    if *left > 0 {
                        return;
                    }
                    let (_, items) = self.stack.pop().expect("an open array");
                    frame = Frame::Array(items);
                }
            }
        }
    }
}

fn integer(text: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or(ProtocolError("bad integer"))
}

/// Removes `range` from `buf`, moving what follows (at most one socket read) back.
fn remove(buf: &mut BytesMut, range: Range<usize>) {
    let len = buf.len();
    buf.copy_within(range.end..len, range.start);
    buf.truncate(len - range.len());
}

/// Replaces `range` of `buf` with the shorter `with`.
fn replace(buf: &mut BytesMut, range: Range<usize>, with: &[u8]) {
    debug_assert!(with.len() <= range.len());
    buf[range.start..range.start + with.len()].copy_from_slice(with);
    remove(buf, range.start + with.len()..range.end);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `raw` in pieces of `step` bytes; returns the replies, the buffer and the cuts.
    fn parse(
        raw: &[u8],
        step: usize,
        expected: usize,
        limit: usize,
    ) -> (Vec<Frame>, BytesMut, Vec<Elided>) {
        let mut parser = ReplyParser::new(expected, limit, 3);
        let mut buf = BytesMut::new();
        for chunk in raw.chunks(step) {
            assert!(!parser.feed(&mut buf).unwrap(), "complete too early");
            buf.extend_from_slice(chunk);
        }
        assert!(parser.feed(&mut buf).unwrap(), "complete at the end");
        assert_eq!(parser.used(), buf.len());
        let (replies, elided) = parser.finish();
        (replies, buf, elided)
    }

    const READ: &[u8] = b"*1\r\n*2\r\n$2\r\nst\r\n*2\r\n*2\r\n$3\r\n1-1\r\n*4\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n$0\r\n\r\n*2\r\n$3\r\n1-2\r\n*-1\r\n";

    #[test]
    fn parses_a_read_reply_in_any_pieces() {
        for step in 1..=READ.len() {
            let (replies, buf, elided) = parse(READ, step, 1, 100);
            assert!(elided.is_empty());
            let Frame::Array(streams) = &replies[0] else {
                panic!()
            };
            let Frame::Array(pair) = &streams[0] else {
                panic!()
            };
            let Frame::Bulk(key) = &pair[0] else { panic!() };
            assert_eq!(&buf[key.clone()], b"st");
            let Frame::Array(entries) = &pair[1] else {
                panic!()
            };
            assert_eq!(entries.len(), 2);
            assert!(matches!(&entries[1], Frame::Array(e) if e[1] == Frame::Null));
        }
    }

    #[test]
    fn cuts_values_over_the_limit_as_they_stream_in() {
        let big = "x".repeat(5000);
        let raw = format!(
            "*3\r\n$4\r\ndata\r\n${}\r\n{big}\r\n:7\r\n+OK\r\n",
            big.len()
        );
        for step in [1, 7, 64, 4096, raw.len()] {
            let (replies, buf, elided) = parse(raw.as_bytes(), step, 2, 100);
            assert_eq!(
                elided,
                vec![Elided {
                    at: elided[0].at,
                    len: 5000
                }]
            );
            assert!(
                buf.len() < 64,
                "the buffer never held the value: {}",
                buf.len()
            );
            let Frame::Array(items) = &replies[0] else {
                panic!()
            };
            let Frame::Bulk(kept) = &items[1] else {
                panic!()
            };
            assert_eq!(&buf[kept.clone()], b"xxx");
            assert_eq!(kept.start, elided[0].at);
            assert_eq!(items[2], Frame::Integer(7));
            assert!(matches!(&replies[1], Frame::Simple(r) if &buf[r.clone()] == b"OK"));
        }
    }

    #[test]
    fn errors_and_nils_and_broken_replies() {
        let (replies, buf, _) = parse(b"-NOGROUP no group\r\n*-1\r\n", 5, 2, 10);
        assert!(matches!(&replies[0], Frame::Error(r) if buf[r.clone()].starts_with(b"NOGROUP")));
        assert_eq!(replies[1], Frame::Null);
        let mut p = ReplyParser::new(1, 10, 3);
        let mut buf = BytesMut::from(&b"$3\r\nabcd\r\n"[..]);
        assert!(p.feed(&mut buf).is_err());
        let mut p = ReplyParser::new(1, 10, 3);
        let mut buf = BytesMut::from(&b"?\r\n"[..]);
        assert!(p.feed(&mut buf).is_err());
    }
}
