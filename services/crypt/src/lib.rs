//! ferry-crypt: opens and closes enrolled drives, and enrols new ones.
//!
//! It owns org.ferry.Crypt1. A drive is opened when the drive watcher says
//! it was plugged in (for drives with `open-on-attach`) or on the Open
//! method, and closed after the sync worker's SyncFinished or SyncFailed for
//! it, on the Close method, or — lazily — when it is pulled out while open.
//! The work itself is in [`ops`]; this module keeps one state per drive,
//! allows one operation per drive at a time, runs operations in tasks it
//! owns and publishes their outcome: property first, then the signal.
//!
//! On start it rebuilds its view from the system: which drives are attached
//! (the watcher's Drives property, else udev), and what a crashed
//! predecessor left mounted or unlocked ([`ops::inspect`]): a proven open
//! mount is adopted and announced with DriveOpened again (so the flow goes
//! on); a half-open drive that is attached is opened again from scratch (or
//! closed, if it does not open on attach); a detached one is cleaned up.
//! The log says which. `ferry-crypt enroll` is [`enroll`].

pub mod command;
pub mod devices;
pub mod enroll;
pub mod failures;
pub mod health;
pub mod identity;
pub mod mounts;
pub mod ops;
pub mod secrets;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_config::{Config, FsUuid, Name};
use ferry_interfaces::{crypt, drive_watcher, sync, CryptDrive, Error as FerryError, Failure};
use ferry_service::{caller, claim_name, subscribe, unix_now, ServiceError, Shutdown};
use futures_util::StreamExt;
use ops::{Failed, Leftover, Plan};
use tokio::sync::{mpsc, oneshot};
use zbus::object_server::SignalEmitter;

/// How long to wait for the drive watcher's properties at start.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);

/// A drive's state, as the Drives property shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not plugged in.
    Absent,
    /// Plugged in, locked.
    Attached,
    /// Being unlocked, mounted and checked.
    Opening,
    /// Unlocked, mounted and proven.
    Open,
    /// Unlocked, proven and mounted read-only for a person; never synced.
    Held,
    /// Being unmounted and locked.
    Closing,
    /// Unmounted and locked after a flow: safe to remove.
    Closed,
    /// The last operation failed.
    Failed,
}

impl State {
    /// The name on the bus.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Absent => "absent",
            State::Attached => "attached",
            State::Opening => "opening",
            State::Open => "open",
            State::Held => "held",
            State::Closing => "closing",
            State::Closed => "closed",
            State::Failed => "failed",
        }
    }
}

/// What the properties show; written by the loop, read by the interface.
#[derive(Debug, Default)]
struct View {
    drives: Vec<CryptDrive>,
    failures: Vec<Failure>,
    /// Crypt1.FailureHistory (in memory).
    history: Vec<ferry_interfaces::FailureEvent>,
}

/// A request from the interface to the loop.
enum Request {
    /// Open; `hold`: read-only for a person, no sync, until Close.
    Open {
        hold: bool,
    },
    Close,
}

struct Command {
    request: Request,
    drive: String,
    reply: oneshot::Sender<Result<(), FerryError>>,
}

/// The org.ferry.Crypt1 object: checks the caller, hands the request to the
/// loop, and shows the loop's view as properties. It never waits for an
/// operation, only for the loop to accept or refuse it.
pub struct CryptInterface {
    commands: mpsc::Sender<Command>,
    view: Arc<Mutex<View>>,
}

impl CryptInterface {
    async fn request(&self, request: Request, drive: &str) -> Result<(), FerryError> {
        ferry_service::ask_loop(&self.commands, "ferry-crypt", |reply| Command {
            request,
            drive: drive.to_string(),
            reply,
        })
        .await
    }
}

#[zbus::interface(name = "org.ferry.Crypt1")]
impl CryptInterface {
    /// Unlock (LUKS drives), mount and check the identity token; the outcome
    /// is DriveOpened or DriveFailed.
    async fn open(
        &self,
        drive: &str,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<(), FerryError> {
        caller::authorize(connection, &header).await?;
        self.request(Request::Open { hold: false }, drive).await
    }

    /// Open with options: "hold" (b) opens read-only for a person, announced
    /// with DriveHeld, never synced, until Close.
    async fn open_with(
        &self,
        drive: &str,
        options: std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<(), FerryError> {
        caller::authorize(connection, &header).await?;
        let mut hold = false;
        for (key, value) in &options {
            match key.as_str() {
                "hold" => {
                    hold = bool::try_from(value).map_err(|_| {
                        FerryError::InvalidArgument(format!(
                            "option \"hold\" takes a boolean (b), not {}",
                            value.value_signature()
                        ))
                    })?
                }
                other => {
                    return Err(FerryError::InvalidArgument(format!(
                        "unknown option \"{}\" (known: hold)",
                        other.escape_debug()
                    )))
                }
            }
        }
        self.request(Request::Open { hold }, drive).await
    }

    /// Unmount and lock; the outcome is DriveClosed or DriveFailed.
    async fn close(
        &self,
        drive: &str,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<(), FerryError> {
        caller::authorize(connection, &header).await?;
        self.request(Request::Close, drive).await
    }

    /// Every enrolled drive: (name, state, mountpoint, device, message).
    #[zbus(property)]
    async fn drives(&self) -> Vec<CryptDrive> {
        self.view
            .lock()
            .map(|v| v.drives.clone())
            .unwrap_or_default()
    }

    /// The most recent failure of each drive: (drive, time, stage, message).
    #[zbus(property)]
    async fn last_failures(&self) -> Vec<Failure> {
        self.view
            .lock()
            .map(|v| v.failures.clone())
            .unwrap_or_default()
    }

    /// Every failure since the service started, oldest first, bounded.
    #[zbus(property)]
    async fn failure_history(&self) -> Vec<ferry_interfaces::FailureEvent> {
        self.view
            .lock()
            .map(|v| v.history.clone())
            .unwrap_or_default()
    }

    /// The drive is unlocked, mounted and proven to be ours.
    #[zbus(signal)]
    async fn drive_opened(
        emitter: &SignalEmitter<'_>,
        drive: &str,
        mountpoint: &str,
    ) -> zbus::Result<()>;

    /// The drive is open read-only for a person; nothing syncs it.
    #[zbus(signal)]
    async fn drive_held(
        emitter: &SignalEmitter<'_>,
        drive: &str,
        mountpoint: &str,
    ) -> zbus::Result<()>;

    /// The drive is unmounted and locked: safe to remove.
    #[zbus(signal)]
    async fn drive_closed(emitter: &SignalEmitter<'_>, drive: &str) -> zbus::Result<()>;

    /// Opening or closing failed.
    #[zbus(signal)]
    async fn drive_failed(
        emitter: &SignalEmitter<'_>,
        drive: &str,
        stage: &str,
        message: &str,
    ) -> zbus::Result<()>;
}

/// Which operation a task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Open,
    /// Open read-only for a person; ends in Held, announced with DriveHeld.
    Hold,
    /// Undo a predecessor's half-done open, then open; ends like Open.
    Reopen,
    Close,
    Remove,
}

/// A finished operation, reported to the loop.
struct Done {
    drive: Name,
    operation: Operation,
    result: Result<(), Failed>,
}

/// One enrolled drive as the loop sees it.
struct Entry {
    plan: Plan,
    uuid: FsUuid,
    open_on_attach: bool,
    state: State,
    /// The device node while attached.
    device: Option<String>,
    message: String,
    /// An operation is running.
    running: bool,
    /// Something of the drive (a mount or a mapping) may still be in place.
    in_use: bool,
    /// The drive went away while an operation was running.
    removed_meanwhile: bool,
    /// It is being closed because ferry-sync went away during its flow:
    /// the flow ends in a failure once it is closed.
    sync_lost: bool,
}

/// An event that may start an operation, and what it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Attached {
        was_absent: bool,
    },
    Detached,
    SyncDone,
    /// The sync worker lost its bus name (exited, crashed, killed).
    SyncLost,
}

impl Entry {
    /// The operation `trigger` starts now, if any (the state machine's
    /// rules, kept pure so they can be tested on their own).
    fn reaction(&self, trigger: Trigger) -> Option<Operation> {
        if self.running {
            return None;
        }
        match trigger {
            // A drive plugged in (or announced for the first time) opens;
            // a repeated announcement of one that is open, closed or failed
            // does not, or a Rescan would reopen a drive that is safe to
            // remove.
            Trigger::Attached { was_absent } => (self.open_on_attach
                && !self.in_use
                && (was_absent || self.state == State::Attached))
                .then_some(Operation::Open),
            Trigger::Detached => self.in_use.then_some(Operation::Remove),
            // A held drive is a person's: a sync's result never closes it.
            Trigger::SyncDone => {
                (self.in_use && self.state != State::Held).then_some(Operation::Close)
            }
            // Open and waiting for a sync result that will never come: the
            // flow must still end, closed and red.
            Trigger::SyncLost => {
                (self.in_use && self.state == State::Open).then_some(Operation::Close)
            }
        }
    }
}

/// Drives closed after a flow and still plugged in ("safe to remove" was
/// said), by name, with their device and UUID: kept on disk so that a restarted
/// ferry-crypt does not take a drive a person was told to pull for a new
/// plug-in and mount it again. Written durably; a drive leaves it when it is
/// detached or plugged in anew.
struct ClosedMarkers {
    path: PathBuf,
    drives: BTreeMap<String, String>,
}

impl ClosedMarkers {
    fn load(config: &Config) -> ClosedMarkers {
        let path = config.state_directory.join("crypt-closed.json");
        let drives = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        ClosedMarkers { path, drives }
    }

    /// What identifies the drive that was closed: its device and UUID.
    fn key(device: &str, uuid: &FsUuid) -> String {
        format!("{device} {}", uuid.normalized())
    }

    fn is_closed(&self, drive: &str, device: &str, uuid: &FsUuid) -> bool {
        self.drives
            .get(drive)
            .is_some_and(|d| *d == Self::key(device, uuid))
    }

    /// Records the drive as closed on `device`, or forgets it (None).
    fn set(&mut self, drive: &str, closed_on: Option<(&str, &FsUuid)>) {
        let changed = match closed_on {
            Some((device, uuid)) => {
                let key = Self::key(device, uuid);
                self.drives.insert(drive.to_string(), key.clone()) != Some(key)
            }
            None => self.drives.remove(drive).is_some(),
        };
        if !changed {
            return;
        }
        let written = serde_json::to_vec_pretty(&self.drives)
            .map_err(std::io::Error::other)
            .and_then(|bytes| ferry_service::durable::write_atomically(&self.path, &bytes, 0o600));
        if let Err(e) = written {
            tracing::warn!(
                "cannot record which drives are closed in {}: {e}",
                self.path.display()
            );
        }
    }
}

/// The service loop's state.
struct Service {
    closed: ClosedMarkers,
    entries: BTreeMap<Name, Entry>,
    failures: failures::FailureLog,
    view: Arc<Mutex<View>>,
    object: ferry_service::Served<CryptInterface>,
    done: mpsc::Sender<Done>,
}

impl Service {
    /// Updates the properties and emits PropertiesChanged for those that changed.
    async fn publish(&self) {
        let drives: Vec<CryptDrive> = self
            .entries
            .iter()
            .map(|(name, e)| CryptDrive {
                name: name.to_string(),
                state: e.state.as_str().to_string(),
                mountpoint: e.plan.mountpoint.to_string_lossy().into_owned(),
                device: e.device.clone().unwrap_or_default(),
                message: if e.state == State::Failed {
                    e.message.clone()
                } else {
                    String::new()
                },
            })
            .collect();
        let failures: Vec<Failure> = self.failures.all();
        let (drives_changed, failures_changed) = match self.view.lock() {
            Ok(mut view) => {
                let changed = (view.drives != drives, view.failures != failures);
                view.drives = drives;
                view.failures = failures;
                changed
            }
            Err(_) => (true, true),
        };
        let emitter = self.object.signal_emitter();
        let interface = self.object.get().await;
        if drives_changed {
            if let Err(e) = interface.drives_changed(emitter).await {
                tracing::warn!("cannot emit PropertiesChanged: {e}");
            }
        }
        if failures_changed {
            if let Err(e) = interface.last_failures_changed(emitter).await {
                tracing::warn!("cannot emit PropertiesChanged: {e}");
            }
        }
    }

    /// Starts `operation` on `drive` in a task of its own.
    async fn start(&mut self, drive: &Name, operation: Operation) {
        let Some(entry) = self.entries.get_mut(drive) else {
            return;
        };
        entry.running = true;
        entry.state = match operation {
            Operation::Open | Operation::Hold | Operation::Reopen => State::Opening,
            Operation::Close | Operation::Remove => State::Closing,
        };
        if let Some(device) = &entry.device {
            entry.plan.device = Some(PathBuf::from(device));
        }
        let plan = entry.plan.clone();
        let device = entry.device.clone();
        tracing::info!(
            "{drive}: {operation:?} ({})",
            device.as_deref().unwrap_or("no device")
        );
        let done = self.done.clone();
        let drive = drive.clone();
        tokio::spawn(async move {
            let result = match (operation, device) {
                (Operation::Open, Some(device)) => ops::open(&plan, device.as_ref()).await,
                (Operation::Hold, Some(device)) => {
                    ops::open_for(&plan, device.as_ref(), ops::Access::ReadOnly).await
                }
                (Operation::Reopen, Some(device)) => ops::reopen(&plan, device.as_ref()).await,
                (Operation::Open | Operation::Hold | Operation::Reopen, None) => Err(Failed {
                    stage: "unlock",
                    message: format!("drive {drive} is not plugged in"),
                }),
                (Operation::Close, _) => ops::close(&plan).await,
                (Operation::Remove, _) => Err(ops::remove(&plan).await),
            };
            let _ = done
                .send(Done {
                    drive,
                    operation,
                    result,
                })
                .await;
        });
        self.publish().await;
    }

    /// Emits DriveOpened for `drive`.
    async fn announce_opened(&self, drive: &Name, mountpoint: &str) {
        let emitter = self.object.signal_emitter();
        if let Err(e) = CryptInterface::drive_opened(emitter, drive.as_str(), mountpoint).await {
            tracing::error!("cannot emit DriveOpened: {e}");
        }
    }

    /// Adds a failure to Crypt1.FailureHistory and says so on the bus.
    async fn remember_failure(&self, drive: &Name, failed: &Failed) {
        let event = ferry_service::history::failure_event(
            drive.as_str(),
            failed.stage,
            &failed.message,
            "",
        );
        if let Ok(mut view) = self.view.lock() {
            ferry_service::history::remember(&mut view.history, event);
        }
        let emitter = self.object.signal_emitter();
        let interface = self.object.get().await;
        if let Err(e) = interface.failure_history_changed(emitter).await {
            tracing::warn!("cannot emit PropertiesChanged: {e}");
        }
    }

    /// Records a failure, publishes it, and emits DriveFailed.
    async fn fail(&mut self, drive: &Name, failed: Failed) {
        tracing::error!("{drive}: {} failed: {}", failed.stage, failed.message);
        if let Some(entry) = self.entries.get_mut(drive) {
            entry.state = State::Failed;
            entry.message = failed.message.clone();
        }
        self.failures
            .record(Failure {
                subject: drive.to_string(),
                time: unix_now(),
                stage: failed.stage.to_string(),
                message: failed.message.clone(),
            })
            .await;
        self.publish().await;
        self.remember_failure(drive, &failed).await;
        let emitter = self.object.signal_emitter();
        if let Err(e) =
            CryptInterface::drive_failed(emitter, drive.as_str(), failed.stage, &failed.message)
                .await
        {
            tracing::error!("cannot emit DriveFailed: {e}");
        }
    }

    /// Applies a finished operation.
    async fn finished(&mut self, done: Done) {
        let Some(entry) = self.entries.get_mut(&done.drive) else {
            return;
        };
        entry.running = false;
        let removed = std::mem::take(&mut entry.removed_meanwhile);
        let sync_lost = std::mem::take(&mut entry.sync_lost);
        let drive = done.drive;
        match (done.operation, done.result) {
            (Operation::Open | Operation::Hold | Operation::Reopen, Ok(())) if removed => {
                entry.in_use = true;
                tracing::warn!("{drive}: removed while it was being opened");
                return self.start(&drive, Operation::Remove).await;
            }
            (Operation::Hold, Ok(())) => {
                entry.in_use = true;
                entry.state = State::Held;
                entry.message.clear();
                let mountpoint = entry.plan.mountpoint.to_string_lossy().into_owned();
                tracing::info!("{drive}: held read-only at {mountpoint} until Close");
                self.publish().await;
                let emitter = self.object.signal_emitter();
                if let Err(e) =
                    CryptInterface::drive_held(emitter, drive.as_str(), &mountpoint).await
                {
                    tracing::error!("cannot emit DriveHeld: {e}");
                }
            }
            (Operation::Open | Operation::Reopen, Ok(())) => {
                entry.in_use = true;
                entry.state = State::Open;
                entry.message.clear();
                let mountpoint = entry.plan.mountpoint.to_string_lossy().into_owned();
                tracing::info!("{drive}: open at {mountpoint}");
                self.publish().await;
                self.announce_opened(&drive, &mountpoint).await;
            }
            (Operation::Close, Ok(())) if sync_lost => {
                entry.in_use = false;
                let closed_on = entry.device.as_deref().map(|device| (device, &entry.uuid));
                self.closed.set(drive.as_str(), closed_on);
                let failed = Failed {
                    stage: "sync",
                    message: format!(
                        "ferry-sync stopped (crashed or was killed) during the sync of {drive} without a result; the drive was closed (unmounted and locked) and the copy on it is the previous complete one; see ferry-sync's log (journalctl -u ferry-sync), then plug the drive in again"
                    ),
                };
                self.fail(&drive, failed).await;
            }
            (Operation::Close, Ok(())) => {
                entry.in_use = false;
                entry.state = match entry.device {
                    Some(_) => State::Closed,
                    None => State::Absent,
                };
                entry.message.clear();
                let closed_on = entry.device.as_deref().map(|device| (device, &entry.uuid));
                self.closed.set(drive.as_str(), closed_on);
                tracing::info!("{drive}: closed (unmounted and locked)");
                self.publish().await;
                let emitter = self.object.signal_emitter();
                if let Err(e) = CryptInterface::drive_closed(emitter, drive.as_str()).await {
                    tracing::error!("cannot emit DriveClosed: {e}");
                }
            }
            (Operation::Close, Err(failed)) if removed => {
                tracing::warn!("{drive}: removed while closing: {}", failed.message);
                return self.start(&drive, Operation::Remove).await;
            }
            (operation, Err(failed)) => {
                // A failed open undid itself; a failed close (also the
                // undoing part of a reopen) left the drive mounted (or
                // unlocked); a removal detached everything.
                entry.in_use = operation == Operation::Close || failed.stage == "close";
                self.fail(&drive, failed).await;
            }
            (Operation::Remove, Ok(())) => {}
        }
    }

    /// Reacts to a peer's signal.
    async fn signal(&mut self, message: &zbus::Message) {
        let (drive, trigger) =
            if let Some(s) = drive_watcher::DriveAttached::from_message(message.clone()) {
                let Ok(args) = s.args() else { return };
                let Some(entry) = self.entries.get_mut(args.drive) else {
                    return;
                };
                if !entry.uuid.matches(args.uuid) {
                    tracing::warn!(
                        "DriveAttached for {} with UUID {:?}, not the enrolled one; ignored",
                        args.drive,
                        args.uuid
                    );
                    return;
                }
                let was_absent = entry.device.is_none();
                if was_absent {
                    self.closed.set(args.drive, None);
                }
                entry.device = Some(args.device.to_string());
                if entry.state == State::Absent {
                    entry.state = State::Attached;
                }
                (args.drive.to_string(), Trigger::Attached { was_absent })
            } else if let Some(s) = drive_watcher::DriveDetached::from_message(message.clone()) {
                let Ok(args) = s.args() else { return };
                let Some(entry) = self.entries.get_mut(args.drive) else {
                    return;
                };
                entry.device = None;
                self.closed.set(args.drive, None);
                if entry.running {
                    entry.removed_meanwhile = true;
                } else if !entry.in_use {
                    entry.state = State::Absent;
                }
                (args.drive.to_string(), Trigger::Detached)
            } else if let Some(s) = sync::SyncFinished::from_message(message.clone()) {
                let Ok(args) = s.args() else { return };
                (args.drive.to_string(), Trigger::SyncDone)
            } else if let Some(s) = sync::SyncFailed::from_message(message.clone()) {
                let Ok(args) = s.args() else { return };
                (args.drive.to_string(), Trigger::SyncDone)
            } else {
                return;
            };
        let Ok(drive) = Name::new(&drive) else { return };
        let Some(entry) = self.entries.get(&drive) else {
            return;
        };
        tracing::debug!("{drive}: {trigger:?} in state {}", entry.state.as_str());
        match entry.reaction(trigger) {
            Some(operation) => self.start(&drive, operation).await,
            None => self.publish().await,
        }
    }

    /// The sync worker lost its bus name: every drive open for a flow is
    /// closed, and its flow ends red.
    async fn sync_lost(&mut self) {
        let waiting: Vec<Name> = self
            .entries
            .iter()
            .filter(|(_, e)| e.reaction(Trigger::SyncLost).is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for drive in waiting {
            tracing::error!("{drive}: ferry-sync went away during its sync; closing the drive");
            if let Some(entry) = self.entries.get_mut(&drive) {
                entry.sync_lost = true;
            }
            self.start(&drive, Operation::Close).await;
        }
    }

    /// Accepts or refuses a method call; accepted work starts at once.
    async fn request(&mut self, request: Request, drive: &str) -> Result<(), FerryError> {
        let known = Name::new(drive)
            .ok()
            .filter(|n| self.entries.contains_key(n));
        let Some(name) = known else {
            let enrolled: Vec<&str> = self.entries.keys().map(Name::as_str).collect();
            return Err(FerryError::UnknownDrive(format!(
                "no drive named \"{}\" is enrolled in ferry.toml (enrolled: {})",
                drive.escape_debug(),
                if enrolled.is_empty() {
                    "none".into()
                } else {
                    enrolled.join(", ")
                }
            )));
        };
        let Some(entry) = self.entries.get_mut(&name) else {
            return Ok(());
        };
        if entry.running {
            return Err(FerryError::Busy(format!(
                "drive {name} is {} now; wait for DriveOpened, DriveClosed or DriveFailed",
                entry.state.as_str()
            )));
        }
        match request {
            Request::Close => self.start(&name, Operation::Close).await,
            Request::Open { hold } => {
                if entry.device.is_none() {
                    entry.device = devices::device_by_uuid(&entry.uuid);
                }
                if entry.device.is_none() {
                    return Err(FerryError::NotAttached(format!(
                        "drive {name} is not plugged in (no device has UUID {})",
                        entry.uuid
                    )));
                }
                if entry.in_use && entry.state == State::Held && hold {
                    let mountpoint = entry.plan.mountpoint.to_string_lossy().into_owned();
                    let emitter = self.object.signal_emitter();
                    if let Err(e) =
                        CryptInterface::drive_held(emitter, name.as_str(), &mountpoint).await
                    {
                        tracing::error!("cannot emit DriveHeld: {e}");
                    }
                } else if entry.in_use && (entry.state == State::Held || hold) {
                    return Err(FerryError::Busy(format!(
                        "drive {name} is {} now; close it first, then open it {}",
                        entry.state.as_str(),
                        if hold { "with hold" } else { "without hold" }
                    )));
                } else if entry.in_use && entry.state == State::Open {
                    // Already open: say so again for whoever asked.
                    let mountpoint = entry.plan.mountpoint.to_string_lossy().into_owned();
                    self.announce_opened(&name, &mountpoint).await;
                } else if entry.in_use {
                    return Err(FerryError::Busy(format!(
                        "drive {name} is still mounted or unlocked after a failure; close it first"
                    )));
                } else if hold {
                    self.start(&name, Operation::Hold).await;
                } else {
                    self.start(&name, Operation::Open).await;
                }
            }
        }
        Ok(())
    }
}

/// Which devices the enrolled drives are attached as: the watcher's view
/// when it is on the bus, else udev's.
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
    match tokio::time::timeout(PEER_TIMEOUT, from_watcher).await {
        Ok(Ok(drives)) => {
            tracing::info!("attached drives from the drive watcher");
            drives
                .into_iter()
                .filter(|d| d.attached && !d.device.is_empty())
                .map(|d| (d.name, d.device))
                .collect()
        }
        outcome => {
            let why = match outcome {
                Ok(Err(e)) => e.to_string(),
                _ => "no answer".into(),
            };
            tracing::info!("the drive watcher is not available ({why}); asking udev");
            config
                .drives
                .iter()
                .filter_map(|(name, d)| Some((name.to_string(), devices::device_by_uuid(&d.uuid)?)))
                .collect()
        }
    }
}

/// Runs ferry-crypt on `connection` until `shutdown` resolves.
pub async fn run(
    connection: zbus::Connection,
    config: Arc<Config>,
    shutdown: Shutdown,
) -> Result<(), ServiceError> {
    let view = Arc::new(Mutex::new(View::default()));
    let (commands, mut requests) = mpsc::channel(16);
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
    let mut signals = subscribe(&connection, &[drive_watcher::INTERFACE, sync::INTERFACE]).await?;
    let mut sync_owner = zbus::fdo::DBusProxy::new(&connection)
        .await?
        .receive_name_owner_changed_with_args(&[(0, sync::BUS_NAME)])
        .await?;
    let attached = attached_devices(&connection, &config).await;

    let (done, mut finished) = mpsc::channel(16);
    let mut service = Service {
        closed: ClosedMarkers::load(&config),
        entries: BTreeMap::new(),
        failures: failures::FailureLog::load(&config.state_directory),
        view,
        object,
        done,
    };
    let mut to_start = Vec::new();
    let mut adopted = Vec::new();
    for (name, drive) in &config.drives {
        let mut plan = Plan::new(name, drive, &config.crypt);
        plan.health.ledger = Some(ferry_service::health_ledger::path(&config.state_directory));
        let device = attached.get(name.as_str()).cloned();
        plan.device = device.as_ref().map(PathBuf::from);
        let mut entry = Entry {
            uuid: drive.uuid.clone(),
            open_on_attach: drive.open_on_attach,
            state: if device.is_some() {
                State::Attached
            } else {
                State::Absent
            },
            device,
            message: String::new(),
            running: false,
            in_use: false,
            removed_meanwhile: false,
            sync_lost: false,
            plan,
        };
        match ops::inspect(&entry.plan) {
            Leftover::Nothing
                if entry
                    .device
                    .as_deref()
                    .is_some_and(|d| service.closed.is_closed(name.as_str(), d, &entry.uuid)) =>
            {
                // Closed after its flow before the restart and still plugged
                // in: "safe to remove" was said; never mount it again unasked.
                tracing::info!(
                    "{name}: closed before the restart and still attached; it stays closed"
                );
                entry.state = State::Closed;
            }
            Leftover::Nothing if entry.device.is_some() => {
                // Plugged in while nobody was listening: as if announced now.
                if let Some(operation) = entry.reaction(Trigger::Attached { was_absent: true }) {
                    to_start.push((name.clone(), operation));
                }
            }
            Leftover::Nothing => service.closed.set(name.as_str(), None),
            Leftover::Adopt => {
                // inspect() proved the token again; announcing it lets the
                // flow (sync, then close) go on.
                tracing::info!(
                    "{name}: found open at {} from before a restart; adopted it (it stays open) and announcing it again",
                    entry.plan.mountpoint.display()
                );
                entry.state = State::Open;
                entry.in_use = true;
                adopted.push(name.clone());
            }
            Leftover::Close(reason) => {
                entry.in_use = true;
                // Attached and opening on attach: its open was interrupted,
                // so open it again from scratch, never report it closed.
                let operation = match entry.device {
                    Some(_) if entry.open_on_attach => Operation::Reopen,
                    Some(_) => Operation::Close,
                    None => Operation::Remove,
                };
                let action = match operation {
                    Operation::Reopen => "opening it again from scratch",
                    _ => "closing it",
                };
                tracing::warn!(
                    "{name}: found left behind from before a restart ({reason}); {action}"
                );
                to_start.push((name.clone(), operation));
            }
        }
        service.entries.insert(name.clone(), entry);
    }
    if config.drives.is_empty() {
        tracing::warn!("no drives are enrolled in the configuration; nothing to open");
    }
    service.publish().await;
    claim_name(&connection, crypt::BUS_NAME, crypt::OBJECT_PATH).await?;
    for name in adopted {
        if let Some(entry) = service.entries.get(&name) {
            let mountpoint = entry.plan.mountpoint.to_string_lossy().into_owned();
            service.announce_opened(&name, &mountpoint).await;
        }
    }
    for (name, operation) in to_start {
        service.start(&name, operation).await;
    }

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            message = signals.next() => {
                let Some(message) = message else {
                    return Err(ServiceError::Other("the bus connection closed".into()));
                };
                if let Ok(message) = message {
                    service.signal(&message).await;
                }
            }
            Some(command) = requests.recv() => {
                let answer = service.request(command.request, &command.drive).await;
                let _ = command.reply.send(answer);
            }
            Some(done) = finished.recv() => service.finished(done).await,
            Some(changed) = sync_owner.next() => {
                let gone = changed.args().is_ok_and(|a| a.new_owner().is_none());
                if gone {
                    service.sync_lost().await;
                }
            }
        }
    }
    let open: Vec<&str> = service
        .entries
        .iter()
        .filter(|(_, e)| e.in_use)
        .map(|(n, _)| n.as_str())
        .collect();
    if !open.is_empty() {
        tracing::info!(
            "stopping with {} still open; the next start adopts or closes them",
            open.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: State, in_use: bool, running: bool) -> Entry {
        let config = Config::parse(
            "[drives.a]\nuuid = \"abcd-1234\"\n",
            std::path::Path::new("ferry.toml"),
        )
        .expect("config");
        let (name, drive) = config.drives.iter().next().expect("drive");
        Entry {
            plan: Plan::new(name, drive, &config.crypt),
            uuid: drive.uuid.clone(),
            open_on_attach: true,
            state,
            device: None,
            message: String::new(),
            running,
            in_use,
            removed_meanwhile: false,
            sync_lost: false,
        }
    }

    #[test]
    fn plugging_in_opens_but_a_repeated_announcement_does_not() {
        let fresh = Trigger::Attached { was_absent: true };
        let again = Trigger::Attached { was_absent: false };
        assert_eq!(
            entry(State::Absent, false, false).reaction(fresh),
            Some(Operation::Open)
        );
        assert_eq!(
            entry(State::Attached, false, false).reaction(again),
            Some(Operation::Open)
        );
        assert_eq!(entry(State::Closed, false, false).reaction(again), None);
        assert_eq!(entry(State::Failed, false, false).reaction(again), None);
        assert_eq!(
            entry(State::Failed, false, false).reaction(fresh),
            Some(Operation::Open)
        );
        assert_eq!(entry(State::Open, true, false).reaction(again), None);
        assert_eq!(entry(State::Opening, false, true).reaction(fresh), None);
        let mut manual = entry(State::Absent, false, false);
        manual.open_on_attach = false;
        assert_eq!(manual.reaction(fresh), None);
    }

    #[test]
    fn removal_and_sync_results_close_only_what_is_in_use() {
        assert_eq!(
            entry(State::Open, true, false).reaction(Trigger::Detached),
            Some(Operation::Remove)
        );
        assert_eq!(
            entry(State::Attached, false, false).reaction(Trigger::Detached),
            None
        );
        assert_eq!(
            entry(State::Open, true, false).reaction(Trigger::SyncDone),
            Some(Operation::Close)
        );
        assert_eq!(
            entry(State::Failed, true, false).reaction(Trigger::SyncDone),
            Some(Operation::Close)
        );
        assert_eq!(
            entry(State::Closed, false, false).reaction(Trigger::SyncDone),
            None
        );
        assert_eq!(
            entry(State::Closing, true, true).reaction(Trigger::SyncDone),
            None
        );
    }

    #[test]
    fn a_lost_sync_worker_closes_only_drives_open_for_a_flow() {
        let lost = Trigger::SyncLost;
        assert_eq!(
            entry(State::Open, true, false).reaction(lost),
            Some(Operation::Close)
        );
        assert_eq!(entry(State::Opening, false, true).reaction(lost), None);
        assert_eq!(entry(State::Closing, true, true).reaction(lost), None);
        assert_eq!(entry(State::Closed, false, false).reaction(lost), None);
        assert_eq!(entry(State::Failed, true, false).reaction(lost), None);
        assert_eq!(entry(State::Attached, false, false).reaction(lost), None);
    }
}
