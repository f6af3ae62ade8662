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

/// Commands run around the job with `sh -c`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookPlan {
    /// Before anything.
    pub before: Vec<String>,
    /// After success.
    pub after: Vec<String>,
    /// After a failure.
    pub on_error: Vec<String>,
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
}

impl Plan {
    /// Whether the repository is on this machine (not `ssh://` or `host:path`).
    pub fn is_local(&self) -> bool {
        is_local(&self.repository)
    }

    /// The key that serialises jobs: one job per repository at a time.
    pub fn repository_key(&self) -> String {
        if self.is_local() {
            std::fs::canonicalize(&self.repository)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| self.repository.clone())
        } else {
            self.repository.clone()
        }
    }

    /// Refuses a local repository under a drive's mountpoint, also through
    /// symlinks (the config check already did it lexically).
    pub fn check_not_on_a_drive(&self, config: &Config) -> Result<(), String> {
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
    pub fn from_profile(config: &Config, name: &Name, profile: &Profile) -> Result<Plan, String> {
        let repository_name = profile
            .repository
            .as_ref()
            .ok_or_else(|| format!("profile `{name}` names no repository"))?;
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
            .map(|h| HookPlan {
                before: h.before.clone(),
                after: h.after.clone(),
                on_error: h.on_error.clone(),
            })
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
        })
    }
}

/// Where a ferry.toml profile's archives go: a local or a remote repository.
struct Target {
    repository: String,
    passphrase: Passphrase,
    remote_path: Option<String>,
    ssh: SshPlan,
}

impl Target {
    fn of(config: &Config, name: &Name) -> Result<Target, String> {
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
            .ok_or_else(|| format!("no repository named `{name}`"))?;
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

fn on_a_drive(path: &Path, drive: &Name, mountpoint: &Path) -> String {
    format!(
        "repository {} lies under drive `{drive}`'s mountpoint {}: borg must never write a drive's copy; back up to the local repository and let ferry-sync copy it",
        path.display(),
        mountpoint.display()
    )
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
