//! How every ferry service starts a helper program (borg, cryptsetup, mount,
//! sendmail...), written once: the child gets no terminal and no stdin, its
//! own session (so its whole process group can be signalled, and nothing it
//! starts outlives a kill), dies with the service (parent-death signal, with
//! the check for a parent that died before the signal was armed), keeps only
//! the descriptors it is given (everything Rust opens is close-on-exec), and
//! is killed when its handle is dropped.

use std::os::fd::RawFd;
use std::process::Stdio;

/// close_range(2)'s flag: mark close-on-exec instead of closing now.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// What a child needs beyond the defaults.
#[derive(Debug, Clone, Copy)]
pub struct ChildSetup {
    /// Sent to the child when the service dies: SIGKILL for tools that hold
    /// nothing, SIGINT/SIGTERM for borg so it releases its lock.
    pub death_signal: libc::c_int,
    /// A descriptor the child inherits (a passphrase pipe), else none.
    pub keep_open: Option<RawFd>,
}

impl Default for ChildSetup {
    fn default() -> Self {
        ChildSetup {
            death_signal: libc::SIGKILL,
            keep_open: None,
        }
    }
}

/// Prepares `command` as described in the module doc: stdin from
/// /dev/null, stdout and stderr piped (a caller may override them), own
/// session, `setup.death_signal` when the service dies, `setup.keep_open`
/// left open across exec, killed on drop.
pub fn prepare_child(command: &mut tokio::process::Command, setup: ChildSetup) {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let parent = std::process::id();
    let ChildSetup {
        death_signal,
        keep_open,
    } = setup;
    // SAFETY: between fork and exec the closure makes only async-signal-safe
    // calls (setsid, prctl, getppid, raise, fcntl) on plain integers.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                death_signal as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The service died before the prctl took effect: act as if the
            // signal had come.
            if libc::getppid() as u32 != parent {
                libc::raise(death_signal);
                libc::_exit(1);
            }
            // Nothing the service inherited without close-on-exec (a
            // jobserver pipe, a socket from its own parent) reaches the
            // child; an old kernel without close_range keeps Rust's
            // close-on-exec default.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
            if let Some(fd) = keep_open {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Sends `signal` to the whole process group of a child started with
/// [`prepare_child`] (its pid is its group's id): whatever it started goes
/// too. A child already gone is not an error.
pub fn signal_group(pid: Option<u32>, signal: libc::c_int) {
    if let Some(group) = pid.and_then(|p| libc::pid_t::try_from(p).ok()) {
        // SAFETY: kill(2) on a process group this service created.
        unsafe { libc::kill(-group, signal) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_child_runs_in_its_own_session_and_sees_only_what_it_is_given() {
        let (reader, writer) = std::io::pipe().expect("pipe");
        use std::os::fd::AsRawFd;
        let kept = writer.as_raw_fd();
        // A descriptor without close-on-exec, as an inherited one would be.
        // SAFETY: dup(2) of a descriptor this test owns; closed below.
        let leaky = unsafe { libc::dup(kept) };
        assert!(leaky > 2);
        let mut command = tokio::process::Command::new("sh");
        command.args([
            "-c",
            &format!("ps -o sid= -p $$; ps -o pid= -p $$; echo kept > /proc/self/fd/{kept}; ls /proc/self/fd | wc -l"),
        ]);
        prepare_child(
            &mut command,
            ChildSetup {
                keep_open: Some(kept),
                ..ChildSetup::default()
            },
        );
        let output = command.output().await.expect("sh runs");
        drop(writer);
        // SAFETY: the test's own dup, closed once.
        unsafe { libc::close(leaky) };
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        assert_eq!(
            lines[0], lines[1],
            "the child leads its own session: {text}"
        );
        let mut got = String::new();
        use std::io::Read;
        let mut reader = reader;
        reader.read_to_string(&mut got).expect("read");
        assert_eq!(got, "kept\n");
        // stdin, stdout, stderr, the kept pipe, and ls's own directory fd.
        assert_eq!(lines[2], "5", "no other descriptor leaked: {text}");
    }
}
