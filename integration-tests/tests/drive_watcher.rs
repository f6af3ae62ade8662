//! ferry-drive-watcher against real udev, real loop devices and a private bus.

mod common;

use common::*;
use ferry_integration_tests::{random_uuid, run, LoopImage, SignalRecorder, TestBus};
use ferry_interfaces::drive_watcher::{self, DriveWatcherProxy};

async fn watcher(
    bus: &TestBus,
    config: &std::path::Path,
) -> ferry_integration_tests::ServiceProcess {
    let conn = bus.connect().await;
    let process = bus.spawn(
        "ferry-drive-watcher",
        &["--config", &config.to_string_lossy()],
        &[],
    );
    process
        .wait_for_name(&conn, drive_watcher::BUS_NAME, WAIT)
        .await;
    process
}

async fn attach_and_detach_announce_the_enrolled_name() {
    if !udev_and_loop() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let uuid = random_uuid();
    let config = write_config(dir.path(), &drive_section("offsite-a", &uuid));
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let _watcher = watcher(&bus, &config).await;

    let mut image = LoopImage::ext4(dir.path(), 16, &uuid, "offsite-a");
    let device = image.attach();
    let attached = signals
        .wait_for("DriveAttached", |s| s.args[0] == "offsite-a", WAIT)
        .await;
    assert_eq!(
        attached.args,
        vec!["offsite-a".to_string(), device.clone(), uuid.clone()]
    );

    let proxy: DriveWatcherProxy = uncached(&conn).await;
    let drives = proxy.drives().await.expect("Drives");
    assert_eq!(drives.len(), 1);
    assert!(
        drives[0].attached && drives[0].device == device && drives[0].since > 0,
        "{drives:?}"
    );

    image.detach();
    let detached = signals
        .wait_for("DriveDetached", |s| s.args[0] == "offsite-a", WAIT)
        .await;
    assert_eq!(detached.args, vec!["offsite-a".to_string(), uuid]);
    let drives = proxy.drives().await.expect("Drives");
    assert!(
        !drives[0].attached && drives[0].device.is_empty(),
        "{drives:?}"
    );
    assert_eq!(
        signals.count("DriveAttached", |_| true),
        1,
        "{}",
        signals.listing()
    );
}

async fn unknown_devices_and_repeated_change_events_announce_nothing() {
    if !udev_and_loop() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let uuid = random_uuid();
    let config = write_config(dir.path(), &drive_section("offsite-a", &uuid));
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let _watcher = watcher(&bus, &config).await;

    // Not enrolled: a different UUID, and a label that copies the drive's name
    // plus terminal escapes. UUID and label are hints; neither is enough.
    let mut stranger = LoopImage::ext4(dir.path(), 16, &random_uuid(), "offsite-a");
    stranger.attach();
    let mut hostile = LoopImage::ext4(dir.path(), 16, &random_uuid(), "\u{1b}[31m;$(x)`");
    hostile.attach();
    signals.expect_none("DriveAttached", |_| true, QUIET).await;

    // Enrolled, then udev repeats change events for it: one announcement.
    let mut ours = LoopImage::ext4(dir.path(), 16, &uuid, "offsite-a");
    let device = ours.attach();
    signals
        .wait_for("DriveAttached", |s| s.args[0] == "offsite-a", WAIT)
        .await;
    let after_attach = signals.len();
    for _ in 0..3 {
        run(
            "udevadm",
            &["trigger", "--action=change", "--settle", device.as_str()],
        );
    }
    signals
        .expect_none_from(after_attach, "DriveAttached", |_| true, QUIET)
        .await;
    assert_eq!(
        signals.count("DriveAttached", |_| true),
        1,
        "{}",
        signals.listing()
    );
    assert_eq!(
        signals.count("DriveDetached", |_| true),
        0,
        "{}",
        signals.listing()
    );
}

async fn a_drive_present_before_start_is_announced_and_rescan_reannounces() {
    if !udev_and_loop() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let (uuid_a, uuid_b) = (random_uuid(), random_uuid());
    let config = write_config(
        dir.path(),
        &format!(
            "{}{}",
            drive_section("offsite-a", &uuid_a),
            drive_section("offsite-b", &uuid_b)
        ),
    );
    let mut image = LoopImage::ext4(dir.path(), 16, &uuid_a, "offsite-a");
    let device = image.attach();
    ferry_integration_tests::udev_settle();

    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let _watcher = watcher(&bus, &config).await;
    let coldplug = signals
        .wait_for("DriveAttached", |s| s.args[0] == "offsite-a", WAIT)
        .await;
    assert_eq!(coldplug.args[1], device);

    let proxy: DriveWatcherProxy = uncached(&conn).await;
    let before = signals.len();
    assert_eq!(proxy.rescan().await.expect("Rescan"), 1);
    signals
        .wait_for_from(before, "DriveAttached", |s| s.args[0] == "offsite-a", WAIT)
        .await;
    let drives = proxy.drives().await.expect("Drives");
    let names: Vec<(&str, bool)> = drives
        .iter()
        .map(|d| (d.name.as_str(), d.attached))
        .collect();
    assert_eq!(names, vec![("offsite-a", true), ("offsite-b", false)]);
}

async fn a_bad_config_stops_the_service_with_line_key_and_reason() {
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!(
        "state-directory = \"{}\"\n[drives.offsite-a]\nuuid = \"zz-not-hex\"\n",
        dir.path().display()
    );
    let config = write_config(dir.path(), &text);
    let process = bus.spawn(
        "ferry-drive-watcher",
        &["--config", &config.to_string_lossy()],
        &[],
    );
    let status = process.wait_exit(WAIT).await.expect("exits");
    assert_eq!(
        status.code(),
        Some(78),
        "EX_CONFIG; log:\n{}",
        process.log()
    );
    let log = process.log();
    assert!(
        log.contains("ferry.toml:3: drives.offsite-a.uuid:") && log.contains("not a UUID"),
        "{log}"
    );
}

ferry_integration_tests::integration_tests! {
    async Machine: [
        attach_and_detach_announce_the_enrolled_name,
        unknown_devices_and_repeated_change_events_announce_nothing,
        a_drive_present_before_start_is_announced_and_rescan_reannounces,
        a_bad_config_stops_the_service_with_line_key_and_reason,
    ],
}
