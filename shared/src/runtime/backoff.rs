//! The one retry policy of the fleet: exponential backoff with jitter, 50 ms to 5 s, without end,
//! because an outage is waited out (reading pauses meanwhile), never turned into lost work.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// The delays between attempts; start a new one after each success.
pub fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}
