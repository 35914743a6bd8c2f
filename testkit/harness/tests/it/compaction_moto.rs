//! Daily compaction against moto's S3: duplicates across parts, late parts, a part arriving
//! while a day is compacted, a crash between writing the compacted part and deleting the
//! parts it replaces, a concurrent compaction holding the lease, byte-identical reruns, and
//! the scheduled `{"compact": …}` event through the Lambda runtime emulator.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arrow_array::cast::AsArray;
use async_trait::async_trait;
use bridge_shared::hooked_store::{Call, Hook, Hooked};
use bridge_shared::object_store::S3Store;
use bridge_shared::trigger::ObjectRef;
use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use chrono::NaiveDate;
use currents_normalize::compact::job::run_and_report;
use currents_normalize::compact::{CompactRequest, Compactor, DayOutcome, Selection, TableDay};
use currents_normalize::config::Config;
use currents_normalize::handler::Handler;
use currents_normalize::registry::Registry;
use currents_normalize::report::Outcome;
use harness::moto::Moto;
use harness::samples;
use harness::stack::{CURRENTS_BUCKET, Stack, StackOptions};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

const T: &str = "users.messages.email.Send";
const TABLE: &str = "users_messages_email_send";

fn day(s: &str) -> NaiveDate {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap_or_default()
}

fn cfg(bucket: &str) -> Config {
    Config {
        tables_bucket: Some(bucket.into()),
        ..Config::default()
    }
}

fn request(today: &str, sel: Selection) -> CompactRequest {
    CompactRequest {
        selection: sel,
        dry_run: false,
        today: day(today),
        deadline: None,
        owner: "test-run".into(),
    }
}

/// Uploads a Currents file of ids `first..first+n` to `bucket` and normalizes it there.
async fn normalize(
    moto: &Moto,
    store: Arc<dyn ObjectStore>,
    bucket: &str,
    hour: &str,
    offset: u64,
    first: u64,
    n: u64,
) -> anyhow::Result<String> {
    let key = samples::currents_key("currents", T, hour, offset);
    moto.put(bucket, &key, samples::currents_avro(T, first, n, 3)?)
        .await?;
    let handler = Handler::new(cfg(bucket), store, Arc::new(Registry::builtin()?));
    let r = handler
        .process(&ObjectRef::named(S3Uri::new(bucket, key), "test"), false)
        .await;
    anyhow::ensure!(r.outcome == Outcome::Written, "{r:?}");
    r.part
        .ok_or_else(|| anyhow::anyhow!("no part"))
        .map(|p| p.trim_start_matches(&format!("s3://{bucket}/")).to_string())
}

fn folder(d: &str) -> String {
    format!("tables/{TABLE}/{TABLE}_{d}.parquet/")
}

/// Every id in a Parquet part.
fn ids(bytes: Vec<u8>) -> anyhow::Result<Vec<String>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(bytes))?.build()?;
    let mut out = Vec::new();
    for b in reader {
        let b = b?;
        let col = b
            .column_by_name("id")
            .ok_or_else(|| anyhow::anyhow!("no id"))?;
        out.extend(col.as_string::<i32>().iter().flatten().map(str::to_string));
    }
    Ok(out)
}

async fn day_ids(moto: &Moto, bucket: &str, d: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let keys = moto.list(bucket, &folder(d)).await?;
    let mut all = Vec::new();
    for k in &keys {
        all.extend(ids(moto.get(bucket, k).await?)?);
    }
    Ok((keys, all))
}

fn distinct(ids: &[String]) -> usize {
    ids.iter().collect::<BTreeSet<_>>().len()
}

#[tokio::test]
async fn compaction_dedups_across_parts_picks_up_late_parts_and_is_deterministic()
-> anyhow::Result<()> {
    let moto = Moto::start(None).await?;
    let store: Arc<dyn ObjectStore> = Arc::new(S3Store::new(moto.s3.clone()));
    for b in ["lake", "lake2"] {
        moto.create_bucket(b).await?;
        // The same three overlapping files on the 29th (250 distinct events), two on the 28th.
        normalize(&moto, store.clone(), b, "2026-11-29-01", 1, 0, 100).await?;
        normalize(&moto, store.clone(), b, "2026-11-29-02", 2, 80, 100).await?;
        normalize(&moto, store.clone(), b, "2026-11-29-23", 3, 170, 80).await?;
        normalize(&moto, store.clone(), b, "2026-11-28-05", 4, 0, 50).await?;
        normalize(&moto, store.clone(), b, "2026-11-28-06", 5, 25, 50).await?;
    }
    // Today's parts are left alone by a default run.
    normalize(&moto, store.clone(), "lake", "2026-11-30-00", 6, 0, 10).await?;
    let registry = Arc::new(Registry::builtin()?);
    let compactor = Compactor::new(cfg("lake"), store.clone(), registry.clone());
    let report = run_and_report(
        &compactor,
        &cfg("lake"),
        store.as_ref(),
        "lake",
        request("2026-11-30", Selection::default()),
        "run-1",
    )
    .await?;
    assert_eq!(report.totals.compacted, 2, "{report:#?}");
    assert_eq!(report.totals.parts_in, 5);
    assert_eq!(report.totals.parts_out, 2);
    let d29 = report
        .table_days
        .iter()
        .find(|d| d.day == "2026-11-29")
        .ok_or_else(|| anyhow::anyhow!("no 29th"))?;
    assert_eq!(d29.rows_in, 280);
    assert_eq!(d29.rows_out, 250);
    assert_eq!(d29.duplicates_removed, 30);
    let (keys, ids29) = day_ids(&moto, "lake", "2026-11-29").await?;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].contains("/part-compacted-"), "{keys:?}");
    assert_eq!(ids29.len(), 250);
    assert_eq!(distinct(&ids29), 250);
    let (_, ids28) = day_ids(&moto, "lake", "2026-11-28").await?;
    assert_eq!((ids28.len(), distinct(&ids28)), (75, 75));
    assert_eq!(moto.list("lake", &folder("2026-11-30")).await?.len(), 1);
    assert_eq!(
        moto.list("lake", "reports/currents/compaction/")
            .await?
            .len(),
        1
    );
    let manifest = compactor
        .manifest(
            "lake",
            &TableDay {
                day: day("2026-11-29"),
                table: TABLE.into(),
            },
        )
        .await?
        .ok_or_else(|| anyhow::anyhow!("no manifest"))?;
    assert_eq!(manifest.sources.len(), 3);

    // The same input parts elsewhere give the same name and the same bytes.
    let c2 = Compactor::new(cfg("lake2"), store.clone(), registry.clone());
    c2.run("lake2", &request("2026-11-30", Selection::default()))
        .await?;
    let keys2 = moto.list("lake2", &folder("2026-11-29")).await?;
    assert_eq!(
        keys2, keys,
        "same inputs, same compacted part name in both buckets"
    );
    assert_eq!(
        moto.get("lake2", &keys2[0]).await?,
        moto.get("lake", &keys[0]).await?
    );

    // Nothing new: nothing to do.
    let again = compactor
        .run("lake", &request("2026-11-30", Selection::default()))
        .await?;
    assert!(again.is_empty(), "{again:?}");

    // A late file for the 29th: only that day is compacted again, and it absorbs the part.
    let late = normalize(&moto, store.clone(), "lake", "2026-11-29-23", 9, 240, 60).await?;
    let keys28 = moto.list("lake", &folder("2026-11-28")).await?;
    let r = compactor
        .run("lake", &request("2026-12-01", Selection::default()))
        .await?;
    let days: Vec<(String, String)> = r.iter().map(|d| (d.day.clone(), d.table.clone())).collect();
    assert!(
        days.contains(&("2026-11-29".into(), TABLE.into()))
            && !days.iter().any(|d| d.0 == "2026-11-28"),
        "{days:?}"
    );
    let (keys, ids29) = day_ids(&moto, "lake", "2026-11-29").await?;
    assert_eq!(keys.len(), 1);
    assert!(!keys.contains(&late));
    assert_eq!((ids29.len(), distinct(&ids29)), (300, 300));
    assert_eq!(moto.list("lake", &folder("2026-11-28")).await?, keys28);
    moto.stop().await;
    Ok(())
}

/// Deletes fail (a crash after the compacted part is written), or a new part drops into the
/// folder the first time a part is read (a file landing mid-compaction).
#[derive(Default)]
struct Faulty {
    fail_deletes: bool,
    arrival: std::sync::Mutex<Option<(S3Uri, Bytes)>>,
    arrived: AtomicBool,
}

#[async_trait]
impl Hook for Faulty {
    async fn before(&self, store: &dyn ObjectStore, call: Call<'_>) -> Result<(), StoreError> {
        match call {
            Call::Delete(_) if self.fail_deletes => Err(call.failed("simulated crash", true)),
            Call::GetReader(_) => {
                let arrival = self.arrival.lock().ok().and_then(|mut a| a.take());
                if let Some((at, body)) = arrival {
                    store
                        .put(&at, body, PutCondition::None, BTreeMap::new())
                        .await?;
                    self.arrived.store(true, Ordering::SeqCst);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[tokio::test]
async fn crash_between_write_and_delete_converges_and_a_part_landing_meanwhile_is_kept()
-> anyhow::Result<()> {
    let moto = Moto::start(None).await?;
    let store: Arc<dyn ObjectStore> = Arc::new(S3Store::new(moto.s3.clone()));
    let registry = Arc::new(Registry::builtin()?);
    for b in ["lake", "clean"] {
        moto.create_bucket(b).await?;
        normalize(&moto, store.clone(), b, "2026-11-29-01", 1, 0, 100).await?;
        normalize(&moto, store.clone(), b, "2026-11-29-02", 2, 50, 100).await?;
    }
    // The clean run's result is what every path must converge to.
    Compactor::new(cfg("clean"), store.clone(), registry.clone())
        .run("clean", &request("2026-11-30", Selection::default()))
        .await?;
    let clean = moto.list("clean", &folder("2026-11-29")).await?;
    assert_eq!(clean.len(), 1);

    // Crash: the compacted part is written, no input is deleted; every row stays readable.
    let fail_deletes = Faulty {
        fail_deletes: true,
        ..Faulty::default()
    };
    let crashing: Arc<dyn ObjectStore> = Arc::new(Hooked::new(store.clone(), fail_deletes));
    let r = Compactor::new(cfg("lake"), crashing, registry.clone())
        .run("lake", &request("2026-11-30", Selection::default()))
        .await?;
    assert_eq!(r[0].outcome, DayOutcome::Failed);
    assert!(r[0].retryable);
    let (keys, all) = day_ids(&moto, "lake", "2026-11-29").await?;
    assert_eq!(keys.len(), 3, "inputs and output side by side: {keys:?}");
    assert_eq!(distinct(&all), 150);
    // The lease was released: the rerun is not kept waiting, and converges on the clean result.
    let r = Compactor::new(cfg("lake"), store.clone(), registry.clone())
        .run("lake", &request("2026-11-30", Selection::default()))
        .await?;
    assert_eq!(r[0].outcome, DayOutcome::Compacted, "{r:?}");
    let keys = moto.list("lake", &folder("2026-11-29")).await?;
    assert_eq!(
        keys, clean,
        "rerun rewrote the same part under the same name"
    );
    assert_eq!(
        moto.get("lake", &keys[0]).await?,
        moto.get("clean", &clean[0]).await?
    );

    // A part lands while the 29th is compacted: it is not deleted, and the next run takes it.
    let staging_part = {
        moto.create_bucket("staging").await?;
        normalize(&moto, store.clone(), "staging", "2026-11-29-22", 7, 400, 20).await?
    };
    normalize(&moto, store.clone(), "lake", "2026-11-29-03", 3, 140, 20).await?;
    let arriving = S3Uri::new("lake", &staging_part);
    let arrival = Faulty {
        arrival: std::sync::Mutex::new(Some((
            arriving.clone(),
            Bytes::from(moto.get("staging", &staging_part).await?),
        ))),
        ..Faulty::default()
    };
    let racing = Arc::new(Hooked::new(store.clone(), arrival));
    let r = Compactor::new(cfg("lake"), racing.clone(), registry.clone())
        .run("lake", &request("2026-11-30", Selection::default()))
        .await?;
    assert!(racing.hook().arrived.load(Ordering::SeqCst));
    assert_eq!(r[0].outcome, DayOutcome::Compacted);
    assert_eq!(r[0].parts_in, 2, "the arrival was not listed, so not read");
    let (keys, all) = day_ids(&moto, "lake", "2026-11-29").await?;
    assert!(keys.contains(&staging_part), "{keys:?}");
    assert_eq!(keys.len(), 2);
    assert_eq!(distinct(&all), 180);
    let r = Compactor::new(cfg("lake"), store.clone(), registry.clone())
        .run("lake", &request("2026-11-30", Selection::default()))
        .await?;
    assert_eq!(r[0].outcome, DayOutcome::Compacted);
    let (keys, all) = day_ids(&moto, "lake", "2026-11-29").await?;
    assert_eq!((keys.len(), all.len(), distinct(&all)), (1, 180, 180));

    // Another compaction holds the day: this one deletes nothing.
    normalize(&moto, store.clone(), "lake", "2026-11-29-04", 4, 500, 5).await?;
    let td = TableDay {
        day: day("2026-11-29"),
        table: TABLE.into(),
    };
    let lease_uri = S3Uri::new(
        "lake",
        format!(
            "state/currents/compaction/leases/{}/{}.json",
            td.table, td.day
        ),
    );
    let held = currents_normalize::compact::lease::acquire(
        store.as_ref(),
        &lease_uri,
        "other-run",
        chrono::Utc::now(),
    )
    .await?;
    assert!(held.is_some());
    let before = moto.list("lake", &folder("2026-11-29")).await?;
    let r = Compactor::new(cfg("lake"), store.clone(), registry.clone())
        .run("lake", &request("2026-11-30", Selection::default()))
        .await?;
    assert_eq!(r[0].outcome, DayOutcome::Busy);
    assert_eq!(moto.list("lake", &folder("2026-11-29")).await?, before);
    moto.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_compaction_event_runs_through_the_emulator() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        braze_sync: false,
        log_dir: std::env::var_os("BRIDGE_TEST_LOGS").map(Into::into),
        ..Default::default()
    })
    .await?;
    for (hour, offset, first) in [("2026-11-29-10", 1, 0), ("2026-11-29-11", 2, 30)] {
        let key = samples::currents_key("currents", T, hour, offset);
        stack
            .moto
            .put(
                CURRENTS_BUCKET,
                &key,
                samples::currents_avro(T, first, 40, 2)?,
            )
            .await?;
    }
    stack.wait_idle(Duration::from_secs(60)).await?;
    assert_eq!(
        stack
            .moto
            .list(CURRENTS_BUCKET, &folder("2026-11-29"))
            .await?
            .len(),
        2
    );
    let f = stack
        .currents_fn
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no function"))?;
    // The payload EventBridge Scheduler sends.
    let out = f
        .invoke(&serde_json::json!({"compact": {"day": "2026-11-29"}}))
        .await?;
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.body["compact"]["compacted"], 1, "{out:?}");
    assert_eq!(out.body["compact"]["duplicates_removed"], 10, "{out:?}");
    let (keys, all) = day_ids(&stack.moto, CURRENTS_BUCKET, "2026-11-29").await?;
    assert_eq!(keys.len(), 1);
    assert_eq!((all.len(), distinct(&all)), (70, 70));
    assert_eq!(
        stack
            .moto
            .list(CURRENTS_BUCKET, "reports/currents/compaction/")
            .await?
            .len(),
        1
    );
    // A malformed schedule payload is refused with a reason, not retried.
    let bad = f
        .invoke(&serde_json::json!({"compact": {"day": "yesterday"}}))
        .await?;
    assert!(bad.ok(), "{bad:?}");
    assert!(bad.body["compact"]["error"].as_str().is_some(), "{bad:?}");
    Ok(())
}
