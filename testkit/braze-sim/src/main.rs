//! `braze-sim` binary: runs the Braze `/users/track` simulator on a port until killed.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use braze_sim::{Burst429, Faults, SimConfig};
use clap::Parser;

/// Test-only Braze `/users/track` simulator.
#[derive(Debug, Parser)]
#[command(name = "braze-sim", version)]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to bind (0 picks a free one).
    #[arg(long, default_value_t = 4010)]
    port: u16,
    /// The accepted REST API key.
    #[arg(long, env = "BRAZE_SIM_API_KEY", default_value = "sim-key")]
    api_key: String,
    /// The key lacks the users.track permission (every request gets 403).
    #[arg(long)]
    key_lacks_users_track: bool,
    /// Requests per rate window.
    #[arg(long, default_value_t = 3000)]
    rate_limit: u64,
    /// Rate window length in seconds (fractions allowed).
    #[arg(long, default_value_t = 3.0)]
    window_secs: f64,
    /// Objects allowed per array.
    #[arg(long, default_value_t = 75)]
    max_objects: usize,
    /// Objects allowed across all arrays together ("MAU CY 24-25" plans: 50).
    #[arg(long)]
    combined_limit: Option<usize>,
    /// Largest accepted body in bytes.
    #[arg(long, default_value_t = 4_000_000)]
    max_body_bytes: usize,
    /// Latency jitter per request as MIN,MAX milliseconds.
    #[arg(long)]
    latency_ms: Option<String>,
    /// Share of requests answered 500/502/503.
    #[arg(long, default_value_t = 0.0)]
    error_5xx_share: f64,
    /// Share of requests whose connection is dropped without a response.
    #[arg(long, default_value_t = 0.0)]
    drop_share: f64,
    /// Share of requests delayed by --slow-ms.
    #[arg(long, default_value_t = 0.0)]
    slow_share: f64,
    /// Delay of a slow request in milliseconds.
    #[arg(long, default_value_t = 0)]
    slow_ms: u64,
    /// 429 bursts as EVERY_N,LENGTH.
    #[arg(long)]
    burst_429: Option<String>,
    /// `errors[]` entries carry no index (the client cannot tell which objects were refused).
    #[arg(long)]
    errors_without_index: bool,
    /// One invalid object refuses the whole request (400, nothing applied).
    #[arg(long)]
    strict_batch_400: bool,
    /// Seed of the fault generator.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep request bodies in the request log.
    #[arg(long)]
    log_bodies: bool,
    /// Answer with the rate-limit headers of an account on MAU pricing
    /// (`X-Ratelimit-Retry-After` on a 429, `X-RateLimit-Reset` as seconds remaining).
    #[arg(long)]
    mau_headers: bool,
    /// `/users/track` requests allowed per clock hour (none by default).
    #[arg(long)]
    hourly_request_limit: Option<u64>,
}

fn pair(name: &str, s: &str) -> anyhow::Result<(u64, u64)> {
    let (a, b) = s
        .split_once(',')
        .with_context(|| format!("--{name} must be A,B, got {s:?}"))?;
    let a = a
        .trim()
        .parse()
        .with_context(|| format!("--{name}: {a:?}"))?;
    let b = b
        .trim()
        .parse()
        .with_context(|| format!("--{name}: {b:?}"))?;
    Ok((a, b))
}

fn config(args: Args) -> anyhow::Result<SimConfig> {
    if !(args.window_secs.is_finite() && args.window_secs > 0.0) {
        bail!("--window-secs must be a positive number");
    }
    let latency_ms = args
        .latency_ms
        .as_deref()
        .map(|s| pair("latency-ms", s))
        .transpose()?;
    let burst_429 = args
        .burst_429
        .as_deref()
        .map(|s| pair("burst-429", s))
        .transpose()?
        .map(|(every_n_requests, length)| Burst429 {
            every_n_requests,
            length,
        });
    let cfg = SimConfig {
        api_key: args.api_key,
        key_lacks_users_track: args.key_lacks_users_track,
        host: args.host,
        port: args.port,
        rate_limit_requests: args.rate_limit,
        rate_limit_window: Duration::from_secs_f64(args.window_secs),
        max_objects: args.max_objects,
        combined_limit: args.combined_limit,
        max_body_bytes: args.max_body_bytes,
        faults: Faults {
            latency_ms,
            error_5xx_share: args.error_5xx_share,
            burst_429,
            drop_share: args.drop_share,
            slow_share: args.slow_share,
            slow_ms: args.slow_ms,
            errors_without_index: args.errors_without_index,
            strict_batch_400: args.strict_batch_400,
        },
        seed: args.seed,
        log_bodies: args.log_bodies,
        mau_headers: args.mau_headers,
        hourly_request_limit: args.hourly_request_limit,
        ..SimConfig::default()
    };
    cfg.validate()?;
    Ok(cfg)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = config(Args::parse())?;
    let sim = braze_sim::start(cfg).await?;
    println!("braze-sim listening on {}", sim.base_url());
    tokio::signal::ctrl_c()
        .await
        .context("braze-sim: waiting for Ctrl-C")?;
    sim.shutdown().await;
    Ok(())
}
