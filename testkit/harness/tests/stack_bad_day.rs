//! braze-sync on a bad day, over the local stack (moto + runtime emulator + Braze simulator):
//! exports ordered as their route declares (two landing together, an older one arriving late
//! and skipped as `skipped_stale`, a key dated 2099 refused, a forced replay of an older export).

use std::path::PathBuf;
use std::time::Duration;

use harness::samples;
use harness::stack::{EXPORTS_BUCKET, STATE_BUCKET, Stack, StackOptions};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);

/// A routes folder of its own for one test.
fn routes_dir(test: &str, files: &[(&str, &str)]) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("bridge-routes-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for (name, text) in files {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(dir)
}

async fn stack(routes: PathBuf) -> anyhow::Result<Stack> {
    Stack::start(StackOptions {
        currents: false,
        routes_dir: routes,
        log_dir: std::env::var_os("BRIDGE_TEST_LOGS").map(Into::into),
        ..Default::default()
    })
    .await
}

/// Every JSON object under a prefix of the state bucket.
async fn objects(stack: &Stack, prefix: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for k in stack.moto.list(STATE_BUCKET, prefix).await? {
        out.push(serde_json::from_slice(
            &stack.moto.get(STATE_BUCKET, &k).await?,
        )?);
    }
    Ok(out)
}

fn s3_event(key: &str) -> Value {
    json!({"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": EXPORTS_BUCKET}, "object": {"key": key}}}]})
}

const ORDERED: &str = r#"
name = "ordered"
prefix = "amperity/ordered/"
update_existing_only = false
order_by = "key"
key_time_format = "customers_%Y-%m-%dT%H%M%S.csv"
[identifier]
kind = "external_id"
column = "amperity_id"
[attributes.order_count]
type = "Integer"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_apply_in_declared_order_stale_is_skipped_future_is_refused() -> anyhow::Result<()>
{
    let stack = stack(routes_dir("order", &[("ordered.toml", ORDERED)])?).await?;
    let sim = stack.sim.as_ref().expect("sim");
    let f = stack.sync_fn.as_ref().expect("function");
    let applied = || sim.stats().objects_applied;
    let order_count =
        |i: u64| sim.user(&format!("AMP-{i:08}")).expect("user")["order_count"].to_string();

    // Two exports of one route landing together: applied one after the other, and the
    // final profiles are the newer export's whichever ran first.
    let older = "amperity/ordered/customers_2026-11-05T100000.csv";
    let newer = "amperity/ordered/customers_2026-11-05T100001.csv";
    let (a, b) = tokio::join!(
        stack
            .moto
            .put(EXPORTS_BUCKET, older, samples::customers_csv(0..10, 3)),
        stack
            .moto
            .put(EXPORTS_BUCKET, newer, samples::customers_csv(0..10, 4)),
    );
    a?;
    b?;
    stack.wait_idle(WAIT).await?;
    for i in 0..10u64 {
        assert_eq!(order_count(i), samples::customer_row(i, 4)[14], "user {i}");
    }

    // An older export arriving after a newer one: skipped_stale in the report, the ledger and
    // the response; never applied, never `complete`.
    let before = applied();
    let stale = "amperity/ordered/customers_2026-11-04T090000.csv";
    stack
        .moto
        .put(EXPORTS_BUCKET, stale, samples::customers_csv(0..10, 5))
        .await?;
    stack.wait_idle(WAIT).await?;
    assert_eq!(applied(), before, "an older export is never applied");
    let reports = objects(&stack, "bridge/reports/ordered/").await?;
    let skipped: Vec<&Value> = reports
        .iter()
        .filter(|r| r["status"] == "skipped_stale")
        .collect();
    assert!(
        skipped
            .iter()
            .any(|r| r["sources"][0].as_str().unwrap_or("").ends_with(stale)),
        "{reports:?}"
    );
    let ledger = objects(&stack, "bridge/state/ordered/ledger/").await?;
    let entry = ledger
        .iter()
        .find(|e| e["export_id"].as_str().unwrap_or("").contains(stale))
        .expect("ledger entry of the stale export");
    assert_eq!(entry["status"], "skipped_stale", "{entry}");
    let r = f.invoke(&s3_event(stale)).await?;
    assert_eq!(
        r.body["results"][0]["outcome"], "skipped_stale",
        "{:?}",
        r.body
    );

    // A key dated 2099 is refused with its reason: it cannot pin the watermark, and the next
    // genuine export still applies.
    let future = "amperity/ordered/customers_2099-12-31T000000.csv";
    stack
        .moto
        .put(EXPORTS_BUCKET, future, samples::customers_csv(0..10, 6))
        .await?;
    stack.wait_idle(WAIT).await?;
    assert_eq!(applied(), before, "a future-dated export is not applied");
    let reports = objects(&stack, "bridge/reports/ordered/").await?;
    let refused = reports
        .iter()
        .find(|r| r["sources"][0].as_str().unwrap_or("").ends_with(future))
        .expect("a report for the refused export");
    assert_eq!(refused["status"], "failed");
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or("")
            .contains("max_future_skew"),
        "{refused}"
    );
    let genuine = "amperity/ordered/customers_2026-11-06T000000.csv";
    stack
        .moto
        .put(EXPORTS_BUCKET, genuine, samples::customers_csv(0..10, 7))
        .await?;
    stack.wait_idle(WAIT).await?;
    assert_eq!(order_count(3), samples::customer_row(3, 7)[14]);

    // A forced replay of the older export is allowed, sent in full and says so; the watermark
    // stays at the newest export.
    stack
        .moto
        .s3
        .copy_object()
        .bucket(EXPORTS_BUCKET)
        .key(stale)
        .copy_source(format!("{EXPORTS_BUCKET}/{stale}"))
        .metadata("bridge-force-full", "true")
        .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
        .send()
        .await?;
    stack.wait_idle(WAIT).await?;
    assert_eq!(order_count(3), samples::customer_row(3, 5)[14], "replayed");
    let reports = objects(&stack, "bridge/reports/ordered/").await?;
    assert!(
        reports
            .iter()
            .any(|r| r["forced_older_replay"] == true && r["status"] == "complete"),
        "{reports:?}"
    );
    let head: Value = serde_json::from_slice(
        &stack
            .moto
            .get(STATE_BUCKET, "bridge/state/ordered/head.json")
            .await?,
    )?;
    assert!(
        head["watermark"]["export_id"]
            .as_str()
            .unwrap_or("")
            .contains(genuine),
        "{head}"
    );
    Ok(())
}
