//! The consumer group on each stream. A group is created only where it is missing (creating one
//! needs memory, which a Redis at `maxmemory` refuses, while reading does not). A group that
//! disappears (`XGROUP DESTROY`, or a stream deleted or expired and written again) is found by the
//! `NOGROUP` of the next read and created again where the stream's checkpoint says, not from the
//! start, so that nothing settled is delivered again; until then the worker is not ready and the
//! other streams keep flowing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{RedisResult, Value};

use crate::runtime::health::Fault;
use crate::source::{Source, SourceError, StreamSpec};
use crate::stream::groups::find_group;

/// How long a stream whose group could not be created waits before the next attempt.
const GROUP_RETRY: Duration = Duration::from_secs(1);

impl Source {
    /// Makes sure the group exists on each of `keys`, creating it where it is missing (at the
    /// stream's checkpoint if there is one). Streams where it cannot be created now are kept out
    /// of the reads until it can; glob matches whose key is gone are dropped.
    pub(crate) async fn repair(&mut self, keys: &[Arc<str>]) -> Result<(), SourceError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for key in keys {
            pipe.cmd("XINFO").arg("GROUPS").arg(&**key);
        }
        let infos: Vec<RedisResult<Value>> = pipe.query_async(&mut self.conn).await?;
        let mut gone = Vec::new();
        for (key, info) in keys.iter().zip(infos) {
            let exists = match info {
                Ok(reply) => {
                    if matches!(find_group(&reply, &self.who.group), Ok(Some(_))) {
                        self.missing.remove(key);
                        continue;
                    }
                    true
                }
                Err(e) if e.to_string().contains("no such key") => false,
                Err(e) => {
                    // E.g. the key holds another type: only an operator can fix it.
                    self.missing
                        .insert(key.clone(), (Instant::now() + GROUP_RETRY, e.to_string()));
                    continue;
                }
            };
            let is_key = self
                .specs
                .iter()
                .any(|s| *s == StreamSpec::Key(key.to_string()));
            if !exists && !is_key {
                gone.push(key.clone());
                continue;
            }
            match self.create_group(key, !exists).await {
                Ok(()) => {
                    self.missing.remove(key);
                    // Creating a group needs memory: Redis has some again.
                    self.health.clear(Fault::RedisOutOfMemory);
                }
                Err(e) => {
                    if e.code() == Some("OOM") {
                        self.health
                            .raise(Fault::RedisOutOfMemory, &"Redis out of memory (maxmemory reached): consumer groups cannot be created");
                    }
                    tracing::debug!(stream = %key, error = %e, "consumer group not created yet");
                    self.missing
                        .insert(key.clone(), (Instant::now() + GROUP_RETRY, e.to_string()));
                }
            }
        }
        if !gone.is_empty() {
            self.streams.retain(|s| !gone.contains(s));
            self.missing.retain(|k, _| !gone.contains(k));
            for key in gone {
                tracing::info!(stream = %key, "stream gone: no longer consumed");
            }
        }
        self.report_missing();
        Ok(())
    }

    /// Creates the group on `key` where its checkpoint says (else `start_from`).
    async fn create_group(&mut self, key: &Arc<str>, mkstream: bool) -> Result<(), SourceError> {
        let checkpoint =
            (self.resume_from)(key.clone())
                .await
                .map_err(|error| SourceError::Checkpoint {
                    stream: key.clone(),
                    error,
                })?;
        let start = match checkpoint {
            Some(id) => id.to_string(),
            None => self.who.tuning.start_from.as_id().to_owned(),
        };
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(&**key)
            .arg(&self.who.group)
            .arg(&start);
        if mkstream {
            cmd.arg("MKSTREAM");
        }
        match cmd.query_async::<()>(&mut self.conn).await {
            Ok(()) => {
                let from = if checkpoint.is_some() {
                    "its checkpoint"
                } else {
                    "start_from"
                };
                tracing::info!(stream = %key, group = %self.who.group, start = %start, from, "consumer group created");
                Ok(())
            }
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Raises or clears the missing-group fault.
    pub(crate) fn report_missing(&self) {
        match self.missing.iter().next() {
            None => self.health.clear(Fault::GroupMissing),
            Some((first, (_, why))) => self.health.raise(
                Fault::GroupMissing,
                &format!(
                    "consumer group {} missing on {} stream(s) and not created yet (first: {first}: {why})",
                    self.who.group,
                    self.missing.len()
                ),
            ),
        }
    }

    /// The streams that can be read now (their group exists).
    pub(crate) fn readable(&self) -> Vec<Arc<str>> {
        if self.missing.is_empty() {
            return self.streams.clone();
        }
        self.streams
            .iter()
            .filter(|s| !self.missing.contains_key(*s))
            .cloned()
            .collect()
    }
}
