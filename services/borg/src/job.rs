//! One job: a profile run from Start to its end, as a task the service loop
//! owns. It checks the preconditions, resolves the plan (reading a borgmatic
//! file if the profile has one), waits its turn on the repository, holds a
//! logind inhibitor, runs the before hooks, borg create → prune → compact →
//! check as the plan says, the after (or on-error) hooks, and returns how it
//! ended. Before borg create it checks that every source exists (stage
//! `sources`, as borgmatic refuses to run): borg itself would only warn,
//! make an archive without them and exit 1. borg's warning exit (1) is kept
//! apart from success: the job ends [`End::Finished`] with borg's warning
//! lines, which the loop reports as "finished with warnings". Progress and
//! stage changes go to the loop as events; the loop owns
//! the properties and the signals.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_config::{Config, Name};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::plan::{Passphrase, Plan, CHECK_KINDS};
use crate::process::{self, Limits, Stop};
use crate::remote::{self, Diagnosis, SshSetup, Unreachable};
use crate::{borgmatic, network, system};

/// The least time between two progress reports of one job.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// A before hook exiting with this skips the run (borgmatic's soft failure).
const SKIP_EXIT_CODE: i32 = 75;
/// borg's msgid when `--lock-wait` ran out.
const LOCK_TIMEOUT: &str = "LockTimeout";
/// How many of borg's error lines a failure message carries.
const MESSAGE_LINES: usize = 5;
/// How many of ssh's relayed lines are kept to diagnose a failure (a
/// changed host key takes 16).
const REMOTE_LINES: usize = 40;

/// What a running job tells the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The job entered a stage (waiting, hook, create, prune, compact, check).
    Stage(&'static str),
    /// borg create's progress.
    Progress {
        /// Original bytes read.
        bytes: u64,
        /// Files processed.
        files: u64,
    },
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Every stage succeeded.
    Finished {
        /// The archive made.
        archive: String,
        /// borg create --json.
        stats: String,
        /// The check kinds that ran.
        checks: Vec<&'static str>,
        /// borg's warnings when a command exited 1 (warning), each with its
        /// stage; empty when every command exited 0.
        warnings: Vec<String>,
    },
    /// A stage failed, or the job was cancelled (stage "cancelled").
    Failed {
        /// hook, config, sources, create, prune, compact, check or cancelled.
        stage: String,
        /// What went wrong, in borg's or the hook's words.
        message: String,
    },
    /// Not run, and that is fine.
    Skipped {
        /// Why.
        reason: String,
    },
    /// The SSH server could not be reached (or the network is not online):
    /// the loop makes it a skip, or a failure once past the grace
    /// ([`crate::remote::settle_unreachable`]).
    Unreachable {
        /// Why.
        reason: String,
    },
}

/// The stages at which borg talked to the repository's server: a failure
/// there means the server was reachable.
pub const REACHES_SERVER: [&str; 4] = ["create", "prune", "compact", "check"];

/// One repository, one job: a per-repository async lock shared by all jobs.
#[derive(Clone, Default)]
pub struct RepositoryLocks(Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>);

impl RepositoryLocks {
    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = match self.0.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(key.to_string()).or_default().clone()
    }
}

/// Everything a job needs, given by the loop.
pub struct Job {
    /// The job id.
    pub id: String,
    /// The profile.
    pub profile: Name,
    /// The configuration.
    pub config: Arc<Config>,
    /// The system bus, for logind (None: not reachable).
    pub logind: Option<zbus::Connection>,
    /// Events to the loop.
    pub events: mpsc::Sender<(String, Event)>,
    /// True once Cancel (or shutdown) asked the job to stop.
    pub cancel: watch::Receiver<bool>,
    /// The per-repository turn.
    pub locks: RepositoryLocks,
    /// When each check kind last ran for this profile.
    pub checks_last: BTreeMap<String, u64>,
    /// BORG_HOST_ID.
    pub host_id: String,
    /// borg's warnings so far (commands that exited 1).
    pub warnings: Vec<String>,
}

/// A failure on the way: the stage and the message.
struct Fail {
    stage: String,
    message: String,
}

impl Fail {
    fn new(stage: &str, message: impl Into<String>) -> Fail {
        Fail {
            stage: stage.to_string(),
            message: message.into(),
        }
    }

    fn cancelled(stage: &str) -> Fail {
        Fail::new("cancelled", format!("cancelled during {stage}"))
    }
}

/// How one step ended short of success.
enum Stopped {
    Skip(String),
    Fail(Fail),
    Unreachable(String),
}

impl From<Fail> for Stopped {
    fn from(f: Fail) -> Self {
        Stopped::Fail(f)
    }
}

/// What one borg run produced.
struct BorgOutput {
    stdout: Vec<u8>,
}

impl Job {
    /// Runs the job to its end.
    pub async fn run(mut self) -> End {
        let profile_name = self.profile.clone();
        let Some(profile) = self.config.profiles.get(&profile_name).cloned() else {
            return End::Failed {
                stage: "config".into(),
                message: format!("profile `{profile_name}` is no longer configured"),
            };
        };
        self.stage("waiting").await;
        let pre = &profile.preconditions;
        if let Some(reason) = system::blocked(&pre.mountpoints, &pre.exists, pre.on_ac_power) {
            return End::Skipped { reason };
        }
        if pre.network_online {
            if let Err(offline) = network::online().await {
                return End::Unreachable {
                    reason: format!("{}: {offline}", Unreachable::NetworkOffline.describe()),
                };
            }
        }
        let plan = match profile.borgmatic_config {
            Some(_) => borgmatic::load(&self.config, &profile_name, &profile),
            None => Plan::from_profile(&self.config, &profile_name, &profile),
        }
        .and_then(|plan| plan.check_not_on_a_drive(&self.config).map(|()| plan));
        let plan = match plan {
            Ok(plan) => plan,
            Err(message) => {
                return End::Failed {
                    stage: "config".into(),
                    message,
                }
            }
        };
        for warning in &plan.warnings {
            tracing::warn!("profile {profile_name}: {warning}");
        }

        // One job per repository: wait for the turn, cancellable.
        let turn = self.locks.lock_for(&plan.repository_key());
        let _turn = tokio::select! {
            guard = turn.lock_owned() => guard,
            _ = cancelled(&mut self.cancel) => return Fail::cancelled("waiting").into_end(),
        };
        let _inhibitor = match &self.logind {
            Some(bus) => {
                system::inhibit(bus, &format!("borg backup of profile {profile_name}")).await
            }
            None => None,
        };

        match self.stages(&plan).await {
            Ok(end) => end,
            Err(Stopped::Skip(reason)) => End::Skipped { reason },
            Err(Stopped::Unreachable(reason)) => End::Unreachable { reason },
            Err(Stopped::Fail(fail)) => {
                if fail.stage != "cancelled" && !plan.hooks.on_error.is_empty() {
                    let error = format!("{}: {}", fail.stage, fail.message);
                    if let Err(Stopped::Fail(hook)) = self
                        .hooks(&plan, "on-error", &plan.hooks.on_error, Some(&error))
                        .await
                    {
                        tracing::warn!("on-error hook failed too: {}", hook.message);
                    }
                }
                fail.into_end()
            }
        }
    }

    /// The stages after the turn is ours.
    async fn stages(&mut self, plan: &Plan) -> Result<End, Stopped> {
        self.hooks(plan, "before", &plan.hooks.before, None).await?;

        self.stage("sources").await;
        missing_sources(&plan.sources).await?;

        self.stage("create").await;
        let mut args: Vec<String> = vec![
            "create".into(),
            "--log-json".into(),
            "--progress".into(),
            "--json".into(),
            lock_wait(plan),
        ];
        args.extend(plan.create_options.iter().cloned());
        args.push("--".into());
        args.push(format!("{}::{}", plan.repository, plan.archive_name_format));
        args.extend(plan.sources.iter().cloned());
        let created = self.borg(plan, "create", &args).await?;
        let stats = String::from_utf8_lossy(&created.stdout).into_owned();
        let parsed: Value = serde_json::from_str(&stats).map_err(|e| {
            Fail::new(
                "create",
                format!("borg create printed no JSON statistics ({e})"),
            )
        })?;
        let archive = parsed["archive"]["name"]
            .as_str()
            .ok_or_else(|| Fail::new("create", "borg create's statistics name no archive"))?
            .to_string();
        let totals = &parsed["archive"]["stats"];
        self.progress(
            totals["original_size"].as_u64().unwrap_or(0),
            totals["nfiles"].as_u64().unwrap_or(0),
        )
        .await;
        tracing::info!("created archive {archive}");

        if !plan.retention.is_empty() {
            self.stage("prune").await;
            let mut args = vec![
                "prune".to_string(),
                "--log-json".into(),
                lock_wait(plan),
                format!("--glob-archives={}", plan.prune_glob),
            ];
            args.extend(plan.retention.iter().cloned());
            args.extend(["--".into(), plan.repository.clone()]);
            self.borg(plan, "prune", &args).await?;
            if plan.compact {
                self.stage("compact").await;
                let args = [
                    "compact".to_string(),
                    "--log-json".into(),
                    lock_wait(plan),
                    "--".into(),
                    plan.repository.clone(),
                ];
                self.borg(plan, "compact", &args).await?;
            }
        }

        let checks = self.checks(plan).await?;
        self.hooks(plan, "after", &plan.hooks.after, None).await?;
        Ok(End::Finished {
            archive,
            stats,
            checks,
            warnings: std::mem::take(&mut self.warnings),
        })
    }

    /// Runs the checks that are due; returns the kinds that ran.
    async fn checks(&mut self, plan: &Plan) -> Result<Vec<&'static str>, Stopped> {
        let now = ferry_service::unix_now();
        let due = |kind: &str| {
            plan.checks
                .of(kind)
                .is_some_and(|d| d.due(self.checks_last.get(kind).copied(), now))
        };
        let (repository, archives, data) = (due("repository"), due("archives"), due("data"));
        let mut runs: Vec<Vec<String>> = Vec::new();
        let archive_flags = |args: &mut Vec<String>| {
            if data {
                args.push("--verify-data".into());
            }
            if let Some(last) = plan.checks.last {
                args.push(format!("--last={last}"));
            }
        };
        match (repository, archives || data, plan.checks.max_duration) {
            (false, false, _) => {}
            (true, other, Some(max)) => {
                runs.push(vec![
                    "--repository-only".into(),
                    format!("--max-duration={}", max.as_secs().max(1)),
                ]);
                if other {
                    let mut args = vec!["--archives-only".to_string()];
                    archive_flags(&mut args);
                    runs.push(args);
                }
            }
            (true, false, None) => runs.push(vec!["--repository-only".into()]),
            (false, true, _) => {
                let mut args = vec!["--archives-only".to_string()];
                archive_flags(&mut args);
                runs.push(args);
            }
            (true, true, None) => {
                let mut args = Vec::new();
                archive_flags(&mut args);
                runs.push(args);
            }
        }
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        self.stage("check").await;
        for flags in runs {
            let mut args = vec!["check".to_string(), "--log-json".into(), lock_wait(plan)];
            args.extend(flags);
            args.extend(["--".into(), plan.repository.clone()]);
            self.borg(plan, "check", &args).await?;
        }
        Ok(CHECK_KINDS
            .into_iter()
            .filter(|kind| match *kind {
                "repository" => repository,
                "archives" => archives || data,
                _ => data,
            })
            .collect())
    }

    /// Runs borg, retrying while the repository stays locked by someone else.
    async fn borg(
        &mut self,
        plan: &Plan,
        stage: &'static str,
        args: &[String],
    ) -> Result<BorgOutput, Stopped> {
        let config = self.config.clone();
        let settings = &config.borg;
        let mut delay = settings.busy_retry_delay.duration();
        let mut attempt = 0;
        loop {
            match self.borg_once(plan, stage, args).await {
                Attempt::Done(output) => return Ok(output),
                Attempt::Failed(fail) => return Err(fail.into()),
                Attempt::Unreachable(reason) => return Err(Stopped::Unreachable(reason)),
                Attempt::Busy(message) if attempt < settings.busy_retries => {
                    attempt += 1;
                    tracing::info!(
                        "repository busy ({message}); trying {stage} again in {}s ({attempt} of {})",
                        delay.as_secs(),
                        settings.busy_retries
                    );
                    self.stage("waiting").await;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancelled(&mut self.cancel) => return Err(Fail::cancelled("waiting").into()),
                    }
                    delay = delay.saturating_mul(2);
                    self.stage(stage).await;
                }
                Attempt::Busy(message) => {
                    return Err(Fail::new(
                        stage,
                        format!(
                        "the repository stayed locked by another borg through {} tries: {message}",
                        attempt + 1
                    ),
                    )
                    .into())
                }
            }
        }
    }

    async fn borg_once(&mut self, plan: &Plan, stage: &'static str, args: &[String]) -> Attempt {
        let settings = self.config.borg.clone();
        let ssh = (!plan.is_local()).then(|| self.ssh_setup(plan));
        let mut args = args.to_vec();
        if let Some(remote_path) = &plan.remote_path {
            args.insert(1, format!("--remote-path={remote_path}"));
        }
        let mut command = process::command(&settings.program, &args);
        for name in [
            "BORG_PASSPHRASE",
            "BORG_PASSCOMMAND",
            "BORG_PASSPHRASE_FD",
            "BORG_NEW_PASSPHRASE",
            "BORG_REPO",
            "BORG_RSH",
        ] {
            command.env_remove(name);
        }
        command
            .env("BORG_HOST_ID", &self.host_id)
            .env("BORG_HOSTNAME_IS_UNIQUE", "yes")
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "no")
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "no")
            .env("BORG_CHECK_I_KNOW_WHAT_I_AM_DOING", "NO")
            .env("BORG_DELETE_I_KNOW_WHAT_I_AM_DOING", "NO")
            .env("BORG_DISPLAY_PASSPHRASE", "no");
        if let Err(fail) = set_rsh(&mut command, plan, ssh.as_ref()) {
            return Attempt::Failed(fail);
        }
        let secret = match &plan.passphrase {
            Passphrase::None => None,
            Passphrase::Command(passcommand) => {
                command.env("BORG_PASSCOMMAND", passcommand);
                None
            }
            // Regular, root's, unreadable by others — or refused.
            Passphrase::File(path) => {
                let read = ferry_config::paths::open_secret(path, "the passphrase file").and_then(
                    |mut file| {
                        let mut bytes = Vec::new();
                        std::io::Read::read_to_end(&mut file, &mut bytes)
                            .map(|_| bytes)
                            .map_err(|e| {
                                format!("cannot read the passphrase file {}: {e}", path.display())
                            })
                    },
                );
                match read {
                    Ok(bytes) => Some(bytes),
                    Err(message) => return Attempt::Failed(Fail::new("config", message)),
                }
            }
            Passphrase::Inline(secret) => Some(secret.expose().as_bytes().to_vec()),
        };
        let pipe = match secret.as_deref().map(process::secret_pipe).transpose() {
            Ok(pipe) => pipe,
            Err(e) => {
                return Attempt::Failed(Fail::new(
                    stage,
                    format!("cannot hand borg the passphrase: {e}"),
                ))
            }
        };
        if let Some(fd) = &pipe {
            use std::os::fd::AsRawFd;
            command.env(
                "BORG_PASSPHRASE_FD",
                OsString::from(fd.as_raw_fd().to_string()),
            );
        }
        process::prepare(&mut command, pipe.as_ref(), libc::SIGINT);
        tracing::debug!("running borg {}", args.join(" "));

        let mut log = BorgLog::default();
        let mut last_progress: Option<Instant> = None;
        let events = self.events.clone();
        let id = self.id.clone();
        let limits = Limits {
            cancel: &mut self.cancel,
            timeout: settings.command_timeout.duration(),
            first_signal: libc::SIGINT,
            grace: settings.cancel_timeout.duration(),
        };
        let ended = process::supervise(command, pipe, limits, |line| {
            if let Some((bytes, files)) = log.line(line) {
                if last_progress.is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL) {
                    last_progress = Some(Instant::now());
                    // Progress is best effort: a full queue drops a report, never blocks borg.
                    let _ = events.try_send((id.clone(), Event::Progress { bytes, files }));
                }
            }
        })
        .await;
        let ended = match ended {
            Ok(ended) => ended,
            Err(e) => {
                return Attempt::Failed(Fail::new(
                    stage,
                    format!(
                        "cannot run {}: {e} (is borgbackup installed?)",
                        settings.program
                    ),
                ))
            }
        };
        match ended.stopped {
            Some(Stop::Cancelled) => return Attempt::Failed(Fail::cancelled(stage)),
            Some(Stop::TimedOut) => {
                return Attempt::Failed(Fail::new(
                    stage,
                    format!(
                        "borg {stage} ran longer than {}s (command-timeout) and was stopped",
                        settings.command_timeout.as_secs()
                    ),
                ))
            }
            None => {}
        }
        for warning in &log.warnings {
            tracing::warn!("borg {stage}: {warning}");
        }
        match ended.status.code() {
            Some(0) => Attempt::Done(BorgOutput {
                stdout: ended.stdout,
            }),
            // 1: warnings (a file vanished, a permission): the archive is
            // made but may lack files; the job says so, never plain success.
            Some(1) => {
                if log.warnings.is_empty() {
                    self.warnings
                        .push(format!("borg {stage} exited with its warning status (1)"));
                }
                self.warnings
                    .extend(log.warnings.iter().map(|w| format!("{stage}: {w}")));
                Attempt::Done(BorgOutput {
                    stdout: ended.stdout,
                })
            }
            _ if log.busy => Attempt::Busy(log.message(ended.status)),
            _ => match &ssh {
                Some(ssh) => over_ssh(plan, ssh, stage, &log, ended.status).await,
                None => Attempt::Failed(Fail::new(stage, log.message(ended.status))),
            },
        }
    }

    /// How ssh runs for `plan`'s remote repository.
    fn ssh_setup(&self, plan: &Plan) -> SshSetup {
        let home = remote::service_home();
        let settings = &self.config.borg;
        SshSetup {
            command: plan.rsh.clone(),
            known_hosts: plan
                .ssh
                .known_hosts
                .clone()
                .or_else(|| settings.ssh_known_hosts.as_ref().map(|p| p.resolve(&home))),
            identity: plan.ssh.identity.clone(),
            connect_timeout: settings.ssh_connect_timeout.duration(),
            home,
        }
    }

    /// Runs hook commands in order. A before hook exiting 75 skips the run.
    async fn hooks(
        &mut self,
        plan: &Plan,
        which: &'static str,
        commands: &[String],
        error: Option<&str>,
    ) -> Result<(), Stopped> {
        if commands.is_empty() {
            return Ok(());
        }
        self.stage("hook").await;
        let settings = self.config.borg.clone();
        for hook in commands {
            let mut command = process::command("/bin/sh", &["-c", hook.as_str()]);
            command
                .env("FERRY_PROFILE", self.profile.as_str())
                .env("FERRY_REPOSITORY", &plan.repository)
                .env("FERRY_JOB", &self.id)
                .env_remove("FERRY_ERROR");
            if let Some(error) = error {
                command.env("FERRY_ERROR", error);
            }
            process::prepare(&mut command, None, libc::SIGTERM);
            let mut output = Vec::new();
            let limits = Limits {
                cancel: &mut self.cancel,
                timeout: settings.hook_timeout.duration(),
                first_signal: libc::SIGTERM,
                grace: Duration::from_secs(5),
            };
            let ended = process::supervise(command, None, limits, |line| {
                tracing::info!("{which} hook: {line}");
                if output.len() < MESSAGE_LINES {
                    output.push(line.to_string());
                }
            })
            .await
            .map_err(|e| Fail::new("hook", format!("cannot run the {which} hook `{hook}`: {e}")))?;
            for line in String::from_utf8_lossy(&ended.stdout).lines() {
                tracing::info!("{which} hook: {line}");
            }
            match (ended.stopped, ended.status.code()) {
                (Some(Stop::Cancelled), _) => return Err(Fail::cancelled("hook").into()),
                (Some(Stop::TimedOut), _) => {
                    return Err(Fail::new(
                        "hook",
                        format!(
                            "the {which} hook `{hook}` ran longer than {}s (hook-timeout)",
                            settings.hook_timeout.as_secs()
                        ),
                    )
                    .into())
                }
                (None, Some(0)) => {}
                (None, Some(SKIP_EXIT_CODE)) if which == "before" => {
                    return Err(Stopped::Skip(format!(
                        "the before hook `{hook}` exited {SKIP_EXIT_CODE} (skip this run)"
                    )))
                }
                (None, Some(SKIP_EXIT_CODE)) if which == "after" => {}
                (None, code) => {
                    let how = code.map_or("was killed by a signal".to_string(), |c| {
                        format!("exited {c}")
                    });
                    let said = if output.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", output.join(" / "))
                    };
                    return Err(Fail::new(
                        "hook",
                        format!("the {which} hook `{hook}` {how}{said}"),
                    )
                    .into());
                }
            }
        }
        Ok(())
    }

    async fn stage(&self, stage: &'static str) {
        let _ = self
            .events
            .send((self.id.clone(), Event::Stage(stage)))
            .await;
    }

    async fn progress(&self, bytes: u64, files: u64) {
        let _ = self
            .events
            .send((self.id.clone(), Event::Progress { bytes, files }))
            .await;
    }
}

impl Fail {
    fn into_end(self) -> End {
        End::Failed {
            stage: self.stage,
            message: self.message,
        }
    }
}

enum Attempt {
    Done(BorgOutput),
    Busy(String),
    Failed(Fail),
    Unreachable(String),
}

/// BORG_RSH for borg: ferry's ssh command for a remote repository, else
/// the plan's own (a borgmatic ssh_command for a local repository).
fn set_rsh(
    command: &mut tokio::process::Command,
    plan: &Plan,
    ssh: Option<&SshSetup>,
) -> Result<(), Fail> {
    let rsh = match ssh {
        Some(ssh) => ssh
            .borg_rsh(|path| path.exists())
            .map_err(|e| Fail::new("config", e.to_string()))?,
        None => match &plan.rsh {
            Some(rsh) => rsh.clone(),
            None => return Ok(()),
        },
    };
    tracing::debug!("BORG_RSH={rsh}");
    command.env("BORG_RSH", rsh);
    Ok(())
}

/// A borg run over SSH that failed: the server unreachable (a skip), or
/// refused (a failure that says what to do), or borg's own error. When
/// borg lost the connection without relaying why (it may exit before it
/// has read ssh's last words), ssh is asked once more, by itself.
async fn over_ssh(
    plan: &Plan,
    ssh: &SshSetup,
    stage: &str,
    log: &BorgLog,
    status: std::process::ExitStatus,
) -> Attempt {
    let url = ferry_config::SshUrl::parse(&plan.repository).ok();
    let server = url
        .as_ref()
        .map(|url| url.known_hosts_name())
        .unwrap_or_else(|| plan.repository.clone());
    let mut diagnosis = remote::diagnose(&log.remote, &log.msgids, &log.errors);
    let lost = log.msgids.iter().any(|m| m.starts_with("ConnectionClosed"));
    if let (None, true, Some(url)) = (&diagnosis, lost, &url) {
        match ssh.borg_rsh(|path| path.exists()) {
            Ok(rsh) => {
                let said = remote::probe(&rsh, url, ssh.connect_timeout).await;
                tracing::debug!("ssh probe of {server}: {}", said.join(" / "));
                diagnosis = remote::diagnose(&said, &[], &[]);
            }
            Err(e) => tracing::debug!("no ssh probe: {e}"),
        }
    }
    match diagnosis {
        Some(Diagnosis::Unreachable(why)) => Attempt::Unreachable(format!(
            "the SSH server {server} is unreachable: {}",
            why.describe()
        )),
        Some(Diagnosis::Refused(refused)) => {
            let said = log.remote.last().cloned().unwrap_or_default();
            Attempt::Failed(Fail::new(
                stage,
                remote::refusal_message(&refused, &server, &ssh.known_hosts(), &said),
            ))
        }
        None => {
            let mut message = log.message(status);
            if !log.remote.is_empty() {
                message = format!("{message} (ssh: {})", log.remote.join(" / "));
            }
            Attempt::Failed(Fail::new(stage, message))
        }
    }
}

/// Fails at stage `sources` when a source does not exist (each one missing
/// is named). Looked up off the runtime, without following a last symlink
/// to decide (borg archives a symlink as such).
async fn missing_sources(sources: &[String]) -> Result<(), Fail> {
    let mut missing = Vec::new();
    for source in sources {
        match tokio::fs::symlink_metadata(source).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(source.clone()),
            Err(e) => missing.push(format!("{source} ({e})")),
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(Fail::new(
        "sources",
        format!(
            "source director{} {} do{} not exist; borg was not run (create {}, fix the path in the profile, or remove it)",
            if missing.len() == 1 { "y" } else { "ies" },
            missing.join(", "),
            if missing.len() == 1 { "es" } else { "" },
            if missing.len() == 1 { "it" } else { "them" },
        ),
    ))
}

fn lock_wait(plan: &Plan) -> String {
    format!("--lock-wait={}", plan.lock_wait.as_secs())
}

/// Resolves once the job is cancelled (never if the sender is gone).
async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// What borg said on stderr with --log-json.
#[derive(Default)]
pub struct BorgLog {
    /// ERROR and CRITICAL messages.
    pub errors: Vec<String>,
    /// WARNING messages.
    pub warnings: Vec<String>,
    /// Lines that were not JSON (a Python traceback).
    pub other: Vec<String>,
    /// borg gave up waiting for a lock.
    pub busy: bool,
    /// What borg relayed from ssh and the server (`Remote: …`), the last ones.
    pub remote: Vec<String>,
    /// The msgids of borg's errors.
    pub msgids: Vec<String>,
}

impl BorgLog {
    /// Takes one stderr line; returns progress (bytes, files) if it was one.
    pub fn line(&mut self, line: &str) -> Option<(u64, u64)> {
        let Ok(value) = serde_json::from_str::<Value>(line) else {
            if !line.trim().is_empty() {
                keep_last(&mut self.other, line.trim().to_string());
            }
            return None;
        };
        match value["type"].as_str() {
            Some("archive_progress") => {
                Some((value["original_size"].as_u64()?, value["nfiles"].as_u64()?))
            }
            Some("log_message") => {
                let message = value["message"]
                    .as_str()
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                if let Some(relayed) = message.strip_prefix("Remote: ") {
                    if self.remote.len() == REMOTE_LINES {
                        self.remote.remove(0);
                    }
                    tracing::debug!("borg relayed: {relayed}");
                    self.remote.push(relayed.trim().to_string());
                }
                match value["levelname"].as_str() {
                    Some("ERROR") | Some("CRITICAL") => {
                        if value["msgid"].as_str() == Some(LOCK_TIMEOUT) {
                            self.busy = true;
                        }
                        if let Some(id) = value["msgid"].as_str() {
                            self.msgids.push(id.to_string());
                        }
                        keep_last(&mut self.errors, message);
                    }
                    Some("WARNING") => keep_last(&mut self.warnings, message),
                    _ => tracing::debug!("borg: {message}"),
                }
                None
            }
            _ => None,
        }
    }

    /// The failure message: borg's own errors, else its other output, else the status.
    pub fn message(&self, status: std::process::ExitStatus) -> String {
        let lines = if self.errors.is_empty() {
            &self.other
        } else {
            &self.errors
        };
        if lines.is_empty() {
            format!("borg failed ({status}) without saying why")
        } else {
            lines.join("; ")
        }
    }
}

fn keep_last(lines: &mut Vec<String>, line: String) {
    if lines.len() == MESSAGE_LINES {
        lines.remove(0);
    }
    lines.push(line);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn borg_log_lines() {
        let mut log = BorgLog::default();
        assert_eq!(
            log.line(r#"{"original_size": 11326322, "compressed_size": 1, "deduplicated_size": 1, "nfiles": 3, "path": "src/a", "time": 1.0, "type": "archive_progress", "finished": false}"#),
            Some((11326322, 3))
        );
        assert_eq!(
            log.line(r#"{"time": 1.0, "type": "archive_progress", "finished": true}"#),
            None
        );
        log.line(r#"{"type": "log_message", "time": 1.0, "message": "passphrase supplied in BORG_PASSPHRASE, by BORG_PASSCOMMAND or via BORG_PASSPHRASE_FD is incorrect.", "levelname": "ERROR", "name": "borg.archiver", "msgid": "PassphraseWrong"}"#);
        assert!(!log.busy);
        assert_eq!(
            log.message(std::process::ExitStatus::from_raw(2 << 8)),
            "passphrase supplied in BORG_PASSPHRASE, by BORG_PASSCOMMAND or via BORG_PASSPHRASE_FD is incorrect."
        );
        log.line(r#"{"type": "log_message", "time": 1.0, "message": "Failed to create/acquire the lock /r/lock.exclusive (timeout).", "levelname": "ERROR", "name": "borg.archiver", "msgid": "LockTimeout"}"#);
        assert!(log.busy);
        let mut traceback = BorgLog::default();
        traceback.line("Traceback (most recent call last):");
        traceback.line("OSError: [Errno 28] No space left on device");
        assert!(traceback
            .message(std::process::ExitStatus::from_raw(2 << 8))
            .ends_with("No space left on device"));
    }
}
