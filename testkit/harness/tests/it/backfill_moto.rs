//! Backfill against moto's S3: Currents objects in every key layout, one already normalized,
//! one unreadable, one outside the day range; then the touched days are compacted, and a rerun
//! (after compaction removed the parts) converts nothing again.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use bridge_shared::object_store::S3Store;
use bridge_shared::trigger::ObjectRef;
use bridge_shared::{ObjectStore, S3Uri};
use bytes::Bytes;
use currents_normalize::backfill::{Backfill, BackfillRequest};
use currents_normalize::config::Config;
use currents_normalize::handler::Handler;
use currents_normalize::registry::Registry;
use harness::moto::Moto;
use harness::samples;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

const T: &str = "users.messages.email.Send";
const TABLE: &str = "users_messages_email_send";

fn request(dry_run: bool) -> BackfillRequest {
    BackfillRequest {
        bucket: "raw".into(),
        prefix: "currents/".into(),
        from: None,
        to: chrono::NaiveDate::from_ymd_opt(2026, 11, 29),
        concurrency: 3,
        dry_run,
        no_compact: false,
        progress: false,
    }
}

async fn ids(moto: &Moto, bucket: &str, prefix: &str) -> anyhow::Result<(usize, Vec<String>)> {
    let keys = moto.list(bucket, prefix).await?;
    let mut out = Vec::new();
    for k in &keys {
        let r = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(moto.get(bucket, k).await?))?
            .build()?;
        for b in r {
            let b = b?;
            let col = b
                .column_by_name("id")
                .ok_or_else(|| anyhow::anyhow!("no id"))?;
            out.extend(col.as_string::<i32>().iter().flatten().map(str::to_string));
        }
    }
    Ok((keys.len(), out))
}

#[tokio::test]
async fn backfill_converts_every_layout_skips_done_work_and_compacts_touched_days()
-> anyhow::Result<()> {
    let moto = Moto::start(None).await?;
    moto.create_bucket("raw").await?;
    moto.create_bucket("lake").await?;
    let keys = [
        // Today's layout (schema id), the newer `version=` layout, and the oldest (no cluster).
        samples::currents_key("currents", T, "2026-11-28-10", 1),
        "currents/dataexport.prod-03.S3.integration.ab/event_type=users.messages.email.Send/date=2026-11-28-11/version=7/prod/dataexport.prod-03.S3.integration.ab+3+12.avro".to_string(),
        "currents/date=2026-11-29-01/event_type=users.messages.email.Send/dataexport.S3.integration.599f+2+0000035465.avro".to_string(),
        samples::currents_key("currents", T, "2026-11-29-02", 2),
        // Outside --to.
        samples::currents_key("currents", T, "2026-11-30-02", 3),
    ];
    for (i, k) in keys.iter().enumerate() {
        let first = 40 * i as u64;
        moto.put("raw", k, samples::currents_avro(T, first, 50, 2)?)
            .await?;
    }
    let bad = samples::currents_key("currents", T, "2026-11-29-03", 4);
    moto.put("raw", &bad, b"not avro".to_vec()).await?;
    moto.put("raw", "currents/README.txt", b"hello".to_vec())
        .await?;
    let cfg = Config {
        tables_bucket: Some("lake".into()),
        ..Config::default()
    };
    let store: Arc<dyn ObjectStore> = Arc::new(S3Store::new(moto.s3.clone()));
    let registry = Arc::new(Registry::builtin()?);
    // One object was normalized before the backfill.
    let handler = Handler::new(cfg.clone(), store.clone(), registry.clone());
    let pre = handler
        .process(
            &ObjectRef::named(S3Uri::new("raw", &keys[3]), "test"),
            false,
        )
        .await;
    assert!(pre.part.is_some(), "{pre:?}");

    let backfill = Backfill::new(cfg.clone(), store.clone(), registry.clone());
    // A dry run writes nothing.
    let dry = backfill.run(&request(true)).await?;
    assert_eq!(
        (dry.normalized, dry.skipped, dry.quarantined),
        (3, 1, 1),
        "{dry:#?}"
    );
    assert_eq!(moto.list("lake", "tables/").await?.len(), 1);

    let s = backfill.run(&request(false)).await?;
    assert_eq!(s.objects, 5, "{s:#?}");
    assert_eq!(s.normalized, 3);
    assert_eq!(s.skipped, 1);
    assert_eq!(s.quarantined, 1);
    assert_eq!(s.failed, 0);
    assert_eq!(s.days_compacted, 2);
    // 28th: ids 0..50 and 40..90 -> 90 distinct; 29th: 80..130 and 120..170 -> 90 distinct.
    for day in ["2026-11-28", "2026-11-29"] {
        let (parts, all) = ids(
            &moto,
            "lake",
            &format!("tables/{TABLE}/{TABLE}_{day}.parquet/"),
        )
        .await?;
        assert_eq!(parts, 1, "{day} compacted into one part");
        assert_eq!(all.len(), 90, "{day}");
        assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), 90);
    }
    assert!(
        moto.list(
            "lake",
            &format!("tables/{TABLE}/{TABLE}_2026-11-30.parquet/")
        )
        .await?
        .is_empty()
    );
    assert_eq!(
        moto.list("lake", "quarantine/").await?.len(),
        2,
        "copy and reason"
    );

    // Rerun: the parts are gone (compacted) but the manifests and the quarantine say it is done.
    let again = backfill.run(&request(false)).await?;
    assert_eq!(
        (again.normalized, again.skipped, again.quarantined),
        (0, 5, 0),
        "{again:#?}"
    );
    moto.stop().await;
    Ok(())
}
