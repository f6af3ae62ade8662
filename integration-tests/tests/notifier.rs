//! ferry-notifier against a real SMTP server (python3-aiosmtpd on loopback):
//! every failure is mailed with what, where and the service's message;
//! mail waits in the outbox while the server is down, 4xx is retried, 5xx
//! is dead-lettered; SIGKILL at random points loses nothing and duplicates
//! at most once; staleness follows a clock the test sets; failures that
//! happened while the notifier was stopped are mailed when it starts; a
//! hostile drive label cannot add a header; the interface matches its XML.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::peers::{serve, FakeBorg, FakeSync};
use common::*;
use ferry_integration_tests::introspection::assert_matches_contract;
use ferry_integration_tests::smtp::{require_aiosmtpd, Received, Smtp};
use ferry_integration_tests::{ServiceProcess, SignalRecorder, TestBus};
use ferry_interfaces::notifier::{self, NotifierProxy};
use ferry_interfaces::{borg, crypt, sync, BackupResult, Failure, ScheduleEntry, SyncRecord};

const DAY: u64 = 86_400;

/// Config: the drives, [mail] to the test server (plain, loopback), fast
/// retries, and `notify` lines.
fn config(dir: &Path, port: u16, drives: &[&str], notify: &str) -> PathBuf {
    let mut text = format!("state-directory = \"{}\"\n\n", dir.join("state").display());
    for d in drives {
        text.push_str(&drive_section(d, &ferry_integration_tests::random_uuid()));
    }
    text.push_str(&format!(
        "[mail]\nfrom = \"ferry@nas.test\"\nto = [\"admin@home.test\"]\nsmtp-host = \"127.0.0.1\"\n\
         smtp-port = {port}\nsecurity = \"none\"\ntimeout-seconds = 10\nretry-min-seconds = 1\n\
         retry-max-seconds = 2\n\n[notify]\n{notify}\n"
    ));
    write_config(dir, &text)
}

async fn start(
    bus: &TestBus,
    conn: &zbus::Connection,
    config: &Path,
    envs: &[(&str, &str)],
) -> ServiceProcess {
    let process = bus.spawn(
        "ferry-notifier",
        &["--config", &config.to_string_lossy()],
        envs,
    );
    process.wait_for_name(conn, notifier::BUS_NAME, WAIT).await;
    process
}

async fn sync_failed(conn: &zbus::Connection, drive: &str, stage: &str, message: &str) {
    emit(
        conn,
        sync::OBJECT_PATH,
        sync::INTERFACE,
        "SyncFailed",
        &(drive, stage, message),
    )
    .await;
}

/// Polls `check` (the test's own look at files and records) until it
/// returns Some, at most `within`.
async fn wait_until<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "not reached within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn outbox_files(dir: &Path, sub: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("state/notifier").join(sub))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.retain(|n| n.ends_with(".json"));
    names.sort();
    names
}

async fn failures_are_mailed_with_what_where_and_the_message() {
    if !require_aiosmtpd() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let smtp = Smtp::start(&dir.path().join("smtp"), 0);
    let config = config(dir.path(), smtp.port, &["offsite-a"], "");
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let _notifier = start(&bus, &conn, &config, &[]).await;
    assert_matches_contract(&conn, notifier::INTERFACE).await;

    emit(
        &conn,
        crypt::OBJECT_PATH,
        crypt::INTERFACE,
        "DriveFailed",
        &(
            "offsite-a",
            "unlock",
            "No key available with this passphrase.",
        ),
    )
    .await;
    sync_failed(
        &conn,
        "offsite-a",
        "space",
        "need 900 MiB, drive has 12 MiB",
    )
    .await;
    emit(
        &conn,
        borg::OBJECT_PATH,
        borg::INTERFACE,
        "BackupFailed",
        &(
            "job-7",
            "home",
            "create",
            "Repository /srv/borg/nas does not exist.",
        ),
    )
    .await;

    let mails = smtp.wait_for(3, |_| true, WAIT).await;
    let by_subject: BTreeMap<&str, &Received> = mails.iter().map(|m| (m.subject(), m)).collect();
    let drive = by_subject["[ferry] drive offsite-a failed at unlock"];
    assert!(
        drive
            .body
            .contains("No key available with this passphrase."),
        "{drive:#?}"
    );
    assert!(drive.body.contains("Where: drive offsite-a, stage unlock"));
    let sync_mail = by_subject["[ferry] sync of drive offsite-a failed at space"];
    assert!(sync_mail.body.contains("need 900 MiB, drive has 12 MiB"));
    let backup = by_subject["[ferry] backup home failed at create"];
    assert!(backup
        .body
        .contains("Repository /srv/borg/nas does not exist."));
    assert!(backup.body.contains("Job:   job-7"));
    for mail in &mails {
        assert_eq!(mail.header("From"), Some("ferry@nas.test"));
        assert_eq!(mail.header("To"), Some("admin@home.test"));
        assert_eq!(mail.mail_from, "ferry@nas.test");
        assert_eq!(mail.rcpt_to, ["admin@home.test"]);
        assert!(mail.id().starts_with("ferry-"), "{mail:#?}");
        let message_id = mail.header("Message-ID").expect("Message-ID");
        assert!(
            message_id.starts_with(&format!("<{}@", mail.id())),
            "{message_id}"
        );
        assert!(mail.header("Date").is_some());
        assert_eq!(mail.header("Auto-Submitted"), Some("auto-generated"));
        // The bus said it was queued and sent, with the same id.
        signals
            .wait_for("NotificationQueued", |s| s.args[0] == mail.id(), WAIT)
            .await;
        let sent = signals
            .wait_for("NotificationSent", |s| s.args[0] == mail.id(), WAIT)
            .await;
        assert_eq!(sent.args[1], mail.subject());
    }
    signals
        .wait_for(
            "NotificationQueued",
            |s| s.args[1] == "SyncFailed offsite-a",
            WAIT,
        )
        .await;
    let proxy: NotifierProxy = uncached(&conn).await;
    assert_eq!(proxy.pending().await.expect("Pending"), 0);
    assert_eq!(proxy.last_error().await.expect("LastError"), "");

    // SendTest returns the id that arrives in the mail.
    let id = proxy.send_test().await.expect("SendTest");
    let test = smtp.wait_for(1, |m| m.id() == id, WAIT).await;
    assert!(
        test[0].subject().starts_with("[ferry] test message from "),
        "{:?}",
        test[0]
    );

    // UnitFailed checks the name, then mails with the journal (or why not).
    let err = proxy
        .unit_failed("not a unit")
        .await
        .expect_err("bad unit name");
    assert!(
        err.to_string().contains("InvalidArgument")
            && err.to_string().contains("ferry-sync.service"),
        "{err}"
    );
    let id = proxy
        .unit_failed("ferry-sync.service")
        .await
        .expect("UnitFailed");
    let unit = smtp.wait_for(1, |m| m.id() == id, WAIT).await;
    assert_eq!(unit[0].subject(), "[ferry] unit ferry-sync.service failed");
    assert!(unit[0].body.contains("journal"), "{:?}", unit[0]);
    // Removed from the outbox once the server said 250.
    wait_until(WAIT, || {
        outbox_files(dir.path(), "outbox").is_empty().then_some(())
    })
    .await;
}

async fn mail_waits_while_the_server_is_down_and_goes_when_it_is_back() {
    if !require_aiosmtpd() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut smtp = Smtp::start(&dir.path().join("smtp"), 0);
    let port = smtp.port;
    smtp.stop();
    // A long first retry, so only Flush or the returning server delivers.
    let config = config(dir.path(), port, &["offsite-a"], "");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace(
            "retry-min-seconds = 1\nretry-max-seconds = 2",
            "retry-min-seconds = 300\nretry-max-seconds = 600",
        ),
    )
    .expect("config");
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let notifier = start(&bus, &conn, &config, &[]).await;
    let proxy: NotifierProxy = uncached(&conn).await;

    sync_failed(
        &conn,
        "offsite-a",
        "copy",
        "rsync: write failed: No space left on device (28)",
    )
    .await;
    let queued = signals.wait_for("NotificationQueued", |_| true, WAIT).await;
    let id = queued.args[0].clone();
    signals
        .wait_for(
            "PropertiesChanged",
            |s| s.args.iter().any(|a| a.contains("SMTP:")),
            WAIT,
        )
        .await;
    assert_eq!(proxy.pending().await.expect("Pending"), 1);
    assert!(!proxy.last_error().await.expect("LastError").is_empty());
    assert_eq!(outbox_files(dir.path(), "outbox"), [format!("{id}.json")]);

    // Restarting the notifier while the server is down keeps the message.
    drop(notifier);
    let _notifier = start(&bus, &conn, &config, &[]).await;
    assert_eq!(proxy.pending().await.expect("Pending"), 1);

    let smtp = Smtp::start(&dir.path().join("smtp"), port);
    proxy.flush().await.expect("Flush");
    let mails = smtp.wait_for(1, |_| true, WAIT).await;
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].id(), id);
    assert!(mails[0].body.contains("No space left on device"));
    signals
        .wait_for("NotificationSent", |s| s.args[0] == id, WAIT)
        .await;
    assert_eq!(proxy.pending().await.expect("Pending"), 0);
    assert_eq!(proxy.last_error().await.expect("LastError"), "");
    assert!(outbox_files(dir.path(), "outbox").is_empty());
}

async fn a_4xx_is_retried_and_a_5xx_is_dead_lettered() {
    if !require_aiosmtpd() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let smtp = Smtp::start(&dir.path().join("smtp"), 0);
    let config = config(dir.path(), smtp.port, &["offsite-a"], "");
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let notifier = start(&bus, &conn, &config, &[]).await;
    let proxy: NotifierProxy = uncached(&conn).await;

    smtp.set_mode("4xx 2");
    sync_failed(
        &conn,
        "offsite-a",
        "verify",
        "borg check: segment 12 is corrupt",
    )
    .await;
    let id = signals
        .wait_for("NotificationQueued", |_| true, WAIT)
        .await
        .args[0]
        .clone();
    // Refused twice with 451 (retried after 1 s and 2 s), then accepted.
    let mails = smtp.wait_for(1, |m| m.id() == id, WAIT).await;
    assert_eq!(mails.len(), 1);
    assert!(
        signals.count("PropertiesChanged", |s| s
            .args
            .iter()
            .any(|a| a.contains("451")))
            >= 1,
        "LastError showed the 451:\n{}",
        signals.listing()
    );
    signals
        .wait_for("NotificationSent", |s| s.args[0] == id, WAIT)
        .await;

    smtp.set_mode("5xx");
    sync_failed(&conn, "offsite-a", "verify", "a different failure").await;
    let dead = signals
        .wait_for("NotificationQueued", |s| s.args[0] != id, WAIT)
        .await
        .args[0]
        .clone();
    signals
        .wait_for(
            "PropertiesChanged",
            |s| s.args.iter().any(|a| a.contains("550")),
            WAIT,
        )
        .await;
    assert_eq!(proxy.dead_letters().await.expect("DeadLetters"), 1);
    assert_eq!(proxy.pending().await.expect("Pending"), 0);
    assert!(proxy.last_error().await.expect("LastError").contains("550"));
    assert_eq!(outbox_files(dir.path(), "dead"), [format!("{dead}.json")]);
    let reason = std::fs::read_to_string(
        dir.path()
            .join(format!("state/notifier/dead/{dead}.reason")),
    )
    .expect("reason");
    assert!(reason.contains("550"), "{reason}");
    assert!(
        notifier.log().contains("refused for good"),
        "a log line says so"
    );

    // Mail after a dead letter still flows.
    smtp.set_mode("ok");
    let id = proxy.send_test().await.expect("SendTest");
    smtp.wait_for(1, |m| m.id() == id, WAIT).await;
    signals
        .wait_for("NotificationSent", |s| s.args[0] == id, WAIT)
        .await;
    assert_eq!(proxy.last_error().await.expect("LastError"), "");
}

/// A pseudo-random number from the kernel, for kill delays.
fn random_below(n: u64) -> u64 {
    let uuid = ferry_integration_tests::random_uuid().replace('-', "");
    u64::from_str_radix(&uuid[..12], 16).unwrap_or(0) % n
}

async fn sigkill_at_random_points_loses_nothing_and_duplicates_at_most_once() {
    if !require_aiosmtpd() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let smtp = Smtp::start(&dir.path().join("smtp"), 0);
    // A slow server (0.3 s per message before the message is sent) keeps
    // messages between queueing and delivery long enough for kills to land
    // there. (Kills after the whole message went out are the next test's.)
    smtp.set_mode("slow-rcpt 0.3");
    let config = config(dir.path(), smtp.port, &["offsite-a"], "max-per-hour = 1000");
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let mut queued_ids = Vec::new();
    let mut delays = Vec::new();
    for round in 0..8 {
        let notifier = start(&bus, &conn, &config, &[]).await;
        let from = signals.len();
        for k in 0..3 {
            sync_failed(
                &conn,
                "offsite-a",
                "copy",
                &format!("round {round} failure {k}"),
            )
            .await;
        }
        let ids = wait_until(WAIT, || {
            let ids: Vec<String> = signals.all()[from..]
                .iter()
                .filter(|s| s.member == "NotificationQueued")
                .map(|s| s.args[0].clone())
                .collect();
            (ids.len() >= 3).then_some(ids)
        })
        .await;
        queued_ids.extend(ids);
        let delay = random_below(500);
        delays.push(delay);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        notifier.signal(libc::SIGKILL);
        assert!(notifier.wait_exit(WAIT).await.is_some(), "killed");
    }
    let pending_after_kills = outbox_files(dir.path(), "outbox").len();
    // Every message queued before a kill is delivered after the restarts.
    let _notifier = start(&bus, &conn, &config, &[]).await;
    wait_until(Duration::from_secs(60), || {
        outbox_files(dir.path(), "outbox").is_empty().then_some(())
    })
    .await;
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for mail in smtp.mails() {
        *per_id.entry(mail.id().to_string()).or_default() += 1;
    }
    // A message whose whole text had gone to the server when a kill came,
    // twice, is not sent a third time: it is a dead letter saying why (it
    // may have arrived), never silently dropped.
    let dead = outbox_files(dir.path(), "dead");
    let in_doubt = |id: &str| {
        dead.contains(&format!("{id}.json"))
            && std::fs::read_to_string(
                dir.path()
                    .join("state/notifier/dead")
                    .join(format!("{id}.reason")),
            )
            .is_ok_and(|r| r.contains("may already have arrived"))
    };
    for id in &queued_ids {
        let n = per_id.get(id).copied().unwrap_or(0);
        assert!(
            (1..=2).contains(&n) || (n == 0 && in_doubt(id)),
            "{id} arrived {n} times (kill delays {delays:?} ms): {per_id:#?}"
        );
    }
    assert!(
        per_id.keys().all(|id| queued_ids.contains(id)),
        "no mail the test did not cause: {per_id:#?}"
    );
    let duplicates = per_id.values().filter(|n| **n > 1).count();
    eprintln!(
        "{} messages, {pending_after_kills} still queued after the last kill, {duplicates} duplicated, kill delays {delays:?} ms",
        queued_ids.len()
    );
    assert!(
        pending_after_kills > 0,
        "no kill landed before delivery: {delays:?}"
    );
    assert!(
        dead.iter().all(|f| in_doubt(f.trim_end_matches(".json"))),
        "dead letters other than in-doubt ones: {dead:?}"
    );
    eprintln!("{} in doubt twice (dead letters)", dead.len());
}

/// The one window a crash can duplicate in: the server has the message and
/// the notifier is killed before it hears "250". The message is sent again
/// once, with the same event id, so a person (or a filter) sees it is the same.
async fn a_crash_after_the_server_accepted_duplicates_once_with_the_same_id() {
    if !require_aiosmtpd() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let smtp = Smtp::start(&dir.path().join("smtp"), 0);
    smtp.set_mode("delay 3");
    let config = config(dir.path(), smtp.port, &["offsite-a"], "");
    let conn = bus.connect().await;
    let notifier = start(&bus, &conn, &config, &[]).await;
    sync_failed(
        &conn,
        "offsite-a",
        "swap",
        "rename failed: Read-only file system",
    )
    .await;
    let first = smtp.wait_for(1, |_| true, WAIT).await;
    notifier.signal(libc::SIGKILL);
    assert!(notifier.wait_exit(WAIT).await.is_some(), "killed");
    smtp.set_mode("ok");
    let _notifier = start(&bus, &conn, &config, &[]).await;
    let both = smtp.wait_for(2, |_| true, WAIT).await;
    assert!(both.iter().all(|m| m.id() == first[0].id()), "{both:#?}");
    tokio::time::sleep(QUIET).await;
    assert_eq!(smtp.mails().len(), 2);
    assert!(outbox_files(dir.path(), "outbox").is_empty());
}

fn record(drive: &str, time: u64) -> SyncRecord {
    SyncRecord {
        drive: drive.into(),
        time,
        bytes: 1 << 30,
        seconds: 120.0,
        archive: "nas-2024-05-01".into(),
        free: 5 << 30,
    }
}

async fn stale_drives_and_profiles_are_mailed_on_a_test_clock_once_a_day() {
    if !require_aiosmtpd() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let smtp = Smtp::start(&dir.path().join("smtp"), 0);
    let config = config(
        dir.path(),
        smtp.port,
        &["offsite-a", "offsite-b", "offsite-c"],
        "drive-stale-days = 30\nprofile-grace-hours = 24",
    );
    let now: u64 = 1_800_000_000;
    // offsite-a: 35 days ago (stale now); offsite-b: stale in 3 s; offsite-c: fresh.
    let _sync = serve(
        &bus,
        sync::BUS_NAME,
        sync::OBJECT_PATH,
        FakeSync {
            last_syncs: vec![
                record("offsite-a", now - 35 * DAY),
                record("offsite-b", now - 30 * DAY + 3),
                record("offsite-c", now - DAY),
            ],
            last_failures: vec![],
        },
    )
    .await;
    // Profile home was due 25 h ago and last succeeded before that.
    let _borg = serve(
        &bus,
        borg::BUS_NAME,
        borg::OBJECT_PATH,
        FakeBorg {
            results: vec![BackupResult {
                profile: "home".into(),
                outcome: "finished".into(),
                time: now - 2 * DAY,
                archive: "home-1".into(),
                seconds: 60.0,
                message: String::new(),
            }],
            schedule: vec![
                ScheduleEntry {
                    profile: "home".into(),
                    due: now - 25 * 3600,
                    blocked: String::new(),
                    ..ScheduleEntry::default()
                },
                ScheduleEntry {
                    profile: "fresh".into(),
                    due: now + 3600,
                    blocked: String::new(),
                    ..ScheduleEntry::default()
                },
            ],
            last_failures: vec![],
            stats: String::new(),
        },
    )
    .await;
    let conn = bus.connect().await;
    let fake_now = now.to_string();
    let started = Instant::now();
    let notifier = start(&bus, &conn, &config, &[("FERRY_FAKE_NOW", &fake_now)]).await;

    let a = smtp
        .wait_for(1, |m| m.subject().contains("offsite-a"), WAIT)
        .await;
    assert_eq!(
        a[0].subject(),
        "[ferry] offsite-a was last synced 35 days ago"
    );
    assert!(a[0].body.contains("30 days"), "{:?}", a[0]);
    let home = smtp
        .wait_for(1, |m| m.subject().contains("home"), WAIT)
        .await;
    assert_eq!(
        home[0].subject(),
        "[ferry] backup home has not succeeded since it was due"
    );
    // offsite-b turns stale 3 s after start: a timer fires then, not before.
    let b = smtp
        .wait_for(1, |m| m.subject().contains("offsite-b"), WAIT)
        .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "offsite-b mailed after only {took:?}"
    );
    assert_eq!(
        b[0].subject(),
        "[ferry] offsite-b was last synced 30 days ago"
    );
    // At most once a day, also across a restart; fresh ones never.
    drop(notifier);
    let _notifier = start(&bus, &conn, &config, &[("FERRY_FAKE_NOW", &fake_now)]).await;
    tokio::time::sleep(QUIET).await;
    let mails = smtp.mails();
    assert_eq!(mails.len(), 3, "{mails:#?}");
    assert!(mails
        .iter()
        .all(|m| !m.subject().contains("offsite-c") && !m.subject().contains("fresh")));

    // A day later the reminders come again.
    let tomorrow = (now + DAY + 10).to_string();
    drop(_notifier);
    let _notifier = start(&bus, &conn, &config, &[("FERRY_FAKE_NOW", &tomorrow)]).await;
    smtp.wait_for(2, |m| m.subject().contains("offsite-a"), WAIT)
        .await;
}

async fn a_failure_while_the_notifier_was_stopped_is_mailed_when_it_starts() {
    if !require_aiosmtpd() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let smtp = Smtp::start(&dir.path().join("smtp"), 0);
    let config = config(dir.path(), smtp.port, &["offsite-a"], "");
    let conn = bus.connect().await;
    let now = ferry_service::unix_now();
    let _sync = serve(
        &bus,
        sync::BUS_NAME,
        sync::OBJECT_PATH,
        FakeSync {
            last_syncs: vec![record("offsite-a", now - DAY)],
            last_failures: vec![Failure {
                subject: "offsite-a".into(),
                time: now - 600,
                stage: "copy".into(),
                message: "rsync: read error: Input/output error (5)".into(),
            }],
        },
    )
    .await;
    let _borg = serve(
        &bus,
        borg::BUS_NAME,
        borg::OBJECT_PATH,
        FakeBorg {
            results: vec![],
            schedule: vec![],
            last_failures: vec![Failure {
                subject: "home".into(),
                time: now - 300,
                stage: "hook".into(),
                message: "before hook exited with 1: mount point missing".into(),
            }],
            stats: String::new(),
        },
    )
    .await;
    let notifier = start(&bus, &conn, &config, &[]).await;
    let sync_mail = smtp
        .wait_for(
            1,
            |m| m.subject() == "[ferry] sync of drive offsite-a failed at copy",
            WAIT,
        )
        .await;
    assert!(sync_mail[0].body.contains("Input/output error"));
    assert!(sync_mail[0]
        .body
        .contains("while ferry-notifier was not running"));
    smtp.wait_for(
        1,
        |m| m.subject() == "[ferry] backup home failed at hook",
        WAIT,
    )
    .await;

    // Started again, it remembers what it mailed.
    drop(notifier);
    let _notifier = start(&bus, &conn, &config, &[]).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(smtp.mails().len(), 2, "{:#?}", smtp.mails());
}

async fn a_hostile_label_or_message_cannot_add_a_header() {
    if !require_aiosmtpd() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let smtp = Smtp::start(&dir.path().join("smtp"), 0);
    let config = config(dir.path(), smtp.port, &["offsite-a"], "");
    let conn = bus.connect().await;
    let _notifier = start(&bus, &conn, &config, &[]).await;

    let label = "evil\r\nBcc: evil@x\r\nX-Injected: yes";
    emit(
        &conn,
        crypt::OBJECT_PATH,
        crypt::INTERFACE,
        "DriveFailed",
        &(
            label,
            "unlock\nSubject: owned",
            "message\r\n\r\nBcc: evil@x\r\n.\r\nMAIL FROM:<evil@x>",
        ),
    )
    .await;
    emit(
        &conn,
        borg::OBJECT_PATH,
        borg::INTERFACE,
        "BackupFailed",
        &(
            "j1",
            "home\u{2028}Bcc: evil@x",
            "hook",
            "hook said:\r\nBcc: evil@x",
        ),
    )
    .await;
    let mails = smtp.wait_for(2, |_| true, WAIT).await;
    for mail in &mails {
        assert_eq!(mail.rcpt_to, ["admin@home.test"], "{mail:#?}");
        for (name, value) in &mail.headers {
            assert!(
                !name.eq_ignore_ascii_case("bcc") && !name.eq_ignore_ascii_case("x-injected"),
                "{name}: {value}"
            );
            assert!(
                !value.contains("\\r") && !value.contains("\\n"),
                "{name}: {value:?}"
            );
        }
        assert_eq!(
            mail.headers.iter().filter(|(k, _)| k == "Subject").count(),
            1
        );
        let raw = String::from_utf8_lossy(&mail.raw);
        let header_block = raw.split("\r\n\r\n").next().unwrap_or("");
        assert!(
            !header_block
                .lines()
                .any(|l| l.to_ascii_lowercase().starts_with("bcc")),
            "{header_block}"
        );
    }
    let drive = mails
        .iter()
        .find(|m| m.body.contains("MAIL FROM:<evil@x>"))
        .expect("the hostile message is in a body");
    assert!(
        drive.subject().contains("evil Bcc: evil@x X-Injected: yes"),
        "{}",
        drive.subject()
    );
    assert!(
        drive.body.contains("Bcc: evil@x") && drive.body.contains("X-Injected: yes"),
        "the label is kept in the body: {}",
        drive.body
    );
}

async fn identical_failures_are_grouped_and_the_hourly_limit_holds_the_rest() {
    if !require_aiosmtpd() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let smtp = Smtp::start(&dir.path().join("smtp"), 0);
    let config = config(dir.path(), smtp.port, &["offsite-a"], "max-per-hour = 3");
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let notifier = start(&bus, &conn, &config, &[]).await;
    for _ in 0..4 {
        sync_failed(
            &conn,
            "offsite-a",
            "lock",
            "the repository is locked by another process",
        )
        .await;
    }
    for k in 0..4 {
        sync_failed(&conn, "offsite-a", "copy", &format!("distinct failure {k}")).await;
    }
    smtp.wait_for(3, |_| true, WAIT).await;
    tokio::time::sleep(QUIET).await;
    let mails = smtp.mails();
    assert_eq!(
        mails.len(),
        3,
        "one for the repeated failure, two more up to the limit: {mails:#?}"
    );
    assert_eq!(
        mails
            .iter()
            .filter(|m| m.subject().contains("at lock"))
            .count(),
        1
    );
    assert_eq!(signals.count("NotificationQueued", |_| true), 3);
    // The rest is remembered on disk for the follow-up and the digest.
    let ledger =
        std::fs::read_to_string(dir.path().join("state/notifier/ledger.json")).expect("ledger");
    assert!(ledger.contains("distinct failure 3"), "{ledger}");
    assert!(ledger.contains("\"repeats\": 3"), "{ledger}");
    assert!(notifier.log().contains("held for the next digest"));
}

async fn sendmail_gets_the_message_on_stdin_and_a_success_summary_is_mailed() {
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("sendmail-out");
    std::fs::create_dir(&out).expect("out dir");
    let sendmail = dir.path().join("fake-sendmail");
    std::fs::write(
        &sendmail,
        format!("#!/bin/sh\nn=$(date +%s%N)\nprintf '%s\\n' \"$@\" > {0}/$n.args\ncat > {0}/.$n.tmp && mv {0}/.$n.tmp {0}/$n.eml\n", out.display()),
    )
    .expect("write fake sendmail");
    std::fs::set_permissions(
        &sendmail,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let text = format!(
        "state-directory = \"{}\"\n{}[mail]\ntransport = \"sendmail\"\nsendmail = \"{}\"\nfrom = \"ferry@nas.test\"\nto = [\"admin@home.test\"]\n\n[notify]\nsync-success = true\n",
        dir.path().join("state").display(),
        drive_section("offsite-a", &ferry_integration_tests::random_uuid()),
        sendmail.display()
    );
    let config = write_config(dir.path(), &text);
    let _sync = serve(
        &bus,
        sync::BUS_NAME,
        sync::OBJECT_PATH,
        FakeSync {
            last_syncs: vec![record("offsite-a", ferry_service::unix_now())],
            last_failures: vec![],
        },
    )
    .await;
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let _notifier = start(&bus, &conn, &config, &[]).await;
    emit(
        &conn,
        sync::OBJECT_PATH,
        sync::INTERFACE,
        "SyncFinished",
        &("offsite-a", 1_288_490_189u64, 180.0f64),
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
    let sent = signals.wait_for("NotificationSent", |_| true, WAIT).await;
    assert_eq!(sent.args[1], "[ferry] offsite-a is safe to remove: 1.2 GiB copied in 3 min, newest archive nas-2024-05-01");
    let files: Vec<PathBuf> = std::fs::read_dir(&out)
        .expect("out")
        .flatten()
        .map(|e| e.path())
        .collect();
    let eml = files
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "eml"))
        .expect("a message");
    let message = std::fs::read_to_string(eml).expect("message");
    assert!(
        message.contains(&format!("X-Ferry-Event-Id: {}", sent.args[0])),
        "{message}"
    );
    let args = std::fs::read_to_string(eml.with_extension("args")).expect("args");
    assert_eq!(
        args.lines().collect::<Vec<_>>(),
        ["-i", "-f", "ferry@nas.test", "--", "admin@home.test"]
    );
}

async fn backup_finished(conn: &zbus::Connection, job: &str, profile: &str) {
    emit(
        conn,
        borg::OBJECT_PATH,
        borg::INTERFACE,
        "BackupFinished",
        &(job, profile, format!("{profile}-{job}")),
    )
    .await;
}

/// max-per-hour is counted per class: success summaries and test mails
/// that used up their hour never hold a failure back.
async fn a_failure_is_mailed_while_success_and_test_mails_used_up_the_hourly_limit() {
    if !require_aiosmtpd() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let smtp = Smtp::start(&dir.path().join("smtp"), 0);
    let config = config(
        dir.path(),
        smtp.port,
        &["offsite-a"],
        "max-per-hour = 2\nbackup-success = true",
    );
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let notifier = start(&bus, &conn, &config, &[]).await;
    let proxy = NotifierProxy::new(&conn).await.expect("proxy");
    for k in 0..3 {
        backup_finished(&conn, &format!("job-{k}"), "home").await;
    }
    for _ in 0..2 {
        proxy.send_test().await.expect("SendTest");
    }
    smtp.wait_for(2, |m| m.subject().contains("finished"), WAIT)
        .await;
    smtp.wait_for(2, |m| m.subject().contains("test message"), WAIT)
        .await;
    // The third success summary is over the limit: held for the digest.
    wait_until(WAIT, || {
        notifier
            .log()
            .contains("held for the next digest")
            .then_some(())
    })
    .await;
    sync_failed(&conn, "offsite-a", "copy", "read error: Input/output error").await;
    let failure = smtp
        .wait_for(1, |m| m.subject().contains("failed at copy"), WAIT)
        .await;
    assert!(failure[0].body.contains("Input/output error"));
    assert_eq!(
        smtp.mails()
            .iter()
            .filter(|m| m.subject().contains("finished"))
            .count(),
        2,
        "the third success summary waits for its digest"
    );
    assert_eq!(
        signals.count("NotificationQueued", |s| s.args[1]
            .starts_with("SyncFailed")),
        1
    );
}

/// The SMTP acceptance window: the server has the whole message and
/// ferry-notifier is killed before it hears "250" — five times in a row on
/// one message. It arrives at most twice; then it is a dead letter that
/// says why, listed over the bus and sent again only when asked.
async fn killed_at_the_250_five_times_a_message_arrives_at_most_twice() {
    if !require_aiosmtpd() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let smtp = Smtp::start(&dir.path().join("smtp"), 0);
    // Store the message, then hold back the 250 for a minute.
    smtp.set_mode("delay 60");
    let config = config(dir.path(), smtp.port, &["offsite-a"], "");
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let mut id = String::new();
    for round in 0..5 {
        let from = signals.len();
        let notifier = start(&bus, &conn, &config, &[]).await;
        if round == 0 {
            sync_failed(
                &conn,
                "offsite-a",
                "swap",
                "rename failed: Read-only file system",
            )
            .await;
            id = signals
                .wait_for_from(from, "NotificationQueued", |_| true, WAIT)
                .await
                .args[0]
                .clone();
        }
        // Kill when the server has one more copy, or when the notifier has
        // given up on the message (it is a dead letter).
        let copies = smtp.mails().len();
        wait_until(WAIT, || {
            (smtp.mails().len() > copies || !outbox_files(dir.path(), "dead").is_empty())
                .then_some(())
        })
        .await;
        notifier.signal(libc::SIGKILL);
        assert!(notifier.wait_exit(WAIT).await.is_some(), "killed");
    }
    let copies = smtp.mails();
    assert!(copies.iter().all(|m| m.id() == id), "{copies:#?}");
    assert!(copies.len() <= 2, "{} copies: {copies:#?}", copies.len());
    assert_eq!(outbox_files(dir.path(), "dead"), [format!("{id}.json")]);
    assert!(outbox_files(dir.path(), "outbox").is_empty());

    // Listed over the bus with why, and re-sent only when asked.
    smtp.set_mode("ok");
    let _notifier = start(&bus, &conn, &config, &[]).await;
    let proxy = NotifierProxy::new(&conn).await.expect("proxy");
    assert_eq!(proxy.dead_letters().await.expect("DeadLetters"), 1);
    let letters = proxy
        .list_dead_letters(Default::default())
        .await
        .expect("ListDeadLetters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].id, id);
    assert!(letters[0].subject.contains("failed at swap"), "{letters:?}");
    assert!(
        letters[0].error.contains("may already have arrived")
            && letters[0].error.contains("ResendDeadLetter"),
        "{letters:?}"
    );
    tokio::time::sleep(QUIET).await;
    assert_eq!(smtp.mails().len(), copies.len(), "not sent by itself");

    let unknown = proxy
        .resend_dead_letter("ferry-0000000001-0000000000000000", Default::default())
        .await
        .expect_err("no such dead letter");
    assert!(
        unknown.to_string().contains("org.ferry.Error.NotFound"),
        "{unknown}"
    );
    let mut options = std::collections::HashMap::new();
    options.insert("force", zbus::zvariant::Value::from(true));
    let bad = proxy
        .resend_dead_letter(&id, options)
        .await
        .expect_err("unknown option");
    assert!(
        bad.to_string().contains("org.ferry.Error.InvalidArgument"),
        "{bad}"
    );
    proxy
        .resend_dead_letter(&id, Default::default())
        .await
        .expect("ResendDeadLetter");
    smtp.wait_for(copies.len() + 1, |m| m.id() == id, WAIT)
        .await;
    wait_until(WAIT, || {
        (outbox_files(dir.path(), "dead").is_empty()
            && outbox_files(dir.path(), "outbox").is_empty())
        .then_some(())
    })
    .await;
    assert_eq!(proxy.dead_letters().await.expect("DeadLetters"), 0);
}

/// A damaged state file is moved aside and reported, never silently
/// dropped: the ledger to `ledger.json.bad-<time>` (the notifier starts
/// with a new one, which can only make mail more likely), a damaged outbox
/// letter to the dead letters, where DeadLetters and ListDeadLetters show
/// it with why; the mail queued beside it still goes.
async fn a_damaged_ledger_or_outbox_letter_is_moved_aside_and_reported() {
    if !require_aiosmtpd() {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let smtp = Smtp::start(&dir.path().join("smtp"), 0);
    let config = config(dir.path(), smtp.port, &["offsite-a"], "");
    let state = dir.path().join("state/notifier");
    std::fs::create_dir_all(state.join("outbox")).expect("outbox");
    std::fs::write(state.join("ledger.json"), "{ half a ledger").expect("ledger");
    let damaged = "ferry-1700000000-0000000000000001.json";
    std::fs::write(state.join("outbox").join(damaged), "{ half a mail").expect("letter");
    let conn = bus.connect().await;
    let _notifier = start(&bus, &conn, &config, &[]).await;

    let aside: Vec<String> = std::fs::read_dir(&state)
        .expect("state")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ledger.json.bad-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged ledger is kept aside");
    assert_eq!(
        std::fs::read_to_string(state.join(&aside[0])).expect("aside"),
        "{ half a ledger"
    );

    let proxy: NotifierProxy = uncached(&conn).await;
    let id = proxy.send_test().await.expect("SendTest");
    smtp.wait_for(1, |m| m.id() == id, WAIT).await;
    // The letter is removed once the server accepted it; the damaged one
    // is moved by the same pass.
    wait_until(WAIT, || {
        let dead = outbox_files(dir.path(), "dead") == [damaged];
        (dead && outbox_files(dir.path(), "outbox").is_empty()).then_some(())
    })
    .await;
    assert_eq!(proxy.dead_letters().await.expect("DeadLetters"), 1);
    let letters = proxy
        .list_dead_letters(Default::default())
        .await
        .expect("ListDeadLetters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(letters[0].error.contains("unreadable"), "{letters:?}");
}

ferry_integration_tests::integration_tests! {
    async Machine: [
        failures_are_mailed_with_what_where_and_the_message,
        mail_waits_while_the_server_is_down_and_goes_when_it_is_back,
        a_4xx_is_retried_and_a_5xx_is_dead_lettered,
        sigkill_at_random_points_loses_nothing_and_duplicates_at_most_once,
        a_crash_after_the_server_accepted_duplicates_once_with_the_same_id,
        stale_drives_and_profiles_are_mailed_on_a_test_clock_once_a_day,
        a_failure_while_the_notifier_was_stopped_is_mailed_when_it_starts,
        a_hostile_label_or_message_cannot_add_a_header,
        identical_failures_are_grouped_and_the_hourly_limit_holds_the_rest,
        sendmail_gets_the_message_on_stdin_and_a_success_summary_is_mailed,
        a_failure_is_mailed_while_success_and_test_mails_used_up_the_hourly_limit,
        killed_at_the_250_five_times_a_message_arrives_at_most_twice,
        a_damaged_ledger_or_outbox_letter_is_moved_aside_and_reported,
    ],
}
