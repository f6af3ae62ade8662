//! What ferry-sync decides, without doing any of it.
//!
//! The rules of the service, pure: which drive has a job running and what
//! it is doing (Sync1.Running), when a Start or Cancel is refused, and
//! what a job's reports make of the ledger (LastSyncs, LastFailures,
//! FailureHistory, Verification — overdue included — and the newest
//! archives remembered by transaction). Jobs report as
//! [`Report`]s (see [`crate::job`], which sends them over a channel instead
//! of reaching into the bus); the adapter (`lib.rs`) applies each to
//! [`State`] and carries out the [`Effect`]s in order: persist the ledger,
//! publish the properties, then emit the signal, so that a subscriber
//! reacting to a signal reads properties that agree with it. Nothing here
//! touches the bus, a runtime, a drive or the disk, so every rule is
//! unit-tested on its own, as ferry-crypt's domain is.

use std::collections::BTreeMap;

use ferry_interfaces::{DriveVerification, Failure, SyncJob, SyncRecord};

use crate::job::{self, Phase, Summary};
use crate::ledger::Ledger;
use crate::listings::Listed;
use crate::verify;

/// What a job reports about itself, in order.
#[derive(Debug, Clone)]
pub enum Report {
    /// Copying `repository` begins (`done` of `total` bytes so far).
    Started {
        repository: String,
        done: u64,
        total: u64,
    },
    /// Bytes copied so far.
    Progress { done: u64, total: u64 },
    /// The job entered `phase` on `repository`; `detail` says more (who
    /// holds borg's lock) or is empty.
    Phase {
        repository: String,
        phase: Phase,
        detail: String,
    },
    /// It succeeded; its data is durable.
    Finished { summary: Summary, seconds: f64 },
    /// It failed; the message says what the drive holds.
    Failed(job::Failure),
    /// `repository`'s newest archive was listed at a transaction not
    /// remembered before (by a job, or when a backup ended).
    Listed { repository: String, listed: Listed },
}

/// A signal of org.ferry.Sync1 to emit.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    Started {
        drive: String,
        repository: String,
    },
    Progress {
        drive: String,
        done: u64,
        total: u64,
        phase: String,
    },
    Finished {
        drive: String,
        bytes: u64,
        seconds: f64,
    },
    Failed {
        drive: String,
        stage: String,
        message: String,
    },
}

/// What the adapter does, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Write the ledger durably.
    SaveLedger,
    /// Sync1.Running changed.
    RunningChanged,
    /// Sync1.LastSyncs changed.
    LastSyncsChanged,
    /// Sync1.Verification changed.
    VerificationChanged,
    /// Sync1.LastFailures changed.
    LastFailuresChanged,
    /// Sync1.FailureHistory changed.
    FailureHistoryChanged,
    /// Emit this signal.
    Emit(Signal),
    /// Write this to the log as a warning.
    Warn(String),
}

/// Why a request is refused, phrased for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No such drive in ferry.toml.
    UnknownDrive(String),
    /// A job of the drive runs already.
    Busy(String),
    /// No job of the drive runs.
    NotRunning(String),
}

impl Refusal {
    /// The D-Bus error it is sent as.
    pub fn into_bus_error(self) -> ferry_interfaces::Error {
        match self {
            Refusal::UnknownDrive(m) => ferry_interfaces::Error::UnknownDrive(m),
            Refusal::Busy(m) => ferry_interfaces::Error::Busy(m),
            Refusal::NotRunning(m) => ferry_interfaces::Error::NotRunning(m),
        }
    }
}

/// The service's state: the running jobs and the ledger.
#[derive(Debug, Default)]
pub struct State {
    running: BTreeMap<String, SyncJob>,
    /// What is persisted.
    pub ledger: Ledger,
    /// `[sync] scrub-period-days`.
    period_days: u64,
}

impl State {
    /// The state after a start: nothing runs; the ledger as loaded.
    pub fn new(ledger: Ledger, period_days: u64) -> State {
        State {
            running: BTreeMap::new(),
            ledger,
            period_days,
        }
    }

    /// Whether a job for `drive` may start, given the enrolled drives.
    pub fn may_start<'a>(
        &self,
        drive: &str,
        enrolled: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Refusal> {
        let enrolled: Vec<&str> = enrolled.into_iter().collect();
        if !enrolled.contains(&drive) {
            return Err(Refusal::UnknownDrive(format!(
                "no drive named `{drive}` is enrolled in ferry.toml (enrolled: {})",
                if enrolled.is_empty() {
                    "none".to_string()
                } else {
                    enrolled.join(", ")
                }
            )));
        }
        if self.running.contains_key(drive) {
            return Err(Refusal::Busy(format!(
                "a sync of {drive} is already running; wait for SyncFinished, or call Cancel"
            )));
        }
        Ok(())
    }

    /// Whether a job of `drive` runs.
    pub fn is_running(&self, drive: &str) -> bool {
        self.running.contains_key(drive)
    }

    /// A job of `drive` starts with `repository` at `now`.
    pub fn begin(&mut self, drive: &str, repository: &str, now: u64) -> Vec<Effect> {
        self.running.insert(
            drive.to_string(),
            SyncJob {
                drive: drive.to_string(),
                repository: repository.to_string(),
                done: 0,
                total: 0,
                phase: Phase::Prepare.as_str().to_string(),
                since: now,
                detail: String::new(),
            },
        );
        vec![Effect::RunningChanged]
    }

    /// The newest archives on `drive`'s copies, as the ledger has them.
    pub fn archives(&self, drive: &str) -> BTreeMap<String, String> {
        self.ledger.archives.get(drive).cloned().unwrap_or_default()
    }

    /// Sync1.Running.
    pub fn running(&self) -> Vec<SyncJob> {
        self.running.values().cloned().collect()
    }

    /// The drives with a job running.
    pub fn running_drives(&self) -> Vec<String> {
        self.running.keys().cloned().collect()
    }

    /// Sync1.Verification at `now`: overdue as of now, not as of the last
    /// sync, so a drive left in a drawer becomes overdue by itself.
    pub fn verification(&self, now: u64) -> Vec<DriveVerification> {
        self.ledger
            .verification
            .values()
            .map(|v| DriveVerification {
                overdue: verify::overdue(v.verified_since, now, self.period_days),
                ..v.clone()
            })
            .collect()
    }

    /// Applies a report of `drive`'s job at `now`.
    pub fn apply(&mut self, drive: &str, report: Report, now: u64) -> Vec<Effect> {
        match report {
            Report::Started {
                repository,
                done,
                total,
            } => {
                self.update(drive, |job| {
                    job.repository = repository.clone();
                    (job.done, job.total) = (done, total);
                });
                let signal = Signal::Started {
                    drive: drive.to_string(),
                    repository,
                };
                vec![Effect::RunningChanged, Effect::Emit(signal)]
            }
            Report::Progress { done, total } => {
                let mut phase = String::new();
                self.update(drive, |job| {
                    (job.done, job.total) = (done, total);
                    phase = job.phase.clone();
                });
                let signal = Signal::Progress {
                    drive: drive.to_string(),
                    done,
                    total,
                    phase,
                };
                vec![Effect::RunningChanged, Effect::Emit(signal)]
            }
            Report::Phase {
                repository,
                phase,
                detail,
            } => self.phase(drive, repository, phase, detail, now),
            Report::Finished { summary, seconds } => self.finished(drive, summary, seconds, now),
            Report::Failed(failure) => self.failed(drive, &failure, now),
            Report::Listed { repository, listed } => self.listed(repository, listed),
        }
    }

    /// Remembers a repository's newest archive at a transaction (the
    /// ledger keeps it, so a restart does not list it again).
    fn listed(&mut self, repository: String, listed: Listed) -> Vec<Effect> {
        if !listed.replaces(self.ledger.listed.get(&repository)) {
            return Vec::new();
        }
        self.ledger.listed.insert(repository, listed);
        vec![Effect::SaveLedger]
    }

    fn update(&mut self, drive: &str, update: impl FnOnce(&mut SyncJob)) {
        if let Some(job) = self.running.get_mut(drive) {
            update(job);
        }
    }

    fn phase(
        &mut self,
        drive: &str,
        repository: String,
        phase: Phase,
        detail: String,
        now: u64,
    ) -> Vec<Effect> {
        let name = phase.as_str().to_string();
        let (mut done, mut total) = (0, 0);
        self.update(drive, |job| {
            job.repository = repository;
            job.phase = name.clone();
            job.since = now;
            job.detail = detail;
            (done, total) = (job.done, job.total);
        });
        let signal = Signal::Progress {
            drive: drive.to_string(),
            done,
            total,
            phase: name,
        };
        vec![Effect::RunningChanged, Effect::Emit(signal)]
    }

    fn finished(&mut self, drive: &str, summary: Summary, seconds: f64, now: u64) -> Vec<Effect> {
        let newest: Vec<String> = summary
            .archives
            .iter()
            .filter(|(_, archive)| !archive.is_empty())
            .map(|(repository, archive)| format!("{repository}::{archive}"))
            .collect();
        let record = SyncRecord {
            drive: drive.to_string(),
            time: now,
            bytes: summary.bytes,
            seconds,
            archive: newest.join(", "),
            free: summary.free,
        };
        let verification = DriveVerification {
            drive: drive.to_string(),
            time: now,
            verified_since: summary.verified_since,
            read: summary.read,
            total: summary.total,
            repaired: summary.repaired,
            overdue: verify::overdue(summary.verified_since, now, self.period_days),
        };
        let mut effects = Vec::new();
        if verification.overdue {
            effects.push(Effect::Warn(format!(
                "{drive}: not every byte on the drive was re-read within the last {} days ([sync] scrub-period-days); give the scrub more time per sync ([sync] scrub-seconds), or plug the drive in more often",
                self.period_days
            )));
        }
        self.ledger.last_syncs.insert(drive.to_string(), record);
        self.ledger
            .archives
            .insert(drive.to_string(), summary.archives);
        self.ledger
            .verification
            .insert(drive.to_string(), verification);
        self.running.remove(drive);
        effects.extend([
            Effect::SaveLedger,
            Effect::RunningChanged,
            Effect::LastSyncsChanged,
            Effect::VerificationChanged,
            Effect::Emit(Signal::Finished {
                drive: drive.to_string(),
                bytes: summary.bytes,
                seconds,
            }),
        ]);
        effects
    }

    fn failed(&mut self, drive: &str, failure: &job::Failure, now: u64) -> Vec<Effect> {
        let stage = failure.stage.as_str();
        self.ledger.last_failures.insert(
            drive.to_string(),
            Failure {
                subject: drive.to_string(),
                time: now,
                stage: stage.to_string(),
                message: failure.message.clone(),
            },
        );
        let event = ferry_service::history::failure_event(drive, stage, &failure.message, "");
        ferry_service::history::remember(&mut self.ledger.failure_history, event);
        self.running.remove(drive);
        vec![
            Effect::SaveLedger,
            Effect::RunningChanged,
            Effect::LastFailuresChanged,
            Effect::FailureHistoryChanged,
            Effect::Emit(Signal::Failed {
                drive: drive.to_string(),
                stage: stage.to_string(),
                message: failure.message.clone(),
            }),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Stage;

    const DAY: u64 = 86_400;

    fn summary(verified_since: u64) -> Summary {
        Summary {
            bytes: 10,
            free: 20,
            archives: BTreeMap::from([
                ("nas".to_string(), "nas-2".to_string()),
                ("photos".to_string(), String::new()),
            ]),
            read: 30,
            repaired: 1,
            verified_since,
            total: 40,
        }
    }

    #[test]
    fn a_listing_is_saved_once_and_a_newer_one_replaces_it() {
        let mut state = State::new(Ledger::default(), 30);
        let listed = |id: u64, archive: &str| Listed {
            transaction: crate::snapshot::Transaction {
                id,
                index_size: 9,
                index_mtime_ns: 7,
            },
            archive: archive.to_string(),
        };
        let report = |l: Listed| Report::Listed {
            repository: "nas".into(),
            listed: l,
        };
        assert_eq!(
            state.apply("", report(listed(3, "nas-3")), 1),
            [Effect::SaveLedger]
        );
        assert!(state.apply("a", report(listed(3, "nas-3")), 2).is_empty());
        assert_eq!(
            state.apply("a", report(listed(4, "nas-4")), 3),
            [Effect::SaveLedger]
        );
        assert_eq!(state.ledger.listed["nas"], listed(4, "nas-4"));
        // An older transaction reported late does not replace a newer one.
        let mut older = listed(3, "nas-3");
        older.transaction.index_mtime_ns = 6;
        assert!(state.apply("a", report(older), 4).is_empty());
        assert_eq!(state.ledger.listed["nas"], listed(4, "nas-4"));
        // Nothing else changes: no job, no signal, no property.
        assert!(state.running().is_empty());
        assert!(state.ledger.last_syncs.is_empty());
    }

    #[test]
    fn start_is_refused_for_a_stranger_and_while_running() {
        let mut state = State::new(Ledger::default(), 30);
        assert!(matches!(
            state.may_start("x", ["a", "b"]),
            Err(Refusal::UnknownDrive(m)) if m.contains("enrolled: a, b")
        ));
        assert_eq!(state.may_start("a", ["a"]), Ok(()));
        assert_eq!(state.begin("a", "nas", 5), [Effect::RunningChanged]);
        assert!(matches!(state.may_start("a", ["a"]), Err(Refusal::Busy(_))));
        assert_eq!(state.running()[0].phase, "prepare");
        assert_eq!(state.running()[0].since, 5);
    }

    #[test]
    fn reports_update_running_then_signal() {
        let mut state = State::new(Ledger::default(), 30);
        state.begin("a", "nas", 5);
        let effects = state.apply(
            "a",
            Report::Phase {
                repository: "photos".into(),
                phase: Phase::LockWait,
                detail: "held by host h, process 7".into(),
            },
            9,
        );
        assert_eq!(effects[0], Effect::RunningChanged);
        let job = &state.running()[0];
        assert_eq!(
            (job.repository.as_str(), job.phase.as_str(), job.since),
            ("photos", "lock-wait", 9)
        );
        assert_eq!(job.detail, "held by host h, process 7");
        state.apply("a", Report::Progress { done: 3, total: 8 }, 10);
        let effects = state.apply("a", Report::Progress { done: 4, total: 8 }, 11);
        assert_eq!(
            effects[1],
            Effect::Emit(Signal::Progress {
                drive: "a".into(),
                done: 4,
                total: 8,
                phase: "lock-wait".into()
            })
        );
        // A report of a drive with no job changes nothing but is signalled.
        let effects = state.apply("b", Report::Progress { done: 1, total: 1 }, 12);
        assert_eq!(effects.len(), 2);
        assert_eq!(state.running().len(), 1);
    }

    #[test]
    fn finished_records_the_sync_and_its_verification_before_the_signal() {
        let mut state = State::new(Ledger::default(), 30);
        state.begin("a", "nas", 5);
        let now = 100 * DAY;
        let effects = state.apply(
            "a",
            Report::Finished {
                summary: summary(now - 31 * DAY),
                seconds: 1.5,
            },
            now,
        );
        assert!(matches!(&effects[0], Effect::Warn(m) if m.contains("30 days")));
        assert_eq!(
            effects[1..5],
            [
                Effect::SaveLedger,
                Effect::RunningChanged,
                Effect::LastSyncsChanged,
                Effect::VerificationChanged
            ]
        );
        assert!(matches!(
            effects[5],
            Effect::Emit(Signal::Finished { bytes: 10, .. })
        ));
        assert!(!state.is_running("a"));
        let record = &state.ledger.last_syncs["a"];
        assert_eq!(record.archive, "nas::nas-2");
        assert_eq!((record.time, record.bytes, record.free), (now, 10, 20));
        assert!(state.ledger.verification["a"].overdue);
        assert_eq!(state.archives("a")["nas"], "nas-2");
    }

    #[test]
    fn verification_becomes_overdue_with_time_alone() {
        let mut state = State::new(Ledger::default(), 30);
        state.begin("a", "nas", 5);
        let now = 100 * DAY;
        let effects = state.apply(
            "a",
            Report::Finished {
                summary: summary(now - DAY),
                seconds: 1.0,
            },
            now,
        );
        assert!(!effects.iter().any(|e| matches!(e, Effect::Warn(_))));
        assert!(!state.verification(now)[0].overdue);
        assert!(!state.verification(now + 29 * DAY)[0].overdue);
        assert!(state.verification(now + 30 * DAY)[0].overdue);
    }

    #[test]
    fn failed_is_remembered_and_ends_the_job() {
        let mut state = State::new(Ledger::default(), 30);
        state.begin("a", "nas", 5);
        let failure = job::Failure::new(Stage::Space, "need 9 MiB".into());
        let effects = state.apply("a", Report::Failed(failure), 7);
        assert_eq!(effects[0], Effect::SaveLedger);
        assert_eq!(
            effects[4],
            Effect::Emit(Signal::Failed {
                drive: "a".into(),
                stage: "space".into(),
                message: "need 9 MiB".into()
            })
        );
        assert!(!state.is_running("a"));
        assert_eq!(state.ledger.last_failures["a"].stage, "space");
        assert_eq!(state.ledger.failure_history.len(), 1);
        // The drive may start again.
        assert_eq!(state.may_start("a", ["a"]), Ok(()));
    }
}
