//! Whether a run takes the bounded diff, and whether the route's state fits the function's
//! memory (checked before the route lock is taken); the bounded diff's settings that follow.

use crate::config::route::Route;
use crate::diff::bounded::RangedSettings;
use crate::run::handler::{ExportPlan, RunError};
use crate::state::store::{HeadDoc, LEGACY_HEAD_FORMAT, in_memory_estimate, memory_estimate};

use super::SyncRunner;
use super::conclude::RunRecord;
use super::sizing::{EST_ROW_BYTES, SPILL_BUFFERS, STATE_MEMORY_SHARE, export_text_bytes};

impl SyncRunner {
    /// Whether this run takes the bounded diff: a format-2 (or new) state and a route of at
    /// least [`super::RunnerSettings::bounded_min_users`] users (state plus the export's estimated
    /// rows), or a run whose in-memory diff and commit ([`in_memory_estimate`]: the snapshot
    /// with the export's new users) would take more than a quarter of the memory, or a forced
    /// fan-out.
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
            .is_some_and(|l| in_memory_estimate(doc, route, est_rows, plan.force_full) > l / 4);
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
            let rows = export_text_bytes(plan) / EST_ROW_BYTES;
            in_memory_estimate(&head.doc, route, rows, plan.force_full)
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
