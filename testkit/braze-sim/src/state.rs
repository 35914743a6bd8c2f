//! The simulator's shared state (config, profiles, rate window, fault plan), the request log
//! and the counters tests read back.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::{ConfigError, SimConfig};
use crate::contract::{self, Limits, ObjectCounts, TrackOutcome};
use crate::faults::{FaultDecision, FaultPlan, Faults};
use crate::profile::{ProfileStore, UserKey};
use crate::rate_window::{Admission, RateWindow};

/// Counters over every `/users/track` request since start or the last reset.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Requests received (including faulted and refused ones).
    pub requests_total: u64,
    /// Responses by HTTP status (`"201"`, `"429"`, …); dropped connections under `"dropped"`.
    pub by_status: BTreeMap<String, u64>,
    /// Objects in all requests whose body was JSON (applied or not).
    pub objects_received: u64,
    /// Valid objects processed by 201 responses (including update-only objects that matched
    /// no profile).
    pub objects_applied: u64,
    /// Objects reported in `errors[]`.
    pub objects_rejected: u64,
    /// Valid objects that changed nothing because update-only mode found no profile.
    pub objects_skipped_update_only: u64,
    /// Valid attribute objects processed.
    pub attributes_applied: u64,
    /// Valid event objects processed.
    pub events_applied: u64,
    /// Valid purchase objects processed.
    pub purchases_applied: u64,
    /// Most objects (all arrays together) seen in one request.
    pub max_objects_in_request: usize,
    /// Most objects seen in one array of one request.
    pub max_objects_in_array: usize,
    /// Largest body seen, in bytes.
    pub max_body_bytes: usize,
    /// All 429 responses (rate window and bursts).
    pub responses_429: u64,
    /// 429s from the rate window.
    pub rate_limited_429: u64,
    /// 429s from injected bursts.
    pub burst_429: u64,
    /// Injected 5xx responses.
    pub faults_5xx: u64,
    /// Connections closed without a response.
    pub dropped_connections: u64,
    /// Requests that arrived after a 401 had been returned.
    pub requests_after_first_401: u64,
    /// `/users/export/ids` requests received.
    pub export_requests: u64,
    /// `/users/export/ids` requests refused by their rate window.
    pub export_rate_limited_429: u64,
    /// `/users/track` requests refused because the clock hour's budget was spent (also
    /// counted in `rate_limited_429`).
    pub hourly_limited_429: u64,
}

/// What happened to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    /// 201, every object valid.
    Applied,
    /// 201 with `errors[]`.
    AppliedWithErrors,
    /// 400 from the contract (bad JSON, limits, no valid object); nothing applied.
    Invalid,
    /// 401.
    Unauthorized,
    /// 403.
    Forbidden,
    /// 415: not `application/json`.
    UnsupportedMediaType,
    /// 413.
    TooLarge,
    /// 429 from the rate window.
    RateLimited,
    /// 429: the clock hour's request budget is spent.
    HourlyLimited,
    /// 429 from an injected burst.
    Burst429,
    /// Injected 5xx.
    ServerError,
    /// Injected dropped connection.
    Dropped,
}

/// One `/users/track` request as the simulator saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestLog {
    /// 1-based arrival number.
    pub seq: u64,
    /// Arrival time, RFC 3339 UTC with milliseconds.
    pub at: String,
    /// HTTP status sent; `None` for a dropped connection.
    pub status: Option<u16>,
    /// What happened.
    pub disposition: Disposition,
    /// Objects in the body, all arrays together (0 when the body was not JSON).
    pub objects: usize,
    /// Objects per array.
    pub received: ObjectCounts,
    /// Valid objects processed.
    pub processed: usize,
    /// Entries in `errors[]`.
    pub errors: usize,
    /// Body length in bytes.
    pub body_bytes: usize,
    /// Injected delay in milliseconds.
    pub delay_ms: u64,
    /// Parsed body, when `log_bodies` is on and the body was JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

/// Everything behind the lock.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) cfg: SimConfig,
    pub(crate) store: ProfileStore,
    window: RateWindow,
    export_window: RateWindow,
    faults: FaultPlan,
    stats: Stats,
    log: Vec<RequestLog>,
    seq: u64,
    returned_401: bool,
    /// The clock hour (UTC epoch hours) and the `/users/track` requests admitted in it.
    hour: (u64, u64),
}

/// Milliseconds in an hour.
const HOUR_MS: u64 = 3_600_000;

/// The rate-limit headers one response carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RateHeaders {
    /// The window's admission (limit, remaining, reset).
    pub(crate) admission: Admission,
    /// When the request arrived (UTC epoch milliseconds).
    pub(crate) now_ms: u64,
    /// Seconds until a refused request may be sent again (`None` when admitted).
    pub(crate) retry_after_s: Option<u64>,
    /// The MAU-pricing header set ([`SimConfig::mau_headers`]).
    pub(crate) mau: bool,
}

/// What a request learns when it arrives.
#[derive(Debug, Clone)]
pub(crate) struct Arrival {
    pub(crate) seq: u64,
    pub(crate) admission: Admission,
    pub(crate) headers: RateHeaders,
    pub(crate) hourly_refused: bool,
    pub(crate) fault: FaultDecision,
    pub(crate) api_key: String,
    pub(crate) key_lacks_users_track: bool,
    pub(crate) max_body_bytes: usize,
    pub(crate) limits: Limits,
    pub(crate) log_bodies: bool,
}

/// The state shared by the HTTP handlers and the [`crate::SimHandle`].
#[derive(Debug)]
pub(crate) struct Shared {
    inner: Mutex<State>,
}

impl Shared {
    pub(crate) fn new(cfg: SimConfig) -> Self {
        Self {
            inner: Mutex::new(State::new(cfg)),
        }
    }

    /// The lock; a poisoned lock is recovered (the state stays usable for reading back).
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn store_for(cfg: &SimConfig) -> ProfileStore {
    let mut store = ProfileStore::new();
    store.set_subscription_groups(cfg.subscription_groups.iter().cloned());
    store
}

fn window_for(cfg: &SimConfig) -> RateWindow {
    let ms = u64::try_from(cfg.rate_limit_window.as_millis()).unwrap_or(u64::MAX);
    RateWindow::new(cfg.rate_limit_requests, ms)
}

fn export_window_for(cfg: &SimConfig) -> RateWindow {
    let ms = u64::try_from(cfg.export_rate_limit_window.as_millis()).unwrap_or(u64::MAX);
    RateWindow::new(cfg.export_rate_limit_requests, ms)
}

/// Standard profile fields `/users/export/ids` returns at the top level; every other
/// attribute goes under `custom_attributes`.
const STANDARD_FIELDS: &[&str] = &[
    "external_id",
    "braze_id",
    "user_aliases",
    "first_name",
    "last_name",
    "email",
    "phone",
    "dob",
    "gender",
    "country",
    "home_city",
    "language",
    "time_zone",
    "email_subscribe",
    "push_subscribe",
];

/// Most identifiers one `/users/export/ids` request may name.
pub(crate) const EXPORT_MAX_IDS: usize = 50;

impl State {
    fn new(cfg: SimConfig) -> Self {
        Self {
            window: window_for(&cfg),
            export_window: export_window_for(&cfg),
            faults: FaultPlan::new(cfg.faults.clone(), cfg.seed),
            store: store_for(&cfg),
            cfg,
            stats: Stats::default(),
            log: Vec::new(),
            seq: 0,
            returned_401: false,
            hour: (0, 0),
        }
    }

    /// Counts a request against the clock hour's budget (when one is configured): `true`
    /// when it is admitted. Only requests the rate window admitted are counted.
    fn take_hour(&mut self, now_ms: u64) -> bool {
        let Some(limit) = self.cfg.hourly_request_limit else {
            return true;
        };
        let hour = now_ms / HOUR_MS;
        if self.hour.0 != hour {
            self.hour = (hour, 0);
        }
        if self.hour.1 >= limit {
            return false;
        }
        self.hour.1 += 1;
        true
    }

    /// Counts a request in the rate window and draws its faults.
    pub(crate) fn arrive(&mut self, now_ms: u64) -> Arrival {
        self.seq += 1;
        self.stats.requests_total += 1;
        if self.returned_401 {
            self.stats.requests_after_first_401 += 1;
        }
        let mut admission = self.window.take(now_ms);
        let mut retry_after_s = (!admission.allowed).then(|| {
            (admission.reset_epoch_secs * 1000)
                .saturating_sub(now_ms)
                .div_ceil(1000)
        });
        // The hour is read on the shifted clock, the rate window and headers on the wall's.
        let hour_now_ms = now_ms.saturating_add_signed(self.cfg.clock_offset_ms);
        let hourly_refused = admission.allowed && !self.take_hour(hour_now_ms);
        if hourly_refused {
            let to_next_hour_ms = HOUR_MS - hour_now_ms % HOUR_MS;
            admission.allowed = false;
            admission.remaining = 0;
            admission.reset_epoch_secs = (now_ms + to_next_hour_ms).div_ceil(1000);
            retry_after_s = Some(to_next_hour_ms.div_ceil(1000));
        }
        Arrival {
            seq: self.seq,
            admission,
            headers: RateHeaders {
                admission,
                now_ms,
                retry_after_s,
                mau: self.cfg.mau_headers,
            },
            hourly_refused,
            fault: self.faults.next_decision(),
            api_key: self.cfg.api_key.clone(),
            key_lacks_users_track: self.cfg.key_lacks_users_track,
            max_body_bytes: self.cfg.max_body_bytes,
            limits: self.cfg.limits(),
            log_bodies: self.cfg.log_bodies,
        }
    }

    /// Runs the contract on a body that passed transport checks.
    pub(crate) fn track(&mut self, body: &[u8], limits: &Limits) -> TrackOutcome {
        let f = self.faults.faults();
        let mode = contract::AnswerMode {
            errors_without_index: f.errors_without_index,
            strict_batch_400: f.strict_batch_400,
        };
        contract::track_with(&mut self.store, body, limits, mode)
    }

    /// Records a finished request and updates the counters.
    pub(crate) fn finish(&mut self, entry: RequestLog, outcome: Option<&TrackOutcome>) {
        let s = &mut self.stats;
        let status = entry
            .status
            .map_or_else(|| "dropped".to_string(), |c| c.to_string());
        *s.by_status.entry(status).or_default() += 1;
        s.objects_received += entry.objects as u64;
        s.max_objects_in_request = s.max_objects_in_request.max(entry.objects);
        s.max_objects_in_array = s.max_objects_in_array.max(entry.received.max_array());
        s.max_body_bytes = s.max_body_bytes.max(entry.body_bytes);
        match entry.disposition {
            Disposition::Unauthorized => self.returned_401 = true,
            Disposition::RateLimited => {
                s.rate_limited_429 += 1;
                s.responses_429 += 1;
            }
            Disposition::HourlyLimited => {
                s.rate_limited_429 += 1;
                s.hourly_limited_429 += 1;
                s.responses_429 += 1;
            }
            Disposition::Burst429 => {
                s.burst_429 += 1;
                s.responses_429 += 1;
            }
            Disposition::ServerError => s.faults_5xx += 1,
            Disposition::Dropped => s.dropped_connections += 1,
            _ => {}
        }
        if let Some(o) = outcome {
            if o.status == 201 {
                s.objects_applied += o.processed.total() as u64;
                s.attributes_applied += o.processed.attributes as u64;
                s.events_applied += o.processed.events as u64;
                s.purchases_applied += o.processed.purchases as u64;
                s.objects_skipped_update_only += o.skipped_update_only as u64;
            }
            s.objects_rejected += o.errors.len() as u64;
        }
        self.log.push(entry);
    }

    /// Counts one `/users/export/ids` request in its own rate window.
    pub(crate) fn arrive_export(&mut self, now_ms: u64) -> (Admission, String) {
        self.stats.export_requests += 1;
        let a = self.export_window.take(now_ms);
        if !a.allowed {
            self.stats.export_rate_limited_429 += 1;
        }
        (a, self.cfg.api_key.clone())
    }

    /// `/users/export/ids`: the profiles the body's identifiers name, Braze's shape
    /// (standard fields at the top, the rest under `custom_attributes`), and the ids not found.
    /// `Err` is a 400 message.
    pub(crate) fn export_ids(&self, body: &Value) -> Result<Value, String> {
        let strs = |k: &str| -> Vec<String> {
            body.get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let external = strs("external_ids");
        let aliases: Vec<(String, String)> = body
            .get("user_aliases")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| {
                        Some((
                            v.get("alias_label")?.as_str()?.to_string(),
                            v.get("alias_name")?.as_str()?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let braze = body
            .get("braze_id")
            .and_then(Value::as_str)
            .map(str::to_string);
        let total = external.len() + aliases.len() + usize::from(braze.is_some());
        if total == 0 {
            return Err("no identifiers given".into());
        }
        if total > EXPORT_MAX_IDS {
            return Err(format!(
                "at most {EXPORT_MAX_IDS} identifiers per request, got {total}"
            ));
        }
        // `fields_to_export`: only these fields (`custom_attributes` for every custom one);
        // absent, every field.
        let fields: Option<Vec<String>> = body
            .get("fields_to_export")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            });
        let wanted = |k: &str| fields.as_ref().is_none_or(|f| f.iter().any(|x| x == k));
        let mut users = Vec::new();
        let mut invalid = Vec::new();
        let keys = external
            .iter()
            .map(|e| (UserKey::external(e), e.clone()))
            .chain(
                aliases
                    .iter()
                    .map(|(l, n)| (UserKey::alias(l, n), format!("{l}:{n}"))),
            )
            .chain(braze.iter().map(|b| (UserKey::braze(b), b.clone())));
        for (key, shown) in keys {
            match self.store.get(&key) {
                Some(p) => {
                    let mut top = Map::new();
                    let mut custom = Map::new();
                    for (k, v) in &p.attributes {
                        if STANDARD_FIELDS.contains(&k.as_str()) {
                            if wanted(k) {
                                top.insert(k.clone(), v.clone());
                            }
                        } else {
                            custom.insert(k.clone(), v.clone());
                        }
                    }
                    if wanted("custom_attributes") {
                        top.insert("custom_attributes".into(), Value::Object(custom));
                    }
                    users.push(Value::Object(top));
                }
                None => invalid.push(Value::String(shown)),
            }
        }
        Ok(serde_json::json!({
            "users": users,
            "invalid_user_ids": invalid,
            "message": "success",
        }))
    }

    pub(crate) fn stats(&self) -> Stats {
        self.stats.clone()
    }

    pub(crate) fn requests(&self) -> Vec<RequestLog> {
        self.log.clone()
    }

    /// Profiles as JSON attribute maps keyed by user key.
    pub(crate) fn users(&self) -> BTreeMap<String, Value> {
        self.store
            .iter()
            .map(|(k, p)| (k.to_string(), Value::Object(p.attributes.clone())))
            .collect()
    }

    pub(crate) fn user(&self, key: &str) -> Option<Value> {
        self.store
            .get(&UserKey::raw(key))
            .map(|p| Value::Object(p.attributes.clone()))
    }

    pub(crate) fn events(&self, key: &str) -> Option<Vec<Value>> {
        self.store.get(&UserKey::raw(key)).map(|p| p.events.clone())
    }

    pub(crate) fn purchases(&self, key: &str) -> Option<Vec<Value>> {
        self.store
            .get(&UserKey::raw(key))
            .map(|p| p.purchases.clone())
    }

    pub(crate) fn write_as_other(&mut self, key: &str, changes: &Map<String, Value>) -> bool {
        self.store.write_as_other(&UserKey::raw(key), changes)
    }

    pub(crate) fn delete_user(&mut self, key: &str) -> bool {
        self.store.remove(&UserKey::raw(key))
    }

    pub(crate) fn seed_user(&mut self, key: &str, attributes: Map<String, Value>) {
        self.store.insert(UserKey::raw(key), attributes);
    }

    /// Clears profiles, log and counters; restarts the rate window and the fault sequence.
    pub(crate) fn reset(&mut self) {
        let cfg = self.cfg.clone();
        *self = State::new(cfg);
    }

    pub(crate) fn faults(&self) -> Faults {
        self.faults.faults().clone()
    }

    /// Replaces the faults and restarts their sequence from the seed.
    pub(crate) fn set_faults(&mut self, faults: Faults) -> Result<(), ConfigError> {
        faults.validate()?;
        self.cfg.faults = faults.clone();
        self.faults = FaultPlan::new(faults, self.cfg.seed);
        Ok(())
    }

    /// Replaces the configuration (keeping the bound address); keeps profiles and counters.
    pub(crate) fn set_config(&mut self, mut cfg: SimConfig) -> Result<(), ConfigError> {
        cfg.validate()?;
        cfg.host = self.cfg.host;
        cfg.port = self.cfg.port;
        self.window = window_for(&cfg);
        self.export_window = export_window_for(&cfg);
        self.faults = FaultPlan::new(cfg.faults.clone(), cfg.seed);
        self.hour = (0, 0);
        self.store
            .set_subscription_groups(cfg.subscription_groups.iter().cloned());
        self.cfg = cfg;
        Ok(())
    }
}
