//! Handler behaviour over an in-memory store: the three trigger shapes, URL-encoded keys,
//! quarantine of bad objects without failing the invocation, retries of storage errors
//! (`batchItemFailures`), replays overwriting their part, and the run report.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use apache_avro::Codec;
use bridge_shared::hooked_store::{Before, Call, Hooked};
use bridge_shared::object_store::MemoryStore;
use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use currents_normalize::config::Config;
use currents_normalize::handler::Handler;
use currents_normalize::registry::Registry;
use currents_normalize::synth::{self, FileSpec};
use serde_json::{Value, json};

const BUCKET: &str = "acme-braze-currents";

fn registry() -> Arc<Registry> {
    Arc::new(Registry::builtin().unwrap())
}

fn avro(event_type: &str, events: u64, dups: u64) -> Vec<u8> {
    let r = registry();
    let entry = r
        .entries()
        .iter()
        .find(|e| e.event_type == event_type)
        .unwrap();
    synth::file(
        entry,
        &FileSpec {
            events,
            duplicates: dups,
            seed: 11,
            codec: Codec::Null,
        },
    )
    .unwrap()
}

/// S3 notifications carry keys URL-encoded: `+` for space, `%xx` for bytes.
fn encode_key(key: &str) -> String {
    let mut out = String::new();
    for b in key.bytes() {
        match b {
            b' ' => out.push('+'),
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn s3_event(keys: &[&str]) -> Value {
    let records: Vec<Value> = keys
        .iter()
        .map(|k| {
            json!({
                "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
                "eventTime": "2026-11-29T10:00:00.000Z", "eventName": "ObjectCreated:Put",
                "s3": {"s3SchemaVersion": "1.0", "configurationId": "c",
                       "bucket": {"name": BUCKET, "arn": format!("arn:aws:s3:::{BUCKET}")},
                       "object": {"key": encode_key(k), "size": 10, "eTag": "\"e\"", "sequencer": "01"}}
            })
        })
        .collect();
    json!({ "Records": records })
}

fn sqs_event(messages: &[(&str, Value)]) -> Value {
    let records: Vec<Value> = messages
        .iter()
        .map(|(id, body)| {
            json!({"messageId": id, "receiptHandle": "r", "body": body.to_string(),
                   "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:1:q",
                   "awsRegion": "us-east-1", "attributes": {}, "messageAttributes": {}, "md5OfBody": ""})
        })
        .collect();
    json!({ "Records": records })
}

async fn put(store: &dyn ObjectStore, key: &str, body: Vec<u8>) {
    store
        .put(
            &S3Uri::new(BUCKET, key),
            Bytes::from(body),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
}

fn handler(store: Arc<dyn ObjectStore>) -> Handler {
    Handler::new(Config::default(), store, registry())
}

#[tokio::test]
async fn url_encoded_key_from_a_direct_s3_event_becomes_one_part() {
    let store = Arc::new(MemoryStore::new());
    let key = synth::key("currents", "users.messages.email.Send", "2026-11-29-10", 7)
        .replace("zone-a", "zone a+b=c");
    put(
        store.as_ref(),
        &key,
        avro("users.messages.email.Send", 40, 5),
    )
    .await;
    let h = handler(store.clone());
    let out = h.handle(&s3_event(&[&key]), "req-1").await.unwrap();
    let r = &out["results"][0];
    assert_eq!(r["outcome"], "written", "{out}");
    assert_eq!(r["events_in"], 45);
    assert_eq!(r["rows_written"], 40);
    assert_eq!(r["duplicates_dropped"], 5);
    let parts: Vec<String> = store
        .keys(BUCKET)
        .into_iter()
        .filter(|k| k.starts_with("tables/"))
        .collect();
    assert_eq!(parts.len(), 1, "{parts:?}");
    assert!(parts[0].starts_with(
        "tables/users_messages_email_send/users_messages_email_send_2026-11-29.parquet/part-"
    ));
    let reports: Vec<String> = store
        .keys(BUCKET)
        .into_iter()
        .filter(|k| k.starts_with("reports/currents/"))
        .collect();
    assert_eq!(reports.len(), 1);
    let (_, report) = store.get(&S3Uri::new(BUCKET, &reports[0])).await.unwrap();
    let report: Value = serde_json::from_slice(&report).unwrap();
    assert_eq!(
        report["totals"]["written_per_table"]["users_messages_email_send"],
        40
    );
    assert_eq!(report["totals"]["duplicates_dropped"], 5);
}

#[tokio::test]
async fn replaying_an_object_overwrites_its_part() {
    let store = Arc::new(MemoryStore::new());
    let key = synth::key(
        "currents",
        "users.behaviors.CustomEvent",
        "2026-11-29-01",
        1,
    );
    put(
        store.as_ref(),
        &key,
        avro("users.behaviors.CustomEvent", 10, 0),
    )
    .await;
    let h = handler(store.clone());
    h.handle(&s3_event(&[&key]), "a").await.unwrap();
    h.handle(&s3_event(&[&key]), "b").await.unwrap();
    let parts = store
        .keys(BUCKET)
        .into_iter()
        .filter(|k| k.starts_with("tables/"))
        .count();
    assert_eq!(parts, 1);
}

#[tokio::test]
async fn bad_objects_are_quarantined_and_the_batch_succeeds() {
    let store = Arc::new(MemoryStore::new());
    let good = synth::key("currents", "users.messages.email.Open", "2026-11-29-02", 1);
    let junk = synth::key("currents", "users.messages.email.Open", "2026-11-29-02", 2);
    let mut truncated_bytes = avro("users.messages.email.Open", 50, 0);
    truncated_bytes.truncate(truncated_bytes.len() - 100);
    let truncated = synth::key("currents", "users.messages.email.Open", "2026-11-29-02", 3);
    let not_currents = "currents/notes/readme.txt";
    put(
        store.as_ref(),
        &good,
        avro("users.messages.email.Open", 5, 0),
    )
    .await;
    put(store.as_ref(), &junk, b"this is not avro".to_vec()).await;
    put(store.as_ref(), &truncated, truncated_bytes).await;
    put(store.as_ref(), not_currents, b"hello".to_vec()).await;
    let payload = sqs_event(&[
        ("m1", s3_event(&[&good])),
        ("m2", s3_event(&[&junk])),
        ("m3", s3_event(&[&truncated])),
        ("m4", s3_event(&[not_currents])),
    ]);
    let out = handler(store.clone()).handle(&payload, "r").await.unwrap();
    assert_eq!(out["batchItemFailures"], json!([]), "{out}");
    let outcomes: Vec<&str> = out["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["written", "quarantined", "quarantined", "quarantined"]
    );
    assert_eq!(out["results"][1]["step"], "decode");
    assert_eq!(out["results"][3]["step"], "key");
    let keys = store.keys(BUCKET);
    for k in [&junk, &truncated] {
        assert!(keys.contains(&format!("quarantine/{k}")), "{keys:?}");
        assert!(keys.contains(&format!("quarantine/{k}.reason.json")));
    }
    // Nothing partial was published for the bad files.
    let parts = keys.iter().filter(|k| k.starts_with("tables/")).count();
    assert_eq!(parts, 1);
}

/// Puts of one table's parts fail as S3 throttling would.
fn throttled_puts(call: Call<'_>) -> Result<(), StoreError> {
    match call {
        Call::Put { uri, .. }
            if uri.key.starts_with("tables/") && uri.key.contains("email_open") =>
        {
            Err(call.throttled())
        }
        _ => Ok(()),
    }
}

#[tokio::test]
async fn storage_errors_fail_only_their_sqs_message() {
    let inner = Arc::new(MemoryStore::new());
    let ok = synth::key("currents", "users.messages.email.Send", "2026-11-29-03", 1);
    let throttled = synth::key("currents", "users.messages.email.Open", "2026-11-29-03", 2);
    put(&*inner, &ok, avro("users.messages.email.Send", 3, 0)).await;
    put(&*inner, &throttled, avro("users.messages.email.Open", 3, 0)).await;
    let store: Arc<dyn ObjectStore> = Arc::new(Hooked::new(inner, Before(throttled_puts)));
    let h = handler(store.clone());
    let payload = sqs_event(&[("m1", s3_event(&[&ok])), ("m2", s3_event(&[&throttled]))]);
    let out = h.handle(&payload, "r").await.unwrap();
    assert_eq!(
        out["batchItemFailures"],
        json!([{"itemIdentifier": "m2"}]),
        "{out}"
    );
    // The same object in a direct S3 event fails the invocation, so Lambda retries it.
    assert!(h.handle(&s3_event(&[&throttled]), "r2").await.is_err());
}

#[tokio::test]
async fn eventbridge_object_created_is_processed() {
    let store = Arc::new(MemoryStore::new());
    let key = synth::key_versioned(
        "currents",
        "users.behaviors.Purchase",
        "2026-11-29-04",
        7,
        9,
    );
    put(store.as_ref(), &key, avro("users.behaviors.Purchase", 4, 0)).await;
    let payload = json!({
        "version": "0", "id": "x", "detail-type": "Object Created", "source": "aws.s3",
        "account": "1", "time": "2026-11-29T04:00:00Z", "region": "us-east-1",
        "resources": [format!("arn:aws:s3:::{BUCKET}")],
        "detail": {"version": "0", "bucket": {"name": BUCKET},
                   "object": {"key": encode_key(&key), "size": 3, "etag": "e"}, "reason": "PutObject"}
    });
    let out = handler(store.clone()).handle(&payload, "r").await.unwrap();
    assert_eq!(out["results"][0]["outcome"], "written", "{out}");
    assert_eq!(out["results"][0]["table"], "users_behaviors_purchase");
}

#[tokio::test]
async fn own_outputs_and_other_prefixes_are_ignored() {
    let store = Arc::new(MemoryStore::new());
    let out = handler(store.clone())
        .handle(
            &s3_event(&[
                "tables/users_messages_email_send/users_messages_email_send_2026-11-29.parquet/part-1.parquet",
                "quarantine/currents/x.avro",
                "elsewhere/file.avro",
            ]),
            "r",
        )
        .await
        .unwrap();
    for r in out["results"].as_array().unwrap() {
        assert_eq!(r["outcome"], "ignored", "{out}");
    }
    assert!(
        store.keys(BUCKET).is_empty(),
        "no report for an all-ignored run"
    );
}

#[tokio::test]
async fn unknown_event_type_lands_in_the_generic_table() {
    let store = Arc::new(MemoryStore::new());
    let r = registry();
    let mut entry = r
        .entries()
        .iter()
        .find(|e| e.event_type == "users.messages.email.Send")
        .unwrap()
        .clone();
    entry.event_type = "users.messages.carrierpigeon.Send".into();
    let bytes = synth::file(
        &entry,
        &FileSpec {
            events: 6,
            duplicates: 1,
            seed: 3,
            codec: Codec::Deflate(Default::default()),
        },
    )
    .unwrap();
    let key = synth::key("currents", &entry.event_type, "2026-11-29-05", 1);
    put(store.as_ref(), &key, bytes).await;
    let out = handler(store.clone())
        .handle(&s3_event(&[&key]), "r")
        .await
        .unwrap();
    let res = &out["results"][0];
    assert_eq!(res["outcome"], "written", "{out}");
    assert_eq!(res["table"], "currents_other_events");
    assert_eq!(res["unregistered"], true);
    assert_eq!(res["rows_written"], 6);
}

#[tokio::test]
async fn schema_contradicting_the_registry_is_quarantined() {
    let store = Arc::new(MemoryStore::new());
    let r = registry();
    let entry = r
        .entries()
        .iter()
        .find(|e| e.event_type == "users.behaviors.Purchase")
        .unwrap()
        .clone();
    // `price` becomes a string: a type change.
    let mut changed = entry.clone();
    for f in &mut changed.fields {
        if f.name == "price" {
            f.ty = currents_normalize::registry::FieldType::String;
        }
    }
    let bytes = synth::file_with_schema(
        &changed,
        &Registry::avro_schema(&changed),
        &FileSpec {
            events: 2,
            duplicates: 0,
            seed: 1,
            codec: Codec::Null,
        },
    )
    .unwrap();
    let key = synth::key("currents", "users.behaviors.Purchase", "2026-11-29-06", 1);
    put(store.as_ref(), &key, bytes).await;
    let out = handler(store.clone())
        .handle(&s3_event(&[&key]), "r")
        .await
        .unwrap();
    let res = &out["results"][0];
    assert_eq!(res["outcome"], "quarantined", "{out}");
    assert_eq!(res["step"], "registry");
    assert!(res["reason"].as_str().unwrap().contains("price"));
}

#[tokio::test]
async fn dry_run_writes_nothing_not_even_quarantine() {
    let store = Arc::new(MemoryStore::new());
    let good = synth::key("currents", "users.messages.email.Send", "2026-11-29-07", 1);
    let junk = synth::key("currents", "users.messages.email.Send", "2026-11-29-07", 2);
    put(
        store.as_ref(),
        &good,
        avro("users.messages.email.Send", 3, 0),
    )
    .await;
    put(store.as_ref(), &junk, b"junk".to_vec()).await;
    let h = handler(store.clone());
    let obj = |k: &str| bridge_shared::ObjectRef::named(S3Uri::new(BUCKET, k), "cli");
    let r = h.process(&obj(&good), true).await;
    assert_eq!(r.outcome, currents_normalize::report::Outcome::DryRun);
    assert!(
        r.part
            .unwrap()
            .contains("users_messages_email_send_2026-11-29.parquet/part-")
    );
    let r = h.process(&obj(&junk), true).await;
    assert_eq!(r.outcome, currents_normalize::report::Outcome::Quarantined);
    assert_eq!(store.keys(BUCKET), {
        let mut k = vec![good.clone(), junk.clone()];
        k.sort();
        k
    });
}

fn parts(store: &MemoryStore) -> Vec<String> {
    store
        .keys(BUCKET)
        .into_iter()
        .filter(|k| k.starts_with("tables/"))
        .collect()
}

#[tokio::test]
async fn a_replay_that_now_yields_no_rows_removes_the_earlier_part() {
    let store = Arc::new(MemoryStore::new());
    let key = synth::key("currents", "users.messages.email.Click", "2026-11-29-08", 1);
    put(
        store.as_ref(),
        &key,
        avro("users.messages.email.Click", 6, 0),
    )
    .await;
    let h = handler(store.clone());
    let out = h.handle(&s3_event(&[&key]), "a").await.unwrap();
    assert_eq!(out["results"][0]["outcome"], "written", "{out}");
    assert_eq!(parts(&store).len(), 1);
    // The object is replaced by one with no records (a re-delivery, a repaired upload).
    put(
        store.as_ref(),
        &key,
        avro("users.messages.email.Click", 0, 0),
    )
    .await;
    let out = h.handle(&s3_event(&[&key]), "b").await.unwrap();
    assert_eq!(out["results"][0]["outcome"], "empty", "{out}");
    assert_eq!(
        parts(&store),
        Vec::<String>::new(),
        "the old rows are no longer served"
    );
}

#[tokio::test]
async fn an_internal_encode_error_is_retried_not_quarantined() {
    let store = Arc::new(MemoryStore::new());
    let key = synth::key("currents", "users.messages.email.Send", "2026-11-29-09", 1);
    put(
        store.as_ref(),
        &key,
        avro("users.messages.email.Send", 5, 0),
    )
    .await;
    // The spool folder is gone (a full or broken /tmp): the Parquet part cannot be written
    // (this one goes straight to the spool file, as a part past the memory size does).
    let opts = currents_normalize::convert::ConvertOptions {
        spool_dir: Some("/nonexistent/currents-spool".into()),
        part_memory_bytes: 0,
        ..Default::default()
    };
    let h = handler(store.clone()).with_options(opts);
    let payload = sqs_event(&[("m1", s3_event(&[&key]))]);
    let out = h.handle(&payload, "r").await.unwrap();
    assert_eq!(out["results"][0]["outcome"], "retry", "{out}");
    assert_eq!(out["batchItemFailures"], json!([{"itemIdentifier": "m1"}]));
    assert!(
        out["results"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("internal error at encode"),
        "{out}"
    );
    let keys = store.keys(BUCKET);
    assert!(
        !keys.iter().any(|k| k.starts_with("quarantine/")),
        "a good file is not quarantined: {keys:?}"
    );
    // Once the cause is gone the same object converts.
    let out = handler(store.clone()).handle(&payload, "r2").await.unwrap();
    assert_eq!(out["results"][0]["outcome"], "written", "{out}");
}

#[tokio::test]
async fn an_object_that_inflates_past_the_object_limit_is_quarantined_saying_so() {
    let r = registry();
    let entry = r
        .entries()
        .iter()
        .find(|e| e.event_type == "users.messages.email.Send")
        .unwrap();
    let bytes = synth::file(
        entry,
        &FileSpec {
            events: 2_000,
            duplicates: 0,
            seed: 3,
            codec: Codec::Deflate(Default::default()),
        },
    )
    .unwrap();
    let store = Arc::new(MemoryStore::new());
    let key = synth::key("currents", "users.messages.email.Send", "2026-11-29-10", 2);
    put(store.as_ref(), &key, bytes.clone()).await;
    let mut opts = currents_normalize::convert::ConvertOptions::default();
    // Far above the object's size, below what it inflates to.
    opts.limits.max_object_decompressed_bytes = bytes.len() as u64 * 2;
    let out = handler(store.clone())
        .with_options(opts)
        .handle(&s3_event(&[&key]), "r")
        .await
        .unwrap();
    let r = &out["results"][0];
    assert_eq!(r["outcome"], "quarantined", "{out}");
    assert_eq!(r["step"], "decode");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains("decompresses to more than") && reason.contains("in total"),
        "{reason}"
    );
    let (_, why) = store
        .get(&S3Uri::new(BUCKET, format!("quarantine/{key}.reason.json")))
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&why).contains("max_object_decompressed_bytes"),
        "the quarantine reason names the limit"
    );
}

#[tokio::test]
async fn an_object_over_max_object_bytes_is_quarantined_even_when_the_event_understates_it() {
    let store = Arc::new(MemoryStore::new());
    let key = synth::key("currents", "users.messages.email.Send", "2026-11-29-11", 1);
    let bytes = avro("users.messages.email.Send", 50, 0);
    put(store.as_ref(), &key, bytes.clone()).await;
    let cfg = Config {
        max_object_bytes: bytes.len() as u64 / 2,
        ..Config::default()
    };
    // The S3 event says 10 bytes; the object is larger than the limit.
    let out = Handler::new(cfg, store.clone(), registry())
        .handle(&s3_event(&[&key]), "r")
        .await
        .unwrap();
    let r = &out["results"][0];
    assert_eq!(r["outcome"], "quarantined", "{out}");
    assert_eq!(r["step"], "size");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("larger than MAX_OBJECT_BYTES"),
        "{out}"
    );
    assert!(parts(&store).is_empty());
}
