//! bench_borg: what ferry-borg costs on top of borg, measured.
//!
//! On one small source (a few hundred files), each run makes one archive in
//! its own repository:
//! - ferry: Start(profile) → BackupFinished, through a real ferry-borg on a
//!   private bus (the profile only creates: no prune, no checks);
//! - bare borg: `borg create` with the same options;
//! - borgmatic (from PyPI, in a venv under /tmp): `borgmatic create` on the
//!   same configuration, if it can be installed.
//!
//! Prints the median and spread of each (at least 10 runs, FERRY_BENCH_RUNS
//! for more) and ferry-borg's peak RSS (VmHWM).
//!
//! Run: cargo build --release -p ferry-borg &&
//!      cargo run --release -p ferry-integration-tests --example bench_borg

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_integration_tests::{SignalRecorder, TestBus};
use ferry_interfaces::borg::{self, BorgProxy};

const WAIT: Duration = Duration::from_secs(120);
const VENV: &str = "/tmp/ferry-bench-borgmatic-venv";

fn main() {
    let runs: usize = std::env::var("FERRY_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10)
        .max(10);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(bench(runs));
}

/// The ferry-borg binary beside this example's profile directory.
fn ferry_borg() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_BIN_DIR") {
        return PathBuf::from(dir).join("ferry-borg");
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/examples");
    let path = profile_dir.join("ferry-borg");
    assert!(
        path.is_file(),
        "{} is missing: cargo build --release -p ferry-borg first",
        path.display()
    );
    path
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn borg(&self, args: &[&str]) -> Duration {
        let started = Instant::now();
        let status = Command::new("borg")
            .args(args)
            .env("BORG_BASE_DIR", self.path("base"))
            .env(
                "BORG_PASSCOMMAND",
                format!("cat {}", self.path("passphrase").display()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run borg");
        assert!(status.success(), "borg {args:?}: {status}");
        started.elapsed()
    }

    fn init(&self, name: &str) -> String {
        let repo = self.path(name).display().to_string();
        self.borg(&["init", "--encryption=repokey", &repo]);
        repo
    }
}

fn summary(name: &str, samples: &mut [Duration]) -> f64 {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = ms(samples[samples.len() / 2]);
    println!(
        "{name:<12} median {median:>7.1} ms   min {:>7.1}   max {:>7.1}   (n={})",
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
        samples.len()
    );
    median
}

/// Installs borgmatic into a venv under /tmp (once); its path, or why not.
fn borgmatic() -> Result<PathBuf, String> {
    let bin = Path::new(VENV).join("bin/borgmatic");
    if bin.is_file() {
        return Ok(bin);
    }
    let quiet = |c: &mut Command| {
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| e.to_string())
            .and_then(|o| {
                if o.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
                }
            })
    };
    quiet(Command::new("python3").args(["-m", "venv", VENV]))
        .map_err(|e| format!("python3 -m venv failed: {e}"))?;
    quiet(Command::new(Path::new(VENV).join("bin/pip")).args(["install", "--quiet", "borgmatic"]))
        .map_err(|e| format!("pip install borgmatic failed: {e}"))?;
    Ok(bin)
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn bench(runs: usize) {
    let setup = Setup {
        dir: tempfile::Builder::new()
            .prefix("ferry-bench-borg-")
            .tempdir()
            .expect("temp dir"),
    };
    std::fs::write(setup.path("passphrase"), "bench passphrase").expect("passphrase");
    let src = setup.path("src");
    for d in 0..20 {
        let dir = src.join(format!("dir{d}"));
        std::fs::create_dir_all(&dir).expect("src");
        for f in 0..20 {
            std::fs::write(
                dir.join(format!("file{f}")),
                format!("{d}/{f}\n").repeat(200),
            )
            .expect("file");
        }
    }
    let src = src.display().to_string();
    println!(
        "bench_borg: {runs} runs each, source: 400 files, {}",
        Command::new("borg")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    );

    // Bare borg.
    let bare = setup.init("bare");
    let mut samples: Vec<Duration> = (0..runs)
        .map(|i| {
            setup.borg(&[
                "create",
                "--compression=lz4",
                &format!("{bare}::bare-{i}"),
                &src,
            ])
        })
        .collect();
    let bare_median = summary("bare borg", &mut samples);

    // ferry-borg.
    let repo = setup.init("ferry");
    let config = setup.path("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "state-directory = \"{}\"\n[repositories.main]\npath = \"{repo}\"\npassphrase-file = \"{}\"\n[profiles.bench]\nrepository = \"main\"\nsources = [\"{src}\"]\n",
            setup.path("state").display(),
            setup.path("passphrase").display()
        ),
    )
    .expect("config");
    let bus = TestBus::start();
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let base = setup.path("base").display().to_string();
    let service = bus.spawn(
        &ferry_borg().display().to_string(),
        &["--config", &config.display().to_string()],
        &[("BORG_BASE_DIR", &base), ("RUST_LOG", "info")],
    );
    service.wait_for_name(&conn, borg::BUS_NAME, WAIT).await;
    let proxy = BorgProxy::new(&conn).await.expect("proxy");
    let mut samples = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let job = proxy.start("bench").await.expect("Start");
        signals
            .wait_for("BackupFinished", |s| s.args[0] == job, WAIT)
            .await;
        samples.push(started.elapsed());
    }
    let ferry_median = summary("ferry-borg", &mut samples);
    println!(
        "ferry-borg overhead over bare borg create: {:+.1} ms per job (median)",
        ferry_median - bare_median
    );
    match vm_hwm_kib(service.pid()) {
        Some(kib) => println!(
            "ferry-borg peak RSS (VmHWM): {:.1} MiB",
            kib as f64 / 1024.0
        ),
        None => println!(
            "ferry-borg peak RSS: /proc/{}/status unreadable",
            service.pid()
        ),
    }

    // borgmatic on the same configuration.
    match borgmatic() {
        Err(why) => println!("borgmatic: not measured: {why}"),
        Ok(borgmatic) => {
            let repo = setup.init("borgmatic");
            let yaml = setup.path("borgmatic.yaml");
            std::fs::write(
                &yaml,
                format!(
                    "source_directories: [{src}]\nrepositories:\n  - path: {repo}\nencryption_passcommand: cat {}\ncompression: lz4\n",
                    setup.path("passphrase").display()
                ),
            )
            .expect("yaml");
            let mut samples = Vec::new();
            for _ in 0..runs {
                let started = Instant::now();
                let out = Command::new(&borgmatic)
                    .args(["-c", &yaml.display().to_string(), "create"])
                    .env("BORG_BASE_DIR", &base)
                    .env("HOME", setup.path("home"))
                    .stdin(Stdio::null())
                    .output()
                    .expect("run borgmatic");
                assert!(
                    out.status.success(),
                    "borgmatic create failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                samples.push(started.elapsed());
            }
            let version = Command::new(&borgmatic)
                .arg("--version")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            let median = summary(&format!("borgmatic {version}"), &mut samples);
            println!(
                "ferry-borg against borgmatic: {:+.1} ms per job (median)",
                ferry_median - median
            );
        }
    }
}
