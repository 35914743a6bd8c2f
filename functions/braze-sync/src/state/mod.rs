//! What Braze confirmed, and who may change it: the [`confirmed`] state of a route in memory,
//! its [`store`] in S3, the export [`ledger`], the [`route_lock`], a fan-out piece's
//! [`piece_attempt`] claim and the [`lease`] that keeps them alive; the Braze Currents
//! [`profile_feed`] marks unknown what Braze no longer holds.
//! [`spill`] files keep what does not fit in memory on local disk, by hash range; the runs'
//! store is [`retrying`]: a transient S3 error on a call that can be repeated costs a pause.

pub mod confirmed;
pub(crate) mod lease;
pub mod ledger;
pub mod piece_attempt;
pub mod profile_feed;
pub mod retrying;
pub mod route_lock;
pub mod spill;
pub mod store;
