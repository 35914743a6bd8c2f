//! A [`MemoryStore`] with bad days, for tests of conditional-write protocols (leases, claims):
//! its next puts can fail before applying (`fail_puts`), or apply and lose their answer
//! (`lose_puts`, the caller sees a 503), its reads can fail (`fail_reads`), and deletes of
//! keys holding a pattern can be refused (`refuse_deletes`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

use async_trait::async_trait;
use bytes::Bytes;

use crate::object_store::{
    MemoryStore, ObjectMeta, ObjectReader, ObjectStore, PutCondition, StoreError,
};
use crate::s3_uri::S3Uri;

/// An in-memory store whose next calls fail as told (see the module).
#[derive(Debug, Default)]
pub struct LossyStore {
    inner: Arc<MemoryStore>,
    fail: AtomicU32,
    lose: AtomicU32,
    reads_ok: AtomicU32,
    fail_reads: AtomicU32,
    refused_deletes: Mutex<Option<String>>,
}

fn take(n: &AtomicU32) -> bool {
    n.fetch_update(SeqCst, SeqCst, |v| v.checked_sub(1)).is_ok()
}

fn unavailable(op: &'static str, uri: &S3Uri) -> StoreError {
    StoreError::Other {
        op,
        uri: uri.clone(),
        message: "503 SlowDown".into(),
        retryable: true,
    }
}

impl LossyStore {
    /// A store with no bad day planned.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next `n` puts fail before applying.
    pub fn fail_puts(&self, n: u32) {
        self.fail.store(n, SeqCst);
    }

    /// The next `n` puts (after the failing ones) apply, then lose their answer.
    pub fn lose_puts(&self, n: u32) {
        self.lose.store(n, SeqCst);
    }

    /// The next `n` reads (GET) fail.
    pub fn fail_reads(&self, n: u32) {
        self.fail_reads_after(0, n);
    }

    /// The next `ok` reads (GET) succeed, then `n` fail.
    pub fn fail_reads_after(&self, ok: u32, n: u32) {
        self.reads_ok.store(ok, SeqCst);
        self.fail_reads.store(n, SeqCst);
    }

    /// Bad days over `inner`, which stays usable without faults.
    pub fn over(inner: Arc<MemoryStore>) -> Self {
        Self {
            inner,
            ..Self::default()
        }
    }

    /// Deletes of keys that contain `pattern` are refused (403, permanent) until it is
    /// cleared (`None`).
    pub fn refuse_deletes(&self, pattern: Option<&str>) {
        if let Ok(mut p) = self.refused_deletes.lock() {
            *p = pattern.map(str::to_string);
        }
    }

    /// The store underneath, to read or write without faults.
    pub fn inner(&self) -> &MemoryStore {
        &self.inner
    }
}

#[async_trait]
impl ObjectStore for LossyStore {
    async fn get(&self, uri: &S3Uri) -> Result<(ObjectMeta, Bytes), StoreError> {
        if !take(&self.reads_ok) && take(&self.fail_reads) {
            return Err(unavailable("GetObject", uri));
        }
        self.inner.get(uri).await
    }
    async fn get_reader(&self, uri: &S3Uri) -> Result<(ObjectMeta, ObjectReader), StoreError> {
        self.inner.get_reader(uri).await
    }
    async fn head(&self, uri: &S3Uri) -> Result<Option<ObjectMeta>, StoreError> {
        self.inner.head(uri).await
    }
    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.inner.list(bucket, prefix).await
    }
    async fn put(
        &self,
        uri: &S3Uri,
        body: Bytes,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        if take(&self.fail) {
            return Err(unavailable("PutObject", uri));
        }
        let out = self.inner.put(uri, body, condition, metadata).await?;
        if take(&self.lose) {
            return Err(unavailable("PutObject", uri));
        }
        Ok(out)
    }
    async fn copy(&self, from: &S3Uri, to: &S3Uri) -> Result<(), StoreError> {
        self.inner.copy(from, to).await
    }
    async fn delete(&self, uri: &S3Uri) -> Result<(), StoreError> {
        let refused = self
            .refused_deletes
            .lock()
            .ok()
            .and_then(|p| p.as_ref().map(|p| uri.key.contains(p.as_str())))
            .unwrap_or(false);
        if refused {
            return Err(StoreError::Other {
                op: "DeleteObject",
                uri: uri.clone(),
                message: "403 AccessDenied".into(),
                retryable: false,
            });
        }
        self.inner.delete(uri).await
    }
}
