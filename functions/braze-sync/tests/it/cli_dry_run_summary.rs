//! `braze-sync run FILE --route R --dry-run --summary`, the binary itself: per attribute how
//! many users would change, be removed or stay, and 5 example payloads instead of every one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

const ROUTE: &str = r#"
name = "t"
prefix = "amperity/t/"
update_existing_only = false
[identifier]
kind = "external_id"
column = "amperity_id"
[attributes.order_count]
type = "Integer"
[attributes.tier]
type = "String"
"#;

const EXPORT: &str = "amperity_id,order_count,tier\nA1,5,gold\nA2,,silver\nA3,7,\n,3,bronze\nA5,1,gold\nA6,2,gold\nA7,3,gold\n";

fn run(args: &[&str]) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!("braze-sync-dry-summary-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("routes")).unwrap();
    std::fs::write(dir.join("routes/t.toml"), ROUTE).unwrap();
    std::fs::write(dir.join("export.csv"), EXPORT).unwrap();
    Command::new(env!("CARGO_BIN_EXE_braze-sync"))
        .current_dir(&dir)
        .args(args)
        .env("ROUTES_LOCATION", dir.join("routes"))
        .env_remove("AWS_LAMBDA_RUNTIME_API")
        .output()
        .unwrap()
}

#[test]
fn summary_prints_counts_per_attribute_and_five_examples_not_every_payload() {
    let out = run(&[
        "run",
        "export.csv",
        "--route",
        "t",
        "--dry-run",
        "--summary",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("Dry run: 7 rows read, 1 rejected; 6 users would be sent (6 new)"),
        "{text}"
    );
    let cols = |name: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no line for {name}: {text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(cols("order_count"), ["order_count", "5", "0", "1"]);
    assert_eq!(cols("tier"), ["tier", "5", "0", "1"]);
    assert!(text.contains("Example payloads (5 of 6):"), "{text}");
    let examples: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .collect();
    assert_eq!(examples.len(), 5, "{text}");
    assert!(examples[0].contains(r#""external_id":"A1""#), "{text}");
    // The rejected row still goes to stderr as NDJSON, with its reason.
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("missing identifier"), "{err}");

    // Without --summary every payload is printed (6 lines and the summary line).
    let full = run(&["run", "export.csv", "--route", "t", "--dry-run"]);
    let full = String::from_utf8(full.stdout).unwrap();
    assert_eq!(
        full.lines().filter(|l| l.contains("external_id")).count(),
        6,
        "{full}"
    );

    // --summary only makes sense with --dry-run.
    let refused = run(&["run", "export.csv", "--route", "t", "--summary"]);
    assert!(!refused.status.success());
}
