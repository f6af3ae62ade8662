//! The integration tests' own harness: what a test needs from the machine is
//! declared next to its name, checked when the runner lists the tests, and a
//! test this machine cannot run is reported **skipped by the runner**
//! (nextest's SKIP, libtest's "ignored"), never as a pass. Under `CI=true`
//! nothing is skipped for a missing package, root or udevd: the test runs
//! and fails on the missing piece, saying what it is.
//!
//! Built on libtest-mimic, the field's crate for custom test harnesses:
//! libtest's `#[test]` can only ignore at compile time.
//!
//! A test file ends with the list of its tests:
//!
//! ```ignore
//! ferry_integration_tests::integration_tests! {
//!     async Machine: [plug_in_and_pull, a_yank_is_reported],
//!     async Nothing: [the_contract_matches],
//!     sync Nothing: [parses_the_config],
//! }
//! ```

use std::process::ExitCode;

use crate::prereq::{command_path, have_loop_devices, have_root, have_udevd, in_ci};

/// What a test needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Only what building the tests needs (a private dbus-daemon, the
    /// binaries).
    Nothing,
    /// Root, a running systemd-udevd, loop devices and the Debian packages
    /// `scripts/setup --tests` installs.
    Machine,
    /// [`Needs::Machine`] and a kernel with device-mapper (mapping a LUKS
    /// device). CI machines and containers have none: there these tests are
    /// skipped even under `CI=true`, and the VM tier runs the same steps
    /// under real systemd.
    DeviceMapper,
}

/// Commands the Machine tests run, with the Debian package that has each.
const MACHINE_COMMANDS: &[(&str, &str)] = &[
    ("dbus-daemon", "dbus"),
    ("borg", "borgbackup"),
    ("cryptsetup", "cryptsetup-bin"),
    ("mkfs.ext4", "e2fsprogs"),
    ("mkfs.xfs", "xfsprogs"),
    ("xfs_io", "xfsprogs"),
    ("losetup", "mount"),
    ("udevadm", "udev"),
];

impl Needs {
    /// Why this machine cannot run such a test, or `None` when it can.
    pub fn missing(self) -> Option<String> {
        let dbus = (!have_command("dbus-daemon"))
            .then(|| "dbus-daemon (apt-get install dbus)".to_string());
        let machine = || -> Vec<String> {
            let mut missing = Vec::new();
            if !have_root() {
                missing.push("root".to_string());
            }
            if !have_udevd() {
                missing.push(
                    "a running systemd-udevd (/lib/systemd/systemd-udevd --daemon)".to_string(),
                );
            }
            if !have_loop_devices() {
                missing.push("loop devices (modprobe loop)".to_string());
            }
            for (command, package) in MACHINE_COMMANDS {
                if !have_command(command) {
                    missing.push(format!("{command} (apt-get install {package})"));
                }
            }
            missing
        };
        let missing: Vec<String> = match self {
            Needs::Nothing => dbus.into_iter().collect(),
            Needs::Machine if in_ci() => Vec::new(),
            Needs::Machine => machine(),
            Needs::DeviceMapper => {
                let mut missing = if in_ci() { Vec::new() } else { machine() };
                if !have_device_mapper() {
                    missing.push("a kernel with device-mapper (the VM tier has one)".to_string());
                }
                missing
            }
        };
        (!missing.is_empty()).then(|| missing.join(", "))
    }
}

fn have_command(name: &str) -> bool {
    command_path(name).is_some()
}

/// The kernel has device-mapper and its control node exists.
pub fn have_device_mapper() -> bool {
    std::path::Path::new("/sys/class/misc/device-mapper").exists()
        && std::path::Path::new("/dev/mapper/control").exists()
}

/// One test: its name, what it needs, and its body.
pub struct Test {
    name: &'static str,
    needs: Needs,
    body: Box<dyn FnOnce() + Send>,
}

/// A test whose body is `body`.
pub fn test(name: &'static str, needs: Needs, body: impl FnOnce() + Send + 'static) -> Test {
    Test {
        name,
        needs,
        body: Box::new(body),
    }
}

/// Runs an async test body on a runtime of its own (two worker threads, as
/// the services' own tests do).
pub fn block_on<F: std::future::Future<Output = ()>>(body: F) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(body),
        Err(e) => panic!("cannot start a tokio runtime for the test: {e}"),
    }
}

/// Lists or runs `tests` as libtest would, with the command line the runner
/// gave; a test this machine cannot run is ignored, its reason printed when
/// the whole file runs (not when listing, nor for one test by name as
/// nextest runs them: `scripts/test` says it up front).
pub fn run(tests: Vec<Test>) -> ExitCode {
    let arguments = libtest_mimic::Arguments::from_args();
    let listing = arguments.list;
    let trials = tests
        .into_iter()
        .map(|test| {
            let missing = test.needs.missing();
            if let (Some(why), false, None) = (&missing, listing, &arguments.filter) {
                eprintln!("SKIP {}: needs {why}", test.name);
            }
            let body = test.body;
            libtest_mimic::Trial::test(test.name, move || {
                body();
                Ok(())
            })
            .with_ignored_flag(missing.is_some())
        })
        .collect();
    libtest_mimic::run(&arguments, trials).exit_code()
}

/// What every [`Needs`] lacks on this machine, for `scripts/test` to say up
/// front which tests will be skipped and why.
pub fn report() -> Vec<(Needs, Option<String>)> {
    [Needs::Nothing, Needs::Machine, Needs::DeviceMapper]
        .into_iter()
        .map(|needs| (needs, needs.missing()))
        .collect()
}

/// Declares a test file's tests (see the module doc) and its `main`.
#[macro_export]
macro_rules! integration_tests {
    ($( $kind:ident $needs:ident : [ $($name:ident),* $(,)? ] ),* $(,)?) => {
        fn main() -> std::process::ExitCode {
            #[allow(unused_mut)]
            let mut tests = Vec::new();
            $( $(
                tests.push($crate::trials::test(
                    stringify!($name),
                    $crate::trials::Needs::$needs,
                    $crate::integration_tests!(@body $kind $name),
                ));
            )* )*
            $crate::trials::run(tests)
        }
    };
    (@body async $name:ident) => { || $crate::trials::block_on($name()) };
    (@body sync $name:ident) => { || $name() };
}
