//! The real HTTP client against a tiny local stub of `/users/track`: answers are classified
//! (2xx with `errors[]`, 429 with rate-limit headers, 5xx, 413, 401, timeouts, dropped
//! connections), and the API key never reaches logs, errors or the run report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use braze_sync::config::api_key::ApiKey;
use braze_sync::config::braze_endpoint::Endpoint;
use braze_sync::model::{AttributeChange, DeliveryOutcome, Identifier, RowPos, UserDelta};
use braze_sync::ops::report::{RunReport, RunStatus};
use braze_sync::send::braze::{BrazeApi, BrazeClient, ClientOptions, TrackError};
use braze_sync::send::deliver::{DeliverConfig, DeliverError, deliver};
use bytes::Bytes;
use serde_json::json;
use tokio::sync::mpsc;

const GOOD_KEY: &str = "braze-test-key-7f3c9a1e-SECRET";

/// A canned answer: status, headers, body.
type Canned = (u16, Vec<(&'static str, String)>, String);

#[derive(Default)]
struct Stub {
    script: Mutex<VecDeque<Canned>>,
    delay: Mutex<Duration>,
    bodies: Mutex<Vec<Bytes>>,
}

async fn track(State(s): State<Arc<Stub>>, headers: HeaderMap, body: Bytes) -> Response {
    s.bodies.lock().unwrap().push(body);
    let delay = *s.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if auth != format!("Bearer {GOOD_KEY}") {
        // Echo the presented key, as a careless server might: the client must scrub it.
        let presented = auth.trim_start_matches("Bearer ").to_string();
        return (
            StatusCode::UNAUTHORIZED,
            [("x-ratelimit-remaining", "2999")],
            json!({"message": format!("Invalid API key: {presented}")}).to_string(),
        )
            .into_response();
    }
    let next = s.script.lock().unwrap().pop_front();
    let (status, hdrs, text) = next.unwrap_or((
        201,
        vec![],
        json!({"message": "success", "attributes_processed": 1}).to_string(),
    ));
    let mut resp = (StatusCode::from_u16(status).unwrap(), text).into_response();
    for (k, v) in hdrs {
        resp.headers_mut().insert(k, v.parse().unwrap());
    }
    resp
}

async fn start_stub(stub: Arc<Stub>) -> SocketAddr {
    let app = Router::new()
        .route("/users/track", post(track))
        .with_state(stub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

fn client(addr: SocketAddr, key: &str, timeout: Duration) -> BrazeClient {
    BrazeClient::new(
        Endpoint::parse(&format!("http://{addr}")).unwrap(),
        ApiKey::new(key).unwrap(),
        &ClientOptions {
            request_timeout: timeout,
            ..Default::default()
        },
    )
    .unwrap()
}

fn delta(i: usize) -> UserDelta {
    UserDelta {
        identifier: Identifier::ExternalId(format!("u{i}")),
        pos: RowPos {
            source: "s3://exports/c.csv".into(),
            row: i as u64 + 1,
            line: None,
        },
        changes: vec![AttributeChange {
            name: "email".into(),
            value: json!(format!("u{i}@example.com")),
            fingerprint: None,
        }],
        update_existing_only: false,
        is_new: true,
        row_digest: None,
    }
}

fn body() -> Bytes {
    Bytes::from(
        json!({"attributes": [{"external_id": "1", "a": 1}, {"external_id": "2", "a": 2}]})
            .to_string(),
    )
}

#[tokio::test]
async fn real_answers_are_classified_with_their_rate_limit_headers() {
    let stub = Arc::new(Stub::default());
    let addr = start_stub(stub.clone()).await;
    let c = client(addr, GOOD_KEY, Duration::from_secs(5));
    let limits = vec![
        ("X-RateLimit-Limit", "3000".to_string()),
        ("X-RateLimit-Remaining", "0".to_string()),
        ("X-RateLimit-Reset", "1700000003".to_string()),
    ];
    stub.script.lock().unwrap().extend([
        (
            201,
            vec![("x-ratelimit-remaining", "2998".to_string())],
            json!({"message": "success", "errors": [{"type": "bad email", "input_array": "attributes", "index": 1}]}).to_string(),
        ),
        (429, limits, json!({"message": "Rate limit exceeded"}).to_string()),
        (502, vec![], "<html>Bad Gateway</html>".to_string()),
        (413, vec![], "Request Entity Too Large".to_string()),
        (400, vec![], json!({"message": "Max Input Length Exceeded"}).to_string()),
    ]);
    let r = c.track(body()).await.unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(r.errors[0].index, Some(1));
    assert_eq!(r.errors[0].message, "bad email");
    assert_eq!(r.rate.remaining, Some(2998));
    match c.track(body()).await {
        Err(TrackError::RateLimited { rate, .. }) => {
            assert_eq!(rate.limit, Some(3000));
            assert_eq!(rate.remaining, Some(0));
            assert_eq!(rate.reset, Some(1_700_000_003.0));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c.track(body()).await,
        Err(TrackError::Server { status: 502, .. })
    ));
    assert!(matches!(
        c.track(body()).await,
        Err(TrackError::PayloadTooLarge { .. })
    ));
    assert!(matches!(
        c.track(body()).await,
        Err(TrackError::Rejected { status: 400, .. })
    ));
    let sent = stub.bodies.lock().unwrap()[0].clone();
    assert_eq!(sent, body());
}

#[tokio::test]
async fn slow_answers_time_out_and_dropped_connections_are_connection_errors() {
    let stub = Arc::new(Stub::default());
    *stub.delay.lock().unwrap() = Duration::from_secs(5);
    let addr = start_stub(stub).await;
    let c = client(addr, GOOD_KEY, Duration::from_millis(200));
    assert!(matches!(
        c.track(body()).await,
        Err(TrackError::Timeout { .. })
    ));

    // A server that reads the request and hangs up without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut sock, &mut buf).await;
            drop(sock);
        }
    });
    let c = client(addr, GOOD_KEY, Duration::from_secs(5));
    assert!(matches!(
        c.track(body()).await,
        Err(TrackError::Connection { .. })
    ));
    // Nobody listening at all.
    let c = client(
        "127.0.0.1:1".parse().unwrap(),
        GOOD_KEY,
        Duration::from_secs(5),
    );
    assert!(matches!(
        c.track(body()).await,
        Err(TrackError::Connection { .. })
    ));
}

/// A log sink shared with the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_api_key_never_reaches_logs_errors_or_the_report() {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let stub = Arc::new(Stub::default());
    let addr = start_stub(stub.clone()).await;
    let wrong_key = "braze-wrong-key-0b9e-SECRET";
    let mut texts = Vec::new();

    // A good run (some partial errors and a retry on the way).
    stub.script.lock().unwrap().extend([
        (503, vec![], "down".to_string()),
        (
            201,
            vec![],
            json!({"message": "success", "errors": [{"type": "bad", "input_array": "attributes", "index": 0}]}).to_string(),
        ),
    ]);
    let good = client(addr, GOOD_KEY, Duration::from_secs(5));
    texts.push(format!("{good:?}"));
    let (stats, outcomes) = run_deliver(&good, 200).await;
    let stats = stats.unwrap();
    assert_eq!(stats.users_confirmed, 199);
    assert_eq!(stats.retries_by_cause.http_5xx, 1);
    texts.push(format!("{stats:?} {outcomes:?}"));

    // A wrong key: the server echoes it, the run stops after one request.
    let before = stub.bodies.lock().unwrap().len();
    let bad = client(addr, wrong_key, Duration::from_secs(5));
    let (result, outcomes) = run_deliver(&bad, 500).await;
    assert_eq!(
        stub.bodies.lock().unwrap().len(),
        before + 1,
        "exactly one request after a 401"
    );
    let err = result.unwrap_err();
    assert!(matches!(
        err,
        DeliverError::Unauthorized { status: 401, .. }
    ));
    let msg = err.to_string();
    assert!(
        msg.contains("users.track") && msg.contains("another Braze instance"),
        "{msg}"
    );
    // The server's echo of the key was scrubbed, not dropped.
    assert!(msg.contains("Invalid API key: ***"), "{msg}");
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, DeliveryOutcome::Unsent(_)))
    );
    texts.push(format!("{msg} {err:?} {outcomes:?}"));

    let mut report = RunReport::new("run-1", "customers");
    report.apply_delivery(err.stats());
    report.status = RunStatus::Failed;
    report.error = Some(msg);
    texts.push(String::from_utf8(report.to_json().to_vec()).unwrap());
    texts.push(report.emf_line(0));

    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logged.contains("Braze refused the API key"),
        "the stop is logged"
    );
    assert!(logged.lines().count() > 5, "trace-level logs were captured");
    texts.push(logged);
    for t in &texts {
        assert!(!t.contains(GOOD_KEY), "the good key leaked: {t}");
        assert!(!t.contains(wrong_key), "the wrong key leaked: {t}");
        assert!(!t.contains("SECRET"), "a key leaked: {t}");
    }
}

async fn run_deliver(
    api: &BrazeClient,
    n: usize,
) -> (
    Result<braze_sync::send::deliver::DeliveryStats, DeliverError>,
    Vec<DeliveryOutcome>,
) {
    let (tx, rx) = mpsc::channel(32);
    let (otx, mut orx) = mpsc::channel(32);
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
    let cfg = DeliverConfig {
        retry: braze_sync::send::retry::RetryPolicy {
            base_delay: Duration::from_millis(5),
            ..Default::default()
        },
        ..Default::default()
    };
    let result = deliver(rx, api, cfg, otx).await;
    producer.await.unwrap();
    (result, collector.await.unwrap())
}

/// Hands out a stored key, as Secrets Manager would after an operator fixed it.
struct StoredKey {
    key: Mutex<String>,
    reads: Mutex<u32>,
}

#[async_trait::async_trait]
impl braze_sync::config::api_key::KeyReread for StoredKey {
    async fn reread(&self) -> Result<ApiKey, braze_sync::config::api_key::ApiKeyError> {
        *self.reads.lock().unwrap() += 1;
        ApiKey::new(self.key.lock().unwrap().as_str())
    }
}

#[tokio::test]
async fn a_refused_key_is_read_again_once_and_a_changed_key_is_used_from_then_on() {
    let stub = Arc::new(Stub::default());
    let addr = start_stub(stub.clone()).await;
    let wrong_key = "braze-old-key-0b9e-SECRET";
    let store = Arc::new(StoredKey {
        key: Mutex::new(wrong_key.to_string()),
        reads: Mutex::new(0),
    });
    let c = client(addr, wrong_key, Duration::from_secs(5)).with_key_reread(store.clone());

    // Still the wrong key in the store: one request, one read, the refusal says so.
    let Err(TrackError::Unauthorized { status, message }) = c.track(body()).await else {
        panic!("an unchanged wrong key is refused")
    };
    assert_eq!(status, 401);
    assert!(
        message.contains("read again from its store and is unchanged"),
        "{message}"
    );
    assert!(!message.contains(wrong_key), "{message}");
    assert_eq!(stub.bodies.lock().unwrap().len(), 1);
    assert_eq!(*store.reads.lock().unwrap(), 1);

    // The operator fixes the key: the next refusal reads it, retries once and succeeds.
    *store.key.lock().unwrap() = GOOD_KEY.to_string();
    let r = c.track(body()).await.unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(stub.bodies.lock().unwrap().len(), 3, "refused + retried");
    assert_eq!(*store.reads.lock().unwrap(), 2);
    // From then on the new key goes out directly, without reading it again.
    c.track(body()).await.unwrap();
    assert_eq!(stub.bodies.lock().unwrap().len(), 4);
    assert_eq!(*store.reads.lock().unwrap(), 2);
    assert!(!format!("{c:?}").contains(GOOD_KEY));
}

#[tokio::test]
async fn without_a_store_to_read_from_a_refused_key_stops_after_one_request() {
    let stub = Arc::new(Stub::default());
    let addr = start_stub(stub.clone()).await;
    let c = client(addr, "braze-wrong-key-SECRET", Duration::from_secs(5));
    assert!(matches!(
        c.track(body()).await,
        Err(TrackError::Unauthorized { status: 401, .. })
    ));
    assert_eq!(stub.bodies.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn json_log_lines_never_carry_two_message_keys() {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = bridge_shared::logging::json_subscriber(
        tracing_subscriber::EnvFilter::new("trace"),
        move || sink.clone(),
    );
    let _guard = tracing::subscriber::set_default(subscriber);

    let stub = Arc::new(Stub::default());
    let addr = start_stub(stub.clone()).await;
    // Every answer the sender logs about: a partial failure, a whole-request 400 (bisected
    // down to one object, then rejected), an unconfirmed 2xx, a 5xx retry, a refused key.
    stub.script.lock().unwrap().extend([
        (503, vec![], "down".to_string()),
        (
            201,
            vec![],
            json!({"message": "success", "errors": [{"type": "bad", "input_array": "attributes", "index": 0}]}).to_string(),
        ),
        (
            201,
            vec![],
            json!({"message": "success", "errors": [{"type": "no index"}]}).to_string(),
        ),
        (200, vec![], "<html>ok</html>".to_string()),
    ]);
    let good = client(addr, GOOD_KEY, Duration::from_secs(5));
    let (stats, _) = run_deliver(&good, 200).await;
    let stats = stats.unwrap();
    assert!(
        stats.braze_rejected >= 1 && stats.users_unconfirmed >= 1,
        "{stats:?}"
    );
    // A 400 for a request of ten (bisected, then accepted), then for a request of one.
    for n in [10, 1] {
        stub.script.lock().unwrap().push_back((
            400,
            vec![],
            json!({"message": "bad object"}).to_string(),
        ));
        let (stats, _) = run_deliver(&good, n).await;
        assert!(stats.is_ok());
    }
    let bad = client(addr, "braze-wrong-key-SECRET", Duration::from_secs(5));
    let (result, _) = run_deliver(&bad, 10).await;
    assert!(result.is_err());

    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logged.contains("Braze refused a batch"), "{logged}");
    assert!(logged.contains("bisecting it"), "{logged}");
    assert!(logged.contains("Braze refused the API key"), "{logged}");
    assert!(logged.contains("confirms nothing"), "{logged}");
    for line in logged.lines() {
        let repeated = bridge_shared::logging::repeated_keys(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(repeated.is_empty(), "{repeated:?} repeated in {line}");
    }
}
