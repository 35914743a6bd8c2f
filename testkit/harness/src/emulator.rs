//! A function binary running under cargo-lambda's Lambda runtime emulator
//! (`cargo lambda watch --only-lambda-apis`): the emulator serves the real Lambda runtime API
//! and the Invoke API; we start the prebuilt binary ourselves with `AWS_LAMBDA_RUNTIME_API`
//! pointing at it, exactly as Lambda would.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

use crate::paths;

/// One function under the emulator; both processes are killed when dropped.
pub struct FunctionUnderEmulator {
    emulator: Child,
    function: Child,
    /// The function's name (for logs).
    pub name: String,
    /// `http://127.0.0.1:<port>`, the emulator's Invoke API.
    pub invoke_base: String,
    http: reqwest::Client,
}

/// What one invocation returned.
#[derive(Debug, Clone)]
pub struct InvokeResult {
    /// The emulator's HTTP status.
    pub status: u16,
    /// The function's response payload (or the error document).
    pub body: serde_json::Value,
}

impl InvokeResult {
    /// True when the function returned normally (no `errorType`).
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status) && self.body.get("errorType").is_none()
    }
}

impl FunctionUnderEmulator {
    /// Starts the emulator on a free port and the function binary `name` under it, with the
    /// extra environment `env` (AWS endpoint, function config, ...). Function logs go to
    /// `log_file` when given, else are discarded.
    pub async fn start(
        name: &str,
        env: &[(String, String)],
        log_file: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let port = paths::free_port()?;
        let cargo_lambda = paths::venv_tool("cargo-lambda")?;
        let path_var = format!(
            "{}:{}",
            paths::venv_bin().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let emulator = Command::new(cargo_lambda)
            .args([
                "lambda",
                "watch",
                "--only-lambda-apis",
                "-A",
                "127.0.0.1",
                "-P",
                &port.to_string(),
            ])
            .current_dir(paths::workspace_root())
            .env("PATH", &path_var)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting cargo lambda watch")?;
        wait_port(port, Duration::from_secs(60))
            .await
            .context("the Lambda runtime emulator did not start")?;

        let binary = paths::function_binary(name)?;
        let (out, err) = match log_file {
            Some(p) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?;
                (
                    std::process::Stdio::from(f.try_clone()?),
                    std::process::Stdio::from(f),
                )
            }
            None => (std::process::Stdio::null(), std::process::Stdio::null()),
        };
        let function = Command::new(binary)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(
                "AWS_LAMBDA_RUNTIME_API",
                format!("http://127.0.0.1:{port}/.rt"),
            )
            .env("AWS_LAMBDA_FUNCTION_NAME", "_")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting function {name}"))?;
        Ok(Self {
            emulator,
            function,
            name: name.to_string(),
            invoke_base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(900))
                .build()?,
        })
    }

    /// Invokes the function synchronously with a payload, as the Lambda Invoke API does.
    pub async fn invoke(&self, payload: &serde_json::Value) -> anyhow::Result<InvokeResult> {
        let resp = self
            .http
            .post(format!(
                "{}/2015-03-31/functions/_/invocations",
                self.invoke_base
            ))
            .json(payload)
            .send()
            .await
            .with_context(|| format!("invoking {}", self.name))?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        Ok(InvokeResult { status, body })
    }

    /// Whether the function process is still alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.function.try_wait(), Ok(None))
    }

    /// Stops both processes.
    pub async fn stop(mut self) {
        let _ = self.function.kill().await;
        let _ = self.emulator.kill().await;
    }
}

async fn wait_port(port: u16, within: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("nothing listens on 127.0.0.1:{port}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
