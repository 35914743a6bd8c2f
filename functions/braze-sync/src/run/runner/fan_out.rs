//! Fan-out: one export too big for one invocation, run as pieces by several invocations
//! through the function's own queue (Lambda's event source mapping is the engine).
//!
//! - **Coordinator** (the triggered run, holding the route lock): lays the state out in at
//!   least as many hash ranges as pieces ([`StateStore::ensure_layout`]), writes the plan to
//!   `<state prefix><route>/_fan_out/<run id>/manifest.json`, forks the state once per piece
//!   ([`StateStore::create_fork`]) and, once its run is over, queues one
//!   [`PieceMessage`] per piece. It keeps the route lock (holder = its run id) and the
//!   export's ledger entry open ([`crate::state::ledger::LedgerStatus::FannedOut`]).
//! - **Piece** `k`: joins the route lock ([`RouteLock::join`]), reads every part of the export
//!   but diffs only its span of the state's ranges (`only_ranges`), sends (one of the
//!   workspace's senders as `<run id>-p<k>`), checkpoints and commits into its own fork head,
//!   never the route head; a killed piece resumes from its own checkpoints alone, and one cut
//!   by its deadline queues itself again. Departures are not sent by pieces: each writes its
//!   removals (`p<k>/departures.bin`) and its figures (`p<k>/done.json`).
//! - **Finalizer**: the piece that finds every `done.json` and wins the conditional create
//!   of `final.json`. It merges the forks into the route head ([`StateStore::merge_forks`]),
//!   judges departures on the export's totals and sends the removals the guard lets through,
//!   commits with the export's watermark, writes one combined report, completes the ledger
//!   entry, releases the route lock and deletes the control objects. A finalizer killed
//!   midway is retried by its own message's redelivery (merging twice gives the same head;
//!   re-sending a removal is harmless).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use bridge_shared::object_store::ObjectMeta;
use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::committer::Committer;
use super::conclude::{Ended, RunRecord};
use super::hand_over::PieceMessage;
use super::producer::{BoundedDiff, Diff, Producer};
use super::sender::Sender;
use super::{EST_ROW_BYTES, SyncRunner};
use crate::config::route::Route;
use crate::diff::bounded::release_departures;
use crate::diff::export::{ProduceOptions, Stop, Summary};
use crate::diff::export::{SpillOverflow, size_text};
use crate::diff::user::AudienceDepartures;
use crate::model::{DeliveryOutcome, UserDelta};
use crate::ops::report::{FanOutPiece, FanOutReport, RunReport, RunStatus};
use crate::run::handler::{ExportPlan, RunError, RunOutcome};
use crate::send::deliver::DeliverError;
use crate::state::lease;
use crate::state::ledger::{Ledger, LedgerStatus};
use crate::state::route_lock::{Joined, RouteLock, lock_uri};
use crate::state::store::{CONTROL_FOLDER, Head, HeadDoc, StateStore, Watermark};

/// Bytes the bounded diff spills per export row, used to tell whether an export's spill fits
/// the ephemeral storage: a margin over what `sync-scale-bench` measures at 20 attributes
/// (`docs/benchmarks.md`), since the estimate's rows are themselves guessed from bytes (a spill
/// the estimate still misses fans out from what was measured, [`pieces_measured`]).
pub const SPILL_BYTES_PER_ROW: u64 = 360;
/// How long a fan-out's route lock holds without a renewal (pieces renew it while they
/// run): long enough for queued pieces to start, short enough that a dead fan-out frees
/// the route within one Lambda timeout.
pub const FAN_OUT_LEASE_S: i64 = 900;

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
        }
    }

    fn span(&self, piece: usize) -> Option<Range<usize>> {
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
}

/// The number of pieces to split an export into: `forced` (`BRIDGE_FAN_OUT_PIECES`), else
/// enough that each piece's spill (the export's rows estimated from its parts' sizes as text,
/// [`super::text_bytes`], times
/// [`SPILL_BYTES_PER_ROW`]) fits `spill_limit` with a quarter to spare; `None`: one
/// invocation does (pure).
pub fn pieces_for(
    parts_bytes: u64,
    spill_limit: Option<u64>,
    forced: Option<usize>,
) -> Option<usize> {
    if let Some(n) = forced {
        return (n >= 2).then_some(n);
    }
    let limit = spill_limit?.max(1);
    let spill = (parts_bytes / EST_ROW_BYTES).saturating_mul(SPILL_BYTES_PER_ROW);
    if spill <= limit {
        return None;
    }
    let want = spill.saturating_mul(5) / 4;
    Some((want.div_ceil(limit) as usize).max(2))
}

/// Consecutive invocations of a piece that hand over without Braze confirming a user before
/// the fan-out ends (the next would start where they did).
pub const STALLED_LIMIT: u32 = 3;

/// Most pieces a fan-out splits into (a span holds at least one of the state's ranges, and a
/// state has at most `2^16`).
pub const MAX_PIECES: usize = 1 << 16;

/// The number of pieces for an export whose bounded run's spill overflowed `limit` although
/// the estimate from its parts' sizes said it would fit (compressed parts, wide rows): its
/// spill extrapolated from what the partition step measured
/// ([`SpillOverflow::projected_spill`] of the parts' bytes), half again for margin (the
/// parts' read-ahead counts bytes before their rows, spans of ranges are not all even), per
/// `limit` (pure).
pub fn pieces_measured(o: &SpillOverflow, parts_bytes: u64, limit: u64) -> usize {
    let spill = o.projected_spill(parts_bytes);
    let want = spill.saturating_mul(3) / 2;
    (want.div_ceil(limit.max(1)) as usize).clamp(2, MAX_PIECES)
}

/// The pieces' removal files as a lazy iterator of streams: each object is opened (a
/// streamed GET) only when the iterator is advanced, so its consumer holds one at a time. A
/// file that cannot be opened reads as an I/O error naming it (retryable: the finalizer is
/// redelivered). Blocking: call from a blocking thread.
fn departure_streams(
    store: Arc<dyn ObjectStore>,
    uris: Vec<S3Uri>,
    rt: tokio::runtime::Handle,
) -> impl Iterator<Item = (String, Box<dyn std::io::Read + Send>)> + Send {
    uris.into_iter().map(move |uri| {
        let r: Box<dyn std::io::Read + Send> = match rt.block_on(store.get_reader(&uri)) {
            Ok((_, r)) => Box::new(crate::diff::in_memory::blocking_reader(r, rt.clone())),
            Err(e) => {
                let message = format!("opening {uri}: {e}");
                Box::new(FailedOpen(Some(message)))
            }
        };
        (uri.to_string(), r)
    })
}

/// A departure file that could not be opened: its first read fails with why.
struct FailedOpen(Option<String>);

impl std::io::Read for FailedOpen {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other(
            self.0
                .take()
                .unwrap_or_else(|| "could not be opened".into()),
        ))
    }
}

fn forced_setting(setting: Option<usize>) -> bool {
    setting.is_some_and(|n| n >= 2)
}

/// The fewest pieces, at least `pieces`, whose even spans of `ranges` ranges ([`spans`]) each
/// hold at most `ranges / pieces` (rounded down, at least 1) ranges, so no piece gets more
/// than its `1/pieces` share of the export: e.g. 8 ranges in 3 pieces would give a span of 3
/// (37.5%); 4 pieces of 2 do not (pure).
pub fn even_pieces(ranges: usize, pieces: usize) -> usize {
    let ranges = ranges.max(1);
    let width = (ranges / pieces.max(1)).max(1);
    ranges.div_ceil(width).max(pieces.min(ranges))
}

/// Splits ranges `0..ranges` into `pieces` contiguous spans as even as possible (pure).
pub fn spans(ranges: usize, pieces: usize) -> Vec<Range<usize>> {
    let pieces = pieces.clamp(1, ranges.max(1));
    (0..pieces)
        .map(|k| (k * ranges / pieces)..((k + 1) * ranges / pieces))
        .collect()
}

/// Whether `head` already holds the forks' work: every range of every span is the fork's
/// (a finalizer merged, then died before recording it), and no export was applied since the
/// forks were made (a merge keeps the watermark and applied exports the forks copied) (pure).
fn is_merge_of(head: &HeadDoc, forks: &[(Range<usize>, HeadDoc)]) -> bool {
    forks.iter().all(|(span, f)| {
        f.range_bits == head.range_bits
            && f.ranges.len() == head.ranges.len()
            && f.watermark == head.watermark
            && f.applied_exports == head.applied_exports
            && span.clone().all(|r| head.ranges.get(r) == f.ranges.get(r))
    })
}

/// Where one fan-out's control objects are.
struct Control {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    /// `<state prefix><route>/_fan_out/<run id>/`.
    folder: String,
}

fn store_err(e: StoreError) -> RunError {
    RunError::Retryable(e.to_string())
}

/// A state error as the piece's answer: retried when it may pass, else the fan-out ends.
fn state_err(e: crate::state::store::StateError) -> RunError {
    if e.is_retryable() {
        RunError::Retryable(e.to_string())
    } else {
        RunError::Permanent {
            message: e.to_string(),
            report: None,
        }
    }
}

impl Control {
    fn uri(&self, name: &str) -> S3Uri {
        S3Uri::new(&self.bucket, format!("{}{name}", self.folder))
    }

    fn piece_name(piece: usize) -> String {
        format!("p{piece:03}")
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(
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

    async fn put(
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

    /// Pieces whose `done.json` exists.
    async fn done(&self) -> Result<Vec<usize>, RunError> {
        let listing = self
            .store
            .list(&self.bucket, &self.folder)
            .await
            .map_err(store_err)?;
        Ok(listing
            .iter()
            .filter_map(|o| {
                let rest = o.key.strip_prefix(&self.folder)?;
                let (p, file) = rest.split_once('/')?;
                (file == "done.json").then(|| p.strip_prefix('p')?.parse().ok())?
            })
            .collect())
    }

    /// Deletes the control objects (never the state objects forks wrote: after a merge the
    /// route head references them). With `everything`, the fan-out never merged, so the
    /// forks' objects are unreferenced too and the whole folder goes.
    async fn clean(&self, pieces: usize, everything: bool) {
        let mut names = vec!["manifest.json".to_string()];
        for k in 0..pieces {
            let p = Self::piece_name(k);
            names.extend([
                format!("{p}/done.json"),
                format!("{p}/departures.bin"),
                format!("{p}/head.json"),
            ]);
        }
        names.push("final.json".into());
        let mut uris: Vec<S3Uri> = names.iter().map(|n| self.uri(n)).collect();
        if everything && let Ok(listing) = self.store.list(&self.bucket, &self.folder).await {
            uris = listing
                .iter()
                .map(|o| S3Uri::new(&self.bucket, &o.key))
                .collect();
        }
        for uri in uris {
            if let Err(e) = self.store.delete(&uri).await {
                warn!(object = %uri, error = %e, "Could not delete a fan-out control object; it is harmless, delete it by hand.");
            }
        }
    }
}

/// What a piece leaves the route lock to.
enum LockAfter {
    /// Other pieces still run: leave the shared lease to them.
    Keep,
    /// The fan-out is over (finalized, or failed): let the route go.
    Release,
}

impl SyncRunner {
    fn control(&self, route: &str, run_id: &str) -> Control {
        let s = &self.settings;
        let mut prefix = s.state_prefix.clone();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        Control {
            store: self.store.clone(),
            bucket: s.state_bucket.clone(),
            folder: format!("{prefix}{route}/{CONTROL_FOLDER}/{run_id}/"),
        }
    }

    /// Whether this bounded run fans out, and into how many pieces: only with a
    /// continuation queue (the CLI has none: a spill that cannot fit fails fast instead).
    pub(super) fn fan_out_pieces(&self, plan: &ExportPlan) -> Option<usize> {
        self.continuation.as_ref()?;
        let bytes = super::export_text_bytes(plan);
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
    pub(super) async fn fan_out_on_overflow(
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
        self.fan_out(plan, route, &state, head, exported_at, record, pieces)
            .await
    }

    /// The coordinator: lays the state out, writes the manifest, forks the state per piece.
    /// The pieces are queued by [`SyncRunner::queue_pieces`] once the run's lock is shared.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn fan_out(
        &self,
        plan: &ExportPlan,
        route: &Route,
        state: &StateStore,
        mut head: Head,
        exported_at: &str,
        record: &mut RunRecord,
        pieces: usize,
    ) -> Result<RunOutcome, RunError> {
        let store = self.store.as_ref();
        let bytes = super::export_text_bytes(plan);
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
    pub(super) async fn queue_pieces(
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
            };
            c.queue_piece(&msg).await?;
        }
        Ok(())
    }

    /// Runs one piece message (see the module docs).
    pub(super) async fn piece(
        &self,
        message: &Value,
        remaining_ms: Option<u64>,
    ) -> Result<Value, RunError> {
        let msg: PieceMessage =
            serde_json::from_value(message.clone()).map_err(|e| RunError::Permanent {
                message: format!("fan-out piece message {message} does not parse: {e}"),
                report: None,
            })?;
        let Some(route) = self.routes.get(&msg.route).cloned() else {
            return Err(RunError::Permanent {
                message: format!(
                    "fan-out piece of route {:?}, which is not configured",
                    msg.route
                ),
                report: None,
            });
        };
        let s = &self.settings;
        let uri = lock_uri(&s.state_bucket, &s.state_prefix, route.name());
        let now = crate::clock::now().timestamp_millis();
        let joined = RouteLock::join(self.store.clone(), uri, &msg.run_id, now, s.fan_out_lease_s)
            .await
            .map_err(|e| RunError::Retryable(e.to_string()))?;
        let ack = |why: &str| json!({"piece": msg.piece, "run_id": msg.run_id, "route": msg.route, "outcome": why});
        let mut lock = match joined {
            Joined::Held(l) => l,
            Joined::Ended => return Ok(ack("fan_out_over")),
            Joined::Busy(holder) => {
                return Err(RunError::Retryable(format!(
                    "route {} is locked by {holder}, not by fan-out run {}; the piece waits",
                    route.name(),
                    msg.run_id
                )));
            }
        };
        let control = self.control(route.name(), &msg.run_id);
        let manifest: Manifest = match control.get_json("manifest.json").await {
            Ok(Some(m)) => m,
            Ok(None) => {
                // A fan-out already cleaned up (a late redelivery): give the route back.
                if let Err(e) = lock.release().await {
                    warn!(error = %e, "Could not release the route lock; it expires by itself.");
                }
                return Ok(ack("fan_out_over"));
            }
            Err(e @ RunError::Retryable(_)) => return Err(e),
            Err(e) => {
                // An unreadable manifest: no piece can run, nor end the fan-out properly.
                if let Err(e) = lock.release().await {
                    warn!(error = %e, "Could not release the route lock; it expires by itself.");
                }
                return Err(e);
            }
        };
        let (lost_tx, lost_rx) = watch::channel(None);
        let work = self.piece_locked(&msg, &route, &control, &manifest, remaining_ms, lost_rx);
        let result = lease::keep_lock(work, &mut lock, &lost_tx).await;
        let (after, result) = match result {
            Ok((after, v)) => (after, Ok(v)),
            // A permanent failure (an unreadable control object) ends the fan-out, so it never
            // holds the route until its lease runs out.
            Err((LockAfter::Keep, RunError::Permanent { message, .. })) => {
                let e = self
                    .fail_fan_out(&route, &control, &manifest, &message)
                    .await;
                (LockAfter::Release, Err(e))
            }
            Err((after, e)) => (after, Err(e)),
        };
        if let LockAfter::Release = after
            && let Err(e) = lock.release().await
        {
            warn!(route = route.name(), error = %e, "Could not release the route lock; it expires by itself.");
        }
        result
    }

    /// A piece under the route lock: run it unless it is done, then finalize if it is last.
    async fn piece_locked(
        &self,
        msg: &PieceMessage,
        route: &Arc<Route>,
        control: &Control,
        manifest: &Manifest,
        remaining_ms: Option<u64>,
        lost: watch::Receiver<Option<String>>,
    ) -> Result<(LockAfter, Value), (LockAfter, RunError)> {
        let keep = |e| (LockAfter::Keep, e);
        let ack = |why: &str| json!({"piece": msg.piece, "run_id": msg.run_id, "route": msg.route, "outcome": why});
        let Some(span) = manifest.span(msg.piece) else {
            return Ok((LockAfter::Keep, ack("no_such_piece")));
        };
        let name = Control::piece_name(msg.piece);
        let done: Option<PieceDone> = control
            .get_json(&format!("{name}/done.json"))
            .await
            .map_err(keep)?;
        if done.is_none() {
            match self
                .run_piece_work(msg, route, control, manifest, span, remaining_ms, lost)
                .await
            {
                Ok(Some(v)) => return Ok((LockAfter::Keep, v)),
                Ok(None) => {}
                Err(RunError::Permanent { message, .. }) => {
                    let e = self
                        .fail_fan_out(
                            route,
                            control,
                            manifest,
                            &format!("piece {}: {message}", msg.piece),
                        )
                        .await;
                    return Err((LockAfter::Release, e));
                }
                Err(e) => return Err(keep(e)),
            }
        }
        // Done: the last piece to finish becomes the finalizer.
        let finished = control.done().await.map_err(keep)?;
        if finished.len() < manifest.pieces.len() {
            return Ok((LockAfter::Keep, ack("piece_done")));
        }
        let claim = FinalDoc {
            finalizer: msg.piece,
            merged: false,
        };
        let body = Bytes::from(serde_json::to_vec(&claim).unwrap_or_default());
        let fin = match control
            .put("final.json", body, PutCondition::IfAbsent)
            .await
        {
            Ok(()) => claim,
            Err(StoreError::PreconditionFailed { .. }) => {
                match control
                    .get_json::<FinalDoc>("final.json")
                    .await
                    .map_err(keep)?
                {
                    // Our own message redelivered after a finalizer was killed: go on.
                    Some(f) if f.finalizer == msg.piece => f,
                    _ => return Ok((LockAfter::Keep, ack("piece_done"))),
                }
            }
            Err(e) => return Err(keep(store_err(e))),
        };
        match self
            .finalize(route, control, manifest, fin, remaining_ms)
            .await
        {
            Ok(v) => Ok((LockAfter::Release, v)),
            Err(RunError::Permanent { message, .. }) => {
                let e = self.fail_fan_out(route, control, manifest, &message).await;
                Err((LockAfter::Release, e))
            }
            Err(e) => Err(keep(e)),
        }
    }

    /// One piece's diff, send and commit into its fork. `Ok(None)`: done (its `done.json`
    /// written); `Ok(Some(_))`: handed over to a later invocation.
    #[allow(clippy::too_many_arguments)]
    async fn run_piece_work(
        &self,
        msg: &PieceMessage,
        route: &Arc<Route>,
        control: &Control,
        manifest: &Manifest,
        span: Range<usize>,
        remaining_ms: Option<u64>,
        lost: watch::Receiver<Option<String>>,
    ) -> Result<Option<Value>, RunError> {
        let s = &self.settings;
        let store = self.store.as_ref();
        let name = Control::piece_name(msg.piece);
        let state = self.state(route);
        let route_head = state.read_head().await.map_err(state_err)?;
        if route_head.etag != manifest.route_head_etag {
            return Err(RunError::Permanent {
                message: format!(
                    "the route's state changed since the fan-out began (head {:?}, expected {:?}): the fan-out is void; replay the export",
                    route_head.etag, manifest.route_head_etag
                ),
                report: None,
            });
        }
        let fork = state.fork(&format!("{CONTROL_FOLDER}/{}/{name}", msg.run_id));
        let mut head = fork.read_head().await.map_err(state_err)?;
        let plan = manifest.plan();
        let piece_id = format!("{}-{name}", msg.run_id);
        let mut record = RunRecord::new(&plan, route.name(), s);
        record.run_id = piece_id.clone();
        record.report.run_id = piece_id.clone();
        if !head.doc.segments.is_empty() {
            // A killed attempt's checkpoints: folded into the fork's range deltas first.
            let dir =
                crate::state::spill::SpillDir::create(&s.spill_dir, &format!("{piece_id}-fold"))
                    .map_err(|e| RunError::Retryable(e.to_string()))?;
            let users = head.doc.users;
            fork.commit_ranged(&mut head, route, None, users, dir.path())
                .await
                .map_err(state_err)?;
        }
        let mut opts = ProduceOptions::for_route(route, &plan.trigger.to_string());
        opts.full_resend |= plan.force_full;
        opts.allow_departures = plan.allow_departures;
        let mut ranged = self.ranged_settings(&head.doc, route, &piece_id);
        ranged.only_ranges = Some(span);
        ranged.defer_departures = true;
        let dep_path = s.spill_dir.join(format!("{piece_id}-departures.bin"));
        ranged.departures_file = Some(dep_path.clone());
        let (delta_tx, delta_rx) = mpsc::channel::<UserDelta>(s.channel_capacity);
        let (out_tx, out_rx) = mpsc::channel::<DeliveryOutcome>(s.channel_capacity);
        let diff = Diff::Bounded(Box::new(BoundedDiff {
            state: fork.clone(),
            doc: head.doc.clone(),
            settings: ranged,
        }));
        let producer = Producer::start(
            self.store.clone(),
            route.clone(),
            &plan,
            opts,
            diff,
            delta_tx,
        );
        let mut dcfg = s.deliver.clone();
        dcfg.deadline = self.deadline(remaining_ms);
        let share = self.workspace_share(route.name(), &piece_id);
        let sender = Sender::start(self.api.clone(), dcfg, delta_rx, out_tx, share);
        let mut committer = Committer::new(fork, head, route.clone(), s.checkpoint_every)
            .with_max_pending(s.checkpoint_max_users);
        committer.follow(out_rx, lost).await;
        let delivery = sender.finish().await?;
        let produced = producer.finish().await?;
        let mut ended = Ended { produced, delivery };
        if let Some(e) = &committer.failure {
            return Err(RunError::Retryable(e.clone()));
        }
        if let Some(e) = &ended.delivery.error {
            return Err(match e {
                DeliverError::Unauthorized { .. } => {
                    RunError::Retryable(format!("API key refused: {e}"))
                }
                e if e.is_retryable() => RunError::Retryable(e.to_string()),
                e => RunError::Permanent {
                    message: e.to_string(),
                    report: None,
                },
            });
        }
        if let Err(crate::diff::export::SyncError::SpillOverflow(o)) = &mut ended.produced.result {
            // A piece's own spill still overflows (the estimate that split the export was
            // low): it is not split again. The fan-out ends with the sizes and the number of
            // pieces the measured figures call for, before this piece sent anything.
            o.parts_bytes = manifest.parts.iter().map(|p| p.size).sum();
            let n = manifest.pieces.len();
            let want = n.saturating_mul(pieces_measured(o, o.parts_bytes, o.limit_bytes));
            return Err(RunError::Permanent {
                message: format!(
                    "its share of the export (one of {n} pieces) still overflows: {o}. A piece is not split again, so the fan-out ends here; replay the export with BRIDGE_FAN_OUT_PIECES={} (or more), or raise the ephemeral storage",
                    want.min(MAX_PIECES)
                ),
                report: None,
            });
        }
        if let Some(e) = ended.read_error() {
            return Err(if e.is_retryable() {
                RunError::Retryable(e.to_string())
            } else {
                RunError::Permanent {
                    message: e.to_string(),
                    report: None,
                }
            });
        }
        // Confirmed users go into the fork's range deltas, never with a watermark.
        let users = committer.users_before();
        if let Some(e) = committer
            .commit_ranged(users, &s.spill_dir, &format!("{piece_id}-commit"), None)
            .await
        {
            return Err(RunError::Retryable(e));
        }
        if ended.unsent() {
            // Cut short by the deadline: the same piece goes on in a later invocation, from
            // this fork's state.
            let Some(c) = &self.continuation else {
                return Err(RunError::Retryable(
                    "piece cut short by its deadline".into(),
                ));
            };
            // What it sent goes with the message, for the piece's report.
            let mut next = msg.clone();
            let carried = next.carried.get_or_insert_with(Default::default);
            carried.add(&ended.delivery.stats);
            // An invocation that confirmed nobody (and recorded no row digest) leaves the next
            // one where it started: after STALLED_LIMIT in a row the piece would loop, so the
            // fan-out ends instead.
            let stats = &ended.delivery.stats;
            carried.stalled = match stats.users_confirmed + stats.users_recorded {
                0 => carried.stalled + 1,
                _ => 0,
            };
            if carried.stalled >= STALLED_LIMIT {
                return Err(RunError::Permanent {
                    message: format!(
                        "its last {STALLED_LIMIT} invocations reached their deadline without Braze confirming a user (its share of the export does not get through one invocation), so it would hand itself over forever; replay the export with a larger BRIDGE_FAN_OUT_PIECES (now {}), or a longer Timeout",
                        manifest.pieces.len()
                    ),
                    report: None,
                });
            }
            c.queue_piece(&next)
                .await
                .map_err(|e| RunError::Retryable(format!("could not hand the piece over: {e}")))?;
            info!(
                route = route.name(),
                piece = msg.piece,
                "Fan-out piece handed over before its deadline."
            );
            return Ok(Some(
                json!({"piece": msg.piece, "run_id": msg.run_id, "route": msg.route, "outcome": "piece_handed_over"}),
            ));
        }
        ended.account(&mut record, &committer, store, s).await;
        if let Some(c) = &msg.carried {
            c.apply(&mut record.report);
        }
        let departures_bytes = std::fs::metadata(&dep_path).map_or(0, |m| m.len());
        if departures_bytes > 0 {
            self.store
                .put_file(
                    &control.uri(&format!("{name}/departures.bin")),
                    &dep_path,
                    PutCondition::None,
                    BTreeMap::new(),
                )
                .await
                .map_err(store_err)?;
        }
        let _ = std::fs::remove_file(&dep_path);
        let done = PieceDone {
            piece: msg.piece,
            report: record.report.clone(),
            departures_bytes,
        };
        let body = Bytes::from(serde_json::to_vec_pretty(&done).unwrap_or_default());
        control
            .put(&format!("{name}/done.json"), body, PutCondition::None)
            .await
            .map_err(store_err)?;
        info!(
            route = route.name(),
            piece = msg.piece,
            users_sent = record.report.users_sent,
            "Fan-out piece done."
        );
        Ok(None)
    }

    /// The finalizer (see the module docs).
    async fn finalize(
        &self,
        route: &Arc<Route>,
        control: &Control,
        manifest: &Manifest,
        mut fin: FinalDoc,
        remaining_ms: Option<u64>,
    ) -> Result<Value, RunError> {
        let s = &self.settings;
        let store = self.store.as_ref();
        let n = manifest.pieces.len();
        let mut dones = Vec::with_capacity(n);
        for k in 0..n {
            let name = Control::piece_name(k);
            match control
                .get_json::<PieceDone>(&format!("{name}/done.json"))
                .await?
            {
                Some(d) => dones.push(d),
                None => {
                    return Err(RunError::Retryable(format!(
                        "fan-out {}: piece {k} has no done.json yet",
                        manifest.run_id
                    )));
                }
            }
        }
        let state = self.state(route);
        let mut head = state.read_head().await.map_err(state_err)?;
        if !fin.merged {
            let mut forks: Vec<(Range<usize>, HeadDoc)> = Vec::with_capacity(n);
            for k in 0..n {
                let fork = state.fork(&format!(
                    "{CONTROL_FOLDER}/{}/{}",
                    manifest.run_id,
                    Control::piece_name(k)
                ));
                let h = fork.read_head().await.map_err(state_err)?;
                let span = manifest.span(k).unwrap_or(0..0);
                forks.push((span, h.doc));
            }
            if head.etag == manifest.route_head_etag {
                state
                    .merge_forks(&mut head, &forks)
                    .await
                    .map_err(state_err)?;
            } else if !is_merge_of(&head.doc, &forks) {
                return Err(RunError::Permanent {
                    message: format!(
                        "the route's state changed since the fan-out began (head {:?}, expected {:?}): the pieces' work is not merged; replay the export",
                        head.etag, manifest.route_head_etag
                    ),
                    report: None,
                });
            }
            // Else a finalizer attempt merged, then failed before recording it (a 5xx on
            // `final.json`, killed): the route head already is the merge; go on from it.
            fin.merged = true;
            let body = Bytes::from(serde_json::to_vec(&fin).unwrap_or_default());
            control
                .put("final.json", body, PutCondition::None)
                .await
                .map_err(store_err)?;
        }

        // The combined figures.
        let plan = manifest.plan();
        let mut report = RunReport::new(&manifest.run_id, route.name());
        report.export_id = Some(manifest.export_id.clone());
        report.sources = plan
            .parts
            .iter()
            .map(|p| S3Uri::new(&plan.trigger.bucket, &p.key).to_string())
            .collect();
        report.exported_at = Some(manifest.exported_at.clone());
        report.started_at = manifest.started_at.clone();
        report.notes = manifest.notes.clone();
        let mut audiences: Vec<AudienceDepartures> = Vec::new();
        let mut without_id = 0;
        let mut pieces = Vec::with_capacity(n);
        for d in &dones {
            let r = &d.report;
            report.rows_in += r.rows_in;
            report.rejected += r.rejected;
            report.unchanged += r.unchanged;
            report.digests_recorded += r.digests_recorded;
            report.users_sent += r.users_sent;
            report.attributes_sent += r.attributes_sent;
            report.users_confirmed += r.users_confirmed;
            report.braze_rejected += r.braze_rejected;
            report.users_unsent += r.users_unsent;
            report.users_unconfirmed += r.users_unconfirmed;
            report.unconfirmed_requests += r.unconfirmed_requests;
            report.http_429 += r.http_429;
            report.requests += r.requests;
            report.retries_by_cause.merge(&r.retries_by_cause);
            report.send_duration_s = report.send_duration_s.max(r.send_duration_s);
            report.workspace_senders = report.workspace_senders.max(r.workspace_senders);
            report.rate_limit_configured_rps = r.rate_limit_configured_rps;
            without_id += r.rows_without_identifier;
            for note in &r.notes {
                report.notes.push(format!("piece {}: {note}", d.piece));
            }
            for a in &r.departures {
                match audiences.iter_mut().find(|x| x.audience == a.audience) {
                    Some(x) => {
                        x.members_before += a.members_before;
                        x.leaving += a.leaving;
                    }
                    None => {
                        let mut x = a.clone();
                        x.sent = 0;
                        x.held = 0;
                        x.held_because = None;
                        x.released = false;
                        audiences.push(x);
                    }
                }
            }
            let span = manifest.span(d.piece).unwrap_or(0..0);
            pieces.push(FanOutPiece {
                piece: d.piece,
                range_start: span.start,
                range_end: span.end,
                users_sent: r.users_sent,
                users_confirmed: r.users_confirmed,
                unchanged: r.unchanged,
                requests: r.requests,
                http_429: r.http_429,
                rejects_object: r.rejects_object.clone(),
            });
        }
        let rejects: Vec<&String> = pieces
            .iter()
            .filter_map(|p| p.rejects_object.as_ref())
            .collect();
        if rejects.len() == 1 {
            report.rejects_object = rejects.first().map(|r| (*r).clone());
        } else if rejects.len() > 1 {
            report.notes.push(format!(
                "rejected rows are in {} objects, one per piece (fan_out.piece_reports)",
                rejects.len()
            ));
        }

        // Departures, judged on the export's totals; the removals the guard lets through
        // are sent, then the state is committed with the export's watermark. Memory: the
        // pieces' removal files are streamed from S3 one after the other, each opened only
        // when the previous one was read to its end and dropped
        // (`release_departures` takes them from a lazy iterator and reads them in turn,
        // record by record), so a departure day of any size costs the stream's buffers,
        // never a whole piece's removals, let alone every piece's.
        let uris: Vec<S3Uri> = dones
            .iter()
            .filter(|d| d.departures_bytes > 0)
            .map(|d| control.uri(&format!("{}/departures.bin", Control::piece_name(d.piece))))
            .collect();
        let rt = tokio::runtime::Handle::current();
        let dep_store = self.store.clone();
        let files = departure_streams(dep_store, uris, rt);
        let mut totals = Summary {
            departures: audiences,
            rows_without_identifier: without_id,
            ..Summary::default()
        };
        let mut opts = ProduceOptions::for_route(route, &plan.trigger.to_string());
        opts.allow_departures = manifest.allow_departures;
        let (delta_tx, delta_rx) = mpsc::channel::<UserDelta>(s.channel_capacity);
        let (out_tx, out_rx) = mpsc::channel::<DeliveryOutcome>(s.channel_capacity);
        let release_route = route.clone();
        let releasing = tokio::task::spawn_blocking(move || {
            let r = release_departures(&mut totals, &release_route, &opts, files, &|d| {
                delta_tx
                    .blocking_send(d)
                    .map_err(|_| Stop("the sender stopped".into()))
            });
            r.map(|()| totals)
        });
        let mut dcfg = s.deliver.clone();
        dcfg.deadline = self.deadline(remaining_ms);
        let fin_id = format!("{}-final", manifest.run_id);
        let share = self.workspace_share(route.name(), &fin_id);
        let sender = Sender::start(self.api.clone(), dcfg, delta_rx, out_tx, share);
        let mut committer = Committer::new(state, head, route.clone(), s.checkpoint_every)
            .with_max_pending(s.checkpoint_max_users);
        let (_never_lost, lost_rx) = watch::channel(None);
        committer.follow(out_rx, lost_rx).await;
        let delivery = sender.finish().await?;
        let totals = match releasing.await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) if e.is_retryable() => return Err(RunError::Retryable(e.to_string())),
            Ok(Err(e)) => {
                return Err(RunError::Permanent {
                    message: format!("releasing the fan-out's departures: {e}"),
                    report: None,
                });
            }
            Err(e) => {
                return Err(RunError::Retryable(format!(
                    "the departures task failed: {e}"
                )));
            }
        };
        report.apply_departures(&totals.departures, without_id);
        if let Some(e) = &committer.failure {
            return Err(RunError::Retryable(e.clone()));
        }
        if let Some(e) = &delivery.error {
            return Err(RunError::Retryable(format!(
                "sending the fan-out's departures: {e}"
            )));
        }
        if delivery.stats.users_unsent > 0 {
            return Err(RunError::Retryable(
                "the fan-out's departures were cut short; the finalizer is retried".into(),
            ));
        }
        report.users_sent += delivery.stats.users_sent;
        report.attributes_sent += delivery.stats.attributes_sent;
        report.users_confirmed += delivery.stats.users_confirmed;
        report.braze_rejected += delivery.stats.braze_rejected;
        report.requests += delivery.stats.requests;
        report
            .retries_by_cause
            .merge(&delivery.stats.retries_by_cause);
        report.http_429 += delivery.stats.http_429;
        let watermark = Watermark {
            export_id: manifest.export_id.clone(),
            exported_at: Some(manifest.exported_at.clone()),
        };
        let users = committer.users_before();
        if let Some(e) = committer
            .commit_ranged(
                users,
                &s.spill_dir,
                &format!("{fin_id}-commit"),
                Some(watermark),
            )
            .await
        {
            return Err(RunError::Retryable(e));
        }
        report.status = if report.braze_rejected > 0 || report.users_unconfirmed > 0 {
            RunStatus::Incomplete
        } else if report.departures_held > 0 {
            RunStatus::DeparturesHeld
        } else {
            RunStatus::Complete
        };
        report.fan_out = Some(FanOutReport {
            pieces: n,
            piece_reports: pieces,
        });
        let report_uri = self.report_uri(route.name(), &manifest.run_id);
        let now = crate::clock::now();
        report.finished_at = Some(now.to_rfc3339());
        // The whole fan-out, from the coordinator's start.
        report.duration_s = manifest
            .started_at
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map_or(0.0, |t| {
                (now - t.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 1000.0
            });
        if let Err(e) = report.put(store, &report_uri).await {
            return Err(RunError::Retryable(format!(
                "writing the combined report {report_uri}: {e}"
            )));
        }
        report.emit_metrics();
        let ledger_status = match report.status {
            RunStatus::Complete => LedgerStatus::Complete,
            _ => LedgerStatus::Incomplete,
        };
        Ledger::for_route(store, &s.state_bucket, &s.state_prefix, route.name())
            .finish_fan_out(
                &manifest.export_id,
                &manifest.run_id,
                ledger_status,
                Some(report_uri.to_string()),
            )
            .await
            .map_err(|e| RunError::Retryable(e.to_string()))?;
        control.clean(n, false).await;
        info!(route = route.name(), run_id = %manifest.run_id, status = ?report.status, users_sent = report.users_sent, "Fan-out finished.");
        Ok(json!({
            "route": route.name(), "run_id": manifest.run_id, "outcome": "fan_out_finished",
            "status": report.status, "report": report_uri.to_string(),
            "summary": {"rows_in": report.rows_in, "users_sent": report.users_sent,
                        "unchanged": report.unchanged, "rejected": report.rejected,
                        "departures_sent": report.departures_sent,
                        "departures_held": report.departures_held, "pieces": n}}))
    }

    /// Whether the route head (read now: it may have moved on from an unrecorded merge)
    /// references an object fan-out `run_id`'s forks wrote; unsure (unreadable), yes.
    async fn head_references(&self, route: &Route, run_id: &str) -> bool {
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

    /// A fan-out whose pieces could not all be queued (its route lock already released, so
    /// the queued ones end at once): its control objects and forks are deleted, so no
    /// phantom fan-out stays behind (`status`), and the export's retry starts afresh.
    pub(super) async fn drop_unqueued_fan_out(&self, route: &Route, run_id: &str, pieces: usize) {
        let referenced = self.head_references(route, run_id).await;
        self.control(route.name(), run_id)
            .clean(pieces, !referenced)
            .await;
    }

    fn report_uri(&self, route: &str, run_id: &str) -> S3Uri {
        S3Uri::new(
            &self.settings.state_bucket,
            format!("{}{route}/{run_id}.json", self.settings.reports_prefix),
        )
    }

    /// Ends a fan-out that cannot finish (a piece failed for good, the state moved): a failed
    /// report, the ledger entry `failed`, the control objects and unmerged forks deleted. The
    /// caller releases the route lock.
    async fn fail_fan_out(
        &self,
        route: &Route,
        control: &Control,
        manifest: &Manifest,
        message: &str,
    ) -> RunError {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pieces_follow_the_estimated_spill_or_the_setting() {
        // 10 GB of parts ≈ 100M rows ≈ 36 GB of spill: 5 pieces of a 9 GB limit (+25%).
        let limit = 9 << 30;
        assert_eq!(pieces_for(10_000_000_000, Some(limit), None), Some(5));
        assert_eq!(pieces_for(1_000_000, Some(limit), None), None);
        assert_eq!(pieces_for(1_000_000, None, None), None);
        assert_eq!(pieces_for(1_000, Some(limit), Some(4)), Some(4));
        assert_eq!(pieces_for(1_000, Some(limit), Some(1)), None);
    }

    #[test]
    fn compressed_parts_are_estimated_as_text() {
        use super::super::{GZIP_EXPANSION, PARQUET_EXPANSION, text_bytes};
        assert_eq!(text_bytes("in/a.csv", 1_000), 1_000);
        assert_eq!(text_bytes("in/a.csv.gz", 1_000), 1_000 * GZIP_EXPANSION);
        assert_eq!(text_bytes("in/a.CSV.GZIP", 1_000), 5_000);
        assert_eq!(text_bytes("in/a.tar.gz", 1_000), 5_000);
        assert_eq!(text_bytes("in/a.zip", 1_000), 5_000);
        assert_eq!(text_bytes("in/a.csv.bz2", 1_000), 6_000);
        assert_eq!(text_bytes("in/a.csv.zst", 1_000), 6_000);
        assert_eq!(text_bytes("in/a.parquet", 1_000), 1_000 * PARQUET_EXPANSION);
        assert_eq!(text_bytes("in/gz/a.json", 1_000), 1_000);
        // 2 GB of gzip parts: as stored they would seem to fit a 9 GB spill (7.2 GB); as
        // text (~10 GB, ~100M rows) they need 5 pieces.
        let limit = 9 << 30;
        assert_eq!(pieces_for(2_000_000_000, Some(limit), None), None);
        let text = text_bytes("e.csv.gz", 2_000_000_000);
        assert_eq!(pieces_for(text, Some(limit), None), Some(5));
    }

    #[test]
    fn an_overflow_splits_by_what_was_measured() {
        // Stopped at a 1 GiB limit after 1M rows from 100 MB of gzip parts (0.01 rows per
        // part byte), 1,100 bytes per row spilled: 5 GB of parts → 50M rows → 55 GB of
        // spill, half again → 77 pieces of 1 GiB.
        let o = SpillOverflow {
            limit_bytes: 1 << 30,
            written_bytes: 1 << 30,
            rows_read: 1_000_000,
            rows_spilled: 1_000_000,
            record_bytes: 1_100_000_000,
            source_bytes_read: 100_000_000,
            parts_bytes: 5_000_000_000,
        };
        assert_eq!(o.projected_spill(o.parts_bytes), 55_000_000_000);
        assert_eq!(pieces_measured(&o, o.parts_bytes, 1 << 30), 77);
        // A piece keeping a quarter of the rows projects a quarter of the spill.
        let piece = SpillOverflow {
            rows_spilled: 250_000,
            record_bytes: 275_000_000,
            ..o
        };
        assert_eq!(piece.projected_spill(o.parts_bytes), 13_750_000_000);
        let text = SpillOverflow {
            parts_bytes: o.parts_bytes,
            ..piece
        }
        .to_string();
        assert!(
            text.contains("for this run's ranges of the export"),
            "{text}"
        );
        // Never fewer than 2, never more than the ranges a state can have.
        let tiny = SpillOverflow {
            record_bytes: 10,
            written_bytes: 10,
            ..o
        };
        assert_eq!(pieces_measured(&tiny, 0, 1 << 30), 2);
        assert_eq!(pieces_measured(&o, u64::MAX / 2, 1), MAX_PIECES);
        assert!(o.to_string().contains("more than the 1.0 GB"), "{o}");
        assert!(
            o.to_string().contains("about 51.2 GB for the whole export"),
            "{o}"
        );
        assert!(o.to_string().contains("EphemeralStorage"), "{o}");
    }

    #[test]
    fn estimated_pieces_get_even_spans() {
        for (ranges, pieces, want) in [(8, 3, 4), (4, 3, 4), (16, 5, 6), (16, 4, 4), (2, 4, 2)] {
            let n = even_pieces(ranges, pieces);
            assert_eq!(n, want, "{ranges} ranges, {pieces} pieces");
            let widest = spans(ranges, n).iter().map(|s| s.len()).max().unwrap();
            assert!(
                widest * pieces.min(ranges) <= ranges,
                "{ranges}/{pieces}: {widest}"
            );
        }
        for ranges in [1usize, 7, 64, 1024, 65_536] {
            for pieces in 2..40 {
                let n = even_pieces(ranges, pieces);
                let widest = spans(ranges, n).iter().map(|s| s.len()).max().unwrap();
                assert!(widest <= (ranges / pieces).max(1), "{ranges}/{pieces}");
            }
        }
    }

    #[test]
    fn the_manifest_keeps_the_parts_as_object_metadata() {
        let parts = vec![ObjectMeta {
            key: "in/a.csv".into(),
            etag: "e1".into(),
            size: 10,
            version_id: Some("v1".into()),
            last_modified: Some("2026-12-01T00:00:00Z".into()),
            metadata: BTreeMap::from([("k".to_string(), "v".to_string())]),
        }];
        let m = Manifest {
            bucket: "exports".into(),
            trigger_key: "in/a.csv".into(),
            trigger_meta: parts[0].clone(),
            parts: parts.clone(),
            ..Manifest::default()
        };
        let back: Manifest = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.plan().parts, parts);
        // A part written with fewer fields reads with the rest empty.
        let v = json!({"parts": [{"key": "in/b.csv", "etag": "e2", "size": 3}]});
        let m: Manifest = serde_json::from_value(v).unwrap();
        assert_eq!((m.parts[0].key.as_str(), m.parts[0].size), ("in/b.csv", 3));
        assert_eq!(m.parts[0].version_id, None);
    }

    #[test]
    fn spans_cover_every_range_once() {
        let s = spans(16, 4);
        assert_eq!(s, vec![0..4, 4..8, 8..12, 12..16]);
        let s = spans(8, 3);
        assert_eq!(s, vec![0..2, 2..5, 5..8]);
        assert_eq!(spans(2, 4), vec![0..1, 1..2]);
    }
}
