//! The docs and the code agree. Every environment variable the functions read, every route
//! key, every EMF metric, every alarm in `template.yaml` and every run, ledger and outcome
//! status the code knows is listed in a reference table of the README or `docs/`; every name
//! those tables list exists in the code; and the dead-letter receive count the docs state is
//! the `maxReceiveCount` of `template.yaml` (and of the CDK construct). Every source file
//! (`*.rs`) the docs name, and every folder `docs/architecture.md` and `docs/development.md`
//! name, exists, and so does every `make` target they name.
//!
//! A reference table is the markdown table right after a `<!-- reference: KIND -->` line; its
//! first column names the items in backticks. Route keys are the generated reference of
//! `functions/braze-sync/routes/README.md`. The code side is read from the sources (no build
//! of the other function, no network), so moving a file does not break the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Markdown files that may hold reference tables or state the receive count.
const DOCS: &[&str] = &[
    "README.md",
    "docs/architecture.md",
    "docs/runbook.md",
    "docs/benchmarks.md",
    "docs/development.md",
    "functions/braze-sync/routes/README.md",
    "functions/currents-normalize/README.md",
    "infra/README.md",
];

const BRAZE_SYNC: &str = "functions/braze-sync/src";
const CURRENTS: &str = "functions/currents-normalize/src";
const SHARED: &str = "shared/src";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The docs side

/// One reference table: its kind, the file it is in, and the names of its first column.
struct Reference {
    file: &'static str,
    names: BTreeSet<String>,
}

/// Every `<!-- reference: KIND -->` table in [`DOCS`], by kind.
fn references() -> BTreeMap<String, Reference> {
    let mut out: BTreeMap<String, Reference> = BTreeMap::new();
    for &file in DOCS {
        let text = read(file);
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(kind) = line
                .trim()
                .strip_prefix("<!-- reference:")
                .and_then(|r| r.strip_suffix("-->"))
            else {
                continue;
            };
            let kind = kind.trim().to_string();
            let rows = lines[i + 1..]
                .iter()
                .skip_while(|l| l.trim().is_empty())
                .take_while(|l| l.trim_start().starts_with('|'))
                .skip(2); // header and separator
            let names: BTreeSet<String> =
                rows.flat_map(|row| backticked(first_cell(row))).collect();
            assert!(
                !names.is_empty(),
                "{file}: the table after `<!-- reference: {kind} -->` lists no `names`"
            );
            if let Some(prev) = out.insert(kind.clone(), Reference { file, names }) {
                panic!(
                    "two tables are marked `<!-- reference: {kind} -->` ({} and {file}); keep one",
                    prev.file
                );
            }
        }
    }
    out
}

fn reference<'a>(refs: &'a BTreeMap<String, Reference>, kind: &str) -> &'a Reference {
    refs.get(kind).unwrap_or_else(|| {
        panic!(
            "no table is marked `<!-- reference: {kind} -->` in README.md or docs/ (put the marker \
             on the line before the table)"
        )
    })
}

fn first_cell(row: &str) -> &str {
    row.trim()
        .trim_start_matches('|')
        .split('|')
        .next()
        .unwrap_or("")
}

fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Where a missing item should go, for failure messages.
fn place(refs: &BTreeMap<String, Reference>, kind: &str) -> String {
    match refs.get(kind) {
        Some(r) => format!("the table after `<!-- reference: {kind} -->` in {}", r.file),
        None => format!("a table marked `<!-- reference: {kind} -->`"),
    }
}

// ---------------------------------------------------------------------------------------------
// The code side

/// Every `.rs` file under `dir` (relative to the workspace root), as (path, production text):
/// comment lines, the trailing `#[cfg(test)] mod` and `tests.rs` files are left out.
fn sources(dir: &str) -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs")
                && p.file_name().is_none_or(|f| f != "tests.rs")
            {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root().join(dir), &mut files);
    assert!(!files.is_empty(), "no Rust sources under {dir}");
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (format!("{dir}/{}", rel_to(&p, dir)), production(&text))
        })
        .collect()
}

fn rel_to(p: &Path, dir: &str) -> String {
    p.strip_prefix(root().join(dir))
        .map(|r| r.display().to_string())
        .unwrap_or_else(|_| p.display().to_string())
}

/// The text of a source file without comment lines and without its test module (clippy's
/// `items_after_test_module` keeps that module last).
fn production(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut end = lines.len();
    for (i, l) in lines.iter().enumerate() {
        if l.trim() == "#[cfg(test)]" {
            let next = lines[i + 1..]
                .iter()
                .map(|l| l.trim())
                .find(|l| !l.starts_with("#["));
            if next.is_some_and(|n| n.starts_with("mod ") || n.starts_with("pub mod ")) {
                end = i;
                break;
            }
        }
    }
    lines[..end]
        .iter()
        .filter(|l| !l.trim_start().starts_with("//"))
        .copied()
        .collect::<Vec<_>>()
        .join("\n")
}

/// String literals of one line, with the text before each (char literals and escapes skipped).
fn literals(line: &str) -> Vec<(&str, &str)> {
    let b = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' if b.get(i + 2) == Some(&b'\'') => i += 3,
            b'\'' if b.get(i + 1) == Some(&b'\\') && b.get(i + 3) == Some(&b'\'') => i += 4,
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                if j >= b.len() {
                    break;
                }
                out.push((&line[..i], &line[i + 1..j]));
                i = j + 1;
            }
            _ => i += 1,
        }
    }
    out
}

fn env_shaped(s: &str) -> bool {
    s.contains('_')
        && s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.split('_').all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        })
}

/// Environment variables the sources under `dir` read, with a file that names each. A
/// variable is a string literal shaped like one (`UPPER_CASE`), except those given to
/// `env!`/`option_env!` (compile time) or to `.env(..)` (set for a child process); `RUST_LOG`
/// is read by `tracing_subscriber`'s `EnvFilter::from_default_env`.
fn env_vars(dir: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (file, text) in sources(dir) {
        for line in text.lines() {
            for (before, lit) in literals(line) {
                let b = before.trim_end();
                if env_shaped(lit)
                    && !b.ends_with("env!(")
                    && !b.ends_with(".env(")
                    && !b.ends_with("option_env!(")
                {
                    out.entry(lit.to_string()).or_insert_with(|| file.clone());
                }
            }
        }
        if text.contains("from_default_env") {
            out.entry("RUST_LOG".to_string())
                .or_insert_with(|| file.clone());
        }
    }
    out
}

/// EMF metric names the sources under `dir` emit: the names of `("name", Metric::..)` pairs
/// (or `("name", c(..))`, a local `Metric` constructor) in files that use `Metric`.
fn metric_names(dir: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (file, text) in sources(dir) {
        if !text.contains("Metric::") {
            continue;
        }
        let flat: String = text.split_whitespace().collect::<Vec<_>>().join("");
        let mut rest = flat.as_str();
        while let Some(i) = rest.find("(\"") {
            let after = &rest[i + 2..];
            let Some(j) = after.find('"') else { break };
            let name = &after[..j];
            let tail = &after[j + 1..];
            if (tail.starts_with(",Metric::") || tail.starts_with(",c("))
                && !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                out.entry(name.to_string()).or_insert_with(|| file.clone());
            }
            rest = after;
        }
    }
    out
}

/// The serialized names (`snake_case`) of the variants of `pub enum NAME` under `dir`, and
/// the file that defines it.
fn enum_variants(dir: &str, name: &str) -> (String, BTreeSet<String>) {
    let header = format!("pub enum {name} {{");
    let found: Vec<(String, String)> = sources(dir)
        .into_iter()
        .filter(|(_, t)| t.contains(&header))
        .collect();
    assert!(
        found.len() == 1,
        "expected one `{header}` under {dir}, found {:?}",
        found.iter().map(|(f, _)| f).collect::<Vec<_>>()
    );
    let (file, text) = &found[0];
    let start = text.find(&header).unwrap();
    let attrs = &text[text[..start].rfind("\n\n").unwrap_or(0)..start];
    assert!(
        attrs.contains("rename_all = \"snake_case\""),
        "{file}: `{name}` no longer serializes as snake_case; teach docs_agree.rs its names"
    );
    let mut names = BTreeSet::new();
    let mut depth = 1i32;
    let mut rename: Option<String> = None;
    for line in text[start + header.len()..].lines() {
        let t = line.trim();
        if depth == 1 {
            if t.starts_with('}') {
                break;
            }
            if let Some(r) = t.strip_prefix("#[serde(rename = \"") {
                rename = r.split('"').next().map(str::to_string);
            } else if t.starts_with(|c: char| c.is_ascii_uppercase()) {
                let ident: String = t
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .collect();
                names.insert(rename.take().unwrap_or_else(|| snake_case(&ident)));
            }
        }
        depth += t.matches(['{', '(']).count() as i32 - t.matches(['}', ')']).count() as i32;
    }
    assert!(!names.is_empty(), "{file}: no variants found in `{name}`");
    (file.clone(), names)
}

fn snake_case(ident: &str) -> String {
    let mut out = String::new();
    for (i, c) in ident.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Route keys: the serde names of the fields of every `#[serde(deny_unknown_fields)]` struct
/// in the file that defines `RouteConfig`, with that file.
fn route_keys() -> (String, BTreeSet<String>) {
    let (file, text) = sources(BRAZE_SYNC)
        .into_iter()
        .find(|(_, t)| t.contains("pub struct RouteConfig {"))
        .expect("`pub struct RouteConfig` under functions/braze-sync/src");
    let mut keys = BTreeSet::new();
    let mut structs = 0;
    for (i, _) in text.match_indices("#[serde(deny_unknown_fields)]") {
        let rest = &text[i..];
        let Some(open) = rest.find("pub struct ") else {
            continue;
        };
        let body = &rest[open..];
        let body = &body[..body.find("\n}").unwrap_or(body.len())];
        structs += 1;
        let mut rename: Option<String> = None;
        for line in body.lines().skip(1) {
            let t = line.trim();
            if let Some(r) = t.strip_prefix("#[serde(rename = \"") {
                rename = r.split('"').next().map(str::to_string);
            } else if let Some(f) = t.strip_prefix("pub ") {
                let field = f.split(':').next().unwrap_or("").trim().to_string();
                keys.insert(rename.take().unwrap_or(field));
            }
        }
    }
    assert!(
        structs >= 2 && keys.contains("prefix"),
        "{file}: route structs not found"
    );
    (file, keys)
}

/// The route keys documented in the generated reference of `routes/README.md`.
fn documented_route_keys() -> (&'static str, BTreeSet<String>) {
    let file = "functions/braze-sync/routes/README.md";
    let text = read(file);
    let (begin, end) = (
        "<!-- config-reference:begin -->",
        "<!-- config-reference:end -->",
    );
    let a = text.find(begin).expect("config-reference:begin marker") + begin.len();
    let b = text.find(end).expect("config-reference:end marker");
    let keys = text[a..b]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .flat_map(|l| backticked(first_cell(l)))
        .collect();
    (file, keys)
}

/// Logical ids of the `AWS::CloudWatch::Alarm` resources of `template.yaml`.
fn template_alarms() -> BTreeSet<String> {
    let text = read("template.yaml");
    let lines: Vec<&str> = text.lines().collect();
    let alarms: BTreeSet<String> = lines
        .windows(2)
        .filter(|w| w[1].trim() == "Type: AWS::CloudWatch::Alarm")
        .filter_map(|w| {
            let id = w[0].strip_prefix("  ")?.strip_suffix(':')?;
            (!id.starts_with(' ')).then(|| id.to_string())
        })
        .collect();
    assert!(
        !alarms.is_empty(),
        "template.yaml: no AWS::CloudWatch::Alarm found"
    );
    alarms
}

/// Every `maxReceiveCount: N` in `rel`.
fn max_receive_counts(rel: &str) -> Vec<u32> {
    read(rel)
        .lines()
        .filter_map(|l| l.split("maxReceiveCount:").nth(1))
        .map(|v| {
            v.trim()
                .trim_end_matches([',', '}'])
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{rel}: maxReceiveCount `{v}` is not a number"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The checks

/// `code` (name → file) and the documented names agree both ways; messages say where to fix.
fn agree(
    what: &str,
    code: &BTreeMap<String, String>,
    documented: &BTreeSet<String>,
    doc_place: &str,
) -> Vec<String> {
    let mut errors = Vec::new();
    for (name, file) in code {
        if !documented.contains(name) {
            errors.push(format!(
                "{what} `{name}` (in {file}) is not documented: add a row for it to {doc_place}"
            ));
        }
    }
    for name in documented {
        if !code.contains_key(name) {
            errors.push(format!(
                "{what} `{name}` is listed in {doc_place} but the code has none: remove the row \
                 or fix its name"
            ));
        }
    }
    errors
}

fn report(errors: Vec<String>) {
    assert!(
        errors.is_empty(),
        "the docs and the code disagree:\n  - {}",
        errors.join("\n  - ")
    );
}

#[test]
fn every_environment_variable_is_documented_and_every_documented_one_is_read() {
    let refs = references();
    let braze = env_vars(BRAZE_SYNC);
    let currents = env_vars(CURRENTS);
    let shared = env_vars(SHARED);
    for (set, probe) in [(&braze, "STATE_BUCKET"), (&currents, "TABLES_BUCKET")] {
        assert!(
            set.contains_key(probe),
            "the variable scan lost {probe}: {set:?}"
        );
    }
    let dev = &reference(&refs, "env development").names;
    let braze_doc = &reference(&refs, "env braze-sync").names;
    let currents_doc = &reference(&refs, "env currents-normalize").names;
    let mut errors = Vec::new();

    // Code → docs: each function's variables in its table, or in the development table.
    let documented =
        |table: &BTreeSet<String>| -> BTreeSet<String> { table.union(dev).cloned().collect() };
    for (set, kind, table) in [
        (&braze, "env braze-sync", braze_doc),
        (&currents, "env currents-normalize", currents_doc),
    ] {
        for (name, file) in set {
            if !documented(table).contains(name) {
                errors.push(format!(
                    "environment variable `{name}` (read in {file}) is not documented: add a row \
                     to {} (or, if only local runs and benchmarks read it, to {})",
                    place(&refs, kind),
                    place(&refs, "env development")
                ));
            }
        }
    }
    let all_doc: BTreeSet<String> = braze_doc.union(currents_doc).chain(dev).cloned().collect();
    for (name, file) in &shared {
        if !all_doc.contains(name) {
            errors.push(format!(
                "environment variable `{name}` (read in {file}) is not documented: add a row to \
                 the table of each function that reads it ({}, {}) or to {}",
                place(&refs, "env braze-sync"),
                place(&refs, "env currents-normalize"),
                place(&refs, "env development")
            ));
        }
    }

    // Docs → code: each table names only variables its side reads.
    for (kind, table, sides) in [
        ("env braze-sync", braze_doc, vec![&braze, &shared]),
        (
            "env currents-normalize",
            currents_doc,
            vec![&currents, &shared],
        ),
        ("env development", dev, vec![&braze, &currents, &shared]),
    ] {
        for name in table {
            if !sides.iter().any(|s| s.contains_key(name)) {
                errors.push(format!(
                    "environment variable `{name}` is listed in {} but no code there reads it: \
                     remove the row or fix its name",
                    place(&refs, kind)
                ));
            }
        }
    }
    report(errors);
}

#[test]
fn every_route_key_is_documented_and_every_documented_one_exists() {
    let (file, keys) = route_keys();
    let (doc, documented) = documented_route_keys();
    let code: BTreeMap<String, String> = keys.into_iter().map(|k| (k, file.clone())).collect();
    report(agree(
        "route key",
        &code,
        &documented,
        &format!(
            "the reference in {doc} (regenerate it: UPDATE_README=1 cargo test -p braze-sync \
             --test it route_config)"
        ),
    ));
}

#[test]
fn every_emitted_metric_is_documented_and_every_documented_one_is_emitted() {
    let refs = references();
    let braze = metric_names(BRAZE_SYNC);
    let currents = metric_names(CURRENTS);
    for (set, probe) in [
        (&braze, "rows_in"),
        (&braze, "departures_held"),
        (&currents, "RowsWritten"),
        (&currents, "TableDaysCompacted"),
    ] {
        assert!(
            set.contains_key(probe),
            "the metric scan lost {probe} (has the EMF emitter changed shape? teach \
             metric_names() in docs_agree.rs): {set:?}"
        );
    }
    let mut errors = Vec::new();
    for (kind, code) in [
        ("metrics braze-sync", &braze),
        ("metrics currents-normalize", &currents),
    ] {
        errors.extend(agree(
            "metric",
            code,
            &reference(&refs, kind).names,
            &place(&refs, kind),
        ));
    }
    report(errors);
}

#[test]
fn every_alarm_in_the_template_is_in_the_runbook_and_every_documented_one_exists() {
    let refs = references();
    let code: BTreeMap<String, String> = template_alarms()
        .into_iter()
        .map(|a| (a, "template.yaml".to_string()))
        .collect();
    report(agree(
        "alarm",
        &code,
        &reference(&refs, "alarms").names,
        &place(&refs, "alarms"),
    ));
}

#[test]
fn every_status_is_documented_and_every_documented_one_exists() {
    let refs = references();
    let mut errors = Vec::new();
    for (kind, dir, enum_name) in [
        ("run-status", BRAZE_SYNC, "RunStatus"),
        ("ledger-status", BRAZE_SYNC, "LedgerStatus"),
        ("currents-outcome", CURRENTS, "Outcome"),
        ("compaction-outcome", CURRENTS, "DayOutcome"),
    ] {
        let (file, names) = enum_variants(dir, enum_name);
        let code: BTreeMap<String, String> = names
            .into_iter()
            .map(|n| (n, format!("{file}, `{enum_name}`")))
            .collect();
        errors.extend(agree(
            "status",
            &code,
            &reference(&refs, kind).names,
            &place(&refs, kind),
        ));
    }
    report(errors);
}

#[test]
fn the_dead_letter_receive_count_in_the_docs_is_the_templates() {
    let template = max_receive_counts("template.yaml");
    assert!(!template.is_empty(), "template.yaml has no maxReceiveCount");
    let count = template[0];
    assert!(
        template.iter().all(|&c| c == count),
        "template.yaml's queues disagree on maxReceiveCount: {template:?}"
    );
    // The function is told the same count, to report a message on its last receive.
    let told: Vec<String> = read("template.yaml")
        .lines()
        .filter_map(|l| l.split("BRIDGE_MAX_RECEIVE_COUNT:").nth(1))
        .map(|v| v.trim().trim_matches('"').to_string())
        .collect();
    assert_eq!(
        told,
        vec![count.to_string()],
        "template.yaml must tell braze-sync its queue's maxReceiveCount: BRIDGE_MAX_RECEIVE_COUNT: \"{count}\""
    );
    let cdk = max_receive_counts("infra/lib/braze-bridge.ts");
    assert!(
        !cdk.is_empty() && cdk.iter().all(|&c| c == count),
        "infra/lib/braze-bridge.ts says maxReceiveCount {cdk:?}, template.yaml {count}: make them equal"
    );

    const WORDS: &[(&str, u32)] = &[
        ("one", 1),
        ("two", 2),
        ("three", 3),
        ("four", 4),
        ("five", 5),
        ("six", 6),
        ("seven", 7),
        ("eight", 8),
        ("nine", 9),
        ("ten", 10),
    ];
    let mut stated = 0;
    let mut errors = Vec::new();
    for &file in DOCS {
        let text = read(file);
        for (i, _) in text.match_indices("receives") {
            // The number a few words before "receives": "5 receives", "its 5 failed receives".
            let before = &text[text[..i].char_indices().rev().nth(24).map_or(0, |(j, _)| j)..i];
            let said = before
                .split(|c: char| !c.is_ascii_alphanumeric())
                .filter_map(|w| {
                    w.parse::<u32>().ok().or_else(|| {
                        WORDS
                            .iter()
                            .find(|(word, _)| w.eq_ignore_ascii_case(word))
                            .map(|&(_, n)| n)
                    })
                })
                .next_back();
            if let Some(n) = said {
                stated += 1;
                if n != count {
                    let line = text[..i].lines().count();
                    errors.push(format!(
                        "{file}:{line} says a message goes to the dead-letter queue after {n} \
                         receives; template.yaml's maxReceiveCount is {count}: write {count}"
                    ));
                }
            }
        }
    }
    assert!(
        stated > 0,
        "no doc states the dead-letter receive count ({count} receives); the runbook should"
    );
    report(errors);
}

/// Where a path the docs name may be rooted.
const PATH_BASES: &[&str] = &[
    "",
    "functions/braze-sync/src",
    "functions/braze-sync",
    "functions/currents-normalize/src",
    "functions/currents-normalize",
    "testkit/harness/src",
    "testkit/harness",
];

/// Whether `name` (no `/`) is a file anywhere under the workspace's code folders.
fn file_named(name: &str) -> bool {
    fn walk(dir: &Path, name: &str) -> bool {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        entries.flatten().any(|e| {
            let p = e.path();
            if p.is_dir() {
                !p.ends_with("target") && !p.ends_with("node_modules") && walk(&p, name)
            } else {
                p.file_name().is_some_and(|f| f == name)
            }
        })
    }
    ["functions", "shared", "testkit", "fuzz"]
        .iter()
        .any(|d| walk(&root().join(d), name))
}

#[test]
fn every_source_file_and_folder_the_docs_name_exists() {
    let mut errors = BTreeSet::new();
    for &file in DOCS {
        // Folders are checked where the docs walk the code; elsewhere a `name/` is usually an
        // S3 prefix.
        let folders = matches!(file, "docs/architecture.md" | "docs/development.md");
        for token in backticked(&read(file)) {
            let wanted =
                token.ends_with(".rs") || (folders && token.len() > 1 && token.ends_with('/'));
            if !wanted || token.contains(|c: char| c.is_whitespace() || "<>*:${".contains(c)) {
                continue;
            }
            let path = token.trim_end_matches('/');
            let found = if path.contains('/') {
                PATH_BASES
                    .iter()
                    .any(|b| root().join(b).join(path).exists())
            } else if token.ends_with('/') {
                PATH_BASES
                    .iter()
                    .any(|b| root().join(b).join(path).is_dir())
            } else {
                file_named(path)
            };
            if !found {
                errors.insert(format!(
                    "{file} names `{token}`, which is not in the repository: fix the path"
                ));
            }
        }
    }
    report(errors.into_iter().collect());
}

#[test]
fn every_make_target_the_docs_name_exists() {
    let makefile = read("Makefile");
    let targets: BTreeSet<&str> = makefile
        .lines()
        .filter(|l| !l.starts_with(['\t', ' ', '#', '.']))
        .filter_map(|l| l.split_once(':').map(|(t, _)| t.trim()))
        .filter(|t| !t.is_empty() && !t.contains(['=', '$', ' ']))
        .collect();
    assert!(
        targets.contains("test"),
        "no targets read from the Makefile"
    );
    let mut errors = BTreeSet::new();
    for &file in DOCS {
        for token in backticked(&read(file)) {
            let Some(rest) = token.strip_prefix("make ") else {
                continue;
            };
            for target in rest
                .split_whitespace()
                .filter(|w| !w.contains('=') && *w != "/")
            {
                if !targets.contains(target) {
                    errors.insert(format!(
                        "{file} names `make {target}`, which the Makefile does not have"
                    ));
                }
            }
        }
    }
    report(errors.into_iter().collect());
}
