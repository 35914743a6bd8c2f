//! What operators read and run: the run [`report`], route [`status`], the [`dry_run`] summary,
//! [`adopt`]ion of a route Braze already has, and the drift [`audit`] of what Braze holds.

pub mod adopt;
pub mod audit;
pub mod dry_run;
pub mod report;
pub mod status;
