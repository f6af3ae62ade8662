//! Verification in proportion to what changed: what ferry knows of every
//! file on a drive, how it is read back from the device, and the rolling
//! scrub.
//!
//! A `borg check --repository-only` of the whole copy on every sync costs
//! in proportion to the repository (two hours per plug-in for 1 TB on a
//! 150 MB/s drive), mostly re-reads the page cache instead of the drive
//! right after a copy, and only says that something is damaged, not which
//! file to copy again. Instead:
//!
//! - every file is hashed while it is copied (xxh3-128, see [`Digest`]),
//!   and after the copy is durable (syncfs) the new files are read back
//!   from the device — their cached pages are dropped first with
//!   `posix_fadvise(DONTNEED)`, which drops clean pages — and compared;
//! - the hashes are kept on the host, per drive ([`DriveRecord`]), with
//!   when each file was last found intact on the drive;
//! - every sync re-reads borg's metadata files (config, index, hints,
//!   integrity: small) in full, and a slice of the unchanged files within a
//!   budget, those read longest ago first, so the next sync goes on where
//!   this one stopped ([`scrub_order`]);
//! - a file found damaged is marked so; the plan never hard-links it into a
//!   new generation (see [`DriveRecord::trusted`]), it is copied afresh.
//!
//! Why not `borg check --repository-only`, not even with `--max-duration`
//! for the scrub: borg keeps its partial check's place in the repository's
//! config (`last_segment_checked`), which must never be written in a
//! generation (the verify mirror that would take the write is thrown away
//! after each sync); a partial check does not even report an index it
//! cannot read (only a full one compares the index); its unit is a time
//! slice over segment numbers, not bytes; it reads through the page
//! cache; and it finds a bad CRC in some segment, reported as text, where
//! ferry needs the file to copy again. Reading the files back against the
//! source's hashes checks more (every byte of every file, metadata
//! included, against the source, not only against itself) at the drive's
//! read speed. borg still opens every new copy before it is swapped in
//! (`borg list` on its mirror names the newest archive), but only to name
//! it: what gates the swap is the read-back.
//!
//! Why xxh3-128 and not BLAKE3: the damage looked for is the drive's (bit
//! rot, lost writes), not an adversary's — whoever can write the drive can
//! already destroy the copy, and borg authenticates what it reads back
//! itself. xxh3 hashes at memory speed (tens of GB/s per core) where BLAKE3
//! needs several cores for the same; on a 2-core NAS hashing must stay far
//! below the drive's speed so the copy keeps up with `cp -a`. 128 bits make
//! an accidental match of a damaged file impossible in practice.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::snapshot::Entry;

/// The hash algorithm, recorded with the hashes.
pub const ALGORITHM: &str = "xxh3-128";

/// How much is read at a time: 128 KiB, what `cp` uses across
/// filesystems; it stays in the CPU's L2 cache, so the hash and `write`
/// read what `read` just wrote (with 1 MiB the copy took 1.6 CPU s/GB
/// against 1.3 with this; docs/benchmarks.md).
pub const BUFFER: usize = 128 << 10;

/// A file's xxh3-128 hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest(pub u128);

impl Digest {
    /// As kept in the record: 32 hex digits.
    pub fn hex(self) -> String {
        format!("{:032x}", self.0)
    }
}

/// Hashes bytes as they pass.
pub struct Hasher(Xxh3);

impl Default for Hasher {
    fn default() -> Self {
        Hasher(Xxh3::new())
    }
}

impl Hasher {
    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The hash of everything added.
    pub fn digest(&self) -> Digest {
        Digest(self.0.digest128())
    }
}

/// What ferry knows of one file of a copy on a drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Known {
    /// Size in bytes when it was copied.
    pub size: u64,
    /// Modification time (nanoseconds since the epoch) it was copied with.
    pub mtime_ns: u64,
    /// The hash of the bytes copied (32 hex digits).
    pub hash: String,
    /// Unix time it was last read back from the drive and found intact.
    pub verified: u64,
    /// Read back different from what was copied: never linked forward.
    #[serde(default)]
    pub damaged: bool,
    /// The scrub round ([`DriveRecord::round`]) it was last read in: the
    /// scrub goes on with the lowest, so it resumes where it stopped
    /// whatever the clock says.
    #[serde(default)]
    pub round: u64,
}

impl Known {
    /// Whether this record is about the file `size`/`mtime` describes.
    pub fn describes(&self, size: u64, mtime: SystemTime) -> bool {
        self.size == size && self.mtime_ns == nanos(mtime)
    }
}

/// Nanoseconds since the epoch (0 before it).
pub fn nanos(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A path in the record: the relative path as text (borg's names are
/// ASCII; anything else is never recorded, so it is copied every time).
pub fn key(rel: &Path) -> Option<&str> {
    rel.to_str()
}

/// What ferry knows of the copies on one drive, kept on the host (the
/// drive is not trusted to vouch for itself).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveRecord {
    /// The hash algorithm ([`ALGORITHM`]); a record of another one is
    /// ignored (everything is copied and hashed afresh once).
    #[serde(default)]
    pub algorithm: String,
    /// Per repository, per file of its current generation.
    #[serde(default)]
    pub repositories: BTreeMap<String, BTreeMap<String, Known>>,
    /// Counts the syncs' scrubs.
    #[serde(default)]
    pub round: u64,
}

/// Why the record cannot be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the verification record {path}: {source}")]
pub struct SaveError {
    path: PathBuf,
    source: io::Error,
}

impl DriveRecord {
    /// Where the record of `drive` lives under the state directory.
    pub fn path(state_directory: &Path, drive: &str) -> PathBuf {
        state_directory
            .join("sync-verify")
            .join(format!("{drive}.json"))
    }

    /// Reads a record; a missing, unreadable or foreign one is empty (then
    /// every file is copied afresh once), a bad one is moved aside.
    pub fn load(path: &Path) -> DriveRecord {
        crate::ledger::read_json::<DriveRecord>(path, "the verification record")
            .filter(|record| record.algorithm == ALGORITHM)
            .unwrap_or_else(DriveRecord::fresh)
    }

    fn fresh() -> DriveRecord {
        DriveRecord {
            algorithm: ALGORITHM.to_string(),
            repositories: BTreeMap::new(),
            round: 0,
        }
    }

    /// Writes the record durably and atomically.
    pub fn save(&self, path: &Path) -> Result<(), SaveError> {
        let failed = |source| SaveError {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(failed)?;
        }
        let text = serde_json::to_vec(self).map_err(|e| failed(io::Error::other(e)))?;
        ferry_service::durable::write_atomically(path, &text, 0o600).map_err(failed)
    }

    /// What is known of `rel` in `repository`.
    pub fn known(&self, repository: &str, rel: &Path) -> Option<&Known> {
        self.repositories.get(repository)?.get(key(rel)?)
    }

    /// Whether the copy of `entry` in the current generation may be
    /// hard-linked forward: it is the file that was copied (same size and
    /// mtime as recorded, so the recorded hash is the source's) and was
    /// not found damaged since.
    pub fn trusted(&self, repository: &str, entry: &Entry) -> bool {
        self.known(repository, &entry.rel)
            .is_some_and(|k| !k.damaged && k.describes(entry.size, entry.mtime))
    }

    /// Since when every file of `files` (a repository's current
    /// generation: path and size) has been known intact: the oldest
    /// `verified`, 0 when a file is unknown or damaged.
    pub fn verified_since<'a>(
        &self,
        repository: &str,
        files: impl IntoIterator<Item = &'a Path>,
    ) -> u64 {
        files
            .into_iter()
            .map(|rel| match self.known(repository, rel) {
                Some(k) if !k.damaged => k.verified,
                _ => 0,
            })
            .min()
            .unwrap_or(u64::MAX)
    }
}

/// borg's metadata files: everything at the top of a repository (config,
/// index.N, hints.N, integrity.N, README, nonce); the segments are under
/// `data/`. Small, and read back in full on every sync.
pub fn is_metadata(rel: &Path) -> bool {
    rel.components().count() == 1
}

/// A file the scrub may re-read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The repository.
    pub repository: String,
    /// The file in the repository's current generation.
    pub rel: PathBuf,
    /// Its size.
    pub size: u64,
    /// The scrub round it was last read in.
    pub round: u64,
}

/// The files of a repository's current generation (path, size, mtime)
/// the scrub can check: those the record describes and holds intact (an
/// unknown or damaged file is copied afresh by the plan anyway).
pub fn candidates<'a>(
    record: &DriveRecord,
    repository: &str,
    files: impl IntoIterator<Item = (&'a Path, u64, SystemTime)>,
) -> Vec<Candidate> {
    files
        .into_iter()
        .filter_map(|(rel, size, mtime)| {
            let known = record.known(repository, rel)?;
            (!known.damaged && known.describes(size, mtime)).then(|| Candidate {
                repository: repository.to_string(),
                rel: rel.to_path_buf(),
                size,
                round: known.round,
            })
        })
        .collect()
}

/// The order the scrub reads in: borg's metadata files first (always read,
/// whatever the budget), then the files read longest ago (in the lowest
/// round), so each sync goes on where the last one stopped and a full
/// round covers every file.
pub fn scrub_order(mut candidates: Vec<Candidate>) -> Vec<Candidate> {
    candidates.sort_by(|a, b| {
        (!is_metadata(&a.rel), a.round, &a.repository, &a.rel).cmp(&(
            !is_metadata(&b.rel),
            b.round,
            &b.repository,
            &b.rel,
        ))
    });
    candidates
}

/// How much one sync's scrub may read beyond borg's metadata files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// At most this long (None: no time limit).
    pub time: Option<Duration>,
    /// At most this many bytes (None: no byte limit).
    pub bytes: Option<u64>,
}

impl Budget {
    /// `[sync] scrub-seconds` and `scrub-mib` (0: that limit is off).
    pub fn of(settings: &ferry_config::SyncSettings) -> Budget {
        Budget {
            time: (settings.scrub_seconds > 0).then(|| Duration::from_secs(settings.scrub_seconds)),
            bytes: (settings.scrub_mib > 0).then(|| settings.scrub_mib.saturating_mul(1 << 20)),
        }
    }

    /// Whether a file of `size` may still be read, `read` bytes and
    /// `elapsed` into the slice. The first file is always read, so a file
    /// bigger than the budget does not stall the scrub forever.
    pub fn allows(&self, read: u64, size: u64, elapsed: Duration) -> bool {
        if read == 0 {
            return true;
        }
        let in_time = self.time.is_none_or(|t| elapsed < t);
        let in_bytes = self.bytes.is_none_or(|b| read.saturating_add(size) <= b);
        in_time && in_bytes
    }
}

/// Whether a drive verified only since `verified_since` is overdue at
/// `now` with a period of `period_days`.
pub fn overdue(verified_since: u64, now: u64, period_days: u64) -> bool {
    now.saturating_sub(verified_since) > period_days.saturating_mul(86_400)
}

/// Why reading a file back stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stop flag was raised.
    #[error("stopped")]
    Stopped,
    /// The file could not be read.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads `file` back from the device and hashes it: its cached pages are
/// dropped first (after syncfs they are clean, so `DONTNEED` drops them)
/// and again afterwards, so the bytes come from the drive and the scrub
/// does not push the host's working set out of the page cache. Returns the
/// hash and the bytes read; `stopped` is asked between buffers.
pub fn read_back(
    file: &mut File,
    buffer: &mut Vec<u8>,
    stopped: &dyn Fn() -> bool,
) -> Result<(Digest, u64), ReadError> {
    let fd = file.as_raw_fd();
    // SAFETY: advice on a descriptor owned by `file`.
    unsafe {
        libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED);
        libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_SEQUENTIAL);
    }
    buffer.resize(BUFFER, 0);
    let mut hasher = Hasher::default();
    let mut read = 0u64;
    loop {
        if stopped() {
            return Err(ReadError::Stopped);
        }
        let n = match file.read(buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        hasher.update(&buffer[..n]);
        read += n as u64;
    }
    // SAFETY: as above.
    unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok((hasher.digest(), read))
}

/// Makes `repository`'s record describe its new generation, built from
/// `entries`: the files in `copied` with the hash taken while copying and
/// read back at `now`, the others (linked forward) as they were. Returns
/// how many of the copied files were copied because they had been found
/// damaged: the repairs.
pub fn adopt(
    record: &mut DriveRecord,
    repository: &str,
    entries: &[Entry],
    copied: &BTreeMap<PathBuf, Digest>,
    now: u64,
) -> u32 {
    let old = record.repositories.remove(repository).unwrap_or_default();
    let mut new = BTreeMap::new();
    let mut repaired = 0;
    for entry in entries {
        let Some(name) = key(&entry.rel) else {
            continue;
        };
        let before = old.get(name);
        if let Some(digest) = copied.get(&entry.rel) {
            if before.is_some_and(|k| k.damaged && k.describes(entry.size, entry.mtime)) {
                repaired += 1;
            }
            new.insert(
                name.to_string(),
                Known {
                    size: entry.size,
                    mtime_ns: nanos(entry.mtime),
                    hash: digest.hex(),
                    verified: now,
                    damaged: false,
                    round: record.round,
                },
            );
        } else if let Some(known) = before {
            new.insert(name.to_string(), known.clone());
        }
    }
    record.repositories.insert(repository.to_string(), new);
    repaired
}

/// Since when every byte of the copies `record` describes has been found
/// intact (0: some never, or damaged), and how many bytes they hold.
pub fn coverage(record: &DriveRecord) -> (u64, u64) {
    let files = record
        .repositories
        .values()
        .flat_map(|files| files.values());
    let since = files
        .clone()
        .map(|k| if k.damaged { 0 } else { k.verified })
        .min()
        .unwrap_or(0);
    (since, files.map(|k| k.size).sum())
}

/// What one sync's scrub did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scrubbed {
    /// Bytes read from the drive.
    pub bytes: u64,
    /// Files read.
    pub files: u64,
    /// Files found damaged (repository, path): marked in the record.
    pub damaged: BTreeSet<(String, PathBuf)>,
    /// How long it took.
    pub elapsed: Duration,
}

/// Re-reads `order`'s files (see [`scrub_order`]) within `budget` through
/// `open`, compares each with the record and marks it verified at `now`
/// or damaged. A file that cannot be read (EIO) is damaged too.
pub fn scrub(
    order: &[Candidate],
    record: &mut DriveRecord,
    budget: Budget,
    now: u64,
    open: &dyn Fn(&str, &Path) -> io::Result<File>,
    stopped: &dyn Fn() -> bool,
    progress: &dyn Fn(u64),
) -> Result<Scrubbed, ReadError> {
    let started = Instant::now();
    record.round += 1;
    let round = record.round;
    let mut done = Scrubbed::default();
    let mut sliced = 0u64;
    let mut buffer = Vec::new();
    for candidate in order {
        let metadata = is_metadata(&candidate.rel);
        if !metadata && !budget.allows(sliced, candidate.size, started.elapsed()) {
            break;
        }
        let result = open(&candidate.repository, &candidate.rel)
            .map_err(ReadError::Io)
            .and_then(|mut file| read_back(&mut file, &mut buffer, stopped));
        let (intact, read) = match result {
            Err(ReadError::Stopped) => return Err(ReadError::Stopped),
            Err(ReadError::Io(e)) => {
                tracing::warn!(
                    "scrub: cannot read {} of {} on the drive: {e}; it is copied afresh",
                    candidate.rel.display(),
                    candidate.repository
                );
                (false, 0)
            }
            Ok((digest, read)) => {
                let expected = record
                    .known(&candidate.repository, &candidate.rel)
                    .map(|k| k.hash.clone());
                (
                    expected.as_deref() == Some(digest.hex().as_str()) && read == candidate.size,
                    read,
                )
            }
        };
        done.bytes += read;
        done.files += 1;
        if !metadata {
            sliced += read.max(candidate.size);
        }
        progress(done.bytes);
        let Some(known) = record
            .repositories
            .get_mut(&candidate.repository)
            .and_then(|files| files.get_mut(key(&candidate.rel)?))
        else {
            continue;
        };
        if intact {
            known.verified = now;
            known.round = round;
        } else {
            if !known.damaged {
                tracing::warn!(
                    "scrub: {} of {} on the drive is not what was copied; the new copy gets a fresh one",
                    candidate.rel.display(),
                    candidate.repository
                );
            }
            known.damaged = true;
            done.damaged
                .insert((candidate.repository.clone(), candidate.rel.clone()));
        }
    }
    done.elapsed = started.elapsed();
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn known(hash: Digest, size: u64, verified: u64) -> Known {
        Known {
            size,
            mtime_ns: 5,
            hash: hash.hex(),
            verified,
            damaged: false,
            round: 0,
        }
    }

    fn candidate(rel: &str, size: u64, round: u64) -> Candidate {
        Candidate {
            repository: "nas".into(),
            rel: rel.into(),
            size,
            round,
        }
    }

    fn hash_of(bytes: &[u8]) -> Digest {
        let mut h = Hasher::default();
        h.update(bytes);
        h.digest()
    }

    #[test]
    fn metadata_first_then_longest_ago() {
        let order = scrub_order(vec![
            candidate("data/0/3", 10, 50),
            candidate("data/0/1", 10, 90),
            candidate("index.3", 10, 99),
            candidate("data/0/2", 10, 50),
            candidate("config", 10, 100),
        ]);
        let names: Vec<_> = order
            .iter()
            .map(|c| c.rel.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["index.3", "config", "data/0/2", "data/0/3", "data/0/1"]
        );
    }

    #[test]
    fn the_budget_always_allows_one_file_and_stops_at_either_limit() {
        let bytes = Budget {
            time: None,
            bytes: Some(100),
        };
        assert!(bytes.allows(0, 1000, Duration::ZERO));
        assert!(bytes.allows(50, 50, Duration::from_secs(999)));
        assert!(!bytes.allows(50, 51, Duration::ZERO));
        let time = Budget {
            time: Some(Duration::from_secs(2)),
            bytes: None,
        };
        assert!(time.allows(10, u64::MAX / 2, Duration::from_secs(1)));
        assert!(!time.allows(10, 1, Duration::from_secs(2)));
    }

    #[test]
    fn overdue_after_the_period() {
        assert!(!overdue(1000, 1000 + 30 * 86_400, 30));
        assert!(overdue(1000, 1000 + 30 * 86_400 + 1, 30));
        assert!(overdue(0, 30 * 86_400 + 1, 30));
    }

    #[test]
    fn trusted_only_when_recorded_intact_with_the_same_size_and_mtime() {
        let mut record = DriveRecord::fresh();
        let entry = Entry {
            rel: "data/0/1".into(),
            size: 3,
            mtime: SystemTime::UNIX_EPOCH + Duration::from_nanos(5),
            mode: 0o600,
        };
        assert!(!record.trusted("nas", &entry));
        record
            .repositories
            .entry("nas".into())
            .or_default()
            .insert("data/0/1".into(), known(hash_of(b"abc"), 3, 1));
        assert!(record.trusted("nas", &entry));
        assert!(!record.trusted("photos", &entry));
        let grown = Entry {
            size: 4,
            ..entry.clone()
        };
        assert!(!record.trusted("nas", &grown));
        record
            .repositories
            .get_mut("nas")
            .and_then(|f| f.get_mut("data/0/1"))
            .expect("known")
            .damaged = true;
        assert!(!record.trusted("nas", &entry));
        assert_eq!(record.verified_since("nas", [Path::new("data/0/1")]), 0);
    }

    /// Real files: an intact one is marked verified, a changed one damaged,
    /// the budget ends the slice after the first data file, metadata is
    /// read whatever the budget; the next round starts with what was not
    /// read.
    #[test]
    fn scrub_marks_verified_and_damaged_and_resumes() {
        let dir = tempfile::tempdir().expect("dir");
        let files = [
            ("config", b"cfg".as_slice()),
            ("data/0/1", b"one"),
            ("data/0/2", b"two"),
        ];
        let mut record = DriveRecord::fresh();
        for (rel, bytes) in files {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, bytes).expect("write");
            record
                .repositories
                .entry("nas".into())
                .or_default()
                .insert(rel.into(), known(hash_of(bytes), 3, 1));
        }
        // Damage data/0/1 behind the record's back.
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("data/0/1"))
            .and_then(|mut f| f.write_all(b"0"))
            .expect("flip");
        let open = |_: &str, rel: &Path| File::open(dir.path().join(rel));
        let budget = Budget {
            time: None,
            bytes: Some(3),
        };
        let mtime = SystemTime::UNIX_EPOCH + Duration::from_nanos(5);
        let candidates = |record: &DriveRecord| {
            scrub_order(super::candidates(
                record,
                "nas",
                files.iter().map(|(rel, _)| (Path::new(rel), 3, mtime)),
            ))
        };
        let order = candidates(&record);
        let first =
            scrub(&order, &mut record, budget, 10, &open, &|| false, &|_| {}).expect("scrub");
        assert_eq!(first.files, 2, "{first:?}");
        assert_eq!(
            first.damaged,
            BTreeSet::from([("nas".to_string(), PathBuf::from("data/0/1"))])
        );
        assert!(
            record
                .known("nas", Path::new("data/0/1"))
                .expect("k")
                .damaged
        );
        assert_eq!(
            record
                .known("nas", Path::new("config"))
                .expect("k")
                .verified,
            10
        );
        // The next slice reads data/0/2, which the first did not reach.
        let order = candidates(&record);
        let second =
            scrub(&order, &mut record, budget, 20, &open, &|| false, &|_| {}).expect("scrub");
        assert_eq!(second.files, 2, "{second:?}");
        assert!(second.damaged.is_empty(), "{second:?}");
        assert_eq!(
            record
                .known("nas", Path::new("data/0/2"))
                .expect("k")
                .verified,
            20
        );
        let stopped = scrub(&order, &mut record, budget, 30, &open, &|| true, &|_| {});
        assert!(matches!(stopped, Err(ReadError::Stopped)));
    }

    #[test]
    fn adopting_a_new_generation_counts_repairs() {
        let mtime = SystemTime::UNIX_EPOCH + Duration::from_nanos(5);
        let entry = |rel: &str| Entry {
            rel: rel.into(),
            size: 3,
            mtime,
            mode: 0o600,
        };
        let mut record = DriveRecord::fresh();
        let files = record.repositories.entry("nas".into()).or_default();
        files.insert("data/0/1".into(), known(hash_of(b"one"), 3, 4));
        files.insert(
            "data/0/2".into(),
            Known {
                damaged: true,
                ..known(hash_of(b"two"), 3, 4)
            },
        );
        files.insert("data/0/gone".into(), known(hash_of(b"old"), 3, 4));
        let copied = BTreeMap::from([
            (PathBuf::from("data/0/2"), hash_of(b"two")),
            (PathBuf::from("data/0/3"), hash_of(b"new")),
        ]);
        let entries = [entry("data/0/1"), entry("data/0/2"), entry("data/0/3")];
        assert_eq!(adopt(&mut record, "nas", &entries, &copied, 9), 1);
        let files = &record.repositories["nas"];
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            ["data/0/1", "data/0/2", "data/0/3"]
        );
        assert!(!files["data/0/2"].damaged);
        assert_eq!(files["data/0/2"].verified, 9);
        assert_eq!(files["data/0/1"].verified, 4);
        assert_eq!(coverage(&record), (4, 9));
    }

    #[test]
    fn the_record_round_trips_and_a_foreign_one_is_ignored() {
        let dir = tempfile::tempdir().expect("dir");
        let path = DriveRecord::path(dir.path(), "offsite-a");
        assert_eq!(DriveRecord::load(&path), DriveRecord::fresh());
        let mut record = DriveRecord::fresh();
        record
            .repositories
            .entry("nas".into())
            .or_default()
            .insert("config".into(), known(hash_of(b"x"), 1, 7));
        record.save(&path).expect("save");
        assert_eq!(DriveRecord::load(&path), record);
        std::fs::write(&path, br#"{"algorithm":"md5","repositories":{}}"#).expect("write");
        assert_eq!(DriveRecord::load(&path), DriveRecord::fresh());
    }
}
