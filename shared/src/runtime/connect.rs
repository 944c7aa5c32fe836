//! Connections to Redis: URL checks that fail at startup (not at first use), TLS set-up, and
//! connections that reconnect by themselves after an outage, to one server or a cluster (found
//! out when connecting: `FLEET_REDIS_URL` names any node, or several comma-separated seeds), or
//! a Sentinel-managed master (`redis+sentinel://`, see `sentinel`).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::runtime::cli::RedisArgs;
use crate::runtime::config::ConfigError;
use crate::runtime::conn::Conn;
use crate::runtime::sentinel::{is_sentinel_url, Sentinel};

/// Installs the process-wide TLS crypto provider (once; later calls are no-ops).
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A Redis client from the URL (the first seed, if several) and TLS files; every problem names
/// its setting.
pub fn redis_client(args: &RedisArgs) -> Result<redis::Client, ConfigError> {
    Ok(redis_target(args)?.seeds.swap_remove(0))
}

/// Where the fleet's Redis is: one server or a cluster, from `FLEET_REDIS_URL` (one URL, or
/// several comma-separated seeds of a cluster: any one alive is enough) and the TLS files. Which
/// of the two it is, `connect` finds out. Or a master that sentinels name (`redis+sentinel://`).
#[derive(Clone)]
pub struct RedisTarget {
    seeds: Vec<redis::Client>,
    urls: Vec<String>,
    certs: Option<redis::TlsCertificates>,
    sentinel: Option<Arc<Sentinel>>,
}

/// A client per seed URL, each checked; every problem names its setting.
pub fn redis_target(args: &RedisArgs) -> Result<RedisTarget, ConfigError> {
    let sentinel = is_sentinel_url(args.redis_url.trim());
    // A sentinel URL lists its sentinels with commas: it is one URL.
    let urls: Vec<String> = if sentinel {
        vec![args.redis_url.trim().to_owned()]
    } else {
        args.redis_url
            .split(',')
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect()
    };
    if urls.is_empty() {
        return Err(ConfigError("FLEET_REDIS_URL: no URL given".into()));
    }
    let named = [
        &args.redis_ca_file,
        &args.redis_client_cert,
        &args.redis_client_key,
    ];
    let certs = if named.iter().all(|f| f.is_none()) {
        None
    } else {
        if !urls.iter().all(|u| is_tls_url(u)) {
            return Err(ConfigError(
                "FLEET_REDIS_CA_FILE / FLEET_REDIS_CLIENT_CERT need a rediss:// (or rediss+sentinel://) FLEET_REDIS_URL"
                    .into(),
            ));
        }
        let files = TlsFiles::read(args)?;
        init_tls();
        Some(redis::TlsCertificates {
            client_tls: files
                .client
                .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }),
            root_cert: files.root_cert,
        })
    };
    if sentinel {
        let sentinel = Sentinel::parse(&urls[0], certs.as_ref())?;
        return Ok(RedisTarget {
            seeds: vec![sentinel.template().clone()],
            urls,
            certs,
            sentinel: Some(Arc::new(sentinel)),
        });
    }
    let mut seeds = Vec::with_capacity(urls.len());
    for url in &urls {
        let tls = url.starts_with("rediss://");
        if !(tls || url.starts_with("redis://")) {
            return Err(ConfigError(format!(
                "FLEET_REDIS_URL: {} is not a redis://, rediss:// or redis+sentinel:// URL",
                redact(url)
            )));
        }
        let bad_url =
            |e: redis::RedisError| ConfigError(format!("FLEET_REDIS_URL: {}: {e}", redact(url)));
        let client = match &certs {
            None => redis::Client::open(url.as_str()).map_err(bad_url)?,
            Some(certs) => {
                redis::Client::build_with_tls(url.as_str(), certs.clone()).map_err(bad_url)?
            }
        };
        seeds.push(client);
    }
    Ok(RedisTarget {
        seeds,
        urls,
        certs,
        sentinel: None,
    })
}

/// Whether the URL asks for TLS (to the server, or to the sentinels and the master).
fn is_tls_url(url: &str) -> bool {
    url.starts_with("rediss://") || url.starts_with("rediss+sentinel://")
}

impl RedisTarget {
    /// A client per URL of `FLEET_REDIS_URL`, in order (a Pub/Sub subscriber tries the next
    /// when one fails). With Sentinel, one client at a sentinel's address: not a server to
    /// subscribe on (see `sentinel`).
    pub fn seeds(&self) -> &[redis::Client] {
        &self.seeds
    }

    /// The first seed's client: its address, credentials and database are every node's. With
    /// Sentinel, the master's credentials and database at a sentinel's address.
    pub fn first(&self) -> &redis::Client {
        &self.seeds[0]
    }

    /// The sentinels that name the master, if `FLEET_REDIS_URL` is a `redis+sentinel://` URL.
    pub fn sentinel(&self) -> Option<&Arc<Sentinel>> {
        self.sentinel.as_ref()
    }

    /// Connects to the first seed that answers and asks it whether it is a cluster node
    /// (`INFO cluster`): a cluster gets a cluster connection over every seed, one server a
    /// connection that reconnects by itself. With Sentinel, a connection to the master the
    /// sentinels name, which follows failovers. `response_timeout` must exceed any BLOCK it is
    /// used for.
    pub async fn connect(&self, response_timeout: Duration) -> redis::RedisResult<Conn> {
        if let Some(sentinel) = &self.sentinel {
            return sentinel.connect(response_timeout).await.map(Conn::Sentinel);
        }
        let mut last = None;
        for seed in &self.seeds {
            match cluster_enabled(seed).await {
                Ok(false) => {
                    return redis_connection(seed, response_timeout)
                        .await
                        .map(Conn::Server)
                }
                Ok(true) => return self.cluster(response_timeout).await.map(Conn::Cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one seed"))
    }

    async fn cluster(
        &self,
        response_timeout: Duration,
    ) -> redis::RedisResult<redis::cluster_async::ClusterConnection> {
        if self.first().get_connection_info().redis_settings().db() != 0 {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "FLEET_REDIS_URL names a database other than 0, and a Redis Cluster has only database 0",
            )));
        }
        let mut builder =
            redis::cluster::ClusterClientBuilder::new(self.urls.iter().map(String::as_str))
                .connection_timeout(Duration::from_secs(5))
                .response_timeout(response_timeout)
                .retries(3);
        if let Some(certs) = &self.certs {
            builder = builder.certs(certs.clone());
        }
        builder.build()?.get_async_connection().await
    }
}

/// Whether the server `client` names is a cluster node: `HELLO` says its `mode` (`cluster`).
async fn cluster_enabled(client: &redis::Client) -> redis::RedisResult<bool> {
    let fields = hello(client, Duration::from_secs(5)).await?;
    Ok(fields.get("mode").map(String::as_str) == Some("cluster"))
}

/// What a server says of itself in `HELLO` (`mode`, `role`, `version`...), its text fields; every
/// worker's ACL user may run it (`INFO` and `ROLE` need grants of their own).
pub(crate) async fn hello(
    client: &redis::Client,
    timeout: Duration,
) -> redis::RedisResult<std::collections::HashMap<String, String>> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let hello: redis::Value = redis::cmd("HELLO").arg(2).query_async(&mut conn).await?;
    let pairs: Vec<(redis::Value, redis::Value)> = match hello {
        redis::Value::Map(pairs) => pairs,
        redis::Value::Array(items) => {
            let mut items = items.into_iter();
            std::iter::from_fn(|| Some((items.next()?, items.next()?))).collect()
        }
        _ => Vec::new(),
    };
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    Ok(pairs
        .iter()
        .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
        .collect())
}

/// The TLS settings of the reader's own connection (`read_conn`) for a `rediss://` URL, from the
/// same files as the redis-rs client: the CA file, else the system's roots, and the client
/// certificate if given.
pub fn read_tls(args: &RedisArgs) -> Result<Option<Arc<rustls::ClientConfig>>, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    if !is_tls_url(args.redis_url.trim()) {
        return Ok(None);
    }
    init_tls();
    let files = TlsFiles::read(args)?;
    let bad = |setting: &str, e: &dyn std::fmt::Display| ConfigError(format!("{setting}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    match &files.root_cert {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| bad("FLEET_REDIS_CA_FILE", &e))?;
                roots
                    .add(cert)
                    .map_err(|e| bad("FLEET_REDIS_CA_FILE", &e))?;
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match &files.client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad("FLEET_REDIS_CLIENT_CERT", &e))?;
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| bad("FLEET_REDIS_CLIENT_KEY", &e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad("FLEET_REDIS_CLIENT_CERT", &e))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Some(Arc::new(config)))
}

/// The TLS files the settings name, read (each error names its setting).
struct TlsFiles {
    root_cert: Option<Vec<u8>>,
    /// Certificate chain and key, PEM.
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    fn read(args: &RedisArgs) -> Result<TlsFiles, ConfigError> {
        let read = |setting: &str,
                    path: &Option<std::path::PathBuf>|
         -> Result<Option<Vec<u8>>, ConfigError> {
            path.as_ref()
                .map(|p| {
                    std::fs::read(p)
                        .map_err(|e| ConfigError(format!("{setting}: {}: {e}", p.display())))
                })
                .transpose()
        };
        let client = match (
            read("FLEET_REDIS_CLIENT_CERT", &args.redis_client_cert)?,
            read("FLEET_REDIS_CLIENT_KEY", &args.redis_client_key)?,
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            _ => None,
        };
        Ok(TlsFiles {
            root_cert: read("FLEET_REDIS_CA_FILE", &args.redis_ca_file)?,
            client,
        })
    }
}

/// A connection that reconnects by itself. `response_timeout` must exceed any BLOCK it is used for.
pub async fn redis_connection(
    client: &redis::Client,
    response_timeout: Duration,
) -> redis::RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_with_config(client.clone(), config).await
}

/// The URL with any password replaced, safe for logs and errors.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact("rediss://app:s3cret@cache:6380/0"),
            "rediss://app:***@cache:6380/0"
        );
        assert_eq!(redact("postgres://u:p@db/x"), "postgres://u:***@db/x");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        let args = |url: &str| RedisArgs {
            redis_url: url.into(),
            redis_ca_file: None,
            redis_client_cert: None,
            redis_client_key: None,
        };
        assert!(redis_client(&args("http://x")).is_err());
        let err = redis_client(&args("redis://:pw@host:notaport"))
            .map(|_| ())
            .unwrap_err();
        assert!(!err.to_string().contains("pw"), "{err}");
        let mut tls = args("redis://h");
        tls.redis_ca_file = Some("/nonexistent".into());
        assert!(redis_client(&tls)
            .unwrap_err()
            .to_string()
            .contains("rediss://"));
        tls.redis_url = "rediss://h".into();
        assert!(redis_client(&tls)
            .unwrap_err()
            .to_string()
            .contains("FLEET_REDIS_CA_FILE"));
    }
}
