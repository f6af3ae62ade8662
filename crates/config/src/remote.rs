//! `[remote-repositories.<name>]`: borg repositories reached over SSH
//! (`user@host:path` or `ssh://user@host:port/path`), with the SSH settings
//! in `[borg]` that apply to them. Owned by the SSH issue (17).
//!
//! They are a table of their own, not a kind of `[repositories.<name>]`:
//! those are local directories that ferry-sync copies onto drives and that
//! every service may look at on disk; a remote repository is only ever
//! written by borg over SSH (`borg serve` on the server), so a drive can
//! never list one. A profile names either kind with `repository = "<name>"`;
//! the names of both tables are one namespace.
//!
//! Paths here may start with `~/`: `~` is the home of the user ferry-borg
//! runs as (HOME of a user service, else the user database), resolved when
//! a job runs, so one file works for a system and a user ferry-borg.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{AbsolutePath, Config, Name};

/// `[remote-repositories.<name>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RemoteRepository {
    /// `user@host:path` (scp style, path relative to the login's home) or
    /// `ssh://user@host[:port]/path`.
    pub url: SshUrl,
    /// A file holding the passphrase (mode 0600).
    pub passphrase_file: Option<HomePath>,
    /// A command that prints the passphrase (borg's BORG_PASSCOMMAND).
    pub passcommand: Option<String>,
    /// The SSH private key; default ssh's own (`~/.ssh/id_*`) and the agent.
    pub identity_file: Option<HomePath>,
    /// The known_hosts file the server's host key must be in; default
    /// `[borg] ssh-known-hosts`.
    pub known_hosts: Option<HomePath>,
    /// borg on the server when it is not `borg` on the login's PATH
    /// (`--remote-path`). A `command="borg serve …"` in the server's
    /// authorized_keys decides instead, when there is one.
    pub remote_path: Option<String>,
}

/// Why an SSH repository URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SshUrlError {
    /// Neither form.
    #[error("`{0}` is not an SSH repository: write user@host:path or ssh://user@host:port/path (a local repository goes in [repositories.<name>] as `path`)")]
    NotSsh(String),
    /// No user before `@`.
    #[error("`{0}` names no user: write user@host… (ferry-borg never guesses the login)")]
    NoUser(String),
    /// Empty or odd host.
    #[error("`{0}` has no valid host name")]
    BadHost(String),
    /// A port that is not 1 to 65535.
    #[error("`{0}` has a port that is not a number from 1 to 65535")]
    BadPort(String),
    /// No repository path.
    #[error("`{0}` names no repository path on the server")]
    NoPath(String),
    /// Whitespace, quotes or control characters: they would reach a shell on the server.
    #[error("`{0}` contains spaces, quotes or control characters; borg would pass them to a shell on the server")]
    BadCharacter(String),
}

/// An SSH repository location, checked; kept as written (borg reads it).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct SshUrl {
    text: String,
    user: String,
    host: String,
    port: Option<u16>,
    path: String,
}

impl SshUrl {
    /// Parses `user@host:path` or `ssh://user@host[:port]/path`.
    pub fn parse(text: &str) -> Result<SshUrl, SshUrlError> {
        let owned = || text.to_string();
        if text
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "'\"`\\$;".contains(c))
        {
            return Err(SshUrlError::BadCharacter(owned()));
        }
        let (authority, path, port) = if let Some(rest) = text.strip_prefix("ssh://") {
            let slash = rest.find('/').ok_or_else(|| SshUrlError::NoPath(owned()))?;
            let (authority, path) = rest.split_at(slash);
            let (authority, port) = match authority.rsplit_once(':') {
                Some((a, p)) if !authority.ends_with(']') => {
                    let port = p
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| SshUrlError::BadPort(owned()))?;
                    (a, Some(port))
                }
                _ => (authority, None),
            };
            (authority, path.to_string(), port)
        } else {
            match (text.find(':'), text.find('/')) {
                (Some(colon), slash) if slash.is_none_or(|s| colon < s) => {
                    (&text[..colon], text[colon + 1..].to_string(), None)
                }
                _ => return Err(SshUrlError::NotSsh(owned())),
            }
        };
        let (user, host) = authority
            .split_once('@')
            .ok_or_else(|| SshUrlError::NoUser(owned()))?;
        if user.is_empty() {
            return Err(SshUrlError::NoUser(owned()));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty()
            || host.starts_with('-')
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_:%".contains(c))
        {
            return Err(SshUrlError::BadHost(owned()));
        }
        if path.is_empty() || path == "/" {
            return Err(SshUrlError::NoPath(owned()));
        }
        Ok(SshUrl {
            text: text.to_string(),
            user: user.to_string(),
            host: host.to_string(),
            port,
            path,
        })
    }

    /// As written, for borg.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The login.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The server.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, when not ssh's default.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The repository path on the server.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// How the host appears in known_hosts: `host`, or `[host]:port`.
    pub fn known_hosts_name(&self) -> String {
        match self.port {
            Some(port) if port != 22 => format!("[{}]:{port}", self.host),
            _ => self.host.clone(),
        }
    }
}

impl TryFrom<String> for SshUrl {
    type Error = SshUrlError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        SshUrl::parse(&value)
    }
}

impl fmt::Display for SshUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A path written from `/` or from `~/` (the home of the user ferry-borg
/// runs as, resolved at run time by [`HomePath::resolve`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct HomePath(String);

/// A path that is neither absolute nor under `~/`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is neither an absolute path nor one under ~/: write it from / or ~/")]
pub struct HomePathError(String);

impl TryFrom<String> for HomePath {
    type Error = HomePathError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        if value.starts_with('/') || (value.starts_with("~/") && value.len() > 2) {
            Ok(HomePath(value))
        } else {
            Err(HomePathError(value))
        }
    }
}

impl HomePath {
    /// The path, `~` replaced by `home`.
    pub fn resolve(&self, home: &Path) -> PathBuf {
        match self.0.strip_prefix("~/") {
            Some(rest) => home.join(rest),
            None => PathBuf::from(&self.0),
        }
    }

    /// As written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<AbsolutePath> for HomePath {
    fn from(path: AbsolutePath) -> Self {
        HomePath(path.to_string_lossy().into_owned())
    }
}

/// Checks that need the whole configuration.
pub(crate) fn check(config: &Config) -> Result<(), (Vec<String>, String)> {
    for (name, remote) in &config.remote_repositories {
        let key = |k: &str| {
            vec![
                "remote-repositories".to_string(),
                name.to_string(),
                k.to_string(),
            ]
        };
        if config.repositories.contains_key(name) {
            return Err((
                key("url"),
                format!("`{name}` is also a [repositories.{name}]: a profile's `repository` names one of them, so give them different names"),
            ));
        }
        if remote.passphrase_file.is_some() && remote.passcommand.is_some() {
            return Err((
                key("passcommand"),
                "give either passphrase-file or passcommand, not both".into(),
            ));
        }
        if let Some(path) = &remote.remote_path {
            if path.trim().is_empty() || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err((
                    key("remote-path"),
                    "must be one word: the borg program on the server, e.g. /usr/local/bin/borg"
                        .into(),
                ));
            }
        }
    }
    for (drive_name, drive) in &config.drives {
        if let Some(remote) = drive
            .repositories
            .iter()
            .find(|r| config.remote_repositories.contains_key(*r))
        {
            return Err((
                vec![
                    "drives".into(),
                    drive_name.to_string(),
                    "repositories".into(),
                ],
                format!("`{remote}` is a remote repository: only a local repository can be copied onto a drive (run ferry on the server to rotate its drives)"),
            ));
        }
    }
    Ok(())
}

/// Whether `name` is a remote repository of `config`.
pub fn is_remote(config: &Config, name: &Name) -> bool {
    config.remote_repositories.contains_key(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_parse() {
        let scp = SshUrl::parse("david@myserver:backup_dir").expect("scp");
        assert_eq!(
            (scp.user(), scp.host(), scp.port(), scp.path()),
            ("david", "myserver", None, "backup_dir")
        );
        assert_eq!(scp.known_hosts_name(), "myserver");
        let url = SshUrl::parse("ssh://borg@127.0.0.1:2222/srv/borg/laptop").expect("url");
        assert_eq!(
            (url.user(), url.host(), url.port(), url.path()),
            ("borg", "127.0.0.1", Some(2222), "/srv/borg/laptop")
        );
        assert_eq!(url.known_hosts_name(), "[127.0.0.1]:2222");
        let relative = SshUrl::parse("ssh://u@nas/./repo").expect("./");
        assert_eq!(relative.path(), "/./repo");
        let v6 = SshUrl::parse("ssh://u@[::1]:22/r").expect("v6");
        assert_eq!((v6.host(), v6.port()), ("::1", Some(22)));
        assert_eq!(v6.known_hosts_name(), "::1");
    }

    #[test]
    fn mistakes_are_named() {
        type Expected = fn(String) -> SshUrlError;
        let cases: [(&str, Expected); 8] = [
            ("/srv/borg/nas", SshUrlError::NotSsh),
            ("myserver:backup_dir", SshUrlError::NoUser),
            ("ssh://host/r", SshUrlError::NoUser),
            ("ssh://u@host:0/r", SshUrlError::BadPort),
            ("ssh://u@host:99999/r", SshUrlError::BadPort),
            ("ssh://u@host", SshUrlError::NoPath),
            ("u@-oProxyCommand=x:r", SshUrlError::BadHost),
            ("u@host:dir; rm -rf", SshUrlError::BadCharacter),
        ];
        for (text, expected) in cases {
            assert_eq!(
                SshUrl::parse(text),
                Err(expected(text.to_string())),
                "{text}"
            );
        }
    }

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("ferry.toml")).map_err(|e| e.to_string())
    }

    const REMOTE: &str = "[remote-repositories.offsite]\nurl = \"ssh://david@nas:2222/srv/borg/laptop\"\npassphrase-file = \"~/.config/ferry/offsite.pass\"\nidentity-file = \"~/.ssh/id_borg\"\nremote-path = \"/usr/local/bin/borg\"\n\n";

    #[test]
    fn a_profile_backs_up_to_a_remote_repository() {
        let config = parse(&format!(
            "{REMOTE}[borg]\nssh-known-hosts = \"~/.ssh/known_hosts\"\nunreachable-grace = \"1 day\"\n\n[profiles.laptop]\nrepository = \"offsite\"\nsources = [\"/home\"]\n[profiles.laptop.preconditions]\nnetwork-online = true\n"
        ))
        .expect("valid");
        let offsite = &config.remote_repositories["offsite"];
        assert_eq!(offsite.url.port(), Some(2222));
        assert_eq!(config.borg.unreachable_grace.as_secs(), 86_400);
        assert!(config.profiles["laptop"].preconditions.network_online);
        assert!(is_remote(&config, &Name::new("offsite").expect("name")));
    }

    #[test]
    fn remote_mistakes_name_their_key() {
        let cases = [
            (format!("{REMOTE}[repositories.offsite]\npath = \"/srv/r\"\n"), "remote-repositories.offsite.url", "different names"),
            (format!("{REMOTE}[drives.a]\nuuid = \"1b2c3d4e-0000-0000-0000-000000000000\"\nrepositories = [\"offsite\"]\n"), "drives.a.repositories", "only a local repository"),
            ("[remote-repositories.x]\nurl = \"/srv/borg\"\n".to_string(), "remote-repositories.x.url", "not an SSH repository"),
            ("[remote-repositories.x]\nurl = \"u@h:r\"\nidentity-file = \"id\"\n".to_string(), "remote-repositories.x.identity-file", "from / or ~/"),
            ("[remote-repositories.x]\nurl = \"u@h:r\"\nremote-path = \"borg --x\"\n".to_string(), "remote-repositories.x.remote-path", "one word"),
        ];
        for (text, key, reason) in cases {
            let err = parse(&text).unwrap_err();
            assert!(err.contains(key) && err.contains(reason), "{text}: {err}");
        }
    }

    #[test]
    fn home_paths() {
        let home = Path::new("/home/david");
        let key = HomePath::try_from("~/.ssh/id_borg".to_string()).expect("~/");
        assert_eq!(key.resolve(home), Path::new("/home/david/.ssh/id_borg"));
        let abs = HomePath::try_from("/etc/ferry/id".to_string()).expect("/");
        assert_eq!(abs.resolve(home), Path::new("/etc/ferry/id"));
        for bad in ["~", "~/", "rel/x", "~david/x"] {
            assert!(HomePath::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }
}
