//! Simulated Lambda behind an SQS event source mapping: containers (built once, reused warm,
//! thrown away when they die), concurrency N, a batch size, the deadline, and a crash at any
//! await point: the invocation's future is dropped at the call the seed chose, so nothing
//! after it runs, and the calls of tasks it left behind fail.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use braze_sync::config::route::Route;
use braze_sync::run::handler::{Handler, HandlerConfig};
use braze_sync::run::runner::{Continuation, RunnerSettings, SyncRunner};
use serde_json::{Value, json};

use crate::braze::{Braze, SimBraze};
use crate::queue::{Message, Queue, SimContinuation};
use crate::rng::keyed;
use crate::s3::{S3, SimStore};
use crate::world::{Gate, World};

/// How the function is deployed in this schedule.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Deployment {
    /// Function timeout, ms.
    pub timeout_ms: u64,
    /// Concurrent invocations.
    pub concurrency: usize,
    /// SQS batch size.
    pub batch_size: usize,
    /// Routes with at least this many users take the bounded diff.
    pub bounded_min_users: u64,
    /// Forced fan-out pieces of bounded runs.
    pub fan_out_pieces: Option<usize>,
    /// Users per state hash range.
    pub range_users: u64,
    /// Objects per Braze request.
    pub max_objects: usize,
}

/// The shared pieces every container is built over.
#[derive(Clone)]
pub struct Env {
    /// The world.
    pub world: Arc<World>,
    /// S3.
    pub s3: Arc<S3>,
    /// Braze.
    pub braze: Arc<Braze>,
    /// The function's queue.
    pub queue: Arc<Queue>,
    /// Deployment.
    pub deployment: Deployment,
    /// Routes.
    pub routes: Vec<Route>,
}

/// One container: a handler built once, and the slot its invocation's gate goes in.
pub struct Container {
    gate: Arc<Mutex<Arc<Gate>>>,
    handler: Handler,
    _spill: tempfile::TempDir,
}

/// Where the function writes.
pub const STATE_BUCKET: &str = "state";
/// Its state prefix.
pub const STATE_PREFIX: &str = "bridge/state/";
/// Its reports prefix.
pub const REPORTS_PREFIX: &str = "bridge/reports/";
/// Its rejects prefix.
pub const REJECTS_PREFIX: &str = "bridge/rejects/";

/// The runner's settings in this deployment.
pub fn settings(d: &Deployment, spill: &std::path::Path) -> RunnerSettings {
    let mut s = RunnerSettings::new(STATE_BUCKET, STATE_PREFIX, REPORTS_PREFIX, REJECTS_PREFIX);
    s.checkpoint_every = Duration::from_secs(2);
    s.deliver.max_objects = d.max_objects;
    s.deliver.max_in_flight = 2;
    s.deliver.in_flight_grace = Duration::from_millis(0);
    s.bounded_min_users = d.bounded_min_users;
    s.state_range_users = d.range_users;
    s.diff_workers = 1;
    s.spill_dir = spill.to_path_buf();
    s.fan_out_pieces = d.fan_out_pieces;
    s
}

impl Container {
    /// A cold start.
    pub fn new(env: &Env) -> std::io::Result<Self> {
        let gate = Arc::new(Mutex::new(Gate::world()));
        let spill = tempfile::tempdir()?;
        let store: Arc<dyn bridge_shared::ObjectStore> = Arc::new(SimStore::new(
            env.world.clone(),
            env.s3.clone(),
            gate.clone(),
        ));
        let api = Arc::new(SimBraze::new(
            env.world.clone(),
            env.braze.clone(),
            gate.clone(),
        ));
        let cont: Arc<dyn Continuation> = Arc::new(SimContinuation::new(
            env.world.clone(),
            env.queue.clone(),
            gate.clone(),
        ));
        let runner = SyncRunner::new(
            store.clone(),
            env.routes.clone(),
            api,
            settings(&env.deployment, spill.path()),
            Some(cont),
        );
        let cfg = HandlerConfig {
            state_bucket: STATE_BUCKET.into(),
            output_prefixes: vec!["bridge/".into()],
            state_prefix: STATE_PREFIX.into(),
            reports_prefix: REPORTS_PREFIX.into(),
            routes: env.routes.iter().map(Route::binding).collect(),
            lease_s: 60,
        };
        Ok(Self {
            gate,
            handler: Handler::new(cfg, store, Arc::new(runner))
                .with_max_receive_count(Some(env.queue.max_receives)),
            _spill: spill,
        })
    }
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Returned: the ids it did not acknowledge.
    Returned(Vec<String>),
    /// Returned an error: nothing acknowledged.
    Failed,
    /// Crashed at an await point.
    Crashed,
    /// Killed at its deadline.
    TimedOut,
}

/// The SQS event for `msgs`.
pub fn sqs_event(msgs: &[Message]) -> Value {
    let records: Vec<Value> = msgs
        .iter()
        .map(|m| {
            json!({"messageId": m.id, "receiptHandle": m.id, "body": m.body,
                "attributes": {"ApproximateReceiveCount": m.receives.to_string()},
                "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:1:braze-sync",
                "awsRegion": "us-east-1"})
        })
        .collect();
    json!({ "Records": records })
}

/// Runs one invocation of `container` on `msgs`; deletes what it acknowledged.
pub async fn invoke(env: &Env, container: &Container, inv: u64, msgs: &[Message]) -> Ended {
    let world = &env.world;
    let f = &world.faults;
    let prone = keyed(world.seed, &[b"prone", &inv.to_le_bytes()]) < f.crash_prone;
    let gate = Gate::new(inv, if prone { f.crash } else { 0 });
    *container.gate.lock().unwrap_or_else(|e| e.into_inner()) = gate.clone();
    world.stat(|s| s.invocations += 1);
    let ids: Vec<&str> = msgs.iter().map(|m| m.id.as_str()).collect();
    world.trace(|| format!("inv {inv} starts on {ids:?}"));
    let payload = sqs_event(msgs);
    let timeout = env.deployment.timeout_ms;
    let mut reasons = Vec::new();
    let ended = tokio::select! {
        biased;
        r = container.handler.handle(&payload, Some(timeout)) => match r {
            Ok(v) => Ended::Returned({
                reasons = v["results"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|r| r["retry"].as_str().map(String::from)).collect())
                    .unwrap_or_default();
                v["batchItemFailures"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|f| f["itemIdentifier"].as_str().map(String::from)).collect())
                    .unwrap_or_default()
            }),
            Err(_) => Ended::Failed,
        },
        () = gate.wait_crash() => Ended::Crashed,
        () = tokio::time::sleep(Duration::from_millis(timeout)) => Ended::TimedOut,
    };
    // Whatever the invocation left running dies with its container.
    gate.crash();
    match &ended {
        Ended::Returned(failed) => {
            for why in reasons.iter().filter(|_| !failed.is_empty()) {
                world.trace(|| format!("inv {inv} retries: {why}"));
            }
            for m in msgs {
                env.queue.answered(&m.id);
                if !failed.contains(&m.id) {
                    env.queue.delete(&m.id);
                }
            }
        }
        Ended::Crashed => world.stat(|s| s.crashes += 1),
        Ended::TimedOut => world.stat(|s| s.timeouts += 1),
        Ended::Failed => {}
    }
    world.trace(|| format!("inv {inv} ended {ended:?}"));
    ended
}
