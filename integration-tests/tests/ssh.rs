//! ferry-borg over SSH against a real OpenSSH server on 127.0.0.1 (its
//! own config, host key and port, key-only login, the key restricted to
//! `borg serve --restrict-to-path`): backup, prune, compact and check; the
//! server gone (skipped, retried, mailed only after unreachable-grace); a
//! changed or unknown host key and a path outside the restriction (failed,
//! saying what to do); and seed 000's borgmatic file run by a user-level
//! ferry-borg on a private session bus with HOME set to a test home, its
//! archives compared with what borgmatic itself makes from the same file.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use ferry_integration_tests::smtp::{require_aiosmtpd, Smtp};
use ferry_integration_tests::sshd::{require_sshd, Sshd};
use ferry_integration_tests::{
    binary_path, require_command, Recorded, ServiceProcess, SignalRecorder, TestBus,
};
use ferry_interfaces::borg::{self, BorgProxy};

/// Long enough for a small borg run over SSH on a busy 2-core machine.
const BORG_WAIT: Duration = Duration::from_secs(180);

/// A test's server and client: sshd, the repositories it may serve
/// (`repos/`), the passphrase, the client's home, and the test's own borg.
struct World {
    // sshd is dropped (stopped, its log printed) before its directory goes.
    sshd: Sshd,
    dir: tempfile::TempDir,
    passphrase: String,
}

impl World {
    fn new() -> Option<World> {
        if !(require_sshd() && require_command("borg", "borgbackup")) {
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("repos")).expect("repos");
        let sshd = Sshd::start(&dir.path().join("sshd"), &dir.path().join("repos"));
        let passphrase = format!("ferry-ssh-{}", ferry_integration_tests::random_uuid());
        let file = dir.path().join("passphrase");
        std::fs::write(&file, &passphrase).expect("passphrase");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let world = World {
            dir,
            sshd,
            passphrase,
        };
        let src = world.path("src");
        std::fs::create_dir_all(src.join("docs")).expect("src");
        std::fs::write(src.join("docs/note.txt"), "a note\n").expect("file");
        std::fs::write(src.join("file1"), vec![7u8; 3115]).expect("file");
        std::fs::create_dir_all(world.home()).expect("home");
        Some(world)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// HOME of the ferry-borg under test (borg's cache and ssh's files).
    fn home(&self) -> PathBuf {
        self.path("home")
    }

    fn repo(&self, name: &str) -> PathBuf {
        self.path("repos").join(name)
    }

    /// The test's own borg, on the server's side (local paths), with its
    /// own base directory; returns stdout.
    async fn borg(&self, args: &[&str]) -> String {
        let run = tokio::process::Command::new("borg")
            .args(args)
            .env("BORG_BASE_DIR", self.path("test-borg-base"))
            .env(
                "BORG_PASSCOMMAND",
                format!("cat {}", self.path("passphrase").display()),
            )
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
            .env_remove("BORG_PASSPHRASE")
            .env_remove("BORG_RSH")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(BORG_WAIT, run)
            .await
            .unwrap_or_else(|_| panic!("borg {args:?} took longer than {BORG_WAIT:?}"))
            .expect("run borg");
        assert!(
            output.status.success(),
            "borg {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    async fn init(&self, name: &str) -> PathBuf {
        let repo = self.repo(name);
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

    /// `[remote-repositories.<name>]` for `repo` with the test's key and known_hosts.
    fn remote_section(&self, name: &str, repo: &Path, known_hosts: &Path) -> String {
        format!(
            "[remote-repositories.{name}]\nurl = \"{}\"\npassphrase-file = \"{}\"\nidentity-file = \"{}\"\nknown-hosts = \"{}\"\n\n",
            self.sshd.url(repo),
            self.path("passphrase").display(),
            self.sshd.client_key().display(),
            known_hosts.display()
        )
    }

    fn config(&self, body: &str) -> PathBuf {
        write_config(self.dir.path(), body)
    }
}

/// ferry-borg on a test bus, with HOME set to the world's home.
struct Running {
    signals: SignalRecorder,
    process: ServiceProcess,
    proxy: BorgProxy<'static>,
    _conn: zbus::Connection,
}

async fn start(bus: &TestBus, world: &World, args: &[&str], envs: &[(&str, &str)]) -> Running {
    let conn = bus.connect().await;
    let signals = SignalRecorder::new(&conn).await;
    let home = world.home().display().to_string();
    let mut all: Vec<(&str, &str)> = vec![("HOME", home.as_str())];
    all.extend_from_slice(envs);
    let process = bus.spawn("ferry-borg", args, &all);
    process.wait_for_name(&conn, borg::BUS_NAME, WAIT).await;
    let proxy: BorgProxy<'static> = uncached(&conn).await;
    Running {
        signals,
        process,
        proxy,
        _conn: conn,
    }
}

impl Running {
    /// Start(profile) and wait for the job's end; returns (job, end signal).
    async fn run(&self, profile: &str) -> (String, Recorded) {
        let job = self.proxy.start(profile).await.expect("Start");
        (job.clone(), self.ended(&job).await)
    }

    async fn ended(&self, job: &str) -> Recorded {
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

/// Create, prune, compact and check over SSH; the retention prunes on the
/// server; the login was by key, through the restricted command.
async fn backup_prune_compact_check_over_ssh() {
    let Some(world) = World::new() else { return };
    let repo = world.init("nas").await;
    let config = world.config(&format!(
        "{}[profiles.home]\nrepository = \"nas\"\nsources = [\"{}\"]\n\n[profiles.home.retention]\nkeep-secondly = 1\n\n[profiles.home.checks]\nrepository = \"always\"\narchives = \"always\"\n",
        world.remote_section("nas", &repo, &world.sshd.known_hosts()),
        world.path("src").display()
    ));
    let bus = TestBus::start();
    let service = start(&bus, &world, &["--config", &config.to_string_lossy()], &[]).await;
    let (_, first) = service.run("home").await;
    assert_eq!(
        first.member,
        "BackupFinished",
        "{first}\n{}",
        service.process.log()
    );
    let (_, second) = service.run("home").await;
    assert_eq!(second.member, "BackupFinished", "{second}");
    assert_eq!(
        world.archives(&repo).await,
        [second.args[2].clone()],
        "keep-secondly = 1 pruned the first archive on the server"
    );
    let files = world
        .borg(&[
            "list",
            "--short",
            &format!("{}::{}", repo.display(), second.args[2]),
        ])
        .await;
    assert!(files.contains("docs/note.txt"), "{files}");
    let log = service.process.log();
    assert!(
        !log.contains(&world.passphrase),
        "the passphrase is not logged"
    );
    for stage in ["borg create", "borg prune", "borg compact", "borg check"] {
        assert!(
            log.contains(&format!("running {stage}")),
            "{stage} ran:\n{log}"
        );
    }
    assert!(
        world.sshd.log().contains("Accepted publickey for root"),
        "{}",
        world.sshd.log()
    );
}

/// The server stopped: the run is skipped (not failed) and retried; it is
/// mailed as a failure only once unreachable-grace has passed; when the
/// server is back, the next retry makes the archive.
async fn the_server_gone_is_skipped_and_retried_and_mailed_only_after_the_grace() {
    let Some(mut world) = World::new() else {
        return;
    };
    if !require_aiosmtpd() {
        return;
    }
    let repo = world.init("nas").await;
    let smtp = Smtp::start(&world.path("smtp"), 0);
    let config = world.config(&format!(
        "[mail]\nfrom = \"ferry@laptop.test\"\nto = [\"david@home.test\"]\nsmtp-host = \"127.0.0.1\"\nsmtp-port = {}\nsecurity = \"none\"\ntimeout-seconds = 10\nretry-min-seconds = 1\nretry-max-seconds = 2\n\n[borg]\nretries = 20\nretry-delay = \"2s\"\nunreachable-grace = \"6s\"\nssh-connect-timeout = \"5s\"\n\n{}[profiles.home]\nrepository = \"nas\"\nsources = [\"{}\"]\n",
        smtp.port,
        world.remote_section("nas", &repo, &world.sshd.known_hosts()),
        world.path("src").display()
    ));
    let bus = TestBus::start();
    let conn = bus.connect().await;
    let notifier = bus.spawn(
        "ferry-notifier",
        &["--config", &config.to_string_lossy()],
        &[],
    );
    notifier
        .wait_for_name(&conn, ferry_interfaces::notifier::BUS_NAME, WAIT)
        .await;
    let service = start(&bus, &world, &["--config", &config.to_string_lossy()], &[]).await;

    world.sshd.stop();
    let (_, first) = service.run("home").await;
    assert_eq!(first.member, "BackupSkipped", "{first}");
    assert!(
        first.args[2].contains("unreachable") && first.args[2].contains("refused"),
        "{first}"
    );
    // The retry comes by itself and is skipped too, still within the grace.
    let retried = service
        .signals
        .wait_for(
            "BackupSkipped",
            |s| s.args.first() != first.args.first(),
            BORG_WAIT,
        )
        .await;
    assert!(retried.args[2].contains("unreachable for"), "{retried}");
    assert!(
        smtp.mails().is_empty(),
        "nothing is mailed within the grace: {:?}",
        smtp.mails()
    );
    let failed = service
        .signals
        .wait_for("BackupFailed", |s| s.args[2] == "unreachable", BORG_WAIT)
        .await;
    assert!(failed.args[3].contains("unreachable-grace"), "{failed}");
    assert_eq!(
        service.signals.count("BackupFailed", |s| s.at < failed.at),
        0,
        "no failure before the grace"
    );
    let mails = smtp
        .wait_for(1, |m| m.body.contains("unreachable"), BORG_WAIT)
        .await;
    assert!(mails[0].body.contains("home"), "{:?}", mails[0]);

    world.sshd.restart();
    let finished = service
        .signals
        .wait_for("BackupFinished", |_| true, BORG_WAIT)
        .await;
    assert_eq!(world.archives(&repo).await, [finished.args[2].clone()]);
}

/// A changed host key fails the job, saying the key changed and how to fix
/// it; an unknown one fails too; nothing is sent to either.
async fn a_changed_or_unknown_host_key_fails_saying_so() {
    let Some(mut world) = World::new() else {
        return;
    };
    let repo = world.init("nas").await;
    let empty = world.path("empty_known_hosts");
    std::fs::write(&empty, "").expect("empty known_hosts");
    let config = world.config(&format!(
        "[borg]\nretries = 0\n\n{}{}[profiles.home]\nrepository = \"nas\"\nsources = [\"{src}\"]\n\n[profiles.stranger]\nrepository = \"unknown\"\nsources = [\"{src}\"]\n",
        world.remote_section("nas", &repo, &world.sshd.known_hosts()),
        world.remote_section("unknown", &repo, &empty),
        src = world.path("src").display()
    ));
    let bus = TestBus::start();
    let service = start(&bus, &world, &["--config", &config.to_string_lossy()], &[]).await;

    let (_, unknown) = service.run("stranger").await;
    assert_eq!(unknown.member, "BackupFailed", "{unknown}");
    assert!(
        unknown.args[3].contains("is not in")
            && unknown.args[3].contains("never accepts an unknown host key"),
        "{unknown}"
    );
    assert_eq!(
        std::fs::read_to_string(&empty).expect("read"),
        "",
        "ferry added no key"
    );

    let (_, good) = service.run("home").await;
    assert_eq!(good.member, "BackupFinished", "{good}");
    world.sshd.change_host_key();
    let (_, changed) = service.run("home").await;
    assert_eq!(changed.member, "BackupFailed", "{changed}");
    assert_eq!(changed.args[2], "create", "{changed}");
    assert!(
        changed.args[3].contains("has CHANGED") && changed.args[3].contains("ssh-keygen -R"),
        "{changed}"
    );
    assert_eq!(world.archives(&repo).await, [good.args[2].clone()]);
}

/// A repository outside the server's `--restrict-to-path` fails the job
/// with borg's refusal; nothing is made there.
async fn a_path_outside_restrict_to_path_fails() {
    let Some(world) = World::new() else { return };
    let outside = world.path("elsewhere/repo");
    let config = world.config(&format!(
        "[borg]\nretries = 0\n\n{}[profiles.home]\nrepository = \"outside\"\nsources = [\"{}\"]\n",
        world.remote_section("outside", &outside, &world.sshd.known_hosts()),
        world.path("src").display()
    ));
    let bus = TestBus::start();
    let service = start(&bus, &world, &["--config", &config.to_string_lossy()], &[]).await;
    let (_, failed) = service.run("home").await;
    assert_eq!(failed.member, "BackupFailed", "{failed}");
    assert_eq!(failed.args[2], "create", "{failed}");
    assert!(
        failed.args[3].contains("refused the repository path")
            && failed.args[3].contains(&outside.display().to_string()),
        "{failed}"
    );
    assert!(
        !world.path("elsewhere").exists(),
        "nothing was made outside"
    );
}

/// Seed 000's borgmatic file as its author wrote it.
const SEED_000: &str = include_str!("../../services/borg/tests/fixtures/seed-000-borgmatic.yaml");

/// `epoch` as borg's `--timestamp` (UTC, yyyy-mm-ddThh:mm:ss).
fn utc(epoch: u64) -> String {
    ferry_integration_tests::run(
        "date",
        &["-u", "-d", &format!("@{epoch}"), "+%Y-%m-%dT%H:%M:%S"],
    )
    .trim()
    .to_string()
}

/// borg's `{hostname}`: the short host name.
fn short_hostname() -> String {
    ferry_integration_tests::run("hostname", &[] as &[&str])
        .trim()
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Runs a program to its end with `envs`; returns (success, stdout+stderr).
async fn run_with(program: &Path, args: &[&str], envs: &[(&str, String)]) -> (bool, String) {
    let run = tokio::process::Command::new(program)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(BORG_WAIT, run)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} {args:?} took longer than {BORG_WAIT:?}",
                program.display()
            )
        })
        .expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// The paths (and modes) in an archive, sorted.
async fn archive_files(world: &World, repo: &Path, archive: &str) -> Vec<String> {
    let mut files: Vec<String> = world
        .borg(&[
            "list",
            "--format={mode} {path}{NL}",
            &format!("{}::{archive}", repo.display()),
        ])
        .await
        .lines()
        .map(str::to_string)
        .collect();
    files.sort();
    files
}

/// `borg info --json`'s original and compressed size of an archive.
async fn archive_sizes(world: &World, repo: &Path, archive: &str) -> (u64, u64) {
    let info = world
        .borg(&["info", "--json", &format!("{}::{archive}", repo.display())])
        .await;
    let info: serde_json::Value = serde_json::from_str(&info).expect("borg info --json");
    let stats = &info["archives"][0]["stats"];
    (
        stats["original_size"].as_u64().expect("original_size"),
        stats["compressed_size"].as_u64().expect("compressed_size"),
    )
}

/// Seed 000 end to end: its borgmatic file, with only the server and the
/// repository path changed to the loopback server, run by a user-level
/// ferry-borg (`--user`, a private `dbus-daemon` session bus, HOME a test
/// home with the user's SSH key and known_hosts, config under
/// ~/.config/ferry) through `ferryctl --user backup --wait`; and by
/// borgmatic itself into a copy of the same repository. After both, the
/// archives kept by the retention are the same, and the new archives hold
/// the same files at the same sizes (sources and compression).
async fn seed_000_in_a_user_level_ferry_borg_matches_borgmatic() {
    let Some(world) = World::new() else { return };
    if !require_command("borgmatic", "borgmatic") {
        return;
    }
    // The seed's passphrase, in the test's own borg's file too.
    std::fs::write(world.path("passphrase"), "my-secure-passphrase").expect("passphrase");
    let home = world.home();
    for (dir, file, text) in [
        (".gnupg", "pubring.kbx", "keys"),
        (
            ".config/systemd/user",
            "borgmatic.timer",
            "[Timer]\nOnCalendar=daily\n",
        ),
        ("Private/borg", "notes", "borg helper scripts"),
        ("Private/other-important-files", "file1", "important"),
        ("Private/not-listed", "secret", "not a source"),
    ] {
        std::fs::create_dir_all(home.join(dir)).expect("source dir");
        std::fs::write(home.join(dir).join(file), text.repeat(500)).expect("source file");
    }
    let ssh_dir = home.join(".ssh");
    std::fs::create_dir_all(&ssh_dir).expect(".ssh");
    std::fs::copy(world.sshd.client_key(), ssh_dir.join("id_ed25519")).expect("the user's key");
    std::fs::set_permissions(
        ssh_dir.join("id_ed25519"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod key");
    world.sshd.write_known_hosts(&ssh_dir.join("known_hosts"));

    // One repository with history (archives made on earlier days), copied
    // so ferry and borgmatic each start from the same one.
    let ferry_repo = world.init("backup_dir").await;
    let old = world.path("old-src");
    std::fs::create_dir_all(&old).expect("old src");
    std::fs::write(old.join("f"), "old").expect("old file");
    let host = short_hostname();
    let now = ferry_service::unix_now();
    let mut history = Vec::new();
    // Two archives in one hour a day ago and two in one hour 40 days ago
    // (the retention keeps the newer of each), one 3 h ago, one 800 days ago.
    let hour = |t: u64| t - t % 3600;
    let (day_ago, long_ago) = (hour(now - 30 * 3600), hour(now - 40 * 86_400));
    for at in [
        now - 3 * 3600 - 600,
        day_ago + 60,
        day_ago + 660,
        long_ago + 60,
        long_ago + 660,
        now - 800 * 86_400,
    ] {
        let at = utc(at);
        let name = format!("{host}-{at}.000000");
        world
            .borg(&[
                "create",
                &format!("--timestamp={at}"),
                &format!("{}::{name}", ferry_repo.display()),
                &old.to_string_lossy(),
            ])
            .await;
        history.push(name);
    }
    let borgmatic_repo = world.repo("backup_dir_borgmatic");
    ferry_integration_tests::run(
        "cp",
        &[
            "-a",
            &ferry_repo.to_string_lossy(),
            &borgmatic_repo.to_string_lossy(),
        ],
    );

    // The seed's file, the server and path changed; nothing else.
    let seed_for =
        |repo: &Path| SEED_000.replace("david@myserver:backup_dir", &world.sshd.url(repo));
    let yaml = home.join("Private/borg/borgmatic-config.yaml");
    std::fs::write(&yaml, seed_for(&ferry_repo)).expect("yaml");
    let borgmatic_yaml = world.path("borgmatic-config.yaml");
    std::fs::write(&borgmatic_yaml, seed_for(&borgmatic_repo)).expect("yaml");
    let user_config = home.join(".config/ferry/ferry.toml");
    std::fs::create_dir_all(user_config.parent().expect("dir")).expect("config dir");
    std::fs::write(
        &user_config,
        format!(
            "[borg]\nretries = 0\n\n[profiles.private]\nborgmatic-config = \"{}\"\n\n[profiles.private.preconditions]\nexists = [\"{}\"]\n",
            yaml.display(),
            yaml.display()
        ),
    )
    .expect("ferry.toml");

    let bus = TestBus::start_session();
    let xdg_config = home.join(".config").display().to_string();
    let xdg_state = home.join(".local/state").display().to_string();
    let service = start(
        &bus,
        &world,
        &["--user"],
        &[
            ("XDG_CONFIG_HOME", &xdg_config),
            ("XDG_STATE_HOME", &xdg_state),
        ],
    )
    .await;
    let ferryctl = binary_path("ferryctl");
    let (ok, said) = run_with(
        &ferryctl,
        &["--user", "backup", "--wait", "private"],
        &[("DBUS_SESSION_BUS_ADDRESS", bus.address().to_string())],
    )
    .await;
    assert!(
        ok,
        "ferryctl --user backup --wait private: {said}\n{}",
        service.process.log()
    );
    let finished = service
        .signals
        .wait_for("BackupFinished", |_| true, BORG_WAIT)
        .await;
    let ferry_archive = finished.args[2].clone();
    assert!(
        home.join(".local/state/ferry/borg.json").is_file(),
        "the user's state is under ~/.local/state/ferry"
    );

    let rsh = format!(
        "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} -i {} -o IdentitiesOnly=yes",
        ssh_dir.join("known_hosts").display(),
        ssh_dir.join("id_ed25519").display()
    );
    let borgmatic_env = [
        ("HOME", home.display().to_string()),
        (
            "BORG_BASE_DIR",
            world.path("borgmatic-base").display().to_string(),
        ),
        ("BORG_RSH", rsh),
    ];
    let borgmatic = ferry_integration_tests::command_path("borgmatic").expect("borgmatic");
    let yaml_arg = borgmatic_yaml.to_string_lossy().into_owned();
    // borgmatic 1.7 prunes before it creates; pruning once more afterwards
    // leaves what its retention keeps with the new archive in place, as
    // ferry's create-then-prune does.
    for args in [
        vec!["-c", yaml_arg.as_str()],
        vec!["-c", yaml_arg.as_str(), "prune"],
    ] {
        let (ok, said) = run_with(&borgmatic, &args, &borgmatic_env).await;
        assert!(ok, "borgmatic {args:?}: {said}");
    }

    let ferry_list = world.archives(&ferry_repo).await;
    let borgmatic_list = world.archives(&borgmatic_repo).await;
    let new_in = |list: &[String]| -> Vec<String> {
        list.iter()
            .filter(|a| !history.contains(a))
            .cloned()
            .collect()
    };
    let (ferry_new, borgmatic_new) = (new_in(&ferry_list), new_in(&borgmatic_list));
    assert_eq!(
        ferry_new,
        std::slice::from_ref(&ferry_archive),
        "{ferry_list:?}"
    );
    assert_eq!(borgmatic_new.len(), 1, "{borgmatic_list:?}");
    assert!(
        ferry_archive.starts_with(&format!("{host}-")),
        "{ferry_archive}"
    );
    assert!(
        borgmatic_new[0].starts_with(&format!("{host}-")),
        "{borgmatic_new:?}"
    );
    let kept = |list: &[String]| -> Vec<String> {
        list.iter()
            .filter(|a| history.contains(a))
            .cloned()
            .collect()
    };
    assert_eq!(
        kept(&ferry_list),
        kept(&borgmatic_list),
        "the retention keeps the same archives"
    );
    assert!(
        kept(&ferry_list).len() < history.len() && !kept(&ferry_list).is_empty(),
        "the retention pruned some of the history and kept some: {ferry_list:?}"
    );
    let ferry_files = archive_files(&world, &ferry_repo, &ferry_archive).await;
    assert_eq!(
        ferry_files,
        archive_files(&world, &borgmatic_repo, &borgmatic_new[0]).await,
        "the same sources"
    );
    let home_rel = home.display().to_string();
    let home_rel = home_rel.trim_start_matches('/');
    assert!(
        ferry_files
            .iter()
            .any(|f| f.ends_with(&format!("{home_rel}/Private/other-important-files/file1"))),
        "`~` is the user's HOME: {ferry_files:?}"
    );
    assert!(
        !ferry_files.iter().any(|f| f.contains("not-listed")),
        "{ferry_files:?}"
    );
    assert_eq!(
        archive_sizes(&world, &ferry_repo, &ferry_archive).await,
        archive_sizes(&world, &borgmatic_repo, &borgmatic_new[0]).await,
        "the same data, compressed the same way"
    );
}

/// A borgmatic file's own `ssh_command` (its key, its known_hosts, even
/// `StrictHostKeyChecking=no`) with an `ssh://` repository: the backup runs
/// with the user's words, but ferry's strict host key checking comes first,
/// so a changed host key still fails.
async fn a_borgmatic_ssh_command_is_used_and_cannot_turn_off_host_key_checks() {
    let Some(mut world) = World::new() else {
        return;
    };
    let repo = world.init("nas").await;
    let yaml = world.path("borgmatic.yaml");
    std::fs::write(
        &yaml,
        format!(
            "source_directories:\n    - {}\nrepositories:\n    - {}\nencryption_passcommand: cat {}\nssh_command: ssh -i {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=no\nkeep_daily: 7\n",
            world.path("src").display(),
            world.sshd.url(&repo),
            world.path("passphrase").display(),
            world.sshd.client_key().display(),
            world.sshd.known_hosts().display()
        ),
    )
    .expect("borgmatic file");
    let config = world.config(&format!(
        "[borg]\nretries = 0\n\n[profiles.laptop]\nborgmatic-config = \"{}\"\n",
        yaml.display()
    ));
    let bus = TestBus::start();
    let service = start(&bus, &world, &["--config", &config.to_string_lossy()], &[]).await;
    let (_, finished) = service.run("laptop").await;
    assert_eq!(
        finished.member,
        "BackupFinished",
        "{finished}\n{}",
        service.process.log()
    );
    assert_eq!(world.archives(&repo).await, [finished.args[2].clone()]);

    world.sshd.change_host_key();
    let (_, failed) = service.run("laptop").await;
    assert_eq!(failed.member, "BackupFailed", "{failed}");
    assert!(failed.args[3].contains("has CHANGED"), "{failed}");
    assert_eq!(world.archives(&repo).await, [finished.args[2].clone()]);
}

ferry_integration_tests::integration_tests! {
    async Machine: [
        backup_prune_compact_check_over_ssh,
        the_server_gone_is_skipped_and_retried_and_mailed_only_after_the_grace,
        a_changed_or_unknown_host_key_fails_saying_so,
        a_path_outside_restrict_to_path_fails,
        seed_000_in_a_user_level_ferry_borg_matches_borgmatic,
        a_borgmatic_ssh_command_is_used_and_cannot_turn_off_host_key_checks,
    ],
}
