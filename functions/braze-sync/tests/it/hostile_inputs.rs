//! Hostile and broken export files (issue 11): each class of defect ends in a clear error
//! for the file or a reject for the row — never a crash, unbounded memory, or silently wrong
//! data. Every test here failed on the code before the fix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::Arc;

use arrow_array::{ArrayRef, Date32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use braze_sync::config::route::Route;
use braze_sync::diff::export::{Part, ProduceOptions, SyncError};
use braze_sync::diff::in_memory::{self, Plan};
use braze_sync::read::{Limits, ReadOptions, read_all_text};
use braze_sync::state::confirmed::Snapshot;
use flate2::Compression as GzLevel;
use flate2::write::GzEncoder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression as PqCompression, GzipLevel};
use parquet::file::properties::WriterProperties;

fn route(extra: &str) -> Route {
    Route::from_toml(
        &format!(
            r#"
name = "c"
prefix = "p/"
{extra}
[identifier]
kind = "external_id"
column = "id"
[fields]
email = "email"
phone = "phone"
dob = "dob"
[attributes.signup]
type = "Date"
[attributes.seen]
type = "Datetime"
[attributes.note]
type = "Varchar"
"#
        ),
        "t",
    )
    .unwrap()
}

/// Only the identifier and an email.
fn route_min() -> Route {
    Route::from_toml(
        "name = \"c\"\nprefix = \"p/\"\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\n[fields]\nemail = \"email\"\n",
        "t",
    )
    .unwrap()
}

fn run(route: &Route, name: &str, data: &[u8]) -> Result<Plan, SyncError> {
    let snap = Snapshot::for_route(route);
    in_memory::plan(
        vec![Ok(Part {
            source: name.to_string(),
            reader: data,
        })],
        route,
        &snap,
        &ProduceOptions::for_route(route, name),
    )
}

fn err_of(route: &Route, name: &str, data: &[u8]) -> String {
    match run(route, name, data) {
        Ok(p) => panic!(
            "expected an error, got {} deltas / {} rejects",
            p.deltas.len(),
            p.rejects.len()
        ),
        Err(e) => e.to_string(),
    }
}

const HEADER: &str = "id,email,phone,dob,signup,seen,note\n";

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), GzLevel::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn text_opts(max_row: usize, max_decompressed: u64) -> ReadOptions {
    ReadOptions {
        limits: Limits {
            max_row_bytes: max_row,
            max_decompressed_bytes: max_decompressed,
        },
        ..ReadOptions::default()
    }
}

// --- CSV quoting -------------------------------------------------------------------------

#[test]
fn an_unterminated_quote_mid_file_fails_instead_of_swallowing_rows() {
    let r = route("");
    let data = format!("{HEADER}1,\"ada@x.com,,,,,\n2,bob@y.com,,,,,\n3,\"carol@z.com\",,,,,\n");
    let e = err_of(&r, "s3://b/p/x.csv", data.as_bytes());
    assert!(e.contains("quoted field opened at line 2"), "{e}");
}

#[test]
fn a_file_ending_inside_a_quote_fails() {
    let r = route("");
    let data = format!("{HEADER}1,a@x.com,,,,,ok\n2,b@y.com,,,,,\"cut off");
    let e = err_of(&r, "s3://b/p/x.csv", data.as_bytes());
    assert!(
        e.contains("ends inside the quoted field opened at line 3"),
        "{e}"
    );
}

#[test]
fn a_quoted_field_past_max_row_bytes_names_the_open_quote() {
    let mut data = b"id,note\n1,\"".to_vec();
    data.extend(std::iter::repeat_n(b'x', 200_000));
    data.extend(b"\"\n");
    let e = read_all_text(&data[..], "x.csv", &text_opts(1000, 1 << 30))
        .unwrap_err()
        .to_string();
    assert!(e.contains("runs past max_row_bytes"), "{e}");
    // Well-formed quoting (doubled quotes, embedded newlines, escapes) still reads.
    let ok = b"id,note\n1,\"say \"\"hi\"\"\nthere\"\n2,\"\"\n";
    let t = read_all_text(&ok[..], "x.csv", &ReadOptions::default()).unwrap();
    assert_eq!(t[0].rows.len(), 2);
}

// --- NUL bytes and blank-line bombs ----------------------------------------------------

#[test]
fn a_nul_byte_rejects_its_row_at_any_offset_naming_user_and_column() {
    let mut data = format!("{HEADER}1,a@x.com,,,,,a\x00b\n").into_bytes();
    for i in 0..2000 {
        data.extend(format!("{},u{i}@x.com,,,,,fine\n", i + 2).as_bytes());
    }
    data.extend(b"9999,late@x.com,,,,,late\x00nul\n");
    assert!(data.len() > 8192);
    let r = route("");
    let p = run(&r, "s3://b/p/x.csv", &data).unwrap();
    assert_eq!(p.rejects.len(), 2, "{:?}", p.rejects);
    for (reject, user) in p.rejects.iter().zip(["1", "9999"]) {
        assert!(reject.reason.contains("NUL"), "{}", reject.reason);
        assert_eq!(reject.column.as_deref(), Some("note"));
        assert_eq!(
            reject.identifier,
            Some(braze_sync::model::Identifier::ExternalId(user.into())),
        );
    }
    assert_eq!(p.summary.rows_without_identifier, 0);
    assert_eq!(p.deltas.len(), 2000);
    // The reader itself keeps such rows: their identifier is read first.
    let t = read_all_text(&data[..], "x.csv", &ReadOptions::default()).unwrap();
    assert_eq!((t[0].rows.len(), t[0].bad.len()), (2002, 0));
    // JSON strings with an escaped NUL are refused too, when the route reads them.
    let p = run(
        &r,
        "s3://b/p/x.ndjson",
        b"{\"id\":\"1\",\"note\":\"a\\u0000b\"}\n{\"id\":\"2\",\"note\":\"ok\"}\n",
    )
    .unwrap();
    assert_eq!(p.rejects.len(), 1);
    assert!(
        p.rejects[0].reason.contains("NUL"),
        "{}",
        p.rejects[0].reason
    );
}

#[test]
fn a_stray_nul_in_a_value_is_not_an_anonymous_row() {
    // One stray byte in the last column: the row is rejected naming its user and column,
    // and the user stays present (an unidentified row would hold every departure).
    let r =
        route("[[audiences]]\nattribute = \"aud_vip\"\ncolumn = \"vip\"\non_leave = \"false\"\n");
    let header = "id,email,phone,dob,signup,seen,vip,note\n";
    let data = format!("{header}z1,z1@example.com,,,,,,silver\nz2,z2@example.com,,,,,,go\x00ld\n");
    let p = run(&r, "s3://b/p/x.csv", data.as_bytes()).unwrap();
    assert_eq!(p.rejects.len(), 1, "{:?}", p.rejects);
    let reject = &p.rejects[0];
    assert!(reject.reason.contains("NUL"), "{}", reject.reason);
    assert_eq!(
        reject.identifier,
        Some(braze_sync::model::Identifier::ExternalId("z2".into()))
    );
    assert_eq!(reject.column.as_deref(), Some("note"));
    assert_eq!(p.summary.rows_without_identifier, 0);

    // z2, a confirmed audience member, is present in an export where its note holds the byte:
    // no departure, none held.
    let mut snap = Snapshot::for_route(&r);
    let clean =
        format!("{header}z1,z1@example.com,,,,,true,silver\nz2,z2@example.com,,,,,true,gold\n");
    let opts = ProduceOptions::for_route(&r, "s3://b/p/x.csv");
    let first = in_memory::plan(parts(&clean), &r, &snap, &opts).unwrap();
    for d in &first.deltas {
        snap.apply_confirmed(d);
    }
    snap.compact();
    let data =
        format!("{header}z1,z1@example.com,,,,,true,silver\nz2,z2@example.com,,,,,true,go\x00ld\n");
    let p = in_memory::plan(parts(&data), &r, &snap, &opts).unwrap();
    assert_eq!(p.rejects.len(), 1, "{:?}", p.rejects);
    assert_eq!(p.summary.rows_without_identifier, 0);
    assert_eq!(p.summary.users_departed, 0);
    let aud = &p.summary.departures[0];
    assert_eq!((aud.members_before, aud.leaving, aud.held), (2, 0, 0));
    assert!(p.deltas.is_empty(), "{:?}", p.deltas);

    // A NUL in the identifier itself still leaves the row without one.
    let data = format!("{header}z\x002,z2@example.com,,,,,,gold\n");
    let p = run(&r, "s3://b/p/x.csv", data.as_bytes()).unwrap();
    assert_eq!(p.rejects.len(), 1);
    assert_eq!(p.rejects[0].identifier, None);
    assert_eq!(p.summary.rows_without_identifier, 1);
}

fn parts(data: &str) -> Vec<Result<Part<&[u8]>, SyncError>> {
    vec![Ok(Part {
        source: "s3://b/p/x.csv".into(),
        reader: data.as_bytes(),
    })]
}

#[test]
fn a_bomb_of_blank_lines_names_the_limit_really_hit() {
    let mut data = b"id,note\n".to_vec();
    data.extend(std::iter::repeat_n(b'\n', 4_000_000));
    let e = read_all_text(&gzip(&data)[..], "x.csv.gz", &text_opts(1024, 1_000_000))
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_decompressed_bytes of 1000000"), "{e}");
    assert!(!e.contains("max_row_bytes"), "{e}");
}

// --- Archives --------------------------------------------------------------------------

/// A tar whose first record is a GNU long name claiming `claimed` bytes.
fn tar_with_long_name_claim(claimed: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_path("././@LongLink").unwrap();
    h.set_size(claimed);
    h.set_mode(0o644);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend(std::iter::repeat_n(b'a', 512 * 64));
    out
}

#[test]
fn tar_metadata_records_are_bounded_before_they_are_read() {
    let data = tgz_of(&tar_with_long_name_claim(2 << 30));
    let e = read_all_text(&data[..], "x.tgz", &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("exceeds the 65536-byte limit"), "{e}");
    // Real long names (GNU long-name records written by the tar crate) still work.
    let long = format!("{}/part.csv", "d".repeat(150));
    let mut b = tar::Builder::new(Vec::new());
    let body = b"id,note\n1,x\n";
    let mut h = tar::Header::new_gnu();
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, &long, &body[..]).unwrap();
    let t = read_all_text(
        &b.into_inner().unwrap()[..],
        "x.tar",
        &ReadOptions::default(),
    )
    .unwrap();
    assert_eq!(t.len(), 1);
    assert!(t[0].source.ends_with(&long), "{}", t[0].source);
}

fn tgz_of(tar: &[u8]) -> Vec<u8> {
    gzip(tar)
}

#[test]
fn zip_member_names_are_bounded() {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default();
    w.start_file("n".repeat(5000), opts).unwrap();
    w.write_all(b"id\n1\n").unwrap();
    let data = w.finish().unwrap().into_inner();
    let e = read_all_text(&data[..], "x.zip", &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("5000-byte name"), "{e}");
}

#[test]
fn max_decompressed_bytes_defaults_to_the_ephemeral_storage() {
    // Not 64 GiB: the Lambda's /tmp (512 MiB unless BRIDGE_EPHEMERAL_STORAGE_MB says).
    let d = braze_sync::read::default_max_decompressed_bytes();
    let want = std::env::var("BRIDGE_EPHEMERAL_STORAGE_MB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(512)
        * 1024
        * 1024;
    assert_eq!(d, want);
    assert_eq!(route("").config.limits.max_decompressed_bytes, want);
}

// --- Empty exports ---------------------------------------------------------------------

#[test]
fn an_export_with_no_table_is_an_error() {
    let r = route("");
    // An empty zip.
    let empty_zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()))
        .finish()
        .unwrap()
        .into_inner();
    let e = err_of(&r, "s3://b/p/x.zip", &empty_zip);
    assert!(e.contains("holds no table"), "{e}");
    // A tar of only symlinks.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "a.csv", "/etc/passwd").unwrap();
    let e = err_of(&r, "s3://b/p/x.tar", &b.into_inner().unwrap());
    assert!(e.contains("holds no table"), "{e}");
    // A marker folder with no parts.
    let snap = Snapshot::for_route(&r);
    let none: Vec<Result<Part<&[u8]>, SyncError>> = Vec::new();
    let e = in_memory::plan(
        none,
        &r,
        &snap,
        &ProduceOptions::for_route(&r, "s3://b/p/day/"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("holds no table"), "{e}");
}

#[test]
fn a_header_without_rows_needs_allow_empty() {
    let e = err_of(&route(""), "s3://b/p/x.csv", HEADER.as_bytes());
    assert!(e.contains("allow_empty = true"), "{e}");
    let p = run(
        &route("allow_empty = true"),
        "s3://b/p/x.csv",
        HEADER.as_bytes(),
    )
    .unwrap();
    assert_eq!(p.summary.tables, 1);
    assert!(p.deltas.is_empty());
}

// --- Duplicate columns and keys -------------------------------------------------------

#[test]
fn a_duplicated_mapped_or_identifier_column_refuses_the_file() {
    let r = route_min();
    let e = err_of(&r, "s3://b/p/x.csv", b"id,email,email\n1,a@x.com,b@y.com\n");
    assert!(e.contains("\"email\" appears 2 times"), "{e}");
    // No exact match and two case-insensitive ones: as ambiguous.
    let e = err_of(&r, "s3://b/p/x.csv", b"ID,Id,email\n1,2,a@x.com\n");
    assert!(e.contains("\"id\" appears 2 times"), "{e}");
    // A duplicated column the route does not read is harmless.
    let p = run(&r, "s3://b/p/x.csv", b"id,email,x,x\n1,a@x.com,1,2\n").unwrap();
    assert_eq!(p.deltas.len(), 1);
}

#[test]
fn a_duplicated_key_in_a_json_object_rejects_the_row() {
    let r = route("");
    let nd = b"{\"id\":\"1\",\"email\":\"a@x.com\",\"email\":\"b@y.com\"}\n{\"id\":\"2\",\"email\":\"c@z.com\",\"x\":1,\"x\":2}\n";
    let p = run(&r, "s3://b/p/x.ndjson", nd).unwrap();
    assert_eq!(p.rejects.len(), 1, "{:?}", p.rejects);
    assert_eq!(p.rejects[0].pos.row, 1);
    assert_eq!(p.rejects[0].column.as_deref(), Some("email"));
    assert!(p.rejects[0].reason.contains("more than once"));
    assert_eq!(p.deltas.len(), 1);
    let arr =
        b"[{\"id\":\"1\",\"id\":\"9\",\"email\":\"a@x.com\"},{\"id\":\"2\",\"email\":\"c@z.com\"}]";
    let p = run(&r, "s3://b/p/x.json", arr).unwrap();
    assert_eq!(p.rejects.len(), 1);
    assert_eq!(p.rejects[0].column.as_deref(), Some("id"));
}

// --- Identifiers, formatted fields, dates ----------------------------------------------

#[test]
fn identifiers_are_text_or_integers_only() {
    let r = route_min();
    let nd = b"{\"id\":true,\"email\":\"a@x.com\"}\n{\"id\":42,\"email\":\"b@x.com\"}\n{\"id\":\"u3\",\"email\":\"c@x.com\"}\n";
    let p = run(&r, "s3://b/p/x.ndjson", nd).unwrap();
    assert_eq!(p.rejects.len(), 1);
    assert!(
        p.rejects[0].reason.contains("boolean true"),
        "{}",
        p.rejects[0].reason
    );
    assert!(p.rejects[0].reason.contains("text or an integer"));
    assert_eq!(p.deltas.len(), 2);
    // A Parquet date column as the identifier.
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Date32, false),
        Field::new("email", DataType::Utf8, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Date32Array::from(vec![19000])),
        Arc::new(StringArray::from(vec!["a@x.com"])),
    ];
    let data = parquet_of(schema, cols, PqCompression::SNAPPY, false);
    let p = run(&r, "s3://b/p/x.parquet", &data).unwrap();
    assert_eq!(p.rejects.len(), 1);
    assert!(
        p.rejects[0].reason.contains("date"),
        "{}",
        p.rejects[0].reason
    );
}

#[test]
fn formatted_fields_are_never_truncated_and_dates_are_in_braze_range() {
    let r = route("string_policy = \"truncate\"");
    let long_email = format!("{}@example.com", "a".repeat(300));
    let long_phone = "1".repeat(300);
    let rows = format!(
        "{HEADER}1,{long_email},,,,,\n2,,{long_phone},,,,\n3,,,0000-01-01,,,\n4,,,1980-12-21,0000-06-01,,\n5,,,,,3001-01-01T00:00:00Z,\n6,ok@x.com,,1980-12-21,2020-01-01,2020-01-01T00:00:00Z,{}\n",
        "n".repeat(300)
    );
    let p = run(&r, "s3://b/p/x.csv", rows.as_bytes()).unwrap();
    let reasons: Vec<(u64, String)> = p
        .rejects
        .iter()
        .map(|r| (r.pos.row, r.reason.clone()))
        .collect();
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    assert!(reasons[0].1.contains("email") && reasons[0].1.contains("over Braze's 255"));
    assert!(reasons[1].1.contains("phone") && reasons[1].1.contains("over Braze's 255"));
    assert!(reasons[2].1.contains("date of birth"), "{reasons:?}");
    assert!(
        reasons[3].1.contains("outside the years Braze stores"),
        "{reasons:?}"
    );
    assert!(
        reasons[4].1.contains("outside the years Braze stores"),
        "{reasons:?}"
    );
    // Free text is still cut under the truncate policy.
    assert_eq!(p.deltas.len(), 1);
    let note = p.deltas[0].to_attribute_object()["note"].clone();
    assert_eq!(note.as_str().unwrap().chars().count(), 255);
}

#[test]
fn leap_seconds_and_impossible_offsets_are_refused() {
    let r = route("");
    let rows = format!(
        "{HEADER}1,,,,,2016-12-31T23:59:60Z,\n2,,,,,2024-01-01T10:00:00+99:99,\n3,,,,,2024-01-01T10:00:00+15:00,\n4,,,,,2024-01-01T10:00:00+14:00,\n"
    );
    let p = run(&r, "s3://b/p/x.csv", rows.as_bytes()).unwrap();
    assert_eq!(p.rejects.len(), 3, "{:?}", p.rejects);
    assert!(
        p.rejects[0].reason.contains("leap second"),
        "{}",
        p.rejects[0].reason
    );
    assert_eq!(p.deltas.len(), 1);
    assert_eq!(
        p.deltas[0].to_attribute_object()["seen"],
        serde_json::json!("2023-12-31T20:00:00Z")
    );
}

// --- Parquet ---------------------------------------------------------------------------

fn parquet_of(
    schema: Arc<Schema>,
    cols: Vec<ArrayRef>,
    compression: PqCompression,
    dictionary: bool,
) -> Vec<u8> {
    let props = WriterProperties::builder()
        .set_compression(compression)
        .set_dictionary_enabled(dictionary)
        .build();
    let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    out
}

fn one_string_column(values: Vec<String>, compression: PqCompression) -> Vec<u8> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("note", DataType::Utf8, true),
    ]));
    let ids: Vec<String> = (0..values.len()).map(|i| i.to_string()).collect();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(ids)),
        Arc::new(StringArray::from(values)),
    ];
    parquet_of(schema, cols, compression, false)
}

#[test]
fn a_parquet_page_decoding_past_the_page_limit_is_refused_before_decoding() {
    let big = "0".repeat(70 * 1024 * 1024);
    let data = one_string_column(vec![big], PqCompression::GZIP(GzipLevel::default()));
    assert!(data.len() < 2 * 1024 * 1024, "{}", data.len());
    let e = read_all_text(&data[..], "x.parquet", &text_opts(1 << 30, 1 << 30))
        .unwrap_err()
        .to_string();
    assert!(e.contains("page limit"), "{e}");
}

/// A dictionary-encoded string column (the writer's dictionary page allowed up to 64 MiB).
fn dictionary_column(values: Vec<String>) -> Vec<u8> {
    let schema = Arc::new(Schema::new(vec![Field::new("note", DataType::Utf8, true)]));
    let props = WriterProperties::builder()
        .set_compression(PqCompression::SNAPPY)
        .set_dictionary_enabled(true)
        .set_dictionary_page_size_limit(64 * 1024 * 1024)
        .build();
    let batch =
        RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(values))]).unwrap();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    out
}

#[test]
fn a_parquet_dictionary_value_over_max_row_bytes_is_refused_before_decoding() {
    // One 5,000-byte value, used by 2,000 rows: decoding would copy it into each.
    let data = dictionary_column(vec!["y".repeat(5000); 2000]);
    assert!(data.len() < 20_000, "{}", data.len());
    let e = read_all_text(&data[..], "x.parquet", &text_opts(1000, 1 << 30))
        .unwrap_err()
        .to_string();
    assert!(e.contains("refused before decoding"), "{e}");
    assert!(
        e.contains(
            "dictionary page at byte 4 holds a value of 5000 bytes, over max_row_bytes (1000)"
        ),
        "{e}"
    );
    // Within the limit, the same file reads.
    let t = read_all_text(&data[..], "x.parquet", &text_opts(8000, 1 << 30)).unwrap();
    assert_eq!(t[0].rows.len(), 2000);
}

#[test]
fn a_huge_parquet_dictionary_page_is_refused_before_decoding() {
    // 17 distinct 1 MiB values: a 17 MiB dictionary page (under the 64 MiB page limit).
    let values: Vec<String> = (0..17u8)
        .map(|i| char::from(b'a' + i).to_string().repeat(1 << 20))
        .collect();
    let data = dictionary_column(values);
    let e = read_all_text(&data[..], "x.parquet", &text_opts(1 << 30, 1 << 30))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("over the 16777216-byte dictionary page limit"),
        "{e}"
    );
}

#[test]
fn max_row_bytes_applies_to_parquet_rows() {
    let data = one_string_column(
        vec!["short".into(), "y".repeat(5000)],
        PqCompression::SNAPPY,
    );
    let e = read_all_text(&data[..], "x.parquet", &text_opts(1000, 1 << 30))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("max_row_bytes of 1000 bytes exceeded at row 2"),
        "{e}"
    );
}

#[test]
fn a_flipped_bit_in_a_parquet_page_fails_its_checksum() {
    // Written by pyarrow with `write_page_checksum=True` (the Rust writer writes no CRCs):
    // 50 rows of id, email, uncompressed.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/page-checksums.parquet");
    let mut data = std::fs::read(path).unwrap();
    let t = read_all_text(&data[..], "x.parquet", &ReadOptions::default()).unwrap();
    assert_eq!(t[0].rows[7][1].as_deref(), Some("user7@example.com"));
    let at = data
        .windows(10)
        .position(|w| w == b"user7@exam")
        .expect("value in the page");
    data[at + 4] ^= 0x01;
    match read_all_text(&data[..], "x.parquet", &ReadOptions::default()) {
        Err(e) => assert!(e.to_string().contains("checksum"), "{e}"),
        Ok(t) => panic!("a corrupt page was read as data: {:?}", t[0].rows[7]),
    }
}
