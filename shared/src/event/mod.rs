//! The v1 event (contract section 1): decoding one stream entry into a typed [`Event`], checking
//! every rule, so that nothing malformed ever reaches a handler.
//!
//! Each broken rule is its own [`DecodeError`] with a human-readable message and a dead letter
//! reason; a decode error is final (never retried), because retrying cannot fix the input.

pub mod channel;
pub(crate) mod legacy;
pub mod pattern;
pub mod template;

use std::borrow::Cow;

use serde::de::IgnoredAny;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::stream::EntryId;
use channel::ChannelError;

/// The only schema major version this build reads.
pub const SUPPORTED_VERSION: &str = "1";
/// Default limit on the size of `data`, in bytes.
pub const DEFAULT_MAX_DATA_BYTES: usize = 1024 * 1024;
/// Room for the other fields beyond `data` before an entry counts as too large.
const ENVELOPE_ALLOWANCE: usize = 64 * 1024;
const MAX_TYPE_LEN: usize = 255;
const MAX_SOURCE_LEN: usize = 128;
const MAX_KEY_LEN: usize = 256;
const MAX_CORRELATION_LEN: usize = 128;

pub use crate::stream::Fields;

/// A valid v1 event. Its text borrows from the entry it was decoded from (the batch's reply
/// buffer), so decoding copies nothing; an upcast legacy event owns what it had to build.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    /// Fleet-wide deduplication key.
    pub id: Uuid,
    /// Lowercase dotted event type, e.g. `user.signup`.
    pub event_type: Cow<'a, str>,
    /// Routing channel, valid by [`channel::check`].
    pub channel: Cow<'a, str>,
    /// Producing service.
    pub source: Cow<'a, str>,
    /// When the event happened.
    pub time: OffsetDateTime,
    /// The `data` object as JSON text, kept verbatim so it is never re-serialised.
    pub data: Cow<'a, str>,
    /// Ordering / coalescing key, if the producer gave one.
    pub key: Option<Cow<'a, str>>,
    /// Carried into logs and PostgreSQL.
    pub correlation_id: Option<Cow<'a, str>>,
}

impl Event<'_> {
    /// The event with its text copied out of the entry, to outlive the batch.
    pub fn into_owned(self) -> Event<'static> {
        let own = |c: Cow<'_, str>| Cow::Owned(c.into_owned());
        Event {
            id: self.id,
            event_type: own(self.event_type),
            channel: own(self.channel),
            source: own(self.source),
            time: self.time,
            data: own(self.data),
            key: self.key.map(own),
            correlation_id: self.correlation_id.map(own),
        }
    }

    /// The ordering / coalescing key: `key`, or the channel when absent.
    pub fn key(&self) -> &str {
        self.key.as_deref().unwrap_or(&self.channel)
    }

    /// Appends the contract's JSON object to `out`, `data` verbatim (never parsed again): what
    /// the projector stores and a gateway sends, per event, so it is written directly.
    pub fn write_json(&self, out: &mut String) {
        use std::fmt::Write;
        let text = |out: &mut String, s: &str| {
            // A str always serializes: the error case cannot happen.
            out.push_str(&serde_json::to_string(s).unwrap_or_default());
        };
        let _ = write!(out, r#"{{"v":1,"id":"{}","type":"#, self.id);
        text(out, &self.event_type);
        out.push_str(r#","channel":"#);
        text(out, &self.channel);
        out.push_str(r#","source":"#);
        text(out, &self.source);
        out.push_str(r#","time":"#);
        text(out, &self.time.format(&Rfc3339).unwrap_or_default());
        out.push_str(r#","data":"#);
        out.push_str(&self.data);
        if let Some(key) = &self.key {
            out.push_str(r#","key":"#);
            text(out, key);
        }
        if let Some(c) = &self.correlation_id {
            out.push_str(r#","correlation_id":"#);
            text(out, c);
        }
        out.push('}');
    }

    /// The event as the contract's JSON object (CLI, dead letter view, PostgreSQL row).
    pub fn to_json(&self) -> serde_json::Value {
        let data: serde_json::Value =
            serde_json::from_str(&self.data).unwrap_or(serde_json::Value::Null);
        serde_json::json!({
            "v": 1,
            "id": self.id.to_string(),
            "type": self.event_type,
            "channel": self.channel,
            "source": self.source,
            "time": self.time.format(&Rfc3339).unwrap_or_default(),
            "data": data,
            "key": self.key,
            "correlation_id": self.correlation_id,
        })
    }
}

/// The key an entry is ordered by, read without decoding it, so that the pipeline can give all
/// the entries of one key to one handler lane before any is decoded: `key`, else `channel`, else,
/// for a legacy entry, the channel its upcast gets (`flow.<flow_id>.<type>`, ASCII lowercased).
/// An entry that will not decode gets some key: it is dead-lettered, whichever lane has it.
pub fn ordering_key<'a>(stream: &str, fields: &'a Fields) -> Cow<'a, [u8]> {
    if let Some(key) = fields.get(b"key").or_else(|| fields.get(b"channel")) {
        return Cow::Borrowed(key);
    }
    match (
        stream.strip_prefix(legacy::LEGACY_STREAM_PREFIX),
        fields.get(b"event_type"),
    ) {
        (Some(flow_id), Some(event_type)) => {
            let mut channel = Vec::with_capacity(6 + flow_id.len() + event_type.len());
            channel.extend_from_slice(b"flow.");
            channel.extend_from_slice(flow_id.as_bytes());
            channel.push(b'.');
            channel.extend_from_slice(event_type);
            channel.make_ascii_lowercase();
            Cow::Owned(channel)
        }
        _ => Cow::Borrowed(b""),
    }
}

/// Why an entry was dead-lettered: the `dlq_reason` field (contract section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DlqReason {
    Invalid,
    UnsupportedVersion,
    TooLarge,
    MaxDeliveries,
    HandlerError,
}

impl DlqReason {
    /// Every reason, in the contract's order.
    pub const ALL: [DlqReason; 5] = [
        DlqReason::Invalid,
        DlqReason::UnsupportedVersion,
        DlqReason::TooLarge,
        DlqReason::MaxDeliveries,
        DlqReason::HandlerError,
    ];

    /// The contract's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DlqReason::Invalid => "invalid",
            DlqReason::UnsupportedVersion => "unsupported_version",
            DlqReason::TooLarge => "too_large",
            DlqReason::MaxDeliveries => "max_deliveries",
            DlqReason::HandlerError => "handler_error",
        }
    }
}

/// Limits applied while decoding.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted `data` (or legacy `payload`), in bytes.
    pub max_data_bytes: usize,
}

impl Limits {
    /// The largest entry accepted: `data` and room for the other fields. Any single value longer
    /// than this makes its entry too large, whatever the rest.
    pub fn max_entry_bytes(&self) -> usize {
        self.max_data_bytes + ENVELOPE_ALLOWANCE
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_data_bytes: DEFAULT_MAX_DATA_BYTES,
        }
    }
}

/// Why an entry is not a valid event. Every variant maps to one dead letter reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported schema version {0:?}: this worker reads v{SUPPORTED_VERSION}")]
    UnsupportedVersion(String),
    #[error("entry is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("missing required field `{0}`")]
    Missing(&'static str),
    #[error("field `{0}` appears more than once")]
    Repeated(&'static str),
    #[error("field `{0}` is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("field `id`: {0:?} is not a UUID in canonical 8-4-4-4-12 form")]
    BadId(String),
    #[error("field `type`: {0:?} is not lowercase dotted ([a-z0-9_] segments joined by '.', at most 255 bytes)")]
    BadType(String),
    #[error("field `channel`: {value:?}: {cause}")]
    BadChannel { value: String, cause: ChannelError },
    #[error("field `source`: {0:?} must be 1 to 128 characters of [A-Za-z0-9._:/@-]")]
    BadSource(String),
    #[error("field `time`: {0:?} is not an RFC 3339 time")]
    BadTime(String),
    #[error("field `time`: {0:?} falls outside the years 0000 to 9999 in UTC")]
    TimeOutOfRange(String),
    #[error("field `{field}`: not valid JSON: {cause}")]
    DataNotJson { field: &'static str, cause: String },
    #[error("field `{0}`: must be a JSON object")]
    DataNotObject(&'static str),
    #[error("field `key`: must be 1 to 256 bytes")]
    BadKey,
    #[error("field `correlation_id`: {0} bytes, over the limit of 128")]
    CorrelationTooLong(usize),
    #[error("legacy entry: {0}")]
    Legacy(String),
}

impl DecodeError {
    /// The dead letter reason this error is filed under.
    pub fn reason(&self) -> DlqReason {
        match self {
            DecodeError::UnsupportedVersion(_) => DlqReason::UnsupportedVersion,
            DecodeError::TooLarge { .. } => DlqReason::TooLarge,
            _ => DlqReason::Invalid,
        }
    }
}

/// The v1 fields of an entry, looked up in one pass.
#[derive(Default)]
struct V1Fields<'a> {
    v: Option<&'a [u8]>,
    id: Option<&'a [u8]>,
    event_type: Option<&'a [u8]>,
    channel: Option<&'a [u8]>,
    source: Option<&'a [u8]>,
    time: Option<&'a [u8]>,
    data: Option<&'a [u8]>,
    key: Option<&'a [u8]>,
    correlation_id: Option<&'a [u8]>,
    legacy_event_type: bool,
}

fn set<'a>(
    slot: &mut Option<&'a [u8]>,
    name: &'static str,
    v: &'a [u8],
) -> Result<(), DecodeError> {
    if slot.replace(v).is_some() {
        return Err(DecodeError::Repeated(name));
    }
    Ok(())
}

/// Decodes one stream entry. `stream` and `entry_id` matter only for legacy entries, whose
/// id and channel are derived from them.
pub fn decode<'a>(
    stream: &str,
    entry_id: EntryId,
    fields: &'a Fields,
    limits: &Limits,
) -> Result<Event<'a>, DecodeError> {
    // Size first, before anything is parsed: a huge entry must cost as little as possible.
    let size = fields.byte_size();
    if size > limits.max_entry_bytes() {
        return Err(DecodeError::TooLarge {
            size,
            limit: limits.max_entry_bytes(),
        });
    }
    let mut f = V1Fields::default();
    for (name, value) in fields.iter() {
        match name {
            b"v" => set(&mut f.v, "v", value)?,
            b"id" => set(&mut f.id, "id", value)?,
            b"type" => set(&mut f.event_type, "type", value)?,
            b"channel" => set(&mut f.channel, "channel", value)?,
            b"source" => set(&mut f.source, "source", value)?,
            b"time" => set(&mut f.time, "time", value)?,
            b"data" => set(&mut f.data, "data", value)?,
            b"key" => set(&mut f.key, "key", value)?,
            b"correlation_id" => set(&mut f.correlation_id, "correlation_id", value)?,
            b"event_type" => f.legacy_event_type = true,
            _ => {} // forward compatible: unknown fields are ignored
        }
    }
    let Some(v) = f.v else {
        if f.legacy_event_type {
            return legacy::upcast(stream, entry_id, fields, limits);
        }
        return Err(DecodeError::Missing("v"));
    };
    if v != SUPPORTED_VERSION.as_bytes() {
        return Err(DecodeError::UnsupportedVersion(
            String::from_utf8_lossy(v).into_owned(),
        ));
    }
    let id = parse_id(text("id", f.id)?)?;
    let event_type = check_type(text("type", f.event_type)?)?;
    let channel_text = text("channel", f.channel)?;
    channel::check(channel_text).map_err(|cause| DecodeError::BadChannel {
        value: channel_text.to_owned(),
        cause,
    })?;
    let source = check_source(text("source", f.source)?)?;
    let time_text = text("time", f.time)?;
    let time = OffsetDateTime::parse(time_text, &Rfc3339)
        .map_err(|_| DecodeError::BadTime(time_text.to_owned()))
        .and_then(|t| check_time(time_text, t))?;
    let data = check_data("data", text("data", f.data)?, limits)?;
    let key = match f.key {
        None => None,
        Some(k) => {
            let k = utf8("key", k)?;
            if k.is_empty() || k.len() > MAX_KEY_LEN {
                return Err(DecodeError::BadKey);
            }
            Some(Cow::Borrowed(k))
        }
    };
    let correlation_id = correlation(f.correlation_id)?;
    Ok(Event {
        id,
        event_type: Cow::Borrowed(event_type),
        channel: Cow::Borrowed(channel_text),
        source: Cow::Borrowed(source),
        time,
        data: Cow::Borrowed(data),
        key,
        correlation_id,
    })
}

/// A required field as text.
pub(crate) fn text<'a>(name: &'static str, v: Option<&'a [u8]>) -> Result<&'a str, DecodeError> {
    utf8(name, v.ok_or(DecodeError::Missing(name))?)
}

pub(crate) fn utf8<'a>(name: &'static str, v: &'a [u8]) -> Result<&'a str, DecodeError> {
    std::str::from_utf8(v).map_err(|_| DecodeError::NotUtf8(name))
}

fn parse_id(s: &str) -> Result<Uuid, DecodeError> {
    // Canonical hyphenated form only, as the JSON Schema's `uuid` format requires.
    let canonical = s.len() == 36 && s.as_bytes()[8] == b'-';
    match Uuid::try_parse(s) {
        Ok(id) if canonical && !id.is_nil() => Ok(id),
        _ => Err(DecodeError::BadId(s.to_owned())),
    }
}

/// Checks the `type` grammar: `[a-z0-9_]+` segments joined by `.`.
pub(crate) fn check_type(s: &str) -> Result<&str, DecodeError> {
    let ok = !s.is_empty()
        && s.len() <= MAX_TYPE_LEN
        && s.split('.').all(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
    if ok {
        Ok(s)
    } else {
        Err(DecodeError::BadType(s.to_owned()))
    }
}

pub(crate) fn check_source(s: &str) -> Result<&str, DecodeError> {
    let ok = !s.is_empty()
        && s.len() <= MAX_SOURCE_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/@-".contains(&b));
    if ok {
        Ok(s)
    } else {
        Err(DecodeError::BadSource(s.to_owned()))
    }
}

/// Checks that the instant of a valid RFC 3339 time can be written in UTC. `9999-12-31T23:59:59-01:00`
/// is valid RFC 3339, but its instant is in the year 10000: no sink (nor RFC 3339 in UTC) can hold
/// it, and converting it panics, so it is rejected here, as `invalid`, before any handler sees it.
pub(crate) fn check_time(text: &str, t: OffsetDateTime) -> Result<OffsetDateTime, DecodeError> {
    // `time` holds years -9999 to 9999, so the conversion itself cannot overflow here.
    let year = t
        .checked_to_offset(time::UtcOffset::UTC)
        .map(|utc| utc.year());
    match year {
        Some(0..=9999) => Ok(t),
        _ => Err(DecodeError::TimeOutOfRange(text.to_owned())),
    }
}

/// Checks that `s` is one JSON object within the size limit, without building a tree.
pub(crate) fn check_data<'a>(
    field: &'static str,
    s: &'a str,
    limits: &Limits,
) -> Result<&'a str, DecodeError> {
    if s.len() > limits.max_data_bytes {
        return Err(DecodeError::TooLarge {
            size: s.len(),
            limit: limits.max_data_bytes,
        });
    }
    serde_json::from_str::<IgnoredAny>(s).map_err(|e| DecodeError::DataNotJson {
        field,
        cause: e.to_string(),
    })?;
    if !s.trim_start().starts_with('{') {
        return Err(DecodeError::DataNotObject(field));
    }
    Ok(s)
}

/// An optional correlation id; an empty one counts as absent.
pub(crate) fn correlation(v: Option<&[u8]>) -> Result<Option<Cow<'_, str>>, DecodeError> {
    match v {
        None => Ok(None),
        Some(c) => {
            let c = utf8("correlation_id", c)?;
            if c.len() > MAX_CORRELATION_LEN {
                return Err(DecodeError::CorrelationTooLong(c.len()));
            }
            Ok((!c.is_empty()).then_some(Cow::Borrowed(c)))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const ENTRY: EntryId = EntryId { ms: 1, seq: 0 };

    pub(crate) fn owned(pairs: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    pub(crate) fn fields(pairs: &[(&str, &str)]) -> Fields {
        pairs.iter().copied().collect()
    }

    fn valid() -> Vec<(&'static str, &'static str)> {
        vec![
            ("v", "1"),
            ("id", "0190f2a4-7b1c-7cc0-8a57-3f7e2a6b9d10"),
            ("type", "user.signup"),
            ("channel", "user.42.profile"),
            ("source", "accounts-api"),
            ("time", "2026-11-24T10:00:00.123Z"),
            ("data", r#"{"plan":"pro"}"#),
        ]
    }

    fn decode_pairs(pairs: &[(&str, &str)]) -> Result<Event<'static>, DecodeError> {
        decode("events", ENTRY, &fields(pairs), &Limits::default()).map(Event::into_owned)
    }

    fn with(name: &str, value: &'static str) -> Vec<(&'static str, &'static str)> {
        let mut v = valid();
        let slot = v.iter_mut().find(|(k, _)| *k == name).unwrap();
        slot.1 = value;
        v
    }

    fn without(name: &str) -> Vec<(&'static str, &'static str)> {
        valid().into_iter().filter(|(k, _)| *k != name).collect()
    }

    #[test]
    fn the_ordering_key_read_without_decoding_is_the_decoded_key() {
        let legacy = [
            ("event_type", "AGENT_PROGRESS"),
            ("payload", r#"{"step":3}"#),
            ("timestamp", "2024-05-01T12:30:45.123456"),
        ];
        let mut keyed = valid();
        keyed.push(("key", "order-17"));
        for (stream, pairs) in [
            ("events", valid()),
            ("events", keyed),
            ("flow:events:7F3C", legacy.to_vec()),
        ] {
            let f = fields(&pairs);
            let event = decode(stream, ENTRY, &f, &Limits::default()).unwrap();
            assert_eq!(
                &*ordering_key(stream, &f),
                event.key().as_bytes(),
                "{pairs:?}"
            );
        }
    }

    #[test]
    fn decodes_a_valid_event() {
        let e = decode_pairs(&valid()).unwrap();
        assert_eq!(e.event_type, "user.signup");
        assert_eq!(e.key(), "user.42.profile");
        assert_eq!(e.correlation_id, None);
        assert_eq!(e.to_json()["data"]["plan"], "pro");
        let mut written = String::new();
        e.write_json(&mut written);
        let mut expected = e.to_json();
        // to_json names absent optional fields as null; write_json leaves them out.
        expected
            .as_object_mut()
            .unwrap()
            .retain(|_, v| !v.is_null());
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&written).unwrap(),
            expected
        );
    }

    #[test]
    fn optional_fields_and_unknown_fields() {
        let mut pairs = valid();
        pairs.extend([("key", "k1"), ("correlation_id", "req-9"), ("extra", "x")]);
        let e = decode_pairs(&pairs).unwrap();
        assert_eq!(e.key(), "k1");
        assert_eq!(e.correlation_id.as_deref(), Some("req-9"));
        let mut pairs = valid();
        pairs.push(("correlation_id", ""));
        assert_eq!(decode_pairs(&pairs).unwrap().correlation_id, None);
    }

    #[test]
    fn every_broken_rule_has_its_own_error() {
        use DecodeError as E;
        let reason = |pairs: &[(&str, &str)]| decode_pairs(pairs).unwrap_err();
        assert!(matches!(reason(&with("v", "2")), E::UnsupportedVersion(v) if v == "2"));
        assert_eq!(reason(&without("v")), E::Missing("v"));
        for name in ["id", "type", "channel", "source", "time", "data"] {
            assert_eq!(
                reason(&without(name)),
                E::Missing(match name {
                    "id" => "id",
                    "type" => "type",
                    "channel" => "channel",
                    "source" => "source",
                    "time" => "time",
                    _ => "data",
                })
            );
        }
        assert!(matches!(reason(&with("id", "not-a-uuid")), E::BadId(_)));
        assert!(matches!(
            reason(&with("id", "0190f2a47b1c7cc08a573f7e2a6b9d10")),
            E::BadId(_)
        ));
        assert!(matches!(
            reason(&with("id", "00000000-0000-0000-0000-000000000000")),
            E::BadId(_)
        ));
        assert!(matches!(
            reason(&with("type", "User.Signup")),
            E::BadType(_)
        ));
        assert!(matches!(
            reason(&with("type", "user..signup")),
            E::BadType(_)
        ));
        assert!(matches!(
            reason(&with("channel", "user.*")),
            E::BadChannel { .. }
        ));
        assert!(matches!(reason(&with("source", "")), E::BadSource(_)));
        assert!(matches!(
            reason(&with("source", "has space")),
            E::BadSource(_)
        ));
        assert!(matches!(reason(&with("time", "yesterday")), E::BadTime(_)));
        // Valid RFC 3339, but the instant is in the year 10000 (or -1) in UTC.
        for t in ["9999-12-31T23:59:59-01:00", "0000-01-01T00:30:00+01:00"] {
            assert!(
                matches!(reason(&with("time", t)), E::TimeOutOfRange(_)),
                "{t}"
            );
        }
        assert!(decode_pairs(&with("time", "9999-12-31T23:59:59+01:00")).is_ok());
        assert!(decode_pairs(&with("time", "0000-01-01T00:00:00Z")).is_ok());
        assert!(matches!(
            reason(&with("time", "2026-11-24T10:00:00")),
            E::BadTime(_)
        ));
        assert!(matches!(
            reason(&with("data", "{not json")),
            E::DataNotJson { .. }
        ));
        assert_eq!(reason(&with("data", "[1,2]")), E::DataNotObject("data"));
        assert_eq!(reason(&with("data", "\"s\"")), E::DataNotObject("data"));
        let mut pairs = valid();
        pairs.push(("key", ""));
        assert_eq!(reason(&pairs), E::BadKey);
        let mut pairs = valid();
        let long: &'static str = Box::leak("c".repeat(129).into_boxed_str());
        pairs.push(("correlation_id", long));
        assert_eq!(reason(&pairs), E::CorrelationTooLong(129));
        let mut pairs = valid();
        pairs.push(("id", "0190f2a4-7b1c-7cc0-8a57-3f7e2a6b9d11"));
        assert_eq!(reason(&pairs), E::Repeated("id"));
        let mut raw = owned(&valid());
        raw[2].1 = vec![0xff, 0xfe];
        let raw: Fields = raw.iter().map(|(k, v)| (k, v)).collect();
        assert_eq!(
            decode("s", ENTRY, &raw, &Limits::default()).unwrap_err(),
            E::NotUtf8("type")
        );
    }

    #[test]
    fn size_limit_is_checked_before_parsing() {
        let limits = Limits { max_data_bytes: 16 };
        let big = format!("{{\"x\":\"{}\"", "a".repeat(32)); // not even valid JSON
        let mut pairs = owned(&valid());
        pairs.iter_mut().find(|(k, _)| k == b"data").unwrap().1 = big.into_bytes();
        let pairs: Fields = pairs.iter().map(|(k, v)| (k, v)).collect();
        let err = decode("s", ENTRY, &pairs, &limits).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { .. }));
        assert_eq!(err.reason(), DlqReason::TooLarge);
    }

    #[test]
    fn reasons_follow_the_contract() {
        assert_eq!(DecodeError::Missing("v").reason(), DlqReason::Invalid);
        assert_eq!(
            DecodeError::UnsupportedVersion("2".into()).reason(),
            DlqReason::UnsupportedVersion
        );
    }
}
