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

pub mod clock;
pub mod compose;
pub mod deliver;
pub mod events;
pub mod journal;
pub mod ledger;
pub mod metrics;
pub mod outbox;
pub mod push;
pub mod pushing;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clock::Clock;
use compose::Draft;
use deliver::{Deliverer, Report};
use events::{Event, Failure, Source};
use ferry_config::{Config, Mail};
use ferry_interfaces::{borg, crypt, notifier, sync, Error as FerryError};
use ferry_service::{caller, claim_name, ServiceError, Shutdown};
use futures_util::StreamExt;
use ledger::{Ledger, ProfileSeen, Staleness, DAY, HOUR};
use outbox::{Letter, Outbox};
use push::PushLetter;
use tokio::sync::{mpsc, oneshot};
use zbus::object_server::SignalEmitter;

/// How long to wait for a peer's properties.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);

/// What the properties show; written by the loop, read by the interface.
#[derive(Debug, Clone, Default)]
struct View {
    pending: u32,
    dead_letters: u32,
    last_error: String,
}

type Reply = oneshot::Sender<Result<String, FerryError>>;

enum Command {
    Test(Reply),
    UnitFailed {
        unit: String,
        journal: String,
        reply: Reply,
    },
    Flush,
    ListDead(oneshot::Sender<Vec<ferry_interfaces::DeadLetter>>),
    Resend {
        id: String,
        reply: oneshot::Sender<Result<(), FerryError>>,
    },
}

/// The options of a method that takes `a{sv}`: none are defined yet, so
/// any key is refused with a sentence saying so.
fn no_options(
    method: &str,
    options: &std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
) -> Result<(), FerryError> {
    match options.keys().next() {
        None => Ok(()),
        Some(key) => Err(FerryError::InvalidArgument(format!(
            "{method} has no option `{}`; pass an empty a{{sv}} (busctl: 0)",
            compose::one_line(key, 64)
        ))),
    }
}

/// The org.ferry.Notifier1 object: checks arguments and callers, hands the
/// work to the loop.
pub struct NotifierInterface {
    commands: mpsc::Sender<Command>,
    view: Arc<Mutex<View>>,
}

fn stopping() -> FerryError {
    FerryError::Failed("the notifier is shutting down".into())
}

impl NotifierInterface {
    fn view(&self) -> View {
        self.view.lock().map(|v| v.clone()).unwrap_or_default()
    }

    async fn ask(&self, make: impl FnOnce(Reply) -> Command) -> Result<String, FerryError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| stopping())?;
        answer.await.map_err(|_| stopping())?
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
        self.ask(Command::Test).await
    }

    /// A systemd unit failed; mail it with its journal lines.
    #[zbus(out_args("id"))]
    async fn unit_failed(
        &self,
        unit: &str,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<String, FerryError> {
        journal::check_unit_name(unit).map_err(FerryError::InvalidArgument)?;
        caller::authorize(conn, &header).await?;
        let journal = journal::recent_lines(unit).await;
        let unit = unit.to_string();
        self.ask(|reply| Command::UnitFailed {
            unit,
            journal,
            reply,
        })
        .await
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
            .map_err(|_| stopping())
    }

    /// The dead letters, oldest first.
    #[zbus(out_args("letters"))]
    async fn list_dead_letters(
        &self,
        options: std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<Vec<ferry_interfaces::DeadLetter>, FerryError> {
        no_options("ListDeadLetters", &options)?;
        caller::authorize(conn, &header).await?;
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::ListDead(reply))
            .await
            .map_err(|_| stopping())?;
        answer.await.map_err(|_| stopping())
    }

    /// Puts a dead letter back into the outbox.
    async fn resend_dead_letter(
        &self,
        id: &str,
        options: std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: zbus::message::Header<'_>,
    ) -> Result<(), FerryError> {
        no_options("ResendDeadLetter", &options)?;
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(FerryError::InvalidArgument(format!(
                "`{}` is not an event id; take one from ListDeadLetters",
                compose::one_line(id, 64)
            )));
        }
        caller::authorize(conn, &header).await?;
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Resend {
                id: id.to_string(),
                reply,
            })
            .await
            .map_err(|_| stopping())?;
        answer.await.map_err(|_| stopping())?
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
    async fn notification_sent(
        emitter: &SignalEmitter<'_>,
        id: &str,
        subject: &str,
    ) -> zbus::Result<()>;

    /// A message was written to the outbox.
    #[zbus(signal)]
    async fn notification_queued(
        emitter: &SignalEmitter<'_>,
        id: &str,
        reason: &str,
    ) -> zbus::Result<()>;
}

/// The service loop's state.
struct Notifier {
    config: Arc<Config>,
    connection: zbus::Connection,
    clock: Clock,
    host: String,
    outbox: Outbox,
    deliverer: Option<Deliverer>,
    /// The push outbox and its deliverer (with `[push]`).
    pushes: Outbox<PushLetter>,
    pusher: Option<Deliverer>,
    ledger: Ledger,
    ledger_path: PathBuf,
    view: Arc<Mutex<View>>,
    object: ferry_service::Served<NotifierInterface>,
    /// Drives whose sync finished and that are not closed yet (for the
    /// success summary): bytes and seconds.
    synced: BTreeMap<String, (u64, f64)>,
    drives: Vec<String>,
}

impl Notifier {
    fn mail(&self) -> Option<&Mail> {
        self.config.mail.as_ref()
    }

    fn staleness(&self) -> Staleness {
        Staleness {
            drive_age: u64::from(self.config.notify.drive_stale_days) * DAY,
            profile_grace: u64::from(self.config.notify.profile_grace_hours) * HOUR,
        }
    }

    fn window(&self) -> u64 {
        u64::from(self.config.notify.repeat_window_minutes) * 60
    }

    fn save(&self) {
        match serde_json::to_vec_pretty(&self.ledger) {
            Ok(bytes) => {
                if let Err(e) =
                    ferry_service::durable::write_atomically(&self.ledger_path, &bytes, 0o600)
                {
                    tracing::error!("cannot write {}: {e}", self.ledger_path.display());
                }
            }
            Err(e) => tracing::error!("cannot encode the ledger: {e}"),
        }
    }

    /// Spools a message and tells the deliverer; returns its event id.
    async fn queue(&mut self, draft: Draft, covers: Vec<(String, u64)>) -> Result<String, String> {
        let Some(mail) = self.mail() else {
            tracing::warn!(
                "not mailed (no [mail] section in ferry.toml): {}: {}",
                draft.reason,
                compose::one_line(&draft.subject, 160)
            );
            return Err(
                "nothing can be mailed: ferry.toml has no [mail] section; add one with from and to"
                    .into(),
            );
        };
        let now = self.clock.now();
        let id = compose::new_event_id(now);
        let spooled = compose::build(&draft, mail, &id, now, covers)?;
        self.outbox.put(&spooled).map_err(|e| {
            let error = format!(
                "cannot write to the outbox {}: {e}",
                self.outbox.queue_dir().display()
            );
            tracing::error!("{error}; NOT QUEUED: {}", spooled.subject);
            error
        })?;
        tracing::info!("queued mail {id}: {}", spooled.subject);
        self.refresh_view(None).await;
        let emitter = self.object.signal_emitter();
        if let Err(e) = NotifierInterface::notification_queued(emitter, &id, &spooled.reason).await
        {
            tracing::warn!("cannot emit NotificationQueued: {e}");
        }
        if let Some(deliverer) = &self.deliverer {
            deliverer.queued();
        }
        Ok(id)
    }

    /// Mails (and pushes to ntfy) ferry-crypt's health warning about
    /// `drive`, once per reading: its health ledger says a failing or
    /// degraded drive was opened under `health = "warn"`.
    async fn health_warning(&mut self, drive: &str) {
        let path = ferry_service::health_ledger::path(&self.config.state_directory);
        let read = tokio::task::spawn_blocking(move || ferry_service::health_ledger::load(&path))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        let record = match read {
            Ok(mut all) => all.remove(drive),
            Err(e) => {
                tracing::warn!("{drive}: cannot look at its health: {e}");
                None
            }
        };
        let Some(record) = record.filter(|r| r.decision == "warn") else {
            return;
        };
        if self.ledger.health_warned.get(drive) >= Some(&record.time) {
            return;
        }
        let draft = events::health_warning_draft(drive, &record, &self.host);
        let now = self.clock.now();
        if let Some(ntfy) = self.config.push.as_ref().and_then(|p| p.ntfy.as_ref()) {
            let letter = push::ntfy_letter(ntfy, &draft.subject, draft.body.clone(), now);
            self.queue_pushes(vec![letter]).await;
        }
        self.queue_limited(draft, Vec::new()).await;
        self.ledger
            .health_warned
            .insert(drive.to_string(), record.time);
        self.save();
    }

    /// Spools pushes durably (off the runtime) and wakes their deliverer.
    async fn queue_pushes(&mut self, letters: Vec<PushLetter>) {
        if letters.is_empty() {
            return;
        }
        let outbox = self.pushes.clone();
        let spooled = letters.clone();
        let written =
            tokio::task::spawn_blocking(move || spooled.iter().try_for_each(|l| outbox.put(l)))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        if let Err(e) = written {
            tracing::error!(
                "cannot write to the push outbox {}: {e}; NOT QUEUED: {}",
                self.pushes.queue_dir().display(),
                letters
                    .iter()
                    .map(|l| l.reason.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            return;
        }
        let emitter = self.object.signal_emitter();
        for letter in &letters {
            tracing::info!("queued push {}: {}", letter.id, letter.reason);
            if let Err(e) =
                NotifierInterface::notification_queued(emitter, &letter.id, &letter.reason).await
            {
                tracing::warn!("cannot emit NotificationQueued: {e}");
            }
        }
        self.refresh_view(None).await;
        if let Some(pusher) = &self.pusher {
            pusher.queued();
        }
    }

    /// Queues a draft unless the hourly limit holds it for the digest.
    async fn queue_limited(&mut self, draft: Draft, covers: Vec<(String, u64)>) {
        let now = self.clock.now();
        let max = self.config.notify.max_per_hour;
        match self.ledger.rate_limit(draft, now, max) {
            Some(draft) => {
                let _ = self.queue(draft, covers).await;
            }
            None => tracing::info!("hourly mail limit reached; held for the next digest"),
        }
    }

    /// A failure from a signal (`late` false, `when` now) or from a peer's
    /// LastFailures at start.
    async fn failure(&mut self, failure: Failure, when: u64, late: bool) {
        self.failure_event(failure, when, late, None).await;
    }

    /// [`failure`](Self::failure) of FailureHistory entry `event` (its id).
    async fn failure_event(
        &mut self,
        failure: Failure,
        when: u64,
        late: bool,
        event: Option<&str>,
    ) {
        tracing::info!(
            "{} {} failed at {}: {}",
            failure.source.key(),
            failure.subject,
            failure.stage,
            failure.message
        );
        let now = self.clock.now();
        let draft = failure.draft(when, late, &self.host);
        let key = failure.ledger_key();
        let window = self.window();
        let mut covers = vec![(key.clone(), when)];
        if let Some(id) = event {
            covers.push((format!("{}#{id}", failure.source.key()), when));
        }
        *self
            .ledger
            .failures
            .entry(failure.source.service().to_string())
            .or_insert(0) += 1;
        if let Some(push) = &self.config.push {
            let letters = push::pushes_of_failure(push, &failure, when, late, &self.host, &covers);
            self.queue_pushes(letters).await;
        }
        if let Some(draft) = self
            .ledger
            .admit_failure(&failure.group_key(), draft, now, window)
        {
            self.queue_limited(draft, covers).await;
        } else {
            tracing::info!("an identical failure was mailed recently; counted for the follow-up");
        }
        self.ledger.mark_mailed(&key, when);
        if let Some(id) = event {
            self.ledger.mark_event(failure.source.key(), id);
        }
        self.save();
    }

    async fn handle(&mut self, event: Event) {
        let now = self.clock.now();
        if let Some(push) = &self.config.push {
            let letter = push::ping_of_event(push, &event, now, &self.host);
            self.queue_pushes(letter.into_iter().collect()).await;
        }
        match event {
            Event::DriveOpened(drive) => self.health_warning(&drive).await,
            Event::BackupStarted { .. }
            | Event::BackupFinishedWithWarnings { .. }
            | Event::BackupSkipped { .. } => {}
            Event::Failed(failure) => {
                let refresh = failure.source == Source::Borg;
                match self.history(failure.source).await {
                    Some(history) => {
                        let covered = history.iter().any(|e| {
                            e.subject == failure.subject
                                && e.stage == failure.stage
                                && e.message == failure.message
                        });
                        self.mail_history(failure.source, history, false).await;
                        if !covered {
                            // Not from the peer that keeps the history.
                            self.failure(failure, now, false).await;
                        }
                    }
                    None => self.failure(failure, now, false).await,
                }
                if refresh {
                    self.refresh_profiles().await;
                }
            }
            Event::SyncFinished {
                drive,
                bytes,
                seconds,
            } => {
                let last = self.ledger.last_sync.entry(drive.clone()).or_insert(0);
                *last = (*last).max(now);
                self.save();
                if self.config.notify.sync_success {
                    self.synced.insert(drive, (bytes, seconds));
                }
            }
            Event::DriveClosed(drive) => {
                if let Some((bytes, seconds)) = self.synced.remove(&drive) {
                    let record = self
                        .last_syncs()
                        .await
                        .unwrap_or_default()
                        .into_iter()
                        .find(|r| r.drive == drive);
                    let verification = self
                        .verification()
                        .await
                        .unwrap_or_default()
                        .into_iter()
                        .find(|v| v.drive == drive);
                    let draft = events::sync_success_draft(
                        &drive,
                        bytes,
                        seconds,
                        record.as_ref(),
                        verification.as_ref(),
                        &self.host,
                    );
                    self.queue_limited(draft, Vec::new()).await;
                    self.save();
                }
            }
            Event::BackupFinished {
                job,
                profile,
                archive,
            } => {
                let entry = self.ledger.profiles.entry(profile.clone()).or_default();
                entry.last_success = entry.last_success.max(now);
                let results = self.refresh_profiles().await;
                if self.config.notify.backup_success {
                    let result = results.iter().find(|r| r.profile == profile);
                    let draft =
                        events::backup_success_draft(&job, &profile, &archive, result, &self.host);
                    self.queue_limited(draft, Vec::new()).await;
                }
                self.save();
            }
        }
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Test(reply) => {
                let draft = events::test_draft(self.clock.now(), &self.host);
                let result = self.queue(draft, Vec::new()).await;
                let _ = reply.send(result.map_err(FerryError::Failed));
            }
            Command::UnitFailed {
                unit,
                journal,
                reply,
            } => {
                let now = self.clock.now();
                if self.mail().is_none() {
                    let _ = reply.send(Err(FerryError::Failed(
                        "nothing can be mailed: ferry.toml has no [mail] section; add one with from and to".into(),
                    )));
                    return;
                }
                let draft = events::unit_failed_draft(&unit, &journal, now, &self.host);
                let window = self.window();
                let max = self.config.notify.max_per_hour;
                let admitted = self
                    .ledger
                    .admit_failure(&format!("unit/{unit}"), draft, now, window)
                    .and_then(|d| self.ledger.rate_limit(d, now, max));
                let result = match admitted {
                    Some(draft) => self
                        .queue(draft, Vec::new())
                        .await
                        .map_err(FerryError::Failed),
                    None => Ok(String::new()),
                };
                self.save();
                let _ = reply.send(result);
            }
            Command::Flush => {
                for deliverer in [&self.deliverer, &self.pusher].into_iter().flatten() {
                    deliverer.flush();
                }
            }
            Command::ListDead(reply) => {
                let (mail, pushes) = (self.outbox.clone(), self.pushes.clone());
                let letters = tokio::task::spawn_blocking(move || {
                    let mut all = mail.dead_letters();
                    all.extend(pushes.dead_letters());
                    all.sort_by_key(|l| l.created);
                    all
                })
                .await
                .unwrap_or_default();
                let _ = reply.send(letters);
            }
            Command::Resend { id, reply } => {
                let result = self.resend(id).await;
                let _ = reply.send(result);
            }
        }
    }

    /// Puts dead letter `id` (mail or push) back into its outbox.
    async fn resend(&mut self, id: String) -> Result<(), FerryError> {
        let (mail, pushes) = (self.outbox.clone(), self.pushes.clone());
        let wanted = id.clone();
        let result = tokio::task::spawn_blocking(move || match mail.resurrect(&wanted)? {
            true => Ok(true),
            false => pushes.resurrect(&wanted),
        })
        .await
        .unwrap_or_else(|e| Err(format!("internal error: {e}")));
        match result {
            Ok(true) => {
                tracing::info!("dead letter {id} queued again");
                self.refresh_view(None).await;
                for deliverer in [&self.deliverer, &self.pusher].into_iter().flatten() {
                    deliverer.flush();
                }
                Ok(())
            }
            Ok(false) => Err(FerryError::NotFound(format!(
                "no dead letter has the id `{}`; ListDeadLetters shows them",
                compose::one_line(&id, 64)
            ))),
            Err(e) => Err(FerryError::Failed(e)),
        }
    }

    /// Mails whatever is due: follow-ups of grouped failures, the digest,
    /// stale drives and profiles.
    async fn tick(&mut self) {
        let now = self.clock.now();
        let window = self.window();
        let max = self.config.notify.max_per_hour;
        for draft in self.ledger.close_groups(now, window) {
            self.queue_limited(draft, Vec::new()).await;
        }
        for digest in self.ledger.release_held(now, max) {
            let _ = self.queue(digest, Vec::new()).await;
        }
        let s = self.staleness();
        let drives = self.drives.clone();
        for (drive, last) in self.ledger.stale_drives(&drives, now, s) {
            let draft = events::stale_drive_draft(
                &drive,
                last,
                now,
                self.config.notify.drive_stale_days,
                &self.host,
            );
            self.queue_limited(draft, Vec::new()).await;
        }
        // A drive whose copies were not all re-read within the scrub
        // period (Sync1.Verification): at most once a day.
        for v in self.verification().await.unwrap_or_default() {
            let key = format!("scrub/{}", v.drive);
            let mailed = self.ledger.stale_mailed.get(&key).copied().unwrap_or(0);
            if v.overdue && now.saturating_sub(mailed) >= 86_400 {
                self.ledger.stale_mailed.insert(key, now);
                let draft = events::scrub_overdue_draft(&v, &self.host);
                self.queue_limited(draft, Vec::new()).await;
            }
        }
        for (profile, seen) in self.ledger.stale_profiles(now, s) {
            let draft = events::stale_profile_draft(&profile, seen, now, &self.host);
            self.queue_limited(draft, Vec::new()).await;
        }
        self.save();
    }

    /// When [`tick`](Self::tick) next has something to do.
    fn next_due(&self) -> Option<tokio::time::Instant> {
        let due = self
            .ledger
            .next_due(&self.drives, self.staleness(), self.window())?;
        let wait = due.saturating_sub(self.clock.now()).max(1);
        Some(tokio::time::Instant::now() + Duration::from_secs(wait))
    }

    async fn verification(&self) -> Option<Vec<ferry_interfaces::DriveVerification>> {
        let proxy = sync::SyncProxy::builder(&self.connection)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .ok()?;
        peer(proxy.verification()).await
    }

    async fn last_syncs(&self) -> Option<Vec<ferry_interfaces::SyncRecord>> {
        let proxy = sync::SyncProxy::builder(&self.connection)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .ok()?;
        peer(proxy.last_syncs()).await
    }

    /// Learns each drive's last sync from Sync1.
    async fn refresh_syncs(&mut self) {
        for record in self.last_syncs().await.unwrap_or_default() {
            let last = self.ledger.last_sync.entry(record.drive).or_insert(0);
            *last = (*last).max(record.time);
        }
    }

    /// Learns each profile's schedule and last success from Borg1; returns
    /// its LastResults.
    async fn refresh_profiles(&mut self) -> Vec<ferry_interfaces::BackupResult> {
        let Ok(proxy) = borg::BorgProxy::builder(&self.connection)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
        else {
            return Vec::new();
        };
        let results = peer(proxy.last_results()).await.unwrap_or_default();
        for entry in peer(proxy.schedule()).await.unwrap_or_default() {
            self.ledger.profiles.entry(entry.profile).or_default().due = entry.due;
        }
        for result in &results {
            if ferry_interfaces::BackupOutcome::from_wire(&result.outcome)
                == Some(ferry_interfaces::BackupOutcome::Finished)
            {
                let seen: &mut ProfileSeen = self
                    .ledger
                    .profiles
                    .entry(result.profile.clone())
                    .or_default();
                seen.last_success = seen.last_success.max(result.time);
            }
        }
        results
    }

    /// `source`'s FailureHistory; None when the peer is not there or has
    /// none (an older or replacement service).
    async fn history(&self, source: Source) -> Option<Vec<ferry_interfaces::FailureEvent>> {
        macro_rules! read {
            ($proxy:ty) => {{
                let proxy = <$proxy>::builder(&self.connection)
                    .cache_properties(zbus::proxy::CacheProperties::No)
                    .build()
                    .await
                    .ok()?;
                peer(proxy.failure_history()).await
            }};
        }
        match source {
            Source::Crypt => read!(crypt::CryptProxy<'_>),
            Source::Sync => read!(sync::SyncProxy<'_>),
            Source::Borg => read!(borg::BorgProxy<'_>),
        }
    }

    /// Mails every entry of `source`'s history not mailed before, oldest
    /// first; `late` when found at start.
    async fn mail_history(
        &mut self,
        source: Source,
        history: Vec<ferry_interfaces::FailureEvent>,
        late: bool,
    ) {
        let present: std::collections::BTreeSet<String> =
            history.iter().map(|e| e.id.clone()).collect();
        for e in history {
            let failure = Failure {
                source,
                subject: e.subject,
                stage: e.stage,
                message: e.message,
                job: (!e.job.is_empty()).then_some(e.job),
            };
            if self
                .ledger
                .is_new_event(source.key(), &e.id, &failure.ledger_key(), e.time)
            {
                self.failure_event(failure, e.time, late, Some(&e.id)).await;
            }
        }
        let present: std::collections::BTreeSet<&str> =
            present.iter().map(String::as_str).collect();
        self.ledger.keep_events(source.key(), &present);
        self.save();
    }

    /// Mails the failures the peers report that were not mailed before:
    /// their whole FailureHistory, or LastFailures where there is none.
    async fn missed_failures(&mut self) {
        let mut found = Vec::new();
        macro_rules! ask {
            ($proxy:ty, $source:expr) => {
                if let Some(history) = self.history($source).await {
                    self.mail_history($source, history, true).await;
                } else if let Ok(proxy) = <$proxy>::builder(&self.connection)
                    .cache_properties(zbus::proxy::CacheProperties::No)
                    .build()
                    .await
                {
                    for f in peer(proxy.last_failures()).await.unwrap_or_default() {
                        found.push(($source, f));
                    }
                }
            };
        }
        ask!(crypt::CryptProxy<'_>, Source::Crypt);
        ask!(sync::SyncProxy<'_>, Source::Sync);
        ask!(borg::BorgProxy<'_>, Source::Borg);
        for (source, f) in found {
            let failure = Failure {
                source,
                subject: f.subject,
                stage: f.stage,
                message: f.message,
                job: None,
            };
            if self.ledger.is_new_failure(&failure.ledger_key(), f.time) {
                self.failure(failure, f.time, true).await;
            }
        }
    }

    /// Rewrites the Prometheus textfile (with `[metrics]`) from the peers'
    /// persisted results and the notifier's own counts.
    async fn write_metrics(&self) {
        let Some(settings) = &self.config.metrics else {
            return;
        };
        let text = metrics::render(&self.snapshot().await);
        let path = settings.textfile.to_path_buf();
        let written = tokio::task::spawn_blocking(move || {
            ferry_service::durable::write_atomically(&path, text.as_bytes(), 0o644)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        if let Err(e) = written {
            tracing::warn!(
                "cannot write the metrics file {}: {e}; check [metrics] textfile and that its directory exists and is writable",
                settings.textfile.display()
            );
        }
    }

    /// What the metrics show now.
    async fn snapshot(&self) -> metrics::Snapshot {
        let mut s = metrics::Snapshot {
            failures: self.ledger.failures.clone(),
            ..Default::default()
        };
        for source in [Source::Crypt, Source::Sync, Source::Borg] {
            s.failures.entry(source.service().to_string()).or_insert(0);
        }
        for (channel, pending, dead) in [
            (
                "mail",
                self.outbox.pending_count(),
                self.outbox.dead_count(),
            ),
            (
                "push",
                self.pushes.pending_count(),
                self.pushes.dead_count(),
            ),
        ] {
            s.pending.insert(channel.into(), pending);
            s.dead.insert(channel.into(), dead);
        }
        self.profile_figures(&mut s).await;
        self.drive_figures(&mut s).await;
        s
    }

    async fn profile_figures(&self, s: &mut metrics::Snapshot) {
        let Ok(proxy) = borg::BorgProxy::builder(&self.connection)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
        else {
            return;
        };
        for r in peer(proxy.last_results()).await.unwrap_or_default() {
            let f = s.profiles.entry(r.profile.clone()).or_default();
            f.duration = Some(r.seconds);
            if r.outcome.starts_with("finished") {
                f.last_success = Some(f.last_success.unwrap_or(0).max(r.time));
            } else if r.outcome == "failed" {
                f.last_failure = Some(f.last_failure.unwrap_or(0).max(r.time));
            }
        }
        for e in peer(proxy.schedule()).await.unwrap_or_default() {
            if e.last_success > 0 {
                let f = s.profiles.entry(e.profile).or_default();
                f.last_success = Some(f.last_success.unwrap_or(0).max(e.last_success));
            }
        }
        for e in peer(proxy.last_failures()).await.unwrap_or_default() {
            let f = s.profiles.entry(e.subject).or_default();
            f.last_failure = Some(f.last_failure.unwrap_or(0).max(e.time));
        }
        let with_success: Vec<String> = s
            .profiles
            .iter()
            .filter(|(_, f)| f.last_success.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for name in with_success {
            let sizes = peer(proxy.get_stats(&name))
                .await
                .and_then(|json| metrics::archive_sizes(&json));
            if let (Some((original, dedup)), Some(f)) = (sizes, s.profiles.get_mut(&name)) {
                f.original_bytes = Some(original);
                f.deduplicated_bytes = Some(dedup);
            }
        }
    }

    async fn drive_figures(&self, s: &mut metrics::Snapshot) {
        if let Ok(proxy) = sync::SyncProxy::builder(&self.connection)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
        {
            for r in peer(proxy.last_syncs()).await.unwrap_or_default() {
                let f = s.drives.entry(r.drive).or_default();
                f.last_sync = Some(r.time);
                f.copied_bytes = Some(r.bytes);
                f.duration = Some(r.seconds);
                f.free_bytes = Some(r.free);
            }
            for e in peer(proxy.last_failures()).await.unwrap_or_default() {
                let f = s.drives.entry(e.subject).or_default();
                f.last_failure = Some(f.last_failure.unwrap_or(0).max(e.time));
            }
        }
        if let Ok(proxy) = crypt::CryptProxy::builder(&self.connection)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
        {
            for e in peer(proxy.last_failures()).await.unwrap_or_default() {
                let f = s.drives.entry(e.subject).or_default();
                f.last_failure = Some(f.last_failure.unwrap_or(0).max(e.time));
            }
        }
    }

    /// Recounts the outbox, updates the properties and emits their changes.
    async fn refresh_view(&self, last_error: Option<String>) {
        let pending = self.outbox.pending_count() + self.pushes.pending_count();
        let dead = self.outbox.dead_count() + self.pushes.dead_count();
        if let Ok(mut view) = self.view.lock() {
            view.pending = pending;
            view.dead_letters = dead;
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
    }
}

/// Runs the notifier on `connection` until `shutdown` resolves.
pub async fn run(
    connection: zbus::Connection,
    config: Arc<Config>,
    shutdown: Shutdown,
) -> Result<(), ServiceError> {
    let clock = Clock::from_env().map_err(ServiceError::Other)?;
    let dir = config.state_directory.join("notifier");
    let (outbox, pushes) = open_outboxes(&dir)?;
    let ledger_path = dir.join("ledger.json");
    let mut ledger = Ledger::load(&ledger_path);
    // A message spooled just before a crash covers its failures even if the
    // ledger was not written after it.
    let spooled = outbox.all().into_iter().map(|m| m.covers().to_vec());
    let pushed = pushes.all().into_iter().map(|m| m.covers().to_vec());
    for (key, time) in spooled.chain(pushed).flatten() {
        ledger.cover(&key, time);
    }
    let now = clock.now();
    let drives: Vec<String> = config.drives.keys().map(|n| n.to_string()).collect();
    for drive in &drives {
        ledger.first_seen.entry(drive.clone()).or_insert(now);
    }
    if config.mail.is_none() {
        tracing::warn!("ferry.toml has no [mail] section: failures are logged but not mailed");
    }

    let view = Arc::new(Mutex::new(View::default()));
    let (commands, mut requests) = mpsc::channel(16);
    let object = ferry_service::serve(
        &connection,
        notifier::OBJECT_PATH,
        NotifierInterface {
            commands,
            view: view.clone(),
        },
    )
    .await?;

    let (report_tx, mut reports) = mpsc::channel(64);
    let mut tasks = Vec::new();
    let deliverer = config.mail.as_ref().map(|mail| {
        let (d, t) = deliver::spawn(mail.clone(), outbox.clone(), report_tx.clone());
        tasks.push(t);
        d
    });
    let pusher = config.push.as_ref().map(|push| {
        let (d, t) = pushing::spawn(push.clone(), pushes.clone(), report_tx);
        tasks.push(t);
        d
    });

    // Subscribe first, then read the peers: nothing falls between the two.
    // One stream for every interface: SyncFinished (Sync1) is seen before
    // the DriveClosed (Crypt1) that follows it, as the summary needs.
    let mut signals = ferry_service::subscribe_signals(
        &connection,
        &[crypt::INTERFACE, sync::INTERFACE, borg::INTERFACE],
    )
    .await?;
    let mut notifier = Notifier {
        config: config.clone(),
        connection: connection.clone(),
        clock,
        host: compose::hostname(),
        outbox,
        deliverer,
        pushes,
        pusher,
        ledger,
        ledger_path,
        view,
        object,
        synced: BTreeMap::new(),
        drives,
    };
    notifier.refresh_syncs().await;
    notifier.refresh_profiles().await;
    notifier.missed_failures().await;
    notifier.tick().await;
    notifier.refresh_view(None).await;
    notifier.write_metrics().await;
    for deliverer in [&notifier.deliverer, &notifier.pusher]
        .into_iter()
        .flatten()
    {
        // Whatever a previous run left in the outbox goes now.
        deliverer.queued();
    }
    claim_name(&connection, notifier::BUS_NAME, notifier::OBJECT_PATH).await?;

    tokio::pin!(shutdown);
    let result = loop {
        let due = notifier.next_due();
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            message = signals.next() => {
                let Some(signal) = message else {
                    break Err(ServiceError::Other("the bus connection closed".into()));
                };
                if let Some(event) = events::event_of(signal) {
                    tracing::debug!("{event:?}");
                    notifier.handle(event).await;
                    notifier.write_metrics().await;
                }
            }
            Some(command) = requests.recv() => notifier.command(command).await,
            Some(report) = reports.recv() => {
                notifier.report(report).await;
                notifier.write_metrics().await;
            }
            _ = ferry_service::sleep_until(due), if due.is_some() => notifier.tick().await,
        }
    };
    for task in tasks {
        task.abort();
    }
    result
}

/// The mail outbox (`<dir>`) and the push outbox (`<dir>/push`).
fn open_outboxes(dir: &std::path::Path) -> Result<(Outbox, Outbox<PushLetter>), ServiceError> {
    let cannot = |e: std::io::Error| {
        ServiceError::Other(format!(
            "cannot create the outbox under {}: {e}; check state-directory in ferry.toml and its permissions",
            dir.display()
        ))
    };
    Ok((
        Outbox::open(dir).map_err(cannot)?,
        Outbox::open(&dir.join("push")).map_err(cannot)?,
    ))
}

async fn peer<T>(call: impl std::future::Future<Output = zbus::Result<T>>) -> Option<T> {
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
