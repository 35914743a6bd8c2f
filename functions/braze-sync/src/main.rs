//! braze-sync binary. Under Lambda (`AWS_LAMBDA_RUNTIME_API` set) it serves invocations;
//! otherwise it is the operator's CLI with the same code:
//!
//! ```text
//! braze-sync run s3://bucket/amperity/customers/export.csv [--dry-run] [--force-full]
//! braze-sync run ./export.csv --route customers --dry-run      # preview a local file
//! braze-sync run s3://bucket/amperity/customers/export.csv --dry-run --summary   # counts per attribute
//! braze-sync check-routes [DIR]                                 # validate route files
//! braze-sync status [ROUTE] [--json]                            # state, last runs, lease
//! braze-sync adopt s3://bucket/amperity/customers/export.csv --verify-sample 500
//! braze-sync audit customers [--sample 1000] [--heal] [--json]  # drift between Braze and state
//! ```

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use braze_sync::config::api_key::{ApiKeyCache, SourceReread};
use braze_sync::config::env::{Config, Locations, RoutesLocation, load_routes, load_routes_dir};
use braze_sync::config::route::Route;
use braze_sync::diff::export::{Part, ProduceOptions, SyncError};
use braze_sync::diff::in_memory::{dry_run, local_parts, open_local_parts, open_s3_part};
use braze_sync::ops::audit::AuditTarget;
use braze_sync::ops::dry_run::dry_run_summary;
use braze_sync::ops::status::{StatusLocation, read_route_status, render};
use braze_sync::run::handler::{Handler, HandlerConfig, RunFlags};
use braze_sync::run::runner::{Continuation, RunnerSettings, SqsContinuation, SyncRunner};
use braze_sync::run::scheduled_audit::{ScheduledAudit, dispatch, last_export};
use braze_sync::send::braze::{BrazeApi, BrazeClient, ClientOptions};
use braze_sync::send::hourly_budget::HourlyBudget;
use braze_sync::state::confirmed::Snapshot;
use braze_sync::state::store::StateStore;
use bridge_shared::object_store::S3Store;
use bridge_shared::{ObjectStore, S3Uri, logging, runtime};
use clap::{Parser, Subcommand};
use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;

// mimalloc gives the pages a step frees back to the kernel: with glibc's per-thread arenas
// the memory the diff workers freed stayed resident and the commit after them grew on top of
// it. `sync-scale-bench` runs its invocations with this allocator too.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Amperity export in S3 → attribute deltas → Braze /users/track.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Sync one export now (replay, backfill), exactly as the Lambda would.
    Run {
        /// `s3://bucket/key` of the export (or its `.DONE` marker), or a local file/folder with
        /// `--dry-run --route`.
        target: String,
        /// Print the Braze payloads and a summary; send and commit nothing.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: instead of every payload, per attribute how many users would
        /// change, be removed or stay unchanged, and 5 example payloads.
        #[arg(long, requires = "dry_run")]
        summary: bool,
        /// Resend every attribute, ignoring confirmed state.
        #[arg(long)]
        force_full: bool,
        /// Send departures the guard holds (more than `max_departure_share` of an audience
        /// leaving, or rows without a readable identifier). Same as the object metadata
        /// `bridge-allow-departures=true`.
        #[arg(long)]
        allow_departures: bool,
        /// The route for a local file (S3 objects find theirs by prefix).
        #[arg(long)]
        route: Option<String>,
    },
    /// Record an export as confirmed WITHOUT sending it (first sync of a route whose values
    /// Braze already has); the next export sends only what changed.
    Adopt {
        /// `s3://bucket/key` of the export (or its `.DONE` marker).
        target: String,
        /// First fetch this many random users of the export from Braze
        /// (`/users/export/ids`) and refuse when too many differ.
        #[arg(long)]
        verify_sample: Option<usize>,
        /// Largest share (0..1) of sampled users that may differ.
        #[arg(long, default_value_t = braze_sync::ops::adopt::DEFAULT_MAX_DIFFER_SHARE)]
        max_differ_share: f64,
    },
    /// Each route's state, last export, last runs, anything held or skipped, and the lease
    /// holder if a run is in progress (read-only, from the state bucket).
    Status {
        /// Only this route.
        route: Option<String>,
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Drift audit: read a random sample of the route's confirmed users back from Braze
    /// (`/users/export/ids`) and compare each route attribute with the state; per attribute
    /// the share that drifted with examples, users missing in Braze, an estimate for the route.
    Audit {
        /// The route.
        route: String,
        /// Users to sample.
        #[arg(long, default_value_t = braze_sync::ops::audit::DEFAULT_SAMPLE)]
        sample: usize,
        /// Mark what drifted (and users missing in Braze) so the next export resends exactly
        /// those values.
        #[arg(long)]
        heal: bool,
        /// The report as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Validate the route files of a folder (default: `ROUTES_LOCATION`).
    CheckRoutes {
        /// Folder of `*.toml` route files.
        dir: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    logging::init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("braze-sync: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = if runtime::is_lambda() {
        rt.block_on(serve_lambda())
    } else {
        rt.block_on(cli(Cli::parse()))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("braze-sync: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Everything built once per container.
struct App {
    config: Config,
    store: Arc<dyn ObjectStore>,
    routes: Vec<Route>,
    aws: aws_config::SdkConfig,
}

async fn app() -> anyhow::Result<App> {
    let config = Config::from_env()?;
    let aws = aws_config::load_from_env().await;
    let store: Arc<dyn ObjectStore> = Arc::new(S3Store::from_env().await);
    let routes = load_routes(&config.routes_location, store.as_ref()).await?;
    Ok(App {
        config,
        store,
        routes,
        aws,
    })
}

/// The Braze client, built once: `/users/track` for syncs, `/users/export/ids` for audits.
async fn braze_client(app: &App) -> anyhow::Result<Arc<BrazeClient>> {
    let cfg = &app.config;
    let key = ApiKeyCache::new(cfg.api_key.clone())
        .get(&app.aws)
        .await
        .context("resolving the Braze API key")?;
    // On a 401/403 the key is read again from its store (a rotated or fixed key is picked up
    // by this warm container) and the refused request retried once.
    let reread = Arc::new(SourceReread {
        source: cfg.api_key.clone(),
        aws: app.aws.clone(),
    });
    Ok(Arc::new(
        BrazeClient::new(cfg.braze_endpoint.clone(), key, &ClientOptions::default())?
            .with_key_reread(reread),
    ))
}

fn audit_target(cfg: &Config) -> AuditTarget {
    AuditTarget {
        state_bucket: cfg.state_bucket.clone(),
        state_prefix: cfg.state_prefix.clone(),
        reports_prefix: cfg.reports_prefix.clone(),
    }
}

fn handler(app: &App, client: Arc<dyn BrazeApi>) -> anyhow::Result<Handler> {
    let cfg = &app.config;
    let mut settings = RunnerSettings::new(
        &cfg.state_bucket,
        &cfg.state_prefix,
        &cfg.reports_prefix,
        &cfg.rejects_prefix,
    );
    settings.deliver.max_objects = cfg.max_objects_per_request;
    settings.deliver.rate.requests_per_window = cfg.rate_limit_requests;
    settings.deliver.rate.window = std::time::Duration::from_secs(cfg.rate_limit_window_secs);
    settings.deliver.rate.share = cfg.rate_limit_share;
    settings.deliver.hourly_budget = cfg.hourly_request_limit.map(|limit| {
        HourlyBudget::new(
            app.store.clone(),
            &cfg.state_bucket,
            &cfg.state_prefix,
            limit,
        )
    });
    // Operational knobs (defaults suit Lambda; tests shorten them).
    settings.max_run = Some(runtime::env_parse::<u64>("BRIDGE_MAX_RUN_SECONDS", 0)?)
        .filter(|s| *s > 0)
        .map(std::time::Duration::from_secs);
    settings.checkpoint_every =
        std::time::Duration::from_millis(runtime::env_parse::<u64>("BRIDGE_CHECKPOINT_MS", 3_000)?);
    // Lambda's own variable: the function's memory in MB.
    settings.memory_limit_bytes = Some(runtime::env_parse::<u64>(
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        0,
    )?)
    .filter(|mb| *mb > 0)
    .map(|mb| mb * 1024 * 1024);
    // Split every bounded run into this many pieces across invocations (0: only when the
    // export's spill would not fit the ephemeral storage).
    settings.fan_out_pieces =
        Some(runtime::env_parse::<usize>("BRIDGE_FAN_OUT_PIECES", 0)?).filter(|n| *n > 0);
    let lease_s = runtime::env_parse::<i64>("BRIDGE_LEASE_SECONDS", 60)?;
    settings.route_lease_s = lease_s;
    let continuation: Option<Arc<dyn Continuation>> =
        cfg.continuation_queue_url.as_ref().map(|url| {
            Arc::new(SqsContinuation {
                client: aws_sdk_sqs::Client::new(&app.aws),
                queue_url: url.clone(),
            }) as Arc<dyn Continuation>
        });
    let routes = app.routes.clone();
    let hcfg = HandlerConfig {
        state_bucket: cfg.state_bucket.clone(),
        output_prefixes: cfg.output_prefixes(),
        state_prefix: cfg.state_prefix.clone(),
        reports_prefix: cfg.reports_prefix.clone(),
        routes: routes.iter().map(Route::binding).collect(),
        lease_s,
    };
    // The invoking queue's maxReceiveCount: a message failing on that receive is reported
    // before it goes to the dead-letter queue (0: not known).
    let max_receives =
        Some(runtime::env_parse::<u32>("BRIDGE_MAX_RECEIVE_COUNT", 0)?).filter(|n| *n > 0);
    let runner = SyncRunner::new(app.store.clone(), routes, client, settings, continuation);
    Ok(
        Handler::new(hcfg, app.store.clone(), Arc::new(runner))
            .with_max_receive_count(max_receives),
    )
}

async fn serve_lambda() -> anyhow::Result<()> {
    let app = app().await?;
    let client = braze_client(&app).await?;
    let handler = Arc::new(handler(&app, client.clone())?);
    let audit = Arc::new(ScheduledAudit::new(
        app.store.clone(),
        audit_target(&app.config),
        app.routes.clone(),
        client,
    ));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let (handler, audit) = (handler.clone(), audit.clone());
        async move {
            let remaining = remaining_ms(&event.context);
            dispatch(&handler, &audit, &event.payload, remaining)
                .await
                .map_err(lambda_runtime::Error::from)
        }
    }))
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Time left in the invocation. A deadline in the past (cargo-lambda's emulator reports a
/// relative 600000 ms) is treated as unknown rather than as already expired.
fn remaining_ms(ctx: &lambda_runtime::Context) -> Option<u64> {
    let now = chrono::Utc::now().timestamp_millis();
    let deadline = i64::try_from(ctx.deadline).ok()?;
    (deadline > now).then(|| (deadline - now) as u64)
}

async fn status(route: Option<String>, json: bool) -> anyhow::Result<()> {
    let loc = Locations::from_env()?;
    let store: Arc<dyn ObjectStore> = Arc::new(S3Store::from_env().await);
    let mut routes = load_routes(&loc.routes_location, store.as_ref()).await?;
    if let Some(name) = &route {
        routes.retain(|r| r.name() == name);
        anyhow::ensure!(!routes.is_empty(), "no route {name:?}");
    }
    let at = StatusLocation {
        bucket: loc.state_bucket.clone(),
        state_prefix: loc.state_prefix.clone(),
        reports_prefix: loc.reports_prefix.clone(),
    };
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut statuses = Vec::new();
    for r in &routes {
        statuses.push(read_route_status(store.clone(), &at, r, now_ms).await?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&statuses)?);
    } else {
        print!("{}", render(&statuses));
    }
    Ok(())
}

async fn cli(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Status { route, json } => status(route, json).await,
        Command::CheckRoutes { dir } => check_routes(dir),
        Command::Run {
            target,
            dry_run: true,
            summary,
            force_full,
            route,
            ..
        } if !target.starts_with("s3://") => dry_run_local(&target, route, summary, force_full),
        Command::Run {
            target,
            dry_run: true,
            summary,
            force_full,
            allow_departures,
            ..
        } => dry_run_s3(&target, summary, force_full, allow_departures).await,
        Command::Adopt {
            target,
            verify_sample,
            max_differ_share,
        } => adopt_cli(&target, verify_sample, max_differ_share).await,
        Command::Audit {
            route,
            sample,
            heal,
            json,
        } => audit_cli(&route, sample, heal, json).await,
        Command::Run {
            target,
            force_full,
            allow_departures,
            ..
        } => {
            let flags = RunFlags {
                force_full,
                allow_departures,
            };
            run_cli(&target, flags).await
        }
    }
}

/// `check-routes [DIR]`: loads every route of the folder (default: `ROUTES_LOCATION` when it
/// is a folder) and lists them.
fn check_routes(dir: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let dir = match dir {
        Some(d) => d,
        None => match RoutesLocation::parse(&runtime::env_or("ROUTES_LOCATION", "routes")) {
            Ok(RoutesLocation::Dir(d)) => d,
            _ => anyhow::bail!("give a folder: braze-sync check-routes DIR"),
        },
    };
    let routes = load_routes_dir(&dir)?;
    for r in &routes {
        println!(
            "{}: prefix {:?}, {} attributes",
            r.name(),
            r.config.prefix,
            r.slots.len()
        );
    }
    Ok(())
}

/// `run FILE --dry-run --route NAME`: a local export against an empty state, routes from
/// the `ROUTES_LOCATION` folder.
fn dry_run_local(
    target: &str,
    route: Option<String>,
    summary: bool,
    force_full: bool,
) -> anyhow::Result<()> {
    let dir = match RoutesLocation::parse(&runtime::env_or("ROUTES_LOCATION", "routes")) {
        Ok(RoutesLocation::Dir(d)) => d,
        _ => anyhow::bail!("ROUTES_LOCATION must be a folder for local dry runs"),
    };
    let routes = load_routes_dir(&dir)?;
    let name = route.context("--route NAME is required for a local file")?;
    let route = routes
        .into_iter()
        .find(|r| r.name() == name)
        .with_context(|| format!("no route {name:?} in {}", dir.display()))?;
    let mut opts = ProduceOptions::for_route(&route, target);
    opts.full_resend |= force_full;
    let parts = local_parts(std::path::Path::new(target), &route.config.marker_suffix)?;
    let snapshot = Snapshot::for_route(&route);
    print_dry_run(open_local_parts(parts), &route, &snapshot, &opts, summary)
}

/// `run s3://… --dry-run`: the export against the route's confirmed state, read from S3.
async fn dry_run_s3(
    target: &str,
    summary_view: bool,
    force_full: bool,
    allow_departures: bool,
) -> anyhow::Result<()> {
    let app = app().await?;
    let uri: S3Uri = target.parse()?;
    let route = app
        .routes
        .iter()
        .find(|r| r.binding().owns(&uri))
        .with_context(|| format!("no route owns {uri}"))?
        .clone();
    let state = StateStore::new(
        app.store.clone(),
        &app.config.state_bucket,
        &app.config.state_prefix,
        route.name(),
    );
    let (_, snapshot) = state.load(&route).await?;
    let parts: Vec<S3Uri> = if uri.key.ends_with(&route.config.marker_suffix) {
        let listing = app.store.list(&uri.bucket, uri.folder()).await?;
        braze_sync::run::handler::parts_of_marker(&listing, &uri, &route.config.marker_suffix)
            .into_iter()
            .map(|m| uri.with_key(m.key))
            .collect()
    } else {
        vec![uri.clone()]
    };
    let mut opts = ProduceOptions::for_route(&route, &uri.to_string());
    opts.full_resend |= force_full;
    opts.allow_departures = allow_departures;
    let store = app.store.clone();
    let handle = braze_sync::clock::Blocking::new(tokio::runtime::Handle::current());
    tokio::task::spawn_blocking(move || {
        let parts = parts
            .iter()
            .map(|u| open_s3_part(&store, u, &handle).map(|(_, p)| p));
        print_dry_run(parts, &route, &snapshot, &opts, summary_view)
    })
    .await?
}

/// `run s3://…`: syncs one export as the Lambda would, with a progress bar on a terminal.
async fn run_cli(target: &str, flags: RunFlags) -> anyhow::Result<()> {
    let app = app().await?;
    let handler = handler(&app, braze_client(&app).await?)?;
    let uri: S3Uri = target.parse()?;
    // On a terminal: rows read, users sent, requests/s, and an ETA against the users
    // the route's state holds (the previous export's size).
    let expected = match app.routes.iter().find(|r| r.binding().owns(&uri)) {
        Some(route) => StateStore::new(
            app.store.clone(),
            &app.config.state_bucket,
            &app.config.state_prefix,
            route.name(),
        )
        .read_head()
        .await
        .ok()
        .map(|h| h.doc.users),
        None => None,
    };
    let bar = braze_sync::progress::Bar::start(expected);
    let result = handler.run_object(&uri, flags, None).await;
    bar.finish();
    match result {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Err(reason) => anyhow::bail!("sync of {uri} must be retried: {reason}"),
    }
}

/// A dry run's output: every payload to stdout and the counts to stderr, or with `summary`
/// the per-attribute table to stdout; rejects to stderr either way. Sends and commits nothing.
fn print_dry_run<I, R>(
    parts: I,
    route: &Route,
    snapshot: &Snapshot,
    opts: &ProduceOptions,
    summary: bool,
) -> anyhow::Result<()>
where
    I: IntoIterator<Item = Result<Part<R>, SyncError>>,
    R: std::io::Read,
{
    if summary {
        let view = dry_run_summary(parts, route, snapshot, opts, &mut std::io::stderr().lock())?;
        print!("{}", view.render());
        eprintln!("{}", serde_json::to_string(&view.summary)?);
        return Ok(());
    }
    let summary = dry_run(
        parts,
        route,
        snapshot,
        opts,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )?;
    eprintln!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

async fn adopt_cli(
    target: &str,
    verify_sample: Option<usize>,
    max_differ_share: f64,
) -> anyhow::Result<()> {
    use braze_sync::ops::adopt::{AdoptOptions, AdoptTarget, adopt};
    use braze_sync::send::braze::UserLookup;
    use braze_sync::state::store::Watermark;
    let app = app().await?;
    let uri: S3Uri = target.parse()?;
    let route = app
        .routes
        .iter()
        .find(|r| r.binding().owns(&uri))
        .with_context(|| format!("no route owns {uri}"))?
        .clone();
    let head = app
        .store
        .head(&uri)
        .await?
        .with_context(|| format!("{uri} does not exist"))?;
    let exported_at = route.export_order().export_time(&uri, &head)?.to_rfc3339();
    let export = Watermark {
        export_id: format!(
            "{uri}#{}",
            head.version_id.clone().unwrap_or_else(|| head.etag.clone())
        ),
        exported_at: Some(exported_at),
    };
    let parts: Vec<S3Uri> = if uri.key.ends_with(&route.config.marker_suffix) {
        let listing = app.store.list(&uri.bucket, uri.folder()).await?;
        braze_sync::run::handler::parts_of_marker(&listing, &uri, &route.config.marker_suffix)
            .into_iter()
            .map(|m| uri.with_key(m.key))
            .collect()
    } else {
        vec![uri.clone()]
    };
    let client = match verify_sample {
        Some(_) => {
            let key = ApiKeyCache::new(app.config.api_key.clone())
                .get(&app.aws)
                .await
                .context("resolving the Braze API key")?;
            Some(BrazeClient::new(
                app.config.braze_endpoint.clone(),
                key,
                &ClientOptions::default(),
            )?)
        }
        None => None,
    };
    let cfg = &app.config;
    let report = adopt(
        app.store.clone(),
        &AdoptTarget {
            state_bucket: cfg.state_bucket.clone(),
            state_prefix: cfg.state_prefix.clone(),
            reports_prefix: cfg.reports_prefix.clone(),
        },
        Arc::new(route),
        parts,
        export,
        client.as_ref().map(|c| c as &dyn UserLookup),
        &AdoptOptions {
            verify_sample,
            max_differ_share,
            ..AdoptOptions::default()
        },
    )
    .await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

async fn audit_cli(route: &str, sample: usize, heal: bool, json: bool) -> anyhow::Result<()> {
    use braze_sync::ops::audit::{AuditOptions, audit};
    let app = app().await?;
    let cfg = &app.config;
    let route = app
        .routes
        .iter()
        .find(|r| r.name() == route)
        .with_context(|| format!("no route {route:?}"))?
        .clone();
    let target = audit_target(cfg);
    let export = last_export(&app.store, &target, &route)
        .await
        .map_err(anyhow::Error::msg)?;
    let key = ApiKeyCache::new(cfg.api_key.clone())
        .get(&app.aws)
        .await
        .context("resolving the Braze API key")?;
    let client = BrazeClient::new(cfg.braze_endpoint.clone(), key, &ClientOptions::default())?;
    let report = audit(
        app.store.clone(),
        &target,
        Arc::new(route),
        export,
        &client,
        &AuditOptions {
            sample,
            heal,
            ..AuditOptions::default()
        },
    )
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    // The metric line (drift_share) for whatever ships this process's stderr to CloudWatch.
    eprintln!("{}", report.emf_line(chrono::Utc::now().timestamp_millis()));
    Ok(())
}
