//! ferry-borg: scheduled, observable borg backups on the bus.
//!
//! It owns org.ferry.Borg1. The rules (one job per profile, job ids,
//! results, retries, the unreachable grace, restart recovery) are the pure
//! [`domain`]; this module is its adapter: it owns the connection, the
//! interface and the runtime, feeds the domain its events (Start and
//! Cancel, a job's stages and end, the retry timer, the state found on
//! start) and carries out the effects it returns (run or stop a job, save
//! [`state`] off the runtime, publish properties, emit BackupStarted /
//! BackupProgress / BackupFinished / BackupFailed / BackupSkipped). A job
//! ([`job`]) runs as a task in a JoinSet the loop owns. Profiles come from
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
pub mod domain;
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

use domain::{Backups, Effect, End, Event, Launch, Policy, Property, Signal};
use ferry_config::{Config, Name};
use ferry_interfaces::{
    borg, BackupJob, BackupResult, Error as FerryError, Failure, ScheduleEntry,
};
use ferry_service::{claim_name, unix_now, Bus, ServiceError, Shutdown};
use job::{Job, RepositoryLocks};
use state::Stored;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use zbus::object_server::SignalEmitter;

/// How long shutdown waits for cancelled jobs beyond borg's cancel timeout.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(15);

enum Command {
    Start(Name, oneshot::Sender<String>),
    Cancel(String, oneshot::Sender<Result<(), FerryError>>),
}

/// The org.ferry.Borg1 object: validates, authorizes and hands over to the loop.
pub struct BorgInterface {
    commands: mpsc::Sender<Command>,
    shared: Arc<Mutex<Backups>>,
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
    fn shared<T>(&self, read: impl FnOnce(&Backups) -> T) -> T {
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
            s.stored()
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
        self.shared(|s| s.jobs().to_vec())
    }

    /// The last result per profile.
    #[zbus(property)]
    async fn last_results(&self) -> Vec<BackupResult> {
        self.shared(|s| {
            s.stored()
                .profiles
                .values()
                .filter_map(|r| r.last_result.clone())
                .collect()
        })
    }

    /// When each profile is next due, and what blocks it now.
    #[zbus(property)]
    async fn schedule(&self) -> Vec<ScheduleEntry> {
        let blocked = blocked_now(self.config.clone()).await;
        let (last_success, retries): (BTreeMap<String, Option<u64>>, _) = self.shared(|s| {
            (
                s.stored()
                    .profiles
                    .iter()
                    .map(|(name, r)| (name.clone(), r.last_success))
                    .collect(),
                s.stored().retries.clone(),
            )
        });
        self.config
            .profiles
            .iter()
            .map(|(name, profile)| {
                let last = last_success.get(name.as_str()).copied().flatten();
                let due = match (profile.interval, last) {
                    (None, _) => 0,
                    (Some(interval), Some(last)) => last.saturating_add(interval.as_secs()),
                    (Some(_), None) => self.started,
                };
                let retry = retries.get(name.as_str());
                ScheduleEntry {
                    profile: name.to_string(),
                    due,
                    blocked: blocked.get(name).cloned().unwrap_or_default(),
                    last_success: last.unwrap_or(0),
                    retry: retry.map_or(0, |r| r.at),
                    retry_reason: retry.map(|r| r.reason.clone()).unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The most recent failure per profile.
    #[zbus(property)]
    async fn last_failures(&self) -> Vec<Failure> {
        self.shared(|s| {
            s.stored()
                .profiles
                .values()
                .filter_map(|r| r.last_failure.clone())
                .collect()
        })
    }

    /// Every failure, oldest first, bounded, with unique ids.
    #[zbus(property)]
    async fn failure_history(&self) -> Vec<ferry_interfaces::FailureEvent> {
        self.shared(|s| s.stored().failure_history.clone())
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

/// Why each profile cannot run now (its preconditions), looked up off the
/// runtime: mountinfo, the paths and the power supplies are files.
async fn blocked_now(config: Arc<Config>) -> BTreeMap<Name, String> {
    tokio::task::spawn_blocking(move || {
        config
            .profiles
            .iter()
            .filter_map(|(name, profile)| {
                let pre = &profile.preconditions;
                system::blocked(&pre.mountpoints, &pre.exists, pre.on_ac_power)
                    .map(|why| (name.clone(), why))
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// A job the adapter runs: how to stop it and since when it runs.
struct Task {
    cancel: watch::Sender<bool>,
    started: Instant,
}

/// The adapter: carries the domain's effects out, feeds it its events.
struct Service {
    config: Arc<Config>,
    /// The system bus, where logind is (None: not reachable).
    logind: Option<zbus::Connection>,
    /// The domain; the interface reads the properties from it.
    backups: Arc<Mutex<Backups>>,
    object: ferry_service::Served<BorgInterface>,
    state_path: PathBuf,
    host_id: String,
    locks: RepositoryLocks,
    events: mpsc::Sender<(String, Event)>,
    running: BTreeMap<String, Task>,
    tasks: JoinSet<End>,
    task_jobs: HashMap<tokio::task::Id, String>,
}

impl Service {
    /// Hands `event` to the domain (under the lock the interface reads through).
    fn decide<T>(&self, event: impl FnOnce(&mut Backups) -> T) -> T {
        match self.backups.lock() {
            Ok(mut backups) => event(&mut backups),
            Err(poisoned) => event(&mut poisoned.into_inner()),
        }
    }

    /// Carries `effects` out in order; `reply` answers a Start.
    async fn carry(&mut self, effects: Vec<Effect>, mut reply: Option<oneshot::Sender<String>>) {
        for effect in effects {
            match effect {
                Effect::Run(launch) => self.run_job(launch),
                Effect::Stop(job) => {
                    if let Some(task) = self.running.get(&job) {
                        tracing::info!("job {job}: cancel requested");
                        task.cancel.send_replace(true);
                    }
                }
                Effect::Save(stored) => save(*stored, self.state_path.clone()).await,
                Effect::Reply(job) => {
                    if let Some(reply) = reply.take() {
                        let _ = reply.send(job);
                    }
                }
                Effect::Changed(property) => self.announce(property).await,
                Effect::Emit(signal) => self.emit(signal).await,
            }
        }
    }

    /// Runs a job as a task of the JoinSet.
    fn run_job(&mut self, launch: Launch) {
        let (cancel, cancelled) = watch::channel(false);
        let job = Job {
            id: launch.job.clone(),
            profile: launch.profile.clone(),
            config: self.config.clone(),
            logind: self.logind.clone(),
            events: self.events.clone(),
            cancel: cancelled,
            locks: self.locks.clone(),
            checks_last: launch.checks_last,
            host_id: self.host_id.clone(),
            warnings: Vec::new(),
        };
        let handle = self.tasks.spawn(job.run());
        self.task_jobs.insert(handle.id(), launch.job.clone());
        let (id, profile) = (&launch.job, &launch.profile);
        match launch.attempt {
            1 => tracing::info!("job {id}: profile {profile} started"),
            n => tracing::info!("job {id}: profile {profile} started (attempt {n})"),
        }
        self.running.insert(
            launch.job,
            Task {
                cancel,
                started: Instant::now(),
            },
        );
    }

    /// PropertiesChanged for `property`.
    async fn announce(&self, property: Property) {
        let emitter = self.object.signal_emitter();
        let interface = self.object.get().await;
        let sent = match property {
            Property::Jobs => interface.jobs_changed(emitter).await,
            Property::LastResults => interface.last_results_changed(emitter).await,
            Property::LastFailures => interface.last_failures_changed(emitter).await,
            Property::FailureHistory => interface.failure_history_changed(emitter).await,
            Property::Schedule => interface.schedule_changed(emitter).await,
        };
        if let Err(e) = sent {
            tracing::warn!("cannot emit PropertiesChanged: {e}");
        }
    }

    /// Emits `signal` (a job's end is logged too).
    async fn emit(&self, signal: Signal) {
        let emitter = self.object.signal_emitter();
        let sent = match &signal {
            Signal::Started { job, profile } => {
                BorgInterface::backup_started(emitter, job, profile).await
            }
            Signal::Progress { job, bytes, files } => {
                BorgInterface::backup_progress(emitter, job, *bytes, *files).await
            }
            Signal::Ended { job, profile, end } => {
                log_end(job, profile, end);
                emit_end(emitter, job, profile, end).await
            }
        };
        if let Err(e) = sent {
            tracing::warn!("cannot emit {signal:?}: {e}");
        }
    }

    /// A task ended: its job id and how it ended (a panic is a failure),
    /// with how long it ran.
    fn joined(
        &mut self,
        joined: Result<(tokio::task::Id, End), tokio::task::JoinError>,
    ) -> Option<(String, End, f64)> {
        let (job, end) = match joined {
            Ok((id, end)) => (self.task_jobs.remove(&id)?, end),
            Err(e) => {
                let job = self.task_jobs.remove(&e.id())?;
                let end = End::Failed {
                    stage: domain::Stage::Internal,
                    message: format!("the job stopped unexpectedly: {e}"),
                };
                (job, end)
            }
        };
        let task = self.running.remove(&job)?;
        Some((job, end, task.started.elapsed().as_secs_f64()))
    }

    /// A task ended: the events it sent before its end, then its end.
    async fn task_ended(
        &mut self,
        joined: Result<(tokio::task::Id, End), tokio::task::JoinError>,
        job_events: &mut mpsc::Receiver<(String, Event)>,
    ) {
        while let Ok((job, event)) = job_events.try_recv() {
            let effects = self.decide(|b| b.event(&job, event));
            self.carry(effects, None).await;
        }
        if let Some((job, end, seconds)) = self.joined(joined) {
            let effects = self.decide(|b| b.ended(&job, end, seconds, unix_now()));
            self.carry(effects, None).await;
        }
    }

    /// A request from the interface.
    async fn request(&mut self, command: Command) {
        match command {
            Command::Start(profile, reply) => {
                let effects = self.decide(|b| b.start(profile, unix_now()));
                self.carry(effects, Some(reply)).await;
            }
            Command::Cancel(job, reply) => match self.decide(|b| b.cancel(&job)) {
                Ok(effects) => {
                    self.carry(effects, None).await;
                    let _ = reply.send(Ok(()));
                }
                Err(refused) => {
                    let _ = reply.send(Err(refused.into_bus_error()));
                }
            },
        }
    }

    /// When the next planned retry is due, as a timer instant.
    fn next_retry(&self) -> Option<tokio::time::Instant> {
        let at = self.decide(|b| b.next_retry())?;
        let wait = at.saturating_sub(unix_now());
        Some(tokio::time::Instant::now() + Duration::from_secs(wait))
    }

    /// Serves until `shutdown` resolves.
    async fn serve(
        &mut self,
        shutdown: Shutdown,
        mut requests: mpsc::Receiver<Command>,
        mut job_events: mpsc::Receiver<(String, Event)>,
    ) {
        tokio::pin!(shutdown);
        loop {
            let next_retry = self.next_retry();
            tokio::select! {
                _ = &mut shutdown => break,
                _ = ferry_service::sleep_until(next_retry), if next_retry.is_some() => {
                    let effects = self.decide(|b| b.retries_due(unix_now()));
                    self.carry(effects, None).await;
                }
                Some(command) = requests.recv() => self.request(command).await,
                Some((job, event)) = job_events.recv() => {
                    let effects = self.decide(|b| b.event(&job, event));
                    self.carry(effects, None).await;
                }
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.task_ended(joined, &mut job_events).await;
                }
            }
        }
        self.stop(&mut job_events).await;
    }

    /// Stop: every job is cancelled (borg checkpoints and releases its
    /// lock) and its end recorded, within borg's cancel timeout.
    async fn stop(&mut self, job_events: &mut mpsc::Receiver<(String, Event)>) {
        if self.running.is_empty() {
            return;
        }
        tracing::info!("stopping: cancelling {} job(s)", self.running.len());
        let effects = self.decide(|b| b.stop_all());
        self.carry(effects, None).await;
        let bound = self.config.borg.cancel_timeout.duration() + SHUTDOWN_SLACK;
        let drained = tokio::time::timeout(bound, async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                self.task_ended(joined, job_events).await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("jobs did not stop within {bound:?}; leaving them to be killed");
        }
    }
}

/// Logs how a job ended.
fn log_end(job: &str, profile: &str, end: &End) {
    match end {
        End::Finished {
            archive, warnings, ..
        } if !warnings.is_empty() => tracing::warn!(
            "job {job}: profile {profile} finished with warnings: {archive}: {}",
            warnings.join("; ")
        ),
        End::Finished { archive, .. } => {
            tracing::info!("job {job}: profile {profile} finished: {archive}")
        }
        End::Failed { stage, message } => {
            tracing::warn!("job {job}: profile {profile} failed at {stage}: {message}")
        }
        End::Skipped { reason } | End::Unreachable { reason } => {
            tracing::info!("job {job}: profile {profile} skipped: {reason}")
        }
    }
}

/// The signal that says how a job ended.
async fn emit_end(
    emitter: &SignalEmitter<'_>,
    job: &str,
    profile: &str,
    end: &End,
) -> zbus::Result<()> {
    match end {
        End::Finished {
            archive, warnings, ..
        } if !warnings.is_empty() => {
            let warnings = warnings.join("; ");
            BorgInterface::backup_finished_with_warnings(emitter, job, profile, archive, &warnings)
                .await
        }
        End::Finished { archive, .. } => {
            BorgInterface::backup_finished(emitter, job, profile, archive).await
        }
        End::Failed { stage, message } => {
            BorgInterface::backup_failed(emitter, job, profile, stage.as_str(), message).await
        }
        End::Skipped { reason } | End::Unreachable { reason } => {
            BorgInterface::backup_skipped(emitter, job, profile, reason).await
        }
    }
}

/// Writes the state off the runtime; a failure is logged, and the service
/// goes on.
async fn save(stored: Stored, path: PathBuf) {
    let written = tokio::task::spawn_blocking(move || {
        stored
            .save(&path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    })
    .await;
    let failed = match written {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(e) => format!("the state was not written: {e}"),
    };
    tracing::error!("{failed}; the bus is right but this will not survive a restart");
}

/// Logs, once at start, what is wrong with borgmatic files that can be read
/// now; a file that is not there yet (seed 000's ~/Private) is read at run
/// time. Runs off the runtime (it reads files).
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

/// What a start finds on disk: the state file, checked borgmatic files,
/// the host id. Read off the runtime.
struct Found {
    stored: Stored,
    host_id: String,
}

async fn look_around(config: Arc<Config>, state_path: PathBuf) -> Result<Found, ServiceError> {
    tokio::task::spawn_blocking(move || {
        check_borgmatic_files(&config);
        Found {
            stored: Stored::load(&state_path),
            host_id: ferry_service::host::borg_host_id(config.borg.host_id.as_deref()),
        }
    })
    .await
    // Starting afresh would reuse job ids and forget the interrupted jobs.
    .map_err(|e| ServiceError::Other(format!("cannot read the state at start: {e}")))
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
    let found = look_around(config.clone(), state_path.clone()).await?;
    tracing::info!("BORG_HOST_ID is {}", found.host_id);
    let policy = Policy {
        retries: config.borg.retries,
        retry_delay: config.borg.retry_delay.duration(),
        unreachable_grace: config.borg.unreachable_grace.duration(),
    };
    let profiles = config.profiles.keys().cloned().collect();
    let (backups, recovered) = Backups::recover(policy, profiles, found.stored, unix_now());
    let backups = Arc::new(Mutex::new(backups));

    let (commands, requests) = mpsc::channel(16);
    let interface = BorgInterface {
        commands,
        shared: backups.clone(),
        config: config.clone(),
        started: unix_now(),
        bus,
    };
    let object = ferry_service::serve(&connection, borg::OBJECT_PATH, interface).await?;
    let (events, job_events) = mpsc::channel(256);
    let mut service = Service {
        config,
        logind,
        backups,
        object,
        state_path,
        host_id: found.host_id,
        locks: RepositoryLocks::default(),
        events,
        running: BTreeMap::new(),
        tasks: JoinSet::new(),
        task_jobs: HashMap::new(),
    };
    claim_name(&connection, borg::BUS_NAME, borg::OBJECT_PATH).await?;
    service.carry(recovered, None).await;
    service.serve(shutdown, requests, job_events).await;
    Ok(())
}
