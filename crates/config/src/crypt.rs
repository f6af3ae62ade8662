//! `[crypt]`: how ferry-crypt opens and closes drives, and where enrolment
//! puts new key files. Owned by the crypt manager's issue.

use serde::Deserialize;

use crate::{AbsolutePath, Config};

/// `[crypt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CryptSettings {
    /// Where `ferry-crypt enroll` writes new key files and LUKS header
    /// backups, and where each drive's identity token (`<drive>.token`) lives.
    #[serde(default = "default_key_directory")]
    pub key_directory: AbsolutePath,
    /// Seconds a busy filesystem is retried before closing fails (the
    /// processes holding it are named in the failure). Default 30.
    #[serde(default = "default_close_timeout")]
    pub close_timeout: u64,
    /// Seconds one cryptsetup, mount or umount run may take before it is
    /// killed and the stage fails. Default 120.
    #[serde(default = "default_command_timeout")]
    pub command_timeout: u64,
    /// smartmontools' `smartctl`, run with `--json` on every attach before
    /// the drive is opened (see `health` in `[drives.<name>]`). When it is
    /// not installed the check is skipped and recorded as unavailable.
    /// Default /usr/sbin/smartctl.
    #[serde(default = "default_smartctl")]
    pub smartctl: AbsolutePath,
}

/// What a failing SMART health does to a drive (`health` in
/// `[drives.<name>]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthPolicy {
    /// Open and sync anyway, and say so: a mail, the ledger, the LED's
    /// reason (DriveFailed is not sent; the warning is in Drives' message).
    #[default]
    Warn,
    /// Refuse to open the drive: DriveFailed at stage `health`.
    Refuse,
    /// Do not run smartctl for this drive.
    Off,
}

fn default_smartctl() -> AbsolutePath {
    AbsolutePath::from_static("/usr/sbin/smartctl")
}

fn default_key_directory() -> AbsolutePath {
    AbsolutePath::from_static("/etc/ferry/keys")
}

fn default_close_timeout() -> u64 {
    30
}

fn default_command_timeout() -> u64 {
    120
}

impl Default for CryptSettings {
    fn default() -> Self {
        CryptSettings {
            key_directory: default_key_directory(),
            close_timeout: default_close_timeout(),
            command_timeout: default_command_timeout(),
            smartctl: default_smartctl(),
        }
    }
}

impl CryptSettings {
    /// Where the host's half of a drive's identity token is kept.
    pub fn token_path(&self, drive: &str) -> std::path::PathBuf {
        self.key_directory.join(format!("{drive}.token"))
    }
}

/// Checks that need the whole configuration.
pub(crate) fn check(config: &Config) -> Result<(), (Vec<String>, String)> {
    let crypt = |k: &str| vec!["crypt".to_string(), k.to_string()];
    if !(1..=3600).contains(&config.crypt.close_timeout) {
        return Err((
            crypt("close-timeout"),
            "must be from 1 to 3600 seconds".into(),
        ));
    }
    if !(5..=3600).contains(&config.crypt.command_timeout) {
        return Err((
            crypt("command-timeout"),
            "must be from 5 to 3600 seconds".into(),
        ));
    }
    // Mountpoints are checked against system directories (as the kernel
    // resolves them) in crate::paths.
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::Config;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("ferry.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let config = parse("").expect("empty file");
        assert_eq!(&*config.crypt.key_directory, Path::new("/etc/ferry/keys"));
        assert_eq!(config.crypt.close_timeout, 30);
        assert_eq!(config.crypt.command_timeout, 120);
        assert_eq!(
            config.crypt.token_path("offsite-a"),
            Path::new("/etc/ferry/keys/offsite-a.token")
        );
    }

    #[test]
    fn settings_are_read_and_checked() {
        let config =
            parse("[crypt]\nkey-directory = \"/k\"\nclose-timeout = 5\ncommand-timeout = 60\n")
                .expect("valid");
        assert_eq!(config.crypt.close_timeout, 5);
        assert_eq!(config.crypt.command_timeout, 60);
        let err = parse("[crypt]\nclose-timeout = 0\n").expect_err("zero");
        assert!(
            err.contains("crypt.close-timeout") && err.contains("1 to 3600"),
            "{err}"
        );
        let err = parse("[crypt]\ncommand-timeout = 1\n").expect_err("too short");
        assert!(err.contains("crypt.command-timeout"), "{err}");
        let err = parse("[crypt]\nclose-timeuot = 5\n").expect_err("misspelt");
        assert!(err.contains("close-timeuot"), "{err}");
    }

    #[test]
    fn a_drive_is_never_mounted_over_a_system_directory() {
        let err =
            parse("[drives.a]\nuuid = \"abcd-1234\"\nmountpoint = \"/etc\"\n").expect_err("/etc");
        assert!(
            err.contains("drives.a.mountpoint") && err.contains("system directory"),
            "{err}"
        );
        parse("[drives.a]\nuuid = \"abcd-1234\"\nmountpoint = \"/mnt/a\"\n").expect("/mnt/a");
    }
}
