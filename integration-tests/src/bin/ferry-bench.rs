//! ferry's whole-system benchmarks, printed side by side with what a person
//! would use instead: udev event → DriveAttached latency beside the moment
//! `udevadm monitor` sees the same event; plug-in → DriveOpened →
//! SyncFinished → DriveClosed through all six services; signal fan-out
//! throughput through ferry's subscribers against the bare bus; and each
//! service's idle footprint (RSS, CPU, wake-ups) after a quiet minute; and
//! how fast each service answers a Properties.Get while it does its
//! heaviest I/O (a backup, a first sync, opening and closing a drive, a
//! burst of mails into the outbox).
//! (scripts/bench also runs the per-service benchmarks: sync against cp and
//! rsync, a borg job against borg and borgmatic, open against mount.)
//!
//! Usage: ferry-bench [--attaches N] [--plugins N] [--idle-seconds S] [--busy-only]

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
    plugins: usize,
    idle_seconds: u64,
    busy_only: bool,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        attaches: 50,
        plugins: 10,
        idle_seconds: 60,
        busy_only: false,
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
            "--plugins" => options.plugins = value("--plugins")? as usize,
            "--idle-seconds" => options.idle_seconds = value("--idle-seconds")?,
            "--busy-only" => options.busy_only = true,
            other => {
                return Err(format!(
                "unknown argument {other}; usage: ferry-bench [--attaches N] [--plugins N] [--idle-seconds S] [--busy-only]"
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
        Ok(runtime) if options.busy_only => runtime.block_on(answers_while_busy()),
        Ok(runtime) => runtime.block_on(async {
            bench(options).await;
            answers_while_busy().await;
        }),
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

    drop(image);
    drop(services);
    drop(bus);
    whole_system(&options).await;
}

/// Plug-in latencies, fan-out and idle footprint with all six services.
async fn whole_system(options: &Options) {
    use ferry_integration_tests::system::{
        FerrySystem, Options as SystemOptions, DRIVE, PROFILE, SERVICES,
    };
    let system_options = SystemOptions {
        log: "warn",
        sample_files: 200,
        sample_kib: 256,
        drive_mib: 256,
        ..SystemOptions::default()
    };
    let mut system = FerrySystem::start(system_options, &|_| {}).await;
    let borg = ferry_interfaces::borg::BorgProxy::new(&system.conn)
        .await
        .expect("Borg1");
    let job = borg.start(PROFILE).await.expect("Borg1.Start");
    system
        .signals
        .wait_for(
            "BackupFinished",
            |s| s.args[0] == job,
            Duration::from_secs(120),
        )
        .await;

    let (mut opened, mut synced, mut closed) = (Vec::new(), Vec::new(), Vec::new());
    print!(
        "\nplugging the enrolled drive in {} times ",
        options.plugins
    );
    for _ in 0..options.plugins {
        let before = system.signals.len();
        let start = Instant::now();
        system.drive.attach();
        let o = system
            .signals
            .wait_for_from(before, "DriveOpened", |s| s.args[0] == DRIVE, WAIT)
            .await;
        let f = system
            .signals
            .wait_for_from(before, "SyncFinished", |s| s.args[0] == DRIVE, WAIT)
            .await;
        let c = system
            .signals
            .wait_for_from(before, "DriveClosed", |s| s.args[0] == DRIVE, WAIT)
            .await;
        opened.push(o.at.duration_since(start));
        synced.push(f.at.duration_since(start));
        closed.push(c.at.duration_since(start));
        let before = system.signals.len();
        system.drive.detach();
        system
            .signals
            .wait_for_from(before, "DriveDetached", |s| s.args[0] == DRIVE, WAIT)
            .await;
        print!(".");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    println!();
    println!(
        "\n## plug-in of an enrolled plain drive through all six services ({} plug-ins; the first copies the {} MiB repository, the rest find the copy up to date)",
        options.plugins,
        dir_size(&system.repository) / (1 << 20)
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9}",
        "from losetup to", "first ms", "p50 ms", "p99 ms"
    );
    for (label, samples) in [
        ("DriveOpened", &opened),
        ("SyncFinished", &synced),
        ("DriveClosed (safe to remove)", &closed),
    ] {
        let rest = &samples[1.min(samples.len())..];
        println!(
            "{:<44} {:>9.1} {:>9.1} {:>9.1}",
            label,
            samples[0].as_secs_f64() * 1000.0,
            pct(rest, 50),
            pct(rest, 99)
        );
    }

    fan_out(&system).await;
    // Let the subscribers finish the fan-out's backlog before the quiet minute.
    tokio::time::sleep(Duration::from_secs(10)).await;

    println!(
        "\n## idle footprint after {} s with nothing happening (all six services)",
        options.idle_seconds
    );
    let pids: Vec<(&str, u32)> = SERVICES
        .iter()
        .map(|(binary, _)| (*binary, system.services[binary].pid()))
        .collect();
    let before: Vec<Footprint> = pids.iter().map(|(_, pid)| footprint(*pid)).collect();
    tokio::time::sleep(Duration::from_secs(options.idle_seconds)).await;
    println!(
        "{:<22} {:>9} {:>12} {:>14} {:>8}",
        "service", "RSS KiB", "CPU ms", "wake-ups/s", "threads"
    );
    for ((binary, pid), start) in pids.iter().zip(before) {
        let end = footprint(*pid);
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
    let daemon = footprint(system.bus.daemon_pid());
    println!(
        "{:<22} {:>9} {:>12} {:>14} {:>8}",
        "(dbus-daemon, for scale)", daemon.rss_kib, "", "", daemon.threads
    );
}

fn dir_size(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        total += if path.is_dir() {
            dir_size(&path)
        } else {
            entry.metadata().map(|m| m.len()).unwrap_or(0)
        };
    }
    total
}

/// Signals per second from one emitter to one receiver, first on a bare bus
/// (only the receiver listens), then on ferry's bus, where the LED, the
/// notifier, the crypt manager and the sync worker receive every
/// /org/ferry signal too.
async fn fan_out(system: &ferry_integration_tests::system::FerrySystem) {
    const N: usize = 20_000;
    async fn throughput(bus: &TestBus) -> f64 {
        use futures_util::StreamExt;
        let emitter = bus.connect().await;
        let receiver = bus.connect().await;
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .interface(ferry_interfaces::borg::INTERFACE)
            .expect("rule")
            .member("BackupProgress")
            .expect("rule")
            .build();
        let mut stream = zbus::MessageStream::for_match_rule(rule, &receiver, Some(N + 16))
            .await
            .expect("stream");
        let start = Instant::now();
        let sender = tokio::spawn(async move {
            for i in 0..N as u64 {
                let _ = emitter
                    .emit_signal(
                        None::<()>,
                        ferry_interfaces::borg::OBJECT_PATH,
                        ferry_interfaces::borg::INTERFACE,
                        "BackupProgress",
                        &("bench", i, i),
                    )
                    .await;
            }
            emitter
        });
        let mut received = 0;
        while received < N {
            match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
                Ok(Some(_)) => received += 1,
                _ => break,
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let _ = sender.await;
        received as f64 / elapsed
    }
    let bare_bus = TestBus::start();
    let bare = throughput(&bare_bus).await;
    let ferry = throughput(&system.bus).await;
    println!("\n## signal fan-out: {N} BackupProgress signals, one emitter, one receiver");
    println!("{:<60} {:>12}", "", "signals/s");
    println!(
        "{:<60} {:>12.0}",
        "bare bus (dbus-daemon, nobody else listening)", bare
    );
    println!(
        "{:<60} {:>12.0}",
        "ferry's bus (LED, notifier, crypt, sync receive them too)", ferry
    );
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

/// How long each service takes to answer a Properties.Get while it works:
/// a prober per service asks every 5 ms through a backup of 200 MiB, a
/// plug-in whose first sync copies the repository, the drive pulled, and a
/// burst of 100 test mails into the notifier's fsync'd outbox. A service
/// that blocked its runtime on file, device or process I/O would answer
/// late here.
async fn answers_while_busy() {
    use ferry_integration_tests::system::{FerrySystem, Options as SystemOptions, DRIVE, PROFILE};
    use ferry_interfaces::{borg, crypt, notifier, sync};
    let system_options = SystemOptions {
        log: "warn",
        sample_files: 800,
        sample_kib: 256,
        drive_mib: 1024,
        ..SystemOptions::default()
    };
    let mut system = FerrySystem::start(system_options, &|_| {}).await;
    let probes: [(&str, &str, &str, &str, &str); 6] = [
        (
            "ferry-drive-watcher",
            drive_watcher::BUS_NAME,
            drive_watcher::OBJECT_PATH,
            drive_watcher::INTERFACE,
            "Drives",
        ),
        (
            "ferry-crypt",
            crypt::BUS_NAME,
            crypt::OBJECT_PATH,
            crypt::INTERFACE,
            "Drives",
        ),
        (
            "ferry-sync",
            sync::BUS_NAME,
            sync::OBJECT_PATH,
            sync::INTERFACE,
            "Running",
        ),
        (
            "ferry-borg",
            borg::BUS_NAME,
            borg::OBJECT_PATH,
            borg::INTERFACE,
            "Jobs",
        ),
        (
            "ferry-led",
            led::BUS_NAME,
            led::OBJECT_PATH,
            led::INTERFACE,
            "State",
        ),
        (
            "ferry-notifier",
            notifier::BUS_NAME,
            notifier::OBJECT_PATH,
            notifier::INTERFACE,
            "Pending",
        ),
    ];
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut probers = Vec::new();
    for (service, name, path, interface, property) in probes {
        let conn = system.conn.clone();
        let mut stop = stop_rx.clone();
        probers.push((
            service,
            tokio::spawn(async move {
                let proxy = zbus::fdo::PropertiesProxy::builder(&conn)
                    .destination(name)
                    .and_then(|b| b.path(path))
                    .expect("proxy address")
                    .cache_properties(zbus::proxy::CacheProperties::No)
                    .build()
                    .await
                    .expect("properties proxy");
                let interface =
                    zbus::names::InterfaceName::try_from(interface).expect("interface name");
                let mut samples = Vec::new();
                while !*stop.borrow() {
                    let start = Instant::now();
                    proxy
                        .get(interface.clone(), property)
                        .await
                        .expect("Properties.Get");
                    samples.push(start.elapsed());
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                        _ = stop.changed() => {}
                    }
                }
                samples
            }),
        ));
    }
    let started = Instant::now();
    let borg_proxy = borg::BorgProxy::new(&system.conn).await.expect("Borg1");
    let job = borg_proxy.start(PROFILE).await.expect("Borg1.Start");
    system
        .signals
        .wait_for(
            "BackupFinished",
            |s| s.args[0] == job,
            Duration::from_secs(300),
        )
        .await;
    let before = system.signals.len();
    system.drive.attach();
    system
        .signals
        .wait_for_from(
            before,
            "DriveClosed",
            |s| s.args[0] == DRIVE,
            Duration::from_secs(300),
        )
        .await;
    let before = system.signals.len();
    system.drive.detach();
    system
        .signals
        .wait_for_from(before, "DriveDetached", |s| s.args[0] == DRIVE, WAIT)
        .await;
    let notifier_proxy = notifier::NotifierProxy::new(&system.conn)
        .await
        .expect("Notifier1");
    for _ in 0..100 {
        notifier_proxy.send_test().await.expect("SendTest");
    }
    let busy = started.elapsed();
    let _ = stop_tx.send(true);
    println!(
        "\n## answers while busy: Properties.Get to each service every 5 ms through a {} MiB backup, a first sync, open/close, a pull and 100 mails into the outbox ({:.1} s)",
        dir_size(&system.repository) / (1 << 20),
        busy.as_secs_f64()
    );
    println!(
        "{:<22} {:>8} {:>9} {:>9} {:>9}",
        "service", "answers", "p50 ms", "p99 ms", "max ms"
    );
    for (service, prober) in probers {
        let samples = prober.await.expect("prober");
        let max = samples
            .iter()
            .max()
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
        println!(
            "{:<22} {:>8} {:>9.2} {:>9.2} {:>9.1}",
            service,
            samples.len(),
            pct(&samples, 50),
            pct(&samples, 99),
            max
        );
    }
}
