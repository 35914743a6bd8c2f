//! One export, end to end, for real: claims the route (one run per route at a time), loads the
//! confirmed state, skips an export older than the state, then runs three stages at once —
//! the blocking producer (read → map → diff, [`crate::sync::produce`]) feeding a bounded
//! channel, the sender ([`crate::deliver::deliver`]) and this committer, which checkpoints what
//! Braze confirmed every few seconds. At the end it commits the state (with the export's
//! watermark only when nothing is left), writes the rejects object and the run report, emits
//! metrics, and hands unfinished work on before the Lambda deadline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bridge_shared::{ObjectStore, PutCondition, S3Uri};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::braze::BrazeApi;
use crate::deliver::{DeliverConfig, DeliverError, DeliveryStats, StopReason, deliver};
use crate::handler::{ExportPlan, ExportRunner, RunError, RunOutcome};
use crate::ledger::{Claim, Ledger, LedgerStatus};
use crate::model::{DeliveryOutcome, UserDelta};
use crate::rejects::{RejectLog, RowReject, rejects_key};
use crate::report::{RunReport, RunStatus};
use crate::route::Route;
use crate::snapshot::store::{StateStore, Watermark};
use crate::sync::{ProduceOptions, Stop, Summary, SyncError, open_s3_part, produce};

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

/// Hands the rest of an unfinished export to a later invocation.
#[async_trait]
pub trait Continuation: Send + Sync {
    /// Queues a new trigger for the export.
    async fn hand_over(&self, plan: &ExportPlan) -> Result<(), String>;
}

/// [`Continuation`] through the function's own SQS queue: an S3-notification-shaped message for
/// the export's trigger object, which the next invocation resumes from the last checkpoint.
pub struct SqsContinuation {
    /// SQS client built once.
    pub client: aws_sdk_sqs::Client,
    /// The function's input queue.
    pub queue_url: String,
}

#[async_trait]
impl Continuation for SqsContinuation {
    async fn hand_over(&self, plan: &ExportPlan) -> Result<(), String> {
        let key = bridge_shared::s3_uri::encode_key(&plan.trigger.key);
        let body = json!({"Records": [{
            "eventSource": "aws:s3", "eventName": "ObjectCreated:Continuation",
            "s3": {"bucket": {"name": plan.trigger.bucket}, "object": {"key": key}}}]});
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body.to_string())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| aws_sdk_sqs::error::DisplayErrorContext(e).to_string())
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
}

/// What the committer saw.
#[derive(Default)]
struct Committed {
    confirmed: u64,
    checkpoints: u64,
    checkpoint_error: Option<String>,
}

fn run_id(plan: &ExportPlan) -> String {
    format!(
        "{}-{:08x}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
        xxhash_rust::xxh3::xxh3_64(plan.export_id.as_bytes()) as u32
    )
}

#[async_trait]
impl ExportRunner for SyncRunner {
    async fn run(
        &self,
        plan: &ExportPlan,
        remaining_ms: Option<u64>,
    ) -> Result<RunOutcome, RunError> {
        let started = Instant::now();
        let run_id = run_id(plan);
        let Some(route) = self.routes.get(&plan.route).cloned() else {
            return Err(RunError::Permanent {
                message: format!("no route named {:?} is configured", plan.route),
                report: None,
            });
        };
        let s = &self.settings;
        let mut report = RunReport::new(&run_id, route.name());
        report.export_id = Some(plan.export_id.clone());
        report.sources = plan
            .parts
            .iter()
            .map(|p| S3Uri::new(&plan.trigger.bucket, &p.key).to_string())
            .collect();
        report.started_at = Some(chrono::Utc::now().to_rfc3339());
        let report_uri = S3Uri::new(
            &s.state_bucket,
            format!("{}{}/{run_id}.json", s.reports_prefix, route.name()),
        );

        // One run per route at a time: exports of a route apply one after the other.
        let lock = Ledger::new(
            self.store.as_ref(),
            &s.state_bucket,
            format!("{}{}/", s.state_prefix, route.name()),
        );
        let lock_etag = match lock
            .claim(
                "route-lock",
                chrono::Utc::now().timestamp(),
                s.route_lease_s,
                false,
            )
            .await
        {
            Ok(Claim::Acquired { etag }) => etag,
            Ok(_) => {
                return Err(RunError::Retryable(format!(
                    "another export of route {} is syncing; this one waits its turn",
                    route.name()
                )));
            }
            Err(e) => return Err(RunError::Retryable(e.to_string())),
        };
        let result = self
            .run_locked(
                plan,
                &route,
                &run_id,
                &mut report,
                &report_uri,
                remaining_ms,
                started,
            )
            .await;
        if let Err(e) = lock
            .finish("route-lock", &lock_etag, LedgerStatus::Incomplete, None)
            .await
        {
            warn!(route = route.name(), error = %e, "Could not release the route claim; it expires by itself.");
        }
        result
    }
}

impl SyncRunner {
    #[allow(clippy::too_many_arguments)]
    async fn run_locked(
        &self,
        plan: &ExportPlan,
        route: &Arc<Route>,
        run_id: &str,
        report: &mut RunReport,
        report_uri: &S3Uri,
        remaining_ms: Option<u64>,
        started: Instant,
    ) -> Result<RunOutcome, RunError> {
        let s = &self.settings;
        let state = StateStore::new(
            self.store.clone(),
            &s.state_bucket,
            &s.state_prefix,
            route.name(),
        );
        let (mut head, snapshot) = match state.load(route).await {
            Ok(x) => x,
            Err(e) if e.is_retryable() => return Err(RunError::Retryable(e.to_string())),
            Err(e) => {
                return self
                    .fail(report, report_uri, started, format!("loading state: {e}"))
                    .await;
            }
        };
        if !plan.force_full && head.is_stale(plan.exported_at.as_deref()) {
            report.status = RunStatus::Skipped;
            report.notes.push(format!(
                "export is older than the one the state reflects ({:?}); skipped, never applied over newer data",
                head.doc.watermark
            ));
            info!(route = route.name(), export = %plan.trigger, "Skipping an export older than the state.");
            self.finish_report(report, report_uri, started).await;
            return Ok(RunOutcome {
                complete: true,
                report: Some(report_uri.to_string()),
                summary: json!({"status": "skipped_older_export"}),
            });
        }

        let mut opts = ProduceOptions::for_route(route, &plan.trigger.to_string());
        opts.full_resend |= plan.force_full;
        let snapshot = Arc::new(snapshot);
        let (delta_tx, delta_rx) = mpsc::channel::<UserDelta>(s.channel_capacity);
        let (out_tx, mut out_rx) = mpsc::channel::<DeliveryOutcome>(s.channel_capacity);

        // Stage 1: read → map → diff, blocking, feeding the sender.
        let producer = {
            let store = self.store.clone();
            let route = route.clone();
            let snapshot = snapshot.clone();
            let parts: Vec<S3Uri> = plan
                .parts
                .iter()
                .map(|p| S3Uri::new(&plan.trigger.bucket, &p.key))
                .collect();
            let handle = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                let mut rejects = RejectLog::new(crate::rejects::DEFAULT_MAX_BYTES);
                let parts_iter = parts
                    .iter()
                    .map(|uri| open_s3_part(&store, uri, &handle).map(|(_, part)| part));
                let summary = produce(
                    parts_iter,
                    &route,
                    &snapshot,
                    &opts,
                    &mut |d| {
                        delta_tx
                            .blocking_send(d)
                            .map_err(|_| Stop("the sender stopped".into()))
                    },
                    &mut |r| rejects.push(&r),
                );
                (summary, rejects)
            })
        };

        // Stage 2: send.
        let mut dcfg = s.deliver.clone();
        dcfg.deadline = self
            .deadline(remaining_ms)
            .map(tokio::time::Instant::from_std);
        let api = self.api.clone();
        let sender =
            tokio::spawn(async move { deliver(delta_rx, api.as_ref(), dcfg, out_tx).await });

        // Stage 3: commit what Braze confirmed, every few seconds.
        let mut committed = Committed::default();
        let mut pending: Vec<UserDelta> = Vec::new();
        let mut braze_rejects: Vec<RowReject> = Vec::new();
        let mut last_checkpoint = Instant::now();
        let mut tick = tokio::time::interval(s.checkpoint_every);
        loop {
            tokio::select! {
                outcome = out_rx.recv() => match outcome {
                    Some(DeliveryOutcome::Confirmed(d)) => {
                        committed.confirmed += 1;
                        pending.push(d);
                    }
                    Some(DeliveryOutcome::Rejected { delta, reason }) => {
                        braze_rejects.push(RowReject::from_braze(&delta, &reason));
                    }
                    Some(DeliveryOutcome::Unsent(_)) => {}
                    None => break,
                },
                _ = tick.tick() => {}
            }
            if !pending.is_empty() && last_checkpoint.elapsed() >= s.checkpoint_every {
                self.checkpoint(&state, &mut head, route, &mut pending, &mut committed)
                    .await;
                last_checkpoint = Instant::now();
            }
        }
        self.checkpoint(&state, &mut head, route, &mut pending, &mut committed)
            .await;

        let delivery = sender.await;
        let (produced, mut rejects) = producer
            .await
            .map_err(|e| RunError::Retryable(format!("the reader task failed: {e}")))?;
        for r in &braze_rejects {
            rejects.push(r);
        }
        let (stats, deliver_error): (DeliveryStats, Option<DeliverError>) = match delivery {
            Ok(Ok(stats)) => (stats, None),
            Ok(Err(e)) => (e.stats().clone(), Some(e)),
            Err(e) => return Err(RunError::Retryable(format!("the sender task failed: {e}"))),
        };
        report.apply_delivery(&stats);
        let summary: Option<Summary> = produced.as_ref().ok().cloned();
        if let Some(sm) = &summary {
            report.rows_in = sm.rows_read;
            report.unchanged = sm.unchanged;
            if !sm.ignored_columns.is_empty() {
                report.notes.push(format!(
                    "columns not mapped by the route were ignored: {:?}",
                    sm.ignored_columns
                ));
            }
        }
        report.rejected = rejects.total() - braze_rejects.len() as u64;
        if rejects.dropped() > 0 {
            report.notes.push(format!(
                "{} rejects were counted but not written (rejects object size bound)",
                rejects.dropped()
            ));
        }
        if !rejects.is_empty() {
            let uri = S3Uri::new(
                &s.state_bucket,
                rejects_key(&s.rejects_prefix, route.name(), run_id),
            );
            match self
                .store
                .put(
                    &uri,
                    rejects.into_body(),
                    PutCondition::None,
                    BTreeMap::new(),
                )
                .await
            {
                Ok(_) => report.rejects_object = Some(uri.to_string()),
                Err(e) => report
                    .notes
                    .push(format!("could not write the rejects object {uri}: {e}")),
            }
        }

        let unsent = stats.users_unsent > 0
            || matches!(stats.stopped, Some(StopReason::Deadline))
            || matches!(&produced, Err(SyncError::Stopped(_)));
        let read_error = match &produced {
            Err(SyncError::Stopped(_)) | Ok(_) => None,
            Err(e) => Some(e),
        };
        let checkpoint_failed = committed.checkpoint_error.clone();

        // Fold this run's segments into a new base; the watermark moves only when complete.
        let complete = deliver_error.is_none()
            && read_error.is_none()
            && !unsent
            && stats.braze_rejected == 0
            && checkpoint_failed.is_none();
        let watermark =
            (deliver_error.is_none() && read_error.is_none() && !unsent).then(|| Watermark {
                export_id: plan.export_id.clone(),
                exported_at: plan.exported_at.clone(),
            });
        // The producer has been joined, so this run holds the only reference.
        let commit_error = match (Arc::try_unwrap(snapshot), &checkpoint_failed) {
            (_, Some(_)) => None,
            (Ok(snap), None) => state
                .commit(&mut head, snap, watermark)
                .await
                .err()
                .map(|e| e.to_string()),
            (Err(_), None) => {
                Some("state snapshot still shared after the reader ended; not committed".into())
            }
        };

        if let Some(e) = deliver_error {
            let retryable = e.is_retryable();
            report.status = RunStatus::Failed;
            report.error = Some(e.to_string());
            self.finish_report(report, report_uri, started).await;
            return if retryable {
                Err(RunError::Retryable(e.to_string()))
            } else {
                Err(RunError::Permanent {
                    message: e.to_string(),
                    report: Some(report_uri.to_string()),
                })
            };
        }
        if let Some(e) = read_error {
            let retryable = e.is_retryable();
            let message = e.to_string();
            report.status = RunStatus::Failed;
            report.error = Some(message.clone());
            self.finish_report(report, report_uri, started).await;
            return if retryable {
                Err(RunError::Retryable(message))
            } else {
                Err(RunError::Permanent {
                    message,
                    report: Some(report_uri.to_string()),
                })
            };
        }
        if let Some(e) = checkpoint_failed.or(commit_error) {
            report.status = RunStatus::Incomplete;
            report.error = Some(e.clone());
            self.finish_report(report, report_uri, started).await;
            return Err(RunError::Retryable(e));
        }
        if unsent {
            report.status = RunStatus::Incomplete;
            report.notes.push(
                "stopped before the deadline; the rest was handed to a new invocation".into(),
            );
            if let Some(c) = &self.continuation {
                if let Err(e) = c.hand_over(plan).await {
                    report
                        .notes
                        .push(format!("hand-over failed ({e}); Lambda retries the run"));
                    self.finish_report(report, report_uri, started).await;
                    return Err(RunError::Retryable(format!("could not hand over: {e}")));
                }
            } else {
                self.finish_report(report, report_uri, started).await;
                return Err(RunError::Retryable("run cut short by its deadline".into()));
            }
        } else {
            report.status = if complete {
                RunStatus::Complete
            } else {
                RunStatus::Incomplete
            };
        }
        self.finish_report(report, report_uri, started).await;
        Ok(RunOutcome {
            complete,
            report: Some(report_uri.to_string()),
            summary: json!({
                "rows_in": report.rows_in, "rejected": report.rejected, "unchanged": report.unchanged,
                "users_sent": report.users_sent, "users_confirmed": report.users_confirmed,
                "braze_rejected": report.braze_rejected, "requests": report.requests,
                "checkpoints": committed.checkpoints,
            }),
        })
    }

    async fn checkpoint(
        &self,
        state: &StateStore,
        head: &mut crate::snapshot::store::Head,
        route: &Route,
        pending: &mut Vec<UserDelta>,
        committed: &mut Committed,
    ) {
        if pending.is_empty() || committed.checkpoint_error.is_some() {
            return;
        }
        match state.checkpoint(head, route, pending).await {
            Ok(()) => {
                committed.checkpoints += 1;
                pending.clear();
            }
            Err(e) => {
                warn!(route = route.name(), error = %e, "Checkpoint failed; confirmed users of this window will be re-sent by the retry.");
                committed.checkpoint_error = Some(e.to_string());
            }
        }
    }

    async fn fail(
        &self,
        report: &mut RunReport,
        report_uri: &S3Uri,
        started: Instant,
        message: String,
    ) -> Result<RunOutcome, RunError> {
        report.status = RunStatus::Failed;
        report.error = Some(message.clone());
        self.finish_report(report, report_uri, started).await;
        Err(RunError::Permanent {
            message,
            report: Some(report_uri.to_string()),
        })
    }

    async fn finish_report(&self, report: &mut RunReport, uri: &S3Uri, started: Instant) {
        report.duration_s = started.elapsed().as_secs_f64();
        report.finished_at = Some(chrono::Utc::now().to_rfc3339());
        if let Err(e) = report.put(self.store.as_ref(), uri).await {
            warn!(report = %uri, error = %e, "Could not write the run report.");
        }
        report.emit_metrics();
        info!(report = %uri, status = ?report.status, rows_in = report.rows_in,
              users_sent = report.users_sent, rejected = report.rejected, "Run finished.");
    }
}
