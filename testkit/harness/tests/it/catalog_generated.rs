//! The Glue tables in `template.yaml`, the CDK construct's `glue-tables.generated.json` and
//! `functions/currents-normalize/AMPERITY.md` are what the registry generates (rerun
//! `cargo run -p harness --bin currents-catalog` after changing `registry/tables.json`).

use harness::catalog;

#[test]
fn catalog_files_match_the_registry() {
    let root = catalog::repo_root();
    let files = catalog::generated(&root).unwrap_or_else(|e| panic!("{e}"));
    for (path, want) in files {
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} is out of date: run `cargo run -p harness --bin currents-catalog`",
            path.display()
        );
    }
}

#[test]
fn every_registry_table_has_a_glue_table_and_a_feed() {
    let registry =
        currents_normalize::registry::Registry::builtin().unwrap_or_else(|e| panic!("{e}"));
    let tables = catalog::tables(&registry);
    assert_eq!(tables.len(), registry.entries().len() + 1);
    let root = catalog::repo_root();
    let template = std::fs::read_to_string(root.join("template.yaml")).unwrap_or_default();
    let amperity = std::fs::read_to_string(root.join("functions/currents-normalize/AMPERITY.md"))
        .unwrap_or_default();
    for t in &tables {
        assert!(
            template.contains(&format!("        Name: {}\n", t.name)),
            "{}",
            t.name
        );
        assert!(amperity.contains(&format!("## {}\n", t.name)), "{}", t.name);
        assert!(
            t.columns.iter().all(|c| c.name != "day"),
            "{}: a column would shadow the partition key",
            t.name
        );
        assert!(
            t.columns.iter().any(|c| c.name == "id"),
            "{}: no id column",
            t.name
        );
    }
    assert_eq!(
        catalog::pattern("users_messages_email_send"),
        "'tables/users_messages_email_send/users_messages_email_send_'yyyy-MM-dd'.parquet'"
    );
}
