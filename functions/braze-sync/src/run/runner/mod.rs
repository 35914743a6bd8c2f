//! One export, end to end, for real. [`SyncRunner::run`] takes the route's lock
//! ([`crate::state::route_lock`]: one run per route at a time), loads the confirmed state, skips an
//! export older than the state, then runs three stages at once, one type each:
//!
//! - [`producer`]: read → map → diff on a blocking thread, feeding a bounded channel;
//! - [`sender`]: [`crate::send::deliver::deliver`], reporting each user's outcome;
//! - [`committer`]: checkpoints what Braze confirmed every few seconds and, at the end, commits
//!   the state (with the export's watermark only when nothing is left).
//!
//! [`conclude`] turns what they did into the report, the rejects object, metrics and the
//! outcome; [`hand_over`] queues the rest of an export cut short by its deadline, which the
//! handler does only after the route lock and the export claim are released.

mod budget_wait;
mod committer;
mod conclude;
mod currents_feed;
pub mod deadline;
pub mod fan_out;
mod hand_over;
mod producer;
mod sender;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bridge_shared::ObjectStore;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

pub use hand_over::{Carried, Continuation, MAX_DELAY, PieceMessage, SqsContinuation};

use crate::config::route::Route;
use crate::diff::bounded::{RangedSettings, RangedTimes};
use crate::diff::export::{ProduceOptions, SyncError};
use crate::model::{DeliveryOutcome, UserDelta};
use crate::ops::report::RunStatus;
use crate::run::handler::{ExportPlan, ExportRunner, RunError, RunOutcome};
use crate::send::braze::BrazeApi;
use crate::send::deliver::{DeliverConfig, DeliverError};
use crate::send::workspace_share::{SenderRegistry, ShareSettings, WorkspaceShare};
use crate::state::confirmed::Snapshot;
use crate::state::lease;
use crate::state::ledger::{Ledger, STALLED_LIMIT};
use crate::state::route_lock::{RouteLock, lock_uri};
use crate::state::store::{
    Head, HeadDoc, LEGACY_HEAD_FORMAT, RANGE_USERS, StateStore, memory_estimate,
};
use committer::Committer;
use conclude::{Ended, RunRecord};
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

/// Export bytes per row assumed when estimating a route's size from its parts (a low guess,
/// so big exports take the bounded diff early).
pub const EST_ROW_BYTES: u64 = 100;
/// How many times bigger than its stored bytes a compressed part's text is assumed to be
/// when estimating its rows: gzip/zip measured at 4.9× on the harness's sample export
/// (`harness::samples::customers_csv`, 200,000 rows of 186 bytes, flate2's default level),
/// rounded up to 5.
pub const GZIP_EXPANSION: u64 = 5;
/// The same for Parquet parts: 5.6× measured on the harness's Snappy Parquet of the same
/// rows (`customers_parquet`, text columns), rounded up to 6.
pub const PARQUET_EXPANSION: u64 = 6;
/// The same for bzip2 and zstd parts: not measured; they compress at least as well as gzip,
/// so Parquet's higher figure is assumed.
pub const STRONG_EXPANSION: u64 = 6;

/// A part's bytes as text, for the rows estimate: its stored size times the expansion its
/// name says (`.gz`, `.gzip`, `.tgz`, `.tar.gz`, `.zip`: [`GZIP_EXPANSION`]; `.bz2`, `.zst`:
/// [`STRONG_EXPANSION`]; `.parquet`, `.pq`: [`PARQUET_EXPANSION`]; anything else as stored).
/// Names only: the object listing gives no content type (pure).
pub fn text_bytes(key: &str, size: u64) -> u64 {
    let k = key.to_ascii_lowercase();
    let factor = if [".gz", ".gzip", ".tgz", ".zip"]
        .iter()
        .any(|e| k.ends_with(e))
    {
        GZIP_EXPANSION
    } else if [".bz2", ".zst"].iter().any(|e| k.ends_with(e)) {
        STRONG_EXPANSION
    } else if [".parquet", ".pq"].iter().any(|e| k.ends_with(e)) {
        PARQUET_EXPANSION
    } else {
        1
    };
    size.saturating_mul(factor)
}

/// The export's bytes as text ([`text_bytes`] of every part).
pub fn export_text_bytes(plan: &ExportPlan) -> u64 {
    plan.parts
        .iter()
        .map(|p| text_bytes(&p.key, p.size))
        .fold(0, u64::saturating_add)
}

/// The users a ranged commit of `plan` lays a state out for: `expected`, or, for a state
/// without a range layout yet (a first sync), at least the export's rows (`rows_read`, as
/// the bounded diff's partition step counted them, else estimated from the parts' sizes). A
/// first sync that hands over commits what it confirmed so far; laid out for that alone, its
/// ranges would take every later invocation's users (only a complete commit re-lays out),
/// and each hand-over's commit would load ranges many times the target size.
pub(super) fn layout_users(doc: &HeadDoc, expected: u64, rows_read: u64, plan: &ExportPlan) -> u64 {
    if !doc.ranges.is_empty() {
        return expected;
    }
    let rows = match rows_read {
        0 => export_text_bytes(plan) / EST_ROW_BYTES,
        n => n,
    };
    expected.max(rows)
}

/// Memory the bounded diff's spill buffers take.
pub const SPILL_BUFFERS: u64 = 32 << 20;

/// Share of the function's memory the confirmed state may take; the rest is for the readers,
/// the sender's buffers and the runtime.
pub const STATE_MEMORY_SHARE: f64 = 0.6;

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
    /// Builds the runner once per container.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        routes: Vec<Route>,
        api: Arc<dyn BrazeApi>,
        settings: RunnerSettings,
        continuation: Option<Arc<dyn Continuation>>,
    ) -> Self {
        Self {
            store,
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
    }

    /// Takes the route's lock, or says why this run must wait.
    async fn lock(&self, route: &Route, run_id: &str) -> Result<RouteLock, RunError> {
        let s = &self.settings;
        let uri = lock_uri(&s.state_bucket, &s.state_prefix, route.name());
        let now = crate::clock::now().timestamp_millis();
        match RouteLock::acquire(self.store.clone(), uri, run_id, now, s.route_lease_s).await {
            Ok(Some(lock)) => Ok(lock),
            Ok(None) => Err(RunError::Retryable(format!(
                "another export of route {} is syncing; this one waits its turn",
                route.name()
            ))),
            Err(e) => Err(RunError::Retryable(e.to_string())),
        }
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
        let mut lock = self.lock(&route, &record.run_id).await?;
        let (lost_tx, lost_rx) = watch::channel(None);
        let export = LockedExport {
            plan,
            route: &route,
            exported_at: &exported_at,
            bounded,
        };
        let work = self.run_locked(export, &mut record, remaining_ms, lost_rx);
        let result = lease::keep_lock(work, &mut lock, &lost_tx).await;
        if let Ok(RunOutcome {
            fan_out: Some(run_id),
            summary,
            ..
        }) = &result
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
            if let Err(e) = queued {
                // Pieces already queued find the lock released and end at once.
                if let Err(e) = lock.release().await {
                    warn!(route = route.name(), error = %e, "Could not release the route lock; it expires by itself.");
                }
                self.drop_unqueued_fan_out(&route, run_id, pieces).await;
                return Err(RunError::Retryable(format!(
                    "could not queue the fan-out's pieces: {e}"
                )));
            }
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
        match &self.continuation {
            Some(c) => c.hand_over(plan).await,
            None => Err("no continuation queue is configured".into()),
        }
    }
}

impl SyncRunner {
    /// The export's date, as the route declares it; a date too far ahead is refused before
    /// anything is claimed, so it can never pin the watermark.
    async fn date_export(
        &self,
        plan: &ExportPlan,
        route: &Route,
        record: &mut RunRecord,
    ) -> Result<String, RunError> {
        let order = route.export_order();
        let dated = order
            .export_time(&plan.trigger, &plan.trigger_meta)
            .and_then(|t| {
                order
                    .check_skew(&plan.trigger, t, crate::clock::now())
                    .map(|()| t.to_rfc3339())
            });
        match dated {
            Ok(t) => {
                record.report.exported_at = Some(t.clone());
                Ok(t)
            }
            Err(e) => Err(record
                .failed(self.store.as_ref(), e.to_string(), false)
                .await),
        }
    }

    /// Whether this run takes the bounded diff: a format-2 (or new) state and a route of at
    /// least [`RunnerSettings::bounded_min_users`] users (state plus the export's estimated
    /// rows), or a state whose whole snapshot would take more than a quarter of the memory,
    /// or a forced fan-out.
    fn takes_bounded(&self, plan: &ExportPlan, route: &Route, doc: &HeadDoc) -> bool {
        if doc.format == LEGACY_HEAD_FORMAT {
            return false;
        }
        let s = &self.settings;
        let est_rows: u64 = export_text_bytes(plan) / EST_ROW_BYTES;
        let users = doc
            .users
            .max(doc.ranges.iter().map(|r| r.users).sum::<u64>())
            .saturating_add(est_rows);
        let heavy = s
            .memory_limit_bytes
            .is_some_and(|l| memory_estimate(doc, route) > l / 4);
        // A forced fan-out (`BRIDGE_FAN_OUT_PIECES`) splits the bounded diff, whatever the size.
        let forced = s.fan_out_pieces.is_some_and(|n| n >= 2) && self.continuation.is_some();
        users >= s.bounded_min_users || heavy || forced
    }

    /// Memory the bounded diff needs per worker: its largest hash range, loaded.
    fn range_memory(doc: &HeadDoc, route: &Route) -> u64 {
        // A head without ranges holds its users in one.
        let widest = doc
            .ranges
            .iter()
            .map(|r| r.users)
            .max()
            .unwrap_or(doc.users);
        let one = HeadDoc {
            users: widest,
            ..HeadDoc::default()
        };
        memory_estimate(&one, route)
    }

    /// Fails fast, before the route lock is taken (so a state that cannot fit never leaves
    /// the lock held by a process that dies loading it), when the state the head describes
    /// cannot fit in this function's memory: the whole snapshot for the in-memory diff, one
    /// hash range per worker plus the spill buffers for the bounded one. Returns whether the
    /// run takes the bounded diff.
    async fn check_memory(
        &self,
        plan: &ExportPlan,
        route: &Route,
        record: &mut RunRecord,
    ) -> Result<bool, RunError> {
        let head = match self.state(route).read_head().await {
            Ok(h) => h,
            Err(e) if e.is_retryable() => return Err(RunError::Retryable(e.to_string())),
            // An unreadable head fails the load with its own reason.
            Err(_) => return Ok(false),
        };
        let bounded = self.takes_bounded(plan, route, &head.doc);
        let Some(limit) = self.settings.memory_limit_bytes else {
            return Ok(bounded);
        };
        let need = if bounded {
            Self::range_memory(&head.doc, route) + SPILL_BUFFERS
        } else {
            memory_estimate(&head.doc, route)
        };
        let budget = (limit as f64 * STATE_MEMORY_SHARE) as u64;
        if need <= budget {
            return Ok(bounded);
        }
        let mb = |b: u64| b.div_ceil(1024 * 1024);
        let want = ((need as f64 / STATE_MEMORY_SHARE) as u64).div_ceil(64 << 20) * 64;
        let what = if bounded {
            "its largest state range and the spill buffers need"
        } else {
            "needs"
        };
        let message = format!(
            "route {}: its confirmed state ({} users, {} attributes) {what} about {} MB in memory, more than the {} MB this function gives it ({}% of its {} MB); nothing was sent and the route lock was not taken. Raise the function's memory (MemorySize of BrazeSyncFunction in template.yaml, memorySize in the CDK construct) to at least {} MB",
            route.name(),
            head.doc.users,
            route.slot_names().len(),
            mb(need),
            mb(budget),
            (STATE_MEMORY_SHARE * 100.0) as u32,
            mb(limit),
            want
        );
        Err(record.failed(self.store.as_ref(), message, false).await)
    }

    /// The bounded diff's settings for this run: workers bounded by the cores and by the
    /// memory one loaded range takes.
    fn ranged_settings(&self, doc: &HeadDoc, route: &Route, run_id: &str) -> RangedSettings {
        let s = &self.settings;
        let mut r = RangedSettings::new(run_id);
        r.spill_base = s.spill_dir.clone();
        r.disk_limit = s.spill_limit_bytes;
        r.buffer_budget = SPILL_BUFFERS as usize;
        let mut workers = s.diff_workers.max(1);
        if let Some(limit) = s.memory_limit_bytes {
            let budget = (limit as f64 * STATE_MEMORY_SHARE) as u64;
            let per = Self::range_memory(doc, route).max(1);
            let fit = budget.saturating_sub(SPILL_BUFFERS) / per;
            workers = workers.min(fit.max(1) as usize);
        }
        r.workers = workers;
        r
    }

    /// The run under the route lock: load, skip if stale, stream, conclude.
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
        let store = self.store.as_ref();
        let state = self.state(route);
        let (mut head, mut snapshot) = match self.load_locked(export, &state, record).await? {
            Loaded::Ready(ready) => *ready,
            Loaded::Stale(outcome) => return Ok(outcome),
        };
        self.apply_currents_feed(route, &state, &mut head, snapshot.as_mut(), record)
            .await?;
        let s = &self.settings;
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
        let mut opts = ProduceOptions::for_route(route, &plan.trigger.to_string());
        opts.full_resend |= plan.force_full;
        opts.allow_departures = plan.allow_departures;
        let snapshot: Option<Arc<Snapshot>> = snapshot.map(Arc::new);
        let (delta_tx, delta_rx) = mpsc::channel::<UserDelta>(s.channel_capacity);
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
        let sender = Sender::start(self.api.clone(), dcfg, delta_rx, out_tx, share);
        let mut committer = Committer::new(state, head, route.clone(), s.checkpoint_every)
            .with_max_pending(s.checkpoint_max_users);
        committer.follow(out_rx, lock_lost).await;

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
        ended.account(record, &committer, store, s).await;
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

    /// Loads the route's state (a bounded run reads only its head), forgets a watermark from
    /// the future, and answers a stale export (older than the one the state reflects) as
    /// skipped, unless it is a forced replay, which is sent in full and noted. A bounded run
    /// folds a killed run's checkpoint segments first.
    async fn load_locked(
        &self,
        export: LockedExport<'_>,
        state: &StateStore,
        record: &mut RunRecord,
    ) -> Result<Loaded, RunError> {
        let LockedExport {
            plan,
            route,
            exported_at,
            bounded,
        } = export;
        let store = self.store.as_ref();
        let loaded = if bounded {
            state.read_head().await.map(|h| (h, None))
        } else {
            state.load(route).await.map(|(h, snap)| (h, Some(snap)))
        };
        let (mut head, mut snapshot) = match loaded {
            Ok(x) => x,
            Err(e) if e.is_retryable() => return Err(RunError::Retryable(e.to_string())),
            Err(e) => {
                let message = format!("loading state: {e}");
                return Err(record.failed(store, message, false).await);
            }
        };
        // Fan-outs left behind end first: what their pieces had Braze confirm is diffed against.
        self.end_left_fan_outs(route, &mut head, &mut snapshot, record)
            .await?;
        forget_future_watermark(route, &mut head, record);
        if head.is_stale(Some(exported_at)) {
            if !plan.force_full {
                return Ok(Loaded::Stale(self.skip_stale(plan, &head, record).await));
            }
            record.report.forced_older_replay = true;
            record.report.notes.push(format!(
                "forced replay of an export older than the one the state reflects ({}); sent in full, the watermark stays at the newer export",
                watermark_text(&head)
            ));
        }
        if bounded && !head.doc.segments.is_empty() {
            self.fold_segments(plan, route, state, &mut head, record)
                .await?;
        }
        Ok(Loaded::Ready(Box::new((head, snapshot))))
    }

    /// Folds the checkpoint segments a killed run left into range deltas (no watermark, no
    /// base rewritten), so the bounded diff can load each range alone.
    async fn fold_segments(
        &self,
        plan: &ExportPlan,
        route: &Route,
        state: &StateStore,
        head: &mut Head,
        record: &mut RunRecord,
    ) -> Result<(), RunError> {
        let s = &self.settings;
        let dir = match crate::state::spill::SpillDir::create(
            &s.spill_dir,
            &format!("{}-fold", record.run_id),
        ) {
            Ok(d) => d,
            Err(e) => return Err(RunError::Retryable(e.to_string())),
        };
        let users = layout_users(&head.doc, head.doc.users, 0, plan);
        match state
            .commit_ranged(head, route, None, users, dir.path())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_retryable() => Err(RunError::Retryable(e.to_string())),
            Err(e) => {
                let message = format!("folding the state's checkpoints: {e}");
                Err(record.failed(self.store.as_ref(), message, false).await)
            }
        }
    }

    /// Records an export older than the state as `skipped_stale`, without touching the state.
    async fn skip_stale(
        &self,
        plan: &ExportPlan,
        head: &Head,
        record: &mut RunRecord,
    ) -> RunOutcome {
        record.report.status = RunStatus::SkippedStale;
        record.report.notes.push(format!(
            "export dated {} is older than the one the state reflects ({}); skipped, never applied over newer data. Replay it on purpose with bridge-force-full=true or --force-full",
            record.report.exported_at.as_deref().unwrap_or("?"),
            watermark_text(head)
        ));
        info!(route = %plan.route, export = %plan.trigger, "Skipping an export older than the state.");
        record.finish(self.store.as_ref()).await;
        record.outcome(
            false,
            serde_json::json!({"status": "skipped_stale", "state_watermark": head.doc.watermark}),
        )
    }

    /// The run's verdict: failed (retryable or not), unfinished (hand over), or done.
    async fn conclude(
        &self,
        record: &mut RunRecord,
        ended: Ended,
        committer: &Committer,
        commit_error: Option<String>,
    ) -> Result<RunOutcome, RunError> {
        let store = self.store.as_ref();
        // A failed checkpoint or a lost lock stopped the sender on purpose: that, not the
        // sender's "outcomes closed", is the reason; the retry resumes from the last checkpoint.
        if let Some(e) = &committer.failure {
            record.report.status = RunStatus::Incomplete;
            record.report.error = Some(e.clone());
            record.finish(store).await;
            return Err(RunError::Retryable(e.clone()));
        }
        if let Some(e) = &ended.delivery.error {
            if matches!(e, DeliverError::Unauthorized { .. }) {
                return Err(record.key_refused(store, e.to_string()).await);
            }
            return Err(record.failed(store, e.to_string(), e.is_retryable()).await);
        }
        if let Some(e) = ended.read_error() {
            return Err(record.failed(store, e.to_string(), e.is_retryable()).await);
        }
        if let Some(e) = commit_error {
            record.report.status = RunStatus::Incomplete;
            record.report.error = Some(e.clone());
            record.finish(store).await;
            return Err(RunError::Retryable(e));
        }
        let summary = Ended::summary(&record.report, committer);
        if ended.unsent() {
            record.report.status = RunStatus::Incomplete;
            if self.continuation.is_none() {
                record.finish(store).await;
                let why = budget_wait::cut_short(ended.delivery.stats.stopped);
                return Err(RunError::Retryable(why));
            }
            let stats = &ended.delivery.stats;
            let progressed =
                stats.users_confirmed + stats.users_recorded > 0 || committer.checkpoints > 0;
            let stalled = match progressed {
                true => 0,
                false => self.stalled_before(record).await + 1,
            };
            if stalled >= STALLED_LIMIT {
                let message = format!(
                    "the export's last {STALLED_LIMIT} runs reached their deadline without Braze confirming a user, so it would hand itself over forever: the function's timeout leaves too little time after the deadline margin ({}–{} s) to send, or Braze refused every request meanwhile. Nothing is lost (what Braze confirmed is in the state); replay the export once the function's Timeout is longer or Braze answers",
                    deadline::MARGIN_FLOOR.as_secs(),
                    deadline::MARGIN_CEILING.as_secs()
                );
                return Err(record.failed(store, message, false).await);
            }
            let note = budget_wait::hand_over_note(stats.stopped, &self.settings);
            record.report.notes.push(note);
            record.finish(store).await;
            let mut summary = summary;
            summary["stalled"] = serde_json::json!(stalled);
            return Ok(record.outcome(true, summary));
        }
        record.report.status = match ended.complete(committer) {
            true if record.report.departures_held > 0 => RunStatus::DeparturesHeld,
            true => RunStatus::Complete,
            false => RunStatus::Incomplete,
        };
        record.finish(store).await;
        Ok(record.outcome(false, summary))
    }
}

impl SyncRunner {
    /// Runs of this run's export in a row that handed over without progress, as its ledger
    /// entry (this run's claim) carries them; unreadable: none.
    async fn stalled_before(&self, record: &RunRecord) -> u32 {
        let s = &self.settings;
        let Some(export_id) = record.report.export_id.as_deref() else {
            return 0;
        };
        Ledger::for_route(
            self.store.as_ref(),
            &s.state_bucket,
            &s.state_prefix,
            &record.report.route,
        )
        .entry(export_id)
        .await
        .ok()
        .flatten()
        .map_or(0, |e| e.stalled)
    }
}

fn watermark_text(head: &Head) -> String {
    match &head.doc.watermark {
        Some(w) => format!(
            "{} dated {}",
            w.export_id,
            w.exported_at.as_deref().unwrap_or("?")
        ),
        None => "none".into(),
    }
}

/// A watermark dated beyond the route's `max_future_skew` (written before exports were dated
/// as declared, e.g. from a `..._20991231.csv` name) would skip every genuine export: it is
/// ignored, said so in the report, and replaced by this run's commit.
fn forget_future_watermark(route: &Route, head: &mut Head, record: &mut RunRecord) {
    let order = route.export_order();
    let at = head
        .doc
        .watermark
        .as_ref()
        .and_then(|w| w.exported_at.as_deref())
        .and_then(crate::config::export_order::parse_instant);
    if let Some(at) = at
        && order.too_far_ahead(at, crate::clock::now())
    {
        record.report.notes.push(format!(
            "the state's watermark ({}) lies beyond max_future_skew; it is ignored and replaced by this export's",
            watermark_text(head)
        ));
        warn!(
            route = route.name(),
            "Ignoring a state watermark dated in the future."
        );
        head.doc.watermark = None;
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

/// The state as a run under the lock found it.
enum Loaded {
    /// The head and, unless the run is bounded, the whole snapshot.
    Ready(Box<(Head, Option<Snapshot>)>),
    /// The export is older than the one the state reflects: skipped, with this outcome.
    Stale(RunOutcome),
}
