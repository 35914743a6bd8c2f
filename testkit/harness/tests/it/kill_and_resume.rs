//! Lose nothing under crashes: the sync is killed (SIGKILL) at random points while sending to
//! the Braze simulator, then run again. The final profiles equal those of an uninterrupted run,
//! and what was sent twice is bounded by the checkpoint window (confirmed progress is persisted
//! every `BRIDGE_CHECKPOINT_MS`).

use std::time::Duration;

use harness::moto::{Moto, aws_env};
use harness::{paths, samples};
use rand::{Rng, SeedableRng};

const USERS: u64 = 3_000;
const BUCKET: &str = "acme-amperity-exports";
const STATE: &str = "acme-bridge-state";
const KEY: &str = "amperity/customers/customers_2026-11-29T000000.csv";
const RATE: u64 = 15; // requests per second the simulator allows, so a run takes ~3 s

struct World {
    moto: Moto,
    sim: braze_sim::SimHandle,
}

async fn world() -> anyhow::Result<World> {
    let moto = Moto::start(None).await?;
    moto.create_bucket(BUCKET).await?;
    moto.create_bucket(STATE).await?;
    moto.put(BUCKET, KEY, samples::customers_csv(0..USERS, 1))
        .await?;
    let sim = braze_sim::start(braze_sim::SimConfig {
        api_key: "kill-test-key".into(),
        rate_limit_requests: RATE,
        rate_limit_window: Duration::from_secs(1),
        faults: braze_sim::Faults {
            latency_ms: Some((10, 30)),
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    Ok(World { moto, sim })
}

fn command(w: &World) -> anyhow::Result<tokio::process::Command> {
    let mut cmd = tokio::process::Command::new(paths::function_binary("braze-sync")?);
    cmd.arg("run")
        .arg(format!("s3://{BUCKET}/{KEY}"))
        .envs(aws_env(&w.moto.endpoint))
        .env(
            "ROUTES_LOCATION",
            paths::workspace_root().join("functions/braze-sync/routes"),
        )
        .env("STATE_BUCKET", STATE)
        .env("BRAZE_REST_ENDPOINT", w.sim.base_url())
        .env("BRAZE_API_KEY", "kill-test-key")
        .env("BRAZE_RATE_LIMIT_REQUESTS", RATE.to_string())
        .env("BRAZE_RATE_LIMIT_WINDOW_SECS", "1")
        .env("BRIDGE_CHECKPOINT_MS", "500")
        .env("BRIDGE_LEASE_SECONDS", "1")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    Ok(cmd)
}

async fn run_to_completion(w: &World) -> anyhow::Result<()> {
    for _ in 0..5 {
        if command(w)?.status().await?.success() {
            return Ok(());
        }
        // A lease of the killed run may still be live for a moment.
        tokio::time::sleep(Duration::from_millis(1_200)).await;
    }
    anyhow::bail!("the sync did not complete after a restart")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_runs_resume_with_exact_profiles_and_bounded_resends() -> anyhow::Result<()> {
    // Reference: one uninterrupted run.
    let clean = world().await?;
    run_to_completion(&clean).await?;
    let expected = clean.sim.users();
    assert_eq!(expected.len() as u64, USERS);
    assert_eq!(clean.sim.stats().objects_applied, USERS);

    // Window of confirmed progress that a kill can lose: the checkpoint interval at the
    // simulator's rate, plus the requests in flight (one second's worth), in objects.
    let bound = 2 * RATE * 75;
    for seed in [7u64, 21, 42] {
        let w = world().await?;
        let kill_after = rand::rngs::StdRng::seed_from_u64(seed).random_range(300..2_000);
        let mut child = command(&w)?.spawn()?;
        tokio::time::sleep(Duration::from_millis(kill_after)).await;
        let _ = child.start_kill(); // SIGKILL: no cleanup, no final checkpoint
        let _ = child.wait().await;
        let before = w.sim.stats().objects_applied;
        assert!(
            before < USERS,
            "seed {seed}: the kill came after the run had finished"
        );
        tokio::time::sleep(Duration::from_millis(1_100)).await; // the killed run's lease lapses
        run_to_completion(&w).await?;
        let sent = w.sim.stats().objects_applied;
        assert_eq!(
            w.sim.users(),
            expected,
            "seed {seed}: profiles equal an uninterrupted run"
        );
        let resent = sent - USERS;
        eprintln!(
            "seed {seed}: killed after {kill_after} ms with {before} sent; re-sent {resent} (bound {bound})"
        );
        assert!(
            resent <= bound,
            "seed {seed}: killed after {kill_after} ms ({before} sent), re-sent {resent} > {bound}"
        );
    }
    Ok(())
}
