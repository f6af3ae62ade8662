//! Shell globs in borgmatic's `source_directories` (and root patterns),
//! expanded exactly as borgmatic expands them: with Python's `glob.glob`
//! (not recursive, hidden names only for a pattern starting with `.`,
//! matches in directory order, unsorted), and a pattern that matches nothing
//! kept as it was written (borgmatic's `expand_directory`). The comparison
//! test holds this to borgmatic itself on real directories.
//!
//! It reads only the host's own directories named in the file ferry-borg
//! was configured with (never a drive's).

use std::path::Path;

/// Whether `text` has a glob character (Python's `glob.has_magic`).
pub fn has_magic(text: &str) -> bool {
    text.contains(['*', '?', '['])
}

/// borgmatic's `expand_directory` after `~` is expanded: the matches of
/// `pattern`, or `pattern` itself when nothing matches.
pub fn expand(pattern: &str) -> Vec<String> {
    let found = glob(pattern, false);
    if found.is_empty() {
        vec![pattern.to_string()]
    } else {
        found
    }
}

/// Python's `glob._iglob` for an absolute or relative `pattern`.
fn glob(pattern: &str, dir_only: bool) -> Vec<String> {
    let (dirname, basename) = split(pattern);
    if !has_magic(pattern) {
        let exists = if basename.is_empty() {
            Path::new(dirname).is_dir()
        } else {
            std::fs::symlink_metadata(pattern).is_ok()
        };
        return if exists {
            vec![pattern.to_string()]
        } else {
            Vec::new()
        };
    }
    let dirs = if dirname != pattern && has_magic(dirname) {
        glob(dirname, true)
    } else {
        vec![dirname.to_string()]
    };
    let mut found = Vec::new();
    for dir in dirs {
        let names = if has_magic(basename) {
            matching(&dir, basename, dir_only)
        } else {
            let exists = if basename.is_empty() {
                Path::new(&dir).is_dir()
            } else {
                std::fs::symlink_metadata(join(&dir, basename)).is_ok()
            };
            if exists {
                vec![basename.to_string()]
            } else {
                Vec::new()
            }
        };
        found.extend(names.iter().map(|name| join(&dir, name)));
    }
    found
}

/// `os.path.split`: the head keeps a leading run of slashes only.
fn split(path: &str) -> (&str, &str) {
    let cut = path.rfind('/').map_or(0, |i| i + 1);
    let (head, tail) = path.split_at(cut);
    let trimmed = head.trim_end_matches('/');
    let head = if trimmed.is_empty() { head } else { trimmed };
    (head, tail)
}

/// `os.path.join(dir, name)`.
fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() || dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// Python's `glob._glob1`: the names in `dir` (in directory order) that
/// match `pattern`; hidden ones only when the pattern starts with `.`.
fn matching(dir: &str, pattern: &str, dir_only: bool) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(if dir.is_empty() { "." } else { dir }) else {
        return Vec::new();
    };
    let hidden = pattern.starts_with('.');
    entries
        .flatten()
        .filter(|e| !dir_only || e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| hidden || !name.starts_with('.'))
        .filter(|name| fnmatch(name, pattern))
        .collect()
}

/// Python's `fnmatch.fnmatchcase`: `*`, `?`, `[seq]`, `[!seq]`; a `[`
/// without its `]` is itself.
pub fn fnmatch(name: &str, pattern: &str) -> bool {
    let name: Vec<char> = name.chars().collect();
    let pattern: Vec<char> = pattern.chars().collect();
    matches(&name, &pattern)
}

fn matches(name: &[char], pattern: &[char]) -> bool {
    let Some((&first, rest)) = pattern.split_first() else {
        return name.is_empty();
    };
    match first {
        '*' => (0..=name.len()).any(|skip| matches(&name[skip..], rest)),
        '?' => !name.is_empty() && matches(&name[1..], rest),
        '[' => match class(rest) {
            Some((accepts, after)) => {
                name.first().is_some_and(|&c| accepts(c)) && matches(&name[1..], after)
            }
            None => name.first() == Some(&'[') && matches(&name[1..], rest),
        },
        c => name.first() == Some(&c) && matches(&name[1..], rest),
    }
}

/// A `[...]` class after its `[`: what it accepts and the pattern after `]`.
#[allow(clippy::type_complexity)]
fn class(pattern: &[char]) -> Option<(Box<dyn Fn(char) -> bool + '_>, &[char])> {
    let (negate, body_start) = match pattern.first() {
        Some('!') => (true, 1),
        _ => (false, 0),
    };
    // A `]` right at the start is a member, as in Python.
    let search_from = body_start + usize::from(pattern.get(body_start) == Some(&']'));
    let close = search_from + pattern[search_from..].iter().position(|&c| c == ']')?;
    let body = &pattern[body_start..close];
    let accepts = move |c: char| {
        let mut i = 0;
        let mut found = false;
        while i < body.len() {
            if i + 2 < body.len() && body[i + 1] == '-' {
                found |= body[i] <= c && c <= body[i + 2];
                i += 3;
            } else {
                found |= body[i] == c;
                i += 1;
            }
        }
        found != negate
    };
    Some((Box::new(accepts), &pattern[close + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnmatch_as_python() {
        assert!(fnmatch("syslog.1", "syslog*"));
        assert!(fnmatch("a", "?"));
        assert!(!fnmatch("ab", "?"));
        assert!(fnmatch("b", "[abc]"));
        assert!(!fnmatch("b", "[!abc]"));
        assert!(fnmatch("x", "[a-z]"));
        assert!(fnmatch("[x", "[x"));
        assert!(fnmatch("]", "[]]"));
        assert!(!fnmatch("syslog", "syslog?*"));
    }

    #[test]
    fn split_as_python() {
        assert_eq!(split("/var/log/syslog*"), ("/var/log", "syslog*"));
        assert_eq!(split("/syslog*"), ("/", "syslog*"));
        assert_eq!(split("a"), ("", "a"));
        assert_eq!(split("/a/b/"), ("/a/b", ""));
    }

    #[test]
    fn expands_in_directories_and_keeps_what_matches_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_str().expect("utf-8");
        for name in [
            "log/syslog",
            "log/syslog.1",
            "log/.syslog.hidden",
            "b/x/syslog",
        ] {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, "x").expect("write");
        }
        let mut found = expand(&format!("{root}/log/syslog*"));
        found.sort();
        assert_eq!(
            found,
            [format!("{root}/log/syslog"), format!("{root}/log/syslog.1")]
        );
        assert_eq!(
            expand(&format!("{root}/*/x/syslog")),
            [format!("{root}/b/x/syslog")],
            "a glob in a directory matches directories only"
        );
        assert_eq!(expand(&format!("{root}/log/.s*")).len(), 1);
        let none = format!("{root}/nothing*");
        assert_eq!(expand(&none), std::slice::from_ref(&none));
        assert_eq!(expand(&format!("{root}/log")), [format!("{root}/log")]);
    }
}
