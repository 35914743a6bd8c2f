//! One attempt at a fan-out piece at a time. The pieces of a fan-out share the route lock
//! (one holder name, [`crate::state::route_lock`]), so the lock cannot tell two deliveries of
//! the same piece apart: SQS delivers at least once, and a piece's message can be received
//! again while an earlier receive still runs. Each delivery therefore claims its piece first:
//! a small lease object, `_fan_out/<run id>/p<k>/attempt.json`, kept through the shared
//! conditional-write lease ([`bridge_shared::lease`]) under a name of its own (the piece and a
//! nonce), renewed with the route lock while the attempt works and released when it stops.
//!
//! - A delivery that finds another attempt's claim alive does nothing with the piece's fork
//!   or `final.json`: it comes back later, or acknowledges when what is left of the piece is
//!   another message's (see `run/runner/fan_out/attempt.rs`).
//! - The holder of a piece's claim may go on with whatever an earlier attempt of the piece
//!   left: resume from its checkpoints, or go on finalizing when `final.json` names the piece
//!   (the earlier attempt is dead, or lost its claim and stops at its next renewal).
//! - A claim whose lease ran out (or was released) tells that nobody works on the piece's fork:
//!   checkpoint segments its head still names are a dead attempt's, and the finalizer takes
//!   them in under the claim instead of waiting for a commit that never comes.
//!
//! The object is never deleted while the fan-out runs; it goes with the fan-out's control
//! objects.

use std::sync::Arc;

use bridge_shared::lease::{self, Lease, LeaseDoc, LeaseError};
use bridge_shared::{ObjectStore, S3Uri};
use serde::{Deserialize, Serialize};

use crate::state::route_lock::retry_lease_write;

/// The claim object's name inside a piece's folder (`_fan_out/<run id>/p<k>/`).
pub const ATTEMPT_OBJECT: &str = "attempt.json";

/// The claim object's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptDoc {
    /// The attempt (`<run id>-p<k>-<nonce>`).
    pub holder: String,
    /// Epoch milliseconds until which the attempt may work without renewing.
    pub lease_until_ms: i64,
    /// Set when the attempt stopped.
    #[serde(default)]
    pub released: bool,
}

impl LeaseDoc for AttemptDoc {
    fn holder(&self) -> &str {
        &self.holder
    }

    fn keeps_out(&self, now_ms: i64) -> bool {
        !self.released && self.lease_until_ms > now_ms
    }
}

/// What [`PieceAttempt::claim`] found.
pub enum Claimed {
    /// The piece is ours until we release it (or our lease runs out).
    Held(PieceAttempt),
    /// Another attempt's claim is alive (its holder, when readable).
    Busy(String),
}

/// A held claim on a piece. Dropping it without [`PieceAttempt::release`] leaves the lease to
/// expire.
pub struct PieceAttempt {
    store: Arc<dyn ObjectStore>,
    lease: Lease,
    holder: String,
    lease_s: i64,
    lease_until_ms: i64,
}

/// Whether claiming failed transiently (trying again at once may succeed): a delivery sent
/// back to the queue waits a whole visibility timeout, which can outlast its fan-out's lease.
fn transient(e: &LeaseError) -> bool {
    matches!(e, LeaseError::Store { error, .. } if error.is_retryable())
}

impl PieceAttempt {
    /// Claims the piece whose claim object is `uri` as `holder` for `lease_s` seconds from
    /// `now_ms`. An earlier write of ours whose answer was lost is recognised by the lease; a
    /// transient store failure is tried again ([`crate::state::route_lock::ACQUIRE_ATTEMPTS`] in all).
    pub async fn claim(
        store: Arc<dyn ObjectStore>,
        uri: S3Uri,
        holder: &str,
        now_ms: i64,
        lease_s: i64,
    ) -> Result<Claimed, LeaseError> {
        retry_lease_write(&uri, "claim a fan-out piece", transient, || {
            Self::claim_once(store.clone(), uri.clone(), holder, now_ms, lease_s)
        })
        .await
    }

    async fn claim_once(
        store: Arc<dyn ObjectStore>,
        uri: S3Uri,
        holder: &str,
        now_ms: i64,
        lease_s: i64,
    ) -> Result<Claimed, LeaseError> {
        let doc = AttemptDoc {
            holder: holder.to_string(),
            lease_until_ms: now_ms + lease_s * 1000,
            released: false,
        };
        match Lease::acquire(store.as_ref(), &uri, &doc, now_ms).await? {
            Some(lease) => Ok(Claimed::Held(Self {
                store,
                lease,
                holder: doc.holder,
                lease_s,
                lease_until_ms: doc.lease_until_ms,
            })),
            None => {
                let holder = lease::read::<AttemptDoc>(store.as_ref(), &uri)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|c| c.doc)
                    .map_or_else(|| "(unreadable)".to_string(), |d| d.holder);
                Ok(Claimed::Busy(holder))
            }
        }
    }

    /// Claims the piece for a delivery that `predecessor` handed it over to: that attempt
    /// queued the delivery's message as its last act, so its claim, alive or not, is taken
    /// over while the object still names it; otherwise as [`PieceAttempt::claim`].
    pub async fn claim_from(
        store: Arc<dyn ObjectStore>,
        uri: S3Uri,
        predecessor: &str,
        holder: &str,
        now_ms: i64,
        lease_s: i64,
    ) -> Result<Claimed, LeaseError> {
        retry_lease_write(&uri, "claim a fan-out piece", transient, || {
            Self::claim_from_once(
                store.clone(),
                uri.clone(),
                predecessor,
                holder,
                now_ms,
                lease_s,
            )
        })
        .await
    }

    async fn claim_from_once(
        store: Arc<dyn ObjectStore>,
        uri: S3Uri,
        predecessor: &str,
        holder: &str,
        now_ms: i64,
        lease_s: i64,
    ) -> Result<Claimed, LeaseError> {
        let current = lease::read::<AttemptDoc>(store.as_ref(), &uri).await?;
        let Some(c) = current.filter(|c| c.doc.as_ref().is_some_and(|d| d.holder == predecessor))
        else {
            return Self::claim_once(store, uri, holder, now_ms, lease_s).await;
        };
        let doc = AttemptDoc {
            holder: holder.to_string(),
            lease_until_ms: now_ms + lease_s * 1000,
            released: false,
        };
        match Lease::take_over(store.as_ref(), &uri, &doc, &c.etag).await? {
            Some(lease) => Ok(Claimed::Held(Self {
                store,
                lease,
                holder: doc.holder,
                lease_s,
                lease_until_ms: doc.lease_until_ms,
            })),
            // It changed since: another delivery claimed it (or the predecessor released it).
            None => Self::claim_once(store, uri, holder, now_ms, lease_s).await,
        }
    }

    /// The claim object.
    pub fn uri(&self) -> &S3Uri {
        self.lease.uri()
    }

    /// The attempt's name.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The lease length, seconds.
    pub fn lease_s(&self) -> i64 {
        self.lease_s
    }

    /// Epoch milliseconds until which the lease holds.
    pub fn lease_until_ms(&self) -> i64 {
        self.lease_until_ms
    }

    /// Extends the lease to `now_ms + lease_s`; [`LeaseError::Lost`] when another attempt took
    /// the piece over (ours had expired).
    pub async fn renew(&mut self, now_ms: i64) -> Result<(), LeaseError> {
        let doc = AttemptDoc {
            holder: self.holder.clone(),
            lease_until_ms: now_ms + self.lease_s * 1000,
            released: false,
        };
        self.lease.renew(self.store.as_ref(), &doc).await?;
        self.lease_until_ms = doc.lease_until_ms;
        Ok(())
    }

    /// Lets the piece go (only while the claim is still ours).
    pub async fn release(mut self) -> Result<(), LeaseError> {
        let doc = AttemptDoc {
            holder: self.holder.clone(),
            lease_until_ms: 0,
            released: true,
        };
        self.lease.release(self.store.as_ref(), &doc).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use bridge_shared::object_store::MemoryStore;

    use super::*;

    fn uri() -> S3Uri {
        S3Uri::new("state", "s/people/_fan_out/run1/p001/attempt.json")
    }

    #[tokio::test]
    async fn a_claim_tries_a_transient_failure_again_and_recognises_its_lost_answer() {
        let lossy = Arc::new(bridge_shared::lossy_store::LossyStore::new());
        let store: Arc<dyn ObjectStore> = lossy.clone();
        lossy.fail_puts(1);
        assert!(matches!(
            PieceAttempt::claim(store.clone(), uri(), "a", 0, 60).await.unwrap(),
            Claimed::Held(a) if a.holder() == "a"
        ));
        // b's take-over lands with its answer lost and its read back fails: its next try
        // meets its own claim and holds it, and nobody else does.
        let other = S3Uri::new("state", "s/people/_fan_out/run1/p002/attempt.json");
        lossy.lose_puts(1);
        lossy.fail_reads(1);
        assert!(matches!(
            PieceAttempt::claim(store.clone(), other.clone(), "b", 0, 60)
                .await
                .unwrap(),
            Claimed::Held(_)
        ));
        assert!(matches!(
            PieceAttempt::claim(store.clone(), other, "c", 1_000, 60).await.unwrap(),
            Claimed::Busy(h) if h == "b"
        ));
    }

    #[tokio::test]
    async fn one_attempt_at_a_time_and_a_dead_ones_claim_runs_out() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let Claimed::Held(mut a) = PieceAttempt::claim(store.clone(), uri(), "a", 0, 60)
            .await
            .unwrap()
        else {
            panic!("a free piece is claimed");
        };
        // A second delivery meets a's live claim.
        assert!(matches!(
            PieceAttempt::claim(store.clone(), uri(), "b", 1_000, 60).await.unwrap(),
            Claimed::Busy(h) if h == "a"
        ));
        a.renew(50_000).await.unwrap();
        assert!(matches!(
            PieceAttempt::claim(store.clone(), uri(), "b", 100_000, 60)
                .await
                .unwrap(),
            Claimed::Busy(_)
        ));
        // a dies: once its lease ran out, b takes the piece, and a has lost it.
        let Claimed::Held(b) = PieceAttempt::claim(store.clone(), uri(), "b", 110_001, 60)
            .await
            .unwrap()
        else {
            panic!("an expired claim is taken over");
        };
        assert!(matches!(
            a.renew(111_000).await,
            Err(LeaseError::Lost { holder: Some(h), .. }) if h == "b"
        ));
        // Released, the piece is free at once.
        b.release().await.unwrap();
        let Claimed::Held(_c) = PieceAttempt::claim(store.clone(), uri(), "c", 112_000, 60)
            .await
            .unwrap()
        else {
            panic!("a released claim is free");
        };
        // c hands the piece over: its successor takes its live claim over at once, and a
        // duplicate of that message does not.
        let Claimed::Held(d) =
            PieceAttempt::claim_from(store.clone(), uri(), "c", "d", 113_000, 60)
                .await
                .unwrap()
        else {
            panic!("the attempt c handed the piece to takes its claim");
        };
        assert!(matches!(
            PieceAttempt::claim_from(store.clone(), uri(), "c", "d2", 113_500, 60).await.unwrap(),
            Claimed::Busy(h) if h == "d"
        ));
        d.release().await.unwrap();
    }
}
