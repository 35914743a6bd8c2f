//! The world one seed decides: its fault rates, the per-call fates of every invocation's calls
//! (crash here, fail before applying, apply and lose the answer, latency), the figures a run
//! reports, and a trace whose digest proves a replay took the same path.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::rng::{Rng, keyed};

/// Fault rates of one schedule, per mille per call.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Faults {
    /// S3 calls failing before they apply (503 SlowDown, timeout).
    pub s3_fail: u64,
    /// S3 writes that apply and then lose their answer (the caller sees a timeout).
    pub s3_lost: u64,
    /// Braze requests answered 429 before applying.
    pub braze_429: u64,
    /// Braze requests answered 5xx (or timing out) before applying.
    pub braze_5xx: u64,
    /// Braze requests applied and then answered 500.
    pub braze_applied_500: u64,
    /// Attribute objects Braze refuses in `errors[]` of an otherwise accepted request.
    pub braze_refuse: u64,
    /// SQS sends that fail before queueing / queue and lose the answer.
    pub sqs_fail: u64,
    /// SQS sends whose answer is lost after the message was queued.
    pub sqs_lost: u64,
    /// SQS deliveries duplicated.
    pub sqs_dup: u64,
    /// Calls at which an invocation crashes (its future is dropped), for invocations chosen
    /// to be crash-prone.
    pub crash: u64,
    /// Share of invocations that may crash.
    pub crash_prone: u64,
    /// Most latency of one S3 call, ms.
    pub s3_latency_ms: u64,
    /// Most latency of one Braze call, ms.
    pub braze_latency_ms: u64,
}

impl Faults {
    /// The rates a seed chooses: about one schedule in eight runs clean.
    pub fn choose(rng: &mut Rng) -> Self {
        let s3_latency_ms = rng.range(5, 200);
        let braze_latency_ms = rng.range(50, 3_000);
        if rng.chance(125) {
            return Self {
                s3_latency_ms,
                braze_latency_ms,
                ..Self::default()
            };
        }
        let mut pick = |max: u64| {
            if rng.chance(300) {
                0
            } else {
                rng.range(0, max)
            }
        };
        Self {
            s3_fail: pick(40),
            s3_lost: pick(40),
            braze_429: pick(60),
            braze_5xx: pick(60),
            braze_applied_500: pick(40),
            braze_refuse: pick(10),
            sqs_fail: pick(40),
            sqs_lost: pick(40),
            sqs_dup: pick(80),
            crash: pick(25),
            crash_prone: pick(600),
            s3_latency_ms,
            braze_latency_ms,
        }
    }

    /// Whether anything can go wrong in this schedule.
    pub fn any(&self) -> bool {
        self.s3_fail
            + self.s3_lost
            + self.braze_429
            + self.braze_5xx
            + self.braze_applied_500
            + self.braze_refuse
            + self.sqs_fail
            + self.sqs_lost
            + self.sqs_dup
            + self.crash
            > 0
    }
}

/// Figures of one seed's run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    /// Invocations started.
    pub invocations: u64,
    /// Invocations crashed at an await point.
    pub crashes: u64,
    /// Invocations killed at their deadline.
    pub timeouts: u64,
    /// Writes applied whose answer was lost.
    pub lost_answers: u64,
    /// Calls failed before applying.
    pub failed_calls: u64,
    /// Exports uploaded.
    pub exports: u64,
    /// Messages moved to the DLQ.
    pub dlq: u64,
    /// Attribute values Braze applied (one per attribute of each object applied).
    pub attributes_applied: u64,
    /// Braze requests received.
    pub braze_requests: u64,
}

/// What happens to one call.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fate {
    /// The invocation dies at this call.
    pub crash: bool,
    /// The call fails before it applies.
    pub fail: bool,
    /// The call applies, then its answer is lost.
    pub lose: bool,
    /// Latency.
    pub latency: Duration,
}

/// One invocation's context: its id, whether it crashed, and its calls so far.
#[derive(Debug)]
pub struct Gate {
    /// Invocation id (0: the world itself: uploads and checks, never faulted).
    pub inv: u64,
    crash_permille: u64,
    crashed: AtomicBool,
    notify: tokio::sync::Notify,
    calls: Mutex<BTreeMap<String, u64>>,
}

impl Gate {
    /// The world's own gate (no faults).
    pub fn world() -> Arc<Self> {
        Self::new(0, 0)
    }

    /// An invocation's gate.
    pub fn new(inv: u64, crash_permille: u64) -> Arc<Self> {
        Arc::new(Self {
            inv,
            crash_permille,
            crashed: AtomicBool::new(false),
            notify: tokio::sync::Notify::new(),
            calls: Mutex::new(BTreeMap::new()),
        })
    }

    /// Whether the invocation died.
    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    /// Kills the invocation (also used for the deadline).
    pub fn crash(&self) {
        self.crashed.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Resolves once the invocation crashed.
    pub async fn wait_crash(&self) {
        while !self.crashed() {
            self.notify.notified().await;
        }
    }

    fn nth(&self, op: &str, key: &str) -> u64 {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let n = calls.entry(format!("{op} {key}")).or_insert(0);
        *n += 1;
        *n
    }
}

/// The world's shared parts.
pub struct World {
    /// The seed.
    pub seed: u64,
    /// Fault rates.
    pub faults: Faults,
    /// Figures.
    pub stats: Mutex<Stats>,
    trace: Mutex<(u64, u64, Option<Vec<String>>)>,
    start: tokio::time::Instant,
}

impl World {
    /// A world for `seed` with `faults`.
    pub fn new(seed: u64, faults: Faults, keep_trace: bool) -> Arc<Self> {
        Arc::new(Self {
            seed,
            faults,
            stats: Mutex::new(Stats::default()),
            trace: Mutex::new((0, 0, keep_trace.then(Vec::new))),
            start: tokio::time::Instant::now(),
        })
    }

    /// Updates the figures.
    pub fn stat(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Records an event in the trace.
    pub fn trace(&self, event: impl FnOnce() -> String) {
        let mut t = self.trace.lock().unwrap_or_else(|e| e.into_inner());
        let line = event();
        t.0 = crate::rng::mix(t.0 ^ xxhash_rust::xxh3::xxh3_64(line.as_bytes()));
        t.1 += 1;
        if let Some(lines) = &mut t.2 {
            // Tokio's clock, which blocking work (in turns with the runtime) reads too.
            let at = tokio::time::Instant::now().saturating_duration_since(self.start);
            lines.push(format!("{:>12} {line}", at.as_millis()));
        }
    }

    /// Adds a line to the kept trace at the current virtual time without counting it in the
    /// digest: what a replay shows beside its events ([`crate::notes`]), never what tells two
    /// replays apart.
    pub fn note(&self, line: impl FnOnce() -> String) {
        let mut t = self.trace.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lines) = &mut t.2 {
            let at = tokio::time::Instant::now().saturating_duration_since(self.start);
            lines.push(format!("{:>12} {}", at.as_millis(), line()));
        }
    }

    /// The trace's digest and length.
    pub fn trace_digest(&self) -> (u64, u64) {
        let t = self.trace.lock().unwrap_or_else(|e| e.into_inner());
        (t.0, t.1)
    }

    /// The trace's lines, when kept.
    pub fn trace_lines(&self) -> Vec<String> {
        let t = self.trace.lock().unwrap_or_else(|e| e.into_inner());
        t.2.clone().unwrap_or_default()
    }

    /// The fate of one call of `gate`'s invocation: `op` on `key`. `(fail, lose)` are the
    /// rates that apply to this kind of call.
    pub fn fate(
        &self,
        gate: &Gate,
        op: &str,
        key: &str,
        fail: u64,
        lose: u64,
        latency_ms: u64,
    ) -> Fate {
        if gate.inv == 0 {
            return Fate::default();
        }
        let nth = gate.nth(op, key).to_le_bytes();
        let inv = gate.inv.to_le_bytes();
        let draw = |salt: &[u8]| {
            keyed(
                self.seed,
                &[salt, &inv, op.as_bytes(), key.as_bytes(), &nth],
            )
        };
        let latency = if latency_ms == 0 {
            0
        } else {
            // Keyed draws are 0..1000; spread over the latency range.
            draw(b"latency") * latency_ms / 1000
        };
        Fate {
            crash: gate.crash_permille > 0 && draw(b"crash") < gate.crash_permille,
            fail: draw(b"fail") < fail,
            lose: draw(b"lose") < lose,
            latency: Duration::from_millis(latency),
        }
    }
}

/// Virtual milliseconds since the world began.
pub fn now_ms() -> i64 {
    braze_sync::clock::now().timestamp_millis() - crate::EPOCH_MS
}
