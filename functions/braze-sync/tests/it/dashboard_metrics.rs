//! The operations dashboard (`infra/dashboard.json`, embedded in template.yaml and read by the CDK
//! construct) names only metrics braze-sync's EMF emitter writes, and shows every one of them
//! unless it is listed in [`NOT_ON_DASHBOARD`] with a reason.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use braze_sync::ops::audit::AuditReport;
use braze_sync::ops::report::{METRICS_NAMESPACE, RunReport};
use bridge_shared::metrics::{MetricKey, dashboard_metric_keys, emf_line, emf_metric_keys};

/// Emitted metrics deliberately left off the dashboard: (metric name, why).
const NOT_ON_DASHBOARD: &[(&str, &str)] = &[];

/// Source files allowed to write EMF lines; an emitter anywhere else must be added to this test.
// `ops/audit.rs` writes the drift audit's `drift_share` and `missing_in_braze` (the scheduled
// audit in the Lambda; `main.rs` prints the same line from the CLI).
const EMITTERS: &[&str] = &["src/ops/report.rs", "src/ops/audit.rs", "src/main.rs"];

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dashboard() -> Vec<MetricKey> {
    let path = crate_dir().join("../../infra/dashboard.json");
    let body = std::fs::read_to_string(&path).unwrap();
    dashboard_metric_keys(&body).unwrap()
}

/// A drift audit's report, for its metric lines.
fn audit_report() -> AuditReport {
    AuditReport {
        route: "customers".into(),
        export_id: "s3://exports/customers.csv#1".into(),
        state_users: 10,
        sampled: 10,
        missing_in_braze: 1,
        missing_examples: Vec::new(),
        drifted_users: 1,
        drift_share: 0.1,
        estimated_drifted_users: 1,
        attributes: Vec::new(),
        lookups: 1,
        healed: None,
        report: "s3://state/r/customers/audit.json".into(),
    }
}

/// What the emitters write: every metric of a run report's and a drift audit's EMF lines.
fn emitted() -> BTreeSet<MetricKey> {
    let report = RunReport::new("run", "customers");
    let audit = audit_report();
    // The two lines `RunReport::emit_metrics` prints: per route, and alarm metrics across routes;
    // and the two `AuditReport::emit_metrics` prints.
    let across_routes = emf_line(METRICS_NAMESPACE, &[], &report.alarm_metrics(), 0);
    let audit_across_routes = emf_line(METRICS_NAMESPACE, &[], &audit.alarm_metrics(), 0);
    [
        report.emf_line(0),
        across_routes,
        audit.emf_line(0),
        audit_across_routes,
    ]
    .iter()
    .flat_map(|l| emf_metric_keys(l).unwrap())
    .collect()
}

#[test]
fn dashboard_names_only_metrics_braze_sync_emits() {
    let emitted = emitted();
    let unknown: Vec<String> = dashboard()
        .into_iter()
        .filter(|k| k.namespace == METRICS_NAMESPACE && !emitted.contains(k))
        .map(|k| k.to_string())
        .collect();
    assert!(
        unknown.is_empty(),
        "infra/dashboard.json shows metrics braze-sync never emits: {unknown:?}"
    );
}

#[test]
fn every_emitted_metric_is_on_the_dashboard_or_excluded_with_a_reason() {
    let shown: BTreeSet<MetricKey> = dashboard().into_iter().collect();
    let missing: Vec<String> = emitted()
        .into_iter()
        .filter(|k| !shown.contains(k))
        .filter(|k| !NOT_ON_DASHBOARD.iter().any(|(n, _)| *n == k.name))
        .map(|k| k.to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "braze-sync emits metrics infra/dashboard.json does not show (add a widget, then `make \
         dashboard`, or list them in NOT_ON_DASHBOARD with a reason): {missing:?}"
    );
}

#[test]
fn emf_lines_are_written_only_by_the_emitters_this_test_reads() {
    let strays = bridge_shared::metrics::emf_writers_outside(&crate_dir(), EMITTERS).unwrap();
    assert!(
        strays.is_empty(),
        "EMF written outside {EMITTERS:?}: {strays:?}; add their metrics to `emitted()` here"
    );
}
