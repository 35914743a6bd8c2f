//! Where a route's confirmed state lives in S3, under `<STATE_PREFIX><route>/`:
//!
//! - `head.json` — the pointer: which base shards and checkpoint segments make the state, the
//!   watermark of the newest export applied, and the ids of recent exports. Replaced only
//!   with `If-Match: <etag>` (created with `If-None-Match: *`), so two writers can never both
//!   win; the loser gets [`StateError::Conflict`] and must re-read and retry.
//! - `snap-<generation>-<nonce>-<n>.bin` — immutable base shards (format in
//!   [`crate::snapshot`]).
//! - `seg-<generation>-<seq>-<nonce>.bin` — immutable checkpoint segments: confirmed
//!   `(user, attribute, fingerprint)` changes, written every few seconds during a run so a
//!   crash loses no confirmed progress.
//!
//! Loading is base + segments in order. [`StateStore::commit`] (end of a run) folds the run's
//! segments into a new base and clears them. Nothing but [`StateStore::checkpoint`] and
//! [`StateStore::commit`] ever moves the state, and both take only confirmed deltas.

use std::collections::BTreeMap;
use std::sync::Arc;

use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Snapshot, SnapshotError, encode_segment};
use crate::model::UserDelta;
use crate::route::Route;

/// Head format version.
pub const HEAD_FORMAT: u32 = 1;
/// Target size of one base shard.
pub const SHARD_BYTES: usize = 64 * 1024 * 1024;
/// How many recent export ids the head remembers.
pub const APPLIED_EXPORTS_KEPT: usize = 100;

/// The newest export applied to the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    /// The export's id (`s3://bucket/key#etag-or-version`).
    pub export_id: String,
    /// Its object's last-modified time, RFC 3339 (orders exports of a route).
    pub exported_at: Option<String>,
}

/// `head.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HeadDoc {
    /// Head format version.
    pub format: u32,
    /// Route name.
    pub route: String,
    /// Incremented by each commit.
    pub generation: u64,
    /// Base shard object names (relative to the route's state folder), in key order.
    pub base: Vec<String>,
    /// Users in the base.
    pub users: u64,
    /// Checkpoint segments applied on top of the base, in order.
    pub segments: Vec<String>,
    /// The newest export applied.
    pub watermark: Option<Watermark>,
    /// Ids of recently applied exports, oldest first.
    pub applied_exports: Vec<String>,
    /// When the head was written (RFC 3339).
    pub updated_at: String,
}

/// The head as read, with what is needed to replace it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The document.
    pub doc: HeadDoc,
    /// Its ETag; `None` when no head exists yet.
    pub etag: Option<String>,
    /// Segments already folded into the snapshot returned by [`StateStore::load`].
    pub loaded_segments: usize,
}

fn instant(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

impl Head {
    /// True when an export last-modified at `exported_at` is older than the one the state
    /// came from: it must be skipped and reported, never applied over newer data.
    pub fn is_stale(&self, exported_at: Option<&str>) -> bool {
        let (Some(new), Some(old)) = (
            exported_at,
            self.doc
                .watermark
                .as_ref()
                .and_then(|w| w.exported_at.as_deref()),
        ) else {
            return false;
        };
        match (instant(new), instant(old)) {
            (Some(a), Some(b)) => a < b,
            _ => new < old,
        }
    }

    /// True when this export id was applied by a recent commit.
    pub fn was_applied(&self, export_id: &str) -> bool {
        self.doc.applied_exports.iter().any(|e| e == export_id)
    }
}

/// What a commit wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitStats {
    /// Users in the new base.
    pub users: u64,
    /// Bytes of the new base.
    pub bytes: u64,
    /// Shards written.
    pub shards: usize,
    /// Segments folded in.
    pub segments_folded: usize,
}

/// Why state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The store failed.
    #[error("state: {0}")]
    Store(#[from] StoreError),
    /// Another writer replaced the head first: re-read the state and retry.
    #[error("state {uri}: another run changed the state first; re-read it and retry")]
    Conflict {
        /// The head.
        uri: S3Uri,
    },
    /// A state object does not decode.
    #[error("state: {0}")]
    Corrupt(#[from] SnapshotError),
    /// `head.json` does not parse.
    #[error("state {uri}: head is not valid: {reason}")]
    BadHead {
        /// The head.
        uri: S3Uri,
        /// Why.
        reason: String,
    },
}

impl StateError {
    /// Whether trying again (after re-reading the state) can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StateError::Store(e) => e.is_retryable(),
            StateError::Conflict { .. } => true,
            StateError::Corrupt(_) | StateError::BadHead { .. } => false,
        }
    }
}

/// The state of one route in an object store.
#[derive(Clone)]
pub struct StateStore {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    folder: String,
    route: String,
}

fn nonce() -> String {
    format!("{:08x}", rand::random::<u32>())
}

impl StateStore {
    /// The state of `route` under `s3://<bucket>/<state_prefix><route>/`.
    pub fn new(store: Arc<dyn ObjectStore>, bucket: &str, state_prefix: &str, route: &str) -> Self {
        let mut prefix = state_prefix.to_string();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self {
            store,
            bucket: bucket.to_string(),
            folder: format!("{prefix}{route}/"),
            route: route.to_string(),
        }
    }

    fn uri(&self, name: &str) -> S3Uri {
        S3Uri::new(&self.bucket, format!("{}{name}", self.folder))
    }

    /// The head's address.
    pub fn head_uri(&self) -> S3Uri {
        self.uri("head.json")
    }

    /// Reads the head (an empty one when the route has no state yet).
    pub async fn read_head(&self) -> Result<Head, StateError> {
        let uri = self.head_uri();
        match self.store.get(&uri).await {
            Ok((meta, bytes)) => {
                let doc: HeadDoc =
                    serde_json::from_slice(&bytes).map_err(|e| StateError::BadHead {
                        uri: uri.clone(),
                        reason: e.to_string(),
                    })?;
                if doc.format != HEAD_FORMAT {
                    return Err(StateError::BadHead {
                        uri,
                        reason: format!("head format {} is not {HEAD_FORMAT}", doc.format),
                    });
                }
                Ok(Head {
                    doc,
                    etag: Some(meta.etag),
                    loaded_segments: 0,
                })
            }
            Err(StoreError::NotFound { .. }) => Ok(Head {
                doc: HeadDoc {
                    format: HEAD_FORMAT,
                    route: self.route.clone(),
                    ..HeadDoc::default()
                },
                etag: None,
                loaded_segments: 0,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Loads the head and the snapshot it points to (base + segments), laid out for `route`.
    pub async fn load(&self, route: &Route) -> Result<(Head, Snapshot), StateError> {
        let mut head = self.read_head().await?;
        let mut snap = Snapshot::for_route(route);
        for name in &head.doc.base {
            let uri = self.uri(name);
            let (_, bytes) = self.store.get(&uri).await?;
            snap.load_base_shard(&bytes, &uri.to_string())?;
        }
        for name in &head.doc.segments {
            let uri = self.uri(name);
            let (_, bytes) = self.store.get(&uri).await?;
            snap.apply_segment(&bytes, &uri.to_string())?;
        }
        snap.compact();
        head.loaded_segments = head.doc.segments.len();
        Ok((head, snap))
    }

    async fn put_head(&self, head: &mut Head, doc: HeadDoc) -> Result<(), StateError> {
        let uri = self.head_uri();
        let body = serde_json::to_vec_pretty(&doc).map_err(|e| StateError::BadHead {
            uri: uri.clone(),
            reason: e.to_string(),
        })?;
        let cond = match &head.etag {
            Some(e) => PutCondition::IfMatch(e.clone()),
            None => PutCondition::IfAbsent,
        };
        match self
            .store
            .put(&uri, Bytes::from(body), cond, BTreeMap::new())
            .await
        {
            Ok(meta) => {
                head.etag = Some(meta.etag);
                head.doc = doc;
                Ok(())
            }
            Err(StoreError::PreconditionFailed { .. }) => Err(StateError::Conflict { uri }),
            Err(e) => Err(e.into()),
        }
    }

    /// Persists confirmed deltas as one segment and appends it to the head. Call it every few
    /// seconds with what Braze confirmed since the last call; an empty slice is a no-op.
    pub async fn checkpoint(
        &self,
        head: &mut Head,
        route: &Route,
        confirmed: &[UserDelta],
    ) -> Result<(), StateError> {
        if confirmed.iter().all(|d| d.changes.is_empty()) {
            return Ok(());
        }
        let name = format!(
            "seg-{:08}-{:06}-{}.bin",
            head.doc.generation,
            head.doc.segments.len(),
            nonce()
        );
        let uri = self.uri(&name);
        let body = encode_segment(&route.slot_names(), confirmed, route.tracks_departures());
        self.store
            .put(
                &uri,
                Bytes::from(body),
                PutCondition::IfAbsent,
                BTreeMap::new(),
            )
            .await?;
        let mut doc = head.doc.clone();
        doc.segments.push(name);
        doc.updated_at = chrono::Utc::now().to_rfc3339();
        if let Err(e) = self.put_head(head, doc).await {
            let _ = self.store.delete(&uri).await;
            return Err(e);
        }
        Ok(())
    }

    /// Ends a run: folds the segments written since [`StateStore::load`] into `snapshot`,
    /// writes a new base, and points the head at it with the export's watermark. Old objects
    /// are deleted afterwards (best effort).
    pub async fn commit(
        &self,
        head: &mut Head,
        mut snapshot: Snapshot,
        export: Option<Watermark>,
    ) -> Result<CommitStats, StateError> {
        let new_segments: Vec<String> =
            head.doc.segments[head.loaded_segments.min(head.doc.segments.len())..].to_vec();
        for name in &new_segments {
            let uri = self.uri(name);
            let (_, bytes) = self.store.get(&uri).await?;
            snapshot.apply_segment(&bytes, &uri.to_string())?;
        }
        snapshot.compact();
        let generation = head.doc.generation + 1;
        let n = nonce();
        let mut written = Vec::new();
        let mut bytes_total = 0u64;
        for (i, shard) in snapshot.base_shards(SHARD_BYTES).enumerate() {
            let name = format!("snap-{generation:08}-{n}-{i:04}.bin");
            bytes_total += shard.len() as u64;
            let uri = self.uri(&name);
            if let Err(e) = self
                .store
                .put(
                    &uri,
                    Bytes::from(shard),
                    PutCondition::IfAbsent,
                    BTreeMap::new(),
                )
                .await
            {
                self.delete_all(&written).await;
                return Err(e.into());
            }
            written.push(name);
        }
        let old: Vec<String> = head
            .doc
            .base
            .iter()
            .chain(head.doc.segments.iter())
            .cloned()
            .collect();
        let mut doc = head.doc.clone();
        doc.generation = generation;
        doc.base = written.clone();
        doc.users = snapshot.len() as u64;
        doc.segments.clear();
        if let Some(w) = export {
            doc.applied_exports.retain(|e| *e != w.export_id);
            doc.applied_exports.push(w.export_id.clone());
            let excess = doc
                .applied_exports
                .len()
                .saturating_sub(APPLIED_EXPORTS_KEPT);
            doc.applied_exports.drain(..excess);
            let newer = !head.is_stale(w.exported_at.as_deref());
            if newer {
                doc.watermark = Some(w);
            }
        }
        doc.updated_at = chrono::Utc::now().to_rfc3339();
        if let Err(e) = self.put_head(head, doc).await {
            self.delete_all(&written).await;
            return Err(e);
        }
        head.loaded_segments = 0;
        self.delete_all(&old).await;
        Ok(CommitStats {
            users: snapshot.len() as u64,
            bytes: bytes_total,
            shards: written.len(),
            segments_folded: new_segments.len(),
        })
    }

    async fn delete_all(&self, names: &[String]) {
        for n in names {
            if let Err(e) = self.store.delete(&self.uri(n)).await {
                tracing::warn!(object = %self.uri(n), error = %e, "Could not delete an old state object.");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::{AttributeChange, Identifier, RowPos, fingerprint};
    use bridge_shared::object_store::MemoryStore;
    use serde_json::json;

    fn route() -> Route {
        Route::from_toml(
            "name = \"r\"\nprefix = \"p/\"\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\n[attributes.a]\ntype = \"Integer\"\n",
            "t",
        )
        .unwrap()
    }

    fn d(id: &str, v: i64) -> UserDelta {
        UserDelta {
            identifier: Identifier::ExternalId(id.into()),
            pos: RowPos::default(),
            changes: vec![AttributeChange {
                name: "a".into(),
                value: json!(v),
                fingerprint: Some(fingerprint(&json!(v))),
            }],
            update_existing_only: true,
            is_new: true,
        }
    }

    #[tokio::test]
    async fn checkpoints_survive_a_crash_and_commit_folds_them() {
        let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let st = StateStore::new(mem.clone(), "state", "bridge/state", "r");
        let r = route();
        let (mut head, snap) = st.load(&r).await.unwrap();
        assert!(snap.is_empty());
        st.checkpoint(&mut head, &r, &[d("1", 1), d("2", 2)])
            .await
            .unwrap();
        st.checkpoint(&mut head, &r, &[d("3", 3)]).await.unwrap();
        drop(snap);
        // "Crash": a new run loads base + segments.
        let (mut head2, snap2) = st.load(&r).await.unwrap();
        assert_eq!(snap2.len(), 3);
        assert_eq!(head2.loaded_segments, 2);
        let w = Watermark {
            export_id: "s3://b/k#e1".into(),
            exported_at: Some("2024-01-02T00:00:00Z".into()),
        };
        let stats = st.commit(&mut head2, snap2, Some(w)).await.unwrap();
        assert_eq!(stats.users, 3);
        let (head3, snap3) = st.load(&r).await.unwrap();
        assert!(head3.doc.segments.is_empty());
        assert_eq!(snap3.len(), 3);
        assert!(head3.was_applied("s3://b/k#e1"));
        assert!(head3.is_stale(Some("2024-01-01T23:59:59Z")));
        assert!(!head3.is_stale(Some("2024-01-02T00:00:01Z")));
        let listing = mem.list("state", "bridge/state/r/").await.unwrap();
        assert_eq!(
            listing.len(),
            2,
            "old segments were cleaned up: {listing:?}"
        );
    }

    #[tokio::test]
    async fn a_lost_race_is_a_typed_conflict() {
        let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let st = StateStore::new(mem, "state", "s/", "r");
        let r = route();
        let (mut a, _) = st.load(&r).await.unwrap();
        let (mut b, _) = st.load(&r).await.unwrap();
        st.checkpoint(&mut a, &r, &[d("1", 1)]).await.unwrap();
        let err = st.checkpoint(&mut b, &r, &[d("2", 2)]).await.unwrap_err();
        assert!(matches!(err, StateError::Conflict { .. }), "{err}");
        assert!(err.is_retryable());
    }
}
