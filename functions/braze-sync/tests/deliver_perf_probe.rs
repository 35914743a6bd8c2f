//! TEMPORARY perf probe (to be deleted): deliver against a stub with a fixed 3,000/3 s window.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use braze_sync::braze::{ApiKey, BrazeClient, ClientOptions, Endpoint};
use braze_sync::deliver::{DeliverConfig, deliver};
use braze_sync::model::{AttributeChange, Identifier, RowPos, UserDelta};
use bytes::Bytes;
use rand::Rng;
use serde_json::json;
use tokio::sync::mpsc;

#[derive(Default)]
struct Win { count: AtomicU64, window: AtomicU64, total: AtomicU64, r429: AtomicU64 }

async fn track(State(s): State<Arc<Win>>, body: Bytes) -> Response {
    let _v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let lat = rand::rng().random_range(20..80);
    tokio::time::sleep(Duration::from_millis(lat)).await;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let w = now / 3;
    if s.window.swap(w, Ordering::SeqCst) != w { s.count.store(0, Ordering::SeqCst); }
    let c = s.count.fetch_add(1, Ordering::SeqCst) + 1;
    s.total.fetch_add(1, Ordering::SeqCst);
    let reset = (w + 1) * 3;
    let remaining = 3000u64.saturating_sub(c);
    let hdrs = [("x-ratelimit-limit", "3000".to_string()), ("x-ratelimit-remaining", remaining.to_string()), ("x-ratelimit-reset", reset.to_string())];
    if c > 3000 {
        s.r429.fetch_add(1, Ordering::SeqCst);
        let mut r = (StatusCode::TOO_MANY_REQUESTS, "{\"message\":\"rate\"}").into_response();
        for (k, v) in hdrs { r.headers_mut().insert(k, v.parse().unwrap()); }
        return r;
    }
    let mut r = (StatusCode::CREATED, "{\"message\":\"success\"}").into_response();
    for (k, v) in hdrs { r.headers_mut().insert(k, v.parse().unwrap()); }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn perf_probe() {
    let n: usize = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(150_000);
    let st = Arc::new(Win::default());
    let app = Router::new().route("/users/track", post(track)).with_state(st.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let c = BrazeClient::new(Endpoint::parse(&format!("http://{addr}")).unwrap(), ApiKey::new("k").unwrap(), &ClientOptions::default()).unwrap();
    let (tx, rx) = mpsc::channel(1024);
    let (otx, mut orx) = mpsc::channel(1024);
    tokio::spawn(async move {
        for i in 0..n {
            let d = UserDelta { identifier: Identifier::ExternalId(format!("user-{i}")), pos: RowPos { source: "s3://b/k".into(), row: i as u64, line: None },
                changes: vec![AttributeChange { name: "first_name".into(), value: json!("Ada"), fingerprint: None }, AttributeChange { name: "ltv".into(), value: json!(i as f64 * 1.5), fingerprint: None }],
                update_existing_only: true, is_new: false };
            if tx.send(d).await.is_err() { break; }
        }
    });
    tokio::spawn(async move { let mut k = 0u64; while orx.recv().await.is_some() { k += 1; } k });
    let t = Instant::now();
    let stats = deliver(rx, &c, DeliverConfig::default(), otx).await.unwrap();
    let wall = t.elapsed().as_secs_f64();
    let reqs = n.div_ceil(75) as f64;
    println!("wall {wall:.2}s floor {:.2}s ratio {:.3} requests {} 429 {} srv_total {} srv_429 {}", reqs / 1000.0, wall / (reqs / 1000.0), stats.requests, stats.http_429, st.total.load(Ordering::SeqCst), st.r429.load(Ordering::SeqCst));
}
