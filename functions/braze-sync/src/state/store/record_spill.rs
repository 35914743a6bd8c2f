//! Confirmed records spilled by hash range outside checkpoints (an adoption's), for
//! [`StateStore::commit_ranged_with`].

use super::*;

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
    pub(super) dir: std::path::PathBuf,
    pub(super) bits: u32,
    pub(super) sizes: Vec<u64>,
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
