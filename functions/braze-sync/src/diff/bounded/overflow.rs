//! What the partition step measured ([`Measure`]), for the error that says its spill outgrew
//! the local storage it may use ([`SpillOverflow`]).

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::diff::export::SpillOverflow;

/// What the partition step measured, shared by its threads (published per part and per
/// mapping thread, not per row), for [`SpillOverflow`].
#[derive(Debug, Default)]
pub(super) struct Measure {
    pub(super) rows_seen: AtomicU64,
    pub(super) rows_spilled: AtomicU64,
    pub(super) record_bytes: AtomicU64,
    pub(super) source_bytes: AtomicU64,
}

/// Counts the bytes read from a part as stored (compressed or not) into [`Measure`].
pub(super) struct CountingRead<'a, R> {
    pub(super) inner: R,
    pub(super) n: &'a AtomicU64,
}

impl<R: Read> Read for CountingRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}

impl Measure {
    /// The overflow of a spill that reached `limit_bytes` after writing `written_bytes`, with
    /// what was measured by then.
    pub(super) fn overflow(&self, limit_bytes: u64, written_bytes: u64) -> SpillOverflow {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SpillOverflow {
            limit_bytes,
            written_bytes,
            rows_read: load(&self.rows_seen),
            rows_spilled: load(&self.rows_spilled),
            record_bytes: load(&self.record_bytes),
            source_bytes_read: load(&self.source_bytes),
            parts_bytes: 0,
        }
    }
}
