//! sd_notify without libsystemd: READY=1 once the bus name is owned,
//! STOPPING=1 on shutdown, WATCHDOG=1 while WATCHDOG_USEC asks for it.
//! Outside systemd (no NOTIFY_SOCKET) every call does nothing.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends one notification; errors are logged, never fatal.
pub fn send(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let address = match path.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let result = address.and_then(|address| {
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(state.as_bytes(), &address)
    });
    if let Err(e) = result {
        tracing::warn!("sd_notify {state:?} to {path}: {e}");
    }
}

/// READY=1.
pub fn ready() {
    send("READY=1");
}

/// STOPPING=1.
pub fn stopping() {
    send("STOPPING=1");
}

/// The watchdog interval systemd asked for, if it is meant for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings WATCHDOG=1 at half the interval systemd asked for. Without
/// WATCHDOG_USEC nothing is spawned, so an idle service stays asleep.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let interval = watchdog_interval()?;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tick.tick().await;
            send("WATCHDOG=1");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_the_socket() {
        let dir = tempfile_dir();
        let path = dir.join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        // SAFETY: the test sets the variable before any thread reads it.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        ready();
        stopping();
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).expect("first");
        assert_eq!(&buf[..n], b"READY=1");
        let n = listener.recv(&mut buf).expect("second");
        assert_eq!(&buf[..n], b"STOPPING=1");
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }
}
