//! What a replay can show beside its events, to find why a seed failed: braze-sync's own logs
//! (`simulate --seed S --trace --log info`) and, for a few users, what every export holds for
//! them and what the confirmed state (the route head's and every fork's) says of them after
//! each invocation (`--watch m0024,u0003`). Notes go into the kept trace at the virtual time
//! they happen, never into its digest: a replay with notes takes the same path as one without.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use braze_sync::model::Identifier;
use braze_sync::state::confirmed::{Snapshot, UNKNOWN_FP};
use braze_sync::state::store::StateStore;
use bridge_shared::ObjectStore;

use crate::lambda::{Env, STATE_BUCKET, STATE_PREFIX};
use crate::s3::SimStore;
use crate::workload::Export;
use crate::world::World;

/// The world braze-sync's logs are noted in (one seed at a time).
static LOGGED: Mutex<Option<Arc<World>>> = Mutex::new(None);

/// Notes braze-sync's logs matching `filter` (an `EnvFilter`: `info`,
/// `braze_sync::run=debug`) in the trace of the world running with [`crate::Options::log`].
/// Installs the process's tracing subscriber: call it once, for a replay of one seed.
pub fn install_log(filter: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| format!("--log {filter}: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .without_time()
        .with_ansi(false)
        .with_writer(|| LogLine(Vec::new()))
        .try_init()
        .map_err(|e| format!("installing the log subscriber: {e}"))
}

/// Makes `world` the one logs are noted in (`None`: no world).
pub(crate) fn log_into(world: Option<Arc<World>>) {
    *LOGGED.lock().unwrap_or_else(|e| e.into_inner()) = world;
}

/// One formatted log event, noted when dropped.
struct LogLine(Vec<u8>);

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        let text = text.trim_end();
        if text.is_empty() {
            return;
        }
        if let Some(w) = LOGGED.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            w.note(|| format!("log {text}"));
        }
    }
}

/// The watched users, the routes whose exports hold them, and the last line noted per view of
/// the state (a view is noted when its line changes).
#[derive(Debug, Default)]
pub(crate) struct Watch {
    users: Vec<String>,
    routes: Vec<&'static str>,
    noted: Mutex<BTreeMap<String, String>>,
}

impl Watch {
    /// Watches `users` (none: notes nothing) and notes what each export holds for them.
    pub(crate) fn new<'a>(
        world: &World,
        users: &[String],
        exports: impl Iterator<Item = &'a Export>,
    ) -> Self {
        let mut w = Self {
            users: users.to_vec(),
            ..Self::default()
        };
        for e in exports {
            for u in users {
                let Some(row) = e.rows.get(u) else {
                    continue;
                };
                world.note(|| {
                    format!(
                        "watch {u} in {} #{} ({:?}): {}/{}/{}",
                        e.trigger_key(),
                        e.seq,
                        e.kind,
                        row.tier,
                        row.score,
                        row.vip
                    )
                });
                if !w.routes.contains(&e.route) {
                    w.routes.push(e.route);
                }
            }
        }
        w
    }

    /// Notes, after invocation `inv`, what the route head and every fork left of each watched
    /// route say of the watched users, when it changed since the last note. Reads S3 as it
    /// is, without faults or trace events.
    pub(crate) async fn note_state(&self, env: &Env, inv: u64) {
        let store: Arc<dyn ObjectStore> =
            Arc::new(SimStore::peek(env.world.clone(), env.s3.clone()));
        for route in env
            .routes
            .iter()
            .filter(|r| self.routes.contains(&r.name()))
        {
            let state = StateStore::new(store.clone(), STATE_BUCKET, STATE_PREFIX, route.name())
                .with_range_users(env.deployment.range_users);
            let folder = format!("{STATE_PREFIX}{}/", route.name());
            let mut views = vec![(String::from("head"), state.clone())];
            for key in env.s3.keys(STATE_BUCKET, &format!("{folder}_fan_out/")) {
                if let Some(fork) = key
                    .strip_prefix(&folder)
                    .and_then(|k| k.strip_suffix("/head.json"))
                {
                    views.push((fork.to_string(), state.fork(fork)));
                }
            }
            for (view, state) in views {
                let line = match state.load(route).await {
                    Ok((head, snap)) => format!(
                        "generation {} with {} segments, {} users:{}",
                        head.doc.generation,
                        head.doc.segments.len(),
                        snap.len(),
                        self.describe(&snap)
                    ),
                    Err(e) => format!("does not load: {e}"),
                };
                let view = format!("{} {view}", route.name());
                let mut noted = self.noted.lock().unwrap_or_else(|e| e.into_inner());
                if noted.get(&view) != Some(&line) {
                    env.world
                        .note(|| format!("watch after inv {inv}: {view} {line}"));
                    noted.insert(view, line);
                }
            }
        }
    }

    /// What `snap` says of each watched user: per slot the stored fingerprint (`?` unknown,
    /// `-` none), or `untracked`.
    fn describe(&self, snap: &Snapshot) -> String {
        let mut out = String::new();
        for u in &self.users {
            let key = Identifier::ExternalId(u.clone()).user_key();
            let slots = snap.get(key).map(|st| {
                (0..snap.slots())
                    .map(|i| match st.fp(i) {
                        Some(UNKNOWN_FP) => "?".to_string(),
                        Some(fp) => format!("{fp:x}"),
                        None => "-".to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("/")
            });
            out.push_str(&format!(" {u}={}", slots.as_deref().unwrap_or("untracked")));
        }
        out
    }
}
