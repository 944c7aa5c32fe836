//! A batch rendered into one call of `effects.lua` per stream: the keys the effects write, each
//! passed once as `KEYS` (on Redis Cluster they must share the stream's hash slot), and the
//! arguments the script reads (its header comment is the format).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::actions::{Action, Latest, VersionBy};
use crate::projection;
use streamfleet::event::template::{Scope, Template};
use streamfleet::runtime::scripts::Lua;
use streamfleet::{EntryId, Routed};

/// The script, loaded once and called by SHA: `#!lua` (no `allow-oom`: refused whole at
/// `maxmemory`), the counters' check (`counter.lua`, apart so that a test can hold it against
/// `INCRBY`), then `effects.lua`.
pub static EFFECTS: std::sync::LazyLock<Lua> = std::sync::LazyLock::new(|| {
    Lua::new(concat!(
        "#!lua\n",
        include_str!("counter.lua"),
        include_str!("effects.lua")
    ))
});

/// One script call: the entries of one stream in a batch.
pub struct Call {
    pub stream: Arc<str>,
    /// `KEYS[3..]`.
    keys: Vec<String>,
    index: HashMap<String, usize>,
    /// The shapes of the call's entries (their actions' letters and constants), one per route,
    /// each sent once, so that an entry carries only its keys and versions: every argument costs
    /// redis-server time to parse and to turn into a Lua string (9 arguments per entry of the
    /// bench instead of 15: 1.0–1.5 µs of its CPU per event less in a micro-benchmark, ~3 % on
    /// the drain, inside its noise; docs/src/performance.md).
    shapes: Vec<Vec<u8>>,
    /// The shape number of each route (by its index).
    shape_of: HashMap<usize, usize>,
    /// History streams whose TTL this call refreshes: (KEYS index, TTL).
    expire: HashMap<usize, u64>,
    /// The arguments of the entries with effects.
    args: Vec<Vec<u8>>,
    /// The entries with effects, in order: the script numbers its rejections by them.
    pub sent: Vec<EntryId>,
    /// The entries whose route declares no action: acknowledged with no effect.
    pub plain: Vec<EntryId>,
    /// Where the group's checkpoint of this stream moves to.
    pub checkpoint: Option<EntryId>,
}

/// When this worker last refreshed each history stream's TTL. An `EXPIRE` per key per batch
/// cost redis-server about as much as the append itself (measured on 500 streams, dedup window
/// off: 35.1 k events/s with it, 44.5 k without), so a stream's TTL is refreshed at most every `ttl_s / 24`, to
/// `ttl_s + ttl_s / 24`: it expires between `ttl_s` and `ttl_s * 25 / 24` after its last event.
#[derive(Default)]
pub struct Refreshes {
    at: HashMap<String, Instant>,
}

/// Most streams remembered; beyond, all are refreshed once more and forgotten.
const REFRESHES_KEPT: usize = 100_000;

/// The TTL refreshes one batch makes, decided while it is planned.
pub struct TtlPlan<'a> {
    at: &'a HashMap<String, Instant>,
    planned: HashMap<String, u64>,
}

impl Refreshes {
    /// Plans a batch's refreshes against those made so far.
    pub fn plan(&self) -> TtlPlan<'_> {
        TtlPlan {
            at: &self.at,
            planned: HashMap::new(),
        }
    }

    /// A batch was applied: the refreshes it planned are made.
    pub fn applied(&mut self, planned: HashMap<String, u64>) {
        if self.at.len() > REFRESHES_KEPT {
            self.at.clear();
        }
        let now = Instant::now();
        for (key, ttl) in planned {
            if ttl > 0 {
                self.at.insert(key, now);
            }
        }
    }
}

impl TtlPlan<'_> {
    /// The TTL to set on `key` with this batch (the same for all its appends), 0 for none.
    fn ttl(&mut self, key: &str, ttl_s: u64) -> u64 {
        if ttl_s == 0 {
            return 0;
        }
        if let Some(ttl) = self.planned.get(key) {
            return *ttl;
        }
        let every = Duration::from_secs((ttl_s / 24).max(1));
        let ttl = match self.at.get(key) {
            Some(at) if at.elapsed() < every => 0,
            _ => ttl_s + every.as_secs(),
        };
        self.planned.insert(key.to_owned(), ttl);
        ttl
    }

    /// What was planned, to record once the batch is applied.
    pub fn into_planned(self) -> HashMap<String, u64> {
        self.planned
    }
}

/// What every call shares.
pub struct Settings<'a> {
    pub group: &'a str,
    pub consumer: &'a str,
    pub dedup_window_s: u64,
    /// On a cluster every key must share its stream's slot (`slots`).
    pub cluster: bool,
    /// Each route's actions, by route index.
    pub actions: &'a [Vec<Action>],
}

/// One effect of one event, rendered: its letter in the script, its key, the shape's constant,
/// and the arguments after the key's index.
struct Op<'a> {
    letter: u8,
    key: String,
    constant: Constant<'a>,
    args: Vec<Arg>,
    /// A history stream's TTL to set with this call (0: none).
    history_ttl: u64,
}

impl<'a> Op<'a> {
    fn new(letter: u8, key: String, constant: Constant<'a>, args: Vec<Arg>) -> Self {
        Op {
            letter,
            key,
            constant,
            args,
            history_ttl: 0,
        }
    }
}

/// An argument of an op: text, or a key (sent as its `KEYS` index).
enum Arg {
    Text(String),
    Key(String),
}

/// What an op's shape says once per call: a counter's TTL, a history's cap, or how a `latest`
/// stores (`latest_descriptor`).
enum Constant<'a> {
    None,
    Number(u64),
    Latest(&'a Latest),
}

impl Constant<'_> {
    fn render(&self) -> String {
        match self {
            Constant::None => "0".into(),
            Constant::Number(n) => n.to_string(),
            Constant::Latest(l) => latest_descriptor(l),
        }
    }
}

/// How a `latest` op's arguments are laid out, for the script (effects.lua's header): its flags
/// (`f` a member and its value, `t` a TTL, `g` a group), then for a projection into the hash
/// itself, one line per field; empty for the whole event (the layout of earlier releases).
fn latest_descriptor(l: &Latest) -> String {
    let mut d = String::new();
    if l.field.is_some() {
        d.push('f');
    }
    if l.ttl.is_some() {
        d.push('t');
    }
    if l.group.is_some() {
        d.push('g');
    }
    if let (None, Some(names)) = (&l.field, &l.fields) {
        d.push('p');
        for name in names {
            d.push('\n');
            d.push_str(name);
        }
    }
    d
}

impl Call {
    pub fn new(stream: Arc<str>) -> Self {
        Call {
            stream,
            keys: Vec::new(),
            index: HashMap::new(),
            shapes: Vec::new(),
            shape_of: HashMap::new(),
            expire: HashMap::new(),
            args: Vec::new(),
            sent: Vec::new(),
            plain: Vec::new(),
            checkpoint: None,
        }
    }

    /// The `KEYS` index of `key` (the stream is 1, its checkpoints 2).
    fn key(&mut self, key: &str) -> usize {
        let next = self.keys.len() + 3;
        *self.index.entry(key.to_owned()).or_insert_with(|| {
            self.keys.push(key.to_owned());
            next
        })
    }

    /// The number of the shape of `route`'s `ops` in this call (from 1), added on first use: the
    /// ops' letters, then each op's constant.
    fn shape(&mut self, route: usize, ops: &[Op<'_>]) -> usize {
        let next = self.shape_of.len() + 1;
        *self.shape_of.entry(route).or_insert_with(|| {
            self.shapes.push(ops.iter().map(|op| op.letter).collect());
            self.shapes
                .extend(ops.iter().map(|op| op.constant.render().into_bytes()));
            next
        })
    }

    /// Adds one event with its route's actions; an event a template cannot be rendered for is
    /// refused whole (nothing of it is sent), with the reason.
    pub fn add(
        &mut self,
        r: &Routed<'_>,
        settings: &Settings<'_>,
        refreshes: &mut TtlPlan<'_>,
    ) -> Result<(), String> {
        let e = r.event;
        let mut scope = Scope::new(e, r.stream);
        let mut rendered = String::new();
        // A key (checked against the stream's slot on a cluster), or a value of the event.
        let mut render =
            |t: &Template, scope: &mut Scope<'_>, key: bool| -> Result<String, String> {
                t.render(scope, &mut rendered).map_err(|e| e.to_string())?;
                if key && settings.cluster {
                    if let Some(why) = crate::slots::misplaced(&rendered, r.stream) {
                        return Err(why);
                    }
                }
                Ok(rendered.clone())
            };
        // Rendered first, so that a failure leaves nothing behind.
        let mut ops: Vec<Op<'_>> = Vec::with_capacity(settings.actions[r.route.index].len());
        let mut dedup = false;
        for action in &settings.actions[r.route.index] {
            match action {
                Action::Latest(l) => {
                    let key = render(&l.key, &mut scope, true)?;
                    let version = version_of(l.version, r);
                    let picked = match &l.fields {
                        Some(names) => Some(projection::pick(&e.data, names)?),
                        None => None,
                    };
                    // A member and its value (which carries the version), else the projected
                    // fields: `=` and the value, or nothing for one the event lacks (removed).
                    let member = match &l.field {
                        Some(field) => {
                            let fields = l.fields.as_deref().zip(picked.as_deref());
                            let value = projection::member_value(r, &version, fields);
                            Some((render(field, &mut scope, false)?, value))
                        }
                        None => None,
                    };
                    let mut args = Vec::with_capacity(4 + picked.as_ref().map_or(0, Vec::len));
                    args.push(Arg::Text(version));
                    if let Some((member, value)) = member {
                        args.push(Arg::Text(member));
                        args.push(Arg::Text(value));
                    } else if let Some(picked) = &picked {
                        args.extend(picked.iter().map(|v| {
                            Arg::Text(v.map_or_else(String::new, |raw| {
                                format!("={}", projection::hash_value(raw))
                            }))
                        }));
                    }
                    if let Some(ttl) = &l.ttl {
                        let value = ttl
                            .by
                            .as_ref()
                            .and_then(|(by, _)| render(by, &mut scope, false).ok());
                        let ttl_s = ttl.of(value.as_deref());
                        args.push(Arg::Text(if ttl_s == 0 {
                            String::new()
                        } else {
                            ttl_s.to_string()
                        }));
                    }
                    if let Some(group) = &l.group {
                        args.push(Arg::Key(render(group, &mut scope, true)?));
                    }
                    ops.push(Op::new(b'L', key, Constant::Latest(l), args));
                }
                Action::Invalidate { keys } => {
                    for key in keys {
                        let key = render(key, &mut scope, true)?;
                        ops.push(Op::new(b'I', key, Constant::None, Vec::new()));
                    }
                }
                Action::InvalidateGroups { groups } => {
                    for group in groups {
                        let key = render(group, &mut scope, true)?;
                        ops.push(Op::new(b'G', key, Constant::None, Vec::new()));
                    }
                }
                Action::Count { key, ttl_s } => {
                    dedup = true;
                    let key = render(key, &mut scope, true)?;
                    ops.push(Op::new(b'C', key, Constant::Number(*ttl_s), Vec::new()));
                }
                Action::History { key, maxlen, ttl_s } => {
                    dedup = true;
                    let key = render(key, &mut scope, true)?;
                    let ttl = refreshes.ttl(&key, *ttl_s);
                    let mut op = Op::new(b'H', key, Constant::Number(*maxlen), Vec::new());
                    op.history_ttl = ttl;
                    ops.push(op);
                }
            }
        }
        if ops.is_empty() {
            self.plain.push(r.entry_id);
            return Ok(());
        }
        // Only counters and history are hurt by a producer's retry (latest and invalidate are
        // idempotent): only their events pay for the dedup window.
        let dedup_index = if dedup && settings.dedup_window_s > 0 {
            let bucket = e
                .time
                .unix_timestamp()
                .div_euclid(settings.dedup_window_s as i64);
            self.key(&streamfleet::stream::keys::dedup_key(
                r.stream,
                settings.group,
                bucket,
            ))
        } else {
            0
        };
        let shape = self.shape(r.route.index, &ops);
        self.args.push(r.entry_id.to_string().into_bytes());
        self.args.push(dedup_index.to_string().into_bytes());
        self.args.push(e.id.as_bytes().to_vec());
        let mut json = String::new();
        e.write_json(&mut json);
        self.args.push(json.into_bytes());
        self.args.push(shape.to_string().into_bytes());
        for op in ops {
            let k = self.key(&op.key);
            self.args.push(k.to_string().into_bytes());
            for arg in op.args {
                let bytes = match arg {
                    Arg::Text(text) => text.into_bytes(),
                    Arg::Key(key) => self.key(&key).to_string().into_bytes(),
                };
                self.args.push(bytes);
            }
            if op.letter == b'H' && op.history_ttl > 0 {
                self.expire.insert(k, op.history_ttl);
            }
        }
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
            .arg(settings.dedup_window_s.max(1))
            .arg(self.plain.len());
        for id in &self.plain {
            cmd.arg(id.to_string());
        }
        cmd.arg(self.shape_of.len());
        for a in &self.shapes {
            cmd.arg(&a[..]);
        }
        cmd.arg(self.expire.len());
        for (k, ttl) in &self.expire {
            cmd.arg(k).arg(ttl);
        }
        for a in &self.args {
            cmd.arg(&a[..]);
        }
        cmd
    }
}

/// The version `latest` compares, as a string whose order is the version order: a mode letter
/// and fixed-width digits, so that versions of one mode compare as strings (effects.lua treats a
/// version of another mode or length as not comparable: the next event replaces it).
/// `e`: the entry id (41 bytes). `t`: the event time, as seconds since a day before 0000-01-01
/// (12 digits: every time the contract accepts, years 0000 to 9999 with any offset) and
/// nanoseconds (9), then the entry id for equal times (62 bytes). Releases before this one wrote
/// `t` with 20 digits of nanoseconds since 1970 shifted by 10^19 (61 bytes), which ordered only
/// from 1653 to 2286.
fn version_of(by: VersionBy, r: &Routed<'_>) -> String {
    let id = r.entry_id;
    match by {
        VersionBy::EntryId => format!("e{:020}{:020}", id.ms, id.seq),
        VersionBy::Time => {
            let t = r.event.time;
            let secs = (t.unix_timestamp() + TIME_VERSION_OFFSET_S).clamp(0, 999_999_999_999);
            format!(
                "t{secs:012}{:09}{:020}{:020}",
                t.nanosecond(),
                id.ms,
                id.seq
            )
        }
    }
}

/// Seconds from a day before 0000-01-01T00:00Z to 1970-01-01T00:00Z: the earliest time an RFC 3339
/// timestamp of year 0000 names (with an offset of up to a day) counts from 0.
const TIME_VERSION_OFFSET_S: i64 = 62_167_219_200 + 86_400;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::ProjectorRoute;
    use std::borrow::Cow;
    use streamfleet::event::Event;
    use streamfleet::runtime::config::FileConfig;

    fn event(time: time::OffsetDateTime, data: &'static str) -> Event<'static> {
        Event {
            id: uuid::Uuid::nil(),
            event_type: Cow::Borrowed("flow.progress"),
            channel: Cow::Borrowed("flow.7f3c.progress"),
            source: Cow::Borrowed("tests"),
            time,
            data: Cow::Borrowed(data),
            key: None,
            correlation_id: None,
        }
    }

    fn config() -> FileConfig {
        FileConfig::parse(
            r#"[[route]]
pattern = "flow.*.progress"
actions = [{ count = "c:{data.user}" }, { history = "h:{channel[1]}", ttl_s = 2400 }]
[[route]]
pattern = "user.#""#,
            "test",
        )
        .unwrap()
    }

    fn settings(actions: &[Vec<crate::actions::Action>]) -> Settings<'_> {
        Settings {
            group: "g",
            consumer: "c",
            dedup_window_s: 300,
            cluster: false,
            actions,
        }
    }

    #[test]
    fn versions_order_as_their_mode_says() {
        let c = config();
        let (_, route) = c.routes.lookup("flow.a.progress").unwrap();
        let stream: Arc<str> = "s".into();
        let at = |t, ms, seq| {
            let e = Box::leak(Box::new(event(t, "{}")));
            let r = Routed {
                event: e,
                route,
                stream: Box::leak(Box::new(stream.clone())),
                entry_id: EntryId { ms, seq },
            };
            (
                version_of(VersionBy::EntryId, &r),
                version_of(VersionBy::Time, &r),
            )
        };
        let early = time::macros::datetime!(2026-11-26 12:00:00 UTC);
        let late = time::macros::datetime!(2026-11-26 12:00:00.000001 UTC);
        // A later entry with an earlier time: newer by entry id, older by time.
        let (id_a, time_a) = at(late, 9, 0);
        let (id_b, time_b) = at(early, 10, 0);
        assert!(id_b > id_a && time_b < time_a);
        // Equal times fall back to the entry id; 9-0 < 10-0 although "9" > "10" as text.
        let (_, time_c) = at(early, 9, 5);
        assert!(time_b > time_c);
        // Before 1970 still orders.
        let (_, old) = at(time::macros::datetime!(1960-01-01 00:00 UTC), 1, 0);
        assert!(old < time_c);
        assert_eq!(id_a.len(), id_b.len());
    }

    #[test]
    fn time_versions_order_over_every_year_the_contract_accepts() {
        use time::macros::datetime;
        let c = config();
        let (_, route) = c.routes.lookup("flow.a.progress").unwrap();
        let stream: Arc<str> = "s".into();
        // Later entries carry the older times: only the time may decide.
        let version = |t: time::OffsetDateTime, seq| {
            let e = Box::leak(Box::new(event(t, "{}")));
            version_of(
                VersionBy::Time,
                &Routed {
                    event: e,
                    route,
                    stream: Box::leak(Box::new(stream.clone())),
                    entry_id: EntryId { ms: 1, seq },
                },
            )
        };
        let times = [
            datetime!(0000-01-01 00:00 +23:59),
            datetime!(0000-01-01 00:00 UTC),
            datetime!(0001-01-01 00:00 UTC),
            datetime!(0001-01-02 00:00 UTC),
            datetime!(1500-01-01 00:00 UTC),
            datetime!(1600-01-01 00:00 UTC),
            datetime!(1969-12-31 23:59:59.999999999 UTC),
            datetime!(1970-01-01 00:00 UTC),
            datetime!(2026-12-07 12:00 UTC),
            datetime!(2286-11-20 17:46:40 UTC),
            datetime!(5000-01-01 00:00 UTC),
            datetime!(9000-01-01 00:00 UTC),
            datetime!(9999-12-31 23:59:58 UTC),
            datetime!(9999-12-31 23:59:59 UTC),
            datetime!(9999-12-31 23:59:59.999999999 UTC),
            datetime!(9999-12-31 23:59:59.999999999 -23:59),
        ];
        let versions: Vec<String> = times
            .iter()
            .enumerate()
            .map(|(i, t)| version(*t, (times.len() - i) as u64))
            .collect();
        for pair in versions.windows(2) {
            assert!(pair[0] < pair[1], "{} !< {}", pair[0], pair[1]);
            assert_eq!(pair[0].len(), 62);
        }
    }

    #[test]
    fn an_event_a_template_cannot_name_leaves_nothing_in_the_call() {
        let c = config();
        let (_, route) = c.routes.lookup("flow.a.progress").unwrap();
        let (_, plain) = c.routes.lookup("user.1").unwrap();
        let stream: Arc<str> = "s".into();
        let actions = c.route_settings::<ProjectorRoute>("projector").unwrap();
        let settings = settings(&actions);
        let refreshes = Refreshes::default();
        let mut plan = refreshes.plan();
        let mut call = Call::new(stream.clone());
        let t = time::macros::datetime!(2026-11-26 12:00 UTC);
        let (bad, good) = (event(t, r#"{"x":1}"#), event(t, r#"{"user":"ana"}"#));
        let routed = |event, route, seq| Routed {
            event,
            route,
            stream: &stream,
            entry_id: EntryId { ms: 1, seq },
        };
        let err = call
            .add(&routed(&bad, route, 0), &settings, &mut plan)
            .unwrap_err();
        assert!(err.contains("c:{data.user}"), "{err}");
        assert!(call.args.is_empty() && call.keys.is_empty() && call.sent.is_empty());
        assert!(call.shapes.is_empty() && call.expire.is_empty());
        call.add(&routed(&good, route, 1), &settings, &mut plan)
            .unwrap();
        call.add(&routed(&good, plain, 2), &settings, &mut plan)
            .unwrap();
        assert_eq!(call.sent, vec![EntryId { ms: 1, seq: 1 }]);
        assert_eq!(
            call.plain,
            vec![EntryId { ms: 1, seq: 2 }],
            "no effect: id only"
        );
        // The dedup set, the counter and the history stream, each a KEYS index.
        assert_eq!(call.keys, ["s:dedup:g:5985648", "c:ana", "h:7f3c"]);
        // The history TTL: ttl_s plus the refresh interval, once per stream per batch.
        assert_eq!(call.expire, HashMap::from([(5, 2500)]));
        // One shape for the two actions: counter (no TTL), history (default maxlen).
        assert_eq!(call.shapes.len(), 3, "{:?}", call.shapes);
        assert_eq!(call.shapes[0], b"CH");
    }

    #[test]
    fn a_latest_sends_its_layout_once_and_per_event_only_its_values() {
        let c = FileConfig::parse(
            r#"[[route]]
pattern = "flow.*.progress"
actions = [
  { latest = "a:{channel[1]}", field = "{data.agent}", fields = ["step"], ttl_s = 60,
    ttl_by = "{data.status}", ttl_s_for = { done = 5, keep = 0 }, group = "g:{data.tenant}" },
  { latest = "m:{channel[1]}", fields = ["owner", "step"] },
]"#,
            "test",
        )
        .unwrap();
        let (_, route) = c.routes.lookup("flow.a.progress").unwrap();
        let actions = c.route_settings::<ProjectorRoute>("projector").unwrap();
        let settings = settings(&actions);
        let stream: Arc<str> = "s".into();
        let refreshes = Refreshes::default();
        let mut plan = refreshes.plan();
        let mut call = Call::new(stream.clone());
        let t = time::macros::datetime!(2026-11-26 12:00 UTC);
        let events = [
            event(t, r#"{"agent":"x","status":"done","tenant":"t","step":7}"#),
            event(
                t,
                r#"{"agent":"y","status":"keep","tenant":"t","owner":"ana"}"#,
            ),
            event(t, r#"{"agent":"z","tenant":"t"}"#),
        ];
        for (seq, e) in events.iter().enumerate() {
            let r = Routed {
                event: e,
                route,
                stream: &stream,
                entry_id: EntryId {
                    ms: 1,
                    seq: seq as u64,
                },
            };
            call.add(&r, &settings, &mut plan).unwrap();
        }
        assert_eq!(call.shapes.len(), 3, "one shape: letters and two layouts");
        assert_eq!(call.shapes[0], b"LL");
        assert_eq!(call.shapes[1], b"ftg");
        assert_eq!(call.shapes[2], b"p\nowner\nstep");
        let args: Vec<String> = call
            .args
            .iter()
            .map(|a| String::from_utf8(a.clone()).unwrap())
            .collect();
        // Per entry: id, dedup, event id, JSON, shape; then per op its key and values.
        let ops = |n: usize| &args[n * 15 + 5..n * 15 + 15];
        let first = ops(0);
        assert_eq!(first[0], "3", "a:7f3c is KEYS[3]");
        assert!(first[1].starts_with('e'));
        assert_eq!(first[2], "x");
        assert_eq!(
            first[3],
            format!(r#"{{"_version":"{}","step":7}}"#, first[1])
        );
        assert_eq!(first[4], "5", "done: 5 s");
        assert_eq!(first[5], "4", "the group g:t is KEYS[4]");
        // m:7f3c (KEYS[5]), its version, then `=` and each field, or nothing for one it lacks.
        assert_eq!(
            (first[6].as_str(), &first[8..]),
            ("5", &["".to_owned(), "=7".to_owned()][..])
        );
        assert_eq!(call.keys, ["a:7f3c", "g:t", "m:7f3c"]);
        let second = ops(1);
        assert_eq!(second[4], "", "keep: 0, no TTL");
        assert_eq!(&second[8..], ["=ana", ""]);
        let third = ops(2);
        assert_eq!(third[4], "60", "no status: ttl_s");
        assert_eq!(third[3], format!(r#"{{"_version":"{}"}}"#, third[1]));
    }

    #[test]
    fn history_ttls_are_refreshed_at_most_every_ttl_24th() {
        let mut refreshes = Refreshes::default();
        let mut plan = refreshes.plan();
        assert_eq!(plan.ttl("h", 2400), 2500);
        assert_eq!(plan.ttl("h", 2400), 2500, "the same for the whole batch");
        assert_eq!(plan.ttl("none", 0), 0);
        let planned = plan.into_planned();
        // A failed batch records nothing: the next one refreshes again.
        assert_eq!(refreshes.plan().ttl("h", 2400), 2500);
        refreshes.applied(planned);
        assert_eq!(refreshes.plan().ttl("h", 2400), 0, "refreshed 0 s ago");
    }
}
