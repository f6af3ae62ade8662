//! What ferry-borg asks of the machine: whether a profile's preconditions
//! hold (mount points, paths, mains power), borg's host id, and logind's
//! sleep/shutdown inhibitor while a job runs.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Where the kernel lists power supplies.
const POWER_SUPPLIES: &str = "/sys/class/power_supply";
/// logind's bus name.
const LOGIND: &str = "org.freedesktop.login1";
/// How long logind gets to answer.
const LOGIND_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a profile cannot run now, or `None` when its preconditions hold.
pub fn blocked(
    mountpoints: &[impl AsRef<Path>],
    exists: &[impl AsRef<Path>],
    on_ac_power: bool,
) -> Option<String> {
    let mounted = mount_points();
    for path in mountpoints {
        let path = path.as_ref();
        let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if !mounted.contains(&resolved) {
            return Some(format!("{} is not mounted", path.display()));
        }
    }
    for path in exists {
        let path = path.as_ref();
        if !path.exists() {
            return Some(format!("{} does not exist", path.display()));
        }
    }
    if on_ac_power && !on_mains_power(Path::new(POWER_SUPPLIES)) {
        return Some("the machine runs on battery".into());
    }
    None
}

/// [`blocked`] for a profile's preconditions, off the runtime (it reads
/// mountinfo, the paths and the power supplies).
pub async fn preconditions_block(pre: &ferry_config::Preconditions) -> Option<String> {
    let pre = pre.clone();
    tokio::task::spawn_blocking(move || blocked(&pre.mountpoints, &pre.exists, pre.on_ac_power))
        .await
        .unwrap_or_else(|e| Some(format!("the preconditions could not be checked: {e}")))
}

/// Every mount point, from /proc/self/mountinfo (octal escapes undone).
fn mount_points() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(ferry_service::confined::unescape_mountinfo(field)))
        .collect()
}

/// Like systemd's ConditionACPower: true when a mains supply is online or
/// when the machine has no mains supply to ask (a desktop, a server).
pub fn on_mains_power(supplies: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(supplies) else {
        return true;
    };
    let read = |dir: &Path, file: &str| {
        std::fs::read_to_string(dir.join(file))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let mut found_mains = false;
    for entry in entries.flatten() {
        let dir = entry.path();
        if read(&dir, "type") == "Mains" {
            found_mains = true;
            if read(&dir, "online") == "1" {
                return true;
            }
        }
    }
    !found_mains
}

/// The system bus for a user-level ferry-borg (logind is there, not on
/// the session bus); `None`, logged, when it cannot be reached.
pub async fn system_bus() -> Option<zbus::Connection> {
    match tokio::time::timeout(LOGIND_TIMEOUT, ferry_service::connect_system_bus()).await {
        Ok(Ok(bus)) => Some(bus),
        Ok(Err(e)) => {
            tracing::info!(
                "the system bus cannot be reached ({e}); backups run without logind's inhibitor"
            );
            None
        }
        Err(_) => {
            tracing::info!("the system bus did not answer; backups run without logind's inhibitor");
            None
        }
    }
}

/// Whether "logind is not on the bus" has been logged already.
static LOGIND_ABSENT_LOGGED: AtomicBool = AtomicBool::new(false);

/// Takes a logind "block" inhibitor for sleep and shutdown; the job keeps
/// the returned descriptor open while it runs. Without logind on the bus
/// (containers, tests) it logs once and returns `None`.
pub async fn inhibit(connection: &zbus::Connection, why: &str) -> Option<OwnedFd> {
    let present = async {
        let dbus = zbus::fdo::DBusProxy::new(connection).await?;
        let name = zbus::names::BusName::try_from(LOGIND).map_err(zbus::Error::from)?;
        Ok::<bool, zbus::Error>(dbus.name_has_owner(name).await?)
    };
    match tokio::time::timeout(LOGIND_TIMEOUT, present).await {
        Ok(Ok(true)) => {}
        outcome => {
            if !LOGIND_ABSENT_LOGGED.swap(true, Ordering::Relaxed) {
                let why = match outcome {
                    Ok(Err(e)) => format!(": {e}"),
                    Err(_) => " (no answer)".into(),
                    _ => String::new(),
                };
                tracing::info!(
                    "logind is not on the bus{why}; backups run without a sleep/shutdown inhibitor"
                );
            }
            return None;
        }
    }
    let arguments = ("sleep:shutdown", "ferry-borg", why, "block");
    let call = connection.call_method(
        Some(LOGIND),
        "/org/freedesktop/login1",
        Some("org.freedesktop.login1.Manager"),
        "Inhibit",
        &arguments,
    );
    let reply = match tokio::time::timeout(LOGIND_TIMEOUT, call).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => {
            tracing::warn!("logind refused the inhibitor: {e}; the backup runs without it");
            return None;
        }
        Err(_) => {
            tracing::warn!("logind did not answer within {LOGIND_TIMEOUT:?}; the backup runs without an inhibitor");
            return None;
        }
    };
    match reply.body().deserialize::<zbus::zvariant::OwnedFd>() {
        Ok(fd) => {
            tracing::debug!("holding a logind inhibitor: {why}");
            Some(fd.into())
        }
        Err(e) => {
            tracing::warn!("logind's Inhibit reply has no descriptor: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mount point with a space (seed 000's "My Private") is found.
    #[test]
    fn mountinfo_escapes() {
        let unescape = ferry_service::confined::unescape_mountinfo;
        assert_eq!(
            unescape("/home/david/My\\040Private"),
            "/home/david/My Private"
        );
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/tab\\011x\\"), "/tab\tx\\");
    }

    #[test]
    fn root_is_mounted_and_a_temp_dir_is_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(blocked(&["/"], &["/"], false), None);
        let reason = blocked(&[dir.path()], &[] as &[&Path], false).expect("blocked");
        assert!(reason.ends_with("is not mounted"), "{reason}");
        let missing = dir.path().join("missing");
        let reason = blocked(&[] as &[&Path], &[&missing], false).expect("blocked");
        assert!(reason.ends_with("does not exist"), "{reason}");
    }

    #[test]
    fn mains_power_like_systemd() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(on_mains_power(dir.path()), "no supplies: mains assumed");
        let supply = |name: &str, kind: &str, online: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).expect("dir");
            std::fs::write(d.join("type"), format!("{kind}\n")).expect("type");
            std::fs::write(d.join("online"), format!("{online}\n")).expect("online");
        };
        supply("BAT0", "Battery", "1");
        assert!(on_mains_power(dir.path()), "a battery alone says nothing");
        supply("AC", "Mains", "0");
        assert!(!on_mains_power(dir.path()), "mains unplugged");
        supply("AC2", "Mains", "1");
        assert!(on_mains_power(dir.path()));
    }
}
