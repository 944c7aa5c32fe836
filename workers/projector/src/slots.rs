//! Co-partitioning on Redis Cluster: a batch's effects and its `XACK` are one script, and Redis
//! runs a script on one node, over keys of one slot. So every key an action writes must live in
//! its stream's slot, as Kafka Streams keeps a task's state with its input partition. Whether a
//! template can, is known from where its keys' hash tag comes from; a route whose templates cannot
//! is refused at start (exit 2, naming the route), never applied without the atomicity. Each key
//! rendered is checked again as it is planned (a stream with another tag than expected): the event
//! is then dead-lettered, naming the key.

use crate::actions::Action;
use streamfleet::event::template::{TagSource, Template};
use streamfleet::runtime::config::FileConfig;
use streamfleet::stream::keys::{hash_tag, slot};

/// Why a template cannot keep its keys in their stream's slot, given the consumed `streams`
/// (keys or globs), if it cannot.
fn refusal(template: &Template, streams: &[&str]) -> Option<String> {
    let hint =
        "start the key with {tag} (the stream's hash tag, e.g. flow:{tag}:{channel[1]}:state)";
    match template.hash_tag_source() {
        TagSource::StreamTag => None,
        TagSource::StreamName => streams.iter().find(|s| hash_tag(s).is_none()).map(|untagged| {
            format!(
                "{{stream}} keeps a key in its stream's slot only when the stream name has a hash tag, and {untagged} has none: {hint}"
            )
        }),
        TagSource::Literal(tag) => streams
            .iter()
            .find(|s| hash_tag(s).map(slot) != Some(slot(&tag)))
            .map(|other| format!("its literal tag {{{tag}}} is not the slot of {other}: {hint}")),
        TagSource::Unknown => Some(format!("its hash tag depends on the event: {hint}")),
        TagSource::None => Some(format!("it has no hash tag, so its keys land in any slot: {hint}")),
    }
}

/// Checks every template of every route against the consumed `streams`, on a Redis Cluster: the
/// first that cannot keep its keys in their stream's slot, named as the configuration names it.
pub fn check(config: &FileConfig, actions: &[Vec<Action>], streams: &[&str]) -> Result<(), String> {
    for (_, route) in config.routes.iter() {
        let (i, pattern) = (route.index, &route.pattern);
        for (j, action) in actions[route.index].iter().enumerate() {
            for t in action.key_templates() {
                if let Some(why) = refusal(t, streams) {
                    return Err(format!(
                        "FLEET_CONFIG: route[{i}] ({pattern}).actions[{j}]: template \"{t}\": on a Redis Cluster every key a route writes must share its stream's hash slot (its effects and XACK are one script): {why}"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Why `key` may not be written by a call on `stream` (another slot), on a cluster.
pub fn misplaced(key: &str, stream: &str) -> Option<String> {
    let (k, s) = (slot(key), slot(stream));
    (k != s).then(|| {
        format!("{key} is in hash slot {k}, its stream {stream} in slot {s}: on a Redis Cluster a route's keys must share their stream's slot (use {{tag}})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(actions: &str) -> (FileConfig, Vec<Vec<Action>>) {
        let c = FileConfig::parse(
            &format!("[[route]]\npattern = \"flow.*.progress\"\nactions = [{actions}]"),
            "t",
        )
        .unwrap();
        let actions = c
            .route_settings::<crate::actions::ProjectorRoute>("projector")
            .unwrap();
        (c, actions)
    }

    fn check(c: &(FileConfig, Vec<Vec<Action>>), streams: &[&str]) -> Result<(), String> {
        super::check(&c.0, &c.1, streams)
    }

    #[test]
    fn templates_that_cannot_share_their_streams_slot_are_refused_naming_the_route() {
        let tagged = ["events:{0}", "events:{1}"];
        assert!(check(
            &config(r#"{ latest = "flow:{tag}:{channel[1]}" }"#),
            &["plain"]
        )
        .is_ok());
        assert!(check(&config(r#"{ count = "{stream}:n" }"#), &tagged).is_ok());
        let err = check(&config(r#"{ count = "{stream}:n" }"#), &["plain", "x:*"]).unwrap_err();
        assert!(
            err.contains("route[0] (flow.*.progress).actions[0]") && err.contains("plain has none"),
            "{err}"
        );
        let err = check(
            &config(r#"{ latest = "flow:{tag}" }, { invalidate = ["cache:{channel[1]}"] }"#),
            &tagged,
        )
        .unwrap_err();
        assert!(
            err.contains("actions[1]") && err.contains("no hash tag"),
            "{err}"
        );
        assert!(check(&config(r#"{ history = "{{0}}:h" }"#), &["events:{0}"]).is_ok());
        assert!(check(&config(r#"{ history = "{{0}}:h" }"#), &tagged).is_err());
    }

    #[test]
    fn a_key_in_another_slot_than_its_stream_is_named() {
        assert!(misplaced("flow:{events:{0}}:x", "events:{0}").is_some());
        assert!(misplaced("flow:{0}:x", "events:{0}").is_none());
        assert!(misplaced("flow:x", "events:{0}")
            .unwrap()
            .contains("use {tag}"));
    }
}
