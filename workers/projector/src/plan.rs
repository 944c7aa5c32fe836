//! A batch rendered into one call of `effects.lua` per stream: the keys the effects write, each
//! passed once as `KEYS` (on Redis Cluster they must share the stream's hash slot), and the
//! arguments the script reads (its header comment is the format).

use std::collections::HashMap;
use std::sync::Arc;

use streamfleet::event::template::{Scope, Template};
use streamfleet::runtime::config::{Action, VersionBy};
use streamfleet::runtime::scripts::Lua;
use streamfleet::{EntryId, Routed};
use time::format_description::well_known::Rfc3339;

/// The script, loaded once and called by SHA.
pub static EFFECTS: std::sync::LazyLock<Lua> =
    std::sync::LazyLock::new(|| Lua::new(include_str!("effects.lua")));

/// Hash fields of `latest` written by the projector itself, beside the event's `data` fields.
pub const META_PREFIX: &str = "fleet:";

/// One script call: the entries of one stream in a batch.
pub struct Call {
    pub stream: Arc<str>,
    /// `KEYS[3..]`.
    keys: Vec<String>,
    index: HashMap<String, usize>,
    /// The per-entry arguments (after the four of the header).
    args: Vec<Vec<u8>>,
    /// The entries sent, in order: the script numbers its rejections by them.
    pub sent: Vec<EntryId>,
    /// Entries whose route declares no action: acknowledged with no effect.
    pub no_ops: usize,
    /// Where the group's checkpoint of this stream moves to.
    pub checkpoint: Option<EntryId>,
}

/// What every call shares.
pub struct Settings<'a> {
    pub group: &'a str,
    pub consumer: &'a str,
    pub dedup_window_s: u64,
}

impl Call {
    pub fn new(stream: Arc<str>) -> Self {
        Call {
            stream,
            keys: Vec::new(),
            index: HashMap::new(),
            args: Vec::new(),
            sent: Vec::new(),
            no_ops: 0,
            checkpoint: None,
        }
    }

    /// The `KEYS` index of `key` (the stream is 1, its checkpoints 2).
    fn key(&mut self, key: &str) -> Vec<u8> {
        let next = self.keys.len() + 3;
        let i = *self.index.entry(key.to_owned()).or_insert_with(|| {
            self.keys.push(key.to_owned());
            next
        });
        i.to_string().into_bytes()
    }

    /// Adds one event with its route's actions; an event a template cannot be rendered for is
    /// refused whole (nothing of it is sent), with the reason.
    pub fn add(&mut self, r: &Routed<'_>, settings: &Settings<'_>) -> Result<(), String> {
        let e = r.event;
        let mut scope = Scope::new(e, r.stream);
        let mut rendered = String::new();
        let mut render = |t: &Template, scope: &mut Scope<'_>| -> Result<String, String> {
            t.render(scope, &mut rendered).map_err(|e| e.to_string())?;
            Ok(rendered.clone())
        };
        // Rendered first, so that a failure leaves nothing behind.
        let mut ops: Vec<Op> = Vec::with_capacity(r.route.actions.len());
        let mut dedup = false;
        for action in &r.route.actions {
            match action {
                Action::Latest { key, version } => {
                    let key = render(key, &mut scope)?;
                    let fields = latest_fields(&mut scope, r)?;
                    ops.push(Op::Latest {
                        key,
                        version: version_of(*version, r),
                        fields,
                    });
                }
                Action::Invalidate { keys } => {
                    for key in keys {
                        ops.push(Op::Invalidate(render(key, &mut scope)?));
                    }
                }
                Action::Count { key, ttl_s } => {
                    dedup = true;
                    ops.push(Op::Count(render(key, &mut scope)?, *ttl_s));
                }
                Action::History { key, maxlen, ttl_s } => {
                    dedup = true;
                    ops.push(Op::History(render(key, &mut scope)?, *maxlen, *ttl_s));
                }
            }
        }
        // Only counters and history are hurt by a producer's retry (latest and invalidate are
        // idempotent): only their events pay for the dedup window.
        let dedup_key = (dedup && settings.dedup_window_s > 0).then(|| {
            let bucket = e
                .time
                .unix_timestamp()
                .div_euclid(settings.dedup_window_s as i64);
            format!("{}:dedup:{}:{bucket}", r.stream, settings.group)
        });
        let dedup_index = match &dedup_key {
            Some(k) => self.key(k),
            None => b"0".to_vec(),
        };
        self.args.push(r.entry_id.to_string().into_bytes());
        self.args.push(dedup_index);
        self.args.push(e.id.as_bytes().to_vec());
        let count_at = self.args.len();
        self.args.push(Vec::new());
        let before = self.args.len();
        if ops.is_empty() {
            self.no_ops += 1;
        }
        for op in ops {
            match op {
                Op::Latest {
                    key,
                    version,
                    fields,
                } => {
                    let k = self.key(&key);
                    self.args.push(b"L".to_vec());
                    self.args.push(k);
                    self.args.push(version.into_bytes());
                    self.args.push((fields.len() / 2).to_string().into_bytes());
                    self.args.extend(fields.into_iter().map(String::into_bytes));
                }
                Op::Invalidate(key) => {
                    let k = self.key(&key);
                    self.args.push(b"I".to_vec());
                    self.args.push(k);
                }
                Op::Count(key, ttl) => {
                    let k = self.key(&key);
                    self.args.push(b"C".to_vec());
                    self.args.push(k);
                    self.args.push(ttl.to_string().into_bytes());
                }
                Op::History(key, maxlen, ttl) => {
                    let k = self.key(&key);
                    let fields = history_fields(r);
                    self.args.push(b"H".to_vec());
                    self.args.push(k);
                    self.args.push(maxlen.to_string().into_bytes());
                    self.args.push(ttl.to_string().into_bytes());
                    self.args.push((fields.len() / 2).to_string().into_bytes());
                    self.args.extend(fields.into_iter().map(String::into_bytes));
                }
            }
        }
        self.args[count_at] = (self.args.len() - before).to_string().into_bytes();
        self.sent.push(r.entry_id);
        Ok(())
    }

    /// The `EVALSHA` of this call.
    pub fn command(&self, settings: &Settings<'_>) -> redis::Cmd {
        let mut cmd = EFFECTS.call();
        cmd.arg(self.keys.len() + 2)
            .arg(&*self.stream)
            .arg(streamfleet::store::redis_checkpoints::key(&self.stream))
            .arg(&self.keys)
            .arg(settings.group)
            .arg(settings.consumer)
            .arg(self.checkpoint.map(|c| c.to_string()).unwrap_or_default())
            .arg(settings.dedup_window_s.max(1));
        for a in &self.args {
            cmd.arg(&a[..]);
        }
        cmd
    }
}

/// An action rendered for one event.
enum Op {
    Latest {
        key: String,
        version: String,
        fields: Vec<String>,
    },
    Invalidate(String),
    Count(String, u64),
    History(String, u64, u64),
}

/// The version `latest` compares, as a string whose order is the version order (fixed-width
/// digits): the entry id, or the event time then the entry id.
fn version_of(by: VersionBy, r: &Routed<'_>) -> String {
    let id = r.entry_id;
    match by {
        VersionBy::EntryId => format!("e{:020}{:020}", id.ms, id.seq),
        VersionBy::Time => {
            // Nanoseconds since 1970, shifted to be positive for any time after 1653.
            let ns =
                (r.event.time.unix_timestamp_nanos() + 10i128.pow(19)).clamp(0, 10i128.pow(20) - 1);
            format!("t{ns:020}{:020}{:020}", id.ms, id.seq)
        }
    }
}

/// The hash `latest` writes: the top-level fields of `data` (strings as they are, other values
/// as JSON), and the event's own under `fleet:` (its version is added by the script).
fn latest_fields(scope: &mut Scope<'_>, r: &Routed<'_>) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    if let Some(data) = scope.data().and_then(|d| d.as_object()) {
        for (name, value) in data {
            if name.starts_with(META_PREFIX) {
                return Err(format!(
                    "data field {name:?} collides with the fields the projector writes ({META_PREFIX}*)"
                ));
            }
            fields.push(name.clone());
            fields.push(match value {
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            });
        }
    }
    let e = r.event;
    for (name, value) in [
        ("fleet:event_id", e.id.to_string()),
        ("fleet:type", e.event_type.to_string()),
        ("fleet:time", e.time.format(&Rfc3339).unwrap_or_default()),
        ("fleet:stream", r.stream.to_string()),
        ("fleet:entry_id", r.entry_id.to_string()),
    ] {
        fields.push(name.to_owned());
        fields.push(value);
    }
    Ok(fields)
}

/// A history entry: the event's v1 fields (so a history stream reads like any v1 stream) and
/// where it came from (`stream`, `entry_id`), for a reader that resumes.
fn history_fields(r: &Routed<'_>) -> Vec<String> {
    let e = r.event;
    let mut fields = vec![
        "v".into(),
        "1".into(),
        "id".into(),
        e.id.to_string(),
        "type".into(),
        e.event_type.to_string(),
        "channel".into(),
        e.channel.to_string(),
        "source".into(),
        e.source.to_string(),
        "time".into(),
        e.time.format(&Rfc3339).unwrap_or_default(),
        "data".into(),
        e.data.to_string(),
    ];
    if let Some(key) = &e.key {
        fields.extend(["key".into(), key.to_string()]);
    }
    if let Some(c) = &e.correlation_id {
        fields.extend(["correlation_id".into(), c.to_string()]);
    }
    fields.extend([
        "stream".into(),
        r.stream.to_string(),
        "entry_id".into(),
        r.entry_id.to_string(),
    ]);
    fields
}
