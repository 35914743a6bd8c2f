//! Event records → rows of the table's columns. A [`Plan`] is compiled once per file from the
//! writer schema and the registry table: each writer field is routed to its column, or (when
//! the registry does not know it yet) into the row's `extra` JSON object. A writer schema that
//! contradicts the registry (type or nullability change, missing required field) is refused
//! before any record is read. The records themselves are decoded by `arrow-avro` (one datum at
//! a time from each block [`crate::decode`] unpacks, so an error names its block and record)
//! into Arrow arrays of the writer schema, which become the table's columns; arrays, maps and
//! records, and the `extra`/`event` objects, are rendered as JSON from those arrays within the
//! item and size limits. Records whose `id` was already seen in the file are dropped. Rows are
//! handed out as Arrow record batches of a fixed size.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use arrow_array::builder::{StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Int64Type};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow_avro::reader::{Decoder, DecoderMode, ReaderBuilder};
use arrow_avro::schema::{AvroSchema, SchemaStore};
use arrow_schema::DataType;

use crate::decode::{Container, DatumError, DecodeError, Limits};
use crate::json::{self, Budget};
use crate::registry::{Column, ColumnSource, FieldType, Registry, TableDef, event_type_of_record};
use crate::schema::{Node, NodeId, SchemaError, WriterSchema};

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

/// One writer field, as the plan maps it.
#[derive(Debug)]
struct FieldPlan {
    name: String,
    /// `"name":` as JSON, for the extra/event object.
    json_key: String,
    /// Index into the table's fields when the field fills a column.
    slot: Option<usize>,
    /// That column holds JSON text (arrays, maps, records).
    json_column: bool,
    /// Also (or only) written into the row's JSON object (`extra` / `event`).
    to_json: bool,
}

/// How one file's writer schema maps onto its table.
#[derive(Debug)]
pub struct Plan {
    schema: WriterSchema,
    table: Arc<TableDef>,
    fields: Vec<FieldPlan>,
    id_slot: usize,
    time_slot: usize,
    extra_fields: Vec<String>,
}

impl Plan {
    /// The table rows go to.
    pub fn table(&self) -> &Arc<TableDef> {
        &self.table
    }

    /// Writer fields the registry does not know.
    pub fn extra_fields(&self) -> &[String] {
        &self.extra_fields
    }

    /// The writer schema.
    pub fn schema(&self) -> &WriterSchema {
        &self.schema
    }
}

/// Whether a writer field can fill a column of type `ty`, or why it cannot.
fn column_fits(
    schema: &WriterSchema,
    node: NodeId,
    ty: FieldType,
    nullable: bool,
) -> Result<(), String> {
    let (branches, writer_nullable) = schema.branches(node);
    let desc = schema.describe(node);
    if writer_nullable && !nullable {
        return Err(format!(
            "the file allows null ({desc}) but the registry column is required"
        ));
    }
    let contradiction = || format!("registry type {}, file type {desc}", ty.name());
    if branches.is_empty() || (branches.len() > 1 && ty != FieldType::Json) {
        return Err(contradiction());
    }
    for b in branches {
        let ok = match (ty, schema.node(b)) {
            (FieldType::String, n) => matches!(n, Node::String | Node::Enum { .. }),
            (FieldType::Int | FieldType::Long, n) => matches!(n, Node::Int | Node::Long),
            (FieldType::Float | FieldType::Double, n) => matches!(n, Node::Float | Node::Double),
            (FieldType::Boolean, n) => matches!(n, Node::Boolean),
            (FieldType::Json, n) => {
                matches!(n, Node::Array(_) | Node::Map(_) | Node::Record { .. })
            }
        };
        if !ok {
            return Err(contradiction());
        }
    }
    Ok(())
}

impl Plan {
    /// Compiles the plan for a file of `event_type` written with `schema`.
    pub fn new(
        schema: WriterSchema,
        event_type: &str,
        registry: &Registry,
    ) -> Result<Self, NormalizeError> {
        let (record_name, writer_fields) = schema.record()?;
        if schema.has_free_array_items_other_than_null() {
            return Err(NormalizeError::Schema(SchemaError::Invalid {
                path: "$".into(),
                reason: "an array's items cost no input bytes (a fixed of size 0 or a record of \
                         only such fields): refused"
                    .into(),
            }));
        }
        if let Some(record_type) = event_type_of_record(record_name)
            && record_type != event_type
        {
            return Err(NormalizeError::EventTypeMismatch {
                key: event_type.into(),
                record: record_type.into(),
            });
        }
        let (table, generic) = match registry.get(event_type) {
            Some(t) => (t.clone(), false),
            None => (registry.other_events().clone(), true),
        };
        let contradiction = |field: &str, reason: String| NormalizeError::Contradiction {
            table: table.table.clone(),
            version: table.version,
            field: field.into(),
            reason,
        };
        let mut fields = Vec::with_capacity(writer_fields.len());
        let mut extra_fields = Vec::new();
        let mut seen = vec![false; table.fields.len()];
        for (name, node) in writer_fields {
            let slot = table.fields.iter().position(|f| &f.name == name);
            let mut json_key = String::with_capacity(name.len() + 3);
            json::push_str(&mut json_key, name);
            json_key.push(':');
            let plan = match slot {
                Some(i) => {
                    let f = &table.fields[i];
                    match column_fits(&schema, *node, f.ty, f.nullable) {
                        Ok(()) => {
                            seen[i] = true;
                            FieldPlan {
                                name: name.clone(),
                                json_key,
                                slot: Some(i),
                                json_column: f.ty == FieldType::Json,
                                to_json: generic,
                            }
                        }
                        // The generic table takes its common columns only when they fit;
                        // the whole event is in its JSON column either way.
                        Err(_) if generic && f.nullable => FieldPlan {
                            name: name.clone(),
                            json_key,
                            slot: None,
                            json_column: false,
                            to_json: true,
                        },
                        Err(reason) => return Err(contradiction(name, reason)),
                    }
                }
                None => {
                    if !generic {
                        extra_fields.push(name.clone());
                    }
                    FieldPlan {
                        name: name.clone(),
                        json_key,
                        slot: None,
                        json_column: false,
                        to_json: true,
                    }
                }
            };
            fields.push(plan);
        }
        for (i, f) in table.fields.iter().enumerate() {
            if !seen[i] && !f.nullable {
                return Err(contradiction(
                    &f.name,
                    "required by the registry but absent from the file".into(),
                ));
            }
        }
        let slot_of = |name: &str| table.fields.iter().position(|f| f.name == name);
        let (Some(id_slot), Some(time_slot)) = (slot_of("id"), slot_of("time")) else {
            return Err(contradiction("id", "table has no id or time field".into()));
        };
        Ok(Self {
            schema,
            table,
            fields,
            id_slot,
            time_slot,
            extra_fields,
        })
    }
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

/// Runs a call into `arrow-avro` so that a panic inside it (a third-party decoder reading
/// untrusted bytes) becomes an error for this file instead of taking the function down (the
/// release profile unwinds).
fn contained<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(format!("the Avro decoder panicked: {msg}"))
        }
    }
}

/// An `arrow-avro` decoder of single records (datums) written with `schema`, `batch_rows`
/// records per Arrow batch. The container's framing (blocks, codecs, sync markers and the
/// size guards on them) is [`crate::decode`]'s; each record's bytes go to this decoder.
pub fn datum_decoder(schema: &WriterSchema, batch_rows: usize) -> Result<Decoder, String> {
    contained(|| {
        let mut store = SchemaStore::new();
        let fingerprint = store
            .register(AvroSchema::new(schema.arrow_avro_json().to_string()))
            .map_err(|e| e.to_string())?;
        ReaderBuilder::new()
            .with_batch_size(batch_rows.max(1))
            .with_decoder_mode(DecoderMode::UnframedDatum)
            .with_writer_schema_store(store)
            .with_active_fingerprint(fingerprint)
            .build_decoder()
            .map_err(|e| e.to_string())
    })
}

/// Turns a file's records into record batches of the plan's table.
pub struct Normalizer<'p> {
    plan: &'p Plan,
    ctx: FileContext,
    batch_rows: usize,
    /// The block of each record decoded into the current batch.
    row_blocks: Vec<usize>,
    batch_first_record: u64,
    seen_ids: HashSet<u128, BuildHasherDefault<IdHasher>>,
    json_buf: String,
    row_json: String,
    stats: NormalizeStats,
}

/// A batch is handed on once its records took this many bytes of (decompressed) Avro, even
/// before it has `batch_rows` rows: the Arrow arrays `arrow-avro` builds from them are a
/// small multiple of that, and memory stays bounded.
pub const MAX_BATCH_BYTES: usize = 64 << 20;

/// What the rest of a file may still use of the limits that its bytes alone do not bound.
struct FileBudget {
    limits: Limits,
    items_left: u64,
    bytes_left: u64,
}

impl FileBudget {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            items_left: limits.max_file_items,
            bytes_left: limits.max_file_json_bytes,
        }
    }

    /// The budget of the next record: the record's limits, or what the file has left when
    /// that is less (and then the file's limit is the one named).
    fn record(&self) -> Budget {
        let l = &self.limits;
        let (items, items_error) = if l.max_record_items <= self.items_left {
            (
                l.max_record_items,
                DatumError::OverLimit {
                    what: "array/map items in one record",
                    limit: l.max_record_items,
                },
            )
        } else {
            (
                self.items_left,
                DatumError::OverLimit {
                    what: "array/map items in the file",
                    limit: l.max_file_items,
                },
            )
        };
        let (bytes, bytes_error) = if l.max_record_json_bytes <= self.bytes_left {
            (
                l.max_record_json_bytes,
                DatumError::OverLimit {
                    what: "rendered JSON bytes of one record",
                    limit: l.max_record_json_bytes,
                },
            )
        } else {
            (
                self.bytes_left,
                DatumError::OverLimit {
                    what: "rendered JSON bytes in the file",
                    limit: l.max_file_json_bytes,
                },
            )
        };
        Budget::new(items, items_error, bytes, bytes_error)
    }

    /// Charges what a record used.
    fn charge(&mut self, start: &Budget, end: &Budget) {
        self.items_left = self
            .items_left
            .saturating_sub(start.items_left.saturating_sub(end.items_left));
        self.bytes_left = self
            .bytes_left
            .saturating_sub(start.bytes_left.saturating_sub(end.bytes_left));
    }
}

/// True for values that become JSON text with the size budget (as opposed to a top-level
/// string, number or boolean, which the input's bytes bound).
fn json_kind(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::List(_)
            | DataType::Map(_, _)
            | DataType::Struct(_)
            | DataType::Binary
            | DataType::FixedSizeBinary(_)
    )
}

/// Appends a top-level scalar (a field's own value, through its union) to the row's JSON
/// object: a `float` as the double it widens to, like its column would hold it.
fn push_scalar(out: &mut String, a: &dyn Array, row: usize) -> Result<(), DatumError> {
    if let Some(f) = a.as_primitive_opt::<Float32Type>() {
        json::push_f64(out, f64::from(f.value(row)));
        return Ok(());
    }
    json::write_value(a, row, out, &mut Budget::unlimited())
}

impl<'p> Normalizer<'p> {
    /// Starts a file. `batch_rows` is the size of the batches handed to the sink.
    pub fn new(plan: &'p Plan, ctx: FileContext, batch_rows: usize, expected_rows: usize) -> Self {
        let batch_rows = batch_rows.max(1);
        Self {
            plan,
            ctx,
            batch_rows,
            row_blocks: Vec::with_capacity(batch_rows.min(expected_rows.max(1))),
            batch_first_record: 0,
            seen_ids: HashSet::with_capacity_and_hasher(expected_rows, Default::default()),
            json_buf: String::new(),
            row_json: String::new(),
            stats: NormalizeStats {
                extra_fields: plan.extra_fields.clone(),
                ..Default::default()
            },
        }
    }

    /// Reads every block of `container`, handing each full batch to `sink`.
    pub fn run(
        mut self,
        container: &Container<'_>,
        mut sink: impl FnMut(RecordBatch) -> Result<(), String>,
    ) -> Result<NormalizeStats, NormalizeError> {
        let limits = container.limits();
        let mut file_budget = FileBudget::new(limits);
        // Array items of type `null` cost no input, and the decoder counts each one (up to
        // 2^31 per array): such files go one record per batch, so the item limit stops the
        // first record that goes over. Otherwise every item costs at least one input byte and
        // what a batch decodes is bounded by the bytes it consumes.
        let batch_rows = if self.plan.schema.has_free_array_items() {
            1
        } else {
            self.batch_rows
        };
        let mut decoder = datum_decoder(&self.plan.schema, batch_rows).map_err(|reason| {
            NormalizeError::Schema(SchemaError::Invalid {
                path: "$".into(),
                reason: format!("arrow-avro cannot decode it: {reason}"),
            })
        })?;
        let mut batch_bytes = 0usize;
        for block in container.blocks() {
            let block = block?;
            self.stats.blocks += 1;
            let data: &[u8] = &block.data;
            let mut pos = 0usize;
            for _ in 0..block.count {
                let record = self.stats.events_in;
                self.stats.events_in += 1;
                let rest = data.get(pos..).unwrap_or_default();
                let used = contained(|| decoder.decode(rest).map_err(|e| e.to_string())).map_err(
                    |reason| NormalizeError::Record {
                        block: block.index,
                        offset: block.offset,
                        record,
                        reason,
                    },
                )?;
                pos = pos.saturating_add(used);
                batch_bytes = batch_bytes.saturating_add(used);
                self.row_blocks.push(block.index);
                if decoder.batch_is_full() || batch_bytes >= MAX_BATCH_BYTES {
                    self.flush(&mut decoder, &mut file_budget, &mut sink)?;
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
        self.flush(&mut decoder, &mut file_budget, &mut sink)?;
        Ok(self.stats)
    }

    /// Takes the decoded records from `decoder`, makes them rows of the table (without
    /// repeated ids) and hands them to `sink`.
    fn flush(
        &mut self,
        decoder: &mut Decoder,
        file_budget: &mut FileBudget,
        sink: &mut impl FnMut(RecordBatch) -> Result<(), String>,
    ) -> Result<(), NormalizeError> {
        let n = self.row_blocks.len();
        if n == 0 {
            return Ok(());
        }
        let first = self.batch_first_record;
        let decoded =
            contained(|| decoder.flush().map_err(|e| e.to_string())).map_err(|reason| {
                NormalizeError::Records {
                    first_block: self.row_blocks.first().copied().unwrap_or_default(),
                    last_block: self.row_blocks.last().copied().unwrap_or_default(),
                    first_record: first,
                    last_record: first + n as u64 - 1,
                    reason,
                }
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
        if let Some(out) = out {
            sink(out).map_err(NormalizeError::Sink)?;
        }
        Ok(())
    }

    /// One batch of decoded records (the writer schema's columns) as rows of the table.
    fn table_batch(
        &mut self,
        decoded: &RecordBatch,
        file_budget: &mut FileBudget,
    ) -> Result<Option<RecordBatch>, NormalizeError> {
        let plan = self.plan;
        let table = plan.table.clone();
        let generic = table.generic;
        let limits = file_budget.limits;
        let n = decoded.num_rows();
        let sink_err = |e: arrow_schema::ArrowError| NormalizeError::Sink(e.to_string());
        let has_json = table
            .columns
            .iter()
            .any(|c| matches!(c.source, ColumnSource::Json));
        // Writer field filling each table field, if any.
        let mut filled_by: Vec<Option<usize>> = vec![None; table.fields.len()];
        for (fi, f) in plan.fields.iter().enumerate() {
            if let Some(s) = f.slot
                && let Some(slot) = filled_by.get_mut(s)
            {
                *slot = Some(fi);
            }
        }
        let column_of = |slot: usize| -> Result<Option<ArrayRef>, NormalizeError> {
            let Some(fi) = filled_by.get(slot).copied().flatten() else {
                return Ok(None);
            };
            let ty = table.fields[slot].ty.data_type();
            arrow_cast::cast(decoded.column(fi), &ty)
                .map(Some)
                .map_err(sink_err)
        };
        let ids = column_of(plan.id_slot)?;
        let ids = ids.as_ref().and_then(|a| a.as_string_opt::<i32>());
        let times = column_of(plan.time_slot)?;
        let times = times
            .as_ref()
            .and_then(|a| a.as_primitive_opt::<Int64Type>());
        let mut json_columns: Vec<(usize, StringBuilder)> = plan
            .fields
            .iter()
            .enumerate()
            .filter(|(_, f)| f.json_column && f.slot.is_some())
            .map(|(fi, _)| (fi, StringBuilder::with_capacity(n, n * 64)))
            .collect();
        let mut row_json_column =
            StringBuilder::with_capacity(n, if has_json { n * 64 } else { 0 });
        let mut event_time = TimestampMicrosecondBuilder::with_capacity(n);
        let mut keep = Vec::with_capacity(n);
        for r in 0..n {
            let record = self.batch_first_record + r as u64;
            let block = self.row_blocks.get(r).copied().unwrap_or_default();
            let start_budget = file_budget.record();
            let mut budget = start_budget;
            self.row_json.clear();
            let mut json_fields = 0usize;
            let mut next_json_column = 0usize;
            for (fi, fp) in plan.fields.iter().enumerate() {
                let in_column = fp.json_column && fp.slot.is_some();
                if !in_column && !fp.to_json {
                    continue;
                }
                let err = |error| NormalizeError::Datum {
                    block,
                    record,
                    field: fp.name.clone(),
                    error,
                };
                let col = decoded.column(fi).as_ref();
                let null = json::is_null_value(col, r);
                let (value, at) = json::resolve_union(col, r);
                let budgeted = !null && json_kind(value.data_type());
                if budgeted {
                    self.json_buf.clear();
                    json::write_value(col, r, &mut self.json_buf, &mut budget).map_err(err)?;
                }
                if in_column {
                    if let Some((_, b)) = json_columns.get_mut(next_json_column) {
                        if null {
                            b.append_null();
                        } else if budgeted {
                            b.append_value(&self.json_buf);
                        } else {
                            return Err(err(DatumError::Mismatch));
                        }
                    }
                    next_json_column += 1;
                }
                if fp.to_json {
                    self.row_json.push(if json_fields == 0 { '{' } else { ',' });
                    self.row_json.push_str(&fp.json_key);
                    if null {
                        self.row_json.push_str("null");
                    } else if budgeted {
                        self.row_json.push_str(&self.json_buf);
                    } else {
                        push_scalar(&mut self.row_json, value, at).map_err(err)?;
                    }
                    json_fields += 1;
                }
            }
            file_budget.charge(&start_budget, &budget);
            if self.row_json.len() as u64 > limits.max_record_json_bytes {
                return Err(NormalizeError::Datum {
                    block,
                    record,
                    field: if generic { "event" } else { "extra" }.to_string(),
                    error: DatumError::OverLimit {
                        what: "rendered JSON bytes of one record",
                        limit: limits.max_record_json_bytes,
                    },
                });
            }
            if has_json {
                if json_fields > 0 {
                    self.row_json.push('}');
                    row_json_column.append_value(&self.row_json);
                } else if generic {
                    row_json_column.append_value("{}");
                } else {
                    row_json_column.append_null();
                }
            }
            match times {
                Some(t) if !t.is_null(r) => {
                    let time = t.value(r);
                    let micros = time
                        .checked_mul(1_000_000)
                        .ok_or(NormalizeError::TimeOutOfRange { record, time })?;
                    event_time.append_value(micros);
                }
                _ => event_time.append_null(),
            }
            let duplicate = match ids {
                Some(ids) if !ids.is_null(r) => !self
                    .seen_ids
                    .insert(xxhash_rust::xxh3::xxh3_128(ids.value(r).as_bytes())),
                _ => false,
            };
            if duplicate {
                self.stats.duplicates_dropped += 1;
            } else {
                self.stats.rows_out += 1;
            }
            keep.push(!duplicate);
        }
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(table.columns.len());
        for col in &table.columns {
            let array: ArrayRef = match col.source {
                ColumnSource::Field(slot) => match filled_by.get(slot).copied().flatten() {
                    None => arrow_array::new_null_array(&col.data_type, n),
                    Some(fi) if plan.fields[fi].json_column => {
                        match json_columns.iter_mut().find(|(f, _)| *f == fi) {
                            Some((_, b)) => Arc::new(b.finish()),
                            None => arrow_array::new_null_array(&col.data_type, n),
                        }
                    }
                    Some(fi) => {
                        arrow_cast::cast(decoded.column(fi), &col.data_type).map_err(sink_err)?
                    }
                },
                ColumnSource::EventTime => Arc::new(event_time.finish().with_timezone("UTC")),
                ColumnSource::Json => Arc::new(row_json_column.finish()),
                _ => self.constant(&table, col, n)?,
            };
            arrays.push(array);
        }
        let batch = RecordBatch::try_new(table.schema.clone(), arrays).map_err(sink_err)?;
        if keep.iter().all(|k| *k) {
            return Ok(Some(batch));
        }
        if keep.iter().all(|k| !k) {
            return Ok(None);
        }
        let mask = BooleanArray::from(keep);
        arrow_select::filter::filter_record_batch(&batch, &mask)
            .map(Some)
            .map_err(sink_err)
    }

    fn constant(
        &self,
        table: &TableDef,
        col: &Column,
        n: usize,
    ) -> Result<ArrayRef, NormalizeError> {
        let ctx = &self.ctx;
        Ok(match col.source {
            ColumnSource::SourceKey => Arc::new(StringArray::from_iter_values(
                std::iter::repeat_n(ctx.source_key.as_str(), n),
            )),
            ColumnSource::EventType => Arc::new(StringArray::from_iter_values(
                std::iter::repeat_n(ctx.event_type.as_str(), n),
            )),
            ColumnSource::DeliveryHour => Arc::new(
                TimestampMicrosecondArray::from(vec![ctx.delivery_hour_micros; n])
                    .with_timezone("UTC"),
            ),
            ColumnSource::SchemaId => Arc::new(Int64Array::from(vec![ctx.schema_id; n])),
            ColumnSource::SchemaVersion => Arc::new(Int64Array::from(vec![ctx.schema_version; n])),
            ColumnSource::RegistryVersion => {
                Arc::new(Int32Array::from(vec![table.version as i32; n]))
            }
            ColumnSource::Field(_) | ColumnSource::EventTime | ColumnSource::Json => {
                return Err(NormalizeError::Sink(format!(
                    "column {} has no builder",
                    col.name
                )));
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::decode::Limits;
    use apache_avro::types::Value as AvroValue;
    use apache_avro::{Codec, Schema, Writer};
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type, TimestampMicrosecondType};

    fn ctx(event_type: &str) -> FileContext {
        FileContext {
            event_type: event_type.into(),
            source_key: "currents/k.avro".into(),
            delivery_hour_micros: 1_000_000,
            schema_id: Some(3),
            schema_version: None,
        }
    }

    fn write(schema_json: &str, records: Vec<Vec<(&str, AvroValue)>>) -> Vec<u8> {
        let schema = Schema::parse_str(schema_json).unwrap();
        let mut w = Writer::with_codec(&schema, Vec::new(), Codec::Null).unwrap();
        for r in records {
            w.append_value(AvroValue::Record(
                r.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            ))
            .unwrap();
        }
        w.into_inner().unwrap()
    }

    fn run(
        bytes: &[u8],
        event_type: &str,
    ) -> Result<(Vec<RecordBatch>, NormalizeStats), NormalizeError> {
        let registry = Registry::builtin().unwrap();
        let c = Container::open(bytes, Limits::default())?;
        let plan = Plan::new(WriterSchema::parse(c.schema_json)?, event_type, &registry)?;
        let mut out = Vec::new();
        let stats = Normalizer::new(&plan, ctx(event_type), 2, 10).run(&c, |b| {
            out.push(b);
            Ok(())
        })?;
        Ok((out, stats))
    }

    fn some(v: AvroValue) -> AvroValue {
        AvroValue::Union(1, Box::new(v))
    }
    fn none() -> AvroValue {
        AvroValue::Union(0, Box::new(AvroValue::Null))
    }

    const LOCATION: &str = r#"{"type":"record","name":"Location","namespace":"dataexport.S3.inner.users.behaviors","fields":[
        {"name":"id","type":"string"},{"name":"user_id","type":"string"},{"name":"app_id","type":"string"},
        {"name":"time","type":"int"},{"name":"latitude","type":"float"},{"name":"longitude","type":"float"},
        {"name":"altitude","type":["null","float"],"default":null},
        {"name":"brand_new","type":["null",{"type":"array","items":"string"}],"default":null}]}"#;

    fn location(id: &str, brand_new: AvroValue) -> Vec<(&'static str, AvroValue)> {
        vec![
            ("id", AvroValue::String(id.into())),
            ("user_id", AvroValue::String("u".into())),
            ("app_id", AvroValue::String("app".into())),
            ("time", AvroValue::Int(2_000_000_000)),
            ("latitude", AvroValue::Float(2.5)),
            ("longitude", AvroValue::Float(-1.5)),
            ("altitude", none()),
            ("brand_new", brand_new),
        ]
    }

    #[test]
    fn fields_land_in_their_columns_and_unknown_ones_in_extra() {
        let bytes = write(
            LOCATION,
            vec![
                location(
                    "a",
                    some(AvroValue::Array(vec![AvroValue::String("x".into())])),
                ),
                location("b", none()),
                location("c", none()),
            ],
        );
        let (batches, stats) = run(&bytes, "users.behaviors.Location").unwrap();
        assert_eq!(stats.events_in, 3);
        assert_eq!(stats.rows_out, 3);
        assert_eq!(stats.extra_fields, ["brand_new"]);
        assert_eq!(batches.len(), 2, "batches of 2 rows");
        let b = &batches[0];
        let lat = b
            .column_by_name("latitude")
            .unwrap()
            .as_primitive::<Float64Type>();
        assert_eq!(lat.value(0), 2.5);
        let alt = b.column_by_name("altitude").unwrap();
        assert!(alt.is_null(0));
        // A field the file lacks (nullable in the registry) is null.
        assert!(b.column_by_name("ad_id").unwrap().is_null(0));
        let extra = b.column_by_name("extra").unwrap().as_string::<i32>();
        assert_eq!(extra.value(0), r#"{"brand_new":["x"]}"#);
        assert_eq!(extra.value(1), r#"{"brand_new":null}"#);
        let t = b
            .column_by_name("event_time")
            .unwrap()
            .as_primitive::<TimestampMicrosecondType>();
        assert_eq!(t.value(0), 2_000_000_000 * 1_000_000);
        let sid = b
            .column_by_name("schema_id")
            .unwrap()
            .as_primitive::<Int64Type>();
        assert_eq!(sid.value(1), 3);
    }

    #[test]
    fn duplicate_ids_in_a_file_are_written_once() {
        let bytes = write(
            LOCATION,
            vec![
                location("a", none()),
                location("b", none()),
                location("a", none()),
                location("a", none()),
            ],
        );
        let (batches, stats) = run(&bytes, "users.behaviors.Location").unwrap();
        assert_eq!(stats.duplicates_dropped, 2);
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 2);
    }

    #[test]
    fn type_change_contradicts_the_registry() {
        let changed = LOCATION.replace(
            r#"{"name":"latitude","type":"float"}"#,
            r#"{"name":"latitude","type":"string"}"#,
        );
        let mut rec = location("a", none());
        rec[4].1 = AvroValue::String("north".into());
        let bytes = write(&changed, vec![rec]);
        let err = run(&bytes, "users.behaviors.Location").unwrap_err();
        assert!(
            matches!(&err, NormalizeError::Contradiction { field, .. } if field == "latitude"),
            "{err}"
        );
    }

    #[test]
    fn missing_required_field_contradicts_the_registry() {
        let bytes = write(
            r#"{"type":"record","name":"Location","namespace":"dataexport.S3.inner.users.behaviors","fields":[
                {"name":"id","type":"string"},{"name":"user_id","type":"string"},{"name":"time","type":"int"}]}"#,
            vec![vec![
                ("id", AvroValue::String("a".into())),
                ("user_id", AvroValue::String("u".into())),
                ("time", AvroValue::Int(1)),
            ]],
        );
        let err = run(&bytes, "users.behaviors.Location").unwrap_err();
        assert!(matches!(err, NormalizeError::Contradiction { .. }), "{err}");
    }

    #[test]
    fn long_time_fits_an_int_time_column() {
        let long_time = LOCATION.replace(
            r#""name":"time","type":"int""#,
            r#""name":"time","type":"long""#,
        );
        let mut rec = location("a", none());
        rec[3].1 = AvroValue::Long(5_000_000_000);
        let bytes = write(&long_time, vec![rec]);
        let (batches, _) = run(&bytes, "users.behaviors.Location").unwrap();
        let time = batches[0]
            .column_by_name("time")
            .unwrap()
            .as_primitive::<Int64Type>();
        assert_eq!(time.value(0), 5_000_000_000);
    }

    #[test]
    fn unknown_event_type_goes_to_the_generic_table_whole() {
        let bytes = write(
            r#"{"type":"record","name":"Thing","namespace":"dataexport.S3.inner.users.future","fields":[
                {"name":"id","type":"string"},{"name":"time","type":"long"},
                {"name":"user_id","type":["null","string"]},{"name":"score","type":"double"}]}"#,
            vec![vec![
                ("id", AvroValue::String("a".into())),
                ("time", AvroValue::Long(7)),
                ("user_id", some(AvroValue::String("u".into()))),
                ("score", AvroValue::Double(0.5)),
            ]],
        );
        let (batches, stats) = run(&bytes, "users.future.Thing").unwrap();
        assert!(stats.extra_fields.is_empty());
        let b = &batches[0];
        assert_eq!(b.schema().field(0).name(), "event_type");
        assert_eq!(
            b.column(0).as_string::<i32>().value(0),
            "users.future.Thing"
        );
        let ev = b.column_by_name("event").unwrap().as_string::<i32>();
        assert_eq!(
            ev.value(0),
            r#"{"id":"a","time":7,"user_id":"u","score":0.5}"#
        );
        assert_eq!(
            b.column_by_name("user_id")
                .unwrap()
                .as_string::<i32>()
                .value(0),
            "u"
        );
    }

    #[test]
    fn record_name_must_match_the_key_event_type() {
        let bytes = write(LOCATION, vec![location("a", none())]);
        assert!(matches!(
            run(&bytes, "users.behaviors.Purchase"),
            Err(NormalizeError::EventTypeMismatch { .. })
        ));
    }

    fn zigzag(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            let b = (z & 0x7f) as u8;
            z >>= 7;
            if z == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn avro_str(out: &mut Vec<u8>, s: &str) {
        zigzag(out, s.len() as i64);
        out.extend_from_slice(s.as_bytes());
    }

    /// A container file written by hand: one block of `count` records whose bytes are `data`.
    fn container(schema_json: &str, count: i64, data: &[u8]) -> Vec<u8> {
        let mut f = crate::decode::MAGIC.to_vec();
        zigzag(&mut f, 1);
        avro_str(&mut f, "avro.schema");
        avro_str(&mut f, schema_json);
        zigzag(&mut f, 0);
        f.extend_from_slice(&[9u8; 16]);
        zigzag(&mut f, count);
        zigzag(&mut f, data.len() as i64);
        f.extend_from_slice(data);
        f.extend_from_slice(&[9u8; 16]);
        f
    }

    /// LOCATION with `brand_new` as an array of nulls (a field the registry does not know).
    fn null_array_schema() -> String {
        LOCATION.replace(
            r#"{"name":"brand_new","type":["null",{"type":"array","items":"string"}],"default":null}"#,
            r#"{"name":"brand_new","type":{"type":"array","items":"null"}}"#,
        )
    }

    /// One Location record whose `brand_new` holds `blocks` blocks of `per_block` nulls: a few
    /// bytes of input per block, whatever the item count.
    fn null_array_record(out: &mut Vec<u8>, id: &str, blocks: u64, per_block: i64) {
        avro_str(out, id);
        avro_str(out, "u");
        avro_str(out, "app");
        zigzag(out, 2_000_000_000);
        out.extend_from_slice(&2.5f32.to_le_bytes());
        out.extend_from_slice(&(-1.5f32).to_le_bytes());
        zigzag(out, 0); // altitude: null
        for _ in 0..blocks {
            zigzag(out, per_block);
        }
        zigzag(out, 0);
    }

    fn run_with(
        bytes: &[u8],
        event_type: &str,
        limits: Limits,
    ) -> Result<NormalizeStats, NormalizeError> {
        let registry = Registry::builtin().unwrap();
        let c = Container::open(bytes, limits)?;
        let plan = Plan::new(WriterSchema::parse(c.schema_json)?, event_type, &registry)?;
        Normalizer::new(&plan, ctx(event_type), 64, 10).run(&c, |_| Ok(()))
    }

    #[test]
    fn null_items_that_cost_no_input_are_bounded_per_record() {
        let mut data = Vec::new();
        // 2,000,000 null items from ~4 KB of input.
        null_array_record(&mut data, "a", 2_000, 1_000);
        assert!(data.len() < 5_000);
        let bytes = container(&null_array_schema(), 1, &data);
        let err = run(&bytes, "users.behaviors.Location").unwrap_err();
        match &err {
            NormalizeError::Datum { field, error, .. } => {
                assert_eq!(field, "brand_new");
                assert_eq!(
                    *error,
                    DatumError::OverLimit {
                        what: "array/map items in one record",
                        limit: 1_000_000
                    }
                );
            }
            other => panic!("{other}"),
        }
        assert!(
            err.to_string().contains("over the limit of 1000000"),
            "{err}"
        );
    }

    #[test]
    fn null_items_and_rendered_json_are_bounded_per_file() {
        // Each record: 600,000 nulls (within the record limit of 1,000,000).
        let mut data = Vec::new();
        for id in ["a", "b", "c"] {
            null_array_record(&mut data, id, 600, 1_000);
        }
        let bytes = container(&null_array_schema(), 3, &data);
        let limits = Limits {
            max_file_items: 1_500_000,
            ..Limits::default()
        };
        let err = run_with(&bytes, "users.behaviors.Location", limits).unwrap_err();
        assert!(
            matches!(
                &err,
                NormalizeError::Datum {
                    record: 2,
                    error: DatumError::OverLimit {
                        what: "array/map items in the file",
                        limit: 1_500_000
                    },
                    ..
                }
            ),
            "{err}"
        );
        // The same file against a limit on rendered text: each record renders ~3 MB.
        let limits = Limits {
            max_record_json_bytes: 1 << 20,
            ..Limits::default()
        };
        let err = run_with(&bytes, "users.behaviors.Location", limits).unwrap_err();
        assert!(
            matches!(
                &err,
                NormalizeError::Datum {
                    record: 0,
                    error: DatumError::OverLimit {
                        what: "rendered JSON bytes of one record",
                        ..
                    },
                    ..
                }
            ),
            "{err}"
        );
        let limits = Limits {
            max_file_json_bytes: 5 << 20,
            ..Limits::default()
        };
        let err = run_with(&bytes, "users.behaviors.Location", limits).unwrap_err();
        assert!(
            matches!(
                &err,
                NormalizeError::Datum {
                    record: 1,
                    error: DatumError::OverLimit {
                        what: "rendered JSON bytes in the file",
                        ..
                    },
                    ..
                }
            ),
            "{err}"
        );
        // Within every limit the file converts.
        let stats = run_with(&bytes, "users.behaviors.Location", Limits::default()).unwrap();
        assert_eq!(stats.rows_out, 3);
    }

    #[test]
    fn bytes_after_the_last_record_are_corruption() {
        let schema = Schema::parse_str(LOCATION).unwrap();
        let mut w = Writer::with_codec(&schema, Vec::new(), Codec::Null).unwrap();
        w.append_value(AvroValue::Record(
            location("a", none())
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        ))
        .unwrap();
        let bytes = w.into_inner().unwrap();
        // Claim 0 records in the block: its bytes are then left over.
        let c = Container::open(&bytes, Limits::default()).unwrap();
        let data_start = bytes.len() - c.blocks().next().unwrap().unwrap().data.len() - 16 - 2;
        let mut forged = bytes.clone();
        assert_eq!(forged[data_start], 2, "count varint of 1");
        forged[data_start] = 0;
        assert!(matches!(
            run(&forged, "users.behaviors.Location"),
            Err(NormalizeError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn array_items_that_cost_no_input_and_are_not_null_are_refused_with_the_schema() {
        let mut data = Vec::new();
        null_array_record(&mut data, "a", 1, 3);
        for items in [
            r#"{"type":"fixed","name":"Nothing","size":0}"#,
            r#"{"type":"record","name":"Empty","fields":[{"name":"n","type":"null"}]}"#,
        ] {
            let schema =
                null_array_schema().replace(r#""items":"null""#, &format!(r#""items":{items}"#));
            let err = run(&container(&schema, 1, &data), "users.behaviors.Location").unwrap_err();
            assert!(
                matches!(&err, NormalizeError::Schema(SchemaError::Invalid { reason, .. }) if reason.contains("cost no input bytes")),
                "{items}: {err}"
            );
        }
    }

    #[test]
    fn a_record_that_does_not_decode_names_its_block_byte_offset_and_record() {
        // Two records claimed, the bytes of one and a half.
        let mut data = Vec::new();
        null_array_record(&mut data, "a", 1, 2);
        let whole = data.len();
        null_array_record(&mut data, "b", 1, 2);
        data.truncate(whole + 3);
        let bytes = container(&null_array_schema(), 2, &data);
        let err = run(&bytes, "users.behaviors.Location").unwrap_err();
        match &err {
            NormalizeError::Record {
                block: 0,
                offset,
                record: 1,
                ..
            } => assert!(*offset > 0),
            other => panic!("{other}"),
        }
        assert!(err.to_string().starts_with("block 0 (at byte "), "{err}");
    }

    #[test]
    fn a_string_that_is_not_utf8_names_its_records() {
        let mut data = Vec::new();
        null_array_record(&mut data, "a", 0, 0);
        null_array_record(&mut data, "b", 0, 0);
        // The second record's `user_id` ("u") becomes the byte 0xff.
        let at = data.len() - (data.len() / 2) + 3;
        assert_eq!(data[at], b'u');
        data[at] = 0xff;
        let bytes = container(&null_array_schema(), 2, &data);
        let err = run(&bytes, "users.behaviors.Location").unwrap_err();
        assert!(
            matches!(
                &err,
                // This schema's arrays of nulls decode one record per batch.
                NormalizeError::Records {
                    first_block: 0,
                    first_record: 1,
                    last_record: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().to_lowercase().contains("utf"), "{err}");
    }

    #[test]
    fn a_panic_in_the_decoder_is_an_error_for_the_file() {
        let r: Result<(), String> = contained(|| panic!("shift overflow"));
        assert_eq!(r.unwrap_err(), "the Avro decoder panicked: shift overflow");
        let r: Result<u8, String> = contained(|| Ok(7));
        assert_eq!(r, Ok(7));
    }
}
