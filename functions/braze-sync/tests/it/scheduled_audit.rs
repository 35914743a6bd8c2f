//! The scheduled drift audit at the function's entry point ([`dispatch`]): the schedule's
//! payload `{"audit": {"routes": ..., "sample": N}}` audits the named routes against the Braze
//! simulator (planted drift and a deleted user are found, the report is written, the state is
//! not healed), an unknown route fails the invocation, a malformed request is acknowledged,
//! and every other payload still reaches the sync handler.
#![allow(clippy::unwrap_used)]

use crate::common;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use braze_sim::{SimConfig, SimHandle};
use braze_sync::config::api_key::ApiKey;
use braze_sync::config::braze_endpoint::Endpoint;
use braze_sync::config::route::Route;
use braze_sync::ops::audit::AuditTarget;
use braze_sync::run::handler::Handler;
use braze_sync::run::runner::RunnerSettings;
use braze_sync::run::scheduled_audit::{ScheduledAudit, dispatch};
use braze_sync::send::braze::{BrazeClient, ClientOptions};
use bridge_shared::S3Uri;
use bridge_shared::object_store::{MemoryStore, ObjectStore, PutCondition};
use bytes::Bytes;
use serde_json::{Value, json};

const KEY: &str = "sim-key-scheduled-audit";

const ROUTE: &str = common::PEOPLE_ROUTE;

struct World {
    sim: SimHandle,
    store: Arc<MemoryStore>,
    handler: Handler,
    audit: ScheduledAudit,
}

async fn world() -> World {
    let sim = braze_sim::start(SimConfig {
        api_key: KEY.into(),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let store = Arc::new(MemoryStore::new());
    let client = Arc::new(
        BrazeClient::new(
            Endpoint::parse(&sim.base_url()).unwrap(),
            ApiKey::new(KEY).unwrap(),
            &ClientOptions {
                request_timeout: Duration::from_secs(5),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let route = Route::from_toml(ROUTE, "t").unwrap();
    let handler = common::handler(
        store.clone(),
        &route,
        client.clone(),
        RunnerSettings::new("state", "s/", "r/", "x/"),
        None,
    );
    let audit = ScheduledAudit::new(
        store.clone(),
        AuditTarget {
            state_bucket: "state".into(),
            state_prefix: "s/".into(),
            reports_prefix: "r/".into(),
        },
        vec![route],
        client,
    );
    World {
        sim,
        store,
        handler,
        audit,
    }
}

fn csv(n: u32) -> Bytes {
    let mut s = String::from("id,tier\n");
    for i in 0..n {
        s.push_str(&format!("u{i},gold\n"));
    }
    Bytes::from(s)
}

#[tokio::test]
async fn the_schedules_payload_audits_the_routes_it_names_and_finds_planted_drift() {
    let w = world().await;
    w.store
        .put(
            &S3Uri::new("exports", "in/people.csv"),
            csv(20),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
    // Any other payload is a sync, as before.
    let s3 = json!({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": "exports"}, "object": {"key": "in/people.csv"}}}]});
    let out = dispatch(&w.handler, &w.audit, &s3, None).await.unwrap();
    assert_eq!(out["results"][0]["outcome"], "synced", "{out}");
    assert!(w.sim.write_as_other("u3", json!({"tier": "silver"})));
    assert!(w.sim.delete_user("u7"));

    let schedule = json!({"audit": {"routes": "people", "sample": 1000}});
    let out = dispatch(&w.handler, &w.audit, &schedule, None)
        .await
        .unwrap();
    let a = &out["audits"][0];
    assert_eq!(a["route"], "people", "{out}");
    assert_eq!(a["sampled"], 20);
    assert_eq!(a["missing_in_braze"], 1);
    assert_eq!(a["drift_share"], 0.1, "u3 drifted and u7 is missing: {out}");
    let report: S3Uri = a["report"].as_str().unwrap().parse().unwrap();
    let body: Value = serde_json::from_slice(&w.store.get(&report).await.unwrap().1).unwrap();
    assert_eq!(body["healed"], Value::Null, "a scheduled audit never heals");

    // An unknown route fails the invocation (after the others ran); a malformed request is
    // acknowledged.
    let both = json!({"audit": {"routes": ["nope", "people"], "sample": 5}});
    let err = dispatch(&w.handler, &w.audit, &both, None)
        .await
        .unwrap_err();
    assert!(err.contains("nope") && !err.contains("people:"), "{err}");
    let bad = json!({"audit": {"sample": 5}});
    let out = dispatch(&w.handler, &w.audit, &bad, None).await.unwrap();
    assert!(
        out["ignored"].as_str().unwrap().contains("names no route"),
        "{out}"
    );
}
