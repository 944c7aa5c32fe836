//! Graceful stop, as one small type every task shares: SIGTERM/SIGINT stop reading; the batch in
//! flight is finished and acknowledged; the process then exits 0.
//!
//! A stop may come at any moment, the first milliseconds included (a pod deleted as it starts):
//! a worker holds SIGTERM and SIGINT blocked from before `main` ([`hold_stop_signals_from_start`])
//! until [`Shutdown::on_signals`] has its handlers in place, so a signal sent meanwhile waits
//! for them instead of killing the process; it then drains what little it has and exits 0.

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
        let first = stop_signals();
        release_stop_signals();
        tokio::spawn(async move {
            first.await;
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
    stop_signals().await
}

/// Completes on the next SIGTERM or SIGINT; the handlers are in place when this returns (a
/// signal arriving before the future is first polled is not missed).
fn stop_signals() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

/// SIGTERM and SIGINT.
fn stop_set() -> libc::sigset_t {
    // SAFETY: sigemptyset and sigaddset only write the set they are given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread (and the threads it starts later): a signal
/// sent now stays pending instead of killing the process. Run before `main` by
/// [`hold_stop_signals_from_start`]; async-signal-safe, allocates nothing.
pub extern "C" fn hold_stop_signals() {
    let set = stop_set();
    // SAFETY: changes this thread's signal mask only; no memory is shared.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Unblocks them once their handlers are in place: a signal held meanwhile is delivered now.
fn release_stop_signals() {
    let set = stop_set();
    // SAFETY: as in `hold_stop_signals`.
    unsafe {
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// Holds SIGTERM and SIGINT from the process's start (an `.init_array` constructor, run by the
/// loader before `main` and before any thread exists) until the runtime's handlers are in place.
/// A worker binary invokes it once, at its crate root; a binary that never installs the handlers
/// (fleetctl) must not, or a stop signal would never reach it.
#[macro_export]
macro_rules! hold_stop_signals_from_start {
    () => {
        #[used]
        #[link_section = ".init_array"]
        static HOLD_STOP_SIGNALS: extern "C" fn() = $crate::hold_stop_signals;
    };
}
