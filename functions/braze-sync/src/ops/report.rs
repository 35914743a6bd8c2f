//! The account of one run: a JSON report object (rows in, rejected, unchanged, users and
//! attributes sent, Braze-rejected, retries by cause, 429s, requests, duration, achieved
//! requests/s, outcome) written to S3, and CloudWatch EMF metrics under the same names.
//! The sender fills the delivery side ([`RunReport::apply_delivery`]); the run fills the rows side.

use std::collections::BTreeMap;

use bridge_shared::metrics::{Metric, emf_line, emit};
use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::diff::user::{AudienceDepartures, DepartureKind};
use crate::send::deliver::{DeliveryStats, RetriesByCause, StopReason};

/// CloudWatch namespace of braze-sync's metrics.
pub const METRICS_NAMESPACE: &str = "AmperityBrazeBridge/BrazeSync";

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Every row was confirmed, rejected with a reason, or unchanged.
    #[default]
    Complete,
    /// Some users are left unsent (deadline, transient failures); a replay continues.
    Incomplete,
    /// The run failed (refused key, unreadable export, bad config); see `error`.
    Failed,
    /// The export is dated before the one the state reflects: nothing was applied (never
    /// `complete`); a forced replay runs it.
    SkippedStale,
    /// Every change was sent except departures the guard held (too large a share of an
    /// audience, or rows without a readable identifier); see `departures`. Not final: a
    /// release (`bridge-allow-departures=true` or `--allow-departures`) sends them.
    DeparturesHeld,
    /// `--dry-run`: nothing was sent.
    DryRun,
    /// The notification named an object that does not exist (see `object_not_found`).
    ObjectNotFound,
    /// The export was too big for one invocation and was split into pieces, each run by a
    /// later invocation (`fan_out`); the last piece rewrites this report with how it ended.
    FannedOut,
}

/// The object a notification named but S3 does not have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct MissingObject {
    /// `s3://bucket/key`, key decoded.
    pub object: String,
    /// The key exactly as the notification carried it (still encoded).
    pub key_received: String,
    /// The key after decoding it for the notification's shape.
    pub key_decoded: String,
    /// The event name (`ObjectCreated:Put`, `Object Created`, ...).
    pub event_name: String,
}

/// Retries by cause, as reported (the same shape as the sender's counters).
pub type Retries = RetriesByCause;

/// One run's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct RunReport {
    /// Unique id of this run.
    pub run_id: String,
    /// Route name.
    pub route: String,
    /// The export's id (trigger address + ETag/version).
    pub export_id: Option<String>,
    /// Objects read (`s3://bucket/key`), in order.
    pub sources: Vec<String>,
    /// Outcome.
    pub status: RunStatus,
    /// Start, RFC 3339.
    pub started_at: Option<String>,
    /// End, RFC 3339.
    pub finished_at: Option<String>,
    /// Data rows read.
    pub rows_in: u64,
    /// Rows refused before sending (unparseable, invalid values, no identifier).
    pub rejected: u64,
    /// Users whose attributes had not changed since Braze last confirmed them.
    pub unchanged: u64,
    /// Of those, users whose export row the state records anew (its row digest: same values
    /// from other cells, or a state written before digests); nothing is sent for them, and
    /// the next run skips their row without mapping it.
    #[serde(default)]
    pub digests_recorded: u64,
    /// Users of the state forgotten before the diff because Braze Currents reported them
    /// deleted or orphaned (`on_braze_delete = "forget"`): the export sends them whole.
    #[serde(default)]
    pub forgotten_by_currents: u64,
    /// Confirmed attributes marked unknown before the diff because Braze Currents reported
    /// another source changing them to another value: the export sends them again.
    #[serde(default)]
    pub invalidated_by_currents: u64,
    /// Users (attribute objects) sent to Braze.
    pub users_sent: u64,
    /// Attributes in those objects.
    pub attributes_sent: u64,
    /// Users Braze confirmed.
    pub users_confirmed: u64,
    /// Users Braze refused (`errors[]`, permanent 4xx).
    pub braze_rejected: u64,
    /// Users not sent or not confirmed (deadline, outage); sent again by the next run.
    pub users_unsent: u64,
    /// Users Braze answered for without confirming them (an `errors[]` entry without an index,
    /// or a 2xx that is not Braze's JSON): not committed, sent again by the next run; the run
    /// is not `complete`.
    pub users_unconfirmed: u64,
    /// Requests whose answer confirmed nothing.
    pub unconfirmed_requests: u64,
    /// Braze refused the API key (401/403) even after it was read again from its source.
    pub api_key_refused: bool,
    /// Retries by cause.
    pub retries_by_cause: Retries,
    /// 429 answers.
    pub http_429: u64,
    /// HTTP requests to Braze.
    pub requests: u64,
    /// Whole run, seconds.
    pub duration_s: f64,
    /// Time spent delivering, seconds.
    pub send_duration_s: f64,
    /// Achieved requests per second while delivering.
    pub requests_per_s: f64,
    /// The configured limit (`BRAZE_RATE_LIMIT_REQUESTS / BRAZE_RATE_LIMIT_WINDOW_SECS x
    /// RATE_LIMIT_SHARE`) `requests_per_s` is read against; 0 when nothing was sent.
    pub rate_limit_configured_rps: f64,
    /// The most senders (runs of any route, this one included) that shared the workspace's
    /// rate limit while this run sent; each paced at its share of the limit.
    pub workspace_senders: u32,
    /// Why sending stopped early, if it did.
    pub stopped: Option<StopReason>,
    /// Where rejected rows were written.
    pub rejects_object: Option<String>,
    /// Remarks (skipped because older than the snapshot, deadline reached, ...).
    pub notes: Vec<String>,
    /// What failed, when `status` is `failed` (never contains the API key).
    pub error: Option<String>,
    /// When the export was made, as the route's `order_by` dates it (RFC 3339).
    pub exported_at: Option<String>,
    /// A forced replay of an export older than the one the state reflects: sent, but the
    /// watermark stays at the newer export.
    pub forced_older_replay: bool,
    /// Rows whose identifier could not be read (they hold departures for the run).
    pub rows_without_identifier: u64,
    /// Departures by absence sent, all audiences.
    pub departures_sent: u64,
    /// Departures by absence held back, all audiences.
    pub departures_held: u64,
    /// Per audience: members before, leaving, share, cap, sent, held and why.
    pub departures: Vec<AudienceDepartures>,
    /// Set when `status` is `object_not_found`: the key as received and as decoded.
    pub object_not_found: Option<MissingObject>,
    /// Set for an export split across invocations: its pieces and their reports' figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fan_out: Option<FanOutReport>,
}

/// How an export split across invocations was run ([`crate::run::runner`]'s fan-out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct FanOutReport {
    /// Pieces the export was split into.
    pub pieces: usize,
    /// Per piece: the state's hash ranges it diffed, its figures, its rejects object.
    pub piece_reports: Vec<FanOutPiece>,
}

/// One piece of a fan-out, as the combined report lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct FanOutPiece {
    /// Piece number (0-based).
    pub piece: usize,
    /// First state hash range it diffed.
    pub range_start: usize,
    /// One past its last range.
    pub range_end: usize,
    /// Users it sent.
    pub users_sent: u64,
    /// Users Braze confirmed.
    pub users_confirmed: u64,
    /// Users left unchanged.
    pub unchanged: u64,
    /// Requests it sent.
    pub requests: u64,
    /// 429 answers it got.
    pub http_429: u64,
    /// Its rejects object, when it rejected rows.
    pub rejects_object: Option<String>,
}

impl RunReport {
    /// An empty report for a run of `route`.
    pub fn new(run_id: impl Into<String>, route: impl Into<String>) -> Self {
        Self {
            run_id: run_id.into(),
            route: route.into(),
            ..Default::default()
        }
    }

    /// Copies the sender's figures into the report.
    pub fn apply_delivery(&mut self, d: &DeliveryStats) {
        self.users_sent = d.users_sent;
        self.attributes_sent = d.attributes_sent;
        self.users_confirmed = d.users_confirmed;
        self.braze_rejected = d.braze_rejected;
        self.users_unsent = d.users_unsent;
        self.users_unconfirmed = d.users_unconfirmed;
        self.unconfirmed_requests = d.unconfirmed_requests;
        self.retries_by_cause = d.retries_by_cause.clone();
        self.http_429 = d.http_429;
        self.requests = d.requests;
        self.send_duration_s = d.duration_s;
        self.requests_per_s = d.requests_per_s;
        self.rate_limit_configured_rps = d.rate_limit_configured_rps;
        self.workspace_senders = d.workspace_senders;
        self.stopped = d.stopped;
        if d.unmapped_errors > 0 {
            self.notes.push(format!(
                "{} Braze errors[] entries named no attribute object of their request",
                d.unmapped_errors
            ));
        }
        if d.users_unconfirmed > 0 {
            self.notes.push(format!(
                "{} users in {} requests were not confirmed by Braze (errors[] without an index, or a 2xx that is not Braze's JSON); they are not committed and are sent again by the next run",
                d.users_unconfirmed, d.unconfirmed_requests
            ));
        }
        if d.batches_given_up > 0 {
            self.notes.push(format!(
                "{} batches exhausted their retries; their users are unsent",
                d.batches_given_up
            ));
        }
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> Bytes {
        Bytes::from(serde_json::to_vec_pretty(self).unwrap_or_default())
    }

    /// Writes the report to `uri` (overwriting: a replay of the same run id replaces it).
    pub async fn put(&self, store: &dyn ObjectStore, uri: &S3Uri) -> Result<(), StoreError> {
        let mut meta = BTreeMap::new();
        meta.insert("content-type".to_string(), "application/json".to_string());
        store
            .put(uri, self.to_json(), PutCondition::None, meta)
            .await
            .map(|_| ())
    }

    /// The metrics, named like the report's fields (retries flattened to `retries_<cause>`).
    pub fn metrics(&self) -> Vec<(&'static str, Metric)> {
        let c = |v: u64| Metric::Count(v as f64);
        let r = &self.retries_by_cause;
        vec![
            ("rows_in", c(self.rows_in)),
            ("rejected", c(self.rejected)),
            ("unchanged", c(self.unchanged)),
            ("digests_recorded", c(self.digests_recorded)),
            ("forgotten_by_currents", c(self.forgotten_by_currents)),
            ("invalidated_by_currents", c(self.invalidated_by_currents)),
            ("users_sent", c(self.users_sent)),
            ("attributes_sent", c(self.attributes_sent)),
            ("users_confirmed", c(self.users_confirmed)),
            ("braze_rejected", c(self.braze_rejected)),
            ("users_unsent", c(self.users_unsent)),
            ("users_unconfirmed", c(self.users_unconfirmed)),
            ("retries", c(r.total())),
            ("retries_http_429", c(r.http_429)),
            ("retries_http_5xx", c(r.http_5xx)),
            ("retries_timeout", c(r.timeout)),
            ("retries_connection", c(r.connection)),
            ("retries_split_413", c(r.split_413)),
            ("retries_bisect_400", c(r.bisect_400)),
            ("http_429", c(self.http_429)),
            ("requests", c(self.requests)),
            ("duration_s", Metric::Seconds(self.duration_s)),
            ("send_duration_s", Metric::Seconds(self.send_duration_s)),
            ("requests_per_s", Metric::PerSecond(self.requests_per_s)),
            (
                "rate_limit_configured_rps",
                Metric::PerSecond(self.rate_limit_configured_rps),
            ),
            (
                "skipped_stale",
                c(u64::from(self.status == RunStatus::SkippedStale)),
            ),
            (
                "forced_older_replay",
                c(u64::from(self.forced_older_replay)),
            ),
            ("rows_without_identifier", c(self.rows_without_identifier)),
            ("departures_sent", c(self.departures_sent)),
            ("departures_held", c(self.departures_held)),
            (
                "object_not_found",
                c(u64::from(self.status == RunStatus::ObjectNotFound)),
            ),
            ("api_key_refused", c(u64::from(self.api_key_refused))),
            (
                "fanned_out",
                c(u64::from(self.status == RunStatus::FannedOut)),
            ),
            (
                "hourly_budget_reached",
                c(u64::from(self.stopped == Some(StopReason::HourlyBudget))),
            ),
            (
                "hourly_budget_starved",
                c(u64::from(
                    self.stopped == Some(StopReason::HourlyBudgetStarved),
                )),
            ),
        ]
    }

    /// The EMF line for these metrics (dimension `Route`).
    pub fn emf_line(&self, timestamp_ms: i64) -> String {
        emf_line(
            METRICS_NAMESPACE,
            &[("Route", self.route.as_str())],
            &self.metrics(),
            timestamp_ms,
        )
    }

    /// The metrics alarms watch, without dimensions so one alarm covers every route.
    pub fn alarm_metrics(&self) -> Vec<(&'static str, Metric)> {
        let c = |v: bool| Metric::Count(u64::from(v) as f64);
        vec![
            (
                "departures_held",
                Metric::Count(self.departures_held as f64),
            ),
            ("api_key_refused", c(self.api_key_refused)),
            (
                "object_not_found",
                c(self.status == RunStatus::ObjectNotFound),
            ),
        ]
    }

    /// Copies the planning's departure figures into the report.
    pub fn apply_departures(&mut self, departures: &[AudienceDepartures], without_id: u64) {
        self.rows_without_identifier = without_id;
        self.departures = departures.to_vec();
        self.departures_sent = departures.iter().map(|a| a.sent).sum();
        self.departures_held = departures.iter().map(|a| a.held).sum();
        for a in departures {
            if let Some(why) = &a.held_because {
                let what = match a.kind {
                    DepartureKind::Audience => format!("departures from {}", a.audience),
                    DepartureKind::Unsubscribe => {
                        format!(
                            "changes of {} to unsubscribed (a mass unsubscribe)",
                            a.audience
                        )
                    }
                    DepartureKind::ClearFields => {
                        "departed users' field clearings (on_leave = \"clear_fields\")".into()
                    }
                };
                self.notes.push(format!(
                    "departures_held: {} {what} not sent ({why}); release them with bridge-allow-departures=true or --allow-departures",
                    a.held
                ));
            }
        }
    }

    /// Prints the EMF metrics lines to stdout (CloudWatch picks them up from the Lambda's
    /// logs): the report's figures per route, and the alarm metrics across routes.
    pub fn emit_metrics(&self) {
        emit(
            METRICS_NAMESPACE,
            &[("Route", self.route.as_str())],
            &self.metrics(),
        );
        emit(METRICS_NAMESPACE, &[], &self.alarm_metrics());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bridge_shared::object_store::MemoryStore;
    use serde_json::{Value, json};

    fn sample() -> RunReport {
        let mut r = RunReport::new("run-1", "customers");
        r.rows_in = 10;
        r.rejected = 1;
        r.unchanged = 4;
        r.apply_delivery(&DeliveryStats {
            users_sent: 5,
            attributes_sent: 12,
            users_confirmed: 4,
            braze_rejected: 1,
            requests: 3,
            http_429: 1,
            retries_by_cause: RetriesByCause {
                http_429: 1,
                http_5xx: 1,
                ..Default::default()
            },
            duration_s: 1.5,
            requests_per_s: 2.0,
            rate_limit_configured_rps: 950.0,
            ..Default::default()
        });
        r
    }

    #[test]
    fn report_json_has_the_issue_fields() {
        let v: Value = serde_json::from_slice(&sample().to_json()).unwrap();
        for f in [
            "rows_in",
            "rejected",
            "unchanged",
            "users_sent",
            "attributes_sent",
            "braze_rejected",
            "retries_by_cause",
            "http_429",
            "requests",
            "duration_s",
            "requests_per_s",
            "route",
            "sources",
            "run_id",
            "status",
            "notes",
            "error",
        ] {
            assert!(v.get(f).is_some(), "missing {f}");
        }
        assert_eq!(v["retries_by_cause"]["http_5xx"], 1);
        assert_eq!(v["status"], "complete");
        assert_eq!(v["users_sent"], 5);
    }

    #[test]
    fn the_configured_rate_is_the_window_budget_times_the_share() {
        let rate = crate::send::rate_limit::RateBudget {
            requests_per_window: 3000,
            window: std::time::Duration::from_secs(3),
            share: 0.5,
            ..Default::default()
        };
        assert_eq!(crate::send::deliver::configured_rps(&rate), 500.0);
    }

    #[test]
    fn metrics_carry_the_report_names_and_values() {
        let r = sample();
        let line: Value = serde_json::from_str(&r.emf_line(1)).unwrap();
        assert_eq!(line["Route"], "customers");
        assert_eq!(line["users_sent"], 5.0);
        assert_eq!(line["braze_rejected"], 1.0);
        assert_eq!(line["retries_http_429"], 1.0);
        assert_eq!(line["retries"], 2.0);
        assert_eq!(line["requests_per_s"], 2.0);
        assert_eq!(line["rate_limit_configured_rps"], 950.0);
        let names: Vec<&str> = line["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"rows_in") && names.contains(&"http_429"));
    }

    #[test]
    fn held_departures_are_a_report_field_a_route_metric_and_an_alarm_metric() {
        let mut r = sample();
        r.apply_departures(
            &[AudienceDepartures {
                audience: "aud_vip".into(),
                members_before: 10,
                leaving: 8,
                share: 0.8,
                cap: 0.2,
                held: 8,
                held_because: Some("8 of 10 members (80.0%) would leave".into()),
                ..Default::default()
            }],
            0,
        );
        assert_eq!((r.departures_held, r.departures_sent), (8, 0));
        assert!(r.notes.iter().any(|n| n.starts_with("departures_held: 8")));
        let v: Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(v["departures"][0]["share"], 0.8);
        let line: Value = serde_json::from_str(&r.emf_line(1)).unwrap();
        assert_eq!(line["departures_held"], 8.0);
        let alarm = bridge_shared::metrics::emf_line(METRICS_NAMESPACE, &[], &r.alarm_metrics(), 1);
        let alarm: Value = serde_json::from_str(&alarm).unwrap();
        assert_eq!(alarm["departures_held"], 8.0);
        assert_eq!(
            alarm["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            json!([[]])
        );
    }

    #[test]
    fn an_export_split_into_pieces_is_its_own_metric() {
        let mut r = RunReport::new("run-3", "customers");
        let fanned = |r: &RunReport| {
            serde_json::from_str::<Value>(&r.emf_line(1)).unwrap()["fanned_out"].clone()
        };
        assert_eq!(fanned(&r), 0.0);
        r.status = RunStatus::FannedOut;
        assert_eq!(fanned(&r), 1.0);
    }

    #[test]
    fn a_missing_object_is_its_own_status_and_metric() {
        let mut r = RunReport::new("run-2", "customers");
        assert_eq!(
            serde_json::from_str::<Value>(&r.emf_line(1)).unwrap()["object_not_found"],
            0.0
        );
        r.status = RunStatus::ObjectNotFound;
        r.object_not_found = Some(MissingObject {
            object: "s3://b/a/x+y.csv".into(),
            key_received: "a/x+y.csv".into(),
            key_decoded: "a/x+y.csv".into(),
            event_name: "Object Created".into(),
        });
        let v: Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(v["status"], "object_not_found");
        assert_eq!(v["object_not_found"]["key_received"], "a/x+y.csv");
        let line: Value = serde_json::from_str(&r.emf_line(1)).unwrap();
        assert_eq!(line["object_not_found"], 1.0);
        let alarm: Value =
            serde_json::from_str(&emf_line(METRICS_NAMESPACE, &[], &r.alarm_metrics(), 1)).unwrap();
        assert_eq!(alarm["object_not_found"], 1.0);
        assert_eq!(alarm["api_key_refused"], 0.0);
        assert_eq!(
            alarm["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            serde_json::json!([[]])
        );
    }

    #[tokio::test]
    async fn report_is_written_as_json() {
        let store = MemoryStore::new();
        let uri = S3Uri::new("state", "bridge/reports/customers/run-1.json");
        sample().put(&store, &uri).await.unwrap();
        let (_, body) = store.get(&uri).await.unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["run_id"], "run-1");
        let back: RunReport = serde_json::from_slice(&body).unwrap();
        assert_eq!(back, sample());
    }
}
