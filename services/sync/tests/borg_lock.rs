//! ferry-sync's hold on borg's lock, against the installed borg: while it
//! is held borg cannot get in; released (or its holder gone) borg can; and
//! it waits for a borg command that holds the lock, up to lock-wait.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ferry_sync::borg::Borg;
use ferry_sync::job::{Stage, Stop};

fn borg(base: &Path, args: &[&str]) -> Output {
    Command::new("borg")
        .args(args)
        .env("BORG_BASE_DIR", base)
        .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
        .output()
        .expect("run borg (apt-get install borgbackup)")
}

/// borg is what ferry-sync drives: without it these tests fail, saying
/// what to install (a silent pass would hide that nothing was tested).
fn have_borg() -> bool {
    let ok = Command::new("borg").arg("--version").output().is_ok();
    assert!(ok, "borg is missing (apt-get install borgbackup)");
    ok
}

/// Waits (up to 30 s) until `path` exists: the holder says it has the lock.
fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn new_repo(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = dir.join("base");
    let repo = dir.join("repo");
    let out = borg(
        &base,
        &["init", "-e", "none", repo.to_str().expect("utf-8")],
    );
    assert!(out.status.success(), "{out:?}");
    (base, repo)
}

#[tokio::test]
async fn the_lock_keeps_borg_out_until_released() {
    if !have_borg() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (base, repo) = new_repo(dir.path());
    let repo_arg = repo.to_str().expect("utf-8");
    let (_stop_tx, mut stop) = Stop::new();
    let lock = Borg::new(&Default::default())
        .lock(&repo, Duration::from_secs(5), &mut stop, |_| async {})
        .await
        .expect("lock");
    let shut_out = borg(&base, &["list", "--lock-wait", "1", repo_arg]);
    assert!(!shut_out.status.success(), "borg got in while locked");
    assert!(
        String::from_utf8_lossy(&shut_out.stderr).contains("lock"),
        "{shut_out:?}"
    );
    lock.release().await;
    let listed = borg(&base, &["list", "--lock-wait", "1", repo_arg]);
    assert!(listed.status.success(), "{listed:?}");
    let left: Vec<String> = std::fs::read_dir(&repo)
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("lock"))
        .collect();
    assert!(left.is_empty(), "lock files left: {left:?}");

    // Dropped without release (ferry-sync dying): the helper lets go too.
    let lock = Borg::new(&Default::default())
        .lock(&repo, Duration::from_secs(5), &mut stop, |_| async {})
        .await
        .expect("lock again");
    drop(lock);
    let listed = borg(&base, &["list", "--lock-wait", "10", repo_arg]);
    assert!(listed.status.success(), "{listed:?}");
}

#[tokio::test]
async fn it_waits_for_a_borg_command_holding_the_lock_and_gives_up_after_lock_wait() {
    if !have_borg() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (base, repo) = new_repo(dir.path());
    let repo_arg = repo.to_str().expect("utf-8").to_string();
    let ready = dir.path().join("lock-held");
    let holder = {
        let base = base.clone();
        let ready = ready.clone();
        std::thread::spawn(move || {
            let script = format!("touch '{}'; sleep 3", ready.display());
            borg(&base, &["with-lock", &repo_arg, "sh", "-c", &script])
        })
    };
    // borg runs the command only once it holds the lock.
    wait_for_file(&ready);
    let (_stop_tx, mut stop) = Stop::new();
    let failure = match Borg::new(&Default::default())
        .lock(&repo, Duration::from_secs(1), &mut stop, |_| async {})
        .await
    {
        Ok(_) => panic!("got the lock while borg with-lock held it"),
        Err(failure) => failure,
    };
    assert_eq!(failure.stage, Stage::Lock);
    assert!(failure.message.contains("lock-wait"), "{}", failure.message);

    let started = Instant::now();
    let lock = Borg::new(&Default::default())
        .lock(&repo, Duration::from_secs(30), &mut stop, |_| async {})
        .await
        .expect("lock after with-lock");
    assert!(started.elapsed() < Duration::from_secs(10));
    lock.release().await;
    let out = holder.join().expect("holder");
    assert!(out.status.success(), "{out:?}");
}
