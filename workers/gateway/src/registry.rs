//! The connection registry across instances, in Redis: each instance keeps a hash of its
//! connections per topic (`<key>:<instance>`, field `@connections` for its total) that expires
//! three heartbeats after its last write, and its name in a sorted set (`<key>`, scored by the
//! time of its last heartbeat), so that `fleetctl status` finds every instance and a dead one's
//! counts disappear by themselves.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use streamfleet::runtime::conn::Conn;
use streamfleet::runtime::health::{Dependency, Health};
use streamfleet::runtime::shutdown::Shutdown;

use crate::hub::Hub;

/// The field of an instance's hash holding its connections (no topic is spelled so).
pub const TOTAL_FIELD: &str = "@connections";

/// An instance's entries in the registry.
pub struct Registry {
    pub key: String,
    pub instance: String,
    pub interval: Duration,
}

impl Registry {
    fn instance_key(&self) -> String {
        format!("{}:{}", self.key, self.instance)
    }

    /// Writes this instance's counts every interval until the drain starts, then removes them.
    pub async fn run(self, hub: Arc<Hub>, mut conn: Conn, health: Arc<Health>, shutdown: Shutdown) {
        let mut written: HashSet<String> = HashSet::new();
        loop {
            match self.beat(&hub, &mut conn, &mut written).await {
                Ok(()) => health.up(Dependency::Redis),
                Err(e) => health.down(Dependency::Redis, &format!("registry: {e}")),
            }
            if !shutdown.sleep(self.interval).await {
                break;
            }
        }
        let mut pipe = redis::pipe();
        pipe.del(self.instance_key()).ignore();
        pipe.zrem(&self.key, &self.instance).ignore();
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            tracing::warn!(error = %e, "registry entries not removed (they expire)");
        }
    }

    async fn beat(
        &self,
        hub: &Hub,
        conn: &mut Conn,
        written: &mut HashSet<String>,
    ) -> redis::RedisResult<()> {
        let (total, topics) = hub.counts();
        let key = self.instance_key();
        let ttl_ms = 3 * self.interval.as_millis() as u64;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let mut pipe = redis::pipe();
        let now: HashSet<String> = topics.iter().map(|(t, _)| t.clone()).collect();
        let gone: Vec<&String> = written.difference(&now).collect();
        if !gone.is_empty() {
            pipe.hdel(&key, gone).ignore();
        }
        // HSET with many pairs (not redis-rs's `hset_multiple`, an HMSET the ACL would need).
        let hset = pipe.cmd("HSET").arg(&key).arg(TOTAL_FIELD).arg(total);
        for (topic, n) in &topics {
            hset.arg(topic).arg(n);
        }
        hset.ignore();
        pipe.pexpire(&key, ttl_ms as i64).ignore();
        pipe.zadd(&self.key, &self.instance, now_ms).ignore();
        // Instances silent for an hour are long gone: their names leave the set.
        pipe.zrembyscore(&self.key, 0, now_ms.saturating_sub(3_600_000))
            .ignore();
        pipe.query_async::<()>(conn).await?;
        *written = now;
        Ok(())
    }
}
