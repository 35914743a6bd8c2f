//! braze-sync: an Amperity export lands in S3; this crate reads it, maps each row to Braze
//! profile fields and custom attributes, diffs them against the values Braze last confirmed,
//! and sends only the changes to `POST /users/track`.
//!
//! The folders follow a row, in order:
//!
//! 1. [`config`]: the function's environment, its routes (one per export stream) and how a
//!    route orders its exports.
//! 2. [`read`]: bytes → rows (CSV/TSV, NDJSON, Parquet, compressed or archived), bounded in
//!    memory.
//! 3. [`map`]: row → typed Braze attributes, one slot per route attribute.
//! 4. [`diff`]: attributes vs the confirmed state → one [`model::UserDelta`] per user that
//!    changed. [`diff::in_memory`] when the state fits in memory; [`diff::bounded`] for any
//!    size, range by range through [`state::spill`] files. [`diff::digest`] skips rows unchanged
//!    since the last confirmed delta.
//! 5. [`send`]: deltas → request bodies ([`send::request_body`]) → rate-limited, retried
//!    requests ([`send::deliver`]) through the [`send::braze`] client.
//! 6. [`state`]: what Braze confirmed advances the route's confirmed state
//!    ([`state::confirmed`], stored by [`state::store`]); the [`state::ledger`] and the
//!    [`state::route_lock`] keep one run per export and per route.
//! 7. [`run`]: the Lambda [`run::handler`] turns an event into export runs; the
//!    [`run::runner`] drives read → diff → send → commit for one export, fanning a big one out
//!    in pieces.
//! 8. [`ops`]: the run [`ops::report`] (every row accounted for), `status`, the dry-run
//!    summary and adoption.
//!
//! [`vocab`] and [`model`] are the shared vocabulary every stage speaks; [`clock`] the time and
//! nonces the code reads and where its blocking work runs; [`progress`] holds the live counters a terminal run draws. All four
//! import nothing from the crate.
//!
//! # Layers
//! A module imports only from stages on earlier layers (lowest first; `fuzzing` is test
//! support). The reader comes before the configuration because a route configures its
//! reader; `ops` (report, status, adopt, dry run) builds on diff, state and send, and the
//! runner on all of them. `tests/import_graph.rs` checks this line and that no files import
//! each other in a loop.
//!
//! ```text
//! layers: vocab model clock progress < read < config < map < state < diff < send < ops < run < fuzzing
//! ```

pub mod clock;
pub mod config;
pub mod diff;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod map;
pub mod model;
pub mod ops;
pub mod progress;
pub mod read;
pub mod run;
pub mod send;
pub mod state;
pub mod vocab;
