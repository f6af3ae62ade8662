//! The README's main job: ferry's services on a private bus, a demo drive
//! plugged in and out, every signal printed as it happens.
//!
//! Nothing is configured by hand: the demo writes its own ferry.toml in a
//! temporary directory, starts a private dbus-daemon, runs the real service
//! binaries against it, and removes everything when it ends.

use std::time::{Duration, Instant};

use ferry_integration_tests::{
    have_loop_devices, have_root, have_udevd, random_uuid, LoopImage, Recorded, SignalRecorder,
    TestBus,
};
use ferry_interfaces::{drive_watcher, led};

const WAIT: Duration = Duration::from_secs(20);

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ferry-demo: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(demo())
}

async fn demo() -> std::process::ExitCode {
    let started = Instant::now();
    println!("ferry demo: the drive watcher and the LED on a private bus\n");
    if !(have_root() && have_loop_devices() && have_udevd()) {
        println!(
            "This demo plugs in a loop-device drive and needs root, loop devices and a running udevd\n\
             (start it with: /lib/systemd/systemd-udevd --daemon). Missing here: {}{}{}",
            if have_root() { "" } else { "root " },
            if have_loop_devices() { "" } else { "loop devices " },
            if have_udevd() { "" } else { "udevd" }
        );
        return std::process::ExitCode::from(2);
    }

    let bus = TestBus::start();
    let work = bus.dir().to_path_buf();
    let uuid = random_uuid();
    let led_file = work.join("led");
    let config = work.join("ferry.toml");
    let text = format!(
        "[drives.demo-offsite]\nuuid = \"{uuid}\"\n\n[led]\nbackend = \"file\"\nfile = \"{}\"\n",
        led_file.display()
    );
    if let Err(e) = std::fs::write(&config, &text) {
        eprintln!("cannot write {}: {e}", config.display());
        return std::process::ExitCode::FAILURE;
    }
    println!(
        "private bus: {}\nconfiguration ({}):\n{}",
        bus.address(),
        config.display(),
        indent(&text)
    );

    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let printer = tokio::spawn(print_live(signals.watch(), signals.started()));
    let config_arg = config.to_string_lossy().into_owned();
    let services = [
        ("ferry-drive-watcher", drive_watcher::BUS_NAME),
        ("ferry-led", led::BUS_NAME),
    ];
    let mut running = Vec::new();
    for (binary, name) in services {
        let process = bus.spawn(binary, &["--config", &config_arg], &[("RUST_LOG", "info")]);
        process.wait_for_name(&conn, name, WAIT).await;
        println!("started {binary} (pid {}), owns {name}", process.pid());
        running.push(process);
    }

    println!("\n--- plugging in the demo drive (a 32 MiB ext4 image on a loop device) ---");
    let mut drive = LoopImage::ext4(&work, 32, &uuid, "demo-offsite");
    let device = drive.attach();
    println!("attached {} as {device}", drive.path().display());
    signals
        .wait_for("DriveAttached", |s| s.args[0] == "demo-offsite", WAIT)
        .await;
    signals
        .wait_for("ColorChanged", |s| s.args[1] == "working", WAIT)
        .await;

    println!("\n--- unplugging it ---");
    drive.detach();
    signals
        .wait_for("DriveDetached", |s| s.args[0] == "demo-offsite", WAIT)
        .await;
    signals
        .wait_for("ColorChanged", |s| s.args[1] == "idle", WAIT)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    printer.abort();

    let ferry_signals: Vec<Recorded> = signals
        .all()
        .into_iter()
        .filter(|s| s.interface.starts_with("org.ferry."))
        .collect();
    let led_colours = std::fs::read_to_string(&led_file).unwrap_or_default();
    println!("\n--- summary ---");
    println!("ferry signals seen: {}", ferry_signals.len());
    println!(
        "LED colours written (file backend):\n{}",
        indent(&led_colours)
    );
    println!(
        "took {:.1} s; the bus, the services, the loop device and {} are removed now",
        started.elapsed().as_secs_f64(),
        work.display()
    );
    drop(drive);
    drop(running);
    drop(bus);
    std::process::ExitCode::SUCCESS
}

/// Prints each ferry signal as it is recorded, with its time since start.
async fn print_live(mut records: tokio::sync::watch::Receiver<Vec<Recorded>>, started: Instant) {
    let mut printed = 0;
    while records.changed().await.is_ok() {
        let all = records.borrow_and_update().clone();
        for record in all
            .iter()
            .skip(printed)
            .filter(|r| r.interface.starts_with("org.ferry."))
        {
            let short = record.interface.trim_start_matches("org.ferry.");
            println!(
                "  {:>7.3}s  {short}.{}({})",
                record.at.duration_since(started).as_secs_f64(),
                record.member,
                record.args.join(", ")
            );
        }
        printed = all.len();
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
