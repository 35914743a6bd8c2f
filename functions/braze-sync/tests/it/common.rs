//! Scaffolding the runner tests share: Braze's answer to an accepted request, and a store
//! whose writes fail on demand (S3 throttling at a chosen step).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use braze_sync::config::route::Route;
use braze_sync::run::handler::{Handler, HandlerConfig};
use braze_sync::run::runner::{Continuation, RunnerSettings, SyncRunner};
use braze_sync::send::braze::{BrazeApi, ItemError, RateLimitInfo, TrackResponse};
use bridge_shared::object_store::{
    MemoryStore, ObjectMeta, ObjectReader, ObjectStore, PutCondition,
};
use bridge_shared::{S3Uri, StoreError};
use bytes::Bytes;

/// Braze's `201` answer, with the objects it refused (`errors`).
pub fn accepted(errors: Vec<ItemError>) -> TrackResponse {
    TrackResponse {
        status: 201,
        message: "success".into(),
        errors,
        rate: RateLimitInfo::default(),
    }
}

/// Braze's `201` answer to a request it took whole.
pub fn success() -> TrackResponse {
    accepted(Vec::new())
}

/// Which writes fail: called with the object and the body about to be written.
type FailWhen = Box<dyn Fn(&S3Uri, &Bytes) -> bool + Send + Sync>;

/// A [`MemoryStore`] whose puts fail with a retryable `SlowDown` when `fail` says so.
pub struct FailingPuts {
    pub inner: Arc<MemoryStore>,
    fail: FailWhen,
}

impl FailingPuts {
    pub fn new(
        inner: Arc<MemoryStore>,
        fail: impl Fn(&S3Uri, &Bytes) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner,
            fail: Box::new(fail),
        }
    }
}

#[async_trait]
impl ObjectStore for FailingPuts {
    async fn get(&self, uri: &S3Uri) -> Result<(ObjectMeta, Bytes), StoreError> {
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
        cond: PutCondition,
        meta: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        if (self.fail)(uri, &body) {
            return Err(StoreError::Other {
                op: "PutObject",
                uri: uri.clone(),
                message: "SlowDown".into(),
                retryable: true,
            });
        }
        self.inner.put(uri, body, cond, meta).await
    }
    async fn copy(&self, from: &S3Uri, to: &S3Uri) -> Result<(), StoreError> {
        self.inner.copy(from, to).await
    }
    async fn delete(&self, uri: &S3Uri) -> Result<(), StoreError> {
        self.inner.delete(uri).await
    }
}

/// The handler of one route over `store` and `braze`, as the tests lay the state bucket out
/// (`state`: `s/` state, `r/` reports, `x/` rejects), with the runner's settings and queue.
pub fn handler(
    store: Arc<dyn ObjectStore>,
    route: &Route,
    braze: Arc<dyn BrazeApi>,
    settings: RunnerSettings,
    continuation: Option<Arc<dyn Continuation>>,
) -> Handler {
    let runner = SyncRunner::new(
        store.clone(),
        vec![route.clone()],
        braze,
        settings,
        continuation,
    );
    Handler::new(
        HandlerConfig {
            state_bucket: "state".into(),
            output_prefixes: vec!["s/".into(), "r/".into(), "x/".into()],
            state_prefix: "s/".into(),
            reports_prefix: "r/".into(),
            routes: vec![route.binding()],
            lease_s: 60,
        },
        store,
        Arc::new(runner),
    )
}
