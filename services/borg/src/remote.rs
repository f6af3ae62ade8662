//! Borg repositories over SSH: how ferry-borg runs ssh, and what an SSH
//! failure means.
//!
//! A laptop backing up to a NAS over SSH (seed 000) meets two kinds of
//! trouble that must not be confused. The network may simply not be there
//! (the server is off, the laptop is on a train, DNS or the link is not up
//! yet): that is no failure, the run is skipped and retried, and only a
//! server unreachable for longer than `[borg] unreachable-grace` is mailed.
//! A server that answers and refuses (a host key that is unknown or has
//! changed, the key not accepted, a path outside `--restrict-to-path`, a
//! lock, a full disk) is a failure at once, with a message that says what
//! to do. [`diagnose`] tells them apart from ssh's and borg's own words;
//! [`settle_unreachable`] applies the grace. Both are pure, and tested
//! without a server.
//!
//! ssh always runs with `BatchMode=yes` (no prompt can hang a job) and
//! `StrictHostKeyChecking=yes` put before anything the user wrote, so a
//! host key is never accepted silently: the user keeps the known_hosts file
//! ([`SshSetup::borg_rsh`]). `~` is the home of the user ferry-borg runs as
//! ([`service_home`]): HOME for a user service, the user database otherwise;
//! ssh's own files (config, keys, known_hosts) are looked up there too.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// ssh's options that ferry sets before the user's: they cannot be undone.
const FORCED: [&str; 2] = ["BatchMode=yes", "StrictHostKeyChecking=yes"];
/// ssh's default identities, in its order.
const DEFAULT_IDENTITIES: [&str; 4] = ["id_ed25519", "id_ecdsa", "id_rsa", "id_ed25519_sk"];
/// borg's msgid when `borg serve --restrict-to-path` refused a path.
const PATH_NOT_ALLOWED: &str = "PathNotAllowed";

/// What is wrong with the ssh command ferry was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SshCommandError {
    /// Quotes that do not close.
    #[error("ssh_command `{0}` cannot be split into words (an unclosed quote?)")]
    Unparsable(String),
    /// Not ssh: ferry's options would go to another program.
    #[error("ssh_command `{0}` must start with ssh (ferry-borg adds ssh options to it: BatchMode, strict host key checking, known_hosts)")]
    NotSsh(String),
}

/// Everything that decides how ssh is run for one repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshSetup {
    /// The user's own command (borgmatic's ssh_command), if any.
    pub command: Option<String>,
    /// The home `~` stands for.
    pub home: PathBuf,
    /// The known_hosts file; `None`: `~/.ssh/known_hosts`.
    pub known_hosts: Option<PathBuf>,
    /// The private key; `None`: ssh's defaults under `~/.ssh` and the agent.
    pub identity: Option<PathBuf>,
    /// ssh's ConnectTimeout.
    pub connect_timeout: Duration,
}

impl SshSetup {
    /// The known_hosts file the host key must be in.
    pub fn known_hosts(&self) -> PathBuf {
        self.known_hosts
            .clone()
            .unwrap_or_else(|| self.home.join(".ssh/known_hosts"))
    }

    /// BORG_RSH: `ssh`, ferry's forced options, the user's own words, then
    /// defaults the user did not set (known_hosts, timeouts, ssh's files
    /// under `~`). `exists` says which files are there (ssh's config and
    /// default keys are only named when they exist, as ssh does).
    pub fn borg_rsh(&self, exists: impl Fn(&Path) -> bool) -> Result<String, SshCommandError> {
        let words = match &self.command {
            Some(command) => {
                shlex::split(command).ok_or_else(|| SshCommandError::Unparsable(command.clone()))?
            }
            None => vec!["ssh".to_string()],
        };
        let Some((program, own)) = words.split_first() else {
            return Err(SshCommandError::NotSsh(String::new()));
        };
        if Path::new(program).file_name().and_then(|n| n.to_str()) != Some("ssh") {
            return Err(SshCommandError::NotSsh(
                self.command.clone().unwrap_or_default(),
            ));
        }
        let mut out = vec![program.clone()];
        for option in FORCED {
            out.extend(["-o".to_string(), option.to_string()]);
        }
        out.extend(own.iter().cloned());
        let sets = |name: &str| own_sets(own, name);
        let mut option = |text: String| out.extend(["-o".to_string(), text]);
        if !sets("UserKnownHostsFile") {
            option(format!(
                "UserKnownHostsFile={}",
                self.known_hosts().display()
            ));
        }
        if !sets("ConnectTimeout") {
            option(format!(
                "ConnectTimeout={}",
                self.connect_timeout.as_secs().max(1)
            ));
        }
        if !sets("ServerAliveInterval") {
            option("ServerAliveInterval=30".into());
            option("ServerAliveCountMax=4".into());
        }
        let identities: Vec<PathBuf> = match &self.identity {
            Some(key) => vec![key.clone()],
            None if own.iter().any(|w| w == "-i") || sets("IdentityFile") => Vec::new(),
            None => DEFAULT_IDENTITIES
                .iter()
                .map(|name| self.home.join(".ssh").join(name))
                .filter(|path| exists(path))
                .collect(),
        };
        for key in &identities {
            option(format!("IdentityFile={}", key.display()));
        }
        if self.identity.is_some() {
            option("IdentitiesOnly=yes".into());
        }
        let config = self.home.join(".ssh/config");
        if !own.iter().any(|w| w == "-F") && exists(&config) {
            out.extend(["-F".to_string(), config.display().to_string()]);
        }
        shlex::try_join(out.iter().map(String::as_str))
            .map_err(|_| SshCommandError::Unparsable(out.join(" ")))
    }
}

/// Whether the user's words set ssh option `name` (`-o Name=…`, `-oName …`).
fn own_sets(words: &[String], name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let names = |text: &str| {
        text.trim()
            .to_ascii_lowercase()
            .split(['=', ' '])
            .next()
            .is_some_and(|n| n == lower)
    };
    words
        .iter()
        .enumerate()
        .any(|(i, word)| match word.strip_prefix("-o") {
            Some("") => words.get(i + 1).is_some_and(|next| names(next)),
            Some(inline) => names(inline),
            None => false,
        })
}

/// Why a server could not be reached: no failure, a skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Nothing listens (the server is off or sshd is stopped).
    ConnectionRefused,
    /// No route, or the network is down.
    NoRoute,
    /// No answer within the connect timeout.
    TimedOut,
    /// The name does not resolve (DNS is not up, or offline).
    NameNotResolved,
    /// The network is not online (the precondition).
    NetworkOffline,
}

impl Unreachable {
    /// In a person's words.
    pub fn describe(self) -> &'static str {
        match self {
            Unreachable::ConnectionRefused => {
                "the connection was refused (the server or its sshd is not running)"
            }
            Unreachable::NoRoute => "there is no route to it (the network is down or not up yet)",
            Unreachable::TimedOut => "it did not answer in time",
            Unreachable::NameNotResolved => "its name does not resolve (DNS is not reachable)",
            Unreachable::NetworkOffline => "the network is not online",
        }
    }
}

/// A server that answered and refused: a failure, with what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The host key is not in known_hosts.
    HostKeyUnknown,
    /// The host key differs from the one in known_hosts.
    HostKeyChanged,
    /// The server did not accept the key.
    NotAuthorized,
    /// `borg serve --restrict-to-path` refused the repository path.
    PathNotAllowed(String),
}

/// What an SSH failure was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Diagnosis {
    /// The server could not be reached: skip, retry, mail after the grace.
    Unreachable(Unreachable),
    /// The server answered and refused: fail now.
    Refused(Refused),
}

/// Reads what borg relayed from ssh (its `Remote: …` lines) and borg's
/// error msgids; `None` when it was no SSH trouble (borg's own error).
pub fn diagnose(
    remote_lines: &[String],
    msgids: &[String],
    errors: &[String],
) -> Option<Diagnosis> {
    let has = |needle: &str| remote_lines.iter().any(|l| l.contains(needle));
    if has("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || has("has changed and you have requested strict checking")
    {
        return Some(Diagnosis::Refused(Refused::HostKeyChanged));
    }
    if has("host key is known for") || has("Host key verification failed") {
        return Some(Diagnosis::Refused(Refused::HostKeyUnknown));
    }
    if has("Permission denied (") {
        return Some(Diagnosis::Refused(Refused::NotAuthorized));
    }
    if msgids.iter().any(|m| m == PATH_NOT_ALLOWED) {
        let said = errors
            .iter()
            .find(|e| e.contains("not allowed"))
            .cloned()
            .unwrap_or_default();
        return Some(Diagnosis::Refused(Refused::PathNotAllowed(said)));
    }
    let unreachable = [
        ("Connection refused", Unreachable::ConnectionRefused),
        ("No route to host", Unreachable::NoRoute),
        ("Network is unreachable", Unreachable::NoRoute),
        ("Network is down", Unreachable::NoRoute),
        ("Connection timed out", Unreachable::TimedOut),
        ("Operation timed out", Unreachable::TimedOut),
        ("Could not resolve hostname", Unreachable::NameNotResolved),
        (
            "Temporary failure in name resolution",
            Unreachable::NameNotResolved,
        ),
        ("Name or service not known", Unreachable::NameNotResolved),
    ];
    unreachable
        .iter()
        .find(|(needle, _)| {
            remote_lines
                .iter()
                .any(|l| l.starts_with("ssh:") && l.contains(needle))
        })
        .map(|(_, why)| Diagnosis::Unreachable(*why))
}

/// The failure message of a refusal: what happened and the fix.
pub fn refusal_message(
    refused: &Refused,
    server: &str,
    known_hosts: &Path,
    borg_said: &str,
) -> String {
    let file = known_hosts.display();
    match refused {
        Refused::HostKeyChanged => format!(
            "the SSH host key of {server} has CHANGED since it was recorded in {file}: either the server was reinstalled or someone is intercepting the connection, so nothing was sent. Check the server's key fingerprint on the server itself (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub); if it is right, replace the old key: ssh-keygen -R '{server}' -f {file}, then add the new one (ssh-keyscan, or connect once with ssh -o UserKnownHostsFile={file})"
        ),
        Refused::HostKeyUnknown => format!(
            "the SSH host key of {server} is not in {file}, and ferry never accepts an unknown host key: check the server's fingerprint and add it, e.g. ssh-keyscan the server, compare with ssh-keygen -lf on the server, and append the line to {file}"
        ),
        Refused::NotAuthorized => format!(
            "{server} refused the login (Permission denied): the SSH key ferry-borg uses is not in the server's authorized_keys for that user, or the key is not readable by ferry-borg; ssh said: {borg_said}"
        ),
        Refused::PathNotAllowed(said) => format!(
            "the server refused the repository path: {said} (borg serve --restrict-to-path in the server's authorized_keys allows other paths): fix the repository path or the restriction on the server"
        ),
    }
}

/// How an unreachable run ends, given since when the server has been
/// unreachable (`since`, unix seconds; `None`: it was reachable until now).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Within the grace: skipped, retried, not mailed.
    Skip {
        /// Why, with how long it has been unreachable.
        reason: String,
    },
    /// Past the grace: a failure (mailed).
    Fail {
        /// Why.
        message: String,
    },
}

/// Applies `[borg] unreachable-grace` to a run that could not reach its
/// server at `now`; returns the verdict and the `since` to remember.
pub fn settle_unreachable(
    why: &str,
    since: Option<u64>,
    now: u64,
    grace: Duration,
) -> (Settled, u64) {
    let since = since.unwrap_or(now).min(now);
    let waited = now - since;
    if waited >= grace.as_secs() {
        let message = format!(
            "{why}; unreachable for {} now, longer than unreachable-grace ({})",
            span(waited),
            span(grace.as_secs())
        );
        return (Settled::Fail { message }, since);
    }
    let reason = if waited == 0 {
        format!(
            "{why}; skipped, and retried (a failure only after {} unreachable)",
            span(grace.as_secs())
        )
    } else {
        format!(
            "{why}; unreachable for {} (a failure only after {})",
            span(waited),
            span(grace.as_secs())
        )
    };
    (Settled::Skip { reason }, since)
}

/// `90061` → `1d 1h 1m 1s`, leaving out zero parts.
fn span(seconds: u64) -> String {
    if seconds == 0 {
        return "0s".into();
    }
    let parts = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")];
    let mut rest = seconds;
    let mut out = Vec::new();
    for (size, unit) in parts {
        if rest >= size {
            out.push(format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    out.join(" ")
}

/// Runs ssh once by itself, as borg would (`rsh`, the same options) but
/// with no borg behind it, and returns what it wrote on stderr: its own
/// words about why it could not connect or log in. stdin is empty, so a
/// `borg serve` forced on the key by the server ends at once.
pub async fn probe(
    rsh: &str,
    url: &ferry_config::SshUrl,
    connect_timeout: Duration,
) -> Vec<String> {
    let Some(words) = shlex::split(rsh) else {
        return Vec::new();
    };
    let Some((program, options)) = words.split_first() else {
        return Vec::new();
    };
    let mut command = tokio::process::Command::new(program);
    command.args(options);
    if let Some(port) = url.port() {
        command.arg("-p").arg(port.to_string());
    }
    command
        .arg("-T")
        .arg(format!("{}@{}", url.user(), url.host()))
        .arg("true")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let bound = connect_timeout + Duration::from_secs(10);
    match tokio::time::timeout(bound, command.output()).await {
        Ok(Ok(output)) => String::from_utf8_lossy(&output.stderr)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect(),
        Ok(Err(e)) => vec![format!("cannot run ssh: {e}")],
        Err(_) => vec!["ssh: connect to host: Connection timed out".to_string()],
    }
}

/// The home `~` stands for: HOME when it is an absolute path (a user
/// service, or a test's home), else the user database's home of the
/// effective user (a system service has no HOME).
pub fn service_home() -> PathBuf {
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
        if home.is_absolute() {
            return home;
        }
    }
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    crate::tilde::home_of_uid(uid)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(command: Option<&str>) -> SshSetup {
        SshSetup {
            command: command.map(str::to_string),
            home: PathBuf::from("/home/david"),
            known_hosts: None,
            identity: None,
            connect_timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn ferrys_options_come_first_and_defaults_after_the_users() {
        let rsh = setup(None)
            .borg_rsh(|p| p.ends_with("id_ed25519"))
            .expect("rsh");
        assert_eq!(
            shlex::split(&rsh).expect("split").join(" "),
            "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile=/home/david/.ssh/known_hosts -o ConnectTimeout=30 -o ServerAliveInterval=30 -o ServerAliveCountMax=4 -o IdentityFile=/home/david/.ssh/id_ed25519"
        );
        let own = setup(Some(
            "ssh -i '/keys/my key' -p 2222 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/k",
        ))
        .borg_rsh(|_| true)
        .expect("rsh");
        let words = shlex::split(&own).expect("split");
        let own = words.join(" ");
        assert_eq!(
            &words[..5],
            [
                "ssh",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes"
            ]
        );
        assert!(words.contains(&"/keys/my key".to_string()), "{own}");
        assert!(
            !own.contains("UserKnownHostsFile=/home"),
            "the user's file wins: {own}"
        );
        assert!(!own.contains("id_ed25519"), "the user's -i wins: {own}");
        assert!(own.ends_with("-F /home/david/.ssh/config"), "{own}");
    }

    #[test]
    fn a_configured_key_and_known_hosts_are_used_alone() {
        let mut s = setup(None);
        s.identity = Some(PathBuf::from("/etc/ferry/id_offsite"));
        s.known_hosts = Some(PathBuf::from("/etc/ferry/known hosts"));
        let rsh = shlex::split(&s.borg_rsh(|_| false).expect("rsh"))
            .expect("split")
            .join(" ");
        assert!(
            rsh.contains("UserKnownHostsFile=/etc/ferry/known hosts"),
            "{rsh}"
        );
        assert!(
            rsh.contains("IdentityFile=/etc/ferry/id_offsite -o IdentitiesOnly=yes"),
            "{rsh}"
        );
    }

    #[test]
    fn only_ssh_is_accepted() {
        assert!(matches!(
            setup(Some("sshpass -p x ssh")).borg_rsh(|_| false),
            Err(SshCommandError::NotSsh(_))
        ));
        assert!(matches!(
            setup(Some("ssh -i 'open")).borg_rsh(|_| false),
            Err(SshCommandError::Unparsable(_))
        ));
        assert!(setup(Some("/usr/bin/ssh -oConnectTimeout=5"))
            .borg_rsh(|_| false)
            .expect("path")
            .contains("ConnectTimeout=5"));
    }

    fn lines(text: &[&str]) -> Vec<String> {
        text.iter().map(|s| s.to_string()).collect()
    }

    /// The lines are what borg 1.2 with OpenSSH 9.2 relayed in each case
    /// (recorded against the test sshd).
    #[test]
    fn unreachable_and_refused_are_told_apart() {
        let closed = lines(&["ConnectionClosedWithHint"]);
        let cases = [
            (vec!["ssh: connect to host 127.0.0.1 port 2298: Connection refused"], Some(Diagnosis::Unreachable(Unreachable::ConnectionRefused))),
            (vec!["ssh: Could not resolve hostname no-such-host.invalid: Name or service not known"], Some(Diagnosis::Unreachable(Unreachable::NameNotResolved))),
            (vec!["ssh: connect to host 10.0.0.9 port 22: No route to host"], Some(Diagnosis::Unreachable(Unreachable::NoRoute))),
            (vec!["ssh: connect to host 10.0.0.9 port 22: Connection timed out"], Some(Diagnosis::Unreachable(Unreachable::TimedOut))),
            (vec!["No ED25519 host key is known for [127.0.0.1]:2299 and you have requested strict checking.", "Host key verification failed."], Some(Diagnosis::Refused(Refused::HostKeyUnknown))),
            (vec!["@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @", "Host key for [127.0.0.1]:2299 has changed and you have requested strict checking.", "Host key verification failed."], Some(Diagnosis::Refused(Refused::HostKeyChanged))),
            (vec!["root@127.0.0.1: Permission denied (publickey)."], Some(Diagnosis::Refused(Refused::NotAuthorized))),
            (vec![], None),
        ];
        for (remote, expected) in cases {
            assert_eq!(
                diagnose(&lines(&remote), &closed, &[]),
                expected,
                "{remote:?}"
            );
        }
        let refused = diagnose(
            &[],
            &lines(&["PathNotAllowed"]),
            &lines(&["Repository path not allowed: /srv/other"]),
        );
        assert_eq!(
            refused,
            Some(Diagnosis::Refused(Refused::PathNotAllowed(
                "Repository path not allowed: /srv/other".into()
            )))
        );
        // A server's own words quoting "Connection refused" are not ssh's.
        assert_eq!(
            diagnose(&lines(&["borg: Connection refused by hook"]), &[], &[]),
            None
        );
    }

    #[test]
    fn the_grace_decides_skip_or_fail() {
        let day = Duration::from_secs(86_400);
        let (first, since) = settle_unreachable("x", None, 1000, day);
        assert!(matches!(first, Settled::Skip { .. }), "{first:?}");
        assert_eq!(since, 1000);
        let (within, since) = settle_unreachable("x", Some(1000), 1000 + 3600, day);
        assert!(
            matches!(&within, Settled::Skip { reason } if reason.contains("1h")),
            "{within:?}"
        );
        assert_eq!(since, 1000);
        let (past, _) = settle_unreachable("x", Some(1000), 1000 + 86_400, day);
        assert!(
            matches!(&past, Settled::Fail { message } if message.contains("1d")),
            "{past:?}"
        );
        let (no_grace, _) = settle_unreachable("x", None, 5, Duration::ZERO);
        assert!(
            matches!(no_grace, Settled::Fail { .. }),
            "a grace of 0 mails at once"
        );
    }

    #[test]
    fn home_is_home_when_absolute() {
        // The test's own HOME (nextest passes it) or the user database.
        let home = service_home();
        assert!(home.is_absolute());
    }
}
