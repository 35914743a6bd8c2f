//! braze-sync on a bad day, over the local stack (moto S3/SQS/Secrets Manager + runtime
//! emulator + Braze simulator): a refused API key keeps the export retryable and a warm
//! container picks up the fixed key from its secret; keys with `+`, space, `%`, `=` and non-ASCII
//! are decoded per trigger shape (EventBridge keeps a `+`); a notification naming a missing
//! object is reported as `object_not_found`, not acknowledged silently.

use std::time::Duration;

use harness::samples;
use harness::stack::{
    BRAZE_KEY, BRAZE_KEY_SECRET, EXPORTS_BUCKET, STATE_BUCKET, Stack, StackOptions,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);

/// Form encoding, as S3 notifications carry keys (`+` for space, `%2B` for plus).
fn form_encode(key: &str) -> String {
    bridge_shared::s3_uri::encode_key(key).replace("%20", "+")
}

/// EventBridge's encoding: no form encoding; `+` and `=` stay literal.
fn eventbridge_encode(key: &str) -> String {
    bridge_shared::s3_uri::encode_key(key)
        .replace("%2B", "+")
        .replace("%3D", "=")
}

fn s3_event(key: &str) -> Value {
    json!({"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": EXPORTS_BUCKET}, "object": {"key": form_encode(key)}}}]})
}

fn eventbridge_event(raw_key: &str) -> Value {
    json!({"version": "0", "id": "e1", "detail-type": "Object Created", "source": "aws.s3",
        "account": "123456789012", "time": "2026-11-30T00:00:00Z", "region": "us-east-1",
        "resources": [], "detail": {"version": "0", "bucket": {"name": EXPORTS_BUCKET},
        "object": {"key": raw_key}, "reason": "PutObject"}})
}

fn sqs_record(id: &str, body: String) -> Value {
    json!({"messageId": id, "receiptHandle": "r", "body": body, "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:braze-sync-exports",
        "awsRegion": "us-east-1", "attributes": {}, "messageAttributes": {}, "md5OfBody": ""})
}

async fn reports(stack: &Stack) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for k in stack
        .moto
        .list(STATE_BUCKET, "bridge/reports/customers/")
        .await?
    {
        out.push(serde_json::from_slice(
            &stack.moto.get(STATE_BUCKET, &k).await?,
        )?);
    }
    Ok(out)
}

async fn ledger_statuses(stack: &Stack, object: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for k in stack
        .moto
        .list(STATE_BUCKET, "bridge/state/customers/ledger/")
        .await?
    {
        let v: Value = serde_json::from_slice(&stack.moto.get(STATE_BUCKET, &k).await?)?;
        if v["export_id"]
            .as_str()
            .is_some_and(|id| id.starts_with(object))
        {
            out.push(v["status"].as_str().unwrap_or_default().to_string());
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_key_then_fixed_and_keys_decoded_per_shape_and_missing_objects_reported()
-> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        currents: false,
        api_key_secret: Some("braze-wrong-key-0000".into()),
        log_dir: std::env::var_os("BRIDGE_TEST_LOGS").map(Into::into),
        ..Default::default()
    })
    .await?;
    let sim = stack.sim.as_ref().expect("sim");
    let f = stack.sync_fn.as_ref().expect("function");

    // 1. The secret holds a wrong key. The upload's notification is retried by SQS (each
    //    attempt one request, the key read again each time) and ends in the DLQ; nothing is
    //    committed, the report and its metric say "API key refused", the ledger keeps the
    //    export retryable.
    let k = "amperity/customers/customers_2026-11-30T010000.csv";
    stack
        .moto
        .put(EXPORTS_BUCKET, k, samples::customers_csv(0..10, 1))
        .await?;
    stack.wait_idle(WAIT).await?;
    assert_eq!(sim.stats().objects_applied, 0);
    let refused: Vec<Value> = reports(&stack)
        .await?
        .into_iter()
        .filter(|r| r["api_key_refused"] == true)
        .collect();
    assert!(!refused.is_empty(), "the report says the key was refused");
    for r in &refused {
        assert_eq!(r["status"], "failed");
        let err = r["error"].as_str().unwrap_or_default();
        assert!(err.starts_with("API key refused"), "{err}");
        assert!(
            err.contains("read again from its store and is unchanged"),
            "{err}"
        );
        assert!(
            !err.contains("braze-wrong-key-0000"),
            "the key never shows: {err}"
        );
    }
    let object = format!("s3://{EXPORTS_BUCKET}/{k}");
    assert_eq!(
        ledger_statuses(&stack, &object).await?,
        ["failed_retryable"]
    );
    let dlq = stack.sync_dlq_url.clone().expect("dlq");
    let parked = stack
        .moto
        .sqs
        .receive_message()
        .queue_url(&dlq)
        .send()
        .await?;
    assert_eq!(
        parked.messages().len(),
        1,
        "the notification waits in the DLQ"
    );
    assert_eq!(
        sim.stats().requests_total,
        refused.len() as u64,
        "one request per delivery attempt"
    );

    // 2. The operator fixes the secret; the same notification (same object, same ETag) is
    //    delivered again to the same warm container: it reads the key again and syncs.
    stack.moto.put_secret(BRAZE_KEY_SECRET, BRAZE_KEY).await?;
    let r = f
        .invoke(&json!({"Records": [sqs_record("again", s3_event(k).to_string())]}))
        .await?;
    assert_eq!(r.body["batchItemFailures"], json!([]), "{:?}", r.body);
    assert_eq!(r.body["results"][0]["outcome"], "synced", "{:?}", r.body);
    assert_eq!(sim.stats().objects_applied, 10);
    assert_eq!(ledger_statuses(&stack, &object).await?, ["complete"]);

    // 3. A key with `+`, space, `%`, `=` and non-ASCII, through EventBridge (the path for
    //    existing buckets), plain and wrapped in SQS: a `+` there is a plus. (A newer export of
    //    the same users, so the departure guard has nothing to hold.)
    let hard = "amperity/customers/export+v2 2026-11-30T020000 100%=é.csv";
    stack
        .moto
        .put(EXPORTS_BUCKET, hard, samples::customers_csv(0..10, 1))
        .await?;
    stack.wait_idle(WAIT).await?;
    let raw = eventbridge_encode(hard);
    assert!(
        raw.contains("export+v2%20") && raw.contains("%25=%C3%A9"),
        "{raw}"
    );
    let r = f.invoke(&eventbridge_event(&raw)).await?;
    let outcome = r.body["results"][0]["outcome"].as_str().unwrap_or_default();
    assert!(
        outcome == "synced" || outcome == "duplicate_no_op",
        "{:?}",
        r.body
    );
    assert_eq!(
        r.body["results"][0]["object"],
        format!("s3://{EXPORTS_BUCKET}/{hard}")
    );
    let r = f
        .invoke(&json!({"Records": [sqs_record("eb", eventbridge_event(&raw).to_string())]}))
        .await?;
    assert_eq!(
        r.body["results"][0]["outcome"], "duplicate_no_op",
        "{:?}",
        r.body
    );
    // The same object through an S3 notification (form-encoded).
    let r = f.invoke(&s3_event(hard)).await?;
    assert_eq!(
        r.body["results"][0]["outcome"], "duplicate_no_op",
        "{:?}",
        r.body
    );
    // The same users as before (no departures to hold): found, read and found unchanged.
    let reports_of_hard = reports(&stack)
        .await?
        .into_iter()
        .filter(|r| r["sources"][0] == format!("s3://{EXPORTS_BUCKET}/{hard}"))
        .count();
    assert!(reports_of_hard >= 1, "the export with the hard key ran");

    // 4. A notification for an object that does not exist: reported, acknowledged, never
    //    retried.
    let gone = "amperity/customers/deleted+v3 é.csv";
    let raw_gone = eventbridge_encode(gone);
    let r = f
        .invoke(&json!({"Records": [sqs_record("gone", eventbridge_event(&raw_gone).to_string())]}))
        .await?;
    assert_eq!(r.body["batchItemFailures"], json!([]), "{:?}", r.body);
    assert_eq!(r.body["results"][0]["outcome"], "object_not_found");
    let missing: Vec<Value> = reports(&stack)
        .await?
        .into_iter()
        .filter(|r| r["status"] == "object_not_found")
        .filter(|r| r["object_not_found"]["key_decoded"] == gone)
        .collect();
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert_eq!(missing[0]["object_not_found"]["key_received"], raw_gone);
    assert_eq!(missing[0]["object_not_found"]["key_decoded"], gone);
    Ok(())
}
