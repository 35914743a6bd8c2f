//! Adoption: an export recorded as confirmed without sending; the next export sends only its
//! changes; a verify sample that finds Braze disagreeing refuses, listing the differences.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use braze_sim::{SimConfig, SimHandle};
use braze_sync::config::api_key::ApiKey;
use braze_sync::config::braze_endpoint::Endpoint;
use braze_sync::config::route::Route;
use braze_sync::diff::export::{Part, ProduceOptions};
use braze_sync::diff::in_memory;
use braze_sync::ops::adopt::{AdoptError, AdoptOptions, AdoptTarget, adopt};
use braze_sync::send::braze::{BrazeClient, ClientOptions, UserLookup};
use braze_sync::state::store::{StateStore, Watermark};
use bridge_shared::object_store::MemoryStore;
use bridge_shared::{ObjectStore, PutCondition, S3Uri};
use bytes::Bytes;
use serde_json::{Value, json};

const ROUTE: &str = r#"
name = "customers"
prefix = "amperity/customers/"
update_existing_only = false

[identifier]
kind = "external_id"
column = "id"

[fields]
given_name = "first_name"

[attributes.tier]
type = "String"

[attributes.orders]
type = "Integer"
"#;
const KEY: &str = "adopt-key";
const EXPORT: &str = "s3://in/amperity/customers/export.csv";

fn route() -> Arc<Route> {
    Arc::new(Route::from_toml(ROUTE, "test").unwrap())
}

fn row(i: usize, tier: &str) -> String {
    format!("u{i},Name{i},{tier},{}\n", i % 5)
}

fn export(n: usize) -> String {
    let mut s = String::from("id,given_name,tier,orders\n");
    for i in 0..n {
        s.push_str(&row(i, "gold"));
    }
    s
}

async fn setup(csv: &str) -> (Arc<dyn ObjectStore>, SimHandle, BrazeClient) {
    let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    mem.put(
        &EXPORT.parse::<S3Uri>().unwrap(),
        Bytes::from(csv.to_string()),
        PutCondition::None,
        BTreeMap::new(),
    )
    .await
    .unwrap();
    let sim = braze_sim::start(SimConfig {
        api_key: KEY.into(),
        // Two lookups per second: the sample of 40 users needs one call, the client waits on 429s.
        export_rate_limit_requests: 2,
        export_rate_limit_window: Duration::from_secs(1),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let client = BrazeClient::new(
        Endpoint::parse(&sim.base_url()).unwrap(),
        ApiKey::new(KEY).unwrap(),
        &ClientOptions::default(),
    )
    .unwrap();
    (mem, sim, client)
}

fn seed(sim: &SimHandle, n: usize, tier_of: impl Fn(usize) -> &'static str) {
    for i in 0..n {
        sim.seed_user(
            &format!("u{i}"),
            json!({"external_id": format!("u{i}"), "first_name": format!("Name{i}"),
                   "tier": tier_of(i), "orders": i % 5}),
        );
    }
}

fn target() -> AdoptTarget {
    AdoptTarget {
        state_bucket: "state".into(),
        state_prefix: "bridge/state/".into(),
        reports_prefix: "bridge/reports/".into(),
    }
}

fn watermark() -> Watermark {
    Watermark {
        export_id: format!("{EXPORT}#e1"),
        exported_at: Some("2026-11-01T00:00:00Z".into()),
    }
}

fn opts(sample: usize) -> AdoptOptions {
    AdoptOptions {
        verify_sample: Some(sample),
        seed: 7,
        ..AdoptOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_then_a_changed_export_sends_only_the_changes() {
    let n = 60;
    let (mem, sim, client) = setup(&export(n)).await;
    seed(&sim, n, |_| "gold");
    let report = adopt(
        mem.clone(),
        &target(),
        route(),
        vec![EXPORT.parse().unwrap()],
        watermark(),
        Some(&client as &dyn UserLookup),
        &opts(40),
    )
    .await
    .unwrap();
    assert_eq!(report.status, "adopted");
    assert_eq!(report.users_recorded, 60);
    let v = report.verification.as_ref().unwrap();
    assert_eq!((v.sampled, v.differing_users), (40, 0));
    assert_eq!(
        sim.stats().requests_total,
        0,
        "nothing was sent to /users/track"
    );
    assert!(sim.stats().export_requests >= 1);
    let (_, body) = mem.get(&report.report.parse().unwrap()).await.unwrap();
    let written: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(written["status"], json!("adopted"));

    // The next export: u3 changed tier, u60 is new; only those are sent.
    let st = StateStore::new(mem.clone(), "state", "bridge/state/", "customers");
    let r = route();
    let (head, snap) = st.load(&r).await.unwrap();
    assert!(head.was_applied(&format!("{EXPORT}#e1")));
    let mut next = export(n).replace(&row(3, "gold"), &row(3, "platinum"));
    next.push_str(&row(60, "silver"));
    let parts = vec![Ok(Part {
        source: EXPORT.to_string(),
        reader: next.as_bytes(),
    })];
    let p = in_memory::plan(parts, &r, &snap, &ProduceOptions::for_route(&r, EXPORT)).unwrap();
    let objects: Vec<Value> = p.deltas.iter().map(|d| d.to_attribute_object()).collect();
    assert_eq!(
        objects,
        vec![
            json!({"external_id": "u3", "_update_existing_only": false, "tier": "platinum"}),
            json!({"external_id": "u60", "_update_existing_only": false, "first_name": "Name60",
                   "tier": "silver", "orders": 0}),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verify_sample_with_differences_refuses_and_lists_them() {
    let n = 30;
    let (mem, sim, client) = setup(&export(n)).await;
    // Braze has another tier for every third user, and never heard of u29.
    seed(&sim, n - 1, |i| if i % 3 == 0 { "bronze" } else { "gold" });
    let err = adopt(
        mem.clone(),
        &target(),
        route(),
        vec![EXPORT.parse().unwrap()],
        watermark(),
        Some(&client as &dyn UserLookup),
        &opts(n),
    )
    .await
    .unwrap_err();
    let AdoptError::Refused {
        differing,
        sampled,
        ref list,
        ref report,
        ..
    } = err
    else {
        panic!("expected a refusal, got {err}");
    };
    assert_eq!(
        (differing, sampled),
        (11, 30),
        "10 with another tier + 1 unknown"
    );
    assert!(
        list.contains("external_id:u3 tier: export=\"gold\" braze=\"bronze\""),
        "{list}"
    );
    assert!(list.contains("external_id:u29 *"), "{list}");
    assert!(err.to_string().contains("36.7% > 2.0% allowed"), "{err}");
    // Nothing recorded: no state head; the report lists the differences.
    let heads = mem
        .list("state", "bridge/state/customers/head")
        .await
        .unwrap();
    assert!(heads.is_empty(), "{heads:?}");
    let (_, body) = mem.get(&report.parse().unwrap()).await.unwrap();
    let written: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(written["status"], json!("refused"));
    assert_eq!(written["verification"]["differing_users"], json!(11));
    assert_eq!(sim.stats().requests_total, 0);
}
