//! ferry.toml: the one configuration file every ferry service reads.
//!
//! Parsing is strict on purpose. A backup system that silently ignores a
//! misspelt key copies the wrong thing for months, so an unknown key, a wrong
//! type or a bad value rejects the whole file with its path, the line, the
//! key and the reason. Keys are kebab-case. Every service reads the same
//! schema, so a file one service accepts is accepted by all of them.

mod borg;
mod crypt;
mod error;
mod locate;
mod notify;
pub mod paths;
mod push;
mod remote;
mod sync;
mod values;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use borg::{BorgSettings, Checks, Frequency, Hooks, Preconditions, Profile, Retention, Span};
pub use crypt::{CryptSettings, HealthPolicy};
pub use error::ConfigError;
pub use notify::{Mail, MailTransport, NotifySettings, SmtpSecurity};
pub use push::{check_url, Metrics, Ntfy, NtfyPriority, Push, PING_KEY};
pub use remote::{is_remote, HomePath, HomePathError, RemoteRepository, SshUrl, SshUrlError};
pub use sync::SyncSettings;
pub use values::{AbsolutePath, Color, FsUuid, Name};

/// Where the services look for their configuration unless `--config` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/ferry/ferry.toml";
/// The state directory unless the file says `state-directory`.
pub const DEFAULT_STATE_DIRECTORY: &str = "/var/lib/ferry";

/// The whole of ferry.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Where services keep state that outlives them (ledgers, last
    /// results, the mail outbox). Default /var/lib/ferry.
    #[serde(default = "default_state_directory")]
    pub state_directory: AbsolutePath,
    /// Enrolled drives, by name.
    #[serde(default)]
    pub drives: BTreeMap<Name, Drive>,
    /// Borg repositories on this machine, by name.
    #[serde(default)]
    pub repositories: BTreeMap<Name, Repository>,
    /// Borg repositories on other machines, reached over SSH, by name
    /// (one namespace with `repositories`).
    #[serde(default)]
    pub remote_repositories: BTreeMap<Name, RemoteRepository>,
    /// The status LED.
    #[serde(default)]
    pub led: Led,
    /// The crypt/mount manager.
    #[serde(default)]
    pub crypt: CryptSettings,
    /// The sync worker.
    #[serde(default)]
    pub sync: SyncSettings,
    /// The borg runner's shared settings.
    #[serde(default)]
    pub borg: BorgSettings,
    /// Backup profiles, by name.
    #[serde(default)]
    pub profiles: BTreeMap<Name, Profile>,
    /// How mail is sent; without it nothing is mailed.
    pub mail: Option<Mail>,
    /// What is mailed and when.
    #[serde(default)]
    pub notify: NotifySettings,
    /// Healthchecks-style pings and ntfy pushes; without it none are sent.
    pub push: Option<Push>,
    /// The Prometheus textfile; without it none is written.
    pub metrics: Option<Metrics>,
}

fn default_state_directory() -> AbsolutePath {
    AbsolutePath::from_static(DEFAULT_STATE_DIRECTORY)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_directory: default_state_directory(),
            drives: BTreeMap::new(),
            repositories: BTreeMap::new(),
            remote_repositories: BTreeMap::new(),
            led: Led::default(),
            crypt: CryptSettings::default(),
            sync: SyncSettings::default(),
            borg: BorgSettings::default(),
            profiles: BTreeMap::new(),
            mail: None,
            notify: NotifySettings::default(),
            push: None,
            metrics: None,
        }
    }
}

/// `[drives.<name>]`: an external drive enrolled with ferry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Drive {
    /// ID_FS_UUID as udev reports it: the LUKS UUID of an encrypted drive,
    /// the filesystem UUID of a plain one. A hint only; identity is proven
    /// by the token written at enrolment.
    pub uuid: FsUuid,
    /// The LUKS key file; absent for a plain (unencrypted) drive.
    pub key_file: Option<AbsolutePath>,
    /// Where the drive is mounted; `/run/ferry/<name>` when absent.
    pub mountpoint: Option<AbsolutePath>,
    /// The repositories copied onto this drive.
    #[serde(default)]
    pub repositories: Vec<Name>,
    /// Open (unlock and mount) the drive as soon as it is plugged in.
    #[serde(default = "yes")]
    pub open_on_attach: bool,
    /// Power the drive off (spin down, detach from USB) after it is closed.
    #[serde(default)]
    pub power_off: bool,
    /// The filesystem type made at enrolment (`ext4` or `xfs`). The drive
    /// is only ever mounted as this type, checked with blkid first: a
    /// stranger's image of another type is refused before any filesystem
    /// driver reads it. Default `ext4` (what `ferry-crypt enroll` makes),
    /// so configurations written before this key keep working.
    #[serde(default)]
    pub filesystem: Filesystem,
    /// What a failing SMART health (read with smartctl on attach) does:
    /// warn (default: open anyway, say so), refuse (DriveFailed at stage
    /// `health`, the drive stays locked) or off (smartctl is not run).
    #[serde(default)]
    pub health: HealthPolicy,
}

/// The filesystem types a drive may carry, by their kernel (and blkid)
/// names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filesystem {
    /// ext4 (what enrolment makes).
    #[default]
    Ext4,
    /// XFS.
    Xfs,
}

impl Filesystem {
    /// The name `mount -t` and blkid use.
    pub fn as_str(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Xfs => "xfs",
        }
    }

    /// The mount options with which a read-only mount writes nothing at
    /// all: ext4 and XFS replay a dirty journal even when mounted `ro`
    /// unless told not to.
    pub fn no_replay(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "noload",
            Filesystem::Xfs => "norecovery",
        }
    }
}

/// `[repositories.<name>]`: a local borg repository.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Repository {
    /// The repository directory.
    pub path: AbsolutePath,
    /// A file holding the passphrase (mode 0600).
    pub passphrase_file: Option<AbsolutePath>,
    /// A command that prints the passphrase (borg's BORG_PASSCOMMAND).
    pub passcommand: Option<String>,
}

/// `[led]`: where the status colour goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Led {
    /// blinkstick, file or none.
    #[serde(default)]
    pub backend: LedBackend,
    /// For the file backend: the file every colour is appended to.
    pub file: Option<AbsolutePath>,
    /// For the blinkstick backend: use only the stick with this serial.
    pub serial: Option<String>,
    /// For BlinkStick Pro/Strip/Square: the LED index (seed 004's `--index 1`).
    pub index: Option<u8>,
    /// For BlinkStick Pro: the channel (0, 1 or 2).
    #[serde(default)]
    pub channel: u8,
    /// Maximum brightness in percent, as blinkstick's `--limit`.
    #[serde(default = "full_brightness")]
    pub brightness_limit: u8,
    /// The colour of each state.
    #[serde(default)]
    pub colors: LedColors,
}

/// `[led.colors]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LedColors {
    /// Nothing to say.
    #[serde(default = "Color::off")]
    pub idle: Color,
    /// A drive or backup is busy (seed 004's #33c280).
    #[serde(default = "Color::working")]
    pub working: Color,
    /// A drive is safe to remove.
    #[serde(default = "Color::green")]
    pub done: Color,
    /// Something failed.
    #[serde(default = "Color::red")]
    pub failed: Color,
}

/// The LED backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LedBackend {
    /// A BlinkStick on USB (hidraw).
    #[default]
    Blinkstick,
    /// Append each colour to a file (headless machines, tests).
    File,
    /// No LED; the state is still on the bus.
    None,
}

fn yes() -> bool {
    true
}

fn full_brightness() -> u8 {
    100
}

impl Default for Led {
    fn default() -> Self {
        Led {
            backend: LedBackend::default(),
            file: None,
            serial: None,
            index: None,
            channel: 0,
            brightness_limit: full_brightness(),
            colors: LedColors::default(),
        }
    }
}

impl Default for LedColors {
    fn default() -> Self {
        LedColors {
            idle: Color::off(),
            working: Color::working(),
            done: Color::green(),
            failed: Color::red(),
        }
    }
}

impl Drive {
    /// Where this drive is mounted when open.
    pub fn mountpoint(&self, name: &Name) -> PathBuf {
        match &self.mountpoint {
            Some(path) => path.to_path_buf(),
            None => Path::new("/run/ferry").join(name.as_str()),
        }
    }
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = paths::read_config(path).map_err(|reason| ConfigError::Read {
            path: path.to_path_buf(),
            reason,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks `text`; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::from_toml(path, text, &e))?;
        config
            .check()
            .map_err(|(key, reason)| ConfigError::invalid(path, text, &key, reason))?;
        Ok(config)
    }

    /// The drive whose UUID udev reported, if it is enrolled. UUIDs compare
    /// case-insensitively, as blkid prints them in either case.
    pub fn drive_by_uuid(&self, uuid: &str) -> Option<(&Name, &Drive)> {
        self.drives.iter().find(|(_, d)| d.uuid.matches(uuid))
    }

    /// Checks that need more than one value: references between sections
    /// and uniqueness. Returns the key path and the reason.
    fn check(&self) -> Result<(), (Vec<String>, String)> {
        remote::check(self)?;
        let mut uuids = BTreeMap::new();
        let mut mountpoints = BTreeMap::new();
        for (name, drive) in &self.drives {
            let key = |k: &str| vec!["drives".to_string(), name.to_string(), k.to_string()];
            if let Some(other) = uuids.insert(drive.uuid.normalized(), name) {
                return Err((
                    key("uuid"),
                    format!("the same UUID is already enrolled as drive `{other}`"),
                ));
            }
            let mountpoint = drive.mountpoint(name);
            if let Some(other) = mountpoints.insert(mountpoint.clone(), name) {
                return Err((
                    key("mountpoint"),
                    format!(
                        "{} is already the mountpoint of drive `{other}`",
                        mountpoint.display()
                    ),
                ));
            }
            let mut seen = BTreeSet::new();
            for repository in &drive.repositories {
                if !self.repositories.contains_key(repository) {
                    return Err((
                        key("repositories"),
                        format!("no repository named `{repository}`: add a [repositories.{repository}] section or remove it here"),
                    ));
                }
                if !seen.insert(repository) {
                    return Err((
                        key("repositories"),
                        format!("`{repository}` is listed twice"),
                    ));
                }
            }
        }
        for (name, repository) in &self.repositories {
            if repository.passphrase_file.is_some() && repository.passcommand.is_some() {
                return Err((
                    vec![
                        "repositories".into(),
                        name.to_string(),
                        "passcommand".into(),
                    ],
                    "give either passphrase-file or passcommand, not both".into(),
                ));
            }
        }
        let led = |k: &str| vec!["led".to_string(), k.to_string()];
        if self.led.backend == LedBackend::File && self.led.file.is_none() {
            return Err((
                led("backend"),
                "the file backend needs `file = \"/path\"` in [led]".into(),
            ));
        }
        if !(1..=100).contains(&self.led.brightness_limit) {
            return Err((
                led("brightness-limit"),
                "must be a percentage from 1 to 100".into(),
            ));
        }
        if self.led.channel > 2 {
            return Err((
                led("channel"),
                "a BlinkStick Pro has channels 0, 1 and 2".into(),
            ));
        }
        crypt::check(self)?;
        sync::check(self)?;
        borg::check(self)?;
        paths::check(self)?;
        notify::check(self)?;
        push::check(self)
    }
}
