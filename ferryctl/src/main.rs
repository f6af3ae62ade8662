//! ferryctl: ferry at a glance and at hand, in a person's words.
//!
//! A thin client of the six org.ferry interfaces: it keeps no state of its
//! own, and everything it shows busctl can read too. It answers the questions
//! people have — is my off-site copy current, when is the next backup, why
//! did it fail — and triggers what they want to do, with exit statuses that
//! scripts and systemd units can use.

mod check;
mod drive;
mod simulate;
mod status;
mod watch;
mod words;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use ferry_interfaces::borg::BorgProxy;
use ferry_interfaces::led::LedProxy;
use ferry_interfaces::sync::SyncProxy;
use futures_util::StreamExt;

/// Exit status of `backup --wait` when the job made its archive but borg
/// warned (exit 1 of borg).
const EXIT_WARNINGS: u8 = 2;
/// Exit status of `backup --wait` when the job was skipped (a precondition
/// did not hold, a hook asked to skip): EX_TEMPFAIL, "try again later".
const EXIT_SKIPPED: u8 = 75;
/// Exit status when the bus or a service cannot be reached.
const EXIT_UNREACHABLE: u8 = 69;

#[derive(Parser)]
#[command(
    name = "ferryctl",
    version,
    about = "ferry at a glance: drives, backups, the LED and mail, in a person's words",
    long_about = "ferry at a glance: drives, backups, the LED and mail, in a person's words.\n\n\
                  A client of ferry's D-Bus services (org.ferry.*); everything it shows, busctl can read too. \
                  Reading and watching is open to everyone; starting backups and opening or closing drives \
                  needs root or the group `ferry`."
)]
struct Cli {
    /// The bus to talk to (a D-Bus address); default the system bus
    /// (DBUS_SYSTEM_BUS_ADDRESS when set).
    #[arg(long, global = true, value_name = "ADDRESS")]
    address: Option<String>,
    /// Talk to the user's own ferry-borg on the session bus (`ferry-borg
    /// --user`, a `systemctl --user` service) instead of the system's.
    #[arg(long, global = true, conflicts_with = "address")]
    user: bool,
    /// ferry.toml, for what only it says (repositories of a drive, when a
    /// drive is stale); the services' answers come from the bus.
    /// [default: /etc/ferry/ferry.toml; with --user ~/.config/ferry/ferry.toml]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Simulated {
    /// Plugging in a drive: what would be copied, whether it fits, what is due.
    Plug {
        /// The drive, as named in ferry.toml.
        drive: String,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Drives, backups, the LED and mail: what is true now.
    Status {
        /// Print what the services report as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print every ferry signal as a readable line, live (no root needed).
    Watch,
    /// Start a backup profile now (what ferry-backup@PROFILE.service runs).
    Backup {
        /// The profile, as named in ferry.toml.
        profile: String,
        /// Wait for the job to end and print its summary; exit 0 when it
        /// finished, 2 when it finished with borg warnings, 75 when it was
        /// skipped, 1 when it failed.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (exit 1), e.g. "90s", "30 hours".
        #[arg(long, default_value = "30 hours", value_name = "DURATION", value_parser = parse_span)]
        timeout: Duration,
    },
    /// Copy the repositories onto an open drive now.
    Sync {
        /// The drive, as named in ferry.toml.
        drive: String,
    },
    /// Unlock and mount a drive (then it is synced and closed), or with
    /// --hold mount it read-only for restoring, with no sync, until `close`.
    Open {
        /// The drive, as named in ferry.toml.
        drive: String,
        /// Read-only, no sync, kept until `ferryctl close`.
        #[arg(long)]
        hold: bool,
    },
    /// List the archives on an open or held drive (writes nothing to it).
    Archives {
        /// The drive, as named in ferry.toml.
        drive: String,
    },
    /// Unmount and lock a drive.
    Close {
        /// The drive, as named in ferry.toml.
        drive: String,
    },
    /// Clear the LED's failure after reading what failed.
    Acknowledge,
    /// What would happen if a drive were plugged in now (writes nothing).
    Simulate {
        #[command(subcommand)]
        what: Simulated,
    },
    /// Check ferry.toml and every file it names; report every problem.
    CheckConfig {
        /// The configuration file.
        #[arg(default_value = ferry_config::DEFAULT_PATH)]
        file: PathBuf,
    },
    /// Print a shell completion script.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (ferryctl.1 and one per command) into a directory.
    Man {
        /// Where to write them.
        directory: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => return check_config(&file),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "ferryctl",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man { directory } => return man_pages(&directory),
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ferryctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(on_the_bus(cli))
}

impl Cli {
    /// ferry.toml: as given, else the system's, or with --user the user's
    /// (`$XDG_CONFIG_HOME/ferry/ferry.toml`, the user-level ferry-borg's).
    fn config_file(&self) -> PathBuf {
        if let Some(path) = &self.config {
            return path.clone();
        }
        if !self.user {
            return PathBuf::from(ferry_config::DEFAULT_PATH);
        }
        let absolute = |name: &str| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
        };
        absolute("XDG_CONFIG_HOME")
            .or_else(|| absolute("HOME").map(|home| home.join(".config")))
            .unwrap_or_else(|| PathBuf::from("/"))
            .join("ferry/ferry.toml")
    }
}

async fn connect(address: Option<&str>, user: bool) -> zbus::Result<zbus::Connection> {
    let builder = match (address, user) {
        (Some(address), _) => zbus::connection::Builder::address(address)?,
        (None, true) => zbus::connection::Builder::session()?,
        (None, false) => zbus::connection::Builder::system()?,
    };
    builder
        .method_timeout(Duration::from_secs(25))
        .build()
        .await
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn on_the_bus(cli: Cli) -> ExitCode {
    let config = cli.config_file();
    let conn = match connect(cli.address.as_deref(), cli.user).await {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("ferryctl: cannot connect to the bus: {e}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    let outcome: Result<ExitCode, zbus::Error> = async {
        match cli.command {
            Command::Status { json } => {
                let mut status = status::gather(&conn, now()).await;
                if let Ok(config) = ferry_config::Config::load(&config) {
                    status.drive_stale_days = Some(config.notify.drive_stale_days);
                }
                if json {
                    match serde_json::to_string_pretty(&status) {
                        Ok(text) => println!("{text}"),
                        Err(e) => {
                            eprintln!("ferryctl: cannot write JSON: {e}");
                            return Ok(ExitCode::FAILURE);
                        }
                    }
                } else {
                    print!("{}", status::render(&status));
                }
                Ok(if status.unreachable.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EXIT_UNREACHABLE)
                })
            }
            Command::Watch => {
                watch::run(&conn, now).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Backup {
                profile,
                wait,
                timeout,
            } => backup(&conn, &profile, wait, timeout).await,
            Command::Sync { drive } => {
                SyncProxy::new(&conn).await?.start(&drive).await?;
                println!("sync of {drive} started; `ferryctl watch` follows it");
                Ok(ExitCode::SUCCESS)
            }
            Command::Open { drive, hold } => drive::open(&conn, &drive, hold).await,
            Command::Close { drive } => drive::close(&conn, &drive).await,
            Command::Archives { drive } => drive::archives(&conn, &drive, &config).await,
            Command::Acknowledge => {
                LedProxy::new(&conn).await?.acknowledge().await?;
                println!("the LED's failure is acknowledged");
                Ok(ExitCode::SUCCESS)
            }
            Command::Simulate {
                what: Simulated::Plug { drive },
            } => simulate_plug(&conn, &drive, &config).await,
            Command::CheckConfig { .. } | Command::Completions { .. } | Command::Man { .. } => {
                Ok(ExitCode::SUCCESS)
            }
        }
    }
    .await;
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferryctl: {}", explain(&e));
            ExitCode::FAILURE
        }
    }
}

/// A bus error as a sentence: ferry's own errors carry one already.
fn explain(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, Some(text), _) => {
            if name.as_str() == "org.freedesktop.DBus.Error.AccessDenied" {
                format!("{text} (starting and changing things needs root or the group `ferry`)")
            } else {
                text.clone()
            }
        }
        zbus::Error::MethodError(name, None, _) => name.to_string(),
        other => other.to_string(),
    }
}

/// `backup PROFILE [--wait]`: start the job; with --wait, follow it to its
/// end (subscribed before Start, so its end cannot be missed) and exit with
/// its outcome.
async fn backup(
    conn: &zbus::Connection,
    profile: &str,
    wait: bool,
    timeout: Duration,
) -> Result<ExitCode, zbus::Error> {
    let mut signals = watch::signals(conn).await?;
    let mut owners = zbus::fdo::DBusProxy::new(conn)
        .await?
        .receive_name_owner_changed_with_args(&[(0, ferry_interfaces::borg::BUS_NAME)])
        .await?;
    let job = BorgProxy::new(conn).await?.start(profile).await?;
    println!("backup {profile} started as job {job}");
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        tokio::select! {
            message = signals.next() => {
                let Some(message) = message else {
                    eprintln!("ferryctl: the bus connection ended before job {job} did");
                    return Ok(ExitCode::FAILURE);
                };
                let message = message?;
                let header = message.header();
                let (Some(interface), Some(member)) = (header.interface(), header.member()) else {
                    continue;
                };
                if interface.as_str() != ferry_interfaces::borg::INTERFACE {
                    continue;
                }
                let args = watch::arguments(&message);
                if args.first().map(String::as_str) != Some(job.as_str()) {
                    continue;
                }
                let text = watch::describe(interface.as_str(), member.as_str(), &args)
                    .unwrap_or_default();
                match member.as_str() {
                    "BackupFinished" => {
                        println!("{text}{}", archive_size(conn, profile).await);
                        return Ok(ExitCode::SUCCESS);
                    }
                    "BackupFinishedWithWarnings" => {
                        println!("{text}{}", archive_size(conn, profile).await);
                        return Ok(ExitCode::from(EXIT_WARNINGS));
                    }
                    "BackupFailed" => {
                        eprintln!("{text}");
                        return Ok(ExitCode::FAILURE);
                    }
                    "BackupSkipped" => {
                        println!("{text}");
                        return Ok(ExitCode::from(EXIT_SKIPPED));
                    }
                    _ => {}
                }
            }
            change = owners.next() => {
                if let Some(change) = change {
                    if change.args().is_ok_and(|a| a.new_owner().is_none()) {
                        eprintln!("ferryctl: ferry-borg stopped while job {job} ran; its restart reports the job as interrupted");
                        return Ok(ExitCode::FAILURE);
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                eprintln!("ferryctl: job {job} did not end within {} s; it goes on (`ferryctl status`)", timeout.as_secs());
                return Ok(ExitCode::FAILURE);
            }
        }
    }
}

/// `simulate plug DRIVE`: the plan from ferry.toml, the local
/// repositories and what ferry-sync and ferry-borg report; writes nothing.
async fn simulate_plug(
    conn: &zbus::Connection,
    drive: &str,
    config: &std::path::Path,
) -> Result<ExitCode, zbus::Error> {
    let config = match ferry_config::Config::load(config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ferryctl: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let syncs = match SyncProxy::new(conn).await?.last_syncs().await {
        Ok(syncs) => syncs,
        Err(e) => {
            eprintln!(
                "ferryctl: ferry-sync did not answer ({}); assuming no sync was recorded",
                explain(&e)
            );
            vec![]
        }
    };
    let schedule = match BorgProxy::new(conn).await?.schedule().await {
        Ok(schedule) => schedule,
        Err(e) => {
            eprintln!(
                "ferryctl: ferry-borg did not answer ({}); due backups unknown",
                explain(&e)
            );
            vec![]
        }
    };
    let at = now();
    let plan = tokio::task::spawn_blocking({
        let drive = drive.to_string();
        move || simulate::plan(&config, &drive, &syncs, &schedule, at)
    })
    .await
    .map_err(|e| zbus::Error::Failure(format!("the estimate stopped: {e}")))?;
    match plan {
        Ok(simulation) => {
            print!("{}", simulate::render(&simulation, at));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("ferryctl: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// A duration as ferry.toml writes them ("90s", "30 hours").
fn parse_span(text: &str) -> Result<Duration, String> {
    ferry_config::Span::parse(text).map(|span| span.duration())
}

/// " (12.3 MiB read, 4.0 MiB new, 42 files, 3.1 s)" from Borg1.GetStats of
/// the profile's last archive, or nothing when it is not to be had.
async fn archive_size(conn: &zbus::Connection, profile: &str) -> String {
    let Ok(proxy) = BorgProxy::new(conn).await else {
        return String::new();
    };
    let Ok(stats) = proxy.get_stats(profile).await else {
        return String::new();
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&stats) else {
        return String::new();
    };
    let s = &value["archive"]["stats"];
    match (s["original_size"].as_u64(), s["nfiles"].as_u64()) {
        (Some(read), Some(files)) => format!(
            " ({} read, {} new, {files} files, {})",
            words::bytes(read),
            words::bytes(s["deduplicated_size"].as_u64().unwrap_or(0)),
            words::duration(value["archive"]["duration"].as_f64().unwrap_or(0.0))
        ),
        _ => String::new(),
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match check::check(file) {
        Ok(summary) => {
            println!(
                "{}: fine — {} drive(s), {} repository(ies), {} profile(s), every file it names checked",
                file.display(),
                summary.drives,
                summary.repositories,
                summary.profiles
            );
            ExitCode::SUCCESS
        }
        Err(problems) => {
            println!("{}: {} problem(s)", file.display(), problems.len());
            for problem in &problems {
                println!("  {}: {}", problem.place, problem.text);
            }
            ExitCode::FAILURE
        }
    }
}

fn man_pages(directory: &std::path::Path) -> ExitCode {
    let write = || -> std::io::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(directory)?;
        let command = Cli::command();
        let mut written = Vec::new();
        let mut page = |name: String, command: clap::Command| -> std::io::Result<()> {
            let path = directory.join(format!("{name}.1"));
            let mut out = Vec::new();
            clap_mangen::Man::new(command)
                .title(name.clone())
                .render(&mut out)?;
            std::fs::write(&path, out)?;
            written.push(path);
            Ok(())
        };
        page("ferryctl".into(), command.clone())?;
        for sub in command.get_subcommands() {
            page(format!("ferryctl-{}", sub.get_name()), sub.clone())?;
        }
        Ok(written)
    };
    match write() {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "ferryctl: cannot write man pages to {}: {e}",
                directory.display()
            );
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
