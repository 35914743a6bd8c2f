//! A store that tries a failed call again when trying again is harmless: reads, listings,
//! deletions and unconditional writes (reports, rejects) that failed with a retryable error
//! are repeated, [`ATTEMPTS`] times in all, on top of the SDK's own attempts (which already
//! wait between them; these follow at once, so they also work where a reader thread drives
//! the call and a timer would never fire, as in the simulation's paused time). Conditional writes (heads, segments, the ledger, locks) are passed through once: after
//! a lost answer their retry meets 412, and only the caller can decide by what is there now
//! (the state store tries its own again and decides by the object's bytes or the head as it is
//! now; the route lock and the ledger's claims by their lease).
//! One transient S3 error then costs a pause, not the whole run (and one of the few receives
//! its message has before the dead-letter queue).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use bridge_shared::object_store::{ObjectMeta, ObjectReader, PutCondition};
use bridge_shared::{ObjectStore, S3Uri, StoreError};
use bytes::Bytes;

/// Attempts at one call that may be repeated.
pub const ATTEMPTS: u32 = 3;

/// [`ObjectStore`] over `inner`, repeating what can be repeated.
pub struct RetryingStore {
    inner: Arc<dyn ObjectStore>,
}

impl RetryingStore {
    /// Wraps `inner`.
    pub fn wrap(inner: Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> {
        Arc::new(Self { inner })
    }
}

/// Whether `e` is a failure that trying the same call again may cure (not an answer such as
/// 404 or 412).
pub(crate) fn transient(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Other {
            retryable: true,
            ..
        }
    )
}

/// Runs `call` until it succeeds, fails for good, or [`ATTEMPTS`] are spent.
async fn again<T, F, Fut>(mut call: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 1;
    loop {
        match call().await {
            Err(e) if transient(&e) && attempt < ATTEMPTS => attempt += 1,
            r => return r,
        }
    }
}

#[async_trait]
impl ObjectStore for RetryingStore {
    async fn get(&self, uri: &S3Uri) -> Result<(ObjectMeta, Bytes), StoreError> {
        again(|| self.inner.get(uri)).await
    }

    async fn get_reader(&self, uri: &S3Uri) -> Result<(ObjectMeta, ObjectReader), StoreError> {
        again(|| self.inner.get_reader(uri)).await
    }

    async fn head(&self, uri: &S3Uri) -> Result<Option<ObjectMeta>, StoreError> {
        again(|| self.inner.head(uri)).await
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        again(|| self.inner.list(bucket, prefix)).await
    }

    async fn list_page(
        &self,
        bucket: &str,
        prefix: &str,
        start_after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ObjectMeta>, StoreError> {
        again(|| self.inner.list_page(bucket, prefix, start_after, max)).await
    }

    async fn put(
        &self,
        uri: &S3Uri,
        body: Bytes,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        if condition != PutCondition::None {
            return self.inner.put(uri, body, condition, metadata).await;
        }
        again(|| {
            self.inner
                .put(uri, body.clone(), PutCondition::None, metadata.clone())
        })
        .await
    }

    async fn put_file(
        &self,
        uri: &S3Uri,
        path: &std::path::Path,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        if condition != PutCondition::None {
            return self.inner.put_file(uri, path, condition, metadata).await;
        }
        again(|| {
            self.inner
                .put_file(uri, path, PutCondition::None, metadata.clone())
        })
        .await
    }

    async fn get_tail(&self, uri: &S3Uri, n: u64) -> Result<Bytes, StoreError> {
        again(|| self.inner.get_tail(uri, n)).await
    }

    async fn copy(&self, from: &S3Uri, to: &S3Uri) -> Result<(), StoreError> {
        again(|| self.inner.copy(from, to)).await
    }

    async fn delete(&self, uri: &S3Uri) -> Result<(), StoreError> {
        again(|| self.inner.delete(uri)).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bridge_shared::object_store::MemoryStore;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Fails the next `fail` calls of every kind with a retryable error.
    struct Flaky {
        inner: MemoryStore,
        fail: AtomicU32,
        calls: AtomicU32,
    }

    impl Flaky {
        fn trip(&self, uri: &S3Uri) -> Result<(), StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let failing = self
                .fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
                .is_ok();
            match failing {
                true => Err(StoreError::Other {
                    op: "Any",
                    uri: uri.clone(),
                    message: "503 SlowDown".into(),
                    retryable: true,
                }),
                false => Ok(()),
            }
        }
    }

    #[async_trait]
    impl ObjectStore for Flaky {
        async fn get(&self, uri: &S3Uri) -> Result<(ObjectMeta, Bytes), StoreError> {
            self.trip(uri)?;
            self.inner.get(uri).await
        }
        async fn get_reader(&self, uri: &S3Uri) -> Result<(ObjectMeta, ObjectReader), StoreError> {
            self.trip(uri)?;
            self.inner.get_reader(uri).await
        }
        async fn head(&self, uri: &S3Uri) -> Result<Option<ObjectMeta>, StoreError> {
            self.trip(uri)?;
            self.inner.head(uri).await
        }
        async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
            self.trip(&S3Uri::new(bucket, prefix))?;
            self.inner.list(bucket, prefix).await
        }
        async fn put(
            &self,
            uri: &S3Uri,
            body: Bytes,
            condition: PutCondition,
            metadata: BTreeMap<String, String>,
        ) -> Result<ObjectMeta, StoreError> {
            self.trip(uri)?;
            self.inner.put(uri, body, condition, metadata).await
        }
        async fn copy(&self, from: &S3Uri, to: &S3Uri) -> Result<(), StoreError> {
            self.trip(from)?;
            self.inner.copy(from, to).await
        }
        async fn delete(&self, uri: &S3Uri) -> Result<(), StoreError> {
            self.trip(uri)?;
            self.inner.delete(uri).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reads_and_plain_writes_are_tried_again_and_conditional_writes_are_not() {
        let flaky = Arc::new(Flaky {
            inner: MemoryStore::new(),
            fail: AtomicU32::new(0),
            calls: AtomicU32::new(0),
        });
        let store = RetryingStore::wrap(flaky.clone());
        let uri = S3Uri::new("b", "k");
        flaky.fail.store(ATTEMPTS - 1, Ordering::SeqCst);
        store
            .put(&uri, Bytes::from("x"), PutCondition::None, BTreeMap::new())
            .await
            .unwrap();
        flaky.fail.store(ATTEMPTS - 1, Ordering::SeqCst);
        assert_eq!(store.get(&uri).await.unwrap().1, Bytes::from("x"));
        // One failure too many is the caller's.
        flaky.fail.store(ATTEMPTS, Ordering::SeqCst);
        assert!(store.head(&uri).await.is_err());
        // A conditional write fails at once: after a lost answer only the caller can decide.
        flaky.fail.store(1, Ordering::SeqCst);
        flaky.calls.store(0, Ordering::SeqCst);
        let cond = PutCondition::IfAbsent;
        assert!(
            store
                .put(&uri, Bytes::from("y"), cond, BTreeMap::new())
                .await
                .is_err()
        );
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 1);
        // Not found is an answer, not a failure.
        flaky.calls.store(0, Ordering::SeqCst);
        assert!(store.get(&S3Uri::new("b", "missing")).await.is_err());
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 1);
    }
}
