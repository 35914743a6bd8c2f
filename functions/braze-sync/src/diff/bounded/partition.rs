//! Step 1 of the bounded diff: every part read in order and each row spilled, as read, to
//! the spill file of its user's hash range (with its position, user key and row digest),
//! parts in parallel and one big part's rows on several threads. A row without an
//! identifier is rejected here; values are mapped by the diff ([`super::worker`]).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::warn;

use super::Job;
use super::overflow::{CountingRead, Measure};
use crate::config::route::Route;
use crate::diff::digest::{self, TableDigest};
use crate::diff::export::{Part, Summary, SyncError};
use crate::diff::rejects::RowReject;
use crate::map::{Binding, MappedRow, Mapper};
use crate::read::row_codec::{Columns, RowBatch, put_varint};
use crate::read::{self, ReadError, ReadOptions, Row, RowItem, RowSource};
use crate::state::confirmed::range_of;
use crate::state::spill::{Partitioner, SpillDir, SpillError};

/// A spill record of a row (the only kind).
pub(super) const REC_ROW: u8 = 0;
/// The line of a row that has none.
pub(super) const NO_LINE: u64 = u64::MAX;

/// Rows a reader hands a mapping thread at once (a batch also ends at [`BATCH_BYTES`]).
const BATCH_ROWS: usize = 512;
/// Text bytes that end a batch.
const BATCH_BYTES: usize = 256 * 1024;

/// Rows a reader counts before adding them to the live progress counter.
const LIVE_STEP: u64 = 1024;

/// Reads a varint written by [`put_varint`] at `*at`, moving `at` past it.
pub(super) fn get_varint(b: &[u8], at: &mut usize) -> Option<u64> {
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

/// Where one part's rows are spilled: the partitioner of each thread that maps them.
struct SpillTo {
    dir: PathBuf,
    bits: u32,
    budget: usize,
    limit: Option<u64>,
    total: Arc<AtomicU64>,
    measure: Arc<Measure>,
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

/// One table of the export (a part holds one or more): its header, how the route binds it,
/// and how its rows are encoded and digested. The diff maps a spilled row with these.
#[derive(Debug, Clone)]
pub(super) struct Table {
    pub(super) source: String,
    pub(super) header: Vec<String>,
    pub(super) binding: Binding,
    pub(super) digest: TableDigest,
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
    measure: Arc<Measure>,
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
        measure: Arc<Measure>,
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

/// What step 1 hands to the diff.
pub(super) struct Partitioned {
    /// Tables, rows read, rejected and without an identifier; the columns ignored.
    pub(super) summary: Summary,
    /// Each part's tables, in part order.
    pub(super) sources: Vec<Vec<Table>>,
    /// Each part's spill folder, in part order.
    pub(super) part_dirs: Vec<PathBuf>,
    /// Spill ranges: `1 << bits`.
    pub(super) bits: u32,
    /// Bytes spilled.
    pub(super) spilled: u64,
    /// Threads that mapped each part's rows.
    pub(super) mappers: usize,
}

/// Step 1 of [`super::produce_ranged`]: each reader takes the next part and spills it into
/// its own per-range files (`rows/p<part>/`), so the diff can read a range's rows in export
/// order.
pub(super) fn partition<I, R>(
    job: &Job<'_, '_>,
    parts: I,
    spill: &SpillDir,
    state_bits: Option<u32>,
) -> Result<Partitioned, SyncError>
where
    I: IntoIterator<Item = Result<Part<R>, SyncError>>,
    I::IntoIter: Send,
    R: Read + Send,
{
    let settings = job.settings;
    let keep = settings
        .only_ranges
        .clone()
        .zip(state_bits)
        .map(|(span, b)| (b, span));
    let unkeyed = keep.as_ref().is_none_or(|(_, span)| span.start == 0);
    let bits = state_bits.unwrap_or(0).max(settings.min_spill_bits);
    let rows_dir = spill.sub("rows")?;
    let readers = settings.workers.max(1);
    let parts = parts.into_iter();
    // Fewer parts than cores (one big file): each part's rows are mapped on several threads.
    let mappers = match parts.size_hint() {
        (_, Some(n)) if n > 0 && n < readers => readers / n,
        _ => 1,
    };
    let step = Readers {
        job,
        rows_dir,
        bits,
        readers,
        mappers,
        keep: Keep {
            span: keep,
            unkeyed,
        },
        read_opts: job.route.read_options(),
        route_seed: digest::seed_for(job.route, job.opts),
        total: Arc::new(AtomicU64::new(0)),
        measure: Arc::new(Measure::default()),
    };
    let outs = step.read_all(parts)?;
    step.merge(outs)
}

/// Step 1's readers and what they share.
struct Readers<'j, 'a, 'r> {
    job: &'j Job<'a, 'r>,
    rows_dir: PathBuf,
    bits: u32,
    readers: usize,
    mappers: usize,
    keep: Keep,
    read_opts: ReadOptions,
    route_seed: u64,
    /// Bytes spilled by every partitioner.
    total: Arc<AtomicU64>,
    measure: Arc<Measure>,
}

impl Readers<'_, '_, '_> {
    /// Reads every part on [`Readers::readers`] threads; the parts in order. A spill past the
    /// disk limit becomes a [`crate::diff::export::SpillOverflow`] with what was measured.
    fn read_all<I, R>(&self, parts: I) -> Result<Vec<PartOut>, SyncError>
    where
        I: Iterator<Item = Result<Part<R>, SyncError>> + Send,
        R: Read + Send,
    {
        let queue = Mutex::new(parts.enumerate());
        let stop = &self.job.stop;
        let read: Vec<Result<Vec<PartOut>, SyncError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..self.readers)
                .map(|_| {
                    scope.spawn(|| {
                        let mut outs = Vec::new();
                        while !stop.load(Ordering::Relaxed) {
                            let next = match queue.lock() {
                                Ok(mut q) => q.next(),
                                Err(_) => None,
                            };
                            let Some((i, part)) = next else { break };
                            match self.read_part(i, part) {
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
                    return Err(SyncError::SpillOverflow(self.measure.overflow(
                        self.job.settings.disk_limit.unwrap_or(0),
                        self.total.load(Ordering::Relaxed),
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        outs.sort_by_key(|o| o.index);
        Ok(outs)
    }

    /// Reads part `i` and spills its rows into `rows/p<i>/`.
    fn read_part<R: Read>(
        &self,
        i: usize,
        part: Result<Part<R>, SyncError>,
    ) -> Result<PartOut, SyncError> {
        let part = part?;
        let dir = part_dir(&self.rows_dir, i);
        std::fs::create_dir_all(&dir).map_err(|error| {
            SyncError::Spill(SpillError::Io {
                path: dir.display().to_string(),
                error,
            })
        })?;
        let spill_to = SpillTo {
            dir,
            bits: self.bits,
            budget: self.job.settings.buffer_budget / self.readers,
            limit: self.job.settings.disk_limit,
            total: self.total.clone(),
            measure: self.measure.clone(),
        };
        let route = self.job.route;
        let mut p = Partition {
            route,
            spiller: Spiller::new(
                route,
                spill_to.partitioner(),
                self.bits,
                self.keep.clone(),
                self.measure.clone(),
            ),
            spill_to,
            mappers: self.mappers,
            route_seed: self.route_seed,
            sources: Vec::new(),
            summary: Summary::default(),
            ignored: BTreeSet::new(),
            tables_seen: 0,
            rows_seen: 0,
        };
        let reject = |r: RowReject| self.job.reject(r);
        let counted = CountingRead {
            inner: part.reader,
            n: &self.measure.source_bytes,
        };
        let read = read::read_export(
            counted,
            &part.source,
            &self.read_opts,
            &mut |src: &mut dyn RowSource| p.table(src, &reject),
        );
        self.measure
            .rows_seen
            .fetch_add(p.rows_seen, Ordering::Relaxed);
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
    }

    /// The parts' counts added up; refuses an export without a table, or without a row
    /// unless the route allows it.
    fn merge(&self, outs: Vec<PartOut>) -> Result<Partitioned, SyncError> {
        let (route, opts) = (self.job.route, self.job.opts);
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
        let spilled = self.total.load(Ordering::Relaxed);
        summary.ignored_columns = ignored.into_iter().collect();
        let part_dirs: Vec<PathBuf> = (0..sources.len())
            .map(|i| part_dir(&self.rows_dir, i))
            .collect();
        tracing::info!(
            route = route.name(),
            rows = summary.rows_read,
            spilled_mb = spilled >> 20,
            ranges = 1u64 << self.bits,
            parts = sources.len(),
            "Export partitioned by hash range."
        );
        Ok(Partitioned {
            summary,
            sources,
            part_dirs,
            bits: self.bits,
            spilled,
            mappers: self.mappers,
        })
    }
}
