//! A stream entry as read from a consumer group, and its id.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::source::reply::{Elided, Frame};
pub use crate::stream::{EntryId, Fields};

/// One entry read from a stream through the consumer group.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The stream key, shared by every entry of a read.
    pub stream: Arc<str>,
    pub id: EntryId,
    /// `None` when the entry was deleted (XDEL, trimming) while pending: nothing to apply.
    pub fields: Option<Fields>,
    /// How many times the group has delivered this entry, this delivery included.
    pub deliveries: u64,
}

impl Entry {
    /// A copy that holds its own fields, not its read's reply (see [`Fields::detached`]).
    pub fn detached(&self) -> Entry {
        Entry {
            stream: self.stream.clone(),
            id: self.id,
            fields: self.fields.as_ref().map(Fields::detached),
            deliveries: self.deliveries,
        }
    }
}

/// The reply of XREADGROUP / XRANGE-like commands could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("unexpected reply shape from Redis: {0}")]
pub struct ReplyError(pub &'static str);

fn parse_id(id: &[u8]) -> Result<EntryId, ReplyError> {
    std::str::from_utf8(id)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ReplyError("entry id"))
}

/// The entries read from each stream of one XREADGROUP.
pub type StreamEntries = Vec<(Arc<str>, Vec<Entry>)>;

fn span(frame: &Frame) -> Result<Range<usize>, ReplyError> {
    match frame {
        Frame::Bulk(r) | Frame::Simple(r) => Ok(r.clone()),
        _ => Err(ReplyError("expected a string")),
    }
}

fn frames(frame: Frame) -> Result<Vec<Frame>, ReplyError> {
    match frame {
        Frame::Array(a) => Ok(a),
        Frame::Null => Ok(Vec::new()),
        _ => Err(ReplyError("expected an array")),
    }
}

/// A reply's buffer and the values cut in it, which entries parsed from it share.
#[derive(Debug, Clone, Copy)]
pub struct ReplyBuf<'a> {
    pub buf: &'a Bytes,
    pub elided: &'a [Elided],
}

/// Parses a RESP2 XREADGROUP reply (`[[stream, [[id, [f, v, ...]], ...]], ...]`, nil on timeout)
/// into entries that share the reply's buffer. Returns, per stream key, the entries read.
pub fn parse_read_frame(
    reply: ReplyBuf<'_>,
    frame: Frame,
    keys: &[Arc<str>],
) -> Result<StreamEntries, ReplyError> {
    let mut out = Vec::new();
    for pair in frames(frame)? {
        let mut pair = frames(pair)?.into_iter();
        let (Some(key), Some(list)) = (pair.next(), pair.next()) else {
            return Err(ReplyError("stream reply pair"));
        };
        let key = &reply.buf[span(&key)?];
        let stream = keys
            .iter()
            .find(|s| s.as_bytes() == key)
            .cloned()
            .unwrap_or_else(|| Arc::from(String::from_utf8_lossy(key).as_ref()));
        let entries = parse_entry_list(reply, &stream, list)?;
        out.push((stream, entries));
    }
    Ok(out)
}

/// Parses a list of `[id, [field, value, ...]]` entries of `stream` (an XREADGROUP stream's
/// list, or XAUTOCLAIM's); a deleted entry's fields are nil.
pub fn parse_entry_list(
    reply: ReplyBuf<'_>,
    stream: &Arc<str>,
    list: Frame,
) -> Result<Vec<Entry>, ReplyError> {
    let buf = reply.buf;
    let list = frames(list)?;
    let mut entries = Vec::with_capacity(list.len());
    for item in list {
        let mut item = frames(item)?.into_iter();
        let id = parse_id(&buf[span(&item.next().ok_or(ReplyError("entry without id"))?)?])?;
        let fields = match item.next() {
            None | Some(Frame::Null) => None,
            Some(flat) => {
                let flat = frames(flat)?;
                let mut spans = Vec::with_capacity(flat.len() / 2);
                let mut cut = Vec::new();
                let mut it = flat.iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    let v = span(v)?;
                    if !reply.elided.is_empty() {
                        if let Some(e) = reply.elided.iter().find(|e| e.at == v.start) {
                            cut.push((spans.len(), e.len));
                        }
                    }
                    spans.push((span(k)?, v));
                }
                Some(Fields {
                    buf: buf.clone(),
                    spans,
                    cut,
                })
            }
        };
        entries.push(Entry {
            stream: stream.clone(),
            id,
            fields,
            deliveries: 1,
        });
    }
    Ok(entries)
}

/// The text of a string frame.
pub fn frame_text<'a>(buf: &'a [u8], frame: &Frame) -> Result<&'a [u8], ReplyError> {
    Ok(&buf[span(frame)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_order_numerically() {
        let a: EntryId = "9-0".parse().unwrap();
        let b: EntryId = "10-0".parse().unwrap();
        assert!(a < b);
        assert!("10-1".parse::<EntryId>().unwrap() > b);
        assert_eq!(b.to_string(), "10-0");
        assert!("10".parse::<EntryId>().is_err());
        assert!("a-b".parse::<EntryId>().is_err());
    }

    #[test]
    fn parses_reply_with_deleted_entry_without_copying_fields() {
        let raw = b"*1\r\n*2\r\n$2\r\nst\r\n*2\r\n*2\r\n$3\r\n1-1\r\n*4\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n$0\r\n\r\n*2\r\n$3\r\n1-2\r\n*-1\r\n";
        let mut parser = crate::source::reply::ReplyParser::new(1, 1 << 20, 4096);
        let mut bytes = bytes::BytesMut::from(&raw[..]);
        assert!(parser.feed(&mut bytes).unwrap());
        let (mut frames, elided) = parser.finish();
        let buf = bytes.freeze();
        let reply = ReplyBuf {
            buf: &buf,
            elided: &elided,
        };
        let keys = [Arc::from("st")];
        let out = parse_read_frame(reply, frames.pop().unwrap(), &keys).unwrap();
        assert_eq!(out.len(), 1);
        assert!(Arc::ptr_eq(&out[0].0, &keys[0]));
        let entries = &out[0].1;
        assert_eq!(entries[0].id, "1-1".parse().unwrap());
        let fields = entries[0].fields.as_ref().unwrap();
        let pairs: Vec<(&[u8], &[u8])> = fields.iter().collect();
        assert_eq!(pairs, [(&b"a"[..], &b"b"[..]), (&b"c"[..], &b""[..])]);
        assert_eq!(fields.get(b"c"), Some(&b""[..]));
        assert_eq!(fields.byte_size(), 3);
        assert!(entries[1].fields.is_none());
        // A blocking read that timed out.
        assert!(parse_read_frame(reply, Frame::Null, &keys)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn owned_pairs_become_fields() {
        let fields: Fields = [("v", "1"), ("id", "x")].into_iter().collect();
        assert_eq!(fields.len(), 2);
        assert_eq!(fields.get(b"id"), Some(&b"x"[..]));
        assert_eq!(fields.get(b"nope"), None);
    }
}
