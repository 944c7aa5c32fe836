//! Reading Redis as an operator's tool does: one connection per command, and streams read a page
//! at a time in id order (a stream may hold millions of entries; memory stays one page).

use anyhow::Context;
use redis::aio::MultiplexedConnection;
use redis::FromRedisValue;

/// The command's connection, with an error that says which setting to check.
pub async fn connect(client: &redis::Client) -> anyhow::Result<MultiplexedConnection> {
    client
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis (FLEET_REDIS_URL)")
}

/// Reads `key` from `start` (an `XRANGE` bound: `-`, an id, or `(id` exclusive) to `end`, `page`
/// entries at a time, handing each page to `each` until it returns false or the range ends.
/// `T` is how an entry's fields are read (a map, pairs of bytes, ...).
pub async fn pages<T: FromRedisValue>(
    conn: &mut MultiplexedConnection,
    key: &str,
    start: &str,
    end: &str,
    page: usize,
    mut each: impl FnMut(Vec<(String, T)>) -> bool,
) -> anyhow::Result<()> {
    let mut start = start.to_owned();
    loop {
        let entries: Vec<(String, T)> = redis::cmd("XRANGE")
            .arg(key)
            .arg(&start)
            .arg(end)
            .arg("COUNT")
            .arg(page)
            .query_async(conn)
            .await
            .with_context(|| format!("XRANGE {key}"))?;
        let Some((last, _)) = entries.last() else {
            return Ok(());
        };
        start = format!("({last}");
        let full = entries.len() == page;
        if !each(entries) || !full {
            return Ok(());
        }
    }
}
