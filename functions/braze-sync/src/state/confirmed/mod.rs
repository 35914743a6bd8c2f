//! The confirmed state of one route: for every user Braze confirmed, a compact fingerprint of
//! the last value Braze accepted for each attribute (no raw values, no raw identifiers).
//!
//! # In memory
//! Users are sorted 128-bit [`UserKey`]s (`keys`) beside a fixed-width slab of fingerprints
//! (`fps`): [`FP_BYTES`] = 6 bytes (48 bits) per attribute, in the route's slot order, `0`
//! meaning "no value confirmed". A bucket table over the top bits of the key finds a user in
//! one or two cache misses. Cost per user: `16 + 6 × attributes` bytes (136 for 20
//! attributes; 10 M users × 20 attributes = 1.36 GB), plus ~1 byte for the bucket table.
//! Users confirmed for the first time go to an overlay (a hash index over an append-only
//! slab) until [`Snapshot::compact`] merges it into the base *in place*, from the back, so
//! compaction never holds two copies of the state: the peak is base + overlay.
//!
//! 48 bits: a changed value goes unnoticed only if its fingerprint collides with the old
//! one's, probability 2⁻⁴⁸ per changed attribute (≈ 1 in 70 years of daily runs changing
//! 4 M attributes each).
//!
//! # Objects (format version 1)
//! Every state object is little-endian:
//!
//! ```text
//! magic       8 bytes  "BZSNAP\0\x01"  (the last byte is the format version)
//! kind        1 byte   1 = base shard, 2 = checkpoint segment
//! fp_bytes    1 byte   6
//! flags       1 byte   bit 0: an identifier section follows the records
//! n_names     u16      attribute names (the slot layout the records use)
//! names       n_names × (u16 length, UTF-8 bytes)
//! n_records   u64
//! records     base:    key u128, then fp_bytes × n_names (0 = no value)
//!             segment: key u128, slot u16, fp (fp_bytes; 0 = removed)
//! identifiers (flag)   base:    one (u16 length, bytes) per record, in record order
//!                      segment: u64 count, then (key u128, u16 length, bytes)
//! crc32       u32      CRC-32 (IEEE) of every byte before it
//! ```
//!
//! # Identifiers
//! Fingerprints and keys cannot be turned back into values or identifiers. The one exception
//! is a route that sends audience removals for users who *left* the export
//! ([`Route::tracks_departures`]): a departed user has no row to take the identifier from,
//! so for those routes the state also keeps each user's Braze identifier (the
//! `external_id`, `braze_id` or alias, as `e\x1f<id>`, `b\x1f<id>` or
//! `a\x1f<label>\x1f<name>`), never any attribute value. Other routes keep none.
//!
//! A base is one or more shards, each holding a contiguous, ascending key range. A segment is
//! the list of confirmed `(user, attribute, fingerprint)` changes of one checkpoint, applied
//! in order on top of the base. Objects carry their names, so a route that adds, drops or
//! reorders attributes still loads its old state: records are remapped by name, and an
//! attribute the state never had is simply "not confirmed" (sent in full on the next run).
//!
//! # The row digest
//! The layout's last slot is not an attribute: [`ROW_DIGEST`] holds the digest of the export
//! row whose values the user's fingerprints are ([`crate::diff::digest`]), written with every
//! confirmed delta (a delta without one, a departure, clears it). A later row with the same
//! digest is unchanged without being mapped. It is an ordinary slot in every object, so a
//! state written before it loads with it empty (every row mapped, as before) and records it
//! as users are confirmed: no format change, no resend.
//!
//! # Files
//! `index.rs` holds the in-memory index (lookup, overlay, compaction), `codec.rs` the objects
//! as bytes (shards, streamed loads, segments applied), `segment.rs` the checkpoint records
//! folded into ranges.

use std::collections::HashMap;

use crate::config::route::Route;
use crate::model::{Fingerprint, Identifier, UserDelta, UserKey};
use crate::vocab::ROW_DIGEST;

mod codec;
mod index;
mod segment;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

use codec::*;
pub use segment::{SegmentData, SegmentWriter, encode_segment, range_of};

/// Bytes per attribute fingerprint.
pub const FP_BYTES: usize = 6;

/// How a row digest is stored in the [`ROW_DIGEST`] slot (48 bits, never 0).
pub fn stored_digest(digest: u64) -> u64 {
    stored_fp(digest)
}
const FP_MASK: u64 = (1 << (8 * FP_BYTES)) - 1;
const MAGIC: &[u8; 8] = b"BZSNAP\0\x01";
/// Object kind byte of a base shard.
pub const KIND_BASE: u8 = 1;
/// Object kind byte of a checkpoint segment.
pub const KIND_SEGMENT: u8 = 2;
const FLAG_IDS: u8 = 1;

/// A fingerprint no value has, recorded for an attribute whose value in Braze is unknown
/// (a drift audit found Braze holding something else): the next export resends the
/// attribute whatever its value, `null` included. Values whose 48-bit fingerprint is all
/// ones (probability 2⁻⁴⁸) would be skipped once; they are resent at their next change.
pub const UNKNOWN_FP: Fingerprint = FP_MASK;

/// The stored form of a fingerprint: its low 48 bits, never 0 (0 means "no value").
pub fn stored_fp(fp: Fingerprint) -> u64 {
    match fp & FP_MASK {
        0 => 1,
        v => v,
    }
}

fn put_fp(out: &mut [u8], v: u64) {
    out[..FP_BYTES].copy_from_slice(&v.to_le_bytes()[..FP_BYTES]);
}

fn get_fp(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    x[..FP_BYTES].copy_from_slice(&b[..FP_BYTES]);
    u64::from_le_bytes(x)
}

/// The canonical text of an identifier (also what its [`UserKey`] hashes).
pub fn identifier_text(id: &Identifier) -> String {
    match id {
        Identifier::ExternalId(i) => format!("e\u{1f}{i}"),
        Identifier::BrazeId(i) => format!("b\u{1f}{i}"),
        Identifier::UserAlias { name, label } => format!("a\u{1f}{label}\u{1f}{name}"),
    }
}

/// The identifier of a canonical text.
pub fn parse_identifier(text: &str) -> Option<Identifier> {
    let (kind, rest) = text.split_once('\u{1f}')?;
    Some(match kind {
        "e" => Identifier::ExternalId(rest.to_string()),
        "b" => Identifier::BrazeId(rest.to_string()),
        "a" => {
            let (label, name) = rest.split_once('\u{1f}')?;
            Identifier::UserAlias {
                name: name.to_string(),
                label: label.to_string(),
            }
        }
        _ => return None,
    })
}

/// A state object that cannot be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    /// Not a state object, or a version we do not read.
    #[error("{what}: not a braze-sync state object of a version we read ({detail})")]
    Format {
        /// Which object.
        what: String,
        /// What was wrong.
        detail: String,
    },
    /// The checksum does not match (corrupt or truncated object).
    #[error("{what}: checksum mismatch (corrupt or truncated)")]
    Checksum {
        /// Which object.
        what: String,
    },
}

/// What a user's confirmed state looks like, for [`crate::diff::user`].
#[derive(Debug, Clone, Copy)]
pub struct UserState<'a> {
    /// Index in the base, for the caller's "seen" bitmap (`None` for overlay users).
    pub index: Option<usize>,
    fps: &'a [u8],
}

impl UserState<'_> {
    /// Reads the first and last byte of the user's row so the memory loads start now, while
    /// other work (mapping the row's values) proceeds; the result is meaningless.
    pub fn touch(&self) -> u8 {
        self.fps.first().copied().unwrap_or(0) ^ self.fps.last().copied().unwrap_or(0)
    }

    /// The stored fingerprint of `slot`, `None` when no value is confirmed.
    pub fn fp(&self, slot: usize) -> Option<u64> {
        let b = self.fps.get(slot * FP_BYTES..(slot + 1) * FP_BYTES)?;
        match get_fp(b) {
            0 => None,
            v => Some(v),
        }
    }
}

/// Identifiers of base users, parallel to the keys (only for routes that track departures).
#[derive(Debug, Clone, Default)]
struct IdTable {
    ends: Vec<u64>,
    arena: Vec<u8>,
}

impl IdTable {
    fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)? as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        let s = std::str::from_utf8(self.arena.get(start..end)?).ok()?;
        (!s.is_empty()).then_some(s)
    }

    fn push(&mut self, id: Option<&str>) {
        if let Some(id) = id {
            self.arena.extend_from_slice(id.as_bytes());
        }
        self.ends.push(self.arena.len() as u64);
    }
}

/// The confirmed state of one route, see the module docs.
#[derive(Debug, Clone)]
pub struct Snapshot {
    names: Vec<String>,
    slot_of: HashMap<String, u16>,
    keys: Vec<u128>,
    fps: Vec<u8>,
    bucket_bits: u32,
    buckets: Vec<u32>,
    ov_index: HashMap<u128, u32>,
    ov_keys: Vec<u128>,
    ov_fps: Vec<u8>,
    ids: Option<IdTable>,
    new_ids: HashMap<u128, Box<str>>,
}

/// The big arrays of a snapshot given back with [`Snapshot::recycle`], emptied.
type Spare = (Vec<u128>, Vec<u8>, Vec<u32>);

thread_local! {
    /// One spare set of arrays per thread: a diff worker loads one hash range after another,
    /// and reusing the last one's memory spares the kernel mapping and zeroing fresh pages for
    /// each (page faults were ~10% of the bounded diff's CPU).
    static SPARE: std::cell::RefCell<Option<Spare>> = const { std::cell::RefCell::new(None) };
}
