//! Hostile and broken records, as a new user meets them in a quarantine reason: each message
//! names the fault and the field (or the block), and a record of millions of `null` items is
//! refused at the item limit without being decoded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use currents_normalize::container::{Limits, MAGIC};
use currents_normalize::convert::{ConvertError, ConvertOptions, Converted, convert};
use currents_normalize::key;
use currents_normalize::registry::Registry;

const KEY: &str = "currents/dataexport.prod-01.S3.integration.5f0c/event_type=users.future.Thing/date=2026-11-29-10/421/zone-a/x+0+0000000001.avro";

const SCHEMA: &str = r#"{"type":"record","name":"Thing","namespace":"dataexport.prod-01.inner.users.future",
 "fields":[{"name":"id","type":"string"},{"name":"time","type":"long"},
           {"name":"kind","type":["null","string"]},
           {"name":"nulls","type":{"type":"array","items":"null"}}]}"#;

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

fn avro_str(out: &mut Vec<u8>, s: &[u8]) {
    zigzag(out, s.len() as i64);
    out.extend_from_slice(s);
}

/// One record: `id`, `time`, `kind` = branch `kind_branch` ("k" when 1), `nulls` items.
fn record(out: &mut Vec<u8>, id: &[u8], kind_branch: i64, nulls: &[i64]) {
    avro_str(out, id);
    zigzag(out, 1_764_410_400);
    zigzag(out, kind_branch);
    if kind_branch == 1 {
        avro_str(out, b"k");
    }
    for n in nulls {
        zigzag(out, *n);
    }
    zigzag(out, 0);
}

/// A container of one block of `count` records whose bytes are `data`.
fn container(count: i64, data: &[u8]) -> Vec<u8> {
    let mut f = MAGIC.to_vec();
    zigzag(&mut f, 1);
    avro_str(&mut f, b"avro.schema");
    avro_str(&mut f, SCHEMA.as_bytes());
    zigzag(&mut f, 0);
    f.extend_from_slice(&[9u8; 16]);
    zigzag(&mut f, count);
    zigzag(&mut f, data.len() as i64);
    f.extend_from_slice(data);
    f.extend_from_slice(&[9u8; 16]);
    f
}

fn run(bytes: &[u8], limits: Limits) -> Result<Converted, ConvertError> {
    let registry = Registry::builtin().unwrap();
    let opts = ConvertOptions {
        limits,
        spool_dir: None,
        ..Default::default()
    };
    convert(bytes, KEY, &key::parse(KEY).unwrap(), &registry, &opts)
}

fn reason(bytes: &[u8]) -> String {
    run(bytes, Limits::default()).unwrap_err().to_string()
}

#[test]
fn sound_records_convert() {
    let mut data = Vec::new();
    record(&mut data, b"a", 1, &[3]);
    record(&mut data, b"b", 0, &[]);
    let c = run(&container(2, &data), Limits::default()).unwrap();
    assert_eq!(c.stats.rows_out, 2);
}

#[test]
fn an_id_that_is_not_utf8_is_named_with_its_field_and_record() {
    let mut data = Vec::new();
    record(&mut data, b"a", 0, &[]);
    record(&mut data, b"b\xff\xfe", 0, &[]);
    let r = reason(&container(2, &data));
    assert!(r.contains("record 1, field id:"), "{r}");
    assert!(
        r.contains("string is not valid UTF-8 (invalid byte at position 1 of its 3 bytes)"),
        "{r}"
    );
}

#[test]
fn a_union_index_out_of_range_is_named_with_its_field() {
    let mut data = Vec::new();
    record(&mut data, b"a", 5, &[]);
    let r = reason(&container(1, &data));
    assert!(
        r.contains(
            "record 0, field kind: union branch index 5 is out of range (the union has 2 branches)"
        ),
        "{r}"
    );
}

#[test]
fn a_block_whose_record_count_lies_is_named_as_such() {
    let mut data = Vec::new();
    record(&mut data, b"a", 0, &[]);
    record(&mut data, b"b", 0, &[]);
    let r = reason(&container(5, &data));
    assert!(
        r.contains("claims 5 records but its data ends after 2"),
        "{r}"
    );
}

#[test]
fn a_string_length_of_two_to_the_62_is_named_with_its_field() {
    let mut data = Vec::new();
    zigzag(&mut data, 1 << 62);
    data.extend_from_slice(b"abcdefgh");
    zigzag(&mut data, 1);
    zigzag(&mut data, 0);
    zigzag(&mut data, 0);
    let r = reason(&container(1, &data));
    assert!(
        r.contains("record 0, field id: length 4611686018427387904 runs past the end of the data (11 bytes left)"),
        "{r}"
    );
}

#[test]
fn a_value_cut_short_names_the_field_it_ends_in() {
    let mut data = Vec::new();
    record(&mut data, b"a", 0, &[]);
    let whole = data.len();
    record(&mut data, b"bcd", 1, &[]);
    data.truncate(whole + 11);
    let r = reason(&container(2, &data));
    assert!(
        r.contains("record 1, field kind: length 1 runs past the end of the data (0 bytes left)"),
        "{r}"
    );
}

#[test]
fn millions_of_null_items_are_refused_at_the_first_record_over_the_item_limit() {
    // 30 million nulls in record 1, a few bytes of input: refused when its items are counted,
    // before any decoder builds them (building them would take many seconds and ~GBs).
    let mut data = Vec::new();
    record(&mut data, b"a", 0, &[10]);
    record(&mut data, b"b", 0, &[10_000_000, 10_000_000, 10_000_000]);
    record(&mut data, b"c", 0, &[]);
    let limits = Limits {
        max_record_items: 1_000,
        ..Limits::default()
    };
    let r = run(&container(3, &data), limits).unwrap_err().to_string();
    assert!(
        r.contains("record 1, field nulls: array/map items in one record over the limit of 1000"),
        "{r}"
    );
    // And against the file's limit, the record that takes the file over it is named.
    let limits = Limits {
        max_file_items: 15,
        ..Limits::default()
    };
    let mut data = Vec::new();
    record(&mut data, b"a", 0, &[10]);
    record(&mut data, b"b", 0, &[3_000_000]);
    let r = run(&container(2, &data), limits).unwrap_err().to_string();
    assert!(
        r.contains("record 1, field nulls: array/map items in the file over the limit of 15"),
        "{r}"
    );
}
