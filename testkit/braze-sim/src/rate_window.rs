//! Braze's fixed-window request limit (default 3,000 requests per 3 seconds) and the
//! `X-RateLimit-*` values every response carries. Pure: the caller passes the clock.

use serde::Serialize;

/// A fixed window that opens at the first request after the previous one ended.
#[derive(Debug, Clone)]
pub struct RateWindow {
    limit: u64,
    window_ms: u64,
    start_ms: Option<u64>,
    used: u64,
}

/// The decision for one request and the header values to send with its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Admission {
    /// Whether the request fits in the window.
    pub allowed: bool,
    /// `X-RateLimit-Limit`.
    pub limit: u64,
    /// `X-RateLimit-Remaining` after this request.
    pub remaining: u64,
    /// `X-RateLimit-Reset`: UTC epoch seconds when the window ends (rounded up).
    pub reset_epoch_secs: u64,
}

impl RateWindow {
    /// `limit` requests per `window_ms` milliseconds (a zero window is treated as 1 ms).
    pub fn new(limit: u64, window_ms: u64) -> Self {
        Self {
            limit,
            window_ms: window_ms.max(1),
            start_ms: None,
            used: 0,
        }
    }

    /// Counts one request arriving at `now_ms` (UTC epoch milliseconds).
    pub fn take(&mut self, now_ms: u64) -> Admission {
        let start = match self.start_ms {
            Some(s) if now_ms < s.saturating_add(self.window_ms) => s,
            _ => {
                self.start_ms = Some(now_ms);
                self.used = 0;
                now_ms
            }
        };
        let allowed = self.used < self.limit;
        if allowed {
            self.used += 1;
        }
        Admission {
            allowed,
            limit: self.limit,
            remaining: self.limit - self.used,
            reset_epoch_secs: (start + self.window_ms).div_ceil(1000),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_past_the_limit_are_refused_until_the_window_ends() {
        let mut w = RateWindow::new(2, 3000);
        let a = w.take(10_000);
        assert!(a.allowed);
        assert_eq!(a.remaining, 1);
        assert_eq!(a.reset_epoch_secs, 13);
        assert!(w.take(11_000).allowed);
        let refused = w.take(12_999);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.reset_epoch_secs, 13);
        let next = w.take(13_000);
        assert!(next.allowed);
        assert_eq!(next.remaining, 1);
        assert_eq!(next.reset_epoch_secs, 16);
    }

    #[test]
    fn reset_rounds_up_to_the_next_second() {
        let mut w = RateWindow::new(5, 1000);
        assert_eq!(w.take(1_500).reset_epoch_secs, 3);
    }
}
