//! The confirmed state served one hash range at a time ([`super::RangeState`]): from a whole
//! in-memory snapshot ([`SplitSnapshot`]) or from the object store ([`StoreRanges`]).

use super::RangeState;
use crate::clock::Blocking;
use crate::config::route::Route;
use crate::diff::export::SyncError;
use crate::state::confirmed::Snapshot;

/// A whole in-memory [`Snapshot`] served one hash range at a time (tests, benches, and the
/// equivalence of both paths). The snapshot must be compacted.
pub struct SplitSnapshot<'a> {
    snap: &'a Snapshot,
    bits: Option<u32>,
}

impl<'a> SplitSnapshot<'a> {
    /// `snap` as `1 << bits` ranges (`None`: no layout, the snapshot must be empty).
    pub fn new(snap: &'a Snapshot, bits: Option<u32>) -> Self {
        Self { snap, bits }
    }
}

impl RangeState for SplitSnapshot<'_> {
    fn bits(&self) -> Option<u32> {
        self.bits
    }

    fn load(&self, range: usize) -> Result<Snapshot, SyncError> {
        let bits = self.bits.unwrap_or(0);
        let (shard, _) = self.snap.encode_hash_range(range, bits);
        let mut out = Snapshot::empty(self.snap.names().to_vec(), self.snap.keeps_ids());
        out.load_base_shard(&shard, "range")
            .map_err(|e| SyncError::State {
                range,
                message: e.to_string(),
                retryable: false,
            })?;
        Ok(out)
    }
}

/// The state in an object store, one hash range at a time (from the bounded diff's worker
/// threads, which are not the runtime's: each load waits through `blocking`). `doc` must have no
/// checkpoint segments (fold them first, [`crate::state::store::StateStore::commit_ranged`]
/// without a watermark).
pub struct StoreRanges {
    state: crate::state::store::StateStore,
    doc: crate::state::store::HeadDoc,
    route: std::sync::Arc<Route>,
    blocking: Blocking,
}

impl StoreRanges {
    /// The ranges of `doc` in `state`, laid out for `route`.
    pub fn new(
        state: crate::state::store::StateStore,
        doc: crate::state::store::HeadDoc,
        route: std::sync::Arc<Route>,
        blocking: Blocking,
    ) -> Self {
        Self {
            state,
            doc,
            route,
            blocking,
        }
    }
}

impl RangeState for StoreRanges {
    fn bits(&self) -> Option<u32> {
        (!self.doc.ranges.is_empty()).then_some(self.doc.range_bits)
    }

    fn load(&self, range: usize) -> Result<Snapshot, SyncError> {
        self.state
            .load_range_blocking(&self.doc, range, &self.route, &self.blocking)
            .map_err(|e| SyncError::State {
                range,
                message: e.to_string(),
                retryable: e.is_retryable(),
            })
    }
}
