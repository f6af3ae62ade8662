//! Paths as the kernel will see them, and files that must hold a secret.
//!
//! ferry-crypt mounts a drive where the kernel resolves the mountpoint to,
//! not where its text points: `/etc/../etc` and a symlink to `/etc` are
//! `/etc`. So the mountpoint checks compare canonical paths (symlinks and
//! `..` in the part that exists resolved, the rest appended), and refuse a
//! mountpoint that would hide or be hidden by something ferry depends on:
//! equal to, containing or inside the key directory (mounting there hides
//! the host's half of the identity token, so a stranger proves its
//! identity against itself), the state directory, a repository, a backup
//! source (inside one only when the profile does not stay on one
//! filesystem), another drive's mountpoint; equal to or containing a
//! system directory. A mountpoint that is itself a symlink is refused.
//!
//! Secret files (key files, passphrase files, the SMTP password) are opened
//! with [`open_secret`]: a regular file, owned by root (or by the service
//! itself when systemd delivers it as a credential under
//! `$CREDENTIALS_DIRECTORY`), that others cannot read.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::Config;

/// Directories a drive must never be mounted on or above.
const SYSTEM_DIRECTORIES: [&str; 14] = [
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/proc", "/root", "/run", "/sbin",
    "/sys", "/usr", "/var",
];

/// `path` as the kernel resolves it: the longest existing ancestor
/// canonicalised (symlinks and `..` resolved), the rest appended with `..`
/// and `.` applied lexically.
pub fn canonical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut existing = path.to_path_buf();
    // The missing tail, last component first; None stands for `..`.
    let mut rest: Vec<Option<std::ffi::OsString>> = Vec::new();
    loop {
        if let Ok(mut out) = existing.canonicalize() {
            for part in rest.iter().rev() {
                match part {
                    Some(name) => out.push(name),
                    None => {
                        out.pop();
                    }
                }
            }
            return out;
        }
        match existing.components().next_back() {
            Some(Component::Normal(name)) => rest.push(Some(name.to_os_string())),
            Some(Component::ParentDir) => rest.push(None),
            Some(Component::CurDir) => {}
            _ => return path.to_path_buf(),
        }
        if !existing.pop() {
            return path.to_path_buf();
        }
    }
}

/// How two canonical paths lie to each other, for messages; `None` when
/// apart.
fn relation(mountpoint: &Path, other: &Path) -> Option<&'static str> {
    if mountpoint == other {
        Some("is")
    } else if other.starts_with(mountpoint) {
        Some("contains")
    } else if mountpoint.starts_with(other) {
        Some("lies inside")
    } else {
        None
    }
}

/// The mountpoint checks (see the module doc).
pub(crate) fn check(config: &Config) -> Result<(), (Vec<String>, String)> {
    let mountpoints: Vec<(String, PathBuf)> = config
        .drives
        .iter()
        .map(|(name, drive)| (name.to_string(), canonical(&drive.mountpoint(name))))
        .collect();
    for (name, drive) in &config.drives {
        let key = vec!["drives".to_string(), name.to_string(), "mountpoint".into()];
        let configured = drive.mountpoint(name);
        let mountpoint = canonical(&configured);
        let refuse = |what: String| {
            Err((
                key.clone(),
                format!(
                    "{}{} {what}; mounting a drive there would hide it or be hidden by it: give drive {name} a directory of its own, such as /run/ferry/{name}",
                    configured.display(),
                    if mountpoint != configured {
                        format!(" (that is {})", mountpoint.display())
                    } else {
                        String::new()
                    },
                ),
            ))
        };
        if std::fs::symlink_metadata(&configured).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err((
                key.clone(),
                format!(
                    "{} is a symbolic link (to {}); ferry never mounts on a symlink: name the directory itself",
                    configured.display(),
                    mountpoint.display()
                ),
            ));
        }
        for system in SYSTEM_DIRECTORIES {
            if Path::new(system).starts_with(&mountpoint) {
                let how = if Path::new(system) == mountpoint {
                    "is"
                } else {
                    "contains"
                };
                return refuse(format!("{how} the system directory {system}"));
            }
        }
        let mut others: Vec<(String, PathBuf, bool)> = vec![
            (
                "the key directory".into(),
                canonical(&config.crypt.key_directory),
                true,
            ),
            (
                "the state directory".into(),
                canonical(&config.state_directory),
                true,
            ),
        ];
        for (repo, repository) in &config.repositories {
            others.push((
                format!("repository {repo}"),
                canonical(&repository.path),
                true,
            ));
        }
        for (profile, settings) in &config.profiles {
            let stays = settings.one_file_system == Some(true);
            for source in settings.sources.iter().flatten() {
                others.push((
                    format!("a source of profile {profile}"),
                    canonical(source),
                    !stays,
                ));
            }
        }
        for (other, path) in &mountpoints {
            if other != name.as_str() {
                others.push((
                    format!("the mountpoint of drive {other}"),
                    path.clone(),
                    true,
                ));
            }
        }
        for (what, path, inside_counts) in others {
            match relation(&mountpoint, &path) {
                Some("lies inside") if !inside_counts => {}
                Some(how) => return refuse(format!("{how} {what} ({})", path.display())),
                None => {}
            }
        }
    }
    Ok(())
}

/// The largest secret file read.
const MAX_SECRET: u64 = 64 * 1024;

/// Opens a file that holds a secret (`what`, e.g. "the passphrase file"),
/// refusing anything but a regular file owned by root (or by the running
/// user, when that is not root) that others cannot read; a file under `$CREDENTIALS_DIRECTORY` (systemd's credentials,
/// owned by the service's user) may belong to the running user. Never
/// blocks on a FIFO. The error names the file and its mode and says what
/// to do.
pub fn open_secret(path: &Path, what: &str) -> Result<File, String> {
    let shown = path.display();
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("cannot open {what} {shown}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot look at {what} {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "{what} {shown} is not a regular file; it is refused: point to a file holding only the secret"
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(format!(
            "{what} {shown} has mode {mode:04o}: others can read or write it, so it is refused; run chmod 600 {shown}"
        ));
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let credential = std::env::var_os("CREDENTIALS_DIRECTORY").is_some_and(|dir| {
        let dir = canonical(Path::new(&dir));
        canonical(path).starts_with(&dir)
    });
    // A user-level service (ferry-borg --user) runs as its user, whose own
    // secrets are theirs; nobody else's are.
    let owner_ok = meta.uid() == 0 || (meta.uid() == me && (credential || me != 0));
    if !owner_ok {
        return Err(format!(
            "{what} {shown} belongs to user {} (mode {mode:04o}): a secret must belong to root (or, for a user's own ferry-borg, to that user), so it is refused; run chown root: {shown}",
            meta.uid()
        ));
    }
    if meta.len() > MAX_SECRET {
        return Err(format!(
            "{what} {shown} is {} bytes, too large for a secret; it is refused",
            meta.len()
        ));
    }
    Ok(file)
}

/// The largest configuration file read.
pub(crate) const MAX_CONFIG: u64 = 1024 * 1024;

/// Reads the configuration file: a regular file of at most [`MAX_CONFIG`]
/// bytes, opened without blocking (a FIFO is refused, not waited on).
pub(crate) fn read_config(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("it is not a regular file".into());
    }
    if meta.len() > MAX_CONFIG {
        return Err(format!(
            "it is {} bytes; a ferry.toml is at most {MAX_CONFIG}",
            meta.len()
        ));
    }
    let mut text = String::new();
    file.take(MAX_CONFIG + 1)
        .read_to_string(&mut text)
        .map_err(|e: io::Error| e.to_string())?;
    if text.len() as u64 > MAX_CONFIG {
        return Err(format!("it is longer than {MAX_CONFIG} bytes"));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_resolves_dots_and_symlinks_in_the_existing_part() {
        assert_eq!(canonical(Path::new("/etc/../etc")), Path::new("/etc"));
        let dir = tempfile::tempdir().expect("dir");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/etc", &link).expect("symlink");
        assert_eq!(canonical(&link), Path::new("/etc"));
        assert_eq!(canonical(&link.join("missing/../x")), Path::new("/etc/x"));
    }

    #[test]
    fn secrets_must_be_private_regular_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("secret");
        std::fs::write(&file, "s").expect("write");
        let set = |mode| {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).expect("chmod")
        };
        set(0o644);
        let e = open_secret(&file, "the passphrase file").expect_err("0644");
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        set(0o600);
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            open_secret(&file, "the passphrase file").expect("0600, root's");
        }
        let e = open_secret(dir.path(), "the passphrase file").expect_err("a directory");
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_fifo_or_an_endless_file_is_no_config() {
        let e = read_config(Path::new("/dev/zero")).expect_err("/dev/zero");
        assert!(e.contains("not a regular file"), "{e}");
        let dir = tempfile::tempdir().expect("dir");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).expect("c");
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_config(&fifo).expect_err("a FIFO");
        assert!(e.contains("not a regular file"), "{e}");
    }
}
