use super::*;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn home() -> Tilde {
    Tilde::home("/home/david")
}

fn all(text: &str) -> Result<Vec<Plan>, Error> {
    parse_source(
        text,
        &Source {
            file: "/etc/borgmatic/config.yaml".into(),
            choice: None,
            lock_wait: WAIT,
            tilde: home(),
        },
    )
}

fn one(text: &str) -> Plan {
    let mut plans = all(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plans.len(), 1);
    plans.remove(0)
}

/// Seed 000's file as it was written (an ssh repository, `~` sources).
const SEED: &str = include_str!("../tests/fixtures/seed-000-borgmatic.yaml");

#[test]
fn seed_000_reads_completely() {
    let plan = parse(SEED, None, &WAIT, &home()).expect("seed 000 parses");
    assert_eq!(plan.repository, "david@myserver:backup_dir");
    assert!(!plan.is_local());
    assert_eq!(
        plan.sources,
        [
            "/home/david/.gnupg",
            "/home/david/.config/systemd/user",
            "/home/david/Private/borg",
            "/home/david/Private/other-important-files"
        ],
        "`~` is the file owner's home"
    );
    assert_eq!(
        plan.patterns,
        plan.sources
            .iter()
            .map(|s| format!("R {s}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        plan.passphrase,
        Passphrase::Inline(Secret::new("my-secure-passphrase".into()))
    );
    assert_eq!(
        plan.retention,
        [
            "--keep-within=3H",
            "--keep-hourly=24",
            "--keep-daily=7",
            "--keep-weekly=4",
            "--keep-monthly=6",
            "--keep-yearly=5"
        ]
    );
    let select = |before, scope, action| plan.hooks.select(before, scope, action, None);
    assert_eq!(
        select(true, Scope::Action, Some(Action::Create)),
        ["echo \"Starting a backup.\""]
    );
    assert!(select(true, Scope::Action, Some(Action::Prune)).is_empty());
    assert_eq!(select(false, Scope::Action, Some(Action::Create)).len(), 1);
    assert_eq!(select(false, Scope::Error, None).len(), 1);
    assert_eq!(plan.archive_name_format, DEFAULT_ARCHIVE_NAME_FORMAT);
    assert_eq!(plan.prune_glob, "{hostname}-*");
    let two_weeks = Some(Due::Every(Duration::from_secs(14 * 86_400)));
    assert_eq!(
        plan.checks.repository, two_weeks,
        "borgmatic's default checks"
    );
    assert_eq!(plan.checks.archives, two_weeks);
    assert_eq!(plan.lock_wait, WAIT);
    assert!(plan.sources_must_exist, "borgmatic 2's default");
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    assert!(!format!("{plan:?}").contains("my-secure-passphrase"));
}

const FLAT: &str = r#"
source_directories: [/home, /etc]
repositories:
    - path: /srv/borg/local
      label: local
    - path: ssh://user@host/./repo
      label: remote
encryption_passcommand: cat /etc/borg.pass
exclude_patterns: ["*.pyc", /home/*/.cache, "sh:**/node_modules"]
exclude_if_present: [.nobackup]
exclude_caches: true
compression: zstd,3
archive_name_format: "home-{now}"
lock_wait: 30
keep_daily: 7
checks:
    - name: repository
      frequency: 2 weeks
    - name: data
      frequency: always
check_last: 3
verbosity: 1
"#;

#[test]
fn the_flat_form_reads_too_with_every_repository() {
    let plans = all(FLAT).expect("flat form");
    assert_eq!(plans.len(), 2, "each repository is backed up in turn");
    let plan = &plans[0];
    assert_eq!(plan.repository, "/srv/borg/local");
    assert_eq!(plan.name(), "local");
    assert_eq!(plans[1].repository, "ssh://user@host/./repo");
    assert_eq!(
        plan.passphrase,
        Passphrase::Command("cat /etc/borg.pass".into())
    );
    assert_eq!(
        plan.create_options,
        [
            "--exclude-caches",
            "--exclude-if-present=.nobackup",
            "--compression=zstd,3"
        ]
    );
    assert_eq!(
        plan.patterns,
        [
            "R /home",
            "R /etc",
            "! fm:*.pyc",
            "! fm:/home/*/.cache",
            "! sh:**/node_modules"
        ]
    );
    assert_eq!(plan.prune_glob, "home-*");
    assert_eq!(plan.check_glob.as_deref(), Some("home-*"));
    assert_eq!(plan.lock_wait, Duration::from_secs(30));
    assert_eq!(plan.checks.data, Some(Due::Always));
    assert_eq!(plan.checks.archives, None);
    assert_eq!(plan.checks.last, Some(3));
    assert_eq!(plan.warnings.len(), 1);
    assert!(plan.warnings[0].contains("`verbosity`"));

    let by_path = parse(FLAT, Some("ssh://user@host/./repo"), &WAIT, &home()).expect("by path");
    assert_eq!(by_path.repository, "ssh://user@host/./repo");
    let err = parse(FLAT, Some("elsewhere"), &WAIT, &home())
        .unwrap_err()
        .to_string();
    assert!(err.contains("local: /srv/borg/local"), "{err}");
}

#[test]
fn borg_options_reach_every_command() {
    let plan = one(
        "source_directories: [/h]\nrepositories: [/r]\nkeep_daily: 1\nremote_path: borg1\numask: 0077\n\
         extra_borg_options:\n  create: --noatime --comment 'two words'\n  prune: --save-space\n  extract: --sparse\n",
    );
    let create = plan.create_args();
    for expected in [
        "--remote-path=borg1",
        "--umask=77",
        "--noatime",
        "two words",
    ] {
        assert!(
            create.iter().any(|a| a == expected),
            "{expected} in {create:?}"
        );
    }
    assert!(create.iter().any(|a| a == "--pattern=R /h"));
    assert_eq!(
        create.last().map(String::as_str),
        Some("/r::{hostname}-{now:%Y-%m-%dT%H:%M:%S.%f}")
    );
    let prune = plan.prune_args().expect("prune");
    assert!(
        prune.contains(&"--save-space".to_string()) && prune.contains(&"--umask=77".to_string())
    );
    let compact = plan.compact_args().expect("compact");
    assert!(compact.contains(&"--remote-path=borg1".to_string()));
    let checks = plan.check_args(true, true, false);
    assert_eq!(checks.len(), 1);
    assert!(checks[0].contains(&"--glob-archives={hostname}-*".to_string()));
    let err = all("source_directories: [/h]\nrepositories: [/r]\numask: rw\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 3: `umask` must be an octal umask"),
        "{err}"
    );
}

#[test]
fn globs_patterns_and_pattern_files_are_read_as_borgmatic_reads_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_str().expect("utf-8").to_string();
    for name in ["log/syslog", "log/syslog.1", "data/x"] {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, "x").expect("write");
    }
    std::fs::write(
        dir.path().join("patterns"),
        "# comment\n\n+ data/keep\n- re:\\.tmp$\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("excludes"), "*.bak\n  # no\n").expect("write");
    let text = format!(
        "source_directories: [\"{root}/log/syslog*\", \"{root}/none*\"]\nrepositories: [/r]\n\
         patterns: [\"R {root}/data\", \"- fm:*.o\", \"# skipped\"]\n\
         patterns_from: [\"{root}/patt*\"]\nexclude_from: [\"{root}/excludes\"]\n\
         exclude_patterns: [\"~/.cache\"]\nsource_directories_must_exist: false\n"
    );
    let plan = one(&text);
    let mut syslogs: Vec<&String> = plan.patterns[..2].iter().collect();
    syslogs.sort();
    assert_eq!(
        syslogs,
        [
            &format!("R {root}/log/syslog"),
            &format!("R {root}/log/syslog.1")
        ]
    );
    assert_eq!(
        &plan.patterns[2..],
        [
            format!("R {root}/none*"),
            format!("R {root}/data"),
            "- fm:*.o".to_string(),
            "! fm:/home/david/.cache".to_string(),
            "+ data/keep".to_string(),
            "- re:\\.tmp$".to_string(),
            "! fm:*.bak".to_string(),
        ]
    );
    assert_eq!(plan.sources.len(), 4, "the roots: {:?}", plan.sources);
    assert!(!plan.sources_must_exist);
    assert!(
        !plan
            .create_args()
            .iter()
            .any(|a| a == &format!("{root}/data")),
        "roots travel as patterns, never twice"
    );
    let err =
        all("source_directories: [/h]\nrepositories: [/r]\npatterns_from: [/nonexistent/p]\n")
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("cannot read the patterns_from file /nonexistent/p"),
        "{err}"
    );
    let err = all("source_directories: [/h]\nrepositories: [/r]\npatterns: [\"X /a\"]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("R, P, -, ! or +"), "{err}");
}

#[test]
fn commands_hooks_and_old_hooks_become_one_list_in_borgmatic_order() {
    let plan = one(
        "source_directories: [/h]\nrepositories: [/r]\n\
         before_backup: [old-before]\non_error: [old-error]\n\
         commands:\n\
         \x20 - before: repository\n    run: [repo-before]\n\
         \x20 - after: action\n    when: [prune, extract]\n    states: [fail]\n    run: [prune-failed]\n\
         \x20 - before: everything\n    when: [extract]\n    run: [never]\n\
         \x20 - after: configuration\n    run: [config-after]\n",
    );
    let hooks = &plan.hooks;
    assert_eq!(
        hooks.select(true, Scope::Repository, None, None),
        ["repo-before"]
    );
    assert_eq!(
        hooks.select(true, Scope::Action, Some(Action::Create), None),
        ["old-before"]
    );
    assert!(hooks
        .select(
            false,
            Scope::Action,
            Some(Action::Prune),
            Some(Outcome::Finish)
        )
        .is_empty());
    assert_eq!(
        hooks.select(
            false,
            Scope::Action,
            Some(Action::Prune),
            Some(Outcome::Fail)
        ),
        ["prune-failed"]
    );
    assert!(
        hooks.select(true, Scope::Everything, None, None).is_empty(),
        "a hook only `when:` extract never runs in a backup"
    );
    assert_eq!(
        hooks.select(false, Scope::Configuration, None, Some(Outcome::Fail)),
        ["config-after"]
    );
    assert_eq!(hooks.select(false, Scope::Error, None, None), ["old-error"]);
    assert_eq!(
        hooks.borgmatic_file.as_deref(),
        Some("/etc/borgmatic/config.yaml")
    );
    let err = all("source_directories: [/h]\nrepositories: [/r]\ncommands:\n  - before: dump_data_sources\n    run: [x]\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 3: ") && err.contains("dump_data_sources"),
        "{err}"
    );
}

#[test]
fn archive_globs_as_borgmatic_derives_them() {
    assert_eq!(
        match_glob(DEFAULT_ARCHIVE_NAME_FORMAT).as_deref(),
        Some("{hostname}-*")
    );
    assert_eq!(match_glob("{now}").as_deref(), None);
    assert_eq!(
        match_glob("{user}-{utcnow:%Y}-{pid}-{uuid4}").as_deref(),
        Some("{user}-*-*-{uuid4}")
    );
    let plan = one("source_directories: [/h]\nrepositories: [/r]\nprefix: home-\nkeep_daily: 1\n");
    assert_eq!(plan.prune_glob, "home-*");
}

#[test]
fn unsupported_options_are_named_never_dropped() {
    let text = "location:\n  source_directories: [/home]\n  repositories: [/srv/r]\n  local_path: borg1\nstorage:\n  borg_base_directory: /x\npostgresql_databases:\n  - name: all\n";
    let err = all(text).unwrap_err().to_string();
    for key in [
        "line 4: `location.local_path`",
        "line 6: `storage.borg_base_directory`",
        "line 7: `postgresql_databases`",
    ] {
        assert!(err.contains(key), "{key} in {err}");
    }
    let err = all("source_directories: [/home]\nrepositories: [/r]\nchecks: [{name: extract}]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("check `extract`"), "{err}");
    let err = all("source_directories: [/h]\nrepositories: [/r]\nencryption_passphrase: ${PASS}\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("interpolation") && !err.contains("PASS}"),
        "{err}"
    );
    let err = all("location:\n  source_directories: [/a]\nsource_directories: [/b]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("both set"), "{err}");
    assert!(all("- a\n").is_err());
    assert!(
        all("source_directories: [/h]\nrepositories: [/r]\nkeep_daily: many\n")
            .unwrap_err()
            .to_string()
            .contains("`keep_daily` must be a whole number")
    );
    let err = all("source_directories: [/h]\nrepositories:\n  - path: /r\n    remote_path: x\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("repository option `remote_path`"), "{err}");
}
