//! Progress of long operations (replay, redrive, reconcile, generate): a bar on a terminal, plain
//! lines otherwise (logs of a Job, CI), on stderr so that stdout stays the command's result.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A counter of work done, shown as it moves.
pub struct Progress {
    bar: Option<ProgressBar>,
    what: &'static str,
    done: u64,
    total: Option<u64>,
    last_line: Instant,
}

/// `--quiet`: no progress at all.
static QUIET: AtomicBool = AtomicBool::new(false);

/// Silences progress for the whole run (`--quiet`).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Plain progress lines at most this often.
const LINE_EVERY: Duration = Duration::from_secs(2);

impl Progress {
    /// `total` when known (a bar with an ETA), else a spinner with a count.
    pub fn new(what: &'static str, total: Option<u64>) -> Self {
        let shown = std::io::stderr().is_terminal() && !QUIET.load(Ordering::Relaxed);
        let bar = shown.then(|| {
            let bar = match total {
                Some(n) => ProgressBar::new(n).with_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                ),
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{spinner} {msg} {pos} ({per_sec})")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                ),
            };
            bar.set_message(what);
            bar
        });
        Progress {
            bar,
            what,
            done: 0,
            total,
            last_line: Instant::now(),
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        if QUIET.load(Ordering::Relaxed) {
            return;
        }
        match &self.bar {
            Some(bar) => bar.inc(n),
            // The line that would say "all done" is left out: the result follows at once, and
            // a short command (a `status --check` whose stderr a script reads) prints none.
            None if self.total.is_some_and(|t| self.done >= t) => {}
            None if self.last_line.elapsed() >= LINE_EVERY => {
                self.last_line = Instant::now();
                match self.total {
                    Some(total) => eprintln!("{}: {}/{total}", self.what, self.done),
                    None => eprintln!("{}: {}", self.what, self.done),
                }
            }
            None => {}
        }
    }

    /// Clears the bar (the command then prints its result).
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
