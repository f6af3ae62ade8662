//! What one run of a profile does, whatever the profile was written in.
//!
//! A profile spelt out in ferry.toml and one that points at a borgmatic file
//! are both turned into a [`Plan`] before anything runs; the job only ever
//! looks at the plan, so both kinds behave the same (same borg arguments,
//! same hooks, same checks, same secrets handling).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_config::{Config, Name, Profile};

/// borgmatic's default archive name, used by ferry too.
pub const DEFAULT_ARCHIVE_NAME_FORMAT: &str = "{hostname}-{now:%Y-%m-%dT%H:%M:%S.%f}";
/// The compression when the profile does not say.
pub const DEFAULT_COMPRESSION: &str = "lz4";

/// A passphrase held in memory: its Debug and Display never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(text: String) -> Secret {
        Secret(text)
    }

    /// The secret itself, for writing into borg's passphrase pipe only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// Where borg gets the repository passphrase from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Passphrase {
    /// No passphrase (a keyfile repository without one, or borg will say).
    None,
    /// Read from this file at each borg run and passed through a pipe.
    File(PathBuf),
    /// Given in a borgmatic file; passed through a pipe.
    Inline(Secret),
    /// BORG_PASSCOMMAND: borg runs it itself.
    Command(String),
}

/// How often a check runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Every run.
    Always,
    /// When this long has passed since it last ran.
    Every(Duration),
}

impl Due {
    /// From ferry-config's `None` = always.
    pub fn from_interval(interval: Option<Duration>) -> Due {
        interval.map_or(Due::Always, Due::Every)
    }

    /// Whether a check last run at `last` (unix seconds) is due at `now`.
    pub fn due(self, last: Option<u64>, now: u64) -> bool {
        match (self, last) {
            (Due::Always, _) | (_, None) => true,
            (Due::Every(every), Some(last)) => now >= last.saturating_add(every.as_secs()),
        }
    }
}

/// The check kinds, as they are recorded in the state file.
pub const CHECK_KINDS: [&str; 3] = ["repository", "archives", "data"];

/// Which borg checks a profile wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckPlan {
    /// `--repository-only`.
    pub repository: Option<Due>,
    /// `--archives-only`.
    pub archives: Option<Due>,
    /// `--verify-data`.
    pub data: Option<Due>,
    /// `--max-duration` for the repository check.
    pub max_duration: Option<Duration>,
    /// `--last N` for the archives and data checks.
    pub last: Option<u32>,
}

impl CheckPlan {
    /// The frequency of a check kind from [`CHECK_KINDS`].
    pub fn of(&self, kind: &str) -> Option<Due> {
        match kind {
            "repository" => self.repository,
            "archives" => self.archives,
            "data" => self.data,
            _ => None,
        }
    }
}

/// When a command hook runs: borgmatic 2's `before:`/`after:` values.
/// ferry.toml's hooks and borgmatic 1's `before_*`/`after_*`/`on_error`
/// are turned into these the way borgmatic normalises them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Once around the whole run (ferry runs one file, so as `configuration`).
    Everything,
    /// Once around all repositories of the file.
    Configuration,
    /// Around each repository's actions.
    Repository,
    /// Around each action (create, prune, compact, check) it is `when:` for.
    Action,
    /// After a failure (only `after:`).
    Error,
}

/// The actions of a run, in the order they run (borgmatic's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// borg create.
    Create,
    /// borg prune.
    Prune,
    /// borg compact.
    Compact,
    /// borg check.
    Check,
}

impl Action {
    /// The action's name, as in borgmatic's `when:` and ferry's stages.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Prune => "prune",
            Action::Compact => "compact",
            Action::Check => "check",
        }
    }

    /// Every action a run does.
    pub const ALL: [Action; 4] = [
        Action::Create,
        Action::Prune,
        Action::Compact,
        Action::Check,
    ];
}

/// One command hook: its commands, run in order with `sh -c`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandHook {
    /// Before (true) or after (false) its scope.
    pub before: bool,
    /// Around what.
    pub scope: Scope,
    /// Only around these actions (None: all); for repository and
    /// configuration scopes, only when the run does one of them.
    pub when: Option<Vec<Action>>,
    /// For after hooks: only on success (`finish`), only on failure
    /// (`fail`), or both (None).
    pub states: Option<Vec<Outcome>>,
    /// The commands.
    pub run: Vec<String>,
}

/// How a scope ended, for `states:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `finish`.
    Finish,
    /// `fail`.
    Fail,
}

impl CommandHook {
    /// Whether this hook runs `before` (or after) `scope` of `action`
    /// (None: the scope is not one action) ending as `outcome`.
    pub fn applies(
        &self,
        before: bool,
        scope: Scope,
        action: Option<Action>,
        outcome: Option<Outcome>,
    ) -> bool {
        let when = match (&self.when, action) {
            (None, _) => true,
            // Around a repository or the file: when the run does one of them.
            (Some(when), None) => !when.is_empty(),
            (Some(when), Some(action)) => when.contains(&action),
        };
        let state = match (&self.states, outcome) {
            (None, _) | (_, None) => true,
            (Some(states), Some(outcome)) => states.contains(&outcome),
        };
        self.before == before && self.scope == scope && when && state
    }
}

/// Commands run around the job with `sh -c`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookPlan {
    /// Every hook, in the file's order.
    pub commands: Vec<CommandHook>,
    /// For a borgmatic file's hooks, the file: `{repository}`,
    /// `{configuration_filename}` and borgmatic's other variables are then
    /// put into the commands as borgmatic does ([`interpolate`]).
    pub borgmatic_file: Option<String>,
}

impl HookPlan {
    /// ferry.toml's three lists: before everything, after success, on error.
    pub fn simple(before: &[String], after: &[String], on_error: &[String]) -> HookPlan {
        let hook = |before, scope, states: Option<Vec<Outcome>>, run: &[String]| CommandHook {
            before,
            scope,
            when: None,
            states,
            run: run.to_vec(),
        };
        HookPlan {
            commands: [
                hook(true, Scope::Configuration, None, before),
                hook(
                    false,
                    Scope::Configuration,
                    Some(vec![Outcome::Finish]),
                    after,
                ),
                hook(false, Scope::Error, None, on_error),
            ]
            .into_iter()
            .filter(|h| !h.run.is_empty())
            .collect(),
            borgmatic_file: None,
        }
    }

    /// The commands of the hooks that apply, in order.
    pub fn select(
        &self,
        before: bool,
        scope: Scope,
        action: Option<Action>,
        outcome: Option<Outcome>,
    ) -> Vec<String> {
        self.commands
            .iter()
            .filter(|h| h.applies(before, scope, action, outcome))
            .flat_map(|h| h.run.iter().cloned())
            .collect()
    }
}

/// borgmatic's hook variables: each `{name}` of `context` becomes its
/// value, shell-quoted; `\\{name\\}` stays `{name}`; other names (borg's
/// placeholders) stay as they are.
pub fn interpolate(command: &str, context: &[(&str, &str)]) -> String {
    let mut out = String::new();
    let mut rest = command;
    while let Some(open) = rest.find('{') {
        let escaped = rest[..open].ends_with('\\');
        let after = &rest[open + 1..];
        let name_len = after
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..name_len];
        let tail = &after[name_len..];
        let close = if tail.starts_with("\\}") && escaped {
            Some(2)
        } else if tail.starts_with('}') && !escaped {
            Some(1)
        } else {
            None
        };
        match (close, name.is_empty()) {
            (Some(len), false) if escaped => {
                out.push_str(&rest[..open - 1]);
                out.push_str(&format!("{{{name}}}"));
                rest = &tail[len..];
            }
            (Some(len), false) => {
                out.push_str(&rest[..open]);
                match context.iter().find(|(n, _)| *n == name) {
                    Some((_, value)) => out.push_str(&shell_quote(value)),
                    None => out.push_str(&rest[open..open + 1 + name_len + len]),
                }
                rest = &tail[len..];
            }
            _ => {
                out.push_str(&rest[..=open]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Python's `shlex.quote`.
fn shell_quote(value: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./-_".contains(c);
    if !value.is_empty() && value.chars().all(safe) {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\'', "'\"'\"'"))
    }
}

/// Extra borg options per action (borgmatic's `extra_borg_options`),
/// already split as a shell would.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtraOptions {
    /// For borg create.
    pub create: Vec<String>,
    /// For borg prune.
    pub prune: Vec<String>,
    /// For borg compact.
    pub compact: Vec<String>,
    /// For borg check.
    pub check: Vec<String>,
}

/// borgmatic's `retries` and `retry_wait`: a failed repository is tried
/// again right away in the same job, after `wait` times the attempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retries {
    /// How many more times.
    pub count: u32,
    /// The wait before retry n is n times this.
    pub wait: Duration,
}

/// How ssh reaches a remote repository named in ferry.toml (a borgmatic
/// file says it in its ssh_command instead).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshPlan {
    /// The private key (`identity-file`).
    pub identity: Option<PathBuf>,
    /// The known_hosts file (`known-hosts`); else `[borg] ssh-known-hosts`.
    pub known_hosts: Option<PathBuf>,
}

/// One run of a profile, fully resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The repository as borg is given it (a path, or an ssh URL from a
    /// borgmatic file).
    pub repository: String,
    /// How borg gets the passphrase.
    pub passphrase: Passphrase,
    /// BORG_RSH (borgmatic's ssh_command).
    pub rsh: Option<String>,
    /// borg on the server (`--remote-path`).
    pub remote_path: Option<String>,
    /// The SSH key and known_hosts of a remote repository from ferry.toml.
    pub ssh: SshPlan,
    /// What is backed up.
    pub sources: Vec<String>,
    /// `--exclude`, `--exclude-if-present`, `--exclude-caches`,
    /// `--one-file-system`, `--compression` for borg create.
    pub create_options: Vec<String>,
    /// The archive name, with borg placeholders.
    pub archive_name_format: String,
    /// `--glob-archives` for prune: the archives this profile makes.
    pub prune_glob: String,
    /// `--keep-*`; empty: no prune.
    pub retention: Vec<String>,
    /// borg compact after prune.
    pub compact: bool,
    /// Checks.
    pub checks: CheckPlan,
    /// Hooks.
    pub hooks: HookPlan,
    /// `--lock-wait`.
    pub lock_wait: Duration,
    /// Things the reader noticed and a person should know (logged per run).
    pub warnings: Vec<String>,
    /// The repository's label in a borgmatic file.
    pub label: Option<String>,
    /// borg pattern lines (borgmatic's patterns file), given as
    /// `--pattern=`: when not empty the sources are its `R` lines and are
    /// not passed as paths.
    pub patterns: Vec<String>,
    /// Whether every source must exist before borg runs (stage `sources`).
    pub sources_must_exist: bool,
    /// `--umask`, as written (borg reads it as octal).
    pub umask: Option<String>,
    /// Extra options per action.
    pub extra: ExtraOptions,
    /// `--glob-archives` for the archives check (borgmatic passes the prune
    /// glob there too); None: all archives.
    pub check_glob: Option<String>,
    /// Retries of a failed repository within the job.
    pub retries: Retries,
}

impl Plan {
    /// Whether the repository is on this machine (not `ssh://` or `host:path`).
    pub fn is_local(&self) -> bool {
        is_local(&self.repository)
    }

    /// The key that serialises jobs: one job per repository at a time
    /// (a local path resolved, off the runtime).
    pub async fn repository_key(&self) -> String {
        if !self.is_local() {
            return self.repository.clone();
        }
        tokio::fs::canonicalize(&self.repository)
            .await
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| self.repository.clone())
    }

    /// Refuses a local repository under a drive's mountpoint, also through
    /// symlinks (the config check already did it lexically).
    pub fn refuse_on_a_drive(&self, config: &Config) -> Result<(), PlanError> {
        if !self.is_local() {
            return Ok(());
        }
        let path = Path::new(&self.repository);
        let resolved = resolve_existing(path);
        for candidate in [path.to_path_buf(), resolved.clone()] {
            if let Some((drive, mountpoint)) = Profile::drive_holding(config, &candidate) {
                return Err(on_a_drive(path, &drive, &mountpoint));
            }
        }
        for (name, drive) in &config.drives {
            let mountpoint = resolve_existing(&drive.mountpoint(name));
            if resolved.starts_with(&mountpoint) {
                return Err(on_a_drive(path, name, &mountpoint));
            }
        }
        Ok(())
    }

    /// The plan of a profile spelt out in ferry.toml (checked by ferry-config).
    pub fn of_profile(config: &Config, name: &Name, profile: &Profile) -> Result<Plan, PlanError> {
        let repository_name = profile
            .repository
            .as_ref()
            .ok_or_else(|| PlanError::NoRepository(name.clone()))?;
        let target = Target::of(config, repository_name)?;
        let options = CreateOptions {
            exclude_patterns: profile.exclude_patterns.clone().unwrap_or_default(),
            exclude_if_present: profile.exclude_if_present.clone().unwrap_or_default(),
            exclude_caches: profile.exclude_caches.unwrap_or(false),
            one_file_system: profile.one_file_system.unwrap_or(false),
            compression: profile.compression.clone(),
        };
        let archive_name_format = profile
            .archive_name_format
            .clone()
            .unwrap_or_else(|| DEFAULT_ARCHIVE_NAME_FORMAT.into());
        let checks = profile
            .checks
            .as_ref()
            .map(|c| CheckPlan {
                repository: c.repository.map(|f| Due::from_interval(f.interval())),
                archives: c.archives.map(|f| Due::from_interval(f.interval())),
                data: c.data.map(|f| Due::from_interval(f.interval())),
                max_duration: c.max_duration.map(|d| d.duration()),
                last: c.last,
            })
            .unwrap_or_default();
        let hooks = profile
            .hooks
            .as_ref()
            .map(|h| HookPlan::simple(&h.before, &h.after, &h.on_error))
            .unwrap_or_default();
        Ok(Plan {
            repository: target.repository,
            passphrase: target.passphrase,
            rsh: None,
            remote_path: target.remote_path,
            ssh: target.ssh,
            sources: profile
                .sources
                .iter()
                .flatten()
                .map(|s| s.to_string_lossy().into_owned())
                .collect(),
            create_options: options.arguments(),
            prune_glob: prune_glob(&archive_name_format),
            archive_name_format,
            retention: profile
                .retention
                .as_ref()
                .map(|r| r.arguments())
                .unwrap_or_default(),
            compact: profile.compact.unwrap_or(true),
            checks,
            hooks,
            lock_wait: profile
                .lock_wait
                .map(|w| w.duration())
                .unwrap_or(config.borg.lock_wait.duration()),
            warnings: Vec::new(),
            label: None,
            patterns: Vec::new(),
            sources_must_exist: true,
            umask: None,
            extra: ExtraOptions::default(),
            check_glob: None,
            retries: Retries::default(),
        })
    }
}

/// Why a ferry.toml profile makes no plan that may run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The profile has neither `repository` nor `borgmatic-config`.
    #[error("profile `{0}` names no repository")]
    NoRepository(Name),
    /// `repository` names neither a `[repositories]` nor a
    /// `[remote-repositories]` entry.
    #[error("no repository named `{0}`")]
    UnknownRepository(Name),
    /// A local repository lies on an enrolled drive.
    #[error(
        "repository {} lies under drive `{drive}`'s mountpoint {}: borg must never write a drive's copy; back up to the local repository and let ferry-sync copy it",
        repository.display(),
        mountpoint.display()
    )]
    OnADrive {
        /// The repository as written.
        repository: PathBuf,
        /// The drive.
        drive: Name,
        /// Its mountpoint (resolved).
        mountpoint: PathBuf,
    },
}

/// Where a ferry.toml profile's archives go: a local or a remote repository.
struct Target {
    repository: String,
    passphrase: Passphrase,
    remote_path: Option<String>,
    ssh: SshPlan,
}

impl Target {
    fn of(config: &Config, name: &Name) -> Result<Target, PlanError> {
        let passphrase = |file: Option<PathBuf>, command: &Option<String>| match (file, command) {
            (Some(file), _) => Passphrase::File(file),
            (None, Some(command)) => Passphrase::Command(command.clone()),
            (None, None) => Passphrase::None,
        };
        if let Some(local) = config.repositories.get(name) {
            return Ok(Target {
                repository: local.path.to_string_lossy().into_owned(),
                passphrase: passphrase(
                    local.passphrase_file.as_ref().map(|p| p.to_path_buf()),
                    &local.passcommand,
                ),
                remote_path: None,
                ssh: SshPlan::default(),
            });
        }
        let remote = config
            .remote_repositories
            .get(name)
            .ok_or_else(|| PlanError::UnknownRepository(name.clone()))?;
        let home = crate::remote::service_home();
        Ok(Target {
            repository: remote.url.as_str().to_string(),
            passphrase: passphrase(
                remote.passphrase_file.as_ref().map(|p| p.resolve(&home)),
                &remote.passcommand,
            ),
            remote_path: remote.remote_path.clone(),
            ssh: SshPlan {
                identity: remote.identity_file.as_ref().map(|p| p.resolve(&home)),
                known_hosts: remote.known_hosts.as_ref().map(|p| p.resolve(&home)),
            },
        })
    }
}

/// The borg command lines of a plan: the job runs them, and the
/// comparison with borgmatic (tests/borgmatic_measure.rs) reads them.
impl Plan {
    /// The options every borg command of this plan takes.
    fn common(&self) -> Vec<String> {
        let mut args = vec![format!("--lock-wait={}", self.lock_wait.as_secs())];
        if let Some(path) = &self.remote_path {
            args.push(format!("--remote-path={path}"));
        }
        if let Some(umask) = &self.umask {
            args.push(format!("--umask={umask}"));
        }
        args
    }

    /// borg create's arguments.
    pub fn create_args(&self) -> Vec<String> {
        let mut args: Vec<String> = ["create", "--log-json", "--progress", "--json"]
            .map(String::from)
            .to_vec();
        args.extend(self.common());
        args.extend(self.create_options.iter().cloned());
        args.extend(self.patterns.iter().map(|p| format!("--pattern={p}")));
        args.extend(self.extra.create.iter().cloned());
        args.push("--".into());
        args.push(format!("{}::{}", self.repository, self.archive_name_format));
        if self.patterns.is_empty() {
            args.extend(self.sources.iter().cloned());
        }
        args
    }

    /// borg prune's arguments; None when the plan keeps no retention.
    pub fn prune_args(&self) -> Option<Vec<String>> {
        if self.retention.is_empty() {
            return None;
        }
        let mut args = vec!["prune".to_string(), "--log-json".into()];
        args.extend(self.common());
        if !self.prune_glob.is_empty() {
            args.push(format!("--glob-archives={}", self.prune_glob));
        }
        args.extend(self.retention.iter().cloned());
        args.extend(self.extra.prune.iter().cloned());
        args.extend(["--".into(), self.repository.clone()]);
        Some(args)
    }

    /// borg compact's arguments; None when it does not run (no prune, or
    /// compact switched off).
    pub fn compact_args(&self) -> Option<Vec<String>> {
        if self.retention.is_empty() || !self.compact {
            return None;
        }
        let mut args = vec!["compact".to_string(), "--log-json".into()];
        args.extend(self.common());
        args.extend(self.extra.compact.iter().cloned());
        args.extend(["--".into(), self.repository.clone()]);
        Some(args)
    }

    /// The borg check runs for the check kinds that are due, each with its
    /// whole arguments.
    pub fn check_args(&self, repository: bool, archives: bool, data: bool) -> Vec<Vec<String>> {
        let archive_flags = || {
            let mut args = Vec::new();
            if let Some(glob) = &self.check_glob {
                args.push(format!("--glob-archives={glob}"));
            }
            if data {
                args.push("--verify-data".into());
            }
            if let Some(last) = self.checks.last {
                args.push(format!("--last={last}"));
            }
            args
        };
        let only = |flag: &str| {
            let mut args = vec![flag.to_string()];
            args.extend(archive_flags());
            args
        };
        let mut runs: Vec<Vec<String>> = Vec::new();
        match (repository, archives || data, self.checks.max_duration) {
            (false, false, _) => {}
            (true, other, Some(max)) => {
                runs.push(vec![
                    "--repository-only".into(),
                    format!("--max-duration={}", max.as_secs().max(1)),
                ]);
                if other {
                    runs.push(only("--archives-only"));
                }
            }
            (true, false, None) => runs.push(vec!["--repository-only".into()]),
            (false, true, _) => runs.push(only("--archives-only")),
            (true, true, None) => runs.push(archive_flags()),
        }
        runs.into_iter()
            .map(|flags| {
                let mut args = vec!["check".to_string(), "--log-json".into()];
                args.extend(self.common());
                args.extend(flags);
                args.extend(self.extra.check.iter().cloned());
                args.extend(["--".into(), self.repository.clone()]);
                args
            })
            .collect()
    }

    /// What the plan is called in messages: its label, else its repository.
    pub fn name(&self) -> &str {
        self.label.as_deref().unwrap_or(&self.repository)
    }
}

fn on_a_drive(path: &Path, drive: &Name, mountpoint: &Path) -> PlanError {
    PlanError::OnADrive {
        repository: path.to_path_buf(),
        drive: drive.clone(),
        mountpoint: mountpoint.to_path_buf(),
    }
}

/// `path` with symlinks resolved as far as it exists; the rest appended.
fn resolve_existing(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(resolved) = std::fs::canonicalize(&existing) {
            return rest
                .iter()
                .rev()
                .fold(resolved, |p, c: &std::ffi::OsString| p.join(c));
        }
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Whether a repository string names a local path.
pub fn is_local(repository: &str) -> bool {
    if repository.contains("://") {
        return false;
    }
    // borg's scp-style `user@host:path`: a colon before the first slash.
    match (repository.find(':'), repository.find('/')) {
        (Some(colon), Some(slash)) => colon > slash,
        (Some(_), None) => false,
        _ => true,
    }
}

/// The create options both kinds of profile have.
#[derive(Debug, Default)]
pub struct CreateOptions {
    /// `--exclude`.
    pub exclude_patterns: Vec<String>,
    /// `--exclude-if-present`.
    pub exclude_if_present: Vec<String>,
    /// `--exclude-caches`.
    pub exclude_caches: bool,
    /// `--one-file-system`.
    pub one_file_system: bool,
    /// `--compression`; default lz4.
    pub compression: Option<String>,
}

impl CreateOptions {
    /// borg create's arguments for these options (`--opt=value`, so a
    /// pattern starting with `-` is never read as an option).
    pub fn arguments(&self) -> Vec<String> {
        let mut args = vec![format!(
            "--compression={}",
            self.compression.as_deref().unwrap_or(DEFAULT_COMPRESSION)
        )];
        args.extend(
            self.exclude_patterns
                .iter()
                .map(|p| format!("--exclude={p}")),
        );
        args.extend(
            self.exclude_if_present
                .iter()
                .map(|p| format!("--exclude-if-present={p}")),
        );
        if self.exclude_caches {
            args.push("--exclude-caches".into());
        }
        if self.one_file_system {
            args.push("--one-file-system".into());
        }
        args
    }
}

/// The archives a profile makes, as a `--glob-archives` pattern: the name
/// format with every placeholder that changes between runs (times, uuid,
/// pid) replaced by `*`; host and user placeholders stay for borg to expand.
/// Prune then never touches another profile's or another host's archives.
pub fn prune_glob(format: &str) -> String {
    const STABLE: [&str; 4] = ["hostname", "fqdn", "reverse-fqdn", "user"];
    let mut glob = String::new();
    let mut rest = format;
    while let Some(open) = rest.find('{') {
        glob.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        if let Some(inner) = after.strip_prefix('{') {
            // `{{` is a literal brace.
            glob.push_str("{{");
            rest = inner;
            continue;
        }
        let Some(close) = after.find('}') else {
            glob.push_str(&rest[open..]);
            rest = "";
            break;
        };
        let placeholder = &after[..close];
        let name = placeholder.split(':').next().unwrap_or_default();
        if STABLE.contains(&name) {
            glob.push('{');
            glob.push_str(placeholder);
            glob.push('}');
        } else if !glob.ends_with('*') {
            glob.push('*');
        }
        rest = &after[close + 1..];
    }
    glob.push_str(rest);
    glob
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_globs_keep_the_host_and_drop_the_time() {
        assert_eq!(prune_glob(DEFAULT_ARCHIVE_NAME_FORMAT), "{hostname}-*");
        assert_eq!(prune_glob("home-{now}"), "home-*");
        assert_eq!(
            prune_glob("{user}@{fqdn}-{now:%Y}{uuid4}.x"),
            "{user}@{fqdn}-*.x"
        );
        assert_eq!(prune_glob("plain"), "plain");
    }

    #[test]
    fn local_and_remote_repositories() {
        assert!(is_local("/srv/borg/nas"));
        assert!(is_local("/srv/a:b"));
        assert!(!is_local("david@myserver:backup_dir"));
        assert!(!is_local("ssh://david@host/./repo"));
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("my-secure-passphrase".into());
        assert!(!format!("{s:?}").contains("secure"));
        let p = Passphrase::Inline(s);
        assert!(!format!("{p:?}").contains("secure"));
    }

    #[test]
    fn checks_fall_due() {
        let week = Due::Every(Duration::from_secs(604_800));
        assert!(week.due(None, 5));
        assert!(!week.due(Some(10), 20));
        assert!(week.due(Some(10), 604_810));
        assert!(Due::Always.due(Some(10), 10));
    }
}
