//! One sync job: every repository assigned to a drive, copied onto it.
//!
//! The job runs in a task the service loop owns (file work in
//! `spawn_blocking`), never inside a method call. In order: re-read borg's
//! metadata files and the scrub's slice of the drive ([`crate::verify`]),
//! so what is found damaged is copied afresh below; for each repository
//! whose committed state the drive lacks take borg's lock, hard-link a
//! snapshot, let go of the lock, start `borg list` of the snapshot beside
//! what follows, and plan the new generation against the current one;
//! check the drive's free space for all of them at once; then for each
//! repository build the new generation (hashing what it copies), make it
//! durable, read what it copied back from the drive, and swap it in.
//! Whatever happens, the snapshots are removed and (unless the drive is
//! gone) the half-built generations too, before the job reports that it
//! finished or failed. It reports through [`Reports`], a channel to the
//! service loop: nothing here touches the bus.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_config::{Config, Repository};
use tokio::sync::{mpsc, watch};

use crate::borg::{Borg, Listing};
use crate::domain::Report;
use crate::generation::{self, BuildError, Generation, Layout, Plan};
use crate::listings::Listings;
use crate::mounts;
use crate::snapshot::{self, Snapshot, Transaction};
use crate::truth;
use crate::verify::{self, DriveRecord};
use ferry_service::confined::{Confined, WalkError};
use ferry_service::unix_now;

/// At most this often a SyncProgress signal.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Why a job is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Cancel was called.
    Cancelled,
    /// The drive watcher says the drive is gone.
    Removed,
    /// ferry-sync is stopping.
    Shutdown,
}

/// The job's side of its stop request: checked between chunks by file
/// work, awaited by waits.
#[derive(Debug, Clone)]
pub struct Stop(watch::Receiver<Option<StopReason>>);

impl Stop {
    /// A stop handle and the sender that raises it.
    pub fn new() -> (watch::Sender<Option<StopReason>>, Stop) {
        let (tx, rx) = watch::channel(None);
        (tx, Stop(rx))
    }

    /// A stop raised by `receiver`'s sender (shared by several tasks).
    pub fn from(receiver: watch::Receiver<Option<StopReason>>) -> Stop {
        Stop(receiver)
    }

    /// The reason, once a stop was asked for.
    pub fn reason(&self) -> Option<StopReason> {
        *self.0.borrow()
    }

    /// Resolves when a stop is asked for (or the sender is gone).
    pub async fn wait(&mut self) -> StopReason {
        match self.0.wait_for(Option::is_some).await {
            Ok(reason) => reason.unwrap_or(StopReason::Shutdown),
            Err(_) => StopReason::Shutdown,
        }
    }
}

/// What a running job is doing, as Sync1.Running, SyncProgress and the
/// log show it. The wire names are documented in org.ferry.Sync1.xml.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Cleaning up what an interrupted sync left, comparing.
    Prepare,
    /// Taking borg's lock.
    Lock,
    /// Waiting for borg's lock, which another borg holds.
    LockWait,
    /// Hard-linking the snapshot under the lock.
    Snapshot,
    /// Re-reading borg's metadata files and a slice of the unchanged
    /// files on the drive.
    Scrub,
    /// Building the new copy on the drive.
    Copy,
    /// Reading the new files back from the drive (and waiting for borg to
    /// name the newest archive, listed beside the copy).
    Verify,
    /// Putting the new copy in place.
    Swap,
}

impl Phase {
    /// The phase's name on the bus.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Prepare => "prepare",
            Phase::Lock => "lock",
            Phase::LockWait => "lock-wait",
            Phase::Snapshot => "snapshot",
            Phase::Scrub => "scrub",
            Phase::Copy => "copy",
            Phase::Verify => "verify",
            Phase::Swap => "swap",
        }
    }
}

/// The stage a job failed in, as SyncFailed names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Taking borg's lock.
    Lock,
    /// Hard-linking the snapshot.
    Snapshot,
    /// Not enough free space on the drive.
    Space,
    /// Building the new generation.
    Copy,
    /// The new generation did not read back as written, or the
    /// verification record cannot be kept.
    Verify,
    /// Swapping it in.
    Swap,
    /// ferry's directory on the drive holds what has no place there: a
    /// symlink, a FIFO, a socket, a device node, too deep a tree.
    DriveLayout,
    /// The drive was removed.
    Removed,
    /// Cancelled (or ferry-sync stopping).
    Cancelled,
}

impl Stage {
    /// The stage's name on the bus.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Lock => "lock",
            Stage::Snapshot => "snapshot",
            Stage::Space => "space",
            Stage::Copy => "copy",
            Stage::Verify => "verify",
            Stage::Swap => "swap",
            Stage::DriveLayout => "drive-layout",
            Stage::Removed => "removed",
            Stage::Cancelled => "cancelled",
        }
    }
}

/// Why a job failed, phrased for a person.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Where it failed.
    pub stage: Stage,
    /// What to do about it.
    pub message: String,
}

impl Failure {
    /// A failure in `stage`.
    pub fn new(stage: Stage, message: String) -> Failure {
        Failure { stage, message }
    }

    /// A failure of a confined operation on the drive in `stage`: what
    /// the drive's layout caused is a `drive-layout` failure.
    pub fn on_drive(stage: Stage, error: WalkError) -> Failure {
        match error {
            WalkError::Layout(m) => Failure::new(
                Stage::DriveLayout,
                format!("{m}; nothing outside the drive was touched, and the drive is closed"),
            ),
            WalkError::Io(m) => Failure::new(stage, m),
        }
    }

    /// The failure a stop request turns into.
    /// (What the drive holds is added by looking, see [`truth`].)
    pub fn stopped(reason: StopReason) -> Failure {
        match reason {
            StopReason::Removed => Failure::new(
                Stage::Removed,
                "the drive was removed during the sync; plug it in again to sync".into(),
            ),
            StopReason::Cancelled => {
                Failure::new(Stage::Cancelled, "the sync was cancelled".into())
            }
            StopReason::Shutdown => Failure::new(
                Stage::Cancelled,
                "ferry-sync stopped during the sync; start the sync again".into(),
            ),
        }
    }
}

/// What a job is asked to do.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The drive name.
    pub drive: String,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// The repositories assigned to it, in ferry.toml's order.
    pub repositories: Vec<(String, Repository)>,
    /// The newest archive per repository on the drive's copies, as the
    /// ledger knows them: a repository with nothing new reports it
    /// without asking borg.
    pub archives: BTreeMap<String, String>,
}

impl JobSpec {
    /// The job for drive `drive` as ferry.toml describes it; `None` for an
    /// unknown drive.
    pub fn of(config: &Config, drive: &str) -> Option<JobSpec> {
        let (name, settings) = config.drives.iter().find(|(n, _)| n.as_str() == drive)?;
        let repositories = settings
            .repositories
            .iter()
            .filter_map(|r| {
                let repository = config.repositories.get(r)?;
                Some((r.to_string(), repository.clone()))
            })
            .collect();
        Some(JobSpec {
            drive: drive.to_string(),
            mountpoint: settings.mountpoint(name),
            repositories,
            archives: BTreeMap::new(),
        })
    }
}

/// What a successful job reports.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Bytes copied.
    pub bytes: u64,
    /// Free bytes left on the drive.
    pub free: u64,
    /// Newest archive per repository ("" when unknown).
    pub archives: BTreeMap<String, String>,
    /// Bytes read back from the drive (new files, metadata, scrub).
    pub read: u64,
    /// Files found damaged and copied afresh.
    pub repaired: u32,
    /// Since when every byte on the drive is known intact (0: not all).
    pub verified_since: u64,
    /// Bytes of the copies on the drive.
    pub total: u64,
}

/// What the job holds that must be let go of whatever happens.
#[derive(Default)]
struct Held {
    snapshots: Vec<Snapshot>,
    layouts: Vec<Layout>,
    /// The generations seen and made, to tell afterwards which one the
    /// drive holds.
    truth: Arc<truth::Record>,
}

impl Held {
    /// Removes the snapshots and, unless the drive is gone, every
    /// half-built generation.
    fn release(self, drive_gone: bool) {
        for snapshot in &self.snapshots {
            snapshot.release();
        }
        if !drive_gone {
            for layout in &self.layouts {
                if let Err(e) = layout.remove_leftovers() {
                    tracing::warn!("cannot clean up beside {}: {e}", layout.current.display());
                }
            }
        }
    }
}

/// What a job works with.
pub struct Context {
    /// ferry.toml.
    pub config: Arc<Config>,
    /// How borg is run.
    pub borg: Borg,
    /// Where its progress and result go.
    pub reports: Reports,
    /// The newest archives known by transaction (shared with the service).
    pub listings: Arc<Listings>,
}

/// Where a job's reports go: a channel to the service loop, which applies
/// them to the [`crate::domain`] state and emits what follows. A job never
/// reaches into the bus, so it runs, and is tested, without one; sending
/// never waits, and the loop applies the reports in the order sent.
#[derive(Debug, Clone)]
pub struct Reports {
    drive: String,
    to: mpsc::UnboundedSender<(String, Report)>,
}

impl Reports {
    /// Reports of `drive`'s job, sent to `to`.
    pub fn new(drive: &str, to: mpsc::UnboundedSender<(String, Report)>) -> Reports {
        Reports {
            drive: drive.to_string(),
            to,
        }
    }

    /// Sends a report (lost only when the service is gone).
    pub fn send(&self, report: Report) {
        let _ = self.to.send((self.drive.clone(), report));
    }

    /// Copying `repository` begins.
    pub fn started(&self, repository: &str, done: u64, total: u64) {
        self.send(Report::Started {
            repository: repository.to_string(),
            done,
            total,
        });
    }

    /// Bytes copied so far.
    pub fn progress(&self, done: u64, total: u64) {
        self.send(Report::Progress { done, total });
    }

    /// The job entered `phase` on `repository`.
    pub fn phase(&self, repository: &str, phase: Phase, detail: String) {
        self.send(Report::Phase {
            repository: repository.to_string(),
            phase,
            detail,
        });
    }
}

/// Runs the job to its end and reports it.
pub async fn run(spec: JobSpec, context: Arc<Context>, mut stop: Stop) {
    let started = Instant::now();
    let mut held = Held::default();
    let result = sync_drive(&spec, &context, &mut stop, &mut held).await;
    let result = match (result, stop.reason()) {
        // A stop asked for while a stage was failing anyway: say the why.
        (Err(_), Some(reason)) => Err(Failure::stopped(reason)),
        (result, _) => result,
    };
    let drive_gone = matches!(&result, Err(f) if f.stage == Stage::Removed);
    let record = held.truth.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || held.release(drive_gone)).await {
        tracing::error!("cleaning up after the sync of {} failed: {e}", spec.drive);
    }
    // After any failure: look at what the drive holds now, and say it.
    let result = match result {
        Err(mut failure) => {
            let sentence = look_at_drive(&spec, &context, record).await;
            failure.message = format!("{}. {sentence}", failure.message.trim_end_matches('.'));
            Err(failure)
        }
        ok => ok,
    };
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(summary) => {
            tracing::info!(
                "{}: synced {} bytes in {seconds:.1} s",
                spec.drive,
                summary.bytes
            );
            context.reports.send(Report::Finished { summary, seconds });
        }
        Err(failure) => {
            tracing::warn!(
                "{}: sync failed at {}: {}",
                spec.drive,
                failure.stage.as_str(),
                failure.message
            );
            context.reports.send(Report::Failed(failure));
        }
    }
}

/// What the drive holds of each repository of the job, found by looking
/// (on the blocking pool), as the sentence a failure message ends with.
async fn look_at_drive(spec: &JobSpec, context: &Context, record: Arc<truth::Record>) -> String {
    let mountpoint = spec.mountpoint.clone();
    let directory = context.config.sync.directory.clone();
    let names: Vec<String> = spec.repositories.iter().map(|(n, _)| n.clone()).collect();
    let looked = tokio::task::spawn_blocking(move || {
        if !mounts::is_mounted(&mountpoint) {
            return truth::describe(false, &[]);
        }
        // Through a confined handle of the drive's root, as everything on a
        // drive: a link on the way is "cannot be looked at", never followed.
        let root = Confined::open_mount_root(&mountpoint);
        let looks: Vec<(String, truth::Holds)> = names
            .iter()
            .map(|name| {
                let found = root
                    .as_ref()
                    .map_err(|e| io::Error::new(e.kind(), e.to_string()))
                    .and_then(|root| {
                        Ok(root
                            .metadata(&directory.join(name))?
                            .map(|m| (m.dev, m.ino)))
                    });
                (name.clone(), truth::look(found, record.get(name)))
            })
            .collect();
        truth::describe(true, &looks)
    })
    .await;
    looked.unwrap_or_else(|e| {
        format!("What the drive holds could not be looked at (internal error: {e})")
    })
}

/// A generation on the drive that cannot be looked at.
#[derive(Debug, thiserror::Error)]
#[error("cannot look at {} on the drive: {source}", path.display())]
struct Unreadable {
    path: PathBuf,
    source: io::Error,
}

impl Unreadable {
    fn on_drive(path: &std::path::Path, source: io::Error) -> Unreadable {
        Unreadable {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Runs `work` on the blocking pool; an error becomes a failure of
/// `stage`, saying what the error says.
async fn blocking<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    stage: Stage,
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Failure> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(|e| Failure::new(stage, e.to_string())),
        Err(e) => Err(Failure::new(stage, format!("internal error: {e}"))),
    }
}

/// Runs confined drive work on the blocking pool; a layout error becomes a
/// `drive-layout` failure, any other error a failure of `stage`.
async fn on_drive<T: Send + 'static>(
    stage: Stage,
    work: impl FnOnce() -> Result<T, WalkError> + Send + 'static,
) -> Result<T, Failure> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(|e| Failure::on_drive(stage, e)),
        Err(e) => Err(Failure::new(stage, format!("internal error: {e}"))),
    }
}

/// One repository, from snapshot to swap.
struct Prepared {
    name: String,
    repository: Repository,
    layout: Layout,
    plan: Arc<Plan>,
    /// None when the drive already has the committed state.
    snapshot_dir: Option<PathBuf>,
    /// The snapshot's newest archive, being listed beside the copy.
    listing: Option<Listing>,
}

async fn sync_drive(
    spec: &JobSpec,
    context: &Context,
    stop: &mut Stop,
    held: &mut Held,
) -> Result<Summary, Failure> {
    let (copies, layouts) = open_drive(spec, context, held).await?;

    // Before anything is planned: borg's metadata files and a slice of the
    // unchanged files are re-read from the drive, so a damaged file is
    // copied afresh by this very sync, also when there is nothing new.
    let record_path = DriveRecord::path(&context.config.state_directory, &spec.drive);
    let (mut record, scrubbed) = scrub_drive(spec, context, &layouts, &record_path, stop).await?;
    save_record(&record, &record_path).await?;
    let trust = Arc::new(record.clone());

    let prepared = prepare(spec, context, layouts, &trust, stop, held).await?;
    let total = check_space(&copies, &prepared, context.config.sync.reserve_mib)?;

    let previous = &spec.archives;
    let mut summary = Summary {
        read: scrubbed.bytes,
        ..Summary::default()
    };
    let mut done_before = 0;
    for mut item in prepared {
        context.reports.started(&item.name, done_before, total);
        let known = previous.get(&item.name).filter(|a| !a.is_empty());
        let archive = match (item.plan.unchanged, known) {
            (true, Some(archive)) => {
                tracing::info!("{}: {} is unchanged", spec.drive, item.name);
                archive.clone()
            }
            (true, None) => {
                context
                    .reports
                    .phase(&item.name, Phase::Verify, String::new());
                inspect(
                    context,
                    &item.layout,
                    &item.repository,
                    Generation::Current,
                    stop,
                )
                .await?
            }
            (false, _) => {
                let copied = copy_one(
                    context,
                    &mut item,
                    done_before,
                    total,
                    stop,
                    held.truth.clone(),
                )
                .await?;
                done_before += item.plan.copy_bytes;
                summary.read += copied.read;
                let entries: Vec<_> = item.plan.items.iter().map(|(e, _)| e.clone()).collect();
                summary.repaired +=
                    verify::adopt(&mut record, &item.name, &entries, &copied.files, unix_now());
                save_record(&record, &record_path).await?;
                copied.archive
            }
        };
        summary.archives.insert(item.name.clone(), archive);
        // This repository is done: let go of its snapshot now.
        if let Some(dir) = item.snapshot_dir.clone() {
            let _ = blocking(Stage::Copy, move || snapshot::remove_tree(&dir)).await;
        }
    }
    finish_record(spec, record, &record_path, &mut summary).await?;
    summary.bytes = done_before;
    summary.free = copies.free_bytes().unwrap_or(0);
    Ok(summary)
}

/// Forgets what the drive no longer carries, saves the record, and puts
/// its coverage and the repairs into the summary (and the log).
async fn finish_record(
    spec: &JobSpec,
    mut record: DriveRecord,
    path: &std::path::Path,
    summary: &mut Summary,
) -> Result<(), Failure> {
    record
        .repositories
        .retain(|name, _| spec.repositories.iter().any(|(n, _)| n == name));
    save_record(&record, path).await?;
    (summary.verified_since, summary.total) = verify::coverage(&record);
    if summary.repaired > 0 {
        tracing::warn!(
            "{}: repaired {} damaged file{} on the drive with fresh copies",
            spec.drive,
            summary.repaired,
            if summary.repaired == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

/// Proves the drive is mounted, opens ferry's directory on it confined,
/// removes what an interrupted sync left and records which generations
/// are there now (for the failure message).
async fn open_drive(
    spec: &JobSpec,
    context: &Context,
    held: &mut Held,
) -> Result<(Confined, Vec<Layout>), Failure> {
    let settings = &context.config.sync;
    if !mounts::is_mounted(&spec.mountpoint) {
        return Err(Failure::new(
            Stage::Copy,
            format!(
                "nothing is mounted at {}: open the drive first",
                spec.mountpoint.display()
            ),
        ));
    }
    // From here on the drive is reached only through a confined handle of
    // ferry's directory on it, whose whole tree was checked first.
    let (mountpoint, directory) = (spec.mountpoint.clone(), settings.directory.clone());
    let copies = on_drive(Stage::Copy, move || {
        generation::open_copies(&mountpoint, &directory)
    })
    .await?;
    let layouts: Vec<Layout> = spec
        .repositories
        .iter()
        .map(|(name, _)| Layout::new(&copies, name))
        .collect();
    {
        let layouts = layouts.clone();
        on_drive(Stage::Copy, move || {
            layouts.iter().try_for_each(Layout::remove_leftovers)
        })
        .await?;
    }
    held.layouts = layouts.clone();
    let (record, names) = (held.truth.clone(), spec.repositories.clone());
    let looked = layouts.clone();
    blocking(Stage::Copy, move || {
        for ((name, _), layout) in names.iter().zip(&looked) {
            let id = layout
                .identity(Generation::Current)
                .map_err(|e| Unreadable::on_drive(&layout.current, e))?;
            record.previous(name, id);
        }
        Ok::<_, Unreadable>(())
    })
    .await?;
    Ok((copies, layouts))
}

/// Writes the verification record on the blocking pool.
async fn save_record(record: &DriveRecord, path: &std::path::Path) -> Result<(), Failure> {
    let (record, path) = (record.clone(), path.to_path_buf());
    blocking(Stage::Verify, move || record.save(&path)).await
}

/// The scrub of one sync: loads the drive's record, re-reads borg's
/// metadata files and a budgeted slice of the other files of every current
/// generation from the drive, and returns the record with what it found.
async fn scrub_drive(
    spec: &JobSpec,
    context: &Context,
    layouts: &[Layout],
    record_path: &std::path::Path,
    stop: &mut Stop,
) -> Result<(DriveRecord, verify::Scrubbed), Failure> {
    let first = spec
        .repositories
        .first()
        .map(|(n, _)| n.as_str())
        .unwrap_or_default();
    context.reports.phase(first, Phase::Scrub, String::new());
    let budget = verify::Budget::of(&context.config.sync);
    let names: Vec<String> = spec.repositories.iter().map(|(n, _)| n.clone()).collect();
    let (layouts, path) = (layouts.to_vec(), record_path.to_path_buf());
    let progress = Arc::new(AtomicU64::new(0));
    let (counter, stopper) = (progress.clone(), stop.clone());
    let work = tokio::task::spawn_blocking(move || {
        let mut record = DriveRecord::load(&path);
        let mut candidates = Vec::new();
        for (name, layout) in names.iter().zip(&layouts) {
            let files = layout.files(Generation::Current)?;
            candidates.extend(verify::candidates(
                &record,
                name,
                files
                    .iter()
                    .map(|(rel, m)| (rel.as_path(), m.size, m.mtime)),
            ));
        }
        let order = verify::scrub_order(candidates);
        let open = |repository: &str, rel: &std::path::Path| {
            let at = names.iter().position(|n| n == repository);
            match at.and_then(|i| layouts.get(i)) {
                Some(layout) => layout.open_file(Generation::Current, rel),
                None => Err(io::Error::other("not a repository of this drive")),
            }
        };
        let scrubbed = verify::scrub(
            &order,
            &mut record,
            budget,
            unix_now(),
            &open,
            &|| stopper.reason().is_some(),
            &|bytes| counter.store(bytes, Ordering::Relaxed),
        );
        Ok::<_, WalkError>((record, scrubbed))
    });
    let (record, scrubbed) = match with_progress(context, 0, 0, work, &progress).await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => return Err(Failure::on_drive(Stage::Verify, e)),
        Err(e) => return Err(Failure::new(Stage::Verify, format!("internal error: {e}"))),
    };
    let scrubbed = match scrubbed {
        Ok(scrubbed) => scrubbed,
        Err(_) => {
            return Err(Failure::stopped(
                stop.reason().unwrap_or(StopReason::Shutdown),
            ))
        }
    };
    tracing::info!(
        "{}: scrub re-read {} files, {} bytes, in {:.1} s; {} damaged",
        spec.drive,
        scrubbed.files,
        scrubbed.bytes,
        scrubbed.elapsed.as_secs_f64(),
        scrubbed.damaged.len()
    );
    Ok((record, scrubbed))
}

/// Awaits blocking `work`, sending its `progress` (bytes, added to
/// `done_before`, out of `total`; 0 for a total not known) as SyncProgress
/// at most every [`PROGRESS_INTERVAL`].
async fn with_progress<T>(
    context: &Context,
    done_before: u64,
    total: u64,
    work: tokio::task::JoinHandle<T>,
    progress: &AtomicU64,
) -> Result<T, tokio::task::JoinError> {
    tokio::pin!(work);
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The copy phase's own signal already said `done_before`: only what
    // moves from there is news.
    let mut shown = done_before;
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = ticker.tick() => {
                let done = done_before + progress.load(Ordering::Relaxed);
                if done != shown {
                    shown = done;
                    context.reports.progress(done, total);
                }
            }
        }
    }
}

/// Snapshots (borg's lock for an instant each, and not at all for a
/// repository whose committed state the drive already has, intact) and
/// plans: a file is linked forward only when `trust` vouches for it.
async fn prepare(
    spec: &JobSpec,
    context: &Context,
    layouts: Vec<Layout>,
    trust: &Arc<DriveRecord>,
    stop: &mut Stop,
    held: &mut Held,
) -> Result<Vec<Prepared>, Failure> {
    let mut prepared = Vec::new();
    for ((name, repository), layout) in spec.repositories.iter().zip(layouts) {
        if let Some(reason) = stop.reason() {
            return Err(Failure::stopped(reason));
        }
        let (repo, current) = (repository.path.to_path_buf(), layout.clone());
        let (trusted, repo_name) = (trust.clone(), name.clone());
        let unchanged = on_drive(Stage::Snapshot, move || match snapshot::observe(&repo) {
            Ok(entries) => {
                generation::plan(&entries, &current, &|e| trusted.trusted(&repo_name, e)).map(Ok)
            }
            Err(e) => Ok(Err(e)),
        })
        .await?;
        if let Err(e) = &unchanged {
            tracing::debug!(
                "{}: {name} cannot be compared without the lock: {e}",
                spec.drive
            );
        }
        if let Some(plan) = unchanged.ok().filter(|p| p.unchanged) {
            prepared.push(Prepared {
                name: name.clone(),
                repository: repository.clone(),
                layout,
                plan: Arc::new(plan),
                snapshot_dir: None,
                listing: None,
            });
            continue;
        }
        let (plan, snapshot_dir, listing) =
            snapshot_and_plan(spec, context, name, repository, &layout, trust, stop, held).await?;
        tracing::debug!(
            "{}: {name} has {} new, changed or distrusted files",
            spec.drive,
            plan.copy_files
        );
        prepared.push(Prepared {
            name: name.clone(),
            repository: repository.clone(),
            layout,
            plan: Arc::new(plan),
            snapshot_dir: Some(snapshot_dir),
            listing: Some(listing),
        });
    }
    Ok(prepared)
}

/// Takes borg's lock on `repository`, hard-links the snapshot, lets go of
/// the lock, starts listing the snapshot's newest archive (borg's start-up
/// then overlaps the copy; the read-back proves the copy holds the
/// snapshot's bytes, so the name is the copy's) and plans the new
/// generation against the current one.
#[allow(clippy::too_many_arguments)]
async fn snapshot_and_plan(
    spec: &JobSpec,
    context: &Context,
    name: &str,
    repository: &Repository,
    layout: &Layout,
    trust: &Arc<DriveRecord>,
    stop: &mut Stop,
    held: &mut Held,
) -> Result<(Plan, PathBuf, Listing), Failure> {
    let snapshot_dir = snapshot::location(&repository.path, &spec.drive);
    let wait = Duration::from_secs(context.config.sync.lock_wait);
    let reports = &context.reports;
    reports.phase(name, Phase::Lock, String::new());
    let waiting = |holder: String| {
        let detail = if holder.is_empty() {
            "another borg command holds it (borg's lock files do not say which)".to_string()
        } else {
            holder
        };
        reports.phase(name, Phase::LockWait, detail);
        std::future::ready(())
    };
    let lock = context
        .borg
        .lock(&repository.path, wait, stop, waiting)
        .await?;
    reports.phase(name, Phase::Snapshot, String::new());
    let (repo, dir) = (repository.path.to_path_buf(), snapshot_dir.clone());
    let taken = blocking(Stage::Snapshot, move || snapshot::take(&repo, &dir)).await;
    lock.release().await;
    let snapshot = taken?;
    tracing::info!(
        "{}: snapshot of {name} ({} files)",
        spec.drive,
        snapshot.entries.len()
    );
    let entries = snapshot.entries.clone();
    held.snapshots.push(snapshot);
    let transaction = Transaction::of(&entries);
    let known = match &transaction {
        Some(transaction) => context.listings.archive(name, transaction).await,
        None => None,
    };
    let listing = match known {
        Some(archive) => {
            tracing::debug!(
                "{}: {name}'s newest archive is known: {archive}",
                spec.drive
            );
            Listing::Known(archive)
        }
        None => context.borg.list_newest(
            snapshot_dir.clone(),
            repository.clone(),
            transaction,
            stop.clone(),
        ),
    };
    let (plan_layout, trusted, repo_name) = (layout.clone(), trust.clone(), name.to_string());
    let plan = on_drive(Stage::Snapshot, move || {
        generation::plan(&entries, &plan_layout, &|e| trusted.trusted(&repo_name, e))
    })
    .await?;
    Ok((plan, snapshot_dir, listing))
}

/// The drive's free space against what the plans copy, before anything is
/// written; returns the bytes to copy.
fn check_space(copies: &Confined, prepared: &[Prepared], reserve_mib: u64) -> Result<u64, Failure> {
    let total: u64 = prepared.iter().map(|p| p.plan.copy_bytes).sum();
    let blocks: u64 = prepared
        .iter()
        .map(|p| p.plan.copy_files * 4096 + p.plan.items.len() as u64 * 256)
        .sum();
    let need = total + blocks + reserve_mib * MIB;
    let free = copies.free_bytes().map_err(|e| {
        Failure::new(
            Stage::Space,
            format!("cannot tell the drive's free space: {e}"),
        )
    })?;
    if need > free {
        return Err(Failure::new(
            Stage::Space,
            format!(
                "need {} MiB, drive has {} MiB free; use a bigger drive, or remove what else is on it",
                need.div_ceil(MIB),
                free / MIB
            ),
        ));
    }
    Ok(total)
}

const MIB: u64 = 1024 * 1024;

/// What one repository's new generation brought.
struct CopiedRepository {
    /// Its newest archive.
    archive: String,
    /// The files copied, with their hashes.
    files: generation::Copied,
    /// Bytes read back from the drive.
    read: u64,
}

/// Builds, verifies and swaps in one repository's new generation.
async fn copy_one(
    context: &Context,
    item: &mut Prepared,
    done_before: u64,
    total: u64,
    stop: &mut Stop,
    record: Arc<truth::Record>,
) -> Result<CopiedRepository, Failure> {
    context
        .reports
        .phase(&item.name, Phase::Copy, String::new());
    let files = build_new(context, item, done_before, total, stop).await?;
    context
        .reports
        .progress(done_before + item.plan.copy_bytes, total);
    {
        let (name, layout) = (item.name.clone(), item.layout.clone());
        blocking(Stage::Copy, move || {
            let id = layout
                .identity(Generation::New)
                .map_err(|e| Unreadable::on_drive(&layout.new, e))?;
            record.new_generation(&name, id);
            Ok::<_, Unreadable>(())
        })
        .await?;
    }
    context
        .reports
        .phase(&item.name, Phase::Verify, String::new());
    // The listing started with the snapshot and has normally finished
    // during the copy. It is awaited before the read-back, not after, so
    // that the read-back is the last look at the new copy before the swap:
    // nothing the job waits for comes between reading it and putting it in
    // place (a test's borg damages the copy at exactly this point).
    let archive = match item.listing.take() {
        Some(listing) => {
            let (archive, learnt) = listing.archive().await?;
            if let Some(listed) = learnt {
                if context.listings.remember(&item.name, &listed).await {
                    context.reports.send(Report::Listed {
                        repository: item.name.clone(),
                        listed,
                    });
                }
            }
            archive
        }
        None => String::new(),
    };
    let (read, files) = read_back_new(&item.layout, files, stop).await?;
    if let Some(reason) = stop.reason() {
        return Err(Failure::stopped(reason));
    }
    context
        .reports
        .phase(&item.name, Phase::Swap, String::new());
    let layout = item.layout.clone();
    blocking(Stage::Swap, move || {
        generation::swap(&layout).map_err(|e| {
            format!(
                "cannot put the new copy in place at {}: {e}",
                layout.current.display()
            )
        })
    })
    .await?;
    Ok(CopiedRepository {
        archive,
        files,
        read,
    })
}

/// Builds `item`'s new generation on the blocking pool, with progress;
/// returns the files copied and their hashes.
async fn build_new(
    context: &Context,
    item: &Prepared,
    done_before: u64,
    total: u64,
    stop: &Stop,
) -> Result<generation::Copied, Failure> {
    let progress = Arc::new(AtomicU64::new(0));
    let Some(snapshot_dir) = item.snapshot_dir.clone() else {
        return Err(Failure::new(
            Stage::Copy,
            "internal error: no snapshot to copy from".into(),
        ));
    };
    let build = {
        let (plan, layout) = (item.plan.clone(), item.layout.clone());
        let (progress, stop) = (progress.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            generation::build(&plan, &snapshot_dir, &layout, &progress, &|| {
                stop.reason().is_some()
            })
        })
    };
    let built = with_progress(context, done_before, total, build, &progress).await;
    match built {
        Ok(Ok(files)) => Ok(files),
        Ok(Err(BuildError::Stopped)) => Err(Failure::stopped(
            stop.reason().unwrap_or(StopReason::Shutdown),
        )),
        Ok(Err(BuildError::Layout(message))) => {
            Err(Failure::on_drive(Stage::Copy, WalkError::Layout(message)))
        }
        Ok(Err(BuildError::Io(message))) => Err(Failure::new(Stage::Copy, message)),
        Err(e) => Err(Failure::new(Stage::Copy, format!("internal error: {e}"))),
    }
}

/// Reads every file the build copied back from the drive (its pages
/// dropped first: the copy is durable, so they are clean) and compares it
/// with the hash taken while copying. Any difference fails the sync at
/// `verify`: the new generation is not put in place, and the next sync
/// copies those files again. Returns the bytes read, and the files.
async fn read_back_new(
    layout: &Layout,
    files: generation::Copied,
    stop: &Stop,
) -> Result<(u64, generation::Copied), Failure> {
    let (layout, stopper) = (layout.clone(), stop.clone());
    let checked = tokio::task::spawn_blocking(move || {
        let mut buffer = Vec::new();
        let mut read = 0;
        let mut differ = Vec::new();
        for (rel, hashed) in files.iter() {
            let mut file = layout
                .open_file(Generation::New, rel)
                .map_err(verify::ReadError::Io)?;
            match verify::read_back(&mut file, &mut buffer, &|| stopper.reason().is_some()) {
                Ok((found, n)) => {
                    read += n;
                    if found != hashed.digest {
                        differ.push(rel.display().to_string());
                    }
                }
                Err(verify::ReadError::Io(e)) => {
                    differ.push(format!("{} ({e})", rel.display()));
                }
                Err(stopped) => return Err(stopped),
            }
        }
        Ok((read, differ, files))
    })
    .await;
    let (read, differ, files) = match checked {
        Ok(Ok(done)) => done,
        Ok(Err(verify::ReadError::Stopped)) => {
            return Err(Failure::stopped(
                stop.reason().unwrap_or(StopReason::Shutdown),
            ))
        }
        Ok(Err(verify::ReadError::Io(e))) => {
            return Err(Failure::new(
                Stage::Verify,
                format!("cannot read the new copy back from the drive: {e}"),
            ))
        }
        Err(e) => return Err(Failure::new(Stage::Verify, format!("internal error: {e}"))),
    };
    if differ.is_empty() {
        return Ok((read, files));
    }
    let shown: Vec<&str> = differ.iter().take(5).map(String::as_str).collect();
    Err(Failure::new(
        Stage::Verify,
        format!(
            "read back from the drive, {} of the {} files just copied differ from what was written ({}{}): the drive does not keep what is written to it, so the new copy was not put in place and the next sync copies them again; check the drive (dmesg, smartctl -a) and its cable",
            differ.len(),
            files.len(),
            shown.join(", "),
            if differ.len() > shown.len() { ", …" } else { "" }
        ),
    ))
}

/// Runs `borg list` on a generation through hard links in `layout.verify`,
/// so borg never writes to the generation itself (its lock files and
/// config rewrite land in the mirror): the newest archive.
async fn inspect(
    context: &Context,
    layout: &Layout,
    repository: &Repository,
    generation: Generation,
    stop: &mut Stop,
) -> Result<String, Failure> {
    let mirrored = layout.clone();
    on_drive(Stage::Verify, move || {
        generation::mirror_links(&mirrored, generation)
    })
    .await?;
    let result = context
        .borg
        .newest_archive(&layout.verify, repository, stop)
        .await;
    let mirrored = layout.clone();
    on_drive(Stage::Verify, move || generation::remove_mirror(&mirrored)).await?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job of drive `a` (mounted, by ferry.toml, at `mountpoint`) and
    /// the receiving end of its reports: no bus anywhere.
    fn job(
        mountpoint: &std::path::Path,
    ) -> (
        JobSpec,
        Arc<Context>,
        mpsc::UnboundedReceiver<(String, Report)>,
    ) {
        let text = format!(
            "[drives.a]\nuuid = \"1b2c\"\nmountpoint = \"{}\"\nrepositories = [\"nas\"]\n\n[repositories.nas]\npath = \"/srv/borg/nas\"\n",
            mountpoint.display()
        );
        let config = Config::parse(&text, std::path::Path::new("ferry.toml")).expect("config");
        let spec = JobSpec::of(&config, "a").expect("drive a");
        let (to, reports) = mpsc::unbounded_channel();
        let context = Context {
            borg: Borg::new(&config.borg),
            config: Arc::new(config),
            reports: Reports::new("a", to),
            listings: Arc::default(),
        };
        (spec, Arc::new(context), reports)
    }

    fn sent(reports: &mut mpsc::UnboundedReceiver<(String, Report)>) -> Vec<Report> {
        let mut all = Vec::new();
        while let Ok((drive, report)) = reports.try_recv() {
            assert_eq!(drive, "a");
            all.push(report);
        }
        all
    }

    #[tokio::test]
    async fn a_drive_that_is_not_mounted_fails_and_says_so() {
        let dir = tempfile::tempdir().expect("dir");
        let (spec, context, mut reports) = job(&dir.path().join("mnt"));
        let (_stop_tx, stop) = Stop::new();
        run(spec, context, stop).await;
        let all = sent(&mut reports);
        assert_eq!(all.len(), 1, "{all:?}");
        let Report::Failed(failure) = &all[0] else {
            panic!("not a failure: {all:?}");
        };
        assert_eq!(failure.stage, Stage::Copy);
        assert!(
            failure.message.contains("nothing is mounted at")
                && failure.message.contains("open the drive first"),
            "{}",
            failure.message
        );
    }

    #[tokio::test]
    async fn a_stop_asked_for_says_why_the_job_stopped() {
        let dir = tempfile::tempdir().expect("dir");
        let (spec, context, mut reports) = job(dir.path());
        let (stop_tx, stop) = Stop::new();
        stop_tx.send_replace(Some(StopReason::Removed));
        run(spec, context, stop).await;
        let all = sent(&mut reports);
        let Some(Report::Failed(failure)) = all.last() else {
            panic!("no failure: {all:?}");
        };
        assert_eq!(failure.stage, Stage::Removed);
        assert!(
            failure.message.contains("plug it in again"),
            "{}",
            failure.message
        );
    }
}
