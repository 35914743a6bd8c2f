//! Live counters of the sync running in this process (rows read, users sent, requests), and
//! the progress bar `braze-sync run` draws from them on a terminal. The counters are relaxed
//! atomics bumped where the report's figures are counted (one add per row or batch); under
//! Lambda, or when stderr is not a terminal, nothing reads them and nothing is drawn.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The process's live counters.
#[derive(Debug, Default)]
pub struct Live {
    rows_read: AtomicU64,
    users_sent: AtomicU64,
    requests: AtomicU64,
}

/// The counters of the run in progress in this process.
pub static LIVE: Live = Live {
    rows_read: AtomicU64::new(0),
    users_sent: AtomicU64::new(0),
    requests: AtomicU64::new(0),
};

/// The counters at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Data rows read.
    pub rows_read: u64,
    /// Users sent to Braze (first sends, not retries).
    pub users_sent: u64,
    /// HTTP requests to Braze.
    pub requests: u64,
}

impl Live {
    /// One data row read.
    pub fn row_read(&self) {
        self.rows_read.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` data rows read (readers on several threads count locally and add in steps, so
    /// they do not contend on this counter's cache line per row).
    pub fn rows_read(&self, n: u64) {
        self.rows_read.fetch_add(n, Ordering::Relaxed);
    }

    /// A batch finished: `users` first sent, in `requests` requests.
    pub fn sent(&self, users: u64, requests: u64) {
        self.users_sent.fetch_add(users, Ordering::Relaxed);
        self.requests.fetch_add(requests, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn counts(&self) -> Counts {
        Counts {
            rows_read: self.rows_read.load(Ordering::Relaxed),
            users_sent: self.users_sent.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
        }
    }
}

/// Whether to draw a bar: only for a person at a terminal, never under Lambda.
pub fn wanted(stderr_is_terminal: bool, is_lambda: bool) -> bool {
    stderr_is_terminal && !is_lambda
}

/// The bar's text: users sent and the request rate since `start` of the counters `from`.
pub fn message(now: Counts, from: Counts, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rps = if secs > 0.0 {
        (now.requests - from.requests.min(now.requests)) as f64 / secs
    } else {
        0.0
    };
    format!(
        "{} users sent, {} requests, {rps:.1} req/s",
        now.users_sent - from.users_sent.min(now.users_sent),
        now.requests - from.requests.min(now.requests)
    )
}

/// A bar drawn on stderr while a run goes on; [`Bar::finish`] clears it.
pub struct Bar {
    bar: indicatif::ProgressBar,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Bar {
    /// Starts a bar when [`wanted`] (stderr a terminal, not Lambda), else a hidden one.
    /// `expected_rows` (e.g. the users in the route's state) gives the length and the ETA.
    pub fn start(expected_rows: Option<u64>) -> Bar {
        let show = wanted(
            std::io::stderr().is_terminal(),
            bridge_shared::runtime::is_lambda(),
        );
        if !show {
            return Bar {
                bar: indicatif::ProgressBar::hidden(),
                ticker: None,
            };
        }
        let (bar, template) = match expected_rows.filter(|n| *n > 0) {
            Some(n) => (
                indicatif::ProgressBar::new(n),
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/~{len} rows {msg} (ETA {eta})",
            ),
            None => (
                indicatif::ProgressBar::new_spinner(),
                "{spinner} [{elapsed_precise}] {pos} rows read, {msg}",
            ),
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        let from = LIVE.counts();
        let started = Instant::now();
        let drawn = bar.clone();
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                let now = LIVE.counts();
                drawn.set_position(now.rows_read - from.rows_read.min(now.rows_read));
                drawn.set_message(message(now, from, started.elapsed()));
            }
        });
        Bar {
            bar,
            ticker: Some(ticker),
        }
    }

    /// Stops and clears the bar.
    pub fn finish(self) {
        if let Some(t) = self.ticker {
            t.abort();
        }
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_only_for_a_terminal_and_never_under_lambda() {
        assert!(wanted(true, false));
        assert!(!wanted(false, false));
        assert!(!wanted(true, true));
        assert!(!wanted(false, true));
    }

    #[test]
    fn the_message_counts_since_the_bar_started() {
        let from = Counts {
            rows_read: 5,
            users_sent: 10,
            requests: 2,
        };
        let now = Counts {
            rows_read: 500,
            users_sent: 310,
            requests: 22,
        };
        assert_eq!(
            message(now, from, Duration::from_secs(4)),
            "300 users sent, 20 requests, 5.0 req/s"
        );
        assert_eq!(
            message(now, from, Duration::ZERO),
            "300 users sent, 20 requests, 0.0 req/s"
        );
    }

    #[test]
    fn counters_add_up() {
        let live = Live::default();
        live.row_read();
        live.row_read();
        live.sent(75, 1);
        assert_eq!(
            live.counts(),
            Counts {
                rows_read: 2,
                users_sent: 75,
                requests: 1
            }
        );
    }
}
