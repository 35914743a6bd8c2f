//! Talking to Braze: the `POST /users/track` call with its answers classified ([`client`]),
//! and `POST /users/export/ids` for adoption ([`UserLookup`]). Where Braze is and with which
//! key come from the configuration ([`crate::config::braze_endpoint`],
//! [`crate::config::api_key`]). The sender depends only on the [`BrazeApi`] trait, so tests can
//! put a fake in its place.

pub mod client;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::Value;

use crate::model::Identifier;

pub use client::{BrazeClient, ClientBuildError, ClientOptions};

/// `POST /users/track`, as the sender sees it.
#[async_trait]
pub trait BrazeApi: Send + Sync {
    /// Sends one request body (`{"attributes":[...]}`) and classifies the answer.
    async fn track(&self, body: Bytes) -> Result<TrackResponse, TrackError>;

    /// Where requests go, for messages (`https://rest.iad-03.braze.com (US-03)`). Never the key.
    fn describe(&self) -> String {
        "Braze".to_string()
    }
}

/// Identifiers per `/users/export/ids` call (Braze's limit).
pub const EXPORT_IDS_BATCH: usize = 50;

/// Reads profiles back from Braze.
#[async_trait]
pub trait UserLookup: Send + Sync {
    /// The profiles of up to [`EXPORT_IDS_BATCH`] users, in Braze's export shape (standard
    /// fields at the top level, custom attributes under `custom_attributes`); users Braze does
    /// not know are simply absent.
    async fn export_ids(&self, ids: &[Identifier]) -> Result<Vec<Value>, LookupError>;

    /// [`UserLookup::export_ids`] asking only for `fields` (`fields_to_export`: standard field
    /// names, `custom_attributes`, the identifiers). By default every field.
    async fn export_fields(
        &self,
        ids: &[Identifier],
        fields: &[String],
    ) -> Result<Vec<Value>, LookupError> {
        let _ = fields;
        self.export_ids(ids).await
    }
}

/// `/users/export/ids` failed.
#[derive(Debug, thiserror::Error)]
#[error("POST /users/export/ids: {0}")]
pub struct LookupError(pub String);

/// The `X-RateLimit-*` (and `Retry-After` / `X-Ratelimit-Retry-After`) headers of one
/// response; absent headers are `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateLimitInfo {
    /// `X-RateLimit-Limit`: requests allowed in the window.
    pub limit: Option<u64>,
    /// `X-RateLimit-Remaining`: requests left in the current window.
    pub remaining: Option<u64>,
    /// `X-RateLimit-Reset` as sent: UTC epoch seconds per Braze's docs (a value below 10^9 is
    /// read as seconds from now, as accounts on MAU pricing send it).
    pub reset: Option<f64>,
    /// Seconds to wait after a 429: `X-Ratelimit-Retry-After` (accounts on MAU pricing send it
    /// in place of the `X-RateLimit-*` set) or, when a proxy sends it, `Retry-After`.
    pub retry_after_s: Option<f64>,
}

impl RateLimitInfo {
    /// Time until the window resets, given the current UTC epoch time in seconds. `None` when
    /// the server said nothing usable; zero when the reset is already past.
    pub fn reset_in(&self, now_epoch_s: f64) -> Option<Duration> {
        let secs = match (self.reset, self.retry_after_s) {
            (Some(r), _) if r >= 1e9 => r - now_epoch_s,
            (Some(r), _) => r,
            (None, Some(ra)) => ra,
            (None, None) => return None,
        };
        Some(Duration::from_secs_f64(secs.clamp(0.0, 86_400.0)))
    }

    /// How long to wait before sending again after a 429: `Retry-After` when the server sent
    /// one (its explicit instruction, often finer than the whole-second reset), else the time
    /// until the reset.
    pub fn retry_in(&self, now_epoch_s: f64) -> Option<Duration> {
        match self.retry_after_s {
            Some(ra) if ra.is_finite() && ra >= 0.0 => {
                Some(Duration::from_secs_f64(ra.min(86_400.0)))
            }
            _ => self.reset_in(now_epoch_s),
        }
    }
}

/// One entry of `errors[]` in a Braze response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemError {
    /// 0-based position in the array named by `input_array`.
    pub index: Option<usize>,
    /// `attributes`, `events` or `purchases`.
    pub input_array: Option<String>,
    /// Braze's text (`type`, or `message`).
    pub message: String,
}

/// A 2xx answer: the request was accepted, except the objects listed in `errors`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackResponse {
    /// HTTP status (201 from Braze).
    pub status: u16,
    /// `message` (`success`).
    pub message: String,
    /// Objects Braze refused (a partial failure).
    pub errors: Vec<ItemError>,
    /// Rate-limit headers.
    pub rate: RateLimitInfo,
}

/// A request that did not get a 2xx. Messages never contain the API key.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TrackError {
    /// 429: over the rate limit; retry after the reset.
    #[error("Braze rate limited the request (HTTP 429): {message}")]
    RateLimited {
        /// Braze's message.
        message: String,
        /// Rate-limit headers (the reset time).
        rate: RateLimitInfo,
    },
    /// 5xx: retry with backoff.
    #[error("Braze server error (HTTP {status}): {message}")]
    Server {
        /// Status.
        status: u16,
        /// Body text.
        message: String,
        /// Rate-limit headers.
        rate: RateLimitInfo,
    },
    /// 413: the body is over Braze's 4 MB limit; split and resend.
    #[error("Braze refused the request as too large (HTTP 413): {message}")]
    PayloadTooLarge {
        /// Body text.
        message: String,
        /// Rate-limit headers.
        rate: RateLimitInfo,
    },
    /// 401/403: the key is wrong, lacks `users.track`, or belongs to another instance. The run
    /// must stop.
    #[error("{message}")]
    Unauthorized {
        /// 401 or 403.
        status: u16,
        /// What to check, naming `users.track` and the instance.
        message: String,
    },
    /// Any other 4xx: permanent for this request.
    #[error("Braze refused the request (HTTP {status}): {message}")]
    Rejected {
        /// Status.
        status: u16,
        /// Braze's message.
        message: String,
        /// `errors[]`, when Braze listed objects.
        errors: Vec<ItemError>,
        /// Rate-limit headers.
        rate: RateLimitInfo,
    },
    /// A 2xx whose body is not Braze's JSON (`{"message": ...}`), e.g. a proxy's page: nothing
    /// says which objects Braze applied, so none of the request's users may be confirmed.
    #[error(
        "Braze answered HTTP {status} with a body that is not Braze's JSON ({message}); its users are left unconfirmed"
    )]
    Unconfirmed {
        /// The 2xx status.
        status: u16,
        /// The start of the body.
        message: String,
    },
    /// No answer in time (or 408).
    #[error("request to Braze timed out: {detail}")]
    Timeout {
        /// What timed out.
        detail: String,
    },
    /// The connection failed or dropped before a full answer.
    #[error("connection to Braze failed: {detail}")]
    Connection {
        /// The transport's message.
        detail: String,
    },
}

impl TrackError {
    /// The rate-limit headers, when the error came with a response.
    pub fn rate(&self) -> Option<&RateLimitInfo> {
        match self {
            TrackError::RateLimited { rate, .. }
            | TrackError::Server { rate, .. }
            | TrackError::PayloadTooLarge { rate, .. }
            | TrackError::Rejected { rate, .. } => Some(rate),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reset_is_read_as_epoch_seconds_or_as_a_delay() {
        let r = RateLimitInfo {
            reset: Some(1_700_000_003.0),
            ..Default::default()
        };
        assert_eq!(
            r.reset_in(1_700_000_001.5),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(r.reset_in(1_700_000_010.0), Some(Duration::ZERO));
        let r = RateLimitInfo {
            reset: Some(2.0),
            ..Default::default()
        };
        assert_eq!(r.reset_in(1_700_000_000.0), Some(Duration::from_secs(2)));
        assert_eq!(RateLimitInfo::default().reset_in(0.0), None);
    }

    #[test]
    fn retry_after_wins_over_the_reset_after_a_429() {
        let r = RateLimitInfo {
            reset: Some(1_700_000_003.0),
            retry_after_s: Some(0.5),
            ..Default::default()
        };
        assert_eq!(
            r.retry_in(1_700_000_000.0),
            Some(Duration::from_millis(500))
        );
        // Without Retry-After, the reset.
        let r = RateLimitInfo {
            reset: Some(1_700_000_003.0),
            ..Default::default()
        };
        assert_eq!(r.retry_in(1_700_000_000.0), Some(Duration::from_secs(3)));
    }
}
