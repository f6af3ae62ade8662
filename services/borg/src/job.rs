//! One job: a profile run from Start to its end, as a task the service loop
//! owns. It checks the preconditions, resolves the plan (reading a borgmatic
//! file if the profile has one), waits its turn on the repository, holds a
//! logind inhibitor, runs the before hooks, borg create → prune → compact →
//! check as the plan says, the after (or on-error) hooks, and returns how it
//! ended. Before borg create it checks that every source exists (stage
//! `sources`, as borgmatic refuses to run): borg itself would only warn,
//! make an archive without them and exit 1. borg's warning exit (1) is kept
//! apart from success: the job ends [`End::Finished`] with borg's warning
//! lines, which is reported as "finished with warnings". Progress and
//! stage changes go to the loop as events, and the end is the task's
//! result; what they make of the properties and signals is the
//! [`crate::domain`]'s to decide. Files (the borgmatic file, the
//! passphrase file, preconditions) are read off the runtime.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_config::{Config, Name};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

pub use crate::domain::{End, Event, Stage};
use crate::plan::{
    interpolate, Action, Outcome, Passphrase, Plan, PlanError, Retries, Scope, CHECK_KINDS,
};
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
    stage: Stage,
    message: String,
}

impl Fail {
    fn new(stage: Stage, message: impl Into<String>) -> Fail {
        Fail {
            stage,
            message: message.into(),
        }
    }

    fn cancelled(during: Stage) -> Fail {
        Fail::new(Stage::Cancelled, format!("cancelled during {during}"))
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

/// What one repository's actions produced.
#[derive(Default)]
struct Done {
    archive: String,
    stats: String,
    checks: Vec<String>,
}

/// How each repository of a job ended, by name (empty: the job's own
/// hooks).
#[derive(Default)]
struct Ended {
    done: Vec<(String, Done)>,
    skipped: Vec<(String, String)>,
    failures: Vec<(String, Fail)>,
    /// Repositories whose SSH server (or the network) could not be
    /// reached: the job ends [`End::Unreachable`] unless one failed, so
    /// that the profile's unreachable-grace runs until every repository is
    /// reached again.
    unreachable: Vec<(String, String)>,
}

impl Ended {
    fn from_stop(stopped: Stopped) -> Ended {
        let mut ended = Ended::default();
        match stopped {
            Stopped::Skip(reason) => ended.skipped.push((String::new(), reason)),
            Stopped::Fail(fail) => ended.failures.push((String::new(), fail)),
            Stopped::Unreachable(reason) => ended.unreachable.push((String::new(), reason)),
        }
        ended
    }

    fn several(&self) -> bool {
        let named = |name: &String| !name.is_empty();
        self.done.iter().filter(|(n, _)| named(n)).count()
            + self.skipped.iter().filter(|(n, _)| named(n)).count()
            + self.failures.iter().filter(|(n, _)| named(n)).count()
            + self.unreachable.iter().filter(|(n, _)| named(n)).count()
            > 1
    }

    /// The failure that names the job's end: a cancel, else the first.
    fn failure(&self) -> Option<&(String, Fail)> {
        self.failures
            .iter()
            .find(|(_, f)| f.stage == Stage::Cancelled)
            .or(self.failures.first())
    }

    /// `stage: message` of the failure, for FERRY_ERROR.
    fn error(&self) -> String {
        self.failure()
            .map(|(name, fail)| format!("{}: {}", fail.stage, self.prefixed(name, &fail.message)))
            .unwrap_or_default()
    }

    fn prefixed(&self, name: &str, text: &str) -> String {
        if self.several() && !name.is_empty() {
            format!("repository {name}: {text}")
        } else {
            text.to_string()
        }
    }

    /// One line per repository.
    fn summary(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .done
            .iter()
            .map(|(name, done)| format!("{name}: archive {}", done.archive))
            .collect();
        lines.extend(
            self.skipped
                .iter()
                .map(|(n, why)| format!("{n}: skipped: {why}")),
        );
        lines.extend(
            self.failures
                .iter()
                .filter(|(n, _)| !n.is_empty())
                .map(|(n, f)| format!("{n}: failed at {}: {}", f.stage, f.message)),
        );
        lines.extend(
            self.unreachable
                .iter()
                .filter(|(n, _)| !n.is_empty())
                .map(|(n, why)| format!("{n}: unreachable: {why}")),
        );
        lines
    }

    fn into_end(self, warnings: Vec<String>) -> End {
        let summary = if self.several() {
            self.summary()
        } else {
            Vec::new()
        };
        if let Some((name, fail)) = self.failure() {
            let mut message = self.prefixed(name, &fail.message);
            if !summary.is_empty() {
                message = format!("{message} (all repositories: {})", summary.join("; "));
            }
            return End::Failed {
                stage: fail.stage,
                message,
            };
        }
        if !self.unreachable.is_empty() {
            let reasons: Vec<String> = self
                .unreachable
                .iter()
                .map(|(name, why)| self.prefixed(name, why))
                .collect();
            let mut reason = reasons.join("; ");
            if !summary.is_empty() {
                reason = format!("{reason} (all repositories: {})", summary.join("; "));
            }
            return End::Unreachable { reason };
        }
        let Some((_, first)) = self.done.first() else {
            let reasons: Vec<String> = self
                .skipped
                .iter()
                .map(|(name, why)| self.prefixed(name, why))
                .collect();
            return End::Skipped {
                reason: reasons.join("; "),
            };
        };
        End::Finished {
            archive: first.archive.clone(),
            stats: first.stats.clone(),
            checks: self
                .done
                .iter()
                .flat_map(|(_, d)| d.checks.clone())
                .collect(),
            warnings,
            repositories: summary,
        }
    }
}

/// One repository's turn in the queue.
struct Turn<'a> {
    name: &'a str,
    index: usize,
    /// 0 for its first try.
    attempt: u32,
    retries: Retries,
}

/// borgmatic's repository queue: each repository of the file in turn; one
/// that failed (or whose server was unreachable) goes to the back of the
/// queue while it has `retries` left, to be tried after `retry_wait` ×
/// its attempt.
struct Queue {
    pending: VecDeque<(usize, u32)>,
}

impl Queue {
    fn new(repositories: usize) -> Queue {
        Queue {
            pending: (0..repositories).map(|i| (i, 0)).collect(),
        }
    }

    /// The next repository (its index) and its attempt (0: the first).
    fn next(&mut self) -> Option<(usize, u32)> {
        self.pending.pop_front()
    }

    /// Files how a turn went into `ended`, or queues the repository
    /// again; false when the job must stop (it was cancelled).
    fn record(&mut self, ended: &mut Ended, turn: Turn, result: Result<Done, Stopped>) -> bool {
        let name = turn.name.to_string();
        match result {
            Ok(done) => ended.done.push((name, done)),
            Err(Stopped::Skip(reason)) => ended.skipped.push((name, reason)),
            Err(Stopped::Fail(fail)) if fail.stage == Stage::Cancelled => {
                ended.failures.push((name, fail));
                return false;
            }
            Err(stopped) if turn.attempt < turn.retries.count => {
                let why = match stopped {
                    Stopped::Fail(fail) => format!("{}: {}", fail.stage, fail.message),
                    Stopped::Unreachable(reason) | Stopped::Skip(reason) => reason,
                };
                tracing::warn!(
                    "repository {name}: {why}; trying again (attempt {} of {})",
                    turn.attempt + 2,
                    turn.retries.count + 1
                );
                self.pending.push_back((turn.index, turn.attempt + 1));
            }
            Err(Stopped::Fail(fail)) => ended.failures.push((name, fail)),
            Err(Stopped::Unreachable(reason)) => ended.unreachable.push((name, reason)),
        }
        true
    }
}

/// Why a profile has no plan to run (stage `config`).
#[derive(Debug, thiserror::Error)]
pub enum PlansError {
    /// Its borgmatic file cannot be used.
    #[error(transparent)]
    Borgmatic(#[from] borgmatic::Error),
    /// Its ferry.toml profile makes no plan, or one that writes to a drive.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// It backs up to no repository.
    #[error("profile `{0}` backs up to no repository")]
    Empty(Name),
}

/// The plans of a profile: one, or one per repository of its borgmatic
/// file; each refused if it would write to a drive. Reads files (the
/// borgmatic file, patterns_from, symlinks): call it off the runtime.
pub fn plans(
    config: &Config,
    name: &Name,
    profile: &ferry_config::Profile,
) -> Result<Vec<Plan>, PlansError> {
    let plans = match profile.borgmatic_config {
        Some(_) => borgmatic::load(config, name, profile)?,
        None => vec![Plan::of_profile(config, name, profile)?],
    };
    for plan in &plans {
        plan.refuse_on_a_drive(config)?;
    }
    if plans.is_empty() {
        return Err(PlansError::Empty(name.clone()));
    }
    Ok(plans)
}

/// [`plans`] off the runtime; a failure is one at stage `config`.
async fn plans_off_runtime(
    config: Arc<Config>,
    name: Name,
    profile: ferry_config::Profile,
) -> Result<Vec<Plan>, Fail> {
    let planned = tokio::task::spawn_blocking(move || plans(&config, &name, &profile)).await;
    match planned {
        Ok(Ok(plans)) => Ok(plans),
        Ok(Err(e)) => Err(Fail::new(Stage::Config, e.to_string())),
        Err(e) => Err(Fail::new(
            Stage::Config,
            format!("the plan was not made: {e}"),
        )),
    }
}

/// What one borg run produced.
struct BorgOutput {
    stdout: Vec<u8>,
}

impl Job {
    /// Runs the job to its end.
    pub async fn run(mut self) -> End {
        let plans = match self.ready().await {
            Ok(plans) => plans,
            Err(end) => return end,
        };
        let _inhibitor = match &self.logind {
            Some(bus) => {
                let why = format!("borg backup of profile {}", self.profile);
                system::inhibit(bus, &why).await
            }
            None => None,
        };
        let first = &plans[0];
        let outer = [Scope::Everything, Scope::Configuration];
        let mut before = Ok(());
        for scope in outer {
            if before.is_ok() {
                before = self.scoped(first, true, scope, None, None, None).await;
            }
        }
        let ended = match before {
            Ok(()) => self.repositories(&plans).await,
            // A before hook's soft failure (75): nothing more runs, as in borgmatic.
            Err(Stopped::Skip(reason)) => return End::Skipped { reason },
            Err(stopped) => Ended::from_stop(stopped),
        };
        self.wind_up(first, ended).await
    }

    /// Whether the profile may run now (its preconditions, the network)
    /// and its plans; else how the job ends without running anything.
    async fn ready(&mut self) -> Result<Vec<Plan>, End> {
        let name = self.profile.clone();
        let Some(profile) = self.config.profiles.get(&name).cloned() else {
            return Err(End::Failed {
                stage: Stage::Config,
                message: format!("profile `{name}` is no longer configured"),
            });
        };
        self.stage(Stage::Waiting).await;
        if let Some(reason) = system::preconditions_block(&profile.preconditions).await {
            return Err(End::Skipped { reason });
        }
        if profile.preconditions.network_online {
            if let Err(offline) = network::online().await {
                return Err(End::Unreachable {
                    reason: format!("{}: {offline}", Unreachable::NetworkOffline.describe()),
                });
            }
        }
        let plans = plans_off_runtime(self.config.clone(), name.clone(), profile)
            .await
            .map_err(|fail| End::Failed {
                stage: fail.stage,
                message: fail.message,
            })?;
        for warning in plans.iter().flat_map(|p| &p.warnings) {
            tracing::warn!("profile {name}: {warning}");
        }
        Ok(plans)
    }

    /// Backs up every repository in turn (borgmatic's queue: a failed one
    /// is tried again after the others, `retries` times, `retry_wait` ×
    /// attempt later).
    async fn repositories(&mut self, plans: &[Plan]) -> Ended {
        let mut ended = Ended::default();
        let mut queue = Queue::new(plans.len());
        while let Some((index, attempt)) = queue.next() {
            let plan = &plans[index];
            let wait = plan.retries.wait.saturating_mul(attempt);
            if !wait.is_zero() {
                self.stage(Stage::Waiting).await;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancelled(&mut self.cancel) => {
                        ended.failures.push((plan.name().to_string(), Fail::cancelled(Stage::Waiting)));
                        break;
                    }
                }
            }
            let key = (plans.len() > 1).then(|| plan.repository.clone());
            let result = self.repository(plan, key.as_deref()).await;
            let turn = Turn {
                name: plan.name(),
                index,
                attempt,
                retries: plan.retries,
            };
            if !queue.record(&mut ended, turn, result) {
                break;
            }
        }
        ended
    }

    /// One repository: its turn, its hooks, its actions.
    async fn repository(&mut self, plan: &Plan, key: Option<&str>) -> Result<Done, Stopped> {
        self.stage(Stage::Waiting).await;
        let turn = self.locks.lock_for(&plan.repository_key().await);
        let _turn = tokio::select! {
            guard = turn.lock_owned() => guard,
            _ = cancelled(&mut self.cancel) => return Err(Fail::cancelled(Stage::Waiting).into()),
        };
        self.scoped(plan, true, Scope::Repository, None, None, None)
            .await?;
        let done = self.actions(plan, key).await;
        let outcome = Some(if done.is_ok() {
            Outcome::Finish
        } else {
            Outcome::Fail
        });
        let after = self
            .scoped(plan, false, Scope::Repository, None, outcome, None)
            .await;
        let done = done?;
        after?;
        Ok(done)
    }

    /// create → prune → compact → check, each within its action hooks.
    async fn actions(&mut self, plan: &Plan, key: Option<&str>) -> Result<Done, Stopped> {
        let mut done = Done::default();
        for action in Action::ALL {
            let runs = match action {
                Action::Prune => plan.prune_args().is_some(),
                Action::Compact => plan.compact_args().is_some(),
                _ => true,
            };
            if !runs {
                continue;
            }
            self.scoped(plan, true, Scope::Action, Some(action), None, None)
                .await?;
            let result = self.action(plan, action, key, &mut done).await;
            let outcome = Some(if result.is_ok() {
                Outcome::Finish
            } else {
                Outcome::Fail
            });
            let after = self
                .scoped(plan, false, Scope::Action, Some(action), outcome, None)
                .await;
            result?;
            after?;
        }
        Ok(done)
    }

    async fn action(
        &mut self,
        plan: &Plan,
        action: Action,
        key: Option<&str>,
        done: &mut Done,
    ) -> Result<(), Stopped> {
        match action {
            Action::Create => {
                if plan.sources_must_exist {
                    self.stage(Stage::Sources).await;
                    missing_sources(&plan.sources).await?;
                }
                self.stage(Stage::Create).await;
                let created = self.borg(plan, Stage::Create, &plan.create_args()).await?;
                let (archive, stats) = self.created(created).await?;
                tracing::info!("created archive {archive} in {}", plan.repository);
                done.archive = archive;
                done.stats = stats;
            }
            Action::Prune => {
                if let Some(args) = plan.prune_args() {
                    self.stage(Stage::Prune).await;
                    self.borg(plan, Stage::Prune, &args).await?;
                }
            }
            Action::Compact => {
                if let Some(args) = plan.compact_args() {
                    self.stage(Stage::Compact).await;
                    self.borg(plan, Stage::Compact, &args).await?;
                }
            }
            Action::Check => done.checks = self.checks(plan, key).await?,
        }
        Ok(())
    }

    /// The archive name and statistics borg create printed.
    async fn created(&self, created: BorgOutput) -> Result<(String, String), Fail> {
        let stats = String::from_utf8_lossy(&created.stdout).into_owned();
        let parsed: Value = serde_json::from_str(&stats).map_err(|e| {
            Fail::new(
                Stage::Create,
                format!("borg create printed no JSON statistics ({e})"),
            )
        })?;
        let archive = parsed["archive"]["name"]
            .as_str()
            .ok_or_else(|| Fail::new(Stage::Create, "borg create's statistics name no archive"))?
            .to_string();
        let totals = &parsed["archive"]["stats"];
        self.progress(
            totals["original_size"].as_u64().unwrap_or(0),
            totals["nfiles"].as_u64().unwrap_or(0),
        )
        .await;
        Ok((archive, stats))
    }

    /// After the repositories: the after hooks of the file (and on error
    /// its error hooks), then how the job ended.
    async fn wind_up(&mut self, plan: &Plan, mut ended: Ended) -> End {
        let failed = !ended.failures.is_empty();
        let outcome = Some(if failed {
            Outcome::Fail
        } else {
            Outcome::Finish
        });
        let cancelled = ended
            .failures
            .iter()
            .any(|(_, f)| f.stage == Stage::Cancelled);
        if !cancelled {
            if let Err(Stopped::Fail(fail)) = self
                .scoped(plan, false, Scope::Configuration, None, outcome, None)
                .await
            {
                ended.failures.push((String::new(), fail));
            }
        }
        if !ended.failures.is_empty() && !cancelled {
            let error = ended.error();
            if let Err(Stopped::Fail(hook)) = self
                .scoped(plan, false, Scope::Error, None, None, Some(&error))
                .await
            {
                tracing::warn!("on-error hook failed too: {}", hook.message);
            }
        }
        if !cancelled {
            let outcome = Some(if ended.failures.is_empty() {
                Outcome::Finish
            } else {
                Outcome::Fail
            });
            if let Err(Stopped::Fail(fail)) = self
                .scoped(plan, false, Scope::Everything, None, outcome, None)
                .await
            {
                ended.failures.push((String::new(), fail));
            }
        }
        ended.into_end(std::mem::take(&mut self.warnings))
    }

    /// Runs the hooks of a scope that apply (`action`: the action around
    /// which; `outcome`: how the scope ended, for after hooks).
    async fn scoped(
        &mut self,
        plan: &Plan,
        before: bool,
        scope: Scope,
        action: Option<Action>,
        outcome: Option<Outcome>,
        error: Option<&str>,
    ) -> Result<(), Stopped> {
        let commands = plan.hooks.select(before, scope, action, outcome);
        let moment = match (before, scope) {
            (false, Scope::Error) => Moment::OnError,
            (true, _) => Moment::Before,
            (false, _) => Moment::After,
        };
        self.hooks(plan, moment, &commands, error).await
    }

    /// Runs the checks that are due; returns the keys of the kinds that ran
    /// (`kind`, or `kind@repository` when the profile has several).
    async fn checks(&mut self, plan: &Plan, key: Option<&str>) -> Result<Vec<String>, Stopped> {
        let now = ferry_service::unix_now();
        let name = |kind: &str| match key {
            Some(repository) => format!("{kind}@{repository}"),
            None => kind.to_string(),
        };
        let due = |kind: &str| {
            plan.checks
                .of(kind)
                .is_some_and(|d| d.due(self.checks_last.get(&name(kind)).copied(), now))
        };
        let (repository, archives, data) = (due("repository"), due("archives"), due("data"));
        let runs = plan.check_args(repository, archives, data);
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        self.stage(Stage::Check).await;
        for args in runs {
            self.borg(plan, Stage::Check, &args).await?;
        }
        Ok(CHECK_KINDS
            .into_iter()
            .filter(|kind| match *kind {
                "repository" => repository,
                "archives" => archives || data,
                _ => data,
            })
            .map(name)
            .collect())
    }

    /// Runs borg, retrying while the repository stays locked by someone else.
    async fn borg(
        &mut self,
        plan: &Plan,
        stage: Stage,
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
                    self.stage(Stage::Waiting).await;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancelled(&mut self.cancel) => return Err(Fail::cancelled(Stage::Waiting).into()),
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

    /// One run of borg: its command line and environment, its supervised
    /// run, and what its exit means.
    async fn borg_once(&mut self, plan: &Plan, stage: Stage, args: &[String]) -> Attempt {
        let ssh = (!plan.is_local()).then(|| self.ssh_setup(plan));
        let prepared = match self.borg_command(plan, stage, args, ssh.as_ref()).await {
            Ok(prepared) => prepared,
            Err(fail) => return Attempt::Failed(fail),
        };
        let (ended, log) = match self.supervise_borg(prepared, stage).await {
            Ok(run) => run,
            Err(fail) => return Attempt::Failed(fail),
        };
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

    /// borg's command for `args`: a clean environment (no passphrase or
    /// repository of ferry's own), the host id, borg's safety answers, the
    /// ssh command, and the passphrase as a pipe only borg inherits.
    async fn borg_command(
        &self,
        plan: &Plan,
        stage: Stage,
        args: &[String],
        ssh: Option<&SshSetup>,
    ) -> Result<Prepared, Fail> {
        let mut command = process::command(&self.config.borg.program, args);
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
        set_rsh(&mut command, plan, ssh).await?;
        let secret = match &plan.passphrase {
            Passphrase::None => None,
            Passphrase::Command(passcommand) => {
                command.env("BORG_PASSCOMMAND", passcommand);
                None
            }
            Passphrase::File(path) => Some(read_passphrase(path.clone()).await?),
            Passphrase::Inline(secret) => Some(secret.expose().as_bytes().to_vec()),
        };
        let pipe = secret
            .as_deref()
            .map(process::secret_pipe)
            .transpose()
            .map_err(|e| Fail::new(stage, format!("cannot hand borg the passphrase: {e}")))?;
        if let Some(fd) = &pipe {
            use std::os::fd::AsRawFd;
            command.env(
                "BORG_PASSPHRASE_FD",
                OsString::from(fd.as_raw_fd().to_string()),
            );
        }
        process::prepare(&mut command, pipe.as_ref(), libc::SIGINT);
        tracing::debug!("running borg {}", args.join(" "));
        Ok(Prepared { command, pipe })
    }

    /// Runs a prepared borg until it exits, reading its log (progress goes
    /// to the loop, at most every [`PROGRESS_INTERVAL`]); a cancel or the
    /// command timeout stops it (SIGINT first: borg checkpoints).
    async fn supervise_borg(
        &mut self,
        prepared: Prepared,
        stage: Stage,
    ) -> Result<(process::Ended, BorgLog), Fail> {
        let settings = self.config.borg.clone();
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
        let ended = process::supervise(prepared.command, prepared.pipe, limits, |line| {
            if let Some((bytes, files)) = log.line(line) {
                if last_progress.is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL) {
                    last_progress = Some(Instant::now());
                    // Progress is best effort: a full queue drops a report, never blocks borg.
                    let _ = events.try_send((id.clone(), Event::Progress { bytes, files }));
                }
            }
        })
        .await
        .map_err(|e| {
            Fail::new(
                stage,
                format!(
                    "cannot run {}: {e} (is borgbackup installed?)",
                    settings.program
                ),
            )
        })?;
        match ended.stopped {
            Some(Stop::Cancelled) => Err(Fail::cancelled(stage)),
            Some(Stop::TimedOut) => Err(Fail::new(
                stage,
                format!(
                    "borg {stage} ran longer than {}s (command-timeout) and was stopped",
                    settings.command_timeout.as_secs()
                ),
            )),
            None => Ok((ended, log)),
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
        moment: Moment,
        commands: &[String],
        error: Option<&str>,
    ) -> Result<(), Stopped> {
        if commands.is_empty() {
            return Ok(());
        }
        self.stage(Stage::Hook).await;
        for hook in commands {
            self.hook(plan, moment, hook, error).await?;
        }
        Ok(())
    }

    /// Runs one hook command under the hook timeout, its output logged.
    async fn hook(
        &mut self,
        plan: &Plan,
        moment: Moment,
        hook: &str,
        error: Option<&str>,
    ) -> Result<(), Stopped> {
        let timeout = self.config.borg.hook_timeout.duration();
        let text = hook_text(plan, hook, error);
        let mut command = process::command("/bin/sh", &["-c", text.as_str()]);
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
            timeout,
            first_signal: libc::SIGTERM,
            grace: Duration::from_secs(5),
        };
        let ended = process::supervise(command, None, limits, |line| {
            tracing::info!("{moment} hook: {line}");
            if output.len() < MESSAGE_LINES {
                output.push(line.to_string());
            }
        })
        .await
        .map_err(|e| {
            Fail::new(
                Stage::Hook,
                format!("cannot run the {moment} hook `{hook}`: {e}"),
            )
        })?;
        for line in String::from_utf8_lossy(&ended.stdout).lines() {
            tracing::info!("{moment} hook: {line}");
        }
        hook_verdict(moment, hook, &ended, &output, timeout)
    }

    async fn stage(&self, stage: Stage) {
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

enum Attempt {
    Done(BorgOutput),
    Busy(String),
    Failed(Fail),
    Unreachable(String),
}

/// borg's command, ready to run, and the passphrase pipe it inherits.
struct Prepared {
    command: tokio::process::Command,
    pipe: Option<std::os::fd::OwnedFd>,
}

/// The passphrase file's bytes, read off the runtime: a regular file of
/// root's, unreadable by others — or refused (stage `config`).
async fn read_passphrase(path: std::path::PathBuf) -> Result<Vec<u8>, Fail> {
    let read = tokio::task::spawn_blocking(move || {
        let mut file = ferry_config::paths::open_secret(&path, "the passphrase file")?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut bytes)
            .map(|_| bytes)
            .map_err(|e| format!("cannot read the passphrase file {}: {e}", path.display()))
    })
    .await;
    match read {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(message)) => Err(Fail::new(Stage::Config, message)),
        Err(e) => Err(Fail::new(
            Stage::Config,
            format!("the passphrase was not read: {e}"),
        )),
    }
}

/// BORG_RSH for borg: ferry's ssh command for a remote repository, else
/// the plan's own (a borgmatic ssh_command for a local repository).
async fn set_rsh(
    command: &mut tokio::process::Command,
    plan: &Plan,
    ssh: Option<&SshSetup>,
) -> Result<(), Fail> {
    let rsh = match ssh {
        Some(ssh) => borg_rsh(ssh).await?,
        None => match &plan.rsh {
            Some(rsh) => rsh.clone(),
            None => return Ok(()),
        },
    };
    tracing::debug!("BORG_RSH={rsh}");
    command.env("BORG_RSH", rsh);
    Ok(())
}

/// ferry's ssh command for borg, its key files looked up off the runtime
/// (a failure is one at stage `config`).
async fn borg_rsh(ssh: &SshSetup) -> Result<String, Fail> {
    let ssh = ssh.clone();
    match tokio::task::spawn_blocking(move || ssh.borg_rsh(|path| path.exists())).await {
        Ok(Ok(rsh)) => Ok(rsh),
        Ok(Err(e)) => Err(Fail::new(Stage::Config, e.to_string())),
        Err(e) => Err(Fail::new(
            Stage::Config,
            format!("the ssh command was not made: {e}"),
        )),
    }
}

/// A borg run over SSH that failed: the server unreachable (a skip), or
/// refused (a failure that says what to do), or borg's own error. When
/// borg lost the connection without relaying why (it may exit before it
/// has read ssh's last words), ssh is asked once more, by itself.
async fn over_ssh(
    plan: &Plan,
    ssh: &SshSetup,
    stage: Stage,
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
        match borg_rsh(ssh).await {
            Ok(rsh) => {
                let said = remote::probe(&rsh, url, ssh.connect_timeout).await;
                tracing::debug!("ssh probe of {server}: {}", said.join(" / "));
                diagnosis = remote::diagnose(&said, &[], &[]);
            }
            Err(fail) => tracing::debug!("no ssh probe: {}", fail.message),
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
    Err(Fail::new(Stage::Sources,
        format!(
            "source director{} {} do{} not exist; borg was not run (create {}, fix the path in the profile, or remove it)",
            if missing.len() == 1 { "y" } else { "ies" },
            missing.join(", "),
            if missing.len() == 1 { "es" } else { "" },
            if missing.len() == 1 { "it" } else { "them" },
        ),
    ))
}

/// The shell text of a hook command: a borgmatic file's variables put in
/// as borgmatic does, under the file's umask.
fn hook_text(plan: &Plan, hook: &str, error: Option<&str>) -> String {
    let text = match &plan.hooks.borgmatic_file {
        Some(file) => interpolate(
            hook,
            &[
                ("configuration_filename", file),
                ("repository", &plan.repository),
                (
                    "repository_label",
                    plan.label.as_deref().unwrap_or_default(),
                ),
                ("log_file", ""),
                ("error", error.unwrap_or_default()),
                ("output", ""),
            ],
        ),
        None => hook.to_string(),
    };
    match &plan.umask {
        Some(umask) => format!("umask {umask}; {text}"),
        None => text,
    }
}

/// When a hook runs: before, after or on error (its name in messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    Before,
    After,
    OnError,
}

impl std::fmt::Display for Moment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Moment::Before => "before",
            Moment::After => "after",
            Moment::OnError => "on-error",
        })
    }
}

/// What a hook's end means: on, a skip (a before hook's exit 75, as in
/// borgmatic; an after hook's 75 is no failure), or a failure that names
/// the hook and quotes its first lines.
fn hook_verdict(
    moment: Moment,
    hook: &str,
    ended: &process::Ended,
    output: &[String],
    timeout: Duration,
) -> Result<(), Stopped> {
    let code = match (ended.stopped, ended.status.code()) {
        (Some(Stop::Cancelled), _) => return Err(Fail::cancelled(Stage::Hook).into()),
        (Some(Stop::TimedOut), _) => {
            let message = format!(
                "the {moment} hook `{hook}` ran longer than {}s (hook-timeout)",
                timeout.as_secs()
            );
            return Err(Fail::new(Stage::Hook, message).into());
        }
        (None, code) => code,
    };
    match (moment, code) {
        (_, Some(0)) | (Moment::After, Some(SKIP_EXIT_CODE)) => Ok(()),
        (Moment::Before, Some(SKIP_EXIT_CODE)) => Err(Stopped::Skip(format!(
            "the before hook `{hook}` exited {SKIP_EXIT_CODE} (skip this run)"
        ))),
        (_, code) => {
            let how = code.map_or("was killed by a signal".to_string(), |c| {
                format!("exited {c}")
            });
            let said = if output.is_empty() {
                String::new()
            } else {
                format!(": {}", output.join(" / "))
            };
            let message = format!("the {moment} hook `{hook}` {how}{said}");
            Err(Fail::new(Stage::Hook, message).into())
        }
    }
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

    fn done(archive: &str) -> Done {
        Done {
            archive: archive.into(),
            stats: format!("{{\"{archive}\": 1}}"),
            checks: vec![format!("repository@/{archive}")],
        }
    }

    /// A failed repository goes to the back of the queue while it has
    /// retries, a skip is not retried, and a cancel ends the queue.
    #[test]
    fn the_repository_queue_retries_a_failure_after_the_others() {
        let retries = Retries {
            count: 1,
            wait: Duration::from_secs(7),
        };
        let turn = |name, index, attempt| Turn {
            name,
            index,
            attempt,
            retries,
        };
        let mut queue = Queue::new(3);
        let mut ended = Ended::default();
        let mut order = Vec::new();
        let mut outcomes = vec![
            Err(Fail::new(Stage::Create, "lost").into()),
            Err(Stopped::Skip("not today".into())),
            Ok(done("c1")),
            Err(Fail::new(Stage::Create, "lost again").into()),
        ]
        .into_iter();
        while let Some((index, attempt)) = queue.next() {
            order.push((index, attempt));
            let name = ["a", "b", "c"][index];
            let result = outcomes.next().expect("an outcome per turn");
            assert!(queue.record(&mut ended, turn(name, index, attempt), result));
        }
        assert_eq!(order, [(0, 0), (1, 0), (2, 0), (0, 1)]);
        assert_eq!(ended.failures.len(), 1, "given up after its retry");
        assert_eq!(ended.failures[0].1.message, "lost again");
        assert_eq!(ended.skipped, [("b".to_string(), "not today".to_string())]);
        assert_eq!(ended.done.len(), 1);

        let mut queue = Queue::new(2);
        let mut ended = Ended::default();
        let (index, attempt) = queue.next().expect("first");
        let cancelled = Err(Fail::cancelled(Stage::Create).into());
        assert!(!queue.record(&mut ended, turn("a", index, attempt), cancelled));
        assert_eq!(ended.failures[0].1.stage, Stage::Cancelled);
    }

    #[test]
    fn several_repositories_end_as_one_job_naming_each() {
        let one = Ended {
            done: vec![("first".into(), done("a1"))],
            ..Ended::default()
        };
        match one.into_end(Vec::new()) {
            End::Finished {
                repositories,
                archive,
                ..
            } => {
                assert_eq!(archive, "a1");
                assert!(repositories.is_empty(), "one repository: as before");
            }
            other => panic!("{other:?}"),
        }
        let two = Ended {
            done: vec![("first".into(), done("a1")), ("second".into(), done("b1"))],
            ..Ended::default()
        };
        match two.into_end(Vec::new()) {
            End::Finished {
                archive,
                stats,
                checks,
                repositories,
                ..
            } => {
                assert_eq!(archive, "a1");
                assert!(stats.contains("a1"));
                assert_eq!(checks.len(), 2);
                assert_eq!(repositories, ["first: archive a1", "second: archive b1"]);
            }
            other => panic!("{other:?}"),
        }
        let failed = Ended {
            done: vec![("first".into(), done("a1"))],
            failures: vec![("second".into(), Fail::new(Stage::Create, "no repository"))],
            ..Ended::default()
        };
        assert_eq!(failed.error(), "create: repository second: no repository");
        match failed.into_end(Vec::new()) {
            End::Failed { stage, message } => {
                assert_eq!(stage, Stage::Create);
                assert_eq!(
                    message,
                    "repository second: no repository (all repositories: first: archive a1; second: failed at create: no repository)"
                );
            }
            other => panic!("{other:?}"),
        }
        let skipped = Ended::from_stop(Stopped::Skip("not today".into()));
        assert_eq!(
            skipped.into_end(Vec::new()),
            End::Skipped {
                reason: "not today".into()
            }
        );
    }

    /// An unreachable SSH repository keeps the job unreachable (a skip
    /// until the grace) even when another repository was backed up, so the
    /// grace is not forgotten; a failure elsewhere still fails the job.
    #[test]
    fn an_unreachable_repository_keeps_the_job_unreachable() {
        let alone = Ended::from_stop(Stopped::Unreachable("server gone".into()));
        assert_eq!(
            alone.into_end(Vec::new()),
            End::Unreachable {
                reason: "server gone".into()
            }
        );
        let one = Ended {
            unreachable: vec![("remote".into(), "server gone".into())],
            ..Ended::default()
        };
        assert_eq!(
            one.into_end(Vec::new()),
            End::Unreachable {
                reason: "server gone".into()
            },
            "one repository: as before"
        );
        let with_local = Ended {
            done: vec![("local".into(), done("a1"))],
            unreachable: vec![("remote".into(), "server gone".into())],
            ..Ended::default()
        };
        assert_eq!(
            with_local.into_end(Vec::new()),
            End::Unreachable {
                reason: "repository remote: server gone (all repositories: local: archive a1; remote: unreachable: server gone)".into()
            }
        );
        let and_failed = Ended {
            failures: vec![("local".into(), Fail::new(Stage::Create, "no repository"))],
            unreachable: vec![("remote".into(), "server gone".into())],
            ..Ended::default()
        };
        assert!(
            matches!(and_failed.into_end(Vec::new()), End::Failed { stage, .. } if stage == Stage::Create)
        );
    }

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
