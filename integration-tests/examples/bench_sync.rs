//! ferry-sync beside what a person would use instead, as a measurement: the
//! contenders interleaved (cp, rsync, ferry, then the next round in another
//! order) over several rounds, each figure and each ratio reported as the
//! median and min–max of the rounds, the page cache dropped (after `sync`)
//! before every measurement.
//!
//! What made `cp -a` itself vary 2× between runs is controlled: the drive's
//! image is allocated in full before mkfs (a sparse loop file allocates on
//! first write, so the first copy paid for the host filesystem's allocation
//! and a later one did not), mkfs neither discards (which punches the image
//! sparse again) nor leaves inode tables for ext4lazyinit to write in the
//! background during the measurements, and every contender starts from an
//! empty target after `sync`, so no writeback of an earlier run overlaps.
//!
//! The drive's image is attached with direct I/O, so a read-back after
//! dropping the drive's cache reads the host's disk; ferry-sync is told
//! when a backup ended (Borg1.BackupFinished), as ferry-borg tells it,
//! except in the incremental's "no BackupFinished" figure; and the peak of
//! dirty memory and the whole machine's CPU (kernel threads included) are
//! measured beside each copy.
//!
//! Per size (`--mib`, repeatable): initial copy (cp -a + syncfs, and + the
//! bytes read back from the drive, which is what ferry does; rsync -a
//! --delete + syncfs; ferry-sync end to end and its copy phase), incremental
//! (+10 % in one new archive: cp -a of only the new files + read back;
//! rsync; ferry-sync), nothing to do (rsync; ferry-sync with a scrub slice
//! of `--scrub-mib`), and the read-back rate (ferry's verify phase beside
//! `cat` of the same bytes).
//!
//! Usage (root, loop devices, borg, rsync):
//!   scripts/bench sync [--mib N]... [--rounds R] [--scrub-mib M]
//! (BENCH_SYNC_LOG=1 prints ferry-sync's log at the end)

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_integration_tests::{
    have_loop_devices, have_root, random_uuid, run, LoopImage, SignalRecorder, TestBus,
};
use ferry_interfaces::sync::{self, SyncProxy};

const WAIT: Duration = Duration::from_secs(1800);

/// Wall and CPU time of one measurement.
#[derive(Clone, Copy)]
struct Took {
    wall: f64,
    cpu: f64,
    /// The most memory the kernel held dirty or under writeback meanwhile,
    /// MiB (0 where not sampled).
    dirty: f64,
    /// CPU seconds of the whole machine meanwhile (every process and
    /// kernel thread, idle and I/O wait not counted): what the run cost,
    /// wherever the kernel did the work (cp leaves its writeback to the
    /// flusher threads, ferry-sync starts its own).
    machine: f64,
}

/// The whole machine's CPU seconds to drop the page cache now: what
/// freeing the cache a copy left behind costs (cp leaves it to reclaim,
/// later; ferry-sync frees it as it goes, inside its copy phase).
fn freeing_cpu() -> f64 {
    let before = machine_cpu();
    drop_caches();
    machine_cpu() - before
}

/// CPU seconds the whole machine has spent busy since boot (user, nice,
/// system, irq, softirq from /proc/stat).
fn machine_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let busy: f64 = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .take(7)
        .enumerate()
        .filter(|(i, _)| ![3, 4].contains(i))
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf is always safe.
    busy / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Dirty + Writeback from /proc/meminfo, KiB.
fn dirty_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("Dirty:") || l.starts_with("Writeback:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// The peak of [`dirty_kib`] while it runs, sampled every 5 ms on its own
/// thread.
struct DirtyPeak {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl DirtyPeak {
    fn start() -> DirtyPeak {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(dirty_kib());
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        });
        DirtyPeak { stop, thread }
    }

    /// The peak, MiB.
    fn finish(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0) as f64 / 1024.0
    }
}

fn drop_caches() {
    run("sync", &[] as &[&str]);
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3\n") {
        eprintln!("cannot drop the page cache: {e}");
    }
}

/// CPU seconds of this process's waited-for children so far.
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// CPU seconds of process `pid` itself and of its reaped children.
fn process_cpu(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<f64> = after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // utime, stime, cutime, cstime are fields 14..=17 (11..=14 after the name).
    let own: f64 = fields.iter().skip(11).take(2).sum();
    let children: f64 = fields.iter().skip(13).take(2).sum();
    // SAFETY: sysconf is always safe.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (own / hz, children / hz)
}

/// Runs a command (cp, rsync) plus syncfs on `fs`, timed, the page cache
/// dropped first.
fn timed_command(program: &str, args: &[&OsStr], fs: &Path) -> Took {
    drop_caches();
    let cpu = children_cpu();
    let machine = machine_cpu();
    let dirty = DirtyPeak::start();
    let start = Instant::now();
    let status = Command::new(program).args(args).status().expect("run");
    assert!(status.success(), "{program} failed");
    run("sync", &[OsStr::new("-f"), fs.as_os_str()]);
    Took {
        wall: start.elapsed().as_secs_f64(),
        cpu: children_cpu() - cpu,
        dirty: dirty.finish(),
        machine: machine_cpu() - machine,
    }
}

fn borg(base: &Path, args: &[&OsStr]) {
    let status = Command::new("borg")
        .args(args)
        .env("BORG_BASE_DIR", base)
        .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
        .status()
        .expect("run borg");
    assert!(status.success(), "borg {args:?} failed");
}

/// `mib` MiB of fresh random files under `dir`, then `borg create`.
fn archive(base: &Path, repo: &Path, name: &str, mib: u64) {
    let source = base.join("src").join(name);
    std::fs::create_dir_all(&source).expect("source dir");
    let files = mib.div_ceil(32);
    for i in 0..files {
        let size = (mib - i * 32).min(32);
        run(
            "dd",
            &[
                "if=/dev/urandom".to_string(),
                format!("of={}/f{i}", source.display()),
                "bs=1M".to_string(),
                format!("count={size}"),
                "status=none".to_string(),
            ],
        );
    }
    let target = format!("{}::{name}", repo.display());
    borg(
        base,
        &[
            OsStr::new("create"),
            OsStr::new("--compression"),
            OsStr::new("none"),
            OsStr::new(&target),
            source.as_os_str(),
        ],
    );
    let _ = std::fs::remove_dir_all(&source);
}

/// Every regular file below `dir`, recursively.
fn tree_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let meta = entry.metadata().expect("stat");
        if meta.is_dir() {
            out.extend(tree_files(&entry.path()));
        } else if meta.is_file() {
            out.push(entry.path());
        }
    }
    out
}

/// Reads every file below `dir` back after dropping the page cache (what
/// verifying a copy from the device costs at the least), timed.
fn read_back(dir: &Path) -> Took {
    drop_caches();
    let cpu = children_cpu();
    let start = Instant::now();
    let files = tree_files(dir);
    let status = Command::new("cat")
        .args(&files)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("cat");
    assert!(status.success(), "cat failed");
    Took {
        wall: start.elapsed().as_secs_f64(),
        cpu: children_cpu() - cpu,
        dirty: 0.0,
        machine: 0.0,
    }
}

fn tree_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let meta = e.metadata().expect("stat");
                    if meta.is_dir() {
                        tree_bytes(&e.path())
                    } else {
                        meta.len()
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// ferry-sync on the bench's bus, and the bench's handle on it.
struct Ferry<'a> {
    signals: SignalRecorder,
    proxy: SyncProxy<'static>,
    pid: u32,
    service: Option<ferry_integration_tests::ServiceProcess>,
    bus: &'a TestBus,
    conn: &'a zbus::Connection,
    binary: PathBuf,
    config: PathBuf,
}

/// One ferry-sync run: end to end (ferry-sync's CPU and the borg it ran);
/// its copy phase, from the `copy` phase to the `verify` phase (the copy,
/// hashing and syncfs), with ferry-sync's own CPU sampled at both ends;
/// what came before it (scrub, borg's lock, snapshot, plan); its verify
/// phase (read-back and borg list, to `swap`); and the bytes copied.
struct FerryRun {
    total: Took,
    copy: Took,
    before_copy: f64,
    /// Of which the scrub slice and borg's metadata files.
    scrub: f64,
    verify: f64,
    bytes: u64,
}

impl<'a> Ferry<'a> {
    /// ferry-sync with `config` on the bench's bus.
    async fn start(
        bus: &'a TestBus,
        conn: &'a zbus::Connection,
        binary: &Path,
        config: &Path,
    ) -> Ferry<'a> {
        let signals = SignalRecorder::new(conn).await;
        let proxy = zbus::proxy::Builder::<SyncProxy>::new(conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .expect("proxy");
        let mut ferry = Ferry {
            signals,
            proxy,
            pid: 0,
            service: None,
            bus,
            conn,
            binary: binary.to_path_buf(),
            config: config.to_path_buf(),
        };
        ferry.spawn().await;
        ferry
    }

    async fn spawn(&mut self) {
        let service = self.bus.spawn(
            self.binary.to_str().expect("utf-8"),
            &["--config", self.config.to_str().expect("utf-8")],
            &[("RUST_LOG", "info")],
        );
        service
            .wait_for_name(self.conn, sync::BUS_NAME, Duration::from_secs(20))
            .await;
        self.pid = service.pid();
        self.service = Some(service);
    }

    /// ferry-sync's copy and all it knows gone, and ferry-sync started
    /// afresh: the next sync is an initial one by a ferry-sync that has
    /// listed no archive yet.
    async fn forget(&mut self, bench: &Bench) {
        drop(self.service.take());
        let dbus = zbus::fdo::DBusProxy::new(self.conn)
            .await
            .expect("DBus proxy");
        let name = zbus::names::BusName::try_from(sync::BUS_NAME).expect("bus name");
        while dbus.name_has_owner(name.clone()).await.unwrap_or(false) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        bench.forget_ferry();
        self.spawn().await;
    }

    /// A backup ended: Borg1.BackupFinished, as ferry-borg sends it, and
    /// ferry-sync's listing of the repository's new transaction waited for
    /// (it happens when the backup ends, not at the plug-in; untimed).
    async fn backup_finished(&self, bench: &Bench, transaction: u64) {
        self.conn
            .emit_signal(
                None::<()>,
                ferry_interfaces::borg::OBJECT_PATH,
                ferry_interfaces::borg::INTERFACE,
                "BackupFinished",
                &("bench", "repo", "second"),
            )
            .await
            .expect("emit BackupFinished");
        let ledger = bench.state.join("sync-ledger.json");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let listed = std::fs::read(&ledger)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["listed"]["repo"]["transaction"]["id"].as_u64());
            if listed == Some(transaction) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ferry-sync did not list the new transaction after BackupFinished"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn log(&self) -> String {
        self.service.as_ref().map(|s| s.log()).unwrap_or_default()
    }

    async fn sync(&self) -> FerryRun {
        drop_caches();
        let from = self.signals.len();
        let cpu = process_cpu(self.pid);
        let machine = machine_cpu();
        let dirty = DirtyPeak::start();
        let start = Instant::now();
        self.proxy.start("bench").await.expect("Start");
        // Woken by every signal recorded (no polling, so the bench costs
        // the machine nothing meanwhile), so ferry-sync's CPU is sampled
        // as the copy phase starts and ends.
        let (mut copy_cpu, mut verify_cpu) = (None, None);
        let (mut copy_machine, mut verify_machine) = (None, None);
        let mut changes = self.signals.watch();
        let finished = tokio::time::timeout(WAIT, async {
            loop {
                {
                    let log = changes.borrow_and_update();
                    let seen = log.get(from..).unwrap_or(&[]);
                    let phase = |p: &str| {
                        seen.iter()
                            .any(|r| r.member == "SyncProgress" && r.args[3] == p)
                    };
                    if copy_cpu.is_none() && phase("copy") {
                        copy_cpu = Some(process_cpu(self.pid).0);
                        copy_machine = Some(machine_cpu());
                    }
                    if verify_cpu.is_none() && phase("verify") {
                        verify_cpu = Some(process_cpu(self.pid).0);
                        verify_machine = Some(machine_cpu());
                    }
                    let found = seen
                        .iter()
                        .find(|r| r.member == "SyncFinished" || r.member == "SyncFailed");
                    if let Some(found) = found {
                        return found.clone();
                    }
                }
                changes.changed().await.expect("signal recorder");
            }
        })
        .await
        .expect("sync result");
        let wall = start.elapsed().as_secs_f64();
        let machine = machine_cpu() - machine;
        let dirty = dirty.finish();
        let (own, children) = process_cpu(self.pid);
        assert_eq!(finished.member, "SyncFinished", "{finished}");
        let phase_at = |phase: &str| {
            self.signals
                .all()
                .into_iter()
                .skip(from)
                .find(|r| r.member == "SyncProgress" && r.args[3] == phase)
                .map(|r| r.at.duration_since(start).as_secs_f64())
        };
        let copy_at = phase_at("copy").unwrap_or(0.0);
        let scrub_at = phase_at("scrub").unwrap_or(0.0);
        let scrubbed_at = phase_at("lock").unwrap_or(scrub_at);
        let verify_at = phase_at("verify").unwrap_or(wall);
        let swap_at = phase_at("swap").unwrap_or(verify_at);
        FerryRun {
            total: Took {
                wall,
                cpu: own + children - cpu.0 - cpu.1,
                dirty,
                machine,
            },
            copy: Took {
                wall: verify_at - copy_at,
                cpu: verify_cpu.unwrap_or(own) - copy_cpu.unwrap_or(cpu.0),
                dirty,
                machine: verify_machine.unwrap_or(0.0) - copy_machine.unwrap_or(0.0),
            },
            before_copy: copy_at,
            scrub: (scrubbed_at - scrub_at).max(0.0),
            verify: swap_at - verify_at,
            bytes: finished.args[1].parse().unwrap_or(0),
        }
    }
}

/// The rounds of one figure.
#[derive(Default)]
struct Series(Vec<f64>);

impl Series {
    fn push(&mut self, x: f64) {
        self.0.push(x);
    }
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }
    fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if !n.is_multiple_of(2) => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
    fn range(&self) -> (f64, f64) {
        let v = self.sorted();
        (
            v.first().copied().unwrap_or(f64::NAN),
            v.last().copied().unwrap_or(f64::NAN),
        )
    }
}

/// Every figure of one size, by name, in the order first measured.
#[derive(Default)]
struct Figures(Vec<(String, Series)>);

impl Figures {
    fn add(&mut self, name: &str, x: f64) {
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some((_, s)) => s.push(x),
            None => {
                let mut s = Series::default();
                s.push(x);
                self.0.push((name.to_string(), s));
            }
        }
    }
    fn print(&self) {
        for (name, s) in &self.0 {
            let (lo, hi) = s.range();
            println!("  {name:<58} {:>9.3}  ({:.3}–{:.3})", s.median(), lo, hi);
        }
    }
}

/// Arguments.
struct Args {
    sizes: Vec<u64>,
    rounds: usize,
    scrub_mib: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        sizes: Vec::new(),
        rounds: 5,
        scrub_mib: 64,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let value: Option<u64> = it.next().and_then(|v| v.parse().ok());
        match (arg.as_str(), value) {
            ("--mib", Some(n)) => args.sizes.push(n),
            ("--rounds", Some(n)) if n >= 1 => args.rounds = n as usize,
            ("--scrub-mib", Some(n)) if n >= 1 => args.scrub_mib = n,
            _ => {
                eprintln!("usage: bench_sync [--mib N]... [--rounds R (5)] [--scrub-mib M (64)]");
                std::process::exit(64);
            }
        }
    }
    if args.sizes.is_empty() {
        args.sizes.push(1024);
    }
    args
}

/// A drive image allocated in full (no first-write allocation by the host
/// filesystem), ext4 without discard and without lazy initialisation.
fn drive_image(dir: &Path, mib: u64, uuid: &str) -> LoopImage {
    let path = dir.join("drive.img");
    run(
        "fallocate",
        &[
            OsStr::new("-l"),
            OsStr::new(&format!("{mib}MiB")),
            path.as_os_str(),
        ],
    );
    run(
        "mkfs.ext4",
        &[
            OsStr::new("-q"),
            OsStr::new("-F"),
            OsStr::new("-E"),
            OsStr::new("nodiscard,lazy_itable_init=0,lazy_journal_init=0"),
            OsStr::new("-U"),
            OsStr::new(uuid),
            path.as_os_str(),
        ],
    );
    LoopImage::from_file(path)
}

/// The N of the highest `index.N` in a borg repository.
fn transaction_of(repo: &Path) -> u64 {
    std::fs::read_dir(repo)
        .expect("repository")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("index.")?.parse().ok())
        .max()
        .expect("index.N")
}

/// Replaces the directory `at` with a hard-link clone of `state` (borg
/// never rewrites a committed file, so the clone is that state).
fn set_repository(state: &Path, at: &Path) {
    let _ = std::fs::remove_dir_all(at);
    run(
        "cp",
        &[OsStr::new("-al"), state.as_os_str(), at.as_os_str()],
    );
}

fn remove(path: &Path) {
    let _ = std::fs::remove_dir_all(path);
}

/// The files of `new` that `old` does not have (same relative path and
/// size), relative.
fn new_files(old: &Path, new: &Path) -> Vec<PathBuf> {
    tree_files(new)
        .into_iter()
        .filter_map(|f| {
            let rel = f.strip_prefix(new).ok()?.to_path_buf();
            let same = std::fs::metadata(old.join(&rel))
                .ok()
                .is_some_and(|m| m.len() == std::fs::metadata(&f).map(|n| n.len()).unwrap_or(0));
            (!same).then_some(rel)
        })
        .collect()
}

/// Everything one size needs.
struct Bench {
    work: PathBuf,
    repo: PathBuf,
    state_a: PathBuf,
    state_b: PathBuf,
    mountpoint: PathBuf,
    state: PathBuf,
    /// borg's committed transactions in states A and B.
    transaction_a: u64,
    transaction_b: u64,
}

impl Bench {
    fn rsync(&self, target: &Path) -> Took {
        let source = std::ffi::OsString::from(format!("{}/", self.repo.display()));
        timed_command(
            "rsync",
            &[
                OsStr::new("-a"),
                OsStr::new("--delete"),
                &source,
                target.as_os_str(),
            ],
            &self.mountpoint,
        )
    }

    /// ferry-sync's copy and what it knows of it, gone: the next sync is
    /// an initial one.
    fn forget_ferry(&self) {
        remove(&self.mountpoint.join("ferry"));
        remove(&self.state);
        run("sync", &[] as &[&str]);
    }
}

async fn one_size(mib: u64, args: &Args, binary: &Path) {
    let work = tempfile::Builder::new()
        .prefix("ferry-bench-sync-")
        .tempdir_in("/var/tmp")
        .expect("work dir");
    let base = work.path().join("borg");
    let bench = Bench {
        work: work.path().to_path_buf(),
        repo: work.path().join("repo"),
        state_a: work.path().join("state-a"),
        state_b: work.path().join("state-b"),
        mountpoint: work.path().join("mnt"),
        state: work.path().join("state"),
        transaction_a: 0,
        transaction_b: 0,
    };
    println!("\n######## {mib} MiB: making the repository (borg create, no compression) ...");
    borg(
        &base,
        &[
            OsStr::new("init"),
            OsStr::new("-e"),
            OsStr::new("none"),
            bench.repo.as_os_str(),
        ],
    );
    archive(&base, &bench.repo, "first", mib);
    run(
        "cp",
        &[
            OsStr::new("-al"),
            bench.repo.as_os_str(),
            bench.state_a.as_os_str(),
        ],
    );
    let new_mib = (mib / 10).max(16);
    archive(&base, &bench.repo, "second", new_mib);
    run(
        "cp",
        &[
            OsStr::new("-al"),
            bench.repo.as_os_str(),
            bench.state_b.as_os_str(),
        ],
    );
    let bench = Bench {
        transaction_a: transaction_of(&bench.state_a),
        transaction_b: transaction_of(&bench.state_b),
        ..bench
    };
    let bytes_a = tree_bytes(&bench.state_a);
    let bytes_b = tree_bytes(&bench.state_b);
    let added = new_files(&bench.state_a, &bench.state_b);
    let added_bytes: u64 = added
        .iter()
        .map(|r| {
            std::fs::metadata(bench.state_b.join(r))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum();

    let uuid = random_uuid();
    // At most two contenders' copies at once (each round starts empty),
    // the incremental's new files, ferry's new generation: 2.5× with room.
    let mut image = drive_image(&bench.work, mib * 5 / 2 + 2048, &uuid);
    // O_DIRECT to the image: the host's page cache holds none of the
    // drive's blocks, so every contender's read-back reads the disk.
    let device = image.attach_direct();
    let direct_io = run(
        "losetup",
        &[
            OsStr::new("--list"),
            OsStr::new("--noheadings"),
            OsStr::new("--output"),
            OsStr::new("DIO"),
            OsStr::new(&device),
        ],
    );
    assert_eq!(
        direct_io.trim(),
        "1",
        "the loop device does not do direct I/O: the read-back figures would be the host's page cache"
    );
    std::fs::create_dir_all(&bench.mountpoint).expect("mountpoint");
    run(
        "mount",
        &[OsStr::new(&device), bench.mountpoint.as_os_str()],
    );

    let bus = TestBus::start();
    // The scrub slice per sync: --scrub-mib; for a full scrub in the last
    // measurement, more than the drive holds.
    let config_with = |scrub_mib: u64| {
        let config = bench.work.join(format!("ferry-{scrub_mib}.toml"));
        std::fs::write(
            &config,
            format!(
                "state-directory = \"{}\"\n[sync]\nscrub-seconds = 0\nscrub-mib = {}\n[drives.bench]\nuuid = \"{uuid}\"\nmountpoint = \"{}\"\nrepositories = [\"repo\"]\n[repositories.repo]\npath = \"{}\"\n",
                bench.state.display(),
                scrub_mib,
                bench.mountpoint.display(),
                bench.repo.display()
            ),
        )
        .expect("config");
        config
    };
    let conn = bus.connect().await;
    let mut ferry = Ferry::start(&bus, &conn, binary, &config_with(args.scrub_mib)).await;
    println!(
        "repository {:.2} GiB, +{:.0} MiB in {} new files; drive: ext4 on {device} (allocated, nodiscard, no lazy init; direct I/O to the image); {} rounds, interleaved",
        bytes_a as f64 / 1073741824.0,
        added_bytes as f64 / 1048576.0,
        added.len(),
        args.rounds
    );
    let mut f = Figures::default();
    let gb_a = bytes_a as f64 / 1e9;
    let gb_new = added_bytes as f64 / 1e9;
    for round in 0..args.rounds {
        eprintln!("round {} of {} ...", round + 1, args.rounds);
        initial_round(&bench, &mut ferry, round, gb_a, &mut f).await;
        incremental_round(&bench, &mut ferry, &added, round, gb_new, &mut f).await;
    }
    let log = ferry.log();
    drop(ferry);
    println!(
        "\n  (seconds unless named; median (min–max) of {} rounds)",
        args.rounds
    );
    f.print();
    let mut f = Figures::default();
    // A full scrub: the copy ferry-sync holds (state B) re-read whole by a
    // sync with nothing to do and no scrub limit, after the first such
    // sync (which reads the files the rounds' syncs did not).
    let ferry = Ferry::start(&bus, &conn, binary, &config_with(mib * 100)).await;
    ferry.sync().await;
    for _ in 0..args.rounds.min(3) {
        let run = ferry.sync().await;
        let read = ferry
            .proxy
            .verification()
            .await
            .expect("Verification")
            .into_iter()
            .find(|v| v.drive == "bench")
            .map(|v| v.read)
            .unwrap_or(0);
        f.add(
            "full scrub: bytes re-read (GiB)",
            read as f64 / 1073741824.0,
        );
        f.add(
            "full scrub: nothing to do, whole drive re-read",
            run.total.wall,
        );
        f.add(
            "full scrub: MiB/s",
            read as f64 / 1048576.0 / run.total.wall.max(1e-9),
        );
    }
    drop(ferry);
    println!(
        "\n  (a full scrub: median (min–max) of {} syncs)",
        args.rounds.min(3)
    );
    f.print();
    let _ = bytes_b;
    if std::env::var_os("BENCH_SYNC_LOG").is_some() {
        println!("\n----- ferry-sync log -----\n{log}");
    }
    run("umount", &[bench.mountpoint.as_os_str()]);
    drop(image);
}

/// Initial copies of state A by cp, rsync and ferry, in an order that
/// rotates with the round.
async fn initial_round(
    bench: &Bench,
    ferry: &mut Ferry<'_>,
    round: usize,
    gb: f64,
    f: &mut Figures,
) {
    set_repository(&bench.state_a, &bench.repo);
    // The previous round's copies gone: the drive holds one copy at a time.
    remove(&bench.mountpoint.join("rsync"));
    let (mut cp, mut cp_read, mut rsync, mut run_) = (None, None, None, None);
    let (mut cp_freeing, mut ferry_freeing) = (0.0, 0.0);
    for turn in 0..3 {
        match (turn + round) % 3 {
            0 => {
                remove(&bench.mountpoint.join("cp"));
                let target = bench.mountpoint.join("cp");
                cp = Some(timed_command(
                    "cp",
                    &[OsStr::new("-a"), bench.repo.as_os_str(), target.as_os_str()],
                    &bench.mountpoint,
                ));
                cp_freeing = freeing_cpu();
                cp_read = Some(read_back(&target));
                remove(&target);
            }
            1 => {
                let target = bench.mountpoint.join("rsync");
                remove(&target);
                run("sync", &[] as &[&str]);
                rsync = Some(bench.rsync(&target));
                remove(&target);
            }
            _ => {
                // A ferry-sync that knows nothing, told that a backup
                // ended (as ferry-borg tells it), so the initial copy
                // runs no borg; the cost of a listing at the plug-in is
                // the incremental's "no BackupFinished" figure.
                ferry.forget(bench).await;
                ferry.backup_finished(bench, bench.transaction_a).await;
                run_ = Some(ferry.sync().await);
                ferry_freeing = freeing_cpu();
            }
        }
    }
    let (cp, cp_read, rsync, ferry) = (
        cp.expect("cp"),
        cp_read.expect("read"),
        rsync.expect("rsync"),
        run_.expect("ferry"),
    );
    f.add("initial: cp -a + syncfs", cp.wall);
    f.add(
        "initial: cp -a + syncfs + read back (cat)",
        cp.wall + cp_read.wall,
    );
    f.add("initial: rsync -a --delete + syncfs", rsync.wall);
    f.add(
        "initial: ferry-sync before the copy (scrub, lock, snapshot)",
        ferry.before_copy,
    );
    f.add(
        "initial: ferry-sync copy phase (copy, hash, syncfs)",
        ferry.copy.wall,
    );
    f.add(
        "initial: ferry-sync verify phase (read-back, rest of borg list)",
        ferry.verify,
    );
    f.add(
        "initial: ferry-sync end to end (BackupFinished came first)",
        ferry.total.wall,
    );
    f.add(
        "initial: ratio cp / ferry copy phase (aim >= 0.95)",
        cp.wall / ferry.copy.wall,
    );
    f.add(
        "initial: ratio (cp + read back) / ferry end to end (aim >= 0.9)",
        (cp.wall + cp_read.wall) / ferry.total.wall,
    );
    f.add(
        "initial: ratio rsync / ferry end to end",
        rsync.wall / ferry.total.wall,
    );
    f.add("initial: CPU s/GB cp -a", cp.cpu / gb);
    f.add(
        "initial: machine CPU s/GB, cp -a (with the kernel's writeback)",
        cp.machine / gb,
    );
    f.add(
        "initial: machine CPU s/GB, ferry-sync copy phase",
        ferry.copy.machine / gb,
    );
    f.add(
        "initial: machine CPU s/GB, cp -a + freeing the cache it left",
        (cp.machine + cp_freeing) / gb,
    );
    f.add(
        "initial: machine CPU s/GB, ferry-sync copy phase + freeing the cache it left",
        (ferry.copy.machine + ferry_freeing) / gb,
    );
    f.add("initial: peak dirty + writeback MiB, cp -a", cp.dirty);
    f.add("initial: peak dirty + writeback MiB, rsync", rsync.dirty);
    f.add(
        "initial: peak dirty + writeback MiB, ferry-sync",
        ferry.total.dirty,
    );
    f.add("initial: CPU s/GB cat (reading back)", cp_read.cpu / gb);
    f.add(
        "initial: CPU s/GB ferry-sync copy phase (hashing included)",
        ferry.copy.cpu / gb,
    );
    f.add(
        "initial: CPU s/GB ferry-sync end to end (with borg)",
        ferry.total.cpu / gb,
    );
    f.add(
        "read-back MiB/s: cat after drop_caches",
        gb * 1e9 / 1048576.0 / cp_read.wall,
    );
    f.add(
        "read-back MiB/s: ferry verify phase",
        gb * 1e9 / 1048576.0 / ferry.verify.max(1e-9),
    );
}

/// From state A to state B (+10 %): cp -a of only the new files + read
/// back, rsync, ferry; then nothing to do for rsync and ferry.
async fn incremental_round(
    bench: &Bench,
    ferry: &mut Ferry<'_>,
    added: &[PathBuf],
    round: usize,
    gb_new: f64,
    f: &mut Figures,
) {
    // Everyone at state A, untimed.
    set_repository(&bench.state_a, &bench.repo);
    let rsync_target = bench.mountpoint.join("rsync");
    remove(&rsync_target);
    bench.rsync(&rsync_target);
    ferry.forget(bench).await;
    ferry.sync().await;
    set_repository(&bench.state_b, &bench.repo);
    let (mut cp, mut rsync, mut run_) = (None, None, None);
    for turn in 0..3 {
        match (turn + round) % 3 {
            0 => {
                let target = bench.mountpoint.join("cp-new");
                remove(&target);
                std::fs::create_dir_all(&target).expect("cp-new");
                drop_caches();
                let cpu = children_cpu();
                let start = Instant::now();
                let status = Command::new("cp")
                    .arg("-a")
                    .arg("--parents")
                    .args(added)
                    .arg(&target)
                    .current_dir(&bench.repo)
                    .status()
                    .expect("cp");
                assert!(status.success(), "cp --parents failed");
                run("sync", &[OsStr::new("-f"), bench.mountpoint.as_os_str()]);
                let copied = Took {
                    wall: start.elapsed().as_secs_f64(),
                    cpu: children_cpu() - cpu,
                    dirty: 0.0,
                    machine: 0.0,
                };
                let read = read_back(&target);
                cp = Some((copied, read));
                remove(&target);
            }
            1 => rsync = Some(bench.rsync(&rsync_target)),
            _ => {
                ferry.backup_finished(bench, bench.transaction_b).await;
                run_ = Some(ferry.sync().await);
            }
        }
    }
    // The same plug-in when no BackupFinished came (a backup by a program
    // that sends none, or made while ferry-sync was not running): the sync
    // lists the snapshot's newest archive itself, beside the copy. From
    // state A again, by a ferry-sync that knows nothing.
    set_repository(&bench.state_a, &bench.repo);
    ferry.forget(bench).await;
    ferry.sync().await;
    set_repository(&bench.state_b, &bench.repo);
    let unlisted = ferry.sync().await;
    let ((cp, cp_read), rsync, ferry_inc) =
        (cp.expect("cp"), rsync.expect("rsync"), run_.expect("ferry"));
    f.add("incremental: cp -a of the new files + syncfs", cp.wall);
    f.add(
        "incremental: cp -a new + syncfs + read back",
        cp.wall + cp_read.wall,
    );
    f.add("incremental: rsync -a --delete + syncfs", rsync.wall);
    f.add(
        "incremental: ferry-sync end to end (BackupFinished came first)",
        ferry_inc.total.wall,
    );
    f.add(
        "incremental: ferry-sync before the copy (scrub, lock, snapshot)",
        ferry_inc.before_copy,
    );
    f.add("incremental: ferry-sync copy phase", ferry_inc.copy.wall);
    f.add("incremental: ferry-sync verify phase", ferry_inc.verify);
    f.add(
        "incremental: ratio (cp new + read back) / ferry (aim >= 0.9)",
        (cp.wall + cp_read.wall) / ferry_inc.total.wall,
    );
    f.add(
        "incremental: ferry-sync's scrub slice (--scrub-mib) and metadata re-read",
        ferry_inc.scrub,
    );
    f.add(
        "incremental: ratio (cp new + read back) / (ferry - its scrub slice)",
        (cp.wall + cp_read.wall) / (ferry_inc.total.wall - ferry_inc.scrub).max(1e-9),
    );
    f.add(
        "incremental: ratio rsync / ferry",
        rsync.wall / ferry_inc.total.wall,
    );
    f.add(
        "incremental: CPU s/GB new, ferry-sync",
        ferry_inc.total.cpu / gb_new.max(1e-9),
    );
    f.add(
        "incremental, no BackupFinished: ferry-sync end to end (lists beside the copy)",
        unlisted.total.wall,
    );
    f.add(
        "incremental, no BackupFinished: ferry-sync verify phase",
        unlisted.verify,
    );
    f.add(
        "incremental, no BackupFinished: ratio (cp new + read back) / ferry",
        (cp.wall + cp_read.wall) / unlisted.total.wall,
    );
    // Nothing to do.
    let (mut rsync_none, mut ferry_none) = (None, None);
    for turn in 0..2 {
        if (turn + round).is_multiple_of(2) {
            rsync_none = Some(bench.rsync(&rsync_target));
        } else {
            ferry_none = Some(ferry.sync().await);
        }
    }
    let (rsync_none, ferry_none) = (rsync_none.expect("rsync"), ferry_none.expect("ferry"));
    f.add("nothing to do: rsync -a --delete + syncfs", rsync_none.wall);
    f.add(
        "nothing to do: ferry-sync (scrub slice included)",
        ferry_none.total.wall,
    );
    assert_eq!(ferry_none.bytes, 0, "nothing to do copied bytes");
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = parse_args();
    if !(have_root() && have_loop_devices()) {
        eprintln!("bench_sync needs root and loop devices");
        std::process::exit(2);
    }
    let exe = std::env::current_exe().expect("exe");
    let binary: PathBuf = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("ferry-sync"))
        .expect("target dir");
    if !binary.is_file() {
        eprintln!(
            "{} is missing: cargo build --release -p ferry-sync",
            binary.display()
        );
        std::process::exit(2);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average at the start: {} (other work on the machine moves every figure)",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("ferry-sync's scrub slice per sync: {} MiB", args.scrub_mib);
    for mib in args.sizes.clone() {
        one_size(mib, &args, &binary).await;
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\nload average at the end: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}
