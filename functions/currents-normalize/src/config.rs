//! Deployment settings, read once from the environment at start-up (failing fast, naming the
//! variable), and the guard that keeps the function from ever processing its own outputs.

use bridge_shared::runtime::{env_or, env_parse};

/// Settings of one deployment. Every field is an environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `TABLES_BUCKET`: bucket receiving tables, quarantine and reports. Unset (the default):
    /// each input object's own bucket.
    pub tables_bucket: Option<String>,
    /// `TABLES_PREFIX` (default `tables/`): tables are written under
    /// `<prefix><table>/<table>_<yyyy-MM-dd>.parquet/part-<id>.parquet`.
    pub tables_prefix: String,
    /// `QUARANTINE_PREFIX` (default `quarantine/`): unreadable objects are copied to
    /// `<prefix><source key>` with `<prefix><source key>.reason.json` beside them.
    pub quarantine_prefix: String,
    /// `REPORTS_PREFIX` (default `reports/currents/`): one run report per invocation, at
    /// `<prefix><yyyy-mm-dd>/<time>-<request id>.json`.
    pub reports_prefix: String,
    /// `CURRENTS_PREFIX` (default `currents/`): the input prefix. Objects outside it, or inside
    /// any output prefix in the output bucket, are ignored with one log line. Empty means the
    /// whole bucket (then `TABLES_BUCKET` must name another bucket).
    pub currents_prefix: String,
    /// `STATE_PREFIX` (default `state/currents/`): compaction leases
    /// (`<prefix>compaction/leases/<table>/<day>.json`) and manifests of the source parts each
    /// compacted table-day holds (`<prefix>compaction/manifests/<table>/<day>.json`), in the
    /// output bucket. Kept outside the tables so Athena and Amperity never read them.
    pub state_prefix: String,
    /// `MAX_OBJECT_BYTES` (default 536870912, 512 MiB): larger objects are quarantined unread.
    pub max_object_bytes: u64,
    /// `METRICS_NAMESPACE` (default `AmperityBrazeBridge`): CloudWatch namespace of the EMF
    /// metrics.
    pub metrics_namespace: String,
    /// `PROFILE_FEED_BUCKET`: braze-sync's state bucket, when both functions are deployed
    /// together. Set, a `users.UserDeleteRequest`, `users.UserOrphan` or `users.profile.Update`
    /// object also writes its profile changes there for braze-sync
    /// ([`bridge_shared::profile_feed`]). Unset (the default): no feed.
    pub profile_feed_bucket: Option<String>,
    /// `PROFILE_FEED_PREFIX` (default `bridge/state/_currents/feed/`): where in
    /// `PROFILE_FEED_BUCKET` the feed goes: braze-sync's `STATE_PREFIX` followed by
    /// `_currents/feed/`.
    pub profile_feed_prefix: String,
}

/// Default for `PROFILE_FEED_PREFIX`: braze-sync's default `STATE_PREFIX` and the feed folder.
pub const DEFAULT_PROFILE_FEED_PREFIX: &str = "bridge/state/_currents/feed/";

/// A configuration problem, naming the variable.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A variable does not parse.
    #[error(transparent)]
    Env(#[from] bridge_shared::runtime::ConfigError),
    /// Outputs would land where they trigger the function again.
    #[error(
        "{input_var}={input:?} overlaps {output_var}={output:?} in the same bucket: outputs would trigger the function again (set TABLES_BUCKET to another bucket or use disjoint prefixes)"
    )]
    Overlap {
        /// The input variable.
        input_var: &'static str,
        /// Its value.
        input: String,
        /// The output variable.
        output_var: &'static str,
        /// Its value.
        output: String,
    },
}

fn folder(prefix: String) -> String {
    if prefix.is_empty() || prefix.ends_with('/') {
        prefix
    } else {
        format!("{prefix}/")
    }
}

/// Default for `MAX_OBJECT_BYTES`.
pub const DEFAULT_MAX_OBJECT_BYTES: u64 = 512 << 20;

impl Default for Config {
    fn default() -> Self {
        Self {
            tables_bucket: None,
            tables_prefix: "tables/".into(),
            quarantine_prefix: "quarantine/".into(),
            reports_prefix: "reports/currents/".into(),
            state_prefix: "state/currents/".into(),
            currents_prefix: "currents/".into(),
            max_object_bytes: DEFAULT_MAX_OBJECT_BYTES,
            metrics_namespace: "AmperityBrazeBridge".into(),
            profile_feed_bucket: None,
            profile_feed_prefix: DEFAULT_PROFILE_FEED_PREFIX.into(),
        }
    }
}

impl Config {
    /// Reads and validates the configuration from the environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let cfg = Self {
            tables_bucket: std::env::var("TABLES_BUCKET")
                .ok()
                .filter(|b| !b.trim().is_empty()),
            tables_prefix: folder(env_or("TABLES_PREFIX", "tables/")),
            quarantine_prefix: folder(env_or("QUARANTINE_PREFIX", "quarantine/")),
            reports_prefix: folder(env_or("REPORTS_PREFIX", "reports/currents/")),
            state_prefix: folder(env_or("STATE_PREFIX", "state/currents/")),
            currents_prefix: folder(env_or("CURRENTS_PREFIX", "currents/")),
            max_object_bytes: env_parse("MAX_OBJECT_BYTES", DEFAULT_MAX_OBJECT_BYTES)?,
            metrics_namespace: env_or("METRICS_NAMESPACE", "AmperityBrazeBridge"),
            profile_feed_bucket: std::env::var("PROFILE_FEED_BUCKET")
                .ok()
                .filter(|b| !b.trim().is_empty()),
            profile_feed_prefix: folder(env_or("PROFILE_FEED_PREFIX", DEFAULT_PROFILE_FEED_PREFIX)),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Refuses prefixes that would make outputs trigger the function again when tables land
    /// in the input bucket (`TABLES_BUCKET` unset).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tables_bucket.is_some() {
            // The input bucket is only known per object; `is_own_output` guards at run time.
            return Ok(());
        }
        for (var, out) in self.output_prefixes() {
            let input = &self.currents_prefix;
            if input.starts_with(out) || out.starts_with(input.as_str()) {
                return Err(ConfigError::Overlap {
                    input_var: "CURRENTS_PREFIX",
                    input: input.clone(),
                    output_var: var,
                    output: out.to_string(),
                });
            }
        }
        Ok(())
    }

    /// The output prefixes with their variable names.
    pub fn output_prefixes(&self) -> [(&'static str, &str); 4] {
        [
            ("TABLES_PREFIX", self.tables_prefix.as_str()),
            ("QUARANTINE_PREFIX", self.quarantine_prefix.as_str()),
            ("REPORTS_PREFIX", self.reports_prefix.as_str()),
            ("STATE_PREFIX", self.state_prefix.as_str()),
        ]
    }

    /// The bucket outputs for an object of `input_bucket` go to.
    pub fn output_bucket<'a>(&'a self, input_bucket: &'a str) -> &'a str {
        self.tables_bucket.as_deref().unwrap_or(input_bucket)
    }

    /// True when `bucket/key` is one of this function's outputs.
    pub fn is_own_output(&self, bucket: &str, key: &str) -> bool {
        if self.profile_feed_bucket.as_deref() == Some(bucket)
            && key.starts_with(&self.profile_feed_prefix)
        {
            return true;
        }
        bucket == self.output_bucket(bucket)
            && self
                .output_prefixes()
                .iter()
                .any(|(_, p)| key.starts_with(p))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_do_not_overlap() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn whole_bucket_input_with_tables_in_the_same_bucket_is_refused() {
        let cfg = Config {
            currents_prefix: String::new(),
            ..Config::default()
        };
        let err = cfg.validate().unwrap_err();
        assert!(err.to_string().contains("TABLES_PREFIX"), "{err}");
        let cfg = Config {
            currents_prefix: String::new(),
            tables_bucket: Some("lake".into()),
            ..Config::default()
        };
        cfg.validate().unwrap();
    }

    #[test]
    fn outputs_inside_the_input_prefix_are_refused() {
        let cfg = Config {
            tables_prefix: "currents/tables/".into(),
            ..Config::default()
        };
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn own_outputs_are_recognised_in_the_output_bucket_only() {
        let cfg = Config {
            tables_bucket: Some("lake".into()),
            ..Config::default()
        };
        assert!(cfg.is_own_output("lake", "tables/t/x.parquet"));
        assert!(!cfg.is_own_output("raw", "tables/t/x.parquet"));
        assert!(Config::default().is_own_output("raw", "quarantine/currents/x.avro"));
    }

    /// The README's configuration table names every variable the code reads.
    #[test]
    fn readme_documents_every_variable() {
        let readme = include_str!("../README.md");
        let code = include_str!("config.rs");
        let mut vars: Vec<&str> = code
            .split('`')
            .filter(|w| {
                w.len() > 3
                    && w.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                    && w.contains('_')
            })
            .collect();
        vars.sort();
        vars.dedup();
        assert!(vars.len() >= 7, "{vars:?}");
        for v in vars {
            assert!(readme.contains(&format!("| `{v}` |")), "README lacks {v}");
        }
    }

    #[test]
    fn prefixes_get_a_trailing_slash() {
        assert_eq!(folder("tables".into()), "tables/");
        assert_eq!(folder(String::new()), "");
    }
}
