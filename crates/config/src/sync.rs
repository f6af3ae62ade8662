//! `[sync]`: how ferry-sync copies repositories onto drives. Owned by the
//! sync worker's issue.
//!
//! Every key has a default, so the section may be left out.

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::Config;

/// The longest `lock-wait` accepted: a day.
const MAX_LOCK_WAIT: u64 = 24 * 60 * 60;

/// `[sync]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SyncSettings {
    /// Where on each drive the copies live, relative to its mountpoint:
    /// repository `nas` is copied to `<mountpoint>/<directory>/nas`.
    /// Default `ferry`.
    #[serde(default = "default_directory")]
    pub directory: PathBuf,
    /// How long, in seconds, to wait for borg's lock on a repository while
    /// a backup holds it. Default 1800.
    #[serde(default = "default_lock_wait")]
    pub lock_wait: u64,
    /// Free space, in MiB, to leave on a drive beyond what a copy needs.
    /// Default 16.
    #[serde(default = "default_reserve_mib")]
    pub reserve_mib: u64,
    /// The rolling scrub's time budget per sync, in seconds: how long each
    /// sync may spend re-reading unchanged files on the drive against the
    /// hashes recorded when they were copied. 0: no time limit (then
    /// `scrub-mib` bounds it). Default 60.
    #[serde(default = "default_scrub_seconds")]
    pub scrub_seconds: u64,
    /// The rolling scrub's byte budget per sync, in MiB. 0: no byte limit
    /// (then `scrub-seconds` bounds it). Default 0.
    #[serde(default)]
    pub scrub_mib: u64,
    /// Every byte on a drive is to be re-read at least once in this many
    /// days; a drive whose scrub has not come round in time says so (the
    /// ledger, Sync1.Verification, the mail). Default 30.
    #[serde(default = "default_scrub_period_days")]
    pub scrub_period_days: u64,
}

fn default_directory() -> PathBuf {
    PathBuf::from("ferry")
}

fn default_lock_wait() -> u64 {
    1800
}

fn default_reserve_mib() -> u64 {
    16
}

fn default_scrub_seconds() -> u64 {
    60
}

fn default_scrub_period_days() -> u64 {
    30
}

/// The longest scrub period accepted: ten years.
const MAX_SCRUB_PERIOD_DAYS: u64 = 3650;

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            directory: default_directory(),
            lock_wait: default_lock_wait(),
            reserve_mib: default_reserve_mib(),
            scrub_seconds: default_scrub_seconds(),
            scrub_mib: 0,
            scrub_period_days: default_scrub_period_days(),
        }
    }
}

impl SyncSettings {
    /// Where the copies of `mountpoint`'s drive live.
    pub fn drive_directory(&self, mountpoint: &Path) -> PathBuf {
        mountpoint.join(&self.directory)
    }
}

/// Checks that need the whole configuration.
pub(crate) fn check(config: &Config) -> Result<(), (Vec<String>, String)> {
    let key = |k: &str| vec!["sync".to_string(), k.to_string()];
    let directory = &config.sync.directory;
    let plain = directory
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if directory.as_os_str().is_empty() || !plain {
        return Err((
            key("directory"),
            format!(
                "`{}` must be a relative path inside the drive, like \"ferry\" or \"backups/borg\" (no leading /, no `..`)",
                directory.display()
            ),
        ));
    }
    if !(1..=MAX_LOCK_WAIT).contains(&config.sync.lock_wait) {
        return Err((
            key("lock-wait"),
            format!("must be from 1 to {MAX_LOCK_WAIT} seconds"),
        ));
    }
    if config.sync.scrub_seconds == 0 && config.sync.scrub_mib == 0 {
        return Err((
            key("scrub-seconds"),
            "scrub-seconds and scrub-mib are both 0, so the scrub would have no budget at all; \
             set one of them (scrub-seconds = 60 re-reads a minute of each drive per sync)"
                .to_string(),
        ));
    }
    if !(1..=MAX_SCRUB_PERIOD_DAYS).contains(&config.sync.scrub_period_days) {
        return Err((
            key("scrub-period-days"),
            format!("must be from 1 to {MAX_SCRUB_PERIOD_DAYS} days"),
        ));
    }
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
    fn defaults_and_values() {
        let config = parse("").expect("empty file");
        assert_eq!(config.sync.directory, Path::new("ferry"));
        assert_eq!(config.sync.lock_wait, 1800);
        assert_eq!(config.sync.reserve_mib, 16);
        assert_eq!(config.sync.scrub_seconds, 60);
        assert_eq!(config.sync.scrub_mib, 0);
        assert_eq!(config.sync.scrub_period_days, 30);
        let config = parse("[sync]\nscrub-seconds = 0\nscrub-mib = 512\nscrub-period-days = 7\n")
            .expect("valid");
        assert_eq!(
            (
                config.sync.scrub_seconds,
                config.sync.scrub_mib,
                config.sync.scrub_period_days
            ),
            (0, 512, 7)
        );
        let config =
            parse("[sync]\ndirectory = \"backups/borg\"\nlock-wait = 60\nreserve-mib = 0\n")
                .expect("valid");
        assert_eq!(
            config.sync.drive_directory(Path::new("/run/ferry/a")),
            Path::new("/run/ferry/a/backups/borg")
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, key) in [
            ("[sync]\ndirectory = \"/abs\"\n", "directory"),
            ("[sync]\ndirectory = \"../up\"\n", "directory"),
            ("[sync]\ndirectory = \"\"\n", "directory"),
            ("[sync]\nlock-wait = 0\n", "lock-wait"),
            ("[sync]\nlock-wait = 100000\n", "lock-wait"),
            ("[sync]\nverify = true\n", "verify"),
            ("[sync]\nscrub-seconds = 0\n", "scrub-seconds"),
            ("[sync]\nscrub-period-days = 0\n", "scrub-period-days"),
            ("[sync]\nscrub-mib = -1\n", "scrub-mib"),
        ] {
            let message = parse(text).expect_err(text);
            assert!(message.contains(key), "{text}: {message}");
        }
    }
}
