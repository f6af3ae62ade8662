//! Running one child (borg or a hook) under supervision: its own session,
//! a passphrase pipe it alone inherits, stderr read line by line as it
//! comes, a time limit, and a stop that asks nicely first.
//!
//! Borg and hooks are stopped the same way, so one piece of code does it:
//! the first signal (SIGINT for borg, which then writes a checkpoint and
//! releases its lock; SIGTERM for a hook) goes to the child's process group,
//! then SIGTERM and SIGKILL follow after bounded waits.

use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitStatus;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::sync::watch;
use tokio::time::Instant;

/// The most of a child's stdout kept (borg create --json is a few KiB).
const STDOUT_LIMIT: u64 = 16 << 20;
/// How long output is still read after the child exited (a grandchild may
/// hold the pipes open).
const DRAIN: Duration = Duration::from_secs(2);
/// The wait between SIGTERM and SIGKILL.
const KILL_AFTER: Duration = Duration::from_secs(5);
/// The longest passphrase that fits a pipe without blocking.
const PASSPHRASE_LIMIT: usize = 60_000;

/// Why a child was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Cancel or shutdown asked for it.
    Cancelled,
    /// It ran past its time limit.
    TimedOut,
}

/// How a supervised child ended.
#[derive(Debug)]
pub struct Ended {
    /// Its exit status.
    pub status: ExitStatus,
    /// What it wrote on stdout (bounded).
    pub stdout: Vec<u8>,
    /// Set when ferry stopped it.
    pub stopped: Option<Stop>,
}

/// How to stop a child.
pub struct Limits<'a> {
    /// Becomes true when the job is cancelled.
    pub cancel: &'a mut watch::Receiver<bool>,
    /// The longest it may run.
    pub timeout: Duration,
    /// The signal that asks it to stop.
    pub first_signal: libc::c_int,
    /// How long it gets after the first signal before SIGTERM.
    pub grace: Duration,
}

/// A pipe holding `secret`, written and closed: the read end, close-on-exec
/// in this process, for exactly one child to inherit as BORG_PASSPHRASE_FD.
pub fn secret_pipe(secret: &[u8]) -> io::Result<OwnedFd> {
    if secret.len() > PASSPHRASE_LIMIT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the passphrase is longer than 60000 bytes",
        ));
    }
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    std::fs::File::from(write).write_all(secret)?;
    Ok(read)
}

/// Prepares `command` to run supervised: no stdin, piped output, its own
/// session (no terminal to prompt on; its group can be signalled), stopped
/// with `death_signal` if this process dies, and `inherit` (if any) left
/// open across exec.
pub fn prepare(command: &mut Command, inherit: Option<&OwnedFd>, death_signal: libc::c_int) {
    ferry_service::process::prepare_child(
        command,
        ferry_service::process::ChildSetup {
            death_signal,
            keep_open: inherit.map(|fd| fd.as_raw_fd()),
        },
    );
}

/// Spawns a prepared `command` and supervises it until it exits, giving
/// each stderr line to `on_line`. `inherit` is closed here once the child
/// has its copy.
pub async fn supervise(
    mut command: Command,
    inherit: Option<OwnedFd>,
    limits: Limits<'_>,
    mut on_line: impl FnMut(&str),
) -> io::Result<Ended> {
    let mut child = command.spawn()?;
    drop(inherit);
    let reader = read_stdout(child.stdout.take());
    let mut lines = child.stderr.take().map(|e| BufReader::new(e).lines());
    let (status, stopped) = watch(&mut child, &mut lines, limits, &mut on_line).await?;
    // Read what is left, but do not wait on a grandchild holding the pipes.
    if let Some(lines) = lines.as_mut() {
        let _ = tokio::time::timeout(DRAIN, async {
            while let Ok(Some(line)) = lines.next_line().await {
                on_line(&line);
            }
        })
        .await;
    }
    let stdout = match tokio::time::timeout(DRAIN, reader).await {
        Ok(Ok(bytes)) => bytes,
        _ => Vec::new(),
    };
    Ok(Ended {
        status,
        stdout,
        stopped,
    })
}

/// Reads a child's stdout (bounded) as a task of its own.
fn read_stdout(stdout: Option<ChildStdout>) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        if let Some(out) = stdout {
            let _ = out.take(STDOUT_LIMIT).read_to_end(&mut bytes).await;
        }
        bytes
    })
}

/// The stop of a child: why, and the signals still to send, each at its
/// time ([`escalation`]).
struct Stopping {
    why: Stop,
    ladder: Vec<(libc::c_int, Duration)>,
    next: Instant,
}

/// Waits for `child` to exit, passing on its stderr lines; once cancelled
/// or past its time limit, signals its process group up the ladder.
async fn watch(
    child: &mut Child,
    lines: &mut Option<Lines<BufReader<ChildStderr>>>,
    limits: Limits<'_>,
    on_line: &mut impl FnMut(&str),
) -> io::Result<(ExitStatus, Option<Stop>)> {
    let pid = child.id();
    let deadline = tokio::time::sleep(limits.timeout);
    tokio::pin!(deadline);
    let stop = |why| Stopping {
        why,
        ladder: escalation(limits.first_signal, limits.grace),
        next: Instant::now(),
    };
    let cancel = limits.cancel;
    let mut cancel_open = true;
    let mut stopping = (*cancel.borrow()).then(|| stop(Stop::Cancelled));
    loop {
        let next_signal = stopping
            .as_ref()
            .filter(|s| !s.ladder.is_empty())
            .map(|s| s.next);
        tokio::select! {
            status = child.wait() => return Ok((status?, stopping.map(|s| s.why))),
            line = next_line(lines) => match line {
                Some(line) => on_line(&line),
                None => *lines = None,
            },
            changed = cancel.changed(), if cancel_open && stopping.is_none() => match changed {
                Ok(()) if *cancel.borrow() => stopping = Some(stop(Stop::Cancelled)),
                Ok(()) => {}
                Err(_) => cancel_open = false,
            },
            _ = &mut deadline, if stopping.is_none() => stopping = Some(stop(Stop::TimedOut)),
            _ = ferry_service::sleep_until(next_signal), if next_signal.is_some() => {
                if let Some(stopping) = stopping.as_mut() {
                    let (signal, wait) = stopping.ladder.remove(0);
                    tracing::debug!("sending signal {signal} to the process group of {pid:?}");
                    ferry_service::process::signal_group(pid, signal);
                    stopping.next = Instant::now() + wait;
                }
            }
        }
    }
}

/// The signals to stop a child with: the first one, then SIGTERM, then SIGKILL.
fn escalation(first: libc::c_int, grace: Duration) -> Vec<(libc::c_int, Duration)> {
    let mut ladder = vec![(first, grace)];
    if first != libc::SIGTERM {
        ladder.push((libc::SIGTERM, KILL_AFTER));
    }
    ladder.push((libc::SIGKILL, KILL_AFTER));
    ladder
}

async fn next_line(lines: &mut Option<Lines<BufReader<ChildStderr>>>) -> Option<String> {
    match lines {
        Some(lines) => lines.next_line().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

/// A command for `program` with `args`.
pub fn command<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Command {
    let mut command = Command::new(program);
    command.args(args);
    command
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn shell(script: &str) -> Command {
        let mut command = command("/bin/sh", &["-c", script]);
        prepare(&mut command, None, libc::SIGKILL);
        command
    }

    fn limits(cancel: &mut watch::Receiver<bool>, timeout: Duration) -> Limits<'_> {
        Limits {
            cancel,
            timeout,
            first_signal: libc::SIGINT,
            grace: Duration::from_millis(100),
        }
    }

    /// A child that ignores the first signal gets SIGTERM after the grace.
    #[tokio::test]
    async fn a_cancel_climbs_the_ladder_past_an_ignored_first_signal() {
        let (cancel, mut cancelled) = watch::channel(false);
        let mut lines = Vec::new();
        let child = shell("trap '' INT; echo ready >&2; exec sleep 30");
        let limits = limits(&mut cancelled, Duration::from_secs(60));
        let ended = supervise(child, None, limits, |line| {
            lines.push(line.to_string());
            if line == "ready" {
                cancel.send_replace(true);
            }
        })
        .await
        .expect("runs");
        assert_eq!(ended.stopped, Some(Stop::Cancelled));
        assert_eq!(ended.status.signal(), Some(libc::SIGTERM), "{ended:?}");
        assert_eq!(lines, ["ready"]);
    }

    #[tokio::test]
    async fn a_child_past_its_time_limit_is_stopped_and_its_output_kept() {
        let (_cancel, mut cancelled) = watch::channel(false);
        let child = shell("echo out; exec sleep 30");
        // Long enough for sh to have written, however loaded the machine.
        let limits = limits(&mut cancelled, Duration::from_secs(1));
        let ended = supervise(child, None, limits, |_| {}).await.expect("runs");
        assert_eq!(ended.stopped, Some(Stop::TimedOut));
        assert_eq!(ended.status.signal(), Some(libc::SIGINT));
        assert_eq!(ended.stdout, b"out\n");
    }

    #[tokio::test]
    async fn a_job_cancelled_before_the_child_starts_stops_it_at_once() {
        let (_cancel, mut cancelled) = watch::channel(true);
        let child = shell("exec sleep 30");
        let limits = limits(&mut cancelled, Duration::from_secs(60));
        let ended = supervise(child, None, limits, |_| {}).await.expect("runs");
        assert_eq!(ended.stopped, Some(Stop::Cancelled));
        assert_eq!(ended.status.signal(), Some(libc::SIGINT));
    }

    #[tokio::test]
    async fn a_child_that_exits_is_not_stopped() {
        let (_cancel, mut cancelled) = watch::channel(false);
        let child = shell("echo said >&2; exit 3");
        let mut lines = Vec::new();
        let limits = limits(&mut cancelled, Duration::from_secs(60));
        let ended = supervise(child, None, limits, |l| lines.push(l.to_string()))
            .await
            .expect("runs");
        assert_eq!((ended.stopped, ended.status.code()), (None, Some(3)));
        assert_eq!(lines, ["said"]);
    }
}
