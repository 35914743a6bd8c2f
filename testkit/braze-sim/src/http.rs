//! HTTP side: the `/users/track` handler (faults, rate window, auth, content type, size, then
//! the contract), the `/_sim/*` read-back and control routes, and an accept loop that can close
//! a connection without answering (the "dropped connection" fault).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::config::SimConfig;
use crate::contract::{ObjectCounts, TrackOutcome};
use crate::faults::{FaultAction, Faults};
use crate::rate_window::Admission;
use crate::state::{Arrival, Disposition, RateHeaders, RequestLog, Shared};

type AppState = Arc<Shared>;

/// Marker on a response meaning "close the connection instead of sending this".
#[derive(Debug, Clone, Copy)]
struct DropConnection;

/// Error returned to hyper so it closes the connection without a response.
#[derive(Debug)]
struct DroppedByFault;

impl std::fmt::Display for DroppedByFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by injected fault")
    }
}

impl std::error::Error for DroppedByFault {}

/// Bodies larger than this are not even read (413 and the connection is closed).
const HARD_READ_CAP: usize = 64 * 1024 * 1024;

/// The simulator's routes.
pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/users/track", post(track))
        .route("/users/export/ids", post(export_ids))
        .route("/_sim/users", get(users))
        .route(
            "/_sim/users/{*key}",
            get(user).post(write_as_other).delete(delete_user),
        )
        .route("/_sim/events/{*key}", get(events))
        .route("/_sim/purchases/{*key}", get(purchases))
        .route("/_sim/stats", get(stats))
        .route("/_sim/requests", get(requests))
        .route("/_sim/reset", post(reset))
        .route("/_sim/faults", get(get_faults).post(set_faults))
        .route("/_sim/config", get(get_config).post(set_config))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Accepts connections until the task is aborted; aborting also closes every connection.
pub(crate) async fn serve(listener: TcpListener, router: Router) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(serve_connection(stream, router.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "braze-sim accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, router: Router) {
    let _ = stream.set_nodelay(true);
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let mut router = router.clone();
        async move {
            let resp = match tower_service::Service::call(&mut router, req.map(Body::new)).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            if resp.extensions().get::<DropConnection>().is_some() {
                Err(DroppedByFault)
            } else {
                Ok(resp)
            }
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
        .await;
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn rfc3339_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn with_rate_headers(resp: Response, a: &Admission) -> Response {
    with_headers(
        resp,
        &RateHeaders {
            admission: *a,
            now_ms: 0,
            retry_after_s: None,
            mau: false,
        },
    )
}

/// The standard set (`X-RateLimit-Limit/Remaining/Reset`, the reset in epoch seconds) or, for
/// an account on MAU pricing, `X-RateLimit-Reset` as seconds remaining and, on a 429,
/// `X-Ratelimit-Retry-After`.
fn with_headers(mut resp: Response, r: &RateHeaders) -> Response {
    let a = &r.admission;
    let h = resp.headers_mut();
    if r.mau {
        let remaining_s = (a.reset_epoch_secs * 1000)
            .saturating_sub(r.now_ms)
            .div_ceil(1000);
        h.insert("x-ratelimit-reset", HeaderValue::from(remaining_s));
        if let Some(s) = r.retry_after_s {
            h.insert("x-ratelimit-retry-after", HeaderValue::from(s));
        }
        return resp;
    }
    for (name, value) in [
        ("x-ratelimit-limit", a.limit),
        ("x-ratelimit-remaining", a.remaining),
        ("x-ratelimit-reset", a.reset_epoch_secs),
    ] {
        h.insert(name, HeaderValue::from(value));
    }
    resp
}

fn json_response(status: u16, body: &Value) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(body)).into_response()
}

/// Counts the objects of a body without validating it (for the log of refused requests).
fn count_objects(body: &[u8]) -> (ObjectCounts, Option<Value>) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return (ObjectCounts::default(), None);
    };
    let len = |k: &str| v.get(k).and_then(Value::as_array).map_or(0, Vec::len);
    let counts = ObjectCounts {
        attributes: len("attributes"),
        events: len("events"),
        purchases: len("purchases"),
    };
    (counts, Some(v))
}

fn bearer_key(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// The outcome of transport checks, before the contract runs.
enum Early {
    Respond(u16, Value, Disposition),
    Drop,
}

fn early_outcome(arrival: &Arrival, headers: &HeaderMap, body: Option<&[u8]>) -> Option<Early> {
    match arrival.fault.action {
        FaultAction::Drop => return Some(Early::Drop),
        FaultAction::ServerError(code) => {
            let msg = match code {
                502 => "Bad Gateway",
                503 => "Service Unavailable",
                _ => "Internal Server Error",
            };
            return Some(Early::Respond(
                code,
                json!({ "message": msg }),
                Disposition::ServerError,
            ));
        }
        FaultAction::Burst429 => {
            return Some(Early::Respond(
                429,
                json!({ "message": "Rate Limited" }),
                Disposition::Burst429,
            ));
        }
        FaultAction::None => {}
    }
    if !arrival.admission.allowed {
        let disposition = if arrival.hourly_refused {
            Disposition::HourlyLimited
        } else {
            Disposition::RateLimited
        };
        return Some(Early::Respond(
            429,
            json!({ "message": "Rate Limited" }),
            disposition,
        ));
    }
    let too_large = body.is_none_or(|b| b.len() > arrival.max_body_bytes);
    if too_large {
        return Some(Early::Respond(
            413,
            json!({ "message": "Request Entity Too Large" }),
            Disposition::TooLarge,
        ));
    }
    match bearer_key(headers) {
        Some(k) if k == arrival.api_key => {}
        other => {
            let shown = other.unwrap_or_default();
            return Some(Early::Respond(
                401,
                json!({ "message": format!("Invalid API key: {shown}") }),
                Disposition::Unauthorized,
            ));
        }
    }
    if arrival.key_lacks_users_track {
        return Some(Early::Respond(
            403,
            json!({ "message": "Access Denied" }),
            Disposition::Forbidden,
        ));
    }
    if !is_json(headers) {
        return Some(Early::Respond(
            415,
            json!({ "message": "Content-Type must be application/json" }),
            Disposition::UnsupportedMediaType,
        ));
    }
    None
}

async fn track(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let at = rfc3339_now();
    let read = axum::body::to_bytes(body, HARD_READ_CAP).await.ok();
    let arrival = state.lock().arrive(now_ms());
    if arrival.fault.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(arrival.fault.delay_ms)).await;
    }
    let body_bytes = read.as_ref().map_or_else(
        || {
            headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(HARD_READ_CAP + 1)
        },
        |b| b.len(),
    );
    let mut entry = RequestLog {
        seq: arrival.seq,
        at,
        status: None,
        disposition: Disposition::Dropped,
        objects: 0,
        received: ObjectCounts::default(),
        processed: 0,
        errors: 0,
        body_bytes,
        delay_ms: arrival.fault.delay_ms,
        body: None,
    };
    let parsed = read
        .as_deref()
        .filter(|b| b.len() <= arrival.max_body_bytes)
        .map(count_objects);
    if let Some((counts, value)) = parsed {
        entry.received = counts;
        entry.objects = counts.total();
        if arrival.log_bodies {
            entry.body = value;
        }
    }
    match early_outcome(&arrival, &headers, read.as_deref()) {
        Some(Early::Drop) => {
            state.lock().finish(entry, None);
            let mut resp = Response::new(Body::empty());
            resp.extensions_mut().insert(DropConnection);
            resp
        }
        Some(Early::Respond(status, body, disposition)) => {
            entry.status = Some(status);
            entry.disposition = disposition;
            state.lock().finish(entry, None);
            with_headers(json_response(status, &body), &arrival.headers)
        }
        None => {
            let bytes = read.unwrap_or_default();
            let outcome: TrackOutcome = {
                let mut s = state.lock();
                let outcome = s.track(&bytes, &arrival.limits);
                entry.status = Some(outcome.status);
                entry.disposition = match (outcome.status, outcome.errors.is_empty()) {
                    (201, true) => Disposition::Applied,
                    (201, false) => Disposition::AppliedWithErrors,
                    _ => Disposition::Invalid,
                };
                entry.processed = outcome.processed.total();
                entry.errors = outcome.errors.len();
                s.finish(entry, Some(&outcome));
                outcome
            };
            with_headers(
                json_response(outcome.status, &outcome.body),
                &arrival.headers,
            )
        }
    }
}

/// `POST /users/export/ids`: its own rate window (Braze: 250 requests per minute), the key,
/// at most 50 identifiers; answers Braze's export shape.
async fn export_ids(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let read = axum::body::to_bytes(body, HARD_READ_CAP).await.ok();
    let (admission, key) = state.lock().arrive_export(now_ms());
    if !admission.allowed {
        return with_rate_headers(
            json_response(429, &json!({ "message": "Rate Limited" })),
            &admission,
        );
    }
    if bearer_key(&headers) != Some(key.as_str()) {
        return with_rate_headers(
            json_response(401, &json!({ "message": "Invalid API key" })),
            &admission,
        );
    }
    let parsed: Option<Value> = read.as_deref().and_then(|b| serde_json::from_slice(b).ok());
    let answer = match parsed {
        Some(v) => state.lock().export_ids(&v),
        None => Err("body is not JSON".into()),
    };
    let resp = match answer {
        Ok(v) => json_response(201, &v),
        Err(m) => json_response(400, &json!({ "message": m })),
    };
    with_rate_headers(resp, &admission)
}

async fn users(State(state): State<AppState>) -> Response {
    axum::Json(state.lock().users()).into_response()
}

fn found<T: serde::Serialize>(v: Option<T>, key: &str) -> Response {
    match v {
        Some(v) => axum::Json(v).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({ "message": format!("no profile '{key}'") })),
        )
            .into_response(),
    }
}

async fn user(State(state): State<AppState>, Path(key): Path<String>) -> Response {
    found(state.lock().user(&key), &key)
}

/// Test-only: changes a profile as another writer would (body: the attributes to set, `null`
/// removes one).
async fn write_as_other(
    State(state): State<AppState>,
    Path(key): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let changes: serde_json::Map<String, Value> = match serde_json::from_slice(&body) {
        Ok(m) => m,
        Err(e) => return bad_request(format!("changes: {e}")),
    };
    let done = state.lock().write_as_other(&key, &changes);
    found(done.then_some(json!({ "message": "changed" })), &key)
}

/// Test-only: deletes a profile.
async fn delete_user(State(state): State<AppState>, Path(key): Path<String>) -> Response {
    let done = state.lock().delete_user(&key);
    found(done.then_some(json!({ "message": "deleted" })), &key)
}

async fn events(State(state): State<AppState>, Path(key): Path<String>) -> Response {
    found(state.lock().events(&key), &key)
}

async fn purchases(State(state): State<AppState>, Path(key): Path<String>) -> Response {
    found(state.lock().purchases(&key), &key)
}

async fn stats(State(state): State<AppState>) -> Response {
    axum::Json(state.lock().stats()).into_response()
}

async fn requests(State(state): State<AppState>) -> Response {
    axum::Json(state.lock().requests()).into_response()
}

async fn reset(State(state): State<AppState>) -> Response {
    state.lock().reset();
    axum::Json(json!({ "message": "reset" })).into_response()
}

async fn get_faults(State(state): State<AppState>) -> Response {
    axum::Json(state.lock().faults()).into_response()
}

fn bad_request(msg: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "message": msg })),
    )
        .into_response()
}

async fn set_faults(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let faults: Faults = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return bad_request(format!("faults: {e}")),
    };
    match state.lock().set_faults(faults) {
        Ok(()) => axum::Json(json!({ "message": "faults set" })).into_response(),
        Err(e) => bad_request(e.to_string()),
    }
}

async fn get_config(State(state): State<AppState>) -> Response {
    axum::Json(state.lock().cfg.clone()).into_response()
}

async fn set_config(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let cfg: SimConfig = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => return bad_request(format!("config: {e}")),
    };
    match state.lock().set_config(cfg) {
        Ok(()) => axum::Json(json!({ "message": "config set" })).into_response(),
        Err(e) => bad_request(e.to_string()),
    }
}
