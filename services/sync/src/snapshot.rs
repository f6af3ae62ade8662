//! A hard-link snapshot of a borg repository's committed state.
//!
//! borg 1.2 never rewrites a committed file: segments are only ever added
//! and deleted, and the config, index and hints files are replaced by
//! rename. So hard links taken while borg's lock is held (an instant) keep
//! exactly that state readable for as long as the copy takes, while borg
//! goes on writing the repository. The snapshot holds only what makes the
//! committed state: the files of the last transaction `N` (the highest
//! `index.N`), segments up to `N`, and the config; never borg's lock files,
//! temporary files or segments a crashed writer left beyond the last
//! commit.
//!
//! The snapshot lives in the repository's parent directory (same
//! filesystem, so hard links work), or inside the repository when its
//! parent is another filesystem, and is removed when the copy is done or,
//! after a crash, when ferry-sync starts again.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// One file of the committed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the repository, e.g. `data/0/17`.
    pub rel: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, kept on the copy so the next sync can tell the
    /// file is unchanged.
    pub mtime: SystemTime,
    /// Permission bits.
    pub mode: u32,
}

/// Which committed transaction a repository is at: borg's transaction
/// number (the `N` of the highest `index.N`) and that index file's size
/// and modification time. borg writes `index.N` once, when it commits `N`,
/// and never rewrites it; the size and time tell a repository made afresh
/// that reached the same `N` from the one it replaced. What a transaction
/// holds (its archives) never changes, so anything learnt of it can be
/// remembered by this.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transaction {
    /// borg's transaction number.
    pub id: u64,
    /// The size of `index.N`, in bytes.
    pub index_size: u64,
    /// The modification time of `index.N`, in nanoseconds since the epoch.
    pub index_mtime_ns: u64,
}

impl Transaction {
    /// The transaction a list of committed files ([`Snapshot::entries`],
    /// [`observe`]) belongs to; None when it has no `index.N`.
    pub fn of(entries: &[Entry]) -> Option<Transaction> {
        entries
            .iter()
            .filter(|e| e.rel.parent() == Some(Path::new("")))
            .find_map(|e| {
                let id = numbered(e.rel.to_str()?, "index.")?;
                let since_epoch = e.mtime.duration_since(SystemTime::UNIX_EPOCH).ok()?;
                Some(Transaction {
                    id,
                    index_size: e.size,
                    index_mtime_ns: u64::try_from(since_epoch.as_nanos()).ok()?,
                })
            })
    }
}

/// The hard-linked committed state of one repository; the directory is
/// removed by [`Snapshot::release`].
#[derive(Debug)]
pub struct Snapshot {
    /// Where the hard links are.
    pub dir: PathBuf,
    /// Every file, sorted by path.
    pub entries: Vec<Entry>,
}

impl Snapshot {
    /// Removes the snapshot's hard links (the repository is not touched).
    pub fn release(&self) {
        if let Err(e) = remove_tree(&self.dir) {
            tracing::warn!(
                "cannot remove the snapshot {}: {e}; it is removed when ferry-sync next starts",
                self.dir.display()
            );
        }
    }
}

const SIBLING_MARK: &str = ".ferry-snapshot.";

/// Where the snapshot of `repo` for drive `drive` goes: beside the
/// repository when its parent is the same filesystem, else inside it.
pub fn location(repo: &Path, drive: &str) -> PathBuf {
    match sibling_parent(repo) {
        Some((parent, name)) => parent.join(format!(".{name}{SIBLING_MARK}{drive}")),
        None => repo.join(format!("{SIBLING_MARK}{drive}")),
    }
}

/// The repository's parent and directory name when the parent is on the
/// same filesystem.
fn sibling_parent(repo: &Path) -> Option<(&Path, String)> {
    let parent = repo.parent()?;
    let name = repo.file_name()?.to_string_lossy().into_owned();
    let same = match (fs::metadata(parent), fs::metadata(repo)) {
        (Ok(p), Ok(r)) => p.dev() == r.dev(),
        _ => true,
    };
    same.then_some((parent, name))
}

/// Removes every snapshot of `repo` left behind by an interrupted run (for
/// any drive). Called when no sync is running.
pub fn remove_leftovers(repo: &Path) {
    let mut candidates = Vec::new();
    if let (Some(parent), Some(name)) = (repo.parent(), repo.file_name()) {
        let prefix = format!(".{}{SIBLING_MARK}", name.to_string_lossy());
        candidates.extend(children_with_prefix(parent, &prefix));
    }
    candidates.extend(children_with_prefix(repo, SIBLING_MARK));
    for dir in candidates {
        match remove_tree(&dir) {
            Ok(()) => tracing::info!("removed the leftover snapshot {}", dir.display()),
            Err(e) => tracing::warn!("cannot remove the leftover snapshot {}: {e}", dir.display()),
        }
    }
}

fn children_with_prefix(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes a directory tree; a missing one is fine.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Why a repository's committed state cannot be read or snapshotted.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A directory of the repository cannot be listed, or a file looked at.
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// No `index.N`: not borg 1.x, or an index borg must rebuild.
    #[error("{} has no index.N file: it is not a borg 1.x repository, or borg must rebuild its index first (run `borg check` on it)", repo.display())]
    NoIndex { repo: PathBuf },
    /// No `config`.
    #[error("{} has no config file: it is not a borg repository", repo.display())]
    NoConfig { repo: PathBuf },
    /// What an earlier run left cannot be removed.
    #[error("cannot remove the old snapshot {}: {source}", dir.display())]
    RemoveOld { dir: PathBuf, source: io::Error },
    /// The snapshot's directories cannot be made.
    #[error("cannot create {}: {source}", path.display())]
    Create { path: PathBuf, source: io::Error },
    /// A file cannot be hard-linked into the snapshot.
    #[error("cannot hard-link {} to {}: {source}{}", from.display(), to.display(), link_hint(source))]
    Link {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
}

fn link_hint(e: &io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::EXDEV) {
        " (the snapshot must be on the repository's filesystem)"
    } else {
        ""
    }
}

/// `name` is `prefix` followed by a decimal number: that number.
fn numbered(name: &str, prefix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The files of `repo`'s committed state, relative to it, sorted. Call it
/// with borg's lock held.
pub fn committed_files(repo: &Path) -> Result<Vec<PathBuf>, SnapshotError> {
    let read = |dir: &Path| {
        fs::read_dir(dir).map_err(|source| SnapshotError::Read {
            path: dir.to_path_buf(),
            source,
        })
    };
    let mut top = Vec::new();
    let mut transaction = None;
    for entry in read(repo)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        if !is_file {
            continue;
        }
        if let Some(n) = numbered(&name, "index.") {
            transaction = transaction.max(Some(n));
        }
        top.push(name);
    }
    let Some(transaction) = transaction else {
        return Err(SnapshotError::NoIndex {
            repo: repo.to_path_buf(),
        });
    };
    if !top.iter().any(|n| n == "config") {
        return Err(SnapshotError::NoConfig {
            repo: repo.to_path_buf(),
        });
    }
    let mut files: Vec<PathBuf> = top
        .into_iter()
        .filter(|name| {
            let of_other_transaction = ["index.", "hints.", "integrity."]
                .iter()
                .any(|p| numbered(name, p).is_some_and(|n| n != transaction));
            let lock_or_temporary =
                name.starts_with("lock.") || name.ends_with(".tmp") || name == "config.old";
            !of_other_transaction && !lock_or_temporary
        })
        .map(PathBuf::from)
        .collect();
    let data = repo.join("data");
    for dir in read(&data)?.flatten() {
        let dir_name = dir.file_name().to_string_lossy().into_owned();
        if numbered(&dir_name, "").is_none() || !dir.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        for segment in read(&dir.path())?.flatten() {
            let name = segment.file_name().to_string_lossy().into_owned();
            let committed = numbered(&name, "").is_some_and(|n| n <= transaction);
            if committed && segment.file_type().is_ok_and(|t| t.is_file()) {
                files.push(Path::new("data").join(&dir_name).join(name));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// `repo`'s committed state as it is now, without a lock and without
/// links: enough to see that a copy already has it (a repository that
/// changes meanwhile shows up as different, and is then snapshotted under
/// the lock).
pub fn observe(repo: &Path) -> Result<Vec<Entry>, SnapshotError> {
    committed_files(repo)?
        .into_iter()
        .map(|rel| {
            let path = repo.join(&rel);
            let meta = fs::symlink_metadata(&path)
                .map_err(|source| SnapshotError::Read { path, source })?;
            Ok(entry(rel, &meta))
        })
        .collect()
}

fn entry(rel: PathBuf, meta: &fs::Metadata) -> Entry {
    Entry {
        rel,
        size: meta.len(),
        mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        mode: meta.permissions().mode() & 0o7777,
    }
}

/// Hard-links `repo`'s committed state into `dir` (replacing whatever an
/// earlier run left there). Call it with borg's lock held; it takes as long
/// as making that many hard links.
pub fn take(repo: &Path, dir: &Path) -> Result<Snapshot, SnapshotError> {
    remove_tree(dir).map_err(|source| SnapshotError::RemoveOld {
        dir: dir.to_path_buf(),
        source,
    })?;
    let files = committed_files(repo)?;
    let snapshot = Snapshot {
        dir: dir.to_path_buf(),
        entries: Vec::with_capacity(files.len()),
    };
    match link_all(repo, &files, snapshot) {
        Ok(snapshot) => Ok(snapshot),
        Err((snapshot, error)) => {
            snapshot.release();
            Err(error)
        }
    }
}

fn link_all(
    repo: &Path,
    files: &[PathBuf],
    mut snapshot: Snapshot,
) -> Result<Snapshot, (Snapshot, SnapshotError)> {
    let make_dir = |path: &Path| {
        fs::create_dir_all(path)
            .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(0o700)))
            .map_err(|source| SnapshotError::Create {
                path: path.to_path_buf(),
                source,
            })
    };
    if let Err(e) = make_dir(&snapshot.dir) {
        return Err((snapshot, e));
    }
    for rel in files {
        let target = snapshot.dir.join(rel);
        if let Some(parent) = target.parent().filter(|p| !p.exists()) {
            if let Err(e) = make_dir(parent) {
                return Err((snapshot, e));
            }
        }
        let source = repo.join(rel);
        let linked = fs::hard_link(&source, &target).and_then(|()| fs::symlink_metadata(&target));
        match linked {
            Ok(meta) => snapshot.entries.push(entry(rel.clone(), &meta)),
            Err(e) => {
                let error = SnapshotError::Link {
                    from: source,
                    to: target,
                    source: e,
                };
                return Err((snapshot, error));
            }
        }
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, path.to_string_lossy().as_bytes()).expect("write");
    }

    #[test]
    fn keeps_the_last_transaction_and_leaves_out_locks_and_uncommitted_segments() {
        let dir = tempfile::tempdir().expect("temp dir");
        let repo = dir.path().join("nas");
        for name in [
            "README",
            "config",
            "config.old",
            "nonce",
            "hints.99",
            "index.99",
            "integrity.99",
            "hints.100",
            "index.100",
            "integrity.100",
            "config-abc.tmp",
            "lock.roster",
            "lock.exclusive/host.1-0",
            "data/0/7",
            "data/0/99",
            "data/0/100",
            "data/1/101",
        ] {
            touch(&repo.join(name));
        }
        let files = committed_files(&repo).expect("committed");
        let names: Vec<String> = files
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "README",
                "config",
                "data/0/100",
                "data/0/7",
                "data/0/99",
                "hints.100",
                "index.100",
                "integrity.100",
                "nonce"
            ]
        );

        let snapshot_dir = location(&repo, "offsite-a");
        assert_eq!(
            snapshot_dir,
            dir.path().join(".nas.ferry-snapshot.offsite-a")
        );
        let snapshot = take(&repo, &snapshot_dir).expect("take");
        assert_eq!(snapshot.entries.len(), 9);
        let index = fs::metadata(repo.join("index.100")).expect("stat index");
        let transaction = Transaction::of(&snapshot.entries).expect("transaction");
        assert_eq!(transaction.id, 100);
        assert_eq!(transaction.index_size, index.len());
        assert_eq!(
            Some(transaction),
            Transaction::of(&observe(&repo).expect("observe"))
        );
        // A segment named like an index is not the transaction.
        let segments_only: Vec<Entry> = snapshot
            .entries
            .iter()
            .filter(|e| e.rel.starts_with("data"))
            .cloned()
            .collect();
        assert_eq!(Transaction::of(&segments_only), None);
        let inode = |p: &Path| fs::metadata(p).expect("stat").ino();
        assert_eq!(
            inode(&snapshot_dir.join("data/0/100")),
            inode(&repo.join("data/0/100"))
        );
        remove_leftovers(&repo);
        assert!(!snapshot_dir.exists());
        assert!(repo.join("data/0/100").exists());
    }

    #[test]
    fn a_directory_without_an_index_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        touch(&dir.path().join("config"));
        let message = committed_files(dir.path())
            .expect_err("no index")
            .to_string();
        assert!(message.contains("borg check"), "{message}");
    }
}
