//! How big an export and a route's state are, and what a run takes from that: the rows an
//! export's parts hold as text, the layout a ranged commit plans for, whether the run takes the
//! bounded diff, and whether the state fits the function's memory (checked before the route
//! lock is taken).

use crate::config::route::Route;
use crate::diff::bounded::RangedSettings;
use crate::run::handler::{ExportPlan, RunError};
use crate::state::store::{HeadDoc, LEGACY_HEAD_FORMAT, memory_estimate};

use super::SyncRunner;
use super::conclude::RunRecord;

/// Export bytes per row assumed when estimating a route's size from its parts (a low guess,
/// so big exports take the bounded diff early).
pub const EST_ROW_BYTES: u64 = 100;
/// How many times bigger than its stored bytes a compressed part's text is assumed to be
/// when estimating its rows: gzip/zip measured at 4.9× on the harness's sample export
/// (`harness::samples::customers_csv`, 200,000 rows of 186 bytes, flate2's default level),
/// rounded up to 5.
pub const GZIP_EXPANSION: u64 = 5;
/// The same for Parquet parts: 5.6× measured on the harness's Snappy Parquet of the same
/// rows (`customers_parquet`, text columns), rounded up to 6.
pub const PARQUET_EXPANSION: u64 = 6;
/// The same for bzip2 and zstd parts: not measured; they compress at least as well as gzip,
/// so Parquet's higher figure is assumed.
pub const STRONG_EXPANSION: u64 = 6;

/// A part's bytes as text, for the rows estimate: its stored size times the expansion its
/// name says (`.gz`, `.gzip`, `.tgz`, `.tar.gz`, `.zip`: [`GZIP_EXPANSION`]; `.bz2`, `.zst`:
/// [`STRONG_EXPANSION`]; `.parquet`, `.pq`: [`PARQUET_EXPANSION`]; anything else as stored).
/// Names only: the object listing gives no content type (pure).
pub fn text_bytes(key: &str, size: u64) -> u64 {
    let k = key.to_ascii_lowercase();
    let factor = if [".gz", ".gzip", ".tgz", ".zip"]
        .iter()
        .any(|e| k.ends_with(e))
    {
        GZIP_EXPANSION
    } else if [".bz2", ".zst"].iter().any(|e| k.ends_with(e)) {
        STRONG_EXPANSION
    } else if [".parquet", ".pq"].iter().any(|e| k.ends_with(e)) {
        PARQUET_EXPANSION
    } else {
        1
    };
    size.saturating_mul(factor)
}

/// The export's bytes as text ([`text_bytes`] of every part).
pub fn export_text_bytes(plan: &ExportPlan) -> u64 {
    plan.parts
        .iter()
        .map(|p| text_bytes(&p.key, p.size))
        .fold(0, u64::saturating_add)
}

/// The users a ranged commit of `plan` lays a state out for: `expected`, or, for a state
/// without a range layout yet (a first sync), at least the export's rows (`rows_read`, as
/// the bounded diff's partition step counted them, else estimated from the parts' sizes). A
/// first sync that hands over commits what it confirmed so far; laid out for that alone, its
/// ranges would take every later invocation's users (only a complete commit re-lays out),
/// and each hand-over's commit would load ranges many times the target size.
pub(crate) fn layout_users(doc: &HeadDoc, expected: u64, rows_read: u64, plan: &ExportPlan) -> u64 {
    if !doc.ranges.is_empty() {
        return expected;
    }
    let rows = match rows_read {
        0 => export_text_bytes(plan) / EST_ROW_BYTES,
        n => n,
    };
    expected.max(rows)
}

/// Memory the bounded diff's spill buffers take.
pub const SPILL_BUFFERS: u64 = 32 << 20;

/// Share of the function's memory the confirmed state may take; the rest is for the readers,
/// the sender's buffers and the runtime.
pub const STATE_MEMORY_SHARE: f64 = 0.6;

impl SyncRunner {
    /// Whether this run takes the bounded diff: a format-2 (or new) state and a route of at
    /// least [`super::RunnerSettings::bounded_min_users`] users (state plus the export's estimated
    /// rows), or a state whose whole snapshot would take more than a quarter of the memory,
    /// or a forced fan-out.
    pub(super) fn takes_bounded(&self, plan: &ExportPlan, route: &Route, doc: &HeadDoc) -> bool {
        if doc.format == LEGACY_HEAD_FORMAT {
            return false;
        }
        let s = &self.settings;
        let est_rows: u64 = export_text_bytes(plan) / EST_ROW_BYTES;
        let users = doc
            .users
            .max(doc.ranges.iter().map(|r| r.users).sum::<u64>())
            .saturating_add(est_rows);
        let heavy = s
            .memory_limit_bytes
            .is_some_and(|l| memory_estimate(doc, route) > l / 4);
        // A forced fan-out (`BRIDGE_FAN_OUT_PIECES`) splits the bounded diff, whatever the size.
        let forced = s.fan_out_pieces.is_some_and(|n| n >= 2) && self.continuation.is_some();
        users >= s.bounded_min_users || heavy || forced
    }

    /// Memory the bounded diff needs per worker: its largest hash range, loaded.
    pub(super) fn range_memory(doc: &HeadDoc, route: &Route) -> u64 {
        // A head without ranges holds its users in one.
        let widest = doc
            .ranges
            .iter()
            .map(|r| r.users)
            .max()
            .unwrap_or(doc.users);
        let one = HeadDoc {
            users: widest,
            ..HeadDoc::default()
        };
        memory_estimate(&one, route)
    }

    /// Fails fast, before the route lock is taken (so a state that cannot fit never leaves
    /// the lock held by a process that dies loading it), when the state the head describes
    /// cannot fit in this function's memory: the whole snapshot for the in-memory diff, one
    /// hash range per worker plus the spill buffers for the bounded one. Returns whether the
    /// run takes the bounded diff.
    pub(super) async fn check_memory(
        &self,
        plan: &ExportPlan,
        route: &Route,
        record: &mut RunRecord,
    ) -> Result<bool, RunError> {
        let head = match self.state(route).read_head().await {
            Ok(h) => h,
            Err(e) if e.is_retryable() => return Err(RunError::Retryable(e.to_string())),
            // An unreadable head fails the load with its own reason.
            Err(_) => return Ok(false),
        };
        let bounded = self.takes_bounded(plan, route, &head.doc);
        let Some(limit) = self.settings.memory_limit_bytes else {
            return Ok(bounded);
        };
        let need = if bounded {
            Self::range_memory(&head.doc, route) + SPILL_BUFFERS
        } else {
            memory_estimate(&head.doc, route)
        };
        let budget = (limit as f64 * STATE_MEMORY_SHARE) as u64;
        if need <= budget {
            return Ok(bounded);
        }
        let mb = |b: u64| b.div_ceil(1024 * 1024);
        let want = ((need as f64 / STATE_MEMORY_SHARE) as u64).div_ceil(64 << 20) * 64;
        let what = if bounded {
            "its largest state range and the spill buffers need"
        } else {
            "needs"
        };
        let message = format!(
            "route {}: its confirmed state ({} users, {} attributes) {what} about {} MB in memory, more than the {} MB this function gives it ({}% of its {} MB); nothing was sent and the route lock was not taken. Raise the function's memory (MemorySize of BrazeSyncFunction in template.yaml, memorySize in the CDK construct) to at least {} MB",
            route.name(),
            head.doc.users,
            route.slot_names().len(),
            mb(need),
            mb(budget),
            (STATE_MEMORY_SHARE * 100.0) as u32,
            mb(limit),
            want
        );
        Err(record.failed(self.store.as_ref(), message, false).await)
    }

    /// The bounded diff's settings for this run: workers bounded by the cores and by the
    /// memory one loaded range takes.
    pub(super) fn ranged_settings(
        &self,
        doc: &HeadDoc,
        route: &Route,
        run_id: &str,
    ) -> RangedSettings {
        let s = &self.settings;
        let mut r = RangedSettings::new(run_id);
        r.spill_base = s.spill_dir.clone();
        r.disk_limit = s.spill_limit_bytes;
        r.buffer_budget = SPILL_BUFFERS as usize;
        let mut workers = s.diff_workers.max(1);
        if let Some(limit) = s.memory_limit_bytes {
            let budget = (limit as f64 * STATE_MEMORY_SHARE) as u64;
            let per = Self::range_memory(doc, route).max(1);
            let fit = budget.saturating_sub(SPILL_BUFFERS) / per;
            workers = workers.min(fit.max(1) as usize);
        }
        r.workers = workers;
        r
    }
}
