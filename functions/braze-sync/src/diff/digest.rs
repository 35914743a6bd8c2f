//! The row digest: one 64-bit hash of the cells an export row gives the route (the columns
//! its [`Binding`] reads, as [`crate::read::row_codec::encode_row`] writes them), seeded with
//! how the route maps them. Two rows with the same digest map to the same values, so a row
//! whose digest equals the one the state recorded with the user's last confirmed delta
//! ([`crate::vocab::ROW_DIGEST`]) is unchanged without being mapped or diffed: most rows
//! of a daily export cost a hash and a lookup.
//!
//! The seed covers everything mapping depends on: [`MAPPER_VERSION`] (raise it whenever the
//! mapping of a cell changes), what the third-party tables behind the standard fields answer
//! today ([`normalizer_probe`]: country, language and time-zone names through celes, isolang
//! and chrono-tz, so an upgrade that changes a normalized value changes every digest without
//! anyone raising a version), the identifier settings, the string policy, every slot (name,
//! column, kind, type, rounding, audience rule) and where each bound column sits in the
//! encoded row. Changing any of them changes every digest, so the next run maps every row
//! again (and records the new digests), exactly as before digests existed. Settings that do
//! not change a row's values (limits, departure share, ordering) are left out, so tuning them
//! costs nothing.
//!
//! One thing mapping depends on is not in the row: the clock (a date of birth in the future
//! is refused). A row that mapped before maps the same later, since dates only move into
//! the past.

use std::sync::Arc;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::config::route::Route;
use crate::map::Binding;
use crate::read::Cells;
use crate::read::row_codec::{Columns, encode_row};

/// Raise whenever a cell maps to a different value than before (a normalizer, a parser or
/// a fingerprint changes): every digest recorded with an older version stops matching.
pub const MAPPER_VERSION: u32 = 1;

/// The route's part of every seed: how it maps cells to values.
pub fn route_seed(route: &Route) -> u64 {
    route_seed_with(route, normalizer_probe())
}

/// The seed of a run's digests: [`route_seed`], salted for a resend that goes on across
/// invocations ([`crate::diff::export::ProduceOptions::resend_salt`]).
pub fn seed_for(route: &Route, opts: &crate::diff::export::ProduceOptions) -> u64 {
    let seed = route_seed(route);
    match opts.resend_salt {
        Some(salt) => xxh3_64(&[seed.to_le_bytes(), salt.to_le_bytes()].concat()),
        None => seed,
    }
}

/// [`route_seed`] with the normalizers' answers given.
pub fn route_seed_with(route: &Route, probe: &str) -> u64 {
    let c = &route.config;
    xxh3_64(
        format!(
            "mapper {MAPPER_VERSION}\n{probe}\n{:?}\n{:?}\n{:?}",
            c.identifier, c.string_policy, route.slots
        )
        .as_bytes(),
    )
}

/// Names whose normalized form comes from the third-party tables (celes, isolang, chrono-tz):
/// renamed countries, legacy codes, deprecated and recently added time zones.
const PROBE_COUNTRIES: &[&str] = &[
    "United States",
    "usa",
    "GB",
    "gbr",
    "Czechia",
    "Czech Republic",
    "Türkiye",
    "Turkey",
    "Eswatini",
    "Swaziland",
    "North Macedonia",
    "Côte d'Ivoire",
    "Kosovo",
    "Holy See",
];
const PROBE_LANGUAGES: &[&str] = &[
    "English",
    "en",
    "eng",
    "Norwegian Bokmål",
    "Filipino",
    "zh",
    "Chinese",
    "iw",
    "he",
];
const PROBE_TIME_ZONES: &[&str] = &[
    "America/New_York",
    "US/Eastern",
    "Europe/Kyiv",
    "Europe/Kiev",
    "Asia/Calcutta",
    "America/Ciudad_Juarez",
    "Pacific/Kanton",
    "Asia/Qostanay",
    "UTC",
    "EST5EDT",
];

/// What the standard fields' normalizers answer for a fixed set of names, computed once:
/// part of every digest's seed, so the digests follow the tables' versions.
pub fn normalizer_probe() -> &'static str {
    static PROBE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PROBE.get_or_init(|| {
        use crate::map::fields::{country, language, time_zone};
        let mut out = String::new();
        for (kind, names, f) in [
            ("country", PROBE_COUNTRIES, country as fn(&str) -> _),
            ("language", PROBE_LANGUAGES, language),
            ("time_zone", PROBE_TIME_ZONES, time_zone),
        ] {
            for n in names {
                out.push_str(&format!("{kind} {n:?}={:?}\n", f(n).ok()));
            }
        }
        out
    })
}

/// Digests of one table's rows (one header, bound once).
#[derive(Debug, Clone)]
pub struct TableDigest {
    columns: Arc<Columns>,
    width: usize,
    seed: u64,
}

impl TableDigest {
    /// For a table whose header has `width` columns bound by `binding`; `route_seed` from
    /// [`route_seed`].
    pub fn new(route_seed: u64, binding: &Binding, width: usize) -> Self {
        let columns = Columns::new(width, binding.columns());
        // Where each bound column sits in the encoded row: the same cells under another
        // binding (a renamed or moved column) must not give the same digest.
        let at = |col: Option<usize>| -> u32 {
            col.and_then(|c| columns.list().iter().position(|&l| l == c))
                .map_or(u32::MAX, |p| p as u32)
        };
        let mut layout = Vec::with_capacity(4 * (binding.slots.len() + 3));
        layout.extend_from_slice(&route_seed.to_le_bytes());
        layout.extend_from_slice(&at(Some(binding.id)).to_le_bytes());
        layout.extend_from_slice(&at(binding.label).to_le_bytes());
        for s in &binding.slots {
            layout.extend_from_slice(&at(*s).to_le_bytes());
        }
        Self {
            seed: xxh3_64(&layout),
            columns,
            width,
        }
    }

    /// The columns a row is encoded with.
    pub fn columns(&self) -> &Columns {
        &self.columns
    }

    /// The header's width.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Appends `cells` encoded to `out` and returns the digest of what it appended.
    pub fn encode(&self, cells: &dyn Cells, out: &mut Vec<u8>) -> u64 {
        let start = out.len();
        encode_row(&self.columns, cells, out);
        self.digest(out.get(start..).unwrap_or_default())
    }

    /// The digest of an encoded row.
    pub fn digest(&self, encoded: &[u8]) -> u64 {
        xxh3_64_with_seed(encoded, self.seed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vocab::Cell;

    #[test]
    fn the_seed_follows_what_the_normalizers_answer() {
        let route = Route::from_toml(
            "name = \"r\"\nprefix = \"p/\"\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\n[fields]\ncountry = \"country\"\n",
            "t",
        )
        .unwrap();
        let probe = normalizer_probe();
        assert!(
            probe.contains("country \"United States\"=Some(\"US\")"),
            "{probe}"
        );
        assert!(
            probe.contains("time_zone \"America/New_York\"=Some("),
            "{probe}"
        );
        assert_eq!(route_seed(&route), route_seed_with(&route, probe));
        // A table upgrade that renames one country's code changes every digest.
        let upgraded = probe.replacen("Some(\"US\")", "Some(\"UM\")", 1);
        assert_ne!(route_seed_with(&route, &upgraded), route_seed(&route));
    }

    struct V(Vec<Cell<'static>>);
    impl Cells for V {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn cell(&self, i: usize) -> Result<Cell<'_>, crate::read::CellError> {
            Ok(self.0.get(i).cloned().unwrap_or(Cell::Null))
        }
    }

    const ROUTE: &str = r#"
name = "r"
prefix = "in/"
[identifier]
column = "id"
kind = "external_id"
[fields]
first_name = "first_name"
[attributes.ltv]
type = "Decimal"
"#;

    fn header(cols: &[&str]) -> Vec<String> {
        cols.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn equal_cells_equal_digests_and_any_change_of_cell_binding_or_route_changes_it() {
        let route = Route::from_toml(ROUTE, "r.toml").unwrap();
        let seed = route_seed(&route);
        let h = header(&["id", "first_name", "ltv", "unused"]);
        let b = Binding::new(&route, &h, "s").unwrap();
        let t = TableDigest::new(seed, &b, h.len());
        let row = V(vec![
            Cell::Str("u1"),
            Cell::Str("Ada"),
            Cell::Str("1.5"),
            Cell::Str("x"),
        ]);
        let mut buf = Vec::new();
        let d = t.encode(&row, &mut buf);
        assert_eq!(t.digest(&buf), d);
        // An unread column does not count.
        let other_unused = V(vec![
            Cell::Str("u1"),
            Cell::Str("Ada"),
            Cell::Str("1.5"),
            Cell::Str("y"),
        ]);
        assert_eq!(t.encode(&other_unused, &mut Vec::new()), d);
        // A read cell does.
        let changed = V(vec![
            Cell::Str("u1"),
            Cell::Str("Ada"),
            Cell::Str("1.6"),
            Cell::Str("x"),
        ]);
        assert_ne!(t.encode(&changed, &mut Vec::new()), d);
        // Swapped columns with swapped values: same encoded cells, another binding.
        let h2 = header(&["id", "ltv", "first_name", "unused"]);
        let b2 = Binding::new(&route, &h2, "s").unwrap();
        let t2 = TableDigest::new(seed, &b2, h2.len());
        let swapped = V(vec![
            Cell::Str("u1"),
            Cell::Str("Ada"),
            Cell::Str("1.5"),
            Cell::Str("x"),
        ]);
        assert_ne!(t2.encode(&swapped, &mut Vec::new()), d);
        // Another mapping of the same column (a type change) changes the seed.
        let retyped = Route::from_toml(&ROUTE.replace("Decimal", "Float"), "r.toml").unwrap();
        let t3 = TableDigest::new(route_seed(&retyped), &b, h.len());
        assert_ne!(t3.encode(&row, &mut Vec::new()), d);
        // A setting that maps nothing the same way does not.
        let tuned =
            Route::from_toml(&format!("max_departure_share = 0.5\n{ROUTE}"), "r.toml").unwrap();
        assert_eq!(route_seed(&tuned), seed);
    }
}
