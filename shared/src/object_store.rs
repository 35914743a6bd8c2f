//! Object I/O behind a small trait: get (whole or streamed), head, list, put with an optional
//! condition (`If-None-Match: *` to create, `If-Match: <etag>` to replace), copy and delete.
//! [`S3Store`] is the real implementation; [`MemoryStore`] (feature `test-util`) is the fake.

use std::collections::BTreeMap;
use std::pin::Pin;

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use tokio::io::AsyncRead;

use crate::s3_uri::S3Uri;

/// What a store knows of an object besides its bytes (serializable: a fan-out's manifest
/// keeps its export's parts as planned).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ObjectMeta {
    /// Object key.
    pub key: String,
    /// ETag without quotes.
    pub etag: String,
    /// Size in bytes.
    pub size: u64,
    /// Version id, when versioned.
    pub version_id: Option<String>,
    /// Last-modified time, RFC 3339.
    pub last_modified: Option<String>,
    /// User metadata (`x-amz-meta-*`), keys lower-cased.
    pub metadata: BTreeMap<String, String>,
}

/// A condition a put must meet, so concurrent writers cannot overwrite each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutCondition {
    /// Write whatever is there.
    None,
    /// Create only: fail if the key exists.
    IfAbsent,
    /// Replace only the version with this ETag.
    IfMatch(String),
}

impl PutCondition {
    /// Whether a put under this condition may replace an object whose current ETag is
    /// `current` (`None`: no object). Stores that check conditions themselves use this.
    pub fn allows(&self, current: Option<&str>) -> bool {
        match (self, current) {
            (PutCondition::None, _) => true,
            (PutCondition::IfAbsent, c) => c.is_none(),
            (PutCondition::IfMatch(want), Some(have)) => want == have,
            (PutCondition::IfMatch(_), None) => false,
        }
    }
}

/// A byte stream of an object's contents.
pub type ObjectReader = Pin<Box<dyn AsyncRead + Send>>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such object (or bucket).
    #[error("{uri}: no such object")]
    NotFound {
        /// The object asked for.
        uri: S3Uri,
    },
    /// A conditional put lost: someone else wrote first.
    #[error("{uri}: precondition failed (another writer got there first)")]
    PreconditionFailed {
        /// The object written.
        uri: S3Uri,
    },
    /// Anything else; `retryable` says whether trying again can help.
    #[error("{op} {uri} failed: {message}")]
    Other {
        /// The operation (`GetObject`, `PutObject`, ...).
        op: &'static str,
        /// The object.
        uri: S3Uri,
        /// The service's message.
        message: String,
        /// Throttling, 5xx and network errors are retryable; access denied is not.
        retryable: bool,
    },
}

impl StoreError {
    /// Whether a later attempt can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::NotFound { .. } => false,
            StoreError::PreconditionFailed { .. } => true,
            StoreError::Other { retryable, .. } => *retryable,
        }
    }
}

/// Object I/O as the functions need it.
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// Reads a whole object.
    async fn get(&self, uri: &S3Uri) -> Result<(ObjectMeta, Bytes), StoreError>;
    /// Streams an object.
    async fn get_reader(&self, uri: &S3Uri) -> Result<(ObjectMeta, ObjectReader), StoreError>;
    /// Reads an object's metadata, `None` when it does not exist.
    async fn head(&self, uri: &S3Uri) -> Result<Option<ObjectMeta>, StoreError>;
    /// Lists every object under a prefix, in key order.
    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError>;
    /// Lists at most `max` objects under a prefix whose keys sort after `start_after`, in key
    /// order: one page of a listing too large to hold (an empty page means the end). The
    /// default filters [`ObjectStore::list`], which holds the whole listing (fine for fakes and
    /// small stores); [`S3Store`] asks S3 for one page (`StartAfter`, `MaxKeys`, at most 1,000).
    async fn list_page(
        &self,
        bucket: &str,
        prefix: &str,
        start_after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ObjectMeta>, StoreError> {
        let mut all = self.list(bucket, prefix).await?;
        all.sort_by(|a, b| a.key.cmp(&b.key));
        let from = match start_after {
            Some(s) => all.partition_point(|o| o.key.as_str() <= s),
            None => 0,
        };
        Ok(all.into_iter().skip(from).take(max.max(1)).collect())
    }
    /// Writes an object; returns its new metadata (ETag).
    async fn put(
        &self,
        uri: &S3Uri,
        body: Bytes,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError>;
    /// Writes an object from a local file. The default reads the file into memory and calls
    /// [`ObjectStore::put`]; [`S3Store`] streams it from disk, so large outputs (compacted
    /// table parts) never sit in memory whole.
    async fn put_file(
        &self,
        uri: &S3Uri,
        path: &std::path::Path,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        let body = tokio::fs::read(path).await.map_err(|e| StoreError::Other {
            op: "ReadFile",
            uri: uri.clone(),
            message: format!("{}: {e}", path.display()),
            retryable: false,
        })?;
        self.put(uri, Bytes::from(body), condition, metadata).await
    }
    /// Reads the last `n` bytes of an object (all of it when it is shorter), e.g. a Parquet
    /// footer. The default reads the whole object; [`S3Store`] asks for a suffix range.
    async fn get_tail(&self, uri: &S3Uri, n: u64) -> Result<Bytes, StoreError> {
        let (_, body) = self.get(uri).await?;
        let start = body
            .len()
            .saturating_sub(usize::try_from(n).unwrap_or(usize::MAX));
        Ok(body.slice(start..))
    }
    /// Copies an object within the store.
    async fn copy(&self, from: &S3Uri, to: &S3Uri) -> Result<(), StoreError>;
    /// Deletes an object (no error when absent).
    async fn delete(&self, uri: &S3Uri) -> Result<(), StoreError>;
}

/// [`ObjectStore`] over Amazon S3 (or any S3-compatible endpoint via `AWS_ENDPOINT_URL`).
#[derive(Clone, Debug)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
}

impl S3Store {
    /// One `PutObject` of `body` (`size` bytes) under `condition`, for [`ObjectStore::put`]
    /// (bytes in memory) and [`ObjectStore::put_file`] (streamed from disk) alike.
    async fn put_body(
        &self,
        uri: &S3Uri,
        body: ByteStream,
        size: u64,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        let mut req = self
            .client
            .put_object()
            .bucket(&uri.bucket)
            .key(&uri.key)
            .body(body);
        for (k, v) in &metadata {
            req = req.metadata(k, v);
        }
        req = match &condition {
            PutCondition::None => req,
            PutCondition::IfAbsent => req.if_none_match("*"),
            PutCondition::IfMatch(etag) => req.if_match(format!("\"{etag}\"")),
        };
        let out = req
            .send()
            .await
            .map_err(|e| classify("PutObject", uri, e))?;
        Ok(ObjectMeta {
            key: uri.key.clone(),
            etag: strip_quotes(out.e_tag()),
            size,
            version_id: out.version_id().map(str::to_string),
            last_modified: None,
            metadata,
        })
    }

    /// Wraps a client built once at start-up.
    pub fn new(client: aws_sdk_s3::Client) -> Self {
        Self { client }
    }

    /// Builds a client from the environment: region, credentials and `AWS_ENDPOINT_URL`.
    /// Path-style addressing is used whenever an endpoint override is set (local stacks).
    pub async fn from_env() -> Self {
        let conf = aws_config::load_from_env().await;
        let mut b = aws_sdk_s3::config::Builder::from(&conf);
        if std::env::var_os("AWS_ENDPOINT_URL").is_some()
            || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some()
        {
            b = b.force_path_style(true);
        }
        Self::new(aws_sdk_s3::Client::from_conf(b.build()))
    }

    /// The underlying client.
    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }
}

fn classify<E>(op: &'static str, uri: &S3Uri, err: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = match &err {
        SdkError::ServiceError(_) => err.raw_response().map(|r| r.status().as_u16()),
        _ => None,
    };
    let code = err.code().map(str::to_string);
    let message = match (&code, err.message()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.clone(),
        _ => format!("{}", aws_sdk_s3::error::DisplayErrorContext(&err)),
    };
    match (status, code.as_deref()) {
        (Some(404), _) | (_, Some("NoSuchKey" | "NotFound" | "NoSuchBucket")) => {
            StoreError::NotFound { uri: uri.clone() }
        }
        (Some(412), _) | (_, Some("PreconditionFailed")) => {
            StoreError::PreconditionFailed { uri: uri.clone() }
        }
        (Some(409), _) | (_, Some("ConditionalRequestConflict")) => {
            StoreError::PreconditionFailed { uri: uri.clone() }
        }
        (Some(s), _) => StoreError::Other {
            op,
            uri: uri.clone(),
            message,
            retryable: s == 429 || s >= 500,
        },
        (None, Some("SlowDown" | "InternalError" | "ServiceUnavailable" | "RequestTimeout")) => {
            StoreError::Other {
                op,
                uri: uri.clone(),
                message,
                retryable: true,
            }
        }
        (None, _) => StoreError::Other {
            op,
            uri: uri.clone(),
            message,
            // Dispatch, timeout and I/O failures: the request may succeed later.
            retryable: !matches!(err, SdkError::ServiceError(_)),
        },
    }
}

fn strip_quotes(s: Option<&str>) -> String {
    s.unwrap_or_default().trim_matches('"').to_string()
}

/// What a GetObject or HeadObject answer says of the object (the two outputs are different
/// types with the same accessors).
macro_rules! object_meta {
    ($uri:expr, $out:expr) => {
        ObjectMeta {
            key: $uri.key.clone(),
            etag: strip_quotes($out.e_tag()),
            size: $out.content_length().unwrap_or_default().max(0) as u64,
            version_id: $out.version_id().map(str::to_string),
            last_modified: $out.last_modified().map(|t| t.to_string()),
            metadata: lower_keys($out.metadata()),
        }
    };
}

/// An object as a listing names it (no version, no user metadata).
fn listed(o: &aws_sdk_s3::types::Object) -> ObjectMeta {
    ObjectMeta {
        key: o.key().unwrap_or_default().to_string(),
        etag: strip_quotes(o.e_tag()),
        size: o.size().unwrap_or_default().max(0) as u64,
        version_id: None,
        last_modified: o.last_modified().map(|t| t.to_string()),
        metadata: BTreeMap::new(),
    }
}

/// Reads a GetObject body to the end; a body cut short may read whole on a later try.
async fn collect(uri: &S3Uri, body: ByteStream) -> Result<Bytes, StoreError> {
    Ok(body
        .collect()
        .await
        .map_err(|e| StoreError::Other {
            op: "GetObject",
            uri: uri.clone(),
            message: e.to_string(),
            retryable: true,
        })?
        .into_bytes())
}

impl S3Store {
    /// GetObject, of the whole object or of `range` (an HTTP `Range` value).
    async fn get_object(
        &self,
        uri: &S3Uri,
        range: Option<String>,
    ) -> Result<aws_sdk_s3::operation::get_object::GetObjectOutput, StoreError> {
        self.client
            .get_object()
            .bucket(&uri.bucket)
            .key(&uri.key)
            .set_range(range)
            .send()
            .await
            .map_err(|e| classify("GetObject", uri, e))
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn get(&self, uri: &S3Uri) -> Result<(ObjectMeta, Bytes), StoreError> {
        let out = self.get_object(uri, None).await?;
        let meta = object_meta!(uri, out);
        Ok((meta, collect(uri, out.body).await?))
    }

    async fn get_tail(&self, uri: &S3Uri, n: u64) -> Result<Bytes, StoreError> {
        if n == 0 {
            return Ok(Bytes::new());
        }
        let out = self.get_object(uri, Some(format!("bytes=-{n}"))).await?;
        collect(uri, out.body).await
    }

    async fn get_reader(&self, uri: &S3Uri) -> Result<(ObjectMeta, ObjectReader), StoreError> {
        let out = self.get_object(uri, None).await?;
        let meta = object_meta!(uri, out);
        Ok((meta, Box::pin(out.body.into_async_read())))
    }

    async fn head(&self, uri: &S3Uri) -> Result<Option<ObjectMeta>, StoreError> {
        match self
            .client
            .head_object()
            .bucket(&uri.bucket)
            .key(&uri.key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(object_meta!(uri, out))),
            Err(e) => match classify("HeadObject", uri, e) {
                StoreError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let uri = S3Uri::new(bucket, prefix);
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("ListObjectsV2", &uri, e))?;
            out.extend(page.contents().iter().map(listed));
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn list_page(
        &self,
        bucket: &str,
        prefix: &str,
        start_after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ObjectMeta>, StoreError> {
        let uri = S3Uri::new(bucket, prefix);
        let mut req = self
            .client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .max_keys(i32::try_from(max.clamp(1, 1000)).unwrap_or(1000));
        if let Some(s) = start_after {
            req = req.start_after(s);
        }
        let page = req
            .send()
            .await
            .map_err(|e| classify("ListObjectsV2", &uri, e))?;
        Ok(page.contents().iter().map(listed).collect())
    }

    async fn put(
        &self,
        uri: &S3Uri,
        body: Bytes,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        let size = body.len() as u64;
        self.put_body(uri, ByteStream::from(body), size, condition, metadata)
            .await
    }

    async fn put_file(
        &self,
        uri: &S3Uri,
        path: &std::path::Path,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        let body = ByteStream::from_path(path)
            .await
            .map_err(|e| StoreError::Other {
                op: "ReadFile",
                uri: uri.clone(),
                message: format!("{}: {e}", path.display()),
                retryable: false,
            })?;
        let size = body.size_hint().0;
        self.put_body(uri, body, size, condition, metadata).await
    }

    async fn copy(&self, from: &S3Uri, to: &S3Uri) -> Result<(), StoreError> {
        let source = format!("{}/{}", from.bucket, crate::s3_uri::encode_key(&from.key));
        self.client
            .copy_object()
            .bucket(&to.bucket)
            .key(&to.key)
            .copy_source(source)
            .send()
            .await
            .map_err(|e| classify("CopyObject", to, e))?;
        Ok(())
    }

    async fn delete(&self, uri: &S3Uri) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&uri.bucket)
            .key(&uri.key)
            .send()
            .await
            .map_err(|e| classify("DeleteObject", uri, e))?;
        Ok(())
    }
}

fn lower_keys(m: Option<&std::collections::HashMap<String, String>>) -> BTreeMap<String, String> {
    m.map(|m| {
        m.iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect()
    })
    .unwrap_or_default()
}

#[cfg(any(test, feature = "test-util"))]
pub use memory::MemoryStore;

#[cfg(any(test, feature = "test-util"))]
mod memory {
    use super::*;
    use std::sync::Mutex;

    /// An in-memory [`ObjectStore`] for unit and handler tests. ETags are content hashes.
    #[derive(Default, Debug)]
    pub struct MemoryStore {
        objects: Mutex<BTreeMap<(String, String), (ObjectMeta, Bytes)>>,
    }

    impl MemoryStore {
        /// An empty store.
        pub fn new() -> Self {
            Self::default()
        }

        /// Every key in a bucket, in order.
        pub fn keys(&self, bucket: &str) -> Vec<String> {
            self.lock()
                .keys()
                .filter(|(b, _)| b == bucket)
                .map(|(_, k)| k.clone())
                .collect()
        }

        /// Sets an object's `LastModified` (RFC 3339), to age it in tests; no-op when absent.
        pub fn set_last_modified(&self, bucket: &str, key: &str, at: &str) {
            if let Some((meta, _)) = self.lock().get_mut(&(bucket.to_string(), key.to_string())) {
                meta.last_modified = Some(at.to_string());
            }
        }

        fn lock(
            &self,
        ) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), (ObjectMeta, Bytes)>> {
            match self.objects.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            }
        }
    }

    fn etag_of(body: &[u8]) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        body.hash(&mut h);
        format!("{:016x}", h.finish())
    }

    #[async_trait]
    impl ObjectStore for MemoryStore {
        async fn get(&self, uri: &S3Uri) -> Result<(ObjectMeta, Bytes), StoreError> {
            self.lock()
                .get(&(uri.bucket.clone(), uri.key.clone()))
                .cloned()
                .ok_or_else(|| StoreError::NotFound { uri: uri.clone() })
        }

        async fn get_reader(&self, uri: &S3Uri) -> Result<(ObjectMeta, ObjectReader), StoreError> {
            let (meta, body) = self.get(uri).await?;
            Ok((meta, Box::pin(std::io::Cursor::new(body))))
        }

        async fn head(&self, uri: &S3Uri) -> Result<Option<ObjectMeta>, StoreError> {
            Ok(self
                .lock()
                .get(&(uri.bucket.clone(), uri.key.clone()))
                .map(|(m, _)| m.clone()))
        }

        async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
            Ok(self
                .lock()
                .iter()
                .filter(|((b, k), _)| b == bucket && k.starts_with(prefix))
                .map(|(_, (m, _))| m.clone())
                .collect())
        }

        async fn put(
            &self,
            uri: &S3Uri,
            body: Bytes,
            condition: PutCondition,
            metadata: BTreeMap<String, String>,
        ) -> Result<ObjectMeta, StoreError> {
            let mut objects = self.lock();
            let id = (uri.bucket.clone(), uri.key.clone());
            let current = objects.get(&id).map(|(m, _)| m.etag.clone());
            if !condition.allows(current.as_deref()) {
                return Err(StoreError::PreconditionFailed { uri: uri.clone() });
            }
            let meta = ObjectMeta {
                key: uri.key.clone(),
                etag: etag_of(&body),
                size: body.len() as u64,
                version_id: None,
                last_modified: Some(chrono::Utc::now().to_rfc3339()),
                metadata,
            };
            objects.insert(id, (meta.clone(), body));
            Ok(meta)
        }

        async fn copy(&self, from: &S3Uri, to: &S3Uri) -> Result<(), StoreError> {
            let (meta, body) = self.get(from).await?;
            self.put(to, body, PutCondition::None, meta.metadata)
                .await?;
            Ok(())
        }

        async fn delete(&self, uri: &S3Uri) -> Result<(), StoreError> {
            self.lock().remove(&(uri.bucket.clone(), uri.key.clone()));
            Ok(())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[tokio::test]
        async fn a_listing_comes_page_by_page_after_a_key() {
            let s = MemoryStore::new();
            for k in ["p/a", "p/b", "p/c", "p/d", "q/e"] {
                s.put(
                    &S3Uri::new("b", k),
                    Bytes::new(),
                    PutCondition::None,
                    BTreeMap::new(),
                )
                .await
                .unwrap();
            }
            let keys = |v: Vec<ObjectMeta>| v.into_iter().map(|o| o.key).collect::<Vec<_>>();
            assert_eq!(
                keys(s.list_page("b", "p/", None, 2).await.unwrap()),
                ["p/a", "p/b"]
            );
            assert_eq!(
                keys(s.list_page("b", "p/", Some("p/b"), 2).await.unwrap()),
                ["p/c", "p/d"]
            );
            assert_eq!(
                keys(s.list_page("b", "p/", Some("p/bb"), 5).await.unwrap()),
                ["p/c", "p/d"]
            );
            assert!(
                s.list_page("b", "p/", Some("p/d"), 2)
                    .await
                    .unwrap()
                    .is_empty()
            );
        }

        #[tokio::test]
        async fn conditional_puts_refuse_a_lost_race() {
            let s = MemoryStore::new();
            let u = S3Uri::new("b", "k");
            let m = s
                .put(
                    &u,
                    Bytes::from_static(b"1"),
                    PutCondition::IfAbsent,
                    BTreeMap::new(),
                )
                .await
                .unwrap();
            assert!(matches!(
                s.put(
                    &u,
                    Bytes::from_static(b"2"),
                    PutCondition::IfAbsent,
                    BTreeMap::new()
                )
                .await,
                Err(StoreError::PreconditionFailed { .. })
            ));
            s.put(
                &u,
                Bytes::from_static(b"2"),
                PutCondition::IfMatch(m.etag.clone()),
                BTreeMap::new(),
            )
            .await
            .unwrap();
            assert!(
                s.put(
                    &u,
                    Bytes::from_static(b"3"),
                    PutCondition::IfMatch(m.etag),
                    BTreeMap::new()
                )
                .await
                .is_err()
            );
        }
    }
}
