//! An object store over a local folder (`<root>/<bucket>/<key>`) with conditional puts, for
//! `sync-scale-bench`: the state, the exports and the reports cost disk, as S3 would, not the
//! measured process's memory. Metadata comes from the file system (size, modification time),
//! so a HEAD or LIST of a multi-GB export part reads nothing; small objects (heads, locks,
//! ledger entries) get an ETag from their content, so a conditional write sees every change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use bridge_shared::object_store::{ObjectMeta, ObjectReader, ObjectStore, PutCondition};
use bridge_shared::{S3Uri, StoreError};
use bytes::Bytes;

/// Objects up to this size get a content ETag (read whole); larger ones size and mtime.
const CONTENT_ETAG_MAX: u64 = 1 << 20;

pub struct DirStore {
    root: PathBuf,
    lock: Mutex<()>,
}

fn other(op: &'static str, uri: &S3Uri, e: impl std::fmt::Display) -> StoreError {
    StoreError::Other {
        op,
        uri: uri.clone(),
        message: e.to_string(),
        retryable: false,
    }
}

impl DirStore {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            lock: Mutex::new(()),
        }
    }

    fn path(&self, uri: &S3Uri) -> PathBuf {
        self.root.join(&uri.bucket).join(&uri.key)
    }

    /// The object's metadata from its file, `None` when it does not exist.
    fn stat(&self, uri: &S3Uri) -> Result<Option<ObjectMeta>, StoreError> {
        let path = self.path(uri);
        let md = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(other("HeadObject", uri, e)),
        };
        let modified: chrono::DateTime<chrono::Utc> = md
            .modified()
            .map_err(|e| other("HeadObject", uri, e))?
            .into();
        let etag = if md.len() <= CONTENT_ETAG_MAX {
            match std::fs::read(&path) {
                Ok(b) => format!("{:08x}-{}", crc32fast::hash(&b), b.len()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(other("HeadObject", uri, e)),
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
}

fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, base, out);
        } else if let Ok(rel) = p.strip_prefix(base) {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
}

#[async_trait]
impl ObjectStore for DirStore {
    async fn get(&self, uri: &S3Uri) -> Result<(ObjectMeta, Bytes), StoreError> {
        let meta = self
            .stat(uri)?
            .ok_or_else(|| StoreError::NotFound { uri: uri.clone() })?;
        let body = std::fs::read(self.path(uri)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound { uri: uri.clone() },
            _ => other("GetObject", uri, e),
        })?;
        Ok((meta, Bytes::from(body)))
    }

    async fn get_reader(&self, uri: &S3Uri) -> Result<(ObjectMeta, ObjectReader), StoreError> {
        let meta = self
            .stat(uri)?
            .ok_or_else(|| StoreError::NotFound { uri: uri.clone() })?;
        let f = tokio::fs::File::open(self.path(uri))
            .await
            .map_err(|_| StoreError::NotFound { uri: uri.clone() })?;
        Ok((meta, Box::pin(f)))
    }

    async fn head(&self, uri: &S3Uri) -> Result<Option<ObjectMeta>, StoreError> {
        self.stat(uri)
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let base = self.root.join(bucket);
        let mut keys = Vec::new();
        walk(&base, &base, &mut keys);
        keys.retain(|k| k.starts_with(prefix) && !k.ends_with(".tmp-put"));
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
        _metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = match condition {
            PutCondition::None => None,
            _ => self.stat(uri)?.map(|m| m.etag),
        };
        if !condition.allows(current.as_deref()) {
            return Err(StoreError::PreconditionFailed { uri: uri.clone() });
        }
        let path = self.path(uri);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| other("PutObject", uri, e))?;
        }
        let tmp = path.with_extension("tmp-put");
        std::fs::write(&tmp, &body).map_err(|e| other("PutObject", uri, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| other("PutObject", uri, e))?;
        self.stat(uri)?
            .ok_or_else(|| other("PutObject", uri, "the object vanished after its write"))
    }

    async fn copy(&self, from: &S3Uri, to: &S3Uri) -> Result<(), StoreError> {
        let (_, body) = self.get(from).await?;
        self.put(to, body, PutCondition::None, BTreeMap::new())
            .await
            .map(|_| ())
    }

    async fn delete(&self, uri: &S3Uri) -> Result<(), StoreError> {
        let _ = std::fs::remove_file(self.path(uri));
        Ok(())
    }
}
