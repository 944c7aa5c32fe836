//! The deployment's dashboard and alerts (deploy/) name only metrics, and labels, that a running
//! worker really exports (the persister, and the projector with its shipped configuration): a
//! renamed metric or label fails here, not on an on-call night.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use streamfleet_tests::corpus::{self, Expect};
use streamfleet_tests::scenario::{config, wait_settled, GROUP};
use streamfleet_tests::*;

/// Labels every series gets from the Prometheus operator's scrape, not from the worker.
const TARGET_LABELS: [&str; 6] = [
    "namespace",
    "job",
    "pod",
    "instance",
    "service",
    "container",
];

/// The metric names of `/metrics` (histograms by their base name), each with its label names.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, labels) = match line.split_once('{') {
            Some((n, rest)) => (n, rest.split('}').next().unwrap_or("")),
            None => (line.split(' ').next().unwrap_or(""), ""),
        };
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        let set = out.entry(base.to_owned()).or_default();
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let label = pair.split('=').next().unwrap_or("");
            if label != "le" {
                set.insert(label.to_owned());
            }
        }
    }
    out
}

/// Label names used in `metric{...}` selectors of `text` (PromQL in YAML or in JSON strings).
fn selectors(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("fleet_") {
        rest = &rest[at..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[name.len()..];
        if let Some(body) = rest.strip_prefix('{') {
            let body = body.split('}').next().unwrap_or("");
            for matcher in body.split(',') {
                let label: String = matcher
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !label.is_empty() {
                    out.push((name.clone(), label));
                }
            }
        }
    }
    out
}

/// Asserts that every metric the rules and the dashboard query, and every label they select on,
/// is in `body` (a worker's /metrics).
fn assert_referenced_names_exported(worker: &str, body: &str) {
    let exported = exported(body);
    let out = Command::new("python3")
        .arg(repo_path("deploy/prometheus/metric_names.py"))
        .current_dir(repo_path(""))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let referenced: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(referenced.len() >= 10, "names referenced: {referenced:?}");
    let missing: Vec<&String> = referenced
        .iter()
        .filter(|n| !exported.contains_key(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "referenced but not exported by the {worker}: {missing:?}\n{body}"
    );

    for file in [
        "deploy/prometheus/rules.yml",
        "deploy/grafana/streamfleet.json",
    ] {
        let text = std::fs::read_to_string(repo_path(file)).unwrap();
        for (metric, label) in selectors(&text) {
            let known = exported.get(&metric).is_some_and(|l| l.contains(&label))
                || TARGET_LABELS.contains(&label.as_str());
            assert!(
                known,
                "{file}: {metric}{{{label}=…}}: no such label on the metric the {worker} exports"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_name_only_metrics_and_labels_a_worker_exports() {
    let db = fresh_database().await;
    let stream = unique("deploy:");
    let corpus = corpus::mixed(600, 5, 2);
    publish_lines(&stream, &corpus.lines).await;
    let mut worker = WorkerEnv::new(&stream, &db)
        // A backpressure rule, so that its series exist too (they are per rule).
        .set(
            "FLEET_CONFIG",
            &config("lag_interval_ms = 200\n[[backpressure]]\npattern = \"flow.#\"\nmode = \"drop\"\nmax_age_ms = 86400000000\n"),
        )
        .start("persister")
        .await;
    let conn = redis().await;
    wait_settled(&conn, &stream, GROUP).await;
    tokio::time::sleep(Duration::from_millis(600)).await; // a lag sample after the drain
    let (_, body) = http_get(&worker.http, "/metrics").await.expect("metrics");
    assert_referenced_names_exported("persister", &body);
    worker.stop_cleanly().await;
}

/// The projector as deployed: its shipped FLEET_CONFIG (deploy/kustomize/base/projector/fleet.toml,
/// with the test's hash tag for `{app}`) runs, projects, and its /metrics has every name and
/// label the rules and the dashboard use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_name_only_metrics_and_labels_the_projector_exports() {
    let tag = unique("deploy");
    let stream = format!("{{{tag}}}:events");
    let shipped =
        std::fs::read_to_string(repo_path("deploy/kustomize/base/projector/fleet.toml")).unwrap();
    assert!(shipped.contains("{{app}}:"), "{shipped}");
    // Short reads and lag samples, and a backpressure rule, so that its series exist too.
    let text = shipped
        .replace("{{app}}", &format!("{{{{{tag}}}}}"))
        .replacen(
            "[tuning]\n",
            "[tuning]\nblock_ms = 200\nlag_interval_ms = 200\n",
            1,
        )
        + "\n[[backpressure]]\npattern = \"flow.#\"\nmode = \"drop\"\nmax_age_ms = 86400000000\n";
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("projector")));
    std::fs::write(&cfg, text).unwrap();

    let corpus = corpus::mixed(600, 5, 2);
    publish_lines(&stream, &corpus.lines).await;
    let mut worker = WorkerEnv::new(&stream, "")
        .unset("FLEET_DATABASE_URL")
        .set("FLEET_GROUP", "projector")
        .set("FLEET_CONFIG", &cfg.display().to_string())
        .start("projector")
        .await;
    let mut conn = redis().await;
    wait_settled(&conn, &stream, "projector").await;
    tokio::time::sleep(Duration::from_millis(600)).await; // a lag sample after the drain
    let (_, body) = http_get(&worker.http, "/metrics").await.expect("metrics");
    assert_referenced_names_exported("projector", &body);
    // The shipped actions ran: the state of a flow, and the checkpoint beside the stream.
    let flow = corpus
        .lines
        .iter()
        .zip(&corpus.expected)
        .find_map(|(line, e)| match e {
            Expect::Valid { user: false, .. } => {
                let event: serde_json::Value = serde_json::from_str(line).unwrap();
                Some(
                    event["channel"]
                        .as_str()
                        .unwrap()
                        .split('.')
                        .nth(1)?
                        .to_owned(),
                )
            }
            _ => None,
        })
        .expect("a flow event");
    let state: bool = redis::cmd("EXISTS")
        .arg(format!("{{{tag}}}:flow:{flow}:state"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(state, "no state of flow {flow}");
    wait_until(
        Duration::from_secs(10),
        "the projector's checkpoint",
        || {
            let (mut conn, key) = (conn.clone(), format!("{stream}:checkpoints"));
            async move {
                redis::cmd("HEXISTS")
                    .arg(key)
                    .arg("projector")
                    .query_async(&mut conn)
                    .await
                    .unwrap_or(false)
            }
        },
    )
    .await;
    worker.stop_cleanly().await;
    let _ = std::fs::remove_file(cfg);
}
