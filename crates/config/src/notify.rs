//! `[mail]` and `[notify]`: how ferry-notifier reaches a person, and what it
//! tells them. Owned by the notifier's issue.
//!
//! `[mail]` is the transport (SMTP or a sendmail binary, sender, recipients,
//! timeouts, retry pacing); without it nothing is mailed. `[notify]` says
//! what is worth a mail besides failures (success summaries, staleness) and
//! how quiet to be (grouping of repeats, a limit per hour).

use std::net::IpAddr;

use serde::Deserialize;

use crate::{AbsolutePath, Config};

/// How mail leaves the machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MailTransport {
    /// Talk SMTP to `smtp-host`.
    #[default]
    Smtp,
    /// Hand the message to a sendmail-compatible binary on stdin.
    Sendmail,
}

/// How the SMTP connection is protected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SmtpSecurity {
    /// Plain connection upgraded with STARTTLS (port 587 by default); the
    /// upgrade is required.
    #[default]
    Starttls,
    /// TLS from the first byte (port 465 by default).
    Tls,
    /// No encryption (port 25 by default); only to a loopback host.
    None,
}

/// `[mail]`: the transport.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Mail {
    /// smtp (default) or sendmail.
    #[serde(default)]
    pub transport: MailTransport,
    /// The sender address, for example `ferry@nas.example.org`.
    pub from: String,
    /// Who is told, at least one address.
    pub to: Vec<String>,
    /// The SMTP server. Default `localhost`.
    #[serde(default = "default_smtp_host")]
    pub smtp_host: String,
    /// The SMTP port; default 587 for starttls, 465 for tls, 25 for none.
    pub smtp_port: Option<u16>,
    /// starttls (default), tls or none (loopback hosts only).
    #[serde(default)]
    pub security: SmtpSecurity,
    /// The SMTP user name, if the server wants a login.
    pub username: Option<String>,
    /// A file holding the SMTP password (mode 0600); needs `username`.
    pub password_file: Option<AbsolutePath>,
    /// The name of a systemd credential holding the SMTP password, read from
    /// `$CREDENTIALS_DIRECTORY` (the installed unit loads
    /// `ferry-smtp-password` from /etc/credstore); needs `username`, not
    /// with `password-file`.
    pub password_credential: Option<String>,
    /// The sendmail-compatible binary for `transport = "sendmail"`.
    #[serde(default = "default_sendmail")]
    pub sendmail: AbsolutePath,
    /// Connect and per-command timeout, 10 to 30 seconds. Default 20.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// The first retry after a temporary failure. Default 60; it doubles
    /// up to `retry-max-seconds`.
    #[serde(default = "default_retry_min")]
    pub retry_min_seconds: u64,
    /// The longest wait between retries. Default 3600.
    #[serde(default = "default_retry_max")]
    pub retry_max_seconds: u64,
    /// Put in front of every subject. Default `[ferry]`.
    #[serde(default = "default_subject_prefix")]
    pub subject_prefix: String,
}

impl Mail {
    /// The sendmail binary when `transport = "sendmail"`, else None (SMTP).
    pub fn sendmail_binary(&self) -> Option<&AbsolutePath> {
        (self.transport == MailTransport::Sendmail).then_some(&self.sendmail)
    }

    /// TLS from the first byte (`security = "tls"`).
    pub fn implicit_tls(&self) -> bool {
        self.security == SmtpSecurity::Tls
    }

    /// A required STARTTLS upgrade (`security = "starttls"`).
    pub fn starttls(&self) -> bool {
        self.security == SmtpSecurity::Starttls
    }

    /// The SMTP port in effect.
    pub fn port(&self) -> u16 {
        self.smtp_port.unwrap_or(match self.security {
            SmtpSecurity::Starttls => 587,
            SmtpSecurity::Tls => 465,
            SmtpSecurity::None => 25,
        })
    }
}

/// `[notify]`: what is mailed and when. Failures are always mailed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NotifySettings {
    /// Mail "offsite-a is safe to remove: …" when a synced drive is closed.
    #[serde(default)]
    pub sync_success: bool,
    /// Mail a summary after every successful backup.
    #[serde(default)]
    pub backup_success: bool,
    /// Mail when a drive's last successful sync is older than this many
    /// days, at most once a day per drive; 0 turns it off. Default 30.
    #[serde(default = "default_drive_stale_days")]
    pub drive_stale_days: u32,
    /// Mail when a backup profile has had no success this many hours after
    /// it was due, at most once a day per profile; 0 turns it off. Default 24.
    #[serde(default = "default_profile_grace_hours")]
    pub profile_grace_hours: u32,
    /// Identical failures within this many minutes of the first are
    /// counted into one follow-up mail instead of one mail each. Default 60.
    #[serde(default = "default_repeat_window")]
    pub repeat_window_minutes: u32,
    /// At most this many mails per hour; the rest wait and go out together
    /// as one digest. Default 10.
    #[serde(default = "default_max_per_hour")]
    pub max_per_hour: u32,
}

impl Default for NotifySettings {
    fn default() -> Self {
        NotifySettings {
            sync_success: false,
            backup_success: false,
            drive_stale_days: default_drive_stale_days(),
            profile_grace_hours: default_profile_grace_hours(),
            repeat_window_minutes: default_repeat_window(),
            max_per_hour: default_max_per_hour(),
        }
    }
}

fn default_smtp_host() -> String {
    "localhost".into()
}
fn default_sendmail() -> AbsolutePath {
    AbsolutePath::from_static("/usr/sbin/sendmail")
}
fn default_timeout() -> u64 {
    20
}
fn default_retry_min() -> u64 {
    60
}
fn default_retry_max() -> u64 {
    3600
}
fn default_subject_prefix() -> String {
    "[ferry]".into()
}
fn default_drive_stale_days() -> u32 {
    30
}
fn default_profile_grace_hours() -> u32 {
    24
}
fn default_repeat_window() -> u32 {
    60
}
fn default_max_per_hour() -> u32 {
    10
}

/// Whether `host` is this machine: `localhost` or a loopback address.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<IpAddr>()
            .is_ok_and(|ip: IpAddr| ip.is_loopback())
}

/// A systemd credential name: letters, digits and `-_.@`, not `.` or `..`.
pub(crate) fn check_credential_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
}

/// A plausible mail address: `local@domain`, printable ASCII, no spaces,
/// angle brackets, commas or quotes. It goes into headers, so it is strict.
fn check_address(address: &str) -> Result<(), String> {
    let plain = address
        .chars()
        .all(|c| c.is_ascii_graphic() && !"<>,;\"()[]\\".contains(c));
    match address.split_once('@') {
        Some((local, domain))
            if plain && !local.is_empty() && !domain.is_empty() && !domain.contains('@') =>
        {
            Ok(())
        }
        _ => Err(format!(
            "`{}` is not a mail address: write it as user@example.org, without a display name",
            address.escape_debug()
        )),
    }
}

/// Checks that need the whole configuration.
pub(crate) fn check(config: &Config) -> Result<(), (Vec<String>, String)> {
    if config.notify.max_per_hour == 0 {
        return Err((
            vec!["notify".into(), "max-per-hour".into()],
            "must be at least 1 (failures are always mailed)".into(),
        ));
    }
    let Some(mail) = &config.mail else {
        return Ok(());
    };
    let key = |k: &str| vec!["mail".to_string(), k.to_string()];
    check_address(&mail.from).map_err(|e| (key("from"), e))?;
    if mail.to.is_empty() {
        return Err((
            key("to"),
            "name at least one recipient, for example to = [\"root@localhost\"]".into(),
        ));
    }
    for address in &mail.to {
        check_address(address).map_err(|e| (key("to"), e))?;
    }
    if mail.transport == MailTransport::Smtp {
        if mail.smtp_host.is_empty()
            || !mail
                .smtp_host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c))
        {
            return Err((
                key("smtp-host"),
                "write a host name or IP address, for example smtp.example.org".into(),
            ));
        }
        if mail.security == SmtpSecurity::None && !is_loopback_host(&mail.smtp_host) {
            return Err((
                key("security"),
                format!(
                    "security = \"none\" sends mail unencrypted and is only allowed to localhost; \
                     use \"starttls\" or \"tls\" for {}",
                    mail.smtp_host
                ),
            ));
        }
    }
    if mail.password_file.is_some() && mail.username.is_none() {
        return Err((
            key("password-file"),
            "a password needs a user name: add username = \"…\"".into(),
        ));
    }
    if let Some(name) = &mail.password_credential {
        if mail.password_file.is_some() {
            return Err((
                key("password-credential"),
                "give the password either as password-file or as password-credential, not both"
                    .into(),
            ));
        }
        if mail.username.is_none() {
            return Err((
                key("password-credential"),
                "a password needs a user name: add username = \"…\"".into(),
            ));
        }
        if !check_credential_name(name) {
            return Err((
                key("password-credential"),
                "a credential name is letters, digits and - _ . @, for example \"ferry-smtp-password\""
                    .into(),
            ));
        }
    }
    if !(10..=30).contains(&mail.timeout_seconds) {
        return Err((
            key("timeout-seconds"),
            "must be from 10 to 30 seconds".into(),
        ));
    }
    if mail.retry_min_seconds == 0 {
        return Err((key("retry-min-seconds"), "must be at least 1".into()));
    }
    if mail.retry_max_seconds < mail.retry_min_seconds {
        return Err((
            key("retry-max-seconds"),
            "must not be less than retry-min-seconds".into(),
        ));
    }
    if mail.subject_prefix.chars().any(char::is_control) || mail.subject_prefix.len() > 64 {
        return Err((
            key("subject-prefix"),
            "must be one line of at most 64 characters".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in ["localhost", "127.0.0.1", "::1", "[::1]", "127.1.2.3"] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in ["smtp.example.org", "10.0.0.1", "localhost.example.org"] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, std::path::Path::new("t")).map_err(|e| e.to_string())
    }

    const MAIL: &str = "[mail]\nfrom = \"ferry@nas\"\nto = [\"me@example.org\"]\n";

    #[test]
    fn defaults() {
        let config = parse(MAIL).expect("minimal mail");
        let mail = config.mail.expect("mail");
        assert!(mail.starttls() && !mail.implicit_tls());
        assert_eq!(mail.port(), 587);
        assert_eq!(mail.smtp_host, "localhost");
        assert_eq!(mail.timeout_seconds, 20);
        assert!(mail.sendmail_binary().is_none());
        assert_eq!(config.notify.drive_stale_days, 30);
        assert_eq!(config.notify.max_per_hour, 10);
        assert!(!config.notify.sync_success);
        let tls = parse(&format!("{MAIL}security = \"tls\"\n")).expect("tls");
        assert_eq!(tls.mail.expect("mail").port(), 465);
        let sendmail = parse(&format!("{MAIL}transport = \"sendmail\"\n")).expect("sendmail");
        assert_eq!(
            sendmail
                .mail
                .expect("mail")
                .sendmail_binary()
                .map(|p| p.to_path_buf()),
            Some(std::path::PathBuf::from("/usr/sbin/sendmail"))
        );
    }

    #[test]
    fn mistakes_name_the_key_and_what_to_do() {
        for (extra, key, says) in [
            (
                "security = \"none\"\nsmtp-host = \"mail.example.org\"\n",
                "mail.security",
                "only allowed to localhost",
            ),
            (
                "password-file = \"/etc/ferry/pw\"\n",
                "mail.password-file",
                "username",
            ),
            (
                "password-credential = \"ferry-smtp-password\"\n",
                "mail.password-credential",
                "username",
            ),
            (
                "username = \"u\"\npassword-credential = \"../pw\"\n",
                "mail.password-credential",
                "credential name",
            ),
            (
                "username = \"u\"\npassword-file = \"/etc/ferry/pw\"\npassword-credential = \"pw\"\n",
                "mail.password-credential",
                "not both",
            ),
            ("timeout-seconds = 5\n", "mail.timeout-seconds", "10 to 30"),
            (
                "retry-min-seconds = 10\nretry-max-seconds = 5\n",
                "mail.retry-max-seconds",
                "not be less",
            ),
            ("smtp-host = \"a b\"\n", "mail.smtp-host", "host name"),
            (
                "subject-prefix = \"x\\ny\"\n",
                "mail.subject-prefix",
                "one line",
            ),
            ("transport = \"pigeon\"\n", "mail.transport", "pigeon"),
        ] {
            let err = parse(&format!("{MAIL}{extra}")).expect_err(extra);
            assert!(err.contains(key) && err.contains(says), "{extra:?}: {err}");
        }
        let err = parse("[mail]\nfrom = \"ferry@nas\"\nto = []\n").expect_err("no recipient");
        assert!(
            err.contains("mail.to") && err.contains("at least one"),
            "{err}"
        );
        let err =
            parse("[mail]\nfrom = \"Ferry <f@nas>\"\nto = [\"a@b\"]\n").expect_err("display name");
        assert!(err.contains("mail.from"), "{err}");
        let err = parse("[notify]\nmax-per-hour = 0\n").expect_err("zero limit");
        assert!(err.contains("notify.max-per-hour"), "{err}");
        assert!(parse("[notify]\nsync-success = true\ndrive-stale-days = 0\n").is_ok());
        assert!(parse(&format!(
            "{MAIL}security = \"none\"\nsmtp-host = \"127.0.0.1\"\n"
        ))
        .is_ok());
    }

    #[test]
    fn addresses() {
        assert!(check_address("root@localhost").is_ok());
        for bad in [
            "root",
            "@x",
            "a@",
            "A <a@b>",
            "a@b,c@d",
            "a@b\r\nBcc: x@y",
            "a b@c",
        ] {
            assert!(check_address(bad).is_err(), "{bad:?}");
        }
    }
}
