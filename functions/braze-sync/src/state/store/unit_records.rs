//! The records one unit of a ranged commit applies: its new ranges' spill files (the
//! segments' records, then their share of the extra ones). They are read again for each step
//! (fingerprints into the snapshot, the delta's records, the identifiers), never held decoded:
//! decoded they take 32 bytes a record, several times the range's own size when a run
//! confirmed most of its users (a first sync handing over), so the unit's memory stays the
//! range's snapshot and at most one encoded object.

use std::ops::Range;
use std::path::Path;

use super::record_spill::SpilledRecords;
use super::{StateError, corrupt_spill, read16};
use crate::model::UserKey;
use crate::state::confirmed::{SegmentWriter, Snapshot};

/// One spilled record.
enum Entry<'b> {
    /// A confirmed fingerprint.
    Fp { key: u128, slot: u16, fp: u64 },
    /// An identifier learned.
    Id { key: u128, id: &'b str },
}

/// What a unit's records hold, counted while their fingerprints were applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Counted {
    /// Fingerprint records.
    pub records: u64,
    /// Identifiers.
    pub ids: u64,
    /// Bytes the identifiers take in a segment ([`SegmentWriter::id_len`] each).
    pub id_bytes: usize,
}

/// The spill files of one unit, in the order their records apply.
pub(super) struct UnitRecords<'a> {
    sources: Vec<(&'a Path, usize)>,
}

impl<'a> UnitRecords<'a> {
    /// The records of new ranges `new` (at `nb` bits): each range's own spill file under
    /// `spill`, then its sub-ranges' share of `extra` (spilled at finer bits).
    pub fn of(
        spill: &'a Path,
        new: Range<usize>,
        nb: u32,
        extra: Option<&'a SpilledRecords>,
    ) -> Self {
        let mut sources = Vec::new();
        for s in new {
            sources.push((spill, s));
            if let Some(x) = extra {
                let sub = x.bits - nb;
                sources.extend(((s << sub)..((s + 1) << sub)).map(|t| (x.dir.as_path(), t)));
            }
        }
        Self { sources }
    }

    fn each(&self, mut f: impl FnMut(Entry<'_>)) -> Result<(), StateError> {
        for &(dir, s) in &self.sources {
            crate::state::spill::read_range::<StateError>(dir, s, &mut |b| {
                let key = b
                    .get(1..17)
                    .map(|k| u128::from_le_bytes(read16(k)))
                    .ok_or_else(|| corrupt_spill(dir, s))?;
                match b.first() {
                    Some(0) if b.len() == 27 => {
                        let slot = u16::from_le_bytes([b[17], b[18]]);
                        let mut fp = [0u8; 8];
                        fp.copy_from_slice(&b[19..27]);
                        f(Entry::Fp {
                            key,
                            slot,
                            fp: u64::from_le_bytes(fp),
                        });
                    }
                    Some(1) => {
                        let id =
                            std::str::from_utf8(&b[17..]).map_err(|_| corrupt_spill(dir, s))?;
                        f(Entry::Id { key, id });
                    }
                    _ => return Err(corrupt_spill(dir, s)),
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Sets every fingerprint in `snap`, in order; counts the records and identifiers.
    pub fn apply_fingerprints(&self, snap: &mut Snapshot) -> Result<Counted, StateError> {
        let mut c = Counted::default();
        self.each(|e| match e {
            Entry::Fp { key, slot, fp } => {
                snap.set(UserKey(key), slot as usize, fp);
                c.records += 1;
            }
            Entry::Id { id, .. } => {
                c.ids += 1;
                c.id_bytes += SegmentWriter::id_len(id);
            }
        })?;
        Ok(c)
    }

    /// Appends every fingerprint record to `delta`, in order.
    pub fn write_records(&self, delta: &mut SegmentWriter) -> Result<(), StateError> {
        self.each(|e| {
            if let Entry::Fp { key, slot, fp } = e {
                delta.record(key, slot, fp);
            }
        })
    }

    /// Sets every identifier in `snap` (after the fingerprints: a user new to the state
    /// exists once its first fingerprint is set), appending each to `delta` when given.
    pub fn apply_ids(
        &self,
        snap: &mut Snapshot,
        mut delta: Option<&mut SegmentWriter>,
    ) -> Result<(), StateError> {
        self.each(|e| {
            if let Entry::Id { key, id } = e {
                snap.set_identifier(UserKey(key), id);
                if let Some(d) = delta.as_deref_mut() {
                    d.id(key, id);
                }
            }
        })
    }
}
