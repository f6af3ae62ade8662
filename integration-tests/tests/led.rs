//! ferry-led: its state follows the flows, it rebuilds its state from the
//! peers' properties on start, and it runs in-process as well as as a binary.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_config::Config;
use ferry_integration_tests::{random_uuid, LoopImage, SignalRecorder, TestBus};
use ferry_interfaces::led::{self, LedProxy};
use ferry_interfaces::{crypt, sync, CryptDrive};

/// The colours the file backend wrote, in order.
fn written(file: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The foundation's slice end to end: a real loop device plugged in makes the
/// real watcher announce it and the real LED turn to working; the rest of the
/// flow's signals are emitted by the test on the services' behalf.
async fn plugged_in_drive_lights_the_led_through_the_whole_flow() {
    if !udev_and_loop() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let uuid = random_uuid();
    let led_file = dir.path().join("led");
    let config = write_config(
        dir.path(),
        &format!(
            "{}{}",
            drive_section("offsite-a", &uuid),
            led_file_section(&led_file)
        ),
    );
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let config_arg = config.to_string_lossy().into_owned();
    let watcher = bus.spawn("ferry-drive-watcher", &["--config", &config_arg], &[]);
    let led_service = bus.spawn("ferry-led", &["--config", &config_arg], &[]);
    watcher
        .wait_for_name(&conn, ferry_interfaces::drive_watcher::BUS_NAME, WAIT)
        .await;
    led_service.wait_for_name(&conn, led::BUS_NAME, WAIT).await;
    let led_proxy: LedProxy = uncached(&conn).await;
    assert_eq!(led_proxy.state().await.expect("State"), "idle");

    let mut image = LoopImage::ext4(dir.path(), 16, &uuid, "offsite-a");
    image.attach();
    signals
        .wait_for("ColorChanged", |s| s.args == ["#33c280", "working"], WAIT)
        .await;

    emit(
        &conn,
        crypt::OBJECT_PATH,
        crypt::INTERFACE,
        "DriveOpened",
        &("offsite-a", "/run/ferry/offsite-a"),
    )
    .await;
    emit(
        &conn,
        sync::OBJECT_PATH,
        sync::INTERFACE,
        "SyncFinished",
        &("offsite-a", 1024u64, 1.5f64),
    )
    .await;
    emit(
        &conn,
        crypt::OBJECT_PATH,
        crypt::INTERFACE,
        "DriveClosed",
        &("offsite-a",),
    )
    .await;
    signals
        .wait_for("ColorChanged", |s| s.args == ["#008000", "done"], WAIT)
        .await;
    assert_eq!(
        led_proxy.reason().await.expect("Reason"),
        "safe to remove: offsite-a"
    );

    let before_detach = signals.len();
    image.detach();
    signals
        .wait_for_from(
            before_detach,
            "ColorChanged",
            |s| s.args == ["#000000", "idle"],
            WAIT,
        )
        .await;

    // A failure from any service turns it red until acknowledged.
    image.attach();
    let n = signals.len();
    signals
        .wait_for_from(n, "ColorChanged", |s| s.args[1] == "working", WAIT)
        .await;
    emit(
        &conn,
        crypt::OBJECT_PATH,
        crypt::INTERFACE,
        "DriveOpened",
        &("offsite-a", "/run/ferry/offsite-a"),
    )
    .await;
    emit(
        &conn,
        sync::OBJECT_PATH,
        sync::INTERFACE,
        "SyncFailed",
        &("offsite-a", "space", "need 900 MiB, drive has 12 MiB"),
    )
    .await;
    signals
        .wait_for("ColorChanged", |s| s.args == ["#ff0000", "failed"], WAIT)
        .await;
    assert_eq!(
        led_proxy.reason().await.expect("Reason"),
        "offsite-a: sync space: need 900 MiB, drive has 12 MiB"
    );
    emit(
        &conn,
        crypt::OBJECT_PATH,
        crypt::INTERFACE,
        "DriveClosed",
        &("offsite-a",),
    )
    .await;
    image.detach();
    signals
        .expect_none_from(signals.len(), "ColorChanged", |_| true, QUIET)
        .await;
    assert_eq!(
        led_proxy.state().await.expect("State"),
        "failed",
        "failed holds past close and detach"
    );
    let before_acknowledge = signals.len();
    led_proxy.acknowledge().await.expect("Acknowledge");
    signals
        .wait_for_from(
            before_acknowledge,
            "ColorChanged",
            |s| s.args == ["#000000", "idle"],
            WAIT,
        )
        .await;

    let colors = written(&led_file);
    assert_eq!(
        colors,
        [
            "#000000 idle",
            "#33c280 working",
            "#008000 done",
            "#000000 idle",
            "#33c280 working",
            "#ff0000 failed",
            "#000000 idle"
        ],
        "the file backend records every colour in order"
    );
}

/// The LED asks the peers what is going on when it starts: a drive that the
/// crypt manager reports closed shows done, a running sync shows working.
async fn on_start_the_state_comes_from_the_peers_properties() {
    struct FakeCrypt(Vec<CryptDrive>);
    #[zbus::interface(name = "org.ferry.Crypt1")]
    impl FakeCrypt {
        #[zbus(property)]
        fn drives(&self) -> Vec<CryptDrive> {
            self.0.clone()
        }
    }

    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let led_file = dir.path().join("led");
    let config = write_config(
        dir.path(),
        &format!(
            "{}{}",
            drive_section("offsite-a", &random_uuid()),
            led_file_section(&led_file)
        ),
    );
    let closed = CryptDrive {
        name: "offsite-a".into(),
        state: "closed".into(),
        mountpoint: "/run/ferry/offsite-a".into(),
        device: "/dev/loop9".into(),
        message: String::new(),
    };
    let _peer = zbus::connection::Builder::address(bus.address())
        .expect("address")
        .name(crypt::BUS_NAME)
        .expect("name")
        .serve_at(crypt::OBJECT_PATH, FakeCrypt(vec![closed]))
        .expect("serve")
        .build()
        .await
        .expect("fake crypt");

    let conn = bus.connect().await;
    let process = bus.spawn("ferry-led", &["--config", &config.to_string_lossy()], &[]);
    process.wait_for_name(&conn, led::BUS_NAME, WAIT).await;
    let proxy: LedProxy = uncached(&conn).await;
    assert_eq!(
        proxy.state().await.expect("State"),
        "done",
        "log:\n{}",
        process.log()
    );
    assert_eq!(proxy.current_color().await.expect("Color"), "#008000");
    assert_eq!(written(&led_file), ["#008000 done"]);
}

/// The service's entry point runs in-process on a connection the test made,
/// stops when the shutdown future resolves, and Test cycles the colours and
/// refuses a second test while one runs.
async fn runs_in_process_and_test_cycles_the_colours() {
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let led_file = dir.path().join("led");
    let text = format!(
        "{}[led.colors]\nworking = \"blue\"\ndone = \"#00ff00\"\nfailed = \"orange\"\n",
        led_file_section(&led_file)
    );
    let config = Arc::new(Config::parse(&text, std::path::Path::new("test")).expect("config"));
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;

    let service_conn = bus.connect().await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(ferry_led::run(
        service_conn,
        config,
        Box::pin(async move {
            let _ = stopped.await;
        }),
    ));
    assert!(
        ferry_integration_tests::wait_for_name(&conn, led::BUS_NAME, WAIT).await,
        "the in-process LED owns its name"
    );

    let proxy: LedProxy = uncached(&conn).await;
    assert_eq!(proxy.backend().await.expect("Backend"), "file");
    assert!(proxy.device_present().await.expect("DevicePresent"));
    signals
        .wait_for("ColorChanged", |s| s.args == ["#000000", "idle"], WAIT)
        .await;
    let before_test = signals.len();
    proxy.test().await.expect("Test");
    let busy = proxy
        .test()
        .await
        .expect_err("a second Test while one runs");
    assert!(busy.to_string().contains("org.ferry.Error.Busy"), "{busy}");
    signals
        .wait_for_from(
            before_test,
            "ColorChanged",
            |s| s.args == ["#000000", "idle"],
            Duration::from_secs(10),
        )
        .await;
    let colors: Vec<String> = signals
        .all()
        .iter()
        .filter(|s| s.member == "ColorChanged")
        .map(|s| s.args.join(" "))
        .collect();
    assert_eq!(
        colors,
        [
            "#000000 idle",
            "#0000ff test",
            "#00ff00 test",
            "#ffa500 test",
            "#000000 test",
            "#000000 idle"
        ]
    );
    assert_eq!(
        proxy.state().await.expect("State"),
        "idle",
        "a test does not change the state"
    );

    let _ = stop.send(());
    let result = tokio::time::timeout(WAIT, service)
        .await
        .expect("run returns after shutdown")
        .expect("task");
    assert!(result.is_ok(), "{result:?}");
}

/// When a peer restarts, the LED asks it again instead of holding on to what
/// it said before: a job its new instance does not run is no longer working.
async fn a_restarted_peer_is_asked_again() {
    struct FakeBorg;
    #[zbus::interface(name = "org.ferry.Borg1")]
    impl FakeBorg {
        #[zbus(property)]
        fn jobs(&self) -> Vec<ferry_interfaces::BackupJob> {
            Vec::new()
        }
    }

    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &led_file_section(&dir.path().join("led")));
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let process = bus.spawn("ferry-led", &["--config", &config.to_string_lossy()], &[]);
    process.wait_for_name(&conn, led::BUS_NAME, WAIT).await;

    emit(
        &conn,
        ferry_interfaces::borg::OBJECT_PATH,
        ferry_interfaces::borg::INTERFACE,
        "BackupStarted",
        &("nas-7", "nas"),
    )
    .await;
    signals
        .wait_for("ColorChanged", |s| s.args[1] == "working", WAIT)
        .await;
    // ferry-borg "restarts": a new owner of org.ferry.Borg1 that runs no job.
    let before = signals.len();
    let _borg = zbus::connection::Builder::address(bus.address())
        .expect("address")
        .name(ferry_interfaces::borg::BUS_NAME)
        .expect("name")
        .serve_at(ferry_interfaces::borg::OBJECT_PATH, FakeBorg)
        .expect("serve")
        .build()
        .await
        .expect("fake borg");
    signals
        .wait_for_from(before, "ColorChanged", |s| s.args[1] == "idle", WAIT)
        .await;
}

ferry_integration_tests::integration_tests! {
    async Machine: [
        plugged_in_drive_lights_the_led_through_the_whole_flow,
        on_start_the_state_comes_from_the_peers_properties,
        runs_in_process_and_test_cycles_the_colours,
        a_restarted_peer_is_asked_again,
    ],
}
