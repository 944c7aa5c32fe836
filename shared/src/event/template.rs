//! Templates over an event: the Redis keys a projector writes (`flow:{channel[1]}:state`) and the
//! Pub/Sub channels a notifier publishes on (`fleet:{channel}`).
//!
//! Placeholders: `{channel}`, `{channel[N]}` (segment N, from 0), `{type}`, `{source}`, `{key}`
//! (the event's key, which defaults to its channel), `{id}`, `{stream}` (the stream read, hash tag
//! included), `{tag}` (the stream's hash tag in braces, `{orders}` for `{orders}:events`, or the
//! whole stream name in braces for a stream without one: either way a key that starts with it
//! lives in its stream's Redis Cluster slot), `{data.<field>}` (a
//! field of `data`, dotted for nested objects; strings as they are, numbers and booleans as JSON),
//! and `{minute}`, `{hour}`, `{day}` (the event's `time` in UTC: `2026-11-26T12:25`,
//! `2026-11-26T12`, `2026-11-26`). A literal brace is doubled: `{{` and `}}`, so a Cluster hash
//! tag is written `{{orders}}:state:{channel[1]}`.
//!
//! What can be checked before any event arrives is checked when the configuration is read (an
//! unknown placeholder, an unbalanced brace, a channel segment the route's pattern never has);
//! what depends on the event (a missing `data` field) is a [`RenderError`] for that event alone.

use std::fmt::{self, Write};
use std::sync::LazyLock;

use time::OffsetDateTime;

use crate::event::pattern::ChannelPattern;
use crate::event::Event;

/// The Pub/Sub channel of a route that names none (contract section 6): where the notifier
/// publishes and a gateway subscribes.
pub static DEFAULT_CHANNEL: LazyLock<Template> =
    LazyLock::new(|| "fleet:{channel}".parse().expect("a valid template"));

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Channel,
    Segment(usize),
    Type,
    Source,
    Key,
    Id,
    Stream,
    Tag,
    Data(Vec<String>),
    Minute,
    Hour,
    Day,
}

/// Why a template could not be parsed, or does not fit its route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template {template:?}: {cause}")]
pub struct TemplateError {
    template: String,
    cause: String,
}

/// Why a template could not be rendered for one event (the event is dead-lettered, the template
/// named).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template {template:?}: {cause}")]
pub struct RenderError {
    template: String,
    cause: String,
}

impl std::str::FromStr for Template {
    type Err = TemplateError;

    fn from_str(text: &str) -> Result<Self, TemplateError> {
        let fail = |cause: String| TemplateError {
            template: text.to_owned(),
            cause,
        };
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => return Err(fail("a lone `}` (write `}}` for a literal brace)".into())),
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some('{') | None => {
                                return Err(fail(
                                    "a `{` without its `}` (write `{{` for a literal brace)".into(),
                                ))
                            }
                            Some(c) => name.push(c),
                        }
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(placeholder(&name).map_err(fail)?);
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        if parts.is_empty() {
            return Err(fail("empty".into()));
        }
        Ok(Template {
            text: text.to_owned(),
            parts,
        })
    }
}

fn placeholder(name: &str) -> Result<Part, String> {
    Ok(match name {
        "channel" => Part::Channel,
        "type" => Part::Type,
        "source" => Part::Source,
        "key" => Part::Key,
        "id" => Part::Id,
        "stream" => Part::Stream,
        "tag" => Part::Tag,
        "minute" => Part::Minute,
        "hour" => Part::Hour,
        "day" => Part::Day,
        _ => {
            if let Some(index) = name
                .strip_prefix("channel[")
                .and_then(|r| r.strip_suffix(']'))
            {
                let n = index
                    .parse()
                    .map_err(|_| format!("{{{name}}}: a segment index is a number from 0"))?;
                Part::Segment(n)
            } else if let Some(path) = name.strip_prefix("data.") {
                let path: Vec<String> = path.split('.').map(str::to_owned).collect();
                if path.iter().any(|p| p.is_empty()) {
                    return Err(format!("{{{name}}}: an empty field name"));
                }
                Part::Data(path)
            } else {
                return Err(format!(
                    "unknown placeholder {{{name}}} (known: channel, channel[N], type, source, key, id, stream, tag, data.<field>, minute, hour, day; a literal brace is doubled)"
                ));
            }
        }
    })
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Template {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where the hash tag of a template's keys comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagSource {
    /// `{tag}`: always the stream's slot.
    StreamTag,
    /// `{stream}` first: the stream's slot when the stream name has a hash tag.
    StreamName,
    /// A literal tag (`{{orders}}:…`): the slot of that tag.
    Literal(String),
    /// A brace whose tag depends on the event: any slot.
    Unknown,
    /// No tag: the slot of the whole key.
    None,
}

/// What one event offers a template; `data` is parsed once, on first use.
pub struct Scope<'e> {
    event: &'e Event<'e>,
    stream: &'e str,
    data: Option<Option<serde_json::Value>>,
}

impl<'e> Scope<'e> {
    /// The event read from `stream`.
    pub fn new(event: &'e Event<'e>, stream: &'e str) -> Self {
        Scope {
            event,
            stream,
            data: None,
        }
    }

    /// The event.
    pub fn event(&self) -> &'e Event<'e> {
        self.event
    }

    /// `data`, parsed (it was validated as an object when decoded).
    pub fn data(&mut self) -> Option<&serde_json::Value> {
        self.data
            .get_or_insert_with(|| serde_json::from_str(&self.event.data).ok())
            .as_ref()
    }
}

impl Template {
    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether it names a time bucket (`{minute}`, `{hour}` or `{day}`).
    pub fn has_time_bucket(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Minute | Part::Hour | Part::Day))
    }

    /// Where the hash tag of the keys it renders comes from (Redis Cluster hashes a key by its
    /// first `{…}`): what decides whether they share their stream's slot.
    pub fn hash_tag_source(&self) -> TagSource {
        for part in &self.parts {
            match part {
                Part::Tag => return TagSource::StreamTag,
                Part::Stream => return TagSource::StreamName,
                Part::Literal(text) => {
                    if let Some(open) = text.find('{') {
                        return match text[open + 1..].find('}') {
                            Some(len) if len > 0 => {
                                TagSource::Literal(text[open + 1..open + 1 + len].to_owned())
                            }
                            _ => TagSource::Unknown,
                        };
                    }
                }
                _ => {}
            }
        }
        TagSource::None
    }

    /// Refuses a channel segment that no channel matching `pattern` has.
    pub fn check(&self, pattern: &ChannelPattern) -> Result<(), TemplateError> {
        let (_, most) = pattern.segment_bounds();
        let most = most.unwrap_or(crate::event::channel::MAX_SEGMENTS);
        for part in &self.parts {
            if let Part::Segment(n) = part {
                if *n >= most {
                    return Err(TemplateError {
                        template: self.text.clone(),
                        cause: format!(
                            "{{channel[{n}]}} is past the end of every channel matching {pattern} (at most {most} segments, counted from 0)"
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Whether it names nothing but the channel and its segments: a key a gateway can name from
    /// the topic a browser asks for.
    pub fn names_channel_only(&self) -> bool {
        self.parts
            .iter()
            .all(|p| matches!(p, Part::Literal(_) | Part::Channel | Part::Segment(_)))
    }

    /// The key it names for every channel of `topic`, when the topic fixes everything it needs
    /// (`flow:{channel[1]}` and `flow.42.#` give `flow:42`); `None` when a wildcard or another
    /// placeholder leaves it open.
    pub fn render_topic(&self, topic: &ChannelPattern) -> Option<String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Channel if topic.is_exact() => out.push_str(topic.as_str()),
                Part::Segment(n) => out.push_str(topic.literal_segment(*n)?),
                _ => return None,
            }
        }
        Some(out)
    }

    /// A Redis glob (`PSUBSCRIBE`) matching everything it renders for the channels of `topic`:
    /// what the topic fixes is written out, the rest is `*` (glob characters of the literal text
    /// escaped).
    pub fn glob_for(&self, topic: &ChannelPattern) -> String {
        let mut glob = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => {
                    for c in s.chars() {
                        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                            glob.push('\\');
                        }
                        glob.push(c);
                    }
                }
                Part::Channel => glob.push_str(&topic.redis_glob()),
                Part::Segment(n) => glob.push_str(topic.literal_segment(*n).unwrap_or("*")),
                _ => glob.push('*'),
            }
        }
        glob
    }

    /// Renders the template for one event into `out` (cleared first).
    pub fn render(&self, scope: &mut Scope<'_>, out: &mut String) -> Result<(), RenderError> {
        out.clear();
        let fail = |cause: String| RenderError {
            template: self.text.clone(),
            cause,
        };
        let e = scope.event;
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Channel => out.push_str(&e.channel),
                Part::Segment(n) => match e.channel.split('.').nth(*n) {
                    Some(s) => out.push_str(s),
                    None => return Err(fail(format!("channel {} has no segment {n}", e.channel))),
                },
                Part::Type => out.push_str(&e.event_type),
                Part::Source => out.push_str(&e.source),
                Part::Key => out.push_str(e.key()),
                Part::Id => {
                    let _ = write!(out, "{}", e.id);
                }
                Part::Stream => out.push_str(scope.stream),
                Part::Tag => {
                    let tag = crate::stream::keys::hash_tag(scope.stream).unwrap_or(scope.stream);
                    out.push('{');
                    out.push_str(tag);
                    out.push('}');
                }
                Part::Minute | Part::Hour | Part::Day => bucket(part, e.time, out),
                Part::Data(path) => {
                    let mut value = scope.data();
                    for field in path {
                        value = value.and_then(|v| v.get(field));
                    }
                    match value {
                        Some(serde_json::Value::String(s)) => out.push_str(s),
                        Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                            let _ = write!(out, "{v}");
                        }
                        Some(v) => {
                            return Err(fail(format!(
                                "data.{} is {}, not a string, number or boolean",
                                path.join("."),
                                kind(v)
                            )))
                        }
                        None => {
                            return Err(fail(format!("the event has no data.{}", path.join("."))))
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
        _ => "a scalar",
    }
}

/// `{minute}`, `{hour}` or `{day}` of `time`, in UTC.
fn bucket(part: &Part, time: OffsetDateTime, out: &mut String) {
    let t = time.to_offset(time::UtcOffset::UTC);
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}",
        t.year(),
        u8::from(t.month()),
        t.day()
    );
    if matches!(part, Part::Hour | Part::Minute) {
        let _ = write!(out, "T{:02}", t.hour());
    }
    if matches!(part, Part::Minute) {
        let _ = write!(out, ":{:02}", t.minute());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_globs_from_a_topic() {
        let t = |s: &str| s.parse::<Template>().unwrap();
        let p = |s: &str| s.parse::<ChannelPattern>().unwrap();
        assert_eq!(
            t("flow:{channel[1]}").render_topic(&p("flow.42.#")),
            Some("flow:42".into())
        );
        assert_eq!(
            t("h:{channel}").render_topic(&p("a.b")),
            Some("h:a.b".into())
        );
        assert_eq!(t("h:{channel}").render_topic(&p("a.*")), None);
        assert_eq!(t("flow:{channel[1]}").render_topic(&p("flow.*")), None);
        assert_eq!(t("h:{type}").render_topic(&p("a")), None);
        assert!(t("{{x}}:{channel[0]}").names_channel_only());
        assert!(!t("x:{data.id}").names_channel_only());
        assert_eq!(
            t("fleet:{channel}").glob_for(&p("flow.*.progress")),
            "fleet:flow.*.progress"
        );
        assert_eq!(t("fleet:{channel}").glob_for(&p("user.#")), "fleet:user*");
        assert_eq!(t("o:{channel[1]}").glob_for(&p("order.7")), "o:7");
        assert_eq!(t("o:{channel[1]}").glob_for(&p("order.*")), "o:*");
        assert_eq!(t("x?[{type}]").glob_for(&p("a")), "x\\?\\[*\\]");
        assert_eq!(DEFAULT_CHANNEL.as_str(), "fleet:{channel}");
    }
    use std::borrow::Cow;

    fn event() -> Event<'static> {
        Event {
            id: uuid::Uuid::nil(),
            event_type: Cow::Borrowed("flow.progress"),
            channel: Cow::Borrowed("flow.7f3c.progress"),
            source: Cow::Borrowed("agent"),
            time: time::macros::datetime!(2026-11-26 12:25:59.5 +01:00),
            data: Cow::Borrowed(r#"{"step":3,"who":{"name":"ana"},"done":false,"list":[1]}"#),
            key: None,
            correlation_id: None,
        }
    }

    fn render(text: &str) -> Result<String, String> {
        let t: Template = text.parse().map_err(|e: TemplateError| e.to_string())?;
        let e = event();
        let mut out = String::new();
        t.render(&mut Scope::new(&e, "{orders}:events"), &mut out)
            .map_err(|e| e.to_string())?;
        Ok(out)
    }

    #[test]
    fn renders_every_placeholder() {
        assert_eq!(
            render("flow:{channel[1]}:state").unwrap(),
            "flow:7f3c:state"
        );
        assert_eq!(
            render("{channel}|{type}|{source}|{key}|{id}").unwrap(),
            "flow.7f3c.progress|flow.progress|agent|flow.7f3c.progress|00000000-0000-0000-0000-000000000000"
        );
        assert_eq!(
            render("s:{data.step}:{data.who.name}:{data.done}").unwrap(),
            "s:3:ana:false"
        );
        assert_eq!(
            render("{minute} {hour} {day}").unwrap(),
            "2026-11-26T11:25 2026-11-26T11 2026-11-26"
        );
        assert_eq!(render("{stream}:state").unwrap(), "{orders}:events:state");
    }

    #[test]
    fn doubled_braces_are_literal_for_cluster_hash_tags() {
        assert_eq!(
            render("{{orders}}:flow:{channel[1]}").unwrap(),
            "{orders}:flow:7f3c"
        );
        assert_eq!(render("a}}b{{c").unwrap(), "a}b{c");
    }

    #[test]
    fn tag_keeps_a_key_in_its_streams_slot_tagged_or_not() {
        use crate::stream::keys::slot;
        let t: Template = "flow:{tag}:{channel[1]}:state".parse().unwrap();
        let e = event();
        let mut out = String::new();
        for stream in ["{orders}:events", "events:{0}", "plain-events"] {
            t.render(&mut Scope::new(&e, stream), &mut out).unwrap();
            assert_eq!(slot(&out), slot(stream), "{stream} -> {out}");
        }
        assert_eq!(out, "flow:{plain-events}:7f3c:state");
        let source = |text: &str| text.parse::<Template>().unwrap().hash_tag_source();
        assert_eq!(source("flow:{tag}:x"), TagSource::StreamTag);
        assert_eq!(source("{stream}:state"), TagSource::StreamName);
        assert_eq!(
            source("{{orders}}:x:{tag}"),
            TagSource::Literal("orders".into())
        );
        assert_eq!(source("x{{{channel}}}"), TagSource::Unknown);
        assert_eq!(source("flow:{channel[1]}:state"), TagSource::None);
    }

    #[test]
    fn malformed_templates_are_refused_with_the_reason() {
        for (text, why) in [
            ("flow:{channel", "without its `}`"),
            ("flow:}", "lone `}`"),
            ("{nope}", "unknown placeholder {nope}"),
            ("{channel[x]}", "segment index"),
            ("{data.}", "empty field"),
            ("", "empty"),
        ] {
            let err = text.parse::<Template>().unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn segments_are_checked_against_the_route_pattern() {
        let t: Template = "x:{channel[3]}".parse().unwrap();
        let err = t
            .check(&"flow.*.progress".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("past the end"), "{err}");
        // After `#` a segment may or may not be there: decided per event.
        t.check(&"flow.#".parse().unwrap()).unwrap();
        assert!(render("x:{channel[3]}")
            .unwrap_err()
            .contains("no segment 3"));
    }

    #[test]
    fn event_dependent_gaps_name_the_template() {
        let err = render("s:{data.missing}").unwrap_err();
        assert!(
            err.contains("s:{data.missing}") && err.contains("no data.missing"),
            "{err}"
        );
        assert!(render("{data.list}").unwrap_err().contains("an array"));
        assert!(render("{data.who}").unwrap_err().contains("an object"));
    }
}
