//! Reading an existing borgmatic configuration file into [`Plan`]s, one
//! per repository, so a borgmatic user points ferry at the file they
//! already have and ferry runs what `borgmatic` (create, prune, compact,
//! check) would run.
//!
//! Both forms are read: the old one with `location:`, `storage:`,
//! `retention:`, `consistency:` and `hooks:` sections (seed 000's file) and
//! the current flat one. Every option is either carried over or named, as
//! [`compat`] says: an option that would change what is backed up, where,
//! or how and that ferry cannot do is refused — all of them at once, each
//! with its line, when the file is read (at service start, by `ferryctl
//! check-config`, and before each run), never first at 2 a.m.; an option
//! that only shapes borgmatic's own output is a warning.
//!
//! What is read is turned into borg arguments the way borgmatic 2.1 does
//! it (its source is the reference; tests/borgmatic_measure.rs compares the
//! command lines with `borgmatic --dry-run`): sources, `patterns`,
//! `patterns_from`, `exclude_patterns` and `exclude_from` become one list of
//! borg patterns, roots expanded with [`crate::glob`]; the 1.x
//! `before_*`/`after_*`/`on_error` hooks become 2.x `commands:`. The
//! passphrase written in the file is kept as a [`Secret`] and reaches borg
//! only through its passphrase pipe. `~` means the home of the file's owner
//! ([`Tilde`]), never ferry-borg's own HOME.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_config::{Config, Name, Profile};
use serde_yaml_ng::Value;

use crate::compat::{self, Support};
use crate::plan::{
    Action, CheckPlan, CommandHook, CreateOptions, Due, ExtraOptions, HookPlan, Outcome,
    Passphrase, Plan, Retries, Scope, Secret, DEFAULT_ARCHIVE_NAME_FORMAT,
};
use crate::tilde::{Tilde, TildeError};

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

/// The 1.x hook options, in the order borgmatic turns them into
/// `commands:` (its `normalize_commands`), with what they become.
const LEGACY_HOOKS: [(&str, bool, Scope, Option<&str>); 15] = [
    ("before_actions", true, Scope::Repository, None),
    ("after_actions", false, Scope::Repository, None),
    ("before_backup", true, Scope::Action, Some("create")),
    ("after_backup", false, Scope::Action, Some("create")),
    ("before_prune", true, Scope::Action, Some("prune")),
    ("after_prune", false, Scope::Action, Some("prune")),
    ("before_compact", true, Scope::Action, Some("compact")),
    ("after_compact", false, Scope::Action, Some("compact")),
    ("before_check", true, Scope::Action, Some("check")),
    ("after_check", false, Scope::Action, Some("check")),
    ("before_extract", true, Scope::Action, Some("extract")),
    ("after_extract", false, Scope::Action, Some("extract")),
    ("on_error", false, Scope::Error, None),
    ("before_everything", true, Scope::Everything, Some("create")),
    ("after_everything", false, Scope::Everything, Some("create")),
];

/// Options of a repository entry that only `borgmatic repo-create` reads.
const REPO_CREATE_OPTIONS: [&str; 4] = [
    "encryption",
    "append_only",
    "storage_quota",
    "make_parent_directories",
];

/// Why a borgmatic file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The profile has no file.
    #[error("profile `{0}` has no borgmatic-config")]
    NoFile(String),
    /// The file cannot be read.
    #[error("cannot read the borgmatic file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Something in the file, which is named.
    #[error("{path}: {error}")]
    In {
        /// The file.
        path: PathBuf,
        /// What.
        error: Box<Error>,
    },
    /// Not YAML.
    #[error("not valid YAML: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    /// Options ferry-borg refuses or cannot read, each `line N: ...`.
    #[error(
        "{} problem{} (docs/borgmatic-compatibility.md says what ferry-borg does with each option): {}",
        .0.len(),
        if .0.len() == 1 { "" } else { "s" },
        .0.join("; ")
    )]
    Problems(Vec<String>),
    /// The options are readable but do not make a plan.
    #[error("{0}")]
    Plan(String),
    /// An option's value is wrong.
    #[error(transparent)]
    Option(#[from] OptionError),
    /// A `~` cannot be expanded.
    #[error(transparent)]
    Tilde(#[from] TildeError),
}

/// What is wrong with one option's value, naming the option (and what to
/// write instead); `line N:` is put before it when it is reported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// The value has the wrong shape (`must` says which).
    #[error("`{key}` must {must}")]
    Shape {
        /// The option.
        key: String,
        /// What it must be, e.g. `be true or false`.
        must: &'static str,
    },
    /// The value has the right shape but cannot be used.
    #[error("`{key}`: {why}")]
    Invalid {
        /// The option (with the sub-key, e.g. `extra_borg_options.create`).
        key: String,
        /// Why, and what to do.
        why: String,
    },
    /// A passphrase written with borgmatic's interpolation.
    #[error("`{key}` uses borgmatic's interpolation, which ferry-borg does not do: put the passphrase in a file and use encryption_passcommand: cat /path/to/file")]
    Interpolation {
        /// The option.
        key: String,
    },
    /// A check's frequency cannot be read.
    #[error("`{key}` {check}: {why}")]
    Frequency {
        /// The option.
        key: String,
        /// The check it belongs to.
        check: String,
        /// Why.
        why: String,
    },
    /// A pattern line that is not `TYPE [STYLE:]PATH`.
    #[error("`{line}` is not a borg pattern (TYPE [STYLE:]PATH)")]
    NotAPattern {
        /// The line.
        line: String,
    },
    /// A pattern line of an unknown type.
    #[error("`{line}`: borg patterns start with R, P, -, ! or +")]
    PatternType {
        /// The line.
        line: String,
    },
}

impl OptionError {
    fn shape(entry: &Entry, must: &'static str) -> OptionError {
        OptionError::Shape {
            key: entry.key.clone(),
            must,
        }
    }

    fn invalid(key: &str, why: impl std::fmt::Display) -> OptionError {
        OptionError::Invalid {
            key: key.to_string(),
            why: why.to_string(),
        }
    }
}

/// Reads the borgmatic file of profile `name` and makes its plans, one per
/// repository the run backs up, in the file's order.
pub fn load(config: &Config, name: &Name, profile: &Profile) -> Result<Vec<Plan>, Error> {
    let path = profile
        .borgmatic_config
        .as_ref()
        .ok_or_else(|| Error::NoFile(name.to_string()))?;
    let path: &Path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let source = Source {
        file: path.to_string_lossy().into_owned(),
        choice: profile.borgmatic_repository.as_deref(),
        lock_wait: config.borg.lock_wait.duration(),
        tilde: Tilde::of_owner(path),
    };
    let mut plans = parse_source(&text, &source).map_err(|error| Error::In {
        path: path.to_path_buf(),
        error: Box::new(error),
    })?;
    for plan in &mut plans {
        if let Some(wait) = profile.lock_wait {
            plan.lock_wait = wait.duration();
        }
        if let Some(compact) = profile.compact {
            plan.compact = compact;
        }
    }
    Ok(plans)
}

/// Where a file's text came from and how to read it.
pub struct Source<'a> {
    /// The file's path (for `{configuration_filename}` in hooks).
    pub file: String,
    /// ferry.toml's borgmatic-repository: back up only this one (label or path).
    pub choice: Option<&'a str>,
    /// `--lock-wait` when the file sets none.
    pub lock_wait: Duration,
    /// How `~` expands.
    pub tilde: Tilde,
}

/// Parses borgmatic YAML into the plan of its first (or chosen)
/// repository. `lock_wait` is the default when the file sets none; `tilde`
/// expands `~`.
pub fn parse(
    text: &str,
    choice: Option<&str>,
    lock_wait: &Duration,
    tilde: &Tilde,
) -> Result<Plan, Error> {
    let source = Source {
        file: String::new(),
        choice,
        lock_wait: *lock_wait,
        tilde: tilde.clone(),
    };
    let mut plans = parse_source(text, &source)?;
    Ok(plans.remove(0))
}

/// Parses borgmatic YAML into one plan per repository backed up.
pub fn parse_source(text: &str, source: &Source) -> Result<Vec<Plan>, Error> {
    let root: Value = serde_yaml_ng::from_str(text)?;
    let Value::Mapping(top) = root else {
        return Err(Error::Plan(
            "the file is not a borgmatic configuration (no keys at the top)".into(),
        ));
    };
    let flat = flatten(&top)?;
    // Every problem of the file is collected and named at once, each with
    // its line, so one reading tells a person everything to change.
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut reader = Reader::default();
    for (name, entry) in &flat {
        let at = line_of(text, name)
            .map(|line| format!("line {line}: "))
            .unwrap_or_default();
        match reader.take(name, entry, &mut warnings) {
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
        return Err(Error::Problems(problems));
    }
    reader.into_plans(source, warnings)
}

/// The old sections flattened into one map of option → entry.
fn flatten(top: &serde_yaml_ng::Mapping) -> Result<BTreeMap<String, Entry<'_>>, Error> {
    let mut flat: BTreeMap<String, Entry> = BTreeMap::new();
    for (key, value) in top {
        let key = key
            .as_str()
            .ok_or_else(|| Error::Plan("a top-level key is not text".into()))?;
        let entries: Vec<(String, String, &Value)> = match value {
            Value::Mapping(inner) if SECTIONS.contains(&key) => inner
                .iter()
                .map(|(k, v)| {
                    k.as_str()
                        .map(|k| (k.to_string(), format!("{key}.{k}"), v))
                        .ok_or_else(|| Error::Plan(format!("a key in `{key}` is not text")))
                })
                .collect::<Result<_, _>>()?,
            _ => vec![(key.to_string(), key.to_string(), value)],
        };
        for (name, key, value) in entries {
            if let Some(previous) = flat.get(&name) {
                return Err(Error::Plan(format!(
                    "`{}` and `{key}` both set {name}; keep one",
                    previous.key
                )));
            }
            flat.insert(name, Entry { key, value });
        }
    }
    Ok(flat)
}

/// The line (from 1) where `option` is first set in `text`: a line that
/// starts, after indentation, with `option:`.
fn line_of(text: &str, option: &str) -> Option<usize> {
    let key = format!("{option}:");
    text.lines()
        .position(|line| line.trim_start().starts_with(&key))
        .map(|index| index + 1)
}

/// A value with where it was found (`location.source_directories`).
struct Entry<'a> {
    key: String,
    value: &'a Value,
}

impl Entry<'_> {
    fn at<'v>(&self, value: &'v Value) -> Entry<'v> {
        Entry {
            key: self.key.clone(),
            value,
        }
    }

    fn string(&self) -> Result<String, OptionError> {
        match self.value {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            _ => Err(OptionError::shape(self, "be text")),
        }
    }

    fn strings(&self) -> Result<Vec<String>, OptionError> {
        match self.value {
            Value::Sequence(items) => items.iter().map(|v| self.at(v).string()).collect(),
            Value::String(s) => Ok(vec![s.clone()]),
            Value::Null => Ok(Vec::new()),
            _ => Err(OptionError::shape(self, "be a list of text")),
        }
    }

    fn boolean(&self) -> Result<bool, OptionError> {
        self.value
            .as_bool()
            .ok_or_else(|| OptionError::shape(self, "be true or false"))
    }

    fn count(&self) -> Result<u32, OptionError> {
        self.value
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| OptionError::shape(self, "be a whole number"))
    }
}

/// The options read, before they become plans.
#[derive(Default)]
struct Reader {
    sources: Vec<String>,
    patterns: Vec<String>,
    patterns_from: Vec<String>,
    exclude_from: Vec<String>,
    exclude_patterns: Vec<String>,
    must_exist: Option<bool>,
    repositories: Vec<(String, Option<String>)>,
    passphrase: Option<Secret>,
    passcommand: Option<String>,
    ssh_command: Option<String>,
    remote_path: Option<String>,
    umask: Option<String>,
    extra: ExtraOptions,
    retries: Retries,
    create: CreateOptions,
    archive_name_format: Option<String>,
    prefix: Option<String>,
    lock_wait: Option<u32>,
    retention: ferry_retention::Keep,
    checks: Option<Vec<(String, Due)>>,
    check_last: Option<u32>,
    commands: Vec<CommandHook>,
    legacy_hooks: BTreeMap<&'static str, Vec<String>>,
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
    fn take(
        &mut self,
        name: &str,
        entry: &Entry,
        warnings: &mut Vec<String>,
    ) -> Result<bool, OptionError> {
        if self.take_source(name, entry)? || self.take_borg(name, entry, warnings)? {
            return Ok(true);
        }
        if let Some((option, ..)) = LEGACY_HOOKS.iter().find(|(n, ..)| *n == name) {
            self.legacy_hooks.insert(option, entry.strings()?);
            return Ok(true);
        }
        match name {
            "commands" => self.commands = commands(entry)?,
            "retries" => self.retries.count = entry.count()?,
            "retry_wait" => self.retries.wait = Duration::from_secs(entry.count()?.into()),
            "keep_within" => {
                let w = entry.string()?;
                Profile::check_keep_within(&w).map_err(|e| OptionError::invalid(&entry.key, e))?;
                self.retention.within = Some(w);
            }
            "check_last" => self.check_last = Some(entry.count()?),
            "checks" => self.checks = Some(checks(entry)?),
            "prefix" => self.prefix = Some(entry.string()?),
            "archive_name_format" => {
                let f = entry.string()?;
                Profile::check_archive_name_format(&f)
                    .map_err(|e| OptionError::invalid(&entry.key, e))?;
                self.archive_name_format = Some(f);
            }
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

    /// What is backed up.
    fn take_source(&mut self, name: &str, entry: &Entry) -> Result<bool, OptionError> {
        match name {
            "source_directories" => self.sources = entry.strings()?,
            "patterns" => self.patterns = entry.strings()?,
            "patterns_from" => self.patterns_from = entry.strings()?,
            "exclude_from" => self.exclude_from = entry.strings()?,
            "exclude_patterns" => self.exclude_patterns = entry.strings()?,
            "source_directories_must_exist" => self.must_exist = Some(entry.boolean()?),
            "exclude_if_present" => self.create.exclude_if_present = entry.strings()?,
            "exclude_caches" => self.create.exclude_caches = entry.boolean()?,
            "one_file_system" => self.create.one_file_system = entry.boolean()?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Where to, and how borg is run.
    fn take_borg(
        &mut self,
        name: &str,
        entry: &Entry,
        warnings: &mut Vec<String>,
    ) -> Result<bool, OptionError> {
        match name {
            "repositories" => self.repositories = repositories(entry, warnings)?,
            "encryption_passphrase" => {
                let text = entry.string()?;
                if text.contains("${") || text.trim_start().starts_with("{credential") {
                    return Err(OptionError::Interpolation {
                        key: entry.key.clone(),
                    });
                }
                self.passphrase = Some(Secret::new(text));
            }
            "encryption_passcommand" => self.passcommand = Some(entry.string()?),
            "ssh_command" => self.ssh_command = Some(entry.string()?),
            "remote_path" => self.remote_path = Some(entry.string()?),
            "umask" => {
                let umask = entry.string()?;
                if umask.is_empty() || !umask.chars().all(|c| ('0'..='7').contains(&c)) {
                    return Err(OptionError::shape(entry, "be an octal umask such as 0077"));
                }
                // borgmatic reads an unquoted 0077 as the number 77 and
                // passes that; borg reads either as octal.
                let trimmed = umask.trim_start_matches('0');
                self.umask = Some(if trimmed.is_empty() { "0" } else { trimmed }.to_string());
            }
            "extra_borg_options" => self.extra = extra_options(entry)?,
            "compression" => {
                let c = entry.string()?;
                Profile::check_compression(&c).map_err(|e| OptionError::invalid(&entry.key, e))?;
                self.create.compression = Some(c);
            }
            "lock_wait" => self.lock_wait = Some(entry.count()?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn into_plans(self, source: &Source, mut warnings: Vec<String>) -> Result<Vec<Plan>, Error> {
        let tilde = &source.tilde;
        let patterns = self.pattern_lines(tilde)?;
        let roots: Vec<String> = patterns
            .iter()
            .filter_map(|line| line.strip_prefix("R "))
            .map(str::to_string)
            .collect();
        if roots.is_empty() {
            return Err(Error::Plan(
                "`source_directories` (or an `R` pattern) lists nothing to back up".into(),
            ));
        }
        if let Some(relative) = roots.iter().find(|r| !r.starts_with('/')) {
            return Err(Error::Plan(format!(
                "source `{relative}` is relative: write it from / or ~"
            )));
        }
        let passphrase = match (self.passphrase.clone(), self.passcommand.clone()) {
            (Some(_), Some(_)) => {
                return Err(Error::Plan(
                    "both encryption_passphrase and encryption_passcommand are set; keep one"
                        .into(),
                ))
            }
            (Some(secret), None) => Passphrase::Inline(secret),
            (None, Some(command)) => Passphrase::Command(command),
            (None, None) => Passphrase::None,
        };
        let archive_name_format = self
            .archive_name_format
            .clone()
            .unwrap_or_else(|| DEFAULT_ARCHIVE_NAME_FORMAT.into());
        let glob = match &self.prefix {
            Some(prefix) => Some(format!("{prefix}*")),
            None => match_glob(&archive_name_format),
        };
        if self.retention.within.is_none() && self.retention.counts.is_empty() {
            warnings.push("the file keeps no retention (keep_*): nothing is pruned".into());
        }
        let template = Plan {
            repository: String::new(),
            passphrase,
            rsh: self.ssh_command.clone(),
            ssh: Default::default(),
            sources: roots,
            create_options: self.create_options(),
            archive_name_format,
            prune_glob: glob.clone().unwrap_or_default(),
            retention: self.retention.arguments(),
            compact: true,
            checks: self.check_plan()?,
            hooks: HookPlan {
                commands: self.hooks(),
                borgmatic_file: Some(source.file.clone()),
            },
            lock_wait: self
                .lock_wait
                .map(|s| Duration::from_secs(s.into()))
                .unwrap_or(source.lock_wait),
            warnings,
            label: None,
            patterns,
            sources_must_exist: self.must_exist.unwrap_or(true),
            remote_path: self.remote_path.clone(),
            umask: self.umask.clone(),
            extra: self.extra.clone(),
            check_glob: glob,
            retries: self.retries,
        };
        self.repositories_of(template, source)
    }

    /// One plan per repository backed up.
    fn repositories_of(&self, template: Plan, source: &Source) -> Result<Vec<Plan>, Error> {
        let chosen: Vec<&(String, Option<String>)> = match source.choice {
            None => self.repositories.iter().collect(),
            Some(choice) => {
                let found: Vec<_> = self
                    .repositories
                    .iter()
                    .filter(|(path, label)| path == choice || label.as_deref() == Some(choice))
                    .collect();
                if found.is_empty() {
                    return Err(Error::Plan(format!(
                        "borgmatic-repository `{choice}` is none of the file's repositories ({})",
                        describe(&self.repositories)
                    )));
                }
                found
            }
        };
        if chosen.is_empty() {
            return Err(Error::Plan("`repositories` lists no repository".into()));
        }
        chosen
            .into_iter()
            .map(|(path, label)| {
                let repository = source.tilde.expand(path)?;
                if crate::plan::is_local(&repository) && !repository.starts_with('/') {
                    return Err(Error::Plan(format!(
                        "repository `{repository}` is relative: write it from / or ~"
                    )));
                }
                Ok(Plan {
                    repository,
                    label: label.clone(),
                    ..template.clone()
                })
            })
            .collect()
    }

    /// borg create's flags besides the patterns, as borgmatic orders them.
    fn create_options(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.create.exclude_caches {
            args.push("--exclude-caches".to_string());
        }
        args.extend(
            self.create
                .exclude_if_present
                .iter()
                .map(|p| format!("--exclude-if-present={p}")),
        );
        if let Some(compression) = &self.create.compression {
            args.push(format!("--compression={compression}"));
        }
        if self.create.one_file_system {
            args.push("--one-file-system".into());
        }
        args
    }

    /// The borg pattern lines borgmatic writes to its patterns file:
    /// sources, patterns, exclude_patterns, patterns_from, exclude_from,
    /// roots expanded (`~` and globs), `~` expanded in the others.
    fn pattern_lines(&self, tilde: &Tilde) -> Result<Vec<String>, Error> {
        let mut patterns: Vec<Pattern> = self
            .sources
            .iter()
            .map(|path| Pattern::root(path.clone()))
            .collect();
        for line in meaningful(&self.patterns) {
            patterns.push(Pattern::parse(line, None)?);
        }
        for line in &self.exclude_patterns {
            patterns.push(Pattern::parse(&format!("! {}", line.trim()), Some("fm"))?);
        }
        for line in read_lines(&self.patterns_from, "patterns_from", tilde)? {
            patterns.push(Pattern::parse(&line, None)?);
        }
        for line in read_lines(&self.exclude_from, "exclude_from", tilde)? {
            patterns.push(Pattern::parse(&format!("! {line}"), Some("fm"))?);
        }
        let mut lines: Vec<String> = Vec::new();
        for pattern in patterns {
            if pattern.kind == "R" {
                let path = tilde.expand(&pattern.path)?;
                lines.extend(
                    crate::glob::expand(&path)
                        .into_iter()
                        .map(|p| format!("R {p}")),
                );
            } else {
                let path = if pattern.path.starts_with('~') {
                    tilde.expand(&pattern.path)?
                } else {
                    pattern.path.clone()
                };
                lines.push(Pattern { path, ..pattern }.line());
            }
        }
        // borgmatic keeps each pattern once (its first place).
        let mut seen = std::collections::HashSet::new();
        lines.retain(|line| seen.insert(line.clone()));
        Ok(lines)
    }

    /// The checks, borgmatic's default when the file names none.
    fn check_plan(&self) -> Result<CheckPlan, Error> {
        let Some(list) = &self.checks else {
            let every = Due::Every(Duration::from_secs(DEFAULT_CHECK_FREQUENCY));
            return Ok(CheckPlan {
                repository: Some(every),
                archives: Some(every),
                last: self.check_last,
                ..CheckPlan::default()
            });
        };
        let mut plan = CheckPlan::default();
        for (name, due) in list {
            match name.as_str() {
                "repository" => plan.repository = Some(*due),
                "archives" => plan.archives = Some(*due),
                "data" => plan.data = Some(*due),
                "disabled" => return Ok(CheckPlan::default()),
                other => {
                    return Err(Error::Plan(format!(
                        "check `{other}` is not supported by ferry-borg (it runs repository, archives and data checks); remove it"
                    )))
                }
            }
        }
        plan.last = self.check_last;
        Ok(plan)
    }

    /// The file's `commands:`, then its 1.x hooks as borgmatic turns them
    /// into commands.
    fn hooks(&self) -> Vec<CommandHook> {
        let mut hooks = self.commands.clone();
        for (option, before, scope, when) in LEGACY_HOOKS {
            let Some(run) = self.legacy_hooks.get(option).filter(|r| !r.is_empty()) else {
                continue;
            };
            let when = match (scope, when) {
                (Scope::Error, _) => Some(Action::ALL.to_vec()),
                (_, Some(name)) => Some(
                    Action::ALL
                        .into_iter()
                        .filter(|a| a.as_str() == name)
                        .collect(),
                ),
                (_, None) => None,
            };
            hooks.push(CommandHook {
                before,
                scope,
                when,
                states: None,
                run: run.clone(),
            });
        }
        hooks
    }
}

/// A pattern line split as borgmatic's `parse_pattern` splits it.
struct Pattern {
    kind: String,
    style: Option<String>,
    path: String,
}

/// borg's pattern styles.
const STYLES: [&str; 5] = ["fm", "sh", "re", "pp", "pf"];

impl Pattern {
    fn root(path: String) -> Pattern {
        Pattern {
            kind: "R".into(),
            style: None,
            path,
        }
    }

    /// `TYPE [STYLE:]PATH`; `default_style` when the line names none.
    fn parse(line: &str, default_style: Option<&str>) -> Result<Pattern, OptionError> {
        let (kind, rest) = line
            .split_once(' ')
            .ok_or_else(|| OptionError::NotAPattern { line: line.into() })?;
        if !["R", "P", "-", "!", "+"].contains(&kind) {
            return Err(OptionError::PatternType { line: line.into() });
        }
        let (style, path) = match rest.split_once(':') {
            Some((style, path)) if STYLES.contains(&style) => (Some(style.to_string()), path),
            Some(("", path)) => (None, path),
            _ => (default_style.map(str::to_string), rest),
        };
        Ok(Pattern {
            kind: kind.into(),
            style,
            path: path.into(),
        })
    }

    fn line(&self) -> String {
        match &self.style {
            Some(style) => format!("{} {style}:{}", self.kind, self.path),
            None => format!("{} {}", self.kind, self.path),
        }
    }
}

/// Lines that are neither blank nor comments, trimmed.
fn meaningful(lines: &[String]) -> impl Iterator<Item = &str> {
    lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// The meaningful lines of the files listed in `option` (`~` and globs
/// expanded, as borgmatic does).
fn read_lines(files: &[String], option: &str, tilde: &Tilde) -> Result<Vec<String>, Error> {
    let mut lines = Vec::new();
    for file in files {
        let file = tilde.expand(file)?;
        if !file.starts_with('/') {
            return Err(Error::Plan(format!(
                "{option} file `{file}` is relative: write it from / or ~"
            )));
        }
        for path in crate::glob::expand(&file) {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Error::Plan(format!("cannot read the {option} file {path}: {e}")))?;
            let all: Vec<String> = text.lines().map(str::to_string).collect();
            lines.extend(meaningful(&all).map(str::to_string));
        }
    }
    Ok(lines)
}

/// borgmatic's archive glob for an archive name format: `{now}`,
/// `{utcnow}` and `{pid}` (with any format) become `*`; None when that
/// leaves only `*` (all archives).
pub fn match_glob(format: &str) -> Option<String> {
    let mut glob = String::new();
    let mut rest = format;
    while let Some(open) = rest.find('{') {
        glob.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let name_len = after
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let spec_len = after[name_len..]
            .find(|c: char| !(c.is_alphanumeric() || "_:%.-".contains(c)))
            .unwrap_or(after.len() - name_len);
        let close = name_len + spec_len;
        let ephemeral = ["now", "utcnow", "pid"].contains(&&after[..name_len]);
        if ephemeral && after[close..].starts_with('}') {
            glob.push('*');
            rest = &after[close + 1..];
        } else {
            glob.push('{');
            rest = after;
        }
    }
    glob.push_str(rest);
    (glob != "*").then_some(glob)
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
fn repositories(
    entry: &Entry,
    warnings: &mut Vec<String>,
) -> Result<Vec<(String, Option<String>)>, OptionError> {
    let Value::Sequence(items) = entry.value else {
        return Err(OptionError::shape(entry, "be a list"));
    };
    items
        .iter()
        .map(|item| match item {
            Value::String(path) => Ok((path.clone(), None)),
            Value::Mapping(map) => {
                let text = |k: &str| map.get(k).and_then(Value::as_str).map(str::to_string);
                let keys: Vec<&str> = map.keys().filter_map(Value::as_str).collect();
                for key in keys.iter().filter(|k| REPO_CREATE_OPTIONS.contains(k)) {
                    warnings.push(format!(
                        "repository option `{key}` only matters to `borgmatic repo-create`; ferry-borg does not create repositories"
                    ));
                }
                let extra: Vec<String> = keys
                    .iter()
                    .filter(|k| !["path", "label"].contains(k) && !REPO_CREATE_OPTIONS.contains(k))
                    .map(|k| format!("`{k}`"))
                    .collect();
                if !extra.is_empty() {
                    return Err(OptionError::invalid(&entry.key, format!(
                        "ferry-borg does not support the repository option{} {} (set it for the whole file instead)",
                        if extra.len() == 1 { "" } else { "s" },
                        extra.join(", ")
                    )));
                }
                let path = text("path")
                    .ok_or_else(|| OptionError::invalid(&entry.key, "a repository without a path"))?;
                Ok((path, text("label")))
            }
            _ => Err(OptionError::shape(entry, "list paths or {path:, label:} maps")),
        })
        .collect()
}

/// `extra_borg_options:` per action, split as borgmatic splits them
/// (shlex); options for actions ferry-borg never runs are kept out.
fn extra_options(entry: &Entry) -> Result<ExtraOptions, OptionError> {
    let Value::Mapping(map) = entry.value else {
        return Err(OptionError::shape(entry, "map borg commands to options"));
    };
    let mut extra = ExtraOptions::default();
    for (key, value) in map {
        let action = key.as_str().unwrap_or_default();
        let text = entry.at(value).string()?;
        let split = shlex::split(&text).ok_or_else(|| {
            let key = format!("{}.{action}", entry.key);
            OptionError::invalid(&key, format!("unbalanced quotes in `{text}`"))
        })?;
        match action {
            "create" => extra.create = split,
            "prune" => extra.prune = split,
            "compact" => extra.compact = split,
            "check" => extra.check = split,
            _ => {}
        }
    }
    Ok(extra)
}

/// borgmatic 2's `commands:` list.
fn commands(entry: &Entry) -> Result<Vec<CommandHook>, OptionError> {
    let Value::Sequence(items) = entry.value else {
        return Err(OptionError::shape(entry, "be a list"));
    };
    items.iter().map(|item| command(entry, item)).collect()
}

fn command(entry: &Entry, item: &Value) -> Result<CommandHook, OptionError> {
    let key = &entry.key;
    let Value::Mapping(map) = item else {
        return Err(OptionError::shape(
            entry,
            "list {before:|after:, run:} maps",
        ));
    };
    let text = |k: &str| map.get(k).and_then(Value::as_str);
    let (before, moment) = match (text("before"), text("after")) {
        (Some(m), None) => (true, m),
        (None, Some(m)) => (false, m),
        _ => {
            return Err(OptionError::invalid(
                key,
                "each hook needs either before: or after:",
            ))
        }
    };
    let scope = match moment {
        "everything" => Scope::Everything,
        "configuration" => Scope::Configuration,
        "repository" => Scope::Repository,
        "action" => Scope::Action,
        "error" if !before => Scope::Error,
        "dump_data_sources" => {
            return Err(OptionError::invalid(
                key,
                "ferry-borg dumps no data sources, so `dump_data_sources` hooks never run: use `before: action` with `when: [create]`",
            ))
        }
        other => {
            return Err(OptionError::invalid(
                key,
                format!("`{other}` is not a hook moment"),
            ))
        }
    };
    let names = |k: &str| -> Result<Option<Vec<String>>, OptionError> {
        map.get(k).map(|v| entry.at(v).strings()).transpose()
    };
    let when = names("when")?.map(|names| {
        Action::ALL
            .into_iter()
            .filter(|a| names.iter().any(|n| n == a.as_str()))
            .collect()
    });
    let states = names("states")?
        .map(|names| {
            names
                .iter()
                .map(|n| match n.as_str() {
                    "finish" => Ok(Outcome::Finish),
                    "fail" => Ok(Outcome::Fail),
                    other => Err(OptionError::invalid(
                        key,
                        format!("`{other}` is not a state (finish, fail)"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let run = names("run")?.unwrap_or_default();
    Ok(CommandHook {
        before,
        scope,
        when,
        states,
        run,
    })
}

/// `checks:` as names (old form) or `{name:, frequency:}` maps.
fn checks(entry: &Entry) -> Result<Vec<(String, Due)>, OptionError> {
    let Value::Sequence(items) = entry.value else {
        return Err(OptionError::shape(entry, "be a list"));
    };
    items
        .iter()
        .map(|item| match item {
            Value::String(name) => Ok((name.clone(), Due::Always)),
            Value::Mapping(map) => {
                let name = map
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| OptionError::invalid(&entry.key, "a check without a name"))?;
                let extra: Vec<&str> = map
                    .keys()
                    .filter_map(Value::as_str)
                    .filter(|k| !["name", "frequency"].contains(k))
                    .collect();
                if !extra.is_empty() {
                    return Err(OptionError::invalid(
                        &entry.key,
                        format!(
                            "ferry-borg does not support the check option(s) {}",
                            extra.join(", ")
                        ),
                    ));
                }
                let due = match map.get("frequency").and_then(Value::as_str) {
                    None => Due::Always,
                    Some(text) => {
                        Due::from_interval(Profile::parse_frequency(text).map_err(|e| {
                            OptionError::Frequency {
                                key: entry.key.clone(),
                                check: name.to_string(),
                                why: e.to_string(),
                            }
                        })?)
                    }
                };
                Ok((name.to_string(), due))
            }
            _ => Err(OptionError::shape(entry, "list checks")),
        })
        .collect()
}

#[cfg(test)]
#[path = "borgmatic_tests.rs"]
mod tests;
