//! A lease on one table-day, so two compactions of the same day never both delete parts.
//!
//! The lease is a small JSON object written with a conditional put: `If-None-Match: *` to
//! take a free lease, `If-Match: <etag>` to take over one that was released or has expired,
//! and again `If-Match` to renew it just before deleting ([`bridge_shared::lease`]). Whoever
//! loses a conditional put has lost the lease and deletes nothing. A lease outlives the
//! longest Lambda run (15 minutes), so a holder that renewed has the whole TTL to finish its
//! deletes.

use bridge_shared::lease::{self, LeaseDoc, LeaseError};
use bridge_shared::{ObjectStore, S3Uri, StoreError};
use serde::{Deserialize, Serialize};

/// How long a lease holds without renewal.
pub const LEASE_TTL: chrono::Duration = chrono::Duration::minutes(20);

#[derive(Debug, Serialize, Deserialize)]
struct LeaseBody {
    owner: String,
    expires_at_ms: i64,
    released: bool,
}

impl LeaseDoc for LeaseBody {
    fn holder(&self) -> &str {
        &self.owner
    }

    fn keeps_out(&self, now_ms: i64) -> bool {
        !self.released && self.expires_at_ms > now_ms
    }
}

/// A lease this run holds.
#[derive(Debug, Clone)]
pub struct Lease {
    held: lease::Lease,
    owner: String,
}

fn body(owner: &str, now: chrono::DateTime<chrono::Utc>, released: bool) -> LeaseBody {
    LeaseBody {
        owner: owner.into(),
        expires_at_ms: (now + LEASE_TTL).timestamp_millis(),
        released,
    }
}

/// The store's error behind a lease error; `None` when the lease was lost (or changed under
/// us and could not be read back: not ours to count on).
fn store_error(e: LeaseError) -> Option<StoreError> {
    match e {
        LeaseError::Store { error, .. } => Some(error),
        LeaseError::Lost { .. } | LeaseError::Changed { .. } => None,
    }
}

/// Takes the lease at `uri` for `owner`. `Ok(None)`: someone else holds it.
pub async fn acquire(
    store: &dyn ObjectStore,
    uri: &S3Uri,
    owner: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<Lease>, StoreError> {
    match lease::Lease::acquire(store, uri, &body(owner, now, false), now.timestamp_millis()).await
    {
        Ok(held) => Ok(held.map(|held| Lease {
            held,
            owner: owner.to_string(),
        })),
        Err(e) => match store_error(e) {
            Some(e) => Err(e),
            None => Ok(None),
        },
    }
}

impl Lease {
    /// Extends the lease; `Ok(false)` when it was lost (expired and taken by another run).
    pub async fn renew(
        &mut self,
        store: &dyn ObjectStore,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, StoreError> {
        match self.held.renew(store, &body(&self.owner, now, false)).await {
            Ok(()) => Ok(true),
            Err(e) => match store_error(e) {
                Some(e) => Err(e),
                None => Ok(false),
            },
        }
    }

    /// Marks the lease released (only if still ours), so the next run need not wait for it
    /// to expire.
    pub async fn release(
        mut self,
        store: &dyn ObjectStore,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), StoreError> {
        match self
            .held
            .release(store, &body(&self.owner, now, true))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => match store_error(e) {
                Some(e) => Err(e),
                None => Ok(()),
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use bridge_shared::object_store::MemoryStore;

    #[tokio::test]
    async fn one_holder_at_a_time_until_released_or_expired() {
        let store = MemoryStore::new();
        let uri = S3Uri::new("b", "state/lease.json");
        let now = chrono::Utc::now();
        let mut a = acquire(&store, &uri, "a", now).await.unwrap().unwrap();
        assert!(acquire(&store, &uri, "b", now).await.unwrap().is_none());
        assert!(a.renew(&store, now).await.unwrap());
        // Expired: b takes over, and a's renewal (before its deletes) fails.
        let later = now + LEASE_TTL + chrono::Duration::seconds(1);
        let b = acquire(&store, &uri, "b", later).await.unwrap().unwrap();
        assert!(!a.renew(&store, later).await.unwrap());
        b.release(&store, later).await.unwrap();
        assert!(acquire(&store, &uri, "c", later).await.unwrap().is_some());
    }
}
