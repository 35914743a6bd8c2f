//! One run per route at a time: a small lease object, `<state prefix><route>/route-lock.json`,
//! kept through the shared conditional-write lease ([`bridge_shared::lease`]): taken with a
//! create-only write (or, once expired or released, a write conditional on the ETag that was
//! read), renewed with `If-Match` on the holder's own ETag, and released by writing it back as
//! free; the object is never deleted. A holder that dies leaves the lease to expire by itself;
//! a holder whose renewal finds another writer's lease has lost the lock and must stop. A
//! write of ours whose answer was lost is recognised by reading the lock back, so it is never
//! taken for another holder's. The pieces of a fan-out share their run's holder name
//! ([`RouteLock::join`]): a sibling's renewal is not a loss.
//!
//! This is not the export ledger ([`crate::state::ledger`]): the ledger says what happened to each
//! export; the lock says who may move a route's state right now.

use std::sync::Arc;
use std::time::Duration;

use bridge_shared::lease::{self, Current, Lease, LeaseDoc, LeaseError};
use bridge_shared::{ObjectStore, S3Uri, StoreError};
use serde::{Deserialize, Serialize};
use tracing::warn;

/// The lock object's name inside a route's state folder.
pub const LOCK_OBJECT: &str = "route-lock.json";

/// Attempts at releasing a lock (a store error is retried) before its lease is left to expire.
pub const RELEASE_ATTEMPTS: u32 = 4;

/// Attempts at taking a lock whose write failed transiently (an attempt whose answer was lost
/// is recognised by the next one: the lock names us).
pub const ACQUIRE_ATTEMPTS: u32 = 3;

/// Attempts at joining a lock that keeps changing under us (siblings renewing it).
const JOIN_ATTEMPTS: u32 = 5;

/// The lock object's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockDoc {
    /// Who holds (or last held) it: the run id.
    pub holder: String,
    /// Epoch milliseconds until which the holder may act without renewing.
    pub lease_until_ms: i64,
    /// Set when the holder let it go.
    #[serde(default)]
    pub released: bool,
}

impl LockDoc {
    fn held(holder: &str, lease_until_ms: i64) -> Self {
        Self {
            holder: holder.to_string(),
            lease_until_ms,
            released: false,
        }
    }

    fn released(holder: &str) -> Self {
        Self {
            holder: holder.to_string(),
            lease_until_ms: 0,
            released: true,
        }
    }
}

impl LeaseDoc for LockDoc {
    fn holder(&self) -> &str {
        &self.holder
    }

    fn keeps_out(&self, now_ms: i64) -> bool {
        !self.released && self.lease_until_ms > now_ms
    }
}

/// Why the lock could not be read, taken, renewed or released.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The store failed.
    #[error("route lock {uri}: {error}")]
    Store {
        /// The lock object.
        uri: S3Uri,
        /// Why.
        error: StoreError,
    },
    /// Another run replaced our lease (ours expired before we renewed it).
    #[error("route lock {uri}: the lease was taken over by {holder:?}; this run must stop")]
    Lost {
        /// The lock object.
        uri: S3Uri,
        /// The new holder, when readable.
        holder: Option<String>,
    },
}

impl LockError {
    /// Whether trying later can succeed (always: locks expire, stores recover).
    pub fn is_retryable(&self) -> bool {
        true
    }

    /// The lease's error as the lock's: a lease that changed under us and could not be read
    /// back is a store failure (the next renewal finds out), not a loss.
    fn of(e: LeaseError) -> Self {
        match e {
            LeaseError::Store { uri, error } | LeaseError::Changed { uri, error } => {
                Self::Store { uri, error }
            }
            LeaseError::Lost { uri, holder } => Self::Lost { uri, holder },
        }
    }

    /// Whether the store failed transiently (trying again at once may succeed).
    fn is_transient(&self) -> bool {
        matches!(self, Self::Store { error, .. } if error.is_retryable())
    }
}

/// A held route lock. Dropping it without [`RouteLock::release`] leaves the lease to expire.
pub struct RouteLock {
    store: Arc<dyn ObjectStore>,
    lease: Lease,
    holder: String,
    lease_s: i64,
    lease_until_ms: i64,
    /// Held by several invocations at once under one holder name (the pieces of a fan-out,
    /// [`RouteLock::join`]): a renewal that finds a sibling's write is not a loss.
    shared: bool,
}

/// What [`RouteLock::join`] found.
pub enum Joined {
    /// The lock is held under the holder name asked for (joined, or taken again once free).
    Held(RouteLock),
    /// The holder name asked for released the lock: its work is over.
    Ended,
    /// Another holder's lease is alive.
    Busy(String),
}

/// The lock object of a route: `s3://<bucket>/<state_prefix><route>/route-lock.json`.
pub fn lock_uri(bucket: &str, state_prefix: &str, route: &str) -> S3Uri {
    let mut prefix = state_prefix.to_string();
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    S3Uri::new(bucket, format!("{prefix}{route}/{LOCK_OBJECT}"))
}

/// Reads the lock object without taking it (for `status`): `None` when the route never ran.
/// An unreadable lock object protects nobody (see [`RouteLock::acquire`]): shown as free.
pub async fn read_lock(store: &dyn ObjectStore, uri: &S3Uri) -> Result<Option<LockDoc>, LockError> {
    let current = lease::read::<LockDoc>(store, uri)
        .await
        .map_err(LockError::of)?;
    Ok(current.and_then(|c| c.doc))
}

/// Runs `attempt` until it succeeds, fails for good, or has failed transiently
/// [`ACQUIRE_ATTEMPTS`] times (taking and joining the lock: conditional writes, which the
/// state's retrying store leaves to their callers).
async fn retry_transient<T, F, Fut>(uri: &S3Uri, what: &str, attempt: F) -> Result<T, LockError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, LockError>>,
{
    retry_lease_write(uri, what, LockError::is_transient, attempt).await
}

/// Runs `attempt`, a conditional lease write (which the state's retrying store leaves to its
/// caller), until it succeeds, fails for good, or has failed transiently ([`ACQUIRE_ATTEMPTS`]
/// times in all), logging each retry as "could not `what`". The lease recognises a write of
/// ours whose answer was lost at the next attempt. The route lock and a fan-out piece's
/// attempt claim share it.
pub(crate) async fn retry_lease_write<T, E, F, Fut>(
    uri: &S3Uri,
    what: &str,
    transient: fn(&E) -> bool,
    mut attempt: F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut n = 1;
    loop {
        match attempt().await {
            Err(e) if transient(&e) && n < ACQUIRE_ATTEMPTS => {
                warn!(lease = %uri, error = %e, attempt = n, "Could not {what}; trying again.");
                n += 1;
            }
            r => return r,
        }
    }
}

impl RouteLock {
    /// Takes the lock for `lease_s` seconds from `now_ms` (epoch milliseconds), or returns
    /// `None` when another holder's lease is alive (or another run took it at the same moment).
    /// A transient store failure is tried again ([`ACQUIRE_ATTEMPTS`] in all).
    pub async fn acquire(
        store: Arc<dyn ObjectStore>,
        uri: S3Uri,
        holder: &str,
        now_ms: i64,
        lease_s: i64,
    ) -> Result<Option<RouteLock>, LockError> {
        let doc = LockDoc::held(holder, now_ms + lease_s * 1000);
        let lease = retry_transient(&uri, "take the route lock", || async {
            Lease::acquire(store.as_ref(), &uri, &doc, now_ms)
                .await
                .map_err(LockError::of)
        })
        .await?;
        Ok(lease.map(|l| Self::held(store, l, &doc, lease_s)))
    }

    fn held(store: Arc<dyn ObjectStore>, lease: Lease, doc: &LockDoc, lease_s: i64) -> Self {
        Self {
            store,
            lease,
            holder: doc.holder.clone(),
            lease_s,
            lease_until_ms: doc.lease_until_ms,
            shared: false,
        }
    }

    /// Joins the lock held under `holder` by other invocations of the same work (the pieces
    /// of a fan-out share their run's lock): renews it for `lease_s` from `now_ms` when it is
    /// held under `holder`, or takes it under `holder` when it is free or expired. Renewals of
    /// a joined lock tolerate the siblings' renewals. A transient store failure is tried
    /// again ([`ACQUIRE_ATTEMPTS`] in all): a piece sent back to the queue waits a whole
    /// visibility timeout, which can outlast its fan-out's lease.
    pub async fn join(
        store: Arc<dyn ObjectStore>,
        uri: S3Uri,
        holder: &str,
        now_ms: i64,
        lease_s: i64,
    ) -> Result<Joined, LockError> {
        retry_transient(&uri, "join the route lock", || {
            Self::join_once(store.clone(), &uri, holder, now_ms, lease_s)
        })
        .await
    }

    /// One attempt at [`RouteLock::join`]. A take whose answer was lost is found held under
    /// `holder` by the next attempt, and taken over again.
    async fn join_once(
        store: Arc<dyn ObjectStore>,
        uri: &S3Uri,
        holder: &str,
        now_ms: i64,
        lease_s: i64,
    ) -> Result<Joined, LockError> {
        let doc = LockDoc::held(holder, now_ms + lease_s * 1000);
        for _ in 0..JOIN_ATTEMPTS {
            let current = lease::read::<LockDoc>(store.as_ref(), uri)
                .await
                .map_err(LockError::of)?;
            let taken = match current {
                None => Lease::acquire(store.as_ref(), uri, &doc, now_ms).await,
                Some(c) => {
                    if let Some(d) = &c.doc {
                        if d.holder == holder && d.released {
                            return Ok(Joined::Ended);
                        }
                        if d.holder != holder && d.keeps_out(now_ms) {
                            return Ok(Joined::Busy(d.holder.clone()));
                        }
                    }
                    Lease::take_over(store.as_ref(), uri, &doc, &c.etag).await
                }
            };
            // `None`: it changed since we read it (a sibling renewed it): read again.
            if let Some(lease) = taken.map_err(LockError::of)? {
                let mut lock = Self::held(store, lease, &doc, lease_s);
                lock.shared = true;
                return Ok(Joined::Held(lock));
            }
        }
        Ok(Joined::Busy("(the lock changed too often to join)".into()))
    }

    /// The lock as it is now, when it is held under our holder name and not released (a
    /// sibling's write of a shared lock); otherwise the lock's error naming its holder.
    async fn sibling(&self) -> Result<Current<LockDoc>, LockError> {
        let current = lease::read::<LockDoc>(self.store.as_ref(), self.lease.uri())
            .await
            .map_err(LockError::of)?;
        match current {
            Some(c)
                if c.doc
                    .as_ref()
                    .is_some_and(|d| d.holder == self.holder && !d.released) =>
            {
                Ok(c)
            }
            c => Err(LockError::Lost {
                uri: self.lease.uri().clone(),
                holder: c.and_then(|c| c.doc).map(|d| d.holder),
            }),
        }
    }

    /// The lock object.
    pub fn uri(&self) -> &S3Uri {
        self.lease.uri()
    }

    /// Epoch milliseconds until which the lease holds.
    pub fn lease_until_ms(&self) -> i64 {
        self.lease_until_ms
    }

    /// The lease length, seconds.
    pub fn lease_s(&self) -> i64 {
        self.lease_s
    }

    /// Changes the lease length the next renewals write.
    pub fn set_lease_s(&mut self, lease_s: i64) {
        self.lease_s = lease_s.max(1);
    }

    /// Lets other invocations join this lock under the same holder name (a fan-out's
    /// pieces): from now on their renewals are not a loss.
    pub fn share(&mut self) {
        self.shared = true;
    }

    /// The holder name.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Extends the lease to `now_ms + lease_s`. [`LockError::Lost`] when another run replaced
    /// it. A renewal of ours whose answer was lost is recognised at the next one; for a shared
    /// lock, so is a sibling's.
    pub async fn renew(&mut self, now_ms: i64) -> Result<(), LockError> {
        let doc = LockDoc::held(&self.holder, now_ms + self.lease_s * 1000);
        match self.lease.renew(self.store.as_ref(), &doc).await {
            Ok(()) => {
                self.lease_until_ms = doc.lease_until_ms;
                Ok(())
            }
            Err(LeaseError::Lost { .. }) if self.shared => self.renew_after_siblings(&doc).await,
            Err(e) => Err(LockError::of(e)),
        }
    }

    /// A shared lock whose ETag moved: carries on from a sibling's write while the holder is
    /// still ours and not released.
    async fn renew_after_siblings(&mut self, doc: &LockDoc) -> Result<(), LockError> {
        let mut until = self.lease_until_ms;
        for _ in 0..JOIN_ATTEMPTS {
            let current = self.sibling().await?;
            until = current.doc.map_or(until, |d| d.lease_until_ms);
            self.lease.adopt(current.etag);
            match self.lease.renew(self.store.as_ref(), doc).await {
                Ok(()) => {
                    self.lease_until_ms = doc.lease_until_ms;
                    return Ok(());
                }
                // A sibling renewed again meanwhile.
                Err(LeaseError::Lost { .. }) => continue,
                Err(e) => return Err(LockError::of(e)),
            }
        }
        // The siblings keep renewing it: the lease is alive under our name either way.
        self.lease_until_ms = until;
        Ok(())
    }

    /// Lets the lock go (only if our lease is still the current one; for a joined lock, if
    /// the holder is still ours, whichever sibling wrote last). A store error is retried
    /// [`RELEASE_ATTEMPTS`] times in all before the lease is left to expire; a write whose
    /// answer was lost is recognised by reading the lock back (released under our name).
    pub async fn release(mut self) -> Result<(), LockError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.release_once().await {
                Ok(()) => return Ok(()),
                Err(e @ LockError::Lost { .. }) => return Err(e),
                Err(e) if attempt >= RELEASE_ATTEMPTS => return Err(e),
                Err(e) => {
                    warn!(lock = %self.uri(), error = %e, attempt, "Could not release the route lock; trying again.");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
    }

    async fn release_once(&mut self) -> Result<(), LockError> {
        if self.shared {
            match self.sibling().await {
                Ok(current) => self.lease.adopt(current.etag),
                // Released by a sibling under our name (or by us, the answer lost): done.
                Err(LockError::Lost {
                    holder: Some(h), ..
                }) if h == self.holder => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        let doc = LockDoc::released(&self.holder);
        self.lease
            .release(self.store.as_ref(), &doc)
            .await
            .map_err(LockError::of)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bridge_shared::lossy_store::LossyStore;
    use bridge_shared::object_store::MemoryStore;

    fn setup() -> (Arc<dyn ObjectStore>, S3Uri) {
        (
            Arc::new(MemoryStore::new()),
            lock_uri("state", "bridge/state/", "people"),
        )
    }

    #[tokio::test]
    async fn one_holder_at_a_time_and_release_frees_it() {
        let (store, uri) = setup();
        assert_eq!(uri.key, "bridge/state/people/route-lock.json");
        let a = RouteLock::acquire(store.clone(), uri.clone(), "a", 100_000, 60)
            .await
            .unwrap()
            .unwrap();
        assert!(
            RouteLock::acquire(store.clone(), uri.clone(), "b", 110_000, 60)
                .await
                .unwrap()
                .is_none()
        );
        a.release().await.unwrap();
        assert!(
            RouteLock::acquire(store.clone(), uri.clone(), "b", 111_000, 60)
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn renewal_keeps_it_and_an_expired_lease_is_lost() {
        let (store, uri) = setup();
        let mut a = RouteLock::acquire(store.clone(), uri.clone(), "a", 100_000, 60)
            .await
            .unwrap()
            .unwrap();
        a.renew(150_000).await.unwrap();
        assert_eq!(a.lease_until_ms(), 210_000);
        // Past the old expiry but within the renewed one: still held.
        assert!(
            RouteLock::acquire(store.clone(), uri.clone(), "b", 200_000, 60)
                .await
                .unwrap()
                .is_none()
        );
        // Past the renewed expiry: b takes over, and a's next renewal says so.
        let b = RouteLock::acquire(store.clone(), uri.clone(), "b", 210_001, 60)
            .await
            .unwrap();
        assert!(b.is_some());
        let err = a.renew(212_000).await.unwrap_err();
        assert!(
            matches!(&err, LockError::Lost { holder: Some(h), .. } if h == "b"),
            "{err}"
        );
        assert!(a.release().await.is_err(), "a lost lease is not released");
    }

    #[tokio::test]
    async fn pieces_join_their_runs_lock_and_sibling_renewals_are_no_loss() {
        let (store, uri) = setup();
        let mut run = RouteLock::acquire(store.clone(), uri.clone(), "run1", 100_000, 60)
            .await
            .unwrap()
            .unwrap();
        let Joined::Held(mut p1) = RouteLock::join(store.clone(), uri.clone(), "run1", 101_000, 60)
            .await
            .unwrap()
        else {
            panic!("a piece joins its run's lock")
        };
        let Joined::Held(mut p2) = RouteLock::join(store.clone(), uri.clone(), "run1", 102_000, 60)
            .await
            .unwrap()
        else {
            panic!("a second piece joins too")
        };
        // Siblings renew in turn: each finds the other's write, neither has lost the lock.
        p1.renew(103_000).await.unwrap();
        p2.renew(104_000).await.unwrap();
        p1.renew(105_000).await.unwrap();
        // An unshared holder of another run cannot take it, nor join it.
        assert!(
            RouteLock::acquire(store.clone(), uri.clone(), "other", 106_000, 60)
                .await
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            RouteLock::join(store.clone(), uri.clone(), "other", 106_000, 60)
                .await
                .unwrap(),
            Joined::Busy(h) if h == "run1"
        ));
        // The coordinator's own (unshared) renewal does see the pieces' writes as a loss.
        assert!(run.renew(106_000).await.is_err());
        p2.release().await.unwrap();
        assert!(matches!(
            RouteLock::join(store.clone(), uri.clone(), "run1", 107_000, 60)
                .await
                .unwrap(),
            Joined::Ended
        ));
        assert!(
            RouteLock::acquire(store.clone(), uri.clone(), "other", 107_000, 60)
                .await
                .unwrap()
                .is_some()
        );
    }

    fn lossy() -> Arc<LossyStore> {
        Arc::new(LossyStore::new())
    }

    #[tokio::test]
    async fn a_lock_write_whose_answer_was_lost_is_recognised_as_ours() {
        let store = lossy();
        let uri = lock_uri("state", "bridge/state/", "people");
        // The create lands and its answer is lost: read back, the lock is ours.
        store.lose_puts(1);
        let mut a = RouteLock::acquire(store.clone(), uri.clone(), "a", 100_000, 60)
            .await
            .unwrap()
            .expect("the lock names us: it is ours");
        // A renewal lands with its answer lost: an error, not a loss; the next one carries on.
        store.lose_puts(1);
        assert!(matches!(
            a.renew(110_000).await,
            Err(LockError::Store { .. })
        ));
        a.renew(120_000).await.unwrap();
        assert_eq!(a.lease_until_ms(), 180_000);
        assert!(
            RouteLock::acquire(store.clone(), uri.clone(), "b", 170_000, 60)
                .await
                .unwrap()
                .is_none(),
            "our renewed lease keeps others out"
        );
        a.release().await.unwrap();
    }

    #[tokio::test]
    async fn an_acquire_that_meets_a_transient_failure_tries_again() {
        let store = lossy();
        let uri = lock_uri("state", "bridge/state/", "people");
        store.fail_puts(ACQUIRE_ATTEMPTS - 1);
        let a = RouteLock::acquire(store.clone(), uri.clone(), "a", 100_000, 60)
            .await
            .unwrap()
            .expect("taken on the last attempt");
        a.release().await.unwrap();
        store.fail_puts(ACQUIRE_ATTEMPTS);
        assert!(matches!(
            RouteLock::acquire(store.clone(), uri.clone(), "b", 110_000, 60).await,
            Err(LockError::Store { .. })
        ));
    }

    #[tokio::test]
    async fn a_join_that_meets_a_transient_failure_tries_again() {
        let store = lossy();
        let uri = lock_uri("state", "bridge/state/", "people");
        store.fail_puts(ACQUIRE_ATTEMPTS - 1);
        let joined = RouteLock::join(store.clone(), uri.clone(), "run", 100_000, 60)
            .await
            .unwrap();
        let Joined::Held(a) = joined else {
            panic!("joined on the last attempt");
        };
        // A sibling's take whose answer was lost is found under our name and taken over.
        store.lose_puts(1);
        assert!(matches!(
            RouteLock::join(store.clone(), uri.clone(), "run", 105_000, 60).await,
            Ok(Joined::Held(_))
        ));
        a.release().await.unwrap();
        store.fail_puts(ACQUIRE_ATTEMPTS);
        assert!(matches!(
            RouteLock::join(store.clone(), uri.clone(), "other", 110_000, 60).await,
            Err(LockError::Store { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_release_that_meets_an_unavailable_store_is_tried_again() {
        let store = lossy();
        let uri = lock_uri("state", "bridge/state/", "people");
        let a = RouteLock::acquire(store.clone(), uri.clone(), "a", 100_000, 60)
            .await
            .unwrap()
            .unwrap();
        store.fail_puts(RELEASE_ATTEMPTS - 1);
        a.release().await.unwrap();
        let doc = read_lock(store.as_ref(), &uri).await.unwrap().unwrap();
        assert!(doc.released, "released on the last attempt");
    }

    #[tokio::test(start_paused = true)]
    async fn a_release_whose_answer_was_lost_is_recognised() {
        let store = lossy();
        let uri = lock_uri("state", "bridge/state/", "people");
        let mut a = RouteLock::acquire(store.clone(), uri.clone(), "a", 100_000, 60)
            .await
            .unwrap()
            .unwrap();
        // A renewal lands with its answer lost: the lock's ETag is no longer the one we know.
        store.lose_puts(1);
        assert!(a.renew(110_000).await.is_err());
        // The release meets 412, reads the lock back, finds our own lease and releases it;
        // its own answer is lost too, and the retry finds it released under our name.
        store.lose_puts(1);
        a.release().await.unwrap();
        let doc = read_lock(store.as_ref(), &uri).await.unwrap().unwrap();
        assert!(doc.released && doc.holder == "a");
        // Another holder's lock is never released by us.
        let b = RouteLock::acquire(store.clone(), uri.clone(), "b", 120_000, 60)
            .await
            .unwrap()
            .unwrap();
        let stale = RouteLock::held(
            store.clone(),
            Lease::held(uri.clone(), "old".into()),
            &LockDoc::held("a", 0),
            60,
        );
        assert!(matches!(stale.release().await, Err(LockError::Lost { .. })));
        b.release().await.unwrap();
    }
}
