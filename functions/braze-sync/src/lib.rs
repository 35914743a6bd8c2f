//! braze-sync: an Amperity export lands in S3; this crate reads it, maps each row to Braze
//! profile fields and custom attributes, diffs them against the values Braze last confirmed,
//! and sends only the changes to `POST /users/track`.
//!
//! Follow a row: [`read`] (bytes → rows) → [`map`] (row → typed Braze attributes) →
//! [`delta`] (attributes vs [`snapshot`] → [`model::UserDelta`]) → [`batch`] (deltas → request
//! bodies) → [`deliver`] (rate-limited, retried sends via [`braze`]) → confirmed deltas advance
//! the [`snapshot`]. [`sync`] runs those stages for one export; [`handler`] turns a Lambda
//! event into runs; [`report`] and [`rejects`] account for every row.

pub mod adopt;
pub mod batch;
pub mod braze;
pub mod config;
pub mod deliver;
pub mod delta;
pub mod dry_summary;
#[doc(hidden)]
pub mod fuzzing;
pub mod handler;
pub mod ledger;
pub mod map;
pub mod model;
pub mod order;
pub mod progress;
pub mod ranged;
pub mod rate_limit;
pub mod read;
pub mod rejects;
pub mod report;
pub mod retry;
pub mod route;
pub mod route_lock;
pub mod runner;
pub mod snapshot;
pub mod spill;
pub mod status;
pub mod sync;
pub mod vocab;
pub mod workspace_share;
