//! Keeping a run's route lock alive: the lease is short (`BRIDGE_LEASE_SECONDS`, 60 s by
//! default) and renewed every third of it while the run works, in Lambda and from a shell
//! alike, so a process that dies frees its route within one lease, and a long run is never
//! taken over while it lives. A renewal that finds the lock taken over tells the run (through
//! `lost`), whose committer stops the sender at once.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

use crate::state::route_lock::{LockError, RouteLock};

/// How often a lease of `lease_s` seconds is renewed.
pub fn renew_every(lease_s: i64) -> Duration {
    Duration::from_millis((lease_s.max(1) as u64) * 1000 / 3)
}

/// Runs `work` to its end while renewing `lock`; a lost lease is announced on `lost` once.
pub(crate) async fn keep_lock<F: Future>(
    work: F,
    lock: &mut RouteLock,
    lost: &watch::Sender<Option<String>>,
) -> F::Output {
    tokio::pin!(work);
    let every = renew_every(lock.lease_s());
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut holding = true;
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick(), if holding => {
                match lock.renew(crate::clock::now().timestamp_millis()).await {
                    Ok(()) => {}
                    Err(e @ LockError::Lost { .. }) => {
                        warn!(lock = %lock.uri(), error = %e, "Route lock lost; stopping the run.");
                        let _ = lost.send(Some(e.to_string()));
                        holding = false;
                    }
                    Err(e) => {
                        warn!(lock = %lock.uri(), error = %e, "Could not renew the route lock; trying again.");
                    }
                }
            }
        }
    }
}
