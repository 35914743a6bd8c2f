//! A run that finds its route held by another run, after waiting for it inside the
//! invocation ([`super::SyncRunner::lock`]), does not fail its message back to the queue
//! (which would bring it back only after a whole visibility timeout and spend one of its
//! receives): it writes its report and hands the export over to itself with a delay of
//! [`route_wait_delay`] through the function's own queue, once the handler has released the
//! export's claim. The queued message is the durable record of the acknowledged one. The
//! export's ledger entry counts these waits in a row (`route_waits`, reset by a run that
//! takes the route); the run that finds [`ROUTE_WAIT_LIMIT`] of them fails retryably as
//! before, which starts the count again: each receive of the message allows that many waits,
//! and the queue's receive count and dead-letter queue bound the whole. Without a
//! continuation queue or a Lambda deadline (a run from a shell) the run fails at once.

use std::time::Duration;

use serde_json::json;
use tracing::info;

use super::hand_over::MAX_DELAY;
use super::{RunRecord, SyncRunner};
use crate::config::route::Route;
use crate::ops::report::RunStatus;
use crate::run::handler::{RunError, RunOutcome};

/// Delayed hand-overs in a row an export may take while its route is held by other runs.
/// Each hop waits at least [`route_wait_delay`] (twice the route lease: 120 s at the default
/// 60 s lease) on top of the invocation's own wait of up to one lease, so eight hops outlast
/// the longest single run the lock allows (the 900 s Lambda timeout) with room for a second
/// export queued ahead; a route held longer (a fan-out) falls back to the queue's retries.
pub const ROUTE_WAIT_LIMIT: u32 = 8;

/// How long a waiting export's continuation is held back: twice the route lease, at least
/// 30 s and at most SQS's [`MAX_DELAY`].
pub fn route_wait_delay(lease_s: i64) -> Duration {
    let lease = Duration::from_secs(lease_s.max(1) as u64);
    (lease * 2).clamp(Duration::from_secs(30), MAX_DELAY)
}

/// Why a run fails when it finds its route busy and cannot (or may no longer) wait.
fn busy(route: &Route, waits: u32) -> String {
    let tail = match waits {
        0 => String::new(),
        n => format!(" (after {n} delayed waits in a row)"),
    };
    format!(
        "another export of route {} is syncing; this one waits its turn{tail}",
        route.name()
    )
}

impl SyncRunner {
    /// The route is still held by another run: hands the export over with a delay (report,
    /// log, the counts its ledger entry carries) or, past [`ROUTE_WAIT_LIMIT`] or without a
    /// continuation queue or Lambda deadline, fails retryably.
    pub(super) async fn wait_for_route(
        &self,
        route: &Route,
        record: &mut RunRecord,
        remaining_ms: Option<u64>,
    ) -> Result<RunOutcome, RunError> {
        if self.continuation.is_none() || remaining_ms.is_none() {
            return Err(RunError::Retryable(busy(route, 0)));
        }
        let counts = self.carried_counts(record).await;
        if counts.route_waits >= ROUTE_WAIT_LIMIT {
            return Err(RunError::Retryable(busy(route, counts.route_waits)));
        }
        let waits = counts.route_waits + 1;
        let delay = route_wait_delay(self.settings.route_lease_s);
        info!(
            route = %route.name(),
            route_waits = waits,
            limit = ROUTE_WAIT_LIMIT,
            delay_s = delay.as_secs(),
            "The route is held by another run; handing the export over to try again after a delay."
        );
        record.report.status = RunStatus::Incomplete;
        record.report.notes.push(format!(
            "another export of route {} is syncing: nothing was sent; the export is handed over to try again in {} s (wait {waits} of {ROUTE_WAIT_LIMIT})",
            route.name(),
            delay.as_secs()
        ));
        record.finish(self.store.as_ref()).await;
        Ok(record.outcome(
            true,
            json!({"status": "waiting_for_route", "route_waits": waits,
                "hand_over_delay_s": delay.as_secs(), "stalled": counts.stalled,
                "budget_wait_since": counts.budget_wait_since}),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_is_twice_the_lease_within_sqs_bounds() {
        assert_eq!(route_wait_delay(60), Duration::from_secs(120));
        assert_eq!(route_wait_delay(5), Duration::from_secs(30));
        assert_eq!(route_wait_delay(3_600), MAX_DELAY);
    }
}
