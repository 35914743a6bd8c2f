//! Local spill files partitioned by user-hash range, so a big export (or a big run's
//! confirmed changes) costs disk, not memory.
//!
//! A [`SpillDir`] is a fresh folder under the function's temporary directory, removed when
//! dropped. A [`Partitioner`] appends length-framed records (`u32` little-endian length, then
//! the bytes) by hash range (range = top `bits` bits of the user key, as
//! [`crate::state::store::range_of`]), through one small in-memory buffer per range:
//! memory is `buffer_budget` whatever the export's size, and records keep their order within
//! a range. A full buffer is appended as one chunk to a single chunk file (`chunks.bin`, kept
//! open), and [`Partitioner::finish`] writes the chunks' index by range (`chunks.idx`): one
//! file created per partitioner, not one per range, and no file opened per flush (creating
//! and reopening hundreds of range files cost a tenth of the bounded diff's CPU). A
//! partitioner of one range writes that range's file (`range-00000.bin`) directly. A byte limit (the function's ephemeral storage) stops it with
//! [`SpillError::Full`] naming the sizes. [`read_range`] streams one range's records back.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Prefix of spill folders (leftovers of a killed run in a reused container are removed by
/// [`SpillDir::create`]).
const DIR_PREFIX: &str = "braze-sync-spill-";
/// Spill folders older than this belong to a killed run (a Lambda invocation lasts at most
/// 15 minutes).
const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(20 * 60);
/// The smallest per-range buffer.
const MIN_BUFFER: usize = 1024;
/// The largest per-range buffer.
const MAX_BUFFER: usize = 256 * 1024;
/// A partitioner of several ranges writes `chunks-<seq>.bin`, and its index
/// `chunks-<seq>.idx`: `u64` range count `n`, `n + 1` `u64` first-entry numbers (range `r`'s
/// chunks are entries `start[r]..start[r + 1]`), then per chunk `u64` offset and `u32`
/// length, by range in the order written. `seq` grows with each partitioner made, so
/// several partitioners spilling into one folder (one per mapping thread, each with its own
/// ranges; or one per table of a part, one after the other) are read back in the order they
/// were made.
const CHUNKS: &str = "chunks-";
static NEXT_PARTITIONER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Why spilling failed.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    /// A local file could not be written or read.
    #[error("spill file {path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The spill would outgrow the local storage it may use.
    #[error(
        "the export's rows need more than the {limit_mb} MB of local storage (/tmp) this function may spill to ({written_mb} MB written so far); nothing of it was sent. Raise the function's ephemeral storage (EphemeralStorage of BrazeSyncFunction in template.yaml, ephemeralStorageSize in the CDK construct, and BRIDGE_EPHEMERAL_STORAGE_MB with it), or split the export into smaller parts across runs"
    )]
    Full {
        /// The limit, in MB.
        limit_mb: u64,
        /// Bytes written when it was reached, in MB.
        written_mb: u64,
    },
    /// A spill file does not hold the records written to it.
    #[error("spill file {path}: corrupt record at byte {offset}")]
    Corrupt {
        /// The file.
        path: String,
        /// Where.
        offset: u64,
    },
}

fn io(path: &Path, error: std::io::Error) -> SpillError {
    SpillError::Io {
        path: path.display().to_string(),
        error,
    }
}

/// A spill folder, removed (with its files) when dropped.
#[derive(Debug)]
pub struct SpillDir {
    path: PathBuf,
}

impl SpillDir {
    /// Creates a fresh folder under `base`, first removing leftovers of killed runs: spill
    /// folders untouched for longer than a Lambda invocation can last (15 minutes).
    pub fn create(base: &Path, tag: &str) -> Result<Self, SpillError> {
        if let Ok(entries) = std::fs::read_dir(base) {
            for e in entries.flatten() {
                let dead = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > LEFTOVER_AGE);
                if dead && e.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let tag: String = tag
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        let path = base.join(format!("{DIR_PREFIX}{tag}-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&path).map_err(|e| io(&path, e))?;
        Ok(Self { path })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A sub-folder (created).
    pub fn sub(&self, name: &str) -> Result<PathBuf, SpillError> {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).map_err(|e| io(&p, e))?;
        Ok(p)
    }
}

impl Drop for SpillDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The file of one range under `dir`.
pub fn range_path(dir: &Path, range: usize) -> PathBuf {
    dir.join(format!("range-{range:05}.bin"))
}

/// Appends records to per-range files under one folder, see the module docs.
#[derive(Debug)]
pub struct Partitioner {
    dir: PathBuf,
    bufs: Vec<Vec<u8>>,
    flush_at: usize,
    written: u64,
    limit: Option<u64>,
    sizes: Vec<u64>,
    total: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// The file written to, open: the chunk file (or the one range's file).
    file: Option<(File, PathBuf)>,
    /// Bytes in the chunk file.
    file_len: u64,
    /// `(range, length, offset)` of each chunk.
    chunks: Vec<(u32, u32, u64)>,
    /// This partitioner's number among those of the process (its chunk files' names).
    seq: u64,
}

impl Partitioner {
    /// `1 << bits` ranges under `dir`, buffering about `buffer_budget` bytes in all, writing at
    /// most `limit` bytes.
    pub fn new(dir: &Path, bits: u32, buffer_budget: usize, limit: Option<u64>) -> Self {
        let n = 1usize << bits;
        Self {
            dir: dir.to_path_buf(),
            bufs: vec![Vec::new(); n],
            flush_at: (buffer_budget / n).clamp(MIN_BUFFER, MAX_BUFFER),
            written: 0,
            limit,
            sizes: vec![0; n],
            total: None,
            file: None,
            file_len: 0,
            chunks: Vec::new(),
            seq: NEXT_PARTITIONER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    fn chunk_path(&self, ext: &str) -> PathBuf {
        self.dir.join(format!("{CHUNKS}{:016}.{ext}", self.seq))
    }

    /// Counts against `total`, shared with other partitioners: the limit then bounds all of
    /// them together.
    pub fn with_shared_total(
        mut self,
        total: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        self.total = Some(total);
        self
    }

    /// Number of ranges.
    pub fn ranges(&self) -> usize {
        self.bufs.len()
    }

    /// Appends one record to `range`'s file.
    pub fn push(&mut self, range: usize, record: &[u8]) -> Result<(), SpillError> {
        let flush_at = self.flush_at;
        let Some(buf) = self.bufs.get_mut(range) else {
            return Ok(());
        };
        if buf.capacity() == 0 {
            // Once, at its full size: no chain of reallocations copying it as it grows.
            buf.reserve(flush_at + 1024);
        }
        buf.extend_from_slice(&(record.len() as u32).to_le_bytes());
        buf.extend_from_slice(record);
        if buf.len() >= self.flush_at {
            self.flush(range)?;
        }
        Ok(())
    }

    /// Appends one record that `write` writes straight into `range`'s buffer (no copy of it
    /// is made first); returns the record's length.
    pub fn push_with(
        &mut self,
        range: usize,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<usize, SpillError> {
        let flush_at = self.flush_at;
        let Some(buf) = self.bufs.get_mut(range) else {
            return Ok(0);
        };
        if buf.capacity() == 0 {
            buf.reserve(flush_at + 1024);
        }
        let at = buf.len();
        buf.extend_from_slice(&[0u8; 4]);
        write(buf);
        let len = buf.len() - at - 4;
        buf[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
        if buf.len() >= flush_at {
            self.flush(range)?;
        }
        Ok(len)
    }

    fn flush(&mut self, range: usize) -> Result<(), SpillError> {
        let single = self.bufs.len() == 1;
        let buf = &mut self.bufs[range];
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len() as u64;
        let before = match &self.total {
            Some(t) => t.fetch_add(len, std::sync::atomic::Ordering::Relaxed),
            None => self.written,
        };
        if let Some(limit) = self.limit
            && before + len > limit
        {
            return Err(SpillError::Full {
                limit_mb: limit >> 20,
                written_mb: before >> 20,
            });
        }
        if self.file.is_none() {
            let path = if single {
                range_path(&self.dir, 0)
            } else {
                self.dir.join(format!("{CHUNKS}{:016}.bin", self.seq))
            };
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| io(&path, e))?;
            self.file = Some((f, path));
        }
        if let Some((f, path)) = &mut self.file {
            f.write_all(buf).map_err(|e| io(path, e))?;
        }
        if !single {
            self.chunks.push((range as u32, len as u32, self.file_len));
            self.file_len += len;
        }
        self.written += len;
        self.sizes[range] += len;
        buf.clear();
        Ok(())
    }

    /// Flushes every buffer; returns the bytes of each range's file.
    pub fn finish(mut self) -> Result<Vec<u64>, SpillError> {
        for r in 0..self.bufs.len() {
            self.flush(r)?;
        }
        if self.bufs.len() > 1 && !self.chunks.is_empty() {
            let n = self.bufs.len();
            let mut chunks = std::mem::take(&mut self.chunks);
            // Stable: a range's chunks stay in the order written.
            chunks.sort_by_key(|c| c.0);
            let mut out = Vec::with_capacity(8 * (n + 2) + 12 * chunks.len());
            out.extend_from_slice(&(n as u64).to_le_bytes());
            let mut at = 0usize;
            for r in 0..=n {
                while chunks.get(at).is_some_and(|c| (c.0 as usize) < r) {
                    at += 1;
                }
                out.extend_from_slice(&(at as u64).to_le_bytes());
            }
            for (_, len, offset) in &chunks {
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
            let path = self.chunk_path("idx");
            std::fs::write(&path, out).map_err(|e| io(&path, e))?;
        }
        self.file = None;
        Ok(std::mem::take(&mut self.sizes))
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }
}

/// Calls `f` with each record of `range`'s file under `dir`, in the order written (a range
/// that got no record has no file: nothing is called).
pub fn read_range<E: From<SpillError>>(
    dir: &Path,
    range: usize,
    f: &mut dyn FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut indexes: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "idx")
                    && p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(CHUNKS))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(dir, e).into()),
    };
    if !indexes.is_empty() {
        indexes.sort();
        for index in indexes {
            read_chunks(&index, range, f)?;
        }
        return Ok(());
    }
    let path = range_path(dir, range);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(&path, e).into()),
    };
    read_records(file, &path.display().to_string(), f)
}

/// [`read_range`] over one chunk file, by its index (`index_path`): only the index's header
/// and the range's entries are read, not the whole index once per range.
fn read_chunks<E: From<SpillError>>(
    index_path: &Path,
    range: usize,
    f: &mut dyn FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let path = index_path.with_extension("bin");
    let what = path.display().to_string();
    let corrupt = |offset: u64| SpillError::Corrupt {
        path: index_path.display().to_string(),
        offset,
    };
    let mut idx = File::open(index_path).map_err(|e| io(index_path, e))?;
    let index_len = idx.metadata().map_err(|e| io(index_path, e))?.len();
    let mut read_at = |offset: u64, len: usize| -> Result<Vec<u8>, SpillError> {
        let mut b = vec![0u8; len];
        idx.seek(std::io::SeekFrom::Start(offset))
            .and_then(|_| idx.read_exact(&mut b))
            .map_err(|_| corrupt(offset))?;
        Ok(b)
    };
    let u64_of = |b: &[u8], at: usize| -> u64 {
        b.get(at..at + 8)
            .and_then(|x| x.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    let n = u64_of(&read_at(0, 8)?, 0) as usize;
    let entries_start = (n as u64)
        .saturating_add(1)
        .saturating_mul(8)
        .saturating_add(8);
    if entries_start > index_len {
        return Err(corrupt(0).into());
    }
    if range >= n {
        return Ok(());
    }
    let starts = read_at(8 + 8 * range as u64, 16)?;
    let (a, b) = (u64_of(&starts, 0) as usize, u64_of(&starts, 8) as usize);
    if b <= a {
        return Ok(());
    }
    let entries_at = entries_start.saturating_add((a as u64).saturating_mul(12));
    if entries_at.saturating_add(((b - a) as u64).saturating_mul(12)) > index_len {
        return Err(corrupt(entries_at).into());
    }
    let entries = read_at(entries_at, 12 * (b - a))?;
    let mut file = File::open(&path).map_err(|e| io(&path, e))?;
    let data_len = file.metadata().map_err(|e| io(&path, e))?.len();
    let mut buf = Vec::new();
    for e in entries.chunks_exact(12) {
        let offset = u64_of(e, 0);
        let len = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
        if offset.saturating_add(u64::from(len)) > data_len {
            return Err(SpillError::Corrupt { path: what, offset }.into());
        }
        buf.resize(len as usize, 0);
        file.seek(std::io::SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut buf))
            .map_err(|e| io(&path, e))?;
        let mut rest = &buf[..];
        let mut pos = offset;
        while !rest.is_empty() {
            let n = rest
                .get(..4)
                .and_then(|l| l.try_into().ok())
                .map(u32::from_le_bytes)
                .ok_or_else(|| SpillError::Corrupt {
                    path: what.clone(),
                    offset: pos,
                })? as usize;
            let rec = rest.get(4..4 + n).ok_or_else(|| SpillError::Corrupt {
                path: what.clone(),
                offset: pos,
            })?;
            f(rec)?;
            rest = &rest[4 + n..];
            pos += 4 + n as u64;
        }
    }
    Ok(())
}

/// Calls `f` with each length-framed record of `r` (the spill format: `u32` little-endian
/// length, then the bytes), in order; `what` names the source in errors.
pub fn read_records<E: From<SpillError>>(
    r: impl Read,
    what: &str,
    f: &mut dyn FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut r = BufReader::with_capacity(256 * 1024, r);
    let mut rec = Vec::with_capacity(1024);
    let mut offset = 0u64;
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(error) => {
                return Err(SpillError::Io {
                    path: what.to_string(),
                    error,
                }
                .into());
            }
        }
        let n = u32::from_le_bytes(len) as usize;
        rec.resize(n, 0);
        r.read_exact(&mut rec).map_err(|_| SpillError::Corrupt {
            path: what.to_string(),
            offset,
        })?;
        offset += 4 + n as u64;
        f(&rec)?;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_per_range_in_order_and_the_folder_is_removed() {
        let base = tempfile::tempdir().unwrap();
        let path;
        {
            let dir = SpillDir::create(base.path(), "t").unwrap();
            path = dir.path().to_path_buf();
            let mut p = Partitioner::new(dir.path(), 2, 0, None);
            for i in 0u32..5000 {
                p.push((i % 4) as usize, &i.to_le_bytes()[..(i % 4 + 1) as usize])
                    .unwrap();
            }
            let sizes = p.finish().unwrap();
            assert_eq!(sizes.len(), 4);
            for r in 0..4usize {
                let mut got = Vec::new();
                read_range::<SpillError>(dir.path(), r, &mut |b| {
                    got.push(b.to_vec());
                    Ok(())
                })
                .unwrap();
                let want: Vec<Vec<u8>> = (0u32..5000)
                    .filter(|i| (*i % 4) as usize == r)
                    .map(|i| i.to_le_bytes()[..(i % 4 + 1) as usize].to_vec())
                    .collect();
                assert_eq!(got, want);
            }
            assert!(path.exists());
        }
        assert!(!path.exists(), "dropped with its files");
    }

    #[test]
    fn a_spill_past_its_limit_fails_naming_the_sizes() {
        let base = tempfile::tempdir().unwrap();
        let dir = SpillDir::create(base.path(), "t").unwrap();
        let mut p = Partitioner::new(dir.path(), 0, 0, Some(10_000));
        let err = (0..10_000)
            .try_for_each(|_| p.push(0, &[7u8; 100]))
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, SpillError::Full { .. }), "{text}");
        assert!(text.contains("EphemeralStorage"), "{text}");
    }
}
