//! Checkpoints of a worker without PostgreSQL (the projector, the notifier): the hash
//! `<stream>:checkpoints` beside the stream (field: the consumer group, value: an entry id), so
//! that on Redis Cluster it shares the stream's hash slot and is written by the same script as
//! the effects. Same meaning as the `checkpoints` table: the group's low watermark, forward only,
//! the safe resume point `fleetctl replay` starts from.

use crate::source::entry::EntryId;

/// The hash holding the checkpoints of every group of `stream`.
pub fn key(stream: &str) -> String {
    format!("{stream}:checkpoints")
}

/// The checkpoint of `group` on `stream`, if one was written (an unreadable one is none).
pub async fn read(
    conn: &mut impl redis::aio::ConnectionLike,
    stream: &str,
    group: &str,
) -> redis::RedisResult<Option<EntryId>> {
    let raw: Option<String> = redis::cmd("HGET")
        .arg(key(stream))
        .arg(group)
        .query_async(conn)
        .await?;
    Ok(raw.and_then(|p| p.parse().ok()))
}
