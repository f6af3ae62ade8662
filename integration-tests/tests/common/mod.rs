//! Pieces the watcher and LED tests share: a config file on disk and the
//! standard waits.

#![allow(dead_code)]

pub mod peers;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A generous bound for anything udev and the bus do.
pub const WAIT: Duration = Duration::from_secs(15);
/// How long "nothing happens" is watched for.
pub const QUIET: Duration = Duration::from_secs(2);

/// Writes `text` as ferry.toml in `dir` and returns its path. Unless the
/// text sets its own, the state directory is `dir/state`: a test never
/// writes to the machine's /var/lib/ferry.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("ferry.toml");
    let text = if text.contains("state-directory") {
        text.to_string()
    } else {
        let state = dir.join("state");
        std::fs::create_dir_all(&state).expect("state directory");
        format!("state-directory = \"{}\"\n{text}", state.display())
    };
    std::fs::write(&path, text).expect("write ferry.toml");
    path
}

/// A `[drives.<name>]` section for a plain drive.
pub fn drive_section(name: &str, uuid: &str) -> String {
    format!("[drives.{name}]\nuuid = \"{uuid}\"\n\n")
}

/// A `[led]` section with the file backend writing to `file`.
pub fn led_file_section(file: &Path) -> String {
    format!(
        "[led]\nbackend = \"file\"\nfile = \"{}\"\n\n",
        file.display()
    )
}

/// True when the machine can do real udev and loop devices (or, under CI,
/// panics saying what is missing).
pub fn udev_and_loop() -> bool {
    ferry_integration_tests::require_root()
        && ferry_integration_tests::require_udevd()
        && ferry_integration_tests::require_loop_devices()
}

/// A proxy that asks the service on every property read: a test must see
/// what the service says now, not a cache updated behind its back.
pub async fn uncached<'a, P>(conn: &zbus::Connection) -> P
where
    P: From<zbus::Proxy<'a>> + zbus::proxy::Defaults + 'a,
{
    zbus::proxy::Builder::<P>::new(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .expect("proxy")
}

/// Emits a signal on a service's behalf, as the service itself would.
pub async fn emit(
    conn: &zbus::Connection,
    path: &str,
    interface: &str,
    member: &str,
    args: &(impl serde::Serialize + zbus::zvariant::DynamicType),
) {
    conn.emit_signal(None::<()>, path, interface, member, args)
        .await
        .expect("emit signal");
}
