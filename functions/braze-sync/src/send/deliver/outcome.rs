//! What the sending loop owes for each delta: the outcome of every finished batch (confirmed,
//! rejected with Braze's reason, unconfirmed or unsent), the batches a 413 or a whole-request
//! 400 sends again, the counts in [`DeliveryStats`] and, when the run stops, why.

use std::collections::VecDeque;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::attempt::{BatchDone, BatchResult};
use super::{DeliverError, DeliveryStats, StopReason, configured_rps};
use crate::model::{DeliveryOutcome, UserDelta};
use crate::send::braze::ItemError;
use crate::send::rate_limit::{RateBudget, RateLimiter};
use crate::send::request_body::Batch;

/// Batches ready to go: `(batch, fresh)`; split halves are not fresh (already counted sent).
pub(super) type Ready = VecDeque<(Batch, bool)>;

/// The sending loop's bookkeeping.
pub(super) struct Run {
    pub(super) stats: DeliveryStats,
    outcomes: mpsc::Sender<DeliveryOutcome>,
    outcomes_closed: bool,
    pub(super) stopping: Option<StopReason>,
    fatal: Option<(u16, String)>,
    unavailable: Option<String>,
    failed_in_a_row: u32,
}

impl Run {
    pub(super) fn new(outcomes: mpsc::Sender<DeliveryOutcome>, rate: &RateBudget) -> Self {
        Run {
            stats: DeliveryStats {
                rate_limit_configured_rps: configured_rps(rate),
                ..DeliveryStats::default()
            },
            outcomes,
            outcomes_closed: false,
            stopping: None,
            fatal: None,
            unavailable: None,
            failed_in_a_row: 0,
        }
    }

    pub(super) async fn emit(&mut self, outcome: DeliveryOutcome) {
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

    pub(super) async fn unsent(&mut self, deltas: impl IntoIterator<Item = UserDelta>) {
        for d in deltas {
            self.emit(DeliveryOutcome::Unsent(d)).await;
        }
    }

    /// The run's statistics and its end: `Ok` unless the key was refused, the outcomes
    /// receiver was dropped or Braze was unavailable.
    pub(super) fn finish(
        mut self,
        started: Instant,
        limiter: &RateLimiter,
    ) -> Result<DeliveryStats, DeliverError> {
        let elapsed = started.elapsed().as_secs_f64();
        self.stats.duration_s = elapsed;
        self.stats.requests_per_s = if elapsed > 0.0 {
            self.stats.requests as f64 / elapsed
        } else {
            0.0
        };
        self.stats.stopped = self.stopping;
        self.stats.workspace_senders = limiter.most_peers();
        let stats = self.stats.clone();
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
        if let Some((status, message)) = self.fatal {
            return Err(DeliverError::Unauthorized {
                status,
                message,
                stats: Box::new(stats),
            });
        }
        if self.outcomes_closed {
            return Err(DeliverError::OutcomesClosed {
                stats: Box::new(stats),
            });
        }
        if let Some(message) = self.unavailable {
            return Err(DeliverError::BrazeUnavailable {
                message,
                stats: Box::new(stats),
            });
        }
        Ok(stats)
    }

    /// Accounts for a finished batch and reports its deltas.
    pub(super) async fn handle_done(
        &mut self,
        done: BatchDone,
        ready: &mut Ready,
        stop_after_failed_batches: u32,
    ) {
        self.count_requests(&done);
        let gave_up = matches!(done.result, BatchResult::Unsent { gave_up: true, .. });
        if gave_up {
            self.stats.batches_given_up += 1;
            self.failed_in_a_row += 1;
        } else if done.requests > 0 {
            self.failed_in_a_row = 0;
        }
        let BatchDone {
            batch, id, result, ..
        } = done;
        match result {
            BatchResult::Accepted(errors) => self.accepted(batch, id, &errors).await,
            BatchResult::Unconfirmed { reason } => {
                self.stats.unconfirmed_requests += 1;
                warn!(batch = id, objects = batch.len(), reason = %reason, "Braze's answer confirms nothing; the batch's users stay unconfirmed.");
                for delta in batch.into_deltas() {
                    self.unconfirmed(delta).await;
                }
            }
            BatchResult::Rejected { status: 400, .. }
                if batch.len() > 1 && self.stopping.is_some() =>
            {
                self.unsent(batch.into_deltas()).await;
            }
            BatchResult::Rejected {
                status: 400,
                message,
                errors,
            } if batch.len() > 1 => {
                self.narrow_down_400(batch, id, &message, &errors, ready)
                    .await
            }
            BatchResult::Rejected {
                status,
                message,
                errors,
            } => {
                warn!(batch = id, status, braze_message = %message, "Braze refused a batch; its users go to rejects.");
                let mut unmapped = 0;
                let (own, _) = reasons_by_index(&batch, &errors, &mut unmapped);
                for (delta, own) in batch.into_deltas().into_iter().zip(own) {
                    let reason = match own {
                        Some(o) => format!(
                            "Braze refused the request (HTTP {status}: {message}); this object: {o}"
                        ),
                        None => format!("Braze refused the request (HTTP {status}: {message})"),
                    };
                    self.emit(DeliveryOutcome::Rejected { delta, reason }).await;
                }
            }
            BatchResult::TooLarge => self.too_large(batch, id, ready).await,
            BatchResult::Fatal { status, message } => {
                error!(status, reason = %message, "Braze refused the API key; stopping the run.");
                if self.fatal.is_none() {
                    self.fatal = Some((status, message));
                }
                self.stopping = Some(StopReason::Unauthorized);
                self.unsent(batch.into_deltas()).await;
            }
            BatchResult::OverBudget { reason } => {
                if self.stopping.is_none() {
                    info!(batch = id, reason = %reason, "Stopping the run at the hourly request budget.");
                    self.stopping = Some(StopReason::HourlyBudget);
                }
                self.unsent(batch.into_deltas()).await;
            }
            BatchResult::Unsent { reason, .. } => {
                if gave_up
                    && stop_after_failed_batches > 0
                    && self.failed_in_a_row >= stop_after_failed_batches
                    && self.stopping.is_none()
                {
                    error!(failed_batches = self.failed_in_a_row, last_error = %reason, "Braze keeps failing; stopping the run.");
                    self.unavailable = Some(reason);
                    self.stopping = Some(StopReason::BrazeUnavailable);
                }
                self.unsent(batch.into_deltas()).await;
            }
        }
    }

    /// Counts a finished batch's requests, bytes and retries.
    fn count_requests(&mut self, done: &BatchDone) {
        let stats = &mut self.stats;
        stats.requests += done.requests;
        stats.bytes_sent += done.bytes;
        stats.http_429 += done.http_429;
        stats.retries_by_cause.merge(&done.retries);
        if done.requests > 0 {
            stats.max_objects_per_request =
                stats.max_objects_per_request.max(done.batch.len() as u64);
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
    }

    /// A 2xx: confirms every object `errors[]` does not name, unless an entry names no object
    /// of the request (then none is confirmed).
    async fn accepted(&mut self, batch: Batch, id: u64, errors: &[ItemError]) {
        let mut unmapped_any = 0;
        let (reasons, unmapped) = reasons_by_index(&batch, errors, &mut unmapped_any);
        self.stats.unmapped_errors += unmapped_any;
        if !errors.is_empty() {
            self.stats.partial_failures += 1;
            warn!(
                batch = id,
                objects = batch.len(),
                refused = reasons.iter().filter(|r| r.is_some()).count(),
                unmapped,
                "Braze accepted a batch but refused some of its objects."
            );
        }
        if unmapped > 0 {
            // An error we cannot attribute could be about any object: confirm none.
            self.stats.unconfirmed_requests += 1;
            warn!(
                batch = id,
                unmapped,
                "Braze listed errors[] entries that name no object of the request; none of its users is confirmed."
            );
        }
        for (delta, reason) in batch.into_deltas().into_iter().zip(reasons) {
            match reason {
                Some(reason) => self.emit(DeliveryOutcome::Rejected { delta, reason }).await,
                None if unmapped > 0 => self.unconfirmed(delta).await,
                None => self.emit(DeliveryOutcome::Confirmed(delta)).await,
            }
        }
    }

    /// A whole-request 400 applied nothing: the objects it names go to rejects and the rest is
    /// sent again; when it names none, the batch is bisected.
    async fn narrow_down_400(
        &mut self,
        batch: Batch,
        id: u64,
        message: &str,
        errors: &[ItemError],
        ready: &mut Ready,
    ) {
        let mut unmapped = 0;
        let (own, _) = reasons_by_index(&batch, errors, &mut unmapped);
        self.stats.retries_by_cause.bisect_400 += 1;
        if own.iter().any(Option::is_some) {
            let out: Vec<bool> = own.iter().map(Option::is_some).collect();
            let (rest, taken) = batch.take_out(&out);
            warn!(batch = id, status = 400, braze_message = %message, refused = taken.len(),
                  "Braze refused a request naming some of its objects; those go to rejects, the rest is sent again.");
            for (delta, o) in taken.into_iter().zip(own.into_iter().flatten()) {
                let reason =
                    format!("Braze refused the request (HTTP 400: {message}); this object: {o}");
                self.emit(DeliveryOutcome::Rejected { delta, reason }).await;
            }
            if let Some(rest) = rest {
                ready.push_front((rest, false));
            }
        } else if let Some((a, b)) = batch.split() {
            debug!(batch = id, objects = a.len() + b.len(), braze_message = %message,
                   "Braze refused a whole request without naming an object; bisecting it.");
            ready.push_front((b, false));
            ready.push_front((a, false));
        }
    }

    /// A 413: the batch is split in two and sent again; an object alone goes to rejects.
    async fn too_large(&mut self, batch: Batch, id: u64, ready: &mut Ready) {
        if self.stopping.is_some() {
            self.unsent(batch.into_deltas()).await;
            return;
        }
        let len = batch.len();
        if len < 2 {
            for delta in batch.into_deltas() {
                self.emit(DeliveryOutcome::Rejected {
                    delta,
                    reason: "Braze refused this attribute object alone as too large (HTTP 413)"
                        .to_string(),
                })
                .await;
            }
            return;
        }
        if let Some((a, b)) = batch.split() {
            debug!(
                batch = id,
                objects = len,
                "Braze answered 413; splitting the batch."
            );
            self.stats.retries_by_cause.split_413 += 1;
            ready.push_front((b, false));
            ready.push_front((a, false));
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
