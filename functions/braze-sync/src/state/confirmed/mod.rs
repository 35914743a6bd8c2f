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

use std::collections::HashMap;

use crate::config::route::Route;
use crate::model::{Fingerprint, Identifier, UserDelta, UserKey};
use crate::vocab::ROW_DIGEST;

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

impl Snapshot {
    /// An empty state with this slot layout; `keep_ids` keeps users' identifiers (routes
    /// that track departures).
    pub fn empty(names: Vec<String>, keep_ids: bool) -> Self {
        let slot_of = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u16))
            .collect();
        let (keys, fps, buckets) = SPARE
            .try_with(|s| s.borrow_mut().take())
            .ok()
            .flatten()
            .unwrap_or_default();
        let mut s = Self {
            names,
            slot_of,
            keys,
            fps,
            bucket_bits: 0,
            buckets,
            ov_index: HashMap::new(),
            ov_keys: Vec::new(),
            ov_fps: Vec::new(),
            ids: keep_ids.then(IdTable::default),
            new_ids: HashMap::new(),
        };
        s.rebuild_buckets();
        s
    }

    /// Drops this state, keeping its arrays' memory for the next snapshot this thread makes
    /// (one hash range after another in a diff worker).
    pub fn recycle(mut self) {
        let mut keys = std::mem::take(&mut self.keys);
        let mut fps = std::mem::take(&mut self.fps);
        let mut buckets = std::mem::take(&mut self.buckets);
        drop(self);
        keys.clear();
        fps.clear();
        buckets.clear();
        let _ = SPARE.try_with(|s| *s.borrow_mut() = Some((keys, fps, buckets)));
    }

    /// An empty state laid out for `route`.
    pub fn for_route(route: &Route) -> Self {
        Self::empty(route.state_names(), route.tracks_departures())
    }

    /// Attribute names in slot order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.names.len()
    }

    /// Whether identifiers are kept.
    pub fn keeps_ids(&self) -> bool {
        self.ids.is_some()
    }

    /// Users known (base and overlay).
    pub fn len(&self) -> usize {
        self.keys.len() + self.ov_keys.len()
    }

    /// True when no user is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Users in the base (the range of [`UserState::index`]).
    pub fn base_len(&self) -> usize {
        self.keys.len()
    }

    /// Approximate heap bytes held.
    pub fn memory_bytes(&self) -> usize {
        self.keys.capacity() * 16
            + self.fps.capacity()
            + self.buckets.capacity() * 4
            + self.ov_keys.capacity() * 16
            + self.ov_fps.capacity()
            + self.ov_index.capacity() * 36
            + self
                .ids
                .as_ref()
                .map_or(0, |t| t.ends.capacity() * 8 + t.arena.capacity())
            + self.new_ids.values().map(|v| 48 + v.len()).sum::<usize>()
    }

    fn row_bytes(&self) -> usize {
        FP_BYTES * self.slots()
    }

    fn bucket_of(&self, key: u128) -> usize {
        if self.bucket_bits == 0 {
            0
        } else {
            (key >> (128 - self.bucket_bits)) as usize
        }
    }

    fn rebuild_buckets(&mut self) {
        let n = self.keys.len();
        let bits = if n < 16 { 0 } else { (n / 4).ilog2().min(24) };
        self.bucket_bits = bits;
        let nb = 1usize << bits;
        let mut buckets = std::mem::take(&mut self.buckets);
        buckets.clear();
        buckets.reserve(nb + 1);
        let mut i = 0usize;
        for b in 0..nb {
            while i < n && self.bucket_of(self.keys[i]) < b {
                i += 1;
            }
            buckets.push(i as u32);
        }
        buckets.push(n as u32);
        self.buckets = buckets;
    }

    /// The slot of attribute (or [`ROW_DIGEST`]) `name` in this layout.
    pub fn slot_of_name(&self, name: &str) -> Option<usize> {
        self.slot_of.get(name).map(|s| *s as usize)
    }

    /// The base index of a user.
    pub fn find(&self, key: UserKey) -> Option<usize> {
        let b = self.bucket_of(key.0);
        let lo = *self.buckets.get(b)? as usize;
        let hi = *self.buckets.get(b + 1)? as usize;
        let range = self.keys.get(lo..hi)?;
        if range.len() <= 16 {
            range.iter().position(|k| *k == key.0).map(|i| lo + i)
        } else {
            range.binary_search(&key.0).ok().map(|i| lo + i)
        }
    }

    /// A user's confirmed state, `None` for a user Braze never confirmed.
    pub fn get(&self, key: UserKey) -> Option<UserState<'_>> {
        let rb = self.row_bytes();
        if let Some(i) = self.find(key) {
            return Some(UserState {
                index: Some(i),
                fps: &self.fps[i * rb..(i + 1) * rb],
            });
        }
        let j = *self.ov_index.get(&key.0)? as usize;
        Some(UserState {
            index: None,
            fps: &self.ov_fps[j * rb..(j + 1) * rb],
        })
    }

    /// Slot `slot`'s stored value for every base user, in base order (`0`: none): one compact
    /// column for a diff that reads that slot of most users (the row digest), so each lookup
    /// touches 8 bytes instead of a user's whole row.
    /// Written into `out` (cleared first, its memory reused).
    pub fn base_column_into(&self, slot: usize, out: &mut Vec<u64>) {
        out.clear();
        let rb = self.row_bytes();
        if slot >= self.slots() || rb == 0 {
            out.resize(self.keys.len(), 0);
            return;
        }
        out.extend(
            self.fps
                .chunks_exact(rb)
                .map(|row| get_fp(&row[slot * FP_BYTES..])),
        );
    }

    /// The key and state of base user `index`.
    pub fn base_user(&self, index: usize) -> Option<(UserKey, UserState<'_>)> {
        let rb = self.row_bytes();
        let k = *self.keys.get(index)?;
        Some((
            UserKey(k),
            UserState {
                index: Some(index),
                fps: self.fps.get(index * rb..(index + 1) * rb)?,
            },
        ))
    }

    /// Users in the overlay, in the order they were added.
    pub fn overlay_users(&self) -> impl Iterator<Item = (UserKey, UserState<'_>)> {
        let rb = self.row_bytes();
        self.ov_keys.iter().enumerate().map(move |(j, k)| {
            (
                UserKey(*k),
                UserState {
                    index: None,
                    fps: &self.ov_fps[j * rb..(j + 1) * rb],
                },
            )
        })
    }

    /// The identifier kept for a user (routes that track departures only).
    pub fn identifier(&self, key: UserKey) -> Option<Identifier> {
        if let Some(t) = self.new_ids.get(&key.0) {
            return parse_identifier(t);
        }
        let table = self.ids.as_ref()?;
        let i = self.find(key)?;
        parse_identifier(table.get(i)?)
    }

    /// Remembers a user's identifier (no-op unless identifiers are kept).
    pub fn set_identifier(&mut self, key: UserKey, text: &str) {
        if self.ids.is_none() {
            return;
        }
        if let (Some(t), Some(i)) = (&self.ids, self.find(key))
            && t.get(i).is_some()
        {
            return;
        }
        self.new_ids.insert(key.0, text.into());
    }

    /// Records one confirmed fingerprint (`stored` as from [`stored_fp`]; 0 = removed).
    pub fn set(&mut self, key: UserKey, slot: usize, stored: u64) {
        if slot >= self.slots() {
            return;
        }
        let rb = self.row_bytes();
        if let Some(i) = self.find(key) {
            put_fp(&mut self.fps[i * rb + slot * FP_BYTES..], stored);
            return;
        }
        let j = match self.ov_index.get(&key.0) {
            Some(j) => *j as usize,
            None if stored == 0 => return,
            None => {
                let j = self.ov_keys.len();
                self.ov_index.insert(key.0, j as u32);
                self.ov_keys.push(key.0);
                self.ov_fps.resize(self.ov_fps.len() + rb, 0);
                j
            }
        };
        put_fp(&mut self.ov_fps[j * rb + slot * FP_BYTES..], stored);
    }

    /// The confirm step, in memory: Braze accepted `delta`, so its values become the
    /// confirmed state. Attributes the layout does not know are ignored.
    pub fn apply_confirmed(&mut self, delta: &UserDelta) {
        let key = delta.user_key();
        for c in &delta.changes {
            if let Some(&slot) = self.slot_of.get(&c.name) {
                self.set(key, slot as usize, c.fingerprint.map_or(0, stored_fp));
            }
        }
        if let Some(&slot) = self.slot_of.get(ROW_DIGEST) {
            self.set(
                key,
                slot as usize,
                delta.row_digest.map_or(0, stored_digest),
            );
        }
        if self.ids.is_some() {
            self.set_identifier(key, &identifier_text(&delta.identifier));
        }
    }

    /// Merges the overlay (and identifiers learned) into the sorted base, in place: the base
    /// arrays grow by the overlay's size and are merged from the back, so no second copy of
    /// the state is ever held.
    pub fn compact(&mut self) {
        if self.ov_keys.is_empty() && self.new_ids.is_empty() {
            return;
        }
        let rb = self.row_bytes();
        let base_n = self.keys.len();
        let ov_n = self.ov_keys.len();
        self.ov_index = HashMap::new();
        // Overlay rows in key order.
        let mut order: Vec<u32> = (0..ov_n as u32).collect();
        order.sort_unstable_by_key(|&j| self.ov_keys[j as usize]);
        // Identifiers: the final id of every output row, computed before keys move.
        let new_ids = std::mem::take(&mut self.new_ids);
        if let Some(table) = self.ids.take() {
            self.ids = Some(merge_ids(
                table,
                &self.keys,
                &self.ov_keys,
                &order,
                &new_ids,
            ));
        }
        let total = base_n + ov_n;
        self.keys.resize(total, 0);
        self.fps.resize(total * rb, 0);
        let (mut i, mut j, mut k) = (base_n, ov_n, total);
        while j > 0 {
            let oj = order[j - 1] as usize;
            let ok = self.ov_keys[oj];
            k -= 1;
            if i > 0 && self.keys[i - 1] > ok {
                i -= 1;
                self.keys[k] = self.keys[i];
                self.fps.copy_within(i * rb..(i + 1) * rb, k * rb);
            } else {
                j -= 1;
                self.keys[k] = ok;
                self.fps[k * rb..(k + 1) * rb]
                    .copy_from_slice(&self.ov_fps[oj * rb..(oj + 1) * rb]);
            }
        }
        self.ov_keys = Vec::new();
        self.ov_fps = Vec::new();
        self.rebuild_buckets();
    }

    /// Encodes the base (call [`Snapshot::compact`] first) as shards of at most about
    /// `max_shard_bytes` each, in key order, one shard at a time.
    pub fn base_shards(&self, max_shard_bytes: usize) -> impl Iterator<Item = Vec<u8>> + '_ {
        let per_user = 16 + self.row_bytes();
        let per_shard = (max_shard_bytes / per_user).max(1);
        let n = self.keys.len();
        let count = n.div_ceil(per_shard).max(1);
        (0..count).map(move |s| {
            let start = s * per_shard;
            let end = (start + per_shard).min(n);
            self.encode_range(start, end)
        })
    }

    /// The base users of hash range `range` (of `1 << bits` ranges): a contiguous run of
    /// base indexes, since the base is sorted by key.
    pub fn range_span(&self, range: usize, bits: u32) -> std::ops::Range<usize> {
        let start = self.keys.partition_point(|k| range_of(*k, bits) < range);
        let end = self.keys.partition_point(|k| range_of(*k, bits) <= range);
        start..end
    }

    /// Encodes the base users of hash range `range` as one base shard (call
    /// [`Snapshot::compact`] first); returns the shard and its user count.
    pub fn encode_hash_range(&self, range: usize, bits: u32) -> (Vec<u8>, u64) {
        let span = self.range_span(range, bits);
        let n = span.len() as u64;
        (self.encode_range(span.start, span.end), n)
    }

    #[cfg(test)]
    /// All shards at once (tests and small states).
    pub fn encode_base(&self, max_shard_bytes: usize) -> Vec<Vec<u8>> {
        self.base_shards(max_shard_bytes).collect()
    }

    fn encode_range(&self, start: usize, end: usize) -> Vec<u8> {
        let rb = self.row_bytes();
        let flags = if self.ids.is_some() { FLAG_IDS } else { 0 };
        let mut buf = header(KIND_BASE, flags, &self.names, (end - start) as u64);
        buf.reserve((end - start) * (16 + rb) + 4);
        for i in start..end {
            buf.extend_from_slice(&self.keys[i].to_le_bytes());
            buf.extend_from_slice(&self.fps[i * rb..(i + 1) * rb]);
        }
        if let Some(t) = &self.ids {
            for i in start..end {
                put_str(&mut buf, t.get(i).unwrap_or(""));
            }
        }
        seal(&mut buf);
        buf
    }

    /// Appends one base shard (its keys must follow the ones already loaded), remapping its
    /// attributes onto this snapshot's layout by name. The checksum and header are checked
    /// before anything is loaded; the records are decoded by
    /// [`Snapshot::load_base_shard_stream`].
    pub fn load_base_shard(&mut self, bytes: &[u8], what: &str) -> Result<(), SnapshotError> {
        let h = open(bytes, what)?;
        if h.kind != KIND_BASE {
            return Err(format_err(what, "not a base shard"));
        }
        let mut body = bytes;
        self.load_base_shard_stream(&mut body, bytes.len() as u64, what)
    }

    /// Appends one base shard read from a stream of `size` bytes (an S3 body), decoded as it
    /// arrives through one small buffer instead of the whole object in memory: a range's
    /// load needs its decoded arrays only, not a second copy of its shard. Attributes are
    /// remapped onto this snapshot's layout by name. The checksum is checked at the end; on
    /// any error the caller drops this snapshot.
    pub fn load_base_shard_stream(
        &mut self,
        r: &mut dyn std::io::Read,
        size: u64,
        what: &str,
    ) -> Result<(), SnapshotError> {
        let mut st = CrcStream::new(r, what);
        let head = st.take(8 + 3 + 2)?;
        if head[..7] != MAGIC[..7] {
            return Err(format_err(what, "bad magic"));
        }
        if head[7] != MAGIC[7] {
            return Err(format_err(what, &format!("format version {}", head[7])));
        }
        if head[8] != KIND_BASE {
            return Err(format_err(what, "not a base shard"));
        }
        if head[9] as usize != FP_BYTES {
            return Err(format_err(what, "unexpected fingerprint width"));
        }
        let flags = head[10];
        let n_names = u16::from_le_bytes(read_array(&head[11..13])) as usize;
        let mut names = Vec::with_capacity(n_names);
        for _ in 0..n_names {
            let len = u16::from_le_bytes(read_array(st.take(2)?)) as usize;
            let name = std::str::from_utf8(st.take(len)?)
                .map_err(|_| format_err(what, "truncated names"))?
                .to_string();
            names.push(name);
        }
        let records = u64::from_le_bytes(read_array(st.take(8)?));
        let remap: Vec<Option<usize>> = self
            .names
            .iter()
            .map(|n| names.iter().position(|m| m == n))
            .collect();
        let same_prefix = {
            let n = remap
                .iter()
                .enumerate()
                .take_while(|(i, m)| **m == Some(*i))
                .count();
            remap[n..].iter().all(Option::is_none).then_some(n)
        };
        let rec = 16 + names.len() * FP_BYTES;
        // The count is not trusted before the checksum: it must fit the object's size.
        let n = usize::try_from(records)
            .ok()
            .filter(|n| n.checked_mul(rec).is_some_and(|b| b as u64 <= size))
            .ok_or_else(|| format_err(what, "record count does not match the length"))?;
        self.keys.reserve(n);
        self.fps.reserve(n * self.row_bytes());
        let mut last = self.keys.last().copied();
        let mut left = n;
        while left > 0 {
            let block = st.take_records(rec, left)?;
            left -= block.len() / rec;
            for r in block.chunks_exact(rec) {
                let key = u128::from_le_bytes(read_array(&r[..16]));
                if last.is_some_and(|l| l >= key) {
                    return Err(format_err(what, "keys are not in ascending order"));
                }
                last = Some(key);
                self.keys.push(key);
                let src = &r[16..];
                if let Some(k) = same_prefix {
                    self.fps.extend_from_slice(&src[..k * FP_BYTES]);
                    self.fps
                        .resize(self.fps.len() + (remap.len() - k) * FP_BYTES, 0);
                } else {
                    for m in &remap {
                        match m {
                            Some(j) => self
                                .fps
                                .extend_from_slice(&src[j * FP_BYTES..(j + 1) * FP_BYTES]),
                            None => self.fps.extend_from_slice(&[0u8; FP_BYTES]),
                        }
                    }
                }
            }
        }
        if let Some(t) = &mut self.ids {
            for _ in 0..n {
                if flags & FLAG_IDS != 0 {
                    let len = u16::from_le_bytes(read_array(st.take(2)?)) as usize;
                    let id = std::str::from_utf8(st.take(len)?)
                        .map_err(|_| format_err(what, "truncated identifier section"))?;
                    t.push(Some(id));
                } else {
                    t.push(None);
                }
            }
        } else if flags & FLAG_IDS != 0 {
            for _ in 0..n {
                let len = u16::from_le_bytes(read_array(st.take(2)?)) as usize;
                st.take(len)?;
            }
        }
        st.finish()?;
        self.rebuild_buckets();
        Ok(())
    }

    /// Applies a checkpoint segment on top of the state; returns the records applied.
    pub fn apply_segment(&mut self, bytes: &[u8], what: &str) -> Result<u64, SnapshotError> {
        let h = open(bytes, what)?;
        if h.kind != KIND_SEGMENT {
            return Err(format_err(what, "not a checkpoint segment"));
        }
        let remap: Vec<Option<usize>> = h
            .names
            .iter()
            .map(|n| self.slot_of.get(n).map(|s| *s as usize))
            .collect();
        let mut ids = Vec::new();
        for_each_segment_entry(
            &h,
            what,
            |key, slot, fp| {
                if let Some(Some(target)) = remap.get(slot) {
                    self.set(UserKey(key), *target, fp);
                }
            },
            |key, id| ids.push((key, id)),
        )?;
        for (key, id) in ids {
            self.set_identifier(UserKey(key), id);
        }
        Ok(h.records)
    }
}

/// The identifier table after merging `ov_keys` (visited in `order`) into `keys`, with ids
/// learned since the last compaction. Built by growing the arena and filling it from the back.
fn merge_ids(
    mut table: IdTable,
    keys: &[u128],
    ov_keys: &[u128],
    order: &[u32],
    new_ids: &HashMap<u128, Box<str>>,
) -> IdTable {
    let base_n = keys.len();
    let total = base_n + ov_keys.len();
    let span = |ends: &[u64], i: usize| -> (usize, usize) {
        let end = ends.get(i).copied().unwrap_or(0) as usize;
        let start = if i == 0 {
            0
        } else {
            ends.get(i - 1).copied().unwrap_or(0) as usize
        };
        (start, end.max(start))
    };
    let base_id_len = |ends: &[u64], i: usize| -> usize {
        let (a, b) = span(ends, i);
        if b > a {
            b - a
        } else {
            new_ids.get(&keys[i]).map_or(0, |s| s.len())
        }
    };
    // Final size.
    let mut size = 0usize;
    for i in 0..base_n {
        size += base_id_len(&table.ends, i);
    }
    for k in ov_keys {
        size += new_ids.get(k).map_or(0, |s| s.len());
    }
    table.ends.resize(base_n, 0);
    table.arena.resize(size.max(table.arena.len()), 0);
    table.ends.resize(total, 0);
    let (mut i, mut j, mut k) = (base_n, ov_keys.len(), total);
    let mut write_end = size;
    while k > 0 {
        k -= 1;
        let row_end = write_end;
        let take_base = j == 0 || (i > 0 && keys[i - 1] > ov_keys[order[j - 1] as usize]);
        if take_base {
            i -= 1;
            let (a, b) = span(&table.ends, i);
            if b > a {
                table.arena.copy_within(a..b, write_end - (b - a));
                write_end -= b - a;
            } else if let Some(id) = new_ids.get(&keys[i]) {
                let bytes = id.as_bytes();
                table.arena[write_end - bytes.len()..write_end].copy_from_slice(bytes);
                write_end -= bytes.len();
            }
        } else {
            j -= 1;
            let key = ov_keys[order[j] as usize];
            let bytes = new_ids.get(&key).map_or(&[][..], |s| s.as_bytes());
            table.arena[write_end - bytes.len()..write_end].copy_from_slice(bytes);
            write_end -= bytes.len();
        }
        table.ends[k] = row_end as u64;
    }
    table.arena.truncate(size);
    table
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let len = b.len().min(u16::MAX as usize);
    buf.extend_from_slice(&(len as u16).to_le_bytes());
    buf.extend_from_slice(&b[..len]);
}

/// Walks a checkpoint segment's body: `record(key, slot, fingerprint)` for each fixed-size
/// record, then, when the segment carries them, `id(key, identifier)` for each identifier.
fn for_each_segment_entry<'b>(
    h: &Opened<'b>,
    what: &str,
    mut record: impl FnMut(u128, usize, u64),
    mut id: impl FnMut(u128, &'b str),
) -> Result<(), SnapshotError> {
    let rec = 16 + 2 + FP_BYTES;
    let n = usize::try_from(h.records).map_err(|_| format_err(what, "too many records"))?;
    let fixed = n
        .checked_mul(rec)
        .filter(|l| *l <= h.body.len())
        .ok_or_else(|| format_err(what, "record count does not match the length"))?;
    let (mut body, mut ids) = h.body.split_at(fixed);
    while body.len() >= rec {
        let key = u128::from_le_bytes(read_array(&body[..16]));
        let slot = u16::from_le_bytes(read_array(&body[16..18])) as usize;
        record(key, slot, get_fp(&body[18..]));
        body = &body[rec..];
    }
    if h.flags & FLAG_IDS == 0 {
        return Ok(());
    }
    let truncated = || format_err(what, "truncated identifier section");
    let count = ids
        .get(..8)
        .map(|b| u64::from_le_bytes(read_array(b)))
        .ok_or_else(truncated)?;
    ids = &ids[8..];
    for _ in 0..count {
        let key = ids
            .get(..16)
            .map(|b| u128::from_le_bytes(read_array(b)))
            .ok_or_else(truncated)?;
        ids = &ids[16..];
        id(key, take_str(&mut ids).ok_or_else(truncated)?);
    }
    Ok(())
}

fn take_str<'b>(b: &mut &'b [u8]) -> Option<&'b str> {
    let len = u16::from_le_bytes(read_array(b.get(..2)?)) as usize;
    let s = std::str::from_utf8(b.get(2..2 + len)?).ok()?;
    *b = &b[2 + len..];
    Some(s)
}

fn read_array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

fn format_err(what: &str, detail: &str) -> SnapshotError {
    SnapshotError::Format {
        what: what.to_string(),
        detail: detail.to_string(),
    }
}

fn header(kind: u8, flags: u8, names: &[String], n: u64) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64 + names.iter().map(|n| n.len() + 2).sum::<usize>());
    buf.extend_from_slice(MAGIC);
    buf.push(kind);
    buf.push(FP_BYTES as u8);
    buf.push(flags);
    buf.extend_from_slice(&(names.len() as u16).to_le_bytes());
    for name in names {
        put_str(&mut buf, name);
    }
    buf.extend_from_slice(&n.to_le_bytes());
    buf
}

fn seal(buf: &mut Vec<u8>) {
    let crc = crc32fast::hash(buf);
    buf.extend_from_slice(&crc.to_le_bytes());
}

struct Opened<'b> {
    kind: u8,
    flags: u8,
    names: Vec<String>,
    records: u64,
    body: &'b [u8],
}

/// Checks magic, version and checksum, and splits the header from the records.
fn open<'b>(bytes: &'b [u8], what: &str) -> Result<Opened<'b>, SnapshotError> {
    if bytes.len() < 8 + 3 + 2 + 8 + 4 || bytes[..7] != MAGIC[..7] {
        return Err(format_err(what, "bad magic"));
    }
    if bytes[7] != MAGIC[7] {
        return Err(format_err(what, &format!("format version {}", bytes[7])));
    }
    let (content, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(content) != u32::from_le_bytes(read_array(crc)) {
        return Err(SnapshotError::Checksum {
            what: what.to_string(),
        });
    }
    let kind = content[8];
    if content[9] as usize != FP_BYTES {
        return Err(format_err(what, "unexpected fingerprint width"));
    }
    let flags = content[10];
    let n_names = u16::from_le_bytes(read_array(&content[11..13])) as usize;
    let mut rest = &content[13..];
    let mut names = Vec::with_capacity(n_names);
    for _ in 0..n_names {
        names.push(
            take_str(&mut rest)
                .ok_or_else(|| format_err(what, "truncated names"))?
                .to_string(),
        );
    }
    let records = rest
        .get(..8)
        .map(|b| u64::from_le_bytes(read_array(b)))
        .ok_or_else(|| format_err(what, "truncated header"))?;
    Ok(Opened {
        kind,
        flags,
        names,
        records,
        body: &rest[8..],
    })
}

/// An object read from a stream: hands out its content (every byte but the trailing CRC-32)
/// in order, hashing it, through one reused buffer; [`CrcStream::finish`] checks the CRC.
struct CrcStream<'r> {
    r: &'r mut dyn std::io::Read,
    buf: Vec<u8>,
    at: usize,
    end: usize,
    eof: bool,
    crc: crc32fast::Hasher,
    what: &'r str,
}

impl<'r> CrcStream<'r> {
    fn new(r: &'r mut dyn std::io::Read, what: &'r str) -> Self {
        Self {
            r,
            buf: vec![0; 256 * 1024],
            at: 0,
            end: 0,
            eof: false,
            crc: crc32fast::Hasher::new(),
            what,
        }
    }

    /// Reads until `n` content bytes are buffered (4 more may be the CRC), or the end.
    fn fill(&mut self, n: usize) -> Result<(), SnapshotError> {
        while self.end - self.at < n + 4 && !self.eof {
            if self.at > 0 {
                self.buf.copy_within(self.at..self.end, 0);
                self.end -= self.at;
                self.at = 0;
            }
            if self.end == self.buf.len() {
                let want = (n + 4).max(self.buf.len() * 2);
                self.buf.resize(want, 0);
            }
            let k = loop {
                match self.r.read(&mut self.buf[self.end..]) {
                    Ok(k) => break k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        return Err(format_err(self.what, &format!("reading the object: {e}")));
                    }
                }
            };
            if k == 0 {
                self.eof = true;
            }
            self.end += k;
        }
        Ok(())
    }

    /// Content bytes buffered (not counting a possible trailing CRC).
    fn available(&self) -> usize {
        (self.end - self.at).saturating_sub(4)
    }

    /// The next `n` content bytes.
    fn take(&mut self, n: usize) -> Result<&[u8], SnapshotError> {
        self.fill(n)?;
        if self.available() < n {
            return Err(format_err(self.what, "truncated"));
        }
        let s = &self.buf[self.at..self.at + n];
        self.crc.update(s);
        self.at += n;
        Ok(s)
    }

    /// The next whole records of `rec` bytes, at least one and at most `max`.
    fn take_records(&mut self, rec: usize, max: usize) -> Result<&[u8], SnapshotError> {
        self.fill(rec)?;
        let n = (self.available() / rec).min(max);
        if n == 0 {
            return Err(format_err(
                self.what,
                "record count does not match the length",
            ));
        }
        self.take(n * rec)
    }

    /// Checks that exactly the CRC is left and that it matches.
    fn finish(mut self) -> Result<(), SnapshotError> {
        self.fill(1)?;
        if self.end - self.at != 4 || !self.eof {
            return Err(format_err(self.what, "trailing bytes after the records"));
        }
        let stored = u32::from_le_bytes(read_array(&self.buf[self.at..self.end]));
        if self.crc.finalize() != stored {
            return Err(SnapshotError::Checksum {
                what: self.what.to_string(),
            });
        }
        Ok(())
    }
}

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
        let flags = if keep_ids { FLAG_IDS } else { 0 };
        let mut buf = header(KIND_SEGMENT, flags, names, self.records.len() as u64);
        buf.reserve(self.records.len() * (18 + FP_BYTES) + 8);
        for (key, slot, fp) in &self.records {
            buf.extend_from_slice(&key.to_le_bytes());
            buf.extend_from_slice(&slot.to_le_bytes());
            let mut b = [0u8; FP_BYTES];
            put_fp(&mut b, *fp);
            buf.extend_from_slice(&b);
        }
        if keep_ids {
            buf.extend_from_slice(&(self.ids.len() as u64).to_le_bytes());
            for (key, id) in &self.ids {
                buf.extend_from_slice(&key.to_le_bytes());
                put_str(&mut buf, id);
            }
        }
        seal(&mut buf);
        buf
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::{AttributeChange, RowPos, fingerprint};
    use serde_json::{Value, json};

    fn delta(id: &str, changes: &[(&str, Value)]) -> UserDelta {
        UserDelta {
            identifier: Identifier::ExternalId(id.into()),
            pos: RowPos::default(),
            changes: changes
                .iter()
                .map(|(n, v)| AttributeChange {
                    name: (*n).into(),
                    value: v.clone(),
                    fingerprint: (!v.is_null()).then(|| fingerprint(v)),
                })
                .collect(),
            update_existing_only: true,
            is_new: false,
            row_digest: None,
        }
    }

    fn names() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    #[test]
    fn confirmed_values_are_found_after_compaction_and_round_trip_through_bytes() {
        for keep_ids in [false, true] {
            let mut s = Snapshot::empty(names(), keep_ids);
            for i in 0..1000 {
                s.apply_confirmed(&delta(
                    &i.to_string(),
                    &[("a", json!(i)), ("b", json!("x"))],
                ));
            }
            s.apply_confirmed(&delta("7", &[("b", Value::Null)]));
            s.compact();
            assert_eq!(s.len(), 1000);
            let k = Identifier::ExternalId("7".into()).user_key();
            let st = s.get(k).unwrap();
            assert_eq!(st.fp(0), Some(stored_fp(fingerprint(&json!(7)))));
            assert_eq!(st.fp(1), None);
            let shards = s.encode_base(10_000);
            assert!(shards.len() > 1);
            let mut back = Snapshot::empty(names(), keep_ids);
            for (i, sh) in shards.iter().enumerate() {
                back.load_base_shard(sh, &format!("shard {i}")).unwrap();
            }
            assert_eq!(back.keys, s.keys);
            assert_eq!(back.fps, s.fps);
            for i in 0..1000 {
                let id = Identifier::ExternalId(i.to_string());
                assert!(back.get(id.user_key()).is_some());
                let expect = keep_ids.then(|| id.clone());
                assert_eq!(back.identifier(id.user_key()), expect);
            }
            assert!(
                back.get(Identifier::ExternalId("nope".into()).user_key())
                    .is_none()
            );
        }
    }

    /// A reader handing out at most `step` bytes per call.
    struct Trickle<'b>(&'b [u8], usize);
    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.len().min(out.len()).min(self.1);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_shard_streamed_in_any_pieces_loads_as_from_bytes_and_a_bad_one_is_refused() {
        for keep_ids in [false, true] {
            let mut s = Snapshot::empty(names(), keep_ids);
            for i in 0..3000 {
                s.apply_confirmed(&delta(
                    &i.to_string(),
                    &[("a", json!(i)), ("b", json!("x"))],
                ));
            }
            s.compact();
            let shard = s.encode_base(1 << 30).remove(0);
            // Read as written, with a slot added since (new layouts end in new slots), and
            // without identifiers kept.
            for (layout, ids) in [
                (names(), keep_ids),
                (vec!["a".into(), "b".into(), "c".into()], keep_ids),
                (vec!["b".into(), "a".into()], false),
            ] {
                let mut want = Snapshot::empty(layout.clone(), ids);
                want.load_base_shard(&shard, "shard").unwrap();
                for step in [1usize, 7, 4096, usize::MAX] {
                    let mut got = Snapshot::empty(layout.clone(), ids);
                    got.load_base_shard_stream(
                        &mut Trickle(&shard, step),
                        shard.len() as u64,
                        "shard",
                    )
                    .unwrap();
                    assert_eq!(got.keys, want.keys, "step {step}");
                    assert_eq!(got.fps, want.fps, "step {step}");
                    let id = Identifier::ExternalId("17".into());
                    assert_eq!(
                        got.identifier(id.user_key()),
                        want.identifier(id.user_key())
                    );
                }
            }
            // A flipped byte, a cut, a trailing byte, a count past the object: refused.
            let mut flipped = shard.clone();
            let mid = flipped.len() / 2;
            flipped[mid] ^= 1;
            let cut = &shard[..shard.len() - 10];
            let mut longer = shard.clone();
            longer.push(0);
            for (bad, what) in [
                (&flipped[..], "flipped"),
                (cut, "cut"),
                (&longer[..], "longer"),
            ] {
                let mut got = Snapshot::empty(names(), keep_ids);
                let err =
                    got.load_base_shard_stream(&mut Trickle(bad, 999), bad.len() as u64, "shard");
                assert!(err.is_err(), "{what}");
            }
            let mut got = Snapshot::empty(names(), keep_ids);
            assert!(
                got.load_base_shard_stream(&mut Trickle(&shard, 999), 100, "shard")
                    .is_err(),
                "a record count past the object's size"
            );
        }
    }

    #[test]
    fn in_place_compaction_matches_a_simple_model() {
        use std::collections::BTreeMap;
        let mut model: BTreeMap<u128, (u64, Identifier)> = BTreeMap::new();
        let mut s = Snapshot::empty(names(), true);
        let mut x = 12345u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..5 {
            for _ in 0..300 {
                let id = Identifier::ExternalId(format!("u{}", next() % 700));
                let v = json!(next() % 5 + round);
                let d = delta_for(&id, &[("a", v.clone())]);
                s.apply_confirmed(&d);
                model.insert(id.user_key().0, (stored_fp(fingerprint(&v)), id));
            }
            s.compact();
            assert_eq!(s.len(), model.len());
            assert!(s.keys.windows(2).all(|w| w[0] < w[1]));
            for (k, (fp, id)) in &model {
                let st = s.get(UserKey(*k)).unwrap();
                assert_eq!(st.fp(0), Some(*fp));
                assert_eq!(s.identifier(UserKey(*k)).as_ref(), Some(id));
            }
        }
    }

    fn delta_for(id: &Identifier, changes: &[(&str, Value)]) -> UserDelta {
        let mut d = delta("x", changes);
        d.identifier = id.clone();
        d
    }

    #[test]
    fn a_flipped_byte_fails_the_checksum() {
        let mut s = Snapshot::empty(names(), false);
        s.apply_confirmed(&delta("1", &[("a", json!(1))]));
        s.compact();
        let mut b = s.encode_base(1 << 20).remove(0);
        let mid = b.len() / 2;
        b[mid] ^= 1;
        let err = Snapshot::empty(names(), false)
            .load_base_shard(&b, "x")
            .unwrap_err();
        assert!(matches!(err, SnapshotError::Checksum { .. }));
    }

    #[test]
    fn segments_apply_in_order_and_remap_by_name() {
        let seg1 = encode_segment(
            &names(),
            &[delta("1", &[("a", json!(1)), ("b", json!(2))])],
            true,
        );
        let seg2 = encode_segment(&names(), &[delta("1", &[("a", Value::Null)])], true);
        // A new layout: "b" kept, "a" dropped, "c" added.
        let mut s = Snapshot::empty(vec!["c".into(), "b".into()], true);
        s.apply_segment(&seg1, "s1").unwrap();
        s.apply_segment(&seg2, "s2").unwrap();
        s.compact();
        let id = Identifier::ExternalId("1".into());
        let st = s.get(id.user_key()).unwrap();
        assert_eq!(st.fp(0), None);
        assert_eq!(st.fp(1), Some(stored_fp(fingerprint(&json!(2)))));
        assert_eq!(s.identifier(id.user_key()), Some(id));
    }

    #[test]
    fn an_empty_state_encodes_to_one_empty_shard() {
        let s = Snapshot::empty(names(), false);
        let shards = s.encode_base(1 << 20);
        assert_eq!(shards.len(), 1);
        let mut back = Snapshot::empty(names(), false);
        back.load_base_shard(&shards[0], "x").unwrap();
        assert!(back.is_empty());
    }

    #[test]
    fn identifier_text_round_trips_and_matches_the_user_key() {
        for id in [
            Identifier::ExternalId("x".into()),
            Identifier::BrazeId("y".into()),
            Identifier::UserAlias {
                name: "n".into(),
                label: "l".into(),
            },
        ] {
            let t = identifier_text(&id);
            assert_eq!(parse_identifier(&t), Some(id.clone()));
            assert_eq!(
                UserKey(xxhash_rust::xxh3::xxh3_128(t.as_bytes())),
                id.user_key()
            );
        }
    }
}
