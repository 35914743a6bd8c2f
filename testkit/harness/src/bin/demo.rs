//! `make demo`: the whole job on the local stack. Starts moto (S3 + SQS), both functions under
//! the Lambda runtime emulator and the Braze simulator; uploads an Amperity export and shows what
//! reached Braze; uploads a changed export and shows that only the changes went; drops Currents
//! Avro files and shows the resulting tables; then stops everything it started.

use std::time::Duration;

use harness::samples;
use harness::stack::{CURRENTS_BUCKET, EXPORTS_BUCKET, Stack, StackOptions};

const USERS: u64 = 1_000;
/// The delivery day of the demo's Currents files.
const CURRENTS_DAY: &str = "2026-11-29";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let logs = tempdir()?;
    println!("== Starting the local stack (moto S3+SQS, Lambda runtime emulator, Braze simulator)");
    let stack = Stack::start(StackOptions {
        log_dir: Some(logs.clone()),
        ..Default::default()
    })
    .await?;
    println!("   function logs: {}", logs.display());

    let mut summary = Vec::new();
    braze_part(&stack, &mut summary).await?;
    currents_part(&stack, &mut summary).await?;

    status_part(&stack).await?;

    println!("\n== Summary");
    for line in &summary {
        println!("   {line}");
    }
    println!("   Everything the demo started is stopped when it exits.");
    Ok(())
}

async fn braze_part(stack: &Stack, summary: &mut Vec<String>) -> anyhow::Result<()> {
    let Some(sim) = &stack.sim else {
        return Ok(());
    };
    println!(
        "\n== 1. Amperity exports {USERS} customers to s3://{EXPORTS_BUCKET}/amperity/customers/"
    );
    let key1 = "amperity/customers/customers_2026-11-29T100000.csv";
    stack
        .moto
        .put(EXPORTS_BUCKET, key1, samples::customers_csv(0..USERS, 1))
        .await?;
    stack.wait_idle(Duration::from_secs(120)).await?;
    let s1 = sim.stats();
    println!(
        "   Braze received {} requests carrying {} attribute objects; {} profiles exist.",
        s1.requests_total,
        s1.objects_applied,
        sim.users().len()
    );
    if let Some(u) = sim.user("AMP-00000007") {
        println!("   Profile AMP-00000007 in Braze: {u}");
    }

    println!("\n== 2. The next day's export: 3% of customers changed, 1% new, 1% gone");
    let ids: Vec<u64> = (USERS / 100..USERS + USERS / 100).collect();
    let body = samples::customers_csv_versions(
        ids.into_iter()
            .map(|i| (i, if i % 33 == 0 { 2 } else { 1 })),
    );
    let key2 = "amperity/customers/customers_2026-11-30T100000.csv";
    stack.moto.put(EXPORTS_BUCKET, key2, body).await?;
    stack.wait_idle(Duration::from_secs(120)).await?;
    let s2 = sim.stats();
    let objects = s2.objects_applied - s1.objects_applied;
    println!(
        "   Braze received {} more requests carrying {objects} attribute objects (only changed and new users).",
        s2.requests_total - s1.requests_total
    );
    summary.push(format!(
        "braze-sync: first export sent {} users; the changed export sent {objects} (of {USERS} rows).",
        s1.objects_applied
    ));
    let reports = stack
        .moto
        .list(harness::stack::STATE_BUCKET, "bridge/reports/")
        .await?;
    if let Some(last) = reports.last() {
        let r: serde_json::Value =
            serde_json::from_slice(&stack.moto.get(harness::stack::STATE_BUCKET, last).await?)?;
        println!(
            "   Run report s3://{}/{last}:\n     rows_in {}, unchanged {}, rejected {}, users_sent {}, attributes_sent {}, requests {}, status {}",
            harness::stack::STATE_BUCKET,
            r["rows_in"],
            r["unchanged"],
            r["rejected"],
            r["users_sent"],
            r["attributes_sent"],
            r["requests"],
            r["status"]
        );
    }
    Ok(())
}

async fn currents_part(stack: &Stack, summary: &mut Vec<String>) -> anyhow::Result<()> {
    if stack.currents_fn.is_none() {
        return Ok(());
    }
    println!("\n== 3. Braze Currents writes Avro files to s3://{CURRENTS_BUCKET}/currents/");
    let mut sent = 0;
    for (n, t) in samples::CURRENTS_TYPES.iter().enumerate() {
        let events = 500 + 250 * n as u64;
        let dups = 20;
        let body = samples::currents_avro(t, 0, events, dups)?;
        let key = samples::currents_key("currents", t, &format!("{CURRENTS_DAY}-10"), n as u64);
        stack.moto.put(CURRENTS_BUCKET, &key, body).await?;
        println!(
            "   {t}: {} events ({dups} duplicates) -> {key}",
            events + dups
        );
        sent += events + dups;
    }
    stack.wait_idle(Duration::from_secs(120)).await?;
    let parts = stack.moto.list(CURRENTS_BUCKET, "tables/").await?;
    let mut rows_total = 0;
    for p in &parts {
        let bytes = stack.moto.get(CURRENTS_BUCKET, p).await?;
        let reader = parquet::file::reader::SerializedFileReader::new(bytes::Bytes::from(bytes))?;
        use parquet::file::reader::FileReader;
        let rows = reader.metadata().file_metadata().num_rows();
        rows_total += rows;
        let cols: Vec<String> = reader
            .metadata()
            .file_metadata()
            .schema_descr()
            .columns()
            .iter()
            .take(8)
            .map(|c| c.name().to_string())
            .collect();
        println!("   {p}: {rows} rows; first columns {cols:?}");
        if let Ok(mut iter) = reader.get_row_iter(None)
            && let Some(Ok(row)) = iter.next()
        {
            let text = row.to_string();
            println!(
                "     first row: {}",
                text.chars().take(300).collect::<String>()
            );
        }
    }
    summary.push(format!(
        "currents-normalize: {sent} events in {} Avro files became {rows_total} deduplicated rows in {} Parquet parts.",
        samples::CURRENTS_TYPES.len(),
        parts.len()
    ));
    Ok(())
}

/// What an operator sees: the real `braze-sync status` and `currents-normalize status`
/// binaries run against the demo's buckets.
async fn status_part(stack: &Stack) -> anyhow::Result<()> {
    if stack.sim.is_some() {
        println!("\n== 4. braze-sync status (what the state bucket says of each route)");
        show(stack, "braze-sync", &["status"]).await?;
    }
    if stack.currents_fn.is_some() {
        println!(
            "\n== 5. currents-normalize status --day {CURRENTS_DAY} (the Currents tables of that day)"
        );
        show(
            stack,
            "currents-normalize",
            &["status", "--day", CURRENTS_DAY],
        )
        .await?;
    }
    Ok(())
}

async fn show(stack: &Stack, binary: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = stack.cli(binary, args).await?;
    anyhow::ensure!(
        out.status.success(),
        "{binary} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("   {line}");
    }
    Ok(())
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("bridge-demo-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
