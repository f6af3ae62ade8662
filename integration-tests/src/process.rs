//! Child processes: waiting with a timeout (event-based through a pidfd), and
//! running helper commands.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long [`run`] lets a helper command take.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// A pidfd for a child that has not been reaped yet (so the pid is still
/// ours). `None` if the kernel has no pidfd_open; callers then poll.
pub(crate) fn pidfd(child: &Child) -> Option<OwnedFd> {
    // SAFETY: plain syscall; on success it returns a new fd that we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a freshly opened descriptor owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Wait (blocking) up to `timeout` for `child` to exit and reap it.
pub(crate) fn wait_blocking(
    child: &mut Child,
    pidfd: Option<&OwnedFd>,
    timeout: Duration,
) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        match pidfd {
            Some(fd) => {
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, ms) };
            }
            None => std::thread::sleep(left.min(Duration::from_millis(10))),
        }
    }
}

/// Wait (async) until the process behind `pidfd` has exited; does not reap.
/// Without a pidfd it polls `exited` every 20 ms.
pub(crate) async fn exited(pidfd: Option<&OwnedFd>, mut exited: impl FnMut() -> bool) {
    if let Some(fd) = pidfd {
        if let Ok(dup) = fd.try_clone() {
            // SAFETY: `dup` is a descriptor we own; it is closed only when
            // `afd` (which owns it) is dropped.
            let registered = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE)
            };
            if let Ok(afd) = registered {
                // A pidfd stays readable once the process has exited.
                let _ = afd.readable().await;
                return;
            }
        }
    }
    while !exited() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Run a helper command (mkfs, cryptsetup, udevadm …) to completion and
/// return its stdout. Panics, with its stderr, when it cannot be started,
/// fails, or takes longer than two minutes (it is then killed).
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let shown = std::iter::once(program.to_string())
        .chain(
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned()),
        )
        .collect::<Vec<_>>()
        .join(" ");
    let path = crate::command_path(program).unwrap_or_else(|| program.into());
    let child = Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{shown}`: {e} (is {program} installed?)"));
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(RUN_TIMEOUT) {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("`{shown}`: {e}"),
        Err(_) => {
            // The waiting thread has not reaped it, so the pid is still ours.
            // SAFETY: sending a signal.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("`{shown}` did not finish within {RUN_TIMEOUT:?}; killed it");
        }
    };
    if !output.status.success() {
        panic!(
            "`{shown}` failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}
