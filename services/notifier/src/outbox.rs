//! The durable outbox: a message is on disk before anyone tries to send it,
//! and leaves the disk only after the server accepted it.
//!
//! `outbox/<id>.json` holds the envelope and the formatted message, written
//! with `ferry_service::durable::write_atomically` (temp, fsync, rename,
//! fsync the directory). A message the server refuses for good is moved to
//! `dead/` with the reason beside it (`<id>.reason`) for a person to read.
//! File names sort by time; delivery sends failures first, then the rest,
//! each oldest first. Dead letters can be listed and put back into the
//! outbox (`ListDeadLetters`, `ResendDeadLetter` on the bus).
//!
//! A letter that cannot be read back is never dropped: the next delivery
//! pass moves it to `dead/` too, with why. That is the house's policy for a
//! damaged state file (`ferry_service::durable::load_or_move_aside`: moved
//! aside, logged, reported), with the dead letters as the place aside, so
//! the DeadLetters property, LastError and ListDeadLetters report it where
//! a person already looks for letters that did not go. (The notifier's
//! ledger, one file, loads through `load_or_move_aside` itself.)
//!
//! The same outbox holds mail ([`Spooled`], under `<state>/notifier`) and
//! pushes ([`crate::push::PushLetter`], under `<state>/notifier/push`): a
//! [`Letter`] is anything with an id that can be told about as a dead
//! letter.

use std::fs;
use std::io;
use std::marker::PhantomData;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_service::durable::{sync_directory, write_atomically};

use crate::compose::Spooled;

/// What an outbox holds: a message with a unique id that sorts by time.
pub trait Letter: serde::Serialize + serde::de::DeserializeOwned + Clone {
    /// Its event id (the file name without `.json`).
    fn id(&self) -> &str;
    /// Delivered before the others (failure mails); the rest go in id
    /// order.
    fn urgent(&self) -> bool;
    /// The failures it reports (ledger key, failure time).
    fn covers(&self) -> &[(String, u64)];
    /// As ListDeadLetters shows it, refused with `error`.
    fn dead_letter(&self, error: String) -> DeadLetter;
    /// Forgets attempts in doubt (a dead letter sent again).
    fn reset_doubt(&mut self);
}

impl Letter for Spooled {
    fn id(&self) -> &str {
        &self.id
    }
    fn urgent(&self) -> bool {
        self.class == crate::compose::Class::Failure
    }
    fn covers(&self) -> &[(String, u64)] {
        &self.covers
    }
    fn dead_letter(&self, error: String) -> DeadLetter {
        DeadLetter {
            id: self.id.clone(),
            subject: self.subject.clone(),
            reason: self.reason.clone(),
            created: self.created,
            error,
        }
    }
    fn reset_doubt(&mut self) {
        self.in_doubt = 0;
    }
}

/// The outbox and dead-letter folders under the state directory.
#[derive(Debug)]
pub struct Outbox<L = Spooled> {
    queue: PathBuf,
    dead: PathBuf,
    letters: PhantomData<fn() -> L>,
    /// Shared by the clones: a delivery pass lists the outbox under a read
    /// lock; the service holds the write lock ([`Outbox::hold`]) from
    /// spooling letters until the ledger that remembers them is on disk,
    /// so no letter is delivered before that.
    gate: Arc<tokio::sync::RwLock<()>>,
}

impl<L> Clone for Outbox<L> {
    fn clone(&self) -> Self {
        Outbox {
            queue: self.queue.clone(),
            dead: self.dead.clone(),
            letters: PhantomData,
            gate: self.gate.clone(),
        }
    }
}

/// A dead letter as ListDeadLetters shows it.
pub use ferry_interfaces::DeadLetter;

/// A message file that could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("{} cannot be read back ({reason})", path.display())]
pub struct Unreadable {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// Why a dead letter could not be put back into the outbox.
#[derive(Debug, thiserror::Error)]
pub enum ResendError {
    /// The dead-letter folder cannot be listed.
    #[error("cannot list {}: {source}", dir.display())]
    List {
        /// The folder.
        dir: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The dead letter is damaged.
    #[error("{0}; it cannot be sent again")]
    Unreadable(Unreadable),
    /// The outbox cannot be written.
    #[error("cannot write to {}: {source}", dir.display())]
    Write {
        /// The outbox folder.
        dir: PathBuf,
        /// Why.
        source: io::Error,
    },
}

impl<L: Letter> Outbox<L> {
    /// Opens (creating, mode 0700) `<dir>/outbox` and `<dir>/dead`.
    pub fn open(dir: &Path) -> io::Result<Outbox<L>> {
        let outbox = Outbox {
            queue: dir.join("outbox"),
            dead: dir.join("dead"),
            letters: PhantomData,
            gate: Arc::default(),
        };
        for d in [&outbox.queue, &outbox.dead] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)?;
        }
        Ok(outbox)
    }

    /// The outbox folder.
    pub fn queue_dir(&self) -> &Path {
        &self.queue
    }

    /// The dead-letter folder.
    pub fn dead_dir(&self) -> &Path {
        &self.dead
    }

    /// Writes `message` durably; when this returns Ok, a crash cannot lose it.
    pub fn put(&self, message: &L) -> io::Result<()> {
        let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
        write_atomically(&self.file(message.id()), &bytes, 0o600)
    }

    /// The queued message files, oldest first.
    pub fn pending(&self) -> io::Result<Vec<PathBuf>> {
        list(&self.queue, "json")
    }

    /// How many messages wait.
    pub fn pending_count(&self) -> u32 {
        self.pending().map(|p| p.len() as u32).unwrap_or(0)
    }

    /// How many messages were refused for good.
    pub fn dead_count(&self) -> u32 {
        list(&self.dead, "json")
            .map(|p| p.len() as u32)
            .unwrap_or(0)
    }

    /// Reads a queued message back.
    pub fn load(path: &Path) -> Result<L, Unreadable> {
        let unreadable = |reason: String| Unreadable {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = fs::read(path).map_err(|e| unreadable(e.to_string()))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| unreadable(format!("not a spooled message: {e}")))
    }

    /// Every message still queued (for rebuilding state at start);
    /// unreadable files are skipped here and dealt with by delivery.
    pub fn all(&self) -> Vec<L> {
        self.pending()
            .unwrap_or_default()
            .iter()
            .filter_map(|p| Self::load(p).ok())
            .collect()
    }

    /// The queued messages in delivery order: failures first, then the
    /// rest, each oldest first; unreadable files after them, with why.
    pub fn in_order(&self) -> io::Result<Vec<Result<L, Unreadable>>> {
        let mut loaded: Vec<Result<L, Unreadable>> =
            self.pending()?.iter().map(|p| Self::load(p)).collect();
        loaded.sort_by_key(|m| match m {
            Ok(m) => (!m.urgent(), 0, m.id().to_string()),
            Err(bad) => (true, 1, bad.path.display().to_string()),
        });
        Ok(loaded)
    }

    /// The dead letters, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        list(&self.dead, "json")
            .unwrap_or_default()
            .iter()
            .map(|path| {
                let stem = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let error = fs::read_to_string(self.dead.join(format!("{stem}.reason")))
                    .map(|r| r.trim_end().to_string())
                    .unwrap_or_default();
                match Self::load(path) {
                    Ok(m) => m.dead_letter(error),
                    Err(bad) => DeadLetter {
                        id: stem,
                        subject: String::new(),
                        reason: String::new(),
                        created: 0,
                        error: format!("{error} (unreadable: {})", bad.reason),
                    },
                }
            })
            .collect()
    }

    /// Puts dead letter `id` back into the outbox, as a message never tried
    /// before; Ok(false) when there is no such dead letter.
    pub fn resurrect(&self, id: &str) -> Result<bool, ResendError> {
        let name = format!("{id}.json");
        let known = list(&self.dead, "json")
            .map_err(|source| ResendError::List {
                dir: self.dead.clone(),
                source,
            })?
            .into_iter()
            .any(|p| p.file_name().is_some_and(|n| n.to_string_lossy() == name));
        if !known {
            return Ok(false);
        }
        let path = self.dead.join(&name);
        let mut message = Self::load(&path).map_err(ResendError::Unreadable)?;
        message.reset_doubt();
        self.put(&message).map_err(|source| ResendError::Write {
            dir: self.queue.clone(),
            source,
        })?;
        let removed = fs::remove_file(&path)
            .and_then(
                |()| match fs::remove_file(self.dead.join(format!("{id}.reason"))) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                },
            )
            .and_then(|()| sync_directory(&self.dead));
        if let Err(e) = removed {
            tracing::warn!(
                "{id} is queued again but still in {}: {e}",
                self.dead.display()
            );
        }
        Ok(true)
    }

    /// Removes a delivered message, durably.
    pub fn delete(&self, id: &str) -> io::Result<()> {
        match fs::remove_file(self.file(id)) {
            Ok(()) => sync_directory(&self.queue),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Moves the file at `path` to the dead-letter folder with `reason`
    /// beside it.
    pub fn bury(&self, path: &Path, reason: &str) -> io::Result<PathBuf> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::other(format!("{} names no file", path.display())))?;
        let target = self.dead.join(name);
        let stem = Path::new(name)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        write_atomically(
            &self.dead.join(format!("{stem}.reason")),
            format!("{reason}\n").as_bytes(),
            0o600,
        )?;
        fs::rename(path, &target)?;
        sync_directory(&self.dead)?;
        sync_directory(&self.queue)?;
        Ok(target)
    }

    fn file(&self, id: &str) -> PathBuf {
        self.queue.join(format!("{id}.json"))
    }
}

/// The same operations for the async side: each runs on tokio's blocking
/// pool, so an fsync of the outbox never holds up the service's runtime
/// (its bus answers, its signals).
impl<L: Letter + Send + 'static> Outbox<L> {
    /// [`Outbox::put`] of every letter, in order, off the runtime.
    pub async fn spool(&self, letters: Vec<L>) -> io::Result<()> {
        let outbox = self.clone();
        off_runtime(move || letters.iter().try_for_each(|l| outbox.put(l))).await
    }

    /// [`Outbox::in_order`] off the runtime, once no [`Outbox::hold`] is
    /// held.
    pub async fn queued(&self) -> io::Result<Vec<Result<L, Unreadable>>> {
        let _listing = self.gate.read().await;
        let outbox = self.clone();
        off_runtime(move || outbox.in_order()).await
    }

    /// Keeps delivery passes from listing the outbox until dropped.
    pub async fn hold(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.gate.clone().write_owned().await
    }

    /// [`Outbox::delete`] off the runtime.
    pub async fn remove(&self, id: &str) -> io::Result<()> {
        let (outbox, id) = (self.clone(), id.to_string());
        off_runtime(move || outbox.delete(&id)).await
    }

    /// [`Outbox::bury`] off the runtime.
    pub async fn move_to_dead(&self, path: &Path, reason: &str) -> io::Result<PathBuf> {
        let (outbox, path, reason) = (self.clone(), path.to_path_buf(), reason.to_string());
        off_runtime(move || outbox.bury(&path, &reason)).await
    }

    /// How many letters wait and how many are dead, off the runtime.
    pub async fn counts(&self) -> (u32, u32) {
        let outbox = self.clone();
        off_runtime(move || Ok((outbox.pending_count(), outbox.dead_count())))
            .await
            .unwrap_or((0, 0))
    }
}

/// Runs blocking file work on tokio's blocking pool; a panic in it is an
/// I/O error for the caller.
pub async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("internal error: {e}"))))
}

/// Files in `dir` ending in `.ext`, not hidden (temp files start with a
/// dot), sorted by name.
fn list(dir: &Path, ext: &str) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == ext)
                && p.file_name()
                    .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str) -> Spooled {
        Spooled {
            id: id.into(),
            subject: "s".into(),
            reason: "r".into(),
            from: "a@b".into(),
            to: vec!["c@d".into()],
            created: 1,
            covers: vec![("Sync1/x".into(), 5)],
            message: "Subject: s\r\n\r\nbody".into(),
            class: crate::compose::Class::Failure,
            in_doubt: 0,
        }
    }

    #[test]
    fn put_list_load_delete_bury() {
        let dir = tempfile::tempdir().expect("dir");
        let outbox: Outbox = Outbox::open(dir.path()).expect("open");
        outbox.put(&message("ferry-2")).expect("put");
        outbox.put(&message("ferry-1")).expect("put");
        fs::write(outbox.queue_dir().join(".ferry-3.json.tmp.1"), "x").expect("temp");
        let pending = outbox.pending().expect("list");
        assert_eq!(pending.len(), 2);
        assert!(pending[0].ends_with("ferry-1.json"));
        assert_eq!(
            Outbox::<Spooled>::load(&pending[0]).expect("load"),
            message("ferry-1")
        );
        outbox.delete("ferry-1").expect("delete");
        outbox.delete("ferry-1").expect("deleting twice is fine");
        assert_eq!(outbox.pending_count(), 1);
        let buried = outbox
            .bury(&outbox.pending().expect("list")[0], "550 no")
            .expect("bury");
        assert!(buried.starts_with(outbox.dead_dir()));
        assert_eq!(outbox.pending_count(), 0);
        assert_eq!(outbox.dead_count(), 1);
        let reason = fs::read_to_string(outbox.dead_dir().join("ferry-2.reason")).expect("reason");
        assert_eq!(reason, "550 no\n");
        let dead = outbox.dead_letters();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].id.as_str(), dead[0].error.as_str()),
            ("ferry-2", "550 no")
        );
        assert!(matches!(outbox.resurrect("ferry-7"), Ok(false)));
        assert!(matches!(outbox.resurrect("ferry-2"), Ok(true)));
        assert_eq!((outbox.pending_count(), outbox.dead_count()), (1, 0));
        assert!(!outbox.dead_dir().join("ferry-2.reason").exists());
    }

    #[test]
    fn failures_go_first() {
        let dir = tempfile::tempdir().expect("dir");
        let outbox: Outbox = Outbox::open(dir.path()).expect("open");
        let mut success = message("ferry-1");
        success.class = crate::compose::Class::Success;
        outbox.put(&success).expect("put");
        outbox.put(&message("ferry-2")).expect("put");
        let order: Vec<String> = outbox
            .in_order()
            .expect("order")
            .into_iter()
            .map(|m| m.expect("readable").id)
            .collect();
        assert_eq!(order, ["ferry-2", "ferry-1"]);
    }

    #[test]
    fn a_corrupt_file_is_reported_not_a_panic() {
        let dir = tempfile::tempdir().expect("dir");
        let outbox: Outbox = Outbox::open(dir.path()).expect("open");
        let path = outbox.queue_dir().join("ferry-9.json");
        fs::write(&path, "{ half").expect("write");
        assert!(Outbox::<Spooled>::load(&path).is_err());
        assert!(outbox.all().is_empty());
    }
}
