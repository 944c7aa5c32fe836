//! The gateway benchmark's load client (`BENCH_ONLY=gateway scripts/bench/run`): many SSE
//! connections held at once, or one plain Pub/Sub subscriber (the baseline), or timed resumes;
//! each message's latency is its receipt less the send time the producer wrote into the event's
//! `data` (`"sent_ns"`, nanoseconds since the epoch, this machine's clock).
//!
//! ```text
//! sse_load sse    --addr 127.0.0.1:18160 --path '/events?topic=gw.f{i}.progress' --connections 10000
//!                 [--first 0] [--concurrency 200] [--retries 5] [--threads 1]
//! sse_load pubsub --addr 127.0.0.1:7590 --pattern 'fleet:gw.*' [--threads 1]
//! sse_load resume --addr 127.0.0.1:18160 --path '/events?topic=gw.r.progress' --last-event-id <id>
//!                 --expect 1000 [--last-id <id>] [--tries 7] [--timeout-ms 10000]
//! ```
//!
//! `sse` opens `--connections` streams (`{i}` in `--path` numbered from `--first`), at most
//! `--concurrency` connecting at a time, and prints `{"event":"ready",…}` once each is open or
//! has failed; `pubsub` prints it once `PSUBSCRIBE` is confirmed. Both then read commands on
//! standard input, one a line, and answer each with one JSON line on standard output: `mark`
//! (forget what was counted: the measured window starts), `count` (messages since the mark),
//! `report` (counts and latency percentiles since the mark), `dump <path>` (each message since the
//! mark as `<seq> <latency ns>`, `seq` being the event's `data.seq`, -1 without one: to pair two
//! clients' receipts of the same events), `quit` (or the end of the input).
//! `resume` connects `--tries` times with `Last-Event-ID`, each time until `--expect` messages
//! arrived, and prints the times from the request to the last of them, and their median.

use std::collections::HashMap;
use std::io::BufRead;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use streamfleet_tests::sse;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};

/// The key the producer writes the send time under, in the event's `data`.
const SENT_KEY: &str = "\"sent_ns\":";
/// The key of the event's number, beside it.
const SEQ_KEY: &str = "\"seq\":";

fn main() {
    let mut argv = std::env::args().skip(1);
    let mode = argv.next().unwrap_or_default();
    let args = Args::parse(argv);
    let threads: usize = args.num("threads", 1);
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let runtime = runtime.expect("tokio runtime");
    let outcome = runtime.block_on(async move {
        match mode.as_str() {
            "sse" => hold_streams(&args).await,
            "pubsub" => subscribe(&args).await,
            "resume" => resumes(&args).await,
            _ => Err(format!(
                "usage: sse_load sse|pubsub|resume --addr HOST:PORT … (got {mode:?}; see the file's doc)"
            )),
        }
    });
    match outcome {
        // Ten thousand tasks and sockets: the process exit frees them faster than dropping each.
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("sse_load: {e}");
            std::process::exit(1);
        }
    }
}

/// `--name value` pairs.
struct Args(HashMap<String, String>);

impl Args {
    fn parse(argv: impl Iterator<Item = String>) -> Args {
        let mut map = HashMap::new();
        let mut argv = argv.peekable();
        while let Some(a) = argv.next() {
            let Some(name) = a.strip_prefix("--") else {
                eprintln!("sse_load: unexpected argument {a:?}");
                std::process::exit(2);
            };
            let value = argv.next().unwrap_or_default();
            map.insert(name.to_owned(), value);
        }
        Args(map)
    }

    fn text(&self, name: &str) -> Result<String, String> {
        self.0
            .get(name)
            .cloned()
            .ok_or_else(|| format!("--{name} is required"))
    }

    fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        match self.0.get(name) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| {
                eprintln!("sse_load: --{name} {v:?}: not a number");
                std::process::exit(2);
            }),
        }
    }
}

fn wall_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

/// The send time written into the event's `data`, read without parsing the whole event: the
/// digits after the first `"sent_ns":` (no other field is named so).
fn sent_ns(text: &[u8]) -> Option<i64> {
    number_after(text, SENT_KEY)
}

/// The number after the first `key` in `text`.
fn number_after(text: &[u8], key: &str) -> Option<i64> {
    let key = key.as_bytes();
    let at = text.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = text[at..]
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit());
    let mut n: i64 = 0;
    let mut any = false;
    for d in digits {
        n = n.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

/// What was received since the last `mark`.
struct Stats {
    /// Receipt less send time, per message that carried one, in nanoseconds.
    latencies: Vec<i64>,
    /// The `seq` of each of those messages (-1 without one), for `dump`.
    seqs: Vec<i64>,
    /// Messages without a send time (a reset, another producer's event).
    other: u64,
    /// Messages per connection.
    per_connection: Vec<u32>,
}

impl Stats {
    fn new(connections: usize) -> Stats {
        Stats {
            latencies: Vec::with_capacity(1 << 20),
            seqs: Vec::with_capacity(1 << 20),
            other: 0,
            per_connection: vec![0; connections],
        }
    }

    fn record(&mut self, connection: usize, data: &[u8], received_ns: i64) {
        match sent_ns(data) {
            Some(sent) => {
                self.latencies.push(received_ns - sent);
                self.seqs.push(number_after(data, SEQ_KEY).unwrap_or(-1));
            }
            None => self.other += 1,
        }
        if let Some(c) = self.per_connection.get_mut(connection) {
            *c = c.saturating_add(1);
        }
    }

    fn mark(&mut self) {
        self.latencies.clear();
        self.seqs.clear();
        self.other = 0;
        self.per_connection.iter_mut().for_each(|c| *c = 0);
    }

    /// `seq latency_ns` a line, in the order received, to `path`.
    fn dump(&self, path: &str) -> std::io::Result<usize> {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (seq, ns) in self.seqs.iter().zip(&self.latencies) {
            writeln!(out, "{seq} {ns}")?;
        }
        out.flush()?;
        Ok(self.latencies.len())
    }

    fn report(&self, open: usize, ended: usize) -> serde_json::Value {
        let mut ms: Vec<f64> = self.latencies.iter().map(|ns| *ns as f64 / 1e6).collect();
        ms.sort_by(f64::total_cmp);
        // The harness's rule (scripts/bench/run, `percentile`).
        let pct = |q: f64| -> Option<f64> {
            (!ms.is_empty()).then(|| ms[((q * ms.len() as f64) as usize).min(ms.len() - 1)])
        };
        let mean = (!ms.is_empty()).then(|| ms.iter().sum::<f64>() / ms.len() as f64);
        let per = &self.per_connection;
        json!({
            "event": "report",
            "received": self.latencies.len(),
            "other": self.other,
            "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99), "p999_ms": pct(0.999),
            "min_ms": ms.first(), "max_ms": ms.last(), "mean_ms": mean,
            "open": open,
            "ended": ended,
            "silent": per.iter().filter(|c| **c == 0).count(),
            "per_connection_min": per.iter().min(),
            "per_connection_max": per.iter().max(),
        })
    }
}

fn lock(stats: &Mutex<Stats>) -> std::sync::MutexGuard<'_, Stats> {
    stats.lock().unwrap_or_else(|e| e.into_inner())
}

/// Standard input's lines, read by a thread of their own (tokio's stdin is not enabled here).
fn commands() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim().to_owned()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Answers `mark`, `count`, `report` until `quit` or the end of the input.
async fn serve_commands(stats: &Mutex<Stats>, open: &AtomicUsize, ended: &AtomicUsize) {
    let mut rx = commands();
    while let Some(cmd) = rx.recv().await {
        let line = match cmd.as_str() {
            "mark" => {
                lock(stats).mark();
                json!({"event": "marked"})
            }
            "count" => {
                let s = lock(stats);
                json!({"event": "count", "received": s.latencies.len(), "other": s.other,
                       "ended": ended.load(Ordering::Relaxed)})
            }
            "report" => {
                let s = lock(stats);
                s.report(open.load(Ordering::Relaxed), ended.load(Ordering::Relaxed))
            }
            "quit" => break,
            "" => continue,
            dump if dump.starts_with("dump ") => {
                let path = dump["dump ".len()..].trim();
                match lock(stats).dump(path) {
                    Ok(lines) => json!({"event": "dumped", "lines": lines, "path": path}),
                    Err(e) => json!({"event": "dumped", "error": format!("{path}: {e}")}),
                }
            }
            other => json!({"event": "error", "error": format!("unknown command {other:?}")}),
        };
        println!("{line}");
    }
}

/// The outcome of opening one stream.
enum Opened {
    Yes,
    No(String),
}

async fn hold_streams(args: &Args) -> Result<(), String> {
    let addr = args.text("addr")?;
    let path = args.text("path")?;
    let n: usize = args.num("connections", 1);
    let first: usize = args.num("first", 0);
    let concurrency: usize = args.num("concurrency", 200);
    let retries: usize = args.num("retries", 5);
    let stats = Arc::new(Mutex::new(Stats::new(n)));
    let open = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Opened>();
    let started = Instant::now();
    for i in 0..n {
        let path = path.replace("{i}", &(first + i).to_string());
        let (addr, stats, open, ended, gate, done) = (
            addr.clone(),
            stats.clone(),
            open.clone(),
            ended.clone(),
            gate.clone(),
            done_tx.clone(),
        );
        tokio::spawn(async move {
            let permit = gate.acquire_owned().await.expect("semaphore");
            let mut last_error = String::new();
            let mut client = None;
            for attempt in 0..=retries {
                match sse::connect(&addr, &path, &[]).await {
                    Ok(c) if c.status == 200 => {
                        client = Some(c);
                        break;
                    }
                    Ok(c) => {
                        last_error = format!("status {}", c.status);
                        break;
                    }
                    Err(e) => last_error = e.to_string(),
                }
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))).await;
            }
            drop(permit);
            let Some(mut client) = client else {
                let _ = done.send(Opened::No(last_error));
                return;
            };
            open.fetch_add(1, Ordering::Relaxed);
            let _ = done.send(Opened::Yes);
            drop(done);
            loop {
                match client.next(Duration::from_secs(24 * 3600)).await {
                    Some(m) => {
                        let now = wall_ns();
                        lock(&stats).record(i, m.data.as_bytes(), now);
                    }
                    None if client.ended() => break,
                    None => {}
                }
            }
            open.fetch_sub(1, Ordering::Relaxed);
            ended.fetch_add(1, Ordering::Relaxed);
        });
    }
    drop(done_tx);
    let (mut connected, mut failed) = (0usize, 0usize);
    let mut errors: HashMap<String, usize> = HashMap::new();
    while let Some(outcome) = done_rx.recv().await {
        match outcome {
            Opened::Yes => connected += 1,
            Opened::No(e) => {
                failed += 1;
                *errors.entry(e).or_default() += 1;
            }
        }
        if connected + failed == n {
            break;
        }
    }
    println!(
        "{}",
        json!({"event": "ready", "connected": connected, "failed": failed, "errors": errors,
               "seconds": started.elapsed().as_secs_f64()})
    );
    serve_commands(&stats, &open, &ended).await;
    Ok(())
}

/// One RESP value of a Pub/Sub reply: a bulk string's bytes (as a range of the buffer) or an
/// integer.
enum Item {
    Bulk(std::ops::Range<usize>),
    Int,
}

/// The line ending at `from`: its text and where the next begins.
fn line(buf: &[u8], from: usize) -> Option<(&[u8], usize)> {
    let end = buf[from..].windows(2).position(|w| w == b"\r\n")? + from;
    Some((&buf[from..end], end + 2))
}

/// The array reply at `pos` and where the next begins, or `None` while it has not all arrived.
fn array(buf: &[u8], pos: usize) -> Result<Option<(Vec<Item>, usize)>, String> {
    let Some((head, mut at)) = line(buf, pos) else {
        return Ok(None);
    };
    let count: usize = match head.split_first() {
        Some((b'*', n)) => std::str::from_utf8(n)
            .ok()
            .and_then(|n| n.parse().ok())
            .ok_or("bad array header")?,
        _ => {
            return Err(format!(
                "unexpected reply {:?}",
                String::from_utf8_lossy(head)
            ))
        }
    };
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        let Some((head, next)) = line(buf, at) else {
            return Ok(None);
        };
        match head.split_first() {
            Some((b'$', n)) => {
                let len: usize = std::str::from_utf8(n)
                    .ok()
                    .and_then(|n| n.parse().ok())
                    .ok_or("bad bulk header")?;
                if buf.len() < next + len + 2 {
                    return Ok(None);
                }
                items.push(Item::Bulk(next..next + len));
                at = next + len + 2;
            }
            Some((b':', _)) => {
                items.push(Item::Int);
                at = next;
            }
            _ => {
                return Err(format!(
                    "unexpected item {:?}",
                    String::from_utf8_lossy(head)
                ))
            }
        }
    }
    Ok(Some((items, at)))
}

async fn subscribe(args: &Args) -> Result<(), String> {
    let addr = args.text("addr")?;
    let pattern = args.text("pattern")?;
    let mut socket = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let request = format!(
        "*2\r\n$10\r\nPSUBSCRIBE\r\n${}\r\n{pattern}\r\n",
        pattern.len()
    );
    socket
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let stats = Arc::new(Mutex::new(Stats::new(1)));
    let open = Arc::new(AtomicUsize::new(1));
    let ended = Arc::new(AtomicUsize::new(0));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = {
        let (stats, open, ended) = (stats.clone(), open.clone(), ended.clone());
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
            let mut chunk = vec![0u8; 1 << 16];
            let outcome: Result<(), String> = async {
                loop {
                    let n = socket.read(&mut chunk).await.map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("Redis closed the connection".into());
                    }
                    let now = wall_ns();
                    buf.extend_from_slice(&chunk[..n]);
                    let mut pos = 0;
                    while let Some((items, next)) = array(&buf, pos)? {
                        match items.as_slice() {
                            [Item::Bulk(kind), _, _, Item::Bulk(payload)]
                                if &buf[kind.clone()] == b"pmessage" =>
                            {
                                lock(&stats).record(0, &buf[payload.clone()], now);
                            }
                            [Item::Bulk(kind), _, Item::Int]
                                if &buf[kind.clone()] == b"psubscribe" =>
                            {
                                if let Some(r) = ready.take() {
                                    let _ = r.send(());
                                }
                            }
                            _ => {}
                        }
                        pos = next;
                    }
                    buf.drain(..pos);
                }
            }
            .await;
            open.store(0, Ordering::Relaxed);
            ended.store(1, Ordering::Relaxed);
            if let Err(e) = outcome {
                eprintln!("sse_load: subscriber: {e}");
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .map_err(|_| "PSUBSCRIBE not confirmed within 10 s".to_string())?
        .map_err(|_| "the subscriber ended before PSUBSCRIBE was confirmed".to_string())?;
    println!("{}", json!({"event": "ready", "connected": 1, "failed": 0}));
    serve_commands(&stats, &open, &ended).await;
    reader.abort();
    Ok(())
}

async fn resumes(args: &Args) -> Result<(), String> {
    let addr = args.text("addr")?;
    let path = args.text("path")?;
    let cursor = args.text("last-event-id")?;
    let expect: usize = args.num("expect", 1000);
    let tries: usize = args.num("tries", 7);
    let timeout = Duration::from_millis(args.num("timeout-ms", 10_000));
    let last_id = args.0.get("last-id").cloned();
    let mut runs = Vec::new();
    for _ in 0..tries {
        let t0 = Instant::now();
        let mut client = sse::connect(&addr, &path, &[("Last-Event-ID", &cursor)])
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let head_ms = t0.elapsed().as_secs_f64() * 1e3;
        if client.status != 200 {
            let status = client.status;
            let body = client.read_body(Duration::from_secs(1)).await;
            return Err(format!("resume refused: status {status}: {}", body.trim()));
        }
        let (mut count, mut resets, mut first_ms) = (0usize, 0usize, None);
        let (mut first, mut last) = (String::new(), String::new());
        let deadline = t0 + timeout;
        while count < expect {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(m) = client.next(left).await else {
                break;
            };
            if count == 0 {
                first_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
                first = m.id.clone();
            }
            if m.event == "reset" {
                resets += 1;
            }
            last = m.id;
            count += 1;
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let complete = count == expect
            && resets == 0
            && last_id.as_deref().is_none_or(|want| want == last.as_str());
        runs.push(
            json!({"ms": ms, "head_ms": head_ms, "first_ms": first_ms, "messages": count,
                         "resets": resets, "first_id": first, "last_id": last,
                         "complete": complete}),
        );
        drop(client);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut ms: Vec<f64> = runs.iter().filter_map(|r| r["ms"].as_f64()).collect();
    ms.sort_by(f64::total_cmp);
    let median = if ms.is_empty() {
        None
    } else if ms.len() % 2 == 1 {
        Some(ms[ms.len() / 2])
    } else {
        Some((ms[ms.len() / 2 - 1] + ms[ms.len() / 2]) / 2.0)
    };
    let complete = runs.iter().all(|r| r["complete"] == true);
    println!(
        "{}",
        json!({"event": "resume", "median_ms": median, "complete": complete, "runs": runs})
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_send_time_is_found_in_the_event() {
        let event = br#"{"v":1,"type":"t","data":{"sent_ns":1733550000123456789,"seq":4},"entry_id":"1-0"}"#;
        assert_eq!(sent_ns(event), Some(1_733_550_000_123_456_789));
        assert_eq!(sent_ns(br#"{"data":{"seq":4}}"#), None);
        assert_eq!(sent_ns(br#"{"data":{"sent_ns":"x"}}"#), None);
        assert_eq!(number_after(event, SEQ_KEY), Some(4));
    }

    #[test]
    fn pubsub_replies_are_parsed_once_whole() {
        let msg = b"*4\r\n$8\r\npmessage\r\n$3\r\nf:*\r\n$3\r\nf:a\r\n$5\r\nhello\r\n";
        let (items, next) = array(msg, 0).unwrap().unwrap();
        assert_eq!(next, msg.len());
        match items.as_slice() {
            [Item::Bulk(k), _, _, Item::Bulk(p)] => {
                assert_eq!(&msg[k.clone()], b"pmessage");
                assert_eq!(&msg[p.clone()], b"hello");
            }
            _ => panic!("four items"),
        }
        assert!(array(&msg[..msg.len() - 3], 0).unwrap().is_none());
        let confirm = b"*3\r\n$10\r\npsubscribe\r\n$3\r\nf:*\r\n:1\r\n";
        let (items, _) = array(confirm, 0).unwrap().unwrap();
        assert!(matches!(items.as_slice(), [Item::Bulk(_), _, Item::Int]));
        assert!(array(b"+OK\r\n", 0).is_err());
    }
}
