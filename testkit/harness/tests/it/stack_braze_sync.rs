//! braze-sync end to end on the local stack: an upload to moto reaches the function through
//! S3 → SQS → poller → Lambda runtime emulator, and the Braze simulator ends with exactly the
//! profiles the export describes; a changed export sends only the changes; duplicates, replays,
//! forced replays, odd keys, marker-mode exports and uploads into our own prefixes behave.

use std::time::Duration;

use harness::samples;
use harness::stack::{EXPORTS_BUCKET, STATE_BUCKET, Stack, StackOptions};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

async fn stack() -> anyhow::Result<Stack> {
    Stack::start(StackOptions {
        currents: false,
        log_dir: std::env::var_os("BRIDGE_TEST_LOGS").map(Into::into),
        ..Default::default()
    })
    .await
}

fn objects_applied(stack: &Stack) -> u64 {
    stack
        .sim
        .as_ref()
        .map(|s| s.stats().objects_applied)
        .unwrap_or(0)
}

async fn report_statuses(stack: &Stack) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for k in stack.moto.list(STATE_BUCKET, "bridge/reports/").await? {
        let v: Value = serde_json::from_slice(&stack.moto.get(STATE_BUCKET, &k).await?)?;
        out.push(v["status"].as_str().unwrap_or("?").to_string());
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_reaches_braze_then_only_changes_go_and_replays_are_safe() -> anyhow::Result<()> {
    let stack = stack().await?;
    let sim = stack.sim.as_ref().expect("sim");

    // 1. First export: every user is new and sent whole.
    let key = "amperity/customers/customers 2026-11-29+full.csv";
    stack
        .moto
        .put(EXPORTS_BUCKET, key, samples::customers_csv(0..200, 1))
        .await?;
    stack.wait_idle(WAIT).await?;
    assert_eq!(sim.users().len(), 200, "every user reached Braze");
    let u7 = sim.user("AMP-00000007").expect("user 7");
    assert_eq!(u7["first_name"], samples::customer_row(7, 1)[2]);
    assert_eq!(u7["country"], "JP");
    assert_eq!(u7["dob"], "1957-08-08");
    assert!(u7["external_id"].is_string());
    let first = objects_applied(&stack);
    assert_eq!(first, 200);

    // 2. The same notification again (S3/SQS are at-least-once): a no-op.
    stack
        .moto
        .put(EXPORTS_BUCKET, key, samples::customers_csv(0..200, 1))
        .await?;
    stack.wait_idle(WAIT).await?;
    assert_eq!(
        objects_applied(&stack),
        first,
        "an unchanged re-upload sends nothing"
    );

    // 3. A changed export: 10 users changed, 5 new, 5 gone -> only those 15 go.
    let users = (5..205).map(|i| (i, if i % 20 == 0 { 2 } else { 1 }));
    let key2 = "amperity/customers/customers_2026-11-30.csv";
    stack
        .moto
        .put(EXPORTS_BUCKET, key2, samples::customers_csv_versions(users))
        .await?;
    stack.wait_idle(WAIT).await?;
    let sent = objects_applied(&stack) - first;
    assert_eq!(sent, 10 + 5, "only changed and new users are sent");
    assert_eq!(
        sim.user("AMP-00000020").expect("u20")["loyalty_tier"],
        samples::customer_row(20, 2)[12]
    );

    // 4. A forced replay of the second export resends everything.
    let before = objects_applied(&stack);
    stack
        .moto
        .s3
        .copy_object()
        .bucket(EXPORTS_BUCKET)
        .key(key2)
        .copy_source(format!("{EXPORTS_BUCKET}/{key2}"))
        .metadata("bridge-force-full", "true")
        .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
        .send()
        .await?;
    stack.wait_idle(WAIT).await?;
    assert_eq!(
        objects_applied(&stack) - before,
        200,
        "forced replay sends every user"
    );

    // 5. An upload into our own state prefix starts nothing.
    let reports_before = report_statuses(&stack).await?.len();
    stack
        .moto
        .put(
            EXPORTS_BUCKET,
            "bridge/state/customers/x.csv",
            b"a,b\n".to_vec(),
        )
        .await?;
    stack
        .moto
        .put(
            STATE_BUCKET,
            "bridge/state/customers/y.csv",
            b"a,b\n".to_vec(),
        )
        .await?;
    stack.wait_idle(WAIT).await?;
    assert_eq!(report_statuses(&stack).await?.len(), reports_before);
    let statuses = report_statuses(&stack).await?;
    assert!(statuses.iter().all(|s| s == "complete"), "{statuses:?}");
    Ok(())
}
