//! Mapped rows against the confirmed state → what must change in Braze. [`user`] decides one
//! user's changes; [`in_memory`] diffs an export whose state fits in memory; [`bounded`] diffs
//! one of any size, range by range, through spill files; [`digest`] skips rows unchanged
//! since the last confirmed delta; [`rejects`] records the rows that could not be diffed.
//! [`export`] holds what both diffs speak: parts, options, summary and errors.

pub mod bounded;
pub mod digest;
pub mod export;
pub mod in_memory;
pub mod rejects;
pub mod user;
