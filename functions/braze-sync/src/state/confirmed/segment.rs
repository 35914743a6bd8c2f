//! Checkpoint segments: the records of confirmed changes one checkpoint writes, decoded
//! for folding into ranges, and the hash range a user key falls in.

use super::*;

/// The hash range (of `1 << bits`) a user key falls in: its top `bits` bits.
pub fn range_of(key: u128, bits: u32) -> usize {
    if bits == 0 {
        0
    } else {
        (key >> (128 - bits)) as usize
    }
}

/// The decoded records of a checkpoint segment (or a range delta, which has the same form),
/// remapped onto one layout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentData {
    /// `(user key, slot, stored fingerprint; 0 = removed)`, in the order they apply.
    pub records: Vec<(u128, u16, u64)>,
    /// Identifiers learned, as canonical texts.
    pub ids: Vec<(u128, String)>,
}

impl SegmentData {
    /// Appends a segment's records, remapped by name onto `names` (attributes `names` does
    /// not have are dropped).
    pub fn extend_from(
        &mut self,
        bytes: &[u8],
        what: &str,
        names: &[String],
    ) -> Result<(), SnapshotError> {
        let h = open(bytes, what)?;
        if h.kind != KIND_SEGMENT {
            return Err(format_err(what, "not a checkpoint segment"));
        }
        let remap: Vec<Option<u16>> = h
            .names
            .iter()
            .map(|n| names.iter().position(|m| m == n).map(|i| i as u16))
            .collect();
        self.records
            .reserve(usize::try_from(h.records).unwrap_or_default());
        let (records, ids) = (&mut self.records, &mut self.ids);
        for_each_segment_entry(
            &h,
            what,
            |key, slot, fp| {
                if let Some(Some(target)) = remap.get(slot) {
                    records.push((key, *target, fp));
                }
            },
            |key, id| ids.push((key, id.to_string())),
        )?;
        Ok(())
    }

    /// Splits the records and identifiers by hash range (of `1 << bits`), in one pass,
    /// keeping their order within each range.
    pub fn split(self, bits: u32) -> std::collections::BTreeMap<usize, SegmentData> {
        let mut out: std::collections::BTreeMap<usize, SegmentData> =
            std::collections::BTreeMap::new();
        for r in self.records {
            out.entry(range_of(r.0, bits)).or_default().records.push(r);
        }
        for r in self.ids {
            out.entry(range_of(r.0, bits)).or_default().ids.push(r);
        }
        out
    }

    /// Encodes as a segment object in `names`' layout; `keep_ids` writes the identifiers.
    pub fn encode(&self, names: &[String], keep_ids: bool) -> Vec<u8> {
        let ids = keep_ids.then_some(self.ids.len() as u64);
        let id_bytes: usize = self
            .ids
            .iter()
            .map(|(_, id)| SegmentWriter::id_len(id))
            .sum();
        let mut w = SegmentWriter::new(names, self.records.len() as u64, ids, id_bytes);
        for (key, slot, fp) in &self.records {
            w.record(*key, *slot, *fp);
        }
        if keep_ids {
            for (key, id) in &self.ids {
                w.id(*key, id);
            }
        }
        w.finish()
    }
}

/// Writes a segment object (a checkpoint segment or a range delta) entry by entry into one
/// buffer allocated at its exact size, so a commit can encode a range's delta from its
/// spilled records without holding them decoded: the records first, then, when the segment
/// carries them, the identifiers.
pub struct SegmentWriter {
    buf: Vec<u8>,
    /// The identifiers' count, when the segment carries them.
    ids: Option<u64>,
    /// Whether the count is written (before the first identifier).
    ids_started: bool,
}

impl SegmentWriter {
    /// A segment of `records` records in `names`' layout, with `ids` identifiers taking
    /// `id_bytes` bytes ([`SegmentWriter::id_len`] each) when given.
    pub fn new(names: &[String], records: u64, ids: Option<u64>, id_bytes: usize) -> Self {
        let len = Self::encoded_len(names, records, ids.map(|_| id_bytes));
        let flags = if ids.is_some() { FLAG_IDS } else { 0 };
        let head = header(KIND_SEGMENT, flags, names, records);
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(&head);
        Self {
            buf,
            ids,
            ids_started: false,
        }
    }

    /// Bytes of the segment [`SegmentWriter::new`] writes with these counts (`id_bytes`:
    /// `None` when it carries no identifiers).
    pub fn encoded_len(names: &[String], records: u64, id_bytes: Option<usize>) -> usize {
        let head = MAGIC.len() + 3 + 2 + names.iter().map(|n| Self::str_len(n)).sum::<usize>() + 8;
        let body = usize::try_from(records)
            .unwrap_or(usize::MAX)
            .saturating_mul(Self::RECORD_LEN);
        head.saturating_add(body)
            .saturating_add(id_bytes.map_or(0, |b| 8 + b))
            .saturating_add(4)
    }

    /// Bytes of one record.
    pub const RECORD_LEN: usize = 16 + 2 + FP_BYTES;

    /// Bytes identifier `id` takes (with its user key).
    pub fn id_len(id: &str) -> usize {
        16 + Self::str_len(id)
    }

    fn str_len(s: &str) -> usize {
        2 + s.len().min(u16::MAX as usize)
    }

    /// Appends one record.
    pub fn record(&mut self, key: u128, slot: u16, fp: u64) {
        self.buf.extend_from_slice(&key.to_le_bytes());
        self.buf.extend_from_slice(&slot.to_le_bytes());
        let mut b = [0u8; FP_BYTES];
        put_fp(&mut b, fp);
        self.buf.extend_from_slice(&b);
    }

    /// Appends one identifier (after every record; ignored by a segment without them).
    pub fn id(&mut self, key: u128, id: &str) {
        let Some(n) = self.ids else {
            return;
        };
        if !self.ids_started {
            self.buf.extend_from_slice(&n.to_le_bytes());
            self.ids_started = true;
        }
        self.buf.extend_from_slice(&key.to_le_bytes());
        put_str(&mut self.buf, id);
    }

    /// The sealed segment.
    pub fn finish(mut self) -> Vec<u8> {
        if let Some(n) = self.ids
            && !self.ids_started
        {
            // A segment with identifiers but none appended: the count alone.
            self.buf.extend_from_slice(&n.to_le_bytes());
        }
        seal(&mut self.buf);
        self.buf
    }
}

/// Encodes confirmed deltas as a checkpoint segment in `names`' layout (attributes not in
/// the layout are skipped); `keep_ids` adds the users' identifiers.
pub fn encode_segment(names: &[String], deltas: &[UserDelta], keep_ids: bool) -> Vec<u8> {
    let slot_of: HashMap<&str, u16> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u16))
        .collect();
    let mut records: Vec<u8> = Vec::new();
    let mut n = 0u64;
    let digest_slot = slot_of.get(ROW_DIGEST).copied();
    for d in deltas {
        let key = d.user_key().0.to_le_bytes();
        let fps = d
            .changes
            .iter()
            .filter_map(|c| {
                let slot = *slot_of.get(c.name.as_str())?;
                Some((slot, c.fingerprint.map_or(0, stored_fp)))
            })
            .chain(digest_slot.map(|s| (s, d.row_digest.map_or(0, stored_digest))));
        for (slot, stored) in fps {
            records.extend_from_slice(&key);
            records.extend_from_slice(&slot.to_le_bytes());
            let mut fp = [0u8; FP_BYTES];
            put_fp(&mut fp, stored);
            records.extend_from_slice(&fp);
            n += 1;
        }
    }
    let mut buf = header(KIND_SEGMENT, if keep_ids { FLAG_IDS } else { 0 }, names, n);
    buf.extend_from_slice(&records);
    if keep_ids {
        buf.extend_from_slice(&(deltas.len() as u64).to_le_bytes());
        for d in deltas {
            buf.extend_from_slice(&d.user_key().0.to_le_bytes());
            put_str(&mut buf, &identifier_text(&d.identifier));
        }
    }
    seal(&mut buf);
    buf
}
