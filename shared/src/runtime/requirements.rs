//! The Redis the fleet needs, checked rather than assumed: `maxmemory-policy noeviction` (any
//! other policy lets Redis evict streams, consumer groups and pending lists under memory pressure,
//! silently: acknowledged work lost, or done twice), and the AOF on with a real `appendfsync`
//! (else a restart loses the last writes, acknowledgements included). Read with `CONFIG GET` on
//! every master; a managed Redis that refuses `CONFIG` is said to be unchecked, not failed.

use redis::{Cmd, RedisError};

use crate::runtime::conn::Conn;

/// What one node answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// `host:port`, or empty on one server.
    pub node: String,
    pub maxmemory_policy: String,
    pub appendonly: String,
    pub appendfsync: String,
}

/// The outcome of the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// Every node's configuration.
    Read(Vec<NodeConfig>),
    /// `CONFIG GET` refused (a managed Redis, an ACL user without `config|get`): why.
    Unchecked(String),
}

impl Checked {
    /// The nodes whose policy evicts keys: `node: policy`.
    pub fn evicting(&self) -> Vec<String> {
        match self {
            Checked::Read(nodes) => nodes
                .iter()
                .filter(|n| n.maxmemory_policy != "noeviction")
                .map(|n| n.describe(&n.maxmemory_policy))
                .collect(),
            Checked::Unchecked(_) => Vec::new(),
        }
    }

    /// The nodes whose AOF would lose acknowledged writes on a restart, and how.
    pub fn unsafe_persistence(&self) -> Vec<String> {
        match self {
            Checked::Read(nodes) => nodes
                .iter()
                .filter_map(|n| {
                    if n.appendonly != "yes" {
                        Some(n.describe("appendonly no (a restart loses everything since the last RDB snapshot)"))
                    } else if n.appendfsync == "no" {
                        Some(n.describe("appendfsync no (a crash of the host loses up to ~30 s of writes)"))
                    } else {
                        None
                    }
                })
                .collect(),
            Checked::Unchecked(_) => Vec::new(),
        }
    }
}

impl NodeConfig {
    fn describe(&self, what: &str) -> String {
        if self.node.is_empty() {
            what.to_owned()
        } else {
            format!("{}: {what}", self.node)
        }
    }
}

fn config_get() -> Cmd {
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET")
        .arg("maxmemory-policy")
        .arg("appendonly")
        .arg("appendfsync");
    cmd
}

/// A node's name and its answer to `CONFIG GET`.
type Answer = (String, Result<Vec<(String, String)>, RedisError>);

fn parse(node: String, pairs: Vec<(String, String)>) -> NodeConfig {
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    NodeConfig {
        node,
        maxmemory_policy: get("maxmemory-policy"),
        appendonly: get("appendonly"),
        appendfsync: get("appendfsync"),
    }
}

/// Reads every master's configuration. Errors other than a refusal (Redis unreachable) are
/// returned: the caller retries.
pub async fn check(conn: &mut Conn) -> Result<Checked, RedisError> {
    let refused = |e: &RedisError| {
        e.code() == Some("NOPERM")
            || e.to_string().contains("unknown command")
            || e.to_string().contains("ERR unknown subcommand")
    };
    let nodes: Vec<Answer> = match conn.masters().await? {
        None => vec![(String::new(), config_get().query_async(conn).await)],
        Some(masters) => {
            let mut out = Vec::new();
            for m in masters {
                let read = conn.on_node(&m.host, m.port, &config_get()).await;
                out.push((format!("{}:{}", m.host, m.port), read));
            }
            out
        }
    };
    let mut read = Vec::new();
    for (node, answer) in nodes {
        match answer {
            Ok(pairs) => read.push(parse(node, pairs)),
            // Said in words, not with Redis's refusal: a deployment's least-privilege users are
            // not granted `config|get` on purpose (it would show the server's passwords).
            Err(e) if e.code() == Some("NOPERM") => {
                return Ok(Checked::Unchecked(
                    "CONFIG GET is not among this ACL user's commands (grant `+config|get` to have it checked)".into(),
                ))
            }
            Err(e) if refused(&e) => {
                return Ok(Checked::Unchecked(
                    "CONFIG is disabled or renamed on this server (a managed Redis)".into(),
                ))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Checked::Read(read))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(policy: &str, aof: &str, fsync: &str) -> NodeConfig {
        parse(
            "n:1".into(),
            vec![
                ("maxmemory-policy".into(), policy.into()),
                ("appendonly".into(), aof.into()),
                ("appendfsync".into(), fsync.into()),
            ],
        )
    }

    #[test]
    fn eviction_and_unsafe_persistence_are_named_per_node() {
        let c = Checked::Read(vec![
            node("noeviction", "yes", "everysec"),
            node("allkeys-lru", "yes", "always"),
            node("noeviction", "no", "everysec"),
            node("noeviction", "yes", "no"),
        ]);
        assert_eq!(c.evicting(), ["n:1: allkeys-lru"]);
        let unsafe_ = c.unsafe_persistence();
        assert_eq!(unsafe_.len(), 2);
        assert!(unsafe_[0].starts_with("n:1: appendonly no"));
        assert!(unsafe_[1].starts_with("n:1: appendfsync no"));
        assert!(Checked::Unchecked("x".into()).evicting().is_empty());
    }
}
