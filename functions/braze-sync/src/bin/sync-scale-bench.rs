//! `make bench` figure for big routes: a 10,000,000-user, 20-column route (`--users N` to
//! change it) synced the way Lambda runs it, and its diff measured on its own.
//!
//! 1. generates the first export (in `--parts` CSV parts and a `.DONE` marker, in a folder
//!    object store) and, after the first sync, a second one with 2% of users changed, 0.5% new
//!    and 0.5% gone (the rows of `sync-diff-bench`), one export on disk at a time;
//! 2. the memory baseline, same run: the peak RSS of a process that only reads the first
//!    export (every CSV record, nothing else);
//! 3. the first sync, Lambda-shaped ([`lambda`]): every invocation a child process running the
//!    real handler and runner with `MemorySize` 512 (`--memory-mb`), a short timeout
//!    (`--timeout-s`) and Braze's pace set so the sync takes about `--invocations`
//!    invocations, so it hands over and commits several times; each child's whole-process peak
//!    RSS (`VmHWM`) is kept per invocation kind (the first, the hand-overs, the final one that
//!    commits with the watermark, fan-out pieces with `--fan-out N`);
//! 4. the throughput baseline, same run, same file: a bare CSV read of the second export, one
//!    core;
//! 5. the diff worker (a child process, its peak RSS against `--limit-mb`; the bounded diff
//!    and the ranged commit called directly, every delta confirmed at once): the second export against the
//!    state the first sync built; its figures are the bench's rows/s on all cores (rows / wall
//!    of read + map + spill + diff), per core (rows / CPU seconds), its peak RSS, state bytes
//!    per user, seconds to commit;
//! 6. with `--piece-of N`: the second export again, whole and as one fan-out piece (the first
//!    1/N of the state's ranges, `only_ranges`, removals deferred), same run.
//!
//! Writes `target/bench/sync-scale.json`.
//!
//! `cargo run --release -p braze-sync --bin sync-scale-bench [-- --users N] [--limit-mb M]
//! [--parts P] [--range-users R] [--piece-of N] [--memory-mb M] [--timeout-s S]
//! [--invocations N] [--fan-out N] [--out FILE]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use braze_sync::config::route::Route;
use braze_sync::diff::bounded::{RangedSettings, RangedTimes, StoreRanges, produce_ranged};
use braze_sync::diff::export::{ProduceOptions, Stop};
use braze_sync::diff::in_memory;
use braze_sync::model::UserDelta;
use braze_sync::state::store::{Head, StateStore, Watermark};
use bridge_shared::object_store::ObjectStore;
use serde_json::{Value, json};
use tokio::sync::mpsc;

const ROUTE: &str = include_str!("../../routes/customers.toml");

// The Lambda binary's allocator (`main.rs`): the invocations' peaks are the function's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Confirmed deltas per checkpoint segment in the worker.
const CHECKPOINT_USERS: usize = 20_000;

#[path = "bench/lambda.rs"]
mod lambda;
#[path = "bench/rows.rs"]
mod rows;
use bridge_shared::dir_store::DirStore;
use rows::{HEADER, both_exports};

/// The route's exports folder in the folder store.
const EXPORTS: &str = "amperity/customers";

/// Writes export `which` (1 or 2) of `rows` users as `parts` CSV parts and a `.DONE` marker
/// (a marker-mode folder, as Amperity splits big exports) into the folder store under `dir`,
/// in folder `export-{folder}`; each export is written only when needed, so the bench holds
/// one on disk at a time.
fn generate(dir: &Path, rows: u64, which: u32, folder: u32, parts: u64) -> PathBuf {
    let out = dir
        .join("s3")
        .join(lambda::EXPORTS_BUCKET)
        .join(EXPORTS)
        .join(format!("export-{folder}"));
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
    drop(w);
    std::fs::write(out.join("export.DONE"), b"").unwrap();
    out
}

/// The S3 notification of export `which`'s marker.
fn marker_event(which: u32) -> Value {
    json!({"Records": [{
        "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": lambda::EXPORTS_BUCKET},
               "object": {"key": format!("{EXPORTS}/export-{which}/export.DONE")}}}]})
}

fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
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
        let store: Arc<dyn ObjectStore> = Arc::new(DirStore::per_bucket(dir.join("s3")));
        let route = Route::from_toml(ROUTE, "customers.toml").unwrap();
        let range_users = std::env::var("SCALE_RANGE_USERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(braze_sync::state::store::RANGE_USERS);
        let state = StateStore::new(
            store.clone(),
            lambda::STATE_BUCKET,
            lambda::STATE_PREFIX,
            "customers",
        )
        .with_range_users(range_users);
        let mut head = state.read_head().await.unwrap();
        let users_before = head.doc.users;
        let ranges = StoreRanges::new(
            state.clone(),
            head.doc.clone(),
            Arc::new(route.clone()),
            braze_sync::clock::Blocking::new(tokio::runtime::Handle::current()),
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
    out["peak_rss_mb"] = json!(lambda::vm_hwm_mb());
    println!("{out}");
}

/// Runs the worker as a child whose peak RSS is measured against `limit_mb`.
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
    // Its peak RSS is the figure, against the limit: mimalloc maps more address space than
    // it touches (segments, purged pages), so an address-space limit would measure mappings.
    let out = std::process::Command::new(exe)
        .arg("--worker")
        .arg(dir)
        .arg(export)
        .arg(tag)
        .env("SCALE_RANGE_USERS", range_users.to_string())
        // The readers' bound on an export's bytes follows the function's ephemeral storage
        // (Lambda's maximum here, as the sizing guide sets for routes this big).
        .env("BRIDGE_EPHEMERAL_STORAGE_MB", "10240")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("the bench runs itself as the worker");
    let mut v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "worker {tag} failed ({}; its memory limit is {limit_mb} MB): {}",
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
    /// The function's `MemorySize` in the Lambda-shaped first sync, MB.
    memory_mb: u64,
    /// The function's `Timeout` there, seconds.
    timeout_s: u64,
    /// About how many invocations the first sync should take (sets Braze's pace).
    invocations: u64,
    /// `BRIDGE_FAN_OUT_PIECES` for the first sync (0: only when the spill would not fit).
    fan_out: usize,
    /// Pieces of the later sync run as a fan-out (0: no fan-out sync).
    later_pieces: usize,
    out_path: PathBuf,
}

/// Reads the command line; prints the usage and exits on `--help` or a wrong argument.
fn options(args: &[String]) -> Options {
    const USAGE: &str = "usage: sync-scale-bench [--users N (10000000)] [--limit-mb MB (512)] [--parts N (cores)] [--range-users N] [--piece-of N] [--memory-mb MB (512)] [--timeout-s S (90)] [--invocations N (3; 0: one, Braze unpaced)] [--fan-out N (0)] [--later-pieces N (4; 0: none)] [--out FILE]\n\
        Generates a route of N users in /tmp (10M needs ~15 GB free), syncs it first as Lambda runs it (a child process per invocation), then diffs a changed export under the memory limit, syncs two later exports as Lambda runs them (~3% of the users changed; the second fanned out into pieces), and writes target/bench/sync-scale.json.";
    const FLAGS: [&str; 11] = [
        "--users",
        "--limit-mb",
        "--parts",
        "--range-users",
        "--piece-of",
        "--memory-mb",
        "--timeout-s",
        "--invocations",
        "--fan-out",
        "--later-pieces",
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
        memory_mb: arg(args, "--memory-mb").unwrap_or(512),
        timeout_s: arg(args, "--timeout-s").unwrap_or(90),
        invocations: arg(args, "--invocations").unwrap_or(3),
        fan_out: arg(args, "--fan-out").unwrap_or(0),
        later_pieces: arg(args, "--later-pieces").unwrap_or(4),
        out_path: arg(args, "--out").unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench/sync-scale.json")
        }),
    }
}

/// The Lambda shape of the first sync: Braze's pace set so sending every user takes about
/// `invocations` invocations' sending time (the timeout less the margin kept before the
/// deadline; 0: Braze as fast as it answers, one invocation), and the ephemeral storage the
/// sizing guide sets for the route.
fn shape(o: &Options) -> lambda::LambdaShape {
    let timeout = std::time::Duration::from_secs(o.timeout_s);
    let margin = braze_sync::run::runner::deadline::deadline_margin(timeout);
    let sending_s = timeout.saturating_sub(margin).as_secs().max(1);
    let requests = o
        .users
        .div_ceil(braze_sync::send::request_body::MAX_OBJECTS as u64);
    let rate = match o.invocations {
        0 => 100_000,
        n => requests.div_ceil(sending_s * n).max(1),
    };
    // ~400 bytes of spill and commit per row, within Lambda's 512..10,240 MB.
    let storage_mb = ((o.users * 400) >> 20).clamp(2048, 10_240);
    lambda::LambdaShape {
        memory_mb: o.memory_mb,
        timeout_s: o.timeout_s,
        requests_per_s: rate,
        storage_mb,
        range_users: o.range_users,
        fan_out_pieces: o.fan_out,
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

/// What the runs measured, with the baselines of the same run.
struct Runs {
    bare_rps: f64,
    /// Peak RSS of a process that only reads the first export, MB.
    read_only_mb: f64,
    /// The Lambda-shaped first sync, invocation by invocation.
    first_sync: Vec<lambda::Invocation>,
    /// The Lambda-shaped later syncs: export 1's rows again (~3% of the users changed against
    /// export 2's state), then export 2's again fanned out into `--later-pieces` pieces.
    later: Vec<lambda::Invocation>,
    fanned: Vec<lambda::Invocation>,
    run2: Value,
    /// With `--piece-of`: the piece's ranges, the state's ranges, the whole export again and
    /// the piece.
    pieces: Option<(u64, u64, Value, Value)>,
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

/// The memory baseline: the peak RSS of a child that only reads the export in `folder`.
fn read_only_peak(folder: &Path) -> f64 {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--read-only")
        .arg(folder)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "the read-only child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    f(&v, "peak_rss_mb")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--worker") => {
            return worker(Path::new(&args[2]), Path::new(&args[3]), &args[4]);
        }
        Some("--invoke") => {
            return lambda::invoke(Path::new(&args[2]), &route_toml(), Path::new(&args[3]));
        }
        Some("--read-only") => return lambda::read_only(Path::new(&args[2])),
        _ => {}
    }
    let o = options(&args);
    let (users, limit_mb, parts, range_users) = (o.users, o.limit_mb, o.parts, o.range_users);
    let dir = std::env::temp_dir().join(format!("sync-scale-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let first = generate(&dir, users, 1, 1, parts);
    eprintln!(
        "generated export 1 of {users} users ({} MB in {parts} parts)",
        folder_bytes(&first) >> 20
    );
    let read_only_mb = read_only_peak(&first);
    let shape = shape(&o);
    eprintln!(
        "first sync, Lambda-shaped: MemorySize {} MB, Timeout {} s, EphemeralStorage {} MB, Braze at {} requests/s",
        shape.memory_mb, shape.timeout_s, shape.storage_mb, shape.requests_per_s
    );
    let first_sync = lambda::run_export(&dir, marker_event(1), &shape, 200);
    let _ = std::fs::remove_dir_all(&first);
    let second = generate(&dir, users, 2, 2, parts);
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
    let _ = std::fs::remove_dir_all(&second);
    let (later, fanned) = later_syncs(&dir, &o, &shape);
    let runs = Runs {
        bare_rps,
        read_only_mb,
        first_sync,
        later,
        fanned,
        run2,
        pieces,
    };
    let mut figures = print_figures(&o, &runs);
    figures
        .as_object_mut()
        .unwrap()
        .extend(print_first_sync(&o, &shape, &runs));
    figures.as_object_mut().unwrap().extend(print_later(&runs));
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

/// The later syncs as Lambda runs them, on the state the first sync and the worker built
/// (export 2's values): export 1's rows again (2% of the users changed back, 0.5% back, 0.5%
/// gone), then, with `--later-pieces N`, export 2's rows again forced into N pieces (a
/// coordinator, the pieces, the last one the finalizer).
fn later_syncs(
    dir: &Path,
    o: &Options,
    shape: &lambda::LambdaShape,
) -> (Vec<lambda::Invocation>, Vec<lambda::Invocation>) {
    let mut plain = shape.clone();
    plain.fan_out_pieces = 0;
    let third = generate(dir, o.users, 1, 3, o.parts);
    eprintln!("later sync (export 1's rows again against export 2's state), Lambda-shaped");
    let later = lambda::run_export(dir, marker_event(3), &plain, 200);
    let _ = std::fs::remove_dir_all(&third);
    if o.later_pieces == 0 {
        return (later, Vec::new());
    }
    let mut split = shape.clone();
    split.fan_out_pieces = o.later_pieces;
    let fourth = generate(dir, o.users, 2, 4, o.parts);
    eprintln!(
        "later sync fanned out into {} pieces (export 2's rows again), Lambda-shaped",
        o.later_pieces
    );
    let fanned = lambda::run_export(dir, marker_event(4), &split, 200);
    let _ = std::fs::remove_dir_all(&fourth);
    (later, fanned)
}

/// Prints the later syncs' peaks by invocation kind; returns them for the JSON file.
fn print_later(runs: &Runs) -> serde_json::Map<String, Value> {
    let round = |x: f64| (x * 10.0).round() / 10.0;
    let mut m = serde_json::Map::new();
    let by_kind = |inv: &[lambda::Invocation]| {
        lambda::peaks(inv)
            .into_iter()
            .map(|(k, v)| (k.to_string(), json!(round(v))))
            .collect::<serde_json::Map<_, _>>()
    };
    let top = |inv: &[lambda::Invocation]| lambda::peaks(inv).values().copied().fold(0.0, f64::max);
    for (name, inv) in [("later sync", &runs.later), ("fan-out sync", &runs.fanned)] {
        for (kind, mb) in lambda::peaks(inv) {
            println!("  {name:<13} {kind:<12} peak RSS {mb:>7.1} MB");
        }
    }
    m.insert(
        "later_sync_peak_rss_mb".into(),
        json!(round(top(&runs.later))),
    );
    m.insert("later_sync_invocations".into(), json!(runs.later.len()));
    m.insert(
        "later_sync_peak_rss_by_kind_mb".into(),
        json!(by_kind(&runs.later)),
    );
    if !runs.fanned.is_empty() {
        let fan = lambda::peaks(&runs.fanned);
        let kind = |k: &str| json!(round(fan.get(k).copied().unwrap_or(0.0)));
        m.insert("piece_peak_rss_mb".into(), kind("piece"));
        m.insert("finalizer_peak_rss_mb".into(), kind("finalizer"));
        m.insert("coordinator_peak_rss_mb".into(), kind("coordinator"));
        m.insert("fan_out_invocations".into(), json!(runs.fanned.len()));
        m.insert(
            "fan_out_peak_rss_by_kind_mb".into(),
            json!(by_kind(&runs.fanned)),
        );
    }
    m
}

/// The route, in marker mode (the bench's exports are folders of parts with a marker).
fn route_toml() -> String {
    ROUTE.replace("mode = \"single\"", "mode = \"marker\"")
}

/// Prints the Lambda-shaped first sync's figures; returns them for the JSON file.
fn print_first_sync(
    o: &Options,
    shape: &lambda::LambdaShape,
    runs: &Runs,
) -> serde_json::Map<String, Value> {
    let inv = &runs.first_sync;
    let peaks = lambda::peaks(inv);
    let budget = o.memory_mb as f64 * 0.8;
    let base = runs.read_only_mb.max(1e-9);
    let first_sync = peaks.values().copied().fold(0.0, f64::max);
    let handover = inv
        .iter()
        // A fan-out piece that handed over is a hand-over too (a first sync too big for one
        // invocation's spill fans out).
        .filter(|i| {
            matches!(i.kind, "first" | "hand_over")
                || i.result["results"][0]["outcome"] == "piece_handed_over"
        })
        .map(|i| i.peak_rss_mb)
        .fold(0.0, f64::max);
    let round = |x: f64| (x * 10.0).round() / 10.0;
    println!(
        "  first sync as Lambda runs it: {} invocations (MemorySize {} MB, budget 80% = {budget:.0} MB; Timeout {} s; Braze at {} requests/s)",
        inv.len(),
        o.memory_mb,
        shape.timeout_s,
        shape.requests_per_s
    );
    println!(
        "    baseline: a process only reading the export peaks at {:.1} MB (same run)",
        runs.read_only_mb
    );
    for (kind, mb) in &peaks {
        println!(
            "    {kind:<12} peak RSS {mb:>7.1} MB  ({:.2}x the baseline, {:.2}x the budget)",
            mb / base,
            mb / budget
        );
    }
    let mut m = serde_json::Map::new();
    m.insert("first_sync_peak_rss_mb".into(), json!(round(first_sync)));
    m.insert("handover_peak_rss_mb".into(), json!(round(handover)));
    m.insert(
        "read_only_peak_rss_mb".into(),
        json!(round(runs.read_only_mb)),
    );
    m.insert("memory_size_mb".into(), json!(o.memory_mb));
    m.insert("rss_budget_mb".into(), json!(round(budget)));
    m.insert(
        "mimalloc_purge_delay".into(),
        json!(lambda::mimalloc_purge_delay()),
    );
    m.insert("first_sync_invocations".into(), json!(inv.len()));
    m.insert(
        "first_sync_peak_rss_by_kind_mb".into(),
        json!(
            peaks
                .iter()
                .map(|(k, v)| (k.to_string(), json!(round(*v))))
                .collect::<serde_json::Map<_, _>>()
        ),
    );
    m.insert(
        "first_sync_peak_vs_read_only".into(),
        json!((first_sync / base * 100.0).round() / 100.0),
    );
    m
}

/// Prints the bench's figures; returns them for the JSON file.
fn print_figures(o: &Options, runs: &Runs) -> Value {
    let (users, parts, limit_mb) = (o.users, o.parts, o.limit_mb);
    let (bare_rps, run2) = (runs.bare_rps, &runs.run2);
    let cores = braze_sync::diff::bounded::cores();
    let rows = f(run2, "rows");
    let produce = f(run2, "produce_wall_s");
    let all_rps = rows / produce;
    let per_core_rps = rows / f(run2, "cpu_produce_s").max(1e-9);
    let peak = f(run2, "peak_rss_mb");
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
        "sync-scale bench ({users} users, 20 columns in {parts} CSV parts, {cores} cores, worker's memory limit {limit_mb} MB)"
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
    println!("  peak RSS of the worker     {peak:>12.1} MB       (limit {limit_mb} MB)");
    println!(
        "  state bytes per user       {state_bpu:>12.1}          ({} ranges)",
        run2["ranges"]
    );
    println!(
        "  commit, run 2              {commit_s:>12.2} s        ({} range deltas, {} bases)",
        run2["commit_deltas"], run2["commit_shards"]
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
