//! `fleetctl shards`: the streams of an input sharded by key (`<prefix>:{<tag>}`, tags whose hash
//! slots spread evenly over the 16 384, one shard per master of an evenly split cluster), and
//! which shard a key goes to: what a producer in any language reproduces (CRC16-XMODEM of the
//! event's ordering key, its `key` or else its `channel`, modulo the number of shards).

use clap::Args;
use serde_json::json;
use streamfleet::stream::keys::{shard_of, shard_stream, slot};

use crate::output::Output;

#[derive(Debug, Args)]
pub struct ShardsArgs {
    /// The prefix of the shards' stream names (`events` → `events:{0.1}`, `events:{1}`, …).
    #[arg(long)]
    stream: String,

    /// How many shards.
    #[arg(long, value_name = "N")]
    count: usize,

    /// Also say which shard these ordering keys go to (repeatable).
    #[arg(long)]
    key: Vec<String>,
}

impl ShardsArgs {
    /// A prefix and at least one shard.
    pub fn validate(&self) -> Result<(), String> {
        crate::streams::validate_key(&self.stream, "--stream")?;
        if self.count == 0 {
            return Err("shards: --count must be at least 1".into());
        }
        if self.stream.contains(['{', '}']) {
            return Err(
                "shards: --stream is the prefix, without braces: the shard is the hash tag".into(),
            );
        }
        Ok(())
    }
}

/// Prints the shards and where the keys go; connects to nothing.
pub fn run(args: &ShardsArgs, output: Output) {
    let streams: Vec<String> = (0..args.count)
        .map(|i| shard_stream(&args.stream, i, args.count))
        .collect();
    let keys: Vec<(&str, &str)> = args
        .key
        .iter()
        .map(|k| (k.as_str(), streams[shard_of(k, args.count)].as_str()))
        .collect();
    match output {
        Output::Json => crate::output::json(&json!({
            "shards": streams.iter().map(|s| json!({"stream": s, "slot": slot(s)})).collect::<Vec<_>>(),
            "keys": keys.iter().map(|(k, s)| json!({"key": k, "stream": s})).collect::<Vec<_>>(),
        })),
        Output::Table => {
            for s in &streams {
                println!("{s:<40} slot {}", slot(s));
            }
            for (k, s) in &keys {
                println!("{k} -> {s}");
            }
        }
    }
}
