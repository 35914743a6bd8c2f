//! The workspace's hourly request budget against the Braze simulator's own (`hourly_request_limit`),
//! across the turn of a clock hour: braze-sync's clock is held a few seconds before an hour
//! (`braze_sync::clock::set_fixed`) and the simulator's in the middle of one
//! (`SimConfig::clock_offset_ms`), so a sync too big for one hour's budget spends it, hands over
//! with a delay to the next hour, waits without running when its continuation comes early, and
//! completes in the next hour (both clocks are moved on to it), without a single request the
//! simulator refuses for its hourly budget. An export whose every hour's budget other runs
//! spend waits at most a day without sending, then fails; a replay with a raised limit sends
//! only what Braze had not confirmed. Both clocks are set, never read off the wall as the test
//! runs, so neither a loaded machine nor the wall clock's place in its hour moves an assertion.
#![allow(clippy::unwrap_used)]

use crate::common;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use braze_sim::SimConfig;
use braze_sync::config::api_key::ApiKey;
use braze_sync::config::braze_endpoint::Endpoint;
use braze_sync::config::route::Route;
use braze_sync::run::handler::{ExportPlan, Handler};
use braze_sync::run::runner::{Continuation, MAX_DELAY, RunnerSettings};
use braze_sync::send::braze::{BrazeClient, ClientOptions};
use braze_sync::send::hourly_budget::{HOUR_MS, HourlyBudget, MAX_BUDGET_WAIT, hour_of};
use bridge_shared::S3Uri;
use bridge_shared::object_store::{MemoryStore, ObjectStore, PutCondition};
use bytes::Bytes;
use serde_json::{Value, json};

const KEY: &str = "sim-key-hourly-budget";
const LIMIT: u64 = 10;
const USERS: u32 = 150;

const ROUTE: &str = common::PEOPLE_ROUTE;

/// The queue: remembers each hand-over's delay.
#[derive(Default)]
struct Delays(Mutex<Vec<Duration>>);

#[async_trait]
impl Continuation for Delays {
    async fn hand_over(&self, plan: &ExportPlan) -> Result<(), String> {
        self.hand_over_after(plan, Duration::ZERO).await
    }
    async fn hand_over_after(&self, _: &ExportPlan, delay: Duration) -> Result<(), String> {
        self.0.lock().unwrap().push(delay);
        Ok(())
    }
}

fn csv(n: u32) -> Bytes {
    let mut s = String::from("id,tier\n");
    for i in 0..n {
        s.push_str(&format!("u{i},gold\n"));
    }
    Bytes::from(s)
}

/// `before_ms` short of the clock hour after the wall clock's.
fn before_an_hour(before_ms: i64) -> chrono::DateTime<chrono::Utc> {
    let wall = chrono::Utc::now().timestamp_millis();
    chrono::DateTime::from_timestamp_millis((hour_of(wall) + 1) * HOUR_MS - before_ms).unwrap()
}

/// Milliseconds to add to the wall clock so that it reads half past the hour after its own.
fn offset_to_half_past() -> i64 {
    let wall = chrono::Utc::now().timestamp_millis();
    (hour_of(wall) + 1) * HOUR_MS + HOUR_MS / 2 - wall
}

fn handler(store: Arc<MemoryStore>, sim_url: &str, queue: Arc<Delays>, limit: u64) -> Handler {
    let mut s = RunnerSettings::new("state", "s/", "r/", "x/");
    s.checkpoint_every = Duration::from_millis(50);
    s.deliver.max_objects = 10;
    s.deliver.max_in_flight = 4;
    // Every batch full (the counts below are whole batches): a producer stalled by a loaded
    // machine must not seal partial batches.
    s.deliver.linger = Duration::from_secs(60);
    s.deliver.hourly_budget = Some(HourlyBudget::new(store.clone(), "state", "s/", limit));
    let api = BrazeClient::new(
        Endpoint::parse(sim_url).unwrap(),
        ApiKey::new(KEY).unwrap(),
        &ClientOptions {
            request_timeout: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .unwrap();
    let route = Route::from_toml(ROUTE, "t").unwrap();
    common::handler(store, &route, Arc::new(api), s, Some(queue))
}

async fn report(store: &MemoryStore, out: &Value) -> Value {
    let uri: S3Uri = out["results"][0]["report"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    serde_json::from_slice(&store.get(&uri).await.unwrap().1).unwrap()
}

#[tokio::test]
async fn a_sync_bigger_than_the_hours_budget_waits_for_the_next_hour_and_completes() {
    let start = before_an_hour(6_000);
    braze_sync::clock::set_fixed(start);
    // The simulator's hour turns only when the test moves it on, however long a step takes.
    let sim_offset = offset_to_half_past();
    let sim = braze_sim::start(SimConfig {
        api_key: KEY.into(),
        hourly_request_limit: Some(LIMIT),
        clock_offset_ms: sim_offset,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let store = Arc::new(MemoryStore::new());
    let queue = Arc::new(Delays::default());
    let h = handler(store.clone(), &sim.base_url(), queue.clone(), LIMIT);
    store
        .put(
            &S3Uri::new("exports", "in/big.csv"),
            csv(USERS),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
    let event = |name: &str| {
        json!({"Records": [{"eventSource": "aws:s3", "eventName": name,
            "s3": {"bucket": {"name": "exports"}, "object": {"key": "in/big.csv"}}}]})
    };
    let hour = hour_of(braze_sync::clock::now_ms());

    // 1. The hour's budget goes on the first 100 users; the rest is handed over, delayed to
    //    the next hour.
    let out = h.handle(&event("ObjectCreated:Put"), None).await.unwrap();
    assert_eq!(out["results"][0]["outcome"], "incomplete", "{out}");
    let r = report(&store, &out).await;
    assert_eq!(r["stopped"], "hourly_budget", "{r}");
    assert_eq!(r["requests"], LIMIT);
    assert_eq!(r["users_confirmed"], 100);
    assert!(
        r["notes"]
            .to_string()
            .contains("BRAZE_HOURLY_REQUEST_LIMIT"),
        "{r}"
    );
    assert_eq!(
        hour_of(braze_sync::clock::now_ms()),
        hour,
        "still the first hour"
    );
    let first = queue.0.lock().unwrap()[0];
    assert!(
        first > Duration::ZERO && first <= Duration::from_secs(8),
        "{first:?}"
    );

    // 2. A continuation that comes before the hour turns does not run: it waits again.
    let out = h
        .handle(&event("ObjectCreated:Continuation"), None)
        .await
        .unwrap();
    assert_eq!(out["results"][0]["outcome"], "incomplete", "{out}");
    assert_eq!(
        out["results"][0]["summary"]["status"],
        "waiting_for_hourly_budget"
    );
    assert_eq!(
        sim.stats().requests_total,
        LIMIT,
        "nothing sent while waiting"
    );
    let second = queue.0.lock().unwrap()[1];
    assert!(second > Duration::ZERO && second <= MAX_DELAY, "{second:?}");

    // 3. In the next hour the rest goes out and the export completes: the continuation comes
    //    after its delay, in both clocks' next hour.
    braze_sync::clock::set_fixed(start + second);
    sim.set_config(SimConfig {
        clock_offset_ms: sim_offset + HOUR_MS,
        ..sim.config()
    })
    .unwrap();
    assert_eq!(hour_of(braze_sync::clock::now_ms()), hour + 1);
    let out = h
        .handle(&event("ObjectCreated:Continuation"), None)
        .await
        .unwrap();
    braze_sync::clock::clear_virtual();
    assert_eq!(out["results"][0]["outcome"], "synced", "{out}");
    let stats = sim.stats();
    assert_eq!(sim.users().len(), USERS as usize);
    assert_eq!(
        stats.hourly_limited_429, 0,
        "never over the simulator's budget"
    );
    assert_eq!(stats.requests_total, 15);
    assert_eq!(queue.0.lock().unwrap().len(), 2, "no further hand-over");
}

fn event(name: &str) -> Value {
    json!({"Records": [{"eventSource": "aws:s3", "eventName": name,
        "s3": {"bucket": {"name": "exports"}, "object": {"key": "in/big.csv"}}}]})
}

async fn ledger_entry(store: &MemoryStore) -> Value {
    let listed = store.list("state", "s/people/ledger/").await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let uri = S3Uri::new("state", &listed[0].key);
    serde_json::from_slice(&store.get(&uri).await.unwrap().1).unwrap()
}

#[tokio::test]
async fn an_export_starved_of_budget_for_a_day_fails_and_a_replay_sends_only_the_rest() {
    let sim = braze_sim::start(SimConfig {
        api_key: KEY.into(),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let store = Arc::new(MemoryStore::new());
    let queue = Arc::new(Delays::default());
    let h = handler(store.clone(), &sim.base_url(), queue.clone(), LIMIT);
    let others = HourlyBudget::new(store.clone(), "state", "s/", LIMIT);
    // 20 minutes into the next clock hour, then a clock hour later each time.
    let wall = chrono::Utc::now().timestamp_millis();
    let t0 = (hour_of(wall) + 1) * HOUR_MS + 20 * 60_000;
    let at_hour = |k: i64| chrono::DateTime::from_timestamp_millis(t0 + k * HOUR_MS).unwrap();
    braze_sync::clock::set_fixed(at_hour(0));
    store
        .put(
            &S3Uri::new("exports", "in/big.csv"),
            csv(USERS),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();

    // The first hour's budget confirms 100 users; from then on other runs spend every hour's
    // budget before the continuation comes.
    let out = h.handle(&event("ObjectCreated:Put"), None).await.unwrap();
    assert_eq!(out["results"][0]["outcome"], "incomplete", "{out}");
    let hours = (MAX_BUDGET_WAIT.as_secs() / 3600) as i64;
    for k in 1..=hours {
        braze_sync::clock::set_fixed(at_hour(k));
        let hour = hour_of(braze_sync::clock::now_ms());
        assert_eq!(others.claim(hour, LIMIT).await.unwrap(), LIMIT);
        let out = h
            .handle(&event("ObjectCreated:Continuation"), None)
            .await
            .unwrap();
        let summary = &out["results"][0]["summary"];
        assert_eq!(
            summary["status"], "waiting_for_hourly_budget",
            "hour {k}: {out}"
        );
        assert_eq!(
            summary["budget_wait_since"],
            at_hour(1).timestamp_millis(),
            "the first wait starts the count: {out}"
        );
    }
    assert_eq!(
        sim.stats().requests_total,
        LIMIT,
        "nothing sent while waiting"
    );
    assert_eq!(queue.0.lock().unwrap().len(), 1 + hours as usize);

    // A day after the first wait the run fails instead of waiting again.
    braze_sync::clock::set_fixed(at_hour(hours + 1));
    others
        .claim(hour_of(braze_sync::clock::now_ms()), LIMIT)
        .await
        .unwrap();
    let out = h
        .handle(&event("ObjectCreated:Continuation"), None)
        .await
        .unwrap();
    assert_eq!(out["results"][0]["outcome"], "failed", "{out}");
    let r = report(&store, &out).await;
    assert_eq!(r["status"], "failed", "{r}");
    assert_eq!(r["stopped"], "hourly_budget_starved", "{r}");
    assert!(
        r["error"]
            .to_string()
            .contains("BRAZE_HOURLY_REQUEST_LIMIT"),
        "{r}"
    );
    let entry = ledger_entry(&store).await;
    assert_eq!(entry["status"], "failed", "{entry}");
    assert!(entry.get("budget_wait_since").is_none(), "{entry}");
    assert_eq!(
        queue.0.lock().unwrap().len(),
        1 + hours as usize,
        "no further hand-over"
    );

    // The operator raises the limit and replays: only the 50 users Braze had not confirmed go.
    braze_sync::clock::set_fixed(at_hour(hours + 2));
    let raised = handler(store.clone(), &sim.base_url(), queue.clone(), 100);
    let out = raised
        .handle(&event("ObjectCreated:Put"), None)
        .await
        .unwrap();
    braze_sync::clock::clear_virtual();
    assert_eq!(out["results"][0]["outcome"], "synced", "{out}");
    assert_eq!(sim.users().len(), USERS as usize);
    assert_eq!(sim.stats().requests_total, LIMIT + 5);
}
