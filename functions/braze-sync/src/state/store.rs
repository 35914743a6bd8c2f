//! Where a route's confirmed state lives in S3, under `<STATE_PREFIX><route>/`:
//!
//! - `head.json` — the pointer: the hash-range layout and, per range, its base shard and
//!   delta objects; the checkpoint segments of runs not yet folded; the watermark of the
//!   newest export applied, and the ids of recent exports. Replaced only with
//!   `If-Match: <etag>` (created with `If-None-Match: *`), so two writers can never both win;
//!   the loser gets [`StateError::Conflict`] and must re-read and retry.
//! - `base-<range>-<generation>-<nonce>.bin` — immutable base shard of one hash range: every
//!   user whose key's top `range_bits` bits equal the range number (format in
//!   [`crate::state::confirmed`]).
//! - `delta-<range>-<generation>-<nonce>.bin` — immutable changes to one range since its base
//!   (the segment format, restricted to the range's users), applied in order on top of it.
//! - `seg-<generation>-<seq>-<nonce>.bin` — immutable checkpoint segments: confirmed
//!   `(user, attribute, fingerprint)` changes, written every few seconds during a run so a
//!   crash loses no confirmed progress.
//!
//! # Incremental commits
//! [`StateStore::commit`] folds the segments into the ranges they touch and writes nothing
//! else: per touched range, either one delta object (the range's share of the changes) or,
//! when the range's deltas have grown past a quarter of its base, a new base for that range.
//! Untouched ranges keep their objects; the head (one conditional write) moves to the new
//! set. A commit without a watermark (a run handing over before its deadline, or one that
//! failed part-way) never rewrites an existing base: it only appends deltas.
//!
//! The number of ranges (`1 << range_bits`) follows the user count so a range holds about
//! [`RANGE_USERS`] users (about 35 MB in memory at 20 attributes); a complete commit that
//! finds ranges at more than twice that re-lays the state out once with twice as many.
//!
//! # Format-1 heads
//! Heads written before ranges existed (`"format": 1`, one list of byte-sized `snap-*`
//! shards, every commit rewrote the whole base) load as before; the first complete commit
//! rewrites them once into ranges and deletes the old objects. Nothing is resent. A commit
//! without a watermark leaves a format-1 head as it is (its segments stay until then).
//!
//! Nothing but [`StateStore::checkpoint`] and [`StateStore::commit`] ever moves the state,
//! and both take only confirmed deltas.

use std::collections::BTreeMap;
use std::sync::Arc;

use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::route::Route;
use crate::model::UserDelta;
use crate::state::confirmed::{SegmentData, Snapshot, SnapshotError, encode_segment};

/// Folder of a route's fan-out control objects, inside its state folder.
pub const CONTROL_FOLDER: &str = "_fan_out";

/// Head format version written.
pub const HEAD_FORMAT: u32 = 2;
/// The format before hash ranges (read, and rewritten by the next complete commit).
pub const LEGACY_HEAD_FORMAT: u32 = 1;
/// Target users per hash range.
pub const RANGE_USERS: u64 = 250_000;
/// At most `1 << MAX_RANGE_BITS` ranges.
pub const MAX_RANGE_BITS: u32 = 16;
/// Target size of one base shard (format 1; kept for the diff bench's size figures).
pub const SHARD_BYTES: usize = 64 * 1024 * 1024;
/// State objects uploaded at once by a commit.
pub const PUT_CONCURRENCY: usize = 8;
/// State objects fetched at once by a load.
pub const GET_CONCURRENCY: usize = 8;
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

/// One hash range's objects in the head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RangeDoc {
    /// Base shard object name (relative to the route's state folder); `None`: no users yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Users in the range (base and deltas).
    #[serde(default)]
    pub users: u64,
    /// Bytes of the base shard.
    #[serde(default)]
    pub bytes: u64,
    /// Delta objects applied on top of the base, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<String>,
    /// Bytes of the delta objects.
    #[serde(default)]
    pub delta_bytes: u64,
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
    /// The state has `1 << range_bits` hash ranges (when `ranges` is not empty).
    #[serde(default)]
    pub range_bits: u32,
    /// Per hash range, in key order (empty: no layout yet, or a format-1 head).
    #[serde(default)]
    pub ranges: Vec<RangeDoc>,
    /// Format 1 only: base shard object names, in key order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub base: Vec<String>,
    /// Users in the state at the last commit.
    pub users: u64,
    /// Checkpoint segments applied on top of the ranges, in order.
    pub segments: Vec<String>,
    /// The newest export applied.
    pub watermark: Option<Watermark>,
    /// Ids of recently applied exports, oldest first.
    pub applied_exports: Vec<String>,
    /// When the head was written (RFC 3339).
    pub updated_at: String,
    /// How far the Braze Currents profile-change feed is applied to this state
    /// ([`crate::state::profile_feed`]); `None`: never applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currents_feed: Option<FeedCursor>,
}

/// How far the profile-change feed is applied to a route's state: every feed object of a
/// delivery hour before `through` was applied (or is past the window), and of the objects of
/// `through` and later, those named in `applied`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FeedCursor {
    /// A delivery hour, `YYYY-MM-DD-HH`.
    pub through: String,
    /// Feed object keys (relative to the feed folder) of `through` and later already applied.
    #[serde(default)]
    pub applied: Vec<String>,
}

impl HeadDoc {
    /// Bytes of every base shard and delta object the head points to (segments aside).
    pub fn state_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.bytes + r.delta_bytes).sum()
    }
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

    #[cfg(any(test, feature = "test-util"))]
    /// True when this export id was applied by a recent commit.
    pub fn was_applied(&self, export_id: &str) -> bool {
        self.doc.applied_exports.iter().any(|e| e == export_id)
    }
}

/// What a commit wrote.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommitStats {
    /// Users in the state after the commit.
    pub users: u64,
    /// Bytes written by this commit (bases and deltas).
    pub bytes: u64,
    /// Base shards written.
    pub shards: usize,
    /// Delta objects written.
    pub deltas: usize,
    /// Hash ranges of the state.
    pub ranges: usize,
    /// Segments folded in.
    pub segments_folded: usize,
    /// Bytes of every object the new head points to.
    pub state_bytes: u64,
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
    /// The local spill of a ranged commit failed.
    #[error("state: {0}")]
    Spill(#[from] crate::state::spill::SpillError),
    /// `head.json` does not parse.
    #[error("state {uri}: head is not valid: {reason}")]
    BadHead {
        /// The head.
        uri: S3Uri,
        /// Why.
        reason: String,
    },
    /// The state cannot take this step as it is (a fork of a state without a range layout, a
    /// merge of forks with another layout or unfolded checkpoints, a format-1 head).
    #[error("state {uri}: {reason}")]
    Unusable {
        /// The head.
        uri: S3Uri,
        /// Why, and what to do first.
        reason: String,
    },
}

impl StateError {
    /// Whether trying again (after re-reading the state) can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StateError::Store(e) => e.is_retryable(),
            StateError::Conflict { .. } => true,
            StateError::Spill(e) => !matches!(e, crate::state::spill::SpillError::Full { .. }),
            StateError::Corrupt(_) | StateError::BadHead { .. } | StateError::Unusable { .. } => {
                false
            }
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
    range_users: u64,
    /// `head.json`, or `<fork>/head.json` for a fork.
    head_name: String,
    /// A fork's folder (`<fork>/`): its objects are written there and its commits delete
    /// nothing outside it.
    own: Option<String>,
}

fn nonce() -> String {
    format!("{:08x}", crate::clock::nonce())
}

/// Bytes of memory the snapshot of `doc` needs once loaded for `route` (an estimate: key,
/// fingerprints, lookup table, the run's "seen" bit, identifiers for routes that track
/// departures, plus a quarter for growth during the run).
pub fn memory_estimate(doc: &HeadDoc, route: &Route) -> u64 {
    let users = doc
        .users
        .max(doc.ranges.iter().map(|r| r.users).sum::<u64>());
    let per_user = 16
        + crate::state::confirmed::FP_BYTES as u64 * route.state_names().len() as u64
        + 2
        + if route.tracks_departures() { 40 } else { 0 };
    users.saturating_mul(per_user).saturating_mul(5) / 4
}

/// Hash ranges a ranged commit loads and writes at once (each holds one range's snapshot
/// and its encoded shard: about 2 × 35 MB at the default range size and 20 attributes).
pub const COMMIT_RANGES_AT_ONCE: usize = 2;

/// What one unit of a ranged commit wrote.
#[derive(Debug, Default)]
struct UnitOut {
    docs: Vec<(usize, RangeDoc)>,
    written: Vec<String>,
    old: Vec<String>,
    shards: usize,
    deltas: usize,
    bytes: u64,
}

fn read16(b: &[u8]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    a
}

fn corrupt_spill(dir: &std::path::Path, range: usize) -> StateError {
    StateError::Spill(crate::state::spill::SpillError::Corrupt {
        path: crate::state::spill::range_path(dir, range)
            .display()
            .to_string(),
        offset: 0,
    })
}

/// One range's upload: `(object name, users, bytes)`, `None` for an empty range.
type PutResult = Result<Option<(String, u64, u64)>, StoreError>;

/// The range bits that give ranges of at most `target` users for `users` users.
pub fn bits_for(users: u64, target: u64) -> u32 {
    let target = target.max(1);
    let mut bits = 0;
    while bits < MAX_RANGE_BITS && (target << bits) < users {
        bits += 1;
    }
    bits
}

/// Confirmed records spilled by hash range outside checkpoints, in the ranged commit's spill
/// format (`0`, key, slot, fingerprint; `1`, key, identifier): an adoption writes what it
/// records here while it diffs, then commits it with [`StateStore::commit_ranged_with`].
pub struct RecordSpill {
    part: crate::state::spill::Partitioner,
    dir: std::path::PathBuf,
    bits: u32,
    slots: std::collections::HashMap<String, u16>,
    keep_ids: bool,
    rec: Vec<u8>,
}

/// What a [`RecordSpill`] wrote.
#[derive(Debug, Clone)]
pub struct SpilledRecords {
    dir: std::path::PathBuf,
    bits: u32,
    sizes: Vec<u64>,
}

impl SpilledRecords {
    /// Bytes spilled.
    pub fn bytes(&self) -> u64 {
        self.sizes.iter().sum()
    }
}

/// The range bits an adoption spills its records in for a state of `state_bits` (finer than
/// any layout up to 256M users at the default range size, so the commit can lay out as it
/// would from checkpoints).
pub fn record_spill_bits(state_bits: u32) -> u32 {
    state_bits.clamp(10, MAX_RANGE_BITS)
}

impl RecordSpill {
    /// Spills into `dir` (created by the caller, empty) in `1 << bits` ranges, buffering about
    /// `buffer_budget` bytes, writing at most `limit` bytes, for `route`'s slot layout.
    pub fn new(
        dir: &std::path::Path,
        bits: u32,
        route: &Route,
        buffer_budget: usize,
        limit: Option<u64>,
    ) -> Self {
        Self {
            part: crate::state::spill::Partitioner::new(dir, bits, buffer_budget, limit),
            dir: dir.to_path_buf(),
            bits,
            slots: route
                .state_names()
                .into_iter()
                .enumerate()
                .map(|(i, n)| (n, i as u16))
                .collect(),
            keep_ids: route.tracks_departures(),
            rec: Vec::with_capacity(64),
        }
    }

    /// Records `delta` as confirmed (its changes of attributes in the route's layout, and its
    /// identifier when the route tracks departures).
    pub fn push(&mut self, delta: &UserDelta) -> Result<(), crate::state::spill::SpillError> {
        let key = delta.user_key().0;
        let r = crate::state::confirmed::range_of(key, self.bits);
        let fps = delta
            .changes
            .iter()
            .filter_map(|c| {
                let slot = *self.slots.get(c.name.as_str())?;
                Some((
                    slot,
                    c.fingerprint.map_or(0, crate::state::confirmed::stored_fp),
                ))
            })
            .chain(self.slots.get(crate::vocab::ROW_DIGEST).map(|s| {
                (
                    *s,
                    delta
                        .row_digest
                        .map_or(0, crate::state::confirmed::stored_digest),
                )
            }));
        for (slot, fp) in fps {
            self.rec.clear();
            self.rec.push(0);
            self.rec.extend_from_slice(&key.to_le_bytes());
            self.rec.extend_from_slice(&slot.to_le_bytes());
            self.rec.extend_from_slice(&fp.to_le_bytes());
            self.part.push(r, &self.rec)?;
        }
        if self.keep_ids && !delta.changes.is_empty() {
            self.rec.clear();
            self.rec.push(1);
            self.rec.extend_from_slice(&key.to_le_bytes());
            self.rec.extend_from_slice(
                crate::state::confirmed::identifier_text(&delta.identifier).as_bytes(),
            );
            self.part.push(r, &self.rec)?;
        }
        Ok(())
    }

    /// Flushes the spill.
    pub fn finish(self) -> Result<SpilledRecords, crate::state::spill::SpillError> {
        Ok(SpilledRecords {
            sizes: self.part.finish()?,
            dir: self.dir,
            bits: self.bits,
        })
    }
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
            range_users: RANGE_USERS,
            head_name: "head.json".into(),
            own: None,
        }
    }

    /// A fork of this route's state (fan-out pieces): the same route folder, but its head is
    /// `<route folder><name>/head.json` and the objects it writes are named `<name>/...`
    /// (relative to the route folder, so the route head can take them over by merging, see
    /// [`StateStore::merge_forks`]). A fork's commits never delete an object outside
    /// `<name>/` (the route head still points to the bases and deltas the fork inherited),
    /// never rebase a range whose objects it inherited (it appends deltas instead, so a
    /// merge leaves nothing unreferenced behind), and never change `range_bits` (no first
    /// layout, no re-layout: [`StateStore::ensure_layout`] comes first). Create its head with
    /// [`StateStore::create_fork`].
    pub fn fork(&self, name: &str) -> StateStore {
        let name = name.trim_matches('/');
        let name = if name.is_empty() { "_fork" } else { name };
        let mut f = self.clone();
        f.head_name = format!("{name}/head.json");
        f.own = Some(format!("{name}/"));
        f
    }

    /// True for a view made by [`StateStore::fork`].
    pub fn is_fork(&self) -> bool {
        self.own.is_some()
    }

    /// The name of a new object this store writes (inside the fork's folder for a fork).
    fn named(&self, name: String) -> String {
        match &self.own {
            Some(p) => format!("{p}{name}"),
            None => name,
        }
    }

    /// Whether this store wrote `name` and may delete it (always, for the route itself).
    fn owns(&self, name: &str) -> bool {
        self.own
            .as_ref()
            .is_none_or(|p| name.starts_with(p.as_str()))
    }

    /// Whether a commit may replace range `r`'s objects by a new base: always for the route,
    /// only when it wrote all of them for a fork.
    fn may_rebase(&self, r: &RangeDoc) -> bool {
        r.base.iter().chain(r.deltas.iter()).all(|n| self.owns(n))
    }

    fn unusable(&self, reason: impl Into<String>) -> StateError {
        StateError::Unusable {
            uri: self.head_uri(),
            reason: reason.into(),
        }
    }

    /// Sets the target users per hash range (tests use small ranges).
    pub fn with_range_users(mut self, users: u64) -> Self {
        self.range_users = users.max(1);
        self
    }

    fn uri(&self, name: &str) -> S3Uri {
        S3Uri::new(&self.bucket, format!("{}{name}", self.folder))
    }

    /// The head's address.
    pub fn head_uri(&self) -> S3Uri {
        self.uri(&self.head_name)
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
                if doc.format != HEAD_FORMAT && doc.format != LEGACY_HEAD_FORMAT {
                    return Err(StateError::BadHead {
                        uri,
                        reason: format!(
                            "head format {} is not {LEGACY_HEAD_FORMAT} or {HEAD_FORMAT}",
                            doc.format
                        ),
                    });
                }
                if !doc.ranges.is_empty()
                    && (doc.range_bits > MAX_RANGE_BITS
                        || doc.ranges.len() != 1usize << doc.range_bits)
                {
                    return Err(StateError::BadHead {
                        uri,
                        reason: format!(
                            "{} ranges do not match range_bits {}",
                            doc.ranges.len(),
                            doc.range_bits
                        ),
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

    async fn get(&self, name: &str) -> Result<(Bytes, String), StateError> {
        let uri = self.uri(name);
        let (_, bytes) = self.store.get(&uri).await?;
        Ok((bytes, uri.to_string()))
    }

    /// Fetches objects concurrently; results in the order asked.
    async fn get_all(&self, names: &[String]) -> Result<Vec<(Bytes, String)>, StateError> {
        let futs: Vec<_> = names
            .iter()
            .map(|n| {
                let this = self.clone();
                let n = n.clone();
                async move { this.get(&n).await }
            })
            .collect();
        futures::future::try_join_all(futs).await
    }

    /// Loads the head and the snapshot it points to (ranges, then segments), laid out for
    /// `route`.
    pub async fn load(&self, route: &Route) -> Result<(Head, Snapshot), StateError> {
        let mut head = self.read_head().await?;
        let mut snap = Snapshot::for_route(route);
        // Fetched GET_CONCURRENCY at a time, applied in key order.
        let bases: Vec<String> = head
            .doc
            .base
            .iter()
            .chain(head.doc.ranges.iter().filter_map(|r| r.base.as_ref()))
            .cloned()
            .collect();
        for chunk in bases.chunks(GET_CONCURRENCY) {
            for (bytes, what) in self.get_all(chunk).await? {
                snap.load_base_shard(&bytes, &what)?;
            }
        }
        let deltas: Vec<String> = head
            .doc
            .ranges
            .iter()
            .flat_map(|r| r.deltas.iter().cloned())
            .collect();
        for chunk in deltas.chunks(GET_CONCURRENCY) {
            for (bytes, what) in self.get_all(chunk).await? {
                snap.apply_segment(&bytes, &what)?;
            }
        }
        for name in &head.doc.segments {
            let (bytes, what) = self.get(name).await?;
            snap.apply_segment(&bytes, &what)?;
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
        let failed = match self
            .store
            .put(&uri, Bytes::from(body), cond, BTreeMap::new())
            .await
        {
            Ok(meta) => {
                head.etag = Some(meta.etag);
                head.doc = doc;
                return Ok(());
            }
            Err(StoreError::PreconditionFailed { .. }) => StateError::Conflict { uri },
            Err(e) => e.into(),
        };
        // A timeout can hide a write that landed (and a retry of it then meets 412): the head
        // as it is now decides. When it is this very document, the write happened.
        if let Ok(now) = self.read_head().await
            && now.doc == doc
        {
            head.etag = now.etag;
            head.doc = doc;
            return Ok(());
        }
        Err(failed)
    }

    /// Every object a head document names (bases, range deltas, checkpoint segments).
    fn named_by(doc: &HeadDoc) -> std::collections::BTreeSet<&str> {
        doc.base
            .iter()
            .chain(doc.segments.iter())
            .chain(
                doc.ranges
                    .iter()
                    .flat_map(|r| r.base.iter().chain(r.deltas.iter())),
            )
            .map(String::as_str)
            .collect()
    }

    /// After a head write that failed, deletes what it wrote, except anything the head names
    /// as it is read now (the write may have landed, its answer lost, and another run built on
    /// it). When the head cannot be read, nothing is deleted: an unreferenced object is only
    /// garbage, a missing one breaks every later load.
    async fn delete_unnamed(&self, written: &[String]) {
        let Ok(now) = self.read_head().await else {
            return;
        };
        let named = Self::named_by(&now.doc);
        let unnamed: Vec<String> = written
            .iter()
            .filter(|n| !named.contains(n.as_str()))
            .cloned()
            .collect();
        self.delete_all(&unnamed).await;
    }

    /// Persists confirmed deltas as one segment and appends it to the head. Call it every few
    /// seconds with what Braze confirmed since the last call; an empty slice is a no-op.
    pub async fn checkpoint(
        &self,
        head: &mut Head,
        route: &Route,
        confirmed: &[UserDelta],
    ) -> Result<(), StateError> {
        if confirmed
            .iter()
            .all(|d| d.changes.is_empty() && d.row_digest.is_none())
        {
            return Ok(());
        }
        let name = self.named(format!(
            "seg-{:08}-{:06}-{}.bin",
            head.doc.generation,
            head.doc.segments.len(),
            nonce()
        ));
        let uri = self.uri(&name);
        let body = encode_segment(&route.state_names(), confirmed, route.tracks_departures());
        self.store
            .put(
                &uri,
                Bytes::from(body),
                PutCondition::IfAbsent,
                BTreeMap::new(),
            )
            .await?;
        let mut doc = head.doc.clone();
        doc.segments.push(name.clone());
        doc.updated_at = crate::clock::now().to_rfc3339();
        if let Err(e) = self.put_head(head, doc).await {
            self.delete_unnamed(&[name]).await;
            return Err(e);
        }
        Ok(())
    }

    /// Applies the profile-change feed in one head write: `changes` (values Braze no longer
    /// holds, marked unknown) as one segment when there are any, and the head's feed cursor,
    /// so a feed object is applied exactly once. Returns the segment's bytes (for a snapshot
    /// already in memory). After a failed head write the segment is left in place, unnamed:
    /// the answer may have been lost with the write landed.
    pub async fn apply_feed(
        &self,
        head: &mut Head,
        route: &Route,
        changes: &[UserDelta],
        cursor: FeedCursor,
    ) -> Result<Option<Vec<u8>>, StateError> {
        let mut doc = head.doc.clone();
        let mut written = None;
        if !changes.is_empty() {
            let name = self.named(format!(
                "seg-{:08}-{:06}-{}.bin",
                head.doc.generation,
                head.doc.segments.len(),
                nonce()
            ));
            let body = encode_segment(&route.state_names(), changes, route.tracks_departures());
            self.put_new(&name, body.clone()).await?;
            doc.segments.push(name);
            written = Some(body);
        }
        doc.currents_feed = Some(cursor);
        doc.updated_at = crate::clock::now().to_rfc3339();
        self.put_head(head, doc).await?;
        Ok(written)
    }

    async fn put_new(&self, name: &str, body: Vec<u8>) -> Result<(), StoreError> {
        self.store
            .put(
                &self.uri(name),
                Bytes::from(body),
                PutCondition::IfAbsent,
                BTreeMap::new(),
            )
            .await
            .map(|_| ())
    }

    /// Ends a run: folds the segments into the hash ranges they touch (see the module docs:
    /// only touched ranges are written, as deltas or, for a complete run, as a new base when
    /// their deltas have grown), and points the head at the result with the export's
    /// watermark. `export` is `Some` only for a run that finished its export; `None` (hand-over,
    /// failure) never rewrites a base. Replaced objects are deleted afterwards (best effort).
    pub async fn commit(
        &self,
        head: &mut Head,
        mut snapshot: Snapshot,
        export: Option<Watermark>,
    ) -> Result<CommitStats, StateError> {
        let complete = export.is_some();
        let names = snapshot.names().to_vec();
        let mut folded = SegmentData::default();
        let loaded = head.loaded_segments.min(head.doc.segments.len());
        for (i, name) in head.doc.segments.iter().enumerate() {
            let (bytes, what) = self.get(name).await?;
            folded.extend_from(&bytes, &what, &names)?;
            if i >= loaded {
                snapshot.apply_segment(&bytes, &what)?;
            }
        }
        snapshot.compact();
        let users = snapshot.len() as u64;
        let legacy = head.doc.format == LEGACY_HEAD_FORMAT;
        if legacy && !complete {
            // Left for the next complete commit to rewrite; the segments stay in the head.
            return Ok(CommitStats {
                users,
                ..CommitStats::default()
            });
        }
        let generation = head.doc.generation + 1;
        let mut doc = head.doc.clone();
        let mut written: Vec<String> = Vec::new();
        let mut old: Vec<String> = head.doc.segments.clone();
        let mut stats = CommitStats {
            users,
            segments_folded: head.doc.segments.len(),
            ..CommitStats::default()
        };
        let wanted_bits = bits_for(users, self.range_users);
        if self.is_fork() && (legacy || doc.ranges.is_empty()) {
            return Err(self.unusable(
                "a fork commits into the route's range layout, and this state has none: lay it out first (ensure_layout)",
            ));
        }
        let relayout = legacy
            || doc.ranges.is_empty()
            || (complete && !self.is_fork() && wanted_bits > doc.range_bits + 1);
        let result = if relayout {
            let bits = if doc.ranges.is_empty() || complete {
                wanted_bits
            } else {
                doc.range_bits
            };
            old.append(&mut doc.base);
            for r in &doc.ranges {
                old.extend(r.base.iter().cloned());
                old.extend(r.deltas.iter().cloned());
            }
            doc.range_bits = bits;
            doc.ranges = vec![RangeDoc::default(); 1usize << bits];
            self.write_bases(
                &snapshot,
                &mut doc,
                0..1usize << bits,
                generation,
                &mut written,
                &mut stats,
            )
            .await
        } else {
            self.write_touched(
                &snapshot,
                &mut doc,
                folded,
                complete,
                generation,
                &mut written,
                &mut old,
                &mut stats,
            )
            .await
        };
        if let Err(e) = result {
            self.delete_all(&written).await;
            return Err(e.into());
        }
        self.publish(head, doc, generation, users, export, stats, &written, &old)
            .await
    }

    /// Writes a fresh base for each range in `ranges` (empty ranges get none).
    async fn write_bases(
        &self,
        snapshot: &Snapshot,
        doc: &mut HeadDoc,
        ranges: std::ops::Range<usize>,
        generation: u64,
        written: &mut Vec<String>,
        stats: &mut CommitStats,
    ) -> Result<(), StoreError> {
        let tag = nonce();
        let bits = doc.range_bits;
        // Encoded PUT_CONCURRENCY ranges at a time and uploaded together: at most that many
        // encoded shards are held at once.
        let ranges: Vec<usize> = ranges.collect();
        let mut results: Vec<(usize, PutResult)> = Vec::new();
        for chunk in ranges.chunks(PUT_CONCURRENCY) {
            let mut futs = Vec::new();
            for &r in chunk {
                let (shard, users) = snapshot.encode_hash_range(r, bits);
                if users == 0 {
                    results.push((r, Ok(None)));
                    continue;
                }
                let name = self.named(format!("base-{r:05}-{generation:08}-{tag}.bin"));
                let this = self.clone();
                futs.push(async move {
                    let bytes = shard.len() as u64;
                    let put = this.put_new(&name, shard).await;
                    (r, put.map(|()| Some((name, users, bytes))))
                });
            }
            results.extend(futures::future::join_all(futs).await);
        }
        let mut first_error = None;
        for (r, result) in results {
            let slot = &mut doc.ranges[r];
            *slot = RangeDoc::default();
            match result {
                Ok(Some((name, users, bytes))) => {
                    written.push(name.clone());
                    *slot = RangeDoc {
                        base: Some(name),
                        users,
                        bytes,
                        deltas: Vec::new(),
                        delta_bytes: 0,
                    };
                    stats.shards += 1;
                    stats.bytes += bytes;
                }
                Ok(None) => {}
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Per range the folded records touch: one delta object, or a new base when the range
    /// has none yet or (complete runs only) its deltas outgrow a quarter of its base.
    #[allow(clippy::too_many_arguments)]
    async fn write_touched(
        &self,
        snapshot: &Snapshot,
        doc: &mut HeadDoc,
        folded: SegmentData,
        complete: bool,
        generation: u64,
        written: &mut Vec<String>,
        old: &mut Vec<String>,
        stats: &mut CommitStats,
    ) -> Result<(), StoreError> {
        let bits = doc.range_bits;
        let names = snapshot.names().to_vec();
        let keep_ids = snapshot.keeps_ids();
        let tag = nonce();
        for (r, part) in folded.split(bits) {
            let Some(range) = doc.ranges.get(r).cloned() else {
                continue;
            };
            let delta = part.encode(&names, keep_ids);
            let rebase = (range.base.is_none()
                || (complete && (range.delta_bytes + delta.len() as u64) * 4 > range.bytes))
                && self.may_rebase(&range);
            if rebase {
                old.extend(range.base.iter().cloned());
                old.extend(range.deltas.iter().cloned());
                self.write_bases(snapshot, doc, r..r + 1, generation, written, stats)
                    .await?;
                continue;
            }
            let name = self.named(format!("delta-{r:05}-{generation:08}-{tag}.bin"));
            let bytes = delta.len() as u64;
            self.put_new(&name, delta).await?;
            written.push(name.clone());
            let slot = &mut doc.ranges[r];
            slot.deltas.push(name);
            slot.delta_bytes += bytes;
            slot.users = snapshot.range_span(r, bits).len() as u64;
            stats.deltas += 1;
            stats.bytes += bytes;
        }
        Ok(())
    }

    /// The confirmed state of hash range `r` alone (its base and deltas), laid out for
    /// `route`: what the bounded diff holds in memory per range. A head with checkpoint
    /// segments must be folded first ([`StateStore::commit_ranged`] without a watermark).
    pub async fn load_range(
        &self,
        doc: &HeadDoc,
        r: usize,
        route: &Route,
    ) -> Result<Snapshot, StateError> {
        let mut snap = Snapshot::for_route(route);
        let Some(range) = doc.ranges.get(r) else {
            return Ok(snap);
        };
        if let Some(b) = &range.base {
            let (bytes, what) = self.get(b).await?;
            snap.load_base_shard(&bytes, &what)?;
        }
        self.apply_range_deltas(&mut snap, &range.deltas).await?;
        Ok(snap)
    }

    /// Applies a range's deltas (fetched [`GET_CONCURRENCY`] at a time, applied in order) on
    /// top of its loaded base, then compacts.
    async fn apply_range_deltas(
        &self,
        snap: &mut Snapshot,
        deltas: &[String],
    ) -> Result<(), StateError> {
        for chunk in deltas.chunks(GET_CONCURRENCY) {
            for (bytes, what) in self.get_all(chunk).await? {
                snap.apply_segment(&bytes, &what)?;
            }
        }
        snap.compact();
        Ok(())
    }

    /// [`StateStore::load_range`] on a blocking thread (a diff worker, through `rt`), the base
    /// shard decoded as it streams from the store ([`Snapshot::load_base_shard_stream`]): the
    /// range's memory is its decoded arrays, without a second copy of its shard.
    pub fn load_range_blocking(
        &self,
        doc: &HeadDoc,
        r: usize,
        route: &Route,
        rt: &tokio::runtime::Handle,
    ) -> Result<Snapshot, StateError> {
        let mut snap = Snapshot::for_route(route);
        let Some(range) = doc.ranges.get(r) else {
            return Ok(snap);
        };
        if let Some(b) = &range.base {
            let uri = self.uri(b);
            let (meta, reader) = rt.block_on(self.store.get_reader(&uri))?;
            let mut body = tokio_util::io::SyncIoBridge::new_with_handle(reader, rt.clone());
            snap.load_base_shard_stream(&mut body, meta.size, &uri.to_string())?;
        }
        rt.block_on(self.apply_range_deltas(&mut snap, &range.deltas))?;
        Ok(snap)
    }

    /// [`StateStore::commit`] in bounded memory, for format-2 heads: the segments' records are
    /// partitioned by hash range into local files under `spill` (one segment in memory at a
    /// time), then each range they touch is loaded alone, updated and written (a delta, or a
    /// new base on the same rules as [`StateStore::commit`]), [`COMMIT_RANGES_AT_ONCE`] ranges
    /// at a time. `expected_users` (the state's users plus this run's new ones) sizes the
    /// ranges of a first layout and decides when they double; a re-layout also goes range by
    /// range (an old range splits into its sub-ranges). Nothing needs the whole state.
    pub async fn commit_ranged(
        &self,
        head: &mut Head,
        route: &Route,
        export: Option<Watermark>,
        expected_users: u64,
        spill: &std::path::Path,
    ) -> Result<CommitStats, StateError> {
        self.commit_ranged_bits(head, route, export, expected_users, spill, None, None)
            .await
    }

    /// [`StateStore::commit_ranged`] of records confirmed without checkpoints (an adoption,
    /// which sends nothing, so a killed one loses nothing and simply runs again): `records`
    /// were spilled by hash range while the export was diffed ([`RecordSpill`]), and are
    /// applied range by range after the head's own segments. Laid out as
    /// [`StateStore::commit_ranged`] would, with at most `records`' range bits.
    pub async fn commit_ranged_with(
        &self,
        head: &mut Head,
        route: &Route,
        export: Option<Watermark>,
        expected_users: u64,
        spill: &std::path::Path,
        records: &SpilledRecords,
    ) -> Result<CommitStats, StateError> {
        self.commit_ranged_bits(
            head,
            route,
            export,
            expected_users,
            spill,
            None,
            Some(records),
        )
        .await
    }

    /// Makes sure the state has a hash-range layout of at least `min_ranges` ranges (the
    /// fan-out lays the route out before forking it): when `head` has no layout or fewer
    /// ranges, it is rewritten with `max(bits_for(expected_users), ceil(log2(min_ranges)))`
    /// range bits (at most [`MAX_RANGE_BITS`]): an empty state gets empty ranges and no
    /// object; an existing one is re-laid out range by range (its checkpoint segments folded
    /// in), as [`StateStore::commit_ranged`] does, spilling to the system temporary folder.
    /// One conditional head write; nothing to do leaves the head as it is. The watermark is
    /// kept. A format-1 head is an error (it migrates through a normal run first), and so is
    /// a fork (its layout is the route's).
    pub async fn ensure_layout(
        &self,
        head: &mut Head,
        route: &Route,
        expected_users: u64,
        min_ranges: usize,
    ) -> Result<(), StateError> {
        if self.is_fork() {
            return Err(self.unusable("a fork keeps the layout of the route it was forked from"));
        }
        if head.doc.format == LEGACY_HEAD_FORMAT {
            return Err(self.unusable(
                "a format-1 head is rewritten into ranges by a normal run first; it cannot be laid out for a fan-out",
            ));
        }
        let has = !head.doc.ranges.is_empty();
        if has && head.doc.ranges.len() >= min_ranges.max(1) {
            return Ok(());
        }
        let min_bits = match min_ranges {
            0 | 1 => 0,
            n => (n - 1).ilog2() + 1,
        };
        let bits = bits_for(expected_users.max(head.doc.users), self.range_users)
            .max(min_bits)
            .min(MAX_RANGE_BITS);
        if has && bits <= head.doc.range_bits {
            return Ok(());
        }
        let spill = crate::state::spill::SpillDir::create(&std::env::temp_dir(), "layout")?;
        self.commit_ranged_bits(
            head,
            route,
            None,
            expected_users,
            spill.path(),
            Some(bits),
            None,
        )
        .await
        .map(|_| ())
    }

    /// [`StateStore::commit_ranged`], laid out with `force_bits` range bits when given, with
    /// `extra` records after the segments'.
    #[allow(clippy::too_many_arguments)]
    async fn commit_ranged_bits(
        &self,
        head: &mut Head,
        route: &Route,
        export: Option<Watermark>,
        expected_users: u64,
        spill: &std::path::Path,
        force_bits: Option<u32>,
        extra: Option<&SpilledRecords>,
    ) -> Result<CommitStats, StateError> {
        if head.doc.format == LEGACY_HEAD_FORMAT {
            return Err(StateError::BadHead {
                uri: self.head_uri(),
                reason: "a format-1 head is rewritten by the in-memory commit, not the ranged one"
                    .into(),
            });
        }
        let complete = export.is_some();
        let names = route.state_names();
        let keep_ids = route.tracks_departures();
        let doc0 = head.doc.clone();
        let fresh = doc0.ranges.is_empty();
        let b = doc0.range_bits;
        if self.is_fork() && fresh {
            return Err(self.unusable(
                "a fork commits into the route's range layout, and this state has none: lay it out first (ensure_layout)",
            ));
        }
        let wanted = bits_for(doc0.users.max(expected_users), self.range_users);
        let nb = if let Some(f) = force_bits {
            f
        } else if self.is_fork() {
            b
        } else if fresh || (complete && wanted > b + 1) {
            wanted
        } else {
            b
        };
        // Extra records are spilled at their own (finer) bits: a new range reads its share.
        let nb = match extra {
            Some(x) if x.bits < nb => {
                if x.bits < b {
                    return Err(self.unusable(format!(
                        "records spilled in {} range bits cannot be committed into a state of {b}",
                        x.bits
                    )));
                }
                x.bits
            }
            _ => nb,
        };
        let relayout = !fresh && nb != b;
        // 1. The segments' records, by range of the new layout, in the order they apply.
        let mut part = crate::state::spill::Partitioner::new(spill, nb, 16 << 20, None);
        let mut rec = Vec::with_capacity(64);
        for name in &doc0.segments {
            let (bytes, what) = self.get(name).await?;
            let mut seg = SegmentData::default();
            seg.extend_from(&bytes, &what, &names)?;
            drop(bytes);
            for (key, slot, fp) in seg.records {
                rec.clear();
                rec.push(0);
                rec.extend_from_slice(&key.to_le_bytes());
                rec.extend_from_slice(&slot.to_le_bytes());
                rec.extend_from_slice(&fp.to_le_bytes());
                part.push(crate::state::confirmed::range_of(key, nb), &rec)?;
            }
            for (key, id) in seg.ids {
                rec.clear();
                rec.push(1);
                rec.extend_from_slice(&key.to_le_bytes());
                rec.extend_from_slice(id.as_bytes());
                part.push(crate::state::confirmed::range_of(key, nb), &rec)?;
            }
        }
        let sizes = part.finish()?;
        let touched = |r: usize| {
            sizes.get(r).is_some_and(|s| *s > 0)
                || extra.is_some_and(|x| {
                    let sub = x.bits - nb;
                    x.sizes
                        .get(r << sub..(r + 1) << sub)
                        .is_some_and(|s| s.iter().any(|n| *n > 0))
                })
        };
        // 2. The units of work: (old range to load, new ranges it becomes).
        let units: Vec<(Option<usize>, std::ops::Range<usize>)> = if fresh {
            (0..1usize << nb)
                .filter(|r| touched(*r))
                .map(|r| (None, r..r + 1))
                .collect()
        } else if relayout {
            let k = nb - b;
            (0..1usize << b)
                .map(|r| (Some(r), (r << k)..((r + 1) << k)))
                .collect()
        } else {
            (0..1usize << b)
                .filter(|r| touched(*r))
                .map(|r| (Some(r), r..r + 1))
                .collect()
        };
        let generation = doc0.generation + 1;
        let tag = nonce();
        let work = units.into_iter().map(|(old, new)| {
            let this = self.clone();
            let doc0 = &doc0;
            let names = &names;
            let tag = &tag;
            async move {
                this.commit_unit(
                    doc0,
                    route,
                    old,
                    new,
                    nb,
                    relayout || fresh,
                    complete,
                    generation,
                    tag,
                    names,
                    keep_ids,
                    spill,
                    extra,
                )
                .await
            }
        });
        use futures::StreamExt;
        let outs: Vec<Result<UnitOut, StateError>> = futures::stream::iter(work)
            .buffer_unordered(COMMIT_RANGES_AT_ONCE)
            .collect()
            .await;
        let mut doc = doc0.clone();
        if relayout || fresh {
            doc.range_bits = nb;
            doc.ranges = vec![RangeDoc::default(); 1usize << nb];
        }
        let mut written = Vec::new();
        let mut old: Vec<String> = doc0.segments.clone();
        let mut stats = CommitStats {
            segments_folded: doc0.segments.len(),
            ..CommitStats::default()
        };
        let mut first_error = None;
        for out in outs {
            match out {
                Ok(u) => {
                    written.extend(u.written);
                    old.extend(u.old);
                    for (r, d) in u.docs {
                        if let Some(slot) = doc.ranges.get_mut(r) {
                            *slot = d;
                        }
                    }
                    stats.shards += u.shards;
                    stats.deltas += u.deltas;
                    stats.bytes += u.bytes;
                }
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        if let Some(e) = first_error {
            self.delete_all(&written).await;
            return Err(e);
        }
        let users: u64 = doc.ranges.iter().map(|r| r.users).sum();
        stats.users = users;
        self.publish(head, doc, generation, users, export, stats, &written, &old)
            .await
    }

    /// One unit of [`StateStore::commit_ranged`]: loads old range `old` (none: empty),
    /// applies the spilled records of the new ranges `new`, and writes them.
    #[allow(clippy::too_many_arguments)]
    async fn commit_unit(
        &self,
        doc0: &HeadDoc,
        route: &Route,
        old: Option<usize>,
        new: std::ops::Range<usize>,
        nb: u32,
        rebase_all: bool,
        complete: bool,
        generation: u64,
        tag: &str,
        names: &[String],
        keep_ids: bool,
        spill: &std::path::Path,
        extra: Option<&SpilledRecords>,
    ) -> Result<UnitOut, StateError> {
        let mut out = UnitOut::default();
        let mut snap = match old {
            Some(r) => self.load_range(doc0, r, route).await?,
            None => Snapshot::for_route(route),
        };
        // Records are applied as they are read; only a range that may get a delta object
        // keeps them (to encode it), so a first layout or a re-layout holds none.
        let mut records = SegmentData::default();
        let mut set = |key: u128, slot: u16, fp: u64, records: &mut SegmentData| {
            snap.set(crate::model::UserKey(key), slot as usize, fp);
            if !rebase_all {
                records.records.push((key, slot, fp));
            }
        };
        let mut ids: Vec<(u128, String)> = Vec::new();
        // Each new range's records: the segments', then its share of the extra ones.
        let mut sources: Vec<(&std::path::Path, usize)> = Vec::new();
        for s in new.clone() {
            sources.push((spill, s));
            if let Some(x) = extra {
                let sub = x.bits - nb;
                sources.extend(((s << sub)..((s + 1) << sub)).map(|t| (x.dir.as_path(), t)));
            }
        }
        for (spill, s) in sources {
            crate::state::spill::read_range::<StateError>(spill, s, &mut |b| {
                let key = b
                    .get(1..17)
                    .map(|k| u128::from_le_bytes(read16(k)))
                    .ok_or_else(|| corrupt_spill(spill, s))?;
                match b.first() {
                    Some(0) if b.len() == 27 => {
                        let slot = u16::from_le_bytes([b[17], b[18]]);
                        let mut fp = [0u8; 8];
                        fp.copy_from_slice(&b[19..27]);
                        set(key, slot, u64::from_le_bytes(fp), &mut records);
                    }
                    Some(1) => {
                        let id =
                            std::str::from_utf8(&b[17..]).map_err(|_| corrupt_spill(spill, s))?;
                        ids.push((key, id.to_string()));
                    }
                    _ => return Err(corrupt_spill(spill, s)),
                }
                Ok(())
            })?;
        }
        // Identifiers after the fingerprints: a user new to the state exists once its
        // first fingerprint is set.
        for (key, id) in &ids {
            snap.set_identifier(crate::model::UserKey(*key), id);
        }
        if rebase_all {
            drop(ids);
        } else {
            records.ids = ids;
        }
        snap.compact();
        let range = old
            .and_then(|r| doc0.ranges.get(r))
            .cloned()
            .unwrap_or_default();
        if !rebase_all {
            let delta = records.encode(names, keep_ids);
            records = SegmentData::default();
            let rebase = (range.base.is_none()
                || (complete && (range.delta_bytes + delta.len() as u64) * 4 > range.bytes))
                && self.may_rebase(&range);
            if !rebase {
                let r = new.start;
                let name = self.named(format!("delta-{r:05}-{generation:08}-{tag}.bin"));
                let bytes = delta.len() as u64;
                self.put_new(&name, delta).await?;
                out.written.push(name.clone());
                let mut d = range.clone();
                d.deltas.push(name);
                d.delta_bytes += bytes;
                d.users = snap.len() as u64;
                out.docs.push((r, d));
                out.deltas += 1;
                out.bytes += bytes;
                return Ok(out);
            }
        }
        drop(records);
        out.old.extend(range.base.iter().cloned());
        out.old.extend(range.deltas.iter().cloned());
        for r in new {
            let (shard, users) = snap.encode_hash_range(r, nb);
            if users == 0 {
                out.docs.push((r, RangeDoc::default()));
                continue;
            }
            let name = self.named(format!("base-{r:05}-{generation:08}-{tag}.bin"));
            let bytes = shard.len() as u64;
            self.put_new(&name, shard).await?;
            out.written.push(name.clone());
            out.docs.push((
                r,
                RangeDoc {
                    base: Some(name),
                    users,
                    bytes,
                    deltas: Vec::new(),
                    delta_bytes: 0,
                },
            ));
            out.shards += 1;
            out.bytes += bytes;
        }
        Ok(out)
    }

    /// The end of both commits: stamps the new head (generation, users, the export applied and,
    /// unless stale, its watermark), writes it with one conditional put and deletes what it
    /// replaced; on a failed put, deletes what this commit wrote instead.
    #[allow(clippy::too_many_arguments)]
    async fn publish(
        &self,
        head: &mut Head,
        mut doc: HeadDoc,
        generation: u64,
        users: u64,
        export: Option<Watermark>,
        mut stats: CommitStats,
        written: &[String],
        old: &[String],
    ) -> Result<CommitStats, StateError> {
        // A fork deletes only what it wrote: the route head still points to what it inherited.
        let old: Vec<String> = old.iter().filter(|n| self.owns(n)).cloned().collect();
        doc.format = HEAD_FORMAT;
        doc.generation = generation;
        doc.users = users;
        doc.segments.clear();
        if let Some(w) = export {
            doc.applied_exports.retain(|e| *e != w.export_id);
            doc.applied_exports.push(w.export_id.clone());
            let excess = doc
                .applied_exports
                .len()
                .saturating_sub(APPLIED_EXPORTS_KEPT);
            doc.applied_exports.drain(..excess);
            if !head.is_stale(w.exported_at.as_deref()) {
                doc.watermark = Some(w);
            }
        }
        doc.updated_at = crate::clock::now().to_rfc3339();
        stats.ranges = doc.ranges.len();
        stats.state_bytes = doc.state_bytes();
        if let Err(e) = self.put_head(head, doc).await {
            self.delete_unnamed(written).await;
            return Err(e);
        }
        head.loaded_segments = 0;
        self.delete_all(&old).await;
        Ok(stats)
    }

    /// Creates the head of fork `name` (see [`StateStore::fork`]): a copy of the route head's
    /// document (ranges, `range_bits`, users, watermark, applied exports) without checkpoint
    /// segments, written with a conditional create. When it already exists (a coordinator
    /// retried), it is read and returned as it is. The route head must have a range layout
    /// ([`StateStore::ensure_layout`]) and no unfolded checkpoint segments.
    pub async fn create_fork(
        &self,
        route_head: &Head,
        name: &str,
    ) -> Result<(StateStore, Head), StateError> {
        if self.is_fork() {
            return Err(self.unusable("a fork cannot be forked again; fork the route's state"));
        }
        let d = &route_head.doc;
        if d.format != HEAD_FORMAT || d.ranges.is_empty() {
            return Err(self.unusable(
                "the state has no range layout to fork: lay it out first (ensure_layout)",
            ));
        }
        if !d.segments.is_empty() {
            return Err(self.unusable(format!(
                "the state has {} unfolded checkpoint segments: commit them before forking",
                d.segments.len()
            )));
        }
        let fork = self.fork(name);
        let mut doc = d.clone();
        doc.segments.clear();
        doc.updated_at = crate::clock::now().to_rfc3339();
        let mut head = Head {
            doc: HeadDoc::default(),
            etag: None,
            loaded_segments: 0,
        };
        match fork.put_head(&mut head, doc).await {
            Ok(()) => Ok((fork, head)),
            Err(StateError::Conflict { .. }) => {
                let head = fork.read_head().await?;
                if head.doc.range_bits != d.range_bits || head.doc.ranges.len() != d.ranges.len() {
                    return Err(fork.unusable(format!(
                        "the fork exists with {} ranges, the route has {}",
                        head.doc.ranges.len(),
                        d.ranges.len()
                    )));
                }
                Ok((fork, head))
            }
            Err(e) => Err(e),
        }
    }

    /// Takes the forks' work into the route head: `ranges[r]` from the fork whose span holds
    /// `r` (ranges no span holds stay as they are), users recomputed from the ranges,
    /// generation + 1, watermark and applied exports unchanged. One conditional write
    /// (`If-Match` the route head: [`StateError::Conflict`] when it moved). Idempotent by
    /// content: merging the same forks again gives the same ranges and users. Deletes
    /// nothing. The forks must share the route's layout, have no checkpoint segments (pieces
    /// commit before they finish), and their spans must not overlap.
    pub async fn merge_forks(
        &self,
        head: &mut Head,
        forks: &[(std::ops::Range<usize>, HeadDoc)],
    ) -> Result<CommitStats, StateError> {
        if self.is_fork() {
            return Err(self.unusable("forks merge into the route's head, not into a fork"));
        }
        let n = head.doc.ranges.len();
        if head.doc.format != HEAD_FORMAT || n == 0 {
            return Err(self.unusable("the state has no range layout to merge forks into"));
        }
        if !head.doc.segments.is_empty() {
            return Err(self.unusable(format!(
                "the route head has {} unfolded checkpoint segments: commit them before merging forks",
                head.doc.segments.len()
            )));
        }
        let mut doc = head.doc.clone();
        let mut taken = vec![false; n];
        for (span, f) in forks {
            if span.start > span.end || span.end > n {
                return Err(self.unusable(format!(
                    "fork span {}..{} is outside the state's {n} ranges",
                    span.start, span.end
                )));
            }
            if f.range_bits != doc.range_bits || f.ranges.len() != n {
                return Err(self.unusable(format!(
                    "a fork has {} ranges (range_bits {}), the route has {n} (range_bits {})",
                    f.ranges.len(),
                    f.range_bits,
                    doc.range_bits
                )));
            }
            if !f.segments.is_empty() {
                return Err(self.unusable(format!(
                    "the fork of ranges {}..{} has {} uncommitted checkpoint segments: its piece must commit first",
                    span.start,
                    span.end,
                    f.segments.len()
                )));
            }
            for r in span.clone() {
                if std::mem::replace(&mut taken[r], true) {
                    return Err(self.unusable(format!("two forks both hold range {r}")));
                }
                doc.ranges[r] = f.ranges[r].clone();
            }
        }
        let users: u64 = doc.ranges.iter().map(|r| r.users).sum();
        doc.users = users;
        doc.generation = head.doc.generation + 1;
        doc.updated_at = crate::clock::now().to_rfc3339();
        let stats = CommitStats {
            users,
            ranges: n,
            state_bytes: doc.state_bytes(),
            ..CommitStats::default()
        };
        self.put_head(head, doc).await?;
        head.loaded_segments = 0;
        Ok(stats)
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
    use bridge_shared::object_store::{MemoryStore, ObjectMeta};
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
            row_digest: None,
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

    /// A store whose next head write lands and then loses its answer (the caller sees a
    /// timeout), as S3 does when the connection drops after the write.
    struct LosesHeadAnswer {
        inner: MemoryStore,
        armed: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl ObjectStore for LosesHeadAnswer {
        async fn get(&self, uri: &S3Uri) -> Result<(ObjectMeta, Bytes), StoreError> {
            self.inner.get(uri).await
        }
        async fn get_reader(
            &self,
            uri: &S3Uri,
        ) -> Result<(ObjectMeta, bridge_shared::object_store::ObjectReader), StoreError> {
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
            let out = self.inner.put(uri, body, cond, meta).await?;
            if uri.key.ends_with("head.json")
                && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(StoreError::Other {
                    op: "PutObject",
                    uri: uri.clone(),
                    message: "timeout waiting for the response".into(),
                    retryable: true,
                });
            }
            Ok(out)
        }
        async fn copy(&self, from: &S3Uri, to: &S3Uri) -> Result<(), StoreError> {
            self.inner.copy(from, to).await
        }
        async fn delete(&self, uri: &S3Uri) -> Result<(), StoreError> {
            self.inner.delete(uri).await
        }
    }

    #[tokio::test]
    async fn a_head_write_whose_answer_was_lost_keeps_what_the_head_names() {
        let store = Arc::new(LosesHeadAnswer {
            inner: MemoryStore::new(),
            armed: false.into(),
        });
        let mem: Arc<dyn ObjectStore> = store.clone();
        let st = StateStore::new(mem.clone(), "state", "s/", "r");
        let r = route();
        let (mut head, _) = st.load(&r).await.unwrap();
        st.checkpoint(&mut head, &r, &[d("1", 1)]).await.unwrap();
        // The checkpoint's head write lands; its answer is lost: the head names the segment,
        // so the segment stays, and the run carries on from the head it wrote.
        store.armed.store(true, std::sync::atomic::Ordering::SeqCst);
        st.checkpoint(&mut head, &r, &[d("2", 2)]).await.unwrap();
        st.checkpoint(&mut head, &r, &[d("3", 3)]).await.unwrap();
        let (mut head2, snap) = st.load(&r).await.unwrap();
        assert_eq!(snap.len(), 3);
        // The same for the commit's head write: what it wrote and the head names stays.
        store.armed.store(true, std::sync::atomic::Ordering::SeqCst);
        st.commit(&mut head2, snap, w("e1")).await.unwrap();
        let (head3, snap3) = st.load(&r).await.unwrap();
        assert_eq!(snap3.len(), 3);
        assert!(head3.doc.segments.is_empty());
    }

    #[tokio::test]
    async fn a_head_write_that_lost_the_race_deletes_only_what_no_head_names() {
        let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let st = StateStore::new(mem.clone(), "state", "s/", "r");
        let r = route();
        let (mut a, _) = st.load(&r).await.unwrap();
        let (mut b, _) = st.load(&r).await.unwrap();
        st.checkpoint(&mut a, &r, &[d("1", 1)]).await.unwrap();
        let before = names_under(&mem).await;
        assert!(st.checkpoint(&mut b, &r, &[d("2", 2)]).await.is_err());
        assert_eq!(
            names_under(&mem).await,
            before,
            "the loser's segment is gone"
        );
        assert_eq!(st.load(&r).await.unwrap().1.len(), 1);
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

    fn w(tag: &str) -> Option<Watermark> {
        Some(Watermark {
            export_id: format!("s3://b/k#{tag}"),
            exported_at: Some("2024-01-02T00:00:00Z".into()),
        })
    }

    async fn names_under(mem: &Arc<dyn ObjectStore>) -> Vec<String> {
        let mut v: Vec<String> = mem
            .list("state", "s/r/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key.trim_start_matches("s/r/").to_string())
            .collect();
        v.sort();
        v
    }

    /// One run: confirm `deltas`, checkpoint, commit with or without a watermark.
    async fn run(st: &StateStore, deltas: &[UserDelta], export: Option<Watermark>) -> CommitStats {
        let r = route();
        let (mut head, snap) = st.load(&r).await.unwrap();
        st.checkpoint(&mut head, &r, deltas).await.unwrap();
        st.commit(&mut head, snap, export).await.unwrap()
    }

    #[tokio::test]
    async fn a_commit_writes_only_the_ranges_it_touched() {
        let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let st = StateStore::new(mem.clone(), "state", "s/", "r").with_range_users(16);
        let first: Vec<UserDelta> = (0..200).map(|i| d(&i.to_string(), i)).collect();
        let stats = run(&st, &first, w("e1")).await;
        assert_eq!(stats.ranges, 16, "200 users at 16 per range: 16 ranges");
        assert_eq!(stats.shards, 16);
        let before = names_under(&mem).await;
        // One user changed: one delta object for its range, no base rewritten.
        let stats = run(&st, &[d("7", 1000)], w("e2")).await;
        assert_eq!((stats.shards, stats.deltas), (0, 1), "{stats:?}");
        let after = names_under(&mem).await;
        let bases = |v: &[String]| -> Vec<String> {
            v.iter()
                .filter(|n| n.starts_with("base-"))
                .cloned()
                .collect()
        };
        assert_eq!(bases(&before), bases(&after), "every base kept as it was");
        assert_eq!(after.iter().filter(|n| n.starts_with("delta-")).count(), 1);
        assert!(
            !after.iter().any(|n| n.starts_with("seg-")),
            "segments folded"
        );
        let (_, snap) = st.load(&route()).await.unwrap();
        assert_eq!(snap.len(), 200);
        let k = Identifier::ExternalId("7".into()).user_key();
        let want = crate::state::confirmed::stored_fp(fingerprint(&json!(1000)));
        assert_eq!(snap.get(k).unwrap().fp(0), Some(want));
    }

    #[tokio::test]
    async fn a_hand_over_only_appends_deltas_and_a_complete_run_folds_them() {
        let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let st = StateStore::new(mem.clone(), "state", "s/", "r").with_range_users(1000);
        let first: Vec<UserDelta> = (0..100).map(|i| d(&i.to_string(), i)).collect();
        run(&st, &first, w("e1")).await;
        let base = names_under(&mem).await;
        // Half the users changed, confirmed by a run that hands over (no watermark): the
        // deltas outgrow a quarter of the base, yet the base is not rewritten.
        let changed: Vec<UserDelta> = (0..50).map(|i| d(&i.to_string(), i + 500)).collect();
        let stats = run(&st, &changed, None).await;
        assert_eq!((stats.shards, stats.deltas), (0, 1), "{stats:?}");
        let after = names_under(&mem).await;
        assert!(
            base.iter()
                .filter(|n| n.starts_with("base-"))
                .all(|b| after.contains(b))
        );
        // The run that completes the export folds the range's deltas into a new base.
        let stats = run(&st, &[d("99", 7)], w("e2")).await;
        assert_eq!((stats.shards, stats.deltas), (1, 0), "{stats:?}");
        let now = names_under(&mem).await;
        assert_eq!(now.len(), 2, "head and one base: {now:?}");
        let (head, snap) = st.load(&route()).await.unwrap();
        assert_eq!(head.doc.users, 100);
        for i in 0..100i64 {
            let want = if i < 50 {
                i + 500
            } else if i == 99 {
                7
            } else {
                i
            };
            let k = Identifier::ExternalId(i.to_string()).user_key();
            assert_eq!(
                snap.get(k).unwrap().fp(0),
                Some(crate::state::confirmed::stored_fp(fingerprint(&json!(
                    want
                ))))
            );
        }
    }

    #[tokio::test]
    async fn ranges_double_when_the_route_outgrows_them() {
        let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let st = StateStore::new(mem.clone(), "state", "s/", "r").with_range_users(10);
        let first: Vec<UserDelta> = (0..20).map(|i| d(&i.to_string(), i)).collect();
        assert_eq!(run(&st, &first, w("e1")).await.ranges, 2);
        let more: Vec<UserDelta> = (20..200).map(|i| d(&i.to_string(), i)).collect();
        let stats = run(&st, &more, w("e2")).await;
        assert_eq!(stats.ranges, 32);
        let (head, snap) = st.load(&route()).await.unwrap();
        assert_eq!(snap.len(), 200);
        assert_eq!(head.doc.ranges.iter().map(|r| r.users).sum::<u64>(), 200);
    }

    fn range_of_user(id: &str, bits: u32) -> usize {
        crate::state::confirmed::range_of(Identifier::ExternalId(id.into()).user_key().0, bits)
    }

    fn fp_of(snap: &Snapshot, id: &str) -> Option<u64> {
        snap.get(Identifier::ExternalId(id.into()).user_key())
            .and_then(|u| u.fp(0))
    }

    fn want(v: i64) -> Option<u64> {
        Some(crate::state::confirmed::stored_fp(fingerprint(&json!(v))))
    }

    #[tokio::test]
    async fn ensure_layout_lays_out_an_empty_state_and_re_lays_an_existing_one() {
        let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let st = StateStore::new(mem.clone(), "state", "s/", "r").with_range_users(1000);
        let r = route();
        // An empty route: empty ranges, no object but the head.
        let mut head = st.read_head().await.unwrap();
        st.ensure_layout(&mut head, &r, 0, 8).await.unwrap();
        assert_eq!((head.doc.range_bits, head.doc.ranges.len()), (3, 8));
        assert!(head.doc.ranges.iter().all(|x| *x == RangeDoc::default()));
        assert_eq!(names_under(&mem).await, vec!["head.json".to_string()]);
        assert_eq!(st.read_head().await.unwrap(), head);
        // Enough ranges already: nothing written.
        let etag = head.etag.clone();
        st.ensure_layout(&mut head, &r, 0, 4).await.unwrap();
        assert_eq!(head.etag, etag);
        // Expected users size the layout too: 5,000 users at 1,000 per range need 8.
        let st2 = StateStore::new(mem.clone(), "state", "s/", "r2").with_range_users(1000);
        let mut h2 = st2.read_head().await.unwrap();
        st2.ensure_layout(&mut h2, &r, 5000, 2).await.unwrap();
        assert_eq!(h2.doc.ranges.len(), 8);

        // An existing state in one range, with a checkpoint not yet folded: re-laid out in
        // 4 ranges, range by range; same users, watermark kept, old objects deleted.
        let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let st = StateStore::new(mem.clone(), "state", "s/", "r").with_range_users(1000);
        let first: Vec<UserDelta> = (0..100).map(|i| d(&i.to_string(), i)).collect();
        run(&st, &first, w("e1")).await;
        let (mut head, _) = st.load(&r).await.unwrap();
        st.checkpoint(&mut head, &r, &[d("5", 555)]).await.unwrap();
        assert_eq!(head.doc.ranges.len(), 1);
        st.ensure_layout(&mut head, &r, 100, 4).await.unwrap();
        assert_eq!((head.doc.range_bits, head.doc.ranges.len()), (2, 4));
        assert!(head.doc.segments.is_empty());
        assert_eq!(head.doc.watermark, w("e1"));
        assert_eq!(head.doc.users, 100);
        for (i, x) in head.doc.ranges.iter().enumerate() {
            let n = (0..100)
                .filter(|u| range_of_user(&u.to_string(), 2) == i)
                .count() as u64;
            assert_eq!(x.users, n, "range {i}");
        }
        let names = names_under(&mem).await;
        assert_eq!(names.len(), 5, "head and 4 new bases only: {names:?}");
        let (_, snap) = st.load(&r).await.unwrap();
        assert_eq!(snap.len(), 100);
        assert_eq!(fp_of(&snap, "5"), want(555));
        assert_eq!(fp_of(&snap, "6"), want(6));

        // A format-1 head migrates through a normal run first.
        let legacy = json!({"format": 1, "route": "old", "generation": 1, "users": 0,
            "segments": [], "watermark": null, "applied_exports": [], "updated_at": ""});
        mem.put(
            &S3Uri::new("state", "s/old/head.json"),
            Bytes::from(legacy.to_string()),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
        let old = StateStore::new(mem.clone(), "state", "s/", "old");
        let mut h = old.read_head().await.unwrap();
        let err = old.ensure_layout(&mut h, &r, 0, 4).await.unwrap_err();
        assert!(matches!(err, StateError::Unusable { .. }), "{err}");
        assert!(!err.is_retryable());
    }

    /// Every object under the route folder with its bytes.
    async fn objects(mem: &Arc<dyn ObjectStore>) -> BTreeMap<String, Bytes> {
        let mut out = BTreeMap::new();
        for o in mem.list("state", "s/r/").await.unwrap() {
            let (_, b) = mem.get(&S3Uri::new("state", &o.key)).await.unwrap();
            out.insert(o.key.trim_start_matches("s/r/").to_string(), b);
        }
        out
    }

    /// A route state of 200 users committed in 16 hash ranges (export `e1`), ready to fork.
    async fn forkable_state() -> (Arc<dyn ObjectStore>, StateStore, Route) {
        let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let st = StateStore::new(mem.clone(), "state", "s/", "r").with_range_users(16);
        let first: Vec<UserDelta> = (0..200).map(|i| d(&i.to_string(), i)).collect();
        run(&st, &first, w("e1")).await;
        (mem, st, route())
    }

    #[tokio::test]
    async fn a_fork_commits_into_its_own_head_and_leaves_the_routes_objects() {
        let (mem, st, r) = forkable_state().await;
        let route_head = st.read_head().await.unwrap();
        assert_eq!(route_head.doc.range_bits, 4);
        let before = objects(&mem).await;
        let (fork, fhead) = st
            .create_fork(&route_head, "_fan_out/run1/p000")
            .await
            .unwrap();
        assert_eq!(fork.head_uri().key, "s/r/_fan_out/run1/p000/head.json");
        assert_eq!(fhead.doc.ranges, route_head.doc.ranges);
        assert_eq!(fhead.doc.watermark, route_head.doc.watermark);
        // A retried coordinator gets the same fork head back.
        let (_, again) = st
            .create_fork(&route_head, "_fan_out/run1/p000")
            .await
            .unwrap();
        assert_eq!(again, fhead);

        // Every user changed, in two complete commits (the in-memory one and the ranged
        // one, which also expects far more users): a route would rebase and re-lay out;
        // the fork only appends deltas in its own folder, keeps the layout and deletes
        // nothing of the route's.
        let all: Vec<UserDelta> = (0..200).map(|i| d(&i.to_string(), i + 1000)).collect();
        let (mut h, snap) = fork.load(&r).await.unwrap();
        fork.checkpoint(&mut h, &r, &all).await.unwrap();
        let stats = fork.commit(&mut h, snap, w("e2")).await.unwrap();
        assert_eq!((stats.shards, stats.deltas), (0, 16), "{stats:?}");
        let more: Vec<UserDelta> = (0..400).map(|i| d(&i.to_string(), i + 2000)).collect();
        let mut h = fork.read_head().await.unwrap();
        fork.checkpoint(&mut h, &r, &more).await.unwrap();
        let spill = tempfile::tempdir().unwrap();
        let stats = fork
            .commit_ranged(&mut h, &r, w("e2"), 1_000_000, spill.path())
            .await
            .unwrap();
        assert_eq!(stats.shards, 0, "{stats:?}");
        let h = fork.read_head().await.unwrap();
        assert_eq!(h.doc.range_bits, 4);
        assert_eq!(h.doc.users, 400);
        assert!(h.doc.segments.is_empty());
        let after = objects(&mem).await;
        for (name, bytes) in &before {
            if name == "head.json" {
                continue;
            }
            assert_eq!(after.get(name), Some(bytes), "{name} kept as it was");
        }
        assert_eq!(
            after.get("head.json"),
            before.get("head.json"),
            "route head untouched"
        );
        assert!(
            after
                .keys()
                .filter(|n| !before.contains_key(*n))
                .all(|n| n.starts_with("_fan_out/run1/p000/")),
            "{after:?}"
        );
        let (_, snap) = fork.load(&r).await.unwrap();
        assert_eq!(fp_of(&snap, "7"), want(2007));
        let (_, snap) = st.load(&r).await.unwrap();
        assert_eq!(
            fp_of(&snap, "7"),
            want(7),
            "the route still has its own state"
        );

        // A fork needs the route laid out, with its checkpoints folded.
        let bare = StateStore::new(mem.clone(), "state", "s/", "bare");
        let empty = bare.read_head().await.unwrap();
        let err = bare.create_fork(&empty, "p").await.map(|_| ()).unwrap_err();
        assert!(matches!(err, StateError::Unusable { .. }), "{err}");
        let (mut h, _) = st.load(&r).await.unwrap();
        st.checkpoint(&mut h, &r, &[d("1", 5)]).await.unwrap();
        let err = st.create_fork(&h, "p").await.map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("checkpoint"), "{err}");
        // A fork never lays out a state of its own.
        let f = bare.fork("p");
        let (mut fh, _) = f.load(&r).await.unwrap();
        f.checkpoint(&mut fh, &r, &[d("1", 1)]).await.unwrap();
        let spill = tempfile::tempdir().unwrap();
        let err = f
            .commit_ranged(&mut fh, &r, None, 1, spill.path())
            .await
            .unwrap_err();
        assert!(matches!(err, StateError::Unusable { .. }), "{err}");
    }

    #[tokio::test]
    async fn merge_forks_takes_each_span_from_its_fork() {
        let (mem, st, r) = forkable_state().await;
        let mut route_head = st.read_head().await.unwrap();
        let bits = route_head.doc.range_bits;
        // Piece 0 holds ranges 0..8, piece 1 ranges 8..16. Each confirms changes of its own
        // users and new users; piece 0 also (wrongly) a user of piece 1's ranges, which the
        // merge must not take.
        let spans = [0..8usize, 8..16];
        let mut forks = Vec::new();
        for (p, span) in spans.iter().enumerate() {
            let (fork, mut h) = st
                .create_fork(&route_head, &format!("_fan_out/x/p{p}"))
                .await
                .unwrap();
            let mut mine: Vec<UserDelta> = (0..200)
                .filter(|i| span.contains(&range_of_user(&i.to_string(), bits)) && i % 3 == 0)
                .map(|i| d(&i.to_string(), i + 1000))
                .collect();
            mine.extend(
                (0..50)
                    .map(|i| format!("new{i}"))
                    .filter(|id| span.contains(&range_of_user(id, bits)))
                    .map(|id| d(&id, 1)),
            );
            if p == 0 {
                let stray = (0..200)
                    .find(|i| range_of_user(&i.to_string(), bits) >= 8)
                    .unwrap();
                mine.push(d(&stray.to_string(), 99_999));
            }
            fork.checkpoint(&mut h, &r, &mine).await.unwrap();
            let export = if p == 0 { None } else { w("e2") };
            // A fresh spill folder per commit, as runs have.
            let spill = tempfile::tempdir().unwrap();
            fork.commit_ranged(&mut h, &r, export, 250, spill.path())
                .await
                .unwrap();
            forks.push((span.clone(), fork.read_head().await.unwrap().doc));
        }
        let stale = route_head.clone();
        let before = objects(&mem).await;
        let stats = st.merge_forks(&mut route_head, &forks).await.unwrap();
        assert_eq!(stats.users, 250);
        let merged = st.read_head().await.unwrap();
        assert_eq!(merged, route_head);
        assert_eq!(merged.doc.users, 250);
        assert_eq!(merged.doc.generation, stale.doc.generation + 1);
        assert_eq!(merged.doc.watermark, w("e1"), "watermark unchanged");
        assert_eq!(merged.doc.range_bits, bits);
        let after = objects(&mem).await;
        assert!(
            before.keys().all(|k| after.contains_key(k)),
            "deletes nothing"
        );
        let (_, snap) = st.load(&r).await.unwrap();
        assert_eq!(snap.len(), 250);
        for i in 0..200i64 {
            let v = if i % 3 == 0 { i + 1000 } else { i };
            assert_eq!(fp_of(&snap, &i.to_string()), want(v), "user {i}");
        }
        assert_eq!(fp_of(&snap, "new3"), want(1));
        // Idempotent by content.
        st.merge_forks(&mut route_head, &forks).await.unwrap();
        let again = st.read_head().await.unwrap();
        assert_eq!(again.doc.ranges, merged.doc.ranges);
        assert_eq!(again.doc.users, merged.doc.users);
        // A head that moved since it was read: a clean conflict, nothing changed.
        let mut stale = stale;
        let err = st.merge_forks(&mut stale, &forks).await.unwrap_err();
        assert!(matches!(err, StateError::Conflict { .. }), "{err}");
        assert_eq!(st.read_head().await.unwrap(), again);
        // Overlapping spans, a fork with checkpoints left, a span outside: refused.
        let mut h = st.read_head().await.unwrap();
        let overlap = vec![(0..9, forks[0].1.clone()), (8..16, forks[1].1.clone())];
        let err = st.merge_forks(&mut h, &overlap).await.unwrap_err();
        assert!(err.to_string().contains("range 8"), "{err}");
        let mut dirty = forks[0].1.clone();
        dirty.segments.push("_fan_out/x/p0/seg.bin".into());
        let err = st.merge_forks(&mut h, &[(0..8, dirty)]).await.unwrap_err();
        assert!(err.to_string().contains("checkpoint"), "{err}");
        let err = st
            .merge_forks(&mut h, &[(8..17, forks[1].1.clone())])
            .await
            .unwrap_err();
        assert!(matches!(err, StateError::Unusable { .. }), "{err}");
        assert_eq!(st.read_head().await.unwrap(), again);
        // The route commits on top of the merge as usual, and may then drop what it replaced.
        run(&st, &[d("1", 4242)], w("e3")).await;
        let (_, snap) = st.load(&r).await.unwrap();
        assert_eq!(snap.len(), 250);
        assert_eq!(fp_of(&snap, "1"), want(4242));
        assert_eq!(fp_of(&snap, "3"), want(1003));
    }

    #[tokio::test]
    async fn records_spilled_outside_checkpoints_commit_range_by_range() {
        let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let st = StateStore::new(mem.clone(), "state", "s/", "r").with_range_users(32);
        let r = route();
        let commit = |deltas: Vec<UserDelta>, tag: &'static str| {
            let st = st.clone();
            let r = r.clone();
            async move {
                let mut head = st.read_head().await.unwrap();
                let dir = tempfile::tempdir().unwrap();
                let mut spill = RecordSpill::new(
                    dir.path(),
                    record_spill_bits(head.doc.range_bits),
                    &r,
                    4096,
                    None,
                );
                for d in &deltas {
                    spill.push(d).unwrap();
                }
                let records = spill.finish().unwrap();
                let work = tempfile::tempdir().unwrap();
                let expected = head.doc.users + deltas.len() as u64;
                st.commit_ranged_with(&mut head, &r, w(tag), expected, work.path(), &records)
                    .await
                    .unwrap()
            }
        };
        // A first adoption lays the state out as checkpoints would: 400 users, 16 ranges.
        let stats = commit((0..400).map(|i| d(&i.to_string(), i)).collect(), "e1").await;
        assert_eq!((stats.ranges, stats.shards, stats.users), (16, 16, 400));
        assert!(
            names_under(&mem)
                .await
                .iter()
                .all(|n| !n.starts_with("seg-"))
        );
        // A later one with a few changes appends deltas to the ranges it touches.
        let stats = commit(vec![d("7", 700), d("600", 3)], "e2").await;
        assert_eq!(
            (stats.shards, stats.deltas, stats.users),
            (0, 2, 401),
            "{stats:?}"
        );
        let (head, snap) = st.load(&r).await.unwrap();
        assert_eq!(head.doc.watermark, w("e2"));
        assert_eq!(snap.len(), 401);
        assert_eq!(fp_of(&snap, "7"), want(700));
        assert_eq!(fp_of(&snap, "8"), want(8));
        assert_eq!(fp_of(&snap, "600"), want(3));
    }
}
