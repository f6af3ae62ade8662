//! What ferry-borg remembers across restarts, per profile: the last result,
//! the last failure, the last success with borg's statistics, and when each
//! check last ran (checks run by frequency), plus the jobs running now and
//! the last job number, so a job cut short by ferry-borg's own death is
//! reported on the next start and job ids never repeat, and the retries
//! planned after a failed or skipped run (so a restart keeps them). Kept as JSON in
//! `<state-directory>/borg.json`, replaced atomically when a job starts and
//! when it ends.

use std::collections::BTreeMap;
use std::path::Path;

use ferry_interfaces::{BackupResult, Failure};
use serde::{Deserialize, Serialize};

/// The state file's name under the state directory.
pub const FILE_NAME: &str = "borg.json";

/// One profile's memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileRecord {
    /// The last job's result.
    pub last_result: Option<BackupResult>,
    /// The last failed job.
    pub last_failure: Option<Failure>,
    /// Unix time of the last success.
    pub last_success: Option<u64>,
    /// borg create --json of the last success.
    pub stats: Option<String>,
    /// Unix time each check kind last ran.
    #[serde(default)]
    pub checks: BTreeMap<String, u64>,
    /// Since when (unix time) the profile's SSH server has been unreachable;
    /// `None` while it is reachable.
    #[serde(default)]
    pub unreachable_since: Option<u64>,
}

/// A job that was running when the state was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningJob {
    /// Its profile.
    pub profile: String,
    /// Unix time it started.
    pub started: u64,
    /// Which attempt of its series it is (1: not a retry).
    #[serde(default = "first_attempt")]
    pub attempt: u32,
}

fn first_attempt() -> u32 {
    1
}

/// A retry ferry-borg will start by itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedRetry {
    /// Unix time it is due.
    pub at: u64,
    /// The attempt it will be (2 is the first retry).
    pub attempt: u32,
    /// Why, for Schedule.
    pub reason: String,
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    /// By profile name.
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileRecord>,
    /// The jobs running now, by job id; one found here at start was cut short.
    #[serde(default)]
    pub running: BTreeMap<String, RunningJob>,
    /// The number of the last job started; ids go on from it after a restart.
    #[serde(default)]
    pub last_job: u64,
    /// Retries planned, by profile.
    #[serde(default)]
    pub retries: BTreeMap<String, PlannedRetry>,
    /// Every failure, oldest first, bounded (Borg1.FailureHistory).
    #[serde(default)]
    pub failure_history: Vec<ferry_interfaces::FailureEvent>,
}

impl Stored {
    /// Reads the state at `path`. A missing file is a fresh start; a
    /// damaged one is moved aside (kept for a person to look at) and logged.
    pub fn load(path: &Path) -> Stored {
        ferry_service::durable::load_or_move_aside(path, "past results", |bytes| {
            serde_json::from_slice(bytes).map_err(|e| e.to_string())
        })
        .unwrap_or_default()
    }

    /// Writes the state durably and atomically (creating the directory).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        ferry_service::durable::write_atomically(path, &json, 0o600)
    }

    /// The record of `profile`, created empty when absent.
    pub fn profile(&mut self, profile: &str) -> &mut ProfileRecord {
        self.profiles.entry(profile.to_string()).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_a_damaged_file_is_kept_aside() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state").join(FILE_NAME);
        assert!(Stored::load(&path).profiles.is_empty());
        let mut stored = Stored::default();
        stored.profile("home").last_success = Some(42);
        stored
            .profile("home")
            .checks
            .insert("repository".into(), 41);
        stored.save(&path).expect("save");
        let loaded = Stored::load(&path);
        assert_eq!(loaded.profiles["home"].last_success, Some(42));
        assert_eq!(loaded.profiles["home"].checks["repository"], 41);

        std::fs::write(&path, b"{ torn").expect("damage");
        assert!(Stored::load(&path).profiles.is_empty());
        let names: Vec<String> = std::fs::read_dir(path.parent().expect("parent"))
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().any(|n| n.starts_with("borg.json.bad-")),
            "{names:?}"
        );
    }
}
