//! `braze-sync status`: what the state bucket says of each route — users in its state,
//! attributes tracked, state generation and size, the last export and how it ended, the last
//! runs, anything held or skipped, and who holds the route lock. [`RouteStatus::build`] is the
//! pure core (from what was read); [`read_route_status`] reads it through an [`ObjectStore`];
//! [`render`] draws the table. The JSON field names are the `RouteStatus` fields below and are
//! kept stable for scripts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bridge_shared::{ObjectMeta, ObjectStore, S3Uri, StoreError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::route::Route;
use crate::ops::report::{RunReport, RunStatus};
use crate::state::ledger::{Ledger, LedgerEntry, LedgerError, LedgerStatus};
use crate::state::route_lock::{LockDoc, LockError, lock_uri, read_lock};
use crate::state::store::{HeadDoc, StateError, StateStore, Watermark};

/// How many runs `status` shows per route (newest first).
pub const RUNS_SHOWN: usize = 10;

/// Where the state and the reports are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusLocation {
    /// The state bucket (`STATE_BUCKET`).
    pub bucket: String,
    /// `STATE_PREFIX` (ends with `/`).
    pub state_prefix: String,
    /// `REPORTS_PREFIX` (ends with `/`).
    pub reports_prefix: String,
}

/// The status of one route (the `--json` document is a list of these).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteStatus {
    /// Route name.
    pub route: String,
    /// The confirmed state.
    pub state: StateSummary,
    /// The newest export the state reflects (`None` before the first commit).
    pub watermark: Option<Watermark>,
    /// The export of the newest run, and how it ended.
    pub last_export: Option<LastExport>,
    /// The last [`RUNS_SHOWN`] runs, newest first.
    pub runs: Vec<RunRow>,
    /// Runs among those whose export still waits for something: departures held, skipped as
    /// stale, failed (retryable or not), incomplete, object not found — unless a later run completed the export.
    pub attention: Vec<Attention>,
    /// The run holding the route lock now, when one is in progress.
    pub lease: Option<Lease>,
    /// Exports split across invocations whose pieces are still at work (their control
    /// objects under `<route>/_fan_out/<run id>/`).
    #[serde(default)]
    pub fan_outs: Vec<FanOutProgress>,
}

/// An export split across invocations, as far as its control objects tell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FanOutProgress {
    /// The fan-out's run id (the route lock's holder while it runs).
    pub run_id: String,
    /// Pieces (forks of the state).
    pub pieces: usize,
    /// Pieces finished (`done.json`).
    pub pieces_done: usize,
    /// The last piece is merging, sending departures and committing (`final.json`).
    pub finalizing: bool,
}

/// The fan-outs a route folder's listing shows (`_fan_out/<run id>/...`, keys relative to
/// the route folder), in run order.
fn fan_outs(relative: &[&str]) -> Vec<FanOutProgress> {
    let mut by_run: BTreeMap<&str, FanOutProgress> = BTreeMap::new();
    for key in relative {
        let Some(rest) = key.strip_prefix(crate::state::store::CONTROL_FOLDER) else {
            continue;
        };
        let Some((run, file)) = rest.trim_start_matches('/').split_once('/') else {
            continue;
        };
        let f = by_run.entry(run).or_insert_with(|| FanOutProgress {
            run_id: run.to_string(),
            pieces: 0,
            pieces_done: 0,
            finalizing: false,
        });
        match file.split_once('/') {
            Some((p, "head.json")) if p.starts_with('p') => f.pieces += 1,
            Some((p, "done.json")) if p.starts_with('p') => f.pieces_done += 1,
            None if file == "final.json" => f.finalizing = true,
            _ => {}
        }
    }
    // A finished fan-out leaves only state objects the route head references.
    by_run.into_values().filter(|f| f.pieces > 0).collect()
}

/// A route's confirmed state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StateSummary {
    /// `s3://` address of `head.json`.
    pub head: String,
    /// Users in the state (as of the last commit).
    pub users: u64,
    /// Attributes tracked per user (the route's Braze attributes and audiences).
    pub attributes_tracked: usize,
    /// Commit generation (0: nothing committed yet).
    pub generation: u64,
    /// Objects the head points to (base shards, deltas, checkpoint segments).
    pub objects: usize,
    /// Their total size in bytes.
    pub bytes: u64,
    /// When the head was last written (RFC 3339).
    pub updated_at: Option<String>,
}

/// The export of the newest run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExport {
    /// `s3://bucket/key` of the export (or its marker).
    pub key: String,
    /// Its id (address + ETag/version).
    pub export_id: String,
    /// When it was exported, as the route's `order_by` dates it (RFC 3339).
    pub exported_at: Option<String>,
    /// How its newest run ended (the report's status).
    pub status: String,
    /// What the ledger says of it (`complete`, `incomplete`, `skipped_stale`,
    /// `failed_retryable`, ...), when it has an entry.
    pub ledger_status: Option<String>,
    /// The run report.
    pub report: String,
}

/// One run, from its report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RunRow {
    /// Run id (starts with its start time).
    pub run_id: String,
    /// Start, RFC 3339.
    pub started_at: Option<String>,
    /// Outcome (`complete`, `incomplete`, `failed`, `skipped_stale`, `departures_held`, ...;
    /// an adoption's own status for `adopt-*` runs).
    pub status: String,
    /// Data rows read.
    pub rows_in: u64,
    /// Users sent to Braze.
    pub users_sent: u64,
    /// Users unchanged since Braze last confirmed them.
    pub unchanged: u64,
    /// Rows refused before sending.
    pub rejected: u64,
    /// Users Braze refused.
    pub braze_rejected: u64,
    /// Departures held back.
    pub departures_held: u64,
    /// Whole run, seconds.
    pub duration_s: f64,
    /// The export's id.
    pub export_id: Option<String>,
    /// `s3://` address of the report.
    pub report: String,
}

/// A run whose export still waits for something.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attention {
    /// The run.
    pub run_id: String,
    /// Its export.
    pub export_id: Option<String>,
    /// The run's status.
    pub status: String,
    /// The export's ledger status now, when it has an entry.
    pub ledger_status: Option<String>,
    /// Why, in a line (the error, or the first note).
    pub detail: String,
    /// The report.
    pub report: String,
}

/// The route lock's holder while a run is in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The holder's run id.
    pub holder: String,
    /// Until when it holds without renewing (RFC 3339).
    pub lease_until: String,
    /// Seconds left on the lease.
    pub expires_in_s: i64,
}

/// Why a route's status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Reading the state head failed.
    #[error("status of route {route}: {error}")]
    State {
        /// Route.
        route: String,
        /// Why.
        error: StateError,
    },
    /// Listing or reading objects failed.
    #[error("status of route {route}: {error}")]
    Store {
        /// Route.
        route: String,
        /// Why.
        error: StoreError,
    },
    /// A ledger entry could not be read.
    #[error("status of route {route}: {error}")]
    Ledger {
        /// Route.
        route: String,
        /// Why.
        error: LedgerError,
    },
    /// The route lock could not be read.
    #[error("status of route {route}: {error}")]
    Lock {
        /// Route.
        route: String,
        /// Why.
        error: LockError,
    },
}

/// Everything `status` reads of one route, before it is summarised.
#[derive(Debug, Clone, Default)]
pub struct RouteReading {
    /// Route name.
    pub route: String,
    /// Attributes the route tracks.
    pub attributes_tracked: usize,
    /// `s3://` address of the head.
    pub head_uri: String,
    /// The head (`None`: the route has no state yet).
    pub head: Option<HeadDoc>,
    /// The listing of the route's state folder (sizes of the state objects).
    pub state_objects: Vec<ObjectMeta>,
    /// The newest reports: `(s3:// address, body)`, any order.
    pub reports: Vec<(String, Bytes)>,
    /// Ledger entries by export id.
    pub ledger: BTreeMap<String, LedgerEntry>,
    /// The lock object, when there is one.
    pub lock: Option<LockDoc>,
}

fn ledger_word(s: &LedgerStatus) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn status_word(s: RunStatus) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The order of a report's run id in time (`adopt-<time>` sorts with the runs).
fn run_order(report_key: &str) -> &str {
    let name = report_key.rsplit('/').next().unwrap_or(report_key);
    name.strip_prefix("adopt-").unwrap_or(name)
}

/// One report, whatever wrote it (a sync run, or an adoption with its own status words).
fn run_row(uri: &str, body: &[u8]) -> (RunRow, Option<RunReport>) {
    if let Ok(r) = serde_json::from_slice::<RunReport>(body) {
        let row = RunRow {
            run_id: r.run_id.clone(),
            started_at: r.started_at.clone(),
            status: status_word(r.status),
            rows_in: r.rows_in,
            users_sent: r.users_sent,
            unchanged: r.unchanged,
            rejected: r.rejected,
            braze_rejected: r.braze_rejected,
            departures_held: r.departures_held,
            duration_s: r.duration_s,
            export_id: r.export_id.clone(),
            report: uri.to_string(),
        };
        return (row, Some(r));
    }
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let n = |f: &str| v[f].as_u64().unwrap_or(0);
    let name = uri.rsplit('/').next().unwrap_or(uri);
    let row = RunRow {
        run_id: name.trim_end_matches(".json").to_string(),
        status: v["status"].as_str().unwrap_or("unreadable").to_string(),
        rows_in: n("rows_read"),
        rejected: n("rejected"),
        export_id: v["export_id"].as_str().map(str::to_string),
        report: uri.to_string(),
        ..RunRow::default()
    };
    (row, None)
}

fn head_objects(head: &HeadDoc) -> Vec<&str> {
    head.ranges
        .iter()
        .flat_map(|r| r.base.iter().chain(&r.deltas))
        .chain(&head.base)
        .chain(&head.segments)
        .map(String::as_str)
        .collect()
}

/// The `s3://bucket/key` part of an export id (`s3://bucket/key#etag`).
pub fn export_key(export_id: &str) -> &str {
    export_id
        .rsplit_once('#')
        .map(|(k, _)| k)
        .unwrap_or(export_id)
}

impl RouteStatus {
    /// Summarises what was read; `now_ms` decides whether the lock's lease is alive.
    pub fn build(reading: RouteReading, now_ms: i64) -> RouteStatus {
        let RouteReading {
            route,
            attributes_tracked,
            head_uri,
            head,
            state_objects,
            mut reports,
            ledger,
            lock,
        } = reading;
        let mut state = StateSummary {
            head: head_uri.clone(),
            attributes_tracked,
            ..StateSummary::default()
        };
        let mut watermark = None;
        // Keys relative to the route folder (what the head names): `<folder>head.json`.
        let folder = head_uri
            .strip_prefix("s3://")
            .and_then(|u| u.split_once('/'))
            .map_or("", |(_, k)| k.trim_end_matches("head.json"))
            .to_string();
        let relative: Vec<&str> = state_objects
            .iter()
            .map(|m| m.key.strip_prefix(folder.as_str()).unwrap_or(&m.key))
            .collect();
        let fan_outs = fan_outs(&relative);
        if let Some(h) = &head {
            let sizes: BTreeMap<&str, u64> = relative
                .iter()
                .zip(&state_objects)
                .map(|(k, m)| (*k, m.size))
                .collect();
            let names = head_objects(h);
            state.users = h.users.max(h.ranges.iter().map(|r| r.users).sum());
            state.generation = h.generation;
            state.objects = names.len();
            state.bytes = names.iter().filter_map(|n| sizes.get(n)).sum();
            state.updated_at = Some(h.updated_at.clone()).filter(|s| !s.is_empty());
            watermark = h.watermark.clone();
        }

        reports.sort_by(|a, b| run_order(&b.0).cmp(run_order(&a.0)));
        reports.truncate(RUNS_SHOWN);
        let ledger_of = |export: &Option<String>| {
            export
                .as_ref()
                .and_then(|e| ledger.get(e))
                .map(|e| ledger_word(&e.status))
        };
        let mut runs = Vec::new();
        let mut attention = Vec::new();
        let mut last_export = None;
        let mut settled: Vec<String> = Vec::new();
        for (uri, body) in &reports {
            let (row, report) = run_row(uri, body);
            if last_export.is_none()
                && let Some(id) = &row.export_id
            {
                last_export = Some(LastExport {
                    key: export_key(id).to_string(),
                    export_id: id.clone(),
                    exported_at: report.as_ref().and_then(|r| r.exported_at.clone()),
                    status: row.status.clone(),
                    ledger_status: ledger_of(&row.export_id),
                    report: uri.clone(),
                });
            }
            let waits = matches!(
                row.status.as_str(),
                "departures_held" | "skipped_stale" | "failed" | "incomplete" | "object_not_found"
            );
            let ledger_status = ledger_of(&row.export_id);
            let done_later = row.export_id.as_ref().is_some_and(|e| settled.contains(e))
                || ledger_status.as_deref() == Some("complete");
            if waits && !done_later {
                let detail = report
                    .as_ref()
                    .and_then(|r| r.error.clone().or_else(|| r.notes.first().cloned()))
                    .unwrap_or_default();
                attention.push(Attention {
                    run_id: row.run_id.clone(),
                    export_id: row.export_id.clone(),
                    status: row.status.clone(),
                    ledger_status,
                    detail,
                    report: uri.clone(),
                });
            }
            if let Some(e) = &row.export_id {
                settled.push(e.clone());
            }
            runs.push(row);
        }

        let lease = lock
            .filter(|l| !l.released && l.lease_until_ms > now_ms)
            .map(|l| Lease {
                lease_until: chrono::DateTime::from_timestamp_millis(l.lease_until_ms)
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_default(),
                expires_in_s: (l.lease_until_ms - now_ms) / 1000,
                holder: l.holder,
            });
        RouteStatus {
            route,
            state,
            watermark,
            last_export,
            runs,
            attention,
            lease,
            fan_outs,
        }
    }
}

/// Reads the status of `route` from `store` (head, state folder listing, the newest
/// [`RUNS_SHOWN`] reports, their ledger entries, the lock), all read-only.
pub async fn read_route_status(
    shared: std::sync::Arc<dyn ObjectStore>,
    at: &StatusLocation,
    route: &Route,
    now_ms: i64,
) -> Result<RouteStatus, StatusError> {
    let name = route.name().to_string();
    let store = shared.as_ref();
    let state_store = StateStore::new(shared.clone(), &at.bucket, &at.state_prefix, &name);
    let store_err = |error| StatusError::Store {
        route: name.clone(),
        error,
    };
    let head = state_store
        .read_head()
        .await
        .map_err(|error| StatusError::State {
            route: name.clone(),
            error,
        })?;
    let folder = format!("{}{}/", at.state_prefix, name);
    let state_objects = match head.etag {
        Some(_) => store.list(&at.bucket, &folder).await.map_err(store_err)?,
        None => Vec::new(),
    };
    let mut listed = store
        .list(&at.bucket, &format!("{}{}/", at.reports_prefix, name))
        .await
        .map_err(store_err)?;
    listed.retain(|m| m.key.ends_with(".json"));
    listed.sort_by(|a, b| run_order(&b.key).cmp(run_order(&a.key)));
    listed.truncate(RUNS_SHOWN);
    let mut reports = Vec::new();
    for m in &listed {
        let uri = S3Uri::new(&at.bucket, &m.key);
        match store.get(&uri).await {
            Ok((_, body)) => reports.push((uri.to_string(), body)),
            // Deleted between the listing and the read (a lifecycle rule): not shown.
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(store_err(e)),
        }
    }
    let ledger_store = Ledger::new(store, &at.bucket, format!("{folder}ledger/"));
    let mut ledger = BTreeMap::new();
    for (uri, body) in &reports {
        let (row, _) = run_row(uri, body);
        if let Some(id) = row.export_id
            && !ledger.contains_key(&id)
            && let Some(entry) =
                ledger_store
                    .entry(&id)
                    .await
                    .map_err(|error| StatusError::Ledger {
                        route: name.clone(),
                        error,
                    })?
        {
            ledger.insert(id, entry);
        }
    }
    let lock = read_lock(store, &lock_uri(&at.bucket, &at.state_prefix, &name))
        .await
        .map_err(|error| StatusError::Lock {
            route: name.clone(),
            error,
        })?;
    Ok(RouteStatus::build(
        RouteReading {
            route: name.clone(),
            attributes_tracked: route.slot_names().len(),
            head_uri: state_store.head_uri().to_string(),
            head: head.etag.map(|_| head.doc),
            state_objects,
            reports,
            ledger,
            lock,
        },
        now_ms,
    ))
}

fn bytes_text(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A short form of an RFC 3339 time: `2026-11-30 10:00:00Z`.
fn when(t: Option<&str>) -> String {
    match t.and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok()) {
        Some(t) => t
            .with_timezone(&chrono::Utc)
            .format("%Y-%m-%d %H:%M:%SZ")
            .to_string(),
        None => t.unwrap_or("-").to_string(),
    }
}

/// The statuses as a table for a terminal.
pub fn render(statuses: &[RouteStatus]) -> String {
    let mut out = String::new();
    for (i, s) in statuses.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        render_one(&mut out, s);
    }
    out
}

fn render_one(out: &mut String, s: &RouteStatus) {
    let st = &s.state;
    let _ = writeln!(out, "Route {}", s.route);
    let _ = writeln!(
        out,
        "  State      {} users, {} attributes tracked, generation {}, {} in {} objects (updated {})",
        st.users,
        st.attributes_tracked,
        st.generation,
        bytes_text(st.bytes),
        st.objects,
        when(st.updated_at.as_deref()),
    );
    match &s.watermark {
        Some(w) => {
            let _ = writeln!(
                out,
                "  Reflects   {} (exported {})",
                export_key(&w.export_id),
                when(w.exported_at.as_deref())
            );
        }
        None => {
            let _ = writeln!(out, "  Reflects   no export yet");
        }
    }
    match &s.last_export {
        Some(e) => {
            let _ = writeln!(
                out,
                "  Last export {} (exported {}): {}{}",
                e.key,
                when(e.exported_at.as_deref()),
                e.status,
                e.ledger_status
                    .as_ref()
                    .map(|l| format!(", ledger {l}"))
                    .unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(out, "  Last export none");
        }
    }
    match &s.lease {
        Some(l) => {
            let _ = writeln!(
                out,
                "  Running    {} holds the route lock until {} ({} s left)",
                l.holder,
                when(Some(&l.lease_until)),
                l.expires_in_s
            );
        }
        None => {
            let _ = writeln!(out, "  Running    no run in progress");
        }
    }
    for f in &s.fan_outs {
        let _ = writeln!(
            out,
            "  Fan-out    {}: {} of {} pieces done{} (control objects under _fan_out/{}/)",
            f.run_id,
            f.pieces_done,
            f.pieces,
            if f.finalizing { ", finalizing" } else { "" },
            f.run_id
        );
    }
    render_runs(out, &s.runs);
    render_attention(out, &s.attention);
}

/// The newest runs, one line each.
fn render_runs(out: &mut String, runs: &[RunRow]) {
    if runs.is_empty() {
        let _ = writeln!(out, "  Runs       none yet");
    } else {
        let _ = writeln!(
            out,
            "  Last {} runs (newest first):\n    {:<20} {:<16} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8} {:>9}",
            runs.len(),
            "started",
            "status",
            "rows in",
            "sent",
            "unchanged",
            "rejected",
            "braze-rej",
            "held",
            "duration"
        );
        for r in runs {
            let _ = writeln!(
                out,
                "    {:<20} {:<16} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8} {:>8.1}s",
                when(r.started_at.as_deref()),
                r.status,
                r.rows_in,
                r.users_sent,
                r.unchanged,
                r.rejected,
                r.braze_rejected,
                r.departures_held,
                r.duration_s
            );
        }
    }
}

/// The exports held or skipped that still wait for an operator.
fn render_attention(out: &mut String, attention: &[Attention]) {
    if attention.is_empty() {
        let _ = writeln!(out, "  Held/skipped nothing");
    } else {
        let _ = writeln!(out, "  Held/skipped:");
        for a in attention {
            let _ = writeln!(
                out,
                "    {} {}{}: {}\n      {}",
                a.status,
                a.export_id.as_deref().map(export_key).unwrap_or("-"),
                a.ledger_status
                    .as_ref()
                    .map(|l| format!(" (ledger {l})"))
                    .unwrap_or_default(),
                if a.detail.is_empty() { "-" } else { &a.detail },
                a.report
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
