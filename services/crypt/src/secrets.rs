//! Key files: made from the kernel's random bytes, kept 0600, and refused
//! when anyone but their owner could read them.
//!
//! The key itself is only ever handed to cryptsetup as `--key-file PATH`; no
//! function here returns or logs its contents.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// How many random bytes a new key file holds (512 bits).
pub const KEY_BYTES: usize = 64;

/// `n` bytes from the kernel's random source (getrandom(2)).
pub fn random_bytes(n: usize) -> io::Result<Vec<u8>> {
    let mut buffer = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        // SAFETY: the pointer and length describe the unfilled rest of `buffer`.
        let got = unsafe { libc::getrandom(buffer[filled..].as_mut_ptr().cast(), n - filled, 0) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += usize::try_from(got).unwrap_or(0);
    }
    Ok(buffer)
}

/// Creates a new key file at `path` (mode 0600, never overwriting one that
/// exists) holding [`KEY_BYTES`] random bytes, and makes it durable.
pub fn create_key_file(path: &Path) -> io::Result<()> {
    let key = random_bytes(KEY_BYTES)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(&key)?;
    file.sync_all()?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Why a key file is refused; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("the key file {} does not exist: restore it from your backup of the keys, or fix key-file in ferry.toml", path.display())]
    Missing { path: PathBuf },
    #[error("cannot read the key file {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: io::Error },
    #[error("the key file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("the key file {shown} has mode {mode:04o}: it is readable or writable by group or others, so it is refused; run chmod 600 {shown}", shown = path.display())]
    Loose { path: PathBuf, mode: u32 },
    #[error("the key file {shown} belongs to user {uid}: it must belong to root; run chown root: {shown}", shown = path.display())]
    Owner { path: PathBuf, uid: u32 },
    #[error("the key file {} is empty", path.display())]
    Empty { path: PathBuf },
}

/// Checks that the key file can be used: a regular, non-empty file that
/// only its owner (root, or the user ferry-crypt runs as) can read.
pub fn check_key_file(path: &Path) -> Result<(), KeyFileError> {
    let owned = || path.to_path_buf();
    let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => KeyFileError::Missing { path: owned() },
        _ => KeyFileError::Unreadable {
            path: owned(),
            source,
        },
    })?;
    if !meta.is_file() {
        return Err(KeyFileError::NotAFile { path: owned() });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Loose {
            path: owned(),
            mode,
        });
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        let uid = meta.uid();
        return Err(KeyFileError::Owner { path: owned(), uid });
    }
    if meta.len() == 0 {
        return Err(KeyFileError::Empty { path: owned() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn new_key_files_are_random_private_and_never_overwritten() {
        let dir = tempfile::tempdir().expect("dir");
        let (a, b) = (dir.path().join("a.key"), dir.path().join("b.key"));
        create_key_file(&a).expect("a");
        create_key_file(&b).expect("b");
        let (ka, kb) = (std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
        assert_eq!(ka.len(), KEY_BYTES);
        assert_ne!(ka, kb);
        assert_eq!(
            std::fs::metadata(&a).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            create_key_file(&a).expect_err("exists").kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read(&a).expect("a"), ka);
        check_key_file(&a).expect("a 0600 key file is fine");
    }

    #[test]
    fn loose_modes_missing_and_empty_files_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let key = dir.path().join("k");
        std::fs::write(&key, b"secret").expect("write");
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let err = check_key_file(&key).expect_err("loose").to_string();
            assert!(
                err.contains(&format!("mode {mode:04o}")) && err.contains("chmod 600"),
                "{err}"
            );
        }
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).expect("chmod");
        check_key_file(&key).expect("0400 is fine");
        let err = check_key_file(&dir.path().join("missing"))
            .expect_err("missing")
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
        let empty = dir.path().join("empty");
        std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&empty)
            .expect("empty");
        assert!(check_key_file(&empty)
            .expect_err("empty")
            .to_string()
            .contains("empty"));
        assert!(check_key_file(dir.path())
            .expect_err("dir")
            .to_string()
            .contains("not a regular file"));
    }
}
