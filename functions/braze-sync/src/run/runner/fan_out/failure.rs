//! Ending a fan-out that cannot finish (a piece failed for good, the state moved, a control
//! object does not parse): a failed report, the ledger entry `failed`, the control objects
//! deleted and, when no head names them, the unmerged forks.

use tracing::warn;

use super::control::{FanOut, FinalDoc};
use crate::ops::report::{FanOutReport, RunReport, RunStatus};
use crate::run::handler::RunError;
use crate::run::runner::SyncRunner;
use crate::state::ledger::{Ledger, LedgerStatus};

impl SyncRunner {
    /// Ends a fan-out that cannot finish (a piece failed for good, the state moved): a failed
    /// report, the ledger entry `failed`, the control objects and unmerged forks deleted. The
    /// caller releases the route lock.
    pub(super) async fn fail_fan_out(&self, fan: &FanOut<'_>, message: &str) -> RunError {
        let (route, control, manifest) = (fan.route, fan.control, fan.manifest);
        let store = self.store.as_ref();
        let s = &self.settings;
        let message = format!("fan-out {} failed: {message}", manifest.run_id);
        warn!(route = route.name(), error = %message, "Fan-out failed; see the report.");
        let mut report = RunReport::new(&manifest.run_id, route.name());
        report.export_id = Some(manifest.export_id.clone());
        report.exported_at = Some(manifest.exported_at.clone());
        report.started_at = manifest.started_at.clone();
        report.finished_at = Some(crate::clock::now().to_rfc3339());
        report.status = RunStatus::Failed;
        report.error = Some(message.clone());
        report.notes = manifest.notes.clone();
        report.fan_out = Some(FanOutReport {
            pieces: manifest.pieces.len(),
            piece_reports: Vec::new(),
        });
        let report_uri = self.report_uri(route.name(), &manifest.run_id);
        if let Err(e) = report.put(store, &report_uri).await {
            warn!(report = %report_uri, error = %e, "Could not write the fan-out's report.");
        }
        report.emit_metrics();
        if let Err(e) = Ledger::for_route(store, &s.state_bucket, &s.state_prefix, route.name())
            .finish_fan_out(
                &manifest.export_id,
                &manifest.run_id,
                LedgerStatus::Failed,
                Some(report_uri.to_string()),
            )
            .await
        {
            warn!(error = %e, "Could not record the failed fan-out in the ledger.");
        }
        let merged = matches!(
            control.get_json::<FinalDoc>("final.json").await,
            Ok(Some(FinalDoc { merged: true, .. }))
        );
        let referenced = self.head_references(route, &manifest.run_id).await;
        control
            .clean(manifest.pieces.len(), !merged && !referenced)
            .await;
        RunError::Permanent {
            message,
            report: Some(report_uri.to_string()),
        }
    }
}
