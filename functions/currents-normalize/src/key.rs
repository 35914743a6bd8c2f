//! What a Currents object key says: the event type (`event_type=`), the delivery hour
//! (`date=YYYY-MM-DD-HH`, the UTC hour Braze queued the events, not event time) and, when
//! present, the schema id (`<schema-id>` segment right after `date=`) or schema version
//! (`version=<n>`). Segments are found by name, never by position: Braze's layout has changed
//! (`…/date=D/<schema-id>/<zone>/…` and `…/date=D/version=<n>/<env>/…` both occur, older file
//! names lack the cluster) and its docs warn it may change again.

use chrono::{NaiveDate, NaiveDateTime, NaiveTime};

/// The UTC hour Braze queued a file's events (`date=` in the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeliveryHour {
    /// The day (the table partition).
    pub day: NaiveDate,
    /// The hour, 0-23 (0 when the key gives only a day).
    pub hour: u32,
}

impl DeliveryHour {
    /// The hour as microseconds since the Unix epoch (UTC).
    pub fn timestamp_micros(&self) -> i64 {
        let t = NaiveTime::from_hms_opt(self.hour, 0, 0).unwrap_or(NaiveTime::MIN);
        NaiveDateTime::new(self.day, t).and_utc().timestamp_micros()
    }

    /// Whole seconds from the start of this hour to `at` (0 when `at` is earlier).
    pub fn lag_seconds(&self, at: chrono::DateTime<chrono::Utc>) -> u64 {
        let micros = at.timestamp_micros() - self.timestamp_micros();
        u64::try_from(micros / 1_000_000).unwrap_or(0)
    }
}

/// A parsed Currents object key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentsKey {
    /// Braze's event type, e.g. `users.messages.email.Send`.
    pub event_type: String,
    /// When Braze queued the events.
    pub delivery: DeliveryHour,
    /// The numeric `<schema-id>` segment following `date=`, in the older layout.
    pub schema_id: Option<i64>,
    /// `version=<n>`, in the newer layout.
    pub schema_version: Option<i64>,
    /// The file name (last segment).
    pub file_name: String,
}

/// Why a key is not a Currents key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// No `<name>=` segment.
    #[error("key {key:?} has no {segment}= segment")]
    Missing {
        /// The key.
        key: String,
        /// Which segment.
        segment: &'static str,
    },
    /// The segment appears more than once.
    #[error("key {key:?} has more than one {segment}= segment")]
    Repeated {
        /// The key.
        key: String,
        /// Which segment.
        segment: &'static str,
    },
    /// The segment's value is malformed.
    #[error("key {key:?}: {segment}={value:?} is not valid ({expected})")]
    Invalid {
        /// The key.
        key: String,
        /// Which segment.
        segment: &'static str,
        /// Its value.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// The key names a folder, not a file.
    #[error("key {0:?} names a folder, not a file")]
    Folder(String),
}

fn find<'k>(
    key: &str,
    segments: &[&'k str],
    name: &'static str,
) -> Result<Option<(usize, &'k str)>, KeyError> {
    let prefix_len = name.len() + 1;
    let mut found = None;
    for (i, s) in segments.iter().enumerate() {
        if s.len() >= prefix_len && s.starts_with(name) && s.as_bytes()[name.len()] == b'=' {
            if found.is_some() {
                return Err(KeyError::Repeated {
                    key: key.into(),
                    segment: name,
                });
            }
            found = Some((i, &s[prefix_len..]));
        }
    }
    Ok(found)
}

fn parse_hour(key: &str, value: &str) -> Result<DeliveryHour, KeyError> {
    let invalid = || KeyError::Invalid {
        key: key.into(),
        segment: "date",
        value: value.into(),
        expected: "YYYY-MM-DD-HH",
    };
    let (day, hour) = match value.len() {
        13 => (&value[..10], Some(&value[11..])),
        10 => (value, None),
        _ => return Err(invalid()),
    };
    if value.len() == 13 && value.as_bytes()[10] != b'-' {
        return Err(invalid());
    }
    let day = NaiveDate::parse_from_str(day, "%Y-%m-%d").map_err(|_| invalid())?;
    let hour = match hour {
        Some(h) if h.bytes().all(|b| b.is_ascii_digit()) => h
            .parse::<u32>()
            .ok()
            .filter(|h| *h < 24)
            .ok_or_else(invalid)?,
        Some(_) => return Err(invalid()),
        None => 0,
    };
    Ok(DeliveryHour { day, hour })
}

/// Parses a (URL-decoded) Currents object key.
pub fn parse(key: &str) -> Result<CurrentsKey, KeyError> {
    if key.ends_with('/') {
        return Err(KeyError::Folder(key.into()));
    }
    let segments: Vec<&str> = key.split('/').collect();
    let (_, event_type) = find(key, &segments, "event_type")?.ok_or(KeyError::Missing {
        key: key.into(),
        segment: "event_type",
    })?;
    if event_type.is_empty()
        || !event_type
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(KeyError::Invalid {
            key: key.into(),
            segment: "event_type",
            value: event_type.into(),
            expected: "letters, digits, '.', '_' or '-'",
        });
    }
    let (date_at, date) = find(key, &segments, "date")?.ok_or(KeyError::Missing {
        key: key.into(),
        segment: "date",
    })?;
    let delivery = parse_hour(key, date)?;
    let last = segments.len() - 1;
    // `<schema-id>` is the all-digit folder right after date= (never the file name).
    let schema_id = segments
        .get(date_at + 1)
        .filter(|s| date_at + 1 < last && !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<i64>().ok());
    let schema_version = match find(key, &segments, "version")? {
        Some((_, v)) => Some(v.parse::<i64>().map_err(|_| KeyError::Invalid {
            key: key.into(),
            segment: "version",
            value: v.into(),
            expected: "an integer",
        })?),
        None => None,
    };
    Ok(CurrentsKey {
        event_type: event_type.into(),
        delivery,
        schema_id,
        schema_version,
        file_name: segments[last].into(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn delivery_lag_counts_from_the_start_of_the_delivery_hour() {
        let h = DeliveryHour {
            day: NaiveDate::from_ymd_opt(2026, 11, 29).unwrap(),
            hour: 10,
        };
        let at = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .with_timezone(&chrono::Utc)
        };
        assert_eq!(h.lag_seconds(at("2026-11-29T10:00:00Z")), 0);
        assert_eq!(h.lag_seconds(at("2026-11-29T11:30:05Z")), 5405);
        assert_eq!(
            h.lag_seconds(at("2026-11-29T09:00:00Z")),
            0,
            "clock skew is no lag"
        );
    }

    #[test]
    fn schema_id_layout_is_parsed_by_name() {
        let k = parse(
            "currents/dataexport.prod-01.S3.integration.5f0c/event_type=users.messages.email.Send/date=2026-11-29-10/421/zone-a/dataexport.prod-01.S3.integration.5f0c+0+0000000007.avro",
        )
        .unwrap();
        assert_eq!(k.event_type, "users.messages.email.Send");
        assert_eq!(k.delivery.day.to_string(), "2026-11-29");
        assert_eq!(k.delivery.hour, 10);
        assert_eq!(k.schema_id, Some(421));
        assert_eq!(k.schema_version, None);
    }

    #[test]
    fn version_layout_is_parsed_by_name() {
        let k = parse(
            "p/dataexport.prod-03.S3.integration.ab/event_type=users.behaviors.CustomEvent/date=2026-01-07-23/version=7/prod/dataexport.prod-03.S3.integration.ab+3+12.avro",
        )
        .unwrap();
        assert_eq!(k.event_type, "users.behaviors.CustomEvent");
        assert_eq!(k.delivery.hour, 23);
        assert_eq!(k.schema_id, None);
        assert_eq!(k.schema_version, Some(7));
    }

    #[test]
    fn old_file_name_without_cluster_and_other_segment_order_work() {
        let k = parse(
            "date=2017-08-24-01/event_type=users.messages.email.Open/dataexport.S3.integration.599f118afbe76a01c513c63c+2+0000035465.avro",
        )
        .unwrap();
        assert_eq!(k.event_type, "users.messages.email.Open");
        assert_eq!(k.schema_id, None);
        assert_eq!(
            k.file_name,
            "dataexport.S3.integration.599f118afbe76a01c513c63c+2+0000035465.avro"
        );
    }

    #[test]
    fn key_with_spaces_from_url_decoding_is_fine() {
        let k = parse(
            "currents/event_type=users.messages.email.Send/date=2026-11-29-10/7/zone a+b/f 1.avro",
        )
        .unwrap();
        assert_eq!(k.schema_id, Some(7));
        assert_eq!(k.file_name, "f 1.avro");
    }

    #[test]
    fn delivery_hour_is_a_utc_timestamp() {
        let k = parse("event_type=a.B/date=1970-01-02-03/f.avro").unwrap();
        assert_eq!(
            k.delivery.timestamp_micros(),
            (86_400 + 3 * 3600) * 1_000_000
        );
    }

    #[test]
    fn missing_or_bad_segments_are_errors() {
        assert!(matches!(
            parse("currents/event_type=a.B/f.avro"),
            Err(KeyError::Missing {
                segment: "date",
                ..
            })
        ));
        assert!(matches!(
            parse("currents/date=2026-11-29-10/f.avro"),
            Err(KeyError::Missing {
                segment: "event_type",
                ..
            })
        ));
        assert!(matches!(
            parse("event_type=a.B/date=2026-13-29-10/f.avro"),
            Err(KeyError::Invalid {
                segment: "date",
                ..
            })
        ));
        assert!(matches!(
            parse("event_type=a.B/date=2026-11-29-24/f.avro"),
            Err(KeyError::Invalid {
                segment: "date",
                ..
            })
        ));
        assert!(matches!(
            parse("event_type=a.B/event_type=c.D/date=2026-11-29-01/f.avro"),
            Err(KeyError::Repeated { .. })
        ));
        assert!(matches!(
            parse("event_type=a.B/date=2026-11-29-01/"),
            Err(KeyError::Folder(_))
        ));
    }
}
