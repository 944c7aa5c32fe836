//! A Sentinel-managed Redis: `FLEET_REDIS_URL=redis+sentinel://[user:password@]host:26379,host:26379/<master>[/<db>]`
//! names the sentinels and the master's name instead of the master, so that a worker follows a
//! failover instead of waiting for a server that will not come back.
//!
//! The master is found by asking the sentinels in turn (`SENTINEL get-master-addr-by-name`), then
//! asking the server they name whether it is a master: mid-failover a sentinel may still name the
//! old one, or one that has just been demoted. That check uses `HELLO` (its `role`), which every
//! ACL user of the fleet may run (`ROLE` and `INFO` need grants of their own).
//!
//! The URL's credentials and database are the master's (the fleet's ACL user); the sentinels are
//! asked without credentials (a sentinel's own `requirepass` is not supported). With
//! `rediss+sentinel://`, both the sentinels and the master are reached over TLS with the
//! `FLEET_REDIS_CA_FILE` / client certificate settings.
//!
//! [`SentinelConn`] is the connection the rest of the fleet uses: a connection to the master
//! that, when a command fails the way a lost master makes it fail (refused, reset, timed out, or
//! `READONLY` from a demoted master), asks the sentinels again and swaps to the new master, then
//! returns the error so that the caller's retry and backoff wait out the outage. A command that
//! succeeds costs nothing more than on one server.
//!
//! A master demoted alive (`SENTINEL FAILOVER`, a partition healed) keeps answering as a master
//! until the sentinels reconfigure it, seconds after the promotion: what is written there
//! meanwhile is discarded with the demotion. So the sentinels' announcement of a promotion
//! (`+switch-master`, Pub/Sub on every sentinel) is watched too: the connections move at their next
//! command (a counter compared, no round trip), without waiting for an error.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, ConnectionAddr, Pipeline, RedisFuture, RedisResult, Value};

use crate::runtime::config::ConfigError;
use crate::runtime::connect::redact;

/// The sentinels' port when an address names none.
const SENTINEL_PORT: u16 = 26379;
/// How long a sentinel or a candidate master may take to answer while the master is looked up.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether `url` names a Sentinel-managed Redis.
pub fn is_sentinel_url(url: &str) -> bool {
    url.starts_with("redis+sentinel://") || url.starts_with("rediss+sentinel://")
}

/// Why the master could not be found.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no sentinel answered (last: {0})")]
    NoSentinel(String),
    #[error("no sentinel knows a master named {0:?}")]
    UnknownMaster(String),
    #[error("{addr}, the master Sentinel names, does not answer: {reason}")]
    MasterUnreachable { addr: String, reason: String },
    #[error("{addr}, the master Sentinel names, says it is a {role} (a failover under way?)")]
    NotMaster { addr: String, role: String },
}

impl From<ResolveError> for redis::RedisError {
    fn from(e: ResolveError) -> Self {
        let kind = match e {
            ResolveError::UnknownMaster(_) => redis::ErrorKind::MasterNameNotFoundBySentinel,
            _ => redis::ErrorKind::Io,
        };
        redis::RedisError::from((kind, "Redis Sentinel", e.to_string()))
    }
}

/// The sentinels, the master's name, and how to reach and log in to whichever server is master.
pub struct Sentinel {
    sentinels: Vec<redis::Client>,
    name: String,
    /// The master's settings (credentials, database, TLS) at the first sentinel's address:
    /// [`Sentinel::client_at`] points it at a master.
    template: redis::Client,
    /// Promotions announced by the sentinels (`+switch-master` of this master) since start.
    switches: AtomicU64,
    /// Whether the announcements are watched (from the first connection on).
    watching: AtomicBool,
    /// The new master of the last announcement, `host:port`.
    announced: std::sync::Mutex<Option<String>>,
}

impl Sentinel {
    /// Reads a `redis+sentinel://` (or `rediss+sentinel://`) URL; every problem names
    /// `FLEET_REDIS_URL`. `certs` are the TLS files, for `rediss+sentinel://`.
    pub fn parse(url: &str, certs: Option<&redis::TlsCertificates>) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError(format!("FLEET_REDIS_URL: {}: {why}", redact(url)));
        let (scheme, rest) = match url.split_once("://") {
            Some(("redis+sentinel", rest)) => ("redis", rest),
            Some(("rediss+sentinel", rest)) => ("rediss", rest),
            _ => return Err(bad("not a redis+sentinel:// URL")),
        };
        let (userinfo, rest) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut addrs = Vec::new();
        for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            addrs.push(
                host_port(host).ok_or_else(|| bad(&format!("bad sentinel address {host:?}")))?,
            );
        }
        if addrs.is_empty() {
            return Err(bad(
                "no sentinel address (redis+sentinel://host:26379,host:26379/<master-name>)",
            ));
        }
        let mut segments = path.split('/');
        let name =
            match segments.next() {
                Some(name) if !name.is_empty() => name.to_owned(),
                _ => return Err(bad(
                    "no master name (redis+sentinel://host:26379,host:26379/<master-name>[/<db>])",
                )),
            };
        let db: i64 = match segments.next() {
            None | Some("") => 0,
            Some(db) => db
                .parse()
                .ok()
                .filter(|db| *db >= 0)
                .ok_or_else(|| bad(&format!("bad database {db:?}")))?,
        };
        if segments.any(|s| !s.is_empty()) {
            return Err(bad("more than <master-name>/<db> after the addresses"));
        }
        let open = |url: &str| match certs {
            None => redis::Client::open(url),
            Some(certs) => redis::Client::build_with_tls(url, certs.clone()),
        };
        let host_url = |(host, port): &(String, u16)| {
            if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            }
        };
        let login = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        let template = open(&format!("{scheme}://{login}{}/{db}", host_url(&addrs[0])))
            .map_err(|e| bad(&e.to_string()))?;
        let sentinels = addrs
            .iter()
            .map(|a| open(&format!("{scheme}://{}", host_url(a))))
            .collect::<RedisResult<Vec<_>>>()
            .map_err(|e| bad(&e.to_string()))?;
        Ok(Sentinel {
            sentinels,
            name,
            template,
            switches: AtomicU64::new(0),
            watching: AtomicBool::new(false),
            announced: Default::default(),
        })
    }

    /// How many promotions the sentinels have announced: a connection made before the last one
    /// is to a master that is no longer (or will soon not be) the master.
    pub fn switches(&self) -> u64 {
        self.switches.load(Ordering::Acquire)
    }

    /// Starts watching the sentinels' announcements of promotions, once per process.
    fn watch(self: &Arc<Self>) {
        if !self.watching.swap(true, Ordering::AcqRel) {
            for at in 0..self.sentinels.len() {
                tokio::spawn(watch_switches(self.clone(), at));
            }
        }
    }

    /// The master's settings (credentials, database, TLS); its address is a sentinel's.
    pub fn template(&self) -> &redis::Client {
        &self.template
    }

    /// The master's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The master now: the first server a sentinel names that says it is a master.
    pub async fn master(&self) -> Result<(String, u16), ResolveError> {
        let mut err = None;
        let mut tried: Vec<(String, u16)> = Vec::new();
        for sentinel in &self.sentinels {
            let addr = match ask(sentinel, &self.name).await {
                Ok(Some(addr)) => addr,
                Ok(None) => {
                    err.get_or_insert(ResolveError::UnknownMaster(self.name.clone()));
                    continue;
                }
                Err(e) => {
                    if err.is_none() || matches!(err, Some(ResolveError::NoSentinel(_))) {
                        err = Some(ResolveError::NoSentinel(e.to_string()));
                    }
                    continue;
                }
            };
            if tried.contains(&addr) {
                continue;
            }
            tried.push(addr.clone());
            let shown = format!("{}:{}", addr.0, addr.1);
            match crate::runtime::connect::hello(&self.client_at(&addr.0, addr.1), ASK_TIMEOUT)
                .await
            {
                Ok(fields) => match fields.get("role").map(String::as_str) {
                    Some("master") | None => return Ok(addr),
                    Some(role) => {
                        err = Some(ResolveError::NotMaster {
                            addr: shown,
                            role: role.to_owned(),
                        })
                    }
                },
                Err(e) => {
                    err = Some(ResolveError::MasterUnreachable {
                        addr: shown,
                        reason: e.to_string(),
                    })
                }
            }
        }
        Err(err.unwrap_or_else(|| ResolveError::NoSentinel("none asked".into())))
    }

    /// A client for the server at `host:port` with the master's settings.
    pub fn client_at(&self, host: &str, port: u16) -> redis::Client {
        let info = self.template.get_connection_info().clone();
        let addr = match info.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host.to_owned(), port),
        };
        redis::Client::open(info.set_addr(addr)).expect("the template's settings were checked")
    }

    /// A connection to the master that follows failovers.
    pub async fn connect(
        self: &Arc<Self>,
        response_timeout: Duration,
    ) -> RedisResult<SentinelConn> {
        self.watch();
        let switches = self.switches();
        let (host, port) = self.master().await?;
        let conn = crate::runtime::connect::redis_connection(
            &self.client_at(&host, port),
            response_timeout,
        )
        .await?;
        Ok(SentinelConn {
            shared: Arc::new(Shared {
                sentinel: self.clone(),
                response_timeout,
                current: RwLock::new(Current {
                    generation: 0,
                    switches,
                    master: (host, port),
                    conn,
                }),
                following: tokio::sync::Mutex::new(()),
            }),
        })
    }
}

/// `host` or `host:port` (IPv6 in brackets).
fn host_port(s: &str) -> Option<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => SENTINEL_PORT,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match s.split_once(':') {
        Some((host, port)) if !host.is_empty() => Some((host.to_owned(), port.parse().ok()?)),
        Some(_) => None,
        None => Some((s.to_owned(), SENTINEL_PORT)),
    }
}

/// Counts the promotions of `sentinel`'s master that the sentinel at `at` announces
/// (`+switch-master <name> <old-ip> <old-port> <new-ip> <new-port>`), subscribed again after a
/// failure. Every sentinel is watched (each announces when it learns of the promotion, the leader
/// first) and an announcement counts once: when it names another master than the last one. An
/// announcement missed while no sentinel is reachable is made up for by the errors a lost master
/// causes.
async fn watch_switches(sentinel: Arc<Sentinel>, at: usize) {
    let mut delays = crate::runtime::backoff::backoff();
    loop {
        let subscribed = tokio::time::timeout(ASK_TIMEOUT, async {
            let mut pubsub = sentinel.sentinels[at].get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            RedisResult::Ok(pubsub)
        })
        .await;
        let Ok(Ok(mut pubsub)) = subscribed else {
            tokio::time::sleep(delays.next().unwrap_or_default()).await;
            continue;
        };
        delays = crate::runtime::backoff::backoff();
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let payload: String = message.get_payload().unwrap_or_default();
            let words: Vec<&str> = payload.split(' ').collect();
            let [name, _, _, host, port] = words[..] else {
                continue;
            };
            if name != sentinel.name {
                continue;
            }
            let new = format!("{host}:{port}");
            let mut last = sentinel.announced.lock().unwrap_or_else(|e| e.into_inner());
            if last.as_deref() != Some(new.as_str()) {
                tracing::info!(master = %sentinel.name, to = %new, "Redis Sentinel announces a new master");
                *last = Some(new);
                sentinel.switches.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

/// What one sentinel says the master of `name` is (`None`: it knows no such master).
async fn ask(sentinel: &redis::Client, name: &str) -> RedisResult<Option<(String, u16)>> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(ASK_TIMEOUT))
        .set_response_timeout(Some(ASK_TIMEOUT));
    let mut conn = sentinel
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(name)
        .query_async(&mut conn)
        .await?;
    Ok(addr)
}

/// The fleet's connection to a Sentinel-managed master.
#[derive(Clone)]
pub struct SentinelConn {
    shared: Arc<Shared>,
}

struct Shared {
    sentinel: Arc<Sentinel>,
    response_timeout: Duration,
    current: RwLock<Current>,
    /// Held while the master is looked up again: one lookup at a time, the other failures
    /// return at once.
    following: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct Current {
    /// Counts the swaps, so that a failure seen on a replaced connection does not swap again.
    generation: u64,
    /// The sentinels' announcements counted when this master was found.
    switches: u64,
    master: (String, u16),
    conn: ConnectionManager,
}

impl SentinelConn {
    fn current(&self) -> Current {
        self.shared
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Current> {
        self.shared
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The connection to use now: after the sentinels announced a promotion, to the new master.
    async fn now(&self) -> Current {
        let current = self.current();
        if current.switches == self.shared.sentinel.switches() {
            return current;
        }
        self.follow(current.generation).await;
        self.current()
    }

    /// After a failure on the connection of `generation`, or an announced promotion: asks the
    /// sentinels which server is master and, if another one, swaps to it. Nothing if another
    /// lookup is under way or already swapped.
    async fn follow(&self, generation: u64) {
        let Ok(_lookup) = self.shared.following.try_lock() else {
            return;
        };
        let old = self.current();
        if old.generation != generation {
            return;
        }
        // An announcement is acted on once: if the lookup fails, the errors of a lost master
        // (or a demoted one's `READONLY`) bring the next one, rather than every command.
        let switches = self.shared.sentinel.switches();
        self.write().switches = switches;
        let (host, port) = match self.shared.sentinel.master().await {
            Ok(addr) => addr,
            Err(e) => {
                tracing::debug!(error = %e, "the Redis master could not be found yet");
                return;
            }
        };
        if (host.as_str(), port) == (old.master.0.as_str(), old.master.1) {
            // Still the master (a blip): its connection reconnects by itself.
            return;
        }
        let client = self.shared.sentinel.client_at(&host, port);
        match crate::runtime::connect::redis_connection(&client, self.shared.response_timeout).await
        {
            Ok(conn) => {
                tracing::warn!(
                    master = %self.shared.sentinel.name(),
                    from = %format!("{}:{}", old.master.0, old.master.1),
                    to = %format!("{host}:{port}"),
                    "Redis failover: following the new master"
                );
                *self.write() = Current {
                    generation: generation + 1,
                    switches,
                    master: (host, port),
                    conn,
                };
            }
            Err(e) => tracing::debug!(error = %e, "the new Redis master does not answer yet"),
        }
    }
}

/// Whether a failure says the master may be gone: refused, reset, timed out, or demoted.
fn lost_master(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.code() == Some("READONLY")
}

/// Whether a reply is a demoted master's refusal to write.
fn demoted(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.code() == "READONLY")
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let current = self.now().await;
            let mut conn = current.conn;
            let result = conn.req_packed_command(cmd).await;
            let lost = match &result {
                Ok(v) => demoted(v),
                Err(e) => lost_master(e),
            };
            if lost {
                self.follow(current.generation).await;
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let current = self.now().await;
            let mut conn = current.conn;
            let result = conn.req_packed_commands(pipeline, offset, count).await;
            let lost = match &result {
                Ok(values) => values.iter().any(demoted),
                Err(e) => lost_master(e),
            };
            if lost {
                self.follow(current.generation).await;
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.shared
            .sentinel
            .template
            .get_connection_info()
            .redis_settings()
            .db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_name_the_sentinels_the_master_and_the_database() {
        let s = Sentinel::parse(
            "redis+sentinel://app:s3cret@a:26380,b,[::1]:26381/mymaster/3",
            None,
        )
        .unwrap();
        assert_eq!(s.name(), "mymaster");
        assert_eq!(s.sentinels.len(), 3);
        let settings = s.template().get_connection_info().redis_settings().clone();
        assert_eq!(settings.db(), 3);
        assert_eq!(settings.username(), Some("app"));
        assert_eq!(settings.password(), Some("s3cret"));
        let at = s.client_at("10.0.0.9", 6390);
        assert!(
            matches!(at.get_connection_info().addr(), ConnectionAddr::Tcp(h, 6390) if h == "10.0.0.9")
        );
        assert_eq!(at.get_connection_info().redis_settings().db(), 3);
        assert_eq!(host_port("b"), Some(("b".into(), 26379)));
        assert_eq!(host_port("[::1]:1"), Some(("::1".into(), 1)));

        for bad in [
            "redis+sentinel://a:26379",
            "redis+sentinel://a:26379/",
            "redis+sentinel:///mymaster",
            "redis+sentinel://a:notaport/m",
            "redis+sentinel://a/m/x",
            "redis+sentinel://a/m/0/extra",
        ] {
            let err = Sentinel::parse(bad, None).map(|_| ()).unwrap_err();
            assert!(err.to_string().starts_with("FLEET_REDIS_URL: "), "{err}");
        }
        let err = Sentinel::parse("redis+sentinel://u:pw@a/m/x", None)
            .map(|_| ())
            .unwrap_err();
        assert!(!err.to_string().contains("pw"), "{err}");
    }
}
