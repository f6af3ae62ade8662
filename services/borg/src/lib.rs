//! ferry-borg: scheduled, observable borg backups on the bus.
//!
//! It owns org.ferry.Borg1. `Start(profile)` (from a systemd timer or
//! busctl) returns a job id at once; the job ([`job`]) runs as a task the
//! service loop owns and reports through events, from which the loop keeps
//! the properties (Jobs, LastResults, LastFailures, Schedule), persists the
//! results ([`state`]) and emits BackupStarted / BackupProgress /
//! BackupFinished / BackupFailed / BackupSkipped. Profiles come from
//! ferry.toml or from a borgmatic file ([`borgmatic`]); both become one
//! [`plan::Plan`]. Borg and hooks run under [`process`] supervision;
//! preconditions, the host id and logind's inhibitor are in [`system`].
//!
//! A failed or skipped job is started again after `[borg] retry-delay`, at
//! most `retries` times (seed 000's `Restart=on-failure`, `RestartSec=10m`),
//! by a timer in the loop (no polling); Schedule shows the next attempt and
//! why. The timer's unit runs `ferryctl backup --wait PROFILE`, which starts
//! a job and exits with its outcome.

pub mod borgmatic;
pub mod compat;
pub mod glob;
pub mod job;
pub mod network;
pub mod plan;
pub mod process;
pub mod remote;
pub mod state;
pub mod system;
pub mod tilde;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_config::{Config, Name};
use ferry_interfaces::{
    borg, BackupJob, BackupOutcome, BackupResult, Error as FerryError, Failure, ScheduleEntry,
};
use ferry_service::{claim_name, unix_now, Bus, ServiceError, Shutdown};
use job::{End, Event, Job, RepositoryLocks};
use state::{PlannedRetry, RunningJob, Stored};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use zbus::object_server::SignalEmitter;

/// How long shutdown waits for cancelled jobs beyond borg's cancel timeout.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(15);

/// What the properties show; the loop writes it, the interface reads it.
#[derive(Debug, Default)]
struct Shared {
    jobs: Vec<BackupJob>,
    stored: Stored,
}

enum Command {
    Start(Name, oneshot::Sender<String>),
    Cancel(String, oneshot::Sender<Result<(), FerryError>>),
}

/// The org.ferry.Borg1 object: validates, authorizes and hands over to the loop.
pub struct BorgInterface {
    commands: mpsc::Sender<Command>,
    shared: Arc<Mutex<Shared>>,
    config: Arc<Config>,
    /// When the service started: a profile that never ran is due since then.
    started: u64,
    /// The system bus, or a user's session bus (who may call differs).
    bus: Bus,
}

fn stopping() -> FerryError {
    FerryError::Failed("ferry-borg is shutting down".into())
}

impl BorgInterface {
    fn shared<T>(&self, read: impl FnOnce(&Shared) -> T) -> T {
        match self.shared.lock() {
            Ok(shared) => read(&shared),
            Err(poisoned) => read(&poisoned.into_inner()),
        }
    }

    fn profile(&self, profile: &str) -> Result<Name, FerryError> {
        Name::new(profile)
            .ok()
            .filter(|name| self.config.profiles.contains_key(name))
            .ok_or_else(|| {
                let known: Vec<&str> = self.config.profiles.keys().map(Name::as_str).collect();
                FerryError::UnknownProfile(format!(
                    "no profile named `{profile}` in the configuration; configured: {}",
                    if known.is_empty() {
                        "none (add a [profiles.<name>] section)".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })
    }
}

#[zbus::interface(name = "org.ferry.Borg1")]
impl BorgInterface {
    /// Runs a profile now; returns its job id (the running one's if it runs).
    #[zbus(out_args("job"))]
    async fn start(
        &self,
        profile: &str,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<String, FerryError> {
        ferry_service::caller::authorize_on(self.bus, connection, &header).await?;
        let name = self.profile(profile)?;
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Start(name, reply))
            .await
            .map_err(|_| stopping())?;
        answer.await.map_err(|_| stopping())
    }

    /// Stops a running job; BackupFailed(…, "cancelled", …) follows.
    async fn cancel(
        &self,
        job: &str,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<(), FerryError> {
        ferry_service::caller::authorize_on(self.bus, connection, &header).await?;
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Cancel(job.to_string(), reply))
            .await
            .map_err(|_| stopping())?;
        answer.await.map_err(|_| stopping())?
    }

    /// borg create's JSON statistics of the profile's last successful run.
    #[zbus(out_args("stats"))]
    async fn get_stats(&self, profile: &str) -> Result<String, FerryError> {
        let name = self.profile(profile)?;
        self.shared(|s| {
            s.stored
                .profiles
                .get(name.as_str())
                .and_then(|r| r.stats.clone())
        })
        .ok_or_else(|| {
            FerryError::NotFound(format!(
                "profile `{profile}` has no successful run yet; start one with Start(\"{profile}\")"
            ))
        })
    }

    /// Every configured profile, sorted.
    #[zbus(property)]
    async fn profiles(&self) -> Vec<String> {
        self.config.profiles.keys().map(|n| n.to_string()).collect()
    }

    /// The running jobs with their progress.
    #[zbus(property)]
    async fn jobs(&self) -> Vec<BackupJob> {
        self.shared(|s| s.jobs.clone())
    }

    /// The last result per profile.
    #[zbus(property)]
    async fn last_results(&self) -> Vec<BackupResult> {
        self.shared(|s| {
            s.stored
                .profiles
                .values()
                .filter_map(|r| r.last_result.clone())
                .collect()
        })
    }

    /// When each profile is next due, and what blocks it now.
    #[zbus(property)]
    async fn schedule(&self) -> Vec<ScheduleEntry> {
        let (last_success, retries): (BTreeMap<String, Option<u64>>, _) = self.shared(|s| {
            (
                s.stored
                    .profiles
                    .iter()
                    .map(|(name, r)| (name.clone(), r.last_success))
                    .collect(),
                s.stored.retries.clone(),
            )
        });
        self.config
            .profiles
            .iter()
            .map(|(name, profile)| {
                let due = match profile.interval {
                    None => 0,
                    Some(interval) => match last_success.get(name.as_str()).copied().flatten() {
                        Some(last) => last.saturating_add(interval.as_secs()),
                        None => self.started,
                    },
                };
                let pre = &profile.preconditions;
                ScheduleEntry {
                    profile: name.to_string(),
                    due,
                    blocked: system::blocked(&pre.mountpoints, &pre.exists, pre.on_ac_power)
                        .unwrap_or_default(),
                    last_success: last_success
                        .get(name.as_str())
                        .copied()
                        .flatten()
                        .unwrap_or(0),
                    retry: retries.get(name.as_str()).map_or(0, |r| r.at),
                    retry_reason: retries
                        .get(name.as_str())
                        .map(|r| r.reason.clone())
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The most recent failure per profile.
    #[zbus(property)]
    async fn last_failures(&self) -> Vec<Failure> {
        self.shared(|s| {
            s.stored
                .profiles
                .values()
                .filter_map(|r| r.last_failure.clone())
                .collect()
        })
    }

    /// Every failure, oldest first, bounded, with unique ids.
    #[zbus(property)]
    async fn failure_history(&self) -> Vec<ferry_interfaces::FailureEvent> {
        self.shared(|s| s.stored.failure_history.clone())
    }

    /// A job began.
    #[zbus(signal)]
    async fn backup_started(
        emitter: &SignalEmitter<'_>,
        job: &str,
        profile: &str,
    ) -> zbus::Result<()>;

    /// borg create's progress.
    #[zbus(signal)]
    async fn backup_progress(
        emitter: &SignalEmitter<'_>,
        job: &str,
        bytes: u64,
        files: u64,
    ) -> zbus::Result<()>;

    /// Every stage succeeded.
    #[zbus(signal)]
    async fn backup_finished(
        emitter: &SignalEmitter<'_>,
        job: &str,
        profile: &str,
        archive: &str,
    ) -> zbus::Result<()>;

    /// A stage failed or the job was cancelled.
    #[zbus(signal)]
    async fn backup_failed(
        emitter: &SignalEmitter<'_>,
        job: &str,
        profile: &str,
        stage: &str,
        message: &str,
    ) -> zbus::Result<()>;

    /// An archive was made but borg warned.
    #[zbus(signal)]
    async fn backup_finished_with_warnings(
        emitter: &SignalEmitter<'_>,
        job: &str,
        profile: &str,
        archive: &str,
        warnings: &str,
    ) -> zbus::Result<()>;

    /// Not run, and not a failure.
    #[zbus(signal)]
    async fn backup_skipped(
        emitter: &SignalEmitter<'_>,
        job: &str,
        profile: &str,
        reason: &str,
    ) -> zbus::Result<()>;
}

/// A job the loop is running.
struct Running {
    profile: Name,
    cancel: watch::Sender<bool>,
    started: Instant,
    /// 1 for a run started by Start, n for the (n-1)th retry.
    attempt: u32,
}

/// The service loop's own state.
struct Service {
    config: Arc<Config>,
    /// The system bus, where logind is (None: not reachable).
    logind: Option<zbus::Connection>,
    shared: Arc<Mutex<Shared>>,
    object: ferry_service::Served<BorgInterface>,
    state_path: PathBuf,
    host_id: String,
    locks: RepositoryLocks,
    events: mpsc::Sender<(String, Event)>,
    running: BTreeMap<String, Running>,
    tasks: JoinSet<End>,
    task_jobs: HashMap<tokio::task::Id, String>,
}

impl Service {
    fn with_shared<T>(&self, change: impl FnOnce(&mut Shared) -> T) -> T {
        match self.shared.lock() {
            Ok(mut shared) => change(&mut shared),
            Err(poisoned) => change(&mut poisoned.into_inner()),
        }
    }

    fn start(&mut self, profile: Name, attempt: u32) -> String {
        if let Some((id, _)) = self.running.iter().find(|(_, r)| r.profile == profile) {
            return id.clone();
        }
        // Recorded before it runs: if ferry-borg dies now, the next start
        // reports the job as interrupted, and the number is never reused.
        let (id, checks_last, stored) = self.with_shared(|s| {
            s.stored.last_job += 1;
            let id = format!("{profile}-{}", s.stored.last_job);
            s.stored.running.insert(
                id.clone(),
                RunningJob {
                    profile: profile.to_string(),
                    started: unix_now(),
                    attempt,
                },
            );
            // This run is the retry (or a person's Start, a new series).
            s.stored.retries.remove(profile.as_str());
            let checks = s
                .stored
                .profiles
                .get(profile.as_str())
                .map(|r| r.checks.clone())
                .unwrap_or_default();
            (id, checks, s.stored.clone())
        });
        save(&stored, &self.state_path);
        let (cancel, cancelled) = watch::channel(false);
        let job = Job {
            id: id.clone(),
            profile: profile.clone(),
            config: self.config.clone(),
            logind: self.logind.clone(),
            events: self.events.clone(),
            cancel: cancelled,
            locks: self.locks.clone(),
            checks_last,
            host_id: self.host_id.clone(),
            warnings: Vec::new(),
        };
        let handle = self.tasks.spawn(job.run());
        self.task_jobs.insert(handle.id(), id.clone());
        self.running.insert(
            id.clone(),
            Running {
                profile: profile.clone(),
                cancel,
                started: Instant::now(),
                attempt,
            },
        );
        self.with_shared(|s| {
            s.jobs.push(BackupJob {
                job: id.clone(),
                profile: profile.to_string(),
                stage: "waiting".into(),
                bytes: 0,
                files: 0,
            })
        });
        if attempt > 1 {
            tracing::info!("job {id}: profile {profile} started (attempt {attempt})");
        } else {
            tracing::info!("job {id}: profile {profile} started");
        }
        id
    }

    fn cancel(&self, job: &str) -> Result<(), FerryError> {
        match self.running.get(job) {
            Some(running) => {
                tracing::info!("job {job}: cancel requested");
                running.cancel.send_replace(true);
                Ok(())
            }
            None => Err(FerryError::UnknownJob(format!(
                "no running job `{job}`; running: {}",
                if self.running.is_empty() {
                    "none".to_string()
                } else {
                    self.running.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            ))),
        }
    }

    async fn event(&self, job: String, event: Event) {
        let changed = self.with_shared(|s| {
            let Some(entry) = s.jobs.iter_mut().find(|j| j.job == job) else {
                return false;
            };
            match &event {
                Event::Stage(stage) => entry.stage = stage.to_string(),
                Event::Progress { bytes, files } => {
                    entry.bytes = *bytes;
                    entry.files = *files;
                }
            }
            true
        });
        if !changed {
            return;
        }
        let emitter = self.object.signal_emitter();
        let interface = self.object.get().await;
        if let Err(e) = interface.jobs_changed(emitter).await {
            tracing::warn!("cannot emit PropertiesChanged: {e}");
        }
        if let Event::Progress { bytes, files } = event {
            if let Err(e) = BorgInterface::backup_progress(emitter, &job, bytes, files).await {
                tracing::warn!("cannot emit BackupProgress: {e}");
            }
        }
    }

    async fn announce_schedule(&self) {
        let emitter = self.object.signal_emitter();
        let interface = self.object.get().await;
        if let Err(e) = interface.schedule_changed(emitter).await {
            tracing::warn!("cannot emit PropertiesChanged: {e}");
        }
    }

    async fn announce_start(&self, job: &str, profile: &str) {
        let emitter = self.object.signal_emitter();
        let interface = self.object.get().await;
        for sent in [
            interface.jobs_changed(emitter).await,
            interface.schedule_changed(emitter).await,
        ] {
            if let Err(e) = sent {
                tracing::warn!("cannot emit PropertiesChanged: {e}");
            }
        }
        if let Err(e) = BorgInterface::backup_started(emitter, job, profile).await {
            tracing::warn!("cannot emit BackupStarted: {e}");
        }
    }

    /// Records a job's end, persists it, updates the properties, then signals.
    async fn finish(&mut self, job: String, end: End) {
        let Some(running) = self.running.remove(&job) else {
            return;
        };
        let profile = running.profile.to_string();
        let seconds = running.started.elapsed().as_secs_f64();
        let grace = self.config.borg.unreachable_grace.duration();
        let end = self.with_shared(|s| settle(&mut s.stored, &profile, end, grace, unix_now()));
        match &end {
            End::Finished {
                archive, warnings, ..
            } if !warnings.is_empty() => tracing::warn!(
                "job {job}: profile {profile} finished with warnings in {seconds:.1}s: {archive}: {}",
                warnings.join("; ")
            ),
            End::Finished { archive, .. } => {
                tracing::info!("job {job}: profile {profile} finished in {seconds:.1}s: {archive}")
            }
            End::Failed { stage, message } => {
                tracing::warn!("job {job}: profile {profile} failed at {stage}: {message}")
            }
            End::Skipped { reason } | End::Unreachable { reason } => {
                tracing::info!("job {job}: profile {profile} skipped: {reason}")
            }
        }
        let retry = self.retry_policy();
        let attempt = running.attempt;
        let stored = self.with_shared(|s| {
            s.jobs.retain(|j| j.job != job);
            s.stored.running.remove(&job);
            record_end(&mut s.stored, &profile, &end, seconds);
            plan_retry(&mut s.stored, &profile, &end, attempt, retry);
            remember_failure(&mut s.stored, &job, &profile, &end);
            s.stored.clone()
        });
        if let Some(planned) = stored.retries.get(&profile) {
            tracing::info!("profile {profile}: retry planned: {}", planned.reason);
        }
        save(&stored, &self.state_path);
        self.announce_end(&job, &profile, &end).await;
    }

    /// Tells the bus a job ended: the changed properties, then its signal.
    async fn announce_end(&self, job: &str, profile: &str, end: &End) {
        let emitter = self.object.signal_emitter();
        let interface = self.object.get().await;
        for sent in [
            interface.jobs_changed(emitter).await,
            interface.last_results_changed(emitter).await,
            interface.last_failures_changed(emitter).await,
            interface.failure_history_changed(emitter).await,
            interface.schedule_changed(emitter).await,
        ] {
            if let Err(e) = sent {
                tracing::warn!("cannot emit PropertiesChanged: {e}");
            }
        }
        let sent = match end {
            End::Finished {
                archive, warnings, ..
            } if !warnings.is_empty() => {
                BorgInterface::backup_finished_with_warnings(
                    emitter,
                    job,
                    profile,
                    archive,
                    &warnings.join("; "),
                )
                .await
            }
            End::Finished { archive, .. } => {
                BorgInterface::backup_finished(emitter, job, profile, archive).await
            }
            End::Failed { stage, message } => {
                BorgInterface::backup_failed(emitter, job, profile, stage, message).await
            }
            End::Skipped { reason } | End::Unreachable { reason } => {
                BorgInterface::backup_skipped(emitter, job, profile, reason).await
            }
        };
        if let Err(e) = sent {
            tracing::warn!("cannot emit the end of job {job}: {e}");
        }
    }

    /// A finished task: its job id and how it ended (a panic is a failure).
    fn joined(
        &mut self,
        joined: Result<(tokio::task::Id, End), tokio::task::JoinError>,
    ) -> Option<(String, End)> {
        match joined {
            Ok((id, end)) => self.task_jobs.remove(&id).map(|job| (job, end)),
            Err(e) => {
                let job = self.task_jobs.remove(&e.id())?;
                Some((
                    job,
                    End::Failed {
                        stage: "internal".into(),
                        message: format!("the job stopped unexpectedly: {e}"),
                    },
                ))
            }
        }
    }
}

impl Service {
    /// (retries, delay) from the configuration.
    fn retry_policy(&self) -> (u32, Duration) {
        (
            self.config.borg.retries,
            self.config.borg.retry_delay.duration(),
        )
    }

    /// When the next planned retry is due, as a timer instant.
    fn next_retry(&self) -> Option<tokio::time::Instant> {
        let at = self.with_shared(|s| s.stored.retries.values().map(|r| r.at).min())?;
        let wait = at.saturating_sub(unix_now());
        Some(tokio::time::Instant::now() + Duration::from_secs(wait))
    }

    /// Starts every retry that is due; returns (job, profile) of each.
    fn start_due_retries(&mut self) -> Vec<(String, String)> {
        let now = unix_now();
        let due: Vec<(String, u32)> = self.with_shared(|s| {
            let due: Vec<(String, u32)> = s
                .stored
                .retries
                .iter()
                .filter(|(_, r)| r.at <= now)
                .map(|(p, r)| (p.clone(), r.attempt))
                .collect();
            for (profile, _) in &due {
                s.stored.retries.remove(profile);
            }
            due
        });
        let mut started = Vec::new();
        for (profile, attempt) in due {
            let Some(name) = Name::new(&profile)
                .ok()
                .filter(|n| self.config.profiles.contains_key(n))
            else {
                tracing::warn!("a retry of `{profile}` is due, but it is no longer configured");
                continue;
            };
            if self.running.values().any(|r| r.profile == name) {
                tracing::info!("profile {profile}: a retry is due but it runs already");
                continue;
            }
            tracing::info!("profile {profile}: retrying (attempt {attempt})");
            let id = self.start(name, attempt);
            started.push((id, profile));
        }
        let stored = self.with_shared(|s| s.stored.clone());
        save(&stored, &self.state_path);
        started
    }
}

/// Plans the next attempt of `profile` after a run (attempt `attempt`)
/// that ended as `end`: after a failure (not a cancel) or a skip, while
/// attempts remain. A run that made an archive ends the series.
fn plan_retry(
    stored: &mut Stored,
    profile: &str,
    end: &End,
    attempt: u32,
    (retries, delay): (u32, Duration),
) {
    stored.retries.remove(profile);
    let why = match end {
        End::Failed { stage, .. } if stage == "cancelled" => return,
        End::Failed { stage, message } => format!("failed: {stage}: {message}"),
        End::Skipped { reason } | End::Unreachable { reason } => format!("skipped: {reason}"),
        End::Finished { .. } => return,
    };
    let total = retries.saturating_add(1);
    if attempt >= total {
        tracing::warn!("profile {profile}: attempt {attempt} of {total} {why}; no retry left");
        return;
    }
    let next = attempt + 1;
    let at = unix_now().saturating_add(delay.as_secs());
    stored.retries.insert(
        profile.to_string(),
        PlannedRetry {
            at,
            attempt: next,
            reason: format!("attempt {next} of {total} after attempt {attempt} {why}"),
        },
    );
}

/// Writes the state; a failure is logged, and the service goes on.
fn save(stored: &Stored, path: &std::path::Path) {
    if let Err(e) = stored.save(path) {
        tracing::error!(
            "cannot write {}: {e}; the bus is right but this will not survive a restart",
            path.display()
        );
    }
}

/// Records how a job of `profile` that ran `seconds` ended.
fn record_end(stored: &mut Stored, profile: &str, end: &End, seconds: f64) {
    let now = unix_now();
    let (outcome, archive, message) = match end {
        End::Finished {
            archive, warnings, ..
        } if !warnings.is_empty() => (
            BackupOutcome::FinishedWithWarnings,
            archive.clone(),
            warnings.join("; "),
        ),
        End::Finished {
            archive,
            repositories,
            ..
        } => (
            BackupOutcome::Finished,
            archive.clone(),
            repositories.join("; "),
        ),
        End::Failed { stage, message } => (
            BackupOutcome::Failed,
            String::new(),
            format!("{stage}: {message}"),
        ),
        End::Skipped { reason } | End::Unreachable { reason } => {
            (BackupOutcome::Skipped, String::new(), reason.clone())
        }
    };
    let record = stored.profile(profile);
    record.last_result = Some(BackupResult {
        profile: profile.to_string(),
        outcome: outcome.as_str().into(),
        time: now,
        archive,
        seconds,
        message,
    });
    match end {
        End::Finished { stats, checks, .. } => {
            record.last_success = Some(now);
            record.stats = Some(stats.clone());
            for kind in checks {
                record.checks.insert(kind.to_string(), now);
            }
        }
        End::Failed { stage, message } => {
            record.last_failure = Some(Failure {
                subject: profile.to_string(),
                time: now,
                stage: stage.clone(),
                message: message.clone(),
            })
        }
        End::Skipped { .. } | End::Unreachable { .. } => {}
    }
}

/// Applies `[borg] unreachable-grace`: an unreachable server is a skip
/// until it has been unreachable that long, then a failure at stage
/// `unreachable` (mailed). The profile remembers since when; a run that
/// reached borg's server or made an archive forgets it.
fn settle(stored: &mut Stored, profile: &str, end: End, grace: Duration, now: u64) -> End {
    let record = stored.profile(profile);
    match end {
        End::Unreachable { reason } => {
            let (settled, since) =
                remote::settle_unreachable(&reason, record.unreachable_since, now, grace);
            record.unreachable_since = Some(since);
            match settled {
                remote::Settled::Skip { reason } => End::Skipped { reason },
                remote::Settled::Fail { message } => End::Failed {
                    stage: "unreachable".into(),
                    message,
                },
            }
        }
        End::Finished { .. } => {
            record.unreachable_since = None;
            end
        }
        End::Failed { ref stage, .. } if job::REACHES_SERVER.contains(&stage.as_str()) => {
            record.unreachable_since = None;
            end
        }
        other => other,
    }
}

/// Adds a failed job to the failure history (Borg1.FailureHistory).
fn remember_failure(stored: &mut Stored, job: &str, profile: &str, end: &End) {
    if let End::Failed { stage, message } = end {
        let event = ferry_service::history::failure_event(profile, stage, message, job);
        ferry_service::history::remember(&mut stored.failure_history, event);
    }
}

/// The jobs the state says were running: ferry-borg died during them (it
/// records every end, even on shutdown). Each is recorded as failed at
/// stage "interrupted" and returned as (job, profile, end) to announce.
fn interrupted(stored: &mut Stored, retry: (u32, Duration)) -> Vec<(String, String, End)> {
    let now = unix_now();
    std::mem::take(&mut stored.running)
        .into_iter()
        .map(|(job, running)| {
            let message = format!(
                "ferry-borg stopped during the job (killed, crashed or the machine went down) \
                 {} s after it started, so the backup did not complete; the next run will clean \
                 up borg's stale lock",
                now.saturating_sub(running.started)
            );
            tracing::warn!("job {job}: profile {}: {message}", running.profile);
            let end = End::Failed {
                stage: "interrupted".into(),
                message,
            };
            let seconds = now.saturating_sub(running.started) as f64;
            record_end(stored, &running.profile, &end, seconds);
            plan_retry(stored, &running.profile, &end, running.attempt, retry);
            remember_failure(stored, &job, &running.profile, &end);
            (job, running.profile, end)
        })
        .collect()
}

/// Logs, once at start, what is wrong with borgmatic files that can be read
/// now; a file that is not there yet (seed 000's ~/Private) is read at run time.
fn check_borgmatic_files(config: &Config) {
    for (name, profile) in &config.profiles {
        let Some(path) = &profile.borgmatic_config else {
            continue;
        };
        if !path.exists() {
            tracing::info!(
                "profile {name}: {} is not there now; it is read when the profile runs",
                path.display()
            );
            continue;
        }
        match borgmatic::load(config, name, profile) {
            Ok(plans) => {
                for warning in plans.iter().flat_map(|p| &p.warnings) {
                    tracing::warn!("profile {name}: {warning}");
                }
            }
            Err(e) => tracing::error!(
                "profile {name}: {e}; runs of this profile will fail until it is fixed"
            ),
        }
    }
}

/// Runs the borg service on `connection` (the system bus) until
/// `shutdown` resolves.
pub async fn run(
    connection: zbus::Connection,
    config: Arc<Config>,
    shutdown: Shutdown,
) -> Result<(), ServiceError> {
    run_on(connection, config, shutdown, Bus::System).await
}

/// Runs the borg service on `connection`, which is the system bus or (a
/// user-level ferry-borg) the user's session bus, until `shutdown` resolves.
pub async fn run_on(
    connection: zbus::Connection,
    config: Arc<Config>,
    shutdown: Shutdown,
    bus: Bus,
) -> Result<(), ServiceError> {
    if bus == Bus::Session {
        tracing::info!(
            "a user-level ferry-borg: session bus, state in {}, `~` is {}",
            config.state_directory.display(),
            remote::service_home().display()
        );
    }
    let logind = match bus {
        Bus::System => Some(connection.clone()),
        Bus::Session => system::system_bus().await,
    };
    let state_path = config.state_directory.join(state::FILE_NAME);
    let mut stored = Stored::load(&state_path);
    let cut_short = interrupted(
        &mut stored,
        (config.borg.retries, config.borg.retry_delay.duration()),
    );
    if !cut_short.is_empty() {
        save(&stored, &state_path);
    }
    let shared = Arc::new(Mutex::new(Shared {
        jobs: Vec::new(),
        stored,
    }));
    check_borgmatic_files(&config);
    let host_id = ferry_service::host::borg_host_id(config.borg.host_id.as_deref());
    tracing::info!("BORG_HOST_ID is {host_id}");

    let (commands, mut requests) = mpsc::channel(16);
    let object = ferry_service::serve(
        &connection,
        borg::OBJECT_PATH,
        BorgInterface {
            commands,
            shared: shared.clone(),
            config: config.clone(),
            started: unix_now(),
            bus,
        },
    )
    .await?;
    let (events, mut job_events) = mpsc::channel(256);
    let mut service = Service {
        config: config.clone(),
        logind,
        shared,
        object,
        state_path,
        host_id,
        locks: RepositoryLocks::default(),
        events,
        running: BTreeMap::new(),
        tasks: JoinSet::new(),
        task_jobs: HashMap::new(),
    };
    claim_name(&connection, borg::BUS_NAME, borg::OBJECT_PATH).await?;
    for (job, profile, end) in &cut_short {
        service.announce_end(job, profile, end).await;
    }

    tokio::pin!(shutdown);
    loop {
        let next_retry = service.next_retry();
        tokio::select! {
            _ = &mut shutdown => break,
            _ = ferry_service::sleep_until(next_retry), if next_retry.is_some() => {
                for (id, profile) in service.start_due_retries() {
                    service.announce_start(&id, &profile).await;
                }
                service.announce_schedule().await;
            }
            Some(command) = requests.recv() => match command {
                Command::Start(profile, reply) => {
                    let already = service.running.values().any(|r| r.profile == profile);
                    let id = service.start(profile.clone(), 1);
                    let _ = reply.send(id.clone());
                    if !already {
                        service.announce_start(&id, profile.as_str()).await;
                    }
                }
                Command::Cancel(job, reply) => {
                    let _ = reply.send(service.cancel(&job));
                }
            },
            Some((job, event)) = job_events.recv() => service.event(job, event).await,
            Some(joined) = service.tasks.join_next_with_id(), if !service.tasks.is_empty() => {
                // Events the job sent before it ended come before its end.
                while let Ok((job, event)) = job_events.try_recv() {
                    service.event(job, event).await;
                }
                if let Some((job, end)) = service.joined(joined) {
                    service.finish(job, end).await;
                }
            }
        }
    }

    // Stop: cancel every job (borg checkpoints and releases its lock), record them.
    if !service.running.is_empty() {
        tracing::info!("stopping: cancelling {} job(s)", service.running.len());
        for running in service.running.values() {
            running.cancel.send_replace(true);
        }
        let bound = config.borg.cancel_timeout.duration() + SHUTDOWN_SLACK;
        let drained = tokio::time::timeout(bound, async {
            while let Some(joined) = service.tasks.join_next_with_id().await {
                if let Some((job, end)) = service.joined(joined) {
                    service.finish(job, end).await;
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("jobs did not stop within {bound:?}; leaving them to be killed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable() -> End {
        End::Unreachable {
            reason: "the SSH server nas is unreachable".into(),
        }
    }

    #[test]
    fn unreachable_is_a_skip_until_the_grace_then_a_failure_and_reaching_forgets() {
        let mut stored = Stored::default();
        let grace = Duration::from_secs(100);
        let first = settle(&mut stored, "p", unreachable(), grace, 1000);
        assert!(matches!(first, End::Skipped { .. }), "{first:?}");
        assert_eq!(stored.profiles["p"].unreachable_since, Some(1000));
        let within = settle(&mut stored, "p", unreachable(), grace, 1099);
        assert!(matches!(within, End::Skipped { .. }), "{within:?}");
        let past = settle(&mut stored, "p", unreachable(), grace, 1100);
        assert!(
            matches!(&past, End::Failed { stage, message } if stage == "unreachable" && message.contains("unreachable-grace")),
            "{past:?}"
        );
        // A precondition's skip says nothing about the server.
        let skipped = End::Skipped { reason: "x".into() };
        settle(&mut stored, "p", skipped, grace, 1200);
        assert_eq!(stored.profiles["p"].unreachable_since, Some(1000));
        // A refusal means the server answered.
        let refused = End::Failed {
            stage: "create".into(),
            message: "host key changed".into(),
        };
        settle(&mut stored, "p", refused, grace, 1300);
        assert_eq!(stored.profiles["p"].unreachable_since, None);
        let again = settle(&mut stored, "p", unreachable(), grace, 1400);
        assert!(matches!(again, End::Skipped { .. }), "a new series starts");
    }
}
