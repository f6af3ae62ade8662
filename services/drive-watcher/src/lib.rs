//! ferry-drive-watcher: tells the bus when an enrolled drive is plugged in.
//!
//! It owns org.ferry.DriveWatcher1. The udev monitor socket is opened before
//! the coldplug enumeration, so a drive plugged in between the two is seen
//! by one or the other; the socket is driven by tokio (no polling), and the
//! service sleeps until the kernel has an event. Which devices count and when
//! to announce them is decided in [`tracker`]; this module moves udev events
//! in and D-Bus signals out.

pub mod tracker;

use std::sync::{Arc, Mutex};

use ferry_config::Config;
use ferry_interfaces::{drive_watcher, Error as FerryError, WatchedDrive};
use ferry_service::caller::authorize;
use ferry_service::{claim_name, unix_now, ServiceError, Shutdown};
use tokio::sync::{mpsc, oneshot};
use tracker::{Change, Observation, Tracker};
use zbus::object_server::SignalEmitter;

/// A request from the D-Bus interface to the service loop.
enum Command {
    /// The number of present drives, or why udev could not be enumerated.
    Rescan(oneshot::Sender<Result<u32, FerryError>>),
}

/// The org.ferry.DriveWatcher1 object: validates, hands work to the loop,
/// and shows the loop's snapshot as properties.
///
/// zbus holds the object's lock for the whole of a method call, and Rescan
/// waits for the loop; so the loop never locks the object for writing: it
/// updates the shared snapshot and only reads the object to emit signals.
pub struct DriveWatcherInterface {
    commands: mpsc::Sender<Command>,
    drives: Arc<Mutex<Vec<WatchedDrive>>>,
}

#[zbus::interface(name = "org.ferry.DriveWatcher1")]
impl DriveWatcherInterface {
    /// Enumerate block devices again and re-announce every present drive.
    #[zbus(out_args("present"))]
    async fn rescan(
        &self,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<u32, FerryError> {
        authorize(connection, &header).await?;
        ferry_service::ask_loop(&self.commands, "ferry-drive-watcher", Command::Rescan).await
    }

    /// Every enrolled drive: (name, uuid, attached, device, since).
    #[zbus(property)]
    async fn drives(&self) -> Vec<WatchedDrive> {
        self.drives.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// An enrolled drive appeared.
    #[zbus(signal)]
    async fn drive_attached(
        emitter: &SignalEmitter<'_>,
        drive: &str,
        device: &str,
        uuid: &str,
    ) -> zbus::Result<()>;

    /// An enrolled drive went away.
    #[zbus(signal)]
    async fn drive_detached(
        emitter: &SignalEmitter<'_>,
        drive: &str,
        uuid: &str,
    ) -> zbus::Result<()>;
}

/// Runs the drive watcher on `connection` until `shutdown` resolves.
pub async fn run(
    connection: zbus::Connection,
    config: Arc<Config>,
    shutdown: Shutdown,
) -> Result<(), ServiceError> {
    let (commands, mut requests) = mpsc::channel(8);
    let mut tracker = Tracker::new(&config);
    // Monitor first, then enumerate: nothing falls between the two.
    let mut monitor = ferry_service::UdevMonitor::listen("block")
        .map_err(|e| ServiceError::Other(format!("cannot listen to udev: {e}")))?;

    // Coldplug before the name is taken: whoever reads Drives as soon as
    // the name appears (a peer rebuilding its view after this watcher
    // restarted) sees every drive already plugged in, never an empty list.
    let coldplug = match enumerate().await {
        Ok(devices) => tracker.rescan(devices, unix_now()),
        Err(e) => {
            tracing::error!(
                "cannot enumerate block devices: {e}; drives already plugged in are announced on their next udev event or a Rescan"
            );
            Vec::new()
        }
    };
    let drives = Arc::new(Mutex::new(tracker.snapshot()));
    let interface = DriveWatcherInterface {
        commands,
        drives: drives.clone(),
    };
    let object = ferry_service::serve(&connection, drive_watcher::OBJECT_PATH, interface).await?;
    claim_name(
        &connection,
        drive_watcher::BUS_NAME,
        drive_watcher::OBJECT_PATH,
    )
    .await?;
    if config.drives.is_empty() {
        tracing::warn!("no drives are enrolled in the configuration; nothing will be announced");
    }
    // Then announce them (DriveAttached for each).
    publish(&object, &drives, &tracker, coldplug).await;

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            events = monitor.next_events() => {
                let events = events
                    .map_err(|e| ServiceError::Other(format!("udev socket failed: {e}")))?;
                let changes = events
                    .iter()
                    .flat_map(|event| {
                        tracing::debug!("udev {:?} {:?}", event.event_type(), event.syspath());
                        let removed = event.event_type() == udev::EventType::Remove;
                        tracker.observe(observation(event, removed), unix_now())
                    })
                    .collect();
                publish(&object, &drives, &tracker, changes).await;
            }
            Some(Command::Rescan(reply)) = requests.recv() => {
                let answer = rescan(&mut tracker).await;
                if let Ok((_, changes)) = &answer {
                    publish(&object, &drives, &tracker, changes.clone()).await;
                }
                let _ = reply.send(answer.map(|(present, _)| present));
            }
        }
    }
    Ok(())
}

/// Rescan: what the tracker makes of udev's list now, and how many enrolled
/// drives are present. A failed enumeration knows nothing: it detaches
/// nothing.
async fn rescan(tracker: &mut Tracker) -> Result<(u32, Vec<Change>), FerryError> {
    match enumerate().await {
        Ok(devices) => {
            let changes = tracker.rescan(devices, unix_now());
            let present = u32::try_from(tracker.present_count()).unwrap_or(u32::MAX);
            Ok((present, changes))
        }
        Err(e) => {
            tracing::error!("cannot enumerate block devices: {e}; nothing changed");
            Err(FerryError::Failed(format!(
                "udev cannot enumerate block devices ({e}); nothing was detached or announced: check that systemd-udevd runs, then Rescan again"
            )))
        }
    }
}

/// [`enumerate_now`] off the runtime: udev reads sysfs and its database,
/// which must not hold up the bus answers.
async fn enumerate() -> std::io::Result<Vec<Observation>> {
    tokio::task::spawn_blocking(enumerate_now)
        .await
        .map_err(std::io::Error::other)?
}

/// Every block device udev knows now, or why udev could not say: a
/// failed enumeration must never be taken for "nothing is plugged in".
fn enumerate_now() -> std::io::Result<Vec<Observation>> {
    let mut enumerator = udev::Enumerator::new()?;
    enumerator.match_subsystem("block")?;
    Ok(enumerator
        .scan_devices()?
        .map(|d| observation(&d, false))
        .collect())
}

/// What the tracker needs from a udev device. Labels, serials and models are
/// never read; the UUID is only compared, never interpreted.
fn observation(device: &udev::Device, removed: bool) -> Observation {
    Observation {
        syspath: device.syspath().to_string_lossy().into_owned(),
        device: device
            .devnode()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
        uuid: device
            .property_value("ID_FS_UUID")
            .and_then(|v| v.to_str())
            .map(str::to_string),
        removed,
    }
}

/// Updates the Drives property, then emits the signals, so a subscriber
/// reacting to a signal reads a property that already agrees with it.
async fn publish(
    object: &ferry_service::Served<DriveWatcherInterface>,
    drives: &Mutex<Vec<WatchedDrive>>,
    tracker: &Tracker,
    changes: Vec<Change>,
) {
    if changes.is_empty() {
        return;
    }
    let emitter = object.signal_emitter();
    if let Ok(mut shown) = drives.lock() {
        *shown = tracker.snapshot();
    }
    if let Err(e) = object.get().await.drives_changed(emitter).await {
        tracing::warn!("cannot emit PropertiesChanged: {e}");
    }
    for change in changes {
        let sent = match &change {
            Change::Attached {
                drive,
                device,
                uuid,
            } => {
                tracing::info!("{drive} attached as {device:?} (UUID {uuid})");
                DriveWatcherInterface::drive_attached(emitter, drive, device, uuid).await
            }
            Change::Detached { drive, uuid } => {
                tracing::info!("{drive} detached (UUID {uuid})");
                DriveWatcherInterface::drive_detached(emitter, drive, uuid).await
            }
        };
        if let Err(e) = sent {
            tracing::error!("cannot emit {change:?}: {e}");
        }
    }
}
