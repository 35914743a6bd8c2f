//! `currents-bench`: decode + normalize + write throughput of currents-normalize on one core,
//! side by side with the Python peer (`testkit/currents-peer/peer.py`, fastavro + pyarrow)
//! doing the same job on the same files in the same run, and the peak RSS of converting one
//! 100,000-event file (a separate process, `VmHWM`). In the same run, the same conversion with
//! two other Avro paths (`arrow-avro`'s own container `Reader` with the registry schema as
//! reader schema, and `apache-avro`, see `bench/avro_paths.rs`), and the
//! peak RSS of converting a 512 MiB object (`MAX_OBJECT_BYTES`). Writes
//! `target/bench/currents.json`.
//!
//! ```sh
//! cargo run --release -p currents-normalize --features dev --bin currents-bench            # full: 1,000,000 events
//! cargo run --release -p currents-normalize --features dev --bin currents-bench -- --events 60000   # quick check
//! ```

#[path = "bench/avro_paths.rs"]
mod avro_paths;
#[path = "currents_bench/backfill.rs"]
mod backfill;
#[path = "currents_bench/compact.rs"]
mod compact;
#[path = "currents_bench/phases.rs"]
mod phases;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use apache_avro::Codec;
use clap::Parser;
use currents_normalize::convert::{ConvertOptions, convert};
use currents_normalize::key;
use currents_normalize::registry::{Registry, TableEntry};
use currents_normalize::synth::{self, FileSpec};
use serde_json::{Value, json};

// The same allocator as the function binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmark currents-normalize against the Python peer.
#[derive(Parser, Debug)]
struct Args {
    /// Total events (half in 15,000-event files, half in 100,000-event files).
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Working folder (inputs, outputs, `currents.json`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Python with fastavro and pyarrow (default: the project venv).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Skip the Python peer.
    #[arg(long)]
    skip_peer: bool,
    /// Passes per implementation and file size; the fastest counts (the machine is shared).
    #[arg(long, default_value_t = 3)]
    passes: usize,
    /// Internal: convert one file and print this process's peak RSS.
    #[arg(long, hide = true)]
    rss_probe: Option<PathBuf>,
    /// Internal: the key of the `--rss-probe` file.
    #[arg(long, hide = true)]
    key: Option<String>,
    /// Events of the compaction figure's table-day (0: skip it).
    #[arg(long, default_value_t = 2_000_000)]
    compact_events: u64,
    /// Parts that table-day is made of.
    #[arg(long, default_value_t = 150)]
    compact_parts: u64,
    /// Events of the large compaction figure's table-day (0: skip it).
    #[arg(long, default_value_t = 20_000_000)]
    compact20m_events: u64,
    /// Parts that large table-day is made of.
    #[arg(long, default_value_t = 400)]
    compact20m_parts: u64,
    /// Skip the backfill listing figure (1,008,000 keys).
    #[arg(long)]
    skip_backfill_list: bool,
    /// Internal: plan the synthetic backfill listing (`streamed` or `whole`) and print peak RSS.
    #[arg(long, hide = true)]
    backfill_list_probe: Option<String>,
    /// Internal: compact the table-day under this folder and print the result with peak RSS.
    #[arg(long, hide = true)]
    compact_probe: Option<PathBuf>,
    /// Rows per Arrow batch (tuning).
    #[arg(long, hide = true)]
    batch_rows: Option<usize>,
    /// Rows per Parquet row group (tuning).
    #[arg(long, hide = true)]
    row_group_rows: Option<usize>,
    /// Internal: time each step of converting the files under this folder.
    #[arg(long, hide = true)]
    phases: Option<PathBuf>,
    /// Size in MiB of the large object whose peak RSS is measured (0: skip).
    #[arg(long, default_value_t = 512)]
    large_object_mib: u64,
}

/// Event types and their share of traffic in the generated mix (a plausible engagement mix).
const MIX: [(&str, u32); 18] = [
    ("users.messages.email.Send", 14),
    ("users.messages.email.Delivery", 13),
    ("users.messages.email.Open", 11),
    ("users.behaviors.CustomEvent", 11),
    ("users.messages.pushnotification.Send", 9),
    ("users.behaviors.app.SessionStart", 8),
    ("users.behaviors.app.SessionEnd", 6),
    ("users.messages.email.Click", 4),
    ("users.messages.contentcard.Impression", 4),
    ("users.messages.inappmessage.Impression", 3),
    ("users.behaviors.Purchase", 3),
    ("users.messages.sms.Send", 3),
    ("users.messages.sms.Delivery", 2),
    ("users.messages.pushnotification.Open", 2),
    ("users.canvasstep.Progression", 2),
    ("users.behaviors.subscriptiongroup.StateChange", 2),
    ("users.profile.Update", 2),
    ("users.messages.whatsapp.Send", 1),
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from("."))
}

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn pick(seq: u64) -> &'static str {
    let total: u32 = MIX.iter().map(|(_, w)| w).sum();
    // A deterministic spread over the mix (golden-ratio stepping).
    let x = ((seq as f64 * 0.618_033_988_75).fract() * f64::from(total)) as u32;
    let mut acc = 0;
    for (t, w) in MIX {
        acc += w;
        if x < acc {
            return t;
        }
    }
    MIX[0].0
}

/// One input file: its path and key.
struct Input {
    path: PathBuf,
    key: String,
    events: u64,
}

fn generate(
    registry: &Registry,
    dir: &Path,
    total: u64,
    size: u64,
    seed0: u64,
) -> anyhow::Result<Vec<Input>> {
    let manifest = dir.join("manifest.json");
    let want = json!({"total": total, "size": size, "seed": seed0, "generator": 1});
    let mut inputs = Vec::new();
    let files = total.div_ceil(size);
    let plan: Vec<(String, u64, &TableEntry)> = (0..files)
        .map(|f| {
            let et = pick(seed0 + f);
            let n = size.min(total - f * size);
            let hour = format!("2026-11-29-{:02}", f % 24);
            let k = synth::key("currents", et, &hour, seed0 + f);
            let entry = registry
                .entries()
                .iter()
                .find(|e| e.event_type == et)
                .ok_or_else(|| anyhow::anyhow!("{et} not in the registry"))?;
            Ok((k, n, entry))
        })
        .collect::<anyhow::Result<_>>()?;
    let cached = std::fs::read_to_string(&manifest)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        == Some(want.clone());
    for (f, (k, n, entry)) in plan.into_iter().enumerate() {
        let path = dir.join(&k);
        if !cached {
            let dups = n / 100;
            let bytes = synth::file(
                entry,
                &FileSpec {
                    events: n - dups,
                    duplicates: dups,
                    seed: seed0 * 1000 + f as u64,
                    codec: Codec::Null,
                },
            )?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, bytes)?;
        }
        inputs.push(Input {
            path,
            key: k,
            events: n,
        });
    }
    if !cached {
        std::fs::write(&manifest, want.to_string())?;
    }
    Ok(inputs)
}

struct RustRun {
    events: u64,
    rows: u64,
    seconds: f64,
    /// This process's CPU time over the pass.
    cpu_seconds: f64,
}

/// This process's CPU time so far (all threads; the bench converts on one).
fn cpu_now() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

fn run_rust(
    registry: &Registry,
    inputs: &[Input],
    out: &Path,
    opts: &ConvertOptions,
) -> anyhow::Result<RustRun> {
    let _ = std::fs::remove_dir_all(out);
    let start = Instant::now();
    let cpu_start = cpu_now();
    let (mut events, mut rows) = (0, 0);
    // One read buffer for the run, as a batch backfill would keep.
    let mut bytes = Vec::new();
    for input in inputs {
        bytes.clear();
        std::fs::File::open(&input.path)?.read_to_end(&mut bytes)?;
        let k = key::parse(&input.key)?;
        let c = convert(&bytes, &input.key, &k, registry, opts)?;
        events += c.stats.events_in;
        rows += c.stats.rows_out;
        if let Some(part) = c.parquet {
            let path = out.join(c.location.key("tables/"));
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, part.into_bytes()?)?;
        }
    }
    Ok(RustRun {
        events,
        rows,
        seconds: start.elapsed().as_secs_f64(),
        cpu_seconds: cpu_now() - cpu_start,
    })
}

fn run_peer(python: &Path, input_dir: &Path, out: &Path) -> anyhow::Result<Value> {
    let root = workspace_root();
    let _ = std::fs::remove_dir_all(out);
    let output = Command::new(python)
        .arg(root.join("testkit/currents-peer/peer.py"))
        .arg("--input")
        .arg(input_dir)
        .arg("--out")
        .arg(out)
        .arg("--registry")
        .arg(root.join("functions/currents-normalize/registry/tables.json"))
        .output()?;
    if !output.status.success() {
        anyhow::bail!(
            "python peer failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let last = text.lines().last().unwrap_or_default();
    Ok(serde_json::from_str(last)?)
}

fn rss_probe(path: &Path, k: &str) -> anyhow::Result<()> {
    // As the function does: the object in memory, the part spooled to a file, the object
    // dropped, then the part read back for the upload.
    let registry = Registry::builtin()?;
    let bytes = std::fs::read(path)?;
    let parsed = key::parse(k)?;
    let c = convert(&bytes, k, &parsed, &registry, &ConvertOptions::default())?;
    drop(bytes);
    let parquet_bytes = match c.parquet {
        Some(part) => part.into_bytes()?.len(),
        None => 0,
    };
    println!(
        "{}",
        json!({"events": c.stats.events_in, "parquet_bytes": parquet_bytes, "peak_rss_mb": peak_rss_mb()})
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(mode) = &args.backfill_list_probe {
        return match backfill::probe(mode, peak_rss_mb) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("backfill probe failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(lake) = &args.compact_probe {
        return match compact::probe(lake, peak_rss_mb) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("compaction probe failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(dir) = &args.phases {
        return match phases::probe(dir, args.passes) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("phases probe failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(path) = &args.rss_probe {
        return match rss_probe(path, args.key.as_deref().unwrap_or_default()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rss probe failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match bench(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("currents-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Generates (once) an object of about `mib` MiB of one busy event type and measures the
/// peak RSS of converting it in a separate process.
fn large_object_rss(registry: &Registry, out: &Path, mib: u64) -> anyhow::Result<Value> {
    let et = "users.messages.email.Send";
    let entry = registry
        .entries()
        .iter()
        .find(|e| e.event_type == et)
        .ok_or_else(|| anyhow::anyhow!("{et} not in the registry"))?;
    let dir = out.join(format!("currents-input/large-{mib}mib"));
    let k = synth::key("currents", et, "2026-11-29-12", 1);
    let path = dir.join(&k);
    let target = mib << 20;
    let fits = std::fs::metadata(&path)
        .map(|m| m.len() <= target && m.len() > target - target / 16)
        .unwrap_or(false);
    if !fits {
        eprintln!("generating a {mib} MiB object under {}", dir.display());
        // Size per event from a sample, then the events that fill the target.
        let sample = synth::file(
            entry,
            &FileSpec {
                events: 10_000,
                duplicates: 0,
                seed: 1,
                codec: Codec::Null,
            },
        )?;
        let per_event = sample.len() as f64 / 10_000.0;
        let events = ((target as f64 * 0.98) / per_event) as u64;
        let bytes = synth::file(
            entry,
            &FileSpec {
                events,
                duplicates: events / 100,
                seed: 2,
                codec: Codec::Null,
            },
        )?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, &bytes)?;
    }
    let size = std::fs::metadata(&path)?.len();
    let exe = std::env::current_exe()?;
    let o = Command::new(exe)
        .arg("--rss-probe")
        .arg(&path)
        .arg("--key")
        .arg(&k)
        .output()?;
    let mut v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    if !o.status.success() {
        anyhow::bail!(
            "large-object probe failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    v["object_bytes"] = json!(size);
    eprintln!("large object ({size} bytes): {v}");
    Ok(v)
}

/// What every file size's round of [`bench`] uses.
struct Setup<'a> {
    args: &'a Args,
    registry: Registry,
    opts: ConvertOptions,
    out: PathBuf,
    python: PathBuf,
}

/// Events and seconds summed over the file sizes, per implementation.
#[derive(Default)]
struct Totals {
    rust_events: u64,
    rust_s: f64,
    rust_cpu_s: f64,
    py_events: u64,
    py_s: f64,
    py_cpu_s: f64,
    avro: std::collections::BTreeMap<&'static str, (u64, f64)>,
}

/// The fastest of `passes` runs of `run` (at least one), by `seconds`, and the least CPU time
/// of any of them (by `cpu`; each is the best of its own kind, they may be different passes).
fn fastest<T, S: PartialOrd>(
    passes: usize,
    seconds: impl Fn(&T) -> S,
    cpu: impl Fn(&T) -> f64,
    mut run: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<(T, f64)> {
    let mut best = run()?;
    let mut least_cpu = cpu(&best);
    for _ in 1..passes.max(1) {
        let again = run()?;
        least_cpu = least_cpu.min(cpu(&again));
        if seconds(&again) < seconds(&best) {
            best = again;
        }
    }
    Ok((best, least_cpu))
}

fn bench(args: &Args) -> anyhow::Result<()> {
    let root = workspace_root();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench"));
    let python = args
        .python
        .clone()
        .unwrap_or_else(|| root.join(".venv/bin/python"));
    if !args.skip_peer && !python.exists() {
        anyhow::bail!(
            "{} not found: run `make venv` (the peer needs fastavro and pyarrow)",
            python.display()
        );
    }
    let mut opts = ConvertOptions::default();
    if let Some(n) = args.batch_rows {
        opts.batch_rows = n;
    }
    if let Some(n) = args.row_group_rows {
        opts.row_group_rows = n;
    }
    let setup = Setup {
        args,
        registry: Registry::builtin()?,
        opts,
        out,
        python,
    };
    let half = args.events / 2;
    let sets = [(15_000u64, half), (100_000u64, args.events - half)];
    let mut by_size = serde_json::Map::new();
    let mut totals = Totals::default();
    let mut probe_input = None;
    for (i, (size, total)) in sets.iter().enumerate() {
        let input_dir = setup.out.join(format!("currents-input/{size}"));
        eprintln!(
            "generating {total} events in files of {size} under {}",
            input_dir.display()
        );
        let inputs = generate(
            &setup.registry,
            &input_dir,
            *total,
            *size,
            7 + i as u64 * 100,
        )?;
        if *size == 100_000 && probe_input.is_none() {
            probe_input = inputs
                .iter()
                .find(|f| f.events == 100_000)
                .or(inputs.first())
                .map(|f| (f.path.clone(), f.key.clone()));
        }
        let entry = bench_size(&setup, *size, &input_dir, &inputs, &mut totals)?;
        by_size.insert(size.to_string(), entry);
    }
    let peak = match &probe_input {
        Some((path, k)) => probe_peak_rss(path, k)?,
        None => None,
    };
    let mut result = summary(&setup, &totals, peak, by_size)?;
    std::fs::create_dir_all(&setup.out)?;
    extra_rounds(args, &setup.out, &mut result)?;
    let path = setup.out.join("currents.json");
    std::fs::write(&path, serde_json::to_string_pretty(&result)?)?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// One file size's round: production, the two other Avro paths and the peer on the same
/// files; the size's entry of `by_file_size`.
fn bench_size(
    setup: &Setup<'_>,
    size: u64,
    input_dir: &Path,
    inputs: &[Input],
    totals: &mut Totals,
) -> anyhow::Result<Value> {
    let (registry, opts, out) = (&setup.registry, &setup.opts, &setup.out);
    eprintln!("rust: {} files", inputs.len());
    let (r, r_cpu) = fastest(
        setup.args.passes,
        |r: &RustRun| r.seconds,
        |r: &RustRun| r.cpu_seconds,
        || {
            run_rust(
                registry,
                inputs,
                &out.join(format!("rust-tables/{size}")),
                opts,
            )
        },
    )?;
    let r_eps = r.events as f64 / r.seconds;
    totals.rust_events += r.events;
    totals.rust_s += r.seconds;
    totals.rust_cpu_s += r_cpu;
    eprintln!(
        "rust: {} events, {} rows in {:.2}s = {:.0} events/s ({:.2} CPU s)",
        r.events, r.rows, r.seconds, r_eps, r_cpu
    );
    let mut entry = json!({
        "files": inputs.len(),
        "events": r.events,
        "rows_written": r.rows,
        "seconds": r.seconds,
        "events_per_s": r_eps,
        "cpu_seconds": r_cpu,
        "events_per_cpu_s": r.events as f64 / r_cpu,
    });
    other_avro_paths(setup, size, inputs, &r, &mut entry, totals)?;
    if !setup.args.skip_peer {
        let dir = out.join(format!("python-tables/{size}"));
        let (p, p_cpu) = fastest(
            setup.args.passes,
            |p: &Value| p["seconds"].as_f64(),
            |p: &Value| p["cpu_seconds"].as_f64().unwrap_or(f64::NAN),
            || run_peer(&setup.python, input_dir, &dir),
        )?;
        let p_events = p["events"].as_u64().unwrap_or_default();
        let p_rows = p["rows_written"].as_u64().unwrap_or_default();
        let p_seconds = p["seconds"].as_f64().unwrap_or(f64::NAN);
        if p_events != r.events || p_rows != r.rows {
            anyhow::bail!(
                "peer disagrees: rust {} events/{} rows, python {p_events}/{p_rows}",
                r.events,
                r.rows
            );
        }
        totals.py_events += p_events;
        totals.py_s += p_seconds;
        totals.py_cpu_s += p_cpu;
        let p_eps = p_events as f64 / p_seconds;
        let cpu_ratio = p_cpu / r_cpu;
        eprintln!(
            "python: {p_events} events in {p_seconds:.2}s = {p_eps:.0} events/s ({p_cpu:.2} CPU s): x{:.1} wall, x{cpu_ratio:.1} CPU",
            r_eps / p_eps
        );
        entry["python_peer_seconds"] = json!(p_seconds);
        entry["python_peer_events_per_s"] = json!(p_eps);
        entry["python_peer_cpu_seconds"] = json!(p_cpu);
        entry["ratio"] = json!(r_eps / p_eps);
        entry["cpu_ratio"] = json!(cpu_ratio);
    }
    Ok(entry)
}

/// The same conversion through `arrow-avro`'s `Reader` and `apache-avro`, which must agree
/// with production's counts; their figures go into the size's `entry`.
fn other_avro_paths(
    setup: &Setup<'_>,
    size: u64,
    inputs: &[Input],
    r: &RustRun,
    entry: &mut Value,
    totals: &mut Totals,
) -> anyhow::Result<()> {
    let r_eps = r.events as f64 / r.seconds;
    let files: Vec<(&Path, &str)> = inputs
        .iter()
        .map(|f| (f.path.as_path(), f.key.as_str()))
        .collect();
    type PathFn = fn(
        &Registry,
        &[(&Path, &str)],
        &Path,
        &ConvertOptions,
    ) -> anyhow::Result<avro_paths::PathRun>;
    let others: [(&'static str, PathFn); 2] = [
        ("arrow_avro", avro_paths::run_arrow_avro),
        ("apache_avro", avro_paths::run_apache_avro),
    ];
    for (name, run) in others {
        let dir = setup.out.join(format!("{name}-tables/{size}"));
        let (best, _) = fastest(
            setup.args.passes,
            |b: &avro_paths::PathRun| b.seconds,
            |_| f64::NAN,
            || run(&setup.registry, &files, &dir, &setup.opts),
        )?;
        if best.events != r.events || best.rows != r.rows {
            anyhow::bail!(
                "{name} disagrees: production {} events/{} rows, {name} {}/{}",
                r.events,
                r.rows,
                best.events,
                best.rows
            );
        }
        let eps = best.events as f64 / best.seconds;
        eprintln!(
            "{name}: {} events in {:.2}s = {eps:.0} events/s (production is x{:.2})",
            best.events,
            best.seconds,
            r_eps / eps
        );
        entry[format!("{name}_seconds")] = json!(best.seconds);
        entry[format!("{name}_events_per_s")] = json!(eps);
        let total = totals.avro.entry(name).or_insert((0u64, 0f64));
        total.0 += best.events;
        total.1 += best.seconds;
    }
    Ok(())
}

/// Peak RSS (MB) of a separate process converting one file.
fn probe_peak_rss(path: &Path, k: &str) -> anyhow::Result<Option<f64>> {
    let exe = std::env::current_exe()?;
    let o = Command::new(exe)
        .arg("--rss-probe")
        .arg(path)
        .arg("--key")
        .arg(k)
        .output()?;
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    eprintln!("rss probe: {v}");
    Ok(v["peak_rss_mb"].as_f64())
}

/// The run's figures over every file size (`currents.json` before the extra rounds).
fn summary(
    setup: &Setup<'_>,
    totals: &Totals,
    peak: Option<f64>,
    by_size: serde_json::Map<String, Value>,
) -> anyhow::Result<Value> {
    let args = setup.args;
    let large = if args.large_object_mib > 0 {
        large_object_rss(&setup.registry, &setup.out, args.large_object_mib)?
    } else {
        Value::Null
    };
    let events_per_s = totals.rust_events as f64 / totals.rust_s;
    let avro_eps = |name: &str| {
        totals
            .avro
            .get(name)
            .map(|(e, s)| *e as f64 / *s)
            .filter(|v| v.is_finite())
    };
    let arrow_avro_eps = avro_eps("arrow_avro");
    let apache_avro_eps = avro_eps("apache_avro");
    eprintln!(
        "avro decoders side by side (events/s, whole run): production (container framing + arrow-avro datums) {events_per_s:.0} | arrow-avro Reader {:.0} | apache-avro {:.0}",
        arrow_avro_eps.unwrap_or(f64::NAN),
        apache_avro_eps.unwrap_or(f64::NAN)
    );
    let py_eps = (totals.py_s > 0.0).then(|| totals.py_events as f64 / totals.py_s);
    let cpu_ratio = (totals.py_cpu_s > 0.0).then(|| totals.py_cpu_s / totals.rust_cpu_s);
    Ok(json!({
        "events": totals.rust_events,
        "events_per_s": events_per_s,
        "python_peer_events_per_s": py_eps,
        "ratio": py_eps.map(|p| events_per_s / p),
        "cpu_ratio": cpu_ratio,
        "peak_rss_mb_100k_file": peak,
        "arrow_avro_events_per_s": arrow_avro_eps,
        "apache_avro_events_per_s": apache_avro_eps,
        "production_decoder": "container framing (container.rs) + arrow-avro datum decoder (normalize/)",
        "arrow_avro_vs_today": arrow_avro_eps.map(|a| a / events_per_s),
        "apache_avro_vs_today": apache_avro_eps.map(|a| a / events_per_s),
        "rss_mb_512mib_object": large["peak_rss_mb"].as_f64(),
        "large_object": large,
        "by_file_size": by_size,
        // The allocator setting these figures ran with (the stack sets it on the function).
        "mimalloc_purge_delay": std::env::var("MIMALLOC_PURGE_DELAY").ok(),
        "targets": {"by_file_size_ratio_min": 12, "peak_rss_mb_100k_file_max": 256, "rss_mb_512mib_object_max": 1024},
        "passes": args.passes,
        "method": "single thread each; files generated once (null codec, Braze's default) and read from the page cache; time covers read + decode + dedup + normalize + Parquet (Snappy) encode + write to disk; the peer times the same inside Python (imports excluded); each side runs `passes` times per file size and its fastest pass counts (the machine is shared): `ratio` is the wall-clock ratio (the target: each `by_file_size` entry's `ratio` >= 12), `cpu_ratio` the same from each side's least process CPU time of its passes (both sides convert on one thread; CPU time moves less than wall time with the other users of the cores); peak RSS is VmHWM of a separate process converting one 100,000-event file; arrow-avro and apache-avro do the same conversion (registry schema as reader schema, same columns, dedup and Parquet settings) on the same files, fastest of `passes` each; rss_mb_512mib_object is VmHWM of a separate process converting one object of that size (null codec) as the function does",
    }))
}

/// The compaction rounds and the backfill listing figure, merged into `result`.
fn extra_rounds(args: &Args, out: &Path, result: &mut Value) -> anyhow::Result<()> {
    let rounds = [
        (
            "compact",
            args.compact_events,
            args.compact_parts,
            args.passes,
        ),
        // One pass: the large day takes minutes to prepare and to compact.
        (
            "compact20m",
            args.compact20m_events,
            args.compact20m_parts,
            1,
        ),
    ];
    for (label, events, parts, passes) in rounds {
        if events > 0
            && let (Value::Object(r), Value::Object(c)) = (
                &mut *result,
                compact::run(out, label, events, parts, passes)?,
            )
        {
            r.extend(c);
        }
    }
    if !args.skip_backfill_list
        && let (Value::Object(r), Value::Object(b)) = (&mut *result, backfill::run()?)
    {
        r.extend(b);
    }
    Ok(())
}
