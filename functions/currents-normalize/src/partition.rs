//! Where a table part goes: `<tables prefix><table>/<table>_<yyyy-MM-dd>.parquet/part-<id>.parquet`,
//! the layout Amperity's courier discovers (one folder of parts below a dated file pattern).
//! The day is the Currents delivery day (`date=` in the key), not event time, so a day's
//! partition is complete when the day is. `<id>` is a hash of the source key, so reprocessing
//! the same object overwrites its part instead of adding a duplicate.

use bridge_shared::s3_uri::join_key;
use chrono::NaiveDate;

/// A part's identity, derived from its source object's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PartId(String);

impl PartId {
    /// The id of the part written for `source_key` (16 hex digits of its XXH3-64).
    pub fn for_source(source_key: &str) -> Self {
        Self(format!(
            "{:016x}",
            xxhash_rust::xxh3::xxh3_64(source_key.as_bytes())
        ))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Where one part lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartLocation {
    /// Table name.
    pub table: String,
    /// Delivery day (partition).
    pub day: NaiveDate,
    /// Part id.
    pub id: PartId,
}

impl PartLocation {
    /// The folder Amperity's file pattern matches: `<table>/<table>_<yyyy-MM-dd>.parquet/`.
    pub fn partition_folder(&self, tables_prefix: &str) -> String {
        let folder = format!(
            "{t}/{t}_{d}.parquet/",
            t = self.table,
            d = self.day.format("%Y-%m-%d")
        );
        join_key(tables_prefix, &folder)
    }

    /// The part's object key.
    pub fn key(&self, tables_prefix: &str) -> String {
        format!(
            "{}part-{}.parquet",
            self.partition_folder(tables_prefix),
            self.id.as_str()
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn part_key_follows_amperity_layout() {
        let loc = PartLocation {
            table: "users_messages_email_send".into(),
            day: NaiveDate::from_ymd_opt(2026, 11, 29).unwrap(),
            id: PartId::for_source("currents/x/event_type=a/date=2026-11-29-10/1/z/f.avro"),
        };
        let key = loc.key("tables/");
        assert!(key.starts_with(
            "tables/users_messages_email_send/users_messages_email_send_2026-11-29.parquet/part-"
        ));
        assert!(key.ends_with(".parquet"));
        assert_eq!(
            key.len(),
            "tables/users_messages_email_send/users_messages_email_send_2026-11-29.parquet/part-"
                .len()
                + 16
                + 8
        );
    }

    #[test]
    fn same_source_same_part_other_source_other_part() {
        assert_eq!(
            PartId::for_source("a/b.avro"),
            PartId::for_source("a/b.avro")
        );
        assert_ne!(
            PartId::for_source("a/b.avro"),
            PartId::for_source("a/c.avro")
        );
    }

    #[test]
    fn prefix_without_slash_or_empty_is_joined_once() {
        let loc = PartLocation {
            table: "t".into(),
            day: NaiveDate::from_ymd_opt(2026, 1, 2).unwrap(),
            id: PartId::for_source("k"),
        };
        assert!(
            loc.key("out/tables")
                .starts_with("out/tables/t/t_2026-01-02.parquet/part-")
        );
        assert!(loc.key("").starts_with("t/t_2026-01-02.parquet/part-"));
    }
}
