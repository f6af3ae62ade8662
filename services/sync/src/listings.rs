//! The newest archive of each repository, remembered by committed
//! transaction, so that a plug-in does not wait for borg.
//!
//! Why it exists: ferry-sync names the newest archive on the drive (the
//! ledger, LastSyncs, the mail), and only `borg list` can say it — the
//! manifest is encrypted with the repository's key. borg is Python: 0.3–1 s
//! of start-up, most of an incremental sync of a small change, spent while
//! a person waits to take the drive away. What a committed transaction
//! holds never changes, so its newest archive is listed once, when a
//! backup ends (Borg1.BackupFinished, …WithWarnings, BackupFailed: off the
//! plug-in path), and remembered by its [`Transaction`]; a sync whose
//! snapshot is at a remembered transaction starts no borg at all.
//!
//! A sync at a transaction nobody listed yet (a backup made by a program
//! that sends no Borg1 signal, or while ferry-sync was not running) lists
//! its snapshot beside the copy, as before, and remembers the answer, so
//! the next drive does not ask again. A listing in progress is waited for,
//! not repeated: each repository has one slot, held while it is listed.
//!
//! The name is only ever the host repository's own (listed on a hard-link
//! snapshot of its committed state); the drive's copy is proven to hold
//! that state's bytes by the read-back, never by the name.

use std::collections::BTreeMap;
use std::future::ready;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_config::Repository;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::borg::Borg;
use crate::job::{Failure, Stage, Stop};
use crate::snapshot::{self, Transaction};

/// The name the listing's own snapshot is taken under; no drive can have
/// it (drive names start with a letter or digit), and leftovers are
/// removed with every other snapshot when ferry-sync starts.
const SNAPSHOT_NAME: &str = "+listing";

/// A repository's newest archive at one committed transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listed {
    /// The transaction it was listed at.
    pub transaction: Transaction,
    /// Its newest archive.
    pub archive: String,
}

impl Listed {
    /// Whether this should be remembered instead of `known`: it differs,
    /// and its transaction is not older (borg writes `index.N` when it
    /// commits `N`, so a later commit, also of a repository made afresh,
    /// has a later mtime).
    pub fn replaces(&self, known: Option<&Listed>) -> bool {
        match known {
            None => true,
            Some(known) => {
                known != self && self.transaction.index_mtime_ns >= known.transaction.index_mtime_ns
            }
        }
    }
}

type Slot = Arc<AsyncMutex<Option<Listed>>>;

/// What is known, per repository, shared by the service and its jobs.
#[derive(Debug, Default)]
pub struct Listings {
    slots: Mutex<BTreeMap<String, Slot>>,
}

impl Listings {
    /// What the ledger remembers.
    pub fn new(known: &BTreeMap<String, Listed>) -> Listings {
        let slots = known
            .iter()
            .map(|(name, listed)| {
                (
                    name.clone(),
                    Arc::new(AsyncMutex::new(Some(listed.clone()))),
                )
            })
            .collect();
        Listings {
            slots: Mutex::new(slots),
        }
    }

    fn slot(&self, repository: &str) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(repository.to_string()).or_default().clone()
    }

    /// `repository`'s slot, held (a listing in progress is waited for).
    pub async fn hold(&self, repository: &str) -> OwnedMutexGuard<Option<Listed>> {
        self.slot(repository).lock_owned().await
    }

    /// The newest archive of `repository` at `transaction`, when it is
    /// known; waits for a listing of it in progress.
    pub async fn archive(&self, repository: &str, transaction: &Transaction) -> Option<String> {
        let held = self.hold(repository).await;
        held.as_ref()
            .filter(|l| &l.transaction == transaction)
            .map(|l| l.archive.clone())
    }

    /// Remembers `listed` for `repository`, unless what is remembered is
    /// newer (a slow listing of an older snapshot ending after a newer
    /// one); true when it is news.
    pub async fn remember(&self, repository: &str, listed: &Listed) -> bool {
        let mut held = self.hold(repository).await;
        if !listed.replaces(held.as_ref()) {
            return false;
        }
        *held = Some(listed.clone());
        true
    }
}

/// Lists `repository`'s newest archive when its committed transaction is
/// not the one remembered, and remembers it: Some when something new was
/// learnt (for the ledger). A repository that cannot be read, locked or
/// listed is logged and skipped: the next sync lists it itself.
///
/// Without the lock, the committed state is looked at first; only when it
/// differs from what is remembered is borg's lock taken for the instant of
/// a hard-link snapshot, which is then listed (so borg never opens the
/// live repository, and a backup starting meanwhile is not held up).
pub async fn refresh(
    borg: &Borg,
    name: &str,
    repository: &Repository,
    listings: &Listings,
    lock_wait: Duration,
    stop: &mut Stop,
) -> Result<Option<Listed>, Failure> {
    let mut slot = listings.hold(name).await;
    let path = repository.path.to_path_buf();
    let observed = on_blocking(move || snapshot::observe(&path)).await?;
    let remembered = slot.as_ref().map(|l| &l.transaction);
    if Transaction::of(&observed).as_ref() == remembered {
        return Ok(None);
    }
    let waiting = |holder: String| {
        tracing::info!("{name}: waiting for borg's lock to list the newest archive ({holder})");
        ready(())
    };
    let lock = borg
        .lock(&repository.path, lock_wait, stop, waiting)
        .await?;
    let (path, dir) = (
        repository.path.to_path_buf(),
        snapshot::location(&repository.path, SNAPSHOT_NAME),
    );
    let taken = on_blocking(move || snapshot::take(&path, &dir)).await;
    lock.release().await;
    let taken = taken?;
    let listed = match Transaction::of(&taken.entries) {
        Some(transaction) => {
            borg.newest_archive(&taken.dir, repository, stop)
                .await
                .map(|archive| Listed {
                    transaction,
                    archive,
                })
        }
        None => Err(Failure::new(
            Stage::Verify,
            "the snapshot has no index.N".to_string(),
        )),
    };
    let _ = tokio::task::spawn_blocking(move || taken.release()).await;
    match listed? {
        listed if listed.archive.is_empty() => Ok(None),
        listed => {
            *slot = Some(listed.clone());
            Ok(Some(listed))
        }
    }
}

async fn on_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, snapshot::SnapshotError> + Send + 'static,
) -> Result<T, Failure> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(|e| Failure::new(Stage::Snapshot, e.to_string())),
        Err(e) => Err(Failure::new(
            Stage::Snapshot,
            format!("internal error: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(id: u64) -> Transaction {
        Transaction {
            id,
            index_size: 100 + id,
            index_mtime_ns: 1_000 * id,
        }
    }

    #[tokio::test]
    async fn a_listing_in_progress_is_waited_for_and_only_its_transaction_answers() {
        let listings = Arc::new(Listings::new(&BTreeMap::new()));
        assert_eq!(listings.archive("nas", &at(1)).await, None);
        let mut held = listings.hold("nas").await;
        let asking = {
            let listings = listings.clone();
            tokio::spawn(async move { listings.archive("nas", &at(2)).await })
        };
        tokio::task::yield_now().await;
        assert!(!asking.is_finished(), "it did not wait for the listing");
        *held = Some(Listed {
            transaction: at(2),
            archive: "nas-2".into(),
        });
        drop(held);
        assert_eq!(asking.await.expect("join"), Some("nas-2".to_string()));
        // Another transaction of the same repository is not answered by it,
        // nor is another repository.
        assert_eq!(listings.archive("nas", &at(3)).await, None);
        assert_eq!(listings.archive("photos", &at(2)).await, None);
        let same = Listed {
            transaction: at(2),
            archive: "nas-2".into(),
        };
        assert!(!listings.remember("nas", &same).await);
        let newer = Listed {
            transaction: at(3),
            archive: "nas-3".into(),
        };
        assert!(listings.remember("nas", &newer).await);
        assert_eq!(listings.archive("nas", &at(3)).await, Some("nas-3".into()));
        // A slow listing of the older snapshot, ending now, changes nothing.
        assert!(!listings.remember("nas", &same).await);
        assert_eq!(listings.archive("nas", &at(3)).await, Some("nas-3".into()));
    }

    #[tokio::test]
    async fn what_the_ledger_remembers_is_known_after_a_restart() {
        let known = BTreeMap::from([(
            "nas".to_string(),
            Listed {
                transaction: at(7),
                archive: "nas-7".into(),
            },
        )]);
        let listings = Listings::new(&known);
        assert_eq!(listings.archive("nas", &at(7)).await, Some("nas-7".into()));
        let mut changed = at(7);
        changed.index_mtime_ns += 1;
        assert_eq!(listings.archive("nas", &changed).await, None);
    }
}
