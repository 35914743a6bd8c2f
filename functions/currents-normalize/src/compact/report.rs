//! What a compaction run did, per table-day and in total: the report object written to
//! `<REPORTS_PREFIX>compaction/<yyyy-mm-dd>/<HHMMSS>-<request id>.json` and its EMF lines.

use bridge_shared::metrics::{Metric, emf_line};
use serde::Serialize;

/// How one table-day ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DayOutcome {
    /// Replaced by its compacted part(s).
    Compacted,
    /// Counted only (`--dry-run`).
    DryRun,
    /// Another compaction holds the day's lease; left to it.
    Busy,
    /// The lease was lost before deleting: the compacted part was written, nothing deleted
    /// (the next run finishes the job).
    LeaseLost,
    /// Not started: the run's time ran out (the next run continues).
    Deferred,
    /// Failed; `retryable` says whether rerunning can help, `reason` says why.
    Failed,
}

/// One table-day.
#[derive(Debug, Clone, Serialize)]
pub struct DayResult {
    /// Table.
    pub table: String,
    /// Day, `YYYY-MM-DD`.
    pub day: String,
    /// Outcome.
    pub outcome: DayOutcome,
    /// Parts read.
    pub parts_in: u64,
    /// Parts written.
    pub parts_out: u64,
    /// Parts deleted after the compacted part was written.
    pub parts_deleted: u64,
    /// Parts left in place because they changed after they were read (a replay), or because
    /// a part arrived after listing; the next run picks them up.
    pub parts_kept: u64,
    /// Rows read.
    pub rows_in: u64,
    /// Rows written.
    pub rows_out: u64,
    /// Rows dropped as duplicates of an earlier row with the same `id`.
    pub duplicates_removed: u64,
    /// Bytes read.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
    /// The compacted parts (`s3://…`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// Why it failed or was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For failures: whether rerunning can help.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub retryable: bool,
}

impl DayResult {
    /// An empty result for a table-day.
    pub fn new(table: &str, day: chrono::NaiveDate, outcome: DayOutcome) -> Self {
        Self {
            table: table.into(),
            day: day.format("%Y-%m-%d").to_string(),
            outcome,
            parts_in: 0,
            parts_out: 0,
            parts_deleted: 0,
            parts_kept: 0,
            rows_in: 0,
            rows_out: 0,
            duplicates_removed: 0,
            bytes_in: 0,
            bytes_out: 0,
            outputs: Vec::new(),
            reason: None,
            retryable: false,
        }
    }
}

/// Totals of a run.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CompactTotals {
    /// Table-days looked at.
    pub table_days: u64,
    /// Table-days compacted.
    pub compacted: u64,
    /// Table-days skipped (busy, deferred, lease lost).
    pub skipped: u64,
    /// Table-days that failed.
    pub failed: u64,
    /// Parts read.
    pub parts_in: u64,
    /// Parts written.
    pub parts_out: u64,
    /// Parts deleted.
    pub parts_deleted: u64,
    /// Rows read.
    pub rows_in: u64,
    /// Rows written.
    pub rows_out: u64,
    /// Duplicates removed.
    pub duplicates_removed: u64,
    /// Bytes read.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
}

/// The report of one compaction run.
#[derive(Debug, Clone, Serialize)]
pub struct CompactReport {
    /// Always `currents-normalize`.
    pub function: &'static str,
    /// Always `compact`.
    pub job: &'static str,
    /// Lambda request id or `cli-<ms>`.
    pub request_id: String,
    /// Start, RFC 3339.
    pub started_at: String,
    /// End, RFC 3339.
    pub finished_at: String,
    /// Seconds.
    pub duration_s: f64,
    /// Nothing was written or deleted.
    pub dry_run: bool,
    /// Totals.
    pub totals: CompactTotals,
    /// Per table-day.
    pub table_days: Vec<DayResult>,
}

impl CompactReport {
    /// Builds the report.
    pub fn new(
        request_id: impl Into<String>,
        started: chrono::DateTime<chrono::Utc>,
        finished: chrono::DateTime<chrono::Utc>,
        dry_run: bool,
        table_days: Vec<DayResult>,
    ) -> Self {
        let mut t = CompactTotals {
            table_days: table_days.len() as u64,
            ..Default::default()
        };
        for d in &table_days {
            match d.outcome {
                DayOutcome::Compacted | DayOutcome::DryRun => t.compacted += 1,
                DayOutcome::Failed => t.failed += 1,
                _ => t.skipped += 1,
            }
            t.parts_in += d.parts_in;
            t.parts_out += d.parts_out;
            t.parts_deleted += d.parts_deleted;
            t.rows_in += d.rows_in;
            t.rows_out += d.rows_out;
            t.duplicates_removed += d.duplicates_removed;
            t.bytes_in += d.bytes_in;
            t.bytes_out += d.bytes_out;
        }
        Self {
            function: "currents-normalize",
            job: "compact",
            request_id: request_id.into(),
            started_at: started.to_rfc3339(),
            finished_at: finished.to_rfc3339(),
            duration_s: (finished - started).num_milliseconds() as f64 / 1000.0,
            dry_run,
            totals: t,
            table_days,
        }
    }

    /// The report's key under `reports_prefix`.
    pub fn key(&self, reports_prefix: &str) -> String {
        crate::report::report_key(
            reports_prefix,
            "compaction/",
            &self.started_at,
            &self.request_id,
        )
    }

    /// EMF lines: run totals (dimensions `Function`, `Job`).
    pub fn metric_lines(&self, namespace: &str, timestamp_ms: i64) -> Vec<String> {
        let t = &self.totals;
        vec![emf_line(
            namespace,
            &[("Function", "currents-normalize"), ("Job", "compact")],
            &[
                ("TableDaysCompacted", Metric::Count(t.compacted as f64)),
                ("TableDaysSkipped", Metric::Count(t.skipped as f64)),
                ("TableDaysFailed", Metric::Count(t.failed as f64)),
                ("CompactPartsIn", Metric::Count(t.parts_in as f64)),
                ("CompactPartsOut", Metric::Count(t.parts_out as f64)),
                ("CompactRowsIn", Metric::Count(t.rows_in as f64)),
                ("CompactRowsOut", Metric::Count(t.rows_out as f64)),
                (
                    "CompactDuplicatesRemoved",
                    Metric::Count(t.duplicates_removed as f64),
                ),
                ("CompactBytesOut", Metric::Count(t.bytes_out as f64)),
                ("RunSeconds", Metric::Seconds(self.duration_s)),
            ],
            timestamp_ms,
        )]
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_metrics_add_up() {
        let day = chrono::NaiveDate::from_ymd_opt(2026, 11, 29).unwrap();
        let mut a = DayResult::new("t", day, DayOutcome::Compacted);
        a.parts_in = 3;
        a.duplicates_removed = 2;
        let b = DayResult::new("u", day, DayOutcome::Busy);
        let now = chrono::Utc::now();
        let r = CompactReport::new("req/1", now, now, false, vec![a, b]);
        assert_eq!(r.totals.compacted, 1);
        assert_eq!(r.totals.skipped, 1);
        assert!(r.key("reports/currents/").contains("compaction/"));
        assert!(r.key("reports/currents/").ends_with("-req_1.json"));
        let v: serde_json::Value = serde_json::from_str(&r.metric_lines("NS", 1)[0]).unwrap();
        assert_eq!(v["CompactDuplicatesRemoved"], 2.0);
        assert_eq!(v["Job"], "compact");
    }
}
