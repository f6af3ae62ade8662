//! org.ferry.Notifier1 on the bus: checks arguments and callers, hands the
//! work to the service loop ([`crate::run`]) as a [`Command`], and maps the
//! loop's typed errors once to the named org.ferry errors
//! ([`RequestError::into_bus_error`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferry_interfaces::{DeadLetter, Error as FerryError};
use ferry_service::caller;
use tokio::sync::{mpsc, oneshot};
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedValue;

use crate::compose::{self, ComposeError};
use crate::domain::Refusal;
use crate::journal::{self, BadUnitName};
use crate::outbox::ResendError;

/// What the properties show; written by the loop, read by the interface.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Messages waiting in both outboxes.
    pub pending: u32,
    /// Dead letters in both outboxes.
    pub dead_letters: u32,
    /// The last delivery error, empty after a success.
    pub last_error: String,
}

/// Why a mail could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// No `[mail]`.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The draft does not make a message.
    #[error(transparent)]
    Compose(#[from] ComposeError),
    /// The outbox cannot be written: NOT QUEUED.
    #[error("cannot write to the outbox {}: {source}", dir.display())]
    Spool {
        /// The outbox folder.
        dir: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Why a method call on org.ferry.Notifier1 failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The mail is not queued.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// UnitFailed's argument.
    #[error(transparent)]
    BadUnit(#[from] BadUnitName),
    /// An option the method does not have.
    #[error("{method} has no option `{key}`; pass an empty a{{sv}} (busctl: 0)")]
    NoSuchOption {
        /// The method.
        method: &'static str,
        /// The key given (one line, shortened).
        key: String,
    },
    /// ResendDeadLetter's argument is not an id at all.
    #[error("`{0}` is not an event id; take one from ListDeadLetters")]
    NotAnId(String),
    /// No dead letter has that id.
    #[error("no dead letter has the id `{0}`; ListDeadLetters shows them")]
    NoDeadLetter(String),
    /// The dead letter cannot be put back.
    #[error(transparent)]
    Resend(#[from] ResendError),
    /// The loop is gone.
    #[error("the notifier is shutting down")]
    Stopping,
}

impl RequestError {
    /// The one mapping to the named org.ferry errors.
    pub fn into_bus_error(self) -> FerryError {
        let words = self.to_string();
        match self {
            RequestError::BadUnit(_)
            | RequestError::NoSuchOption { .. }
            | RequestError::NotAnId(_) => FerryError::InvalidArgument(words),
            RequestError::NoDeadLetter(_) => FerryError::NotFound(words),
            RequestError::Queue(_) | RequestError::Resend(_) | RequestError::Stopping => {
                FerryError::Failed(words)
            }
        }
    }
}

impl From<RequestError> for FerryError {
    fn from(e: RequestError) -> FerryError {
        e.into_bus_error()
    }
}

/// A reply to a request that queues a mail: its event id.
pub type Reply = oneshot::Sender<Result<String, RequestError>>;

/// What the interface asks of the service loop.
pub enum Command {
    /// SendTest.
    Test(Reply),
    /// UnitFailed, with the unit's journal lines.
    UnitFailed {
        /// The unit (checked).
        unit: String,
        /// Its journal lines.
        journal: String,
        /// The answer.
        reply: Reply,
    },
    /// Flush.
    Flush,
    /// ListDeadLetters.
    ListDead(oneshot::Sender<Vec<DeadLetter>>),
    /// ResendDeadLetter.
    Resend {
        /// The dead letter's id (checked to be a file name).
        id: String,
        /// The answer.
        reply: oneshot::Sender<Result<(), RequestError>>,
    },
}

/// The options of a method that takes `a{sv}`: none are defined yet, so
/// any key is refused with a sentence saying so.
fn no_options(
    method: &'static str,
    options: &HashMap<String, OwnedValue>,
) -> Result<(), RequestError> {
    match options.keys().next() {
        None => Ok(()),
        Some(key) => Err(RequestError::NoSuchOption {
            method,
            key: compose::one_line(key, 64),
        }),
    }
}

/// The org.ferry.Notifier1 object: checks arguments and callers, hands the
/// work to the loop.
pub struct NotifierInterface {
    commands: mpsc::Sender<Command>,
    view: Arc<Mutex<View>>,
}

impl NotifierInterface {
    /// The interface, sending to the loop on `commands`, showing `view`.
    pub fn new(commands: mpsc::Sender<Command>, view: Arc<Mutex<View>>) -> NotifierInterface {
        NotifierInterface { commands, view }
    }

    fn view(&self) -> View {
        self.view.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Sends a command and waits for its answer.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| RequestError::Stopping)?;
        answer.await.map_err(|_| RequestError::Stopping)
    }
}

#[zbus::interface(name = "org.ferry.Notifier1")]
impl NotifierInterface {
    /// Queue a test message; returns its event id.
    #[zbus(out_args("id"))]
    async fn send_test(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<String, FerryError> {
        caller::authorize(conn, &header).await?;
        Ok(self.ask(Command::Test).await??)
    }

    /// A systemd unit failed; mail it with its journal lines.
    #[zbus(out_args("id"))]
    async fn unit_failed(
        &self,
        unit: &str,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<String, FerryError> {
        journal::check_unit_name(unit).map_err(RequestError::from)?;
        caller::authorize(conn, &header).await?;
        let journal = journal::recent_lines(unit).await;
        let unit = unit.to_string();
        Ok(self
            .ask(|reply| Command::UnitFailed {
                unit,
                journal,
                reply,
            })
            .await??)
    }

    /// Try every pending message now.
    async fn flush(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<(), FerryError> {
        caller::authorize(conn, &header).await?;
        self.commands
            .send(Command::Flush)
            .await
            .map_err(|_| RequestError::Stopping.into_bus_error())
    }

    /// The dead letters, oldest first.
    #[zbus(out_args("letters"))]
    async fn list_dead_letters(
        &self,
        options: HashMap<String, OwnedValue>,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<Vec<DeadLetter>, FerryError> {
        no_options("ListDeadLetters", &options)?;
        caller::authorize(conn, &header).await?;
        Ok(self.ask(Command::ListDead).await?)
    }

    /// Puts a dead letter back into the outbox.
    async fn resend_dead_letter(
        &self,
        id: &str,
        options: HashMap<String, OwnedValue>,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<(), FerryError> {
        no_options("ResendDeadLetter", &options)?;
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(RequestError::NotAnId(compose::one_line(id, 64)).into());
        }
        caller::authorize(conn, &header).await?;
        let id = id.to_string();
        Ok(self.ask(|reply| Command::Resend { id, reply }).await??)
    }

    /// Messages waiting in the outbox.
    #[zbus(property)]
    async fn pending(&self) -> u32 {
        self.view().pending
    }

    /// Messages refused for good.
    #[zbus(property)]
    async fn dead_letters(&self) -> u32 {
        self.view().dead_letters
    }

    /// The last delivery error, empty after a success.
    #[zbus(property)]
    async fn last_error(&self) -> String {
        self.view().last_error
    }

    /// The server accepted a message.
    #[zbus(signal)]
    pub async fn notification_sent(
        emitter: &SignalEmitter<'_>,
        id: &str,
        subject: &str,
    ) -> zbus::Result<()>;

    /// A message was written to the outbox.
    #[zbus(signal)]
    pub async fn notification_queued(
        emitter: &SignalEmitter<'_>,
        id: &str,
        reason: &str,
    ) -> zbus::Result<()>;
}
