//! ferry-crypt: the org.ferry.Crypt1 service, or with `enroll` the command
//! that prepares a new drive. One clap command line: the service's
//! `--config`, `--help` and `--version` are every ferry service's
//! ([`ferry_service::Args`]); `enroll` has its own options.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry_crypt::enroll::{self, EnrollArgs};

/// ferry-crypt: opens and closes ferry's drives (org.ferry.Crypt1 on the
/// system bus), or enrols a new one.
#[derive(Debug, Parser)]
#[command(
    name = "ferry-crypt",
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Without a command: the service that owns org.ferry.Crypt1 on the system bus.\n\
                  Log filter: FERRY_LOG (or RUST_LOG), e.g. FERRY_LOG=debug.\n\
                  Bus: the system bus, or DBUS_SYSTEM_BUS_ADDRESS."
)]
struct Cli {
    #[command(flatten)]
    service: ferry_service::Args,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Erase a device and prepare it as a ferry drive.
    #[command(long_about = enroll::ABOUT)]
    Enroll(EnrollArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(64),
            };
            let _ = e.print();
            return code;
        }
    };
    match cli.command {
        Some(Command::Enroll(args)) => enroll::main(args),
        // Parsed again there, the same way: the service's own conventions.
        None => ferry_service::main("ferry-crypt", ferry_crypt::run),
    }
}
