//! What ferry-crypt decides, without doing any of it.
//!
//! The rules of the service live here, pure: one state per enrolled drive,
//! one operation per drive at a time, which peer signal or method call
//! starts which operation, what a finished operation makes of the drive,
//! and what a restart makes of what a predecessor left behind. Events come
//! in as method calls (a peer signal, a request, a finished operation, the
//! findings of a restart); effects go out as [`Effect`]s that the adapter
//! (`lib.rs`) carries out in order: start an operation, interrupt a
//! running close (the drive was pulled out), persist, publish the
//! properties, emit a signal. Nothing here touches the bus, a runtime, a
//! device or the disk, so every rule is unit-tested on its own, the way
//! ferry-drive-watcher's tracker is.
//!
//! Opening is one [`Operation`]; the work inside it (before opening, check
//! the drive's health; unlock; mount; prove identity) is [`crate::ops`]'s,
//! and a failure at any of those steps comes back as a [`Failed`] with its
//! [`CryptStage`]. Only `close` leaves something of the drive in place.

use std::collections::BTreeMap;

use ferry_config::{FsUuid, Name};
use ferry_interfaces::{CryptDrive, CryptStage, CryptState, Failure, FerrySignal};

/// An operation on one drive, run by the adapter as a tracked task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Check health, unlock, mount, prove identity; ends Open.
    Open,
    /// Open read-only for a person; ends in Held, announced with DriveHeld.
    Hold,
    /// Undo a predecessor's half-done open, then open; ends like Open.
    Reopen,
    /// Unmount and lock (and power off if configured).
    Close,
    /// The drive was pulled out while in use: detach lazily.
    Remove,
}

/// An operation failed at `stage`, with a sentence a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{stage} failed: {message}")]
pub struct Failed {
    /// Where it failed (DriveFailed's stage).
    pub stage: CryptStage,
    /// What went wrong and what to do.
    pub message: String,
}

impl Failed {
    /// A failure at `stage`.
    pub fn new(stage: CryptStage, message: impl Into<String>) -> Failed {
        Failed {
            stage,
            message: message.into(),
        }
    }
}

/// What a predecessor left behind for a drive, as found on start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    /// Nothing: the drive is closed.
    Nothing,
    /// Mounted, ours, proven and usable: keep it open.
    Adopt,
    /// Unlocked or mounted but not usable as it is: close it (the reason).
    Close(String),
}

/// A method call on org.ferry.Crypt1 that asks for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Open; `hold`: read-only for a person, no sync, until Close.
    Open { hold: bool },
    /// Close.
    Close,
}

/// Why a request is refused; the adapter maps each to its named D-Bus
/// error once ([`Refusal::into_bus_error`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// org.ferry.Error.UnknownDrive.
    #[error("no drive named \"{name}\" is enrolled in ferry.toml (enrolled: {enrolled})")]
    UnknownDrive { name: String, enrolled: String },
    /// org.ferry.Error.NotAttached.
    #[error("drive {drive} is not plugged in (no device has UUID {uuid})")]
    NotAttached { drive: Name, uuid: FsUuid },
    /// org.ferry.Error.Busy: an operation runs.
    #[error("drive {drive} is {state} now; wait for DriveOpened, DriveClosed or DriveFailed")]
    Running { drive: Name, state: CryptState },
    /// org.ferry.Error.Busy: open (or held) the other way.
    #[error(
        "drive {drive} is {state} now; close it first, then open it {}",
        if *hold { "with hold" } else { "without hold" }
    )]
    OpenedOtherwise {
        drive: Name,
        state: CryptState,
        hold: bool,
    },
    /// org.ferry.Error.Busy: a failure left it mounted or unlocked.
    #[error("drive {drive} is still mounted or unlocked after a failure; close it first")]
    LeftInUse { drive: Name },
}

impl Refusal {
    /// The named D-Bus error for this refusal.
    pub fn into_bus_error(self) -> ferry_interfaces::Error {
        use ferry_interfaces::Error as E;
        let message = self.to_string();
        match self {
            Refusal::UnknownDrive { .. } => E::UnknownDrive(message),
            Refusal::NotAttached { .. } => E::NotAttached(message),
            Refusal::Running { .. }
            | Refusal::OpenedOtherwise { .. }
            | Refusal::LeftInUse { .. } => E::Busy(message),
        }
    }
}

/// A signal of org.ferry.Crypt1 to emit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// DriveOpened(drive, mountpoint).
    Opened { drive: Name, mountpoint: String },
    /// DriveHeld(drive, mountpoint).
    Held { drive: Name, mountpoint: String },
    /// DriveClosed(drive).
    Closed { drive: Name },
    /// DriveFailed(drive, stage, message).
    Failed { drive: Name, failed: Failed },
}

/// What the adapter does, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Run `operation` on `drive` (as a tracked task); `device` is the
    /// drive's device node now, if known.
    Start {
        drive: Name,
        operation: Operation,
        device: Option<String>,
    },
    /// Write the closed markers durably (the whole map: drive → key).
    SaveClosed(BTreeMap<String, String>),
    /// The drive is gone while its close runs: the close stops retrying a
    /// busy mount and ends at once (the adapter tells the running task).
    /// It ends closed if it got there, else it fails and the drive is
    /// removed (lazily detached) as any pulled drive is.
    Interrupt { drive: Name },
    /// Record the failure durably (LastFailures, FailureHistory), before
    /// it is published.
    RecordFailure(Failure),
    /// The drives' states changed: update the properties.
    Publish,
    /// Emit a signal (after the property it follows was published).
    Emit(Signal),
}

/// One enrolled drive as configured.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub name: Name,
    pub uuid: FsUuid,
    pub open_on_attach: bool,
    /// Where the drive is mounted, as the kernel shows it.
    pub mountpoint: String,
}

/// What a restart found for one drive: where it is attached (the drive
/// watcher's or udev's view) and what is mounted or unlocked of it.
#[derive(Debug, Clone)]
pub struct Finding {
    pub drive: Name,
    pub device: Option<String>,
    pub leftover: Leftover,
}

/// An event that may start an operation.
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

/// One enrolled drive as the service sees it.
#[derive(Debug, Clone)]
struct Entry {
    uuid: FsUuid,
    open_on_attach: bool,
    mountpoint: String,
    state: CryptState,
    /// The device node while attached.
    device: Option<String>,
    message: String,
    /// The operation running now, if any.
    running: Option<Operation>,
    /// Something of the drive (a mount or a mapping) may still be in place.
    in_use: bool,
    /// The drive went away while an operation was running.
    removed_meanwhile: bool,
    /// After going away, the drive was plugged in again while an
    /// operation was still running: once nothing runs, it is opened as any
    /// plugged-in drive is (a plug-in is never lost to the end of the
    /// previous one's operation).
    plugged_meanwhile: bool,
    /// It is being closed because ferry-sync went away during its flow:
    /// the flow ends in a failure once it is closed.
    sync_lost: bool,
}

impl Entry {
    /// The operation `trigger` starts now, if any.
    fn reaction(&self, trigger: Trigger) -> Option<Operation> {
        if self.running.is_some() {
            return None;
        }
        match trigger {
            // A drive plugged in (or announced for the first time) opens;
            // a repeated announcement of one that is open, closed or failed
            // does not, or a Rescan would reopen a drive that is safe to
            // remove.
            Trigger::Attached { was_absent } => (self.open_on_attach
                && !self.in_use
                && (was_absent || self.state == CryptState::Attached))
                .then_some(Operation::Open),
            Trigger::Detached => self.in_use.then_some(Operation::Remove),
            // A held drive is a person's: a sync's result never closes it.
            Trigger::SyncDone => {
                (self.in_use && self.state != CryptState::Held).then_some(Operation::Close)
            }
            // Open and waiting for a sync result that will never come: the
            // flow must still end, closed and red.
            Trigger::SyncLost => {
                (self.in_use && self.state == CryptState::Open).then_some(Operation::Close)
            }
        }
    }
}

/// Every enrolled drive's state, and the closed markers: drives closed
/// after a flow and still plugged in ("safe to remove" was said), by name,
/// with their device and UUID, kept on disk so that a restarted
/// ferry-crypt does not take a drive a person was told to pull for a new
/// plug-in and mount it again. A drive leaves them when it is detached or
/// plugged in anew.
#[derive(Debug, Clone)]
pub struct Drives {
    entries: BTreeMap<Name, Entry>,
    closed: BTreeMap<String, String>,
}

/// What identifies the drive that was closed: its device and UUID.
fn closed_key(device: &str, uuid: &FsUuid) -> String {
    format!("{device} {}", uuid.normalized())
}

impl Drives {
    /// The enrolled drives, all absent, and the closed markers read back.
    pub fn new(enrolled: Vec<Enrolled>, closed: BTreeMap<String, String>) -> Drives {
        let entries = enrolled
            .into_iter()
            .map(|e| {
                let entry = Entry {
                    uuid: e.uuid,
                    open_on_attach: e.open_on_attach,
                    mountpoint: e.mountpoint,
                    state: CryptState::Absent,
                    device: None,
                    message: String::new(),
                    running: None,
                    in_use: false,
                    removed_meanwhile: false,
                    plugged_meanwhile: false,
                    sync_lost: false,
                };
                (e.name, entry)
            })
            .collect();
        Drives { entries, closed }
    }

    /// Crypt1.Drives.
    pub fn view(&self) -> Vec<CryptDrive> {
        self.entries
            .iter()
            .map(|(name, e)| CryptDrive {
                name: name.to_string(),
                state: e.state.as_str().to_string(),
                mountpoint: e.mountpoint.clone(),
                device: e.device.clone().unwrap_or_default(),
                message: if e.state == CryptState::Failed {
                    e.message.clone()
                } else {
                    String::new()
                },
            })
            .collect()
    }

    /// The drives that may still be mounted or unlocked.
    pub fn in_use(&self) -> Vec<&Name> {
        let used = self.entries.iter().filter(|(_, e)| e.in_use);
        used.map(|(n, _)| n).collect()
    }

    /// The UUID to look a device up by before a request on `drive`, when
    /// the drive is enrolled and its device is not known.
    pub fn needs_device(&self, drive: &str) -> Option<FsUuid> {
        let entry = self.entries.get(drive)?;
        entry.device.is_none().then(|| entry.uuid.clone())
    }

    /// Records the drive as closed on `device`, or forgets it (None).
    fn set_closed(
        &mut self,
        drive: &Name,
        closed_on: Option<(String, &FsUuid)>,
        effects: &mut Vec<Effect>,
    ) {
        let changed = match closed_on {
            Some((device, uuid)) => {
                let key = closed_key(&device, uuid);
                self.closed.insert(drive.to_string(), key.clone()) != Some(key)
            }
            None => self.closed.remove(drive.as_str()).is_some(),
        };
        if changed {
            effects.push(Effect::SaveClosed(self.closed.clone()));
        }
    }

    /// Marks `drive` busy with `operation` and says to start it.
    fn start(&mut self, drive: &Name, operation: Operation, effects: &mut Vec<Effect>) {
        let Some(entry) = self.entries.get_mut(drive) else {
            return;
        };
        entry.running = Some(operation);
        entry.state = match operation {
            Operation::Open | Operation::Hold | Operation::Reopen => CryptState::Opening,
            Operation::Close | Operation::Remove => CryptState::Closing,
        };
        effects.push(Effect::Start {
            drive: drive.clone(),
            operation,
            device: entry.device.clone(),
        });
        effects.push(Effect::Publish);
    }

    /// The failure effects: the drive is failed, the failure recorded,
    /// published, then signalled.
    fn fail(&mut self, drive: &Name, failed: Failed, now: u64, effects: &mut Vec<Effect>) {
        tracing::error!("{drive}: {} failed: {}", failed.stage, failed.message);
        if let Some(entry) = self.entries.get_mut(drive) {
            entry.state = CryptState::Failed;
            entry.message = failed.message.clone();
        }
        effects.push(Effect::RecordFailure(Failure {
            subject: drive.to_string(),
            time: now,
            stage: failed.stage.as_str().to_string(),
            message: failed.message.clone(),
        }));
        effects.push(Effect::Publish);
        effects.push(Effect::Emit(Signal::Failed {
            drive: drive.clone(),
            failed,
        }));
    }

    /// Reacts to a peer's signal.
    pub fn signal(&mut self, signal: &FerrySignal) -> Vec<Effect> {
        let mut effects = Vec::new();
        let (drive, trigger) = match signal {
            FerrySignal::DriveAttached {
                drive,
                device,
                uuid,
            } => match self.attached(drive, device, uuid, &mut effects) {
                Some(found) => found,
                None => return effects,
            },
            FerrySignal::DriveDetached { drive, .. } => match self.detached(drive, &mut effects) {
                Some(found) => found,
                None => return effects,
            },
            FerrySignal::SyncFinished { drive, .. } | FerrySignal::SyncFailed { drive, .. } => {
                let Some(name) = self.enrolled(drive) else {
                    return effects;
                };
                (name, Trigger::SyncDone)
            }
            _ => return effects,
        };
        self.react(&drive, trigger, &mut effects);
        effects
    }

    fn enrolled(&self, drive: &str) -> Option<Name> {
        self.entries.get_key_value(drive).map(|(n, _)| n.clone())
    }

    /// Starts what `trigger` starts on `drive`, else publishes.
    fn react(&mut self, drive: &Name, trigger: Trigger, effects: &mut Vec<Effect>) {
        let Some(entry) = self.entries.get(drive) else {
            return;
        };
        tracing::debug!("{drive}: {trigger:?} in state {}", entry.state);
        match entry.reaction(trigger) {
            Some(operation) => self.start(drive, operation, effects),
            None => effects.push(Effect::Publish),
        }
    }

    /// DriveAttached: the drive's device, if it is the enrolled UUID.
    fn attached(
        &mut self,
        drive: &str,
        device: &str,
        uuid: &str,
        effects: &mut Vec<Effect>,
    ) -> Option<(Name, Trigger)> {
        let name = self.enrolled(drive)?;
        let entry = self.entries.get(&name)?;
        if !entry.uuid.matches(uuid) {
            tracing::warn!(
                "DriveAttached for {drive} with UUID {uuid:?}, not the enrolled one; ignored"
            );
            return None;
        }
        let was_absent = entry.device.is_none();
        if was_absent {
            self.set_closed(&name, None, effects);
        }
        let entry = self.entries.get_mut(&name)?;
        entry.device = Some(device.to_string());
        if was_absent && entry.running.is_some() {
            entry.plugged_meanwhile = true;
        }
        if entry.state == CryptState::Absent {
            entry.state = CryptState::Attached;
        }
        Some((name, Trigger::Attached { was_absent }))
    }

    /// DriveDetached: the drive is gone.
    fn detached(&mut self, drive: &str, effects: &mut Vec<Effect>) -> Option<(Name, Trigger)> {
        let name = self.enrolled(drive)?;
        self.set_closed(&name, None, effects);
        let entry = self.entries.get_mut(&name)?;
        entry.device = None;
        entry.plugged_meanwhile = false;
        match entry.running {
            // A close waiting for a busy mount to be let go would retry
            // until its timeout for a device that is gone: it stops now,
            // and its end says what is true (closed, or removed).
            Some(Operation::Close) => {
                entry.removed_meanwhile = true;
                effects.push(Effect::Interrupt {
                    drive: name.clone(),
                });
            }
            Some(_) => entry.removed_meanwhile = true,
            None if !entry.in_use => entry.state = CryptState::Absent,
            None => {}
        }
        Some((name, Trigger::Detached))
    }

    /// The sync worker lost its bus name: every drive open for a flow is
    /// closed, and its flow ends red.
    pub fn sync_lost(&mut self) -> Vec<Effect> {
        let mut effects = Vec::new();
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
            self.start(&drive, Operation::Close, &mut effects);
        }
        effects
    }

    /// Accepts or refuses a method call; accepted work starts at once.
    /// `found` is the device the adapter looked up when
    /// [`Drives::needs_device`] asked for one.
    pub fn request(
        &mut self,
        drive: &str,
        request: Request,
        found: Option<String>,
    ) -> Result<Vec<Effect>, Refusal> {
        let Some(name) = self.enrolled(drive) else {
            let enrolled: Vec<&str> = self.entries.keys().map(Name::as_str).collect();
            return Err(Refusal::UnknownDrive {
                name: drive.escape_debug().to_string(),
                enrolled: match enrolled.is_empty() {
                    true => "none".into(),
                    false => enrolled.join(", "),
                },
            });
        };
        let mut effects = Vec::new();
        let Some(entry) = self.entries.get_mut(&name) else {
            return Ok(effects);
        };
        if entry.running.is_some() {
            return Err(Refusal::Running {
                drive: name,
                state: entry.state,
            });
        }
        let hold = match request {
            Request::Close => {
                self.start(&name, Operation::Close, &mut effects);
                return Ok(effects);
            }
            Request::Open { hold } => hold,
        };
        if entry.device.is_none() {
            entry.device = found;
        }
        if entry.device.is_none() {
            let uuid = entry.uuid.clone();
            return Err(Refusal::NotAttached { drive: name, uuid });
        }
        let mountpoint = entry.mountpoint.clone();
        match (entry.in_use, entry.state) {
            (true, CryptState::Held) if hold => effects.push(Effect::Emit(Signal::Held {
                drive: name,
                mountpoint,
            })),
            (true, state) if state == CryptState::Held || hold => {
                return Err(Refusal::OpenedOtherwise {
                    drive: name,
                    state,
                    hold,
                })
            }
            // Already open: say so again for whoever asked.
            (true, CryptState::Open) => effects.push(Effect::Emit(Signal::Opened {
                drive: name,
                mountpoint,
            })),
            (true, _) => return Err(Refusal::LeftInUse { drive: name }),
            (false, _) if hold => self.start(&name, Operation::Hold, &mut effects),
            (false, _) => self.start(&name, Operation::Open, &mut effects),
        }
        Ok(effects)
    }

    /// Applies a finished operation.
    pub fn finished(
        &mut self,
        drive: &Name,
        operation: Operation,
        result: Result<(), Failed>,
        now: u64,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let Some(entry) = self.entries.get_mut(drive) else {
            return effects;
        };
        entry.running = None;
        let removed = std::mem::take(&mut entry.removed_meanwhile);
        let sync_lost = std::mem::take(&mut entry.sync_lost);
        match (operation, result) {
            (Operation::Open | Operation::Hold | Operation::Reopen, Ok(())) if removed => {
                entry.in_use = true;
                tracing::warn!("{drive}: removed while it was being opened");
                self.start(drive, Operation::Remove, &mut effects);
            }
            (Operation::Open | Operation::Hold | Operation::Reopen, Ok(())) => {
                self.opened(drive, operation == Operation::Hold, &mut effects)
            }
            (Operation::Close, Ok(())) => self.closed(drive, sync_lost, now, &mut effects),
            (Operation::Close, Err(failed)) if removed => {
                tracing::warn!("{drive}: removed while closing: {}", failed.message);
                self.start(drive, Operation::Remove, &mut effects);
            }
            (operation, Err(failed)) => {
                // A failed open undid itself; a failed close (also the
                // undoing part of a reopen) left the drive mounted (or
                // unlocked); a removal detached everything.
                entry.in_use = operation == Operation::Close || failed.stage == CryptStage::Close;
                self.fail(drive, failed, now, &mut effects);
            }
            (Operation::Remove, Ok(())) => {}
        }
        self.plugged_in_meanwhile(drive, &mut effects);
        effects
    }

    /// Once nothing runs, a drive plugged in again while its previous
    /// operation ran is opened as a new plug-in: the end of the old
    /// operation (a failure, "removed", a close) has been said first, and
    /// the new flow's success is what clears it.
    fn plugged_in_meanwhile(&mut self, drive: &Name, effects: &mut Vec<Effect>) {
        let Some(entry) = self.entries.get_mut(drive) else {
            return;
        };
        if entry.running.is_some() || !std::mem::take(&mut entry.plugged_meanwhile) {
            return;
        }
        if entry.device.is_none() {
            return;
        }
        tracing::info!("{drive}: plugged in again while its last operation ran; opening it");
        if entry.state == CryptState::Absent {
            entry.state = CryptState::Attached;
        }
        self.set_closed(drive, None, effects);
        self.react(drive, Trigger::Attached { was_absent: true }, effects);
    }

    /// An open (or hold) succeeded.
    fn opened(&mut self, drive: &Name, held: bool, effects: &mut Vec<Effect>) {
        let Some(entry) = self.entries.get_mut(drive) else {
            return;
        };
        entry.in_use = true;
        entry.message.clear();
        let mountpoint = entry.mountpoint.clone();
        let drive = drive.clone();
        effects.push(Effect::Publish);
        if held {
            entry.state = CryptState::Held;
            tracing::info!("{drive}: held read-only at {mountpoint} until Close");
            effects.push(Effect::Emit(Signal::Held { drive, mountpoint }));
        } else {
            entry.state = CryptState::Open;
            tracing::info!("{drive}: open at {mountpoint}");
            effects.push(Effect::Emit(Signal::Opened { drive, mountpoint }));
        }
    }

    /// A close succeeded; after a lost sync worker the flow still fails.
    fn closed(&mut self, drive: &Name, sync_lost: bool, now: u64, effects: &mut Vec<Effect>) {
        let Some(entry) = self.entries.get_mut(drive) else {
            return;
        };
        entry.in_use = false;
        let uuid = entry.uuid.clone();
        let device = entry.device.clone();
        self.set_closed(drive, device.clone().map(|d| (d, &uuid)), effects);
        if sync_lost {
            let failed = Failed::new(
                CryptStage::Sync,
                format!(
                    "ferry-sync stopped (crashed or was killed) during the sync of {drive} without a result; the drive was closed (unmounted and locked) and the copy on it is the previous complete one; see ferry-sync's log (journalctl -u ferry-sync), then plug the drive in again"
                ),
            );
            return self.fail(drive, failed, now, effects);
        }
        if let Some(entry) = self.entries.get_mut(drive) {
            entry.state = match device {
                Some(_) => CryptState::Closed,
                None => CryptState::Absent,
            };
            entry.message.clear();
        }
        tracing::info!("{drive}: closed (unmounted and locked)");
        effects.push(Effect::Publish);
        effects.push(Effect::Emit(Signal::Closed {
            drive: drive.clone(),
        }));
    }

    /// Plans the restart from what was found: which drive is adopted (and
    /// announced again, so the flow goes on), which is opened again or
    /// closed, which stays closed. The effects are for after the bus name
    /// is claimed; the adapter publishes the properties first.
    pub fn recover(&mut self, findings: Vec<Finding>) -> Vec<Effect> {
        let mut effects = Vec::new();
        let mut announce = Vec::new();
        let mut to_start = Vec::new();
        for finding in findings {
            let drive = finding.drive;
            let Some(entry) = self.entries.get_mut(&drive) else {
                continue;
            };
            entry.state = match finding.device {
                Some(_) => CryptState::Attached,
                None => CryptState::Absent,
            };
            entry.device = finding.device;
            match finding.leftover {
                Leftover::Nothing => {
                    if let Some(op) = self.nothing_left(&drive, &mut effects) {
                        to_start.push((drive, op));
                    }
                }
                Leftover::Adopt => {
                    // inspect() proved the token again; announcing it lets
                    // the flow (sync, then close) go on.
                    tracing::info!(
                        "{drive}: found open at {} from before a restart; adopted it (it stays open) and announcing it again",
                        entry.mountpoint
                    );
                    entry.state = CryptState::Open;
                    entry.in_use = true;
                    let mountpoint = entry.mountpoint.clone();
                    announce.push(Effect::Emit(Signal::Opened { drive, mountpoint }));
                }
                Leftover::Close(reason) => {
                    entry.in_use = true;
                    // Attached and opening on attach: its open was
                    // interrupted, so open it again from scratch, never
                    // report it closed.
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
                        "{drive}: found left behind from before a restart ({reason}); {action}"
                    );
                    to_start.push((drive, operation));
                }
            }
        }
        effects.extend(announce);
        for (drive, operation) in to_start {
            self.start(&drive, operation, &mut effects);
        }
        effects
    }

    /// Nothing of `drive` is mounted or unlocked: it stays closed if it was
    /// closed on this device, else it is as if plugged in now.
    fn nothing_left(&mut self, drive: &Name, effects: &mut Vec<Effect>) -> Option<Operation> {
        let entry = self.entries.get_mut(drive)?;
        let Some(device) = entry.device.as_deref() else {
            self.set_closed(drive, None, effects);
            return None;
        };
        if self.closed.get(drive.as_str()) == Some(&closed_key(device, &entry.uuid)) {
            // Closed after its flow before the restart and still plugged
            // in: "safe to remove" was said; never mount it again unasked.
            tracing::info!(
                "{drive}: closed before the restart and still attached; it stays closed"
            );
            entry.state = CryptState::Closed;
            return None;
        }
        // Plugged in while nobody was listening: as if announced now.
        entry.reaction(Trigger::Attached { was_absent: true })
    }
}

#[cfg(test)]
mod tests;
