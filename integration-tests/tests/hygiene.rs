//! Workspace hygiene: every dependency a crate declares is used by it.
//! (The check cargo-machete makes — a crate's name must appear in its
//! sources — written here as a test so CI needs no extra tool.)

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == "target") {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every crate of the workspace declares only dependencies it uses.
fn every_declared_dependency_is_used() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let workspace: toml::Table = std::fs::read_to_string(root.join("Cargo.toml"))
        .expect("workspace manifest")
        .parse()
        .expect("workspace toml");
    let members = workspace["workspace"]["members"]
        .as_array()
        .expect("members");
    let mut unused = Vec::new();
    for member in members {
        let dir = root.join(member.as_str().expect("member path"));
        let manifest: toml::Table = std::fs::read_to_string(dir.join("Cargo.toml"))
            .expect("member manifest")
            .parse()
            .expect("member toml");
        let mut files = Vec::new();
        rust_files(&dir, &mut files);
        let sources: String = files
            .iter()
            .map(|f| std::fs::read_to_string(f).expect("read source"))
            .collect::<Vec<_>>()
            .join("\n");
        for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
            let Some(deps) = manifest.get(section).and_then(|d| d.as_table()) else {
                continue;
            };
            for name in deps.keys() {
                let ident = name.replace('-', "_");
                let used = sources.match_indices(&ident).any(|(i, _)| {
                    let before = sources[..i].chars().next_back();
                    let after = sources[i + ident.len()..].chars().next();
                    !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
                        && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
                });
                if !used {
                    unused.push(format!("{member}: [{section}] {name}"));
                }
            }
        }
    }
    assert!(
        unused.is_empty(),
        "declared but never used (remove them from Cargo.toml): {unused:#?}"
    );
}

ferry_integration_tests::integration_tests! {
    sync Nothing: [every_declared_dependency_is_used],
}
