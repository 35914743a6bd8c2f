//! The sender against the Braze simulator over real HTTP: a clean run leaves exactly the
//! expected profiles; latency jitter, 5xx, 429 bursts and dropped connections together leave the
//! same profiles without a request over 75 objects or 4 MB; a refused key costs one request;
//! `errors[]` map back to their users; 413 splits; the combined-limit plan stays under 50.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use braze_sim::{Burst429, Faults, SimConfig, SimHandle};
use braze_sync::config::api_key::ApiKey;
use braze_sync::config::braze_endpoint::Endpoint;
use braze_sync::model::{AttributeChange, DeliveryOutcome, Identifier, RowPos, UserDelta};
use braze_sync::send::braze::{BrazeClient, ClientOptions};
use braze_sync::send::deliver::{DeliverConfig, DeliverError, DeliveryStats, deliver};
use braze_sync::send::rate_limit::RateBudget;
use braze_sync::send::retry::RetryPolicy;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

const KEY: &str = "sim-key-deliver-tests";

/// A user with a mix of standard fields and typed custom attributes.
fn delta(i: usize) -> UserDelta {
    let change = |name: &str, value: Value| AttributeChange {
        name: name.into(),
        value,
        fingerprint: None,
    };
    let email = if i % 97 == 13 {
        // Braze refuses this object: it comes back in errors[].
        json!(format!("not-an-email-{i}"))
    } else {
        json!(format!("user{i}@example.com"))
    };
    UserDelta {
        identifier: Identifier::ExternalId(format!("user-{i}")),
        pos: RowPos {
            source: "s3://exports/amperity/customers.csv".into(),
            row: i as u64 + 1,
            line: Some(i as u64 + 2),
        },
        changes: vec![
            change("email", email),
            change("first_name", json!(format!("Name {i}"))),
            change(
                "dob",
                json!(format!("19{:02}-0{}-1{}", i % 100, 1 + i % 9, i % 10)),
            ),
            change("gender", json!(["M", "F", "O"][i % 3])),
            change("lifetime_value", json!((i as f64) * 1.25)),
            change("orders", json!(i % 17)),
            change("vip", json!(i.is_multiple_of(5))),
            change("segment", json!(format!("seg-{}", i % 7))),
        ],
        update_existing_only: false,
        is_new: true,
        row_digest: None,
    }
}

fn is_refused(i: usize) -> bool {
    i % 97 == 13
}

/// The profile Braze should hold for user `i` after the delta is applied.
fn expected_profile(i: usize) -> Value {
    let mut m = Map::new();
    for c in delta(i).changes {
        m.insert(c.name, c.value);
    }
    Value::Object(m)
}

async fn sim(cfg: SimConfig) -> SimHandle {
    braze_sim::start(SimConfig {
        api_key: KEY.into(),
        ..cfg
    })
    .await
    .unwrap()
}

fn client(sim: &SimHandle, key: &str) -> BrazeClient {
    BrazeClient::new(
        Endpoint::parse(&sim.base_url()).unwrap(),
        ApiKey::new(key).unwrap(),
        &ClientOptions {
            request_timeout: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .unwrap()
}

fn cfg() -> DeliverConfig {
    DeliverConfig {
        max_in_flight: 32,
        retry: RetryPolicy {
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(500),
            max_transient_failures: 12,
            ..Default::default()
        },
        ..Default::default()
    }
}

struct Ran {
    result: Result<DeliveryStats, DeliverError>,
    outcomes: Vec<DeliveryOutcome>,
}

async fn run(n: usize, api: &BrazeClient, cfg: DeliverConfig) -> Ran {
    let (tx, rx) = mpsc::channel(256);
    let (otx, mut orx) = mpsc::channel(256);
    let producer = tokio::spawn(async move {
        for i in 0..n {
            if tx.send(delta(i)).await.is_err() {
                break;
            }
        }
    });
    let collector = tokio::spawn(async move {
        let mut v = Vec::new();
        while let Some(o) = orx.recv().await {
            v.push(o);
        }
        v
    });
    let result = deliver(rx, api, cfg, otx).await;
    producer.await.unwrap();
    Ran {
        result,
        outcomes: collector.await.unwrap(),
    }
}

fn index_of(d: &UserDelta) -> usize {
    match &d.identifier {
        Identifier::ExternalId(id) => id.trim_start_matches("user-").parse().unwrap(),
        other => panic!("{other:?}"),
    }
}

/// Every user has exactly one outcome: confirmed, or rejected for the invalid email.
fn check_outcomes(ran: &Ran, n: usize) {
    let mut seen = BTreeMap::new();
    for o in &ran.outcomes {
        let i = index_of(o.delta());
        assert!(
            seen.insert(i, o.clone()).is_none(),
            "two outcomes for user-{i}"
        );
    }
    assert_eq!(seen.len(), n);
    for (i, o) in seen {
        match o {
            DeliveryOutcome::Confirmed(_) => assert!(!is_refused(i), "user-{i} confirmed"),
            DeliveryOutcome::Rejected { delta, reason } => {
                assert!(is_refused(i), "user-{i} rejected: {reason}");
                assert!(
                    reason.contains("'email' field is not a valid email"),
                    "{reason}"
                );
                assert_eq!(delta.pos.row, i as u64 + 1);
            }
            DeliveryOutcome::Unsent(_) => panic!("user-{i} unsent"),
            DeliveryOutcome::Recorded(_) => panic!("user-{i} had changes"),
        }
    }
}

/// The simulator holds exactly the expected profiles.
fn check_profiles(sim: &SimHandle, n: usize) {
    let users = sim.users();
    let expected: BTreeMap<String, Value> = (0..n)
        .filter(|i| !is_refused(*i))
        .map(|i| (format!("user-{i}"), expected_profile(i)))
        .collect();
    assert_eq!(users.len(), expected.len());
    for (k, want) in &expected {
        let got = users.get(k).unwrap_or_else(|| panic!("{k} missing"));
        let got_without_id: Map<String, Value> = got
            .as_object()
            .unwrap()
            .iter()
            .filter(|(name, _)| name.as_str() != "external_id")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(&Value::Object(got_without_id), want, "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_run_leaves_exactly_the_expected_profiles() {
    let sim = sim(SimConfig::default()).await;
    let n = 3_000;
    // A long linger: a producer stalled by a loaded machine must not seal partial batches, so
    // the request count below is exactly ceil(3,000 / 75).
    let cfg = DeliverConfig {
        linger: Duration::from_secs(60),
        ..cfg()
    };
    let ran = run(n, &client(&sim, KEY), cfg).await;
    let stats = ran.result.as_ref().unwrap();
    check_outcomes(&ran, n);
    check_profiles(&sim, n);
    let s = sim.stats();
    assert_eq!(s.requests_total, 40);
    assert_eq!(stats.requests, 40);
    assert_eq!(s.max_objects_in_request, 75);
    assert_eq!(s.responses_429, 0);
    assert_eq!(
        stats.braze_rejected,
        (0..n).filter(|i| is_refused(*i)).count() as u64
    );
    assert_eq!(s.objects_rejected, stats.braze_rejected);
    assert!(stats.partial_failures > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_together_leave_the_same_profiles() {
    // A short window keeps the reset waits of 429 bursts short.
    let sim = sim(SimConfig {
        rate_limit_requests: 1_000,
        rate_limit_window: Duration::from_millis(500),
        seed: 11,
        faults: Faults {
            latency_ms: Some((1, 30)),
            error_5xx_share: 0.05,
            burst_429: Some(Burst429 {
                every_n_requests: 60,
                length: 2,
            }),
            drop_share: 0.01,
            slow_share: 0.0,
            slow_ms: 0,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let n = 4_000;
    let cfg = DeliverConfig {
        max_objects: 25,
        rate: RateBudget {
            requests_per_window: 1_000,
            window: Duration::from_millis(500),
            ..Default::default()
        },
        ..cfg()
    };
    let ran = run(n, &client(&sim, KEY), cfg).await;
    let stats = ran.result.as_ref().unwrap();
    check_outcomes(&ran, n);
    check_profiles(&sim, n);
    let s = sim.stats();
    assert!(s.max_objects_in_request <= 25);
    assert!(s.max_body_bytes <= 4_000_000);
    assert!(s.faults_5xx > 0 && s.burst_429 > 0, "{s:?}");
    assert_eq!(stats.requests, s.requests_total);
    assert_eq!(stats.http_429, s.responses_429);
    let r = &stats.retries_by_cause;
    assert_eq!(r.http_5xx, s.faults_5xx);
    assert_eq!(r.http_429, s.responses_429);
    assert_eq!(r.connection + r.timeout, s.dropped_connections);
    assert!(s.dropped_connections > 0, "{s:?}");
    assert_eq!(s.objects_rejected, stats.braze_rejected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_costs_exactly_one_request() {
    let sim = sim(SimConfig::default()).await;
    let ran = run(2_000, &client(&sim, "some-other-workspace-key"), cfg()).await;
    let err = ran.result.unwrap_err();
    assert!(
        matches!(err, DeliverError::Unauthorized { status: 401, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("users.track"));
    let s = sim.stats();
    assert_eq!(s.requests_total, 1);
    assert_eq!(s.requests_after_first_401, 0);
    assert!(
        ran.outcomes
            .iter()
            .all(|o| matches!(o, DeliveryOutcome::Unsent(_)))
    );
    assert!(sim.users().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_users_track_costs_exactly_one_request() {
    let sim = sim(SimConfig {
        key_lacks_users_track: true,
        ..SimConfig::default()
    })
    .await;
    let ran = run(500, &client(&sim, KEY), cfg()).await;
    let err = ran.result.unwrap_err();
    assert!(
        matches!(err, DeliverError::Unauthorized { status: 403, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("lacks the users.track permission"));
    assert_eq!(sim.stats().requests_total, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_too_large_is_split_until_it_fits() {
    // The server's limit is far below ours: every full batch is refused with 413 and split.
    let sim = sim(SimConfig {
        max_body_bytes: 12_000,
        ..SimConfig::default()
    })
    .await;
    let n = 600;
    let ran = run(n, &client(&sim, KEY), cfg()).await;
    let stats = ran.result.as_ref().unwrap();
    check_outcomes(&ran, n);
    check_profiles(&sim, n);
    assert!(stats.retries_by_cause.split_413 >= 8, "{stats:?}");
    assert_eq!(
        sim.stats().by_status.get("413").copied(),
        Some(stats.retries_by_cause.split_413)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_limit_plan_is_respected() {
    let sim = sim(SimConfig {
        combined_limit: Some(50),
        ..SimConfig::default()
    })
    .await;
    let n = 1_000;
    let cfg = DeliverConfig {
        combined_limit: true,
        ..cfg()
    };
    let ran = run(n, &client(&sim, KEY), cfg).await;
    ran.result.as_ref().unwrap();
    check_outcomes(&ran, n);
    check_profiles(&sim, n);
    let s = sim.stats();
    assert_eq!(s.max_objects_in_request, 50);
    assert_eq!(s.by_status.get("400"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_less_errors_leave_every_user_of_the_request_unconfirmed() {
    let sim = sim(SimConfig {
        faults: Faults {
            errors_without_index: true,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let n = 300;
    let ran = run(n, &client(&sim, KEY), cfg()).await;
    let stats = ran.result.as_ref().unwrap();
    // A batch with a refused object answers errors[] that name no object: none of its users
    // may be confirmed, not even the ones Braze applied.
    let mut unconfirmed = 0;
    for o in &ran.outcomes {
        let i = index_of(o.delta());
        match o {
            DeliveryOutcome::Confirmed(_) => {
                assert!(!is_refused(i), "user-{i} confirmed by an index-less answer")
            }
            DeliveryOutcome::Unsent(_) => unconfirmed += 1,
            DeliveryOutcome::Rejected { reason, .. } => panic!("user-{i} rejected: {reason}"),
            DeliveryOutcome::Recorded(_) => panic!("user-{i} had changes"),
        }
    }
    let refused = (0..n).filter(|i| is_refused(*i)).count() as u64;
    assert!(unconfirmed >= refused, "{unconfirmed} < {refused}");
    assert!(
        unconfirmed > refused,
        "the users Braze applied beside a refused one are not confirmed either"
    );
    assert_eq!(ran.outcomes.len(), n);
    assert_eq!(stats.users_unconfirmed, unconfirmed);
    assert_eq!(
        stats.users_unsent, 0,
        "unconfirmed users are not counted unsent"
    );
    assert_eq!(stats.users_confirmed + stats.users_unconfirmed, n as u64);
    assert!(stats.unconfirmed_requests > 0);
}

async fn strict_400_isolates_each_offending_object(errors_without_index: bool) {
    let sim = sim(SimConfig {
        faults: Faults {
            strict_batch_400: true,
            errors_without_index,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let n = 300;
    let ran = run(n, &client(&sim, KEY), cfg()).await;
    let stats = ran.result.as_ref().unwrap();
    // Every valid user sent and confirmed; each invalid one rejected with Braze's message.
    check_outcomes(&ran, n);
    check_profiles(&sim, n);
    let refused = (0..n).filter(|i| is_refused(*i)).count() as u64;
    assert_eq!(stats.braze_rejected, refused);
    assert_eq!(stats.users_confirmed, n as u64 - refused);
    assert!(stats.retries_by_cause.bisect_400 > 0);
    assert_eq!(
        stats.users_sent, n as u64,
        "narrowing down does not count users twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_whole_request_400_naming_no_object_is_bisected() {
    strict_400_isolates_each_offending_object(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_whole_request_400_naming_its_objects_resends_the_rest() {
    strict_400_isolates_each_offending_object(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mau_retry_after_is_honoured_and_every_user_lands() {
    // An account on MAU pricing: a 429 carries only X-Ratelimit-Retry-After (and the reset as
    // seconds remaining). The sender's own pace is set far above the simulator's window so
    // it runs into 429s and must wait as told.
    let sim = sim(SimConfig {
        rate_limit_requests: 5,
        rate_limit_window: Duration::from_millis(1000),
        mau_headers: true,
        ..SimConfig::default()
    })
    .await;
    let n = 600;
    let mut cfg = cfg();
    cfg.rate = RateBudget {
        requests_per_window: 1_000,
        window: Duration::from_secs(1),
        ..cfg.rate
    };
    let ran = run(n, &client(&sim, KEY), cfg).await;
    ran.result.as_ref().unwrap();
    check_outcomes(&ran, n);
    check_profiles(&sim, n);
    let s = sim.stats();
    assert!(s.rate_limited_429 > 0, "the window was never hit");
    // Waiting as told: 8 requests' worth of data through a 5-per-second window takes a couple
    // of windows, with few 429s per window (not a retry storm).
    assert!(
        s.rate_limited_429 < 60,
        "{} 429s for {} requests",
        s.rate_limited_429,
        s.requests_total
    );
}
