//! Fan-out over the local stack: with `BRIDGE_FAN_OUT_PIECES=3`, each export is split into 3
//! pieces that the real function queues on its own queue (moto SQS) and runs from there
//! (poller → runtime emulator → handler), each piece cut by a short `BRIDGE_MAX_RUN_SECONDS`
//! against a rate-limited Braze simulator and handing itself over, the last one merging the
//! forks. The simulator ends with exactly the profiles of single-invocation runs (the CLI, on
//! a fresh state bucket and simulator) of the same exports; every report is complete and
//! lists its pieces; no fan-out control object is left; the route lock is free. And 3 pieces
//! in 3 concurrent invocations share the simulator's rate limit (the 429 share is printed).

use std::time::Duration;

use harness::moto::aws_env;
use harness::samples;
use harness::stack::{BRAZE_KEY, EXPORTS_BUCKET, STATE_BUCKET, Stack, StackOptions};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(180);
const REF_STATE: &str = "reference-state";

async fn reports(stack: &Stack) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for k in stack.moto.list(STATE_BUCKET, "bridge/reports/").await? {
        out.push(serde_json::from_slice(
            &stack.moto.get(STATE_BUCKET, &k).await?,
        )?);
    }
    Ok(out)
}

/// A single-invocation run of `key` by the CLI (no continuation queue: never fans out) on
/// its own state bucket and simulator.
async fn reference_run(stack: &Stack, sim: &braze_sim::SimHandle, key: &str) -> anyhow::Result<()> {
    let mut cmd = tokio::process::Command::new(harness::paths::function_binary("braze-sync")?);
    cmd.arg("run")
        .arg(format!("s3://{EXPORTS_BUCKET}/{key}"))
        .envs(aws_env(&stack.moto.endpoint))
        .env("ROUTES_LOCATION", &stack.routes_dir)
        .env("STATE_BUCKET", REF_STATE)
        .env("BRAZE_REST_ENDPOINT", sim.base_url())
        .env("BRAZE_API_KEY", BRAZE_KEY)
        .env("RUST_LOG", "warn")
        .env_remove("AWS_LAMBDA_RUNTIME_API")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = cmd.output().await?;
    anyhow::ensure!(
        out.status.success(),
        "reference run of {key} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_fanned_out_over_the_queue_ends_as_a_single_run() -> anyhow::Result<()> {
    // 20 requests/s at 10 users per request, and pieces that stop after 1 s of sending: the
    // first export's pieces hand themselves over.
    let mut opts = StackOptions {
        currents: false,
        log_dir: std::env::var_os("BRIDGE_TEST_LOGS").map(Into::into),
        ..Default::default()
    };
    opts.sim.rate_limit_requests = 20;
    opts.sim.rate_limit_window = Duration::from_secs(1);
    for (k, v) in [
        ("BRIDGE_FAN_OUT_PIECES", "3"),
        ("BRIDGE_MAX_RUN_SECONDS", "1"),
        ("BRIDGE_CHECKPOINT_MS", "200"),
        ("BRAZE_RATE_LIMIT_REQUESTS", "20"),
        ("BRAZE_RATE_LIMIT_WINDOW_SECS", "1"),
        ("BRAZE_MAX_OBJECTS_PER_REQUEST", "10"),
    ] {
        opts.sync_env.push((k.to_string(), v.to_string()));
    }
    let stack = Stack::start(opts).await?;
    let sim = stack.sim.as_ref().expect("sim");
    let reference = braze_sim::start(braze_sim::SimConfig {
        api_key: BRAZE_KEY.to_string(),
        ..Default::default()
    })
    .await?;
    stack.moto.create_bucket(REF_STATE).await?;

    // First export: 1,000 new users. Second: users 100.. with every tenth changed, 100 gone,
    // 100 new.
    let k1 = "amperity/customers/customers_2026-11-29.csv";
    stack
        .moto
        .put(EXPORTS_BUCKET, k1, samples::customers_csv(0..1_000, 1))
        .await?;
    stack.wait_idle(WAIT).await?;
    reference_run(&stack, &reference, k1).await?;
    let k2 = "amperity/customers/customers_2026-11-30.csv";
    let users = (100..1_100).map(|i| (i, if i % 10 == 0 { 2 } else { 1 }));
    stack
        .moto
        .put(EXPORTS_BUCKET, k2, samples::customers_csv_versions(users))
        .await?;
    stack.wait_idle(WAIT).await?;
    reference_run(&stack, &reference, k2).await?;

    assert_eq!(sim.users().len(), 1_100);
    assert_eq!(
        sim.users(),
        reference.users(),
        "the fanned-out exports give the profiles of single runs"
    );
    let all = reports(&stack).await?;
    let finished: Vec<&Value> = all
        .iter()
        .filter(|r| {
            r["fan_out"]["piece_reports"]
                .as_array()
                .is_some_and(|p| p.len() == 3)
        })
        .collect();
    assert_eq!(finished.len(), 2, "two fanned-out exports: {all:?}");
    for r in &finished {
        assert_eq!(r["status"], "complete", "{r}");
    }
    let second = finished
        .iter()
        .find(|r| r["export_id"].as_str().is_some_and(|e| e.contains("11-30")))
        .expect("the second export's report");
    // The same figures as the single run's report.
    let mut reference_reports = Vec::new();
    for k in stack.moto.list(REF_STATE, "bridge/reports/").await? {
        let r: Value = serde_json::from_slice(&stack.moto.get(REF_STATE, &k).await?)?;
        reference_reports.push(r);
    }
    let single = reference_reports
        .iter()
        .find(|r| r["export_id"].as_str().is_some_and(|e| e.contains("11-30")))
        .expect("the reference's second report");
    for field in [
        "rows_in",
        "users_sent",
        "unchanged",
        "rejected",
        "departures_sent",
        "departures_held",
    ] {
        assert_eq!(
            second[field], single[field],
            "{field}: {second} vs {single}"
        );
    }
    // The first export's pieces handed themselves over before their deadline: more messages
    // than the 2 exports and their 6 pieces.
    let poller = stack.sync_poller.as_ref().expect("poller");
    let messages = poller
        .stats
        .messages
        .load(std::sync::atomic::Ordering::Relaxed);
    let http_429 = sim.stats().by_status.get("429").copied().unwrap_or(0);
    eprintln!(
        "messages: {messages}; requests: {}; 429s: {http_429}",
        sim.stats().requests_total
    );
    assert!(
        messages > 8,
        "{messages} messages: no piece was handed over"
    );
    // Nothing of the fan-outs is left but the state the route head references.
    let left = stack
        .moto
        .list(STATE_BUCKET, "bridge/state/customers/_fan_out/")
        .await?;
    assert!(
        left.iter()
            .all(|k| k.ends_with(".bin") && !k.ends_with("departures.bin")),
        "{left:?}"
    );
    let lock: Value = serde_json::from_slice(
        &stack
            .moto
            .get(STATE_BUCKET, "bridge/state/customers/route-lock.json")
            .await?,
    )?;
    assert_eq!(lock["released"], true);
    Ok(())
}

/// Three copies of the function (three "concurrent executions"), each fed one message at a
/// time by its own poller from the one queue: the 3 pieces of an export send at the same time
/// against the simulator's rate limit, sharing it through the sender registry in moto S3.
/// Prints the share of requests answered 429 and holds it to 1%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_in_concurrent_invocations_share_the_rate_limit() -> anyhow::Result<()> {
    use harness::emulator::FunctionUnderEmulator;
    use harness::moto::Moto;
    use harness::poller::Poller;
    use std::sync::Arc;
    const LIMIT: u64 = 30;
    let moto = Moto::start(None).await?;
    moto.create_bucket(EXPORTS_BUCKET).await?;
    moto.create_bucket(STATE_BUCKET).await?;
    let (url, arn, _dlq) = moto
        .create_queue_with_dlq("braze-sync-exports", 30, 3)
        .await?;
    moto.notify_queue(EXPORTS_BUCKET, "amperity/", &arn).await?;
    let sim = braze_sim::start(braze_sim::SimConfig {
        api_key: BRAZE_KEY.to_string(),
        rate_limit_requests: LIMIT,
        rate_limit_window: Duration::from_secs(1),
        ..Default::default()
    })
    .await?;
    let mut env = aws_env(&moto.endpoint);
    for (k, v) in [
        (
            "ROUTES_LOCATION",
            harness::paths::workspace_root()
                .join("functions/braze-sync/routes")
                .display()
                .to_string(),
        ),
        ("STATE_BUCKET", STATE_BUCKET.to_string()),
        ("BRAZE_REST_ENDPOINT", sim.base_url()),
        ("BRAZE_API_KEY", BRAZE_KEY.to_string()),
        ("CONTINUATION_QUEUE_URL", url.clone()),
        ("BRIDGE_FAN_OUT_PIECES", "3".to_string()),
        ("BRAZE_RATE_LIMIT_REQUESTS", LIMIT.to_string()),
        ("BRAZE_RATE_LIMIT_WINDOW_SECS", "1".to_string()),
        ("BRAZE_MAX_OBJECTS_PER_REQUEST", "10".to_string()),
        ("RUST_LOG", "info".to_string()),
        (
            braze_sync::config::env::INSECURE_PLAIN_KEY_SWITCH,
            "1".to_string(),
        ),
    ] {
        env.push((k.to_string(), v));
    }
    let logs: Option<std::path::PathBuf> = std::env::var_os("BRIDGE_TEST_LOGS").map(Into::into);
    let mut pollers = Vec::new();
    let mut functions = Vec::new();
    for i in 0..3 {
        let log = logs.as_ref().map(|d| d.join(format!("braze-sync-{i}.log")));
        let f = Arc::new(FunctionUnderEmulator::start("braze-sync", &env, log.as_deref()).await?);
        pollers.push(Poller::start(
            moto.sqs.clone(),
            url.clone(),
            arn.clone(),
            f.clone(),
            1,
        ));
        functions.push(f);
    }
    moto.put(
        EXPORTS_BUCKET,
        "amperity/customers/customers_2026-11-29.csv",
        samples::customers_csv(0..1_500, 1),
    )
    .await?;
    // Every poller idle at once.
    for _ in 0..3 {
        for p in &pollers {
            p.wait_idle(WAIT).await?;
        }
    }
    assert_eq!(sim.users().len(), 1_500);
    let mut finished = Vec::new();
    for k in moto.list(STATE_BUCKET, "bridge/reports/").await? {
        let r: Value = serde_json::from_slice(&moto.get(STATE_BUCKET, &k).await?)?;
        if r["fan_out"]["piece_reports"]
            .as_array()
            .is_some_and(|p| p.len() == 3)
        {
            finished.push(r);
        }
    }
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0]["status"], "complete", "{}", finished[0]);
    let senders = finished[0]["workspace_senders"].as_u64().unwrap_or(0);
    let stats = sim.stats();
    let http_429 = stats.by_status.get("429").copied().unwrap_or(0);
    let share = http_429 as f64 / stats.requests_total.max(1) as f64;
    eprintln!(
        "3 pieces in 3 invocations at once (up to {senders} senders seen): {} requests, {http_429} answered 429 ({:.2}%)",
        stats.requests_total,
        share * 100.0
    );
    assert!(senders >= 2, "the pieces did not send at the same time");
    assert!(
        share <= 0.01,
        "{http_429} of {} requests met a 429",
        stats.requests_total
    );
    drop(pollers);
    Ok(())
}
