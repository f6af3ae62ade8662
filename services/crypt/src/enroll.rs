//! `ferry-crypt enroll`: prepares a new backup drive, the "Preparing a new
//! backup disk" list of seed 004 done for the person.
//!
//! It erases the device only when told twice (the device, then
//! `--yes-destroy-all-data-on` the same device), and never a device that is
//! mounted, mapped, swap, or holds the running system. Then: a random key
//! file (0600) in the key directory, LUKS2 with it, a backup of the LUKS
//! header beside the key, an ext4 filesystem labelled with the drive name,
//! the identity token on the drive and on the host, and the
//! `[drives.<name>]` section to paste into ferry.toml, on stdout. `--plain`
//! leaves out LUKS.

use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use ferry_config::{Config, Name};
use ferry_service::confined::Confined;
use ferry_service::durable::write_atomically;

use crate::command::{self, Arg, CommandError};
use crate::devices;
use crate::identity::{Token, TOKEN_FILE};
use crate::ops::MOUNT_OPTIONS;
use crate::secrets;

/// The least time one step (luksFormat, mkfs) is given.
const MIN_STEP_TIMEOUT: Duration = Duration::from_secs(600);

/// ext4 labels hold at most 16 bytes.
const LABEL_BYTES: usize = 16;

/// What `ferry-crypt enroll --help` says before the options.
pub const ABOUT: &str = "\
Erases DEVICE and prepares it as the backup drive NAME: a random key file
(0600) in [crypt] key-directory, LUKS2 unlocked by it, a backup of the LUKS
header beside the key, an ext4 filesystem labelled NAME, and the identity
token that proves the drive is NAME. Prints the [drives.NAME] section to add
to ferry.toml. Keep copies of the key file and the header backup somewhere
safe, off this machine.

Nothing is erased unless the device is named twice:
  ferry-crypt enroll --drive NAME --yes-destroy-all-data-on DEVICE DEVICE";

/// The command line of `ferry-crypt enroll`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct EnrollArgs {
    /// The drive's name in ferry.toml.
    #[arg(long, value_name = "NAME", value_parser = Name::new)]
    pub drive: Name,
    /// The device to erase.
    #[arg(value_name = "DEVICE")]
    pub device: PathBuf,
    /// The confirmation: repeat the device.
    #[arg(long = "yes-destroy-all-data-on", value_name = "DEVICE")]
    pub confirmed: Option<PathBuf>,
    /// No encryption: ext4 directly on DEVICE.
    #[arg(long)]
    pub plain: bool,
    /// ferry's configuration file.
    #[arg(short, long, value_name = "FILE", default_value = ferry_config::DEFAULT_PATH)]
    pub config: PathBuf,
}

/// Why enrolment refused or failed; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("enrolment erases a block device and needs root")]
    NotRoot,
    #[error("this erases everything on {device}. If that is what you want, say so: --yes-destroy-all-data-on {device}", device = device.display())]
    Unconfirmed { device: PathBuf },
    #[error("--yes-destroy-all-data-on names {}, not {}: nothing was erased", confirmed.display(), device.display())]
    ConfirmedOther { confirmed: PathBuf, device: PathBuf },
    #[error(transparent)]
    Device(#[from] devices::DeviceRefused),
    #[error("{} is the enrolled drive {name}: erasing it destroys its backups. If you mean it, remove [drives.{name}] from ferry.toml first", device.display())]
    Enrolled { device: PathBuf, name: Name },
    #[error("{} already exists: drive {drive} was enrolled before, and that drive needs it. Choose another name, or move the old drive's files away first", path.display())]
    Exists { path: PathBuf, drive: Name },
    #[error("cannot create the key directory {}: {source}", dir.display())]
    KeyDirectory { dir: PathBuf, source: io::Error },
    #[error("the key directory {} can be written by group or others: chmod 700 it", dir.display())]
    KeyDirectoryLoose { dir: PathBuf },
    #[error("cannot make a UUID: {0}")]
    Uuid(io::Error),
    #[error(transparent)]
    Step(#[from] CommandError),
    #[error("cannot write the key file {}: {source}", key.display())]
    KeyFile { key: PathBuf, source: io::Error },
    #[error("{source}; {} was left in place and can be deleted", key.display())]
    Format { source: CommandError, key: PathBuf },
    #[error("cannot back up the LUKS header: {source}; {}", left(files))]
    HeaderBackup {
        source: CommandError,
        files: Box<Left>,
    },
    #[error(
        "cannot make the filesystem inside the LUKS drive: {why}: {source}; {}",
        left(files)
    )]
    Mapping {
        why: &'static str,
        source: CommandError,
        files: Box<Left>,
    },
    #[error("cannot make a token: {0}")]
    Token(io::Error),
    #[error("cannot make a temporary mountpoint: {0}")]
    Mountpoint(io::Error),
    #[error("cannot write the identity token onto the drive: {0}")]
    DriveToken(io::Error),
    #[error("cannot write this host's identity token {}: {source}; enrol the drive again", path.display())]
    HostToken { path: PathBuf, source: io::Error },
}

/// What a failed LUKS enrolment leaves behind.
#[derive(Debug, Clone)]
pub struct Left {
    device: PathBuf,
    key: PathBuf,
    header: PathBuf,
}

fn left(files: &Left) -> String {
    format!(
        "{} is now a LUKS drive unlocked by {}; delete that file (and {}) before enrolling it again",
        files.device.display(),
        files.key.display(),
        files.header.display()
    )
}

/// `ferry-crypt enroll …`: exit 0 when the drive is ready, 1 when refused
/// or failed, 78 on a bad configuration (64 on a usage mistake is clap's,
/// in main).
pub fn main(args: EnrollArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ferry-crypt enroll: {e}");
            return ExitCode::from(ferry_service::EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ferry-crypt enroll: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(enroll(&args, &config)) {
        Ok(section) => {
            print!("{section}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry-crypt enroll: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where enrolment keeps a drive's secrets on the host.
struct HostFiles {
    key: PathBuf,
    header: PathBuf,
    token: PathBuf,
}

/// Checks everything that must hold before anything is erased.
fn preflight(args: &EnrollArgs, config: &Config) -> Result<HostFiles, EnrollError> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(EnrollError::NotRoot);
    }
    let device = args.device.clone();
    let Some(confirmed) = args.confirmed.clone() else {
        return Err(EnrollError::Unconfirmed { device });
    };
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    if !same(&confirmed, &device) {
        return Err(EnrollError::ConfirmedOther { confirmed, device });
    }
    devices::check_unused(&device)?;
    if let Some((name, _)) = devices::uuid_of(&device).and_then(|u| config.drive_by_uuid(&u)) {
        let name = name.clone();
        return Err(EnrollError::Enrolled { device, name });
    }
    let dir = &config.crypt.key_directory;
    let files = HostFiles {
        key: dir.join(format!("{}.key", args.drive)),
        header: dir.join(format!("{}.header", args.drive)),
        token: config.crypt.token_path(args.drive.as_str()),
    };
    for existing in [&files.key, &files.header, &files.token] {
        if existing.exists() {
            return Err(EnrollError::Exists {
                path: existing.clone(),
                drive: args.drive.clone(),
            });
        }
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| EnrollError::KeyDirectory {
            dir: dir.to_path_buf(),
            source,
        })?;
    if std::fs::metadata(dir).is_ok_and(|m| m.mode() & 0o022 != 0) {
        return Err(EnrollError::KeyDirectoryLoose {
            dir: dir.to_path_buf(),
        });
    }
    Ok(files)
}

/// Runs one enrolment step, given at least [`MIN_STEP_TIMEOUT`].
async fn step(config: &Config, program: &str, args: &[Arg<'_>]) -> Result<String, CommandError> {
    let timeout = Duration::from_secs(config.crypt.command_timeout).max(MIN_STEP_TIMEOUT);
    command::run(program, args, timeout).await
}

/// Prepares the drive and returns the configuration section to print.
pub async fn enroll(args: &EnrollArgs, config: &Config) -> Result<String, EnrollError> {
    let files = preflight(args, config)?;
    let device = &args.device;
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|u| u.trim().to_string())
        .map_err(EnrollError::Uuid)?;
    eprintln!("erasing {} for drive {}", device.display(), args.drive);
    step(config, "wipefs", &[&"--all", &"--quiet", device]).await?;
    let mapping = format!("ferry-enroll-{}", args.drive);
    let filesystem_on = match args.plain {
        true => device.clone(),
        false => {
            luks_format(args, config, &files, &uuid, &mapping).await?;
            Path::new("/dev/mapper").join(&mapping)
        }
    };
    let made = make_filesystem(args, config, &filesystem_on, &uuid).await;
    if !args.plain {
        if let Err(e) = step(config, "cryptsetup", &[&"close", &mapping]).await {
            eprintln!("warning: cannot lock {mapping}: {e}");
        }
    }
    let token = made?;
    write_atomically(&files.token, token.to_text().as_bytes(), 0o600).map_err(|source| {
        EnrollError::HostToken {
            path: files.token.clone(),
            source,
        }
    })?;
    let _ = step(config, "udevadm", &[&"settle", &"--timeout=10"]).await;
    if devices::uuid_of(device).is_some_and(|seen| !seen.eq_ignore_ascii_case(&uuid)) {
        eprintln!(
            "warning: udev does not report UUID {uuid} for {} yet; check with udevadm info --query=property {}",
            device.display(),
            device.display()
        );
    }
    Ok(section(args, &files, &uuid))
}

/// The key file, LUKS2 with it, the header backup, and the drive unlocked
/// as `mapping` for the filesystem to be made in.
async fn luks_format(
    args: &EnrollArgs,
    config: &Config,
    files: &HostFiles,
    uuid: &str,
    mapping: &str,
) -> Result<(), EnrollError> {
    let device = &args.device;
    let key = &files.key;
    secrets::create_key_file(key).map_err(|source| EnrollError::KeyFile {
        key: key.clone(),
        source,
    })?;
    // The key is 512 random bits, not a passphrase: key stretching adds
    // nothing to it, while argon2's memory cost (up to 1 GiB per unlock)
    // can fail on a small backup box. So PBKDF2 at its minimum.
    let label = args.drive.as_str();
    let format: [Arg<'_>; 15] = [
        &"luksFormat",
        &"--type",
        &"luks2",
        &"--batch-mode",
        &"--uuid",
        &uuid,
        &"--label",
        &label,
        &"--pbkdf",
        &"pbkdf2",
        &"--pbkdf-force-iterations",
        &"1000",
        &"--key-file",
        key,
        device,
    ];
    step(config, "cryptsetup", &format)
        .await
        .map_err(|source| EnrollError::Format {
            source,
            key: key.clone(),
        })?;
    let files = Box::new(Left {
        device: device.clone(),
        key: key.clone(),
        header: files.header.clone(),
    });
    let backup: [Arg<'_>; 4] = [
        &"luksHeaderBackup",
        device,
        &"--header-backup-file",
        &files.header,
    ];
    if let Err(source) = step(config, "cryptsetup", &backup).await {
        return Err(EnrollError::HeaderBackup { source, files });
    }
    let open: [Arg<'_>; 7] = [
        &"open",
        &"--type",
        &"luks",
        &"--key-file",
        key,
        device,
        &mapping,
    ];
    if let Err(source) = step(config, "cryptsetup", &open).await {
        let why = match source.to_string().contains("device-mapper") {
            true => "this kernel has no device-mapper (modprobe dm_crypt)",
            false => "it cannot be unlocked",
        };
        return Err(EnrollError::Mapping { why, source, files });
    }
    Ok(())
}

/// mkfs.ext4 on `target`, then the drive's half of the identity token.
async fn make_filesystem(
    args: &EnrollArgs,
    config: &Config,
    target: &Path,
    uuid: &str,
) -> Result<Token, EnrollError> {
    let label: String = args
        .drive
        .as_str()
        .char_indices()
        .take_while(|(i, c)| i + c.len_utf8() <= LABEL_BYTES)
        .map(|(_, c)| c)
        .collect();
    let mut mkfs: Vec<Arg<'_>> = vec![&"-q", &"-F", &"-L", &label];
    if args.plain {
        // The filesystem UUID is what udev reports for a plain drive.
        mkfs.extend([&"-U" as Arg<'_>, &uuid]);
    }
    mkfs.push(&target);
    step(config, "mkfs.ext4", &mkfs).await?;

    let token = Token::generate(&args.drive).map_err(EnrollError::Token)?;
    let mountpoint = tempfile::Builder::new()
        .prefix("ferry-enroll-")
        .tempdir()
        .map_err(EnrollError::Mountpoint)?;
    let point = mountpoint.path();
    let mount: [Arg<'_>; 6] = [&"-t", &"ext4", &"-o", &MOUNT_OPTIONS, &target, &point];
    step(config, "mount", &mount).await?;
    let written = write_token(point, &token).map_err(EnrollError::DriveToken);
    let unmounted = step(config, "umount", &[&point]).await;
    written?;
    unmounted?;
    Ok(token)
}

/// Writes the token at the root of the filesystem just mounted at
/// `mountpoint`, through a handle proven to be that root, durably.
fn write_token(mountpoint: &Path, token: &Token) -> std::io::Result<()> {
    use std::io::Write;
    let root = Confined::open_mount_root(mountpoint)?;
    let mut file = root.create_file(Path::new(TOKEN_FILE), 0o600)?;
    file.write_all(token.to_text().as_bytes())?;
    file.sync_all()?;
    root.sync()
}

/// The `[drives.<name>]` section, with comments saying what to keep safe.
fn section(args: &EnrollArgs, files: &HostFiles, uuid: &str) -> String {
    let mut text = format!(
        "# {} was enrolled as drive {} on this host.\n",
        args.device.display(),
        args.drive
    );
    if args.plain {
        text.push_str("# Plain: not encrypted.\n");
    } else {
        text.push_str(&format!(
            "# Keep copies of {} and {} somewhere safe, off this machine:\n# without the key nobody, you included, can read the drive.\n",
            files.key.display(),
            files.header.display()
        ));
    }
    text.push_str(&format!("[drives.{}]\nuuid = \"{uuid}\"\n", args.drive));
    if !args.plain {
        text.push_str(&format!("key-file = {:?}\n", files.key.to_string_lossy()));
    }
    text.push_str("filesystem = \"ext4\"\n");
    text.push_str("repositories = []\n");
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `ferry-crypt enroll`'s arguments as clap parses them in main.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: EnrollArgs,
    }

    fn parse(args: &[&str]) -> Result<EnrollArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("enroll").chain(args.iter().copied())).map(|c| c.args)
    }

    /// The refusal of `args`, as clap words it.
    fn refusal(args: &[&str]) -> String {
        parse(args).expect_err("refused").to_string()
    }

    #[test]
    fn parses_the_command_line() {
        let a = parse(&[
            "--drive",
            "offsite-a",
            "--yes-destroy-all-data-on",
            "/dev/sdx",
            "/dev/sdx",
        ])
        .expect("valid");
        assert_eq!(a.drive.as_str(), "offsite-a");
        assert_eq!(a.device, Path::new("/dev/sdx"));
        assert_eq!(a.confirmed.as_deref(), Some(Path::new("/dev/sdx")));
        assert!(!a.plain);
        assert_eq!(a.config, Path::new("/etc/ferry/ferry.toml"));
        let a =
            parse(&["--plain", "--config", "/f.toml", "--drive", "b", "/dev/sdy"]).expect("valid");
        assert!(a.plain && a.confirmed.is_none());
        assert!(refusal(&["/dev/sdx"]).contains("--drive"));
        assert!(refusal(&["--drive", "a"]).contains("DEVICE"));
        assert!(refusal(&["--drive", "A B", "/dev/x"]).contains("not a valid name"));
        assert!(refusal(&["--drive", "a", "/dev/x", "/dev/y"]).contains("'/dev/y'"));
        assert!(refusal(&["--drive"]).contains("a value is required"));
        assert!(refusal(&["--force", "--drive", "a", "/dev/x"]).contains("--force"));
    }

    #[test]
    fn nothing_is_erased_unless_the_device_is_named_twice() {
        let config = Config::parse("", Path::new("ferry.toml")).expect("config");
        let unconfirmed = parse(&["--drive", "a", "/dev/sdx"]).expect("valid");
        let other = parse(&[
            "--drive",
            "a",
            "--yes-destroy-all-data-on",
            "/dev/sdy",
            "/dev/sdx",
        ])
        .expect("valid");
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            assert!(matches!(
                preflight(&unconfirmed, &config),
                Err(EnrollError::NotRoot)
            ));
            return;
        }
        let err = preflight(&unconfirmed, &config).err().expect("refused");
        assert!(
            err.to_string()
                .ends_with("say so: --yes-destroy-all-data-on /dev/sdx"),
            "{err}"
        );
        let err = preflight(&other, &config).err().expect("refused");
        assert!(matches!(err, EnrollError::ConfirmedOther { .. }), "{err}");
    }

    #[test]
    fn the_section_parses_as_configuration() {
        let args = parse(&["--drive", "offsite-a", "/dev/sdx"]).expect("valid");
        let files = HostFiles {
            key: "/etc/ferry/keys/offsite-a.key".into(),
            header: "/etc/ferry/keys/offsite-a.header".into(),
            token: "/etc/ferry/keys/offsite-a.token".into(),
        };
        let text = section(&args, &files, "1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9");
        let config = Config::parse(&text, Path::new("section")).expect("valid TOML section");
        let drive = config.drives.values().next().expect("drive");
        assert!(drive.uuid.matches("1B2C3D4E-5F60-4718-8293-A4B5C6D7E8F9"));
        assert_eq!(drive.key_file.as_deref(), Some(files.key.as_path()));
        assert!(text.contains("offsite-a.header"));
    }
}
