//! An [`ObjectStore`] over a local folder, for backfills from local files
//! (`currents-normalize run-file`): every key is a path under the root and the bucket is
//! ignored, so `--out /data/lake` receives `tables/…`, `quarantine/…` and `reports/…`
//! exactly as the bucket would. Writes go to a temporary file first and are renamed into
//! place, so a reader never sees half a part.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;
use bridge_shared::object_store::{ObjectMeta, ObjectReader};
use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;

/// A folder acting as a bucket.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
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

fn etag(body: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(body))
}

impl LocalStore {
    /// A store rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The file a key maps to; keys that would leave the root are refused.
    pub fn path_of(&self, uri: &S3Uri) -> Result<PathBuf, StoreError> {
        let rel = Path::new(&uri.key);
        if uri.key.is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(StoreError::Other {
                op: "resolve",
                uri: uri.clone(),
                message: "key is empty or leaves the output folder".into(),
                retryable: false,
            });
        }
        Ok(self.root.join(rel))
    }

    fn meta(&self, uri: &S3Uri, body: &[u8]) -> ObjectMeta {
        ObjectMeta {
            key: uri.key.clone(),
            etag: etag(body),
            size: body.len() as u64,
            ..ObjectMeta::default()
        }
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn get(&self, uri: &S3Uri) -> Result<(ObjectMeta, Bytes), StoreError> {
        let path = self.path_of(uri)?;
        let body = std::fs::read(&path).map_err(|e| io_err("read", uri, e))?;
        Ok((self.meta(uri, &body), Bytes::from(body)))
    }

    async fn get_reader(&self, uri: &S3Uri) -> Result<(ObjectMeta, ObjectReader), StoreError> {
        let (meta, body) = self.get(uri).await?;
        Ok((meta, Box::pin(std::io::Cursor::new(body))))
    }

    async fn head(&self, uri: &S3Uri) -> Result<Option<ObjectMeta>, StoreError> {
        match self.get(uri).await {
            Ok((meta, _)) => Ok(Some(meta)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let Ok(rel) = p.strip_prefix(&self.root) else {
                    continue;
                };
                let key = rel.to_string_lossy().replace('\\', "/");
                if key.starts_with(prefix) && !key.contains(".tmp-") {
                    let size = e.metadata().map(|m| m.len()).unwrap_or_default();
                    out.push(ObjectMeta {
                        key,
                        size,
                        ..ObjectMeta::default()
                    });
                }
            }
        }
        let _ = bucket;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn put(
        &self,
        uri: &S3Uri,
        body: Bytes,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        let path = self.path_of(uri)?;
        let current = std::fs::read(&path).ok();
        if !condition.allows(current.as_deref().map(etag).as_deref()) {
            return Err(StoreError::PreconditionFailed { uri: uri.clone() });
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_err("mkdir", uri, e))?;
        }
        let tmp = path.with_file_name(format!(
            ".tmp-{}-{}",
            std::process::id(),
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        std::fs::write(&tmp, &body).map_err(|e| io_err("write", uri, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_err("rename", uri, e))?;
        let mut meta = self.meta(uri, &body);
        meta.metadata = metadata;
        Ok(meta)
    }

    async fn put_file(
        &self,
        uri: &S3Uri,
        file: &Path,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        if condition != PutCondition::None {
            let body = std::fs::read(file).map_err(|e| io_err("read", uri, e))?;
            return self.put(uri, Bytes::from(body), condition, metadata).await;
        }
        // Unconditional: copied file to file, never held in memory (compacted parts are large).
        let path = self.path_of(uri)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_err("mkdir", uri, e))?;
        }
        let tmp = path.with_file_name(format!(
            ".tmp-{}-{}",
            std::process::id(),
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let size = std::fs::copy(file, &tmp).map_err(|e| io_err("write", uri, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_err("rename", uri, e))?;
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut f = std::fs::File::open(&path).map_err(|e| io_err("read", uri, e))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            use std::io::Read;
            let n = f.read(&mut buf).map_err(|e| io_err("read", uri, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(ObjectMeta {
            key: uri.key.clone(),
            etag: format!("{:016x}", hasher.digest()),
            size,
            metadata,
            ..ObjectMeta::default()
        })
    }

    async fn copy(&self, from: &S3Uri, to: &S3Uri) -> Result<(), StoreError> {
        let (_, body) = self.get(from).await?;
        self.put(to, body, PutCondition::None, BTreeMap::new())
            .await?;
        Ok(())
    }

    async fn delete(&self, uri: &S3Uri) -> Result<(), StoreError> {
        let path = self.path_of(uri)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("delete", uri, e)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn root(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "currents-local-store-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[tokio::test]
    async fn put_get_list_round_trip_under_the_root() {
        let r = root("rt");
        let s = LocalStore::new(&r);
        let u = S3Uri::new("ignored", "tables/t/t_2026-01-01.parquet/part-1.parquet");
        s.put(
            &u,
            Bytes::from_static(b"x"),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
        assert_eq!(&s.get(&u).await.unwrap().1[..], b"x");
        let listed = s.list("any", "tables/").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].key, u.key);
        assert!(matches!(
            s.put(&u, Bytes::new(), PutCondition::IfAbsent, BTreeMap::new())
                .await,
            Err(StoreError::PreconditionFailed { .. })
        ));
        let _ = std::fs::remove_dir_all(&r);
    }

    #[tokio::test]
    async fn keys_cannot_escape_the_root() {
        let s = LocalStore::new(root("esc"));
        assert!(s.path_of(&S3Uri::new("b", "../x")).is_err());
        assert!(s.path_of(&S3Uri::new("b", "/etc/passwd")).is_err());
    }
}
