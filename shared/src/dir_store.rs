//! An [`ObjectStore`] over a local folder (feature `dir-store`): currents-normalize's
//! `run-file` writes a lake into one (`tables/…`, `quarantine/…`, `reports/…` exactly as the
//! bucket would receive them), and braze-sync's scale bench keeps its state, exports and
//! reports in one, so they cost disk as S3 would, not the measured process's memory.
//!
//! - Layout: [`DirStore::one_bucket`] maps a key to `<root>/<key>` whatever the bucket;
//!   [`DirStore::per_bucket`] to `<root>/<bucket>/<key>`. Keys that would leave the root are
//!   refused.
//! - Writes go to a temporary file beside the object and are renamed into place, so a reader
//!   never sees half an object; conditional writes are serialized within the process.
//! - Metadata comes from the file system (size, modification time as `LastModified`), so a
//!   HEAD or LIST of a multi-GB part reads nothing; objects up to 1 MiB (heads, locks, ledger
//!   entries, manifests) get an ETag from their content, so a conditional write sees every
//!   change; larger ones an ETag of size and modification time.
//! - Reads of a whole object load it; [`ObjectStore::get_reader`] streams the file and
//!   [`ObjectStore::put_file`] copies file to file, so large parts never sit in memory.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use crate::object_store::{ObjectMeta, ObjectReader, ObjectStore, PutCondition, StoreError};
use crate::s3_uri::S3Uri;

/// Objects up to this size get a content ETag (read whole); larger ones size and mtime.
pub const CONTENT_ETAG_MAX: u64 = 1 << 20;

/// The prefix of a write's temporary file name (never listed).
const TMP_PREFIX: &str = ".tmp-";

/// A folder acting as one bucket, or as a set of buckets.
#[derive(Debug)]
pub struct DirStore {
    root: PathBuf,
    per_bucket: bool,
    /// Serializes writes, so a conditional write's check and rename are one step.
    lock: Mutex<()>,
    /// Numbers temporary files.
    seq: AtomicU64,
}

fn io_err(op: &'static str, uri: &S3Uri, e: std::io::Error) -> StoreError {
    if e.kind() == std::io::ErrorKind::NotFound {
        return StoreError::NotFound { uri: uri.clone() };
    }
    StoreError::Other {
        op,
        uri: uri.clone(),
        message: e.to_string(),
        retryable: false,
    }
}

fn content_etag(body: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(body))
}

impl DirStore {
    /// Every bucket is `root` itself: a key is `<root>/<key>` (created on first write).
    pub fn one_bucket(root: impl Into<PathBuf>) -> Self {
        Self::new(root.into(), false)
    }

    /// Each bucket is a folder of `root`: a key is `<root>/<bucket>/<key>`.
    pub fn per_bucket(root: impl Into<PathBuf>) -> Self {
        Self::new(root.into(), true)
    }

    fn new(root: PathBuf, per_bucket: bool) -> Self {
        Self {
            root,
            per_bucket,
            lock: Mutex::new(()),
            seq: AtomicU64::new(0),
        }
    }

    fn bucket_dir(&self, bucket: &str) -> PathBuf {
        if self.per_bucket {
            self.root.join(bucket)
        } else {
            self.root.clone()
        }
    }

    /// The file a key maps to; keys (and buckets) that would leave the root are refused.
    pub fn path_of(&self, uri: &S3Uri) -> Result<PathBuf, StoreError> {
        let rel = Path::new(&uri.key);
        let normal = |p: &Path| p.components().all(|c| matches!(c, Component::Normal(_)));
        let bucket_ok =
            !self.per_bucket || (!uri.bucket.is_empty() && normal(Path::new(&uri.bucket)));
        if uri.key.is_empty() || !normal(rel) || !bucket_ok {
            return Err(StoreError::Other {
                op: "resolve",
                uri: uri.clone(),
                message: "key is empty or leaves the store's folder".into(),
                retryable: false,
            });
        }
        Ok(self.bucket_dir(&uri.bucket).join(rel))
    }

    /// The object's metadata from its file, `None` when it does not exist.
    fn stat(&self, uri: &S3Uri) -> Result<Option<ObjectMeta>, StoreError> {
        let path = self.path_of(uri)?;
        let md = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("HeadObject", uri, e)),
        };
        let modified: chrono::DateTime<chrono::Utc> = md
            .modified()
            .map_err(|e| io_err("HeadObject", uri, e))?
            .into();
        let etag = if md.len() <= CONTENT_ETAG_MAX {
            match std::fs::read(&path) {
                Ok(b) => content_etag(&b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_err("HeadObject", uri, e)),
            }
        } else {
            format!(
                "{}-{}",
                md.len(),
                modified.timestamp_nanos_opt().unwrap_or(0)
            )
        };
        Ok(Some(ObjectMeta {
            key: uri.key.clone(),
            etag,
            size: md.len(),
            version_id: None,
            last_modified: Some(modified.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            metadata: BTreeMap::new(),
        }))
    }

    /// Writes an object through a temporary file (`fill` writes it), once `condition` holds.
    fn write_with(
        &self,
        uri: &S3Uri,
        condition: &PutCondition,
        metadata: BTreeMap<String, String>,
        fill: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<ObjectMeta, StoreError> {
        let path = self.path_of(uri)?;
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if *condition != PutCondition::None {
            let current = self.stat(uri)?.map(|m| m.etag);
            if !condition.allows(current.as_deref()) {
                return Err(StoreError::PreconditionFailed { uri: uri.clone() });
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_err("PutObject", uri, e))?;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(
            "{TMP_PREFIX}{}-{}-{name}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        if let Err(e) = fill(&tmp).and_then(|()| std::fs::rename(&tmp, &path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err("PutObject", uri, e));
        }
        let mut meta = self.stat(uri)?.ok_or_else(|| StoreError::Other {
            op: "PutObject",
            uri: uri.clone(),
            message: "the object vanished after its write".into(),
            retryable: true,
        })?;
        meta.metadata = metadata;
        Ok(meta)
    }
}

fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, base, out);
        } else if let Ok(rel) = p.strip_prefix(base) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

#[async_trait]
impl ObjectStore for DirStore {
    async fn get(&self, uri: &S3Uri) -> Result<(ObjectMeta, Bytes), StoreError> {
        let meta = self
            .stat(uri)?
            .ok_or_else(|| StoreError::NotFound { uri: uri.clone() })?;
        let body = std::fs::read(self.path_of(uri)?).map_err(|e| io_err("GetObject", uri, e))?;
        Ok((meta, Bytes::from(body)))
    }

    async fn get_reader(&self, uri: &S3Uri) -> Result<(ObjectMeta, ObjectReader), StoreError> {
        let meta = self
            .stat(uri)?
            .ok_or_else(|| StoreError::NotFound { uri: uri.clone() })?;
        let f = tokio::fs::File::open(self.path_of(uri)?)
            .await
            .map_err(|e| io_err("GetObject", uri, e))?;
        Ok((meta, Box::pin(f)))
    }

    async fn head(&self, uri: &S3Uri) -> Result<Option<ObjectMeta>, StoreError> {
        self.stat(uri)
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let base = self.bucket_dir(bucket);
        let mut keys = Vec::new();
        walk(&base, &base, &mut keys);
        keys.retain(|k| {
            k.starts_with(prefix)
                && !k
                    .rsplit('/')
                    .next()
                    .is_some_and(|name| name.starts_with(TMP_PREFIX))
        });
        keys.sort();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(m) = self.stat(&S3Uri::new(bucket, &k))? {
                out.push(m);
            }
        }
        Ok(out)
    }

    async fn put(
        &self,
        uri: &S3Uri,
        body: Bytes,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        self.write_with(uri, &condition, metadata, |tmp| std::fs::write(tmp, &body))
    }

    async fn put_file(
        &self,
        uri: &S3Uri,
        file: &Path,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        // Copied file to file, never held in memory (compacted parts are large).
        self.write_with(uri, &condition, metadata, |tmp| {
            std::fs::copy(file, tmp).map(|_| ())
        })
    }

    async fn copy(&self, from: &S3Uri, to: &S3Uri) -> Result<(), StoreError> {
        let src = self.path_of(from)?;
        if self.stat(from)?.is_none() {
            return Err(StoreError::NotFound { uri: from.clone() });
        }
        self.write_with(to, &PutCondition::None, BTreeMap::new(), |tmp| {
            std::fs::copy(&src, tmp).map(|_| ())
        })
        .map(|_| ())
    }

    async fn delete(&self, uri: &S3Uri) -> Result<(), StoreError> {
        let path = self.path_of(uri)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("DeleteObject", uri, e)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn root(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("dir-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    async fn put(
        s: &DirStore,
        u: &S3Uri,
        body: &'static [u8],
        c: PutCondition,
    ) -> Result<ObjectMeta, StoreError> {
        s.put(u, Bytes::from_static(body), c, BTreeMap::new()).await
    }

    #[tokio::test]
    async fn one_bucket_put_get_list_round_trip_under_the_root() {
        let r = root("one");
        let s = DirStore::one_bucket(&r);
        let u = S3Uri::new("ignored", "tables/t/t_2026-01-01.parquet/part-1.parquet");
        put(&s, &u, b"x", PutCondition::None).await.unwrap();
        assert!(r.join(&u.key).is_file());
        assert_eq!(&s.get(&u).await.unwrap().1[..], b"x");
        let listed = s.list("any", "tables/").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].key, u.key);
        assert!(listed[0].last_modified.is_some());
        assert!(matches!(
            put(&s, &u, b"", PutCondition::IfAbsent).await,
            Err(StoreError::PreconditionFailed { .. })
        ));
        let _ = std::fs::remove_dir_all(&r);
    }

    #[tokio::test]
    async fn per_bucket_keeps_buckets_apart_and_conditional_puts_see_every_change() {
        let r = root("per");
        let s = DirStore::per_bucket(&r);
        let a = S3Uri::new("state", "k.json");
        let m = put(&s, &a, b"1", PutCondition::IfAbsent).await.unwrap();
        assert!(r.join("state/k.json").is_file());
        assert!(s.list("exports", "").await.unwrap().is_empty());
        assert_eq!(s.head(&a).await.unwrap().unwrap().etag, m.etag);
        let m2 = put(&s, &a, b"2", PutCondition::IfMatch(m.etag.clone()))
            .await
            .unwrap();
        assert_ne!(m2.etag, m.etag);
        assert!(
            put(&s, &a, b"3", PutCondition::IfMatch(m.etag))
                .await
                .is_err()
        );
        s.delete(&a).await.unwrap();
        s.delete(&a).await.unwrap();
        assert!(s.head(&a).await.unwrap().is_none());
        let _ = std::fs::remove_dir_all(&r);
    }

    #[tokio::test]
    async fn a_file_is_put_and_streamed_without_a_temporary_file_left_listed() {
        use tokio::io::AsyncReadExt;
        let r = root("file");
        let s = DirStore::per_bucket(&r);
        let src = r.join("src.bin");
        std::fs::create_dir_all(&r).unwrap();
        std::fs::write(&src, vec![7u8; (CONTENT_ETAG_MAX + 1) as usize]).unwrap();
        let u = S3Uri::new("lake", "big/part.parquet");
        let m = s
            .put_file(&u, &src, PutCondition::None, BTreeMap::new())
            .await
            .unwrap();
        assert_eq!(m.size, CONTENT_ETAG_MAX + 1);
        assert_eq!(s.head(&u).await.unwrap().unwrap().etag, m.etag);
        let (_, mut reader) = s.get_reader(&u).await.unwrap();
        let mut n = Vec::new();
        reader.read_to_end(&mut n).await.unwrap();
        assert_eq!(n.len() as u64, CONTENT_ETAG_MAX + 1);
        let keys: Vec<String> = s
            .list("lake", "")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, ["big/part.parquet"]);
        let _ = std::fs::remove_dir_all(&r);
    }

    #[tokio::test]
    async fn keys_cannot_escape_the_root() {
        let s = DirStore::one_bucket(root("esc"));
        assert!(s.path_of(&S3Uri::new("b", "../x")).is_err());
        assert!(s.path_of(&S3Uri::new("b", "/etc/passwd")).is_err());
        let s = DirStore::per_bucket(root("esc2"));
        assert!(s.path_of(&S3Uri::new("..", "x")).is_err());
    }
}
