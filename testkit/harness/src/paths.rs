//! Where the workspace, the project venv and the built function binaries are.

use std::path::PathBuf;

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .unwrap_or(here)
}

/// The project venv's `bin/` folder (created by `make venv`).
pub fn venv_bin() -> PathBuf {
    workspace_root().join(".venv").join("bin")
}

/// A tool from the project venv, with a clear error when the venv is missing.
pub fn venv_tool(name: &str) -> anyhow::Result<PathBuf> {
    let p = venv_bin().join(name);
    if p.exists() {
        Ok(p)
    } else {
        anyhow::bail!(
            "{} not found: run `make venv` first (it installs testkit/requirements.txt into .venv)",
            p.display()
        )
    }
}

/// The cargo target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A built function binary (`target/debug/<name>`), with a clear error when it is missing.
pub fn function_binary(name: &str) -> anyhow::Result<PathBuf> {
    let profile = std::env::var("BRIDGE_PROFILE").unwrap_or_else(|_| "debug".into());
    let p = target_dir().join(profile).join(name);
    if p.exists() {
        Ok(p)
    } else {
        anyhow::bail!(
            "{} not built: run `cargo build --bins` (make test does it)",
            p.display()
        )
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
