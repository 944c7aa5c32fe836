//! A stream entry as read from a consumer group, and its id.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use redis::Value;

/// A stream entry id `<ms>-<seq>`, ordered as Redis orders them (text order is wrong: `9-0` < `10-0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// An entry id that is not `<ms>-<seq>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a stream entry id")]
pub struct BadEntryId(pub String);

impl FromStr for EntryId {
    type Err = BadEntryId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadEntryId(s.to_owned());
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        Ok(EntryId {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// One entry read from a stream through the consumer group.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The stream key, shared by every entry of a read.
    pub stream: Arc<str>,
    pub id: EntryId,
    /// `None` when the entry was deleted (XDEL, trimming) while pending: nothing to apply.
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    /// How many times the group has delivered this entry, this delivery included.
    pub deliveries: u64,
}

/// The reply of XREADGROUP / XRANGE-like commands could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("unexpected reply shape from Redis: {0}")]
pub struct ReplyError(pub &'static str);

fn bytes(v: Value) -> Result<Vec<u8>, ReplyError> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        _ => Err(ReplyError("expected a string")),
    }
}

fn array(v: Value) -> Result<Vec<Value>, ReplyError> {
    match v {
        Value::Array(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        _ => Err(ReplyError("expected an array")),
    }
}

/// Parses a list of `[id, [field, value, ...]]` entries belonging to `stream`, taking ownership of
/// the byte buffers so nothing is copied.
pub fn parse_entries(
    stream: &Arc<str>,
    list: Value,
    out: &mut Vec<Entry>,
) -> Result<(), ReplyError> {
    for item in array(list)? {
        let mut pair = array(item)?.into_iter();
        let id = bytes(pair.next().ok_or(ReplyError("entry without id"))?)?;
        let id = std::str::from_utf8(&id)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(ReplyError("entry id"))?;
        let fields = match pair.next() {
            None | Some(Value::Nil) => None,
            Some(v) => {
                let flat = array(v)?;
                let mut fields = Vec::with_capacity(flat.len() / 2);
                let mut it = flat.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    fields.push((bytes(k)?, bytes(v)?));
                }
                Some(fields)
            }
        };
        out.push(Entry {
            stream: stream.clone(),
            id,
            fields,
            deliveries: 1,
        });
    }
    Ok(())
}

/// The entries read from each stream of one XREADGROUP.
pub type StreamEntries = Vec<(Arc<str>, Vec<Entry>)>;

/// Parses an XREADGROUP reply: `[[stream, entries], ...]` (or a map under RESP3), nil on timeout.
/// Returns, per stream key, the entries read.
pub fn parse_read_reply(reply: Value, keys: &[Arc<str>]) -> Result<StreamEntries, ReplyError> {
    let pairs: Vec<(Value, Value)> = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(m) => m,
        Value::Array(a) => a
            .into_iter()
            .map(|kv| {
                let mut kv = array(kv)?.into_iter();
                match (kv.next(), kv.next()) {
                    (Some(k), Some(v)) => Ok((k, v)),
                    _ => Err(ReplyError("stream reply pair")),
                }
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(ReplyError("XREADGROUP reply")),
    };
    let mut out = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        let k = bytes(k)?;
        let stream = keys
            .iter()
            .find(|s| s.as_bytes() == k.as_slice())
            .cloned()
            .unwrap_or_else(|| Arc::from(String::from_utf8_lossy(&k).as_ref()));
        let mut entries = Vec::new();
        parse_entries(&stream, v, &mut entries)?;
        out.push((stream, entries));
    }
    Ok(out)
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
    fn parses_reply_with_deleted_entry() {
        let s = |x: &str| Value::BulkString(x.as_bytes().to_vec());
        let reply = Value::Array(vec![Value::Array(vec![
            s("st"),
            Value::Array(vec![
                Value::Array(vec![s("1-1"), Value::Array(vec![s("a"), s("b")])]),
                Value::Array(vec![s("1-2"), Value::Nil]),
            ]),
        ])]);
        let keys = [Arc::from("st")];
        let out = parse_read_reply(reply, &keys).unwrap();
        assert_eq!(out.len(), 1);
        let entries = &out[0].1;
        assert_eq!(
            entries[0].fields.as_ref().unwrap()[0],
            (b"a".to_vec(), b"b".to_vec())
        );
        assert!(entries[1].fields.is_none());
        assert!(parse_read_reply(Value::Nil, &keys).unwrap().is_empty());
    }
}
