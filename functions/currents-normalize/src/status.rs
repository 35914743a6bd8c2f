//! `currents-normalize status [--day D]`: per table, for one delivery day, its parts, rows (from
//! the Parquet footers, read as a suffix range: no part is read whole), bytes, last write,
//! whether compaction has absorbed every part, and the objects quarantined for that day.
//! [`DayStatus::build`] is the pure core over what was read; [`read_day_status`] reads it
//! through an [`ObjectStore`]; [`render`] draws the table. The JSON field names are the
//! `DayStatus` fields below and are kept stable for scripts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bridge_shared::object_store::ObjectMeta;
use bridge_shared::{ObjectStore, S3Uri, StoreError};
use bytes::Bytes;
use chrono::NaiveDate;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::compact::plan::parse_part_key;
use crate::config::Config;

/// Bytes fetched from the end of a part at first: the footer of a part this crate writes
/// fits, so one request per part is the rule.
pub const FOOTER_GUESS: u64 = 64 * 1024;
/// Footers read at once.
pub const FOOTER_CONCURRENCY: usize = 8;
/// Reason objects read per day at most (the rest are counted, not described).
pub const REASONS_READ: usize = 50;

/// One day's status (`--json` prints this object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayStatus {
    /// Delivery day, `YYYY-MM-DD`.
    pub day: String,
    /// Bucket of the tables.
    pub bucket: String,
    /// One entry per table with parts that day, by table name.
    pub tables: Vec<TableStatus>,
    /// Objects quarantined for that day (by the `date=` of their Currents key, else by when
    /// they were quarantined).
    pub quarantined: Vec<Quarantined>,
}

/// One table's partition of the day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TableStatus {
    /// Table name.
    pub table: String,
    /// Parts in the partition.
    pub parts: usize,
    /// Of which written by compaction (`part-compacted-*`).
    pub compacted_parts: usize,
    /// Rows in all parts (from their footers).
    pub rows: u64,
    /// Bytes of all parts.
    pub bytes: u64,
    /// Newest part's write time (RFC 3339), when the store says.
    pub last_write: Option<String>,
    /// True when compaction has absorbed every part (only compacted parts remain).
    pub compacted: bool,
    /// Parts whose footer could not be read (their rows are not counted), with why.
    pub unreadable: Vec<String>,
}

/// An object quarantined for the day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Quarantined {
    /// `s3://` address of the reason object.
    pub reason_object: String,
    /// The source it was made for.
    pub source: Option<String>,
    /// The step that failed.
    pub step: Option<String>,
    /// What failed.
    pub reason: Option<String>,
}

/// Why a day's status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Listing the tables or quarantine failed.
    #[error("status of {day}: listing s3://{bucket}/{prefix}: {error}")]
    List {
        /// The day.
        day: NaiveDate,
        /// Bucket.
        bucket: String,
        /// Prefix.
        prefix: String,
        /// Why.
        error: StoreError,
    },
}

/// The row count of a Parquet object from its tail (`need`: how many tail bytes the footer
/// needs, when `tail` is too short).
#[derive(Debug, PartialEq, Eq)]
pub enum Footer {
    /// Rows in the file.
    Rows(u64),
    /// Read this many bytes from the end and try again.
    Need(u64),
}

/// The day `--day` names: `YYYY-MM-DD`, `today`, `yesterday`, or `-N` (N days before today).
pub fn parse_day(text: &str, today: NaiveDate) -> Result<NaiveDate, String> {
    let back = |n: u64| {
        today
            .checked_sub_days(chrono::Days::new(n))
            .ok_or_else(|| format!("{text:?} is before the calendar starts"))
    };
    match text {
        "today" => Ok(today),
        "yesterday" => back(1),
        t if t.starts_with('-') => t[1..]
            .parse::<u64>()
            .map_err(|_| format!("{t:?}: give -N with N a number of days"))
            .and_then(back),
        t => NaiveDate::parse_from_str(t, "%Y-%m-%d")
            .map_err(|_| format!("{t:?} is not YYYY-MM-DD, today, yesterday or -N")),
    }
}

/// Reads the row count from the last bytes of a Parquet file.
pub fn footer_rows(tail: &[u8]) -> Result<Footer, String> {
    let n = tail.len();
    if n < 8 || &tail[n - 4..] != b"PAR1" {
        return Err("not a Parquet file (no PAR1 footer)".into());
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&tail[n - 8..n - 4]);
    let len = u32::from_le_bytes(len) as usize;
    if len + 8 > n {
        return Ok(Footer::Need(len as u64 + 8));
    }
    let meta =
        parquet::file::metadata::ParquetMetaDataReader::decode_metadata(&tail[n - 8 - len..n - 8])
            .map_err(|e| format!("footer does not decode: {e}"))?;
    Ok(Footer::Rows(
        meta.file_metadata().num_rows().max(0).unsigned_abs(),
    ))
}

/// The day a quarantined key belongs to: its Currents `date=YYYY-MM-DD-HH`, else the day it
/// was quarantined.
fn quarantine_day(meta: &ObjectMeta) -> Option<NaiveDate> {
    let from_key = meta.key.split('/').find_map(|seg| {
        let d = seg.strip_prefix("date=")?;
        NaiveDate::parse_from_str(d.get(..10)?, "%Y-%m-%d").ok()
    });
    from_key.or_else(|| {
        let t = meta.last_modified.as_deref()?;
        NaiveDate::parse_from_str(t.get(..10)?, "%Y-%m-%d").ok()
    })
}

/// What `status` read for one day, before it is summarised.
#[derive(Debug, Clone, Default)]
pub struct DayReading {
    /// Bucket of the tables.
    pub bucket: String,
    /// `TABLES_PREFIX`.
    pub tables_prefix: String,
    /// The listing of the day's partitions (any key; others are ignored).
    pub parts: Vec<ObjectMeta>,
    /// Rows per part key, or why the footer could not be read.
    pub rows: BTreeMap<String, Result<u64, String>>,
    /// The reason objects of the day's quarantined objects, with their bodies when read.
    pub quarantined: Vec<(ObjectMeta, Option<Bytes>)>,
}

impl DayStatus {
    /// Summarises one day.
    pub fn build(day: NaiveDate, reading: &DayReading) -> DayStatus {
        let mut tables: BTreeMap<String, TableStatus> = BTreeMap::new();
        for p in &reading.parts {
            let Some((td, compacted)) = parse_part_key(&reading.tables_prefix, &p.key) else {
                continue;
            };
            if td.day != day {
                continue;
            }
            let t = tables
                .entry(td.table.clone())
                .or_insert_with(|| TableStatus {
                    table: td.table.clone(),
                    ..TableStatus::default()
                });
            t.parts += 1;
            t.compacted_parts += usize::from(compacted);
            t.bytes += p.size;
            match reading.rows.get(&p.key) {
                Some(Ok(rows)) => t.rows += rows,
                Some(Err(why)) => t.unreadable.push(format!("{}: {why}", p.key)),
                None => t.unreadable.push(format!("{}: footer not read", p.key)),
            }
            if p.last_modified > t.last_write {
                t.last_write = p.last_modified.clone();
            }
        }
        for t in tables.values_mut() {
            t.compacted = t.parts > 0 && t.compacted_parts == t.parts;
        }
        let quarantined = reading
            .quarantined
            .iter()
            .filter(|(m, _)| quarantine_day(m) == Some(day))
            .map(|(m, body)| {
                let v: serde_json::Value = body
                    .as_ref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or_default();
                let s = |f: &str| v[f].as_str().map(str::to_string);
                Quarantined {
                    reason_object: S3Uri::new(&reading.bucket, &m.key).to_string(),
                    source: s("source"),
                    step: s("step"),
                    reason: s("reason"),
                }
            })
            .collect();
        DayStatus {
            day: day.format("%Y-%m-%d").to_string(),
            bucket: reading.bucket.clone(),
            tables: tables.into_values().collect(),
            quarantined,
        }
    }
}

async fn rows_of(store: &dyn ObjectStore, uri: &S3Uri, size: u64) -> Result<u64, String> {
    let mut want = FOOTER_GUESS.min(size.max(8));
    for _ in 0..2 {
        let tail = store.get_tail(uri, want).await.map_err(|e| e.to_string())?;
        match footer_rows(&tail)? {
            Footer::Rows(n) => return Ok(n),
            Footer::Need(n) if n > want && n <= size => want = n,
            Footer::Need(n) => return Err(format!("footer of {n} bytes in a {size}-byte part")),
        }
    }
    Err("footer still incomplete".into())
}

/// Reads one day's status from the output bucket: the tables listing, every part's footer, and
/// the quarantine reasons of the day.
pub async fn read_day_status(
    store: &dyn ObjectStore,
    cfg: &Config,
    bucket: &str,
    day: NaiveDate,
) -> Result<DayStatus, StatusError> {
    let list = |prefix: String| async move {
        store
            .list(bucket, &prefix)
            .await
            .map_err(|error| StatusError::List {
                day,
                bucket: bucket.to_string(),
                prefix,
                error,
            })
    };
    let parts: Vec<ObjectMeta> = list(cfg.tables_prefix.clone())
        .await?
        .into_iter()
        .filter(|m| parse_part_key(&cfg.tables_prefix, &m.key).is_some_and(|(td, _)| td.day == day))
        .collect();
    let rows: BTreeMap<String, Result<u64, String>> = futures::stream::iter(parts.iter())
        .map(|m| async move {
            let uri = S3Uri::new(bucket, &m.key);
            (m.key.clone(), rows_of(store, &uri, m.size).await)
        })
        .buffer_unordered(FOOTER_CONCURRENCY)
        .collect()
        .await;
    let mut quarantined = Vec::new();
    let reasons: Vec<ObjectMeta> = list(cfg.quarantine_prefix.clone())
        .await?
        .into_iter()
        .filter(|m| m.key.ends_with(".reason.json") && quarantine_day(m) == Some(day))
        .collect();
    for (i, m) in reasons.into_iter().enumerate() {
        let body = if i < REASONS_READ {
            store
                .get(&S3Uri::new(bucket, &m.key))
                .await
                .ok()
                .map(|(_, b)| b)
        } else {
            None
        };
        quarantined.push((m, body));
    }
    Ok(DayStatus::build(
        day,
        &DayReading {
            bucket: bucket.to_string(),
            tables_prefix: cfg.tables_prefix.clone(),
            parts,
            rows,
            quarantined,
        },
    ))
}

/// The day as a table for a terminal.
pub fn render(s: &DayStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Currents tables in s3://{} for {}", s.bucket, s.day);
    if s.tables.is_empty() {
        let _ = writeln!(out, "  no parts written that day");
    } else {
        let _ = writeln!(
            out,
            "  {:<28} {:>6} {:>10} {:>12} {:<22} compacted",
            "table", "parts", "rows", "bytes", "last write"
        );
        for t in &s.tables {
            let _ = writeln!(
                out,
                "  {:<28} {:>6} {:>10} {:>12} {:<22} {}",
                t.table,
                t.parts,
                t.rows,
                t.bytes,
                t.last_write
                    .as_deref()
                    .map(short_time)
                    .unwrap_or("-".into()),
                if t.compacted {
                    "yes".to_string()
                } else if t.compacted_parts > 0 {
                    format!("no ({} new parts)", t.parts - t.compacted_parts)
                } else {
                    "no".to_string()
                }
            );
            for u in &t.unreadable {
                let _ = writeln!(out, "    unreadable footer: {u}");
            }
        }
    }
    if s.quarantined.is_empty() {
        let _ = writeln!(out, "  quarantined: none");
    } else {
        let _ = writeln!(out, "  quarantined: {}", s.quarantined.len());
        for q in &s.quarantined {
            let _ = writeln!(
                out,
                "    {} [{}] {}\n      {}",
                q.source.as_deref().unwrap_or("?"),
                q.step.as_deref().unwrap_or("?"),
                q.reason.as_deref().unwrap_or(""),
                q.reason_object
            );
        }
    }
    out
}

fn short_time(t: &str) -> String {
    match chrono::DateTime::parse_from_rfc3339(t) {
        Ok(t) => t
            .with_timezone(&chrono::Utc)
            .format("%Y-%m-%d %H:%M:%SZ")
            .to_string(),
        Err(_) => t.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn part(key: &str, size: u64, at: &str) -> ObjectMeta {
        ObjectMeta {
            key: key.into(),
            size,
            last_modified: Some(at.into()),
            ..ObjectMeta::default()
        }
    }

    fn parquet_with_rows(n: i64) -> Bytes {
        use arrow_array::{Int64Array, RecordBatch};
        let col = Arc::new(Int64Array::from_iter_values(0..n));
        let batch = RecordBatch::try_from_iter([("id", col as arrow_array::ArrayRef)]).unwrap();
        let mut buf = Vec::new();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        Bytes::from(buf)
    }

    #[test]
    fn days_are_dates_or_words_relative_to_today() {
        let today = NaiveDate::from_ymd_opt(2026, 11, 30).unwrap();
        let d = |s| parse_day(s, today).map(|d| d.to_string());
        assert_eq!(d("today").unwrap(), "2026-11-30");
        assert_eq!(d("yesterday").unwrap(), "2026-11-29");
        assert_eq!(d("-3").unwrap(), "2026-11-27");
        assert_eq!(d("2026-01-02").unwrap(), "2026-01-02");
        assert!(d("2026-13-01").is_err() && d("-x").is_err());
    }

    #[test]
    fn rows_come_from_the_footer_and_a_short_tail_asks_for_more() {
        let file = parquet_with_rows(1234);
        assert_eq!(footer_rows(&file).unwrap(), Footer::Rows(1234));
        let Footer::Need(n) = footer_rows(&file[file.len() - 8..]).unwrap() else {
            panic!("8 bytes hold no metadata")
        };
        assert_eq!(
            footer_rows(&file[file.len() - n as usize..]).unwrap(),
            Footer::Rows(1234)
        );
        assert!(footer_rows(b"not parquet at all").is_err());
    }

    fn reading() -> DayReading {
        let t = "tables/";
        DayReading {
            bucket: "lake".into(),
            tables_prefix: t.into(),
            parts: vec![
                part(
                    "tables/email_send/email_send_2026-11-29.parquet/part-compacted-aa.parquet",
                    900,
                    "2026-11-30T01:00:00Z",
                ),
                part(
                    "tables/email_send/email_send_2026-11-29.parquet/part-bb.parquet",
                    100,
                    "2026-11-30T02:00:00Z",
                ),
                part(
                    "tables/email_open/email_open_2026-11-29.parquet/part-compacted-cc.parquet",
                    500,
                    "2026-11-30T01:00:00Z",
                ),
                part(
                    "tables/email_open/email_open_2026-11-28.parquet/part-dd.parquet",
                    50,
                    "2026-11-28T01:00:00Z",
                ),
                part(
                    "tables/email_open/email_open_2026-11-29.parquet/_SUCCESS",
                    0,
                    "2026-11-30T01:00:00Z",
                ),
            ],
            rows: [
                (
                    "tables/email_send/email_send_2026-11-29.parquet/part-compacted-aa.parquet"
                        .to_string(),
                    Ok(90),
                ),
                (
                    "tables/email_send/email_send_2026-11-29.parquet/part-bb.parquet".to_string(),
                    Err("footer does not decode".to_string()),
                ),
                (
                    "tables/email_open/email_open_2026-11-29.parquet/part-compacted-cc.parquet"
                        .to_string(),
                    Ok(50),
                ),
            ]
            .into(),
            quarantined: vec![
                (
                    part(
                        "quarantine/currents/event_type=x/date=2026-11-29-10/a.avro.reason.json",
                        10,
                        "2026-11-30T00:00:00Z",
                    ),
                    Some(Bytes::from(
                        r#"{"source":"s3://c/currents/event_type=x/date=2026-11-29-10/a.avro","step":"decode","reason":"bad block"}"#,
                    )),
                ),
                (
                    part(
                        "quarantine/currents/event_type=x/date=2026-11-28-10/b.avro.reason.json",
                        10,
                        "2026-11-29T00:00:00Z",
                    ),
                    None,
                ),
                (
                    part(
                        "quarantine/odd/name.avro.reason.json",
                        10,
                        "2026-11-29T05:00:00Z",
                    ),
                    None,
                ),
            ],
        }
    }

    #[test]
    fn a_day_counts_parts_rows_and_compaction_per_table_and_its_quarantine() {
        let day = NaiveDate::from_ymd_opt(2026, 11, 29).unwrap();
        let s = DayStatus::build(day, &reading());
        assert_eq!(s.day, "2026-11-29");
        let names: Vec<&str> = s.tables.iter().map(|t| t.table.as_str()).collect();
        assert_eq!(names, ["email_open", "email_send"]);
        let open = &s.tables[0];
        assert_eq!(
            (open.parts, open.rows, open.bytes, open.compacted),
            (1, 50, 500, true)
        );
        let send = &s.tables[1];
        assert_eq!((send.parts, send.compacted_parts, send.rows), (2, 1, 90));
        assert!(!send.compacted, "a part arrived after compaction");
        assert_eq!(send.last_write.as_deref(), Some("2026-11-30T02:00:00Z"));
        assert_eq!(send.unreadable.len(), 1);
        assert_eq!(s.quarantined.len(), 2, "{:?}", s.quarantined);
        assert_eq!(s.quarantined[0].step.as_deref(), Some("decode"));
        assert!(
            s.quarantined[1]
                .reason_object
                .ends_with("odd/name.avro.reason.json")
        );

        let text = render(&s);
        assert!(
            text.contains("Currents tables in s3://lake for 2026-11-29"),
            "{text}"
        );
        let send_line = text
            .lines()
            .find(|l| l.trim_start().starts_with("email_send"))
            .unwrap();
        assert!(send_line.contains("no (1 new parts)"), "{send_line}");
        assert!(send_line.contains(" 90 "), "{send_line}");
        assert!(text.contains("quarantined: 2"), "{text}");
        assert!(text.contains("[decode] bad block"), "{text}");
        let v = serde_json::to_value(&s).unwrap();
        for f in [
            "table",
            "parts",
            "compacted_parts",
            "rows",
            "bytes",
            "last_write",
            "compacted",
        ] {
            assert!(v["tables"][0].get(f).is_some(), "tables[].{f}");
        }
    }

    #[tokio::test]
    async fn reading_a_day_counts_the_footer_rows_of_that_day_only() {
        use bridge_shared::PutCondition;
        use bridge_shared::object_store::MemoryStore;
        let store = MemoryStore::new();
        let cfg = Config::default();
        for (key, rows) in [
            ("tables/t1/t1_2026-11-29.parquet/part-a.parquet", 10),
            ("tables/t1/t1_2026-11-29.parquet/part-b.parquet", 20),
            ("tables/t1/t1_2026-11-30.parquet/part-c.parquet", 40),
        ] {
            store
                .put(
                    &S3Uri::new("lake", key),
                    parquet_with_rows(rows),
                    PutCondition::None,
                    Default::default(),
                )
                .await
                .unwrap();
        }
        let day = NaiveDate::from_ymd_opt(2026, 11, 29).unwrap();
        let s = read_day_status(&store, &cfg, "lake", day).await.unwrap();
        assert_eq!(s.tables.len(), 1);
        assert_eq!((s.tables[0].parts, s.tables[0].rows), (2, 30));
        assert!(!s.tables[0].compacted);
        assert!(s.tables[0].last_write.is_some());
    }
}
