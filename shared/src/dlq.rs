//! Dead letters (contract section 4): an entry that cannot be applied leaves the pipeline for
//! `<stream>:dlq` with its original fields and a reason, so it never wedges the stream and is
//! never lost.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::entry::Entry;

/// Suffix of a dead letter stream.
pub const DLQ_SUFFIX: &str = ":dlq";

/// Why an entry was dead-lettered; the `dlq_reason` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DlqReason {
    Invalid,
    UnsupportedVersion,
    TooLarge,
    MaxDeliveries,
    HandlerError,
}

impl DlqReason {
    /// The contract's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DlqReason::Invalid => "invalid",
            DlqReason::UnsupportedVersion => "unsupported_version",
            DlqReason::TooLarge => "too_large",
            DlqReason::MaxDeliveries => "max_deliveries",
            DlqReason::HandlerError => "handler_error",
        }
    }
}

/// The dead letter stream of `stream`.
pub fn dlq_stream(stream: &str) -> String {
    format!("{stream}{DLQ_SUFFIX}")
}

/// Whether `key` is itself a dead letter stream (never consumed by a glob).
pub fn is_dlq_stream(key: &str) -> bool {
    key.ends_with(DLQ_SUFFIX)
}

/// Appends the XADD of one dead letter to `pipe`.
pub fn add_dead_letter(
    pipe: &mut redis::Pipeline,
    entry: &Entry,
    group: &str,
    reason: DlqReason,
    error: &str,
) {
    let cmd = pipe.cmd("XADD").arg(dlq_stream(&entry.stream)).arg("*");
    for (k, v) in entry.fields.iter().flat_map(|f| f.iter()) {
        // The original fields stay unchanged; a field that collides with ours is kept under a
        // prefixed name rather than silently overwritten.
        if k.starts_with(b"dlq_") {
            cmd.arg([b"orig_".as_slice(), k].concat()).arg(v);
        } else {
            cmd.arg(k).arg(v);
        }
    }
    let now = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    cmd.arg("dlq_reason")
        .arg(reason.as_str())
        .arg("dlq_error")
        .arg(error)
        .arg("dlq_stream")
        .arg(&*entry.stream)
        .arg("dlq_entry_id")
        .arg(entry.id.to_string())
        .arg("dlq_group")
        .arg(group)
        .arg("dlq_deliveries")
        .arg(entry.deliveries)
        .arg("dlq_at")
        .arg(now)
        .ignore();
}
