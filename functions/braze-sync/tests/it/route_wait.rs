//! An export that finds its route held by another run is acknowledged and handed over to
//! itself with a delay (its ledger entry counting the waits) instead of failing its message
//! back to the queue; past the limit of waits in a row it fails retryably as before, and a
//! run that takes the route starts the count again.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use braze_sync::config::route::Route;
use braze_sync::run::handler::{ExportPlan, Handler};
use braze_sync::run::runner::{Continuation, RunnerSettings};
use braze_sync::send::braze::{BrazeApi, TrackError, TrackResponse};
use braze_sync::state::route_lock::{RouteLock, lock_uri};
use bridge_shared::S3Uri;
use bridge_shared::object_store::{MemoryStore, ObjectStore, PutCondition};
use bytes::Bytes;
use serde_json::{Value, json};

const ROUTE: &str = common::PEOPLE_ROUTE;

struct Ok200;

#[async_trait]
impl BrazeApi for Ok200 {
    async fn track(&self, _: Bytes) -> Result<TrackResponse, TrackError> {
        Ok(common::success())
    }
}

/// Records each continuation: the trigger's key and its delay.
#[derive(Default)]
struct Delayed(Mutex<Vec<(String, Duration)>>);

#[async_trait]
impl Continuation for Delayed {
    async fn hand_over(&self, plan: &ExportPlan) -> Result<(), String> {
        self.hand_over_after(plan, Duration::ZERO).await
    }

    async fn hand_over_after(&self, plan: &ExportPlan, delay: Duration) -> Result<(), String> {
        self.0
            .lock()
            .unwrap()
            .push((plan.trigger.key.clone(), delay));
        Ok(())
    }
}

fn handler(store: Arc<MemoryStore>, queue: Arc<Delayed>) -> Handler {
    let route = Route::from_toml(ROUTE, "t").unwrap();
    let mut s = RunnerSettings::new("state", "s/", "r/", "x/");
    s.deliver.max_objects = 10;
    common::handler(store, &route, Arc::new(Ok200), s, Some(queue))
}

fn notification() -> Value {
    json!({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": "exports"}, "object": {"key": "in/a.csv"}}}]})
}

/// The export's ledger entry.
async fn ledger_entry(store: &MemoryStore) -> Value {
    let key = store
        .keys("state")
        .into_iter()
        .find(|k| k.starts_with("s/people/ledger/"))
        .unwrap();
    let (_, b) = store.get(&S3Uri::new("state", &key)).await.unwrap();
    serde_json::from_slice(&b).unwrap()
}

#[tokio::test]
async fn an_export_that_finds_its_route_busy_waits_on_the_queue_with_a_limit() {
    let store = Arc::new(MemoryStore::new());
    let queue = Arc::new(Delayed::default());
    let h = handler(store.clone(), queue.clone());
    store
        .put(
            &S3Uri::new("exports", "in/a.csv"),
            Bytes::from("id,tier\nu1,gold\nu2,silver\n"),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
    // Another run holds the route for an hour.
    let lock = RouteLock::acquire(
        store.clone() as Arc<dyn ObjectStore>,
        lock_uri("state", "s/", "people"),
        "other-run",
        braze_sync::clock::now().timestamp_millis(),
        3_600,
    )
    .await
    .unwrap()
    .unwrap();
    // The invocation has just the time a run needs, so it does not wait for the route itself.
    let remaining = Some(60_000);
    for wait in 1..=8u64 {
        let out = h
            .handle(&notification(), remaining)
            .await
            .unwrap_or_else(|e| {
                panic!("wait {wait}: the busy route fails the message instead of waiting: {e}")
            });
        let r = &out["results"][0];
        assert_eq!(r["outcome"], "incomplete", "{out}");
        assert_eq!(r["summary"]["status"], "waiting_for_route", "{out}");
        assert!(r["report"].is_string(), "each wait is reported: {out}");
        assert_eq!(ledger_entry(&store).await["route_waits"], wait, "{out}");
        let queued = queue.0.lock().unwrap().clone();
        assert_eq!(queued.len() as u64, wait, "{queued:?}");
        assert_eq!(
            queued.last().unwrap(),
            &("in/a.csv".to_string(), Duration::from_secs(120)),
            "handed over to itself two leases later"
        );
    }
    // The ninth finds the limit: it fails retryably, as without the wait.
    let err = h.handle(&notification(), remaining).await.unwrap_err();
    assert!(
        err.contains("waits its turn (after 8 delayed waits in a row)"),
        "{err}"
    );
    assert_eq!(queue.0.lock().unwrap().len(), 8, "nothing more is queued");
    // The failure starts the count again: the message's next receive may wait again, so the
    // queue's receive count bounds the whole.
    let entry = ledger_entry(&store).await;
    assert!(entry.get("route_waits").is_none(), "{entry}");
    // Once the route is free the export runs, and the count starts again.
    lock.release().await.unwrap();
    let out = h.handle(&notification(), remaining).await.unwrap();
    assert_eq!(out["results"][0]["outcome"], "synced", "{out}");
    let entry = ledger_entry(&store).await;
    assert!(entry.get("route_waits").is_none(), "{entry}");
}
