//! borg, as ferry-sync uses it: its lock, held for an instant, and
//! listings of a copy that never touch borg's records of the real
//! repository. (borg does not check the copies: see [`crate::verify`].)
//!
//! The lock is taken by borg's own locking code (`borg.locking.Lock`, run
//! by borg's Python interpreter), exactly as `borg create` takes it, and is
//! held by a helper process until ferry-sync closes the helper's stdin, or
//! dies: either way the helper releases the lock itself. `borg with-lock`
//! is not used because it commits a transaction of its own to the
//! repository; ferry-sync never writes to the source.
//!
//! Every borg run gets a throwaway `BORG_BASE_DIR` (a copy must not enter
//! borg's security and cache records) and `BORG_HOST_ID`, so that a lock
//! left by a killed helper is recognised as stale by borg on this machine.
//! Passphrases reach borg only through `BORG_PASSPHRASE_FD` (a file) or
//! `BORG_PASSCOMMAND`, never through argv or a log line.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ferry_config::{BorgSettings, Repository};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use crate::job::{Failure, Stage, Stop};

/// How long a helper gets to let go of the lock and exit.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Takes borg's exclusive lock with borg's own code, waiting up to
/// argv[2] seconds (in short rounds so a stop is noticed), prints
/// `waiting` once when the first short try finds it held, `locked` when it
/// has it, and holds the lock until stdin closes. SIGTERM releases too.
const LOCK_SCRIPT: &str = r#"
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
from borg.logger import setup_logging
# borg's locking code logs (e.g. "Killed stale lock" after a killed
# helper); without setup_logging that raises instead of logging.
setup_logging(stream=sys.stderr, level="warning")
from borg.locking import Lock, LockTimeout
path, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
round = 0.1
while True:
    try:
        lock = Lock(path + "/lock", exclusive=True, timeout=round, sleep=0.05).acquire()
        break
    except LockTimeout:
        if round < 1.0:
            print("waiting", flush=True)
            round = 1.0
        if time.monotonic() >= deadline:
            print("timeout", flush=True)
            sys.exit(2)
try:
    print("locked", flush=True)
    sys.stdin.read()
finally:
    lock.release()
"#;

/// How ferry-sync runs borg.
#[derive(Debug, Clone)]
pub struct Borg {
    program: PathBuf,
    host_id: String,
}

/// borg's lock on a repository, held by a helper process. Released by
/// [`RepoLock::release`], or when dropped (the helper sees its stdin close).
pub struct RepoLock {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl RepoLock {
    /// Lets go of the lock and waits for the helper to exit.
    pub async fn release(mut self) {
        drop(self.stdin.take());
        if tokio::time::timeout(RELEASE_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!("the borg lock helper did not exit; terminating it");
            terminate(&mut self.child).await;
        }
    }
}

/// SIGTERM (the helper releases what it holds), then SIGKILL after a while.
async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: the pid is our unreaped child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    if tokio::time::timeout(RELEASE_TIMEOUT, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// Who holds borg's lock on `repo`, as borg's lock files name them:
/// `lock.exclusive/<host>.<pid>-<thread>` and `lock.roster` (JSON lists of
/// [host, pid, thread]). Empty when they say nothing readable.
pub fn lock_holder(repo: &Path) -> String {
    let mut holders: Vec<String> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(repo.join("lock.exclusive")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((host, rest)) = name.rsplit_once('.') {
                let pid = rest.split('-').next().unwrap_or(rest);
                holders.push(format!("host {host}, process {pid}"));
            }
        }
    }
    if holders.is_empty() {
        let roster = std::fs::read(repo.join("lock.roster"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        if let Some(roster) = roster {
            for kind in ["exclusive", "shared"] {
                for who in roster[kind].as_array().into_iter().flatten() {
                    if let (Some(host), Some(pid)) = (who[0].as_str(), who[1].as_u64()) {
                        holders.push(format!("host {host}, process {pid} ({kind})"));
                    }
                }
            }
        }
    }
    let holders: Vec<String> = holders
        .into_iter()
        .map(|h| h.chars().filter(|c| !c.is_control()).take(200).collect())
        .collect();
    if holders.is_empty() {
        String::new()
    } else {
        format!("held by {}", holders.join("; "))
    }
}

/// The last few lines of what borg printed, for a message.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" / ")
}

/// Finds `name` in PATH (a path with a `/` is taken as it is).
fn find_program(name: &str) -> PathBuf {
    if name.contains('/') {
        return PathBuf::from(name);
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from(name))
}

impl Borg {
    /// borg as `[borg]` in ferry.toml names it (program and host id).
    pub fn new(settings: &BorgSettings) -> Borg {
        Borg {
            program: find_program(&settings.program),
            host_id: ferry_service::host::borg_host_id(settings.host_id.as_deref()),
        }
    }

    /// A borg-related command with a clean environment: no passphrase or
    /// repository variables inherited, the host id, `base_dir` as
    /// BORG_BASE_DIR, and killed if ferry-sync dies (a restarted ferry-sync
    /// must not clean up a copy a surviving borg still reads).
    fn command(&self, program: &Path, base_dir: &Path) -> Command {
        let mut command = Command::new(program);
        for inherited in [
            "BORG_PASSPHRASE",
            "BORG_PASSCOMMAND",
            "BORG_PASSPHRASE_FD",
            "BORG_REPO",
            "BORG_KEYS_DIR",
            "BORG_SECURITY_DIR",
            "BORG_CACHE_DIR",
            "BORG_CONFIG_DIR",
        ] {
            command.env_remove(inherited);
        }
        command
            .env("BORG_HOST_ID", &self.host_id)
            .env("BORG_BASE_DIR", base_dir)
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_DISPLAY_PASSPHRASE", "no");
        ferry_service::process::prepare_child(&mut command, Default::default());
        command
    }

    /// The Python interpreter borg runs on (from its `#!` line).
    fn interpreter(&self) -> Result<(PathBuf, Vec<String>), String> {
        let not_python = || {
            format!(
                "{} is not borg's Python script, so borg's own locking code cannot be used; install the distribution's borgbackup package",
                self.program.display()
            )
        };
        let text = std::fs::read(&self.program)
            .map_err(|e| format!("cannot read {}: {e}", self.program.display()))?;
        let first = text.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(first);
        let shebang = line.strip_prefix("#!").ok_or_else(not_python)?;
        let mut words = shebang.split_whitespace().map(str::to_string);
        let program = words.next().ok_or_else(not_python)?;
        if !program.contains("python") && !program.ends_with("/env") {
            return Err(not_python());
        }
        Ok((PathBuf::from(program), words.collect()))
    }

    /// Takes borg's exclusive lock on `repo`, waiting up to `wait` while a
    /// backup holds it.
    /// `waiting` is called once, with who holds the lock (from borg's lock
    /// files, or empty), when the lock is found held.
    pub async fn lock<F, W>(
        &self,
        repo: &Path,
        wait: Duration,
        stop: &mut Stop,
        mut waiting: W,
    ) -> Result<RepoLock, Failure>
    where
        W: FnMut(String) -> F,
        F: std::future::Future<Output = ()>,
    {
        let failed = |message: String| Failure::new(Stage::Lock, message);
        let (python, args) = self.interpreter().map_err(failed)?;
        let base =
            tempfile::tempdir().map_err(|e| failed(format!("cannot make a temp dir: {e}")))?;
        let mut command = self.command(&python, base.path());
        command
            .args(args)
            .arg("-c")
            .arg(LOCK_SCRIPT)
            .arg(repo)
            .arg(wait.as_secs().to_string())
            .stdin(Stdio::piped())
            .kill_on_drop(false);
        let mut child = command
            .spawn()
            .map_err(|e| failed(format!("cannot run {}: {e}", python.display())))?;
        let stdin = child.stdin.take();
        let Some(stdout) = child.stdout.take() else {
            return Err(failed("the lock helper has no stdout".into()));
        };
        let mut lines = BufReader::new(stdout).lines();
        let line = loop {
            let line = tokio::select! {
                line = lines.next_line() => line,
                reason = stop.wait() => {
                    terminate(&mut child).await;
                    return Err(Failure::stopped(reason));
                }
            };
            match line {
                Ok(Some(line)) if line == "waiting" => {
                    let at = repo.to_path_buf();
                    let holder = tokio::task::spawn_blocking(move || lock_holder(&at))
                        .await
                        .unwrap_or_default();
                    waiting(holder).await;
                }
                other => break other,
            }
        };
        match line {
            Ok(Some(line)) if line == "locked" => Ok(RepoLock { child, stdin }),
            Ok(Some(line)) if line == "timeout" => {
                let _ = child.wait().await;
                Err(failed(format!(
                    "borg's lock on {} was not free within {} s: a backup or another borg command holds it; sync again when it is done, or raise lock-wait in [sync]",
                    repo.display(),
                    wait.as_secs()
                )))
            }
            _ => {
                drop(stdin);
                let output = tokio::time::timeout(RELEASE_TIMEOUT, child.wait_with_output()).await;
                let detail = match output {
                    Ok(Ok(output)) => tail(&output.stderr),
                    _ => "the helper did not say why".into(),
                };
                Err(failed(format!(
                    "cannot take borg's lock on {}: {detail}",
                    repo.display()
                )))
            }
        }
    }

    /// Runs borg with `args` on a copy; its output, or why it failed.
    async fn run(
        &self,
        args: &[&str],
        repo: &Path,
        passphrase: Passphrase,
        stop: &mut Stop,
    ) -> Result<Result<String, String>, Failure> {
        let base = tempfile::tempdir()
            .map_err(|e| Failure::new(Stage::Verify, format!("cannot make a temp dir: {e}")))?;
        let mut command = self.command(&self.program, base.path());
        command.args(args).arg(repo);
        let _keep_open = passphrase.apply(&mut command);
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                return Ok(Err(format!(
                    "cannot run {}: {e} (apt-get install borgbackup)",
                    self.program.display()
                )))
            }
        };
        tokio::select! {
            output = child.wait_with_output() => Ok(match output {
                Ok(output) if output.status.success() => {
                    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
                }
                Ok(output) => Err(format!("{} ({})", tail(&output.stderr), output.status)),
                Err(e) => Err(e.to_string()),
            }),
            reason = stop.wait() => Err(Failure::stopped(reason)),
        }
    }

    /// The newest archive in a copy, or "" when it cannot be listed (an
    /// encrypted repository without a passphrase in ferry.toml, a wrong
    /// passphrase): the copy is still good, so this is only logged.
    pub async fn newest_archive(
        &self,
        repo: &Path,
        repository: &Repository,
        stop: &mut Stop,
    ) -> Result<String, Failure> {
        let passphrase = match Passphrase::of(repository) {
            Ok(passphrase) => passphrase,
            Err(e) => {
                tracing::warn!("cannot list the archives of the copy: {e}");
                return Ok(String::new());
            }
        };
        let listed = self
            .run(
                &["list", "--last", "1", "--format", "{archive}{NL}"],
                repo,
                passphrase,
                stop,
            )
            .await?;
        Ok(match listed {
            Ok(text) => text.lines().last().unwrap_or_default().trim().to_string(),
            Err(detail) => {
                tracing::warn!(
                    "cannot list the archives of the copy {} (without a passphrase-file or passcommand an encrypted repository cannot be listed): {detail}",
                    repo.display()
                );
                String::new()
            }
        })
    }
}

/// How borg gets a repository's passphrase.
enum Passphrase {
    /// None configured: borg gets an empty one, enough for unencrypted
    /// repositories and a quick refusal for encrypted ones (no prompt).
    None,
    /// Read by borg from this open file (BORG_PASSPHRASE_FD).
    File(std::fs::File),
    /// borg runs this (BORG_PASSCOMMAND).
    Command(String),
}

impl Passphrase {
    fn of(repository: &Repository) -> Result<Passphrase, String> {
        if let Some(path) = &repository.passphrase_file {
            return ferry_config::paths::open_secret(path, "the passphrase file")
                .map(Passphrase::File);
        }
        if let Some(command) = &repository.passcommand {
            return Ok(Passphrase::Command(command.clone()));
        }
        Ok(Passphrase::None)
    }

    /// Sets up `command`; returns what must stay open until it has started.
    fn apply(self, command: &mut Command) -> Option<std::fs::File> {
        match self {
            Passphrase::None => {
                command.env("BORG_PASSPHRASE", "");
                None
            }
            Passphrase::Command(passcommand) => {
                command.env("BORG_PASSCOMMAND", passcommand);
                None
            }
            Passphrase::File(file) => {
                let fd = file.as_raw_fd();
                command.env("BORG_PASSPHRASE_FD", fd.to_string());
                // SAFETY: only async-signal-safe fcntl between fork and exec;
                // the descriptor stays open in the parent until spawn returns.
                unsafe {
                    command.pre_exec(move || {
                        if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                Some(file)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_holder_from_borgs_lock_files() {
        let dir = tempfile::tempdir().expect("dir");
        assert_eq!(lock_holder(dir.path()), "");
        std::fs::write(
            dir.path().join("lock.roster"),
            r#"{"exclusive": [["nas@ferry", 4242, 0]], "shared": []}"#,
        )
        .expect("roster");
        assert_eq!(
            lock_holder(dir.path()),
            "held by host nas@ferry, process 4242 (exclusive)"
        );
        std::fs::create_dir(dir.path().join("lock.exclusive")).expect("dir");
        std::fs::write(dir.path().join("lock.exclusive/nas@ferry.77-3f"), "").expect("file");
        assert_eq!(
            lock_holder(dir.path()),
            "held by host nas@ferry, process 77"
        );
    }
}
