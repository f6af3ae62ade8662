//! The one state the LED shows, derived from per-subject facts.
//!
//! Pure logic, no bus: events go in, the state comes out. A person acts on
//! the LED without reading logs, so every colour must be true:
//!
//! - Each failure belongs to its subject (a drive, a backup profile) and is
//!   cleared only by a later success of that same subject (a drive's sync
//!   finished in a flow without failure; a profile's backup finished without
//!   warnings) or by Acknowledge — never by an unrelated event, a detach, a
//!   close or a restart. A backup that finished with borg warnings is a fact
//!   that needs a person too: it shows as failed, with the warnings.
//! - A drive is *done* (green, "safe to remove") only when its flow ended
//!   without failure and it is still attached. A drive whose configuration
//!   powers it off after the flow goes away (the detach arrives before
//!   DriveClosed): its flow holds until DriveClosed, then it is done with
//!   the reason "powered off", until it is plugged in again or acknowledged
//!   — the LED cannot see a powered-off drive being unplugged.
//! - *Working* lasts exactly as long as a drive's flow or a backup job: a
//!   re-announced DriveAttached for a drive already known to be attached
//!   (the watcher restarted) starts nothing.
//!
//! Failed wins over working, working over done.
//!
//! A drive's health warning (ferry-crypt opened it although its SMART
//! reading is degraded or failing, under `health = "warn"`: Crypt1.Health
//! with decision `warn`) is a fact of its own subject, the drive's health.
//! The LED has no colour for "fine, but replace this drive soon", and a
//! warning is not a failure of anything ferry did: it never changes the
//! colour (a good flow still ends green, "safe to remove"), and it is
//! added to the Reason in every state, idle included ("health warning:
//! NAME: …"), so `ferryctl status` and busctl show it next to the colour.
//! Only the same drive's next reading that passes, a reading that refuses
//! it (that is DriveFailed, red), or Acknowledge clears it — never a sync,
//! a close, a detach or a restart; a reading smartctl could not take
//! (unavailable) says nothing new and leaves it standing. A reading is a
//! new fact once: the property repeats every drive's last reading, and a
//! repeat neither raises an acknowledged warning again nor clears one.
//!
//! At start the facts come from the peers' properties ([`PeerFacts`]): their
//! persisted failures, each compared with the same subject's last success
//! and with the last Acknowledge.

use std::collections::BTreeMap;

use ferry_interfaces::{
    BackupOutcome, BackupResult, CryptDrive, CryptState, DriveHealth, Failure, FerrySignal,
    HealthDecision, HealthVerdict,
};

pub use ferry_interfaces::LedState;

/// Whom a failure belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Subject {
    /// An enrolled drive.
    Drive(String),
    /// A backup profile.
    Profile(String),
}

/// What the configuration says about a drive, as far as the LED cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrivePolicy {
    /// ferry-crypt opens it when it is plugged in (a flow starts).
    pub opens_on_attach: bool,
    /// ferry-crypt powers it off after closing it (it detaches first).
    pub powers_off: bool,
}

impl Default for DrivePolicy {
    fn default() -> Self {
        DrivePolicy {
            opens_on_attach: true,
            powers_off: false,
        }
    }
}

/// A fact from another service's signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// DriveAttached.
    DriveAttached(String),
    /// DriveDetached.
    DriveDetached(String),
    /// DriveOpened, DriveHeld, SyncStarted: the drive's flow is under way
    /// (a held drive is in a person's use until DriveClosed).
    DriveBusy(String),
    /// SyncFinished: the drive's success.
    SyncFinished(String),
    /// DriveClosed: unmounted and locked.
    DriveClosed(String),
    /// DriveFailed(drive, reason): the flow ended in failure.
    DriveFailed(String, String),
    /// SyncFailed(drive, reason): the flow failed; ferry-crypt closes next.
    SyncFailed(String, String),
    /// BackupStarted.
    BackupStarted {
        /// The job id.
        job: String,
        /// Its profile.
        profile: String,
    },
    /// BackupFinished: the profile's success.
    BackupFinished {
        /// The job id.
        job: String,
        /// Its profile.
        profile: String,
    },
    /// BackupFinishedWithWarnings: an archive was made, borg warned.
    BackupWarned {
        /// The job id.
        job: String,
        /// Its profile.
        profile: String,
        /// borg's warnings, for a person.
        reason: String,
    },
    /// BackupFailed.
    BackupFailed {
        /// The job id.
        job: String,
        /// Its profile.
        profile: String,
        /// The stage and message, for a person.
        reason: String,
    },
    /// BackupSkipped: not a success, not a failure.
    BackupSkipped {
        /// The job id.
        job: String,
    },
    /// Crypt1.Health changed (or was read): every drive's latest SMART
    /// reading.
    Health(Vec<DriveHealth>),
    /// The Acknowledge method.
    Acknowledge,
}

impl Event {
    /// What a ferry signal tells the LED; `None` for one it does not act on
    /// (progress, its own ColorChanged, the notifier's).
    pub fn from_signal(signal: FerrySignal) -> Option<Event> {
        use FerrySignal as S;
        Some(match signal {
            S::DriveAttached { drive, .. } => Event::DriveAttached(drive),
            S::DriveDetached { drive, .. } => Event::DriveDetached(drive),
            // A drive held open for a person is in use, not safe to remove,
            // until its DriveClosed.
            S::DriveOpened { drive, .. } | S::DriveHeld { drive, .. } => Event::DriveBusy(drive),
            S::SyncStarted { drive, .. } => Event::DriveBusy(drive),
            S::DriveClosed { drive } => Event::DriveClosed(drive),
            S::DriveFailed {
                drive,
                stage,
                message,
            } => Event::DriveFailed(drive, format!("{stage}: {message}")),
            S::SyncFinished { drive, .. } => Event::SyncFinished(drive),
            S::SyncFailed {
                drive,
                stage,
                message,
            } => Event::SyncFailed(drive, format!("sync {stage}: {message}")),
            S::BackupStarted { job, profile } => Event::BackupStarted { job, profile },
            S::BackupFinished { job, profile, .. } => Event::BackupFinished { job, profile },
            S::BackupFinishedWithWarnings {
                job,
                profile,
                warnings,
                ..
            } => Event::BackupWarned {
                job,
                profile,
                reason: format!("finished with warnings: {warnings}"),
            },
            S::BackupFailed {
                job,
                profile,
                stage,
                message,
            } => Event::BackupFailed {
                job,
                profile,
                reason: format!("{stage}: {message}"),
            },
            S::BackupSkipped { job, .. } => Event::BackupSkipped { job },
            S::SyncProgress { .. }
            | S::BackupProgress { .. }
            | S::ColorChanged { .. }
            | S::NotificationSent { .. }
            | S::NotificationQueued { .. } => return None,
        })
    }
}

/// A drive's flow in progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Flow {
    /// A failure happened during this flow.
    failed: bool,
    /// SyncFinished arrived (the close is next).
    synced: bool,
    /// The drive went away after SyncFinished because it is powered off.
    powered_off: bool,
}

/// Why a drive shows as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    /// Closed after a good flow and still plugged in.
    Present,
    /// Closed after a good flow and powered off by ferry-crypt.
    PoweredOff,
}

/// Everything the LED knows about one drive.
#[derive(Debug, Clone, Default)]
struct DriveFacts {
    attached: bool,
    flow: Option<Flow>,
    done: Option<Done>,
}

/// Everything the LED remembers.
#[derive(Debug, Default, Clone)]
pub struct Indicator {
    policies: BTreeMap<String, DrivePolicy>,
    drives: BTreeMap<String, DriveFacts>,
    /// Running backup jobs, by job id, with their profile.
    jobs: BTreeMap<String, String>,
    /// The failure (or warning) each subject has until its success or Acknowledge.
    failures: BTreeMap<Subject, String>,
    /// Each drive's standing health warning, until a reading that passes,
    /// a refusal or Acknowledge.
    health_warnings: BTreeMap<String, String>,
    /// The time of each drive's last reading taken as a fact (a repeat of
    /// it in Crypt1.Health is not a new one).
    health_seen: BTreeMap<String, u64>,
    /// The unix time of the last Acknowledge, as far as known (0: never):
    /// a warning read before it is not raised again, also when this LED
    /// sees the reading for the first time (ferry-crypt started later).
    acknowledged: u64,
}

impl Indicator {
    /// An indicator for drives configured as `policies` (a drive missing
    /// there gets the defaults).
    pub fn new(policies: BTreeMap<String, DrivePolicy>) -> Indicator {
        Indicator {
            policies,
            ..Indicator::default()
        }
    }

    fn policy(&self, drive: &str) -> DrivePolicy {
        self.policies.get(drive).copied().unwrap_or_default()
    }

    fn drive(&mut self, drive: &str) -> &mut DriveFacts {
        self.drives.entry(drive.to_string()).or_default()
    }

    /// Applies one event.
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::BackupStarted { .. }
            | Event::BackupFinished { .. }
            | Event::BackupWarned { .. }
            | Event::BackupFailed { .. }
            | Event::BackupSkipped { .. } => self.apply_backup(event),
            Event::Health(readings) => self.apply_health(&readings),
            Event::Acknowledge => {
                self.failures.clear();
                self.health_warnings.clear();
                for facts in self.drives.values_mut() {
                    if facts.done == Some(Done::PoweredOff) {
                        facts.done = None;
                    }
                }
            }
            _ => self.apply_drive(event),
        }
        self.drives
            .retain(|_, f| f.attached || f.flow.is_some() || f.done.is_some());
    }

    /// Applies an event about a drive.
    fn apply_drive(&mut self, event: Event) {
        match event {
            Event::DriveAttached(drive) => {
                let opens = self.policy(&drive).opens_on_attach;
                let facts = self.drive(&drive);
                // Already known to be plugged in: the watcher announced it
                // again (a restart, a Rescan). ferry-crypt does not reopen
                // such a drive, so nothing starts; DriveOpened would say so.
                if !facts.attached {
                    facts.attached = true;
                    facts.done = None;
                    if opens {
                        facts.flow.get_or_insert_with(Flow::default);
                    }
                }
            }
            Event::DriveBusy(drive) => {
                let facts = self.drive(&drive);
                facts.attached = true;
                facts.done = None;
                facts.flow.get_or_insert_with(Flow::default);
            }
            Event::DriveDetached(drive) => {
                let powers_off = self.policy(&drive).powers_off;
                let facts = self.drive(&drive);
                facts.attached = false;
                facts.done = None;
                facts.flow = match facts.flow {
                    // ferry-crypt powers the drive off after a good sync and
                    // says DriveClosed after the detach: the flow goes on.
                    Some(mut flow) if powers_off && flow.synced && !flow.failed => {
                        flow.powered_off = true;
                        Some(flow)
                    }
                    _ => None,
                };
            }
            Event::SyncFinished(drive) => {
                let failed_flow = self.drive(&drive).flow.is_some_and(|f| f.failed);
                if !failed_flow {
                    if let Some(flow) = self.drive(&drive).flow.as_mut() {
                        flow.synced = true;
                    }
                    self.failures.remove(&Subject::Drive(drive));
                }
            }
            Event::DriveClosed(drive) => {
                let failing = self.failures.contains_key(&Subject::Drive(drive.clone()));
                let facts = self.drive(&drive);
                let clean = !failing && !facts.flow.is_some_and(|f| f.failed);
                let powered_off = facts.flow.is_some_and(|f| f.powered_off);
                facts.flow = None;
                facts.done = match (clean, facts.attached, powered_off) {
                    (true, true, _) => Some(Done::Present),
                    (true, false, true) => Some(Done::PoweredOff),
                    _ => None,
                };
            }
            Event::DriveFailed(drive, reason) => {
                let facts = self.drive(&drive);
                facts.flow = None;
                facts.done = None;
                self.failures
                    .insert(Subject::Drive(drive.clone()), format!("{drive}: {reason}"));
            }
            Event::SyncFailed(drive, reason) => {
                let facts = self.drive(&drive);
                if let Some(flow) = facts.flow.as_mut() {
                    flow.failed = true;
                }
                facts.done = None;
                self.failures
                    .insert(Subject::Drive(drive.clone()), format!("{drive}: {reason}"));
            }
            _ => {}
        }
    }

    /// Records when the last Acknowledge happened (unix time), beside
    /// [`Event::Acknowledge`], which clears what stands now.
    pub fn acknowledged_at(&mut self, time: u64) {
        self.acknowledged = self.acknowledged.max(time);
    }

    /// Takes the readings newer than those already seen and than the last
    /// Acknowledge as facts.
    fn apply_health(&mut self, readings: &[DriveHealth]) {
        let acknowledged = self.acknowledged;
        for reading in readings {
            if self.health_seen.get(&reading.drive) == Some(&reading.time) {
                continue;
            }
            self.health_seen.insert(reading.drive.clone(), reading.time);
            let verdict = HealthVerdict::from_wire(&reading.verdict);
            match HealthDecision::from_wire(&reading.decision) {
                Some(HealthDecision::Warn) if reading.time > acknowledged => {
                    let verdict = verdict.map_or("bad", HealthVerdict::as_str);
                    self.health_warnings.insert(
                        reading.drive.clone(),
                        format!(
                            "{}: health {verdict} ({}), used anyway",
                            reading.drive, reading.summary
                        ),
                    );
                }
                Some(HealthDecision::Open) if verdict == Some(HealthVerdict::Unavailable) => {}
                Some(HealthDecision::Open | HealthDecision::Refuse) => {
                    self.health_warnings.remove(&reading.drive);
                }
                _ => {}
            }
        }
    }

    /// Applies an event about a backup job.
    fn apply_backup(&mut self, event: Event) {
        match event {
            Event::BackupStarted { job, profile } => {
                self.jobs.insert(job, profile);
            }
            Event::BackupFinished { job, profile } => {
                self.jobs.remove(&job);
                self.failures.remove(&Subject::Profile(profile));
            }
            Event::BackupWarned {
                job,
                profile,
                reason,
            }
            | Event::BackupFailed {
                job,
                profile,
                reason,
            } => {
                self.jobs.remove(&job);
                self.failures.insert(
                    Subject::Profile(profile.clone()),
                    format!("backup {profile}: {reason}"),
                );
            }
            Event::BackupSkipped { job } => {
                self.jobs.remove(&job);
            }
            _ => {}
        }
    }

    /// The indicator the peers' state describes (at start).
    pub fn from_peers(policies: BTreeMap<String, DrivePolicy>, facts: &PeerFacts) -> Indicator {
        let mut fresh = Indicator::new(policies);
        fresh.failures = facts.current_failures();
        fresh.acknowledged = facts.acknowledged;
        fresh.apply_health(&facts.drive_health);
        fresh.take_activity(facts);
        fresh
    }

    /// After a peer restarted: what is running and attached comes from the
    /// peers again; the failures stay as this LED saw them (it was listening
    /// throughout, and a restart is not a success).
    pub fn rebuilt(&self, facts: &PeerFacts) -> Indicator {
        let mut fresh = Indicator::new(self.policies.clone());
        fresh.failures = self.failures.clone();
        fresh.health_warnings = self.health_warnings.clone();
        fresh.health_seen = self.health_seen.clone();
        fresh.acknowledged = self.acknowledged.max(facts.acknowledged);
        fresh.apply_health(&facts.drive_health);
        fresh.take_activity(facts);
        for (name, drive) in &self.drives {
            match (drive.done, fresh.drives.get_mut(name)) {
                // A powered-off drive is on no peer's list; keep saying so.
                (Some(Done::PoweredOff), None) => {
                    fresh.drives.insert(name.clone(), drive.clone());
                }
                // Still plugged in and idle: what this LED saw of its last
                // flow holds (the watcher alone cannot tell a closed drive).
                (Some(Done::Present), Some(now)) if now.attached && now.flow.is_none() => {
                    now.done = Some(Done::Present);
                }
                _ => {}
            }
        }
        fresh
    }

    /// Drives and jobs from the peers' properties.
    fn take_activity(&mut self, facts: &PeerFacts) {
        match &facts.crypt_drives {
            Some(drives) => {
                for d in drives {
                    let failing = self.failures.contains_key(&Subject::Drive(d.name.clone()));
                    let attached = !d.device.is_empty();
                    let facts = self.drive(&d.name);
                    facts.attached = attached;
                    use CryptState::{Closing, Held, Open, Opening};
                    if let Some(Opening | Open | Held | Closing) = CryptState::from_wire(&d.state) {
                        facts.attached = true;
                        // A flow that began before a failure still on
                        // record cannot be told from one after it.
                        facts.flow = Some(Flow {
                            failed: failing,
                            ..Flow::default()
                        });
                    }
                }
            }
            None => {
                for name in &facts.watcher_attached {
                    self.drive(name).attached = true;
                }
            }
        }
        if let Some(drives) = &facts.crypt_drives {
            for d in drives {
                let closed = CryptState::from_wire(&d.state) == Some(CryptState::Closed);
                if closed && !d.device.is_empty() && facts.ended_well(&d.name) {
                    self.drive(&d.name).done = Some(Done::Present);
                }
            }
        }
        for drive in &facts.sync_running {
            let failing = self.failures.contains_key(&Subject::Drive(drive.clone()));
            let facts = self.drive(drive);
            facts.attached = true;
            facts.done = None;
            facts.flow.get_or_insert(Flow {
                failed: failing,
                ..Flow::default()
            });
        }
        for (job, profile) in &facts.backup_jobs {
            self.jobs.insert(job.clone(), profile.clone());
        }
        self.drives
            .retain(|_, f| f.attached || f.flow.is_some() || f.done.is_some());
    }

    /// The state shown now.
    pub fn state(&self) -> LedState {
        if !self.failures.is_empty() {
            LedState::Failed
        } else if !self.jobs.is_empty() || self.drives.values().any(|d| d.flow.is_some()) {
            LedState::Working
        } else if self.drives.values().any(|d| d.done.is_some()) {
            LedState::Done
        } else {
            LedState::Idle
        }
    }

    /// Why, for the Reason property: the state's reason, then the standing
    /// health warnings.
    pub fn reason(&self) -> String {
        let mut parts = vec![self.state_reason()];
        if !self.health_warnings.is_empty() {
            let warnings: Vec<&str> = self.health_warnings.values().map(String::as_str).collect();
            parts.push(format!("health warning: {}", warnings.join("; ")));
        }
        parts.retain(|p| !p.is_empty());
        parts.join("; ")
    }

    /// Why the LED is in its state.
    fn state_reason(&self) -> String {
        match self.state() {
            LedState::Failed => self
                .failures
                .values()
                .cloned()
                .collect::<Vec<_>>()
                .join("; "),
            LedState::Working => {
                let mut busy: Vec<String> = self
                    .drives
                    .iter()
                    .filter(|(_, d)| d.flow.is_some())
                    .map(|(name, _)| name.clone())
                    .collect();
                busy.extend(self.jobs.keys().map(|j| format!("backup {j}")));
                format!("busy: {}", busy.join(", "))
            }
            LedState::Done => {
                let named = |which: Done| {
                    self.drives
                        .iter()
                        .filter(|(_, d)| d.done == Some(which))
                        .map(|(name, _)| name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let present = named(Done::Present);
                let off = named(Done::PoweredOff);
                let mut parts = Vec::new();
                if !present.is_empty() {
                    parts.push(format!("safe to remove: {present}"));
                }
                if !off.is_empty() {
                    parts.push(format!("powered off, safe to unplug: {off}"));
                }
                parts.join("; ")
            }
            LedState::Idle => String::new(),
        }
    }
}

/// What the peers' properties say, read at start.
#[derive(Debug, Clone, Default)]
pub struct PeerFacts {
    /// Crypt1.Drives; None when ferry-crypt is not on the bus.
    pub crypt_drives: Option<Vec<CryptDrive>>,
    /// Drives DriveWatcher1.Drives says are attached (used without crypt).
    pub watcher_attached: Vec<String>,
    /// Drives Sync1.Running syncs now.
    pub sync_running: Vec<String>,
    /// Crypt1.Health: each drive's latest SMART reading.
    pub drive_health: Vec<DriveHealth>,
    /// Crypt1.LastFailures and Sync1.LastFailures (subject = drive).
    pub drive_failures: Vec<Failure>,
    /// Sync1.LastSyncs: per drive, the unix time of its last success.
    pub drive_successes: BTreeMap<String, u64>,
    /// Borg1.Jobs as (job, profile).
    pub backup_jobs: Vec<(String, String)>,
    /// Borg1.LastResults.
    pub backup_results: Vec<BackupResult>,
    /// Borg1.LastFailures (subject = profile).
    pub backup_failures: Vec<Failure>,
    /// Borg1.Schedule's last success per profile (unix time).
    pub backup_successes: BTreeMap<String, u64>,
    /// The unix time of the last Acknowledge (0: never).
    pub acknowledged: u64,
}

impl PeerFacts {
    /// Whether a drive's last recorded event is a success (no failure of
    /// it since, acknowledged or not).
    fn ended_well(&self, drive: &str) -> bool {
        let success = self.drive_successes.get(drive).copied();
        let last_failure = self
            .drive_failures
            .iter()
            .filter(|f| f.subject == drive)
            .map(|f| f.time)
            .max();
        match (success, last_failure) {
            (_, None) => true,
            (Some(s), Some(f)) => s > f,
            (None, Some(_)) => false,
        }
    }

    /// The failures still standing: newer than the subject's last success
    /// (a tie counts as standing) and than the last Acknowledge.
    pub fn current_failures(&self) -> BTreeMap<Subject, String> {
        let mut current = BTreeMap::new();
        for f in &self.drive_failures {
            let cleared = self
                .drive_successes
                .get(&f.subject)
                .is_some_and(|&s| s > f.time);
            if !cleared && f.time > self.acknowledged {
                let subject = Subject::Drive(f.subject.clone());
                let newer = current
                    .get(&subject)
                    .is_some_and(|(t, _): &(u64, _)| *t > f.time);
                if !newer {
                    current.insert(
                        subject,
                        (f.time, format!("{}: {}: {}", f.subject, f.stage, f.message)),
                    );
                }
            }
        }
        for result in &self.backup_results {
            let subject = Subject::Profile(result.profile.clone());
            let standing_failure = || {
                let success = self
                    .backup_successes
                    .get(&result.profile)
                    .copied()
                    .unwrap_or(0);
                self.backup_failures
                    .iter()
                    .filter(|f| f.subject == result.profile)
                    .filter(|f| f.time >= success && f.time > self.acknowledged)
                    .max_by_key(|f| f.time)
                    .map(|f| format!("backup {}: {}: {}", f.subject, f.stage, f.message))
            };
            let reason = match BackupOutcome::from_wire(&result.outcome) {
                Some(BackupOutcome::FinishedWithWarnings) if result.time > self.acknowledged => {
                    Some(format!(
                        "backup {}: finished with warnings: {}",
                        result.profile, result.message
                    ))
                }
                // The last run failed: its failure, even if the peer keeps
                // no LastFailures entry for it.
                Some(BackupOutcome::Failed) if result.time > self.acknowledged => {
                    standing_failure()
                        .or_else(|| Some(format!("backup {}: {}", result.profile, result.message)))
                }
                Some(BackupOutcome::Skipped) => standing_failure(),
                _ => None,
            };
            if let Some(reason) = reason {
                current.insert(subject, (result.time, reason));
            }
        }
        current.into_iter().map(|(s, (_, r))| (s, r)).collect()
    }
}

#[cfg(test)]
mod tests;
