//! The org.ferry.Crypt1 object: checks the caller, hands the request to the
//! service loop, and shows the loop's view as properties. It never waits
//! for an operation, only for the loop to accept or refuse it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferry_interfaces::{CryptDrive, DriveHealth, Error as FerryError, Failure, FailureEvent};
use ferry_service::caller;
use tokio::sync::{mpsc, oneshot};
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedValue;

use crate::domain::Request;

/// What the properties show; written by the loop, read by the interface.
#[derive(Debug, Default)]
pub(crate) struct View {
    pub drives: Vec<CryptDrive>,
    pub failures: Vec<Failure>,
    /// Crypt1.FailureHistory (in memory).
    pub history: Vec<FailureEvent>,
    /// Crypt1.Health: each drive's latest SMART reading, by drive.
    pub health: Vec<DriveHealth>,
}

/// A request from the interface to the loop, with where the answer goes.
pub(crate) struct Command {
    pub request: Request,
    pub drive: String,
    pub reply: oneshot::Sender<Result<(), FerryError>>,
}

/// The org.ferry.Crypt1 object.
pub struct CryptInterface {
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) view: Arc<Mutex<View>>,
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

    fn read<T>(&self, field: impl FnOnce(&View) -> T) -> Option<T> {
        self.view.lock().ok().map(|v| field(&v))
    }
}

/// OpenWith's options: "hold" (b) and nothing else.
fn hold_option(options: &HashMap<String, OwnedValue>) -> Result<bool, FerryError> {
    let mut hold = false;
    for (key, value) in options {
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
    Ok(hold)
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
        options: HashMap<String, OwnedValue>,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<(), FerryError> {
        caller::authorize(connection, &header).await?;
        let hold = hold_option(&options)?;
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
        self.read(|v| v.drives.clone()).unwrap_or_default()
    }

    /// The most recent failure of each drive: (drive, time, stage, message).
    #[zbus(property)]
    async fn last_failures(&self) -> Vec<Failure> {
        self.read(|v| v.failures.clone()).unwrap_or_default()
    }

    /// Every failure since the service started, oldest first, bounded.
    #[zbus(property)]
    async fn failure_history(&self) -> Vec<FailureEvent> {
        self.read(|v| v.history.clone()).unwrap_or_default()
    }

    /// Each drive's latest SMART health reading (see the XML).
    #[zbus(property)]
    async fn health(&self) -> Vec<DriveHealth> {
        self.read(|v| v.health.clone()).unwrap_or_default()
    }

    /// The drive is unlocked, mounted and proven to be ours.
    #[zbus(signal)]
    pub(crate) async fn drive_opened(
        emitter: &SignalEmitter<'_>,
        drive: &str,
        mountpoint: &str,
    ) -> zbus::Result<()>;

    /// The drive is open read-only for a person; nothing syncs it.
    #[zbus(signal)]
    pub(crate) async fn drive_held(
        emitter: &SignalEmitter<'_>,
        drive: &str,
        mountpoint: &str,
    ) -> zbus::Result<()>;

    /// The drive is unmounted and locked: safe to remove.
    #[zbus(signal)]
    pub(crate) async fn drive_closed(emitter: &SignalEmitter<'_>, drive: &str) -> zbus::Result<()>;

    /// Opening or closing failed.
    #[zbus(signal)]
    pub(crate) async fn drive_failed(
        emitter: &SignalEmitter<'_>,
        drive: &str,
        stage: &str,
        message: &str,
    ) -> zbus::Result<()>;
}
