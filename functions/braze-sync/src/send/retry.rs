//! When and how long to wait before sending a failed request again: 429, 5xx, timeouts and
//! dropped connections are retried with exponential backoff and full jitter (a 429 waits for
//! the window's reset instead); everything else is final. Pure: the random source is passed in.

use std::time::Duration;

use rand::Rng;
use serde::Serialize;

use crate::send::braze::TrackError;

/// Why a request is sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryCause {
    /// HTTP 429.
    RateLimited,
    /// HTTP 5xx.
    ServerError,
    /// No answer in time.
    Timeout,
    /// The connection failed or dropped.
    Connection,
}

impl RetryCause {
    /// The cause of a failed request, or `None` when it must not be retried.
    pub fn of(err: &TrackError) -> Option<RetryCause> {
        match err {
            TrackError::RateLimited { .. } => Some(RetryCause::RateLimited),
            TrackError::Server { .. } => Some(RetryCause::ServerError),
            TrackError::Timeout { .. } => Some(RetryCause::Timeout),
            TrackError::Connection { .. } => Some(RetryCause::Connection),
            TrackError::PayloadTooLarge { .. }
            | TrackError::Unauthorized { .. }
            | TrackError::Unconfirmed { .. }
            | TrackError::Rejected { .. } => None,
        }
    }

    /// Name used in reports and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryCause::RateLimited => "http_429",
            RetryCause::ServerError => "http_5xx",
            RetryCause::Timeout => "timeout",
            RetryCause::Connection => "connection",
        }
    }
}

/// Failures one batch has had so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Failures {
    /// 5xx, timeouts and connection failures.
    pub transient: u32,
    /// 429s.
    pub rate_limited: u32,
}

impl Failures {
    /// Counts one more failure of `cause`.
    pub fn record(&mut self, cause: RetryCause) {
        match cause {
            RetryCause::RateLimited => self.rate_limited += 1,
            _ => self.transient += 1,
        }
    }
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Send again after this delay.
    RetryAfter(Duration),
    /// Stop: the batch stays unsent.
    GiveUp,
}

/// The retry policy of the sender.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Most failures from 5xx, timeouts and connections before a batch is given up.
    pub max_transient_failures: u32,
    /// Most 429s before a batch is given up (the rate limiter normally prevents them).
    pub max_rate_limited_failures: u32,
    /// First backoff ceiling; the n-th retry waits a uniform time in `[0, min(max, base·2^(n-1))]`.
    pub base_delay: Duration,
    /// Largest backoff ceiling.
    pub max_delay: Duration,
    /// Longest wait for a 429's reset (a longer reset is waited in several steps).
    pub max_reset_wait: Duration,
    /// Random spread added after a reset, so waiting batches do not all fire at once.
    pub reset_jitter: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_transient_failures: 8,
            max_rate_limited_failures: 30,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(20),
            max_reset_wait: Duration::from_secs(60),
            reset_jitter: Duration::from_millis(100),
        }
    }
}

impl RetryPolicy {
    /// Decides after a failure of `cause`; `failures` already counts it. `reset_in` is the time
    /// until the rate-limit window resets, when the response said.
    pub fn decide<R: Rng + ?Sized>(
        &self,
        cause: RetryCause,
        failures: Failures,
        reset_in: Option<Duration>,
        rng: &mut R,
    ) -> RetryDecision {
        match cause {
            RetryCause::RateLimited => {
                if failures.rate_limited >= self.max_rate_limited_failures {
                    return RetryDecision::GiveUp;
                }
                match reset_in {
                    Some(wait) => RetryDecision::RetryAfter(
                        wait.min(self.max_reset_wait) + uniform(self.reset_jitter, rng),
                    ),
                    None => RetryDecision::RetryAfter(self.backoff(failures.rate_limited, rng)),
                }
            }
            RetryCause::ServerError | RetryCause::Timeout | RetryCause::Connection => {
                if failures.transient >= self.max_transient_failures {
                    RetryDecision::GiveUp
                } else {
                    RetryDecision::RetryAfter(self.backoff(failures.transient, rng))
                }
            }
        }
    }

    /// Full-jitter backoff before the `n`-th retry (n ≥ 1): uniform in `[0, ceiling(n)]`.
    pub fn backoff<R: Rng + ?Sized>(&self, n: u32, rng: &mut R) -> Duration {
        uniform(self.ceiling(n), rng)
    }

    /// `min(max_delay, base_delay · 2^(n-1))`.
    pub fn ceiling(&self, n: u32) -> Duration {
        let exp = n.saturating_sub(1).min(30);
        self.base_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay)
    }
}

fn uniform<R: Rng + ?Sized>(max: Duration, rng: &mut R) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    Duration::from_nanos(rng.random_range(0..=max.as_nanos().min(u64::MAX as u128) as u64))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::send::braze::RateLimitInfo;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn failures(transient: u32, rate_limited: u32) -> Failures {
        Failures {
            transient,
            rate_limited,
        }
    }

    #[test]
    fn retryable_outcomes_are_429_5xx_timeouts_and_connections() {
        let rate = RateLimitInfo::default();
        let m = String::new();
        assert_eq!(
            RetryCause::of(&TrackError::RateLimited {
                message: m.clone(),
                rate
            }),
            Some(RetryCause::RateLimited)
        );
        assert_eq!(
            RetryCause::of(&TrackError::Server {
                status: 503,
                message: m.clone(),
                rate
            }),
            Some(RetryCause::ServerError)
        );
        assert_eq!(
            RetryCause::of(&TrackError::Timeout { detail: m.clone() }),
            Some(RetryCause::Timeout)
        );
        assert_eq!(
            RetryCause::of(&TrackError::Connection { detail: m.clone() }),
            Some(RetryCause::Connection)
        );
        for permanent in [
            TrackError::Unauthorized {
                status: 401,
                message: m.clone(),
            },
            TrackError::Rejected {
                status: 400,
                message: m.clone(),
                errors: vec![],
                rate,
            },
            TrackError::PayloadTooLarge { message: m, rate },
        ] {
            assert_eq!(RetryCause::of(&permanent), None);
        }
    }

    #[test]
    fn backoff_ceiling_doubles_up_to_the_cap() {
        let p = RetryPolicy::default();
        assert_eq!(p.ceiling(1), Duration::from_millis(200));
        assert_eq!(p.ceiling(2), Duration::from_millis(400));
        assert_eq!(p.ceiling(4), Duration::from_millis(1600));
        assert_eq!(p.ceiling(20), Duration::from_secs(20));
        assert_eq!(p.ceiling(1000), Duration::from_secs(20));
    }

    #[test]
    fn full_jitter_spreads_delays_over_zero_to_the_ceiling() {
        let p = RetryPolicy::default();
        let mut rng = StdRng::seed_from_u64(7);
        let delays: Vec<Duration> = (0..2000).map(|_| p.backoff(3, &mut rng)).collect();
        let ceiling = Duration::from_millis(800);
        assert!(delays.iter().all(|d| *d <= ceiling));
        assert!(delays.iter().any(|d| *d < Duration::from_millis(80)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(720)));
    }

    #[test]
    fn same_seed_gives_same_delays() {
        let p = RetryPolicy::default();
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (1..6).map(|n| p.backoff(n, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn rate_limited_waits_for_the_reset_plus_a_little_jitter() {
        let p = RetryPolicy::default();
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            let RetryDecision::RetryAfter(d) = p.decide(
                RetryCause::RateLimited,
                failures(0, 1),
                Some(Duration::from_millis(1700)),
                &mut rng,
            ) else {
                panic!("must retry")
            };
            assert!(
                d >= Duration::from_millis(1700) && d <= Duration::from_millis(1800),
                "{d:?}"
            );
        }
        // A reset an hour away is waited in bounded steps.
        let RetryDecision::RetryAfter(d) = p.decide(
            RetryCause::RateLimited,
            failures(0, 1),
            Some(Duration::from_secs(3600)),
            &mut rng,
        ) else {
            panic!("must retry")
        };
        assert!(d <= Duration::from_millis(60_100));
    }

    #[test]
    fn gives_up_after_the_configured_failures() {
        let p = RetryPolicy {
            max_transient_failures: 3,
            max_rate_limited_failures: 2,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(1);
        assert!(matches!(
            p.decide(RetryCause::ServerError, failures(2, 0), None, &mut rng),
            RetryDecision::RetryAfter(_)
        ));
        assert_eq!(
            p.decide(RetryCause::Timeout, failures(3, 0), None, &mut rng),
            RetryDecision::GiveUp
        );
        // 429s have their own budget: many of them do not use up the transient one.
        assert!(matches!(
            p.decide(RetryCause::Connection, failures(1, 40), None, &mut rng),
            RetryDecision::RetryAfter(_)
        ));
        assert_eq!(
            p.decide(RetryCause::RateLimited, failures(0, 2), None, &mut rng),
            RetryDecision::GiveUp
        );
    }

    #[test]
    fn failures_are_counted_by_kind() {
        let mut f = Failures::default();
        f.record(RetryCause::RateLimited);
        f.record(RetryCause::ServerError);
        f.record(RetryCause::Connection);
        assert_eq!(f, failures(2, 1));
    }
}
