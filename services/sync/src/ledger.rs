//! The rotation ledger: per drive the last successful sync, the most
//! recent failure and how well the drive is verified, kept under the state directory so that a person who
//! alternates drives can see which one is older, also after a restart.
//!
//! It is one JSON file written with `write_atomically` (temp, fsync,
//! rename, fsync dir): a crash leaves the old ledger or the new one. A file
//! that cannot be read is moved aside (never deleted) and the ledger starts
//! empty, with a warning saying where the old file went.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_interfaces::{DriveVerification, Failure, FailureEvent, SyncRecord};
use serde::{Deserialize, Serialize};

use crate::listings::Listed;

/// The ledger file's name under the state directory.
pub const FILE_NAME: &str = "sync-ledger.json";

/// Everything ferry-sync remembers between runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ledger {
    /// Per drive, the last successful sync.
    #[serde(default)]
    pub last_syncs: BTreeMap<String, SyncRecord>,
    /// Per drive, the most recent failure.
    #[serde(default)]
    pub last_failures: BTreeMap<String, Failure>,
    /// Per drive and repository, the newest archive on the copy; lets a
    /// sync with nothing to copy report it without asking borg.
    #[serde(default)]
    pub archives: BTreeMap<String, BTreeMap<String, String>>,
    /// Per repository, its newest archive at its last listed committed
    /// transaction (see [`crate::listings`]): a sync at that transaction
    /// starts no borg.
    #[serde(default)]
    pub listed: BTreeMap<String, Listed>,
    /// Every failure, oldest first, bounded (Sync1.FailureHistory).
    #[serde(default)]
    pub failure_history: Vec<FailureEvent>,
    /// Per drive, how well its copies are verified (Sync1.Verification):
    /// what the last successful sync read back and repaired, and since
    /// when every byte on it has been found intact.
    #[serde(default)]
    pub verification: BTreeMap<String, DriveVerification>,
}

impl Ledger {
    /// Where the ledger lives.
    pub fn path(state_directory: &Path) -> PathBuf {
        state_directory.join(FILE_NAME)
    }

    /// Reads the ledger; a missing file is an empty ledger, an unreadable
    /// one is moved aside.
    pub fn load(path: &Path) -> Ledger {
        read_json(path, "the sync ledger").unwrap_or_default()
    }

    /// Writes the ledger durably and atomically, creating the directory.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        ferry_service::durable::write_atomically(path, &text, 0o644)
    }
}

/// Reads the JSON file `path` (`what` it is, for the log) with the house
/// policy for durable state (`ferry_service::durable::load_or_move_aside`):
/// None when it is missing or unreadable, and when it does not parse,
/// after moving it aside (never deleting it) with a warning saying where
/// it went.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Option<T> {
    ferry_service::durable::load_or_move_aside(path, what, |bytes| {
        serde_json::from_slice::<T>(bytes)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_moves_a_bad_file_aside() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = Ledger::path(&dir.path().join("state"));
        assert!(Ledger::load(&path).last_syncs.is_empty());
        let mut ledger = Ledger::default();
        ledger.last_syncs.insert(
            "a".into(),
            SyncRecord {
                drive: "a".into(),
                time: 7,
                bytes: 9,
                seconds: 1.5,
                archive: "nas::x".into(),
                free: 3,
            },
        );
        ledger.save(&path).expect("save");
        assert_eq!(Ledger::load(&path).last_syncs["a"].bytes, 9);

        std::fs::write(&path, b"{ not json").expect("write");
        assert!(Ledger::load(&path).last_syncs.is_empty());
        let names: Vec<String> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().any(|n| n.starts_with("sync-ledger.json.bad-")),
            "{names:?}"
        );
    }
}
