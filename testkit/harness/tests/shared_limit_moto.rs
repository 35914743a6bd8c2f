//! Several senders share one workspace limit over the local stack: three senders (as three
//! routes' invocations would be), each with its own rate limiter, send at once to the Braze
//! simulator (300 requests per 1 s window) while keeping their leases in a state bucket on
//! moto's S3. Together they stay under the limit (few 429s), each learns there are three of
//! them, and the registry is empty afterwards. (Without the registry, each would pace at the
//! whole limit until the server's headers slow it; `make bench`'s `sync-send-bench` measures
//! that difference at Braze's real 3 s window.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use braze_sim::{Faults, SimConfig, SimHandle};
use braze_sync::config::api_key::ApiKey;
use braze_sync::config::braze_endpoint::Endpoint;
use braze_sync::model::{AttributeChange, DeliveryOutcome, Identifier, RowPos, UserDelta};
use braze_sync::send::braze::{BrazeClient, ClientOptions};
use braze_sync::send::deliver::{DeliverConfig, DeliveryStats, deliver};
use braze_sync::send::rate_limit::RateBudget;
use braze_sync::send::workspace_share::{SenderRegistry, ShareSettings, WorkspaceShare};
use bridge_shared::ObjectStore;
use bridge_shared::object_store::S3Store;
use harness::moto::Moto;
use serde_json::json;
use tokio::sync::mpsc;

const KEY: &str = "sim-key-shared-limit";
const SENDERS: u64 = 3;
/// Users per sender: 250 requests of 10 objects each, 750 in all: ~2.6 s at 291/s.
const USERS: u64 = 2_500;

fn delta(i: u64) -> UserDelta {
    UserDelta {
        identifier: Identifier::ExternalId(format!("user-{i}")),
        pos: RowPos {
            source: "s3://exports/customers.csv".into(),
            row: i + 1,
            line: Some(i + 2),
        },
        changes: vec![AttributeChange {
            name: "segment".into(),
            value: json!(format!("seg-{}", i % 7)),
            fingerprint: None,
        }],
        update_existing_only: false,
        is_new: true,
        row_digest: None,
    }
}

fn cfg() -> DeliverConfig {
    DeliverConfig {
        max_objects: 10,
        max_in_flight: 32,
        rate: RateBudget {
            requests_per_window: 300,
            window: Duration::from_secs(1),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The three senders at once, members of the workspace's senders in `registry`.
async fn three_at_once(sim: &SimHandle, registry: &SenderRegistry) -> Vec<DeliveryStats> {
    let client = BrazeClient::new(
        Endpoint::parse(&sim.base_url()).unwrap(),
        ApiKey::new(KEY).unwrap(),
        &ClientOptions::default(),
    )
    .unwrap();
    let mut sends = Vec::new();
    for r in 0..SENDERS {
        let (tx, rx) = mpsc::channel(1_024);
        let (otx, mut orx) = mpsc::channel(1_024);
        tokio::spawn(async move {
            for i in r * USERS..(r + 1) * USERS {
                tx.send(delta(i)).await.unwrap();
            }
        });
        let confirmed = tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(o) = orx.recv().await {
                n += u64::from(matches!(o, DeliveryOutcome::Confirmed(_)));
            }
            n
        });
        let client = &client;
        sends.push(async move {
            let (share, peers) = WorkspaceShare::new(
                registry.clone(),
                ShareSettings::default(),
                &format!("route-{r}"),
                "run-1",
            );
            let cfg = DeliverConfig {
                peers: Some(peers),
                ..cfg()
            };
            let stats = share.around(deliver(rx, client, cfg, otx)).await.unwrap();
            assert_eq!(confirmed.await.unwrap(), USERS);
            stats
        });
    }
    futures::future::join_all(sends).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_senders_share_one_workspace_limit_through_the_state_bucket() {
    let moto = Moto::start(None).await.unwrap();
    moto.create_bucket("state").await.unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(S3Store::new(moto.s3.clone()));
    let registry = SenderRegistry::new(store, "state", "bridge/state/");
    let sim = braze_sim::start(SimConfig {
        api_key: KEY.into(),
        rate_limit_requests: 300,
        rate_limit_window: Duration::from_secs(1),
        faults: Faults {
            latency_ms: Some((5, 20)),
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await
    .unwrap();

    let started = std::time::Instant::now();
    let stats = three_at_once(&sim, &registry).await;
    let wall = started.elapsed().as_secs_f64();
    let s = sim.stats();
    let share_429 = s.responses_429 as f64 / s.requests_total as f64;
    // 750 requests at the limit's 300/s take 2.5 s at best.
    assert!(
        share_429 <= 0.01,
        "429s: {share_429:.3} of {} requests",
        s.requests_total
    );
    assert!(wall <= 2.5 * 1.5, "{wall:.2} s for 750 requests at 300/s");
    for st in &stats {
        assert_eq!(st.workspace_senders, 3, "{st:?}");
    }
    // Every sender left: no lease remains.
    assert!(
        moto.list("state", "bridge/state/_workspace/")
            .await
            .unwrap()
            .is_empty()
    );

    sim.shutdown().await;
    moto.stop().await;
}
