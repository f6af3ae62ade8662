//! What every ferry service does the same way, written once.
//!
//! A ferry service is a binary whose `main` only wires the outside world
//! (command line, config file, logging, the system bus, signals, sd_notify)
//! and then calls the service's own `run(connection, config, shutdown)`.
//! Tests call that same `run` in-process with a private bus and their own
//! shutdown future, or run the binary; both paths go through this crate.

mod args;
pub mod caller;
pub mod confined;
pub mod durable;
pub mod health_ledger;
pub mod history;
pub mod host;
mod logging;
pub mod notify;
pub mod process;
mod shutdown;
pub mod strict;
mod udev_monitor;
pub mod user;

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ferry_config::Config;
use zbus::fdo::RequestNameFlags;
use zbus::names::WellKnownName;

pub use args::Args;
pub use logging::init_logging;
pub use shutdown::{shutdown_signal, Shutdown};
pub use udev_monitor::UdevMonitor;
pub use user::Bus;

/// How long any D-Bus method call may take before it fails. Nothing on the
/// bus times out by default; ferry never waits forever.
pub const METHOD_TIMEOUT: Duration = Duration::from_secs(25);

/// How long a service waits for a peer's answer when it rebuilds its view
/// from the peers' properties (at start, or when a peer gets a new owner).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(3);

/// A peer's answer within [`PEER_TIMEOUT`], or None when the peer is not on
/// the bus or does not answer in time (logged): a service that starts
/// without a peer goes on without its state, never waits forever.
pub async fn peer_answer<T>(call: impl Future<Output = zbus::Result<T>>) -> Option<T> {
    match tokio::time::timeout(PEER_TIMEOUT, call).await {
        Ok(Ok(value)) => Some(value),
        Ok(Err(e)) => {
            tracing::debug!("peer not available: {e}");
            None
        }
        Err(_) => {
            tracing::warn!("a peer did not answer within {PEER_TIMEOUT:?}; going on without it");
            None
        }
    }
}

/// Exit code for a configuration error (sysexits EX_CONFIG); the unit's
/// RestartPreventExitStatus keeps systemd from restarting into it.
pub const EXIT_CONFIG: u8 = 78;
/// Exit code when the bus cannot be reached or the name is taken (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// A service failed; the message is logged and the process exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The bus connection or a bus call failed.
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
    /// Another program already owns the service's bus name.
    #[error(
        "{0} is already owned by another program on this bus; stop it first (busctl status {0})"
    )]
    NameTaken(String),
    /// Anything else, already phrased for a person.
    #[error("{0}")]
    Other(String),
}

impl From<zbus::fdo::Error> for ServiceError {
    fn from(e: zbus::fdo::Error) -> Self {
        ServiceError::Bus(e.into())
    }
}

/// Connects to the system bus (DBUS_SYSTEM_BUS_ADDRESS when set, so tests
/// can point a service at a private daemon), with [`METHOD_TIMEOUT`] on every call.
pub async fn connect_system_bus() -> Result<zbus::Connection, ServiceError> {
    Ok(zbus::connection::Builder::system()?
        .method_timeout(METHOD_TIMEOUT)
        .build()
        .await?)
}

/// Connects to the user's session bus (DBUS_SESSION_BUS_ADDRESS, else
/// `$XDG_RUNTIME_DIR/bus`), with [`METHOD_TIMEOUT`] on every call.
pub async fn connect_session_bus() -> Result<zbus::Connection, ServiceError> {
    Ok(zbus::connection::Builder::session()?
        .method_timeout(METHOD_TIMEOUT)
        .build()
        .await?)
}

/// Connects to the bus at `address` with [`METHOD_TIMEOUT`] on every call.
pub async fn connect_address(address: &str) -> Result<zbus::Connection, ServiceError> {
    Ok(zbus::connection::Builder::address(address)?
        .method_timeout(METHOD_TIMEOUT)
        .build()
        .await?)
}

/// Requests the service's well-known name once its objects are served, so a
/// call by name can never reach a missing object, then tells systemd the
/// service is ready. Fails if another program owns the name.
///
/// `object_path` is an object the service serves. zbus starts its object
/// server lazily on a connection it did not build, and a call that arrives
/// before that task listens is dropped; so first the service calls itself
/// (Peer.Ping on `object_path`) until the object server answers.
pub async fn claim_name(
    connection: &zbus::Connection,
    name: &str,
    object_path: &str,
) -> Result<(), ServiceError> {
    wait_for_object_server(connection, object_path).await?;
    let well_known = WellKnownName::try_from(name).map_err(zbus::Error::from)?;
    let reply = zbus::fdo::DBusProxy::new(connection)
        .await?
        .request_name(well_known, RequestNameFlags::DoNotQueue.into())
        .await?;
    match reply {
        zbus::fdo::RequestNameReply::PrimaryOwner | zbus::fdo::RequestNameReply::AlreadyOwner => {
            tracing::info!("ready: owns {name}");
            notify::ready();
            Ok(())
        }
        _ => Err(ServiceError::NameTaken(name.to_string())),
    }
}

async fn wait_for_object_server(
    connection: &zbus::Connection,
    object_path: &str,
) -> Result<(), ServiceError> {
    let me = connection
        .unique_name()
        .ok_or_else(|| ServiceError::Other("the bus gave this connection no name".into()))?
        .to_owned();
    for _ in 0..100 {
        let ping = connection.call_method(
            Some(me.as_ref()),
            object_path,
            Some("org.freedesktop.DBus.Peer"),
            "Ping",
            &(),
        );
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(50), ping).await {
            return Ok(());
        }
    }
    Err(ServiceError::Other(format!(
        "the object server never answered on {object_path}"
    )))
}

/// The whole of a service binary's `main`: arguments, logging, config, the
/// system bus, sd_notify and signals around the service's `run`.
///
/// `run` gets the connection, the checked configuration and a future that
/// resolves when the service should stop (SIGTERM or SIGINT). `--user` is
/// refused: only [`main_on_either_bus`] services have a user-level form.
pub fn main<F, Fut>(service: &'static str, run: F) -> ExitCode
where
    F: FnOnce(zbus::Connection, Arc<Config>, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), ServiceError>>,
{
    serve_main(service, false, |connection, config, shutdown, _| {
        run(connection, config, shutdown)
    })
}

/// [`main`] for a service that also runs as a user's own service: with
/// `--user` it goes on the session bus, reads `~/.config/ferry/ferry.toml`
/// and keeps its state under `~/.local/state/ferry` ([`user`]); `run`
/// learns which bus it is on.
pub fn main_on_either_bus<F, Fut>(service: &'static str, run: F) -> ExitCode
where
    F: FnOnce(zbus::Connection, Arc<Config>, Shutdown, Bus) -> Fut,
    Fut: Future<Output = Result<(), ServiceError>>,
{
    serve_main(service, true, run)
}

fn serve_main<F, Fut>(service: &'static str, user_capable: bool, run: F) -> ExitCode
where
    F: FnOnce(zbus::Connection, Arc<Config>, Shutdown, Bus) -> Fut,
    Fut: Future<Output = Result<(), ServiceError>>,
{
    let args = match Args::parse(service, std::env::args().skip(1)) {
        Ok(args) => args,
        Err(exit) => return exit,
    };
    if args.user && !user_capable {
        eprintln!("{service}: --user: {service} runs on the system bus only (ferry-borg is the one service with a user-level form)");
        return ExitCode::from(64);
    }
    init_logging(service);
    let bus = args.bus();
    let config = match Config::load(&args.config()) {
        Ok(mut config) => {
            if bus == Bus::Session {
                let state = user::user_state_directory(&config.state_directory);
                match ferry_config::AbsolutePath::try_from(state) {
                    Ok(state) => config.state_directory = state,
                    Err(e) => tracing::warn!("keeping the configured state directory: {e}"),
                }
            }
            Arc::new(config)
        }
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("{service}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{service}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let connected = match bus {
            Bus::System => connect_system_bus().await,
            Bus::Session => connect_session_bus().await,
        };
        let connection = match connected {
            Ok(c) => c,
            Err(e) => {
                let which = match bus {
                    Bus::System => "the system bus",
                    Bus::Session => "the session bus (is DBUS_SESSION_BUS_ADDRESS set, or does the user manager run?)",
                };
                tracing::error!("cannot connect to {which}: {e}");
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        };
        let _watchdog = notify::spawn_watchdog();
        let result = run(connection, config, shutdown_signal(), bus).await;
        notify::stopping();
        match result {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e @ ServiceError::NameTaken(_)) => {
                tracing::error!("{e}");
                ExitCode::from(EXIT_UNAVAILABLE)
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Seconds since the unix epoch, for timestamps on the bus and in state files.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Waits until `due`, or forever when nothing is due: the one timer in a
/// service's `select!` loop, so an idle service sleeps without waking.
pub async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// A stream of every signal of the given ferry interfaces, whoever sends it,
/// in the order the bus delivered them.
///
/// Subscribers match on interface (and then member), never on the sender,
/// so a replacement program owning the same bus name works. One match rule
/// (every signal under /org/ferry) feeds one stream, so signals of different
/// interfaces keep their order: SyncFailed is seen before the DriveClosed
/// that follows it. The match rule is registered before this returns: no
/// signal sent afterwards is missed. The stream must be read continuously;
/// a stalled stream stalls the bus connection.
pub async fn subscribe(
    connection: &zbus::Connection,
    interfaces: &[&'static str],
) -> Result<
    impl futures_util::Stream<Item = zbus::Result<zbus::Message>> + Unpin + Send + 'static,
    ServiceError,
> {
    use futures_util::StreamExt;
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .path_namespace("/org/ferry")?
        .build();
    let stream = zbus::MessageStream::for_match_rule(rule, connection, Some(1024)).await?;
    let wanted: Vec<&'static str> = interfaces.to_vec();
    Ok(stream.filter(move |message| {
        let keep = match message {
            Ok(message) => message
                .header()
                .interface()
                .is_some_and(|i| wanted.contains(&i.as_str())),
            Err(_) => true,
        };
        std::future::ready(keep)
    }))
}

/// [`subscribe`], decoded: every org.ferry signal of `interfaces` as one
/// [`ferry_interfaces::FerrySignal`], in bus order. A message that is not
/// a signal of the contract is skipped; one that claims to be but breaks
/// it (a wrong body), or that cannot be read, is logged and skipped. The
/// stream ends when the connection closes.
pub async fn subscribe_signals(
    connection: &zbus::Connection,
    interfaces: &[&'static str],
) -> Result<
    impl futures_util::Stream<Item = ferry_interfaces::FerrySignal> + Unpin + Send + 'static,
    ServiceError,
> {
    use futures_util::StreamExt;
    let decode = |message: zbus::Result<zbus::Message>| {
        let decoded = match message {
            Ok(message) => ferry_interfaces::FerrySignal::from_message(&message),
            Err(e) => {
                tracing::warn!("cannot read a message from the bus: {e}");
                return std::future::ready(None);
            }
        };
        std::future::ready(decoded.unwrap_or_else(|e| {
            tracing::warn!("ignoring a peer's signal: {e}");
            None
        }))
    };
    Ok(subscribe(connection, interfaces).await?.filter_map(decode))
}

/// Hands a request from a D-Bus method to the service's own loop and waits
/// for the loop's answer: the interface object stays thin, the loop owns
/// the state. `make` builds the command around the reply channel. When the
/// loop is gone (the service is stopping) the caller is told so.
pub async fn ask_loop<Command, Answer>(
    loop_commands: &tokio::sync::mpsc::Sender<Command>,
    service: &str,
    make: impl FnOnce(tokio::sync::oneshot::Sender<Result<Answer, ferry_interfaces::Error>>) -> Command,
) -> Result<Answer, ferry_interfaces::Error> {
    let stopping = || {
        ferry_interfaces::Error::Failed(format!(
            "{service} is shutting down; try again when it is back"
        ))
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    loop_commands
        .send(make(reply))
        .await
        .map_err(|_| stopping())?;
    answer.await.map_err(|_| stopping())?
}

/// Serves `interface` at `path` on `connection` and returns the handle the
/// service loop emits signals and property changes through.
pub async fn serve<I: zbus::object_server::Interface>(
    connection: &zbus::Connection,
    path: &str,
    interface: I,
) -> Result<Served<I>, ServiceError> {
    let strict = strict::Strict::new(interface);
    connection.object_server().at(path, strict).await?;
    Ok(connection
        .object_server()
        .interface::<_, strict::Strict<I>>(path)
        .await?)
}

/// A served interface: wrong calls get the standard D-Bus errors
/// ([`strict`]); it dereferences to the interface itself.
pub type Served<I> = zbus::object_server::InterfaceRef<strict::Strict<I>>;
