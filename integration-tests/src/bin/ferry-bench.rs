//! Benchmarks of the foundation, printed side by side with what a person
//! would use instead: udev event → DriveAttached latency beside the moment
//! `udevadm monitor` sees the same event, and each service's idle footprint
//! (RSS, CPU, wake-ups) after a quiet minute.
//!
//! Usage: ferry-bench [--attaches N] [--idle-seconds S]   (see scripts/bench)

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_integration_tests::{
    have_loop_devices, have_root, have_udevd, random_uuid, LoopImage, SignalRecorder, TestBus,
};
use ferry_interfaces::{drive_watcher, led};

const WAIT: Duration = Duration::from_secs(20);

struct Options {
    attaches: usize,
    idle_seconds: u64,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        attaches: 50,
        idle_seconds: 60,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--attaches" => options.attaches = value("--attaches")? as usize,
            "--idle-seconds" => options.idle_seconds = value("--idle-seconds")?,
            other => {
                return Err(format!(
                "unknown argument {other}; usage: ferry-bench [--attaches N] [--idle-seconds S]"
            ))
            }
        }
    }
    Ok(options)
}

fn main() -> std::process::ExitCode {
    let options = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ferry-bench: {e}");
            return std::process::ExitCode::from(64);
        }
    };
    if !(have_root() && have_loop_devices() && have_udevd()) {
        eprintln!("ferry-bench needs root, loop devices and a running udevd");
        return std::process::ExitCode::from(2);
    }
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(bench(options)),
        Err(e) => {
            eprintln!("ferry-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    std::process::ExitCode::SUCCESS
}

async fn bench(options: Options) {
    let bus = TestBus::start();
    let work = bus.dir().to_path_buf();
    let uuid = random_uuid();
    let config = work.join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[drives.bench]\nuuid = \"{uuid}\"\n\n[led]\nbackend = \"file\"\nfile = \"{}\"\n",
            work.join("led").display()
        ),
    )
    .expect("write config");
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let config_arg = config.to_string_lossy().into_owned();
    let mut services = Vec::new();
    for (binary, name) in [
        ("ferry-drive-watcher", drive_watcher::BUS_NAME),
        ("ferry-led", led::BUS_NAME),
    ] {
        let process = bus.spawn(binary, &["--config", &config_arg], &[("RUST_LOG", "warn")]);
        process.wait_for_name(&conn, name, WAIT).await;
        services.push((binary, process));
    }

    // udevadm monitor beside us, its output stamped as it arrives.
    let mut monitor = Command::new("udevadm")
        .args(["monitor", "--udev", "--property", "--subsystem-match=block"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start udevadm monitor");
    let (seen_tx, seen_rx) = mpsc::channel::<Instant>();
    let wanted = format!("ID_FS_UUID={uuid}");
    let stdout = monitor.stdout.take().expect("monitor stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line == wanted {
                let _ = seen_tx.send(Instant::now());
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500)); // udevadm subscribes

    let mut image = LoopImage::ext4(&work, 8, &uuid, "bench");
    let mut udevadm = Vec::new();
    let mut ferry = Vec::new();
    print!("attaching {} times ", options.attaches);
    for _ in 0..options.attaches {
        while seen_rx.try_recv().is_ok() {}
        let before = signals.len();
        let start = Instant::now();
        image.attach();
        let signal = signals
            .wait_for_from(before, "DriveAttached", |s| s.args[0] == "bench", WAIT)
            .await;
        let seen = seen_rx
            .recv_timeout(WAIT)
            .expect("udevadm monitor saw the event");
        udevadm.push(seen.duration_since(start));
        ferry.push(signal.at.duration_since(start));
        let before = signals.len();
        image.detach();
        signals
            .wait_for_from(before, "DriveDetached", |s| s.args[0] == "bench", WAIT)
            .await;
        print!(".");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    println!();
    let _ = monitor.kill();
    let _ = monitor.wait();

    println!("\n## udev event → DriveAttached ({} attaches of an ext4 loop device; from losetup to arrival)", options.attaches);
    println!("{:<44} {:>9} {:>9}", "", "p50 ms", "p99 ms");
    println!(
        "{:<44} {:>9.2} {:>9.2}",
        "udevadm monitor sees the event",
        pct(&udevadm, 50),
        pct(&udevadm, 99)
    );
    println!(
        "{:<44} {:>9.2} {:>9.2}",
        "a bus client receives DriveAttached",
        pct(&ferry, 50),
        pct(&ferry, 99)
    );
    let extra: Vec<Duration> = ferry
        .iter()
        .zip(&udevadm)
        .map(|(f, u)| f.saturating_sub(*u))
        .collect();
    println!(
        "{:<44} {:>9.2} {:>9.2}",
        "ferry's share (DriveAttached − udevadm)",
        pct(&extra, 50),
        pct(&extra, 99)
    );

    println!(
        "\n## idle footprint after {} s with nothing happening",
        options.idle_seconds
    );
    let before: Vec<Footprint> = services.iter().map(|(_, p)| footprint(p.pid())).collect();
    tokio::time::sleep(Duration::from_secs(options.idle_seconds)).await;
    println!(
        "{:<22} {:>9} {:>12} {:>14} {:>8}",
        "service", "RSS KiB", "CPU ms", "wake-ups/s", "threads"
    );
    for ((binary, process), start) in services.iter().zip(before) {
        let end = footprint(process.pid());
        let wakeups =
            end.switches.saturating_sub(start.switches) as f64 / options.idle_seconds as f64;
        println!(
            "{:<22} {:>9} {:>12} {:>14.3} {:>8}",
            binary,
            end.rss_kib,
            (end.cpu_ticks.saturating_sub(start.cpu_ticks)) * 1000 / ticks_per_second(),
            wakeups,
            end.threads
        );
    }
    let daemon = footprint(bus.daemon_pid());
    println!(
        "{:<22} {:>9} {:>12} {:>14} {:>8}",
        "(dbus-daemon, for scale)", daemon.rss_kib, "", "", daemon.threads
    );
    drop(image);
}

fn pct(samples: &[Duration], p: usize) -> f64 {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    if ms.is_empty() {
        return f64::NAN;
    }
    let rank = ((p as f64 / 100.0) * ms.len() as f64).ceil() as usize;
    ms[rank.clamp(1, ms.len()) - 1]
}

struct Footprint {
    rss_kib: u64,
    /// Context switches of every thread: each is a wake-up.
    switches: u64,
    cpu_ticks: u64,
    threads: usize,
}

fn footprint(pid: u32) -> Footprint {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |text: &str, key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut switches = 0;
    let mut threads = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let text = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            switches += field(&text, "voluntary_ctxt_switches:")
                + field(&text, "nonvoluntary_ctxt_switches:");
            threads += 1;
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces): utime is 14th, stime 15th overall.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<u64> = after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let cpu_ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Footprint {
        rss_kib: field(&status, "VmRSS:"),
        switches,
        cpu_ticks,
        threads,
    }
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}
