//! Test harness for ferry's integration tests.
//!
//! Everything here works on the real thing: a private `dbus-daemon`
//! ([`TestBus`]), the real service binaries ([`ServiceProcess`]), real loop
//! devices seen by the real udev ([`LoopImage`]). Every wait has a timeout and
//! panics with what it saw; everything a test starts or creates is removed in
//! `Drop`, also when the test panics (then the services' logs are printed).
//!
//! A typical test:
//!
//! ```no_run
//! # use ferry_integration_tests::*;
//! # use std::time::Duration;
//! # async fn t() {
//! let bus = TestBus::start();
//! let conn = bus.connect().await;
//! let signals = SignalRecorder::new(&conn).await;
//! let led = bus.spawn("ferry-led", &["--config", "/path/to/ferry.toml"], &[]);
//! led.wait_for_name(&conn, ferry_interfaces::led::BUS_NAME, Duration::from_secs(10)).await;
//! signals
//!     .wait_for("ColorChanged", |s| s.args[1] == "idle", Duration::from_secs(5))
//!     .await;
//! # }
//! ```
//!
//! What a test needs from the machine (root, udevd, loop devices, Debian
//! packages, device-mapper) is declared with its name in the file's
//! [`integration_tests!`] list ([`trials`]): a test the machine cannot run is
//! reported skipped by the runner, and under `CI=true` it runs and fails on
//! what is missing ([`require`] and friends say what).

mod bus;
pub mod http;
pub mod introspection;
mod loopdev;
mod prereq;
mod process;
mod signals;
pub mod smtp;
pub mod sshd;
pub mod system;
pub mod trials;

pub use bus::{bin_dir, binary_path, wait_for_name, ServiceProcess, TestBus, METHOD_TIMEOUT};
pub use loopdev::{udev_property, udev_settle, LoopImage};
pub use prereq::{
    command_path, have_command, have_loop_devices, have_root, have_udevd, in_ci, require,
    require_command, require_loop_devices, require_root, require_udevd,
};
pub use process::run;
pub use signals::{Recorded, SignalRecorder};

/// A fresh random UUID (lowercase, hyphenated), from the kernel.
pub fn random_uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("read /proc/sys/kernel/random/uuid")
        .trim()
        .to_string()
}
