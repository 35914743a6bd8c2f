//! The compaction core: a table-day's parts (local Parquet files, in read order) become one
//! deduplicated part (several only beyond the size limit), synchronously and in bounded memory.
//!
//! Pass 1 reads only the `id` column of every part and keeps the first occurrence of each id:
//! a set of 128-bit XXH3 hashes of the ids (a collision between two distinct ids is about 1 in
//! 10^25 for five million) and one keep-bit per input row. The set's memory is bounded at any
//! size of day: the ids are split by hash into as many buckets as it takes for each to hold at
//! most [`MergeOptions::max_set_rows`] rows, and pass 1 reads the id column once per bucket,
//! deduplicating only that bucket's ids (an id and its repeats share a bucket, and each bucket
//! is read in input order, so the rows kept are the same whatever the number of buckets).
//! Pass 2 streams the parts again one row group at a time, drops the
//! rows not kept, re-chunks them into fixed-size batches (so the output depends only on the
//! row sequence, not on how the inputs were chunked) and writes them with the table's
//! registry schema, Snappy. The output's name is the hash of its bytes: the same input parts
//! give byte-identical output under the same name, and a rerun after a crash that left the
//! output beside its inputs reads that output first, reproduces it and overwrites it with
//! itself.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::BooleanBufferBuilder;
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, BooleanArray, RecordBatch, new_null_array};
use arrow_schema::{DataType, SchemaRef};
use arrow_select::coalesce::BatchCoalescer;
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::encode::writer_properties;
use crate::registry::TableDef;

use super::plan::COMPACTED_PREFIX;

/// Settings of the merge.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// An output part is closed once it reaches this many bytes (default 1 GiB).
    pub max_part_bytes: u64,
    /// Rows per batch read and written.
    pub batch_rows: usize,
    /// Rows per output row group.
    pub row_group_rows: usize,
    /// Most rows whose id hashes one set holds at a time (default 4,000,000: ~140 MB); a
    /// day with more rows is deduplicated in that many buckets, one pass over its ids each.
    pub max_set_rows: u64,
}

impl Default for MergeOptions {
    fn default() -> Self {
        Self {
            max_part_bytes: 1 << 30,
            batch_rows: 8192,
            row_group_rows: crate::encode::ROW_GROUP_ROWS,
            max_set_rows: 4_000_000,
        }
    }
}

/// One input part on local disk.
#[derive(Debug, Clone)]
pub struct MergeInput {
    /// Its object key (for error messages).
    pub key: String,
    /// The local copy.
    pub path: PathBuf,
}

/// One output part on local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeOutput {
    /// The local file.
    pub path: PathBuf,
    /// Its file name in the table-day folder: `part-compacted-<xxh3-64 of its bytes>.parquet`.
    pub name: String,
    /// Rows.
    pub rows: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Counts of a merge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Rows read.
    pub rows_in: u64,
    /// Rows written.
    pub rows_out: u64,
    /// Rows dropped because their `id` appeared earlier.
    pub duplicates: u64,
}

/// Why a table-day cannot be merged. `Input` and `Schema` are the parts' fault (permanent until
/// someone fixes or removes the part); `Io` and `Encode` are local failures (retryable).
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// A part is not readable Parquet.
    #[error("{key}: not a readable Parquet part: {message}")]
    Input {
        /// The part's key.
        key: String,
        /// What the reader said.
        message: String,
    },
    /// A part's columns do not fit the table's registry schema.
    #[error("{key}: {message}")]
    Schema {
        /// The part's key.
        key: String,
        /// Which column and why.
        message: String,
    },
    /// Local file I/O failed.
    #[error("local file {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        message: String,
    },
    /// Writing the output failed.
    #[error("writing the compacted part failed: {0}")]
    Encode(String),
}

impl MergeError {
    /// Whether a later attempt can succeed without anyone changing the parts.
    pub fn is_retryable(&self) -> bool {
        matches!(self, MergeError::Io { .. } | MergeError::Encode(_))
    }
}

fn io(path: &Path, e: impl std::fmt::Display) -> MergeError {
    MergeError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn input_err(key: &str, e: impl std::fmt::Display) -> MergeError {
    MergeError::Input {
        key: key.to_string(),
        message: e.to_string(),
    }
}

fn open(
    input: &MergeInput,
    batch_rows: usize,
) -> Result<ParquetRecordBatchReaderBuilder<File>, MergeError> {
    let file = File::open(&input.path).map_err(|e| io(&input.path, e))?;
    Ok(ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| input_err(&input.key, e))?
        .with_batch_size(batch_rows))
}

/// Pass 1: which rows of each input to keep (first occurrence of each id, in input order),
/// bucket by bucket.
fn first_occurrences(
    inputs: &[MergeInput],
    opts: &MergeOptions,
) -> Result<(Vec<BooleanArray>, MergeStats), MergeError> {
    let mut total_rows = 0u64;
    let mut keep = Vec::with_capacity(inputs.len());
    for input in inputs {
        let rows = open(input, opts.batch_rows)?
            .metadata()
            .file_metadata()
            .num_rows();
        total_rows += u64::try_from(rows).unwrap_or(0);
        let rows = usize::try_from(rows).unwrap_or(0);
        let mut bits = BooleanBufferBuilder::new(rows);
        bits.append_n(rows, false);
        keep.push(bits);
    }
    let buckets = buckets_for(total_rows, opts.max_set_rows);
    let mut stats = MergeStats::default();
    for bucket in 0..buckets {
        // Sized once for the bucket's share, so the set rarely doubles (and briefly holds both
        // tables).
        let share = usize::try_from(total_rows / buckets + total_rows / buckets / 16 + 1024)
            .unwrap_or(usize::MAX);
        let mut seen: HashSet<u128> = HashSet::with_capacity(share);
        for (input, bits) in inputs.iter().zip(keep.iter_mut()) {
            let ids = IdPass {
                input,
                buckets,
                bucket,
            };
            ids.run(opts, &mut seen, bits, &mut stats)?;
        }
    }
    let keep = keep
        .into_iter()
        .map(|mut b| BooleanArray::new(b.finish(), None))
        .collect();
    Ok((keep, stats))
}

/// How many buckets a day of `rows` rows is deduplicated in.
pub fn buckets_for(rows: u64, max_set_rows: u64) -> u64 {
    rows.div_ceil(max_set_rows.max(1)).max(1)
}

/// One read of an input's ids for one bucket.
struct IdPass<'a> {
    input: &'a MergeInput,
    buckets: u64,
    bucket: u64,
}

impl IdPass<'_> {
    /// Marks in `bits` the rows of this bucket whose id is not in `seen` yet (and adds it).
    fn run(
        &self,
        opts: &MergeOptions,
        seen: &mut HashSet<u128>,
        bits: &mut BooleanBufferBuilder,
        stats: &mut MergeStats,
    ) -> Result<(), MergeError> {
        let input = self.input;
        let builder = open(input, opts.batch_rows)?;
        let Some(idx) = builder.schema().index_of("id").ok() else {
            return Err(MergeError::Schema {
                key: input.key.clone(),
                message: "part has no id column".into(),
            });
        };
        let mask = ProjectionMask::roots(builder.parquet_schema(), [idx]);
        let reader = builder
            .with_projection(mask)
            .build()
            .map_err(|e| input_err(&input.key, e))?;
        let mut row = 0usize;
        for batch in reader {
            let batch = batch.map_err(|e| input_err(&input.key, e))?;
            let col = batch.column(0);
            let ids = col
                .as_string_opt::<i32>()
                .ok_or_else(|| MergeError::Schema {
                    key: input.key.clone(),
                    message: format!("id column is {}, not Utf8", col.data_type()),
                })?;
            if row + ids.len() > bits.len() {
                return Err(input_err(
                    &input.key,
                    "part has more rows than its footer says",
                ));
            }
            for i in 0..ids.len() {
                let at = row + i;
                // A row without an id cannot be a duplicate of anything: kept, in bucket 0.
                if ids.is_null(i) {
                    if self.bucket == 0 {
                        stats.rows_in += 1;
                        stats.rows_out += 1;
                        bits.set_bit(at, true);
                    }
                    continue;
                }
                let h = xxhash_rust::xxh3::xxh3_128(ids.value(i).as_bytes());
                if ((h >> 64) as u64) % self.buckets != self.bucket {
                    continue;
                }
                stats.rows_in += 1;
                if seen.insert(h) {
                    stats.rows_out += 1;
                    bits.set_bit(at, true);
                } else {
                    stats.duplicates += 1;
                }
            }
            row += ids.len();
        }
        Ok(())
    }
}

/// Fits a part's batch to the table's schema by column name: a column the part lacks is null
/// (when the registry allows null), a column the registry lacks or of another type is refused.
fn conform(key: &str, batch: &RecordBatch, target: &SchemaRef) -> Result<RecordBatch, MergeError> {
    let schema = batch.schema();
    if schema.fields().len() == target.fields().len()
        && schema
            .fields()
            .iter()
            .zip(target.fields())
            .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type())
    {
        return RecordBatch::try_new(target.clone(), batch.columns().to_vec()).map_err(|e| {
            MergeError::Schema {
                key: key.into(),
                message: e.to_string(),
            }
        });
    }
    for f in schema.fields() {
        if target.field_with_name(f.name()).is_err() {
            return Err(MergeError::Schema {
                key: key.into(),
                message: format!(
                    "column {} is not in the table's registry schema (a newer registry wrote it?)",
                    f.name()
                ),
            });
        }
    }
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(target.fields().len());
    for f in target.fields() {
        match schema.index_of(f.name()) {
            Ok(i) => {
                let c = batch.column(i);
                if !same_type(c.data_type(), f.data_type()) {
                    return Err(MergeError::Schema {
                        key: key.into(),
                        message: format!(
                            "column {} is {}, the registry says {}",
                            f.name(),
                            c.data_type(),
                            f.data_type()
                        ),
                    });
                }
                cols.push(c.clone());
            }
            Err(_) if f.is_nullable() => cols.push(new_null_array(f.data_type(), batch.num_rows())),
            Err(_) => {
                return Err(MergeError::Schema {
                    key: key.into(),
                    message: format!("part lacks the required column {}", f.name()),
                });
            }
        }
    }
    RecordBatch::try_new(target.clone(), cols).map_err(|e| MergeError::Schema {
        key: key.into(),
        message: e.to_string(),
    })
}

fn same_type(a: &DataType, b: &DataType) -> bool {
    a == b
}

/// Writes output parts, rolling over at the size limit.
struct Outputs<'a> {
    dir: &'a Path,
    table: &'a TableDef,
    opts: &'a MergeOptions,
    current: Option<(PathBuf, ArrowWriter<File>, u64)>,
    done: Vec<MergeOutput>,
}

impl Outputs<'_> {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), MergeError> {
        if self.current.is_none() {
            let path = self.dir.join(format!("out-{}.parquet", self.done.len()));
            let file = File::create(&path).map_err(|e| io(&path, e))?;
            let metadata = vec![
                ("currents.table".to_string(), self.table.table.clone()),
                (
                    "currents.registry_version".to_string(),
                    self.table.version.to_string(),
                ),
                ("currents.compacted".to_string(), "true".to_string()),
            ];
            let props = writer_properties(&self.table.schema, metadata, self.opts.row_group_rows);
            let w = ArrowWriter::try_new(file, self.table.schema.clone(), Some(props))
                .map_err(|e| MergeError::Encode(e.to_string()))?;
            self.current = Some((path, w, 0));
        }
        let Some((_, w, rows)) = self.current.as_mut() else {
            return Ok(());
        };
        w.write(batch)
            .map_err(|e| MergeError::Encode(e.to_string()))?;
        *rows += batch.num_rows() as u64;
        if (w.bytes_written() + w.in_progress_size()) as u64 >= self.opts.max_part_bytes {
            self.close()?;
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), MergeError> {
        let Some((path, w, rows)) = self.current.take() else {
            return Ok(());
        };
        w.close().map_err(|e| MergeError::Encode(e.to_string()))?;
        let (hash, bytes) = hash_file(&path)?;
        self.done.push(MergeOutput {
            name: format!("{COMPACTED_PREFIX}{hash:016x}.parquet"),
            path,
            rows,
            bytes,
        });
        Ok(())
    }
}

fn hash_file(path: &Path) -> Result<(u64, u64), MergeError> {
    let mut f = File::open(path).map_err(|e| io(path, e))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| io(path, e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((h.digest(), n))
}

/// Merges `inputs` (in read order) into deduplicated parts written under `out_dir`. With no
/// rows at all, no part is written.
pub fn merge(
    inputs: &[MergeInput],
    table: &TableDef,
    out_dir: &Path,
    opts: &MergeOptions,
) -> Result<(Vec<MergeOutput>, MergeStats), MergeError> {
    let (keep, stats) = first_occurrences(inputs, opts)?;
    let batch_rows = opts.batch_rows.max(1);
    let mut coalescer = BatchCoalescer::new(table.schema.clone(), batch_rows);
    let mut out = Outputs {
        dir: out_dir,
        table,
        opts,
        current: None,
        done: Vec::new(),
    };
    for (input, keep) in inputs.iter().zip(&keep) {
        let reader = open(input, batch_rows)?
            .build()
            .map_err(|e| input_err(&input.key, e))?;
        let mut offset = 0usize;
        for batch in reader {
            let batch = batch.map_err(|e| input_err(&input.key, e))?;
            let n = batch.num_rows();
            if offset + n > keep.len() {
                return Err(input_err(&input.key, "part changed between the two passes"));
            }
            let filter = keep.slice(offset, n);
            offset += n;
            if filter.true_count() == 0 {
                continue;
            }
            let batch = conform(&input.key, &batch, &table.schema)?;
            coalescer
                .push_batch_with_filter(batch, &filter)
                .map_err(|e| MergeError::Encode(e.to_string()))?;
            while let Some(b) = coalescer.next_completed_batch() {
                out.write(&b)?;
            }
        }
    }
    coalescer
        .finish_buffered_batch()
        .map_err(|e| MergeError::Encode(e.to_string()))?;
    while let Some(b) = coalescer.next_completed_batch() {
        out.write(&b)?;
    }
    out.close()?;
    Ok((out.done, stats))
}

/// The table a folder name belongs to, from the registry (`None`: not a table we know).
pub fn table_for(registry: &crate::registry::Registry, table: &str) -> Option<Arc<TableDef>> {
    if table == registry.other_events().table {
        return Some(registry.other_events().clone());
    }
    registry
        .entries()
        .iter()
        .find(|e| e.table == table)
        .and_then(|e| registry.get(&e.event_type).cloned())
}
