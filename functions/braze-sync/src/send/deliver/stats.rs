//! What a delivery did and why it stopped: [`DeliveryStats`] with its [`RetriesByCause`], the
//! [`StopReason`] of a run that ended early and the [`DeliverError`] that carries both.

use serde::{Deserialize, Serialize};

use crate::send::retry::RetryCause;

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

    pub(super) fn add(&mut self, cause: RetryCause) {
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
    /// The workspace's hourly request budget is spent (or its counter could not be claimed
    /// from); the run hands over until the next hour.
    HourlyBudget,
    /// The export waited for the hourly request budget longer than
    /// [`crate::send::hourly_budget::MAX_BUDGET_WAIT`] without sending a request: the run
    /// failed instead of waiting again.
    HourlyBudgetStarved,
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
