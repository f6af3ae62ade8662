//! Image files on real loop devices, seen by the real udev.

use std::ffi::{CString, OsStr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::run;

/// How long a detach may take to be carried out by the kernel.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);

/// An image file that can be attached as a loop device. Drop unmounts
/// everything mounted from any loop device backed by the image (best
/// effort), detaches those devices and deletes the file, also when the test
/// panics. Needs root and loop devices: check with
/// [`require_loop_devices`](crate::require_loop_devices) first.
pub struct LoopImage {
    path: PathBuf,
    device: Option<String>,
}

impl LoopImage {
    /// Take over an image file that the test made (e.g. to `cryptsetup
    /// luksFormat` it); it is deleted on drop.
    pub fn from_file(path: impl Into<PathBuf>) -> LoopImage {
        let path = path.into();
        let path = path.canonicalize().unwrap_or(path);
        LoopImage { path, device: None }
    }

    /// A new sparse, all-zero image of `size_mib` MiB in `dir`.
    pub fn blank(dir: &Path, size_mib: u64) -> LoopImage {
        let file = tempfile::Builder::new()
            .prefix("ferry-loop-")
            .suffix(".img")
            .tempfile_in(dir)
            .expect("create image file");
        file.as_file()
            .set_len(size_mib * 1024 * 1024)
            .expect("size image file");
        let (_, path) = file.keep().expect("keep image file");
        LoopImage::from_file(path)
    }

    /// A new image of `size_mib` MiB in `dir` holding an ext4 file system
    /// with the given UUID and label (`mkfs.ext4 -q -U uuid -L label`).
    pub fn ext4(dir: &Path, size_mib: u64, uuid: &str, label: &str) -> LoopImage {
        let image = LoopImage::blank(dir, size_mib);
        run(
            "mkfs.ext4",
            &[
                OsStr::new("-q"),
                OsStr::new("-F"),
                OsStr::new("-U"),
                OsStr::new(uuid),
                OsStr::new("-L"),
                OsStr::new(label),
                image.path.as_os_str(),
            ],
        );
        image
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The loop device while attached, e.g. `/dev/loop3`.
    pub fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// Attach the image to a free loop device (`losetup --find --show`) and
    /// return it; udev sees it as a new block device. If already attached,
    /// returns that device.
    pub fn attach(&mut self) -> String {
        self.attach_with(&[])
    }

    /// [`LoopImage::attach`] with the loop device reading and writing its
    /// backing file with O_DIRECT (`losetup --direct-io=on`): the host's
    /// page cache then holds none of the drive's blocks, so a read that
    /// misses the drive's own cache goes to the disk, as on a real drive
    /// (benchmarks; the tests do not need it).
    pub fn attach_direct(&mut self) -> String {
        self.attach_with(&[OsStr::new("--direct-io=on")])
    }

    fn attach_with(&mut self, options: &[&OsStr]) -> String {
        if let Some(device) = &self.device {
            return device.clone();
        }
        // The kernel reports the backing file by its canonical path.
        if let Ok(path) = self.path.canonicalize() {
            self.path = path;
        }
        let mut args = vec![OsStr::new("--find"), OsStr::new("--show")];
        args.extend_from_slice(options);
        args.push(self.path.as_os_str());
        let out = run("losetup", &args);
        let device = out.trim().to_string();
        assert!(
            device.starts_with("/dev/loop"),
            "losetup printed {out:?}, not a loop device"
        );
        self.device = Some(device.clone());
        device
    }

    /// Detach the loop device (`losetup -d`) and wait (up to 10 s) until the
    /// kernel has let go of it: while udev still has it open, the kernel
    /// only marks it for release. Mounts are left alone (the kernel then
    /// frees the device when they are gone, and this does not wait); Drop
    /// unmounts.
    pub fn detach(&mut self) {
        let Some(device) = self.device.take() else {
            return;
        };
        run("losetup", &["-d", device.as_str()]);
        let mounted = self
            .backing_devices()
            .iter()
            .any(|(d, majmin)| *d == device && !mounts_of(majmin).is_empty());
        if !mounted && !self.wait_released(&device, DETACH_TIMEOUT) {
            panic!(
                "{device} still holds {} {DETACH_TIMEOUT:?} after losetup -d",
                self.path.display()
            );
        }
    }

    /// Wait until `device` no longer has this image as backing file.
    fn wait_released(&self, device: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.backing_devices().iter().any(|(d, _)| d == device) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every loop device whose backing file is this image, as (name, "maj:min").
    fn backing_devices(&self) -> Vec<(String, String)> {
        let Ok(entries) = std::fs::read_dir("/sys/block") else {
            return Vec::new();
        };
        let wanted = self.path.to_string_lossy().into_owned();
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.starts_with("loop") {
                    return None;
                }
                let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
                let backing = backing.trim_end_matches('\n');
                let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
                if backing != wanted {
                    return None;
                }
                let majmin = std::fs::read_to_string(e.path().join("dev")).ok()?;
                Some((format!("/dev/{name}"), majmin.trim().to_string()))
            })
            .collect()
    }
}

/// Mount points of the block device `majmin` ("7:3"), deepest (latest) first.
fn mounts_of(majmin: &str) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let dev = fields.nth(2)?;
            let point = fields.nth(1)?;
            (dev == majmin).then(|| PathBuf::from(unescape_mountinfo(point)))
        })
        .collect();
    points.reverse();
    points
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = |b: &u8| (b'0'..=b'7').contains(b);
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(octal) {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unmount(point: &Path) {
    let Ok(c) = CString::new(point.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: valid C string; plain syscalls.
    unsafe {
        if libc::umount2(c.as_ptr(), 0) != 0 {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}

impl Drop for LoopImage {
    fn drop(&mut self) {
        for (device, majmin) in self.backing_devices() {
            for point in mounts_of(&majmin) {
                unmount(&point);
            }
            let _ = std::process::Command::new(
                crate::command_path("losetup").unwrap_or_else(|| "losetup".into()),
            )
            .args(["-d", &device])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
            self.wait_released(&device, DETACH_TIMEOUT);
        }
        self.device = None;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Wait until udev has handled every queued event (`udevadm settle
/// --timeout=10`); panics if it does not settle.
pub fn udev_settle() {
    run("udevadm", &["settle", "--timeout=10"]);
}

/// One property of a device in udev's database (`udevadm info
/// --query=property`), e.g. `udev_property("/dev/loop3", "ID_FS_UUID")`.
pub fn udev_property(device: &str, key: &str) -> Option<String> {
    let out = run("udevadm", &["info", "--query=property", "--name", device]);
    out.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}
