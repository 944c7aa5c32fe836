//! Connections to Redis: URL checks that fail at startup (not at first use), TLS set-up, and
//! connections that reconnect by themselves after an outage.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::runtime::cli::RedisArgs;
use crate::runtime::config::ConfigError;

/// Installs the process-wide TLS crypto provider (once; later calls are no-ops).
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A Redis client from the URL and TLS files; every problem names its setting.
pub fn redis_client(args: &RedisArgs) -> Result<redis::Client, ConfigError> {
    let url = args.redis_url.as_str();
    let tls = url.starts_with("rediss://");
    if !(tls || url.starts_with("redis://")) {
        return Err(ConfigError(format!(
            "FLEET_REDIS_URL: {} is not a redis:// or rediss:// URL",
            redact(url)
        )));
    }
    let bad_url =
        |e: redis::RedisError| ConfigError(format!("FLEET_REDIS_URL: {}: {e}", redact(url)));
    let named = [
        &args.redis_ca_file,
        &args.redis_client_cert,
        &args.redis_client_key,
    ];
    if named.iter().all(|f| f.is_none()) {
        return redis::Client::open(url).map_err(bad_url);
    }
    if !tls {
        return Err(ConfigError(
            "FLEET_REDIS_CA_FILE / FLEET_REDIS_CLIENT_CERT need a rediss:// FLEET_REDIS_URL".into(),
        ));
    }
    let files = TlsFiles::read(args)?;
    init_tls();
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: files
                .client
                .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }),
            root_cert: files.root_cert,
        },
    )
    .map_err(bad_url)
}

/// The TLS settings of the reader's own connection (`read_conn`) for a `rediss://` URL, from the
/// same files as the redis-rs client: the CA file, else the system's roots, and the client
/// certificate if given.
pub fn read_tls(args: &RedisArgs) -> Result<Option<Arc<rustls::ClientConfig>>, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    if !args.redis_url.starts_with("rediss://") {
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
