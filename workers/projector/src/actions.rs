//! The projector's settings of a route: its `actions`, the effects declared per route (the
//! templates name the keys). Read from the route's own fields (`RouteSettings`), each action
//! checked, every template against the route's pattern; errors name
//! `route[i] (pattern).actions[j].field`.

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
    /// The newest state per key: a hash of the event's `data` fields, written only if the event
    /// is newer than the stored one.
    Latest { key: Template, version: VersionBy },
    /// Cache keys deleted when such an event arrives.
    Invalidate { keys: Vec<Template> },
    /// A counter per key (per time bucket when the template names one), expiring after `ttl_s`.
    Count { key: Template, ttl_s: u64 },
    /// A capped stream of the key's events, expiring `ttl_s` after the last one.
    History {
        key: Template,
        maxlen: u64,
        ttl_s: u64,
    },
}

impl Action {
    /// Every template of the action.
    pub fn templates(&self) -> Vec<&Template> {
        match self {
            Action::Latest { key, .. }
            | Action::Count { key, .. }
            | Action::History { key, .. } => {
                vec![key]
            }
            Action::Invalidate { keys } => keys.iter().collect(),
        }
    }
}

/// An action as written: exactly one of `latest`, `invalidate`, `count`, `history`, with the
/// settings of that kind only.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAction {
    latest: Option<Template>,
    version: Option<VersionBy>,
    invalidate: Option<Vec<Template>>,
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
            self.count.is_some(),
            self.history.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(format!(
                "{} must name exactly one of latest, invalidate, count, history",
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
        if let Some(ttl) = self.ttl_s.filter(|t| *t > MAX_TTL_S) {
            return Err(format!(
                "{} ({ttl}) must be at most {MAX_TTL_S} (ten years)",
                name("ttl_s")
            ));
        }
        if let Some(maxlen) = self.maxlen.filter(|m| *m > i64::MAX as u64) {
            return Err(format!("{} ({maxlen}) is out of range", name("maxlen")));
        }
        Ok(if let Some(key) = self.latest {
            forbid(self.maxlen.is_some(), "maxlen", "latest")?;
            forbid(self.ttl_s.is_some(), "ttl_s", "latest")?;
            Action::Latest {
                key,
                version: self.version.unwrap_or_default(),
            }
        } else if let Some(keys) = self.invalidate {
            forbid(self.version.is_some(), "version", "invalidate")?;
            forbid(self.maxlen.is_some(), "maxlen", "invalidate")?;
            forbid(self.ttl_s.is_some(), "ttl_s", "invalidate")?;
            if keys.is_empty() {
                return Err(format!("{} names no key", name("invalidate")));
            }
            Action::Invalidate { keys }
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
        assert!(matches!(
            &routes[0][0],
            Action::Latest {
                version: VersionBy::EntryId,
                ..
            }
        ));
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
