//! What ferry tells a person is true (issue 12): stories a user lives
//! through, with the real binaries on a private bus and faults put in.
//!
//! - the LED: a failure belongs to its subject and survives unrelated
//!   successes, a pull, a close and restarts of ferry-led and ferry-crypt;
//!   a re-announced drive is not "working"; power-off never shows idle;
//! - borg: seed 000's borgmatic file (with `~`) under an empty HOME fails
//!   at `sources` naming the file owner's home, never an empty "finished";
//!   borg's warning exit is "finished with warnings" everywhere it shows;
//!   a skipped job is retried and Schedule says so;
//! - the timer's unit: its ExecStart command exits with the job's outcome.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use ferry_integration_tests::{
    binary_path, random_uuid, require_command, LoopImage, ServiceProcess, SignalRecorder, TestBus,
};
use ferry_interfaces::borg::{self, BorgProxy};
use ferry_interfaces::crypt::{self, CryptProxy};
use ferry_interfaces::led::{self, LedProxy};
use ferry_interfaces::{drive_watcher, sync};

/// Long enough for a small borg run on a busy 2-core machine.
const BORG_WAIT: Duration = Duration::from_secs(120);

/// The services these tests start, as (binary, bus name).
const WATCHER_SERVICE: (&str, &str) = ("ferry-drive-watcher", drive_watcher::BUS_NAME);
const CRYPT_SERVICE: (&str, &str) = ("ferry-crypt", crypt::BUS_NAME);
const SYNC_SERVICE: (&str, &str) = ("ferry-sync", sync::BUS_NAME);
const BORG_SERVICE: (&str, &str) = ("ferry-borg", borg::BUS_NAME);
const LED_SERVICE: (&str, &str) = ("ferry-led", led::BUS_NAME);

/// Starts `binary --config CONFIG` and waits for it to own `name`.
async fn start(
    bus: &TestBus,
    conn: &zbus::Connection,
    (binary, name): (&str, &str),
    config: &Path,
    envs: &[(&str, &str)],
) -> ServiceProcess {
    let process = bus.spawn(binary, &["--config", &config.to_string_lossy()], envs);
    process.wait_for_name(conn, name, WAIT).await;
    process
}

/// Kills `process` (SIGKILL: no goodbye) and waits until its bus name is free.
async fn kill(conn: &zbus::Connection, process: ServiceProcess, name: &str) {
    use futures_util::StreamExt;
    let dbus = zbus::fdo::DBusProxy::new(conn).await.expect("DBus proxy");
    let mut changes = dbus
        .receive_name_owner_changed()
        .await
        .expect("NameOwnerChanged");
    process.signal(libc::SIGKILL);
    assert!(
        process.wait_exit(WAIT).await.is_some(),
        "{} did not die",
        process.name()
    );
    let bus_name = zbus::names::BusName::try_from(name.to_string()).expect("bus name");
    let deadline = tokio::time::Instant::now() + WAIT;
    while dbus
        .name_has_owner(bus_name.clone())
        .await
        .expect("NameHasOwner")
    {
        let next = tokio::time::timeout_at(deadline, changes.next()).await;
        assert!(next.is_ok(), "{name} still owned {WAIT:?} after the kill");
    }
}

/// Where ferry-drive-watcher's and ferry-crypt's signals come from.
const WATCHER: (&str, &str) = (drive_watcher::OBJECT_PATH, drive_watcher::INTERFACE);
const CRYPT: (&str, &str) = (crypt::OBJECT_PATH, crypt::INTERFACE);

/// ferry-led alone on `bus` with `drives` configured (the file backend);
/// the test speaks for its peers.
async fn led_alone(
    bus: &TestBus,
    drives: &str,
) -> (zbus::Connection, SignalRecorder, ServiceProcess) {
    let dir = bus.dir();
    let config = write_config(
        dir,
        &format!("{drives}{}", led_file_section(&dir.join("led"))),
    );
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let led = start(bus, &conn, LED_SERVICE, &config, &[]).await;
    (conn, signals, led)
}

async fn led_state(conn: &zbus::Connection) -> (String, String) {
    let proxy: LedProxy = uncached(conn).await;
    (
        proxy.state().await.expect("State"),
        proxy.reason().await.expect("Reason"),
    )
}

/// A borg repository with a passphrase file, sources and BORG_BASE_DIR in `dir`.
struct BorgWorld {
    dir: PathBuf,
}

impl BorgWorld {
    fn new(dir: &Path) -> Option<BorgWorld> {
        if !require_command("borg", "borgbackup") {
            return None;
        }
        let world = BorgWorld {
            dir: dir.to_path_buf(),
        };
        std::fs::write(world.passphrase(), "truth-test-passphrase").expect("passphrase");
        std::fs::set_permissions(
            world.passphrase(),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod");
        let src = dir.join("src");
        std::fs::create_dir_all(&src).expect("src");
        std::fs::write(src.join("note.txt"), "a note\n").expect("file");
        let out = std::process::Command::new("borg")
            .args(["init", "--encryption=repokey"])
            .arg(dir.join("repo"))
            .env("BORG_BASE_DIR", world.base())
            .env(
                "BORG_PASSCOMMAND",
                format!("cat {}", world.passphrase().display()),
            )
            .stdin(std::process::Stdio::null())
            .output()
            .expect("borg init");
        assert!(
            out.status.success(),
            "borg init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(world)
    }

    fn passphrase(&self) -> PathBuf {
        self.dir.join("passphrase")
    }

    fn base(&self) -> String {
        self.dir.join("borg-base").display().to_string()
    }

    /// `[repositories.main]` and a profile `name` backing up the sources.
    fn sections(&self, name: &str) -> String {
        format!(
            "[repositories.main]\npath = \"{}\"\npassphrase-file = \"{}\"\n\n[profiles.{name}]\nrepository = \"main\"\nsources = [\"{}\"]\n\n",
            self.dir.join("repo").display(),
            self.passphrase().display(),
            self.dir.join("src").display()
        )
    }
}

/// Issue 12: a sync fails, then an unrelated backup finishes: the LED
/// stays red. ferry-led restarted after that: still red (from ferry-sync's
/// persisted failure). Acknowledged, then restarted: not red again.
async fn a_failed_sync_stays_red_through_a_backup_and_a_restart_of_the_led() {
    let bus = TestBus::start();
    let Some(world) = BorgWorld::new(bus.dir()) else {
        return;
    };
    let dir = bus.dir();
    let text = format!(
        "[drives.offsite-a]\nuuid = \"{}\"\nmountpoint = \"{}\"\nrepositories = [\"main\"]\n\n{}{}",
        random_uuid(),
        dir.join("mnt/offsite-a").display(),
        world.sections("home"),
        led_file_section(&dir.join("led"))
    );
    let config = write_config(dir, &text);
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let base = world.base();
    let env = [("BORG_BASE_DIR", base.as_str())];
    let led = start(&bus, &conn, LED_SERVICE, &config, &[]).await;
    let _sync = start(&bus, &conn, SYNC_SERVICE, &config, &[]).await;
    let _borg = start(&bus, &conn, BORG_SERVICE, &config, &env).await;

    // ferry-crypt "opened" a drive that is not mounted: the real sync fails.
    emit(
        &conn,
        crypt::OBJECT_PATH,
        crypt::INTERFACE,
        "DriveOpened",
        &(
            "offsite-a",
            dir.join("mnt/offsite-a").to_string_lossy().as_ref(),
        ),
    )
    .await;
    let failed = signals
        .wait_for("SyncFailed", |s| s.args[0] == "offsite-a", WAIT)
        .await;
    signals
        .wait_for("ColorChanged", |s| s.args[1] == "failed", WAIT)
        .await;
    emit(
        &conn,
        crypt::OBJECT_PATH,
        crypt::INTERFACE,
        "DriveClosed",
        &("offsite-a",),
    )
    .await;

    let proxy: BorgProxy = uncached(&conn).await;
    let job = proxy.start("home").await.expect("Start");
    signals
        .wait_for("BackupFinished", |s| s.args[0] == job, BORG_WAIT)
        .await;
    let (state, reason) = led_state(&conn).await;
    assert_eq!(state, "failed", "an unrelated backup cleared it: {reason}");
    assert!(
        reason.starts_with("offsite-a: sync ") && reason.contains(&failed.args[2]),
        "{reason} / {failed}"
    );

    kill(&conn, led, led::BUS_NAME).await;
    let led = start(&bus, &conn, LED_SERVICE, &config, &[]).await;
    let (state, reason) = led_state(&conn).await;
    assert_eq!(state, "failed", "restarted: {reason}\n{}", led.log());
    assert!(reason.contains("offsite-a: sync "), "{reason}");

    let ledp: LedProxy = uncached(&conn).await;
    let n = signals.len();
    ledp.acknowledge().await.expect("Acknowledge");
    signals
        .wait_for_from(n, "ColorChanged", |s| s.args[1] == "idle", WAIT)
        .await;
    kill(&conn, led, led::BUS_NAME).await;
    let _led = start(&bus, &conn, LED_SERVICE, &config, &[]).await;
    assert_eq!(
        led_state(&conn).await.0,
        "idle",
        "an acknowledged failure does not come back after a restart"
    );
}

/// Issue 12: SyncFailed, the drive is pulled, then DriveClosed arrives:
/// red, and after Acknowledge idle — never "safe to remove" for a drive
/// that is gone.
async fn a_failed_drive_pulled_before_its_close_stays_red() {
    let bus = TestBus::start();
    let (conn, signals, _led) = led_alone(&bus, &drive_section("offsite-a", &random_uuid())).await;
    let (w, c) = (WATCHER, CRYPT);
    emit(
        &conn,
        w.0,
        w.1,
        "DriveAttached",
        &("offsite-a", "/dev/x", "u"),
    )
    .await;
    emit(&conn, c.0, c.1, "DriveOpened", &("offsite-a", "/run/x")).await;
    emit(
        &conn,
        sync::OBJECT_PATH,
        sync::INTERFACE,
        "SyncFailed",
        &("offsite-a", "copy", "Input/output error"),
    )
    .await;
    emit(&conn, w.0, w.1, "DriveDetached", &("offsite-a", "u")).await;
    emit(&conn, c.0, c.1, "DriveClosed", &("offsite-a",)).await;
    signals
        .wait_for("ColorChanged", |s| s.args[1] == "failed", WAIT)
        .await;
    // The LED has seen the close once a later signal is through.
    emit(&conn, c.0, c.1, "DriveClosed", &("offsite-b",)).await;
    let n = signals.len();
    signals
        .expect_none_from(n, "ColorChanged", |_| true, QUIET)
        .await;
    assert_eq!(led_state(&conn).await.0, "failed");
    let proxy: LedProxy = uncached(&conn).await;
    proxy.acknowledge().await.expect("Acknowledge");
    signals
        .wait_for_from(n, "ColorChanged", |s| s.args[1] == "idle", WAIT)
        .await;
    assert_eq!(
        signals.count("ColorChanged", |s| s.args[1] == "done"),
        0,
        "{}",
        signals.listing()
    );
}

/// Issue 13: with power-off the detach comes before DriveClosed. The LED
/// goes working → done ("powered off") without idle in between.
async fn power_off_goes_from_working_to_done_without_idle() {
    let bus = TestBus::start();
    let drive = format!(
        "[drives.offsite-p]\nuuid = \"{}\"\npower-off = true\n\n",
        random_uuid()
    );
    let (conn, signals, _led) = led_alone(&bus, &drive).await;
    let (w, c) = (WATCHER, CRYPT);
    emit(
        &conn,
        w.0,
        w.1,
        "DriveAttached",
        &("offsite-p", "/dev/x", "u"),
    )
    .await;
    emit(&conn, c.0, c.1, "DriveOpened", &("offsite-p", "/run/x")).await;
    emit(
        &conn,
        sync::OBJECT_PATH,
        sync::INTERFACE,
        "SyncFinished",
        &("offsite-p", 10u64, 1.0f64),
    )
    .await;
    emit(&conn, w.0, w.1, "DriveDetached", &("offsite-p", "u")).await;
    emit(&conn, c.0, c.1, "DriveClosed", &("offsite-p",)).await;
    signals
        .wait_for("ColorChanged", |s| s.args[1] == "done", WAIT)
        .await;
    let states: Vec<String> = signals
        .all()
        .iter()
        .filter(|s| s.member == "ColorChanged")
        .map(|s| s.args[1].clone())
        .collect();
    assert_eq!(states, ["idle", "working", "done"]);
    assert_eq!(
        led_state(&conn).await.1,
        "powered off, safe to unplug: offsite-p"
    );
}

/// Issue 12: the drive watcher restarts while a closed drive is plugged in
/// and announces it again; nobody reopens it: the LED stays "done", never
/// "working".
async fn a_restarted_watcher_does_not_make_a_closed_drive_working() {
    if !udev_and_loop() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let uuid = random_uuid();
    let config = write_config(
        dir.path(),
        &format!(
            "{}{}",
            drive_section("offsite-a", &uuid),
            led_file_section(&dir.path().join("led"))
        ),
    );
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let watcher = start(&bus, &conn, WATCHER_SERVICE, &config, &[]).await;
    let _led = start(&bus, &conn, LED_SERVICE, &config, &[]).await;
    let mut image = LoopImage::ext4(dir.path(), 16, &uuid, "offsite-a");
    image.attach();
    signals
        .wait_for("ColorChanged", |s| s.args[1] == "working", WAIT)
        .await;
    let c = CRYPT;
    emit(&conn, c.0, c.1, "DriveOpened", &("offsite-a", "/run/x")).await;
    emit(
        &conn,
        sync::OBJECT_PATH,
        sync::INTERFACE,
        "SyncFinished",
        &("offsite-a", 10u64, 1.0f64),
    )
    .await;
    emit(&conn, c.0, c.1, "DriveClosed", &("offsite-a",)).await;
    signals
        .wait_for("ColorChanged", |s| s.args[1] == "done", WAIT)
        .await;

    kill(&conn, watcher, drive_watcher::BUS_NAME).await;
    let n = signals.len();
    let _watcher = start(&bus, &conn, WATCHER_SERVICE, &config, &[]).await;
    signals
        .wait_for_from(n, "DriveAttached", |s| s.args[0] == "offsite-a", WAIT)
        .await;
    signals
        .expect_none_from(n, "ColorChanged", |_| true, QUIET)
        .await;
    assert_eq!(
        led_state(&conn).await,
        ("done".to_string(), "safe to remove: offsite-a".to_string())
    );
}

/// Issue 12: a drive that fails (a stranger's drive: no identity token)
/// stays in Crypt1.LastFailures across a restart of ferry-crypt, and a
/// restarted ferry-led shows it red.
async fn a_drive_failure_survives_restarts_of_crypt_and_led() {
    if !udev_and_loop() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let uuid = random_uuid();
    let config = write_config(
        dir.path(),
        &format!(
            "[crypt]\nkey-directory = \"{}\"\nclose-timeout = 2\n\n[drives.offsite-a]\nuuid = \"{uuid}\"\nmountpoint = \"{}\"\n\n{}",
            dir.path().join("keys").display(),
            dir.path().join("mnt/offsite-a").display(),
            led_file_section(&dir.path().join("led"))
        ),
    );
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let _watcher = start(&bus, &conn, WATCHER_SERVICE, &config, &[]).await;
    let crypt_process = start(&bus, &conn, CRYPT_SERVICE, &config, &[]).await;
    let led = start(&bus, &conn, LED_SERVICE, &config, &[]).await;
    let mut image = LoopImage::ext4(dir.path(), 16, &uuid, "offsite-a");
    image.attach();
    let failed = signals
        .wait_for("DriveFailed", |s| s.args[0] == "offsite-a", WAIT)
        .await;
    signals
        .wait_for("ColorChanged", |s| s.args[1] == "failed", WAIT)
        .await;
    let proxy: CryptProxy = uncached(&conn).await;
    let before = proxy.last_failures().await.expect("LastFailures");
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(
        (before[0].stage.as_str(), before[0].message.as_str()),
        (failed.args[1].as_str(), failed.args[2].as_str())
    );

    kill(&conn, crypt_process, crypt::BUS_NAME).await;
    let _crypt = start(&bus, &conn, CRYPT_SERVICE, &config, &[]).await;
    let proxy: CryptProxy = uncached(&conn).await;
    assert_eq!(
        proxy.last_failures().await.expect("LastFailures"),
        before,
        "the failure survives ferry-crypt's restart"
    );

    kill(&conn, led, led::BUS_NAME).await;
    let _led = start(&bus, &conn, LED_SERVICE, &config, &[]).await;
    let (state, reason) = led_state(&conn).await;
    assert_eq!(state, "failed", "{reason}");
    assert!(
        reason.starts_with(&format!("offsite-a: {}: ", failed.args[1])),
        "{reason}"
    );
}

/// Seed 000's borgmatic YAML, exactly as the write-up shows it.
fn seed_000_yaml() -> Option<String> {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/seeds/000_ff2eb3b7fed013f3.txt")
        .canonicalize()
        .ok()
        .or_else(|| {
            Path::new("/work/shared/seeds/000_ff2eb3b7fed013f3.txt")
                .canonicalize()
                .ok()
        })?;
    let text = std::fs::read_to_string(seed).ok()?;
    let start = text.find("``` yaml\n")? + "``` yaml\n".len();
    let end = start + text[start..].find("```")?;
    Some(text[start..end].to_string())
}

/// The home directory of `uid` in the user database.
fn home_of(uid: u32) -> String {
    let out = std::process::Command::new("getent")
        .args(["passwd", &uid.to_string()])
        .output()
        .expect("getent");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(':')
        .nth(5)
        .expect("a home field")
        .to_string()
}

/// Issue 12: seed 000's borgmatic file, `~` and all, read by ferry-borg
/// running with HOME unset: `~` is the file owner's home (here `nobody`'s,
/// where the sources do not exist), so the job fails at `sources` naming
/// them — never an empty "finished" archive, never /root.
async fn seed_000_with_home_unset_fails_at_sources_in_the_owners_home() {
    if !ferry_integration_tests::require_root() {
        return;
    }
    let Some(yaml) = seed_000_yaml() else {
        assert!(
            !ferry_integration_tests::in_ci(),
            "seed 000 is not beside the repository (../shared/seeds)"
        );
        eprintln!("SKIP: seed 000 is not beside the repository (../shared/seeds)");
        return;
    };
    assert!(yaml.contains("- ~/.gnupg"), "{yaml}");
    let bus = TestBus::start();
    let dir = bus.dir();
    let file = dir.join("borgmatic-config.yaml");
    std::fs::write(&file, &yaml).expect("yaml");
    let nobody = 65534;
    std::os::unix::fs::chown(&file, Some(nobody), Some(nobody)).expect("chown");
    let home = home_of(nobody);
    let config = write_config(
        dir,
        &format!(
            "[profiles.private]\nborgmatic-config = \"{}\"\n",
            file.display()
        ),
    );
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let env = binary_path("ferry-borg");
    let borg_process = bus.spawn(
        "/usr/bin/env",
        &[
            "-u",
            "HOME",
            &env.to_string_lossy(),
            "--config",
            &config.to_string_lossy(),
        ],
        &[],
    );
    borg_process
        .wait_for_name(&conn, borg::BUS_NAME, WAIT)
        .await;
    let proxy: BorgProxy = uncached(&conn).await;
    let job = proxy.start("private").await.expect("Start");
    let failed = signals
        .wait_for("BackupFailed", |s| s.args[0] == job, BORG_WAIT)
        .await;
    assert_eq!(
        failed.args[2],
        "sources",
        "{failed}\n{}",
        borg_process.log()
    );
    for source in [
        ".gnupg",
        ".config/systemd/user",
        "Private/borg",
        "Private/other-important-files",
    ] {
        assert!(
            failed.args[3].contains(&format!("{}/{source}", home.trim_end_matches('/'))),
            "{source} in {failed}"
        );
    }
    assert!(!failed.args[3].contains("/root"), "{failed}");
    assert_eq!(signals.count("BackupFinished", |_| true), 0);
    let results = proxy.last_results().await.expect("LastResults");
    assert_eq!(
        (results[0].outcome.as_str(), results[0].archive.as_str()),
        ("failed", "")
    );
    assert!(
        !borg_process.log().contains("running borg create"),
        "borg never ran:\n{}",
        borg_process.log()
    );
}

/// A borg that does the real work and then reports a warning the way borg
/// does (a WARNING log line, exit 1) for `create`.
fn warning_borg(dir: &Path) -> PathBuf {
    let script = dir.join("borg-that-warns");
    std::fs::write(
        &script,
        "#!/bin/sh\nborg \"$@\"\nrc=$?\nif [ \"$1\" = create ] && [ $rc = 0 ]; then\n  echo '{\"type\": \"log_message\", \"time\": 1, \"message\": \"/src/db.sqlite: file changed while we backed it up\", \"levelname\": \"WARNING\", \"name\": \"borg.archiver\", \"msgid\": null}' >&2\n  exit 1\nfi\nexit $rc\n",
    )
    .expect("script");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    script
}

/// The ExecStart of ferry-backup@.service for `profile`, as systemd would
/// run it: @BINDIR@ and %i filled in, double quotes grouping words.
fn unit_command(profile: &str) -> Vec<String> {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../units/ferry-backup@.service"),
    )
    .expect("unit");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let line = line
        .replace(
            "@BINDIR@",
            &ferry_integration_tests::bin_dir().to_string_lossy(),
        )
        .replace("%i", profile);
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for ch in line.chars() {
        match ch {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Runs the unit's command against the test bus: (exit code, stdout).
async fn run_unit(bus: &TestBus, profile: &str) -> (Option<i32>, String) {
    let words = unit_command(profile);
    let run = tokio::process::Command::new(&words[0])
        .args(&words[1..])
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(BORG_WAIT, run)
        .await
        .expect("the unit's command ends")
        .expect("run the unit's command");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Issue 12: borg's warning exit is "finished with warnings" in the signal,
/// LastResults and the LED's reason; and ferry-backup@'s ExecStart exits
/// with the job's outcome: 0 finished, 2 warnings, 1 failed (sources).
async fn warnings_are_their_own_outcome_and_the_unit_exits_with_the_jobs_outcome() {
    let bus = TestBus::start();
    let Some(world) = BorgWorld::new(bus.dir()) else {
        return;
    };
    let dir = bus.dir();
    let text = format!(
        "[borg]\nprogram = \"{}\"\n\n{}[profiles.broken]\nrepository = \"main\"\nsources = [\"{}\"]\n\n{}",
        warning_borg(dir).display(),
        world.sections("home"),
        dir.join("gone").display(),
        led_file_section(&dir.join("led"))
    );
    let config = write_config(dir, &text);
    std::fs::create_dir_all(dir.join("good")).expect("good dir");
    let good = write_config(
        &dir.join("good"),
        &format!(
            "state-directory = \"{}\"\n{}",
            dir.join("good-state").display(),
            world.sections("home")
        ),
    );
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let base = world.base();
    let env = [("BORG_BASE_DIR", base.as_str())];
    let _led = start(&bus, &conn, LED_SERVICE, &config, &[]).await;
    let borg_process = start(&bus, &conn, BORG_SERVICE, &config, &env).await;

    let (code, out) = run_unit(&bus, "home").await;
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("finished with warnings: archive ") && out.contains("file changed"),
        "{out}"
    );
    let warned = signals
        .wait_for("BackupFinishedWithWarnings", |s| s.args[1] == "home", WAIT)
        .await;
    assert!(
        warned.args[3].contains("file changed while we backed it up"),
        "{warned}"
    );
    assert_eq!(signals.count("BackupFinished", |_| true), 0);
    let proxy: BorgProxy = uncached(&conn).await;
    let results = proxy.last_results().await.expect("LastResults");
    let home = results.iter().find(|r| r.profile == "home").expect("home");
    assert_eq!(home.outcome, "finished-with-warnings");
    assert_eq!(home.archive, warned.args[2]);
    assert!(home.message.contains("file changed"), "{home:?}");
    signals
        .wait_for("ColorChanged", |s| s.args[1] == "failed", WAIT)
        .await;
    let (_, reason) = led_state(&conn).await;
    assert!(
        reason.starts_with("backup home: finished with warnings: ")
            && reason.contains("file changed"),
        "{reason}"
    );

    let (code, out) = run_unit(&bus, "broken").await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("FAILED at sources: ") && out.contains("/gone"),
        "{out}"
    );
    let (code, out) = run_unit(&bus, "nothing-like-it").await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("nothing-like-it"), "{out}");

    // The real borg, no warning: exit 0 with the archive and its size.
    kill(&conn, borg_process, borg::BUS_NAME).await;
    let _borg = start(&bus, &conn, BORG_SERVICE, &good, &env).await;
    let (code, out) = run_unit(&bus, "home").await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("finished: archive ") && out.contains(" files, "),
        "{out}"
    );
}

/// Issue 12: a skipped job is retried after retry-delay, Schedule shows
/// the next attempt and why, the series stops at `retries`, and the retry
/// that can run makes its archive.
async fn a_skipped_job_is_retried_and_schedule_says_when_and_why() {
    let bus = TestBus::start();
    let Some(world) = BorgWorld::new(bus.dir()) else {
        return;
    };
    let dir = bus.dir();
    let flag = dir.join("ready");
    let text = format!(
        "[borg]\nretries = 2\nretry-delay = \"2s\"\n\n{}[profiles.home.preconditions]\nexists = [\"{}\"]\n",
        world.sections("home"),
        flag.display()
    );
    let config = write_config(dir, &text);
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let base = world.base();
    let env = [("BORG_BASE_DIR", base.as_str())];
    let _borg = start(&bus, &conn, BORG_SERVICE, &config, &env).await;
    let proxy: BorgProxy = uncached(&conn).await;

    let first = proxy.start("home").await.expect("Start");
    signals
        .wait_for("BackupSkipped", |s| s.args[0] == first, WAIT)
        .await;
    let schedule = proxy.schedule().await.expect("Schedule");
    let entry = &schedule[0];
    let now = ferry_service::unix_now();
    assert!(
        entry.retry >= now && entry.retry <= now + 3,
        "{entry:?} (now {now})"
    );
    assert!(
        entry
            .retry_reason
            .starts_with("attempt 2 of 3 after attempt 1 skipped: ")
            && entry.retry_reason.contains("ready"),
        "{entry:?}"
    );
    // The retry runs by itself, is skipped again, and plans the last one.
    let second = signals
        .wait_for("BackupStarted", |s| s.args[0] != first, WAIT)
        .await;
    signals
        .wait_for("BackupSkipped", |s| s.args[0] == second.args[0], WAIT)
        .await;
    let entry = proxy.schedule().await.expect("Schedule")[0].clone();
    assert!(
        entry
            .retry_reason
            .starts_with("attempt 3 of 3 after attempt 2 skipped"),
        "{entry:?}"
    );
    std::fs::write(&flag, "").expect("precondition now holds");
    let third = signals
        .wait_for(
            "BackupStarted",
            |s| s.args[0] != first && s.args[0] != second.args[0],
            WAIT,
        )
        .await;
    signals
        .wait_for("BackupFinished", |s| s.args[0] == third.args[0], BORG_WAIT)
        .await;
    let entry = proxy.schedule().await.expect("Schedule")[0].clone();
    assert_eq!(
        (entry.retry, entry.retry_reason.as_str()),
        (0, ""),
        "{entry:?}"
    );
    assert!(entry.last_success >= now, "{entry:?}");
    assert_eq!(signals.count("BackupStarted", |_| true), 3);
}

ferry_integration_tests::integration_tests! {
    async Machine: [
        a_failed_sync_stays_red_through_a_backup_and_a_restart_of_the_led,
        a_failed_drive_pulled_before_its_close_stays_red,
        power_off_goes_from_working_to_done_without_idle,
        a_restarted_watcher_does_not_make_a_closed_drive_working,
        a_drive_failure_survives_restarts_of_crypt_and_led,
        seed_000_with_home_unset_fails_at_sources_in_the_owners_home,
        warnings_are_their_own_outcome_and_the_unit_exits_with_the_jobs_outcome,
        a_skipped_job_is_retried_and_schedule_says_when_and_why,
    ],
}
