//! One export, end to end, for real. [`SyncRunner::run`] takes the route's lock
//! ([`crate::state::route_lock`]: one run per route at a time), loads the confirmed state, skips an
//! export older than the state, then runs three stages at once, one type each:
//!
//! - [`producer`]: read → map → diff on a blocking thread, feeding a bounded channel;
//! - [`sender`]: [`crate::send::deliver::deliver`], reporting each user's outcome;
//! - [`committer`]: marks users unknown in the state before they go to the sender (an intent,
//!   so a run that dies mid-request leaves them to be resent), checkpoints what Braze confirmed
//!   every few seconds and, at the end, commits the state (with the export's watermark only
//!   when nothing is left).
//!
//! Before them, [`memory_fit`] decides from the head ([`sizing`] its estimates) whether the
//! run takes the bounded diff and whether the state fits the function's memory, and [`load`]
//! dates the export and loads the state under the lock. [`conclude`] turns what the stages did
//! into the report, the rejects object, metrics and the run's verdict; [`hand_over`] queues
//! the rest of an export cut short by its deadline, which the handler does only after the
//! route lock and the export claim are released.

mod budget_wait;
mod committer;
mod conclude;
mod currents_feed;
pub mod deadline;
pub mod fan_out;
mod hand_over;
mod load;
mod memory_fit;
mod producer;
mod route_wait;
mod sender;
mod sizing;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bridge_shared::ObjectStore;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::warn;

pub use hand_over::{Carried, Continuation, MAX_DELAY, PieceMessage, SqsContinuation};
pub use sizing::{
    EST_ROW_BYTES, GZIP_EXPANSION, PARQUET_EXPANSION, SPILL_BUFFERS, STATE_MEMORY_SHARE,
    STRONG_EXPANSION, export_text_bytes, text_bytes,
};

use crate::config::route::Route;
use crate::diff::bounded::RangedTimes;
use crate::diff::export::{ProduceOptions, SyncError};
use crate::model::{DeliveryOutcome, UserDelta};
use crate::run::handler::{ExportPlan, ExportRunner, RunError, RunOutcome};
use crate::send::braze::BrazeApi;
use crate::send::deliver::DeliverConfig;
use crate::send::workspace_share::{SenderRegistry, ShareSettings, WorkspaceShare};
use crate::state::confirmed::Snapshot;
use crate::state::lease;
use crate::state::retrying::RetryingStore;
use crate::state::route_lock::{RouteLock, lock_uri};
use crate::state::store::{Head, RANGE_USERS, StateStore};
use committer::{Committer, Gate};
use conclude::{Ended, RunRecord};
use load::Loaded;
use producer::{BoundedDiff, Diff, Producer};
use sender::Sender;

/// How runs behave.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// Bucket for state, reports and rejects.
    pub state_bucket: String,
    /// State prefix (ends with `/`).
    pub state_prefix: String,
    /// Reports prefix.
    pub reports_prefix: String,
    /// Rejects prefix.
    pub rejects_prefix: String,
    /// The sender's settings (deadline filled per run).
    pub deliver: DeliverConfig,
    /// How often confirmed progress is persisted.
    pub checkpoint_every: Duration,
    /// Confirmed (or recorded) users that are persisted at once, before `checkpoint_every`:
    /// bounds the committer's memory when users are confirmed faster than Braze's pace
    /// (recorded row digests).
    pub checkpoint_max_users: usize,
    /// Deltas buffered between the producer and the sender.
    pub channel_capacity: usize,
    /// A cap on one run's sending time, on top of the Lambda deadline (`BRIDGE_MAX_RUN_SECONDS`).
    pub max_run: Option<Duration>,
    /// How long the route lock holds before another run may take over; renewed every third
    /// of it while the run lives (`BRIDGE_LEASE_SECONDS`).
    pub route_lease_s: i64,
    /// The function's memory (`AWS_LAMBDA_FUNCTION_MEMORY_SIZE`, in bytes); a route whose
    /// state cannot fit in [`STATE_MEMORY_SHARE`] of it fails before the route lock is taken.
    pub memory_limit_bytes: Option<u64>,
    /// How the runs' senders share the workspace rate limit through leases in the state
    /// bucket ([`crate::send::workspace_share`]); `None`: each run paces at the whole budget.
    pub workspace_share: Option<ShareSettings>,
    /// Routes with at least this many users (the state's plus the export's estimated rows)
    /// take the bounded diff ([`crate::diff::bounded`]); smaller ones diff in memory. Default
    /// [`RANGE_USERS`]: a state of one hash range gains nothing from ranges.
    pub bounded_min_users: u64,
    /// Folder the bounded diff spills to (the function's `/tmp`).
    pub spill_dir: std::path::PathBuf,
    /// Most bytes the bounded diff may spill (90% of the function's ephemeral storage).
    pub spill_limit_bytes: Option<u64>,
    /// Hash ranges diffed at once (default: the cores the function has).
    pub diff_workers: usize,
    /// Target users per state hash range ([`RANGE_USERS`]; tests use small ranges).
    pub state_range_users: u64,
    /// Split every bounded run into this many pieces across invocations
    /// (`BRIDGE_FAN_OUT_PIECES`, for tests and operators); `None`: only an export whose
    /// spill would not fit `spill_limit_bytes` fans out ([`fan_out`]).
    pub fan_out_pieces: Option<usize>,
    /// The route lock's lease while a fan-out's pieces run ([`fan_out::FAN_OUT_LEASE_S`]).
    pub fan_out_lease_s: i64,
}

impl RunnerSettings {
    /// Defaults around the given locations.
    pub fn new(
        state_bucket: &str,
        state_prefix: &str,
        reports_prefix: &str,
        rejects_prefix: &str,
    ) -> Self {
        Self {
            state_bucket: state_bucket.to_string(),
            state_prefix: state_prefix.to_string(),
            reports_prefix: reports_prefix.to_string(),
            rejects_prefix: rejects_prefix.to_string(),
            deliver: DeliverConfig::default(),
            checkpoint_every: Duration::from_secs(3),
            checkpoint_max_users: committer::DEFAULT_MAX_PENDING,
            channel_capacity: 8_192,
            max_run: None,
            route_lease_s: 60,
            memory_limit_bytes: None,
            workspace_share: Some(ShareSettings::default()),
            bounded_min_users: RANGE_USERS,
            state_range_users: RANGE_USERS,
            spill_dir: std::env::temp_dir(),
            spill_limit_bytes: Some(crate::read::default_max_decompressed_bytes() / 10 * 9),
            diff_workers: crate::diff::bounded::cores(),
            fan_out_pieces: None,
            fan_out_lease_s: fan_out::FAN_OUT_LEASE_S,
        }
    }
}

/// The real [`ExportRunner`].
pub struct SyncRunner {
    store: Arc<dyn ObjectStore>,
    routes: BTreeMap<String, Arc<Route>>,
    api: Arc<dyn BrazeApi>,
    settings: RunnerSettings,
    continuation: Option<Arc<dyn Continuation>>,
}

impl SyncRunner {
    /// Builds the runner once per container; its store is [`RetryingStore`]-wrapped.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        routes: Vec<Route>,
        api: Arc<dyn BrazeApi>,
        settings: RunnerSettings,
        continuation: Option<Arc<dyn Continuation>>,
    ) -> Self {
        Self {
            store: RetryingStore::wrap(store),
            routes: routes
                .into_iter()
                .map(|r| (r.name().to_string(), Arc::new(r)))
                .collect(),
            api,
            continuation: budget_wait::continuation(continuation, &settings),
            settings,
        }
    }

    fn deadline(&self, remaining_ms: Option<u64>) -> Option<Instant> {
        let now = Instant::now();
        let lambda = remaining_ms.map(|ms| {
            let left = Duration::from_millis(ms);
            now + left.saturating_sub(deadline::deadline_margin(left))
        });
        let cap = self.settings.max_run.map(|d| now + d);
        match (lambda, cap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The sender `sender` of `route` as one of the workspace's senders (`None`: sharing off).
    fn workspace_share(
        &self,
        route: &str,
        sender: &str,
    ) -> Option<(WorkspaceShare, watch::Receiver<u32>)> {
        let s = &self.settings;
        s.workspace_share.clone().map(|settings| {
            let registry =
                SenderRegistry::new(self.store.clone(), &s.state_bucket, &s.state_prefix);
            WorkspaceShare::new(registry, settings, route, sender)
        })
    }

    fn state(&self, route: &Route) -> StateStore {
        let s = &self.settings;
        StateStore::new(
            self.store.clone(),
            &s.state_bucket,
            &s.state_prefix,
            route.name(),
        )
        .with_range_users(s.state_range_users)
        .with_commit_memory(sizing::commit_memory(s.memory_limit_bytes))
    }

    /// Takes the route's lock, or says why this run must wait. Under a Lambda deadline a
    /// route another run holds is waited for ([`lock_wait`]): polled every sixth of a lease
    /// for at most one lease (a holder that died frees it within one), never into the time a
    /// run needs; a run that still finds it busy goes back to the queue and waits its turn
    /// there ([`route_wait`]). Returns the lock and how long it waited; `None`: still busy.
    async fn lock(
        &self,
        route: &Route,
        run_id: &str,
        remaining_ms: Option<u64>,
    ) -> Result<Option<(RouteLock, Duration)>, RunError> {
        let s = &self.settings;
        let uri = lock_uri(&s.state_bucket, &s.state_prefix, route.name());
        let started = Instant::now();
        let wait = lock_wait(s.route_lease_s, remaining_ms);
        loop {
            let now = crate::clock::now().timestamp_millis();
            match RouteLock::acquire(
                self.store.clone(),
                uri.clone(),
                run_id,
                now,
                s.route_lease_s,
            )
            .await
            {
                Ok(Some(lock)) => return Ok(Some((lock, started.elapsed()))),
                Ok(None) if started.elapsed() + wait.poll <= wait.most => {
                    tokio::time::sleep(wait.poll).await;
                }
                Ok(None) => return Ok(None),
                Err(e) => return Err(RunError::Retryable(e.to_string())),
            }
        }
    }
}

/// How a run waits for a route another run holds: every `poll`, for at most `most`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LockWait {
    poll: Duration,
    most: Duration,
}

/// The wait for a busy route under a lease of `lease_s` seconds with `remaining_ms` left in
/// the invocation (`None`: no Lambda deadline, as from a shell: no wait, the caller is told at
/// once). At most one lease, and never into the [`deadline::MIN_TIMEOUT`] a run needs.
fn lock_wait(lease_s: i64, remaining_ms: Option<u64>) -> LockWait {
    let lease = Duration::from_secs(lease_s.max(1) as u64);
    let most = remaining_ms.map_or(Duration::ZERO, |ms| {
        Duration::from_millis(ms)
            .saturating_sub(deadline::MIN_TIMEOUT)
            .min(lease)
    });
    LockWait {
        poll: lease / 6,
        most,
    }
}

#[async_trait]
impl ExportRunner for SyncRunner {
    async fn run(
        &self,
        plan: &ExportPlan,
        remaining_ms: Option<u64>,
    ) -> Result<RunOutcome, RunError> {
        let Some(route) = self.routes.get(&plan.route).cloned() else {
            return Err(RunError::Permanent {
                message: format!("no route named {:?} is configured", plan.route),
                report: None,
            });
        };
        let mut record = RunRecord::new(plan, route.name(), &self.settings);
        // A timeout too short to send would hand over forever with nothing sent: it fails
        // once, before anything is claimed, naming the timeout and the minimum.
        if let Some(message) =
            remaining_ms.and_then(|ms| deadline::too_short(Duration::from_millis(ms)))
        {
            return Err(record.failed(self.store.as_ref(), message, false).await);
        }
        let exported_at = self.date_export(plan, &route, &mut record).await?;
        if let Some(waiting) = self.wait_for_budget(&mut record).await? {
            return Ok(waiting);
        }
        let bounded = self.check_memory(plan, &route, &mut record).await?;
        // One run per route at a time: exports of a route apply one after the other. The lease
        // is renewed while the run lives; losing it stops the run.
        let Some((mut lock, waited)) = self.lock(&route, &record.run_id, remaining_ms).await?
        else {
            return self.wait_for_route(&route, &mut record, remaining_ms).await;
        };
        let remaining_ms = remaining_ms.map(|ms| ms.saturating_sub(waited.as_millis() as u64));
        let (lost_tx, lost_rx) = watch::channel(None);
        let export = LockedExport {
            plan,
            route: &route,
            exported_at: &exported_at,
            bounded,
        };
        let work = self.run_locked(export, &mut record, remaining_ms, lost_rx);
        let mut result = lease::keep_lock(work, &mut lock, &lost_tx).await;
        if let Ok(RunOutcome {
            fan_out: Some(run_id),
            summary,
            pieces_unqueued,
            ..
        }) = &mut result
        {
            // The pieces hold this lock from now on: made shareable and long before the
            // first piece is queued.
            let pieces = summary["fan_out"]["pieces"].as_u64().unwrap_or(0) as usize;
            lock.share();
            lock.set_lease_s(self.settings.fan_out_lease_s);
            let queued = match lock.renew(crate::clock::now().timestamp_millis()).await {
                Ok(()) => self.queue_pieces(route.name(), run_id, pieces).await,
                Err(e) => Err(e.to_string()),
            };
            // A piece already queued may be running and sending: the fan-out stays, under
            // its lock, and the export's retry queues every piece again (the ledger entry
            // asks for it). Should the retry not come in time, the route's next run ends
            // the fan-out left behind and keeps what its pieces had Braze confirm.
            *pieces_unqueued = queued.err();
            return result;
        }
        if let Err(e) = lock.release().await {
            warn!(route = route.name(), error = %e, "Could not release the route lock; it expires by itself.");
        }
        result
    }

    async fn run_piece(
        &self,
        message: &serde_json::Value,
        remaining_ms: Option<u64>,
    ) -> Result<serde_json::Value, RunError> {
        self.piece(message, remaining_ms).await
    }

    async fn hand_over(&self, plan: &ExportPlan) -> Result<(), String> {
        self.hand_over_after(plan, Duration::ZERO).await
    }

    async fn queue_fan_out(&self, route: &str, run_id: &str, pieces: usize) -> Result<(), String> {
        self.queue_pieces(route, run_id, pieces).await
    }

    async fn hand_over_after(&self, plan: &ExportPlan, delay: Duration) -> Result<(), String> {
        match &self.continuation {
            Some(c) if delay.is_zero() => c.hand_over(plan).await,
            Some(c) => c.hand_over_after(plan, delay).await,
            None => Err("no continuation queue is configured".into()),
        }
    }
}

impl SyncRunner {
    /// The run under the route lock: load, skip if stale, fold a killed run's checkpoints, fan
    /// out or stream, conclude.
    async fn run_locked(
        &self,
        export: LockedExport<'_>,
        record: &mut RunRecord,
        remaining_ms: Option<u64>,
        lock_lost: watch::Receiver<Option<String>>,
    ) -> Result<RunOutcome, RunError> {
        let LockedExport {
            plan,
            route,
            exported_at,
            bounded,
        } = export;
        let state = self.state(route);
        let (mut head, mut snapshot) = match self.load_locked(export, &state, record).await? {
            Loaded::Ready(ready) => *ready,
            Loaded::Stale(outcome) => return Ok(outcome),
        };
        self.apply_currents_feed(route, &state, &mut head, snapshot.as_mut(), record)
            .await?;
        if bounded && !head.doc.segments.is_empty() {
            // A killed run's checkpoints are folded into range deltas first, so every range
            // loads alone.
            self.fold_segments(plan, route, &state, &mut head, record)
                .await?;
        }
        if bounded && let Some(pieces) = self.fan_out_pieces(plan) {
            return self
                .fan_out(
                    fan_out::Split {
                        plan,
                        route,
                        exported_at,
                        pieces,
                    },
                    &state,
                    head,
                    record,
                )
                .await;
        }
        let against = Against {
            state,
            head,
            snapshot,
        };
        self.stream(export, against, record, remaining_ms, lock_lost)
            .await
    }

    /// The three stages at once (producer → sender → committer) over the loaded state, then
    /// the commit and the verdict; an export whose spill measured too big for one invocation
    /// fans out instead when nothing was sent.
    async fn stream(
        &self,
        export: LockedExport<'_>,
        against: Against,
        record: &mut RunRecord,
        remaining_ms: Option<u64>,
        lock_lost: watch::Receiver<Option<String>>,
    ) -> Result<RunOutcome, RunError> {
        let LockedExport {
            plan,
            route,
            exported_at,
            ..
        } = export;
        let Against {
            state,
            head,
            snapshot,
        } = against;
        let s = &self.settings;
        let mut opts = ProduceOptions::for_route(route, &plan.trigger.to_string());
        opts.full_resend |= plan.force_full;
        opts.resend_salt = plan.resend_salt(route.config.full_resend);
        opts.allow_departures = plan.allow_departures;
        let snapshot: Option<Arc<Snapshot>> = snapshot.map(Arc::new);
        // Producer -> committer's gate (intents) -> sender -> committer.
        let (delta_tx, delta_rx) = mpsc::channel::<UserDelta>(s.channel_capacity);
        let (send_tx, send_rx) = mpsc::channel::<UserDelta>(s.channel_capacity);
        let (out_tx, out_rx) = mpsc::channel::<DeliveryOutcome>(s.channel_capacity);
        // The bounded diff's figures: its rows size a first layout even when the run stops.
        let times = Arc::new(std::sync::Mutex::new(RangedTimes::default()));
        let diff = match &snapshot {
            Some(snap) => Diff::InMemory(snap.clone()),
            None => {
                let mut settings = self.ranged_settings(&head.doc, route, &record.run_id);
                settings.times = Some(times.clone());
                Diff::Bounded(Box::new(BoundedDiff {
                    state: state.clone(),
                    doc: head.doc.clone(),
                    settings,
                }))
            }
        };
        let producer = Producer::start(
            self.store.clone(),
            route.clone(),
            plan,
            opts,
            diff,
            delta_tx,
        );
        let mut dcfg = s.deliver.clone();
        dcfg.deadline = self.deadline(remaining_ms);
        let share = self.workspace_share(route.name(), &record.run_id);
        let sender = Sender::start(self.api.clone(), dcfg, send_rx, out_tx, share);
        let mut committer = Committer::new(state, head, route.clone(), s.checkpoint_every)
            .with_max_pending(s.checkpoint_max_users)
            .with_max_pending_bytes(sizing::pending_memory(s.memory_limit_bytes))
            .with_ahead(s.channel_capacity);
        let gate = Gate::new(delta_rx, send_tx);
        committer.follow_gated(gate, out_rx, lock_lost).await;

        let delivery = sender.finish().await?;
        let mut produced = producer.finish().await?;
        if let Err(SyncError::SpillOverflow(o)) = &mut produced.result {
            o.parts_bytes = plan.parts.iter().map(|p| p.size).sum();
            // The estimate said one invocation's spill fits; the partition step measured
            // otherwise. It stopped before any range was diffed, so nothing was sent: with a
            // continuation queue the export fans out from the measured figures instead.
            if self.continuation.is_some() && delivery.stats.users_sent == 0 {
                let o = *o;
                return self
                    .fan_out_on_overflow(plan, route, exported_at, record, &o)
                    .await;
            }
        }
        let mut ended = Ended { produced, delivery };
        ended
            .account(record, &committer, self.store.as_ref(), s)
            .await;
        let watermark = ended.watermark(plan, exported_at);
        let commit_error = match snapshot {
            Some(snap) => committer.commit(snap, watermark).await,
            None => {
                let new_users = ended
                    .produced
                    .result
                    .as_ref()
                    .map_or(0, |summary| summary.users_new);
                let expected = committer.users_before().saturating_add(new_users);
                let rows_read = times.lock().map_or(0, |t| t.rows_read);
                let expected = committer.layout_users(expected, rows_read, plan);
                let tag = format!("{}-commit", record.run_id);
                committer
                    .commit_ranged(expected, &s.spill_dir, &tag, watermark)
                    .await
            }
        };
        self.conclude(record, ended, &committer, commit_error).await
    }
}

/// The export a run syncs under the route lock.
#[derive(Clone, Copy)]
struct LockedExport<'a> {
    /// The export.
    plan: &'a ExportPlan,
    /// Its route.
    route: &'a Arc<Route>,
    /// The export's date (RFC 3339), for the watermark.
    exported_at: &'a str,
    /// The state is too big to load whole: the run diffs range by range.
    bounded: bool,
}

/// The state a run streams an export against, as it was loaded under the lock.
struct Against {
    /// The route's state store.
    state: StateStore,
    /// Its head.
    head: Head,
    /// The whole snapshot, unless the run is bounded.
    snapshot: Option<Snapshot>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_route_is_waited_for_at_most_one_lease_and_never_into_a_runs_time() {
        let s = Duration::from_secs;
        // The deployed shape: a 900 s timeout, a 60 s lease.
        assert_eq!(
            lock_wait(60, Some(900_000)),
            LockWait {
                poll: s(10),
                most: s(60)
            }
        );
        // What is left beyond the minimum a run needs bounds the wait.
        assert_eq!(lock_wait(60, Some(90_000)).most, s(30));
        assert_eq!(lock_wait(60, Some(50_000)).most, Duration::ZERO);
        // From a shell the caller is told at once.
        assert_eq!(lock_wait(60, None).most, Duration::ZERO);
    }
}
