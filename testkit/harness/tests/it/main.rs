//! The stack tests, one module per area, built as one test binary (one link of the AWS SDK,
//! arrow, parquet and both functions' libraries instead of one per file); each test starts the
//! moto server, emulators and simulator it needs on free ports, so two run at once. Run one area
//! with `cargo test -p harness --test it stack_fan_out::`. Binaries of their own beside this
//! folder: `scale_1m_memory_limit` (two minutes of both cores; nothing should share them) and
//! `shared_limit_moto` (it bounds its own wall time).

mod backfill_moto;
mod catalog_generated;
mod compaction_moto;
mod kill_and_resume;
mod object_store_moto;
mod stack_bad_day;
mod stack_bad_day_braze;
mod stack_braze_sync;
mod stack_braze_sync_triggers;
mod stack_consent;
mod stack_currents;
mod stack_currents_loop;
mod stack_drift_audit;
mod stack_fan_out;
mod stack_status;
