//! Simulator settings: the API key and its permissions, the plan's limits, the rate window and
//! the faults to inject.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::contract::Limits;
use crate::faults::{Faults, FaultsError};

/// Everything the simulator can be told. `SimConfig::default()` is Braze's standard plan with
/// key `sim-key`, 3,000 requests per 3 s, 75 objects per array, 4,000,000-byte bodies, no faults.
///
/// As JSON (for `POST /_sim/config`) every field is optional and defaults as above;
/// `rate_limit_window` is given as `rate_limit_window_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// The only accepted REST API key (`Authorization: Bearer <key>`).
    pub api_key: String,
    /// The key exists but lacks the `users.track` permission: every otherwise-authorized
    /// request gets 403 `Access Denied`.
    pub key_lacks_users_track: bool,
    /// Address to bind (default 127.0.0.1). Ignored by `POST /_sim/config`.
    pub host: IpAddr,
    /// Port to bind; 0 picks a free one. Ignored by `POST /_sim/config`.
    pub port: u16,
    /// Requests allowed per rate window (`X-RateLimit-Limit`).
    pub rate_limit_requests: u64,
    /// Length of the fixed rate window.
    #[serde(rename = "rate_limit_window_ms", with = "duration_ms")]
    pub rate_limit_window: Duration,
    /// Objects allowed in each of `attributes`, `events`, `purchases`.
    pub max_objects: usize,
    /// "MAU CY 24-25" plans: objects allowed across the three arrays together (Braze: 50).
    pub combined_limit: Option<usize>,
    /// Largest accepted body in bytes; larger gets 413. Braze documents "4 MB"; the default
    /// takes the stricter decimal reading, 4,000,000 bytes.
    pub max_body_bytes: usize,
    /// Faults injected into `/users/track`.
    pub faults: Faults,
    /// Seed of the fault generator; the same seed and request order give the same faults.
    pub seed: u64,
    /// Keep each request's parsed JSON body in the request log.
    pub log_bodies: bool,
    /// `POST /users/export/ids` requests allowed per export window (Braze: 250 per minute for
    /// workspaces onboarded since 2024-08-22).
    pub export_rate_limit_requests: u64,
    /// Length of the export endpoint's fixed rate window.
    #[serde(rename = "export_rate_limit_window_ms", with = "duration_ms")]
    pub export_rate_limit_window: Duration,
    /// The rate-limit headers of an account on MAU pricing: no `X-RateLimit-Limit` or
    /// `-Remaining`, `X-RateLimit-Reset` as seconds remaining (not epoch seconds), and a 429
    /// carries `X-Ratelimit-Retry-After` (seconds).
    pub mau_headers: bool,
    /// `/users/track` requests allowed per clock hour (UTC), as MAU contracts set them; a
    /// request past it gets 429 until the next hour. `None`: no hourly limit.
    pub hourly_request_limit: Option<u64>,
    /// Ids of the workspace's subscription groups. A `subscription_groups` entry naming
    /// another id is refused (`BAD_SUBSCRIPTION_GROUP_ID`); none by default.
    pub subscription_groups: Vec<String>,
    /// Milliseconds added to the wall clock when `/users/track`'s hourly budget reads the
    /// hour, so a test can meet the turn of an hour without waiting for it (0: the wall
    /// clock). The rate window and its headers keep the wall clock.
    pub clock_offset_ms: i64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            api_key: "sim-key".to_string(),
            key_lacks_users_track: false,
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            rate_limit_requests: 3000,
            rate_limit_window: Duration::from_secs(3),
            max_objects: 75,
            combined_limit: None,
            max_body_bytes: 4_000_000,
            faults: Faults::default(),
            seed: 0,
            log_bodies: false,
            export_rate_limit_requests: 250,
            export_rate_limit_window: Duration::from_secs(60),
            mau_headers: false,
            hourly_request_limit: None,
            subscription_groups: Vec::new(),
            clock_offset_ms: 0,
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ConfigError {
    /// No API key.
    #[error("config: 'api_key' must not be empty")]
    EmptyApiKey,
    /// `max_objects` of 0.
    #[error("config: 'max_objects' must be at least 1")]
    ZeroMaxObjects,
    /// A zero-length rate window.
    #[error("config: 'rate_limit_window' must be longer than zero")]
    ZeroWindow,
    /// Bad faults.
    #[error(transparent)]
    Faults(#[from] FaultsError),
}

impl SimConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.api_key.is_empty() {
            return Err(ConfigError::EmptyApiKey);
        }
        if self.max_objects == 0 {
            return Err(ConfigError::ZeroMaxObjects);
        }
        if self.rate_limit_window.is_zero() {
            return Err(ConfigError::ZeroWindow);
        }
        self.faults.validate()?;
        Ok(())
    }

    /// The object limits for the contract.
    pub fn limits(&self) -> Limits {
        Limits {
            max_objects_per_array: self.max_objects,
            combined_limit: self.combined_limit,
        }
    }
}

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn json_fields_are_optional_and_window_is_in_milliseconds() {
        let c: SimConfig =
            serde_json::from_str(r#"{"rate_limit_requests": 5, "rate_limit_window_ms": 1000}"#)
                .unwrap();
        assert_eq!(c.rate_limit_window, Duration::from_secs(1));
        assert_eq!(c.api_key, "sim-key");
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["rate_limit_window_ms"], 1000);
    }

    #[test]
    fn default_is_valid_and_empty_key_is_not() {
        assert!(SimConfig::default().validate().is_ok());
        let c = SimConfig {
            api_key: String::new(),
            ..SimConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::EmptyApiKey));
    }
}
