//! Keeping a run's leases alive: the route lock's lease is short (`BRIDGE_LEASE_SECONDS`, 60 s by
//! default) and renewed every third of it while the run works, in Lambda and from a shell
//! alike, so a process that dies frees its route within one lease, and a long run is never
//! taken over while it lives. A renewal that finds the lock taken over tells the run (through
//! `lost`), whose committer stops the sender at once; so does a run whose renewals keep failing
//! (the store, not another holder) once its lease is about to end, since the route may be
//! taken over at its end. A fan-out piece keeps its attempt claim
//! ([`crate::state::piece_attempt`]) alive the same way, inside its route lock's keeping.

use std::future::Future;
use std::time::Duration;

use bridge_shared::S3Uri;
use bridge_shared::lease::LeaseError;
use tokio::sync::watch;
use tracing::warn;

use crate::state::piece_attempt::PieceAttempt;
use crate::state::route_lock::{LockError, RouteLock};

/// Why a renewal failed.
pub(crate) enum RenewError {
    /// Another holder took the lease over: the run must stop.
    Lost(String),
    /// The store failed: tried again at the next tick.
    Failed(String),
}

/// A lease a run keeps alive while it works ([`keep_lock`]).
pub(crate) trait Kept: Send {
    /// The lease object.
    fn lease_uri(&self) -> &S3Uri;
    /// The lease length, seconds.
    fn kept_lease_s(&self) -> i64;
    /// Epoch milliseconds until which the lease holds.
    fn kept_until_ms(&self) -> i64;
    /// Extends the lease from `now_ms`.
    fn renew_kept(&mut self, now_ms: i64) -> impl Future<Output = Result<(), RenewError>> + Send;
}

impl Kept for RouteLock {
    fn lease_uri(&self) -> &S3Uri {
        self.uri()
    }
    fn kept_lease_s(&self) -> i64 {
        self.lease_s()
    }
    fn kept_until_ms(&self) -> i64 {
        self.lease_until_ms()
    }
    async fn renew_kept(&mut self, now_ms: i64) -> Result<(), RenewError> {
        self.renew(now_ms).await.map_err(|e| match e {
            LockError::Lost { .. } => RenewError::Lost(e.to_string()),
            e => RenewError::Failed(e.to_string()),
        })
    }
}

impl Kept for PieceAttempt {
    fn lease_uri(&self) -> &S3Uri {
        self.uri()
    }
    fn kept_lease_s(&self) -> i64 {
        self.lease_s()
    }
    fn kept_until_ms(&self) -> i64 {
        self.lease_until_ms()
    }
    async fn renew_kept(&mut self, now_ms: i64) -> Result<(), RenewError> {
        self.renew(now_ms).await.map_err(|e| match e {
            LeaseError::Lost { .. } => RenewError::Lost(format!(
                "fan-out piece attempt {}: {e}; this attempt must stop",
                self.holder()
            )),
            e => RenewError::Failed(e.to_string()),
        })
    }
}

/// How often a lease of `lease_s` seconds is renewed.
pub fn renew_every(lease_s: i64) -> Duration {
    Duration::from_millis((lease_s.max(1) as u64) * 1000 / 3)
}

/// How long before its lease ends a run whose renewals keep failing stops: half a renewal
/// period, so the sender has stopped before anyone may take the route over.
fn stop_margin(every: Duration) -> Duration {
    every / 2
}

/// The instant, `margin` before `lock`'s lease ends, past which the run may not go on
/// without a successful renewal.
fn must_stop_at<L: Kept>(lock: &L, margin: Duration) -> tokio::time::Instant {
    let left_ms = lock.kept_until_ms() - crate::clock::now().timestamp_millis();
    let left = Duration::from_millis(left_ms.max(0) as u64);
    tokio::time::Instant::now() + left.saturating_sub(margin)
}

/// Runs `work` to its end while renewing `lock`; a lost lease is announced on `lost` once.
/// A renewal that fails (the store, not another holder) is tried again at the next tick, but
/// when none has succeeded by shortly before the lease ends, the lease is announced lost all
/// the same: the route may be taken over at its end, and the run must not send past it.
pub(crate) async fn keep_lock<F: Future, L: Kept>(
    work: F,
    lock: &mut L,
    lost: &watch::Sender<Option<String>>,
) -> F::Output {
    tokio::pin!(work);
    let every = renew_every(lock.kept_lease_s());
    let margin = stop_margin(every);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop_at = must_stop_at(lock, margin);
    let mut holding = true;
    loop {
        tokio::select! {
            biased;
            out = &mut work => return out,
            _ = tick.tick(), if holding => {
                match lock.renew_kept(crate::clock::now().timestamp_millis()).await {
                    Ok(()) => stop_at = must_stop_at(lock, margin),
                    Err(RenewError::Lost(why)) => {
                        warn!(lease = %lock.lease_uri(), error = %why, "Lease lost; stopping the run.");
                        let _ = lost.send(Some(why));
                        holding = false;
                    }
                    Err(RenewError::Failed(why)) => {
                        warn!(lease = %lock.lease_uri(), error = %why, "Could not renew the lease; trying again.");
                    }
                }
            }
            _ = tokio::time::sleep_until(stop_at), if holding => {
                let why = format!(
                    "lease {}: no renewal succeeded and it ends within {} s; this run must stop",
                    lock.lease_uri(),
                    margin.as_secs()
                );
                warn!(lease = %lock.lease_uri(), "Lease renewals kept failing and the lease is ending; stopping the run.");
                let _ = lost.send(Some(why));
                holding = false;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use bridge_shared::lossy_store::LossyStore;

    use super::*;
    use crate::state::route_lock::lock_uri;

    /// A run (or a fan-out piece) holding `lease_s`, whose work lasts until it is told the
    /// lock is lost; returns how long it ran and why it stopped.
    async fn run_until_told(
        store: Arc<LossyStore>,
        lease_s: i64,
        failing: u32,
    ) -> (Duration, String) {
        let uri = lock_uri("state", "bridge/state/", "people");
        let now_ms = crate::clock::now().timestamp_millis();
        let mut lock = RouteLock::acquire(store.clone(), uri, "run1", now_ms, lease_s)
            .await
            .unwrap()
            .unwrap();
        store.fail_puts(failing);
        let (tx, mut rx) = watch::channel(None);
        let started = tokio::time::Instant::now();
        let work = async move {
            rx.changed().await.unwrap();
            rx.borrow().clone().unwrap()
        };
        let why = keep_lock(work, &mut lock, &tx).await;
        (started.elapsed(), why)
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_whose_renewals_keep_failing_stops_before_its_lease_ends() {
        let (ran, why) = run_until_told(Arc::new(LossyStore::new()), 60, u32::MAX).await;
        assert!(why.contains("no renewal succeeded"), "{why}");
        // Both renewals in the lease failed; it stops half a renewal period before the end.
        assert!(ran >= Duration::from_secs(45), "{ran:?}");
        assert!(ran <= Duration::from_secs(51), "{ran:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_succeeds_after_failures_keeps_the_run_going() {
        let store = Arc::new(LossyStore::new());
        // One renewal fails, the next succeeds: the run goes on through several leases and
        // is never told it lost the lock.
        let uri = lock_uri("state", "bridge/state/", "people");
        let now_ms = crate::clock::now().timestamp_millis();
        let mut lock = RouteLock::acquire(store.clone(), uri, "run1", now_ms, 60)
            .await
            .unwrap()
            .unwrap();
        store.fail_puts(1);
        let (tx, rx) = watch::channel(None);
        let work = tokio::time::sleep(Duration::from_secs(150));
        keep_lock(work, &mut lock, &tx).await;
        assert!(rx.borrow().is_none(), "a lease renewed in time is not lost");
    }
}
