//! The normalizer over hand-written and generated files: columns, extra fields, duplicates,
//! registry contradictions, limits and the errors that name their record and field.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::container::Limits;
use crate::registry::Registry;
use crate::schema::WriterSchema;
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
    let mut f = crate::container::MAGIC.to_vec();
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
fn a_record_that_does_not_decode_names_its_block_record_field_and_fault() {
    // Two records claimed, the bytes of one and a half.
    let mut data = Vec::new();
    null_array_record(&mut data, "a", 1, 2);
    let whole = data.len();
    null_array_record(&mut data, "b", 1, 2);
    data.truncate(whole + 3);
    let bytes = container(&null_array_schema(), 2, &data);
    let err = run(&bytes, "users.behaviors.Location").unwrap_err();
    assert_eq!(
        err,
        NormalizeError::Datum {
            block: 0,
            record: 1,
            field: "user_id".into(),
            error: DatumError::PastEnd { len: 1, left: 0 },
        }
    );
}

#[test]
fn a_string_that_is_not_utf8_names_its_record_and_field() {
    let mut data = Vec::new();
    null_array_record(&mut data, "a", 0, 0);
    null_array_record(&mut data, "b", 0, 0);
    // The second record's `user_id` ("u") becomes the byte 0xff.
    let at = data.len() - (data.len() / 2) + 3;
    assert_eq!(data[at], b'u');
    data[at] = 0xff;
    let bytes = container(&null_array_schema(), 2, &data);
    let err = run(&bytes, "users.behaviors.Location").unwrap_err();
    assert_eq!(
        err,
        NormalizeError::Datum {
            block: 0,
            record: 1,
            field: "user_id".into(),
            error: DatumError::BadUtf8 { at: 0, len: 1 },
        }
    );
}

#[test]
fn a_panic_in_the_decoder_is_an_error_for_the_file() {
    let r: Result<(), String> = contained(|| panic!("shift overflow"));
    assert_eq!(r.unwrap_err(), "the Avro decoder panicked: shift overflow");
    let r: Result<u8, String> = contained(|| Ok(7));
    assert_eq!(r, Ok(7));
}

/// LOCATION without `brand_new`: every field flat, read by the flat decoder.
fn flat_schema() -> String {
    LOCATION.replace(
        r#",
    {"name":"brand_new","type":["null",{"type":"array","items":"string"}],"default":null}"#,
        "",
    )
}

/// One record of [`flat_schema`].
fn flat_record(out: &mut Vec<u8>, id: &str, altitude: Option<f32>) {
    avro_str(out, id);
    avro_str(out, "u");
    avro_str(out, "app");
    zigzag(out, 2_000_000_000);
    out.extend_from_slice(&2.5f32.to_le_bytes());
    out.extend_from_slice(&(-1.5f32).to_le_bytes());
    match altitude {
        Some(a) => {
            zigzag(out, 1);
            out.extend_from_slice(&a.to_le_bytes());
        }
        None => zigzag(out, 0),
    }
}

#[test]
fn flat_records_become_rows_in_batches() {
    let registry = Registry::builtin().unwrap();
    let mut data = Vec::new();
    for (i, id) in ["a", "b", "c", "a", "d"].into_iter().enumerate() {
        flat_record(&mut data, id, (i % 2 == 1).then_some(i as f32));
    }
    let bytes = container(&flat_schema(), 5, &data);
    let c = Container::open(&bytes, Limits::default()).unwrap();
    let plan = Plan::new(
        WriterSchema::parse(c.schema_json).unwrap(),
        "users.behaviors.Location",
        &registry,
    )
    .unwrap();
    assert!(plan.flat.is_some(), "read by the flat decoder");
    let (out, stats) = run(&bytes, "users.behaviors.Location").unwrap();
    assert_eq!(
        (stats.events_in, stats.rows_out, stats.duplicates_dropped),
        (5, 4, 1)
    );
    assert_eq!(
        out.iter().map(|b| b.num_rows()).collect::<Vec<_>>(),
        [2, 1, 1]
    );
    let ids: Vec<&str> = out
        .iter()
        .flat_map(|b| b.column_by_name("id").unwrap().as_string::<i32>().iter())
        .map(Option::unwrap)
        .collect();
    assert_eq!(ids, ["a", "b", "c", "d"]);
    let altitude: Vec<Option<f64>> = out
        .iter()
        .flat_map(|b| {
            b.column_by_name("altitude")
                .unwrap()
                .as_primitive::<Float64Type>()
                .iter()
        })
        .collect();
    assert_eq!(altitude, [None, Some(1.0), None, None]);
}

#[test]
fn a_flat_record_that_does_not_decode_names_its_record_and_field() {
    // Four records in batches of two; the fourth ends after its `id`. The third, read by the
    // flat decoder, is handed on before `arrow-avro` reads the fourth and fails.
    let mut data = Vec::new();
    for id in ["a", "b", "c", "d"] {
        flat_record(&mut data, id, None);
    }
    let record = data.len() / 4;
    data.truncate(3 * record + 2);
    let bytes = container(&flat_schema(), 4, &data);
    let err = run(&bytes, "users.behaviors.Location").unwrap_err();
    assert!(
        matches!(
            &err,
            NormalizeError::Datum { block: 0, record: 3, field, error: DatumError::Eof }
                if field == "user_id"
        ),
        "{err}"
    );
}

#[test]
fn a_flat_string_that_is_not_utf8_names_its_record_and_field() {
    let mut data = Vec::new();
    for id in ["a", "b", "c"] {
        flat_record(&mut data, id, None);
    }
    // The third record's `user_id` ("u") becomes the byte 0xff.
    let at = 2 * (data.len() / 3) + 3;
    assert_eq!(data[at], b'u');
    data[at] = 0xff;
    let bytes = container(&flat_schema(), 3, &data);
    let err = run(&bytes, "users.behaviors.Location").unwrap_err();
    assert_eq!(
        err,
        NormalizeError::Datum {
            block: 0,
            record: 2,
            field: "user_id".into(),
            error: DatumError::BadUtf8 { at: 0, len: 1 },
        }
    );
}
