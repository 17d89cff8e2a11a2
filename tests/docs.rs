//! The operator guide documents every variable the configuration reads.

#[test]
fn run_md_documents_every_variable() {
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/RUN.md")).unwrap();
    let missing: Vec<&str> = zcbot_sandbox::config::variables()
        .iter()
        .map(|v| v.name)
        .filter(|v| !guide.contains(&format!("`{v}`")))
        .collect();
    assert!(missing.is_empty(), "RUN.md does not document {missing:?}");
}
