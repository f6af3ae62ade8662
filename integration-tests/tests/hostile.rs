//! A drive is hostile input: whatever an enrolled drive carries, nothing
//! ferry does on it reaches outside it. All six real binaries on a private
//! bus, the real enrolled drive on a loop device with hostile content
//! planted in ferry's directory on it (symlinks absolute, relative and to
//! the local repository's parent, FIFOs, device nodes, 20 000-level
//! directory chains, seeded random trees). Every round asserts that a
//! hashed sentinel tree on the host and the local repository are
//! byte-identical before and after, that the flow ends red (SyncFailed at
//! `drive-layout`), the drive is unmounted, and a failure mail went out.
//!
//! Content is planted while the drive watcher is stopped, so the drive
//! being prepared is never announced; the flow starts when the drive is
//! attached again with the watcher running.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::hash::{Hash, Hasher};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_integration_tests::smtp::{require_aiosmtpd, Received};
use ferry_integration_tests::system::{FerrySystem, Options, DRIVE, PROFILE};
use ferry_integration_tests::{
    require_command, require_loop_devices, require_root, require_udevd, run, udev_settle,
    LoopImage, Recorded,
};

/// A generous bound for one flow on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(90);

// ------------------------------------------------------------- the rig

/// The whole system plus a sentinel tree on the host that no drive may
/// ever change.
struct Rig {
    system: FerrySystem,
    sentinel: PathBuf,
    /// Failure mails seen so far, per stage.
    mails: BTreeMap<String, usize>,
}

/// How a flow must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// SyncFailed at this stage.
    SyncFailed(&'static str),
    /// SyncFinished and DriveClosed.
    Finished,
}

impl Rig {
    async fn start(options: Options) -> Option<Rig> {
        let ready = require_root()
            && require_udevd()
            && require_loop_devices()
            && require_command("borg", "borgbackup")
            && require_command("mkfs.ext4", "e2fsprogs")
            && require_aiosmtpd();
        if !ready {
            return None;
        }
        let mut system = FerrySystem::start(options, &|line| eprintln!("  {line}")).await;
        // Every round's failure is mailed at once: no grouping of repeats,
        // no hourly limit.
        let text = std::fs::read_to_string(&system.config).expect("ferry.toml");
        let text = text.replace(
            "[notify]\n",
            "[notify]\nrepeat-window-minutes = 0\nmax-per-hour = 10000\n",
        );
        std::fs::write(&system.config, text).expect("ferry.toml");
        system.start_service("ferry-notifier", "info").await;
        let sentinel = system.work().join("sentinel");
        std::fs::create_dir_all(sentinel.join("etc/deep")).expect("sentinel");
        std::fs::write(sentinel.join("passwd"), "root:x:0:0\n").expect("sentinel");
        std::fs::write(sentinel.join("etc/deep/shadow"), "secret\n").expect("sentinel");
        std::fs::create_dir_all(sentinel.join("ferry/demo")).expect("sentinel");
        std::fs::write(sentinel.join("ferry/demo/config"), "not borg\n").expect("sentinel");
        Some(Rig {
            system,
            sentinel,
            mails: BTreeMap::new(),
        })
    }

    /// Mounts the (detached) drive with the watcher stopped, lets `plant`
    /// change it (given the drive's root and the work directory),
    /// unmounts and detaches it, and starts the watcher again.
    async fn plant(&mut self, plant: impl FnOnce(&Path, &Path)) {
        drop(self.system.services.remove("ferry-drive-watcher"));
        let device = self.system.drive.attach();
        let point = self.system.work().join("plant");
        std::fs::create_dir_all(&point).expect("plant dir");
        run("mount", &[device.as_str(), &point.to_string_lossy()]);
        let unmount = Unmount(point.clone());
        plant(&point, self.system.work());
        drop(unmount);
        self.system.drive.detach();
        // The watcher starting again must not find the detached drive in
        // a udev database that has not caught up yet.
        udev_settle();
        self.system
            .start_service("ferry-drive-watcher", "info")
            .await;
    }

    /// Everything a drive must not change: the sentinel tree and the
    /// local repository, every entry with its type, mode, size, link
    /// target and content digest.
    fn host(&self) -> BTreeMap<String, String> {
        let mut all = describe(&self.sentinel);
        all.extend(
            describe(&self.system.repository)
                .into_iter()
                .map(|(k, v)| (format!("repo/{k}"), v)),
        );
        all
    }

    /// Attaches the drive, waits for its flow to end and checks the end:
    /// as `expect`, the host unchanged, the drive unmounted, and for a
    /// failure a mail naming the drive and the stage.
    async fn round(&mut self, what: &str, expect: Expect) {
        eprintln!("round: {what}");
        let before = self.host();
        let from = self.system.signals.len();
        self.system.drive.attach();
        let end = flow_end(&self.system, from).await.unwrap_or_else(|| {
            panic!(
                "{what}: the flow did not end within {WAIT:?}\n{}",
                listing(&self.system, from)
            )
        });
        let failure = end.failure.clone();
        match (expect, &failure) {
            (Expect::SyncFailed(stage), Some(f)) => assert_eq!(
                (f.member.as_str(), f.args[1].as_str()),
                ("SyncFailed", stage),
                "{what}: {f}\n{}",
                listing(&self.system, from)
            ),
            (Expect::Finished, None) => assert!(
                self.system.signals.all()[from..]
                    .iter()
                    .any(|r| r.member == "SyncFinished" && r.args[0] == DRIVE),
                "{what}: closed without SyncFinished\n{}",
                listing(&self.system, from)
            ),
            (Expect::Finished, Some(f)) => panic!("{what}: {f}\n{}", listing(&self.system, from)),
            (_, None) => panic!(
                "{what}: the flow ended without a failure\n{}",
                listing(&self.system, from)
            ),
        }
        assert!(
            !self.system.drive_mounted(),
            "{what}: the drive is still mounted after {}",
            end.last
        );
        if let Some(f) = &failure {
            let stage = f.args[1].clone();
            let seen = self.mails.entry(stage.clone()).or_default();
            let mails = self
                .system
                .smtp
                .wait_for(
                    *seen + 1,
                    |m| mentions(m, DRIVE) && mentions(m, &stage),
                    WAIT,
                )
                .await;
            *seen = mails.len();
            eprintln!("  ended red: {f}");
        } else {
            eprintln!("  ended {}", end.last);
        }
        // Pulled out: wait until the watcher says so, as a person would
        // wait for the drive to be gone before plugging it in again.
        let pulled = self.system.signals.len();
        self.system.drive.detach();
        self.system
            .signals
            .wait_for_from(pulled, "DriveDetached", |r| r.args[0] == DRIVE, WAIT)
            .await;
        let after = self.host();
        assert_host_unchanged(what, &before, &after);
    }
}

fn assert_host_unchanged(
    what: &str,
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) {
    if before == after {
        return;
    }
    let changed: Vec<String> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| format!("  {k}: {:?} -> {:?}", before.get(k), after.get(k)))
        .collect();
    panic!("{what}: the host changed:\n{}", changed.join("\n"));
}

/// How a flow ended: the record that ended it and the failure in it.
struct End {
    last: Recorded,
    failure: Option<Recorded>,
}

/// Waits for DriveClosed or DriveFailed for the drive after record `from`.
async fn flow_end(system: &FerrySystem, from: usize) -> Option<End> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut records = system.signals.watch();
    loop {
        let found = {
            let all = records.borrow_and_update();
            let ours: Vec<&Recorded> = all[from.min(all.len())..]
                .iter()
                .filter(|r| r.args.first().is_some_and(|d| d == DRIVE))
                .collect();
            ours.iter()
                .position(|r| r.member == "DriveClosed" || r.member == "DriveFailed")
                .map(|end| End {
                    last: ours[end].clone(),
                    failure: ours[..=end]
                        .iter()
                        .find(|r| r.member == "SyncFailed" || r.member == "DriveFailed")
                        .map(|r| (*r).clone()),
                })
        };
        if found.is_some() {
            return found;
        }
        match tokio::time::timeout_at(deadline, records.changed()).await {
            Ok(Ok(())) => {}
            _ => return None,
        }
    }
}

fn mentions(mail: &Received, text: &str) -> bool {
    mail.subject().contains(text) || mail.body.contains(text)
}

fn listing(system: &FerrySystem, from: usize) -> String {
    system.signals.all()[from..]
        .iter()
        .filter(|r| r.member != "SyncProgress")
        .map(|r| format!("  {r}\n"))
        .collect()
}

/// Every entry under `dir` (not following links), iteratively: path →
/// type, mode, size, link target or content digest.
fn describe(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&at) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let kind = meta.file_type();
            let what = if kind.is_symlink() {
                format!("link -> {:?}", std::fs::read_link(&path).ok())
            } else if kind.is_dir() {
                pending.push(path.clone());
                format!("dir {:o}", meta.mode())
            } else if kind.is_file() {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                std::fs::read(&path).unwrap_or_default().hash(&mut hasher);
                format!(
                    "file {:o} {} bytes {:016x} ino {}",
                    meta.mode(),
                    meta.len(),
                    hasher.finish(),
                    meta.ino()
                )
            } else {
                format!("special {:o}", meta.mode())
            };
            out.insert(rel, what);
        }
    }
    out
}

/// Unmounts its path when dropped (also when the test panics).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let Ok(path) = CString::new(self.0.as_os_str().as_bytes()) else {
            return;
        };
        // SAFETY: a valid C string; plain system calls.
        unsafe {
            if libc::umount2(path.as_ptr(), 0) != 0 {
                libc::umount2(path.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: a valid C string.
    let result = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
    assert_eq!(
        result,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn fifo(path: &Path) {
    mknod(path, libc::S_IFIFO | 0o644, 0);
}

/// A chain of `levels` directories named `d` below `top`, made through
/// directory descriptors (the path is far longer than PATH_MAX).
fn chain(top: &Path, levels: usize) {
    let c = CString::new(top.as_os_str().as_bytes()).expect("path");
    let name = CString::new("d").expect("name");
    // SAFETY: valid C strings; every descriptor opened here is closed.
    unsafe {
        let mut fd = libc::open(c.as_ptr(), libc::O_DIRECTORY | libc::O_RDONLY);
        assert!(fd >= 0, "open {}", top.display());
        for _ in 0..levels {
            assert_eq!(libc::mkdirat(fd, name.as_ptr(), 0o755), 0, "mkdirat");
            let next = libc::openat(fd, name.as_ptr(), libc::O_DIRECTORY | libc::O_RDONLY);
            assert!(next >= 0, "openat");
            libc::close(fd);
            fd = next;
        }
        libc::close(fd);
    }
}

/// Empties ferry's directory on the drive (the previous round's plant).
fn clear(root: &Path) {
    let ferry = root.join("ferry");
    if std::fs::symlink_metadata(&ferry).is_ok_and(|m| m.is_dir()) {
        // Never deep here: rounds with chains move them aside first.
        std::fs::remove_dir_all(&ferry).expect("clear ferry/");
    } else if std::fs::symlink_metadata(&ferry).is_ok() {
        std::fs::remove_file(&ferry).expect("clear ferry");
    }
}

/// An old copy, as a previous sync would have left it, for planting into.
fn old_copy(root: &Path) -> PathBuf {
    let copy = root.join("ferry").join(PROFILE);
    std::fs::create_dir_all(copy.join("data/0")).expect("old copy");
    std::fs::write(copy.join("README"), "This is a Borg Backup repository.\n").expect("old copy");
    std::fs::write(copy.join("data/0/1"), "segment").expect("old copy");
    copy
}

// ------------------------------------------------------------- the tests

/// Symlinks where ferry's directory, a generation or a file of the old
/// copy should be (absolute, relative `../..`, at the local repository's
/// parent), FIFOs and a device node: each a SyncFailed at drive-layout,
/// the host untouched.
async fn symlinks_fifos_and_device_nodes_never_reach_the_host() {
    let Some(mut rig) = Rig::start(Options::default()).await else {
        return;
    };
    let sentinel = rig.sentinel.clone();
    let repo_parent = rig
        .system
        .repository
        .parent()
        .expect("parent")
        .to_path_buf();
    let layout = Expect::SyncFailed("drive-layout");

    let s = sentinel.clone();
    rig.plant(|root, _| symlink(&s, root.join("ferry")).expect("symlink"))
        .await;
    rig.round("ferry/ is an absolute symlink to the host", layout)
        .await;

    rig.plant(|root, _| {
        clear(root);
        symlink("../..", root.join("ferry")).expect("symlink");
    })
    .await;
    rig.round("ferry/ is a relative symlink ../..", layout)
        .await;

    let p = repo_parent.clone();
    rig.plant(|root, _| {
        clear(root);
        symlink(&p, root.join("ferry")).expect("symlink");
    })
    .await;
    rig.round("ferry/ points at the local repository's parent", layout)
        .await;

    let p = repo_parent.clone();
    rig.plant(|root, _| {
        clear(root);
        std::fs::create_dir(root.join("ferry")).expect("ferry");
        symlink(&p, root.join("ferry").join(PROFILE)).expect("symlink");
    })
    .await;
    rig.round("the current generation is a symlink", layout)
        .await;

    let s = sentinel.join("ferry");
    rig.plant(|root, _| {
        clear(root);
        old_copy(root);
        symlink(&s, root.join("ferry").join(format!(".{PROFILE}.new"))).expect("symlink");
    })
    .await;
    rig.round("a leftover .new generation is a symlink", layout)
        .await;

    rig.plant(|root, _| {
        clear(root);
        old_copy(root);
        symlink(
            "../../../..",
            root.join("ferry").join(format!(".{PROFILE}.verify")),
        )
        .expect("symlink");
    })
    .await;
    rig.round("a leftover .verify is a relative symlink", layout)
        .await;

    let s = sentinel.join("passwd");
    rig.plant(|root, _| {
        clear(root);
        let copy = old_copy(root);
        symlink(&s, copy.join("config")).expect("symlink");
        symlink("../../../../../..", copy.join("data/0/2")).expect("symlink");
    })
    .await;
    rig.round("files of the old copy are symlinks", layout)
        .await;

    rig.plant(|root, _| {
        clear(root);
        let copy = old_copy(root);
        fifo(&copy.join("data/0/3"));
    })
    .await;
    rig.round("a segment of the old copy is a FIFO", layout)
        .await;

    rig.plant(|root, _| {
        clear(root);
        fifo(&root.join("ferry"));
    })
    .await;
    rig.round("ferry/ is a FIFO", layout).await;

    rig.plant(|root, _| {
        clear(root);
        let copy = old_copy(root);
        mknod(
            &copy.join("index.1"),
            libc::S_IFCHR | 0o666,
            libc::makedev(1, 3),
        );
    })
    .await;
    rig.round("the old copy holds a device node", layout).await;

    // And after all that, a clean drive syncs.
    rig.plant(|root, _| clear(root)).await;
    rig.round("a clean drive", Expect::Finished).await;
}

/// A 20 000-level directory chain inside the copy and inside a leftover
/// generation: a clean SyncFailed at drive-layout, no crash, the host
/// untouched.
async fn a_20000_level_chain_is_a_clean_failure() {
    // Room for 20 000 directories' inodes.
    let options = Options {
        drive_mib: 160,
        ..Options::default()
    };
    let Some(mut rig) = Rig::start(options).await else {
        return;
    };
    let layout = Expect::SyncFailed("drive-layout");
    rig.plant(|root, _| {
        let leftover = root.join("ferry").join(format!(".{PROFILE}.new"));
        std::fs::create_dir_all(&leftover).expect("leftover");
        chain(&leftover, 20_000);
    })
    .await;
    rig.round("20 000 levels inside a leftover .new", layout)
        .await;
    let pid = rig.system.services["ferry-sync"].pid();

    rig.plant(|root, _| {
        let copy = old_copy(root);
        std::fs::rename(
            root.join("ferry").join(format!(".{PROFILE}.new")),
            copy.join("data/1"),
        )
        .expect("move the chain into the copy");
    })
    .await;
    rig.round("20 000 levels inside the copy", layout).await;
    assert!(
        rig.system.services["ferry-sync"]
            .try_exit_status()
            .is_none(),
        "ferry-sync died"
    );
    assert_eq!(rig.system.services["ferry-sync"].pid(), pid);
}

/// Deterministic pseudo-random numbers.
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
}

/// Plants a random tree of directories, files, hard links, symlinks (to
/// the host, relative upwards, inside) and FIFOs into ferry's directory;
/// true when it holds anything but directories and regular files.
fn random_tree(root: &Path, host: &[PathBuf], rng: &mut Rng) -> bool {
    let ferry = root.join("ferry");
    // (directory, its depth below ferry/): ferry's walk allows six levels.
    let mut dirs = vec![(ferry.clone(), 0), (ferry.join(PROFILE), 1)];
    let mut files: Vec<PathBuf> = Vec::new();
    for (d, _) in &dirs {
        std::fs::create_dir_all(d).expect("dir");
    }
    let names = [
        PROFILE.to_string(),
        format!(".{PROFILE}.new"),
        format!(".{PROFILE}.verify"),
        "data".into(),
        "0".into(),
        "1".into(),
        "config".into(),
        "index.1".into(),
        "x".into(),
    ];
    // Half the trees hold only directories, files and hard links: those
    // must sync, the others fail; neither may touch the host.
    let hostile = rng.below(2) == 0;
    let kinds = if hostile { 10 } else { 6 };
    let mut special = false;
    for i in 0..rng.below(40) + 5 {
        let (dir, depth) = dirs[rng.below(dirs.len() as u64) as usize].clone();
        let name = &names[rng.below(names.len() as u64) as usize];
        let path = dir.join(format!(
            "{name}{}",
            if rng.below(3) == 0 {
                format!("{i}")
            } else {
                String::new()
            }
        ));
        if std::fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        match rng.below(kinds) {
            0..=2 if depth < 5 => {
                std::fs::create_dir(&path).expect("dir");
                dirs.push((path, depth + 1));
            }
            0..=4 => {
                std::fs::write(&path, format!("file {i}")).expect("file");
                files.push(path);
            }
            5 if !files.is_empty() => {
                let target = &files[rng.below(files.len() as u64) as usize];
                std::fs::hard_link(target, &path).expect("hard link");
            }
            6 => {
                let target = &host[rng.below(host.len() as u64) as usize];
                symlink(target, &path).expect("symlink");
                special = true;
            }
            7 => {
                let up = "../".repeat(rng.below(8) as usize + 1);
                symlink(up, &path).expect("symlink");
                special = true;
            }
            8 => {
                symlink(".", &path).expect("symlink");
                special = true;
            }
            _ => {
                fifo(&path);
                special = true;
            }
        }
    }
    special
}

/// Many rounds of seeded random trees: nothing outside the drive changes,
/// ever; a tree with anything but directories and regular files fails at
/// drive-layout. `FERRY_HOSTILE_SEED=<n>` repeats a run.
async fn random_hostile_trees_never_reach_the_host() {
    let seed = std::env::var("FERRY_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 | 1)
                .unwrap_or(1)
        });
    eprintln!("seed {seed} (FERRY_HOSTILE_SEED={seed} repeats this run)");
    let Some(mut rig) = Rig::start(Options::default()).await else {
        return;
    };
    let mut rng = Rng(seed);
    let host = vec![
        rig.sentinel.clone(),
        rig.sentinel.join("passwd"),
        rig.sentinel.join("ferry"),
        rig.system.repository.clone(),
        rig.system
            .repository
            .parent()
            .expect("parent")
            .to_path_buf(),
    ];
    let rounds = std::env::var("FERRY_HOSTILE_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    for round in 0..rounds {
        let mut special = false;
        rig.plant(|root, _| {
            clear(root);
            special = random_tree(root, &host, &mut rng);
        })
        .await;
        let expect = if special {
            Expect::SyncFailed("drive-layout")
        } else {
            Expect::Finished
        };
        rig.round(&format!("seed {seed}, round {round}"), expect)
            .await;
    }
}

/// Kills its child's process group when dropped (also when the test
/// panics): borg's `sleep` goes with borg.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: signalling the process group the child leads.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = self.0.wait();
    }
}

/// ferry-sync killed (SIGKILL, not restarted) while a drive's sync waits
/// for borg's lock: ferry-crypt sees Sync1 lose its owner, closes the
/// drive and ends the flow red (DriveFailed at `sync`), LED failed, mailed.
async fn a_sync_worker_dying_mid_job_still_ends_the_flow_red() {
    let Some(mut rig) = Rig::start(Options::default()).await else {
        return;
    };
    let system = &rig.system;
    // borg holds the repository's lock, so the sync waits for it.
    let base = system.work().join("lock-holder");
    std::fs::create_dir_all(&base).expect("borg base");
    let holder = std::process::Command::new("borg")
        .args(["with-lock", "--lock-wait", "30"])
        .arg(&system.repository)
        .args(["sleep", "600"])
        .env("BORG_BASE_DIR", &base)
        .env(
            "BORG_PASSCOMMAND",
            format!("cat {}", system.passphrase_file.display()),
        )
        .process_group(0)
        .spawn()
        .expect("borg with-lock");
    let holder = Child(holder);
    let lock = system.repository.join("lock.exclusive");
    let deadline = std::time::Instant::now() + WAIT;
    while !lock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "borg never took the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // borg, holding the lock, may write the repository itself: only the
    // sentinel is compared here.
    let before = describe(&rig.sentinel);
    let from = rig.system.signals.len();
    rig.system.drive.attach();
    // The job runs: Sync1.Running names the drive.
    rig.system
        .signals
        .wait_for_from(
            from,
            "PropertiesChanged",
            |r| r.path == "/org/ferry/Sync1" && r.args.iter().any(|a| a.contains(DRIVE)),
            WAIT,
        )
        .await;
    let sync = rig
        .system
        .services
        .remove("ferry-sync")
        .expect("ferry-sync");
    sync.signal(libc::SIGKILL);
    let end = flow_end(&rig.system, from)
        .await
        .unwrap_or_else(|| panic!("the flow never ended\n{}", listing(&rig.system, from)));
    let failure = end.failure.unwrap_or_else(|| {
        panic!(
            "ended without a failure: {}\n{}",
            end.last,
            listing(&rig.system, from)
        )
    });
    assert_eq!(
        (failure.member.as_str(), failure.args[1].as_str()),
        ("DriveFailed", "sync"),
        "{failure}"
    );
    assert!(!rig.system.drive_mounted(), "the drive is still mounted");
    rig.system
        .signals
        .wait_for_from(
            from,
            "ColorChanged",
            |r| r.args.get(1).is_some_and(|s| s == "failed"),
            WAIT,
        )
        .await;
    rig.system
        .smtp
        .wait_for(1, |m| mentions(m, DRIVE) && mentions(m, "sync"), WAIT)
        .await;
    drop(holder);
    assert_host_unchanged("ferry-sync killed", &before, &describe(&rig.sentinel));
}

/// The SHA-256 of a file, by sha256sum.
fn sha256(path: &Path) -> String {
    run("sha256sum", &[path.as_os_str()])
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Plugs in `image` (a stranger's, with the enrolled UUID) and checks that
/// the flow ends DriveFailed at identity, nothing is mounted, a mail names
/// the drive and the stage, the host is untouched and the image is
/// byte-identical afterwards.
async fn stranger_round(rig: &mut Rig, image: &mut LoopImage, what: &str) {
    eprintln!("stranger: {what}");
    let before = rig.host();
    let hash = sha256(image.path());
    let from = rig.system.signals.len();
    image.attach();
    let end = flow_end(&rig.system, from)
        .await
        .unwrap_or_else(|| panic!("{what}: no end\n{}", listing(&rig.system, from)));
    let failure = end
        .failure
        .unwrap_or_else(|| panic!("{what}: ended {}", end.last));
    assert_eq!(
        (failure.member.as_str(), failure.args[1].as_str()),
        ("DriveFailed", "identity"),
        "{what}: {failure}\n{}",
        listing(&rig.system, from)
    );
    eprintln!("  {failure}");
    assert_eq!(rig.system.signals.count("SyncStarted", |_| true), 0);
    assert!(!rig.system.drive_mounted(), "{what}: still mounted");
    let seen = rig.mails.entry("identity".into()).or_default();
    let mails = rig
        .system
        .smtp
        .wait_for(
            *seen + 1,
            |m| mentions(m, DRIVE) && mentions(m, "identity"),
            WAIT,
        )
        .await;
    *seen = mails.len();
    let pulled = rig.system.signals.len();
    image.detach();
    rig.system
        .signals
        .wait_for_from(pulled, "DriveDetached", |r| r.args[0] == DRIVE, WAIT)
        .await;
    assert_eq!(
        sha256(image.path()),
        hash,
        "{what}: the stranger's image changed"
    );
    assert_host_unchanged(what, &before, &rig.host());
}

/// A stranger's ext4 with the enrolled UUID and a dirty journal
/// (needs_recovery), and an XFS image with the enrolled ext4 drive's UUID:
/// both DriveFailed at identity, both images byte-identical afterwards
/// (the identity mount replays no journal; XFS is never mounted at all).
async fn a_strangers_drive_is_never_written_nor_mounted_as_another_type() {
    if !(require_command("xfs_io", "xfsprogs")
        && require_command("mkfs.xfs", "xfsprogs")
        && require_command("dumpe2fs", "e2fsprogs"))
    {
        return;
    }
    let Some(mut rig) = Rig::start(Options::default()).await else {
        return;
    };
    let uuid = rig.system.drive_uuid.clone();

    // The dirty ext4, made while the watcher is stopped (it must not be
    // announced half made).
    drop(rig.system.services.remove("ferry-drive-watcher"));
    let mut dirty = LoopImage::ext4(rig.system.work(), 32, &uuid, DRIVE);
    let device = dirty.attach();
    let point = rig.system.work().join("dirty");
    std::fs::create_dir_all(&point).expect("dirty mountpoint");
    run("mount", &[device.as_str(), &point.to_string_lossy()]);
    let unmount = Unmount(point.clone());
    std::fs::write(point.join("journalled"), vec![7u8; 64 * 1024]).expect("write");
    run("sync", &["-f", &point.join("journalled").to_string_lossy()]);
    run(
        "xfs_io",
        &["-x", "-c", "shutdown", &point.to_string_lossy()],
    );
    drop(unmount);
    dirty.detach();
    let features = run("dumpe2fs", &["-h", &dirty.path().to_string_lossy()]);
    assert!(
        features.contains("needs_recovery"),
        "the stranger's journal is not dirty:\n{features}"
    );
    udev_settle();
    rig.system
        .start_service("ferry-drive-watcher", "info")
        .await;
    stranger_round(&mut rig, &mut dirty, "ext4 with a dirty journal").await;
    let features = run("dumpe2fs", &["-h", &dirty.path().to_string_lossy()]);
    assert!(
        features.contains("needs_recovery"),
        "the stranger's journal was replayed"
    );

    // XFS with the ext4 drive's UUID (XFS needs 300 MiB; the file is sparse).
    let mut xfs = LoopImage::blank(rig.system.work(), 320);
    run(
        "mkfs.xfs",
        &[
            "-q",
            "-m",
            &format!("uuid={uuid}"),
            &xfs.path().to_string_lossy(),
        ],
    );
    stranger_round(&mut rig, &mut xfs, "XFS with the enrolled ext4 UUID").await;
}

/// A clone of the enrolled drive's UUID plugged in first, the real drive
/// second, the clone pulled: the clone fails at identity, and the real
/// drive is announced and synced with no manual step (no Rescan).
async fn a_clone_plugged_in_first_does_not_hide_the_real_drive() {
    let Some(mut rig) = Rig::start(Options::default()).await else {
        return;
    };
    let uuid = rig.system.drive_uuid.clone();
    let mut clone = LoopImage::ext4(rig.system.work(), 32, &uuid, DRIVE);
    let from = rig.system.signals.len();
    let clone_device = clone.attach();
    let end = flow_end(&rig.system, from).await.unwrap_or_else(|| {
        panic!(
            "the clone's flow never ended\n{}",
            listing(&rig.system, from)
        )
    });
    let failure = end.failure.expect("the clone fails");
    assert_eq!(
        (failure.member.as_str(), failure.args[1].as_str()),
        ("DriveFailed", "identity"),
        "{failure}"
    );

    // The real drive while the clone is still in: not announced yet.
    let real_from = rig.system.signals.len();
    let real_device = rig.system.drive.attach();
    udev_settle();
    assert_eq!(
        rig.system.signals.all()[real_from..]
            .iter()
            .filter(|r| r.member == "DriveAttached")
            .count(),
        0,
        "the real drive was announced while the clone holds its name"
    );

    // The clone pulled: the real drive takes its place by itself.
    let pulled = rig.system.signals.len();
    clone.detach();
    let attached = rig
        .system
        .signals
        .wait_for_from(pulled, "DriveAttached", |r| r.args[0] == DRIVE, WAIT)
        .await;
    assert_eq!(
        attached.args[1], real_device,
        "announced {attached}, not the real drive"
    );
    assert_ne!(real_device, clone_device);
    let detached = rig
        .system
        .signals
        .wait_for_from(pulled, "DriveDetached", |r| r.args[0] == DRIVE, WAIT)
        .await;
    assert!(
        detached.at <= attached.at,
        "attached before the clone was detached"
    );
    let end = flow_end(&rig.system, pulled).await.unwrap_or_else(|| {
        panic!(
            "the real drive's flow never ended\n{}",
            listing(&rig.system, pulled)
        )
    });
    assert!(
        end.failure.is_none()
            && rig.system.signals.all()[pulled..]
                .iter()
                .any(|r| r.member == "SyncFinished" && r.args[0] == DRIVE),
        "the real drive did not sync: {}\n{}",
        end.last,
        listing(&rig.system, pulled)
    );
    assert!(!rig.system.drive_mounted());
}

ferry_integration_tests::integration_tests! {
    async Machine: [
        symlinks_fifos_and_device_nodes_never_reach_the_host,
        a_20000_level_chain_is_a_clean_failure,
        random_hostile_trees_never_reach_the_host,
        a_sync_worker_dying_mid_job_still_ends_the_flow_red,
        a_strangers_drive_is_never_written_nor_mounted_as_another_type,
        a_clone_plugged_in_first_does_not_hide_the_real_drive,
    ],
}
