//! Harness for black-box tests: the real worker binaries against the real redis-server and
//! PostgreSQL started by `scripts/services`. Every test gets its own database and its own stream
//! keys, so tests run in parallel without seeing each other.

pub mod corpus;
pub mod fleetctl;
pub mod gateway;
pub mod outcome;
pub mod projector;
pub mod scenario;
pub mod servers;
pub mod sse;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::Value;
use tokio::process::{Child, Command};

/// Redis URL of the test server (`scripts/services env`).
pub fn redis_url() -> String {
    std::env::var("FLEET_REDIS_URL").unwrap_or_else(|_| {
        let port = std::env::var("STREAMFLEET_REDIS_PORT").unwrap_or_else(|_| "6399".into());
        format!("redis://127.0.0.1:{port}")
    })
}

fn pg_base() -> String {
    let port = std::env::var("STREAMFLEET_PG_PORT").unwrap_or_else(|_| "5499".into());
    format!("postgres://postgres@127.0.0.1:{port}")
}

/// A file of the repository (deploy/, schemas/, ...), by its path from the root.
pub fn repo_path(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
        .display()
        .to_string()
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// Path of a workspace binary, built by `cargo build` (scripts/test does it first), or found in
/// `STREAMFLEET_BIN_DIR` when set (to run the suite against another build, e.g. an older one).
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("STREAMFLEET_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// A fresh database for one test, with its URL.
pub async fn fresh_database() -> String {
    let name = unique("t_");
    let admin = format!("{}/streamfleet", pg_base());
    let pool = sqlx::PgPool::connect(&admin)
        .await
        .expect("PostgreSQL is not reachable: run scripts/services");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&pool)
        .await
        .expect("create database");
    pool.close().await;
    format!("{}/{name}", pg_base())
}

/// Connection settings for test checks: generous response timeout.
pub fn slow_ok() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)))
}

/// A connection to the test Redis.
pub async fn redis() -> MultiplexedConnection {
    redis_at(&redis_url()).await
}

/// A connection to the Redis at `url`.
pub async fn redis_at(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        // Reading back whole streams can take longer than redis-rs's 500 ms default on 2 busy cores.
        .get_multiplexed_async_connection_with_config(&slow_ok())
        .await
        .expect("Redis is not reachable: run scripts/services")
}

/// URL of one node of the shared test cluster (`scripts/services cluster`): the workers and
/// fleetctl are given one node, as a deployment gives them, and find the others.
pub fn cluster_url() -> String {
    std::env::var("STREAMFLEET_CLUSTER_URL").unwrap_or_else(|_| {
        let port = std::env::var("STREAMFLEET_CLUSTER_PORT").unwrap_or_else(|_| "7391".into());
        format!("redis://127.0.0.1:{port}")
    })
}

/// A connection to the shared test cluster (redis-rs routes each command by its key), for the
/// tests' own checks.
pub async fn cluster() -> ClusterConnection {
    redis::cluster::ClusterClientBuilder::new(vec![cluster_url()])
        .response_timeout(Duration::from_secs(30))
        .build()
        .unwrap()
        .get_async_connection()
        .await
        .expect("the test cluster is not reachable: run scripts/services cluster")
}

/// One hash tag per master of the cluster, in the order of `CLUSTER SLOTS` (the first letter
/// whose slot each master serves): streams named with them span every master, which `{0}`,
/// `{1}`, `{2}` do not on a cluster of three (`{1}` and `{2}` share a master).
pub async fn tags_per_master(conn: &mut ClusterConnection) -> Vec<String> {
    let ranges: Vec<Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(conn)
        .await
        .expect("CLUSTER SLOTS");
    // Per master (host:port of the first node of a range), its ranges.
    let mut masters: Vec<(String, Vec<(i64, i64)>)> = Vec::new();
    for range in ranges {
        let Value::Array(items) = range else { continue };
        let (Some(Value::Int(a)), Some(Value::Int(b)), Some(Value::Array(node))) =
            (items.first(), items.get(1), items.get(2))
        else {
            continue;
        };
        let addr = format!(
            "{}:{}",
            redis::from_redis_value::<String>(node[0].clone()).unwrap(),
            redis::from_redis_value::<i64>(node[1].clone()).unwrap()
        );
        match masters.iter_mut().find(|(m, _)| *m == addr) {
            Some((_, slots)) => slots.push((*a, *b)),
            None => masters.push((addr, vec![(*a, *b)])),
        }
    }
    let mut tags = Vec::new();
    for (_, slots) in &masters {
        for tag in ('a'..='z').map(String::from) {
            let slot: i64 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&tag)
                .query_async(conn)
                .await
                .expect("CLUSTER KEYSLOT");
            if slots.iter().any(|&(a, b)| (a..=b).contains(&slot)) {
                tags.push(tag);
                break;
            }
        }
    }
    assert_eq!(tags.len(), masters.len(), "a tag on every master");
    tags
}

/// A number in `lo..hi` that differs from run to run (no seed to manage: the point is to hit
/// different moments).
pub fn random_between(lo: u64, hi: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    lo + (nanos.wrapping_mul(6364136223846793005) >> 33) % (hi - lo)
}

/// Creates `group` on `stream` from its first entry (a deployment creates groups up front).
pub async fn create_group<C: ConnectionLike + Send>(conn: &mut C, stream: &str, group: &str) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .query_async(conn)
        .await
        .unwrap();
}

/// Pub/Sub messages received: (channel, payload as JSON).
pub type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>;

/// A subscriber of `pattern` (PSUBSCRIBE) on the Redis at `url`, subscribed when this returns;
/// every message it receives is appended.
pub async fn subscriber_at(url: &str, pattern: &str) -> Received {
    use futures_util::StreamExt;
    let client = redis::Client::open(url).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.psubscribe(pattern).await.unwrap();
    let received: Received = Received::default();
    let sink = received.clone();
    tokio::spawn(async move {
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let payload: String = msg.get_payload().unwrap();
            sink.lock().unwrap().push((
                msg.get_channel_name().to_owned(),
                serde_json::from_str(&payload).unwrap(),
            ));
        }
    });
    received
}

/// A free loopback port for a worker's HTTP endpoints.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Polls `check` until it returns true, or panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A running worker process, killed if the test ends early.
pub struct Worker {
    child: Child,
    pub http: String,
    log: PathBuf,
}

/// What a worker run needs: its environment, all `FLEET_*` settings explicit.
#[derive(Clone, Debug)]
pub struct WorkerEnv {
    pub vars: Vec<(String, String)>,
}

impl WorkerEnv {
    /// Settings for a persister on `streams` with its own database.
    pub fn new(streams: &str, database_url: &str) -> Self {
        WorkerEnv {
            vars: vec![
                ("FLEET_REDIS_URL".into(), redis_url()),
                ("FLEET_DATABASE_URL".into(), database_url.into()),
                ("FLEET_STREAMS".into(), streams.into()),
                ("FLEET_CONSUMER".into(), "c1".into()),
                ("FLEET_LOG".into(), "info".into()),
            ],
        }
    }

    /// Sets (or replaces) a variable.
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.into(), value.into()));
        self
    }

    /// Removes a variable.
    pub fn unset(mut self, key: &str) -> Self {
        self.vars.retain(|(k, _)| k != key);
        self
    }

    fn command(&self, binary: &str) -> Command {
        let mut cmd = Command::new(bin(binary));
        cmd.env_clear();
        if let Ok(path) = std::env::var("PATH") {
            cmd.env("PATH", path);
        }
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `binary` to completion (at most 20 s); returns its status and stderr.
    pub async fn run_to_end(&self, binary: &str) -> (ExitStatus, String) {
        let run = self
            .command(binary)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .unwrap_or_else(|_| panic!("{binary} with {:?} did not exit within 20 s", self.vars))
            .expect("run binary");
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `binary` with arguments to completion; returns its status and stderr.
    pub async fn run_to_end_with_args(&self, binary: &str, args: &[&str]) -> (ExitStatus, String) {
        let out = self
            .command(binary)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run binary");
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Publishes `lines` to `stream` with the real fleetctl under these settings (a URL, TLS
    /// files, a user): what a producer with the same settings would write.
    pub async fn publish(&self, stream: &str, lines: &[String]) {
        let file = std::env::temp_dir().join(format!("{}.jsonl", unique("pub")));
        std::fs::write(&file, lines.join("\n")).unwrap();
        let (status, stderr) = self
            .run_to_end_with_args(
                "fleetctl",
                &[
                    "publish",
                    "--no-validate",
                    "--stream",
                    stream,
                    "--file",
                    &file.display().to_string(),
                ],
            )
            .await;
        let _ = std::fs::remove_file(file);
        assert!(status.success(), "fleetctl publish to {stream}: {stderr}");
    }

    /// Starts `binary` and waits for `/readyz`.
    pub async fn start(&self, binary: &str) -> Worker {
        let mut worker = self.spawn(binary).await;
        worker.wait_ready().await;
        worker
    }

    /// Starts `binary` and waits for `/livez` only: for a worker expected to be unready at once
    /// (a fault it meets with its first batch).
    pub async fn start_live(&self, binary: &str) -> Worker {
        let mut worker = self.spawn(binary).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(&worker.http, "/livez").await.map(|(c, _)| c) != Some(200) {
            worker.assert_running();
            assert!(Instant::now() < deadline, "worker never answered /livez");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        worker
    }

    /// Starts `binary` and returns at once, whatever state it is in.
    pub async fn spawn_only(&self, binary: &str) -> Worker {
        self.spawn(binary).await
    }

    async fn spawn(&self, binary: &str) -> Worker {
        let http = free_addr();
        let log = std::env::temp_dir().join(format!("{}.log", unique(binary)));
        let file = std::fs::File::create(&log).unwrap();
        let child = self
            .command(binary)
            .env("FLEET_HTTP_ADDR", &http)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn worker");
        Worker { child, http, log }
    }
}

impl Worker {
    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("worker exited early with {status}:\n{}", self.log_text());
            }
            if http_get(&self.http, "/readyz").await.map(|(c, _)| c) == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "worker never became ready:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asserts that the process has not exited (a crash would otherwise show only as a timeout).
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("worker exited with {status}:\n{}", self.log_text());
        }
    }

    /// The status code and body of `/readyz`.
    pub async fn readyz(&self) -> (u16, String) {
        http_get(&self.http, "/readyz")
            .await
            .unwrap_or((0, String::new()))
    }

    /// The peak resident memory of the process so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM")
            * 1024
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// SIGTERM, then asserts a clean exit (status 0) within 20 s: the graceful drain.
    pub async fn stop_cleanly(&mut self) {
        self.signal("TERM").await;
        let status = self.wait(Duration::from_secs(20)).await;
        assert!(status.success(), "exit after SIGTERM: {status}");
    }

    /// Sends a signal by name (`TERM`, `KILL`, ...).
    pub async fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .await
            .unwrap();
        assert!(status.success(), "kill -{name}");
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!(
                "worker did not exit within {timeout:?}:\n{}",
                self.log_text()
            ),
        }
    }

    /// The value of a counter or gauge line from `/metrics` (summed over label sets matching `labels`).
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = http_get(&self.http, "/metrics").await.expect("metrics");
        body.lines()
            .filter(|l| l.starts_with(name) && l.contains(labels))
            .filter(|l| l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// What the worker logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A minimal HTTP/1.1 GET (no client library needed for three fixed endpoints).
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((code, body))
}

/// Publishes JSON-line entries with the real `fleetctl publish --file`.
pub async fn publish_lines(stream: &str, lines: &[String]) {
    publish_lines_to(&redis_url(), stream, lines).await
}

/// Publishes JSON-line entries to the Redis at `url`, as they are (malformed ones included:
/// `--no-validate`).
pub async fn publish_lines_to(url: &str, stream: &str, lines: &[String]) {
    let file = std::env::temp_dir().join(format!("{}.jsonl", unique("pub")));
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = Command::new(bin("fleetctl"))
        .env("FLEET_REDIS_URL", url)
        .args(["publish", "--no-validate", "--stream", stream, "--file"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "fleetctl publish: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(file);
}

/// Publishes `lines` to the Redis at `url` in chunks of `chunk`, pausing `gap` after each: a
/// steady load while a test does something to the worker or a server.
pub async fn publish_in_chunks(
    url: String,
    stream: String,
    lines: Vec<String>,
    chunk: usize,
    gap: Duration,
) {
    for part in lines.chunks(chunk) {
        publish_lines_to(&url, &stream, part).await;
        tokio::time::sleep(gap).await;
    }
}

/// One stream entry: its id and fields.
pub type StreamEntry = (String, HashMap<String, String>);

/// Every entry of a stream, in order.
pub async fn read_stream<C: ConnectionLike + Send>(conn: &mut C, stream: &str) -> Vec<StreamEntry> {
    let mut out = Vec::new();
    let mut start = "-".to_string();
    loop {
        let page: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(5000)
            .query_async(conn)
            .await
            .unwrap();
        let Some((last, _)) = page.last() else { break };
        start = format!("({last}");
        out.extend(page);
    }
    out
}

/// Pending entries of `group` on `stream` (0 if the group has none).
pub async fn pending<C: ConnectionLike + Send>(conn: &mut C, stream: &str, group: &str) -> u64 {
    let reply: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await
        .unwrap();
    match reply {
        Value::Array(items) => match items.first() {
            Some(Value::Int(n)) => *n as u64,
            _ => 0,
        },
        _ => 0,
    }
}

/// Entries of `stream` not yet delivered to `group` (XINFO GROUPS `lag`).
pub async fn lag<C: ConnectionLike + Send>(conn: &mut C, stream: &str, group: &str) -> Option<u64> {
    let groups: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .ok()?;
    let g = groups
        .iter()
        .find(|g| matches!(g.get("name"), Some(Value::BulkString(n)) if n == group.as_bytes()))?;
    match g.get("lag") {
        Some(Value::Int(n)) => Some(*n as u64),
        _ => None,
    }
}

/// An entry id as a sortable pair (`9-0` < `10-0`, unlike the text).
pub fn entry_id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Moves `group` of `stream` to `id` (`XGROUP SETID`: what `fleetctl replay` does).
pub async fn move_group<C: ConnectionLike + Send>(
    conn: &mut C,
    stream: &str,
    group: &str,
    id: &str,
) {
    let _: () = redis::cmd("XGROUP")
        .arg("SETID")
        .arg(stream)
        .arg(group)
        .arg(id)
        .query_async(conn)
        .await
        .unwrap();
}

/// Makes `consumer` of `group` (created from the start of `stream`) read `count` entries and never
/// acknowledge them: what a consumer that crashed after reading leaves behind.
pub async fn abandon_entries<C: ConnectionLike + Send>(
    conn: &mut C,
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .query_async(conn)
        .await
        .unwrap();
    deliver(conn, stream, group, consumer, count).await;
    assert_eq!(pending(conn, stream, group).await, count as u64);
}

/// Delivers up to `count` new entries of `stream` to `consumer` of `group`, unacknowledged.
pub async fn deliver<C: ConnectionLike + Send>(
    conn: &mut C,
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
) -> Vec<String> {
    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(conn)
        .await
        .unwrap();
    reply
        .keys
        .into_iter()
        .flat_map(|k| k.ids)
        .map(|e| e.id)
        .collect()
}
