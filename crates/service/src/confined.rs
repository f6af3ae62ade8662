//! A drive's directory as a handle that cannot be escaped.
//!
//! A drive is hostile input, even an enrolled one: anyone can edit it on
//! another machine, so any name on it may be a symlink to `/etc`, a `..`
//! chain, a FIFO that blocks a reader forever, a device node, or a
//! directory chain 20 000 levels deep. Every file operation ferry makes on
//! a drive therefore goes through a [`Confined`] directory handle:
//!
//! - the drive's root is opened right after mounting with `O_DIRECTORY |
//!   O_NOFOLLOW` and proven to be the root of the filesystem mounted there
//!   ([`Confined::open_mount_root`]: the handle's mount id, looked up in
//!   mountinfo, names that mountpoint, with the same device and the
//!   filesystem's own root);
//! - every lookup below it is `openat2(2)` with `RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS`: the
//!   kernel refuses any symlink on the way (ELOOP), any `..` out of the
//!   handle and any crossing into another mount (EXDEV), and does so
//!   atomically, so nothing can be swapped in between a check and a use;
//! - creating, linking, renaming (`renameat2(RENAME_EXCHANGE)`) and
//!   unlinking happen relative to a directory handle opened that way, on a
//!   single file name, never on a path;
//! - trees are walked and removed iteratively with a depth and an entry
//!   bound ([`Limits`]); a symlink, FIFO, socket or device node inside a
//!   walked tree is an error naming it ([`WalkError::Layout`]).
//!
//! Why rustix rather than cap-std: cap-std's `Dir` would also keep lookups
//! beneath a handle, but it resolves symlinks that stay inside (we refuse
//! every symlink), does not refuse crossing mounts, and offers neither
//! `RENAME_EXCHANGE`, `syncfs` nor the mount id a root has to be proven
//! with. rustix exposes exactly those system calls with owned descriptors
//! and no `unsafe` here, and it is already in the dependency tree.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustix::fs::{
    AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Stat, StatxFlags, Timespec,
    Timestamps,
};

/// How a confined lookup resolves: beneath the handle, through no symlink,
/// into no other mount.
fn resolve() -> ResolveFlags {
    ResolveFlags::BENEATH
        | ResolveFlags::NO_SYMLINKS
        | ResolveFlags::NO_XDEV
        | ResolveFlags::NO_MAGICLINKS
}

/// What kind of file a name on a drive is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
    /// A character device node.
    CharDevice,
    /// A block device node.
    BlockDevice,
    /// Something the kernel could not name.
    Unknown,
}

impl Kind {
    fn of(stat: &Stat) -> Kind {
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::Directory => Kind::Dir,
            FileType::RegularFile => Kind::File,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            FileType::CharacterDevice => Kind::CharDevice,
            FileType::BlockDevice => Kind::BlockDevice,
            FileType::Unknown => Kind::Unknown,
        }
    }

    /// "a symbolic link", "a FIFO", … for messages.
    pub fn described(self) -> &'static str {
        match self {
            Kind::Dir => "a directory",
            Kind::File => "a regular file",
            Kind::Symlink => "a symbolic link",
            Kind::Fifo => "a FIFO (named pipe)",
            Kind::Socket => "a socket",
            Kind::CharDevice => "a character device node",
            Kind::BlockDevice => "a block device node",
            Kind::Unknown => "a file of unknown type",
        }
    }
}

/// How far a walk or a removal may go before it gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Directory levels below the walked directory.
    pub depth: usize,
    /// Entries in all.
    pub entries: usize,
}

/// Why a walk (or a removal) stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalkError {
    /// The tree holds something that has no place there (a symlink, a
    /// FIFO, a device node, too deep a chain, too many entries); the
    /// message names the path.
    Layout(String),
    /// A file operation failed; the message names the path.
    Io(String),
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalkError::Layout(m) | WalkError::Io(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for WalkError {}

/// One entry found by [`Confined::walk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Path relative to the walked directory.
    pub rel: PathBuf,
    /// What it is (a directory or a regular file: anything else fails the
    /// walk), its size, times, mode and identity.
    pub meta: Meta,
}

/// Metadata of one name, not following it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// What it is.
    pub kind: Kind,
    /// Size in bytes.
    pub size: u64,
    /// Modification time.
    pub mtime: SystemTime,
    /// Permission bits.
    pub mode: u32,
    /// The device it is on (st_dev).
    pub dev: u64,
    /// Its inode number: with `dev`, its identity.
    pub ino: u64,
}

impl Meta {
    fn of(stat: &Stat) -> Meta {
        Meta {
            kind: Kind::of(stat),
            size: u64::try_from(stat.st_size).unwrap_or(0),
            mtime: time_of(stat.st_mtime, stat.st_mtime_nsec),
            mode: stat.st_mode & 0o7777,
            dev: stat.st_dev,
            ino: stat.st_ino,
        }
    }
}

fn time_of(seconds: i64, nanos: u64) -> SystemTime {
    let nanos = Duration::from_nanos(nanos.min(999_999_999));
    match u64::try_from(seconds) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s) + nanos,
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

/// True for the errors a confined lookup gives when the drive tried to
/// lead it elsewhere: a symlink (ELOOP), another mount (EXDEV), `..` out
/// of the handle.
pub fn is_escape(e: &io::Error) -> bool {
    matches!(errno(e), Some(libc::ELOOP | libc::EXDEV))
}

/// The errno of an error, also through the path added by this module.
fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<Located>())
            .and_then(|l| l.errno)
    })
}

/// An error with the path it happened on, keeping the errno it came with.
#[derive(Debug)]
struct Located {
    errno: Option<i32>,
    message: String,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Located {}

/// A directory handle on a drive that nothing resolves out of. `path` is
/// only for messages; no operation ever uses it.
#[derive(Debug, Clone)]
pub struct Confined {
    fd: Arc<OwnedFd>,
    path: PathBuf,
}

impl AsFd for Confined {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The single file name `name` must be: one normal component.
fn single_name(name: &OsStr) -> io::Result<&OsStr> {
    let mut components = Path::new(name).components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(n)), None) if n == name => Ok(n),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{}` is not a single file name", name.to_string_lossy()),
        )),
    }
}

/// `rel` split into its parent (possibly empty) and a single file name.
fn split(rel: &Path) -> io::Result<(&Path, &OsStr)> {
    let name = rel.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{}` names no file", rel.display()),
        )
    })?;
    let parent = rel.parent().unwrap_or(Path::new(""));
    Ok((parent, single_name(name)?))
}

/// Adds the path to an error, keeping its kind and errno meaning in the
/// message ("… is a symbolic link" for ELOOP).
fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    let why = match e.raw_os_error() {
        Some(libc::ELOOP) => "it is a symbolic link or leads through one".to_string(),
        Some(libc::EXDEV) => "it leads out of the drive (another mount, or `..`)".to_string(),
        Some(libc::ENOTDIR) => "it (or a directory on the way) is not a directory".to_string(),
        _ => e.to_string(),
    };
    let errno = errno(&e);
    let message = format!("cannot {what} {}: {why}", path.display());
    io::Error::new(e.kind(), Located { errno, message })
}

impl Confined {
    /// Opens the root of the filesystem mounted at `mountpoint` and proves
    /// that it is one: the directory opened without following a symlink is
    /// the root of the mount mountinfo lists at exactly `mountpoint` (same
    /// mount id, same device, the filesystem's own root rather than a bind
    /// of a subdirectory). `mountpoint` must be canonical (as mountinfo
    /// shows it).
    pub fn open_mount_root(mountpoint: &Path) -> io::Result<Confined> {
        let fd = rustix::fs::openat(
            rustix::fs::CWD,
            mountpoint,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| with_path(e.into(), "open", mountpoint))?;
        let stx = rustix::fs::statx(
            &fd,
            "",
            AtFlags::EMPTY_PATH,
            StatxFlags::BASIC_STATS | StatxFlags::MNT_ID,
        )
        .map_err(|e| with_path(e.into(), "look at", mountpoint))?;
        if stx.stx_mask & StatxFlags::MNT_ID.bits() == 0 {
            return Err(io::Error::other(format!(
                "cannot prove that {} is a mounted drive: this kernel does not report mount ids (Linux 5.8 or newer is needed)",
                mountpoint.display()
            )));
        }
        let info = std::fs::read_to_string("/proc/self/mountinfo")?;
        let line = info
            .lines()
            .map(MountLine::parse)
            .find(|m| m.as_ref().is_some_and(|m| m.id == stx.stx_mnt_id))
            .flatten();
        let device = format!("{}:{}", stx.stx_dev_major, stx.stx_dev_minor);
        let proven = line
            .as_ref()
            .is_some_and(|m| m.point == mountpoint && m.root == "/" && m.device == device);
        if !proven {
            let found = match line {
                Some(m) => format!(
                    "the directory there belongs to the mount of {} at {} (root {})",
                    m.device,
                    m.point.display(),
                    m.root
                ),
                None => "its mount is not in /proc/self/mountinfo".into(),
            };
            return Err(io::Error::other(format!(
                "{} is not the root of a filesystem mounted there: {found}; nothing is written to it",
                mountpoint.display()
            )));
        }
        Ok(Confined {
            fd: Arc::new(fd),
            path: mountpoint.to_path_buf(),
        })
    }

    /// Opens any directory as a confined handle (for tests and for trees
    /// that are not a mount root). Its last component is not followed.
    pub fn open_dir_at(path: &Path) -> io::Result<Confined> {
        let fd = rustix::fs::openat(
            rustix::fs::CWD,
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| with_path(e.into(), "open", path))?;
        Ok(Confined {
            fd: Arc::new(fd),
            path: path.to_path_buf(),
        })
    }

    /// The path this handle was opened as (for messages only).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `rel` below this handle, for messages.
    pub fn display(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.path.clone()
        } else {
            self.path.join(rel)
        }
    }

    fn open_raw(&self, rel: &Path, flags: OFlags, mode: u32) -> io::Result<OwnedFd> {
        let rel: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        match rustix::fs::openat2(
            &*self.fd,
            rel,
            // RESOLVE_NO_SYMLINKS refuses a symlink as the last component
            // too, with ELOOP (O_NOFOLLOW would make it ENOTDIR).
            flags | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::from_raw_mode(mode),
            resolve(),
        ) {
            // systemd answers openat2 with ENOSYS under RestrictSUIDSGID=
            // (it cannot see the flags inside struct open_how), as do
            // kernels before 5.6: resolve by hand, to the same rules.
            Err(rustix::io::Errno::NOSYS) => self.open_stepwise(rel, flags, mode),
            other => other.map_err(io::Error::from),
        }
    }

    /// What openat2 with [`resolve`] does, one component at a time: an
    /// absolute path or `..` is refused (EXDEV, as RESOLVE_BENEATH does),
    /// every component is opened with O_NOFOLLOW (a symlink is ELOOP, as
    /// RESOLVE_NO_SYMLINKS), and every directory on the way and the result
    /// must be on this handle's mount (same mount id; else EXDEV, as
    /// RESOLVE_NO_XDEV). Magic links are symlinks to O_NOFOLLOW.
    fn open_stepwise(&self, rel: &Path, flags: OFlags, mode: u32) -> io::Result<OwnedFd> {
        use std::path::Component;
        let mount_of = |fd: BorrowedFd<'_>| -> io::Result<u64> {
            let stx = rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)?;
            Ok(stx.stx_mnt_id)
        };
        let home = mount_of(self.fd.as_fd())?;
        let mut names = Vec::new();
        for component in rel.components() {
            match component {
                Component::Normal(name) => names.push(name),
                Component::CurDir => {}
                Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                    return Err(io::Error::from_raw_os_error(libc::EXDEV))
                }
            }
        }
        // O_DIRECTORY|O_NOFOLLOW on a symlink says ENOTDIR: say ELOOP, as
        // openat2 does, so a link on a drive reads as one.
        let step = |at: BorrowedFd<'_>, name: &OsStr, flags: OFlags, mode: Mode| {
            rustix::fs::openat(at, name, flags, mode).map_err(|e| {
                let link = e == rustix::io::Errno::NOTDIR
                    && rustix::fs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
                io::Error::from(if link { rustix::io::Errno::LOOP } else { e })
            })
        };
        let last = names.pop().unwrap_or(OsStr::new("."));
        let mut dir: Option<OwnedFd> = None;
        for name in names {
            let at = dir.as_ref().map_or(self.fd.as_fd(), |d| d.as_fd());
            let next = step(
                at,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            if mount_of(next.as_fd())? != home {
                return Err(io::Error::from_raw_os_error(libc::EXDEV));
            }
            dir = Some(next);
        }
        let at = dir.as_ref().map_or(self.fd.as_fd(), |d| d.as_fd());
        let fd = step(
            at,
            last,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::from_raw_mode(mode),
        )?;
        if mount_of(fd.as_fd())? != home {
            return Err(io::Error::from_raw_os_error(libc::EXDEV));
        }
        Ok(fd)
    }

    /// The directory `rel` below this handle ("" is the handle itself).
    pub fn open_dir(&self, rel: &Path) -> io::Result<Confined> {
        let fd = self
            .open_raw(rel, OFlags::RDONLY | OFlags::DIRECTORY, 0)
            .map_err(|e| with_path(e, "open the directory", &self.display(rel)))?;
        Ok(Confined {
            fd: Arc::new(fd),
            path: self.display(rel),
        })
    }

    /// Opens the regular file `rel` for reading; anything else (a FIFO, a
    /// device node) is refused without being opened for I/O.
    pub fn open_file(&self, rel: &Path) -> io::Result<std::fs::File> {
        let shown = self.display(rel);
        let fd = self
            .open_raw(rel, OFlags::RDONLY | OFlags::NONBLOCK, 0)
            .map_err(|e| with_path(e, "open", &shown))?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| with_path(e.into(), "look at", &shown))?;
        let kind = Kind::of(&stat);
        if kind != Kind::File {
            return Err(io::Error::other(format!(
                "{} is {}, not a regular file",
                shown.display(),
                kind.described()
            )));
        }
        Ok(std::fs::File::from(fd))
    }

    /// Creates the regular file `rel` (it must not exist) for writing.
    pub fn create_file(&self, rel: &Path, mode: u32) -> io::Result<std::fs::File> {
        let (parent, name) = split(rel)?;
        let dir = self.open_dir(parent)?;
        let fd = dir
            .open_raw(
                Path::new(name),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
                mode,
            )
            .map_err(|e| with_path(e, "create", &self.display(rel)))?;
        Ok(std::fs::File::from(fd))
    }

    /// Metadata of `rel` without following it; `None` when it does not
    /// exist.
    pub fn metadata(&self, rel: &Path) -> io::Result<Option<Meta>> {
        let (parent, name) = split(rel)?;
        let dir = match self.open_dir(parent) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match rustix::fs::statat(&*dir.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(Meta::of(&stat))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(with_path(e.into(), "look at", &self.display(rel))),
        }
    }

    /// Creates the directory `name` in this one (mode `mode`, whatever the
    /// umask); an existing directory is fine, anything else there is not.
    pub fn make_dir(&self, name: &OsStr, mode: u32) -> io::Result<Confined> {
        let name = single_name(name)?;
        match rustix::fs::mkdirat(&*self.fd, name, Mode::from_raw_mode(mode)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => {
                return Err(with_path(
                    e.into(),
                    "create the directory",
                    &self.display(Path::new(name)),
                ))
            }
        }
        let dir = self.open_dir(Path::new(name))?;
        rustix::fs::fchmod(&*dir.fd, Mode::from_raw_mode(mode))
            .map_err(|e| with_path(e.into(), "set the mode of", &dir.path))?;
        Ok(dir)
    }

    /// Creates `rel` and its missing parents below this handle, each with
    /// `mode`; returns the deepest.
    pub fn make_dirs(&self, rel: &Path, mode: u32) -> io::Result<Confined> {
        let mut dir = self.clone();
        for component in rel.components() {
            match component {
                Component::Normal(name) => dir = dir.make_dir(name, mode)?,
                Component::CurDir => {}
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("`{}` is not a path inside the drive", rel.display()),
                    ))
                }
            }
        }
        Ok(dir)
    }

    /// Hard-links `from` (below `self`) to `to` (below `target`) without
    /// following a symlink.
    pub fn hard_link(&self, from: &Path, target: &Confined, to: &Path) -> io::Result<()> {
        let (from_parent, from_name) = split(from)?;
        let (to_parent, to_name) = split(to)?;
        let from_dir = self.open_dir(from_parent)?;
        let to_dir = target.open_dir(to_parent)?;
        rustix::fs::linkat(
            &*from_dir.fd,
            from_name,
            &*to_dir.fd,
            to_name,
            AtFlags::empty(),
        )
        .map_err(|e| {
            with_path(
                e.into(),
                &format!("hard-link {} to", self.display(from).display()),
                &target.display(to),
            )
        })
    }

    /// Renames `from` to `to`, both names in this directory: with
    /// `exchange` the two swap atomically (both must exist), else `to` must
    /// not exist.
    pub fn rename(&self, from: &OsStr, to: &OsStr, exchange: bool) -> io::Result<()> {
        let (from, to) = (single_name(from)?, single_name(to)?);
        let flags = if exchange {
            RenameFlags::EXCHANGE
        } else {
            RenameFlags::NOREPLACE
        };
        rustix::fs::renameat_with(&*self.fd, from, &*self.fd, to, flags).map_err(|e| {
            with_path(
                e.into(),
                &format!("rename {} to", self.display(Path::new(from)).display()),
                &self.display(Path::new(to)),
            )
        })
    }

    /// fsyncs this directory, so renames and removals in it are durable.
    pub fn sync(&self) -> io::Result<()> {
        rustix::fs::fsync(&*self.fd).map_err(|e| with_path(e.into(), "fsync", &self.path))
    }

    /// Flushes the whole filesystem this directory is on, reporting
    /// writeback errors.
    pub fn sync_filesystem(&self) -> io::Result<()> {
        rustix::fs::syncfs(&*self.fd)
            .map_err(|e| with_path(e.into(), "flush the drive holding", &self.path))
    }

    /// Free bytes on the filesystem (f_bavail × f_frsize).
    pub fn free_bytes(&self) -> io::Result<u64> {
        let stat = rustix::fs::fstatvfs(&*self.fd)
            .map_err(|e| with_path(e.into(), "read the free space of", &self.path))?;
        Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// Sets the access and modification times of an open file.
    pub fn set_times(file: &std::fs::File, mtime: SystemTime) -> io::Result<()> {
        let since = mtime
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let spec = Timespec {
            tv_sec: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: since.subsec_nanos().into(),
        };
        let times = Timestamps {
            last_access: spec,
            last_modification: spec,
        };
        rustix::fs::futimens(file, &times).map_err(io::Error::from)
    }

    /// The names in this directory with what each is (not following any).
    fn entries(&self) -> io::Result<Vec<(OsString, Meta)>> {
        let mut dir = rustix::fs::Dir::read_from(&*self.fd)
            .map_err(|e| with_path(e.into(), "read", &self.path))?;
        let mut out = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(|e| with_path(e.into(), "read", &self.path))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = OsStr::from_bytes(name).to_os_string();
            let stat = rustix::fs::statat(&*self.fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| with_path(e.into(), "look at", &self.path.join(&name)))?;
            out.push((name, Meta::of(&stat)));
        }
        Ok(out)
    }

    /// Every directory and regular file below `rel`, iteratively, sorted
    /// by path. Anything else (symlink, FIFO, socket, device node), a tree
    /// deeper than `limits.depth` or larger than `limits.entries` is a
    /// [`WalkError::Layout`] naming the path.
    pub fn walk(&self, rel: &Path, limits: Limits) -> Result<Vec<Node>, WalkError> {
        let io = |e: io::Error| WalkError::Io(e.to_string());
        let top = self.open_dir(rel).map_err(layout_or_io)?;
        let mut out = Vec::new();
        // (directory, its path relative to `rel`, its depth)
        let mut pending = vec![(top, PathBuf::new(), 0usize)];
        while let Some((dir, at, depth)) = pending.pop() {
            let entries = dir.entries().map_err(io)?;
            if !entries.is_empty() && depth >= limits.depth {
                return Err(WalkError::Layout(format!(
                    "{} is more than {} directory levels deep, deeper than a borg repository ever is; remove it from the drive",
                    self.display(&rel.join(&at)).display(),
                    limits.depth
                )));
            }
            for (name, meta) in entries {
                let child = at.join(&name);
                if out.len() >= limits.entries {
                    return Err(WalkError::Layout(format!(
                        "{} holds more than {} entries, more than a borg repository copy should; remove what does not belong there",
                        self.display(rel).display(),
                        limits.entries
                    )));
                }
                match meta.kind {
                    Kind::Dir => {
                        let sub = dir.open_dir(Path::new(&name)).map_err(layout_or_io)?;
                        pending.push((sub, child.clone(), depth + 1));
                    }
                    Kind::File => {}
                    other => {
                        return Err(WalkError::Layout(format!(
                            "{} is {}; ferry's directory on a drive holds only directories and regular files: remove it from the drive",
                            self.display(&rel.join(&child)).display(),
                            other.described()
                        )))
                    }
                }
                out.push(Node { rel: child, meta });
            }
        }
        out.sort_by(|a, b| a.rel.cmp(&b.rel));
        Ok(out)
    }

    /// Removes the entry `name` of this directory and, if it is a
    /// directory, everything in it, iteratively, never following a link
    /// (a symlink is removed, not what it points at). A missing entry is
    /// fine. Deeper than `limits.depth` or more than `limits.entries`
    /// entries is a [`WalkError::Layout`] and what was not reached stays.
    pub fn remove_tree(&self, name: &OsStr, limits: Limits) -> Result<(), WalkError> {
        let io = |e: io::Error| WalkError::Io(e.to_string());
        let name = single_name(name).map_err(io)?;
        let shown = self.display(Path::new(name));
        let meta = match rustix::fs::statat(&*self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Meta::of(&stat),
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(io(with_path(e.into(), "look at", &shown))),
        };
        if meta.kind != Kind::Dir {
            return rustix::fs::unlinkat(&*self.fd, name, AtFlags::empty())
                .map_err(|e| io(with_path(e.into(), "remove", &shown)));
        }
        struct Frame {
            dir: Confined,
            name: OsString,
            subdirs: Vec<OsString>,
        }
        let mut removed = 0usize;
        let mut open = |parent: &Confined, name: &OsStr| -> Result<Frame, WalkError> {
            let dir = parent.open_dir(Path::new(name)).map_err(layout_or_io)?;
            let mut subdirs = Vec::new();
            for (child, meta) in dir.entries().map_err(io)? {
                removed += 1;
                if removed > limits.entries {
                    return Err(WalkError::Layout(format!(
                        "{} holds more than {} entries; remove it from the drive by hand",
                        shown.display(),
                        limits.entries
                    )));
                }
                if meta.kind == Kind::Dir {
                    subdirs.push(child);
                } else {
                    rustix::fs::unlinkat(&*dir.fd, child.as_os_str(), AtFlags::empty())
                        .map_err(|e| io(with_path(e.into(), "remove", &dir.path.join(&child))))?;
                }
            }
            Ok(Frame {
                dir,
                name: name.to_os_string(),
                subdirs,
            })
        };
        let mut stack = vec![open(self, name)?];
        loop {
            let depth = stack.len();
            let Some(top) = stack.last_mut() else { break };
            if let Some(sub) = top.subdirs.pop() {
                if depth > limits.depth {
                    return Err(WalkError::Layout(format!(
                        "{} is more than {} directory levels deep, deeper than a borg repository ever is; remove it from the drive by hand",
                        shown.display(),
                        limits.depth
                    )));
                }
                let parent = top.dir.clone();
                let frame = open(&parent, &sub)?;
                stack.push(frame);
                continue;
            }
            let Some(done) = stack.pop() else { break };
            let parent = stack.last().map(|f| &f.dir).unwrap_or(self);
            rustix::fs::unlinkat(&*parent.fd, done.name.as_os_str(), AtFlags::REMOVEDIR)
                .map_err(|e| io(with_path(e.into(), "remove", &done.dir.path)))?;
        }
        Ok(())
    }
}

/// An escape attempt met on the way, or a file where a directory belongs,
/// is a layout problem; anything else an I/O one.
pub fn layout_or_io(e: io::Error) -> WalkError {
    if is_escape(&e) || errno(&e) == Some(libc::ENOTDIR) {
        WalkError::Layout(format!(
            "{e}; ferry's directory on a drive holds only directories and regular files: remove it from the drive"
        ))
    } else {
        WalkError::Io(e.to_string())
    }
}

/// One line of /proc/self/mountinfo, the fields a root proof needs.
struct MountLine {
    id: u64,
    device: String,
    root: String,
    point: PathBuf,
}

impl MountLine {
    fn parse(line: &str) -> Option<MountLine> {
        let mut fields = line.split(' ');
        let id = fields.next()?.parse().ok()?;
        let _parent = fields.next()?;
        let device = fields.next()?.to_string();
        let root = unescape_mountinfo(fields.next()?);
        let point = PathBuf::from(OsString::from_vec(
            unescape_mountinfo(fields.next()?).into_bytes(),
        ));
        Some(MountLine {
            id,
            device,
            root,
            point,
        })
    }
}

use std::os::unix::ffi::OsStringExt;

/// A field of /proc/self/mountinfo unescaped: the kernel writes space,
/// tab, newline and backslash as `\ooo`.
pub fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = |b: &u8| (b'0'..=b'7').contains(b);
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(octal) {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
            out.push(u8::try_from(value).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const LIMITS: Limits = Limits {
        depth: 8,
        entries: 1000,
    };

    fn handle(dir: &Path) -> Confined {
        Confined::open_dir_at(dir).expect("open")
    }

    #[test]
    fn lookups_never_follow_a_symlink_nor_leave_the_handle() {
        let outside = tempfile::tempdir().expect("dir");
        std::fs::write(outside.path().join("secret"), "host").expect("write");
        let drive = tempfile::tempdir().expect("dir");
        let root = drive.path();
        std::fs::create_dir(root.join("ferry")).expect("mkdir");
        symlink(outside.path(), root.join("ferry/abs")).expect("symlink");
        symlink("../..", root.join("ferry/rel")).expect("symlink");
        symlink("secret", root.join("ferry/file")).expect("symlink");
        let confined = handle(root);
        for rel in [
            "ferry/abs",
            "ferry/rel",
            "ferry/abs/x",
            "ferry/rel/etc",
            "../x",
        ] {
            let e = confined.open_dir(Path::new(rel)).expect_err(rel);
            assert!(is_escape(&e), "{rel}: {e}");
        }
        assert!(confined.open_file(Path::new("ferry/file")).is_err());
        assert!(confined
            .create_file(Path::new("ferry/abs/new"), 0o600)
            .is_err());
        assert!(confined.make_dirs(Path::new("ferry/abs/x"), 0o700).is_err());
        assert!(!outside.path().join("new").exists());
        assert!(!outside.path().join("x").exists());
        assert_eq!(
            confined
                .metadata(Path::new("ferry/abs"))
                .expect("stat")
                .map(|m| m.kind),
            Some(Kind::Symlink)
        );
    }

    /// The by-hand resolution used where openat2 is ENOSYS (systemd's
    /// RestrictSUIDSGID=) keeps openat2's rules: links are ELOOP, `..` and
    /// absolute paths EXDEV, what is inside opens.
    #[test]
    fn stepwise_lookups_keep_openat2s_rules() {
        let outside = tempfile::tempdir().expect("dir");
        let drive = tempfile::tempdir().expect("dir");
        let root = drive.path();
        std::fs::create_dir_all(root.join("ferry/nas/data")).expect("mkdir");
        std::fs::write(root.join("ferry/nas/config"), "c").expect("write");
        symlink(outside.path(), root.join("ferry/abs")).expect("symlink");
        symlink("../..", root.join("ferry/rel")).expect("symlink");
        symlink("config", root.join("ferry/nas/link")).expect("symlink");
        let confined = handle(root);
        let dir = OFlags::RDONLY | OFlags::DIRECTORY;
        for rel in [
            "ferry/abs",
            "ferry/rel",
            "ferry/abs/x",
            "ferry/rel/etc",
            "ferry/nas/link",
        ] {
            let flags = if rel.ends_with("link") {
                OFlags::RDONLY
            } else {
                dir
            };
            let e = confined
                .open_stepwise(Path::new(rel), flags, 0)
                .expect_err(rel);
            assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{rel}: {e}");
        }
        for rel in ["../x", "ferry/../../x", "/etc"] {
            let e = confined
                .open_stepwise(Path::new(rel), dir, 0)
                .expect_err(rel);
            assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "{rel}: {e}");
        }
        assert!(confined
            .open_stepwise(Path::new("ferry/nas/data"), dir, 0)
            .is_ok());
        assert!(confined
            .open_stepwise(Path::new("ferry/nas/config"), OFlags::RDONLY, 0)
            .is_ok());
        assert!(confined.open_stepwise(Path::new(""), dir, 0).is_ok());
        let made = confined.open_stepwise(
            Path::new("ferry/nas/new"),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
            0o600,
        );
        assert!(made.is_ok() && root.join("ferry/nas/new").is_file());
        assert!(confined
            .open_stepwise(
                Path::new("ferry/abs/new"),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
                0o600
            )
            .is_err());
        assert!(!outside.path().join("new").exists());
    }

    #[test]
    fn walk_refuses_special_files_and_deep_trees_by_name() {
        let drive = tempfile::tempdir().expect("dir");
        let root = drive.path();
        std::fs::create_dir_all(root.join("c/data/0")).expect("mkdir");
        std::fs::write(root.join("c/data/0/1"), "x").expect("write");
        std::fs::write(root.join("c/config"), "y").expect("write");
        let confined = handle(root);
        let nodes = confined.walk(Path::new("c"), LIMITS).expect("walk");
        let names: Vec<String> = nodes.iter().map(|n| n.rel.display().to_string()).collect();
        assert_eq!(names, ["config", "data", "data/0", "data/0/1"]);

        let fifo = root.join("c/data/0/pipe");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        let e = confined.walk(Path::new("c"), LIMITS).expect_err("fifo");
        assert!(
            matches!(&e, WalkError::Layout(m) if m.contains("data/0/pipe") && m.contains("FIFO")),
            "{e}"
        );
        std::fs::remove_file(&fifo).expect("rm");

        let mut deep = root.join("c/data");
        for _ in 0..12 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).expect("deep");
        let e = confined.walk(Path::new("c"), LIMITS).expect_err("deep");
        assert!(
            matches!(&e, WalkError::Layout(m) if m.contains("levels deep")),
            "{e}"
        );
        let tight = Limits {
            depth: 20,
            entries: 5,
        };
        let e = confined.walk(Path::new("c"), tight).expect_err("many");
        assert!(
            matches!(&e, WalkError::Layout(m) if m.contains("more than 5")),
            "{e}"
        );
    }

    #[test]
    fn remove_tree_removes_links_not_their_targets_and_stops_deep() {
        let outside = tempfile::tempdir().expect("dir");
        std::fs::write(outside.path().join("keep"), "host").expect("write");
        let drive = tempfile::tempdir().expect("dir");
        let root = drive.path();
        std::fs::create_dir_all(root.join("t/a/b")).expect("mkdir");
        std::fs::write(root.join("t/a/b/f"), "x").expect("write");
        symlink(outside.path(), root.join("t/a/link")).expect("symlink");
        let confined = handle(root);
        confined
            .remove_tree(OsStr::new("t"), LIMITS)
            .expect("remove");
        assert!(!root.join("t").exists());
        assert!(outside.path().join("keep").exists());
        confined
            .remove_tree(OsStr::new("t"), LIMITS)
            .expect("missing is fine");

        let mut deep = root.join("deep");
        for _ in 0..30 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).expect("deep");
        let e = confined
            .remove_tree(OsStr::new("deep"), LIMITS)
            .expect_err("too deep");
        assert!(
            matches!(&e, WalkError::Layout(m) if m.contains("levels deep")),
            "{e}"
        );
        let roomy = Limits {
            depth: 64,
            entries: 1000,
        };
        confined
            .remove_tree(OsStr::new("deep"), roomy)
            .expect("removed");
        assert!(!root.join("deep").exists());
    }

    #[test]
    fn exchange_swaps_two_directories() {
        let drive = tempfile::tempdir().expect("dir");
        let confined = handle(drive.path());
        let a = confined.make_dir(OsStr::new("a"), 0o700).expect("a");
        confined.make_dir(OsStr::new("b"), 0o700).expect("b");
        drop(a.create_file(Path::new("mark"), 0o600).expect("mark"));
        confined
            .rename(OsStr::new("a"), OsStr::new("b"), true)
            .expect("exchange");
        assert!(drive.path().join("b/mark").exists());
        assert!(confined
            .rename(OsStr::new("a"), OsStr::new("b"), false)
            .is_err());
    }

    #[test]
    fn a_plain_directory_is_not_a_mount_root_and_root_is() {
        let dir = tempfile::tempdir().expect("dir");
        let e = Confined::open_mount_root(dir.path()).expect_err("not a mount");
        assert!(e.to_string().contains("not the root"), "{e}");
        Confined::open_mount_root(Path::new("/")).expect("/ is a mount root");
    }

    #[test]
    fn unescapes_mountinfo() {
        let line = MountLine::parse("98 30 7:3 / /run/ferry/off\\040a rw - ext4 /dev/loop3 rw")
            .expect("line");
        assert_eq!(line.point, Path::new("/run/ferry/off a"));
        assert_eq!((line.id, line.device.as_str()), (98, "7:3"));
    }
}
