//! One batch until it has a final answer: wait for a rate-limit slot, send, and retry it alone
//! ([`crate::send::retry`] policy) while the other batches keep flowing. The answer becomes a
//! [`BatchResult`] the sending loop accounts for.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use rand::rngs::StdRng;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::RetriesByCause;
use crate::send::braze::{BrazeApi, ItemError, TrackError, TrackResponse};
use crate::send::hourly_budget::Spender;
use crate::send::rate_limit::{Permit, RateLimiter};
use crate::send::request_body::Batch;
use crate::send::retry::{Failures, RetryCause, RetryDecision, RetryPolicy};

/// How one batch ended.
pub(super) enum BatchResult {
    /// 2xx; `errors` lists refused objects.
    Accepted(Vec<ItemError>),
    /// A permanent 4xx for the whole request.
    Rejected {
        status: u16,
        message: String,
        errors: Vec<ItemError>,
    },
    /// 413.
    TooLarge,
    /// A 2xx that confirms nothing (its body is not Braze's JSON).
    Unconfirmed { reason: String },
    /// 401/403.
    Fatal { status: u16, message: String },
    /// Not sent (stopped, deadline) or retries exhausted (`gave_up`).
    Unsent { reason: String, gave_up: bool },
    /// Not sent: the workspace's hourly request budget is spent; the run stops.
    OverBudget { reason: String },
}

impl BatchResult {
    /// Not sent for `reason` (the run stopped or the deadline came); not a failure of Braze.
    fn unsent(reason: &str) -> Self {
        BatchResult::Unsent {
            reason: reason.to_string(),
            gave_up: false,
        }
    }

    /// The final result of an error that is not retried, or the error back with its retry
    /// cause.
    fn of_error(err: TrackError) -> Result<(RetryCause, TrackError), Self> {
        match err {
            TrackError::Unauthorized { status, message } => {
                Err(BatchResult::Fatal { status, message })
            }
            TrackError::PayloadTooLarge { .. } => Err(BatchResult::TooLarge),
            e @ TrackError::Unconfirmed { .. } => Err(BatchResult::Unconfirmed {
                reason: e.to_string(),
            }),
            TrackError::Rejected {
                status,
                message,
                errors,
                ..
            } => Err(BatchResult::Rejected {
                status,
                message,
                errors,
            }),
            e => match RetryCause::of(&e) {
                Some(c) => Ok((c, e)),
                None => Err(BatchResult::Unsent {
                    reason: e.to_string(),
                    gave_up: true,
                }),
            },
        }
    }
}

/// A batch with its answer and what it took to get it.
pub(super) struct BatchDone {
    pub(super) batch: Batch,
    pub(super) id: u64,
    /// Not a split half or a resent rest (those were counted sent with their first batch).
    pub(super) fresh: bool,
    pub(super) requests: u64,
    pub(super) bytes: u64,
    pub(super) http_429: u64,
    pub(super) retries: RetriesByCause,
    pub(super) result: BatchResult,
}

/// Batches in flight, each ending in its [`BatchDone`].
pub(super) type InFlight<'a> =
    FuturesUnordered<Pin<Box<dyn Future<Output = BatchDone> + Send + 'a>>>;

/// What every in-flight batch shares.
pub(super) struct Shared<'a, A: ?Sized> {
    pub(super) api: &'a A,
    pub(super) limiter: RateLimiter,
    pub(super) policy: RetryPolicy,
    pub(super) rng: Mutex<StdRng>,
    pub(super) deadline: Option<Instant>,
    pub(super) grace: Duration,
    pub(super) stop: watch::Receiver<bool>,
    /// This sender's account of the workspace's hourly request budget.
    pub(super) budget: Option<Spender>,
}

impl<A: BrazeApi + ?Sized> Shared<'_, A> {
    pub(super) fn past_deadline(&self, at: Instant) -> bool {
        self.deadline.is_some_and(|d| at >= d)
    }

    fn decide(
        &self,
        cause: RetryCause,
        failures: Failures,
        reset_in: Option<Duration>,
    ) -> RetryDecision {
        match self.rng.lock() {
            Ok(mut rng) => self.policy.decide(cause, failures, reset_in, &mut *rng),
            Err(p) => self
                .policy
                .decide(cause, failures, reset_in, &mut *p.into_inner()),
        }
    }

    /// Waits until `until`, unless the run stops first (then `false`).
    async fn sleep_unless_stopped(&self, until: Instant) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(until) => true,
            _ = stop.wait_for(|s| *s) => false,
        }
    }

    /// Sends one batch until it has a final answer, retrying it alone.
    pub(super) async fn send(&self, batch: Batch, id: u64, fresh: bool) -> BatchDone {
        let mut done = BatchDone {
            batch,
            id,
            fresh,
            requests: 0,
            bytes: 0,
            http_429: 0,
            retries: RetriesByCause::default(),
            result: BatchResult::TooLarge,
        };
        done.result = self.until_answered(&mut done).await;
        done
    }

    /// The request and its retries; counts them in `done`.
    async fn until_answered(&self, done: &mut BatchDone) -> BatchResult {
        let mut failures = Failures::default();
        loop {
            if *self.stop.borrow() {
                return BatchResult::unsent("the run was stopped");
            }
            let permit = match self.slot().await {
                Ok(permit) => permit,
                Err(result) => return result,
            };
            if let Err(result) = self.budget_token().await {
                return result;
            }
            if self.past_deadline(Instant::now()) {
                return BatchResult::unsent("the deadline came before the request");
            }
            done.requests += 1;
            done.bytes += done.batch.body_len() as u64;
            let err = match self.request(&done.batch).await {
                Ok(Ok(resp)) => {
                    permit.observe(&resp.rate, false);
                    return BatchResult::Accepted(resp.errors);
                }
                Ok(Err(e)) => e,
                Err(result) => return result,
            };
            let rate_limited = matches!(err, TrackError::RateLimited { .. });
            if let Some(rate) = err.rate() {
                permit.observe(rate, rate_limited);
            }
            let reset_in = err
                .rate()
                .and_then(|r| r.retry_in(self.limiter.epoch_now()));
            drop(permit);
            let (cause, err) = match BatchResult::of_error(err) {
                Ok(retried) => retried,
                Err(result) => return result,
            };
            if rate_limited {
                done.http_429 += 1;
            }
            failures.record(cause);
            match self.decide(cause, failures, reset_in) {
                RetryDecision::GiveUp => {
                    warn!(
                        batch = done.id,
                        attempts = done.requests,
                        error = %err,
                        "Giving up on a Braze batch after repeated failures; its users stay unsent."
                    );
                    return BatchResult::Unsent {
                        reason: err.to_string(),
                        gave_up: true,
                    };
                }
                RetryDecision::RetryAfter(delay) => {
                    let at = Instant::now() + delay;
                    if self.past_deadline(at) {
                        return BatchResult::unsent("the deadline came before the retry");
                    }
                    done.retries.add(cause);
                    debug!(
                        batch = done.id,
                        cause = cause.as_str(),
                        delay_ms = delay.as_millis() as u64,
                        "Retrying a Braze batch."
                    );
                    if !self.sleep_unless_stopped(at).await {
                        return BatchResult::unsent("the run was stopped");
                    }
                }
            }
        }
    }

    /// A rate-limit slot, unless the run stops or the deadline comes first.
    async fn slot(&self) -> Result<Permit<'_>, BatchResult> {
        let mut stop = self.stop.clone();
        let deadline = self.deadline;
        tokio::select! {
            biased;
            p = self.limiter.acquire() => Ok(p),
            _ = stop.wait_for(|s| *s) => Err(BatchResult::unsent("the run was stopped")),
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => Err(BatchResult::unsent("the deadline came before a rate-limit slot")),
        }
    }

    /// A token of the hourly budget for the next request (none configured: at once), unless
    /// the run stops or the deadline comes first.
    async fn budget_token(&self) -> Result<(), BatchResult> {
        let Some(budget) = &self.budget else {
            return Ok(());
        };
        let mut stop = self.stop.clone();
        let deadline = self.deadline;
        tokio::select! {
            biased;
            taken = budget.take() => taken.map_err(|r| BatchResult::OverBudget { reason: r.reason }),
            _ = stop.wait_for(|s| *s) => Err(BatchResult::unsent("the run was stopped")),
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => Err(BatchResult::unsent("the deadline came before an hourly budget token")),
        }
    }

    /// One request; abandoned (`Err`) when still unanswered after the deadline's grace period.
    async fn request(
        &self,
        batch: &Batch,
    ) -> Result<Result<TrackResponse, TrackError>, BatchResult> {
        match self.deadline {
            None => Ok(self.api.track(batch.body()).await),
            Some(d) => tokio::select! {
                biased;
                a = self.api.track(batch.body()) => Ok(a),
                _ = tokio::time::sleep_until(d + self.grace) => Err(BatchResult::unsent(
                    "the request was still unanswered after the deadline's grace period",
                )),
            },
        }
    }
}
