//! What the kernel says is mounted, and who is using a mount.
//!
//! ferry-crypt never trusts its own memory for this: before mounting it
//! checks that nothing else sits on the mountpoint, after unmounting it
//! checks that the mount is really gone, and on start it finds mounts a
//! crashed predecessor left behind. Everything here reads /proc; nothing
//! writes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ferry_service::confined::unescape_mountinfo;

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The device number of the mounted filesystem, "major:minor".
    pub majmin: String,
    /// Where it is mounted.
    pub point: PathBuf,
    /// The mount source as given to mount(2), e.g. /dev/loop3.
    pub source: String,
    /// The per-mount options, e.g. "rw,nosuid,nodev,noexec,relatime".
    pub options: String,
}

impl Mount {
    /// Whether the per-mount option `option` is set.
    pub fn has_option(&self, option: &str) -> bool {
        self.options.split(',').any(|o| o == option)
    }
}

/// Parses the text of a mountinfo file; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let separator = fields.iter().position(|f| *f == "-")?;
            Some(Mount {
                majmin: fields.get(2)?.to_string(),
                point: PathBuf::from(unescape_mountinfo(fields.get(4)?)),
                options: fields.get(5)?.to_string(),
                source: unescape_mountinfo(fields.get(separator + 2)?),
            })
        })
        .collect()
}

/// Every mount in this process's mount namespace, in mount order.
pub fn table() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// The topmost mount at `point`, if any.
pub fn at(point: &Path) -> Option<Mount> {
    table().into_iter().rev().find(|m| m.point == point)
}

/// Every mount of the block device `majmin`.
pub fn of_device(majmin: &str) -> Vec<Mount> {
    table().into_iter().filter(|m| m.majmin == majmin).collect()
}

/// The "major:minor" of a block device node, as mountinfo shows it.
pub fn device_number(device: &Path) -> Option<String> {
    let rdev = std::fs::metadata(device).ok()?.rdev();
    Some(format!("{}:{}", libc::major(rdev), libc::minor(rdev)))
}

/// A process using something under a mountpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its process id.
    pub pid: u32,
    /// Its command name (/proc/PID/comm).
    pub command: String,
    /// How it holds the mount: "open file …", "working directory" or "root".
    pub how: String,
}

/// Every process with an open file, its working directory or its root under
/// `point` (as far as /proc lets us see; other namespaces may hide some).
pub fn holders(point: &Path) -> Vec<Holder> {
    let under = |target: &Path| target == point || target.starts_with(point);
    holders_by(|link| std::fs::read_link(link).ok().filter(|t| under(t)))
}

/// Every process with an open file, its working directory or its root on
/// the filesystem of device `majmin` (also one detached from every mount).
pub fn holders_of_device(majmin: &str) -> Vec<Holder> {
    holders_by(|link| {
        let dev = std::fs::metadata(link).ok()?.dev();
        (format!("{}:{}", libc::major(dev), libc::minor(dev)) == majmin)
            .then(|| std::fs::read_link(link).unwrap_or_default())
    })
}

/// The processes for which `on` accepts the /proc/PID/cwd or root link, or
/// one of /proc/PID/fd/*, returning the target it names.
fn holders_by(on: impl Fn(&Path) -> Option<PathBuf>) -> Vec<Holder> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let proc_dir = entry.path();
        let command = std::fs::read_to_string(proc_dir.join("comm"))
            .map(|c| c.trim_end().to_string())
            .unwrap_or_else(|_| "?".into());
        let mut how = None;
        for (link, label) in [("cwd", "working directory"), ("root", "root directory")] {
            if on(&proc_dir.join(link)).is_some() {
                how = Some(label.to_string());
            }
        }
        if how.is_none() {
            if let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) {
                how = fds
                    .flatten()
                    .find_map(|fd| on(&fd.path()))
                    .map(|t| format!("open file {}", t.display()));
            }
        }
        if let Some(how) = how {
            found.push(Holder { pid, command, how });
        }
    }
    found
}

/// The holders for a message: "pid 12 (rsync, open file /x), pid 40 (bash, working directory)".
pub fn describe(holders: &[Holder]) -> String {
    if holders.is_empty() {
        return "no process could be found holding it (a bind mount, a loop device or another namespace may)".into();
    }
    holders
        .iter()
        .map(|h| {
            format!(
                "pid {} ({}, {})",
                h.pid,
                h.command.escape_debug(),
                h.how.escape_debug()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
98 30 7:3 / /run/ferry/offsite\\040a rw,nosuid,nodev,noexec,relatime shared:50 - ext4 /dev/loop3 rw
99 30 0:50 / /run/ferry/b rw,relatime - tmpfs tmpfs rw,size=1024k
bad line
";

    #[test]
    fn parses_points_sources_options_and_escapes() {
        let mounts = parse(SAMPLE);
        assert_eq!(mounts.len(), 3);
        let m = &mounts[1];
        assert_eq!(m.majmin, "7:3");
        assert_eq!(m.point, Path::new("/run/ferry/offsite a"));
        assert_eq!(m.source, "/dev/loop3");
        assert!(m.has_option("nosuid") && m.has_option("noexec") && !m.has_option("ro"));
        assert_eq!(mounts[2].source, "tmpfs");
        assert_eq!(mounts[2].point, Path::new("/run/ferry/b"));
    }

    #[test]
    fn the_live_table_has_the_root() {
        assert!(table().iter().any(|m| m.point == Path::new("/")));
        assert!(at(Path::new("/")).is_some());
    }

    #[test]
    fn finds_this_process_as_a_holder() {
        let dir = tempfile::tempdir().expect("dir");
        let file = std::fs::File::create(dir.path().join("held")).expect("file");
        let found = holders(dir.path());
        let me = std::process::id();
        assert!(
            found.iter().any(|h| h.pid == me && h.how.contains("held")),
            "{found:?}"
        );
        assert!(describe(&found).contains(&format!("pid {me} (")));
        drop(file);
        assert!(describe(&[]).contains("no process"));
    }
}
