//! Local spill files partitioned by user-hash range, so a big export (or a big run's
//! confirmed changes) costs disk, not memory.
//!
//! A [`SpillDir`] is a fresh folder under the function's temporary directory, removed when
//! dropped. A [`Partitioner`] appends length-framed records (`u32` little-endian length, then
//! the bytes) to one file per hash range (`range-<n>.bin`, range = top `bits` bits of the
//! user key, as [`crate::snapshot::store::range_of`]), through one small in-memory buffer per
//! range: memory is `buffer_budget` whatever the export's size, and records keep their order
//! within a range. A byte limit (the function's ephemeral storage) stops it with
//! [`SpillError::Full`] naming the sizes. [`read_range`] streams one range's records back.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
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
        }
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
        let Some(buf) = self.bufs.get_mut(range) else {
            return Ok(());
        };
        buf.extend_from_slice(&(record.len() as u32).to_le_bytes());
        buf.extend_from_slice(record);
        if buf.len() >= self.flush_at {
            self.flush(range)?;
        }
        Ok(())
    }

    fn flush(&mut self, range: usize) -> Result<(), SpillError> {
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
        let path = range_path(&self.dir, range);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        f.write_all(buf).map_err(|e| io(&path, e))?;
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
    let path = range_path(dir, range);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(&path, e).into()),
    };
    read_records(file, &path.display().to_string(), f)
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
