//! The coordinator: the triggered run that splits an export into pieces. It lays the state
//! out, writes the manifest, forks the state once per piece and, once its run is over and its
//! route lock is shared, queues one message per piece.

use bytes::Bytes;
use serde_json::json;
use tracing::{info, warn};

use super::control::{Control, Manifest};
use super::{even_pieces, forced_setting, pieces_for, pieces_measured, spans};
use crate::config::route::Route;
use crate::diff::export::{SpillOverflow, size_text};
use crate::ops::report::{FanOutReport, RunStatus};
use crate::run::handler::{ExportPlan, RunError, RunOutcome};
use crate::run::runner::conclude::RunRecord;
use crate::run::runner::hand_over::PieceMessage;
use crate::run::runner::{EST_ROW_BYTES, SyncRunner, export_text_bytes};
use crate::state::store::{CONTROL_FOLDER, Head, StateStore};
use bridge_shared::PutCondition;

/// What a coordinator splits: the export, its route and date, and the pieces it asks for
/// (rounded up to even spans unless the operator set the count).
pub(in crate::run::runner) struct Split<'a> {
    /// The export.
    pub plan: &'a ExportPlan,
    /// Its route.
    pub route: &'a Route,
    /// The export's date (RFC 3339), for the watermark.
    pub exported_at: &'a str,
    /// Pieces asked for.
    pub pieces: usize,
}

impl SyncRunner {
    /// Whether this bounded run fans out, and into how many pieces: only with a
    /// continuation queue (the CLI has none: a spill that cannot fit fails fast instead).
    pub(in crate::run::runner) fn fan_out_pieces(&self, plan: &ExportPlan) -> Option<usize> {
        self.continuation.as_ref()?;
        let bytes = export_text_bytes(plan);
        pieces_for(
            bytes,
            self.settings.spill_limit_bytes,
            self.settings.fan_out_pieces,
        )
    }

    /// A bounded run whose partition step overflowed the spill limit, with a continuation
    /// queue: fans the export out into [`pieces_measured`] pieces instead of failing
    /// (nothing was sent: sending starts only after the export is fully partitioned). The
    /// report and the log say why.
    pub(in crate::run::runner) async fn fan_out_on_overflow(
        &self,
        plan: &ExportPlan,
        route: &Route,
        exported_at: &str,
        record: &mut RunRecord,
        o: &SpillOverflow,
    ) -> Result<RunOutcome, RunError> {
        let store = self.store.as_ref();
        let limit = o.limit_bytes.max(1);
        let pieces = pieces_measured(o, o.parts_bytes, limit);
        let projected = o.projected_spill(o.parts_bytes);
        let why = format!(
            "the estimate from the parts' sizes said one invocation's spill fits, but the partition step passed the {} limit after {} rows ({} of parts read, {:.0} spill bytes per row, {:.4} rows per part byte): about {} for the whole export ({} of parts), so it fans out into {pieces} pieces instead (nothing had been sent)",
            size_text(limit),
            o.rows_read,
            size_text(o.source_bytes_read),
            o.bytes_per_row(),
            o.rows_per_part_byte(),
            size_text(projected),
            size_text(o.parts_bytes),
        );
        warn!(
            route = route.name(),
            pieces,
            limit_bytes = limit,
            projected_bytes = projected,
            "Spill estimate too low: fanning out from measured figures."
        );
        record.report.notes.push(why);
        let state = self.state(route);
        let head = match state.read_head().await {
            Ok(h) => h,
            Err(e) if e.is_retryable() => return Err(RunError::Retryable(e.to_string())),
            Err(e) => {
                let message = format!("loading state: {e}");
                return Err(record.failed(store, message, false).await);
            }
        };
        let split = Split {
            plan,
            route,
            exported_at,
            pieces,
        };
        self.fan_out(split, &state, head, record).await
    }

    /// The coordinator: lays the state out, writes the manifest, forks the state per piece.
    /// The pieces are queued by [`SyncRunner::queue_pieces`] once the run's lock is shared.
    pub(in crate::run::runner) async fn fan_out(
        &self,
        split: Split<'_>,
        state: &StateStore,
        mut head: Head,
        record: &mut RunRecord,
    ) -> Result<RunOutcome, RunError> {
        let Split {
            plan,
            route,
            exported_at,
            pieces,
        } = split;
        let store = self.store.as_ref();
        let bytes = export_text_bytes(plan);
        let expected = head.doc.users.saturating_add(bytes / EST_ROW_BYTES);
        if let Err(e) = state
            .ensure_layout(&mut head, route, expected, pieces)
            .await
        {
            let retryable = e.is_retryable();
            let message = format!("laying the state out for a fan-out into {pieces} pieces: {e}");
            return Err(record.failed(store, message, retryable).await);
        }
        let ranges = head.doc.ranges.len();
        // A count from an estimate or a measure (not the operator's setting) is rounded up
        // so no span holds more than 1/pieces of the ranges.
        let pieces = match forced_setting(self.settings.fan_out_pieces) {
            true => pieces,
            false => even_pieces(ranges, pieces),
        };
        let spans = spans(ranges, pieces);
        let run_id = record.run_id.clone();
        let manifest = Manifest {
            run_id: run_id.clone(),
            route: route.name().to_string(),
            export_id: plan.export_id.clone(),
            bucket: plan.trigger.bucket.clone(),
            trigger_key: plan.trigger.key.clone(),
            trigger_meta: plan.trigger_meta.clone(),
            parts: plan.parts.clone(),
            exported_at: exported_at.to_string(),
            force_full: plan.force_full,
            allow_departures: plan.allow_departures,
            forced_salt: plan.forced_salt,
            pieces: spans.iter().map(|r| [r.start, r.end]).collect(),
            route_head_etag: head.etag.clone(),
            started_at: record.report.started_at.clone(),
            notes: record.report.notes.clone(),
        };
        let control = self.control(route.name(), &run_id);
        let body = Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap_or_default());
        if let Err(e) = control.put("manifest.json", body, PutCondition::None).await {
            return Err(record.failed(store, e.to_string(), true).await);
        }
        for k in 0..spans.len() {
            let name = format!("{CONTROL_FOLDER}/{run_id}/{}", Control::piece_name(k));
            if let Err(e) = state.create_fork(&head, &name).await {
                let retryable = e.is_retryable();
                return Err(record
                    .failed(store, format!("forking the state: {e}"), retryable)
                    .await);
            }
        }
        record.report.status = RunStatus::FannedOut;
        record.report.fan_out = Some(FanOutReport {
            pieces: spans.len(),
            piece_reports: Vec::new(),
        });
        record.report.notes.push(format!(
            "the export's rows would spill more than one invocation may (or BRIDGE_FAN_OUT_PIECES is set): split into {} pieces of the state's {} hash ranges, run by later invocations; control objects under {}; this report is rewritten when the last piece finishes",
            spans.len(),
            head.doc.ranges.len(),
            control.uri("")
        ));
        info!(route = route.name(), run_id = %run_id, pieces = spans.len(), "Export fanned out.");
        record.finish(store).await;
        let mut outcome = record.outcome(
            false,
            json!({"fan_out": {"run_id": run_id, "pieces": spans.len()}}),
        );
        outcome.fan_out = Some(run_id);
        Ok(outcome)
    }

    /// Queues one message per piece of fan-out `run_id` (after the coordinator's lock was
    /// made shareable and long).
    pub(in crate::run::runner) async fn queue_pieces(
        &self,
        route: &str,
        run_id: &str,
        pieces: usize,
    ) -> Result<(), String> {
        let Some(c) = &self.continuation else {
            return Err("no continuation queue is configured".into());
        };
        for piece in 0..pieces {
            let msg = PieceMessage {
                route: route.to_string(),
                run_id: run_id.to_string(),
                piece,
                carried: None,
                handed_by: None,
            };
            c.queue_piece(&msg).await?;
        }
        Ok(())
    }
}
