//! `make bench` figure for braze-sync's sender: 1,000,000 changed users sent to the Braze
//! simulator at its default limit (3,000 requests / 3 s) with 20–80 ms latency, next to the floor
//! that limit allows (ceil(users / 75) requests at 1,000/s), measured in the same run; then the
//! same with 2% 5xx injected; then 5 routes sending at once (5 senders, each with its own rate
//! limiter as separate invocations have, the same users split between them) against the one
//! workspace limit, sharing it through the sender registry in a state bucket (moto S3, as
//! `braze-sync` does in Lambda): aggregate wall time against the same floor and the share of 429
//! answers (`routes5_ratio_to_floor`, `routes5_http_429_share`; targets ≤ 1.1×, ≤ 1%); and, as
//! the same-run comparison, the 5 routes without the registry (`routes5_uncoordinated_*`: each
//! paces at the whole limit until the server's headers slow it).
//! Writes `target/bench/sync-send.json`.
//!
//! The simulator runs in a child process (this same binary with `--serve-sim`), so the peak RSS
//! reported is the sender's alone; the deltas are generated lazily, as a reader would.
//!
//! Options: `--users N` (default 1,000,000), `--out PATH`, `--skip-5xx`, `--skip-routes5`,
//! `--skip-uncoordinated`.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use braze_sim::{Faults, SimConfig};
use braze_sync::config::api_key::ApiKey;
use braze_sync::config::braze_endpoint::Endpoint;
use braze_sync::model::{AttributeChange, DeliveryOutcome, Identifier, RowPos, UserDelta};
use braze_sync::send::braze::{BrazeClient, ClientOptions};
use braze_sync::send::deliver::{DeliverConfig, DeliveryStats, deliver};
use braze_sync::send::workspace_share::{SenderRegistry, ShareSettings, WorkspaceShare};
use bridge_shared::ObjectStore;
use bridge_shared::object_store::S3Store;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

const KEY: &str = "bench-sim-key";
const WINDOW_REQUESTS: f64 = 3_000.0;
const WINDOW_S: f64 = 3.0;

fn delta(i: u64) -> UserDelta {
    UserDelta {
        identifier: Identifier::ExternalId(format!("user-{i:08}")),
        pos: RowPos {
            source: "s3://bench/amperity/customers.csv".into(),
            row: i + 1,
            line: Some(i + 2),
        },
        changes: vec![
            AttributeChange {
                name: "first_name".into(),
                value: json!("Ada"),
                fingerprint: None,
            },
            AttributeChange {
                name: "lifetime_value".into(),
                value: json!((i % 10_000) as f64 * 1.5),
                fingerprint: None,
            },
            AttributeChange {
                name: "segment".into(),
                value: json!(format!("seg-{}", i % 13)),
                fingerprint: None,
            },
        ],
        update_existing_only: false,
        is_new: true,
        row_digest: None,
    }
}

/// Peak resident set size of this process, MB (Linux `VmHWM`).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The simulator child: prints its base URL on stdout, serves until stdin closes; `stats`
/// on stdin prints the counters as one JSON line, `faults <json>` replaces the faults,
/// `rss` prints its own peak RSS in MB, `reset` clears profiles and counters.
async fn serve_sim() -> anyhow::Result<()> {
    let sim = braze_sim::start(SimConfig {
        api_key: KEY.into(),
        faults: Faults {
            latency_ms: Some((20, 80)),
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await?;
    println!("{}", sim.base_url());
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let line = line.trim();
        if line == "stats" {
            println!("{}", serde_json::to_string(&sim.stats())?);
        } else if line == "rss" {
            println!("{}", peak_rss_mb());
        } else if line == "reset" {
            sim.reset();
            println!("ok");
        } else if let Some(f) = line.strip_prefix("faults ") {
            sim.set_faults(serde_json::from_str(f)?)?;
            println!("ok");
        }
    }
    sim.shutdown().await;
    Ok(())
}

/// The parent's handle on the simulator child.
struct SimChild {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    base_url: String,
}

impl SimChild {
    async fn start() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("--serve-sim")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the simulator child")?;
        let stdin = child.stdin.take().context("sim stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("sim stdout")?).lines();
        let base_url = stdout
            .next_line()
            .await?
            .context("the simulator child exited before printing its URL")?;
        Ok(Self {
            child,
            stdin,
            stdout,
            base_url,
        })
    }

    async fn ask(&mut self, line: &str) -> anyhow::Result<String> {
        use tokio::io::AsyncWriteExt;
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        self.stdout
            .next_line()
            .await?
            .context("the simulator child stopped answering")
    }

    async fn stats(&mut self) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&self.ask("stats").await?)?)
    }

    async fn stop(mut self) {
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = self.child.kill().await;
    }
}

struct Round {
    wall_s: f64,
    stats: DeliveryStats,
    sim: Value,
}

async fn round(client: &BrazeClient, users: u64, sim: &mut SimChild) -> anyhow::Result<Round> {
    let (tx, rx) = mpsc::channel(8_192);
    let (otx, mut orx) = mpsc::channel(8_192);
    let producer = tokio::spawn(async move {
        for i in 0..users {
            if tx.send(delta(i)).await.is_err() {
                break;
            }
        }
    });
    let collector = tokio::spawn(async move {
        let (mut confirmed, mut other) = (0u64, 0u64);
        while let Some(o) = orx.recv().await {
            match o {
                DeliveryOutcome::Confirmed(_) => confirmed += 1,
                _ => other += 1,
            }
        }
        (confirmed, other)
    });
    let started = Instant::now();
    let stats = deliver(rx, client, DeliverConfig::default(), otx)
        .await
        .context("delivery failed")?;
    let wall_s = started.elapsed().as_secs_f64();
    producer.await?;
    let (confirmed, other) = collector.await?;
    if confirmed != users || other != 0 {
        bail!("expected {users} confirmed users, got {confirmed} confirmed and {other} other");
    }
    Ok(Round {
        wall_s,
        stats,
        sim: sim.stats().await?,
    })
}

/// `routes` senders at once, each with its own limiter, sending `users / routes` users each;
/// with `registry`, each is a member of the workspace's senders there (as a run is).
async fn round_routes(
    client: &BrazeClient,
    users: u64,
    routes: u64,
    sim: &mut SimChild,
    registry: Option<&SenderRegistry>,
) -> anyhow::Result<Round> {
    let per_route = users / routes;
    let started = Instant::now();
    let mut sends = Vec::new();
    for r in 0..routes {
        let (tx, rx) = mpsc::channel(8_192);
        let (otx, mut orx) = mpsc::channel(8_192);
        let first = r * per_route;
        tokio::spawn(async move {
            for i in first..first + per_route {
                if tx.send(delta(i)).await.is_err() {
                    break;
                }
            }
        });
        let collector = tokio::spawn(async move {
            let mut confirmed = 0u64;
            while let Some(o) = orx.recv().await {
                if matches!(o, DeliveryOutcome::Confirmed(_)) {
                    confirmed += 1;
                }
            }
            confirmed
        });
        let send = async move {
            match registry {
                None => deliver(rx, client, DeliverConfig::default(), otx).await,
                Some(registry) => {
                    let run_id = format!("bench-{r}");
                    let (share, peers) = WorkspaceShare::new(
                        registry.clone(),
                        ShareSettings::default(),
                        &format!("route-{r}"),
                        &run_id,
                    );
                    let cfg = DeliverConfig {
                        peers: Some(peers),
                        ..DeliverConfig::default()
                    };
                    share.around(deliver(rx, client, cfg, otx)).await
                }
            }
        };
        sends.push((send, collector));
    }
    let (delivers, collectors): (Vec<_>, Vec<_>) = sends.into_iter().unzip();
    let results = futures::future::join_all(delivers).await;
    let wall_s = started.elapsed().as_secs_f64();
    let mut stats = DeliveryStats::default();
    for (res, collector) in results.into_iter().zip(collectors) {
        let st = res.context("delivery failed")?;
        let confirmed = collector.await?;
        if confirmed != per_route {
            bail!("a route confirmed {confirmed} of {per_route} users");
        }
        stats.requests += st.requests;
        stats.http_429 += st.http_429;
        stats.workspace_senders = stats.workspace_senders.max(st.workspace_senders);
    }
    Ok(Round {
        wall_s,
        stats,
        sim: sim.stats().await?,
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.iter().any(|a| a == "--serve-sim") {
        return rt.block_on(serve_sim());
    }
    let mut users: u64 = 1_000_000;
    let mut out = harness::paths::target_dir()
        .join("bench")
        .join("sync-send.json");
    let mut with_5xx = true;
    let mut with_routes5 = true;
    let mut with_uncoordinated = true;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--users" => users = it.next().context("--users N")?.parse()?,
            "--out" => out = PathBuf::from(it.next().context("--out PATH")?),
            "--skip-5xx" => with_5xx = false,
            "--skip-routes5" => with_routes5 = false,
            "--skip-uncoordinated" => with_uncoordinated = false,
            other => bail!("unknown argument {other}"),
        }
    }
    rt.block_on(bench(
        users,
        out,
        with_5xx,
        with_routes5,
        with_uncoordinated,
    ))
}

/// One 5-route round: ratio to the floor and share of 429 answers.
async fn routes5(
    client: &BrazeClient,
    users: u64,
    sim: &mut SimChild,
    registry: Option<&SenderRegistry>,
    floor_s: f64,
) -> anyhow::Result<(f64, f64)> {
    sim.ask("reset").await?;
    let faults = json!({"latency_ms": [20, 80]});
    sim.ask(&format!("faults {faults}")).await?;
    let five = round_routes(client, users, 5, sim, registry).await?;
    let requests = five.sim["requests_total"].as_f64().unwrap_or(0.0);
    let r429 = five.sim["responses_429"].as_f64().unwrap_or(0.0);
    let share = if requests > 0.0 { r429 / requests } else { 0.0 };
    // The floor is the same: the same users, the same workspace limit.
    let ratio5 = five.wall_s / floor_s;
    println!(
        "sync-send, 5 routes at once on one workspace limit ({}): {:.2} s = {:.3}x floor; {} requests, 429s {} ({:.2}%); most senders seen by one: {}",
        if registry.is_some() {
            "sharing it through the sender registry"
        } else {
            "uncoordinated"
        },
        five.wall_s,
        ratio5,
        five.stats.requests,
        r429,
        share * 100.0,
        five.stats.workspace_senders,
    );
    Ok((ratio5, share))
}

async fn bench(
    users: u64,
    out: PathBuf,
    with_5xx: bool,
    with_routes5: bool,
    with_uncoordinated: bool,
) -> anyhow::Result<()> {
    let mut sim = SimChild::start().await?;
    let client = BrazeClient::new(
        Endpoint::parse(&sim.base_url)?,
        ApiKey::new(KEY)?,
        &ClientOptions::default(),
    )?;
    let requests_floor = users.div_ceil(75);
    let floor_s = requests_floor as f64 / (WINDOW_REQUESTS / WINDOW_S);

    let clean = round(&client, users, &mut sim).await?;
    let sim_requests = clean.sim["requests_total"].as_f64().unwrap_or(0.0);
    let sim_429 = clean.sim["responses_429"].as_f64().unwrap_or(0.0);
    let http_429_share = if sim_requests > 0.0 {
        sim_429 / sim_requests
    } else {
        0.0
    };
    let ratio = clean.wall_s / floor_s;
    println!(
        "sync-send: {users} users, {} requests in {:.2} s (floor {:.2} s at 3,000 req / 3 s) = {:.3}x floor; \
         {:.0} req/s; 429s {} ({:.2}%); max objects/request {}; max body {} B",
        clean.stats.requests,
        clean.wall_s,
        floor_s,
        ratio,
        clean.stats.requests_per_s,
        sim_429,
        http_429_share * 100.0,
        clean.sim["max_objects_in_request"],
        clean.sim["max_body_bytes"],
    );

    let mut wall_s_with_5xx = Value::Null;
    if with_5xx {
        sim.ask("reset").await?;
        let faults = json!({"latency_ms": [20, 80], "error_5xx_share": 0.02});
        sim.ask(&format!("faults {faults}")).await?;
        let faulty = round(&client, users, &mut sim).await?;
        println!(
            "sync-send with 2% 5xx: {:.2} s = {:.3}x floor; {} requests, {} retries after 5xx, 429s {}",
            faulty.wall_s,
            faulty.wall_s / floor_s,
            faulty.stats.requests,
            faulty.stats.retries_by_cause.http_5xx,
            faulty.sim["responses_429"],
        );
        wall_s_with_5xx = json!(faulty.wall_s);
    }
    let (mut routes5_ratio, mut routes5_429) = (Value::Null, Value::Null);
    let (mut loose_ratio, mut loose_429) = (Value::Null, Value::Null);
    if with_routes5 {
        // The registry lives in a state bucket on moto's S3, as in Lambda.
        let moto = harness::moto::Moto::start(None).await?;
        moto.create_bucket("bench-state").await?;
        let store: Arc<dyn ObjectStore> = Arc::new(S3Store::new(moto.s3.clone()));
        let registry = SenderRegistry::new(store, "bench-state", "bridge/state/");
        let (ratio, share) = routes5(&client, users, &mut sim, Some(&registry), floor_s).await?;
        routes5_ratio = json!(ratio);
        routes5_429 = json!(share);
        moto.stop().await;
        if with_uncoordinated {
            let (ratio, share) = routes5(&client, users, &mut sim, None, floor_s).await?;
            loose_ratio = json!(ratio);
            loose_429 = json!(share);
        }
    }
    let peak_rss_mb = peak_rss_mb();
    let sim_rss_mb: f64 = sim.ask("rss").await?.parse().unwrap_or(f64::NAN);
    println!(
        "sync-send: peak RSS of the sender process {peak_rss_mb:.0} MB (the simulator, in a child \
         process holding every profile, peaked at {sim_rss_mb:.0} MB)"
    );
    sim.stop().await;

    let figures = json!({
        "users": users,
        "wall_s": clean.wall_s,
        "floor_s": floor_s,
        "ratio_to_floor": ratio,
        "http_429_share": http_429_share,
        "peak_rss_mb": peak_rss_mb,
        "wall_s_with_5xx": wall_s_with_5xx,
        "sim_peak_rss_mb": sim_rss_mb,
        "routes5_ratio_to_floor": routes5_ratio,
        "routes5_http_429_share": routes5_429,
        "routes5_uncoordinated_ratio_to_floor": loose_ratio,
        "routes5_uncoordinated_http_429_share": loose_429,
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_vec_pretty(&figures)?)?;
    println!("sync-send: wrote {}", out.display());
    Ok(())
}
