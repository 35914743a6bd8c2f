//! Every kind of bad row is rejected with its row, line, column and reason while the rest of
//! the export proceeds; a file without the identifier column fails the run; values become
//! what Braze accepts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use braze_sync::config::route::Route;
use braze_sync::diff::export::{Part, ProduceOptions, SyncError};
use braze_sync::diff::in_memory::{self, Plan};
use braze_sync::diff::rejects::RejectLog;
use braze_sync::read::ReadError;
use braze_sync::state::confirmed::Snapshot;
use serde_json::{Value, json};

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
dob = "dob"
country = "country"
language = "language"
tz = "time_zone"
email_sub = "email_subscribe"
[attributes.orders]
type = "Integer"
[attributes.note]
type = "Varchar"
[attributes.seen_at]
type = "Datetime"
[attributes.signup]
type = "Date"
"#
        ),
        "t",
    )
    .unwrap()
}

const HEADER: &[u8] = b"id,email,dob,country,language,tz,email_sub,orders,note,seen_at,signup\n";

fn run(route: &Route, name: &str, data: Vec<u8>) -> Result<Plan, SyncError> {
    let snap = Snapshot::for_route(route);
    in_memory::plan(
        vec![Ok(Part {
            source: name.to_string(),
            reader: &data[..],
        })],
        route,
        &snap,
        &ProduceOptions::for_route(route, name),
    )
}

fn csv(rows: &[&[u8]]) -> Vec<u8> {
    let mut d = HEADER.to_vec();
    for r in rows {
        d.extend_from_slice(r);
        d.push(b'\n');
    }
    d
}

#[test]
fn each_bad_row_kind_is_rejected_with_position_column_and_reason() {
    let r = route("string_policy = \"reject\"");
    let long = format!("9,,,,,,,,{},,", "x".repeat(256));
    let data = csv(&[
        b"1,a@example.com,1990-02-03,United States,English,America/Chicago,opted in,5,hi,2024-01-01T10:00:00-05:00,2024-01-01",
        b"2,b@example.com",                        // wrong field count
        b"3,c@example.com,,,,,,\xff\xfe,,,",       // invalid UTF-8 in orders
        b"4,d@example.com,,,,,,many,,,",           // not an integer
        b",e@example.com,,,,,,,,,",                // missing identifier
        b"  ,f@example.com,,,,,,,,,",              // empty identifier
        b"1,dup@example.com,,,,,,,,,",             // duplicate identifier
        b"6,not-an-email,,,,,,,,,",                // invalid email
        b"7,,1990-13-45,,,,,,,,",                  // invalid date
        b"8,,,Narnia,,,,,,,",                      // not a country
        long.as_bytes(),                           // over 255 characters, reject policy
        b"10,,,,,Mars/Olympus,,,,,",               // not a time zone
        b"11,,,,,,maybe,,,,",                      // not a subscription state
        b"12,,,,,,,,,,",                           // good, nothing to send
    ]);
    let p = run(&r, "s3://b/p/x.csv", data).unwrap();
    let got: Vec<(u64, Option<u64>, Option<String>, String)> = p
        .rejects
        .iter()
        .map(|r| (r.pos.row, r.pos.line, r.column.clone(), r.reason.clone()))
        .collect();
    let expect: Vec<(u64, Option<&str>, &str)> = vec![
        (
            2,
            None,
            "wrong field count: expected 11 fields (the header's), found 2",
        ),
        (3, Some("orders"), "invalid UTF-8 at byte 0 of the value"),
        (4, Some("orders"), "orders: \"many\" is not an integer"),
        (5, Some("id"), "missing identifier"),
        (6, Some("id"), "empty identifier"),
        (7, Some("id"), "duplicate identifier"),
        (
            8,
            Some("email"),
            "email: \"not-an-email\" is not a valid email address",
        ),
        (
            9,
            Some("dob"),
            "dob: \"1990-13-45\" is not a date (YYYY-MM-DD)",
        ),
        (
            10,
            Some("country"),
            "country: \"Narnia\" is not an ISO-3166 country",
        ),
        (
            11,
            Some("note"),
            "note: the value is 256 characters, over Braze's 255",
        ),
        (
            12,
            Some("tz"),
            "time_zone: \"Mars/Olympus\" is not an IANA time zone",
        ),
        (
            13,
            Some("email_sub"),
            "email_subscribe: \"maybe\" is not a subscription state",
        ),
    ];
    assert_eq!(got.len(), expect.len(), "{got:#?}");
    for (g, e) in got.iter().zip(&expect) {
        assert_eq!(g.0, e.0, "{g:?}");
        assert_eq!(g.1, Some(e.0 + 1), "line of {g:?}");
        assert_eq!(g.2.as_deref(), e.1, "{g:?}");
        assert!(g.3.starts_with(e.2), "{g:?} vs {e:?}");
    }
    // The rest of the export proceeded, with values as Braze accepts them.
    assert_eq!(p.deltas.len(), 1);
    assert_eq!(
        p.deltas[0].to_attribute_object(),
        json!({"external_id": "1", "_update_existing_only": true, "email": "a@example.com",
               "dob": "1990-02-03", "country": "US", "language": "en",
               "time_zone": "America/Chicago", "email_subscribe": "opted_in", "orders": 5,
               "note": "hi", "seen_at": "2024-01-01T15:00:00Z",
               "signup": "2024-01-01T00:00:00Z"})
    );
    assert_eq!(p.summary.rows_read, 14);
    assert_eq!(p.summary.rejected, 12);
    assert_eq!(p.summary.unchanged, 1);
    // Known identifiers travel with their rejects; the NDJSON has every field.
    let mut log = RejectLog::default();
    for r in &p.rejects {
        log.push(r);
    }
    let body = log.into_body();
    let lines: Vec<Value> = std::str::from_utf8(&body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[2]["identifier"], json!({"external_id": "4"}));
    assert_eq!(lines[2]["line"], json!(5));
    assert_eq!(lines[2]["source"], json!("s3://b/p/x.csv"));
    assert!(lines[0].get("identifier").is_none());
}

#[test]
fn truncate_policy_cuts_long_strings_to_255_characters() {
    let r = route("");
    let long = format!("9,,,,,,,,{},,", "é".repeat(300));
    let p = run(&r, "x.csv", csv(&[long.as_bytes()])).unwrap();
    let note = p.deltas[0].to_attribute_object()["note"].clone();
    assert_eq!(note.as_str().unwrap().chars().count(), 255);
}

#[test]
fn a_missing_identifier_column_fails_the_run_and_sends_nothing() {
    let r = route("");
    let data = b"email,dob\na@example.com,\n".to_vec();
    let err = run(&r, "s3://b/p/x.csv", data).unwrap_err();
    assert!(
        matches!(&err, SyncError::Read(ReadError::MissingColumn { column, .. }) if column == "id"),
        "{err}"
    );
    assert!(err.to_string().contains("s3://b/p/x.csv"));
    assert!(!err.is_retryable());
}

#[test]
fn a_missing_mapped_column_fails_rather_than_erasing_values() {
    let r = route("");
    let data = b"id,email\n1,a@example.com\n".to_vec();
    let err = run(&r, "x.csv", data).unwrap_err();
    assert!(
        err.to_string()
            .contains("column \"country\" is missing from the header"),
        "{err}"
    );
}

#[test]
fn ndjson_bad_lines_and_types_are_rejected_with_their_lines() {
    let r = route("");
    let data = b"{\"id\": 17, \"orders\": \"3\"}\n{oops\n{\"id\": \"18\", \"orders\": 2.5}\n{\"id\": \"19\", \"note\": {\"a\": 1}}\n".to_vec();
    let p = run(&r, "x.ndjson", data).unwrap();
    assert_eq!(
        p.deltas
            .iter()
            .map(|d| d.to_attribute_object())
            .collect::<Vec<_>>(),
        vec![json!({"external_id": "17", "_update_existing_only": true, "orders": 3})]
    );
    let got: Vec<(u64, Option<u64>, Option<String>)> = p
        .rejects
        .iter()
        .map(|r| (r.pos.row, r.pos.line, r.column.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (2, Some(2), None),
            (3, Some(3), Some("orders".into())),
            (4, Some(4), Some("note".into())),
        ]
    );
}

#[test]
fn unknown_columns_are_reported_once_per_run_not_per_row() {
    let mut data = b"id,extra_a,extra_b\n".to_vec();
    for i in 0..50 {
        data.extend(format!("{i},x,y\n").as_bytes());
    }
    // Missing mapped columns fail; give the route only the identifier.
    let r2 = Route::from_toml(
        "name = \"c\"\nprefix = \"p/\"\n[identifier]\nkind = \"braze_id\"\ncolumn = \"id\"\n",
        "t",
    )
    .unwrap();
    let p = run(&r2, "x.csv", data).unwrap();
    assert_eq!(p.summary.ignored_columns, ["extra_a", "extra_b"]);
    assert_eq!(p.summary.unchanged, 50);
}

#[test]
fn user_alias_identifiers_take_the_label_from_config_or_column() {
    let r = Route::from_toml(
        "name = \"c\"\nprefix = \"p/\"\n[identifier]\nkind = \"user_alias\"\ncolumn = \"alias\"\nalias_label_column = \"label\"\n[fields]\nfirst = \"first_name\"\n",
        "t",
    )
    .unwrap();
    let p = run(
        &r,
        "x.csv",
        b"alias,label,first\nada,crm,Ada\nbob,,Bob\n".to_vec(),
    )
    .unwrap();
    assert_eq!(
        p.deltas[0].to_attribute_object(),
        json!({"user_alias": {"alias_name": "ada", "alias_label": "crm"},
               "_update_existing_only": true, "first_name": "Ada"})
    );
    assert_eq!(p.rejects.len(), 1);
    assert_eq!(p.rejects[0].column.as_deref(), Some("label"));
}
