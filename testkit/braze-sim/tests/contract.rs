//! The simulator over real HTTP: each documented `/users/track` rule and each fault kind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use braze_sim::{Burst429, Faults, SimConfig, SimHandle};
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};

const KEY: &str = "test-key-123";

async fn sim(cfg: SimConfig) -> SimHandle {
    braze_sim::start(SimConfig {
        api_key: KEY.into(),
        ..cfg
    })
    .await
    .unwrap()
}

async fn default_sim() -> SimHandle {
    sim(SimConfig::default()).await
}

fn client() -> Client {
    Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn post(sim: &SimHandle, body: &Value) -> Response {
    client()
        .post(sim.track_url())
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn post_ok(sim: &SimHandle, body: Value) -> Value {
    let r = post(sim, &body).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    r.json().await.unwrap()
}

fn assert_rate_headers(r: &Response) {
    for h in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ] {
        let v = r.headers().get(h).unwrap_or_else(|| panic!("{h} missing"));
        v.to_str().unwrap().parse::<u64>().unwrap();
    }
}

fn many(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"external_id": format!("u{i}"), "n": i}))
        .collect()
}

#[tokio::test]
async fn wrong_or_missing_key_gets_401_and_applies_nothing() {
    let sim = default_sim().await;
    let body = json!({"attributes": [{"external_id": "u1", "a": 1}]});
    let r = client()
        .post(sim.track_url())
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_rate_headers(&r);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .starts_with("Invalid API key")
    );
    let r = client()
        .post(sim.track_url())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(sim.users().is_empty());
    assert_eq!(sim.stats().requests_after_first_401, 1);
}

#[tokio::test]
async fn key_without_users_track_permission_gets_403_access_denied() {
    let sim = sim(SimConfig {
        key_lacks_users_track: true,
        ..SimConfig::default()
    })
    .await;
    let r = post(&sim, &json!({"attributes": [{"external_id": "u1"}]})).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_rate_headers(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["message"], "Access Denied");
    assert!(sim.users().is_empty());
}

#[tokio::test]
async fn non_json_content_type_and_invalid_json_are_refused() {
    let sim = default_sim().await;
    let r = client()
        .post(sim.track_url())
        .bearer_auth(KEY)
        .header("content-type", "text/plain")
        .body(r#"{"attributes": [{"external_id": "u1"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_rate_headers(&r);
    let r = client()
        .post(sim.track_url())
        .bearer_auth(KEY)
        .header("content-type", "application/json; charset=utf-8")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_rate_headers(&r);
    let v: Value = r.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().starts_with("Invalid JSON"));
}

#[tokio::test]
async fn empty_body_needs_valid_data() {
    let sim = default_sim().await;
    let r = post(&sim, &json!({})).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["message"],
        "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields."
    );
}

#[tokio::test]
async fn seventy_six_objects_in_one_array_is_max_input_length_exceeded() {
    let sim = default_sim().await;
    let r = post(&sim, &json!({"attributes": many(76)})).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_rate_headers(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["message"], "Max Input Length Exceeded");
    assert!(sim.users().is_empty());
    let v = post_ok(&sim, json!({"attributes": many(75)})).await;
    assert_eq!(v["attributes_processed"], 75);
    assert_eq!(sim.users().len(), 75);
    let st = sim.stats();
    assert_eq!(st.max_objects_in_request, 76);
    assert_eq!(st.objects_applied, 75);
}

#[tokio::test]
async fn fifty_one_objects_combined_are_refused_on_the_mau_plan() {
    let sim = sim(SimConfig {
        combined_limit: Some(50),
        ..SimConfig::default()
    })
    .await;
    let events: Vec<Value> = (0..21)
        .map(|i| json!({"external_id": format!("u{i}"), "name": "e", "time": "2024-01-01T00:00:00Z"}))
        .collect();
    let r = post(&sim, &json!({"attributes": many(30), "events": events})).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["message"], "Max Input Length Exceeded");
    let v = post_ok(
        &sim,
        json!({"attributes": many(30), "events": events[..20]}),
    )
    .await;
    assert_eq!(v["events_processed"], 20);
}

#[tokio::test]
async fn body_over_four_megabytes_gets_413() {
    let sim = default_sim().await;
    let pad = "x".repeat(4_000_000);
    let body = json!({"attributes": [{"external_id": "u1", "pad": pad}]});
    let r = post(&sim, &body).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_rate_headers(&r);
    assert!(sim.users().is_empty());
    assert!(sim.stats().max_body_bytes > 4_000_000);
}

#[tokio::test]
async fn objects_without_exactly_one_identifier_are_reported_by_index() {
    let sim = default_sim().await;
    let v = post_ok(
        &sim,
        json!({"attributes": [
            {"first_name": "no id"},
            {"external_id": "u1", "user_alias": {"alias_name": "a", "alias_label": "l"}},
            {"external_id": 12345, "first_name": "numeric id"},
            {"external_id": "ok", "first_name": "applied"}
        ]}),
    )
    .await;
    assert_eq!(v["message"], "success");
    assert_eq!(v["attributes_processed"], 1);
    let errors = v["errors"].as_array().unwrap();
    let idx: Vec<u64> = errors
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![0, 1, 2]);
    assert!(errors.iter().all(|e| e["input_array"] == "attributes"));
    assert_eq!(
        errors[0]["type"],
        "'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required"
    );
    assert_eq!(sim.user("ok").unwrap()["first_name"], "applied");
    assert_eq!(sim.users().len(), 1);
    assert_eq!(sim.stats().objects_rejected, 3);
}

#[tokio::test]
async fn invalid_standard_fields_are_reported_while_the_rest_apply() {
    let sim = default_sim().await;
    let v = post_ok(
        &sim,
        json!({"attributes": [
            {"external_id": "a", "dob": "21/12/1980"},
            {"external_id": "b", "gender": "male"},
            {"external_id": "c", "country": "USA"},
            {"external_id": "d", "email_subscribe": "yes"},
            {"external_id": "e", "email": "not-an-email"},
            {"external_id": "f", "dob": "1980-12-21", "gender": "F", "country": "DE",
             "email_subscribe": "opted_in", "push_subscribe": "subscribed", "language": "de",
             "time_zone": "Europe/Berlin", "email": "f@example.com", "first_name": "F"}
        ]}),
    )
    .await;
    let idx: Vec<u64> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![0, 1, 2, 3, 4]);
    assert_eq!(
        v["errors"][4]["type"],
        "The value provided for the 'email' field is not a valid email."
    );
    assert_eq!(sim.users().keys().collect::<Vec<_>>(), vec!["f"]);
    let f = sim.user("f").unwrap();
    assert_eq!(f["time_zone"], "Europe/Berlin");
    assert_eq!(f["dob"], "1980-12-21");
}

#[tokio::test]
async fn every_object_invalid_gives_400_with_errors() {
    let sim = default_sim().await;
    let r = post(
        &sim,
        &json!({"attributes": [{"external_id": "a", "gender": "x"}]}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["index"], 0);
    assert!(sim.users().is_empty());
}

#[tokio::test]
async fn update_existing_only_defaults_true_for_alias_and_false_for_external_id() {
    let sim = default_sim().await;
    let alias = json!({"alias_name": "n1", "alias_label": "amperity_id"});
    let v = post_ok(
        &sim,
        json!({"attributes": [
            {"user_alias": alias, "first_name": "skipped"},
            {"external_id": "new-user", "first_name": "created"},
            {"external_id": "other", "_update_existing_only": true, "first_name": "skipped"}
        ]}),
    )
    .await;
    assert_eq!(v["attributes_processed"], 3);
    assert!(v.get("errors").is_none());
    assert_eq!(sim.users().keys().collect::<Vec<_>>(), vec!["new-user"]);
    assert_eq!(sim.stats().objects_skipped_update_only, 2);

    post_ok(
        &sim,
        json!({"attributes": [{"user_alias": alias, "_update_existing_only": false, "first_name": "A"}]}),
    )
    .await;
    post_ok(
        &sim,
        json!({"attributes": [{"user_alias": alias, "last_name": "B"}]}),
    )
    .await;
    let a = sim.user("alias:amperity_id:n1").unwrap();
    assert_eq!(a["first_name"], "A");
    assert_eq!(a["last_name"], "B");
}

#[tokio::test]
async fn null_removes_and_array_and_inc_operations_apply() {
    let sim = default_sim().await;
    post_ok(
        &sim,
        json!({"attributes": [{"external_id": "u", "tier": "gold", "tags": ["a", "b", "c"], "visits": 1}]}),
    )
    .await;
    post_ok(
        &sim,
        json!({"attributes": [{"external_id": "u", "tier": null,
            "tags": {"add": ["a", "d"], "remove": ["b"]}, "visits": {"inc": 4}}]}),
    )
    .await;
    let u = sim.user("u").unwrap();
    assert!(u.get("tier").is_none());
    assert_eq!(u["tags"], json!(["c", "a", "d"]));
    assert_eq!(u["visits"], 5);
}

#[tokio::test]
async fn events_and_purchases_are_counted_and_stored() {
    let sim = default_sim().await;
    let v = post_ok(
        &sim,
        json!({
            "events": [{"external_id": "u", "name": "login", "time": "2024-05-01T10:00:00Z"}],
            "purchases": [{"external_id": "u", "product_id": "sku", "currency": "USD",
                           "price": 10.0, "time": "2024-05-01T10:00:00Z"}]
        }),
    )
    .await;
    assert_eq!(v["events_processed"], 1);
    assert_eq!(v["purchases_processed"], 1);
    assert_eq!(sim.events("u").unwrap().len(), 1);
    assert_eq!(sim.purchases("u").unwrap().len(), 1);
}

#[tokio::test]
async fn mau_accounts_get_retry_after_and_the_reset_in_seconds_remaining() {
    let sim = sim(SimConfig {
        rate_limit_requests: 1,
        rate_limit_window: Duration::from_secs(3),
        mau_headers: true,
        ..SimConfig::default()
    })
    .await;
    let r = post(&sim, &json!({"attributes": [{"external_id": "a"}]})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(r.headers().get("x-ratelimit-limit").is_none());
    assert!(r.headers().get("x-ratelimit-remaining").is_none());
    assert!(r.headers().get("x-ratelimit-retry-after").is_none());
    let reset: u64 = r.headers()["x-ratelimit-reset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=4).contains(&reset), "seconds remaining, got {reset}");
    let r = post(&sim, &json!({"attributes": [{"external_id": "b"}]})).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = r.headers()["x-ratelimit-retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=4).contains(&wait), "retry after {wait}");
    assert!(r.headers().get("x-ratelimit-limit").is_none());
    assert!(sim.user("b").is_none());
}

#[tokio::test]
async fn the_hourly_budget_refuses_requests_until_the_next_clock_hour() {
    let sim = sim(SimConfig {
        hourly_request_limit: Some(2),
        mau_headers: true,
        ..SimConfig::default()
    })
    .await;
    for id in ["a", "b"] {
        let r = post(&sim, &json!({"attributes": [{"external_id": id}]})).await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let r = post(&sim, &json!({"attributes": [{"external_id": "c"}]})).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = r.headers()["x-ratelimit-retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let to_next_hour = 3600 - now % 3600;
    assert!(
        wait.abs_diff(to_next_hour) <= 1,
        "retry after {wait}, next hour in {to_next_hour}"
    );
    assert!(sim.user("c").is_none());
    let st = sim.stats();
    assert_eq!(st.hourly_limited_429, 1);
    assert_eq!(st.rate_limited_429, 1);
}

#[tokio::test]
async fn past_the_rate_limit_requests_get_429_with_headers_and_apply_nothing() {
    let sim = sim(SimConfig {
        rate_limit_requests: 5,
        rate_limit_window: Duration::from_secs(1),
        ..SimConfig::default()
    })
    .await;
    let mut remaining = Vec::new();
    for i in 0..5 {
        let r = post(
            &sim,
            &json!({"attributes": [{"external_id": format!("u{i}")}]}),
        )
        .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(r.headers()["x-ratelimit-limit"], "5");
        remaining.push(
            r.headers()["x-ratelimit-remaining"]
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(remaining, vec!["4", "3", "2", "1", "0"]);
    let r = post(&sim, &json!({"attributes": [{"external_id": "late"}]})).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_rate_headers(&r);
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    let reset: u64 = r.headers()["x-ratelimit-reset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(reset >= now && reset <= now + 2, "reset {reset} now {now}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["message"], "Rate Limited");
    assert!(sim.user("late").is_none());
    assert_eq!(sim.stats().rate_limited_429, 1);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = post(&sim, &json!({"attributes": [{"external_id": "late"}]})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(sim.user("late").is_some());
}

#[tokio::test]
async fn server_error_fault_applies_nothing() {
    let sim = sim(SimConfig {
        faults: Faults {
            error_5xx_share: 1.0,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    for _ in 0..5 {
        let r = post(&sim, &json!({"attributes": [{"external_id": "u"}]})).await;
        assert!(r.status().is_server_error());
        assert_rate_headers(&r);
    }
    assert!(sim.users().is_empty());
    assert_eq!(sim.stats().faults_5xx, 5);
    sim.set_faults(Faults::default()).unwrap();
    post_ok(&sim, json!({"attributes": [{"external_id": "u"}]})).await;
}

#[tokio::test]
async fn drop_fault_closes_the_connection_without_response() {
    let sim = sim(SimConfig {
        faults: Faults {
            drop_share: 1.0,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let err = client()
        .post(sim.track_url())
        .bearer_auth(KEY)
        .json(&json!({"attributes": [{"external_id": "u"}]}))
        .send()
        .await
        .unwrap_err();
    assert!(!err.is_timeout(), "{err:?}");
    assert!(err.status().is_none());
    assert!(sim.users().is_empty());
    let st = sim.stats();
    assert_eq!(st.dropped_connections, 1);
    assert_eq!(st.by_status["dropped"], 1);
    assert_eq!(sim.requests()[0].status, None);
}

#[tokio::test]
async fn burst_fault_answers_429_with_headers_for_its_length() {
    let sim = sim(SimConfig {
        faults: Faults {
            burst_429: Some(Burst429 {
                every_n_requests: 3,
                length: 2,
            }),
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let mut statuses = Vec::new();
    for i in 0..6 {
        let r = post(
            &sim,
            &json!({"attributes": [{"external_id": format!("u{i}")}]}),
        )
        .await;
        assert_rate_headers(&r);
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, vec![201, 201, 429, 429, 201, 429]);
    assert_eq!(sim.users().len(), 3);
    assert_eq!(sim.stats().burst_429, 3);
}

#[tokio::test]
async fn latency_fault_delays_responses() {
    let sim = sim(SimConfig {
        faults: Faults {
            latency_ms: Some((150, 150)),
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let t = Instant::now();
    post_ok(&sim, json!({"attributes": [{"external_id": "u"}]})).await;
    assert!(t.elapsed() >= Duration::from_millis(150));
    assert_eq!(sim.requests()[0].delay_ms, 150);
}

#[tokio::test]
async fn same_seed_gives_the_same_fault_sequence() {
    let faults = Faults {
        error_5xx_share: 0.5,
        ..Faults::default()
    };
    let mut runs = Vec::new();
    for _ in 0..2 {
        let sim = sim(SimConfig {
            faults: faults.clone(),
            seed: 42,
            ..SimConfig::default()
        })
        .await;
        let mut s = Vec::new();
        for _ in 0..12 {
            s.push(
                post(&sim, &json!({"attributes": [{"external_id": "u"}]}))
                    .await
                    .status(),
            );
        }
        runs.push(s);
    }
    assert_eq!(runs[0], runs[1]);
    assert!(runs[0].iter().any(|s| s.is_server_error()));
    assert!(runs[0].iter().any(|s| s.is_success()));
}

#[tokio::test]
async fn sim_routes_read_back_and_control_state_over_http() {
    let sim = default_sim().await;
    let c = client();
    post_ok(
        &sim,
        json!({"attributes": [{"external_id": "u/1", "a": 1}]}),
    )
    .await;
    let base = sim.base_url();
    let u: Value = c
        .get(format!("{base}/_sim/users/u%2F1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(u["a"], 1);
    let missing = c
        .get(format!("{base}/_sim/users/nobody"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let all: Value = c
        .get(format!("{base}/_sim/users"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(all.get("u/1").is_some());
    let stats: Value = c
        .get(format!("{base}/_sim/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["requests_total"], 1);
    assert_eq!(stats["by_status"]["201"], 1);
    let log: Value = c
        .get(format!("{base}/_sim/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log[0]["status"], 201);
    assert_eq!(log[0]["objects"], 1);

    let r = c
        .post(format!("{base}/_sim/faults"))
        .json(&json!({"error_5xx_share": 1.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = post(&sim, &json!({"attributes": [{"external_id": "v"}]})).await;
    assert!(r.status().is_server_error());
    let bad = c
        .post(format!("{base}/_sim/faults"))
        .json(&json!({"drop_share": 2.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    let r = c
        .post(format!("{base}/_sim/config"))
        .json(&json!({"api_key": KEY, "rate_limit_requests": 1, "rate_limit_window_ms": 60000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(sim.config().rate_limit_requests, 1);
    assert_eq!(sim.faults(), Faults::default());

    let r = c.post(format!("{base}/_sim/reset")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(sim.users().is_empty());
    assert_eq!(sim.stats().requests_total, 0);
    assert!(sim.requests().is_empty());
}

#[tokio::test]
async fn faults_never_apply_to_sim_routes() {
    let sim = sim(SimConfig {
        faults: Faults {
            drop_share: 1.0,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let r = client()
        .get(format!("{}/_sim/stats", sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let sim = default_sim().await;
    let url = sim.track_url();
    sim.shutdown().await;
    let r = client()
        .post(url)
        .bearer_auth(KEY)
        .json(&json!({"attributes": [{"external_id": "u"}]}))
        .send()
        .await;
    assert!(r.is_err());
}

async fn export(sim: &SimHandle, body: &Value) -> Response {
    client()
        .post(format!("{}/users/export/ids", sim.base_url()))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn export_ids_answers_braze_shape_within_its_own_rate_window() {
    let sim = sim(SimConfig {
        export_rate_limit_requests: 2,
        export_rate_limit_window: Duration::from_secs(60),
        ..SimConfig::default()
    })
    .await;
    let r = post(
        &sim,
        &json!({"attributes": [{"external_id": "u1", "first_name": "Ada", "tier": "gold"}]}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = export(&sim, &json!({"external_ids": ["u1", "nobody"]})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["users"][0]["external_id"], json!("u1"));
    assert_eq!(v["users"][0]["first_name"], json!("Ada"));
    assert_eq!(v["users"][0]["custom_attributes"], json!({"tier": "gold"}));
    assert_eq!(v["invalid_user_ids"], json!(["nobody"]));
    let ids: Vec<String> = (0..51).map(|i| i.to_string()).collect();
    let r = export(&sim, &json!({ "external_ids": ids })).await;
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "more than 50 identifiers"
    );
    let r = export(&sim, &json!({"external_ids": ["u1"]})).await;
    assert_eq!(
        r.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "third request in the window"
    );
    assert_eq!(r.headers()["x-ratelimit-limit"], "2");
    assert_eq!(sim.stats().export_rate_limited_429, 1);
    assert_eq!(
        sim.stats().requests_total,
        1,
        "/users/track's window is separate"
    );
}

#[tokio::test]
async fn errors_without_index_fault_drops_index_but_still_refuses_the_object() {
    let sim = default_sim().await;
    sim.set_faults(Faults {
        errors_without_index: true,
        ..Faults::default()
    })
    .unwrap();
    let v = post_ok(
        &sim,
        json!({"attributes": [
            {"external_id": "ok", "first_name": "A"},
            {"external_id": "bad", "email": "not-an-email"}
        ]}),
    )
    .await;
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].get("index").is_none(), "{v}");
    assert!(errors[0].get("input_array").is_none(), "{v}");
    assert!(errors[0]["type"].as_str().unwrap().contains("email"));
    assert_eq!(sim.users().keys().collect::<Vec<_>>(), vec!["ok"]);
    // Set over HTTP too.
    let r = client()
        .post(format!("{}/_sim/faults", sim.base_url()))
        .json(&json!({"errors_without_index": true, "strict_batch_400": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(sim.faults().strict_batch_400 && sim.faults().errors_without_index);
}

#[tokio::test]
async fn strict_batch_400_refuses_the_whole_request_for_one_invalid_object() {
    let sim = default_sim().await;
    sim.set_faults(Faults {
        strict_batch_400: true,
        ..Faults::default()
    })
    .unwrap();
    let r = post(
        &sim,
        &json!({"attributes": [
            {"external_id": "ok", "first_name": "A"},
            {"external_id": "bad", "email": "not-an-email"}
        ]}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["message"],
        "The value provided for the 'email' field is not a valid email."
    );
    assert_eq!(v["errors"][0]["index"], 1);
    assert!(sim.users().is_empty(), "nothing is applied");
    // A request of valid objects only is applied as usual.
    post_ok(
        &sim,
        json!({"attributes": [{"external_id": "ok", "first_name": "A"}]}),
    )
    .await;
    assert_eq!(sim.users().keys().collect::<Vec<_>>(), vec!["ok"]);
    // Both modes: the 400 names no object.
    sim.set_faults(Faults {
        strict_batch_400: true,
        errors_without_index: true,
        ..Faults::default()
    })
    .unwrap();
    let r = post(
        &sim,
        &json!({"attributes": [
            {"external_id": "ok2", "first_name": "A"},
            {"external_id": "bad", "email": "not-an-email"}
        ]}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert!(v["errors"][0].get("index").is_none(), "{v}");
    assert!(sim.user("ok2").is_none());
}

#[tokio::test]
async fn consent_errors_are_listed_per_object_and_good_groups_are_kept_per_id() {
    let sim = sim(SimConfig {
        subscription_groups: vec!["sg-news".into(), "sg-sms".into()],
        ..SimConfig::default()
    })
    .await;
    let group =
        |id: &str, state: &str| json!([{"subscription_group_id": id, "subscription_state": state}]);
    let v = post_ok(
        &sim,
        json!({"attributes": [
            {"external_id": "a", "subscription_groups": group("sg-gone", "subscribed")},
            {"external_id": "b", "subscription_groups": group("sg-news", "opted_in")},
            {"external_id": "c", "email_subscribe": "maybe"},
            {"external_id": "d", "email_subscribe": "unsubscribed",
             "subscription_groups": group("sg-news", "subscribed")},
        ]}),
    )
    .await;
    let kinds: Vec<(u64, &str)> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["index"].as_u64().unwrap(), e["type"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (0, "BAD_SUBSCRIPTION_GROUP_ID"),
            (1, "BAD_SUBSCRIPTION_GROUP_STATE"),
            (2, "BAD_EMAIL_SUBSCRIPTION_STATE"),
        ]
    );
    post_ok(
        &sim,
        json!({"attributes": [{"external_id": "d", "subscription_groups": group("sg-sms", "unsubscribed")}]}),
    )
    .await;
    let d = sim.user("d").unwrap();
    assert_eq!(d["email_subscribe"], "unsubscribed");
    assert_eq!(
        d["subscription_groups"],
        json!({"sg-news": "subscribed", "sg-sms": "unsubscribed"})
    );
}
