//! The deployment's dashboard and alerts (deploy/) name only metrics, and labels, that a running
//! worker really exports (the persister, and the projector and the notifier with their shipped
//! configurations): a renamed metric or label fails here, not on an on-call night. Labels are
//! checked where a selector matches on them (`metric{label=…}`) and where an aggregation keeps
//! them (`sum by (label) (…metric…)`). Each worker answers for the names it exports
//! (`metric_names.py --worker`): the gateway's `fleet_gateway_*` are not the consumer workers'.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use streamfleet_tests::corpus::{self, Expect};
use streamfleet_tests::scenario::{config, wait_checkpointed_in_redis, wait_settled, GROUP};
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

/// The label names of a sample's label set (`a="x",b="y\"}"}` after its `{`): values are quoted
/// and may hold anything, `}` and `,` included (a hash-tagged stream, `{app}:events`).
fn label_names(mut rest: &str) -> Vec<String> {
    let mut names = Vec::new();
    while let Some((name, value)) = rest.split_once("=\"") {
        names.push(name.trim_start_matches(',').trim().to_owned());
        let mut escaped = false;
        let end = value.char_indices().find_map(|(i, c)| {
            let closes = c == '"' && !escaped;
            escaped = c == '\\' && !escaped;
            closes.then_some(i)
        });
        let Some(end) = end else { break };
        rest = &value[end + 1..];
        if rest.starts_with('}') {
            break;
        }
    }
    names
}

/// The metric names of `/metrics` (histograms by their base name), each with its label names.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, labels) = match line.split_once('{') {
            Some((n, rest)) => (n, label_names(rest)),
            None => (line.split(' ').next().unwrap_or(""), Vec::new()),
        };
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        let set = out.entry(base.to_owned()).or_default();
        set.extend(labels.into_iter().filter(|l| l != "le"));
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

/// The identifier (metric or label name) at the start of `text`.
fn ident(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The text inside the parenthesis that opens `text` (which starts with `(`), without it.
fn parenthesized(text: &str) -> Option<&str> {
    if !text.starts_with('(') {
        return None;
    }
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(&text[1..i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// The labels of `by (…)` clauses in `text` (PromQL in YAML or in JSON strings), each with the
/// `fleet_` metrics of the expression it aggregates (`sum by (job, rule) (rate(fleet_x[5m]))`):
/// an aggregation that keeps a label the metrics do not have shows one series where there should
/// be several. Clauses over no `fleet_` metric (`up`) are left out.
fn grouping_labels(text: &str) -> Vec<(BTreeSet<String>, String)> {
    let mut out = Vec::new();
    for (at, _) in text.match_indices("by") {
        let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if word(text[..at].chars().next_back()) || word(text[at + 2..].chars().next()) {
            continue;
        }
        let Some(list) = parenthesized(text[at + 2..].trim_start()) else {
            continue;
        };
        let after = text[at + 2..].trim_start()[list.len() + 2..].trim_start();
        let Some(inner) = after
            .starts_with('(')
            .then(|| parenthesized(after))
            .flatten()
        else {
            continue; // prose, or the postfix form `sum(…) by (…)`, which the files do not use
        };
        let metrics: BTreeSet<String> = inner
            .match_indices("fleet_")
            .filter(|(i, _)| {
                !inner[..*i]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            })
            .map(|(i, _)| ident(&inner[i..]))
            .collect();
        if metrics.is_empty() {
            continue;
        }
        for label in list.split(',').map(|l| ident(l.trim())) {
            if !label.is_empty() {
                out.push((metrics.clone(), label));
            }
        }
    }
    out
}

/// Asserts that every metric the rules and the dashboard query for `worker`, and every label they
/// select on, is in `body` (its /metrics).
fn assert_referenced_names_exported(worker: &str, body: &str) {
    let exported = exported(body);
    let out = Command::new("python3")
        .arg(repo_path("deploy/prometheus/metric_names.py"))
        .args(["--worker", worker])
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
    // Whether `metric` (a histogram's by its base name) is one of this worker's: the other
    // workers' metrics in the same files are theirs to answer for.
    let mine = |metric: &str| {
        referenced.iter().any(|r| {
            metric == r.as_str()
                || metric
                    .strip_prefix(r.as_str())
                    .is_some_and(|rest| ["_bucket", "_sum", "_count"].contains(&rest))
        })
    };

    for file in [
        "deploy/prometheus/rules.yml",
        "deploy/grafana/streamfleet.json",
    ] {
        let text = std::fs::read_to_string(repo_path(file)).unwrap();
        for (metric, label) in selectors(&text) {
            if !mine(&metric) {
                continue;
            }
            let known = exported.get(&metric).is_some_and(|l| l.contains(&label))
                || TARGET_LABELS.contains(&label.as_str());
            assert!(
                known,
                "{file}: {metric}{{{label}=…}}: no such label on the metric the {worker} exports"
            );
        }
        for (metrics, label) in grouping_labels(&text) {
            if !metrics.iter().any(|m| mine(m)) {
                continue;
            }
            let base = |m: &String| {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| m.strip_suffix(s))
                    .filter(|b| exported.contains_key(*b))
                    .unwrap_or(m)
                    .to_owned()
            };
            let known = TARGET_LABELS.contains(&label.as_str())
                || (label == "le" && metrics.iter().any(|m| m.ends_with("_bucket")))
                || metrics
                    .iter()
                    .any(|m| exported.get(&base(m)).is_some_and(|l| l.contains(&label)));
            assert!(
                known,
                "{file}: by ({label}) over {metrics:?}: none of them has that label as the {worker} exports them"
            );
        }
    }
}

/// The readers above on the shapes that fooled simpler ones: a label value with `}` and `,` (a
/// hash-tagged stream), grouping clauses in the prefix form, nested, and next to prose.
#[test]
fn the_label_readers_read_braced_values_and_nested_grouping_clauses() {
    assert_eq!(
        label_names(r#"stream="{app}:events",reason="a,b=\"}\"",le="+Inf"} 0"#),
        ["stream", "reason", "le"]
    );
    let labels = grouping_labels(
        r#"sum by (job, rule) (rate(fleet_a_total{x="(y)"}[5m])) / max by(pod) (fleet_b)
           > on (pod) count by (job) (up) # the bytes (z) (fleet_c): kept by (w) in prose"#,
    );
    let one = |m: &str| BTreeSet::from([m.to_owned()]);
    assert_eq!(
        labels,
        [
            (one("fleet_a_total"), "job".to_owned()),
            (one("fleet_a_total"), "rule".to_owned()),
            (one("fleet_b"), "pod".to_owned()),
        ]
    );
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

/// The notifier as deployed: its shipped FLEET_CONFIG (deploy/kustomize/base/notifier/fleet.toml,
/// with the test's hash tag for `{app}`) plus a rate limit whose excess waits (`block`), so that
/// every backpressure series exists and moves: the actions, the events waiting and
/// `max_in_flight`, which the Backpressure row and StreamfleetBackpressureSaturated use. It
/// publishes on the shipped channels, and its /metrics has every name and label the rules and
/// the dashboard use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_name_only_metrics_and_labels_the_notifier_exports() {
    let tag = unique("deploy");
    let stream = format!("{{{tag}}}:events");
    let shipped =
        std::fs::read_to_string(repo_path("deploy/kustomize/base/notifier/fleet.toml")).unwrap();
    assert!(shipped.contains("{{app}}:fleet:"), "{shipped}");
    // Short reads and lag samples; every flow at most 2 events a second (bursts of 1), the rest
    // waiting for its channel's budget.
    let text = shipped
        .replace("{{app}}", &format!("{{{{{tag}}}}}"))
        .replacen(
            "[tuning]\n",
            "[tuning]\nblock_ms = 200\nlag_interval_ms = 200\n",
            1,
        )
        + "\n[[backpressure]]\npattern = \"flow.*.progress\"\nmode = \"rate_limit\"\n\
           per_second = 2\nburst = 1\nover_limit = \"block\"\n";
    let max_in_flight: f64 = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("max_in_flight")?
                .trim()
                .strip_prefix('=')
        })
        .map_or(5000.0, |v| {
            v.split('#').next().unwrap().trim().parse().unwrap()
        });
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("notifier")));
    std::fs::write(&cfg, text).unwrap();

    let received = subscriber_at(&redis_url(), &format!("{{{tag}}}:fleet:*")).await;
    let corpus = corpus::mixed(600, 5, 2);
    let flow_ids: BTreeSet<String> = corpus
        .expected
        .iter()
        .filter_map(|e| match e {
            Expect::Valid { id, user: false } => Some(id.to_string()),
            _ => None,
        })
        .collect();
    assert!(flow_ids.len() > 200, "{} flow events", flow_ids.len());
    publish_lines(&stream, &corpus.lines).await;
    // The setup Job creates the group (at newest, as the shipped start_from); here at the
    // stream's start, so that the corpus published before is read.
    let mut conn = redis().await;
    create_group(&mut conn, &stream, "notifier").await;
    let mut worker = WorkerEnv::new(&stream, "")
        .unset("FLEET_DATABASE_URL")
        .set("FLEET_GROUP", "notifier")
        .set("FLEET_CONFIG", &cfg.display().to_string())
        .start("notifier")
        .await;
    // About 3 events per flow at 2 a second: events wait for a second or more, in the worker.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut most_waiting = 0.0f64;
    loop {
        most_waiting = most_waiting.max(worker.metric("fleet_backpressure_waiting", "").await);
        let got: BTreeSet<String> = received
            .lock()
            .unwrap()
            .iter()
            .filter(|(channel, m)| {
                // Published on the shipped template: `{app}:fleet:<channel>`.
                m["channel"]
                    .as_str()
                    .is_some_and(|c| *channel == format!("{{{tag}}}:fleet:{c}"))
            })
            .filter_map(|(_, m)| Some(m["id"].as_str()?.to_owned()))
            .collect();
        if flow_ids.is_subset(&got) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} flow events published on {{{tag}}}:fleet:<channel>",
            flow_ids.intersection(&got).count(),
            flow_ids.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_settled(&conn, &stream, "notifier").await;
    wait_checkpointed_in_redis(&conn, &stream, "notifier").await;
    tokio::time::sleep(Duration::from_millis(600)).await; // a lag sample after the drain

    assert!(
        most_waiting > 0.0 && most_waiting <= max_in_flight,
        "events waiting at most: {most_waiting} (max_in_flight {max_in_flight})"
    );
    assert_eq!(worker.metric("fleet_backpressure_waiting", "").await, 0.0);
    assert_eq!(
        worker.metric("fleet_max_in_flight", "").await,
        max_in_flight
    );
    let delayed = worker
        .metric(
            "fleet_backpressure_actions_total",
            "rule=\"flow.*.progress\",action=\"delayed\"",
        )
        .await;
    assert!(delayed > 0.0, "delayed: {delayed}");
    let (_, body) = http_get(&worker.http, "/metrics").await.expect("metrics");
    assert_referenced_names_exported("notifier", &body);
    worker.stop_cleanly().await;
    let _ = std::fs::remove_file(cfg);
}

/// The gateway as deployed: its shipped FLEET_CONFIG (deploy/kustomize/base/gateway/fleet.toml),
/// metrics read after a connection was served and one refused, so that every series exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_name_only_metrics_and_labels_the_gateway_exports() {
    let mut gateway = WorkerEnv::new("", "")
        .unset("FLEET_STREAMS")
        .unset("FLEET_DATABASE_URL")
        .unset("FLEET_CONSUMER")
        .set(
            "FLEET_CONFIG",
            &repo_path("deploy/kustomize/base/gateway/fleet.toml"),
        )
        .set("FLEET_GATEWAY_ANONYMOUS_TOPICS", "flow.#")
        .set("FLEET_GATEWAY_REGISTRY_KEY", &unique("deploy:gateways"))
        .start("gateway")
        .await;
    let served =
        streamfleet_tests::sse::connect(&gateway.http, "/events?topic=flow.x.progress", &[])
            .await
            .unwrap();
    assert_eq!(served.status, 200);
    let refused = streamfleet_tests::sse::connect(&gateway.http, "/events?topic=user.1", &[])
        .await
        .unwrap();
    assert_eq!(refused.status, 401);
    let (_, body) = http_get(&gateway.http, "/metrics").await.expect("metrics");
    assert_referenced_names_exported("gateway", &body);
    drop((served, refused));
    gateway.stop_cleanly().await;
}
