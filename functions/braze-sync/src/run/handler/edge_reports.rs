//! The reports the Lambda edge writes itself, when no run writes one: a notification naming a
//! missing object, a trigger the function may not read, and a notification on its last receive
//! that fails retryably (it goes to the dead-letter queue next, matched by this report).

use bridge_shared::S3Uri;
use bridge_shared::object_store::StoreError;
use bridge_shared::trigger::ObjectRef;
use serde_json::{Value, json};
use tracing::warn;

use super::{Handler, ObjectOutcome};
use crate::config::route::RouteBinding;
use crate::ops::report::{MissingObject, RunReport, RunStatus};

impl Handler {
    /// A report of `status` for a notification of `uri` under `route`, with its address
    /// (`<reports_prefix><route>/<run-id>.json`; `kind` keeps reports of one object in the
    /// same millisecond apart).
    fn edge_report(
        &self,
        uri: &S3Uri,
        route: &str,
        status: RunStatus,
        kind: &str,
    ) -> (RunReport, S3Uri) {
        let now = crate::clock::now();
        let run_id = format!(
            "{}-{:08x}",
            now.format("%Y%m%dT%H%M%S%.3fZ"),
            xxhash_rust::xxh3::xxh3_64(format!("{uri}{kind}").as_bytes()) as u32
        );
        let mut report = RunReport::new(&run_id, route);
        report.status = status;
        report.sources = vec![uri.to_string()];
        report.started_at = Some(now.to_rfc3339());
        report.finished_at = Some(now.to_rfc3339());
        let report_uri = S3Uri::new(
            &self.cfg.state_bucket,
            format!("{}{route}/{run_id}.json", self.cfg.reports_prefix),
        );
        (report, report_uri)
    }

    /// A notification named an object that does not exist (deleted since, or a key decoded
    /// wrongly): never acknowledged silently. It is reported as `object_not_found` with the key
    /// as received and as decoded, in a report object and a metric, then acknowledged, since
    /// retrying cannot make a deleted object appear. Only a failure to write the report is
    /// retried.
    pub(super) async fn object_not_found(
        &self,
        obj: &ObjectRef,
        route: &RouteBinding,
    ) -> ObjectOutcome {
        let uri = &obj.uri;
        let (mut report, report_uri) =
            self.edge_report(uri, &route.name, RunStatus::ObjectNotFound, "");
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

    /// The trigger (or its folder) cannot be read for good (403: the function's role or the
    /// bucket's KMS key refuses it): never acknowledged without a record. A `failed` report
    /// names the object, the call and what to check, with its metrics, then the notification is
    /// acknowledged (retrying cannot grant a permission); only a failure to write the report
    /// is retried.
    pub(super) async fn trigger_unreadable(
        &self,
        obj: &ObjectRef,
        route: &RouteBinding,
        op: &str,
        error: StoreError,
    ) -> ObjectOutcome {
        let uri = &obj.uri;
        let (mut report, report_uri) = self.edge_report(uri, &route.name, RunStatus::Failed, "");
        let message = format!(
            "{op} on the trigger {uri} failed for good ({error}): check that the function's role may read the bucket (s3:GetObject, s3:ListBucket) and use its KMS key; nothing was synced. Replay the export once it can be read"
        );
        report.error = Some(message.clone());
        warn!(object = %uri, route = %route.name, report = %report_uri, error = %error, "Triggering object cannot be read; reported as failed.");
        report.emit_metrics();
        match report.put(self.store.as_ref(), &report_uri).await {
            Ok(()) => {}
            Err(e) if e.is_retryable() => return ObjectOutcome::Retry(e.to_string()),
            Err(e) => {
                warn!(report = %report_uri, error = %e, "Could not write the report of an unreadable trigger.");
                return ObjectOutcome::Retry(format!(
                    "{message} (and its report could not be written: {e})"
                ));
            }
        }
        ObjectOutcome::Done(json!({
            "object": uri.to_string(), "route": route.name, "outcome": "failed",
            "error": message, "report": report_uri.to_string()}))
    }

    /// A notification failed retryably on its last receive (`receives` is the queue's
    /// `maxReceiveCount`): SQS moves it to the dead-letter queue next, so a `failed` report
    /// says why ("gave up after N receives: <error>"), with its metrics, naming the export and
    /// the run's own report when there is one. Returns the report's address, or `None` when it
    /// could not be written (the message goes to the dead-letter queue all the same).
    pub(super) async fn give_up_report(
        &self,
        plan: GiveUp<'_>,
        receives: u32,
        reason: &str,
    ) -> Option<String> {
        let (mut report, report_uri) =
            self.edge_report(plan.trigger, plan.route, RunStatus::Failed, "gave up");
        report.export_id = plan.export_id.map(String::from);
        report.error = Some(format!("gave up after {receives} receives: {reason}"));
        if let Some(run_report) = plan.run_report {
            report
                .notes
                .push(format!("the run's own report: {run_report}"));
        }
        report.notes.push(
            "the notification is in the dead-letter queue: redrive it (or copy the export again) once the cause is fixed"
                .into(),
        );
        warn!(object = %plan.trigger, route = %plan.route, report = %report_uri, error = %reason, receives, "Giving up on a notification on its last receive; it goes to the dead-letter queue.");
        report.emit_metrics();
        match report.put(self.store.as_ref(), &report_uri).await {
            Ok(()) => Some(report_uri.to_string()),
            Err(e) => {
                warn!(report = %report_uri, error = %e, "Could not write the report of a notification given up on.");
                None
            }
        }
    }
}

impl Handler {
    /// A fan-out piece failed retryably on its last receive: SQS moves its message to the
    /// dead-letter queue next, so a `failed` report (`<fan-out run>-p<piece>-gave-up`) says
    /// why. The fan-out stays open: a redrive resumes the piece, or, once its route lock
    /// expired, a replay of the export takes it over.
    pub(super) async fn give_up_piece_report(&self, piece: &Value, receives: u32, reason: &str) {
        let (Some(route), Some(run_id)) = (piece["route"].as_str(), piece["run_id"].as_str())
        else {
            return;
        };
        let now = crate::clock::now().to_rfc3339();
        let number = piece["piece"].as_u64().unwrap_or_default();
        let mut report = RunReport::new(format!("{run_id}-p{number:03}-gave-up"), route);
        report.status = RunStatus::Failed;
        report.started_at = Some(now.clone());
        report.finished_at = Some(now);
        report.error = Some(format!("gave up after {receives} receives: {reason}"));
        report.notes.push(format!(
            "piece {number} of fan-out run {run_id}; its message is in the dead-letter queue: redrive it once the cause is fixed"
        ));
        let report_uri = S3Uri::new(
            &self.cfg.state_bucket,
            format!("{}{route}/{}.json", self.cfg.reports_prefix, report.run_id),
        );
        warn!(route, run_id, piece = number, report = %report_uri, error = %reason, receives, "Giving up on a fan-out piece on its last receive; it goes to the dead-letter queue.");
        report.emit_metrics();
        if let Err(e) = report.put(self.store.as_ref(), &report_uri).await {
            warn!(report = %report_uri, error = %e, "Could not write the report of a fan-out piece given up on.");
        }
    }
}

/// What a give-up report names.
#[derive(Debug, Clone, Copy)]
pub(super) struct GiveUp<'a> {
    /// The triggering object.
    pub trigger: &'a S3Uri,
    /// Its route.
    pub route: &'a str,
    /// The export, once planned.
    pub export_id: Option<&'a str>,
    /// The report the run wrote itself, if any.
    pub run_report: Option<&'a str>,
}
