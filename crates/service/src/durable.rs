//! Writing state files so that a crash or a power cut leaves either the old
//! file or the new one, never a torn one: write a temporary file beside it,
//! fsync it, rename it over the old one, fsync the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Replaces `path` with `bytes` durably and atomically. The file gets `mode`
/// exactly, whatever the umask (for example 0o600 for anything with a
/// secret or a mail in it, 0o644 for a file another user reads, such as
/// the metrics textfile under a unit's UMask=0077).
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let temp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)?;
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        sync_directory(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// fsyncs a directory, making renames and unlinks in it durable.
pub fn sync_directory(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads the state file at `path` and parses it with `parse`. A missing
/// file is `None` (a fresh start); one that cannot be read is logged and
/// `None`; one that does not parse is moved aside as `<path>.bad-<unix
/// time>` (kept for a person, never deleted), logged, and `None`. `what`
/// names the file's content in the log ("past backup results").
pub fn load_or_move_aside<T, E: std::fmt::Display>(
    path: &Path,
    what: &str,
    parse: impl FnOnce(&[u8]) -> Result<T, E>,
) -> Option<T> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(
                "cannot read {}: {e}; starting without {what}",
                path.display()
            );
            return None;
        }
    };
    match parse(&bytes) {
        Ok(value) => Some(value),
        Err(e) => {
            let mut aside = path.as_os_str().to_owned();
            aside.push(format!(".bad-{}", crate::unix_now()));
            let moved = fs::rename(path, &aside);
            tracing::warn!(
                "{} does not parse ({e}); {} and starting without {what}",
                path.display(),
                match moved {
                    Ok(()) => format!("moved it to {}", Path::new(&aside).display()),
                    Err(e) => format!("could not move it aside ({e})"),
                }
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_the_file_with_the_mode_and_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("ferry-durable-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.json");
        write_atomically(&path, b"one", 0o600).expect("first");
        write_atomically(&path, b"two", 0o600).expect("second");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        assert_eq!(
            fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(&dir)
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_missing_directory_is_an_error_not_a_panic() {
        assert!(write_atomically(Path::new("/nonexistent/ferry/state.json"), b"x", 0o600).is_err());
    }
}
