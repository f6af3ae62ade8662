//! ferry-crypt with the real drive watcher, real udev, real loop devices,
//! real mounts and real cryptsetup on a private bus. Drives are prepared
//! with the real `ferry-crypt enroll`. Mapping a LUKS device needs
//! device-mapper, which this kernel may lack: those steps skip with that
//! reason, everything before and after them runs.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use ferry_integration_tests::introspection::assert_matches_contract;
use ferry_integration_tests::{
    binary_path, random_uuid, run, udev_property, LoopImage, Recorded, ServiceProcess,
    SignalRecorder, TestBus,
};
use ferry_interfaces::crypt::{self, CryptProxy};
use ferry_interfaces::{drive_watcher, led, CryptDrive, DriveHealth};

/// The `[crypt]` section every test uses: keys in the test's dir, a short
/// busy timeout.
fn crypt_section(dir: &Path) -> String {
    format!(
        "[crypt]\nkey-directory = \"{}\"\nclose-timeout = 2\n\n",
        dir.join("keys").display()
    )
}

/// Where a test mounts drive `name`.
fn mountpoint(dir: &Path, name: &str) -> PathBuf {
    dir.join("mnt").join(name)
}

/// The mount options at `point` if something is mounted there (this test
/// process shares the host's mount namespace with the services).
fn mounted_at(point: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let point = point.to_string_lossy();
    info.lines()
        .rev()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.len() > 5 && f[4] == point)
        .map(|f| f[5].to_string())
}

/// Whether anything is mounted from `device`.
fn device_mounted(device: &str) -> bool {
    let majmin = std::fs::read_to_string(format!(
        "/sys/class/block/{}/dev",
        device.trim_start_matches("/dev/")
    ))
    .unwrap_or_default();
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .any(|l| l.split(' ').nth(2) == Some(majmin.trim()))
}

/// Runs `ferry-crypt enroll ARGS`; (exit code, stdout, stderr).
fn enroll(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(binary_path("ferry-crypt"))
        .arg("enroll")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ferry-crypt enroll");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A drive enrolled in plain mode by the real command: its image (detached
/// again) and the configuration section it printed.
struct Enrolled {
    image: LoopImage,
    section: String,
    uuid: String,
}

fn enroll_plain(dir: &Path, config: &Path, name: &str) -> Enrolled {
    let mut image = LoopImage::blank(dir, 16);
    let device = image.attach();
    let (code, section, stderr) = enroll(&[
        "--drive",
        name,
        "--plain",
        "--config",
        &config.to_string_lossy(),
        "--yes-destroy-all-data-on",
        &device,
        &device,
    ]);
    assert_eq!(code, Some(0), "enroll failed:\n{stderr}");
    let uuid = section
        .lines()
        .find_map(|l| l.strip_prefix("uuid = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("the section has a uuid")
        .to_string();
    image.detach();
    Enrolled {
        image,
        section,
        uuid,
    }
}

/// Writes ferry.toml: the crypt section, then each drive's section from
/// enrolment with its test mountpoint and any extra lines.
fn configure(dir: &Path, drives: &[(&str, &Enrolled, &str)]) -> PathBuf {
    let mut text = crypt_section(dir);
    for (name, enrolled, extra) in drives {
        text.push_str(&format!(
            "{}mountpoint = \"{}\"\n{extra}\n",
            enrolled.section,
            mountpoint(dir, name).display()
        ));
    }
    write_config(dir, &text)
}

/// The watcher and ferry-crypt, both up.
async fn services(bus: &TestBus, config: &Path) -> (ServiceProcess, ServiceProcess) {
    let conn = bus.connect().await;
    let config = config.to_string_lossy().into_owned();
    let watcher = bus.spawn("ferry-drive-watcher", &["--config", &config], &[]);
    watcher
        .wait_for_name(&conn, drive_watcher::BUS_NAME, WAIT)
        .await;
    let crypt = start_crypt(bus, &config).await;
    (watcher, crypt)
}

async fn start_crypt(bus: &TestBus, config: &str) -> ServiceProcess {
    let conn = bus.connect().await;
    let crypt = bus.spawn("ferry-crypt", &["--config", config], &[]);
    crypt.wait_for_name(&conn, crypt::BUS_NAME, WAIT).await;
    crypt
}

async fn drive_state(conn: &zbus::Connection, name: &str) -> CryptDrive {
    let proxy: CryptProxy = uncached(conn).await;
    proxy
        .drives()
        .await
        .expect("Drives")
        .into_iter()
        .find(|d| d.name == name)
        .expect("the drive is listed")
}

fn named(name: &'static str) -> impl Fn(&Recorded) -> bool {
    move |s| s.args[0] == name
}

/// Mounts `device` at a fresh directory by hand, runs `f` on it, unmounts.
fn by_hand(dir: &Path, device: &str, f: impl FnOnce(&Path)) {
    let point = tempfile::tempdir_in(dir).expect("hand mountpoint");
    run("mount", &[device, &point.path().to_string_lossy()]);
    f(point.path());
    run("umount", &[point.path()]);
}

/// A child process whose working directory is `dir` (so it holds the mount).
struct Holder(Child);

impl Holder {
    fn start(dir: &Path) -> Holder {
        Holder(
            Command::new("sleep")
                .arg("120")
                .current_dir(dir)
                .spawn()
                .expect("start sleep"),
        )
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Unmounts `point` on drop (a test's own mount).
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

/// Emits a Sync1 signal on ferry-sync's behalf.
async fn emit_sync(
    conn: &zbus::Connection,
    member: &str,
    args: &(impl serde::Serialize + zbus::zvariant::DynamicType),
) {
    emit(
        conn,
        ferry_interfaces::sync::OBJECT_PATH,
        ferry_interfaces::sync::INTERFACE,
        member,
        args,
    )
    .await;
}

fn method_error(result: zbus::Result<()>) -> (String, String) {
    match result {
        Err(zbus::Error::MethodError(name, message, _)) => {
            (name.to_string(), message.unwrap_or_default())
        }
        other => panic!("expected a D-Bus error, got {other:?}"),
    }
}

async fn plain_drive_opens_on_attach_is_visible_to_others_and_closes() {
    if !udev_and_loop() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = TestBus::start();
    let base = write_config(dir.path(), &crypt_section(dir.path()));
    let mut a = enroll_plain(dir.path(), &base, "offsite-a");
    let config = configure(dir.path(), &[("offsite-a", &a, "")]);
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let (_watcher, _crypt) = services(&bus, &config).await;
    let point = mountpoint(dir.path(), "offsite-a");

    let device = a.image.attach();
    let attached = signals
        .wait_for("DriveAttached", named("offsite-a"), WAIT)
        .await;
    assert_eq!(
        attached.args[2], a.uuid,
        "udev reports the UUID enrolment printed"
    );
    let opened = signals
        .wait_for("DriveOpened", named("offsite-a"), WAIT)
        .await;
    assert_eq!(opened.args[1], point.to_string_lossy());
    let options = mounted_at(&point).expect("mounted");
    for option in ["rw", "nosuid", "nodev", "noexec"] {
        assert!(
            options.split(',').any(|o| o == option),
            "{option} in {options}"
        );
    }
    // Another process writes and reads there: the mount is in the host's namespace.
    let probe = point.join("probe");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("echo ferry > '{0}' && cat '{0}'", probe.display()))
        .output()
        .expect("sh");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ferry\n", "{out:?}");
    let state = drive_state(&conn, "offsite-a").await;
    assert_eq!(
        (state.state.as_str(), state.device.as_str()),
        ("open", device.as_str())
    );

    let proxy: CryptProxy = uncached(&conn).await;
    proxy.close("offsite-a").await.expect("Close");
    signals
        .wait_for("DriveClosed", named("offsite-a"), WAIT)
        .await;
    assert_eq!(mounted_at(&point), None);
    assert!(!device_mounted(&device));
    assert!(!point.exists(), "the empty mountpoint is removed");
    assert_eq!(drive_state(&conn, "offsite-a").await.state, "closed");

    // A repeated announcement (Rescan) does not reopen a drive that is safe to remove.
    let before = signals.len();
    let watcher: drive_watcher::DriveWatcherProxy = uncached(&conn).await;
    watcher.rescan().await.expect("Rescan");
    signals
        .expect_none_from(before, "DriveOpened", |_| true, QUIET)
        .await;

    // Open by method, then the sync's result closes it; the file is still there.
    proxy.open("offsite-a").await.expect("Open");
    signals
        .wait_for_from(before, "DriveOpened", named("offsite-a"), WAIT)
        .await;
    assert_eq!(std::fs::read_to_string(&probe).expect("probe"), "ferry\n");
    emit_sync(&conn, "SyncFinished", &("offsite-a", 10u64, 1.5f64)).await;
    signals
        .wait_for_from(before, "DriveClosed", named("offsite-a"), WAIT)
        .await;
    assert_eq!(mounted_at(&point), None);
    assert_eq!(
        signals.count("DriveFailed", |_| true),
        0,
        "{}",
        signals.listing()
    );
}

async fn a_busy_drive_names_its_holder_refuses_a_second_request_and_closes_later() {
    if !udev_and_loop() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = TestBus::start();
    let base = write_config(dir.path(), &crypt_section(dir.path()));
    let mut a = enroll_plain(dir.path(), &base, "offsite-a");
    let config = configure(dir.path(), &[("offsite-a", &a, "")]);
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let (_watcher, _crypt) = services(&bus, &config).await;
    let point = mountpoint(dir.path(), "offsite-a");
    a.image.attach();
    signals
        .wait_for("DriveOpened", named("offsite-a"), WAIT)
        .await;

    let holder = Holder::start(&point);
    let proxy: CryptProxy = uncached(&conn).await;
    proxy.close("offsite-a").await.expect("Close");
    let (name, message) = method_error(proxy.open("offsite-a").await);
    assert_eq!(name, "org.ferry.Error.Busy", "{message}");
    let failed = signals
        .wait_for("DriveFailed", named("offsite-a"), WAIT)
        .await;
    assert_eq!(failed.args[1], "close");
    assert!(
        failed.args[2].contains(&format!("pid {} (sleep, working directory)", holder.pid())),
        "{}",
        failed.args[2]
    );
    assert!(
        mounted_at(&point).is_some(),
        "still mounted: never closed while busy"
    );
    assert_eq!(signals.count("DriveClosed", |_| true), 0);
    let state = drive_state(&conn, "offsite-a").await;
    assert_eq!(state.state, "failed");
    assert_eq!(state.message, failed.args[2]);

    drop(holder);
    proxy.close("offsite-a").await.expect("Close again");
    signals
        .wait_for("DriveClosed", named("offsite-a"), WAIT)
        .await;
    assert_eq!(mounted_at(&point), None);
}

async fn a_missing_wrong_or_linked_identity_token_fails_and_writes_nothing() {
    if !udev_and_loop() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = TestBus::start();
    let base = write_config(dir.path(), &crypt_section(dir.path()));
    let mut a = enroll_plain(dir.path(), &base, "offsite-a");
    let mut b = enroll_plain(dir.path(), &base, "offsite-b");
    let host_token = dir.path().join("keys/offsite-a.token");
    let token_a = std::fs::read(&host_token).expect("host token");
    let b_device = b.image.attach();
    let mut token_b = Vec::new();
    by_hand(dir.path(), &b_device, |root| {
        token_b = std::fs::read(root.join(".ferry-identity")).expect("b's token")
    });
    b.image.detach();
    let config = configure(
        dir.path(),
        &[
            ("offsite-a", &a, "open-on-attach = false"),
            ("offsite-b", &b, ""),
        ],
    );
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let (_watcher, _crypt) = services(&bus, &config).await;
    let proxy: CryptProxy = uncached(&conn).await;
    let point = mountpoint(dir.path(), "offsite-a");
    let device = a.image.attach();
    signals
        .wait_for("DriveAttached", named("offsite-a"), WAIT)
        .await;

    type Tamper = Box<dyn Fn(&Path)>;
    let host = host_token.clone();
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "missing",
            Box::new(|root: &Path| std::fs::remove_file(root.join(".ferry-identity")).expect("rm")),
            "carries no ferry identity token",
        ),
        (
            "another drive's",
            Box::new(move |root: &Path| {
                std::fs::write(root.join(".ferry-identity"), &token_b).expect("write")
            }),
            "identity of drive offsite-b",
        ),
        (
            "a link to the host's",
            Box::new(move |root: &Path| {
                let _ = std::fs::remove_file(root.join(".ferry-identity"));
                std::os::unix::fs::symlink(&host, root.join(".ferry-identity")).expect("symlink")
            }),
            "symbolic link",
        ),
    ];
    for (what, tamper, expected) in cases {
        by_hand(dir.path(), &device, |root| tamper(root));
        let image_before = std::fs::read(a.image.path()).expect("image");
        let before = signals.len();
        proxy.open("offsite-a").await.expect("Open");
        let failed = signals
            .wait_for_from(before, "DriveFailed", named("offsite-a"), WAIT)
            .await;
        assert_eq!(failed.args[1], "identity", "{what}: {failed}");
        assert!(
            failed.args[2].contains(expected),
            "{what}: {}",
            failed.args[2]
        );
        assert!(
            failed.args[2].contains("enroll"),
            "{what} says what to do: {}",
            failed.args[2]
        );
        assert_eq!(mounted_at(&point), None, "{what}: nothing left mounted");
        assert!(!device_mounted(&device), "{what}");
        assert!(
            std::fs::read(a.image.path()).expect("image") == image_before,
            "{what}: the drive was written to"
        );
        assert_eq!(signals.count("DriveOpened", |_| true), 0, "{what}");
    }

    // The host's token missing: the message says where it should be.
    by_hand(dir.path(), &device, |root| {
        let _ = std::fs::remove_file(root.join(".ferry-identity"));
        std::fs::write(root.join(".ferry-identity"), &token_a).expect("restore the drive's token")
    });
    std::fs::rename(&host_token, dir.path().join("moved")).expect("move the host token");
    let before = signals.len();
    proxy.open("offsite-a").await.expect("Open");
    let failed = signals
        .wait_for_from(before, "DriveFailed", named("offsite-a"), WAIT)
        .await;
    assert!(
        failed.args[2].contains("this host has no identity token"),
        "{}",
        failed.args[2]
    );

    // Both halves back: it opens.
    std::fs::rename(dir.path().join("moved"), &host_token).expect("restore the host token");
    proxy.open("offsite-a").await.expect("Open");
    signals
        .wait_for("DriveOpened", named("offsite-a"), WAIT)
        .await;
    let failures = proxy.last_failures().await.expect("LastFailures");
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(
        (failures[0].subject.as_str(), failures[0].stage.as_str()),
        ("offsite-a", "identity")
    );
    assert!(failures[0].time > 0);
}

/// A LUKS image made by the test with `key`; returns it attached.
fn luks_image(dir: &Path, uuid: &str, key: &Path) -> (LoopImage, String) {
    let mut image = LoopImage::blank(dir, 32);
    let device = image.attach();
    run(
        "cryptsetup",
        &[
            "luksFormat".as_ref(),
            "--type".as_ref(),
            "luks2".as_ref(),
            "--batch-mode".as_ref(),
            "--pbkdf".as_ref(),
            "pbkdf2".as_ref(),
            "--pbkdf-force-iterations".as_ref(),
            "1000".as_ref(),
            "--uuid".as_ref(),
            uuid.as_ref(),
            "--key-file".as_ref(),
            key.as_os_str(),
            std::ffi::OsStr::new(&device),
        ],
    );
    (image, device)
}

fn write_key(path: &Path, bytes: &[u8], mode: u32) {
    std::fs::write(path, bytes).expect("key");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

async fn luks_wrong_key_and_loose_key_file_fail_at_unlock_and_the_right_key_reaches_the_mapping() {
    if !(udev_and_loop()
        && ferry_integration_tests::require_command("cryptsetup", "cryptsetup-bin"))
    {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = TestBus::start();
    let uuid = random_uuid();
    let (right, key) = (
        dir.path().join("right.key"),
        dir.path().join("offsite-a.key"),
    );
    write_key(&right, b"the right key, not on any command line", 0o600);
    let (_image, device) = luks_image(dir.path(), &uuid, &right);
    write_key(&key, b"some other key", 0o600);
    let config = write_config(
        dir.path(),
        &format!(
            "{}[drives.offsite-a]\nuuid = \"{uuid}\"\nkey-file = \"{}\"\nmountpoint = \"{}\"\n",
            crypt_section(dir.path()),
            key.display(),
            mountpoint(dir.path(), "offsite-a").display()
        ),
    );
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    // The drive is already plugged in: the watcher's coldplug announces it.
    let (_watcher, crypt) = services(&bus, &config).await;
    let failed = signals
        .wait_for("DriveFailed", named("offsite-a"), WAIT)
        .await;
    assert_eq!(failed.args[1], "unlock");
    assert!(
        failed.args[2].contains("does not unlock"),
        "{}",
        failed.args[2]
    );
    assert_eq!(drive_state(&conn, "offsite-a").await.device, device);

    let proxy: CryptProxy = uncached(&conn).await;
    write_key(&key, &std::fs::read(&right).expect("right key"), 0o644);
    let before = signals.len();
    proxy.open("offsite-a").await.expect("Open");
    let failed = signals
        .wait_for_from(before, "DriveFailed", named("offsite-a"), WAIT)
        .await;
    assert_eq!(failed.args[1], "unlock");
    assert!(
        failed.args[2].contains("mode 0644") && failed.args[2].contains("chmod 600"),
        "{}",
        failed.args[2]
    );

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let before = signals.len();
    proxy.open("offsite-a").await.expect("Open");
    let has_mapper = ferry_integration_tests::trials::have_device_mapper();
    if has_mapper {
        // The key is right, but this drive was never given a filesystem and token.
        let failed = signals
            .wait_for_from(before, "DriveFailed", named("offsite-a"), WAIT)
            .await;
        assert_eq!(failed.args[1], "mount", "{failed}");
    } else {
        let failed = signals
            .wait_for_from(before, "DriveFailed", named("offsite-a"), WAIT)
            .await;
        assert_eq!(failed.args[1], "unlock");
        assert!(
            failed.args[2].contains("the key is right") && failed.args[2].contains("device-mapper"),
            "{}",
            failed.args[2]
        );
        // Without device-mapper this is where the flow must stop; the
        // mapping itself is an_enrolled_luks_drive_opens_and_closes_through_its_mapping.
    }
    let log = crypt.log();
    assert!(
        !log.contains("the right key, not on any command line"),
        "the key reached the log"
    );
}

async fn a_mountpoint_in_use_is_refused_and_left_alone() {
    if !udev_and_loop() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = TestBus::start();
    let base = write_config(dir.path(), &crypt_section(dir.path()));
    let mut a = enroll_plain(dir.path(), &base, "offsite-a");
    let config = configure(dir.path(), &[("offsite-a", &a, "")]);
    let point = mountpoint(dir.path(), "offsite-a");
    std::fs::create_dir_all(&point).expect("mountpoint");
    run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=1m",
            "squatter",
            &point.to_string_lossy(),
        ],
    );
    let _squatter = MountGuard(point.clone());
    std::fs::write(point.join("theirs"), "untouched").expect("write");

    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let (_watcher, _crypt) = services(&bus, &config).await;
    let device = a.image.attach();
    let failed = signals
        .wait_for("DriveFailed", named("offsite-a"), WAIT)
        .await;
    assert_eq!(failed.args[1], "mount");
    assert!(
        failed.args[2].contains("already mounted") && failed.args[2].contains("squatter"),
        "{}",
        failed.args[2]
    );
    assert!(!device_mounted(&device));
    assert_eq!(
        std::fs::read_to_string(point.join("theirs")).expect("still there"),
        "untouched"
    );

    // Close leaves a mount that is not the drive's alone, and says closed.
    let proxy: CryptProxy = uncached(&conn).await;
    proxy.close("offsite-a").await.expect("Close");
    signals
        .wait_for("DriveClosed", named("offsite-a"), WAIT)
        .await;
    assert!(mounted_at(&point).is_some(), "the tmpfs is still mounted");
}

/// Drive `offsite-a`, plain, opened by ferry-crypt under its own watcher,
/// with a process holding its mountpoint (a shell whose working directory
/// it is). Fields drop in order: the holder first, the image last.
struct HeldOpen {
    holder: Holder,
    point: PathBuf,
    device: String,
    _services: (ServiceProcess, ServiceProcess),
    signals: SignalRecorder,
    conn: zbus::Connection,
    a: Enrolled,
    _bus: TestBus,
}

impl HeldOpen {
    /// Enrols, configures (with `close_timeout` seconds if given), starts
    /// the services, plugs the drive in, waits for DriveOpened and holds it.
    async fn start(dir: &Path, close_timeout: Option<u32>) -> HeldOpen {
        let bus = TestBus::start();
        let base = write_config(dir, &crypt_section(dir));
        let mut a = enroll_plain(dir, &base, "offsite-a");
        let config = configure(dir, &[("offsite-a", &a, "")]);
        if let Some(seconds) = close_timeout {
            let text = std::fs::read_to_string(&config).expect("config");
            let changed = text.replace(
                "close-timeout = 2\n",
                &format!("close-timeout = {seconds}\n"),
            );
            assert_ne!(text, changed, "the crypt section sets close-timeout = 2");
            std::fs::write(&config, changed).expect("config");
        }
        let conn = bus.connect().await;
        let signals = SignalRecorder::new(&conn).await;
        let services = services(&bus, &config).await;
        let point = mountpoint(dir, "offsite-a");
        let device = a.image.attach();
        signals
            .wait_for("DriveOpened", named("offsite-a"), WAIT)
            .await;
        let holder = Holder::start(&point);
        HeldOpen {
            holder,
            point,
            device,
            _services: services,
            signals,
            conn,
            a,
            _bus: bus,
        }
    }

    /// Pulls the drive out while held: it is reported removed (naming the
    /// holder), lazily unmounted, failed, and never "safe to remove".
    async fn yank_and_see_it_removed(&self) {
        yank(&self.a.image, &self.device);
        let signals = &self.signals;
        signals
            .wait_for("DriveDetached", named("offsite-a"), WAIT)
            .await;
        let failed = signals
            .wait_for("DriveFailed", named("offsite-a"), WAIT)
            .await;
        assert_eq!(failed.args[1], "removed", "{failed:?}");
        assert!(
            failed.args[2].contains("was removed while it was open")
                && failed.args[2].contains(&format!("pid {} (sleep", self.holder.pid())),
            "{}",
            failed.args[2]
        );
        assert_eq!(mounted_at(&self.point), None, "lazily unmounted");
        assert_eq!(
            signals.count("DriveClosed", |_| true),
            0,
            "never 'safe to remove' for a drive pulled while mounted"
        );
        let state = drive_state(&self.conn, "offsite-a").await;
        assert_eq!(
            (state.state.as_str(), state.device.as_str()),
            ("failed", "")
        );
    }
}

async fn a_drive_pulled_out_while_open_is_unmounted_and_reported() {
    if !udev_and_loop() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let held = HeldOpen::start(dir.path(), None).await;
    held.yank_and_see_it_removed().await;
}

/// The medium of `image` (on `device`) vanishes: the image shrinks to
/// nothing and the loop device reports size 0, so udev loses its UUID, as
/// with a yanked disk.
fn yank(image: &LoopImage, device: &str) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(image.path())
        .and_then(|f| f.set_len(0))
        .expect("truncate the image");
    run("losetup", &["-c", device]);
}

async fn a_drive_pulled_while_its_close_waits_for_a_busy_mount_is_reported_at_once() {
    if !udev_and_loop() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    // A close-timeout far longer than the wait below: the removal must be
    // reported when it happens, not when the close gives up.
    let held = HeldOpen::start(dir.path(), Some(300)).await;
    let signals = &held.signals;
    let before = signals.len();
    let proxy: CryptProxy = uncached(&held.conn).await;
    proxy.close("offsite-a").await.expect("Close");
    signals
        .wait_for_from(
            before,
            "PropertiesChanged",
            |r| r.path == crypt::OBJECT_PATH && r.args.iter().any(|a| a.contains("closing")),
            WAIT,
        )
        .await;
    held.yank_and_see_it_removed().await;
}

async fn killed_and_restarted_it_adopts_and_announces_an_open_drive_and_closes_a_stray_mount() {
    if !udev_and_loop() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = TestBus::start();
    let base = write_config(dir.path(), &crypt_section(dir.path()));
    let mut a = enroll_plain(dir.path(), &base, "offsite-a");
    let mut b = enroll_plain(dir.path(), &base, "offsite-b");
    let config = configure(
        dir.path(),
        &[
            ("offsite-a", &a, ""),
            ("offsite-b", &b, "open-on-attach = false"),
        ],
    );
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let (_watcher, crypt) = services(&bus, &config).await;
    let (point_a, point_b) = (
        mountpoint(dir.path(), "offsite-a"),
        mountpoint(dir.path(), "offsite-b"),
    );
    a.image.attach();
    signals
        .wait_for("DriveOpened", named("offsite-a"), WAIT)
        .await;
    std::fs::write(point_a.join("kept"), "still here").expect("write");
    // offsite-b is mounted by hand at its mountpoint, without ferry's options.
    let device_b = b.image.attach();
    signals
        .wait_for("DriveAttached", named("offsite-b"), WAIT)
        .await;
    std::fs::create_dir_all(&point_b).expect("mkdir");
    run("mount", &[device_b.as_str(), &point_b.to_string_lossy()]);

    crypt.signal(libc::SIGKILL);
    crypt.wait_exit(WAIT).await.expect("killed");
    assert!(mounted_at(&point_a).is_some(), "a SIGKILL leaves the mount");
    let before = signals.len();
    let crypt = start_crypt(&bus, &config.to_string_lossy()).await;
    signals
        .wait_for_from(before, "DriveClosed", named("offsite-b"), WAIT)
        .await;
    assert_eq!(mounted_at(&point_b), None);
    let log = crypt.log();
    assert!(
        log.contains("offsite-a: found open") && log.contains("adopted"),
        "{log}"
    );
    assert!(
        log.contains("offsite-b: found left behind") && log.contains("closing it"),
        "{log}"
    );
    assert_eq!(drive_state(&conn, "offsite-a").await.state, "open");
    assert_eq!(
        std::fs::read_to_string(point_a.join("kept")).expect("kept"),
        "still here"
    );
    // Announced again, so the flow (sync, then close) goes on.
    signals
        .wait_for_from(before, "DriveOpened", named("offsite-a"), WAIT)
        .await;

    // The adopted drive closes like any other.
    emit_sync(&conn, "SyncFailed", &("offsite-a", "copy", "disk full")).await;
    signals
        .wait_for_from(before, "DriveClosed", named("offsite-a"), WAIT)
        .await;
    assert_eq!(mounted_at(&point_a), None);
}

/// Kills ferry-crypt (if given), runs `meanwhile`, and leaves `device` as
/// if ferry-crypt had been killed in the middle of opening it: mounted
/// read-only at its mountpoint `point`.
async fn kill_mid_open(
    crypt: Option<ServiceProcess>,
    device: &str,
    point: &Path,
    meanwhile: impl FnOnce(),
) -> MountGuard {
    if let Some(crypt) = crypt {
        crypt.signal(libc::SIGKILL);
        crypt.wait_exit(WAIT).await.expect("killed");
    }
    let _ = Command::new("umount")
        .arg(point)
        .stderr(Stdio::null())
        .status();
    meanwhile();
    std::fs::create_dir_all(point).expect("mkdir");
    run(
        "mount",
        &[
            "-o",
            "ro,nosuid,nodev,noexec",
            device,
            &point.to_string_lossy(),
        ],
    );
    MountGuard(point.to_path_buf())
}

async fn killed_mid_open_it_opens_again_proving_identity_and_adopts_a_late_mount() {
    if !udev_and_loop() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = TestBus::start();
    let base = write_config(dir.path(), &crypt_section(dir.path()));
    let mut a = enroll_plain(dir.path(), &base, "offsite-a");
    let config = configure(dir.path(), &[("offsite-a", &a, "")]);
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let (_watcher, crypt) = services(&bus, &config).await;
    let point = mountpoint(dir.path(), "offsite-a");
    let device = a.image.attach();
    signals
        .wait_for("DriveOpened", named("offsite-a"), WAIT)
        .await;
    let rw = || mounted_at(&point).is_some_and(|o| o.split(',').any(|o| o == "rw"));

    // Half open, ours: opened again from scratch, never "closed".
    let _guard = kill_mid_open(Some(crypt), &device, &point, || {}).await;
    let before = signals.len();
    let crypt = start_crypt(&bus, &config.to_string_lossy()).await;
    signals
        .wait_for_from(before, "DriveOpened", named("offsite-a"), WAIT)
        .await;
    assert!(rw(), "{:?}", mounted_at(&point));
    assert_eq!(drive_state(&conn, "offsite-a").await.state, "open");
    assert!(crypt.log().contains("opening it again"), "{}", crypt.log());
    assert_eq!(signals.count("DriveClosed", |_| true), 0);

    // Half open, a stranger (no token): the identity is proven again.
    let mut token = Vec::new();
    let _guard = kill_mid_open(Some(crypt), &device, &point, || {
        by_hand(dir.path(), &device, |root| {
            token = std::fs::read(root.join(".ferry-identity")).expect("token");
            std::fs::remove_file(root.join(".ferry-identity")).expect("rm token");
        })
    })
    .await;
    let before = signals.len();
    let _crypt = start_crypt(&bus, &config.to_string_lossy()).await;
    let failed = signals
        .wait_for_from(before, "DriveFailed", named("offsite-a"), WAIT)
        .await;
    assert_eq!(failed.args[1], "identity", "{failed}");
    assert_eq!(mounted_at(&point), None, "a stranger is left unmounted");
    assert_eq!(signals.count("DriveClosed", |_| true), 0);

    // A mount that finished late (a killed predecessor's `mount`): Open
    // adopts it after checking the token, instead of failing at "mount".
    let _guard = kill_mid_open(None, &device, &point, || {
        by_hand(dir.path(), &device, |root| {
            std::fs::write(root.join(".ferry-identity"), &token).expect("restore token")
        })
    })
    .await;
    let before = signals.len();
    let proxy: CryptProxy = uncached(&conn).await;
    proxy.open("offsite-a").await.expect("Open");
    signals
        .wait_for_from(before, "DriveOpened", named("offsite-a"), WAIT)
        .await;
    assert!(rw(), "{:?}", mounted_at(&point));
    emit_sync(&conn, "SyncFinished", &("offsite-a", 0u64, 0.5f64)).await;
    signals
        .wait_for_from(before, "DriveClosed", named("offsite-a"), WAIT)
        .await;
    assert_eq!(mounted_at(&point), None);
}

async fn two_drives_plugged_in_together_open_and_close_independently() {
    if !udev_and_loop() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = TestBus::start();
    let base = write_config(dir.path(), &crypt_section(dir.path()));
    let mut a = enroll_plain(dir.path(), &base, "offsite-a");
    let mut b = enroll_plain(dir.path(), &base, "offsite-b");
    let config = configure(dir.path(), &[("offsite-a", &a, ""), ("offsite-b", &b, "")]);
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let (_watcher, _crypt) = services(&bus, &config).await;
    a.image.attach();
    b.image.attach();
    for name in ["offsite-a", "offsite-b"] {
        let opened = signals
            .wait_for("DriveOpened", move |s| s.args[0] == name, WAIT)
            .await;
        assert_eq!(
            opened.args[1],
            mountpoint(dir.path(), name).to_string_lossy()
        );
        assert!(mounted_at(&mountpoint(dir.path(), name)).is_some());
    }
    emit_sync(&conn, "SyncFinished", &("offsite-b", 1u64, 0.5f64)).await;
    signals
        .wait_for("DriveClosed", named("offsite-b"), WAIT)
        .await;
    assert!(
        mounted_at(&mountpoint(dir.path(), "offsite-a")).is_some(),
        "a is still open"
    );
    assert_eq!(drive_state(&conn, "offsite-a").await.state, "open");
    emit_sync(&conn, "SyncFinished", &("offsite-a", 1u64, 0.5f64)).await;
    signals
        .wait_for("DriveClosed", named("offsite-a"), WAIT)
        .await;
    for name in ["offsite-a", "offsite-b"] {
        assert_eq!(mounted_at(&mountpoint(dir.path(), name)), None);
    }
}

async fn plain_enrolment_refuses_until_confirmed_and_prepares_a_drive_that_opens() {
    if !udev_and_loop() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = TestBus::start();
    let base = write_config(dir.path(), &crypt_section(dir.path()));
    let base_arg = base.to_string_lossy().into_owned();
    let mut image = LoopImage::ext4(dir.path(), 16, &random_uuid(), "precious");
    let device = image.attach();
    let common = [
        "--drive",
        "offsite-a",
        "--plain",
        "--config",
        base_arg.as_str(),
    ];

    let (code, _, stderr) = enroll(&[&common[..], &[device.as_str()]].concat());
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&format!("--yes-destroy-all-data-on {device}")),
        "{stderr}"
    );
    let (code, _, stderr) = enroll(
        &[
            &common[..],
            &[
                "--yes-destroy-all-data-on",
                "/dev/loop-other",
                device.as_str(),
            ],
        ]
        .concat(),
    );
    assert_eq!(code, Some(1));
    assert!(stderr.contains("nothing was erased"), "{stderr}");
    let point = dir.path().join("busy");
    std::fs::create_dir(&point).expect("mkdir");
    run("mount", &[device.as_str(), &point.to_string_lossy()]);
    let guard = MountGuard(point.clone());
    let confirmed = [
        &common[..],
        &[
            "--yes-destroy-all-data-on",
            device.as_str(),
            device.as_str(),
        ],
    ]
    .concat();
    let (code, _, stderr) = enroll(&confirmed);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("is mounted at"), "{stderr}");
    drop(guard);
    ferry_integration_tests::udev_settle();
    assert_eq!(
        udev_property(&device, "ID_FS_LABEL").as_deref(),
        Some("precious"),
        "nothing was erased"
    );

    let (code, section, stderr) = enroll(&confirmed);
    assert_eq!(code, Some(0), "{stderr}");
    let uuid = section
        .lines()
        .find_map(|l| l.strip_prefix("uuid = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("uuid")
        .to_string();
    ferry_integration_tests::udev_settle();
    assert_eq!(
        udev_property(&device, "ID_FS_UUID").as_deref(),
        Some(uuid.as_str())
    );
    assert_eq!(
        udev_property(&device, "ID_FS_LABEL").as_deref(),
        Some("offsite-a")
    );
    let token = dir.path().join("keys/offsite-a.token");
    assert_eq!(
        std::fs::metadata(&token)
            .expect("token")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    by_hand(dir.path(), &device, |root| {
        let on_drive = root.join(".ferry-identity");
        assert_eq!(
            std::fs::read(&on_drive).expect("drive token"),
            std::fs::read(&token).expect("host token")
        );
        assert_eq!(
            std::fs::metadata(&on_drive)
                .expect("meta")
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    });
    let (code, _, stderr) = enroll(&confirmed);
    assert_eq!(code, Some(1), "a second enrolment under the same name");
    assert!(stderr.contains("already exists"), "{stderr}");
    image.detach();

    // The printed section, pasted into ferry.toml, is all the service needs.
    let enrolled = Enrolled {
        image,
        section,
        uuid,
    };
    let config = configure(dir.path(), &[("offsite-a", &enrolled, "")]);
    let mut image = enrolled.image;
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let (_watcher, _crypt) = services(&bus, &config).await;
    image.attach();
    signals
        .wait_for("DriveOpened", named("offsite-a"), WAIT)
        .await;
}

/// A blank 32 MiB loop drive, attached, enrolled as offsite-a with LUKS:
/// the image, its device, and enroll's (exit code, section, stderr).
fn enroll_blank_luks(dir: &Path) -> (LoopImage, String, (Option<i32>, String, String)) {
    let base = write_config(dir, &crypt_section(dir));
    let mut image = LoopImage::blank(dir, 32);
    let device = image.attach();
    let enrolled = enroll(&[
        "--drive",
        "offsite-a",
        "--config",
        &base.to_string_lossy(),
        "--yes-destroy-all-data-on",
        &device,
        &device,
    ]);
    (image, device, enrolled)
}

async fn luks_enrolment_backs_up_a_restorable_header_and_stops_at_the_mapping_without_device_mapper(
) {
    if !(udev_and_loop()
        && ferry_integration_tests::require_command("cryptsetup", "cryptsetup-bin"))
    {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (_image, device, (code, section, stderr)) = enroll_blank_luks(dir.path());
    let keys = dir.path().join("keys");
    let (key, header) = (keys.join("offsite-a.key"), keys.join("offsite-a.header"));
    assert_eq!(
        std::fs::metadata(&key)
            .expect("key file")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(std::fs::metadata(&key).expect("key").len(), 64);
    assert!(header.is_file(), "header backup beside the key");
    let luks_uuid = run("cryptsetup", &["luksUUID", device.as_str()])
        .trim()
        .to_string();
    let has_mapper = ferry_integration_tests::trials::have_device_mapper();
    if has_mapper {
        assert_eq!(code, Some(0), "{stderr}");
        assert!(
            section.contains(&format!("uuid = \"{luks_uuid}\"")),
            "{section}"
        );
        assert!(
            section.contains(&format!("key-file = \"{}\"", key.display())),
            "{section}"
        );
    } else {
        assert_eq!(code, Some(1));
        assert!(
            stderr.contains("no device-mapper")
                && stderr.contains(&key.to_string_lossy().into_owned()),
            "{stderr}"
        );
    }
    let test_key = || {
        Command::new("cryptsetup")
            .args(["open", "--test-passphrase", "--key-file"])
            .arg(&key)
            .arg(&device)
            .stderr(Stdio::null())
            .status()
            .expect("cryptsetup")
            .success()
    };
    assert!(test_key(), "the new key file unlocks the drive");
    ferry_integration_tests::udev_settle();
    assert_eq!(
        udev_property(&device, "ID_FS_UUID").as_deref(),
        Some(luks_uuid.as_str())
    );

    // Zero the header: the drive is lost; restore it from the backup: it is back.
    {
        use std::io::Write;
        let mut disk = std::fs::OpenOptions::new()
            .write(true)
            .open(&device)
            .expect("open device");
        disk.write_all(&vec![0u8; 16 * 1024 * 1024])
            .expect("zero the header");
        disk.sync_all().expect("sync");
    }
    assert!(!test_key(), "a zeroed header opens with nothing");
    run(
        "cryptsetup",
        &[
            "luksHeaderRestore".as_ref(),
            "--batch-mode".as_ref(),
            std::ffi::OsStr::new(&device),
            "--header-backup-file".as_ref(),
            header.as_os_str(),
        ],
    );
    assert!(test_key(), "the restored header opens with the key");
    assert_eq!(
        run("cryptsetup", &["luksUUID", device.as_str()]).trim(),
        luks_uuid
    );
}

/// Past the mapping (a kernel with device-mapper; the VM tier runs the
/// same steps under real systemd): an enrolled LUKS drive opens and closes
/// through ferry-crypt, and its mapping is gone afterwards.
async fn an_enrolled_luks_drive_opens_and_closes_through_its_mapping() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut image, _device, (code, section, stderr)) = enroll_blank_luks(dir.path());
    assert_eq!(code, Some(0), "{stderr}");
    image.detach();
    let bus = TestBus::start();
    let config = write_config(
        dir.path(),
        &format!(
            "{}{section}mountpoint = \"{}\"\n",
            crypt_section(dir.path()),
            mountpoint(dir.path(), "offsite-a").display()
        ),
    );
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let (_watcher, _crypt) = services(&bus, &config).await;
    image.attach();
    signals
        .wait_for("DriveOpened", named("offsite-a"), WAIT)
        .await;
    let proxy: CryptProxy = uncached(&conn).await;
    proxy.close("offsite-a").await.expect("Close");
    signals
        .wait_for("DriveClosed", named("offsite-a"), WAIT)
        .await;
    assert!(!Path::new("/dev/mapper/ferry-offsite-a").exists());
}

async fn the_interface_matches_its_xml_and_refuses_unknown_and_absent_drives() {
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        dir.path(),
        &format!(
            "{}{}\nmountpoint = \"{}\"\n",
            crypt_section(dir.path()),
            drive_section("offsite-a", &random_uuid()).trim_end(),
            mountpoint(dir.path(), "offsite-a").display()
        ),
    );
    let conn = bus.connect().await;
    let _crypt = start_crypt(&bus, &config.to_string_lossy()).await;
    assert_matches_contract(&conn, crypt::INTERFACE).await;

    let proxy: CryptProxy = uncached(&conn).await;
    let (name, message) = method_error(proxy.open("nope").await);
    assert_eq!(name, "org.ferry.Error.UnknownDrive");
    assert!(
        message.contains("\"nope\"") && message.contains("offsite-a"),
        "{message}"
    );
    let (name, message) = method_error(proxy.close("../etc").await);
    assert_eq!(name, "org.ferry.Error.UnknownDrive", "{message}");
    let (name, message) = method_error(proxy.open("offsite-a").await);
    assert_eq!(name, "org.ferry.Error.NotAttached");
    assert!(message.contains("not plugged in"), "{message}");
    let drives = proxy.drives().await.expect("Drives");
    assert_eq!(
        drives,
        vec![CryptDrive {
            name: "offsite-a".into(),
            state: "absent".into(),
            mountpoint: mountpoint(dir.path(), "offsite-a")
                .to_string_lossy()
                .into_owned(),
            device: String::new(),
            message: String::new(),
        }]
    );
    assert!(proxy
        .last_failures()
        .await
        .expect("LastFailures")
        .is_empty());
}

/// A stand-in for smartctl (configured as `[crypt] smartctl`): records its
/// arguments and prints a recorded `smartctl --json` output with its exit
/// status, as the real one does for that drive. The test swaps the output.
struct FakeSmartctl {
    dir: PathBuf,
}

impl FakeSmartctl {
    fn new(dir: &Path) -> FakeSmartctl {
        let dir = dir.join("smartctl");
        std::fs::create_dir_all(&dir).expect("smartctl dir");
        let script = dir.join("smartctl");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$@\" >> '{0}/args'\ncat '{0}/output.json'\nexit $(cat '{0}/exit')\n",
                dir.display()
            ),
        )
        .expect("script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        FakeSmartctl { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("smartctl")
    }

    /// From now on it prints `services/crypt/tests/smartctl/<name>.json`.
    fn says(&self, name: &str, exit: i32) {
        let recorded = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../services/crypt/tests/smartctl")
            .join(format!("{name}.json"));
        std::fs::copy(recorded, self.dir.join("output.json")).expect("recorded output");
        std::fs::write(self.dir.join("exit"), exit.to_string()).expect("exit");
    }

    fn args(&self) -> String {
        std::fs::read_to_string(self.dir.join("args")).unwrap_or_default()
    }
}

fn health_of(dir: &Path, drive: &str) -> ferry_service::health_ledger::HealthRecord {
    let ledger = ferry_service::health_ledger::path(&dir.join("state"));
    ferry_service::health_ledger::load(&ledger).expect("ledger")[drive].clone()
}

/// Crypt1.Health's reading of `drive`.
async fn health_property(conn: &zbus::Connection, drive: &str) -> DriveHealth {
    let proxy: CryptProxy = uncached(conn).await;
    let all = proxy.health().await.expect("Health");
    let names: Vec<&str> = all.iter().map(|h| h.drive.as_str()).collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted: {names:?}");
    all.into_iter()
        .find(|h| h.drive == drive)
        .unwrap_or_else(|| panic!("no reading of {drive} in Crypt1.Health"))
}

/// The LED's Reason once a PropertiesChanged of Led1 carries `text`.
async fn led_reason_with(signals: &SignalRecorder, from: usize, text: &str) -> String {
    let changed = signals
        .wait_for_from(
            from,
            "PropertiesChanged",
            |r| r.path == led::OBJECT_PATH && r.args.iter().any(|a| a.contains(text)),
            WAIT,
        )
        .await;
    changed.args.join(" ")
}

/// `ferryctl status`'s text on `bus`.
fn status_text(bus: &TestBus, config: &Path) -> String {
    let output = Command::new(binary_path("ferryctl"))
        .arg("--address")
        .arg(bus.address())
        .arg("--config")
        .arg(config)
        .arg("status")
        .output()
        .expect("run ferryctl");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn smart_health_is_read_before_opening_and_a_failing_drive_is_refused_or_warned_about() {
    if !udev_and_loop() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let bus = TestBus::start();
    let smartctl = FakeSmartctl::new(dir.path());
    smartctl.says("failing", 8);
    let base = write_config(dir.path(), &crypt_section(dir.path()));
    let mut a = enroll_plain(dir.path(), &base, "offsite-a");
    let mut b = enroll_plain(dir.path(), &base, "offsite-b");
    let text = crypt_section(dir.path()).replace(
        "[crypt]\n",
        &format!("[crypt]\nsmartctl = \"{}\"\n", smartctl.path().display()),
    );
    let mut config_text = text + &led_file_section(&dir.path().join("led"));
    for (name, enrolled, policy) in [("offsite-a", &a, "refuse"), ("offsite-b", &b, "warn")] {
        config_text.push_str(&format!(
            "{}mountpoint = \"{}\"\nhealth = \"{policy}\"\n\n",
            enrolled.section,
            mountpoint(dir.path(), name).display()
        ));
    }
    let config = write_config(dir.path(), &config_text);
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let (_watcher, crypt) = services(&bus, &config).await;
    let _led = bus.spawn("ferry-led", &["--config", &config.to_string_lossy()], &[]);
    _led.wait_for_name(&conn, led::BUS_NAME, WAIT).await;

    // Failing under "refuse": DriveFailed at stage health, never mounted.
    let device = a.image.attach();
    let failed = signals
        .wait_for("DriveFailed", named("offsite-a"), WAIT)
        .await;
    assert_eq!(failed.args[1], "health", "{failed:?}");
    assert!(
        failed.args[2].contains("failing") && failed.args[2].contains("1872 reallocated sectors"),
        "{failed:?}"
    );
    assert_eq!(mounted_at(&mountpoint(dir.path(), "offsite-a")), None);
    assert!(!device_mounted(&device));
    assert!(
        smartctl
            .args()
            .contains(&format!("--json --info --health --attributes {device}")),
        "{}",
        smartctl.args()
    );
    let record = health_of(dir.path(), "offsite-a");
    assert_eq!(
        (record.verdict.as_str(), record.decision.as_str()),
        ("failing", "refuse")
    );
    assert_eq!(record.pending, Some(24));
    // Crypt1.Health says the same, with the figures by name.
    let shown = health_property(&conn, "offsite-a").await;
    assert_eq!(
        (shown.verdict.as_str(), shown.decision.as_str()),
        ("failing", "refuse")
    );
    assert_eq!(shown.device, device);
    assert_eq!(shown.figures["reallocated-sectors"], 1872);
    assert_eq!(shown.figures["pending-sectors"], 24);
    assert!(shown.summary.contains("FAILED"), "{shown:?}");

    // Failing under "warn": opened; the warning is in the ledger, in
    // Crypt1.Health, in the LED's reason (without turning it red) and in
    // ferryctl status.
    let before = signals.len();
    b.image.attach();
    signals
        .wait_for("DriveOpened", named("offsite-b"), WAIT)
        .await;
    let record = health_of(dir.path(), "offsite-b");
    assert_eq!(
        (record.verdict.as_str(), record.decision.as_str()),
        ("failing", "warn")
    );
    let shown = health_property(&conn, "offsite-b").await;
    assert_eq!(
        (shown.verdict.as_str(), shown.decision.as_str()),
        ("failing", "warn")
    );
    let reason = led_reason_with(&signals, before, "health warning: ").await;
    assert!(
        reason.contains("offsite-b: health failing (SMART overall health FAILED"),
        "{reason}"
    );
    assert!(!reason.contains("health warning: offsite-a"), "{reason}");
    let status = status_text(&bus, &config);
    assert!(
        status.contains("HEALTH FAILING (SMART overall health FAILED")
            && status.contains("used anyway")
            && status.contains("the drive is refused"),
        "{status}"
    );

    // Healthy now: the refused drive opens.
    smartctl.says("healthy", 0);
    let proxy: CryptProxy = uncached(&conn).await;
    proxy.open("offsite-a").await.expect("Open");
    signals
        .wait_for("DriveOpened", named("offsite-a"), WAIT)
        .await;
    let record = health_of(dir.path(), "offsite-a");
    assert_eq!(
        (record.verdict.as_str(), record.decision.as_str()),
        ("passed", "open")
    );
    assert_eq!(record.power_on_hours, Some(8766));
    let shown = health_property(&conn, "offsite-a").await;
    assert_eq!(shown.verdict, "passed");
    assert_eq!(shown.figures["power-on-hours"], 8766);
    assert_eq!(shown.figures["temperature-celsius"], 34);
    let status = status_text(&bus, &config);
    assert!(
        status.contains("health passed (SMART overall health passed, 0 reallocated sectors"),
        "{status}"
    );

    // A bridge smartctl does not know: unavailable, never refused.
    proxy.close("offsite-a").await.expect("Close");
    signals
        .wait_for("DriveClosed", named("offsite-a"), WAIT)
        .await;
    smartctl.says("unsupported-bridge", 1);
    let before = signals.len();
    proxy.open("offsite-a").await.expect("Open");
    signals
        .wait_for_from(before, "DriveOpened", named("offsite-a"), WAIT)
        .await;
    let record = health_of(dir.path(), "offsite-a");
    assert_eq!(record.verdict, "unavailable");
    assert!(record.summary.contains("Unknown USB bridge"), "{record:?}");
    let shown = health_property(&conn, "offsite-a").await;
    assert_eq!(
        (shown.verdict.as_str(), shown.decision.as_str()),
        ("unavailable", "open")
    );
    assert!(shown.figures.is_empty(), "{shown:?}");
    assert!(
        status_text(&bus, &config).contains("health unknown, read "),
        "{}",
        status_text(&bus, &config)
    );

    // Restarted (both drives open, so adopted), ferry-crypt shows the
    // readings again from its ledger.
    let readings = uncached::<CryptProxy>(&conn)
        .await
        .health()
        .await
        .expect("Health");
    assert_eq!(readings.len(), 2, "{readings:?}");
    crypt.signal(libc::SIGTERM);
    crypt.wait_exit(WAIT).await.expect("ferry-crypt stopped");
    let _crypt = start_crypt(&bus, &config.to_string_lossy()).await;
    let proxy: CryptProxy = uncached(&conn).await;
    assert_eq!(proxy.health().await.expect("Health"), readings);
    assert_eq!(
        signals.count("DriveFailed", named("offsite-b")),
        0,
        "{}",
        signals.listing()
    );
}

ferry_integration_tests::integration_tests! {
    async Machine: [
        plain_drive_opens_on_attach_is_visible_to_others_and_closes,
        a_busy_drive_names_its_holder_refuses_a_second_request_and_closes_later,
        a_missing_wrong_or_linked_identity_token_fails_and_writes_nothing,
        luks_wrong_key_and_loose_key_file_fail_at_unlock_and_the_right_key_reaches_the_mapping,
        a_mountpoint_in_use_is_refused_and_left_alone,
        a_drive_pulled_out_while_open_is_unmounted_and_reported,
        a_drive_pulled_while_its_close_waits_for_a_busy_mount_is_reported_at_once,
        killed_and_restarted_it_adopts_and_announces_an_open_drive_and_closes_a_stray_mount,
        killed_mid_open_it_opens_again_proving_identity_and_adopts_a_late_mount,
        two_drives_plugged_in_together_open_and_close_independently,
        plain_enrolment_refuses_until_confirmed_and_prepares_a_drive_that_opens,
        luks_enrolment_backs_up_a_restorable_header_and_stops_at_the_mapping_without_device_mapper,
        the_interface_matches_its_xml_and_refuses_unknown_and_absent_drives,
        smart_health_is_read_before_opening_and_a_failing_drive_is_refused_or_warned_about,
    ],
    async DeviceMapper: [
        an_enrolled_luks_drive_opens_and_closes_through_its_mapping,
    ],
}
