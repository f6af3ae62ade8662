//! ferry-sync beside the practical copy limit, in one run, page cache
//! dropped before each measurement: a borg repository of about 1 GiB copied
//! onto ext4 on a loop device by `cp -a` (+ syncfs, so it is as durable as
//! ferry's), by `rsync -a --delete` (+ syncfs) and by ferry-sync (which also
//! verifies with `borg check` before it swaps the copy in); then an
//! incremental sync after one new archive, and a sync with nothing to do
//! beside rsync with nothing to do. CPU seconds per GB for each.
//!
//! Usage (root, loop devices, borg, rsync):
//!   cargo build --release -p ferry-sync
//!   cargo run --release -p ferry-integration-tests --example bench_sync [-- --mib N]
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

/// Runs a shell command line (cp, rsync) plus syncfs on `fs`, timed.
fn timed_command(program: &str, args: &[&OsStr], fs: &Path) -> Took {
    drop_caches();
    let cpu = children_cpu();
    let start = Instant::now();
    let status = Command::new(program).args(args).status().expect("run");
    assert!(status.success(), "{program} failed");
    run("sync", &[OsStr::new("-f"), fs.as_os_str()]);
    Took {
        wall: start.elapsed().as_secs_f64(),
        cpu: children_cpu() - cpu,
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

struct Ferry {
    signals: SignalRecorder,
    proxy: SyncProxy<'static>,
    pid: u32,
}

impl Ferry {
    /// Start(drive) to SyncFinished: wall and CPU (ferry-sync and the borg
    /// it ran), the copy phase (to the last progress) with ferry-sync's own
    /// CPU, and the bytes copied.
    async fn sync(&self) -> (Took, Took, u64) {
        drop_caches();
        let from = self.signals.len();
        let cpu = process_cpu(self.pid);
        let start = Instant::now();
        self.proxy.start("bench").await.expect("Start");
        let finished = tokio::time::timeout(WAIT, async {
            loop {
                let found = self
                    .signals
                    .all()
                    .into_iter()
                    .skip(from)
                    .find(|r| r.member == "SyncFinished" || r.member == "SyncFailed");
                if let Some(found) = found {
                    return found;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("sync result");
        let wall = start.elapsed().as_secs_f64();
        assert_eq!(finished.member, "SyncFinished", "{finished}");
        let copy_end = self
            .signals
            .all()
            .into_iter()
            .skip(from)
            .rfind(|r| r.member == "SyncProgress")
            .map(|r| r.at.duration_since(start).as_secs_f64())
            .unwrap_or(0.0);
        let (own, children) = process_cpu(self.pid);
        let took = Took {
            wall,
            cpu: own + children - cpu.0 - cpu.1,
        };
        let copy = Took {
            wall: copy_end,
            cpu: own - cpu.0,
        };
        (took, copy, finished.args[1].parse().unwrap_or(0))
    }
}

fn line(what: &str, took: Took, bytes: u64) {
    let gb = bytes as f64 / 1e9;
    let rate = if took.wall > 0.0 {
        bytes as f64 / 1048576.0 / took.wall
    } else {
        0.0
    };
    let cpu_per_gb = if gb > 0.0 {
        format!("{:6.2}", took.cpu / gb)
    } else {
        "     -".into()
    };
    println!(
        "{what:<44} {:8.2} s {:9.1} MiB/s {:7.2} CPU s {} CPU s/GB",
        took.wall, rate, took.cpu, cpu_per_gb
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut mib: u64 = 1100;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--mib", Some(n)) => mib = n,
            _ => {
                eprintln!("usage: bench_sync [--mib N]");
                std::process::exit(64);
            }
        }
    }
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

    let work = tempfile::Builder::new()
        .prefix("ferry-bench-sync-")
        .tempdir_in("/var/tmp")
        .expect("work dir");
    let base = work.path().join("borg");
    let repo = work.path().join("repo");
    println!("making a {mib} MiB borg repository (borg create, no compression) ...");
    borg(
        &base,
        &[
            OsStr::new("init"),
            OsStr::new("-e"),
            OsStr::new("none"),
            repo.as_os_str(),
        ],
    );
    archive(&base, &repo, "first", mib);
    let repo_bytes = tree_bytes(&repo);

    let uuid = random_uuid();
    let mut image = LoopImage::ext4(work.path(), mib * 4 + 1024, &uuid, "bench");
    let device = image.attach();
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir_all(&mountpoint).expect("mountpoint");
    run("mount", &[OsStr::new(&device), mountpoint.as_os_str()]);

    let bus = TestBus::start();
    let config = work.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "state-directory = \"{}\"\n[drives.bench]\nuuid = \"{uuid}\"\nmountpoint = \"{}\"\nrepositories = [\"repo\"]\n[repositories.repo]\npath = \"{}\"\n",
            work.path().join("state").display(),
            mountpoint.display(),
            repo.display()
        ),
    )
    .expect("config");
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let service = bus.spawn(
        binary.to_str().expect("utf-8"),
        &["--config", config.to_str().expect("utf-8")],
        &[("RUST_LOG", "info")],
    );
    service
        .wait_for_name(&conn, sync::BUS_NAME, Duration::from_secs(20))
        .await;
    let proxy = zbus::proxy::Builder::<SyncProxy>::new(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .expect("proxy");
    let ferry = Ferry {
        signals,
        proxy,
        pid: service.pid(),
    };

    println!(
        "repository: {:.2} GiB; drive: ext4 on {device}\n",
        repo_bytes as f64 / 1073741824.0
    );
    println!(
        "{:<44} {:>10} {:>15} {:>13} {:>16}",
        "", "wall", "throughput", "CPU", "per GB"
    );
    let cp = timed_command(
        "cp",
        &[
            OsStr::new("-a"),
            repo.as_os_str(),
            mountpoint.join("cp").as_os_str(),
        ],
        &mountpoint,
    );
    line("initial: cp -a + syncfs (the limit)", cp, repo_bytes);
    let rsync_target = mountpoint.join("rsync");
    let source = std::ffi::OsString::from(format!("{}/", repo.display()));
    let rsync_cmd = |target: &Path| -> Vec<std::ffi::OsString> {
        vec![
            "-a".into(),
            "--delete".into(),
            source.clone(),
            target.as_os_str().to_os_string(),
        ]
    };
    let args = rsync_cmd(&rsync_target);
    let refs: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let rsync = timed_command("rsync", &refs, &mountpoint);
    line("initial: rsync -a --delete + syncfs", rsync, repo_bytes);
    let (initial, copy_phase, bytes) = ferry.sync().await;
    line(
        "initial: ferry-sync (copy, borg check, swap)",
        initial,
        bytes,
    );
    line(
        "initial: ferry-sync copy phase (own CPU)",
        copy_phase,
        bytes,
    );
    println!(
        "  => copy phase at {:.0} % of cp -a's throughput, end to end (with borg check) {:.0} %; ferry-sync's own CPU/GB {:.2} vs cp's {:.2}\n",
        100.0 * cp.wall / copy_phase.wall.max(1e-9),
        100.0 * cp.wall / initial.wall,
        copy_phase.cpu / (bytes as f64 / 1e9),
        cp.cpu / (repo_bytes as f64 / 1e9)
    );

    let new_mib = (mib / 10).max(32);
    println!("adding one archive of {new_mib} MiB of new data ...");
    archive(&base, &repo, "second", new_mib);
    let args = rsync_cmd(&rsync_target);
    let refs: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let rsync_inc = timed_command("rsync", &refs, &mountpoint);
    let (incremental, copy_phase, new_bytes) = ferry.sync().await;
    line(
        "incremental: rsync -a --delete + syncfs",
        rsync_inc,
        new_bytes,
    );
    line("incremental: ferry-sync", incremental, new_bytes);
    line(
        "incremental: ferry-sync copy phase (own CPU)",
        copy_phase,
        new_bytes,
    );
    let limit = new_bytes as f64 / (repo_bytes as f64 / cp.wall);
    println!(
        "  => new bytes at cp -a's rate would take {limit:.2} s: copy phase at {:.0} % of the limit, end to end {:.0} %\n",
        100.0 * limit / copy_phase.wall.max(1e-9),
        100.0 * limit / incremental.wall
    );

    let args = rsync_cmd(&rsync_target);
    let refs: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let rsync_none = timed_command("rsync", &refs, &mountpoint);
    let (nothing, _, _) = ferry.sync().await;
    line("nothing to do: rsync -a --delete + syncfs", rsync_none, 0);
    line("nothing to do: ferry-sync", nothing, 0);
    println!(
        "  => ferry-sync takes {:.0} % of rsync's time",
        100.0 * nothing.wall / rsync_none.wall
    );
    if std::env::var_os("BENCH_SYNC_LOG").is_some() {
        println!("\n----- ferry-sync log -----\n{}", service.log());
    }
    drop(service);
    drop(image);
}
