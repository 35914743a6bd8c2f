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

mod commit;
mod fork;
mod head;
mod load;
mod ranged_commit;
pub mod record_spill;
mod unit_records;

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
    /// Memory a ranged commit may take for the ranges it holds at once
    /// ([`StateStore::with_commit_memory`]); `None`: [`COMMIT_RANGES_AT_ONCE`].
    commit_memory: Option<u64>,
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

/// Bytes one record of a run takes in the in-memory commit, decoded (key, slot, fingerprint).
const FOLDED_RECORD_BYTES: u64 = 32;

/// Bytes of memory the in-memory diff of an export of about `rows` rows needs against `doc`,
/// its commit included: the snapshot once it holds the export's new users too (the state's
/// users or the rows, whichever is more), and, when the state already has ranges (its commit
/// folds the run's records into deltas), every attribute of each user the run may confirm
/// whole: the new ones (rows beyond the state's users), or every row for a full resend.
pub fn in_memory_estimate(doc: &HeadDoc, route: &Route, rows: u64, full_resend: bool) -> u64 {
    let users = doc
        .users
        .max(doc.ranges.iter().map(|r| r.users).sum::<u64>());
    let grown = HeadDoc {
        users: users.max(rows),
        ..HeadDoc::default()
    };
    let whole = match (doc.ranges.is_empty(), full_resend) {
        (true, _) => 0,
        (false, true) => users.max(rows),
        (false, false) => rows.saturating_sub(users),
    };
    let records = whole
        .saturating_mul(route.state_names().len() as u64)
        .saturating_mul(FOLDED_RECORD_BYTES);
    memory_estimate(&grown, route).saturating_add(records)
}

/// Hash ranges a ranged commit loads and writes at once at most (each holds one range's
/// snapshot and its encoded shard: about 2 × 35 MB at the default range size and 20
/// attributes); fewer when [`StateStore::with_commit_memory`] leaves room for fewer.
pub const COMMIT_RANGES_AT_ONCE: usize = 2;

/// Memory one unit of a ranged commit holds for a range of `users` users: the range's
/// snapshot ([`memory_estimate`]) and, while it is written, its encoded object (smaller
/// than the snapshot; counted as much again).
pub fn commit_unit_memory(users: u64, route: &Route) -> u64 {
    let one = HeadDoc {
        users,
        ..HeadDoc::default()
    };
    memory_estimate(&one, route).saturating_mul(2)
}

/// Ranges a ranged commit holds at once within `budget` bytes (`None`: no budget) when each
/// takes `unit` bytes: at least one, at most [`COMMIT_RANGES_AT_ONCE`].
pub fn commit_ranges_at_once(budget: Option<u64>, unit: u64) -> usize {
    match budget {
        None => COMMIT_RANGES_AT_ONCE,
        Some(b) => (b / unit.max(1)).clamp(1, COMMIT_RANGES_AT_ONCE as u64) as usize,
    }
}

/// What a commit has written (objects the new head will name), what they replace (deleted
/// once the new head is written) and its counts: what travels from the writes to
/// [`StateStore::publish`].
#[derive(Debug, Default)]
struct CommitObjects {
    written: Vec<String>,
    replaced: Vec<String>,
    stats: CommitStats,
}

impl CommitObjects {
    /// Adds what one unit of a ranged commit wrote and replaced, and its counts.
    fn absorb(&mut self, unit: CommitObjects) {
        self.written.extend(unit.written);
        self.replaced.extend(unit.replaced);
        self.stats.shards += unit.stats.shards;
        self.stats.deltas += unit.stats.deltas;
        self.stats.bytes += unit.stats.bytes;
    }

    /// Records a new object of `bytes` bytes: a base shard or a delta.
    fn wrote(&mut self, name: String, bytes: u64, shard: bool) {
        self.written.push(name);
        self.stats.bytes += bytes;
        if shard {
            self.stats.shards += 1;
        } else {
            self.stats.deltas += 1;
        }
    }
}

/// What one unit of a ranged commit wrote: the new ranges' documents and its objects.
#[derive(Debug, Default)]
struct UnitOut {
    docs: Vec<(usize, RangeDoc)>,
    objects: CommitObjects,
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
            commit_memory: None,
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

    /// Bounds the memory a ranged commit takes for the ranges it loads and writes at once to
    /// `bytes` ([`commit_ranges_at_once`]): a function keeps its commit, which runs after the
    /// diff and the sender whose memory the allocator may still hold, within this share.
    pub fn with_commit_memory(mut self, bytes: u64) -> Self {
        self.commit_memory = Some(bytes);
        self
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
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::record_spill::{RecordSpill, record_spill_bits};
    use super::*;
    use crate::model::{AttributeChange, Identifier, RowPos, fingerprint};
    use bridge_shared::hooked_store::{Call, Hook, Hooked};
    use bridge_shared::object_store::MemoryStore;
    use serde_json::json;

    fn route() -> Route {
        Route::from_toml(
            "name = \"r\"\nprefix = \"p/\"\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\n[attributes.a]\ntype = \"Integer\"\n",
            "t",
        )
        .unwrap()
    }

    #[test]
    fn a_ranged_commit_holds_as_many_ranges_as_its_memory_fits() {
        let r = route();
        let unit = commit_unit_memory(RANGE_USERS, &r);
        assert_eq!(commit_ranges_at_once(None, unit), COMMIT_RANGES_AT_ONCE);
        assert_eq!(
            commit_ranges_at_once(Some(unit - 1), unit),
            1,
            "at least one"
        );
        assert_eq!(commit_ranges_at_once(Some(unit), unit), 1);
        assert_eq!(commit_ranges_at_once(Some(2 * unit), unit), 2);
        assert_eq!(
            commit_ranges_at_once(Some(100 * unit), unit),
            COMMIT_RANGES_AT_ONCE,
            "never more than the cap"
        );
        assert!(commit_unit_memory(2 * RANGE_USERS, &r) > unit);
    }

    #[test]
    fn the_in_memory_estimate_counts_the_exports_new_users_and_the_records_it_folds() {
        let r = route();
        let empty = HeadDoc::default();
        let held = |users| HeadDoc {
            users,
            ..HeadDoc::default()
        };
        // A first sync: the snapshot ends with every row's user; nothing is folded.
        assert_eq!(
            in_memory_estimate(&empty, &r, 200_000, false),
            memory_estimate(&held(200_000), &r)
        );
        assert!(in_memory_estimate(&empty, &r, 200_000, false) > memory_estimate(&empty, &r));
        // A laid-out state: its new users' records are folded into deltas too.
        let mut laid = held(100_000);
        laid.ranges = vec![RangeDoc {
            users: 100_000,
            ..RangeDoc::default()
        }];
        let names = r.state_names().len() as u64;
        assert_eq!(
            in_memory_estimate(&laid, &r, 150_000, false),
            memory_estimate(&held(150_000), &r) + 50_000 * names * FOLDED_RECORD_BYTES
        );
        // Fewer rows than users: the state's size, nothing new.
        assert_eq!(
            in_memory_estimate(&laid, &r, 90_000, false),
            memory_estimate(&laid, &r)
        );
        // A full resend folds every user's records.
        assert_eq!(
            in_memory_estimate(&laid, &r, 90_000, true),
            memory_estimate(&laid, &r) + 100_000 * names * FOLDED_RECORD_BYTES
        );
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

    /// When `armed`, the next head write lands and then loses its answer (the caller sees a
    /// timeout), as S3 does when the connection drops after the write; when `fail`, the next
    /// head write fails before applying (503 SlowDown).
    #[derive(Default)]
    struct LosesHeadAnswer {
        armed: std::sync::atomic::AtomicBool,
        fail: std::sync::atomic::AtomicBool,
    }

    fn head_write(call: &Call<'_>) -> bool {
        matches!(call, Call::Put { .. }) && call.key().ends_with("head.json")
    }

    #[async_trait::async_trait]
    impl Hook for LosesHeadAnswer {
        async fn before(&self, _: &dyn ObjectStore, call: Call<'_>) -> Result<(), StoreError> {
            if head_write(&call) && self.fail.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Err(call.throttled());
            }
            Ok(())
        }

        async fn after(
            &self,
            _: &dyn ObjectStore,
            call: Call<'_>,
            ok: bool,
        ) -> Result<(), StoreError> {
            if ok
                && head_write(&call)
                && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(call.failed("timeout waiting for the response", true));
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_head_write_whose_answer_was_lost_keeps_what_the_head_names() {
        let store = Arc::new(Hooked::new(
            Arc::new(MemoryStore::new()),
            LosesHeadAnswer::default(),
        ));
        let mem: Arc<dyn ObjectStore> = store.clone();
        let st = StateStore::new(mem.clone(), "state", "s/", "r");
        let r = route();
        let (mut head, _) = st.load(&r).await.unwrap();
        st.checkpoint(&mut head, &r, &[d("1", 1)]).await.unwrap();
        // The checkpoint's head write lands; its answer is lost: the head names the segment,
        // so the segment stays, and the run carries on from the head it wrote.
        store
            .hook()
            .armed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        st.checkpoint(&mut head, &r, &[d("2", 2)]).await.unwrap();
        st.checkpoint(&mut head, &r, &[d("3", 3)]).await.unwrap();
        let (mut head2, snap) = st.load(&r).await.unwrap();
        assert_eq!(snap.len(), 3);
        // The same for the commit's head write: what it wrote and the head names stays.
        store
            .hook()
            .armed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        st.commit(&mut head2, snap, w("e1")).await.unwrap();
        let (head3, snap3) = st.load(&r).await.unwrap();
        assert_eq!(snap3.len(), 3);
        assert!(head3.doc.segments.is_empty());
    }

    #[tokio::test]
    async fn state_writes_that_fail_transiently_or_lose_their_answer_are_tried_again() {
        use crate::state::retrying::ATTEMPTS;
        let lossy = Arc::new(bridge_shared::lossy_store::LossyStore::new());
        let mem: Arc<dyn ObjectStore> = lossy.clone();
        let st = StateStore::new(mem.clone(), "state", "s/", "r");
        let r = route();
        let (mut head, _) = st.load(&r).await.unwrap();
        // The segment's create fails before applying on all attempts but the last.
        lossy.fail_puts(ATTEMPTS - 1);
        st.checkpoint(&mut head, &r, &[d("1", 1)]).await.unwrap();
        // It lands with its answer lost: the retry meets 412 and reads back our own bytes.
        lossy.lose_puts(1);
        st.checkpoint(&mut head, &r, &[d("2", 2)]).await.unwrap();
        assert_eq!(st.load(&r).await.unwrap().1.len(), 2);
        // Too many failures are the caller's.
        lossy.fail_puts(ATTEMPTS);
        assert!(st.checkpoint(&mut head, &r, &[d("3", 3)]).await.is_err());
        // A head write that fails before applying is tried again while the head is unchanged.
        let store = Arc::new(Hooked::new(
            Arc::new(MemoryStore::new()),
            LosesHeadAnswer::default(),
        ));
        let mem: Arc<dyn ObjectStore> = store.clone();
        let st = StateStore::new(mem, "state", "s/", "r");
        let (mut head, _) = st.load(&r).await.unwrap();
        st.checkpoint(&mut head, &r, &[d("1", 1)]).await.unwrap();
        store
            .hook()
            .fail
            .store(true, std::sync::atomic::Ordering::SeqCst);
        st.checkpoint(&mut head, &r, &[d("2", 2)]).await.unwrap();
        st.checkpoint(&mut head, &r, &[d("3", 3)]).await.unwrap();
        assert_eq!(st.load(&r).await.unwrap().1.len(), 3);
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

    #[tokio::test]
    async fn absorbing_a_fork_keeps_what_its_piece_confirmed_whether_or_not_the_route_moved() {
        let (mem, st, r) = forkable_state().await;
        let mut route_head = st.read_head().await.unwrap();
        let bits = route_head.doc.range_bits;
        let (fork, mut fh) = st.create_fork(&route_head, "_fan_out/x/p0").await.unwrap();
        let spill = tempfile::tempdir().unwrap();
        // The piece confirmed users 0..40 (folded into its deltas) and 40..50 (a checkpoint
        // it never folded); a killed checkpoint left 50..55 in a segment no head names.
        let folded: Vec<UserDelta> = (0..40).map(|i| d(&i.to_string(), i + 1000)).collect();
        fork.checkpoint(&mut fh, &r, &folded).await.unwrap();
        fork.commit_ranged(&mut fh, &r, None, 200, spill.path())
            .await
            .unwrap();
        let pending: Vec<UserDelta> = (40..50).map(|i| d(&i.to_string(), i + 1000)).collect();
        fork.checkpoint(&mut fh, &r, &pending).await.unwrap();
        let orphan = "_fan_out/x/p0/seg-99999999-000000-orphaned.bin".to_string();
        let lost: Vec<UserDelta> = (50..55).map(|i| d(&i.to_string(), i + 1000)).collect();
        let body = encode_segment(&r.state_names(), &lost, r.tracks_departures());
        mem.put(
            &S3Uri::new("state", format!("s/r/{orphan}")),
            Bytes::from(body),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
        // Since the fork was made, another run changed users 100.. of user 0's range.
        let moved = range_of_user("0", bits);
        let other: Vec<UserDelta> = (100..200)
            .filter(|i| range_of_user(&i.to_string(), bits) == moved)
            .map(|i| d(&i.to_string(), i + 5000))
            .collect();
        assert!(!other.is_empty());
        st.checkpoint(&mut route_head, &r, &other).await.unwrap();
        st.commit_ranged(&mut route_head, &r, None, 200, spill.path())
            .await
            .unwrap();

        let fdoc = fork.read_head().await.unwrap().doc;
        let taken = st
            .absorb_fork(&mut route_head, &fork, &fdoc, &[orphan], &r)
            .await
            .unwrap();
        assert!(taken);
        let h = st.read_head().await.unwrap();
        // Ranges the route still held as the fork started from are the fork's; the moved one
        // keeps the route's objects and gets the piece's users as records.
        assert_ne!(h.doc.ranges[moved], fdoc.ranges[moved]);
        let untouched = (0..40)
            .map(|i| range_of_user(&i.to_string(), bits))
            .find(|g| *g != moved)
            .unwrap();
        assert_eq!(h.doc.ranges[untouched], fdoc.ranges[untouched]);
        assert_eq!(h.doc.segments.len(), 1);
        let (_, snap) = st.load(&r).await.unwrap();
        for i in 0..55i64 {
            assert_eq!(fp_of(&snap, &i.to_string()), want(i + 1000), "user {i}");
        }
        for d in &other {
            let id = match &d.identifier {
                Identifier::ExternalId(id) => id.clone(),
                other => panic!("{other:?}"),
            };
            let v: i64 = id.parse().unwrap();
            assert_eq!(fp_of(&snap, &id), want(v + 5000), "user {id}");
        }
    }
}
