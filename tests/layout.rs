//! The shape docs/architecture.md promises: no source file over about 600 lines, and no cycle
//! between the top-level modules of `src/` (a module's code, its tests aside, only uses
//! modules below it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 640;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src() -> (PathBuf, Vec<PathBuf>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    files.sort();
    (root, files)
}

#[test]
fn no_source_file_is_over_the_limit() {
    let (root, files) = src();
    let long: Vec<String> = files
        .iter()
        .map(|f| (f, std::fs::read_to_string(f).unwrap().lines().count()))
        .filter(|(_, n)| *n > MAX_LINES)
        .map(|(f, n)| format!("{} ({n} lines)", f.strip_prefix(&root).unwrap().display()))
        .collect();
    assert!(
        long.is_empty(),
        "split these by concern (see docs/architecture.md): {long:?}"
    );
}

/// The top-level module a file belongs to: `rules` for `src/rules/ha/plan.rs`.
fn top_module(root: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(root).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// `crate::x` paths used by the code of a file, its test module and test files excepted.
fn uses(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

#[test]
fn top_level_modules_have_no_cycle() {
    let (root, files) = src();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        if name == "tests.rs" || f.components().any(|c| c.as_os_str() == "tests") {
            continue;
        }
        let from = top_module(&root, f);
        if from == "main" || from == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for to in uses(&text) {
            if to != from {
                graph.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    // Depth-first search for a path back to where it started.
    fn reaches(
        graph: &BTreeMap<String, BTreeSet<String>>,
        from: &str,
        target: &str,
        seen: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> bool {
        for next in graph.get(from).into_iter().flatten() {
            path.push(next.clone());
            if next == target {
                return true;
            }
            if seen.insert(next.clone()) && reaches(graph, next, target, seen, path) {
                return true;
            }
            path.pop();
        }
        false
    }
    for start in graph.keys() {
        let mut path = vec![start.clone()];
        let found = reaches(&graph, start, start, &mut BTreeSet::new(), &mut path);
        assert!(!found, "module cycle: {}", path.join(" -> "));
    }
}
