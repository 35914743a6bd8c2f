//! One export, end to end: the Lambda [`handler`] turns an event into export runs, and the
//! [`runner`] reads, diffs, sends and commits each one; a [`scheduled_audit`] request audits
//! routes instead.

pub mod handler;
pub mod runner;
pub mod scheduled_audit;
