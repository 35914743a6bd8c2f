//! `make bench` figure for parse + map + diff: generates a 1,000,000-row, 20-column CSV
//! export and a second one with 2% of users changed, 0.5% new and 0.5% gone, seeds the
//! confirmed state from the first, then measures on one core, in the same run, a bare CSV read
//! of the second file (the baseline) and parse + map + diff of it against the 1M-user state.
//! The diff runs in a child process that loads the state from its encoded shards, as a
//! production run does, so its peak RSS (VmHWM) is the steady-state figure for 1M users.
//! Writes `target/bench/sync-diff.json`.
//!
//! `cargo run --release -p braze-sync --bin sync-diff-bench [-- --rows N]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use braze_sync::config::route::Route;
use braze_sync::diff::export::{Part, ProduceOptions, SyncError};
use braze_sync::diff::in_memory;
use braze_sync::state::confirmed::Snapshot;
use serde_json::json;

const ROUTE: &str = include_str!("../../routes/customers.toml");

#[path = "bench/rows.rs"]
mod rows;
use rows::{HEADER, both_exports};

fn generate(dir: &Path, rows: u64) -> (PathBuf, PathBuf) {
    let a = dir.join("export-1.csv");
    let b = dir.join("export-2.csv");
    let mut wa = BufWriter::with_capacity(1 << 20, std::fs::File::create(&a).unwrap());
    let mut wb = BufWriter::with_capacity(1 << 20, std::fs::File::create(&b).unwrap());
    wa.write_all(HEADER.as_bytes()).unwrap();
    wb.write_all(HEADER.as_bytes()).unwrap();
    both_exports(rows, |_, first, second| {
        if let Some(line) = first {
            wa.write_all(line.as_bytes()).unwrap();
        }
        if let Some(line) = second {
            wb.write_all(line.as_bytes()).unwrap();
        }
    });
    wa.flush().unwrap();
    wb.flush().unwrap();
    (a, b)
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

fn parts(path: &Path) -> Vec<Result<Part<std::fs::File>, SyncError>> {
    in_memory::open_local_parts(vec![path.to_path_buf()]).collect()
}

/// Child: load the state, then time the bare CSV read and parse + map + diff.
fn diff_child(dir: &Path) {
    let route = Route::from_toml(ROUTE, "customers.toml").unwrap();
    let mut snap = Snapshot::for_route(&route);
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .collect();
    shards.sort();
    let mut state_bytes = 0u64;
    for s in &shards {
        let bytes = std::fs::read(s).unwrap();
        state_bytes += bytes.len() as u64;
        snap.load_base_shard(&bytes, &s.display().to_string())
            .unwrap();
    }
    let users = snap.len() as u64;
    let export = dir.join("export-2.csv");

    let t = Instant::now();
    let mut rdr = csv::ReaderBuilder::new().from_path(&export).unwrap();
    let mut rec = csv::ByteRecord::new();
    let mut bare_rows = 0u64;
    let mut bytes = 0usize;
    while rdr.read_byte_record(&mut rec).unwrap() {
        bare_rows += 1;
        bytes += rec.as_slice().len();
    }
    let bare_s = t.elapsed().as_secs_f64();
    std::hint::black_box(bytes);

    let opts = ProduceOptions::for_route(&route, "export-2.csv");
    let t = Instant::now();
    let mut changed_attrs = 0u64;
    let summary = in_memory::produce(
        parts(&export),
        &route,
        &snap,
        &opts,
        &mut |d| {
            changed_attrs += d.changes.len() as u64;
            Ok(())
        },
        &mut |_| {},
    )
    .unwrap();
    let diff_s = t.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "rows": summary.rows_read,
            "bare_rows": bare_rows,
            "diff_s": diff_s,
            "bare_s": bare_s,
            "peak_rss_mb": vm_hwm_mb(),
            "users": users,
            "state_bytes": state_bytes,
            "summary": summary,
            "changed_attrs": changed_attrs,
        })
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--diff") {
        diff_child(Path::new(&args[2]));
        return;
    }
    let rows: u64 = args
        .iter()
        .position(|a| a == "--rows")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = std::env::temp_dir().join(format!("sync-diff-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = Instant::now();
    let (first, _) = generate(&dir, rows);
    eprintln!(
        "generated 2 exports of {rows} rows in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // Seed the confirmed state: the first export, every delta confirmed.
    let route = Route::from_toml(ROUTE, "customers.toml").unwrap();
    let mut snap = Snapshot::for_route(&route);
    let t = Instant::now();
    let seed = in_memory::produce(
        parts(&first),
        &route,
        &Snapshot::for_route(&route),
        &ProduceOptions::for_route(&route, "export-1.csv"),
        &mut |d| {
            // Braze confirms every delta of the first run.
            snap.apply_confirmed(&d);
            Ok(())
        },
        &mut |_| {},
    )
    .unwrap();
    snap.compact();
    let first_run_s = t.elapsed().as_secs_f64();
    for (i, shard) in snap
        .base_shards(braze_sync::state::store::SHARD_BYTES)
        .enumerate()
    {
        std::fs::write(dir.join(format!("state-{i:04}.bin")), shard).unwrap();
    }
    let seed_rss = vm_hwm_mb();
    drop(snap);
    eprintln!(
        "seeded {} users (first run, all new) in {first_run_s:.1}s",
        seed.users_new
    );

    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--diff")
        .arg(&dir)
        .output()
        .unwrap();
    let child: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("child failed: {}", String::from_utf8_lossy(&out.stderr)));
    let rows2 = child["rows"].as_f64().unwrap();
    let diff_rps = rows2 / child["diff_s"].as_f64().unwrap();
    let bare_rps = child["bare_rows"].as_f64().unwrap() / child["bare_s"].as_f64().unwrap();
    let users = child["users"].as_f64().unwrap();
    let state_bpu = child["state_bytes"].as_f64().unwrap() / users;
    let peak = child["peak_rss_mb"].as_f64().unwrap();
    let figures = json!({
        "rows": rows2 as u64,
        "diff_rows_per_s": diff_rps.round(),
        "csv_read_rows_per_s": bare_rps.round(),
        "peak_rss_mb": (peak * 10.0).round() / 10.0,
        "state_bytes_per_user": (state_bpu * 10.0).round() / 10.0,
    });
    println!("sync-diff bench ({rows} users, 20 columns, one core)");
    println!("  bare CSV read          {bare_rps:>12.0} rows/s   (baseline, same file, same run)");
    println!(
        "  parse + map + diff     {diff_rps:>12.0} rows/s   ({:.2}x the bare read; target >= 500000)",
        diff_rps / bare_rps
    );
    println!("  peak RSS (diff run)    {peak:>12.1} MB       (target <= 400 MB for 1M users)");
    println!(
        "  state bytes per user   {state_bpu:>12.1}          (16-byte key + 19 x 6-byte fingerprints + 6-byte row digest + identifier)"
    );
    println!(
        "  10M users x 20 attributes: {:.2} GB of state in memory (target < 3 GB)",
        (16.0 + 20.0 * 6.0) * 10e6 / 1e9
    );
    println!(
        "  first run (all new) parse+map+diff+confirm: {first_run_s:.1}s, peak RSS {seed_rss:.0} MB"
    );
    println!("  summary: {}", child["summary"]);
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(
        target.join("sync-diff.json"),
        serde_json::to_vec_pretty(&figures).unwrap(),
    )
    .unwrap();
    println!("  wrote target/bench/sync-diff.json: {figures}");
    if std::env::var_os("SYNC_DIFF_BENCH_KEEP").is_some() {
        println!(
            "  kept {} (run the diff alone with --diff <dir>)",
            dir.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
