//! Structured property values shared by the services and their clients.
//!
//! Each struct is a D-Bus struct whose signature is documented in the XML;
//! field order is the wire order.

use serde::{Deserialize, Serialize};
use zbus::zvariant::{OwnedValue, Type, Value};

/// An entry of DriveWatcher1.Drives: `(ssbst)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type, Value, OwnedValue)]
pub struct WatchedDrive {
    /// The enrolled drive name.
    pub name: String,
    /// The ID_FS_UUID matched on.
    pub uuid: String,
    /// Whether the drive is plugged in.
    pub attached: bool,
    /// Its device node, empty when absent.
    pub device: String,
    /// Unix time of the last attach, 0 when absent.
    pub since: u64,
}

/// An entry of Crypt1.Drives: `(sssss)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type, Value, OwnedValue)]
pub struct CryptDrive {
    /// The enrolled drive name.
    pub name: String,
    /// A [`crate::CryptState`]'s wire name: absent, attached, opening,
    /// open, held, closing, closed or failed.
    pub state: String,
    /// Where the drive is (or will be) mounted.
    pub mountpoint: String,
    /// The block device node, empty when absent.
    pub device: String,
    /// The last failure's message when state is failed.
    pub message: String,
}

/// An entry of Crypt1.Health: a drive's latest SMART reading,
/// `(sssstsa{sx})`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type, Value, OwnedValue)]
pub struct DriveHealth {
    /// The enrolled drive name.
    pub drive: String,
    /// A [`crate::HealthVerdict`]'s wire name: unavailable, passed,
    /// degraded or failing.
    pub verdict: String,
    /// A [`crate::HealthDecision`]'s wire name: open, warn or refuse.
    pub decision: String,
    /// The whole disk smartctl read (`/dev/sdb`).
    pub device: String,
    /// Unix time of the reading.
    pub time: u64,
    /// One line for people: the figures, or why there are none.
    pub summary: String,
    /// The figures the drive reported, by [`HEALTH_FIGURES`] name; a
    /// figure the drive did not report is absent.
    pub figures: std::collections::HashMap<String, i64>,
}

/// The keys of [`DriveHealth::figures`], as the XML documents them.
pub const HEALTH_FIGURES: [&str; 5] = [
    "reallocated-sectors",
    "pending-sectors",
    "uncorrectable-sectors",
    "power-on-hours",
    "temperature-celsius",
];

/// The most recent failure of a drive or profile: `(stss)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type, Value, OwnedValue)]
pub struct Failure {
    /// The drive or profile name.
    pub subject: String,
    /// Unix time of the failure.
    pub time: u64,
    /// The stage that failed.
    pub stage: String,
    /// What went wrong.
    pub message: String,
}

/// An entry of Sync1.Running: `(ssttsts)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type, Value, OwnedValue)]
pub struct SyncJob {
    /// The drive being synced.
    pub drive: String,
    /// The repository being worked on now.
    pub repository: String,
    /// Bytes copied.
    pub done: u64,
    /// Bytes to copy.
    pub total: u64,
    /// What the job does now: prepare, lock, lock-wait, snapshot, copy,
    /// verify or swap (the XML documents each).
    pub phase: String,
    /// Unix time the phase began.
    pub since: u64,
    /// More about the phase (who holds borg's lock), or empty.
    pub detail: String,
}

/// An entry of Sync1.Verification: `(sttttub)`, how well the copies on a
/// drive are known to be what was copied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type, Value, OwnedValue)]
pub struct DriveVerification {
    /// The drive name.
    pub drive: String,
    /// Unix time of the last sync that verified the drive.
    pub time: u64,
    /// Unix time since which every byte of the copies on the drive has
    /// been read back from the drive and found as copied (0: some never).
    pub verified_since: u64,
    /// Bytes the last sync re-read from the drive (read-back and scrub).
    pub read: u64,
    /// Bytes of the copies on the drive.
    pub total: u64,
    /// Files the last sync found damaged on the drive and copied afresh.
    pub repaired: u32,
    /// Not every byte was re-read within `[sync] scrub-period-days`.
    pub overdue: bool,
}

/// An entry of Sync1.LastSyncs: `(sttdst)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Type, Value, OwnedValue)]
pub struct SyncRecord {
    /// The drive name.
    pub drive: String,
    /// Unix time the sync finished.
    pub time: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// How long it took, in seconds.
    pub seconds: f64,
    /// The newest archive on the copy.
    pub archive: String,
    /// Free bytes left on the drive.
    pub free: u64,
}

/// An entry of Borg1.Jobs: `(ssstt)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type, Value, OwnedValue)]
pub struct BackupJob {
    /// The job id.
    pub job: String,
    /// The profile name.
    pub profile: String,
    /// waiting, hook, sources, create, prune, compact or check.
    pub stage: String,
    /// Bytes read by borg create so far.
    pub bytes: u64,
    /// Files processed so far.
    pub files: u64,
}

/// An entry of Borg1.LastResults: `(sstsds)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Type, Value, OwnedValue)]
pub struct BackupResult {
    /// The profile name.
    pub profile: String,
    /// A [`BackupOutcome`]'s wire name: finished, finished-with-warnings,
    /// failed or skipped.
    pub outcome: String,
    /// Unix time the job ended.
    pub time: u64,
    /// The archive made, empty if none.
    pub archive: String,
    /// How long the job took, in seconds.
    pub seconds: f64,
    /// The failure or skip reason, or borg's warnings.
    pub message: String,
}

/// An entry of Borg1.Schedule: `(ststts)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Type, Value, OwnedValue)]
pub struct ScheduleEntry {
    /// The profile name.
    pub profile: String,
    /// Unix time it is next due, 0 without an interval.
    pub due: u64,
    /// Why it cannot run now, empty if nothing blocks it.
    pub blocked: String,
    /// Unix time of the last run that finished (with or without
    /// warnings), 0 if none.
    pub last_success: u64,
    /// Unix time of the next automatic retry, 0 when none is planned.
    pub retry: u64,
    /// Why the retry is planned and which attempt it is, empty when none.
    pub retry_reason: String,
}

/// How a backup job ended: Borg1.LastResults' outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupOutcome {
    /// `finished`: every stage succeeded, borg did not warn.
    Finished,
    /// `finished-with-warnings`: the archive was made but borg exited 1
    /// (warnings: a file vanished or could not be read, …).
    FinishedWithWarnings,
    /// `failed`: a stage failed or the job was cancelled or interrupted.
    Failed,
    /// `skipped`: the job did not run (a precondition, a hook's exit 75).
    Skipped,
}

impl BackupOutcome {
    /// Every outcome.
    pub const ALL: [BackupOutcome; 4] = [
        BackupOutcome::Finished,
        BackupOutcome::FinishedWithWarnings,
        BackupOutcome::Failed,
        BackupOutcome::Skipped,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            BackupOutcome::Finished => "finished",
            BackupOutcome::FinishedWithWarnings => "finished-with-warnings",
            BackupOutcome::Failed => "failed",
            BackupOutcome::Skipped => "skipped",
        }
    }

    /// The outcome named `wire`, if any.
    pub fn from_wire(wire: &str) -> Option<BackupOutcome> {
        BackupOutcome::ALL.into_iter().find(|o| o.as_str() == wire)
    }

    /// Whether an archive was made (the profile's success).
    pub fn made_archive(self) -> bool {
        matches!(
            self,
            BackupOutcome::Finished | BackupOutcome::FinishedWithWarnings
        )
    }
}

/// An entry of Notifier1.ListDeadLetters: `(sssts)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type, Value, OwnedValue)]
pub struct DeadLetter {
    /// The message's event id (the file name when the file is unreadable).
    pub id: String,
    /// Its subject line.
    pub subject: String,
    /// What it is about, for example "SyncFailed offsite-a".
    pub reason: String,
    /// Unix time it was queued (0 when unknown).
    pub created: u64,
    /// Why it is a dead letter: the server's refusal, or that its delivery
    /// could not be confirmed.
    pub error: String,
}

/// An entry of FailureHistory (Sync1, Borg1, Crypt1): `(ssstss)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type, Value, OwnedValue)]
pub struct FailureEvent {
    /// Unique across the service's restarts; the notifier remembers which
    /// ids it mailed.
    pub id: String,
    /// The drive or profile name.
    pub subject: String,
    /// The stage that failed.
    pub stage: String,
    /// Unix time of the failure.
    pub time: u64,
    /// What went wrong.
    pub message: String,
    /// The job id (Borg1), empty otherwise.
    pub job: String,
}
