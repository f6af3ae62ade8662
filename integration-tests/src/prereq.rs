//! Prerequisites, checked inside a test: what it needs is declared in its
//! file's `integration_tests!` list ([`crate::trials`]), where the runner
//! skips a test this machine cannot run. A `require_…` call that still finds
//! something missing means the declaration is wrong (or, under `CI=true`,
//! the machine is): the test fails, saying what is missing and how to get
//! it. Never a silent pass.

use std::path::{Path, PathBuf};

/// True when running under CI (`CI=true`), where a missing prerequisite
/// fails the test instead of skipping it.
pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// The name of the running test, for messages.
fn test_name() -> String {
    let thread = std::thread::current();
    match thread.name() {
        Some(name) if name != "main" => name.to_string(),
        _ => std::env::var("NEXTEST_TEST_NAME").unwrap_or_else(|_| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "test".into())
        }),
    }
}

/// `true` when `ok`; otherwise the test fails with `what` (which should say
/// what is missing and how to install or start it).
pub fn require(what: &str, ok: bool) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!(
            "prerequisite missing under CI=true: {what} \
             (.ci/run installs and starts everything the tests need)"
        );
    }
    panic!(
        "prerequisite missing: {what}; this test's entry in its file's \
         integration_tests! list should name it (Needs::Machine), so that the \
         runner skips it here ({})",
        test_name()
    );
}

/// Running as root (uid 0).
pub fn have_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A `systemd-udevd` process is running (it delivers the udev events).
pub fn have_udevd() -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
            && std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end() == "systemd-udevd")
    })
}

/// Loop devices can be set up: `/dev/loop-control` exists and we are root.
pub fn have_loop_devices() -> bool {
    Path::new("/dev/loop-control").exists() && have_root()
}

/// Where the command `name` is: searched in `PATH`, then in the sbin and bin
/// directories (a root PATH without sbin still finds mkfs.ext4).
pub fn command_path(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name)).filter(|p| is_executable(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .map(PathBuf::from),
        )
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The command `name` can be found (see [`command_path`]).
pub fn have_command(name: &str) -> bool {
    command_path(name).is_some()
}

/// [`require`] root.
pub fn require_root() -> bool {
    require("needs root (run the tests as root)", have_root())
}

/// [`require`] a running udevd.
pub fn require_udevd() -> bool {
    require(
        "systemd-udevd is not running (apt-get install udev; start it with \
         /lib/systemd/systemd-udevd --daemon)",
        have_udevd(),
    )
}

/// [`require`] loop devices (and root).
pub fn require_loop_devices() -> bool {
    require(
        "loop devices are not available (needs root and /dev/loop-control: modprobe loop)",
        have_loop_devices(),
    )
}

/// [`require`] the command `name`, from the Debian package `package`.
pub fn require_command(name: &str, package: &str) -> bool {
    require(
        &format!("command {name} not found (apt-get install {package})"),
        have_command(name),
    )
}
