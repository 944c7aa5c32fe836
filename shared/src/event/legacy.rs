//! Upcasting entries written by the older in-process event bus to v1.
//!
//! The rule is deterministic, so a replay of the same entry yields the same event and deduplicates:
//! - the stream must be `flow:events:<flow_id>`, and `<flow_id>` lowercased a valid channel segment;
//! - `id` = UUIDv5 in [`LEGACY_NAMESPACE`] of the text `<stream key>/<entry id>`;
//! - `type` = `event_type` lowercased (`AGENT_PROGRESS` → `agent_progress`);
//! - `channel` = `flow.<flow_id>.<type>`;
//! - `time` = `timestamp` as written by Python's `datetime.isoformat()`, read as UTC when it has
//!   no offset;
//! - `data` = `payload` (a JSON object); `source` = `source`, or `legacy-bus` when absent or empty;
//! - `correlation_id` = `correlation_id`, absent when empty; `key` absent (so it is the channel).

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};
use uuid::Uuid;

use crate::event::channel;
use crate::event::{self, DecodeError, Event, Fields, Limits};
use crate::stream::EntryId;

/// Namespace of the UUIDv5 ids given to legacy entries (fixed forever: changing it would break
/// deduplication of replays).
pub const LEGACY_NAMESPACE: Uuid = uuid::uuid!("5f1c3d2e-8a47-4b6e-9c0d-7e2f4a1b3c59");
/// Prefix of the streams the legacy bus wrote.
pub const LEGACY_STREAM_PREFIX: &str = "flow:events:";
/// `source` of a legacy entry that did not name one.
pub const DEFAULT_LEGACY_SOURCE: &str = "legacy-bus";

/// The v1 id of the legacy entry `entry_id` on `stream`.
pub fn legacy_id(stream: &str, entry_id: EntryId) -> Uuid {
    Uuid::new_v5(&LEGACY_NAMESPACE, format!("{stream}/{entry_id}").as_bytes())
}

/// Upcasts a legacy entry (no `v`, has `event_type`) to a v1 event.
pub(crate) fn upcast<'a>(
    stream: &str,
    entry_id: EntryId,
    fields: &'a Fields,
    limits: &Limits,
) -> Result<Event<'a>, DecodeError> {
    let flow_id = stream
        .strip_prefix(LEGACY_STREAM_PREFIX)
        .ok_or_else(|| {
            DecodeError::Legacy(format!(
                "legacy entries are read only from {LEGACY_STREAM_PREFIX}<flow_id> streams, not {stream:?}"
            ))
        })?
        .to_ascii_lowercase();
    channel::check_segment(2, &flow_id)
        .map_err(|e| DecodeError::Legacy(format!("flow id {flow_id:?}: {e}")))?;

    let get = |name: &str| fields.get(name.as_bytes());
    let raw_type = event::text("event_type", get("event_type"))?;
    let event_type = raw_type.to_ascii_lowercase();
    if event_type.contains('.') {
        return Err(DecodeError::Legacy(format!(
            "event_type {raw_type:?} must be one word"
        )));
    }
    event::check_type(&event_type)?;
    let channel = format!("flow.{flow_id}.{event_type}");
    channel::check(&channel).map_err(|cause| DecodeError::BadChannel {
        value: channel.clone(),
        cause,
    })?;
    let timestamp = event::text("timestamp", get("timestamp"))?;
    let time =
        parse_isoformat(timestamp).ok_or_else(|| DecodeError::BadTime(timestamp.to_owned()))?;
    let time = event::check_time(timestamp, time)?;
    let data = event::check_data("payload", event::text("payload", get("payload"))?, limits)?;
    let source = match get("source") {
        None | Some(b"") => DEFAULT_LEGACY_SOURCE,
        Some(s) => event::check_source(event::utf8("source", s)?)?,
    };
    Ok(Event {
        id: legacy_id(stream, entry_id),
        event_type: event_type.into(),
        channel: channel.into(),
        source: source.into(),
        time,
        data: data.into(),
        key: None,
        correlation_id: event::correlation(get("correlation_id"))?,
    })
}

/// Reads `datetime.isoformat()` output: with an offset it is RFC 3339; without, it is UTC.
fn parse_isoformat(s: &str) -> Option<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some(t);
    }
    let naive = format_description!(
        version = 2,
        "[year]-[month]-[day][first [T][ ]][hour]:[minute][optional [:[second][optional [.[subsecond]]]]]"
    );
    if let Ok(t) = PrimitiveDateTime::parse(s, naive) {
        return Some(t.assume_utc());
    }
    // isoformat() of an aware datetime: `+00:00` offset but possibly no fraction, or a space.
    let aware = format_description!(
        version = 2,
        "[year]-[month]-[day][first [T][ ]][hour]:[minute]:[second][optional [.[subsecond]]][offset_hour sign:mandatory]:[offset_minute]"
    );
    OffsetDateTime::parse(s, aware).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode;
    use crate::event::tests::fields;

    fn id(seq: u64) -> EntryId {
        EntryId {
            ms: 1_700_000_000_000,
            seq,
        }
    }

    fn legacy(pairs: &[(&str, &str)]) -> Result<Event<'static>, DecodeError> {
        decode(
            "flow:events:7F3C",
            id(3),
            &fields(pairs),
            &Limits::default(),
        )
        .map(Event::into_owned)
    }

    #[test]
    fn upcasts_a_python_bus_entry() {
        let e = legacy(&[
            ("event_type", "AGENT_PROGRESS"),
            ("payload", r#"{"step":3}"#),
            ("timestamp", "2024-05-01T12:30:45.123456"),
            ("source", "orchestrator"),
            ("correlation_id", ""),
        ])
        .unwrap();
        assert_eq!(e.event_type, "agent_progress");
        assert_eq!(e.channel, "flow.7f3c.agent_progress");
        assert_eq!(e.source, "orchestrator");
        assert_eq!(e.correlation_id, None);
        assert_eq!(e.time.offset(), time::UtcOffset::UTC);
        assert_eq!(e.time.microsecond(), 123456);
        assert_eq!(e.id, legacy_id("flow:events:7F3C", id(3)));
        assert_eq!(e.id.get_version_num(), 5);
        // Deterministic: the same entry always gets the same id; another entry does not.
        assert_eq!(
            e.id,
            legacy(&[
                ("event_type", "X"),
                ("payload", "{}"),
                ("timestamp", "2024-05-01T12:30:45")
            ])
            .unwrap()
            .id
        );
        assert_ne!(e.id, legacy_id("flow:events:7F3C", id(4)));
    }

    #[test]
    fn isoformat_variants() {
        for ts in [
            "2024-05-01T12:30:45",
            "2024-05-01 12:30:45.5",
            "2024-05-01T12:30:45+00:00",
            "2024-05-01T12:30:45.000001+02:00",
            "2024-05-01T12:30",
        ] {
            assert!(parse_isoformat(ts).is_some(), "{ts}");
        }
        assert_eq!(
            parse_isoformat("2024-05-01T14:30:45+02:00"),
            parse_isoformat("2024-05-01T12:30:45")
        );
        assert!(parse_isoformat("05/01/2024").is_none());
    }

    #[test]
    fn legacy_rules() {
        let base = [
            ("event_type", "DONE"),
            ("payload", "{}"),
            ("timestamp", "2024-05-01T12:30:45"),
        ];
        assert_eq!(legacy(&base).unwrap().source, DEFAULT_LEGACY_SOURCE);
        let base_fields = fields(&base);
        let bad_stream = decode("other", id(0), &base_fields, &Limits::default());
        assert!(matches!(bad_stream, Err(DecodeError::Legacy(_))));
        let bad_payload = legacy(&[
            ("event_type", "DONE"),
            ("payload", "[]"),
            ("timestamp", "2024-05-01T12:30:45"),
        ]);
        assert_eq!(
            bad_payload.unwrap_err(),
            DecodeError::DataNotObject("payload")
        );
        let no_time = legacy(&[("event_type", "DONE"), ("payload", "{}")]);
        assert_eq!(no_time.unwrap_err(), DecodeError::Missing("timestamp"));
        let bad_type = legacy(&[
            ("event_type", "A.B"),
            ("payload", "{}"),
            ("timestamp", "2024-05-01T12:30:45"),
        ]);
        assert!(matches!(bad_type, Err(DecodeError::Legacy(_))));
    }
}
