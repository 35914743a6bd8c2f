//! The hand-over: an export whose run stopped before its deadline with users left is handed to
//! a later invocation through a [`Continuation`]. The handler calls it only after the run's
//! route lock and export claim are released, so the continuation never meets its own lock.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::info;

use crate::ops::report::RunReport;
use crate::run::handler::ExportPlan;
use crate::send::deliver::{DeliveryStats, RetriesByCause};
use crate::send::hourly_budget::HourlyBudget;

/// Hands the rest of an unfinished export to a later invocation.
#[async_trait]
pub trait Continuation: Send + Sync {
    /// Queues a new trigger for the export.
    async fn hand_over(&self, plan: &ExportPlan) -> Result<(), String>;

    /// Queues one piece of an export split across invocations (also a piece's own hand-over
    /// before its deadline, and the finalizer's retry).
    async fn queue_piece(&self, piece: &PieceMessage) -> Result<(), String> {
        Err(format!(
            "this continuation cannot queue fan-out pieces (piece {} of {})",
            piece.piece, piece.run_id
        ))
    }

    /// [`Continuation::hand_over`], delivered no sooner than `delay` from now (at most
    /// [`MAX_DELAY`]). A continuation that cannot delay queues at once.
    async fn hand_over_after(&self, plan: &ExportPlan, delay: Duration) -> Result<(), String> {
        let _ = delay;
        self.hand_over(plan).await
    }

    /// [`Continuation::queue_piece`], delivered no sooner than `delay` from now.
    async fn queue_piece_after(&self, piece: &PieceMessage, delay: Duration) -> Result<(), String> {
        let _ = delay;
        self.queue_piece(piece).await
    }
}

/// The longest a queued continuation can be delayed (SQS's `DelaySeconds` limit): a wait for
/// the next hour's budget takes up to four hops.
pub const MAX_DELAY: Duration = Duration::from_secs(900);

/// A fan-out piece's delay stays well inside the fan-out's route lease
/// ([`super::fan_out::FAN_OUT_LEASE_S`]), which its pieces renew when they run.
pub const MAX_PIECE_DELAY: Duration = Duration::from_secs(600);

/// A [`Continuation`] that delays what it queues while the workspace's hourly request budget
/// is spent, until the next hour opens (at most [`MAX_DELAY`], [`MAX_PIECE_DELAY`] for a
/// piece): the next invocation then finds a fresh budget, or waits again without running.
pub struct BudgetDelayed {
    /// The queue.
    pub inner: Arc<dyn Continuation>,
    /// The workspace's hourly counters.
    pub budget: HourlyBudget,
}

impl BudgetDelayed {
    /// How long to hold a continuation back now (zero while the hour has budget left).
    async fn delay(&self, cap: Duration) -> Duration {
        let now = crate::clock::now_ms();
        match self.budget.spent_until(now).await {
            Some(until) => {
                let wait = Duration::from_millis(u64::try_from(until - now).unwrap_or(0));
                info!(
                    delay_s = wait.min(cap).as_secs(),
                    resume_at = %crate::send::hourly_budget::clock_time(until),
                    "The hourly request budget is spent; the continuation is delayed."
                );
                wait.min(cap)
            }
            None => Duration::ZERO,
        }
    }
}

#[async_trait]
impl Continuation for BudgetDelayed {
    async fn hand_over(&self, plan: &ExportPlan) -> Result<(), String> {
        let delay = self.delay(MAX_DELAY).await;
        self.inner.hand_over_after(plan, delay).await
    }

    async fn queue_piece(&self, piece: &PieceMessage) -> Result<(), String> {
        let delay = self.delay(MAX_PIECE_DELAY).await;
        self.inner.queue_piece_after(piece, delay).await
    }

    async fn hand_over_after(&self, plan: &ExportPlan, delay: Duration) -> Result<(), String> {
        let delay = delay.max(self.delay(MAX_DELAY).await);
        self.inner.hand_over_after(plan, delay).await
    }

    async fn queue_piece_after(&self, piece: &PieceMessage, delay: Duration) -> Result<(), String> {
        let delay = delay.max(self.delay(MAX_PIECE_DELAY).await);
        self.inner.queue_piece_after(piece, delay).await
    }
}

/// One piece of a fan-out, as queued on the function's own queue:
/// `{"bridge_fan_out": {"route": ..., "run_id": ..., "piece": ...}}`
/// ([`crate::run::handler::FAN_OUT_KEY`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceMessage {
    /// The route.
    pub route: String,
    /// The fan-out run (the coordinator's run id).
    pub run_id: String,
    /// The piece number (0-based).
    pub piece: usize,
    /// What this piece's earlier invocations, handed over before their deadline, sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried: Option<Carried>,
    /// The attempt that handed the piece over with this message (its last act): its claim on
    /// the piece is this message's to take over, alive or not
    /// ([`crate::state::piece_attempt::PieceAttempt::claim_from`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed_by: Option<String>,
}

/// What a piece's earlier invocations sent: the users Braze confirmed are in the piece's
/// fork, so the invocation that finishes the piece finds them unchanged; these figures are
/// added back to its report, so the combined report counts them as a single run does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Carried {
    /// Users sent and confirmed.
    pub users_confirmed: u64,
    /// Attribute values sent.
    pub attributes_sent: u64,
    /// Requests made.
    pub requests: u64,
    /// Responses that were 429.
    pub http_429: u64,
    /// Retries by cause.
    pub retries_by_cause: RetriesByCause,
    /// Invocations in a row that handed over without Braze confirming a user.
    pub stalled: u32,
}

impl Carried {
    /// Adds one invocation's delivery figures.
    pub fn add(&mut self, d: &DeliveryStats) {
        self.users_confirmed += d.users_confirmed;
        self.attributes_sent += d.attributes_sent;
        self.requests += d.requests;
        self.http_429 += d.http_429;
        self.retries_by_cause.merge(&d.retries_by_cause);
    }

    /// Adds the carried figures to the report of the invocation that finished the piece.
    pub fn apply(&self, r: &mut RunReport) {
        r.users_sent += self.users_confirmed;
        r.users_confirmed += self.users_confirmed;
        r.unchanged = r.unchanged.saturating_sub(self.users_confirmed);
        r.attributes_sent += self.attributes_sent;
        r.requests += self.requests;
        r.http_429 += self.http_429;
        r.retries_by_cause.merge(&self.retries_by_cause);
    }
}

impl PieceMessage {
    /// The message body.
    pub fn body(&self) -> String {
        json!({ crate::run::handler::FAN_OUT_KEY: self }).to_string()
    }
}

/// [`Continuation`] through the function's own SQS queue: an S3-notification-shaped message for
/// the export's trigger object, which the next invocation resumes from the last checkpoint.
pub struct SqsContinuation {
    /// SQS client built once.
    pub client: aws_sdk_sqs::Client,
    /// The function's input queue.
    pub queue_url: String,
}

#[async_trait]
impl Continuation for SqsContinuation {
    async fn hand_over(&self, plan: &ExportPlan) -> Result<(), String> {
        self.hand_over_after(plan, Duration::ZERO).await
    }

    async fn queue_piece(&self, piece: &PieceMessage) -> Result<(), String> {
        self.send(piece.body(), Duration::ZERO).await
    }

    async fn hand_over_after(&self, plan: &ExportPlan, delay: Duration) -> Result<(), String> {
        let key = bridge_shared::s3_uri::encode_key(&plan.trigger.key);
        let body = json!({"Records": [{
            "eventSource": "aws:s3", "eventName": "ObjectCreated:Continuation",
            "s3": {"bucket": {"name": plan.trigger.bucket}, "object": {"key": key}}}]});
        self.send(body.to_string(), delay).await
    }

    async fn queue_piece_after(&self, piece: &PieceMessage, delay: Duration) -> Result<(), String> {
        self.send(piece.body(), delay).await
    }
}

impl SqsContinuation {
    /// Sends one message to the function's own queue, delivered after `delay` (whole seconds,
    /// at most [`MAX_DELAY`]).
    async fn send(&self, body: String, delay: Duration) -> Result<(), String> {
        let delay_s = delay.min(MAX_DELAY).as_secs_f64().ceil() as i32;
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .set_delay_seconds((delay_s > 0).then_some(delay_s))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| aws_sdk_sqs::error::DisplayErrorContext(e).to_string())
    }
}
