//! One attempt at a piece at a time ([`crate::state::piece_attempt`]), as the pieces and the
//! finalizer use it:
//!
//! - every delivery of a piece claims it under the route lock before it reads or writes
//!   anything of the piece (its fork, `done.json`, `final.json`), keeps the claim alive with
//!   the route lock and releases it when it stops; a piece handed over at its deadline names
//!   its attempt in the message it queues (`handed_by`), whose delivery takes that claim over
//!   at once instead of meeting it still alive;
//! - a delivery that meets another attempt's live claim leaves the piece to it. It
//!   acknowledges when the piece is done and what is left of it is another message's (not
//!   every piece is done yet, so the last one to finish finalizes; or `final.json` names
//!   another piece): the piece's `done.json` is the durable record, and its figures are in the
//!   fan-out's combined report. Otherwise it comes back later (retryable): the live attempt
//!   may be finalizing, or may die, and this message may be the one that goes on from it;
//! - the finalizer does not wait for checkpoint segments a fork's head still names when no
//!   live attempt of that piece is left to commit them: it claims the piece (or holds it: its
//!   own piece) and folds them into the fork's ranges, keeping what Braze confirmed and what
//!   the dead attempt marked unknown, then merges.

use std::ops::Range;

use serde_json::Value;
use tracing::{info, warn};

use super::control::{Control, FanOut, FinalDoc, Manifest, PieceDone, ack};
use super::state_err;
use crate::config::route::Route;
use crate::run::handler::RunError;
use crate::run::runner::SyncRunner;
use crate::run::runner::hand_over::PieceMessage;
use crate::state::piece_attempt::{ATTEMPT_OBJECT, Claimed, PieceAttempt};
use crate::state::store::{CONTROL_FOLDER, Head, HeadDoc, StateError, StateStore};

/// This delivery's attempt at its piece.
pub(super) struct Me {
    /// The piece.
    pub piece: usize,
    /// The attempt's name (`<run id>-p<k>-<nonce>`), the holder of its claim.
    pub holder: String,
}

/// What claiming a piece came to.
pub(super) enum Attempt {
    /// The piece is this delivery's.
    Held(Me, PieceAttempt),
    /// Another attempt's claim is alive: this delivery's answer.
    Answer(Result<Value, RunError>),
}

fn claim_uri(control: &Control, piece: usize) -> bridge_shared::S3Uri {
    control.uri(&format!("{}/{ATTEMPT_OBJECT}", Control::piece_name(piece)))
}

impl SyncRunner {
    /// Claims `msg`'s piece for this delivery (see the module docs).
    pub(super) async fn claim_piece(
        &self,
        fan: &FanOut<'_>,
        msg: &PieceMessage,
    ) -> Result<Attempt, RunError> {
        let holder = format!(
            "{}-{}-{:08x}",
            msg.run_id,
            Control::piece_name(msg.piece),
            crate::clock::nonce()
        );
        let now = crate::clock::now().timestamp_millis();
        let uri = claim_uri(fan.control, msg.piece);
        let (store, lease_s) = (self.store.clone(), self.settings.route_lease_s);
        let claimed = match &msg.handed_by {
            Some(from) => PieceAttempt::claim_from(store, uri, from, &holder, now, lease_s).await,
            None => PieceAttempt::claim(store, uri, &holder, now, lease_s).await,
        }
        .map_err(|e| RunError::Retryable(e.to_string()))?;
        match claimed {
            Claimed::Held(c) => Ok(Attempt::Held(
                Me {
                    piece: msg.piece,
                    holder,
                },
                c,
            )),
            Claimed::Busy(other) => Ok(Attempt::Answer(self.busy_answer(fan, msg, &other).await)),
        }
    }

    /// A delivery that met another attempt's live claim: acknowledged when what is left of
    /// the piece is another message's, else it comes back later.
    async fn busy_answer(
        &self,
        fan: &FanOut<'_>,
        msg: &PieceMessage,
        other: &str,
    ) -> Result<Value, RunError> {
        let name = Control::piece_name(msg.piece);
        let done: Option<PieceDone> = fan.control.get_json(&format!("{name}/done.json")).await?;
        if done.is_some() {
            let others = match fan.control.get_json::<FinalDoc>("final.json").await? {
                Some(f) => f.finalizer != msg.piece,
                None => fan.control.done().await?.len() < fan.manifest.pieces.len(),
            };
            if others {
                info!(
                    route = fan.route.name(),
                    piece = msg.piece,
                    attempt = other,
                    "A duplicate delivery of a finished fan-out piece is acknowledged; its done.json records the piece."
                );
                return Ok(ack(msg, "piece_done"));
            }
        }
        Err(RunError::Retryable(format!(
            "fan-out piece {} has a live attempt ({other}): this delivery leaves the piece to it and comes back later",
            msg.piece
        )))
    }

    /// Ends this delivery's claim: released, and deleted when the fan-out ended meanwhile
    /// (its control objects went, perhaps before this claim was written).
    pub(super) async fn end_attempt(&self, control: &Control, me: &Me, claim: PieceAttempt) {
        match claim.release().await {
            Ok(()) | Err(bridge_shared::lease::LeaseError::Lost { .. }) => {}
            Err(e) => {
                warn!(error = %e, "Could not release a fan-out piece's attempt claim; it expires by itself.");
            }
        }
        if let Ok(None) = control.get_json::<Manifest>("manifest.json").await {
            let name = format!("{}/{ATTEMPT_OBJECT}", Control::piece_name(me.piece));
            control.delete(&name).await;
        }
    }

    /// The forks' heads, in piece order with their spans. With `settle` (this attempt, about
    /// to merge), each without checkpoint segments: a fork whose head still names some has
    /// them folded in when no live attempt of its piece is left
    /// ([`SyncRunner::take_in_dead_attempt`]); a live attempt's are waited for (retryable).
    pub(super) async fn fork_heads(
        &self,
        fan: &FanOut<'_>,
        state: &StateStore,
        settle: Option<&Me>,
    ) -> Result<Vec<(Range<usize>, HeadDoc)>, RunError> {
        let manifest = fan.manifest;
        let n = manifest.pieces.len();
        let mut forks = Vec::with_capacity(n);
        for k in 0..n {
            let fork = state.fork(&format!(
                "{CONTROL_FOLDER}/{}/{}",
                manifest.run_id,
                Control::piece_name(k)
            ));
            let mut h = fork.read_head().await.map_err(state_err)?;
            if let Some(me) = settle
                && !h.doc.segments.is_empty()
            {
                h = self.take_in_dead_attempt(fan, k, &fork, me).await?;
            }
            forks.push((manifest.span(k).unwrap_or(0..0), h.doc));
        }
        Ok(forks)
    }

    /// Folds the checkpoint segments fork `k`'s head names into its ranges, under piece `k`'s
    /// claim (this attempt's own, or taken for the fold when no attempt holds it alive);
    /// returns the fork's head after it.
    async fn take_in_dead_attempt(
        &self,
        fan: &FanOut<'_>,
        k: usize,
        fork: &StateStore,
        me: &Me,
    ) -> Result<Head, RunError> {
        let taken = match k == me.piece {
            true => None,
            false => {
                let now = crate::clock::now().timestamp_millis();
                let uri = claim_uri(fan.control, k);
                let lease_s = self.settings.route_lease_s;
                match PieceAttempt::claim(self.store.clone(), uri, &me.holder, now, lease_s)
                    .await
                    .map_err(|e| RunError::Retryable(e.to_string()))?
                {
                    Claimed::Held(c) => Some(c),
                    Claimed::Busy(other) => {
                        return Err(RunError::Retryable(format!(
                            "the fork of piece {k} still has checkpoint segments of a live attempt ({other}); the finalizer is retried once it has committed"
                        )));
                    }
                }
            }
        };
        let mut head = fork.read_head().await.map_err(state_err)?;
        let folded = self
            .fold_checkpoints(fork, &mut head, fan.route, &me.holder)
            .await;
        if let Some(c) = taken
            && let Err(e) = c.release().await
        {
            warn!(piece = k, error = %e, "Could not release a fan-out piece's attempt claim; it expires by itself.");
        }
        folded.map_err(state_err)?;
        info!(
            route = fan.route.name(),
            piece = k,
            "Took a dead attempt's checkpoints into its piece's fork."
        );
        Ok(head)
    }

    /// Folds the checkpoint segments `fork`'s head names into its range deltas (nothing when
    /// it names none).
    pub(super) async fn fold_checkpoints(
        &self,
        fork: &StateStore,
        head: &mut Head,
        route: &Route,
        tag: &str,
    ) -> Result<(), StateError> {
        if head.doc.segments.is_empty() {
            return Ok(());
        }
        let dir =
            crate::state::spill::SpillDir::create(&self.settings.spill_dir, &format!("{tag}-fold"))
                .map_err(StateError::from)?;
        let users = head.doc.users;
        fork.commit_ranged(head, route, None, users, dir.path())
            .await
            .map(|_| ())
    }
}
