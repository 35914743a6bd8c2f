//! A piece message: join the fan-out's route lock, claim the piece for this attempt
//! ([`super::attempt`]), diff the piece's span of the state's ranges, send, commit into the
//! piece's own fork, write `p<k>/done.json` (or hand the piece over at its deadline), and let
//! the last piece to finish become the finalizer.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bridge_shared::{PutCondition, StoreError};
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::attempt::{Attempt, Me};
use super::control::{Control, FanOut, FinalDoc, Manifest, PieceDone, ack};
use super::{MAX_PIECES, STALLED_LIMIT, pieces_measured, state_err, store_err};
use crate::config::route::Route;
use crate::diff::export::ProduceOptions;
use crate::model::{DeliveryOutcome, UserDelta};
use crate::run::handler::RunError;
use crate::run::runner::SyncRunner;
use crate::run::runner::committer::{Committer, Gate};
use crate::run::runner::conclude::{Ended, RunRecord};
use crate::run::runner::hand_over::PieceMessage;
use crate::run::runner::producer::{BoundedDiff, Diff, Producer};
use crate::run::runner::sender::Sender;
use crate::send::deliver::DeliverError;
use crate::state::lease;
use crate::state::route_lock::{Joined, RouteLock, lock_uri, read_lock};
use crate::state::store::{CONTROL_FOLDER, Head, StateStore};

/// What a piece leaves the route lock to.
pub(super) enum LockAfter {
    /// Other pieces still run: leave the shared lease to them.
    Keep,
    /// The fan-out is over (finalized, or failed): let the route go.
    Release,
}

/// One piece's run, once its fork is open: the fork, its head, the piece's record and id.
struct PieceRun {
    fork: StateStore,
    head: Head,
    record: RunRecord,
    /// `<run id>-p<k>`: the piece's sender and spill names.
    id: String,
}

/// One piece's run once its sends are over: how it ended, the committer holding what Braze
/// confirmed, the piece's record and id.
struct PieceSent {
    ended: Ended,
    committer: Committer,
    record: RunRecord,
    id: String,
}

impl SyncRunner {
    /// Runs one piece message (see the module docs).
    pub(in crate::run::runner) async fn piece(
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
        let control = self.control(route.name(), &msg.run_id);
        let s = &self.settings;
        let uri = lock_uri(&s.state_bucket, &s.state_prefix, route.name());
        if let Ok(None) = control.get_json::<Manifest>("manifest.json").await {
            // The fan-out ended (finished, failed or void) before this message came back:
            // nothing to do, and no need to wait for the route lock, unless it still holds it
            // (an end cut short: its rest is done under the lock below).
            let held = read_lock(self.store.as_ref(), &uri)
                .await
                .ok()
                .flatten()
                .is_some_and(|l| l.holder == msg.run_id && !l.released);
            if !held {
                return Ok(ack(&msg, "fan_out_over"));
            }
        }
        let now = crate::clock::now().timestamp_millis();
        let joined = RouteLock::join(self.store.clone(), uri, &msg.run_id, now, s.fan_out_lease_s)
            .await
            .map_err(|e| RunError::Retryable(e.to_string()))?;
        let mut lock = match joined {
            Joined::Held(l) => l,
            Joined::Ended => return Ok(ack(&msg, "fan_out_over")),
            Joined::Busy(holder) => {
                return Err(RunError::Retryable(format!(
                    "route {} is locked by {holder}, not by fan-out run {}; the piece waits",
                    route.name(),
                    msg.run_id
                )));
            }
        };
        let manifest: Manifest = match control.get_json("manifest.json").await {
            Ok(Some(m)) => m,
            Ok(None) => {
                // A fan-out already ended (a late redelivery, or an end cut short): what is
                // left of its control objects goes, and the route is given back.
                self.clean_left(&route, &control).await;
                if let Err(e) = lock.release().await {
                    warn!(error = %e, "Could not release the route lock; it expires by itself.");
                }
                return Ok(ack(&msg, "fan_out_over"));
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
        let fan = FanOut {
            route: &route,
            control: &control,
            manifest: &manifest,
        };
        // One attempt at the piece at a time: a duplicate delivery leaves it to a live one.
        let (me, mut claim) = match self.claim_piece(&fan, &msg).await? {
            Attempt::Held(me, claim) => (me, claim),
            Attempt::Answer(answer) => return answer,
        };
        let (lost_tx, lost_rx) = watch::channel(None);
        let work = self.piece_locked(&fan, &msg, &me, remaining_ms, lost_rx);
        let work = lease::keep_lock(work, &mut claim, &lost_tx);
        let result = lease::keep_lock(work, &mut lock, &lost_tx).await;
        let (after, result) = match result {
            Ok((after, v)) => (after, Ok(v)),
            // A permanent failure (an unreadable control object) ends the fan-out, so it never
            // holds the route until its lease runs out.
            Err((LockAfter::Keep, RunError::Permanent { message, .. })) => {
                let e = self.fail_fan_out(&fan, &message).await;
                (LockAfter::Release, Err(e))
            }
            Err((after, e)) => (after, Err(e)),
        };
        self.end_attempt(&control, &me, claim).await;
        if let LockAfter::Release = after
            && let Err(e) = lock.release().await
        {
            warn!(route = route.name(), error = %e, "Could not release the route lock; it expires by itself.");
        }
        result
    }

    /// A piece under the route lock and its attempt claim: run it unless it is done, then
    /// finalize if it is last.
    async fn piece_locked(
        &self,
        fan: &FanOut<'_>,
        msg: &PieceMessage,
        me: &Me,
        remaining_ms: Option<u64>,
        lost: watch::Receiver<Option<String>>,
    ) -> Result<(LockAfter, Value), (LockAfter, RunError)> {
        let keep = |e| (LockAfter::Keep, e);
        let Some(span) = fan.manifest.span(msg.piece) else {
            return Ok((LockAfter::Keep, ack(msg, "no_such_piece")));
        };
        let name = Control::piece_name(msg.piece);
        let done: Option<PieceDone> = fan
            .control
            .get_json(&format!("{name}/done.json"))
            .await
            .map_err(keep)?;
        if done.is_none() {
            match self
                .run_piece_work(fan, (msg, me), span, remaining_ms, lost.clone())
                .await
            {
                Ok(Some(v)) => return Ok((LockAfter::Keep, v)),
                Ok(None) => {}
                Err(RunError::Permanent { message, .. }) => {
                    let why = format!("piece {}: {message}", msg.piece);
                    let e = self.fail_fan_out(fan, &why).await;
                    return Err((LockAfter::Release, e));
                }
                Err(e) => return Err(keep(e)),
            }
        }
        // Done: the last piece to finish becomes the finalizer.
        let Some(fin) = self.claim_final(fan, msg).await.map_err(keep)? else {
            return Ok((LockAfter::Keep, ack(msg, "piece_done")));
        };
        match self.finalize(fan, fin, me, remaining_ms, lost).await {
            Ok(v) => Ok((LockAfter::Release, v)),
            Err(RunError::Permanent { message, .. }) => {
                let e = self.fail_fan_out(fan, &message).await;
                Err((LockAfter::Release, e))
            }
            Err(e) => Err(keep(e)),
        }
    }

    /// `final.json` for this piece when every piece is done and it wins the conditional create,
    /// or it names this piece already: an earlier attempt of the piece claimed it and died (or
    /// lost its attempt claim, and stops at its next renewal), since this attempt holds the
    /// piece's claim; `None`: another piece finalizes, or some piece is not done yet.
    async fn claim_final(
        &self,
        fan: &FanOut<'_>,
        msg: &PieceMessage,
    ) -> Result<Option<FinalDoc>, RunError> {
        let finished = fan.control.done().await?;
        if finished.len() < fan.manifest.pieces.len() {
            return Ok(None);
        }
        let claim = FinalDoc {
            finalizer: msg.piece,
            merged: false,
            concluded: false,
        };
        let body = Bytes::from(serde_json::to_vec(&claim).unwrap_or_default());
        match fan
            .control
            .put("final.json", body, PutCondition::IfAbsent)
            .await
        {
            Ok(()) => Ok(Some(claim)),
            Err(StoreError::PreconditionFailed { .. }) => {
                match fan.control.get_json::<FinalDoc>("final.json").await? {
                    // An earlier attempt of this piece finalized and is gone: go on from it.
                    Some(f) if f.finalizer == msg.piece => Ok(Some(f)),
                    _ => Ok(None),
                }
            }
            Err(e) => Err(store_err(e)),
        }
    }

    /// One piece's diff, send and commit into its fork. `Ok(None)`: done (its `done.json`
    /// written); `Ok(Some(_))`: handed over to a later invocation.
    async fn run_piece_work(
        &self,
        fan: &FanOut<'_>,
        (msg, me): (&PieceMessage, &Me),
        span: Range<usize>,
        remaining_ms: Option<u64>,
        lost: watch::Receiver<Option<String>>,
    ) -> Result<Option<Value>, RunError> {
        let s = &self.settings;
        let run = self.open_piece(fan, msg).await?;
        let dep_path = s.spill_dir.join(format!("{}-departures.bin", run.id));
        let PieceSent {
            mut ended,
            mut committer,
            record,
            id,
        } = self
            .send_piece(fan, run, span, &dep_path, remaining_ms, lost)
            .await?;
        if let Some(e) = piece_error(&mut ended, &committer, fan.manifest) {
            return Err(e);
        }
        // Confirmed users go into the fork's range deltas, never with a watermark.
        let users = committer.users_before();
        if let Some(e) = committer
            .commit_ranged(users, &s.spill_dir, &format!("{id}-commit"), None)
            .await
        {
            return Err(RunError::Retryable(e));
        }
        if ended.unsent() {
            return self.hand_piece_over(fan, msg, me, &ended).await.map(Some);
        }
        self.record_piece_done(fan, msg, record, &mut ended, &committer, &dep_path)
            .await?;
        Ok(None)
    }

    /// The piece's fork, opened after checking the fan-out is still valid (the route head
    /// did not move), with a killed attempt's checkpoints folded into its range deltas.
    async fn open_piece(&self, fan: &FanOut<'_>, msg: &PieceMessage) -> Result<PieceRun, RunError> {
        let s = &self.settings;
        let manifest = fan.manifest;
        let name = Control::piece_name(msg.piece);
        let state = self.state(fan.route);
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
        let id = format!("{}-{name}", msg.run_id);
        let mut record = RunRecord::new(&plan, fan.route.name(), s);
        record.run_id = id.clone();
        record.report.run_id = id.clone();
        // A killed attempt's checkpoints (this attempt holds the piece's claim, so no other
        // works on the fork): folded into the fork's range deltas first.
        self.fold_checkpoints(&fork, &mut head, fan.route, &id)
            .await
            .map_err(state_err)?;
        Ok(PieceRun {
            fork,
            head,
            record,
            id,
        })
    }

    /// Diffs the piece's span against its fork and sends what changed (departures deferred
    /// to `dep_path`), the committer following Braze's answers into the fork.
    async fn send_piece(
        &self,
        fan: &FanOut<'_>,
        run: PieceRun,
        span: Range<usize>,
        dep_path: &std::path::Path,
        remaining_ms: Option<u64>,
        lost: watch::Receiver<Option<String>>,
    ) -> Result<PieceSent, RunError> {
        let s = &self.settings;
        let route: &Arc<Route> = fan.route;
        let plan = fan.manifest.plan();
        let mut opts = ProduceOptions::for_route(route, &plan.trigger.to_string());
        opts.full_resend |= plan.force_full;
        opts.resend_salt = plan.resend_salt(route.config.full_resend);
        opts.allow_departures = plan.allow_departures;
        let mut ranged = self.ranged_settings(&run.head.doc, route, &run.id);
        ranged.only_ranges = Some(span);
        ranged.defer_departures = true;
        ranged.departures_file = Some(PathBuf::from(dep_path));
        // Producer -> committer's gate (intents, into the fork) -> sender -> committer.
        let (delta_tx, delta_rx) = mpsc::channel::<UserDelta>(s.channel_capacity);
        let (send_tx, send_rx) = mpsc::channel::<UserDelta>(s.channel_capacity);
        let (out_tx, out_rx) = mpsc::channel::<DeliveryOutcome>(s.channel_capacity);
        let diff = Diff::Bounded(Box::new(BoundedDiff {
            state: run.fork.clone(),
            doc: run.head.doc.clone(),
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
        let share = self.workspace_share(route.name(), &run.id);
        let sender = Sender::start(self.api.clone(), dcfg, send_rx, out_tx, share);
        let mut committer = Committer::new(run.fork, run.head, route.clone(), s.checkpoint_every)
            .with_max_pending(s.checkpoint_max_users)
            .with_max_pending_bytes(crate::run::runner::sizing::pending_memory(
                s.memory_limit_bytes,
            ))
            .with_ahead(s.channel_capacity);
        committer
            .follow_gated(Gate::new(delta_rx, send_tx), out_rx, lost)
            .await;
        let delivery = sender.finish().await?;
        let produced = producer.finish().await?;
        Ok(PieceSent {
            ended: Ended { produced, delivery },
            committer,
            record: run.record,
            id: run.id,
        })
    }

    /// A piece cut short by its deadline: the same piece goes on in a later invocation, from
    /// its fork's state, unless its last [`STALLED_LIMIT`] invocations confirmed nobody.
    async fn hand_piece_over(
        &self,
        fan: &FanOut<'_>,
        msg: &PieceMessage,
        me: &Me,
        ended: &Ended,
    ) -> Result<Value, RunError> {
        let Some(c) = &self.continuation else {
            return Err(RunError::Retryable(
                "piece cut short by its deadline".into(),
            ));
        };
        // What it sent goes with the message, for the piece's report.
        let mut next = msg.clone();
        // Queueing it is this attempt's last act: the next one takes its claim over at once.
        next.handed_by = Some(me.holder.clone());
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
                    fan.manifest.pieces.len()
                ),
                report: None,
            });
        }
        c.queue_piece(&next)
            .await
            .map_err(|e| RunError::Retryable(format!("could not hand the piece over: {e}")))?;
        info!(
            route = fan.route.name(),
            piece = msg.piece,
            "Fan-out piece handed over before its deadline."
        );
        Ok(ack(msg, "piece_handed_over"))
    }

    /// A finished piece's figures and removals: `p<k>/departures.bin` (if any), then
    /// `p<k>/done.json`.
    async fn record_piece_done(
        &self,
        fan: &FanOut<'_>,
        msg: &PieceMessage,
        mut record: RunRecord,
        ended: &mut Ended,
        committer: &Committer,
        dep_path: &std::path::Path,
    ) -> Result<(), RunError> {
        let s = &self.settings;
        let name = Control::piece_name(msg.piece);
        ended
            .account(&mut record, committer, self.store.as_ref(), s)
            .await;
        if let Some(c) = &msg.carried {
            c.apply(&mut record.report);
        }
        let departures_bytes = std::fs::metadata(dep_path).map_or(0, |m| m.len());
        if departures_bytes > 0 {
            self.store
                .put_file(
                    &fan.control.uri(&format!("{name}/departures.bin")),
                    dep_path,
                    PutCondition::None,
                    BTreeMap::new(),
                )
                .await
                .map_err(store_err)?;
        }
        let _ = std::fs::remove_file(dep_path);
        let done = PieceDone {
            piece: msg.piece,
            report: record.report.clone(),
            departures_bytes,
        };
        let body = Bytes::from(serde_json::to_vec_pretty(&done).unwrap_or_default());
        fan.control
            .put(&format!("{name}/done.json"), body, PutCondition::None)
            .await
            .map_err(store_err)?;
        info!(
            route = fan.route.name(),
            piece = msg.piece,
            users_sent = record.report.users_sent,
            "Fan-out piece done."
        );
        Ok(())
    }
}

/// Why a piece's run cannot go on, if it cannot: the committer's or the sender's failure, a
/// spill that still overflows (the fan-out ends with the number of pieces the measured
/// figures call for), or an export that could not be read.
fn piece_error(ended: &mut Ended, committer: &Committer, manifest: &Manifest) -> Option<RunError> {
    if let Some(e) = &committer.failure {
        return Some(RunError::Retryable(e.clone()));
    }
    if let Some(e) = &ended.delivery.error {
        return Some(match e {
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
        return Some(RunError::Permanent {
            message: format!(
                "its share of the export (one of {n} pieces) still overflows: {o}. A piece is not split again, so the fan-out ends here; replay the export with BRIDGE_FAN_OUT_PIECES={} (or more), or raise the ephemeral storage",
                want.min(MAX_PIECES)
            ),
            report: None,
        });
    }
    ended.read_error().map(|e| {
        if e.is_retryable() {
            RunError::Retryable(e.to_string())
        } else {
            RunError::Permanent {
                message: e.to_string(),
                report: None,
            }
        }
    })
}
