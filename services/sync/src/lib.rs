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
//! last success and the last failure are kept in the [`ledger`]. When a
//! backup ends (Borg1.BackupFinished, …WithWarnings, BackupFailed) the
//! repositories' newest archives are listed then, not at the next
//! plug-in ([`listings`]).
//!
//! The shape is the house's: the rules live in a pure [`domain`] (what
//! runs, when a request is refused, what a job's reports make of the
//! ledger), unit-tested without a bus; this file is the adapter. The
//! interface object is thin: methods check the caller and the arguments
//! and hand the work to the service loop; the loop owns the job tasks and
//! applies their [`domain::Report`]s, which jobs send over a channel (a job
//! never touches the bus), carrying out the effects in order; properties
//! are read from the shared [`domain::State`].

pub mod borg;
pub mod domain;
pub mod generation;
pub mod job;
pub mod ledger;
pub mod listings;
pub mod lock;
pub mod mounts;
pub mod snapshot;
pub mod truth;
pub mod verify;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::{Effect, Report, Signal, State};
use ferry_config::Config;
use ferry_interfaces::{
    borg as borg_bus, crypt, drive_watcher, sync, Error as FerryError, Failure, SyncJob,
};
use ferry_interfaces::{DriveVerification, FerrySignal, SyncRecord};
use ferry_service::{claim_name, subscribe_signals, unix_now, ServiceError, Shutdown};
use futures_util::StreamExt;
use job::{Context, JobSpec, Reports, Stop, StopReason};
use ledger::Ledger;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use zbus::object_server::SignalEmitter;

/// How long running jobs get to clean up when ferry-sync stops.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The service's state, shared by the interface (reading) and the loop.
type SharedState = Arc<Mutex<State>>;

fn with<T>(shared: &SharedState, f: impl FnOnce(&mut State) -> T) -> T {
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
        with(&self.shared, |s| s.running())
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
        let now = unix_now();
        with(&self.shared, |s| s.verification(now))
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

/// Carries out the domain's effects: persists the ledger, emits
/// PropertiesChanged and the signals, in the order given.
pub struct Effects {
    shared: SharedState,
    object: ferry_service::Served<SyncInterface>,
    ledger_path: PathBuf,
}

fn warn_on_error(what: &str, result: zbus::Result<()>) {
    if let Err(e) = result {
        tracing::warn!("cannot emit {what}: {e}");
    }
}

impl Effects {
    async fn carry_out(&self, effects: Vec<Effect>) {
        for effect in effects {
            self.one(effect).await;
        }
    }

    async fn one(&self, effect: Effect) {
        let emitter = self.object.signal_emitter();
        match effect {
            Effect::SaveLedger => self.save().await,
            Effect::Warn(message) => tracing::warn!("{message}"),
            Effect::Emit(signal) => self.emit(signal).await,
            changed => {
                let object = self.object.get().await;
                let result = match changed {
                    Effect::RunningChanged => object.running_changed(emitter).await,
                    Effect::LastSyncsChanged => object.last_syncs_changed(emitter).await,
                    Effect::VerificationChanged => object.verification_changed(emitter).await,
                    Effect::LastFailuresChanged => object.last_failures_changed(emitter).await,
                    _ => object.failure_history_changed(emitter).await,
                };
                warn_on_error("PropertiesChanged", result);
            }
        }
    }

    async fn emit(&self, signal: Signal) {
        let emitter = self.object.signal_emitter();
        let (what, result) = match &signal {
            Signal::Started { drive, repository } => (
                "SyncStarted",
                SyncInterface::sync_started(emitter, drive, repository).await,
            ),
            Signal::Progress {
                drive,
                done,
                total,
                phase,
            } => (
                "SyncProgress",
                SyncInterface::sync_progress(emitter, drive, *done, *total, phase).await,
            ),
            Signal::Finished {
                drive,
                bytes,
                seconds,
            } => (
                "SyncFinished",
                SyncInterface::sync_finished(emitter, drive, *bytes, *seconds).await,
            ),
            Signal::Failed {
                drive,
                stage,
                message,
            } => (
                "SyncFailed",
                SyncInterface::sync_failed(emitter, drive, stage, message).await,
            ),
        };
        warn_on_error(what, result);
    }

    /// Writes the ledger (the loop is the only writer: one at a time).
    async fn save(&self) {
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
}

/// The loop's own state.
struct Service {
    config: Arc<Config>,
    borg: borg::Borg,
    shared: SharedState,
    effects: Effects,
    /// Where jobs send their reports.
    reports: mpsc::UnboundedSender<(String, Report)>,
    /// Per running job, its stop request.
    stops: BTreeMap<String, watch::Sender<Option<StopReason>>>,
    jobs: JoinSet<()>,
    /// The newest archives known by transaction, shared with the jobs.
    listings: Arc<listings::Listings>,
    /// The listing of every repository after a backup (at most one).
    refreshing: JoinSet<()>,
    /// A backup ended while the listing ran: list again when it is done.
    refresh_again: bool,
    /// Stops the listing when ferry-sync stops.
    refresh_stop: watch::Sender<Option<StopReason>>,
}

impl Service {
    /// Starts a job for `drive`; the error says why not.
    async fn start(&mut self, drive: &str) -> Result<(), FerryError> {
        let enrolled = self.config.drives.keys().map(|n| n.as_str());
        with(&self.shared, |s| s.may_start(drive, enrolled)).map_err(|r| r.into_bus_error())?;
        let Some(mut spec) = JobSpec::of(&self.config, drive) else {
            return Err(FerryError::UnknownDrive(format!(
                "no drive named `{drive}` is enrolled in ferry.toml"
            )));
        };
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
        let effects = with(&self.shared, |s| {
            spec.archives = s.archives(drive);
            s.begin(drive, &first, unix_now())
        });
        self.stops.insert(drive.to_string(), stop_tx);
        self.effects.carry_out(effects).await;
        tracing::info!("syncing {drive} at {}", spec.mountpoint.display());
        let context = Context {
            config: self.config.clone(),
            borg: self.borg.clone(),
            reports: Reports::new(drive, self.reports.clone()),
            listings: self.listings.clone(),
        };
        self.jobs.spawn(job::run(spec, Arc::new(context), stop));
        Ok(())
    }

    /// Applies a job's report and carries out what follows from it.
    async fn report(&mut self, drive: &str, report: Report) {
        if let Report::Phase {
            repository,
            phase,
            detail,
        } = &report
        {
            let name = phase.as_str();
            match detail.is_empty() {
                true => tracing::info!("{drive}: {repository}: {name}"),
                false => tracing::info!("{drive}: {repository}: {name}: {detail}"),
            }
        }
        if matches!(report, Report::Finished { .. } | Report::Failed(_)) {
            self.stops.remove(drive);
        }
        let effects = with(&self.shared, |s| s.apply(drive, report, unix_now()));
        self.effects.carry_out(effects).await;
    }

    /// Asks the job of `drive` to stop; false when none runs.
    fn stop(&self, drive: &str, reason: StopReason) -> bool {
        match self.stops.get(drive) {
            Some(stop) => {
                stop.send_replace(Some(reason));
                true
            }
            None => false,
        }
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
            FerrySignal::DriveDetached { drive, .. } if self.stop(&drive, StopReason::Removed) => {
                tracing::warn!("{drive} was removed during its sync; stopping");
            }
            FerrySignal::BackupFinished { .. }
            | FerrySignal::BackupFinishedWithWarnings { .. }
            | FerrySignal::BackupFailed { .. } => self.refresh(),
            _ => {}
        }
    }

    /// A backup ended: list the newest archive of every repository whose
    /// committed transaction is new, one at a time, off the plug-in path
    /// (see [`listings`]). While a listing runs, one more is queued.
    fn refresh(&mut self) {
        if !self.refreshing.is_empty() {
            self.refresh_again = true;
            return;
        }
        let repositories: Vec<_> = self
            .config
            .repositories
            .iter()
            .map(|(name, r)| (name.as_str().to_string(), r.clone()))
            .collect();
        let (borg, listings) = (self.borg.clone(), self.listings.clone());
        let reports = self.reports.clone();
        let wait = Duration::from_secs(self.config.sync.lock_wait);
        let mut stop = job::Stop::from(self.refresh_stop.subscribe());
        self.refreshing.spawn(async move {
            for (name, repository) in repositories {
                match listings::refresh(&borg, &name, &repository, &listings, wait, &mut stop).await
                {
                    Ok(Some(listed)) => {
                        tracing::info!(
                            "{name}: newest archive {} (transaction {})",
                            listed.archive,
                            listed.transaction.id
                        );
                        let report = Report::Listed {
                            repository: name,
                            listed,
                        };
                        let _ = reports.send((String::new(), report));
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(
                        "{name}: cannot list the newest archive after the backup ({}); the next sync lists it",
                        e.message
                    ),
                }
            }
        });
    }

    /// The listing after a backup is done; another backup ended meanwhile?
    fn refreshed(&mut self) {
        if std::mem::take(&mut self.refresh_again) {
            self.refresh();
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
            if with(&self.shared, |s| s.is_running(&drive)) {
                tracing::info!("DriveOpened for {drive}, whose sync is already running");
                return;
            }
            match self.start(&drive).await {
                Ok(()) => {}
                Err(FerryError::NotOpen(message)) => {
                    // Still answer, so the crypt manager closes the drive.
                    let failure = job::Failure::new(job::Stage::Copy, message);
                    self.report(&drive, Report::Failed(failure)).await;
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
    ferry_service::peer_answer(proxy.drives())
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|d| {
            ferry_interfaces::CryptState::from_wire(&d.state)
                == Some(ferry_interfaces::CryptState::Open)
        })
        .map(|d| d.name)
        .collect()
}

/// Runs ferry-sync on `connection` until `shutdown` resolves.
pub async fn run(
    connection: zbus::Connection,
    config: Arc<Config>,
    shutdown: Shutdown,
) -> Result<(), ServiceError> {
    let (mut service, mut requests, mut reports) = serve(&connection, config).await?;
    // Subscribe first, then look at the system and the peers.
    let mut signals = subscribe_signals(
        &connection,
        &[
            crypt::INTERFACE,
            drive_watcher::INTERFACE,
            borg_bus::INTERFACE,
        ],
    )
    .await?;
    let repositories: Vec<PathBuf> = service
        .config
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
            Some((drive, report)) = reports.recv() => service.report(&drive, report).await,
            Some(ended) = service.jobs.join_next(), if !service.jobs.is_empty() => {
                if let Err(e) = ended {
                    tracing::error!("a sync job ended abnormally: {e}");
                }
            }
            Some(_) = service.refreshing.join_next(), if !service.refreshing.is_empty() => {
                service.refreshed();
            }
        }
    }
    service.stop_all(&mut reports).await;
    Ok(())
}

impl Service {
    /// Stops every job; each removes what it holds and reports, and the
    /// reports are applied as they come.
    async fn stop_all(&mut self, reports: &mut mpsc::UnboundedReceiver<(String, Report)>) {
        let drives: Vec<String> = self.stops.keys().cloned().collect();
        for drive in &drives {
            self.stop(drive, StopReason::Shutdown);
        }
        self.refresh_stop.send_replace(Some(StopReason::Shutdown));
        let all_ended = async {
            loop {
                let (drive, report) = tokio::select! {
                    ended = self.jobs.join_next() => match ended {
                        Some(_) => continue,
                        None => break,
                    },
                    Some(sent) = reports.recv() => sent,
                };
                self.report(&drive, report).await;
            }
            while self.refreshing.join_next().await.is_some() {}
            while let Ok((drive, report)) = reports.try_recv() {
                self.report(&drive, report).await;
            }
        };
        if tokio::time::timeout(STOP_TIMEOUT, all_ended).await.is_err() {
            tracing::error!("sync jobs did not stop within {STOP_TIMEOUT:?}");
        }
    }
}

/// Loads the ledger and serves Sync1: the service, its requests and the
/// jobs' reports.
async fn serve(
    connection: &zbus::Connection,
    config: Arc<Config>,
) -> Result<
    (
        Service,
        mpsc::Receiver<Command>,
        mpsc::UnboundedReceiver<(String, Report)>,
    ),
    ServiceError,
> {
    let ledger_path = Ledger::path(&config.state_directory);
    let ledger = {
        let path = ledger_path.clone();
        tokio::task::spawn_blocking(move || Ledger::load(&path))
            .await
            .unwrap_or_default()
    };
    let shared = Arc::new(Mutex::new(State::new(
        ledger,
        config.sync.scrub_period_days,
    )));
    let (commands, requests) = mpsc::channel(8);
    let object = ferry_service::serve(
        connection,
        sync::OBJECT_PATH,
        SyncInterface {
            config: config.clone(),
            commands,
            shared: shared.clone(),
        },
    )
    .await?;
    let (reports_tx, reports) = mpsc::unbounded_channel();
    let listings = with(&shared, |s| {
        Arc::new(listings::Listings::new(&s.ledger.listed))
    });
    let service = Service {
        borg: borg::Borg::new(&config.borg),
        config,
        effects: Effects {
            shared: shared.clone(),
            object,
            ledger_path,
        },
        shared,
        reports: reports_tx,
        stops: BTreeMap::new(),
        jobs: JoinSet::new(),
        listings,
        refreshing: JoinSet::new(),
        refresh_again: false,
        refresh_stop: watch::channel(None).0,
    };
    Ok((service, requests, reports))
}
