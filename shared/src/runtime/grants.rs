//! Whether the ACL user may run commands, asked without running them: each is queued in a
//! `MULTI` that is then discarded, and Redis checks a command's permission (and its keys') as it
//! queues it. A Lua script refused a command half-way keeps what it did before (acknowledgements
//! included), so a worker checks its scripts' commands at start and exits 2 naming the ones it
//! may not run, rather than meet the refusal with entries half-applied.

use redis::{Cmd, Value};

use crate::runtime::conn::Conn;

/// The names (as given with each command) of the commands the user may not run, or may not run
/// on their key (`NAME on <key>`). `MULTI` itself refused is reported as `MULTI`: the user needs it
/// (and `DISCARD`) for this check, which otherwise would run the commands for real.
pub async fn refused(conn: &mut Conn, checks: &[(&str, Cmd)]) -> redis::RedisResult<Vec<String>> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors().cmd("MULTI");
    for (_, cmd) in checks {
        pipe.add_command(cmd.clone());
    }
    pipe.cmd("DISCARD");
    let replies: Vec<redis::RedisResult<Value>> = pipe.query_async(conn).await?;
    if matches!(replies.first(), Some(Err(e)) if is_refused(e)) {
        return Ok(vec![
            "MULTI (and DISCARD, to check the others without running them)".into(),
        ]);
    }
    Ok(checks
        .iter()
        .zip(replies.iter().skip(1))
        .filter_map(|((name, cmd), reply)| match reply {
            Err(e) if is_refused(e) => Some(match refused_key(e, cmd) {
                Some(key) => format!("{name} on {key}"),
                None => (*name).to_owned(),
            }),
            _ => None,
        })
        .collect())
}

/// Whether Redis refused a command, or its keys, to the user (inside a script the error carries
/// no code: its text says it).
pub fn is_refused(e: &redis::RedisError) -> bool {
    let text = e.to_string().to_lowercase();
    e.code() == Some("NOPERM")
        || text.contains("no permissions to")
        || text.contains("can't run this command")
}

/// The key a refusal names, when it is the key (not the command) that was refused.
fn refused_key(e: &redis::RedisError, cmd: &Cmd) -> Option<String> {
    if !e.to_string().contains("access one of the keys") {
        return None;
    }
    crate::runtime::conn::routing_key(cmd).map(|k| String::from_utf8_lossy(&k).into_owned())
}
