//! A decoder of flat records (every field a boolean, int, long, float, double, string, bytes
//! or array of strings (or of strings or nulls), or a union of one of them with null), the
//! shape of every Currents event. It
//! reads each record's fields straight into Arrow builders sized from the previous batch, and
//! gives the very batches `arrow-avro`'s datum decoder gives for the same bytes (same schema,
//! same values, the same reading of varints, lengths and union branches). A record it cannot
//! read whole is left untouched for `arrow-avro`, which then decodes the rest of the file and
//! names the fault as before.

use std::sync::Arc;

use arrow_array::builder::{
    ArrayBuilder, BinaryBuilder, BooleanBuilder, Float32Builder, Float64Builder, Int32Builder,
    Int64Builder, ListBuilder,
};
use arrow_array::cast::AsArray;
use arrow_array::{ArrayRef, BinaryArray, ListArray, RecordBatch, StringArray};
use arrow_schema::{ArrowError, DataType, FieldRef, SchemaRef};

use crate::schema::{Node, WriterSchema};

/// The Avro type of a flat field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Boolean,
    Int,
    Long,
    Float,
    Double,
    String,
    Bytes,
    /// An array of strings; its items are a union of string and null when this is `Some`.
    Strings(Option<NullBranch>),
}

/// Where a union of `a` and `b` has its `null` branch, and the other branch.
fn null_union<'s>(schema: &'s WriterSchema, node: &Node) -> Option<(NullBranch, &'s Node)> {
    let Node::Union(branches) = node else {
        return None;
    };
    let [a, b] = branches.as_slice() else {
        return None;
    };
    match (schema.node(*a), schema.node(*b)) {
        (Node::Null, Node::Null) => None,
        (Node::Null, n) => Some((NullBranch::First, n)),
        (n, Node::Null) => Some((NullBranch::Second, n)),
        _ => None,
    }
}

impl Kind {
    fn of(schema: &WriterSchema, node: &Node) -> Option<Self> {
        Some(match node {
            Node::Array(item) => match schema.node(*item) {
                Node::String => Kind::Strings(None),
                n => match null_union(schema, n)? {
                    (at, Node::String) => Kind::Strings(Some(at)),
                    _ => return None,
                },
            },
            Node::Boolean => Kind::Boolean,
            Node::Int => Kind::Int,
            Node::Long => Kind::Long,
            Node::Float => Kind::Float,
            Node::Double => Kind::Double,
            Node::String => Kind::String,
            Node::Bytes => Kind::Bytes,
            _ => return None,
        })
    }

    /// True when `dt` is the Arrow type `arrow-avro` gives this Avro type (no logical type).
    fn fits(self, dt: &DataType) -> bool {
        match (self, dt) {
            (Kind::Boolean, DataType::Boolean)
            | (Kind::Int, DataType::Int32)
            | (Kind::Long, DataType::Int64)
            | (Kind::Float, DataType::Float32)
            | (Kind::Double, DataType::Float64)
            | (Kind::String, DataType::Utf8)
            | (Kind::Bytes, DataType::Binary) => true,
            (Kind::Strings(null), DataType::List(item)) => {
                *item.data_type() == DataType::Utf8 && item.is_nullable() == null.is_some()
            }
            _ => false,
        }
    }
}

/// Where a nullable field's `null` branch is in its union.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NullBranch {
    First,
    Second,
}

/// How a writer schema's records are laid out, when they are flat.
#[derive(Debug, Clone)]
pub(super) struct FlatLayout {
    /// The schema of `arrow-avro`'s batches for this writer schema.
    schema: SchemaRef,
    fields: Vec<(Kind, Option<NullBranch>)>,
}

impl FlatLayout {
    /// The layout of `schema`'s records when every field is flat and `arrow` (the schema of
    /// `arrow-avro`'s batches for it) holds exactly the plain Arrow type of each field (no
    /// logical type); `None` otherwise.
    pub(super) fn of(schema: &WriterSchema, arrow: SchemaRef) -> Option<Self> {
        let (_, fields) = schema.record().ok()?;
        if fields.len() != arrow.fields().len() {
            return None;
        }
        let mut layout = Vec::with_capacity(fields.len());
        for ((_, node), field) in fields.iter().zip(arrow.fields()) {
            let (kind, null) = match schema.node(*node) {
                n @ Node::Union(_) => {
                    let (at, n) = null_union(schema, n)?;
                    (Kind::of(schema, n)?, Some(at))
                }
                n => (Kind::of(schema, n)?, None),
            };
            if !kind.fits(field.data_type()) || field.is_nullable() != null.is_some() {
                return None;
            }
            layout.push((kind, null));
        }
        Some(Self {
            schema: arrow,
            fields: layout,
        })
    }
}

/// One field's values of the current batch.
enum Column {
    Boolean(BooleanBuilder),
    Int(Int32Builder),
    Long(Int64Builder),
    Float(Float32Builder),
    Double(Float64Builder),
    /// Strings, kept as bytes and checked as UTF-8 once per batch (as `arrow-avro` does).
    String(BinaryBuilder),
    Bytes(BinaryBuilder),
    /// Arrays of strings (kept as bytes too), and the item field of `arrow-avro`'s schema.
    Strings(ListBuilder<BinaryBuilder>, FieldRef),
}

fn strings_builder(rows: usize, items: usize, bytes: usize) -> ListBuilder<BinaryBuilder> {
    ListBuilder::with_capacity(BinaryBuilder::with_capacity(items, bytes), rows)
}

impl Column {
    fn new(kind: Kind, field: &DataType, rows: usize, bytes: usize) -> Self {
        match kind {
            Kind::Strings(_) => match field {
                DataType::List(item) => {
                    Column::Strings(strings_builder(rows, rows, bytes), item.clone())
                }
                _ => Column::Bytes(BinaryBuilder::with_capacity(rows, bytes)),
            },
            Kind::Boolean => Column::Boolean(BooleanBuilder::with_capacity(rows)),
            Kind::Int => Column::Int(Int32Builder::with_capacity(rows)),
            Kind::Long => Column::Long(Int64Builder::with_capacity(rows)),
            Kind::Float => Column::Float(Float32Builder::with_capacity(rows)),
            Kind::Double => Column::Double(Float64Builder::with_capacity(rows)),
            Kind::String => Column::String(BinaryBuilder::with_capacity(rows, bytes)),
            Kind::Bytes => Column::Bytes(BinaryBuilder::with_capacity(rows, bytes)),
        }
    }

    /// Appends `value`; a list takes its items from `items`.
    fn append(&mut self, value: Value, data: &[u8], items: &mut std::slice::Iter<'_, Value>) {
        match (self, value) {
            (Column::Strings(b, _), Value::List(n)) => {
                for item in items.take(n) {
                    match *item {
                        Value::Bytes(start, end) => b
                            .values()
                            .append_value(data.get(start..end).unwrap_or_default()),
                        _ => b.values().append_null(),
                    }
                }
                b.append(true);
            }
            (Column::Strings(b, _), _) => b.append(false),
            (Column::Boolean(b), Value::Boolean(v)) => b.append_value(v),
            (Column::Int(b), Value::Int(v)) => b.append_value(v),
            (Column::Long(b), Value::Long(v)) => b.append_value(v),
            (Column::Float(b), Value::Float(v)) => b.append_value(v),
            (Column::Double(b), Value::Double(v)) => b.append_value(v),
            (Column::String(b) | Column::Bytes(b), Value::Bytes(start, end)) => {
                b.append_value(data.get(start..end).unwrap_or_default())
            }
            (Column::Boolean(b), _) => b.append_null(),
            (Column::Int(b), _) => b.append_null(),
            (Column::Long(b), _) => b.append_null(),
            (Column::Float(b), _) => b.append_null(),
            (Column::Double(b), _) => b.append_null(),
            (Column::String(b) | Column::Bytes(b), _) => b.append_null(),
        }
    }

    /// The batch's array, and a new column sized like it for the next batch.
    fn finish(&mut self, kind: Kind) -> Result<ArrayRef, ArrowError> {
        Ok(match self {
            Column::Boolean(b) => {
                let rows = b.len();
                Arc::new(std::mem::replace(b, BooleanBuilder::with_capacity(rows)).finish())
            }
            Column::Int(b) => {
                let rows = b.len();
                Arc::new(std::mem::replace(b, Int32Builder::with_capacity(rows)).finish())
            }
            Column::Long(b) => {
                let rows = b.len();
                Arc::new(std::mem::replace(b, Int64Builder::with_capacity(rows)).finish())
            }
            Column::Float(b) => {
                let rows = b.len();
                Arc::new(std::mem::replace(b, Float32Builder::with_capacity(rows)).finish())
            }
            Column::Double(b) => {
                let rows = b.len();
                Arc::new(std::mem::replace(b, Float64Builder::with_capacity(rows)).finish())
            }
            Column::String(b) | Column::Bytes(b) => {
                let rows = b.len();
                let bytes = b.values_slice().len();
                let array: BinaryArray =
                    std::mem::replace(b, BinaryBuilder::with_capacity(rows, bytes + bytes / 8))
                        .finish();
                if kind == Kind::String {
                    Arc::new(StringArray::try_from_binary(array)?)
                } else {
                    Arc::new(array)
                }
            }
            Column::Strings(b, item) => {
                let rows = b.len();
                let bytes = b.values_ref().values_slice().len();
                let items = b.values_ref().len();
                let next = strings_builder(rows, items, bytes + bytes / 8);
                let list = std::mem::replace(b, next).finish();
                let (_, offsets, values, nulls) = list.into_parts();
                let values = StringArray::try_from_binary(values.as_binary::<i32>().clone())?;
                Arc::new(ListArray::try_new(
                    item.clone(),
                    offsets,
                    Arc::new(values),
                    nulls,
                )?)
            }
        })
    }
}

/// One field of a record as read, before it is appended.
#[derive(Debug, Clone, Copy)]
enum Value {
    Null,
    Boolean(bool),
    Int(i32),
    Long(i64),
    Float(f32),
    Double(f64),
    /// A string's or bytes' range in the record's data.
    Bytes(usize, usize),
    /// An array of this many items (read into the decoder's `items`).
    List(usize),
}

/// Reads an Avro varint as `arrow-avro` does: at most 10 bytes, the tenth below 2.
#[inline]
fn varint(data: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let b = *data.get(*pos + i)?;
        if i == 9 {
            if b >= 2 {
                return None;
            }
            *pos += 10;
            return Some(value | (u64::from(b) << 63));
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            *pos += i + 1;
            return Some(value);
        }
    }
    None
}

#[inline]
fn zigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

#[inline]
fn take<const N: usize>(data: &[u8], pos: &mut usize) -> Option<[u8; N]> {
    let bytes: [u8; N] = data.get(*pos..pos.checked_add(N)?)?.try_into().ok()?;
    *pos += N;
    Some(bytes)
}

/// Reads the blocks of an array of strings at `pos` as `arrow-avro` does (a negative count is
/// followed by the block's size, which must not be negative; at most `i32::MAX` items), its
/// items into `items`; returns the item count.
fn read_strings(
    null: Option<NullBranch>,
    data: &[u8],
    pos: &mut usize,
    items: &mut Vec<Value>,
) -> Option<usize> {
    let mut total = 0usize;
    loop {
        let count = zigzag(varint(data, pos)?);
        let n = match count {
            0 => return Some(total),
            c if c < 0 => {
                if zigzag(varint(data, pos)?) < 0 {
                    return None;
                }
                usize::try_from(c.unsigned_abs()).ok()?
            }
            c => usize::try_from(c).ok()?,
        };
        total = total.checked_add(n).filter(|t| i32::try_from(*t).is_ok())?;
        // Every item takes at least one byte: the loop ends with the data.
        for _ in 0..n {
            let item = match null {
                Some(at) if (varint(data, pos)? == 0) == (at == NullBranch::First) => Value::Null,
                _ => read(Kind::String, data, pos, items)?,
            };
            items.push(item);
        }
    }
}

/// Reads one value of `kind` at `pos` (an array's items into `items`).
#[inline]
fn read(kind: Kind, data: &[u8], pos: &mut usize, items: &mut Vec<Value>) -> Option<Value> {
    Some(match kind {
        Kind::Boolean => {
            let b = *data.get(*pos)?;
            *pos += 1;
            Value::Boolean(b != 0)
        }
        Kind::Int => {
            let v = u32::try_from(varint(data, pos)?).ok()?;
            Value::Int((v >> 1) as i32 ^ -((v & 1) as i32))
        }
        Kind::Long => Value::Long(zigzag(varint(data, pos)?)),
        Kind::Float => Value::Float(f32::from_le_bytes(take(data, pos)?)),
        Kind::Double => Value::Double(f64::from_le_bytes(take(data, pos)?)),
        Kind::String | Kind::Bytes => {
            let len = usize::try_from(zigzag(varint(data, pos)?)).ok()?;
            let start = *pos;
            let end = start.checked_add(len)?;
            if end > data.len() {
                return None;
            }
            *pos = end;
            Value::Bytes(start, end)
        }
        Kind::Strings(null) => Value::List(read_strings(null, data, pos, items)?),
    })
}

/// Decodes flat records into record batches of `arrow-avro`'s schema for them.
pub(super) struct FlatDecoder {
    layout: FlatLayout,
    columns: Vec<Column>,
    /// The record being read, field by field, before any of it is appended.
    values: Vec<Value>,
    /// The items of its arrays.
    items: Vec<Value>,
    rows: usize,
    batch_rows: usize,
}

/// Bytes a string column is first sized for, per row.
const FIRST_BYTES_PER_ROW: usize = 32;

impl FlatDecoder {
    /// A decoder of `layout`'s records, `batch_rows` to a batch; `expected_rows` sizes the
    /// first batch.
    pub(super) fn new(layout: &FlatLayout, batch_rows: usize, expected_rows: usize) -> Self {
        let batch_rows = batch_rows.max(1);
        let rows = batch_rows.min(expected_rows.max(1));
        Self {
            columns: layout
                .fields
                .iter()
                .zip(layout.schema.fields())
                .map(|((kind, _), f)| {
                    Column::new(*kind, f.data_type(), rows, rows * FIRST_BYTES_PER_ROW)
                })
                .collect(),
            values: Vec::with_capacity(layout.fields.len()),
            items: Vec::new(),
            layout: layout.clone(),
            rows: 0,
            batch_rows,
        }
    }

    /// True when the current batch holds `batch_rows` records.
    pub(super) fn batch_is_full(&self) -> bool {
        self.rows >= self.batch_rows
    }

    /// Reads the record at the start of `data` into the batch and returns its length;
    /// `None` (and nothing appended) when it cannot be read whole here, or the batch is full.
    pub(super) fn decode(&mut self, data: &[u8]) -> Option<usize> {
        if self.batch_is_full() {
            return None;
        }
        self.values.clear();
        self.items.clear();
        let mut pos = 0usize;
        for (kind, null) in &self.layout.fields {
            let value = match null {
                None => read(*kind, data, &mut pos, &mut self.items)?,
                Some(at) => {
                    // The branch as `arrow-avro` reads it: the raw varint, 0 or not.
                    let first = varint(data, &mut pos)? == 0;
                    if first == (*at == NullBranch::First) {
                        Value::Null
                    } else {
                        read(*kind, data, &mut pos, &mut self.items)?
                    }
                }
            };
            self.values.push(value);
        }
        let mut items = self.items.iter();
        for (column, value) in self.columns.iter_mut().zip(&self.values) {
            column.append(*value, data, &mut items);
        }
        self.rows += 1;
        Some(pos)
    }

    /// The current batch (`None` when it is empty); an error when a string is not UTF-8.
    pub(super) fn flush(&mut self) -> Result<Option<RecordBatch>, ArrowError> {
        if self.rows == 0 {
            return Ok(None);
        }
        self.rows = 0;
        let arrays = self
            .columns
            .iter_mut()
            .zip(&self.layout.fields)
            .map(|(c, (kind, _))| c.finish(*kind))
            .collect::<Result<Vec<_>, _>>()?;
        RecordBatch::try_new(self.layout.schema.clone(), arrays).map(Some)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::container::{Container, Limits};
    use crate::normalize::datum_decoder;
    use crate::registry::Registry;
    use crate::synth::{self, FileSpec};
    use apache_avro::Codec;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn layout_of(schema: &WriterSchema) -> Option<FlatLayout> {
        let arrow = datum_decoder(schema, 1).unwrap().schema();
        FlatLayout::of(schema, arrow)
    }

    /// Every record of a generated file of every flat registry table decodes to the same
    /// batches here and in `arrow-avro`.
    #[test]
    fn flat_records_decode_as_arrow_avro_decodes_them() {
        let registry = Registry::builtin().unwrap();
        let mut flat_tables = 0;
        for entry in registry.entries() {
            let bytes = synth::file(
                entry,
                &FileSpec {
                    events: 300,
                    duplicates: 3,
                    seed: 5,
                    codec: Codec::Null,
                },
            )
            .unwrap();
            let c = Container::open(&bytes, Limits::default()).unwrap();
            let schema = WriterSchema::parse(c.schema_json).unwrap();
            let Some(layout) = layout_of(&schema) else {
                continue;
            };
            flat_tables += 1;
            let mut flat = FlatDecoder::new(&layout, 128, 300);
            let mut theirs = datum_decoder(&schema, 128).unwrap();
            for block in c.blocks() {
                let block = block.unwrap();
                let mut pos = 0;
                for _ in 0..block.count {
                    let rest = &block.data[pos..];
                    let n = flat.decode(rest).expect("flat record");
                    assert_eq!(theirs.decode(rest).unwrap(), n);
                    pos += n;
                    if flat.batch_is_full() {
                        assert!(theirs.batch_is_full());
                        assert_eq!(flat.flush().unwrap(), theirs.flush().unwrap());
                    }
                }
            }
            assert_eq!(flat.flush().unwrap(), theirs.flush().unwrap());
        }
        assert_eq!(flat_tables, registry.entries().len());
    }

    /// Records with bytes changed at random: whatever this decoder reads whole, `arrow-avro`
    /// reads the same way (same length, same values); the rest it leaves to `arrow-avro`.
    #[test]
    fn damaged_records_are_read_as_arrow_avro_reads_them_or_left_to_it() {
        let registry = Registry::builtin().unwrap();
        for event_type in [
            "users.messages.email.Send",
            "users.messages.email.Click",
            "users.messages.sms.InboundReceive",
        ] {
            damaged_records(&registry, event_type);
        }
    }

    fn damaged_records(registry: &Registry, event_type: &str) {
        let entry = registry
            .entries()
            .iter()
            .find(|e| e.event_type == event_type)
            .unwrap();
        let bytes = synth::file(
            entry,
            &FileSpec {
                events: 50,
                duplicates: 0,
                seed: 9,
                codec: Codec::Null,
            },
        )
        .unwrap();
        let c = Container::open(&bytes, Limits::default()).unwrap();
        let schema = WriterSchema::parse(c.schema_json).unwrap();
        let layout = layout_of(&schema).unwrap();
        let data = c.blocks().next().unwrap().unwrap().data.to_vec();
        let mut rng = StdRng::seed_from_u64(1);
        let (mut read, mut left) = (0, 0);
        for _ in 0..3000 {
            let mut d = data.clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..d.len().min(400));
                d[at] = rng.random();
            }
            if rng.random_bool(0.3) {
                d.truncate(rng.random_range(0..=d.len().min(500)));
            }
            let mut flat = FlatDecoder::new(&layout, 1, 1);
            let mut theirs = datum_decoder(&schema, 1).unwrap();
            match flat.decode(&d) {
                Some(n) => {
                    read += 1;
                    assert_eq!(theirs.decode(&d).ok(), Some(n));
                    let ours = flat.flush();
                    let arrow = theirs.flush();
                    assert_eq!(ours.is_ok(), arrow.is_ok(), "{ours:?} / {arrow:?}");
                    if let (Ok(a), Ok(b)) = (ours, arrow) {
                        assert_eq!(a, b);
                    }
                }
                None => {
                    left += 1;
                    assert!(flat.flush().unwrap().is_none(), "nothing appended");
                }
            }
        }
        assert!(read > 100 && left > 100, "read {read}, left {left}");
    }

    #[test]
    fn records_with_other_arrays_wide_unions_or_nulls_are_not_flat() {
        for schema in [
            r#"{"type":"record","name":"R","fields":[{"name":"id","type":"string"},{"name":"a","type":{"type":"array","items":"long"}}]}"#,
            r#"{"type":"record","name":"R","fields":[{"name":"id","type":"string"},{"name":"a","type":{"type":"array","items":["null","long"]}}]}"#,
            r#"{"type":"record","name":"R","fields":[{"name":"id","type":"string"},{"name":"u","type":["null","string","long"]}]}"#,
            r#"{"type":"record","name":"R","fields":[{"name":"id","type":"string"},{"name":"n","type":"null"}]}"#,
        ] {
            let schema = WriterSchema::parse(schema).unwrap();
            assert!(layout_of(&schema).is_none(), "{schema:?}");
        }
        let schema = WriterSchema::parse(
            r#"{"type":"record","name":"R","fields":[{"name":"id","type":"string"},{"name":"n","type":["long","null"]},{"name":"b","type":"bytes"},{"name":"f","type":["null","float"]},{"name":"a","type":["null",{"type":"array","items":["string","null"]}]},{"name":"s","type":{"type":"array","items":"string"}}]}"#,
        )
        .unwrap();
        assert!(layout_of(&schema).is_some());
    }
}
