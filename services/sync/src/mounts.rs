//! Whether a drive is open: a drive counts as open when something is
//! mounted at its mountpoint, as /proc/self/mountinfo says. Nothing is
//! written to a directory that merely exists, or the copy would land on the
//! machine's own disk.

use std::path::{Path, PathBuf};

/// True when a filesystem is mounted exactly at `path`.
pub fn is_mounted(path: &Path) -> bool {
    let wanted = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let found = mount_points(&info).any(|point| point == wanted);
    found
}

/// Every mount point in a mountinfo text (field 5, unescaped).
fn mount_points(info: &str) -> impl Iterator<Item = PathBuf> + '_ {
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(ferry_service::confined::unescape_mountinfo(point)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
98 22 7:3 / /run/ferry/offsite\\040a rw,relatime shared:50 - ext4 /dev/loop3 rw
";

    #[test]
    fn finds_escaped_mount_points() {
        let points: Vec<PathBuf> = mount_points(INFO).collect();
        assert_eq!(
            points,
            [PathBuf::from("/"), PathBuf::from("/run/ferry/offsite a")]
        );
    }

    #[test]
    fn root_is_mounted_and_a_plain_directory_is_not() {
        assert!(is_mounted(Path::new("/")));
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(!is_mounted(dir.path()));
    }
}
