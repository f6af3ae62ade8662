//! ferryctl against the real services on a private bus: what it says is
//! what the services report, `watch` works for a user who is not root, and
//! `backup --wait` exits with the job's outcome.

use std::process::Stdio;
use std::time::Duration;

use ferry_integration_tests::binary_path;
use ferry_integration_tests::smtp::require_aiosmtpd;
use ferry_integration_tests::system::{FerrySystem, Options, DRIVE, PROFILE};
use ferry_integration_tests::{require_command, require_loop_devices, require_root, require_udevd};
use ferry_interfaces::sync::SyncProxy;
use tokio::io::{AsyncBufReadExt, BufReader};

const WAIT: Duration = Duration::from_secs(60);

async fn start(options: Options) -> Option<FerrySystem> {
    let ready = require_root()
        && require_udevd()
        && require_loop_devices()
        && require_command("borg", "borgbackup")
        && require_command("mkfs.ext4", "e2fsprogs")
        && require_command("setpriv", "util-linux")
        && require_aiosmtpd();
    if !ready {
        return None;
    }
    Some(FerrySystem::start(options, &|line| eprintln!("{line}")).await)
}

/// Runs ferryctl on the system's bus; its exit code, stdout and stderr.
async fn ferryctl(system: &FerrySystem, args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(binary_path("ferryctl"))
        .arg("--address")
        .arg(system.bus.address())
        .args(args)
        .output()
        .await
        .expect("run ferryctl");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn plug_in_and_sync(system: &mut FerrySystem) -> String {
    let from = system.signals.len();
    let device = system.drive.attach();
    system
        .signals
        .wait_for_from(from, "DriveClosed", |s| s.args[0] == DRIVE, WAIT)
        .await;
    system
        .signals
        .wait_for_from(from, "ColorChanged", |s| s.args[1] == "done", WAIT)
        .await;
    device
}

async fn status_words_what_the_services_report() {
    let Some(mut system) = start(Options::default()).await else {
        return;
    };
    let (code, out, err) = ferryctl(&system, &["backup", PROFILE, "--wait"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let device = plug_in_and_sync(&mut system).await;
    let synced = SyncProxy::new(&system.conn)
        .await
        .expect("Sync1 proxy")
        .last_syncs()
        .await
        .expect("LastSyncs");
    let record = synced
        .iter()
        .find(|r| r.drive == DRIVE)
        .expect("a ledger entry for the drive");

    let config = system.config.display().to_string();
    let (code, text, stderr) = ferryctl(&system, &["--config", &config, "status"]).await;
    assert_eq!(code, 0, "ferryctl status failed: {stderr}\n{text}");
    assert!(!text.contains("STALE"), "just synced, yet:\n{text}");
    for expected in [
        format!("{DRIVE:<14} plugged in as {device}"),
        "last synced just now (".to_string(),
        format!("newest archive {}", record.archive),
        format!("{PROFILE:<14} last run just now ("),
        format!(
            "finished, archive {}",
            record.archive.rsplit("::").next().unwrap_or_default()
        ),
        "LED     done".to_string(),
        "Mail    ".to_string(),
    ] {
        assert!(text.contains(&expected), "{expected:?} not in:\n{text}");
    }

    let (code, json, stderr) = ferryctl(&system, &["status", "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&json).expect("status --json is JSON");
    let drive = &json["drives"][0];
    assert_eq!(drive["name"], DRIVE);
    assert_eq!(drive["last_sync"]["bytes"], record.bytes);
    assert_eq!(drive["last_sync"]["time"], record.time);
    assert_eq!(drive["last_sync"]["archive"], record.archive.as_str());
    assert_eq!(json["led"]["state"], "done");
}

async fn watch_prints_a_flow_for_a_user_who_is_not_root() {
    let Some(mut system) = start(Options {
        open_bus: true,
        ..Options::default()
    })
    .await
    else {
        return;
    };
    let mut watcher = tokio::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(binary_path("ferryctl"))
        .arg("--address")
        .arg(system.bus.address())
        .arg("watch")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start ferryctl watch as nobody");
    let mut lines = BufReader::new(watcher.stdout.take().expect("stdout")).lines();
    let mut next_line = async || {
        tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("ferryctl watch printed a line in time")
            .expect("read ferryctl watch")
            .expect("ferryctl watch still running")
    };
    assert!(next_line().await.starts_with("watching ferry's signals"));

    plug_in_and_sync(&mut system).await;
    let mut seen = Vec::new();
    for wanted in [
        format!("drive {DRIVE} plugged in as"),
        format!("drive {DRIVE} opened at"),
        format!("drive {DRIVE}: copying repository {PROFILE}"),
        format!("drive {DRIVE}: synced"),
        format!("drive {DRIVE} closed and locked: safe to remove"),
        "LED done".to_string(),
    ] {
        loop {
            let line = next_line().await;
            seen.push(line.clone());
            if line.contains(&wanted) {
                break;
            }
        }
    }
    let _ = watcher.kill().await;
    eprintln!("ferryctl watch as nobody printed:\n{}", seen.join("\n"));
}

async fn backup_wait_exits_with_the_outcome_of_the_job() {
    let Some(system) = start(Options::default()).await else {
        return;
    };
    let (code, out, err) = ferryctl(&system, &["backup", PROFILE, "--wait"]).await;
    assert_eq!(code, 0, "a good backup: {out}{err}");
    assert!(
        out.contains(&format!("backup {PROFILE} finished: archive ")),
        "{out}"
    );

    // Take the repository away: borg fails, and so does the command.
    let moved = system.repository.with_extension("away");
    std::fs::rename(&system.repository, &moved).expect("move the repository away");
    let (code, out, err) = ferryctl(&system, &["backup", PROFILE, "--wait"]).await;
    std::fs::rename(&moved, &system.repository).expect("put the repository back");
    assert_eq!(code, 1, "a failed backup exits 1: {out}{err}");
    assert!(
        err.contains(&format!("backup {PROFILE} FAILED at ")),
        "{err}"
    );

    let (code, _, err) = ferryctl(&system, &["backup", "no-such-profile", "--wait"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no-such-profile"), "{err}");
}

async fn check_config_names_every_problem_with_its_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "[drives.a]\nuuid = \"1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9\"\nmount-point = \"/x\"\n",
    )
    .expect("write");
    let output = std::process::Command::new(binary_path("ferryctl"))
        .arg("check-config")
        .arg(&broken)
        .output()
        .expect("run ferryctl");
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("broken.toml:3: drives.a.mount-point: unknown field"),
        "{text}"
    );

    // Seed 000's borgmatic file, as its author wrote it (see
    // ../shared/seeds/000_…): an SSH server and sources this machine lacks.
    let config = dir.path().join("ferry.toml");
    let borgmatic = dir.path().join("borgmatic.yaml");
    std::fs::write(&borgmatic, SEED_000_BORGMATIC).expect("write the seed's borgmatic file");
    std::fs::write(
        &config,
        format!(
            "[profiles.laptop]\nborgmatic-config = \"{}\"\n",
            borgmatic.display()
        ),
    )
    .expect("write ferry.toml");
    let output = std::process::Command::new(binary_path("ferryctl"))
        .arg("check-config")
        .arg(&config)
        .output()
        .expect("run ferryctl");
    let report = String::from_utf8_lossy(&output.stdout);
    eprintln!("check-config on seed 000's borgmatic file:\n{report}");
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert!(
        report.contains("profiles.laptop: source ")
            && report.contains("Private/other-important-files does not exist"),
        "{report}"
    );
}

/// Seed 000's borgmatic-config.yaml, as its author wrote it.
const SEED_000_BORGMATIC: &str =
    include_str!("../../services/borg/tests/fixtures/seed-000-borgmatic.yaml");

async fn simulate_plug_says_what_would_be_copied_and_writes_nothing() {
    let Some(system) = start(Options::default()).await else {
        return;
    };
    let (code, out, err) = ferryctl(&system, &["backup", PROFILE, "--wait"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let image_before = std::fs::read(system.drive.path()).expect("read the drive image");
    let repository_files = files_and_times(&system.repository);

    let config = system.config.display().to_string();
    let (code, out, err) =
        ferryctl(&system, &["--config", &config, "simulate", "plug", DRIVE]).await;
    assert_eq!(code, 0, "{out}{err}");
    for expected in [
        format!("If {DRIVE} were plugged in now:"),
        format!("mount it at {}", system.mountpoint.display()),
        format!("{PROFILE} ({}):", system.repository.display()),
        "(never synced: everything)".to_string(),
        "the drive's free space is not known yet".to_string(),
        "Nothing was written.".to_string(),
    ] {
        assert!(out.contains(&expected), "{expected:?} not in:\n{out}");
    }
    assert!(
        std::fs::read(system.drive.path()).expect("read the drive image") == image_before,
        "simulate plug changed the drive image"
    );
    assert_eq!(files_and_times(&system.repository), repository_files);

    let (code, _, err) =
        ferryctl(&system, &["--config", &config, "simulate", "plug", "nope"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "no drive named nope is enrolled in ferry.toml (enrolled: {DRIVE})"
        )),
        "{err}"
    );
}

/// Every file below `root` with its size and modification time.
fn files_and_times(root: &std::path::Path) -> Vec<(std::path::PathBuf, u64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut all = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let entry = entry.expect("entry");
            let meta = entry.metadata().expect("metadata");
            if meta.is_dir() {
                todo.push(entry.path());
            } else {
                all.push((entry.path(), meta.len(), meta.mtime_nsec()));
            }
        }
    }
    all.sort();
    all
}

async fn open_hold_mounts_read_only_without_a_sync_and_archives_lists_the_copy() {
    let Some(mut system) = start(Options::default()).await else {
        return;
    };
    let (code, out, err) = ferryctl(&system, &["backup", PROFILE, "--wait"]).await;
    assert_eq!(code, 0, "{out}{err}");
    plug_in_and_sync(&mut system).await;
    // Closed after its flow and still plugged in: the image is at rest.
    let image_before = std::fs::read(system.drive.path()).expect("read the drive image");

    let from = system.signals.len();
    let (code, out, err) = ferryctl(&system, &["open", DRIVE, "--hold"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "drive {DRIVE} held read-only at {}",
            system.mountpoint.display()
        )),
        "{out}"
    );
    // In a person's use: not safe to remove.
    system
        .signals
        .wait_for_from(from, "ColorChanged", |s| s.args[1] == "working", WAIT)
        .await;
    let options = mount_options(&system.mountpoint).expect("the held drive is mounted");
    assert!(
        options.split(',').any(|o| o == "ro"),
        "mounted with {options}"
    );

    let config = system.config.display().to_string();
    let (code, out, err) = ferryctl(&system, &["--config", &config, "archives", DRIVE]).await;
    assert_eq!(code, 0, "{out}{err}");
    let archives = system.archives();
    assert!(!archives.is_empty());
    for archive in &archives {
        assert!(out.contains(archive.as_str()), "{archive} not in:\n{out}");
    }

    let (code, out, err) = ferryctl(&system, &["close", DRIVE]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("closed and locked: safe to remove"), "{out}");
    assert!(
        mount_options(&system.mountpoint).is_none(),
        "still mounted after close"
    );
    // Closed and still plugged in: safe to remove again.
    system
        .signals
        .wait_for_from(from, "ColorChanged", |s| s.args[1] == "done", WAIT)
        .await;
    let during: Vec<String> = system.signals.all()[from..]
        .iter()
        .map(|s| s.member.clone())
        .collect();
    assert!(
        !during.iter().any(|m| m.starts_with("Sync")),
        "a held drive was synced: {during:?}"
    );
    assert!(
        std::fs::read(system.drive.path()).expect("read the drive image") == image_before,
        "holding the drive and listing its archives changed its image"
    );

    let (code, _, err) = ferryctl(&system, &["--config", &config, "archives", DRIVE]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("ferryctl open {DRIVE} --hold")),
        "{err}"
    );
}

/// The mount options of what is mounted at `mountpoint`, from mountinfo.
fn mount_options(mountpoint: &std::path::Path) -> Option<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = mountpoint.display().to_string();
    mountinfo.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        (fields.get(4) == Some(&wanted.as_str())).then(|| fields[5].to_string())
    })
}

ferry_integration_tests::integration_tests! {
    async Machine: [
        status_words_what_the_services_report,
        watch_prints_a_flow_for_a_user_who_is_not_root,
        backup_wait_exits_with_the_outcome_of_the_job,
        check_config_names_every_problem_with_its_place,
        simulate_plug_says_what_would_be_copied_and_writes_nothing,
        open_hold_mounts_read_only_without_a_sync_and_archives_lists_the_copy,
    ],
}
