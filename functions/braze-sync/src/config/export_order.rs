//! When an export was made, as its route declares it (`order_by`), never guessed. Exports of a
//! route apply in that order: one dated before the export the state reflects is skipped
//! (`skipped_stale`), and one dated more than `max_future_skew` ahead of now is refused, so a
//! mistyped date cannot pin the route's watermark in the future.
//!
//! - `last_modified` (default): the trigger object's S3 `LastModified` (the `.DONE` marker's
//!   in marker mode), i.e. arrival order.
//! - `metadata`: the trigger object's `x-amz-meta-exported-at` (RFC 3339), set by the
//!   uploader; an object without it is refused.
//! - `key`: the trigger's key after the route prefix, parsed exactly with `key_time_format`
//!   (`strftime` syntax, e.g. `customers_%Y%m%d.csv` or `run-%Y-%m-%d/.DONE`); a key that does
//!   not match the whole format is refused.

use std::time::Duration;

use bridge_shared::S3Uri;
use bridge_shared::object_store::ObjectMeta;
use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde::Deserialize;

/// Object metadata key an uploader sets to the export's own time (RFC 3339), for
/// `order_by = "metadata"`.
pub const EXPORTED_AT_METADATA: &str = "exported-at";

/// The default `max_future_skew`.
pub const DEFAULT_MAX_FUTURE_SKEW: &str = "1h";

/// What orders the exports of a route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderBy {
    /// The trigger object's S3 `LastModified`.
    #[default]
    LastModified,
    /// The trigger object's `x-amz-meta-exported-at` (RFC 3339).
    Metadata,
    /// A time in the key, parsed with `key_time_format`.
    Key,
}

/// A route's export order, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOrder {
    /// The source of the time.
    pub by: OrderBy,
    /// `order_by = "key"`: the format of the key after the route prefix.
    pub key_time_format: Option<String>,
    /// How far ahead of now an export may be dated.
    pub max_future_skew: Duration,
    /// The route prefix, cut from keys before parsing them.
    pub prefix: String,
}

/// Why an export's time cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// `order_by = "metadata"` and the object has no `exported-at`.
    #[error(
        "{uri}: the route orders exports by metadata, but the object has no x-amz-meta-{EXPORTED_AT_METADATA}; upload it with --metadata {EXPORTED_AT_METADATA}=<RFC 3339 time>"
    )]
    NoMetadata {
        /// The trigger object.
        uri: String,
    },
    /// The `exported-at` value is not RFC 3339.
    #[error("{uri}: x-amz-meta-{EXPORTED_AT_METADATA} {value:?} is not an RFC 3339 time")]
    BadMetadata {
        /// The trigger object.
        uri: String,
        /// The value.
        value: String,
    },
    /// The key does not match `key_time_format`.
    #[error(
        "{uri}: the key after the route prefix, {name:?}, does not match key_time_format {format:?}: {reason}"
    )]
    KeyMismatch {
        /// The trigger object.
        uri: String,
        /// The key after the prefix.
        name: String,
        /// The format.
        format: String,
        /// The parser's reason.
        reason: String,
    },
    /// S3 gave no usable `LastModified`.
    #[error("{uri}: the object's LastModified ({value:?}) is missing or unreadable")]
    NoLastModified {
        /// The trigger object.
        uri: String,
        /// What S3 gave.
        value: Option<String>,
    },
    /// Dated too far in the future.
    #[error(
        "{uri}: the export is dated {at}, more than max_future_skew ({max}) ahead of now ({now}); refused so it cannot pin the route's watermark. Fix the date (key or metadata) and upload it again, or raise max_future_skew"
    )]
    TooFarAhead {
        /// The trigger object.
        uri: String,
        /// Its time.
        at: String,
        /// Now.
        now: String,
        /// The allowed skew, as configured.
        max: String,
    },
}

impl ExportOrder {
    /// When the export whose trigger is `uri` (with head `meta`) was made.
    pub fn export_time(&self, uri: &S3Uri, meta: &ObjectMeta) -> Result<DateTime<Utc>, OrderError> {
        let u = || uri.to_string();
        match self.by {
            OrderBy::LastModified => meta
                .last_modified
                .as_deref()
                .and_then(parse_instant)
                .ok_or_else(|| OrderError::NoLastModified {
                    uri: u(),
                    value: meta.last_modified.clone(),
                }),
            OrderBy::Metadata => {
                let value = meta
                    .metadata
                    .get(EXPORTED_AT_METADATA)
                    .ok_or_else(|| OrderError::NoMetadata { uri: u() })?;
                DateTime::parse_from_rfc3339(value)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| OrderError::BadMetadata {
                        uri: u(),
                        value: value.clone(),
                    })
            }
            OrderBy::Key => {
                let format = self.key_time_format.clone().unwrap_or_default();
                let name = uri.key.strip_prefix(&self.prefix).unwrap_or(&uri.key);
                parse_key_time(name, &format).map_err(|reason| OrderError::KeyMismatch {
                    uri: u(),
                    name: name.to_string(),
                    format,
                    reason,
                })
            }
        }
    }

    /// Refuses an export dated more than `max_future_skew` after `now`.
    pub fn check_skew(
        &self,
        uri: &S3Uri,
        at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(), OrderError> {
        if self.too_far_ahead(at, now) {
            return Err(OrderError::TooFarAhead {
                uri: uri.to_string(),
                at: at.to_rfc3339(),
                now: now.to_rfc3339(),
                max: humantime::format_duration(self.max_future_skew).to_string(),
            });
        }
        Ok(())
    }

    /// Whether `at` lies more than `max_future_skew` after `now`.
    pub fn too_far_ahead(&self, at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        let skew = chrono::Duration::from_std(self.max_future_skew)
            .unwrap_or_else(|_| chrono::Duration::days(36_500));
        at > now + skew
    }
}

/// An RFC 3339 (or HTTP-date) instant.
pub fn parse_instant(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .or_else(|_| DateTime::parse_from_rfc2822(s))
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Parses `name` with the `strftime` `format`, exactly: the whole name must match. A format
/// with an offset (`%z`) gives that instant; without, the time is UTC; without a time of day,
/// midnight.
pub fn parse_key_time(name: &str, format: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_str(name, format) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(t) = NaiveDateTime::parse_from_str(name, format) {
        return Ok(t.and_utc());
    }
    NaiveDate::parse_from_str(name, format)
        .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc())
        .map_err(|e| e.to_string())
}

/// Checks a `key_time_format`: valid `strftime` items, at least a year, month and day, and a
/// time it writes parses back.
pub fn validate_key_time_format(format: &str) -> Result<(), String> {
    if StrftimeItems::new(format).any(|i| matches!(i, Item::Error)) {
        return Err(format!("{format:?} is not a valid strftime format"));
    }
    let has = |spec: &[&str]| spec.iter().any(|s| format.contains(s));
    if !(has(&["%F", "%s"]) || (has(&["%Y"]) && has(&["%m", "%b", "%B"]) && has(&["%d", "%e"]))) {
        return Err(format!(
            "{format:?} must name a full date (%Y, %m and %d, or %F)"
        ));
    }
    let sample = NaiveDate::from_ymd_opt(2026, 11, 29)
        .and_then(|d| d.and_hms_opt(10, 15, 0))
        .map(|t| t.and_utc())
        .ok_or("internal: sample date")?;
    let written = sample.format(format).to_string();
    parse_key_time(&written, format)
        .map(|_| ())
        .map_err(|e| format!("{format:?} does not parse back what it writes ({written:?}: {e})"))
}

/// Parses a duration such as `1h`, `30m`, `90s` or `2days`.
pub fn parse_skew(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like \"1h\" or \"30m\": {e}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn order(by: OrderBy, fmt: Option<&str>) -> ExportOrder {
        ExportOrder {
            by,
            key_time_format: fmt.map(str::to_string),
            max_future_skew: parse_skew(DEFAULT_MAX_FUTURE_SKEW).unwrap(),
            prefix: "amperity/customers/".into(),
        }
    }

    fn meta(last_modified: Option<&str>, exported_at: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            last_modified: last_modified.map(str::to_string),
            metadata: exported_at
                .map(|v| BTreeMap::from([(EXPORTED_AT_METADATA.to_string(), v.to_string())]))
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    fn uri(name: &str) -> S3Uri {
        S3Uri::new("b", format!("amperity/customers/{name}"))
    }

    #[test]
    fn key_time_is_parsed_exactly_never_hunted() {
        let o = order(OrderBy::Key, Some("customers_%Y%m%d.csv"));
        let m = meta(Some("2026-11-30T08:00:00Z"), None);
        assert_eq!(
            o.export_time(&uri("customers_20261129.csv"), &m)
                .unwrap()
                .to_rfc3339(),
            "2026-11-29T00:00:00+00:00"
        );
        // Digits elsewhere in the key are not a date, and a key off the format is refused.
        for bad in [
            "customers_20261129_v2.csv",
            "export_20261129.csv",
            "customers_2026-11-29.csv",
        ] {
            let e = o.export_time(&uri(bad), &m).unwrap_err();
            assert!(matches!(e, OrderError::KeyMismatch { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("key_time_format"), "{e}");
        }
        let t = order(OrderBy::Key, Some("run-%Y-%m-%dT%H%M%S/.DONE"));
        assert_eq!(
            t.export_time(&uri("run-2026-11-29T101500/.DONE"), &m)
                .unwrap()
                .to_rfc3339(),
            "2026-11-29T10:15:00+00:00"
        );
    }

    #[test]
    fn last_modified_is_the_default_and_ignores_dates_in_names() {
        let o = order(OrderBy::default(), None);
        let m = meta(Some("2026-11-30T08:00:00Z"), Some("2020-01-01T00:00:00Z"));
        assert_eq!(
            o.export_time(&uri("customers_20991231.csv"), &m)
                .unwrap()
                .to_rfc3339(),
            "2026-11-30T08:00:00+00:00"
        );
    }

    #[test]
    fn metadata_order_needs_the_metadata() {
        let o = order(OrderBy::Metadata, None);
        let t = o
            .export_time(
                &uri("x.csv"),
                &meta(None, Some("2026-11-29T10:00:00+01:00")),
            )
            .unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-29T09:00:00+00:00");
        assert!(matches!(
            o.export_time(&uri("x.csv"), &meta(Some("2026-11-29T10:00:00Z"), None)),
            Err(OrderError::NoMetadata { .. })
        ));
        assert!(matches!(
            o.export_time(&uri("x.csv"), &meta(None, Some("yesterday"))),
            Err(OrderError::BadMetadata { .. })
        ));
    }

    #[test]
    fn a_date_far_in_the_future_is_refused_with_the_setting_named() {
        let o = order(OrderBy::Key, Some("customers_%Y%m%d.csv"));
        let now = parse_instant("2026-11-30T12:00:00Z").unwrap();
        let u = uri("customers_20991231.csv");
        let at = o.export_time(&u, &meta(None, None)).unwrap();
        let e = o.check_skew(&u, at, now).unwrap_err().to_string();
        assert!(
            e.contains("max_future_skew (1h)") && e.contains("2099-12-31"),
            "{e}"
        );
        assert!(
            o.check_skew(&u, now + chrono::Duration::minutes(59), now)
                .is_ok()
        );
        assert!(
            o.check_skew(&u, now + chrono::Duration::minutes(61), now)
                .is_err()
        );
    }

    #[test]
    fn formats_are_validated() {
        assert!(validate_key_time_format("customers_%Y%m%d.csv").is_ok());
        assert!(validate_key_time_format("%F/.DONE").is_ok());
        assert!(validate_key_time_format("customers_%Y.csv").is_err());
        assert!(validate_key_time_format("customers_%Y%m%d%Q.csv").is_err());
        assert_eq!(parse_skew("30m").unwrap(), Duration::from_secs(1800));
        assert!(parse_skew("soon").is_err());
    }
}
