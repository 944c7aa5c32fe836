//! The notifier's settings of a route: the Pub/Sub channel its events go out on (`publish`, a
//! template checked against the route's pattern; `fleet:{channel}` when absent) and whether it
//! is a sharded channel (`sharded`).

use serde::Deserialize;
use streamfleet::event::template::{Template, DEFAULT_CHANNEL};
use streamfleet::runtime::config::{Route, RouteSettings};

/// The notifier's fields of a `[[route]]`, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifierRoute {
    publish: Option<Template>,
    #[serde(default)]
    sharded: bool,
}

/// Where a route's events are published.
#[derive(Debug, Clone)]
pub struct Channel {
    pub template: Template,
    /// `SPUBLISH` (sharded Pub/Sub, Redis 7): on a cluster a channel's messages reach the nodes
    /// of its slot only, not every node; its subscribers `SSUBSCRIBE` to exact channels (sharded
    /// Pub/Sub has no patterns).
    pub sharded: bool,
}

impl RouteSettings for NotifierRoute {
    type Checked = Channel;

    fn check(self, route: &Route) -> Result<Channel, String> {
        let template = self.publish.unwrap_or_else(|| DEFAULT_CHANNEL.clone());
        template
            .check(&route.pattern)
            .map_err(|e| format!("{}: {e}", route.name("publish")))?;
        Ok(Channel {
            template,
            sharded: self.sharded,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamfleet::runtime::config::FileConfig;

    fn channels(routes: &str) -> Result<Vec<Channel>, String> {
        FileConfig::parse(routes, "f.toml")
            .map_err(|e| e.to_string())?
            .route_settings::<NotifierRoute>("notifier")
            .map_err(|e| e.to_string())
    }

    #[test]
    fn channels_are_checked_against_their_route() {
        let c = channels(
            "[[route]]\npattern = \"a.*\"\npublish = \"x:{channel[1]}\"\nsharded = true\n\
             [[route]]\npattern = \"b\"\nactions = [{ count = \"c\" }]",
        )
        .unwrap();
        assert!(c[0].sharded);
        assert_eq!(c[1].template.to_string(), "fleet:{channel}");
        assert!(!c[1].sharded, "the projector's actions are left to it");
        let err = channels("[[route]]\npattern = \"a.*\"\npublish = \"x:{channel[2]}\"");
        let err = err.unwrap_err();
        assert!(
            err.contains("f.toml: route[0] (a.*).publish: template"),
            "{err}"
        );
        assert!(!err.contains('\n'), "one line: {err}");
        let err = channels("[[route]]\npattern = \"a\"\nsharded = \"yes\"").unwrap_err();
        assert!(err.contains("route[0] (a): invalid type"), "{err}");
        let err = channels("[[route]]\npattern = \"a\"\npublsh = \"x\"").unwrap_err();
        assert!(
            err.contains("route[0] (a): unknown field `publsh`"),
            "{err}"
        );
    }
}
