//! The sender over a scripted, in-memory Braze: every delta ends in exactly one outcome,
//! partial failures map back to the right user, 413 splits, a refused key stops after one
//! request, deadlines leave the rest unsent, retries go alone. Virtual time: no test waits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use braze_sync::model::{AttributeChange, DeliveryOutcome, Identifier, RowPos, UserDelta};
use braze_sync::send::braze::{BrazeApi, ItemError, RateLimitInfo, TrackError, TrackResponse};
use braze_sync::send::deliver::{DeliverConfig, DeliverError, DeliveryStats, StopReason, deliver};
use braze_sync::send::rate_limit::RateBudget;
use braze_sync::send::retry::RetryPolicy;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::mpsc;

fn delta(i: usize) -> UserDelta {
    UserDelta {
        identifier: Identifier::ExternalId(format!("u{i}")),
        pos: RowPos {
            source: "s3://exports/customers.csv".into(),
            row: i as u64 + 1,
            line: Some(i as u64 + 2),
        },
        changes: vec![
            AttributeChange {
                name: "first_name".into(),
                value: json!(format!("Name{i}")),
                fingerprint: None,
            },
            AttributeChange {
                name: "score".into(),
                value: json!(i),
                fingerprint: None,
            },
        ],
        update_existing_only: false,
        is_new: true,
        row_digest: None,
    }
}

fn ids_of(body: &Bytes) -> Vec<String> {
    let v: Value = serde_json::from_slice(body).unwrap();
    v["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["external_id"].as_str().unwrap().to_string())
        .collect()
}

fn ok(errors: Vec<ItemError>) -> Result<TrackResponse, TrackError> {
    Ok(TrackResponse {
        status: 201,
        message: "success".into(),
        errors,
        rate: RateLimitInfo::default(),
    })
}

type Script = Box<dyn Fn(usize, &[String]) -> Result<TrackResponse, TrackError> + Send + Sync>;

/// A fake Braze: `script(request_no, external_ids)` decides each answer after `latency`.
struct Fake {
    script: Script,
    latency: Duration,
    requests: Mutex<Vec<Vec<String>>>,
    current: AtomicUsize,
    peak: AtomicUsize,
}

impl Fake {
    fn new(
        latency: Duration,
        script: impl Fn(usize, &[String]) -> Result<TrackResponse, TrackError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            script: Box::new(script),
            latency,
            requests: Mutex::new(Vec::new()),
            current: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }
    fn requests(&self) -> Vec<Vec<String>> {
        self.requests.lock().unwrap().clone()
    }
}

#[async_trait]
impl BrazeApi for Fake {
    async fn track(&self, body: Bytes) -> Result<TrackResponse, TrackError> {
        let ids = ids_of(&body);
        let n = {
            let mut r = self.requests.lock().unwrap();
            r.push(ids.clone());
            r.len() - 1
        };
        let now = self.current.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.latency).await;
        self.current.fetch_sub(1, Ordering::SeqCst);
        (self.script)(n, &ids)
    }
}

fn fast_cfg() -> DeliverConfig {
    DeliverConfig {
        max_in_flight: 16,
        rate: RateBudget {
            requests_per_window: 1_000_000,
            ..Default::default()
        },
        retry: RetryPolicy {
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(200),
            ..Default::default()
        },
        ..Default::default()
    }
}

struct Ran {
    result: Result<DeliveryStats, DeliverError>,
    outcomes: Vec<DeliveryOutcome>,
    produced: usize,
}

/// Feeds `n` deltas through a small channel (as the reader does) and collects outcomes.
async fn run(n: usize, api: &Fake, cfg: DeliverConfig) -> Ran {
    let (tx, rx) = mpsc::channel(64);
    let (otx, mut orx) = mpsc::channel(64);
    let producer = tokio::spawn(async move {
        let mut produced = 0;
        for i in 0..n {
            if tx.send(delta(i)).await.is_err() {
                break;
            }
            produced += 1;
        }
        produced
    });
    let collector = tokio::spawn(async move {
        let mut v = Vec::new();
        while let Some(o) = orx.recv().await {
            v.push(o);
        }
        v
    });
    let result = deliver(rx, api, cfg, otx).await;
    let produced = producer.await.unwrap();
    let outcomes = collector.await.unwrap();
    Ran {
        result,
        outcomes,
        produced,
    }
}

fn external_id(d: &UserDelta) -> String {
    match &d.identifier {
        Identifier::ExternalId(id) => id.clone(),
        other => panic!("unexpected {other:?}"),
    }
}

/// Asserts each produced delta has exactly one outcome; returns outcomes by external id.
fn exactly_one_each(ran: &Ran) -> BTreeMap<String, DeliveryOutcome> {
    let mut by_id = BTreeMap::new();
    for o in &ran.outcomes {
        let id = external_id(o.delta());
        assert!(
            by_id.insert(id.clone(), o.clone()).is_none(),
            "two outcomes for {id}"
        );
    }
    assert_eq!(
        by_id.len(),
        ran.produced,
        "every produced delta has an outcome"
    );
    by_id
}

#[tokio::test(start_paused = true)]
async fn clean_run_confirms_everyone_in_full_batches() {
    let api = Fake::new(Duration::from_millis(40), |_, _| ok(vec![]));
    let ran = run(1000, &api, fast_cfg()).await;
    let stats = ran.result.as_ref().unwrap();
    let by_id = exactly_one_each(&ran);
    assert!(
        by_id
            .values()
            .all(|o| matches!(o, DeliveryOutcome::Confirmed(_)))
    );
    assert_eq!(stats.users_confirmed, 1000);
    assert_eq!(stats.users_sent, 1000);
    assert_eq!(stats.attributes_sent, 2000);
    assert_eq!(stats.requests, 14);
    assert_eq!(stats.max_objects_per_request, 75);
    let reqs = api.requests();
    assert!(reqs.iter().all(|r| r.len() <= 75));
    assert!(api.peak.load(Ordering::SeqCst) > 1, "requests overlap");
    assert!(api.peak.load(Ordering::SeqCst) <= 16);
}

#[tokio::test(start_paused = true)]
async fn combined_limit_plan_sends_at_most_50_per_request() {
    let api = Fake::new(Duration::from_millis(5), |_, _| ok(vec![]));
    let cfg = DeliverConfig {
        combined_limit: true,
        ..fast_cfg()
    };
    let ran = run(120, &api, cfg).await;
    ran.result.unwrap();
    let sizes: Vec<usize> = api.requests().iter().map(Vec::len).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 120);
    assert!(sizes.iter().all(|s| *s <= 50), "{sizes:?}");
}

#[tokio::test(start_paused = true)]
async fn every_delta_ends_in_exactly_one_outcome_under_random_faults() {
    let mut retried = 0;
    for seed in 0..8u64 {
        let rng = Mutex::new(StdRng::seed_from_u64(seed));
        let api = Fake::new(Duration::from_millis(30), move |_, ids| {
            let mut rng = rng.lock().unwrap();
            let rate = RateLimitInfo {
                remaining: Some(0),
                reset: Some(1.0),
                ..Default::default()
            };
            match rng.random_range(0..100) {
                0..=59 => ok(vec![]),
                60..=69 => ok(vec![ItemError {
                    index: Some(rng.random_range(0..ids.len())),
                    input_array: Some("attributes".into()),
                    message: "The value provided for the 'email' field is not a valid email."
                        .into(),
                }]),
                70..=77 => Err(TrackError::Server {
                    status: 503,
                    message: "unavailable".into(),
                    rate: RateLimitInfo::default(),
                }),
                78..=82 => Err(TrackError::RateLimited {
                    message: "rate limited".into(),
                    rate,
                }),
                83..=86 => Err(TrackError::Timeout {
                    detail: "timed out".into(),
                }),
                87..=90 => Err(TrackError::Connection {
                    detail: "connection reset".into(),
                }),
                91..=94 => Err(TrackError::PayloadTooLarge {
                    message: "too large".into(),
                    rate: RateLimitInfo::default(),
                }),
                _ => Err(TrackError::Rejected {
                    status: 400,
                    message: "Bad Request".into(),
                    errors: vec![],
                    rate: RateLimitInfo::default(),
                }),
            }
        });
        let cfg = DeliverConfig {
            seed,
            stop_after_failed_batches: 0,
            ..fast_cfg()
        };
        let ran = run(1_500, &api, cfg).await;
        let stats = ran.result.as_ref().unwrap().clone();
        let by_id = exactly_one_each(&ran);
        assert_eq!(ran.produced, 1_500);
        let confirmed = by_id
            .values()
            .filter(|o| matches!(o, DeliveryOutcome::Confirmed(_)))
            .count() as u64;
        let rejected = by_id
            .values()
            .filter(|o| matches!(o, DeliveryOutcome::Rejected { .. }))
            .count() as u64;
        assert_eq!(stats.users_confirmed, confirmed);
        assert_eq!(stats.braze_rejected, rejected);
        assert_eq!(
            stats.users_confirmed + stats.braze_rejected + stats.users_unsent,
            1_500
        );
        assert_eq!(stats.requests as usize, api.requests().len());
        retried += stats.retries_by_cause.total();
    }
    assert!(retried >= 10, "faults were retried: {retried}");
}

#[tokio::test(start_paused = true)]
async fn partial_errors_reject_exactly_the_listed_users_with_brazes_message() {
    // Braze refuses the objects at index 1 and 4 of the first request.
    let api = Fake::new(Duration::from_millis(10), |n, _| {
        if n == 0 {
            ok(vec![
                ItemError {
                    index: Some(4),
                    input_array: Some("attributes".into()),
                    message: "'external_id' or 'braze_id' or 'user_alias' is required".into(),
                },
                ItemError {
                    index: Some(1),
                    input_array: Some("attributes".into()),
                    message: "The value provided for the 'email' field is not a valid email."
                        .into(),
                },
                ItemError {
                    index: Some(1),
                    input_array: Some("events".into()),
                    message: "not about attributes".into(),
                },
            ])
        } else {
            ok(vec![])
        }
    });
    let ran = run(10, &api, fast_cfg()).await;
    let stats = ran.result.as_ref().unwrap();
    let by_id = exactly_one_each(&ran);
    let first_request = &api.requests()[0];
    for (i, id) in first_request.iter().enumerate() {
        match (i, &by_id[id]) {
            (1, DeliveryOutcome::Rejected { delta, reason }) => {
                assert!(reason.contains("not a valid email"), "{reason}");
                assert_eq!(delta.pos.row, 2);
            }
            (4, DeliveryOutcome::Rejected { delta, reason }) => {
                assert!(reason.contains("is required"));
                assert_eq!(delta.pos.row, 5);
            }
            (1 | 4, o) => panic!("index {i} should be rejected, got {o:?}"),
            (_, o) => assert!(matches!(o, DeliveryOutcome::Confirmed(_)), "{o:?}"),
        }
    }
    assert_eq!(stats.braze_rejected, 2);
    assert_eq!(stats.users_confirmed, 8);
    assert_eq!(stats.partial_failures, 1);
    assert_eq!(stats.unmapped_errors, 1);
}

#[tokio::test(start_paused = true)]
async fn refused_key_stops_after_the_single_probe_request() {
    let api = Fake::new(Duration::from_millis(20), |_, _| {
        Err(TrackError::Unauthorized {
            status: 401,
            message: "Braze refused the API key at h (HTTP 401): the key is invalid, lacks the users.track permission, or belongs to another Braze instance".into(),
        })
    });
    let ran = run(5_000, &api, fast_cfg()).await;
    assert_eq!(api.requests().len(), 1, "exactly one request after a 401");
    let err = ran.result.as_ref().unwrap_err();
    assert!(matches!(
        err,
        DeliverError::Unauthorized { status: 401, .. }
    ));
    assert!(err.to_string().contains("users.track"));
    assert!(!err.is_retryable());
    let by_id = exactly_one_each(&ran);
    assert!(
        by_id
            .values()
            .all(|o| matches!(o, DeliveryOutcome::Unsent(_)))
    );
    assert!(ran.produced < 5_000, "the producer learns the run stopped");
    assert_eq!(err.stats().stopped, Some(StopReason::Unauthorized));
}

#[tokio::test(start_paused = true)]
async fn a_key_revoked_mid_run_stops_new_requests() {
    let api = Fake::new(Duration::from_millis(20), |n, _| {
        if n < 30 {
            ok(vec![])
        } else {
            Err(TrackError::Unauthorized {
                status: 403,
                message: "lacks users.track".into(),
            })
        }
    });
    let ran = run(20_000, &api, fast_cfg()).await;
    assert!(matches!(
        ran.result,
        Err(DeliverError::Unauthorized { status: 403, .. })
    ));
    // At most the requests already in flight when the first 403 arrived went out after it.
    assert!(api.requests().len() <= 30 + 16, "{}", api.requests().len());
    exactly_one_each(&ran);
}

#[tokio::test(start_paused = true)]
async fn payload_too_large_splits_until_braze_accepts() {
    let api = Fake::new(Duration::from_millis(10), |_, ids| {
        if ids.len() > 20 {
            Err(TrackError::PayloadTooLarge {
                message: "Request Entity Too Large".into(),
                rate: RateLimitInfo::default(),
            })
        } else {
            ok(vec![])
        }
    });
    let ran = run(150, &api, fast_cfg()).await;
    let stats = ran.result.as_ref().unwrap();
    let by_id = exactly_one_each(&ran);
    assert!(
        by_id
            .values()
            .all(|o| matches!(o, DeliveryOutcome::Confirmed(_)))
    );
    // 75 → 37 + 38 → 18 + 19 + 19 + 19, twice.
    assert_eq!(stats.retries_by_cause.split_413, 6);
    assert_eq!(stats.users_sent, 150, "split halves are not counted twice");
    let accepted: usize = api
        .requests()
        .iter()
        .filter(|r| r.len() <= 20)
        .map(Vec::len)
        .sum();
    assert_eq!(accepted, 150);
}

#[tokio::test(start_paused = true)]
async fn one_object_too_large_alone_is_rejected() {
    let api = Fake::new(Duration::from_millis(10), |_, _| {
        Err(TrackError::PayloadTooLarge {
            message: "Request Entity Too Large".into(),
            rate: RateLimitInfo::default(),
        })
    });
    let ran = run(2, &api, fast_cfg()).await;
    let by_id = exactly_one_each(&ran);
    assert!(
        by_id.values().all(
            |o| matches!(o, DeliveryOutcome::Rejected { reason, .. } if reason.contains("413"))
        )
    );
}

#[tokio::test(start_paused = true)]
async fn oversized_object_is_rejected_without_a_request() {
    let api = Fake::new(Duration::from_millis(10), |_, _| ok(vec![]));
    let cfg = DeliverConfig {
        max_body_bytes: 1_000,
        ..fast_cfg()
    };
    let (tx, rx) = mpsc::channel(4);
    let (otx, mut orx) = mpsc::channel(4);
    let mut big = delta(0);
    big.changes[0].value = json!("x".repeat(5_000));
    tx.send(big).await.unwrap();
    tx.send(delta(1)).await.unwrap();
    drop(tx);
    let stats = deliver(rx, &api, cfg, otx).await.unwrap();
    let a = orx.recv().await.unwrap();
    assert!(matches!(&a, DeliveryOutcome::Rejected { reason, .. } if reason.contains("bytes")));
    assert!(matches!(
        orx.recv().await.unwrap(),
        DeliveryOutcome::Confirmed(_)
    ));
    assert_eq!(api.requests().len(), 1);
    assert_eq!(stats.braze_rejected, 1);
}

#[tokio::test(start_paused = true)]
async fn a_whole_request_400_naming_no_object_is_bisected_down_to_single_objects() {
    let api = Fake::new(Duration::from_millis(10), |_, _| {
        Err(TrackError::Rejected {
            status: 400,
            message: "Max Input Length Exceeded".into(),
            errors: vec![],
            rate: RateLimitInfo::default(),
        })
    });
    let ran = run(80, &api, fast_cfg()).await;
    let stats = ran.result.as_ref().unwrap();
    let by_id = exactly_one_each(&ran);
    // 75 objects take 2 x 75 - 1 requests to isolate each one, 5 take 9; never a retry of the
    // same body.
    assert_eq!(api.requests().len(), 149 + 9);
    assert_eq!(stats.retries_by_cause.bisect_400, 74 + 4);
    assert_eq!(stats.users_sent, 80);
    for o in by_id.values() {
        let DeliveryOutcome::Rejected { reason, .. } = o else {
            panic!("{o:?}")
        };
        assert!(reason.contains("HTTP 400") && reason.contains("Max Input Length Exceeded"));
    }
}

#[tokio::test(start_paused = true)]
async fn a_non_400_client_error_rejects_the_batch_without_retry() {
    let api = Fake::new(Duration::from_millis(10), |_, _| {
        Err(TrackError::Rejected {
            status: 404,
            message: "Not Found".into(),
            errors: vec![],
            rate: RateLimitInfo::default(),
        })
    });
    let ran = run(80, &api, fast_cfg()).await;
    let by_id = exactly_one_each(&ran);
    assert_eq!(api.requests().len(), 2);
    assert!(
        by_id
            .values()
            .all(|o| matches!(o, DeliveryOutcome::Rejected { .. }))
    );
}

#[tokio::test(start_paused = true)]
async fn an_index_less_error_or_a_non_braze_2xx_confirms_no_user_of_its_request() {
    // Request 0: errors[] without an index. Request 1: a 2xx that is not Braze's JSON.
    let api = Fake::new(Duration::from_millis(10), |n, _| match n {
        0 => ok(vec![ItemError {
            index: None,
            input_array: None,
            message: "something was wrong".into(),
        }]),
        1 => Err(TrackError::Unconfirmed {
            status: 200,
            message: "<html>ok</html>".into(),
        }),
        _ => ok(vec![]),
    });
    let ran = run(200, &api, fast_cfg()).await;
    let stats = ran.result.as_ref().unwrap();
    let by_id = exactly_one_each(&ran);
    let requests = api.requests();
    for (r, ids) in requests.iter().enumerate() {
        for id in ids {
            let o = &by_id[id];
            if r < 2 {
                assert!(
                    matches!(o, DeliveryOutcome::Unsent(_)),
                    "request {r}: {o:?}"
                );
            } else {
                assert!(
                    matches!(o, DeliveryOutcome::Confirmed(_)),
                    "request {r}: {o:?}"
                );
            }
        }
    }
    let unconfirmed = (requests[0].len() + requests[1].len()) as u64;
    assert_eq!(stats.users_unconfirmed, unconfirmed);
    assert_eq!(stats.unconfirmed_requests, 2);
    assert_eq!(stats.users_unsent, 0);
    assert_eq!(stats.users_confirmed, 200 - unconfirmed);
    assert_eq!(stats.unmapped_errors, 1);
}

#[tokio::test(start_paused = true)]
async fn a_failing_batch_is_retried_alone_while_the_others_flow() {
    // The batch holding u1000 fails three times with 5xx; every other batch goes through.
    let api = Fake::new(Duration::from_millis(20), |_, ids| {
        static FAILS: AtomicUsize = AtomicUsize::new(0);
        if ids.iter().any(|i| i == "u1000") && FAILS.fetch_add(1, Ordering::SeqCst) < 3 {
            Err(TrackError::Server {
                status: 500,
                message: "oops".into(),
                rate: RateLimitInfo::default(),
            })
        } else {
            ok(vec![])
        }
    });
    let cfg = DeliverConfig {
        retry: RetryPolicy {
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(2),
            ..Default::default()
        },
        seed: 3,
        ..fast_cfg()
    };
    let ran = run(3_000, &api, cfg).await;
    let stats = ran.result.as_ref().unwrap();
    assert_eq!(stats.retries_by_cause.http_5xx, 3);
    assert_eq!(stats.requests, 40 + 3);
    let reqs = api.requests();
    let u0_attempts: Vec<usize> = reqs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.iter().any(|i| i == "u1000"))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(u0_attempts.len(), 4);
    // Other batches were sent between the first failure and the final success.
    assert!(u0_attempts[3] - u0_attempts[0] > 3, "{u0_attempts:?}");
    assert!(
        exactly_one_each(&ran)
            .values()
            .all(|o| matches!(o, DeliveryOutcome::Confirmed(_)))
    );
}

#[tokio::test(start_paused = true)]
async fn deadline_stops_new_batches_and_reports_the_rest_unsent() {
    let api = Fake::new(Duration::from_millis(100), |_, _| ok(vec![]));
    let cfg = DeliverConfig {
        max_in_flight: 4,
        deadline: Some(tokio::time::Instant::now() + Duration::from_millis(1_050)),
        ..fast_cfg()
    };
    let ran = run(100_000, &api, cfg).await;
    let stats = ran.result.as_ref().unwrap();
    assert_eq!(stats.stopped, Some(StopReason::Deadline));
    let by_id = exactly_one_each(&ran);
    let confirmed: HashSet<&String> = by_id
        .iter()
        .filter(|(_, o)| matches!(o, DeliveryOutcome::Confirmed(_)))
        .map(|(k, _)| k)
        .collect();
    // Probe (100 ms), then 4 at a time for ~950 ms: about 40 requests; all in flight finish.
    let sent: usize = api.requests().iter().map(Vec::len).sum();
    assert_eq!(confirmed.len(), sent);
    assert!(
        api.requests().len() >= 30 && api.requests().len() <= 45,
        "{}",
        api.requests().len()
    );
    assert!(stats.users_unsent > 0);
    assert!(ran.produced < 100_000, "the reader was told to stop");
}

#[tokio::test(start_paused = true)]
async fn repeated_exhausted_batches_stop_the_run_as_unavailable() {
    let api = Fake::new(Duration::from_millis(10), |_, _| {
        Err(TrackError::Server {
            status: 503,
            message: "Service Unavailable".into(),
            rate: RateLimitInfo::default(),
        })
    });
    let cfg = DeliverConfig {
        retry: RetryPolicy {
            max_transient_failures: 2,
            base_delay: Duration::from_millis(10),
            ..Default::default()
        },
        ..fast_cfg()
    };
    let ran = run(10_000, &api, cfg).await;
    let err = ran.result.as_ref().unwrap_err();
    assert!(
        matches!(err, DeliverError::BrazeUnavailable { .. }),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(
        exactly_one_each(&ran)
            .values()
            .all(|o| matches!(o, DeliveryOutcome::Unsent(_)))
    );
    assert!(api.requests().len() < 200);
}

#[tokio::test(start_paused = true)]
async fn sends_are_paced_by_the_rate_budget() {
    let api = Fake::new(Duration::from_millis(20), |_, _| ok(vec![]));
    let cfg = DeliverConfig {
        max_objects: 1,
        rate: RateBudget {
            requests_per_window: 30,
            headroom: 0.0,
            ..Default::default()
        },
        ..fast_cfg()
    };
    let start = tokio::time::Instant::now();
    let ran = run(61, &api, cfg).await;
    ran.result.unwrap();
    // 30 per 3 s: 61 requests need at least 6 s (the first goes at once).
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(5_900), "{elapsed:?}");
    assert!(elapsed <= Duration::from_millis(6_300), "{elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn rate_limited_batches_wait_for_the_reset() {
    // The first answer after the probe is a 429 with a 2 s reset; afterwards all is well.
    let api = Fake::new(Duration::from_millis(10), |n, _| {
        if n == 1 {
            Err(TrackError::RateLimited {
                message: "rate limited".into(),
                rate: RateLimitInfo {
                    limit: Some(3000),
                    remaining: Some(0),
                    reset: Some(2.0),
                    retry_after_s: None,
                },
            })
        } else {
            ok(vec![])
        }
    });
    let start = tokio::time::Instant::now();
    let ran = run(
        300,
        &api,
        DeliverConfig {
            max_in_flight: 1,
            ..fast_cfg()
        },
    )
    .await;
    let stats = ran.result.unwrap();
    assert_eq!(stats.http_429, 1);
    assert_eq!(stats.retries_by_cause.http_429, 1);
    assert!(start.elapsed() >= Duration::from_secs(2));
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn requests_hanging_past_the_deadline_grace_are_abandoned_as_unsent() {
    let api = Fake::new(Duration::from_secs(600), |_, _| ok(vec![]));
    let start = tokio::time::Instant::now();
    let cfg = DeliverConfig {
        deadline: Some(start + Duration::from_secs(1)),
        in_flight_grace: Duration::from_secs(2),
        ..fast_cfg()
    };
    let ran = run(500, &api, cfg).await;
    let stats = ran.result.as_ref().unwrap();
    assert_eq!(stats.stopped, Some(StopReason::Deadline));
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert!(
        exactly_one_each(&ran)
            .values()
            .all(|o| matches!(o, DeliveryOutcome::Unsent(_)))
    );
}

/// A Braze that answers after 40 ms and records the most request body bytes it held at once.
#[derive(Default)]
struct BodyBytes {
    current: AtomicUsize,
    peak: AtomicUsize,
    largest: AtomicUsize,
}

#[async_trait]
impl BrazeApi for BodyBytes {
    async fn track(&self, body: Bytes) -> Result<TrackResponse, TrackError> {
        let now = self.current.fetch_add(body.len(), Ordering::SeqCst) + body.len();
        self.peak.fetch_max(now, Ordering::SeqCst);
        self.largest.fetch_max(body.len(), Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(40)).await;
        self.current.fetch_sub(body.len(), Ordering::SeqCst);
        ok(vec![])
    }
}

#[tokio::test(start_paused = true)]
async fn requests_in_flight_are_bounded_by_their_body_bytes_not_only_their_count() {
    let api = BodyBytes::default();
    // Room for 256 requests by count, for about 3 of these by bytes (75 users ~ 5 KB).
    let cfg = DeliverConfig {
        max_in_flight: 256,
        max_in_flight_bytes: 16 << 10,
        ..fast_cfg()
    };
    let (tx, rx) = mpsc::channel(64);
    let (otx, mut orx) = mpsc::channel(64);
    tokio::spawn(async move {
        for i in 0..5_000 {
            tx.send(delta(i)).await.unwrap();
        }
    });
    let confirmed = tokio::spawn(async move {
        let mut n = 0;
        while let Some(o) = orx.recv().await {
            n += usize::from(matches!(o, DeliveryOutcome::Confirmed(_)));
        }
        n
    });
    let stats = deliver(rx, &api, cfg, otx).await.unwrap();
    assert_eq!(confirmed.await.unwrap(), 5_000, "everyone is confirmed");
    assert_eq!(stats.users_confirmed, 5_000);
    let peak = api.peak.load(Ordering::SeqCst);
    let largest = api.largest.load(Ordering::SeqCst);
    assert!(largest > 4 << 10, "full batches: {largest} bytes");
    assert!(peak <= 16 << 10, "{peak} body bytes in flight at once");
    assert!(
        peak > largest,
        "still more than one request at once: {peak}"
    );

    // One request larger than the bound still goes, alone.
    let api = BodyBytes::default();
    let cfg = DeliverConfig {
        max_in_flight_bytes: 1,
        ..fast_cfg()
    };
    let (tx, rx) = mpsc::channel(64);
    let (otx, mut orx) = mpsc::channel(64);
    tokio::spawn(async move {
        for i in 0..300 {
            tx.send(delta(i)).await.unwrap();
        }
    });
    tokio::spawn(async move { while orx.recv().await.is_some() {} });
    let stats = deliver(rx, &api, cfg, otx).await.unwrap();
    assert_eq!(stats.users_confirmed, 300);
    assert_eq!(
        api.peak.load(Ordering::SeqCst),
        api.largest.load(Ordering::SeqCst),
        "one request at a time"
    );
}
