//! Backfill over an in-memory store: the input is listed page by page, one delivery day of one
//! event type at a time, days outside `--from`/`--to` are listed past rather than read, and
//! neither the input nor the tables prefix is ever listed whole.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use apache_avro::Codec;
use async_trait::async_trait;
use bridge_shared::object_store::{MemoryStore, ObjectMeta, ObjectReader};
use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use chrono::NaiveDate;
use currents_normalize::backfill::{Backfill, BackfillRequest, day_prefix};
use currents_normalize::config::Config;
use currents_normalize::registry::Registry;
use currents_normalize::synth::{self, FileSpec};

const RAW: &str = "raw";
const T: &str = "users.messages.email.Send";
const OPEN: &str = "users.messages.email.Open";

/// Records every listing asked of the store.
struct Counting {
    inner: MemoryStore,
    lists: Mutex<Vec<String>>,
    pages: Mutex<Vec<(Option<String>, Vec<String>)>>,
}

#[async_trait]
impl ObjectStore for Counting {
    async fn get(&self, uri: &S3Uri) -> Result<(ObjectMeta, Bytes), StoreError> {
        self.inner.get(uri).await
    }
    async fn get_reader(&self, uri: &S3Uri) -> Result<(ObjectMeta, ObjectReader), StoreError> {
        self.inner.get_reader(uri).await
    }
    async fn head(&self, uri: &S3Uri) -> Result<Option<ObjectMeta>, StoreError> {
        self.inner.head(uri).await
    }
    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.lists
            .lock()
            .unwrap()
            .push(format!("{bucket}/{prefix}"));
        self.inner.list(bucket, prefix).await
    }
    async fn list_page(
        &self,
        bucket: &str,
        prefix: &str,
        start_after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ObjectMeta>, StoreError> {
        // Small pages, so the test crosses page boundaries.
        let page = self
            .inner
            .list_page(bucket, prefix, start_after, max.min(3))
            .await?;
        self.pages.lock().unwrap().push((
            start_after.map(str::to_string),
            page.iter().map(|o| o.key.clone()).collect(),
        ));
        Ok(page)
    }
    async fn put(
        &self,
        uri: &S3Uri,
        body: Bytes,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        self.inner.put(uri, body, condition, metadata).await
    }
    async fn copy(&self, from: &S3Uri, to: &S3Uri) -> Result<(), StoreError> {
        self.inner.copy(from, to).await
    }
    async fn delete(&self, uri: &S3Uri) -> Result<(), StoreError> {
        self.inner.delete(uri).await
    }
}

fn avro(event_type: &str, seed: u64) -> Vec<u8> {
    let r = Registry::builtin().unwrap();
    let entry = r
        .entries()
        .iter()
        .find(|e| e.event_type == event_type)
        .unwrap();
    synth::file(
        entry,
        &FileSpec {
            events: 10,
            duplicates: 0,
            seed,
            codec: Codec::Null,
        },
    )
    .unwrap()
}

fn request(from: Option<&str>, to: Option<&str>) -> BackfillRequest {
    let d = |s: Option<&str>| s.map(|s| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap());
    BackfillRequest {
        bucket: RAW.into(),
        prefix: "currents/".into(),
        from: d(from),
        to: d(to),
        concurrency: 2,
        dry_run: false,
        no_compact: false,
        progress: false,
    }
}

async fn store_with_history() -> Arc<Counting> {
    let store = Arc::new(Counting {
        inner: MemoryStore::new(),
        lists: Mutex::default(),
        pages: Mutex::default(),
    });
    let mut seed = 0;
    for t in [T, OPEN] {
        for day in 1..=10 {
            let d = format!("2026-11-{day:02}");
            for hour in ["03", "17"] {
                seed += 1;
                let key = synth::key("currents", t, &format!("{d}-{hour}"), seed);
                store
                    .put(
                        &S3Uri::new(RAW, key),
                        Bytes::from(avro(t, seed)),
                        PutCondition::None,
                        BTreeMap::new(),
                    )
                    .await
                    .unwrap();
            }
        }
    }
    store
        .put(
            &S3Uri::new(RAW, "currents/notes.txt"),
            Bytes::from_static(b"x"),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
    store
}

#[tokio::test]
async fn a_backfill_lists_page_by_page_and_plans_one_day_at_a_time() {
    let store = store_with_history().await;
    let b = Backfill::new(
        Config::default(),
        store.clone(),
        Arc::new(Registry::builtin().unwrap()),
    );
    let s = b
        .run(&request(Some("2026-11-05"), Some("2026-11-06")))
        .await
        .unwrap();
    // Two event types × two days × two hours.
    assert_eq!((s.objects, s.normalized, s.failed), (8, 8, 0), "{s:?}");
    assert_eq!(s.days_compacted, 4, "{s:?}");

    let lists = store.lists.lock().unwrap().clone();
    for l in &lists {
        assert!(
            l != "raw/currents/" && l != "raw/tables/" && l != "raw/quarantine/",
            "a whole prefix was listed: {l}"
        );
    }
    assert!(
        lists.contains(&"raw/quarantine/currents/dataexport.prod-01.S3.integration.5f0c1e2d3b4a/event_type=users.messages.email.Open/date=2026-11-05".to_string()),
        "{lists:?}"
    );
    // Days before --from and after --to are listed past: of their 48 objects, at most one
    // page (3 keys) per event type on each side of the range is ever returned.
    let pages = store.pages.lock().unwrap().clone();
    let outside = pages
        .iter()
        .flat_map(|(_, k)| k)
        .filter(|k| {
            day_prefix(k).is_some_and(|p| {
                p.day < NaiveDate::from_ymd_opt(2026, 11, 5).unwrap()
                    || p.day > NaiveDate::from_ymd_opt(2026, 11, 6).unwrap()
            })
        })
        .count();
    assert!(outside <= 12, "{outside} keys read from outside the range");
    assert!(
        pages.iter().all(|(_, k)| k.len() <= 3),
        "pages are as small as asked"
    );

    // A rerun finds everything done (compacted into the manifests) and converts nothing.
    let again = b
        .run(&request(Some("2026-11-05"), Some("2026-11-06")))
        .await
        .unwrap();
    assert_eq!((again.objects, again.skipped, again.normalized), (8, 8, 0));
}

#[test]
fn a_day_prefix_covers_every_hour_of_one_day_of_one_event_type() {
    let p = day_prefix("currents/x/event_type=T/date=2026-11-29-10/421/zone-a/a.avro").unwrap();
    assert_eq!(p.prefix, "currents/x/event_type=T/date=2026-11-29");
    assert_eq!(p.day, NaiveDate::from_ymd_opt(2026, 11, 29).unwrap());
    let q = day_prefix("currents/x/event_type=T/date=2026-11-29-23/version=7/b.avro").unwrap();
    assert_eq!(p, q);
    assert!(day_prefix("currents/notes.txt").is_none());
    let d = |s| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok();
    assert_eq!(
        p.skip_to(d("2026-12-01"), None).as_deref(),
        Some("currents/x/event_type=T/date=2026-12-01")
    );
    assert_eq!(
        p.skip_to(None, d("2026-11-28")).as_deref(),
        Some("currents/x/event_type=T/date=~")
    );
    assert_eq!(p.skip_to(d("2026-11-29"), d("2026-11-29")), None);
}
