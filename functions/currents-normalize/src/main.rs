//! currents-normalize binary: under Lambda (`AWS_LAMBDA_RUNTIME_API` set) it serves
//! invocations; otherwise it is the operator's CLI:
//!
//! ```text
//! currents-normalize run s3://bucket/currents/…/file.avro [--dry-run]
//! currents-normalize run-file ./file.avro --key 'currents/…/event_type=T/date=YYYY-MM-DD-HH/…/file.avro' --out ./lake [--dry-run]
//! currents-normalize compact [--day YYYY-MM-DD] [--table TABLE] [--dry-run]
//! currents-normalize backfill s3://bucket/prefix/ [--from DAY] [--to DAY] [--concurrency N] [--dry-run] [--no-compact]
//! currents-normalize status [--day YYYY-MM-DD|today|yesterday|-N] [--json]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bridge_shared::dir_store::DirStore;
use bridge_shared::object_store::S3Store;
use bridge_shared::runtime::is_lambda;
use bridge_shared::trigger::ObjectRef;
use bridge_shared::{S3Uri, logging};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use currents_normalize::backfill::{Backfill, BackfillRequest};
use currents_normalize::compact::job::run_and_report;
use currents_normalize::compact::{CompactRequest, Compactor, Selection};
use currents_normalize::config::Config;
use currents_normalize::handler::Handler;
use currents_normalize::quarantine::Keep;
use currents_normalize::registry::Registry;
use currents_normalize::report::{ObjectResult, Outcome, RunReport};
use currents_normalize::status;
use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;

// Large per-file buffers are allocated and freed on every object; mimalloc reuses them
// instead of returning them to the kernel each time (measured by `currents-bench`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Braze Currents Avro → Parquet tables for Amperity.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Normalize one Currents object in S3 (replay, backfill), writing where the Lambda would.
    Run {
        /// `s3://bucket/key` of the Currents object.
        uri: String,
        /// Convert and report, but write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Normalize a local Avro file into a local folder laid out like the bucket.
    RunFile {
        /// The Avro file.
        path: PathBuf,
        /// The Currents key the file was delivered under (gives event type, delivery hour,
        /// schema id and the part id).
        #[arg(long)]
        key: String,
        /// Output folder (receives `tables/`, `quarantine/`, `reports/`).
        #[arg(long)]
        out: PathBuf,
        /// Convert and report, but write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Normalize every Currents object already under a prefix (any key layout), skipping
    /// those done before, then compact the days touched. Safe to interrupt and rerun.
    Backfill {
        /// `s3://bucket/prefix/` to list.
        uri: String,
        /// First delivery day (YYYY-MM-DD), inclusive.
        #[arg(long)]
        from: Option<chrono::NaiveDate>,
        /// Last delivery day (YYYY-MM-DD), inclusive.
        #[arg(long)]
        to: Option<chrono::NaiveDate>,
        /// Objects converted at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Convert and count, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not compact the touched days afterwards.
        #[arg(long)]
        no_compact: bool,
    },
    /// Per table for one delivery day: parts, rows (from Parquet footers), bytes, last write,
    /// compacted or not; and the objects quarantined for that day (read-only).
    Status {
        /// The day: YYYY-MM-DD, today (default, UTC), yesterday, or -N for N days ago.
        #[arg(long, default_value = "today")]
        day: String,
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Compact table-days in TABLES_BUCKET: one deduplicated part per table and day. Without
    /// --day: yesterday and every earlier day that received parts since it was compacted.
    Compact {
        /// Only this delivery day (YYYY-MM-DD), today included.
        #[arg(long)]
        day: Option<chrono::NaiveDate>,
        /// Only this table.
        #[arg(long)]
        table: Option<String>,
        /// Read and count, write and delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    logging::init();
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("currents-normalize: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let registry = match Registry::builtin() {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("currents-normalize: {e}");
            return ExitCode::from(2);
        }
    };
    if is_lambda() {
        return serve(cfg, registry).await;
    }
    match Cli::parse().command {
        Command::Status { day, json } => status_cmd(&cfg, &day, json).await,
        Command::Backfill {
            uri,
            from,
            to,
            concurrency,
            dry_run,
            no_compact,
        } => {
            let opts = BackfillArgs {
                from,
                to,
                concurrency,
                dry_run,
                no_compact,
            };
            backfill_cmd(cfg, registry, &uri, opts).await
        }
        Command::Compact {
            day,
            table,
            dry_run,
        } => compact_cmd(cfg, registry, Selection { day, table }, dry_run).await,
        Command::Run { uri, dry_run } => run_cmd(cfg, registry, &uri, dry_run).await,
        Command::RunFile {
            path,
            key,
            out,
            dry_run,
        } => run_file_cmd(cfg, registry, &path, key, &out, dry_run).await,
    }
}

/// Under Lambda: one handler, built once, serves every invocation.
async fn serve(cfg: Config, registry: Arc<Registry>) -> ExitCode {
    let store = Arc::new(S3Store::from_env().await);
    let handler = Arc::new(Handler::new(cfg, store, registry));
    let result = lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let handler = handler.clone();
        async move {
            let deadline = deadline_instant(event.context.deadline);
            handler
                .handle_invocation(&event.payload, &event.context.request_id, deadline)
                .await
        }
    }))
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("currents-normalize: runtime error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `status`: one day's tables and quarantine, as a table or JSON.
async fn status_cmd(cfg: &Config, day: &str, json: bool) -> ExitCode {
    let Some(bucket) = cfg.tables_bucket.clone() else {
        eprintln!("currents-normalize: status needs TABLES_BUCKET");
        return ExitCode::from(2);
    };
    let day = match status::parse_day(day, chrono::Utc::now().date_naive()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("currents-normalize: --day {e}");
            return ExitCode::from(2);
        }
    };
    let store = S3Store::from_env().await;
    match status::read_day_status(&store, cfg, &bucket, day).await {
        Ok(s) if json => {
            println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(s) => {
            print!("{}", status::render(&s));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("currents-normalize: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The options of `backfill` besides its prefix.
struct BackfillArgs {
    from: Option<chrono::NaiveDate>,
    to: Option<chrono::NaiveDate>,
    concurrency: usize,
    dry_run: bool,
    no_compact: bool,
}

/// `backfill`: every Currents object under a prefix not done yet, then the days it touched.
async fn backfill_cmd(
    cfg: Config,
    registry: Arc<Registry>,
    uri: &str,
    args: BackfillArgs,
) -> ExitCode {
    let BackfillArgs {
        from,
        to,
        concurrency,
        dry_run,
        no_compact,
    } = args;
    let uri: S3Uri = match uri.parse() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("currents-normalize: {e}");
            return ExitCode::from(2);
        }
    };
    let store = Arc::new(S3Store::from_env().await);
    let backfill = Backfill::new(cfg, store, registry);
    let request = BackfillRequest {
        bucket: uri.bucket,
        prefix: uri.key,
        from,
        to,
        concurrency,
        dry_run,
        no_compact,
        progress: true,
    };
    match backfill.run(&request).await {
        Ok(summary) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&summary).unwrap_or_default()
            );
            eprintln!(
                "backfill: {} objects: {} normalized, {} skipped, {} quarantined, {} failed; {} events; {} table-days compacted",
                summary.objects,
                summary.normalized,
                summary.skipped,
                summary.quarantined,
                summary.failed,
                summary.events,
                summary.days_compacted
            );
            if summary.failed > 0 || summary.days_failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("currents-normalize: backfill listing failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `compact`: the selected table-days of TABLES_BUCKET, with a report.
async fn compact_cmd(
    cfg: Config,
    registry: Arc<Registry>,
    selection: Selection,
    dry_run: bool,
) -> ExitCode {
    let Some(bucket) = cfg.tables_bucket.clone() else {
        eprintln!("currents-normalize: compact needs TABLES_BUCKET");
        return ExitCode::from(2);
    };
    let store = Arc::new(S3Store::from_env().await);
    let started = chrono::Utc::now();
    let request = CompactRequest {
        selection,
        dry_run,
        today: started.date_naive(),
        deadline: None,
        owner: format!("cli-{}", started.timestamp_millis()),
    };
    let compactor =
        Compactor::new(cfg.clone(), store.clone(), registry).with_progress(compact_bar());
    let owner = request.owner.clone();
    match run_and_report(&compactor, &cfg, store.as_ref(), &bucket, request, &owner).await {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            if report.totals.failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("currents-normalize: listing the tables failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `run`: one Currents object in S3.
async fn run_cmd(cfg: Config, registry: Arc<Registry>, uri: &str, dry_run: bool) -> ExitCode {
    let uri: S3Uri = match uri.parse() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("currents-normalize: {e}");
            return ExitCode::from(2);
        }
    };
    let out_bucket = cfg.output_bucket(&uri.bucket).to_string();
    let store = Arc::new(S3Store::from_env().await);
    let handler = Handler::new(cfg, store, registry);
    let obj = ObjectRef::named(uri, "cli");
    let started = chrono::Utc::now();
    let result = handler.process(&obj, dry_run).await;
    finish(&handler, &out_bucket, started, result, dry_run).await
}

/// `run-file`: one local Avro file into a local folder laid out like the bucket.
async fn run_file_cmd(
    cfg: Config,
    registry: Arc<Registry>,
    path: &std::path::Path,
    key: String,
    out: &std::path::Path,
    dry_run: bool,
) -> ExitCode {
    let body = match std::fs::read(path) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            eprintln!("currents-normalize: cannot read {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let store = Arc::new(DirStore::one_bucket(out));
    let handler = Handler::new(cfg, store, registry);
    let source = S3Uri::new("local", key);
    let started = chrono::Utc::now();
    let keep = Keep::Upload(body.clone());
    let result = handler
        .process_bytes(&source, body, "local", keep, dry_run)
        .await;
    finish(&handler, "local", started, result, dry_run).await
}

/// A bar of the bytes compacted, on a terminal only (never under Lambda: this is the CLI).
fn compact_bar() -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg} (ETA {eta})",
    ) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// The Lambda deadline (milliseconds since the epoch) as an [`std::time::Instant`].
fn deadline_instant(deadline_ms: u64) -> Option<std::time::Instant> {
    let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).ok()?;
    let left = deadline_ms.checked_sub(now_ms)?;
    Some(std::time::Instant::now() + std::time::Duration::from_millis(left))
}

async fn finish(
    handler: &Handler,
    bucket: &str,
    started: chrono::DateTime<chrono::Utc>,
    result: ObjectResult,
    dry_run: bool,
) -> ExitCode {
    let outcome = result.outcome;
    let report = RunReport::new(
        format!("cli-{}", started.timestamp_millis()),
        started,
        chrono::Utc::now(),
        vec![result],
    );
    if !dry_run
        && outcome != Outcome::Ignored
        && let Err(e) = handler.write_report(bucket, &report).await
    {
        eprintln!("currents-normalize: could not write the run report: {e}");
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    match outcome {
        Outcome::Written | Outcome::Empty | Outcome::DryRun | Outcome::Ignored => ExitCode::SUCCESS,
        Outcome::Quarantined => ExitCode::from(3),
        Outcome::Retry => ExitCode::FAILURE,
    }
}
