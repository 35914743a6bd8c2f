//! The scheduled drift audit. An invocation whose payload is
//! `{"audit": {"routes": "customers,loyalty", "sample": 1000}}` (the optional weekly EventBridge
//! Scheduler schedule of `template.yaml` and the CDK construct, `AuditRoutes`) or
//! `{"audit": {"route": "customers"}}` audits each route named, one after the other, as
//! `braze-sync audit ROUTE --sample N` does ([`crate::ops::audit`]): it writes each audit's
//! report under the reports prefix and emits its `drift_share` and `missing_in_braze` metrics
//! (the alarm `BrazeSyncDriftAlarm` watches `drift_share`). It never heals: marking values
//! for resending stays an operator's decision (`braze-sync audit ROUTE --heal`).
//!
//! [`dispatch`] is the function's entry point: audit requests go to [`ScheduledAudit`],
//! everything else to the sync [`Handler`].

use std::sync::Arc;

use bridge_shared::{ObjectStore, S3Uri};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::config::route::Route;
use crate::ops::audit::{AuditExport, AuditOptions, AuditTarget, DEFAULT_SAMPLE, audit};
use crate::run::handler::{Handler, parts_of_marker};
use crate::send::braze::UserLookup;
use crate::state::store::StateStore;

/// The payload key of an audit request.
pub const AUDIT_KEY: &str = "audit";

/// Most users one scheduled audit of a route samples: 50 a lookup at 250 lookups a minute,
/// well inside one invocation.
pub const MAX_SAMPLE: usize = 100_000;

/// What an audit request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRequest {
    /// The routes to audit, in order.
    pub routes: Vec<String>,
    /// Users sampled per route.
    pub sample: usize,
}

/// The audit request in `payload` (`None`: the payload is not one). `routes` is a
/// comma-separated string or a list; `route` names one; `sample` defaults to
/// [`DEFAULT_SAMPLE`] and is at most [`MAX_SAMPLE`].
pub fn audit_request(payload: &Value) -> Option<Result<AuditRequest, String>> {
    let req = payload.get(AUDIT_KEY)?;
    let mut routes: Vec<String> = Vec::new();
    for v in [req.get("routes"), req.get("route")].into_iter().flatten() {
        match v {
            Value::String(s) => routes.extend(s.split(',').map(|r| r.trim().to_string())),
            Value::Array(a) => routes.extend(
                a.iter()
                    .filter_map(Value::as_str)
                    .map(|r| r.trim().to_string()),
            ),
            other => {
                return Some(Err(format!(
                    "audit: routes must be text or a list, not {other}"
                )));
            }
        }
    }
    routes.retain(|r| !r.is_empty());
    if routes.is_empty() {
        return Some(Err(
            "audit: the request names no route (\"routes\": \"a,b\")".into(),
        ));
    }
    let sample = match req.get("sample") {
        None | Some(Value::Null) => DEFAULT_SAMPLE,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_SAMPLE as u64).contains(&n) => n as usize,
            _ => {
                return Some(Err(format!(
                    "audit: sample must be a whole number from 1 to {MAX_SAMPLE}, not {v}"
                )));
            }
        },
    };
    Some(Ok(AuditRequest { routes, sample }))
}

/// The export a route's audit reads its sample's identifiers from: the one the state's
/// watermark names (the state keeps no identifiers), with its parts when it is a marker.
pub async fn last_export(
    store: &Arc<dyn ObjectStore>,
    target: &AuditTarget,
    route: &Route,
) -> Result<AuditExport, String> {
    let state = StateStore::new(
        store.clone(),
        &target.state_bucket,
        &target.state_prefix,
        route.name(),
    );
    let head = state.read_head().await.map_err(|e| e.to_string())?;
    let export_id = head
        .doc
        .watermark
        .map(|w| w.export_id)
        .ok_or_else(|| format!("route {} has no confirmed export to audit", route.name()))?;
    let uri: S3Uri = export_id
        .split('#')
        .next()
        .unwrap_or(&export_id)
        .parse()
        .map_err(|e| format!("route {}: watermark {export_id}: {e}", route.name()))?;
    let suffix = &route.config.marker_suffix;
    let parts = if uri.key.ends_with(suffix.as_str()) {
        let listing = store
            .list(&uri.bucket, uri.folder())
            .await
            .map_err(|e| e.to_string())?;
        parts_of_marker(&listing, &uri, suffix)
            .into_iter()
            .map(|m| uri.with_key(m.key))
            .collect()
    } else {
        vec![uri]
    };
    Ok(AuditExport { export_id, parts })
}

/// Scheduled audits of the deployment's routes.
pub struct ScheduledAudit {
    store: Arc<dyn ObjectStore>,
    target: AuditTarget,
    routes: Vec<Arc<Route>>,
    lookup: Arc<dyn UserLookup>,
}

impl ScheduledAudit {
    /// Built once per container, beside the handler.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        target: AuditTarget,
        routes: Vec<Route>,
        lookup: Arc<dyn UserLookup>,
    ) -> Self {
        Self {
            store,
            target,
            routes: routes.into_iter().map(Arc::new).collect(),
            lookup,
        }
    }

    /// Audits one route: its report's summary, metrics emitted.
    async fn one(&self, name: &str, sample: usize) -> Result<Value, String> {
        let route = self
            .routes
            .iter()
            .find(|r| r.name() == name)
            .cloned()
            .ok_or_else(|| format!("audit: no route named {name:?} is configured"))?;
        let export = last_export(&self.store, &self.target, &route).await?;
        let opts = AuditOptions {
            sample,
            heal: false,
            ..AuditOptions::default()
        };
        let report = audit(
            self.store.clone(),
            &self.target,
            route,
            export,
            self.lookup.as_ref(),
            &opts,
        )
        .await
        .map_err(|e| e.to_string())?;
        report.emit_metrics();
        info!(route = name, sampled = report.sampled, drift_share = report.drift_share,
              missing_in_braze = report.missing_in_braze, report = %report.report, "Drift audit finished.");
        Ok(
            json!({"route": name, "sampled": report.sampled, "drift_share": report.drift_share,
                  "missing_in_braze": report.missing_in_braze, "report": report.report}),
        )
    }

    /// Audits every route the request names; an audit that fails fails the invocation (after
    /// the others ran), so the function's error alarm and the schedule's retries see it.
    pub async fn run(&self, req: &AuditRequest) -> Result<Value, String> {
        let mut results = Vec::new();
        let mut failed = Vec::new();
        for name in &req.routes {
            match self.one(name, req.sample).await {
                Ok(v) => results.push(v),
                Err(e) => {
                    warn!(route = %name, error = %e, "Drift audit failed.");
                    failed.push(format!("{name}: {e}"));
                }
            }
        }
        match failed.is_empty() {
            true => Ok(json!({"audits": results})),
            false => Err(format!("drift audit failed for {}", failed.join("; "))),
        }
    }
}

/// The function's entry point: an audit request goes to `audit`, anything else to `handler`.
pub async fn dispatch(
    handler: &Handler,
    audit: &ScheduledAudit,
    payload: &Value,
    remaining_ms: Option<u64>,
) -> Result<Value, String> {
    match audit_request(payload) {
        Some(Ok(req)) => audit.run(&req).await,
        Some(Err(e)) => {
            // A malformed request stays malformed: acknowledged, logged.
            warn!(error = %e, "Ignoring a malformed audit request.");
            Ok(json!({"ignored": e}))
        }
        None => handler.handle(payload, remaining_ms).await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_schedules_payload_names_routes_and_a_sample() {
        let req = |v: Value| audit_request(&v);
        assert_eq!(req(json!({"Records": []})), None);
        assert_eq!(
            req(json!({"audit": {"routes": "customers, loyalty", "sample": 500}})),
            Some(Ok(AuditRequest {
                routes: vec!["customers".into(), "loyalty".into()],
                sample: 500
            }))
        );
        assert_eq!(
            req(json!({"audit": {"route": "customers"}})),
            Some(Ok(AuditRequest {
                routes: vec!["customers".into()],
                sample: DEFAULT_SAMPLE
            }))
        );
        assert_eq!(
            req(json!({"audit": {"routes": ["a", "b"]}}))
                .unwrap()
                .unwrap()
                .routes,
            vec!["a", "b"]
        );
        for bad in [
            json!({"audit": {}}),
            json!({"audit": {"routes": ""}}),
            json!({"audit": {"routes": 3}}),
            json!({"audit": {"route": "a", "sample": 0}}),
            json!({"audit": {"route": "a", "sample": 100_001}}),
        ] {
            assert!(req(bad.clone()).unwrap().is_err(), "{bad}");
        }
    }
}
