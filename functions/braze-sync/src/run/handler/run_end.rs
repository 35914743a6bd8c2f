//! How a run ended, as the runner reports it, classified at the edge: the ledger status and
//! report to record, and the invocation's answer (acknowledged, or retried).

use serde_json::json;
use tracing::warn;

use super::{ExportPlan, ObjectOutcome, RunError, RunOutcome};
use crate::state::ledger::{HandOverCounts, LedgerStatus};

/// How a run ended, as the ledger records it and the invocation answers it.
pub(super) struct RunEnd {
    /// The export's ledger status.
    pub(super) status: LedgerStatus,
    /// The run report's address, if one was written.
    pub(super) report: Option<String>,
    /// The answer for this object.
    pub(super) outcome: ObjectOutcome,
    /// The run stopped early with users left: queue the rest once the claim is released.
    pub(super) hand_over: bool,
    /// How long the hand-over is held back (a run that found its route busy).
    pub(super) delay: std::time::Duration,
    /// Runs in a row without progress, and since when the export waits for the hourly
    /// budget (recorded with the claim).
    pub(super) counts: HandOverCounts,
    /// The fan-out run that now owns the export, if the run split it.
    pub(super) fan_out: Option<String>,
    /// Pieces of that fan-out for the retry to queue again (not all could be queued), else 0.
    pub(super) requeue: u32,
    /// Another run recorded the export's ending (it completed it meanwhile): this run's
    /// claim was written over, and nothing is recorded.
    pub(super) recorded_elsewhere: bool,
}

impl RunEnd {
    /// Classifies the runner's result. A run whose report could not be written is not
    /// acknowledged: nothing would record how it ended, and its retry finds the state it
    /// committed.
    pub(super) fn of(plan: &ExportPlan, result: Result<RunOutcome, RunError>) -> RunEnd {
        let uri = &plan.trigger;
        let result = match result {
            Ok(o) if o.report.is_none() => Err(RunError::Retryable(
                "the run's report could not be written".into(),
            )),
            Err(RunError::Permanent {
                message,
                report: None,
            }) => Err(RunError::Retryable(format!(
                "{message} (and its report could not be written)"
            ))),
            other => other,
        };
        let failed = |status, report, outcome| RunEnd {
            status,
            report,
            outcome,
            hand_over: false,
            delay: std::time::Duration::ZERO,
            counts: HandOverCounts::default(),
            fan_out: None,
            requeue: 0,
            recorded_elsewhere: false,
        };
        match result {
            Ok(o) => {
                let (status, word) = o.ledger_status();
                let requeue = match &o.pieces_unqueued {
                    Some(_) => o.summary["fan_out"]["pieces"].as_u64().unwrap_or(0) as u32,
                    None => 0,
                };
                let outcome = match &o.pieces_unqueued {
                    Some(reason) => {
                        warn!(object = %uri, error = %reason, "Not every fan-out piece could be queued; the retry queues them again.");
                        ObjectOutcome::Retry(format!(
                            "could not queue the fan-out's pieces: {reason}"
                        ))
                    }
                    None => ObjectOutcome::Done(json!({
                        "object": uri.to_string(), "route": plan.route,
                        "outcome": word, "report": o.report, "summary": o.summary})),
                };
                RunEnd {
                    status,
                    report: o.report.clone(),
                    outcome,
                    hand_over: o.hand_over,
                    delay: std::time::Duration::from_secs(
                        o.summary["hand_over_delay_s"].as_u64().unwrap_or(0),
                    ),
                    counts: HandOverCounts {
                        stalled: o.summary["stalled"].as_u64().unwrap_or(0) as u32,
                        budget_wait_since: o.summary["budget_wait_since"].as_i64(),
                        route_waits: o.summary["route_waits"].as_u64().unwrap_or(0) as u32,
                    },
                    fan_out: o.fan_out,
                    requeue,
                    recorded_elsewhere: false,
                }
            }
            Err(RunError::Retryable(reason)) => {
                warn!(object = %uri, error = %reason, "Export sync failed; it will be retried.");
                failed(LedgerStatus::Incomplete, None, ObjectOutcome::Retry(reason))
            }
            Err(RunError::CompletedMeanwhile { report }) => RunEnd {
                recorded_elsewhere: true,
                ..failed(
                    LedgerStatus::Complete,
                    report.clone(),
                    ObjectOutcome::Done(json!({
                        "object": uri.to_string(), "route": plan.route,
                        "outcome": "duplicate_no_op", "report": report})),
                )
            },
            Err(RunError::KeyRefused { message, report }) => {
                warn!(object = %uri, error = %message, "Braze refused the API key; the export stays retryable.");
                failed(
                    LedgerStatus::FailedRetryable,
                    report,
                    ObjectOutcome::Retry(message),
                )
            }
            Err(RunError::Permanent { message, report }) => {
                warn!(object = %uri, error = %message, "Export sync failed permanently; see the report.");
                failed(
                    LedgerStatus::Failed,
                    report.clone(),
                    ObjectOutcome::Done(json!({
                        "object": uri.to_string(), "route": plan.route,
                        "outcome": "failed", "error": message, "report": report})),
                )
            }
        }
    }
}
