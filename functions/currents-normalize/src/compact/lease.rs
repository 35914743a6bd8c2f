//! A lease on one table-day, so two compactions of the same day never both delete parts.
//!
//! The lease is a small JSON object written with a conditional put: `If-None-Match: *` to
//! take a free lease, `If-Match: <etag>` to take over one that was released or has expired,
//! and again `If-Match` to renew it just before deleting. Whoever loses a conditional put has
//! lost the lease and deletes nothing. A lease outlives the longest Lambda run (15 minutes),
//! so a holder that renewed has the whole TTL to finish its deletes.

use std::collections::BTreeMap;

use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// How long a lease holds without renewal.
pub const LEASE_TTL: chrono::Duration = chrono::Duration::minutes(20);

#[derive(Debug, Serialize, Deserialize)]
struct LeaseBody {
    owner: String,
    expires_at_ms: i64,
    released: bool,
}

/// A lease this run holds.
#[derive(Debug, Clone)]
pub struct Lease {
    uri: S3Uri,
    etag: String,
    owner: String,
}

fn body(owner: &str, now: chrono::DateTime<chrono::Utc>, released: bool) -> Bytes {
    let b = LeaseBody {
        owner: owner.into(),
        expires_at_ms: (now + LEASE_TTL).timestamp_millis(),
        released,
    };
    Bytes::from(serde_json::to_vec(&b).unwrap_or_default())
}

/// Takes the lease at `uri` for `owner`. `Ok(None)`: someone else holds it.
pub async fn acquire(
    store: &dyn ObjectStore,
    uri: &S3Uri,
    owner: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<Lease>, StoreError> {
    let held = |etag: String| {
        Some(Lease {
            uri: uri.clone(),
            etag,
            owner: owner.to_string(),
        })
    };
    match store
        .put(
            uri,
            body(owner, now, false),
            PutCondition::IfAbsent,
            BTreeMap::new(),
        )
        .await
    {
        Ok(meta) => return Ok(held(meta.etag)),
        Err(StoreError::PreconditionFailed { .. }) => {}
        Err(e) => return Err(e),
    }
    let (meta, bytes) = match store.get(uri).await {
        Ok(x) => x,
        // Released and removed between our two calls: next run takes it.
        Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let free = match serde_json::from_slice::<LeaseBody>(&bytes) {
        Ok(b) => b.released || b.expires_at_ms <= now.timestamp_millis(),
        // An unreadable lease object protects nothing.
        Err(_) => true,
    };
    if !free {
        return Ok(None);
    }
    match store
        .put(
            uri,
            body(owner, now, false),
            PutCondition::IfMatch(meta.etag),
            BTreeMap::new(),
        )
        .await
    {
        Ok(meta) => Ok(held(meta.etag)),
        Err(StoreError::PreconditionFailed { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Lease {
    /// Extends the lease; `Ok(false)` when it was lost (expired and taken by another run).
    pub async fn renew(
        &mut self,
        store: &dyn ObjectStore,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, StoreError> {
        match store
            .put(
                &self.uri,
                body(&self.owner, now, false),
                PutCondition::IfMatch(self.etag.clone()),
                BTreeMap::new(),
            )
            .await
        {
            Ok(meta) => {
                self.etag = meta.etag;
                Ok(true)
            }
            Err(StoreError::PreconditionFailed { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Marks the lease released (only if still ours), so the next run need not wait for it
    /// to expire.
    pub async fn release(
        self,
        store: &dyn ObjectStore,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), StoreError> {
        match store
            .put(
                &self.uri,
                body(&self.owner, now, true),
                PutCondition::IfMatch(self.etag),
                BTreeMap::new(),
            )
            .await
        {
            Ok(_) | Err(StoreError::PreconditionFailed { .. }) => Ok(()),
            Err(e) => Err(e),
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
