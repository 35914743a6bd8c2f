//! braze-sync on a bad day, over the local stack (moto + runtime emulator + Braze simulator):
//! exports ordered as their route declares (two landing together, an older one arriving late
//! and skipped as `skipped_stale`, a key dated 2099 refused, a forced replay of an older
//! export); audience departures guarded (a marker export missing a part, an 80% mass departure
//! held then released, rows without a readable identifier).

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

fn audience_route(name: &str, prefix: &str, mode: &str) -> String {
    format!(
        r#"
name = "{name}"
prefix = "{prefix}"
mode = "{mode}"
update_existing_only = false
[identifier]
kind = "external_id"
column = "amperity_id"
[attributes.order_count]
type = "Integer"
[[audiences]]
attribute = "aud_loyal"
"#
    )
}

async fn put_meta(
    stack: &Stack,
    key: &str,
    body: Vec<u8>,
    meta: &[(&str, &str)],
) -> anyhow::Result<()> {
    let mut req = stack
        .moto
        .s3
        .put_object()
        .bucket(EXPORTS_BUCKET)
        .key(key)
        .body(body.into());
    for (k, v) in meta {
        req = req.metadata(*k, *v);
    }
    req.send().await?;
    Ok(())
}

/// The newest report of a route whose sources include `source`.
async fn report_for(stack: &Stack, route: &str, source: &str) -> anyhow::Result<Value> {
    let reports = objects(stack, &format!("bridge/reports/{route}/")).await?;
    reports
        .into_iter()
        .filter(|r| {
            r["sources"]
                .as_array()
                .is_some_and(|s| s.iter().any(|x| x.as_str().unwrap_or("").ends_with(source)))
        })
        .max_by_key(|r| r["finished_at"].as_str().unwrap_or("").to_string())
        .ok_or_else(|| anyhow::anyhow!("no report of {route} reads {source}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_departures_are_guarded_held_counted_and_released() -> anyhow::Result<()> {
    let routes = routes_dir(
        "departures",
        &[
            (
                "marker.toml",
                &audience_route("aud_marker", "amperity/aud-marker/", "marker"),
            ),
            (
                "mass.toml",
                &audience_route("aud_mass", "amperity/aud-mass/", "single"),
            ),
            (
                "noid.toml",
                &audience_route("aud_noid", "amperity/aud-noid/", "single"),
            ),
        ],
    )?;
    let stack = stack(routes).await?;
    let sim = stack.sim.as_ref().expect("sim");
    let f = stack.sync_fn.as_ref().expect("function");
    let user = |i: u64| sim.user(&format!("AMP-{i:08}")).expect("user");
    let member = |i: u64| user(i)["aud_loyal"].clone();

    // 1. A marker export whose day-2 folder lacks one of its three parts: a third of the
    //    audience would leave. Held; every other change is sent.
    for (n, ids) in [(1, 1000..1010), (2, 1010..1020), (3, 1020..1030)] {
        let key = format!("amperity/aud-marker/run-1/part-000{n}.csv");
        stack
            .moto
            .put(EXPORTS_BUCKET, &key, samples::customers_csv(ids, 1))
            .await?;
    }
    stack
        .moto
        .put(
            EXPORTS_BUCKET,
            "amperity/aud-marker/run-1/.DONE",
            Vec::new(),
        )
        .await?;
    stack.wait_idle(WAIT).await?;
    assert_eq!(member(1025), json!(true));
    for (n, ids) in [(1, 1000..1010), (2, 1010..1020)] {
        let key = format!("amperity/aud-marker/run-2/part-000{n}.csv");
        stack
            .moto
            .put(EXPORTS_BUCKET, &key, samples::customers_csv(ids, 2))
            .await?;
    }
    stack
        .moto
        .put(
            EXPORTS_BUCKET,
            "amperity/aud-marker/run-2/.DONE",
            Vec::new(),
        )
        .await?;
    stack.wait_idle(WAIT).await?;
    for i in 1020..1030 {
        assert_eq!(member(i), json!(true), "user {i}: departure held");
    }
    assert_eq!(
        user(1005)["order_count"].to_string(),
        samples::customer_row(1005, 2)[14],
        "other changes were sent"
    );
    let rep = report_for(&stack, "aud_marker", "run-2/part-0001.csv").await?;
    assert_eq!(rep["status"], "departures_held", "{rep}");
    assert_eq!(rep["departures_held"], 10);
    let aud = &rep["departures"][0];
    assert_eq!(
        (aud["audience"].as_str(), aud["members_before"].as_u64()),
        (Some("aud_loyal"), Some(30))
    );
    assert_eq!(
        (
            aud["leaving"].as_u64(),
            aud["held"].as_u64(),
            aud["sent"].as_u64()
        ),
        (Some(10), Some(10), Some(0))
    );
    assert!((aud["share"].as_f64().unwrap_or(0.0) - 1.0 / 3.0).abs() < 1e-9);
    assert_eq!(aud["cap"], 0.2);
    // The invocation result says so too (the claim is not final, so a redelivery re-plans).
    let r = f
        .invoke(&s3_event("amperity/aud-marker/run-2/.DONE"))
        .await?;
    let res = &r.body["results"][0];
    assert_eq!(res["outcome"], "departures_held", "{:?}", r.body);
    assert_eq!(res["summary"]["departures_held"][0]["count"], 10, "{res}");
    assert_eq!(res["summary"]["departures_held"][0]["cap"], 0.2, "{res}");

    // 2. An export where 80% of the audience is absent: held; released by a re-copy with
    //    bridge-allow-departures=true, they are sent (the held run did not advance state).
    stack
        .moto
        .put(
            EXPORTS_BUCKET,
            "amperity/aud-mass/day1.csv",
            samples::customers_csv(2000..2020, 1),
        )
        .await?;
    stack.wait_idle(WAIT).await?;
    let day2 = "amperity/aud-mass/day2.csv";
    stack
        .moto
        .put(EXPORTS_BUCKET, day2, samples::customers_csv(2000..2004, 1))
        .await?;
    stack.wait_idle(WAIT).await?;
    for i in 2004..2020 {
        assert_eq!(member(i), json!(true), "user {i}: mass departure held");
    }
    let rep = report_for(&stack, "aud_mass", day2).await?;
    assert_eq!(rep["status"], "departures_held", "{rep}");
    assert_eq!(rep["departures"][0]["held"], 16);
    assert_eq!(rep["departures"][0]["share"], 0.8);
    stack
        .moto
        .s3
        .copy_object()
        .bucket(EXPORTS_BUCKET)
        .key(day2)
        .copy_source(format!("{EXPORTS_BUCKET}/{day2}"))
        .metadata("bridge-allow-departures", "true")
        .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
        .send()
        .await?;
    stack.wait_idle(WAIT).await?;
    for i in 2004..2020 {
        assert_eq!(member(i), json!(false), "user {i}: released departure sent");
    }
    assert_eq!(member(2001), json!(true));
    let rep = report_for(&stack, "aud_mass", day2).await?;
    assert_eq!(rep["status"], "complete", "{rep}");
    assert_eq!(
        (
            rep["departures_sent"].as_u64(),
            rep["departures_held"].as_u64()
        ),
        (Some(16), Some(0))
    );
    assert_eq!(rep["departures"][0]["released"], true);

    // 3. Rows whose identifier cannot be read: one member absent (5%, under the cap) but one
    //    row has no identifier, so absence proves nothing: departures held, rows counted.
    stack
        .moto
        .put(
            EXPORTS_BUCKET,
            "amperity/aud-noid/day1.csv",
            samples::customers_csv(3000..3020, 1),
        )
        .await?;
    stack.wait_idle(WAIT).await?;
    let mut body = samples::customers_csv(3000..3019, 1);
    let mut row = samples::customer_row(3019, 1);
    row[0] = String::new();
    body.extend_from_slice(format!("{}\n", row.join(",")).as_bytes());
    let noid = "amperity/aud-noid/day2.csv";
    put_meta(&stack, noid, body, &[]).await?;
    stack.wait_idle(WAIT).await?;
    assert_eq!(
        member(3019),
        json!(true),
        "held: an unreadable row may be this user"
    );
    let rep = report_for(&stack, "aud_noid", noid).await?;
    assert_eq!(rep["status"], "departures_held", "{rep}");
    assert_eq!(rep["rows_without_identifier"], 1);
    assert_eq!(rep["departures_held"], 1);
    assert!(
        rep["departures"][0]["held_because"]
            .as_str()
            .unwrap_or("")
            .contains("no readable identifier"),
        "{rep}"
    );
    Ok(())
}
