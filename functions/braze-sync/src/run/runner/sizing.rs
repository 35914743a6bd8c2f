//! How big an export is, as the rows its parts hold as text; the users a ranged commit lays a
//! state out for; the memory shares a run plans with (pure).

use crate::run::handler::ExportPlan;
use crate::state::store::HeadDoc;

/// Export bytes per row assumed when estimating a route's size from its parts (a low guess,
/// so big exports take the bounded diff early).
pub const EST_ROW_BYTES: u64 = 100;

/// How many times bigger than its stored bytes a compressed part's text is assumed to be
/// when estimating its rows: gzip/zip measured at 4.9× on the harness's sample export
/// (`harness::samples::customers_csv`, 200,000 rows of 186 bytes, flate2's default level),
/// rounded up to 5.
pub const GZIP_EXPANSION: u64 = 5;
/// The same for Parquet parts: 5.6× measured on the harness's Snappy Parquet of the same
/// rows (`customers_parquet`, text columns), rounded up to 6.
pub const PARQUET_EXPANSION: u64 = 6;
/// The same for bzip2 and zstd parts: not measured; they compress at least as well as gzip,
/// so Parquet's higher figure is assumed.
pub const STRONG_EXPANSION: u64 = 6;

/// A part's bytes as text, for the rows estimate: its stored size times the expansion its
/// name says (`.gz`, `.gzip`, `.tgz`, `.tar.gz`, `.zip`: [`GZIP_EXPANSION`]; `.bz2`, `.zst`:
/// [`STRONG_EXPANSION`]; `.parquet`, `.pq`: [`PARQUET_EXPANSION`]; anything else as stored).
/// Names only: the object listing gives no content type (pure).
pub fn text_bytes(key: &str, size: u64) -> u64 {
    let k = key.to_ascii_lowercase();
    let factor = if [".gz", ".gzip", ".tgz", ".zip"]
        .iter()
        .any(|e| k.ends_with(e))
    {
        GZIP_EXPANSION
    } else if [".bz2", ".zst"].iter().any(|e| k.ends_with(e)) {
        STRONG_EXPANSION
    } else if [".parquet", ".pq"].iter().any(|e| k.ends_with(e)) {
        PARQUET_EXPANSION
    } else {
        1
    };
    size.saturating_mul(factor)
}

/// The export's bytes as text ([`text_bytes`] of every part).
pub fn export_text_bytes(plan: &ExportPlan) -> u64 {
    plan.parts
        .iter()
        .map(|p| text_bytes(&p.key, p.size))
        .fold(0, u64::saturating_add)
}

/// The users a ranged commit of `plan` lays a state out for: `expected`, or, for a state
/// without a range layout yet (a first sync), at least the export's rows (`rows_read`, as
/// the bounded diff's partition step counted them, else estimated from the parts' sizes). A
/// first sync that hands over commits what it confirmed so far; laid out for that alone, its
/// ranges would take every later invocation's users (only a complete commit re-lays out),
/// and each hand-over's commit would load ranges many times the target size.
pub(crate) fn layout_users(doc: &HeadDoc, expected: u64, rows_read: u64, plan: &ExportPlan) -> u64 {
    if !doc.ranges.is_empty() {
        return expected;
    }
    let rows = match rows_read {
        0 => export_text_bytes(plan) / EST_ROW_BYTES,
        n => n,
    };
    expected.max(rows)
}

/// Memory the bounded diff's spill buffers take.
pub const SPILL_BUFFERS: u64 = 32 << 20;

/// Share of the function's memory the confirmed state may take; the rest is for the readers,
/// the sender's buffers and the runtime.
pub const STATE_MEMORY_SHARE: f64 = 0.6;

/// The memory a ranged commit may take for the ranges it holds at once: a quarter of the
/// function's (the diff's workers and the sender, which ran before it, may still hold theirs
/// in the allocator), so at 512 MB it holds one range of the default size at a time; no
/// limit: [`crate::state::store::COMMIT_RANGES_AT_ONCE`] ranges.
pub fn commit_memory(memory_limit_bytes: Option<u64>) -> u64 {
    memory_limit_bytes.map_or(u64::MAX, |l| l / 4)
}

/// Bytes of pending confirmed users that force a checkpoint without a memory limit
/// ([`pending_memory`] with one). A pending user holds its attribute names and fingerprints
/// (~2 KB at 20 attributes), so at Braze's full pace a count alone lets the pending users
/// take ~100 MB between checkpoints.
pub const DEFAULT_MAX_PENDING_BYTES: usize = 64 << 20;

/// Bytes a run's committer lets the users Braze confirmed hold before it checkpoints them
/// (what each holds: the committer's `held_bytes`): a sixteenth of the function's memory
/// (32 MB at 512); no limit: [`DEFAULT_MAX_PENDING_BYTES`].
pub fn pending_memory(memory_limit_bytes: Option<u64>) -> usize {
    memory_limit_bytes.map_or(DEFAULT_MAX_PENDING_BYTES, |l| (l / 16) as usize)
}
