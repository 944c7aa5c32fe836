//! What a `latest` stores of an event: the values the script writes, rendered here once per event
//! so that the script only compares versions and writes. A projection keeps the named `data`
//! fields byte for byte as the producer wrote them (picked from the raw JSON: no number is
//! re-formatted, nothing else of `data` is built).

use std::fmt::Write;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use streamfleet::Routed;

use crate::actions::PROJECTED_VERSION_FIELD;

/// The raw JSON of each of `names` in the object `data`, in their order (`None`: absent). A
/// dotted name is a path into nested objects, as in templates (`progress.percent`).
pub fn pick<'d>(data: &'d str, names: &[String]) -> Result<Vec<Option<&'d RawValue>>, String> {
    if !names.iter().any(|n| n.contains('.')) {
        return pick_top(data, names);
    }
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let mut value: Option<&'d RawValue> = None;
        let mut within = data;
        for (i, segment) in name.split('.').enumerate() {
            if i > 0 {
                match value {
                    Some(raw) if raw.get().starts_with('{') => within = raw.get(),
                    _ => {
                        value = None;
                        break;
                    }
                }
            }
            value = pick_top(within, &[segment])?[0];
        }
        out.push(value);
    }
    Ok(out)
}

/// `pick` of top-level names only: one pass over `data`.
fn pick_top<'d, S: AsRef<str>>(
    data: &'d str,
    names: &[S],
) -> Result<Vec<Option<&'d RawValue>>, String> {
    let mut de = serde_json::Deserializer::from_str(data);
    Pick(names)
        .deserialize(&mut de)
        .map_err(|e| format!("data could not be projected: {e}"))
}

/// A projected field as a hash field of its own: a string as its text (what a reader of
/// `HGETALL` expects), anything else as its JSON.
pub fn hash_value(raw: &RawValue) -> String {
    let text = raw.get();
    if text.starts_with('"') {
        if let Ok(s) = serde_json::from_str::<String>(text) {
            return s;
        }
    }
    text.to_owned()
}

/// A member's value (`field`): a JSON object whose first property is the version, so that the
/// script reads it back from the value itself (no key beside the hash, nothing in `HGETALL` but the
/// members): `{"_version":…,<projected fields>}`, or for the whole event `{"version":…,"stream":…,
/// "entry_id":…,"event":…}`, the fields of a whole-event `latest` hash.
pub fn member_value(
    r: &Routed<'_>,
    version: &str,
    fields: Option<(&[String], &[Option<&RawValue>])>,
) -> String {
    let mut out = String::with_capacity(r.event.data.len() + 256);
    match fields {
        Some((names, values)) => {
            let _ = write!(out, "{{\"{PROJECTED_VERSION_FIELD}\":\"{version}\"");
            for (name, value) in names.iter().zip(values) {
                if let Some(raw) = value {
                    out.push(',');
                    push_json_string(&mut out, name);
                    out.push(':');
                    out.push_str(raw.get());
                }
            }
        }
        None => {
            let _ = write!(out, "{{\"version\":\"{version}\",\"stream\":");
            push_json_string(&mut out, r.stream);
            let _ = write!(out, ",\"entry_id\":\"{}\",\"event\":", r.entry_id);
            r.event.write_json(&mut out);
        }
    }
    out.push('}');
    out
}

fn push_json_string(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).expect("a string serializes"));
}

struct Pick<'n, S>(&'n [S]);

impl<'de, S: AsRef<str>> DeserializeSeed<'de> for Pick<'_, S> {
    type Value = Vec<Option<&'de RawValue>>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, S: AsRef<str>> Visitor<'de> for Pick<'_, S> {
    type Value = Vec<Option<&'de RawValue>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = vec![None; self.0.len()];
        while let Some(index) = map.next_key_seed(NameIndex(self.0))? {
            match index {
                Some(i) => out[i] = Some(map.next_value::<&RawValue>()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(out)
    }
}

/// A key of `data`, as the index of the name it is among those picked.
struct NameIndex<'n, S>(&'n [S]);

impl<'de, S: AsRef<str>> DeserializeSeed<'de> for NameIndex<'_, S> {
    type Value = Option<usize>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<S: AsRef<str>> Visitor<'_> for NameIndex<'_, S> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|n| n.as_ref() == v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_fields_byte_for_byte() {
        let names: Vec<String> = ["status", "progress", "missing", "é\"q"]
            .map(String::from)
            .to_vec();
        let data =
            r#"{"progress": 1e3, "status":"done\n", "other":{"a":[1,2]}, "\u00e9\"q": [ 1 ]}"#;
        let picked = pick(data, &names).unwrap();
        let raw: Vec<Option<&str>> = picked.iter().map(|v| v.map(RawValue::get)).collect();
        assert_eq!(raw, [Some(r#""done\n""#), Some("1e3"), None, Some("[ 1 ]")]);
        assert_eq!(hash_value(picked[0].unwrap()), "done\n");
        assert_eq!(hash_value(picked[1].unwrap()), "1e3");
        assert!(pick("[1]", &names).is_err());
        // Dotted names reach into nested objects; a path through a non-object is absent.
        let nested: Vec<String> = ["progress.percent", "a.b.c", "status.x", "gone.y"]
            .map(String::from)
            .to_vec();
        let data = r#"{"progress":{"percent":40.50,"eta":3},"a":{"b":{"c":"deep"}},"status":"s"}"#;
        let raw: Vec<Option<&str>> = pick(data, &nested)
            .unwrap()
            .iter()
            .map(|v| v.map(RawValue::get))
            .collect();
        assert_eq!(raw, [Some("40.50"), Some(r#""deep""#), None, None]);
    }
}
