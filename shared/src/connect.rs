//! Connections to Redis: URL checks that fail at startup (not at first use), TLS set-up, and
//! connections that reconnect by themselves after an outage.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::ConfigError;

/// Installs the process-wide TLS crypto provider (once; later calls are no-ops).
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Parses a `redis://` / `rediss://` URL; `setting` names the flag in the error.
pub fn redis_client(url: &str, setting: &str) -> Result<redis::Client, ConfigError> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(ConfigError(format!(
            "{setting}: {} is not a redis:// or rediss:// URL",
            redact(url)
        )));
    }
    redis::Client::open(url).map_err(|e| ConfigError(format!("{setting}: {}: {e}", redact(url))))
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
        assert!(redis_client("http://x", "FLEET_REDIS_URL").is_err());
        assert!(
            !redis_client("redis://:pw@host:notaport", "FLEET_REDIS_URL")
                .map(|_| ())
                .unwrap_err()
                .to_string()
                .contains("pw")
        );
    }
}
