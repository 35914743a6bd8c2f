//! The crate's modules import each other without a loop, and its stages keep the layering
//! `lib.rs` states. Read from the sources: every file under `src/` (binaries excepted) is a
//! module; each `crate::…` and `super::…` path in its production code (comments and
//! `#[cfg(test)]` modules left out) is an edge to the longest module that path names. A
//! folder's `mod.rs` reaching its own children by their bare names is not an edge: a parent
//! declaring its children is not a dependency loop.
//!
//! Two graphs must be acyclic: the file graph (`diff::in_memory` → `diff::export`) and the
//! stage graph (`diff` → `state`, the top-level modules). And every stage edge must go to a
//! stage on an earlier layer of the `layers:` line of `lib.rs`'s docs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;
type Graph = BTreeMap<Module, BTreeSet<Module>>;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every module file under `src/` (not `lib.rs`, `main.rs` or `bin/`), with its module path.
fn module_files() -> Vec<(Module, PathBuf)> {
    fn walk(dir: &Path, into: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, into);
            } else if path.extension().is_some_and(|e| e == "rs") {
                into.push(path);
            }
        }
    }
    let root = src();
    let mut files = Vec::new();
    walk(&root, &mut files);
    let mut out = Vec::new();
    for path in files {
        let rel = path.strip_prefix(&root).unwrap();
        let mut parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        if parts[0] == "bin" || parts == ["lib.rs"] || parts == ["main.rs"] {
            continue;
        }
        let last = parts.pop().unwrap();
        let stem = last.trim_end_matches(".rs").to_string();
        if stem != "mod" {
            parts.push(stem);
        }
        out.push((parts, path));
    }
    out.sort();
    out
}

/// `text` without comments, string literals and `#[cfg(test)]` modules.
fn production_code(text: &str) -> String {
    // Comments, strings and character literals first, so braces inside them do not count.
    let s: Vec<char> = text.chars().collect();
    let starts = |i: usize, pat: &str| {
        pat.chars()
            .enumerate()
            .all(|(k, c)| s.get(i + k) == Some(&c))
    };
    let mut code = String::with_capacity(text.len());
    let mut i = 0;
    while i < s.len() {
        if starts(i, "//") {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if starts(i, "/*") {
            i += 2;
            while i < s.len() && !starts(i, "*/") {
                i += 1;
            }
            i += 2;
        } else if starts(i, "r#\"") {
            i += 3;
            while i < s.len() && !starts(i, "\"#") {
                i += 1;
            }
            i += 2;
            code.push_str("\"\"");
        } else if s[i] == '"' {
            i += 1;
            while i < s.len() && s[i] != '"' {
                i += if s[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            code.push_str("\"\"");
        } else if s[i] == '\'' && s.get(i + 1) == Some(&'\\') {
            // An escaped character literal: `'\''`, `'\\'`, `'\u{7f}'`.
            i += 3;
            while i < s.len() && s[i] != '\'' {
                i += 1;
            }
            i += 1;
            code.push_str("' '");
        } else if s[i] == '\'' && s.get(i + 2) == Some(&'\'') {
            i += 3;
            code.push_str("' '");
        } else {
            code.push(s[i]);
            i += 1;
        }
    }
    // Then every `#[cfg(test)]` item that opens a block (test modules, test-only impls).
    let mut out = String::with_capacity(code.len());
    let mut rest = code.as_str();
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let (Some(open), semi) = (after.find('{'), after.find(';')) else {
            rest = &after["#[cfg(test)]".len()..];
            continue;
        };
        if semi.is_some_and(|s| s < open) {
            // `#[cfg(test)] use …;` or `mod x;`: drop that item only.
            rest = &after[semi.unwrap() + 1..];
            continue;
        }
        let mut depth = 0usize;
        let mut end = after.len();
        for (k, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Every path written as `crate::a::b…` or `super::…`, with use-groups expanded, each as the
/// absolute segments it names (`super` resolved against `module`: in `a/b.rs` and in
/// `a/b/mod.rs` alike, `super` is `a`).
fn paths_in(code: &str, module: &Module) -> Vec<Vec<String>> {
    fn ident_at(s: &[char], mut i: usize) -> (String, usize) {
        let start = i;
        while i < s.len() && (s[i].is_alphanumeric() || s[i] == '_') {
            i += 1;
        }
        (s[start..i].iter().collect(), i)
    }
    fn skip_ws(s: &[char], mut i: usize) -> usize {
        while i < s.len() && s[i].is_whitespace() {
            i += 1;
        }
        i
    }
    /// Parses `seg::seg::{…}` from `i` (just after a `::`), pushing full paths onto `out`.
    fn tail(s: &[char], mut i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
        let mut path = prefix;
        loop {
            i = skip_ws(s, i);
            if i < s.len() && s[i] == '{' {
                i += 1;
                loop {
                    i = skip_ws(s, i);
                    if i >= s.len() {
                        return i;
                    }
                    if s[i] == '}' {
                        return i + 1;
                    }
                    if s[i] == ',' {
                        i += 1;
                        continue;
                    }
                    let (id, j) = ident_at(s, i);
                    if id.is_empty() {
                        i += 1;
                        continue;
                    }
                    let mut p = path.clone();
                    if id != "self" {
                        p.push(id);
                    }
                    let j2 = skip_ws(s, j);
                    if s.get(j2) == Some(&':') && s.get(j2 + 1) == Some(&':') {
                        i = tail(s, j2 + 2, p, out);
                    } else {
                        out.push(p);
                        i = j;
                        // Skip an `as name` rename.
                        let k = skip_ws(s, i);
                        let (word, after) = ident_at(s, k);
                        if word == "as" {
                            let (_, after_name) = ident_at(s, skip_ws(s, after));
                            i = after_name;
                        }
                    }
                }
            }
            let (id, j) = ident_at(s, i);
            if id.is_empty() {
                out.push(path);
                return i;
            }
            path.push(id);
            if s.get(j) == Some(&':') && s.get(j + 1) == Some(&':') {
                i = j + 2;
            } else {
                out.push(path);
                return j;
            }
        }
    }
    let s: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let boundary =
            i == 0 || !(s[i - 1].is_alphanumeric() || s[i - 1] == '_' || s[i - 1] == ':');
        if boundary && s[i..].starts_with(&['c', 'r', 'a', 't', 'e', ':', ':']) {
            i = tail(&s, i + 7, Vec::new(), &mut out);
        } else if boundary && s[i..].starts_with(&['s', 'u', 'p', 'e', 'r', ':', ':']) {
            // The module `super` names: the parent of this module's own module.
            let mut base = module.clone();
            base.pop();
            let mut j = i + 7;
            while s[j..].starts_with(&['s', 'u', 'p', 'e', 'r', ':', ':']) {
                base.pop();
                j += 7;
            }
            i = tail(&s, j, base, &mut out);
        } else {
            i += 1;
        }
    }
    out
}

/// The file graph: module → the modules its production code names.
fn file_graph() -> Graph {
    let files = module_files();
    let modules: BTreeSet<Module> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut graph = Graph::new();
    for (module, path) in &files {
        let code = production_code(&std::fs::read_to_string(path).unwrap());
        let deps = graph.entry(module.clone()).or_default();
        for p in paths_in(&code, module) {
            let target = (1..=p.len())
                .rev()
                .map(|n| p[..n].to_vec())
                .find(|prefix| modules.contains(prefix));
            if let Some(t) = target
                && &t != module
            {
                deps.insert(t);
            }
        }
    }
    graph
}

/// The stage graph: top-level module → the other top-level modules it names.
fn stage_graph(files: &Graph) -> Graph {
    let mut stages = Graph::new();
    for (m, deps) in files {
        let from = vec![m[0].clone()];
        let entry = stages.entry(from.clone()).or_default();
        for d in deps {
            let to = vec![d[0].clone()];
            if to != from {
                entry.insert(to);
            }
        }
    }
    stages
}

/// One cycle of `graph`, as the modules along it (first repeated at the end), if any.
fn find_cycle(graph: &Graph) -> Option<Vec<Module>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &Module,
        graph: &Graph,
        marks: &mut BTreeMap<Module, Mark>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let at = stack.iter().position(|m| m == node).unwrap();
                let mut cycle = stack[at..].to_vec();
                cycle.push(node.clone());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.clone(), Mark::Open);
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, marks, stack) {
                return Some(c);
            }
        }
        stack.pop();
        marks.insert(node.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if let Some(c) = visit(node, graph, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

fn show(cycle: &[Module]) -> String {
    cycle
        .iter()
        .map(|m| m.join("::"))
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// The `layers:` line of `lib.rs`: each stage's layer, lowest first.
fn layers() -> BTreeMap<String, usize> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let line = lib
        .lines()
        .find_map(|l| l.trim_start_matches("//!").trim().strip_prefix("layers:"))
        .expect("lib.rs's docs state the layering on a `layers:` line");
    let mut out = BTreeMap::new();
    for (n, layer) in line.split('<').enumerate() {
        for stage in layer.split_whitespace() {
            out.insert(stage.to_string(), n);
        }
    }
    out
}

#[test]
fn no_file_imports_itself_through_others() {
    let graph = file_graph();
    assert!(graph.len() > 40, "found only {} modules", graph.len());
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle between files: {}", show(&cycle));
    }
}

#[test]
fn no_stage_imports_itself_through_others() {
    let stages = stage_graph(&file_graph());
    if let Some(cycle) = find_cycle(&stages) {
        panic!("import cycle between stages: {}", show(&cycle));
    }
}

#[test]
fn every_stage_imports_only_from_earlier_layers() {
    let layers = layers();
    let files = file_graph();
    let mut wrong = Vec::new();
    for (m, deps) in &files {
        let Some(&from) = layers.get(&m[0]) else {
            wrong.push(format!("{} is on no layer of lib.rs", m[0]));
            continue;
        };
        for d in deps {
            if d[0] == m[0] {
                continue;
            }
            match layers.get(&d[0]) {
                Some(&to) if to < from => {}
                _ => wrong.push(format!("{} -> {}", m.join("::"), d.join("::"))),
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "imports against the layering of lib.rs:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn every_top_level_module_is_on_a_layer() {
    let layers = layers();
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    for line in lib.lines() {
        if let Some(name) = line.trim().strip_prefix("pub mod ") {
            let name = name.trim_end_matches(';');
            assert!(
                layers.contains_key(name),
                "`{name}` is on no layer of lib.rs"
            );
        }
    }
}

#[test]
fn the_checker_sees_a_cycle_and_its_path() {
    let m = |s: &str| s.split("::").map(String::from).collect::<Module>();
    let code = production_code(
        "use crate::a::{b::{self, C}, d as e};\nfn f() { super::g::h(); }\n// crate::z\n\
         #[cfg(test)]\nmod tests { use crate::q; }\n",
    );
    let paths = paths_in(&code, &m("x::y"));
    assert_eq!(
        paths,
        vec![m("a::b"), m("a::b::C"), m("a::d"), m("x::g::h")],
        "{code}"
    );
    let mut graph = Graph::new();
    graph.entry(m("a")).or_default().insert(m("b"));
    graph.entry(m("b")).or_default().insert(m("c"));
    graph.entry(m("c")).or_default().insert(m("a"));
    graph.entry(m("d")).or_default().insert(m("a"));
    let cycle = find_cycle(&graph).expect("a cycle");
    assert_eq!(show(&cycle), "a -> b -> c -> a");
    graph.get_mut(&m("c")).unwrap().clear();
    assert_eq!(find_cycle(&graph), None);
}
