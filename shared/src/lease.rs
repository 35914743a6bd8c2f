//! A lease kept in one small object through conditional writes: taken with a create-only write
//! (`If-None-Match: *`), or, once the object says it is released or expired (or cannot be
//! read), with a write conditional on the ETag that was read; renewed and released with
//! `If-Match` on the ETag of the holder's own last write. Whoever loses a conditional write
//! has lost the lease and must stop; nothing here ever deletes the object, so a holder that
//! lost can never remove the lease of the one that took over.
//!
//! A write whose answer was lost (a timeout, a 5xx after the object changed) may have landed.
//! It is never answered by undoing anything; the object as it is now decides:
//! - [`Lease::acquire`] reads the object back at once and holds the lease when it is the body
//!   it wrote; an acquire that meets a live lease under its own holder name (an earlier
//!   attempt of the same holder whose answer was lost) takes it as its own.
//! - A held [`Lease`] remembers the body of its last unanswered write; its next write that
//!   meets a changed ETag reads the object back and carries on from it when it is that body,
//!   or when it is the very body it is writing, instead of reporting the lease lost.
//!   [`Lease::settle`] does the same without writing (before handing the ETag to a caller
//!   that writes on its own).
//!
//! Our writes are recognised by their bytes, and S3's ETag is a digest of the bytes: two
//! holders writing the same body could not be told apart by any conditional write. A
//! [`LeaseDoc`] therefore names its holder ([`LeaseDoc::holder`]); a doc without one (the
//! export ledger's entries) is recognised only by its exact bytes, and only for writes over
//! an entry the caller already holds.
//!
//! What the object says is the caller's type ([`LeaseDoc`]), and so are its decisions: the
//! route lock (its fan-out pieces share one holder name), the compaction lease and the export
//! ledger's claims (complete, fanned out, forced) each keep their own format and rules. The
//! workspace's sender registry is not a lease: each sender writes only its own key with plain
//! puts and nobody is kept out; it counts members by their listing.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::object_store::{ObjectStore, PutCondition, StoreError};
use crate::s3_uri::S3Uri;

/// What a lease object says, in the caller's own format.
pub trait LeaseDoc: Serialize + DeserializeOwned {
    /// Who holds (or last held) the lease; empty when the format names nobody.
    fn holder(&self) -> &str;
    /// Whether the lease keeps everyone else out at `now_ms` (epoch milliseconds): held, not
    /// released, not expired.
    fn keeps_out(&self, now_ms: i64) -> bool;
}

/// Why a lease could not be read, taken, renewed or released.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The store failed; the write may or may not have landed (the lease finds out at its
    /// next write, or [`Lease::settle`]).
    #[error("lease {uri}: {error}")]
    Store {
        /// The lease object.
        uri: S3Uri,
        /// Why.
        error: StoreError,
    },
    /// The object is no longer our last write, and reading it back to tell whose it is
    /// failed: the lease may be lost, or one of our unanswered writes may be in place.
    #[error("lease {uri}: changed under us and could not be read back: {error}")]
    Changed {
        /// The lease object.
        uri: S3Uri,
        /// Why the read failed.
        error: StoreError,
    },
    /// Another writer replaced our lease (it expired before we renewed it), or removed it.
    #[error("lease {uri}: taken over by {holder:?}")]
    Lost {
        /// The lease object.
        uri: S3Uri,
        /// The holder the object names now, when readable.
        holder: Option<String>,
    },
}

/// A lease object as it is now.
#[derive(Debug, Clone)]
pub struct Current<D> {
    /// Its ETag.
    pub etag: String,
    /// What it says (`None`: it does not parse, and so protects nobody).
    pub doc: Option<D>,
    /// Its bytes.
    pub bytes: Bytes,
}

/// The body `doc` is written as.
pub fn body_of<D: Serialize>(doc: &D) -> Bytes {
    Bytes::from(serde_json::to_vec(doc).unwrap_or_default())
}

/// Reads a lease object without taking it: `None` when there is none.
pub async fn read<D: DeserializeOwned>(
    store: &dyn ObjectStore,
    uri: &S3Uri,
) -> Result<Option<Current<D>>, LeaseError> {
    match store.get(uri).await {
        Ok((meta, bytes)) => Ok(Some(Current {
            etag: meta.etag,
            doc: serde_json::from_slice(&bytes).ok(),
            bytes,
        })),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(error) => Err(LeaseError::Store {
            uri: uri.clone(),
            error,
        }),
    }
}

/// A lease this process holds: its object, the ETag of our last write, and the body of a
/// write of ours that went unanswered.
#[derive(Debug, Clone)]
pub struct Lease {
    uri: S3Uri,
    etag: String,
    /// The body of a write of ours that failed without an answer (it may have landed).
    unanswered: Option<Bytes>,
}

/// What one conditional write of a lease not yet held came to.
enum Put {
    Held(Lease),
    /// The condition failed: someone else's object is there.
    Refused,
}

impl Lease {
    /// A lease known to be held under `etag` (written by us, or by a sibling sharing our
    /// holder name).
    pub fn held(uri: S3Uri, etag: String) -> Self {
        Self {
            uri,
            etag,
            unanswered: None,
        }
    }

    /// Takes the lease at `uri` with `doc` at `now_ms`: `None` when another holder's lease
    /// keeps us out (or another writer took it at the same moment). A write that fails
    /// without an answer is followed by a read: when the object is what we wrote, we hold it.
    /// A live lease under our own (non-empty) holder name is ours: an earlier attempt whose
    /// answer was lost; it is taken over with `doc`.
    pub async fn acquire<D: LeaseDoc>(
        store: &dyn ObjectStore,
        uri: &S3Uri,
        doc: &D,
        now_ms: i64,
    ) -> Result<Option<Lease>, LeaseError> {
        let body = body_of(doc);
        if let Put::Held(lease) = Self::put(store, uri, &body, PutCondition::IfAbsent).await? {
            return Ok(Some(lease));
        }
        let current = match read::<D>(store, uri).await? {
            // Removed between the two calls: someone else is playing with it; stand back.
            None => return Ok(None),
            Some(c) => c,
        };
        let ours = |d: &D| !doc.holder().is_empty() && d.holder() == doc.holder();
        if current
            .doc
            .as_ref()
            .is_some_and(|d| d.keeps_out(now_ms) && !ours(d))
        {
            return Ok(None);
        }
        Self::take_over(store, uri, doc, &current.etag).await
    }

    /// Takes over the lease object as it was read at `etag` (released, expired, or under our
    /// own holder name: the caller decided by what it read) with `doc`: `None` when it changed
    /// since. A write that fails without an answer is followed by a read, as in
    /// [`Lease::acquire`].
    pub async fn take_over<D: LeaseDoc>(
        store: &dyn ObjectStore,
        uri: &S3Uri,
        doc: &D,
        etag: &str,
    ) -> Result<Option<Lease>, LeaseError> {
        let condition = PutCondition::IfMatch(etag.to_string());
        match Self::put(store, uri, &body_of(doc), condition).await? {
            Put::Held(lease) => Ok(Some(lease)),
            Put::Refused => Ok(None),
        }
    }

    /// One conditional write of a lease not yet held. A write without an answer reads the
    /// object back: held when it is our body.
    async fn put(
        store: &dyn ObjectStore,
        uri: &S3Uri,
        body: &Bytes,
        condition: PutCondition,
    ) -> Result<Put, LeaseError> {
        match store
            .put(uri, body.clone(), condition, BTreeMap::new())
            .await
        {
            Ok(meta) => Ok(Put::Held(Self::held(uri.clone(), meta.etag))),
            Err(StoreError::PreconditionFailed { .. }) => Ok(Put::Refused),
            Err(error) => match read::<serde_json::Value>(store, uri).await {
                // The write landed and its answer was lost.
                Ok(Some(c)) if c.bytes == *body => Ok(Put::Held(Self::held(uri.clone(), c.etag))),
                _ => Err(LeaseError::Store {
                    uri: uri.clone(),
                    error,
                }),
            },
        }
    }

    /// The lease object.
    pub fn uri(&self) -> &S3Uri {
        &self.uri
    }

    /// The ETag of our last write.
    pub fn etag(&self) -> &str {
        &self.etag
    }

    /// Whether a write of ours went unanswered since our last known one.
    pub fn has_unanswered(&self) -> bool {
        self.unanswered.is_some()
    }

    /// Carries on from a write of our holder name that is now the object (a sibling's).
    pub fn adopt(&mut self, etag: String) {
        self.etag = etag;
        self.unanswered = None;
    }

    /// Renews the lease with `doc` (the holder's, with its new expiry).
    pub async fn renew<D: LeaseDoc>(
        &mut self,
        store: &dyn ObjectStore,
        doc: &D,
    ) -> Result<(), LeaseError> {
        self.write(store, doc).await
    }

    /// Writes `doc` (released) over the lease, only while it is still ours. On an error the
    /// lease is kept, so the release can be tried again; a retry that finds this very body
    /// in place (the first answer was lost) has released it.
    pub async fn release<D: LeaseDoc>(
        &mut self,
        store: &dyn ObjectStore,
        doc: &D,
    ) -> Result<(), LeaseError> {
        self.write(store, doc).await
    }

    /// Finds out whether our unanswered write landed, without writing: when the object is
    /// that write, its ETag becomes ours. [`LeaseError::Lost`] when the object is neither
    /// our last known write nor the unanswered one.
    pub async fn settle<D: LeaseDoc>(&mut self, store: &dyn ObjectStore) -> Result<(), LeaseError> {
        let Some(unanswered) = self.unanswered.clone() else {
            return Ok(());
        };
        match read::<D>(store, &self.uri).await? {
            Some(c) if c.bytes == unanswered => {
                self.adopt(c.etag);
                Ok(())
            }
            // It never landed: our last known write is still in place.
            Some(c) if c.etag == self.etag => {
                self.unanswered = None;
                Ok(())
            }
            c => {
                let holder = c.and_then(|c| c.doc).map(|d| d.holder().to_string());
                Err(self.lost(holder))
            }
        }
    }

    fn lost(&self, holder: Option<String>) -> LeaseError {
        LeaseError::Lost {
            uri: self.uri.clone(),
            holder,
        }
    }

    /// Writes `doc` over our last write. [`LeaseError::Lost`] when the object is neither our
    /// last write nor one whose answer was lost; [`LeaseError::Changed`] when it is not our
    /// last write and cannot be read back; [`LeaseError::Store`] (remembering the body, which
    /// may have landed) when the write failed.
    pub async fn write<D: LeaseDoc>(
        &mut self,
        store: &dyn ObjectStore,
        doc: &D,
    ) -> Result<(), LeaseError> {
        let body = body_of(doc);
        // Twice at most: once more after finding our own unanswered write in place.
        for _ in 0..2 {
            match store
                .put(
                    &self.uri,
                    body.clone(),
                    PutCondition::IfMatch(self.etag.clone()),
                    BTreeMap::new(),
                )
                .await
            {
                Ok(meta) => {
                    self.adopt(meta.etag);
                    return Ok(());
                }
                Err(StoreError::PreconditionFailed { .. }) | Err(StoreError::NotFound { .. }) => {
                    let current = match read::<D>(store, &self.uri).await {
                        Ok(c) => c,
                        Err(LeaseError::Store { error, .. }) => {
                            return Err(LeaseError::Changed {
                                uri: self.uri.clone(),
                                error,
                            });
                        }
                        Err(e) => return Err(e),
                    };
                    match current {
                        // This very write landed before (its answer lost): done.
                        Some(c) if c.bytes == body => {
                            self.adopt(c.etag);
                            return Ok(());
                        }
                        // An earlier write of ours landed with its answer lost: go on from it.
                        Some(c) if self.unanswered.as_ref() == Some(&c.bytes) => {
                            self.adopt(c.etag);
                        }
                        c => {
                            let holder = c.and_then(|c| c.doc).map(|d| d.holder().to_string());
                            return Err(self.lost(holder));
                        }
                    }
                }
                Err(error) => {
                    self.unanswered = Some(body);
                    return Err(LeaseError::Store {
                        uri: self.uri.clone(),
                        error,
                    });
                }
            }
        }
        Err(self.lost(None))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde::Deserialize;

    use super::*;
    use crate::lossy_store::LossyStore;
    use crate::object_store::MemoryStore;

    #[derive(Debug, Serialize, Deserialize)]
    struct Doc {
        holder: String,
        until_ms: i64,
        released: bool,
    }

    impl LeaseDoc for Doc {
        fn holder(&self) -> &str {
            &self.holder
        }
        fn keeps_out(&self, now_ms: i64) -> bool {
            !self.released && self.until_ms > now_ms
        }
    }

    fn doc(holder: &str, until_ms: i64) -> Doc {
        Doc {
            holder: holder.into(),
            until_ms,
            released: false,
        }
    }

    fn released(holder: &str) -> Doc {
        Doc {
            holder: holder.into(),
            until_ms: 0,
            released: true,
        }
    }

    fn uri() -> S3Uri {
        S3Uri::new("b", "leases/one.json")
    }

    async fn holder_now(store: &dyn ObjectStore) -> Doc {
        read::<Doc>(store, &uri())
            .await
            .unwrap()
            .unwrap()
            .doc
            .unwrap()
    }

    #[tokio::test]
    async fn one_holder_at_a_time_and_a_released_lease_is_free() {
        let store = MemoryStore::new();
        let mut a = Lease::acquire(&store, &uri(), &doc("a", 60_000), 0)
            .await
            .unwrap()
            .unwrap();
        assert!(
            Lease::acquire(&store, &uri(), &doc("b", 70_000), 10_000)
                .await
                .unwrap()
                .is_none()
        );
        a.release(&store, &released("a")).await.unwrap();
        assert!(
            Lease::acquire(&store, &uri(), &doc("b", 71_000), 11_000)
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_and_its_old_holder_has_lost_it() {
        let store = MemoryStore::new();
        let mut a = Lease::acquire(&store, &uri(), &doc("a", 60_000), 0)
            .await
            .unwrap()
            .unwrap();
        let mut b = Lease::acquire(&store, &uri(), &doc("b", 120_000), 60_001)
            .await
            .unwrap()
            .unwrap();
        let err = a.renew(&store, &doc("a", 130_000)).await.unwrap_err();
        assert!(
            matches!(&err, LeaseError::Lost { holder: Some(h), .. } if h == "b"),
            "{err}"
        );
        // Nor does the old holder release b's lease.
        assert!(matches!(
            a.release(&store, &released("a")).await,
            Err(LeaseError::Lost { .. })
        ));
        assert_eq!(holder_now(&store).await.holder, "b");
        b.renew(&store, &doc("b", 180_000)).await.unwrap();
    }

    #[tokio::test]
    async fn an_unreadable_lease_object_protects_nobody() {
        let store = MemoryStore::new();
        store
            .put(
                &uri(),
                Bytes::from_static(b"not json"),
                PutCondition::None,
                BTreeMap::new(),
            )
            .await
            .unwrap();
        assert!(
            Lease::acquire(&store, &uri(), &doc("a", 60_000), 0)
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn an_acquire_whose_answer_was_lost_reads_back_and_holds() {
        let store = LossyStore::new();
        store.lose_puts(1);
        let mut a = Lease::acquire(&store, &uri(), &doc("a", 60_000), 0)
            .await
            .unwrap()
            .expect("the create landed: the lease is ours");
        a.renew(&store, &doc("a", 90_000)).await.unwrap();
        assert_eq!(holder_now(&store).await.until_ms, 90_000);
    }

    #[tokio::test]
    async fn an_acquire_that_cannot_read_back_is_an_error_and_takes_nothing_from_others() {
        let store = LossyStore::new();
        Lease::acquire(&store, &uri(), &doc("b", 60_000), 0)
            .await
            .unwrap()
            .unwrap();
        // b's lease expired; a's takeover lands, its answer is lost and the read back fails.
        store.lose_puts(1);
        store.fail_reads_after(1, 1);
        assert!(matches!(
            Lease::acquire(&store, &uri(), &doc("a", 200_000), 100_000).await,
            Err(LeaseError::Store { .. })
        ));
        // The lease a wrote now keeps everyone else out until it expires; nothing was deleted.
        assert_eq!(holder_now(&store).await.holder, "a");
        assert!(
            Lease::acquire(&store, &uri(), &doc("c", 210_000), 150_000)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_renew_after_a_renewal_whose_answer_was_lost_carries_on() {
        let store = LossyStore::new();
        let mut a = Lease::acquire(&store, &uri(), &doc("a", 60_000), 0)
            .await
            .unwrap()
            .unwrap();
        store.lose_puts(1);
        assert!(matches!(
            a.renew(&store, &doc("a", 80_000)).await,
            Err(LeaseError::Store { .. })
        ));
        // The next renewal meets an ETag it does not know, reads our own write back, goes on.
        a.renew(&store, &doc("a", 100_000)).await.unwrap();
        assert_eq!(holder_now(&store).await.until_ms, 100_000);
        // A release whose answer is lost, tried again, finds itself in place.
        store.lose_puts(1);
        assert!(a.release(&store, &released("a")).await.is_err());
        a.release(&store, &released("a")).await.unwrap();
        assert!(holder_now(&store).await.released);
    }

    #[tokio::test]
    async fn a_renew_after_a_failed_write_and_a_takeover_is_lost() {
        let store = LossyStore::new();
        let mut a = Lease::acquire(&store, &uri(), &doc("a", 60_000), 0)
            .await
            .unwrap()
            .unwrap();
        // The renewal never landed; the lease expired and b took it.
        store.fail_puts(1);
        assert!(a.renew(&store, &doc("a", 80_000)).await.is_err());
        Lease::acquire(&store, &uri(), &doc("b", 200_000), 100_000)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(
            a.renew(&store, &doc("a", 160_000)).await,
            Err(LeaseError::Lost { holder: Some(h), .. }) if h == "b"
        ));
        assert_eq!(holder_now(&store).await.holder, "b");
    }

    // Bad days, one by one: each is a write whose answer never came back, or a holder that
    // comes back after its lease ended.

    #[tokio::test]
    async fn bad_day_an_acquire_retried_after_a_lost_answer_meets_412_and_recognises_itself() {
        let store = LossyStore::new();
        // The create lands, its answer is lost, and the read back fails too: the caller sees
        // an error and tries again.
        store.lose_puts(1);
        store.fail_reads(1);
        assert!(matches!(
            Lease::acquire(&store, &uri(), &doc("a", 60_000), 0).await,
            Err(LeaseError::Store { .. })
        ));
        // The retry's create meets 412; it reads the lease back, finds its own holder name
        // alive and takes it with its new expiry.
        let mut a = Lease::acquire(&store, &uri(), &doc("a", 61_000), 1_000)
            .await
            .unwrap()
            .expect("our own lease is no one else's");
        assert_eq!(holder_now(&store).await.until_ms, 61_000);
        a.renew(&store, &doc("a", 90_000)).await.unwrap();
        // Another holder is still kept out.
        assert!(
            Lease::acquire(&store, &uri(), &doc("b", 100_000), 2_000)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_take_over_writes_over_what_was_read_and_nothing_newer() {
        let store = LossyStore::new();
        let mut a = Lease::acquire(&store, &uri(), &doc("a", 60_000), 0)
            .await
            .unwrap()
            .unwrap();
        a.release(&store, &released("a")).await.unwrap();
        let seen = read::<Doc>(&store, &uri()).await.unwrap().unwrap();
        // Its answer lost, the take-over reads back and holds.
        store.lose_puts(1);
        let mut b = Lease::take_over(&store, &uri(), &doc("b", 70_000), &seen.etag)
            .await
            .unwrap()
            .expect("the object was what we read: ours now");
        b.renew(&store, &doc("b", 80_000)).await.unwrap();
        // A take-over of what was read before b wrote is refused.
        assert!(
            Lease::take_over(&store, &uri(), &doc("c", 90_000), &seen.etag)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(holder_now(&store).await.holder, "b");
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct Anonymous {
        until_ms: i64,
    }

    impl LeaseDoc for Anonymous {
        fn holder(&self) -> &str {
            ""
        }
        fn keeps_out(&self, now_ms: i64) -> bool {
            self.until_ms > now_ms
        }
    }

    #[tokio::test]
    async fn bad_day_a_doc_without_a_holder_name_never_takes_a_live_lease_for_its_own() {
        let store = MemoryStore::new();
        let first = Anonymous { until_ms: 60_000 };
        Lease::acquire(&store, &uri(), &first, 0)
            .await
            .unwrap()
            .unwrap();
        let other = Anonymous { until_ms: 70_000 };
        assert!(
            Lease::acquire(&store, &uri(), &other, 10_000)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn bad_day_a_renewal_whose_answer_was_lost_is_not_a_loss() {
        let store = LossyStore::new();
        let mut a = Lease::acquire(&store, &uri(), &doc("a", 60_000), 0)
            .await
            .unwrap()
            .unwrap();
        store.lose_puts(1);
        assert!(matches!(
            a.renew(&store, &doc("a", 80_000)).await,
            Err(LeaseError::Store { .. })
        ));
        assert!(a.has_unanswered());
        // Its own retry (same body) meets 412 and finds itself in place.
        a.renew(&store, &doc("a", 80_000)).await.unwrap();
        assert!(!a.has_unanswered());
        // A lost answer again, then the next renewal (a new body) carries on from it.
        store.lose_puts(1);
        assert!(a.renew(&store, &doc("a", 90_000)).await.is_err());
        a.renew(&store, &doc("a", 100_000)).await.unwrap();
        assert_eq!(holder_now(&store).await.until_ms, 100_000);
        // Settling without a write: a lost renewal is adopted, one that never landed leaves
        // our last known write in place.
        store.lose_puts(1);
        assert!(a.renew(&store, &doc("a", 110_000)).await.is_err());
        a.settle::<Doc>(&store).await.unwrap();
        let after_lost = a.etag().to_string();
        store.fail_puts(1);
        assert!(a.renew(&store, &doc("a", 120_000)).await.is_err());
        a.settle::<Doc>(&store).await.unwrap();
        assert_eq!(a.etag(), after_lost);
        assert!(!a.has_unanswered());
        a.renew(&store, &doc("a", 130_000)).await.unwrap();
        assert_eq!(holder_now(&store).await.until_ms, 130_000);
    }

    #[tokio::test]
    async fn bad_day_a_release_whose_answer_was_lost_is_recognised_by_its_retry() {
        let store = LossyStore::new();
        let mut a = Lease::acquire(&store, &uri(), &doc("a", 60_000), 0)
            .await
            .unwrap()
            .unwrap();
        store.lose_puts(1);
        assert!(matches!(
            a.release(&store, &released("a")).await,
            Err(LeaseError::Store { .. })
        ));
        a.release(&store, &released("a")).await.unwrap();
        assert!(holder_now(&store).await.released);
        assert!(
            Lease::acquire(&store, &uri(), &doc("b", 70_000), 10_000)
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn bad_day_a_holder_back_after_its_lease_ended_neither_renews_nor_releases_the_new_one() {
        let store = LossyStore::new();
        let mut a = Lease::acquire(&store, &uri(), &doc("a", 60_000), 0)
            .await
            .unwrap()
            .unwrap();
        // a's last renewal landed with its answer lost, then a stalled past its expiry.
        store.lose_puts(1);
        assert!(a.renew(&store, &doc("a", 80_000)).await.is_err());
        let mut b = Lease::acquire(&store, &uri(), &doc("b", 200_000), 80_001)
            .await
            .unwrap()
            .expect("an expired lease is taken over");
        // a's remembered write is no longer the object: every write of a is refused.
        assert!(matches!(
            a.renew(&store, &doc("a", 140_000)).await,
            Err(LeaseError::Lost { holder: Some(h), .. }) if h == "b"
        ));
        assert!(matches!(
            a.release(&store, &released("a")).await,
            Err(LeaseError::Lost { .. })
        ));
        assert!(matches!(
            a.settle::<Doc>(&store).await,
            Err(LeaseError::Lost { holder: Some(h), .. }) if h == "b"
        ));
        let now = holder_now(&store).await;
        assert!(now.holder == "b" && !now.released && now.until_ms == 200_000);
        b.release(&store, &released("b")).await.unwrap();
    }
}
