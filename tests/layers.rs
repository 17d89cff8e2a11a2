//! The layer rule, checked on the source: a module imports only from its own layer or below.
//!
//!   config, error, user, text, check, seccomp  <  engine  <  firewall, files, quota, uids, users_root
//!   <  pool  <  exec, selfcheck  <  server, cli, smoke
//!
//! A new top-level module must be given a layer here (the test fails until it is).

use std::path::{Path, PathBuf};

const LAYERS: &[&[&str]] = &[
    &["config", "error", "user", "text", "check", "seccomp"],
    &["engine"],
    &["firewall", "files", "quota", "uids", "users_root"],
    &["pool"],
    &["exec", "selfcheck"],
    &["server", "cli", "smoke"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

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

/// The top-level module a file belongs to (`src/pool/reaper.rs` -> `pool`).
fn owner(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// Every `crate::name` a file's code (not its comments) names.
fn crate_imports(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.push((n + 1, name));
            rest = after;
        }
    }
    found
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut problems = Vec::new();
    for file in &files {
        let module = owner(&src, file);
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(own) = layer(&module) else {
            problems.push(format!(
                "{}: module {module} has no layer in tests/layers.rs",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (line, target) in crate_imports(&text) {
            match layer(&target) {
                // Re-exports at the crate root (crate::Error, crate::Result): the error layer.
                None if matches!(target.as_str(), "Error" | "Result" | "Config") => {}
                None => problems.push(format!(
                    "{}:{line}: crate::{target} is not a module with a layer",
                    file.display()
                )),
                Some(l) if l > own => problems.push(format!(
                    "{}:{line}: {module} (layer {own}) imports crate::{target} (layer {l})",
                    file.display()
                )),
                Some(_) => {}
            }
        }
    }
    assert!(
        problems.is_empty(),
        "layer rule broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_check_sees_an_upward_import() {
    // Positive control: the scanner finds an import in code and ignores one in a comment.
    let text = "use crate::pool::Lease;\n// see crate::server\nlet x = crate::exec::run();";
    let names: Vec<String> = crate_imports(text).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, vec!["pool", "exec"]);
    assert!(layer("pool").unwrap() > layer("engine").unwrap());
}
