//! What a run did: one [`ObjectResult`] per object (written, empty, quarantined, ignored,
//! retried), the run's totals (events in, rows written per table, duplicates dropped,
//! quarantined), the report object written under `REPORTS_PREFIX`, and the CloudWatch EMF
//! metric lines.

use std::collections::BTreeMap;

use bridge_shared::metrics::{Metric, emf_line};
use serde::Serialize;

/// How one object ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Its part was written.
    Written,
    /// It held no records; nothing was written.
    Empty,
    /// Converted but not written (`--dry-run`).
    DryRun,
    /// Unreadable or contradicting the registry: copied to quarantine with its reason.
    Quarantined,
    /// Not ours (outside the input prefix, our own output, gone).
    Ignored,
    /// A storage error that may pass: the message (or invocation) is retried.
    Retry,
}

/// The result of one object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObjectResult {
    /// `s3://bucket/key` of the source.
    pub source: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Event type, when the key was readable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// Table written (or that would be).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// Address of the part.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part: Option<String>,
    /// Records read.
    pub events_in: u64,
    /// Rows written.
    pub rows_written: u64,
    /// Records dropped as duplicates of an earlier `id` in the file.
    pub duplicates_dropped: u64,
    /// Fields the registry does not know yet (kept in `extra`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_fields: Vec<String>,
    /// True when the event type is not in the registry (generic table).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unregistered: bool,
    /// The source's Avro codec.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codec: Option<&'static str>,
    /// The step that failed (quarantine) or why it was ignored/retried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<&'static str>,
    /// Human-readable reason for quarantine, ignore or retry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Address of the quarantine reason object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<String>,
    /// Seconds from the start of the Currents delivery hour (`date=YYYY-MM-DD-HH` of the
    /// key) to the moment its table part was written; set for written objects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_lag_s: Option<u64>,
    /// Address of the profile-change feed object written for braze-sync (`PROFILE_FEED_BUCKET`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile_feed: Option<String>,
    /// Profile changes in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile_changes: Option<u64>,
}

impl ObjectResult {
    /// A result with only the source and outcome set.
    pub fn new(source: impl Into<String>, outcome: Outcome) -> Self {
        Self {
            source: source.into(),
            outcome,
            event_type: None,
            table: None,
            part: None,
            events_in: 0,
            rows_written: 0,
            duplicates_dropped: 0,
            extra_fields: Vec::new(),
            unregistered: false,
            codec: None,
            step: None,
            reason: None,
            quarantine: None,
            delivery_lag_s: None,
            profile_feed: None,
            profile_changes: None,
        }
    }

    /// Sets the reason.
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

/// The run's totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Objects named by the invocation.
    pub objects: u64,
    /// Records read.
    pub events_in: u64,
    /// Rows written, all tables.
    pub rows_written: u64,
    /// Rows written per table.
    pub written_per_table: BTreeMap<String, u64>,
    /// Duplicates dropped.
    pub duplicates_dropped: u64,
    /// Parts written.
    pub parts_written: u64,
    /// Objects quarantined.
    pub quarantined: u64,
    /// Objects ignored.
    pub ignored: u64,
    /// Objects left for a retry.
    pub retried: u64,
    /// Events of types the registry does not know, per event type.
    pub unregistered_events: BTreeMap<String, u64>,
    /// Objects carrying fields the registry does not know.
    pub objects_with_extra_fields: u64,
    /// The largest delivery lag of the objects written (see [`ObjectResult::delivery_lag_s`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_delivery_lag_s: Option<u64>,
}

/// The report of one invocation (or CLI run).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    /// Always `currents-normalize`.
    pub function: &'static str,
    /// Lambda request id, or `cli-<n>`.
    pub request_id: String,
    /// Start, RFC 3339.
    pub started_at: String,
    /// End, RFC 3339.
    pub finished_at: String,
    /// Wall time in seconds.
    pub duration_s: f64,
    /// Totals.
    pub totals: Totals,
    /// Per object.
    pub objects: Vec<ObjectResult>,
}

/// Where a report started at `started_at` (RFC 3339) by `request_id` is written:
/// `<prefix><sub><yyyy-mm-dd>/<HHMMSS>-<request id>.json`, the id reduced to `[A-Za-z0-9-]`
/// (anything else becomes `_`) so it is one safe key segment. Shared by the conversion and
/// compaction reports.
pub fn report_key(reports_prefix: &str, sub: &str, started_at: &str, request_id: &str) -> String {
    let started = chrono::DateTime::parse_from_rfc3339(started_at)
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_else(|_| chrono::Utc::now());
    let safe_id: String = request_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    bridge_shared::s3_uri::join_key(
        reports_prefix,
        &format!(
            "{sub}{}/{}-{safe_id}.json",
            started.format("%Y-%m-%d"),
            started.format("%H%M%S")
        ),
    )
}

/// Sums per-object results.
pub fn totals(objects: &[ObjectResult]) -> Totals {
    let mut t = Totals {
        objects: objects.len() as u64,
        ..Totals::default()
    };
    for o in objects {
        t.events_in += o.events_in;
        t.duplicates_dropped += o.duplicates_dropped;
        match o.outcome {
            Outcome::Written => {
                t.rows_written += o.rows_written;
                t.parts_written += 1;
                if let Some(table) = &o.table {
                    *t.written_per_table.entry(table.clone()).or_default() += o.rows_written;
                }
            }
            Outcome::Quarantined => t.quarantined += 1,
            Outcome::Ignored => t.ignored += 1,
            Outcome::Retry => t.retried += 1,
            Outcome::Empty | Outcome::DryRun => {}
        }
        if o.unregistered
            && let Some(et) = &o.event_type
        {
            *t.unregistered_events.entry(et.clone()).or_default() += o.events_in;
        }
        if !o.extra_fields.is_empty() {
            t.objects_with_extra_fields += 1;
        }
        if let Some(lag) = o.delivery_lag_s {
            t.max_delivery_lag_s = Some(t.max_delivery_lag_s.unwrap_or(0).max(lag));
        }
    }
    t
}

impl RunReport {
    /// Builds the report of a run.
    pub fn new(
        request_id: impl Into<String>,
        started: chrono::DateTime<chrono::Utc>,
        finished: chrono::DateTime<chrono::Utc>,
        objects: Vec<ObjectResult>,
    ) -> Self {
        Self {
            function: "currents-normalize",
            request_id: request_id.into(),
            started_at: started.to_rfc3339(),
            finished_at: finished.to_rfc3339(),
            duration_s: (finished - started).num_milliseconds() as f64 / 1000.0,
            totals: totals(&objects),
            objects,
        }
    }

    /// The report's key: `<prefix><yyyy-mm-dd>/<HHMMSS>-<request id>.json` (start time, UTC).
    pub fn key(&self, reports_prefix: &str) -> String {
        report_key(reports_prefix, "", &self.started_at, &self.request_id)
    }

    /// The EMF lines for this run: run totals, rows per table, and a warning metric per
    /// unregistered event type.
    pub fn metric_lines(&self, namespace: &str, timestamp_ms: i64) -> Vec<String> {
        let t = &self.totals;
        let f = ("Function", "currents-normalize");
        let mut lines = vec![emf_line(
            namespace,
            &[f],
            &[
                ("ObjectsIn", Metric::Count(t.objects as f64)),
                ("EventsIn", Metric::Count(t.events_in as f64)),
                ("RowsWritten", Metric::Count(t.rows_written as f64)),
                ("PartsWritten", Metric::Count(t.parts_written as f64)),
                (
                    "DuplicatesDropped",
                    Metric::Count(t.duplicates_dropped as f64),
                ),
                ("ObjectsQuarantined", Metric::Count(t.quarantined as f64)),
                ("ObjectsIgnored", Metric::Count(t.ignored as f64)),
                ("ObjectsRetried", Metric::Count(t.retried as f64)),
                (
                    "ObjectsWithUnknownFields",
                    Metric::Count(t.objects_with_extra_fields as f64),
                ),
                ("RunSeconds", Metric::Seconds(self.duration_s)),
            ],
            timestamp_ms,
        )];
        // Only when something was written: a run that wrote nothing has no lag to report.
        if let Some(lag) = t.max_delivery_lag_s {
            lines.push(emf_line(
                namespace,
                &[f],
                &[("DeliveryLagSeconds", Metric::Seconds(lag as f64))],
                timestamp_ms,
            ));
        }
        for (table, rows) in &t.written_per_table {
            lines.push(emf_line(
                namespace,
                &[f, ("Table", table)],
                &[("RowsWritten", Metric::Count(*rows as f64))],
                timestamp_ms,
            ));
        }
        for (event_type, n) in &t.unregistered_events {
            lines.push(emf_line(
                namespace,
                &[f, ("EventType", event_type)],
                &[("UnregisteredEvents", Metric::Count(*n as f64))],
                timestamp_ms,
            ));
        }
        lines
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn written(table: &str, rows: u64) -> ObjectResult {
        ObjectResult {
            table: Some(table.into()),
            events_in: rows + 1,
            rows_written: rows,
            duplicates_dropped: 1,
            ..ObjectResult::new("s3://b/k", Outcome::Written)
        }
    }

    #[test]
    fn the_largest_delivery_lag_of_written_objects_is_a_metric_only_when_something_was_written() {
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-11-29T10:11:12Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let lagged = |s| ObjectResult {
            delivery_lag_s: Some(s),
            ..written("a", 1)
        };
        let r = RunReport::new(
            "r",
            t0,
            t0,
            vec![lagged(100), lagged(7200), written("b", 1)],
        );
        assert_eq!(r.totals.max_delivery_lag_s, Some(7200));
        let lag: Vec<serde_json::Value> = r
            .metric_lines("NS", 1)
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("DeliveryLagSeconds").is_some())
            .collect();
        assert_eq!(lag.len(), 1);
        assert_eq!(lag[0]["DeliveryLagSeconds"], 7200.0);
        assert_eq!(lag[0]["Function"], "currents-normalize");
        let none = RunReport::new(
            "r",
            t0,
            t0,
            vec![ObjectResult::new("s3://b/x", Outcome::Quarantined)],
        );
        assert!(
            none.metric_lines("NS", 1)
                .iter()
                .all(|l| !l.contains("DeliveryLagSeconds"))
        );
    }

    #[test]
    fn totals_count_rows_per_table_and_quarantines() {
        let t = totals(&[
            written("a", 10),
            written("a", 5),
            written("b", 1),
            ObjectResult::new("s3://b/x", Outcome::Quarantined),
        ]);
        assert_eq!(t.rows_written, 16);
        assert_eq!(t.written_per_table["a"], 15);
        assert_eq!(t.duplicates_dropped, 3);
        assert_eq!(t.quarantined, 1);
        assert_eq!(t.parts_written, 3);
    }

    #[test]
    fn report_key_is_dated_and_safe() {
        let start = chrono::DateTime::parse_from_rfc3339("2026-11-29T10:11:12Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let r = RunReport::new("abc/def", start, start, vec![]);
        assert_eq!(
            r.key("reports/currents/"),
            "reports/currents/2026-11-29/101112-abc_def.json"
        );
    }

    #[test]
    fn unregistered_types_raise_a_warning_metric() {
        let mut o = written("currents_other_events", 3);
        o.unregistered = true;
        o.event_type = Some("users.future.Thing".into());
        let start = chrono::Utc::now();
        let r = RunReport::new("r", start, start, vec![o]);
        let lines = r.metric_lines("NS", 1);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("UnregisteredEvents") && l.contains("users.future.Thing"))
        );
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["RowsWritten"], 3.0);
    }
}
