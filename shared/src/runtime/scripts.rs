//! Lua scripts called by their SHA1 (`EVALSHA`): the text travels once per Redis start (scripts
//! are not persisted), not with every call. The pipeline's scripts run per stream per settlement
//! or per sample, so with many streams their text was most of what the worker sent.

use crate::runtime::conn::Conn;
use redis::{RedisResult, Value};

/// A script and its SHA1.
#[derive(Debug)]
pub struct Lua {
    source: &'static str,
    sha: String,
}

impl Lua {
    /// The script `source`, hashed once.
    pub fn new(source: &'static str) -> Lua {
        Lua {
            source,
            sha: redis::Script::new(source).get_hash().to_owned(),
        }
    }

    /// `EVALSHA <sha>`: the caller adds the number of keys, the keys and the arguments.
    pub fn call(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha);
        cmd
    }

    /// `SCRIPT LOAD`, so that its `EVALSHA`s find it.
    pub fn load(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(self.source);
        cmd
    }
}

/// Runs `pipe` (built with `ignore_errors`); if any of its script calls met `NOSCRIPT` (Redis
/// restarted, or `SCRIPT FLUSH`), loads `scripts` and runs it once more. Every command a pipeline
/// of the worker holds may run twice (acknowledgements, dead letters that check the entry is still
/// pending, reads).
pub async fn query_loading(
    pipe: &redis::Pipeline,
    conn: &mut Conn,
    scripts: &[&Lua],
) -> RedisResult<Vec<RedisResult<Value>>> {
    let results: Vec<RedisResult<Value>> = pipe.query_async(conn).await?;
    if !results
        .iter()
        .any(|r| matches!(r, Err(e) if e.code() == Some("NOSCRIPT")))
    {
        return Ok(results);
    }
    let mut load = redis::pipe();
    for script in scripts {
        load.add_command(script.load()).ignore();
    }
    load.query_async::<()>(conn).await?;
    pipe.query_async(conn).await
}
