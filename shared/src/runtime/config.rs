//! The configuration file (`FLEET_CONFIG`, TOML, contract section 6): what a worker does.
//! Connections come from flags and environment variables (see [`crate::runtime::cli`]).
//!
//! Unknown fields and bad values are errors that name the field, so a typo never silently
//! falls back to a default.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::event::pattern::{ChannelPattern, PatternTable};

/// A configuration problem; its message is one line naming the setting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Where a consumer group that does not exist yet starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// From the first entry (`0`): nothing already published is skipped.
    Oldest,
    /// From new entries only (`$`).
    Newest,
}

impl StartFrom {
    /// The XGROUP CREATE id.
    pub fn as_id(self) -> &'static str {
        match self {
            StartFrom::Oldest => "0",
            StartFrom::Newest => "$",
        }
    }
}

/// `[tuning]`: how the pipeline reads and bounds work. Every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tuning {
    /// Entries per XREADGROUP (split across streams when reading many).
    pub batch_size: usize,
    /// XREADGROUP BLOCK, in milliseconds.
    pub block_ms: u64,
    /// Bound on entries read but not yet acknowledged.
    pub max_in_flight: usize,
    /// Batches the handler applies at once. With 2, one batch's commit (PostgreSQL's fsync, the
    /// round trip) overlaps the next batch's statement; batches may then commit out of read
    /// order. 1 applies them strictly in read order. Fewer when `max_in_flight` holds fewer
    /// batches (one more is being read).
    pub handler_concurrency: usize,
    /// Longest a handler may take for one batch before the attempt counts as failed.
    pub handler_timeout_ms: u64,
    /// Pending entries idle longer than this are reclaimed (XAUTOCLAIM), whoever owns them.
    pub claim_idle_ms: u64,
    /// How often the reclaimer looks for such entries.
    pub claim_interval_ms: u64,
    /// A consumer silent this long is idle: reported, and deleted from the group once it owns
    /// no pending entries.
    pub consumer_idle_ms: u64,
    /// Deliveries after which an entry goes to the dead letter stream.
    pub max_deliveries: u64,
    /// Redis-side effects (the projector): how long an event id is remembered, so that a
    /// producer's retry (the same event at a new entry) has no second effect. 0 turns it off.
    pub dedup_window_s: u64,
    /// Where a group that does not exist yet starts.
    pub start_from: StartFrom,
    /// Largest accepted `data`, in bytes.
    pub max_data_bytes: usize,
    /// How often glob stream patterns are re-scanned for new streams.
    pub discover_interval_ms: u64,
    /// How often lag and pending counts are sampled for metrics.
    pub lag_interval_ms: u64,
    /// Most streams one read names. Up to this many streams are read with one blocking
    /// XREADGROUP; beyond, reads poll rotating slices of this many, so a read costs Redis the
    /// same whatever the number of streams.
    pub streams_per_read: usize,
    /// With more streams than `streams_per_read`: the shortest time between the starts of two
    /// polling rounds over all streams (unless the last one filled a batch). A new entry waits
    /// about this long at most to be read.
    pub poll_interval_ms: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            batch_size: 500,
            block_ms: 1000,
            max_in_flight: 5000,
            handler_concurrency: 2,
            handler_timeout_ms: 5000,
            claim_idle_ms: 30_000,
            claim_interval_ms: 5000,
            consumer_idle_ms: 3_600_000,
            max_deliveries: 5,
            dedup_window_s: 300,
            start_from: StartFrom::Oldest,
            max_data_bytes: crate::event::DEFAULT_MAX_DATA_BYTES,
            discover_interval_ms: 5000,
            lag_interval_ms: 5000,
            streams_per_read: 100,
            poll_interval_ms: 100,
        }
    }
}

/// Longest TTL (and dedup window) accepted: ten years. Redis refuses an `EXPIRE` past its range,
/// and inside the projector's script a refusal would come after acknowledgements.
pub const MAX_TTL_S: u64 = 10 * 365 * 86_400;

/// `[[route]]` as written: what every worker reads of it; the rest is the worker's own
/// (`RouteSettings`).
#[derive(Debug, Clone, Deserialize)]
struct RawRoute {
    pattern: Option<ChannelPattern>,
    #[serde(default)]
    strict: bool,
    #[serde(flatten)]
    rest: toml::Table,
}

/// `[[route]]`: what every worker knows of the events on matching channels. What a worker does
/// with them is its own settings of the route (`RouteSettings`: the projector's actions, the
/// notifier's channel), found by the route's `index`.
#[derive(Debug, Clone)]
pub struct Route {
    pub pattern: ChannelPattern,
    /// User events: acknowledged only after they are committed to PostgreSQL; never dropped or
    /// coalesced by backpressure.
    pub strict: bool,
    /// Its place in the file: `route[index]`.
    pub index: usize,
}

impl Route {
    /// How errors name one of the route's fields: `route[i] (pattern).field`.
    pub fn name(&self, field: &str) -> String {
        if field.is_empty() {
            format!("route[{}] ({})", self.index, self.pattern)
        } else {
            format!("route[{}] ({}).{field}", self.index, self.pattern)
        }
    }
}

/// The route fields each worker reads. One file can serve the whole fleet (the contract's sketch
/// is one file): a worker reads its own fields, leaves another worker's to that worker (which
/// checks them when it starts), and refuses a field no worker reads, a typo. A new worker adds
/// its line here; the types and checks of its settings stay in its own crate. A field may be
/// read by two: the gateway subscribes where the notifier publishes.
pub const WORKER_ROUTE_FIELDS: &[(&str, &[&str])] = &[
    ("projector", &["actions"]),
    ("notifier", &["publish", "sharded"]),
    ("gateway", &["publish", "sharded", "gateway", "actions"]),
];

/// A worker's own settings of a `[[route]]`, read from the route's fields other than `pattern`,
/// `strict` and the other workers' (see [`WORKER_ROUTE_FIELDS`]; anything else the worker's
/// deserializer does not know is refused: each worker owns its settings, as each Vector component
/// owns its config), then checked against the route (its templates against its pattern, say)
/// into what the worker keeps.
pub trait RouteSettings: DeserializeOwned {
    /// What the worker keeps of one route.
    type Checked;
    /// Checks the settings read for `route`; errors name the field with `route.name(field)`.
    fn check(self, route: &Route) -> Result<Self::Checked, String>;
}

/// The settings of a worker that has none of its own per route (the persister): any field but
/// `pattern` and `strict` is refused.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoRouteSettings {}

impl RouteSettings for NoRouteSettings {
    type Checked = ();
    fn check(self, _: &Route) -> Result<(), String> {
        Ok(())
    }
}

/// What to do with an event over its channel's rate limit. On a strict route, always `Block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverLimit {
    /// It waits (unacknowledged, kept alive) for its channel's budget, never lost.
    Block,
    /// It is acknowledged with no effect.
    Drop,
    /// It waits for its channel's budget, and a newer event of its key replaces it (the older
    /// one is acknowledged as coalesced): the newest state goes out at the limited rate.
    Coalesce,
}

/// Whose budget a rate limit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitScope {
    /// The consumer group's, shared by every replica in Redis: the rate a subscriber sees,
    /// however many replicas there are.
    #[default]
    Fleet,
    /// Each replica's own, in memory: n replicas allow n times the rate.
    Replica,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ModeName {
    Block,
    Drop,
    Coalesce,
    RateLimit,
}

/// `[[backpressure]]` as written; validated into [`Backpressure`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackpressure {
    pattern: ChannelPattern,
    mode: ModeName,
    window_ms: Option<u64>,
    max_age_ms: Option<u64>,
    per_second: Option<u32>,
    burst: Option<u32>,
    over_limit: Option<OverLimit>,
    scope: Option<LimitScope>,
}

/// A per-channel backpressure mode.
#[derive(Debug, Clone, PartialEq)]
pub enum Backpressure {
    /// Never skip: the reader simply waits (the default for unmatched channels).
    Block,
    /// Shed load: skip events older than `max_age_ms` when they are finally read.
    Drop { max_age_ms: u64 },
    /// Per key, hold an event for `window_ms` and publish only the newest one of the window at
    /// its end; the older ones are acknowledged as coalesced.
    Coalesce { window_ms: u64 },
    /// At most `per_second` events (bursts of `burst`) per channel, for the whole group by
    /// default (`scope`); beyond, wait or skip.
    RateLimit {
        per_second: u32,
        burst: u32,
        over_limit: OverLimit,
        scope: LimitScope,
    },
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    tuning: Tuning,
    #[serde(default)]
    route: Option<Vec<RawRoute>>,
    #[serde(default)]
    backpressure: Vec<RawBackpressure>,
    #[serde(default)]
    retention: Vec<Retention>,
}

/// `[[retention]]`: how long the entries of the streams a glob matches are kept, and how many,
/// as `fleetctl trim` (a CronJob) applies it: never past an entry some consumer group has not
/// settled (acknowledged), unless `cut_unread`. Kafka's retention, apart from consumption.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Stream keys or a glob (`orders:*`, `*:dlq`, `app:flow:*:history`); the first rule
    /// matching a stream is its rule.
    pub streams: String,
    /// Entries older than this (by their id's time) may be removed.
    pub max_age_s: Option<u64>,
    /// At most this many entries are kept.
    pub max_len: Option<u64>,
    /// Whether the caps may remove entries a group has not settled yet (they are lost to it).
    #[serde(default)]
    pub cut_unread: bool,
}

/// The validated file configuration.
#[derive(Debug, Clone)]
pub struct FileConfig {
    pub tuning: Tuning,
    pub routes: PatternTable<Route>,
    pub backpressure: PatternTable<Backpressure>,
    /// Retention rules, in file order.
    pub retention: Vec<Retention>,
    /// Each route's fields other than the runtime's, by index: the worker's own settings.
    route_fields: Vec<toml::Table>,
    /// Where the configuration came from, for errors.
    origin: String,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig::parse("", "<defaults>").expect("the defaults are valid")
    }
}

/// The routes used when the file declares none: `user.#` is strict.
pub const DEFAULT_STRICT_PATTERN: &str = "user.#";

impl FileConfig {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("FLEET_CONFIG {}: {e}", path.display())))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| format!(" line {}:", text[..s.start].lines().count().max(1)))
                .unwrap_or_default();
            ConfigError(format!(
                "FLEET_CONFIG {origin}:{line} {}",
                e.message().replace('\n', " ")
            ))
        })?;
        let fail = |msg: String| ConfigError(format!("FLEET_CONFIG {origin}: {msg}"));
        let t = &raw.tuning;
        if t.batch_size == 0 {
            return Err(fail("tuning.batch_size must be at least 1".into()));
        }
        if t.max_in_flight < t.batch_size {
            return Err(fail(format!(
                "tuning.max_in_flight ({}) must be at least tuning.batch_size ({})",
                t.max_in_flight, t.batch_size
            )));
        }
        if !(1..=8).contains(&t.handler_concurrency) {
            return Err(fail(format!(
                "tuning.handler_concurrency ({}) must be between 1 and 8",
                t.handler_concurrency
            )));
        }
        if t.handler_timeout_ms == 0 {
            return Err(fail("tuning.handler_timeout_ms must be at least 1".into()));
        }
        if t.claim_idle_ms <= t.handler_timeout_ms {
            return Err(fail(format!(
                "tuning.claim_idle_ms ({}) must be greater than tuning.handler_timeout_ms ({}), or entries still being handled would be claimed by another consumer",
                t.claim_idle_ms, t.handler_timeout_ms
            )));
        }
        if t.consumer_idle_ms <= t.claim_idle_ms {
            return Err(fail(format!(
                "tuning.consumer_idle_ms ({}) must be greater than tuning.claim_idle_ms ({})",
                t.consumer_idle_ms, t.claim_idle_ms
            )));
        }
        if t.claim_interval_ms == 0 {
            return Err(fail("tuning.claim_interval_ms must be at least 1".into()));
        }
        if t.max_deliveries == 0 {
            return Err(fail("tuning.max_deliveries must be at least 1".into()));
        }
        if t.streams_per_read == 0 {
            return Err(fail("tuning.streams_per_read must be at least 1".into()));
        }
        if t.poll_interval_ms == 0 {
            return Err(fail("tuning.poll_interval_ms must be at least 1".into()));
        }
        if t.dedup_window_s > MAX_TTL_S {
            return Err(fail(format!(
                "tuning.dedup_window_s ({}) must be at most {MAX_TTL_S} (ten years)",
                t.dedup_window_s
            )));
        }
        if t.max_data_bytes == 0 {
            return Err(fail("tuning.max_data_bytes must be at least 1".into()));
        }
        for (i, r) in raw.retention.iter().enumerate() {
            let name = |f: &str| format!("retention[{i}] ({}).{f}", r.streams);
            if r.streams.trim().is_empty() {
                return Err(fail(format!("retention[{i}].streams must name streams")));
            }
            if r.max_age_s.is_none() && r.max_len.is_none() {
                return Err(fail(format!(
                    "retention[{i}] ({}) sets neither max_age_s nor max_len",
                    r.streams
                )));
            }
            if r.max_len == Some(0) {
                return Err(fail(format!("{} must be at least 1", name("max_len"))));
            }
            if r.max_age_s.is_some_and(|a| a == 0 || a > MAX_TTL_S) {
                return Err(fail(format!(
                    "{} must be between 1 and {MAX_TTL_S} (ten years)",
                    name("max_age_s")
                )));
            }
        }
        let mut route_fields = Vec::new();
        let routes = match raw.route {
            Some(routes) => routes
                .into_iter()
                .enumerate()
                .map(|(index, r)| {
                    let pattern = r
                        .pattern
                        .ok_or_else(|| fail(format!("route[{index}]: missing field `pattern`")))?;
                    route_fields.push(r.rest);
                    Ok(Route {
                        pattern,
                        strict: r.strict,
                        index,
                    })
                })
                .collect::<Result<Vec<_>, ConfigError>>()?,
            None => {
                route_fields.push(toml::Table::new());
                vec![Route {
                    pattern: DEFAULT_STRICT_PATTERN.parse().expect("valid pattern"),
                    strict: true,
                    index: 0,
                }]
            }
        };
        let mut rules = Vec::new();
        for (i, r) in raw.backpressure.into_iter().enumerate() {
            rules.push((
                r.pattern.clone(),
                validate_backpressure(i, r).map_err(fail)?,
            ));
        }
        Ok(FileConfig {
            tuning: raw.tuning,
            routes: PatternTable::new(routes.into_iter().map(|r| (r.pattern.clone(), r))),
            backpressure: PatternTable::new(rules),
            retention: raw.retention,
            route_fields,
            origin: origin.to_owned(),
        })
    }

    /// `worker`'s own settings of every route, by index, read and checked; the first problem
    /// names the route and the field.
    pub fn route_settings<T: RouteSettings>(
        &self,
        worker: &str,
    ) -> Result<Vec<T::Checked>, ConfigError> {
        let own: &[&str] = WORKER_ROUTE_FIELDS
            .iter()
            .find(|(w, _)| *w == worker)
            .map_or(&[], |(_, fields)| fields);
        let others: Vec<&str> = WORKER_ROUTE_FIELDS
            .iter()
            .flat_map(|(_, fields)| fields.iter().copied())
            .filter(|f| !own.contains(f))
            .collect();
        let mut routes: Vec<&Route> = self.routes.iter().map(|(_, r)| r).collect();
        routes.sort_by_key(|r| r.index);
        routes
            .into_iter()
            .map(|route| {
                let mut fields = self.route_fields[route.index].clone();
                fields.retain(|k, _| !others.contains(&k));
                let settings = T::deserialize(toml::Value::Table(fields))
                    .map_err(|e| format!("{}: {}", route.name(""), e.message().trim()))
                    .and_then(|t| t.check(route));
                settings.map_err(|e| ConfigError(format!("FLEET_CONFIG {}: {e}", self.origin)))
            })
            .collect()
    }

    /// Whether any route is strict, i.e. whether PostgreSQL is required.
    pub fn has_strict_route(&self) -> bool {
        self.routes.iter().any(|(_, r)| r.strict)
    }
}

fn validate_backpressure(i: usize, r: RawBackpressure) -> Result<Backpressure, String> {
    let name = |field: &str| format!("backpressure[{i}].{field}");
    let require = |v: Option<u64>, field: &str, mode: &str| {
        v.filter(|v| *v > 0)
            .ok_or_else(|| format!("{} must be set above 0 for mode {mode}", name(field)))
    };
    let forbid = |present: bool, field: &str, mode: &str| {
        if present {
            Err(format!("{} does not apply to mode {mode}", name(field)))
        } else {
            Ok(())
        }
    };
    let given = [
        ("window_ms", r.window_ms.is_some()),
        ("max_age_ms", r.max_age_ms.is_some()),
        ("per_second", r.per_second.is_some()),
        ("burst", r.burst.is_some()),
        ("over_limit", r.over_limit.is_some()),
        ("scope", r.scope.is_some()),
    ];
    let (mode, own): (&str, &[&str]) = match r.mode {
        ModeName::Block => ("block", &[]),
        ModeName::Drop => ("drop", &["max_age_ms"]),
        ModeName::Coalesce => ("coalesce", &["window_ms"]),
        ModeName::RateLimit => (
            "rate_limit",
            &["per_second", "burst", "over_limit", "scope"],
        ),
    };
    for (field, present) in given {
        forbid(present && !own.contains(&field), field, mode)?;
    }
    Ok(match r.mode {
        ModeName::Block => Backpressure::Block,
        ModeName::Drop => Backpressure::Drop {
            max_age_ms: require(r.max_age_ms, "max_age_ms", "drop")?,
        },
        ModeName::Coalesce => {
            let window_ms = require(r.window_ms, "window_ms", "coalesce")?;
            if window_ms > MAX_WINDOW_MS {
                return Err(format!(
                    "{} must be at most {MAX_WINDOW_MS} (an hour): events wait that long unacknowledged",
                    name("window_ms")
                ));
            }
            Backpressure::Coalesce { window_ms }
        }
        ModeName::RateLimit => {
            let per_second =
                require(r.per_second.map(u64::from), "per_second", "rate_limit")? as u32;
            Backpressure::RateLimit {
                per_second,
                burst: r.burst.unwrap_or(per_second).max(1),
                over_limit: r.over_limit.unwrap_or(OverLimit::Block),
                scope: r.scope.unwrap_or_default(),
            }
        }
    })
}

/// Longest coalescing window: its events wait unacknowledged (kept alive) that long.
const MAX_WINDOW_MS: u64 = 3_600_000;

#[cfg(test)]
mod tests {
    use super::*;

    const CONTRACT_SKETCH: &str = r#"
[tuning]
batch_size = 500
block_ms = 1000
max_in_flight = 5000
handler_timeout_ms = 5000
claim_idle_ms = 30000
max_deliveries = 5
dedup_window_s = 300
start_from = "oldest"

[[route]]
pattern = "user.#"
strict = true

[[route]]
pattern = "flow.*.progress"
actions = [
  { latest = "flow:{channel[1]}:state", version = "time" },
  { invalidate = ["cache:flow:{channel[1]}"] },
  { count = "stats:{type}:{minute}", ttl_s = 86400 },
]

[[backpressure]]
pattern = "flow.*.progress"
mode = "coalesce"
window_ms = 100
[[backpressure]]
pattern = "user.#"
mode = "rate_limit"
per_second = 200
burst = 50
over_limit = "block"
"#;

    #[test]
    fn parses_the_contract_sketch() {
        let c = FileConfig::parse(CONTRACT_SKETCH, "sketch").unwrap();
        assert!(c.has_strict_route());
        let (_, flow) = c.routes.lookup("flow.7f3c.progress").unwrap();
        assert_eq!(flow.index, 1);
        // The projector's actions are its own settings: the persister, which has none, leaves
        // them to the projector, and refuses a field no worker owns, naming the route.
        assert_eq!(
            c.route_settings::<NoRouteSettings>("persister")
                .unwrap()
                .len(),
            2
        );
        let typo = FileConfig::parse(
            "[[route]]\npattern = \"a\"\n[[route]]\npattern = \"b.*\"\naction = []",
            "f.toml",
        )
        .unwrap();
        let err = typo.route_settings::<NoRouteSettings>("persister");
        let err = err.unwrap_err().to_string();
        assert!(
            err.contains("f.toml: route[1] (b.*): unknown field `action`"),
            "{err}"
        );
        assert_eq!(
            c.backpressure.lookup("user.1").unwrap().1,
            &Backpressure::RateLimit {
                per_second: 200,
                burst: 50,
                over_limit: OverLimit::Block,
                scope: LimitScope::Fleet,
            }
        );
    }

    #[test]
    fn defaults_make_user_events_strict() {
        let c = FileConfig::default();
        assert_eq!(c.tuning.batch_size, 500);
        assert!(c.routes.lookup("user.42").unwrap().1.strict);
        assert!(c.routes.lookup("flow.1.progress").is_none());
    }

    #[test]
    fn errors_name_the_field() {
        let err = |text: &str| FileConfig::parse(text, "f.toml").unwrap_err().to_string();
        assert!(err("[tuning]\nbatch_sise = 3").contains("batch_sise"));
        assert!(err("[tuning]\nbatch_size = \"many\"").contains("line 2"));
        assert!(
            err("[tuning]\nclaim_idle_ms = 10\nhandler_timeout_ms = 20").contains("claim_idle_ms")
        );
        assert!(err("[tuning]\nstart_from = \"middle\"").contains("middle"));
        assert!(err("[tuning]\nhandler_concurrency = 0").contains("handler_concurrency"));
        assert!(err("[tuning]\nhandler_concurrency = 9").contains("handler_concurrency"));
        assert!(err("[[route]]\npattern = \"User.#\"").contains("User.#"));
        assert!(
            err("[[backpressure]]\npattern = \"a\"\nmode = \"coalesce\"")
                .contains("backpressure[0].window_ms")
        );
        assert!(err("[[backpressure]]\npattern = \"a\"\nmode = \"flood\"").contains("flood"));
        // A field of another mode is an error, not silently ignored.
        assert!(
            err("[[backpressure]]\npattern = \"a\"\nmode = \"coalesce\"\nwindow_ms = 5\nover_limit = \"drop\"")
                .contains("backpressure[0].over_limit does not apply to mode coalesce")
        );
        assert!(
            err("[[backpressure]]\npattern = \"a\"\nmode = \"block\"\nmax_age_ms = 5")
                .contains("backpressure[0].max_age_ms")
        );
        assert!(
            err("[[backpressure]]\npattern = \"a\"\nmode = \"coalesce\"\nwindow_ms = 3600001")
                .contains("backpressure[0].window_ms must be at most")
        );
        let coalesce = FileConfig::parse(
            "[[backpressure]]\npattern = \"a\"\nmode = \"rate_limit\"\nper_second = 5\nover_limit = \"coalesce\"",
            "f.toml",
        )
        .unwrap();
        assert!(matches!(
            coalesce.backpressure.lookup("a"),
            Some((
                _,
                Backpressure::RateLimit {
                    over_limit: OverLimit::Coalesce,
                    burst: 5,
                    ..
                }
            ))
        ));
        let replica = FileConfig::parse(
            "[[backpressure]]\npattern = \"a\"\nmode = \"rate_limit\"\nper_second = 5\nscope = \"replica\"",
            "f.toml",
        )
        .unwrap();
        assert!(matches!(
            replica.backpressure.lookup("a"),
            Some((
                _,
                Backpressure::RateLimit {
                    scope: LimitScope::Replica,
                    ..
                }
            ))
        ));
        assert!(err(
            "[[backpressure]]\npattern = \"a\"\nmode = \"drop\"\nmax_age_ms = 5\nscope = \"fleet\""
        )
        .contains("backpressure[0].scope does not apply to mode drop"));
        assert!(
            err("[[backpressure]]\npattern = \"a\"\nmode = \"rate_limit\"\nper_second = 5\nscope = \"pod\"")
                .contains("line 5: unknown variant `pod`, expected `fleet` or `replica`")
        );
        for e in [
            err("[tuning]\nbatch_sise = 3"),
            err("[[route]]\nstrict = true"),
        ] {
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }
}
