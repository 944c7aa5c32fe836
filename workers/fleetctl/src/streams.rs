//! Which streams a command looks at: `--streams` names keys or globs, as `FLEET_STREAMS` does for
//! the workers. A glob is matched with `SCAN MATCH <glob> TYPE stream` (only streams: the hashes
//! and sets beside a stream never match) and skips dead letter streams (`<stream>:dlq`), as the
//! workers' globs do; on a Redis Cluster, on every master. A named key is checked: a missing one is
//! reported, not silently empty.

use std::collections::BTreeSet;

use anyhow::Context;

use crate::progress::Progress;
use streamfleet::runtime::conn::Conn;
use streamfleet::DLQ_SUFFIX;

/// Whether a `--streams` item is a glob (the workers' rule).
pub fn is_glob(item: &str) -> bool {
    item.contains(['*', '?', '['])
}

/// Refuses empty items before anything connects.
pub fn validate(items: &[String], flag: &str) -> Result<(), String> {
    if items.is_empty() {
        return Err(format!("{flag}: name at least one stream or glob"));
    }
    if items.iter().any(|s| s.trim().is_empty()) {
        return Err(format!("{flag}: an empty stream name"));
    }
    Ok(())
}

/// Refuses an empty stream key (`--stream ''`, an unset variable in a script): Redis would take
/// it as a key like any other, and a publish would write to it.
pub fn validate_key(key: &str, flag: &str) -> Result<(), String> {
    if key.trim().is_empty() {
        return Err(format!("{flag}: an empty stream name"));
    }
    Ok(())
}

/// What `--streams` found.
#[derive(Debug, Default)]
pub struct Found {
    /// Stream keys, sorted, each once.
    pub streams: Vec<String>,
    /// The ones named as keys (the others were matched by a glob).
    pub named: BTreeSet<String>,
    /// Named keys that hold no stream: (key, what is there: `none` or its type).
    pub missing: Vec<(String, String)>,
    /// Globs that matched no stream.
    pub unmatched: Vec<String>,
}

/// Resolves `items` (keys and globs) to stream keys.
pub async fn resolve(conn: &mut Conn, items: &[String]) -> anyhow::Result<Found> {
    let mut found = Found::default();
    let mut streams = BTreeSet::new();
    let named: Vec<&str> = items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !is_glob(s))
        .collect();
    if !named.is_empty() {
        let mut pipe = redis::pipe();
        for key in &named {
            pipe.cmd("TYPE").arg(*key);
        }
        let types: Vec<String> = pipe
            .query_async(conn)
            .await
            .context("TYPE of the named streams")?;
        for (key, kind) in named.iter().zip(types) {
            if kind == "stream" {
                streams.insert(key.to_string());
                found.named.insert(key.to_string());
            } else {
                found.missing.push((key.to_string(), kind));
            }
        }
    }
    let mut progress = Progress::new("scanning for streams", None);
    for glob in items.iter().map(|s| s.trim()).filter(|s| is_glob(s)) {
        let matched = scan(conn, glob, &mut progress).await?;
        if matched.is_empty() {
            found.unmatched.push(glob.to_owned());
        }
        streams.extend(matched);
    }
    progress.finish();
    found.streams = streams.into_iter().collect();
    Ok(found)
}

/// The streams matching `glob`, dead letter streams and keys that are not UTF-8 left out. On a
/// cluster every master is scanned (a `SCAN` sees one node's keys), as the workers' discovery
/// does, so that both see the same streams. The count shown moves once the scan is complete.
pub async fn scan(
    conn: &mut Conn,
    glob: &str,
    progress: &mut Progress,
) -> anyhow::Result<Vec<String>> {
    let keys = streamfleet::scan_streams(conn, glob)
        .await
        .with_context(|| format!("SCAN MATCH {glob} TYPE stream"))?;
    let out: Vec<String> = keys
        .into_iter()
        .filter_map(|k| String::from_utf8(k).ok())
        .filter(|k| !k.ends_with(DLQ_SUFFIX))
        .collect();
    progress.add(out.len() as u64);
    Ok(out)
}

/// `--streams` and `--group`, as the inspecting commands take them.
#[derive(Debug, clap::Args)]
pub struct Selection {
    /// Comma-separated stream keys or globs (`orders:*`; dead letter streams never match).
    #[arg(long, env = "FLEET_STREAMS", value_delimiter = ',', required = true)]
    pub streams: Vec<String>,

    /// Only this consumer group [default: every group of each stream].
    #[arg(long)]
    pub group: Option<String>,
}

impl Selection {
    pub fn validate(&self) -> Result<(), String> {
        validate(&self.streams, "--streams")?;
        if self.group.as_deref().is_some_and(|g| g.trim().is_empty()) {
            return Err("--group: must not be empty".into());
        }
        Ok(())
    }
}

impl Found {
    /// Named keys that hold no stream, in one line each (what is there, what to do).
    pub fn missing_lines(&self) -> Vec<String> {
        self.missing
            .iter()
            .map(|(key, kind)| match kind.as_str() {
                "none" => format!("{key}: no such stream (check the name; `fleetctl groups create` creates a stream with its group)"),
                kind => format!("{key}: holds a {kind}, not a stream"),
            })
            .collect()
    }

    /// The error of `status`, `lag`, `pending` and `checkpoints` when a named key holds no
    /// stream: one line naming each such key, returned after the rest is shown (exit 1).
    pub fn missing_error(&self) -> Option<String> {
        let lines = self.missing_lines();
        (!lines.is_empty()).then(|| lines.join("; "))
    }

    pub fn json(&self) -> (serde_json::Value, serde_json::Value) {
        (
            serde_json::json!(self
                .missing
                .iter()
                .map(|(k, t)| serde_json::json!({"key": k, "type": t}))
                .collect::<Vec<_>>()),
            serde_json::json!(self.unmatched),
        )
    }
}

/// The streams `item` names (a key or a glob), dead letter streams included: what retention
/// covers. Keys that are not UTF-8 are left out.
pub async fn resolve_with_dlq(conn: &mut Conn, item: &str) -> anyhow::Result<Vec<String>> {
    let item = item.trim();
    if !is_glob(item) {
        let kind: String = redis::cmd("TYPE").arg(item).query_async(conn).await?;
        return Ok(if kind == "stream" {
            vec![item.to_owned()]
        } else {
            Vec::new()
        });
    }
    let keys = streamfleet::scan_streams(conn, item)
        .await
        .with_context(|| format!("SCAN MATCH {item} TYPE stream"))?;
    let mut out: Vec<String> = keys
        .into_iter()
        .filter_map(|k| String::from_utf8(k).ok())
        .collect();
    out.sort();
    Ok(out)
}
