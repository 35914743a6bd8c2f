//! The Lambda edge of braze-sync: turns an invocation (direct S3 notification, SQS batch or
//! EventBridge event) into export runs. It decides which objects start a sync (by route
//! prefix; never our own outputs; in marker mode only the `.DONE` marker, which brings every
//! part of its folder), claims each export in the [`ledger`](crate::state::ledger) so duplicates are
//! no-ops, runs it through an [`ExportRunner`], and maps the outcome to Lambda's retry
//! semantics: retryable failures fail the SQS message (or the invocation), permanent ones are
//! reported and acknowledged so nothing loops forever.

use std::sync::Arc;

use async_trait::async_trait;
use bridge_shared::object_store::ObjectMeta;
use bridge_shared::trigger::{Invocation, ObjectRef, TriggerShape, parse_invocation};
use bridge_shared::{ObjectStore, S3Uri};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::config::route::RouteBinding;
use crate::ops::report::{MissingObject, RunReport, RunStatus};
use crate::state::ledger::{Claim, Ledger, LedgerStatus};
use crate::state::route_lock::{lock_uri, read_lock};

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
    /// Builds the handler once per container.
    pub fn new(
        cfg: HandlerConfig,
        store: Arc<dyn ObjectStore>,
        runner: Arc<dyn ExportRunner>,
    ) -> Self {
        Self { cfg, store, runner }
    }

    /// Handles one invocation payload. For SQS the result lists `batchItemFailures`; for the
    /// other shapes a retryable failure is an `Err` so Lambda retries the invocation.
    pub async fn handle(
        &self,
        payload: &Value,
        remaining_ms: Option<u64>,
    ) -> Result<Value, String> {
        let (pieces, rest) = split_fan_out(payload);
        let mut failures = Vec::new();
        let mut results = Vec::new();
        for (id, piece) in &pieces {
            match self.runner.run_piece(piece, remaining_ms).await {
                Ok(v) => results.push(v),
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
            for obj in &objects {
                match self
                    .process_object(obj, RunFlags::default(), remaining_ms)
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
        match self.process_object(&obj, flags, remaining_ms).await {
            ObjectOutcome::Done(v) => Ok(v),
            ObjectOutcome::Retry(reason) => Err(reason),
        }
    }

    /// A notification named an object that does not exist (deleted since, or a key decoded
    /// wrongly): never acknowledged silently. It is reported as `object_not_found` with the key
    /// as received and as decoded, in a report object and a metric, then acknowledged, since
    /// retrying cannot make a deleted object appear. Only a failure to write the report is
    /// retried.
    async fn object_not_found(&self, obj: &ObjectRef, route: &RouteBinding) -> ObjectOutcome {
        let uri = &obj.uri;
        let now = crate::clock::now();
        let run_id = format!(
            "{}-{:08x}",
            now.format("%Y%m%dT%H%M%S%.3fZ"),
            xxhash_rust::xxh3::xxh3_64(uri.to_string().as_bytes()) as u32
        );
        let mut report = RunReport::new(&run_id, &route.name);
        report.status = RunStatus::ObjectNotFound;
        report.sources = vec![uri.to_string()];
        report.started_at = Some(now.to_rfc3339());
        report.finished_at = Some(now.to_rfc3339());
        report.object_not_found = Some(MissingObject {
            object: uri.to_string(),
            key_received: obj.key_received.clone(),
            key_decoded: uri.key.clone(),
            event_name: obj.event_name.clone(),
        });
        report.error = Some(format!(
            "the notification names {uri} (key received as {:?}), which does not exist: it was \
             deleted or renamed after the notification, or the key was encoded unexpectedly",
            obj.key_received
        ));
        let report_uri = S3Uri::new(
            &self.cfg.state_bucket,
            format!("{}{}/{run_id}.json", self.cfg.reports_prefix, route.name),
        );
        warn!(
            object = %uri,
            key_received = %obj.key_received,
            key_decoded = %uri.key,
            route = %route.name,
            report = %report_uri,
            "Triggering object does not exist; reported as object_not_found."
        );
        report.emit_metrics();
        match report.put(self.store.as_ref(), &report_uri).await {
            Ok(()) => {}
            Err(e) if e.is_retryable() => return ObjectOutcome::Retry(e.to_string()),
            Err(e) => {
                warn!(report = %report_uri, error = %e, "Could not write the object_not_found report.");
            }
        }
        ObjectOutcome::Done(json!({
            "object": uri.to_string(), "route": route.name, "outcome": "object_not_found",
            "key_received": obj.key_received, "key_decoded": uri.key,
            "report": report_uri.to_string()}))
    }

    /// A replay of an export that was split across invocations: it waits while the fan-out
    /// run holds the route lock (its pieces are running), and claims the export once that run
    /// is gone (it died, or ended without recording it). Never a second fan-out at once.
    async fn claim_after_fan_out(
        &self,
        ledger: &Ledger<'_>,
        export_id: &str,
        route: &str,
        run_id: &str,
        now: i64,
    ) -> Result<String, String> {
        let lock = lock_uri(&self.cfg.state_bucket, &self.cfg.state_prefix, route);
        let held = read_lock(self.store.as_ref(), &lock)
            .await
            .map_err(|e| e.to_string())?
            .is_some_and(|l| {
                l.holder == run_id
                    && !l.released
                    && l.lease_until_ms > crate::clock::now().timestamp_millis()
            });
        if held {
            return Err(format!(
                "this export is being synced by fan-out run {run_id} (its pieces hold the route lock); the replay waits"
            ));
        }
        match ledger
            .take_over_fan_out(export_id, run_id, now, self.cfg.lease_s)
            .await
        {
            Ok(Claim::Acquired { etag }) => Ok(etag),
            Ok(_) => Err("the export's ledger entry changed; trying again".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn process_object(
        &self,
        obj: &ObjectRef,
        flags: RunFlags,
        remaining_ms: Option<u64>,
    ) -> ObjectOutcome {
        let uri = &obj.uri;
        let route = match decide(&self.cfg, uri) {
            Decision::Ignore(reason) => {
                info!(object = %uri, reason = %reason, "Object does not start a sync.");
                return ObjectOutcome::Done(json!({"object": uri.to_string(), "ignored": reason}));
            }
            Decision::Run(r) => r,
        };
        // The object as it is now: ETag, metadata (force flag), last-modified.
        let head = match self.store.head(uri).await {
            Ok(Some(h)) => h,
            Ok(None) => return self.object_not_found(obj, &route).await,
            Err(e) if e.is_retryable() => return ObjectOutcome::Retry(e.to_string()),
            Err(e) => {
                return ObjectOutcome::Done(
                    json!({"object": uri.to_string(), "failed": e.to_string()}),
                );
            }
        };
        let version = obj.version_id.clone().or(head.version_id.clone());
        let export_id = format!("{uri}#{}", version.unwrap_or_else(|| head.etag.clone()));
        let flag = |key: &str| {
            head.metadata
                .get(key)
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        };
        let force_full = flags.force_full || flag(FORCE_FULL_METADATA);
        let allow_departures = flags.allow_departures || flag(ALLOW_DEPARTURES_METADATA);
        let parts = match &route.marker_suffix {
            None => vec![head.clone()],
            Some(suffix) => match self.store.list(&uri.bucket, uri.folder()).await {
                Ok(listing) => parts_of_marker(&listing, uri, suffix),
                Err(e) if e.is_retryable() => return ObjectOutcome::Retry(e.to_string()),
                Err(e) => {
                    return ObjectOutcome::Done(
                        json!({"object": uri.to_string(), "failed": e.to_string()}),
                    );
                }
            },
        };
        let plan = ExportPlan {
            route: route.name.clone(),
            trigger: uri.clone(),
            parts,
            export_id: export_id.clone(),
            trigger_meta: head.clone(),
            force_full,
            allow_departures,
        };
        let ledger = Ledger::new(
            self.store.as_ref(),
            &self.cfg.state_bucket,
            format!("{}{}/ledger/", self.cfg.state_prefix, route.name),
        );
        let now = crate::clock::now().timestamp();
        let mut claim_etag = match ledger
            .claim(&export_id, now, self.cfg.lease_s, force_full)
            .await
        {
            Ok(Claim::Acquired { etag }) => etag,
            Ok(Claim::AlreadyComplete { report }) => {
                info!(object = %uri, route = %route.name, "Export already synced; duplicate trigger is a no-op.");
                return ObjectOutcome::Done(json!({
                    "object": uri.to_string(), "route": route.name,
                    "outcome": "duplicate_no_op", "report": report}));
            }
            Ok(Claim::Busy) => {
                return ObjectOutcome::Retry(format!(
                    "another invocation is syncing {uri} right now"
                ));
            }
            Ok(Claim::FannedOut { run_id }) => {
                match self
                    .claim_after_fan_out(&ledger, &export_id, &route.name, &run_id, now)
                    .await
                {
                    Ok(etag) => etag,
                    Err(reason) => return ObjectOutcome::Retry(reason),
                }
            }
            Err(e) => return ObjectOutcome::Retry(e.to_string()),
        };
        info!(object = %uri, route = %route.name, parts = plan.parts.len(), force_full, "Starting export sync.");
        // The claim's lease is short and renewed while the run lives.
        let result = ledger
            .renewing(
                self.runner.run(&plan, remaining_ms),
                &export_id,
                &mut claim_etag,
                self.cfg.lease_s,
            )
            .await;
        let mut hand_over = false;
        let mut stalled = 0;
        let mut fan_out = None;
        let result = match result {
            // A run whose report could not be written is not acknowledged: nothing would
            // record how it ended. Its retry finds the state it committed.
            Ok(o) if o.report.is_none() => Err(RunError::Retryable(
                "the run's report could not be written".into(),
            )),
            Err(RunError::Permanent {
                message,
                report: None,
            }) => Err(RunError::Retryable(format!(
                "{message} (and its report could not be written)"
            ))),
            other => other,
        };
        let (status, report, outcome) = match result {
            Ok(o) => {
                hand_over = o.hand_over;
                stalled = o.summary["stalled"].as_u64().unwrap_or(0) as u32;
                fan_out = o.fan_out.clone();
                let (status, word) = o.ledger_status();
                (
                    status,
                    o.report.clone(),
                    ObjectOutcome::Done(json!({
                        "object": uri.to_string(), "route": route.name,
                        "outcome": word, "report": o.report, "summary": o.summary})),
                )
            }
            Err(RunError::Retryable(reason)) => {
                warn!(object = %uri, error = %reason, "Export sync failed; it will be retried.");
                (LedgerStatus::Incomplete, None, ObjectOutcome::Retry(reason))
            }
            Err(RunError::KeyRefused { message, report }) => {
                warn!(object = %uri, error = %message, "Braze refused the API key; the export stays retryable.");
                (
                    LedgerStatus::FailedRetryable,
                    report,
                    ObjectOutcome::Retry(message),
                )
            }
            Err(RunError::Permanent { message, report }) => {
                warn!(object = %uri, error = %message, "Export sync failed permanently; see the report.");
                (
                    LedgerStatus::Failed,
                    report.clone(),
                    ObjectOutcome::Done(json!({
                        "object": uri.to_string(), "route": route.name,
                        "outcome": "failed", "error": message, "report": report})),
                )
            }
        };
        let recorded = match (&status, &fan_out) {
            (LedgerStatus::FannedOut, Some(run_id)) => {
                ledger
                    .finish_fanned_out(&export_id, &claim_etag, run_id, report)
                    .await
            }
            _ => {
                ledger
                    .finish_stalled(&export_id, &claim_etag, status, report, stalled)
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
        // Only now, with the route lock and the export claim released, may the rest be queued:
        // the continuation never meets this run's own claims.
        if hand_over && let Err(e) = self.runner.hand_over(&plan).await {
            warn!(object = %uri, error = %e, "Could not hand the rest of the export over; the trigger is retried.");
            return ObjectOutcome::Retry(format!("could not hand over: {e}"));
        }
        outcome
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg() -> HandlerConfig {
        HandlerConfig {
            state_bucket: "state".into(),
            output_prefixes: vec!["bridge/".into()],
            state_prefix: "bridge/state/".into(),
            reports_prefix: "bridge/reports/".into(),
            routes: vec![
                RouteBinding {
                    name: "customers".into(),
                    bucket: None,
                    prefix: "amperity/customers/".into(),
                    marker_suffix: None,
                },
                RouteBinding {
                    name: "audiences".into(),
                    bucket: None,
                    prefix: "amperity/audiences/".into(),
                    marker_suffix: Some(".DONE".into()),
                },
            ],
            lease_s: 900,
        }
    }

    #[test]
    fn own_outputs_never_start_a_sync() {
        let d = decide(
            &cfg(),
            &S3Uri::new("state", "bridge/state/customers/head.json"),
        );
        assert!(matches!(d, Decision::Ignore(_)));
    }

    #[test]
    fn object_under_no_route_is_ignored() {
        assert!(matches!(
            decide(&cfg(), &S3Uri::new("x", "other/file.csv")),
            Decision::Ignore(_)
        ));
    }

    #[test]
    fn marker_mode_parts_wait_for_the_marker() {
        assert!(matches!(
            decide(
                &cfg(),
                &S3Uri::new("x", "amperity/audiences/run1/part-0001.csv")
            ),
            Decision::Ignore(_)
        ));
        assert!(matches!(
            decide(&cfg(), &S3Uri::new("x", "amperity/audiences/run1/.DONE")),
            Decision::Run(_)
        ));
    }

    #[test]
    fn marker_parts_are_the_folder_in_key_order_without_markers() {
        let meta = |k: &str| ObjectMeta {
            key: k.into(),
            ..Default::default()
        };
        let listing = vec![
            meta("a/run1/part-0002.csv"),
            meta("a/run1/.DONE"),
            meta("a/run1/part-0001.csv"),
            meta("a/run1/sub/x.csv"),
            meta("a/run10/part-0001.csv"),
        ];
        let parts = parts_of_marker(&listing, &S3Uri::new("b", "a/run1/.DONE"), ".DONE");
        let keys: Vec<_> = parts.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["a/run1/part-0001.csv", "a/run1/part-0002.csv"]);
    }

    #[test]
    fn fan_out_pieces_are_taken_out_of_an_sqs_batch() {
        let piece = json!({"bridge_fan_out": {"route": "r", "run_id": "x", "piece": 2}});
        let s3 = json!({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": "b"}, "object": {"key": "k"}}}]});
        let batch = json!({"Records": [
            {"messageId": "a", "body": piece.to_string(), "eventSource": "aws:sqs"},
            {"messageId": "b", "body": s3.to_string(), "eventSource": "aws:sqs"}]});
        let (pieces, rest) = split_fan_out(&batch);
        assert_eq!(
            pieces,
            vec![(Some("a".to_string()), piece[FAN_OUT_KEY].clone())]
        );
        let rest = rest.unwrap();
        assert_eq!(rest["Records"].as_array().unwrap().len(), 1);
        assert_eq!(rest["Records"][0]["messageId"], "b");
        // Only pieces: nothing else to parse. Not SQS: untouched.
        let only = json!({"Records": [{"messageId": "a", "body": piece.to_string(), "eventSource": "aws:sqs"}]});
        assert!(split_fan_out(&only).1.is_none());
        let (pieces, rest) = split_fan_out(&s3);
        assert!(pieces.is_empty());
        assert_eq!(rest.unwrap(), s3);
    }
}
