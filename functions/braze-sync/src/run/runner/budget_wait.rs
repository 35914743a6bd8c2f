//! A run and the workspace's hourly request budget ([`crate::send::hourly_budget`]): an export
//! whose hour has no budget left is not run at all (no lock, no diff) but handed over to the
//! next hour, and every continuation queued while the budget is spent is delayed until then
//! ([`BudgetDelayed`]). A wait is bounded by the clock: at most four delayed hops
//! ([`super::hand_over::MAX_DELAY`]) to the next hour, when the budget is whole again; it
//! keeps the export's count of stalled runs as it was, and a run that then gets budget but
//! confirms nothing counts as stalled as before. Waiting across hours is bounded too: the
//! ledger entry records since when the export waits without having sent a request, and the
//! run that finds it has waited [`MAX_BUDGET_WAIT`] (other runs spent every hour's budget)
//! fails with `stopped: hourly_budget_starved` instead of waiting again; the state keeps what
//! Braze confirmed, and a replay once the limit is raised sends the rest.

use std::sync::Arc;

use serde_json::json;
use tracing::info;

use super::hand_over::{BudgetDelayed, Continuation};
use super::{RunRecord, RunnerSettings, SyncRunner};
use crate::ops::report::RunStatus;
use crate::run::handler::RunError;
use crate::run::handler::RunOutcome;
use crate::send::deliver::StopReason;
use crate::send::hourly_budget::{HourlyBudget, MAX_BUDGET_WAIT, clock_time, starved};
use crate::state::ledger::{HandOverCounts, Ledger};

/// The continuation the runner uses: delayed by the budget when one is configured.
pub(super) fn continuation(
    c: Option<Arc<dyn Continuation>>,
    s: &RunnerSettings,
) -> Option<Arc<dyn Continuation>> {
    match (c, &s.deliver.hourly_budget) {
        (Some(inner), Some(budget)) => Some(Arc::new(BudgetDelayed {
            inner,
            budget: budget.clone(),
        })),
        (c, _) => c,
    }
}

/// The note of a run the budget stopped or held back.
pub(super) fn note(limit: u64, until_ms: Option<i64>, sent: bool) -> String {
    let when = until_ms.map_or_else(|| "the next hour".to_string(), clock_time);
    let what = match sent {
        true => "stopped at the workspace's hourly request budget",
        false => "nothing was sent: the workspace's hourly request budget is spent",
    };
    format!(
        "{what} (BRAZE_HOURLY_REQUEST_LIMIT = {limit} requests); the rest is handed over to continue when the hour's budget renews at {when}"
    )
}

/// The note of a run that hands over: stopped by the hourly budget, or before its deadline.
pub(super) fn hand_over_note(stopped: Option<StopReason>, s: &RunnerSettings) -> String {
    match (stopped, &s.deliver.hourly_budget) {
        (Some(StopReason::HourlyBudget), Some(b)) => note(b.limit(), None, true),
        _ => "stopped before the deadline; the rest is handed to a new invocation once this run's claims are released".into(),
    }
}

/// Why a run without a continuation queue ended unfinished.
pub(super) fn cut_short(stopped: Option<StopReason>) -> String {
    match stopped {
        Some(StopReason::HourlyBudget) => {
            "run cut short by the workspace's hourly request budget".into()
        }
        _ => "run cut short by its deadline".into(),
    }
}

/// The failure of an export that waited [`MAX_BUDGET_WAIT`] for the budget without sending.
fn starved_message(limit: u64, since_ms: i64) -> String {
    format!(
        "the export has waited for the workspace's hourly request budget (BRAZE_HOURLY_REQUEST_LIMIT = {limit} requests) since {} without sending a request, {} hours: other runs spend every hour's budget. Nothing is lost (what Braze confirmed is in the state); raise the limit or send less elsewhere, then replay the export",
        chrono::DateTime::from_timestamp_millis(since_ms)
            .map_or_else(|| since_ms.to_string(), |t| t.to_rfc3339()),
        MAX_BUDGET_WAIT.as_secs() / 3600
    )
}

impl SyncRunner {
    /// When the hour's budget is already spent and the export can be handed over: records
    /// the wait (report, metric) and returns the hand-over outcome, before any claim on the
    /// route; an export that has waited [`MAX_BUDGET_WAIT`] without sending fails instead.
    /// `None`: run as usual.
    pub(super) async fn wait_for_budget(
        &self,
        record: &mut RunRecord,
    ) -> Result<Option<RunOutcome>, RunError> {
        let (Some(budget), Some(_)) = (&self.settings.deliver.hourly_budget, &self.continuation)
        else {
            return Ok(None);
        };
        let now = crate::clock::now_ms();
        let Some(until) = budget.spent_until(now).await else {
            return Ok(None);
        };
        let counts = self.carried_counts(record).await;
        let (stalled, since) = (counts.stalled, counts.budget_wait_since.unwrap_or(now));
        if starved(since, now) {
            return Err(self.starved(record, budget, since).await);
        }
        info!(
            route = %record.report.route,
            limit = budget.limit(),
            resume_at = %clock_time(until),
            waiting_since = %clock_time(since),
            "The workspace's hourly request budget is spent; handing the export over to the next hour."
        );
        record.report.status = RunStatus::Incomplete;
        record.report.stopped = Some(StopReason::HourlyBudget);
        record
            .report
            .notes
            .push(note(budget.limit(), Some(until), false));
        record.finish(self.store.as_ref()).await;
        Ok(Some(record.outcome(
            true,
            json!({"status": "waiting_for_hourly_budget", "resume_at": clock_time(until),
                "stalled": stalled, "budget_wait_since": since}),
        )))
    }

    /// Fails the run of an export starved of budget (report, ledger entry, metric
    /// `hourly_budget_starved`); nothing was claimed, the state is untouched.
    async fn starved(&self, record: &mut RunRecord, budget: &HourlyBudget, since: i64) -> RunError {
        let message = starved_message(budget.limit(), since);
        tracing::warn!(route = %record.report.route, error = %message, "An export starved of hourly budget fails.");
        record.report.stopped = Some(StopReason::HourlyBudgetStarved);
        record.failed(self.store.as_ref(), message, false).await
    }

    /// The counts this run's ledger entry (its claim) carries: stalled runs in a row, since
    /// when the export waits for budget without sending, and its waits for a busy route.
    /// Unreadable: none.
    pub(super) async fn carried_counts(&self, record: &RunRecord) -> HandOverCounts {
        let s = &self.settings;
        let Some(export_id) = record.report.export_id.as_deref() else {
            return HandOverCounts::default();
        };
        Ledger::for_route(
            self.store.as_ref(),
            &s.state_bucket,
            &s.state_prefix,
            &record.report.route,
        )
        .entry(export_id)
        .await
        .ok()
        .flatten()
        .map_or_else(HandOverCounts::default, |e| HandOverCounts {
            stalled: e.stalled,
            budget_wait_since: e.budget_wait_since,
            route_waits: e.route_waits,
        })
    }
}
