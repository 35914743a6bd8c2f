//! A whole local deployment in one call: moto with the buckets and queues the SAM template
//! creates, both functions under the runtime emulator, their pollers, and the Braze simulator.
//! Used by the integration tests and by `make demo`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::emulator::FunctionUnderEmulator;
use crate::moto::{Moto, aws_env};
use crate::poller::Poller;

/// Bucket Amperity exports into (prefix `amperity/`).
pub const EXPORTS_BUCKET: &str = "acme-amperity-exports";
/// Bucket Braze Currents writes into (prefix `currents/`); tables are written under `tables/`.
pub const CURRENTS_BUCKET: &str = "acme-braze-currents";
/// Bucket for braze-sync state, reports and rejects.
pub const STATE_BUCKET: &str = "acme-bridge-state";
/// The simulator's API key.
pub const BRAZE_KEY: &str = "sim-key-0123456789";
/// The Secrets Manager secret braze-sync reads its key from when
/// [`StackOptions::api_key_secret`] is set.
pub const BRAZE_KEY_SECRET: &str = "braze/rest-api-key";

/// What to start.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Start braze-sync (and the Braze simulator).
    pub braze_sync: bool,
    /// Start currents-normalize.
    pub currents: bool,
    /// Simulator settings.
    pub sim: braze_sim::SimConfig,
    /// Routes folder for braze-sync.
    pub routes_dir: PathBuf,
    /// Extra environment for braze-sync.
    pub sync_env: Vec<(String, String)>,
    /// Where function logs go.
    pub log_dir: Option<PathBuf>,
    /// Give braze-sync its key through the Secrets Manager secret [`BRAZE_KEY_SECRET`] holding
    /// this value (as deployed), instead of a plain `BRAZE_API_KEY`.
    pub api_key_secret: Option<String>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            braze_sync: true,
            currents: true,
            sim: braze_sim::SimConfig {
                api_key: BRAZE_KEY.to_string(),
                ..Default::default()
            },
            routes_dir: crate::paths::workspace_root().join("functions/braze-sync/routes"),
            sync_env: Vec::new(),
            log_dir: None,
            api_key_secret: None,
        }
    }
}

/// A running local deployment.
pub struct Stack {
    /// S3 and SQS.
    pub moto: Moto,
    /// The Braze simulator, when braze-sync runs.
    pub sim: Option<braze_sim::SimHandle>,
    /// braze-sync under the emulator.
    pub sync_fn: Option<Arc<FunctionUnderEmulator>>,
    /// currents-normalize under the emulator.
    pub currents_fn: Option<Arc<FunctionUnderEmulator>>,
    /// Poller feeding braze-sync.
    pub sync_poller: Option<Poller>,
    /// Poller feeding currents-normalize.
    pub currents_poller: Option<Poller>,
    /// braze-sync's dead-letter queue.
    pub sync_dlq_url: Option<String>,
    /// The routes folder braze-sync was started with.
    pub routes_dir: PathBuf,
}

impl Stack {
    /// Starts what `opts` asks for.
    pub async fn start(opts: StackOptions) -> anyhow::Result<Self> {
        let moto = Moto::start(None).await?;
        let mut stack = Stack {
            moto,
            sim: None,
            sync_fn: None,
            currents_fn: None,
            sync_poller: None,
            currents_poller: None,
            sync_dlq_url: None,
            routes_dir: opts.routes_dir.clone(),
        };
        let env = aws_env(&stack.moto.endpoint);
        let log = |name: &str| opts.log_dir.as_ref().map(|d| d.join(format!("{name}.log")));
        if opts.braze_sync {
            let sim = braze_sim::start(opts.sim.clone()).await?;
            stack.moto.create_bucket(EXPORTS_BUCKET).await?;
            stack.moto.create_bucket(STATE_BUCKET).await?;
            let (url, arn, dlq) = stack
                .moto
                .create_queue_with_dlq("braze-sync-exports", 30, 3)
                .await?;
            stack
                .moto
                .notify_queue(EXPORTS_BUCKET, "amperity/", &arn)
                .await?;
            let mut fenv = env.clone();
            for (k, v) in [
                ("ROUTES_LOCATION", opts.routes_dir.display().to_string()),
                ("STATE_BUCKET", STATE_BUCKET.to_string()),
                ("BRAZE_REST_ENDPOINT", sim.base_url()),
                ("BRAZE_API_KEY", BRAZE_KEY.to_string()),
                ("CONTINUATION_QUEUE_URL", url.clone()),
                ("RUST_LOG", "info".to_string()),
                (
                    braze_sync::config::env::INSECURE_PLAIN_KEY_SWITCH,
                    "1".to_string(),
                ),
            ] {
                fenv.push((k.to_string(), v));
            }
            if let Some(value) = &opts.api_key_secret {
                let arn = stack.moto.put_secret(BRAZE_KEY_SECRET, value).await?;
                fenv.retain(|(k, _)| k != "BRAZE_API_KEY");
                fenv.push(("BRAZE_API_KEY_SECRET_ARN".to_string(), arn));
            }
            fenv.extend(opts.sync_env.iter().cloned());
            let f = Arc::new(
                FunctionUnderEmulator::start("braze-sync", &fenv, log("braze-sync").as_deref())
                    .await?,
            );
            stack.sync_poller = Some(Poller::start(
                stack.moto.sqs.clone(),
                url,
                arn,
                f.clone(),
                10,
            ));
            stack.sync_fn = Some(f);
            stack.sync_dlq_url = Some(dlq);
            stack.sim = Some(sim);
        }
        if opts.currents {
            stack.moto.create_bucket(CURRENTS_BUCKET).await?;
            let (url, arn, _dlq) = stack
                .moto
                .create_queue_with_dlq("currents-normalize-files", 30, 3)
                .await?;
            stack
                .moto
                .notify_queue(CURRENTS_BUCKET, "currents/", &arn)
                .await?;
            let mut fenv = env.clone();
            if opts.braze_sync {
                // Deployed together: currents-normalize hands braze-sync its profile-change feed.
                fenv.push(("PROFILE_FEED_BUCKET".to_string(), STATE_BUCKET.to_string()));
                fenv.push((
                    "PROFILE_FEED_PREFIX".to_string(),
                    "bridge/state/_currents/feed/".to_string(),
                ));
            }
            for (k, v) in [
                ("TABLES_BUCKET", CURRENTS_BUCKET),
                ("TABLES_PREFIX", "tables/"),
                ("CURRENTS_PREFIX", "currents/"),
                ("RUST_LOG", "info"),
            ] {
                fenv.push((k.to_string(), v.to_string()));
            }
            let f = Arc::new(
                FunctionUnderEmulator::start(
                    "currents-normalize",
                    &fenv,
                    log("currents-normalize").as_deref(),
                )
                .await?,
            );
            stack.currents_poller = Some(Poller::start(
                stack.moto.sqs.clone(),
                url,
                arn,
                f.clone(),
                10,
            ));
            stack.currents_fn = Some(f);
        }
        Ok(stack)
    }

    /// The environment an operator's CLI (`braze-sync status`, `currents-normalize status`)
    /// needs to read this stack's buckets.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        let mut env = aws_env(&self.moto.endpoint);
        for (k, v) in [
            ("ROUTES_LOCATION", self.routes_dir.display().to_string()),
            ("STATE_BUCKET", STATE_BUCKET.to_string()),
            ("TABLES_BUCKET", CURRENTS_BUCKET.to_string()),
            ("TABLES_PREFIX", "tables/".to_string()),
            ("CURRENTS_PREFIX", "currents/".to_string()),
        ] {
            env.push((k.to_string(), v));
        }
        if let Some(sim) = &self.sim {
            for (k, v) in [
                ("BRAZE_REST_ENDPOINT", sim.base_url()),
                ("BRAZE_API_KEY", BRAZE_KEY.to_string()),
                (
                    braze_sync::config::env::INSECURE_PLAIN_KEY_SWITCH,
                    "1".to_string(),
                ),
            ] {
                env.push((k.to_string(), v));
            }
        }
        env
    }

    /// Runs a built function binary as the operator's CLI against this stack (output piped,
    /// so never a terminal) and returns its output.
    pub async fn cli(&self, binary: &str, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let path = crate::paths::function_binary(binary)?;
        let env = self.cli_env();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(path)
                .args(args)
                .envs(env)
                .env_remove("AWS_LAMBDA_RUNTIME_API")
                .stdin(std::process::Stdio::null())
                .output()
        })
        .await??;
        Ok(out)
    }

    /// Waits until both functions have drained their queues.
    pub async fn wait_idle(&self, within: Duration) -> anyhow::Result<()> {
        if let Some(p) = &self.sync_poller {
            p.wait_idle(within).await?;
        }
        if let Some(p) = &self.currents_poller {
            p.wait_idle(within).await?;
        }
        Ok(())
    }
}
