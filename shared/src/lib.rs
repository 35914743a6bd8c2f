//! Shared building blocks of the Amperity ⇄ Braze bridge: how an invocation names the objects
//! to process ([`trigger`]), where objects live ([`s3_uri`], [`object_store`], and a local
//! folder as a store, `dir_store`, feature `dir-store`), leases kept in one object
//! ([`lease`]), and how a run reports itself
//! ([`logging`], [`metrics`], [`runtime`]); the profile-change feed currents-normalize hands
//! braze-sync ([`profile_feed`]).

#[cfg(any(test, feature = "dir-store"))]
pub mod dir_store;
#[cfg(any(test, feature = "test-util"))]
pub mod hooked_store;
pub mod lease;
pub mod logging;
#[cfg(any(test, feature = "test-util"))]
pub mod lossy_store;
pub mod metrics;
pub mod object_store;
pub mod profile_feed;
pub mod runtime;
pub mod s3_uri;
pub mod trigger;

pub use object_store::{ObjectMeta, ObjectStore, PutCondition, StoreError};
pub use s3_uri::S3Uri;
pub use trigger::{Invocation, ObjectRef, TriggerError, TriggerItem, TriggerShape};
