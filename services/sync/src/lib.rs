//! ferry-sync: an off-site copy of the borg repositories on an opened drive
//! that is never half-written.
//!
//! It owns org.ferry.Sync1. On DriveOpened (from ferry-crypt, or anyone
//! speaking its contract) or a Start call it runs a [`job`] that copies
//! every repository assigned to the drive: borg's lock only for the instant
//! of a hard-link [`snapshot`], the copy built as a new [`generation`]
//! beside the current one and swapped in atomically once it is durable and
//! its new files read back from the drive as they were written
//! ([`verify`]); a rolling scrub re-reads the rest, a slice per sync, and
//! what it finds damaged is copied afresh. Every job ends with SyncFinished or
//! SyncFailed, on which ferry-crypt closes the drive. DriveDetached (from
//! the drive watcher) and Cancel stop a job within moments. Per drive the
//! last success and the last failure are kept in the [`ledger`].
//!
//! The interface object is thin: methods check the caller and the
//! arguments and hand the work to the service loop; the loop owns the job
//! tasks; properties are read from shared state the jobs update directly.

pub mod borg;
pub mod generation;
pub mod job;
pub mod ledger;
pub mod lock;
pub mod mounts;
pub mod snapshot;
pub mod truth;
pub mod verify;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_config::Config;
use ferry_interfaces::{crypt, drive_watcher, sync, Error as FerryError, Failure, SyncJob};
use ferry_interfaces::{DriveVerification, FerrySignal, SyncRecord};
use ferry_service::{claim_name, subscribe_signals, unix_now, ServiceError, Shutdown};
use futures_util::StreamExt;
use job::{Context, JobSpec, Stop, StopReason, Summary};
use ledger::Ledger;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use zbus::object_server::SignalEmitter;

/// How long a peer may take to answer at start.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long running jobs get to clean up when ferry-sync stops.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// A running job as the loop and the properties see it.
struct Running {
    job: SyncJob,
    stop: watch::Sender<Option<StopReason>>,
}

/// State shared by the interface (reading), the loop and the jobs.
#[derive(Default)]
struct Shared {
    running: BTreeMap<String, Running>,
    ledger: Ledger,
}

type SharedState = Arc<Mutex<Shared>>;

fn with<T>(shared: &SharedState, f: impl FnOnce(&mut Shared) -> T) -> T {
    let mut guard = shared.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut guard)
}

/// A request from the interface to the loop.
enum Command {
    Start(String, oneshot::Sender<Result<(), FerryError>>),
    Cancel(String, oneshot::Sender<Result<(), FerryError>>),
}

/// The org.ferry.Sync1 object.
pub struct SyncInterface {
    config: Arc<Config>,
    commands: mpsc::Sender<Command>,
    shared: SharedState,
}

impl SyncInterface {
    fn known_drive(&self, drive: &str) -> Result<(), FerryError> {
        if self.config.drives.keys().any(|n| n.as_str() == drive) {
            return Ok(());
        }
        let enrolled: Vec<&str> = self.config.drives.keys().map(|n| n.as_str()).collect();
        Err(FerryError::UnknownDrive(format!(
            "no drive named `{drive}` is enrolled in ferry.toml (enrolled: {})",
            if enrolled.is_empty() {
                "none".to_string()
            } else {
                enrolled.join(", ")
            }
        )))
    }

    async fn ask(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<(), FerryError>>) -> Command,
    ) -> Result<(), FerryError> {
        ferry_service::ask_loop(&self.commands, "ferry-sync", command).await
    }
}

#[zbus::interface(name = "org.ferry.Sync1")]
impl SyncInterface {
    /// Sync an already opened drive now.
    async fn start(
        &self,
        drive: &str,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<(), FerryError> {
        ferry_service::caller::authorize(connection, &header).await?;
        self.known_drive(drive)?;
        self.ask(|reply| Command::Start(drive.to_string(), reply))
            .await
    }

    /// Stop the running sync of a drive.
    async fn cancel(
        &self,
        drive: &str,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<(), FerryError> {
        ferry_service::caller::authorize(connection, &header).await?;
        self.known_drive(drive)?;
        self.ask(|reply| Command::Cancel(drive.to_string(), reply))
            .await
    }

    /// The running jobs: (drive, repository, done, total).
    #[zbus(property)]
    async fn running(&self) -> Vec<SyncJob> {
        with(&self.shared, |s| {
            s.running.values().map(|r| r.job.clone()).collect()
        })
    }

    /// Per drive the last successful sync.
    #[zbus(property)]
    async fn last_syncs(&self) -> Vec<SyncRecord> {
        with(&self.shared, |s| {
            s.ledger.last_syncs.values().cloned().collect()
        })
    }

    /// Per drive the most recent failure.
    #[zbus(property)]
    async fn last_failures(&self) -> Vec<Failure> {
        with(&self.shared, |s| {
            s.ledger.last_failures.values().cloned().collect()
        })
    }

    /// Every failure, oldest first, bounded, with unique ids.
    #[zbus(property)]
    async fn failure_history(&self) -> Vec<ferry_interfaces::FailureEvent> {
        with(&self.shared, |s| s.ledger.failure_history.clone())
    }

    /// Per drive, how well its copies are verified.
    #[zbus(property)]
    async fn verification(&self) -> Vec<DriveVerification> {
        let period = self.config.sync.scrub_period_days;
        let now = unix_now();
        with(&self.shared, |s| {
            s.ledger
                .verification
                .values()
                .map(|v| DriveVerification {
                    // Overdue is a matter of time: as of now.
                    overdue: verify::overdue(v.verified_since, now, period),
                    ..v.clone()
                })
                .collect()
        })
    }

    /// Copying a repository began.
    #[zbus(signal)]
    async fn sync_started(
        emitter: &SignalEmitter<'_>,
        drive: &str,
        repository: &str,
    ) -> zbus::Result<()>;

    /// Bytes copied so far, and each change of phase.
    #[zbus(signal)]
    async fn sync_progress(
        emitter: &SignalEmitter<'_>,
        drive: &str,
        done: u64,
        total: u64,
        phase: &str,
    ) -> zbus::Result<()>;

    /// Every repository copied, verified and durable.
    #[zbus(signal)]
    async fn sync_finished(
        emitter: &SignalEmitter<'_>,
        drive: &str,
        bytes: u64,
        seconds: f64,
    ) -> zbus::Result<()>;

    /// The job stopped; the message says which copy the drive holds.
    #[zbus(signal)]
    async fn sync_failed(
        emitter: &SignalEmitter<'_>,
        drive: &str,
        stage: &str,
        message: &str,
    ) -> zbus::Result<()>;
}

/// Where jobs report: updates the shared state first, persists the ledger,
/// emits PropertiesChanged, then the signal, so a subscriber reacting to a
/// signal reads properties that agree with it.
pub struct Reporter {
    shared: SharedState,
    object: ferry_service::Served<SyncInterface>,
    ledger_path: PathBuf,
    /// One ledger write at a time (they share a temp file name).
    saving: tokio::sync::Mutex<()>,
}

fn warn_on_error(what: &str, result: zbus::Result<()>) {
    if let Err(e) = result {
        tracing::warn!("cannot emit {what}: {e}");
    }
}

impl Reporter {
    /// The newest archives recorded for `drive`'s repositories.
    pub fn archives(&self, drive: &str) -> BTreeMap<String, String> {
        with(&self.shared, |s| {
            s.ledger.archives.get(drive).cloned().unwrap_or_default()
        })
    }

    async fn running_changed(&self) {
        let emitter = self.object.signal_emitter();
        let result = self.object.get().await.running_changed(emitter).await;
        warn_on_error("PropertiesChanged", result);
    }

    fn update_job(&self, drive: &str, update: impl FnOnce(&mut SyncJob)) {
        with(&self.shared, |s| {
            if let Some(running) = s.running.get_mut(drive) {
                update(&mut running.job);
            }
        });
    }

    /// Copying `repository` begins.
    pub async fn started(&self, drive: &str, repository: &str, done: u64, total: u64) {
        self.update_job(drive, |job| {
            job.repository = repository.to_string();
            job.done = done;
            job.total = total;
        });
        self.running_changed().await;
        let emitter = self.object.signal_emitter();
        warn_on_error(
            "SyncStarted",
            SyncInterface::sync_started(emitter, drive, repository).await,
        );
    }

    /// Bytes copied so far (the job limits how often).
    pub async fn progress(&self, drive: &str, done: u64, total: u64) {
        let mut phase = String::new();
        self.update_job(drive, |job| {
            job.done = done;
            job.total = total;
            phase = job.phase.clone();
        });
        self.running_changed().await;
        let emitter = self.object.signal_emitter();
        warn_on_error(
            "SyncProgress",
            SyncInterface::sync_progress(emitter, drive, done, total, &phase).await,
        );
    }

    /// The job of `drive` entered `phase` on `repository`; `detail` says
    /// more (who holds borg's lock) or is empty. Logged, in Running, and
    /// sent as SyncProgress.
    pub async fn phase(&self, drive: &str, repository: &str, phase: job::Phase, detail: String) {
        let name = phase.as_str();
        if detail.is_empty() {
            tracing::info!("{drive}: {repository}: {name}");
        } else {
            tracing::info!("{drive}: {repository}: {name}: {detail}");
        }
        let (mut done, mut total) = (0, 0);
        self.update_job(drive, |job| {
            job.repository = repository.to_string();
            job.phase = name.to_string();
            job.since = unix_now();
            job.detail = detail.clone();
            (done, total) = (job.done, job.total);
        });
        self.running_changed().await;
        let emitter = self.object.signal_emitter();
        warn_on_error(
            "SyncProgress",
            SyncInterface::sync_progress(emitter, drive, done, total, name).await,
        );
    }

    async fn save(&self) {
        let _one_at_a_time = self.saving.lock().await;
        let ledger = with(&self.shared, |s| s.ledger.clone());
        let path = self.ledger_path.clone();
        let saved = tokio::task::spawn_blocking(move || ledger.save(&path)).await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(
                "cannot write the sync ledger {}: {e}; it is on the bus until ferry-sync stops",
                self.ledger_path.display()
            ),
            Err(e) => tracing::error!("writing the sync ledger failed: {e}"),
        }
    }

    /// The job succeeded and its data is durable.
    pub async fn finished(&self, drive: &str, summary: Summary, seconds: f64, period_days: u64) {
        let newest: Vec<String> = summary
            .archives
            .iter()
            .filter(|(_, archive)| !archive.is_empty())
            .map(|(repository, archive)| format!("{repository}::{archive}"))
            .collect();
        let record = SyncRecord {
            drive: drive.to_string(),
            time: unix_now(),
            bytes: summary.bytes,
            seconds,
            archive: newest.join(", "),
            free: summary.free,
        };
        let now = unix_now();
        let verification = DriveVerification {
            drive: drive.to_string(),
            time: now,
            verified_since: summary.verified_since,
            read: summary.read,
            total: summary.total,
            repaired: summary.repaired,
            overdue: verify::overdue(summary.verified_since, now, period_days),
        };
        if verification.overdue {
            tracing::warn!(
                "{drive}: not every byte on the drive was re-read within the last {period_days} days ([sync] scrub-period-days); give the scrub more time per sync ([sync] scrub-seconds), or plug the drive in more often"
            );
        }
        with(&self.shared, |s| {
            s.ledger.last_syncs.insert(drive.to_string(), record);
            s.ledger
                .archives
                .insert(drive.to_string(), summary.archives.clone());
            s.ledger
                .verification
                .insert(drive.to_string(), verification);
        });
        self.save().await;
        with(&self.shared, |s| s.running.remove(drive));
        self.running_changed().await;
        let emitter = self.object.signal_emitter();
        let object = self.object.get().await;
        warn_on_error(
            "PropertiesChanged",
            object.last_syncs_changed(emitter).await,
        );
        warn_on_error(
            "PropertiesChanged",
            object.verification_changed(emitter).await,
        );
        drop(object);
        warn_on_error(
            "SyncFinished",
            SyncInterface::sync_finished(emitter, drive, summary.bytes, seconds).await,
        );
    }

    /// The job failed; its message says what the drive holds.
    pub async fn failed(&self, drive: &str, failure: &job::Failure) {
        let record = Failure {
            subject: drive.to_string(),
            time: unix_now(),
            stage: failure.stage.as_str().to_string(),
            message: failure.message.clone(),
        };
        let event = ferry_service::history::failure_event(
            drive,
            failure.stage.as_str(),
            &failure.message,
            "",
        );
        with(&self.shared, |s| {
            s.ledger.last_failures.insert(drive.to_string(), record);
            ferry_service::history::remember(&mut s.ledger.failure_history, event);
        });
        self.save().await;
        with(&self.shared, |s| s.running.remove(drive));
        self.running_changed().await;
        let emitter = self.object.signal_emitter();
        let object = self.object.get().await;
        warn_on_error(
            "PropertiesChanged",
            object.last_failures_changed(emitter).await,
        );
        warn_on_error(
            "PropertiesChanged",
            object.failure_history_changed(emitter).await,
        );
        drop(object);
        warn_on_error(
            "SyncFailed",
            SyncInterface::sync_failed(emitter, drive, failure.stage.as_str(), &failure.message)
                .await,
        );
    }
}

/// The loop's own state.
struct Service {
    config: Arc<Config>,
    context: Arc<Context>,
    shared: SharedState,
    jobs: JoinSet<()>,
}

impl Service {
    /// Starts a job for `drive`; the error says why not.
    async fn start(&mut self, drive: &str) -> Result<(), FerryError> {
        let Some(spec) = JobSpec::of(&self.config, drive) else {
            return Err(FerryError::UnknownDrive(format!(
                "no drive named `{drive}` is enrolled in ferry.toml"
            )));
        };
        if with(&self.shared, |s| s.running.contains_key(drive)) {
            return Err(FerryError::Busy(format!(
                "a sync of {drive} is already running; wait for SyncFinished, or call Cancel"
            )));
        }
        if !mounts::is_mounted(&spec.mountpoint) {
            return Err(FerryError::NotOpen(format!(
                "{drive} is not open: nothing is mounted at {}; open it first (busctl call {} {} {} Open s {drive})",
                spec.mountpoint.display(),
                crypt::BUS_NAME,
                crypt::OBJECT_PATH,
                crypt::INTERFACE
            )));
        }
        let (stop_tx, stop) = Stop::new();
        let first = spec
            .repositories
            .first()
            .map(|(n, _)| n.clone())
            .unwrap_or_default();
        with(&self.shared, |s| {
            s.running.insert(
                drive.to_string(),
                Running {
                    job: SyncJob {
                        drive: drive.to_string(),
                        repository: first,
                        done: 0,
                        total: 0,
                        phase: job::Phase::Prepare.as_str().to_string(),
                        since: unix_now(),
                        detail: String::new(),
                    },
                    stop: stop_tx,
                },
            )
        });
        self.context.reporter.running_changed().await;
        tracing::info!("syncing {drive} at {}", spec.mountpoint.display());
        self.jobs.spawn(job::run(spec, self.context.clone(), stop));
        Ok(())
    }

    /// Asks the job of `drive` to stop; false when none runs.
    fn stop(&self, drive: &str, reason: StopReason) -> bool {
        with(&self.shared, |s| match s.running.get(drive) {
            Some(running) => {
                running.stop.send_replace(Some(reason));
                true
            }
            None => false,
        })
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Start(drive, reply) => {
                let _ = reply.send(self.start(&drive).await);
            }
            Command::Cancel(drive, reply) => {
                let result = if self.stop(&drive, StopReason::Cancelled) {
                    tracing::info!("cancelling the sync of {drive}");
                    Ok(())
                } else {
                    Err(FerryError::NotRunning(format!(
                        "no sync of {drive} is running"
                    )))
                };
                let _ = reply.send(result);
            }
        }
    }

    async fn signal(&mut self, signal: FerrySignal) {
        match signal {
            FerrySignal::DriveOpened { drive, mountpoint } => {
                self.drive_opened(drive, &mountpoint).await
            }
            FerrySignal::DriveDetached { drive, .. } => {
                if self.stop(&drive, StopReason::Removed) {
                    tracing::warn!("{drive} was removed during its sync; stopping");
                }
            }
            _ => {}
        }
    }

    /// DriveOpened: the drive is ferry-crypt's to us now; sync it.
    async fn drive_opened(&mut self, drive: String, mountpoint: &str) {
        {
            let Some(spec) = JobSpec::of(&self.config, &drive) else {
                tracing::warn!("DriveOpened for `{drive}`, which is not enrolled; ignored");
                return;
            };
            if spec.mountpoint.as_path() != std::path::Path::new(mountpoint) {
                tracing::warn!(
                    "DriveOpened says {drive} is at {}, ferry.toml says {}; syncing onto ferry.toml's",
                    mountpoint,
                    spec.mountpoint.display()
                );
            }
            if with(&self.shared, |s| s.running.contains_key(&drive)) {
                tracing::info!("DriveOpened for {drive}, whose sync is already running");
                return;
            }
            match self.start(&drive).await {
                Ok(()) => {}
                Err(FerryError::NotOpen(message)) => {
                    // Still answer, so the crypt manager closes the drive.
                    let failure = job::Failure::new(job::Stage::Copy, message);
                    self.context.reporter.failed(&drive, &failure).await;
                }
                Err(e) => tracing::warn!("cannot sync {drive}: {e}"),
            }
        }
    }
}

/// Drives the crypt manager says are open now (it may have opened them
/// while ferry-sync was not running). Nothing when it is not on the bus.
async fn open_drives(connection: &zbus::Connection) -> Vec<String> {
    let proxy = crypt::CryptProxy::builder(connection)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await;
    let Ok(proxy) = proxy else { return Vec::new() };
    match tokio::time::timeout(PEER_TIMEOUT, proxy.drives()).await {
        Ok(Ok(drives)) => drives
            .into_iter()
            .filter(|d| {
                ferry_interfaces::CryptState::from_wire(&d.state)
                    == Some(ferry_interfaces::CryptState::Open)
            })
            .map(|d| d.name)
            .collect(),
        Ok(Err(e)) => {
            tracing::debug!("the crypt manager is not available: {e}");
            Vec::new()
        }
        Err(_) => {
            tracing::warn!("the crypt manager did not answer within {PEER_TIMEOUT:?}");
            Vec::new()
        }
    }
}

/// Runs ferry-sync on `connection` until `shutdown` resolves.
pub async fn run(
    connection: zbus::Connection,
    config: Arc<Config>,
    shutdown: Shutdown,
) -> Result<(), ServiceError> {
    let ledger_path = Ledger::path(&config.state_directory);
    let ledger = {
        let path = ledger_path.clone();
        tokio::task::spawn_blocking(move || Ledger::load(&path))
            .await
            .unwrap_or_default()
    };
    let shared = Arc::new(Mutex::new(Shared {
        running: BTreeMap::new(),
        ledger,
    }));
    let (commands, mut requests) = mpsc::channel(8);
    let object = ferry_service::serve(
        &connection,
        sync::OBJECT_PATH,
        SyncInterface {
            config: config.clone(),
            commands,
            shared: shared.clone(),
        },
    )
    .await?;
    let context = Arc::new(Context {
        config: config.clone(),
        borg: borg::Borg::new(&config.borg),
        reporter: Reporter {
            shared: shared.clone(),
            object,
            ledger_path,
            saving: tokio::sync::Mutex::new(()),
        },
    });

    // Subscribe first, then look at the system and the peers.
    let mut signals =
        subscribe_signals(&connection, &[crypt::INTERFACE, drive_watcher::INTERFACE]).await?;
    let repositories: Vec<PathBuf> = config
        .repositories
        .values()
        .map(|r| r.path.to_path_buf())
        .collect();
    let _ = tokio::task::spawn_blocking(move || {
        for repository in repositories {
            snapshot::remove_leftovers(&repository);
        }
    })
    .await;
    let resume = open_drives(&connection).await;

    let mut service = Service {
        config,
        context,
        shared,
        jobs: JoinSet::new(),
    };
    claim_name(&connection, sync::BUS_NAME, sync::OBJECT_PATH).await?;
    for drive in resume {
        if JobSpec::of(&service.config, &drive).is_some() {
            tracing::info!("{drive} is open; syncing it (its DriveOpened came before this start)");
            if let Err(e) = service.start(&drive).await {
                tracing::warn!("cannot sync {drive}: {e}");
            }
        }
    }

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            message = signals.next() => {
                let Some(signal) = message else {
                    return Err(ServiceError::Other("the bus connection closed".into()));
                };
                service.signal(signal).await;
            }
            Some(command) = requests.recv() => service.command(command).await,
            Some(ended) = service.jobs.join_next(), if !service.jobs.is_empty() => {
                if let Err(e) = ended {
                    tracing::error!("a sync job ended abnormally: {e}");
                }
            }
        }
    }

    // Stop every job; each removes what it holds and reports.
    let drives: Vec<String> = with(&service.shared, |s| s.running.keys().cloned().collect());
    for drive in &drives {
        service.stop(drive, StopReason::Shutdown);
    }
    let all_ended = async { while service.jobs.join_next().await.is_some() {} };
    if tokio::time::timeout(STOP_TIMEOUT, all_ended).await.is_err() {
        tracing::error!("sync jobs did not stop within {STOP_TIMEOUT:?}");
    }
    Ok(())
}
