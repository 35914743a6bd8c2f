//! Simulated S3: strongly consistent, `If-Match` / `If-None-Match` honoured (a conditional
//! put over a missing object answers 404, as S3 does), ETags from the content. Each call of an
//! invocation meets the fate the seed gives it: latency, a crash of the invocation, a failure
//! before applying (503 SlowDown / timeout), or, for writes, applied and then the answer lost.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bridge_shared::object_store::{ObjectMeta, ObjectReader, ObjectStore, PutCondition};
use bridge_shared::{S3Uri, StoreError};
use bytes::Bytes;

use crate::world::{Gate, World};

/// The objects, by bucket and key.
#[derive(Default)]
pub struct S3 {
    objects: Mutex<BTreeMap<(String, String), (ObjectMeta, Bytes)>>,
    /// Keys ever deleted (the checks say whether a head names one).
    pub deleted: Mutex<BTreeSet<(String, String)>>,
}

impl S3 {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), (ObjectMeta, Bytes)>> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every key under a prefix of a bucket.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.lock()
            .range((bucket.to_string(), prefix.to_string())..)
            .take_while(|((b, k), _)| b == bucket && k.starts_with(prefix))
            .map(|((_, k), _)| k.clone())
            .collect()
    }

    /// One object's bytes.
    pub fn body(&self, bucket: &str, key: &str) -> Option<Bytes> {
        self.lock()
            .get(&(bucket.to_string(), key.to_string()))
            .map(|(_, b)| b.clone())
    }
}

/// The [`ObjectStore`] one container sees: the world's S3 under the current invocation's gate.
#[derive(Clone)]
pub struct SimStore {
    world: Arc<World>,
    s3: Arc<S3>,
    gate: Arc<Mutex<Arc<Gate>>>,
    /// Reads S3 as it is: no fault, latency or trace event ([`SimStore::peek`]).
    peek: bool,
}

fn gone(op: &'static str, uri: &S3Uri) -> StoreError {
    StoreError::Other {
        op,
        uri: uri.clone(),
        message: "the invocation's container is gone".into(),
        retryable: false,
    }
}

impl SimStore {
    /// A store over `s3` for the invocation behind `gate`.
    pub fn new(world: Arc<World>, s3: Arc<S3>, gate: Arc<Mutex<Arc<Gate>>>) -> Self {
        Self {
            world,
            s3,
            gate,
            peek: false,
        }
    }

    /// A store that calls S3 as it is, with no fault, latency or trace event: for looking at
    /// the world from outside it ([`crate::notes`]), never for code under test.
    pub fn peek(world: Arc<World>, s3: Arc<S3>) -> Self {
        Self {
            world,
            s3,
            gate: Arc::new(Mutex::new(Gate::world())),
            peek: true,
        }
    }

    fn gate(&self) -> Arc<Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn call<T>(
        &self,
        op: &'static str,
        uri: &S3Uri,
        write: bool,
        apply: impl FnOnce(&S3) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.peek {
            return apply(&self.s3);
        }
        let gate = self.gate();
        if gate.crashed() {
            return Err(gone(op, uri));
        }
        let f = &self.world.faults;
        let key = format!("{}/{}", uri.bucket, uri.key);
        let fate = self.world.fate(
            &gate,
            op,
            &key,
            f.s3_fail,
            if write { f.s3_lost } else { 0 },
            f.s3_latency_ms,
        );
        if !fate.latency.is_zero() {
            tokio::time::sleep(fate.latency).await;
            if gate.crashed() {
                return Err(gone(op, uri));
            }
        }
        if fate.crash && !fate.lose {
            return self.crash(&gate, op, uri, "before").await;
        }
        if fate.fail {
            self.world.stat(|s| s.failed_calls += 1);
            self.world
                .trace(|| format!("inv {} s3 {op} {key} failed before applying", gate.inv));
            return Err(StoreError::Other {
                op,
                uri: uri.clone(),
                message: "SlowDown: please reduce your request rate (503)".into(),
                retryable: true,
            });
        }
        let out = apply(&self.s3);
        if write {
            self.world.trace(|| {
                format!(
                    "inv {} s3 {op} {key} -> {}",
                    gate.inv,
                    match &out {
                        Ok(_) => "ok".to_string(),
                        Err(e) => e.to_string(),
                    }
                )
            });
        }
        if fate.lose && out.is_ok() {
            self.world.stat(|s| s.lost_answers += 1);
            self.world
                .trace(|| format!("inv {} s3 {op} {key} applied, answer lost", gate.inv));
            if fate.crash {
                return self.crash(&gate, op, uri, "after").await;
            }
            return Err(StoreError::Other {
                op,
                uri: uri.clone(),
                message: "dispatch failure: timeout waiting for the response".into(),
                retryable: true,
            });
        }
        out
    }

    async fn crash<T>(
        &self,
        gate: &Gate,
        op: &'static str,
        uri: &S3Uri,
        when: &str,
    ) -> Result<T, StoreError> {
        self.world
            .trace(|| format!("inv {} crash {when} s3 {op} {uri}", gate.inv));
        gate.crash();
        std::future::pending::<()>().await;
        Err(gone(op, uri))
    }

    fn meta(uri: &S3Uri, body: &Bytes, metadata: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            key: uri.key.clone(),
            etag: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(body)),
            size: body.len() as u64,
            version_id: None,
            last_modified: Some(braze_sync::clock::now().to_rfc3339()),
            metadata: metadata
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
        }
    }
}

fn not_found(uri: &S3Uri) -> StoreError {
    StoreError::NotFound { uri: uri.clone() }
}

fn k(uri: &S3Uri) -> (String, String) {
    (uri.bucket.clone(), uri.key.clone())
}

#[async_trait]
impl ObjectStore for SimStore {
    async fn get(&self, uri: &S3Uri) -> Result<(ObjectMeta, Bytes), StoreError> {
        self.call("GetObject", uri, false, |s3| {
            s3.lock()
                .get(&k(uri))
                .cloned()
                .ok_or_else(|| not_found(uri))
        })
        .await
    }

    async fn get_reader(&self, uri: &S3Uri) -> Result<(ObjectMeta, ObjectReader), StoreError> {
        let (meta, body) = self
            .call("GetObject", uri, false, |s3| {
                s3.lock()
                    .get(&k(uri))
                    .cloned()
                    .ok_or_else(|| not_found(uri))
            })
            .await?;
        let reader: ObjectReader = Box::pin(std::io::Cursor::new(body.to_vec()));
        Ok((meta, reader))
    }

    async fn head(&self, uri: &S3Uri) -> Result<Option<ObjectMeta>, StoreError> {
        self.call("HeadObject", uri, false, |s3| {
            Ok(s3.lock().get(&k(uri)).map(|(m, _)| m.clone()))
        })
        .await
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let uri = S3Uri::new(bucket, prefix);
        self.call("ListObjectsV2", &uri, false, |s3| {
            Ok(s3
                .lock()
                .range((bucket.to_string(), prefix.to_string())..)
                .take_while(|((b, k), _)| b == bucket && k.starts_with(prefix))
                .map(|(_, (m, _))| m.clone())
                .collect())
        })
        .await
    }

    async fn put(
        &self,
        uri: &S3Uri,
        body: Bytes,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        self.call("PutObject", uri, true, |s3| {
            let mut objects = s3.lock();
            let current = objects.get(&k(uri)).map(|(m, _)| m.etag.clone());
            if matches!(condition, PutCondition::IfMatch(_)) && current.is_none() {
                return Err(not_found(uri));
            }
            if !condition.allows(current.as_deref()) {
                return Err(StoreError::PreconditionFailed { uri: uri.clone() });
            }
            let meta = Self::meta(uri, &body, metadata);
            objects.insert(k(uri), (meta.clone(), body));
            Ok(meta)
        })
        .await
    }

    async fn copy(&self, from: &S3Uri, to: &S3Uri) -> Result<(), StoreError> {
        self.call("CopyObject", to, true, |s3| {
            let mut objects = s3.lock();
            let (meta, body) = objects
                .get(&k(from))
                .cloned()
                .ok_or_else(|| not_found(from))?;
            let meta = Self::meta(to, &body, meta.metadata);
            objects.insert(k(to), (meta, body));
            Ok(())
        })
        .await
    }

    async fn delete(&self, uri: &S3Uri) -> Result<(), StoreError> {
        self.call("DeleteObject", uri, true, |s3| {
            if s3.lock().remove(&k(uri)).is_some() {
                s3.deleted
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(k(uri));
            }
            Ok(())
        })
        .await
    }
}
