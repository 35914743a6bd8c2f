//! Replays, on stable and in `make test`, the inputs of the `currents_avro` fuzz target
//! (`fuzz/`): its seed corpus must convert, and every input the fuzzer ever crashed or hung on
//! (`fuzz/regressions/currents_avro/`) must end in `Ok` or a clear error — not a panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use currents_normalize::fuzzing::convert_object;

fn inputs(folder: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz")
        .join(folder);
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn the_seed_corpus_converts() {
    let seeds = inputs("corpus/currents_avro");
    assert!(seeds.len() >= 4, "{seeds:?}");
    for (path, bytes) in seeds {
        let (pick, object) = bytes.split_first().unwrap();
        let r = convert_object(*pick, object);
        assert!(
            matches!(r, Ok(Some(n)) if n > 0),
            "{}: {r:?}",
            path.display()
        );
    }
}

#[test]
fn inputs_the_fuzzer_found_end_in_a_result_not_a_panic() {
    for (path, bytes) in inputs("regressions/currents_avro") {
        let Some((pick, object)) = bytes.split_first() else {
            continue;
        };
        let r = std::panic::catch_unwind(|| convert_object(*pick, object));
        assert!(r.is_ok(), "{} panicked", path.display());
    }
}
