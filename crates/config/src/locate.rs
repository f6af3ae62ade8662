//! Maps byte offsets in ferry.toml to key paths and key paths to lines, so
//! every error names the key and the line even when serde only knows one.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// The 1-based line number of a byte offset.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The dotted path of the innermost key whose key or value covers `offset`.
/// Tables opened by a `[header]` do not span their contents, so every key is
/// searched, not only those inside a covering parent.
pub(crate) fn key_at(text: &str, offset: usize) -> String {
    let Ok(root) = DeTable::parse(text) else {
        return String::new();
    };
    let mut best = Vec::new();
    search_table(root.get_ref(), offset, &mut Vec::new(), &mut best);
    best.join(".")
}

fn search_table(
    table: &DeTable<'_>,
    offset: usize,
    path: &mut Vec<String>,
    best: &mut Vec<String>,
) {
    for (key, value) in table {
        path.push(key.get_ref().to_string());
        search_value(value, key.span().contains(&offset), offset, path, best);
        path.pop();
    }
}

fn search_value(
    value: &Spanned<DeValue<'_>>,
    key_covers: bool,
    offset: usize,
    path: &mut Vec<String>,
    best: &mut Vec<String>,
) {
    if (key_covers || value.span().contains(&offset)) && path.len() > best.len() {
        *best = path.clone();
    }
    match value.get_ref() {
        DeValue::Table(table) => search_table(table, offset, path, best),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(i.to_string());
                search_value(item, false, offset, path, best);
                path.pop();
            }
        }
        _ => {}
    }
}

/// The span of the key at `path` (the innermost key found), for errors that
/// come from checks after parsing.
pub(crate) fn span_of(text: &str, path: &[String]) -> Option<Range<usize>> {
    let root = DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut found = None;
    for part in path {
        let (key, value) = table
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == part.as_str())?;
        found = Some(key.span());
        match value.get_ref() {
            DeValue::Table(inner) => table = inner,
            _ => break,
        }
    }
    found
}
