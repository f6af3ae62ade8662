//! Reading an existing borgmatic configuration file into a [`Plan`], so a
//! borgmatic user points ferry at the file they already have.
//!
//! Both forms are read: the old one with `location:`, `storage:`,
//! `retention:`, `consistency:` and `hooks:` sections (seed 000's file) and
//! the current flat one. Every option is either carried over or named: an
//! option that would change what is backed up, where, or how is an error
//! (ferry never quietly backs up something else than borgmatic would); an
//! option that only shapes borgmatic's own output is a warning. The
//! passphrase written in the file is kept as a [`Secret`] and reaches borg
//! only through its passphrase pipe. `~` means the home of the file's owner
//! ([`Tilde`]), never ferry-borg's own HOME.

use std::collections::BTreeMap;
use std::path::Path;

use ferry_config::{Config, Name, Profile};
use serde_yaml_ng::Value;

use crate::compat::{self, Support};
use crate::plan::{
    is_local, prune_glob, CheckPlan, CreateOptions, Due, HookPlan, Passphrase, Plan, Secret,
    DEFAULT_ARCHIVE_NAME_FORMAT,
};
use crate::tilde::Tilde;

/// The sections of the old form; their keys are read as if at the top level.
const SECTIONS: [&str; 6] = [
    "location",
    "storage",
    "retention",
    "consistency",
    "hooks",
    "output",
];

/// borgmatic's checks when the file names none: repository and archives,
/// every two weeks.
const DEFAULT_CHECK_FREQUENCY: u64 = 14 * 86_400;

/// Reads the borgmatic file of profile `name` and makes its plan.
pub fn load(config: &Config, name: &Name, profile: &Profile) -> Result<Plan, String> {
    let path = profile
        .borgmatic_config
        .as_ref()
        .ok_or_else(|| format!("profile `{name}` has no borgmatic-config"))?;
    let text = std::fs::read_to_string(path.as_ref() as &Path)
        .map_err(|e| format!("cannot read the borgmatic file {}: {e}", path.display()))?;
    let mut plan = parse(
        &text,
        profile.borgmatic_repository.as_deref(),
        &config.borg.lock_wait.duration(),
        &Tilde::of_owner(path.as_ref()),
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(wait) = profile.lock_wait {
        plan.lock_wait = wait.duration();
    }
    if let Some(compact) = profile.compact {
        plan.compact = compact;
    }
    Ok(plan)
}

/// A value with where it was found (`location.source_directories`).
struct Entry<'a> {
    key: String,
    value: &'a Value,
}

impl Entry<'_> {
    fn string(&self) -> Result<String, String> {
        match self.value {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            _ => Err(format!("`{}` must be text", self.key)),
        }
    }

    fn strings(&self) -> Result<Vec<String>, String> {
        match self.value {
            Value::Sequence(items) => items
                .iter()
                .map(|v| {
                    Entry {
                        key: self.key.clone(),
                        value: v,
                    }
                    .string()
                })
                .collect(),
            Value::String(s) => Ok(vec![s.clone()]),
            Value::Null => Ok(Vec::new()),
            _ => Err(format!("`{}` must be a list of text", self.key)),
        }
    }

    fn boolean(&self) -> Result<bool, String> {
        self.value
            .as_bool()
            .ok_or_else(|| format!("`{}` must be true or false", self.key))
    }

    fn count(&self) -> Result<u32, String> {
        self.value
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("`{}` must be a whole number", self.key))
    }
}

/// Parses borgmatic YAML. `choice` picks one of several repositories by
/// label or path; `lock_wait` is the default when the file sets none;
/// `tilde` expands `~`.
pub fn parse(
    text: &str,
    choice: Option<&str>,
    lock_wait: &std::time::Duration,
    tilde: &Tilde,
) -> Result<Plan, String> {
    let root: Value = serde_yaml_ng::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    let Value::Mapping(top) = root else {
        return Err("the file is not a borgmatic configuration (no keys at the top)".into());
    };
    // Flatten the old sections into one map of option → entry.
    let mut flat: BTreeMap<String, Entry> = BTreeMap::new();
    for (key, value) in &top {
        let key = key
            .as_str()
            .ok_or_else(|| "a top-level key is not text".to_string())?;
        let entries: Vec<(String, String, &Value)> = match value {
            Value::Mapping(inner) if SECTIONS.contains(&key) => inner
                .iter()
                .map(|(k, v)| {
                    k.as_str()
                        .map(|k| (k.to_string(), format!("{key}.{k}"), v))
                        .ok_or_else(|| format!("a key in `{key}` is not text"))
                })
                .collect::<Result<_, _>>()?,
            _ => vec![(key.to_string(), key.to_string(), value)],
        };
        for (name, key, value) in entries {
            if let Some(previous) = flat.get(&name) {
                return Err(format!(
                    "`{}` and `{key}` both set {name}; keep one",
                    previous.key
                ));
            }
            flat.insert(name, Entry { key, value });
        }
    }

    // Every problem of the file is collected and named at once, each with
    // its line, so one reading tells a person everything to change.
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut reader = Reader::default();
    for (name, entry) in &flat {
        let at = line_of(text, name)
            .map(|line| format!("line {line}: "))
            .unwrap_or_default();
        match reader.take(name, entry) {
            Ok(true) => {}
            Ok(false) => match compat::support(name) {
                Some(Support::Ignored(why)) => warnings.push(format!(
                    "{at}borgmatic option `{}` has no effect under ferry-borg: {why}",
                    entry.key
                )),
                Some(Support::Refused(why)) => problems.push(format!("{at}`{}`: {why}", entry.key)),
                Some(Support::Honoured | Support::Differs(_)) => problems.push(format!(
                    "{at}`{}` cannot be read by ferry-borg here",
                    entry.key
                )),
                None => problems.push(format!(
                    "{at}`{}` is not an option of borgmatic {}: check its spelling",
                    entry.key,
                    compat::BORGMATIC_VERSION
                )),
            },
            Err(e) => problems.push(format!("{at}{e}")),
        }
    }
    if !problems.is_empty() {
        return Err(format!(
            "{} problem{} (docs/borgmatic-compatibility.md says what ferry-borg does with each option): {}",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            problems.join("; ")
        ));
    }
    reader.into_plan(choice, *lock_wait, warnings, tilde)
}

/// The line (from 1) where `option` is first set in `text`: a line that
/// starts, after indentation, with `option:`.
fn line_of(text: &str, option: &str) -> Option<usize> {
    let key = format!("{option}:");
    text.lines()
        .position(|line| line.trim_start().starts_with(&key))
        .map(|index| index + 1)
}

#[derive(Default)]
struct Reader {
    sources: Vec<String>,
    repositories: Vec<(String, Option<String>)>,
    passphrase: Option<Secret>,
    passcommand: Option<String>,
    ssh_command: Option<String>,
    create: CreateOptions,
    archive_name_format: Option<String>,
    prefix: Option<String>,
    lock_wait: Option<u32>,
    retention: ferry_retention::Keep,
    checks: Option<Vec<(String, Due)>>,
    check_last: Option<u32>,
    hooks: HookPlan,
}

/// borg's keep options, in the order borgmatic passes them.
mod ferry_retention {
    /// keep_within and the keep_* counts.
    #[derive(Default)]
    pub struct Keep {
        pub within: Option<String>,
        pub counts: Vec<(&'static str, u32)>,
    }

    pub const COUNTS: [&str; 7] = [
        "secondly", "minutely", "hourly", "daily", "weekly", "monthly", "yearly",
    ];

    impl Keep {
        pub fn arguments(&self) -> Vec<String> {
            let mut args: Vec<String> = self
                .within
                .iter()
                .map(|w| format!("--keep-within={w}"))
                .collect();
            for what in COUNTS {
                if let Some((_, n)) = self.counts.iter().find(|(w, _)| *w == what) {
                    args.push(format!("--keep-{what}={n}"));
                }
            }
            args
        }
    }
}

impl Reader {
    /// Takes one option; `Ok(false)` when it is not one ferry supports.
    fn take(&mut self, name: &str, entry: &Entry) -> Result<bool, String> {
        match name {
            "source_directories" => self.sources = entry.strings()?,
            "repositories" => self.repositories = repositories(entry)?,
            "encryption_passphrase" => {
                let text = entry.string()?;
                if text.contains("${") || text.trim_start().starts_with("{credential") {
                    return Err(format!(
                        "`{}` uses borgmatic's interpolation, which ferry-borg does not do: put the passphrase in a file and use encryption_passcommand: cat /path/to/file",
                        entry.key
                    ));
                }
                self.passphrase = Some(Secret::new(text));
            }
            "encryption_passcommand" => self.passcommand = Some(entry.string()?),
            // ferry-borg always requires the source roots to exist.
            "source_directories_must_exist" => {
                entry.boolean()?;
            }
            "ssh_command" => self.ssh_command = Some(entry.string()?),
            "exclude_patterns" => self.create.exclude_patterns = entry.strings()?,
            "exclude_if_present" => self.create.exclude_if_present = entry.strings()?,
            "exclude_caches" => self.create.exclude_caches = entry.boolean()?,
            "one_file_system" => self.create.one_file_system = entry.boolean()?,
            "compression" => {
                let c = entry.string()?;
                Profile::check_compression(&c).map_err(|e| format!("`{}`: {e}", entry.key))?;
                self.create.compression = Some(c);
            }
            "archive_name_format" => {
                let f = entry.string()?;
                Profile::check_archive_name_format(&f)
                    .map_err(|e| format!("`{}`: {e}", entry.key))?;
                self.archive_name_format = Some(f);
            }
            "prefix" => self.prefix = Some(entry.string()?),
            "lock_wait" => self.lock_wait = Some(entry.count()?),
            "keep_within" => {
                let w = entry.string()?;
                Profile::check_keep_within(&w).map_err(|e| format!("`{}`: {e}", entry.key))?;
                self.retention.within = Some(w);
            }
            "check_last" => self.check_last = Some(entry.count()?),
            "checks" => self.checks = Some(checks(entry)?),
            "before_backup" => self.hooks.before = entry.strings()?,
            "after_backup" => self.hooks.after = entry.strings()?,
            "on_error" => self.hooks.on_error = entry.strings()?,
            other => match other
                .strip_prefix("keep_")
                .and_then(|w| ferry_retention::COUNTS.iter().find(|c| **c == w))
            {
                Some(what) => self.retention.counts.push((what, entry.count()?)),
                None => return Ok(false),
            },
        }
        Ok(true)
    }

    fn into_plan(
        self,
        choice: Option<&str>,
        default_lock_wait: std::time::Duration,
        mut warnings: Vec<String>,
        tilde: &Tilde,
    ) -> Result<Plan, String> {
        if self.sources.is_empty() {
            return Err("`source_directories` lists nothing to back up".into());
        }
        let sources = self
            .sources
            .iter()
            .map(|s| {
                if s.contains(['*', '?', '[']) {
                    return Err(format!(
                        "source `{s}` is a glob; ferry-borg does not expand globs: list the directories"
                    ));
                }
                let path = tilde.expand(s)?;
                if !path.starts_with('/') {
                    return Err(format!("source `{s}` is relative: write it from / or ~"));
                }
                Ok(path)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (repository, label) = match (self.repositories.as_slice(), choice) {
            ([], _) => return Err("`repositories` lists no repository".into()),
            ([only], None) => only.clone(),
            (all, Some(choice)) => all
                .iter()
                .find(|(path, label)| path == choice || label.as_deref() == Some(choice))
                .cloned()
                .ok_or_else(|| {
                    format!(
                        "borgmatic-repository `{choice}` is none of the file's repositories ({})",
                        describe(all)
                    )
                })?,
            (all, None) => {
                return Err(format!(
                    "the file lists {} repositories ({}); ferry runs one repository per profile: set borgmatic-repository = \"<label or path>\" in the profile (one profile per repository)",
                    all.len(),
                    describe(all)
                ))
            }
        };
        let repository = tilde.expand(&repository)?;
        if is_local(&repository) && !repository.starts_with('/') {
            return Err(format!(
                "repository `{repository}` is relative: write it from / or ~"
            ));
        }
        if let Some(label) = label {
            tracing::debug!("borgmatic repository `{label}`: {repository}");
        }
        let passphrase = match (self.passphrase, self.passcommand) {
            (Some(_), Some(_)) => {
                return Err(
                    "both encryption_passphrase and encryption_passcommand are set; keep one"
                        .into(),
                )
            }
            (Some(secret), None) => Passphrase::Inline(secret),
            (None, Some(command)) => Passphrase::Command(command),
            (None, None) => Passphrase::None,
        };
        let archive_name_format = self
            .archive_name_format
            .unwrap_or_else(|| DEFAULT_ARCHIVE_NAME_FORMAT.into());
        let prune_glob = match &self.prefix {
            Some(prefix) => format!("{prefix}*"),
            None => prune_glob(&archive_name_format),
        };
        let checks = match self.checks {
            None => {
                let every = Due::Every(std::time::Duration::from_secs(DEFAULT_CHECK_FREQUENCY));
                CheckPlan {
                    repository: Some(every),
                    archives: Some(every),
                    ..CheckPlan::default()
                }
            }
            Some(list) => {
                let mut plan = CheckPlan::default();
                let mut disabled = false;
                for (name, due) in list {
                    match name.as_str() {
                        "repository" => plan.repository = Some(due),
                        "archives" => plan.archives = Some(due),
                        "data" => plan.data = Some(due),
                        "disabled" => disabled = true,
                        other => {
                            return Err(format!(
                                "check `{other}` is not supported by ferry-borg (it runs repository, archives and data checks); remove it"
                            ))
                        }
                    }
                }
                plan.last = self.check_last;
                if disabled {
                    CheckPlan::default()
                } else {
                    plan
                }
            }
        };
        if self.retention.within.is_none() && self.retention.counts.is_empty() {
            warnings.push("the file keeps no retention (keep_*): nothing is pruned".into());
        }
        Ok(Plan {
            repository,
            passphrase,
            rsh: self.ssh_command,
            remote_path: None,
            ssh: Default::default(),
            sources,
            create_options: self.create.arguments(),
            archive_name_format,
            prune_glob,
            retention: self.retention.arguments(),
            compact: true,
            checks,
            hooks: self.hooks,
            lock_wait: self
                .lock_wait
                .map(|s| std::time::Duration::from_secs(s.into()))
                .unwrap_or(default_lock_wait),
            warnings,
        })
    }
}

fn describe(all: &[(String, Option<String>)]) -> String {
    all.iter()
        .map(|(path, label)| match label {
            Some(label) => format!("{label}: {path}"),
            None => path.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `repositories:` as strings or `{path:, label:}` maps.
fn repositories(entry: &Entry) -> Result<Vec<(String, Option<String>)>, String> {
    let Value::Sequence(items) = entry.value else {
        return Err(format!("`{}` must be a list", entry.key));
    };
    items
        .iter()
        .map(|item| match item {
            Value::String(path) => Ok((path.clone(), None)),
            Value::Mapping(map) => {
                let text = |k: &str| map.get(k).and_then(Value::as_str).map(str::to_string);
                let extra: Vec<String> = map
                    .keys()
                    .filter_map(Value::as_str)
                    .filter(|k| !["path", "label"].contains(k))
                    .map(|k| format!("`{k}`"))
                    .collect();
                if !extra.is_empty() {
                    return Err(format!(
                        "`{}`: ferry-borg does not support the repository option{} {}",
                        entry.key,
                        if extra.len() == 1 { "" } else { "s" },
                        extra.join(", ")
                    ));
                }
                let path = text("path")
                    .ok_or_else(|| format!("`{}`: a repository without a path", entry.key))?;
                Ok((path, text("label")))
            }
            _ => Err(format!(
                "`{}` must list paths or {{path:, label:}} maps",
                entry.key
            )),
        })
        .collect()
}

/// `checks:` as names (old form) or `{name:, frequency:}` maps.
fn checks(entry: &Entry) -> Result<Vec<(String, Due)>, String> {
    let Value::Sequence(items) = entry.value else {
        return Err(format!("`{}` must be a list", entry.key));
    };
    items
        .iter()
        .map(|item| match item {
            Value::String(name) => Ok((name.clone(), Due::Always)),
            Value::Mapping(map) => {
                let name = map
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("`{}`: a check without a name", entry.key))?;
                let extra: Vec<&str> = map
                    .keys()
                    .filter_map(Value::as_str)
                    .filter(|k| !["name", "frequency"].contains(k))
                    .collect();
                if !extra.is_empty() {
                    return Err(format!(
                        "`{}`: ferry-borg does not support the check option(s) {}",
                        entry.key,
                        extra.join(", ")
                    ));
                }
                let due = match map.get("frequency").and_then(Value::as_str) {
                    None => Due::Always,
                    Some(text) => Due::from_interval(
                        Profile::parse_frequency(text)
                            .map_err(|e| format!("`{}` {name}: {e}", entry.key))?,
                    ),
                };
                Ok((name.to_string(), due))
            }
            _ => Err(format!("`{}` must list checks", entry.key)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(60);

    fn home() -> Tilde {
        Tilde::home("/home/david")
    }

    /// Seed 000's file as it was written (an ssh repository, `~` sources).
    const SEED: &str = include_str!("../tests/fixtures/seed-000-borgmatic.yaml");

    #[test]
    fn seed_000_reads_completely() {
        let plan = parse(SEED, None, &WAIT, &home()).expect("seed 000 parses");
        assert_eq!(plan.repository, "david@myserver:backup_dir");
        assert!(!plan.is_local());
        assert_eq!(plan.sources.len(), 4);
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
        assert_eq!(plan.hooks.before, ["echo \"Starting a backup.\""]);
        assert_eq!(plan.hooks.after.len(), 1);
        assert_eq!(plan.hooks.on_error.len(), 1);
        assert_eq!(plan.archive_name_format, DEFAULT_ARCHIVE_NAME_FORMAT);
        assert_eq!(plan.prune_glob, "{hostname}-*");
        let two_weeks = Some(Due::Every(Duration::from_secs(14 * 86_400)));
        assert_eq!(
            plan.checks.repository, two_weeks,
            "borgmatic's default checks"
        );
        assert_eq!(plan.checks.archives, two_weeks);
        assert_eq!(plan.lock_wait, WAIT);
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
        assert!(!format!("{plan:?}").contains("my-secure-passphrase"));
    }

    #[test]
    fn the_flat_form_reads_too() {
        let text = r#"
source_directories: [/home, /etc]
repositories:
    - path: /srv/borg/local
      label: local
    - path: ssh://user@host/./repo
      label: remote
encryption_passcommand: cat /etc/borg.pass
exclude_patterns: ["*.pyc", /home/*/.cache]
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
        let plan = parse(text, Some("local"), &WAIT, &home()).expect("flat form");
        assert_eq!(plan.repository, "/srv/borg/local");
        assert_eq!(
            plan.passphrase,
            Passphrase::Command("cat /etc/borg.pass".into())
        );
        assert_eq!(
            plan.create_options,
            [
                "--compression=zstd,3",
                "--exclude=*.pyc",
                "--exclude=/home/*/.cache",
                "--exclude-if-present=.nobackup",
                "--exclude-caches"
            ]
        );
        assert_eq!(plan.prune_glob, "home-*");
        assert_eq!(plan.lock_wait, Duration::from_secs(30));
        assert_eq!(plan.checks.data, Some(Due::Always));
        assert_eq!(plan.checks.archives, None);
        assert_eq!(plan.checks.last, Some(3));
        assert_eq!(plan.warnings.len(), 1);
        assert!(plan.warnings[0].contains("`verbosity`"));

        let by_path = parse(text, Some("ssh://user@host/./repo"), &WAIT, &home()).expect("by path");
        assert_eq!(by_path.repository, "ssh://user@host/./repo");
        let err = parse(text, None, &WAIT, &home()).unwrap_err();
        assert!(
            err.contains("2 repositories") && err.contains("borgmatic-repository"),
            "{err}"
        );
        let err = parse(text, Some("elsewhere"), &WAIT, &home()).unwrap_err();
        assert!(err.contains("local: /srv/borg/local"), "{err}");
    }

    #[test]
    fn unsupported_options_are_named_never_dropped() {
        let text = "location:\n  source_directories: [/home]\n  repositories: [/srv/r]\n  remote_path: borg1\nstorage:\n  umask: 0077\npostgresql_databases:\n  - name: all\n";
        let err = parse(text, None, &WAIT, &home()).unwrap_err();
        for key in [
            "`location.remote_path`",
            "`storage.umask`",
            "`postgresql_databases`",
        ] {
            assert!(err.contains(key), "{key} in {err}");
        }
        let err = parse(
            "source_directories: [/home]\nrepositories: [/r]\nchecks: [{name: extract}]\n",
            None,
            &WAIT,
            &home(),
        )
        .unwrap_err();
        assert!(err.contains("check `extract`"), "{err}");
        let err = parse(
            "source_directories: [/h/*]\nrepositories: [/r]\n",
            None,
            &WAIT,
            &home(),
        )
        .unwrap_err();
        assert!(err.contains("glob"), "{err}");
        let err = parse(
            "source_directories: [/h]\nrepositories: [/r]\nencryption_passphrase: ${PASS}\n",
            None,
            &WAIT,
            &home(),
        )
        .unwrap_err();
        assert!(
            err.contains("interpolation") && !err.contains("PASS}"),
            "{err}"
        );
        let err = parse(
            "location:\n  source_directories: [/a]\nsource_directories: [/b]\n",
            None,
            &WAIT,
            &home(),
        )
        .unwrap_err();
        assert!(err.contains("both set"), "{err}");
        assert!(parse("- a\n", None, &WAIT, &home()).is_err());
        assert!(parse(
            "source_directories: [/h]\nrepositories: [/r]\nkeep_daily: many\n",
            None,
            &WAIT,
            &home()
        )
        .unwrap_err()
        .contains("`keep_daily` must be a whole number"));
    }
}
