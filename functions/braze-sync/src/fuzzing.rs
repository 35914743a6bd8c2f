//! Entry points shared by the fuzz targets (`fuzz/`, run by `make fuzz`) and the regression
//! tests that replay their findings on stable (`tests/it/fuzz_regressions.rs`). Not an API.

use crate::config::route::Route;
use crate::diff::export::{Part, ProduceOptions};
use crate::diff::in_memory;
use crate::state::confirmed::Snapshot;

/// The route shapes an input is read through, picked by the input's first byte: each
/// declared format and compression, and nothing declared (sniffed from the bytes).
const ROUTES: &[(&str, &str)] = &[
    ("", "export"),
    ("format = \"csv\"\n", "export.csv"),
    ("format = \"tsv\"\n", "export.tsv"),
    ("format = \"delimited\"\ndelimiter = \";\"\n", "export.txt"),
    ("format = \"csv\"\nescape = \"\\\\\"\n", "export.csv"),
    ("format = \"json\"\n", "export.json"),
    ("format = \"ndjson\"\n", "export.ndjson"),
    ("format = \"parquet\"\n", "export.parquet"),
    ("compression = \"gzip\"\n", "export.csv.gz"),
    ("compression = \"zip\"\n", "export.zip"),
    ("compression = \"tar\"\n", "export.tar"),
    ("compression = \"tgz\"\n", "export.tgz"),
    (
        "format = \"parquet\"\ncompression = \"zip\"\n",
        "export.zip",
    ),
    ("string_policy = \"reject\"\n", "export.csv"),
];

fn route_toml(extra: &str, kind: &str) -> String {
    format!(
        r#"name = "fuzz"
prefix = "in/"
{extra}[identifier]
kind = "{kind}"
column = "id"
[fields]
email = "email"
phone = "phone"
dob = "dob"
first_name = "first_name"
country = "country"
[attributes.ltv]
type = "Decimal"
round = 2
[attributes.seen]
type = "Datetime"
[attributes.n]
type = "Integer"
[attributes.vip]
type = "Boolean"
[[audiences]]
attribute = "aud_x"
column = "aud"
[limits]
max_row_bytes = 4096
max_decompressed_bytes = 8388608
"#
    )
}

/// Reads `body` as one export object through the route `selector` picks, maps and diffs it
/// against an empty state. Returns the plan's outcome as text (for the regression tests);
/// must never panic, abort or grow memory past the route's limits.
pub fn export_through_mapper(selector: u8, body: &[u8]) -> Result<String, String> {
    let (extra, key) = ROUTES[selector as usize % ROUTES.len()];
    let kind = if selector & 0x80 != 0 {
        "user_alias\"\nalias_label = \"fuzz"
    } else {
        "external_id"
    };
    let route =
        Route::from_toml(&route_toml(extra, kind), "fuzz.toml").map_err(|e| e.to_string())?;
    let snapshot = Snapshot::empty(route.state_names(), route.tracks_departures());
    let opts = ProduceOptions::for_route(&route, key);
    let part = Part {
        source: format!("s3://fuzz/in/{key}"),
        reader: body,
    };
    match in_memory::plan([Ok(part)], &route, &snapshot, &opts) {
        Ok(plan) => Ok(format!(
            "{} deltas, {} rejects, {} tables",
            plan.deltas.len(),
            plan.rejects.len(),
            plan.summary.tables
        )),
        Err(e) => Err(e.to_string()),
    }
}
