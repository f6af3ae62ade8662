//! ferry-notifier's pushes and metrics against real servers on loopback:
//! every healthchecks ping arrives once per event with its path and body,
//! ntfy gets failures with title, priority, tags and the token from a
//! systemd credential (never in the log); pushes wait in their outbox while
//! the server is down, across a restart, and go when it is back; a 404 is
//! a dead letter; the Prometheus textfile passes `promtool check metrics`
//! and follows every change.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::peers::{serve, FakeBorg, FakeSync};
use common::*;
use ferry_integration_tests::http::{HttpServer, Request};
use ferry_integration_tests::{require_command, ServiceProcess, SignalRecorder, TestBus};
use ferry_interfaces::notifier::{self, NotifierProxy};
use ferry_interfaces::{borg, crypt, sync, BackupResult, Failure, SyncRecord};

const TOKEN: &str = "tk_secret-ntfy-token-5d41402abc4b2a76";
/// The healthchecks ping key: it fills `{ping-key}` in the profile's URL.
const PING_KEY: &str = "pk-7f3a";

/// Config: drive offsite-a, profile nas, pings and ntfy to `base`, fast
/// retries (or `retry` as given), `extra` appended.
fn config(dir: &Path, base: &str, retry: (u64, u64), extra: &str) -> PathBuf {
    let mut text = format!("state-directory = \"{}\"\n\n", dir.join("state").display());
    text.push_str(&drive_section(
        "offsite-a",
        &ferry_integration_tests::random_uuid(),
    ));
    text.push_str(&format!(
        "[repositories.nas]\npath = \"{repo}\"\n\n[profiles.nas]\nrepository = \"nas\"\n\
         sources = [\"{src}\"]\n\n[push]\ntimeout-seconds = 5\nretry-min-seconds = {}\n\
         retry-max-seconds = {}\n\nping-key-credential = \"ferry-ping-key\"\n\n[push.profiles]\nnas = \"{base}/{{ping-key}}/nas\"\n\n\
         [push.drives]\noffsite-a = \"{base}/d/offsite-a/\"\n\n[push.ntfy]\n\
         url = \"{base}/ntfy/ferry\"\ntoken-credential = \"ferry-ntfy-token\"\n\
         priority = \"urgent\"\ntags = [\"warning\", \"floppy_disk\"]\n\n{extra}",
        retry.0,
        retry.1,
        repo = dir.join("repo").display(),
        src = dir.join("src").display(),
    ));
    write_config(dir, &text)
}

/// The credentials directory systemd would pass, holding the ntfy token
/// and the ping key.
fn credentials(dir: &Path) -> PathBuf {
    let creds = dir.join("credentials");
    std::fs::create_dir_all(&creds).expect("credentials dir");
    let file = creds.join("ferry-ntfy-token");
    std::fs::write(&file, format!("{TOKEN}\n")).expect("token");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    std::fs::write(creds.join("ferry-ping-key"), format!("{PING_KEY}\n")).expect("ping key");
    creds
}

async fn start(
    bus: &TestBus,
    conn: &zbus::Connection,
    config: &Path,
    creds: &Path,
) -> ServiceProcess {
    let creds = creds.to_string_lossy();
    let process = bus.spawn(
        "ferry-notifier",
        &["--config", &config.to_string_lossy()],
        &[("CREDENTIALS_DIRECTORY", creds.as_ref())],
    );
    process.wait_for_name(conn, notifier::BUS_NAME, WAIT).await;
    process
}

async fn borg_signal(conn: &zbus::Connection, member: &str, args: &[&str]) {
    match args {
        [a, b] => emit(conn, borg::OBJECT_PATH, borg::INTERFACE, member, &(a, b)).await,
        [a, b, c] => emit(conn, borg::OBJECT_PATH, borg::INTERFACE, member, &(a, b, c)).await,
        [a, b, c, d] => {
            emit(
                conn,
                borg::OBJECT_PATH,
                borg::INTERFACE,
                member,
                &(a, b, c, d),
            )
            .await
        }
        _ => panic!("no Borg1 signal has {} arguments", args.len()),
    }
}

/// Waits until the outbox is empty (nothing more will be sent).
async fn wait_drained(proxy: &NotifierProxy<'_>) {
    let deadline = std::time::Instant::now() + WAIT;
    while proxy.pending().await.expect("Pending") != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the outbox never drained"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn paths(requests: &[Request]) -> Vec<&str> {
    requests.iter().map(|r| r.path.as_str()).collect()
}

async fn every_ping_arrives_once_per_event_with_its_path_and_body() {
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let http = HttpServer::start(0);
    let config = config(dir.path(), &http.base(), (1, 2), "");
    let creds = credentials(dir.path());
    let conn = bus.connect().await;
    let notifier = start(&bus, &conn, &config, &creds).await;
    let proxy: NotifierProxy = uncached(&conn).await;

    borg_signal(&conn, "BackupStarted", &["nas-1", "nas"]).await;
    borg_signal(&conn, "BackupFinished", &["nas-1", "nas", "nas-2026-11-24"]).await;
    borg_signal(&conn, "BackupStarted", &["nas-2", "nas"]).await;
    borg_signal(
        &conn,
        "BackupFailed",
        &[
            "nas-2",
            "nas",
            "create",
            "Repository /srv/borg does not exist.",
        ],
    )
    .await;
    borg_signal(&conn, "BackupSkipped", &["nas-3", "nas", "on battery"]).await;
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
        &("offsite-a", 3u64 << 30, 95.0f64),
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
    // A drive without a check: no ping.
    emit(
        &conn,
        crypt::OBJECT_PATH,
        crypt::INTERFACE,
        "DriveOpened",
        &("unknown-drive", "/run/ferry/x"),
    )
    .await;

    http.wait_for(10, |_| true, WAIT).await;
    wait_drained(&proxy).await;
    let all = http.requests();
    assert_eq!(
        paths(&all),
        [
            "/pk-7f3a/nas/start",
            "/pk-7f3a/nas",
            "/pk-7f3a/nas/start",
            "/pk-7f3a/nas/fail",
            "/ntfy/ferry",
            "/pk-7f3a/nas/log",
            "/d/offsite-a/start",
            "/d/offsite-a",
            "/d/offsite-a/fail",
            "/ntfy/ferry",
        ],
        "each event once, in order: {all:#?}"
    );
    assert!(all.iter().all(|r| r.method == "POST"));
    assert!(all[1].body.contains("backup nas finished") && all[1].body.contains("nas-2026-11-24"));
    assert!(all[3].body.contains("failed at stage create"));
    assert!(all[3].body.contains("Repository /srv/borg does not exist."));
    assert!(all[5].body.contains("on battery"));
    assert!(all[7].body.contains("3.0 GiB copied"), "{}", all[7].body);
    assert!(all[8].body.contains("need 900 MiB, drive has 12 MiB"));
    // No ping carries a token.
    assert!(all
        .iter()
        .filter(|r| r.path != "/ntfy/ferry")
        .all(|r| !r.headers.contains_key("authorization")));

    let ntfy: Vec<&Request> = all.iter().filter(|r| r.path == "/ntfy/ferry").collect();
    assert_eq!(
        ntfy[0].headers["title"],
        "ferry: backup nas failed at create"
    );
    assert_eq!(
        ntfy[1].headers["title"],
        "ferry: sync of drive offsite-a failed at space"
    );
    for n in &ntfy {
        assert_eq!(n.headers["priority"], "urgent");
        assert_eq!(n.headers["tags"], "warning,floppy_disk");
        assert_eq!(n.headers["authorization"], format!("Bearer {TOKEN}"));
    }
    assert!(ntfy[1].body.contains("need 900 MiB"));
    assert!(
        !notifier.log().contains(TOKEN),
        "the token reached the log:\n{}",
        notifier.log()
    );
    assert!(
        !notifier.log().contains("/pk-7f3a/nas"),
        "a ping URL reached the log"
    );
}

async fn pushes_wait_while_the_server_is_down_across_a_restart() {
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut http = HttpServer::start(0);
    let port = http.port;
    http.stop();
    // A long first retry: only Flush or a restart sends again.
    let config = config(dir.path(), &http.base(), (300, 600), "");
    let creds = credentials(dir.path());
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let notifier = start(&bus, &conn, &config, &creds).await;
    let proxy: NotifierProxy = uncached(&conn).await;

    emit(
        &conn,
        sync::OBJECT_PATH,
        sync::INTERFACE,
        "SyncFailed",
        &(
            "offsite-a",
            "copy",
            "rsync: write failed: No space left on device (28)",
        ),
    )
    .await;
    signals
        .wait_for(
            "PropertiesChanged",
            |s| {
                s.args
                    .iter()
                    .any(|a| a.contains("cannot connect") || a.contains("network"))
            },
            WAIT,
        )
        .await;
    assert_eq!(
        proxy.pending().await.expect("Pending"),
        2,
        "the ping and the ntfy message"
    );

    // Restarting while the server is down keeps both.
    drop(notifier);
    let _notifier = start(&bus, &conn, &config, &creds).await;
    assert_eq!(proxy.pending().await.expect("Pending"), 2);

    let http = HttpServer::start(port);
    proxy.flush().await.expect("Flush");
    http.wait_for(2, |_| true, WAIT).await;
    wait_drained(&proxy).await;
    let all = http.requests();
    assert_eq!(
        paths(&all),
        ["/d/offsite-a/fail", "/ntfy/ferry"],
        "{all:#?}"
    );
    assert!(all[0].body.contains("No space left on device"));
    assert_eq!(proxy.last_error().await.expect("LastError"), "");
}

async fn a_refused_ping_is_a_dead_letter_and_the_rest_go_on() {
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let http = HttpServer::start(0);
    http.answer("/pk-7f3a/nas/start", 404);
    let config = config(dir.path(), &http.base(), (1, 2), "");
    let creds = credentials(dir.path());
    let conn = bus.connect().await;
    let _notifier = start(&bus, &conn, &config, &creds).await;
    let proxy: NotifierProxy = uncached(&conn).await;

    borg_signal(&conn, "BackupStarted", &["nas-1", "nas"]).await;
    borg_signal(&conn, "BackupFinished", &["nas-1", "nas", "a"]).await;
    http.wait_for(2, |_| true, WAIT).await;
    wait_drained(&proxy).await;
    assert_eq!(
        paths(&http.requests()),
        ["/pk-7f3a/nas/start", "/pk-7f3a/nas"]
    );
    let dead = proxy
        .list_dead_letters(Default::default())
        .await
        .expect("ListDeadLetters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].subject, "start profile nas");
    assert!(dead[0].error.contains("HTTP 404"), "{dead:?}");
    assert_eq!(proxy.dead_letters().await.expect("DeadLetters"), 1);
    // The spooled push holds the URL with the placeholder, never the key.
    let dead_dir = dir.path().join("state/notifier/push/dead");
    let spooled = std::fs::read_to_string(dead_dir.join(format!("{}.json", dead[0].id)))
        .expect("the dead letter's file");
    assert!(
        spooled.contains("{ping-key}") && !spooled.contains(PING_KEY),
        "{spooled}"
    );

    // Sent again by hand once the check exists.
    http.answer("/pk-7f3a/nas/start", 200);
    proxy
        .resend_dead_letter(&dead[0].id, Default::default())
        .await
        .expect("ResendDeadLetter");
    http.wait_for(3, |_| true, WAIT).await;
    wait_drained(&proxy).await;
    assert_eq!(proxy.dead_letters().await.expect("DeadLetters"), 0);
}

/// `promtool check metrics` on `text`: its complaints, empty when clean.
fn promtool(text: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        said.trim().to_string()
    } else {
        format!("promtool failed ({}): {said}", out.status)
    }
}

/// Waits until the textfile exists and `pred` holds for its text.
async fn wait_textfile(path: &Path, pred: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if pred(&text) {
                return text;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the textfile never got there: {:?}",
            std::fs::read_to_string(path)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn the_metrics_textfile_is_valid_and_follows_every_change() {
    if !require_command(
        "promtool",
        "the Debian package prometheus (scripts/setup --tests)",
    ) {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let http = HttpServer::start(0);
    let textfile = dir.path().join("textfile/ferry.prom");
    std::fs::create_dir_all(textfile.parent().expect("parent")).expect("collector dir");
    let config = config(
        dir.path(),
        &http.base(),
        (1, 2),
        &format!("[metrics]\ntextfile = \"{}\"\n", textfile.display()),
    );
    let creds = credentials(dir.path());
    // As under the unit's UMask=0077: the file must still be readable by
    // node_exporter.
    // SAFETY: umask cannot fail; this test's process is its own (nextest).
    unsafe { libc::umask(0o077) };
    let conn = bus.connect().await;
    let _sync = serve(
        &bus,
        sync::BUS_NAME,
        sync::OBJECT_PATH,
        FakeSync {
            last_syncs: vec![SyncRecord {
                drive: "offsite-a".into(),
                time: 1_764_000_000,
                bytes: 3 << 30,
                seconds: 95.5,
                archive: "nas-2026-11-24".into(),
                free: 5 << 40,
            }],
            last_failures: vec![Failure {
                subject: "offsite-a".into(),
                time: 1_763_000_000,
                stage: "space".into(),
                message: "full".into(),
            }],
        },
    )
    .await;
    let _borg = serve(
        &bus,
        borg::BUS_NAME,
        borg::OBJECT_PATH,
        FakeBorg {
            results: vec![BackupResult {
                profile: "nas".into(),
                outcome: "finished".into(),
                time: 1_764_001_000,
                archive: "nas-2026-11-24".into(),
                seconds: 42.25,
                message: String::new(),
            }],
            schedule: Vec::new(),
            last_failures: Vec::new(),
            stats: r#"{"archive":{"name":"nas-2026-11-24","stats":{"original_size":7340032,"compressed_size":5000000,"deduplicated_size":123456,"nfiles":12}}}"#.into(),
        },
    )
    .await;
    let _notifier = start(&bus, &conn, &config, &creds).await;

    let text = wait_textfile(&textfile, |t| t.contains("ferry_drive_free_bytes")).await;
    assert_eq!(promtool(&text), "", "{text}");
    for line in [
        "ferry_backup_last_success_timestamp_seconds{profile=\"nas\"} 1764001000",
        "ferry_backup_last_duration_seconds{profile=\"nas\"} 42.25",
        "ferry_backup_last_archive_original_bytes{profile=\"nas\"} 7340032",
        "ferry_backup_last_archive_deduplicated_bytes{profile=\"nas\"} 123456",
        "ferry_drive_last_sync_timestamp_seconds{drive=\"offsite-a\"} 1764000000",
        "ferry_drive_last_sync_copied_bytes{drive=\"offsite-a\"} 3221225472",
        "ferry_drive_last_sync_duration_seconds{drive=\"offsite-a\"} 95.5",
        "ferry_drive_free_bytes{drive=\"offsite-a\"} 5497558138880",
        "ferry_drive_last_failure_timestamp_seconds{drive=\"offsite-a\"} 1763000000",
        // The failure in Sync1's LastFailures was missed: found at start.
        "ferry_service_failures_total{service=\"sync\"} 1",
        "ferry_service_failures_total{service=\"borg\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&textfile).expect("stat").permissions(),
    );
    assert_eq!(mode & 0o777, 0o644, "node_exporter must be able to read it");

    // A failure counts at once (and is pushed).
    emit(
        &conn,
        sync::OBJECT_PATH,
        sync::INTERFACE,
        "SyncFailed",
        &("offsite-a", "verify", "borg check found damage"),
    )
    .await;
    let text = wait_textfile(&textfile, |t| {
        t.contains("ferry_service_failures_total{service=\"sync\"} 2\n")
    })
    .await;
    assert_eq!(promtool(&text), "", "{text}");
    http.wait_for(4, |_| true, WAIT).await;
    // ...and the delivery shows as an empty outbox again.
    wait_textfile(&textfile, |t| {
        t.contains("ferry_service_failures_total{service=\"sync\"} 2\n")
            && t.contains("ferry_notifier_pending_messages{channel=\"push\"} 0\n")
    })
    .await;
    // No temp file is left beside it for node_exporter to trip over.
    let names: Vec<String> = std::fs::read_dir(textfile.parent().expect("dir"))
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["ferry.prom"]);
}

async fn a_drive_opened_despite_bad_health_is_pushed_once_per_reading() {
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let http = HttpServer::start(0);
    let config = config(dir.path(), &http.base(), (1, 2), "");
    let creds = credentials(dir.path());
    // ferry-crypt's reading, as its health check recorded it.
    let ledger = ferry_service::health_ledger::path(&dir.path().join("state"));
    std::fs::create_dir_all(ledger.parent().expect("state")).expect("state dir");
    let reading = |time: u64| ferry_service::health_ledger::HealthRecord {
        time,
        device: "/dev/sdb".into(),
        decision: "warn".into(),
        verdict: "degraded".into(),
        summary: "SMART overall health passed, 8 pending sectors".into(),
        reallocated: Some(0),
        pending: Some(8),
        uncorrectable: None,
        power_on_hours: Some(20_000),
        temperature: Some(38),
    };
    ferry_service::health_ledger::record(&ledger, "offsite-a", reading(1_764_000_000))
        .expect("ledger");
    let conn = bus.connect().await;
    let _notifier = start(&bus, &conn, &config, &creds).await;
    let proxy: NotifierProxy = uncached(&conn).await;
    let opened = || async {
        emit(
            &conn,
            crypt::OBJECT_PATH,
            crypt::INTERFACE,
            "DriveOpened",
            &("offsite-a", "/run/ferry/offsite-a"),
        )
        .await
    };

    opened().await;
    opened().await;
    http.wait_for(3, |_| true, WAIT).await;
    wait_drained(&proxy).await;
    let all = http.requests();
    assert_eq!(
        paths(&all),
        ["/d/offsite-a/start", "/ntfy/ferry", "/d/offsite-a/start"],
        "one warning per reading: {all:#?}"
    );
    assert_eq!(
        all[1].headers["title"],
        "ferry: drive offsite-a health is degraded"
    );
    assert!(all[1].body.contains("8 pending sectors"), "{}", all[1].body);

    // A new reading is warned about again.
    ferry_service::health_ledger::record(&ledger, "offsite-a", reading(1_764_100_000))
        .expect("ledger");
    opened().await;
    http.wait_for(5, |_| true, WAIT).await;
    wait_drained(&proxy).await;
    assert_eq!(http.requests().len(), 5);
    assert_eq!(http.requests()[4].path, "/ntfy/ferry");
}

ferry_integration_tests::integration_tests! {
    async Machine: [
        every_ping_arrives_once_per_event_with_its_path_and_body,
        pushes_wait_while_the_server_is_down_across_a_restart,
        a_refused_ping_is_a_dead_letter_and_the_rest_go_on,
        the_metrics_textfile_is_valid_and_follows_every_change,
        a_drive_opened_despite_bad_health_is_pushed_once_per_reading,
    ],
}
