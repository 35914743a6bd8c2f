//! `make bench` figure for big routes: a 10,000,000-user, 20-column route (`--users N` to
//! change it) through the bounded diff ([`braze_sync::diff::bounded`]) and the ranged commit, the
//! worker running as a child process under a 512 MB address-space limit (`prlimit --as`;
//! no user systemd/cgroup here), its state in a file-backed object store.
//!
//! 1. generates the first export and (after run 1, so one export is on disk at a time) a
//!    second one with 2% of users changed, 0.5% new and 0.5% gone (the rows of
//!    `sync-diff-bench`);
//! 2. the baseline, same run, same file: a bare CSV read of the second export, one core;
//! 3. worker run 1: the first export against an empty state (every user new, each delta
//!    "confirmed" and checkpointed as a run does, then committed range by range);
//! 4. worker run 2: the second export against that state; its figures are the bench's:
//!    peak RSS (VmHWM), diff rows/s on all cores (rows / wall of read + map + spill + diff),
//!    per core (rows / CPU seconds of the worker), state bytes per user, seconds to commit;
//! 5. with `--piece-of N`: the second export again, whole and as one fan-out piece (the first
//!    1/N of the state's ranges, `only_ranges`, removals deferred), same run: what a piece
//!    costs next to the whole export (it still reads every row, but maps only its own).
//!
//! Writes `target/bench/sync-scale.json`.
//!
//! Each export is written as `--parts` CSV parts (default: one per core), read in parallel.
//!
//! `cargo run --release -p braze-sync --bin sync-scale-bench [-- --users N] [--limit-mb M]
//! [--parts P] [--range-users R] [--piece-of N] [--out FILE]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use braze_sync::config::route::Route;
use braze_sync::diff::bounded::{RangedSettings, RangedTimes, StoreRanges, produce_ranged};
use braze_sync::diff::export::{ProduceOptions, Stop};
use braze_sync::diff::in_memory;
use braze_sync::model::UserDelta;
use braze_sync::state::store::{Head, StateStore, Watermark};
use bridge_shared::object_store::{ObjectMeta, ObjectReader, ObjectStore, PutCondition};
use bridge_shared::{S3Uri, StoreError};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;

const ROUTE: &str = include_str!("../../routes/customers.toml");
/// Confirmed deltas per checkpoint segment in the worker.
const CHECKPOINT_USERS: usize = 20_000;

#[path = "bench/rows.rs"]
mod rows;
use rows::{HEADER, both_exports};

/// Writes export `which` (1 or 2) of `rows` users as `parts` CSV parts (a folder, as Amperity
/// splits big exports); each export is written only when needed, so the bench holds one on
/// disk at a time.
fn generate(dir: &Path, rows: u64, which: u32, parts: u64) -> PathBuf {
    let out = dir.join(format!("export-{which}"));
    std::fs::create_dir_all(&out).unwrap();
    let per_part = rows.div_ceil(parts.max(1)).max(1);
    let open = |p: u64| -> Box<dyn Write> {
        let mut w = BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(out.join(format!("part-{p:05}.csv"))).unwrap(),
        );
        w.write_all(HEADER.as_bytes()).unwrap();
        Box::new(w)
    };
    let mut part = 0u64;
    let mut w = open(0);
    both_exports(rows, |id, first, second| {
        // New users (past `rows`) go to the last part.
        if id < rows && id / per_part != part {
            w.flush().unwrap();
            part = id / per_part;
            w = open(part);
        }
        let line = if which == 1 { first } else { second };
        if let Some(line) = line {
            w.write_all(line.as_bytes()).unwrap();
        }
    });
    w.flush().unwrap();
    out
}

fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// An object store over a local folder (`<root>/<bucket>/<key>`), with conditional puts, so
/// the worker's state costs disk, as S3 would, not memory.
struct DirStore {
    root: PathBuf,
    lock: Mutex<()>,
}

fn other(op: &'static str, uri: &S3Uri, e: impl std::fmt::Display) -> StoreError {
    StoreError::Other {
        op,
        uri: uri.clone(),
        message: e.to_string(),
        retryable: false,
    }
}

impl DirStore {
    fn path(&self, uri: &S3Uri) -> PathBuf {
        self.root.join(&uri.bucket).join(&uri.key)
    }

    fn meta(&self, uri: &S3Uri, body: &[u8]) -> ObjectMeta {
        ObjectMeta {
            key: uri.key.clone(),
            etag: format!("{:08x}-{}", crc32fast::hash(body), body.len()),
            size: body.len() as u64,
            version_id: None,
            last_modified: Some("2026-01-01T00:00:00Z".into()),
            metadata: BTreeMap::new(),
        }
    }

    fn read(&self, uri: &S3Uri) -> Result<Option<Vec<u8>>, StoreError> {
        match std::fs::read(self.path(uri)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(other("GetObject", uri, e)),
        }
    }
}

#[async_trait]
impl ObjectStore for DirStore {
    async fn get(&self, uri: &S3Uri) -> Result<(ObjectMeta, Bytes), StoreError> {
        let body = self
            .read(uri)?
            .ok_or_else(|| StoreError::NotFound { uri: uri.clone() })?;
        Ok((self.meta(uri, &body), Bytes::from(body)))
    }

    async fn get_reader(&self, uri: &S3Uri) -> Result<(ObjectMeta, ObjectReader), StoreError> {
        let path = self.path(uri);
        let f = tokio::fs::File::open(&path)
            .await
            .map_err(|_| StoreError::NotFound { uri: uri.clone() })?;
        let size = f
            .metadata()
            .await
            .map_err(|e| other("GetObject", uri, e))?
            .len();
        let meta = ObjectMeta {
            size,
            ..self.meta(uri, &[])
        };
        Ok((meta, Box::pin(f)))
    }

    async fn head(&self, uri: &S3Uri) -> Result<Option<ObjectMeta>, StoreError> {
        Ok(self.read(uri)?.map(|b| self.meta(uri, &b)))
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else if let Ok(rel) = p.strip_prefix(base) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        let base = self.root.join(bucket);
        let mut keys = Vec::new();
        walk(&base, &base, &mut keys);
        keys.retain(|k| k.starts_with(prefix));
        keys.sort();
        Ok(keys
            .into_iter()
            .map(|k| ObjectMeta {
                key: k,
                etag: String::new(),
                size: 0,
                version_id: None,
                last_modified: None,
                metadata: BTreeMap::new(),
            })
            .collect())
    }

    async fn put(
        &self,
        uri: &S3Uri,
        body: Bytes,
        condition: PutCondition,
        _metadata: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        let _g = self.lock.lock().unwrap();
        let current = match condition {
            PutCondition::None => None,
            _ => self.read(uri)?.map(|b| self.meta(uri, &b).etag),
        };
        if !condition.allows(current.as_deref()) {
            return Err(StoreError::PreconditionFailed { uri: uri.clone() });
        }
        let path = self.path(uri);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| other("PutObject", uri, e))?;
        }
        let tmp = path.with_extension("tmp-put");
        std::fs::write(&tmp, &body).map_err(|e| other("PutObject", uri, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| other("PutObject", uri, e))?;
        Ok(self.meta(uri, &body))
    }

    async fn copy(&self, from: &S3Uri, to: &S3Uri) -> Result<(), StoreError> {
        let (_, body) = self.get(from).await?;
        self.put(to, body, PutCondition::None, BTreeMap::new())
            .await
            .map(|_| ())
    }

    async fn delete(&self, uri: &S3Uri) -> Result<(), StoreError> {
        let _ = std::fs::remove_file(self.path(uri));
        Ok(())
    }
}

fn vm_hwm_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn cpu_seconds() -> f64 {
    // utime + stime of this process, from /proc/self/stat (clock ticks, 100 per second).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// The worker's bounded-diff settings: spill under `dir/tmp`, step times into `times`; with
/// `SCALE_ONLY_RANGES=a..b` a fan-out piece (only those state ranges, removals handed over
/// to a file).
fn worker_settings(dir: &Path, tag: &str, times: Arc<Mutex<RangedTimes>>) -> RangedSettings {
    let mut settings = RangedSettings::new(tag);
    settings.spill_base = dir.join("tmp");
    std::fs::create_dir_all(&settings.spill_base).unwrap();
    settings.times = Some(times);
    if let Some((a, b)) = std::env::var("SCALE_ONLY_RANGES")
        .ok()
        .and_then(|v| v.split_once("..").map(|(a, b)| (a.parse(), b.parse())))
        .and_then(|(a, b)| Some((a.ok()?, b.ok()?)))
    {
        settings.only_ranges = Some(a..b);
        settings.defer_departures = true;
        settings.departures_file = Some(dir.join("tmp").join(format!("{tag}-departures.bin")));
    }
    settings
}

/// Takes every delta as confirmed and checkpoints them every [`CHECKPOINT_USERS`], as a run
/// does: the deltas received and the seconds spent checkpointing.
async fn confirm_all(
    rx: &mut mpsc::Receiver<UserDelta>,
    state: &StateStore,
    head: &mut Head,
    route: &Route,
) -> (u64, f64) {
    let mut pending = Vec::with_capacity(CHECKPOINT_USERS);
    let mut deltas = 0u64;
    let mut checkpoint_s = 0.0;
    while let Some(d) = rx.recv().await {
        deltas += 1;
        pending.push(d);
        if pending.len() >= CHECKPOINT_USERS {
            let c = Instant::now();
            state.checkpoint(head, route, &pending).await.unwrap();
            checkpoint_s += c.elapsed().as_secs_f64();
            pending.clear();
        }
    }
    state.checkpoint(head, route, &pending).await.unwrap();
    (deltas, checkpoint_s)
}

/// The worker (child process): one sync of `export` against the state under `dir/s3`, every
/// delta confirmed at once and checkpointed, then the ranged commit. Prints its figures.
fn worker(dir: &Path, export: &Path, tag: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let out = rt.block_on(async {
        let store: Arc<dyn ObjectStore> = Arc::new(DirStore {
            root: dir.join("s3"),
            lock: Mutex::new(()),
        });
        let route = Route::from_toml(ROUTE, "customers.toml").unwrap();
        let range_users = std::env::var("SCALE_RANGE_USERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(braze_sync::state::store::RANGE_USERS);
        let state = StateStore::new(store.clone(), "state", "s/", "customers")
            .with_range_users(range_users);
        let mut head = state.read_head().await.unwrap();
        let users_before = head.doc.users;
        let ranges = StoreRanges::new(
            state.clone(),
            head.doc.clone(),
            Arc::new(route.clone()),
            tokio::runtime::Handle::current(),
        );
        let times = Arc::new(Mutex::new(RangedTimes::default()));
        let settings = worker_settings(dir, tag, times.clone());
        let opts = ProduceOptions::for_route(&route, tag);
        let (tx, mut rx) = mpsc::channel::<UserDelta>(8192);
        let export = export.to_path_buf();
        let r2 = route.clone();
        let t = Instant::now();
        let producer = tokio::task::spawn_blocking(move || {
            produce_ranged(
                in_memory::open_local_parts(in_memory::local_parts(&export, ".DONE").unwrap()),
                &r2,
                &ranges,
                &opts,
                &settings,
                &|d| {
                    tx.blocking_send(d)
                        .map_err(|_| Stop("the consumer stopped".into()))
                },
                &mut |_| {},
            )
        });
        let (deltas, checkpoint_s) = confirm_all(&mut rx, &state, &mut head, &route).await;
        let summary = producer.await.unwrap().unwrap();
        let produce_wall_s = t.elapsed().as_secs_f64();
        let cpu_produce_s = cpu_seconds();
        let t = Instant::now();
        let spill = dir.join("tmp").join(format!("commit-{tag}"));
        std::fs::create_dir_all(&spill).unwrap();
        let stats = state
            .commit_ranged(
                &mut head,
                &route,
                Some(Watermark {
                    export_id: tag.to_string(),
                    exported_at: None,
                }),
                users_before + summary.users_new,
                &spill,
            )
            .await
            .unwrap();
        let commit_s = t.elapsed().as_secs_f64();
        let _ = std::fs::remove_dir_all(&spill);
        let times = *times.lock().unwrap();
        json!({
            "rows": summary.rows_read,
            "deltas": deltas,
            "users_new": summary.users_new,
            "users_changed": summary.users_changed,
            "users_departed": summary.users_departed,
            "partition_s": times.partition_s,
            "diff_s": times.diff_s,
            "departures_s": times.departures_s,
            "spilled_bytes": times.spilled_bytes,
            "workers": times.workers,
            "mappers": times.mappers,
            "produce_wall_s": produce_wall_s,
            "checkpoint_s": checkpoint_s,
            "cpu_produce_s": cpu_produce_s,
            "commit_s": commit_s,
            "users": stats.users,
            "ranges": stats.ranges,
            "state_bytes": stats.state_bytes,
            "commit_shards": stats.shards,
            "commit_deltas": stats.deltas,
        })
    });
    let mut out = out;
    out["peak_rss_mb"] = json!(vm_hwm_mb());
    println!("{out}");
}

/// Runs the worker as a child under an address-space limit of `limit_mb`.
fn run_worker(
    dir: &Path,
    export: &Path,
    tag: &str,
    limit_mb: u64,
    range_users: u64,
    env: &[(&str, String)],
) -> Value {
    let exe = std::env::current_exe().unwrap();
    let t = Instant::now();
    let out = std::process::Command::new("prlimit")
        .arg(format!("--as={}", limit_mb << 20))
        .arg("--")
        .arg(exe)
        .arg("--worker")
        .arg(dir)
        .arg(export)
        .arg(tag)
        // glibc reserves 64 MB of address space per malloc arena: two arenas keep the
        // address-space limit about memory, not reservations.
        .env("MALLOC_ARENA_MAX", "2")
        .env("SCALE_RANGE_USERS", range_users.to_string())
        // The readers' bound on an export's bytes follows the function's ephemeral storage
        // (Lambda's maximum here, as the sizing guide sets for routes this big).
        .env("BRIDGE_EPHEMERAL_STORAGE_MB", "10240")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("prlimit (util-linux) runs the worker");
    let mut v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "worker {tag} failed under a {limit_mb} MB limit ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    v["wall_s"] = json!(t.elapsed().as_secs_f64());
    v
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

/// The bench's command line.
struct Options {
    users: u64,
    limit_mb: u64,
    parts: u64,
    /// Users per state range (smaller ranges: more of them, for tests of the bounded path).
    range_users: u64,
    /// Also run one fan-out piece of this many (0: none).
    piece_of: u64,
    out_path: PathBuf,
}

/// Reads the command line; prints the usage and exits on `--help` or a wrong argument.
fn options(args: &[String]) -> Options {
    const USAGE: &str = "usage: sync-scale-bench [--users N (10000000)] [--limit-mb MB (512)] [--parts N (cores)] [--range-users N] [--piece-of N] [--out FILE]\n\
        Generates a route of N users in /tmp (10M needs ~15 GB free), syncs it twice under the memory limit and writes target/bench/sync-scale.json.";
    const FLAGS: [&str; 6] = [
        "--users",
        "--limit-mb",
        "--parts",
        "--range-users",
        "--piece-of",
        "--out",
    ];
    let mut rest = args.iter().skip(1);
    while let Some(a) = rest.next() {
        if a == "--help" || a == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        if !FLAGS.contains(&a.as_str()) || rest.next().is_none() {
            eprintln!("sync-scale-bench: unknown argument or missing value: {a}\n{USAGE}");
            std::process::exit(2);
        }
    }
    Options {
        users: arg(args, "--users").unwrap_or(10_000_000),
        limit_mb: arg(args, "--limit-mb").unwrap_or(512),
        parts: arg(args, "--parts").unwrap_or(braze_sync::diff::bounded::cores() as u64),
        range_users: arg(args, "--range-users").unwrap_or(braze_sync::state::store::RANGE_USERS),
        piece_of: arg(args, "--piece-of").unwrap_or(0),
        out_path: arg(args, "--out").unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench/sync-scale.json")
        }),
    }
}

/// The baseline: rows per second of a bare CSV read of the export in `folder`, one core.
fn bare_read(folder: &Path) -> f64 {
    let t = Instant::now();
    let mut rec = csv::ByteRecord::new();
    let mut bare_rows = 0u64;
    let mut bytes = 0usize;
    for part in in_memory::local_parts(folder, ".DONE").unwrap() {
        let mut rdr = csv::ReaderBuilder::new().from_path(&part).unwrap();
        while rdr.read_byte_record(&mut rec).unwrap() {
            bare_rows += 1;
            bytes += rec.as_slice().len();
        }
    }
    std::hint::black_box(bytes);
    bare_rows as f64 / t.elapsed().as_secs_f64()
}

/// What the worker runs measured, with the baseline of the same run.
struct Runs {
    bare_rps: f64,
    run1: Value,
    run2: Value,
    /// With `--piece-of`: the piece's ranges, the state's ranges, the whole export again and
    /// the piece.
    pieces: Option<(u64, u64, Value, Value)>,
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--worker") {
        worker(Path::new(&args[2]), Path::new(&args[3]), &args[4]);
        return;
    }
    let o = options(&args);
    let (users, limit_mb, parts, range_users) = (o.users, o.limit_mb, o.parts, o.range_users);
    let dir = std::env::temp_dir().join(format!("sync-scale-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let first = generate(&dir, users, 1, parts);
    eprintln!(
        "generated export 1 of {users} users ({} MB in {parts} parts)",
        folder_bytes(&first) >> 20
    );
    let run1 = run_worker(&dir, &first, "export-1", limit_mb, range_users, &[]);
    eprintln!("run 1 (first sync, every user new): {run1}");
    let _ = std::fs::remove_dir_all(&first);
    let second = generate(&dir, users, 2, parts);
    let bare_rps = bare_read(&second);

    let run2 = run_worker(&dir, &second, "export-2", limit_mb, range_users, &[]);
    eprintln!("run 2 (2% changed, 0.5% new, 0.5% gone): {run2}");
    // A fan-out piece (`--piece-of N`): the same export again, once whole and once restricted
    // to the first 1/N of the state's ranges (rows of other ranges dropped before their
    // values are mapped), same run.
    let pieces = (o.piece_of > 0).then(|| {
        let n = run2["ranges"].as_u64().unwrap_or(1);
        let span = n.div_ceil(o.piece_of).max(1);
        let again = run_worker(&dir, &second, "export-2-again", limit_mb, range_users, &[]);
        let piece = run_worker(
            &dir,
            &second,
            "export-2-piece",
            limit_mb,
            range_users,
            &[("SCALE_ONLY_RANGES", format!("0..{span}"))],
        );
        (span, n, again, piece)
    });
    let runs = Runs {
        bare_rps,
        run1,
        run2,
        pieces,
    };
    let mut figures = print_figures(&o, &runs);
    if let Some(piece) = print_piece(&runs) {
        figures.as_object_mut().unwrap().extend(piece);
    }
    if let Some(parent) = o.out_path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&o.out_path, serde_json::to_vec_pretty(&figures).unwrap()).unwrap();
    println!("  wrote {}: {figures}", o.out_path.display());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Prints the bench's figures; returns them for the JSON file.
fn print_figures(o: &Options, runs: &Runs) -> Value {
    let (users, parts, limit_mb) = (o.users, o.parts, o.limit_mb);
    let (bare_rps, run1, run2) = (runs.bare_rps, &runs.run1, &runs.run2);
    let cores = braze_sync::diff::bounded::cores();
    let rows = f(run2, "rows");
    let produce = f(run2, "produce_wall_s");
    let all_rps = rows / produce;
    let per_core_rps = rows / f(run2, "cpu_produce_s").max(1e-9);
    let peak = f(run1, "peak_rss_mb").max(f(run2, "peak_rss_mb"));
    let state_bpu = f(run2, "state_bytes") / f(run2, "users").max(1.0);
    let commit_s = f(run2, "commit_s");
    // 100M users: every step is linear in rows (read, map, spill, diff per range) or in the
    // ranges touched (commit); ranges keep their size (they double with the users), so memory
    // stays put. Same 2 cores, same disk; Braze sending (rate-limited) not included.
    let scale = 100_000_000.0 / users as f64;
    let extrapolated = (produce + commit_s) * scale;
    let figures = json!({
        "users": users,
        "peak_rss_mb": (peak * 10.0).round() / 10.0,
        "diff_rows_per_s_all_cores": all_rps.round(),
        "diff_rows_per_s_per_core": per_core_rps.round(),
        "csv_read_rows_per_s": bare_rps.round(),
        "cores": cores,
        "state_bytes_per_user": (state_bpu * 10.0).round() / 10.0,
        "commit_s": (commit_s * 100.0).round() / 100.0,
        "extrapolated_100m_wall_s": extrapolated.round(),
    });
    println!(
        "sync-scale bench ({users} users, 20 columns in {parts} CSV parts, {cores} cores, worker under prlimit --as={limit_mb} MB)"
    );
    println!(
        "  bare CSV read (1 core)     {bare_rps:>12.0} rows/s   (baseline, same file, same run)"
    );
    println!(
        "  read+map+spill+diff, all   {all_rps:>12.0} rows/s   ({:.3}x the bare read; {} diff workers, {} mapping threads per part)",
        all_rps / bare_rps,
        run2["workers"],
        run2["mappers"]
    );
    println!(
        "  per core (rows / CPU s)    {per_core_rps:>12.0} rows/s   ({:.3}x the bare read; target >= 0.17x)",
        per_core_rps / bare_rps
    );
    println!(
        "    phases: partition {:.1}s, diff {:.1}s, departures {:.1}s, checkpoints {:.1}s, spilled {} MB",
        f(run2, "partition_s"),
        f(run2, "diff_s"),
        f(run2, "departures_s"),
        f(run2, "checkpoint_s"),
        (f(run2, "spilled_bytes") as u64) >> 20
    );
    println!(
        "  peak RSS of the worker     {peak:>12.1} MB       (limit {limit_mb} MB; run 1 {:.1}, run 2 {:.1})",
        f(run1, "peak_rss_mb"),
        f(run2, "peak_rss_mb")
    );
    println!(
        "  state bytes per user       {state_bpu:>12.1}          ({} ranges)",
        run2["ranges"]
    );
    println!(
        "  commit, run 2              {commit_s:>12.2} s        ({} range deltas, {} bases; run 1 commit {:.1}s)",
        run2["commit_deltas"],
        run2["commit_shards"],
        f(run1, "commit_s")
    );
    println!(
        "  100M users, extrapolated   {extrapolated:>12.0} s        (linear in rows on these {cores} cores; ranges keep their size so memory does not grow; sending to Braze not included)"
    );
    figures
}

/// Prints the fan-out piece's figures next to the whole export's; returns them for the JSON
/// file.
fn print_piece(runs: &Runs) -> Option<serde_json::Map<String, Value>> {
    let (span, n, again, piece) = runs.pieces.as_ref()?;
    let wall = |v: &Value| f(v, "produce_wall_s");
    let cpu = |v: &Value| f(v, "cpu_produce_s");
    println!(
        "  fan-out piece ({span} of {n} ranges) {:>7.2} s wall, {:.2} s CPU  (the whole export again: {:.2} s, {:.2} s CPU; {:.2}x the wall, {:.2}x the CPU; spilled {} of {} MB, peak RSS {:.1} MB)",
        wall(piece),
        cpu(piece),
        wall(again),
        cpu(again),
        wall(piece) / wall(again).max(1e-9),
        cpu(piece) / cpu(again).max(1e-9),
        (f(piece, "spilled_bytes") as u64) >> 20,
        (f(again, "spilled_bytes") as u64) >> 20,
        f(piece, "peak_rss_mb"),
    );
    let mut figures = serde_json::Map::new();
    figures.insert("piece_ranges".into(), json!(format!("{span}/{n}")));
    figures.insert(
        "piece_wall_ratio".into(),
        json!((wall(piece) / wall(again).max(1e-9) * 1000.0).round() / 1000.0),
    );
    figures.insert(
        "piece_cpu_ratio".into(),
        json!((cpu(piece) / cpu(again).max(1e-9) * 1000.0).round() / 1000.0),
    );
    Some(figures)
}
