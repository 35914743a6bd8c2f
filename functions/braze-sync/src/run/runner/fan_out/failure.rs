//! Ending a fan-out that cannot finish, without discarding what Braze confirmed:
//!
//! - a piece failed for good (its share still overflows, it stalled, a control object does
//!   not parse): the fan-out ends `failed`;
//! - the route's state moved under it (its lease ran out while a piece waited to be
//!   redelivered, and another run took the route), or it was left behind (its coordinator
//!   died after writing the manifest and forks, before queueing the pieces): the fan-out is
//!   void, and an export it was recorded for is handed back to a new run.
//!
//! Either way the forks' confirmed work is first taken into the route head
//! ([`StateStore::absorb_fork`]: the ranges the pieces wrote, or their users as records), so
//! the next diff knows what Braze holds; then the report and the ledger entry are written,
//! and only then are the control objects deleted (never an object the route head names).
//! Every run that takes the route lock ends the fan-outs left behind before it diffs, at
//! most [`LEFT_BEHIND_PER_RUN`] per run.

use std::collections::BTreeSet;

use bridge_shared::object_store::PutCondition;
use bytes::Bytes;
use tracing::{info, warn};

use super::control::{Control, FanOut, FinalDoc, Manifest};
use super::state_err;
use crate::config::route::Route;
use crate::ops::report::{FanOutReport, RunReport, RunStatus};
use crate::run::handler::RunError;
use crate::run::runner::SyncRunner;
use crate::run::runner::conclude::RunRecord;
use crate::state::confirmed::Snapshot;
use crate::state::ledger::{Ledger, LedgerStatus};
use crate::state::piece_attempt::ATTEMPT_OBJECT;
use crate::state::store::{CONTROL_FOLDER, Head, StateStore};

/// Most fan-outs left behind that one run ends before it diffs (the next run ends the rest).
pub const LEFT_BEHIND_PER_RUN: usize = 4;

/// Attempts at ending one fan-out left behind before the run gives up (and is retried).
const END_ATTEMPTS: u32 = 3;

/// The names of a fan-out's control objects (a fork's `head.json` among them).
const CONTROL_FILES: [&str; 6] = [
    "manifest.json",
    "final.json",
    "done.json",
    "departures.bin",
    "head.json",
    ATTEMPT_OBJECT,
];

/// How a fan-out that cannot finish ends.
enum Ending {
    /// A piece failed for good: the export's entry says `failed`.
    Failed,
    /// The fan-out no longer applies (the state moved, it was left behind): an export entry
    /// it owns says `incomplete` and the export is queued again.
    Void,
}

impl SyncRunner {
    /// Ends a fan-out that cannot finish (see the module docs); the caller holds the route
    /// lock and releases it. A failure to take the forks' work over is retried (nothing is
    /// deleted before it succeeds).
    pub(super) async fn fail_fan_out(&self, fan: &FanOut<'_>, message: &str) -> RunError {
        let (route, manifest) = (fan.route, fan.manifest);
        let fin = match ended_meanwhile(fan.control).await {
            Ok(Ended::No(fin)) => fin,
            Ok(Ended::Yes) => {
                // Its finalizer recorded how it ended (this piece read a control object the
                // clean had just deleted): that ending stands, with its report.
                self.clean_ended(route, fan.control, manifest.pieces.len())
                    .await;
                return RunError::Permanent {
                    message: format!("fan-out {} had already ended: {message}", manifest.run_id),
                    report: Some(self.report_uri(route.name(), &manifest.run_id).to_string()),
                };
            }
            Err(e) => return e,
        };
        let state = self.state(route);
        let mut head = match state.read_head().await {
            Ok(h) => h,
            Err(e) => return RunError::Retryable(format!("ending fan-out: {e}")),
        };
        let ending = match head.etag == manifest.route_head_etag {
            true => Ending::Failed,
            false => Ending::Void,
        };
        let n = manifest.pieces.len();
        if !fin.is_some_and(|f| f.merged) {
            let pieces: Vec<usize> = (0..n).collect();
            if let Err(e) = self
                .absorb_forks(route, &state, &mut head, fan.control, &pieces)
                .await
            {
                return e;
            }
            if let Err(e) = record_final(fan.control, n, false).await {
                return e;
            }
        }
        let message = format!("fan-out {} failed: {message}", manifest.run_id);
        warn!(route = route.name(), error = %message, "Fan-out failed; see the report.");
        let report = match self.record_ending(route, manifest, &message, ending).await {
            Ok(r) => r,
            Err(e) => return e,
        };
        if let Err(e) = record_final(fan.control, n, true).await {
            return e;
        }
        self.clean_ended(route, fan.control, n).await;
        RunError::Permanent {
            message,
            report: Some(report),
        }
    }

    /// Under the route lock, before a run diffs: ends every fan-out of the route whose
    /// control objects are left (none can be running: the route lock is this run's), after
    /// taking its forks' work into `head` (and `snapshot`, reloaded, for the in-memory diff).
    pub(in crate::run::runner) async fn end_left_fan_outs(
        &self,
        route: &Route,
        head: &mut Head,
        snapshot: &mut Option<Snapshot>,
        record: &mut RunRecord,
    ) -> Result<(), RunError> {
        let folder = self.fan_out_folder(route.name());
        let bucket = &self.settings.state_bucket;
        let mut attempt = 1;
        let listing = loop {
            match self.store.list(bucket, &folder).await {
                Ok(l) => break l,
                Err(e) if e.is_retryable() && attempt < END_ATTEMPTS => attempt += 1,
                Err(e) => return Err(RunError::Retryable(e.to_string())),
            }
        };
        let mut runs: BTreeSet<String> = BTreeSet::new();
        for o in &listing {
            let Some(rest) = o.key.strip_prefix(&folder) else {
                continue;
            };
            if let Some((run, _)) = rest.split_once('/')
                && CONTROL_FILES.iter().any(|f| rest.ends_with(f))
                && run != record.run_id
            {
                runs.insert(run.to_string());
            }
        }
        let state = self.state(route);
        let mut changed = false;
        for run_id in runs.iter().take(LEFT_BEHIND_PER_RUN) {
            let mut attempt = 1;
            loop {
                match self.end_left_fan_out(route, &state, head, run_id).await {
                    Ok(c) => {
                        changed |= c;
                        break;
                    }
                    // Each step is idempotent: tried again from a fresh head at once rather
                    // than failing the whole run for one unavailable read.
                    Err(RunError::Retryable(_)) if attempt < END_ATTEMPTS => {
                        attempt += 1;
                        *head = state.read_head().await.map_err(state_err)?;
                        changed = true;
                    }
                    Err(e) => return Err(e),
                }
            }
            record.report.notes.push(format!(
                "fan-out {run_id} was left behind (its lease ran out, or its coordinator died before queueing its pieces): what its pieces had Braze confirm was taken into the state, and it was ended"
            ));
        }
        if changed && snapshot.is_some() {
            let (h, s) = state.load(route).await.map_err(state_err)?;
            *head = h;
            *snapshot = Some(s);
        }
        Ok(())
    }

    /// Ends one fan-out left behind; returns whether the route head changed.
    async fn end_left_fan_out(
        &self,
        route: &Route,
        state: &StateStore,
        head: &mut Head,
        run_id: &str,
    ) -> Result<bool, RunError> {
        let control = self.control(route.name(), run_id);
        let manifest = match control.get_json::<Manifest>("manifest.json").await {
            Ok(m) => m,
            Err(e @ RunError::Retryable(_)) => return Err(e),
            Err(_) => None,
        };
        let forks = control.forks().await?;
        let etag = head.etag.clone();
        let attempts = control.attempts().await?;
        let pieces = forks.iter().chain(&attempts).max().map_or(0, |k| k + 1);
        let pieces = manifest
            .as_ref()
            .map_or(pieces, |m| m.pieces.len().max(pieces));
        let fin = final_doc(&control).await?;
        if !fin.as_ref().is_some_and(|f| f.merged) {
            self.absorb_forks(route, state, head, &control, &forks)
                .await?;
            record_final(&control, pieces, false).await?;
        }
        let changed = head.etag != etag;
        // A fan-out whose ending was recorded (by its finalizer, or a failed piece), then whose
        // clean was cut short: that ending stands.
        let concluded = fin.is_some_and(|f| f.concluded);
        if let Some(m) = manifest.as_ref().filter(|_| !concluded) {
            let why = format!(
                "fan-out {run_id} was left behind: its route lock ran out before it finished (or its coordinator died before queueing its pieces), and a later run took the route; what its pieces had Braze confirm is in the route's state"
            );
            self.record_ending(route, m, &why, Ending::Void).await?;
            record_final(&control, pieces, true).await?;
        }
        self.clean_ended(route, &control, pieces).await;
        info!(route = route.name(), run_id, "Ended a fan-out left behind.");
        Ok(changed)
    }

    /// Takes the work of fan-out `control`'s forks `pieces` into the route head (its
    /// finalizer, or an earlier end of it, did not merge them).
    async fn absorb_forks(
        &self,
        route: &Route,
        state: &StateStore,
        head: &mut Head,
        control: &Control,
        pieces: &[usize],
    ) -> Result<(), RunError> {
        let run_id = control.run_id();
        let listing = self
            .store
            .list(&control.bucket, &control.folder)
            .await
            .map_err(|e| RunError::Retryable(e.to_string()))?;
        for k in pieces {
            let name = format!("{CONTROL_FOLDER}/{run_id}/{}", Control::piece_name(*k));
            let fork = state.fork(&name);
            let doc = match fork.read_head().await {
                Ok(h) if h.etag.is_some() => h.doc,
                Ok(_) => continue,
                Err(e) if e.is_retryable() => return Err(state_err(e)),
                Err(e) => {
                    // Nothing can be read of it, so nothing can be taken over.
                    warn!(route = route.name(), fork = %name, error = %e, "A fork of an ended fan-out cannot be read; what its piece sent is resent when its users change.");
                    continue;
                }
            };
            let folder = format!("{}{}/", control.folder, Control::piece_name(*k));
            let mut orphans: Vec<String> = listing
                .iter()
                .filter_map(|o| o.key.strip_prefix(&folder))
                .filter(|f| f.starts_with("seg-") && f.ends_with(".bin"))
                .map(|f| format!("{name}/{f}"))
                .filter(|n| !doc.segments.contains(n))
                .collect();
            orphans.sort();
            state
                .absorb_fork(head, &fork, &doc, &orphans, route)
                .await
                .map_err(|e| RunError::Retryable(format!("taking a fork's work over: {e}")))?;
        }
        Ok(())
    }

    /// The ended fan-out's report and, when the export's ledger entry is this fan-out's, the
    /// entry (`failed`, or `incomplete` with the export queued again when it is void);
    /// returns the report's address. Retried when the report or the entry cannot be written,
    /// or the export of a void fan-out cannot be queued again.
    async fn record_ending(
        &self,
        route: &Route,
        manifest: &Manifest,
        message: &str,
        ending: Ending,
    ) -> Result<String, RunError> {
        let store = self.store.as_ref();
        let s = &self.settings;
        let mut report = RunReport::new(&manifest.run_id, route.name());
        report.export_id = Some(manifest.export_id.clone());
        report.exported_at = Some(manifest.exported_at.clone());
        report.started_at = manifest.started_at.clone();
        report.finished_at = Some(crate::clock::now().to_rfc3339());
        report.error = Some(message.to_string());
        report.notes = manifest.notes.clone();
        report.fan_out = Some(FanOutReport {
            pieces: manifest.pieces.len(),
            piece_reports: Vec::new(),
        });
        let ledger = Ledger::for_route(store, &s.state_bucket, &s.state_prefix, route.name());
        let retry = |e: String| RunError::Retryable(format!("recording the fan-out's end: {e}"));
        let entry = ledger
            .entry(&manifest.export_id)
            .await
            .map_err(|e| retry(e.to_string()))?;
        // The entry this fan-out was recorded in (not a later run's claim on the export);
        // `incomplete` when an earlier attempt at this end recorded it and then failed.
        let owned = entry.is_some_and(|e| {
            e.fan_out.as_deref() == Some(manifest.run_id.as_str())
                && matches!(e.status, LedgerStatus::FannedOut | LedgerStatus::Incomplete)
        });
        let (status, ledger_status) = match ending {
            Ending::Failed => (RunStatus::Failed, LedgerStatus::Failed),
            Ending::Void => (RunStatus::Incomplete, LedgerStatus::Incomplete),
        };
        report.status = status;
        let hand_back = owned && matches!(ending, Ending::Void);
        if hand_back {
            report.notes.push(
                "the export was queued again: a new run diffs it against the state as it is now"
                    .into(),
            );
        }
        let report_uri = self.report_uri(route.name(), &manifest.run_id);
        report
            .put(store, &report_uri)
            .await
            .map_err(|e| retry(e.to_string()))?;
        report.emit_metrics();
        if owned || matches!(ending, Ending::Failed) {
            ledger
                .finish_fan_out(
                    &manifest.export_id,
                    &manifest.run_id,
                    ledger_status,
                    Some(report_uri.to_string()),
                )
                .await
                .map_err(|e| retry(e.to_string()))?;
        }
        if hand_back {
            match &self.continuation {
                // Queued before the control objects go: if the queue refuses, this end is
                // tried again (the entry already says `incomplete`, still owned), so the
                // export is never dropped while older exports go on being synced.
                Some(c) => c.hand_over(&manifest.plan()).await.map_err(|e| {
                    retry(format!("queueing the export of a void fan-out again: {e}"))
                })?,
                None => {
                    warn!(route = route.name(), run_id = %manifest.run_id, "No continuation queue is configured to queue the export of a void fan-out again; replay it (its ledger entry says incomplete).");
                }
            }
        }
        Ok(report_uri.to_string())
    }

    /// Deletes what is left of the control objects of a fan-out whose manifest is gone (an
    /// end cut short after it deleted the manifest).
    pub(super) async fn clean_left(&self, route: &Route, control: &Control) {
        let pieces = match (
            control.forks().await,
            control.done().await,
            control.attempts().await,
        ) {
            (Ok(f), Ok(d), Ok(a)) => f.into_iter().chain(d).chain(a).max().map_or(0, |k| k + 1),
            _ => return,
        };
        self.clean_ended(route, control, pieces).await;
    }

    /// Deletes an ended fan-out's control objects, and its forks' objects too unless the
    /// route head names one of them.
    async fn clean_ended(&self, route: &Route, control: &Control, pieces: usize) {
        let referenced = self.head_references(route, control.run_id()).await;
        control.clean(pieces, !referenced).await;
    }
}

/// A fan-out's `final.json`; an unreadable one reads as none (its forks are taken over again,
/// if they were merged).
async fn final_doc(control: &Control) -> Result<Option<FinalDoc>, RunError> {
    match control.get_json::<FinalDoc>("final.json").await {
        Ok(f) => Ok(f),
        Err(e @ RunError::Retryable(_)) => Err(e),
        Err(_) => Ok(None),
    }
}

/// Whether a fan-out a piece is about to fail ended meanwhile.
enum Ended {
    /// Its finalizer recorded how it ended, or its manifest is gone.
    Yes,
    /// Not ended: its `final.json`, if any.
    No(Option<FinalDoc>),
}

/// Reads the fan-out's control objects again: one whose manifest is gone, or whose
/// `final.json` says concluded, ended meanwhile.
async fn ended_meanwhile(control: &Control) -> Result<Ended, RunError> {
    let fin = final_doc(control).await?;
    if fin.as_ref().is_some_and(|f| f.concluded) {
        return Ok(Ended::Yes);
    }
    match control.get_json::<Manifest>("manifest.json").await {
        Ok(None) => Ok(Ended::Yes),
        Err(e @ RunError::Retryable(_)) => Err(e),
        _ => Ok(Ended::No(fin)),
    }
}

/// Records in `final.json`, before anything of the ending fan-out is deleted, that its forks
/// are in the route head and, once its report and ledger entry are written, that it is
/// `concluded`: a clean cut short then leaves control objects that a later run deletes
/// without taking the forks over again (over the newer values the runs in between had Braze
/// confirm, or after they compacted the objects a fork head names) or writing over the
/// ending. `finalizer` names no piece (`pieces`): no piece finalizes an ending fan-out.
async fn record_final(control: &Control, pieces: usize, concluded: bool) -> Result<(), RunError> {
    let fin = FinalDoc {
        finalizer: pieces,
        merged: true,
        concluded,
    };
    let body = Bytes::from(serde_json::to_vec(&fin).unwrap_or_default());
    control
        .put("final.json", body, PutCondition::None)
        .await
        .map_err(|e| RunError::Retryable(format!("recording how an ending fan-out stands: {e}")))
}
