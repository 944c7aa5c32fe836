//! The deployment's dashboard and alerts (deploy/) name only metrics, and labels, that a running
//! worker really exports: a renamed metric or label fails here, not on an on-call night.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use streamfleet_tests::corpus;
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
    let exported = exported(&body);

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
        "referenced but not exported: {missing:?}\n{body}"
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
                "{file}: {metric}{{{label}=…}}: no such label on the exported metric"
            );
        }
    }
    worker.stop_cleanly().await;
}
