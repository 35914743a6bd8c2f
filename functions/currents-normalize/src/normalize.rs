//! Event records → rows of the table's columns. A [`Plan`] is compiled once per file from the
//! writer schema and the registry table: each writer field is read straight from the block
//! bytes into a cell (no per-record allocation), routed to its column, or (when the registry
//! does not know it yet) into the row's `extra` JSON object. A writer schema that contradicts
//! the registry (type or nullability change, missing required field) is refused before any
//! record is read. Records whose `id` was already seen in the file are dropped. Rows are
//! handed out as Arrow record batches of a fixed size.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Float64Builder, Int64Builder, TimestampMicrosecondBuilder,
};
use arrow_array::{
    Array, ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow_schema::DataType;

use crate::decode::{Container, Cursor, DatumError, DecodeError, Limits};
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

#[derive(Debug, Clone)]
enum Read {
    Null,
    Bool,
    Int,
    Long,
    Float,
    Double,
    Str,
    Enum(Vec<String>),
    Union(Vec<Read>),
    Json(NodeId),
}

#[derive(Debug, Clone, Copy)]
enum Cell<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
    /// JSON text in the row's scratch buffer.
    Json(usize, usize),
}

#[derive(Debug)]
struct FieldPlan {
    name: String,
    /// `"name":` as JSON, for the extra/event object.
    json_key: String,
    read: Read,
    /// Index into the table's fields.
    slot: Option<usize>,
    /// Also (or only) written into the JSON column.
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
}

fn natural_read(schema: &WriterSchema, node: NodeId) -> Read {
    match schema.node(node) {
        Node::Null => Read::Null,
        Node::Boolean => Read::Bool,
        Node::Int => Read::Int,
        Node::Long => Read::Long,
        Node::Float => Read::Float,
        Node::Double => Read::Double,
        Node::String => Read::Str,
        Node::Enum { symbols, .. } => Read::Enum(symbols.clone()),
        Node::Union(bs) => Read::Union(bs.iter().map(|b| natural_read(schema, *b)).collect()),
        Node::Bytes | Node::Fixed { .. } | Node::Array(_) | Node::Map(_) | Node::Record { .. } => {
            Read::Json(node)
        }
    }
}

/// How to read a writer field into a column of type `ty`, or why it cannot be.
fn column_read(
    schema: &WriterSchema,
    node: NodeId,
    ty: FieldType,
    nullable: bool,
) -> Result<Read, String> {
    let (branches, writer_nullable) = schema.branches(node);
    let desc = schema.describe(node);
    if writer_nullable && !nullable {
        return Err(format!(
            "the file allows null ({desc}) but the registry column is required"
        ));
    }
    let fits = |b: NodeId| -> Option<Read> {
        let n = schema.node(b);
        let ok = match ty {
            FieldType::String => matches!(n, Node::String | Node::Enum { .. }),
            FieldType::Int | FieldType::Long => matches!(n, Node::Int | Node::Long),
            FieldType::Float | FieldType::Double => matches!(n, Node::Float | Node::Double),
            FieldType::Boolean => matches!(n, Node::Boolean),
            FieldType::Json => matches!(n, Node::Array(_) | Node::Map(_) | Node::Record { .. }),
        };
        ok.then(|| match ty {
            FieldType::Json => Read::Json(b),
            _ => natural_read(schema, b),
        })
    };
    let contradiction = || format!("registry type {}, file type {desc}", ty.name());
    if branches.is_empty() || (branches.len() > 1 && ty != FieldType::Json) {
        return Err(contradiction());
    }
    match schema.node(node) {
        Node::Union(all) => {
            let mut reads = Vec::with_capacity(all.len());
            for b in all {
                if matches!(schema.node(*b), Node::Null) {
                    reads.push(Read::Null);
                } else {
                    reads.push(fits(*b).ok_or_else(contradiction)?);
                }
            }
            Ok(Read::Union(reads))
        }
        _ => fits(node).ok_or_else(contradiction),
    }
}

impl Plan {
    /// Compiles the plan for a file of `event_type` written with `schema`.
    pub fn new(
        schema: WriterSchema,
        event_type: &str,
        registry: &Registry,
    ) -> Result<Self, NormalizeError> {
        let (record_name, writer_fields) = schema.record()?;
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
                    match column_read(&schema, *node, f.ty, f.nullable) {
                        Ok(read) => {
                            seen[i] = true;
                            FieldPlan {
                                name: name.clone(),
                                json_key,
                                read,
                                slot: Some(i),
                                to_json: generic,
                            }
                        }
                        // The generic table takes its common columns only when they fit;
                        // the whole event is in its JSON column either way.
                        Err(_) if generic && f.nullable => FieldPlan {
                            name: name.clone(),
                            json_key,
                            read: natural_read(&schema, *node),
                            slot: None,
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
                        read: natural_read(&schema, *node),
                        slot: None,
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

/// Where a table column's values are gathered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// `Builders::strs[i]` (strings and JSON text, UTF-8 checked per batch).
    Str(usize),
    /// `Builders::ints[i]`.
    Int(usize),
    /// `Builders::floats[i]`.
    Float(usize),
    /// `Builders::bools[i]`.
    Bool(usize),
    /// `event_time`.
    EventTime,
    /// `extra` / `event`.
    Json,
    /// A registry field the file does not have: all null.
    Absent,
    /// Same value on every row, built when the batch is finished.
    Const,
}

#[derive(Default)]
struct Builders {
    strs: Vec<BinaryBuilder>,
    ints: Vec<Int64Builder>,
    floats: Vec<Float64Builder>,
    bools: Vec<BooleanBuilder>,
    event_time: TimestampMicrosecondBuilder,
    json: BinaryBuilder,
}

/// What a field's value is also used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Plain,
    /// The dedup key.
    Id,
    /// Seconds since the epoch; feeds `event_time`.
    Time,
}

/// One writer field, compiled. The common shapes (a required or `["null", T]` primitive going
/// straight to its column) are flat steps; everything else goes through a [`Cell`].
#[derive(Debug, Clone, Copy)]
enum Step {
    Str(usize),
    OptStr(usize, i64),
    Int(usize),
    OptInt(usize, i64),
    Long(usize),
    OptLong(usize, i64),
    Float(usize),
    OptFloat(usize, i64),
    Double(usize),
    OptDouble(usize, i64),
    Bool(usize),
    OptBool(usize, i64),
    /// Via a cell: `slot` receives it, `role` says what else it feeds, `json` adds it to the
    /// row's JSON object.
    Cell {
        slot: Option<Slot>,
        role: Role,
        json: bool,
    },
}

/// Turns a file's records into record batches of the plan's table.
pub struct Normalizer<'p> {
    plan: &'p Plan,
    ctx: FileContext,
    batch_rows: usize,
    steps: Vec<Step>,
    slots: Vec<Slot>,
    b: Builders,
    rows_in_batch: usize,
    batch_first_record: u64,
    /// Rows of the current batch that repeat an earlier `id`.
    dropped_in_batch: Vec<usize>,
    seen_ids: HashSet<u128, BuildHasherDefault<IdHasher>>,
    json_buf: String,
    row_json: String,
    stats: NormalizeStats,
}

/// Rows of one batch hold at most about this many bytes of values before the batch is handed
/// on early (Arrow's string columns cannot pass 2 GiB, and memory stays bounded).
pub const MAX_BATCH_BYTES: usize = 256 << 20;

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

fn append_cell(b: &mut Builders, slot: Slot, cell: Cell<'_>, json_buf: &str) -> bool {
    match (slot, cell) {
        (Slot::Str(i), Cell::Str(s)) => b.strs[i].append_value(s),
        (Slot::Str(i), Cell::Json(s, e)) => b.strs[i].append_value(&json_buf[s..e]),
        (Slot::Int(i), Cell::Int(v)) => b.ints[i].append_value(v),
        (Slot::Float(i), Cell::Float(v)) => b.floats[i].append_value(v),
        (Slot::Bool(i), Cell::Bool(v)) => b.bools[i].append_value(v),
        (Slot::Str(i), Cell::Null) => b.strs[i].append_null(),
        (Slot::Int(i), Cell::Null) => b.ints[i].append_null(),
        (Slot::Float(i), Cell::Null) => b.floats[i].append_null(),
        (Slot::Bool(i), Cell::Null) => b.bools[i].append_null(),
        _ => return false,
    }
    true
}

fn push_cell_json(out: &mut String, cell: Cell<'_>, json_buf: &str) {
    match cell {
        Cell::Null => out.push_str("null"),
        Cell::Bool(b) => out.push_str(if b { "true" } else { "false" }),
        Cell::Int(v) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{v}");
        }
        Cell::Float(v) => json::push_f64(out, v),
        Cell::Str(s) => json::push_str(out, s),
        Cell::Json(s, e) => out.push_str(&json_buf[s..e]),
    }
}

fn read_cell<'a>(
    read: &'a Read,
    schema: &WriterSchema,
    c: &mut Cursor<'a>,
    json_buf: &mut String,
    budget: &mut Budget,
) -> Result<Cell<'a>, DatumError> {
    Ok(match read {
        Read::Null => Cell::Null,
        Read::Str => Cell::Str(c.read_str()?),
        Read::Int => Cell::Int(i64::from(c.read_int()?)),
        Read::Long => Cell::Int(c.read_long()?),
        Read::Bool => Cell::Bool(c.read_bool()?),
        Read::Float => Cell::Float(f64::from(c.read_f32()?)),
        Read::Double => Cell::Float(c.read_f64()?),
        Read::Enum(symbols) => {
            let i = c.read_long()?;
            Cell::Str(
                usize::try_from(i)
                    .ok()
                    .and_then(|i| symbols.get(i))
                    .ok_or(DatumError::BadIndex(i))?,
            )
        }
        Read::Union(branches) => {
            let i = c.read_long()?;
            match usize::try_from(i).ok().and_then(|i| branches.get(i)) {
                Some(Read::Union(_)) => return Err(DatumError::TooDeep),
                Some(other) => read_cell(other, schema, c, json_buf, budget)?,
                None => return Err(DatumError::BadIndex(i)),
            }
        }
        Read::Json(node) => {
            let start = json_buf.len();
            json::write_value(schema, *node, c, json_buf, budget)?;
            Cell::Json(start, json_buf.len())
        }
    })
}

/// Reads the branch index of a `["null", T]` union: `Ok(false)` for null, `Ok(true)` for a
/// value.
#[inline(always)]
fn present(c: &mut Cursor<'_>, null: i64) -> Result<bool, DatumError> {
    let i = c.read_long()?;
    if i == null {
        Ok(false)
    } else if i == 1 - null {
        Ok(true)
    } else {
        Err(DatumError::BadIndex(i))
    }
}

/// Why a row failed: the writer field index and the error.
enum RowError {
    Datum(usize, DatumError),
    Time(i64),
}

/// What decoding a row found out besides its values.
struct RowInfo {
    duplicate: bool,
    json_fields: usize,
}

/// The per-row state the decoder writes to, borrowed apart from the plan.
struct RowSink<'s> {
    b: &'s mut Builders,
    seen_ids: &'s mut HashSet<u128, BuildHasherDefault<IdHasher>>,
    json_buf: &'s mut String,
    row_json: &'s mut String,
    budget: &'s mut Budget,
}

/// Decodes one record into the builders (the hot path).
#[inline]
fn decode_row<'a>(
    steps: &[Step],
    plan: &'a Plan,
    c: &mut Cursor<'a>,
    s: &mut RowSink<'_>,
) -> Result<RowInfo, RowError> {
    let mut info = RowInfo {
        duplicate: false,
        json_fields: 0,
    };
    s.row_json.clear();
    for (fi, step) in steps.iter().enumerate() {
        let e = |err| RowError::Datum(fi, err);
        let b = &mut *s.b;
        match *step {
            Step::Str(i) => b.strs[i].append_value(c.read_bytes().map_err(e)?),
            Step::OptStr(i, null) => {
                if present(c, null).map_err(e)? {
                    b.strs[i].append_value(c.read_bytes().map_err(e)?);
                } else {
                    b.strs[i].append_null();
                }
            }
            Step::Int(i) => b.ints[i].append_value(i64::from(c.read_int().map_err(e)?)),
            Step::OptInt(i, null) => {
                if present(c, null).map_err(e)? {
                    b.ints[i].append_value(i64::from(c.read_int().map_err(e)?));
                } else {
                    b.ints[i].append_null();
                }
            }
            Step::Long(i) => b.ints[i].append_value(c.read_long().map_err(e)?),
            Step::OptLong(i, null) => {
                if present(c, null).map_err(e)? {
                    b.ints[i].append_value(c.read_long().map_err(e)?);
                } else {
                    b.ints[i].append_null();
                }
            }
            Step::Float(i) => b.floats[i].append_value(f64::from(c.read_f32().map_err(e)?)),
            Step::OptFloat(i, null) => {
                if present(c, null).map_err(e)? {
                    b.floats[i].append_value(f64::from(c.read_f32().map_err(e)?));
                } else {
                    b.floats[i].append_null();
                }
            }
            Step::Double(i) => b.floats[i].append_value(c.read_f64().map_err(e)?),
            Step::OptDouble(i, null) => {
                if present(c, null).map_err(e)? {
                    b.floats[i].append_value(c.read_f64().map_err(e)?);
                } else {
                    b.floats[i].append_null();
                }
            }
            Step::Bool(i) => b.bools[i].append_value(c.read_bool().map_err(e)?),
            Step::OptBool(i, null) => {
                if present(c, null).map_err(e)? {
                    b.bools[i].append_value(c.read_bool().map_err(e)?);
                } else {
                    b.bools[i].append_null();
                }
            }
            Step::Cell { slot, role, json } => {
                let fp = &plan.fields[fi];
                s.json_buf.clear();
                let cell = read_cell(&fp.read, &plan.schema, c, s.json_buf, s.budget).map_err(e)?;
                if let Some(slot) = slot
                    && !append_cell(b, slot, cell, s.json_buf)
                {
                    return Err(e(DatumError::Mismatch));
                }
                match (role, cell) {
                    (Role::Plain, _) => {}
                    (Role::Id, Cell::Str(id)) => {
                        info.duplicate = !s
                            .seen_ids
                            .insert(xxhash_rust::xxh3::xxh3_128(id.as_bytes()));
                    }
                    (Role::Time, Cell::Int(time)) => {
                        let micros = time.checked_mul(1_000_000).ok_or(RowError::Time(time))?;
                        b.event_time.append_value(micros);
                    }
                    _ => return Err(e(DatumError::Mismatch)),
                }
                if json {
                    s.row_json
                        .push(if info.json_fields == 0 { '{' } else { ',' });
                    s.row_json.push_str(&fp.json_key);
                    push_cell_json(s.row_json, cell, s.json_buf);
                    info.json_fields += 1;
                }
            }
        }
    }
    Ok(info)
}

fn compile_step(fp: &FieldPlan, slot: Option<Slot>, role: Role) -> Step {
    let cell = Step::Cell {
        slot,
        role,
        json: fp.to_json,
    };
    if role != Role::Plain || fp.to_json {
        return cell;
    }
    // `["null", T]` or `[T, null]`: the null branch's index and T.
    let (inner, null) = match &fp.read {
        Read::Union(bs) => match bs.as_slice() {
            [Read::Null, t] => (t, Some(0)),
            [t, Read::Null] => (t, Some(1)),
            _ => return cell,
        },
        other => (other, None),
    };
    match (inner, slot, null) {
        (Read::Str, Some(Slot::Str(i)), None) => Step::Str(i),
        (Read::Str, Some(Slot::Str(i)), Some(n)) => Step::OptStr(i, n),
        (Read::Int, Some(Slot::Int(i)), None) => Step::Int(i),
        (Read::Int, Some(Slot::Int(i)), Some(n)) => Step::OptInt(i, n),
        (Read::Long, Some(Slot::Int(i)), None) => Step::Long(i),
        (Read::Long, Some(Slot::Int(i)), Some(n)) => Step::OptLong(i, n),
        (Read::Float, Some(Slot::Float(i)), None) => Step::Float(i),
        (Read::Float, Some(Slot::Float(i)), Some(n)) => Step::OptFloat(i, n),
        (Read::Double, Some(Slot::Float(i)), None) => Step::Double(i),
        (Read::Double, Some(Slot::Float(i)), Some(n)) => Step::OptDouble(i, n),
        (Read::Bool, Some(Slot::Bool(i)), None) => Step::Bool(i),
        (Read::Bool, Some(Slot::Bool(i)), Some(n)) => Step::OptBool(i, n),
        _ => cell,
    }
}

impl<'p> Normalizer<'p> {
    /// Starts a file. `batch_rows` is the size of the batches handed to the sink.
    pub fn new(plan: &'p Plan, ctx: FileContext, batch_rows: usize, expected_rows: usize) -> Self {
        let table = &plan.table;
        let batch_rows = batch_rows.max(1);
        let cap = batch_rows.min(expected_rows.max(1));
        let mut present_fields = vec![false; table.fields.len()];
        for f in &plan.fields {
            if let Some(s) = f.slot {
                present_fields[s] = true;
            }
        }
        let mut b = Builders {
            event_time: TimestampMicrosecondBuilder::with_capacity(cap),
            json: BinaryBuilder::with_capacity(cap, cap * 8),
            ..Builders::default()
        };
        let mut field_slots = vec![None; table.fields.len()];
        let slots: Vec<Slot> = table
            .columns
            .iter()
            .map(|c| match c.source {
                ColumnSource::Field(fi) if present_fields.get(fi).copied().unwrap_or(false) => {
                    let slot = match c.data_type {
                        DataType::Int64 => {
                            b.ints.push(Int64Builder::with_capacity(cap));
                            Slot::Int(b.ints.len() - 1)
                        }
                        DataType::Float64 => {
                            b.floats.push(Float64Builder::with_capacity(cap));
                            Slot::Float(b.floats.len() - 1)
                        }
                        DataType::Boolean => {
                            b.bools.push(BooleanBuilder::with_capacity(cap));
                            Slot::Bool(b.bools.len() - 1)
                        }
                        _ => {
                            b.strs.push(BinaryBuilder::with_capacity(cap, cap * 32));
                            Slot::Str(b.strs.len() - 1)
                        }
                    };
                    if let Some(s) = field_slots.get_mut(fi) {
                        *s = Some(slot);
                    }
                    slot
                }
                ColumnSource::Field(_) => Slot::Absent,
                ColumnSource::EventTime => Slot::EventTime,
                ColumnSource::Json => Slot::Json,
                _ => Slot::Const,
            })
            .collect();
        let steps = plan
            .fields
            .iter()
            .map(|f| {
                let role = match f.slot {
                    Some(s) if s == plan.id_slot => Role::Id,
                    Some(s) if s == plan.time_slot => Role::Time,
                    _ => Role::Plain,
                };
                let slot = f.slot.and_then(|s| field_slots.get(s).copied().flatten());
                compile_step(f, slot, role)
            })
            .collect();
        Self {
            plan,
            ctx,
            batch_rows,
            steps,
            slots,
            b,
            rows_in_batch: 0,
            batch_first_record: 0,
            dropped_in_batch: Vec::new(),
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
        let plan = self.plan;
        let has_json = self.slots.contains(&Slot::Json);
        let generic = plan.table.generic;
        let limits = container.limits();
        let mut file_budget = FileBudget::new(limits);
        let mut batch_bytes = 0usize;
        for block in container.blocks() {
            let block = block?;
            self.stats.blocks += 1;
            let mut c = Cursor::new(&block.data);
            for _ in 0..block.count {
                let record = self.stats.events_in;
                self.stats.events_in += 1;
                let row_start = c.pos;
                let start_budget = file_budget.record();
                let mut budget = start_budget;
                let mut sinks = RowSink {
                    b: &mut self.b,
                    seen_ids: &mut self.seen_ids,
                    json_buf: &mut self.json_buf,
                    row_json: &mut self.row_json,
                    budget: &mut budget,
                };
                let info =
                    decode_row(&self.steps, plan, &mut c, &mut sinks).map_err(|e| match e {
                        RowError::Datum(fi, error) => NormalizeError::Datum {
                            block: block.index,
                            record,
                            field: plan
                                .fields
                                .get(fi)
                                .map(|f| f.name.clone())
                                .unwrap_or_default(),
                            error,
                        },
                        RowError::Time(time) => NormalizeError::TimeOutOfRange { record, time },
                    })?;
                file_budget.charge(&start_budget, &budget);
                if self.row_json.len() as u64 > limits.max_record_json_bytes {
                    return Err(NormalizeError::Datum {
                        block: block.index,
                        record,
                        field: if generic { "event" } else { "extra" }.to_string(),
                        error: DatumError::OverLimit {
                            what: "rendered JSON bytes of one record",
                            limit: limits.max_record_json_bytes,
                        },
                    });
                }
                batch_bytes = batch_bytes
                    .saturating_add(c.pos - row_start)
                    .saturating_add(
                        start_budget.bytes_left.saturating_sub(budget.bytes_left) as usize
                    )
                    .saturating_add(self.row_json.len());
                if has_json {
                    if info.json_fields > 0 {
                        self.row_json.push('}');
                        self.b.json.append_value(&self.row_json);
                    } else if generic {
                        self.b.json.append_value("{}");
                    } else {
                        self.b.json.append_null();
                    }
                }
                if info.duplicate {
                    self.stats.duplicates_dropped += 1;
                    self.dropped_in_batch.push(self.rows_in_batch);
                } else {
                    self.stats.rows_out += 1;
                }
                self.rows_in_batch += 1;
                if (self.rows_in_batch == self.batch_rows || batch_bytes >= MAX_BATCH_BYTES)
                    && let Some(batch) = self.finish_batch()?
                {
                    sink(batch).map_err(NormalizeError::Sink)?;
                }
                if self.rows_in_batch == 0 {
                    batch_bytes = 0;
                }
            }
            if c.remaining() != 0 {
                return Err(NormalizeError::TrailingBytes {
                    block: block.index,
                    records: block.count,
                    bytes: c.remaining(),
                });
            }
        }
        if self.rows_in_batch > 0
            && let Some(batch) = self.finish_batch()?
        {
            sink(batch).map_err(NormalizeError::Sink)?;
        }
        Ok(self.stats)
    }

    /// Checks a string column's bytes are UTF-8 (once for the whole batch) and makes it a
    /// string array; names the first bad record when they are not.
    fn strings(
        &self,
        b: &mut BinaryBuilder,
        column: &str,
        rows: usize,
    ) -> Result<ArrayRef, NormalizeError> {
        let binary = b.finish();
        let used = binary.value_data().len();
        // Size the next batch's buffer from this one's, so it never regrows.
        *b = BinaryBuilder::with_capacity(rows, used + used / 8 + 64);
        match StringArray::try_from_binary(binary.clone()) {
            Ok(a) => Ok(Arc::new(a)),
            Err(_) => {
                let row = (0..binary.len())
                    .find(|i| std::str::from_utf8(binary.value(*i)).is_err())
                    .unwrap_or(0);
                Err(NormalizeError::Datum {
                    block: self.stats.blocks.saturating_sub(1),
                    record: self.batch_first_record + row as u64,
                    field: column.to_string(),
                    error: DatumError::BadUtf8,
                })
            }
        }
    }

    /// Finishes the current batch (without its duplicate rows); `None` when every row of it
    /// was a duplicate.
    fn finish_batch(&mut self) -> Result<Option<RecordBatch>, NormalizeError> {
        let n = self.rows_in_batch;
        self.rows_in_batch = 0;
        let table = self.plan.table.clone();
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(table.columns.len());
        let mut b = std::mem::take(&mut self.b);
        for (col, slot) in table.columns.iter().zip(self.slots.iter()) {
            let array: ArrayRef = match *slot {
                Slot::Str(i) => self.strings(&mut b.strs[i], &col.name, self.batch_rows)?,
                Slot::Json => self.strings(&mut b.json, &col.name, self.batch_rows)?,
                Slot::Int(i) => Arc::new(b.ints[i].finish()),
                Slot::Float(i) => Arc::new(b.floats[i].finish()),
                Slot::Bool(i) => Arc::new(b.bools[i].finish()),
                Slot::EventTime => Arc::new(b.event_time.finish().with_timezone("UTC")),
                Slot::Absent => arrow_array::new_null_array(&col.data_type, n),
                Slot::Const => self.constant(&table, col, n)?,
            };
            arrays.push(array);
        }
        self.b = b;
        self.batch_first_record = self.stats.events_in;
        let batch = RecordBatch::try_new(table.schema.clone(), arrays)
            .map_err(|e| NormalizeError::Sink(e.to_string()))?;
        if self.dropped_in_batch.is_empty() {
            return Ok(Some(batch));
        }
        let mut keep = vec![true; n];
        for &row in &self.dropped_in_batch {
            if let Some(k) = keep.get_mut(row) {
                *k = false;
            }
        }
        self.dropped_in_batch.clear();
        if keep.iter().all(|k| !k) {
            return Ok(None);
        }
        let mask = arrow_array::BooleanArray::from(keep);
        arrow_select::filter::filter_record_batch(&batch, &mask)
            .map(Some)
            .map_err(|e| NormalizeError::Sink(e.to_string()))
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
}
