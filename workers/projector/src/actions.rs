//! The projector's settings of a route: its `actions`, the effects declared per route (the
//! templates name the keys). Read from the route's own fields (`RouteSettings`), each action
//! checked, every template against the route's pattern; errors name
//! `route[i] (pattern).actions[j].field`.

use std::collections::BTreeMap;

use serde::Deserialize;
use streamfleet::event::template::Template;
use streamfleet::runtime::config::{Route, RouteSettings, MAX_TTL_S};

/// How `latest` decides which of two events of a key is newer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionBy {
    /// Stream order: the later entry id wins (what the producer appended last).
    #[default]
    EntryId,
    /// The event's `time` (the producer's clock); equal times fall back to the entry id.
    Time,
}

/// Default cap of a `history` stream (`MAXLEN ~`).
pub const DEFAULT_HISTORY_MAXLEN: u64 = 10_000;
/// Default TTL of counters and history streams: a day.
pub const DEFAULT_EFFECT_TTL_S: u64 = 86_400;
/// A projector action: an effect in Redis declared per route (the templates name the keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The newest state per key (or per member of a key), written only if the event is newer than
    /// the stored state.
    Latest(Box<Latest>),
    /// Cache keys deleted when such an event arrives.
    Invalidate { keys: Vec<Template> },
    /// Every key registered in each group (a `latest` with `group`) deleted, with the group.
    InvalidateGroups { groups: Vec<Template> },
    /// A counter per key (per time bucket when the template names one), expiring after `ttl_s`.
    Count { key: Template, ttl_s: u64 },
    /// A capped stream of the key's events, expiring `ttl_s` after the last one.
    History {
        key: Template,
        maxlen: u64,
        ttl_s: u64,
    },
}

/// A `latest` action: where the state goes, what of the event it keeps, for how long, and the
/// group that invalidates it: the seeds' flow-state cache (a state per flow, a field per agent, a
/// TTL by status, metadata apart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latest {
    pub key: Template,
    pub version: VersionBy,
    /// One hash field per member (`{data.agent_id}`) instead of one state per key.
    pub field: Option<Template>,
    /// The `data` fields kept (a projection); none: the whole event.
    pub fields: Option<Vec<String>>,
    /// The key's TTL, refreshed by each newer version; none: the key never expires (nor is a
    /// TTL set by other means touched).
    pub ttl: Option<LatestTtl>,
    /// The group the key is registered in, for `invalidate_groups`.
    pub group: Option<Template>,
}

/// A `latest` key's TTL: by a value of the event (`ttl_by`, `ttl_s_for`), else `ttl_s`; 0 is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestTtl {
    pub default_s: u64,
    pub by: Option<(Template, BTreeMap<String, u64>)>,
}

impl LatestTtl {
    /// The TTL of an event whose `ttl_by` rendered `value` (none when it could not be rendered).
    pub fn of(&self, value: Option<&str>) -> u64 {
        match (&self.by, value) {
            (Some((_, per)), Some(v)) => per.get(v).copied().unwrap_or(self.default_s),
            _ => self.default_s,
        }
    }
}

/// The field a projection keeps the version in: `_` so that it cannot be a `data` field the
/// projection names (refused at start).
pub const PROJECTED_VERSION_FIELD: &str = "_version";

impl Action {
    /// Every template of the action that names a key (checked against the stream's slot).
    pub fn key_templates(&self) -> Vec<&Template> {
        match self {
            Action::Latest(l) => std::iter::once(&l.key).chain(&l.group).collect(),
            Action::Count { key, .. } | Action::History { key, .. } => vec![key],
            Action::Invalidate { keys } => keys.iter().collect(),
            Action::InvalidateGroups { groups } => groups.iter().collect(),
        }
    }

    /// Every template of the action (checked against the route's pattern).
    pub fn templates(&self) -> Vec<&Template> {
        let mut all = self.key_templates();
        if let Action::Latest(l) = self {
            all.extend(&l.field);
            all.extend(l.ttl.as_ref().and_then(|t| t.by.as_ref()).map(|(t, _)| t));
        }
        all
    }
}

/// An action as written: exactly one of `latest`, `invalidate`, `invalidate_groups`, `count`,
/// `history`, with the settings of that kind only.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAction {
    latest: Option<Template>,
    version: Option<VersionBy>,
    field: Option<Template>,
    fields: Option<Vec<String>>,
    ttl_by: Option<Template>,
    ttl_s_for: Option<BTreeMap<String, u64>>,
    group: Option<Template>,
    invalidate: Option<Vec<Template>>,
    invalidate_groups: Option<Vec<Template>>,
    count: Option<Template>,
    history: Option<Template>,
    maxlen: Option<u64>,
    ttl_s: Option<u64>,
}

impl RawAction {
    fn validate(self, name: &dyn Fn(&str) -> String) -> Result<Action, String> {
        let kinds = [
            self.latest.is_some(),
            self.invalidate.is_some(),
            self.invalidate_groups.is_some(),
            self.count.is_some(),
            self.history.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(format!(
                "{} must name exactly one of latest, invalidate, invalidate_groups, count, history",
                name("")
            ));
        }
        let forbid = |present: bool, field: &str, kind: &str| {
            if present {
                Err(format!("{} does not apply to {kind}", name(field)))
            } else {
                Ok(())
            }
        };
        let ttl_ok = |field: &str, ttl: u64| {
            if ttl > MAX_TTL_S {
                Err(format!(
                    "{} ({ttl}) must be at most {MAX_TTL_S} (ten years)",
                    name(field)
                ))
            } else {
                Ok(())
            }
        };
        if let Some(ttl) = self.ttl_s {
            ttl_ok("ttl_s", ttl)?;
        }
        if let Some(maxlen) = self.maxlen.filter(|m| *m > i64::MAX as u64) {
            return Err(format!("{} ({maxlen}) is out of range", name("maxlen")));
        }
        if self.latest.is_none() {
            for (present, field) in [
                (self.field.is_some(), "field"),
                (self.fields.is_some(), "fields"),
                (self.ttl_by.is_some(), "ttl_by"),
                (self.ttl_s_for.is_some(), "ttl_s_for"),
                (self.group.is_some(), "group"),
            ] {
                forbid(present, field, "this action (only to latest)")?;
            }
        }
        Ok(if let Some(key) = self.latest {
            forbid(self.maxlen.is_some(), "maxlen", "latest")?;
            let fields = match self.fields {
                Some(fields) => Some(projection(fields, &name)?),
                None => None,
            };
            let by = match (self.ttl_by, self.ttl_s_for) {
                (Some(by), Some(per)) => {
                    if per.is_empty() {
                        return Err(format!("{} names no value", name("ttl_s_for")));
                    }
                    for (value, ttl) in &per {
                        ttl_ok(&format!("ttl_s_for.{value}"), *ttl)?;
                    }
                    Some((by, per))
                }
                (None, None) => None,
                (Some(_), None) => {
                    return Err(format!(
                        "{} needs ttl_s_for (the TTL per value, e.g. {{ completed = 300 }})",
                        name("ttl_by")
                    ))
                }
                (None, Some(_)) => {
                    return Err(format!(
                        "{} needs ttl_by (the value it is chosen by, e.g. \"{{data.status}}\")",
                        name("ttl_s_for")
                    ))
                }
            };
            let ttl = (self.ttl_s.is_some() || by.is_some()).then(|| LatestTtl {
                default_s: self.ttl_s.unwrap_or(0),
                by,
            });
            Action::Latest(Box::new(Latest {
                key,
                version: self.version.unwrap_or_default(),
                field: self.field,
                fields,
                ttl,
                group: self.group,
            }))
        } else if self.invalidate.is_some() || self.invalidate_groups.is_some() {
            let kind = if self.invalidate.is_some() {
                "invalidate"
            } else {
                "invalidate_groups"
            };
            forbid(self.version.is_some(), "version", kind)?;
            forbid(self.maxlen.is_some(), "maxlen", kind)?;
            forbid(self.ttl_s.is_some(), "ttl_s", kind)?;
            match (self.invalidate, self.invalidate_groups) {
                (Some(keys), _) if !keys.is_empty() => Action::Invalidate { keys },
                (_, Some(groups)) if !groups.is_empty() => Action::InvalidateGroups { groups },
                _ => return Err(format!("{} names no key", name(kind))),
            }
        } else if let Some(key) = self.count {
            forbid(self.version.is_some(), "version", "count")?;
            forbid(self.maxlen.is_some(), "maxlen", "count")?;
            Action::Count {
                key,
                ttl_s: self.ttl_s.unwrap_or(DEFAULT_EFFECT_TTL_S),
            }
        } else {
            forbid(self.version.is_some(), "version", "history")?;
            let maxlen = self.maxlen.unwrap_or(DEFAULT_HISTORY_MAXLEN);
            if maxlen == 0 {
                return Err(format!("{} must be at least 1", name("maxlen")));
            }
            Action::History {
                key: self.history.expect("one kind is set"),
                maxlen,
                ttl_s: self.ttl_s.unwrap_or(DEFAULT_EFFECT_TTL_S),
            }
        })
    }
}

/// A projection's `data` fields (dotted for nested objects), checked: named, once each, none
/// that is the version's field, and no newline (the script receives them one per line).
fn projection(fields: Vec<String>, name: &dyn Fn(&str) -> String) -> Result<Vec<String>, String> {
    if fields.is_empty() {
        return Err(format!(
            "{} names no field (leave it out to keep the whole event)",
            name("fields")
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for f in &fields {
        if f.split('.').any(str::is_empty) || f.contains(['\n', '\r']) {
            return Err(format!(
                "{} has an empty field name (or path segment) or one with a line break: {f:?}",
                name("fields")
            ));
        }
        if f == PROJECTED_VERSION_FIELD {
            return Err(format!(
                "{}: {PROJECTED_VERSION_FIELD} is where the projection keeps its version",
                name("fields")
            ));
        }
        if !seen.insert(f) {
            return Err(format!("{} names {f:?} twice", name("fields")));
        }
    }
    Ok(fields)
}

/// A route's fields as the projector reads them: its actions (none: acknowledged with no effect).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectorRoute {
    #[serde(default)]
    actions: Vec<RawAction>,
}

impl RouteSettings for ProjectorRoute {
    type Checked = Vec<Action>;

    fn check(self, route: &Route) -> Result<Vec<Action>, String> {
        let mut actions = Vec::with_capacity(self.actions.len());
        for (j, raw) in self.actions.into_iter().enumerate() {
            let name = |field: &str| {
                let field = if field.is_empty() {
                    String::new()
                } else {
                    format!(".{field}")
                };
                route.name(&format!("actions[{j}]{field}"))
            };
            let action = raw.validate(&name)?;
            for t in action.templates() {
                t.check(&route.pattern)
                    .map_err(|e| format!("{}: {e}", name("")))?;
            }
            actions.push(action);
        }
        Ok(actions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamfleet::runtime::config::FileConfig;

    fn actions(text: &str) -> Result<Vec<Vec<Action>>, String> {
        FileConfig::parse(
            &format!("[[route]]\npattern = \"flow.*.progress\"\nactions = [{text}]\n[[route]]\npattern = \"user.#\"\nstrict = true"),
            "f.toml",
        )
        .map_err(|e| e.to_string())?
        .route_settings::<ProjectorRoute>("projector")
        .map_err(|e| e.to_string())
    }

    #[test]
    fn actions_are_checked_against_their_route() {
        let routes = actions(
            r#"{ latest = "{{t}}:{channel[1]}" }, { history = "h:{key}", maxlen = 5 }, { count = "c:{minute}" }"#,
        )
        .unwrap();
        assert!(routes[1].is_empty(), "a route without actions");
        assert!(
            matches!(&routes[0][0], Action::Latest(l) if l.version == VersionBy::EntryId && l.ttl.is_none())
        );
        assert!(matches!(
            &routes[0][1],
            Action::History {
                maxlen: 5,
                ttl_s: DEFAULT_EFFECT_TTL_S,
                ..
            }
        ));
        for (text, expected) in [
            (
                r#"{ latest = "s:{channel[3]}" }"#,
                "route[0] (flow.*.progress).actions[0]: template \"s:{channel[3]}\"",
            ),
            (r#"{ count = "c:{nope}" }"#, "unknown placeholder {nope}"),
            (
                r#"{ count = "c", maxlen = 3 }"#,
                "actions[0].maxlen does not apply to count",
            ),
            (r#"{ latest = "a", count = "b" }"#, "exactly one of"),
            (r#"{ latest = "a", version = "clock" }"#, "clock"),
            (r#"{ invalidate = [] }"#, "names no key"),
            (
                r#"{ count = "c", ttl_s = 9223372036854775807 }"#,
                "actions[0].ttl_s",
            ),
        ] {
            let err = actions(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        // The notifier's fields are the notifier's to check; a field no worker owns is refused.
        let settings = |route: &str| {
            FileConfig::parse(
                &format!("[[route]]\npattern = \"flow.#\"\n{route}"),
                "f.toml",
            )
            .unwrap()
            .route_settings::<ProjectorRoute>("projector")
            .map_err(|e| e.to_string())
        };
        assert!(settings("publish = \"x\"\nsharded = true").is_ok());
        let err = settings("action = []").unwrap_err();
        assert!(
            err.contains("route[0] (flow.#): unknown field `action`"),
            "{err}"
        );
    }
}
