//! Discovery: the streams `FLEET_STREAMS` names. Keys as they are (created with the group,
//! `MKSTREAM`); globs matched with `SCAN … TYPE stream` on every master of a cluster (a `SCAN`
//! sees one node's keys), rescanned every `discover_interval_ms` so that new streams are
//! picked up without a restart. Dead letter streams never match.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::runtime::metrics as m;
use crate::source::{scan_streams, Source, SourceError, StreamSpec};
use crate::stream::keys::is_dlq_stream;

/// Most keys reported as not UTF-8 (each once); beyond, they are skipped silently.
const MAX_WARNED_KEYS: usize = 1000;

impl Source {
    /// Finds the streams to consume; makes sure the group exists on streams not seen before.
    pub async fn discover(&mut self) -> Result<(), SourceError> {
        let mut found: BTreeMap<Arc<str>, Arc<str>> = BTreeMap::new();
        for spec in self.specs.clone() {
            let label: Arc<str> = Arc::from(spec.as_str());
            match &spec {
                StreamSpec::Key(key) => {
                    found.entry(Arc::from(key.as_str())).or_insert(label);
                }
                StreamSpec::Glob(glob) => {
                    for key in self.scan(glob).await? {
                        if !is_dlq_stream(&key) {
                            found
                                .entry(Arc::from(key.as_str()))
                                .or_insert(label.clone());
                        }
                    }
                }
            }
        }
        let known = std::mem::take(&mut self.streams);
        let mut new = Vec::new();
        for (key, label) in &found {
            match known.binary_search(key) {
                Ok(i) => self.streams.push(known[i].clone()),
                Err(_) => {
                    new.push(key.clone());
                    self.streams.push(key.clone());
                }
            }
            self.labels.set(key, label);
        }
        if !new.is_empty() {
            for stream in &new {
                tracing::info!(stream = %stream, group = %self.who.group, "consuming stream");
            }
            self.repair(&new).await?;
        }
        let streams = &self.streams;
        self.missing.retain(|k, _| streams.binary_search(k).is_ok());
        self.labels.retain(streams);
        self.report_missing();
        metrics::gauge!(m::STREAMS).set(self.streams.len() as f64);
        self.published.send_replace(self.streams.clone());
        self.next_discovery =
            Instant::now() + Duration::from_millis(self.who.tuning.discover_interval_ms);
        Ok(())
    }

    /// The stream keys matching `glob`, on every master of a cluster (keys that are not UTF-8
    /// are skipped, each reported once).
    async fn scan(&mut self, glob: &str) -> Result<Vec<String>, SourceError> {
        let mut out = Vec::new();
        for key in scan_streams(&mut self.conn, glob).await? {
            match String::from_utf8(key) {
                Ok(key) => out.push(key),
                Err(e) => {
                    let key = e.into_bytes();
                    if self.warned.len() < MAX_WARNED_KEYS && self.warned.insert(key.clone()) {
                        tracing::warn!(key = %String::from_utf8_lossy(&key), glob, "skipping a stream whose name is not UTF-8");
                    }
                }
            }
        }
        Ok(out)
    }
}
