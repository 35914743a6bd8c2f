//! currents-normalize's integration tests, one module per area, built as one test binary (one
//! link of the AWS SDK, arrow and parquet instead of one per file). Run one area with
//! `cargo test -p currents-normalize --test it compaction::`.

mod backfill;
mod bad_records;
mod compaction;
mod dashboard_metrics;
mod fuzz_regressions;
mod handler;
mod readback;
mod recursive_schema;
