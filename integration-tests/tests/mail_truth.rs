//! What ferry mails is what happened, all of it: real ferry-borg and
//! ferry-notifier, a real SMTP server (python3-aiosmtpd). A profile that
//! fails twelve times while the notifier is stopped is mailed twelve times
//! when it starts (Borg1.FailureHistory, by id), and nothing twice.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use ferry_integration_tests::smtp::{require_aiosmtpd, Smtp};
use ferry_integration_tests::{require_command, SignalRecorder, TestBus};
use ferry_interfaces::borg::{self, BorgProxy};
use ferry_interfaces::notifier;

const FAILURES: usize = 12;

/// Whether `mail` reports job `job` (its "Job:" line).
fn reports(mail: &ferry_integration_tests::smtp::Received, job: &str) -> bool {
    mail.body
        .lines()
        .any(|l| l.trim_end() == format!("Job:   {job}"))
}

fn config(dir: &Path, port: u16) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).expect("src");
    std::fs::write(dir.join("passphrase"), "not used").expect("passphrase");
    std::fs::set_permissions(
        dir.join("passphrase"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    // Grouping of identical failures is turned off: every failure is its
    // own mail, so the count says whether one was lost.
    let text = format!(
        "state-directory = \"{state}\"\n\n\
         [repositories.main]\npath = \"{repo}\"\npassphrase-file = \"{pass}\"\n\n\
         [profiles.broken]\nrepository = \"main\"\nsources = [\"{src}\"]\n\
         [profiles.broken.hooks]\nbefore = [\"echo the mount point is missing >&2; exit 3\"]\n\n\
         [mail]\nfrom = \"ferry@nas.test\"\nto = [\"admin@home.test\"]\nsmtp-host = \"127.0.0.1\"\n\
         smtp-port = {port}\nsecurity = \"none\"\ntimeout-seconds = 10\nretry-min-seconds = 1\n\
         retry-max-seconds = 2\n\n\
         [notify]\nrepeat-window-minutes = 0\nmax-per-hour = 50\n",
        state = dir.join("state").display(),
        repo = dir.join("repo").display(),
        pass = dir.join("passphrase").display(),
        src = src.display(),
    );
    write_config(dir, &text)
}

async fn twelve_failures_while_the_notifier_is_stopped_are_twelve_mails_when_it_starts() {
    if !require_aiosmtpd() || !require_command("borg", "borgbackup") {
        return;
    }
    let bus = TestBus::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let smtp = Smtp::start(&dir.path().join("smtp"), 0);
    let config = config(dir.path(), smtp.port);
    let config_arg = config.to_string_lossy().to_string();
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let base = dir.path().join("borg-base").display().to_string();
    let borg_process = bus.spawn(
        "ferry-borg",
        &["--config", &config_arg],
        &[("BORG_BASE_DIR", &base)],
    );
    borg_process
        .wait_for_name(&conn, borg::BUS_NAME, WAIT)
        .await;
    let borg: BorgProxy<'static> = uncached(&conn).await;
    let fail_once = || async {
        let job = borg.start("broken").await.expect("Start");
        let failed = signals
            .wait_for("BackupFailed", |s| s.args.first() == Some(&job), WAIT)
            .await;
        assert_eq!(failed.args[2], "hook", "{failed}");
        job
    };

    // One failure while the notifier runs: mailed at once.
    let notifier_process = bus.spawn("ferry-notifier", &["--config", &config_arg], &[]);
    notifier_process
        .wait_for_name(&conn, notifier::BUS_NAME, WAIT)
        .await;
    let first = fail_once().await;
    smtp.wait_for(1, |m| reports(m, &first), WAIT).await;
    drop(notifier_process);

    // Twelve while it is stopped (each kept in Borg1.FailureHistory).
    let mut jobs = Vec::new();
    for _ in 0..FAILURES {
        jobs.push(fail_once().await);
    }
    assert_eq!(
        borg.last_failures().await.expect("LastFailures").len(),
        1,
        "LastFailures keeps one per profile"
    );
    let history = borg.failure_history().await.expect("FailureHistory");
    assert_eq!(history.len(), FAILURES + 1, "{history:#?}");

    let _notifier = bus.spawn("ferry-notifier", &["--config", &config_arg], &[]);
    let mails = smtp
        .wait_for(
            FAILURES,
            |m| jobs.iter().any(|j| reports(m, j)),
            Duration::from_secs(60),
        )
        .await;
    for job in &jobs {
        let n = mails.iter().filter(|m| reports(m, job)).count();
        assert_eq!(n, 1, "job {job} mailed {n} times");
    }
    assert!(mails
        .iter()
        .all(|m| m.subject() == "[ferry] backup broken failed at hook"
            && m.body.contains("while ferry-notifier was not running")));
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        smtp.mails().len(),
        FAILURES + 1,
        "nothing mailed twice: {:#?}",
        smtp.mails()
    );
}

ferry_integration_tests::integration_tests! {
    async Machine: [
        twelve_failures_while_the_notifier_is_stopped_are_twelve_mails_when_it_starts,
    ],
}
