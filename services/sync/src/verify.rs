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
//!   `posix_fadvise(DONTNEED)`, which drops clean pages, see
//!   [`DeviceReader`] — and compared;
//! - the hashes are kept on the host, per drive ([`DriveRecord`]), with
//!   when each file was last found intact on the drive;
//! - every sync re-reads borg's metadata files (config, index, hints,
//!   integrity: small) in full, and a slice of the unchanged files within a
//!   budget, those read longest ago first, so the next sync goes on where
//!   this one stopped ([`scrub_order`]);
//! - a file found damaged is marked so; the plan never hard-links it into a
//!   new generation (see [`DriveRecord::trusted`]), it is copied afresh;
//! - a file of more than one [`BLOCK`] (borg's segments are up to 500 MiB)
//!   is hashed per block, and its hash is the hash of its blocks' hashes:
//!   the scrub checks a block at a time and can stop inside a file and go
//!   on there next time, so a slice never overruns its budget by more than
//!   one block (reading a whole 500 MiB segment took 3 s beyond a 64 MiB
//!   budget). The hashes are kept, not re-derived, because hashing the
//!   bytes twice while copying (per block and whole) would cost CPU on
//!   every copied byte for the scrub's sake.
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
//! read speed. borg names the newest archive (`borg list` of the snapshot
//! the copy is made from, run beside the copy; the read-back proves the
//! copy holds the snapshot's bytes), but only to name it: what gates the
//! swap is the read-back.
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

/// The hash algorithm, recorded with the hashes. A record of another one
/// (such as plain "xxh3-128", before files were hashed per block) is not
/// used: everything is copied and hashed afresh once.
pub const ALGORITHM: &str = "xxh3-128/16MiB-blocks";

/// The scrub's unit: a file is hashed, and re-read, per block of this many
/// bytes (16 MiB: about 0.1 s at a USB drive's 150 MB/s, and 2 MB of
/// record per TB).
pub const BLOCK: u64 = 16 << 20;

/// How much is read at a time: 128 KiB, what `cp` uses across
/// filesystems; it stays in the CPU's L2 cache, so the hash and `write`
/// read what `read` just wrote (with 1 MiB the copy took 1.6 CPU s/GB
/// against 1.3 with this; docs/benchmarks.md).
pub const BUFFER: usize = 128 << 10;

/// Reads a file on the drive from the device, not from the page cache,
/// for the read-back and the scrub: the file's cached pages are dropped
/// first (`DONTNEED`, which drops clean pages: after syncfs every page is
/// clean, and the copy's streamed writeback has dropped most already), it
/// is read with sequential advice, and its pages are dropped again when
/// the reader goes, so a scrub does not push the host's working set out.
///
/// Why not O_DIRECT: measured on the bench's drive (docs/benchmarks.md),
/// reading with O_DIRECT in 4 MiB requests, one at a time, was slower than
/// this (the read-back at 770–1 350 MiB/s against 1 300–1 900; a 64 MiB
/// scrub slice 95 ms against 50): a direct read is a round trip per
/// request, where the page cache's readahead keeps the drive streaming.
pub struct DeviceReader<'a> {
    file: &'a mut File,
    buffer: &'a mut Vec<u8>,
}

impl<'a> DeviceReader<'a> {
    /// A reader of `file` from its current position, using `buffer`.
    pub fn new(file: &'a mut File, buffer: &'a mut Vec<u8>) -> DeviceReader<'a> {
        let fd = file.as_raw_fd();
        // SAFETY: advice on a descriptor owned by `file`.
        unsafe {
            libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED);
            libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
        buffer.resize(BUFFER, 0);
        DeviceReader { file, buffer }
    }

    /// The next bytes, at most `max` (fewer at the end of the file; empty
    /// there).
    pub fn read(&mut self, max: u64) -> io::Result<&[u8]> {
        let want = usize::try_from(max).unwrap_or(usize::MAX).min(BUFFER);
        loop {
            match self.file.read(&mut self.buffer[..want]) {
                Ok(n) => return Ok(&self.buffer[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for DeviceReader<'_> {
    fn drop(&mut self) {
        // SAFETY: advice on a descriptor owned by `file`.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

/// A file's xxh3-128 hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest(pub u128);

impl Digest {
    /// As kept in the record: 32 hex digits.
    pub fn hex(self) -> String {
        format!("{:032x}", self.0)
    }
}

/// Hashes bytes as they pass, per block (see [`Hashed`]).
pub struct Hasher {
    block_size: u64,
    block: Xxh3,
    in_block: u64,
    blocks: Vec<Digest>,
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher::with_block(BLOCK)
    }
}

/// A file's hashes: with one block (up to [`BLOCK`] bytes, or empty) the
/// file's hash is its bytes' xxh3-128 and `blocks` is empty; with more, the
/// file's hash is the xxh3-128 of its blocks' hashes (16 bytes each, little
/// endian), which are in `blocks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    /// The file's hash.
    pub digest: Digest,
    /// Per block, when there is more than one.
    pub blocks: Vec<Digest>,
}

impl Hasher {
    /// Blocks of `block_size` bytes ([`BLOCK`] but in tests).
    pub fn with_block(block_size: u64) -> Hasher {
        Hasher {
            block_size: block_size.max(1),
            block: Xxh3::new(),
            in_block: 0,
            blocks: Vec::new(),
        }
    }

    /// Adds bytes.
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = usize::try_from(self.block_size - self.in_block).unwrap_or(usize::MAX);
            let take = room.min(bytes.len());
            self.block.update(&bytes[..take]);
            self.in_block += take as u64;
            bytes = &bytes[take..];
            if self.in_block == self.block_size {
                self.blocks.push(Digest(self.block.digest128()));
                self.block.reset();
                self.in_block = 0;
            }
        }
    }

    /// The hashes of everything added.
    pub fn finish(mut self) -> Hashed {
        if self.in_block > 0 || self.blocks.is_empty() {
            self.blocks.push(Digest(self.block.digest128()));
        }
        if self.blocks.len() == 1 {
            return Hashed {
                digest: self.blocks[0],
                blocks: Vec::new(),
            };
        }
        let mut whole = Xxh3::new();
        for block in &self.blocks {
            whole.update(&block.0.to_le_bytes());
        }
        Hashed {
            digest: Digest(whole.digest128()),
            blocks: self.blocks,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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
    /// Per-block hashes (32 hex digits each) of a file of more than one
    /// block; empty for one block (its hash is `hash`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<String>,
    /// Where a scrub stopped inside this file (a block boundary; 0: not
    /// inside it): the next one goes on here.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub scrub_offset: u64,
    /// When the scrub now inside this file began it: once it reaches the
    /// end, the whole file is known intact since then.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub scrub_began: u64,
}

impl Known {
    /// What the file copied with `hashed` is known as, found intact at
    /// `verified` in scrub round `round`.
    pub fn new(size: u64, mtime: SystemTime, hashed: &Hashed, verified: u64, round: u64) -> Known {
        Known {
            size,
            mtime_ns: nanos(mtime),
            hash: hashed.digest.hex(),
            verified,
            damaged: false,
            round,
            blocks: hashed.blocks.iter().map(|d| d.hex()).collect(),
            scrub_offset: 0,
            scrub_began: 0,
        }
    }

    /// The expected hash of block `index` (of `block_size` bytes).
    fn block_hash(&self, index: u64) -> Option<&str> {
        if self.blocks.is_empty() {
            return (index == 0).then_some(self.hash.as_str());
        }
        self.blocks
            .get(usize::try_from(index).ok()?)
            .map(String::as_str)
    }

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

    /// Whether a block of `size` may still be read, `read` bytes and
    /// `elapsed` into the slice. The first block is always read, so a
    /// budget smaller than a block does not stall the scrub forever.
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

/// Reads `file` back from the device and hashes it (see
/// [`DeviceReader`]). Returns the hash and the bytes read; `stopped` is
/// asked between requests.
pub fn read_back(
    file: &mut File,
    buffer: &mut Vec<u8>,
    stopped: &dyn Fn() -> bool,
) -> Result<(Digest, u64), ReadError> {
    let mut reader = DeviceReader::new(file, buffer);
    let mut hasher = Hasher::default();
    let mut read = 0u64;
    loop {
        if stopped() {
            return Err(ReadError::Stopped);
        }
        let bytes = reader.read(u64::MAX)?;
        if bytes.is_empty() {
            break;
        }
        hasher.update(bytes);
        read += bytes.len() as u64;
    }
    Ok((hasher.finish().digest, read))
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
    copied: &BTreeMap<PathBuf, Hashed>,
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
        if let Some(hashed) = copied.get(&entry.rel) {
            if before.is_some_and(|k| k.damaged && k.describes(entry.size, entry.mtime)) {
                repaired += 1;
            }
            new.insert(
                name.to_string(),
                Known::new(entry.size, entry.mtime, hashed, now, record.round),
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
/// `open`, a block of `block_size` ([`BLOCK`]) at a time, compares each
/// block with the record and marks the file verified at `now` (or since
/// the scrub began it, when it was begun by an earlier one) or damaged. A
/// file that cannot be read (EIO) is damaged too. The budget is asked
/// before each block, so a slice stops inside a file, and the next one
/// goes on there.
pub fn scrub(
    order: &[Candidate],
    record: &mut DriveRecord,
    budget: Budget,
    now: u64,
    open: &dyn Fn(&str, &Path) -> io::Result<File>,
    stopped: &dyn Fn() -> bool,
    progress: &dyn Fn(u64),
) -> Result<Scrubbed, ReadError> {
    scrub_blocks(order, record, budget, BLOCK, now, open, stopped, progress)
}

/// [`scrub`] with the block size the record's hashes were taken with.
#[allow(clippy::too_many_arguments)]
fn scrub_blocks(
    order: &[Candidate],
    record: &mut DriveRecord,
    budget: Budget,
    block_size: u64,
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
        let Some(known) = record
            .repositories
            .get_mut(&candidate.repository)
            .and_then(|files| files.get_mut(key(&candidate.rel)?))
        else {
            continue;
        };
        let remaining = candidate.size.saturating_sub(known.scrub_offset);
        if !metadata && !budget.allows(sliced, remaining.min(block_size), started.elapsed()) {
            break;
        }
        let mut reader = FileScrub {
            known,
            candidate,
            block_size,
            now,
            round,
        };
        let allowed = |read_now: u64, next: u64| {
            metadata || budget.allows(sliced + read_now, next, started.elapsed())
        };
        let result = open(&candidate.repository, &candidate.rel)
            .map_err(ReadError::Io)
            .and_then(|mut file| reader.read(&mut file, &mut buffer, &allowed, stopped));
        let read = match result {
            Err(ReadError::Stopped) => return Err(ReadError::Stopped),
            Err(ReadError::Io(e)) => {
                tracing::warn!(
                    "scrub: cannot read {} of {} on the drive: {e}; it is copied afresh",
                    candidate.rel.display(),
                    candidate.repository
                );
                reader.damaged();
                0
            }
            Ok(Block::Intact(read)) => read,
            Ok(Block::Damaged(read)) => {
                reader.damaged();
                read
            }
        };
        if reader.known.damaged {
            done.damaged
                .insert((candidate.repository.clone(), candidate.rel.clone()));
        }
        done.bytes += read;
        done.files += 1;
        if !metadata {
            sliced += read;
        }
        progress(done.bytes);
    }
    done.elapsed = started.elapsed();
    Ok(done)
}

/// How reading a file's blocks ended: bytes read, and whether every block
/// read was intact.
enum Block {
    Intact(u64),
    Damaged(u64),
}

/// The scrub of one file, from where the last one stopped in it.
struct FileScrub<'a> {
    known: &'a mut Known,
    candidate: &'a Candidate,
    block_size: u64,
    now: u64,
    round: u64,
}

impl FileScrub<'_> {
    /// Reads blocks from the file's resume point while `allowed(read so
    /// far, next block's size)`, each from the device (cached pages
    /// dropped) against its recorded hash; records how far it got.
    fn read(
        &mut self,
        file: &mut File,
        buffer: &mut Vec<u8>,
        allowed: &dyn Fn(u64, u64) -> bool,
        stopped: &dyn Fn() -> bool,
    ) -> Result<Block, ReadError> {
        use std::io::{Seek, SeekFrom};
        let size = self.candidate.size;
        let mut offset = self.known.scrub_offset.min(size);
        if !offset.is_multiple_of(self.block_size) {
            offset = 0;
        }
        if offset == 0 {
            self.known.scrub_began = self.now;
        }
        file.seek(SeekFrom::Start(offset))?;
        let mut reader = DeviceReader::new(file, buffer);
        let mut read = 0u64;
        loop {
            let length = (size - offset).min(self.block_size);
            if read > 0 && (length == 0 || !allowed(read, length)) {
                break;
            }
            let index = offset / self.block_size;
            let mut hasher = Hasher::with_block(self.block_size);
            let got = read_exactly(&mut reader, length, &mut hasher, stopped)?;
            read += got;
            let expected = self.known.block_hash(index);
            if got != length || expected != Some(hasher.finish().digest.hex().as_str()) {
                return Ok(Block::Damaged(read));
            }
            offset += length;
            if offset >= size {
                // The whole file, intact since this scrub began it.
                self.known.verified = match self.known.scrub_began {
                    0 => self.now,
                    began => began,
                };
                self.known.round = self.round;
                self.known.scrub_offset = 0;
                self.known.scrub_began = 0;
                break;
            }
            self.known.scrub_offset = offset;
        }
        Ok(Block::Intact(read))
    }

    /// Marks the file damaged (never linked forward; copied afresh).
    fn damaged(&mut self) {
        if !self.known.damaged {
            tracing::warn!(
                "scrub: {} of {} on the drive is not what was copied; the new copy gets a fresh one",
                self.candidate.rel.display(),
                self.candidate.repository
            );
        }
        self.known.damaged = true;
        self.known.scrub_offset = 0;
        self.known.scrub_began = 0;
    }
}

/// Reads up to `length` bytes into `hasher`; fewer at the end of the file.
fn read_exactly(
    reader: &mut DeviceReader,
    length: u64,
    hasher: &mut Hasher,
    stopped: &dyn Fn() -> bool,
) -> Result<u64, ReadError> {
    let mut got = 0u64;
    while got < length {
        if stopped() {
            return Err(ReadError::Stopped);
        }
        let bytes = reader.read(length - got)?;
        if bytes.is_empty() {
            break;
        }
        hasher.update(bytes);
        got += bytes.len() as u64;
    }
    Ok(got)
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
            blocks: Vec::new(),
            scrub_offset: 0,
            scrub_began: 0,
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
        hashed(bytes, BLOCK).digest
    }

    fn hashed(bytes: &[u8], block: u64) -> Hashed {
        let mut h = Hasher::with_block(block);
        h.update(bytes);
        h.finish()
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
            (PathBuf::from("data/0/2"), hashed(b"two", BLOCK)),
            (PathBuf::from("data/0/3"), hashed(b"new", BLOCK)),
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

    #[test]
    fn a_file_of_blocks_hashes_its_blocks_hashes() {
        // One block: the bytes' own xxh3, whatever the block size.
        assert_eq!(hashed(b"abc", 4).digest, hashed(b"abc", 1 << 20).digest);
        assert_eq!(hashed(b"abcd", 4).blocks, Vec::<Digest>::new());
        assert_eq!(hashed(b"", 4).digest, hash_of(b""));
        // Several: per block, split wherever the updates fall.
        let whole = hashed(b"abcdefghij", 4);
        let mut pieces = Hasher::with_block(4);
        for piece in [b"ab".as_slice(), b"cdefg", b"", b"hij"] {
            pieces.update(piece);
        }
        assert_eq!(pieces.finish(), whole);
        assert_eq!(
            whole.blocks,
            [hash_of(b"abcd"), hash_of(b"efgh"), hash_of(b"ij")]
        );
        assert_ne!(whole.digest, hash_of(b"abcdefghij"));
        assert_ne!(whole.digest, hashed(b"abcdefghiJ", 4).digest);
    }

    /// A file of 10 blocks of 4 bytes scrubbed with a budget of 8 bytes:
    /// two blocks per sync, the file known intact (since the first of
    /// those syncs) after the fifth; a flipped byte in a later block is
    /// found when the scrub reaches it.
    #[test]
    fn the_device_reader_returns_every_byte_in_order_whatever_it_is_asked() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("segment");
        let bytes: Vec<u8> = (0..(9 << 20) + 123u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&path, &bytes).expect("write");
        // Whole requests (the read-back), then odd sizes (a scrub's blocks).
        for asks in [vec![u64::MAX], vec![5, 4096, 3 << 20, 1, u64::MAX]] {
            let mut file = File::open(&path).expect("open");
            let mut buffer = Vec::new();
            let mut reader = DeviceReader::new(&mut file, &mut buffer);
            let mut got = Vec::new();
            for max in asks.iter().copied().cycle() {
                let chunk = reader.read(max).expect("read");
                assert!(chunk.len() as u64 <= max);
                if chunk.is_empty() {
                    break;
                }
                got.extend_from_slice(chunk);
            }
            assert_eq!(got.len(), bytes.len(), "asked {asks:?}");
            assert!(got == bytes, "asked {asks:?}: the bytes differ");
        }
        let mut file = File::open(&path).expect("open");
        let mut buffer = Vec::new();
        let (digest, read) = read_back(&mut file, &mut buffer, &|| false).expect("read back");
        assert_eq!(read, bytes.len() as u64);
        assert_eq!(digest, hashed(&bytes, BLOCK).digest);
    }

    #[test]
    fn the_scrub_stops_inside_a_file_and_goes_on_there() {
        let dir = tempfile::tempdir().expect("dir");
        let bytes: Vec<u8> = (0..40u8).collect();
        let path = dir.path().join("data/0/1");
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, &bytes).expect("write");
        let mtime = SystemTime::UNIX_EPOCH + Duration::from_nanos(5);
        let mut record = DriveRecord::fresh();
        record.repositories.entry("nas".into()).or_default().insert(
            "data/0/1".into(),
            Known::new(40, mtime, &hashed(&bytes, 4), 1, 0),
        );
        let open = |_: &str, rel: &Path| File::open(dir.path().join(rel));
        let budget = Budget {
            time: None,
            bytes: Some(8),
        };
        let slice = |record: &mut DriveRecord, now: u64| {
            let order = scrub_order(super::candidates(
                record,
                "nas",
                [(Path::new("data/0/1"), 40, mtime)],
            ));
            scrub_blocks(&order, record, budget, 4, now, &open, &|| false, &|_| {}).expect("scrub")
        };
        let known = |record: &DriveRecord| record.known("nas", Path::new("data/0/1")).cloned();
        for (sync, now) in [10, 20, 30, 40].into_iter().enumerate() {
            let done = slice(&mut record, now);
            assert_eq!(done.bytes, 8, "sync {sync}: {done:?}");
            let k = known(&record).expect("known");
            assert_eq!((k.scrub_offset, k.verified), (8 * (sync as u64 + 1), 1));
        }
        let done = slice(&mut record, 50);
        assert_eq!(done.bytes, 8);
        let k = known(&record).expect("known");
        assert_eq!((k.scrub_offset, k.verified, k.damaged), (0, 10, false));

        // Damage block 7 (bytes 28..32): found on the fourth slice.
        let mut damaged = bytes.clone();
        damaged[29] ^= 0xff;
        std::fs::write(&path, &damaged).expect("write");
        for now in [60, 70, 80] {
            assert!(slice(&mut record, now).damaged.is_empty());
        }
        let found = slice(&mut record, 90);
        assert_eq!(found.damaged.len(), 1, "{found:?}");
        assert!(known(&record).expect("known").damaged);
    }
}
