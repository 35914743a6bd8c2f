//! The bounded path end to end under a memory limit, in `make test` (small; the 1M/10M
//! figures are `make bench`'s `sync-scale-bench`): the bench's worker, a child process under
//! `prlimit --as=512 MB`, syncs a 100,000-user route whose state is laid out in 16 hash
//! ranges (a first sync, then an export with 2% changed, 0.5% new, 0.5% gone), through the
//! bounded diff and the ranged commit, over a file-backed state store.
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
            "100000",
            "--range-users",
            "6250",
            "--limit-mb",
            "512",
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
    assert_eq!(figures["users"], 100_000);
    assert!(
        figures["peak_rss_mb"].as_f64().unwrap() < 512.0,
        "{figures}"
    );
    assert!(stdout.contains("(16 ranges)"), "{stdout}");
    assert!(stdout.contains("16 range deltas, 0 bases"), "{stdout}");
}
