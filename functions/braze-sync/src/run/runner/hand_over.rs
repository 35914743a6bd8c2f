//! The hand-over: an export whose run stopped before its deadline with users left is handed to
//! a later invocation through a [`Continuation`]. The handler calls it only after the run's
//! route lock and export claim are released, so the continuation never meets its own lock.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::ops::report::RunReport;
use crate::run::handler::ExportPlan;
use crate::send::deliver::{DeliveryStats, RetriesByCause};

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
        let key = bridge_shared::s3_uri::encode_key(&plan.trigger.key);
        let body = json!({"Records": [{
            "eventSource": "aws:s3", "eventName": "ObjectCreated:Continuation",
            "s3": {"bucket": {"name": plan.trigger.bucket}, "object": {"key": key}}}]});
        self.send(body.to_string()).await
    }

    async fn queue_piece(&self, piece: &PieceMessage) -> Result<(), String> {
        self.send(piece.body()).await
    }
}

impl SqsContinuation {
    /// Sends one message to the function's own queue.
    async fn send(&self, body: String) -> Result<(), String> {
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| aws_sdk_sqs::error::DisplayErrorContext(e).to_string())
    }
}
