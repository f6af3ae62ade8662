//! The whole of ferry on one private bus, for the demo, the end-to-end
//! tests and the benchmarks: sample data, a real borg repository, a plain
//! drive enrolled with the real `ferry-crypt enroll` on a loop device, a real
//! SMTP server, and all six services as separate processes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use zbus::Connection;

use crate::smtp::Smtp;
use crate::{random_uuid, run, LoopImage, ServiceProcess, SignalRecorder, TestBus};

/// How long a service gets to take its name.
const START: Duration = Duration::from_secs(20);

/// Every service: (binary, bus name), in the order they are started.
pub const SERVICES: [(&str, &str); 6] = [
    (
        "ferry-drive-watcher",
        ferry_interfaces::drive_watcher::BUS_NAME,
    ),
    ("ferry-crypt", ferry_interfaces::crypt::BUS_NAME),
    ("ferry-sync", ferry_interfaces::sync::BUS_NAME),
    ("ferry-borg", ferry_interfaces::borg::BUS_NAME),
    ("ferry-led", ferry_interfaces::led::BUS_NAME),
    ("ferry-notifier", ferry_interfaces::notifier::BUS_NAME),
];

/// The names the system uses.
pub const DRIVE: &str = "demo-offsite";
/// The repository and the backup profile.
pub const PROFILE: &str = "demo";

/// What to build.
#[derive(Debug, Clone)]
pub struct Options {
    /// Size of the enrolled drive's image.
    pub drive_mib: u64,
    /// Sample files and their size in KiB.
    pub sample_files: usize,
    /// Size of each sample file in KiB.
    pub sample_kib: usize,
    /// Log filter for the services.
    pub log: &'static str,
    /// Mount drives under the work directory instead of /run/ferry.
    pub private_mountpoint: bool,
    /// Let unprivileged users connect to the bus too (for clients run as
    /// `nobody`).
    pub open_bus: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            drive_mib: 64,
            sample_files: 40,
            sample_kib: 64,
            log: "info",
            private_mountpoint: true,
            open_bus: false,
        }
    }
}

/// A running ferry. Everything is torn down on drop: services, the SMTP
/// server, loop devices, mounts, the bus and the work directory.
pub struct FerrySystem {
    /// Processes, by binary name (declared first: dropped before the bus).
    pub services: BTreeMap<&'static str, ServiceProcess>,
    /// The enrolled drive's image (detached after enrolment).
    pub drive: LoopImage,
    /// The UUID the drive was enrolled with.
    pub drive_uuid: String,
    /// The SMTP server mails go to.
    pub smtp: Smtp,
    /// Everything ferry signals, recorded since start.
    pub signals: SignalRecorder,
    /// A connection of the test's own.
    pub conn: Connection,
    /// ferry.toml.
    pub config: PathBuf,
    /// The file the LED writes its colours to.
    pub led_file: PathBuf,
    /// The sample data that is backed up.
    pub data: PathBuf,
    /// The borg repository.
    pub repository: PathBuf,
    /// The file holding the repository's passphrase.
    pub passphrase_file: PathBuf,
    /// Where the drive is mounted while open.
    pub mountpoint: PathBuf,
    /// The private bus (last: dropped after everything on it).
    pub bus: TestBus,
}

impl FerrySystem {
    /// Builds the sample data, repository, drive and configuration, and
    /// starts all six services. `say` receives a line per step.
    pub async fn start(options: Options, say: &dyn Fn(&str)) -> FerrySystem {
        let bus = if options.open_bus {
            TestBus::start_open_to_everyone()
        } else {
            TestBus::start()
        };
        let work = bus.dir().to_path_buf();
        let data = work.join("data");
        say(&format!(
            "sample data: {} files of {} KiB in {}",
            options.sample_files,
            options.sample_kib,
            data.display()
        ));
        make_sample_data(&data, options.sample_files, options.sample_kib);

        let repository = work.join("repo");
        let passphrase_file = work.join("repo.passphrase");
        write_secret(&passphrase_file, &format!("demo-{}", random_uuid()));
        say(&format!(
            "borg repository: borg init --encryption=repokey-blake2 {}",
            repository.display()
        ));
        borg_init(&repository, &passphrase_file);

        let smtp = Smtp::start(&work.join("smtp"), 0);
        say(&format!(
            "SMTP server (aiosmtpd) on 127.0.0.1:{}",
            smtp.port
        ));

        let keys = work.join("keys");
        std::fs::create_dir_all(&keys).expect("key directory");
        set_mode(&keys, 0o700);
        let led_file = work.join("led");
        let mountpoint = if options.private_mountpoint {
            work.join("mnt").join(DRIVE)
        } else {
            Path::new("/run/ferry").join(DRIVE)
        };
        let mut text = format!(
            r#"state-directory = "{state}"

[repositories.{PROFILE}]
path = "{repo}"
passphrase-file = "{pass}"

[profiles.{PROFILE}]
repository = "{PROFILE}"
sources = ["{data}"]
compression = "lz4"
archive-name-format = "{PROFILE}-{{now:%Y-%m-%dT%H:%M:%S.%f}}"
interval = "1 day"

[profiles.{PROFILE}.retention]
keep-daily = 7

[profiles.{PROFILE}.checks]
repository = "always"

[crypt]
key-directory = "{keys}"

[led]
backend = "file"
file = "{led}"

[mail]
transport = "smtp"
from = "ferry@demo.invalid"
to = ["you@demo.invalid"]
smtp-host = "127.0.0.1"
smtp-port = {port}
security = "none"
retry-min-seconds = 1
retry-max-seconds = 5

[notify]
sync-success = true
"#,
            state = work.join("state").display(),
            repo = repository.display(),
            pass = passphrase_file.display(),
            data = data.display(),
            keys = keys.display(),
            led = led_file.display(),
            port = smtp.port,
        );
        std::fs::create_dir_all(work.join("state")).expect("state directory");
        let config = work.join("ferry.toml");
        std::fs::write(&config, &text).expect("write ferry.toml");

        let mut drive = LoopImage::blank(&work, options.drive_mib);
        let device = drive.attach();
        say(&format!(
            "enrolling {device} as drive {DRIVE}: ferry-crypt enroll --plain"
        ));
        let enrolled = run(
            &crate::binary_path("ferry-crypt").to_string_lossy(),
            &[
                "enroll",
                "--drive",
                DRIVE,
                "--plain",
                "--config",
                &config.to_string_lossy(),
                "--yes-destroy-all-data-on",
                &device,
                &device,
            ],
        );
        let uuid = enrolled
            .lines()
            .find_map(|l| {
                l.strip_prefix("uuid = \"")
                    .and_then(|rest| rest.strip_suffix('"'))
            })
            .unwrap_or_else(|| panic!("ferry-crypt enroll printed no uuid:\n{enrolled}"))
            .to_string();
        drive.detach();
        text.push_str(&format!(
            "\n[drives.{DRIVE}]\nuuid = \"{uuid}\"\nmountpoint = \"{}\"\nrepositories = [\"{PROFILE}\"]\n",
            mountpoint.display()
        ));
        std::fs::write(&config, &text).expect("write ferry.toml");

        let conn = bus.connect().await;
        let signals = SignalRecorder::new(&conn).await;
        let mut system = FerrySystem {
            services: BTreeMap::new(),
            drive,
            drive_uuid: uuid,
            smtp,
            signals,
            conn,
            config,
            led_file,
            data,
            repository,
            passphrase_file,
            mountpoint,
            bus,
        };
        for (binary, _) in SERVICES {
            system.start_service(binary, options.log).await;
            say(&format!(
                "started {binary} (pid {})",
                system.services[binary].pid()
            ));
        }
        system
    }

    /// Starts (or restarts) one service and waits until it owns its name.
    pub async fn start_service(&mut self, binary: &'static str, log: &str) {
        let name = SERVICES
            .iter()
            .find(|(b, _)| *b == binary)
            .map(|(_, n)| *n)
            .expect("a ferry service");
        self.services.remove(binary);
        let config = self.config.to_string_lossy().into_owned();
        let process = self
            .bus
            .spawn(binary, &["--config", &config], &[("RUST_LOG", log)]);
        process.wait_for_name(&self.conn, name, START).await;
        self.services.insert(binary, process);
    }

    /// The work directory (removed with the system).
    pub fn work(&self) -> &Path {
        self.bus.dir()
    }

    /// The colours the LED wrote, in order.
    pub fn led_colours(&self) -> Vec<String> {
        std::fs::read_to_string(&self.led_file)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Whether anything is mounted at the drive's mountpoint.
    pub fn drive_mounted(&self) -> bool {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let wanted = self.mountpoint.to_string_lossy();
        mounts
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(wanted.as_ref()))
    }

    /// The archives in the repository (borg list, passphrase from its file).
    pub fn archives(&self) -> Vec<String> {
        borg_list(&self.repository, &self.passphrase_file)
    }
}

fn make_sample_data(dir: &Path, files: usize, kib: usize) {
    std::fs::create_dir_all(dir.join("documents")).expect("data dir");
    // Deterministic, incompressible-ish content: an xorshift stream.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..files {
        let mut bytes = Vec::with_capacity(kib * 1024);
        while bytes.len() < kib * 1024 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bytes.extend_from_slice(&state.to_le_bytes());
        }
        let sub = if i % 2 == 0 { "documents" } else { "" };
        std::fs::write(dir.join(sub).join(format!("file-{i:03}.bin")), &bytes)
            .expect("sample file");
    }
    std::fs::write(dir.join("README.txt"), "ferry demo data\n").expect("sample file");
}

fn write_secret(path: &Path, secret: &str) {
    std::fs::write(path, secret).expect("write secret");
    set_mode(path, 0o600);
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A borg command with the passphrase read from its file by borg itself.
fn borg(passphrase_file: &Path) -> Command {
    let mut command = Command::new("borg");
    command
        .env(
            "BORG_PASSCOMMAND",
            format!("cat {}", passphrase_file.display()),
        )
        .env(
            "BORG_BASE_DIR",
            passphrase_file
                .parent()
                .unwrap_or(Path::new("/tmp"))
                .join("borg-base"),
        )
        .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "no");
    command
}

fn borg_init(repository: &Path, passphrase_file: &Path) {
    let output = borg(passphrase_file)
        .args(["init", "--encryption=repokey-blake2"])
        .arg(repository)
        .output()
        .expect("run borg init");
    assert!(
        output.status.success(),
        "borg init: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The archive names in a repository.
pub fn borg_list(repository: &Path, passphrase_file: &Path) -> Vec<String> {
    let output = borg(passphrase_file)
        .args(["list", "--short"])
        .arg(repository)
        .output()
        .expect("run borg list");
    assert!(
        output.status.success(),
        "borg list: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}
