//! One run per route at a time: a small lease object, `<state prefix><route>/route-lock.json`,
//! taken with a create-only write (or, once expired or released, a write conditional on the
//! ETag that was read), renewed with `If-Match` on the holder's own ETag, and released by
//! writing it back as free. A holder that dies leaves the lease to expire by itself; a
//! holder whose renewal finds another writer's ETag has lost the lock and must stop.
//!
//! This is not the export ledger ([`crate::state::ledger`]): the ledger says what happened to each
//! export; the lock says who may move a route's state right now.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::warn;

/// The lock object's name inside a route's state folder.
pub const LOCK_OBJECT: &str = "route-lock.json";

/// Attempts at releasing a lock (a store error is retried) before its lease is left to expire.
pub const RELEASE_ATTEMPTS: u32 = 4;

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
}

/// A held route lock. Dropping it without [`RouteLock::release`] leaves the lease to expire.
pub struct RouteLock {
    store: Arc<dyn ObjectStore>,
    uri: S3Uri,
    holder: String,
    lease_s: i64,
    etag: String,
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

fn body(doc: &LockDoc) -> Bytes {
    Bytes::from(serde_json::to_vec(doc).unwrap_or_default())
}

/// Reads the lock object without taking it (for `status`): `None` when the route never ran.
pub async fn read_lock(store: &dyn ObjectStore, uri: &S3Uri) -> Result<Option<LockDoc>, LockError> {
    match store.get(uri).await {
        // An unreadable lock object protects nobody (see `acquire`): shown as free.
        Ok((_, bytes)) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(error) => Err(LockError::Store {
            uri: uri.clone(),
            error,
        }),
    }
}

impl RouteLock {
    /// Takes the lock for `lease_s` seconds from `now_ms` (epoch milliseconds), or returns
    /// `None` when another holder's lease is alive (or another run took it at the same moment).
    pub async fn acquire(
        store: Arc<dyn ObjectStore>,
        uri: S3Uri,
        holder: &str,
        now_ms: i64,
        lease_s: i64,
    ) -> Result<Option<RouteLock>, LockError> {
        let doc = LockDoc {
            holder: holder.to_string(),
            lease_until_ms: now_ms + lease_s * 1000,
            released: false,
        };
        let err = |error| LockError::Store {
            uri: uri.clone(),
            error,
        };
        let condition = match store
            .put(&uri, body(&doc), PutCondition::IfAbsent, BTreeMap::new())
            .await
        {
            Ok(meta) => return Ok(Some(Self::held(store, uri, doc, lease_s, meta.etag))),
            Err(StoreError::PreconditionFailed { .. }) => {
                let (meta, bytes) = match store.get(&uri).await {
                    Ok(x) => x,
                    // Deleted between the two calls: someone else is playing with it; stand back.
                    Err(StoreError::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(err(e)),
                };
                // An unreadable lock object protects nobody: it is taken over like an expired one.
                let current: Option<LockDoc> = serde_json::from_slice(&bytes).ok();
                if current.is_some_and(|c| !c.released && c.lease_until_ms > now_ms) {
                    return Ok(None);
                }
                PutCondition::IfMatch(meta.etag)
            }
            Err(e) => return Err(err(e)),
        };
        match store
            .put(&uri, body(&doc), condition, BTreeMap::new())
            .await
        {
            Ok(meta) => Ok(Some(Self::held(store, uri, doc, lease_s, meta.etag))),
            Err(StoreError::PreconditionFailed { .. }) => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    fn held(
        store: Arc<dyn ObjectStore>,
        uri: S3Uri,
        doc: LockDoc,
        lease_s: i64,
        etag: String,
    ) -> Self {
        Self {
            store,
            uri,
            holder: doc.holder,
            lease_s,
            etag,
            lease_until_ms: doc.lease_until_ms,
            shared: false,
        }
    }

    /// Joins the lock held under `holder` by other invocations of the same work (the pieces
    /// of a fan-out share their run's lock): renews it for `lease_s` from `now_ms` when it is
    /// held under `holder`, or takes it under `holder` when it is free or expired. Renewals of
    /// a joined lock tolerate the siblings' renewals.
    pub async fn join(
        store: Arc<dyn ObjectStore>,
        uri: S3Uri,
        holder: &str,
        now_ms: i64,
        lease_s: i64,
    ) -> Result<Joined, LockError> {
        let err = |error| LockError::Store {
            uri: uri.clone(),
            error,
        };
        for _ in 0..5 {
            let (meta, bytes) = match store.get(&uri).await {
                Ok(x) => x,
                Err(StoreError::NotFound { .. }) => {
                    return match Self::acquire(store, uri.clone(), holder, now_ms, lease_s).await? {
                        Some(mut l) => {
                            l.shared = true;
                            Ok(Joined::Held(l))
                        }
                        None => Ok(Joined::Busy("another run".into())),
                    };
                }
                Err(e) => return Err(err(e)),
            };
            let current: Option<LockDoc> = serde_json::from_slice(&bytes).ok();
            if let Some(c) = &current {
                if c.holder == holder && c.released {
                    return Ok(Joined::Ended);
                }
                if c.holder != holder && !c.released && c.lease_until_ms > now_ms {
                    return Ok(Joined::Busy(c.holder.clone()));
                }
            }
            let doc = LockDoc {
                holder: holder.to_string(),
                lease_until_ms: now_ms + lease_s * 1000,
                released: false,
            };
            match store
                .put(
                    &uri,
                    body(&doc),
                    PutCondition::IfMatch(meta.etag),
                    BTreeMap::new(),
                )
                .await
            {
                Ok(meta) => {
                    let mut l = Self::held(store, uri, doc, lease_s, meta.etag);
                    l.shared = true;
                    return Ok(Joined::Held(l));
                }
                // A sibling renewed at the same moment: read again.
                Err(StoreError::PreconditionFailed { .. }) => continue,
                Err(e) => return Err(err(e)),
            }
        }
        Ok(Joined::Busy("(the lock changed too often to join)".into()))
    }

    /// A shared lock whose ETag moved: adopt a sibling's write when the holder is still ours.
    async fn sibling_etag(&self) -> Result<Option<(String, LockDoc)>, LockError> {
        match self.store.get(&self.uri).await {
            Ok((meta, b)) => Ok(serde_json::from_slice::<LockDoc>(&b)
                .ok()
                .filter(|d| d.holder == self.holder && !d.released)
                .map(|d| (meta.etag, d))),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(error) => Err(LockError::Store {
                uri: self.uri.clone(),
                error,
            }),
        }
    }

    /// The lock object.
    pub fn uri(&self) -> &S3Uri {
        &self.uri
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
    /// it.
    pub async fn renew(&mut self, now_ms: i64) -> Result<(), LockError> {
        match self.renew_once(now_ms).await {
            Err(LockError::Lost { .. }) if self.shared => match self.sibling_etag().await? {
                Some((etag, _)) => {
                    self.etag = etag;
                    match self.renew_once(now_ms).await {
                        // A sibling renewed again meanwhile: the lease is alive either way.
                        Err(LockError::Lost {
                            holder: Some(h), ..
                        }) if h == self.holder => Ok(()),
                        r => r,
                    }
                }
                None => self.renew_once(now_ms).await,
            },
            r => r,
        }
    }

    async fn renew_once(&mut self, now_ms: i64) -> Result<(), LockError> {
        let doc = LockDoc {
            holder: self.holder.clone(),
            lease_until_ms: now_ms + self.lease_s * 1000,
            released: false,
        };
        match self
            .store
            .put(
                &self.uri,
                body(&doc),
                PutCondition::IfMatch(self.etag.clone()),
                BTreeMap::new(),
            )
            .await
        {
            Ok(meta) => {
                self.etag = meta.etag;
                self.lease_until_ms = doc.lease_until_ms;
                Ok(())
            }
            Err(StoreError::PreconditionFailed { .. }) | Err(StoreError::NotFound { .. }) => {
                let holder = match self.store.get(&self.uri).await {
                    Ok((_, b)) => serde_json::from_slice::<LockDoc>(&b).ok().map(|d| d.holder),
                    Err(_) => None,
                };
                Err(LockError::Lost {
                    uri: self.uri.clone(),
                    holder,
                })
            }
            Err(error) => Err(LockError::Store {
                uri: self.uri.clone(),
                error,
            }),
        }
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
                    warn!(lock = %self.uri, error = %e, attempt, "Could not release the route lock; trying again.");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
    }

    async fn release_once(&mut self) -> Result<(), LockError> {
        if self.shared
            && let Some((etag, _)) = self.sibling_etag().await?
        {
            self.etag = etag;
        }
        let doc = LockDoc {
            holder: self.holder.clone(),
            lease_until_ms: 0,
            released: true,
        };
        let err = |uri: &S3Uri, error| LockError::Store {
            uri: uri.clone(),
            error,
        };
        match self
            .store
            .put(
                &self.uri,
                body(&doc),
                PutCondition::IfMatch(self.etag.clone()),
                BTreeMap::new(),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::PreconditionFailed { .. }) => {
                // Either another run took the lock over, or one of our own writes landed and
                // its answer was lost (a release, or a renewal): the object as it is decides.
                let (meta, bytes) = self
                    .store
                    .get(&self.uri)
                    .await
                    .map_err(|e| err(&self.uri, e))?;
                match serde_json::from_slice::<LockDoc>(&bytes).ok() {
                    Some(d) if d.holder == self.holder && d.released => Ok(()),
                    Some(d) if d.holder == self.holder => {
                        self.etag = meta.etag;
                        Err(LockError::Store {
                            uri: self.uri.clone(),
                            error: StoreError::PreconditionFailed {
                                uri: self.uri.clone(),
                            },
                        })
                    }
                    d => Err(LockError::Lost {
                        uri: self.uri.clone(),
                        holder: d.map(|d| d.holder),
                    }),
                }
            }
            Err(error) => Err(err(&self.uri, error)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
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

    /// A store whose next PUTs of the lock fail: `fail` of them before applying (503), then
    /// `lose` of them applied with their answer lost.
    struct Flaky {
        inner: MemoryStore,
        fail: std::sync::atomic::AtomicU32,
        lose: std::sync::atomic::AtomicU32,
    }

    fn take(n: &std::sync::atomic::AtomicU32) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        n.fetch_update(SeqCst, SeqCst, |v| v.checked_sub(1)).is_ok()
    }

    #[async_trait::async_trait]
    impl ObjectStore for Flaky {
        async fn get(
            &self,
            uri: &S3Uri,
        ) -> Result<(bridge_shared::object_store::ObjectMeta, Bytes), StoreError> {
            self.inner.get(uri).await
        }
        async fn get_reader(
            &self,
            uri: &S3Uri,
        ) -> Result<
            (
                bridge_shared::object_store::ObjectMeta,
                bridge_shared::object_store::ObjectReader,
            ),
            StoreError,
        > {
            self.inner.get_reader(uri).await
        }
        async fn head(
            &self,
            uri: &S3Uri,
        ) -> Result<Option<bridge_shared::object_store::ObjectMeta>, StoreError> {
            self.inner.head(uri).await
        }
        async fn list(
            &self,
            bucket: &str,
            prefix: &str,
        ) -> Result<Vec<bridge_shared::object_store::ObjectMeta>, StoreError> {
            self.inner.list(bucket, prefix).await
        }
        async fn put(
            &self,
            uri: &S3Uri,
            body: Bytes,
            cond: PutCondition,
            meta: BTreeMap<String, String>,
        ) -> Result<bridge_shared::object_store::ObjectMeta, StoreError> {
            let unavailable = || StoreError::Other {
                op: "PutObject",
                uri: uri.clone(),
                message: "503 SlowDown".into(),
                retryable: true,
            };
            if take(&self.fail) {
                return Err(unavailable());
            }
            let out = self.inner.put(uri, body, cond, meta).await?;
            if take(&self.lose) {
                return Err(unavailable());
            }
            Ok(out)
        }
        async fn copy(&self, from: &S3Uri, to: &S3Uri) -> Result<(), StoreError> {
            self.inner.copy(from, to).await
        }
        async fn delete(&self, uri: &S3Uri) -> Result<(), StoreError> {
            self.inner.delete(uri).await
        }
    }

    fn flaky() -> Arc<Flaky> {
        Arc::new(Flaky {
            inner: MemoryStore::new(),
            fail: 0.into(),
            lose: 0.into(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_release_that_meets_an_unavailable_store_is_tried_again() {
        let store = flaky();
        let uri = lock_uri("state", "bridge/state/", "people");
        let a = RouteLock::acquire(store.clone(), uri.clone(), "a", 100_000, 60)
            .await
            .unwrap()
            .unwrap();
        store
            .fail
            .store(RELEASE_ATTEMPTS - 1, std::sync::atomic::Ordering::SeqCst);
        a.release().await.unwrap();
        let doc = read_lock(store.as_ref(), &uri).await.unwrap().unwrap();
        assert!(doc.released, "released on the last attempt");
    }

    #[tokio::test(start_paused = true)]
    async fn a_release_whose_answer_was_lost_is_recognised() {
        let store = flaky();
        let uri = lock_uri("state", "bridge/state/", "people");
        let mut a = RouteLock::acquire(store.clone(), uri.clone(), "a", 100_000, 60)
            .await
            .unwrap()
            .unwrap();
        // A renewal lands with its answer lost: the lock's ETag is no longer the one we know.
        store.lose.store(1, std::sync::atomic::Ordering::SeqCst);
        assert!(a.renew(110_000).await.is_err());
        // The release meets 412, reads the lock back, finds our own lease and releases it;
        // its own answer is lost too, and the retry finds it released under our name.
        store.lose.store(1, std::sync::atomic::Ordering::SeqCst);
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
            uri.clone(),
            LockDoc {
                holder: "a".into(),
                lease_until_ms: 0,
                released: false,
            },
            60,
            "old".into(),
        );
        assert!(matches!(stale.release().await, Err(LockError::Lost { .. })));
        b.release().await.unwrap();
    }
}
