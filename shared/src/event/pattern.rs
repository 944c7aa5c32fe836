//! Channel patterns (contract section 2) and the "most specific wins" table that routing and
//! backpressure rules share.
//!
//! `*` matches exactly one segment, `#` zero or more, anything else itself. When several patterns
//! match, the one with the fewest wildcards wins, then the one with the most segments, then the
//! one that came first in the file.

use std::fmt;
use std::str::FromStr;

use crate::event::channel::{self, ChannelError, MAX_SEGMENTS};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Many,
}

/// A parsed channel pattern such as `flow.*.progress` or `user.#`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPattern {
    text: String,
    segments: Vec<Segment>,
}

/// Why a pattern could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid channel pattern {pattern:?}: {cause}")]
pub struct PatternError {
    pattern: String,
    cause: ChannelError,
}

impl FromStr for ChannelPattern {
    type Err = PatternError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |cause| PatternError {
            pattern: text.to_owned(),
            cause,
        };
        if text.is_empty() {
            return Err(fail(ChannelError::Empty));
        }
        let mut segments = Vec::new();
        for (i, part) in text.split('.').enumerate() {
            if i >= MAX_SEGMENTS {
                return Err(fail(ChannelError::TooManySegments));
            }
            let segment = match part {
                "*" => Segment::One,
                // `#.#` means the same as `#`; collapsing keeps matching linear in practice.
                "#" if segments.last() == Some(&Segment::Many) => continue,
                "#" => Segment::Many,
                literal => {
                    channel::check_segment(i + 1, literal).map_err(fail)?;
                    Segment::Literal(literal.to_owned())
                }
            };
            segments.push(segment);
        }
        Ok(ChannelPattern {
            text: text.to_owned(),
            segments,
        })
    }
}

impl fmt::Display for ChannelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for ChannelPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl ChannelPattern {
    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the (already valid) channel matches this pattern.
    pub fn matches(&self, channel: &str) -> bool {
        let mut parts = [""; MAX_SEGMENTS];
        let mut n = 0;
        for part in channel.split('.') {
            if n == MAX_SEGMENTS {
                return false;
            }
            parts[n] = part;
            n += 1;
        }
        match_segments(&self.segments, &parts[..n])
    }

    /// How many segments every matching channel has at least, and at most (`None`: up to the
    /// channel limit, after a `#`): a template naming segment `n` is checked against these.
    pub fn segment_bounds(&self) -> (usize, Option<usize>) {
        let fixed = self
            .segments
            .iter()
            .filter(|s| !matches!(s, Segment::Many))
            .count();
        let open = self.segments.iter().any(|s| matches!(s, Segment::Many));
        (fixed, (!open).then_some(fixed))
    }

    /// Segment `n` of every matching channel when the pattern fixes it (a literal with no `#`
    /// before it): what a gateway can name a key by, given a topic.
    pub fn literal_segment(&self, n: usize) -> Option<&str> {
        for (i, s) in self.segments.iter().enumerate() {
            match s {
                Segment::Many => return None,
                Segment::Literal(l) if i == n => return Some(l),
                _ if i == n => return None,
                _ => {}
            }
        }
        None
    }

    /// Whether it matches one channel only.
    pub fn is_exact(&self) -> bool {
        self.segments
            .iter()
            .all(|s| matches!(s, Segment::Literal(_)))
    }

    /// A Redis glob (`PSUBSCRIBE`) matching every channel the pattern matches, and perhaps more:
    /// a `#` becomes a `*` that also takes the dot on one side (`a.#` is `a*`, so that `a` itself
    /// matches; `#.a` is `*a`). Segments hold no glob character, so nothing needs escaping.
    pub fn redis_glob(&self) -> String {
        let mut glob = String::with_capacity(self.text.len());
        for (i, s) in self.segments.iter().enumerate() {
            let first_is_many = matches!(self.segments[0], Segment::Many);
            if i > 0 && !matches!(s, Segment::Many) && !(i == 1 && first_is_many) {
                glob.push('.');
            }
            match s {
                Segment::Literal(l) => glob.push_str(l),
                Segment::One | Segment::Many => glob.push('*'),
            }
        }
        glob
    }

    /// Whether every channel `other` matches, this pattern matches too: a JWT that grants
    /// `flow.#` grants the topic `flow.*.progress`. (A `#` of `other` is covered only by a `#`:
    /// conservative where only the empty channel, never valid, would differ.)
    pub fn covers(&self, other: &ChannelPattern) -> bool {
        fn go(p: &[Segment], t: &[Segment]) -> bool {
            match p.split_first() {
                None => t.is_empty(),
                Some((Segment::Many, rest)) => (0..=t.len()).any(|k| go(rest, &t[k..])),
                Some((Segment::One, rest)) => {
                    matches!(t.first(), Some(Segment::One | Segment::Literal(_)))
                        && go(rest, &t[1..])
                }
                Some((Segment::Literal(a), rest)) => {
                    matches!(t.first(), Some(Segment::Literal(b)) if a == b) && go(rest, &t[1..])
                }
            }
        }
        go(&self.segments, &other.segments)
    }

    /// Whether some channel matches both patterns: the routes a topic can receive events of.
    pub fn overlaps(&self, other: &ChannelPattern) -> bool {
        fn go(a: &[Segment], b: &[Segment]) -> bool {
            match (a.first(), b.first()) {
                (None, None) => true,
                (Some(Segment::Many), _) => go(&a[1..], b) || (!b.is_empty() && go(a, &b[1..])),
                (_, Some(Segment::Many)) => go(a, &b[1..]) || (!a.is_empty() && go(&a[1..], b)),
                (None, _) | (_, None) => false,
                (Some(x), Some(y)) => {
                    let fits = match (x, y) {
                        (Segment::Literal(x), Segment::Literal(y)) => x == y,
                        _ => true,
                    };
                    fits && go(&a[1..], &b[1..])
                }
            }
        }
        go(&self.segments, &other.segments)
    }

    /// Sort key: smaller is more specific (fewest wildcards, then most segments).
    fn specificity(&self) -> (usize, std::cmp::Reverse<usize>) {
        let wildcards = self
            .segments
            .iter()
            .filter(|s| !matches!(s, Segment::Literal(_)))
            .count();
        (wildcards, std::cmp::Reverse(self.segments.len()))
    }
}

fn match_segments(pattern: &[Segment], channel: &[&str]) -> bool {
    match pattern.split_first() {
        None => channel.is_empty(),
        Some((Segment::Many, rest)) => {
            (0..=channel.len()).any(|skip| match_segments(rest, &channel[skip..]))
        }
        Some((Segment::One, rest)) => !channel.is_empty() && match_segments(rest, &channel[1..]),
        Some((Segment::Literal(lit), rest)) => {
            channel.first() == Some(&lit.as_str()) && match_segments(rest, &channel[1..])
        }
    }
}

/// An ordered set of (pattern → value) rules where the most specific matching pattern wins.
#[derive(Debug, Clone)]
pub struct PatternTable<T> {
    /// Sorted by specificity; the sort is stable, so file order breaks ties.
    rules: Vec<(ChannelPattern, T)>,
}

impl<T> PatternTable<T> {
    /// Builds the table from rules in file order.
    pub fn new(rules: impl IntoIterator<Item = (ChannelPattern, T)>) -> Self {
        let mut rules: Vec<_> = rules.into_iter().collect();
        rules.sort_by_key(|(p, _)| p.specificity());
        PatternTable { rules }
    }

    /// The winning rule for `channel`, if any pattern matches.
    pub fn lookup(&self, channel: &str) -> Option<(&ChannelPattern, &T)> {
        self.rules
            .iter()
            .find(|(p, _)| p.matches(channel))
            .map(|(p, v)| (p, v))
    }

    /// Every rule, most specific first.
    pub fn iter(&self) -> impl Iterator<Item = (&ChannelPattern, &T)> {
        self.rules.iter().map(|(p, v)| (p, v))
    }

    /// Whether the table has no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ChannelPattern {
        s.parse().unwrap()
    }

    #[test]
    fn matching_table() {
        // (pattern, channel, expected)
        let cases = [
            ("user.#", "user", true),
            ("user.#", "user.42", true),
            ("user.#", "user.42.profile", true),
            ("user.#", "users.42", false),
            ("user.#", "admin.user", false),
            ("flow.*.progress", "flow.7f3c.progress", true),
            ("flow.*.progress", "flow.progress", false),
            ("flow.*.progress", "flow.a.b.progress", false),
            ("flow.*.progress", "flow.7f3c.progress.x", false),
            ("*", "a", true),
            ("*", "a.b", false),
            ("*.*", "a.b", true),
            ("*.*", "a", false),
            ("#", "a", true),
            ("#", "a.b.c.d", true),
            ("#.end", "end", true),
            ("#.end", "a.b.end", true),
            ("#.end", "a.b.end.x", false),
            ("a.#.z", "a.z", true),
            ("a.#.z", "a.b.z", true),
            ("a.#.z", "a.b.c.d.z", true),
            ("a.#.z", "a.b.c", false),
            ("a.#.z", "z.a.z", false),
            ("#.mid.#", "mid", true),
            ("#.mid.#", "x.mid.y", true),
            ("#.mid.#", "x.y.mid", true),
            ("#.mid.#", "x.middle.y", false),
            ("a.#.#.b", "a.b", true),
            ("a.#.*.b", "a.b", false),
            ("a.#.*.b", "a.x.b", true),
            ("a.*.#", "a", false),
            ("a.*.#", "a.x", true),
            ("a.*.#", "a.x.y.z", true),
            ("exact.match", "exact.match", true),
            ("exact.match", "exact.matches", false),
            ("#.a.#.b.#", "q.a.r.s.b", true),
            ("#.a.#.b.#", "b.a", false),
        ];
        for (pattern, channel, expected) in cases {
            assert_eq!(
                p(pattern).matches(channel),
                expected,
                "{pattern} vs {channel}"
            );
        }
    }

    #[test]
    fn coverage_overlap_and_globs() {
        // (grant, topic, covers)
        for (grant, topic, expected) in [
            ("flow.#", "flow.*.progress", true),
            ("flow.#", "flow", true),
            ("flow.#", "flows.1", false),
            ("#", "#", true),
            ("flow.*.progress", "flow.42.progress", true),
            ("flow.*.progress", "flow.*.progress", true),
            ("flow.42.progress", "flow.*.progress", false),
            ("flow.*.progress", "flow.#", false),
            ("flow.*", "flow.#", false),
            ("a.#.z", "a.b.#.z", true),
            ("#.z", "a.*.z", true),
            ("*.z", "#.z", false),
        ] {
            assert_eq!(
                p(grant).covers(&p(topic)),
                expected,
                "{grant} covers {topic}"
            );
        }
        for (a, b, expected) in [
            ("flow.*.progress", "flow.42.progress", true),
            ("flow.*.progress", "flow.#", true),
            ("flow.*.progress", "user.#", false),
            ("#.end", "a.#", true),
            ("a.*", "a.b.c", false),
            ("a.#", "b.#", false),
            ("#", "x.y", true),
        ] {
            assert_eq!(p(a).overlaps(&p(b)), expected, "{a} overlaps {b}");
            assert_eq!(p(b).overlaps(&p(a)), expected, "{b} overlaps {a}");
        }
        for (pattern, glob) in [
            ("flow.*.progress", "flow.*.progress"),
            ("user.#", "user*"),
            ("#.end", "*end"),
            ("#.mid.#", "*mid*"),
            ("a.#.z", "a*.z"),
            ("#", "*"),
            ("exact", "exact"),
        ] {
            assert_eq!(p(pattern).redis_glob(), glob, "{pattern}");
        }
        assert_eq!(p("flow.42.#").literal_segment(1), Some("42"));
        assert_eq!(p("flow.*.x").literal_segment(1), None);
        assert_eq!(p("#.x").literal_segment(1), None);
        assert!(p("a.b").is_exact() && !p("a.*").is_exact());
    }

    #[test]
    fn rejects_bad_patterns() {
        for bad in ["", "a..b", "Upper.#", "a.**", "a.#x", "a b"] {
            assert!(bad.parse::<ChannelPattern>().is_err(), "{bad:?}");
        }
        assert!(["x"; 17].join(".").parse::<ChannelPattern>().is_err());
    }

    #[test]
    fn most_specific_wins_then_file_order() {
        let table = PatternTable::new([
            (p("#"), "catch-all"),
            (p("user.#"), "user"),
            (p("user.*.profile"), "profile"),
            (p("user.42.profile"), "exact"),
            (p("flow.#"), "flow-first"),
            (p("flow.*"), "flow-star"),
            (p("a.b.*"), "longer"),
            (p("a.*"), "shorter"),
            (p("m.*.*"), "two-wildcards"),
        ]);
        let win = |c: &str| table.lookup(c).map(|(_, v)| *v);
        assert_eq!(win("user.42.profile"), Some("exact"));
        assert_eq!(win("user.7.profile"), Some("profile"));
        assert_eq!(win("user.7"), Some("user"));
        assert_eq!(win("other"), Some("catch-all"));
        // Same wildcard count and length: the file order decides.
        assert_eq!(win("flow.x"), Some("flow-first"));
        // `flow.#` also matches the bare `flow`; `flow.*` cannot.
        assert_eq!(win("flow"), Some("flow-first"));
        assert_eq!(win("a.b.c"), Some("longer"));
        assert_eq!(win("a.b"), Some("shorter"));
        // The contract counts wildcards first: one `#` beats two `*`.
        assert_eq!(win("m.x.y"), Some("catch-all"));
        let empty: PatternTable<()> = PatternTable::new([]);
        assert!(empty.lookup("x").is_none());
    }
}
