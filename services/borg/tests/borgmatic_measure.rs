//! ferry-borg measured against borgmatic itself.
//!
//! For a corpus of borgmatic files — seed 000's (paths put on this
//! machine), the file borgmatic 2.1.10 generates with many of its example
//! values switched on, and one file per option the compatibility table
//! says ferry-borg honours — this runs the real borgmatic (from PyPI, in a
//! venv cached under /var/tmp/ferry-borgmatic-venv/<version>) and
//! compares what it has borg do with ferry-borg's plan of the same file
//! against the same local repository:
//!
//! 1. `borgmatic --dry-run -v 2`: the borg create, prune and check command
//!    lines (borgmatic logs each, and the patterns file it writes), flags
//!    compared as a set (borg does not care about their order), root
//!    patterns as a set, the other patterns in order (borg's first match
//!    wins);
//! 2. where a dry run cannot show it — borg compact is skipped, and what
//!    the patterns really select — a real `borgmatic -v 2` run and a real
//!    run of the plan's commands on a fresh repository: the compact command
//!    lines, and the archives' file lists, must be the same.
//!
//! It needs python3 with venv (scripts/setup --tests installs it), borg,
//! and the network for the first run (pip); without them it is skipped,
//! and under CI=true it fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_borg::borgmatic::{parse_source, Source};
use ferry_borg::compat::{self, Support};
use ferry_borg::plan::{Passphrase, Plan};
use ferry_borg::tilde::Tilde;

const VERSION: &str = compat::BORGMATIC_VERSION;
const PASSPHRASE: &str = "measured-passphrase";
/// The generated file's example passphrase, every ASCII punctuation mark.
const GENERATED_PASSPHRASE: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";
const SEED: &str = include_str!("fixtures/seed-000-borgmatic.yaml");
const GENERATED: &str = include_str!("fixtures/borgmatic-2.1.10-generated.yaml");

fn require(what: &str, ok: bool) -> bool {
    if ok {
        return true;
    }
    if matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1")) {
        panic!("prerequisite missing under CI=true: {what}");
    }
    eprintln!("SKIP borgmatic_measure: {what}");
    false
}

/// The borgmatic program of the cached venv, made once per version (a
/// `ready` file marks a complete one; a venv cannot be moved, so it is
/// made in place).
fn borgmatic() -> Option<PathBuf> {
    let venv = PathBuf::from(format!("/var/tmp/ferry-borgmatic-venv/{VERSION}"));
    let ready = venv.join("ready");
    // One test process makes it; the others wait on the lock.
    std::fs::create_dir_all("/var/tmp/ferry-borgmatic-venv").ok()?;
    let lock =
        std::fs::File::create(format!("/var/tmp/ferry-borgmatic-venv/{VERSION}.lock")).ok()?;
    lock.lock().ok()?;
    if !ready.exists() {
        let _ = std::fs::remove_dir_all(&venv);
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", &format!("borgmatic=={VERSION}")])
                .status()
                .is_ok_and(|s| s.success());
        if !made || std::fs::write(&ready, VERSION).is_err() {
            return None;
        }
    }
    Some(venv.join("bin/borgmatic"))
}

/// One borg command: its action, positional arguments, flags (as a
/// sorted list), root patterns (sorted) and other patterns (in order).
#[derive(Debug, PartialEq, Eq, Clone)]
struct Borg {
    action: String,
    positional: Vec<String>,
    flags: Vec<String>,
    roots: Vec<String>,
    patterns: Vec<String>,
}

/// borg options that take a value, joined as `--option=value`.
const VALUED: [&str; 28] = [
    "--patterns-from",
    "--pattern",
    "--exclude",
    "--exclude-if-present",
    "--compression",
    "--remote-path",
    "--umask",
    "--lock-wait",
    "--glob-archives",
    "--match-archives",
    "--keep-within",
    "--keep-secondly",
    "--keep-minutely",
    "--keep-hourly",
    "--keep-daily",
    "--keep-weekly",
    "--keep-monthly",
    "--keep-yearly",
    "--last",
    "--max-duration",
    "--comment",
    "--threshold",
    "--checkpoint-interval",
    "--chunker-params",
    "--upload-ratelimit",
    "--upload-buffer",
    "--files-cache",
    "--filter",
];

/// Output and dry-run flags: borgmatic and ferry-borg choose their own.
const OUTPUT_FLAGS: [&str; 10] = [
    "--debug",
    "--show-rc",
    "--dry-run",
    "--info",
    "--log-json",
    "--progress",
    "--json",
    "--stats",
    "--list",
    "--",
];

impl Borg {
    /// From argv after `borg`; `patterns` holds the files borgmatic wrote.
    fn new(argv: &[String], files: &BTreeMap<String, Vec<String>>) -> Borg {
        let mut borg = Borg {
            action: argv[0].clone(),
            positional: Vec::new(),
            flags: Vec::new(),
            roots: Vec::new(),
            patterns: Vec::new(),
        };
        let mut words = argv[1..].iter();
        while let Some(word) = words.next() {
            let flag = if VALUED.contains(&word.as_str()) {
                format!("{word}={}", words.next().cloned().unwrap_or_default())
            } else {
                word.clone()
            };
            if OUTPUT_FLAGS.contains(&flag.as_str()) {
                continue;
            }
            let lines: Vec<String> = match flag.split_once('=') {
                Some(("--patterns-from", file)) => files
                    .get(file)
                    .cloned()
                    .unwrap_or_else(|| panic!("borgmatic's patterns file {file} was not logged")),
                Some(("--pattern", line)) => vec![line.to_string()],
                _ if flag.starts_with('-') => {
                    borg.flags.push(flag);
                    continue;
                }
                _ => {
                    borg.positional.push(flag);
                    continue;
                }
            };
            for line in lines {
                match line.strip_prefix("R ") {
                    Some(root) => borg.roots.push(root.to_string()),
                    None => borg.patterns.push(line),
                }
            }
        }
        borg.flags.sort();
        borg.roots.sort();
        borg
    }

    /// Without `--lock-wait` (ferry-borg always passes its own default;
    /// borgmatic only the file's).
    fn without_lock_wait(mut self) -> Borg {
        self.flags.retain(|f| !f.starts_with("--lock-wait="));
        self
    }
}

/// What borgmatic logged: per repository (log prefix) the borg commands
/// in order, and the names of the BORG_* variables it set.
#[derive(Debug, Default)]
struct Logged {
    commands: BTreeMap<String, Vec<Borg>>,
    environment: BTreeMap<String, Vec<String>>,
}

fn parse_log(log: &str) -> Logged {
    let lines: Vec<&str> = log.lines().collect();
    let mut files: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        let Some((prefix, rest)) = line.split_once(": Writing patterns to ") else {
            continue;
        };
        let file = rest.trim_end_matches(':').to_string();
        let patterns = lines[i + 1..]
            .iter()
            .take_while(|l| !l.starts_with(&format!("{prefix}: ")))
            .map(|l| l.to_string())
            .collect();
        files.insert(file, patterns);
    }
    let mut logged = Logged::default();
    for line in &lines {
        let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        let Some(at) = words.iter().position(|w| w == "borg") else {
            continue;
        };
        let Some(action) = words.get(at + 1) else {
            continue;
        };
        if !["create", "prune", "compact", "check"].contains(&action.as_str())
            || (action == "create" && words.iter().any(|w| w == "--list"))
        {
            continue;
        }
        let Some((prefix, _)) = line.split_once(": ") else {
            continue;
        };
        let borg = Borg::new(&words[at + 1..], &files);
        logged
            .commands
            .entry(prefix.to_string())
            .or_default()
            .push(borg);
        let names = words[..at]
            .iter()
            .filter_map(|w| w.strip_suffix("=***"))
            .map(|w| w.rsplit(' ').next().unwrap_or(w).to_string());
        let env = logged.environment.entry(prefix.to_string()).or_default();
        for name in names {
            if !env.contains(&name) {
                env.push(name);
            }
        }
    }
    logged
}

/// A place with sources, a pattern file and repositories.
struct World {
    dir: tempfile::TempDir,
    borgmatic: PathBuf,
}

impl World {
    fn root(&self) -> String {
        self.dir.path().to_string_lossy().into_owned()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn new(borgmatic: PathBuf) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let world = World { dir, borgmatic };
        for (name, text) in [
            ("src/a/one.txt", "1"),
            ("src/a/skip.tmp", "t"),
            ("src/a/deep/two.log", "2"),
            ("src/b/three.txt", "3"),
            (
                "src/c/CACHEDIR.TAG",
                "Signature: 8a477f597d28d172789f06886806bc55\n",
            ),
            ("src/c/cached", "c"),
            ("src/d/.nobackup", ""),
            ("src/d/hidden", "h"),
            ("src/.dot/x", "x"),
            ("home/david/.gnupg/key", "k"),
            ("home/david/.config/systemd/user/a.service", "s"),
            ("home/david/Private/borg/f", "f"),
            ("home/david/Private/other-important-files/f", "f"),
            ("home/user/path with spaces/f", "f"),
            ("home/susan/f", "f"),
            ("etc/hosts", "h"),
            ("var/log/syslog", "l"),
            ("var/log/syslog.1", "l"),
            ("var/log/other", "o"),
            (
                "pattern-file",
                "# patterns\n+ {root}/src/a\n- {root}/src/*\n",
            ),
            ("exclude-file", "*.log\n\n# comment\n{root}/src/b\n"),
            ("pass", PASSPHRASE),
        ] {
            let path = world.path(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, text.replace("{root}", &world.root())).expect("write");
        }
        world
    }

    fn borg(&self, passphrase: &str, args: &[String]) -> std::process::Output {
        let output = Command::new("borg")
            .args(args)
            .env("BORG_PASSPHRASE", passphrase)
            .env("BORG_BASE_DIR", self.path("borg-base"))
            .env_remove("BORG_PASSCOMMAND")
            .env_remove("BORG_RSH")
            .output()
            .expect("run borg");
        assert!(
            output.status.code().is_some_and(|c| c <= 1),
            "borg {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    fn init(&self, repository: &str, passphrase: &str) {
        let _ = std::fs::remove_dir_all(repository);
        self.borg(
            passphrase,
            &[
                "init".into(),
                "--encryption=repokey".into(),
                repository.into(),
            ],
        );
    }

    /// Runs borgmatic on `file`; its log.
    fn run_borgmatic(&self, file: &Path, dry_run: bool) -> String {
        let state = file.with_extension("state");
        // Its own runtime directory: borgmatic runs side by side otherwise
        // clean up each other's bootstrap files under /tmp/borgmatic-*.
        let runtime = file.with_extension("runtime");
        std::fs::create_dir_all(&runtime).expect("runtime directory");
        let _ = std::fs::remove_dir_all(&state);
        let mut command = Command::new(&self.borgmatic);
        command
            .args(["-c", &file.to_string_lossy(), "-v", "2"])
            .env("XDG_STATE_HOME", &state)
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("BORG_BASE_DIR", self.path("borg-base"))
            .env_remove("BORG_PASSPHRASE");
        if dry_run {
            command.arg("--dry-run");
        }
        let output = command.output().expect("run borgmatic");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "borgmatic on {}:\n{log}",
            file.display()
        );
        log
    }

    /// Runs the plan's commands as the job does (create, prune, compact,
    /// every check due on a first run).
    fn run_plan(&self, plan: &Plan, passphrase: &str) {
        let mut runs = vec![plan.create_args()];
        runs.extend(plan.prune_args());
        runs.extend(plan.compact_args());
        runs.extend(plan.check_args(
            plan.checks.repository.is_some(),
            plan.checks.archives.is_some(),
            plan.checks.data.is_some(),
        ));
        for args in runs {
            self.borg(passphrase, &args);
        }
    }

    /// The newest archive's files, sorted.
    fn files(&self, repository: &str, passphrase: &str) -> Vec<String> {
        let names = self.borg(
            passphrase,
            &[
                "list".into(),
                "--short".into(),
                "--last=1".into(),
                repository.into(),
            ],
        );
        let archive = String::from_utf8_lossy(&names.stdout).trim().to_string();
        assert!(!archive.is_empty(), "no archive in {repository}");
        let listed = self.borg(
            passphrase,
            &[
                "list".into(),
                "--short".into(),
                format!("{repository}::{archive}"),
            ],
        );
        let mut files: Vec<String> = String::from_utf8_lossy(&listed.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        files.sort();
        files
    }
}

/// ferry-borg's plans of a file.
fn plans(text: &str, file: &Path) -> Vec<Plan> {
    parse_source(
        text,
        &Source {
            file: file.to_string_lossy().into_owned(),
            choice: None,
            lock_wait: Duration::from_secs(60),
            tilde: Tilde::home("/root"),
        },
    )
    .unwrap_or_else(|e| panic!("ferry-borg refuses {}: {e}", file.display()))
}

/// ferry-borg's commands of a plan, as borgmatic runs them on a first run.
fn planned(plan: &Plan, with_compact: bool) -> Vec<Borg> {
    let mut runs = vec![plan.create_args()];
    runs.extend(plan.prune_args());
    if with_compact {
        runs.extend(plan.compact_args());
    }
    runs.extend(plan.check_args(
        plan.checks.repository.is_some(),
        plan.checks.archives.is_some(),
        plan.checks.data.is_some(),
    ));
    runs.iter()
        .map(|args| Borg::new(args, &BTreeMap::new()))
        .collect()
}

/// Compares borgmatic's commands with the plans', per repository.
fn compare(name: &str, logged: &Logged, plans: &[Plan], with_compact: bool) {
    assert_eq!(
        logged.commands.len(),
        plans.len(),
        "{name}: borgmatic ran on {:?}",
        logged.commands.keys()
    );
    for plan in plans {
        let theirs = logged
            .commands
            .get(plan.name())
            .unwrap_or_else(|| panic!("{name}: borgmatic logged nothing for {}", plan.name()));
        let lock_wait_set = theirs
            .iter()
            .any(|b| b.flags.iter().any(|f| f.starts_with("--lock-wait=")));
        let ours: Vec<Borg> = planned(plan, with_compact)
            .into_iter()
            .map(|b| {
                if lock_wait_set {
                    b
                } else {
                    b.without_lock_wait()
                }
            })
            .collect();
        assert_eq!(theirs, &ours, "{name}: {}", plan.name());
        let env = logged
            .environment
            .get(plan.name())
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            env.contains(&"BORG_RSH".to_string()),
            plan.rsh.is_some(),
            "{name}: BORG_RSH in {env:?}"
        );
    }
}

/// A file of the corpus: its name, text, and repositories with passphrase.
struct Case {
    name: String,
    text: String,
    passphrase: String,
    /// Also compare a real run (what is archived, and borg compact).
    real: bool,
}

/// The one-option files whose real runs are compared too: what they
/// change is what gets archived, or borg compact's command line.
const REAL_RUNS: [&str; 14] = [
    "source_directories",
    "source_directories_must_exist",
    "repositories",
    "one_file_system",
    "patterns",
    "patterns_from",
    "exclude_patterns",
    "exclude_from",
    "exclude_caches",
    "exclude_if_present",
    "encryption_passcommand",
    "umask",
    "remote_path",
    "extra_borg_options",
];

/// The base of a one-option file: sources, a repository, a passphrase.
fn base(world: &World, name: &str, extra: &str) -> Case {
    let root = world.root();
    Case {
        name: name.into(),
        text: format!(
            "source_directories:\n    - {root}/src\nrepositories:\n    - path: {root}/repo-{name}\n      label: {name}\n\
             encryption_passphrase: {PASSPHRASE}\nkeep_daily: 7\n{extra}"
        ),
        passphrase: PASSPHRASE.into(),
        real: REAL_RUNS.contains(&name),
    }
}

/// One file per option the table honours (the base's options included).
fn per_option(world: &World) -> BTreeMap<&'static str, Case> {
    let root = world.root();
    let with = |name: &'static str, extra: String| (name, base(world, name, &extra));
    let mut cases: BTreeMap<&'static str, Case> = [
        with("one_file_system", "one_file_system: true\n".into()),
        with("source_directories_must_exist", format!("source_directories_must_exist: false\npatterns: ['R {root}/missing']\n")),
        with("remote_path", "remote_path: borg1\n".into()),
        with("patterns", format!("patterns:\n    - R {root}/var/log\n    - '- fm:*.tmp'\n    - + {root}/src/a\n    - '- {root}/src/*'\n    - '# a comment'\n")),
        with("patterns_from", format!("patterns_from: [{root}/pattern-fil*]\n")),
        with("exclude_patterns", format!("exclude_patterns: ['*.tmp', '{root}/src/b', 'sh:**/deep']\n")),
        with("exclude_from", format!("exclude_from: [{root}/exclude-file]\n")),
        with("exclude_caches", "exclude_caches: true\n".into()),
        with("exclude_if_present", "exclude_if_present: [.nobackup]\n".into()),
        with("compression", "compression: zstd,3\n".into()),
        with("retries", "retries: 2\n".into()),
        with("retry_wait", "retries: 1\nretry_wait: 1\n".into()),
        with("ssh_command", "ssh_command: ssh -i /nonexistent/key\n".into()),
        with("umask", "umask: 0077\n".into()),
        with("lock_wait", "lock_wait: 7\n".into()),
        with("archive_name_format", "archive_name_format: '{hostname}-documents-{now:%Y%m%d-%H%M%S}-{pid}'\n".into()),
        with("extra_borg_options", "extra_borg_options:\n    create: --comment measured\n    prune: --save-space\n    compact: --threshold 20\n    check: --save-space\n    extract: --sparse\n".into()),
        with("keep_within", "keep_within: 3H\n".into()),
        with("prefix", "prefix: '{hostname}-'\n".into()),
        with("checks", "checks:\n    - name: repository\n    - name: archives\n      frequency: 2 weeks\n    - name: data\n".into()),
        with("check_last", "check_last: 2\n".into()),
        with("commands", "commands:\n    - before: action\n      when: [create]\n      run: ['echo before create {repository}']\n    - after: repository\n      states: [finish]\n      run: [echo done]\n    - after: error\n      run: [echo failed]\n".into()),
    ]
    .into_iter()
    .collect();
    for count in [
        "secondly", "minutely", "hourly", "weekly", "monthly", "yearly",
    ] {
        let name: &'static str = Box::leak(format!("keep_{count}").into_boxed_str());
        cases.insert(name, base(world, name, &format!("{name}: 3\n")));
    }
    for (name, ..) in compat::OPTIONS {
        if name.starts_with("before_") || name.starts_with("after_") || *name == "on_error" {
            cases.insert(name, base(world, name, &format!("{name}: [echo {name}]\n")));
        }
    }
    cases.insert(
        "source_directories",
        Case {
            text: base(world, "source_directories", "").text.replace(
                &format!("    - {root}/src\n"),
                &format!("    - {root}/src/*\n    - {root}/var/log/syslog*\n    - '{root}/home/user/path with spaces'\n    - {root}/src/[ab]\n"),
            ),
            ..base(world, "source_directories", "")
        },
    );
    let mut two = base(world, "repositories", "");
    two.text = two.text.replace(
        "      label: repositories\n",
        &format!("      label: repositories\n    - path: {root}/repo-repositories-2\n      label: second\n"),
    );
    cases.insert("repositories", two);
    let mut passcommand = base(world, "encryption_passcommand", "");
    passcommand.text = passcommand.text.replace(
        &format!("encryption_passphrase: {PASSPHRASE}\n"),
        &format!("encryption_passcommand: cat {root}/pass\n"),
    );
    cases.insert("encryption_passcommand", passcommand);
    cases.insert(
        "encryption_passphrase",
        base(world, "encryption_passphrase", ""),
    );
    cases.insert("keep_daily", base(world, "keep_daily", ""));
    cases
}

/// Seed 000's file with its `~` and server put on this machine.
fn seed(world: &World) -> Case {
    let root = world.root();
    Case {
        name: "seed-000".into(),
        text: SEED
            .replace("~/", &format!("{root}/home/david/"))
            .replace("david@myserver:backup_dir", &format!("{root}/repo-seed"))
            .replace("my-secure-passphrase", PASSPHRASE),
        passphrase: PASSPHRASE.into(),
        real: true,
    }
}

/// borgmatic's generated file: example values switched on where they make
/// sense on this machine, paths put under the world, a local repository.
fn generated(world: &World) -> Case {
    let root = world.root();
    let mut text = GENERATED.to_string();
    for (from, to) in [
        ("    - /home\n", format!("    - {root}/home\n")),
        ("    - /etc\n", format!("    - {root}/etc\n")),
        (
            "    - /var/log/syslog*\n",
            format!("    - {root}/var/log/syslog*\n"),
        ),
        (
            "    - /home/user/path with spaces\n",
            format!("    - {root}/home/user/path with spaces\n"),
        ),
        (
            "    - path: ssh://user@backupserver/./sourcehostname.borg\n",
            format!("    - path: {root}/repo-generated\n"),
        ),
    ] {
        assert!(text.contains(from), "the generated file has no {from:?}");
        text = text.replace(from, &to);
    }
    for option in [
        "one_file_system",
        "exclude_patterns",
        "exclude_caches",
        "exclude_if_present",
        "encryption_passphrase",
        "compression",
        "retries",
        "retry_wait",
        "ssh_command",
        "remote_path",
        "umask",
        "lock_wait",
        "archive_name_format",
        "keep_within",
        "keep_hourly",
        "keep_weekly",
        "keep_monthly",
        "keep_yearly",
        "check_last",
        "before_backup",
        "after_backup",
        "on_error",
    ] {
        text = switch_on(&text, option);
    }
    Case {
        name: "generated".into(),
        text,
        passphrase: GENERATED_PASSPHRASE.into(),
        real: true,
    }
}

/// Uncomments `# option: …` and its `    # - item` lines.
fn switch_on(text: &str, option: &str) -> String {
    let mut out = Vec::new();
    let mut inside = false;
    let mut found = false;
    for line in text.lines() {
        if line.starts_with(&format!("# {option}:")) {
            out.push(line[2..].to_string());
            inside = true;
            found = true;
            continue;
        }
        if inside {
            if let Some(item) = line.strip_prefix("    # - ") {
                out.push(format!("    - {item}"));
                continue;
            }
            inside = false;
        }
        out.push(line.to_string());
    }
    assert!(found, "the generated file has no `# {option}:`");
    out.join("\n") + "\n"
}

/// The repositories (path) a case's plans write to.
fn repository_paths(plans: &[Plan]) -> Vec<String> {
    plans.iter().map(|p| p.repository.clone()).collect()
}

fn measure(world: &World, case: &Case) {
    let file = world.path(&format!("{}.yaml", case.name));
    std::fs::write(&file, &case.text).expect("write the file");
    let plans = plans(&case.text, &file);
    for plan in &plans {
        if let Passphrase::Inline(secret) = &plan.passphrase {
            assert_eq!(secret.expose(), case.passphrase, "{}", case.name);
        }
    }
    // 1. The dry run's command lines.
    for repository in repository_paths(&plans) {
        world.init(&repository, &case.passphrase);
    }
    let log = world.run_borgmatic(&file, true);
    compare(&case.name, &parse_log(&log), &plans, false);
    if !case.real {
        return;
    }

    // 2. A real run each: compact's command line, and the files archived.
    // A real borgmatic run also stores its configuration file and a
    // manifest in each archive (its `bootstrap` hook); ferry-borg does not.
    let log = world.run_borgmatic(&file, false);
    let mut logged = parse_log(&log);
    let file_name = file.to_string_lossy().into_owned();
    let bootstrap = |path: &str| path.ends_with(&file_name) || path.contains("borgmatic/bootstrap");
    for borg in logged.commands.values_mut().flatten() {
        borg.roots.retain(|r| !bootstrap(r));
        borg.patterns.retain(|p| !bootstrap(p));
    }
    compare(&case.name, &logged, &plans, true);
    for plan in &plans {
        let mut theirs = world.files(&plan.repository, &case.passphrase);
        theirs.retain(|f| !bootstrap(&format!("/{f}")));
        world.init(&plan.repository, &case.passphrase);
        world.run_plan(plan, &case.passphrase);
        let ours = world.files(&plan.repository, &case.passphrase);
        assert_eq!(
            theirs,
            ours,
            "{}: the files archived in {}",
            case.name,
            plan.name()
        );
    }
}

/// The world and borgmatic for a test, or None (skipped) without them.
fn prepared() -> Option<World> {
    let borg = Command::new("borg").arg("--version").output();
    if !require(
        "borg (apt install borgbackup)",
        borg.is_ok_and(|o| o.status.success()),
    ) {
        return None;
    }
    let Some(program) = borgmatic() else {
        require(
            &format!("a venv with borgmatic=={VERSION} from PyPI (python3-venv and the network)"),
            false,
        );
        return None;
    };
    Some(World::new(program))
}

/// Every file of the corpus by name.
fn corpus(world: &World) -> BTreeMap<String, Case> {
    let mut all: BTreeMap<String, Case> = per_option(world)
        .into_iter()
        .map(|(name, case)| (name.to_string(), case))
        .collect();
    all.insert("seed-000".into(), seed(world));
    all.insert("generated".into(), generated(world));
    all
}

/// Measures one file of the corpus.
fn measure_named(name: &str) {
    let Some(world) = prepared() else { return };
    let mut all = corpus(&world);
    let case = all
        .remove(name)
        .unwrap_or_else(|| panic!("no file `{name}` in the corpus"));
    let started = std::time::Instant::now();
    measure(&world, &case);
    eprintln!("measured {name} in {:.1?}", started.elapsed());
}

/// One test per file of the corpus (each a few borg runs: side by side,
/// and each well within the test timeout on a busy machine).
macro_rules! measured {
    ($($test:ident => $name:literal),* $(,)?) => {
        /// The corpus files that have a test.
        const MEASURED: &[&str] = &[$($name),*];
        $(
            #[test]
            fn $test() {
                measure_named($name);
            }
        )*
    };
}

measured! {
    seed_000 => "seed-000",
    generated_file => "generated",
    source_directories => "source_directories",
    source_directories_must_exist => "source_directories_must_exist",
    repositories => "repositories",
    one_file_system => "one_file_system",
    remote_path => "remote_path",
    patterns => "patterns",
    patterns_from => "patterns_from",
    exclude_patterns => "exclude_patterns",
    exclude_from => "exclude_from",
    exclude_caches => "exclude_caches",
    exclude_if_present => "exclude_if_present",
    encryption_passcommand => "encryption_passcommand",
    encryption_passphrase => "encryption_passphrase",
    compression => "compression",
    retries => "retries",
    retry_wait => "retry_wait",
    ssh_command => "ssh_command",
    umask => "umask",
    lock_wait => "lock_wait",
    archive_name_format => "archive_name_format",
    extra_borg_options => "extra_borg_options",
    keep_within => "keep_within",
    keep_secondly => "keep_secondly",
    keep_minutely => "keep_minutely",
    keep_hourly => "keep_hourly",
    keep_daily => "keep_daily",
    keep_weekly => "keep_weekly",
    keep_monthly => "keep_monthly",
    keep_yearly => "keep_yearly",
    prefix => "prefix",
    checks => "checks",
    check_last => "check_last",
    before_actions => "before_actions",
    before_backup => "before_backup",
    before_prune => "before_prune",
    before_compact => "before_compact",
    before_check => "before_check",
    before_extract => "before_extract",
    after_backup => "after_backup",
    after_compact => "after_compact",
    after_prune => "after_prune",
    after_check => "after_check",
    after_extract => "after_extract",
    after_actions => "after_actions",
    on_error => "on_error",
    before_everything => "before_everything",
    after_everything => "after_everything",
    commands => "commands",
}

/// Every option the table honours has a file, and every file a test; the
/// generated fixture is what this borgmatic generates.
#[test]
fn the_corpus_covers_every_honoured_option() {
    let Some(world) = prepared() else { return };
    let all = corpus(&world);
    let unmeasured: Vec<&str> = compat::OPTIONS
        .iter()
        .filter(|(_, s)| matches!(s, Support::Honoured | Support::Differs(_)))
        .map(|(n, _)| *n)
        .filter(|n| !all.contains_key(*n))
        .collect();
    assert!(
        unmeasured.is_empty(),
        "honoured options without a file: {unmeasured:?}"
    );
    let untested: Vec<&String> = all
        .keys()
        .filter(|n| !MEASURED.contains(&n.as_str()))
        .collect();
    assert!(
        untested.is_empty(),
        "corpus files without a test: {untested:?}"
    );

    let fresh = world.path("fresh.yaml");
    let status = Command::new(&world.borgmatic)
        .args(["config", "generate", "-d", &fresh.to_string_lossy()])
        .output()
        .expect("borgmatic config generate");
    assert!(status.status.success(), "{status:?}");
    assert_eq!(
        std::fs::read_to_string(&fresh).expect("generated"),
        GENERATED,
        "tests/fixtures/borgmatic-{VERSION}-generated.yaml is not what borgmatic generates"
    );
}
