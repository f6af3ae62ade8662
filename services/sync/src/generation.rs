//! The copy on the drive, one generation at a time, so that it is never
//! half-written.
//!
//! `<drive>/<directory>/<repo>` is always a complete repository: the
//! previous copy or the new one. A sync builds the new generation beside it
//! in `.<repo>.new` (files unchanged since the current generation, and
//! known intact, are hard links to it, the others are copied and hashed),
//! makes it durable (syncfs), has its copied files read back (see
//! [`crate::verify`]) and borg open it (through hard links in
//! `.<repo>.verify`, so borg never writes to the generation itself),
//! exchanges the two directories in one
//! `renameat2(RENAME_EXCHANGE)`, fsyncs the directory and only then removes
//! the old generation. A crash at any point leaves `<repo>` complete; the
//! `.new` and `.verify` leftovers are removed by the next sync.
//!
//! The drive is hostile input: every operation here goes through a
//! [`Confined`] handle of ferry's directory on the drive ([`open_copies`]
//! proves the mount and checks the tree first), never through a path, so
//! a symlink, a `..` or another mount on the drive can never lead a file
//! operation onto the host; trees are walked and removed iteratively
//! within [`LIMITS`].

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_service::confined::{layout_or_io, Confined, Kind, Limits, Meta, WalkError};

use crate::snapshot::Entry;
use crate::verify::{self, Hashed, Hasher};

/// How much is copied between two looks at the stop flag and progress.
const CHUNK: usize = 8 << 20;

/// How far ferry walks into its directory on a drive: a borg repository is
/// `<repo>/data/<n>/<segment>`, four levels below the copies' directory;
/// two more for slack. No copy holds a million files.
pub const LIMITS: Limits = Limits {
    depth: 6,
    entries: 1_000_000,
};

/// The same bound seen from inside one generation.
const GENERATION_LIMITS: Limits = Limits {
    depth: LIMITS.depth - 1,
    entries: LIMITS.entries,
};

/// Directories ferry makes on a drive.
const DIR_MODE: u32 = 0o700;

/// Opens ferry's directory `directory` on the drive mounted at
/// `mountpoint` (making it if needed) as a confined handle, after proving
/// the mountpoint is the root of a mounted filesystem, and checks that its
/// whole tree holds only directories and regular files within
/// [`LIMITS`]: a symlink, FIFO, socket or device node, or too deep a tree,
/// is a [`WalkError::Layout`] naming the path.
pub fn open_copies(mountpoint: &Path, directory: &Path) -> Result<Confined, WalkError> {
    let root = Confined::open_mount_root(mountpoint).map_err(|e| WalkError::Io(e.to_string()))?;
    let copies = root.make_dirs(directory, 0o755).map_err(layout_or_io)?;
    copies.walk(Path::new(""), LIMITS)?;
    Ok(copies)
}

/// The names of one repository's copy in ferry's directory on a drive,
/// and that directory's handle: every operation goes through the handle.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The drive's directory for copies (for messages and for borg).
    pub dir: PathBuf,
    /// The current generation: what a person restores from.
    pub current: PathBuf,
    /// The generation being built (after the exchange: the old one).
    pub new: PathBuf,
    /// Hard links of the new generation for borg to check.
    pub verify: PathBuf,
    /// The confined handle of `dir`.
    copies: Confined,
    current_name: OsString,
    new_name: OsString,
    verify_name: OsString,
}

/// Which generation of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// The one in place.
    Current,
    /// The one being built.
    New,
}

impl Layout {
    /// The copy of repository `name` in ferry's directory `copies`.
    pub fn new(copies: &Confined, name: &str) -> Layout {
        let dir = copies.path().to_path_buf();
        let current_name = OsString::from(name);
        let new_name = OsString::from(format!(".{name}.new"));
        let verify_name = OsString::from(format!(".{name}.verify"));
        Layout {
            current: dir.join(&current_name),
            new: dir.join(&new_name),
            verify: dir.join(&verify_name),
            dir,
            copies: copies.clone(),
            current_name,
            new_name,
            verify_name,
        }
    }

    fn name(&self, generation: Generation) -> &OsStr {
        match generation {
            Generation::Current => &self.current_name,
            Generation::New => &self.new_name,
        }
    }

    /// The identity (device, inode) of a generation; None when it is not
    /// there. Looked up through the confined handle, never following links.
    pub fn identity(&self, generation: Generation) -> io::Result<Option<(u64, u64)>> {
        Ok(self
            .copies
            .metadata(Path::new(self.name(generation)))?
            .map(|m| (m.dev, m.ino)))
    }

    /// The path of a generation (for messages).
    pub fn path(&self, generation: Generation) -> &Path {
        match generation {
            Generation::Current => &self.current,
            Generation::New => &self.new,
        }
    }

    /// Removes what an interrupted sync left beside the current generation.
    pub fn remove_leftovers(&self) -> Result<(), WalkError> {
        let mut removed = false;
        for name in [&self.new_name, &self.verify_name] {
            let there = self
                .copies
                .metadata(Path::new(name))
                .map_err(layout_or_io)?
                .is_some();
            if there {
                tracing::info!(
                    "removing {}, left by an interrupted sync",
                    self.copies.display(Path::new(name)).display()
                );
                self.copies.remove_tree(name, LIMITS)?;
                removed = true;
            }
        }
        if removed {
            self.copies
                .sync()
                .map_err(|e| WalkError::Io(e.to_string()))?;
        }
        Ok(())
    }

    /// Opens the file `rel` of a generation for reading, confined.
    pub fn open_file(&self, generation: Generation, rel: &Path) -> io::Result<File> {
        self.copies
            .open_file(&Path::new(self.name(generation)).join(rel))
    }

    /// The regular files of a generation by path (empty when it does not
    /// exist).
    pub fn files(&self, generation: Generation) -> Result<BTreeMap<PathBuf, Meta>, WalkError> {
        let name = Path::new(self.name(generation));
        if self.copies.metadata(name).map_err(layout_or_io)?.is_none() {
            return Ok(BTreeMap::new());
        }
        Ok(self
            .copies
            .walk(name, GENERATION_LIMITS)?
            .into_iter()
            .filter(|n| n.meta.kind == Kind::File)
            .map(|n| (n.rel, n.meta))
            .collect())
    }

    /// Free bytes on the drive.
    pub fn free_bytes(&self) -> io::Result<u64> {
        self.copies.free_bytes()
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
/// and the copy keeps the mtime), and such a file is linked forward when
/// `trusted` says its copy is known intact (see
/// [`crate::verify::DriveRecord::trusted`]); anything else is copied. The
/// current generation is walked confined, so a symlink or a FIFO in it is
/// an error, never followed.
pub fn plan(
    entries: &[Entry],
    layout: &Layout,
    trusted: &dyn Fn(&Entry) -> bool,
) -> Result<Plan, WalkError> {
    let current = layout.files(Generation::Current)?;
    let mut copy_bytes = 0;
    let mut copy_files = 0;
    let items: Vec<(Entry, Action)> = entries
        .iter()
        .map(|entry| {
            let same = current
                .get(&entry.rel)
                .is_some_and(|m| m.size == entry.size && m.mtime == entry.mtime);
            if same && trusted(entry) {
                (entry.clone(), Action::Link)
            } else {
                copy_bytes += entry.size;
                copy_files += 1;
                (entry.clone(), Action::Copy)
            }
        })
        .collect();
    let unchanged = copy_files == 0 && current.len() == items.len();
    Ok(Plan {
        items,
        copy_bytes,
        copy_files,
        unchanged,
    })
}

/// Why building stopped.
#[derive(Debug)]
pub enum BuildError {
    /// The stop flag was raised.
    Stopped,
    /// A file operation failed; the message names the file.
    Io(String),
    /// The drive holds something in ferry's directory that has no place
    /// there (a symlink, a FIFO, …); the message names it.
    Layout(String),
}

impl From<WalkError> for BuildError {
    fn from(e: WalkError) -> Self {
        match e {
            WalkError::Layout(m) => BuildError::Layout(m),
            WalkError::Io(m) => BuildError::Io(m),
        }
    }
}

fn drive_error(e: io::Error) -> BuildError {
    layout_or_io(e).into()
}

fn io_error(what: &str, path: &Path, e: io::Error) -> BuildError {
    BuildError::Io(format!("{what} {}: {e}", path.display()))
}

/// The files a build copied (not linked), each with the hash of the bytes
/// written.
pub type Copied = BTreeMap<PathBuf, Hashed>;

/// Builds the new generation in `layout.new` from the plan and makes it
/// durable (syncfs). `progress` counts copied bytes; `stopped` is asked
/// between chunks. Returns what was copied, hashed as it was copied, for
/// the read-back.
pub fn build(
    plan: &Plan,
    snapshot_dir: &Path,
    layout: &Layout,
    progress: &AtomicU64,
    stopped: &dyn Fn() -> bool,
) -> Result<Copied, BuildError> {
    let copies = &layout.copies;
    copies.remove_tree(&layout.new_name, LIMITS)?;
    let new = copies
        .make_dir(&layout.new_name, DIR_MODE)
        .map_err(drive_error)?;
    let mut made = std::collections::BTreeSet::new();
    let mut buffer = Vec::new();
    let mut copied = Copied::new();
    for (entry, action) in &plan.items {
        if stopped() {
            return Err(BuildError::Stopped);
        }
        if let Some(parent) = entry.rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            if made.insert(parent.to_path_buf()) {
                new.make_dirs(parent, DIR_MODE).map_err(drive_error)?;
            }
        }
        if *action == Action::Link {
            let from = Path::new(&layout.current_name).join(&entry.rel);
            match copies.hard_link(&from, &new, &entry.rel) {
                Ok(()) => continue,
                Err(e) if ferry_service::confined::is_escape(&e) => return Err(drive_error(e)),
                // Too many links or a vanished file: copy it instead.
                Err(e) => tracing::debug!("cannot link {}: {e}; copying", entry.rel.display()),
            }
        }
        let digest = copy_file(
            &snapshot_dir.join(&entry.rel),
            &new,
            entry,
            progress,
            stopped,
            &mut buffer,
        )?;
        copied.insert(entry.rel.clone(), digest);
    }
    copies.sync_filesystem().map_err(drive_error)?;
    Ok(copied)
}

/// Copies one file of the snapshot into `new`, keeping its mode and mtime,
/// hashing the bytes as they pass (through a buffer that stays in the CPU's
/// cache: the hash costs no extra memory traffic). Returns the hash.
fn copy_file(
    source: &Path,
    new: &Confined,
    entry: &Entry,
    progress: &AtomicU64,
    stopped: &dyn Fn() -> bool,
    buffer: &mut Vec<u8>,
) -> Result<Hashed, BuildError> {
    let target = new.display(&entry.rel);
    let mut input = File::open(source).map_err(|e| io_error("cannot open", source, e))?;
    // SAFETY: advice on a descriptor we own.
    unsafe { libc::posix_fadvise(input.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    let mut output = new
        .create_file(&entry.rel, entry.mode)
        .map_err(drive_error)?;
    let mut hasher = Hasher::default();
    let mut copied = 0u64;
    let mut since_check = 0usize;
    let mut writeback = Writeback::default();
    buffer.resize(verify::BUFFER, 0);
    loop {
        if since_check >= CHUNK {
            since_check = 0;
            if stopped() {
                return Err(BuildError::Stopped);
            }
        }
        let n = match input.read(buffer) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error("cannot read", source, e)),
        };
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        output
            .write_all(&buffer[..n])
            .map_err(|e| io_error("cannot write", &target, e))?;
        copied += n as u64;
        since_check += n;
        progress.fetch_add(n as u64, Ordering::Relaxed);
        writeback.written(&input, &output, copied);
    }
    if copied != entry.size {
        return Err(BuildError::Io(format!(
            "{} changed while it was copied ({copied} bytes instead of {})",
            source.display(),
            entry.size
        )));
    }
    Confined::set_times(&output, entry.mtime)
        .map_err(|e| io_error("cannot set the times of", &target, e))?;
    Ok(hasher.finish())
}

/// A file's writeback, streamed while it is written: every [`Writeback::STEP`]
/// written is handed to the drive at once (`sync_file_range` WRITE), and
/// what lies more than [`Writeback::IN_FLIGHT`] behind is waited for and
/// dropped from the page cache, with the source bytes it came from.
///
/// Why: left to itself the kernel starts writing only when a tenth of
/// memory is dirty (gigabytes on a NAS) or after 30 s, so a copy of a gigabyte is
/// written to the drive only by the final syncfs, after all the reading:
/// read, then write. Streamed, the drive writes while the source is read,
/// the final syncfs has little left, and a terabyte's copy neither fills
/// the host's page cache with dirty pages nor pushes its working set out.
/// Durability still comes from the syncfs that ends [`build`]; this only
/// changes when the bytes start moving, so its errors are left to it.
#[derive(Default)]
struct Writeback {
    /// Bytes handed to writeback.
    started: u64,
    /// Bytes written back and dropped from the cache.
    settled: u64,
}

impl Writeback {
    const STEP: u64 = 8 << 20;
    const IN_FLIGHT: u64 = 64 << 20;

    /// `written` bytes of `output` (copied from `input`) are written.
    fn written(&mut self, input: &File, output: &File, written: u64) {
        let (input, output) = (input.as_raw_fd(), output.as_raw_fd());
        while written - self.started >= Self::STEP {
            // SAFETY: advice and writeback requests on descriptors we own;
            // the results are deliberately ignored (see the type's doc).
            unsafe {
                libc::sync_file_range(
                    output,
                    self.started as i64,
                    Self::STEP as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            self.started += Self::STEP;
        }
        while self.started - self.settled > Self::IN_FLIGHT {
            let (at, len) = (self.settled as i64, Self::STEP as i64);
            // SAFETY: as above.
            unsafe {
                libc::sync_file_range(
                    output,
                    at,
                    len,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                );
                libc::posix_fadvise(output, at, len, libc::POSIX_FADV_DONTNEED);
                libc::posix_fadvise(input, at, len, libc::POSIX_FADV_DONTNEED);
            }
            self.settled += Self::STEP;
        }
    }
}

/// Mirrors a generation into `layout.verify` as hard links (directories
/// are made), walking it confined.
pub fn mirror_links(layout: &Layout, from: Generation) -> Result<(), WalkError> {
    let copies = &layout.copies;
    copies.remove_tree(&layout.verify_name, LIMITS)?;
    let mirror = copies
        .make_dir(&layout.verify_name, DIR_MODE)
        .map_err(layout_or_io)?;
    let name = Path::new(layout.name(from));
    for node in copies.walk(name, GENERATION_LIMITS)? {
        match node.meta.kind {
            Kind::Dir => {
                mirror
                    .make_dirs(&node.rel, DIR_MODE)
                    .map_err(layout_or_io)?;
            }
            _ => copies
                .hard_link(&name.join(&node.rel), &mirror, &node.rel)
                .map_err(layout_or_io)?,
        }
    }
    Ok(())
}

/// Removes the verify mirror.
pub fn remove_mirror(layout: &Layout) -> Result<(), WalkError> {
    layout.copies.remove_tree(&layout.verify_name, LIMITS)
}

/// Makes the new generation the current one atomically and durably, then
/// removes the old one. An error before the exchange leaves the current
/// generation as it was.
pub fn swap(layout: &Layout) -> io::Result<()> {
    // Only "nothing there" chooses a plain rename: any other error (EIO
    // from a shut-down filesystem) is the error, not a reason to try a
    // rename that then fails with "File exists".
    let copies = &layout.copies;
    let exchange = copies.metadata(Path::new(&layout.current_name))?.is_some();
    copies.rename(&layout.new_name, &layout.current_name, exchange)?;
    copies.sync()?;
    if exchange {
        // `.new` now holds the old generation.
        let removed = copies
            .remove_tree(&layout.new_name, LIMITS)
            .map_err(io::Error::other)
            .and_then(|()| copies.sync());
        if let Err(e) = removed {
            tracing::warn!(
                "the new copy is in place, but the old one at {} cannot be removed: {e}; the next sync removes it",
                layout.new.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot;
    use std::fs;

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
        let copies = Confined::open_dir_at(&drive).expect("handle");
        let layout = Layout::new(&copies, "nas");
        let never = || false;

        for round in 0..2 {
            let snap = snapshot::take(&repo, &dir.path().join(".snap")).expect("snapshot");
            let planned = plan(&snap.entries, &layout, &|_| true).expect("plan");
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
            let copied = build(&planned, &snap.dir, &layout, &progress, &never).expect("build");
            assert_eq!(copied.len() as u64, planned.copy_files);
            assert_eq!(progress.load(Ordering::Relaxed), planned.copy_bytes);
            swap(&layout).expect("swap");
            assert_eq!(read_tree(&layout.current), read_tree(&snap.dir));
            assert!(!layout.new.exists());
            let again = plan(&snap.entries, &layout, &|_| true).expect("plan");
            assert!(again.unchanged, "{again:?}");
            // A file not trusted is copied again, though unchanged.
            let distrust =
                plan(&snap.entries, &layout, &|e| e.rel != Path::new("config")).expect("plan");
            assert!(!distrust.unchanged);
            assert_eq!(distrust.copy_files, 1);
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
        let copies = Confined::open_dir_at(dir.path()).expect("handle");
        let layout = Layout::new(&copies, "copy");
        let snap = snapshot::take(&repo, &dir.path().join(".snap")).expect("snapshot");
        let planned = plan(&snap.entries, &layout, &|_| true).expect("plan");
        let stop = || true;
        let result = build(&planned, &snap.dir, &layout, &AtomicU64::new(0), &stop);
        assert!(matches!(result, Err(BuildError::Stopped)));
        assert!(!layout.current.exists());
        layout.remove_leftovers().expect("cleanup");
        assert!(!layout.new.exists());
    }
}
