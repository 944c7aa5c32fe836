//! The flags every worker shares (contract section 5), each with its `FLEET_*` environment twin,
//! and the one-line error exits of the contract.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, ValueEnum};

/// Exit status for bad configuration.
pub const EXIT_CONFIG: u8 = 2;
/// Exit status for a fatal runtime error.
pub const EXIT_FATAL: u8 = 1;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// How to reach Redis; shared by the workers and fleetctl.
#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// Redis URL: redis:// or rediss:// (TLS), with optional ACL user and password
    /// (rediss://user:password@host:port/db); for a Redis Cluster, any node's URL, or several
    /// comma-separated (any one alive is enough to start); for Redis Sentinel,
    /// redis+sentinel://[user:password@]host:26379,host:26379/<master-name>[/<db>].
    #[arg(
        long,
        env = "FLEET_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,

    /// PEM file of the CA that signed the Redis server's certificate [default: the system's roots].
    #[arg(long, env = "FLEET_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// PEM client certificate, for Redis servers that require mutual TLS.
    #[arg(long, env = "FLEET_REDIS_CLIENT_CERT", requires = "redis_client_key")]
    pub redis_client_cert: Option<PathBuf>,

    /// PEM private key of the client certificate.
    #[arg(long, env = "FLEET_REDIS_CLIENT_KEY", requires = "redis_client_cert")]
    pub redis_client_key: Option<PathBuf>,
}

impl RedisArgs {
    /// A client for these settings (the first URL, if several); bad URLs and unreadable files are
    /// configuration errors.
    pub fn client(&self) -> Result<redis::Client, crate::runtime::config::ConfigError> {
        crate::runtime::connect::redis_client(self)
    }

    /// Where the fleet's Redis is, one server or a cluster (found out when connecting); bad URLs
    /// and unreadable files are configuration errors.
    pub fn target(
        &self,
    ) -> Result<crate::runtime::connect::RedisTarget, crate::runtime::config::ConfigError> {
        crate::runtime::connect::redis_target(self)
    }
}

/// The settings of any binary on the runtime: Redis, the HTTP server, the configuration file,
/// logs and the drain.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    #[command(flatten)]
    pub redis: RedisArgs,

    /// Address of /livez, /readyz and /metrics.
    #[arg(long, env = "FLEET_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Optional TOML file: routes, backpressure rules, tuning.
    #[arg(long, env = "FLEET_CONFIG")]
    pub config: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "FLEET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`, `streamfleet=debug`).
    #[arg(long, env = "FLEET_LOG", default_value = "info")]
    pub log: String,

    /// Run even though Redis may evict keys (a `maxmemory-policy` other than `noeviction`):
    /// streams, consumer groups and pending entries can then vanish under memory pressure.
    #[arg(
        long,
        env = "FLEET_REDIS_ALLOW_EVICTION",
        num_args = 0..=1,
        default_missing_value = "true",
        default_value_t = false
    )]
    pub redis_allow_eviction: bool,

    /// Longest the drain after SIGTERM may take before the process exits anyway, in milliseconds.
    #[arg(long, env = "FLEET_SHUTDOWN_GRACE_MS", default_value_t = 25_000)]
    pub shutdown_grace_ms: u64,
}

/// The settings of a consumer-group worker: the runtime's, and what it consumes as whom.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub runtime: RuntimeArgs,

    /// PostgreSQL URL (required where a strict route exists); TLS via sslmode=require|verify-full.
    #[arg(long, env = "FLEET_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Comma-separated stream keys or glob patterns (`orders:*`) to consume; globs are rescanned.
    #[arg(long, env = "FLEET_STREAMS", value_delimiter = ',', required = true)]
    pub streams: Vec<String>,

    /// Consumer group name [default: the worker's name].
    #[arg(long, env = "FLEET_GROUP")]
    pub group: Option<String>,

    /// Consumer name, unique within the group [default: the host name, i.e. the pod name].
    #[arg(long, env = "FLEET_CONSUMER")]
    pub consumer: Option<String>,
}

/// Parses the command line; on a usage error prints one line and exits 2.
pub fn parse<T: Parser>(bin: &str) -> T {
    match T::try_parse() {
        Ok(t) => t,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            let text = e.to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let line = first.join(" ");
            eprintln!(
                "{bin}: {}",
                line.strip_prefix("error: ")
                    .map(|l| format!("error: {l}"))
                    .unwrap_or(line)
            );
            std::process::exit(EXIT_CONFIG as i32);
        }
    }
}

/// Reports a configuration error in one line; exit status 2.
pub fn config_exit(bin: &str, err: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("{bin}: error: {err}");
    ExitCode::from(EXIT_CONFIG)
}

/// Turns a worker's result into its exit status: 0 after a clean drain, 2 on a configuration
/// error found while running (a missing privilege, a consumer name in use), 1 on a fatal error.
pub fn finish(bin: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if e.downcast_ref::<crate::runtime::config::ConfigError>()
                .is_some() =>
        {
            config_exit(bin, &e)
        }
        Err(e) => {
            eprintln!("{bin}: error: {e:#}");
            ExitCode::from(EXIT_FATAL)
        }
    }
}
