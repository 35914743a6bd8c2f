//! Runs simulation seeds on every core and writes `target/bench/sim.json`.
//!
//! `simulate --seeds N --seed-start S` runs seeds S..S+N; `simulate --seed S [--trace]`
//! replays one (printing its trace); with `--log FILTER` (`info`, `braze_sync::run=debug`) the
//! trace shows braze-sync's logs, with `--watch ID,ID` what each export holds for those users
//! and what the state says of them after each invocation. Exits 1 when any seed violated an
//! invariant.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sim::{Options, SeedOutcome, replay_command, run_seed};

struct Args {
    seed_start: u64,
    seeds: u64,
    trace: bool,
    jobs: usize,
    out: String,
    log: Option<String>,
    watch: Vec<String>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        seed_start: 0,
        seeds: 100,
        trace: false,
        jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
        out: "target/bench/sim.json".into(),
        log: None,
        watch: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--seeds" => {
                a.seeds = val("--seeds")?
                    .parse()
                    .map_err(|e| format!("--seeds: {e}"))?
            }
            "--seed-start" => {
                a.seed_start = val("--seed-start")?
                    .parse()
                    .map_err(|e| format!("--seed-start: {e}"))?;
            }
            "--seed" => {
                a.seed_start = val("--seed")?.parse().map_err(|e| format!("--seed: {e}"))?;
                a.seeds = 1;
            }
            "--trace" => a.trace = true,
            "--jobs" => a.jobs = val("--jobs")?.parse().map_err(|e| format!("--jobs: {e}"))?,
            "--out" => a.out = val("--out")?,
            "--log" => a.log = Some(val("--log")?),
            "--watch" => {
                a.watch = val("--watch")?
                    .split(',')
                    .filter(|u| !u.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if (a.log.is_some() || !a.watch.is_empty()) && (a.seeds != 1 || !a.trace) {
        return Err("--log and --watch go with --seed S --trace (a replay of one seed)".into());
    }
    Ok(a)
}

fn one(seed: u64, args: &Args) -> SeedOutcome {
    let opts = Options {
        trace: args.trace,
        log: args.log.is_some(),
        watch: args.watch.clone(),
        ..Options::default()
    };
    match std::panic::catch_unwind(|| run_seed(seed, &opts)) {
        Ok(o) => o,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            SeedOutcome {
                seed,
                faults: Default::default(),
                deployment: sim::lambda::Deployment {
                    timeout_ms: 0,
                    concurrency: 0,
                    batch_size: 0,
                    bounded_min_users: 0,
                    fan_out_pieces: None,
                    range_users: 0,
                    max_objects: 0,
                },
                stats: Default::default(),
                violations: vec![format!("the seed panicked: {msg}")],
                trace_digest: (0, 0),
                trace: Vec::new(),
            }
        }
    }
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("simulate: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(filter) = &args.log
        && let Err(e) = sim::notes::install_log(filter)
    {
        eprintln!("simulate: {e}");
        return ExitCode::from(2);
    }
    let next = Arc::new(AtomicU64::new(args.seed_start));
    let end = args.seed_start + args.seeds;
    let outcomes: Arc<Mutex<Vec<SeedOutcome>>> = Arc::default();
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..args.jobs.max(1) {
            let (next, outcomes) = (next.clone(), outcomes.clone());
            let (trace, args) = (args.trace, &args);
            let start = args.seed_start;
            s.spawn(move || {
                loop {
                    let seed = next.fetch_add(1, Ordering::SeqCst);
                    if seed >= end {
                        break;
                    }
                    let o = one(seed, args);
                    if trace {
                        for line in &o.trace {
                            eprintln!("{line}");
                        }
                    }
                    if end - start == 1 {
                        eprintln!(
                            "seed {seed}: faults {}",
                            serde_json::to_string(&o.faults).unwrap_or_default()
                        );
                        eprintln!(
                            "seed {seed}: deployment {}",
                            serde_json::to_string(&o.deployment).unwrap_or_default()
                        );
                        eprintln!(
                            "seed {seed}: stats {}",
                            serde_json::to_string(&o.stats).unwrap_or_default()
                        );
                        eprintln!(
                            "seed {seed}: trace digest {:016x} over {} events",
                            o.trace_digest.0, o.trace_digest.1
                        );
                    }
                    for v in &o.violations {
                        eprintln!("seed {seed}: {v}");
                    }
                    if !o.violations.is_empty() {
                        eprintln!("seed {seed}: replay with: {}", replay_command(seed));
                    }
                    outcomes.lock().unwrap_or_else(|e| e.into_inner()).push(o);
                }
            });
        }
    });
    let outcomes = outcomes.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let sum = |f: &dyn Fn(&SeedOutcome) -> u64| outcomes.iter().map(f).sum::<u64>();
    let mut failing: Vec<u64> = outcomes
        .iter()
        .filter(|o| !o.violations.is_empty())
        .map(|o| o.seed)
        .collect();
    failing.sort_unstable();
    let doc = serde_json::json!({
        "seed_start": args.seed_start,
        "seeds": args.seeds,
        "schedules_with_faults": sum(&|o| u64::from(o.with_faults())),
        "crashes_injected": sum(&|o| o.stats.crashes),
        "lost_answers_injected": sum(&|o| o.stats.lost_answers),
        "timeouts_injected": sum(&|o| o.stats.timeouts),
        "failed_calls_injected": sum(&|o| o.stats.failed_calls),
        "invocations": sum(&|o| o.stats.invocations),
        "exports": sum(&|o| o.stats.exports),
        "dlq_messages": sum(&|o| o.stats.dlq),
        "violations": sum(&|o| o.violations.len() as u64),
        "failing_seeds": failing,
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    if let Some(dir) = std::path::Path::new(&args.out).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::File::create(&args.out) {
        Ok(mut f) => {
            let _ = writeln!(
                f,
                "{}",
                serde_json::to_string_pretty(&doc).unwrap_or_default()
            );
        }
        Err(e) => eprintln!("simulate: writing {}: {e}", args.out),
    }
    eprintln!("{}", serde_json::to_string(&doc).unwrap_or_default());
    if failing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
