//! What operators read and run: the run [`report`], route [`status`], the [`dry_run`] summary,
//! [`adopt`]ion of a route Braze already has, the drift [`audit`] of what Braze holds, and
//! [`read_back`], the sample both read back from Braze.

pub mod adopt;
pub mod audit;
pub mod dry_run;
pub mod read_back;
pub mod report;
pub mod status;
