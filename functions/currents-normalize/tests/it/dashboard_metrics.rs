//! The operations dashboard (`infra/dashboard.json`, embedded in template.yaml and read by the CDK
//! construct) names only metrics currents-normalize's EMF emitters write (normalize runs and
//! compaction), and shows every one of them unless listed in [`NOT_ON_DASHBOARD`] with a reason.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use bridge_shared::metrics::{MetricKey, dashboard_metric_keys, emf_metric_keys};
use chrono::{NaiveDate, TimeZone, Utc};
use currents_normalize::compact::{CompactReport, DayOutcome, DayResult};
use currents_normalize::config::Config;
use currents_normalize::report::{ObjectResult, Outcome, RunReport};

/// Emitted metrics deliberately left off the dashboard: (metric name, why).
const NOT_ON_DASHBOARD: &[(&str, &str)] = &[];

/// Source files allowed to write EMF lines; an emitter anywhere else must be added to this test.
const EMITTERS: &[&str] = &["src/report.rs", "src/compact/report.rs"];

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dashboard() -> Vec<MetricKey> {
    let path = crate_dir().join("../../infra/dashboard.json");
    let body = std::fs::read_to_string(&path).unwrap();
    dashboard_metric_keys(&body).unwrap()
}

fn namespace() -> String {
    Config::default().metrics_namespace
}

/// What the emitters write: a normalize run with a written table and an unregistered event
/// type, and a compaction run.
fn emitted() -> BTreeSet<MetricKey> {
    let t = Utc.with_ymd_and_hms(2026, 11, 29, 10, 0, 0).unwrap();
    let written = ObjectResult {
        table: Some("users_messages_email_send".into()),
        rows_written: 2,
        delivery_lag_s: Some(3600),
        ..ObjectResult::new("s3://b/k", Outcome::Written)
    };
    let unregistered = ObjectResult {
        event_type: Some("users.new.thing".into()),
        unregistered: true,
        ..ObjectResult::new("s3://b/u", Outcome::Ignored)
    };
    let run = RunReport::new("req", t, t, vec![written, unregistered]);
    let day = NaiveDate::from_ymd_opt(2026, 11, 29).unwrap();
    let compact = CompactReport::new(
        "req",
        t,
        t,
        false,
        vec![DayResult::new("t", day, DayOutcome::Compacted)],
    );
    let mut lines = run.metric_lines(&namespace(), 0);
    lines.extend(compact.metric_lines(&namespace(), 0));
    lines
        .iter()
        .flat_map(|l| emf_metric_keys(l).unwrap())
        .collect()
}

#[test]
fn the_sample_runs_reach_every_emitter_line() {
    let e = emitted();
    let dims: BTreeSet<Vec<String>> = e.iter().map(|k| k.dimensions.clone()).collect();
    for want in [
        vec!["Function"],
        vec!["Function", "Table"],
        vec!["EventType", "Function"],
        vec!["Function", "Job"],
    ] {
        assert!(
            dims.contains(&want.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
            "{want:?}"
        );
    }
}

#[test]
fn dashboard_names_only_metrics_currents_normalize_emits() {
    let emitted = emitted();
    let unknown: Vec<String> = dashboard()
        .into_iter()
        .filter(|k| k.namespace == namespace() && !emitted.contains(k))
        .map(|k| k.to_string())
        .collect();
    assert!(
        unknown.is_empty(),
        "infra/dashboard.json shows metrics currents-normalize never emits: {unknown:?}"
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
        "currents-normalize emits metrics infra/dashboard.json does not show (add a widget, then \
         `make dashboard`, or list them in NOT_ON_DASHBOARD with a reason): {missing:?}"
    );
}

#[test]
fn dashboard_uses_no_namespace_but_the_bridge_and_aws_ones() {
    for k in dashboard() {
        assert!(
            k.namespace.starts_with("AWS/")
                || k.namespace == namespace()
                || k.namespace == "AmperityBrazeBridge/BrazeSync",
            "unexpected namespace in {k}"
        );
    }
}

#[test]
fn emf_lines_are_written_only_by_the_emitters_this_test_reads() {
    let strays = bridge_shared::metrics::emf_writers_outside(&crate_dir(), EMITTERS).unwrap();
    assert!(
        strays.is_empty(),
        "EMF written outside {EMITTERS:?}: {strays:?}; add their metrics to `emitted()` here"
    );
}
