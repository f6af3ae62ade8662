//! Block devices: finding an enrolled drive's device through udev, and
//! deciding whether a device is free to be erased by enrolment.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ferry_config::FsUuid;

use crate::mounts::{self, Mount};

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

/// Why a device may not be erased; each message says what uses it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceRefused {
    #[error("cannot use {device}: {source}")]
    Unusable { device: String, source: io::Error },
    #[error("{device} is not a block device")]
    NotBlock { device: String },
    #[error("{device} is not known to sysfs")]
    NotInSysfs { device: String },
    #[error("{device} holds the running system ({source_device} is mounted at {point}): ferry will not erase it")]
    System {
        device: String,
        source_device: String,
        point: String,
    },
    #[error("{device} is in use: /dev/{name} is mounted at {point}; unmount it first, and make sure it is the drive you mean to erase")]
    Mounted {
        device: String,
        name: String,
        point: String,
    },
    #[error("{device} is in use: /dev/{name} is held by {holders} (device-mapper, RAID or LVM); stop that first")]
    Held {
        device: String,
        name: String,
        holders: String,
    },
    #[error("{device} is in use as swap ({swap}): swapoff it first")]
    Swap { device: String, swap: String },
    #[error("{device} is in use (the kernel refuses to open it exclusively): close whatever uses it first")]
    Busy { device: String },
    #[error("cannot open {device}: {source}")]
    Open { device: String, source: io::Error },
}

/// Refuses a device that is not a block device, or that is mounted, mapped,
/// used as swap, part of a RAID or LVM, or holds the running system.
pub fn check_unused(device: &Path) -> Result<(), DeviceRefused> {
    let shown = || device.display().to_string();
    let meta = std::fs::metadata(device).map_err(|source| DeviceRefused::Unusable {
        device: shown(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(DeviceRefused::NotBlock { device: shown() });
    }
    let dir = sysfs_dir(device).ok_or_else(|| DeviceRefused::NotInSysfs { device: shown() })?;
    let members = family(&dir);
    let table = mounts::table();
    for (sys, majmin, name) in &members {
        let mounted = |m: &&Mount| m.majmin == *majmin;
        if let Some(m) = table
            .iter()
            .filter(mounted)
            .find(|m| m.point == Path::new("/"))
        {
            return Err(DeviceRefused::System {
                device: shown(),
                source_device: m.source.clone(),
                point: m.point.display().to_string(),
            });
        }
        if let Some(m) = table.iter().find(mounted) {
            return Err(DeviceRefused::Mounted {
                device: shown(),
                name: name.clone(),
                point: m.point.display().to_string(),
            });
        }
        let holders: Vec<String> = std::fs::read_dir(sys.join("holders"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if !holders.is_empty() {
            return Err(DeviceRefused::Held {
                device: shown(),
                name: name.clone(),
                holders: holders.join(", "),
            });
        }
    }
    if let Some(swap) = swap_among(&members) {
        return Err(DeviceRefused::Swap {
            device: shown(),
            swap,
        });
    }
    // The kernel's own answer: an exclusive open fails while anything
    // (a mount, a mapping, a RAID) has claimed the device.
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(device)
        .map(drop)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EBUSY) => DeviceRefused::Busy { device: shown() },
            _ => DeviceRefused::Open {
                device: shown(),
                source,
            },
        })
}

/// The swap device among `members` (the device and its partitions), if any.
fn swap_among(members: &[(PathBuf, String, String)]) -> Option<String> {
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    swaps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .find(|swap| {
            mounts::device_number(Path::new(swap))
                .is_some_and(|d| members.iter().any(|(_, majmin, _)| *majmin == d))
        })
        .map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_free_block_device() {
        let err = check_unused(Path::new("/etc/hostname"))
            .expect_err("a file")
            .to_string();
        assert!(err.contains("not a block device"), "{err}");
        let err = check_unused(Path::new("/nonexistent-ferry"))
            .expect_err("missing")
            .to_string();
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
        let err = check_unused(&node)
            .expect_err("the root device")
            .to_string();
        assert!(
            err.contains("running system") || err.contains("in use"),
            "{err}"
        );
    }
}
