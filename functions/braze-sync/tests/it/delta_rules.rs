//! The delta rules, end to end from export bytes to the exact attribute objects: new users
//! whole (no nulls), known users only their changes, `null` for emptied attributes, nothing
//! for unchanged users, rounding of volatile numbers, audience removals for users who left,
//! full resends, multi-part (Parquet folder) exports, and the state only moving through the
//! confirm step (in memory and through the S3 state store).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use arrow_array::{ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use braze_sync::config::route::Route;
use braze_sync::diff::export::{Part, ProduceOptions, SyncError};
use braze_sync::diff::in_memory::{self, Plan};
use braze_sync::model::UserDelta;
use braze_sync::state::confirmed::Snapshot;
use braze_sync::state::store::{StateStore, Watermark};
use bridge_shared::ObjectStore;
use bridge_shared::object_store::MemoryStore;
use serde_json::{Value, json};

const ROUTE: &str = r#"
name = "customers"
prefix = "amperity/customers/"
update_existing_only = false

[identifier]
kind = "external_id"
column = "amperity_id"

[fields]
given_name = "first_name"
email = "email"
birthdate = "dob"
gender = "gender"

[attributes.lifetime_value]
name = "ltv"
type = "Decimal"
round = 2

[attributes.orders]
type = "Integer"

[attributes.is_vip]
name = "vip"
type = "Boolean"

[[audiences]]
attribute = "aud_winback"
column = "in_winback"
on_leave = "false"
"#;

const HEADER: &str = "amperity_id,given_name,email,birthdate,gender,lifetime_value,orders,is_vip,in_winback,unused\n";

fn route() -> Route {
    Route::from_toml(ROUTE, "test").unwrap()
}

fn parts(csv: &str) -> Vec<Result<Part<&[u8]>, SyncError>> {
    vec![Ok(Part {
        source: "s3://in/amperity/customers/export.csv".into(),
        reader: csv.as_bytes(),
    })]
}

fn plan(csv: &str, snap: &Snapshot) -> Plan {
    let r = route();
    in_memory::plan(
        parts(csv),
        &r,
        snap,
        &ProduceOptions::for_route(&r, "s3://in/amperity/customers/export.csv"),
    )
    .unwrap()
}

fn objects(p: &Plan) -> Vec<Value> {
    p.deltas
        .iter()
        .map(UserDelta::to_attribute_object)
        .collect()
}

fn confirm_all(snap: &mut Snapshot, p: &Plan) {
    for d in &p.deltas {
        snap.apply_confirmed(d);
    }
    snap.compact();
}

fn export1() -> String {
    format!(
        "{HEADER}\
1,Ada,ada@example.com,1815-12-10,female,100.004,3,true,true,x\n\
2,Bob,bob@example.com,,M,20.5,1,false,false,x\n\
3,Cy,cy@example.com,1990-01-31,,7,0,no,yes,x\n\
00042,Di,,,,,,,,x\n"
    )
}

#[test]
fn first_export_sends_every_user_whole_without_nulls() {
    let r = route();
    let snap = Snapshot::for_route(&r);
    let p = plan(&export1(), &snap);
    assert_eq!(
        objects(&p),
        vec![
            json!({"external_id": "1", "_update_existing_only": false, "first_name": "Ada",
                   "email": "ada@example.com", "dob": "1815-12-10", "gender": "F",
                   "ltv": 100.0, "orders": 3, "vip": true, "aud_winback": true}),
            json!({"external_id": "2", "_update_existing_only": false, "first_name": "Bob",
                   "email": "bob@example.com", "gender": "M",
                   "ltv": 20.5, "orders": 1, "vip": false, "aud_winback": false}),
            json!({"external_id": "3", "_update_existing_only": false, "first_name": "Cy",
                   "email": "cy@example.com", "dob": "1990-01-31",
                   "ltv": 7.0, "orders": 0, "vip": false, "aud_winback": true}),
            json!({"external_id": "00042", "_update_existing_only": false, "first_name": "Di",
                   "aud_winback": false}),
        ]
    );
    assert!(p.deltas.iter().all(|d| d.is_new));
    assert_eq!(p.summary.rows_read, 4);
    assert_eq!(p.summary.users_new, 4);
    assert_eq!(p.summary.users_changed, 4);
    assert_eq!(p.summary.unchanged, 0);
    assert_eq!(p.summary.attributes_changed, 8 + 7 + 7 + 2);
    assert_eq!(p.summary.ignored_columns, ["unused"]);
    assert!(p.rejects.is_empty());
    // The identifier is a string even when it looks like a number.
    assert_eq!(
        p.deltas[3].to_attribute_object()["external_id"],
        json!("00042")
    );
}

#[test]
fn an_unchanged_export_produces_nothing() {
    let r = route();
    let mut snap = Snapshot::for_route(&r);
    let first = plan(&export1(), &snap);
    confirm_all(&mut snap, &first);
    let p = plan(&export1(), &snap);
    assert!(p.deltas.is_empty(), "{:?}", objects(&p));
    assert_eq!(p.summary.unchanged, 4);
    assert_eq!(p.summary.users_changed, 0);
}

#[test]
fn only_changes_are_sent_with_null_for_emptied_and_removals_for_users_who_left() {
    let r = route();
    let mut snap = Snapshot::for_route(&r);
    let first = plan(&export1(), &snap);
    confirm_all(&mut snap, &first);
    // 1: new email, ltv moves only in the third decimal (rounded away), leaves winback.
    // 2: ltv emptied, dob set, gender spelled differently but the same.
    // 3: absent (a confirmed winback member: removal).
    // 00042: unchanged. 5: new.
    let export2 = format!(
        "{HEADER}\
1,Ada,ada@lovelace.org,1815-12-10,F,99.999,3,TRUE,false,x\n\
2,Bob,bob@example.com,1970-01-01,male,,1,0,n,x\n\
00042,Di,,,,,,,,x\n\
5,Eve,eve@example.com,,o,1.5,2,f,true,x\n"
    );
    // One of the audience's two members leaving is over the default 20% cap: held.
    let held = plan(&export2, &snap);
    assert_eq!(held.deltas.len(), 3, "{:?}", objects(&held));
    let aud = &held.summary.departures[0];
    assert_eq!(
        (aud.members_before, aud.leaving, aud.held, aud.sent),
        (2, 1, 1, 0)
    );
    assert!(
        aud.held_because
            .as_deref()
            .unwrap_or("")
            .contains("max_departure_share")
    );
    // Released by the operator, the departure goes.
    let mut release = ProduceOptions::for_route(&r, "s3://in/amperity/customers/export.csv");
    release.allow_departures = true;
    let p = in_memory::plan(parts(&export2), &r, &snap, &release).unwrap();
    assert!(p.summary.departures[0].released);
    assert_eq!(
        objects(&p),
        vec![
            json!({"external_id": "1", "_update_existing_only": false,
                   "email": "ada@lovelace.org", "aud_winback": false}),
            json!({"external_id": "2", "_update_existing_only": false,
                   "dob": "1970-01-01", "ltv": null}),
            json!({"external_id": "5", "_update_existing_only": false, "first_name": "Eve",
                   "email": "eve@example.com", "gender": "O", "ltv": 1.5, "orders": 2,
                   "vip": false, "aud_winback": true}),
            json!({"external_id": "3", "_update_existing_only": false, "aud_winback": false}),
        ]
    );
    let removed = &p.deltas[1].changes[1];
    assert_eq!((removed.name.as_str(), removed.fingerprint), ("ltv", None));
    assert_eq!(p.summary.unchanged, 1);
    assert_eq!(p.summary.users_changed, 3);
    assert_eq!(p.summary.users_new, 1);
    assert_eq!(p.summary.users_departed, 1);
    assert_eq!(p.summary.attributes_changed, 2 + 2 + 7 + 1);
    assert_eq!(p.deltas[3].pos.row, 0);

    // Once confirmed, the departure is not sent again.
    confirm_all(&mut snap, &p);
    let again = plan(&export2, &snap);
    assert!(again.deltas.is_empty(), "{:?}", objects(&again));
}

#[test]
fn unconfirmed_deltas_are_sent_again() {
    let r = route();
    let mut snap = Snapshot::for_route(&r);
    let p = plan(&export1(), &snap);
    // Braze accepted only users 1 and 3.
    snap.apply_confirmed(&p.deltas[0]);
    snap.apply_confirmed(&p.deltas[2]);
    snap.compact();
    let again = plan(&export1(), &snap);
    let ids: Vec<Value> = objects(&again)
        .into_iter()
        .map(|o| o["external_id"].clone())
        .collect();
    assert_eq!(ids, [json!("2"), json!("00042")]);
    assert!(again.deltas.iter().all(|d| d.is_new));
}

#[test]
fn full_resend_sends_every_value_again() {
    let r = route();
    let mut snap = Snapshot::for_route(&r);
    let first = plan(&export1(), &snap);
    confirm_all(&mut snap, &first);
    let opts = ProduceOptions {
        full_resend: true,
        departures: false,
        export_name: "x".into(),
        allow_departures: false,
        resend_salt: None,
    };
    let p = in_memory::plan(parts(&export1()), &r, &snap, &opts).unwrap();
    assert_eq!(p.deltas.len(), 4);
    assert_eq!(
        p.deltas[3].to_attribute_object(),
        json!({"external_id": "00042", "_update_existing_only": false, "first_name": "Di",
               "aud_winback": false})
    );
    assert!(p.deltas.iter().all(|d| !d.is_new));
}

fn parquet_part(ids: &[&str], names: &[&str], orders: &[i64], vip: &[bool]) -> Vec<u8> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("amperity_id", DataType::Utf8, false),
        Field::new("given_name", DataType::Utf8, true),
        Field::new("email", DataType::Utf8, true),
        Field::new("birthdate", DataType::Utf8, true),
        Field::new("gender", DataType::Utf8, true),
        Field::new("lifetime_value", DataType::Utf8, true),
        Field::new("orders", DataType::Int64, true),
        Field::new("is_vip", DataType::Boolean, true),
        Field::new("in_winback", DataType::Boolean, true),
    ]));
    let n = ids.len();
    let none = || -> ArrayRef { Arc::new(StringArray::from(vec![None::<&str>; n])) };
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(ids.to_vec())),
        Arc::new(StringArray::from(names.to_vec())),
        none(),
        none(),
        none(),
        none(),
        Arc::new(Int64Array::from(orders.to_vec())),
        Arc::new(BooleanArray::from(vip.to_vec())),
        Arc::new(BooleanArray::from(vec![false; n])),
    ];
    let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
    let mut out = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    out
}

#[test]
fn a_parquet_folder_is_one_export_across_its_parts() {
    let r = route();
    let snap = Snapshot::for_route(&r);
    let dir = std::env::temp_dir().join(format!("bz-pq-folder-{}", std::process::id()));
    let folder = dir.join("customers_2024-05-01.parquet");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("part-00000.parquet"),
        parquet_part(&["1", "2"], &["Ada", "Bob"], &[3, 1], &[true, false]),
    )
    .unwrap();
    std::fs::write(
        folder.join("part-00001.parquet"),
        parquet_part(&["3", "1"], &["Cy", "Ada again"], &[0, 9], &[false, true]),
    )
    .unwrap();
    std::fs::write(folder.join(".DONE"), b"").unwrap();
    let paths = in_memory::local_parts(&folder, ".DONE").unwrap();
    assert_eq!(paths.len(), 2);
    let p = in_memory::plan(
        in_memory::open_local_parts(paths),
        &r,
        &snap,
        &ProduceOptions::for_route(&r, "folder"),
    )
    .unwrap();
    assert_eq!(
        objects(&p),
        vec![
            json!({"external_id": "1", "_update_existing_only": false, "first_name": "Ada",
                   "orders": 3, "vip": true, "aud_winback": false}),
            json!({"external_id": "2", "_update_existing_only": false, "first_name": "Bob",
                   "orders": 1, "vip": false, "aud_winback": false}),
            json!({"external_id": "3", "_update_existing_only": false, "first_name": "Cy",
                   "orders": 0, "vip": false, "aud_winback": false}),
        ]
    );
    // The same user in a later part is a duplicate of the same export.
    assert_eq!(p.rejects.len(), 1);
    assert!(p.rejects[0].pos.source.ends_with("part-00001.parquet"));
    assert_eq!(p.rejects[0].pos.row, 2);
    assert!(p.rejects[0].reason.contains("duplicate identifier"));
    assert_eq!(p.summary.tables, 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_dry_run_prints_payloads_and_a_summary_and_changes_nothing() {
    let r = route();
    let snap = Snapshot::for_route(&r);
    let mut out = Vec::new();
    let mut rej = Vec::new();
    let csv = format!("{HEADER}1,Ada,,,,,,,,x\n,NoId,,,,,,,,x\n");
    let summary = in_memory::dry_run(
        parts(&csv),
        &r,
        &snap,
        &ProduceOptions::for_route(&r, "x"),
        &mut out,
        &mut rej,
    )
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines[0],
        json!({"external_id": "1", "_update_existing_only": false, "first_name": "Ada",
               "aud_winback": false})
    );
    assert_eq!(lines[1]["summary"]["rows_read"], json!(2));
    assert_eq!(lines[1]["summary"]["rejected"], json!(1));
    assert_eq!(lines[1]["summary"]["users_changed"], json!(1));
    assert_eq!(summary.attributes_changed, 2);
    let rej: Value = serde_json::from_slice(&rej).unwrap();
    assert_eq!(rej["reason"], json!("missing identifier"));
    assert!(snap.is_empty());
}

#[tokio::test]
async fn state_advances_only_through_checkpoint_and_commit() {
    let r = route();
    let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let st = StateStore::new(mem, "state", "bridge/state/", "customers");
    let (mut head, snap) = st.load(&r).await.unwrap();
    let p = plan(&export1(), &snap);
    assert_eq!(p.deltas.len(), 4);
    // Braze confirmed three; the fourth was unsent. Checkpoint what was confirmed.
    st.checkpoint(&mut head, &r, &p.deltas[..2]).await.unwrap();
    st.checkpoint(&mut head, &r, &p.deltas[2..3]).await.unwrap();
    st.commit(
        &mut head,
        snap,
        Some(Watermark {
            export_id: "s3://in/amperity/customers/export.csv#e1".into(),
            exported_at: Some("2024-05-01T00:00:00Z".into()),
        }),
    )
    .await
    .unwrap();
    let (head2, snap2) = st.load(&r).await.unwrap();
    assert_eq!(head2.doc.users, 3);
    assert!(head2.is_stale(Some("2024-04-30T00:00:00Z")));
    let again = plan(&export1(), &snap2);
    assert_eq!(
        objects(&again),
        vec![
            json!({"external_id": "00042", "_update_existing_only": false,
                    "first_name": "Di", "aud_winback": false})
        ]
    );
}
