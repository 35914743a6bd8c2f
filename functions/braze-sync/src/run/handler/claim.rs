//! Claiming an export in the route's ledger before it runs: a completed export is a
//! duplicate no-op, so is one a live run owns (its claim is running in another invocation, or
//! its fan-out run holds the route lock: [`Handler::owned_by_live_run`]), and a fanned-out one
//! whose fan-out run is gone is taken over (a fan-out whose coordinator could not queue every
//! piece has them queued again).

use serde_json::json;
use tracing::{info, warn};

use super::{ExportPlan, Handler, ObjectOutcome};
use crate::state::ledger::{Claim, Ledger};
use crate::state::route_lock::{lock_uri, read_lock};

/// A fan-out whose export's ledger entry says it is not over.
struct FannedOut<'a> {
    export_id: &'a str,
    route: &'a str,
    run_id: &'a str,
    /// Pieces to queue again (its coordinator could not queue them all), else 0.
    requeue: u32,
}

impl Handler {
    /// Claims the export in the ledger and returns the claim's ETag. A completed export is a
    /// duplicate no-op, so is one a live run owns (unless the plan asks for more than a plain
    /// run), and a fanned-out one is left to its fan-out run while that run lives.
    pub(super) async fn claim_export(
        &self,
        ledger: &Ledger<'_>,
        plan: &ExportPlan,
    ) -> Result<String, ObjectOutcome> {
        let uri = &plan.trigger;
        let export_id = &plan.export_id;
        let now = crate::clock::now().timestamp();
        match ledger
            .claim(export_id, now, self.cfg.lease_s, plan.force_full)
            .await
        {
            Ok(Claim::Acquired { etag }) => Ok(etag),
            Ok(Claim::AlreadyComplete { report }) => {
                info!(object = %uri, route = %plan.route, "Export already synced; duplicate trigger is a no-op.");
                Err(ObjectOutcome::Done(json!({
                    "object": uri.to_string(), "route": plan.route,
                    "outcome": "duplicate_no_op", "report": report})))
            }
            Ok(Claim::Busy) => Err(self.owned_by_live_run(plan, "another invocation")),
            Ok(Claim::FannedOut { run_id, requeue }) => {
                let fan_out = FannedOut {
                    export_id,
                    route: &plan.route,
                    run_id: &run_id,
                    requeue,
                };
                self.claim_after_fan_out(ledger, plan, fan_out, now).await
            }
            Err(e) => Err(ObjectOutcome::Retry(e.to_string())),
        }
    }

    /// A replay of an export that was split across invocations: while the fan-out run holds
    /// the route lock (its pieces are running) the fan-out owns the export, so the replay is
    /// a duplicate ([`Handler::owned_by_live_run`]); once that run is gone (it died, or ended
    /// without recording it) the replay claims the export. Never a second fan-out at once. A
    /// fan-out whose coordinator could not queue every piece has them queued again here (a
    /// piece queued twice runs once), and the notification is then acknowledged: the fan-out
    /// owns the export, and its last piece records how it ended.
    async fn claim_after_fan_out(
        &self,
        ledger: &Ledger<'_>,
        plan: &ExportPlan,
        fan_out: FannedOut<'_>,
        now: i64,
    ) -> Result<String, ObjectOutcome> {
        let FannedOut {
            export_id,
            route,
            run_id,
            requeue,
        } = fan_out;
        let lock = lock_uri(&self.cfg.state_bucket, &self.cfg.state_prefix, route);
        let held = read_lock(self.store.as_ref(), &lock)
            .await
            .map_err(|e| ObjectOutcome::Retry(e.to_string()))?
            .is_some_and(|l| {
                l.holder == run_id
                    && !l.released
                    && l.lease_until_ms > crate::clock::now().timestamp_millis()
            });
        if held && requeue > 0 {
            return Err(self
                .queue_fan_out_again(ledger, plan, run_id, requeue)
                .await);
        }
        if held {
            let owner = format!("fan-out run {run_id} (its pieces hold the route lock)");
            return Err(self.owned_by_live_run(plan, &owner));
        }
        match ledger
            .take_over_fan_out(export_id, run_id, now, self.cfg.lease_s)
            .await
        {
            Ok(Claim::Acquired { etag }) => Ok(etag),
            Ok(_) => Err(ObjectOutcome::Retry(
                "the export's ledger entry changed; trying again".into(),
            )),
            Err(e) => Err(ObjectOutcome::Retry(e.to_string())),
        }
    }

    /// Queues the `pieces` of fan-out run `run_id` again and records it in the export's
    /// ledger entry; the notification is acknowledged once both are done, retried otherwise.
    async fn queue_fan_out_again(
        &self,
        ledger: &Ledger<'_>,
        plan: &ExportPlan,
        run_id: &str,
        pieces: u32,
    ) -> ObjectOutcome {
        let uri = &plan.trigger;
        if let Err(e) = self
            .runner
            .queue_fan_out(&plan.route, run_id, pieces as usize)
            .await
        {
            warn!(object = %uri, run_id, error = %e, "Could not queue the fan-out's pieces again; the trigger is retried.");
            return ObjectOutcome::Retry(format!("could not queue the fan-out's pieces: {e}"));
        }
        if let Err(e) = ledger.pieces_queued(&plan.export_id, run_id).await {
            return ObjectOutcome::Retry(format!("recording the queued pieces in the ledger: {e}"));
        }
        info!(object = %uri, route = %plan.route, run_id, pieces, "Queued the fan-out's pieces again.");
        ObjectOutcome::Done(json!({
            "object": uri.to_string(), "route": plan.route, "outcome": "fan_out_queued",
            "run_id": run_id, "pieces": pieces}))
    }
}
