//! Checkpoints of a worker without PostgreSQL (the projector, the notifier): the hash
//! `<stream>:checkpoints` beside the stream (field: the consumer group, value: an entry id), so
//! that on Redis Cluster it shares the stream's hash slot and is written by the same script as
//! the effects. Same meaning as the `checkpoints` table: the group's low watermark, forward only,
//! the safe resume point `fleetctl replay` starts from.

use crate::stream::EntryId;

/// The hash holding the checkpoints of every group of `stream`.
pub fn key(stream: &str) -> String {
    crate::stream::keys::checkpoints_key(stream)
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

/// Moves `group`'s checkpoint of a stream forward (never back), for a worker whose effects are not
/// written by a script of its own (the projector's `effects.lua` does the same in its call).
/// KEYS[1] the checkpoints hash; ARGV[1] the group, ARGV[2] the entry id.
pub static FORWARD_SCRIPT: std::sync::LazyLock<crate::runtime::scripts::Lua> =
    std::sync::LazyLock::new(|| {
        crate::runtime::scripts::Lua::new(
            r#"#!lua
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local at = redis.call('HGET', KEYS[1], ARGV[1])
local ms, seq = parse(ARGV[2])
if at then
  local sms, sseq = parse(at)
  if sms and (ms < sms or (ms == sms and seq <= sseq)) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"#,
        )
    });

/// The call that moves `group`'s checkpoint of `stream` to `position`, if that is forward.
pub fn forward(stream: &str, group: &str, position: EntryId) -> redis::Cmd {
    let mut cmd = FORWARD_SCRIPT.call();
    cmd.arg(1)
        .arg(key(stream))
        .arg(group)
        .arg(position.to_string());
    cmd
}
