//! `braze-sync status --json` over the local stack (moto + runtime emulator + Braze simulator):
//! after a first export, an export whose audience departures are held and an older export
//! skipped as stale, it shows the users in state, the last export and its status, the runs
//! with their figures, what is held or skipped, and the lease holder while a run holds the
//! route lock.

use std::path::PathBuf;
use std::time::Duration;

use harness::samples;
use harness::stack::{EXPORTS_BUCKET, STATE_BUCKET, Stack, StackOptions};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);

const ROUTE: &str = r#"
name = "watched"
prefix = "amperity/watched/"
update_existing_only = false
order_by = "key"
key_time_format = "customers_%Y-%m-%dT%H%M%S.csv"
[identifier]
kind = "external_id"
column = "amperity_id"
[attributes.order_count]
type = "Integer"
[[audiences]]
attribute = "aud_loyal"
"#;

fn routes_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("bridge-routes-{}-status", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("watched.toml"), ROUTE)?;
    Ok(dir)
}

async fn status(stack: &Stack) -> anyhow::Result<Value> {
    let out = stack
        .cli("braze-sync", &["status", "watched", "--json"])
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v[0].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_shows_state_runs_held_skipped_and_the_lease_holder() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        currents: false,
        routes_dir: routes_dir()?,
        log_dir: std::env::var_os("BRIDGE_TEST_LOGS").map(Into::into),
        ..Default::default()
    })
    .await?;

    // Before any export: an empty state, no runs, no lease.
    let s = status(&stack).await?;
    assert_eq!(s["route"], "watched");
    assert_eq!(s["state"]["users"], 0);
    assert_eq!(
        s["state"]["attributes_tracked"], 2,
        "order_count and aud_loyal"
    );
    assert_eq!(s["runs"], json!([]));
    assert_eq!(s["lease"], Value::Null);

    // 1. 100 customers; 2. a day later only 10 remain: 90% of aud_loyal would leave, held;
    // 3. an export dated before the first arrives late: skipped as stale.
    let first = "amperity/watched/customers_2026-11-05T100000.csv";
    let held = "amperity/watched/customers_2026-11-06T100000.csv";
    let stale = "amperity/watched/customers_2026-11-04T100000.csv";
    for (key, ids) in [(first, 0..100), (held, 0..10), (stale, 0..100)] {
        stack
            .moto
            .put(EXPORTS_BUCKET, key, samples::customers_csv(ids, 1))
            .await?;
        stack.wait_idle(WAIT).await?;
    }

    let s = status(&stack).await?;
    assert_eq!(s["state"]["users"], 100, "{s:#}");
    assert!(s["state"]["generation"].as_u64().unwrap_or(0) >= 1, "{s:#}");
    assert!(s["state"]["bytes"].as_u64().unwrap_or(0) > 0, "{s:#}");
    assert!(s["state"]["objects"].as_u64().unwrap_or(0) >= 1, "{s:#}");
    let runs = s["runs"].as_array().expect("runs");
    let statuses: Vec<&str> = runs.iter().filter_map(|r| r["status"].as_str()).collect();
    assert_eq!(
        statuses,
        ["skipped_stale", "departures_held", "complete"],
        "{s:#}"
    );
    let first_run = &runs[2];
    assert_eq!(
        (
            first_run["rows_in"].as_u64(),
            first_run["users_sent"].as_u64(),
            first_run["unchanged"].as_u64(),
            first_run["rejected"].as_u64(),
            first_run["braze_rejected"].as_u64(),
        ),
        (Some(100), Some(100), Some(0), Some(0), Some(0)),
        "{s:#}"
    );
    assert!(first_run["duration_s"].as_f64().unwrap_or(0.0) > 0.0);
    assert_eq!(runs[1]["rows_in"], 10);
    assert_eq!(runs[1]["departures_held"], 90);
    let last = &s["last_export"];
    assert_eq!(
        last["key"],
        format!("s3://{EXPORTS_BUCKET}/{stale}"),
        "{s:#}"
    );
    assert_eq!(last["status"], "skipped_stale");
    assert_eq!(last["ledger_status"], "skipped_stale");
    assert_eq!(last["exported_at"], "2026-11-04T10:00:00+00:00", "{s:#}");
    let attention: Vec<(&str, &str)> = s["attention"]
        .as_array()
        .expect("attention")
        .iter()
        .map(|a| {
            (
                a["status"].as_str().unwrap_or(""),
                a["export_id"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(attention.len(), 2, "{s:#}");
    assert_eq!(attention[0].0, "skipped_stale");
    assert!(attention[0].1.contains(stale));
    assert_eq!(attention[1].0, "departures_held");
    assert!(attention[1].1.contains(held));
    assert!(
        s["watermark"]["export_id"]
            .as_str()
            .unwrap_or("")
            .contains(held),
        "the held export still moved the state: {s:#}"
    );
    assert_eq!(s["lease"], Value::Null, "no run in progress");

    // A run holding the route lock: status names it.
    let until = chrono::Utc::now().timestamp_millis() + 120_000;
    stack
        .moto
        .put(
            STATE_BUCKET,
            "bridge/state/watched/route-lock.json",
            serde_json::to_vec(&json!({"holder": "20261130T101010.000Z-0badf00d",
                "lease_until_ms": until, "released": false}))?,
        )
        .await?;
    let s = status(&stack).await?;
    assert_eq!(s["lease"]["holder"], "20261130T101010.000Z-0badf00d");
    assert!(s["lease"]["expires_in_s"].as_i64().unwrap_or(0) > 60);

    // The table says the same in words.
    let out = stack.cli("braze-sync", &["status"]).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Route watched"), "{text}");
    assert!(text.contains("100 users, 2 attributes tracked"), "{text}");
    assert!(
        text.contains("20261130T101010.000Z-0badf00d holds the route lock"),
        "{text}"
    );
    assert!(text.contains("Held/skipped:"), "{text}");

    // `braze-sync run` with its output piped (not a terminal): metrics, JSON and logs, no
    // progress bar (no carriage returns, no bar or spinner characters).
    stack
        .moto
        .put(
            STATE_BUCKET,
            "bridge/state/watched/route-lock.json",
            serde_json::to_vec(&json!({"holder": "20261130T101010.000Z-0badf00d",
                "lease_until_ms": 0, "released": true}))?,
        )
        .await?;
    let target = format!("s3://{EXPORTS_BUCKET}/{held}");
    let out = stack
        .cli("braze-sync", &["run", &target, "--force-full"])
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // stdout carries the EMF metric lines, then the run's JSON.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\"departures_held\""), "{stdout}");
    for (name, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        let text = String::from_utf8_lossy(bytes);
        assert!(!text.contains('\r'), "{name} has a carriage return: {text}");
        for c in [
            '█', '░', '▉', '▏', '⠁', '⠂', '⠄', '⡀', '⢀', '⠠', '⠐', '⠈', '#',
        ] {
            assert!(
                !text.contains(c),
                "{name} has progress character {c:?}: {text}"
            );
        }
        assert!(
            !text.contains("req/s"),
            "{name} has the progress message: {text}"
        );
    }
    assert_eq!(
        status(&stack).await?["runs"][0]["rows_in"],
        10,
        "the CLI run is the newest run"
    );
    Ok(())
}
