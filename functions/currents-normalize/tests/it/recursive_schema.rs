//! A writer schema with a recursive named type is valid Avro: such files are decoded, the
//! recursive field's value rendered as JSON, nested at most 64 deep.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use apache_avro::types::Value;
use apache_avro::{Codec, Schema, Writer};
use arrow_array::RecordBatch;
use arrow_array::cast::AsArray;
use currents_normalize::container::{Container, Limits};
use currents_normalize::normalize::{FileContext, NormalizeError, Normalizer, Plan};
use currents_normalize::registry::Registry;
use currents_normalize::schema::WriterSchema;

const SCHEMA: &str = r#"{"type":"record","name":"Thing","namespace":"dataexport.prod.inner.users.future",
 "fields":[{"name":"id","type":"string"},{"name":"time","type":"long"},
           {"name":"chain","type":{"type":"record","name":"Link","fields":[
               {"name":"v","type":"int"},
               {"name":"tags","type":{"type":"array","items":"string"}},
               {"name":"next","type":["null","Link"]}]}},
           {"name":"after","type":["null","string"]}]}"#;

fn chain(depth: usize) -> Value {
    let mut v = Value::Union(0, Box::new(Value::Null));
    for i in (0..depth).rev() {
        let link = Value::Record(vec![
            ("v".into(), Value::Int(i as i32)),
            (
                "tags".into(),
                Value::Array(vec![Value::String(format!("t{i}"))]),
            ),
            ("next".into(), v),
        ]);
        if i == 0 {
            return link;
        }
        v = Value::Union(1, Box::new(link));
    }
    v
}

fn file(depth: usize) -> Vec<u8> {
    let schema = Schema::parse_str(SCHEMA).unwrap();
    let mut w = Writer::with_codec(&schema, Vec::new(), Codec::Null).unwrap();
    for id in ["a", "b"] {
        w.append_value(Value::Record(vec![
            ("id".into(), Value::String(id.into())),
            ("time".into(), Value::Long(1_764_410_400)),
            ("chain".into(), chain(depth)),
            (
                "after".into(),
                Value::Union(1, Box::new(Value::String("z".into()))),
            ),
        ]))
        .unwrap();
    }
    w.into_inner().unwrap()
}

fn run(bytes: &[u8]) -> Result<Vec<RecordBatch>, NormalizeError> {
    let registry = Registry::builtin().unwrap();
    let c = Container::open(bytes, Limits::default())?;
    let plan = Plan::new(
        WriterSchema::parse(c.schema_json)?,
        "users.future.Thing",
        &registry,
    )?;
    let ctx = FileContext {
        event_type: "users.future.Thing".into(),
        source_key: "currents/k.avro".into(),
        delivery_hour_micros: 0,
        schema_id: None,
        schema_version: None,
    };
    let mut out = Vec::new();
    Normalizer::new(&plan, ctx, 64, 10).run(&c, |b| {
        out.push(b);
        Ok(())
    })?;
    Ok(out)
}

#[test]
fn a_recursive_field_is_decoded_and_rendered_as_json() {
    let batches = run(&file(3)).unwrap();
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(rows, 2);
    let b = &batches[0];
    let event = b.column_by_name("event").unwrap().as_string::<i32>();
    assert_eq!(
        event.value(0),
        r#"{"id":"a","time":1764410400,"chain":{"v":0,"tags":["t0"],"next":{"v":1,"tags":["t1"],"next":{"v":2,"tags":["t2"],"next":null}}},"after":"z"}"#
    );
    let ids = b.column_by_name("id").unwrap().as_string::<i32>();
    assert_eq!(ids.value(0), "a");
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

/// The file of [`file`], with a chain `depth` links long, written byte by byte (the Avro
/// writer recurses too deep for a test thread's stack at this depth).
fn deep_file(depth: usize) -> Vec<u8> {
    let mut data = Vec::new();
    zigzag(&mut data, 1);
    data.push(b'a');
    zigzag(&mut data, 1_764_410_400);
    for i in 0..depth {
        zigzag(&mut data, i as i64);
        zigzag(&mut data, 0);
        zigzag(&mut data, if i + 1 < depth { 1 } else { 0 });
    }
    zigzag(&mut data, 0);
    let mut f = file(1);
    // Replace the two records of `file(1)` by this one: header up to the first block.
    let sync = f[f.len() - 16..].to_vec();
    let at = Container::open(&f, Limits::default())
        .unwrap()
        .blocks()
        .next()
        .unwrap()
        .unwrap()
        .offset;
    f.truncate(at);
    zigzag(&mut f, 1);
    zigzag(&mut f, data.len() as i64);
    f.extend_from_slice(&data);
    f.extend_from_slice(&sync);
    f
}

#[test]
fn recursion_deeper_than_the_bound_is_refused_naming_the_field() {
    let err = run(&deep_file(80)).unwrap_err().to_string();
    assert!(
        err.contains("record 0, field chain.next.next.next"),
        "{err}"
    );
    assert!(err.ends_with("value nested too deep"), "{err}");
}
