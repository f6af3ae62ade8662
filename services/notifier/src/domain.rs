//! What ferry-notifier decides, without doing any of it.
//!
//! The rules of the service live here, pure: which peer signal, method
//! request or timer tick becomes which mail or push, what counts as a
//! failure already mailed (across restarts, through the [`Ledger`]), the
//! grouping of identical failures and the hourly limit, staleness, and
//! what a restart makes of what the peers and the outbox hold. Events come
//! in as method calls; effects go out as [`Effect`]s that the adapter
//! (`lib.rs`) carries out in order: spool a mail or pushes durably (and
//! wake their deliverer, emit NotificationQueued), persist the ledger.
//!
//! The domain never asks the bus or the disk: an event that needs to know
//! something of the peers (a FailureHistory, Sync1's LastSyncs, ferry-crypt's
//! health ledger) says so with [`Domain::needs`], the adapter looks it up
//! and hands it in as [`Looked`]. So every rule is unit-tested on its own,
//! the way ferry-drive-watcher's tracker is. Delivery outcomes change
//! nothing here: they only change the outbox and the properties, which are
//! the adapter's.

use std::collections::{BTreeMap, BTreeSet};

use ferry_config::{NotifySettings, Push};
use ferry_interfaces::{
    BackupOutcome, BackupResult, DriveVerification, FailureEvent, ScheduleEntry, SyncRecord,
};
use ferry_service::health_ledger::HealthRecord;

use crate::compose::Draft;
use crate::events::{self, Event, Failure, Source};
use crate::ledger::{Ledger, Staleness, DAY, HOUR};
use crate::push::{self, PushLetter};

/// The failures a ledger entry covers: (ledger key, failure time).
pub type Covers = Vec<(String, u64)>;

/// What the adapter does for the domain, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Compose `draft` as a mail, spool it durably, emit
    /// NotificationQueued and wake the mail deliverer.
    Mail {
        /// What to say.
        draft: Draft,
        /// The failures it reports.
        covers: Covers,
    },
    /// Spool these pushes durably, emit NotificationQueued for each and
    /// wake the push deliverer.
    Push(Vec<PushLetter>),
    /// Write the ledger ([`Domain::ledger`]) to disk.
    Save,
}

/// A method call on org.ferry.Notifier1 that asks for a mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// SendTest.
    Test,
    /// UnitFailed(unit), with the unit's journal lines.
    UnitFailed {
        /// The unit's name (checked).
        unit: String,
        /// Its last journal lines.
        journal: String,
    },
}

/// Why a request is refused; mapped once to org.ferry.Error.Failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No `[mail]` section.
    #[error("nothing can be mailed: ferry.toml has no [mail] section; add one with from and to")]
    NoMail,
}

/// What the rules need of the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Mail is configured (`[mail]`).
    pub mail: bool,
    /// `[push]`, when configured.
    pub push: Option<Push>,
    /// `[notify]`.
    pub notify: NotifySettings,
    /// The enrolled drives (for staleness).
    pub drives: Vec<String>,
    /// This host's name, for the words of a mail.
    pub host: String,
}

/// Borg1's view of the profiles: LastResults and Schedule.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profiles {
    /// LastResults.
    pub results: Vec<BackupResult>,
    /// Schedule.
    pub schedule: Vec<ScheduleEntry>,
}

/// What a peer reports of its failures, as found at a restart.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerFailures {
    /// Its whole FailureHistory (every failure with a unique id).
    History(Vec<FailureEvent>),
    /// Only LastFailures (an older or replacement service).
    Last(Vec<ferry_interfaces::Failure>),
    /// The peer is not there.
    Absent,
}

/// What the adapter must look up before an event is handed in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs {
    /// The FailureHistory of this peer.
    pub history: Option<Source>,
    /// Borg1's LastResults and Schedule.
    pub profiles: bool,
    /// Sync1's LastSyncs and Verification.
    pub syncs: bool,
    /// ferry-crypt's health record of this drive.
    pub health: Option<String>,
}

/// What the adapter found for [`Needs`]; what was not asked for (or not
/// there) is empty.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Looked {
    /// The FailureHistory asked for; None when the peer has none.
    pub history: Option<Vec<FailureEvent>>,
    /// Borg1's profiles; None when Borg1 is not there.
    pub profiles: Option<Profiles>,
    /// Sync1's LastSyncs.
    pub syncs: Vec<SyncRecord>,
    /// Sync1's Verification.
    pub verification: Vec<DriveVerification>,
    /// The drive's health record.
    pub health: Option<HealthRecord>,
}

/// What a restart finds on the bus, for [`Domain::recover`].
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// Sync1's LastSyncs.
    pub syncs: Vec<SyncRecord>,
    /// Borg1's profiles; None when Borg1 is not there.
    pub profiles: Option<Profiles>,
    /// Each peer's failures, crypt, sync, borg.
    pub failures: Vec<(Source, PeerFailures)>,
}

/// The notifier's rules and what they remember.
#[derive(Debug)]
pub struct Domain {
    settings: Settings,
    ledger: Ledger,
    /// Drives whose sync finished and that are not closed yet (for the
    /// success summary): bytes and seconds.
    synced: BTreeMap<String, (u64, f64)>,
}

impl Domain {
    /// The domain after a restart, from the ledger on disk (a new one when
    /// there was none or it was moved aside) and the failures the letters
    /// still in the outboxes report: a letter spooled just before a crash
    /// covers its failures even if the ledger was not written after it.
    pub fn rebuild(settings: Settings, mut ledger: Ledger, spooled: Covers, now: u64) -> Domain {
        for (key, time) in spooled {
            ledger.cover(&key, time);
        }
        for drive in &settings.drives {
            ledger.first_seen.entry(drive.clone()).or_insert(now);
        }
        Domain {
            settings,
            ledger,
            synced: BTreeMap::new(),
        }
    }

    /// What the notifier remembers, to be persisted on [`Effect::Save`].
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The plan after a restart: learn the peers' syncs and profiles, then
    /// mail every failure they report that was not mailed before (the whole
    /// FailureHistory, or LastFailures where there is none).
    pub fn recover(&mut self, found: Found, now: u64) -> Vec<Effect> {
        self.learn_syncs(&found.syncs);
        if let Some(profiles) = &found.profiles {
            self.learn_profiles(profiles);
        }
        let mut effects = Vec::new();
        let mut last = Vec::new();
        for (source, failures) in found.failures {
            match failures {
                PeerFailures::History(history) => {
                    effects.extend(self.mail_history(source, history, true, now))
                }
                PeerFailures::Last(failures) => {
                    last.extend(failures.into_iter().map(|f| (source, f)))
                }
                PeerFailures::Absent => {}
            }
        }
        for (source, f) in last {
            let failure = Failure {
                source,
                subject: f.subject,
                stage: f.stage,
                message: f.message,
                job: None,
            };
            if self.ledger.is_new_failure(&failure.ledger_key(), f.time) {
                effects.extend(self.failure(failure, f.time, true, None, now));
            }
        }
        effects
    }

    /// What must be looked up before `event` is handed to [`Domain::signal`].
    pub fn needs(&self, event: &Event) -> Needs {
        match event {
            Event::Failed(failure) => Needs {
                history: Some(failure.source),
                profiles: failure.source == Source::Borg,
                ..Needs::default()
            },
            Event::DriveClosed(drive) => Needs {
                syncs: self.synced.contains_key(drive),
                ..Needs::default()
            },
            Event::BackupFinished { .. } => Needs {
                profiles: true,
                ..Needs::default()
            },
            Event::DriveOpened(drive) => Needs {
                health: Some(drive.clone()),
                ..Needs::default()
            },
            _ => Needs::default(),
        }
    }

    /// A peer's signal, with what [`Domain::needs`] asked for.
    pub fn signal(&mut self, event: Event, looked: Looked, now: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        if let Some(push) = &self.settings.push {
            let host = &self.settings.host;
            if let Some(letter) = push::ping_of_event(push, &event, now, host) {
                effects.push(Effect::Push(vec![letter]));
            }
        }
        if let Some(profiles) = &looked.profiles {
            self.learn_profiles(profiles);
        }
        match event {
            Event::DriveOpened(drive) => {
                effects.extend(self.health_warning(&drive, looked.health, now))
            }
            Event::BackupStarted { .. }
            | Event::BackupFinishedWithWarnings { .. }
            | Event::BackupSkipped { .. } => {}
            Event::Failed(failure) => effects.extend(self.failed(failure, looked.history, now)),
            Event::SyncFinished {
                drive,
                bytes,
                seconds,
            } => {
                let last = self.ledger.last_sync.entry(drive.clone()).or_insert(0);
                *last = (*last).max(now);
                effects.push(Effect::Save);
                if self.settings.notify.sync_success {
                    self.synced.insert(drive, (bytes, seconds));
                }
            }
            Event::DriveClosed(drive) => effects.extend(self.drive_closed(&drive, &looked, now)),
            Event::BackupFinished {
                job,
                profile,
                archive,
            } => {
                let entry = self.ledger.profiles.entry(profile.clone()).or_default();
                entry.last_success = entry.last_success.max(now);
                if self.settings.notify.backup_success {
                    let results = looked.profiles.map(|p| p.results).unwrap_or_default();
                    let result = results.iter().find(|r| r.profile == profile);
                    let host = &self.settings.host;
                    let draft =
                        events::backup_success_draft(&job, &profile, &archive, result, host);
                    effects.extend(self.limited(draft, Vec::new(), now));
                }
                effects.push(Effect::Save);
            }
        }
        effects
    }

    /// A method request; Err when it cannot be done at all.
    pub fn request(&mut self, request: Request, now: u64) -> Result<Vec<Effect>, Refusal> {
        if !self.settings.mail {
            return Err(Refusal::NoMail);
        }
        let host = &self.settings.host;
        match request {
            Request::Test => Ok(vec![Effect::Mail {
                draft: events::test_draft(now, host),
                covers: Vec::new(),
            }]),
            Request::UnitFailed { unit, journal } => {
                let draft = events::unit_failed_draft(&unit, &journal, now, host);
                let max = self.settings.notify.max_per_hour;
                let admitted = self
                    .ledger
                    .admit_failure(&format!("unit/{unit}"), draft, now, self.window())
                    .and_then(|d| self.ledger.rate_limit(d, now, max));
                let mut effects: Vec<Effect> = admitted
                    .map(|draft| Effect::Mail {
                        draft,
                        covers: Vec::new(),
                    })
                    .into_iter()
                    .collect();
                effects.push(Effect::Save);
                Ok(effects)
            }
        }
    }

    /// Whatever is due at `now`: follow-ups of grouped failures, the
    /// digest, stale drives, scrubs overdue (from Sync1's `verification`)
    /// and stale profiles.
    pub fn tick(&mut self, verification: &[DriveVerification], now: u64) -> Vec<Effect> {
        let window = self.window();
        let max = self.settings.notify.max_per_hour;
        let host = self.settings.host.clone();
        let mut effects = Vec::new();
        for draft in self.ledger.close_groups(now, window) {
            effects.extend(self.limited(draft, Vec::new(), now));
        }
        // The digest is what the limit held: not limited again.
        for draft in self.ledger.release_held(now, max) {
            effects.push(Effect::Mail {
                draft,
                covers: Vec::new(),
            });
        }
        let s = self.staleness();
        let mut drafts = Vec::new();
        for (drive, last) in self.ledger.stale_drives(&self.settings.drives, now, s) {
            let days = self.settings.notify.drive_stale_days;
            drafts.push(events::stale_drive_draft(&drive, last, now, days, &host));
        }
        // A drive whose copies were not all re-read within the scrub
        // period: at most once a day.
        for v in verification {
            let key = format!("scrub/{}", v.drive);
            let mailed = self.ledger.stale_mailed.get(&key).copied().unwrap_or(0);
            if v.overdue && now.saturating_sub(mailed) >= DAY {
                self.ledger.stale_mailed.insert(key, now);
                drafts.push(events::scrub_overdue_draft(v, &host));
            }
        }
        for (profile, seen) in self.ledger.stale_profiles(now, s) {
            drafts.push(events::stale_profile_draft(&profile, seen, now, &host));
        }
        for draft in drafts {
            effects.extend(self.limited(draft, Vec::new(), now));
        }
        effects.push(Effect::Save);
        effects
    }

    /// Seconds from `now` until [`Domain::tick`] next has something to do
    /// (at least 1); None when nothing is ever due.
    pub fn next_due(&self, now: u64) -> Option<u64> {
        let due = self
            .ledger
            .next_due(&self.settings.drives, self.staleness(), self.window())?;
        Some(due.saturating_sub(now).max(1))
    }

    fn staleness(&self) -> Staleness {
        Staleness {
            drive_age: u64::from(self.settings.notify.drive_stale_days) * DAY,
            profile_grace: u64::from(self.settings.notify.profile_grace_hours) * HOUR,
        }
    }

    fn window(&self) -> u64 {
        u64::from(self.settings.notify.repeat_window_minutes) * 60
    }

    /// A mail unless the hourly limit holds it for the digest.
    fn limited(&mut self, draft: Draft, covers: Covers, now: u64) -> Option<Effect> {
        let max = self.settings.notify.max_per_hour;
        match self.ledger.rate_limit(draft, now, max) {
            Some(draft) => Some(Effect::Mail { draft, covers }),
            None => {
                tracing::info!("hourly mail limit reached; held for the next digest");
                None
            }
        }
    }

    /// A failure signal: the peer's FailureHistory (when it keeps one) is
    /// the truth; the signal itself is mailed only when the history does
    /// not hold it (a peer that keeps none).
    fn failed(
        &mut self,
        failure: Failure,
        history: Option<Vec<FailureEvent>>,
        now: u64,
    ) -> Vec<Effect> {
        let Some(history) = history else {
            return self.failure(failure, now, false, None, now);
        };
        let covered = history.iter().any(|e| {
            e.subject == failure.subject && e.stage == failure.stage && e.message == failure.message
        });
        let mut effects = self.mail_history(failure.source, history, false, now);
        if !covered {
            effects.extend(self.failure(failure, now, false, None, now));
        }
        effects
    }

    /// Every entry of `source`'s history not mailed before, oldest first;
    /// `late` when found at a restart.
    fn mail_history(
        &mut self,
        source: Source,
        history: Vec<FailureEvent>,
        late: bool,
        now: u64,
    ) -> Vec<Effect> {
        let present: BTreeSet<String> = history.iter().map(|e| e.id.clone()).collect();
        let mut effects = Vec::new();
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
                effects.extend(self.failure(failure, e.time, late, Some(&e.id), now));
            }
        }
        let present: BTreeSet<&str> = present.iter().map(String::as_str).collect();
        self.ledger.keep_events(source.key(), &present);
        effects.push(Effect::Save);
        effects
    }

    /// One failure at `when` (`late`: found at a restart), FailureHistory
    /// entry `event` when it has an id: counted, pushed, and mailed unless
    /// an identical one was mailed within the window.
    fn failure(
        &mut self,
        failure: Failure,
        when: u64,
        late: bool,
        event: Option<&str>,
        now: u64,
    ) -> Vec<Effect> {
        tracing::info!(
            "{} {} failed at {}: {}",
            failure.source.key(),
            failure.subject,
            failure.stage,
            failure.message
        );
        let host = self.settings.host.clone();
        let draft = failure.draft(when, late, &host);
        let key = failure.ledger_key();
        let mut covers = vec![(key.clone(), when)];
        if let Some(id) = event {
            covers.push((format!("{}#{id}", failure.source.key()), when));
        }
        *self
            .ledger
            .failures
            .entry(failure.source.service().to_string())
            .or_insert(0) += 1;
        let mut effects = Vec::new();
        if let Some(push) = &self.settings.push {
            let letters = push::pushes_of_failure(push, &failure, when, late, &host, &covers);
            if !letters.is_empty() {
                effects.push(Effect::Push(letters));
            }
        }
        let window = self.window();
        match self
            .ledger
            .admit_failure(&failure.group_key(), draft, now, window)
        {
            Some(draft) => effects.extend(self.limited(draft, covers, now)),
            None => {
                tracing::info!(
                    "an identical failure was mailed recently; counted for the follow-up"
                )
            }
        }
        self.ledger.mark_mailed(&key, when);
        if let Some(id) = event {
            self.ledger.mark_event(failure.source.key(), id);
        }
        effects.push(Effect::Save);
        effects
    }

    /// ferry-crypt opened `drive` under `health = "warn"` with a failing
    /// or degraded reading: mailed (and pushed to ntfy) once per reading.
    fn health_warning(
        &mut self,
        drive: &str,
        record: Option<HealthRecord>,
        now: u64,
    ) -> Vec<Effect> {
        let Some(record) = record.filter(|r| r.decision == "warn") else {
            return Vec::new();
        };
        if self.ledger.health_warned.get(drive) >= Some(&record.time) {
            return Vec::new();
        }
        let draft = events::health_warning_draft(drive, &record, &self.settings.host);
        let mut effects = Vec::new();
        if let Some(ntfy) = self.settings.push.as_ref().and_then(|p| p.ntfy.as_ref()) {
            let letter = push::ntfy_letter(ntfy, &draft.subject, draft.body.clone(), now);
            effects.push(Effect::Push(vec![letter]));
        }
        effects.extend(self.limited(draft, Vec::new(), now));
        self.ledger
            .health_warned
            .insert(drive.to_string(), record.time);
        effects.push(Effect::Save);
        effects
    }

    /// A synced drive was closed: the success summary (with sync_success).
    fn drive_closed(&mut self, drive: &str, looked: &Looked, now: u64) -> Vec<Effect> {
        let Some((bytes, seconds)) = self.synced.remove(drive) else {
            return Vec::new();
        };
        let record = looked.syncs.iter().find(|r| r.drive == drive);
        let verification = looked.verification.iter().find(|v| v.drive == drive);
        let host = &self.settings.host;
        let draft = events::sync_success_draft(drive, bytes, seconds, record, verification, host);
        let mut effects: Vec<Effect> = self.limited(draft, Vec::new(), now).into_iter().collect();
        effects.push(Effect::Save);
        effects
    }

    /// Each drive's last sync, from Sync1's LastSyncs.
    fn learn_syncs(&mut self, syncs: &[SyncRecord]) {
        for record in syncs {
            let last = self
                .ledger
                .last_sync
                .entry(record.drive.clone())
                .or_insert(0);
            *last = (*last).max(record.time);
        }
    }

    /// Each profile's schedule and last success, from Borg1.
    fn learn_profiles(&mut self, profiles: &Profiles) {
        for entry in &profiles.schedule {
            self.ledger
                .profiles
                .entry(entry.profile.clone())
                .or_default()
                .due = entry.due;
        }
        for result in &profiles.results {
            if BackupOutcome::from_wire(&result.outcome) == Some(BackupOutcome::Finished) {
                let seen = self
                    .ledger
                    .profiles
                    .entry(result.profile.clone())
                    .or_default();
                seen.last_success = seen.last_success.max(result.time);
            }
        }
    }
}

#[cfg(test)]
mod tests;
