//! Size bounds on reading: a decompressed-bytes budget shared by every layer of one object, a
//! guard that fails a row growing past `max_row_bytes` while it is still being read, and the
//! temp-file spill that gives zip and Parquet the random access they need (which checks the
//! free space of its folder first and fails fast, naming the sizes, when it would not fit).

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The error carried inside an [`io::Error`] when a bound is hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{limit} of {bytes} bytes exceeded")]
pub struct LimitHit {
    /// The limit's name.
    pub limit: &'static str,
    /// Its value.
    pub bytes: u64,
}

fn limit_error(limit: &'static str, bytes: u64) -> io::Error {
    io::Error::other(LimitHit { limit, bytes })
}

/// Decompressed bytes left for one object, shared by its layers.
#[derive(Debug, Clone)]
pub struct Budget {
    used: Rc<Cell<u64>>,
    max: u64,
}

impl Budget {
    /// A budget of `max` bytes.
    pub fn new(max: u64) -> Self {
        Self {
            used: Rc::new(Cell::new(0)),
            max,
        }
    }

    /// Bytes counted so far.
    pub fn used(&self) -> u64 {
        self.used.get()
    }

    /// Wraps a reader whose output counts against the budget.
    pub fn wrap<R: Read>(&self, inner: R) -> Budgeted<R> {
        Budgeted {
            inner,
            budget: self.clone(),
        }
    }
}

/// A reader that fails with [`LimitHit`] `max_decompressed_bytes` once its budget is spent.
pub struct Budgeted<R> {
    inner: R,
    budget: Budget,
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let used = self.budget.used.get() + n as u64;
        self.budget.used.set(used);
        if used > self.budget.max {
            return Err(limit_error("max_decompressed_bytes", self.budget.max));
        }
        Ok(n)
    }
}

/// Marks where the current row started, shared between a parser and the [`RowGuarded`]
/// reader underneath it.
#[derive(Debug, Clone, Default)]
pub struct RowMark {
    delivered: Rc<Cell<u64>>,
    mark: Rc<Cell<u64>>,
}

impl RowMark {
    /// Called after each complete row: the next row starts no earlier than here.
    pub fn row_done(&self) {
        self.mark.set(self.delivered.get());
    }
}

/// A reader that fails once more than `max_row + slack` bytes were delivered since the last
/// [`RowMark::row_done`]: with a parser buffering at most `slack` bytes ahead, the row being
/// read is then certainly over `max_row`, and memory stays bounded by `max_row + 2 × slack`.
///
/// Bytes in `blank` (line ends for delimited text, any whitespace between JSON array
/// elements) that come right after a row are no part of the next row: they move the mark
/// instead of counting, so a file of millions of blank lines is stopped by the limit that
/// really applies (`max_decompressed_bytes`), not reported as one huge row.
pub struct RowGuarded<R> {
    inner: R,
    mark: RowMark,
    max_row: u64,
    slack: u64,
    blank: &'static [u8],
}

impl<R: Read> RowGuarded<R> {
    /// Guards `inner`; `blank` bytes between rows are not counted.
    pub fn new(inner: R, mark: RowMark, max_row: usize, slack: usize) -> Self {
        Self {
            inner,
            mark,
            max_row: max_row as u64,
            slack: slack as u64,
            blank: b"",
        }
    }

    /// Bytes that separate rows without belonging to one (see the type's docs).
    pub fn skipping(mut self, blank: &'static [u8]) -> Self {
        self.blank = blank;
        self
    }
}

impl<R: Read> Read for RowGuarded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let before = self.mark.delivered.get();
        let delivered = before + n as u64;
        self.mark.delivered.set(delivered);
        if !self.blank.is_empty() && self.mark.mark.get() >= before {
            // Nothing of a row since the mark: leading blank bytes move it.
            let lead = buf[..n]
                .iter()
                .take_while(|b| self.blank.contains(b))
                .count();
            self.mark.mark.set(before + lead as u64);
        }
        if delivered - self.mark.mark.get() > self.max_row + self.slack {
            return Err(limit_error("max_row_bytes", self.max_row));
        }
        Ok(n)
    }
}

static SPILL_SEQ: AtomicU64 = AtomicU64::new(0);

/// Bytes an unprivileged writer may still put under `dir`, when the platform says.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    rustix::fs::statvfs(dir)
        .ok()
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
}

/// Why a spill does not fit: names the folder, what is needed and what is free.
fn no_room(dir: &Path, needed: u64, free: u64, known: bool) -> io::Error {
    const MIB: u64 = 1024 * 1024;
    let need = if known {
        format!("{needed} bytes ({} MiB)", needed.div_ceil(MIB))
    } else {
        format!("more than {needed} bytes ({} MiB)", needed / MIB)
    };
    io::Error::new(
        io::ErrorKind::StorageFull,
        format!(
            "spilling to {} needs {need} but only {free} bytes ({} MiB) are free there; raise the \
             function's ephemeral storage (EphemeralStorage, /tmp)",
            dir.display(),
            free / MIB
        ),
    )
}

/// Copies `reader` into a new temp file under `dir` and returns it rewound. The file is
/// unlinked at once, so it disappears when closed (or when the process dies). Fails fast with
/// [`io::ErrorKind::StorageFull`], naming the sizes, when `dir` has not enough room.
pub fn spill(reader: &mut dyn Read, dir: &Path) -> io::Result<File> {
    spill_sized(reader, dir, None)
}

/// [`spill`] with the size to spill when known (an object's length): checked against the free
/// space before a byte is written.
pub fn spill_sized(reader: &mut dyn Read, dir: &Path, size: Option<u64>) -> io::Result<File> {
    spill_within(reader, dir, size, free_bytes(dir))
}

/// [`spill_sized`] against a given amount of free space (`None`: unknown, not checked).
fn spill_within(
    reader: &mut dyn Read,
    dir: &Path,
    size: Option<u64>,
    free: Option<u64>,
) -> io::Result<File> {
    if let (Some(size), Some(free)) = (size, free)
        && size > free
    {
        return Err(no_room(dir, size, free, true));
    }
    let seq = SPILL_SEQ.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("braze-sync-{}-{seq}.spill", std::process::id()));
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    let _ = std::fs::remove_file(&path);
    let mut buf = vec![0u8; 256 * 1024];
    let mut written: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        written += n as u64;
        if let Some(free) = free
            && written > free
        {
            return Err(no_room(dir, free, free, false));
        }
        file.write_all(&buf[..n])?;
    }
    file.flush()?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn budget_fails_past_its_bound_naming_it() {
        let b = Budget::new(10);
        let mut r = b.wrap(&[0u8; 32][..]);
        let mut out = Vec::new();
        let err = r.read_to_end(&mut out).unwrap_err();
        assert!(err.to_string().contains("max_decompressed_bytes"));
    }

    #[test]
    fn row_guard_allows_many_small_rows_but_not_one_big_one() {
        let mark = RowMark::default();
        let data = [b'x'; 100];
        let mut g = RowGuarded::new(&data[..], mark.clone(), 10, 4);
        let mut buf = [0u8; 8];
        for _ in 0..12 {
            let n = g.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            mark.row_done();
        }
        let mark = RowMark::default();
        let mut g = RowGuarded::new(&data[..], mark, 10, 4);
        let mut all = Vec::new();
        assert!(g.read_to_end(&mut all).is_err());
    }

    #[test]
    fn a_spill_that_does_not_fit_fails_fast_naming_the_sizes() {
        let dir = std::env::temp_dir();
        // Known size over the free space: refused before a byte is written.
        let err =
            spill_within(&mut &[0u8; 10][..], &dir, Some(3 << 30), Some(1 << 30)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        let msg = err.to_string();
        assert!(msg.contains("3221225472 bytes (3072 MiB)"), "{msg}");
        assert!(
            msg.contains("1073741824 bytes (1024 MiB) are free"),
            "{msg}"
        );
        assert!(msg.contains("EphemeralStorage"), "{msg}");
        // Unknown size: stops as soon as the free space is passed.
        let data = vec![7u8; 600 * 1024];
        let err = spill_within(&mut &data[..], &dir, None, Some(300 * 1024)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert!(err.to_string().contains("more than 307200 bytes"), "{err}");
        // Room enough: spilled.
        let mut f =
            spill_within(&mut &data[..], &dir, Some(data.len() as u64), Some(1 << 30)).unwrap();
        let mut back = Vec::new();
        f.read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
        // The real free space of the temp folder is known on this platform.
        assert!(free_bytes(&dir).is_some_and(|b| b > 0));
        assert!(spill_sized(&mut &b"x"[..], &dir, Some(u64::MAX)).is_err());
    }

    #[test]
    fn spill_rewinds_and_holds_the_bytes() {
        let mut f = spill(&mut &b"hello"[..], &std::env::temp_dir()).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
    }
}
