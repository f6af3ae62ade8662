//! Each running service's introspection matches its XML in interfaces/.
//! Add a service here as soon as its binary exists.

mod common;

use common::*;
use ferry_integration_tests::introspection::{assert_matches_contract, assert_standard_errors};
use ferry_integration_tests::{random_uuid, TestBus};
use ferry_interfaces::{borg, crypt, drive_watcher, led, notifier, sync};

async fn running_services_match_their_xml() {
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        dir.path(),
        &format!(
            "{}{}",
            drive_section("offsite-a", &random_uuid()),
            led_file_section(&dir.path().join("led"))
        ),
    );
    let config = config.to_string_lossy().into_owned();
    let conn = bus.connect().await;
    let services = [
        ("ferry-drive-watcher", drive_watcher::INTERFACE),
        ("ferry-led", led::INTERFACE),
        ("ferry-notifier", notifier::INTERFACE),
        ("ferry-borg", borg::INTERFACE),
        ("ferry-crypt", crypt::INTERFACE),
        ("ferry-sync", sync::INTERFACE),
    ];
    let mut running = Vec::new();
    for (binary, interface) in services {
        let process = bus.spawn(binary, &["--config", &config], &[]);
        process.wait_for_name(&conn, interface, WAIT).await;
        assert_matches_contract(&conn, interface).await;
        assert_standard_errors(&conn, interface).await;
        running.push(process);
    }
}

ferry_integration_tests::integration_tests! {
    async Nothing: [
        running_services_match_their_xml,
    ],
}
