//! Stage 3 of a run: the committer. It follows the sender's outcomes, persists what Braze
//! confirmed as a checkpoint segment every few seconds, collects what Braze refused, and at
//! the end folds the run into a new base ([`StateStore::commit`]). Nothing else moves state.
//!
//! It is also the gate between the producer and the sender ([`Committer::follow_gated`]): no
//! delta reaches the sender before a checkpoint (an *intent*) has marked its attributes
//! unknown in the state ([`UNKNOWN_FP`]). Every sender goes through it: a single run's (into
//! the route head), a fan-out piece's (into its fork, which a fan-out that ends unmerged
//! absorbs) and the finalizer's departures (into the route head). A run that dies after Braze applied a request and
//! before the checkpoint that confirms it leaves those users unknown, so the next run resends
//! them whatever their values (without it, a newer export that reverts a value would diff as
//! unchanged and Braze would keep the dead run's value). A run that ends drops its intents
//! before its commit: what Braze confirmed is in its checkpoints, what it refused never
//! changed, and a known user that stayed unsent or unanswered is marked unknown by a
//! checkpoint of its own.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::warn;

use crate::config::route::Route;
use crate::diff::rejects::{RejectLog, RowReject};
use crate::model::{AttributeChange, DeliveryOutcome, UserDelta};
use crate::state::confirmed::{Snapshot, UNKNOWN_FP};
use crate::state::store::{Head, StateStore, Watermark};

/// Users pending that force a checkpoint by default. Recorded row digests are not paced by
/// Braze's rate limit: a run recording them for every user of a big route (its first run
/// after a state without digests, or after a mapping change) confirms a million a second, so
/// time alone would hold millions of deltas in memory between checkpoints.
pub const DEFAULT_MAX_PENDING: usize = 50_000;

/// Deltas the gate lets ahead of the sender by default (and the most one intent covers).
pub const DEFAULT_AHEAD: usize = 8_192;

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
    /// Confirmed or recorded users among `pending` (a checkpoint of unknown marks alone is not
    /// progress).
    pending_progress: usize,
    /// Deltas the gate lets ahead of the sender, and the most one intent covers.
    ahead: usize,
    /// The intent segments this run wrote, dropped from the head before its commit.
    intents: Vec<String>,
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
            pending_progress: 0,
            ahead: DEFAULT_AHEAD,
            intents: Vec::new(),
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

    /// Lets the gate keep up to `n` deltas covered by an intent ahead of the sender.
    pub fn with_ahead(mut self, n: usize) -> Self {
        self.ahead = n.max(1);
        self
    }

    /// One outcome of the sender: confirmed and recorded users wait for the next checkpoint;
    /// a known user left unsent or unanswered (Braze may have applied it) is marked unknown
    /// by it. A new user stays untracked: the next run sends its whole profile anyway.
    fn take(&mut self, outcome: DeliveryOutcome) {
        match outcome {
            DeliveryOutcome::Confirmed(d) => {
                self.confirmed += 1;
                self.pending_progress += 1;
                self.hold(d);
            }
            DeliveryOutcome::Rejected { delta, reason } => {
                self.braze_rejects
                    .push(&RowReject::from_braze(&delta, &reason));
            }
            DeliveryOutcome::Recorded(d) => {
                self.pending_progress += 1;
                self.hold(d);
            }
            DeliveryOutcome::Unsent(d) if !d.records_only() && !d.is_new => {
                self.hold(unknown_marks(&d));
            }
            DeliveryOutcome::Unsent(_) => {}
        }
    }

    /// Checkpoints when it is time; `Err` once the committer has failed (the caller returns,
    /// which stops the sender).
    async fn keep_going(&mut self, last: &mut Instant) -> Result<(), ()> {
        if self.failure.is_none()
            && !self.pending.is_empty()
            && (last.elapsed() >= self.every
                || self.pending.len() >= self.max_pending
                || self.pending_bytes >= self.max_pending_bytes)
        {
            self.checkpoint().await;
            *last = Instant::now();
        }
        if self.failure.is_some() {
            warn!(
                route = self.route.name(),
                "Stopping the sender: confirmed work can no longer be persisted."
            );
            return Err(());
        }
        Ok(())
    }

    /// The gate between the producer and the sender: deltas from `gate`'s input reach its
    /// output only once an intent marking their attributes unknown is in the state (see the
    /// module docs). Follows the outcomes until the sender closes the channel, checkpointing
    /// every `every` (or sooner, once [`Committer::with_max_pending`] users are pending).
    /// A failed checkpoint or intent, or the route lock reported lost on `lock_lost`, ends it
    /// at once: the gate and the outcomes receiver are dropped, which stops the sender after
    /// the requests in flight, so confirmed-but-unpersisted work stays within one checkpoint
    /// window.
    pub async fn follow_gated(
        &mut self,
        mut gate: Gate,
        mut outcomes: mpsc::Receiver<DeliveryOutcome>,
        mut lock_lost: watch::Receiver<Option<String>>,
    ) {
        let mut last = Instant::now();
        let mut tick = tokio::time::interval(self.every);
        let mut watching = true;
        let Gate {
            input,
            output,
            ready,
            input_open,
        } = &mut gate;
        loop {
            let wants = *input_open && ready.len() < self.ahead;
            let forwards = !ready.is_empty();
            tokio::select! {
                biased;
                d = input.recv(), if wants => match d {
                    Some(d) => {
                        let batch = take_queued(input, d, self.ahead);
                        self.intend(batch, ready).await;
                    }
                    None => *input_open = false,
                },
                sent = forward(output.as_ref(), ready), if forwards => {
                    if !sent {
                        // The sender stopped (deadline, refused key): nothing more is taken
                        // from the producer, and what the gate holds is never sent (its
                        // intents are dropped with the others at the commit).
                        input.close();
                        while input.try_recv().is_ok() {}
                        ready.clear();
                        *output = None;
                        *input_open = false;
                    }
                }
                outcome = outcomes.recv() => match outcome {
                    Some(o) => self.take(o),
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
            if !*input_open && ready.is_empty() {
                // Everything went through: the sender sees the end of its input.
                *output = None;
            }
            if self.keep_going(&mut last).await.is_err() {
                return;
            }
        }
        self.checkpoint().await;
    }

    /// Writes the intent of `batch` (its users' attributes unknown), then lets it go ahead
    /// of the sender. A failed intent stops the run before any of them is sent.
    async fn intend(&mut self, batch: Vec<UserDelta>, ready: &mut VecDeque<UserDelta>) {
        if self.failure.is_some() {
            return;
        }
        let marks: Vec<UserDelta> = batch
            .iter()
            .filter(|d| !d.records_only())
            .map(unknown_marks)
            .collect();
        if !marks.is_empty() {
            let before = self.head.doc.segments.len();
            if let Err(e) = self
                .state
                .checkpoint(&mut self.head, &self.route, &marks)
                .await
            {
                warn!(route = self.route.name(), error = %e, "Could not mark users in flight; stopping before sending them.");
                self.failure = Some(format!(
                    "checkpoint failed (marking users in flight), the run stopped before sending them: {e}"
                ));
                return;
            }
            if self.head.doc.segments.len() > before
                && let Some(name) = self.head.doc.segments.last()
            {
                self.intents.push(name.clone());
            }
        }
        ready.extend(batch);
    }

    /// Takes this run's intents out of the head about to be committed; returns them, to be
    /// deleted once a head without them is published.
    fn drop_intents(&mut self) -> Vec<String> {
        let intents = std::mem::take(&mut self.intents);
        self.head.doc.segments.retain(|n| !intents.contains(n));
        intents
    }

    /// Deletes `intents` once the commit published a head without them (a head that still
    /// names them, as a legacy state's partial commit leaves it, keeps them). Best effort: an
    /// object left behind is only garbage.
    async fn delete_intents(&self, intents: &[String]) {
        if !intents.is_empty() {
            self.state.delete_unreferenced(intents).await;
        }
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
                if self.pending_progress > 0 {
                    self.checkpoints += 1;
                }
                self.pending_progress = 0;
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
        let intents = self.drop_intents();
        let error = self
            .state
            .commit_ranged(
                &mut self.head,
                &self.route,
                watermark,
                expected_users,
                dir.path(),
            )
            .await
            .err()
            .map(|e| e.to_string());
        if error.is_none() {
            self.delete_intents(&intents).await;
        }
        error
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
        let Ok(snap) = Arc::try_unwrap(snapshot) else {
            return Some(
                "state snapshot still shared after the reader ended; not committed".into(),
            );
        };
        let intents = self.drop_intents();
        let error = self
            .state
            .commit(&mut self.head, snap, watermark)
            .await
            .err()
            .map(|e| e.to_string());
        if error.is_none() {
            self.delete_intents(&intents).await;
        }
        error
    }
}

/// The producer's deltas on their way to the sender through the committer
/// ([`Committer::follow_gated`]).
pub(super) struct Gate {
    input: mpsc::Receiver<UserDelta>,
    output: Option<mpsc::Sender<UserDelta>>,
    /// Covered by an intent, not yet handed to the sender.
    ready: VecDeque<UserDelta>,
    input_open: bool,
}

impl Gate {
    /// Deltas from `input` (the producer) go to `output` (the sender).
    pub fn new(input: mpsc::Receiver<UserDelta>, output: mpsc::Sender<UserDelta>) -> Self {
        Self {
            input,
            output: Some(output),
            ready: VecDeque::new(),
            input_open: true,
        }
    }
}

/// `first` and whatever else is already queued on `input`, up to `most` deltas.
fn take_queued(
    input: &mut mpsc::Receiver<UserDelta>,
    first: UserDelta,
    most: usize,
) -> Vec<UserDelta> {
    let mut batch = vec![first];
    while batch.len() < most {
        match input.try_recv() {
            Ok(d) => batch.push(d),
            Err(_) => break,
        }
    }
    batch
}

/// Hands `ready` deltas to the sender, as many as it takes now (at least one, waiting for
/// room); false when the sender stopped taking deltas.
async fn forward(out: Option<&mpsc::Sender<UserDelta>>, ready: &mut VecDeque<UserDelta>) -> bool {
    let Some(out) = out else {
        return std::future::pending().await;
    };
    let Ok(permit) = out.reserve().await else {
        return false;
    };
    if let Some(d) = ready.pop_front() {
        permit.send(d);
    }
    while !ready.is_empty() {
        let Ok(permit) = out.try_reserve() else {
            break;
        };
        if let Some(d) = ready.pop_front() {
            permit.send(d);
        }
    }
    true
}

/// `d`'s attributes marked unknown (and its row digest cleared), so the next diff sends them
/// whatever their values: what an intent, or a user left unsent or unanswered, records.
fn unknown_marks(d: &UserDelta) -> UserDelta {
    UserDelta {
        identifier: d.identifier.clone(),
        pos: d.pos.clone(),
        changes: d
            .changes
            .iter()
            .map(|c| AttributeChange {
                name: c.name.clone(),
                value: serde_json::Value::Null,
                fingerprint: Some(UNKNOWN_FP),
            })
            .collect(),
        update_existing_only: d.update_existing_only,
        is_new: d.is_new,
        row_digest: None,
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

    /// A gate whose producer has ended: the committer follows the outcomes alone.
    fn no_deltas() -> Gate {
        let (_, input) = mpsc::channel(1);
        let (output, _) = mpsc::channel(1);
        Gate::new(input, output)
    }

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
        committer.follow_gated(no_deltas(), rx, lost_rx).await;
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
        committer.follow_gated(no_deltas(), rx, lost_rx).await;
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
