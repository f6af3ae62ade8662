//! ferry-sync against real borg repositories, a real ext4 drive on a loop
//! device, the real binary on a private bus: the copy on the drive is a
//! complete repository at every instant (kill -9 and `xfs_io shutdown` at
//! seeded random points), borg's lock is held only for an instant, a
//! running backup is not disturbed, a full drive, removal, Cancel, two
//! drives in turn, and the contract. DriveOpened and DriveDetached are
//! emitted by the test exactly as ferry-crypt and the drive watcher emit
//! them.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use ferry_integration_tests::introspection::assert_matches_contract;
use ferry_integration_tests::{
    random_uuid, require_command, run, LoopImage, ServiceProcess, SignalRecorder, TestBus,
};
use ferry_interfaces::sync::{self, SyncProxy};
use ferry_interfaces::{borg, crypt, drive_watcher};

/// The passphrase of the test's repokey repository.
const PASSPHRASE: &str = "correct horse battery staple";
/// A sync of the test repositories takes a few seconds at most.
const SYNC_WAIT: Duration = Duration::from_secs(60);

// ---- borg ------------------------------------------------------------------

/// Runs borg with its own BORG_BASE_DIR under `base`.
fn borg_output(base: &Path, passphrase: Option<&str>, args: &[&OsStr]) -> Output {
    let mut command = Command::new("borg");
    command
        .args(args)
        .env("BORG_BASE_DIR", base)
        .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
        .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
        .env_remove("BORG_PASSCOMMAND")
        .stdin(std::process::Stdio::null());
    match passphrase {
        Some(p) => command.env("BORG_PASSPHRASE", p),
        None => command.env("BORG_PASSPHRASE", ""),
    };
    command.output().expect("run borg")
}

fn borg(base: &Path, passphrase: Option<&str>, args: &[&OsStr]) -> String {
    let out = borg_output(base, passphrase, args);
    assert!(
        out.status.success(),
        "borg {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// A repository with small segments (so there are hundreds, their names
/// crossing 99 → 100 and several data/ directories).
fn new_repo(base: &Path, path: &Path, passphrase: Option<&str>) {
    let encryption = if passphrase.is_some() {
        "repokey"
    } else {
        "none"
    };
    borg(
        base,
        passphrase,
        &[os("init"), os("-e"), os(encryption), path.as_os_str()],
    );
    for (key, value) in [("max_segment_size", "2000"), ("segments_per_dir", "40")] {
        borg(
            base,
            passphrase,
            &[os("config"), path.as_os_str(), os(key), os(value)],
        );
    }
}

/// Deterministic pseudo-random bytes.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len.div_ceil(8))
            .flat_map(|_| self.next().to_le_bytes())
            .take(len)
            .collect()
    }
}

/// Adds archive `name` of `files` fresh files of `size` bytes each.
fn add_archive(
    base: &Path,
    repo: &Path,
    passphrase: Option<&str>,
    name: &str,
    files: usize,
    size: usize,
) {
    let source = base.join("sources").join(name);
    std::fs::create_dir_all(&source).expect("source dir");
    let mut rng = Rng(name.bytes().fold(0x9e3779b97f4a7c15, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    }));
    for i in 0..files {
        std::fs::write(source.join(format!("f{i}")), rng.bytes(size)).expect("write source");
    }
    let target = format!("{}::{name}", repo.display());
    borg(
        base,
        passphrase,
        &[os("create"), os(&target), source.as_os_str()],
    );
}

fn archives(base: &Path, repo: &Path, passphrase: Option<&str>) -> Vec<String> {
    borg(
        base,
        passphrase,
        &[os("list"), os("--short"), repo.as_os_str()],
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// Judges a copy the way a person restoring would, without changing it:
/// `borg check` (repository and archives) and the archive list, through a
/// hard-link mirror so borg's lock and config writes land elsewhere, with
/// a throwaway BORG_BASE_DIR (borg's records of the source must not meet
/// an older copy with the same repository id).
fn judge_copy(copy: &Path, passphrase: Option<&str>) -> Vec<String> {
    let base = tempfile::tempdir().expect("throwaway BORG_BASE_DIR");
    let base = base.path();
    let mirror = copy.with_file_name(".judge");
    let _ = std::fs::remove_dir_all(&mirror);
    run("cp", &[os("-al"), copy.as_os_str(), mirror.as_os_str()]);
    let out = borg_output(base, passphrase, &[os("check"), mirror.as_os_str()]);
    let listed = archives(base, &mirror, passphrase);
    std::fs::remove_dir_all(&mirror).expect("remove judge mirror");
    assert!(
        out.status.success(),
        "borg check of the copy {} failed:\n{}",
        copy.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    listed
}

/// Every file of a repository tree, relative, leaving out borg's lock files.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read tree").flatten() {
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            if name.starts_with("lock.") {
                continue;
            }
            if entry.file_type().expect("type").is_dir() {
                walk(&entry.path(), &format!("{name}/"), out);
            } else {
                out.push(name);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out);
    out.sort();
    out
}

fn borg_ready() -> bool {
    udev_and_loop()
        && require_command("borg", "borgbackup")
        && require_command("mount", "mount")
        && require_command("xfs_io", "xfsprogs")
}

// ---- the rig ---------------------------------------------------------------

/// A drive: an ext4 image on a loop device, mounted at `mountpoint`.
struct Drive {
    name: String,
    uuid: String,
    mountpoint: PathBuf,
    image: LoopImage,
}

impl Drive {
    fn new(dir: &Path, name: &str, size_mib: u64) -> Drive {
        let uuid = random_uuid();
        let mut image = LoopImage::ext4(dir, size_mib, &uuid, name);
        image.attach();
        let mountpoint = dir.join(format!("mnt-{name}"));
        std::fs::create_dir_all(&mountpoint).expect("mountpoint");
        let drive = Drive {
            name: name.to_string(),
            uuid,
            mountpoint,
            image,
        };
        drive.mount();
        drive
    }

    fn mount(&self) {
        let device = self.image.device().expect("attached");
        run("mount", &[os(device), self.mountpoint.as_os_str()]);
    }

    fn unmount(&self) {
        run("umount", &[self.mountpoint.as_os_str()]);
    }

    /// The copy of repository `repo` on this drive.
    fn copy(&self, repo: &str) -> PathBuf {
        self.mountpoint.join("ferry").join(repo)
    }
}

/// A private bus, repositories, drives, the config and ferry-sync. Fields
/// drop in order: the service first, then the mounts.
struct Rig {
    service: Option<ServiceProcess>,
    drives: Vec<Drive>,
    signals: SignalRecorder,
    conn: zbus::Connection,
    config: PathBuf,
    base: PathBuf,
    bus: TestBus,
}

/// A repository in the rig: name, path, passphrase.
struct Repo {
    name: &'static str,
    passphrase: Option<&'static str>,
}

const NAS: Repo = Repo {
    name: "nas",
    passphrase: None,
};
const PHOTOS: Repo = Repo {
    name: "photos",
    passphrase: Some(PASSPHRASE),
};

impl Rig {
    /// Drives of `size_mib` each, named `drives`, all carrying `repos`.
    async fn new(drives: &[(&str, u64)], repos: &[&Repo], extra: &str) -> Rig {
        let bus = TestBus::start();
        let dir = bus.dir().to_path_buf();
        let base = dir.join("borg-base");
        std::fs::create_dir_all(dir.join("src")).expect("src");
        let mut text = format!(
            "state-directory = \"{}\"\n\n[sync]\nlock-wait = 30\nreserve-mib = 1\n{extra}\n",
            dir.join("state").display()
        );
        let names: Vec<String> = repos.iter().map(|r| format!("\"{}\"", r.name)).collect();
        let drives: Vec<Drive> = drives
            .iter()
            .map(|(name, size)| Drive::new(&dir, name, *size))
            .collect();
        for drive in &drives {
            text.push_str(&format!(
                "[drives.{}]\nuuid = \"{}\"\nmountpoint = \"{}\"\nrepositories = [{}]\n\n",
                drive.name,
                drive.uuid,
                drive.mountpoint.display(),
                names.join(", ")
            ));
        }
        for repo in repos {
            let path = dir.join("src").join(repo.name);
            new_repo(&base, &path, repo.passphrase);
            text.push_str(&format!(
                "[repositories.{}]\npath = \"{}\"\n",
                repo.name,
                path.display()
            ));
            if let Some(passphrase) = repo.passphrase {
                let file = dir.join(format!("{}.passphrase", repo.name));
                std::fs::write(&file, format!("{passphrase}\n")).expect("passphrase file");
                // A secret: others may not read it (ferry-sync refuses it).
                std::fs::set_permissions(
                    &file,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .expect("chmod passphrase file");
                text.push_str(&format!("passphrase-file = \"{}\"\n", file.display()));
            }
            text.push('\n');
        }
        let config = write_config(&dir, &text);
        let conn = bus.connect().await;
        let signals = SignalRecorder::new(&conn).await;
        let mut rig = Rig {
            service: None,
            drives,
            signals,
            conn,
            config,
            base,
            bus,
        };
        rig.start_service().await;
        rig
    }

    async fn start_service(&mut self) {
        let config = self.config.to_string_lossy().into_owned();
        let service = self.bus.spawn("ferry-sync", &["--config", &config], &[]);
        service
            .wait_for_name(&self.conn, sync::BUS_NAME, WAIT)
            .await;
        self.service = Some(service);
    }

    fn kill_service(&mut self) {
        if let Some(service) = self.service.take() {
            service.signal(libc::SIGKILL);
            let deadline = Instant::now() + WAIT;
            while service.try_exit_status().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn repo(&self, name: &str) -> PathBuf {
        self.bus.dir().join("src").join(name)
    }

    fn drive(&self, name: &str) -> &Drive {
        self.drives
            .iter()
            .find(|d| d.name == name)
            .expect("drive in rig")
    }

    async fn proxy(&self) -> SyncProxy<'static> {
        uncached(&self.conn).await
    }

    async fn emit(&self, path: &str, interface: &str, member: &str, args: &(&str, &str)) {
        self.conn
            .emit_signal(None::<()>, path, interface, member, args)
            .await
            .expect("emit signal");
    }

    /// What ferry-crypt emits when it has opened a drive.
    async fn drive_opened(&self, drive: &str) {
        let mountpoint = self.drive(drive).mountpoint.to_string_lossy().into_owned();
        self.emit(
            crypt::OBJECT_PATH,
            crypt::INTERFACE,
            "DriveOpened",
            &(drive, &mountpoint),
        )
        .await;
    }

    /// The first SyncFinished or SyncFailed for `drive` from record `from`.
    async fn result(&self, from: usize, drive: &str) -> ferry_integration_tests::Recorded {
        let deadline = Instant::now() + SYNC_WAIT;
        loop {
            let found = self.signals.all().into_iter().skip(from).find(|r| {
                (r.member == "SyncFinished" || r.member == "SyncFailed") && r.args[0] == drive
            });
            if let Some(found) = found {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no sync result for {drive} within {SYNC_WAIT:?}:\n{}",
                self.signals.listing()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Syncs `drive` (DriveOpened) and expects success; returns SyncFinished.
    async fn sync(&self, drive: &str) -> ferry_integration_tests::Recorded {
        let from = self.signals.len();
        self.drive_opened(drive).await;
        let result = self.result(from, drive).await;
        assert_eq!(
            result.member,
            "SyncFinished",
            "{result}\n{}",
            self.signals.listing()
        );
        result
    }

    fn add_archive(&self, repo: &Repo, archive: &str, files: usize, size: usize) {
        add_archive(
            &self.base,
            &self.repo(repo.name),
            repo.passphrase,
            archive,
            files,
            size,
        );
    }

    fn source_archives(&self, repo: &Repo) -> Vec<String> {
        archives(&self.base, &self.repo(repo.name), repo.passphrase)
    }

    fn copy_archives(&self, drive: &str, repo: &Repo) -> Vec<String> {
        judge_copy(&self.drive(drive).copy(repo.name), repo.passphrase)
    }

    /// Snapshot directories left beside the repositories.
    fn snapshots_left(&self) -> Vec<String> {
        std::fs::read_dir(self.bus.dir().join("src"))
            .expect("src")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("ferry-snapshot"))
            .collect()
    }
}

fn error_name(result: zbus::Result<()>) -> String {
    match result {
        Err(zbus::Error::MethodError(name, message, _)) => {
            assert!(
                message.as_deref().is_some_and(|m| !m.is_empty()),
                "{name} without a message"
            );
            name.to_string()
        }
        other => panic!("expected a D-Bus error, got {other:?}"),
    }
}

// ---- tests -----------------------------------------------------------------

/// DriveOpened → a verified copy of a plain and a repokey repository whose
/// segment names cross 99 → 100; the contract; progress rate-limited; the
/// ledger persisted across a restart; a second sync with nothing to do
/// copies nothing; a new archive copies only what is new.
async fn drive_opened_makes_a_verified_copy_and_the_ledger_survives_a_restart() {
    if !borg_ready() {
        return;
    }
    let mut rig = Rig::new(&[("offsite-a", 256)], &[&NAS, &PHOTOS], "").await;
    assert_matches_contract(&rig.conn, sync::INTERFACE).await;
    for i in 1..=3 {
        rig.add_archive(&NAS, &format!("nas-{i}"), 60, 3000);
    }
    rig.add_archive(&PHOTOS, "photos-1", 20, 3000);
    let segments = std::fs::read_dir(rig.repo("nas").join("data/2"))
        .expect("data/2: over 80 segments")
        .count();
    assert!(segments > 0);
    assert!(
        rig.repo("nas").join("data/2/100").exists() || rig.repo("nas").join("data/2/99").exists()
    );

    let finished = rig.sync("offsite-a").await;
    let bytes: u64 = finished.args[1].parse().expect("bytes");
    assert!(bytes > 100_000, "{finished}");
    let drive = rig.drive("offsite-a");
    assert_eq!(
        rig.copy_archives("offsite-a", &NAS),
        rig.source_archives(&NAS)
    );
    assert_eq!(
        rig.copy_archives("offsite-a", &PHOTOS),
        rig.source_archives(&PHOTOS)
    );
    // The copy is the committed state, file for file, and carries no locks.
    assert_eq!(tree(&drive.copy("nas")), tree(&rig.repo("nas")));
    let on_drive: Vec<String> = std::fs::read_dir(drive.mountpoint.join("ferry"))
        .expect("ferry dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut on_drive = on_drive;
    on_drive.sort();
    assert_eq!(on_drive, ["nas", "photos"]);
    assert!(
        rig.snapshots_left().is_empty(),
        "{:?}",
        rig.snapshots_left()
    );

    // Signals: started per repository, progress at most ~4 a second.
    let started = rig
        .signals
        .count("SyncStarted", |s| s.args[0] == "offsite-a");
    assert_eq!(started, 2, "{}", rig.signals.listing());
    let progress: Vec<_> = rig
        .signals
        .all()
        .into_iter()
        .filter(|s| s.member == "SyncProgress")
        .collect();
    if let (Some(first), Some(last)) = (progress.first(), progress.last()) {
        let span = last.at.duration_since(first.at).as_secs_f64();
        // Each phase a repository enters is announced once (prepare, lock,
        // snapshot, copy, verify, swap …); byte counts are rate-limited.
        let phase_changes = progress
            .iter()
            .zip(progress.iter().skip(1))
            .filter(|(a, b)| a.args.get(3) != b.args.get(3))
            .count()
            + 1;
        assert!(
            progress.len() as f64 <= 4.0 * span + 3.0 + phase_changes as f64,
            "{} SyncProgress in {span:.2} s with {phase_changes} phase changes",
            progress.len()
        );
        assert_eq!(last.args[1], last.args[2], "progress ends at the total");
    }

    let proxy = rig.proxy().await;
    assert!(proxy.running().await.expect("Running").is_empty());
    let ledger = proxy.last_syncs().await.expect("LastSyncs");
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].drive, "offsite-a");
    assert_eq!(ledger[0].archive, "nas::nas-3, photos::photos-1");
    assert_eq!(ledger[0].bytes, bytes);
    assert!(ledger[0].free > 0);

    // Restart: the ledger is still there.
    rig.service = None;
    rig.start_service().await;
    let proxy = rig.proxy().await;
    assert_eq!(proxy.last_syncs().await.expect("LastSyncs"), ledger);

    // Nothing to do: nothing copied, and borg's lock not even taken.
    let finished = rig.sync("offsite-a").await;
    assert_eq!(finished.args[1], "0", "{finished}");
    let log = rig.service.as_ref().expect("running").log();
    assert!(
        log.contains("nas is unchanged") && !log.contains("snapshot of nas"),
        "{log}"
    );

    // One new archive: only its segments and the new index are copied.
    rig.add_archive(&NAS, "nas-4", 10, 3000);
    let finished = rig.sync("offsite-a").await;
    let incremental: u64 = finished.args[1].parse().expect("bytes");
    assert!(
        incremental > 0 && incremental < bytes / 2,
        "{incremental} of {bytes}"
    );
    assert_eq!(
        rig.copy_archives("offsite-a", &NAS),
        rig.source_archives(&NAS)
    );
    let ledger = rig.proxy().await.last_syncs().await.expect("LastSyncs");
    assert_eq!(ledger[0].archive, "nas::nas-4, photos::photos-1");
}

/// Start, Cancel and their errors; Busy while a sync waits for borg's lock
/// (held by `borg with-lock`, as a long backup would); Cancel leaves the
/// previous copy.
async fn start_and_cancel_by_hand() {
    if !borg_ready() {
        return;
    }
    let rig = Rig::new(&[("offsite-a", 64)], &[&NAS], "").await;
    rig.add_archive(&NAS, "nas-1", 20, 3000);
    let proxy = rig.proxy().await;
    assert_eq!(
        error_name(proxy.start("nope").await),
        "org.ferry.Error.UnknownDrive"
    );
    assert_eq!(
        error_name(proxy.cancel("offsite-a").await),
        "org.ferry.Error.NotRunning"
    );
    rig.drive("offsite-a").unmount();
    assert_eq!(
        error_name(proxy.start("offsite-a").await),
        "org.ferry.Error.NotOpen"
    );
    rig.drive("offsite-a").mount();

    let from = rig.signals.len();
    proxy.start("offsite-a").await.expect("Start");
    let finished = rig.result(from, "offsite-a").await;
    assert_eq!(finished.member, "SyncFinished", "{finished}");

    // A backup holds borg's lock: the sync waits; Start again is Busy;
    // Cancel ends it with the previous copy in place.
    rig.add_archive(&NAS, "nas-2", 5, 3000);
    let repo = rig.repo("nas");
    let base = rig.base.clone();
    let ready = rig.base.join("lock-held");
    let script = format!("touch '{}'; sleep 6", ready.display());
    let holder = std::thread::spawn(move || {
        borg_output(
            &base,
            None,
            &[
                os("with-lock"),
                repo.as_os_str(),
                os("sh"),
                os("-c"),
                os(&script),
            ],
        )
    });
    // borg runs the command only once it holds the lock.
    wait_for_file(&ready).await;
    let from = rig.signals.len();
    proxy.start("offsite-a").await.expect("Start");
    assert_eq!(
        error_name(proxy.start("offsite-a").await),
        "org.ferry.Error.Busy"
    );
    let running = proxy.running().await.expect("Running");
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].drive, "offsite-a");
    let asked = Instant::now();
    proxy.cancel("offsite-a").await.expect("Cancel");
    let failed = rig.result(from, "offsite-a").await;
    assert_eq!(failed.member, "SyncFailed");
    assert_eq!(failed.args[1], "cancelled", "{failed}");
    assert!(asked.elapsed() < Duration::from_secs(5));
    assert_eq!(rig.copy_archives("offsite-a", &NAS), ["nas-1"]);
    let failures = proxy.last_failures().await.expect("LastFailures");
    assert_eq!(failures[0].stage, "cancelled");
    assert!(holder.join().expect("holder").status.success());
    assert!(rig.snapshots_left().is_empty());
}

/// Waits (up to WAIT) until `path` exists.
async fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + WAIT;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The live children of `pid` (a zombie counts as dead), as
/// (pid, command line).
fn live_children(pid: u32) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|child| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
            let mut fields = stat.rsplit_once(") ")?.1.split(' ');
            let state = fields.next()?;
            let ppid: u32 = fields.next()?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (ppid == pid && state != "Z").then_some((child, cmdline))
        })
        .collect()
}

/// ferry-sync SIGKILLed while a borg of its own runs: it waits (natively,
/// no child) for borg's lock held by `borg with-lock`, as behind a long
/// backup, then starts `borg list` of its snapshot; killed then, that borg
/// dies with it at once instead of outliving it, nothing of the killed
/// sync is left (its lock, if it held it, is stale to the next one), and
/// the next sync completes.
async fn a_killed_ferry_sync_takes_its_children_with_it() {
    if !borg_ready() {
        return;
    }
    let mut rig = Rig::new(&[("offsite-a", 64)], &[&NAS], "").await;
    rig.add_archive(&NAS, "nas-1", 5, 3000);
    let repo = rig.repo("nas");
    let base = rig.base.clone();
    let ready = rig.base.join("lock-held");
    let script = format!("touch '{}'; sleep 8", ready.display());
    let holder = std::thread::spawn(move || {
        borg_output(
            &base,
            None,
            &[
                os("with-lock"),
                repo.as_os_str(),
                os("sh"),
                os("-c"),
                os(&script),
            ],
        )
    });
    // borg runs the command only once it holds the lock.
    wait_for_file(&ready).await;
    let pid = rig.service.as_ref().expect("ferry-sync runs").pid();
    rig.proxy().await.start("offsite-a").await.expect("Start");
    let deadline = Instant::now() + WAIT;
    let children = loop {
        let children = live_children(pid);
        if !children.is_empty() {
            break children;
        }
        assert!(Instant::now() < deadline, "ferry-sync started no child");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    rig.kill_service();
    let killed = Instant::now();
    let alive = |children: &[(u32, String)]| -> Vec<String> {
        children
            .iter()
            .filter(|(child, _)| {
                std::fs::read_to_string(format!("/proc/{child}/stat"))
                    .ok()
                    .and_then(|stat| Some(stat.rsplit_once(") ")?.1.starts_with('Z')))
                    == Some(false)
            })
            .map(|(_, line)| line.clone())
            .collect()
    };
    while !alive(&children).is_empty() && killed.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        alive(&children).is_empty(),
        "still running 2 s after ferry-sync was killed: {:?}",
        alive(&children)
    );
    assert!(holder.join().expect("holder").status.success());
    rig.start_service().await;
    rig.sync("offsite-a").await;
    assert_eq!(rig.copy_archives("offsite-a", &NAS), ["nas-1"]);
    assert!(rig.snapshots_left().is_empty());
}

/// The drive is too small: SyncFailed(space) with the numbers, and the
/// copy on it is untouched.
async fn a_full_drive_fails_at_space_and_keeps_the_copy() {
    if !borg_ready() {
        return;
    }
    let rig = Rig::new(&[("offsite-a", 32)], &[&NAS], "").await;
    rig.add_archive(&NAS, "nas-1", 10, 3000);
    rig.sync("offsite-a").await;
    rig.add_archive(&NAS, "big", 2, 20 << 20);
    let from = rig.signals.len();
    rig.drive_opened("offsite-a").await;
    let failed = rig.result(from, "offsite-a").await;
    assert_eq!(failed.member, "SyncFailed", "{failed}");
    assert_eq!(failed.args[1], "space");
    assert!(
        failed.args[2].starts_with("need ") && failed.args[2].contains("MiB, drive has "),
        "{failed}"
    );
    assert_eq!(rig.copy_archives("offsite-a", &NAS), ["nas-1"]);
    let left: Vec<String> = std::fs::read_dir(rig.drive("offsite-a").mountpoint.join("ferry"))
        .expect("ferry dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["nas"]);
}

/// A borg create against the repository during a sync succeeds (with
/// borg's default one-second lock wait), whether it starts while the sync
/// copies or the sync starts while it runs.
async fn a_backup_during_the_sync_is_not_disturbed() {
    if !borg_ready() {
        return;
    }
    let rig = Rig::new(&[("offsite-a", 128)], &[&NAS], "").await;
    rig.add_archive(&NAS, "nas-1", 150, 3000);

    // The backup starts as soon as the sync has its snapshot.
    let from = rig.signals.len();
    rig.drive_opened("offsite-a").await;
    rig.signals
        .wait_for_from(from, "SyncStarted", |s| s.args[0] == "offsite-a", SYNC_WAIT)
        .await;
    rig.add_archive(&NAS, "during-copy", 50, 3000);
    let result = rig.result(from, "offsite-a").await;
    assert_eq!(result.member, "SyncFinished", "{result}");
    let copied = rig.copy_archives("offsite-a", &NAS);
    assert!(
        copied == ["nas-1"] || copied == ["nas-1", "during-copy"],
        "{copied:?}"
    );

    // The sync starts while a backup runs: it waits for the backup.
    let (base, repo) = (rig.base.clone(), rig.repo("nas"));
    let backup = std::thread::spawn(move || {
        add_archive(&base, &repo, None, "long-backup", 400, 3000);
    });
    // borg create holds the lock for its whole run.
    let lock = rig.repo("nas").join("lock.exclusive");
    let deadline = Instant::now() + WAIT;
    while !lock.exists() && !backup.is_finished() {
        assert!(Instant::now() < deadline, "borg create never took its lock");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let from = rig.signals.len();
    rig.drive_opened("offsite-a").await;
    backup.join().expect("the backup succeeded");
    let result = rig.result(from, "offsite-a").await;
    assert_eq!(result.member, "SyncFinished", "{result}");
    assert_eq!(
        rig.copy_archives("offsite-a", &NAS),
        rig.source_archives(&NAS)
    );
}

/// The lesson the snapshot rests on, against the installed borg: after
/// create, prune, compact, config and check, every file in a hard-link
/// snapshot taken before holds exactly the bytes it held then. Fails if
/// borg ever rewrites a committed file in place.
async fn borg_never_rewrites_a_committed_file() {
    if !(require_command("borg", "borgbackup") && require_command("cp", "coreutils")) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let base = dir.path().join("base");
    let repo = dir.path().join("repo");
    new_repo(&base, &repo, None);
    for i in 1..=4 {
        add_archive(&base, &repo, None, &format!("a{i}"), 40, 3000);
    }
    let snapshot = dir.path().join("snapshot");
    let reference = dir.path().join("reference");
    let script = format!(
        "cp -al {0} {1} && cp -a {0} {2}",
        repo.display(),
        snapshot.display(),
        reference.display()
    );
    borg(
        &base,
        None,
        &[
            os("with-lock"),
            repo.as_os_str(),
            os("sh"),
            os("-c"),
            os(&script),
        ],
    );
    add_archive(&base, &repo, None, "a5", 40, 3000);
    borg(
        &base,
        None,
        &[os("delete"), os(&format!("{}::a1", repo.display()))],
    );
    // Deleted by name: borg's --keep-last is --keep-secondly, so a prune
    // keeps a3 instead of a4 when a4 and a5 were made within one second.
    for name in ["a2", "a3"] {
        borg(
            &base,
            None,
            &[os("delete"), os(&format!("{}::{name}", repo.display()))],
        );
    }
    borg(
        &base,
        None,
        &[os("compact"), os("--threshold"), os("0"), repo.as_os_str()],
    );
    borg(
        &base,
        None,
        &[
            os("config"),
            repo.as_os_str(),
            os("additional_free_space"),
            os("0"),
        ],
    );
    borg(&base, None, &[os("check"), repo.as_os_str()]);
    assert_eq!(archives(&base, &repo, None), ["a4", "a5"]);
    let files = tree(&snapshot);
    assert!(files.len() > 100, "{}", files.len());
    for file in &files {
        let now = std::fs::read(snapshot.join(file)).expect("snapshot file");
        let then = std::fs::read(reference.join(file)).expect("reference file");
        assert!(
            now == then,
            "borg rewrote the committed file {file} in place"
        );
    }
    // And compact really replaced files (else the guard proves nothing).
    assert_ne!(tree(&repo), files);
}

/// Two drives synced in turn; the ledger tells them apart; one of them
/// removed in the middle of a sync ends the job within seconds with
/// SyncFailed(removed), with the snapshot gone and nothing held open on
/// the drive (it unmounts at once).
async fn two_drives_in_turn_and_one_removed_mid_sync() {
    if !borg_ready() {
        return;
    }
    let rig = Rig::new(&[("offsite-a", 64), ("offsite-b", 64)], &[&NAS], "").await;
    rig.add_archive(&NAS, "nas-1", 40, 3000);
    rig.sync("offsite-a").await;
    rig.add_archive(&NAS, "nas-2", 40, 3000);
    rig.sync("offsite-b").await;
    assert_eq!(rig.copy_archives("offsite-a", &NAS), ["nas-1"]);
    assert_eq!(rig.copy_archives("offsite-b", &NAS), ["nas-1", "nas-2"]);
    let ledger = rig.proxy().await.last_syncs().await.expect("LastSyncs");
    let of = |d: &str| {
        ledger
            .iter()
            .find(|r| r.drive == d)
            .expect("record")
            .clone()
    };
    assert_eq!(of("offsite-a").archive, "nas::nas-1");
    assert_eq!(of("offsite-b").archive, "nas::nas-2");
    assert!(of("offsite-a").time <= of("offsite-b").time);

    // Removed while copying or verifying.
    rig.add_archive(&NAS, "nas-3", 200, 3000);
    let from = rig.signals.len();
    rig.drive_opened("offsite-a").await;
    rig.signals
        .wait_for_from(from, "SyncStarted", |s| s.args[0] == "offsite-a", SYNC_WAIT)
        .await;
    let removed_at = Instant::now();
    let uuid = rig.drive("offsite-a").uuid.clone();
    rig.emit(
        drive_watcher::OBJECT_PATH,
        drive_watcher::INTERFACE,
        "DriveDetached",
        &("offsite-a", &uuid),
    )
    .await;
    let failed = rig.result(from, "offsite-a").await;
    assert_eq!(failed.member, "SyncFailed", "{failed}");
    assert_eq!(failed.args[1], "removed", "{failed}");
    assert!(removed_at.elapsed() < Duration::from_secs(5));
    assert!(
        rig.snapshots_left().is_empty(),
        "{:?}",
        rig.snapshots_left()
    );
    rig.drive("offsite-a").unmount();
    rig.drive("offsite-a").mount();
    assert_eq!(rig.copy_archives("offsite-a", &NAS), ["nas-1"]);
    // Plugged in again: the leftovers go and the sync completes.
    rig.sync("offsite-a").await;
    assert_eq!(
        rig.copy_archives("offsite-a", &NAS),
        rig.source_archives(&NAS)
    );
    let names: Vec<String> = std::fs::read_dir(rig.drive("offsite-a").mountpoint.join("ferry"))
        .expect("ferry dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["nas"]);
}

/// ferry-sync killed (SIGKILL) or the drive cut off (`xfs_io -x -c
/// shutdown`, like a yank or a power cut: only what was made durable
/// survives) at seeded random points of a sync. Every time the copy passes
/// `borg check` and lists exactly the archives before or after; ferry-sync
/// restarted cleans up and the next sync completes.
async fn killed_or_yanked_at_random_points_the_copy_is_old_or_new() {
    if !borg_ready() {
        return;
    }
    const POINTS: usize = 20;
    let seed = std::env::var("FERRY_SYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f0e7_u64);
    eprintln!("seed {seed:#x} (set FERRY_SYNC_SEED to replay)");
    let mut rng = Rng(seed);
    let mut rig = Rig::new(&[("offsite-a", 128)], &[&NAS], "").await;
    rig.add_archive(&NAS, "a0", 30, 3000);
    let started = Instant::now();
    rig.sync("offsite-a").await;
    // Random points spread over a whole sync.
    let span_ms = (started.elapsed().as_millis() as u64 * 3 / 2).max(500);
    let mut hits = std::collections::BTreeMap::<String, usize>::new();
    let mut before = rig.source_archives(&NAS);
    let mut after = before.clone();
    for point in 0..POINTS {
        // A new archive whenever the copy has caught up with the source.
        if before == after {
            rig.add_archive(&NAS, &format!("a{}", point + 1), 8, 3000 + point * 7);
            after = rig.source_archives(&NAS);
        }
        let delay = Duration::from_millis(rng.below(span_ms));
        let yank = point % 2 == 1;
        let from = rig.signals.len();
        rig.drive_opened("offsite-a").await;
        tokio::time::sleep(delay).await;
        let copy_path = rig.drive("offsite-a").copy("nas");
        let mut said = None;
        let what = if yank {
            let drive = rig.drive("offsite-a");
            run(
                "xfs_io",
                &[
                    os("-x"),
                    os("-c"),
                    os("shutdown"),
                    drive.mountpoint.as_os_str(),
                ],
            );
            let result = rig.result(from, "offsite-a").await;
            if result.member == "SyncFailed" {
                said = Some(result.args[2].clone());
            }
            drive.unmount();
            drive.mount();
            format!(
                "yank/{}",
                if result.member == "SyncFinished" {
                    "finished"
                } else {
                    result.args[1].as_str()
                }
            )
        } else {
            let finished = rig
                .signals
                .all()
                .into_iter()
                .skip(from)
                .any(|r| r.member == "SyncFinished");
            rig.kill_service();
            rig.start_service().await;
            assert!(
                rig.snapshots_left().is_empty(),
                "{:?}",
                rig.snapshots_left()
            );
            format!("kill/{}", if finished { "finished" } else { "mid-sync" })
        };
        *hits.entry(what.clone()).or_default() += 1;
        let copy = judge_copy(&copy_path, None);
        assert!(
            copy == before || copy == after,
            "point {point} ({what} after {delay:?}): the copy lists {copy:?}, neither {before:?} nor {after:?}"
        );
        // What SyncFailed said the drive holds is what it holds (or it
        // says it could not look: a shut-down filesystem answers EIO).
        if let Some(said) = said {
            let new = said.contains("the new copy of nas");
            let previous = said.contains("the previous copy of nas");
            assert!(
                new || previous
                    || said.contains("could not be looked at")
                    || said.contains("it cannot be read"),
                "point {point}: SyncFailed does not say what the drive holds: {said}"
            );
            assert!(!said.contains("File exists"), "point {point}: {said}");
            if new && before != after {
                assert_eq!(copy, after, "point {point}: {said}");
            }
            if previous && before != after {
                assert_eq!(copy, before, "point {point}: {said}");
            }
        }
        before = copy;
    }
    eprintln!("interruptions: {hits:?}");
    // Finally an uninterrupted sync cleans up and completes.
    rig.sync("offsite-a").await;
    assert_eq!(
        rig.copy_archives("offsite-a", &NAS),
        rig.source_archives(&NAS)
    );
    let names: Vec<String> = std::fs::read_dir(rig.drive("offsite-a").mountpoint.join("ferry"))
        .expect("ferry dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["nas"]);
    assert_eq!(
        borg_output(
            &rig.base,
            None,
            &[
                os("list"),
                os("--lock-wait"),
                os("1"),
                rig.repo("nas").as_os_str()
            ]
        )
        .status
        .code(),
        Some(0),
        "borg's lock on the source was left behind"
    );
}

/// A sync that has to wait for borg's lock says so in Running within a
/// second (the phase lock-wait, since when, and who holds it: borg's own
/// lock files name the holding process), then goes through its phases in
/// order, each in SyncProgress and the log, once the backup lets go.
async fn waiting_for_borgs_lock_and_every_phase_are_visible() {
    if !borg_ready() {
        return;
    }
    let rig = Rig::new(&[("offsite-a", 64)], &[&NAS], "").await;
    rig.add_archive(&NAS, "nas-1", 5, 3000);
    let repo = rig.repo("nas");
    // A backup holds borg's lock for a few seconds.
    let mut holder = Command::new("borg")
        .args([os("with-lock"), repo.as_os_str(), os("sleep"), os("5")])
        .env("BORG_BASE_DIR", &rig.base)
        .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
        .env("BORG_PASSPHRASE", "")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("borg with-lock");
    let lock = repo.join("lock.exclusive");
    let deadline = Instant::now() + WAIT;
    while !lock.exists() {
        assert!(
            Instant::now() < deadline,
            "borg with-lock never took its lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let proxy = SyncProxy::new(&rig.conn).await.expect("proxy");
    let mut changes = proxy.receive_running_changed().await;
    let from = rig.signals.len();
    proxy.start("offsite-a").await.expect("Start");
    let asked = Instant::now();
    let waiting = tokio::time::timeout(Duration::from_secs(1), async {
        use futures_util::StreamExt;
        while let Some(change) = changes.next().await {
            let running = change.get().await.expect("Running");
            if let Some(job) = running.into_iter().find(|j| j.phase == "lock-wait") {
                return job;
            }
        }
        panic!("the Running stream ended");
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "Running did not show lock-wait within a second:\n{}",
            rig.signals.listing()
        )
    });
    let shown = asked.elapsed();
    assert_eq!(
        (waiting.drive.as_str(), waiting.repository.as_str()),
        ("offsite-a", "nas")
    );
    let now = ferry_service::unix_now();
    assert!(
        waiting.since <= now && waiting.since + 5 >= now,
        "{waiting:?}"
    );
    assert!(
        waiting.detail.contains(&format!("process {}", holder.id())),
        "the holder is named: {waiting:?}"
    );

    // The backup ends; the sync goes on through its phases.
    assert!(holder.wait().expect("holder").success());
    let result = rig.result(from, "offsite-a").await;
    assert_eq!(result.member, "SyncFinished", "{result}");
    let phases: Vec<String> = rig.signals.all()[from..]
        .iter()
        .filter(|s| s.member == "SyncProgress" && s.args[0] == "offsite-a")
        .map(|s| s.args[3].clone())
        .fold(Vec::new(), |mut seen, phase| {
            if seen.last() != Some(&phase) {
                seen.push(phase);
            }
            seen
        });
    assert_eq!(
        phases,
        [
            "scrub",
            "lock",
            "lock-wait",
            "snapshot",
            "copy",
            "verify",
            "swap"
        ],
        "{}",
        rig.signals.listing()
    );
    let log = rig.service.as_ref().expect("service").log();
    assert!(
        log.contains("offsite-a: nas: lock-wait: held by host"),
        "{log}"
    );
    eprintln!("lock-wait shown in Running {shown:?} after Start");
    assert_eq!(rig.copy_archives("offsite-a", &NAS), ["nas-1"]);
}

/// Where the real borg is (for the wrappers below).
fn real_borg() -> String {
    String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v borg"])
            .output()
            .expect("command -v borg")
            .stdout,
    )
    .expect("utf-8")
    .trim()
    .to_string()
}

/// Writes `text` to `program` and makes it executable.
fn write_program(program: &Path, text: &str) {
    std::fs::write(program, text).expect("write borg");
    std::fs::set_permissions(program, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
}

/// A borg that, when told to (a file names the repository, the drive's
/// image and the new generation's directory), damages one repository's
/// new copy on the device just before ferry-sync reads it back: when
/// ferry-sync runs `borg list` on that repository's snapshot (beside the
/// copy; ferry-sync waits for it before the read-back), it waits until the
/// new generation holds every file of the snapshot at full size, makes it
/// durable, and flips a byte of the biggest segment copied by this sync
/// (one link; one linked forward has two) in the loop device's image file,
/// under the drive's page cache. It is the real borg otherwise.
fn corrupting_borg(dir: &Path) -> (PathBuf, PathBuf) {
    let real = real_borg();
    let flag = dir.join("corrupt-new-copy-of");
    let program = dir.join("borg");
    write_program(
        &program,
        &format!(
            "#!/usr/bin/python3\nimport fcntl, os, struct, sys\nflag = {flag:?}\n\
             def physical(path):\n\
             \x20   fd = os.open(path, os.O_RDONLY)\n\
             \x20   buf = bytearray(struct.pack('=QQLLLL', 0, 2**64 - 1, 1, 0, 1, 0) + bytes(56))\n\
             \x20   fcntl.ioctl(fd, 0xC020660B, buf)\n\
             \x20   os.close(fd)\n\
             \x20   return struct.unpack_from('=QQQ', buf, 32)[1]\n\
             def complete(snap, new):\n\
             \x20   for d, _, fs in os.walk(snap):\n\
             \x20       for f in fs:\n\
             \x20           there = os.path.join(new, os.path.relpath(os.path.join(d, f), snap))\n\
             \x20           if not os.path.exists(there) or os.path.getsize(there) != os.path.getsize(os.path.join(d, f)):\n\
             \x20               return False\n\
             \x20   return True\n\
             if sys.argv[1:2] == ['list'] and os.path.exists(flag):\n\
             \x20   repo, image, new = open(flag).read().split()\n\
             \x20   target = [a for a in sys.argv if os.path.basename(a).startswith('.' + repo + '.ferry-snapshot.')]\n\
             \x20   if target:\n\
             \x20       import time\n\
             \x20       until = time.monotonic() + 120\n\
             \x20       while not complete(target[0], new) and time.monotonic() < until:\n\
             \x20           time.sleep(0.01)\n\
             \x20       os.sync()\n\
             \x20       segs = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(new, 'data')) for f in fs]\n\
             \x20       segs = [p for p in segs if os.stat(p).st_nlink == 1]\n\
             \x20       biggest = max(segs, key=os.path.getsize)\n\
             \x20       at = physical(biggest) + 100\n\
             \x20       with open(image, 'r+b') as f:\n\
             \x20           f.seek(at); b = f.read(1); f.seek(at); f.write(bytes([b[0] ^ 0xff]))\n\
             os.execv({real:?}, ['borg'] + sys.argv[1:])\n"
        ),
    );
    (program, flag)
}

/// Where the first byte of `path` lies on its device (FIEMAP).
fn physical_offset(path: &Path) -> u64 {
    use std::os::fd::AsRawFd;
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    let file = std::fs::File::open(path).expect("open for FIEMAP");
    // struct fiemap (32 bytes) with room for one struct fiemap_extent (56).
    let mut buf = [0u64; (32 + 56) / 8];
    buf[1] = u64::MAX; // fm_length
    buf[2] = 1; // fm_flags = FIEMAP_FLAG_SYNC (low half), fm_mapped_extents = 0
    buf[3] = 1; // fm_extent_count = 1 (low half), fm_reserved = 0
                // SAFETY: FS_IOC_FIEMAP on an open file with a buffer of the size the
                // header promises (one extent).
    let done = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) };
    assert_eq!(
        done,
        0,
        "FIEMAP {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    assert_eq!(buf[2] >> 32, 1, "{} has no extent", path.display());
    buf[4 + 1] // fm_extents[0].fe_physical
}

/// Flips the byte at `offset` of a drive's image file.
fn flip_byte(image: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .expect("open image");
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).expect("read image");
    byte[0] ^= 0xff;
    file.write_all_at(&byte, offset).expect("write image");
    file.sync_all().expect("sync image");
}

/// After a failure, SyncFailed says which copy of each repository the
/// drive holds, as found by looking: a failure after nas's new copy was
/// swapped in (photos fails its check) says nas is new and photos
/// previous; a failure before any swap says both are previous. The test
/// then reads the drive: it holds what the message said.
async fn the_failure_message_says_which_copy_the_drive_holds() {
    if !borg_ready() {
        return;
    }
    let tools = tempfile::tempdir().expect("temp dir");
    let (program, flag) = corrupting_borg(tools.path());
    let extra = format!("\n[borg]\nprogram = \"{}\"\n", program.display());
    let rig = Rig::new(&[("offsite-a", 128)], &[&NAS, &PHOTOS], &extra).await;
    let image = rig.drive("offsite-a").image.path().display().to_string();
    rig.add_archive(&NAS, "nas-1", 5, 3000);
    rig.add_archive(&PHOTOS, "photos-1", 5, 3000);
    rig.sync("offsite-a").await;

    // After the swap of nas, photos fails at verify.
    rig.add_archive(&NAS, "nas-2", 5, 3000);
    rig.add_archive(&PHOTOS, "photos-2", 5, 3000);
    let new_of = |repo: &str| {
        let new = rig
            .drive("offsite-a")
            .copy(repo)
            .with_file_name(format!(".{repo}.new"));
        new.display().to_string()
    };
    std::fs::write(&flag, format!("photos {image} {}", new_of("photos"))).expect("flag");
    let from = rig.signals.len();
    rig.drive_opened("offsite-a").await;
    let failed = rig.result(from, "offsite-a").await;
    assert_eq!(failed.member, "SyncFailed", "{failed}");
    assert_eq!(failed.args[1], "verify", "{failed}");
    let said = &failed.args[2];
    // Found by reading the new files back from the drive, in this sync.
    assert!(
        said.contains("read back from the drive, 1 of the")
            && said.contains("differ from what was written"),
        "{said}"
    );
    assert!(said.contains("the new copy of nas"), "{said}");
    assert!(said.contains("the previous copy of photos"), "{said}");
    assert!(!said.contains("was kept"), "{said}");
    assert_eq!(rig.copy_archives("offsite-a", &NAS), ["nas-1", "nas-2"]);
    assert_eq!(rig.copy_archives("offsite-a", &PHOTOS), ["photos-1"]);

    // Before any swap: nas fails at verify; both are the previous copies.
    rig.add_archive(&NAS, "nas-3", 5, 3000);
    std::fs::write(&flag, format!("nas {image} {}", new_of("nas"))).expect("flag");
    let from = rig.signals.len();
    rig.drive_opened("offsite-a").await;
    let failed = rig.result(from, "offsite-a").await;
    assert_eq!(failed.member, "SyncFailed", "{failed}");
    let said = &failed.args[2];
    assert!(said.contains("the previous copy of nas"), "{said}");
    assert!(said.contains("the previous copy of photos"), "{said}");
    assert_eq!(rig.copy_archives("offsite-a", &NAS), ["nas-1", "nas-2"]);
    assert_eq!(rig.copy_archives("offsite-a", &PHOTOS), ["photos-1"]);
    let history = rig
        .proxy()
        .await
        .failure_history()
        .await
        .expect("FailureHistory");
    assert_eq!(history.len(), 2, "{history:#?}");
    assert_eq!(&history[1].message, said);

    // Told to stop failing, the next sync completes both.
    std::fs::remove_file(&flag).expect("flag");
    rig.sync("offsite-a").await;
    assert_eq!(
        rig.copy_archives("offsite-a", &NAS),
        ["nas-1", "nas-2", "nas-3"]
    );
    assert_eq!(
        rig.copy_archives("offsite-a", &PHOTOS),
        ["photos-1", "photos-2"]
    );
}

/// Sync1.Verification's entry for `drive`.
async fn verification(rig: &Rig, drive: &str) -> ferry_interfaces::DriveVerification {
    let all = rig
        .proxy()
        .await
        .verification()
        .await
        .expect("Verification");
    all.into_iter()
        .find(|v| v.drive == drive)
        .unwrap_or_else(|| panic!("no Verification entry for {drive}"))
}

/// Every regular file below `dir`, relative, biggest first among equals of
/// nothing: (path, size), leaving out borg's lock files.
fn files_with_sizes(dir: &Path) -> Vec<(String, u64)> {
    tree(dir)
        .into_iter()
        .map(|rel| {
            let size = std::fs::metadata(dir.join(&rel)).expect("stat").len();
            (rel, size)
        })
        .collect()
}

/// One flipped byte in an old segment on the drive, its size and mtime
/// kept (written into the drive's image under the filesystem): with
/// nothing new to copy, the sync still verifies — borg's metadata files in
/// full, and a scrub slice whose budget (1 MiB a sync) covers the ~2 MiB
/// copy in two syncs — finds the damage within those two syncs and repairs
/// it with a fresh copy from the source, says so (Verification: repaired
/// 1; the log); the copy then passes `borg check` and equals the source
/// byte for byte. Files last read long ago make the drive overdue.
async fn a_flipped_byte_in_an_old_segment_is_found_by_the_scrub_and_repaired() {
    if !borg_ready() {
        return;
    }
    let rig = Rig::new(
        &[("offsite-a", 128)],
        &[&NAS],
        "scrub-seconds = 0\nscrub-mib = 1\n",
    )
    .await;
    rig.add_archive(&NAS, "nas-1", 40, 50_000);
    rig.sync("offsite-a").await;
    let first = verification(&rig, "offsite-a").await;
    assert_eq!((first.repaired, first.overdue), (0, false), "{first:?}");
    assert!(first.total > 3 << 19, "a copy of ~2 MiB: {first:?}");
    assert!(
        first.read >= first.total,
        "every new file is read back: {first:?}"
    );
    assert!(first.verified_since > 0, "{first:?}");

    // Flip a byte of the biggest segment on the device.
    let drive = rig.drive("offsite-a");
    let copy = drive.copy("nas");
    let (victim, size) = files_with_sizes(&copy)
        .into_iter()
        .filter(|(rel, _)| rel.starts_with("data/"))
        .max_by_key(|(_, size)| *size)
        .expect("a segment");
    let before = std::fs::metadata(copy.join(&victim)).expect("stat");
    let at = physical_offset(&copy.join(&victim)) + 100;
    drive.unmount();
    flip_byte(drive.image.path(), at);
    drive.mount();
    let after = std::fs::metadata(copy.join(&victim)).expect("stat");
    assert_eq!(
        (after.len(), after.modified().expect("mtime")),
        (before.len(), before.modified().expect("mtime")),
        "size and mtime are kept"
    );
    let source = rig.repo("nas");
    assert_ne!(
        std::fs::read(copy.join(&victim)).expect("read copy"),
        std::fs::read(source.join(&victim)).expect("read source"),
        "the byte is flipped on the drive"
    );

    // Nothing new: each sync verifies; within two the scrub finds it.
    let mut repaired_in = None;
    for round in 1..=2 {
        let finished = rig.sync("offsite-a").await;
        let v = verification(&rig, "offsite-a").await;
        assert!(v.read > 0, "nothing to do still verifies: {v:?}");
        if v.repaired > 0 {
            assert_eq!(v.repaired, 1, "{v:?}");
            assert_eq!(
                finished.args[1],
                size.to_string(),
                "only {victim} is copied: {finished}"
            );
            repaired_in = Some(round);
            break;
        }
        assert_eq!(finished.args[1], "0", "nothing to copy: {finished}");
    }
    let round = repaired_in.unwrap_or_else(|| {
        panic!(
            "the scrub did not find the flipped byte in {victim} within two syncs:\n{}",
            rig.service.as_ref().expect("service").log()
        )
    });
    eprintln!("repaired by sync {round} after the flip");
    let log = rig.service.as_ref().expect("service").log();
    assert!(log.contains("repaired 1 damaged file"), "{log}");
    assert!(
        log.contains(&format!(
            "{victim} of nas on the drive is not what was copied"
        )),
        "{log}"
    );

    // The copy is the source again, byte for byte, and borg agrees.
    assert_eq!(tree(&copy), tree(&source));
    for rel in tree(&source) {
        assert!(
            std::fs::read(copy.join(&rel)).expect("copy")
                == std::fs::read(source.join(&rel)).expect("source"),
            "{rel} differs from the source"
        );
    }
    assert_eq!(
        rig.copy_archives("offsite-a", &NAS),
        rig.source_archives(&NAS)
    );

    // The next sync with nothing to do repairs nothing.
    rig.sync("offsite-a").await;
    assert_eq!(verification(&rig, "offsite-a").await.repaired, 0);

    // Files last read in 1970: one 1 MiB slice cannot cover them all, so
    // the drive is overdue for its scrub.
    let record = rig.bus.dir().join("state/sync-verify/offsite-a.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).expect("record")).expect("json");
    for files in json["repositories"]
        .as_object_mut()
        .expect("repositories")
        .values_mut()
    {
        for known in files.as_object_mut().expect("files").values_mut() {
            known["verified"] = serde_json::json!(1000);
        }
    }
    std::fs::write(&record, serde_json::to_vec(&json).expect("json")).expect("write record");
    rig.sync("offsite-a").await;
    let late = verification(&rig, "offsite-a").await;
    assert!(late.overdue && late.verified_since == 1000, "{late:?}");
}

/// A borg that appends each command line to `log`, then runs the real one.
fn logging_borg(dir: &Path) -> (PathBuf, PathBuf) {
    let real = real_borg();
    let log = dir.join("borg-commands.log");
    let program = dir.join("borg");
    write_program(
        &program,
        &format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\nexec '{real}' \"$@\"\n",
            log.display()
        ),
    );
    (program, log)
}

/// The `borg list` command lines `log` holds so far.
fn lists_run(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("list "))
        .map(str::to_string)
        .collect()
}

/// When a backup ends (Borg1.BackupFinished) the new transaction's newest
/// archive is listed then: the next plug-in runs no borg at all and still
/// names the new archive, which the copy holds. A backup that sends no
/// signal is listed by the sync itself, beside the copy, as before; and
/// what is learnt survives a restart.
async fn the_newest_archive_is_listed_when_a_backup_ends_not_at_the_plug_in() {
    if !borg_ready() {
        return;
    }
    let tools = tempfile::tempdir().expect("temp dir");
    let (program, log) = logging_borg(tools.path());
    let extra = format!("\n[borg]\nprogram = \"{}\"\n", program.display());
    let mut rig = Rig::new(&[("offsite-a", 128)], &[&NAS, &PHOTOS], &extra).await;
    rig.add_archive(&NAS, "nas-1", 10, 3000);
    rig.add_archive(&PHOTOS, "photos-1", 5, 3000);
    rig.sync("offsite-a").await;
    // The first sync knew nothing: it listed both snapshots itself.
    assert_eq!(lists_run(&log).len(), 2, "{:?}", lists_run(&log));

    // A backup, and its BackupFinished as ferry-borg sends it.
    rig.add_archive(&NAS, "nas-2", 10, 3000);
    rig.conn
        .emit_signal(
            None::<()>,
            borg::OBJECT_PATH,
            borg::INTERFACE,
            "BackupFinished",
            &("job-7", "nas", "nas-2"),
        )
        .await
        .expect("emit BackupFinished");
    // ferry-sync lists the new transaction now (photos' is known: the
    // sync listed it), holding nas's slot from before borg starts, so the
    // plug-in below waits for the answer rather than asking again.
    let deadline = Instant::now() + WAIT;
    while lists_run(&log).len() < 3 {
        assert!(
            Instant::now() < deadline,
            "nothing listed after BackupFinished"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        lists_run(&log)[2].contains(".nas.ferry-snapshot.+listing"),
        "{:?}",
        lists_run(&log)
    );

    let finished = rig.sync("offsite-a").await;
    let bytes: u64 = finished.args[1].parse().expect("bytes");
    assert!(bytes > 0, "nas-2 was copied: {finished}");
    assert_eq!(
        lists_run(&log).len(),
        3,
        "the plug-in ran borg: {:?}",
        lists_run(&log)
    );
    let record = |records: Vec<ferry_interfaces::SyncRecord>| {
        records
            .into_iter()
            .find(|r| r.drive == "offsite-a")
            .map(|r| r.archive)
            .unwrap_or_default()
    };
    let proxy = rig.proxy().await;
    assert_eq!(
        record(proxy.last_syncs().await.expect("LastSyncs")),
        "nas::nas-2, photos::photos-1"
    );
    assert_eq!(rig.copy_archives("offsite-a", &NAS), ["nas-1", "nas-2"]);
    assert!(
        rig.snapshots_left().is_empty(),
        "{:?}",
        rig.snapshots_left()
    );

    // No signal (a backup by another program): the sync lists it itself.
    rig.add_archive(&NAS, "nas-3", 10, 3000);
    rig.sync("offsite-a").await;
    assert_eq!(lists_run(&log).len(), 4, "{:?}", lists_run(&log));
    assert_eq!(
        record(proxy.last_syncs().await.expect("LastSyncs")),
        "nas::nas-3, photos::photos-1"
    );

    // What was learnt survives a restart: the copy is taken away (so the
    // next sync copies everything) and no borg runs for the name.
    rig.kill_service();
    std::fs::remove_dir_all(rig.drive("offsite-a").copy("nas")).expect("remove the copy");
    rig.start_service().await;
    rig.sync("offsite-a").await;
    assert_eq!(lists_run(&log).len(), 4, "{:?}", lists_run(&log));
    assert_eq!(
        rig.copy_archives("offsite-a", &NAS),
        ["nas-1", "nas-2", "nas-3"]
    );
    assert_eq!(
        record(proxy.last_syncs().await.expect("LastSyncs")),
        "nas::nas-3, photos::photos-1"
    );
}

ferry_integration_tests::integration_tests! {
    async Machine: [
        drive_opened_makes_a_verified_copy_and_the_ledger_survives_a_restart,
        start_and_cancel_by_hand,
        a_killed_ferry_sync_takes_its_children_with_it,
        a_full_drive_fails_at_space_and_keeps_the_copy,
        a_backup_during_the_sync_is_not_disturbed,
        borg_never_rewrites_a_committed_file,
        two_drives_in_turn_and_one_removed_mid_sync,
        killed_or_yanked_at_random_points_the_copy_is_old_or_new,
        waiting_for_borgs_lock_and_every_phase_are_visible,
        the_failure_message_says_which_copy_the_drive_holds,
        a_flipped_byte_in_an_old_segment_is_found_by_the_scrub_and_repaired,
        the_newest_archive_is_listed_when_a_backup_ends_not_at_the_plug_in,
    ],
}
