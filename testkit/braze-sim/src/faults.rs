//! Fault injection for `/users/track`: latency jitter, slow responses, 5xx errors, 429 bursts
//! and dropped connections, drawn from a seeded generator so a run is reproducible; and two
//! answer modes seen from Braze on a bad day: `errors[]` entries without an `index`, and a
//! whole request refused (400, nothing applied) because one of its objects is invalid.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Which faults to inject. `Faults::default()` injects none.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Extra latency per request, uniform in `[min, max]` milliseconds (JSON `[min, max]`).
    pub latency_ms: Option<(u64, u64)>,
    /// Share of requests (0–1) answered 500/502/503 without applying anything.
    pub error_5xx_share: f64,
    /// Periodic bursts of 429 answers, regardless of the rate window.
    pub burst_429: Option<Burst429>,
    /// Share of requests (0–1) whose connection is closed after reading the request, with no
    /// response and nothing applied.
    pub drop_share: f64,
    /// Share of requests (0–1) delayed by an extra `slow_ms`.
    pub slow_share: f64,
    /// Delay of a slow request in milliseconds.
    pub slow_ms: u64,
    /// `errors[]` entries carry no `index` (nor `input_array`): the client cannot tell which
    /// objects were refused. The objects are refused all the same.
    pub errors_without_index: bool,
    /// A request with any invalid object is refused whole: HTTP 400, nothing applied, the
    /// first object's error as `message` and the usual `errors[]` list.
    pub strict_batch_400: bool,
}

/// A burst of `length` consecutive 429s starting at request `every_n_requests`, then again at
/// `2 × every_n_requests`, and so on (requests counted since the faults were set, from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Burst429 {
    /// Period in requests (≥ 1).
    pub every_n_requests: u64,
    /// 429s per burst; a length ≥ the period means every request from the first burst on.
    pub length: u64,
}

/// A fault configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum FaultsError {
    /// A share outside 0..=1.
    #[error("faults: '{name}' must be between 0 and 1, got {value}")]
    ShareOutOfRange {
        /// Field name.
        name: &'static str,
        /// Value given.
        value: f64,
    },
    /// `latency_ms` with min > max.
    #[error("faults: 'latency_ms' must be [min, max] with min <= max, got [{min}, {max}]")]
    LatencyRange {
        /// Lower bound given.
        min: u64,
        /// Upper bound given.
        max: u64,
    },
    /// `burst_429.every_n_requests` of 0.
    #[error("faults: 'burst_429.every_n_requests' must be at least 1")]
    BurstPeriodZero,
}

impl Faults {
    /// Checks shares and ranges.
    pub fn validate(&self) -> Result<(), FaultsError> {
        for (name, value) in [
            ("error_5xx_share", self.error_5xx_share),
            ("drop_share", self.drop_share),
            ("slow_share", self.slow_share),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(FaultsError::ShareOutOfRange { name, value });
            }
        }
        if let Some((min, max)) = self.latency_ms
            && min > max
        {
            return Err(FaultsError::LatencyRange { min, max });
        }
        if self.burst_429.is_some_and(|b| b.every_n_requests == 0) {
            return Err(FaultsError::BurstPeriodZero);
        }
        Ok(())
    }
}

/// What to do to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Handle it normally.
    None,
    /// Close the connection without answering.
    Drop,
    /// Answer with this 5xx status.
    ServerError(u16),
    /// Answer 429 (burst).
    Burst429,
}

/// The fault decision for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultDecision {
    /// Delay before answering (latency jitter plus slow delay), milliseconds.
    pub delay_ms: u64,
    /// Action after the delay.
    pub action: FaultAction,
}

/// Draws fault decisions, one per `/users/track` request, reproducibly from a seed.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    faults: Faults,
    rng: StdRng,
    requests: u64,
}

impl FaultPlan {
    /// A plan for `faults` whose draws are determined by `seed`.
    pub fn new(faults: Faults, seed: u64) -> Self {
        Self {
            faults,
            rng: StdRng::seed_from_u64(seed),
            requests: 0,
        }
    }

    /// The faults in force.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Decides the next request. The same number of draws is taken every time, so the
    /// sequence depends only on the seed and the request count.
    pub fn next_decision(&mut self) -> FaultDecision {
        self.requests += 1;
        let f = &self.faults;
        let jitter: f64 = self.rng.random();
        let slow: f64 = self.rng.random();
        let drop: f64 = self.rng.random();
        let error: f64 = self.rng.random();
        let code = [500, 502, 503][self.rng.random_range(0..3usize)];
        let mut delay_ms = match f.latency_ms {
            Some((min, max)) => min + ((max - min) as f64 * jitter).round() as u64,
            None => 0,
        };
        if slow < f.slow_share {
            delay_ms += f.slow_ms;
        }
        let in_burst = f.burst_429.is_some_and(|b| {
            let n = self.requests;
            n >= b.every_n_requests && (n - b.every_n_requests) % b.every_n_requests < b.length
        });
        let action = if drop < f.drop_share {
            FaultAction::Drop
        } else if error < f.error_5xx_share {
            FaultAction::ServerError(code)
        } else if in_burst {
            FaultAction::Burst429
        } else {
            FaultAction::None
        };
        FaultDecision { delay_ms, action }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn actions(faults: Faults, seed: u64, n: usize) -> Vec<FaultAction> {
        let mut p = FaultPlan::new(faults, seed);
        (0..n).map(|_| p.next_decision().action).collect()
    }

    #[test]
    fn no_faults_means_no_delay_and_no_action() {
        let mut p = FaultPlan::new(Faults::default(), 1);
        for _ in 0..100 {
            assert_eq!(
                p.next_decision(),
                FaultDecision {
                    delay_ms: 0,
                    action: FaultAction::None
                }
            );
        }
    }

    #[test]
    fn same_seed_gives_same_sequence() {
        let f = Faults {
            error_5xx_share: 0.3,
            drop_share: 0.1,
            ..Faults::default()
        };
        assert_eq!(actions(f.clone(), 7, 200), actions(f, 7, 200));
    }

    #[test]
    fn shares_are_roughly_respected() {
        let f = Faults {
            error_5xx_share: 0.25,
            ..Faults::default()
        };
        let n = actions(f, 3, 4000)
            .iter()
            .filter(|a| matches!(a, FaultAction::ServerError(_)))
            .count();
        assert!((800..1200).contains(&n), "{n}");
    }

    #[test]
    fn burst_hits_requests_n_to_n_plus_length_minus_one_each_period() {
        let f = Faults {
            burst_429: Some(Burst429 {
                every_n_requests: 5,
                length: 2,
            }),
            ..Faults::default()
        };
        let hit: Vec<usize> = actions(f, 0, 15)
            .iter()
            .enumerate()
            .filter(|(_, a)| **a == FaultAction::Burst429)
            .map(|(i, _)| i + 1)
            .collect();
        assert_eq!(hit, vec![5, 6, 10, 11, 15]);
    }

    #[test]
    fn latency_stays_within_range() {
        let mut p = FaultPlan::new(
            Faults {
                latency_ms: Some((20, 80)),
                ..Faults::default()
            },
            9,
        );
        for _ in 0..500 {
            let d = p.next_decision().delay_ms;
            assert!((20..=80).contains(&d), "{d}");
        }
    }

    #[test]
    fn slow_share_one_adds_slow_ms_to_every_request() {
        let mut p = FaultPlan::new(
            Faults {
                slow_share: 1.0,
                slow_ms: 500,
                latency_ms: Some((10, 10)),
                ..Faults::default()
            },
            1,
        );
        assert_eq!(p.next_decision().delay_ms, 510);
    }

    #[test]
    fn invalid_faults_are_refused() {
        let share = Faults {
            drop_share: 1.5,
            ..Faults::default()
        };
        assert!(matches!(
            share.validate(),
            Err(FaultsError::ShareOutOfRange { .. })
        ));
        let lat = Faults {
            latency_ms: Some((5, 1)),
            ..Faults::default()
        };
        assert!(lat.validate().is_err());
    }
}
