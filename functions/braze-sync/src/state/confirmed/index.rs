//! The in-memory index of the confirmed state: sorted keys beside the fingerprint slab, the
//! bucket table, the overlay of users confirmed since the last compaction and its in-place
//! merge, and the identifier table.

use super::*;

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

    pub(super) fn row_bytes(&self) -> usize {
        FP_BYTES * self.slots()
    }

    pub(super) fn bucket_of(&self, key: u128) -> usize {
        if self.bucket_bits == 0 {
            0
        } else {
            (key >> (128 - self.bucket_bits)) as usize
        }
    }

    pub(super) fn rebuild_buckets(&mut self) {
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
        // Exactly the merged size: a growth by doubling would hold up to twice the range
        // (and a diff worker's spare arrays keep that capacity for its next range).
        self.keys
            .reserve_exact(total.saturating_sub(self.keys.len()));
        self.fps
            .reserve_exact((total * rb).saturating_sub(self.fps.len()));
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
}

/// The identifier table after merging `ov_keys` (visited in `order`) into `keys`, with ids
/// learned since the last compaction. Built by growing the arena and filling it from the back.
pub(super) fn merge_ids(
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
    table
        .arena
        .reserve_exact(size.saturating_sub(table.arena.len()));
    table.arena.resize(size.max(table.arena.len()), 0);
    table
        .ends
        .reserve_exact(total.saturating_sub(table.ends.len()));
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
