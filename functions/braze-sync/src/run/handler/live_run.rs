//! A notification of an export that a live run owns is a duplicate. The export's claim is
//! running in another invocation, or its fan-out run holds the route lock: that run records
//! how the export ends in the ledger (the durable record of this notification too) and hands
//! over whatever it leaves, and if it dies its own message (or its pieces') comes back. Failing
//! the notification back to the queue instead would spend one of its receives each visibility
//! timeout: duplicates of an export that every notification runs again (one whose departures
//! are held) come back together after a redrive, one runs and the others spend a receive each
//! time, until they reach the dead-letter queue. So the notification is acknowledged.
//!
//! A plan that asks for more than a plain run (a forced resend or a release of departures, by
//! object metadata or an operator's flags) is not a duplicate of the live run: a copy in place
//! with new metadata keeps the object's ETag, so its export id is the live run's. It is refused
//! as retryable, to run once the live run ends.

use serde_json::json;
use tracing::info;

use super::{ExportPlan, Handler, ObjectOutcome};

impl Handler {
    /// The answer for a notification of `plan`'s export while `owner` (a live run) syncs it:
    /// a duplicate, acknowledged; for a plan that forces a resend or releases departures, a
    /// retryable refusal.
    pub(super) fn owned_by_live_run(&self, plan: &ExportPlan, owner: &str) -> ObjectOutcome {
        let uri = &plan.trigger;
        if plan.force_full || plan.allow_departures {
            return ObjectOutcome::Retry(format!(
                "{owner} is syncing {uri} right now; this forced run or release starts once it ends"
            ));
        }
        info!(object = %uri, route = %plan.route, owner, "Export is being synced by a live run; duplicate trigger is acknowledged.");
        ObjectOutcome::Done(json!({
            "object": uri.to_string(), "route": plan.route,
            "outcome": "duplicate_while_running", "owner": owner}))
    }
}
