//! A deterministic simulation of braze-sync's protocol between invocations. One `u64` seed
//! decides the workload, the deployment and every fault; the real handler, runner, fan-out
//! and state code run unchanged over simulated S3 ([`s3`]), SQS ([`queue`]), Lambda
//! ([`lambda`]), Braze ([`braze`]) and one virtual clock (tokio's paused time, which
//! `braze_sync::clock` follows). When the world is quiet, [`check`] tests the invariants.
//!
//! `cargo run -p sim --release --bin simulate -- --seeds N --seed-start S` runs many seeds;
//! `... -- --seed S --trace` replays one and prints its trace.

pub mod braze;
pub mod check;
pub mod lambda;
pub mod notes;
pub mod queue;
pub mod rng;
pub mod s3;
pub mod workload;
pub mod world;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use braze_sync::config::route::Route;
use braze_sync::run::handler::{ALLOW_DEPARTURES_METADATA, FORCE_FULL_METADATA};
use bridge_shared::object_store::PutCondition;
use bridge_shared::{ObjectStore, S3Uri};
use bytes::Bytes;

use crate::check::EXPORTS_BUCKET;
use crate::lambda::{Container, Deployment, Env};
use crate::queue::{Queue, s3_notification};
use crate::rng::Rng;
use crate::workload::{Export, Kind};
use crate::world::{Faults, Gate, Stats, World, now_ms};

/// The world's epoch: virtual time 0 (2026-01-01T00:00:00Z), in Unix ms.
pub const EPOCH_MS: i64 = 1_767_225_600_000;

/// How long a world may run (virtual) before it counts as never quiet.
pub const MAX_VIRTUAL_MS: i64 = 72 * 3_600_000;

/// Options of one run.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Keep the trace lines (replays).
    pub trace: bool,
    /// Replaces the function timeout the seed chose, ms (a deployment too short to work).
    pub timeout_ms: Option<u64>,
    /// Notes braze-sync's logs in the kept trace (once [`notes::install_log`] installed the
    /// subscriber; one seed at a time).
    pub log: bool,
    /// Users whose rows and confirmed state are noted in the kept trace ([`notes`]).
    pub watch: Vec<String>,
}

/// What one seed did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SeedOutcome {
    /// The seed.
    pub seed: u64,
    /// Its fault rates.
    pub faults: Faults,
    /// Its deployment.
    pub deployment: Deployment,
    /// Figures.
    pub stats: Stats,
    /// Invariant violations.
    pub violations: Vec<String>,
    /// Digest and length of the trace (equal on a replay).
    pub trace_digest: (u64, u64),
    /// The trace lines, when asked for.
    #[serde(skip)]
    pub trace: Vec<String>,
}

impl SeedOutcome {
    /// Whether faults could happen in this schedule.
    pub fn with_faults(&self) -> bool {
        self.faults.any()
    }
}

/// The one-line command that replays a seed.
pub fn replay_command(seed: u64) -> String {
    format!("cargo run -p sim --release --bin simulate -- --seed {seed} --trace")
}

fn deployment(rng: &mut Rng) -> Deployment {
    let mode = rng.below(3);
    Deployment {
        timeout_ms: [90_000, 120_000, 300_000, 900_000][rng.below(4) as usize],
        concurrency: rng.range(1, 4) as usize,
        batch_size: if rng.chance(700) { 1 } else { 2 },
        bounded_min_users: if mode == 0 { u64::MAX } else { 0 },
        fan_out_pieces: if mode == 2 {
            Some(rng.range(2, 3) as usize)
        } else {
            None
        },
        range_users: 16,
        max_objects: rng.range(3, 10) as usize,
    }
}

/// Runs one seed to quiet and checks the invariants. Deterministic: the same seed gives the
/// same trace.
pub fn run_seed(seed: u64, opts: &Options) -> SeedOutcome {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("building the simulation's runtime: {e}"),
    };
    let out = rt.block_on(run_world(seed, opts));
    rt.shutdown_background();
    out
}

async fn run_world(seed: u64, opts: &Options) -> SeedOutcome {
    braze_sync::clock::set_virtual(
        chrono::DateTime::from_timestamp_millis(EPOCH_MS).unwrap_or_default(),
    );
    braze_sync::clock::set_nonce_seed(seed);
    let mut rng = Rng::new(seed);
    let faults = Faults::choose(&mut rng);
    let mut deployment = deployment(&mut rng);
    if let Some(t) = opts.timeout_ms {
        deployment.timeout_ms = t;
    }
    let world = World::new(seed, faults.clone(), opts.trace);
    if opts.log {
        notes::log_into(Some(world.clone()));
    }
    let routes: Vec<Route> = ["people", "members"]
        .iter()
        .filter_map(|r| Route::from_toml(&workload::route_toml(r), "sim").ok())
        .collect();
    let queue = Arc::new(Queue::new(6 * deployment.timeout_ms as i64, 5));
    let env = Env {
        world: world.clone(),
        s3: Arc::default(),
        braze: Arc::default(),
        queue: queue.clone(),
        deployment: deployment.clone(),
        routes,
    };
    let mut exports: BTreeMap<&'static str, Vec<Export>> = BTreeMap::new();
    let people_users = rng.range(20, 80) as usize;
    let member_users = rng.range(30, 120) as usize;
    exports.insert(
        "people",
        workload::exports(&mut rng, "people", people_users, 0),
    );
    exports.insert(
        "members",
        workload::exports(&mut rng, "members", member_users, 0),
    );
    let watch = Arc::new(notes::Watch::new(
        &world,
        &opts.watch,
        exports.values().flatten(),
    ));
    let mut uploads: Vec<&Export> = exports.values().flatten().collect();
    uploads.sort_by_key(|e| (e.upload_ms, e.route, e.seq));
    let raw: Arc<dyn ObjectStore> = Arc::new(s3::SimStore::new(
        world.clone(),
        env.s3.clone(),
        Arc::new(Mutex::new(Gate::world())),
    ));

    let mut violations = Vec::new();
    let running = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let pool: Arc<Mutex<Vec<Arc<Container>>>> = Arc::default();
    let mut next_upload = 0;
    let mut next_inv = 0u64;
    let mut redrives = 0;
    loop {
        let now = now_ms();
        while next_upload < uploads.len() && uploads[next_upload].upload_ms <= now {
            upload(&env, &raw, uploads[next_upload], &mut rng).await;
            next_upload += 1;
        }
        while running.load(Ordering::SeqCst) < deployment.concurrency {
            let (msgs, dead) = queue.receive(deployment.batch_size);
            for d in &dead {
                world.stat(|s| s.dlq += 1);
                world.trace(|| format!("message {} to the DLQ", d.id));
                violations.extend(check::dead_letter_reported(&env, d));
            }
            if msgs.is_empty() {
                break;
            }
            next_inv += 1;
            let inv = next_inv;
            let container = pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let container = match container {
                Some(c) => c,
                None => match Container::new(&env) {
                    Ok(c) => Arc::new(c),
                    Err(e) => panic!("creating a container's spill folder: {e}"),
                },
            };
            running.fetch_add(1, Ordering::SeqCst);
            let (env2, running2, done2, pool2) =
                (env.clone(), running.clone(), done.clone(), pool.clone());
            let watch = watch.clone();
            tokio::spawn(async move {
                let ended = lambda::invoke(&env2, &container, inv, &msgs).await;
                watch.note_state(&env2, inv).await;
                if matches!(ended, lambda::Ended::Returned(_) | lambda::Ended::Failed) {
                    pool2
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(container);
                }
                running2.fetch_sub(1, Ordering::SeqCst);
                done2.notify_one();
            });
        }
        let quiet =
            next_upload == uploads.len() && running.load(Ordering::SeqCst) == 0 && queue.is_empty();
        if quiet {
            if !queue.dlq().is_empty() && redrives < 2 {
                redrives += 1;
                let n = queue.redrive();
                world.trace(|| format!("operator redrives {n} messages from the DLQ"));
                continue;
            }
            break;
        }
        if now > MAX_VIRTUAL_MS {
            violations.push(format!(
                "the world never became quiet: after {} virtual hours {} invocations run and {} messages wait (a loop without a limit)",
                MAX_VIRTUAL_MS / 3_600_000,
                running.load(Ordering::SeqCst),
                if queue.is_empty() { 0 } else { 1 }
            ));
            break;
        }
        let mut wake = now + 1_000;
        if let Some(u) = uploads.get(next_upload) {
            wake = wake.max(u.upload_ms.min(now + 3_600_000));
        }
        if let Some(t) = queue.next_visible() {
            wake = wake.min(t.max(now + 1));
        }
        if let Some(u) = uploads.get(next_upload) {
            wake = wake.min(u.upload_ms.max(now + 1));
        }
        let sleep_ms = (wake - now).max(1) as u64;
        tokio::select! {
            biased;
            () = done.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
        }
    }
    if !queue.dlq().is_empty() {
        let ids: Vec<String> = queue.dlq().iter().map(|m| m.id.clone()).collect();
        violations.push(format!(
            "messages still in the DLQ after {redrives} redrives: {ids:?}"
        ));
    }
    if violations.is_empty() {
        let clean = !faults.any();
        violations.extend(check::check(&env, &raw, &exports, clean).await);
    }
    if opts.log {
        notes::log_into(None);
    }
    let stats = world
        .stats
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    SeedOutcome {
        seed,
        faults,
        deployment,
        stats,
        violations,
        trace_digest: world.trace_digest(),
        trace: world.trace_lines(),
    }
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(EPOCH_MS + ms)
        .unwrap_or_default()
        .to_rfc3339()
}

async fn put(raw: &Arc<dyn ObjectStore>, key: &str, body: String, meta: BTreeMap<String, String>) {
    let uri = S3Uri::new(EXPORTS_BUCKET, key);
    if let Err(e) = raw
        .put(&uri, Bytes::from(body), PutCondition::None, meta)
        .await
    {
        panic!("the world's own upload of {uri} failed: {e}");
    }
}

/// Uploads an export and sends its notifications (duplicates too).
async fn upload(env: &Env, raw: &Arc<dyn ObjectStore>, e: &Export, rng: &mut Rng) {
    let world = &env.world;
    world.stat(|s| s.exports += 1);
    let mut meta = BTreeMap::new();
    meta.insert(
        braze_sync::run::handler::EXPORTED_AT_METADATA.to_string(),
        rfc3339(e.dated_ms),
    );
    if e.kind == Kind::ForcedReplay {
        meta.insert(FORCE_FULL_METADATA.to_string(), "true".into());
    }
    let _ = ALLOW_DEPARTURES_METADATA;
    let trigger = e.trigger_key();
    world.trace(|| format!("upload {trigger} ({:?}, {} users)", e.kind, e.rows.len()));
    let mut keys = Vec::new();
    if e.route == "people" {
        put(raw, &trigger, e.csv_part(0), meta).await;
    } else {
        let folder = trigger.trim_end_matches(".DONE");
        for p in 0..e.parts {
            let key = format!("{folder}part-{p:04}.csv");
            put(raw, &key, e.csv_part(p), BTreeMap::new()).await;
            keys.push(key);
        }
        put(raw, &trigger, format!("{} {}", e.seq, e.dated_ms), meta).await;
    }
    keys.push(trigger.clone());
    let dup_rate = world.faults.sqs_dup;
    for key in keys {
        let body = s3_notification(EXPORTS_BUCKET, &key, "ObjectCreated:Put");
        let delay = rng.range(0, 2_000) as i64;
        env.queue.send(body.clone(), delay);
        if rng.chance(dup_rate) {
            env.queue
                .send(body.clone(), delay + rng.range(0, 600_000) as i64);
        }
        if key == trigger {
            for _ in 0..e.duplicates {
                env.queue
                    .send(body.clone(), rng.range(1_000, 3_600_000) as i64);
            }
        }
    }
}
