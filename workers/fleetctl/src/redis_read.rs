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

/// A walk through `key` from `start` (an `XRANGE` bound: `-`, an id, or `(id` exclusive) to `end`,
/// `page` entries at a time, in id order. Each page is read when asked for, so that the caller
/// may work (or delete) between pages; memory stays one page.
pub struct Pages {
    key: String,
    start: String,
    end: String,
    page: usize,
    done: bool,
}

impl Pages {
    pub fn new(key: &str, start: &str, end: &str, page: usize) -> Self {
        Pages {
            key: key.to_owned(),
            start: start.to_owned(),
            end: end.to_owned(),
            page: page.max(1),
            done: false,
        }
    }

    /// The next page, or `None` once the range is read. `T` is how an entry's fields are read
    /// (a map, pairs of bytes, ...).
    pub async fn next<T: FromRedisValue>(
        &mut self,
        conn: &mut MultiplexedConnection,
    ) -> anyhow::Result<Option<Vec<(String, T)>>> {
        if self.done {
            return Ok(None);
        }
        let entries: Vec<(String, T)> = redis::cmd("XRANGE")
            .arg(&self.key)
            .arg(&self.start)
            .arg(&self.end)
            .arg("COUNT")
            .arg(self.page)
            .query_async(conn)
            .await
            .with_context(|| format!("XRANGE {}", self.key))?;
        let Some((last, _)) = entries.last() else {
            self.done = true;
            return Ok(None);
        };
        self.start = format!("({last}");
        self.done = entries.len() < self.page;
        Ok(Some(entries))
    }
}

/// Reads `key` from `start` to `end` (as [`Pages`]), handing each page to `each` until it
/// returns false or the range ends.
pub async fn pages<T: FromRedisValue>(
    conn: &mut MultiplexedConnection,
    key: &str,
    start: &str,
    end: &str,
    page: usize,
    mut each: impl FnMut(Vec<(String, T)>) -> bool,
) -> anyhow::Result<()> {
    let mut pages = Pages::new(key, start, end, page);
    while let Some(entries) = pages.next(conn).await? {
        if !each(entries) {
            break;
        }
    }
    Ok(())
}
