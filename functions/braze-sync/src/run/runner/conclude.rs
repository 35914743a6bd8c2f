//! The end of a run: what the producer, sender and committer did becomes the report, the
//! rejects object, the watermark decision and the outcome the handler maps to Lambda's retry
//! semantics.

use std::collections::BTreeMap;
use std::time::Instant;

use bridge_shared::{ObjectStore, PutCondition, S3Uri};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::committer::Committer;
use super::producer::Produced;
use super::sender::Delivery;
use super::{RunnerSettings, SyncRunner, budget_wait, deadline};
use crate::diff::export::SyncError;
use crate::diff::rejects::rejects_key;
use crate::ops::report::{RunReport, RunStatus};
use crate::run::handler::{ExportPlan, RunError, RunOutcome};
use crate::send::deliver::{DeliverError, StopReason};
use crate::state::ledger::STALLED_LIMIT;
use crate::state::store::Watermark;

/// One run's report and where it goes.
pub(super) struct RunRecord {
    /// Unique id of the run.
    pub run_id: String,
    /// The report being filled.
    pub report: RunReport,
    /// Where it is written.
    pub uri: S3Uri,
    started: Instant,
    /// Whether the report object was written (the ledger may name it only then).
    written: bool,
}

/// Attempts at writing a run report before the run is left unrecorded (and retried).
const REPORT_ATTEMPTS: u32 = 3;

fn run_id(plan: &ExportPlan) -> String {
    format!(
        "{}-{:08x}",
        crate::clock::now().format("%Y%m%dT%H%M%S%.3fZ"),
        xxhash_rust::xxh3::xxh3_64(plan.export_id.as_bytes()) as u32
    )
}

impl RunRecord {
    /// A new run of `plan` under `route`.
    pub fn new(plan: &ExportPlan, route: &str, s: &RunnerSettings) -> Self {
        let run_id = run_id(plan);
        let mut report = RunReport::new(&run_id, route);
        report.export_id = Some(plan.export_id.clone());
        report.sources = plan
            .parts
            .iter()
            .map(|p| S3Uri::new(&plan.trigger.bucket, &p.key).to_string())
            .collect();
        report.started_at = Some(crate::clock::now().to_rfc3339());
        let uri = S3Uri::new(
            &s.state_bucket,
            format!("{}{route}/{run_id}.json", s.reports_prefix),
        );
        Self {
            run_id,
            report,
            uri,
            started: Instant::now(),
            written: false,
        }
    }

    /// Writes the report, emits its metrics and logs the end of the run.
    pub async fn finish(&mut self, store: &dyn ObjectStore) {
        let r = &mut self.report;
        r.duration_s = self.started.elapsed().as_secs_f64();
        r.finished_at = Some(crate::clock::now().to_rfc3339());
        self.written = false;
        for attempt in 1..=REPORT_ATTEMPTS {
            match r.put(store, &self.uri).await {
                Ok(()) => {
                    self.written = true;
                    break;
                }
                Err(e) if e.is_retryable() && attempt < REPORT_ATTEMPTS => {
                    tokio::time::sleep(std::time::Duration::from_millis(200 << attempt)).await;
                }
                Err(e) => {
                    warn!(report = %self.uri, error = %e, "Could not write the run report; the run is not recorded as ended.");
                    break;
                }
            }
        }
        r.emit_metrics();
        info!(report = %self.uri, status = ?r.status, rows_in = r.rows_in,
              users_sent = r.users_sent, rejected = r.rejected, "Run finished.");
    }

    /// Records a failure, writes the report and classifies it.
    pub async fn failed(
        &mut self,
        store: &dyn ObjectStore,
        message: String,
        retryable: bool,
    ) -> RunError {
        self.report.status = RunStatus::Failed;
        self.report.error = Some(message.clone());
        self.finish(store).await;
        if retryable {
            RunError::Retryable(message)
        } else {
            RunError::Permanent {
                message,
                report: self.report_uri(),
            }
        }
    }

    /// The report's address once it is written.
    pub fn report_uri(&self) -> Option<String> {
        self.written.then(|| self.uri.to_string())
    }

    /// Records a refused API key (the report and its `api_key_refused` metric say so) and
    /// classifies it as retryable for the export.
    pub async fn key_refused(&mut self, store: &dyn ObjectStore, message: String) -> RunError {
        let message = format!("API key refused: {message}");
        self.report.status = RunStatus::Failed;
        self.report.api_key_refused = true;
        self.report.error = Some(message.clone());
        self.finish(store).await;
        RunError::KeyRefused {
            message,
            report: self.report_uri(),
        }
    }

    /// The outcome for the handler (the report must be finished).
    pub fn outcome(&self, hand_over: bool, summary: Value) -> RunOutcome {
        RunOutcome {
            status: self.report.status,
            report: self.report_uri(),
            summary,
            hand_over,
            fan_out: None,
            pieces_unqueued: None,
        }
    }
}

/// What the three stages ended with.
pub(super) struct Ended {
    /// The producer's result and rejects.
    pub produced: Produced,
    /// The sender's figures and error.
    pub delivery: Delivery,
}

impl Ended {
    /// Users were left unsent (deadline, stop), so the export is not finished.
    pub fn unsent(&self) -> bool {
        self.delivery.stats.users_unsent > 0
            || matches!(
                self.delivery.stats.stopped,
                Some(StopReason::Deadline | StopReason::HourlyBudget)
            )
            || matches!(&self.produced.result, Err(SyncError::Stopped(_)))
    }

    /// Why the export could not be read, if it could not (a stop is not a read error).
    pub fn read_error(&self) -> Option<&SyncError> {
        match &self.produced.result {
            Err(SyncError::Stopped(_)) | Ok(_) => None,
            Err(e) => Some(e),
        }
    }

    /// The export was fully planned and sent: its watermark may move (Braze refusals do not
    /// hold it back; those users stay unconfirmed and are sent again).
    pub fn watermark(&self, plan: &ExportPlan, exported_at: &str) -> Option<Watermark> {
        (self.delivery.error.is_none() && self.read_error().is_none() && !self.unsent()).then(
            || Watermark {
                export_id: plan.export_id.clone(),
                exported_at: Some(exported_at.to_string()),
            },
        )
    }

    /// Nothing is left to do for this export: fully sent, nothing refused, all persisted.
    pub fn complete(&self, committer: &Committer) -> bool {
        self.delivery.error.is_none()
            && self.read_error().is_none()
            && !self.unsent()
            && self.delivery.stats.braze_rejected == 0
            && self.delivery.stats.users_unconfirmed == 0
            && committer.failure.is_none()
    }

    /// Fills the report's row and delivery figures and writes the rejects object (rows the
    /// producer refused and users Braze refused).
    pub async fn account(
        &mut self,
        record: &mut RunRecord,
        committer: &Committer,
        store: &dyn ObjectStore,
        s: &RunnerSettings,
    ) {
        let report = &mut record.report;
        report.apply_delivery(&self.delivery.stats);
        if let Ok(sm) = &self.produced.result {
            report.rows_in = sm.rows_read;
            report.unchanged = sm.unchanged;
            report.digests_recorded = sm.digests_recorded;
            report.apply_departures(&sm.departures, sm.rows_without_identifier);
            if !sm.ignored_columns.is_empty() {
                report.notes.push(format!(
                    "columns not mapped by the route were ignored: {:?}",
                    sm.ignored_columns
                ));
            }
        }
        let rejects = &mut self.produced.rejects;
        report.rejected = rejects.total();
        rejects.absorb(&committer.braze_rejects);
        if rejects.dropped() > 0 {
            report.notes.push(format!(
                "{} rejects were counted but not written (rejects object size bound)",
                rejects.dropped()
            ));
        }
        if rejects.is_empty() {
            return;
        }
        let uri = S3Uri::new(
            &s.state_bucket,
            rejects_key(&s.rejects_prefix, &report.route, &record.run_id),
        );
        let body = std::mem::take(rejects).into_body();
        match store
            .put(&uri, body, PutCondition::None, BTreeMap::new())
            .await
        {
            Ok(_) => report.rejects_object = Some(uri.to_string()),
            Err(e) => report
                .notes
                .push(format!("could not write the rejects object {uri}: {e}")),
        }
    }

    /// The invocation summary of a run that got through.
    pub fn summary(report: &RunReport, committer: &Committer) -> Value {
        json!({
            "rows_in": report.rows_in, "rejected": report.rejected, "unchanged": report.unchanged,
            "users_sent": report.users_sent, "users_confirmed": report.users_confirmed,
            "braze_rejected": report.braze_rejected, "requests": report.requests,
            "checkpoints": committer.checkpoints,
            "rows_without_identifier": report.rows_without_identifier,
            "departures_sent": report.departures_sent,
            "departures_held": report.departures.iter().filter(|a| a.held > 0).map(|a| json!({
                "audience": a.audience, "count": a.held, "share": a.share, "cap": a.cap,
                "reason": a.held_because})).collect::<Vec<_>>(),
        })
    }
}

impl SyncRunner {
    /// The run's verdict: failed (retryable or not), unfinished (hand over), or done.
    pub(super) async fn conclude(
        &self,
        record: &mut RunRecord,
        ended: Ended,
        committer: &Committer,
        commit_error: Option<String>,
    ) -> Result<RunOutcome, RunError> {
        let store = self.store.as_ref();
        // A failed checkpoint or a lost lock stopped the sender on purpose: that, not the
        // sender's "outcomes closed", is the reason; the retry resumes from the last checkpoint.
        if let Some(e) = &committer.failure {
            record.report.status = RunStatus::Incomplete;
            record.report.error = Some(e.clone());
            record.finish(store).await;
            return Err(RunError::Retryable(e.clone()));
        }
        if let Some(e) = &ended.delivery.error {
            if matches!(e, DeliverError::Unauthorized { .. }) {
                return Err(record.key_refused(store, e.to_string()).await);
            }
            return Err(record.failed(store, e.to_string(), e.is_retryable()).await);
        }
        if let Some(e) = ended.read_error() {
            return Err(record.failed(store, e.to_string(), e.is_retryable()).await);
        }
        if let Some(e) = commit_error {
            record.report.status = RunStatus::Incomplete;
            record.report.error = Some(e.clone());
            record.finish(store).await;
            return Err(RunError::Retryable(e));
        }
        let summary = Ended::summary(&record.report, committer);
        if ended.unsent() {
            record.report.status = RunStatus::Incomplete;
            if self.continuation.is_none() {
                record.finish(store).await;
                let why = budget_wait::cut_short(ended.delivery.stats.stopped);
                return Err(RunError::Retryable(why));
            }
            let stats = &ended.delivery.stats;
            let progressed =
                stats.users_confirmed + stats.users_recorded > 0 || committer.checkpoints > 0;
            let stalled = match progressed {
                true => 0,
                false => self.carried_counts(record).await.stalled + 1,
            };
            if stalled >= STALLED_LIMIT {
                let message = format!(
                    "the export's last {STALLED_LIMIT} runs reached their deadline without Braze confirming a user, so it would hand itself over forever: the function's timeout leaves too little time after the deadline margin ({}–{} s) to send, or Braze refused every request meanwhile. Nothing is lost (what Braze confirmed is in the state); replay the export once the function's Timeout is longer or Braze answers",
                    deadline::MARGIN_FLOOR.as_secs(),
                    deadline::MARGIN_CEILING.as_secs()
                );
                return Err(record.failed(store, message, false).await);
            }
            let note = budget_wait::hand_over_note(stats.stopped, &self.settings);
            record.report.notes.push(note);
            record.finish(store).await;
            let mut summary = summary;
            summary["stalled"] = serde_json::json!(stalled);
            return Ok(record.outcome(true, summary));
        }
        record.report.status = match ended.complete(committer) {
            true if record.report.departures_held > 0 => RunStatus::DeparturesHeld,
            true => RunStatus::Complete,
            false => RunStatus::Incomplete,
        };
        record.finish(store).await;
        Ok(record.outcome(false, summary))
    }
}
