//! ferry-crypt: opens and closes enrolled drives, and enrols new ones.
//!
//! It owns org.ferry.Crypt1. A drive is opened when the drive watcher says
//! it was plugged in (for drives with `open-on-attach`) or on the Open
//! method, and closed after the sync worker's SyncFinished or SyncFailed for
//! it, on the Close method, or — lazily — when it is pulled out while open.
//!
//! The service is a pure domain ([`domain`]: the rules, events in, effects
//! out) behind this adapter, which owns the bus connection, the interface
//! ([`interface`]) and the runtime, and carries the effects out: operations
//! ([`ops`]) run as tasks in a `JoinSet` the loop owns and reports from,
//! persistence (the closed markers, [`failures`]) happens off the runtime
//! before the change is published, and a change is published property
//! first, then signal.
//!
//! On start it gathers what there is — which drives are attached (the
//! watcher's Drives property, else udev) and what a crashed predecessor left
//! mounted or unlocked ([`ops::inspect`]) — and lets
//! [`domain::Drives::recover`] plan what to do: a proven open mount is
//! adopted and announced with DriveOpened again (so the flow goes on); a
//! half-open drive that is attached is opened again from scratch (or closed,
//! if it does not open on attach); a detached one is cleaned up. The log
//! says which. `ferry-crypt enroll` is [`enroll`].
//!
//! Each open first reads the drive's SMART health ([`health`]); the
//! reading reaches the loop before the open's outcome and is shown as
//! Crypt1.Health, which is rebuilt from the health ledger at start.

pub mod command;
pub mod devices;
pub mod domain;
pub mod enroll;
pub mod failures;
pub mod health;
pub mod identity;
pub mod interface;
pub mod mounts;
pub mod ops;
pub mod secrets;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::{Drives, Effect, Enrolled, Failed, Finding, Operation, Signal};
use ferry_config::{Config, Name};
use ferry_interfaces::{crypt, drive_watcher, sync, CryptStage, FerrySignal};
use ferry_service::health_ledger::HealthRecord;
use ferry_service::{claim_name, subscribe_signals, unix_now, ServiceError, Shutdown};
use futures_util::StreamExt;
use interface::{Command, CryptInterface, View};
use ops::Plan;
use tokio::sync::mpsc;
use tokio::task::{Id, JoinError, JoinSet};

/// How long to wait for the drive watcher's properties at start.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);

/// The closed markers' file under the state directory.
const CLOSED_FILE: &str = "crypt-closed.json";

/// A finished operation, reported by its task.
struct Done {
    drive: Name,
    operation: Operation,
    result: Result<(), Failed>,
}

/// The adapter: the domain, and everything that carries its effects out.
struct Service {
    drives: Drives,
    /// Each drive's operation plan (the device is kept after removal, to
    /// recognise its mount).
    plans: BTreeMap<Name, Plan>,
    closed_path: PathBuf,
    failures: failures::FailureLog,
    view: Arc<Mutex<View>>,
    object: ferry_service::Served<CryptInterface>,
    /// The running operations; each drive has at most one.
    tasks: JoinSet<Done>,
    /// Which drive and operation each task is, for a task that panics.
    running: HashMap<Id, (Name, Operation)>,
    /// How to tell each drive's running operation that the drive is gone.
    interrupts: HashMap<Name, tokio::sync::watch::Sender<bool>>,
    /// FailureHistory grew since the last publish.
    history_grew: bool,
    /// Each drive's latest SMART reading (Crypt1.Health), from the health
    /// ledger at start, then from the open operations' health checks.
    health: BTreeMap<String, HealthRecord>,
    /// Where the health checks hand their readings over.
    readings: mpsc::UnboundedReceiver<(String, HealthRecord)>,
}

impl Service {
    /// Carries `effects` out, in order.
    async fn apply(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Start {
                    drive,
                    operation,
                    device,
                } => self.start(drive, operation, device),
                Effect::SaveClosed(closed) => save_closed(&self.closed_path, closed).await,
                Effect::RecordFailure(failure) => {
                    let event = ferry_service::history::failure_event(
                        &failure.subject,
                        &failure.stage,
                        &failure.message,
                        "",
                    );
                    self.failures.record(failure).await;
                    if let Ok(mut view) = self.view.lock() {
                        ferry_service::history::remember(&mut view.history, event);
                    }
                    self.history_grew = true;
                }
                Effect::Interrupt { drive } => {
                    if let Some(gone) = self.interrupts.get(&drive) {
                        tracing::warn!(
                            "{drive}: pulled out while closing; the close stops waiting"
                        );
                        gone.send_replace(true);
                    }
                }
                Effect::Publish => self.publish().await,
                Effect::Emit(signal) => self.emit(signal).await,
            }
        }
    }

    /// Starts `operation` on `drive` as a tracked task.
    fn start(&mut self, drive: Name, operation: Operation, device: Option<String>) {
        let Some(plan) = self.plans.get_mut(&drive) else {
            return;
        };
        if let Some(device) = &device {
            plan.device = Some(PathBuf::from(device));
        }
        let plan = plan.clone();
        tracing::info!(
            "{drive}: {operation:?} ({})",
            device.as_deref().unwrap_or("no device")
        );
        let name = drive.clone();
        let (interrupt, gone) = ops::Gone::channel();
        self.interrupts.insert(drive.clone(), interrupt);
        let task = self.tasks.spawn(async move {
            let result = ops::run(operation, &plan, device.as_deref().map(Path::new), gone).await;
            Done {
                drive: name,
                operation,
                result,
            }
        });
        self.running.insert(task.id(), (drive, operation));
    }

    /// A health check read a drive: Crypt1.Health shows it.
    async fn health_read(&mut self, drive: String, record: HealthRecord) {
        self.health.insert(drive, record);
        self.publish().await;
    }

    /// A task ended: its outcome goes to the domain, after the health
    /// reading it sent (Crypt1.Health changes before DriveOpened or
    /// DriveFailed). A task that panicked is a failure of its drive, never
    /// a silence.
    async fn joined(&mut self, joined: Result<(Id, Done), JoinError>) {
        let mut read = false;
        while let Ok((drive, record)) = self.readings.try_recv() {
            self.health.insert(drive, record);
            read = true;
        }
        if read {
            self.publish().await;
        }
        let done = match joined {
            Ok((id, done)) => {
                self.running.remove(&id);
                done
            }
            Err(e) => {
                let Some((drive, operation)) = self.running.remove(&e.id()) else {
                    return;
                };
                let stage = match operation {
                    Operation::Close | Operation::Remove => CryptStage::Close,
                    _ => CryptStage::Mount,
                };
                let message = format!(
                    "ferry-crypt's {operation:?} of {drive} stopped unexpectedly ({e}); the drive may still be mounted or unlocked: close it, then open it again"
                );
                Done {
                    drive,
                    operation,
                    result: Err(Failed::new(stage, message)),
                }
            }
        };
        self.interrupts.remove(&done.drive);
        let effects = self
            .drives
            .finished(&done.drive, done.operation, done.result, unix_now());
        self.apply(effects).await;
    }

    /// Updates the properties and emits PropertiesChanged for those that changed.
    async fn publish(&mut self) {
        let drives = self.drives.view();
        let failures = self.failures.all();
        let health: Vec<_> = self
            .health
            .iter()
            .map(|(drive, record)| record.to_property(drive))
            .collect();
        let changed = match self.view.lock() {
            Ok(mut view) => {
                let changed = (
                    view.drives != drives,
                    view.failures != failures,
                    view.health != health,
                );
                view.drives = drives;
                view.failures = failures;
                view.health = health;
                changed
            }
            Err(_) => (true, true, true),
        };
        let emitter = self.object.signal_emitter();
        let interface = self.object.get().await;
        let mut sent = Vec::new();
        if changed.0 {
            sent.push(interface.drives_changed(emitter).await);
        }
        if changed.1 {
            sent.push(interface.last_failures_changed(emitter).await);
        }
        if std::mem::take(&mut self.history_grew) {
            sent.push(interface.failure_history_changed(emitter).await);
        }
        if changed.2 {
            sent.push(interface.health_changed(emitter).await);
        }
        for e in sent.into_iter().filter_map(Result::err) {
            tracing::warn!("cannot emit PropertiesChanged: {e}");
        }
    }

    /// Emits a Crypt1 signal.
    async fn emit(&self, signal: Signal) {
        let emitter = self.object.signal_emitter();
        let (name, sent) = match &signal {
            Signal::Opened { drive, mountpoint } => (
                "DriveOpened",
                CryptInterface::drive_opened(emitter, drive.as_str(), mountpoint).await,
            ),
            Signal::Held { drive, mountpoint } => (
                "DriveHeld",
                CryptInterface::drive_held(emitter, drive.as_str(), mountpoint).await,
            ),
            Signal::Closed { drive } => (
                "DriveClosed",
                CryptInterface::drive_closed(emitter, drive.as_str()).await,
            ),
            Signal::Failed { drive, failed } => (
                "DriveFailed",
                CryptInterface::drive_failed(
                    emitter,
                    drive.as_str(),
                    failed.stage.as_str(),
                    &failed.message,
                )
                .await,
            ),
        };
        if let Err(e) = sent {
            tracing::error!("cannot emit {name}: {e}");
        }
    }

    /// Answers a method call: the domain accepts or refuses it (the device
    /// of a drive not announced yet is looked up off the runtime first).
    async fn request(&mut self, command: Command) {
        let found = match self.drives.needs_device(&command.drive) {
            Some(uuid) => blocking(move || devices::device_by_uuid(&uuid))
                .await
                .flatten(),
            None => None,
        };
        let answer = self.drives.request(&command.drive, command.request, found);
        let (effects, reply) = match answer {
            Ok(effects) => (effects, Ok(())),
            Err(refusal) => (Vec::new(), Err(refusal.into_bus_error())),
        };
        let _ = command.reply.send(reply);
        self.apply(effects).await;
    }
}

/// Runs `work` on a blocking thread; `None` (logged) if it panicked.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => Some(value),
        Err(e) => {
            tracing::error!("a blocking task of ferry-crypt failed: {e}");
            None
        }
    }
}

/// The closed markers as the last run left them; a damaged file is moved
/// aside (and logged), never used.
fn load_closed(path: &Path) -> BTreeMap<String, String> {
    ferry_service::durable::load_or_move_aside(path, "the drives closed after a flow", |b| {
        serde_json::from_slice(b).map_err(|e| e.to_string())
    })
    .unwrap_or_default()
}

/// Writes the closed markers durably, off the runtime; a failure is logged.
async fn save_closed(path: &Path, closed: BTreeMap<String, String>) {
    let path = path.to_path_buf();
    let shown = path.display().to_string();
    let written = blocking(move || {
        let bytes = serde_json::to_vec_pretty(&closed).map_err(std::io::Error::other)?;
        ferry_service::durable::write_atomically(&path, &bytes, 0o600)
    })
    .await;
    if let Some(Err(e)) = written {
        tracing::warn!("cannot record which drives are closed in {shown}: {e}");
    }
}

/// Which devices the enrolled drives are attached as: the watcher's view
/// when it is on the bus, else udev's (asked off the runtime).
async fn attached_devices(
    connection: &zbus::Connection,
    config: &Config,
) -> BTreeMap<String, String> {
    let from_watcher = async {
        let proxy = drive_watcher::DriveWatcherProxy::builder(connection)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        proxy.drives().await
    };
    let why = match tokio::time::timeout(PEER_TIMEOUT, from_watcher).await {
        Ok(Ok(drives)) => {
            tracing::info!("attached drives from the drive watcher");
            return drives
                .into_iter()
                .filter(|d| d.attached && !d.device.is_empty())
                .map(|d| (d.name, d.device))
                .collect();
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer".into(),
    };
    tracing::info!("the drive watcher is not available ({why}); asking udev");
    let uuids: Vec<(String, ferry_config::FsUuid)> = config
        .drives
        .iter()
        .map(|(name, d)| (name.to_string(), d.uuid.clone()))
        .collect();
    blocking(move || {
        uuids
            .into_iter()
            .filter_map(|(name, uuid)| Some((name, devices::device_by_uuid(&uuid)?)))
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// The domain and plans for the configured drives (their health checks
/// report to `report`), and what a restart found of each (mounts,
/// mappings). All of it off the runtime: the plans resolve their
/// mountpoints, and the findings read mountinfo and the drives' tokens.
async fn recovered(
    config: Arc<Config>,
    attached: BTreeMap<String, String>,
    closed_path: PathBuf,
    report: health::Report,
) -> Result<(Drives, BTreeMap<Name, Plan>, Vec<Finding>), ServiceError> {
    blocking(move || {
        let mut plans = BTreeMap::new();
        let mut enrolled = Vec::new();
        for (name, drive) in &config.drives {
            let mut plan = Plan::new(name, drive, &config.crypt);
            plan.health.ledger = Some(ferry_service::health_ledger::path(&config.state_directory));
            plan.health.report = Some(report.clone());
            plan.device = attached.get(name.as_str()).map(PathBuf::from);
            enrolled.push(Enrolled {
                name: name.clone(),
                uuid: drive.uuid.clone(),
                open_on_attach: drive.open_on_attach,
                mountpoint: plan.mountpoint.to_string_lossy().into_owned(),
            });
            plans.insert(name.clone(), plan);
        }
        let findings = plans
            .iter()
            .map(|(drive, plan)| Finding {
                leftover: ops::inspect(plan),
                device: plan
                    .device
                    .as_ref()
                    .map(|d| d.to_string_lossy().into_owned()),
                drive: drive.clone(),
            })
            .collect();
        let drives = Drives::new(enrolled, load_closed(&closed_path));
        (drives, plans, findings)
    })
    .await
    .ok_or_else(|| ServiceError::Other("cannot look at what was left mounted or unlocked".into()))
}

/// The enrolled drives' latest SMART readings from the health ledger (read
/// off the runtime), so Crypt1.Health survives a restart. A ledger that
/// cannot be read is logged; the readings come back with the next opens.
async fn last_readings(config: &Config) -> BTreeMap<String, HealthRecord> {
    let path = ferry_service::health_ledger::path(&config.state_directory);
    let enrolled: Vec<String> = config.drives.keys().map(|n| n.to_string()).collect();
    let loaded = blocking(move || ferry_service::health_ledger::load(&path)).await;
    match loaded {
        Some(Ok(mut all)) => {
            all.retain(|drive, _| enrolled.contains(drive));
            all
        }
        Some(Err(e)) => {
            tracing::warn!("{e}; Crypt1.Health starts empty");
            BTreeMap::new()
        }
        None => BTreeMap::new(),
    }
}

/// Runs ferry-crypt on `connection` until `shutdown` resolves.
pub async fn run(
    connection: zbus::Connection,
    config: Arc<Config>,
    shutdown: Shutdown,
) -> Result<(), ServiceError> {
    let view = Arc::new(Mutex::new(View::default()));
    let (commands, requests) = mpsc::channel(16);
    let object = ferry_service::serve(
        &connection,
        crypt::OBJECT_PATH,
        CryptInterface {
            commands,
            view: view.clone(),
        },
    )
    .await?;

    // Subscribe first, then read the system and the peers.
    let signals =
        subscribe_signals(&connection, &[drive_watcher::INTERFACE, sync::INTERFACE]).await?;
    let sync_owner = zbus::fdo::DBusProxy::new(&connection)
        .await?
        .receive_name_owner_changed_with_args(&[(0, sync::BUS_NAME)])
        .await?;
    let attached = attached_devices(&connection, &config).await;
    let closed_path = config.state_directory.join(CLOSED_FILE);
    let (report, readings) = mpsc::unbounded_channel();
    let (mut drives, plans, findings) =
        recovered(config.clone(), attached, closed_path.clone(), report).await?;
    let state_directory = config.state_directory.clone();
    let failures = blocking(move || failures::FailureLog::load(&state_directory))
        .await
        .ok_or_else(|| ServiceError::Other("cannot read the past drive failures".into()))?;
    let health = last_readings(&config).await;
    let effects = drives.recover(findings);
    let mut service = Service {
        drives,
        plans,
        closed_path,
        failures,
        view,
        object,
        tasks: JoinSet::new(),
        running: HashMap::new(),
        interrupts: HashMap::new(),
        history_grew: false,
        health,
        readings,
    };
    if config.drives.is_empty() {
        tracing::warn!("no drives are enrolled in the configuration; nothing to open");
    }
    service.publish().await;
    claim_name(&connection, crypt::BUS_NAME, crypt::OBJECT_PATH).await?;
    service.apply(effects).await;
    let events = Events {
        signals,
        sync_owner,
        requests,
    };
    serve_loop(&mut service, events, shutdown).await?;
    let open: Vec<&str> = service
        .drives
        .in_use()
        .into_iter()
        .map(Name::as_str)
        .collect();
    if !open.is_empty() {
        tracing::info!(
            "stopping with {} still open; the next start adopts or closes them",
            open.join(", ")
        );
    }
    Ok(())
}

/// Where the loop's events come from.
struct Events<S> {
    signals: S,
    sync_owner: zbus::fdo::NameOwnerChangedStream,
    requests: mpsc::Receiver<Command>,
}

/// The service loop: peer signals, method calls, finished operations and
/// the sync worker's comings and goings, until `shutdown`.
async fn serve_loop<S>(
    service: &mut Service,
    mut events: Events<S>,
    shutdown: Shutdown,
) -> Result<(), ServiceError>
where
    S: futures_util::Stream<Item = FerrySignal> + Unpin,
{
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            signal = events.signals.next() => {
                let Some(signal) = signal else {
                    return Err(ServiceError::Other("the bus connection closed".into()));
                };
                let effects = service.drives.signal(&signal);
                service.apply(effects).await;
            }
            Some(command) = events.requests.recv() => service.request(command).await,
            Some(joined) = service.tasks.join_next_with_id() => service.joined(joined).await,
            Some((drive, record)) = service.readings.recv() => service.health_read(drive, record).await,
            Some(changed) = events.sync_owner.next() => {
                if changed.args().is_ok_and(|a| a.new_owner().is_none()) {
                    let effects = service.drives.sync_lost();
                    service.apply(effects).await;
                }
            }
        }
    }
}
