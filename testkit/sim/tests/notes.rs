//! A replay with notes (braze-sync's logs, watched users) takes the same path as one without:
//! the same events, digest, figures and violations, and the notes beside them.
#![allow(clippy::unwrap_used)]

use sim::{Options, run_seed};

/// Whether a kept trace line is a note (after its virtual time).
fn is_note(line: &str) -> bool {
    let text = line.trim_start().split_once(' ').map_or("", |(_, t)| t);
    text.starts_with("watch ") || text.starts_with("log ")
}

#[test]
fn notes_leave_the_replay_unchanged() {
    sim::notes::install_log("info").unwrap();
    // Seed 15 fans out with crashes and lost answers; the user is in its members exports.
    let seed = 15;
    let plain = run_seed(
        seed,
        &Options {
            trace: true,
            ..Options::default()
        },
    );
    let noted = run_seed(
        seed,
        &Options {
            trace: true,
            log: true,
            watch: vec!["m0003".into()],
            ..Options::default()
        },
    );
    assert_eq!(plain.trace_digest, noted.trace_digest);
    assert_eq!(
        serde_json::to_string(&plain.stats).unwrap(),
        serde_json::to_string(&noted.stats).unwrap()
    );
    assert_eq!(plain.violations, noted.violations);
    let events: Vec<&String> = noted.trace.iter().filter(|l| !is_note(l)).collect();
    assert_eq!(events.len(), plain.trace.len());
    assert!(events.iter().zip(&plain.trace).all(|(a, b)| *a == b));
    let notes: Vec<&String> = noted.trace.iter().filter(|l| is_note(l)).collect();
    assert!(
        notes
            .iter()
            .any(|l| l.contains("log ") && l.contains("braze_sync::")),
        "braze-sync's logs are noted"
    );
    assert!(
        notes
            .iter()
            .any(|l| l.contains("watch m0003 in members/run-000/.DONE")),
        "the watched user's rows are noted"
    );
    assert!(
        notes
            .iter()
            .any(|l| l.contains("watch after inv") && l.contains("m0003=")),
        "the watched user's state is noted"
    );
}
