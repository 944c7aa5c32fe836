//! Stopping a worker at any moment of its life: a SIGTERM in its first milliseconds (a pod
//! deleted as it starts) still ends in a clean drain and exit 0, never in death by the signal.

use std::time::{Duration, Instant};

use streamfleet_tests::scenario::config;
use streamfleet_tests::*;

/// Whether the process runs its own code: Rust's runtime, before `main`, sets SIGPIPE to be
/// ignored (its `SigIgn` mask in /proc). Before that the dynamic loader is still at work (about
/// a millisecond or two for these debug builds, measured), and no process can catch a signal.
fn runs_its_own_code(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (13 - 1)) != 0)
}

/// Starts `binary` with `env`, sends SIGTERM `after` it started running its own code, and
/// returns how it ended.
async fn stopped_after(binary: &str, env: &WorkerEnv, after: Duration) -> std::process::ExitStatus {
    let mut worker = env.spawn_only(binary).await;
    let spawned = Instant::now();
    while !runs_its_own_code(worker.pid()) {
        assert!(
            spawned.elapsed() < Duration::from_secs(5),
            "{binary} never started"
        );
        std::thread::yield_now();
    }
    let started = Instant::now();
    while started.elapsed() < after {
        std::thread::yield_now();
    }
    worker.signal("TERM").await;
    worker.wait(Duration::from_secs(30)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_the_first_milliseconds_drains_and_exits_0() {
    let database = fresh_database().await;
    let projector = config(
        "[[route]]\npattern = \"flow.#\"\nactions = [{ latest = \"{stream}:state:{channel}\" }]",
    );
    let stream = unique("early-stop:");
    let envs = [
        ("persister", WorkerEnv::new(&stream, &database)),
        (
            "projector",
            WorkerEnv::new(&stream, "")
                .unset("FLEET_DATABASE_URL")
                .set("FLEET_CONFIG", &projector),
        ),
        (
            "notifier",
            WorkerEnv::new(&stream, "").unset("FLEET_DATABASE_URL"),
        ),
    ];
    let mut failures = Vec::new();
    for round in 0..2 {
        for micros in [0u64, 100, 250, 500, 1_000, 2_000, 5_000] {
            for (binary, env) in &envs {
                let env = env
                    .clone()
                    .set("FLEET_CONSUMER", &format!("c{round}-{micros}"));
                let status = stopped_after(binary, &env, Duration::from_micros(micros)).await;
                if status.code() != Some(0) {
                    failures.push(format!(
                        "{binary} stopped {micros} µs after it started: {status}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
