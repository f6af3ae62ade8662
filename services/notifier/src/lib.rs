//! ferry-notifier: every failure reaches a person by mail, even when the
//! mail server is down at the time, and stale drives are noticed.
//!
//! It owns org.ferry.Notifier1. It listens to the peers' failure and
//! success signals (by interface, never by sender). A failure signal, and
//! the start, make it read the peer's FailureHistory (every failure with a
//! unique id, bounded) and mail each entry whose id it has not mailed, so
//! every failure that happened while it was not running is mailed, not
//! only the last one per subject; a peer without a history is read through
//! its LastFailures and the signal's own arguments ([`ledger`] remembers
//! what was mailed). Mails are written by [`events`] and
//! [`compose`], spooled durably by [`outbox`] before any attempt, and sent
//! by [`deliver`] with retries. Staleness of drives and profiles and the
//! grouping and hourly limit are timers: the loop sleeps until the next due
//! moment ([`clock`] lets tests choose "now").
//!
//! Pushes are a second channel of the same service, not a seventh one:
//! they need exactly what mail has — the subscriptions, the FailureHistory
//! ledger that makes every failure count once across restarts, the
//! durable outbox with its in-doubt marks, the retry policy, the dead
//! letters on the bus — and another resident process would cost about as
//! much idle memory as the whole notifier. [`push`] decides what is pinged
//! and pushed, [`pushing`] delivers it over HTTP. [`metrics`] renders the
//! Prometheus textfile, rewritten after every change.
//!
//! The shape is the house's: [`domain`] holds every rule, pure (events in,
//! [`domain::Effect`]s out, unit-tested without a bus, a runtime or a
//! disk); this file is the adapter that moves events in (peer signals,
//! [`interface`] requests, delivery [`deliver::Report`]s, the timer) and
//! carries the effects out. [`peers`] reads what the domain asks for. The
//! two deliverers run as tracked tasks in a JoinSet; a deliverer that
//! ends (it never should) stops the service, so systemd restarts it and
//! the outbox is delivered again.

pub mod clock;
pub mod compose;
pub mod deliver;
pub mod domain;
pub mod events;
pub mod interface;
pub mod journal;
pub mod ledger;
pub mod metrics;
pub mod outbox;
pub mod peers;
pub mod push;
pub mod pushing;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clock::Clock;
use compose::Draft;
use deliver::{Deliverer, Report};
use domain::{Covers, Domain, Effect, Request, Settings};
use ferry_config::Config;
use ferry_interfaces::{borg, crypt, notifier, sync};
use ferry_service::{claim_name, ServiceError, Shutdown};
use futures_util::StreamExt;
use interface::{Command, NotifierInterface, QueueError, RequestError, View};
use ledger::Ledger;
use outbox::{off_runtime, Letter, Outbox};
use push::PushLetter;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// The service loop's state: the domain, and what carries its effects out.
struct Notifier {
    config: Arc<Config>,
    clock: Clock,
    domain: Domain,
    peers: peers::Peers,
    outbox: Outbox,
    /// The push outbox (`<state>/notifier/push`).
    pushes: Outbox<PushLetter>,
    /// The deliverers' handles: mail (with `[mail]`), push (with `[push]`).
    deliverer: Option<Deliverer>,
    pusher: Option<Deliverer>,
    ledger_path: PathBuf,
    view: Arc<Mutex<View>>,
    object: ferry_service::Served<NotifierInterface>,
}

/// How long a stopping service waits for the letters being settled.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// The letters one batch of effects spooled: (event id, reason) of each.
#[derive(Default)]
struct Spooled {
    mail: Vec<(String, String)>,
    push: Vec<(String, String)>,
}

/// What the loop waits on besides the peers' signals.
struct Inputs {
    requests: mpsc::Receiver<Command>,
    reports: mpsc::Receiver<Report>,
    /// The delivery tasks.
    tasks: JoinSet<&'static str>,
}

/// Runs the notifier on `connection` until `shutdown` resolves.
pub async fn run(
    connection: zbus::Connection,
    config: Arc<Config>,
    shutdown: Shutdown,
) -> Result<(), ServiceError> {
    let (mut notifier, mut inputs) = Notifier::start(&connection, config).await?;
    // Subscribe first, then read the peers: nothing falls between the two.
    // One match rule per interface, merged into one stream in arrival
    // order: SyncFinished (Sync1) is seen before the DriveClosed (Crypt1)
    // that follows it, as the summary needs.
    let mut signals = ferry_service::subscribe_signals(
        &connection,
        &[crypt::INTERFACE, sync::INTERFACE, borg::INTERFACE],
    )
    .await?;
    notifier.recover().await;
    claim_name(&connection, notifier::BUS_NAME, notifier::OBJECT_PATH).await?;

    tokio::pin!(shutdown);
    let result = loop {
        let due = notifier.next_due();
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            signal = signals.next() => {
                let Some(signal) = signal else {
                    break Err(ServiceError::Other("the bus connection closed".into()));
                };
                if let Some(event) = events::event_of(signal) {
                    tracing::debug!("{event:?}");
                    notifier.signal(event).await;
                }
            }
            Some(command) = inputs.requests.recv() => notifier.command(command).await,
            Some(report) = inputs.reports.recv() => notifier.report(report).await,
            Some(ended) = inputs.tasks.join_next() => {
                break Err(ServiceError::Other(format!(
                    "the {} deliverer stopped ({}); restarting the service delivers the outbox again",
                    ended.as_ref().map_or("mail or push", |what| what),
                    ended.err().map_or_else(|| "it returned".to_string(), |e| e.to_string())
                )));
            }
            _ = ferry_service::sleep_until(due), if due.is_some() => notifier.tick().await,
        }
    };
    notifier.stop_delivery(&mut inputs.tasks).await;
    result
}

impl Notifier {
    /// Opens the outboxes and the ledger, rebuilds the domain from them,
    /// serves the object and starts the deliverers.
    async fn start(
        connection: &zbus::Connection,
        config: Arc<Config>,
    ) -> Result<(Notifier, Inputs), ServiceError> {
        let clock = Clock::from_env().map_err(|e| ServiceError::Other(e.to_string()))?;
        let dir = config.state_directory.join("notifier");
        let (outbox, pushes, ledger, spooled) = open_state(dir.clone()).await?;
        if config.mail.is_none() {
            tracing::warn!("ferry.toml has no [mail] section: failures are logged but not mailed");
        }
        let settings = Settings {
            mail: config.mail.is_some(),
            push: config.push.clone(),
            notify: config.notify.clone(),
            drives: config.drives.keys().map(|n| n.to_string()).collect(),
            host: compose::hostname(),
        };
        let domain = Domain::rebuild(settings, ledger, spooled, clock.now());

        let view = Arc::new(Mutex::new(View::default()));
        let (commands, requests) = mpsc::channel(16);
        let interface = NotifierInterface::new(commands, view.clone());
        let object = ferry_service::serve(connection, notifier::OBJECT_PATH, interface).await?;

        let (report_tx, reports) = mpsc::channel(64);
        let mut tasks = JoinSet::new();
        let deliverer = config.mail.as_ref().map(|mail| {
            let (handle, task) = deliver::task(mail.clone(), outbox.clone(), report_tx.clone());
            tasks.spawn(async move {
                task.await;
                "mail"
            });
            handle
        });
        let pusher = config.push.as_ref().map(|push| {
            let (handle, task) = pushing::task(push.clone(), pushes.clone(), report_tx);
            tasks.spawn(async move {
                task.await;
                "push"
            });
            handle
        });
        let notifier = Notifier {
            peers: peers::Peers::new(connection.clone(), &config.state_directory),
            config,
            clock,
            domain,
            outbox,
            pushes,
            deliverer,
            pusher,
            ledger_path: dir.join("ledger.json"),
            view,
            object,
        };
        let inputs = Inputs {
            requests,
            reports,
            tasks,
        };
        Ok((notifier, inputs))
    }

    /// After a start: mails what the peers report that was not mailed,
    /// mails whatever is due, shows the outbox, and delivers what a
    /// previous run left in it.
    async fn recover(&mut self) {
        let found = self.peers.found().await;
        let effects = self.domain.recover(found, self.clock.now());
        // What was not queued is logged where it failed.
        let _ = self.carry_out(effects).await;
        self.tick().await;
        self.refresh_view(None).await;
        self.write_metrics().await;
        for deliverer in [&self.deliverer, &self.pusher].into_iter().flatten() {
            deliverer.queued();
        }
    }

    /// A peer's signal: look up what the domain needs, hand it in, carry
    /// the effects out, rewrite the metrics.
    async fn signal(&mut self, event: events::Event) {
        let looked = self.peers.look(self.domain.needs(&event)).await;
        let effects = self.domain.signal(event, looked, self.clock.now());
        // What was not queued is logged where it failed.
        let _ = self.carry_out(effects).await;
        self.write_metrics().await;
    }

    /// Whatever is due now.
    async fn tick(&mut self) {
        let verification = self.peers.verification().await.unwrap_or_default();
        let effects = self.domain.tick(&verification, self.clock.now());
        // What was not queued is logged where it failed.
        let _ = self.carry_out(effects).await;
    }

    /// Lets the deliverers finish the letter each is settling (so a mail
    /// the server accepted is also removed from the outbox, not sent again
    /// after the restart), at most [`STOP_GRACE`]; then ends them.
    async fn stop_delivery(&self, tasks: &mut JoinSet<&'static str>) {
        for deliverer in [&self.deliverer, &self.pusher].into_iter().flatten() {
            deliverer.stop();
        }
        let ended = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(STOP_GRACE, ended).await.is_err() {
            tracing::warn!("a delivery did not end within {STOP_GRACE:?}; stopping it");
            tasks.shutdown().await;
        }
    }

    /// When [`tick`](Self::tick) next has something to do.
    fn next_due(&self) -> Option<tokio::time::Instant> {
        let wait = self.domain.next_due(self.clock.now())?;
        Some(tokio::time::Instant::now() + Duration::from_secs(wait))
    }

    /// Carries `effects` out: spools the letters durably in order, then
    /// writes the ledger once, and only then lets delivery passes see the
    /// letters ([`Outbox::hold`]), says so and wakes the deliverers. So a
    /// letter is never delivered before the ledger that remembers it was
    /// sent is on disk (a kill in between would otherwise mail a failure
    /// or a once-a-day reminder again after the restart), and a letter
    /// spooled just before a kill covers its failures at the next start. Returns
    /// the first mail's id, or the first reason a mail was not queued.
    async fn carry_out(&mut self, effects: Vec<Effect>) -> Result<Option<String>, QueueError> {
        let (mut first, mut failed, mut save) = (None, None, false);
        let mut spooled = Spooled::default();
        let held = (self.outbox.hold().await, self.pushes.hold().await);
        for effect in effects {
            match effect {
                Effect::Mail { draft, covers } => match self.spool_mail(draft, covers).await {
                    Ok((id, reason)) => {
                        first = first.or(Some(id.clone()));
                        spooled.mail.push((id, reason));
                    }
                    Err(e) => failed = failed.or(Some(e)),
                },
                Effect::Push(letters) => spooled.push.extend(self.spool_pushes(letters).await),
                Effect::Save => save = true,
            }
        }
        if save {
            self.save().await;
        }
        drop(held);
        self.announce(spooled).await;
        match (first, failed) {
            (_, Some(e)) => Err(e),
            (first, None) => Ok(first),
        }
    }

    /// Writes the ledger, off the runtime.
    async fn save(&self) {
        let bytes = match serde_json::to_vec_pretty(self.domain.ledger()) {
            Ok(bytes) => bytes,
            Err(e) => return tracing::error!("cannot encode the ledger: {e}"),
        };
        let path = self.ledger_path.clone();
        let written =
            off_runtime(move || ferry_service::durable::write_atomically(&path, &bytes, 0o600));
        if let Err(e) = written.await {
            tracing::error!("cannot write {}: {e}", self.ledger_path.display());
        }
    }

    /// Spools a mail durably (off the runtime); its event id and reason.
    async fn spool_mail(
        &mut self,
        draft: Draft,
        covers: Covers,
    ) -> Result<(String, String), QueueError> {
        let Some(mail) = self.config.mail.as_ref() else {
            tracing::warn!(
                "not mailed (no [mail] section in ferry.toml): {}: {}",
                draft.reason,
                compose::one_line(&draft.subject, 160)
            );
            return Err(domain::Refusal::NoMail.into());
        };
        let now = self.clock.now();
        let id = compose::new_event_id(now);
        let spooled = compose::build(&draft, mail, &id, now, covers).map_err(|e| {
            tracing::error!("{e}; NOT QUEUED: {}", draft.subject);
            e
        })?;
        if let Err(source) = self.outbox.spool(vec![spooled.clone()]).await {
            let error = QueueError::Spool {
                dir: self.outbox.queue_dir().to_path_buf(),
                source,
            };
            tracing::error!("{error}; NOT QUEUED: {}", spooled.subject);
            return Err(error);
        }
        tracing::info!("queued mail {id}: {}", spooled.subject);
        Ok((id, spooled.reason))
    }

    /// Spools pushes durably (off the runtime); their ids and reasons.
    async fn spool_pushes(&mut self, letters: Vec<PushLetter>) -> Vec<(String, String)> {
        let reasons: Vec<(String, String)> = letters
            .iter()
            .map(|l| (l.id.clone(), l.reason.clone()))
            .collect();
        if let Err(e) = self.pushes.spool(letters).await {
            let what: Vec<&str> = reasons.iter().map(|(_, r)| r.as_str()).collect();
            tracing::error!(
                "cannot write to the push outbox {}: {e}; NOT QUEUED: {}",
                self.pushes.queue_dir().display(),
                what.join(", ")
            );
            return Vec::new();
        }
        for (id, reason) in &reasons {
            tracing::info!("queued push {id}: {reason}");
        }
        reasons
    }

    /// Shows what was spooled (the properties, NotificationQueued) and
    /// wakes the deliverers that have something new.
    async fn announce(&self, spooled: Spooled) {
        if spooled.mail.is_empty() && spooled.push.is_empty() {
            return;
        }
        self.refresh_view(None).await;
        for (id, reason) in spooled.mail.iter().chain(&spooled.push) {
            self.queued(id, reason).await;
        }
        let woken = [
            (&self.deliverer, !spooled.mail.is_empty()),
            (&self.pusher, !spooled.push.is_empty()),
        ];
        for (deliverer, new) in woken {
            if let (Some(deliverer), true) = (deliverer, new) {
                deliverer.queued();
            }
        }
    }

    /// Emits NotificationQueued.
    async fn queued(&self, id: &str, reason: &str) {
        let emitter = self.object.signal_emitter();
        if let Err(e) = NotifierInterface::notification_queued(emitter, id, reason).await {
            tracing::warn!("cannot emit NotificationQueued: {e}");
        }
    }

    async fn command(&mut self, command: Command) {
        let now = self.clock.now();
        match command {
            Command::Test(reply) => {
                let _ = reply.send(self.request(Request::Test, now).await);
            }
            Command::UnitFailed {
                unit,
                journal,
                reply,
            } => {
                let request = Request::UnitFailed { unit, journal };
                let _ = reply.send(self.request(request, now).await);
            }
            Command::Flush => self.flush(),
            Command::ListDead(reply) => {
                let (mail, pushes) = (self.outbox.clone(), self.pushes.clone());
                let letters = off_runtime(move || {
                    let mut all = mail.dead_letters();
                    all.extend(pushes.dead_letters());
                    all.sort_by_key(|l| l.created);
                    Ok(all)
                })
                .await
                .unwrap_or_default();
                let _ = reply.send(letters);
            }
            Command::Resend { id, reply } => {
                let _ = reply.send(self.resend(id).await);
            }
        }
    }

    /// A request that queues a mail: its id ("" when the rules held it
    /// back, as an identical unit failure mailed recently).
    async fn request(&mut self, request: Request, now: u64) -> Result<String, RequestError> {
        let effects = self
            .domain
            .request(request, now)
            .map_err(QueueError::from)?;
        Ok(self.carry_out(effects).await?.unwrap_or_default())
    }

    /// Both deliverers try everything now.
    fn flush(&self) {
        for deliverer in [&self.deliverer, &self.pusher].into_iter().flatten() {
            deliverer.flush();
        }
    }

    /// Puts dead letter `id` (mail or push) back into its outbox.
    async fn resend(&mut self, id: String) -> Result<(), RequestError> {
        let (mail, pushes) = (self.outbox.clone(), self.pushes.clone());
        let wanted = id.clone();
        let found = tokio::task::spawn_blocking(move || match mail.resurrect(&wanted)? {
            true => Ok(true),
            false => pushes.resurrect(&wanted),
        })
        .await
        .map_err(|_| RequestError::Stopping)??;
        if !found {
            return Err(RequestError::NoDeadLetter(compose::one_line(&id, 64)));
        }
        tracing::info!("dead letter {id} queued again");
        self.refresh_view(None).await;
        self.flush();
        Ok(())
    }

    /// Rewrites the Prometheus textfile (with `[metrics]`) from the peers'
    /// persisted results and the notifier's own counts, off the runtime.
    async fn write_metrics(&self) {
        let Some(settings) = &self.config.metrics else {
            return;
        };
        let text = metrics::render(&self.snapshot().await);
        let path = settings.textfile.to_path_buf();
        let written = off_runtime(move || {
            ferry_service::durable::write_atomically(&path, text.as_bytes(), 0o644)
        });
        if let Err(e) = written.await {
            tracing::warn!(
                "cannot write the metrics file {}: {e}; check [metrics] textfile and that its directory exists and is writable",
                settings.textfile.display()
            );
        }
    }

    /// What the metrics show now.
    async fn snapshot(&self) -> metrics::Snapshot {
        let mut s = metrics::Snapshot {
            failures: self.domain.ledger().failures.clone(),
            ..Default::default()
        };
        for source in [
            events::Source::Crypt,
            events::Source::Sync,
            events::Source::Borg,
        ] {
            s.failures.entry(source.service().to_string()).or_insert(0);
        }
        let ((mail_pending, mail_dead), (push_pending, push_dead)) =
            (self.outbox.counts().await, self.pushes.counts().await);
        for (channel, pending, dead) in [
            ("mail", mail_pending, mail_dead),
            ("push", push_pending, push_dead),
        ] {
            s.pending.insert(channel.into(), pending);
            s.dead.insert(channel.into(), dead);
        }
        self.peers.figures(&mut s).await;
        s
    }

    /// Recounts the outboxes (off the runtime), updates the properties and
    /// emits their changes.
    async fn refresh_view(&self, last_error: Option<String>) {
        let (mail, push) = (self.outbox.counts().await, self.pushes.counts().await);
        if let Ok(mut view) = self.view.lock() {
            view.pending = mail.0 + push.0;
            view.dead_letters = mail.1 + push.1;
            if let Some(e) = last_error {
                view.last_error = e;
            }
        }
        let emitter = self.object.signal_emitter();
        let interface = self.object.get().await;
        for sent in [
            interface.pending_changed(emitter).await,
            interface.dead_letters_changed(emitter).await,
            interface.last_error_changed(emitter).await,
        ] {
            if let Err(e) = sent {
                tracing::warn!("cannot emit PropertiesChanged: {e}");
            }
        }
    }

    /// A delivery outcome: the properties, NotificationSent, the metrics.
    async fn report(&mut self, report: Report) {
        match report {
            Report::Sent { id, subject } => {
                self.refresh_view(Some(String::new())).await;
                let emitter = self.object.signal_emitter();
                if let Err(e) = NotifierInterface::notification_sent(emitter, &id, &subject).await {
                    tracing::warn!("cannot emit NotificationSent: {e}");
                }
            }
            Report::Dead { id, error } => {
                self.refresh_view(Some(format!("{id} refused: {error}")))
                    .await;
            }
            Report::Deferred { error, .. } => self.refresh_view(Some(error)).await,
        }
        self.write_metrics().await;
    }
}

/// The mail outbox (`<dir>`), the push outbox (`<dir>/push`), the ledger
/// (`<dir>/ledger.json`) and the failures the queued letters cover: all
/// read off the runtime.
async fn open_state(
    dir: PathBuf,
) -> Result<(Outbox, Outbox<PushLetter>, Ledger, Covers), ServiceError> {
    let shown = dir.display().to_string();
    off_runtime(move || {
        let outbox = Outbox::open(&dir)?;
        let pushes = Outbox::<PushLetter>::open(&dir.join("push"))?;
        let ledger = Ledger::load(&dir.join("ledger.json"));
        let spooled = covers_of(&outbox).into_iter().chain(covers_of(&pushes)).collect();
        Ok((outbox, pushes, ledger, spooled))
    })
    .await
    .map_err(|e| {
        ServiceError::Other(format!(
            "cannot create the outbox under {shown}: {e}; check state-directory in ferry.toml and its permissions"
        ))
    })
}

/// The failures the letters queued in `outbox` cover. An unreadable letter
/// covers nothing here; delivery moves it to the dead letters with why.
fn covers_of<L: Letter>(outbox: &Outbox<L>) -> Covers {
    outbox
        .all()
        .iter()
        .flat_map(|l| l.covers().to_vec())
        .collect()
}
