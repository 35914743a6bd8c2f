//! Replays, on stable and in `make test`, the inputs of the braze-sync fuzz targets (`fuzz/`,
//! run by `make fuzz`): the seed corpus must read (or fail with a clear error), and every input
//! a target ever crashed or hung on (`fuzz/regressions/<target>/`) must end in a result, never
//! a panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use braze_sync::fuzzing::export_through_mapper;

fn inputs(folder: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz")
        .join(folder);
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.ends_with(".keep"))
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    out.sort();
    out
}

fn export(bytes: &[u8]) -> Option<Result<String, String>> {
    let (selector, body) = bytes.split_first()?;
    Some(export_through_mapper(*selector, body))
}

#[test]
fn the_export_seed_corpus_reads_through_the_mapper() {
    let seeds = inputs("corpus/export_reader");
    assert!(seeds.len() >= 10, "{seeds:?}");
    for (path, bytes) in seeds {
        let r = export(&bytes).unwrap();
        assert!(
            matches!(&r, Ok(s) if !s.starts_with("0 deltas")),
            "{}: {r:?}",
            path.display()
        );
    }
}

#[test]
fn export_inputs_the_fuzzer_found_end_in_a_result_not_a_panic() {
    for (path, bytes) in inputs("regressions/export_reader") {
        let r = std::panic::catch_unwind(|| export(&bytes));
        assert!(r.is_ok(), "{} panicked", path.display());
    }
}

#[test]
fn trigger_and_route_inputs_end_in_a_result_not_a_panic() {
    for folder in [
        "corpus/trigger_event",
        "regressions/trigger_event",
        "corpus/route_toml",
        "regressions/route_toml",
    ] {
        for (path, bytes) in inputs(folder) {
            let r = std::panic::catch_unwind(|| {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                    let _ = bridge_shared::trigger::parse_invocation(&v);
                }
                if let Ok(text) = std::str::from_utf8(&bytes) {
                    let _ = bridge_shared::trigger::decode_s3_key(text);
                    if let Ok(route) = braze_sync::route::Route::from_toml(text, "fuzz.toml") {
                        let _ = route.read_options();
                        let _ = route.binding();
                    }
                }
            });
            assert!(r.is_ok(), "{} panicked", path.display());
        }
    }
    // The seeds are real: every trigger shape parses, every demo route loads.
    for (path, bytes) in inputs("corpus/trigger_event") {
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert!(
            bridge_shared::trigger::parse_invocation(&v).is_ok(),
            "{}",
            path.display()
        );
    }
    for (path, bytes) in inputs("corpus/route_toml") {
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(
            braze_sync::route::Route::from_toml(text, "t").is_ok(),
            "{}",
            path.display()
        );
    }
}
