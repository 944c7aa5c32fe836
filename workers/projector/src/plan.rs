//! A batch rendered into one call of `effects.lua` per stream: the keys the effects write, each
//! passed once as `KEYS` (on Redis Cluster they must share the stream's hash slot), and the
//! arguments the script reads (its header comment is the format).

use std::collections::HashMap;
use std::sync::Arc;

use streamfleet::event::template::{Scope, Template};
use streamfleet::runtime::config::{Action, VersionBy};
use streamfleet::runtime::scripts::Lua;
use streamfleet::{EntryId, Routed};

/// The script, loaded once and called by SHA.
pub static EFFECTS: std::sync::LazyLock<Lua> =
    std::sync::LazyLock::new(|| Lua::new(include_str!("effects.lua")));

/// One script call: the entries of one stream in a batch.
pub struct Call {
    pub stream: Arc<str>,
    /// `KEYS[3..]`.
    keys: Vec<String>,
    index: HashMap<String, usize>,
    /// The per-entry arguments (after the six of the header).
    args: Vec<Vec<u8>>,
    /// The entries sent, in order: the script numbers its rejections by them.
    pub sent: Vec<EntryId>,
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
        let mut ops: Vec<(u8, String, [u64; 2], String)> =
            Vec::with_capacity(r.route.actions.len());
        let mut dedup = false;
        for action in &r.route.actions {
            match action {
                Action::Latest { key, version } => {
                    let key = render(key, &mut scope)?;
                    ops.push((b'L', key, [0, 0], version_of(*version, r)));
                }
                Action::Invalidate { keys } => {
                    for key in keys {
                        ops.push((b'I', render(key, &mut scope)?, [0, 0], String::new()));
                    }
                }
                Action::Count { key, ttl_s } => {
                    dedup = true;
                    ops.push((b'C', render(key, &mut scope)?, [*ttl_s, 0], String::new()));
                }
                Action::History { key, maxlen, ttl_s } => {
                    dedup = true;
                    ops.push((
                        b'H',
                        render(key, &mut scope)?,
                        [*maxlen, *ttl_s],
                        String::new(),
                    ));
                }
            }
        }
        // Only counters and history are hurt by a producer's retry (latest and invalidate are
        // idempotent): only their events pay for the dedup window.
        let dedup_index = if dedup && settings.dedup_window_s > 0 {
            let bucket = e
                .time
                .unix_timestamp()
                .div_euclid(settings.dedup_window_s as i64);
            self.key(&format!("{}:dedup:{}:{bucket}", r.stream, settings.group))
        } else {
            b"0".to_vec()
        };
        self.args.push(r.entry_id.to_string().into_bytes());
        self.args.push(dedup_index);
        self.args.push(e.id.as_bytes().to_vec());
        let mut json = String::new();
        if !ops.is_empty() {
            e.write_json(&mut json);
        }
        self.args.push(json.into_bytes());
        let count_at = self.args.len();
        self.args.push(Vec::new());
        let before = self.args.len();
        for (op, key, [a, b], version) in ops {
            let k = self.key(&key);
            self.args.push(vec![op]);
            self.args.push(k);
            match op {
                b'L' => self.args.push(version.into_bytes()),
                b'C' => self.args.push(a.to_string().into_bytes()),
                b'H' => {
                    self.args.push(a.to_string().into_bytes());
                    self.args.push(b.to_string().into_bytes());
                }
                _ => {}
            }
        }
        self.args[count_at] = (self.args.len() - before).to_string().into_bytes();
        self.sent.push(r.entry_id);
        Ok(())
    }

    /// The `EVALSHA` of this call.
    pub fn command(&self, settings: &Settings<'_>) -> redis::Cmd {
        let mut cmd = EFFECTS.call();
        let (low, high) = match (self.sent.iter().min(), self.sent.iter().max()) {
            (Some(low), Some(high)) => (low.to_string(), high.to_string()),
            _ => ("-".to_owned(), "+".to_owned()),
        };
        cmd.arg(self.keys.len() + 2)
            .arg(&*self.stream)
            .arg(streamfleet::store::redis_checkpoints::key(&self.stream))
            .arg(&self.keys)
            .arg(settings.group)
            .arg(settings.consumer)
            .arg(self.checkpoint.map(|c| c.to_string()).unwrap_or_default())
            .arg(settings.dedup_window_s.max(1))
            .arg(low)
            .arg(high);
        for a in &self.args {
            cmd.arg(&a[..]);
        }
        cmd
    }
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
