//! A fleet for one gateway test: a stream, flows on channels of its own (`<tag>.f<n>.progress`,
//! so that parallel tests' wildcard topics stay apart), and one configuration file for the
//! projector, the notifier and the gateways (the projector's latest and history per flow, which
//! the gateway resumes from). Tokens are HS256 with [`SECRET`].

use std::time::Duration;

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use uuid::Uuid;

use crate::scenario::config;
use crate::{publish_lines, unique, wait_until, WorkerEnv};

/// The gateways' HS256 secret.
pub const SECRET: &str = "a test secret of at least 32 bytes!";

/// One test's fleet.
pub struct Fleet {
    pub stream: String,
    /// The first segment of the test's channels.
    pub tag: String,
    /// The configuration file every worker reads.
    pub config: String,
    /// The prefix of the test's keys.
    keys: String,
}

impl Fleet {
    /// A fleet whose keys start with `prefix` (`gwt`, `gwb`: one per test file).
    pub fn new(prefix: &str) -> Fleet {
        let tag: String = unique("g")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        let keys = format!("{prefix}:{tag}");
        let config = config(&format!(
            r#"
[[route]]
pattern = "{tag}.*.progress"
actions = [{{ latest = "{keys}:{{channel[1]}}" }}, {{ history = "{keys}:{{channel[1]}}:events", maxlen = 5000 }}]
gateway = {{ history = "{keys}:{{channel[1]}}:events", latest = "{keys}:{{channel[1]}}" }}
"#
        ));
        Fleet {
            stream: format!("{keys}:events"),
            tag,
            config,
            keys,
        }
    }

    /// Flow `n`'s channel (an exact topic).
    pub fn flow(&self, n: usize) -> String {
        format!("{}.f{n}.progress", self.tag)
    }

    /// Every flow of the test (a wildcard topic).
    pub fn any(&self) -> String {
        format!("{}.*.progress", self.tag)
    }

    /// Flow `n`'s history stream, as the projector names it.
    pub fn history_key(&self, n: usize) -> String {
        format!("{}:f{n}:events", self.keys)
    }

    /// The gateways' registry key.
    pub fn registry(&self) -> String {
        format!("{}:gateways", self.keys)
    }

    /// A projector or a notifier named `name` on the fleet's stream.
    pub fn worker(&self, name: &str) -> WorkerEnv {
        WorkerEnv::new(&self.stream, "")
            .unset("FLEET_DATABASE_URL")
            .set("FLEET_CONFIG", &self.config)
            .set("FLEET_CONSUMER", name)
    }

    /// A gateway with the fleet's file, tokens signed with [`SECRET`].
    pub fn gateway(&self) -> WorkerEnv {
        WorkerEnv::new("", "")
            .unset("FLEET_STREAMS")
            .unset("FLEET_DATABASE_URL")
            .unset("FLEET_CONSUMER")
            .set("FLEET_CONFIG", &self.config)
            .set("FLEET_GATEWAY_JWT_SECRET", SECRET)
            .set("FLEET_GATEWAY_REGISTRY_KEY", &self.registry())
            .set("FLEET_GATEWAY_REGISTRY_INTERVAL_MS", "200")
    }

    /// One event of flow `n`, `data.i` = `i`.
    pub fn event(&self, n: usize, i: usize) -> String {
        json!({"v": 1, "id": Uuid::now_v7().to_string(), "type": "flow.progress",
            "channel": self.flow(n), "source": "tests",
            "time": "2026-12-07T12:00:00Z", "data": {"i": i}})
        .to_string()
    }

    /// Events `range` of flow `n`.
    pub fn events(&self, n: usize, range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| self.event(n, i)).collect()
    }

    /// Appends `lines` to the fleet's stream.
    pub async fn publish(&self, lines: &[String]) {
        publish_lines(&self.stream, lines).await;
    }
}

/// An HS256 token granting `topics`, expiring `exp_from_now` seconds from now (negative: expired).
pub fn token(topics: &[&str], exp_from_now: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    encode(
        &Header::default(),
        &json!({"sub": "tests", "exp": now + exp_from_now, "topics": topics}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Waits (at most `wait`) until the projector's `history` stream holds `n` entries.
pub async fn history_holds(
    conn: &redis::aio::MultiplexedConnection,
    history: &str,
    n: u64,
    wait: Duration,
) {
    wait_until(wait, &format!("{history} holds {n} entries"), || {
        let mut conn = conn.clone();
        async move {
            redis::cmd("XLEN")
                .arg(history)
                .query_async::<u64>(&mut conn)
                .await
                .unwrap_or(0)
                == n
        }
    })
    .await;
}
