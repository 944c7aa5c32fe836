//! Metric names (contract section 7) in one place, with their help text, and the Prometheus
//! recorder. Stable names matter more than anything else here: dashboards and alerts use them.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Entries read from a stream (labels: stream).
pub const EVENTS_READ: &str = "fleet_events_read_total";
/// Events whose effect was made (no labels).
pub const EVENTS_APPLIED: &str = "fleet_events_applied_total";
/// Events not applied again because their id was already seen (labels: stage = batch | sink).
pub const EVENTS_DEDUPLICATED: &str = "fleet_events_deduplicated_total";
/// Entries sent to the dead letter stream (labels: stream, reason).
pub const EVENTS_DEAD_LETTERED: &str = "fleet_events_dead_lettered_total";
/// Entries acknowledged (labels: stream).
pub const EVENTS_ACKNOWLEDGED: &str = "fleet_events_acknowledged_total";
/// Events acknowledged with no effect (labels: reason = unrouted | not_for_worker | deleted |
/// backpressure | other_group).
pub const EVENTS_SKIPPED: &str = "fleet_events_skipped_total";
/// Age of each entry when settled (acknowledged or dead-lettered): now less its id's time, so
/// the time from the producer's XADD to its effect (labels: stream, group). "Under 100 ms" is
/// an objective on its quantiles.
pub const EVENT_AGE: &str = "fleet_event_age_seconds";
/// Time from read to acknowledgement of a batch.
pub const BATCH_DURATION: &str = "fleet_batch_duration_seconds";
/// Time the handler took for one attempt at a batch.
pub const HANDLER_DURATION: &str = "fleet_handler_duration_seconds";
/// Failed handler attempts (retried with backoff).
pub const HANDLER_ERRORS: &str = "fleet_handler_errors_total";
/// Entries in the stream not yet delivered to the group (labels: stream).
pub const GROUP_LAG: &str = "fleet_consumer_group_lag";
/// Entries delivered to the group and not yet acknowledged (labels: stream).
pub const GROUP_PENDING: &str = "fleet_consumer_group_pending";
/// Backpressure decisions (labels: rule, action = delayed | dropped | coalesced).
pub const BACKPRESSURE_ACTIONS: &str = "fleet_backpressure_actions_total";
/// Events waiting for their channel (a rate limit's `block` or `coalesce`, a coalescing window):
/// read, not yet settled, counted towards `max_in_flight`.
pub const BACKPRESSURE_WAITING: &str = "fleet_backpressure_waiting";
/// `tuning.max_in_flight`, so that alerts compare the waiting events with it.
pub const MAX_IN_FLIGHT: &str = "fleet_max_in_flight";
/// Transitions of a dependency from unreachable to reachable (labels: target = redis | sink).
pub const RECONNECTS: &str = "fleet_reconnects_total";
/// Entries taken over from idle consumers (labels: stream).
pub const RECLAIMED: &str = "fleet_events_reclaimed_total";
/// Consumers of the group per stream (labels: stream, state = active | idle).
pub const GROUP_CONSUMERS: &str = "fleet_consumer_group_consumers";
/// Idle consumers deleted from the group (they owned no pending entries) (labels: stream).
pub const CONSUMERS_DELETED: &str = "fleet_consumers_deleted_total";
/// Streams this worker consumes.
pub const STREAMS: &str = "fleet_streams";
/// Age of the oldest entry still pending in the group, in seconds (labels: stream).
pub const GROUP_OLDEST_PENDING: &str = "fleet_consumer_group_oldest_pending_seconds";
/// Cuts of entries deleted before the group read them (labels: stream): each a range lost to
/// the group, named in an ERROR line.
pub const ENTRIES_CUT: &str = "fleet_entries_cut_unread_total";
/// 1 when `/readyz` would answer 200, else 0: readiness for alerts, which cannot read `/readyz`.
pub const READY: &str = "fleet_ready";
/// 1 while a fault is raised, else 0 (labels: fault): why the worker is not ready.
pub const FAULT: &str = "fleet_fault";

/// Creates every counter at 0 for the label values known at start (the `FLEET_STREAMS` items, the
/// dead letter reasons, the backpressure rules). A counter that appears only at its first
/// increment hides that increment from `rate()` and `increase()`: an alert on the first dead
/// letter would never fire, and a dashboard would show nothing where it should show 0.
pub fn register_zeroes(streams: &[&str], rules: &[&str]) {
    use metrics::counter;
    counter!(EVENTS_APPLIED).increment(0);
    counter!(HANDLER_ERRORS).increment(0);
    for stage in ["batch", "sink"] {
        counter!(EVENTS_DEDUPLICATED, "stage" => stage).increment(0);
    }
    for reason in [
        "unrouted",
        "not_for_worker",
        "backpressure",
        "deleted",
        "other_group",
    ] {
        counter!(EVENTS_SKIPPED, "reason" => reason).increment(0);
    }
    for target in ["redis", "sink"] {
        counter!(RECONNECTS, "target" => target).increment(0);
    }
    for stream in streams {
        let stream = stream.to_string();
        for name in [
            EVENTS_READ,
            EVENTS_ACKNOWLEDGED,
            RECLAIMED,
            CONSUMERS_DELETED,
            ENTRIES_CUT,
        ] {
            counter!(name, "stream" => stream.clone()).increment(0);
        }
        for reason in crate::event::DlqReason::ALL {
            counter!(EVENTS_DEAD_LETTERED, "stream" => stream.clone(), "reason" => reason.as_str())
                .increment(0);
        }
    }
    for rule in rules {
        for action in ["delayed", "dropped", "coalesced"] {
            counter!(BACKPRESSURE_ACTIONS, "rule" => rule.to_string(), "action" => action)
                .increment(0);
        }
    }
    metrics::gauge!(BACKPRESSURE_WAITING).increment(0.0);
}

/// Installs the process-wide Prometheus recorder and describes every metric.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let buckets = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)?
        .install_recorder()?;
    describe_counter!(EVENTS_READ, "Entries read from a stream.");
    describe_counter!(EVENTS_APPLIED, "Events whose effect was made.");
    describe_counter!(
        EVENTS_DEDUPLICATED,
        "Events whose id had already been applied: no second effect."
    );
    describe_counter!(
        EVENTS_DEAD_LETTERED,
        "Entries sent to the dead letter stream, by reason."
    );
    describe_counter!(
        EVENTS_ACKNOWLEDGED,
        "Entries acknowledged to the consumer group."
    );
    describe_counter!(
        EVENTS_SKIPPED,
        "Events acknowledged with no effect, by reason."
    );
    describe_histogram!(
        BATCH_DURATION,
        Unit::Seconds,
        "Time from read to acknowledgement of a batch."
    );
    describe_histogram!(
        HANDLER_DURATION,
        Unit::Seconds,
        "Time of one handler attempt at a batch."
    );
    describe_counter!(
        HANDLER_ERRORS,
        "Failed handler attempts, retried with backoff."
    );
    describe_gauge!(
        GROUP_LAG,
        "Entries not yet delivered to the consumer group."
    );
    describe_gauge!(
        GROUP_PENDING,
        "Entries delivered to the group and not yet acknowledged."
    );
    describe_counter!(
        BACKPRESSURE_ACTIONS,
        "Backpressure decisions, by rule and action."
    );
    describe_gauge!(
        MAX_IN_FLIGHT,
        "tuning.max_in_flight: entries read and not settled beyond which reading pauses."
    );
    describe_gauge!(
        BACKPRESSURE_WAITING,
        "Events waiting for their channel (rate limit, coalescing window), counted towards max_in_flight."
    );
    describe_counter!(
        RECONNECTS,
        "Dependency transitions from unreachable to reachable."
    );
    describe_gauge!(STREAMS, "Streams this worker consumes.");
    describe_gauge!(
        GROUP_OLDEST_PENDING,
        "Age of the oldest entry still pending in the consumer group, in seconds."
    );
    describe_gauge!(READY, "1 when the worker is ready (/readyz 200), else 0.");
    describe_gauge!(FAULT, "1 while a fault is raised (see /readyz), else 0.");
    describe_counter!(
        RECLAIMED,
        "Entries taken over from idle consumers (XAUTOCLAIM)."
    );
    describe_gauge!(
        GROUP_CONSUMERS,
        "Consumers of the group, by state (idle: no activity for consumer_idle_ms)."
    );
    describe_counter!(
        CONSUMERS_DELETED,
        "Idle consumers with no pending entries deleted from the group."
    );
    describe_histogram!(
        EVENT_AGE,
        Unit::Seconds,
        "Age of each entry when settled: now less its id's time (XADD to effect)."
    );
    describe_counter!(
        ENTRIES_CUT,
        "Ranges of entries deleted (MAXLEN, XTRIM) before the group read them."
    );
    Ok(handle)
}
