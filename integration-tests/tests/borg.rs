//! ferry-borg against real borg 1.2 and real repositories on a private bus:
//! the whole create/prune/compact/check cycle, retention, hooks, skips,
//! failures in borg's words, lock contention, a crash mid-create, Cancel,
//! seed 000's borgmatic file, secrets kept off argv/environ/logs, drives
//! refused as repositories, logind's inhibitor, and the contract.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ferry_integration_tests::introspection::assert_matches_contract;
use ferry_integration_tests::{require_command, ServiceProcess, SignalRecorder, TestBus};
use ferry_interfaces::borg::{self, BorgProxy};

/// Long enough for a small borg run on a busy 2-core machine.
const BORG_WAIT: Duration = Duration::from_secs(120);

/// A test's borg world: a temp dir with sources, repositories, the
/// passphrase file, BORG_BASE_DIR and the state directory.
struct World {
    dir: tempfile::TempDir,
    passphrase: String,
}

impl World {
    fn new() -> Option<World> {
        if !require_command("borg", "borgbackup") {
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let passphrase = format!("ferry-test-{}", ferry_integration_tests::random_uuid());
        let world = World { dir, passphrase };
        std::fs::write(world.passphrase_file(), &world.passphrase).expect("passphrase");
        std::fs::set_permissions(
            world.passphrase_file(),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        let src = world.path("src");
        std::fs::create_dir_all(src.join("docs")).expect("src");
        std::fs::write(src.join("docs/note.txt"), "a note\n").expect("file");
        std::fs::write(src.join("file1"), vec![7u8; 3115]).expect("file");
        std::fs::create_dir_all(src.join("cache")).expect("cache");
        std::fs::write(src.join("cache/.nobackup"), "").expect("marker");
        std::fs::write(src.join("cache/big"), "excluded\n").expect("file");
        Some(world)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn passphrase_file(&self) -> PathBuf {
        self.path("passphrase")
    }

    /// The environment of the test's own borg runs and of ferry-borg.
    fn borg_env(&self) -> Vec<(String, String)> {
        vec![(
            "BORG_BASE_DIR".to_string(),
            self.path("borg-base").display().to_string(),
        )]
    }

    /// Runs the test's own borg (passphrase through BORG_PASSCOMMAND, so it
    /// is on no command line or environment either); returns stdout.
    async fn borg(&self, args: &[&str]) -> String {
        let output = self.borg_raw(args).await;
        assert!(
            output.status.success(),
            "borg {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    async fn borg_raw(&self, args: &[&str]) -> std::process::Output {
        let run = tokio::process::Command::new("borg")
            .args(args)
            .envs(self.borg_env())
            .env(
                "BORG_PASSCOMMAND",
                format!("cat {}", self.passphrase_file().display()),
            )
            .env_remove("BORG_PASSPHRASE")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(BORG_WAIT, run)
            .await
            .unwrap_or_else(|_| panic!("borg {args:?} took longer than {BORG_WAIT:?}"))
            .expect("run borg")
    }

    async fn init(&self, name: &str) -> PathBuf {
        let repo = self.path(name);
        self.borg(&["init", "--encryption=repokey", &repo.to_string_lossy()])
            .await;
        repo
    }

    async fn archives(&self, repo: &Path) -> Vec<String> {
        let mut names: Vec<String> = self
            .borg(&["list", "--short", &repo.to_string_lossy()])
            .await
            .lines()
            .map(str::to_string)
            .collect();
        names.sort();
        names
    }

    /// A big sparse file, so that borg create runs for seconds.
    fn slow_source(&self, gib: u64) -> PathBuf {
        let dir = self.path("slow");
        std::fs::create_dir_all(&dir).expect("slow dir");
        let file = std::fs::File::create(dir.join("sparse")).expect("sparse");
        file.set_len(gib << 30).expect("truncate");
        dir
    }

    fn config(&self, body: &str) -> PathBuf {
        let text = format!(
            "state-directory = \"{}\"\n\n[repositories.main]\npath = \"{}\"\npassphrase-file = \"{}\"\n\n{body}",
            self.path("state").display(),
            self.path("repo").display(),
            self.passphrase_file().display()
        );
        write_config(self.dir.path(), &text)
    }
}

/// ferry-borg on the bus with its proxy and a signal recorder.
struct Running {
    conn: zbus::Connection,
    signals: SignalRecorder,
    process: ServiceProcess,
    proxy: BorgProxy<'static>,
}

async fn start_service(bus: &TestBus, world: &World, config: &Path) -> Running {
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let process = spawn(bus, world, config);
    process.wait_for_name(&conn, borg::BUS_NAME, WAIT).await;
    let proxy: BorgProxy<'static> = uncached(&conn).await;
    Running {
        conn,
        signals,
        process,
        proxy,
    }
}

fn spawn(bus: &TestBus, world: &World, config: &Path) -> ServiceProcess {
    let env = world.borg_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    bus.spawn("ferry-borg", &["--config", &config.to_string_lossy()], &env)
}

impl Running {
    /// Start(profile) and wait for the job's end signal; returns (job, end).
    async fn run(&self, profile: &str, end: &str) -> (String, ferry_integration_tests::Recorded) {
        let job = self.proxy.start(profile).await.expect("Start");
        let ended = self
            .signals
            .wait_for(end, |s| s.args.first() == Some(&job), BORG_WAIT)
            .await;
        (job, ended)
    }

    async fn ended(&self, job: &str) -> ferry_integration_tests::Recorded {
        let ends = ["BackupFinished", "BackupFailed", "BackupSkipped"];
        self.signals
            .wait_for_any(
                &ends,
                |s| s.args.first().map(String::as_str) == Some(job),
                BORG_WAIT,
            )
            .await
    }
}

/// The whole cycle: create, prune, compact, check; archives listed after;
/// stats, results and the schedule on the bus and across a restart; Start of
/// a running profile returns its job; the contract.
async fn full_cycle_then_results_survive_a_restart() {
    let Some(world) = World::new() else { return };
    let repo = world.init("repo").await;
    let config = world.config(&format!(
        "[profiles.home]\nrepository = \"main\"\nsources = [\"{}\"]\nexclude-patterns = [\"*.tmp\"]\nexclude-if-present = [\".nobackup\"]\narchive-name-format = \"home-{{now:%Y-%m-%dT%H:%M:%S.%f}}\"\ninterval = \"1 day\"\n\n[profiles.home.retention]\nkeep-daily = 7\n\n[profiles.home.checks]\nrepository = \"always\"\narchives = \"1 week\"\n",
        world.path("src").display()
    ));
    let bus = TestBus::start();
    let service = start_service(&bus, &world, &config).await;
    assert_matches_contract(&service.conn, borg::INTERFACE).await;
    assert_eq!(service.proxy.profiles().await.expect("Profiles"), ["home"]);

    let job = service.proxy.start("home").await.expect("Start");
    let again = service.proxy.start("home").await.expect("Start again");
    assert_eq!(
        again, job,
        "Start of a running profile returns the running job"
    );
    let finished = service
        .signals
        .wait_for("BackupFinished", |s| s.args[0] == job, BORG_WAIT)
        .await;
    assert_eq!(
        service.signals.count("BackupStarted", |s| s.args
            == [job.clone(), "home".to_string()]),
        1
    );
    let archive = finished.args[2].clone();
    assert!(archive.starts_with("home-"), "{archive}");
    assert_eq!(world.archives(&repo).await, std::slice::from_ref(&archive));
    let files = world
        .borg(&["list", "--short", &format!("{}::{archive}", repo.display())])
        .await;
    assert!(files.contains("docs/note.txt"), "{files}");
    assert!(!files.contains("cache/big"), "exclude-if-present: {files}");

    let log = service.process.log();
    for stage in ["create", "prune", "compact", "check"] {
        assert!(
            log.contains(&format!("running borg {stage}")),
            "stage {stage} ran:\n{log}"
        );
    }
    assert!(
        !log.contains("--repository-only")
            && log.contains("running borg check --log-json --lock-wait=60 -- "),
        "the first run checks repository and archives together:\n{log}"
    );
    let stats = service.proxy.get_stats("home").await.expect("GetStats");
    assert!(
        stats.contains(&archive) && stats.contains("\"nfiles\""),
        "{stats}"
    );
    assert!(service.proxy.jobs().await.expect("Jobs").is_empty());
    let results = service.proxy.last_results().await.expect("LastResults");
    assert_eq!(results.len(), 1);
    assert_eq!(
        (results[0].outcome.as_str(), results[0].archive.as_str()),
        ("finished", archive.as_str())
    );
    let schedule = service.proxy.schedule().await.expect("Schedule");
    assert_eq!(schedule[0].due, results[0].time + 86_400);
    assert_eq!(schedule[0].blocked, "");
    let err = service
        .proxy
        .start("nope")
        .await
        .expect_err("unknown profile");
    assert!(
        err.to_string().contains("UnknownProfile") && err.to_string().contains("configured: home"),
        "{err}"
    );

    // Second run: archives check not due for a week, so only the repository is checked.
    let n = service.signals.len();
    let (_, second) = service.run("home", "BackupFinished").await;
    assert!(service.signals.len() > n);
    let log = service.process.log();
    assert!(
        log.contains("running borg check --log-json --lock-wait=60 --repository-only"),
        "{log}"
    );
    assert_eq!(world.archives(&repo).await.len(), 2);
    drop(service);

    // A restart keeps the results and the stats.
    let service = start_service(&bus, &world, &config).await;
    let results = service.proxy.last_results().await.expect("LastResults");
    assert_eq!(results[0].archive, second.args[2]);
    assert!(service
        .proxy
        .get_stats("home")
        .await
        .expect("GetStats")
        .contains(&second.args[2]));
}

/// Retention prunes exactly the archives borg's rules say, and only this
/// profile's archives.
async fn retention_prunes_exactly_the_expected_archives() {
    let Some(world) = World::new() else { return };
    let repo = world.init("repo").await;
    let src = world.path("src").display().to_string();
    for day in 1..=6 {
        for (prefix, hour) in [("home", 10), ("home", 18), ("other", 12)] {
            world
                .borg(&[
                    "create",
                    &format!("--timestamp=2024-01-0{day}T{hour}:00:00"),
                    &format!("{}::{prefix}-2024-01-0{day}T{hour}", repo.display()),
                    &src,
                ])
                .await;
        }
    }
    let config = world.config(&format!(
        "[profiles.home]\nrepository = \"main\"\nsources = [\"{src}\"]\narchive-name-format = \"home-{{now}}\"\n\n[profiles.home.retention]\nkeep-daily = 3\n"
    ));
    let bus = TestBus::start();
    let service = start_service(&bus, &world, &config).await;
    let (_, finished) = service.run("home", "BackupFinished").await;
    let mut expected = vec![
        finished.args[2].clone(),
        "home-2024-01-05T18".to_string(),
        "home-2024-01-06T18".to_string(),
    ];
    expected.extend((1..=6).map(|d| format!("other-2024-01-0{d}T12")));
    expected.sort();
    assert_eq!(world.archives(&repo).await, expected);
}

/// Hooks run in order with the profile, repository and error in their
/// environment; a before hook exiting 75 skips; another exit fails at
/// "hook" and runs on-error.
async fn hooks_run_in_order_and_exit_75_skips() {
    let Some(world) = World::new() else { return };
    let repo = world.init("repo").await;
    let trail = world.path("trail");
    let t = trail.display();
    let src = world.path("src").display().to_string();
    let config = world.config(&format!(
        "[profiles.a]\nrepository = \"main\"\nsources = [\"{src}\"]\n[profiles.a.hooks]\nbefore = [\"echo before1 $FERRY_PROFILE $FERRY_REPOSITORY >> {t}\", \"echo before2 >> {t}\"]\nafter = [\"echo after >> {t}\"]\non-error = [\"echo on-error >> {t}\"]\n\n\
         [profiles.skip]\nrepository = \"main\"\nsources = [\"{src}\"]\n[profiles.skip.hooks]\nbefore = [\"echo skip-before >> {t}; exit 75\"]\nafter = [\"echo skip-after >> {t}\"]\non-error = [\"echo skip-on-error >> {t}\"]\n\n\
         [profiles.broken]\nrepository = \"main\"\nsources = [\"{src}\"]\n[profiles.broken.hooks]\nbefore = [\"echo not today >&2; exit 3\"]\non-error = [\"echo \\\"error: $FERRY_ERROR\\\" >> {t}\"]\n"
    ));
    let bus = TestBus::start();
    let service = start_service(&bus, &world, &config).await;
    service.run("a", "BackupFinished").await;
    let (_, skipped) = service.run("skip", "BackupSkipped").await;
    assert!(skipped.args[2].contains("exited 75"), "{skipped}");
    let (_, failed) = service.run("broken", "BackupFailed").await;
    assert_eq!(failed.args[2], "hook");
    assert!(
        failed.args[3].contains("exited 3") && failed.args[3].contains("not today"),
        "{failed}"
    );
    let lines: Vec<String> = std::fs::read_to_string(&trail)
        .expect("trail")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        lines,
        [
            format!("before1 a {}", repo.display()),
            "before2".to_string(),
            "after".to_string(),
            "skip-before".to_string(),
            "error: hook: the before hook `echo not today >&2; exit 3` exited 3: not today"
                .to_string(),
        ]
    );
    assert_eq!(
        world.archives(&repo).await.len(),
        1,
        "only profile a made an archive"
    );
    let results = service.proxy.last_results().await.expect("LastResults");
    let outcome = |p: &str| {
        results
            .iter()
            .find(|r| r.profile == p)
            .map(|r| r.outcome.clone())
    };
    assert_eq!(outcome("skip").as_deref(), Some("skipped"));
    assert_eq!(outcome("broken").as_deref(), Some("failed"));
    let failures = service.proxy.last_failures().await.expect("LastFailures");
    assert_eq!(failures.len(), 1);
    assert_eq!(
        (failures[0].subject.as_str(), failures[0].stage.as_str()),
        ("broken", "hook")
    );
}

/// A precondition that does not hold skips the run with its reason and shows
/// in Schedule; one that holds lets it run.
async fn an_unmet_precondition_skips_and_shows_in_the_schedule() {
    let Some(world) = World::new() else { return };
    let repo = world.init("repo").await;
    let private = world.path("Private");
    std::fs::create_dir_all(&private).expect("Private");
    let src = world.path("src").display().to_string();
    let config = world.config(&format!(
        "[profiles.private]\nrepository = \"main\"\nsources = [\"{src}\"]\n[profiles.private.preconditions]\nmountpoints = [\"{}\"]\n\n[profiles.present]\nrepository = \"main\"\nsources = [\"{src}\"]\n[profiles.present.preconditions]\nmountpoints = [\"/\"]\nexists = [\"{src}\"]\non-ac-power = true\n",
        private.display()
    ));
    let bus = TestBus::start();
    let service = start_service(&bus, &world, &config).await;
    let (_, skipped) = service.run("private", "BackupSkipped").await;
    assert_eq!(
        skipped.args[2],
        format!("{} is not mounted", private.display())
    );
    let schedule = service.proxy.schedule().await.expect("Schedule");
    let blocked = |p: &str| {
        schedule
            .iter()
            .find(|s| s.profile == p)
            .map(|s| s.blocked.clone())
    };
    assert_eq!(
        blocked("private"),
        Some(format!("{} is not mounted", private.display()))
    );
    assert_eq!(blocked("present").as_deref(), Some(""));
    assert_eq!(world.archives(&repo).await.len(), 0);
    assert!(
        service
            .proxy
            .last_failures()
            .await
            .expect("LastFailures")
            .is_empty(),
        "a skip is not a failure"
    );
    service.run("present", "BackupFinished").await;
}

/// A wrong passphrase fails at create with borg's own message.
async fn a_wrong_passphrase_fails_with_borgs_message() {
    let Some(world) = World::new() else { return };
    world.init("repo").await;
    let wrong = world.path("wrong");
    std::fs::write(&wrong, "not the passphrase").expect("wrong");
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let config = world.config(&format!(
        "[repositories.wrong]\npath = \"{}\"\npassphrase-file = \"{}\"\n\n[profiles.home]\nrepository = \"wrong\"\nsources = [\"{}\"]\n",
        world.path("repo").display(),
        wrong.display(),
        world.path("src").display()
    ));
    let bus = TestBus::start();
    let service = start_service(&bus, &world, &config).await;
    let (_, failed) = service.run("home", "BackupFailed").await;
    assert_eq!(failed.args[2], "create");
    assert!(
        failed.args[3].contains("BORG_PASSPHRASE_FD is incorrect"),
        "{failed}"
    );
    let failures = service.proxy.last_failures().await.expect("LastFailures");
    assert_eq!(failures[0].message, failed.args[3]);
    let err = service
        .proxy
        .get_stats("home")
        .await
        .expect_err("no success yet");
    assert!(err.to_string().contains("NotFound"), "{err}");
}

/// Another borg holding the lock longer than --lock-wait: the job waits,
/// retries and succeeds after the lock is gone.
async fn a_lock_held_by_another_borg_is_waited_out() {
    let Some(world) = World::new() else { return };
    let repo = world.init("repo").await;
    let config = world.config(&format!(
        "[borg]\nbusy-retry-delay = 2\nbusy-retries = 5\n\n[profiles.home]\nrepository = \"main\"\nsources = [\"{}\"]\nlock-wait = 1\n",
        world.path("src").display()
    ));
    let bus = TestBus::start();
    let service = start_service(&bus, &world, &config).await;
    let holder = tokio::process::Command::new("borg")
        .args(["with-lock", &repo.to_string_lossy(), "sleep", "5"])
        .envs(world.borg_env())
        .kill_on_drop(true)
        .spawn()
        .expect("borg with-lock");
    // Wait until the other borg holds the lock.
    let lock = repo.join("lock.exclusive");
    for _ in 0..100 {
        if lock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(lock.exists(), "borg with-lock took the lock");
    let holder_done = tokio::spawn(async move {
        let out = holder.wait_with_output().await.expect("with-lock");
        assert!(out.status.success());
        std::time::Instant::now()
    });
    let (_, finished) = service.run("home", "BackupFinished").await;
    let released = tokio::time::timeout(BORG_WAIT, holder_done)
        .await
        .expect("with-lock ends")
        .expect("join");
    assert!(
        finished.at > released,
        "the backup finished after the lock was released"
    );
    assert!(
        service.process.log().contains("repository busy"),
        "{}",
        service.process.log()
    );
    assert_eq!(world.archives(&repo).await.len(), 1);
}

/// The borg processes that are children of `pid`.
fn borg_children(pid: u32) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let Some(after) = stat.rsplit_once(") ") else {
            continue;
        };
        let ppid: u32 = after
            .1
            .split(' ')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if ppid == pid && String::from_utf8_lossy(&cmdline).contains("borg") {
            found.push(child);
        }
    }
    found
}

/// ferry-borg and its borg die mid-create (a power cut, an OOM kill of the
/// unit): the restarted ferry-borg reports the job as failed at
/// "interrupted" (BackupFailed, LastFailures, LastResults), the next job
/// gets a new id, the stale lock is recognised by the next run (same
/// BORG_HOST_ID, dead pid) and the backup succeeds.
async fn a_crash_mid_create_is_reported_and_the_next_run_clears_the_lock() {
    let Some(world) = World::new() else { return };
    let repo = world.init("repo").await;
    let slow = world.slow_source(2);
    let config = world.config(&format!(
        "[profiles.home]\nrepository = \"main\"\nsources = [\"{}\"]\nlock-wait = 5\n",
        slow.display()
    ));
    let bus = TestBus::start();
    let service = start_service(&bus, &world, &config).await;
    let job = service.proxy.start("home").await.expect("Start");
    service
        .signals
        .wait_for(
            "BackupProgress",
            |s| s.args[0] == job && s.args[1] != "0",
            BORG_WAIT,
        )
        .await;
    let children = borg_children(service.process.pid());
    assert_eq!(children.len(), 1, "one borg runs");
    // Freeze borg so the parent's death cannot make it exit cleanly, kill both.
    // SAFETY: signalling a process we just found.
    unsafe { libc::kill(children[0], libc::SIGSTOP) };
    service.process.signal(libc::SIGKILL);
    service
        .process
        .wait_exit(WAIT)
        .await
        .expect("ferry-borg died");
    // SAFETY: as above; it is stopped, so it cannot have exited.
    unsafe { libc::kill(children[0], libc::SIGKILL) };
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{}", children[0])).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        repo.join("lock.exclusive").exists(),
        "the crash left borg's lock behind"
    );
    drop(service);

    let service = start_service(&bus, &world, &config).await;
    let failed = service.ended(&job).await;
    assert_eq!(failed.member, "BackupFailed", "{failed:?}");
    assert_eq!(failed.args[1], "home");
    assert_eq!(failed.args[2], "interrupted");
    assert!(
        failed.args[3].contains("ferry-borg stopped during the job")
            && failed.args[3].contains("stale lock"),
        "{failed:?}"
    );
    let failures = service.proxy.last_failures().await.expect("LastFailures");
    assert!(
        failures
            .iter()
            .any(|f| f.subject == "home" && f.stage == "interrupted"),
        "{failures:?}"
    );
    let results = service.proxy.last_results().await.expect("LastResults");
    assert!(
        results
            .iter()
            .any(|r| r.profile == "home" && r.outcome == "failed"),
        "{results:?}"
    );
    assert!(service.proxy.jobs().await.expect("Jobs").is_empty());

    let (next, finished) = service.run("home", "BackupFinished").await;
    assert_ne!(next, job, "a job id was reused after the restart");
    assert_eq!(world.archives(&repo).await, [finished.args[2].clone()]);
    assert!(!repo.join("lock.exclusive").exists());
    drop(service);

    // Reported once: a clean restart announces nothing more.
    let service = start_service(&bus, &world, &config).await;
    assert!(service.proxy.jobs().await.expect("Jobs").is_empty());
    let results = service.proxy.last_results().await.expect("LastResults");
    assert!(
        results
            .iter()
            .any(|r| r.profile == "home" && r.outcome == "finished"),
        "{results:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !service
            .signals
            .all()
            .iter()
            .any(|s| s.member == "BackupFailed"),
        "{}",
        service.signals.listing()
    );
}

/// Cancel interrupts borg, which releases its lock; BackupFailed says
/// "cancelled"; an unknown job is refused with a usable error.
async fn cancel_stops_borg_and_frees_the_repository() {
    let Some(world) = World::new() else { return };
    let repo = world.init("repo").await;
    let slow = world.slow_source(2);
    let config = world.config(&format!(
        "[profiles.home]\nrepository = \"main\"\nsources = [\"{}\"]\n",
        slow.display()
    ));
    let bus = TestBus::start();
    let service = start_service(&bus, &world, &config).await;
    let err = service.proxy.cancel("nope").await.expect_err("unknown job");
    assert!(err.to_string().contains("UnknownJob"), "{err}");
    let job = service.proxy.start("home").await.expect("Start");
    service
        .signals
        .wait_for("BackupProgress", |s| s.args[0] == job, BORG_WAIT)
        .await;
    let jobs = service.proxy.jobs().await.expect("Jobs");
    assert_eq!(
        (jobs[0].job.as_str(), jobs[0].stage.as_str()),
        (job.as_str(), "create")
    );
    service.proxy.cancel(&job).await.expect("Cancel");
    let failed = service.ended(&job).await;
    assert_eq!(failed.member, "BackupFailed", "{failed}");
    assert_eq!(failed.args[2], "cancelled");
    assert!(
        borg_children(service.process.pid()).is_empty(),
        "borg is gone"
    );
    assert!(
        !repo.join("lock.exclusive").exists(),
        "borg released its lock"
    );
    // The repository is usable at once.
    world
        .borg(&["list", "--lock-wait=1", &repo.to_string_lossy()])
        .await;
    assert!(service.proxy.jobs().await.expect("Jobs").is_empty());
}

/// Seed 000's borgmatic file, local paths put in, runs as a profile: its
/// passphrase, sources, retention and hooks are all used.
async fn seed_000_borgmatic_file_runs() {
    let Some(world) = World::new() else { return };
    let repo = world.path("seed-repo");
    world.init("seed-repo").await;
    let home = world.path("home");
    for dir in [
        ".gnupg",
        ".config/systemd/user",
        "Private/borg",
        "Private/other-important-files",
    ] {
        std::fs::create_dir_all(home.join(dir)).expect("dir");
        std::fs::write(home.join(dir).join("file1"), dir).expect("file");
    }
    let yaml = format!(
        r#"location:
    source_directories:
        - {h}/.gnupg
        - {h}/.config/systemd/user
        - {h}/Private/borg
        - {h}/Private/other-important-files
    repositories:
        - {repo}
storage:
    encryption_passphrase: "{pass}"
retention:
    keep_within: 3H
    # keep_secondly: 60
    keep_hourly: 24
    keep_daily: 7
    keep_weekly: 4
    keep_monthly: 6
    keep_yearly: 5
hooks:
    before_backup:
        - echo "Starting a backup."
    after_backup:
        - echo "Created a backup."
    on_error:
        - echo "Error while creating a backup or running a backup hook."
"#,
        h = home.display(),
        repo = repo.display(),
        pass = world.passphrase
    );
    let yaml_path = home.join("Private/borg/borgmatic-config.yaml");
    std::fs::write(&yaml_path, yaml).expect("yaml");
    let broken = world.path("broken.yaml");
    std::fs::write(
        &broken,
        format!(
            "source_directories: [{}]\nrepositories: [{}]\nlocal_path: borg1\npostgresql_databases:\n    - name: all\nhealthchecks:\n    ping_url: https://example.org\n",
            home.display(),
            repo.display()
        ),
    )
    .expect("yaml");
    let config = world.config(&format!(
        "[profiles.private]\nborgmatic-config = \"{}\"\n[profiles.private.preconditions]\nexists = [\"{}\"]\n\n[profiles.broken]\nborgmatic-config = \"{}\"\n",
        yaml_path.display(),
        yaml_path.display(),
        broken.display()
    ));
    let bus = TestBus::start();
    let service = start_service(&bus, &world, &config).await;
    let (_, finished) = service.run("private", "BackupFinished").await;
    let archive = finished.args[2].clone();
    assert_eq!(world.archives(&repo).await, std::slice::from_ref(&archive));
    let files = world
        .borg(&["list", "--short", &format!("{}::{archive}", repo.display())])
        .await;
    assert!(
        files.contains("Private/other-important-files/file1"),
        "{files}"
    );
    let log = service.process.log();
    assert!(log.contains("before hook: Starting a backup."), "{log}");
    assert!(log.contains("after hook: Created a backup."), "{log}");
    assert!(
        log.contains("--keep-within=3H") && log.contains("--keep-yearly=5"),
        "{log}"
    );
    assert!(
        !log.contains(&world.passphrase),
        "the passphrase is not logged"
    );

    let (_, failed) = service.run("broken", "BackupFailed").await;
    assert_eq!(failed.args[2], "config");
    // All three refused options at once, with the file and their lines.
    let message = &failed.args[3];
    assert!(message.contains(&broken.display().to_string()), "{message}");
    assert!(message.contains("3 problems"), "{message}");
    for (line, option) in [
        (3, "local_path"),
        (4, "postgresql_databases"),
        (6, "healthchecks"),
    ] {
        assert!(
            message.contains(&format!("line {line}: `{option}`")),
            "{option} at line {line} in {message}"
        );
    }
}

/// The file `borgmatic config generate` writes (borgmatic 2.1.10), with a
/// local repository and paths on this machine put in and a passcommand for
/// the repository's passphrase, runs as a profile: its glob source is
/// expanded as borgmatic expands it.
async fn borgmatics_generated_file_runs() {
    let Some(world) = World::new() else { return };
    let repo = world.init("generated-repo").await;
    let root = world.path("machine");
    for file in [
        "home/susan/notes",
        "etc/hosts",
        "var/log/syslog",
        "var/log/syslog.1",
        "var/log/other",
        "home/user/path with spaces/f",
    ] {
        let path = root.join(file);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        std::fs::write(&path, file).expect("file");
    }
    let mut yaml =
        include_str!("../../services/borg/tests/fixtures/borgmatic-2.1.10-generated.yaml")
            .to_string();
    let r = root.display();
    for (from, to) in [
        ("    - /home\n", format!("    - {r}/home\n")),
        ("    - /etc\n", format!("    - {r}/etc\n")),
        (
            "    - /var/log/syslog*\n",
            format!("    - {r}/var/log/syslog*\n"),
        ),
        (
            "    - /home/user/path with spaces\n",
            format!("    - {r}/home/user/path with spaces\n"),
        ),
        (
            "    - path: ssh://user@backupserver/./sourcehostname.borg\n",
            format!("    - path: {}\n", repo.display()),
        ),
    ] {
        assert!(yaml.contains(from), "{from:?}");
        yaml = yaml.replace(from, &to);
    }
    yaml.push_str(&format!(
        "encryption_passcommand: cat {}\n",
        world.passphrase_file().display()
    ));
    let file = world.path("generated.yaml");
    std::fs::write(&file, yaml).expect("yaml");
    let config = world.config(&format!(
        "[profiles.generated]\nborgmatic-config = \"{}\"\n",
        file.display()
    ));
    let bus = TestBus::start();
    let service = start_service(&bus, &world, &config).await;
    let (_, finished) = service.run("generated", "BackupFinished").await;
    let archive = &finished.args[2];
    let files = world
        .borg(&["list", "--short", &format!("{}::{archive}", repo.display())])
        .await;
    for expected in [
        "var/log/syslog.1",
        "path with spaces/f",
        "home/susan/notes",
        "etc/hosts",
    ] {
        assert!(files.contains(expected), "{expected} in {files}");
    }
    assert!(!files.contains("var/log/other"), "{files}");
}

/// A borgmatic file with two repositories backs up each in turn, runs its
/// 2.x `commands:` hooks around each, reports each repository's result, and
/// when one fails tries it again (`retries`) and names it, while the other
/// is still backed up.
async fn every_repository_of_a_borgmatic_file_in_turn() {
    let Some(world) = World::new() else { return };
    let a = world.init("repo-a").await;
    let b = world.init("repo-b").await;
    let log = world.path("hooks.log");
    let l = log.display();
    let yaml = format!(
        r#"source_directories: ["{src}/*"]
repositories:
    - path: {a}
      label: first
    - path: {b}
      label: second
encryption_passcommand: cat {pass}
keep_within: 1d
retries: 1
retry_wait: 0
commands:
    - before: repository
      run: ['echo "before {{repository_label}}" >> {l}']
    - after: action
      when: [create]
      states: [finish]
      run: ['echo "created {{repository_label}}" >> {l}']
    - after: configuration
      states: [finish]
      run: ['echo "configuration done" >> {l}']
    - after: error
      run: ['echo "error" >> {l}']
"#,
        src = world.path("src").display(),
        a = a.display(),
        b = b.display(),
        pass = world.passphrase_file().display(),
    );
    let file = world.path("two.yaml");
    std::fs::write(&file, yaml).expect("yaml");
    let config = world.config(&format!(
        "[profiles.two]\nborgmatic-config = \"{}\"\n",
        file.display()
    ));
    let bus = TestBus::start();
    let service = start_service(&bus, &world, &config).await;
    service.run("two", "BackupFinished").await;
    assert_eq!(world.archives(&a).await.len(), 1);
    assert_eq!(world.archives(&b).await.len(), 1);
    assert_eq!(
        std::fs::read_to_string(&log).expect("hook log"),
        "before first\ncreated first\nbefore second\ncreated second\nconfiguration done\n"
    );
    let results = service.proxy.last_results().await.expect("LastResults");
    assert!(
        results[0].message.contains("first: archive")
            && results[0].message.contains("second: archive"),
        "{results:?}"
    );

    // The second repository is gone: tried twice, named, the first still backed up.
    std::fs::remove_dir_all(&b).expect("remove b");
    std::fs::write(&log, "").expect("empty log");
    let (_, failed) = service.run("two", "BackupFailed").await;
    assert_eq!(failed.args[2], "create", "{failed}");
    let message = &failed.args[3];
    assert!(message.starts_with("repository second: "), "{message}");
    assert!(message.contains("first: archive"), "{message}");
    assert_eq!(world.archives(&a).await.len(), 2);
    assert_eq!(
        std::fs::read_to_string(&log).expect("hook log"),
        "before first\ncreated first\nbefore second\nbefore second\nerror\n"
    );
}

/// Every /proc/*/cmdline and /proc/*/environ, searched for `needle`.
fn processes_showing(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        if entry.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        for file in ["cmdline", "environ"] {
            let bytes = std::fs::read(entry.path().join(file)).unwrap_or_default();
            if String::from_utf8_lossy(&bytes).contains(needle) {
                found.push(format!("{}/{file}", entry.path().display()));
            }
        }
    }
    found
}

/// While borg runs (passphrase from a file, and one written in a borgmatic
/// file), the passphrase is on no process's command line or environment,
/// and never in the service log.
async fn the_passphrase_is_on_no_command_line_environment_or_log() {
    let Some(world) = World::new() else { return };
    world.init("repo").await;
    let second = world.init("repo2").await;
    let slow = world.slow_source(1);
    let yaml = world.path("borgmatic.yaml");
    std::fs::write(
        &yaml,
        format!(
            "source_directories: [{}]\nrepositories: [{}]\nencryption_passphrase: {}\n",
            slow.display(),
            second.display(),
            world.passphrase
        ),
    )
    .expect("yaml");
    let config = world.config(&format!(
        "[profiles.file]\nrepository = \"main\"\nsources = [\"{}\"]\n\n[profiles.yaml]\nborgmatic-config = \"{}\"\n",
        slow.display(),
        yaml.display()
    ));
    let bus = TestBus::start();
    let service = start_service(&bus, &world, &config).await;
    let jobs = [
        service.proxy.start("file").await.expect("Start"),
        service.proxy.start("yaml").await.expect("Start"),
    ];
    let mut scans = 0;
    let mut watch = service.signals.watch();
    for job in &jobs {
        // Scan at every progress report of this job, while borg runs.
        let mut seen = 0;
        loop {
            watch.borrow_and_update();
            let reports = service
                .signals
                .count("BackupProgress", |s| &s.args[0] == job);
            if reports > seen {
                seen = reports;
                // The last report (create's totals) comes after borg create
                // exited: only a scan while borg runs counts.
                let borg_runs = !borg_children(service.process.pid()).is_empty();
                let leaks = processes_showing(&world.passphrase);
                assert!(leaks.is_empty(), "passphrase visible in {leaks:?}");
                scans += usize::from(borg_runs);
            }
            if service
                .signals
                .count("BackupFinished", |s| &s.args[0] == job)
                > 0
            {
                break;
            }
            assert_eq!(
                service.signals.count("BackupFailed", |s| &s.args[0] == job),
                0,
                "{}",
                service.signals.listing()
            );
            tokio::time::timeout(BORG_WAIT, watch.changed())
                .await
                .expect("a signal")
                .expect("recorder");
        }
    }
    assert!(scans >= 2, "scanned while borg ran ({scans} scans)");
    assert!(!service.process.log().contains(&world.passphrase));
}

/// A repository under a drive's mountpoint is refused: by the config check
/// (the service does not start), and at run time through a symlink or from
/// a borgmatic file.
async fn a_repository_on_a_drive_is_refused() {
    let Some(world) = World::new() else { return };
    let mountpoint = world.path("drive");
    std::fs::create_dir_all(mountpoint.join("copy")).expect("drive dir");
    let drive = format!(
        "[drives.offsite-a]\nuuid = \"{}\"\nmountpoint = \"{}\"\nrepositories = [\"main\"]\n\n",
        ferry_integration_tests::random_uuid(),
        mountpoint.display()
    );
    let src = world.path("src").display().to_string();
    let bad = world.config(&format!(
        "{drive}[repositories.copy]\npath = \"{}/copy\"\n\n[profiles.home]\nrepository = \"copy\"\nsources = [\"{src}\"]\n",
        mountpoint.display()
    ));
    let bus = TestBus::start();
    let process = spawn(&bus, &world, &bad);
    let status = process.wait_exit(WAIT).await.expect("exits");
    assert_eq!(status.code(), Some(78), "EX_CONFIG");
    assert!(
        process.log().contains("profiles.home.repository")
            && process.log().contains("drive `offsite-a`"),
        "{}",
        process.log()
    );

    let link = world.path("innocent");
    std::os::unix::fs::symlink(mountpoint.join("copy"), &link).expect("symlink");
    let yaml = world.path("borgmatic.yaml");
    std::fs::write(
        &yaml,
        format!(
            "source_directories: [{src}]\nrepositories: [{}/copy]\n",
            mountpoint.display()
        ),
    )
    .expect("yaml");
    // A repository reached through a symlink into the drive: the
    // configuration compares paths as the kernel resolves them and refuses
    // it at load, with the line.
    let linked = world.config(&format!(
        "{drive}[repositories.linked]\npath = \"{}\"\npassphrase-file = \"{}\"\n\n[profiles.linked]\nrepository = \"linked\"\nsources = [\"{src}\"]\n",
        link.display(),
        world.passphrase_file().display(),
    ));
    let process = spawn(&bus, &world, &linked);
    let status = process.wait_exit(WAIT).await.expect("exits");
    assert_eq!(status.code(), Some(78), "EX_CONFIG");
    assert!(
        process.log().contains("drives.offsite-a.mountpoint")
            && process.log().contains("contains repository linked"),
        "{}",
        process.log()
    );
    // A borgmatic file naming a repository on the drive: refused when run.
    let config = world.config(&format!(
        "{drive}[profiles.yaml]\nborgmatic-config = \"{}\"\n",
        yaml.display()
    ));
    let service = start_service(&bus, &world, &config).await;
    for profile in ["yaml"] {
        let (_, failed) = service.run(profile, "BackupFailed").await;
        assert_eq!(failed.args[2], "config");
        assert!(failed.args[3].contains("drive `offsite-a`"), "{failed}");
    }
    assert!(
        !mountpoint.join("copy/config").exists(),
        "borg never wrote there"
    );
}

/// A stand-in logind on the test bus: records Inhibit and hands out the
/// write end of a pipe whose read end the test keeps.
/// Inhibit's arguments: what, who, why, mode.
type InhibitCall = (String, String, String, String);

struct FakeLogind {
    calls: Arc<Mutex<Vec<InhibitCall>>>,
    fds: Arc<Mutex<Vec<OwnedFd>>>,
}

#[zbus::interface(name = "org.freedesktop.login1.Manager")]
impl FakeLogind {
    fn inhibit(
        &self,
        what: &str,
        who: &str,
        why: &str,
        mode: &str,
    ) -> zbus::fdo::Result<zbus::zvariant::OwnedFd> {
        self.calls
            .lock()
            .expect("calls")
            .push((what.into(), who.into(), why.into(), mode.into()));
        let fd = self
            .fds
            .lock()
            .expect("fds")
            .pop()
            .ok_or_else(|| zbus::fdo::Error::Failed("no fd".into()))?;
        Ok(fd.into())
    }
}

/// Whether the pipe's writers are all closed (EOF), within `wait`.
fn writer_closed(read: &OwnedFd, wait: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: read.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as i32) };
    ready == 1 && pfd.revents & libc::POLLHUP != 0
}

/// While a job runs, ferry-borg holds a sleep/shutdown "block" inhibitor
/// from logind, and lets go of it when the job ends.
async fn the_logind_inhibitor_is_held_while_a_job_runs() {
    let Some(world) = World::new() else { return };
    world.init("repo").await;
    let slow = world.slow_source(1);
    let config = world.config(&format!(
        "[profiles.home]\nrepository = \"main\"\nsources = [\"{}\"]\n",
        slow.display()
    ));
    let mut fds = [0; 2];
    // SAFETY: room for two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors.
    let (read, write) = unsafe {
        (
            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[0]),
            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1]),
        )
    };
    let calls = Arc::new(Mutex::new(Vec::new()));
    let bus = TestBus::start();
    let _logind = zbus::connection::Builder::address(bus.address())
        .expect("address")
        .name("org.freedesktop.login1")
        .expect("name")
        .serve_at(
            "/org/freedesktop/login1",
            FakeLogind {
                calls: calls.clone(),
                fds: Arc::new(Mutex::new(vec![write])),
            },
        )
        .expect("serve")
        .build()
        .await
        .expect("fake logind");
    let service = start_service(&bus, &world, &config).await;
    let job = service.proxy.start("home").await.expect("Start");
    service
        .signals
        .wait_for("BackupProgress", |s| s.args[0] == job, BORG_WAIT)
        .await;
    assert_eq!(
        calls.lock().expect("calls").clone(),
        [(
            "sleep:shutdown".to_string(),
            "ferry-borg".to_string(),
            "borg backup of profile home".to_string(),
            "block".to_string()
        )]
    );
    assert!(
        !writer_closed(&read, Duration::ZERO),
        "the inhibitor is held while borg runs"
    );
    service
        .signals
        .wait_for("BackupFinished", |s| s.args[0] == job, BORG_WAIT)
        .await;
    assert!(
        writer_closed(&read, WAIT),
        "the inhibitor is released when the job ends"
    );
}

/// A passphrase file others can read is refused at stage config, naming its
/// mode, before borg runs.
async fn a_passphrase_file_others_can_read_is_refused() {
    let Some(world) = World::new() else { return };
    world.init("repo").await;
    std::fs::set_permissions(
        world.passphrase_file(),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let config = world.config(&format!(
        "[repositories.open]\npath = \"{}\"\npassphrase-file = \"{}\"\n\n[profiles.home]\nrepository = \"open\"\nsources = [\"{}\"]\n",
        world.path("repo").display(),
        world.passphrase_file().display(),
        world.path("src").display()
    ));
    let bus = TestBus::start();
    let service = start_service(&bus, &world, &config).await;
    let (_, failed) = service.run("home", "BackupFailed").await;
    assert_eq!(failed.args[2], "config", "{failed}");
    assert!(failed.args[3].contains("mode 0644"), "{failed}");
}

ferry_integration_tests::integration_tests! {
    async Machine: [
        full_cycle_then_results_survive_a_restart,
        retention_prunes_exactly_the_expected_archives,
        hooks_run_in_order_and_exit_75_skips,
        an_unmet_precondition_skips_and_shows_in_the_schedule,
        a_wrong_passphrase_fails_with_borgs_message,
        a_lock_held_by_another_borg_is_waited_out,
        a_crash_mid_create_is_reported_and_the_next_run_clears_the_lock,
        cancel_stops_borg_and_frees_the_repository,
        seed_000_borgmatic_file_runs,
        the_passphrase_is_on_no_command_line_environment_or_log,
        a_repository_on_a_drive_is_refused,
        the_logind_inhibitor_is_held_while_a_job_runs,
        a_passphrase_file_others_can_read_is_refused,
        borgmatics_generated_file_runs,
        every_repository_of_a_borgmatic_file_in_turn,
    ],
}
