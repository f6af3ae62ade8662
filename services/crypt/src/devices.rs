//! Block devices: finding an enrolled drive's device through udev, and
//! deciding whether a device is free to be erased by enrolment.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ferry_config::FsUuid;

use crate::mounts;

/// The device node udev knows with ID_FS_UUID `uuid` (the LUKS UUID of an
/// encrypted drive, the filesystem UUID of a plain one), if any.
pub fn device_by_uuid(uuid: &FsUuid) -> Option<String> {
    let scan = || -> std::io::Result<Option<String>> {
        let mut enumerator = udev::Enumerator::new()?;
        enumerator.match_subsystem("block")?;
        Ok(enumerator.scan_devices()?.find_map(|device| {
            let matches = device
                .property_value("ID_FS_UUID")
                .and_then(|v| v.to_str())
                .is_some_and(|v| uuid.matches(v));
            matches
                .then(|| device.devnode().map(|p| p.to_string_lossy().into_owned()))
                .flatten()
        }))
    };
    scan().unwrap_or_else(|e| {
        tracing::warn!("cannot ask udev for the device with UUID {uuid}: {e}");
        None
    })
}

/// ID_FS_UUID of `device` as udev reports it now.
pub fn uuid_of(device: &Path) -> Option<String> {
    let device = udev::Device::from_syspath(&sysfs_dir(device)?).ok()?;
    device
        .property_value("ID_FS_UUID")
        .and_then(|v| v.to_str())
        .map(str::to_string)
}

/// The sysfs directory of a block device node.
fn sysfs_dir(device: &Path) -> Option<PathBuf> {
    let majmin = mounts::device_number(device)?;
    Path::new("/sys/dev/block").join(majmin).canonicalize().ok()
}

/// The device and its partitions, as (sysfs dir, "major:minor", name).
fn family(dir: &Path) -> Vec<(PathBuf, String, String)> {
    let mut members = vec![dir.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        members.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join("partition").is_file()),
        );
    }
    members
        .into_iter()
        .filter_map(|m| {
            let majmin = std::fs::read_to_string(m.join("dev"))
                .ok()?
                .trim()
                .to_string();
            let name = m.file_name()?.to_string_lossy().into_owned();
            Some((m, majmin, name))
        })
        .collect()
}

/// Refuses a device that is not a block device, or that is mounted, mapped,
/// used as swap, part of a RAID or LVM, or holds the running system. The
/// error says what uses it.
pub fn check_unused(device: &Path) -> Result<(), String> {
    let shown = device.display();
    let meta = std::fs::metadata(device).map_err(|e| format!("cannot use {shown}: {e}"))?;
    if !meta.file_type().is_block_device() {
        return Err(format!("{shown} is not a block device"));
    }
    let dir = sysfs_dir(device).ok_or_else(|| format!("{shown} is not known to sysfs"))?;
    let members = family(&dir);
    let table = mounts::table();
    for (sys, majmin, name) in &members {
        if let Some(m) = table
            .iter()
            .find(|m| m.majmin == *majmin && m.point == Path::new("/"))
        {
            return Err(format!(
                "{shown} holds the running system ({} is mounted at {}): ferry will not erase it",
                m.source,
                m.point.display()
            ));
        }
        if let Some(m) = table.iter().find(|m| m.majmin == *majmin) {
            return Err(format!(
                "{shown} is in use: /dev/{name} is mounted at {}; unmount it first, and make sure it is the drive you mean to erase",
                m.point.display()
            ));
        }
        let holders: Vec<String> = std::fs::read_dir(sys.join("holders"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if !holders.is_empty() {
            return Err(format!(
                "{shown} is in use: /dev/{name} is held by {} (device-mapper, RAID or LVM); stop that first",
                holders.join(", ")
            ));
        }
    }
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    for swap in swaps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
    {
        if mounts::device_number(Path::new(swap))
            .is_some_and(|d| members.iter().any(|(_, majmin, _)| *majmin == d))
        {
            return Err(format!(
                "{shown} is in use as swap ({swap}): swapoff it first"
            ));
        }
    }
    // The kernel's own answer: an exclusive open fails while anything
    // (a mount, a mapping, a RAID) has claimed the device.
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(device)
        .map(drop)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => format!("{shown} is in use (the kernel refuses to open it exclusively): close whatever uses it first"),
            _ => format!("cannot open {shown}: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_free_block_device() {
        let err = check_unused(Path::new("/etc/hostname")).expect_err("a file");
        assert!(err.contains("not a block device"), "{err}");
        let err = check_unused(Path::new("/nonexistent-ferry")).expect_err("missing");
        assert!(err.contains("cannot use"), "{err}");
    }

    #[test]
    fn refuses_the_device_holding_the_root_filesystem() {
        let Some(root) = mounts::at(Path::new("/")) else {
            return;
        };
        let node = PathBuf::from(&root.source);
        if !node.exists() {
            eprintln!(
                "SKIP: the root filesystem ({}) has no device node here",
                root.source
            );
            return;
        }
        let err = check_unused(&node).expect_err("the root device");
        assert!(
            err.contains("running system") || err.contains("in use"),
            "{err}"
        );
    }
}
