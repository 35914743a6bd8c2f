//! A run and the workspace's hourly request budget ([`crate::send::hourly_budget`]): an export
//! whose hour has no budget left is not run at all (no lock, no diff) but handed over to the
//! next hour, and every continuation queued while the budget is spent is delayed until then
//! ([`BudgetDelayed`]). A wait is bounded by the clock: at most four delayed hops
//! ([`super::hand_over::MAX_DELAY`]) to the next hour, when the budget is whole again; it
//! keeps the export's count of stalled runs as it was, and a run that then gets budget but
//! confirms nothing counts as stalled as before.

use std::sync::Arc;

use serde_json::json;
use tracing::info;

use super::hand_over::{BudgetDelayed, Continuation};
use super::{RunRecord, RunnerSettings, SyncRunner};
use crate::ops::report::RunStatus;
use crate::run::handler::RunOutcome;
use crate::send::deliver::StopReason;
use crate::send::hourly_budget::clock_time;

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

impl SyncRunner {
    /// When the hour's budget is already spent and the export can be handed over: records
    /// the wait (report, metric) and returns the hand-over outcome, before any claim on the
    /// route. `None`: run as usual.
    pub(super) async fn wait_for_budget(&self, record: &mut RunRecord) -> Option<RunOutcome> {
        let budget = self.settings.deliver.hourly_budget.as_ref()?;
        self.continuation.as_ref()?;
        let until = budget.spent_until(crate::clock::now_ms()).await?;
        info!(
            route = %record.report.route,
            limit = budget.limit(),
            resume_at = %clock_time(until),
            "The workspace's hourly request budget is spent; handing the export over to the next hour."
        );
        let stalled = self.stalled_before(record).await;
        record.report.status = RunStatus::Incomplete;
        record.report.stopped = Some(StopReason::HourlyBudget);
        record
            .report
            .notes
            .push(note(budget.limit(), Some(until), false));
        record.finish(self.store.as_ref()).await;
        Some(record.outcome(
            true,
            json!({"status": "waiting_for_hourly_budget", "resume_at": clock_time(until), "stalled": stalled}),
        ))
    }
}
