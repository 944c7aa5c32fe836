//! The gateway's metric names, beside the runtime's (`fleet_ready`, `fleet_fault`,
//! `fleet_reconnects_total`): what an operator watches and scales on.

use metrics::{counter, describe_counter, describe_gauge, gauge};

/// Open SSE connections on this instance (KEDA scales the gateway on it).
pub const CONNECTIONS: &str = "fleet_gateway_connections";
/// Pub/Sub subscriptions (one per distinct channel or pattern the connected topics need).
pub const SUBSCRIPTIONS: &str = "fleet_gateway_subscriptions";
/// Events written to browsers (labels: origin = live | history).
pub const MESSAGES_SENT: &str = "fleet_gateway_messages_sent_total";
/// Resumes answered from a history (a `Last-Event-ID` found there).
pub const RESUMES: &str = "fleet_gateway_resumes_total";
/// `event: reset` sent instead (the id was not in the history, or the topic has none).
pub const RESETS: &str = "fleet_gateway_resets_total";
/// Connections ended because their buffer was full (a client too slow to keep up).
pub const SLOW_DROPS: &str = "fleet_gateway_slow_client_drops_total";
/// Requests refused (labels: reason = unauthenticated | forbidden | origin | bad_request |
/// unavailable).
pub const REFUSALS: &str = "fleet_gateway_refusals_total";
/// Pub/Sub messages that were not a notifier's message (dropped).
pub const UNREADABLE: &str = "fleet_gateway_unreadable_messages_total";

/// Describes every metric and creates the counters at 0 (an alert on the first refusal needs
/// the series to exist before it).
pub fn register() {
    describe_gauge!(CONNECTIONS, "Open SSE connections on this instance.");
    describe_gauge!(SUBSCRIPTIONS, "Pub/Sub channels and patterns subscribed.");
    describe_counter!(MESSAGES_SENT, "Events written to browsers, by origin.");
    describe_counter!(RESUMES, "Resumes answered from a history.");
    describe_counter!(RESETS, "Resets sent instead of a resume.");
    describe_counter!(
        SLOW_DROPS,
        "Connections dropped because their buffer was full."
    );
    describe_counter!(REFUSALS, "Requests refused, by reason.");
    describe_counter!(UNREADABLE, "Pub/Sub messages that were not a notifier's.");
    gauge!(CONNECTIONS).set(0.0);
    gauge!(SUBSCRIPTIONS).set(0.0);
    for origin in ["live", "history"] {
        counter!(MESSAGES_SENT, "origin" => origin).increment(0);
    }
    // The runtime's, which the gateway's readiness moves (the sink is its subscription).
    for target in ["redis", "sink"] {
        counter!(streamfleet::runtime::metrics::RECONNECTS, "target" => target).increment(0);
    }
    for name in [RESUMES, RESETS, SLOW_DROPS, UNREADABLE] {
        counter!(name).increment(0);
    }
    for reason in [
        "unauthenticated",
        "forbidden",
        "origin",
        "bad_request",
        "unavailable",
    ] {
        counter!(REFUSALS, "reason" => reason).increment(0);
    }
}
