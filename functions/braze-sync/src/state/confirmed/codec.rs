//! State objects as bytes: encoding base shards and ranges, loading shards (whole or
//! streamed with a running CRC) and applying checkpoint segments; the object header, seal
//! and framing shared by every object kind.

use super::*;

impl Snapshot {
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

    pub(super) fn encode_range(&self, start: usize, end: usize) -> Vec<u8> {
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

pub(super) fn put_str(buf: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let len = b.len().min(u16::MAX as usize);
    buf.extend_from_slice(&(len as u16).to_le_bytes());
    buf.extend_from_slice(&b[..len]);
}

/// Walks a checkpoint segment's body: `record(key, slot, fingerprint)` for each fixed-size
/// record, then, when the segment carries them, `id(key, identifier)` for each identifier.
pub(super) fn for_each_segment_entry<'b>(
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

pub(super) fn take_str<'b>(b: &mut &'b [u8]) -> Option<&'b str> {
    let len = u16::from_le_bytes(read_array(b.get(..2)?)) as usize;
    let s = std::str::from_utf8(b.get(2..2 + len)?).ok()?;
    *b = &b[2 + len..];
    Some(s)
}

pub(super) fn read_array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

pub(super) fn format_err(what: &str, detail: &str) -> SnapshotError {
    SnapshotError::Format {
        what: what.to_string(),
        detail: detail.to_string(),
    }
}

pub(super) fn header(kind: u8, flags: u8, names: &[String], n: u64) -> Vec<u8> {
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

pub(super) fn seal(buf: &mut Vec<u8>) {
    let crc = crc32fast::hash(buf);
    buf.extend_from_slice(&crc.to_le_bytes());
}

pub(super) struct Opened<'b> {
    pub(super) kind: u8,
    pub(super) flags: u8,
    pub(super) names: Vec<String>,
    pub(super) records: u64,
    pub(super) body: &'b [u8],
}

/// Checks magic, version and checksum, and splits the header from the records.
pub(super) fn open<'b>(bytes: &'b [u8], what: &str) -> Result<Opened<'b>, SnapshotError> {
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
pub(super) struct CrcStream<'r> {
    r: &'r mut dyn std::io::Read,
    buf: Vec<u8>,
    at: usize,
    end: usize,
    eof: bool,
    crc: crc32fast::Hasher,
    what: &'r str,
}

impl<'r> CrcStream<'r> {
    pub(super) fn new(r: &'r mut dyn std::io::Read, what: &'r str) -> Self {
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
    pub(super) fn fill(&mut self, n: usize) -> Result<(), SnapshotError> {
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
    pub(super) fn available(&self) -> usize {
        (self.end - self.at).saturating_sub(4)
    }

    /// The next `n` content bytes.
    pub(super) fn take(&mut self, n: usize) -> Result<&[u8], SnapshotError> {
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
    pub(super) fn take_records(&mut self, rec: usize, max: usize) -> Result<&[u8], SnapshotError> {
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
    pub(super) fn finish(mut self) -> Result<(), SnapshotError> {
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
