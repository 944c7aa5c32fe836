//! The reclaimer: every `claim_interval_ms` it takes over entries pending longer than
//! `claim_idle_ms` (XAUTOCLAIM, one pipelined round trip per slice of streams), whichever consumer
//! owns them (a crashed one, or this one for an entry it could not apply), and hands them to the
//! pipeline like new ones, with their delivery count from the pending entry list, so an entry
//! that keeps failing reaches `max_deliveries`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::runtime::metrics as m;
use crate::source::entry::{frame_text, parse_entry_list, Entry, ReplyBuf, ReplyError};
use crate::source::read::NodeReader;
use crate::source::read_conn::ReadError;
use crate::source::reply::Frame;
use crate::source::{Read, SourceError};

impl NodeReader {
    /// XAUTOCLAIM over the next slices of streams with a pass in progress, one pipelined round
    /// trip per slice, until something is claimed or the pass is complete (then the next pass
    /// starts after `claim_interval_ms`).
    pub(crate) async fn reclaim(&mut self, readable: &[Arc<str>]) -> Result<Read, SourceError> {
        if self.claim_cursors.is_empty() {
            for s in readable {
                self.claim_cursors.insert(s.clone(), "0-0".to_owned());
            }
        }
        loop {
            let slice: Vec<(Arc<str>, String)> = self
                .claim_cursors
                .iter()
                .filter(|(k, _)| readable.binary_search(k).is_ok())
                .take(self.slice_len())
                .map(|(k, c)| (k.clone(), c.clone()))
                .collect();
            if slice.is_empty() {
                // The pass is complete: the next one starts after claim_interval_ms.
                self.claim_cursors.clear();
                self.next_claim =
                    Instant::now() + Duration::from_millis(self.who.tuning.claim_interval_ms);
                return Ok(Read::default());
            }
            let count = (self.budget() / slice.len()).max(1);
            let cmds: Vec<redis::Cmd> = slice
                .iter()
                .map(|(stream, cursor)| {
                    let mut cmd = redis::cmd("XAUTOCLAIM");
                    cmd.arg(&**stream)
                        .arg(&self.who.group)
                        .arg(&self.who.consumer)
                        .arg(self.who.tuning.claim_idle_ms)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(count);
                    cmd
                })
                .collect();
            self.last_slice = slice.iter().map(|(k, _)| k.clone()).collect();
            let replies = self.reads.pipeline(&cmds).await?;
            let reply = ReplyBuf {
                buf: &replies.buf,
                elided: &replies.elided,
            };
            let mut out = Read {
                entries: Vec::new(),
                reclaimed: true,
            };
            for ((stream, _), frame) in slice.iter().zip(replies.frames) {
                // `[cursor, [entries], [deleted ids]]`, read like XREADGROUP's entries.
                let parts = match frame {
                    Frame::Array(parts) => parts,
                    Frame::Error(r) => {
                        return Err(ReadError::Server(
                            String::from_utf8_lossy(&replies.buf[r]).into_owned(),
                        )
                        .into())
                    }
                    _ => return Err(ReplyError("XAUTOCLAIM reply").into()),
                };
                let mut parts = parts.into_iter();
                let next = match parts.next() {
                    Some(cursor) => {
                        String::from_utf8_lossy(frame_text(&replies.buf, &cursor)?).into_owned()
                    }
                    None => return Err(ReplyError("XAUTOCLAIM cursor").into()),
                };
                if next == "0-0" {
                    self.claim_cursors.remove(stream);
                } else {
                    self.claim_cursors.insert(stream.clone(), next);
                }
                let mut entries =
                    parse_entry_list(reply, stream, parts.next().unwrap_or(Frame::Null))?;
                if !entries.is_empty() {
                    tracing::info!(stream = %stream, entries = entries.len(), "reclaimed idle pending entries");
                    metrics::counter!(m::RECLAIMED, "stream" => self.labels.of(stream).to_string())
                        .increment(entries.len() as u64);
                    self.set_deliveries(stream, &mut entries).await?;
                    out.entries.extend(entries);
                }
            }
            self.sized(replies.buf.len(), out.entries.len());
            if !out.entries.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Pending entries re-read at start or reclaimed have been delivered before: take their
    /// delivery count from the group's pending entry list.
    pub(crate) async fn set_deliveries(
        &mut self,
        stream: &str,
        entries: &mut [Entry],
    ) -> Result<(), SourceError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(&self.who.group)
            .arg(first.id.to_string())
            .arg(last.id.to_string())
            .arg(entries.len())
            .arg(&self.who.consumer)
            .query_async(&mut self.conn)
            .await?;
        let counts: HashMap<String, u64> = rows.into_iter().map(|(id, _, _, n)| (id, n)).collect();
        for e in entries.iter_mut() {
            e.deliveries = counts.get(&e.id.to_string()).copied().unwrap_or(1);
        }
        Ok(())
    }
}
