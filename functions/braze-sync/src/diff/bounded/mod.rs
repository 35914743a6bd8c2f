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
//!    guard ([`user::decide_departures`]) judges each audience on the export's totals,
//!    exactly as the in-memory path does, and the removals it lets through are sent.
//!
//! Same deltas, rejects, counts and departure verdicts as [`crate::diff::in_memory::produce`]; only the
//! order differs (by range instead of by row, and rows without an identifier are rejected
//! before the others).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde_json::Value;
use tracing::warn;

use crate::config::route::Route;
use crate::diff::digest::{self, TableDigest};
use crate::diff::export::{Part, ProduceOptions, SpillOverflow, Stop, Summary, SyncError};
use crate::diff::rejects::RowReject;
use crate::diff::user::{self, AudienceDepartures, Seen};
use crate::map::{Binding, MapOutcome, MappedRow, Mapper};
use crate::model::{AttributeChange, RowPos, UserDelta, UserKey, fingerprint};
use crate::read::row_codec::{Columns, EncodedRow, RowBatch, put_varint};
use crate::read::{self, ReadError, Row, RowItem, RowSource};
use crate::state::confirmed::{
    Snapshot, identifier_text, parse_identifier, range_of, stored_digest,
};
use crate::state::spill::{Partitioner, SpillDir, SpillError, read_range};
use crate::vocab::ROW_DIGEST;

const REC_ROW: u8 = 0;
const NO_LINE: u64 = u64::MAX;

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

/// Rows a reader hands a mapping thread at once (a batch also ends at [`BATCH_BYTES`]).
const BATCH_ROWS: usize = 512;
/// Text bytes that end a batch.
const BATCH_BYTES: usize = 256 * 1024;

/// Rows a reader counts before adding them to the live progress counter.
const LIVE_STEP: u64 = 1024;

/// What the partition step measured, shared by its threads (published per part and per
/// mapping thread, not per row), for [`SpillOverflow`].
#[derive(Debug, Default)]
struct Measure {
    rows_seen: std::sync::atomic::AtomicU64,
    rows_spilled: std::sync::atomic::AtomicU64,
    record_bytes: std::sync::atomic::AtomicU64,
    source_bytes: std::sync::atomic::AtomicU64,
}

/// Counts the bytes read from a part as stored (compressed or not) into [`Measure`].
struct CountingRead<'a, R> {
    inner: R,
    n: &'a std::sync::atomic::AtomicU64,
}

impl<R: Read> Read for CountingRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}

/// Where one part's rows are spilled: the partitioner of each thread that maps them.
struct SpillTo {
    dir: PathBuf,
    bits: u32,
    budget: usize,
    limit: Option<u64>,
    total: std::sync::Arc<std::sync::atomic::AtomicU64>,
    measure: std::sync::Arc<Measure>,
}

impl SpillTo {
    fn partitioner(&self) -> Partitioner {
        Partitioner::new(&self.dir, self.bits, self.budget, self.limit)
            .with_shared_total(self.total.clone())
    }
}

/// Which rows a run keeps (`only_ranges`).
#[derive(Debug, Clone)]
struct Keep {
    /// Keep only rows whose key is in this span of ranges at these bits.
    span: Option<(u32, std::ops::Range<usize>)>,
    /// Count tables, unreadable rows and rows without an identifier (the span at 0).
    unkeyed: bool,
}

impl Keep {
    /// Whether this run diffs the user with key `key`.
    fn keeps(&self, key: u128) -> bool {
        self.span
            .as_ref()
            .is_none_or(|(bits, span)| span.contains(&range_of(key, *bits)))
    }
}

/// Reads a varint written by [`put_varint`] at `*at`, moving `at` past it.
fn get_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let x = *b.get(*at)?;
        *at += 1;
        v |= u64::from(x & 0x7f) << shift;
        if x & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// One table of the export (a part holds one or more): its header, how the route binds it,
/// and how its rows are encoded and digested. The diff maps a spilled row with these.
#[derive(Debug, Clone)]
struct Table {
    source: String,
    header: Vec<String>,
    binding: Binding,
    digest: TableDigest,
}

/// What became of one row.
enum Spilled {
    /// Spilled to its range.
    Row,
    /// Not this run's (another range's, or without an identifier outside the span at 0).
    Dropped,
    /// Refused: its identifier could not be read (rows whose values do not map are refused
    /// by the diff, which counts their user as present).
    Rejected(RowReject),
}

/// Reads each row's identifier and spills the row to its range (one per mapping thread).
struct Spiller<'a> {
    /// Reads identifiers only: values are mapped by the diff.
    mapper: Mapper<'a>,
    mapped: MappedRow,
    out: Partitioner,
    bits: u32,
    keep: Keep,
    tally: Tally,
}

/// Rows one spiller spilled and their records' bytes, published to [`Measure`] when
/// dropped (also when the spill stops on an error).
struct Tally {
    rows_spilled: u64,
    record_bytes: u64,
    measure: std::sync::Arc<Measure>,
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.measure
            .rows_spilled
            .fetch_add(self.rows_spilled, Ordering::Relaxed);
        self.measure
            .record_bytes
            .fetch_add(self.record_bytes, Ordering::Relaxed);
    }
}

impl<'a> Spiller<'a> {
    fn new(
        route: &'a Route,
        out: Partitioner,
        bits: u32,
        keep: Keep,
        measure: std::sync::Arc<Measure>,
    ) -> Self {
        Self {
            mapper: Mapper::new(route),
            mapped: MappedRow::default(),
            out,
            bits,
            keep,
            tally: Tally {
                rows_spilled: 0,
                record_bytes: 0,
                measure,
            },
        }
    }

    /// Reads `row`'s identifier and, when its user is this run's, spills the row's cells as
    /// read with their digest ([`TableDigest`]); its values are mapped by the diff, and only
    /// when the digest differs from the one the state recorded.
    fn row(
        &mut self,
        table: &Table,
        row: &Row<'_>,
        source_index: u32,
        source: &str,
    ) -> Result<Spilled, SyncError> {
        if let Err((_, e)) =
            self.mapper
                .map_key(&table.binding, &table.header, row, &mut self.mapped)
        {
            if !self.keep.unkeyed {
                return Ok(Spilled::Dropped);
            }
            return Ok(Spilled::Rejected(RowReject::unmapped(source, row, e, None)));
        }
        let key = self.mapped.key.0;
        if !self.keep.keeps(key) {
            return Ok(Spilled::Dropped);
        }
        let r = range_of(key, self.bits);
        let len = self.out.push_with(r, |rec| {
            rec.push(REC_ROW);
            put_varint(rec, u64::from(source_index));
            put_varint(rec, row.row);
            put_varint(rec, row.line.unwrap_or(NO_LINE));
            rec.extend_from_slice(&key.to_le_bytes());
            let at = rec.len();
            rec.extend_from_slice(&[0u8; 8]);
            let digest = table.digest.encode(row.cells, rec);
            rec[at..at + 8].copy_from_slice(&digest.to_le_bytes());
        })?;
        self.tally.rows_spilled += 1;
        self.tally.record_bytes += len as u64 + 4;
        Ok(Spilled::Row)
    }
}

/// Counts of what mapping threads spilled or refused.
#[derive(Debug, Default, Clone, Copy)]
struct Counted {
    rows_read: u64,
    rejected: u64,
    rows_without_identifier: u64,
}

impl Counted {
    /// Counts `s`; its reject, when it is one.
    fn count(&mut self, s: Spilled) -> Option<RowReject> {
        match s {
            Spilled::Dropped => None,
            Spilled::Row => {
                self.rows_read += 1;
                None
            }
            Spilled::Rejected(r) => {
                self.rows_read += 1;
                self.rejected += 1;
                if r.identifier.is_none() {
                    self.rows_without_identifier += 1;
                }
                Some(r)
            }
        }
    }
}

/// Step 1: reads, maps and spills every row by range; rejects rows that cannot be mapped.
struct Partition<'a> {
    route: &'a Route,
    spiller: Spiller<'a>,
    spill_to: SpillTo,
    /// Threads that encode one table's rows (1: the reader encodes them itself).
    mappers: usize,
    /// [`digest::route_seed`] of the route.
    route_seed: u64,
    sources: Vec<Table>,
    summary: Summary,
    ignored: BTreeSet<String>,
    /// Tables and rows read, kept or not.
    tables_seen: u64,
    rows_seen: u64,
}

type OnReject<'r> = &'r (dyn Fn(RowReject) + Sync);

impl Partition<'_> {
    /// One more row read; the live progress counter gets them in steps.
    fn seen_row(&mut self) {
        self.rows_seen += 1;
        if self.rows_seen.is_multiple_of(LIVE_STEP) {
            crate::progress::LIVE.rows_read(LIVE_STEP);
        }
    }

    fn add(&mut self, c: Counted) {
        self.summary.rows_read += c.rows_read;
        self.summary.rejected += c.rejected;
        self.summary.rows_without_identifier += c.rows_without_identifier;
    }

    /// An unreadable row: counted and rejected by the span at 0 only.
    fn unreadable(&mut self, source: &str, b: crate::read::BadRow, on_reject: OnReject<'_>) {
        if self.spiller.keep.unkeyed {
            self.summary.rows_read += 1;
            self.summary.rejected += 1;
            self.summary.rows_without_identifier += 1;
            on_reject(RowReject::unreadable(source, b));
        }
    }

    fn table(&mut self, src: &mut dyn RowSource, on_reject: OnReject<'_>) -> Result<(), SyncError> {
        self.tables_seen += 1;
        if self.spiller.keep.unkeyed {
            self.summary.tables += 1;
        }
        let header = src.header().to_vec();
        let source = src.source().to_string();
        let source_index = self.sources.len() as u32;
        let binding = Binding::new(self.route, &header, &source)?;
        self.ignored.extend(binding.unknown_columns.iter().cloned());
        let table = Table {
            digest: TableDigest::new(self.route_seed, &binding, header.len()),
            source: source.clone(),
            header,
            binding,
        };
        self.sources.push(table.clone());
        if self.mappers > 1 {
            return self.table_parallel(src, &table, source_index, on_reject);
        }
        while let Some(item) = src.next_row()? {
            self.seen_row();
            let row = match item {
                RowItem::Bad(b) => {
                    self.unreadable(&source, b, on_reject);
                    continue;
                }
                RowItem::Row(r) => r,
            };
            let s = self.spiller.row(&table, &row, source_index, &source)?;
            let mut c = Counted::default();
            if let Some(reject) = c.count(s) {
                on_reject(reject);
            }
            self.add(c);
        }
        Ok(())
    }

    /// [`Partition::table`] with the mapping on [`Partition::mappers`] threads: this thread
    /// reads each row and its identifier (refusing a row without one, dropping another
    /// run's) and hands the row to the thread of its range, in batches. A range's rows all
    /// go to one thread, in order, so each range file keeps the export's order and a user's
    /// first row still wins.
    fn table_parallel(
        &mut self,
        src: &mut dyn RowSource,
        table: &Table,
        source_index: u32,
        on_reject: OnReject<'_>,
    ) -> Result<(), SyncError> {
        let (binding, header, source) = (&table.binding, &table.header[..], &table.source[..]);
        let n = self.mappers;
        let bits = self.spiller.bits;
        let columns = Columns::new(header.len(), binding.columns());
        let fresh = || RowBatch::new(columns.clone(), header.len(), BATCH_ROWS);
        std::thread::scope(|scope| {
            let mut txs = Vec::with_capacity(n);
            let mut handles = Vec::with_capacity(n);
            for _ in 0..n {
                let (tx, rx) = std::sync::mpsc::sync_channel::<RowBatch>(2);
                txs.push(tx);
                let mut sp = Spiller::new(
                    self.route,
                    self.spill_to.partitioner(),
                    bits,
                    self.spiller.keep.clone(),
                    self.spill_to.measure.clone(),
                );
                handles.push(scope.spawn(move || -> Result<Counted, SyncError> {
                    let mut c = Counted::default();
                    for batch in rx {
                        for i in 0..batch.len() {
                            let Some((row, line, cells)) = batch.row(i) else {
                                break;
                            };
                            let r = Row {
                                row,
                                line,
                                cells: &cells,
                            };
                            let s = sp.row(table, &r, source_index, source)?;
                            if let Some(reject) = c.count(s) {
                                on_reject(reject);
                            }
                        }
                    }
                    sp.out.finish()?;
                    Ok(c)
                }));
            }
            let mut read = || -> Result<(), SyncError> {
                let mut batches: Vec<RowBatch> = (0..n).map(|_| fresh()).collect();
                while let Some(item) = src.next_row()? {
                    self.seen_row();
                    let row = match item {
                        RowItem::Bad(b) => {
                            self.unreadable(source, b, on_reject);
                            continue;
                        }
                        RowItem::Row(r) => r,
                    };
                    let sp = &mut self.spiller;
                    if let Err((_, e)) = sp.mapper.map_key(binding, header, &row, &mut sp.mapped) {
                        if sp.keep.unkeyed {
                            self.summary.rows_read += 1;
                            self.summary.rejected += 1;
                            self.summary.rows_without_identifier += 1;
                            on_reject(RowReject::unmapped(source, &row, e, None));
                        }
                        continue;
                    }
                    if !sp.keep.keeps(sp.mapped.key.0) {
                        continue;
                    }
                    let w = range_of(sp.mapped.key.0, bits) % n;
                    let (Some(batch), Some(tx)) = (batches.get_mut(w), txs.get(w)) else {
                        continue;
                    };
                    batch.push(&row);
                    if batch.len() >= BATCH_ROWS || batch.text_bytes() >= BATCH_BYTES {
                        let full = std::mem::replace(batch, fresh());
                        if tx.send(full).is_err() {
                            // That thread stopped on an error, reported below.
                            return Ok(());
                        }
                    }
                }
                for (batch, tx) in batches.into_iter().zip(&txs) {
                    if !batch.is_empty() {
                        let _ = tx.send(batch);
                    }
                }
                Ok(())
            };
            let read = read();
            drop(txs);
            let mut first = read.err();
            for h in handles {
                let done = h.join().unwrap_or_else(|_| {
                    Err(SyncError::Stopped("a mapping thread panicked".into()))
                });
                match done {
                    Ok(c) => self.add(c),
                    Err(e) => {
                        first.get_or_insert(e);
                    }
                }
            }
            first.map_or(Ok(()), Err)
        })
    }
}

/// One part, partitioned.
struct PartOut {
    index: usize,
    sources: Vec<Table>,
    summary: Summary,
    ignored: BTreeSet<String>,
    tables_seen: u64,
    rows_seen: u64,
}

fn part_dir(rows: &Path, part: usize) -> PathBuf {
    rows.join(format!("p{part:05}"))
}

/// What one worker found.
#[derive(Default)]
struct Found {
    unchanged: u64,
    /// Of the unchanged, users whose row digest is recorded anew.
    digests_recorded: u64,
    /// Rows whose values could not be mapped.
    unmapped: u64,
    users_changed: u64,
    users_new: u64,
    attributes_changed: u64,
    duplicates: u64,
    audiences: Vec<AudienceDepartures>,
    unaddressable: u64,
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
    let keep = settings
        .only_ranges
        .clone()
        .zip(state_bits)
        .map(|(span, b)| (b, span));
    let unkeyed = keep.as_ref().is_none_or(|(_, span)| span.start == 0);
    let spill = SpillDir::create(&settings.spill_base, &settings.tag)?;
    let bits = state_bits.unwrap_or(0).max(settings.min_spill_bits);
    let rows_dir = spill.sub("rows")?;
    let read_opts = route.read_options();
    let route_seed = digest::route_seed(route);
    // Step 1, parts in parallel: each reader takes the next part and spills it into its own
    // per-range files (rows/p<part>/), so the diff can read a range's rows in export order.
    let readers = settings.workers.max(1);
    let parts = parts.into_iter();
    // Fewer parts than cores (one big file): each part's rows are mapped on several threads.
    let mappers = match parts.size_hint() {
        (_, Some(n)) if n > 0 && n < readers => readers / n,
        _ => 1,
    };
    let queue = Mutex::new(parts.enumerate());
    let rejects = Mutex::new(on_reject);
    let stop = AtomicBool::new(false);
    let total = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let measure = std::sync::Arc::new(Measure::default());
    let read_part = |i: usize, part: Result<Part<R>, SyncError>| -> Result<PartOut, SyncError> {
        let part = part?;
        let dir = part_dir(&rows_dir, i);
        std::fs::create_dir_all(&dir).map_err(|error| {
            SyncError::Spill(SpillError::Io {
                path: dir.display().to_string(),
                error,
            })
        })?;
        let spill_to = SpillTo {
            dir,
            bits,
            budget: settings.buffer_budget / readers,
            limit: settings.disk_limit,
            total: total.clone(),
            measure: measure.clone(),
        };
        let keep = Keep {
            span: keep.clone(),
            unkeyed,
        };
        let mut p = Partition {
            route,
            spiller: Spiller::new(route, spill_to.partitioner(), bits, keep, measure.clone()),
            spill_to,
            mappers,
            route_seed,
            sources: Vec::new(),
            summary: Summary::default(),
            ignored: BTreeSet::new(),
            tables_seen: 0,
            rows_seen: 0,
        };
        let reject = |r: RowReject| {
            if let Ok(mut sink) = rejects.lock() {
                (*sink)(r);
            }
        };
        let counted = CountingRead {
            inner: part.reader,
            n: &measure.source_bytes,
        };
        let read = read::read_export(
            counted,
            &part.source,
            &read_opts,
            &mut |src: &mut dyn RowSource| p.table(src, &reject),
        );
        measure.rows_seen.fetch_add(p.rows_seen, Ordering::Relaxed);
        read?;
        p.spiller.out.finish()?;
        crate::progress::LIVE.rows_read(p.rows_seen % LIVE_STEP);
        Ok(PartOut {
            index: i,
            sources: p.sources,
            summary: p.summary,
            ignored: p.ignored,
            tables_seen: p.tables_seen,
            rows_seen: p.rows_seen,
        })
    };
    let read: Vec<Result<Vec<PartOut>, SyncError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..readers)
            .map(|_| {
                scope.spawn(|| {
                    let mut outs = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let next = match queue.lock() {
                            Ok(mut q) => q.next(),
                            Err(_) => None,
                        };
                        let Some((i, part)) = next else { break };
                        match read_part(i, part) {
                            Ok(o) => outs.push(o),
                            Err(e) => {
                                stop.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                    Ok(outs)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(SyncError::Stopped("a reader panicked".into())))
            })
            .collect()
    });
    let mut outs: Vec<PartOut> = Vec::new();
    for r in read {
        match r {
            Ok(o) => outs.extend(o),
            // Nothing was diffed or sent yet: say what was measured, so the caller can
            // split the export from real figures instead of failing.
            Err(SyncError::Spill(SpillError::Full { .. })) => {
                let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                return Err(SyncError::SpillOverflow(SpillOverflow {
                    limit_bytes: settings.disk_limit.unwrap_or(0),
                    written_bytes: load(&total),
                    rows_read: load(&measure.rows_seen),
                    rows_spilled: load(&measure.rows_spilled),
                    record_bytes: load(&measure.record_bytes),
                    source_bytes_read: load(&measure.source_bytes),
                    parts_bytes: 0,
                }));
            }
            Err(e) => return Err(e),
        }
    }
    outs.sort_by_key(|o| o.index);
    let mut summary = Summary::default();
    let mut ignored = BTreeSet::new();
    let mut sources: Vec<Vec<Table>> = Vec::with_capacity(outs.len());
    let (mut tables_seen, mut rows_seen) = (0u64, 0u64);
    for o in outs {
        tables_seen += o.tables_seen;
        rows_seen += o.rows_seen;
        summary.tables += o.summary.tables;
        summary.rows_read += o.summary.rows_read;
        summary.rejected += o.summary.rejected;
        summary.rows_without_identifier += o.summary.rows_without_identifier;
        ignored.extend(o.ignored);
        sources.push(o.sources);
    }
    if tables_seen == 0 {
        return Err(ReadError::NoTable {
            source_name: opts.export_name.clone(),
            detail: "no part, or only folders, links or hidden files in its archives".into(),
        }
        .into());
    }
    if rows_seen == 0 && !route.config.allow_empty {
        return Err(ReadError::EmptyExport {
            source_name: opts.export_name.clone(),
        }
        .into());
    }
    if !ignored.is_empty() {
        warn!(route = route.name(), columns = ?ignored, "Export columns not mapped by the route are ignored.");
    }
    let spilled = total.load(Ordering::Relaxed);
    let partition_s = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    summary.ignored_columns = ignored.into_iter().collect();
    let part_dirs: Vec<PathBuf> = (0..sources.len()).map(|i| part_dir(&rows_dir, i)).collect();
    tracing::info!(
        route = route.name(),
        rows = summary.rows_read,
        spilled_mb = spilled >> 20,
        ranges = 1u64 << bits,
        parts = sources.len(),
        "Export partitioned by hash range."
    );

    // Step 2: the diff, one unit (a state range, or a spill range of an empty state) per
    // worker at a time.
    let unit_bits = state_bits.unwrap_or(bits);
    let per_unit = bits - unit_bits;
    let span = settings
        .only_ranges
        .clone()
        .unwrap_or(0..1usize << unit_bits);
    let dep_dir = spill.sub("departures")?;
    let next = AtomicUsize::new(span.start);
    let workers = settings.workers.max(1).min(span.len().max(1));
    let results: Vec<Result<Found, SyncError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let ctx = DiffCtx {
                    route,
                    state,
                    opts,
                    part_dirs: &part_dirs,
                    sources: &sources,
                    on_delta,
                    rejects: &rejects,
                    stop: &stop,
                };
                let next = &next;
                let dep_dir = &dep_dir;
                scope.spawn(move || {
                    let mine = dep_dir.join(format!("w{w}"));
                    std::fs::create_dir_all(&mine).map_err(|error| {
                        SyncError::Spill(SpillError::Io {
                            path: mine.display().to_string(),
                            error,
                        })
                    })?;
                    let mut deps = Partitioner::new(&mine, 0, 1 << 20, settings.disk_limit);
                    let mut found = Found::default();
                    if opts.departures {
                        // Every worker sums into the route's full list, even one that
                        // diffed no range.
                        found.audiences = user::departure_audiences(route);
                    }
                    loop {
                        let u = next.fetch_add(1, Ordering::Relaxed);
                        if u >= span.end || ctx.stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let subs = (u << per_unit)..((u + 1) << per_unit);
                        if let Err(e) =
                            ctx.unit(u, state_bits.is_some(), subs, &mut found, &mut deps)
                        {
                            ctx.stop.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                    deps.finish()?;
                    Ok(found)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(SyncError::Stopped("a diff worker panicked".into())))
            })
            .collect()
    });
    let mut audiences: Option<Vec<AudienceDepartures>> = None;
    for r in results {
        let f = r?;
        summary.unchanged += f.unchanged;
        summary.digests_recorded += f.digests_recorded;
        summary.rejected += f.unmapped;
        summary.users_changed += f.users_changed;
        summary.users_new += f.users_new;
        summary.attributes_changed += f.attributes_changed;
        summary.rejected += f.duplicates;
        summary.departures_unaddressable += f.unaddressable;
        match &mut audiences {
            None => audiences = Some(f.audiences),
            Some(all) => {
                for (a, b) in all.iter_mut().zip(f.audiences) {
                    a.members_before += b.members_before;
                    a.leaving += b.leaving;
                }
            }
        }
    }
    let diff_s = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let record = |departures_s: f64| {
        if let Some(t) = &settings.times
            && let Ok(mut t) = t.lock()
        {
            *t = RangedTimes {
                partition_s,
                diff_s,
                departures_s,
                spilled_bytes: spilled,
                workers,
                mappers,
            };
        }
    };
    let Some(mut audiences) = audiences.filter(|_| opts.departures) else {
        record(0.0);
        return Ok(summary);
    };
    let files: Vec<PathBuf> = (0..workers)
        .map(|w| crate::state::spill::range_path(&dep_dir.join(format!("w{w}")), 0))
        .collect();
    if settings.defer_departures {
        // Step 3 is the finalizer's: hand the counts and the removals over.
        for a in &mut audiences {
            a.share = share(a);
        }
        summary.departures = audiences;
        if let Some(path) = &settings.departures_file {
            concat_files(&files, path)?;
        }
        record(started.elapsed().as_secs_f64());
        drop(spill);
        return Ok(summary);
    }
    // Step 3: the guard on the export's totals, then the removals it lets through.
    summary.departures = audiences;
    let mut readers = Vec::with_capacity(files.len());
    for f in &files {
        match std::fs::File::open(f) {
            Ok(file) => readers.push((f.display().to_string(), file)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(SyncError::Spill(SpillError::Io {
                    path: f.display().to_string(),
                    error,
                }));
            }
        }
    }
    release_departures(&mut summary, route, opts, readers, on_delta)?;
    record(started.elapsed().as_secs_f64());
    drop(spill);
    Ok(summary)
}

fn share(a: &AudienceDepartures) -> f64 {
    if a.members_before > 0 {
        a.leaving as f64 / a.members_before as f64
    } else {
        0.0
    }
}

/// Writes the departure files `files` (those that exist) one after the other into `out`.
fn concat_files(files: &[PathBuf], out: &Path) -> Result<(), SyncError> {
    let err = |path: &Path, error: std::io::Error| {
        SyncError::Spill(SpillError::Io {
            path: path.display().to_string(),
            error,
        })
    };
    let mut w = std::fs::File::create(out).map_err(|e| err(out, e))?;
    for f in files {
        let mut r = match std::fs::File::open(f) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(err(f, e)),
        };
        std::io::copy(&mut r, &mut w).map_err(|e| err(out, e))?;
    }
    std::io::Write::flush(&mut w).map_err(|e| err(out, e))
}

/// Step 3 of [`produce_ranged`] on the export's totals, also a fan-out finalizer's: judges
/// each audience of `summary.departures` (members and leavers summed over every range of
/// the export; `summary.rows_without_identifier` likewise) with the departure guard, then
/// reads the removals from the departure files `files` (`(name for errors, bytes)`, as
/// written with `defer_departures`), sends those it lets through with `on_delta` and counts
/// them (`users_departed`, `attributes_changed`, per audience `sent` / `held`). Does
/// nothing when `opts.departures` is off.
pub fn release_departures<R: Read>(
    summary: &mut Summary,
    route: &Route,
    opts: &ProduceOptions,
    files: impl IntoIterator<Item = (String, R)>,
    on_delta: &(dyn Fn(UserDelta) -> Result<(), Stop> + Sync),
) -> Result<(), SyncError> {
    if !opts.departures {
        return Ok(());
    }
    let mut audiences = std::mem::take(&mut summary.departures);
    if audiences.is_empty() {
        audiences = user::departure_audiences(route);
    }
    for a in &mut audiences {
        a.share = share(a);
        a.held_because = None;
        a.released = false;
        a.sent = 0;
        a.held = 0;
    }
    let held = user::decide_departures(
        &mut audiences,
        summary.rows_without_identifier,
        opts.allow_departures,
    );
    for a in &audiences {
        if let Some(reason) = &a.held_because {
            warn!(route = route.name(), audience = %a.audience, held = a.leaving, reason = %reason,
                  "Departures held: not sent until an operator releases them.");
        }
    }
    for (what, r) in files {
        read_departure_file::<SyncError>(r, &what, &mut |b| {
            let mut d =
                decode_departure(b, route, &audiences, &opts.export_name).ok_or_else(|| {
                    SyncError::Spill(SpillError::Corrupt {
                        path: what.clone(),
                        offset: 0,
                    })
                })?;
            user::hold_departure(&mut d, &mut audiences, &held);
            if d.changes.is_empty() {
                return Ok(());
            }
            summary.users_departed += 1;
            summary.attributes_changed += d.changes.len() as u64;
            on_delta(d).map_err(|s| SyncError::Stopped(s.0))
        })?;
    }
    summary.departures = audiences;
    Ok(())
}

/// Calls `f` with each record of a departure file (length-framed records of
/// [`encode_departure`], the spill format), in order; `what` names it in errors.
pub fn read_departure_file<E: From<SpillError>>(
    r: impl Read,
    what: &str,
    f: &mut dyn FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    crate::state::spill::read_records(r, what, f)
}

/// Appends one departure record to a departure file being written in `out` (its length,
/// then [`encode_departure`]'s bytes).
pub fn write_departure_record(rec: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(rec.len() as u32).to_le_bytes());
    out.extend_from_slice(rec);
}

/// Adds one fan-out piece's summary (a run with `only_ranges` and `defer_departures`) to
/// `total`: counts summed, departures summed per audience (members, leavers, sent, held),
/// ignored columns joined. The pieces of one export add up to a single run's summary before
/// its departures are released ([`release_departures`]).
pub fn add_piece(total: &mut Summary, piece: &Summary) {
    total.rows_read += piece.rows_read;
    total.rejected += piece.rejected;
    total.unchanged += piece.unchanged;
    total.digests_recorded += piece.digests_recorded;
    total.users_changed += piece.users_changed;
    total.users_new += piece.users_new;
    total.attributes_changed += piece.attributes_changed;
    total.users_departed += piece.users_departed;
    total.departures_unaddressable += piece.departures_unaddressable;
    total.rows_without_identifier += piece.rows_without_identifier;
    total.tables += piece.tables;
    for c in &piece.ignored_columns {
        if !total.ignored_columns.contains(c) {
            total.ignored_columns.push(c.clone());
        }
    }
    total.ignored_columns.sort();
    for a in &piece.departures {
        match total
            .departures
            .iter_mut()
            .find(|t| t.audience == a.audience)
        {
            Some(t) => {
                t.members_before += a.members_before;
                t.leaving += a.leaving;
                t.sent += a.sent;
                t.held += a.held;
                t.share = share(t);
            }
            None => total.departures.push(a.clone()),
        }
    }
}

type RejectSink<'r> = Mutex<&'r mut (dyn FnMut(RowReject) + Send)>;

struct DiffCtx<'a, 'r> {
    route: &'a Route,
    state: &'a dyn RangeState,
    opts: &'a ProduceOptions,
    part_dirs: &'a [PathBuf],
    sources: &'a [Vec<Table>],
    on_delta: &'a (dyn Fn(UserDelta) -> Result<(), Stop> + Sync),
    rejects: &'a RejectSink<'r>,
    stop: &'a AtomicBool,
}

impl DiffCtx<'_, '_> {
    /// Diffs the spill ranges `subs` against state range `u`, then finds its departures.
    fn unit(
        &self,
        u: usize,
        has_state: bool,
        subs: std::ops::Range<usize>,
        found: &mut Found,
        deps: &mut Partitioner,
    ) -> Result<(), SyncError> {
        let snap = if has_state {
            self.state.load(u)?
        } else {
            Snapshot::for_route(self.route)
        };
        let mut seen = Seen::new(&snap);
        let mut w = Worker {
            mapper: Mapper::new(self.route),
            mapped: MappedRow::default(),
            buf: Vec::with_capacity(256),
            digest_slot: snap.slot_of_name(ROW_DIGEST),
            pending: Vec::with_capacity(HAND_DELTAS),
            digests: DIGESTS.take(),
        };
        if let Some(slot) = w.digest_slot {
            snap.base_column_into(slot, &mut w.digests);
        }
        for s in subs {
            // A range's rows, part after part: export order, so a user's first row wins.
            seen.clear_others();
            for (part, dir) in self.part_dirs.iter().enumerate() {
                read_range::<SyncError>(dir, s, &mut |rec| {
                    if self.stop.load(Ordering::Relaxed) {
                        return Err(SyncError::Stopped("another range failed".into()));
                    }
                    self.row(part, rec, &snap, &mut seen, &mut w, found)
                        .ok_or_else(|| {
                            SyncError::Spill(SpillError::Corrupt {
                                path: crate::state::spill::range_path(dir, s)
                                    .display()
                                    .to_string(),
                                offset: 0,
                            })
                        })?
                })?;
            }
        }
        self.flush(&mut w)?;
        DIGESTS.set(std::mem::take(&mut w.digests));
        if !self.opts.departures {
            drop(seen);
            snap.recycle();
            return Ok(());
        }
        let d = user::departures(&snap, self.route, &seen, &self.opts.export_name);
        drop(seen);
        snap.recycle();
        for (a, b) in found.audiences.iter_mut().zip(&d.audiences) {
            a.members_before += b.members_before;
            a.leaving += b.leaving;
        }
        found.unaddressable += d.unaddressable;
        let mut rec = Vec::with_capacity(64);
        for delta in &d.deltas {
            encode_departure(delta, &d.audiences, &mut rec);
            deps.push(0, &rec)?;
        }
        Ok(())
    }

    /// One spilled record; `None` when it does not decode.
    fn row(
        &self,
        part: usize,
        rec: &[u8],
        snap: &Snapshot,
        seen: &mut Seen,
        w: &mut Worker<'_>,
        found: &mut Found,
    ) -> Option<Result<(), SyncError>> {
        match *rec.first()? {
            REC_ROW => {
                let mut at = 1;
                let src = usize::try_from(get_varint(rec, &mut at)?).ok()?;
                let row = get_varint(rec, &mut at)?;
                let line = get_varint(rec, &mut at)?;
                let key = UserKey(u128::from_le_bytes(rec.get(at..at + 16)?.try_into().ok()?));
                let digest = u64::from_le_bytes(rec.get(at + 16..at + 24)?.try_into().ok()?);
                let cells = rec.get(at + 24..)?;
                let table = self.sources.get(part)?.get(src)?;
                let state = snap.get(key);
                let full_resend = self.opts.full_resend;
                let recorded = match state {
                    Some(st) => match st.index {
                        Some(i) => w.digests.get(i).copied(),
                        None => w.digest_slot.and_then(|slot| st.fp(slot)),
                    },
                    None => None,
                } == Some(stored_digest(digest));
                // The row the state's values came from, again: unchanged, nothing to map.
                // (A second row of the user is a duplicate: mapped below, as its reject
                // depends on whether its values map.)
                if recorded && !full_resend && seen.insert(key, state) {
                    found.unchanged += 1;
                    return Some(Ok(()));
                }
                let first = !recorded || full_resend;
                let line = (line != NO_LINE).then_some(line);
                let pos = || RowPos {
                    source: table.source.clone(),
                    row,
                    line,
                };
                let cells =
                    EncodedRow::decode(table.digest.columns(), table.digest.width(), cells)?;
                let r = Row {
                    row,
                    line,
                    cells: &cells,
                };
                let mapped = w
                    .mapper
                    .map_key(&table.binding, &table.header, &r, &mut w.mapped)
                    .and_then(|()| {
                        w.mapper
                            .map_values(&table.binding, &table.header, &r, &mut w.mapped)
                    });
                if let Err((outcome, e)) = mapped {
                    // The user is in the export: never treat them as departed.
                    seen.insert(key, state);
                    found.unmapped += 1;
                    let identifier =
                        matches!(outcome, MapOutcome::Identified).then(|| w.mapped.identifier());
                    self.reject(RowReject::unmapped(&table.source, &r, e, identifier));
                    return Some(Ok(()));
                }
                if !first || !seen.insert(key, state) {
                    found.duplicates += 1;
                    self.reject(RowReject {
                        pos: pos(),
                        column: Some(self.route.config.identifier.column.clone()),
                        reason: "duplicate identifier: the user already appeared earlier in this export; the earlier row is kept and this one is not sent".into(),
                        identifier: Some(w.mapped.identifier()),
                    });
                    return Some(Ok(()));
                }
                let changes = user::changes(state, &w.mapped, self.route, full_resend, &mut w.buf);
                if changes.is_empty() {
                    found.unchanged += 1;
                    // Same values from other cells (a new digest, or a state written before
                    // digests): a records-only delta, so the next run skips this row.
                    if state.is_none() || w.digest_slot.is_none() || recorded {
                        return Some(Ok(()));
                    }
                    found.digests_recorded += 1;
                } else {
                    found.users_changed += 1;
                    found.attributes_changed += changes.len() as u64;
                    found.users_new += u64::from(state.is_none());
                }
                let d = UserDelta {
                    identifier: w.mapped.identifier(),
                    pos: pos(),
                    changes,
                    update_existing_only: self.route.config.update_existing_only,
                    is_new: state.is_none(),
                    row_digest: Some(digest),
                };
                Some(self.hand(w, d))
            }
            _ => None,
        }
    }

    /// Queues `d` for the sender, handing the queue over once it holds [`HAND_DELTAS`]: in
    /// bursts, so the consumer is woken once per burst, not per delta (a wake-up per delta was
    /// ~4% of the diff's CPU).
    fn hand(&self, w: &mut Worker<'_>, d: UserDelta) -> Result<(), SyncError> {
        w.pending.push(d);
        if w.pending.len() >= HAND_DELTAS {
            return self.flush(w);
        }
        Ok(())
    }

    /// Hands every queued delta to the sender.
    fn flush(&self, w: &mut Worker<'_>) -> Result<(), SyncError> {
        for d in w.pending.drain(..) {
            (self.on_delta)(d).map_err(|s| SyncError::Stopped(s.0))?;
        }
        Ok(())
    }

    fn reject(&self, r: RowReject) {
        if let Ok(mut sink) = self.rejects.lock() {
            (*sink)(r);
        }
    }
}

thread_local! {
    /// A diff worker's digest column, kept from one range to the next (its memory reused).
    static DIGESTS: std::cell::Cell<Vec<u64>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Deltas a diff worker hands to the sender at once.
const HAND_DELTAS: usize = 64;

/// One diff worker's mapping tools.
struct Worker<'a> {
    /// Deltas not yet handed to the sender (at most [`HAND_DELTAS`]; all at the end of a
    /// range).
    pending: Vec<UserDelta>,
    mapper: Mapper<'a>,
    mapped: MappedRow,
    buf: Vec<u8>,
    /// The state's [`ROW_DIGEST`] slot (`None`: a layout without one).
    digest_slot: Option<usize>,
    /// That slot of the range's base users, as one column ([`Snapshot::base_column_into`]).
    digests: Vec<u64>,
}

/// A departure delta as one record of a departure file, into `out` (cleared first): `u16`
/// change count, per change (`u16` index into `audiences`, `u8` value: 0 null, 1 false),
/// then the identifier's canonical text. `audiences` is the route's list in slot order
/// ([`user::departure_audiences`], or a summary's `departures` of the same route).
pub fn encode_departure(d: &UserDelta, audiences: &[AudienceDepartures], out: &mut Vec<u8>) {
    out.clear();
    let changes: Vec<(u16, u8)> = d
        .changes
        .iter()
        .filter_map(|c| {
            let j = audiences.iter().position(|a| a.audience == c.name)?;
            Some((j as u16, u8::from(!c.value.is_null())))
        })
        .collect();
    out.extend_from_slice(&(changes.len() as u16).to_le_bytes());
    for (j, v) in changes {
        out.extend_from_slice(&j.to_le_bytes());
        out.push(v);
    }
    out.extend_from_slice(identifier_text(&d.identifier).as_bytes());
}

/// One record of [`encode_departure`] back as the removal to send (`None` when it does not
/// decode); `source` names the export in its position.
pub fn decode_departure(
    b: &[u8],
    route: &Route,
    audiences: &[AudienceDepartures],
    source: &str,
) -> Option<UserDelta> {
    let n = u16::from_le_bytes(b.get(..2)?.try_into().ok()?) as usize;
    let mut changes = Vec::with_capacity(n);
    for i in 0..n {
        let at = 2 + i * 3;
        let j = u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as usize;
        let value = match b.get(at + 2)? {
            0 => Value::Null,
            _ => Value::Bool(false),
        };
        changes.push(AttributeChange {
            name: audiences.get(j)?.audience.clone(),
            fingerprint: (!value.is_null()).then(|| fingerprint(&value)),
            value,
        });
    }
    let identifier = parse_identifier(std::str::from_utf8(b.get(2 + n * 3..)?).ok()?)?;
    Some(UserDelta {
        identifier,
        pos: RowPos {
            source: source.to_string(),
            row: 0,
            line: None,
        },
        changes,
        update_existing_only: route.config.update_existing_only,
        is_new: false,
        row_digest: None,
    })
}

/// A whole in-memory [`Snapshot`] served one hash range at a time (tests, benches, and the
/// equivalence of both paths). The snapshot must be compacted.
pub struct SplitSnapshot<'a> {
    snap: &'a Snapshot,
    bits: Option<u32>,
}

impl<'a> SplitSnapshot<'a> {
    /// `snap` as `1 << bits` ranges (`None`: no layout, the snapshot must be empty).
    pub fn new(snap: &'a Snapshot, bits: Option<u32>) -> Self {
        Self { snap, bits }
    }
}

impl RangeState for SplitSnapshot<'_> {
    fn bits(&self) -> Option<u32> {
        self.bits
    }

    fn load(&self, range: usize) -> Result<Snapshot, SyncError> {
        let bits = self.bits.unwrap_or(0);
        let (shard, _) = self.snap.encode_hash_range(range, bits);
        let mut out = Snapshot::empty(self.snap.names().to_vec(), self.snap.keeps_ids());
        out.load_base_shard(&shard, "range")
            .map_err(|e| SyncError::State {
                range,
                message: e.to_string(),
                retryable: false,
            })?;
        Ok(out)
    }
}

/// The state in an object store, one hash range at a time (from the bounded diff's worker
/// threads, which are not the runtime's: each load blocks on `rt`). `doc` must have no
/// checkpoint segments (fold them first, [`crate::state::store::StateStore::commit_ranged`]
/// without a watermark).
pub struct StoreRanges {
    state: crate::state::store::StateStore,
    doc: crate::state::store::HeadDoc,
    route: std::sync::Arc<Route>,
    rt: tokio::runtime::Handle,
}

impl StoreRanges {
    /// The ranges of `doc` in `state`, laid out for `route`.
    pub fn new(
        state: crate::state::store::StateStore,
        doc: crate::state::store::HeadDoc,
        route: std::sync::Arc<Route>,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Self {
            state,
            doc,
            route,
            rt,
        }
    }
}

impl RangeState for StoreRanges {
    fn bits(&self) -> Option<u32> {
        (!self.doc.ranges.is_empty()).then_some(self.doc.range_bits)
    }

    fn load(&self, range: usize) -> Result<Snapshot, SyncError> {
        self.state
            .load_range_blocking(&self.doc, range, &self.route, &self.rt)
            .map_err(|e| SyncError::State {
                range,
                message: e.to_string(),
                retryable: e.is_retryable(),
            })
    }
}
