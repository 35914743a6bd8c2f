//! Commit, hand-over and leases: the continuation is queued only after the run's route lock and
//! export claim are released; a short route lease is renewed while a run lives, so a second
//! run of the route is refused throughout, and one whose renewals keep failing stops sending
//! before its lease ends; a failed checkpoint stops the sender at once and ends the run
//! retryably; a state too large for memory is refused before the lock is taken.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use braze_sync::config::route::Route;
use braze_sync::run::handler::{ExportPlan, ExportRunner, Handler, HandlerConfig, RunError};
use braze_sync::run::runner::{Continuation, RunnerSettings, SyncRunner};
use braze_sync::send::braze::{BrazeApi, TrackError, TrackResponse};
use bridge_shared::S3Uri;
use bridge_shared::object_store::{MemoryStore, ObjectStore, PutCondition};
use bytes::Bytes;
use serde_json::{Value, json};

const ROUTE: &str = common::PEOPLE_ROUTE;

/// Braze answering after `delay`, counting the users it was sent.
struct SlowBraze {
    delay: Duration,
    sent: AtomicUsize,
}

#[async_trait]
impl BrazeApi for SlowBraze {
    async fn track(&self, body: Bytes) -> Result<TrackResponse, TrackError> {
        tokio::time::sleep(self.delay).await;
        let v: Value = serde_json::from_slice(&body).unwrap();
        self.sent
            .fetch_add(v["attributes"].as_array().unwrap().len(), Ordering::SeqCst);
        Ok(common::success())
    }
}

fn braze(delay_ms: u64) -> Arc<SlowBraze> {
    Arc::new(SlowBraze {
        delay: Duration::from_millis(delay_ms),
        sent: AtomicUsize::new(0),
    })
}

fn csv(n: u32) -> Bytes {
    let mut s = String::from("id,tier\n");
    for i in 0..n {
        s.push_str(&format!("u{i},gold\n"));
    }
    Bytes::from(s)
}

async fn plan(store: &dyn ObjectStore, key: &str, body: Bytes) -> ExportPlan {
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

fn settings() -> RunnerSettings {
    let mut s = RunnerSettings::new("state", "s/", "r/", "x/");
    s.checkpoint_every = Duration::from_millis(20);
    s.deliver.max_objects = 10;
    s.deliver.max_in_flight = 1;
    s.deliver.in_flight_grace = Duration::ZERO;
    s
}

fn runner(
    store: Arc<dyn ObjectStore>,
    api: Arc<SlowBraze>,
    s: RunnerSettings,
    c: Option<Arc<dyn Continuation>>,
) -> SyncRunner {
    SyncRunner::new(
        store,
        vec![Route::from_toml(ROUTE, "t").unwrap()],
        api,
        s,
        c,
    )
}

/// A continuation that looks at the route lock and the export's ledger entry when called.
struct Inspecting {
    store: Arc<MemoryStore>,
    seen: Mutex<Vec<Value>>,
}

#[async_trait]
impl Continuation for Inspecting {
    async fn hand_over(&self, _: &ExportPlan) -> Result<(), String> {
        let lock_uri = S3Uri::new("state", "s/people/route-lock.json");
        let (_, lock) = self.store.get(&lock_uri).await.unwrap();
        let lock: Value = serde_json::from_slice(&lock).unwrap();
        let mut entries = Vec::new();
        for k in self.store.keys("state") {
            if k.starts_with("s/people/ledger/") {
                let (_, b) = self.store.get(&S3Uri::new("state", &k)).await.unwrap();
                entries.push(serde_json::from_slice::<Value>(&b).unwrap());
            }
        }
        self.seen
            .lock()
            .unwrap()
            .push(json!({"lock": lock, "ledger": entries}));
        Ok(())
    }
}

#[tokio::test]
async fn the_continuation_is_queued_only_after_the_lock_and_the_claim_are_released() {
    let store = Arc::new(MemoryStore::new());
    let inspect = Arc::new(Inspecting {
        store: store.clone(),
        seen: Mutex::new(Vec::new()),
    });
    let mut s = settings();
    s.max_run = Some(Duration::from_millis(300));
    let r = runner(
        store.clone(),
        braze(60),
        s,
        Some(inspect.clone() as Arc<dyn Continuation>),
    );
    let route = Route::from_toml(ROUTE, "t").unwrap();
    let handler = Handler::new(
        HandlerConfig {
            state_bucket: "state".into(),
            output_prefixes: vec!["s/".into(), "r/".into(), "x/".into()],
            state_prefix: "s/".into(),
            reports_prefix: "r/".into(),
            routes: vec![route.binding()],
            lease_s: 60,
        },
        store.clone(),
        Arc::new(r),
    );
    store
        .put(
            &S3Uri::new("exports", "in/big.csv"),
            csv(400),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
    let out = handler
        .handle(
            &json!({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": "exports"}, "object": {"key": "in/big.csv"}}}]}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(out["results"][0]["outcome"], "incomplete", "{out}");
    let seen = inspect.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "handed over once: {seen:?}");
    assert_eq!(
        seen[0]["lock"]["released"], true,
        "the route lock was released first: {seen:?}"
    );
    let ledger = seen[0]["ledger"].as_array().unwrap();
    assert_eq!(ledger.len(), 1);
    assert_eq!(
        ledger[0]["status"], "incomplete",
        "the export claim was released first: {seen:?}"
    );
}

#[tokio::test]
async fn a_short_lease_is_renewed_so_a_long_run_keeps_its_route() {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let api = braze(60);
    let mut s = settings();
    s.route_lease_s = 1; // renewed every ~333 ms
    let long = runner(store.clone(), api.clone(), s.clone(), None);
    let second = runner(store.clone(), api.clone(), s, None);
    let p1 = plan(store.as_ref(), "in/long.csv", csv(400)).await; // ~2.4 s of sending
    let p2 = plan(store.as_ref(), "in/other.csv", csv(10)).await;
    let first = tokio::spawn(async move { long.run(&p1, None).await });
    // Well past the first lease: without renewal the route would be free by now.
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    let err = second.run(&p2, None).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("another export of route people is syncing"),
        "{err}"
    );
    assert!(first.await.unwrap().unwrap().complete());
    // Released at the end: the second export runs now.
    assert!(second.run(&p2, None).await.unwrap().complete());
}

#[tokio::test]
async fn a_failed_checkpoint_stops_the_sender_promptly_and_the_run_is_retryable() {
    // A store whose checkpoint segments fail to write.
    let store: Arc<dyn ObjectStore> = Arc::new(common::failing_puts(
        Arc::new(MemoryStore::new()),
        |uri, _| uri.key.contains("/seg-"),
    ));
    let api = braze(60);
    let r = runner(store.clone(), api.clone(), settings(), None);
    let p = plan(store.as_ref(), "in/big.csv", csv(400)).await; // 40 requests
    let started = std::time::Instant::now();
    let err = r.run(&p, None).await.unwrap_err();
    let RunError::Retryable(message) = &err else {
        panic!("a failed checkpoint is retryable: {err}")
    };
    assert!(message.contains("checkpoint failed"), "{message}");
    let sent = api.sent.load(Ordering::SeqCst);
    assert!(
        sent <= 50,
        "the sender stopped within a request or two of the failure, not after {sent} users"
    );
    assert!(started.elapsed() < Duration::from_millis(1_500));
}

#[tokio::test]
async fn a_run_whose_route_lock_renewals_keep_failing_stops_sending_before_its_lease_ends() {
    // Every write of the route lock after the one that takes it fails (the store, not another
    // run): the lease cannot be renewed, and the route may be taken over when it ends.
    let writes = Arc::new(AtomicUsize::new(0));
    let seen = writes.clone();
    let store: Arc<dyn ObjectStore> = Arc::new(common::failing_puts(
        Arc::new(MemoryStore::new()),
        move |uri, _| {
            uri.key.ends_with("route-lock.json") && seen.fetch_add(1, Ordering::SeqCst) > 0
        },
    ));
    let api = braze(60);
    let mut s = settings();
    s.route_lease_s = 1; // renewed every ~333 ms; the run stops ~167 ms before it ends
    let r = runner(store.clone(), api.clone(), s, None);
    let p = plan(store.as_ref(), "in/long.csv", csv(400)).await; // ~2.4 s of sending
    let err = r.run(&p, None).await.unwrap_err();
    assert!(matches!(err, RunError::Retryable(_)), "{err}");
    assert!(err.to_string().contains("no renewal succeeded"), "{err}");
    let sent = api.sent.load(Ordering::SeqCst);
    assert!(
        sent < 200,
        "the sender stopped before the lease ended, not after {sent} of 400 users"
    );
    assert!(writes.load(Ordering::SeqCst) >= 3, "renewals were tried");
}

#[tokio::test]
async fn a_state_too_large_for_memory_is_refused_before_the_route_lock_is_taken() {
    let store = Arc::new(MemoryStore::new());
    let api = braze(0);
    let head = json!({"format": 2, "route": "people", "generation": 3, "users": 50_000_000u64,
        "segments": [], "applied_exports": [], "updated_at": "2026-11-30T00:00:00Z"});
    store
        .put(
            &S3Uri::new("state", "s/people/head.json"),
            Bytes::from(head.to_string()),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
    let mut s = settings();
    s.memory_limit_bytes = Some(1024 << 20);
    let r = runner(store.clone(), api.clone(), s, None);
    let p = plan(store.as_ref(), "in/a.csv", csv(10)).await;
    let err = r.run(&p, None).await.unwrap_err();
    assert!(matches!(err, RunError::Permanent { .. }), "{err}");
    assert!(err.to_string().contains("50000000 users"), "{err}");
    assert!(
        !store
            .keys("state")
            .iter()
            .any(|k| k.ends_with("route-lock.json")),
        "the route lock was never taken"
    );
    assert_eq!(api.sent.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_run_shares_the_workspace_limit_with_the_senders_it_finds_and_leaves_no_lease() {
    let store = Arc::new(MemoryStore::new());
    // Another route's run is sending: its lease was written just now.
    let other = S3Uri::new("state", "s/_workspace/senders/orders--run-x.json");
    store
        .put(
            &other,
            Bytes::from_static(b"{}"),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
    let dyn_store: Arc<dyn ObjectStore> = store.clone();
    let r = runner(dyn_store.clone(), braze(30), settings(), None);
    let p = plan(dyn_store.as_ref(), "in/some.csv", csv(50)).await;
    assert!(r.run(&p, None).await.unwrap().complete());
    // The report says two senders shared the limit.
    let report_key = store
        .keys("state")
        .into_iter()
        .find(|k| k.starts_with("r/people/"))
        .unwrap();
    let (_, body) = store
        .get(&S3Uri::new("state", report_key.as_str()))
        .await
        .unwrap();
    let report: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(report["workspace_senders"], 2, "{report}");
    // Our lease is gone; the other run's stays.
    let leases: Vec<String> = store
        .keys("state")
        .into_iter()
        .filter(|k| k.starts_with("s/_workspace/"))
        .collect();
    assert_eq!(leases, vec![other.key.clone()]);
}
