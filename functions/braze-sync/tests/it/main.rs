//! braze-sync's integration tests, one module per area, built as one test binary (one link of
//! the AWS SDK, arrow and parquet instead of one per file). Run one area with
//! `cargo test -p braze-sync --test it ranged_diff::`. `commit_memory`, which measures the
//! process's own peak RSS, and `docs_agree` and `import_graph`, which read files only, are
//! binaries of their own beside this folder.

mod common;

mod adopt;
mod bounded_memory_limit;
mod cli_dry_run_summary;
mod currents_feed_handler;
mod dashboard_metrics;
mod deliver_fake;
mod deliver_http;
mod deliver_sim;
mod delta_rules;
mod fuzz_regressions;
mod handler_triggers;
mod hostile_inputs;
mod hourly_budget_sim;
mod map_rows;
mod ranged_diff;
mod read_formats;
mod readme_config;
mod route_config;
mod route_wait;
mod runner_bounded;
mod runner_commit;
mod runner_crash;
mod runner_fan_out;
mod runner_leases;
mod runner_order;
mod scheduled_audit;
mod state_migration;
