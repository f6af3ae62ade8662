//! The one state the LED shows, derived from what the other services say.
//!
//! Pure logic, no bus: events go in, the state comes out. The rules:
//! failed wins over working, working over done; done holds until that drive
//! is detached; failed holds until acknowledged or until the next flow that
//! ends well (a drive closed after a flow without failure, or a finished
//! backup).

use std::collections::{BTreeMap, BTreeSet};

/// What the LED shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedState {
    /// Nothing to say: off.
    Idle,
    /// A drive or a backup is busy.
    Working,
    /// A drive is safe to remove.
    Done,
    /// Something failed.
    Failed,
}

impl LedState {
    /// The name used on the bus.
    pub fn as_str(self) -> &'static str {
        match self {
            LedState::Idle => "idle",
            LedState::Working => "working",
            LedState::Done => "done",
            LedState::Failed => "failed",
        }
    }
}

/// A fact from another service's signal or properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// DriveAttached.
    DriveAttached(String),
    /// DriveDetached.
    DriveDetached(String),
    /// DriveOpened, SyncStarted: the drive's flow is under way.
    DriveBusy(String),
    /// DriveClosed: safe to remove.
    DriveClosed(String),
    /// DriveFailed: the drive's flow ended in failure (ferry-crypt has left
    /// it closed where it could), with a reason for a person.
    DriveFailed(String, String),
    /// SyncFailed: the flow failed; ferry-crypt closes the drive next.
    SyncFailed(String, String),
    /// BackupStarted(job).
    BackupStarted(String),
    /// BackupFinished(job).
    BackupFinished(String),
    /// BackupFailed(job, reason).
    BackupFailed(String, String),
    /// BackupSkipped(job).
    BackupSkipped(String),
    /// The Acknowledge method.
    Acknowledge,
}

/// Everything the LED remembers.
#[derive(Debug, Default, Clone)]
pub struct Indicator {
    /// Drives in a flow, and whether that flow has failed so far.
    busy_drives: BTreeMap<String, bool>,
    /// Running backup jobs.
    busy_jobs: BTreeSet<String>,
    /// Drives closed and still plugged in.
    done_drives: BTreeSet<String>,
    /// Why the LED is red, until acknowledged or a good flow.
    failure: Option<String>,
}

impl Indicator {
    /// Applies one event.
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::DriveAttached(drive) | Event::DriveBusy(drive) => {
                self.done_drives.remove(&drive);
                self.busy_drives.entry(drive).or_insert(false);
            }
            Event::DriveDetached(drive) => {
                self.busy_drives.remove(&drive);
                self.done_drives.remove(&drive);
            }
            Event::DriveClosed(drive) => {
                let flow_failed = self.busy_drives.remove(&drive).unwrap_or(false);
                if !flow_failed {
                    self.failure = None;
                }
                self.done_drives.insert(drive);
            }
            Event::DriveFailed(drive, reason) => {
                self.busy_drives.remove(&drive);
                self.failure = Some(format!("{drive}: {reason}"));
            }
            Event::SyncFailed(drive, reason) => {
                if let Some(failed) = self.busy_drives.get_mut(&drive) {
                    *failed = true;
                }
                self.failure = Some(format!("{drive}: {reason}"));
            }
            Event::BackupStarted(job) => {
                self.busy_jobs.insert(job);
            }
            Event::BackupFinished(job) => {
                self.busy_jobs.remove(&job);
                self.failure = None;
            }
            Event::BackupFailed(job, reason) => {
                self.busy_jobs.remove(&job);
                self.failure = Some(format!("backup {job}: {reason}"));
            }
            Event::BackupSkipped(job) => {
                self.busy_jobs.remove(&job);
            }
            Event::Acknowledge => self.failure = None,
        }
    }

    /// A fresh view from what the peers say now (after one of them
    /// restarted), keeping the failure: a restart is not a good flow, so
    /// red still holds until acknowledged or until a flow ends well.
    pub fn rebuilt(&self, from_peers: Vec<Event>) -> Indicator {
        let mut fresh = Indicator::default();
        for event in from_peers {
            fresh.apply(event);
        }
        if self.failure.is_some() {
            fresh.failure = self.failure.clone();
        }
        fresh
    }

    /// The state shown now.
    pub fn state(&self) -> LedState {
        if self.failure.is_some() {
            LedState::Failed
        } else if !self.busy_drives.is_empty() || !self.busy_jobs.is_empty() {
            LedState::Working
        } else if !self.done_drives.is_empty() {
            LedState::Done
        } else {
            LedState::Idle
        }
    }

    /// Why, for the Reason property.
    pub fn reason(&self) -> String {
        match self.state() {
            LedState::Failed => self.failure.clone().unwrap_or_default(),
            LedState::Working => {
                let mut busy: Vec<String> = self.busy_drives.keys().cloned().collect();
                busy.extend(self.busy_jobs.iter().map(|j| format!("backup {j}")));
                format!("busy: {}", busy.join(", "))
            }
            LedState::Done => {
                let done: Vec<&str> = self.done_drives.iter().map(String::as_str).collect();
                format!("safe to remove: {}", done.join(", "))
            }
            LedState::Idle => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event::*;

    fn run(events: Vec<Event>) -> Indicator {
        let mut indicator = Indicator::default();
        for e in events {
            indicator.apply(e);
        }
        indicator
    }

    #[test]
    fn a_good_flow_goes_working_then_done_then_idle() {
        let mut i = run(vec![DriveAttached("a".into())]);
        assert_eq!(i.state(), LedState::Working);
        i.apply(DriveBusy("a".into()));
        assert_eq!(i.state(), LedState::Working);
        i.apply(DriveClosed("a".into()));
        assert_eq!(i.state(), LedState::Done);
        assert_eq!(i.reason(), "safe to remove: a");
        i.apply(DriveDetached("a".into()));
        assert_eq!(i.state(), LedState::Idle);
    }

    #[test]
    fn failed_wins_and_holds_until_acknowledged() {
        let mut i = run(vec![
            DriveAttached("a".into()),
            SyncFailed("a".into(), "sync: disk full".into()),
        ]);
        assert_eq!(i.state(), LedState::Failed);
        assert_eq!(i.reason(), "a: sync: disk full");
        i.apply(DriveClosed("a".into()));
        assert_eq!(
            i.state(),
            LedState::Failed,
            "closing after a failure does not clear it"
        );
        i.apply(DriveDetached("a".into()));
        assert_eq!(i.state(), LedState::Failed, "failed holds past detach");
        i.apply(BackupStarted("7".into()));
        assert_eq!(i.state(), LedState::Failed, "failed wins over working");
        i.apply(Acknowledge);
        assert_eq!(i.state(), LedState::Working);
    }

    #[test]
    fn the_next_good_flow_clears_failed() {
        let mut i = run(vec![BackupFailed("1".into(), "create: lock".into())]);
        assert_eq!(i.state(), LedState::Failed);
        i.apply(DriveAttached("b".into()));
        i.apply(DriveClosed("b".into()));
        assert_eq!(i.state(), LedState::Done);
        let i = run(vec![
            BackupFailed("1".into(), "x".into()),
            BackupStarted("2".into()),
            BackupFinished("2".into()),
        ]);
        assert_eq!(i.state(), LedState::Idle);
    }

    #[test]
    fn working_wins_over_done() {
        let i = run(vec![
            DriveAttached("a".into()),
            DriveClosed("a".into()),
            DriveAttached("b".into()),
        ]);
        assert_eq!(i.state(), LedState::Working);
        let i = run(vec![
            DriveAttached("a".into()),
            DriveClosed("a".into()),
            BackupStarted("1".into()),
            BackupSkipped("1".into()),
        ]);
        assert_eq!(i.state(), LedState::Done);
    }

    #[test]
    fn a_drive_failure_ends_the_flow() {
        let mut i = run(vec![
            DriveAttached("a".into()),
            DriveBusy("a".into()),
            DriveFailed("a".into(), "identity: not ours".into()),
        ]);
        assert_eq!(i.state(), LedState::Failed);
        i.apply(Acknowledge);
        assert_eq!(
            i.state(),
            LedState::Idle,
            "nothing is still working after the failure"
        );
    }

    #[test]
    fn a_rebuild_forgets_lost_jobs_but_keeps_the_failure() {
        let i = run(vec![
            BackupStarted("1".into()),
            SyncFailed("a".into(), "space".into()),
        ]);
        let fresh = i.rebuilt(vec![DriveBusy("a".into()), DriveClosed("a".into())]);
        assert_eq!(
            fresh.state(),
            LedState::Failed,
            "red holds across a peer's restart"
        );
        let i = run(vec![BackupStarted("lost".into())]);
        assert_eq!(
            i.rebuilt(vec![]).state(),
            LedState::Idle,
            "a job its service no longer runs is gone"
        );
    }

    #[test]
    fn detaching_mid_flow_stops_working() {
        let i = run(vec![DriveAttached("a".into()), DriveDetached("a".into())]);
        assert_eq!(i.state(), LedState::Idle);
    }
}
