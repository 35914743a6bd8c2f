//! braze-sync's triggers and ordering on the local stack (moto + runtime emulator + Braze
//! simulator): direct S3 and EventBridge invocations beside the SQS path, an SQS batch with a
//! bad message, multi-part CSV and Parquet-folder exports finished by a `.DONE` marker and the
//! same notification twice. Export order (two landing together, an older one arriving late) is
//! in `stack_bad_day.rs`, with a route that declares its order.

use std::time::Duration;

use harness::samples;
use harness::stack::{EXPORTS_BUCKET, Stack, StackOptions};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);

fn s3_event(key: &str) -> Value {
    let encoded: String = key
        .split('/')
        .map(|seg| {
            seg.replace('%', "%25")
                .replace('+', "%2B")
                .replace(' ', "+")
        })
        .collect::<Vec<_>>()
        .join("/");
    json!({"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": EXPORTS_BUCKET}, "object": {"key": encoded}}}]})
}

fn sqs_record(id: &str, body: String) -> Value {
    json!({"messageId": id, "receiptHandle": "r", "body": body, "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:braze-sync-exports",
        "awsRegion": "us-east-1", "attributes": {}, "messageAttributes": {}, "md5OfBody": ""})
}

/// Uploads without the bucket notification, so only our explicit invocations start syncs.
async fn put_quiet(stack: &Stack, key: &str, body: Vec<u8>) -> anyhow::Result<()> {
    stack.moto.put(EXPORTS_BUCKET, key, body).await?;
    stack.wait_idle(WAIT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_shapes_markers_duplicates_and_ordering() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        currents: false,
        log_dir: std::env::var_os("BRIDGE_TEST_LOGS").map(Into::into),
        ..Default::default()
    })
    .await?;
    let sim = stack.sim.as_ref().expect("sim");
    let f = stack.sync_fn.as_ref().expect("function");
    let applied = || sim.stats().objects_applied;

    // Direct S3 notification and EventBridge event, invoked through the emulator's Invoke API.
    // (The upload also notifies SQS; whichever comes second is a ledger no-op.)
    let k1 = "amperity/customers/direct 2026-11-01T000000.csv";
    put_quiet(&stack, k1, samples::customers_csv(0..10, 1)).await?;
    let r = f.invoke(&s3_event(k1)).await?;
    assert!(r.ok(), "{:?}", r.body);
    assert_eq!(
        r.body["results"][0]["outcome"], "duplicate_no_op",
        "{:?}",
        r.body
    );
    let eb = json!({"version": "0", "id": "e1", "detail-type": "Object Created", "source": "aws.s3",
        "account": "123456789012", "time": "2026-11-29T00:00:00Z", "region": "us-east-1",
        "resources": [], "detail": {"version": "0", "bucket": {"name": EXPORTS_BUCKET},
        "object": {"key": "amperity/customers/direct%202026-11-01T000000.csv"}, "reason": "PutObject"}});
    let r = f.invoke(&eb).await?;
    assert_eq!(
        r.body["results"][0]["outcome"], "duplicate_no_op",
        "{:?}",
        r.body
    );
    assert_eq!(applied(), 10);

    // An SQS batch with one good message and one that names no object: the good one syncs,
    // the bad one is acknowledged (it can never succeed), nothing is reported as failed.
    let k2 = "amperity/customers/sqs 2026-11-02T000000.csv";
    put_quiet(&stack, k2, samples::customers_csv(0..10, 2)).await?;
    let r = f
        .invoke(&json!({"Records": [
            sqs_record("good", s3_event(k2).to_string()),
            sqs_record("bad", "{\"not\": \"an S3 event\"}".into()),
        ]}))
        .await?;
    assert_eq!(r.body["batchItemFailures"], json!([]), "{:?}", r.body);

    // Three CSV parts then the marker: parts alone start nothing; the marker syncs all.
    let before = applied();
    for (n, ids) in [(1, 100..110), (2, 110..120), (3, 120..130)] {
        let key = format!("amperity/loyalty/run-2026-11-03/part-000{n}.csv");
        stack
            .moto
            .put(EXPORTS_BUCKET, &key, samples::customers_csv(ids, 1))
            .await?;
    }
    stack.wait_idle(WAIT).await?;
    assert_eq!(applied(), before, "parts never sync alone");
    stack
        .moto
        .put(
            EXPORTS_BUCKET,
            "amperity/loyalty/run-2026-11-03/.DONE",
            Vec::new(),
        )
        .await?;
    stack.wait_idle(WAIT).await?;
    assert_eq!(
        applied() - before,
        30,
        "all three parts synced as one export"
    );
    assert_eq!(
        sim.user("AMP-00000125").expect("u125")["loyalty_tier"],
        samples::customer_row(125, 1)[12]
    );

    // A Parquet folder with a marker.
    let before = applied();
    for (n, ids) in [(0, 200..215), (1, 215..230)] {
        let key = format!("amperity/loyalty/run-2026-11-04/part-{n:05}.snappy.parquet");
        stack
            .moto
            .put(EXPORTS_BUCKET, &key, samples::customers_parquet(ids, 1)?)
            .await?;
    }
    stack
        .moto
        .put(
            EXPORTS_BUCKET,
            "amperity/loyalty/run-2026-11-04/.DONE",
            Vec::new(),
        )
        .await?;
    stack.wait_idle(WAIT).await?;
    assert_eq!(
        applied() - before,
        30,
        "a Parquet folder syncs as one export"
    );

    // The same SQS notification delivered twice: one sync, the second a reported no-op.
    let done = s3_event("amperity/loyalty/run-2026-11-04/.DONE").to_string();
    let before = applied();
    let r = f
        .invoke(&json!({"Records": [sqs_record("again", done)]}))
        .await?;
    assert_eq!(
        r.body["results"][0]["outcome"], "duplicate_no_op",
        "{:?}",
        r.body
    );
    assert_eq!(applied(), before);

    // Nothing went to the dead-letter queue.
    let dlq = stack.sync_dlq_url.clone().expect("dlq");
    let msgs = stack
        .moto
        .sqs
        .receive_message()
        .queue_url(dlq)
        .send()
        .await?;
    assert!(msgs.messages().is_empty(), "DLQ is empty");
    Ok(())
}
