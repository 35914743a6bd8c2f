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

mod attempt;
mod outcome;
mod stats;

use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::info;

use crate::model::{DeliveryOutcome, UserDelta};
use crate::send::braze::BrazeApi;
use crate::send::hourly_budget::{HourlyBudget, Spender};
use crate::send::rate_limit::{RateBudget, RateLimiter};
use crate::send::request_body::{BatchLimits, Batcher, MAX_BODY_BYTES, MAX_OBJECTS};
use crate::send::retry::RetryPolicy;
use crate::send::workspace_share::Activity;
use attempt::{BatchResult, InFlight, Shared};
use outcome::{Ready, Run};
pub use stats::{DeliverError, DeliveryStats, RetriesByCause, StopReason};

/// Request body bytes the sender keeps in flight by default: ~150 requests of 75 typical
/// 20-attribute users (~55 KB each), more than a 1,000 requests/s limit at 100 ms of latency
/// needs, and ~25 MB of the function's memory with the batches' objects and deltas.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 8 << 20;

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
    /// Request body bytes in flight at once, [`DEFAULT_MAX_IN_FLIGHT_BYTES`] by default: a
    /// batch waits while those in flight hold this much (one batch always goes). Each batch
    /// holds its body, its objects' JSON and its deltas, so this bounds the sender's memory
    /// whatever the users' sizes, where `max_in_flight` alone would let big rows (up to
    /// 4 MB a request) take gigabytes.
    pub max_in_flight_bytes: usize,
    /// This sender's rate budget.
    pub rate: RateBudget,
    /// How many senders share the workspace limit right now, this one included
    /// ([`crate::send::workspace_share`]); the budget is divided by it. `None`: alone.
    pub peers: Option<watch::Receiver<u32>>,
    /// This sender's membership among the workspace's senders, told when requests are ready
    /// (the first waits for the join) and when there is nothing to send
    /// ([`crate::send::workspace_share::WorkspaceShare::while_sending`]). `None`: alone.
    pub activity: Option<Activity>,
    /// When and how to retry.
    pub retry: RetryPolicy,
    /// The workspace's hourly request budget (`BRAZE_HOURLY_REQUEST_LIMIT`): every request
    /// spends a token of it; when the hour's budget is spent the run stops
    /// ([`StopReason::HourlyBudget`]). `None`: no hourly budget.
    pub hourly_budget: Option<HourlyBudget>,
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
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            rate: RateBudget::default(),
            peers: None,
            activity: None,
            retry: RetryPolicy::default(),
            hourly_budget: None,
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
    let max_in_flight = InFlightCap {
        requests: cfg.max_in_flight.max(1),
        bytes: cfg.max_in_flight_bytes.max(1),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Shared {
        api,
        limiter: RateLimiter::shared(cfg.rate, cfg.peers.clone()),
        policy: cfg.retry.clone(),
        rng: Mutex::new(StdRng::seed_from_u64(cfg.seed)),
        deadline: cfg.deadline,
        grace: cfg.in_flight_grace,
        stop: stop_rx,
        budget: cfg.hourly_budget.clone().map(Spender::new),
    };
    info!(
        target_host = %api.describe(),
        max_objects = limits.max_objects,
        max_in_flight = max_in_flight.requests,
        max_in_flight_bytes = max_in_flight.bytes,
        planned_requests_per_s = shared.limiter.per_second(),
        workspace_senders = cfg.peers.as_ref().map_or(1, |p| *p.borrow()),
        "Starting delivery to Braze."
    );
    let mut run = Run::new(outcomes, &cfg.rate);
    let mut p = Pipeline::new(limits, cfg.probe_first);

    loop {
        if run.stopping.is_none() {
            if let Some(activity) = &cfg.activity {
                if !p.ready.is_empty() {
                    activity.sending().await;
                } else if p.is_idle() {
                    activity.idle();
                }
            }
            p.start_ready(&shared, max_in_flight, &mut run);
        }
        if let Some(reason) = run.stopping
            && !p.drained_on_stop
        {
            let _ = stop_tx.send(true);
            p.drain_on_stop(reason, &mut rx, &mut run).await;
        }
        if p.is_finished() {
            break;
        }

        let can_read = p.input_open && p.ready.is_empty() && run.stopping.is_none();
        let linger_at = p.open_since.map(|t| t + cfg.linger);
        tokio::select! {
            biased;
            Some(done) = p.in_flight.next(), if !p.in_flight.is_empty() => {
                p.in_flight_bytes -= done.batch.body_len();
                if p.probing && !matches!(done.result, BatchResult::Fatal { .. }) {
                    p.probing = false;
                }
                run.handle_done(done, &mut p.ready, cfg.stop_after_failed_batches).await;
            }
            received = rx.recv(), if can_read => {
                match received {
                    Some(d) => p.take(d, &mut rx, &mut run, 4 * limits.max_objects).await,
                    None => {
                        p.input_open = false;
                        p.flush_open();
                    }
                }
            }
            _ = tokio::time::sleep_until(linger_at.unwrap_or_else(Instant::now)), if linger_at.is_some() && p.ready.is_empty() && run.stopping.is_none() => {
                p.flush_open();
            }
            _ = tokio::time::sleep_until(cfg.deadline.unwrap_or_else(Instant::now)), if cfg.deadline.is_some() && run.stopping.is_none() => {
                run.stopping = Some(StopReason::Deadline);
            }
        }
    }
    if let Some(budget) = &shared.budget {
        budget.finish().await;
    }
    run.finish(started, &shared.limiter)
}

/// How much may be in flight at once: requests, and their bodies' bytes.
#[derive(Debug, Clone, Copy)]
struct InFlightCap {
    requests: usize,
    bytes: usize,
}

/// The sending loop's queues: deltas fill the open batch, full batches wait in `ready`, then go
/// out and come back in `in_flight`.
struct Pipeline<'a> {
    batcher: Batcher,
    /// When the open batch got its first delta (it goes out `linger` later).
    open_since: Option<Instant>,
    ready: Ready,
    in_flight: InFlight<'a>,
    /// Body bytes of the batches in `in_flight`.
    in_flight_bytes: usize,
    input_open: bool,
    /// The first batch goes alone.
    probing: bool,
    next_id: u64,
    drained_on_stop: bool,
}

impl<'a> Pipeline<'a> {
    fn new(limits: BatchLimits, probe_first: bool) -> Self {
        Pipeline {
            batcher: Batcher::new(limits),
            open_since: None,
            ready: Ready::new(),
            in_flight: FuturesUnordered::new(),
            in_flight_bytes: 0,
            input_open: true,
            probing: probe_first,
            next_id: 0,
            drained_on_stop: false,
        }
    }

    /// Starts ready batches while there is room in flight, by count and by body bytes (one
    /// while probing; one always goes); at the deadline the run stops instead.
    fn start_ready<A: BrazeApi + ?Sized>(
        &mut self,
        shared: &'a Shared<'_, A>,
        cap: InFlightCap,
        run: &mut Run,
    ) {
        let requests = if self.probing { 1 } else { cap.requests };
        while self.in_flight.len() < requests {
            let Some((batch, fresh)) = self.ready.pop_front() else {
                break;
            };
            let bytes = batch.body_len();
            if !self.in_flight.is_empty() && self.in_flight_bytes + bytes > cap.bytes {
                self.ready.push_front((batch, fresh));
                break;
            }
            if shared.past_deadline(Instant::now()) {
                self.ready.push_front((batch, fresh));
                run.stopping = Some(StopReason::Deadline);
                break;
            }
            self.next_id += 1;
            let id = self.next_id;
            self.in_flight_bytes += bytes;
            self.in_flight
                .push(Box::pin(async move { shared.send(batch, id, fresh).await }));
        }
    }

    /// Stopping: nothing new goes out; everything not in flight is unsent.
    async fn drain_on_stop(
        &mut self,
        reason: StopReason,
        rx: &mut mpsc::Receiver<UserDelta>,
        run: &mut Run,
    ) {
        self.drained_on_stop = true;
        info!(reason = ?reason, in_flight = self.in_flight.len(), "Stopping delivery; remaining users are reported unsent.");
        rx.close();
        while let Ok(d) = rx.try_recv() {
            if d.records_only() {
                run.emit(DeliveryOutcome::Recorded(d)).await;
                continue;
            }
            run.stats.deltas_in += 1;
            run.emit(DeliveryOutcome::Unsent(d)).await;
        }
        self.input_open = false;
        let pending = self.batcher.take_pending();
        run.unsent(pending).await;
        self.open_since = None;
        while let Some((b, _)) = self.ready.pop_front() {
            run.unsent(b.into_deltas()).await;
        }
    }

    /// Nothing to send and nothing in flight: waiting for deltas (or done).
    fn is_idle(&self) -> bool {
        self.ready.is_empty() && self.batcher.pending() == 0 && self.in_flight.is_empty()
    }

    fn is_finished(&self) -> bool {
        !self.input_open
            && self.ready.is_empty()
            && self.batcher.pending() == 0
            && self.in_flight.is_empty()
    }

    /// Takes `first` and up to `budget` deltas in all that are already queued, without going
    /// round the loop each time.
    async fn take(
        &mut self,
        first: UserDelta,
        rx: &mut mpsc::Receiver<UserDelta>,
        run: &mut Run,
        mut budget: usize,
    ) {
        let mut next = Some(first);
        while let Some(d) = next.take() {
            if d.records_only() {
                // Nothing to send: only the state records its digest.
                run.emit(DeliveryOutcome::Recorded(d)).await;
            } else {
                self.push(d, run).await;
            }
            budget -= 1;
            if budget > 0 && self.ready.is_empty() {
                next = rx.try_recv().ok();
            }
        }
    }

    /// Adds a delta to the open batch; a delta too large for any request goes to rejects.
    async fn push(&mut self, d: UserDelta, run: &mut Run) {
        run.stats.deltas_in += 1;
        if self.batcher.pending() == 0 {
            self.open_since = Some(Instant::now());
        }
        match self.batcher.push(d) {
            Ok(full) => {
                for b in full {
                    self.ready.push_back((b, true));
                }
                if self.batcher.pending() == 0 {
                    self.open_since = None;
                }
            }
            Err(over) => {
                let reason = format!("{} (Braze refuses requests over 4 MB); not sent", over);
                run.emit(DeliveryOutcome::Rejected {
                    delta: over.delta,
                    reason,
                })
                .await;
            }
        }
    }

    /// The open batch goes out as it is.
    fn flush_open(&mut self) {
        self.open_since = None;
        if let Some(b) = self.batcher.flush() {
            self.ready.push_back((b, true));
        }
    }
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
