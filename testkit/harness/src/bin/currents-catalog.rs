//! Regenerates the catalog of the Currents tables from the registry: the Glue tables in
//! `template.yaml`, `infra/lib/glue-tables.generated.json` for the CDK construct, and
//! `functions/currents-normalize/AMPERITY.md`. `--check` only reports what is out of date.

use std::process::ExitCode;

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let root = harness::catalog::repo_root();
    let files = match harness::catalog::generated(&root) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("currents-catalog: {e}");
            return ExitCode::from(2);
        }
    };
    let mut stale = 0;
    for (path, want) in files {
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have == want {
            continue;
        }
        stale += 1;
        if check {
            eprintln!("out of date: {}", path.display());
        } else if let Err(e) = std::fs::write(&path, want) {
            eprintln!("currents-catalog: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        } else {
            println!("wrote {}", path.display());
        }
    }
    if check && stale > 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
