//! What the drive holds after a failed sync, found by looking at it, never
//! assumed from how far the job got.
//!
//! A message that says "the previous copy is kept" is acted on (the drive
//! goes off-site), so it must be what is on the drive. During the job the
//! identity (device, inode) of each repository's current generation and of
//! the new one it built is recorded; after a failure, the drive's final
//! name `<dir>/<repo>` is looked at (through a confined handle of the
//! drive's root, no link ever followed) and compared with both. When the drive cannot be looked at (unmounted, or a shut-down
//! filesystem answering EIO), the message says so instead of guessing.

use std::collections::BTreeMap;
use std::io;
use std::sync::Mutex;

/// A directory's identity: (device, inode).
pub type Identity = (u64, u64);

/// What is known of one repository's generations during a job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Generations {
    /// The current generation when the job began (None: there was none).
    pub previous: Option<Identity>,
    /// The new generation, once built.
    pub new: Option<Identity>,
}

/// The job's record, per repository name.
#[derive(Debug, Default)]
pub struct Record(Mutex<BTreeMap<String, Generations>>);

impl Record {
    fn update(&self, name: &str, f: impl FnOnce(&mut Generations)) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(map.entry(name.to_string()).or_default());
    }

    /// The current generation of `name` when the job began.
    pub fn previous(&self, name: &str, id: Option<Identity>) {
        self.update(name, |g| g.previous = id);
    }

    /// The new generation of `name`, built.
    pub fn new_generation(&self, name: &str, id: Option<Identity>) {
        self.update(name, |g| g.new = id);
    }

    /// What is recorded of `name`.
    pub fn get(&self, name: &str) -> Generations {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(name).copied().unwrap_or_default()
    }
}

/// What the drive holds of one repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holds {
    /// The generation that was current when the sync began.
    Previous,
    /// The generation this sync built.
    New,
    /// Nothing at the repository's name; `had` says whether there was a
    /// copy when the sync began.
    Nothing {
        /// A copy was there when the sync began.
        had: bool,
    },
    /// Something this sync neither found nor made.
    Unexpected,
    /// It cannot be looked at: why.
    Unreadable(String),
}

/// Compares what was `found` at the repository's final name on the drive
/// (its identity, None for nothing) with what was recorded.
pub fn look(found: io::Result<Option<Identity>>, known: Generations) -> Holds {
    match found {
        Err(e) => Holds::Unreadable(e.to_string()),
        Ok(None) => Holds::Nothing {
            had: known.previous.is_some(),
        },
        Ok(Some(id)) if Some(id) == known.new => Holds::New,
        Ok(Some(id)) if known.previous.is_none_or(|p| p == id) => Holds::Previous,
        Ok(Some(_)) => Holds::Unexpected,
    }
}

/// The sentence a failure message ends with: what the drive holds of each
/// repository, as found; `mounted` false when the drive could not be
/// looked at at all.
pub fn describe(mounted: bool, looks: &[(String, Holds)]) -> String {
    if !mounted {
        return "The drive is not mounted any more, so what it holds could not be looked at; \
                plug it in again: the next sync finds whichever complete copy it holds and \
                brings it up to date"
            .into();
    }
    if looks.is_empty() {
        return "No repository is assigned to the drive; nothing on it was changed".into();
    }
    let parts: Vec<String> = looks
        .iter()
        .map(|(repo, holds)| match holds {
            Holds::Previous => format!("the previous copy of {repo} (from before this sync)"),
            Holds::New => format!("the new copy of {repo} (made by this sync)"),
            Holds::Nothing { had: false } => format!("no copy of {repo} (it never had one)"),
            Holds::Nothing { had: true } => {
                format!("no copy of {repo}: the one there before this sync is gone")
            }
            Holds::Unexpected => format!(
                "a copy of {repo} this sync neither found nor made (something else changed it)"
            ),
            Holds::Unreadable(e) => format!(
                "an unknown state of {repo}: it cannot be read ({e}); plug the drive in again, \
                 the next sync finds out"
            ),
        })
        .collect();
    format!(
        "Looked at the drive after the failure: it holds {}",
        parts.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// What the job finds at `path` (the tests look with std; the job looks
    /// through the drive's confined handle).
    fn identity(path: &std::path::Path) -> io::Result<Option<Identity>> {
        match std::fs::symlink_metadata(path) {
            Ok(m) => Ok(Some((m.dev(), m.ino()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    #[test]
    fn an_exchange_is_seen_as_the_new_copy_and_no_exchange_as_the_previous() {
        let dir = tempfile::tempdir().expect("dir");
        let current = dir.path().join("nas");
        let new = dir.path().join(".nas.new");
        std::fs::create_dir(&current).expect("current");
        std::fs::create_dir(&new).expect("new");
        // Made while both generations exist, so its inode is neither.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).expect("other");
        let record = Record::default();
        record.previous("nas", identity(&current).expect("id"));
        record.new_generation("nas", identity(&new).expect("id"));
        assert_eq!(look(identity(&current), record.get("nas")), Holds::Previous);
        // The swap: the new generation takes the final name.
        std::fs::remove_dir(&current).expect("old");
        std::fs::rename(&new, &current).expect("swap");
        assert_eq!(look(identity(&current), record.get("nas")), Holds::New);
        std::fs::remove_dir(&current).expect("gone");
        assert_eq!(
            look(identity(&current), record.get("nas")),
            Holds::Nothing { had: true }
        );
        assert_eq!(
            look(identity(&current), Generations::default()),
            Holds::Nothing { had: false }
        );
        std::fs::rename(&other, &current).expect("replace");
        assert_eq!(
            look(identity(&current), record.get("nas")),
            Holds::Unexpected
        );
        let said = describe(
            true,
            &[
                ("nas".into(), Holds::New),
                ("photos".into(), Holds::Previous),
            ],
        );
        assert_eq!(
            said,
            "Looked at the drive after the failure: it holds the new copy of nas (made by \
             this sync); the previous copy of photos (from before this sync)"
        );
        assert!(describe(false, &[]).contains("could not be looked at"));
    }
}
