//! Compaction over an in-memory store: a run that loses its lease while it works writes
//! neither the day's manifest nor deletes anything, so the winner's record of what the
//! compacted parts hold stays whole.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

use apache_avro::Codec;
use async_trait::async_trait;
use bridge_shared::hooked_store::{Call, Hook, Hooked};
use bridge_shared::object_store::MemoryStore;
use bridge_shared::trigger::ObjectRef;
use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use chrono::NaiveDate;
use currents_normalize::compact::{CompactRequest, Compactor, DayOutcome, Manifest, TableDay};
use currents_normalize::config::Config;
use currents_normalize::handler::Handler;
use currents_normalize::registry::Registry;
use currents_normalize::report::Outcome;
use currents_normalize::synth::{self, FileSpec};

const BUCKET: &str = "acme-braze-currents";
const T: &str = "users.messages.email.Send";
const TABLE: &str = "users_messages_email_send";
const LEASE: &str = "state/currents/compaction/leases/users_messages_email_send/2026-11-29.json";
const MANIFEST: &str =
    "state/currents/compaction/manifests/users_messages_email_send/2026-11-29.json";

fn registry() -> Arc<Registry> {
    Arc::new(Registry::builtin().unwrap())
}

async fn normalize(store: Arc<dyn ObjectStore>, offset: u64, seed: u64) {
    let r = registry();
    let entry = r.entries().iter().find(|e| e.event_type == T).unwrap();
    let body = synth::file(
        entry,
        &FileSpec {
            events: 30,
            duplicates: 3,
            seed,
            codec: Codec::Null,
        },
    )
    .unwrap();
    let key = synth::key("currents", T, "2026-11-29-10", offset);
    let uri = S3Uri::new(BUCKET, key);
    store
        .put(&uri, Bytes::from(body), PutCondition::None, BTreeMap::new())
        .await
        .unwrap();
    let h = Handler::new(Config::default(), store, r);
    let out = h.process(&ObjectRef::named(uri, "test"), false).await;
    assert_eq!(out.outcome, Outcome::Written, "{out:?}");
}

/// Another run takes the day's lease over (and records its own manifest) while this run
/// uploads its compacted part: the moment a slow run's lease expires.
struct TakenOverWhileUploading(AtomicBool);

#[async_trait]
impl Hook for TakenOverWhileUploading {
    async fn before(&self, store: &dyn ObjectStore, call: Call<'_>) -> Result<(), StoreError> {
        if !(matches!(call, Call::Put { .. } | Call::PutFile { .. })
            && call.key().contains("/part-compacted-")
            && self.0.swap(false, SeqCst))
        {
            return Ok(());
        }
        let lease = serde_json::json!({
            "owner": "winner",
            "expires_at_ms": chrono::Utc::now().timestamp_millis() + 600_000,
            "released": false,
        });
        put(store, LEASE, lease.to_string().into_bytes()).await?;
        let winner = Manifest {
            table: TABLE.into(),
            day: "2026-11-29".into(),
            outputs: vec!["part-compacted-winner.parquet".into()],
            sources: ["winner-source".to_string()].into(),
        };
        put(store, MANIFEST, serde_json::to_vec(&winner).unwrap()).await
    }
}

async fn put(store: &dyn ObjectStore, key: &str, body: Vec<u8>) -> Result<(), StoreError> {
    let uri = S3Uri::new(BUCKET, key);
    store
        .put(&uri, Bytes::from(body), PutCondition::None, BTreeMap::new())
        .await
        .map(drop)
}

fn request() -> CompactRequest {
    CompactRequest {
        selection: Default::default(),
        dry_run: false,
        today: NaiveDate::from_ymd_opt(2026, 11, 30).unwrap(),
        deadline: None,
        owner: "slow-run".into(),
    }
}

#[tokio::test]
async fn a_run_that_lost_its_lease_leaves_the_winners_manifest_and_the_parts_alone() {
    let mem = Arc::new(MemoryStore::new());
    normalize(mem.clone(), 1, 1).await;
    normalize(mem.clone(), 2, 2).await;
    let parts_before: Vec<String> = mem
        .keys(BUCKET)
        .into_iter()
        .filter(|k| k.starts_with("tables/"))
        .collect();
    assert_eq!(parts_before.len(), 2);
    let store = Arc::new(Hooked::new(
        mem.clone(),
        TakenOverWhileUploading(AtomicBool::new(true)),
    ));
    let compactor = Compactor::new(Config::default(), store, registry());
    let days = compactor.run(BUCKET, &request()).await.unwrap();
    assert_eq!(days.len(), 1);
    assert_eq!(days[0].outcome, DayOutcome::LeaseLost, "{:?}", days[0]);
    assert_eq!(days[0].parts_deleted, 0);

    let td = TableDay {
        day: NaiveDate::from_ymd_opt(2026, 11, 29).unwrap(),
        table: TABLE.into(),
    };
    let m = compactor.manifest(BUCKET, &td).await.unwrap().unwrap();
    assert_eq!(
        m.outputs,
        ["part-compacted-winner.parquet"],
        "the loser overwrote the winner's manifest"
    );
    assert_eq!(m.sources, ["winner-source".to_string()].into());
    for p in &parts_before {
        assert!(mem.keys(BUCKET).contains(p), "{p} was deleted");
    }
}

#[tokio::test]
async fn a_manifest_written_meanwhile_by_another_run_is_not_overwritten() {
    // The lease is still ours when checked, but the manifest changed since it was read:
    // the conditional write refuses, and nothing is deleted.
    let mem = Arc::new(MemoryStore::new());
    normalize(mem.clone(), 1, 1).await;
    let store = Arc::new(Hooked::new(
        mem.clone(),
        ManifestChangesAfterRead(AtomicBool::new(false)),
    ));
    let compactor = Compactor::new(Config::default(), store, registry());
    let days = compactor.run(BUCKET, &request()).await.unwrap();
    assert_eq!(days[0].outcome, DayOutcome::LeaseLost, "{:?}", days[0]);
    assert_eq!(days[0].parts_deleted, 0);
    let (_, body) = mem.get(&S3Uri::new(BUCKET, MANIFEST)).await.unwrap();
    let m: Manifest = serde_json::from_slice(&body).unwrap();
    assert_eq!(m.outputs, ["part-compacted-other.parquet"]);
}

/// Someone else writes the manifest right after this run first reads it.
struct ManifestChangesAfterRead(AtomicBool);

#[async_trait]
impl Hook for ManifestChangesAfterRead {
    async fn after(
        &self,
        store: &dyn ObjectStore,
        call: Call<'_>,
        _: bool,
    ) -> Result<(), StoreError> {
        if !(matches!(call, Call::Get(_)) && call.key() == MANIFEST && !self.0.swap(true, SeqCst)) {
            return Ok(());
        }
        let other = Manifest {
            table: TABLE.into(),
            day: "2026-11-29".into(),
            outputs: vec!["part-compacted-other.parquet".into()],
            sources: Default::default(),
        };
        put(store, MANIFEST, serde_json::to_vec(&other).unwrap()).await
    }
}

/// Three parts of one day, the second and third repeating rows of the first (same seed).
async fn day_with_duplicates() -> Arc<MemoryStore> {
    let mem = Arc::new(MemoryStore::new());
    normalize(mem.clone(), 1, 1).await;
    normalize(mem.clone(), 2, 1).await;
    normalize(mem.clone(), 3, 2).await;
    mem
}

#[tokio::test]
async fn a_day_deduplicated_in_many_buckets_keeps_the_same_rows_in_the_same_bytes() {
    let mut names = Vec::new();
    for max_set_rows in [u64::MAX, 7, 1] {
        let mem = day_with_duplicates().await;
        let opts = currents_normalize::compact::merge::MergeOptions {
            max_set_rows,
            ..Default::default()
        };
        let compactor =
            Compactor::new(Config::default(), mem.clone(), registry()).with_options(opts);
        let days = compactor.run(BUCKET, &request()).await.unwrap();
        let d = &days[0];
        assert_eq!(d.outcome, DayOutcome::Compacted, "{d:?}");
        assert_eq!(
            (d.rows_in, d.rows_out, d.duplicates_removed),
            (90, 60, 30),
            "{max_set_rows}: {d:?}"
        );
        names.push(d.outputs.clone());
    }
    assert_eq!(names[0], names[1], "7 rows a bucket");
    assert_eq!(names[0], names[2], "1 row a bucket");
}
