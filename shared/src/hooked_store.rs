//! A store that runs a test's [`Hook`] around every call to an inner store: the one place tests
//! script a bad day (a refused write, a lost answer, another writer stepping in between two
//! calls) without writing out every [`ObjectStore`] method again.
//!
//! [`Hook::before`] runs before the call reaches the inner store and may answer it with an
//! error instead (nothing applied); [`Hook::after`] runs once the inner store answered (`ok`:
//! it applied the call) and may replace a successful answer with an error (applied, answer
//! lost). Both get the inner store, so a hook can also write as someone else would.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::object_store::{ObjectMeta, ObjectReader, ObjectStore, PutCondition, StoreError};
use crate::s3_uri::S3Uri;

/// One call a store is asked to make, as a [`Hook`] sees it.
#[derive(Debug, Clone, Copy)]
pub enum Call<'a> {
    /// GetObject of the whole object.
    Get(&'a S3Uri),
    /// GetObject, streamed.
    GetReader(&'a S3Uri),
    /// GetObject of the last bytes.
    GetTail(&'a S3Uri),
    /// HeadObject.
    Head(&'a S3Uri),
    /// A whole listing, or one page of it.
    List {
        /// The bucket.
        bucket: &'a str,
        /// The prefix listed.
        prefix: &'a str,
    },
    /// PutObject from memory.
    Put {
        /// The object written.
        uri: &'a S3Uri,
        /// Its new body.
        body: &'a Bytes,
        /// The write's condition.
        condition: &'a PutCondition,
    },
    /// PutObject from a local file.
    PutFile {
        /// The object written.
        uri: &'a S3Uri,
        /// The file.
        path: &'a Path,
    },
    /// CopyObject.
    Copy {
        /// The source.
        from: &'a S3Uri,
        /// The destination.
        to: &'a S3Uri,
    },
    /// DeleteObject.
    Delete(&'a S3Uri),
}

impl Call<'_> {
    /// The object the call reads or writes (a copy's destination); `None` for a listing.
    pub fn uri(&self) -> Option<&S3Uri> {
        match *self {
            Call::Get(u) | Call::GetReader(u) | Call::GetTail(u) | Call::Head(u) => Some(u),
            Call::Delete(u) | Call::Put { uri: u, .. } | Call::PutFile { uri: u, .. } => Some(u),
            Call::Copy { to, .. } => Some(to),
            Call::List { .. } => None,
        }
    }

    /// The object's key, or the listed prefix.
    pub fn key(&self) -> &str {
        match self {
            Call::List { prefix, .. } => prefix,
            other => other.uri().map_or("", |u| u.key.as_str()),
        }
    }

    /// Whether the call writes (put, copy or delete).
    pub fn writes(&self) -> bool {
        matches!(
            self,
            Call::Put { .. } | Call::PutFile { .. } | Call::Copy { .. } | Call::Delete { .. }
        )
    }

    /// The S3 operation's name, as [`StoreError`]s carry it.
    pub fn op(&self) -> &'static str {
        match self {
            Call::Get(_) | Call::GetReader(_) | Call::GetTail(_) => "GetObject",
            Call::Head(_) => "HeadObject",
            Call::List { .. } => "ListObjectsV2",
            Call::Put { .. } | Call::PutFile { .. } => "PutObject",
            Call::Copy { .. } => "CopyObject",
            Call::Delete(_) => "DeleteObject",
        }
    }

    /// A retryable failure of this call, as S3's throttling answers it.
    pub fn throttled(&self) -> StoreError {
        self.failed("503 SlowDown", true)
    }

    /// A failure of this call with `message`.
    pub fn failed(&self, message: &str, retryable: bool) -> StoreError {
        StoreError::Other {
            op: self.op(),
            uri: match self {
                Call::List { bucket, prefix } => S3Uri::new(*bucket, *prefix),
                other => other.uri().cloned().unwrap_or_else(|| S3Uri::new("", "")),
            },
            message: message.into(),
            retryable,
        }
    }
}

/// What a test does around each call (see the module).
#[async_trait]
pub trait Hook: Send + Sync {
    /// Before `call` reaches `store`; an error answers it and nothing is applied.
    async fn before(&self, _store: &dyn ObjectStore, _call: Call<'_>) -> Result<(), StoreError> {
        Ok(())
    }
    /// After `store` answered `call` (`ok`: it succeeded); an error replaces a successful
    /// answer (a failed one stays what it was).
    async fn after(
        &self,
        _store: &dyn ObjectStore,
        _call: Call<'_>,
        _ok: bool,
    ) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A [`Hook`] made of one synchronous function run before every call.
pub struct Before<F>(pub F);

#[async_trait]
impl<F> Hook for Before<F>
where
    F: Fn(Call<'_>) -> Result<(), StoreError> + Send + Sync,
{
    async fn before(&self, _store: &dyn ObjectStore, call: Call<'_>) -> Result<(), StoreError> {
        (self.0)(call)
    }
}

/// `inner` with `hook` run around every call.
pub struct Hooked<H> {
    inner: Arc<dyn ObjectStore>,
    hook: H,
}

impl<H: Hook> Hooked<H> {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, hook: H) -> Self {
        Self { inner, hook }
    }

    /// The hook (to read what it recorded).
    pub fn hook(&self) -> &H {
        &self.hook
    }

    async fn run<T>(
        &self,
        call: Call<'_>,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.hook.before(self.inner.as_ref(), call).await?;
        let out = f.await;
        let hooked = self
            .hook
            .after(self.inner.as_ref(), call, out.is_ok())
            .await;
        let out = out?;
        hooked.map(|()| out)
    }
}

#[async_trait]
impl<H: Hook> ObjectStore for Hooked<H> {
    async fn get(&self, uri: &S3Uri) -> Result<(ObjectMeta, Bytes), StoreError> {
        self.run(Call::Get(uri), self.inner.get(uri)).await
    }
    async fn get_reader(&self, uri: &S3Uri) -> Result<(ObjectMeta, ObjectReader), StoreError> {
        self.run(Call::GetReader(uri), self.inner.get_reader(uri))
            .await
    }
    async fn get_tail(&self, uri: &S3Uri, n: u64) -> Result<Bytes, StoreError> {
        self.run(Call::GetTail(uri), self.inner.get_tail(uri, n))
            .await
    }
    async fn head(&self, uri: &S3Uri) -> Result<Option<ObjectMeta>, StoreError> {
        self.run(Call::Head(uri), self.inner.head(uri)).await
    }
    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let call = Call::List { bucket, prefix };
        self.run(call, self.inner.list(bucket, prefix)).await
    }
    async fn list_page(
        &self,
        bucket: &str,
        prefix: &str,
        start_after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ObjectMeta>, StoreError> {
        let call = Call::List { bucket, prefix };
        let page = self.inner.list_page(bucket, prefix, start_after, max);
        self.run(call, page).await
    }
    async fn put(
        &self,
        uri: &S3Uri,
        body: Bytes,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        let call = Call::Put {
            uri,
            body: &body,
            condition: &condition,
        };
        let write = self
            .inner
            .put(uri, body.clone(), condition.clone(), metadata);
        self.run(call, write).await
    }
    async fn put_file(
        &self,
        uri: &S3Uri,
        path: &Path,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        let write = self.inner.put_file(uri, path, condition, metadata);
        self.run(Call::PutFile { uri, path }, write).await
    }
    async fn copy(&self, from: &S3Uri, to: &S3Uri) -> Result<(), StoreError> {
        self.run(Call::Copy { from, to }, self.inner.copy(from, to))
            .await
    }
    async fn delete(&self, uri: &S3Uri) -> Result<(), StoreError> {
        self.run(Call::Delete(uri), self.inner.delete(uri)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object_store::MemoryStore;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

    /// Refuses puts under `refused/`; loses the answer of the first put under `lost/`.
    struct Script(AtomicBool);

    #[async_trait]
    impl Hook for Script {
        async fn before(&self, _: &dyn ObjectStore, call: Call<'_>) -> Result<(), StoreError> {
            match call {
                Call::Put { uri, .. } if uri.key.starts_with("refused/") => Err(call.throttled()),
                _ => Ok(()),
            }
        }
        async fn after(
            &self,
            _: &dyn ObjectStore,
            call: Call<'_>,
            ok: bool,
        ) -> Result<(), StoreError> {
            if ok && call.key().starts_with("lost/") && call.writes() && !self.0.swap(true, SeqCst)
            {
                return Err(call.failed("timeout", true));
            }
            Ok(())
        }
    }

    async fn put(store: &dyn ObjectStore, key: &str) -> Result<ObjectMeta, StoreError> {
        let body = Bytes::from_static(b"x");
        let uri = S3Uri::new("b", key);
        store
            .put(&uri, body, PutCondition::None, BTreeMap::new())
            .await
    }

    #[tokio::test]
    async fn a_refused_call_applies_nothing_and_a_lost_answer_applies() {
        let mem = Arc::new(MemoryStore::new());
        let store = Hooked::new(mem.clone(), Script(AtomicBool::new(false)));
        let refused = put(&store, "refused/a").await.unwrap_err();
        assert!(refused.is_retryable(), "{refused}");
        assert!(
            mem.head(&S3Uri::new("b", "refused/a"))
                .await
                .unwrap()
                .is_none()
        );
        assert!(put(&store, "lost/a").await.is_err());
        assert!(
            mem.head(&S3Uri::new("b", "lost/a"))
                .await
                .unwrap()
                .is_some()
        );
        put(&store, "lost/b").await.unwrap();
        let listed = store.list("b", "lost/").await.unwrap();
        assert_eq!(listed.len(), 2);
    }

    #[tokio::test]
    async fn a_before_function_sees_every_call() {
        let store = Hooked::new(
            Arc::new(MemoryStore::new()),
            Before(|call: Call<'_>| match call {
                Call::Head(_) => Err(call.failed("403 Forbidden", false)),
                _ => Ok(()),
            }),
        );
        let e = store.head(&S3Uri::new("b", "k")).await.unwrap_err();
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("403"), "{e}");
        assert!(store.get(&S3Uri::new("b", "k")).await.is_err(), "absent");
    }
}
