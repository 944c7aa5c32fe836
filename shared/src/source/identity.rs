//! Who this process is to Redis: the name of its reading connection, and the check that no other
//! live process consumes the same streams under the same group and consumer name.
//!
//! Two processes sharing a consumer name share one pending entry list: each re-reads the other's
//! pending entries as its own, and both apply (and dead-letter) them. Like Kafka's static group
//! membership, the name must belong to one live process. The reading connection is named
//! `streamfleet:<group>:<consumer>:<streams>:<worker>:<instance>` (`CLIENT SETNAME`), so
//! `CLIENT LIST` tells whether another one is connected: a process that was killed has no
//! connection left, so a restart right after a crash is never taken for a duplicate.

use crate::runtime::conn::Conn;

/// This process's identity in Redis.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `streamfleet:<group>:<consumer>:<streams>:` : what two duplicates share.
    shared: String,
    /// The full client name, with the worker and this process's own instance id.
    name: String,
    db: i64,
}

/// A live process that uses the same identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    /// Its client address, as Redis sees it.
    pub addr: String,
    /// How long it has been connected, in seconds.
    pub age_s: u64,
}

/// Escapes what a client name cannot hold (spaces, newlines) and our separator.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' | ':' => out.push_str(&format!("%{:02X}", c as u32)),
            c if c.is_whitespace() || c.is_control() => {
                out.push_str(&format!("%{:02X}", c as u32 & 0xff))
            }
            c => out.push(c),
        }
    }
    out
}

/// FNV-1a, 64 bits: a short, stable fingerprint of the stream list (not a security measure).
fn fingerprint(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Identity {
    /// The identity of `worker`, consumer `consumer` of `group` on `streams` (the `FLEET_STREAMS`
    /// items) in database `db`.
    pub fn new(worker: &str, group: &str, consumer: &str, streams: &[&str], db: i64) -> Self {
        let mut sorted = streams.to_vec();
        sorted.sort_unstable();
        let shared = format!(
            "streamfleet:{}:{}:{:016x}:",
            escape(group),
            escape(consumer),
            fingerprint(&sorted.join(","))
        );
        let instance = &uuid::Uuid::new_v4().simple().to_string()[..8];
        Identity {
            name: format!("{shared}{}:{instance}", escape(worker)),
            shared,
            db,
        }
    }

    /// The client name of the reading connection.
    pub fn client_name(&self) -> &str {
        &self.name
    }

    /// Finds, in `CLIENT LIST` output, another connection with this identity in the same database.
    pub fn duplicates_in(&self, client_list: &str) -> Vec<Duplicate> {
        let mut out = Vec::new();
        for line in client_list.lines() {
            let field = |key: &str| {
                line.split(' ')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            };
            let (Some(name), Some(db)) = (field("name"), field("db")) else {
                continue;
            };
            if name.starts_with(&self.shared)
                && name != self.name
                && db.parse::<i64>().ok() == Some(self.db)
            {
                out.push(Duplicate {
                    addr: field("addr").unwrap_or("?").to_owned(),
                    age_s: field("age").and_then(|a| a.parse().ok()).unwrap_or(0),
                });
            }
        }
        out
    }

    /// Asks Redis for other live processes with this identity. `None` if Redis would not say
    /// (an ACL without `CLIENT LIST`): the check is then skipped.
    /// On a cluster every master is asked: the readers of the other process may be on any.
    pub async fn duplicates(&self, conn: &mut Conn) -> Option<Vec<Duplicate>> {
        let mut cmd = redis::cmd("CLIENT");
        cmd.arg("LIST").arg("TYPE").arg("normal");
        let list: redis::RedisResult<String> = match conn.masters().await {
            Ok(None) => cmd.query_async(conn).await,
            Ok(Some(masters)) => {
                let mut all = String::new();
                let mut failed = None;
                for m in masters {
                    match conn.on_node::<String>(&m.host, m.port, &cmd).await {
                        Ok(list) => all.push_str(&list),
                        Err(e) => failed = Some(e),
                    }
                }
                match failed {
                    Some(e) => Err(e),
                    None => Ok(all),
                }
            }
            Err(e) => Err(e),
        };
        match list {
            Ok(list) => Some(self.duplicates_in(&list)),
            Err(e) => {
                tracing::debug!(error = %e, "CLIENT LIST refused: duplicate consumer names are not checked");
                None
            }
        }
    }
}

impl std::fmt::Display for Duplicate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client {} connected {} s ago", self.addr, self.age_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_another_live_process_with_the_same_group_consumer_and_streams() {
        let me = Identity::new("persister", "persister", "c 1", &["b", "a:*"], 0);
        assert!(me.client_name().starts_with("streamfleet:persister:c%201:"));
        assert!(!me.client_name().contains(' '));
        let twin = Identity::new("persister", "persister", "c 1", &["a:*", "b"], 0);
        let other_streams = Identity::new("persister", "persister", "c 1", &["b"], 0);
        let other_db = Identity::new("persister", "persister", "c 1", &["b", "a:*"], 3);
        let list = format!(
            "id=1 addr=10.0.0.1:5000 laddr=x fd=8 name={} age=12 idle=0 db=0\n\
             id=2 addr=10.0.0.2:5000 laddr=x fd=9 name={} age=3 idle=0 db=0\n\
             id=3 addr=10.0.0.3:5000 laddr=x fd=9 name={} age=3 idle=0 db=0\n\
             id=4 addr=10.0.0.4:5000 laddr=x fd=9 name={} age=3 idle=0 db=3\n\
             id=5 addr=10.0.0.5:5000 laddr=x fd=9 name= age=3 idle=0 db=0\n",
            me.client_name(),
            twin.client_name(),
            other_streams.client_name(),
            other_db.client_name(),
        );
        assert_eq!(
            me.duplicates_in(&list),
            vec![Duplicate {
                addr: "10.0.0.2:5000".into(),
                age_s: 3
            }]
        );
    }
}
