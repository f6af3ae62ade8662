//! ferry-led: one LED that tells a person what ferry is doing.
//!
//! It owns org.ferry.Led1. It listens to the other services' signals (by
//! interface, never by sender, so any program speaking the contract works),
//! keeps one state ([`state`]) and shows its colour through a backend
//! ([`output`]). On start it asks the peers' properties what is going on
//! instead of waiting for signals it missed: what is attached and running,
//! and the failures they persisted ([`state::PeerFacts`]). The time of the
//! last Acknowledge is kept in `<state-directory>/led/acknowledged`, so an
//! acknowledged failure does not come back after a restart. Drive health
//! warnings come from Crypt1.Health (its PropertiesChanged, subscribed to
//! like the signals, by interface and path, never by sender). A BlinkStick that is missing or
//! unplugged is logged and written again when udev says a hidraw device
//! appeared: no polling.
//!
//! The rules are [`state`]'s (pure, tested without a bus); this module is
//! the adapter: it decodes the peers' signals ([`FerrySignal`]) into
//! [`Event`]s, carries out method calls, and writes the colour — a HID
//! write or a file append, on a blocking thread, so a wedged device never
//! stalls the service's runtime.

pub mod blinkstick;
pub mod output;
pub mod state;

use ferry_service::peer_answer;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_config::{Color, Config, LedColors};
use ferry_interfaces::{borg, crypt, drive_watcher, led, sync, Error as FerryError, FerrySignal};
use ferry_service::caller::authorize;
use ferry_service::{claim_name, subscribe_signals, ServiceError, Shutdown};
use futures_util::StreamExt;
use output::Output;
use state::{DrivePolicy, Event, Indicator, LedState, PeerFacts};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use zbus::object_server::SignalEmitter;

/// How long each colour shows during Test.
const TEST_STEP: Duration = Duration::from_millis(700);

/// What the properties show; written by the loop, read by the interface.
#[derive(Debug, Clone)]
struct View {
    color: String,
    state: String,
    reason: String,
    backend: &'static str,
    device_present: bool,
}

/// A method call handed to the loop, with where its answer goes.
enum Command {
    /// Acknowledge: answered once the acknowledgement is recorded.
    Acknowledge(oneshot::Sender<Result<(), FerryError>>),
    /// Test: answered once the cycle is started (or refused).
    Test(oneshot::Sender<Result<(), FerryError>>),
}

/// The org.ferry.Led1 object: thin; the loop owns the state and the device.
pub struct LedInterface {
    commands: mpsc::Sender<Command>,
    view: Arc<Mutex<View>>,
}

impl LedInterface {
    fn view(&self) -> Option<View> {
        self.view.lock().ok().map(|v| v.clone())
    }
}

#[zbus::interface(name = "org.ferry.Led1")]
impl LedInterface {
    /// A person has seen the failure: leave the failed state.
    async fn acknowledge(
        &self,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<(), FerryError> {
        authorize(connection, &header).await?;
        ferry_service::ask_loop(&self.commands, "ferry-led", Command::Acknowledge).await
    }

    /// Show each state's colour in turn, then the current state again.
    async fn test(
        &self,
        #[zbus(connection)] connection: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<(), FerryError> {
        authorize(connection, &header).await?;
        ferry_service::ask_loop(&self.commands, "ferry-led", Command::Test).await
    }

    /// The colour shown now, #rrggbb.
    #[zbus(property)]
    async fn color(&self) -> String {
        self.view().map(|v| v.color).unwrap_or_default()
    }

    /// idle, working, done or failed.
    #[zbus(property)]
    async fn state(&self) -> String {
        self.view().map(|v| v.state).unwrap_or_default()
    }

    /// Why the LED is in its state.
    #[zbus(property)]
    async fn reason(&self) -> String {
        self.view().map(|v| v.reason).unwrap_or_default()
    }

    /// blinkstick, file or none.
    #[zbus(property)]
    async fn backend(&self) -> String {
        self.view()
            .map(|v| v.backend.to_string())
            .unwrap_or_default()
    }

    /// Whether the backend's device can be written now.
    #[zbus(property)]
    async fn device_present(&self) -> bool {
        self.view().map(|v| v.device_present).unwrap_or(false)
    }

    /// The LED changed colour (the Rust name avoids a clash with the Color
    /// property's own `color_changed`).
    #[zbus(signal, name = "ColorChanged")]
    async fn announce_color(
        emitter: &SignalEmitter<'_>,
        color: &str,
        state: &str,
    ) -> zbus::Result<()>;
}

/// What a colour on the LED stands for: ColorChanged's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shown {
    /// The indicator's state.
    State(LedState),
    /// `test`: one colour of the Test cycle.
    Test,
}

impl Shown {
    /// The wire name.
    fn as_str(self) -> &'static str {
        match self {
            Shown::State(state) => state.as_str(),
            Shown::Test => "test",
        }
    }
}

/// The service loop's own state.
struct Lamp {
    indicator: Indicator,
    colors: LedColors,
    /// The backend, used only on blocking threads (one write at a time).
    output: Arc<Mutex<Output>>,
    /// Whether the backend's device was there at the last write.
    present: bool,
    view: Arc<Mutex<View>>,
    object: ferry_service::Served<LedInterface>,
    /// The colour last written, with what it stands for.
    shown: Option<(Color, Shown)>,
    /// Remaining Test colours and when the next one is due.
    test: VecDeque<Color>,
    test_due: Option<Instant>,
    /// Where the time of the last Acknowledge is kept.
    acknowledged: PathBuf,
}

impl Lamp {
    fn color_of(&self, state: LedState) -> Color {
        match state {
            LedState::Idle => self.colors.idle,
            LedState::Working => self.colors.working,
            LedState::Done => self.colors.done,
            LedState::Failed => self.colors.failed,
        }
    }

    /// Shows the indicator's state, unless a test is running.
    async fn refresh(&mut self) {
        if self.test_due.is_some() {
            return;
        }
        let state = self.indicator.state();
        self.show(self.color_of(state), Shown::State(state), false)
            .await;
    }

    /// Writes a colour when it differs from what is shown (or `force`),
    /// updates the properties and emits ColorChanged.
    async fn show(&mut self, color: Color, shown: Shown, force: bool) {
        let changed = self.shown != Some((color, shown));
        let label = shown.as_str();
        if changed || force {
            let (written, present) = write_color(&self.output, color, label).await;
            self.present = present;
            if let Err(e) = written {
                tracing::warn!(
                    "LED: {e}; the state stays on the bus and is shown when the device is back"
                );
            }
        }
        let reason = self.indicator.reason();
        let present = self.present;
        if let Ok(mut view) = self.view.lock() {
            view.color = color.to_hex();
            if let Shown::State(state) = shown {
                view.state = state.as_str().to_string();
            }
            view.reason = reason;
            view.device_present = present;
        }
        let emitter = self.object.signal_emitter();
        let interface = self.object.get().await;
        for sent in [
            interface.color_changed(emitter).await,
            interface.state_changed(emitter).await,
            interface.reason_changed(emitter).await,
            interface.device_present_changed(emitter).await,
        ] {
            if let Err(e) = sent {
                tracing::warn!("cannot emit PropertiesChanged: {e}");
            }
        }
        if changed {
            tracing::info!("LED {} ({label})", color.to_hex());
            self.shown = Some((color, shown));
            if let Err(e) = LedInterface::announce_color(emitter, &color.to_hex(), label).await {
                tracing::warn!("cannot emit ColorChanged: {e}");
            }
        }
    }

    fn start_test(&mut self) -> Result<(), FerryError> {
        if self.test_due.is_some() {
            return Err(FerryError::Busy(
                "a test is already running; wait a few seconds".into(),
            ));
        }
        self.test = VecDeque::from([
            self.colors.working,
            self.colors.done,
            self.colors.failed,
            self.colors.idle,
        ]);
        self.test_due = Some(Instant::now());
        Ok(())
    }

    async fn test_step(&mut self) {
        match self.test.pop_front() {
            Some(color) => {
                self.test_due = Some(Instant::now() + TEST_STEP);
                self.show(color, Shown::Test, false).await;
            }
            None => {
                self.test_due = None;
                self.refresh().await;
            }
        }
    }
}

/// Why a write of the colour did not happen at all.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Output(#[from] output::OutputError),
    #[error("the write to the LED stopped unexpectedly: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Shows `color` through `output` on a blocking thread; returns the
/// outcome and whether the device is there afterwards.
async fn write_color(
    output: &Arc<Mutex<Output>>,
    color: Color,
    label: &str,
) -> (Result<(), WriteError>, bool) {
    let output = output.clone();
    let label = label.to_string();
    let written = tokio::task::spawn_blocking(move || {
        let mut output = output
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (output.show(color, &label), output.present())
    })
    .await;
    match written {
        Ok((shown, present)) => (shown.map_err(WriteError::from), present),
        Err(e) => (Err(e.into()), false),
    }
}

/// Runs the LED service on `connection` until `shutdown` resolves.
pub async fn run(
    connection: zbus::Connection,
    config: Arc<Config>,
    shutdown: Shutdown,
) -> Result<(), ServiceError> {
    // Opening the BlinkStick enumerates HID devices: off the runtime.
    let settings = config.led.clone();
    let output = tokio::task::spawn_blocking(move || Output::from_config(&settings))
        .await
        .map_err(|e| ServiceError::Other(format!("cannot set up the LED backend: {e}")))?;
    let present = output.present();
    let view = Arc::new(Mutex::new(View {
        color: config.led.colors.idle.to_hex(),
        state: LedState::Idle.as_str().into(),
        reason: String::new(),
        backend: output.name(),
        device_present: present,
    }));
    let (commands, requests) = mpsc::channel(8);
    let object = ferry_service::serve(
        &connection,
        led::OBJECT_PATH,
        LedInterface {
            commands,
            view: view.clone(),
        },
    )
    .await?;

    // Subscribe first, then read the peers: nothing falls between the two.
    let signals = subscribe_signals(
        &connection,
        &[
            drive_watcher::INTERFACE,
            crypt::INTERFACE,
            sync::INTERFACE,
            borg::INTERFACE,
        ],
    )
    .await?;
    let health = crypt_health_changes(&connection).await?;
    let hotplug = match &output {
        Output::BlinkStick(_) => hidraw_monitor(),
        _ => None,
    };
    let acknowledged = config.state_directory.join("led").join("acknowledged");
    let mut lamp = Lamp {
        indicator: Indicator::default(),
        colors: config.led.colors.clone(),
        output: Arc::new(Mutex::new(output)),
        present,
        view,
        object,
        shown: None,
        test: VecDeque::new(),
        test_due: None,
        acknowledged: acknowledged.clone(),
    };
    let since = read_acknowledged(acknowledged).await;
    lamp.start(&connection, drive_policies(&config), since)
        .await;
    claim_name(&connection, led::BUS_NAME, led::OBJECT_PATH).await?;

    let events = Events {
        peers_restarting: peer_owner_changes(&connection).await?,
        signals,
        health,
        requests,
        hotplug,
    };
    serve_loop(&connection, &mut lamp, events, shutdown).await
}

/// Where the loop's events come from.
struct Events<S> {
    peers_restarting: zbus::MessageStream,
    signals: S,
    /// PropertiesChanged of org.ferry.Crypt1.
    health: zbus::MessageStream,
    requests: mpsc::Receiver<Command>,
    hotplug: Option<ferry_service::UdevMonitor>,
}

impl Lamp {
    /// The indicator the peers' properties describe, shown.
    async fn start(
        &mut self,
        connection: &zbus::Connection,
        policies: BTreeMap<String, DrivePolicy>,
        acknowledged: u64,
    ) {
        let facts = peer_facts(connection, acknowledged).await;
        self.indicator = Indicator::from_peers(policies, &facts);
        if self.indicator.state() == LedState::Failed {
            tracing::info!(
                "failures the peers still report: {}",
                self.indicator.reason()
            );
        }
        self.refresh().await;
    }

    /// A peer (re)started: what it was doing before is gone or in its
    /// properties now; ask instead of guessing.
    async fn peer_restarted(&mut self, connection: &zbus::Connection, peer: &str) {
        tracing::info!("{peer} has a new owner; reading the peers' state again");
        let facts = peer_facts(connection, 0).await;
        self.indicator = self.indicator.rebuilt(&facts);
        self.refresh().await;
    }

    /// A peer's signal, applied if the LED acts on it.
    async fn signal(&mut self, signal: FerrySignal) {
        if let Some(event) = Event::from_signal(signal) {
            self.apply(event).await;
        }
    }

    /// Applies a peer's fact and shows the outcome.
    async fn apply(&mut self, event: Event) {
        tracing::debug!("{event:?}");
        self.indicator.apply(event);
        self.refresh().await;
    }

    /// A method call handed over by the interface.
    async fn command(&mut self, command: Command) {
        match command {
            Command::Acknowledge(reply) => {
                let now = ferry_service::unix_now();
                write_acknowledged(&self.acknowledged, now).await;
                self.indicator.apply(Event::Acknowledge);
                self.indicator.acknowledged_at(now);
                let _ = reply.send(Ok(()));
                self.refresh().await;
            }
            Command::Test(reply) => {
                let _ = reply.send(self.start_test());
            }
        }
    }
}

/// The service loop: peers restarting, their signals, method calls, the
/// Test's steps and a replugged BlinkStick, until `shutdown`.
async fn serve_loop<S>(
    connection: &zbus::Connection,
    lamp: &mut Lamp,
    mut events: Events<S>,
    shutdown: Shutdown,
) -> Result<(), ServiceError>
where
    S: futures_util::Stream<Item = FerrySignal> + Unpin,
{
    let closed = || ServiceError::Other("the bus connection closed".into());
    tokio::pin!(shutdown);
    loop {
        let test_due = lamp.test_due;
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            change = events.peers_restarting.next() => {
                let change = change.ok_or_else(closed)?;
                if let Some(peer) = change.ok().as_ref().and_then(peer_that_started) {
                    lamp.peer_restarted(connection, &peer).await;
                }
            }
            message = events.signals.next() => lamp.signal(message.ok_or_else(closed)?).await,
            changed = events.health.next() => {
                let changed = changed.ok_or_else(closed)?;
                if let Some(readings) = changed.ok().as_ref().and_then(health_in) {
                    lamp.apply(Event::Health(readings)).await;
                }
            }
            Some(command) = events.requests.recv() => lamp.command(command).await,
            _ = ferry_service::sleep_until(test_due), if test_due.is_some() => lamp.test_step().await,
            added = hidraw_added(events.hotplug.as_mut()), if events.hotplug.is_some() => {
                if added {
                    tracing::info!("a hidraw device appeared; writing the LED again");
                    if let Some((color, shown)) = lamp.shown {
                        lamp.show(color, shown, true).await;
                    }
                }
            }
        }
    }
}

/// A udev monitor for hidraw devices, so a replugged BlinkStick is written
/// again the moment it appears.
fn hidraw_monitor() -> Option<ferry_service::UdevMonitor> {
    ferry_service::UdevMonitor::listen("hidraw")
        .map_err(|e| tracing::warn!("cannot listen to udev for a replugged BlinkStick: {e}"))
        .ok()
}

/// Waits for hidraw events; true when a device was added.
async fn hidraw_added(monitor: Option<&mut ferry_service::UdevMonitor>) -> bool {
    let Some(monitor) = monitor else {
        return std::future::pending().await;
    };
    match monitor.next_events().await {
        Ok(events) => events
            .iter()
            .any(|e| e.event_type() == udev::EventType::Add),
        Err(e) => {
            tracing::warn!("udev hidraw socket: {e}");
            std::future::pending().await
        }
    }
}

/// NameOwnerChanged for every org.ferry name: a peer started or went away.
async fn peer_owner_changes(
    connection: &zbus::Connection,
) -> Result<zbus::MessageStream, ServiceError> {
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender("org.freedesktop.DBus")?
        .interface("org.freedesktop.DBus")?
        .member("NameOwnerChanged")?
        .arg0ns("org.ferry")?
        .build();
    Ok(zbus::MessageStream::for_match_rule(rule, connection, Some(64)).await?)
}

/// PropertiesChanged of org.ferry.Crypt1 (matched on interface, path and
/// arg0, never on the sender, like every subscription of ferry's).
async fn crypt_health_changes(
    connection: &zbus::Connection,
) -> Result<zbus::MessageStream, ServiceError> {
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.freedesktop.DBus.Properties")?
        .member("PropertiesChanged")?
        .path(crypt::OBJECT_PATH)?
        .add_arg(crypt::INTERFACE)?
        .build();
    Ok(zbus::MessageStream::for_match_rule(rule, connection, Some(64)).await?)
}

/// The readings in a PropertiesChanged of Crypt1 that carries Health.
fn health_in(message: &zbus::Message) -> Option<Vec<ferry_interfaces::DriveHealth>> {
    type Changed = (
        String,
        std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
        Vec<String>,
    );
    let (interface, changed, _): Changed = message.body().deserialize().ok()?;
    if interface != crypt::INTERFACE {
        return None;
    }
    let value = changed.get("Health")?.try_clone().ok()?;
    match Vec::<ferry_interfaces::DriveHealth>::try_from(value) {
        Ok(readings) => Some(readings),
        Err(e) => {
            tracing::warn!("Crypt1.Health breaks the contract: {e}");
            None
        }
    }
}

/// The peer's bus name when a NameOwnerChanged says a peer (not this LED)
/// got a new owner.
fn peer_that_started(message: &zbus::Message) -> Option<String> {
    let (name, _old, new): (String, String, String) = message.body().deserialize().ok()?;
    (!new.is_empty() && name != led::BUS_NAME).then_some(name)
}

/// What the drives' configuration tells the LED.
fn drive_policies(config: &Config) -> BTreeMap<String, DrivePolicy> {
    config
        .drives
        .iter()
        .map(|(name, drive)| {
            (
                name.to_string(),
                DrivePolicy {
                    opens_on_attach: drive.open_on_attach,
                    powers_off: drive.power_off,
                },
            )
        })
        .collect()
}

/// The unix time of the last Acknowledge, 0 if none is recorded (read off
/// the runtime).
async fn read_acknowledged(path: PathBuf) -> u64 {
    tokio::task::spawn_blocking(move || read_acknowledged_now(&path))
        .await
        .unwrap_or_else(|e| {
            tracing::warn!("cannot read the last acknowledgement: {e}");
            0
        })
}

fn read_acknowledged_now(path: &Path) -> u64 {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(
                "{} does not hold a unix time; treating every failure as unacknowledged",
                path.display()
            );
            0
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => {
            tracing::warn!("cannot read {}: {e}", path.display());
            0
        }
    }
}

/// Records the Acknowledge at `time` durably (off the async runtime).
async fn write_acknowledged(path: &Path, time: u64) {
    let path = path.to_path_buf();
    let written = tokio::task::spawn_blocking(move || {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        ferry_service::durable::write_atomically(&path, format!("{time}\n").as_bytes(), 0o644)
            .map(|()| path)
    })
    .await;
    match written {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(
            "cannot record the acknowledgement: {e}; it holds until ferry-led restarts"
        ),
        Err(e) => tracing::warn!("cannot record the acknowledgement: {e}"),
    }
}

/// What the peers' properties say: what is attached and running, and the
/// failures and successes they persisted. A peer that is not on the bus (or
/// does not answer in time) contributes nothing.
async fn peer_facts(connection: &zbus::Connection, acknowledged: u64) -> PeerFacts {
    let mut facts = PeerFacts {
        acknowledged,
        ..PeerFacts::default()
    };
    if let Ok(proxy) = crypt::CryptProxy::builder(connection)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
    {
        facts.crypt_drives = peer_answer(proxy.drives()).await;
        if facts.crypt_drives.is_some() {
            facts
                .drive_failures
                .extend(peer_answer(proxy.last_failures()).await.unwrap_or_default());
            facts.drive_health = peer_answer(proxy.health()).await.unwrap_or_default();
        }
    }
    if facts.crypt_drives.is_none() {
        if let Ok(proxy) = drive_watcher::DriveWatcherProxy::builder(connection)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
        {
            for d in peer_answer(proxy.drives()).await.unwrap_or_default() {
                if d.attached {
                    facts.watcher_attached.push(d.name);
                }
            }
        }
    }
    if let Ok(proxy) = sync::SyncProxy::builder(connection)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
    {
        if let Some(running) = peer_answer(proxy.running()).await {
            facts.sync_running = running.into_iter().map(|j| j.drive).collect();
            for mut failure in peer_answer(proxy.last_failures()).await.unwrap_or_default() {
                failure.stage = format!("sync {}", failure.stage);
                facts.drive_failures.push(failure);
            }
            for record in peer_answer(proxy.last_syncs()).await.unwrap_or_default() {
                facts.drive_successes.insert(record.drive, record.time);
            }
        }
    }
    if let Ok(proxy) = borg::BorgProxy::builder(connection)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
    {
        if let Some(jobs) = peer_answer(proxy.jobs()).await {
            facts.backup_jobs = jobs.into_iter().map(|j| (j.job, j.profile)).collect();
            facts.backup_results = peer_answer(proxy.last_results()).await.unwrap_or_default();
            facts.backup_failures = peer_answer(proxy.last_failures()).await.unwrap_or_default();
            for entry in peer_answer(proxy.schedule()).await.unwrap_or_default() {
                facts
                    .backup_successes
                    .insert(entry.profile, entry.last_success);
            }
        }
    }
    facts
}
