//! One export, end to end, for real. [`SyncRunner::run`] takes the route's lock
//! ([`crate::route_lock`]: one run per route at a time), loads the confirmed state, skips an
//! export older than the state, then runs three stages at once, one type each:
//!
//! - [`producer`]: read → map → diff on a blocking thread, feeding a bounded channel;
//! - [`sender`]: [`crate::deliver::deliver`], reporting each user's outcome;
//! - [`committer`]: checkpoints what Braze confirmed every few seconds and, at the end, commits
//!   the state (with the export's watermark only when nothing is left).
//!
//! [`conclude`] turns what they did into the report, the rejects object, metrics and the
//! outcome; [`hand_over`] queues the rest of an export cut short by its deadline, which the
//! handler does only after the route lock and the export claim are released.

mod committer;
mod conclude;
mod hand_over;
mod producer;
mod sender;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bridge_shared::ObjectStore;
use tokio::sync::mpsc;
use tracing::{info, warn};

pub use hand_over::{Continuation, SqsContinuation};

use crate::braze::BrazeApi;
use crate::deliver::DeliverConfig;
use crate::handler::{ExportPlan, ExportRunner, RunError, RunOutcome};
use crate::model::{DeliveryOutcome, UserDelta};
use crate::report::RunStatus;
use crate::route::Route;
use crate::route_lock::{RouteLock, lock_uri};
use crate::snapshot::store::{Head, StateStore};
use crate::sync::ProduceOptions;
use committer::Committer;
use conclude::{Ended, RunRecord};
use producer::Producer;
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
    /// Time kept back before the Lambda deadline for the final commit and report.
    pub deadline_margin: Duration,
    /// Deltas buffered between the producer and the sender.
    pub channel_capacity: usize,
    /// A cap on one run's sending time, on top of the Lambda deadline (`BRIDGE_MAX_RUN_SECONDS`).
    pub max_run: Option<Duration>,
    /// How long a route claim holds before another run may take over.
    pub route_lease_s: i64,
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
            deadline_margin: Duration::from_secs(45),
            channel_capacity: 8_192,
            max_run: None,
            route_lease_s: 960,
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
            settings,
            continuation,
        }
    }

    fn deadline(&self, remaining_ms: Option<u64>) -> Option<Instant> {
        let now = Instant::now();
        let lambda = remaining_ms.map(|ms| {
            now + Duration::from_millis(ms).saturating_sub(self.settings.deadline_margin)
        });
        let cap = self.settings.max_run.map(|d| now + d);
        match (lambda, cap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn state(&self, route: &Route) -> StateStore {
        let s = &self.settings;
        StateStore::new(
            self.store.clone(),
            &s.state_bucket,
            &s.state_prefix,
            route.name(),
        )
    }

    /// Takes the route's lock, or says why this run must wait.
    async fn lock(&self, route: &Route, run_id: &str) -> Result<RouteLock, RunError> {
        let s = &self.settings;
        let uri = lock_uri(&s.state_bucket, &s.state_prefix, route.name());
        let now = chrono::Utc::now().timestamp();
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
        // One run per route at a time: exports of a route apply one after the other.
        let lock = self.lock(&route, &record.run_id).await?;
        let result = self
            .run_locked(plan, &route, &mut record, remaining_ms)
            .await;
        if let Err(e) = lock.release().await {
            warn!(route = route.name(), error = %e, "Could not release the route lock; it expires by itself.");
        }
        result
    }

    async fn hand_over(&self, plan: &ExportPlan) -> Result<(), String> {
        match &self.continuation {
            Some(c) => c.hand_over(plan).await,
            None => Err("no continuation queue is configured".into()),
        }
    }
}

impl SyncRunner {
    /// The run under the route lock: load, skip if stale, stream, conclude.
    async fn run_locked(
        &self,
        plan: &ExportPlan,
        route: &Arc<Route>,
        record: &mut RunRecord,
        remaining_ms: Option<u64>,
    ) -> Result<RunOutcome, RunError> {
        let store = self.store.as_ref();
        let state = self.state(route);
        let (head, snapshot) = match state.load(route).await {
            Ok(x) => x,
            Err(e) if e.is_retryable() => return Err(RunError::Retryable(e.to_string())),
            Err(e) => {
                let message = format!("loading state: {e}");
                return Err(record.failed(store, message, false).await);
            }
        };
        if !plan.force_full && head.is_stale(plan.exported_at.as_deref()) {
            return Ok(self.skip_stale(plan, &head, record).await);
        }

        let s = &self.settings;
        let mut opts = ProduceOptions::for_route(route, &plan.trigger.to_string());
        opts.full_resend |= plan.force_full;
        let snapshot = Arc::new(snapshot);
        let (delta_tx, delta_rx) = mpsc::channel::<UserDelta>(s.channel_capacity);
        let (out_tx, out_rx) = mpsc::channel::<DeliveryOutcome>(s.channel_capacity);
        let producer = Producer::start(
            self.store.clone(),
            route.clone(),
            snapshot.clone(),
            plan,
            opts,
            delta_tx,
        );
        let mut dcfg = s.deliver.clone();
        dcfg.deadline = self
            .deadline(remaining_ms)
            .map(tokio::time::Instant::from_std);
        let sender = Sender::start(self.api.clone(), dcfg, delta_rx, out_tx);
        let mut committer = Committer::new(state, head, route.clone(), s.checkpoint_every);
        committer.follow(out_rx).await;

        let delivery = sender.finish().await?;
        let produced = producer.finish().await?;
        let mut ended = Ended { produced, delivery };
        ended.account(record, &committer, store, s).await;
        let commit_error = committer.commit(snapshot, ended.watermark(plan)).await;
        self.conclude(record, ended, &committer, commit_error).await
    }

    /// Records an export older than the state as skipped, without touching the state.
    async fn skip_stale(
        &self,
        plan: &ExportPlan,
        head: &Head,
        record: &mut RunRecord,
    ) -> RunOutcome {
        record.report.status = RunStatus::Skipped;
        record.report.notes.push(format!(
            "export is older than the one the state reflects ({:?}); skipped, never applied over newer data",
            head.doc.watermark
        ));
        info!(route = %plan.route, export = %plan.trigger, "Skipping an export older than the state.");
        record.finish(self.store.as_ref()).await;
        record.outcome(false, serde_json::json!({"status": "skipped_older_export"}))
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
        if let Some(e) = &ended.delivery.error {
            return Err(record.failed(store, e.to_string(), e.is_retryable()).await);
        }
        if let Some(e) = ended.read_error() {
            return Err(record.failed(store, e.to_string(), e.is_retryable()).await);
        }
        if let Some(e) = committer.checkpoint_error.clone().or(commit_error) {
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
                return Err(RunError::Retryable("run cut short by its deadline".into()));
            }
            record.report.notes.push(
                "stopped before the deadline; the rest is handed to a new invocation once this run's claims are released".into(),
            );
            record.finish(store).await;
            return Ok(record.outcome(true, summary));
        }
        record.report.status = if ended.complete(committer) {
            RunStatus::Complete
        } else {
            RunStatus::Incomplete
        };
        record.finish(store).await;
        Ok(record.outcome(false, summary))
    }
}
