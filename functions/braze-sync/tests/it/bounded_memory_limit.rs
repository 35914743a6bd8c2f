//! The bounded path end to end under a memory limit, in `make test` (small; the 1M/10M
//! figures are `make bench`'s `sync-scale-bench`): the bench syncs a 50,000-user route
//! whose state is laid out in 16 hash ranges, over a file-backed store: its first sync as
//! Lambda runs it (the real handler in a child process, `MemorySize` 512, Braze answering at
//! once so one invocation does it), then an export with 2% changed, 0.5% new, 0.5% gone
//! through the bench's worker, a child process under `prlimit --as=512 MB` (the bounded
//! diff and the ranged commit).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;

#[test]
fn a_route_in_many_ranges_syncs_under_a_512_mb_address_space_limit() {
    if std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("prlimit (util-linux) is not installed: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("figures.json");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_sync-scale-bench"))
        .args([
            "--users",
            "50000",
            "--range-users",
            "3125",
            "--limit-mb",
            "512",
            "--invocations",
            "0",
        ])
        .arg("--out")
        .arg(&out)
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let figures: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(figures["users"], 50_000);
    assert!(
        figures["peak_rss_mb"].as_f64().unwrap() < 512.0,
        "{figures}"
    );
    // The first sync ran as Lambda runs it, the whole process within 80% of MemorySize.
    assert_eq!(figures["first_sync_invocations"], 1, "{figures}");
    assert!(
        figures["first_sync_peak_rss_mb"].as_f64().unwrap() <= 410.0,
        "{figures}"
    );
    assert!(stdout.contains("(16 ranges)"), "{stdout}");
    assert!(stdout.contains("16 range deltas, 0 bases"), "{stdout}");
}
