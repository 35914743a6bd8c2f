//! Daily compaction: each table-day's many small parts become one deduplicated part (several
//! only beyond 1 GiB), in the same layout, safe at every instant.
//!
//! [`plan`] picks the table-days from a listing (pure), [`merge`] turns local copies of a
//! day's parts into the compacted part (sync, bounded memory), [`lease`] keeps two runs off
//! the same day, [`job`] does the I/O in the safe order, and [`report`] accounts for it.

pub mod job;
pub mod lease;
pub mod merge;
pub mod plan;
pub mod report;

pub use job::{CompactRequest, Compactor, Manifest, parse_payload};
pub use plan::{Selection, TableDay};
pub use report::{CompactReport, DayOutcome, DayResult};
