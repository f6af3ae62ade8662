//! The copy on the drive, one generation at a time, so that it is never
//! half-written.
//!
//! `<drive>/<directory>/<repo>` is always a complete repository: the
//! previous copy or the new one. A sync builds the new generation beside it
//! in `.<repo>.new` (files unchanged since the current generation are hard
//! links to it, the others are copied), makes it durable (syncfs), has it
//! verified (through hard links in `.<repo>.verify`, so borg never writes
//! to the generation itself), exchanges the two directories in one
//! `renameat2(RENAME_EXCHANGE)`, fsyncs the directory and only then removes
//! the old generation. A crash at any point leaves `<repo>` complete; the
//! `.new` and `.verify` leftovers are removed by the next sync.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::snapshot::{remove_tree, Entry};

/// How much is copied between two looks at the stop flag and progress.
const CHUNK: usize = 8 << 20;

/// The paths of one repository's copy on a drive.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The drive's directory for copies.
    pub dir: PathBuf,
    /// The current generation: what a person restores from.
    pub current: PathBuf,
    /// The generation being built (after the exchange: the old one).
    pub new: PathBuf,
    /// Hard links of the new generation for borg to check.
    pub verify: PathBuf,
}

impl Layout {
    /// The copy of repository `name` under `dir`.
    pub fn new(dir: &Path, name: &str) -> Layout {
        Layout {
            dir: dir.to_path_buf(),
            current: dir.join(name),
            new: dir.join(format!(".{name}.new")),
            verify: dir.join(format!(".{name}.verify")),
        }
    }

    /// Removes what an interrupted sync left beside the current generation.
    pub fn remove_leftovers(&self) -> io::Result<()> {
        let mut removed = false;
        for dir in [&self.new, &self.verify] {
            if fs::symlink_metadata(dir).is_ok() {
                tracing::info!("removing {}, left by an interrupted sync", dir.display());
                remove_tree(dir)?;
                removed = true;
            }
        }
        if removed {
            sync_directory(&self.dir)?;
        }
        Ok(())
    }
}

/// What to do with one file of the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Unchanged since the current generation: hard-link it from there.
    Link,
    /// New or changed: copy it from the snapshot.
    Copy,
}

/// How the new generation is made from the snapshot and the current one.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Every file of the snapshot with what to do.
    pub items: Vec<(Entry, Action)>,
    /// Bytes to copy.
    pub copy_bytes: u64,
    /// Files to copy.
    pub copy_files: u64,
    /// The current generation already is the snapshot: nothing to do.
    pub unchanged: bool,
}

/// Compares the snapshot with the current generation: same path, size and
/// modification time means unchanged (borg never rewrites a committed file,
/// and the copy keeps the mtime).
pub fn plan(entries: &[Entry], layout: &Layout) -> Plan {
    let mut copy_bytes = 0;
    let mut copy_files = 0;
    let items: Vec<(Entry, Action)> = entries
        .iter()
        .map(|entry| {
            let current = fs::symlink_metadata(layout.current.join(&entry.rel));
            let same = current.is_ok_and(|m| {
                m.is_file() && m.len() == entry.size && m.modified().ok() == Some(entry.mtime)
            });
            if same {
                (entry.clone(), Action::Link)
            } else {
                copy_bytes += entry.size;
                copy_files += 1;
                (entry.clone(), Action::Copy)
            }
        })
        .collect();
    let unchanged = copy_files == 0 && count_files(&layout.current) == Some(items.len());
    Plan {
        items,
        copy_bytes,
        copy_files,
        unchanged,
    }
}

/// The number of regular files under `dir`, `None` when it cannot be read.
fn count_files(dir: &Path) -> Option<usize> {
    let mut count = 0;
    for entry in fs::read_dir(dir).ok()? {
        let entry = entry.ok()?;
        let kind = entry.file_type().ok()?;
        if kind.is_dir() {
            count += count_files(&entry.path())?;
        } else {
            count += 1;
        }
    }
    Some(count)
}

/// Why building stopped.
#[derive(Debug)]
pub enum BuildError {
    /// The stop flag was raised.
    Stopped,
    /// A file operation failed; the message names the file.
    Io(String),
}

fn io_error(what: &str, path: &Path, e: io::Error) -> BuildError {
    BuildError::Io(format!("{what} {}: {e}", path.display()))
}

/// Builds the new generation in `layout.new` from the plan and makes it
/// durable. `progress` counts copied bytes; `stopped` is asked between
/// chunks.
pub fn build(
    plan: &Plan,
    snapshot_dir: &Path,
    layout: &Layout,
    progress: &AtomicU64,
    stopped: &dyn Fn() -> bool,
) -> Result<(), BuildError> {
    remove_tree(&layout.new).map_err(|e| io_error("cannot remove", &layout.new, e))?;
    make_dir(&layout.new)?;
    let mut buffer = Vec::new();
    for (entry, action) in &plan.items {
        if stopped() {
            return Err(BuildError::Stopped);
        }
        let target = layout.new.join(&entry.rel);
        if let Some(parent) = target.parent().filter(|p| !p.exists()) {
            make_dir(parent)?;
        }
        if *action == Action::Link {
            match fs::hard_link(layout.current.join(&entry.rel), &target) {
                Ok(()) => continue,
                // Too many links or a vanished file: copy it instead.
                Err(e) => tracing::debug!("cannot link {}: {e}; copying", entry.rel.display()),
            }
        }
        copy_file(
            &snapshot_dir.join(&entry.rel),
            &target,
            entry,
            progress,
            stopped,
            &mut buffer,
        )?;
    }
    syncfs(&layout.new)
}

fn make_dir(path: &Path) -> Result<(), BuildError> {
    fs::create_dir_all(path)
        .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(0o700)))
        .map_err(|e| io_error("cannot create", path, e))
}

/// Copies one file with copy_file_range (read/write where the kernel
/// cannot), keeping its mode and mtime.
fn copy_file(
    source: &Path,
    target: &Path,
    entry: &Entry,
    progress: &AtomicU64,
    stopped: &dyn Fn() -> bool,
    buffer: &mut Vec<u8>,
) -> Result<(), BuildError> {
    let mut input = File::open(source).map_err(|e| io_error("cannot open", source, e))?;
    // SAFETY: advice on a descriptor we own.
    unsafe { libc::posix_fadvise(input.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    let mut output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(entry.mode)
        .open(target)
        .map_err(|e| io_error("cannot create", target, e))?;
    let mut kernel_copy = true;
    let mut copied = 0u64;
    loop {
        if stopped() {
            return Err(BuildError::Stopped);
        }
        let n = if kernel_copy {
            // SAFETY: both descriptors are open; null offsets use (and
            // advance) the file positions.
            let n = unsafe {
                libc::copy_file_range(
                    input.as_raw_fd(),
                    std::ptr::null_mut(),
                    output.as_raw_fd(),
                    std::ptr::null_mut(),
                    CHUNK,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                let unsupported = matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                );
                if unsupported {
                    kernel_copy = false;
                    continue;
                }
                return Err(io_error("cannot copy to", target, e));
            }
            n as usize
        } else {
            buffer.resize(CHUNK, 0);
            let n = input
                .read(buffer)
                .map_err(|e| io_error("cannot read", source, e))?;
            output
                .write_all(&buffer[..n])
                .map_err(|e| io_error("cannot write", target, e))?;
            n
        };
        if n == 0 {
            break;
        }
        copied += n as u64;
        progress.fetch_add(n as u64, Ordering::Relaxed);
    }
    if copied != entry.size {
        return Err(BuildError::Io(format!(
            "{} changed while it was copied ({copied} bytes instead of {})",
            source.display(),
            entry.size
        )));
    }
    let times = fs::FileTimes::new()
        .set_modified(entry.mtime)
        .set_accessed(entry.mtime);
    output
        .set_times(times)
        .map_err(|e| io_error("cannot set the times of", target, e))
}

/// Flushes the whole filesystem holding `path` (all the new generation's
/// data and directories at once), reporting writeback errors.
fn syncfs(path: &Path) -> Result<(), BuildError> {
    let dir = File::open(path).map_err(|e| io_error("cannot open", path, e))?;
    // SAFETY: a descriptor we own.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(io_error(
            "cannot flush the drive holding",
            path,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Mirrors `from` into `to` as hard links (directories are made).
pub fn mirror_links(from: &Path, to: &Path) -> io::Result<()> {
    remove_tree(to)?;
    fs::create_dir(to)?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o700))?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            mirror_links(&entry.path(), &target)?;
        } else {
            fs::hard_link(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Makes the new generation the current one atomically and durably, then
/// removes the old one. An error before the exchange leaves the current
/// generation as it was.
pub fn swap(layout: &Layout) -> io::Result<()> {
    // Only "nothing there" chooses a plain rename: any other error (EIO
    // from a shut-down filesystem) is the error, not a reason to try a
    // rename that then fails with "File exists".
    let exchange = match fs::symlink_metadata(&layout.current) {
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    let flags = if exchange {
        libc::RENAME_EXCHANGE
    } else {
        libc::RENAME_NOREPLACE
    };
    rename(&layout.new, &layout.current, flags)?;
    sync_directory(&layout.dir)?;
    if exchange {
        // `.new` now holds the old generation.
        if let Err(e) = remove_tree(&layout.new).and_then(|()| sync_directory(&layout.dir)) {
            tracing::warn!(
                "the new copy is in place, but the old one at {} cannot be removed: {e}; the next sync removes it",
                layout.new.display()
            );
        }
    }
    Ok(())
}

fn rename(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: valid C strings; plain syscall.
    let result = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// fsyncs a directory so renames and removals in it are durable.
pub fn sync_directory(dir: &Path) -> io::Result<()> {
    ferry_service::durable::sync_directory(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot;

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, text).expect("write");
    }

    fn read_tree(dir: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).expect("read").flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(
                    read_tree(&path)
                        .into_iter()
                        .map(|(n, t)| (format!("{}/{n}", entry.file_name().to_string_lossy()), t)),
                );
            } else {
                out.push((
                    entry.file_name().to_string_lossy().into_owned(),
                    fs::read_to_string(&path).expect("read"),
                ));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn builds_links_unchanged_files_and_swaps() {
        let dir = tempfile::tempdir().expect("temp dir");
        let repo = dir.path().join("repo");
        for (name, text) in [
            ("config", "c1"),
            ("index.5", "i5"),
            ("data/0/1", "one"),
            ("data/0/5", "five"),
        ] {
            write(&repo.join(name), text);
        }
        let drive = dir.path().join("drive");
        fs::create_dir(&drive).expect("drive");
        let layout = Layout::new(&drive, "nas");
        let never = || false;

        for round in 0..2 {
            let snap = snapshot::take(&repo, &dir.path().join(".snap")).expect("snapshot");
            let planned = plan(&snap.entries, &layout);
            if round == 1 {
                // Only the new segment and the new index are copied.
                let copied: Vec<_> = planned
                    .items
                    .iter()
                    .filter(|(_, a)| *a == Action::Copy)
                    .map(|(e, _)| e.rel.to_string_lossy().into_owned())
                    .collect();
                assert_eq!(copied, ["data/0/9", "index.9"]);
            }
            let progress = AtomicU64::new(0);
            build(&planned, &snap.dir, &layout, &progress, &never).expect("build");
            assert_eq!(progress.load(Ordering::Relaxed), planned.copy_bytes);
            swap(&layout).expect("swap");
            assert_eq!(read_tree(&layout.current), read_tree(&snap.dir));
            assert!(!layout.new.exists());
            let again = plan(&snap.entries, &layout);
            assert!(again.unchanged, "{again:?}");
            snap.release();
            // The next transaction: a new segment and index.
            fs::remove_file(repo.join("index.5")).ok();
            write(&repo.join("data/0/9"), "nine");
            write(&repo.join("index.9"), "i9");
        }
    }

    #[test]
    fn a_stop_leaves_the_current_generation_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let repo = dir.path().join("repo");
        write(&repo.join("config"), "c");
        write(&repo.join("index.1"), "i");
        write(&repo.join("data/0/1"), "x");
        let layout = Layout::new(dir.path(), "copy");
        let snap = snapshot::take(&repo, &dir.path().join(".snap")).expect("snapshot");
        let planned = plan(&snap.entries, &layout);
        let stop = || true;
        let result = build(&planned, &snap.dir, &layout, &AtomicU64::new(0), &stop);
        assert!(matches!(result, Err(BuildError::Stopped)));
        assert!(!layout.current.exists());
        layout.remove_leftovers().expect("cleanup");
        assert!(!layout.new.exists());
    }
}
