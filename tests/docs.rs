//! The operator guide's variable table matches the configuration's own declaration: every
//! variable documented, every documented variable real, with its flag and its default.

use std::collections::BTreeMap;

use zcbot_sandbox::config::{variables, Variable};

/// One row of RUN.md's table under "## Configuration": variable -> (flag cell, default cell).
fn documented() -> BTreeMap<String, (String, String)> {
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/RUN.md")).unwrap();
    let section = guide
        .split("\n## Configuration\n")
        .nth(1)
        .expect("RUN.md has a Configuration section");
    let section = section.split("\n## ").next().unwrap();
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        assert!(
            cells.len() >= 4,
            "a row needs variable, flag, default, meaning: {line}"
        );
        let name = cells[0]
            .trim_start_matches("| ")
            .trim_matches('`')
            .to_owned();
        let old = rows.insert(name.clone(), (cells[1].to_owned(), cells[2].to_owned()));
        assert!(old.is_none(), "RUN.md documents {name} twice");
    }
    rows
}

#[test]
fn run_md_documents_every_variable() {
    let rows = documented();
    let missing: Vec<&str> = variables()
        .iter()
        .map(|v| v.name)
        .filter(|name| !rows.contains_key(*name))
        .collect();
    assert!(missing.is_empty(), "RUN.md does not document {missing:?}");
}

#[test]
fn every_documented_variable_is_read() {
    let declared: Vec<&str> = variables().iter().map(|v| v.name).collect();
    let unknown: Vec<String> = documented()
        .into_keys()
        .filter(|name| !declared.contains(&name.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "RUN.md documents {unknown:?}, which the configuration does not read"
    );
}

#[test]
fn run_md_gives_each_variable_its_flag_and_default() {
    let rows = documented();
    let mut wrong = Vec::new();
    for v in variables() {
        let Some((flag, default)) = rows.get(v.name) else {
            continue; // run_md_documents_every_variable reports it
        };
        if !flag_matches(v, flag) {
            wrong.push(format!("{}: flag {flag}, declared --{}", v.name, v.flag));
        }
        let ok = match v.default {
            Some(d) => *default == format!("`{d}`"),
            // No default: the cell says in words what happens, in parentheses.
            None => default.starts_with('('),
        };
        if !ok {
            wrong.push(format!(
                "{}: default {default}, declared {:?}",
                v.name, v.default
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "RUN.md's table is out of date: {wrong:#?}"
    );
}

fn flag_matches(v: &Variable, cell: &str) -> bool {
    if v.env_only {
        cell.starts_with('(')
    } else {
        cell == format!("`--{}`", v.flag)
    }
}
