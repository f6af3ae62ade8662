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

/// The service sources the house rules speak of: services/*/src, without
/// test modules (a file named tests.rs or *_tests.rs, and everything after a
/// file's `#[cfg(test)]`).
fn service_sources() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../services");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files
        .into_iter()
        .filter(|f| f.components().any(|c| c.as_os_str() == "src"))
        .filter(|f| {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name != "tests.rs" && !name.ends_with("_tests.rs")
        })
        .map(|f| {
            let text = std::fs::read_to_string(&f).expect("read source");
            let code = match text.find("#[cfg(test)]") {
                Some(at) => text[..at].to_string(),
                None => text,
            };
            (f, code)
        })
        .collect()
}

/// Errors are types, not sentences: no `Result<_, String>` in service code.
fn service_errors_are_typed() {
    let mut found = Vec::new();
    for (file, code) in service_sources() {
        for (n, line) in code.lines().enumerate() {
            let line = line.split("//").next().unwrap_or("");
            if line.contains("Result<") && line.contains(", String>") {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "Result<_, String> in service code (give the error a type): {found:#?}"
    );
}

/// The length of every function in `code` that has a body: (name, first
/// line, lines). Strings, chars and comments are skipped while braces are
/// counted.
fn function_lengths(code: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(at) = trimmed.find("fn ") else {
            continue;
        };
        let head = &trimmed[..at];
        let is_item = head.split_whitespace().all(|w| {
            matches!(w, "pub" | "async" | "const" | "unsafe" | "extern") || w.starts_with("pub(")
        });
        if !is_item || trimmed.starts_with("//") {
            continue;
        }
        let name: String = trimmed[at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let mut depth = 0i32;
        let mut opened = false;
        'lines: for (offset, text) in lines[start..].iter().enumerate() {
            let mut chars = text.chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '/' if chars.peek() == Some(&'/') => break,
                    '"' => {
                        while let Some(s) = chars.next() {
                            match s {
                                '\\' => {
                                    chars.next();
                                }
                                '"' => break,
                                _ => {}
                            }
                        }
                    }
                    '\'' => {
                        // A char literal ('{', '\n') or a lifetime ('a).
                        let rest: String = chars.clone().take(4).collect();
                        if let Some(end) = rest.find('\'') {
                            if end <= 2 {
                                for _ in 0..=end {
                                    chars.next();
                                }
                            }
                        }
                    }
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    ';' if !opened => break 'lines,
                    _ => {}
                }
            }
            if opened && depth <= 0 {
                out.push((name.clone(), start + 1, offset + 1));
                break;
            }
        }
    }
    out
}

/// The scanner counts what it should: a body with braces in strings and
/// char literals, a declaration without a body.
fn function_lengths_are_counted_right() {
    let code = "fn a() {\n    let s = \"{{\";\n    let c = '{';\n}\nfn b(x: &'static str);\npub async fn c<'a>(x: &'a str) {\n}\n";
    assert_eq!(
        function_lengths(code),
        vec![("a".to_string(), 1, 4), ("c".to_string(), 6, 2)]
    );
}

/// A function a newcomer can read at once: none in service code is
/// longer than about 80 lines.
fn service_functions_are_short() {
    const MOST: usize = 80;
    let mut long = Vec::new();
    for (file, code) in service_sources() {
        for (name, line, length) in function_lengths(&code) {
            if length > MOST {
                long.push(format!(
                    "{}:{line}: {name} ({length} lines)",
                    file.display()
                ));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MOST} lines in service code (split them into named steps): {long:#?}"
    );
}

ferry_integration_tests::integration_tests! {
    sync Nothing: [
        every_declared_dependency_is_used,
        service_errors_are_typed,
        function_lengths_are_counted_right,
        service_functions_are_short,
    ],
}
