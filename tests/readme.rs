//! The README's examples and error table are checked against the code, so they stay true:
//! every JSON example parses (and validates against its schema where it is a request body,
//! an envelope or a relay frame), and every problem `code` the source can answer with, and
//! every relay error code, is in the README's error tables — and nothing there is stale (the
//! relay's error frame schema lists the same codes as the relay).
//!
//! The walkthrough's shell commands are run against a real `inkwire dev` by
//! `functions/inkwire/tests/readme_walkthrough.rs` (it needs the `inkwire` binary, which cargo
//! builds only for that crate's tests).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use inkwire_shared::problem::PROBLEM_BASE;
use inkwire_shared::schema::schemas;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn readme() -> String {
    std::fs::read_to_string(root().join("README.md")).expect("README.md")
}

/// A fenced block: its language, text, first line number (1-based) and the HTML comment
/// right before it, if any (`<!-- schema: envelope.json -->`).
struct Fence {
    lang: String,
    body: String,
    line: usize,
    marker: Option<String>,
}

fn fences(text: &str) -> Vec<Fence> {
    let mut out = Vec::new();
    let mut open: Option<Fence> = None;
    let mut last_nonblank = "";
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        match &mut open {
            None if trimmed.starts_with("```") => {
                let marker = last_nonblank
                    .strip_prefix("<!--")
                    .and_then(|m| m.strip_suffix("-->"))
                    .map(|m| m.trim().to_string());
                open = Some(Fence {
                    lang: trimmed.trim_start_matches('`').trim().to_string(),
                    body: String::new(),
                    line: i + 1,
                    marker,
                });
            }
            Some(_) if trimmed.starts_with("```") => out.push(open.take().unwrap()),
            Some(f) => {
                f.body.push_str(line);
                f.body.push('\n');
            }
            None => {}
        }
        if !trimmed.is_empty() {
            last_nonblank = trimmed;
        }
    }
    assert!(open.is_none(), "README.md has an unclosed code fence");
    out
}

/// The text of a `## ` section, up to the next one.
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("README.md has no \"## {heading}\" section"));
    let rest = &text[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    &rest[..end]
}

#[test]
fn every_json_example_parses_and_fits_its_schema() {
    let text = readme();
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut schema_checked = 0;
    for f in fences(&text).iter().filter(|f| f.lang == "json") {
        checked += 1;
        let value: Value = match serde_json::from_str(&f.body) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("line {}: not JSON: {e}", f.line));
                continue;
            }
        };
        if let Some(schema) = f
            .marker
            .as_deref()
            .and_then(|m| m.strip_prefix("schema:"))
            .map(str::trim)
        {
            schema_checked += 1;
            let result = if schema == "envelope.json" {
                // The envelope and its `data` by category and type.
                schemas().validate_event(&value)
            } else {
                schemas().validate(schema, &value)
            };
            if let Err(errors) = result {
                failures.push(format!("line {}: not a valid {schema}: {errors:?}", f.line));
            }
        }
        // A problem example names its code in its type.
        if let Some(t) = value.get("type").and_then(Value::as_str)
            && let Some(code) = t.strip_prefix(PROBLEM_BASE)
            && value.get("code").and_then(Value::as_str) != Some(code)
        {
            failures.push(format!("line {}: problem type and code differ", f.line));
        }
    }
    assert!(
        failures.is_empty(),
        "README.md examples:\n{}",
        failures.join("\n")
    );
    // Guards against a parser that silently finds nothing.
    assert!(checked >= 8, "only {checked} JSON examples found");
    assert!(
        schema_checked >= 1,
        "no example is checked against a schema"
    );
}

#[test]
fn every_relay_frame_in_the_protocol_tables_fits_its_schema() {
    let text = readme();
    let mut failures = Vec::new();
    let mut checked = 0;
    for line in text.lines().filter(|l| l.starts_with('|')) {
        // Inline code spans of the row that are frames.
        for span in line.split('`').skip(1).step_by(2) {
            if !span.starts_with("{\"op\":") {
                continue;
            }
            checked += 1;
            let value: Value = match serde_json::from_str(span) {
                Ok(v) => v,
                Err(e) => {
                    failures.push(format!("{span}: not JSON: {e}"));
                    continue;
                }
            };
            let op = value["op"].as_str().unwrap_or_default();
            let side = if ["subscribe", "unsubscribe", "ping"].contains(&op) {
                "client"
            } else {
                "server"
            };
            let schema = format!("relay/{side}-{op}.json");
            if let Err(errors) = schemas().validate(&schema, &value) {
                failures.push(format!("{span}: not a valid {schema}: {errors:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "README.md frames:\n{}",
        failures.join("\n")
    );
    assert!(checked >= 9, "only {checked} frames found");
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn source_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    rust_files(&root().join("shared/src"), &mut files);
    for function in std::fs::read_dir(root().join("functions")).unwrap() {
        let src = function.unwrap().path().join("src");
        if src.is_dir() {
            rust_files(&src, &mut files);
        }
    }
    assert!(files.len() > 20, "source files not found");
    files
}

/// The constructors of `Problem` that take a code as their first parameter (after the status
/// for `new`), read from `shared/src/problem.rs` so that a new one is covered too.
fn code_constructors() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("shared/src/problem.rs")).unwrap();
    let mut out = BTreeSet::new();
    for part in text.split("pub fn ").skip(1) {
        let name: String = part
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let params = &part[name.len()..part.find(')').unwrap_or(name.len())];
        if params.contains("code: &'static str") {
            out.insert(name);
        }
    }
    assert!(out.contains("new") && out.contains("conflict"), "{out:?}");
    out
}

/// Skips whitespace and one argument up to its top-level comma.
fn skip_argument(s: &str) -> &str {
    let mut depth = 0i32;
    let mut in_str = false;
    let mut prev = ' ';
    for (i, c) in s.char_indices() {
        match c {
            '"' if prev != '\\' => in_str = !in_str,
            '(' | '[' | '{' if !in_str => depth += 1,
            ')' | ']' | '}' if !in_str => depth -= 1,
            ',' if !in_str && depth == 0 => return &s[i + 1..],
            _ => {}
        }
        prev = c;
    }
    ""
}

/// Every problem code the source can answer with: the string literal given as code to a
/// code-taking `Problem` constructor. A code that is not a literal fails the test (it could
/// not be checked).
fn problem_codes() -> BTreeSet<String> {
    let ctors = code_constructors();
    let mut codes = BTreeSet::new();
    let mut unreadable = Vec::new();
    for file in source_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let in_problem_rs = file.ends_with("shared/src/problem.rs");
        // `shared::http::problem_for_status` maps a status to a code through a `match` of
        // literals (read below) and passes the chosen one on.
        let in_status_map = file.ends_with("shared/src/http.rs");
        if in_status_map {
            let start = text
                .find("pub fn problem_for_status")
                .expect("problem_for_status in shared/src/http.rs");
            let body = &text[start..start + text[start..].find("\n}").unwrap()];
            for arm in body.split("=>").skip(1) {
                let arm = arm.trim_start().trim_start_matches('{').trim_start();
                if let Some(lit) = arm.strip_prefix('"') {
                    codes.insert(lit[..lit.find('"').unwrap()].to_string());
                }
            }
        }
        // A problem whose code is set after it was built (`problem.code = "…"`).
        for (at, _) in text.match_indices(".code = \"") {
            let lit = &text[at + ".code = \"".len()..];
            codes.insert(lit[..lit.find('"').unwrap()].to_string());
        }
        for (at, _) in text.match_indices("Problem::") {
            let rest = &text[at + "Problem::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let Some(args) = rest[name.len()..].strip_prefix('(') else {
                continue;
            };
            if !ctors.contains(&name) {
                continue;
            }
            let args = if name == "new" {
                skip_argument(args)
            } else {
                args
            };
            let args = args.trim_start();
            if let Some(lit) = args.strip_prefix('"') {
                let code = &lit[..lit.find('"').unwrap()];
                assert!(
                    code.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                    "{}: problem code {code:?} is not snake_case",
                    file.display()
                );
                codes.insert(code.to_string());
            } else if !((in_problem_rs || in_status_map) && args.starts_with("code")) {
                let line = text[..at].lines().count() + 1;
                unreadable.push(format!("{}:{line}", file.display()));
            }
        }
    }
    assert!(
        unreadable.is_empty(),
        "problem codes must be string literals so this test can check them: {unreadable:?}"
    );
    codes
}

/// The relay's `error` frame codes (`functions/relay/src/protocol.rs`, `pub mod codes`).
fn relay_codes() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("functions/relay/src/protocol.rs")).unwrap();
    let start = text.find("pub mod codes {").expect("relay codes module");
    let body = &text[start..start + text[start..].find("\n}").unwrap()];
    body.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Codes in backticks in the first column of the tables of the README's Errors section.
fn documented_codes() -> BTreeSet<String> {
    let text = readme();
    let errors = section(&text, "Errors");
    let mut out = BTreeSet::new();
    for line in errors.lines().filter(|l| l.starts_with("| `")) {
        let first = line.split('|').nth(1).unwrap();
        for span in first.split('`').skip(1).step_by(2) {
            out.insert(span.to_string());
        }
    }
    out
}

#[test]
fn every_error_code_is_documented_and_every_documented_code_exists() {
    let problems = problem_codes();
    let relay = relay_codes();
    assert!(problems.len() >= 20, "{problems:?}");
    assert!(relay.len() >= 9, "{relay:?}");
    // The relay's error frame schema lists the same codes.
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("schemas/relay/server-error.json")).unwrap(),
    )
    .unwrap();
    let in_schema: BTreeSet<String> = schema["properties"]["code"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        in_schema, relay,
        "schemas/relay/server-error.json and protocol.rs differ"
    );
    let documented = documented_codes();
    let missing: Vec<_> = problems
        .union(&relay)
        .filter(|c| !documented.contains(*c))
        .collect();
    assert!(
        missing.is_empty(),
        "codes the source uses but README.md's \"Errors\" tables do not list: {missing:?}"
    );
    let stale: Vec<_> = documented
        .iter()
        .filter(|c| !problems.contains(*c) && !relay.contains(*c))
        .collect();
    assert!(
        stale.is_empty(),
        "codes README.md's \"Errors\" tables list but no source uses: {stale:?}"
    );
}
