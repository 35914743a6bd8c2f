//! The two other Avro paths `currents-bench` measures next to production (our container
//! framing + `arrow-avro` datums with the writer schema): `arrow-avro`'s own container `Reader`
//! and `apache-avro`, each doing the same conversion end to end on the same files: read the object, decode its records
//! with the registry table's schema as the reader schema, build the table's columns (event
//! fields, `event_time`, lineage), drop repeated `id`s, and write the Snappy Parquet part with
//! the same writer settings. `extra` is all null here: the files are written with the
//! registry's own schema, so there are no unknown fields to keep (a reader schema drops them,
//! which is why production decodes with the writer schema instead).

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use arrow_array::builder::{BooleanBuilder, Float64Builder, Int64Builder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{
    Array, ArrayRef, BooleanArray, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow_schema::DataType;
use currents_normalize::convert::ConvertOptions;
use currents_normalize::encode::PartWriter;
use currents_normalize::json;
use currents_normalize::key::{self, CurrentsKey};
use currents_normalize::partition::{PartId, PartLocation};
use currents_normalize::registry::{Column, ColumnSource, Registry, TableDef, TableEntry};

/// One decoder's pass over a set of files.
pub struct PathRun {
    /// Records read.
    pub events: u64,
    /// Rows written.
    pub rows: u64,
    /// Wall time.
    pub seconds: f64,
}

fn table_of<'r>(
    registry: &'r Registry,
    event_type: &str,
) -> anyhow::Result<(&'r Arc<TableDef>, &'r TableEntry)> {
    let table = registry
        .get(event_type)
        .with_context(|| format!("{event_type} not in the registry"))?;
    let entry = registry
        .entries()
        .iter()
        .find(|e| e.event_type == event_type)
        .with_context(|| format!("{event_type} not in the registry"))?;
    Ok((table, entry))
}

/// A lineage column: the same value on every row.
fn constant(table: &TableDef, col: &Column, k: &CurrentsKey, source: &str, n: usize) -> ArrayRef {
    match col.source {
        ColumnSource::SourceKey => Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            source, n,
        ))),
        ColumnSource::EventType => Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            k.event_type.as_str(),
            n,
        ))),
        ColumnSource::DeliveryHour => Arc::new(
            TimestampMicrosecondArray::from(vec![k.delivery.timestamp_micros(); n])
                .with_timezone("UTC"),
        ),
        ColumnSource::SchemaId => Arc::new(Int64Array::from(vec![k.schema_id; n])),
        ColumnSource::SchemaVersion => Arc::new(Int64Array::from(vec![k.schema_version; n])),
        ColumnSource::RegistryVersion => Arc::new(Int32Array::from(vec![table.version as i32; n])),
        _ => arrow_array::new_null_array(&col.data_type, n),
    }
}

fn event_time(time: &ArrayRef) -> anyhow::Result<ArrayRef> {
    let t = arrow_cast::cast(time, &DataType::Int64)?;
    let t = t.as_primitive::<Int64Type>();
    let micros: TimestampMicrosecondArray = t.unary(|v| v.saturating_mul(1_000_000));
    Ok(Arc::new(micros.with_timezone("UTC")))
}

/// Keeps the first row of every `id`.
#[derive(Default)]
struct Dedup(HashSet<u128>);

impl Dedup {
    fn first(&mut self, id: &str) -> bool {
        self.0.insert(xxhash_rust::xxh3::xxh3_128(id.as_bytes()))
    }
}

/// Where the part goes and its writer.
struct Out {
    writer: PartWriter,
    location: PartLocation,
}

fn start(
    table: &TableDef,
    source: &str,
    k: &CurrentsKey,
    opts: &ConvertOptions,
) -> anyhow::Result<Out> {
    let metadata = vec![
        ("currents.source_key".to_string(), source.to_string()),
        ("currents.event_type".to_string(), k.event_type.clone()),
        ("currents.table".to_string(), table.table.clone()),
        (
            "currents.registry_version".to_string(),
            table.version.to_string(),
        ),
    ];
    Ok(Out {
        writer: PartWriter::spooled_after(
            table.schema.clone(),
            metadata,
            opts.row_group_rows,
            opts.spool_dir.as_deref(),
            opts.part_memory_bytes,
        )?,
        location: PartLocation {
            table: table.table.clone(),
            day: k.delivery.day,
            id: PartId::for_source(source),
        },
    })
}

fn finish(out: Out, rows: u64, dir: &Path) -> anyhow::Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let part = out.writer.finish()?;
    let path = dir.join(out.location.key("tables/"));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, part.into_bytes()?)?;
    Ok(())
}

/// A list-of-strings column as JSON text, as the table's JSON columns hold it.
fn list_json(a: &ArrayRef) -> anyhow::Result<ArrayRef> {
    let list = a
        .as_list_opt::<i32>()
        .with_context(|| format!("JSON column of type {}", a.data_type()))?;
    let mut b = StringBuilder::with_capacity(list.len(), list.len() * 16);
    let mut text = String::new();
    for i in 0..list.len() {
        if list.is_null(i) {
            b.append_null();
            continue;
        }
        let items = list.value(i);
        let items = items.as_string::<i32>();
        text.clear();
        text.push('[');
        for j in 0..items.len() {
            if j > 0 {
                text.push(',');
            }
            if items.is_null(j) {
                text.push_str("null");
            } else {
                json::push_str(&mut text, items.value(j));
            }
        }
        text.push(']');
        b.append_value(&text);
    }
    Ok(Arc::new(b.finish()))
}

/// arrow-avro: container → Arrow batches of the reader (registry) schema → table columns.
pub fn run_arrow_avro(
    registry: &Registry,
    inputs: &[(&Path, &str)],
    dir: &Path,
    opts: &ConvertOptions,
) -> anyhow::Result<PathRun> {
    use arrow_avro::reader::ReaderBuilder;
    use arrow_avro::schema::AvroSchema;
    let _ = std::fs::remove_dir_all(dir);
    let started = Instant::now();
    let (mut events, mut rows) = (0u64, 0u64);
    let mut bytes = Vec::new();
    for (path, source) in inputs {
        bytes.clear();
        std::fs::File::open(path)?.read_to_end(&mut bytes)?;
        let k = key::parse(source)?;
        let (table, entry) = table_of(registry, &k.event_type)?;
        let reader_schema = AvroSchema::new(Registry::avro_schema(entry).to_string());
        let reader = ReaderBuilder::new()
            .with_batch_size(opts.batch_rows)
            .with_reader_schema(reader_schema)
            .build(std::io::Cursor::new(&bytes[..]))?;
        let id_at = entry.fields.iter().position(|f| f.name == "id");
        let time_at = entry.fields.iter().position(|f| f.name == "time");
        let (Some(id_at), Some(time_at)) = (id_at, time_at) else {
            anyhow::bail!("{} has no id or time", entry.event_type);
        };
        let mut out = start(table, source, &k, opts)?;
        let mut dedup = Dedup::default();
        let mut file_rows = 0u64;
        for batch in reader {
            let batch = batch?;
            let n = batch.num_rows();
            events += n as u64;
            let ids = batch.column(id_at).as_string::<i32>();
            let keep: BooleanArray = (0..n).map(|i| Some(dedup.first(ids.value(i)))).collect();
            let mut arrays: Vec<ArrayRef> = Vec::with_capacity(table.columns.len());
            for col in &table.columns {
                let a = match col.source {
                    ColumnSource::Field(fi) => {
                        let a = batch.column(fi);
                        if matches!(a.data_type(), DataType::List(_)) {
                            list_json(a)?
                        } else {
                            arrow_cast::cast(a, &col.data_type)?
                        }
                    }
                    ColumnSource::EventTime => event_time(batch.column(time_at))?,
                    _ => constant(table, col, &k, source, n),
                };
                arrays.push(a);
            }
            let rb = RecordBatch::try_new(table.schema.clone(), arrays)?;
            let rb = arrow_select::filter::filter_record_batch(&rb, &keep)?;
            file_rows += rb.num_rows() as u64;
            out.writer.write(&rb)?;
        }
        rows += file_rows;
        finish(out, file_rows, dir)?;
    }
    Ok(PathRun {
        events,
        rows,
        seconds: started.elapsed().as_secs_f64(),
    })
}

enum Builder {
    Str(StringBuilder),
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
}

fn avro_json(v: apache_avro::types::Value) -> anyhow::Result<String> {
    Ok(serde_json::Value::try_from(v)?.to_string())
}

fn push(b: &mut Builder, v: apache_avro::types::Value) -> anyhow::Result<()> {
    use apache_avro::types::Value as V;
    let v = match v {
        V::Union(_, inner) => *inner,
        other => other,
    };
    match (b, v) {
        (Builder::Str(b), V::Null) => b.append_null(),
        (Builder::Int(b), V::Null) => b.append_null(),
        (Builder::Float(b), V::Null) => b.append_null(),
        (Builder::Bool(b), V::Null) => b.append_null(),
        (Builder::Str(b), V::String(s)) => b.append_value(s),
        (Builder::Str(b), V::Enum(_, s)) => b.append_value(s),
        (Builder::Str(b), v @ (V::Array(_) | V::Map(_) | V::Record(_))) => {
            b.append_value(avro_json(v)?)
        }
        (Builder::Int(b), V::Int(i)) => b.append_value(i64::from(i)),
        (Builder::Int(b), V::Long(i)) => b.append_value(i),
        (Builder::Float(b), V::Float(f)) => b.append_value(f64::from(f)),
        (Builder::Float(b), V::Double(f)) => b.append_value(f),
        (Builder::Bool(b), V::Boolean(x)) => b.append_value(x),
        (_, v) => anyhow::bail!("value {v:?} does not fit its column"),
    }
    Ok(())
}

/// apache-avro: container → `Value` records (resolved to the registry schema) → table columns.
pub fn run_apache_avro(
    registry: &Registry,
    inputs: &[(&Path, &str)],
    dir: &Path,
    opts: &ConvertOptions,
) -> anyhow::Result<PathRun> {
    use apache_avro::types::Value as V;
    let _ = std::fs::remove_dir_all(dir);
    let started = Instant::now();
    let (mut events, mut rows) = (0u64, 0u64);
    let mut bytes = Vec::new();
    for (path, source) in inputs {
        bytes.clear();
        std::fs::File::open(path)?.read_to_end(&mut bytes)?;
        let k = key::parse(source)?;
        let (table, entry) = table_of(registry, &k.event_type)?;
        let schema = apache_avro::Schema::parse(&Registry::avro_schema(entry))?;
        let reader = apache_avro::Reader::builder(&bytes[..])
            .reader_schema(&schema)
            .build()?;
        let id_at = entry.fields.iter().position(|f| f.name == "id");
        let time_at = entry.fields.iter().position(|f| f.name == "time");
        let (Some(id_at), Some(time_at)) = (id_at, time_at) else {
            anyhow::bail!("{} has no id or time", entry.event_type);
        };
        let mut out = start(table, source, &k, opts)?;
        let new_builders = || -> Vec<Builder> {
            entry
                .fields
                .iter()
                .map(|f| match f.ty.data_type() {
                    DataType::Int64 => Builder::Int(Int64Builder::new()),
                    DataType::Float64 => Builder::Float(Float64Builder::new()),
                    DataType::Boolean => Builder::Bool(BooleanBuilder::new()),
                    _ => Builder::Str(StringBuilder::new()),
                })
                .collect()
        };
        let mut builders = new_builders();
        let mut times = Int64Builder::new();
        let mut dedup = Dedup::default();
        let mut in_batch = 0usize;
        let mut file_rows = 0u64;
        let flush = |builders: &mut Vec<Builder>,
                     times: &mut Int64Builder,
                     n: usize,
                     out: &mut Out|
         -> anyhow::Result<()> {
            let mut fields: Vec<ArrayRef> = builders
                .iter_mut()
                .map(|b| -> ArrayRef {
                    match b {
                        Builder::Str(b) => Arc::new(b.finish()),
                        Builder::Int(b) => Arc::new(b.finish()),
                        Builder::Float(b) => Arc::new(b.finish()),
                        Builder::Bool(b) => Arc::new(b.finish()),
                    }
                })
                .collect();
            let time: ArrayRef = Arc::new(times.finish());
            let mut arrays = Vec::with_capacity(table.columns.len());
            for col in &table.columns {
                arrays.push(match col.source {
                    ColumnSource::Field(fi) => std::mem::replace(
                        &mut fields[fi],
                        arrow_array::new_null_array(&DataType::Null, 0),
                    ),
                    ColumnSource::EventTime => event_time(&time)?,
                    _ => constant(table, col, &k, source, n),
                });
            }
            out.writer
                .write(&RecordBatch::try_new(table.schema.clone(), arrays)?)?;
            Ok(())
        };
        for value in reader {
            events += 1;
            let V::Record(fields) = value? else {
                anyhow::bail!("not a record");
            };
            let id = match &fields[id_at].1 {
                V::String(s) => s.as_str(),
                other => anyhow::bail!("id is {other:?}"),
            };
            if !dedup.first(id) {
                continue;
            }
            for (i, (name, v)) in fields.into_iter().enumerate() {
                if i == time_at {
                    match &v {
                        V::Int(t) => times.append_value(i64::from(*t)),
                        V::Long(t) => times.append_value(*t),
                        other => anyhow::bail!("time is {other:?}"),
                    }
                }
                let b = builders
                    .get_mut(i)
                    .with_context(|| format!("field {name}"))?;
                push(b, v)?;
            }
            in_batch += 1;
            file_rows += 1;
            if in_batch == opts.batch_rows {
                flush(&mut builders, &mut times, in_batch, &mut out)?;
                in_batch = 0;
            }
        }
        if in_batch > 0 {
            flush(&mut builders, &mut times, in_batch, &mut out)?;
        }
        rows += file_rows;
        finish(out, file_rows, dir)?;
    }
    Ok(PathRun {
        events,
        rows,
        seconds: started.elapsed().as_secs_f64(),
    })
}
