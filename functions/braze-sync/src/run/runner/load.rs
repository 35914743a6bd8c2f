//! What a run works from: the export's date (refused when too far ahead, before anything is
//! claimed) and, under the route lock, the route's state: a run whose export another run completed
//! meanwhile stopped, the state loaded, a future watermark forgotten,
//! a killed run's checkpoint segments folded, and a stale export answered as skipped.

use tracing::{info, warn};

use crate::config::route::Route;
use crate::ops::report::RunStatus;
use crate::run::handler::{ExportPlan, RunError, RunOutcome};
use crate::state::confirmed::Snapshot;
use crate::state::ledger::Ledger;
use crate::state::store::{Head, StateStore};

use super::conclude::RunRecord;
use super::sizing::layout_users;
use super::{LockedExport, SyncRunner};

impl SyncRunner {
    /// The export's date, as the route declares it; a date too far ahead is refused before
    /// anything is claimed, so it can never pin the watermark.
    pub(super) async fn date_export(
        &self,
        plan: &ExportPlan,
        route: &Route,
        record: &mut RunRecord,
    ) -> Result<String, RunError> {
        let order = route.export_order();
        let dated = order
            .export_time(&plan.trigger, &plan.trigger_meta)
            .and_then(|t| {
                order
                    .check_skew(&plan.trigger, t, crate::clock::now())
                    .map(|()| t.to_rfc3339())
            });
        match dated {
            Ok(t) => {
                record.report.exported_at = Some(t.clone());
                Ok(t)
            }
            Err(e) => Err(record
                .failed(self.store.as_ref(), e.to_string(), false)
                .await),
        }
    }

    /// Loads the route's state (a bounded run reads only its head), forgets a watermark from
    /// the future, and answers a stale export (older than the one the state reflects) as
    /// skipped, unless it is a forced replay, which is sent in full and noted. A bounded run
    /// folds a killed run's checkpoint segments first.
    pub(super) async fn load_locked(
        &self,
        export: LockedExport<'_>,
        state: &StateStore,
        record: &mut RunRecord,
    ) -> Result<Loaded, RunError> {
        let LockedExport {
            plan,
            route,
            exported_at,
            bounded,
        } = export;
        let store = self.store.as_ref();
        self.not_synced_meanwhile(plan, route).await?;
        let loaded = if bounded {
            state.read_head().await.map(|h| (h, None))
        } else {
            state.load(route).await.map(|(h, snap)| (h, Some(snap)))
        };
        let (mut head, mut snapshot) = match loaded {
            Ok(x) => x,
            Err(e) if e.is_retryable() => return Err(RunError::Retryable(e.to_string())),
            Err(e) => {
                let message = format!("loading state: {e}");
                return Err(record.failed(store, message, false).await);
            }
        };
        // Fan-outs left behind end first: what their pieces had Braze confirm is diffed against.
        self.end_left_fan_outs(route, &mut head, &mut snapshot, record)
            .await?;
        forget_future_watermark(route, &mut head, record);
        if head.is_stale(Some(exported_at)) {
            if !plan.force_full {
                return Ok(Loaded::Stale(self.skip_stale(plan, &head, record).await));
            }
            record.report.forced_older_replay = true;
            record.report.notes.push(format!(
                "forced replay of an export older than the one the state reflects ({}); sent in full, the watermark stays at the newer export",
                watermark_text(&head)
            ));
        }
        if bounded && !head.doc.segments.is_empty() {
            self.fold_segments(plan, route, state, &mut head, record)
                .await?;
        }
        Ok(Loaded::Ready(Box::new((head, snapshot))))
    }

    /// Under the route lock, stops a run whose export another run completed while this one
    /// waited for the route: a fan-out's finalizer completes its export over the running claim
    /// of a redelivered trigger that took over from the crashed delivery that fanned it out.
    /// Running it again would apply the export twice and leave a fan-out no trigger ends. The
    /// run answers the notification as a duplicate, with that run's report.
    async fn not_synced_meanwhile(&self, plan: &ExportPlan, route: &Route) -> Result<(), RunError> {
        if plan.force_full {
            return Ok(());
        }
        let s = &self.settings;
        let ledger = Ledger::for_route(
            self.store.as_ref(),
            &s.state_bucket,
            &s.state_prefix,
            route.name(),
        );
        match ledger.entry(&plan.export_id).await {
            Ok(Some(entry)) if entry.status.is_final() => {
                info!(route = %plan.route, export = %plan.trigger, "Export completed by another run while this one waited for the route; not run again.");
                Err(RunError::CompletedMeanwhile {
                    report: entry.report,
                })
            }
            Ok(_) => Ok(()),
            Err(e) => Err(RunError::Retryable(format!(
                "reading the ledger entry of {}: {e}",
                plan.trigger
            ))),
        }
    }

    /// Folds the checkpoint segments a killed run left into range deltas (no watermark, no
    /// base rewritten), so the bounded diff can load each range alone.
    pub(super) async fn fold_segments(
        &self,
        plan: &ExportPlan,
        route: &Route,
        state: &StateStore,
        head: &mut Head,
        record: &mut RunRecord,
    ) -> Result<(), RunError> {
        let s = &self.settings;
        let dir = match crate::state::spill::SpillDir::create(
            &s.spill_dir,
            &format!("{}-fold", record.run_id),
        ) {
            Ok(d) => d,
            Err(e) => return Err(RunError::Retryable(e.to_string())),
        };
        let users = layout_users(&head.doc, head.doc.users, 0, plan);
        match state
            .commit_ranged(head, route, None, users, dir.path())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_retryable() => Err(RunError::Retryable(e.to_string())),
            Err(e) => {
                let message = format!("folding the state's checkpoints: {e}");
                Err(record.failed(self.store.as_ref(), message, false).await)
            }
        }
    }

    /// Records an export older than the state as `skipped_stale`, without touching the state.
    pub(super) async fn skip_stale(
        &self,
        plan: &ExportPlan,
        head: &Head,
        record: &mut RunRecord,
    ) -> RunOutcome {
        record.report.status = RunStatus::SkippedStale;
        record.report.notes.push(format!(
            "export dated {} is older than the one the state reflects ({}); skipped, never applied over newer data. Replay it on purpose with bridge-force-full=true or --force-full",
            record.report.exported_at.as_deref().unwrap_or("?"),
            watermark_text(head)
        ));
        info!(route = %plan.route, export = %plan.trigger, "Skipping an export older than the state.");
        record.finish(self.store.as_ref()).await;
        record.outcome(
            false,
            serde_json::json!({"status": "skipped_stale", "state_watermark": head.doc.watermark}),
        )
    }
}

fn watermark_text(head: &Head) -> String {
    match &head.doc.watermark {
        Some(w) => format!(
            "{} dated {}",
            w.export_id,
            w.exported_at.as_deref().unwrap_or("?")
        ),
        None => "none".into(),
    }
}

/// A watermark dated beyond the route's `max_future_skew` (written before exports were dated
/// as declared, e.g. from a `..._20991231.csv` name) would skip every genuine export: it is
/// ignored, said so in the report, and replaced by this run's commit.
fn forget_future_watermark(route: &Route, head: &mut Head, record: &mut RunRecord) {
    let order = route.export_order();
    let at = head
        .doc
        .watermark
        .as_ref()
        .and_then(|w| w.exported_at.as_deref())
        .and_then(crate::config::export_order::parse_instant);
    if let Some(at) = at
        && order.too_far_ahead(at, crate::clock::now())
    {
        record.report.notes.push(format!(
            "the state's watermark ({}) lies beyond max_future_skew; it is ignored and replaced by this export's",
            watermark_text(head)
        ));
        warn!(
            route = route.name(),
            "Ignoring a state watermark dated in the future."
        );
        head.doc.watermark = None;
    }
}

/// The state as a run under the lock found it.
pub(super) enum Loaded {
    /// The head and, unless the run is bounded, the whole snapshot.
    Ready(Box<(Head, Option<Snapshot>)>),
    /// The export is older than the one the state reflects: skipped, with this outcome.
    Stale(RunOutcome),
}
