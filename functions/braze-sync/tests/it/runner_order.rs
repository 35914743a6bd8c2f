//! Export order is declared per route, never guessed: a key dated in 2099 is refused (it cannot
//! pin the watermark), an older export is `skipped_stale` (never `complete`), a forced replay
//! of an older export is sent and says so, and a watermark pinned in the future by an older
//! version is ignored.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use braze_sync::config::route::Route;
use braze_sync::ops::report::{RunReport, RunStatus};
use braze_sync::run::handler::{ExportPlan, ExportRunner, RunError};
use braze_sync::run::runner::{RunnerSettings, SyncRunner};
use braze_sync::send::braze::{BrazeApi, TrackError, TrackResponse};
use braze_sync::state::store::{StateStore, Watermark};
use bridge_shared::S3Uri;
use bridge_shared::object_store::{MemoryStore, ObjectStore, PutCondition};
use bytes::Bytes;
use serde_json::Value;

fn route_toml(order: &str) -> String {
    format!(
        r#"
name = "people"
prefix = "in/"
update_existing_only = false
{order}
[identifier]
kind = "external_id"
column = "id"
[attributes.tier]
type = "String"
"#
    )
}

const BY_KEY: &str = "order_by = \"key\"\nkey_time_format = \"people_%Y%m%d.csv\"";

#[derive(Default)]
struct Braze {
    sent: Mutex<Vec<String>>,
}

#[async_trait]
impl BrazeApi for Braze {
    async fn track(&self, body: Bytes) -> Result<TrackResponse, TrackError> {
        let v: Value = serde_json::from_slice(&body).unwrap();
        for o in v["attributes"].as_array().unwrap() {
            self.sent
                .lock()
                .unwrap()
                .push(format!("{}={}", o["external_id"], o["tier"]));
        }
        Ok(common::success())
    }
}

fn csv(tier: &str) -> Bytes {
    Bytes::from(format!("id,tier\nu1,{tier}\nu2,{tier}\n"))
}

async fn plan(store: &MemoryStore, key: &str, body: Bytes, force_full: bool) -> ExportPlan {
    let uri = S3Uri::new("exports", key);
    let meta = store
        .put(&uri, body, PutCondition::None, BTreeMap::new())
        .await
        .unwrap();
    ExportPlan {
        route: "people".into(),
        trigger: uri.clone(),
        export_id: format!("{uri}#{}", meta.etag),
        trigger_meta: meta.clone(),
        parts: vec![meta],
        force_full,
        allow_departures: false,
        forced_salt: None,
    }
}

fn runner(store: &Arc<MemoryStore>, braze: &Arc<Braze>, order: &str) -> SyncRunner {
    let mut settings = RunnerSettings::new("state", "s/", "r/", "x/");
    settings.deliver.in_flight_grace = std::time::Duration::ZERO;
    let route = Route::from_toml(&route_toml(order), "test").unwrap();
    SyncRunner::new(store.clone(), vec![route], braze.clone(), settings, None)
}

async fn report(store: &MemoryStore, uri: &str) -> RunReport {
    let (_, body) = store.get(&uri.parse().unwrap()).await.unwrap();
    serde_json::from_slice(&body).unwrap()
}

async fn watermark(store: &Arc<MemoryStore>) -> Option<Watermark> {
    StateStore::new(store.clone(), "state", "s/", "people")
        .read_head()
        .await
        .unwrap()
        .doc
        .watermark
}

#[tokio::test]
async fn a_key_dated_in_2099_is_refused_and_cannot_pin_the_watermark() {
    let store = Arc::new(MemoryStore::new());
    let braze = Arc::new(Braze::default());
    let r = runner(&store, &braze, BY_KEY);
    let p = plan(&store, "in/people_20991231.csv", csv("gold"), false).await;
    let err = r.run(&p, None).await.unwrap_err();
    let RunError::Permanent {
        message,
        report: Some(uri),
    } = err
    else {
        panic!("a future-dated export is a permanent refusal with a report")
    };
    assert!(message.contains("max_future_skew (1h)"), "{message}");
    let rep = report(&store, &uri).await;
    assert_eq!(rep.status, RunStatus::Failed);
    assert!(rep.error.unwrap().contains("2099-12-31"));
    assert!(braze.sent.lock().unwrap().is_empty(), "nothing was sent");
    assert_eq!(watermark(&store).await, None, "the watermark did not move");

    // The next genuine export syncs normally.
    let p = plan(&store, "in/people_20261129.csv", csv("gold"), false).await;
    assert!(r.run(&p, None).await.unwrap().complete());
    assert_eq!(braze.sent.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_key_off_the_declared_format_is_refused_with_the_format_named() {
    let store = Arc::new(MemoryStore::new());
    let braze = Arc::new(Braze::default());
    let r = runner(&store, &braze, BY_KEY);
    let p = plan(&store, "in/people_20261129_v2.csv", csv("gold"), false).await;
    let RunError::Permanent { message, .. } = r.run(&p, None).await.unwrap_err() else {
        panic!("permanent")
    };
    assert!(
        message.contains("key_time_format") && message.contains("people_20261129_v2.csv"),
        "{message}"
    );
}

#[tokio::test]
async fn an_older_export_is_skipped_stale_never_complete_and_a_forced_replay_says_so() {
    let store = Arc::new(MemoryStore::new());
    let braze = Arc::new(Braze::default());
    let r = runner(&store, &braze, BY_KEY);
    let newer = plan(&store, "in/people_20261129.csv", csv("gold"), false).await;
    assert!(r.run(&newer, None).await.unwrap().complete());
    let mark = watermark(&store).await.unwrap();
    assert_eq!(
        mark.exported_at.as_deref(),
        Some("2026-11-29T00:00:00+00:00")
    );

    // Uploaded later, dated earlier: skipped, reported as such, nothing sent.
    braze.sent.lock().unwrap().clear();
    let older = plan(&store, "in/people_20261128.csv", csv("silver"), false).await;
    let out = r.run(&older, None).await.unwrap();
    assert_eq!(out.status, RunStatus::SkippedStale);
    assert!(!out.complete(), "a skipped export is never complete");
    assert_eq!(out.summary["status"], "skipped_stale");
    let rep = report(&store, out.report.as_deref().unwrap()).await;
    assert_eq!(rep.status, RunStatus::SkippedStale);
    let emf: Value = serde_json::from_str(&rep.emf_line(0)).unwrap();
    assert_eq!(emf["skipped_stale"], 1.0);
    assert!(braze.sent.lock().unwrap().is_empty());

    // Forced: sent in full, reported as a forced replay of an older export; the watermark
    // stays at the newer export.
    let forced = plan(&store, "in/people_20261128.csv", csv("silver"), true).await;
    let out = r.run(&forced, None).await.unwrap();
    assert!(out.complete());
    let rep = report(&store, out.report.as_deref().unwrap()).await;
    assert!(rep.forced_older_replay);
    assert!(
        rep.notes.iter().any(|n| n.contains("forced replay")),
        "{:?}",
        rep.notes
    );
    assert_eq!(braze.sent.lock().unwrap().len(), 2);
    assert_eq!(watermark(&store).await.unwrap().export_id, mark.export_id);
}

#[tokio::test]
async fn last_modified_is_the_default_so_a_date_in_the_name_means_nothing() {
    let store = Arc::new(MemoryStore::new());
    let braze = Arc::new(Braze::default());
    let r = runner(&store, &braze, "");
    let p = plan(&store, "in/customers_20991231.csv", csv("gold"), false).await;
    assert!(r.run(&p, None).await.unwrap().complete());
    let p = plan(&store, "in/customers_20200101.csv", csv("silver"), false).await;
    let out = r.run(&p, None).await.unwrap();
    assert!(out.complete(), "arrival order: the later upload applies");
    assert_eq!(braze.sent.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn a_watermark_pinned_in_the_future_by_an_older_version_is_ignored() {
    let store = Arc::new(MemoryStore::new());
    let braze = Arc::new(Braze::default());
    let route = Route::from_toml(&route_toml(""), "test").unwrap();
    let st = StateStore::new(store.clone(), "state", "s/", "people");
    let (mut head, snap) = st.load(&route).await.unwrap();
    st.commit(
        &mut head,
        snap,
        Some(Watermark {
            export_id: "s3://exports/in/customers_20991231.csv#e".into(),
            exported_at: Some("2099-12-31T00:00:00+00:00".into()),
        }),
    )
    .await
    .unwrap();
    let r = runner(&store, &braze, "");
    let p = plan(&store, "in/today.csv", csv("gold"), false).await;
    let out = r.run(&p, None).await.unwrap();
    assert!(out.complete());
    let rep = report(&store, out.report.as_deref().unwrap()).await;
    assert!(
        rep.notes
            .iter()
            .any(|n| n.contains("beyond max_future_skew"))
    );
    assert_eq!(watermark(&store).await.unwrap().export_id, p.export_id);
}
