//! Every example under `schemas/events/examples` is judged the same by the JSON Schema
//! (`schemas/events/v1.json`) and by the Rust decoder, and invalid ones get the stated reason.

use std::path::{Path, PathBuf};

use serde_json::Value;
use streamfleet::event::{decode, Limits};

fn schemas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/events")
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The stream entry a producer would XADD for this JSON object: strings verbatim, anything else
/// as JSON text (so `v: 1` becomes "1" and `data` its JSON text); null means absent.
fn fields(event: &Value) -> streamfleet::Fields {
    event
        .as_object()
        .expect("an example is a JSON object")
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.as_bytes().to_vec(), text.into_bytes())
        })
        .collect()
}

fn examples(kind: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(schemas().join("examples").join(kind))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

fn validator() -> jsonschema::Validator {
    jsonschema::options()
        .should_validate_formats(true)
        .build(&read(&schemas().join("v1.json")))
        .expect("the schema compiles")
}

#[test]
fn valid_examples_pass_the_schema_and_the_decoder() {
    let schema = validator();
    let files = examples("valid");
    assert!(files.len() >= 3);
    for path in files {
        let event = read(&path);
        let errors: Vec<String> = schema.iter_errors(&event).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{}: schema says {errors:?}",
            path.display()
        );
        let entry = fields(&event);
        let decoded = decode(
            "events",
            streamfleet::EntryId { ms: 1, seq: 0 },
            &entry,
            &Limits::default(),
        )
        .unwrap_or_else(|e| panic!("{}: decoder says {e}", path.display()));
        // The decoder's JSON view agrees with the example on every contract field.
        let json = decoded.to_json();
        for k in ["id", "type", "channel", "source", "data"] {
            assert_eq!(json[k], event[k], "{}: {k}", path.display());
        }
    }
}

#[test]
fn invalid_examples_fail_the_schema_and_the_decoder_with_the_stated_reason() {
    let schema = validator();
    let files = examples("invalid");
    assert!(files.len() >= 10);
    for path in files {
        let example = read(&path);
        let event = &example["event"];
        assert!(
            !schema.is_valid(event),
            "{}: the schema accepts it",
            path.display()
        );
        let err = decode(
            "events",
            streamfleet::EntryId { ms: 1, seq: 0 },
            &fields(event),
            &Limits::default(),
        )
        .err()
        .unwrap_or_else(|| panic!("{}: the decoder accepts it", path.display()));
        assert_eq!(
            err.reason().as_str(),
            example["dlq_reason"].as_str().unwrap(),
            "{}: {err}",
            path.display()
        );
    }
}
