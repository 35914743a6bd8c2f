//! The `_fan_out/<run id>/` control objects of one fan-out: the coordinator's
//! `manifest.json`, each piece's `p<k>/done.json`, `p<k>/departures.bin` and attempt claim
//! `p<k>/attempt.json`, the finalizer's `final.json`, where they are, how they are read and
//! written, and when they may be deleted.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use bridge_shared::object_store::ObjectMeta;
use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::warn;

use super::store_err;
use crate::config::route::Route;
use crate::ops::report::RunReport;
use crate::run::handler::{ExportPlan, RunError};
use crate::run::runner::SyncRunner;
use crate::run::runner::hand_over::PieceMessage;
use crate::state::piece_attempt::ATTEMPT_OBJECT;
use crate::state::store::CONTROL_FOLDER;

/// `manifest.json`: the export plan every piece runs, written once by the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Manifest {
    /// The fan-out run (the coordinator's run id; the route lock's holder).
    pub run_id: String,
    /// The route.
    pub route: String,
    /// The export's id (the ledger key).
    pub export_id: String,
    /// The trigger object's bucket.
    pub bucket: String,
    /// The trigger object's key.
    pub trigger_key: String,
    /// The trigger object as planned.
    pub trigger_meta: ObjectMeta,
    /// The parts, in order.
    pub parts: Vec<ObjectMeta>,
    /// The export's date (RFC 3339), for the watermark.
    pub exported_at: String,
    /// Resend every attribute.
    pub force_full: bool,
    /// Release held departures.
    pub allow_departures: bool,
    /// The salt of a metadata-forced replay's row digests ([`ExportPlan::forced_salt`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forced_salt: Option<u64>,
    /// Per piece, `[first, end)` of the state's hash ranges it diffs.
    pub pieces: Vec<[usize; 2]>,
    /// The route head's ETag when the forks were made: the route head may not move until
    /// the finalizer merges (the route lock guarantees it; checked anyway).
    pub route_head_etag: Option<String>,
    /// When the coordinator started.
    pub started_at: Option<String>,
    /// The coordinator's notes (forced replay, ignored future watermark).
    pub notes: Vec<String>,
}

impl Manifest {
    /// The export plan the pieces run.
    pub fn plan(&self) -> ExportPlan {
        ExportPlan {
            route: self.route.clone(),
            trigger: S3Uri::new(&self.bucket, &self.trigger_key),
            parts: self.parts.clone(),
            export_id: self.export_id.clone(),
            trigger_meta: self.trigger_meta.clone(),
            force_full: self.force_full,
            allow_departures: self.allow_departures,
            forced_salt: self.forced_salt,
        }
    }

    pub(super) fn span(&self, piece: usize) -> Option<Range<usize>> {
        self.pieces.get(piece).map(|[a, b]| *a..*b)
    }
}

/// `p<k>/done.json`: what a finished piece did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PieceDone {
    /// The piece.
    pub piece: usize,
    /// Its figures (rows, sends, rejects object; `departures`: counts, not judged).
    pub report: RunReport,
    /// Bytes of the departure removals it wrote to `p<k>/departures.bin` (a departure file,
    /// [`crate::diff::bounded::read_departure_file`]); 0: none, no object.
    pub departures_bytes: u64,
}

/// `final.json`: the finalizer's claim and progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct FinalDoc {
    /// The piece that finalizes.
    pub finalizer: usize,
    /// The forks were merged into the route head.
    pub merged: bool,
    /// The fan-out's ending (its report and ledger entry) is recorded: only its control
    /// objects are left to delete, and a run that finds them leaves that ending as it is.
    pub concluded: bool,
}

/// One fan-out as a piece, the finalizer or its failure sees it: the route, its control
/// objects and its manifest.
pub(super) struct FanOut<'a> {
    /// The route.
    pub route: &'a Arc<Route>,
    /// Its control objects.
    pub control: &'a Control,
    /// Its manifest.
    pub manifest: &'a Manifest,
}

/// Attempts at deleting one control object (a transient failure is tried again at once;
/// one still left is deleted by the route's next run, [`SyncRunner::end_left_fan_outs`]).
const DELETE_ATTEMPTS: u32 = 3;

/// Where one fan-out's control objects are.
pub(super) struct Control {
    store: Arc<dyn ObjectStore>,
    pub(super) bucket: String,
    /// `<state prefix><route>/_fan_out/<run id>/`.
    pub(super) folder: String,
    /// The fan-out run.
    run_id: String,
}

impl Control {
    pub(super) fn uri(&self, name: &str) -> S3Uri {
        S3Uri::new(&self.bucket, format!("{}{name}", self.folder))
    }

    pub(super) fn piece_name(piece: usize) -> String {
        format!("p{piece:03}")
    }

    pub(super) async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        name: &str,
    ) -> Result<Option<T>, RunError> {
        let uri = self.uri(name);
        match self.store.get(&uri).await {
            Ok((_, b)) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| RunError::Permanent {
                    message: format!("fan-out control object {uri} does not parse: {e}"),
                    report: None,
                }),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err(e)),
        }
    }

    pub(super) async fn put(
        &self,
        name: &str,
        body: Bytes,
        condition: PutCondition,
    ) -> Result<(), StoreError> {
        self.store
            .put(&self.uri(name), body, condition, BTreeMap::new())
            .await
            .map(|_| ())
    }

    /// The fan-out run.
    pub(super) fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Pieces whose `done.json` exists.
    pub(super) async fn done(&self) -> Result<Vec<usize>, RunError> {
        self.pieces_with("done.json").await
    }

    /// Pieces whose fork head exists.
    pub(super) async fn forks(&self) -> Result<Vec<usize>, RunError> {
        self.pieces_with("head.json").await
    }

    /// Pieces whose attempt claim object exists.
    pub(super) async fn attempts(&self) -> Result<Vec<usize>, RunError> {
        self.pieces_with(ATTEMPT_OBJECT).await
    }

    /// Deletes control object `name` (best effort: one left is deleted by the route's next
    /// run, [`SyncRunner::end_left_fan_outs`]).
    pub(super) async fn delete(&self, name: &str) {
        let uri = self.uri(name);
        if let Err(e) = self.store.delete(&uri).await {
            warn!(object = %uri, error = %e, "Could not delete a fan-out control object; the route's next run deletes it.");
        }
    }

    /// Pieces whose `p<k>/<file>` exists.
    async fn pieces_with(&self, file: &str) -> Result<Vec<usize>, RunError> {
        let listing = self
            .store
            .list(&self.bucket, &self.folder)
            .await
            .map_err(store_err)?;
        Ok(listing
            .iter()
            .filter_map(|o| {
                let rest = o.key.strip_prefix(&self.folder)?;
                let (p, f) = rest.split_once('/')?;
                (f == file).then(|| p.strip_prefix('p')?.parse().ok())?
            })
            .collect())
    }

    /// Deletes the control objects (never the state objects forks wrote: after a merge the
    /// route head references them). With `everything`, the fan-out never merged, so the
    /// forks' objects are unreferenced too and the whole folder goes.
    ///
    /// In an order a cut-short clean can be resumed from: the manifest first (no piece runs
    /// once it is gone), each fork's head before the objects it names, and `final.json` last
    /// (while it says merged, a fork head naming objects the merge replaced is never taken
    /// over again). The first object that cannot be deleted stops it: nothing after it is
    /// deleted, and the route's next run ends what is left.
    pub(super) async fn clean(&self, pieces: usize, everything: bool) {
        let mut keys = Vec::new();
        // Unlisted: only the control objects go; the next run ends the rest.
        if everything && let Ok(listing) = self.store.list(&self.bucket, &self.folder).await {
            keys = listing.into_iter().map(|o| o.key).collect();
        }
        for uri in self.deletion_order(pieces, &keys) {
            let mut attempt = 1;
            while let Err(e) = self.store.delete(&uri).await {
                if attempt < DELETE_ATTEMPTS && e.is_retryable() {
                    attempt += 1;
                    continue;
                }
                warn!(object = %uri, error = %e, "Could not delete a fan-out control object; the route's next run deletes it and what follows it.");
                return;
            }
        }
    }

    /// What [`Control::clean`] deletes, in order: the manifest; per piece its `done.json`,
    /// `departures.bin`, fork head and attempt claim, then the fork's other objects among
    /// `listed`; any other object of `listed`; `final.json` last.
    fn deletion_order(&self, pieces: usize, listed: &[String]) -> Vec<S3Uri> {
        let mut names = vec!["manifest.json".to_string()];
        let pieces = listed
            .iter()
            .filter_map(|k| k.strip_prefix(&self.folder)?.split_once('/'))
            .filter_map(|(p, _)| p.strip_prefix('p')?.parse::<usize>().ok())
            .map(|k| k + 1)
            .fold(pieces, usize::max);
        for k in 0..pieces {
            let p = Self::piece_name(k);
            let own = [
                format!("{p}/done.json"),
                format!("{p}/departures.bin"),
                format!("{p}/head.json"),
                format!("{p}/{ATTEMPT_OBJECT}"),
            ];
            let rest: Vec<String> = listed
                .iter()
                .filter_map(|key| key.strip_prefix(&self.folder))
                .filter(|n| n.starts_with(&format!("{p}/")) && !own.iter().any(|o| o == n))
                .map(str::to_string)
                .collect();
            names.extend(own);
            names.extend(rest);
        }
        let others: Vec<String> = listed
            .iter()
            .filter_map(|key| key.strip_prefix(&self.folder))
            .filter(|n| *n != "final.json" && !names.iter().any(|m| m == n))
            .map(str::to_string)
            .collect();
        names.extend(others);
        names.push("final.json".into());
        names.iter().map(|n| self.uri(n)).collect()
    }
}

/// A piece message's answer that acknowledges it, saying why.
pub(super) fn ack(msg: &PieceMessage, why: &str) -> Value {
    json!({"piece": msg.piece, "run_id": msg.run_id, "route": msg.route, "outcome": why})
}

impl SyncRunner {
    /// Where fan-out `run_id` of `route` keeps its control objects.
    pub(super) fn control(&self, route: &str, run_id: &str) -> Control {
        Control {
            store: self.store.clone(),
            bucket: self.settings.state_bucket.clone(),
            folder: format!("{}{run_id}/", self.fan_out_folder(route)),
            run_id: run_id.to_string(),
        }
    }

    /// `<state prefix><route>/_fan_out/`: every fan-out's control objects of `route`.
    pub(super) fn fan_out_folder(&self, route: &str) -> String {
        let mut prefix = self.settings.state_prefix.clone();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        format!("{prefix}{route}/{CONTROL_FOLDER}/")
    }

    /// Whether the route head (read now: it may have moved on from an unrecorded merge)
    /// references an object fan-out `run_id`'s forks wrote; unsure (unreadable), yes.
    pub(super) async fn head_references(&self, route: &Route, run_id: &str) -> bool {
        let own = format!("{CONTROL_FOLDER}/{run_id}/");
        match self.state(route).read_head().await {
            Ok(h) => h
                .doc
                .ranges
                .iter()
                .flat_map(|r| r.base.iter().chain(r.deltas.iter()))
                .any(|n| n.starts_with(&own)),
            Err(_) => true,
        }
    }

    pub(super) fn report_uri(&self, route: &str, run_id: &str) -> S3Uri {
        S3Uri::new(
            &self.settings.state_bucket,
            format!("{}{route}/{run_id}.json", self.settings.reports_prefix),
        )
    }
}
