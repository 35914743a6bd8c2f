//! Stage 3 of a run: the committer. It follows the sender's outcomes, persists what Braze
//! confirmed as a checkpoint segment every few seconds, collects what Braze refused, and at
//! the end folds the run into a new base ([`StateStore::commit`]). Nothing else moves state.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::warn;

use crate::config::route::Route;
use crate::diff::rejects::{RejectLog, RowReject};
use crate::model::{DeliveryOutcome, UserDelta};
use crate::state::confirmed::Snapshot;
use crate::state::store::{Head, StateStore, Watermark};

/// Users pending that force a checkpoint by default. Recorded row digests are not paced by
/// Braze's rate limit: a run recording them for every user of a big route (its first run
/// after a state without digests, or after a mapping change) confirms a million a second, so
/// time alone would hold millions of deltas in memory between checkpoints.
pub const DEFAULT_MAX_PENDING: usize = 50_000;

/// Bytes of Braze's refusals one run keeps for its rejects object (every refusal is counted).
pub const BRAZE_REJECTS_MAX_BYTES: usize = 16 * 1024 * 1024;

/// The committer of one run.
pub(super) struct Committer {
    state: StateStore,
    head: Head,
    route: Arc<Route>,
    every: Duration,
    /// Users pending that force a checkpoint before `every` has passed.
    max_pending: usize,
    /// Bytes the pending users may hold before a checkpoint ([`held_bytes`]).
    max_pending_bytes: usize,
    pending: Vec<UserDelta>,
    /// What `pending` holds ([`held_bytes`] of each).
    pending_bytes: usize,
    /// The most `pending` held at once.
    pub peak_pending_bytes: usize,
    /// Users Braze confirmed.
    pub confirmed: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Why the committer stopped early (a failed checkpoint, a lost route lock); nothing is
    /// persisted after it, and the sender is stopped.
    pub failure: Option<String>,
    /// Users Braze refused, for the rejects object: counted all, kept up to
    /// [`BRAZE_REJECTS_MAX_BYTES`], so a route Braze refuses wholesale cannot exhaust memory.
    pub braze_rejects: RejectLog,
}

impl Committer {
    /// A committer over the loaded `head`.
    pub fn new(state: StateStore, head: Head, route: Arc<Route>, every: Duration) -> Self {
        Self {
            state,
            head,
            route,
            every,
            max_pending: DEFAULT_MAX_PENDING,
            max_pending_bytes: super::sizing::DEFAULT_MAX_PENDING_BYTES,
            pending: Vec::new(),
            pending_bytes: 0,
            peak_pending_bytes: 0,
            confirmed: 0,
            checkpoints: 0,
            failure: None,
            braze_rejects: RejectLog::new(BRAZE_REJECTS_MAX_BYTES),
        }
    }

    /// Checkpoints as soon as `n` users are pending, whatever the time.
    pub fn with_max_pending(mut self, n: usize) -> Self {
        self.max_pending = n.max(1);
        self
    }

    /// Checkpoints as soon as the pending users hold `bytes` ([`held_bytes`]), whatever the
    /// time: the committer's share of the function's memory.
    pub fn with_max_pending_bytes(mut self, bytes: usize) -> Self {
        self.max_pending_bytes = bytes.max(1);
        self
    }

    /// Keeps a confirmed (or recorded) user for the next checkpoint.
    fn hold(&mut self, d: UserDelta) {
        let d = d.into_confirmed();
        self.pending_bytes += held_bytes(&d);
        self.peak_pending_bytes = self.peak_pending_bytes.max(self.pending_bytes);
        self.pending.push(d);
    }

    /// Follows the outcomes until the sender closes the channel, checkpointing every `every`
    /// (or sooner, once [`Committer::with_max_pending`] users are pending).
    /// A failed checkpoint, or the route lock reported lost on `lock_lost`, ends it at once:
    /// the outcomes receiver is dropped, which stops the sender after the requests in flight,
    /// so confirmed-but-unpersisted work stays within one checkpoint window.
    pub async fn follow(
        &mut self,
        mut outcomes: mpsc::Receiver<DeliveryOutcome>,
        mut lock_lost: watch::Receiver<Option<String>>,
    ) {
        let mut last = Instant::now();
        let mut tick = tokio::time::interval(self.every);
        let mut watching = true;
        loop {
            tokio::select! {
                outcome = outcomes.recv() => match outcome {
                    Some(DeliveryOutcome::Confirmed(d)) => {
                        self.confirmed += 1;
                        self.hold(d);
                    }
                    Some(DeliveryOutcome::Rejected { delta, reason }) => {
                        self.braze_rejects.push(&RowReject::from_braze(&delta, &reason));
                    }
                    Some(DeliveryOutcome::Recorded(d)) => self.hold(d),
                    Some(DeliveryOutcome::Unsent(_)) => {}
                    None => break,
                },
                changed = lock_lost.changed(), if watching => match changed {
                    Ok(()) => {
                        if let Some(why) = lock_lost.borrow().clone() {
                            self.failure = Some(why);
                        }
                    }
                    Err(_) => watching = false,
                },
                _ = tick.tick() => {}
            }
            if self.failure.is_none()
                && !self.pending.is_empty()
                && (last.elapsed() >= self.every
                    || self.pending.len() >= self.max_pending
                    || self.pending_bytes >= self.max_pending_bytes)
            {
                self.checkpoint().await;
                last = Instant::now();
            }
            if self.failure.is_some() {
                warn!(
                    route = self.route.name(),
                    "Stopping the sender: confirmed work can no longer be persisted."
                );
                return;
            }
        }
        self.checkpoint().await;
    }

    /// Persists the confirmed users not yet persisted (after a failure: nothing more).
    async fn checkpoint(&mut self) {
        if self.pending.is_empty() || self.failure.is_some() {
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
                self.pending_bytes = 0;
            }
            Err(e) => {
                warn!(route = self.route.name(), error = %e, "Checkpoint failed; confirmed users of this window will be re-sent by the retry.");
                self.failure = Some(format!("checkpoint failed, the run stopped: {e}"));
            }
        }
    }

    /// The bounded commit ([`StateStore::commit_ranged`]): folds this run's segments range by
    /// range through a spill folder under `spill_base`; `expected_users` sizes the layout.
    pub async fn commit_ranged(
        &mut self,
        expected_users: u64,
        spill_base: &std::path::Path,
        tag: &str,
        watermark: Option<Watermark>,
    ) -> Option<String> {
        if self.failure.is_some() {
            return None;
        }
        let dir = match crate::state::spill::SpillDir::create(spill_base, tag) {
            Ok(d) => d,
            Err(e) => return Some(e.to_string()),
        };
        self.state
            .commit_ranged(
                &mut self.head,
                &self.route,
                watermark,
                expected_users,
                dir.path(),
            )
            .await
            .err()
            .map(|e| e.to_string())
    }

    /// The state's users before this run.
    pub fn users_before(&self) -> u64 {
        self.head.doc.users
    }

    /// The users the ranged commit lays the state out for ([`super::sizing::layout_users`]).
    pub fn layout_users(
        &self,
        expected: u64,
        rows_read: u64,
        plan: &crate::run::handler::ExportPlan,
    ) -> u64 {
        super::sizing::layout_users(&self.head.doc, expected, rows_read, plan)
    }

    /// Folds this run's segments into a new base, moving the watermark when one is given.
    /// Returns why it could not, if it could not. After a failure (checkpoint, lost lock)
    /// nothing is committed (the retry re-reads the state).
    pub async fn commit(
        &mut self,
        snapshot: Arc<Snapshot>,
        watermark: Option<Watermark>,
    ) -> Option<String> {
        if self.failure.is_some() {
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

/// Heap and inline bytes a confirmed delta holds while it waits for a checkpoint (its
/// identifier, its changes' names, fingerprints and emptied values; 16 bytes of allocator
/// overhead per allocation).
pub fn held_bytes(d: &UserDelta) -> usize {
    const ALLOC: usize = 16;
    let id = match &d.identifier {
        crate::model::Identifier::ExternalId(s) | crate::model::Identifier::BrazeId(s) => {
            s.capacity() + ALLOC
        }
        crate::model::Identifier::UserAlias { name, label } => {
            name.capacity() + label.capacity() + 2 * ALLOC
        }
    };
    let names: usize = d.changes.iter().map(|c| c.name.capacity() + ALLOC).sum();
    std::mem::size_of::<UserDelta>()
        + id
        + d.changes.capacity() * std::mem::size_of::<crate::model::AttributeChange>()
        + ALLOC
        + names
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::{AttributeChange, Identifier, RowPos, fingerprint};
    use bridge_shared::ObjectStore;
    use bridge_shared::object_store::MemoryStore;
    use serde_json::json;

    #[tokio::test]
    async fn a_flood_of_braze_refusals_is_counted_whole_and_kept_within_its_bound() {
        let route = Arc::new(
            Route::from_toml(
                "name = \"r\"\nprefix = \"p/\"\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\n[attributes.a]\ntype = \"Integer\"\n",
                "t",
            )
            .unwrap(),
        );
        let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let state = StateStore::new(mem, "state", "s/", "r");
        let (head, _) = state.load(&route).await.unwrap();
        let mut committer = Committer::new(state, head, route, Duration::from_secs(3));
        // A small bound, so a few thousand refusals overflow it.
        committer.braze_rejects = RejectLog::new(50_000);
        let (tx, rx) = mpsc::channel(1024);
        let (_lost_tx, lost_rx) = watch::channel(None);
        let n = 5_000u64;
        let feed = tokio::spawn(async move {
            for i in 0..n {
                let delta = UserDelta {
                    identifier: Identifier::ExternalId(format!("user-{i:08}")),
                    pos: RowPos::default(),
                    changes: vec![AttributeChange {
                        name: "a".into(),
                        value: json!(i),
                        fingerprint: Some(fingerprint(&json!(i))),
                    }],
                    update_existing_only: true,
                    is_new: false,
                    row_digest: None,
                };
                let reason = "Braze refused the object: the attribute's type is wrong".into();
                tx.send(DeliveryOutcome::Rejected { delta, reason })
                    .await
                    .unwrap();
            }
        });
        committer.follow(rx, lost_rx).await;
        feed.await.unwrap();
        let log = &committer.braze_rejects;
        assert_eq!(log.total(), n);
        assert!(log.dropped() > 0, "the flood is larger than the bound");
        assert!(log.len_bytes() <= 50_000);
    }

    #[tokio::test]
    async fn users_confirmed_at_full_pace_are_checkpointed_within_the_memory_budget() {
        let attrs: String = (0..20)
            .map(|i| format!("[attributes.attribute_{i:02}]\ntype = \"Integer\"\n"))
            .collect();
        let route = Arc::new(
            Route::from_toml(
                &format!("name = \"r\"\nprefix = \"p/\"\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\n{attrs}"),
                "t",
            )
            .unwrap(),
        );
        let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let state = StateStore::new(mem, "state", "s/", "r");
        let (head, _) = state.load(&route).await.unwrap();
        let budget = 1 << 20;
        // Time never forces a checkpoint here, and the count cap is far away: only the bytes.
        let mut committer = Committer::new(state.clone(), head, route, Duration::from_secs(3600))
            .with_max_pending_bytes(budget);
        let (tx, rx) = mpsc::channel(1024);
        let (_lost_tx, lost_rx) = watch::channel(None);
        let n = 20_000u64;
        let one = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = one.clone();
        let feed = tokio::spawn(async move {
            for i in 0..n {
                let delta = UserDelta {
                    identifier: Identifier::ExternalId(format!("user-{i:08}")),
                    pos: RowPos::default(),
                    changes: (0..20)
                        .map(|a| AttributeChange {
                            name: format!("attribute_{a:02}"),
                            value: json!(i),
                            fingerprint: Some(fingerprint(&json!(i))),
                        })
                        .collect(),
                    update_existing_only: false,
                    is_new: true,
                    row_digest: None,
                };
                // The most one user holds (values are not counted: the committer empties them).
                seen.fetch_max(held_bytes(&delta), std::sync::atomic::Ordering::Relaxed);
                tx.send(DeliveryOutcome::Confirmed(delta)).await.unwrap();
            }
        });
        committer.follow(rx, lost_rx).await;
        feed.await.unwrap();
        let per_user = one.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            per_user > 1_000,
            "a user of 20 attributes holds {per_user} bytes"
        );
        assert!(
            committer.peak_pending_bytes <= budget + per_user,
            "pending users peaked at {} bytes, over the {budget}-byte budget",
            committer.peak_pending_bytes
        );
        assert!(committer.checkpoints as usize >= n as usize * per_user / budget);
        // Nothing Braze confirmed was dropped on the way.
        assert_eq!(committer.confirmed, n);
        let (_, snap) = state.load(&committer.route).await.unwrap();
        assert_eq!(snap.len() as u64, n);
    }
}
