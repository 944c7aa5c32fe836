//! Reading Redis as an operator's tool does: one connection per command, and streams read a page
//! at a time in id order (a stream may hold millions of entries; memory stays one page).
//!
//! The connection is the workers' [`Conn`]: `FLEET_REDIS_URL` names one server, or any node of a
//! Redis Cluster (or several seeds), and which of the two is found out when connecting. On a
//! cluster each command goes to the master of its key's slot and a pipeline over several slots is
//! split by slot, so the commands below work unchanged as long as none names keys of two slots
//! at once (a key and the keys kept beside it share its hash tag).

use std::time::Duration;

use anyhow::Context;
use redis::FromRedisValue;

use streamfleet::runtime::conn::Conn;
use streamfleet::runtime::connect::RedisTarget;

/// How long one reply may take: generous, since a pipeline of a thousand `XADD`s or a page of
/// large entries can take longer than redis-rs's 500 ms default on a busy host, and an operator's
/// command has no deadline of its own.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// The command's connection, with an error that says which setting to check.
pub async fn connect(target: &RedisTarget) -> anyhow::Result<Conn> {
    connect_with(target, RESPONSE_TIMEOUT).await
}

/// [`connect`] with another response timeout (it must outlast any `BLOCK` sent on it).
pub async fn connect_with(
    target: &RedisTarget,
    response_timeout: Duration,
) -> anyhow::Result<Conn> {
    target
        .connect(response_timeout)
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
        conn: &mut Conn,
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
    conn: &mut Conn,
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
