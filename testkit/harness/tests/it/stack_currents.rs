//! An upload of a Currents Avro file to moto reaches currents-normalize through S3 → SQS →
//! poller → Lambda runtime emulator, and the table lands where Amperity looks for it;
//! `currents-normalize status` then shows the day's parts, rows, compaction and quarantine.

use std::time::Duration;

use harness::samples;
use harness::stack::{CURRENTS_BUCKET, Stack, StackOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn currents_upload_becomes_a_parquet_table_via_sqs_and_the_emulator() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        braze_sync: false,
        log_dir: std::env::var_os("BRIDGE_TEST_LOGS").map(Into::into),
        ..Default::default()
    })
    .await?;
    let t = "users.messages.email.Send";
    let body = samples::currents_avro(t, 0, 40, 5)?;
    // A key that needs URL-decoding on the way back (spaces, '+', '=').
    let key =
        samples::currents_key("currents", t, "2026-11-29-10", 7).replace("zone-a", "zone a+b");
    stack.moto.put(CURRENTS_BUCKET, &key, body).await?;
    // Not Avro: quarantined, with its reason.
    let bad = samples::currents_key("currents", t, "2026-11-29-11", 8);
    stack
        .moto
        .put(CURRENTS_BUCKET, &bad, b"not avro".to_vec())
        .await?;
    stack.wait_idle(Duration::from_secs(60)).await?;

    let parts = stack
        .moto
        .list(CURRENTS_BUCKET, "tables/users_messages_email_send/")
        .await?;
    assert_eq!(parts.len(), 1, "one part per source object: {parts:?}");
    assert!(
        parts[0].starts_with(
            "tables/users_messages_email_send/users_messages_email_send_2026-11-29.parquet/part-"
        ),
        "{parts:?}"
    );
    let bytes = stack.moto.get(CURRENTS_BUCKET, &parts[0]).await?;
    let reader = parquet::file::reader::SerializedFileReader::new(bytes::Bytes::from(bytes))?;
    use parquet::file::reader::FileReader;
    assert_eq!(
        reader.metadata().file_metadata().num_rows(),
        40,
        "duplicates dropped"
    );

    // The run report records the delay from the delivery hour in the key to the part write.
    let mut lags = Vec::new();
    for k in stack
        .moto
        .list(CURRENTS_BUCKET, "reports/currents/")
        .await?
    {
        let r: serde_json::Value =
            serde_json::from_slice(&stack.moto.get(CURRENTS_BUCKET, &k).await?)?;
        if let Some(l) = r["totals"]["max_delivery_lag_s"].as_u64() {
            lags.push(l);
        }
    }
    let since_hour = (chrono::Utc::now()
        - chrono::DateTime::parse_from_rfc3339("2026-11-29T10:00:00Z")?.with_timezone(&chrono::Utc))
    .num_seconds() as u64;
    assert!(
        lags.iter().any(|l| *l > 0 && *l <= since_hour),
        "{lags:?} vs {since_hour}"
    );

    // status: one table, one part of 40 rows, not compacted yet, one object quarantined.
    let status = |args: &'static [&'static str]| {
        let stack = &stack;
        async move {
            let out = stack.cli("currents-normalize", args).await?;
            anyhow::ensure!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok::<_, anyhow::Error>(out.stdout)
        }
    };
    let v: serde_json::Value =
        serde_json::from_slice(&status(&["status", "--day", "2026-11-29", "--json"]).await?)?;
    let table = &v["tables"][0];
    assert_eq!(table["table"], "users_messages_email_send", "{v:#}");
    assert_eq!(
        (
            table["parts"].as_u64(),
            table["rows"].as_u64(),
            table["compacted"].as_bool()
        ),
        (Some(1), Some(40), Some(false)),
        "{v:#}"
    );
    assert!(table["last_write"].is_string(), "{v:#}");
    let q = v["quarantined"].as_array().expect("quarantined");
    assert_eq!(q.len(), 1, "{v:#}");
    assert!(
        q[0]["source"].as_str().unwrap_or("").ends_with(&bad),
        "{v:#}"
    );

    // After compaction the day is compacted: one compacted part, the same rows.
    let out = stack
        .cli("currents-normalize", &["compact", "--day", "2026-11-29"])
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Piped, not a terminal: no progress bar.
    for bytes in [&out.stdout, &out.stderr] {
        let text = String::from_utf8_lossy(bytes);
        assert!(
            !text.contains('\r') && !text.contains('█') && !text.contains("ETA"),
            "{text}"
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&status(&["status", "--day", "2026-11-29", "--json"]).await?)?;
    let table = &v["tables"][0];
    assert_eq!(
        (
            table["parts"].as_u64(),
            table["compacted_parts"].as_u64(),
            table["rows"].as_u64(),
            table["compacted"].as_bool()
        ),
        (Some(1), Some(1), Some(40), Some(true)),
        "{v:#}"
    );
    let text = String::from_utf8(status(&["status", "--day", "2026-11-29"]).await?)?;
    assert!(text.contains("users_messages_email_send"), "{text}");
    assert!(text.contains("quarantined: 1"), "{text}");
    // Another day has nothing.
    let v: serde_json::Value =
        serde_json::from_slice(&status(&["status", "--day", "2026-11-28", "--json"]).await?)?;
    assert_eq!(v["tables"], serde_json::json!([]));
    Ok(())
}
