//! Stage 3 of a run: the committer. It follows the sender's outcomes, persists what Braze
//! confirmed as a checkpoint segment every few seconds, collects what Braze refused, and at
//! the end folds the run into a new base ([`StateStore::commit`]). Nothing else moves state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::warn;

use crate::model::{DeliveryOutcome, UserDelta};
use crate::rejects::RowReject;
use crate::route::Route;
use crate::snapshot::Snapshot;
use crate::snapshot::store::{Head, StateStore, Watermark};

/// The committer of one run.
pub(super) struct Committer {
    state: StateStore,
    head: Head,
    route: Arc<Route>,
    every: Duration,
    pending: Vec<UserDelta>,
    /// Users Braze confirmed.
    pub confirmed: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// The first checkpoint failure; nothing is persisted after it.
    pub checkpoint_error: Option<String>,
    /// Users Braze refused, for the rejects object.
    pub braze_rejects: Vec<RowReject>,
}

impl Committer {
    /// A committer over the loaded `head`.
    pub fn new(state: StateStore, head: Head, route: Arc<Route>, every: Duration) -> Self {
        Self {
            state,
            head,
            route,
            every,
            pending: Vec::new(),
            confirmed: 0,
            checkpoints: 0,
            checkpoint_error: None,
            braze_rejects: Vec::new(),
        }
    }

    /// Follows the outcomes until the sender closes the channel, checkpointing every `every`.
    pub async fn follow(&mut self, mut outcomes: mpsc::Receiver<DeliveryOutcome>) {
        let mut last = Instant::now();
        let mut tick = tokio::time::interval(self.every);
        loop {
            tokio::select! {
                outcome = outcomes.recv() => match outcome {
                    Some(DeliveryOutcome::Confirmed(d)) => {
                        self.confirmed += 1;
                        self.pending.push(d);
                    }
                    Some(DeliveryOutcome::Rejected { delta, reason }) => {
                        self.braze_rejects.push(RowReject::from_braze(&delta, &reason));
                    }
                    Some(DeliveryOutcome::Unsent(_)) => {}
                    None => break,
                },
                _ = tick.tick() => {}
            }
            if !self.pending.is_empty() && last.elapsed() >= self.every {
                self.checkpoint().await;
                last = Instant::now();
            }
        }
        self.checkpoint().await;
    }

    /// Persists the confirmed users not yet persisted (after a failure: nothing more).
    async fn checkpoint(&mut self) {
        if self.pending.is_empty() || self.checkpoint_error.is_some() {
            return;
        }
        match self
            .state
            .checkpoint(&mut self.head, &self.route, &self.pending)
            .await
        {
            Ok(()) => {
                self.checkpoints += 1;
                self.pending.clear();
            }
            Err(e) => {
                warn!(route = self.route.name(), error = %e, "Checkpoint failed; confirmed users of this window will be re-sent by the retry.");
                self.checkpoint_error = Some(e.to_string());
            }
        }
    }

    /// Folds this run's segments into a new base, moving the watermark when one is given.
    /// Returns why it could not, if it could not. After a checkpoint failure nothing is
    /// committed (the retry re-reads the state).
    pub async fn commit(
        &mut self,
        snapshot: Arc<Snapshot>,
        watermark: Option<Watermark>,
    ) -> Option<String> {
        if self.checkpoint_error.is_some() {
            return None;
        }
        // The producer has been joined, so the run holds the only reference.
        match Arc::try_unwrap(snapshot) {
            Ok(snap) => self
                .state
                .commit(&mut self.head, snap, watermark)
                .await
                .err()
                .map(|e| e.to_string()),
            Err(_) => {
                Some("state snapshot still shared after the reader ended; not committed".into())
            }
        }
    }
}
