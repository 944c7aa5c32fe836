//! fleetctl: the operator's tool. For now: `publish` (events onto a stream), `migrate` and
//! `groups create`.

mod groups;
mod publish;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use streamfleet::runtime::cli;
use streamfleet::store::EventStore;

/// mimalloc: the pipeline allocates and frees many small buffers per entry (Redis replies);
/// glibc's allocator spent a quarter of the CPU on them in profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NAME: &str = "fleetctl";

/// Operate a streamfleet deployment.
#[derive(Debug, Parser)]
#[command(name = NAME, version)]
struct Cli {
    #[command(flatten)]
    redis: cli::RedisArgs,

    /// PostgreSQL URL.
    #[arg(
        long,
        global = true,
        env = "FLEET_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish v1 events (or any entries, from JSON lines) onto a stream.
    Publish(Box<publish::PublishArgs>),
    /// Apply the embedded SQL migrations to FLEET_DATABASE_URL.
    Migrate,
    /// Consumer groups: create the streams and groups a deployment needs before its workers start.
    #[command(subcommand)]
    Groups(groups::GroupsCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = cli::parse(NAME);
    streamfleet::runtime::connect::init_tls();
    match cli.command {
        Command::Publish(args) => {
            let client = match cli.redis.client() {
                Ok(c) => c,
                Err(e) => return cli::config_exit(NAME, &e),
            };
            match args.validate() {
                Ok(()) => cli::finish(NAME, publish::run(client, *args).await),
                Err(e) => cli::config_exit(NAME, &e),
            }
        }
        Command::Groups(groups::GroupsCommand::Create(args)) => {
            let client = match cli.redis.client() {
                Ok(c) => c,
                Err(e) => return cli::config_exit(NAME, &e),
            };
            if let Err(e) = args.validate() {
                return cli::config_exit(NAME, &e);
            }
            let store = match cli.database_url.as_deref() {
                None => None,
                Some(url) => match EventStore::connect_lazy(url, "FLEET_DATABASE_URL") {
                    Ok(s) => Some(s),
                    Err(e) => return cli::config_exit(NAME, &e),
                },
            };
            cli::finish(NAME, groups::create(client, store, args).await)
        }
        Command::Migrate => {
            let store = match cli.database_url.as_deref() {
                None => {
                    return cli::config_exit(
                        NAME,
                        &"FLEET_DATABASE_URL (--database-url) is required",
                    )
                }
                Some(url) => match EventStore::connect_lazy(url, "FLEET_DATABASE_URL") {
                    Ok(s) => s,
                    Err(e) => return cli::config_exit(NAME, &e),
                },
            };
            let result = store
                .migrate()
                .await
                .map_err(anyhow::Error::from)
                .map(|()| {
                    println!(
                        "migrations applied ({} known)",
                        streamfleet::store::MIGRATOR.iter().count()
                    );
                });
            cli::finish(NAME, result)
        }
    }
}
