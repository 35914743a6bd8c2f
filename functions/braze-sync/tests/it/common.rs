//! Scaffolding the runner tests share: Braze's answer to an accepted request, and a store
//! whose writes fail on demand (S3 throttling at a chosen step).
#![allow(dead_code)]

use std::sync::Arc;

use braze_sync::config::route::Route;
use braze_sync::run::handler::{Handler, HandlerConfig};
use braze_sync::run::runner::{Continuation, RunnerSettings, SyncRunner};
use braze_sync::send::braze::{BrazeApi, ItemError, RateLimitInfo, TrackResponse};
use bridge_shared::S3Uri;
use bridge_shared::hooked_store::{Before, Call, Hook, Hooked};
use bridge_shared::object_store::{MemoryStore, ObjectStore};
use bytes::Bytes;

/// Braze's `201` answer, with the objects it refused (`errors`).
pub fn accepted(errors: Vec<ItemError>) -> TrackResponse {
    TrackResponse {
        status: 201,
        message: "success".into(),
        errors,
        rate: RateLimitInfo::default(),
    }
}

/// Braze's `201` answer to a request it took whole.
pub fn success() -> TrackResponse {
    accepted(Vec::new())
}

/// `inner` whose puts fail with a retryable `SlowDown` when `fail`, called with the object and
/// the body about to be written, says so.
pub fn failing_puts(
    inner: Arc<MemoryStore>,
    fail: impl Fn(&S3Uri, &Bytes) -> bool + Send + Sync + 'static,
) -> Hooked<impl Hook> {
    Hooked::new(
        inner,
        Before(move |call: Call<'_>| match call {
            Call::Put { uri, body, .. } if fail(uri, body) => Err(call.throttled()),
            _ => Ok(()),
        }),
    )
}

/// The handler of one route over `store` and `braze`, as the tests lay the state bucket out
/// (`state`: `s/` state, `r/` reports, `x/` rejects), with the runner's settings and queue.
pub fn handler(
    store: Arc<dyn ObjectStore>,
    route: &Route,
    braze: Arc<dyn BrazeApi>,
    settings: RunnerSettings,
    continuation: Option<Arc<dyn Continuation>>,
) -> Handler {
    let runner = SyncRunner::new(
        store.clone(),
        vec![route.clone()],
        braze,
        settings,
        continuation,
    );
    Handler::new(
        HandlerConfig {
            state_bucket: "state".into(),
            output_prefixes: vec!["s/".into(), "r/".into(), "x/".into()],
            state_prefix: "s/".into(),
            reports_prefix: "r/".into(),
            routes: vec![route.binding()],
            lease_s: 60,
        },
        store,
        Arc::new(runner),
    )
}

/// The `people` route most runner tests sync: `in/` exports keyed by `id`, one String
/// attribute `tier`.
pub const PEOPLE_ROUTE: &str = r#"
name = "people"
prefix = "in/"
update_existing_only = false
[identifier]
kind = "external_id"
column = "id"
[attributes.tier]
type = "String"
"#;
