//! The Lambda edge of braze-sync: turns an invocation (direct S3 notification, SQS batch or
//! EventBridge event) into export runs. It decides which objects start a sync (by route
//! prefix; never our own outputs; in marker mode only the `.DONE` marker, which brings every
//! part of its folder), claims each export in the [`ledger`](crate::state::ledger) so duplicates are
//! no-ops, runs it through an [`ExportRunner`], and maps the outcome to Lambda's retry
//! semantics: retryable failures fail the SQS message (or the invocation), permanent ones are
//! reported and acknowledged so nothing loops forever. A message that fails retryably on its
//! last receive (the queue's `maxReceiveCount`) is reported, and its export recorded in the
//! ledger, before it goes to the dead-letter queue ([`edge_reports`]).

mod claim;
mod edge_reports;
mod live_run;
mod run_end;

use std::sync::Arc;

use async_trait::async_trait;
use bridge_shared::object_store::ObjectMeta;
use bridge_shared::trigger::{Invocation, ObjectRef, TriggerShape, parse_invocation};
use bridge_shared::{ObjectStore, S3Uri};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::config::route::RouteBinding;
use crate::ops::report::RunStatus;
use crate::state::ledger::{Ledger, LedgerStatus};
use edge_reports::GiveUp;
use run_end::RunEnd;

/// Object metadata key that forces a full resend of an export (`x-amz-meta-bridge-force-full: true`).
pub const FORCE_FULL_METADATA: &str = "bridge-force-full";

/// Object metadata key that releases held departures (`x-amz-meta-bridge-allow-departures: true`).
pub const ALLOW_DEPARTURES_METADATA: &str = "bridge-allow-departures";

/// What the handler needs to know about the deployment.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    /// Bucket holding state, reports and rejects.
    pub state_bucket: String,
    /// Prefixes (ending in `/`) the function writes to; objects under them never start a sync.
    pub output_prefixes: Vec<String>,
    /// Prefix of state (ledger lives under `<state_prefix><route>/ledger/`).
    pub state_prefix: String,
    /// Prefix of run reports (`<reports_prefix><route>/<run-id>.json`), where a notification
    /// naming a missing object is reported.
    pub reports_prefix: String,
    /// Routes, first match wins.
    pub routes: Vec<RouteBinding>,
    /// How long a claim holds before another invocation may take over, seconds; renewed every
    /// third of it while the run lives.
    pub lease_s: i64,
}

/// One export to sync: its route, the object that triggered it and its parts in order.
#[derive(Debug, Clone)]
pub struct ExportPlan {
    /// Route name.
    pub route: String,
    /// The object whose arrival started the run (the file itself, or the `.DONE` marker).
    pub trigger: S3Uri,
    /// Parts to read, in key order (one for single-object exports).
    pub parts: Vec<ObjectMeta>,
    /// Stable id: trigger address plus ETag/version, the ledger key.
    pub export_id: String,
    /// The trigger object as it was when the run was planned (ETag, LastModified, metadata):
    /// the runner dates the export from it as the route's `order_by` says.
    pub trigger_meta: ObjectMeta,
    /// Resend every attribute, ignoring confirmed state.
    pub force_full: bool,
    /// Send departures the guard would hold (`bridge-allow-departures=true` or
    /// `--allow-departures`).
    pub allow_departures: bool,
    /// A replay forced by object metadata salts its row digests with this (the export and the
    /// upload it is for), so a continuation of the same replay skips the rows it resent
    /// instead of resending from the first row ([`ExportPlan::resend_salt`]). `None`: not
    /// forced by metadata (an operator's `--force-full` resends every row each time).
    pub forced_salt: Option<u64>,
}

impl ExportPlan {
    /// The salt of this run's row digests when it resends every row
    /// ([`crate::diff::export::ProduceOptions::resend_salt`]): the forced replay's own, or,
    /// on a route that resends everything (`full_resend`), the export's, so a run that hands
    /// over goes on where it stopped. An operator's `--force-full` has none.
    pub fn resend_salt(&self, route_full_resend: bool) -> Option<u64> {
        self.forced_salt.or_else(|| {
            (route_full_resend && !self.force_full)
                .then(|| xxhash_rust::xxh3::xxh3_64(self.export_id.as_bytes()))
        })
    }
}

/// How a run ended, as the runner reports it.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The run's status (`complete`: nothing is left to send for this export).
    pub status: RunStatus,
    /// The run report's address.
    pub report: Option<String>,
    /// A one-line summary for the invocation result.
    pub summary: Value,
    /// The run stopped before its deadline with users left: once the export's claim is
    /// released, [`ExportRunner::hand_over`] queues the rest.
    pub hand_over: bool,
    /// The export was split across invocations by this fan-out run (its ledger entry stays
    /// open until the last piece finishes it).
    pub fan_out: Option<String>,
    /// Why not every piece of the fan-out could be queued: the fan-out stays (a queued piece
    /// may be running), and the export's retry queues them all again.
    pub pieces_unqueued: Option<String>,
}

impl RunOutcome {
    /// Nothing is left to do for this export: a duplicate trigger is a no-op.
    pub fn complete(&self) -> bool {
        self.status == RunStatus::Complete
    }

    /// How the export's claim is recorded, and the outcome word of the invocation result.
    pub fn ledger_status(&self) -> (LedgerStatus, &'static str) {
        match self.status {
            RunStatus::Complete => (LedgerStatus::Complete, "synced"),
            RunStatus::SkippedStale => (LedgerStatus::SkippedStale, "skipped_stale"),
            RunStatus::DeparturesHeld => (LedgerStatus::Incomplete, "departures_held"),
            RunStatus::FannedOut => (LedgerStatus::FannedOut, "fanned_out"),
            _ => (LedgerStatus::Incomplete, "incomplete"),
        }
    }
}

/// A failed run, classified at the edge.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Trying again later can succeed (throttling, 5xx, lost race, deadline hand-over).
    #[error("{0}")]
    Retryable(String),
    /// It will fail the same way again (unreadable file, bad config).
    #[error("{message}")]
    Permanent {
        /// What failed, with where.
        message: String,
        /// The report written for it, if any.
        report: Option<String>,
    },
    /// Braze refused the API key (401/403), even after it was read again from its store. The
    /// export stays retryable: its ledger entry is not final, and the notification is retried,
    /// so a redelivered or re-copied notification syncs once the key is fixed.
    #[error("{message}")]
    KeyRefused {
        /// What Braze said and what to check (never the key).
        message: String,
        /// The report written for it.
        report: Option<String>,
    },
    /// Another run completed the export while this one waited for the route (a fan-out's
    /// finalizer over a redelivered trigger's claim): nothing ran, and the export's ledger
    /// entry and report are that run's. Answered as a duplicate.
    #[error("the export was completed by another run meanwhile")]
    CompletedMeanwhile {
        /// That run's report.
        report: Option<String>,
    },
}

/// Runs one export (read → map → diff → send → commit).
#[async_trait]
pub trait ExportRunner: Send + Sync {
    /// Syncs the export. `remaining_ms` is the invocation's time left, when known.
    async fn run(
        &self,
        plan: &ExportPlan,
        remaining_ms: Option<u64>,
    ) -> Result<RunOutcome, RunError>;

    /// Queues the rest of an export whose run asked for a hand-over. Called after the run's
    /// route lock and export claim are released.
    async fn hand_over(&self, _plan: &ExportPlan) -> Result<(), String> {
        Err("this runner cannot hand work over".into())
    }

    /// [`ExportRunner::hand_over`], delivered no sooner than `delay` from now (a run that
    /// found its route busy, `hand_over_delay_s` in its summary).
    async fn hand_over_after(
        &self,
        plan: &ExportPlan,
        delay: std::time::Duration,
    ) -> Result<(), String> {
        let _ = delay;
        self.hand_over(plan).await
    }

    /// Queues pieces `0..pieces` of fan-out run `run_id` of `route` (again: a piece queued
    /// twice runs once).
    async fn queue_fan_out(
        &self,
        _route: &str,
        _run_id: &str,
        _pieces: usize,
    ) -> Result<(), String> {
        Err("this runner cannot fan out".into())
    }

    /// Runs one piece of an export split across invocations: `message` is the value under
    /// [`FAN_OUT_KEY`] of a message this function queued for itself. Returns the piece's
    /// result document.
    async fn run_piece(
        &self,
        _message: &Value,
        _remaining_ms: Option<u64>,
    ) -> Result<Value, RunError> {
        Err(RunError::Permanent {
            message: "this runner cannot run fan-out pieces".into(),
            report: None,
        })
    }
}

/// The key of a message this function queues for itself to run one piece of an export split
/// across invocations: `{"bridge_fan_out": {"route", "run_id", "piece"}}`.
pub const FAN_OUT_KEY: &str = "bridge_fan_out";

/// Takes the fan-out piece messages out of an SQS payload: `(message id, piece message)` for
/// each, and the payload without them (`None` when nothing else is left).
pub fn split_fan_out(payload: &Value) -> (Vec<(Option<String>, Value)>, Option<Value>) {
    let records = match payload.get("Records").and_then(Value::as_array) {
        Some(r)
            if r.first()
                .and_then(|r| r.get("eventSource"))
                .and_then(Value::as_str)
                == Some("aws:sqs") =>
        {
            r
        }
        _ => return (Vec::new(), Some(payload.clone())),
    };
    let mut pieces = Vec::new();
    let mut rest = Vec::new();
    for r in records {
        let piece = r
            .get("body")
            .and_then(Value::as_str)
            .and_then(|b| serde_json::from_str::<Value>(b).ok())
            .and_then(|mut b| b.get_mut(FAN_OUT_KEY).map(Value::take));
        match piece {
            Some(p) => pieces.push((
                r.get("messageId").and_then(Value::as_str).map(String::from),
                p,
            )),
            None => rest.push(r.clone()),
        }
    }
    if rest.is_empty() && !pieces.is_empty() {
        return (pieces, None);
    }
    let mut payload = payload.clone();
    payload["Records"] = Value::Array(rest);
    (pieces, Some(payload))
}

/// What the handler decided for one object.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Not ours, or a part that waits for its marker.
    Ignore(String),
    /// Sync it under this route.
    Run(RouteBinding),
}

/// Decides whether an object starts a sync (pure).
pub fn decide(cfg: &HandlerConfig, obj: &S3Uri) -> Decision {
    if obj.bucket == cfg.state_bucket
        && cfg
            .output_prefixes
            .iter()
            .any(|p| obj.key.starts_with(p.as_str()))
    {
        return Decision::Ignore("object is under one of this function's output prefixes".into());
    }
    if obj.key.ends_with('/') {
        return Decision::Ignore("folder placeholder".into());
    }
    let Some(route) = cfg.routes.iter().find(|r| r.owns(obj)) else {
        return Decision::Ignore("no route owns this key".into());
    };
    if let Some(marker) = &route.marker_suffix
        && !obj.key.ends_with(marker.as_str())
    {
        return Decision::Ignore(format!(
            "part of a marker-mode export of route {}; it is synced when its {marker} marker lands",
            route.name
        ));
    }
    Decision::Run(route.clone())
}

/// The parts of a marker-mode export: every object in the marker's folder except markers and
/// folder placeholders, in key order (pure).
pub fn parts_of_marker(listing: &[ObjectMeta], marker: &S3Uri, suffix: &str) -> Vec<ObjectMeta> {
    let folder = marker.folder();
    let mut parts: Vec<ObjectMeta> = listing
        .iter()
        .filter(|o| {
            o.key.starts_with(folder)
                && !o.key[folder.len()..].contains('/')
                && !o.key.ends_with(suffix)
                && !o.key.ends_with('/')
                && !o.key.rsplit('/').next().unwrap_or("").starts_with('.')
        })
        .cloned()
        .collect();
    parts.sort_by(|a, b| a.key.cmp(&b.key));
    parts
}

/// Object metadata key an uploader may set to the export's own time (RFC 3339), read when the
/// route has `order_by = "metadata"`.
pub use crate::config::export_order::EXPORTED_AT_METADATA;

/// The Lambda handler over a store and a runner.
pub struct Handler {
    cfg: HandlerConfig,
    store: Arc<dyn ObjectStore>,
    runner: Arc<dyn ExportRunner>,
    max_receive_count: Option<u32>,
}

/// What the operator asked of a run from the CLI (the same as object metadata).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunFlags {
    /// `--force-full`: resend every attribute.
    pub force_full: bool,
    /// `--allow-departures`: release departures the guard would hold.
    pub allow_departures: bool,
}

/// Outcome of one object, for the invocation result.
#[derive(Debug)]
enum ObjectOutcome {
    Done(Value),
    Retry(String),
}

impl Handler {
    /// Builds the handler once per container; its store is
    /// [`RetryingStore`](crate::state::retrying::RetryingStore)-wrapped.
    pub fn new(
        cfg: HandlerConfig,
        store: Arc<dyn ObjectStore>,
        runner: Arc<dyn ExportRunner>,
    ) -> Self {
        let store = crate::state::retrying::RetryingStore::wrap(store);
        Self {
            cfg,
            store,
            runner,
            max_receive_count: None,
        }
    }

    /// The `maxReceiveCount` of the queue that invokes the function (`BRIDGE_MAX_RECEIVE_COUNT`):
    /// a message that fails retryably on that receive goes to the dead-letter queue next, so
    /// it is reported first. `None`: no receive is known to be the last.
    pub fn with_max_receive_count(mut self, max: Option<u32>) -> Self {
        self.max_receive_count = max;
        self
    }

    /// The receive count of an SQS message when it is the last one its queue allows.
    fn last_receive(&self, counts: &[(String, u32)], message_id: Option<&str>) -> Option<u32> {
        let max = self.max_receive_count?;
        let id = message_id?;
        counts
            .iter()
            .find(|(m, _)| m == id)
            .map(|(_, n)| *n)
            .filter(|n| *n >= max)
    }

    /// Handles one invocation payload. For SQS the result lists `batchItemFailures`; for the
    /// other shapes a retryable failure is an `Err` so Lambda retries the invocation.
    pub async fn handle(
        &self,
        payload: &Value,
        remaining_ms: Option<u64>,
    ) -> Result<Value, String> {
        // Each record sees the time really left when it starts, not the invocation's at its start.
        let started = tokio::time::Instant::now();
        let left =
            || remaining_ms.map(|ms| ms.saturating_sub(started.elapsed().as_millis() as u64));
        let counts = receive_counts(payload);
        let (pieces, rest) = split_fan_out(payload);
        let mut failures = Vec::new();
        let mut results = Vec::new();
        for (id, piece) in &pieces {
            match self.runner.run_piece(piece, left()).await {
                Ok(v) => results.push(v),
                Err(RunError::CompletedMeanwhile { report }) => {
                    results.push(
                        json!({"piece": piece, "outcome": "duplicate_no_op", "report": report}),
                    );
                }
                Err(RunError::Permanent { message, report }) => {
                    warn!(piece = %piece, error = %message, "Fan-out piece failed permanently; see the report.");
                    results.push(json!({"piece": piece, "outcome": "failed", "error": message, "report": report}));
                }
                Err(
                    RunError::Retryable(reason)
                    | RunError::KeyRefused {
                        message: reason, ..
                    },
                ) => {
                    warn!(piece = %piece, error = %reason, "Fan-out piece failed; it will be retried.");
                    if let Some(n) = self.last_receive(&counts, id.as_deref()) {
                        self.give_up_piece_report(piece, n, &reason).await;
                    }
                    results.push(json!({"piece": piece, "retry": reason}));
                    failures.push(json!({"itemIdentifier": id}));
                }
            }
        }
        let Some(payload) = rest else {
            return Ok(json!({"batchItemFailures": failures, "results": results}));
        };
        let payload = &payload;
        let invocation: Invocation = match parse_invocation(payload) {
            Ok(i) => i,
            Err(e) => {
                // A payload we cannot read will not become readable: acknowledge and log.
                warn!(error = %e, "Ignoring an invocation payload that names no S3 object.");
                return Ok(json!({"ignored": e.to_string()}));
            }
        };
        for item in &invocation.items {
            let objects = match &item.objects {
                Ok(o) => o.clone(),
                Err(e) => {
                    warn!(message_id = ?item.message_id, error = %e, "Message names no S3 object; acknowledged.");
                    results.push(json!({"message_id": item.message_id, "ignored": e.to_string()}));
                    continue;
                }
            };
            let mut retry = None;
            let last = self.last_receive(&counts, item.message_id.as_deref());
            for obj in &objects {
                match self
                    .process_object(obj, RunFlags::default(), left(), last)
                    .await
                {
                    ObjectOutcome::Done(v) => results.push(v),
                    ObjectOutcome::Retry(reason) => {
                        results.push(json!({"object": obj.uri.to_string(), "retry": reason}));
                        retry = Some(reason);
                    }
                }
            }
            if let Some(reason) = retry {
                match (&invocation.shape, &item.message_id) {
                    (TriggerShape::Sqs, Some(id)) => {
                        failures.push(json!({"itemIdentifier": id}));
                    }
                    _ => return Err(reason),
                }
            }
        }
        if invocation.shape == TriggerShape::Sqs {
            Ok(json!({"batchItemFailures": failures, "results": results}))
        } else {
            Ok(json!({"results": results}))
        }
    }

    /// Syncs one object as if it had just landed (the operator's `run` command). Returns the
    /// object's result document, or the reason to retry.
    pub async fn run_object(
        &self,
        uri: &S3Uri,
        flags: RunFlags,
        remaining_ms: Option<u64>,
    ) -> Result<Value, String> {
        let obj = ObjectRef::named(uri.clone(), "ObjectCreated:Cli");
        match self.process_object(&obj, flags, remaining_ms, None).await {
            ObjectOutcome::Done(v) => Ok(v),
            ObjectOutcome::Retry(reason) => Err(reason),
        }
    }

    /// One triggering object, end to end: decide, plan, claim the export, run it under the
    /// renewed claim, record how it ended and, with the claim released, hand the rest over.
    /// `last_receive` is the receive count when its message will not be delivered again: a
    /// retryable failure is then reported (and, under the claim, recorded in the ledger) first.
    async fn process_object(
        &self,
        obj: &ObjectRef,
        flags: RunFlags,
        remaining_ms: Option<u64>,
        last_receive: Option<u32>,
    ) -> ObjectOutcome {
        let uri = &obj.uri;
        let route = match decide(&self.cfg, uri) {
            Decision::Ignore(reason) => {
                info!(object = %uri, reason = %reason, "Object does not start a sync.");
                return ObjectOutcome::Done(json!({"object": uri.to_string(), "ignored": reason}));
            }
            Decision::Run(r) => r,
        };
        let give_up = GiveUp {
            trigger: uri,
            route: &route.name,
            export_id: None,
            run_report: None,
        };
        let plan = match self.plan_export(obj, &route, flags).await {
            Ok(plan) => plan,
            Err(outcome) => {
                return self.unless_last(outcome, last_receive, give_up).await;
            }
        };
        let ledger = Ledger::new(
            self.store.as_ref(),
            &self.cfg.state_bucket,
            format!("{}{}/ledger/", self.cfg.state_prefix, route.name),
        )
        .forced_upload(forced_upload(&plan, flags));
        let mut claim_etag = match self.claim_export(&ledger, &plan).await {
            Ok(etag) => etag,
            Err(outcome) => {
                let at = GiveUp {
                    export_id: Some(&plan.export_id),
                    ..give_up
                };
                return self.unless_last(outcome, last_receive, at).await;
            }
        };
        info!(object = %uri, route = %route.name, parts = plan.parts.len(), force_full = plan.force_full, "Starting export sync.");
        // The claim's lease is short and renewed while the run lives.
        let result = ledger
            .renewing(
                self.runner.run(&plan, remaining_ms),
                &plan.export_id,
                &mut claim_etag,
                self.cfg.lease_s,
            )
            .await;
        let mut ended = RunEnd::of(&plan, result);
        // On the last receive the claim still held records the give-up and its report.
        let mut gave_up = false;
        if let (Some(n), ObjectOutcome::Retry(reason)) = (last_receive, &ended.outcome) {
            let at = GiveUp {
                export_id: Some(&plan.export_id),
                run_report: ended.report.as_deref(),
                ..give_up
            };
            if let Some(report) = self.give_up_report(at, n, reason).await {
                ended.status = LedgerStatus::FailedRetryable;
                ended.report = Some(report);
                gave_up = true;
            }
        }
        let outcome = self
            .record_and_hand_over(&ledger, &plan, &claim_etag, ended)
            .await;
        if gave_up {
            return outcome;
        }
        let at = GiveUp {
            export_id: Some(&plan.export_id),
            ..give_up
        };
        self.unless_last(outcome, last_receive, at).await
    }

    /// A retryable outcome on the last receive is reported before its message goes to the
    /// dead-letter queue; any other outcome is returned as it is.
    async fn unless_last(
        &self,
        outcome: ObjectOutcome,
        last_receive: Option<u32>,
        at: GiveUp<'_>,
    ) -> ObjectOutcome {
        if let (Some(n), ObjectOutcome::Retry(reason)) = (last_receive, &outcome) {
            self.give_up_report(at, n, reason).await;
        }
        outcome
    }

    /// The export an object starts, read from the object as it is now (ETag, metadata flags,
    /// last-modified) and, in marker mode, its folder's parts. A missing object is reported;
    /// a failed read is retried or, when permanent, answered as the object's failure.
    async fn plan_export(
        &self,
        obj: &ObjectRef,
        route: &RouteBinding,
        flags: RunFlags,
    ) -> Result<ExportPlan, ObjectOutcome> {
        let uri = &obj.uri;
        let head = match self.store.head(uri).await {
            Ok(Some(h)) => h,
            Ok(None) => return Err(self.object_not_found(obj, route).await),
            Err(e) if e.is_retryable() => return Err(ObjectOutcome::Retry(e.to_string())),
            Err(e) => return Err(self.trigger_unreadable(obj, route, "HeadObject", e).await),
        };
        let version = obj.version_id.clone().or(head.version_id.clone());
        let export_id = format!("{uri}#{}", version.unwrap_or_else(|| head.etag.clone()));
        let flag = |key: &str| {
            head.metadata
                .get(key)
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        };
        let force_full = flags.force_full || flag(FORCE_FULL_METADATA);
        // The upload a metadata-forced replay is for, as the ledger records it.
        let forced_salt = (flag(FORCE_FULL_METADATA) && !flags.force_full).then(|| {
            let upload = head.last_modified.as_deref().unwrap_or(&head.etag);
            xxhash_rust::xxh3::xxh3_64(format!("{export_id}#{upload}").as_bytes())
        });
        let allow_departures = flags.allow_departures || flag(ALLOW_DEPARTURES_METADATA);
        let parts = match &route.marker_suffix {
            None => vec![head.clone()],
            Some(suffix) => match self.store.list(&uri.bucket, uri.folder()).await {
                Ok(listing) => parts_of_marker(&listing, uri, suffix),
                Err(e) if e.is_retryable() => return Err(ObjectOutcome::Retry(e.to_string())),
                Err(e) => {
                    return Err(self
                        .trigger_unreadable(obj, route, "ListObjectsV2", e)
                        .await);
                }
            },
        };
        Ok(ExportPlan {
            route: route.name.clone(),
            trigger: uri.clone(),
            parts,
            export_id,
            trigger_meta: head,
            force_full,
            allow_departures,
            forced_salt,
        })
    }

    /// Records how the run ended in the ledger (a fanned-out export stays open for its pieces)
    /// and, only once the route lock and the export claim are released, queues the rest of a
    /// run that stopped early: the continuation never meets this run's own claims.
    async fn record_and_hand_over(
        &self,
        ledger: &Ledger<'_>,
        plan: &ExportPlan,
        claim_etag: &str,
        ended: RunEnd,
    ) -> ObjectOutcome {
        let uri = &plan.trigger;
        let export_id = &plan.export_id;
        if ended.recorded_elsewhere {
            return ended.outcome;
        }
        let recorded = match (&ended.status, &ended.fan_out) {
            (LedgerStatus::FannedOut, Some(run_id)) => {
                ledger
                    .finish_fanned_out(export_id, claim_etag, run_id, ended.report, ended.requeue)
                    .await
            }
            _ => {
                ledger
                    .finish_stalled(
                        export_id,
                        claim_etag,
                        ended.status,
                        ended.report,
                        ended.counts,
                    )
                    .await
            }
        };
        if let Err(e) = recorded {
            // Acknowledged, the notification would leave the export claimed with no record
            // of how it ended: it is retried instead (a claim that is already final answers
            // the retry as a duplicate).
            warn!(object = %uri, error = %e, "Could not record the run in the ledger; the notification is retried.");
            return ObjectOutcome::Retry(format!("recording the run in the ledger: {e}"));
        }
        if ended.hand_over
            && let Err(e) = self.runner.hand_over_after(plan, ended.delay).await
        {
            warn!(object = %uri, error = %e, "Could not hand the rest of the export over; the trigger is retried.");
            return ObjectOutcome::Retry(format!("could not hand over: {e}"));
        }
        ended.outcome
    }
}

/// `(message id, ApproximateReceiveCount)` of each SQS record of a payload.
fn receive_counts(payload: &Value) -> Vec<(String, u32)> {
    let Some(records) = payload.get("Records").and_then(Value::as_array) else {
        return Vec::new();
    };
    records
        .iter()
        .filter_map(|r| {
            let id = r.get("messageId")?.as_str()?;
            let n = r.get("attributes")?.get("ApproximateReceiveCount")?;
            let n = n
                .as_str()
                .and_then(|s| s.parse().ok())
                .or_else(|| n.as_u64().and_then(|n| u32::try_from(n).ok()))?;
            Some((id.to_string(), n))
        })
        .collect()
}

/// The upload a replay forced by object metadata is for (the trigger's last-modified time, else
/// its ETag): it replays once, and further notifications of the same upload are duplicates.
/// An operator's `--force-full` forces every time (`None`).
fn forced_upload(plan: &ExportPlan, flags: RunFlags) -> Option<String> {
    (plan.force_full && !flags.force_full).then(|| {
        let meta = &plan.trigger_meta;
        meta.last_modified
            .clone()
            .unwrap_or_else(|| meta.etag.clone())
    })
}
