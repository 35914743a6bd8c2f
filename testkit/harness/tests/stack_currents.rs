//! An upload of a Currents Avro file to moto reaches currents-normalize through S3 → SQS →
//! poller → Lambda runtime emulator, and the table lands where Amperity looks for it.

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
    Ok(())
}
