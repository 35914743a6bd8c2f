//! Which table-days a compaction run takes on, from a listing of the tables prefix (pure).
//!
//! A part key is `<tables prefix><table>/<table>_<yyyy-MM-dd>.parquet/<file>.parquet`. Parts
//! written by the normalizer are `part-<source id>.parquet`; parts written by compaction are
//! `part-compacted-<content hash>.parquet`. A table-day needs compacting while it holds any
//! normalizer part: a day that has been compacted and received nothing since holds only
//! compacted parts, so the listing alone says which days received new parts since they were
//! last compacted; no other state is needed.

use bridge_shared::object_store::ObjectMeta;
use chrono::NaiveDate;

/// The file-name prefix of compacted parts.
pub const COMPACTED_PREFIX: &str = "part-compacted-";

/// One table's partition of one day.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableDay {
    /// Delivery day (ordered first, so runs go oldest day first).
    pub day: NaiveDate,
    /// Table name.
    pub table: String,
}

impl std::fmt::Display for TableDay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.table, self.day.format("%Y-%m-%d"))
    }
}

/// One part found in the listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartRef {
    /// Object key.
    pub key: String,
    /// ETag when listed (a part replaced since then is not deleted).
    pub etag: String,
    /// Size in bytes.
    pub size: u64,
    /// Written by compaction.
    pub compacted: bool,
}

impl PartRef {
    /// The source part id (`part-<id>.parquet`) of a normalizer part.
    pub fn source_id(&self) -> Option<&str> {
        if self.compacted {
            return None;
        }
        let file = self.key.rsplit('/').next()?;
        file.strip_prefix("part-")?.strip_suffix(".parquet")
    }
}

/// A table-day and its parts, in the order compaction reads them: compacted parts first (by
/// key), then normalizer parts (by key). Reading the earlier result first means a rerun over
/// the same rows yields the same row sequence, hence the same bytes and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayParts {
    /// Which table-day.
    pub table_day: TableDay,
    /// Its parts.
    pub parts: Vec<PartRef>,
}

impl DayParts {
    /// True while the day holds a part compaction has not absorbed yet.
    pub fn needs_compaction(&self) -> bool {
        self.parts.iter().any(|p| !p.compacted)
    }

    /// Total bytes of the parts.
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.size).sum()
    }
}

/// Parses a part key under `tables_prefix` into its table-day and whether compaction wrote it.
/// `None` for anything else (folder markers, stray files).
pub fn parse_part_key(tables_prefix: &str, key: &str) -> Option<(TableDay, bool)> {
    let rest = key.strip_prefix(tables_prefix)?;
    let mut segs = rest.split('/');
    let (table, folder, file) = (segs.next()?, segs.next()?, segs.next()?);
    if segs.next().is_some() || table.is_empty() || !file.ends_with(".parquet") {
        return None;
    }
    let day = folder
        .strip_prefix(table)?
        .strip_prefix('_')?
        .strip_suffix(".parquet")?;
    let day = NaiveDate::parse_from_str(day, "%Y-%m-%d").ok()?;
    if !file.starts_with("part-") {
        return None;
    }
    Some((
        TableDay {
            day,
            table: table.to_string(),
        },
        file.starts_with(COMPACTED_PREFIX),
    ))
}

/// Groups a listing of the tables prefix by table-day, ordered by day then table.
pub fn group(tables_prefix: &str, listing: &[ObjectMeta]) -> Vec<DayParts> {
    let mut by_day: std::collections::BTreeMap<TableDay, Vec<PartRef>> = Default::default();
    for o in listing {
        if let Some((td, compacted)) = parse_part_key(tables_prefix, &o.key) {
            by_day.entry(td).or_default().push(PartRef {
                key: o.key.clone(),
                etag: o.etag.clone(),
                size: o.size,
                compacted,
            });
        }
    }
    by_day
        .into_iter()
        .map(|(table_day, mut parts)| {
            parts.sort_by(|a, b| b.compacted.cmp(&a.compacted).then(a.key.cmp(&b.key)));
            DayParts { table_day, parts }
        })
        .collect()
}

/// What a run was asked to compact.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// One day only; `None`: every day before `today` that needs it.
    pub day: Option<NaiveDate>,
    /// One table only.
    pub table: Option<String>,
}

/// The table-days a run compacts: those the selection names that need compacting. Without a
/// day, only days before `today` (UTC): today is still receiving parts.
pub fn select(days: Vec<DayParts>, sel: &Selection, today: NaiveDate) -> Vec<DayParts> {
    days.into_iter()
        .filter(|d| match sel.day {
            Some(day) => d.table_day.day == day,
            None => d.table_day.day < today,
        })
        .filter(|d| sel.table.as_deref().is_none_or(|t| d.table_day.table == t))
        .filter(DayParts::needs_compaction)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn meta(key: &str) -> ObjectMeta {
        ObjectMeta {
            key: key.into(),
            etag: "e".into(),
            size: 10,
            ..ObjectMeta::default()
        }
    }

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn part_keys_give_table_day_and_kind() {
        let (td, c) = parse_part_key(
            "tables/",
            "tables/t_a/t_a_2026-11-29.parquet/part-0123456789abcdef.parquet",
        )
        .unwrap();
        assert_eq!(td.table, "t_a");
        assert_eq!(td.day, d("2026-11-29"));
        assert!(!c);
        let (_, c) = parse_part_key(
            "tables/",
            "tables/t_a/t_a_2026-11-29.parquet/part-compacted-0123456789abcdef.parquet",
        )
        .unwrap();
        assert!(c);
        for bad in [
            "tables/t_a/t_a_2026-11-29.parquet/",
            "tables/t_a/t_b_2026-11-29.parquet/part-1.parquet",
            "tables/t_a/t_a_2026-13-29.parquet/part-1.parquet",
            "tables/t_a/t_a_2026-11-29.parquet/x/part-1.parquet",
            "tables/t_a/t_a_2026-11-29.parquet/notes.txt",
            "other/t_a/t_a_2026-11-29.parquet/part-1.parquet",
        ] {
            assert!(parse_part_key("tables/", bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn compacted_parts_are_read_first_and_days_without_new_parts_are_skipped() {
        let listing = vec![
            meta("tables/t/t_2026-11-28.parquet/part-compacted-ffff.parquet"),
            meta("tables/t/t_2026-11-29.parquet/part-bbbb.parquet"),
            meta("tables/t/t_2026-11-29.parquet/part-compacted-0000.parquet"),
            meta("tables/t/t_2026-11-29.parquet/part-aaaa.parquet"),
            meta("tables/t/t_2026-11-30.parquet/part-cccc.parquet"),
            meta("tables/u/u_2026-11-27.parquet/part-dddd.parquet"),
        ];
        let days = group("tables/", &listing);
        assert_eq!(days.len(), 4);
        let nov29 = &days[2];
        let keys: Vec<&str> = nov29.parts.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "tables/t/t_2026-11-29.parquet/part-compacted-0000.parquet",
                "tables/t/t_2026-11-29.parquet/part-aaaa.parquet",
                "tables/t/t_2026-11-29.parquet/part-bbbb.parquet",
            ]
        );
        assert_eq!(nov29.parts[1].source_id(), Some("aaaa"));
        // Default run on 2026-11-30: the late part of the 27th and the 29th; not the
        // already-compacted 28th, not today.
        let picked = select(days.clone(), &Selection::default(), d("2026-11-30"));
        let picked: Vec<String> = picked.iter().map(|d| d.table_day.to_string()).collect();
        assert_eq!(picked, ["u/2026-11-27", "t/2026-11-29"]);
        let one = select(
            days,
            &Selection {
                day: Some(d("2026-11-30")),
                table: Some("t".into()),
            },
            d("2026-11-30"),
        );
        assert_eq!(one.len(), 1);
    }
}
