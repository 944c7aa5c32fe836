//! Deterministic event sets with known outcomes: what must land in PostgreSQL and what must land
//! in the dead letter stream, with which reason.

use serde_json::json;
use uuid::Uuid;

/// `data` size limit the tests configure, so `too_large` is cheap to provoke.
pub const TEST_MAX_DATA_BYTES: usize = 4096;

/// What must become of one published line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// A valid event; a row exactly when `user` (strict route).
    Valid { id: Uuid, user: bool },
    /// A dead letter with this `dlq_reason`.
    Dead(&'static str),
}

/// Lines to publish (JSON objects, one per entry) and their expected outcomes, index for index.
#[derive(Debug, Default)]
pub struct Corpus {
    pub lines: Vec<String>,
    pub expected: Vec<Expect>,
}

/// A valid v1 event as a JSON line.
pub fn valid_line(id: Uuid, user: bool, n: usize) -> String {
    let (ty, channel) = if user {
        ("user.updated", format!("user.{}.profile", n % 97))
    } else {
        ("flow.progress", format!("flow.{}.progress", n % 89))
    };
    json!({
        "v": 1, "id": id.to_string(), "type": ty, "channel": channel, "source": "tests",
        "time": "2026-11-24T10:00:00.000001Z", "data": {"n": n, "text": "hé \"quoted\""},
        "correlation_id": format!("req-{n}"),
    })
    .to_string()
}

/// Every kind of malformed entry, with its reason.
pub fn malformed(kind: usize, n: usize) -> (String, &'static str) {
    let id = Uuid::new_v4().to_string();
    let mut e = json!({
        "v": 1, "id": id, "type": "user.updated", "channel": format!("user.{n}"), "source": "tests",
        "time": "2026-11-24T10:00:00Z", "data": {"n": n},
    });
    let o = e.as_object_mut().unwrap();
    let reason = match kind % 15 {
        0 => {
            o.remove("v");
            "invalid"
        }
        1 => {
            o.insert("id".into(), json!("not-a-uuid"));
            "invalid"
        }
        2 => {
            o.insert("type".into(), json!("User.Updated"));
            "invalid"
        }
        3 => {
            o.insert("channel".into(), json!("user..x"));
            "invalid"
        }
        4 => {
            o.insert("source".into(), json!(""));
            "invalid"
        }
        5 => {
            o.insert("time".into(), json!("yesterday"));
            "invalid"
        }
        6 => {
            o.insert("data".into(), json!("{oops"));
            "invalid"
        }
        7 => {
            o.insert("data".into(), json!([1, 2]));
            "invalid"
        }
        8 => {
            o.insert("key".into(), json!(""));
            "invalid"
        }
        9 => {
            o.insert("correlation_id".into(), json!("c".repeat(200)));
            "invalid"
        }
        10 => {
            o.remove("data");
            "invalid"
        }
        11 => {
            o.insert("v".into(), json!(2));
            "unsupported_version"
        }
        12 => {
            o.insert("v".into(), json!("1.0"));
            "unsupported_version"
        }
        13 => {
            o.insert(
                "data".into(),
                json!({"blob": "x".repeat(TEST_MAX_DATA_BYTES + 100)}),
            );
            "too_large"
        }
        _ => {
            o.insert("id".into(), json!("00000000-0000-0000-0000-000000000000"));
            "invalid"
        }
    };
    (e.to_string(), reason)
}

/// `n` entries: about half strict user events, `dup_percent` % republished duplicates of earlier
/// valid events, `bad_percent` % malformed entries spread over every kind.
pub fn mixed(n: usize, dup_percent: usize, bad_percent: usize) -> Corpus {
    let mut c = Corpus::default();
    let mut valid: Vec<usize> = Vec::new();
    let mut fresh = 0usize;
    let bad_every = 100usize.checked_div(bad_percent).unwrap_or(usize::MAX);
    let dup_every = 100usize.checked_div(dup_percent).unwrap_or(usize::MAX);
    for i in 0..n {
        if i % bad_every == bad_every / 2 {
            let (line, reason) = malformed(i / bad_every, i);
            c.lines.push(line);
            c.expected.push(Expect::Dead(reason));
        } else if i % dup_every == dup_every / 3 && !valid.is_empty() {
            let original = valid[(i * 7919) % valid.len()];
            c.lines.push(c.lines[original].clone());
            c.expected.push(c.expected[original].clone());
        } else {
            let user = fresh % 2 == 0;
            fresh += 1;
            let id = Uuid::now_v7();
            c.lines.push(valid_line(id, user, i));
            c.expected.push(Expect::Valid { id, user });
            valid.push(i);
        }
    }
    c
}

impl Corpus {
    /// Distinct ids that must be rows, each with the index of its first publication.
    pub fn expected_rows(&self) -> std::collections::HashMap<Uuid, usize> {
        let mut rows = std::collections::HashMap::new();
        for (i, e) in self.expected.iter().enumerate() {
            if let Expect::Valid { id, user: true } = e {
                rows.entry(*id).or_insert(i);
            }
        }
        rows
    }
}
