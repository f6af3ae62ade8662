//! `ferryctl open|close|archives DRIVE`: a drive opened and closed with the
//! outcome awaited (so the exit status says what happened), and the
//! archives on a held drive listed without writing to it.
//!
//! `open --hold` asks ferry-crypt (Crypt1.OpenWith, "hold") to unlock, prove
//! and mount the drive read-only with no sync, for restoring from it.
//! `archives` runs `borg list` on the copy: the mount is read-only, borg is
//! told not to lock (`--bypass-lock`) and keeps its own files in a throwaway
//! BORG_BASE_DIR, so neither the drive nor borg's records of the local
//! repository change. The passphrase reaches borg on its standard input
//! (BORG_PASSPHRASE_FD=0), never in its arguments or environment.

use std::collections::HashMap;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use ferry_config::Config;
use ferry_interfaces::crypt::{self, CryptProxy};
use futures_util::StreamExt;
use zbus::zvariant::Value;

use crate::watch;

/// How long opening or closing may take before ferryctl stops waiting.
const OUTCOME_WAIT: Duration = Duration::from_secs(300);

/// Opens `drive` (held read-only with `hold`) and waits for the outcome.
pub async fn open(conn: &zbus::Connection, drive: &str, hold: bool) -> zbus::Result<ExitCode> {
    let mut signals = watch::signals(conn).await?;
    let crypt = CryptProxy::new(conn).await?;
    let expected = if hold {
        let mut options = HashMap::new();
        options.insert("hold", Value::from(true));
        crypt.open_with(drive, options).await?;
        "DriveHeld"
    } else {
        crypt.open(drive).await?;
        "DriveOpened"
    };
    outcome(&mut signals, drive, expected).await
}

/// Closes `drive` and waits for DriveClosed or DriveFailed.
pub async fn close(conn: &zbus::Connection, drive: &str) -> zbus::Result<ExitCode> {
    let mut signals = watch::signals(conn).await?;
    CryptProxy::new(conn).await?.close(drive).await?;
    outcome(&mut signals, drive, "DriveClosed").await
}

/// Waits for `expected` or DriveFailed about `drive`, prints it, and turns
/// it into an exit status.
async fn outcome(
    signals: &mut zbus::MessageStream,
    drive: &str,
    expected: &str,
) -> zbus::Result<ExitCode> {
    let wait = async {
        while let Some(message) = signals.next().await {
            let message = message?;
            let header = message.header();
            let (Some(interface), Some(member)) = (header.interface(), header.member()) else {
                continue;
            };
            if interface.as_str() != crypt::INTERFACE {
                continue;
            }
            let args = watch::arguments(&message);
            if args.first().map(String::as_str) != Some(drive) {
                continue;
            }
            let text =
                watch::describe(interface.as_str(), member.as_str(), &args).unwrap_or_default();
            if member.as_str() == expected {
                println!("{text}");
                return Ok(ExitCode::SUCCESS);
            }
            if member.as_str() == "DriveFailed" {
                eprintln!("{text}");
                return Ok(ExitCode::FAILURE);
            }
        }
        eprintln!("ferryctl: the bus connection ended before {drive} did");
        Ok(ExitCode::FAILURE)
    };
    match tokio::time::timeout(OUTCOME_WAIT, wait).await {
        Ok(result) => result,
        Err(_) => {
            eprintln!(
                "ferryctl: no word on {drive} within {} s; `ferryctl status` shows where it is",
                OUTCOME_WAIT.as_secs()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Lists the archives of every repository copy on the open or held `drive`.
pub async fn archives(
    conn: &zbus::Connection,
    drive: &str,
    config: &Path,
) -> zbus::Result<ExitCode> {
    let config = match Config::load(config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ferryctl: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let Some((name, entry)) = config.drives.iter().find(|(n, _)| n.as_str() == drive) else {
        eprintln!("ferryctl: no drive named {drive} is enrolled in ferry.toml");
        return Ok(ExitCode::FAILURE);
    };
    let state = CryptProxy::new(conn)
        .await?
        .drives()
        .await?
        .into_iter()
        .find(|d| d.name == drive)
        .map(|d| d.state)
        .unwrap_or_default();
    if state != "held" && state != "open" {
        eprintln!(
            "ferryctl: {drive} is {} — open it read-only first: ferryctl open {drive} --hold",
            if state.is_empty() {
                "unknown to ferry-crypt"
            } else {
                &state
            }
        );
        return Ok(ExitCode::FAILURE);
    }
    let mountpoint = entry.mountpoint(name);
    let mut code = ExitCode::SUCCESS;
    for repository in &entry.repositories {
        let copy = mountpoint
            .join(&config.sync.directory)
            .join(repository.as_str());
        println!("{repository} on {drive} ({}):", copy.display());
        let passphrase = config
            .repositories
            .get(repository)
            .and_then(|r| r.passphrase_file.as_ref());
        match list(&config.borg.program, &copy, passphrase.map(|p| p.as_ref())).await {
            Ok(lines) if lines.is_empty() => println!("  no archives"),
            Ok(lines) => lines.iter().for_each(|l| println!("  {l}")),
            Err(e) => {
                eprintln!("  cannot list: {e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}

/// `borg list` of `copy`, read-only: no lock, a throwaway BORG_BASE_DIR, the
/// passphrase (if any) on standard input.
async fn list(
    program: &str,
    copy: &Path,
    passphrase: Option<&Path>,
) -> Result<Vec<String>, String> {
    let base = tempfile::Builder::new()
        .prefix("ferryctl-borg-")
        .tempdir()
        .map_err(|e| format!("cannot make a scratch directory for borg: {e}"))?;
    let stdin = match passphrase {
        Some(path) => Stdio::from(std::fs::File::open(path).map_err(|e| {
            format!(
                "cannot read the passphrase file {}: {e} (run as root)",
                path.display()
            )
        })?),
        None => Stdio::null(),
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args([
            "list",
            "--bypass-lock",
            "--format",
            "{archive}{TAB}{time}{NL}",
        ])
        .arg(copy)
        .env("BORG_BASE_DIR", base.path())
        .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
        .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
        .env_remove("BORG_PASSPHRASE")
        .env_remove("BORG_PASSCOMMAND")
        .stdin(stdin)
        .kill_on_drop(true);
    if passphrase.is_some() {
        command.env("BORG_PASSPHRASE_FD", "0");
    } else {
        command.env("BORG_PASSPHRASE", "");
    }
    let output = command
        .output()
        .await
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| l.replace('\t', "  "))
        .collect())
}
