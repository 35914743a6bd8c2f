//! The bounded diff: one export against a state of any size, with memory bounded by the size
//! of one hash range, not by the route.
//!
//! 1. **Partition.** Every part is read in order; each row's identifier is read (a row
//!    without one is rejected here, as [`crate::diff::in_memory::produce`] does), and the row's cells
//!    as read (the columns the route binds, [`crate::read::row_codec::encode_row`]) are written
//!    with their position, user key and row digest ([`crate::diff::digest`]) to the local
//!    spill file of the user's hash range ([`crate::state::spill`]; range = top bits of the user
//!    key, the same ranges as the state's, or finer). Values are not mapped here. Parts are
//!    read in parallel; with fewer parts than workers (one big file), a part's reader only
//!    splits rows and reads their identifier, and hands each row, in batches, to the thread
//!    of its range ([`crate::read::row_codec`]): a range's rows stay in export order on every
//!    core.
//! 2. **Diff, range by range.** A worker takes one state range, loads only that range's base
//!    and deltas ([`RangeState::load`]), streams its spill files (rows in export order, so the
//!    first row of a user wins, as today) and diffs each row against the range: a row whose
//!    digest is the one the state recorded with the user's last confirmed delta is unchanged
//!    without being mapped (most rows of a daily export); any other row is mapped (one whose
//!    values cannot be mapped is rejected here, its user counted as present) and diffed
//!    attribute by attribute. Deltas go to the sender as they are found, each with its row
//!    digest; an unchanged user whose digest is new gets a records-only delta (nothing is
//!    sent; the state records the digest). Workers run in parallel (one per core), so at
//!    most that many ranges are in memory at once.
//! 3. **Departures.** Per range, members absent from the export are counted per audience and
//!    their removals written to a local file, not sent. After the last range, the departure
//!    guard ([`crate::diff::user::decide_departures`]) judges each audience on the export's totals,
//!    exactly as the in-memory path does, and the removals it lets through are sent.
//!
//! Same deltas, rejects, counts and departure verdicts as [`crate::diff::in_memory::produce`]; only the
//! order differs (by range instead of by row, and rows without an identifier are rejected
//!
//! One role a file: [`partition`] (step 1), [`worker`] (step 2), [`departures`] (step 3 and
//! the departure files), [`pieces`] (a fan-out's pieces added up), [`overflow`] (what the
//! partition step measured, for when the local storage runs out) and [`ranges`] (the state served
//! one range at a time).

mod departures;
mod overflow;
mod partition;
#[cfg(any(test, feature = "test-util"))]
mod pieces;
mod ranges;
mod worker;

use std::io::Read;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use crate::config::route::Route;
use crate::diff::export::{Part, ProduceOptions, Stop, Summary, SyncError};
use crate::diff::rejects::RowReject;
use crate::model::UserDelta;
use crate::state::confirmed::Snapshot;
use crate::state::spill::{SpillDir, SpillError};

pub use departures::{decode_departure, encode_departure, read_departure_file, release_departures};
#[cfg(any(test, feature = "test-util"))]
pub use pieces::add_piece;
pub use ranges::{SplitSnapshot, StoreRanges};

/// The confirmed state, one hash range at a time.
pub trait RangeState: Sync {
    /// The state's `range_bits`; `None` when it has no range layout yet (no users).
    fn bits(&self) -> Option<u32>;
    /// The confirmed state of range `range` alone.
    fn load(&self, range: usize) -> Result<Snapshot, SyncError>;
}

/// How the bounded diff runs.
#[derive(Debug, Clone)]
pub struct RangedSettings {
    /// Folder the spill folder is created in (the function's `/tmp`).
    pub spill_base: PathBuf,
    /// Spill at least `1 << min_spill_bits` ranges (finer than the state's when it is small
    /// or empty, so a range of a first run stays small).
    pub min_spill_bits: u32,
    /// Ranges diffed at once (threads).
    pub workers: usize,
    /// Bytes of spill buffers in all.
    pub buffer_budget: usize,
    /// Most bytes the spill may write (the function's ephemeral storage, with a margin).
    pub disk_limit: Option<u64>,
    /// Names the spill folder (the run id).
    pub tag: String,
    /// Where to record how long each step took (benches).
    pub times: Option<std::sync::Arc<Mutex<RangedTimes>>>,
    /// Diff only these hash ranges of the state (indices at its `range_bits`; a fan-out
    /// piece). Rows of other ranges are dropped when partitioned: not spilled, counted or
    /// rejected. Rows without an identifier and unreadable rows are counted and rejected
    /// only by the span that starts at range 0, and so are the export's tables, so the
    /// pieces' summaries add up ([`add_piece`]) to a single run's. Needs a state with a
    /// range layout.
    pub only_ranges: Option<std::ops::Range<usize>>,
    /// Do not judge or send departures: count them per audience in `summary.departures`
    /// (no verdict) and write the removals to `departures_file` (a departure file, see
    /// [`read_departure_file`]), for [`release_departures`] to judge on the export's totals
    /// and send (a fan-out's finalizer).
    pub defer_departures: bool,
    /// Where a run with `defer_departures` writes its removals (created or truncated; empty
    /// when there are none). Required with `defer_departures`.
    pub departures_file: Option<PathBuf>,
}

/// Seconds each step of [`produce_ranged`] took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RangedTimes {
    /// Read, map and spill by range.
    pub partition_s: f64,
    /// Diff every range (deltas handed over included).
    pub diff_s: f64,
    /// Departure guard and removals.
    pub departures_s: f64,
    /// Bytes spilled.
    pub spilled_bytes: u64,
    /// Workers used.
    pub workers: usize,
    /// Threads that mapped each part's rows (more than one when there are fewer parts than
    /// workers: one big file is mapped on several cores).
    pub mappers: usize,
    /// Rows the partition step read: set as soon as it ends, so a run stopped during the
    /// diff (its deadline) still knows the export's size.
    pub rows_read: u64,
}

impl RangedSettings {
    /// Defaults: the system temporary folder, 256 spill ranges, one worker per core, 32 MB
    /// of buffers, no disk limit.
    pub fn new(tag: &str) -> Self {
        Self {
            spill_base: std::env::temp_dir(),
            min_spill_bits: 8,
            workers: cores(),
            buffer_budget: 32 << 20,
            disk_limit: None,
            tag: tag.to_string(),
            times: None,
            only_ranges: None,
            defer_departures: false,
            departures_file: None,
        }
    }
}

/// The cores this process may use (Lambda: 1 vCPU per 1,769 MB, up to 6).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl From<SpillError> for SyncError {
    fn from(e: SpillError) -> Self {
        SyncError::Spill(e)
    }
}

/// Where every step's rejects go, from any thread.
type RejectSink<'r> = Mutex<&'r mut (dyn FnMut(RowReject) + Send)>;

/// One call of [`produce_ranged`]: what every step reads, and what they share.
struct Job<'a, 'r> {
    route: &'a Route,
    state: &'a dyn RangeState,
    opts: &'a ProduceOptions,
    settings: &'a RangedSettings,
    on_delta: &'a (dyn Fn(UserDelta) -> Result<(), Stop> + Sync),
    rejects: RejectSink<'r>,
    /// Set by a thread that failed, so the others stop.
    stop: AtomicBool,
}

impl Job<'_, '_> {
    fn reject(&self, r: RowReject) {
        if let Ok(mut sink) = self.rejects.lock() {
            (*sink)(r);
        }
    }
}

/// Reads, maps and diffs every part of one export against `state` one hash range at a time
/// (see the module docs), calling `on_delta` for each user to send (from several threads)
/// and `on_reject` for each rejected row. Blocking. An `Err` means the export is not fully
/// planned and nothing of it may be committed.
pub fn produce_ranged<I, R>(
    parts: I,
    route: &Route,
    state: &dyn RangeState,
    opts: &ProduceOptions,
    settings: &RangedSettings,
    on_delta: &(dyn Fn(UserDelta) -> Result<(), Stop> + Sync),
    on_reject: &mut (dyn FnMut(RowReject) + Send),
) -> Result<Summary, SyncError>
where
    I: IntoIterator<Item = Result<Part<R>, SyncError>>,
    I::IntoIter: Send,
    R: Read + Send,
{
    let started = std::time::Instant::now();
    let state_bits = state.bits();
    check_settings(settings, opts, state_bits)?;
    let spill = SpillDir::create(&settings.spill_base, &settings.tag)?;
    let job = Job {
        route,
        state,
        opts,
        settings,
        on_delta,
        rejects: Mutex::new(on_reject),
        stop: AtomicBool::new(false),
    };
    // Step 1: every part spilled by hash range.
    let mut partitioned = partition::partition(&job, parts, &spill, state_bits)?;
    let partition_s = started.elapsed().as_secs_f64();
    let rows_read = partitioned.summary.rows_read;
    if let Some(t) = &settings.times
        && let Ok(mut t) = t.lock()
    {
        t.rows_read = rows_read;
    }
    let started = std::time::Instant::now();
    // Step 2: the diff, one unit (a state range, or a spill range of an empty state) per
    // worker at a time.
    let dep_dir = spill.sub("departures")?;
    let mut summary = std::mem::take(&mut partitioned.summary);
    let (audiences, workers) =
        worker::diff(&job, &partitioned, state_bits, &dep_dir, &mut summary)?;
    let diff_s = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    // Step 3: the departures, judged on the export's totals (or handed over).
    let departures_s = if departures::after_diff(&job, &mut summary, audiences, &dep_dir, workers)?
    {
        started.elapsed().as_secs_f64()
    } else {
        0.0
    };
    if let Some(t) = &settings.times
        && let Ok(mut t) = t.lock()
    {
        *t = RangedTimes {
            partition_s,
            diff_s,
            departures_s,
            spilled_bytes: partitioned.spilled,
            workers,
            mappers: partitioned.mappers,
            rows_read,
        };
    }
    drop(spill);
    Ok(summary)
}

/// Refuses settings that cannot run: `only_ranges` outside the state's ranges (or a state
/// without a range layout), deferred departures without a file to write them to.
fn check_settings(
    settings: &RangedSettings,
    opts: &ProduceOptions,
    state_bits: Option<u32>,
) -> Result<(), SyncError> {
    if let Some(span) = &settings.only_ranges {
        let n = state_bits.map(|b| 1usize << b);
        if n.is_none_or(|n| span.start > span.end || span.end > n) {
            return Err(SyncError::State {
                range: span.end,
                message: format!(
                    "only_ranges {}..{} is not a span of the state's {} hash ranges (a fan-out piece needs a state laid out in ranges)",
                    span.start,
                    span.end,
                    n.unwrap_or(0)
                ),
                retryable: false,
            });
        }
    }
    if settings.defer_departures && opts.departures && settings.departures_file.is_none() {
        return Err(SyncError::Spill(SpillError::Io {
            path: "departures_file".into(),
            error: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "defer_departures needs a departures_file to write the removals to",
            ),
        }));
    }
    Ok(())
}
