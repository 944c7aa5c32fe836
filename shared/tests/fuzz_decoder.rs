//! Property tests (run in CI; `PROPTEST_CASES` raises the count for a long fuzzing run): the
//! entry decoder and the pattern matcher never panic, whatever the input, and keep their
//! invariants.

use proptest::prelude::*;
use streamfleet::event::channel;
use streamfleet::event::pattern::ChannelPattern;
use streamfleet::event::{decode, Limits};

const NAMES: &[&str] = &[
    "v",
    "id",
    "type",
    "channel",
    "source",
    "time",
    "data",
    "key",
    "correlation_id",
    "event_type",
    "payload",
    "timestamp",
    "x",
];

fn field_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => proptest::sample::select(NAMES).prop_map(|s| s.as_bytes().to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..12),
    ]
}

fn field_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        "[a-z0-9_.#*-]{0,40}".prop_map(String::into_bytes),
        Just(b"1".to_vec()),
        Just(b"0190f2a4-7b1c-7cc0-8a57-3f7e2a6b9d10".to_vec()),
        Just(b"2026-11-24T10:00:00Z".to_vec()),
        Just(b"2024-05-01T12:30:45.123456".to_vec()),
        "\\{(\"[a-z]{0,3}\":[0-9\\[\\]{}\",]{0,8},?){0,3}\\}?".prop_map(String::into_bytes),
    ]
}

fn entry() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    proptest::collection::vec((field_name(), field_value()), 0..12)
}

proptest! {
    #[test]
    fn decoder_never_panics_and_accepts_only_valid_events(
        fields in entry(),
        stream in prop_oneof![Just("events".to_string()), "flow:events:[a-zA-Z0-9_-]{0,70}"],
        max_data in 1usize..256,
    ) {
        let limits = Limits { max_data_bytes: max_data };
        let fields: streamfleet::Fields = fields.iter().map(|(k, v)| (k, v)).collect();
        if let Ok(event) = decode(&stream, streamfleet::EntryId { ms: 1, seq: 0 }, &fields, &limits) {
            // Whatever was accepted satisfies the contract.
            prop_assert!(channel::check(&event.channel).is_ok());
            prop_assert!(event.data.len() <= max_data);
            prop_assert!(event.data.trim_start().starts_with('{'), "data is an object");
            prop_assert!(!event.id.is_nil());
            prop_assert!(event.correlation_id.as_ref().is_none_or(|c| !c.is_empty() && c.len() <= 128));
        }
    }

    #[test]
    fn pattern_parsing_and_matching_never_panic(pattern in "[a-z#*.]{0,40}", channel in "[a-z.]{0,40}") {
        if let Ok(p) = pattern.parse::<ChannelPattern>() {
            let _ = p.matches(&channel);
        }
    }

    #[test]
    fn a_channel_matches_itself_and_hash(segments in proptest::collection::vec("[a-z0-9_-]{1,8}", 1..16)) {
        let channel = segments.join(".");
        prop_assert!(channel::check(&channel).is_ok());
        let itself: ChannelPattern = channel.parse().unwrap();
        prop_assert!(itself.matches(&channel));
        let hash: ChannelPattern = "#".parse().unwrap();
        prop_assert!(hash.matches(&channel));
        let prefix: ChannelPattern = format!("{}.#", segments[0]).parse().unwrap();
        prop_assert!(prefix.matches(&channel));
        let stars: ChannelPattern = vec!["*"; segments.len()].join(".").parse().unwrap();
        prop_assert!(stars.matches(&channel));
        let too_many: ChannelPattern = vec!["*"; segments.len() + 1].join(".").parse().unwrap();
        prop_assert!(!too_many.matches(&channel));
    }
}

fn valid_entry() -> Vec<(Vec<u8>, Vec<u8>)> {
    [
        ("v", "1"),
        ("id", "0190f2a4-7b1c-7cc0-8a57-3f7e2a6b9d10"),
        ("type", "user.signup"),
        ("channel", "user.42.profile"),
        ("source", "accounts-api"),
        ("time", "2026-11-24T10:00:00Z"),
        ("data", "{\"a\":1}"),
    ]
    .iter()
    .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
    .collect()
}

proptest! {
    #[test]
    fn one_mutated_field_of_a_valid_event_never_panics(
        index in 0usize..7,
        value in field_value(),
        action in 0u8..3,
    ) {
        let mut fields = valid_entry();
        match action {
            0 => fields[index].1 = value,
            1 => { fields.remove(index); }
            _ => fields.push((fields[index].0.clone(), value)),
        }
        let fields: streamfleet::Fields = fields.iter().map(|(k, v)| (k, v)).collect();
        let result = decode("events", streamfleet::EntryId { ms: 1, seq: 0 }, &fields, &Limits::default());
        if action == 1 {
            prop_assert!(result.is_err(), "a required field is missing");
        }
        if action == 2 {
            prop_assert!(result.is_err(), "a field given twice is invalid");
        }
    }
}
