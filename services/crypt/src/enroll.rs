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

use std::ffi::OsString;
use std::fs::DirBuilder;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use ferry_config::{Config, Name};
use ferry_service::confined::Confined;
use ferry_service::durable::write_atomically;

use crate::command::{self, Arg};
use crate::devices;
use crate::identity::{Token, TOKEN_FILE};
use crate::ops::MOUNT_OPTIONS;
use crate::secrets;

/// The least time one step (luksFormat, mkfs) is given.
const MIN_STEP_TIMEOUT: Duration = Duration::from_secs(600);

/// ext4 labels hold at most 16 bytes.
const LABEL_BYTES: usize = 16;

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollArgs {
    /// The drive's name in ferry.toml.
    pub drive: Name,
    /// The device to erase.
    pub device: PathBuf,
    /// The device repeated after --yes-destroy-all-data-on.
    pub confirmed: Option<PathBuf>,
    /// No LUKS.
    pub plain: bool,
    /// ferry.toml.
    pub config: PathBuf,
}

/// The usage text.
pub const USAGE: &str = "\
usage: ferry-crypt enroll --drive NAME [--plain] [--config FILE] \\
                          --yes-destroy-all-data-on DEVICE DEVICE

Erases DEVICE and prepares it as the backup drive NAME: a random key file
(0600) in [crypt] key-directory, LUKS2 unlocked by it, a backup of the LUKS
header beside the key, an ext4 filesystem labelled NAME, and the identity
token that proves the drive is NAME. Prints the [drives.NAME] section to add
to ferry.toml. Keep copies of the key file and the header backup somewhere
safe, off this machine.

  --drive NAME                      the drive's name in ferry.toml
  --plain                           no encryption: ext4 directly on DEVICE
  --config FILE                     ferry's configuration (default /etc/ferry/ferry.toml)
  --yes-destroy-all-data-on DEVICE  the confirmation: repeat the device";

impl EnrollArgs {
    /// Parses the arguments after `enroll`; the error is for the person.
    pub fn parse(args: &[String]) -> Result<EnrollArgs, String> {
        let mut drive = None;
        let mut device = None;
        let mut confirmed = None;
        let mut plain = false;
        let mut config = PathBuf::from(ferry_config::DEFAULT_PATH);
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = |flag: &str| {
                args.next()
                    .cloned()
                    .ok_or_else(|| format!("{flag} needs a value"))
            };
            match arg.as_str() {
                "--drive" => drive = Some(Name::new(&value("--drive")?)?),
                "--yes-destroy-all-data-on" => {
                    confirmed = Some(PathBuf::from(value("--yes-destroy-all-data-on")?))
                }
                "--config" | "-c" => config = PathBuf::from(value("--config")?),
                "--plain" => plain = true,
                other if other.starts_with('-') => {
                    return Err(format!("unknown option `{}`", other.escape_debug()))
                }
                other => {
                    if device.is_some() {
                        return Err(format!(
                            "one device at a time (`{}` is one too many)",
                            other.escape_debug()
                        ));
                    }
                    device = Some(PathBuf::from(other));
                }
            }
        }
        Ok(EnrollArgs {
            drive: drive.ok_or("--drive NAME is missing")?,
            device: device.ok_or("the DEVICE to erase is missing")?,
            confirmed,
            plain,
            config,
        })
    }
}

/// `ferry-crypt enroll …`: exit 0 when the drive is ready, 1 when refused
/// or failed, 64 on a usage mistake, 78 on a bad configuration.
pub fn main(args: &[String]) -> ExitCode {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match EnrollArgs::parse(args) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("ferry-crypt enroll: {e}\n\n{USAGE}");
            return ExitCode::from(64);
        }
    };
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
fn preflight(args: &EnrollArgs, config: &Config) -> Result<HostFiles, String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("enrolment erases a block device and needs root".into());
    }
    let device = args.device.display();
    let Some(confirmed) = &args.confirmed else {
        return Err(format!(
            "this erases everything on {device}. If that is what you want, say so: --yes-destroy-all-data-on {device}"
        ));
    };
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    if !same(confirmed, &args.device) {
        return Err(format!(
            "--yes-destroy-all-data-on names {}, not {device}: nothing was erased",
            confirmed.display()
        ));
    }
    devices::check_unused(&args.device)?;
    if let Some((name, _)) = devices::uuid_of(&args.device).and_then(|u| config.drive_by_uuid(&u)) {
        return Err(format!(
            "{device} is the enrolled drive {name}: erasing it destroys its backups. If you mean it, remove [drives.{name}] from ferry.toml first"
        ));
    }
    let dir = &config.crypt.key_directory;
    let files = HostFiles {
        key: dir.join(format!("{}.key", args.drive)),
        header: dir.join(format!("{}.header", args.drive)),
        token: config.crypt.token_path(args.drive.as_str()),
    };
    for existing in [&files.key, &files.header, &files.token] {
        if existing.exists() {
            return Err(format!(
                "{} already exists: drive {} was enrolled before, and that drive needs it. Choose another name, or move the old drive's files away first",
                existing.display(),
                args.drive
            ));
        }
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create the key directory {}: {e}", dir.display()))?;
    if std::fs::metadata(dir).is_ok_and(|m| m.mode() & 0o022 != 0) {
        return Err(format!(
            "the key directory {} can be written by group or others: chmod 700 it",
            dir.display()
        ));
    }
    Ok(files)
}

/// Prepares the drive and returns the configuration section to print.
pub async fn enroll(args: &EnrollArgs, config: &Config) -> Result<String, String> {
    let files = preflight(args, config)?;
    let step = Duration::from_secs(config.crypt.command_timeout).max(MIN_STEP_TIMEOUT);
    let run = |program: &'static str, list: &[Arg<'_>]| {
        let list: Vec<OsString> = list.iter().map(|a| a.as_ref().to_owned()).collect();
        async move {
            command::run(program, &list, step)
                .await
                .map_err(|e| e.to_string())
        }
    };
    let device = &args.device;
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|u| u.trim().to_string())
        .map_err(|e| format!("cannot make a UUID: {e}"))?;
    eprintln!("erasing {} for drive {}", args.device.display(), args.drive);
    run("wipefs", &[&"--all", &"--quiet", device]).await?;

    let mapping = format!("ferry-enroll-{}", args.drive);
    let filesystem_on = if args.plain {
        args.device.clone()
    } else {
        secrets::create_key_file(&files.key)
            .map_err(|e| format!("cannot write the key file {}: {e}", files.key.display()))?;
        // The key is 512 random bits, not a passphrase: key stretching adds
        // nothing to it, while argon2's memory cost (up to 1 GiB per unlock)
        // can fail on a small backup box. So PBKDF2 at its minimum.
        run(
            "cryptsetup",
            &[
                &"luksFormat",
                &"--type",
                &"luks2",
                &"--batch-mode",
                &"--uuid",
                &uuid,
                &"--label",
                &args.drive.as_str(),
                &"--pbkdf",
                &"pbkdf2",
                &"--pbkdf-force-iterations",
                &"1000",
                &"--key-file",
                &files.key,
                device,
            ],
        )
        .await
        .map_err(|e| {
            format!(
                "{e}; {} was left in place and can be deleted",
                files.key.display()
            )
        })?;
        let left = format!(
            "{} is now a LUKS drive unlocked by {}; delete that file (and {}) before enrolling it again",
            args.device.display(),
            files.key.display(),
            files.header.display()
        );
        run(
            "cryptsetup",
            &[
                &"luksHeaderBackup",
                device,
                &"--header-backup-file",
                &files.header,
            ],
        )
        .await
        .map_err(|e| format!("cannot back up the LUKS header: {e}; {left}"))?;
        run(
            "cryptsetup",
            &[
                &"open",
                &"--type",
                &"luks",
                &"--key-file",
                &files.key,
                device,
                &mapping,
            ],
        )
        .await
        .map_err(|e| {
            let why = if e.contains("device-mapper") {
                "this kernel has no device-mapper (modprobe dm_crypt)"
            } else {
                "it cannot be unlocked"
            };
            format!("cannot make the filesystem inside the LUKS drive: {why}: {e}; {left}")
        })?;
        Path::new("/dev/mapper").join(&mapping)
    };

    let made = make_filesystem(args, &filesystem_on, &uuid, step).await;
    if !args.plain {
        if let Err(e) = run("cryptsetup", &[&"close", &mapping]).await {
            eprintln!("warning: cannot lock {mapping}: {e}");
        }
    }
    let token = made?;
    write_atomically(&files.token, token.to_text().as_bytes(), 0o600).map_err(|e| {
        format!(
            "cannot write this host's identity token {}: {e}; enrol the drive again",
            files.token.display()
        )
    })?;
    let _ = command::run("udevadm", &["settle", "--timeout=10"], step).await;
    if devices::uuid_of(&args.device).is_some_and(|seen| !seen.eq_ignore_ascii_case(&uuid)) {
        eprintln!(
            "warning: udev does not report UUID {uuid} for {} yet; check with udevadm info --query=property {}",
            args.device.display(),
            args.device.display()
        );
    }
    Ok(section(args, &files, &uuid))
}

/// mkfs.ext4 on `target`, then the drive's half of the identity token.
async fn make_filesystem(
    args: &EnrollArgs,
    target: &Path,
    uuid: &str,
    step: Duration,
) -> Result<Token, String> {
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
    command::run("mkfs.ext4", &mkfs, step)
        .await
        .map_err(|e| e.to_string())?;

    let token = Token::generate(&args.drive).map_err(|e| format!("cannot make a token: {e}"))?;
    let mountpoint = tempfile::Builder::new()
        .prefix("ferry-enroll-")
        .tempdir()
        .map_err(|e| format!("cannot make a temporary mountpoint: {e}"))?;
    command::run(
        "mount",
        &[
            &"-t" as Arg<'_>,
            &"ext4",
            &"-o",
            &MOUNT_OPTIONS,
            &target,
            &mountpoint.path(),
        ],
        step,
    )
    .await
    .map_err(|e| e.to_string())?;
    let written = write_token(mountpoint.path(), &token)
        .map_err(|e| format!("cannot write the identity token onto the drive: {e}"));
    let unmounted = command::run("umount", &[mountpoint.path()], step)
        .await
        .map_err(|e| e.to_string());
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

    fn parse(args: &[&str]) -> Result<EnrollArgs, String> {
        EnrollArgs::parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
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
        assert!(parse(&["/dev/sdx"])
            .expect_err("no drive")
            .contains("--drive"));
        assert!(parse(&["--drive", "a"])
            .expect_err("no device")
            .contains("DEVICE"));
        assert!(parse(&["--drive", "A B", "/dev/x"])
            .expect_err("bad name")
            .contains("not a valid name"));
        assert!(parse(&["--drive", "a", "/dev/x", "/dev/y"])
            .expect_err("two")
            .contains("one device"));
        assert!(parse(&["--drive"])
            .expect_err("value")
            .contains("needs a value"));
        assert!(parse(&["--force", "--drive", "a", "/dev/x"])
            .expect_err("unknown")
            .contains("--force"));
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
