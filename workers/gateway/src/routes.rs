//! What the gateway reads of the routes (`[[route]]`, the same file as the rest of the fleet):
//! where the notifier publishes a route's events (its `publish` and `sharded`, read, never
//! changed), and the gateway's own `gateway = { history = "…", latest = "…" }`: the projector's
//! history stream a resume reads what a browser missed from, and the `latest` hash a reset sends.
//! Both are keys named from the topic alone (`{channel}`, `{channel[N]}`).

use serde::Deserialize;
use streamfleet::event::pattern::{ChannelPattern, PatternTable};
use streamfleet::event::template::{Template, DEFAULT_CHANNEL};
use streamfleet::runtime::config::{Route, RouteSettings};

/// The gateway's fields of a `[[route]]`, as written (the notifier's two it reads included).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayRoute {
    publish: Option<Template>,
    #[serde(default)]
    sharded: bool,
    gateway: Option<ResumeFrom>,
    /// The projector's actions, read only to see that a `latest` the gateway resets from is a
    /// whole-event one (the projector checks them).
    #[serde(default)]
    actions: Vec<serde_json::Value>,
}

/// `gateway = { history = "…", latest = "…" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeFrom {
    history: Option<Template>,
    latest: Option<Template>,
}

/// A route as the gateway serves it.
#[derive(Debug, Clone)]
pub struct Served {
    pub pattern: ChannelPattern,
    /// The Pub/Sub channel its events are published on; `None` for a sharded route, which has no
    /// pattern subscription (its topics get no live events from this gateway).
    pub publish: Option<Template>,
    pub history: Option<Template>,
    pub latest: Option<Template>,
}

impl RouteSettings for GatewayRoute {
    type Checked = Served;

    fn check(self, route: &Route) -> Result<Served, String> {
        let publish = self.publish.unwrap_or_else(|| DEFAULT_CHANNEL.clone());
        publish
            .check(&route.pattern)
            .map_err(|e| format!("{}: {e}", route.name("publish")))?;
        let resume = self.gateway.unwrap_or(ResumeFrom {
            history: None,
            latest: None,
        });
        if self.sharded && (resume.history.is_some() || resume.latest.is_some()) {
            return Err(format!(
                "{}: the route is published with SPUBLISH (sharded), which a gateway cannot subscribe to by pattern; publish it with PUBLISH to serve it",
                route.name("gateway")
            ));
        }
        for (field, t) in [("history", &resume.history), ("latest", &resume.latest)] {
            if let Some(t) = t {
                let name = route.name(&format!("gateway.{field}"));
                t.check(&route.pattern)
                    .map_err(|e| format!("{name}: {e}"))?;
                if !t.names_channel_only() {
                    return Err(format!(
                        "{name}: template {:?}: a gateway names keys from the topic alone ({{channel}} and {{channel[N]}})",
                        t.as_str()
                    ));
                }
            }
        }
        if let Some(latest) = &resume.latest {
            let stores_part = self.actions.iter().position(|a| {
                a.get("latest").and_then(|l| l.as_str()) == Some(latest.as_str())
                    && (a.get("field").is_some() || a.get("fields").is_some())
            });
            if let Some(j) = stores_part {
                return Err(format!(
                    "{}: {:?} is written by {} with `field` or `fields`, which keep no whole event: a reset sends the latest event, so name a latest without them",
                    route.name("gateway.latest"),
                    latest.as_str(),
                    route.name(&format!("actions[{j}]"))
                ));
            }
        }
        Ok(Served {
            pattern: route.pattern.clone(),
            publish: (!self.sharded).then_some(publish),
            history: resume.history,
            latest: resume.latest,
        })
    }
}

/// Where a topic's missed events and state are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeKeys {
    pub history: Option<String>,
    pub latest: Option<String>,
}

/// Every route the gateway serves, looked up the way the fleet routes events (most specific
/// pattern first).
#[derive(Debug, Clone)]
pub struct Routes {
    table: PatternTable<Served>,
}

impl Routes {
    pub fn new(served: Vec<Served>) -> Routes {
        Routes {
            table: PatternTable::new(served.into_iter().map(|s| (s.pattern.clone(), s))),
        }
    }

    /// The Pub/Sub patterns (`PSUBSCRIBE`) that carry every event on a channel `topic` matches:
    /// one per route the topic overlaps, as narrow as the route's channel template allows
    /// (`fleet:{channel}` and topic `flow.42.progress` give `fleet:flow.42.progress`).
    pub fn globs(&self, topic: &ChannelPattern) -> Vec<String> {
        let mut globs: Vec<String> = self
            .table
            .iter()
            .filter(|(p, _)| p.overlaps(topic))
            .filter_map(|(_, s)| s.publish.as_ref())
            .map(|t| t.glob_for(topic))
            .collect();
        globs.sort();
        globs.dedup();
        globs
    }

    /// The history and `latest` keys of `topic`: those of the route its channels are routed to
    /// (one channel: the route that wins it; a pattern: the one route it overlaps, if that route
    /// covers it), when the topic fixes the segments they are named by.
    pub fn resume_keys(&self, topic: &ChannelPattern) -> ResumeKeys {
        let served = if topic.is_exact() {
            self.table.lookup(topic.as_str()).map(|(_, s)| s)
        } else {
            let mut overlapping = self.table.iter().filter(|(p, _)| p.overlaps(topic));
            match (overlapping.next(), overlapping.next()) {
                (Some((p, s)), None) if p.covers(topic) => Some(s),
                _ => None,
            }
        };
        let key = |t: &Option<Template>| t.as_ref().and_then(|t| t.render_topic(topic));
        ResumeKeys {
            history: served.and_then(|s| key(&s.history)),
            latest: served.and_then(|s| key(&s.latest)),
        }
    }

    /// Routes published with `SPUBLISH`, which get no live events from a gateway.
    pub fn sharded(&self) -> impl Iterator<Item = &ChannelPattern> {
        self.table
            .iter()
            .filter(|(_, s)| s.publish.is_none())
            .map(|(p, _)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamfleet::runtime::config::FileConfig;

    fn routes(toml: &str) -> Result<Routes, String> {
        FileConfig::parse(toml, "f.toml")
            .map_err(|e| e.to_string())?
            .route_settings::<GatewayRoute>("gateway")
            .map(Routes::new)
            .map_err(|e| e.to_string())
    }

    fn p(s: &str) -> ChannelPattern {
        s.parse().unwrap()
    }

    const FLEET: &str = r#"
[[route]]
pattern = "user.#"
strict = true

[[route]]
pattern = "flow.*.progress"
actions = [{ latest = "flow:{channel[1]}" }, { history = "flow:{channel[1]}:events", maxlen = 100 }]
gateway = { history = "flow:{channel[1]}:events", latest = "flow:{channel[1]}" }

[[route]]
pattern = "order.*"
publish = "orders:{channel[1]}"
"#;

    #[test]
    fn subscriptions_are_as_narrow_as_the_channel_template_allows() {
        let r = routes(FLEET).unwrap();
        assert_eq!(r.globs(&p("flow.42.progress")), ["fleet:flow.42.progress"]);
        assert_eq!(r.globs(&p("flow.*.progress")), ["fleet:flow.*.progress"]);
        assert_eq!(r.globs(&p("order.7")), ["orders:7"]);
        assert_eq!(r.globs(&p("order.*")), ["orders:*"]);
        assert_eq!(r.globs(&p("user.#")), ["fleet:user*"]);
        // Every route: the default channel once, the order route's own.
        assert_eq!(r.globs(&p("#")), ["fleet:*", "orders:*"]);
        assert!(r.globs(&p("nothing.routed")).is_empty());
    }

    #[test]
    fn resume_keys_come_from_the_route_the_topic_is_routed_to() {
        let r = routes(FLEET).unwrap();
        assert_eq!(
            r.resume_keys(&p("flow.42.progress")),
            ResumeKeys {
                history: Some("flow:42:events".into()),
                latest: Some("flow:42".into())
            }
        );
        let none = ResumeKeys {
            history: None,
            latest: None,
        };
        // A wildcard where the key needs a segment; a topic of several routes; no gateway table.
        assert_eq!(r.resume_keys(&p("flow.*.progress")), none);
        assert_eq!(r.resume_keys(&p("#")), none);
        assert_eq!(r.resume_keys(&p("order.7")), none);
    }

    #[test]
    fn bad_gateway_settings_name_the_field() {
        let err = |toml: &str| routes(toml).err().unwrap_or_default();
        assert!(err("[[route]]\npattern = \"a.*\"\ngateway = { history = \"h:{type}\" }")
            .contains("route[0] (a.*).gateway.history: template \"h:{type}\": a gateway names keys from the topic alone"));
        assert!(
            err("[[route]]\npattern = \"a.*\"\ngateway = { history = \"h:{channel[3]}\" }")
                .contains("route[0] (a.*).gateway.history: template")
        );
        assert!(
            err("[[route]]\npattern = \"a\"\ngateway = { histroy = \"h\" }")
                .contains("route[0] (a): unknown field `histroy`")
        );
        assert!(
            err("[[route]]\npattern = \"a\"\nsharded = true\ngateway = { latest = \"s\" }")
                .contains("SPUBLISH")
        );
        // A latest that keeps a member or a projection has no event for a reset.
        for action in [
            r#"{ latest = "s:{channel[1]}", field = "{data.agent}" }"#,
            r#"{ latest = "s:{channel[1]}", fields = ["status"] }"#,
        ] {
            let toml = format!(
                "[[route]]\npattern = \"a.*\"\nactions = [{{ count = \"c\" }}, {action}]\ngateway = {{ latest = \"s:{{channel[1]}}\" }}"
            );
            assert!(
                err(&toml).contains("route[0] (a.*).gateway.latest: \"s:{channel[1]}\" is written by route[0] (a.*).actions[1] with `field` or `fields`"),
                "{}",
                err(&toml)
            );
        }
        // A sharded route without a gateway table is served with no live events, not refused.
        let r = routes("[[route]]\npattern = \"a\"\nsharded = true").unwrap();
        assert_eq!(r.sharded().count(), 1);
        assert!(r.globs(&p("a")).is_empty());
    }
}
