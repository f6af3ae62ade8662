//! The borgmatic compatibility table against borgmatic's own schema (the
//! schema.yaml shipped in borgmatic 2.1.10's package on PyPI, kept in
//! tests/fixtures), against the reader that acts on it, and against the
//! document generated from it.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_borg::borgmatic::parse;
use ferry_borg::compat::{self, Support};
use ferry_borg::tilde::Tilde;

const SCHEMA: &str = include_str!("fixtures/borgmatic-2.1.10-schema.yaml");
const WAIT: Duration = Duration::from_secs(60);

fn schema_options() -> BTreeSet<String> {
    let schema: serde_yaml_ng::Value = serde_yaml_ng::from_str(SCHEMA).expect("the schema is YAML");
    schema["properties"]
        .as_mapping()
        .expect("the schema has properties")
        .keys()
        .map(|k| k.as_str().expect("option names are text").to_string())
        .collect()
}

#[test]
fn the_table_names_every_option_of_the_schema_and_no_other() {
    let schema = schema_options();
    assert_eq!(
        schema.len(),
        136,
        "borgmatic 2.1.10 has 136 top-level options"
    );
    let table: BTreeSet<String> = compat::OPTIONS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(
        table.len(),
        compat::OPTIONS.len(),
        "an option is listed twice"
    );
    let missing: Vec<_> = schema.difference(&table).collect();
    assert!(
        missing.is_empty(),
        "options of the schema the table does not name: {missing:?}"
    );
    let extra: Vec<_> = table.difference(&schema).collect();
    assert!(
        extra.is_empty(),
        "options in the table the schema does not have: {extra:?}"
    );
}

/// A borgmatic file with the two required options and `option: true`.
fn file_with(option: &str) -> String {
    format!("source_directories:\n    - /srv/data\nrepositories:\n    - path: /srv/borg/x\n{option}: true\n")
}

#[test]
fn the_reader_does_what_the_table_says() {
    for (option, support) in compat::OPTIONS {
        if ["source_directories", "repositories"].contains(option) {
            continue;
        }
        let outcome = parse(&file_with(option), None, &WAIT, &Tilde::home("/root"))
            .map_err(|e| e.to_string());
        match support {
            // A honoured option is read (a value of the wrong type is a
            // different complaint), never refused as unknown.
            Support::Honoured | Support::Differs(_) => {
                if let Err(e) = &outcome {
                    assert!(
                        !e.contains("cannot be read by ferry-borg here")
                            && !e.contains("is not an option"),
                        "{option} is honoured by the table but not read: {e}"
                    );
                }
            }
            Support::Ignored(why) => {
                let plan = outcome.unwrap_or_else(|e| panic!("{option} is ignored, yet: {e}"));
                assert!(
                    plan.warnings
                        .iter()
                        .any(|w| w.contains(option) && w.contains(why)),
                    "{option}: no warning in {:?}",
                    plan.warnings
                );
            }
            Support::Refused(why) => {
                let e = outcome
                    .err()
                    .unwrap_or_else(|| panic!("{option} is refused by the table but accepted"));
                assert!(
                    e.contains(&format!("line 5: `{option}`: {why}")),
                    "{option}: {e}"
                );
            }
        }
    }
}

#[test]
fn every_refused_option_of_a_file_is_named_at_once_with_its_line() {
    let text = "source_directories:\n    - /srv/data\nrepositories:\n    - path: /srv/borg/x\n\
                postgresql_databases:\n    - name: users\nzfs: {}\nhealthchecks:\n    ping_url: https://example.org\n\
                keep_daily: 7\nnot_an_option: 1\n";
    let e = parse(text, None, &WAIT, &Tilde::home("/root"))
        .expect_err("refused")
        .to_string();
    for expected in [
        "line 5: `postgresql_databases`",
        "line 7: `zfs`",
        "line 8: `healthchecks`",
        "line 11: `not_an_option` is not an option of borgmatic 2.1.10",
    ] {
        assert!(e.contains(expected), "{expected:?} not in: {e}");
    }
    assert!(e.starts_with("4 problems"), "{e}");
}

#[test]
fn the_document_is_generated_from_the_table() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs/borgmatic-compatibility.md");
    let generated = compat::markdown();
    if std::env::var_os("FERRY_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write the document");
    }
    let written = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        written == generated,
        "docs/borgmatic-compatibility.md is not what the table says: run FERRY_BLESS=1 cargo test -p ferry-borg --test compat"
    );
}
