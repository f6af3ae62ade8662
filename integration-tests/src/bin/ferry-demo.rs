//! The README's main job: the whole of ferry on one machine.
//!
//! A private bus; all six services as separate processes; a real borg
//! repository made from sample data; a backup through Borg1.Start (what the
//! timer does); a plug-in of an enrolled demo drive (a loop device) → open →
//! sync → close → LED done; then a failure — a drive that carries the
//! enrolled UUID but not ferry's identity token → LED failed and a mail to a
//! local SMTP server. Every signal is printed as it happens, a summary at the
//! end, and everything is removed. Nothing is configured by hand.

use std::time::{Duration, Instant};

use ferry_integration_tests::system::{FerrySystem, Options, DRIVE, PROFILE};
use ferry_integration_tests::{have_loop_devices, have_root, have_udevd, LoopImage, Recorded};
use ferry_interfaces::borg::BorgProxy;

const WAIT: Duration = Duration::from_secs(60);

const HELP: &str = "\
usage: ferry-demo   (normally run through ./scripts/demo, which builds it first)

ferry's main job end to end on this machine, as root: a private D-Bus, all six
services as separate processes with a configuration written for the run, a
borg repository made from sample data, a backup through Borg1.Start, an
enrolled demo drive (a loop device) plugged in (open, sync, close, LED done),
then a stranger's drive with the enrolled UUID but no identity token (LED
red, a mail to a local SMTP server). Every signal is printed as it happens.
Everything it made is removed at the end, also when it is interrupted
(Ctrl-C or SIGTERM). Needs root, loop devices and a running systemd-udevd.";

fn main() -> std::process::ExitCode {
    match std::env::args().nth(1).as_deref() {
        None => {}
        Some("-h" | "--help") => {
            println!("{HELP}");
            return std::process::ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("ferry-demo: unknown argument `{other}`; it takes none (try --help)");
            return std::process::ExitCode::from(64);
        }
    }
    if !(have_root() && have_loop_devices() && have_udevd()) {
        println!(
            "ferry's demo plugs in a drive: it needs root, loop devices and a running udevd\n\
             (start it with: /lib/systemd/systemd-udevd --daemon). Missing here:{}{}{}",
            if have_root() { "" } else { " root" },
            if have_loop_devices() {
                ""
            } else {
                " loop-devices"
            },
            if have_udevd() { "" } else { " udevd" }
        );
        return std::process::ExitCode::from(2);
    }
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
    runtime.block_on(until_interrupted(demo()))
}

/// Runs the demo until it ends or the process is asked to stop (Ctrl-C,
/// SIGTERM, a `timeout`). Stopping drops the demo's future, and with it the
/// services, the bus, the loop drives, their mounts and the work directory:
/// their `Drop`s remove what the demo made.
async fn until_interrupted(
    demo: impl std::future::Future<Output = std::process::ExitCode>,
) -> std::process::ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!(
            "ferry-demo: cannot watch for SIGINT/SIGTERM; running without cleanup on interrupt"
        );
        return demo.await;
    };
    let stopped_by = tokio::select! {
        code = demo => return code,
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    println!("\n=== interrupted by {stopped_by}: everything the demo made has been removed");
    std::process::ExitCode::from(130)
}

fn step(text: &str) {
    println!("\n=== {text}");
}

async fn demo() -> std::process::ExitCode {
    let started = Instant::now();
    println!("ferry demo: the whole system on a private bus, nothing configured by hand");
    step("setting up");
    let options = Options {
        log: "warn",
        ..Options::default()
    };
    let mut system = FerrySystem::start(options, &|line| println!("  {line}")).await;
    let printer = tokio::spawn(print_live(system.signals.watch(), system.signals.started()));

    step("a scheduled backup: Borg1.Start(\"demo\"), what ferry-backup@demo.timer does");
    let borg: BorgProxy = match BorgProxy::new(&system.conn).await {
        Ok(proxy) => proxy,
        Err(e) => return fail(&format!("cannot reach org.ferry.Borg1: {e}")),
    };
    let job = match borg.start(PROFILE).await {
        Ok(job) => job,
        Err(e) => return fail(&format!("Borg1.Start failed: {e}")),
    };
    let finished = system
        .signals
        .wait_for("BackupFinished", |s| s.args[0] == job, WAIT)
        .await;
    let archive = finished.args[2].clone();

    step(&format!("plugging in the enrolled drive {DRIVE}"));
    let device = system.drive.attach();
    println!("  {} attached as {device}", system.drive.path().display());
    system
        .signals
        .wait_for("SyncFinished", |s| s.args[0] == DRIVE, WAIT)
        .await;
    system
        .signals
        .wait_for("DriveClosed", |s| s.args[0] == DRIVE, WAIT)
        .await;
    system
        .signals
        .wait_for("ColorChanged", |s| s.args[1] == "done", WAIT)
        .await;
    println!("  the LED is green: {DRIVE} may be pulled");

    step("unplugging it");
    let before = system.signals.len();
    system.drive.detach();
    system
        .signals
        .wait_for_from(before, "ColorChanged", |s| s.args[1] == "idle", WAIT)
        .await;

    step("a failure: a stranger's drive that copies the enrolled UUID but lacks ferry's identity token");
    let mut stranger = LoopImage::ext4(system.work(), 32, &system.drive_uuid, DRIVE);
    let before = system.signals.len();
    stranger.attach();
    let failed = system
        .signals
        .wait_for_from(before, "DriveFailed", |s| s.args[0] == DRIVE, WAIT)
        .await;
    system
        .signals
        .wait_for_from(before, "ColorChanged", |s| s.args[1] == "failed", WAIT)
        .await;
    let mails = system
        .smtp
        .wait_for(1, |m| m.body.contains(&failed.args[2]), WAIT)
        .await;
    println!(
        "  mail received by the SMTP server: {:?}",
        mails[0].subject()
    );
    let before = system.signals.len();
    stranger.detach();
    system
        .signals
        .wait_for_from(before, "DriveDetached", |s| s.args[0] == DRIVE, WAIT)
        .await;

    step("ferryctl status: what a person checking on their backups sees");
    match tokio::process::Command::new(ferry_integration_tests::binary_path("ferryctl"))
        .arg("--address")
        .arg(system.bus.address())
        .arg("status")
        .output()
        .await
    {
        Ok(output) => {
            for line in String::from_utf8_lossy(&output.stdout).lines() {
                println!("  {line}");
            }
        }
        Err(e) => println!("  cannot run ferryctl: {e}"),
    }
    printer.abort();

    step("summary");
    let ferry_signals = system
        .signals
        .all()
        .into_iter()
        .filter(|s| s.interface.starts_with("org.ferry."))
        .count();
    println!(
        "  backup: archive {archive} in {}",
        system.repository.display()
    );
    println!(
        "  archives in the repository now: {}",
        system.archives().join(", ")
    );
    println!(
        "  drive copy: SyncFinished then DriveClosed; mounted now: {}",
        system.drive_mounted()
    );
    println!(
        "  the stranger's drive: DriveFailed at stage {:?}: {}",
        failed.args[1], failed.args[2]
    );
    println!(
        "  mails delivered: {}",
        system
            .smtp
            .mails()
            .iter()
            .map(|m| format!("{:?}", m.subject()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  LED colours, in order: {}",
        system.led_colours().join(" → ")
    );
    println!(
        "  ferry signals: {ferry_signals}; took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "  removing the services, the bus, the loop devices and {}",
        system.work().display()
    );
    drop(stranger);
    drop(system);
    std::process::ExitCode::SUCCESS
}

fn fail(message: &str) -> std::process::ExitCode {
    eprintln!("ferry-demo: {message}");
    std::process::ExitCode::FAILURE
}

/// Prints each ferry signal as it is recorded, with its time since start.
async fn print_live(mut records: tokio::sync::watch::Receiver<Vec<Recorded>>, started: Instant) {
    let mut printed = 0;
    while records.changed().await.is_ok() {
        let all = records.borrow_and_update().clone();
        for record in all.iter().skip(printed).filter(|r| {
            r.interface.starts_with("org.ferry.")
                && r.member != "SyncProgress"
                && r.member != "BackupProgress"
        }) {
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
