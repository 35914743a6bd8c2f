//! The HTTP side of `POST /users/track`: one pooled, HTTP/2-capable `reqwest` client built once
//! per container, and a classification of every answer (accepted with per-object `errors[]`,
//! rate limited, server error, too large, refused key, other client error, timeout, dropped
//! connection) together with the `X-RateLimit-*` headers. The API key only ever goes into a
//! sensitive header; messages taken from responses are scrubbed of it. On a 401/403 the key is
//! read again from its store once ([`KeyReread`], bypassing the per-container cache); when it
//! changed, the request is retried once with the new key, which then serves later requests.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde::Deserialize;
use tracing::{info, warn};

use super::{BrazeApi, ItemError, RateLimitInfo, TrackError, TrackResponse};
use crate::config::api_key::{ApiKey, KeyReread};
use crate::config::braze_endpoint::Endpoint;

/// Longest message kept from a response body.
const MAX_MESSAGE_CHARS: usize = 500;

/// Transport settings of the Braze client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Whole-request timeout (connect, send, wait, read). A timed-out request is retried.
    pub request_timeout: Duration,
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// `User-Agent` header.
    pub user_agent: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(60),
            user_agent: concat!(
                "amperity-braze-bridge/braze-sync/",
                env!("CARGO_PKG_VERSION")
            )
            .to_string(),
        }
    }
}

/// The client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    /// `reqwest` refused the settings (TLS backend, ...).
    #[error("building the Braze HTTP client failed: {0}")]
    Http(String),
    /// The key cannot be put into a header.
    #[error("the Braze API key cannot be used in an Authorization header")]
    KeyNotAHeaderValue,
}

/// The key in use and its header; `generation` counts replacements.
#[derive(Clone)]
struct CurrentKey {
    key: ApiKey,
    auth: HeaderValue,
    generation: u64,
}

impl CurrentKey {
    fn new(key: ApiKey, generation: u64) -> Result<Self, ClientBuildError> {
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
            .map_err(|_| ClientBuildError::KeyNotAHeaderValue)?;
        auth.set_sensitive(true);
        Ok(Self {
            key,
            auth,
            generation,
        })
    }
}

/// `POST /users/track` against one endpoint with one key (replaced when a refused key is read
/// again and found changed).
#[derive(Clone)]
pub struct BrazeClient {
    http: reqwest::Client,
    endpoint: Endpoint,
    track_url: String,
    current: Arc<RwLock<CurrentKey>>,
    reread: Option<Arc<dyn KeyReread>>,
    reread_lock: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for BrazeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrazeClient")
            .field("endpoint", &self.endpoint.to_string())
            .field("key", &self.key())
            .field("rereads_key", &self.reread.is_some())
            .finish()
    }
}

impl BrazeClient {
    /// Builds the pooled HTTP client (rustls, HTTP/2 by ALPN, keep-alive) and the client. Call
    /// once per container.
    pub fn new(
        endpoint: Endpoint,
        key: ApiKey,
        opts: &ClientOptions,
    ) -> Result<Self, ClientBuildError> {
        let http = reqwest::Client::builder()
            .user_agent(opts.user_agent.clone())
            .timeout(opts.request_timeout)
            .connect_timeout(opts.connect_timeout)
            .pool_idle_timeout(opts.pool_idle_timeout)
            .tcp_nodelay(true)
            .tcp_keepalive(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ClientBuildError::Http(e.to_string()))?;
        Self::with_http_client(http, endpoint, key)
    }

    /// Uses an existing `reqwest::Client` (one per container).
    pub fn with_http_client(
        http: reqwest::Client,
        endpoint: Endpoint,
        key: ApiKey,
    ) -> Result<Self, ClientBuildError> {
        Ok(Self {
            track_url: endpoint.track_url(),
            http,
            endpoint,
            current: Arc::new(RwLock::new(CurrentKey::new(key, 0)?)),
            reread: None,
            reread_lock: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// On a 401/403, read the key again through `reread` (once per refusal) and retry the
    /// request once if it changed.
    pub fn with_key_reread(mut self, reread: Arc<dyn KeyReread>) -> Self {
        self.reread = Some(reread);
        self
    }

    fn snapshot(&self) -> CurrentKey {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn key(&self) -> ApiKey {
        self.snapshot().key
    }

    /// Reads the key again after a refusal of the key of `generation`. Returns the key to
    /// retry with, or why there is none (unchanged, or the store failed).
    async fn refresh_after_refusal(&self, generation: u64) -> Result<CurrentKey, String> {
        let Some(reread) = &self.reread else {
            return Err("the key has no store to be read again from".into());
        };
        let _one_at_a_time = self.reread_lock.lock().await;
        let now = self.snapshot();
        if now.generation != generation {
            // Another request already replaced the refused key.
            return Ok(now);
        }
        let fresh = reread
            .reread()
            .await
            .map_err(|e| format!("reading it again failed: {e}"))?;
        if fresh == now.key {
            return Err("it was read again from its store and is unchanged".into());
        }
        let next = CurrentKey::new(fresh, generation + 1)
            .map_err(|e| format!("the key read again is unusable: {e}"))?;
        match self.current.write() {
            Ok(mut c) => *c = next.clone(),
            Err(p) => *p.into_inner() = next.clone(),
        }
        info!(
            generation = next.generation,
            "Braze refused the API key; a changed key was read from its store and replaces it."
        );
        Ok(next)
    }

    async fn send(&self, current: &CurrentKey, body: Bytes) -> Result<TrackResponse, TrackError> {
        let sent = self
            .http
            .post(&self.track_url)
            .header(AUTHORIZATION, current.auth.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => return Err(transport_error(&e, &current.key)),
        };
        let status = resp.status();
        let rate = rate_limit_info(resp.headers());
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return Err(transport_error(&e, &current.key)),
        };
        classify(
            status,
            rate,
            &bytes,
            |t| scrub_key(t, &current.key),
            self.endpoint.host(),
        )
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

#[async_trait]
impl BrazeApi for BrazeClient {
    async fn track(&self, body: Bytes) -> Result<TrackResponse, TrackError> {
        let current = self.snapshot();
        let answer = self.send(&current, body.clone()).await;
        let Err(TrackError::Unauthorized { status, message }) = answer else {
            return answer;
        };
        if self.reread.is_none() {
            return Err(TrackError::Unauthorized { status, message });
        }
        match self.refresh_after_refusal(current.generation).await {
            Ok(next) => self.send(&next, body).await,
            Err(why) => {
                warn!(status, why = %why, "Braze refused the API key and no other key is stored.");
                Err(TrackError::Unauthorized {
                    status,
                    message: format!("{message} (the key {why})"),
                })
            }
        }
    }

    fn describe(&self) -> String {
        self.endpoint.to_string()
    }
}

/// `POST /users/export/ids`, for adoption's verify sample and the drift audit: external ids
/// and aliases in one request, a Braze id per request (the endpoint takes one), with
/// `fields_to_export` when fields are given. A 429 waits as the answer says
/// (`X-Ratelimit-Retry-After`, `Retry-After` or the reset, else 5 s) and tries again, up to 20
/// times.
#[async_trait]
impl super::UserLookup for BrazeClient {
    async fn export_ids(
        &self,
        ids: &[crate::model::Identifier],
    ) -> Result<Vec<serde_json::Value>, super::LookupError> {
        self.export_fields(ids, &[]).await
    }

    async fn export_fields(
        &self,
        ids: &[crate::model::Identifier],
        fields: &[String],
    ) -> Result<Vec<serde_json::Value>, super::LookupError> {
        use crate::model::Identifier;
        use serde_json::{Value, json};
        let url = format!(
            "{}/users/export/ids",
            self.endpoint.base().trim_end_matches('/')
        );
        let mut bodies = Vec::new();
        let external: Vec<&str> = ids
            .iter()
            .filter_map(|i| match i {
                Identifier::ExternalId(e) => Some(e.as_str()),
                _ => None,
            })
            .collect();
        let aliases: Vec<Value> = ids
            .iter()
            .filter_map(|i| match i {
                Identifier::UserAlias { name, label } => {
                    Some(json!({"alias_name": name, "alias_label": label}))
                }
                _ => None,
            })
            .collect();
        if !external.is_empty() || !aliases.is_empty() {
            bodies.push(json!({"external_ids": external, "user_aliases": aliases}));
        }
        for i in ids {
            if let Identifier::BrazeId(b) = i {
                bodies.push(json!({ "braze_id": b }));
            }
        }
        if !fields.is_empty() {
            for b in &mut bodies {
                b["fields_to_export"] = json!(fields);
            }
        }
        let current = self.snapshot();
        let scrub = |t: &str| scrub_key(t, &current.key);
        let mut users = Vec::new();
        for body in bodies {
            let mut tries = 0;
            loop {
                tries += 1;
                let resp = self
                    .http
                    .post(&url)
                    .header(AUTHORIZATION, current.auth.clone())
                    .header(CONTENT_TYPE, "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .map_err(|e| {
                        super::LookupError(scrub(&transport_error(&e, &current.key).to_string()))
                    })?;
                let status = resp.status();
                let rate = rate_limit_info(resp.headers());
                let text = resp.text().await.unwrap_or_default();
                if status == StatusCode::TOO_MANY_REQUESTS && tries < 20 {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(0.0);
                    let wait = rate.retry_in(now).unwrap_or(Duration::from_secs(5));
                    tokio::time::sleep(wait.min(Duration::from_secs(60))).await;
                    continue;
                }
                if !status.is_success() {
                    let shown: String = scrub(&text).chars().take(MAX_MESSAGE_CHARS).collect();
                    return Err(super::LookupError(format!(
                        "{} answered {status}: {shown}",
                        self.endpoint.host()
                    )));
                }
                let v: Value = serde_json::from_str(&text)
                    .map_err(|e| super::LookupError(format!("the answer is not JSON: {e}")))?;
                users.extend(
                    v.get("users")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default(),
                );
                break;
            }
        }
        Ok(users)
    }
}

/// A transport failure as a retryable [`TrackError`].
fn transport_error(e: &reqwest::Error, key: &ApiKey) -> TrackError {
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    let detail = scrub_key(&detail, key);
    if e.is_timeout() {
        TrackError::Timeout { detail }
    } else {
        TrackError::Connection { detail }
    }
}

fn scrub_key(text: &str, key: &ApiKey) -> String {
    if key.expose().is_empty() {
        text.to_string()
    } else {
        text.replace(key.expose(), "***")
    }
}

/// Reads `X-RateLimit-Limit/Remaining/Reset` and the wait after a 429: `Retry-After`, or
/// `X-Ratelimit-Retry-After` (seconds), which accounts on MAU pricing send instead of the
/// `X-RateLimit-*` set. Header names are case-insensitive.
pub fn rate_limit_info(headers: &HeaderMap) -> RateLimitInfo {
    let num = |name: &str| -> Option<f64> {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    RateLimitInfo {
        limit: num("x-ratelimit-limit").map(|v| v as u64),
        remaining: num("x-ratelimit-remaining").map(|v| v as u64),
        reset: num("x-ratelimit-reset"),
        retry_after_s: num("x-ratelimit-retry-after").or_else(|| num("retry-after")),
    }
}

#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    errors: Option<Vec<serde_json::Value>>,
}

/// Classifies one response (pure; `scrub` removes the key from messages).
pub fn classify(
    status: StatusCode,
    rate: RateLimitInfo,
    body: &[u8],
    scrub: impl Fn(&str) -> String,
    host: &str,
) -> Result<TrackResponse, TrackError> {
    let parsed: Option<Body> = serde_json::from_slice(body).ok();
    let message = match &parsed {
        Some(Body {
            message: Some(m), ..
        }) => scrub(&truncate(m)),
        _ => scrub(&truncate(&String::from_utf8_lossy(body))),
    };
    let errors: Vec<ItemError> = parsed
        .as_ref()
        .and_then(|b| b.errors.as_ref())
        .map(|es| es.iter().map(|e| item_error(e, &scrub)).collect())
        .unwrap_or_default();
    let code = status.as_u16();
    // Braze always answers `{"message": ...}`; a 2xx without it (a proxy's page, an empty or
    // cut body) confirms nothing.
    let braze_json = matches!(
        &parsed,
        Some(Body {
            message: Some(_),
            ..
        })
    );
    if status.is_success() && !braze_json {
        return Err(TrackError::Unconfirmed {
            status: code,
            message,
        });
    }
    if status.is_success() {
        return Ok(TrackResponse {
            status: code,
            message,
            errors,
            rate,
        });
    }
    Err(match code {
        429 => TrackError::RateLimited { message, rate },
        413 => TrackError::PayloadTooLarge { message, rate },
        401 | 403 => TrackError::Unauthorized {
            status: code,
            message: format!(
                "Braze refused the API key at {host} (HTTP {code} {message}): the key is \
                 invalid, lacks the users.track permission, or belongs to another Braze \
                 instance (check the instance / REST endpoint setting)"
            ),
        },
        500..=599 => TrackError::Server {
            status: code,
            message,
            rate,
        },
        408 => TrackError::Timeout {
            detail: format!("HTTP 408 {message}"),
        },
        _ => TrackError::Rejected {
            status: code,
            message,
            errors,
            rate,
        },
    })
}

fn item_error(v: &serde_json::Value, scrub: &impl Fn(&str) -> String) -> ItemError {
    let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let index = v.get("index").and_then(|i| {
        i.as_u64()
            .or_else(|| i.as_str().and_then(|s| s.parse().ok()))
    });
    let message = text("type")
        .or_else(|| text("message"))
        .unwrap_or_else(|| v.to_string());
    let message = match consent_error(&message) {
        Some(why) => format!("{message}: {why}"),
        None => message,
    };
    ItemError {
        index: index.map(|i| i as usize),
        input_array: text("input_array"),
        message: scrub(&truncate(&message)),
    }
}

/// What Braze's consent error codes mean for a route, so a reject says what to fix.
fn consent_error(code: &str) -> Option<&'static str> {
    const MEANINGS: [(&str, &str); 3] = [
        (
            "bad_subscription_group_id",
            "the workspace has no subscription group with an id of the route's [subscription_groups]",
        ),
        (
            "bad_subscription_group_state",
            "a subscription group state other than subscribed or unsubscribed",
        ),
        (
            "bad_email_subscription_state",
            "an email_subscribe other than opted_in, subscribed or unsubscribed",
        ),
    ];
    MEANINGS
        .iter()
        .find(|(c, _)| c.eq_ignore_ascii_case(code))
        .map(|(_, why)| *why)
}

fn truncate(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() <= MAX_MESSAGE_CHARS {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(MAX_MESSAGE_CHARS).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn no_scrub(s: &str) -> String {
        s.to_string()
    }

    #[test]
    fn rate_limit_headers_are_read_in_any_case() {
        let mut h = HeaderMap::new();
        h.insert("X-RateLimit-Limit", HeaderValue::from_static("3000"));
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("2999"));
        h.insert("X-RATELIMIT-RESET", HeaderValue::from_static("1700000003"));
        let r = rate_limit_info(&h);
        assert_eq!(r.limit, Some(3000));
        assert_eq!(r.remaining, Some(2999));
        assert_eq!(r.reset, Some(1_700_000_003.0));
    }

    #[test]
    fn mau_retry_after_header_sets_the_wait_after_a_429() {
        // Accounts on MAU pricing: no X-RateLimit-Limit/Remaining, the reset as seconds
        // remaining, and X-Ratelimit-Retry-After.
        let mut h = HeaderMap::new();
        h.insert("X-Ratelimit-Retry-After", HeaderValue::from_static("7"));
        h.insert("X-RateLimit-Reset", HeaderValue::from_static("2"));
        let r = rate_limit_info(&h);
        assert_eq!(r.limit, None);
        assert_eq!(r.retry_after_s, Some(7.0));
        assert_eq!(r.retry_in(1_700_000_000.0), Some(Duration::from_secs(7)));
        // Only the MAU header: it alone says how long to wait.
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-retry-after", HeaderValue::from_static("1.5"));
        assert_eq!(
            rate_limit_info(&h).retry_in(1_700_000_000.0),
            Some(Duration::from_millis(1500))
        );
        // A plain Retry-After still counts; the MAU header wins when both are sent.
        let mut h = HeaderMap::new();
        h.insert("Retry-After", HeaderValue::from_static("3"));
        assert_eq!(rate_limit_info(&h).retry_after_s, Some(3.0));
        h.insert("X-Ratelimit-Retry-After", HeaderValue::from_static("9"));
        assert_eq!(rate_limit_info(&h).retry_after_s, Some(9.0));
    }

    #[test]
    fn consent_codes_say_what_to_fix() {
        // Braze's code in upper case, as it sends it.
        let code = "bad_subscription_group_id".to_uppercase();
        let body = format!(
            r#"{{"message":"success","errors":[{{"type":"{code}","input_array":"attributes","index":0}}]}}"#
        );
        let r = classify(
            StatusCode::CREATED,
            RateLimitInfo::default(),
            body.as_bytes(),
            no_scrub,
            "h",
        )
        .unwrap();
        let want = format!("{code}: the workspace has no subscription group");
        assert!(
            r.errors[0].message.starts_with(&want),
            "{}",
            r.errors[0].message
        );
    }

    #[test]
    fn success_with_errors_lists_each_index_and_message() {
        let body = br#"{"message":"success","attributes_processed":1,"errors":[{"type":"'external_id' or 'braze_id' or 'user_alias' is required","input_array":"attributes","index":1}]}"#;
        let r = classify(
            StatusCode::CREATED,
            RateLimitInfo::default(),
            body,
            no_scrub,
            "h",
        )
        .unwrap();
        assert_eq!(r.errors.len(), 1);
        assert_eq!(r.errors[0].index, Some(1));
        assert_eq!(r.errors[0].input_array.as_deref(), Some("attributes"));
        assert!(r.errors[0].message.contains("is required"));
    }

    #[test]
    fn a_2xx_that_is_not_braze_json_is_unconfirmed() {
        let c = |s: u16, body: &[u8]| {
            classify(
                StatusCode::from_u16(s).unwrap(),
                RateLimitInfo::default(),
                body,
                no_scrub,
                "h",
            )
        };
        for body in [
            &b"<html>OK</html>"[..],
            b"",
            b"{\"attributes_processed\": 1}",
            b"[1]",
            b"{\"message\": \"succ",
        ] {
            assert!(
                matches!(
                    c(201, body),
                    Err(TrackError::Unconfirmed { status: 201, .. })
                ),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(c(200, br#"{"message":"success"}"#).is_ok());
    }

    #[test]
    fn statuses_are_classified() {
        let c = |s: u16, body: &[u8]| {
            classify(
                StatusCode::from_u16(s).unwrap(),
                RateLimitInfo::default(),
                body,
                no_scrub,
                "rest.iad-03.braze.com",
            )
        };
        assert!(matches!(c(429, b"{}"), Err(TrackError::RateLimited { .. })));
        assert!(matches!(
            c(413, b""),
            Err(TrackError::PayloadTooLarge { .. })
        ));
        assert!(matches!(
            c(502, b"<html>bad gateway</html>"),
            Err(TrackError::Server { status: 502, .. })
        ));
        assert!(matches!(
            c(400, b"{\"message\":\"x\"}"),
            Err(TrackError::Rejected { status: 400, .. })
        ));
        assert!(matches!(
            c(404, b""),
            Err(TrackError::Rejected { status: 404, .. })
        ));
        let Err(TrackError::Unauthorized { message, .. }) =
            c(401, b"{\"message\":\"Invalid API Key\"}")
        else {
            panic!("401 must be Unauthorized")
        };
        assert!(message.contains("users.track"));
        assert!(message.contains("another Braze instance"));
        assert!(message.contains("rest.iad-03.braze.com"));
        assert!(matches!(
            c(403, b""),
            Err(TrackError::Unauthorized { status: 403, .. })
        ));
    }

    #[test]
    fn messages_from_responses_are_scrubbed_of_the_key() {
        let key = ApiKey::new("sekrit-key-123").unwrap();
        let r = classify(
            StatusCode::UNAUTHORIZED,
            RateLimitInfo::default(),
            br#"{"message":"Invalid API key: sekrit-key-123"}"#,
            |t| scrub_key(t, &key),
            "h",
        );
        let msg = format!("{:?} {}", r, r.as_ref().unwrap_err());
        assert!(!msg.contains("sekrit-key-123"), "{msg}");
    }

    #[test]
    fn client_debug_hides_the_key() {
        let c = BrazeClient::new(
            Endpoint::parse("http://127.0.0.1:1").unwrap(),
            ApiKey::new("sekrit-key-456").unwrap(),
            &ClientOptions::default(),
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("sekrit-key-456"));
    }
}
