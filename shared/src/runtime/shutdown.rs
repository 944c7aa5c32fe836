//! Graceful stop, as one small type every task shares: SIGTERM/SIGINT stop reading; the batch in
//! flight is finished and acknowledged; the process then exits 0.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A cloneable handle that says when the worker should drain.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    /// A handle triggered by SIGTERM or SIGINT. A second signal, or the grace period running out
    /// after the first, ends the process at once with status 1 (entries in flight stay pending,
    /// so nothing is lost; they are redelivered).
    pub fn on_signals(grace: Duration) -> Self {
        let shutdown = Shutdown::default();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "stop requested: draining"
            );
            trigger.trigger();
            tokio::select! {
                _ = wait_for_signal() => tracing::error!("second stop signal: exiting now"),
                _ = tokio::time::sleep(grace) => tracing::error!("drain did not finish within the grace period: exiting now"),
            }
            std::process::exit(1);
        });
        shutdown
    }

    /// Starts the drain.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether the drain has started.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when the drain starts.
    pub async fn triggered(&self) {
        self.token.cancelled().await
    }

    /// Sleeps for `d`, returning early (false) if the drain starts meanwhile.
    pub async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.token.cancelled() => false,
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
