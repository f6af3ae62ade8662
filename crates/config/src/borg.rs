//! `[borg]` and `[profiles.<name>]`: the backups ferry-borg runs. Owned by
//! the borg runner's issue.
//!
//! A profile either spells out what borg does (repository, sources,
//! excludes, retention, checks, hooks) or points at an existing borgmatic
//! file (`borgmatic-config`), which ferry-borg reads each time the profile
//! runs; the ferry-side keys (interval, preconditions) apply to both. Every
//! value that borg would only reject at 3 a.m. is checked here, when the file
//! is loaded.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::{AbsolutePath, Config, HomePath, Name};

/// `[borg]`: settings for every profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BorgSettings {
    /// The borg program: a name looked up in PATH or an absolute path.
    #[serde(default = "default_program")]
    pub program: String,
    /// BORG_HOST_ID for every borg run, so the next run recognises (and
    /// removes) a lock left by a crashed one. Default: `/etc/machine-id`
    /// followed by `@ferry`.
    pub host_id: Option<String>,
    /// How long borg waits for a repository lock held by someone else
    /// (`--lock-wait`), for profiles that do not say. Default 1 minute.
    #[serde(default = "default_lock_wait")]
    pub lock_wait: Span,
    /// How often a run that still finds the repository locked after the
    /// lock wait is tried again before it fails. Default 3.
    #[serde(default = "default_busy_retries")]
    pub busy_retries: u32,
    /// The pause before the first retry of a busy repository; it doubles
    /// with each retry. Default 1 minute.
    #[serde(default = "default_busy_retry_delay")]
    pub busy_retry_delay: Span,
    /// After Cancel (or shutdown) borg gets SIGINT and this long to write a
    /// checkpoint and release its lock, then SIGTERM, then SIGKILL. Default 30 s.
    #[serde(default = "default_cancel_timeout")]
    pub cancel_timeout: Span,
    /// The longest one hook command may run. Default 10 minutes.
    #[serde(default = "default_hook_timeout")]
    pub hook_timeout: Span,
    /// The longest one borg command may run before it is cancelled and the
    /// job fails. Default 24 hours.
    #[serde(default = "default_command_timeout")]
    pub command_timeout: Span,
    /// A failed or skipped job is started again by itself this many times
    /// (0: never). A run that makes an archive, Cancel, or a Start by hand
    /// ends the series. Default 3.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// The pause before each of those retries. Default 10 minutes (seed
    /// 000's `RestartSec=10m`).
    #[serde(default = "default_retry_delay")]
    pub retry_delay: Span,
    /// The known_hosts file every SSH repository's host key must be in
    /// (ssh's `StrictHostKeyChecking=yes`: an unknown or changed key fails
    /// the job, and ferry never adds one). Default `~/.ssh/known_hosts` of
    /// the user ferry-borg runs as (root's for the system service); the
    /// system-wide /etc/ssh/ssh_known_hosts counts too.
    pub ssh_known_hosts: Option<HomePath>,
    /// How long ssh tries to reach a server before the run counts as
    /// "server unreachable". Default 30 s.
    #[serde(default = "default_ssh_connect_timeout")]
    pub ssh_connect_timeout: Span,
    /// A run that cannot reach its SSH server (connection refused, no
    /// route, DNS failure, network not online) is skipped and retried, and
    /// only reported as a failure (mailed) once the server has been
    /// unreachable this long. Default 2 days.
    #[serde(default = "default_unreachable_grace")]
    pub unreachable_grace: Span,
}

fn default_ssh_connect_timeout() -> Span {
    Span::secs(30)
}
fn default_unreachable_grace() -> Span {
    Span::secs(2 * 86_400)
}

fn default_retries() -> u32 {
    3
}
fn default_retry_delay() -> Span {
    Span::secs(600)
}

fn default_program() -> String {
    "borg".into()
}
fn default_lock_wait() -> Span {
    Span::secs(60)
}
fn default_busy_retries() -> u32 {
    3
}
fn default_busy_retry_delay() -> Span {
    Span::secs(60)
}
fn default_cancel_timeout() -> Span {
    Span::secs(30)
}
fn default_hook_timeout() -> Span {
    Span::secs(600)
}
fn default_command_timeout() -> Span {
    Span::secs(24 * 3600)
}

impl Default for BorgSettings {
    fn default() -> Self {
        BorgSettings {
            program: default_program(),
            host_id: None,
            lock_wait: default_lock_wait(),
            busy_retries: default_busy_retries(),
            busy_retry_delay: default_busy_retry_delay(),
            cancel_timeout: default_cancel_timeout(),
            hook_timeout: default_hook_timeout(),
            command_timeout: default_command_timeout(),
            retries: default_retries(),
            retry_delay: default_retry_delay(),
            ssh_known_hosts: None,
            ssh_connect_timeout: default_ssh_connect_timeout(),
            unreachable_grace: default_unreachable_grace(),
        }
    }
}

/// `[profiles.<name>]`: one backup profile.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Profile {
    /// The `[repositories.<name>]` archives go to.
    pub repository: Option<Name>,
    /// Directories and files to back up.
    pub sources: Option<Vec<AbsolutePath>>,
    /// borg `--exclude` patterns (fnmatch by default; `sh:`, `re:`, `pp:`, `pf:`).
    pub exclude_patterns: Option<Vec<String>>,
    /// Skip directories containing a file of this name (`--exclude-if-present`).
    pub exclude_if_present: Option<Vec<String>>,
    /// Skip directories tagged with CACHEDIR.TAG (`--exclude-caches`).
    pub exclude_caches: Option<bool>,
    /// Stay on the sources' filesystems (`--one-file-system`).
    pub one_file_system: Option<bool>,
    /// borg `--compression`, for example `lz4`, `zstd,10`, `auto,lzma`. Default lz4.
    pub compression: Option<String>,
    /// The archive name, with borg's placeholders. Default
    /// `{hostname}-{now:%Y-%m-%dT%H:%M:%S.%f}` (borgmatic's).
    pub archive_name_format: Option<String>,
    /// What prune keeps; without it nothing is pruned.
    pub retention: Option<Retention>,
    /// Which `borg check`s run, and how often.
    pub checks: Option<Checks>,
    /// Commands run around the job.
    pub hooks: Option<Hooks>,
    /// `borg compact` after prune. Default true.
    pub compact: Option<bool>,
    /// `--lock-wait` for this profile; default `[borg] lock-wait`.
    pub lock_wait: Option<Span>,
    /// How often the profile should run: Schedule shows when it is next due.
    pub interval: Option<Span>,
    /// What must hold for the profile to run; otherwise the run is skipped.
    #[serde(default)]
    pub preconditions: Preconditions,
    /// Read everything borg does from this borgmatic configuration file
    /// instead (read again at every run).
    pub borgmatic_config: Option<AbsolutePath>,
    /// With `borgmatic-config`: back up only this repository (label or
    /// path) of the file; without it, each of its repositories in turn.
    pub borgmatic_repository: Option<String>,
}

/// `[profiles.<name>.retention]`: borg prune's `--keep-*` options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Retention {
    /// Keep everything younger than this: a number and H, d, w, m or y (`3H`).
    pub keep_within: Option<String>,
    /// Per-second archives to keep.
    pub keep_secondly: Option<u32>,
    /// Per-minute archives to keep.
    pub keep_minutely: Option<u32>,
    /// Hourly archives to keep.
    pub keep_hourly: Option<u32>,
    /// Daily archives to keep.
    pub keep_daily: Option<u32>,
    /// Weekly archives to keep.
    pub keep_weekly: Option<u32>,
    /// Monthly archives to keep.
    pub keep_monthly: Option<u32>,
    /// Yearly archives to keep.
    pub keep_yearly: Option<u32>,
}

impl Retention {
    /// The `--keep-*` arguments, in borg's order; empty when nothing is kept
    /// (then prune does not run).
    pub fn arguments(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(within) = &self.keep_within {
            args.push(format!("--keep-within={within}"));
        }
        let counts = [
            ("secondly", self.keep_secondly),
            ("minutely", self.keep_minutely),
            ("hourly", self.keep_hourly),
            ("daily", self.keep_daily),
            ("weekly", self.keep_weekly),
            ("monthly", self.keep_monthly),
            ("yearly", self.keep_yearly),
        ];
        for (what, count) in counts {
            if let Some(n) = count {
                args.push(format!("--keep-{what}={n}"));
            }
        }
        args
    }

    /// Checks `keep-within`; the error says what borg accepts.
    pub fn check_keep_within(value: &str) -> Result<(), String> {
        let digits = value.trim_end_matches(['H', 'd', 'w', 'm', 'y']);
        let unit_len = value.len() - digits.len();
        if unit_len != 1 || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "`{}` is not a keep-within interval: write a number and one of H (hours), d, w, m (months) or y, for example \"3H\" or \"7d\"",
                value.escape_debug()
            ));
        }
        Ok(())
    }
}

/// `[profiles.<name>.checks]`: each check with its frequency ("always" or
/// a duration such as "2 weeks"); an absent check never runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Checks {
    /// `borg check --repository-only`: segment and index consistency.
    pub repository: Option<Frequency>,
    /// `borg check --archives-only`: archive metadata.
    pub archives: Option<Frequency>,
    /// `borg check --verify-data`: reads and verifies every chunk (slow).
    pub data: Option<Frequency>,
    /// A repository check stops after this long and continues where it
    /// stopped next time (`--max-duration`): a spot check of big repositories.
    pub max_duration: Option<Span>,
    /// The archives and data checks look at only the last N archives (`--last`).
    pub last: Option<u32>,
}

/// `[profiles.<name>.hooks]`: shell commands (`sh -c`) run with
/// FERRY_PROFILE, FERRY_REPOSITORY and (on error) FERRY_ERROR set. A before
/// hook that exits 75 skips the run, as in borgmatic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Hooks {
    /// Before anything else; exit 75 = skip this run, other non-zero = fail.
    #[serde(default)]
    pub before: Vec<String>,
    /// After every stage succeeded.
    #[serde(default)]
    pub after: Vec<String>,
    /// After a failure (not after a skip).
    #[serde(default)]
    pub on_error: Vec<String>,
}

/// `[profiles.<name>.preconditions]`: a run whose precondition fails is
/// skipped (BackupSkipped with the reason), never failed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Preconditions {
    /// Each path must be a mount point (seed 000's eCryptfs ~/Private).
    #[serde(default)]
    pub mountpoints: Vec<AbsolutePath>,
    /// Each path must exist.
    #[serde(default)]
    pub exists: Vec<AbsolutePath>,
    /// Run only on mains power (a machine without batteries always is).
    #[serde(default)]
    pub on_ac_power: bool,
    /// Run only when the network is online: NetworkManager says connected
    /// (site or global), or else systemd's network-online.target is
    /// active, or else (neither on the system bus) the kernel has a default
    /// route. Otherwise the run counts as "server unreachable" (skipped,
    /// retried, a failure only after `[borg] unreachable-grace`).
    #[serde(default)]
    pub network_online: bool,
}

/// A length of time: an integer number of seconds, or text such as `90s`,
/// `10 minutes`, `1 week`, `1 day 12 hours` (units s, m/min, h, d, w,
/// month = 30 days, y = 365 days).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "SpanText")]
pub struct Span(Duration);

#[derive(Deserialize)]
#[serde(untagged)]
enum SpanText {
    Seconds(u64),
    Text(String),
}

impl TryFrom<SpanText> for Span {
    type Error = String;
    fn try_from(value: SpanText) -> Result<Self, Self::Error> {
        match value {
            SpanText::Seconds(s) => Ok(Span::secs(s)),
            SpanText::Text(t) => Span::parse(&t),
        }
    }
}

impl Span {
    /// `s` seconds.
    pub const fn secs(s: u64) -> Span {
        Span(Duration::from_secs(s))
    }

    /// The duration.
    pub fn duration(self) -> Duration {
        self.0
    }

    /// Whole seconds.
    pub fn as_secs(self) -> u64 {
        self.0.as_secs()
    }

    /// Parses `10 minutes`, `1 week`, `90s`, `1d 12h`, `45`.
    pub fn parse(text: &str) -> Result<Span, String> {
        let bad = || {
            format!(
                "`{}` is not a duration: write a number and a unit, for example \"90s\", \"10 minutes\", \"2 weeks\" or \"1 day 12 hours\"",
                text.escape_debug()
            )
        };
        let mut total: u64 = 0;
        let mut rest = text.trim();
        if rest.is_empty() {
            return Err(bad());
        }
        while !rest.is_empty() {
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            if digits == 0 {
                return Err(bad());
            }
            let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = rest[digits..].trim_start();
            let unit_len = rest.len()
                - rest
                    .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                    .len();
            let unit = &rest[..unit_len];
            rest = rest[unit_len..].trim_start_matches([' ', ',']);
            let factor = match unit.to_ascii_lowercase().as_str() {
                "" if total == 0 && rest.is_empty() => 1,
                "s" | "sec" | "secs" | "second" | "seconds" => 1,
                "m" | "min" | "mins" | "minute" | "minutes" => 60,
                "h" | "hr" | "hrs" | "hour" | "hours" => 3600,
                "d" | "day" | "days" => 86_400,
                "w" | "week" | "weeks" => 7 * 86_400,
                "month" | "months" => 30 * 86_400,
                "y" | "year" | "years" => 365 * 86_400,
                _ => return Err(bad()),
            };
            total = number
                .checked_mul(factor)
                .and_then(|n| total.checked_add(n))
                .ok_or_else(bad)?;
        }
        Ok(Span::secs(total))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.0.as_secs())
    }
}

/// How often a check runs: `"always"` (every run) or a [`Span`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "SpanText")]
pub enum Frequency {
    /// Every run.
    Always,
    /// When this long has passed since it last ran.
    Every(Span),
}

impl TryFrom<SpanText> for Frequency {
    type Error = String;
    fn try_from(value: SpanText) -> Result<Self, Self::Error> {
        match value {
            SpanText::Text(t) if t.trim().eq_ignore_ascii_case("always") => Ok(Frequency::Always),
            other => Span::try_from(other)
                .map(Frequency::Every)
                .map_err(|e| format!("{e}, or \"always\"")),
        }
    }
}

impl Frequency {
    /// Parses `always` or a duration (borgmatic's `frequency:` values).
    pub fn parse(text: &str) -> Result<Frequency, String> {
        Frequency::try_from(SpanText::Text(text.to_string()))
    }

    /// `None` for always, else the interval.
    pub fn interval(self) -> Option<Duration> {
        match self {
            Frequency::Always => None,
            Frequency::Every(span) => Some(span.duration()),
        }
    }

    /// Whether a check last run at `last` (unix seconds, None = never) is due at `now`.
    pub fn due(self, last: Option<u64>, now: u64) -> bool {
        match (self, last) {
            (Frequency::Always, _) | (_, None) => true,
            (Frequency::Every(span), Some(last)) => now >= last.saturating_add(span.as_secs()),
        }
    }
}

/// `path` with `.` and `..` resolved lexically, so `/run/ferry/a/../b` is
/// seen under `/run/ferry`.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The drive whose mountpoint `path` lies under (or is), if any: borg must
/// never write there, only the sync worker may (see the issue of ferry-sync).
fn drive_holding(config: &Config, path: &Path) -> Option<(Name, PathBuf)> {
    let path = normalize(path);
    config.drives.iter().find_map(|(name, drive)| {
        let mountpoint = normalize(&drive.mountpoint(name));
        path.starts_with(&mountpoint)
            .then(|| (name.clone(), mountpoint))
    })
}

/// Keys a profile with `borgmatic-config` must not have: they come from the file.
const FROM_BORGMATIC: [&str; 11] = [
    "repository",
    "sources",
    "exclude-patterns",
    "exclude-if-present",
    "exclude-caches",
    "one-file-system",
    "compression",
    "archive-name-format",
    "retention",
    "checks",
    "hooks",
];

/// The value checks of this module, for ferry-borg to apply the same rules to
/// what it reads from a borgmatic file. They are associated functions of
/// [`Profile`] because the crate root re-exports only `Profile` and
/// `BorgSettings` from this module.
impl Profile {
    /// Parses a duration or frequency text (`2 weeks`, `90s`) into seconds.
    pub fn parse_duration(text: &str) -> Result<Duration, String> {
        Span::parse(text).map(Span::duration)
    }

    /// Parses a check frequency: `None` for "always", else the interval.
    pub fn parse_frequency(text: &str) -> Result<Option<Duration>, String> {
        Frequency::parse(text).map(Frequency::interval)
    }

    /// Checks a `keep-within` value (`3H`, `7d`).
    pub fn check_keep_within(value: &str) -> Result<(), String> {
        Retention::check_keep_within(value)
    }

    /// Checks a borg compression spec.
    pub fn check_compression(value: &str) -> Result<(), String> {
        check_compression(value)
    }

    /// Checks an archive name format.
    pub fn check_archive_name_format(value: &str) -> Result<(), String> {
        check_archive_name_format(value)
    }

    /// The drive (name, mountpoint) whose mountpoint `path` lies under,
    /// lexically; callers that can also resolve symlinks should.
    pub fn drive_holding(config: &Config, path: &Path) -> Option<(Name, PathBuf)> {
        drive_holding(config, path)
    }

    fn set_keys(&self) -> Vec<&'static str> {
        let set = [
            self.repository.is_some(),
            self.sources.is_some(),
            self.exclude_patterns.is_some(),
            self.exclude_if_present.is_some(),
            self.exclude_caches.is_some(),
            self.one_file_system.is_some(),
            self.compression.is_some(),
            self.archive_name_format.is_some(),
            self.retention.is_some(),
            self.checks.is_some(),
            self.hooks.is_some(),
        ];
        FROM_BORGMATIC
            .iter()
            .zip(set)
            .filter(|(_, set)| *set)
            .map(|(k, _)| *k)
            .collect()
    }
}

/// Checks `compression` the way borg reads it: a method and optional
/// level, optionally behind `auto,` or `obfuscate,N,`.
fn check_compression(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value
            .split(',')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a borg compression spec: write for example \"lz4\", \"zstd,10\" or \"auto,lzma,6\"",
            value.escape_debug()
        ))
    }
}

/// Checks an archive name format: borg forbids `/` and it must not be empty.
fn check_archive_name_format(value: &str) -> Result<(), String> {
    if value.trim().is_empty() || value.contains('/') || value.contains("::") {
        return Err(format!(
            "`{}` is not an archive name format: it must not be empty or contain `/` or `::`",
            value.escape_debug()
        ));
    }
    Ok(())
}

/// Checks that need the whole configuration.
pub(crate) fn check(config: &Config) -> Result<(), (Vec<String>, String)> {
    let borg = |k: &str| vec!["borg".to_string(), k.to_string()];
    let settings = &config.borg;
    if settings.program.trim().is_empty() {
        return Err((
            borg("program"),
            "name the borg program, for example \"borg\"".into(),
        ));
    }
    if let Some(id) = &settings.host_id {
        if id.trim().is_empty() || id.chars().any(char::is_whitespace) {
            return Err((borg("host-id"), "must be one word without spaces".into()));
        }
    }
    let spans = [
        ("lock-wait", settings.lock_wait, 0, 86_400),
        ("busy-retry-delay", settings.busy_retry_delay, 1, 86_400),
        ("cancel-timeout", settings.cancel_timeout, 1, 3600),
        ("hook-timeout", settings.hook_timeout, 1, 86_400),
        ("command-timeout", settings.command_timeout, 10, 7 * 86_400),
        ("ssh-connect-timeout", settings.ssh_connect_timeout, 1, 600),
        (
            "unreachable-grace",
            settings.unreachable_grace,
            0,
            365 * 86_400,
        ),
    ];
    for (key, span, min, max) in spans {
        if !(min..=max).contains(&span.as_secs()) {
            return Err((borg(key), format!("must be from {min} to {max} seconds")));
        }
    }
    if settings.busy_retries > 100 {
        return Err((borg("busy-retries"), "must be at most 100".into()));
    }
    for (name, profile) in &config.profiles {
        check_profile(config, name, profile)?;
    }
    Ok(())
}

fn check_profile(
    config: &Config,
    name: &Name,
    profile: &Profile,
) -> Result<(), (Vec<String>, String)> {
    let key = |parts: &[&str]| {
        let mut path = vec!["profiles".to_string(), name.to_string()];
        path.extend(parts.iter().map(|p| p.to_string()));
        path
    };
    if profile.borgmatic_config.is_some() {
        if let Some(first) = profile.set_keys().first() {
            return Err((
                key(&[first]),
                format!("`{first}` comes from the borgmatic file named by borgmatic-config; remove it here or remove borgmatic-config"),
            ));
        }
    } else {
        if profile.borgmatic_repository.is_some() {
            return Err((
                key(&["borgmatic-repository"]),
                "only means something with borgmatic-config".into(),
            ));
        }
        let Some(repository) = &profile.repository else {
            return Err((
                key(&[]),
                "a profile needs `repository = \"<name>\"` (a [repositories.<name>] section) or `borgmatic-config = \"/path/config.yaml\"`".into(),
            ));
        };
        let found = config.repositories.get(repository);
        if found.is_none() && !config.remote_repositories.contains_key(repository) {
            return Err((
                key(&["repository"]),
                format!("no repository named `{repository}`: add a [repositories.{repository}] (local) or [remote-repositories.{repository}] (SSH) section or fix the name"),
            ));
        }
        let on_a_drive = found.and_then(|f| drive_holding(config, &f.path).map(|d| (f, d)));
        if let Some((found, (drive, mountpoint))) = on_a_drive {
            return Err((
                key(&["repository"]),
                format!(
                    "repository `{repository}` ({}) lies under drive `{drive}`'s mountpoint {}: borg must never write a drive's copy; back up to the local repository and let ferry-sync copy it",
                    found.path.display(),
                    mountpoint.display()
                ),
            ));
        }
        match &profile.sources {
            Some(sources) if !sources.is_empty() => {}
            _ => {
                return Err((
                    key(&["sources"]),
                    "list at least one directory to back up, for example sources = [\"/home\"]"
                        .into(),
                ))
            }
        }
    }
    for pattern in profile.exclude_patterns.iter().flatten() {
        if pattern.trim().is_empty() {
            return Err((
                key(&["exclude-patterns"]),
                "an empty pattern excludes nothing; remove it".into(),
            ));
        }
    }
    for marker in profile.exclude_if_present.iter().flatten() {
        if marker.trim().is_empty() || marker.contains('/') {
            return Err((
                key(&["exclude-if-present"]),
                format!("`{}` must be a file name (no `/`)", marker.escape_debug()),
            ));
        }
    }
    if let Some(compression) = &profile.compression {
        check_compression(compression).map_err(|e| (key(&["compression"]), e))?;
    }
    if let Some(format) = &profile.archive_name_format {
        check_archive_name_format(format).map_err(|e| (key(&["archive-name-format"]), e))?;
    }
    if let Some(within) = profile
        .retention
        .as_ref()
        .and_then(|r| r.keep_within.as_ref())
    {
        Retention::check_keep_within(within)
            .map_err(|e| (key(&["retention", "keep-within"]), e))?;
    }
    if let Some(wait) = profile.lock_wait {
        if wait.as_secs() > 86_400 {
            return Err((key(&["lock-wait"]), "must be at most a day".into()));
        }
    }
    if profile.interval.is_some_and(|i| i.as_secs() == 0) {
        return Err((key(&["interval"]), "must be longer than 0 seconds".into()));
    }
    if let Some(checks) = &profile.checks {
        if checks.max_duration.is_some() && checks.repository.is_none() {
            return Err((
                key(&["checks", "max-duration"]),
                "limits the repository check: set `repository = \"<frequency>\"` too".into(),
            ));
        }
        if checks.last.is_some() && checks.archives.is_none() && checks.data.is_none() {
            return Err((
                key(&["checks", "last"]),
                "limits the archives and data checks: set one of them too".into(),
            ));
        }
    }
    if let Some(hooks) = &profile.hooks {
        let lists = [
            ("before", &hooks.before),
            ("after", &hooks.after),
            ("on-error", &hooks.on_error),
        ];
        for (which, commands) in lists {
            if commands.iter().any(|c| c.trim().is_empty()) {
                return Err((key(&["hooks", which]), "an empty command; remove it".into()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("ferry.toml")).map_err(|e| e.to_string())
    }

    const REPO: &str = "[repositories.nas]\npath = \"/srv/borg/nas\"\npassphrase-file = \"/etc/ferry/nas.pass\"\n\n";

    #[test]
    fn spans_parse_like_people_write_them() {
        assert_eq!(Span::parse("90s"), Ok(Span::secs(90)));
        assert_eq!(Span::parse("10 minutes"), Ok(Span::secs(600)));
        assert_eq!(Span::parse("1 week"), Ok(Span::secs(7 * 86_400)));
        assert_eq!(Span::parse("1 day 12 hours"), Ok(Span::secs(36 * 3600)));
        assert_eq!(Span::parse("1d, 2h"), Ok(Span::secs(26 * 3600)));
        assert_eq!(Span::parse("45"), Ok(Span::secs(45)));
        assert_eq!(Span::parse("2 months"), Ok(Span::secs(60 * 86_400)));
        for bad in [
            "",
            "week",
            "1 fortnight",
            "1 2",
            "-1s",
            "1.5h",
            "99999999999999999999y",
        ] {
            assert!(
                Span::parse(bad).unwrap_err().contains("not a duration"),
                "{bad}"
            );
        }
        assert_eq!(Frequency::parse("always"), Ok(Frequency::Always));
        assert_eq!(
            Frequency::parse("2 weeks"),
            Ok(Frequency::Every(Span::secs(14 * 86_400)))
        );
    }

    #[test]
    fn frequency_due() {
        let week = Frequency::Every(Span::secs(604_800));
        assert!(week.due(None, 10));
        assert!(!week.due(Some(100), 100 + 604_799));
        assert!(week.due(Some(100), 100 + 604_800));
        assert!(Frequency::Always.due(Some(100), 100));
    }

    #[test]
    fn a_full_profile_parses() {
        let text = format!(
            "{REPO}[borg]\nlock-wait = \"2 minutes\"\nbusy-retries = 2\n\n[profiles.home]\nrepository = \"nas\"\nsources = [\"/home\", \"/etc\"]\nexclude-patterns = [\"*.pyc\"]\nexclude-if-present = [\".nobackup\"]\ncompression = \"zstd,6\"\ninterval = \"1 day\"\n\n[profiles.home.retention]\nkeep-within = \"3H\"\nkeep-daily = 7\n\n[profiles.home.checks]\nrepository = \"1 week\"\narchives = \"always\"\nmax-duration = 600\n\n[profiles.home.hooks]\nbefore = [\"echo hi\"]\n\n[profiles.home.preconditions]\nmountpoints = [\"/home/david/Private\"]\non-ac-power = true\n"
        );
        let config = parse(&text).expect("valid");
        let home = &config.profiles["home"];
        assert_eq!(config.borg.lock_wait, Span::secs(120));
        assert_eq!(
            home.retention.as_ref().map(Retention::arguments),
            Some(vec![
                "--keep-within=3H".to_string(),
                "--keep-daily=7".to_string()
            ])
        );
        assert_eq!(home.interval, Some(Span::secs(86_400)));
        assert!(home.preconditions.on_ac_power);
    }

    #[test]
    fn a_repository_under_a_drive_mountpoint_is_refused() {
        let text = "[drives.offsite-a]\nuuid = \"1b2c3d4e-0000-0000-0000-000000000000\"\n\n[repositories.copy]\npath = \"/run/ferry/offsite-a/../offsite-a/nas\"\n\n[profiles.home]\nrepository = \"copy\"\nsources = [\"/home\"]\n";
        let err = parse(text).unwrap_err();
        assert!(err.contains("profiles.home.repository"), "{err}");
        assert!(err.contains("drive `offsite-a`"), "{err}");
        assert!(err.contains(":8:"), "{err}");
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            ("[profiles.a]\nsources = [\"/x\"]\n", "needs `repository"),
            ("[profiles.a]\nrepository = \"nope\"\nsources = [\"/x\"]\n", "no repository named `nope`"),
            ("[profiles.a]\nrepository = \"nas\"\n", "at least one directory"),
            ("[profiles.a]\nrepository = \"nas\"\nsources = [\"/x\"]\ncompression = \"zstd 3\"\n", "compression spec"),
            ("[profiles.a]\nrepository = \"nas\"\nsources = [\"/x\"]\n[profiles.a.retention]\nkeep-within = \"3 hours\"\n", "keep-within"),
            ("[profiles.a]\nrepository = \"nas\"\nsources = [\"/x\"]\ninterval = \"soon\"\n", "not a duration"),
            ("[profiles.a]\nborgmatic-config = \"/etc/borgmatic/config.yaml\"\nsources = [\"/x\"]\n", "comes from the borgmatic file"),
            ("[profiles.a]\nrepository = \"nas\"\nsources = [\"/x\"]\n[profiles.a.checks]\nmax-duration = 60\n", "set `repository"),
            ("[profiles.a]\nrepository = \"nas\"\nsources = [\"/x\"]\nkeep-daily = 3\n", "unknown field"),
        ];
        for (profile, expected) in cases {
            let err = parse(&format!("{REPO}{profile}")).unwrap_err();
            assert!(err.contains(expected), "{profile}: {err}");
        }
    }

    #[test]
    fn a_borgmatic_profile_needs_nothing_else() {
        let config = parse("[profiles.private]\nborgmatic-config = \"/home/david/Private/borg/borgmatic-config.yaml\"\ninterval = \"1 day\"\n[profiles.private.preconditions]\nexists = [\"/home/david/Private/borg\"]\n").expect("valid");
        assert!(config.profiles["private"].borgmatic_config.is_some());
    }
}
