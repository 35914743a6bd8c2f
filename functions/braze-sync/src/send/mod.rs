//! Deltas → Braze: [`request_body`] packs them into `/users/track` bodies, [`deliver`] sends
//! them under the [`rate_limit`] (shared across senders by [`workspace_share`]) and the
//! [`retry`] policy and the workspace's [`hourly_budget`], through the [`braze`] client.

pub mod braze;
pub mod deliver;
pub mod hourly_budget;
pub mod rate_limit;
pub mod request_body;
pub mod retry;
pub mod workspace_share;
