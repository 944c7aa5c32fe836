//! fleetctl: the operator's tool: events in (`publish`), what the fleet is doing (`status`,
//! `lag`, `pending`, `checkpoints`, `tail`), dead letters (`dlq`), consumer groups (`groups
//! create`, `replay`), the schema (`migrate`).

mod checkpoints;
mod dlq;
mod duration;
mod entry_ids;
mod gateways;
mod groups;
mod groups_info;
mod lag;
mod output;
mod progress;
mod publish;
mod rebuild;
mod reconcile;
mod redis_read;
mod replay;
mod shards;
mod snapshot;
mod status;
mod streams;
mod tail;
mod trace;
mod trim;

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

    /// How results are printed: aligned tables, or one JSON document for scripts.
    #[arg(long, global = true, value_enum, default_value_t = output::Output::Table)]
    output: output::Output,

    /// No progress bars or progress lines (long operations print only their result).
    #[arg(long, short, global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The fleet on one screen: per stream and group its lag, pending entries, oldest pending
    /// age, dead letters, checkpoint and consumers; --check exits 1 when something needs
    /// attention.
    #[command(after_long_help = status::CHECKS)]
    Status(status::StatusArgs),
    /// Per stream and group: length, lag (as KEDA reads it), pending entries, the oldest pending
    /// entry's age, consumers.
    Lag(lag::LagArgs),
    /// Per consumer: the entries it owns, how long it has been silent, and whether it is dead
    /// (gone while owning entries).
    Pending(lag::LagArgs),
    /// Each group's checkpoint in PostgreSQL (with --database-url) and in Redis, beside its last
    /// delivered id and lag.
    Checkpoints(checkpoints::CheckpointsArgs),
    /// Follow a stream (or a glob's streams) without joining a group, one line per event.
    Tail(tail::TailArgs),
    /// Where one event is: its entries, each group's state for them, its dead letters, its row.
    Trace(trace::TraceArgs),
    /// Dead letters (`<stream>:dlq`): list, show, redrive into their stream, purge.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Move a consumer group back to its checkpoint, an entry id or a time: the entries after it
    /// are delivered to the group again.
    Replay(replay::ReplayArgs),
    /// Compare a stream range with PostgreSQL: strict events missing on either side (exit 1 if
    /// any), the check an auditor runs after an incident.
    Reconcile(reconcile::ReconcileArgs),
    /// Publish v1 events (or any entries, from JSON lines) onto a stream.
    Publish(Box<publish::PublishArgs>),
    /// The streams of an input sharded by key over a Redis Cluster, and which one a key goes to.
    Shards(shards::ShardsArgs),
    /// Consumer groups: create the streams and groups a deployment needs before its workers start.
    #[command(subcommand)]
    Groups(groups::GroupsCommand),
    /// Apply the `[[retention]]` rules of FLEET_CONFIG: trim each stream by age and length,
    /// never past an entry some consumer group has not settled unless the rule allows it.
    Trim(trim::TrimArgs),
    /// Apply the embedded SQL migrations to FLEET_DATABASE_URL.
    Migrate,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = cli::parse(NAME);
    streamfleet::runtime::connect::init_tls();
    match run(cli).await {
        Ok(code) | Err(code) => code,
    }
}

/// Checks what the command needs before connecting (bad configuration exits 2), then runs it.
async fn run(cli: Cli) -> Result<ExitCode, ExitCode> {
    progress::set_quiet(cli.quiet);
    let bad = |e: &dyn std::fmt::Display| cli::config_exit(NAME, e);
    let redis = || cli.redis.target().map_err(|e| bad(&e));
    let store = || -> Result<Option<EventStore>, ExitCode> {
        cli.database_url
            .as_deref()
            .map(|url| EventStore::connect_lazy(url, "FLEET_DATABASE_URL").map_err(|e| bad(&e)))
            .transpose()
    };
    let output = cli.output;
    let result = match cli.command {
        Command::Publish(args) => {
            args.validate().map_err(|e| bad(&e))?;
            let target = redis()?;
            let prepared = args.prepare().map_err(|e| bad(&e))?;
            publish::run(target, *args, prepared, output).await
        }
        Command::Replay(args) => {
            args.validate(cli.database_url.is_some())
                .map_err(|e| bad(&e))?;
            let (target, store) = (redis()?, store()?);
            replay::run(target, store, args, output).await
        }
        Command::Trace(args) => {
            let (target, store) = (redis()?, store()?);
            trace::run(target, store, args, output).await
        }
        Command::Reconcile(args) => {
            args.validate().map_err(|e| bad(&e))?;
            let config = args.load().map_err(|e| bad(&e))?;
            let target = redis()?;
            let Some(store) = store()? else {
                return Err(bad(&"reconcile needs FLEET_DATABASE_URL (--database-url)"));
            };
            reconcile::run(target, store, args, config, output).await
        }
        Command::Dlq(command) => {
            command.validate().map_err(|e| bad(&e))?;
            let target = redis()?;
            dlq::run(target, command, output).await
        }
        Command::Groups(groups::GroupsCommand::Create(args)) => {
            args.validate().map_err(|e| bad(&e))?;
            let (target, store) = (redis()?, store()?);
            groups::create(target, store, args, output).await
        }
        Command::Status(args) => {
            args.validate().map_err(|e| bad(&e))?;
            let (target, store) = (redis()?, store()?);
            match status::run(target, store, args, output).await {
                Ok(true) => Ok(()),
                // --check found problems (printed on stderr): exit 1, no other line.
                Ok(false) => return Ok(ExitCode::from(cli::EXIT_FATAL)),
                Err(e) => Err(e),
            }
        }
        Command::Trim(args) => {
            let config = args.load().map_err(|e| bad(&e))?;
            trim::run(redis()?, config, args, output).await
        }
        Command::Lag(args) => {
            args.select.validate().map_err(|e| bad(&e))?;
            lag::run(redis()?, args, lag::View::Lag, output).await
        }
        Command::Pending(args) => {
            args.select.validate().map_err(|e| bad(&e))?;
            lag::run(redis()?, args, lag::View::Pending, output).await
        }
        Command::Checkpoints(args) => {
            args.validate().map_err(|e| bad(&e))?;
            let (target, store) = (redis()?, store()?);
            checkpoints::run(target, store, args, output).await
        }
        Command::Tail(args) => {
            args.validate().map_err(|e| bad(&e))?;
            tail::run(redis()?, args, output).await
        }
        Command::Shards(args) => {
            args.validate().map_err(|e| bad(&e))?;
            shards::run(&args, output);
            Ok(())
        }
        Command::Migrate => {
            let Some(store) = store()? else {
                return Err(bad(&"FLEET_DATABASE_URL (--database-url) is required"));
            };
            store
                .migrate()
                .await
                .map_err(anyhow::Error::from)
                .map(|()| {
                    let known = streamfleet::store::MIGRATOR.iter().count();
                    match output {
                        output::Output::Json => output::json(
                            &serde_json::json!({"migrated": true, "migrations": known}),
                        ),
                        output::Output::Table => println!("migrations applied ({known} known)"),
                    }
                })
        }
    };
    if let Err(e) = &result {
        output::error_document(output, e);
    }
    Ok(cli::finish(NAME, result))
}
