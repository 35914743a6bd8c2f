//! A run that dies after Braze applied a request and before the checkpoint that would have
//! confirmed it: the users it had in flight are unknown to the state (the committer marked
//! them before sending), so a newer export that reverts their values sends them again and
//! Braze ends with the newest export's values. A run that ends leaves no such mark behind.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use braze_sync::config::route::Route;
use braze_sync::ops::report::RunStatus;
use braze_sync::run::handler::{ExportPlan, ExportRunner};
use braze_sync::run::runner::{RunnerSettings, SyncRunner};
use braze_sync::send::braze::{BrazeApi, TrackError, TrackResponse};
use bridge_shared::S3Uri;
use bridge_shared::object_store::{MemoryStore, ObjectStore, PutCondition};
use bytes::Bytes;
use serde_json::Value;

const ROUTE: &str = common::PEOPLE_ROUTE;

/// Braze keeping each user's tier; the run dies while request `die_at` is in flight, after
/// Braze applied it (its answer never comes).
#[derive(Default)]
struct Braze {
    tiers: Mutex<BTreeMap<String, String>>,
    requests: Mutex<usize>,
    die_at: Mutex<Option<usize>>,
}

#[async_trait]
impl BrazeApi for Braze {
    async fn track(&self, body: Bytes) -> Result<TrackResponse, TrackError> {
        let v: Value = serde_json::from_slice(&body).unwrap();
        for o in v["attributes"].as_array().unwrap() {
            let id = o["external_id"].as_str().unwrap().to_string();
            if let Some(t) = o["tier"].as_str() {
                self.tiers.lock().unwrap().insert(id, t.to_string());
            }
        }
        let n = {
            let mut r = self.requests.lock().unwrap();
            *r += 1;
            *r
        };
        if *self.die_at.lock().unwrap() == Some(n) {
            std::future::pending::<()>().await;
        }
        Ok(common::success())
    }
}

fn csv(n: u32, tier: &str) -> Bytes {
    let mut s = String::from("id,tier\n");
    for i in 0..n {
        s.push_str(&format!("u{i:02},{tier}\n"));
    }
    Bytes::from(s)
}

async fn plan(store: &MemoryStore, key: &str, body: Bytes) -> ExportPlan {
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
        force_full: false,
        allow_departures: false,
        forced_salt: None,
    }
}

fn runner(store: &Arc<MemoryStore>, braze: &Arc<Braze>) -> SyncRunner {
    let mut settings = RunnerSettings::new("state", "s/", "r/", "x/");
    settings.checkpoint_every = Duration::from_millis(20);
    settings.route_lease_s = 1;
    settings.workspace_share = None;
    settings.deliver.max_objects = 5;
    settings.deliver.max_in_flight = 1;
    settings.deliver.in_flight_grace = Duration::from_millis(0);
    let route = Route::from_toml(ROUTE, "test").unwrap();
    SyncRunner::new(store.clone(), vec![route], braze.clone(), settings, None)
}

fn tiers(braze: &Braze, tier: &str) -> usize {
    braze
        .tiers
        .lock()
        .unwrap()
        .values()
        .filter(|t| *t == tier)
        .count()
}

#[tokio::test]
async fn values_a_dead_run_sent_are_resent_when_a_newer_export_reverts_them() {
    let store = Arc::new(MemoryStore::new());
    let braze = Arc::new(Braze::default());
    let r = runner(&store, &braze);
    let gold = plan(&store, "in/a0.csv", csv(20, "Gold")).await;
    assert_eq!(
        r.run(&gold, None).await.unwrap().status,
        RunStatus::Complete
    );
    assert_eq!(tiers(&braze, "Gold"), 20);

    // The next export changes everyone to Silver; the run dies while its first request is in
    // flight, after Braze applied it.
    let next = *braze.requests.lock().unwrap() + 1;
    *braze.die_at.lock().unwrap() = Some(next);
    let silver = plan(&store, "in/a1.csv", csv(20, "Silver")).await;
    let died = tokio::time::timeout(Duration::from_millis(1_500), r.run(&silver, None)).await;
    assert!(died.is_err(), "the run is still waiting for Braze's answer");
    let applied = tiers(&braze, "Silver");
    assert!(applied > 0 && applied < 20, "{applied} users got Silver");

    // Its route lock expires; a newer export reverts everyone to Gold.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let r = runner(&store, &braze);
    let back = plan(&store, "in/a2.csv", csv(20, "Gold")).await;
    let out = r.run(&back, None).await.unwrap();
    assert_eq!(out.status, RunStatus::Complete, "{}", out.summary);
    assert_eq!(
        tiers(&braze, "Gold"),
        20,
        "the users the dead run had in flight were sent again: {:?}",
        braze.tiers.lock().unwrap()
    );
    // At most the users the dead run had let ahead of its sender are sent again.
    let resent = out.summary["users_sent"].as_u64().unwrap();
    assert!(resent >= applied as u64 && resent <= 20, "{}", out.summary);

    // Nothing is left unknown: the same values again send nothing.
    let before = *braze.requests.lock().unwrap();
    let again = plan(&store, "in/a3.csv", csv(20, "Gold")).await;
    let out = r.run(&again, None).await.unwrap();
    assert_eq!(out.status, RunStatus::Complete);
    assert_eq!(*braze.requests.lock().unwrap(), before, "{}", out.summary);
}
