//! Quarantine: an object that cannot become table rows (not Avro, corrupt, truncated, bad sync
//! marker, absurd sizes, unsupported codec, a schema contradicting the registry, a key that
//! is not a Currents key, too large) is copied to `<QUARANTINE_PREFIX><source key>` with a
//! JSON reason at `<…>.reason.json`, and the invocation succeeds so the object is not retried
//! forever. Replaying it after a fix (e.g. a registry bump) is `currents-normalize run`.

use std::collections::BTreeMap;

use bridge_shared::s3_uri::join_key;
use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use serde::Serialize;

/// How the quarantined object's bytes are kept.
#[derive(Debug, Clone)]
pub enum Keep {
    /// Server-side copy from the source (S3).
    Copy,
    /// Upload these bytes (local runs, where the source is not in the store).
    Upload(Bytes),
    /// Only the reason, pointing at the source (the source is gone or unreadable).
    Pointer,
}

/// The reason object written beside a quarantined copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    /// Always `currents-normalize`.
    pub function: &'static str,
    /// `s3://bucket/key` of the source.
    pub source: String,
    /// Address of the copy, when one was made.
    pub copy: Option<String>,
    /// The step that failed: `key`, `size`, `decode`, `schema`, `registry`, `normalize`,
    /// `encode`, `read`.
    pub step: String,
    /// What failed, with where.
    pub reason: String,
    /// When, RFC 3339.
    pub quarantined_at: String,
}

/// The quarantine keys for a source key: the copy and its reason.
pub fn keys(quarantine_prefix: &str, source_key: &str) -> (String, String) {
    let copy = join_key(quarantine_prefix, source_key);
    let reason = format!("{copy}.reason.json");
    (copy, reason)
}

/// Quarantines `source` into `bucket`; returns the reason object's address.
pub async fn quarantine(
    store: &dyn ObjectStore,
    bucket: &str,
    quarantine_prefix: &str,
    source: &S3Uri,
    keep: Keep,
    step: &str,
    reason: &str,
) -> Result<S3Uri, StoreError> {
    let (copy_key, reason_key) = keys(quarantine_prefix, &source.key);
    let copy_uri = S3Uri::new(bucket, copy_key);
    let copied = match keep {
        Keep::Copy => match store.copy(source, &copy_uri).await {
            Ok(()) => true,
            // The source vanished: keep the reason as a pointer.
            Err(StoreError::NotFound { .. }) => false,
            Err(e) => return Err(e),
        },
        Keep::Upload(body) => {
            store
                .put(&copy_uri, body, PutCondition::None, BTreeMap::new())
                .await?;
            true
        }
        Keep::Pointer => false,
    };
    let doc = Reason {
        function: "currents-normalize",
        source: source.to_string(),
        copy: copied.then(|| copy_uri.to_string()),
        step: step.to_string(),
        reason: reason.to_string(),
        quarantined_at: chrono::Utc::now().to_rfc3339(),
    };
    let body = serde_json::to_vec_pretty(&doc).unwrap_or_default();
    let reason_uri = S3Uri::new(bucket, reason_key);
    store
        .put(
            &reason_uri,
            Bytes::from(body),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await?;
    Ok(reason_uri)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use bridge_shared::object_store::MemoryStore;

    #[tokio::test]
    async fn copy_and_reason_land_under_the_prefix() {
        let store = MemoryStore::new();
        let src = S3Uri::new("b", "currents/event_type=a/f.avro");
        store
            .put(
                &src,
                Bytes::from_static(b"junk"),
                PutCondition::None,
                BTreeMap::new(),
            )
            .await
            .unwrap();
        let r = quarantine(
            &store,
            "b",
            "quarantine/",
            &src,
            Keep::Copy,
            "decode",
            "not Avro",
        )
        .await
        .unwrap();
        assert_eq!(r.key, "quarantine/currents/event_type=a/f.avro.reason.json");
        let (_, copy) = store
            .get(&S3Uri::new("b", "quarantine/currents/event_type=a/f.avro"))
            .await
            .unwrap();
        assert_eq!(&copy[..], b"junk");
        let (_, reason) = store.get(&r).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&reason).unwrap();
        assert_eq!(v["step"], "decode");
        assert_eq!(v["source"], "s3://b/currents/event_type=a/f.avro");
    }

    #[tokio::test]
    async fn vanished_source_leaves_a_pointer() {
        let store = MemoryStore::new();
        let src = S3Uri::new("b", "currents/gone.avro");
        let r = quarantine(&store, "b", "quarantine/", &src, Keep::Copy, "read", "gone")
            .await
            .unwrap();
        let (_, reason) = store.get(&r).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&reason).unwrap();
        assert!(v["copy"].is_null());
    }
}
