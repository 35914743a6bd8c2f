//! `sync-scale-bench`'s Lambda-shaped runs: every invocation is a child process (a cold
//! container) running the real [`Handler`] and [`SyncRunner`] as `main.rs` wires them, over the
//! folder store, a Braze that takes every request after a latency, and a queue in a folder
//! (the continuation and fan-out piece messages), with the function's `MemorySize` and a short
//! timeout, so a big export hands over and commits several times. Each child reports its
//! whole-process peak RSS (`VmHWM`); the parent keeps the maximum per invocation kind.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use braze_sync::config::route::Route;
use braze_sync::run::handler::{ExportPlan, Handler, HandlerConfig};
use braze_sync::run::runner::{Continuation, PieceMessage, RunnerSettings, SyncRunner};
use braze_sync::send::braze::{BrazeApi, RateLimitInfo, TrackError, TrackResponse};
use bridge_shared::object_store::{ObjectMeta, ObjectReader, ObjectStore, PutCondition};
use bridge_shared::{S3Uri, StoreError};
use bytes::Bytes;
use serde_json::{Value, json};

use bridge_shared::dir_store::DirStore;

/// Where the state, reports and rejects live (as the template's state bucket).
pub const STATE_BUCKET: &str = "state";
/// The state prefix.
pub const STATE_PREFIX: &str = "s/";
/// The exports' bucket.
pub const EXPORTS_BUCKET: &str = "exports";

/// How the invocations run (passed to each child in its environment).
#[derive(Debug, Clone)]
pub struct LambdaShape {
    /// The function's `MemorySize`, MB.
    pub memory_mb: u64,
    /// The function's `Timeout`: each invocation starts with this much time left.
    pub timeout_s: u64,
    /// Braze requests per second the sender may make (the workspace limit).
    pub requests_per_s: u64,
    /// The function's `EphemeralStorage`, MB.
    pub storage_mb: u64,
    /// Users per state range.
    pub range_users: u64,
    /// `BRIDGE_FAN_OUT_PIECES` (0: only when the spill would not fit).
    pub fan_out_pieces: usize,
}

impl LambdaShape {
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                self.memory_mb.to_string(),
            ),
            ("SCALE_TIMEOUT_S", self.timeout_s.to_string()),
            ("SCALE_REQUESTS_PER_S", self.requests_per_s.to_string()),
            ("BRIDGE_EPHEMERAL_STORAGE_MB", self.storage_mb.to_string()),
            ("SCALE_RANGE_USERS", self.range_users.to_string()),
            ("BRIDGE_FAN_OUT_PIECES", self.fan_out_pieces.to_string()),
            ("MIMALLOC_PURGE_DELAY", mimalloc_purge_delay()),
        ]
    }
}

/// The allocator setting the invocations run with: the stack's (`template.yaml` sets `0` on
/// the function, so freed memory goes back to the kernel at once), unless the environment
/// sets another.
pub fn mimalloc_purge_delay() -> String {
    std::env::var("MIMALLOC_PURGE_DELAY").unwrap_or_else(|_| "0".into())
}

/// Braze taking every request whole after `latency`.
struct FastBraze {
    latency: Duration,
}

#[async_trait]
impl BrazeApi for FastBraze {
    async fn track(&self, _body: Bytes) -> Result<TrackResponse, TrackError> {
        tokio::time::sleep(self.latency).await;
        Ok(TrackResponse {
            status: 201,
            message: "success".into(),
            errors: Vec::new(),
            rate: RateLimitInfo::default(),
        })
    }
}

/// The function's own queue as a folder: one file per message, in the order sent.
struct FolderQueue {
    dir: PathBuf,
    seq: AtomicU64,
}

impl FolderQueue {
    fn send(&self, body: String) -> Result<(), String> {
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        let nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
        let path = self.dir.join(format!("{nanos:020}-{n:04}.json"));
        std::fs::write(path, body).map_err(|e| e.to_string())
    }
}

#[async_trait]
impl Continuation for FolderQueue {
    async fn hand_over(&self, plan: &ExportPlan) -> Result<(), String> {
        let key = bridge_shared::s3_uri::encode_key(&plan.trigger.key);
        self.send(
            json!({"Records": [{
                "eventSource": "aws:s3", "eventName": "ObjectCreated:Continuation",
                "s3": {"bucket": {"name": plan.trigger.bucket}, "object": {"key": key}}}]})
            .to_string(),
        )
    }

    async fn queue_piece(&self, piece: &PieceMessage) -> Result<(), String> {
        self.send(piece.body())
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The whole process's peak RSS so far, MB (`VmHWM`).
pub fn vm_hwm_mb() -> f64 {
    proc_status_mb("VmHWM:")
}

fn proc_status_mb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The process's peak RSS (MB, as `f64` bits) when this invocation, a fan-out piece, became
/// the finalizer (0: it did not).
static BEFORE_FINAL_MB: AtomicU64 = AtomicU64::new(0);

/// The store's hook on each object it creates: when a piece claims `final.json` (it becomes
/// the finalizer), keeps the peak so far as the piece's and resets the peak (`clear_refs`),
/// so the process's peak at its end is the finalizer's alone.
fn mark_final(key: &str) {
    if key.ends_with("/final.json") {
        BEFORE_FINAL_MB.store(vm_hwm_mb().to_bits(), Ordering::SeqCst);
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }
}

/// The folder store, telling [`mark_final`] when a piece creates `final.json`; every other
/// call goes straight through.
struct MarksFinal(DirStore);

#[async_trait]
impl ObjectStore for MarksFinal {
    async fn get(&self, uri: &S3Uri) -> Result<(ObjectMeta, Bytes), StoreError> {
        self.0.get(uri).await
    }
    async fn get_reader(&self, uri: &S3Uri) -> Result<(ObjectMeta, ObjectReader), StoreError> {
        self.0.get_reader(uri).await
    }
    async fn head(&self, uri: &S3Uri) -> Result<Option<ObjectMeta>, StoreError> {
        self.0.head(uri).await
    }
    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.0.list(bucket, prefix).await
    }
    async fn list_page(
        &self,
        bucket: &str,
        prefix: &str,
        start_after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ObjectMeta>, StoreError> {
        self.0.list_page(bucket, prefix, start_after, max).await
    }
    async fn put(
        &self,
        uri: &S3Uri,
        body: Bytes,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        let create = matches!(condition, PutCondition::IfAbsent);
        let out = self.0.put(uri, body, condition, metadata).await;
        if create && out.is_ok() {
            mark_final(&uri.key);
        }
        out
    }
    async fn put_file(
        &self,
        uri: &S3Uri,
        path: &Path,
        condition: PutCondition,
        metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        self.0.put_file(uri, path, condition, metadata).await
    }
    async fn get_tail(&self, uri: &S3Uri, n: u64) -> Result<Bytes, StoreError> {
        self.0.get_tail(uri, n).await
    }
    async fn copy(&self, from: &S3Uri, to: &S3Uri) -> Result<(), StoreError> {
        self.0.copy(from, to).await
    }
    async fn delete(&self, uri: &S3Uri) -> Result<(), StoreError> {
        self.0.delete(uri).await
    }
}

/// With `SCALE_RSS_TRACE` set, prints the process's RSS every 250 ms to stderr (to see which
/// step of an invocation grows), between the function's own log lines.
fn trace_rss() {
    if std::env::var_os("SCALE_RSS_TRACE").is_none() {
        return;
    }
    bridge_shared::logging::init();
    let t = Instant::now();
    std::thread::spawn(move || {
        loop {
            eprintln!(
                "rss {:>7.2}s {:>7.1} MB",
                t.elapsed().as_secs_f64(),
                proc_status_mb("VmRSS:")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

/// The child: one invocation of the function with the SQS event in `payload`, wired as
/// `main.rs` wires it. Prints the handler's result and the process's peak RSS.
pub fn invoke(dir: &Path, route_toml: &str, payload: &Path) {
    trace_rss();
    // As main.rs builds it: a multi-threaded runtime with a worker per core.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let memory_mb = env_u64("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", 512);
    let timeout_s = env_u64("SCALE_TIMEOUT_S", 90);
    let payload: Value = serde_json::from_slice(&std::fs::read(payload).unwrap()).unwrap();
    let result = rt.block_on(async {
        let store: Arc<dyn ObjectStore> =
            Arc::new(MarksFinal(DirStore::per_bucket(dir.join("s3"))));
        let route = Route::from_toml(route_toml, "customers.toml").unwrap();
        let mut settings = RunnerSettings::new(STATE_BUCKET, STATE_PREFIX, "reports/", "rejects/");
        settings.deliver.rate.requests_per_window = env_u64("SCALE_REQUESTS_PER_S", 1000) as u32;
        settings.deliver.rate.window = Duration::from_secs(1);
        settings.memory_limit_bytes = Some(memory_mb << 20);
        settings.spill_dir = dir.join("tmp");
        settings.state_range_users =
            env_u64("SCALE_RANGE_USERS", braze_sync::state::store::RANGE_USERS);
        // As in production, where both are the range target: routes of more than one range
        // take the bounded diff.
        settings.bounded_min_users = settings.state_range_users;
        settings.fan_out_pieces =
            Some(env_u64("BRIDGE_FAN_OUT_PIECES", 0) as usize).filter(|n| *n > 0);
        std::fs::create_dir_all(&settings.spill_dir).unwrap();
        let queue = dir.join("queue");
        std::fs::create_dir_all(&queue).unwrap();
        let continuation: Arc<dyn Continuation> = Arc::new(FolderQueue {
            dir: queue,
            seq: AtomicU64::new(0),
        });
        let hcfg = HandlerConfig {
            state_bucket: STATE_BUCKET.into(),
            output_prefixes: vec![STATE_PREFIX.into(), "reports/".into(), "rejects/".into()],
            state_prefix: STATE_PREFIX.into(),
            reports_prefix: "reports/".into(),
            routes: vec![route.binding()],
            lease_s: 60,
        };
        let braze: Arc<dyn BrazeApi> = Arc::new(FastBraze {
            latency: Duration::from_millis(20),
        });
        let runner = SyncRunner::new(
            store.clone(),
            vec![route],
            braze,
            settings,
            Some(continuation),
        );
        let handler = Handler::new(hcfg, store, Arc::new(runner));
        handler
            .handle(&payload, Some(timeout_s * 1000))
            .await
            .unwrap_or_else(|e| json!({"error": e}))
    });
    drop(rt);
    let before_final = f64::from_bits(BEFORE_FINAL_MB.load(Ordering::SeqCst));
    println!(
        "{}",
        json!({"result": result, "peak_rss_mb": vm_hwm_mb(), "before_final_peak_rss_mb": before_final})
    );
}

/// One invocation as the parent saw it.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// `first` (the export's own trigger), `hand_over` (a continuation that handed over
    /// again), `final` (the invocation that finished the export), `coordinator` (split the
    /// export into pieces), `piece`, `retried` (asked to be retried).
    pub kind: &'static str,
    /// The whole process's peak; for a piece that became the finalizer, its peak before.
    pub peak_rss_mb: f64,
    /// For a piece that became the finalizer: the peak from then on (the finalizer's).
    pub finalizer_rss_mb: Option<f64>,
    pub result: Value,
}

/// The kind of an invocation from its message and what the handler returned.
fn kind_of(body: &Value, result: &Value, queued: usize, first: bool) -> &'static str {
    if !result["batchItemFailures"]
        .as_array()
        .is_none_or(|f| f.is_empty())
        || result.get("error").is_some()
    {
        return "retried";
    }
    if body.get("bridge_fan_out").is_some() {
        return "piece";
    }
    let outcome = result["results"][0]["outcome"].as_str().unwrap_or("");
    match outcome {
        "fanned_out" => "coordinator",
        "incomplete" if queued > 0 && first => "first",
        "incomplete" if queued > 0 => "hand_over",
        _ => "final",
    }
}

/// Runs the function on `trigger` (an S3 event body) and on every message it queues, one
/// child process per invocation, until the queue is empty. Returns every invocation.
pub fn run_export(
    dir: &Path,
    trigger: Value,
    shape: &LambdaShape,
    max_invocations: usize,
) -> Vec<Invocation> {
    let exe = std::env::current_exe().unwrap();
    let queue = dir.join("queue");
    std::fs::create_dir_all(&queue).unwrap();
    let mut pending: VecDeque<Value> = VecDeque::from([trigger]);
    let mut out = Vec::new();
    let mut n = 0usize;
    while let Some(body) = pending.pop_front() {
        n += 1;
        assert!(
            n <= max_invocations,
            "the export took more than {max_invocations} invocations: {out:?}"
        );
        let event = json!({"Records": [{
            "eventSource": "aws:sqs", "messageId": format!("m{n}"), "body": body.to_string()}]});
        let payload = dir.join("payload.json");
        std::fs::write(&payload, event.to_string()).unwrap();
        let t = Instant::now();
        let child = std::process::Command::new(&exe)
            .arg("--invoke")
            .arg(dir)
            .arg(&payload)
            .envs(shape.env())
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("the bench runs itself as an invocation");
        let wall_s = t.elapsed().as_secs_f64();
        // The metrics (EMF lines) go to stdout too; the child's own line is the last.
        let stdout = String::from_utf8_lossy(&child.stdout);
        let last = stdout.lines().last().unwrap_or("");
        let v: Value = serde_json::from_str(last)
            .unwrap_or_else(|_| panic!("invocation {n} died ({}): {}", child.status, stdout));
        let queued = drain(&queue);
        let kind = kind_of(&body, &v["result"], queued.len(), n == 1);
        if kind == "retried" {
            // As SQS would redeliver it.
            pending.push_back(body.clone());
        }
        pending.extend(queued);
        let peak = v["peak_rss_mb"].as_f64().unwrap_or(0.0);
        let before_final = v["before_final_peak_rss_mb"].as_f64().unwrap_or(0.0);
        let inv = Invocation {
            kind,
            peak_rss_mb: if before_final > 0.0 {
                before_final
            } else {
                peak
            },
            finalizer_rss_mb: (before_final > 0.0).then_some(peak),
            result: v["result"].clone(),
        };
        let finalizer = inv.finalizer_rss_mb.map_or(String::new(), |f| {
            format!(", then as the finalizer {f:.1} MB")
        });
        eprintln!(
            "  invocation {n} ({kind}): peak RSS {:.1} MB{finalizer}, {wall_s:.1} s: {}",
            inv.peak_rss_mb,
            summary_line(&inv.result)
        );
        out.push(inv);
    }
    out
}

/// The messages the invocation queued, oldest first, removed from the folder.
fn drain(queue: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(queue)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let body = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            std::fs::remove_file(&p).unwrap();
            body
        })
        .collect()
}

fn summary_line(result: &Value) -> String {
    let r = &result["results"][0];
    let s = &r["summary"];
    format!(
        "{} {}",
        r["outcome"].as_str().unwrap_or(""),
        json!({"sent": s["users_sent"], "confirmed": s["users_confirmed"], "retry": r["retry"], "error": r["error"]})
    )
}

/// The largest peak RSS per invocation kind (`finalizer`: the part of a piece's invocation
/// after it became the finalizer).
pub fn peaks(invocations: &[Invocation]) -> BTreeMap<&'static str, f64> {
    let mut m = BTreeMap::new();
    for i in invocations {
        let parts = std::iter::once((i.kind, i.peak_rss_mb))
            .chain(i.finalizer_rss_mb.map(|f| ("finalizer", f)));
        for (kind, mb) in parts {
            let e = m.entry(kind).or_insert(0.0f64);
            *e = e.max(mb);
        }
    }
    m
}

/// The baseline child: reads every part of the export in `folder` as CSV records and nothing
/// else, in a process started the same way; prints its peak RSS.
pub fn read_only(folder: &Path) {
    let mut rec = csv::ByteRecord::new();
    let mut bytes = 0usize;
    for part in braze_sync::diff::in_memory::local_parts(folder, ".DONE").unwrap() {
        let mut rdr = csv::ReaderBuilder::new().from_path(&part).unwrap();
        while rdr.read_byte_record(&mut rec).unwrap() {
            bytes += rec.as_slice().len();
        }
    }
    std::hint::black_box(bytes);
    println!("{}", json!({"peak_rss_mb": vm_hwm_mb()}));
}
