//! The README's configuration reference names every variable the function reads.

#[test]
fn readme_lists_every_variable() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md at the workspace root");
    for var in braze_sync::config::env::VARIABLES {
        assert!(
            readme.contains(&format!("`{var}`")),
            "README.md does not document {var}"
        );
    }
}

#[test]
fn readme_warns_against_the_insecure_plain_key_switch() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md at the workspace root");
    let var = braze_sync::config::env::INSECURE_PLAIN_KEY_SWITCH;
    let row = readme
        .lines()
        .find(|l| l.starts_with(&format!("| `{var}`")))
        .unwrap_or_else(|| panic!("README.md has no configuration table row for {var}"));
    assert!(
        row.contains("Warning") && row.contains("never") && row.contains("production"),
        "the row for {var} must warn against production use: {row}"
    );
}
