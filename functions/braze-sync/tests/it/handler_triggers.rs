//! The Lambda edge over an in-memory store and a recording runner: trigger shapes, SQS
//! partial batch failures, duplicates, forced replays, marker-mode exports and own outputs.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use braze_sync::config::route::RouteBinding;
use braze_sync::ops::report::RunStatus;
use braze_sync::run::handler::{
    ExportPlan, ExportRunner, FORCE_FULL_METADATA, Handler, HandlerConfig, RunError, RunOutcome,
};
use bridge_shared::S3Uri;
use bridge_shared::hooked_store::{Before, Call, Hooked};
use bridge_shared::object_store::{MemoryStore, ObjectStore, PutCondition};
use bytes::Bytes;
use serde_json::{Value, json};

#[derive(Default)]
struct Recorder {
    runs: Mutex<Vec<ExportPlan>>,
    fail_keys: Mutex<Vec<(String, bool)>>,
}

#[async_trait]
impl ExportRunner for Recorder {
    async fn run(&self, plan: &ExportPlan, _: Option<u64>) -> Result<RunOutcome, RunError> {
        self.runs.lock().unwrap().push(plan.clone());
        if let Some((_, retryable)) = self
            .fail_keys
            .lock()
            .unwrap()
            .iter()
            .find(|(k, _)| plan.trigger.key.contains(k.as_str()))
        {
            return Err(if *retryable {
                RunError::Retryable("Braze answered 503".into())
            } else {
                RunError::Permanent {
                    message: "unreadable".into(),
                    // "norep": the report could not be written.
                    report: (!plan.trigger.key.contains("norep"))
                        .then(|| "s3://state/reports/bad.json".to_string()),
                }
            });
        }
        Ok(RunOutcome {
            status: RunStatus::Complete,
            report: Some("r.json".into()),
            summary: json!({}),
            hand_over: false,
            fan_out: None,
            pieces_unqueued: None,
        })
    }
}

fn cfg() -> HandlerConfig {
    HandlerConfig {
        state_bucket: "acme-state".into(),
        output_prefixes: vec!["bridge/".into()],
        state_prefix: "bridge/state/".into(),
        reports_prefix: "bridge/reports/".into(),
        routes: vec![
            RouteBinding {
                name: "customers".into(),
                bucket: None,
                prefix: "amperity/customers/".into(),
                marker_suffix: None,
            },
            RouteBinding {
                name: "audiences".into(),
                bucket: None,
                prefix: "amperity/audiences/".into(),
                marker_suffix: Some(".DONE".into()),
            },
        ],
        lease_s: 900,
    }
}

async fn put(store: &MemoryStore, bucket: &str, key: &str, body: &str, meta: &[(&str, &str)]) {
    let meta: BTreeMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    store
        .put(
            &S3Uri::new(bucket, key),
            Bytes::from(body.to_string()),
            PutCondition::None,
            meta,
        )
        .await
        .unwrap();
}

fn s3_event(bucket: &str, raw_key: &str) -> Value {
    json!({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": raw_key, "size": 1}}}]})
}

fn sqs(messages: &[(&str, String)]) -> Value {
    let records: Vec<Value> = messages
        .iter()
        .map(|(id, body)| {
            json!({"messageId": id, "receiptHandle": "r", "body": body,
            "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:1:q",
            "awsRegion": "us-east-1", "attributes": {}, "messageAttributes": {}, "md5OfBody": ""})
        })
        .collect();
    json!({"Records": records})
}

fn setup() -> (Arc<MemoryStore>, Arc<Recorder>, Handler) {
    let store = Arc::new(MemoryStore::new());
    let rec = Arc::new(Recorder::default());
    let h = Handler::new(cfg(), store.clone(), rec.clone());
    (store, rec, h)
}

#[tokio::test]
async fn direct_eventbridge_and_sqs_shapes_each_start_one_sync_with_decoded_keys() {
    let (store, rec, h) = setup();
    put(&store, "exp", "amperity/customers/a b+c.csv", "x", &[]).await;
    put(&store, "exp", "amperity/customers/two.csv", "y", &[]).await;
    put(&store, "exp", "amperity/customers/three.csv", "z", &[]).await;

    h.handle(&s3_event("exp", "amperity/customers/a+b%2Bc.csv"), None)
        .await
        .unwrap();
    let eb = json!({"version": "0", "id": "1", "detail-type": "Object Created", "source": "aws.s3",
        "account": "1", "time": "t", "region": "us-east-1", "resources": [],
        "detail": {"bucket": {"name": "exp"}, "object": {"key": "amperity/customers/two.csv"}}});
    h.handle(&eb, None).await.unwrap();
    let out = h
        .handle(
            &sqs(&[(
                "m1",
                s3_event("exp", "amperity/customers/three.csv").to_string(),
            )]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(out["batchItemFailures"], json!([]));
    let keys: Vec<String> = rec
        .runs
        .lock()
        .unwrap()
        .iter()
        .map(|p| p.trigger.key.clone())
        .collect();
    assert_eq!(
        keys,
        [
            "amperity/customers/a b+c.csv",
            "amperity/customers/two.csv",
            "amperity/customers/three.csv"
        ]
    );
}

#[tokio::test]
async fn sqs_batch_reports_only_the_failed_message() {
    let (store, rec, h) = setup();
    put(&store, "exp", "amperity/customers/ok.csv", "x", &[]).await;
    put(&store, "exp", "amperity/customers/flaky.csv", "x", &[]).await;
    rec.fail_keys.lock().unwrap().push(("flaky".into(), true));
    let out = h
        .handle(
            &sqs(&[
                (
                    "m-ok",
                    s3_event("exp", "amperity/customers/ok.csv").to_string(),
                ),
                (
                    "m-flaky",
                    s3_event("exp", "amperity/customers/flaky.csv").to_string(),
                ),
                ("m-garbage", "not json".to_string()),
            ]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        out["batchItemFailures"],
        json!([{"itemIdentifier": "m-flaky"}])
    );
}

#[tokio::test]
async fn permanent_failure_is_acknowledged_not_retried() {
    let (store, rec, h) = setup();
    put(&store, "exp", "amperity/customers/bad.csv", "x", &[]).await;
    rec.fail_keys.lock().unwrap().push(("bad".into(), false));
    let out = h
        .handle(
            &sqs(&[(
                "m1",
                s3_event("exp", "amperity/customers/bad.csv").to_string(),
            )]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(out["batchItemFailures"], json!([]));
    assert_eq!(out["results"][0]["outcome"], "failed");
}

#[tokio::test]
async fn a_permanent_failure_without_its_report_is_retried_not_acknowledged() {
    let (store, rec, h) = setup();
    put(&store, "exp", "amperity/customers/norep.csv", "x", &[]).await;
    rec.fail_keys.lock().unwrap().push(("norep".into(), false));
    let out = h
        .handle(
            &sqs(&[(
                "m1",
                s3_event("exp", "amperity/customers/norep.csv").to_string(),
            )]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(out["batchItemFailures"], json!([{"itemIdentifier": "m1"}]));
}

#[tokio::test]
async fn the_same_notification_twice_syncs_once_and_reports_a_no_op() {
    let (store, rec, h) = setup();
    put(&store, "exp", "amperity/customers/a.csv", "x", &[]).await;
    h.handle(&s3_event("exp", "amperity/customers/a.csv"), None)
        .await
        .unwrap();
    let second = h
        .handle(&s3_event("exp", "amperity/customers/a.csv"), None)
        .await
        .unwrap();
    assert_eq!(rec.runs.lock().unwrap().len(), 1);
    assert_eq!(second["results"][0]["outcome"], "duplicate_no_op");
    // Changed content is a new export.
    put(&store, "exp", "amperity/customers/a.csv", "changed", &[]).await;
    h.handle(&s3_event("exp", "amperity/customers/a.csv"), None)
        .await
        .unwrap();
    assert_eq!(rec.runs.lock().unwrap().len(), 2);
}

/// A notification of an export whose claim a live run in another invocation holds is a
/// duplicate, acknowledged without running: that run records how the export ends and hands
/// over what it leaves. A run that asks for more (a resend forced by object metadata, kept
/// ETag and all, or an operator's release of departures) waits for it to end instead.
#[tokio::test]
async fn a_notification_of_an_export_another_invocation_is_syncing_is_a_duplicate() {
    use braze_sync::run::handler::RunFlags;
    use braze_sync::state::ledger::{Claim, Ledger};
    let (store, rec, h) = setup();
    put(&store, "exp", "amperity/customers/a.csv", "x", &[]).await;
    let uri = S3Uri::new("exp", "amperity/customers/a.csv");
    let etag = store.head(&uri).await.unwrap().unwrap().etag;
    let ledger = Ledger::for_route(store.as_ref(), "acme-state", "bridge/state/", "customers");
    let now = chrono::Utc::now().timestamp();
    let Claim::Acquired { .. } = ledger
        .claim(&format!("{uri}#{etag}"), now, 900, false)
        .await
        .unwrap()
    else {
        panic!("the live run's claim")
    };
    let body = s3_event("exp", "amperity/customers/a.csv").to_string();
    let out = h.handle(&sqs(&[("m1", body.clone())]), None).await.unwrap();
    assert_eq!(out["batchItemFailures"], json!([]), "{out}");
    assert_eq!(out["results"][0]["outcome"], "duplicate_while_running");
    let plain = h.run_object(&uri, RunFlags::default(), None).await.unwrap();
    assert_eq!(plain["outcome"], "duplicate_while_running");
    let release = RunFlags {
        force_full: false,
        allow_departures: true,
    };
    let refused = h.run_object(&uri, release, None).await.unwrap_err();
    assert!(refused.contains("starts once it ends"), "{refused}");
    // The same bytes copied in place with the force-full flag: the same export id.
    put(
        &store,
        "exp",
        "amperity/customers/a.csv",
        "x",
        &[(FORCE_FULL_METADATA, "true")],
    )
    .await;
    assert_eq!(store.head(&uri).await.unwrap().unwrap().etag, etag);
    let out = h.handle(&sqs(&[("m2", body)]), None).await.unwrap();
    assert_eq!(
        out["batchItemFailures"],
        json!([{"itemIdentifier": "m2"}]),
        "{out}"
    );
    assert!(rec.runs.lock().unwrap().is_empty());
}

#[tokio::test]
async fn force_full_metadata_replays_a_complete_export() {
    let (store, rec, h) = setup();
    put(&store, "exp", "amperity/customers/a.csv", "x", &[]).await;
    h.handle(&s3_event("exp", "amperity/customers/a.csv"), None)
        .await
        .unwrap();
    put(
        &store,
        "exp",
        "amperity/customers/a.csv",
        "x",
        &[(FORCE_FULL_METADATA, "true")],
    )
    .await;
    h.handle(&s3_event("exp", "amperity/customers/a.csv"), None)
        .await
        .unwrap();
    // A duplicate notification of the same forced upload finds its replay complete.
    let dup = h
        .handle(&s3_event("exp", "amperity/customers/a.csv"), None)
        .await
        .unwrap();
    assert_eq!(dup["results"][0]["outcome"], "duplicate_no_op");
    {
        let runs = rec.runs.lock().unwrap();
        assert_eq!(runs.len(), 2);
        assert!(!runs[0].force_full);
        assert!(runs[1].force_full);
        // The forced replay salts its row digests (its continuations skip what it resent);
        // the first sync does not.
        assert_eq!(runs[0].forced_salt, None);
        assert!(runs[1].forced_salt.is_some());
    }
    // An operator's --force-full resends every row, every time: no salt.
    h.run_object(
        &S3Uri::new("exp", "amperity/customers/a.csv"),
        braze_sync::run::handler::RunFlags {
            force_full: true,
            allow_departures: false,
        },
        None,
    )
    .await
    .unwrap();
    let runs = rec.runs.lock().unwrap();
    assert!(runs[2].force_full && runs[2].forced_salt.is_none());
}

#[tokio::test]
async fn a_retryable_failure_leaves_the_export_replayable() {
    let (store, rec, h) = setup();
    put(&store, "exp", "amperity/customers/a.csv", "x", &[]).await;
    rec.fail_keys.lock().unwrap().push(("a.csv".into(), true));
    assert!(
        h.handle(&s3_event("exp", "amperity/customers/a.csv"), None)
            .await
            .is_err()
    );
    rec.fail_keys.lock().unwrap().clear();
    let out = h
        .handle(&s3_event("exp", "amperity/customers/a.csv"), None)
        .await
        .unwrap();
    assert_eq!(out["results"][0]["outcome"], "synced");
}

#[tokio::test]
async fn marker_mode_syncs_all_parts_once_when_the_marker_lands() {
    let (store, rec, h) = setup();
    for p in ["part-0002.csv", "part-0001.csv", "part-0003.csv"] {
        let key = format!("amperity/audiences/run-1/{p}");
        put(&store, "exp", &key, "x", &[]).await;
        h.handle(&s3_event("exp", &key), None).await.unwrap();
    }
    assert!(
        rec.runs.lock().unwrap().is_empty(),
        "parts alone never sync"
    );
    put(&store, "exp", "amperity/audiences/run-1/.DONE", "", &[]).await;
    h.handle(&s3_event("exp", "amperity/audiences/run-1/.DONE"), None)
        .await
        .unwrap();
    let runs = rec.runs.lock().unwrap();
    assert_eq!(runs.len(), 1);
    let parts: Vec<&str> = runs[0].parts.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        parts,
        [
            "amperity/audiences/run-1/part-0001.csv",
            "amperity/audiences/run-1/part-0002.csv",
            "amperity/audiences/run-1/part-0003.csv"
        ]
    );
}

#[tokio::test]
async fn uploads_into_the_state_prefix_and_test_events_start_nothing() {
    let (store, rec, h) = setup();
    put(
        &store,
        "acme-state",
        "bridge/state/customers/head.json",
        "{}",
        &[],
    )
    .await;
    h.handle(
        &s3_event("acme-state", "bridge/state/customers/head.json"),
        None,
    )
    .await
    .unwrap();
    h.handle(
        &json!({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "exp"}),
        None,
    )
    .await
    .unwrap();
    assert!(rec.runs.lock().unwrap().is_empty());
}

fn eventbridge(bucket: &str, raw_key: &str) -> Value {
    json!({"version": "0", "id": "1", "detail-type": "Object Created", "source": "aws.s3",
        "account": "1", "time": "t", "region": "us-east-1", "resources": [],
        "detail": {"bucket": {"name": bucket}, "object": {"key": raw_key, "etag": "e1"}}})
}

#[tokio::test]
async fn eventbridge_key_with_a_plus_is_the_object_with_a_plus() {
    let (store, rec, h) = setup();
    put(
        &store,
        "exp",
        "amperity/customers/export+v2 2026-11-30.csv",
        "x",
        &[],
    )
    .await;
    let out = h
        .handle(
            &eventbridge("exp", "amperity/customers/export+v2%202026-11-30.csv"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(out["results"][0]["outcome"], "synced", "{out}");
    assert_eq!(
        rec.runs.lock().unwrap()[0].trigger.key,
        "amperity/customers/export+v2 2026-11-30.csv"
    );
}

#[tokio::test]
async fn a_missing_object_is_reported_as_object_not_found_and_acknowledged() {
    let (store, rec, h) = setup();
    // Through SQS (the deployed path for EventBridge rules): acknowledged, not retried.
    let raw = "amperity/customers/gone+v2%20%C3%A9.csv";
    let out = h
        .handle(&sqs(&[("m1", eventbridge("exp", raw).to_string())]), None)
        .await
        .unwrap();
    assert_eq!(out["batchItemFailures"], json!([]), "{out}");
    let result = &out["results"][0];
    assert_eq!(result["outcome"], "object_not_found", "{out}");
    assert_eq!(result["key_received"], raw);
    assert_eq!(result["key_decoded"], "amperity/customers/gone+v2 é.csv");
    assert!(rec.runs.lock().unwrap().is_empty(), "nothing runs");
    // The report object says so, with both keys.
    let report = S3Uri::from_str(result["report"].as_str().unwrap()).unwrap();
    assert_eq!(report.bucket, "acme-state");
    assert!(
        report.key.starts_with("bridge/reports/customers/"),
        "{report}"
    );
    let (_, body) = store.get(&report).await.unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["status"], "object_not_found");
    assert_eq!(v["object_not_found"]["key_received"], raw);
    assert_eq!(
        v["object_not_found"]["key_decoded"],
        "amperity/customers/gone+v2 é.csv"
    );
    assert_eq!(
        v["object_not_found"]["object"],
        "s3://exp/amperity/customers/gone+v2 é.csv"
    );
    // A direct invocation is acknowledged too (Lambda does not retry it forever).
    let out = h.handle(&eventbridge("exp", raw), None).await.unwrap();
    assert_eq!(out["results"][0]["outcome"], "object_not_found");
}

/// A runner whose Braze key is refused until `fixed` is set.
#[derive(Default)]
struct KeyRunner {
    fixed: Mutex<bool>,
    runs: Mutex<u32>,
}

#[async_trait]
impl ExportRunner for KeyRunner {
    async fn run(&self, _: &ExportPlan, _: Option<u64>) -> Result<RunOutcome, RunError> {
        *self.runs.lock().unwrap() += 1;
        if !*self.fixed.lock().unwrap() {
            return Err(RunError::KeyRefused {
                message: "API key refused: HTTP 401".into(),
                report: Some("s3://acme-state/bridge/reports/customers/r1.json".into()),
            });
        }
        Ok(RunOutcome {
            status: RunStatus::Complete,
            report: Some("r2.json".into()),
            summary: json!({}),
            hand_over: false,
            fan_out: None,
            pieces_unqueued: None,
        })
    }
}

#[tokio::test]
async fn a_refused_key_keeps_the_export_retryable_until_the_key_is_fixed() {
    let store = Arc::new(MemoryStore::new());
    let runner = Arc::new(KeyRunner::default());
    let h = Handler::new(cfg(), store.clone(), runner.clone());
    put(&store, "exp", "amperity/customers/k.csv", "x", &[]).await;
    let event = sqs(&[(
        "m1",
        s3_event("exp", "amperity/customers/k.csv").to_string(),
    )]);
    // Refused: the message is failed (SQS redelivers it, then the DLQ keeps it) ...
    let out = h.handle(&event, None).await.unwrap();
    assert_eq!(
        out["batchItemFailures"],
        json!([{"itemIdentifier": "m1"}]),
        "{out}"
    );
    // ... and the ledger entry is not final.
    let ledger = store
        .list("acme-state", "bridge/state/customers/ledger/")
        .await
        .unwrap();
    assert_eq!(ledger.len(), 1);
    let (_, body) = store
        .get(&S3Uri::new("acme-state", &ledger[0].key))
        .await
        .unwrap();
    let entry: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(entry["status"], "failed_retryable");
    // A redelivery while the key is still wrong runs (and is refused) again.
    h.handle(&event, None).await.unwrap();
    assert_eq!(*runner.runs.lock().unwrap(), 2);
    // Once the key is fixed, the same notification (same ETag) syncs; then it is a no-op.
    *runner.fixed.lock().unwrap() = true;
    let out = h.handle(&event, None).await.unwrap();
    assert_eq!(out["results"][0]["outcome"], "synced", "{out}");
    let out = h.handle(&event, None).await.unwrap();
    assert_eq!(out["results"][0]["outcome"], "duplicate_no_op", "{out}");
}

/// `inner` whose HEAD of the exports bucket fails with `message`: refused for good (403, as S3
/// does when the function's role or the bucket's KMS key does not allow it) or for now (503
/// SlowDown).
fn exports_unreadable(
    inner: Arc<MemoryStore>,
    message: &'static str,
    retryable: bool,
) -> Arc<dyn ObjectStore> {
    Arc::new(Hooked::new(
        inner,
        Before(move |call: Call<'_>| match call {
            Call::Head(uri) if uri.bucket == "exp" => Err(call.failed(message, retryable)),
            _ => Ok(()),
        }),
    ))
}

#[tokio::test]
async fn a_trigger_the_function_may_not_read_is_acknowledged_with_a_failed_report() {
    let mem = Arc::new(MemoryStore::new());
    let rec = Arc::new(Recorder::default());
    let h = Handler::new(
        cfg(),
        exports_unreadable(mem.clone(), "403 AccessDenied", false),
        rec.clone(),
    );
    let out = h
        .handle(
            &sqs(&[(
                "m1",
                s3_event("exp", "amperity/customers/a.csv").to_string(),
            )]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(out["batchItemFailures"], json!([]), "{out}");
    let result = &out["results"][0];
    assert_eq!(result["outcome"], "failed", "{out}");
    let report = result["report"].as_str().unwrap();
    let (_, body) = mem.get(&S3Uri::from_str(report).unwrap()).await.unwrap();
    let report: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(report["status"], "failed");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("HeadObject") && error.contains("AccessDenied"),
        "{error}"
    );
    assert!(rec.runs.lock().unwrap().is_empty());
}

/// An SQS message on its `n`th receive.
fn sqs_receive(id: &str, body: String, n: u32) -> Value {
    let mut event = sqs(&[(id, body)]);
    event["Records"][0]["attributes"] = json!({"ApproximateReceiveCount": n.to_string()});
    event
}

/// The reports under the customers route, as JSON.
async fn reports(store: &MemoryStore) -> Vec<Value> {
    let mut out = Vec::new();
    for o in store
        .list("acme-state", "bridge/reports/customers/")
        .await
        .unwrap()
    {
        let (_, body) = store.get(&S3Uri::new("acme-state", &o.key)).await.unwrap();
        out.push(serde_json::from_slice(&body).unwrap());
    }
    out
}

#[tokio::test]
async fn a_message_failing_on_its_last_receive_is_reported_and_recorded_before_the_dlq() {
    let store = Arc::new(MemoryStore::new());
    let rec = Arc::new(Recorder::default());
    let h = Handler::new(cfg(), store.clone(), rec.clone()).with_max_receive_count(Some(5));
    put(&store, "exp", "amperity/customers/a.csv", "x", &[]).await;
    rec.fail_keys.lock().unwrap().push(("a.csv".into(), true));
    let body = s3_event("exp", "amperity/customers/a.csv").to_string();
    // Receives 1 to 4 fail without a report: SQS delivers the message again.
    for n in 1..5 {
        let out = h
            .handle(&sqs_receive("m1", body.clone(), n), None)
            .await
            .unwrap();
        assert_eq!(out["batchItemFailures"], json!([{"itemIdentifier": "m1"}]));
    }
    assert!(reports(&store).await.is_empty());
    // The 5th is the last: still failed (it goes to the DLQ), but reported and recorded first.
    let out = h
        .handle(&sqs_receive("m1", body.clone(), 5), None)
        .await
        .unwrap();
    assert_eq!(out["batchItemFailures"], json!([{"itemIdentifier": "m1"}]));
    let reports = reports(&store).await;
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0]["status"], "failed");
    assert_eq!(
        reports[0]["error"],
        "gave up after 5 receives: Braze answered 503"
    );
    assert_eq!(
        reports[0]["sources"],
        json!(["s3://exp/amperity/customers/a.csv"])
    );
    let ledger = store
        .list("acme-state", "bridge/state/customers/ledger/")
        .await
        .unwrap();
    let (_, entry) = store
        .get(&S3Uri::new("acme-state", &ledger[0].key))
        .await
        .unwrap();
    let entry: Value = serde_json::from_slice(&entry).unwrap();
    assert_eq!(entry["status"], "failed_retryable", "{entry}");
    assert!(
        entry["report"]
            .as_str()
            .unwrap()
            .starts_with("s3://acme-state/bridge/reports/customers/"),
        "{entry}"
    );
    // Redriven once the cause is gone, the same notification syncs.
    rec.fail_keys.lock().unwrap().clear();
    let out = h.handle(&sqs_receive("m1", body, 1), None).await.unwrap();
    assert_eq!(out["results"][0]["outcome"], "synced", "{out}");
}

#[tokio::test]
async fn a_trigger_unreadable_for_now_on_the_last_receive_is_reported_before_the_dlq() {
    let mem = Arc::new(MemoryStore::new());
    let rec = Arc::new(Recorder::default());
    let h = Handler::new(
        cfg(),
        exports_unreadable(mem.clone(), "503 SlowDown", true),
        rec.clone(),
    )
    .with_max_receive_count(Some(5));
    let body = s3_event("exp", "amperity/customers/a.csv").to_string();
    let out = h
        .handle(&sqs_receive("m1", body.clone(), 4), None)
        .await
        .unwrap();
    assert_eq!(out["batchItemFailures"], json!([{"itemIdentifier": "m1"}]));
    assert!(reports(&mem).await.is_empty());
    let out = h.handle(&sqs_receive("m1", body, 5), None).await.unwrap();
    assert_eq!(out["batchItemFailures"], json!([{"itemIdentifier": "m1"}]));
    let reports = reports(&mem).await;
    assert_eq!(reports.len(), 1, "{reports:?}");
    let error = reports[0]["error"].as_str().unwrap();
    assert!(
        error.starts_with("gave up after 5 receives: ") && error.contains("SlowDown"),
        "{error}"
    );
    assert!(rec.runs.lock().unwrap().is_empty());
}
