//! What operators read and run: the run [`report`], route [`status`], the [`dry_run`] summary
//! and [`adopt`]ion of a route Braze already has.

pub mod adopt;
pub mod dry_run;
pub mod report;
pub mod status;
