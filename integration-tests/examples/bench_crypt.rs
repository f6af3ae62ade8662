//! DriveAttached → DriveOpened latency of ferry-crypt for a plain drive
//! (p50 and p99 over N real attaches of a loop device, with the real drive
//! watcher and udev), beside what the mount itself takes when a person runs
//! mount(8) on the same image: once with ferry's options, and as ferry does
//! it (read-only, then remounted read-write after the identity check).
//!
//! Build the release binaries first, then run:
//!   cargo build --release -p ferry-crypt -p ferry-drive-watcher
//!   cargo run --release -p ferry-integration-tests --example bench_crypt [-- --attaches N]

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use ferry_integration_tests::{
    binary_path, have_loop_devices, have_root, have_udevd, LoopImage, SignalRecorder, TestBus,
};
use ferry_interfaces::{crypt, drive_watcher};

const WAIT: Duration = Duration::from_secs(20);

fn main() -> ExitCode {
    let mut attaches = 30usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--attaches", Some(n)) if n >= 1 => attaches = n,
            _ => {
                eprintln!("usage: bench_crypt [--attaches N]   (default 30)");
                return ExitCode::from(64);
            }
        }
    }
    if !(have_root() && have_loop_devices() && have_udevd()) {
        eprintln!("bench_crypt needs root, loop devices and a running udevd");
        return ExitCode::from(2);
    }
    // An example lives in target/<profile>/examples; the binaries one level up.
    if std::env::var_os("FERRY_BIN_DIR").is_none() {
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent()?.parent().map(Path::to_path_buf))
        {
            std::env::set_var("FERRY_BIN_DIR", dir);
        }
    }
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(bench(attaches)),
        Err(e) => {
            eprintln!("bench_crypt: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{label:<52} p50 {:>7.2} ms   p99 {:>7.2} ms   min {:>7.2}   max {:>7.2}   (n={})",
        ms(percentile(&samples, 50.0)),
        ms(percentile(&samples, 99.0)),
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
        samples.len()
    );
}

/// Runs a command and returns how long it took; panics when it fails.
fn timed(program: &str, args: &[&str]) -> Duration {
    let started = Instant::now();
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let took = started.elapsed();
    assert!(status.success(), "{program} {args:?} failed");
    took
}

async fn bench(attaches: usize) {
    let bus = TestBus::start();
    let dir = bus.dir().to_path_buf();
    let mountpoint = dir.join("mnt/bench");
    let base = dir.join("ferry.toml");
    let crypt_section = format!(
        "[crypt]\nkey-directory = \"{}\"\n\n",
        dir.join("keys").display()
    );
    std::fs::write(&base, &crypt_section).expect("config");

    let mut image = LoopImage::blank(&dir, 64);
    let device = image.attach();
    let out = Command::new(binary_path("ferry-crypt"))
        .args(["enroll", "--drive", "bench", "--plain", "--config"])
        .arg(&base)
        .args(["--yes-destroy-all-data-on", &device, &device])
        .output()
        .expect("enroll");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let section = String::from_utf8_lossy(&out.stdout).into_owned();

    // The mount alone, by hand, on the same image.
    let hand = tempfile::tempdir_in(&dir).expect("dir");
    let point = hand.path().to_string_lossy().into_owned();
    let mut plain_mount = Vec::new();
    let mut ferry_style = Vec::new();
    for _ in 0..attaches {
        plain_mount.push(timed(
            "mount",
            &["-o", "nosuid,nodev,noexec", &device, &point],
        ));
        timed("umount", &[&point]);
        let read_only = timed("mount", &["-o", "ro,nosuid,nodev,noexec", &device, &point]);
        let remount = timed("mount", &["-o", "remount,rw,nosuid,nodev,noexec", &point]);
        ferry_style.push(read_only + remount);
        timed("umount", &[&point]);
    }
    image.detach();

    let config = format!(
        "{crypt_section}{section}mountpoint = \"{}\"\n",
        mountpoint.display()
    );
    std::fs::write(&base, config).expect("config");
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let config_arg = base.to_string_lossy().into_owned();
    let watcher = bus.spawn("ferry-drive-watcher", &["--config", &config_arg], &[]);
    watcher
        .wait_for_name(&conn, drive_watcher::BUS_NAME, WAIT)
        .await;
    let service = bus.spawn("ferry-crypt", &["--config", &config_arg], &[]);
    service.wait_for_name(&conn, crypt::BUS_NAME, WAIT).await;
    let proxy = crypt::CryptProxy::new(&conn).await.expect("proxy");

    let mut latencies = Vec::new();
    let mut closes = Vec::new();
    for _ in 0..attaches {
        let start = signals.len();
        image.attach();
        let attached = signals
            .wait_for_from(start, "DriveAttached", |s| s.args[0] == "bench", WAIT)
            .await;
        let opened = signals
            .wait_for_from(start, "DriveOpened", |s| s.args[0] == "bench", WAIT)
            .await;
        latencies.push(opened.at.duration_since(attached.at));
        let asked = Instant::now();
        proxy.close("bench").await.expect("Close");
        signals
            .wait_for_from(start, "DriveClosed", |s| s.args[0] == "bench", WAIT)
            .await;
        closes.push(asked.elapsed());
        image.detach();
        signals
            .wait_for_from(start, "DriveDetached", |s| s.args[0] == "bench", WAIT)
            .await;
    }
    assert_eq!(
        signals.count("DriveFailed", |_| true),
        0,
        "{}",
        signals.listing()
    );

    println!("ferry-crypt, plain ext4 drive on a loop device ({attaches} attaches):");
    report("DriveAttached -> DriveOpened (ferry-crypt)", latencies);
    report("Close -> DriveClosed (umount, checks)", closes);
    report("mount(8) by hand, -o nosuid,nodev,noexec", plain_mount);
    report(
        "mount(8) ro + remount rw by hand (ferry's two steps)",
        ferry_style,
    );
}
