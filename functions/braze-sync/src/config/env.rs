//! The function's configuration: typed, read once from the environment at start-up, failing
//! fast with the name of the variable that is missing or wrong; and loading the route files
//! (`*.toml`) from a local folder (the Lambda package, the repo) or an S3 prefix.

use std::path::PathBuf;

use bridge_shared::runtime::ConfigError;
use bridge_shared::{ObjectStore, S3Uri, StoreError};

use crate::config::api_key::{ApiKey, ApiKeySource};
use crate::config::braze_endpoint::Endpoint;
use crate::config::route::{Route, RouteError};

/// Where the route files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoutesLocation {
    /// A local folder.
    Dir(PathBuf),
    /// An S3 prefix.
    S3(S3Uri),
}

impl RoutesLocation {
    /// `s3://bucket/prefix/` or a local path.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with("s3://") {
            s.parse::<S3Uri>()
                .map(RoutesLocation::S3)
                .map_err(|e| e.to_string())
        } else if s.trim().is_empty() {
            Err("empty".into())
        } else {
            Ok(RoutesLocation::Dir(PathBuf::from(s)))
        }
    }
}

/// braze-sync's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `ROUTES_LOCATION`: folder or `s3://bucket/prefix/` holding the route files (`*.toml`).
    /// Default `routes` (beside the binary in the Lambda package).
    pub routes_location: RoutesLocation,
    /// `STATE_BUCKET` (required): bucket for state, reports and rejects.
    pub state_bucket: String,
    /// `STATE_PREFIX`: prefix of each route's confirmed state and ledger (default
    /// `bridge/state/`).
    pub state_prefix: String,
    /// `REPORTS_PREFIX`: prefix of run reports (default `bridge/reports/`).
    pub reports_prefix: String,
    /// `REJECTS_PREFIX`: prefix of rejected-row files (default `bridge/rejects/`).
    pub rejects_prefix: String,
    /// `BRAZE_INSTANCE` (`US-03`, ...) or `BRAZE_REST_ENDPOINT` (a base URL; HTTPS, or HTTP on
    /// loopback for tests): where Braze is. One is required.
    pub braze_endpoint: Endpoint,
    /// `BRAZE_API_KEY_SECRET_ARN` (Secrets Manager), `BRAZE_API_KEY_PARAMETER` (SSM
    /// SecureString) or, for local runs only, `BRAZE_API_KEY`. One is required.
    pub api_key: ApiKeySource,
    /// `BRAZE_RATE_LIMIT_REQUESTS`: `/users/track` requests allowed per window for the
    /// workspace (default 3000).
    pub rate_limit_requests: u32,
    /// `BRAZE_RATE_LIMIT_WINDOW_SECS`: the rate-limit window, seconds (default 3).
    pub rate_limit_window_secs: u64,
    /// `RATE_LIMIT_SHARE`: the share of the workspace limit this deployment's runs may use
    /// together, 0 < s ≤ 1 (default 1.0); they divide it among themselves through the sender
    /// registry ([`crate::send::workspace_share`]). Below 1 only when something outside this
    /// deployment also sends to the workspace.
    pub rate_limit_share: f64,
    /// `BRAZE_MAX_OBJECTS_PER_REQUEST`: attribute objects per request, 1–75 (default 75; 50
    /// on combined-limit plans).
    pub max_objects_per_request: usize,
    /// `BRAZE_HOURLY_REQUEST_LIMIT`: `/users/track` requests this deployment's runs may make
    /// together per clock hour (UTC), shared through the state bucket
    /// ([`crate::send::hourly_budget`]); a run that reaches it hands over until the next hour.
    /// Unset or empty: no hourly budget.
    pub hourly_request_limit: Option<u64>,
    /// `CONTINUATION_QUEUE_URL`: SQS queue a run hands its remaining work to before the
    /// Lambda deadline (optional).
    pub continuation_queue_url: Option<String>,
}

/// Every variable [`Config`] reads, for docs and checks.
pub const VARIABLES: &[&str] = &[
    "ROUTES_LOCATION",
    "STATE_BUCKET",
    "STATE_PREFIX",
    "REPORTS_PREFIX",
    "REJECTS_PREFIX",
    "BRAZE_INSTANCE",
    "BRAZE_REST_ENDPOINT",
    "BRAZE_API_KEY_SECRET_ARN",
    "BRAZE_API_KEY_PARAMETER",
    "BRAZE_API_KEY",
    "BRAZE_RATE_LIMIT_REQUESTS",
    "BRAZE_RATE_LIMIT_WINDOW_SECS",
    "RATE_LIMIT_SHARE",
    "BRAZE_MAX_OBJECTS_PER_REQUEST",
    "BRAZE_HOURLY_REQUEST_LIMIT",
    "CONTINUATION_QUEUE_URL",
    "BRIDGE_EPHEMERAL_STORAGE_MB",
    "BRIDGE_FAN_OUT_PIECES",
    INSECURE_PLAIN_KEY_SWITCH,
];

/// Lets a plain `BRAZE_API_KEY` through while running under a Lambda runtime: only the local
/// stack (tests, demo) sets it, since it runs the real binary under the Lambda emulator. Named
/// so nobody sets it in production by accident: a deployed function must take its key from
/// Secrets Manager or SSM. Exactly `1` turns it on.
pub const INSECURE_PLAIN_KEY_SWITCH: &str = "BRIDGE_INSECURE_PLAIN_API_KEY_FOR_LOCAL_TESTING";

fn prefix(v: String) -> String {
    if v.is_empty() || v.ends_with('/') {
        v
    } else {
        format!("{v}/")
    }
}

/// Where the routes and the state are: all `braze-sync status` needs (no Braze settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locations {
    /// `ROUTES_LOCATION`, as in [`Config::routes_location`].
    pub routes_location: RoutesLocation,
    /// `STATE_BUCKET` (required).
    pub state_bucket: String,
    /// `STATE_PREFIX`, as in [`Config::state_prefix`].
    pub state_prefix: String,
    /// `REPORTS_PREFIX`, as in [`Config::reports_prefix`].
    pub reports_prefix: String,
}

impl Locations {
    /// Reads the environment.
    pub fn from_env() -> Result<Locations, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Reads variables through `get`, with the same names and defaults as [`Config`].
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Locations, ConfigError> {
        let or = |k: &str, d: &str| get(k).unwrap_or_else(|| d.to_string());
        let routes = or("ROUTES_LOCATION", "routes");
        Ok(Locations {
            routes_location: RoutesLocation::parse(&routes)
                .map_err(|_| ConfigError::Invalid("ROUTES_LOCATION".into(), routes.clone()))?,
            state_bucket: get("STATE_BUCKET").ok_or(ConfigError::Missing("STATE_BUCKET".into()))?,
            state_prefix: prefix(or("STATE_PREFIX", "bridge/state/")),
            reports_prefix: prefix(or("REPORTS_PREFIX", "bridge/reports/")),
        })
    }
}

impl Config {
    /// Reads the process environment. Under Lambda a plain `BRAZE_API_KEY` is refused.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_lookup(
            |k| std::env::var(k).ok().filter(|v| !v.is_empty()),
            bridge_shared::runtime::is_lambda(),
        )
    }

    /// Reads variables through `get` (testable). `is_lambda` refuses a plain `BRAZE_API_KEY`
    /// unless [`INSECURE_PLAIN_KEY_SWITCH`] is `1` (the local stack runs the function under
    /// the Lambda emulator and says so with it).
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
        is_lambda: bool,
    ) -> Result<Config, ConfigError> {
        let invalid = |k: &str, v: &str| ConfigError::Invalid(k.to_string(), v.to_string());
        let or = |k: &str, d: &str| get(k).unwrap_or_else(|| d.to_string());
        fn parse<T: std::str::FromStr>(
            get: &impl Fn(&str) -> Option<String>,
            k: &str,
            d: T,
        ) -> Result<T, ConfigError> {
            match get(k) {
                None => Ok(d),
                Some(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| ConfigError::Invalid(k.to_string(), v)),
            }
        }
        let routes = or("ROUTES_LOCATION", "routes");
        let routes_location =
            RoutesLocation::parse(&routes).map_err(|_| invalid("ROUTES_LOCATION", &routes))?;
        let state_bucket =
            get("STATE_BUCKET").ok_or(ConfigError::Missing("STATE_BUCKET".into()))?;
        let braze_endpoint = match (get("BRAZE_REST_ENDPOINT"), get("BRAZE_INSTANCE")) {
            (Some(url), _) => {
                Endpoint::parse(&url).map_err(|_| invalid("BRAZE_REST_ENDPOINT", &url))?
            }
            (None, Some(i)) => Endpoint::parse(&i).map_err(|_| invalid("BRAZE_INSTANCE", &i))?,
            (None, None) => {
                return Err(ConfigError::Missing(
                    "BRAZE_INSTANCE (or BRAZE_REST_ENDPOINT)".into(),
                ));
            }
        };
        let api_key = if let Some(arn) = get("BRAZE_API_KEY_SECRET_ARN") {
            ApiKeySource::SecretsManager(arn)
        } else if let Some(p) = get("BRAZE_API_KEY_PARAMETER") {
            ApiKeySource::Ssm(p)
        } else if let Some(k) = get("BRAZE_API_KEY") {
            if is_lambda && get(INSECURE_PLAIN_KEY_SWITCH).as_deref() != Some("1") {
                return Err(ConfigError::Invalid(
                    "BRAZE_API_KEY".into(),
                    "(a plain key is for local runs only; use BRAZE_API_KEY_SECRET_ARN or BRAZE_API_KEY_PARAMETER)".into(),
                ));
            }
            ApiKeySource::Plain(
                ApiKey::new(&k).map_err(|_| {
                    ConfigError::Invalid("BRAZE_API_KEY".into(), "(not shown)".into())
                })?,
            )
        } else {
            return Err(ConfigError::Missing(
                "BRAZE_API_KEY_SECRET_ARN (or BRAZE_API_KEY_PARAMETER, or BRAZE_API_KEY locally)"
                    .into(),
            ));
        };
        let rate_limit_requests = parse(&get, "BRAZE_RATE_LIMIT_REQUESTS", 3000u32)?;
        if rate_limit_requests == 0 {
            return Err(invalid("BRAZE_RATE_LIMIT_REQUESTS", "0"));
        }
        let rate_limit_window_secs = parse(&get, "BRAZE_RATE_LIMIT_WINDOW_SECS", 3u64)?;
        if rate_limit_window_secs == 0 {
            return Err(invalid("BRAZE_RATE_LIMIT_WINDOW_SECS", "0"));
        }
        let rate_limit_share = parse(&get, "RATE_LIMIT_SHARE", 1.0f64)?;
        if !(rate_limit_share > 0.0 && rate_limit_share <= 1.0) {
            return Err(invalid("RATE_LIMIT_SHARE", &rate_limit_share.to_string()));
        }
        let max_objects_per_request = parse(&get, "BRAZE_MAX_OBJECTS_PER_REQUEST", 75usize)?;
        if !(1..=75).contains(&max_objects_per_request) {
            return Err(invalid(
                "BRAZE_MAX_OBJECTS_PER_REQUEST",
                &max_objects_per_request.to_string(),
            ));
        }
        let hourly_request_limit = match get("BRAZE_HOURLY_REQUEST_LIMIT") {
            None => None,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(invalid("BRAZE_HOURLY_REQUEST_LIMIT", &v)),
            },
        };
        Ok(Config {
            routes_location,
            state_bucket,
            state_prefix: prefix(or("STATE_PREFIX", "bridge/state/")),
            reports_prefix: prefix(or("REPORTS_PREFIX", "bridge/reports/")),
            rejects_prefix: prefix(or("REJECTS_PREFIX", "bridge/rejects/")),
            braze_endpoint,
            api_key,
            rate_limit_requests,
            rate_limit_window_secs,
            rate_limit_share,
            max_objects_per_request,
            hourly_request_limit,
            continuation_queue_url: get("CONTINUATION_QUEUE_URL"),
        })
    }

    /// The prefixes this function writes under (never sync triggers).
    pub fn output_prefixes(&self) -> Vec<String> {
        vec![
            self.state_prefix.clone(),
            self.reports_prefix.clone(),
            self.rejects_prefix.clone(),
        ]
    }
}

/// Why the routes could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    /// A file could not be read.
    #[error("reading routes from {location}: {message}")]
    Io {
        /// Where.
        location: String,
        /// Why.
        message: String,
    },
    /// An object could not be read.
    #[error("reading routes: {0}")]
    Store(#[from] StoreError),
    /// A route is invalid.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// Two routes share a name or a prefix, or there is none.
    #[error("routes: {0}")]
    Conflict(String),
}

fn check_routes(routes: &[Route]) -> Result<(), RoutesError> {
    if routes.is_empty() {
        return Err(RoutesError::Conflict(
            "no route files (*.toml) found".into(),
        ));
    }
    for (i, a) in routes.iter().enumerate() {
        for b in &routes[i + 1..] {
            if a.name() == b.name() {
                return Err(RoutesError::Conflict(format!(
                    "two routes are named {:?}",
                    a.name()
                )));
            }
            if a.config.bucket == b.config.bucket && a.config.prefix == b.config.prefix {
                return Err(RoutesError::Conflict(format!(
                    "routes {:?} and {:?} own the same prefix {:?}",
                    a.name(),
                    b.name(),
                    a.config.prefix
                )));
            }
        }
    }
    Ok(())
}

/// Loads every `*.toml` route in a folder, in file-name order.
pub fn load_routes_dir(dir: &std::path::Path) -> Result<Vec<Route>, RoutesError> {
    let io = |e: std::io::Error| RoutesError::Io {
        location: dir.display().to_string(),
        message: e.to_string(),
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut routes = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(io)?;
        routes.push(Route::from_toml(&text, &f.display().to_string())?);
    }
    check_routes(&routes)?;
    Ok(routes)
}

/// Loads the routes from wherever the config says.
pub async fn load_routes(
    location: &RoutesLocation,
    store: &dyn ObjectStore,
) -> Result<Vec<Route>, RoutesError> {
    match location {
        RoutesLocation::Dir(d) => load_routes_dir(d),
        RoutesLocation::S3(uri) => {
            let listing = store.list(&uri.bucket, &uri.key).await?;
            let mut routes = Vec::new();
            for o in listing.iter().filter(|o| o.key.ends_with(".toml")) {
                let u = S3Uri::new(&uri.bucket, &o.key);
                let (_, bytes) = store.get(&u).await?;
                let text = String::from_utf8(bytes.to_vec()).map_err(|_| RoutesError::Io {
                    location: u.to_string(),
                    message: "not UTF-8".into(),
                })?;
                routes.push(Route::from_toml(&text, &u.to_string())?);
            }
            check_routes(&routes)?;
            Ok(routes)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn defaults_apply_and_required_variables_are_named() {
        let c = Config::from_lookup(
            env(&[
                ("STATE_BUCKET", "state"),
                ("BRAZE_INSTANCE", "US-03"),
                (
                    "BRAZE_API_KEY_SECRET_ARN",
                    "arn:aws:secretsmanager:us-east-1:1:secret:x",
                ),
            ]),
            true,
        )
        .unwrap();
        assert_eq!(c.state_prefix, "bridge/state/");
        assert_eq!(c.rejects_prefix, "bridge/rejects/");
        assert_eq!(c.rate_limit_requests, 3000);
        assert_eq!(c.max_objects_per_request, 75);
        assert_eq!(c.hourly_request_limit, None);
        assert_eq!(c.routes_location, RoutesLocation::Dir("routes".into()));
        let err = Config::from_lookup(env(&[("BRAZE_INSTANCE", "US-03")]), false).unwrap_err();
        assert_eq!(err, ConfigError::Missing("STATE_BUCKET".into()));
    }

    #[test]
    fn bad_values_name_the_variable_and_plain_keys_are_local_only() {
        let base = [
            ("STATE_BUCKET", "s"),
            ("BRAZE_INSTANCE", "US-03"),
            ("BRAZE_API_KEY", "abcdef0123456789abcdef0123456789"),
        ];
        let mut v = base.to_vec();
        v.push(("RATE_LIMIT_SHARE", "1.5"));
        let err = Config::from_lookup(env(&v), false).unwrap_err();
        assert!(err.to_string().contains("RATE_LIMIT_SHARE"));
        for (value, ok) in [("0", None), ("x", None), ("50000", Some(50_000))] {
            let mut v = base.to_vec();
            v.push(("BRAZE_HOURLY_REQUEST_LIMIT", value));
            match Config::from_lookup(env(&v), false) {
                Ok(c) => assert_eq!(c.hourly_request_limit, ok, "{value}"),
                Err(e) => {
                    assert!(ok.is_none(), "{value}: {e}");
                    assert!(e.to_string().contains("BRAZE_HOURLY_REQUEST_LIMIT"));
                }
            }
        }
        let err = Config::from_lookup(env(&base), true).unwrap_err();
        assert!(err.to_string().contains("BRAZE_API_KEY"));
        assert!(
            !err.to_string().contains("abcdef0123"),
            "the key is never shown"
        );
        assert!(Config::from_lookup(env(&base), false).is_ok());
    }

    #[test]
    fn only_the_long_insecure_switch_lets_a_plain_key_through_under_lambda() {
        let base = [
            ("STATE_BUCKET", "s"),
            ("BRAZE_INSTANCE", "US-03"),
            ("BRAZE_API_KEY", "abcdef0123456789abcdef0123456789"),
        ];
        // The old, easily set name no longer does it.
        let mut old = base.to_vec();
        old.push(("BRIDGE_LOCAL_STACK", "1"));
        assert!(Config::from_lookup(env(&old), true).is_err());
        let mut on = base.to_vec();
        on.push((INSECURE_PLAIN_KEY_SWITCH, "true"));
        assert!(
            Config::from_lookup(env(&on), true).is_err(),
            "only exactly 1 turns it on"
        );
        on.pop();
        on.push((INSECURE_PLAIN_KEY_SWITCH, "1"));
        assert!(Config::from_lookup(env(&on), true).is_ok());
        assert!(INSECURE_PLAIN_KEY_SWITCH.contains("INSECURE"));
        assert!(VARIABLES.contains(&INSECURE_PLAIN_KEY_SWITCH));
    }

    #[test]
    fn the_demo_routes_load() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("routes");
        let routes = load_routes_dir(&dir).unwrap();
        assert!(routes.iter().any(|r| r.name() == "customers"));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod locations_tests {
    use super::*;

    #[test]
    fn locations_read_like_the_full_config() {
        for env in [
            vec![("STATE_BUCKET", "b")],
            vec![
                ("STATE_BUCKET", "b"),
                ("STATE_PREFIX", "s"),
                ("REPORTS_PREFIX", "r/"),
                ("ROUTES_LOCATION", "s3://c/routes/"),
            ],
        ] {
            let mut full = env.clone();
            full.extend([("BRAZE_INSTANCE", "US-03"), ("BRAZE_API_KEY", "k-123")]);
            let get = |vars: &Vec<(&str, &str)>, k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            };
            let c = Config::from_lookup(|k| get(&full, k), false).unwrap();
            let l = Locations::from_lookup(|k| get(&env, k)).unwrap();
            assert_eq!(l.routes_location, c.routes_location);
            assert_eq!(l.state_bucket, c.state_bucket);
            assert_eq!(l.state_prefix, c.state_prefix);
            assert_eq!(l.reports_prefix, c.reports_prefix);
        }
        assert!(Locations::from_lookup(|_| None).is_err());
    }
}
