//! Test-only Braze `POST /users/track` simulator: enforces the documented contract (auth, JSON,
//! object limits, body size, per-object validation with `errors[]`, update-only mode, attribute
//! operations, rate window with `X-RateLimit-*` headers), keeps the resulting profiles and a
//! request log, and injects faults on request. It also answers `POST /users/export/ids`
//! (Braze's export shape, `fields_to_export`, at most 50 identifiers, its own rate window: 250
//! per minute by default) for adoption's verify sample and the drift audit, and lets a test
//! plant drift ([`SimHandle::write_as_other`], [`SimHandle::delete_user`]). Start it in-process with [`start`] or run the
//! `braze-sim` binary.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let sim = braze_sim::start(braze_sim::SimConfig::default()).await?;
//! // POST {sim.base_url()}/users/track with "Authorization: Bearer sim-key" ...
//! assert!(sim.user("user-1").is_none());
//! sim.shutdown().await;
//! # Ok(()) }
//! ```

pub mod config;
pub mod contract;
pub mod faults;
mod http;
pub mod profile;
pub mod rate_window;
mod state;
pub mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use serde_json::{Map, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use config::{ConfigError, SimConfig};
pub use contract::{Limits, ObjectCounts};
pub use faults::{Burst429, Faults, FaultsError};
pub use state::{Disposition, RequestLog, Stats};

/// A running simulator. Dropping it stops the server and closes its connections.
#[derive(Debug)]
pub struct SimHandle {
    /// The bound address.
    pub addr: SocketAddr,
    shared: Arc<state::Shared>,
    task: JoinHandle<()>,
}

/// Binds `cfg.host:cfg.port` (port 0 picks a free one) and serves in the background on the
/// current tokio runtime.
pub async fn start(cfg: SimConfig) -> anyhow::Result<SimHandle> {
    cfg.validate()?;
    let listener = TcpListener::bind((cfg.host, cfg.port))
        .await
        .with_context(|| format!("braze-sim: binding {}:{}", cfg.host, cfg.port))?;
    let addr = listener
        .local_addr()
        .context("braze-sim: reading the bound address")?;
    let shared = Arc::new(state::Shared::new(cfg));
    let task = tokio::spawn(http::serve(listener, http::router(shared.clone())));
    Ok(SimHandle { addr, shared, task })
}

impl SimHandle {
    /// `http://127.0.0.1:PORT` (no trailing slash): the "REST endpoint" to give a client.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `{base_url}/users/track`.
    pub fn track_url(&self) -> String {
        format!("{}/users/track", self.base_url())
    }

    /// Every profile's attributes keyed by user key (`external_id`, `alias:<label>:<name>`,
    /// `braze:<id>`, `email:<address>`, `phone:<number>`).
    pub fn users(&self) -> BTreeMap<String, Value> {
        self.shared.lock().users()
    }

    /// One profile's attributes (a JSON object) by user key, e.g. its `external_id`.
    pub fn user(&self, key: &str) -> Option<Value> {
        self.shared.lock().user(key)
    }

    /// Event objects stored for a user key, in arrival order (`None`: no such profile).
    pub fn events(&self, key: &str) -> Option<Vec<Value>> {
        self.shared.lock().events(key)
    }

    /// Purchase objects stored for a user key, in arrival order (`None`: no such profile).
    pub fn purchases(&self, key: &str) -> Option<Vec<Value>> {
        self.shared.lock().purchases(key)
    }

    /// Puts a profile in place as-is under `key` (e.g. `braze:<id>` or an existing alias
    /// profile for update-only tests). `attributes` should be a JSON object; anything else
    /// gives an empty profile.
    pub fn seed_user(&self, key: &str, attributes: Value) {
        let map = match attributes {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        self.shared.lock().seed_user(key, map);
    }

    /// Plants drift: changes the profile under `key` as another writer would (an SDK, a
    /// campaign), setting each key of `changes` (`null` removes it). `false` when there is no
    /// such profile. Also `POST /_sim/users/{key}` with the changes as a JSON object.
    pub fn write_as_other(&self, key: &str, changes: Value) -> bool {
        match changes {
            Value::Object(m) => self.shared.lock().write_as_other(key, &m),
            _ => false,
        }
    }

    /// Deletes the profile under `key` (a privacy request, a merge). `false` when there was
    /// none. Also `DELETE /_sim/users/{key}`.
    pub fn delete_user(&self, key: &str) -> bool {
        self.shared.lock().delete_user(key)
    }

    /// Counters since start or the last [`reset`](Self::reset).
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats()
    }

    /// The request log, oldest first.
    pub fn requests(&self) -> Vec<RequestLog> {
        self.shared.lock().requests()
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        self.shared.lock().faults()
    }

    /// Replaces the faults; their random sequence restarts from the configured seed.
    pub fn set_faults(&self, faults: Faults) -> Result<(), ConfigError> {
        self.shared.lock().set_faults(faults)
    }

    /// The configuration in force.
    pub fn config(&self) -> SimConfig {
        self.shared.lock().cfg.clone()
    }

    /// Replaces the configuration (not the bound address); restarts the rate window and the
    /// fault sequence; keeps profiles, log and counters.
    pub fn set_config(&self, cfg: SimConfig) -> Result<(), ConfigError> {
        self.shared.lock().set_config(cfg)
    }

    /// Clears profiles, request log and counters; restarts the rate window and fault sequence.
    pub fn reset(&self) {
        self.shared.lock().reset();
    }

    /// Stops the server and closes open connections.
    pub async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}
