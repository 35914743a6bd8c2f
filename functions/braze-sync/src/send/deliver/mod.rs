//! Sends deltas to Braze: reads [`UserDelta`]s from a bounded channel, packs them into
//! [batches](crate::send::request_body), and keeps many requests in flight under one
//! [rate limiter](crate::send::rate_limit). Each failed batch is retried alone
//! ([policy](crate::send::retry)) while the others keep flowing; a 413 splits a batch; a 2xx with
//! `errors[]` confirms all but the listed objects, unless an entry names no object of the
//! request (no `index`), or the 2xx body is not Braze's JSON: then none of its users is
//! confirmed (they come back `Unsent` and are counted as unconfirmed). A whole-request 400 is
//! narrowed down: the objects it names go to rejects and the rest is sent again; when it names
//! none, the batch is bisected until each offending object is alone. 401/403 stop the run at
//! once. A deadline stops new sends and lets the requests in flight finish.
//!
//! Every delta received comes back on the outcomes channel exactly once, as
//! [`DeliveryOutcome::Confirmed`], [`DeliveryOutcome::Rejected`] or [`DeliveryOutcome::Unsent`].
//! The first batch goes alone (a probe): a refused key costs exactly one request.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::model::{DeliveryOutcome, UserDelta};
use crate::send::braze::{BrazeApi, ItemError, TrackError};
use crate::send::rate_limit::{RateBudget, RateLimiter};
use crate::send::request_body::{Batch, BatchLimits, Batcher, MAX_BODY_BYTES, MAX_OBJECTS};
use crate::send::retry::{Failures, RetryCause, RetryDecision, RetryPolicy};

/// How the sender behaves.
#[derive(Debug, Clone)]
pub struct DeliverConfig {
    /// Attribute objects per request (75 at most).
    pub max_objects: usize,
    /// The workspace has the "50 combined updates per request" rule (caps `max_objects` at 50).
    pub combined_limit: bool,
    /// Request body limit in bytes (at most 4,000,000).
    pub max_body_bytes: usize,
    /// Requests in flight at once (including those waiting for a rate-limit slot or a retry).
    pub max_in_flight: usize,
    /// This sender's rate budget.
    pub rate: RateBudget,
    /// How many senders share the workspace limit right now, this one included
    /// ([`crate::send::workspace_share`]); the budget is divided by it. `None`: alone.
    pub peers: Option<watch::Receiver<u32>>,
    /// When and how to retry.
    pub retry: RetryPolicy,
    /// Stop starting requests at this instant (the Lambda's remaining time minus a margin that
    /// covers one request timeout); what is left comes back `Unsent`.
    pub deadline: Option<Instant>,
    /// How long requests already in flight at the deadline may still take; after that they are
    /// abandoned and their users reported `Unsent` (Braze may still apply them: resending an
    /// attribute value is harmless).
    pub in_flight_grace: Duration,
    /// A partly filled batch is sent after waiting this long for more deltas.
    pub linger: Duration,
    /// Send the first batch alone before ramping up, so a refused key costs one request.
    pub probe_first: bool,
    /// After this many batches in a row are given up on (retries exhausted), Braze is deemed
    /// unavailable and the run stops (0 = never).
    pub stop_after_failed_batches: u32,
    /// Seed of the retry jitter.
    pub seed: u64,
}

impl Default for DeliverConfig {
    fn default() -> Self {
        Self {
            max_objects: MAX_OBJECTS,
            combined_limit: false,
            max_body_bytes: MAX_BODY_BYTES,
            max_in_flight: 256,
            rate: RateBudget::default(),
            peers: None,
            retry: RetryPolicy::default(),
            deadline: None,
            in_flight_grace: Duration::from_secs(10),
            linger: Duration::from_millis(50),
            probe_first: true,
            stop_after_failed_batches: 3,
            seed: 0x5eed_b4a2e,
        }
    }
}

impl DeliverConfig {
    /// The batch limits this configuration implies.
    pub fn limits(&self) -> BatchLimits {
        BatchLimits::new(self.max_objects, self.combined_limit, self.max_body_bytes)
    }
}

/// Retries by cause (and 413 splits).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetriesByCause {
    /// After a 429.
    pub http_429: u64,
    /// After a 5xx.
    pub http_5xx: u64,
    /// After a timeout.
    pub timeout: u64,
    /// After a failed or dropped connection.
    pub connection: u64,
    /// Batches split in two after a 413.
    pub split_413: u64,
    /// Batches split (bisected) or resent without their named objects after a whole-request
    /// 400, to isolate the objects Braze refused.
    pub bisect_400: u64,
}

impl RetriesByCause {
    /// Adds another count's retries (a fan-out's pieces, a piece's earlier invocations).
    pub fn merge(&mut self, o: &RetriesByCause) {
        self.http_429 += o.http_429;
        self.http_5xx += o.http_5xx;
        self.timeout += o.timeout;
        self.connection += o.connection;
        self.split_413 += o.split_413;
        self.bisect_400 += o.bisect_400;
    }

    fn add(&mut self, cause: RetryCause) {
        match cause {
            RetryCause::RateLimited => self.http_429 += 1,
            RetryCause::ServerError => self.http_5xx += 1,
            RetryCause::Timeout => self.timeout += 1,
            RetryCause::Connection => self.connection += 1,
        }
    }

    /// All retries (splits included).
    pub fn total(&self) -> u64 {
        self.http_429
            + self.http_5xx
            + self.timeout
            + self.connection
            + self.split_413
            + self.bisect_400
    }
}

/// Why a run stopped before sending everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The deadline came.
    Deadline,
    /// Braze refused the key (401/403).
    Unauthorized,
    /// Several batches in a row exhausted their retries.
    BrazeUnavailable,
    /// Nobody listens to the outcomes any more.
    OutcomesClosed,
}

/// What the sender did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeliveryStats {
    /// Deltas received from the channel.
    pub deltas_in: u64,
    /// Deltas that went out in at least one request.
    pub users_sent: u64,
    /// Attributes of those deltas.
    pub attributes_sent: u64,
    /// Deltas Braze accepted.
    pub users_confirmed: u64,
    /// Records-only deltas (a new row digest, nothing to send) handed to the committer.
    pub users_recorded: u64,
    /// Deltas Braze refused (`errors[]`, permanent 4xx, or too large to send).
    pub braze_rejected: u64,
    /// Deltas not sent or not known to be applied.
    pub users_unsent: u64,
    /// Deltas Braze answered for without confirming them (an `errors[]` entry without an
    /// index, or a 2xx whose body is not Braze's JSON): reported `Unsent`, never committed, and
    /// sent again by the next run. Not counted in `users_unsent`.
    pub users_unconfirmed: u64,
    /// Requests whose answer confirmed nothing (see `users_unconfirmed`).
    pub unconfirmed_requests: u64,
    /// HTTP requests made (retries included).
    pub requests: u64,
    /// Retries by cause.
    pub retries_by_cause: RetriesByCause,
    /// 429 answers.
    pub http_429: u64,
    /// 2xx answers that listed `errors[]`.
    pub partial_failures: u64,
    /// `errors[]` entries that did not name an attribute object of the request.
    pub unmapped_errors: u64,
    /// Batches given up on after exhausting retries.
    pub batches_given_up: u64,
    /// Most attribute objects in one request.
    pub max_objects_per_request: u64,
    /// Largest request body, bytes.
    pub max_request_bytes: u64,
    /// Request body bytes sent (retries included).
    pub bytes_sent: u64,
    /// Wall time of the delivery, seconds.
    pub duration_s: f64,
    /// `requests / duration_s`.
    pub requests_per_s: f64,
    /// The configured limit this deployment may use: `requests_per_window / window x share`
    /// (before dividing among concurrent senders), to read `requests_per_s` against.
    pub rate_limit_configured_rps: f64,
    /// Why the run stopped early, if it did.
    pub stopped: Option<StopReason>,
    /// The most senders that shared the workspace rate limit during the delivery (this one
    /// included; 1 when it was alone or not coordinated).
    pub workspace_senders: u32,
}

/// The run had to stop. Each variant carries the statistics so far; every delta received has
/// still been reported on the outcomes channel.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// 401/403: wrong key, key without `users.track`, or key of another instance.
    #[error("{message}")]
    Unauthorized {
        /// 401 or 403.
        status: u16,
        /// What to check (names `users.track` and the instance; never the key).
        message: String,
        /// What happened before the stop.
        stats: Box<DeliveryStats>,
    },
    /// Braze kept failing (5xx, timeouts, dropped connections) beyond the retry budget.
    #[error("Braze is unavailable: {message}")]
    BrazeUnavailable {
        /// The last failure.
        message: String,
        /// What happened before the stop.
        stats: Box<DeliveryStats>,
    },
    /// The outcomes receiver was dropped, so confirmations could not be recorded.
    #[error("the delivery outcomes receiver was dropped; confirmations were lost")]
    OutcomesClosed {
        /// What happened before the stop.
        stats: Box<DeliveryStats>,
    },
}

impl DeliverError {
    /// The statistics of the stopped run.
    pub fn stats(&self) -> &DeliveryStats {
        match self {
            DeliverError::Unauthorized { stats, .. }
            | DeliverError::BrazeUnavailable { stats, .. }
            | DeliverError::OutcomesClosed { stats } => stats,
        }
    }

    /// Whether running again later can succeed without a configuration change.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, DeliverError::Unauthorized { .. })
    }
}

/// How one batch ended.
enum BatchResult {
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
}

struct BatchDone {
    batch: Batch,
    id: u64,
    fresh: bool,
    requests: u64,
    bytes: u64,
    http_429: u64,
    retries: RetriesByCause,
    result: BatchResult,
}

/// What every in-flight batch shares.
struct Shared<'a, A: ?Sized> {
    api: &'a A,
    limiter: RateLimiter,
    policy: RetryPolicy,
    rng: Mutex<StdRng>,
    deadline: Option<Instant>,
    grace: Duration,
    stop: watch::Receiver<bool>,
}

impl<A: BrazeApi + ?Sized> Shared<'_, A> {
    fn past_deadline(&self, at: Instant) -> bool {
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
            _ = tokio::time::sleep_until(until) => true,
            _ = stop.wait_for(|s| *s) => false,
        }
    }

    /// Sends one batch until it has a final answer, retrying it alone.
    async fn send(&self, batch: Batch, id: u64, fresh: bool) -> BatchDone {
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
        let mut failures = Failures::default();
        let unsent = |reason: &str| BatchResult::Unsent {
            reason: reason.to_string(),
            gave_up: false,
        };
        loop {
            if *self.stop.borrow() {
                done.result = unsent("the run was stopped");
                return done;
            }
            let permit = {
                let mut stop = self.stop.clone();
                let deadline = self.deadline;
                tokio::select! {
                    p = self.limiter.acquire() => p,
                    _ = stop.wait_for(|s| *s) => {
                        done.result = unsent("the run was stopped");
                        return done;
                    }
                    _ = async {
                        match deadline {
                            Some(d) => tokio::time::sleep_until(d).await,
                            None => std::future::pending().await,
                        }
                    } => {
                        done.result = unsent("the deadline came before a rate-limit slot");
                        return done;
                    }
                }
            };
            if self.past_deadline(Instant::now()) {
                done.result = unsent("the deadline came before the request");
                return done;
            }
            done.requests += 1;
            done.bytes += done.batch.body_len() as u64;
            let answer = match self.deadline {
                None => self.api.track(done.batch.body()).await,
                Some(d) => tokio::select! {
                    a = self.api.track(done.batch.body()) => a,
                    _ = tokio::time::sleep_until(d + self.grace) => {
                        done.result = unsent("the request was still unanswered after the deadline's grace period");
                        return done;
                    }
                },
            };
            let err = match answer {
                Ok(resp) => {
                    permit.observe(&resp.rate, false);
                    done.result = BatchResult::Accepted(resp.errors);
                    return done;
                }
                Err(e) => e,
            };
            let rate_limited = matches!(err, TrackError::RateLimited { .. });
            if let Some(rate) = err.rate() {
                permit.observe(rate, rate_limited);
            }
            let reset_in = err
                .rate()
                .and_then(|r| r.retry_in(self.limiter.epoch_now()));
            drop(permit);
            let cause = match err {
                TrackError::Unauthorized { status, message } => {
                    done.result = BatchResult::Fatal { status, message };
                    return done;
                }
                TrackError::PayloadTooLarge { .. } => {
                    done.result = BatchResult::TooLarge;
                    return done;
                }
                e @ TrackError::Unconfirmed { .. } => {
                    done.result = BatchResult::Unconfirmed {
                        reason: e.to_string(),
                    };
                    return done;
                }
                TrackError::Rejected {
                    status,
                    message,
                    errors,
                    ..
                } => {
                    done.result = BatchResult::Rejected {
                        status,
                        message,
                        errors,
                    };
                    return done;
                }
                ref e => match RetryCause::of(e) {
                    Some(c) => c,
                    None => {
                        done.result = BatchResult::Unsent {
                            reason: e.to_string(),
                            gave_up: true,
                        };
                        return done;
                    }
                },
            };
            if rate_limited {
                done.http_429 += 1;
            }
            failures.record(cause);
            match self.decide(cause, failures, reset_in) {
                RetryDecision::GiveUp => {
                    warn!(
                        batch = id,
                        attempts = done.requests,
                        error = %err,
                        "Giving up on a Braze batch after repeated failures; its users stay unsent."
                    );
                    done.result = BatchResult::Unsent {
                        reason: err.to_string(),
                        gave_up: true,
                    };
                    return done;
                }
                RetryDecision::RetryAfter(delay) => {
                    let at = Instant::now() + delay;
                    if self.past_deadline(at) {
                        done.result = unsent("the deadline came before the retry");
                        return done;
                    }
                    done.retries.add(cause);
                    debug!(
                        batch = id,
                        cause = cause.as_str(),
                        delay_ms = delay.as_millis() as u64,
                        "Retrying a Braze batch."
                    );
                    if !self.sleep_unless_stopped(at).await {
                        done.result = unsent("the run was stopped");
                        return done;
                    }
                }
            }
        }
    }
}

type InFlight<'a> = FuturesUnordered<Pin<Box<dyn Future<Output = BatchDone> + Send + 'a>>>;

/// The sending loop's bookkeeping.
struct Run {
    stats: DeliveryStats,
    outcomes: mpsc::Sender<DeliveryOutcome>,
    outcomes_closed: bool,
    stopping: Option<StopReason>,
    fatal: Option<(u16, String)>,
    unavailable: Option<String>,
    failed_in_a_row: u32,
}

impl Run {
    async fn emit(&mut self, outcome: DeliveryOutcome) {
        match &outcome {
            DeliveryOutcome::Confirmed(_) => self.stats.users_confirmed += 1,
            DeliveryOutcome::Rejected { .. } => self.stats.braze_rejected += 1,
            DeliveryOutcome::Unsent(_) => self.stats.users_unsent += 1,
            DeliveryOutcome::Recorded(_) => self.stats.users_recorded += 1,
        }
        self.hand_back(outcome).await;
    }

    /// A delta Braze answered for without confirming it: back as `Unsent` (never committed),
    /// counted apart from the deltas that were not sent.
    async fn unconfirmed(&mut self, delta: UserDelta) {
        self.stats.users_unconfirmed += 1;
        self.hand_back(DeliveryOutcome::Unsent(delta)).await;
    }

    async fn hand_back(&mut self, outcome: DeliveryOutcome) {
        if self.outcomes_closed {
            return;
        }
        if self.outcomes.send(outcome).await.is_err() {
            self.outcomes_closed = true;
            if self.stopping.is_none() {
                self.stopping = Some(StopReason::OutcomesClosed);
            }
        }
    }

    async fn unsent(&mut self, deltas: impl IntoIterator<Item = UserDelta>) {
        for d in deltas {
            self.emit(DeliveryOutcome::Unsent(d)).await;
        }
    }
}

/// Sends every delta from `rx` to Braze and reports each one's outcome on `outcomes`.
///
/// Returns when `rx` is closed and drained and every batch has its answer, or when the run
/// stops (deadline: `Ok` with `stats.stopped`; refused key, Braze unavailable, outcomes dropped:
/// `Err`). When the run stops early the receiver is closed, so the producer's next `send` fails:
/// deltas it did not hand over were never received and have no outcome.
pub async fn deliver<A>(
    mut rx: mpsc::Receiver<UserDelta>,
    api: &A,
    cfg: DeliverConfig,
    outcomes: mpsc::Sender<DeliveryOutcome>,
) -> Result<DeliveryStats, DeliverError>
where
    A: BrazeApi + ?Sized,
{
    let started = Instant::now();
    let limits = cfg.limits();
    let max_in_flight = cfg.max_in_flight.max(1);
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Shared {
        api,
        limiter: RateLimiter::shared(cfg.rate, cfg.peers.clone()),
        policy: cfg.retry.clone(),
        rng: Mutex::new(StdRng::seed_from_u64(cfg.seed)),
        deadline: cfg.deadline,
        grace: cfg.in_flight_grace,
        stop: stop_rx,
    };
    info!(
        target_host = %api.describe(),
        max_objects = limits.max_objects,
        max_in_flight,
        planned_requests_per_s = shared.limiter.per_second(),
        workspace_senders = cfg.peers.as_ref().map_or(1, |p| *p.borrow()),
        "Starting delivery to Braze."
    );
    let mut run = Run {
        stats: DeliveryStats {
            rate_limit_configured_rps: configured_rps(&cfg.rate),
            ..DeliveryStats::default()
        },
        outcomes,
        outcomes_closed: false,
        stopping: None,
        fatal: None,
        unavailable: None,
        failed_in_a_row: 0,
    };
    let mut batcher = Batcher::new(limits);
    let mut open_since: Option<Instant> = None;
    // Batches ready to go: `(batch, fresh)`; split halves are not fresh (already counted sent).
    let mut ready: VecDeque<(Batch, bool)> = VecDeque::new();
    let mut in_flight: InFlight<'_> = FuturesUnordered::new();
    let mut input_open = true;
    let mut probing = cfg.probe_first;
    let mut next_id: u64 = 0;
    let mut drained_on_stop = false;

    loop {
        // Start what we may.
        if run.stopping.is_none() {
            let cap = if probing { 1 } else { max_in_flight };
            while in_flight.len() < cap {
                let Some((batch, fresh)) = ready.pop_front() else {
                    break;
                };
                if shared.past_deadline(Instant::now()) {
                    ready.push_front((batch, fresh));
                    run.stopping = Some(StopReason::Deadline);
                    break;
                }
                next_id += 1;
                let id = next_id;
                let s = &shared;
                in_flight.push(Box::pin(async move { s.send(batch, id, fresh).await }));
            }
        }
        // Stopping: nothing new goes out; everything not in flight is unsent.
        if let Some(reason) = run.stopping
            && !drained_on_stop
        {
            drained_on_stop = true;
            let _ = stop_tx.send(true);
            info!(reason = ?reason, in_flight = in_flight.len(), "Stopping delivery; remaining users are reported unsent.");
            rx.close();
            while let Ok(d) = rx.try_recv() {
                if d.records_only() {
                    run.emit(DeliveryOutcome::Recorded(d)).await;
                    continue;
                }
                run.stats.deltas_in += 1;
                run.emit(DeliveryOutcome::Unsent(d)).await;
            }
            input_open = false;
            let pending = batcher.take_pending();
            run.unsent(pending).await;
            open_since = None;
            while let Some((b, _)) = ready.pop_front() {
                run.unsent(b.into_deltas()).await;
            }
        }
        if !input_open && ready.is_empty() && batcher.pending() == 0 && in_flight.is_empty() {
            break;
        }

        let can_read = input_open && ready.is_empty() && run.stopping.is_none();
        let linger_at = open_since.map(|t| t + cfg.linger);
        tokio::select! {
            biased;
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                if probing && !matches!(done.result, BatchResult::Fatal { .. }) {
                    probing = false;
                }
                handle_done(done, &mut run, &mut ready, cfg.stop_after_failed_batches).await;
            }
            received = rx.recv(), if can_read => {
                match received {
                    Some(d) => {
                        let mut next = Some(d);
                        // Take what is already queued without going round the loop each time.
                        let mut budget = 4 * limits.max_objects;
                        while let Some(d) = next.take() {
                            if d.records_only() {
                                // Nothing to send: only the state records its digest.
                                run.emit(DeliveryOutcome::Recorded(d)).await;
                                budget -= 1;
                                if budget > 0 && ready.is_empty() {
                                    next = rx.try_recv().ok();
                                }
                                continue;
                            }
                            run.stats.deltas_in += 1;
                            if batcher.pending() == 0 {
                                open_since = Some(Instant::now());
                            }
                            match batcher.push(d) {
                                Ok(full) => {
                                    for b in full {
                                        ready.push_back((b, true));
                                    }
                                    if batcher.pending() == 0 {
                                        open_since = None;
                                    }
                                }
                                Err(over) => {
                                    let reason = format!(
                                        "{} (Braze refuses requests over 4 MB); not sent",
                                        over
                                    );
                                    run.emit(DeliveryOutcome::Rejected { delta: over.delta, reason }).await;
                                }
                            }
                            budget -= 1;
                            if budget > 0 && ready.is_empty() {
                                next = rx.try_recv().ok();
                            }
                        }
                    }
                    None => {
                        input_open = false;
                        open_since = None;
                        if let Some(b) = batcher.flush() {
                            ready.push_back((b, true));
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(linger_at.unwrap_or_else(Instant::now)), if linger_at.is_some() && ready.is_empty() && run.stopping.is_none() => {
                open_since = None;
                if let Some(b) = batcher.flush() {
                    ready.push_back((b, true));
                }
            }
            _ = tokio::time::sleep_until(cfg.deadline.unwrap_or_else(Instant::now)), if cfg.deadline.is_some() && run.stopping.is_none() => {
                run.stopping = Some(StopReason::Deadline);
            }
        }
    }

    let elapsed = started.elapsed().as_secs_f64();
    run.stats.duration_s = elapsed;
    run.stats.requests_per_s = if elapsed > 0.0 {
        run.stats.requests as f64 / elapsed
    } else {
        0.0
    };
    run.stats.stopped = run.stopping;
    run.stats.workspace_senders = shared.limiter.most_peers();
    let stats = run.stats.clone();
    info!(
        deltas_in = stats.deltas_in,
        users_confirmed = stats.users_confirmed,
        braze_rejected = stats.braze_rejected,
        users_unsent = stats.users_unsent,
        requests = stats.requests,
        http_429 = stats.http_429,
        retries = stats.retries_by_cause.total(),
        duration_s = stats.duration_s,
        requests_per_s = stats.requests_per_s,
        workspace_senders = stats.workspace_senders,
        stopped = ?stats.stopped,
        "Delivery to Braze finished."
    );
    if let Some((status, message)) = run.fatal {
        return Err(DeliverError::Unauthorized {
            status,
            message,
            stats: Box::new(stats),
        });
    }
    if run.outcomes_closed {
        return Err(DeliverError::OutcomesClosed {
            stats: Box::new(stats),
        });
    }
    if let Some(message) = run.unavailable {
        return Err(DeliverError::BrazeUnavailable {
            message,
            stats: Box::new(stats),
        });
    }
    Ok(stats)
}

/// The configured request rate of a budget: `requests_per_window / window x share`.
pub fn configured_rps(rate: &crate::send::rate_limit::RateBudget) -> f64 {
    let window = rate.window.as_secs_f64();
    if window > 0.0 {
        f64::from(rate.requests_per_window) / window * rate.share
    } else {
        0.0
    }
}

/// Accounts for a finished batch and reports its deltas.
async fn handle_done(
    done: BatchDone,
    run: &mut Run,
    ready: &mut VecDeque<(Batch, bool)>,
    stop_after_failed_batches: u32,
) {
    let stats = &mut run.stats;
    stats.requests += done.requests;
    stats.bytes_sent += done.bytes;
    stats.http_429 += done.http_429;
    let r = &done.retries;
    stats.retries_by_cause.http_429 += r.http_429;
    stats.retries_by_cause.http_5xx += r.http_5xx;
    stats.retries_by_cause.timeout += r.timeout;
    stats.retries_by_cause.connection += r.connection;
    if done.requests > 0 {
        stats.max_objects_per_request = stats.max_objects_per_request.max(done.batch.len() as u64);
        stats.max_request_bytes = stats.max_request_bytes.max(done.batch.body_len() as u64);
        if done.fresh {
            stats.users_sent += done.batch.len() as u64;
            stats.attributes_sent += done.batch.attribute_count() as u64;
        }
        crate::progress::LIVE.sent(
            if done.fresh {
                done.batch.len() as u64
            } else {
                0
            },
            done.requests,
        );
    }
    let gave_up = matches!(done.result, BatchResult::Unsent { gave_up: true, .. });
    if gave_up {
        run.stats.batches_given_up += 1;
        run.failed_in_a_row += 1;
    } else if done.requests > 0 {
        run.failed_in_a_row = 0;
    }
    match done.result {
        BatchResult::Accepted(errors) => {
            let mut unmapped_any = 0;
            let (reasons, unmapped) = reasons_by_index(&done.batch, &errors, &mut unmapped_any);
            run.stats.unmapped_errors += unmapped_any;
            if !errors.is_empty() {
                run.stats.partial_failures += 1;
                warn!(
                    batch = done.id,
                    objects = done.batch.len(),
                    refused = reasons.iter().filter(|r| r.is_some()).count(),
                    unmapped,
                    "Braze accepted a batch but refused some of its objects."
                );
            }
            if unmapped > 0 {
                // An error we cannot attribute could be about any object: confirm none.
                run.stats.unconfirmed_requests += 1;
                warn!(
                    batch = done.id,
                    unmapped,
                    "Braze listed errors[] entries that name no object of the request; none of its users is confirmed."
                );
            }
            for (delta, reason) in done.batch.into_deltas().into_iter().zip(reasons) {
                match reason {
                    Some(reason) => run.emit(DeliveryOutcome::Rejected { delta, reason }).await,
                    None if unmapped > 0 => run.unconfirmed(delta).await,
                    None => run.emit(DeliveryOutcome::Confirmed(delta)).await,
                }
            }
        }
        BatchResult::Unconfirmed { reason } => {
            run.stats.unconfirmed_requests += 1;
            warn!(batch = done.id, objects = done.batch.len(), reason = %reason, "Braze's answer confirms nothing; the batch's users stay unconfirmed.");
            for delta in done.batch.into_deltas() {
                run.unconfirmed(delta).await;
            }
        }
        BatchResult::Rejected { status: 400, .. }
            if done.batch.len() > 1 && run.stopping.is_some() =>
        {
            run.unsent(done.batch.into_deltas()).await;
        }
        BatchResult::Rejected {
            status: 400,
            message,
            errors,
        } if done.batch.len() > 1 => {
            // A whole-request 400 applied nothing. Narrow it down to the offending objects.
            let mut unmapped = 0;
            let (own, _) = reasons_by_index(&done.batch, &errors, &mut unmapped);
            run.stats.retries_by_cause.bisect_400 += 1;
            if own.iter().any(Option::is_some) {
                let out: Vec<bool> = own.iter().map(Option::is_some).collect();
                let (rest, taken) = done.batch.take_out(&out);
                warn!(batch = done.id, status = 400, braze_message = %message, refused = taken.len(),
                      "Braze refused a request naming some of its objects; those go to rejects, the rest is sent again.");
                for (delta, o) in taken.into_iter().zip(own.into_iter().flatten()) {
                    let reason = format!(
                        "Braze refused the request (HTTP 400: {message}); this object: {o}"
                    );
                    run.emit(DeliveryOutcome::Rejected { delta, reason }).await;
                }
                if let Some(rest) = rest {
                    ready.push_front((rest, false));
                }
            } else if let Some((a, b)) = done.batch.split() {
                debug!(batch = done.id, objects = a.len() + b.len(), braze_message = %message,
                       "Braze refused a whole request without naming an object; bisecting it.");
                ready.push_front((b, false));
                ready.push_front((a, false));
            }
        }
        BatchResult::Rejected {
            status,
            message,
            errors,
        } => {
            warn!(batch = done.id, status, braze_message = %message, "Braze refused a batch; its users go to rejects.");
            let mut unmapped = 0;
            let (own, _) = reasons_by_index(&done.batch, &errors, &mut unmapped);
            for (delta, own) in done.batch.into_deltas().into_iter().zip(own) {
                let reason = match own {
                    Some(o) => format!(
                        "Braze refused the request (HTTP {status}: {message}); this object: {o}"
                    ),
                    None => format!("Braze refused the request (HTTP {status}: {message})"),
                };
                run.emit(DeliveryOutcome::Rejected { delta, reason }).await;
            }
        }
        BatchResult::TooLarge => {
            if run.stopping.is_some() {
                run.unsent(done.batch.into_deltas()).await;
                return;
            }
            let len = done.batch.len();
            if len < 2 {
                for delta in done.batch.into_deltas() {
                    run.emit(DeliveryOutcome::Rejected {
                        delta,
                        reason: "Braze refused this attribute object alone as too large (HTTP 413)"
                            .to_string(),
                    })
                    .await;
                }
                return;
            }
            if let Some((a, b)) = done.batch.split() {
                debug!(
                    batch = done.id,
                    objects = len,
                    "Braze answered 413; splitting the batch."
                );
                run.stats.retries_by_cause.split_413 += 1;
                ready.push_front((b, false));
                ready.push_front((a, false));
            }
        }
        BatchResult::Fatal { status, message } => {
            error!(status, reason = %message, "Braze refused the API key; stopping the run.");
            if run.fatal.is_none() {
                run.fatal = Some((status, message));
            }
            run.stopping = Some(StopReason::Unauthorized);
            run.unsent(done.batch.into_deltas()).await;
        }
        BatchResult::Unsent { reason, .. } => {
            if gave_up
                && stop_after_failed_batches > 0
                && run.failed_in_a_row >= stop_after_failed_batches
                && run.stopping.is_none()
            {
                error!(failed_batches = run.failed_in_a_row, last_error = %reason, "Braze keeps failing; stopping the run.");
                run.unavailable = Some(reason);
                run.stopping = Some(StopReason::BrazeUnavailable);
            }
            run.unsent(done.batch.into_deltas()).await;
        }
    }
}

/// Braze's message for each object of the batch that `errors[]` names (attributes only).
/// Entries that name no object of the batch are counted in `unmapped`; those that could be
/// about any of its attribute objects (no index, or an attributes index past the batch) also
/// in the returned `unattributable` count, which leaves the whole request unconfirmed.
fn reasons_by_index(
    batch: &Batch,
    errors: &[ItemError],
    unmapped: &mut u64,
) -> (Vec<Option<String>>, u64) {
    let mut reasons: Vec<Option<String>> = vec![None; batch.len()];
    let mut unattributable = 0;
    for e in errors {
        let is_attributes = e.input_array.as_deref().is_none_or(|a| a == "attributes");
        match e.index {
            Some(_) if !is_attributes => *unmapped += 1,
            Some(i) if i < reasons.len() => {
                let slot = &mut reasons[i];
                match slot {
                    Some(existing) => {
                        existing.push_str("; ");
                        existing.push_str(&e.message);
                    }
                    None => *slot = Some(e.message.clone()),
                }
            }
            _ => {
                *unmapped += 1;
                unattributable += 1;
            }
        }
    }
    (reasons, unattributable)
}
