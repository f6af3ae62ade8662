//! Crypt1.LastFailures, kept across restarts.
//!
//! A failure belongs to its drive until that drive succeeds or a person
//! acknowledges it, so it must outlive ferry-crypt: a restarted ferry-led or
//! ferry-notifier reads it from the property and must find it there. The
//! record is one JSON file in the state directory (`crypt-failures.json`),
//! written durably (temp, fsync, rename, fsync the directory) off the async
//! runtime before the failure is published. A file that cannot be read is
//! moved aside, never deleted, and the service starts without it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_interfaces::Failure;

/// The file's name under the state directory.
pub const FILE_NAME: &str = "crypt-failures.json";

/// The most recent failure of each drive, by drive name.
#[derive(Debug, Clone)]
pub struct FailureLog {
    path: PathBuf,
    failures: BTreeMap<String, Failure>,
}

impl FailureLog {
    /// Reads the log from `state_directory`.
    pub fn load(state_directory: &Path) -> FailureLog {
        let path = state_directory.join(FILE_NAME);
        let failures =
            ferry_service::durable::load_or_move_aside(&path, "past drive failures", |bytes| {
                serde_json::from_slice(bytes).map_err(|e| e.to_string())
            })
            .unwrap_or_default();
        FailureLog { path, failures }
    }

    /// Every drive's most recent failure, sorted by drive.
    pub fn all(&self) -> Vec<Failure> {
        self.failures.values().cloned().collect()
    }

    /// Records `failure` as its drive's most recent and writes the log
    /// durably; a write that fails is logged (the bus still has it).
    pub async fn record(&mut self, failure: Failure) {
        self.failures.insert(failure.subject.clone(), failure);
        let path = self.path.clone();
        let bytes = match serde_json::to_vec_pretty(&self.failures) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!("cannot serialise the drive failures: {e}");
                return;
            }
        };
        let written = tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            ferry_service::durable::write_atomically(&path, &bytes, 0o644)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        if let Err(e) = written {
            tracing::error!(
                "cannot write {}: {e}; this failure will not survive a restart",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failures_survive_a_reload_and_a_damaged_file_is_kept_aside() {
        let dir = tempfile::tempdir().expect("dir");
        let mut log = FailureLog::load(dir.path());
        assert!(log.all().is_empty());
        for (drive, stage) in [("a", "unlock"), ("b", "mount"), ("a", "identity")] {
            log.record(Failure {
                subject: drive.into(),
                time: 7,
                stage: stage.into(),
                message: "m".into(),
            })
            .await;
        }
        let again = FailureLog::load(dir.path());
        let stages: Vec<(String, String)> = again
            .all()
            .into_iter()
            .map(|f| (f.subject, f.stage))
            .collect();
        assert_eq!(
            stages,
            [
                ("a".into(), "identity".into()),
                ("b".into(), "mount".into())
            ]
        );
        std::fs::write(dir.path().join(FILE_NAME), b"{ torn").expect("damage");
        assert!(FailureLog::load(dir.path()).all().is_empty());
        assert!(std::fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(".bad-")));
    }
}
