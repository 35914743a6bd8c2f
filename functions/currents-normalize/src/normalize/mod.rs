//! Event records → rows of the table's columns. A [`Plan`] is compiled once per file from the
//! writer schema and the registry table: each writer field is routed to its column, or (when
//! the registry does not know it yet) into the row's `extra` JSON object. A writer schema that
//! contradicts the registry (type or nullability change, missing required field) is refused
//! before any record is read. The records themselves are decoded one datum at a time from each
//! block [`crate::container`] unpacks (so an error names its block and record) into Arrow arrays
//! of the writer schema, which become the table's columns: flat records (every field a
//! primitive or an array of strings, or a union of one with null) by the `flat` decoder, into
//! the very arrays `arrow-avro` would give, and every other record, and a flat one that does
//! not read whole, by `arrow-avro`; arrays, maps and records, and the `extra`/`event` objects,
//! are rendered as JSON from those arrays within the item and size limits. Records whose `id` was already seen in the file are dropped. Rows are
//! handed out as Arrow record batches of a fixed size.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use arrow_array::RecordBatch;
use arrow_avro::reader::Decoder;

use crate::container::{Block, Container, DecodeError};
use crate::datum::{DatumError, Fault, RenderLimits, check, rewrite};
use crate::schema::SchemaError;

mod avro_decoder;
mod budget;
mod flat;
mod plan;
mod rows;
#[cfg(test)]
mod tests;

use avro_decoder::contained;
pub use avro_decoder::datum_decoder;
use budget::FileBudget;
use flat::FlatDecoder;
pub use plan::Plan;

/// What a file's rows carry besides their own fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileContext {
    /// Event type from the key.
    pub event_type: String,
    /// The source object key (`source_key` column).
    pub source_key: String,
    /// Delivery hour, microseconds since the epoch.
    pub delivery_hour_micros: i64,
    /// `<schema-id>` from the key.
    pub schema_id: Option<i64>,
    /// `version=<n>` from the key.
    pub schema_version: Option<i64>,
}

/// Why a file's records cannot become rows.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NormalizeError {
    /// The container is corrupt (truncated, bad sync marker, absurd block size, codec).
    #[error(transparent)]
    Container(#[from] DecodeError),
    /// The writer schema is not a usable Avro schema.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The writer schema contradicts the registry.
    #[error(
        "writer schema contradicts registry table {table} (version {version}): field {field}: {reason}"
    )]
    Contradiction {
        /// Table.
        table: String,
        /// Registry version.
        version: u32,
        /// Field.
        field: String,
        /// What differs.
        reason: String,
    },
    /// The key's event type and the writer schema's record name disagree.
    #[error("key says event type {key} but the writer schema's record is {record}")]
    EventTypeMismatch {
        /// From the key.
        key: String,
        /// From the schema.
        record: String,
    },
    /// A record does not decode.
    #[error("block {block}, record {record}, field {field}: {error}")]
    Datum {
        /// Block number.
        block: usize,
        /// Record number in the file, from 0.
        record: u64,
        /// Field being read.
        field: String,
        /// What went wrong.
        error: DatumError,
    },
    /// `arrow-avro` could not decode a record (truncated, bad index, bad length, ...).
    #[error("block {block} (at byte {offset}), record {record}: {reason}")]
    Record {
        /// Block number.
        block: usize,
        /// The block's byte offset in the object.
        offset: usize,
        /// Record number in the file, from 0.
        record: u64,
        /// What `arrow-avro` said.
        reason: String,
    },
    /// `arrow-avro` could not make Arrow arrays of a batch of decoded records (a string that
    /// is not UTF-8, ...).
    #[error(
        "blocks {first_block}..={last_block}, records {first_record}..={last_record}: {reason}"
    )]
    Records {
        /// First block of the batch.
        first_block: usize,
        /// Last block of the batch.
        last_block: usize,
        /// First record of the batch.
        first_record: u64,
        /// Last record of the batch.
        last_record: u64,
        /// What `arrow-avro` said.
        reason: String,
    },
    /// A block claims more records than its data holds.
    #[error(
        "block {block} (at byte {offset}) claims {claimed} records but its data ends after {found}"
    )]
    ShortBlock {
        /// Block number.
        block: usize,
        /// The block's byte offset in the object.
        offset: usize,
        /// Records the block's count claims.
        claimed: u64,
        /// Records its data holds.
        found: u64,
    },
    /// A block holds more bytes than its records.
    #[error("block {block}: {bytes} bytes left after its {records} records")]
    TrailingBytes {
        /// Block number.
        block: usize,
        /// Records it claimed.
        records: u64,
        /// Bytes left over.
        bytes: usize,
    },
    /// `time` does not fit a timestamp.
    #[error("record {record}: time {time} is out of range")]
    TimeOutOfRange {
        /// Record number.
        record: u64,
        /// The value.
        time: i64,
    },
    /// Handing a batch to the encoder failed.
    #[error("writing rows failed: {0}")]
    Sink(String),
}

/// Counts for one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NormalizeStats {
    /// Records read.
    pub events_in: u64,
    /// Rows produced.
    pub rows_out: u64,
    /// Records dropped because their `id` was already seen in the file.
    pub duplicates_dropped: u64,
    /// Writer fields the registry does not know (kept in `extra`).
    pub extra_fields: Vec<String>,
    /// Blocks read.
    pub blocks: usize,
}

/// Identity hasher for ids that are already 128-bit hashes.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

/// The item error of a walk that only looks for faults (no item limit applies).
fn over() -> DatumError {
    DatumError::OverLimit {
        what: "array/map items",
        limit: u64::MAX,
    }
}

/// Turns a file's records into record batches of the plan's table.
pub struct Normalizer<'p> {
    plan: &'p Plan,
    ctx: FileContext,
    batch_rows: usize,
    /// The block of each record decoded into the current batch.
    row_blocks: Vec<usize>,
    /// Where in its block's data each record of the current batch starts.
    row_starts: Vec<usize>,
    /// The current record as `arrow-avro` decodes it, when the schema has rendered fields.
    rewritten: Vec<u8>,
    batch_first_record: u64,
    seen_ids: HashSet<u128, BuildHasherDefault<IdHasher>>,
    json_buf: String,
    row_json: String,
    /// Reads the file's records while they are flat and whole; `None` once a record was
    /// not (`arrow-avro` then reads the rest of the file), or when the schema is not flat.
    flat: Option<FlatDecoder>,
    /// The lineage columns of this file by table column, as long as its largest batch.
    constants: Vec<Option<arrow_array::ArrayRef>>,
    stats: NormalizeStats,
}

/// A batch is handed on once its records took this many bytes of (decompressed) Avro, even
/// before it has `batch_rows` rows: the Arrow arrays `arrow-avro` builds from them are a
/// small multiple of that, and memory stays bounded.
pub const MAX_BATCH_BYTES: usize = 64 << 20;

impl<'p> Normalizer<'p> {
    /// Starts a file. `batch_rows` is the size of the batches handed to the sink.
    pub fn new(plan: &'p Plan, ctx: FileContext, batch_rows: usize, expected_rows: usize) -> Self {
        let batch_rows = batch_rows.max(1);
        Self {
            plan,
            ctx,
            batch_rows,
            row_blocks: Vec::with_capacity(batch_rows.min(expected_rows.max(1))),
            row_starts: Vec::with_capacity(batch_rows.min(expected_rows.max(1))),
            rewritten: Vec::new(),
            batch_first_record: 0,
            seen_ids: HashSet::with_capacity_and_hasher(expected_rows, Default::default()),
            json_buf: String::new(),
            row_json: String::new(),
            flat: plan
                .flat
                .as_ref()
                .map(|l| FlatDecoder::new(l, batch_rows, expected_rows)),
            constants: Vec::new(),
            stats: NormalizeStats {
                extra_fields: plan.extra_fields.clone(),
                ..Default::default()
            },
        }
    }

    /// Reads every block of `container`, handing each full batch to `sink`.
    pub fn run(
        self,
        container: &Container<'_>,
        sink: impl FnMut(RecordBatch) -> Result<(), String>,
    ) -> Result<NormalizeStats, NormalizeError> {
        let mut decoder = self.plan.decoder(self.batch_rows)?;
        self.run_with(container, &mut decoder, sink)
    }

    /// [`Self::run`] with a decoder from [`Plan::decoder`] (of this plan and batch size) that
    /// the caller keeps between files. After an `Err` the decoder may hold part of a batch:
    /// drop it then.
    pub fn run_with(
        mut self,
        container: &Container<'_>,
        decoder: &mut Decoder,
        mut sink: impl FnMut(RecordBatch) -> Result<(), String>,
    ) -> Result<NormalizeStats, NormalizeError> {
        let limits = container.limits();
        let mut file_budget = FileBudget::new(limits);
        let mut batch_bytes = 0usize;
        for block in container.blocks() {
            let block = block?;
            self.stats.blocks += 1;
            let data: &[u8] = &block.data;
            let mut pos = 0usize;
            for in_block in 0..block.count {
                let record = self.stats.events_in;
                self.stats.events_in += 1;
                let rest = data.get(pos..).unwrap_or_default();
                if rest.is_empty() && check(&self.plan.schema, rest, u64::MAX, over()).is_err() {
                    return Err(NormalizeError::ShortBlock {
                        block: block.index,
                        offset: block.offset,
                        claimed: block.count,
                        found: in_block,
                    });
                }
                let flat_used = self.flat.as_mut().and_then(|f| f.decode(rest));
                if flat_used.is_none() && self.flat.is_some() {
                    // `arrow-avro` reads this record and the rest of the file.
                    self.flush(container, decoder, &mut file_budget, &mut sink)?;
                    self.flat = None;
                    batch_bytes = 0;
                }
                let used = match flat_used {
                    Some(used) => used,
                    None => {
                        self.arrow_avro_record(decoder, rest, (&block, record), &file_budget)?
                    }
                };
                self.row_starts.push(pos);
                pos = pos.saturating_add(used);
                batch_bytes = batch_bytes.saturating_add(used);
                self.row_blocks.push(block.index);
                let full = match &self.flat {
                    Some(f) => f.batch_is_full(),
                    None => decoder.batch_is_full(),
                };
                if full || batch_bytes >= MAX_BATCH_BYTES {
                    self.flush(container, decoder, &mut file_budget, &mut sink)?;
                    batch_bytes = 0;
                }
            }
            if pos != data.len() {
                return Err(NormalizeError::TrailingBytes {
                    block: block.index,
                    records: block.count,
                    bytes: data.len().saturating_sub(pos),
                });
            }
        }
        self.flush(container, decoder, &mut file_budget, &mut sink)?;
        Ok(self.stats)
    }

    /// Reads one record with `arrow-avro` (its items counted and its recursive fields
    /// rendered first, when the schema has them) and returns its length in `rest`.
    fn arrow_avro_record(
        &mut self,
        decoder: &mut Decoder,
        rest: &[u8],
        (block, record): (&Block<'_>, u64),
        file_budget: &FileBudget,
    ) -> Result<usize, NormalizeError> {
        let at = |f: Fault| NormalizeError::Datum {
            block: block.index,
            record,
            field: f.field,
            error: f.error,
        };
        if self.plan.schema.has_free_array_items() {
            // Count the record's items before they are built: a block of millions of nulls
            // is a few bytes, and costs nothing to count.
            let b = file_budget.record();
            check(&self.plan.schema, rest, b.items_left, b.items_error).map_err(at)?;
        }
        let (input, used_of_data) = if self.plan.schema.has_rendered_fields() {
            let b = file_budget.record();
            let limits = RenderLimits {
                max_items: b.items_left,
                items_over: b.items_error,
                max_bytes: b.bytes_left,
                bytes_over: b.bytes_error,
            };
            self.rewritten.clear();
            let n = rewrite(&self.plan.schema, rest, &mut self.rewritten, limits).map_err(at)?;
            (&self.rewritten[..], Some(n))
        } else {
            (rest, None)
        };
        let used =
            contained(|| decoder.decode(input).map_err(|e| e.to_string())).map_err(|reason| {
                match check(&self.plan.schema, rest, u64::MAX, over()) {
                    Err(f) => at(f),
                    Ok(_) => NormalizeError::Record {
                        block: block.index,
                        offset: block.offset,
                        record,
                        reason,
                    },
                }
            })?;
        Ok(used_of_data.unwrap_or(used))
    }

    /// Takes the decoded records from `decoder`, makes them rows of the table (without
    /// repeated ids) and hands them to `sink`.
    fn flush(
        &mut self,
        container: &Container<'_>,
        decoder: &mut Decoder,
        file_budget: &mut FileBudget,
        sink: &mut impl FnMut(RecordBatch) -> Result<(), String>,
    ) -> Result<(), NormalizeError> {
        let n = self.row_blocks.len();
        if n == 0 {
            return Ok(());
        }
        let first = self.batch_first_record;
        let decoded = match self.flat.as_mut() {
            Some(f) => f.flush().map_err(|e| e.to_string()),
            None => contained(|| decoder.flush().map_err(|e| e.to_string())),
        };
        let decoded = decoded.map_err(|reason| {
            self.fault_in_batch(container)
                .unwrap_or_else(|| NormalizeError::Records {
                    first_block: self.row_blocks.first().copied().unwrap_or_default(),
                    last_block: self.row_blocks.last().copied().unwrap_or_default(),
                    first_record: first,
                    last_record: first + n as u64 - 1,
                    reason,
                })
        })?;
        let Some(decoded) = decoded else {
            return Err(NormalizeError::Sink(format!(
                "the decoder returned no rows for records {first}..{}",
                first + n as u64
            )));
        };
        if decoded.num_rows() != n {
            return Err(NormalizeError::Sink(format!(
                "the decoder returned {} rows for {n} records",
                decoded.num_rows()
            )));
        }
        let out = self.table_batch(&decoded, file_budget)?;
        self.batch_first_record += n as u64;
        self.row_blocks.clear();
        self.row_starts.clear();
        if let Some(out) = out {
            sink(out).map_err(NormalizeError::Sink)?;
        }
        Ok(())
    }

    /// When `arrow-avro` refuses a batch of records as a whole (a string that is not UTF-8,
    /// ...), walks those records again by the writer schema to name the first fault and its
    /// record and field. `None` when the walk finds every record sound.
    fn fault_in_batch(&self, container: &Container<'_>) -> Option<NormalizeError> {
        let mut rows = self
            .row_blocks
            .iter()
            .zip(&self.row_starts)
            .enumerate()
            .peekable();
        for block in container.blocks() {
            let block = block.ok()?;
            while let Some(&(r, (&b, &start))) = rows.peek() {
                if b != block.index {
                    break;
                }
                let rest = block.data.get(start..).unwrap_or_default();
                if let Err(f) = check(&self.plan.schema, rest, u64::MAX, over()) {
                    return Some(NormalizeError::Datum {
                        block: b,
                        record: self.batch_first_record + r as u64,
                        field: f.field,
                        error: f.error,
                    });
                }
                rows.next();
            }
            rows.peek()?;
        }
        None
    }
}
