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
                    if let Ok(route) =
                        braze_sync::config::route::Route::from_toml(text, "fuzz.toml")
                    {
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
            braze_sync::config::route::Route::from_toml(text, "t").is_ok(),
            "{}",
            path.display()
        );
    }
}

/// Not coverage-guided: random byte mutations (flip, insert, delete, splice, truncate) of the
/// export seed corpus through the mapper, for `MUTATE_SECONDS` (default 5). A stand-in where
/// `make fuzz` cannot build; any panic is a finding (save the input to
/// `fuzz/regressions/export_reader/`). `cargo test -p braze-sync --test it fuzz_regressions --
/// --ignored`.
#[test]
#[ignore]
fn mutated_seeds_end_in_a_result_not_a_panic() {
    let seeds = inputs("corpus/export_reader");
    let secs: u64 = std::env::var("MUTATE_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut runs = 0u64;
    while std::time::Instant::now() < end {
        let (_, seed) = &seeds[(next() as usize) % seeds.len()];
        let mut b = seed.clone();
        for _ in 0..=(next() % 8) {
            if b.len() < 2 {
                break;
            }
            let i = 1 + (next() as usize) % (b.len() - 1);
            match next() % 5 {
                0 => b[i] ^= 1 << (next() % 8),
                1 => b.insert(i, next() as u8),
                2 => {
                    b.remove(i);
                }
                3 => b.truncate(i),
                _ => {
                    let (_, other) = &seeds[(next() as usize) % seeds.len()];
                    let j = (next() as usize) % other.len();
                    b.splice(i..i, other[j..].iter().take(64).copied());
                }
            }
        }
        if next() % 4 == 0 {
            b[0] = next() as u8;
        }
        let r = std::panic::catch_unwind(|| export(&b));
        if r.is_err() {
            let path = std::env::temp_dir().join(format!("export-reader-crash-{runs}"));
            std::fs::write(&path, &b).unwrap();
            panic!("panicked; input saved to {}", path.display());
        }
        runs += 1;
    }
    eprintln!("{runs} mutated inputs in {secs} s");
}
