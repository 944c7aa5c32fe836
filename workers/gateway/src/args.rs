//! The gateway's own flags, each with its `FLEET_GATEWAY_*` environment twin, beside the
//! runtime's (`FLEET_REDIS_URL`, `FLEET_HTTP_ADDR`, `FLEET_CONFIG`, logs, the drain).

use std::path::PathBuf;

use clap::Args;
use streamfleet::runtime::config::ConfigError;

/// How browsers are served.
#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// HS256 secret (at least 32 bytes) of the bearer tokens whose claim lists the topic
    /// patterns their holder may subscribe to.
    #[arg(long, env = "FLEET_GATEWAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// JWKS file of the RS256 / ES256 public keys of the bearer tokens (found by `kid`).
    #[arg(long, env = "FLEET_GATEWAY_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,

    /// The token claim that lists the topic patterns granted.
    #[arg(long, env = "FLEET_GATEWAY_JWT_CLAIM", default_value = "topics")]
    pub jwt_claim: String,

    /// The audience (`aud`) tokens must name [default: not checked].
    #[arg(long, env = "FLEET_GATEWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Topic patterns anyone may subscribe to without a token, comma-separated [default: none].
    #[arg(long, env = "FLEET_GATEWAY_ANONYMOUS_TOPICS", value_delimiter = ',')]
    pub anonymous_topics: Vec<String>,

    /// Origins whose pages may open streams (CORS), comma-separated, or `*`; a request from
    /// another origin is refused [default: none, only requests without an Origin].
    #[arg(long, env = "FLEET_GATEWAY_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Events a connection may have waiting to be written; a client further behind is
    /// disconnected (it resumes with its Last-Event-ID).
    #[arg(long, env = "FLEET_GATEWAY_BUFFER", default_value_t = 1024)]
    pub buffer: usize,

    /// Interval of the keep-alive comments on an idle stream, in milliseconds.
    #[arg(long, env = "FLEET_GATEWAY_KEEPALIVE_MS", default_value_t = 15_000)]
    pub keepalive_ms: u64,

    /// The reconnection delay given to browsers (`retry:`), in milliseconds.
    #[arg(long, env = "FLEET_GATEWAY_RETRY_MS", default_value_t = 1_000)]
    pub retry_ms: u64,

    /// Most missed events one resume sends from a history; further behind is a reset.
    #[arg(long, env = "FLEET_GATEWAY_MAX_RESUME", default_value_t = 10_000)]
    pub max_resume: usize,

    /// Most topics one connection may ask for.
    #[arg(long, env = "FLEET_GATEWAY_MAX_TOPICS", default_value_t = 16)]
    pub max_topics: usize,

    /// This instance's name in the connection registry [default: the host name, i.e. the pod].
    #[arg(long, env = "FLEET_GATEWAY_INSTANCE")]
    pub instance: Option<String>,

    /// The registry's key: a sorted set of instances, and `<key>:<instance>` hashes of
    /// connections per topic (`fleetctl status` reads them).
    #[arg(
        long,
        env = "FLEET_GATEWAY_REGISTRY_KEY",
        default_value = "streamfleet:gateways"
    )]
    pub registry_key: String,

    /// How often this instance writes its connection counts; they expire after three times this.
    #[arg(
        long,
        env = "FLEET_GATEWAY_REGISTRY_INTERVAL_MS",
        default_value_t = 5_000
    )]
    pub registry_interval_ms: u64,
}

impl GatewayArgs {
    /// Refuses values that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |m: &str| Err(ConfigError(m.into()));
        if self.buffer == 0 {
            return fail("FLEET_GATEWAY_BUFFER: must be at least 1");
        }
        if self.keepalive_ms < 100 {
            return fail("FLEET_GATEWAY_KEEPALIVE_MS: must be at least 100");
        }
        if self.max_topics == 0 {
            return fail("FLEET_GATEWAY_MAX_TOPICS: must be at least 1");
        }
        if self.registry_interval_ms < 100 {
            return fail("FLEET_GATEWAY_REGISTRY_INTERVAL_MS: must be at least 100");
        }
        if self.registry_key.trim().is_empty() {
            return fail("FLEET_GATEWAY_REGISTRY_KEY: must not be empty");
        }
        if self
            .instance
            .as_deref()
            .is_some_and(|i| i.trim().is_empty())
        {
            return fail("FLEET_GATEWAY_INSTANCE: must not be empty");
        }
        Ok(())
    }
}
