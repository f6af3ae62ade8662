//! borg, as ferry-sync uses it: its lock, held for an instant (taken
//! natively, see [`crate::lock`]), and listings that never touch borg's
//! records of the real repository. (borg does not check the copies: see
//! [`crate::verify`].)
//!
//! Every borg run gets a throwaway `BORG_BASE_DIR` (a copy must not enter
//! borg's security and cache records) and `BORG_HOST_ID`, the same host id
//! ferry-sync's own lock carries, so that a lock left by a killed borg or
//! a killed ferry-sync is recognised as stale by the other on this machine.
//! Passphrases reach borg only through `BORG_PASSPHRASE_FD` (a file) or
//! `BORG_PASSCOMMAND`, never through argv or a log line.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_config::{BorgSettings, Repository};
use tokio::process::Command;

use crate::job::{Failure, Stage, Stop};
use crate::listings::Listed;
use crate::lock::{self, Attempt, HeldLock, LockerId};
use crate::snapshot::Transaction;

/// How ferry-sync runs borg.
#[derive(Debug, Clone)]
pub struct Borg {
    program: PathBuf,
    host_id: String,
}

/// borg's lock on a repository, held by ferry-sync. Released by
/// [`RepoLock::release`], or (on the blocking pool) when dropped.
pub struct RepoLock {
    held: Option<HeldLock>,
}

impl RepoLock {
    /// Lets go of the lock.
    pub async fn release(mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        let repo = held.repo().to_path_buf();
        match tokio::task::spawn_blocking(move || held.release_blocking()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("cannot release borg's lock on {}: {e}", repo.display()),
            Err(e) => tracing::error!("releasing borg's lock on {} failed: {e}", repo.display()),
        }
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || drop(held))),
                Err(_) => drop(held),
            }
        }
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

    /// Takes borg's exclusive lock on `repo`, waiting up to `wait` while
    /// another holds it. `waiting` is called once, with who holds the
    /// lock (from borg's lock files, or empty), when the lock is found held.
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
        let deadline = tokio::time::Instant::now() + wait;
        let id = LockerId::this_process(&self.host_id);
        let mut told = false;
        loop {
            let (at, me) = (repo.to_path_buf(), id.clone());
            let attempt = tokio::task::spawn_blocking(move || lock::try_lock(&at, &me))
                .await
                .map_err(|e| Failure::new(Stage::Lock, format!("internal error: {e}")))?;
            match attempt {
                Ok(Attempt::Locked(held)) => return Ok(RepoLock { held: Some(held) }),
                Err(e) => {
                    return Err(Failure::new(
                        Stage::Lock,
                        format!(
                            "{e}; ferry-sync needs to write borg's lock files there, as borg does"
                        ),
                    ))
                }
                Ok(Attempt::Held) => {}
            }
            if !told {
                told = true;
                let at = repo.to_path_buf();
                let holder = tokio::task::spawn_blocking(move || lock_holder(&at))
                    .await
                    .unwrap_or_default();
                waiting(holder).await;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Failure::new(
                    Stage::Lock,
                    format!(
                        "borg's lock on {} was not free within {} s: a backup or another borg command holds it; sync again when it is done, or raise lock-wait in [sync]",
                        repo.display(),
                        wait.as_secs()
                    ),
                ));
            }
            tokio::select! {
                _ = tokio::time::sleep(lock::RETRY) => {}
                reason = stop.wait() => return Err(Failure::stopped(reason)),
            }
        }
    }

    /// Runs borg with `args` on `repo`; its output, or why it failed. A
    /// dropped run kills its borg.
    async fn run(
        &self,
        args: &[&str],
        repo: &Path,
        passphrase: Passphrase,
        stop: &mut Stop,
    ) -> Result<Result<String, BorgError>, Failure> {
        let base = tempfile::tempdir()
            .map_err(|e| Failure::new(Stage::Verify, format!("cannot make a temp dir: {e}")))?;
        let mut command = self.command(&self.program, base.path());
        command.args(args).arg(repo).kill_on_drop(true);
        let _keep_open = passphrase.apply(&mut command);
        let child = match command.spawn() {
            Ok(child) => child,
            Err(source) => {
                return Ok(Err(BorgError::Spawn {
                    program: self.program.clone(),
                    source,
                }))
            }
        };
        tokio::select! {
            output = child.wait_with_output() => Ok(match output {
                Ok(output) if output.status.success() => {
                    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
                }
                Ok(output) => Err(BorgError::Failed {
                    said: tail(&output.stderr),
                    status: output.status,
                }),
                Err(e) => Err(BorgError::Wait(e)),
            }),
            reason = stop.wait() => Err(Failure::stopped(reason)),
        }
    }

    /// The newest archive in a repository (a copy's mirror, or the
    /// snapshot the copy is made from), or "" when it cannot be listed (an
    /// encrypted repository without a passphrase in ferry.toml, a wrong
    /// passphrase): the copy is still good, so this is only logged.
    /// `--bypass-lock`: what is listed is ferry's own hard links, which
    /// nobody else opens, so borg writes no lock files into them.
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
                &[
                    "list",
                    "--bypass-lock",
                    "--last",
                    "1",
                    "--format",
                    "{archive}{NL}",
                ],
                repo,
                passphrase,
                stop,
            )
            .await?;
        Ok(match listed {
            Ok(text) => text.lines().last().unwrap_or_default().trim().to_string(),
            Err(e) => {
                tracing::warn!(
                    "cannot list the archives of {} (without a passphrase-file or passcommand an encrypted repository cannot be listed): {e}",
                    repo.display()
                );
                String::new()
            }
        })
    }

    /// Starts listing the newest archive of `repo` (a snapshot at
    /// `transaction`) beside whatever the job does next (see [`Listing`]).
    pub fn list_newest(
        &self,
        repo: PathBuf,
        repository: Repository,
        transaction: Option<Transaction>,
        stop: Stop,
    ) -> Listing {
        let borg = self.clone();
        let task = tokio::spawn(async move {
            let mut stop = stop;
            borg.newest_archive(&repo, &repository, &mut stop).await
        });
        Listing::Running { task, transaction }
    }
}

/// The newest archive of a snapshot: known already (see
/// [`crate::listings`]), or `borg list --last 1` running in the
/// background, so that borg's start-up (0.3–1 s of Python) overlaps the
/// copy and the read-back instead of following them. Dropped unfinished,
/// the listing is aborted and its borg killed.
pub enum Listing {
    /// Listed before, at the snapshot's transaction.
    Known(String),
    /// Being listed.
    Running {
        task: tokio::task::JoinHandle<Result<String, Failure>>,
        /// The snapshot's transaction, to remember the answer by.
        transaction: Option<Transaction>,
    },
}

impl Listing {
    /// The newest archive's name (see [`Borg::newest_archive`]), and what
    /// was learnt by listing it, to remember: None when it was known, or
    /// could not be listed.
    pub async fn archive(mut self) -> Result<(String, Option<Listed>), Failure> {
        match &mut self {
            Listing::Known(archive) => Ok((std::mem::take(archive), None)),
            Listing::Running { task, transaction } => {
                let archive = match task.await {
                    Ok(result) => result?,
                    Err(e) => {
                        return Err(Failure::new(Stage::Verify, format!("internal error: {e}")))
                    }
                };
                let learnt =
                    transaction
                        .take()
                        .filter(|_| !archive.is_empty())
                        .map(|transaction| Listed {
                            transaction,
                            archive: archive.clone(),
                        });
                Ok((archive, learnt))
            }
        }
    }
}

impl Drop for Listing {
    fn drop(&mut self) {
        if let Listing::Running { task, .. } = self {
            task.abort();
        }
    }
}

/// Why a borg command did not give its answer.
#[derive(Debug, thiserror::Error)]
enum BorgError {
    /// borg could not be started.
    #[error("cannot run {}: {source} (apt-get install borgbackup)", program.display())]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    /// borg ran and failed.
    #[error("{said} ({status})")]
    Failed {
        said: String,
        status: std::process::ExitStatus,
    },
    /// Waiting for borg failed.
    #[error("cannot wait for borg: {0}")]
    Wait(std::io::Error),
}

/// A passphrase file that cannot be opened, as ferry-config says why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SecretError(String);

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
    fn of(repository: &Repository) -> Result<Passphrase, SecretError> {
        if let Some(path) = &repository.passphrase_file {
            return ferry_config::paths::open_secret(path, "the passphrase file")
                .map(Passphrase::File)
                .map_err(SecretError);
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
