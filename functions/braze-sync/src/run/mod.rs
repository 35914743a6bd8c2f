//! One export, end to end: the Lambda [`handler`] turns an event into export runs, and the
//! [`runner`] reads, diffs, sends and commits each one.

pub mod handler;
pub mod runner;
