//! Every export shape Amperity can send to S3, made by the test and read back through
//! `read::read_export`: delimited (CSV/TSV/PSV/custom, quotes, embedded newlines, BOM, CRLF),
//! NDJSON, JSON arrays, Parquet (Snappy, gzip, uncompressed), and gzip (multi-member), zip,
//! tar and tgz around them; plus the files that cannot be read at all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use braze_sync::read::{Compression, Format, ReadError, ReadOptions, TextTable, read_all_text};
use flate2::Compression as GzLevel;
use flate2::write::GzEncoder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression as PqCompression, GzipLevel};
use parquet::file::properties::WriterProperties;

const ROWS: [(&str, &str, Option<f64>); 3] = [
    ("1", "Ada, \"the\" Countess", Some(1.5)),
    ("2", "Bob\nSmith", None),
    ("3", "Zoë", Some(-2.0)),
];

fn expected_rows() -> Vec<Vec<Option<String>>> {
    ROWS.iter()
        .map(|(id, name, score)| {
            vec![
                Some(id.to_string()),
                Some(name.to_string()),
                score.map(|s| s.to_string()),
            ]
        })
        .collect()
}

fn delimited(delim: char, crlf: bool, bom: bool) -> Vec<u8> {
    let eol = if crlf { "\r\n" } else { "\n" };
    let mut s = String::new();
    if bom {
        s.push('\u{feff}');
    }
    s.push_str(&format!("id{delim}name{delim}score{eol}"));
    for (id, name, score) in ROWS {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        let score = score.map(|v| v.to_string()).unwrap_or_default();
        s.push_str(&format!("{id}{delim}{quoted}{delim}{score}{eol}"));
    }
    s.into_bytes()
}

fn ndjson() -> Vec<u8> {
    let mut s = String::new();
    for (id, name, score) in ROWS {
        s.push_str(&serde_json::json!({"id": id, "name": name, "score": score}).to_string());
        s.push('\n');
    }
    s.into_bytes()
}

fn json_array() -> Vec<u8> {
    let v: Vec<_> = ROWS
        .iter()
        .map(|(id, name, score)| serde_json::json!({"id": id, "name": name, "score": score}))
        .collect();
    serde_json::to_vec_pretty(&v).unwrap()
}

fn parquet(compression: PqCompression) -> Vec<u8> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, true),
        Field::new("score", DataType::Float64, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(
            ROWS.iter().map(|r| r.0).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            ROWS.iter().map(|r| Some(r.1)).collect::<Vec<_>>(),
        )),
        Arc::new(Float64Array::from(
            ROWS.iter().map(|r| r.2).collect::<Vec<_>>(),
        )),
    ];
    let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
    let props = WriterProperties::builder()
        .set_compression(compression)
        .build();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), GzLevel::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zip(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    w.add_directory("folder/", opts).unwrap();
    for (name, data) in members {
        w.start_file(*name, opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn tar(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn read(data: &[u8], name: &str) -> Vec<TextTable> {
    read_all_text(data, name, &ReadOptions::default()).unwrap()
}

fn read_with(data: &[u8], name: &str, opts: &ReadOptions) -> Result<Vec<TextTable>, ReadError> {
    read_all_text(data, name, opts)
}

fn assert_table(t: &TextTable) {
    assert_eq!(t.header, ["id", "name", "score"], "{}", t.source);
    assert_eq!(t.rows, expected_rows(), "{}", t.source);
    assert!(t.bad.is_empty(), "{}: {:?}", t.source, t.bad);
}

#[test]
fn csv_with_quotes_newlines_bom_and_crlf() {
    let t = read(&delimited(',', true, true), "s3://b/x.csv");
    assert_eq!(t.len(), 1);
    assert_table(&t[0]);
    assert_eq!(t[0].source, "s3://b/x.csv");
}

#[test]
fn tsv_psv_and_custom_delimiter_by_suffix_route_or_sniffing() {
    assert_table(&read(&delimited('\t', false, false), "x.tsv")[0]);
    assert_table(&read(&delimited('|', false, false), "x.psv")[0]);
    // No suffix: the delimiter is sniffed from the header.
    assert_table(&read(&delimited('|', true, false), "s3://b/export")[0]);
    assert_table(&read(&delimited('\t', false, true), "s3://b/export.txt")[0]);
    // A custom delimiter declared by the route.
    let opts = ReadOptions {
        format: Some(Format::Delimited {
            delimiter: b'^',
            escape: None,
        }),
        ..Default::default()
    };
    assert_table(&read_with(&delimited('^', false, false), "x.csv", &opts).unwrap()[0]);
}

#[test]
fn ndjson_and_json_arrays() {
    assert_table(&read(&ndjson(), "x.ndjson")[0]);
    assert_table(&read(&ndjson(), "x.json")[0]);
    assert_table(&read(&json_array(), "x.json")[0]);
    // Sniffed without a suffix.
    assert_table(&read(&json_array(), "s3://b/export")[0]);
    assert_table(&read(&ndjson(), "s3://b/export")[0]);
}

#[test]
fn parquet_snappy_gzip_and_uncompressed() {
    for c in [
        PqCompression::SNAPPY,
        PqCompression::GZIP(GzipLevel::default()),
        PqCompression::UNCOMPRESSED,
    ] {
        let t = read(&parquet(c), "s3://b/x.parquet/part-00000.parquet");
        assert_table(&t[0]);
        // And without a suffix: PAR1 is sniffed.
        assert_table(&read(&parquet(c), "s3://b/part-00000")[0]);
    }
}

#[test]
fn gzip_including_multi_member_streams() {
    let mut multi = gzip(&delimited(',', false, false)[..30]);
    multi.extend(gzip(&delimited(',', false, false)[30..]));
    assert_table(&read(&multi, "x.csv.gz")[0]);
    // Amperity does not add .gz to names: sniffed.
    assert_table(&read(&gzip(&ndjson()), "s3://b/export.ndjson")[0]);
    assert_table(&read(&gzip(&parquet(PqCompression::SNAPPY)), "s3://b/x")[0]);
}

#[test]
fn zip_tar_and_tgz_give_one_table_per_member() {
    let members = [
        ("a.csv", delimited(',', true, false)),
        ("folder/b.json", json_array()),
        ("c.parquet", parquet(PqCompression::SNAPPY)),
        ("d.csv.gz", gzip(&delimited('|', false, false))),
    ];
    for (name, data) in [
        ("s3://b/x.zip", zip(&members)),
        ("s3://b/x.tar", tar(&members)),
        ("s3://b/x.tgz", gzip(&tar(&members))),
        ("s3://b/x.tar.gz", gzip(&tar(&members))),
    ] {
        let tables = read(&data, name);
        assert_eq!(tables.len(), 4, "{name}");
        for t in &tables {
            assert_table(t);
        }
        assert_eq!(tables[1].source, format!("{name}!folder/b.json"));
    }
}

#[test]
fn declared_compression_and_format_are_confirmed_by_the_bytes() {
    let gz = ReadOptions {
        compression: Some(Compression::Gzip),
        ..Default::default()
    };
    let err = read_with(&delimited(',', false, false), "x.csv", &gz).unwrap_err();
    assert!(
        matches!(&err, ReadError::Mismatch { declared, .. } if declared == "gzip"),
        "{err}"
    );
    let tgz = ReadOptions {
        compression: Some(Compression::Tgz),
        ..Default::default()
    };
    let tables = read_with(
        &gzip(&tar(&[("a.csv", delimited(',', false, false))])),
        "x",
        &tgz,
    )
    .unwrap();
    assert_table(&tables[0]);
    let pq = ReadOptions {
        format: Some(Format::Parquet),
        ..Default::default()
    };
    let err = read_with(&delimited(',', false, false), "x", &pq).unwrap_err();
    assert!(err.to_string().contains("declares Parquet"), "{err}");
}

#[test]
fn unreadable_files_fail_with_a_clear_error() {
    // Unknown binary format.
    let err = read_with(
        &[0u8, 1, 2, 3, 0xff, 0xfe],
        "s3://b/x.bin",
        &ReadOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ReadError::UnknownFormat { .. }), "{err}");
    assert!(err.to_string().contains("s3://b/x.bin"));
    // Truncated gzip.
    let mut big = Vec::new();
    for i in 0..5000 {
        big.extend(format!("{i},name{i},{i}\n").as_bytes());
    }
    let gz = gzip(&big);
    let cut = &gz[..gz.len() / 2];
    let err = read_with(cut, "s3://b/x.csv.gz", &ReadOptions::default()).unwrap_err();
    assert!(matches!(err, ReadError::Io { .. }), "{err}");
    assert!(err.to_string().contains("s3://b/x.csv.gz"), "{err}");
    // A corrupt Parquet file.
    let mut pq = parquet(PqCompression::SNAPPY);
    let n = pq.len();
    pq.truncate(n - 20);
    let err = read_with(&pq, "x.parquet", &ReadOptions::default()).unwrap_err();
    assert!(matches!(err, ReadError::Parquet { .. }), "{err}");
}

#[test]
fn decompressed_size_is_bounded() {
    let data = gzip(&vec![b'a'; 100_000]);
    let opts = ReadOptions {
        limits: braze_sync::read::Limits {
            max_decompressed_bytes: 10_000,
            max_row_bytes: 1 << 20,
        },
        ..Default::default()
    };
    let err = read_with(&data, "x.csv.gz", &opts).unwrap_err();
    assert!(
        err.to_string().contains("max_decompressed_bytes of 10000"),
        "{err}"
    );
}
