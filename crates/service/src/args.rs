//! The command line every service shares: `--config PATH`, `--help`,
//! `--version` — one clap definition, so all six services (and ferryctl,
//! which uses clap too) follow the same conventions.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser};

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(
    version,
    after_help = "Log filter: FERRY_LOG (or RUST_LOG), e.g. FERRY_LOG=debug.\n\
                  Bus: the system bus, or DBUS_SYSTEM_BUS_ADDRESS; with --user the session bus \
                  (DBUS_SESSION_BUS_ADDRESS)."
)]
pub struct Args {
    /// ferry's configuration file [default: /etc/ferry/ferry.toml, with
    /// --user ~/.config/ferry/ferry.toml].
    #[arg(short, long = "config", value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Run as the user's own service: on the session bus, with the user's
    /// configuration and state (only ferry-borg has a user-level service).
    #[arg(long)]
    pub user: bool,
}

impl Args {
    /// The configuration file: as given, else the system's or (with
    /// `--user`) the user's.
    pub fn config(&self) -> PathBuf {
        match (&self.config_file, self.user) {
            (Some(path), _) => path.clone(),
            (None, false) => PathBuf::from(ferry_config::DEFAULT_PATH),
            (None, true) => crate::user::config_path(),
        }
    }

    /// The bus the service goes on.
    pub fn bus(&self) -> crate::Bus {
        if self.user {
            crate::Bus::Session
        } else {
            crate::Bus::System
        }
    }

    /// Parses the arguments after the program name. On `--help`,
    /// `--version` or a mistake it prints and returns the exit code (64,
    /// EX_USAGE, for a mistake).
    pub fn parse(service: &str, args: impl IntoIterator<Item = String>) -> Result<Args, ExitCode> {
        let command = Args::command()
            .name(service.to_string())
            .bin_name(service.to_string())
            .about(format!(
                "{service}: one of ferry's services, on the system bus"
            ));
        let matches = command
            .try_get_matches_from(std::iter::once(service.to_string()).chain(args))
            .and_then(|m| Args::from_arg_matches(&m));
        match matches {
            Ok(args) => Ok(args),
            Err(e) => {
                let code = match e.kind() {
                    clap::error::ErrorKind::DisplayHelp
                    | clap::error::ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                    _ => ExitCode::from(64),
                };
                let _ = e.print();
                Err(code)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, ExitCode> {
        Args::parse("ferry-test", args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn config_defaults_and_overrides() {
        assert_eq!(
            parse(&[]).map(|a| a.config()),
            Ok(PathBuf::from("/etc/ferry/ferry.toml"))
        );
        assert_eq!(parse(&[]).map(|a| a.bus()), Ok(crate::Bus::System));
        assert_eq!(
            parse(&["--config", "/x.toml"]).map(|a| a.config()),
            Ok(PathBuf::from("/x.toml"))
        );
        assert_eq!(
            parse(&["--config=/y.toml"]).map(|a| a.config()),
            Ok(PathBuf::from("/y.toml"))
        );
        assert_eq!(
            parse(&["-c", "/z.toml"]).map(|a| a.config()),
            Ok(PathBuf::from("/z.toml"))
        );
        let user = parse(&["--user"]).expect("--user");
        assert_eq!(user.bus(), crate::Bus::Session);
        assert!(
            user.config().ends_with(".config/ferry/ferry.toml")
                || std::env::var_os("XDG_CONFIG_HOME").is_some()
        );
        assert_eq!(
            parse(&["--user", "-c", "/u.toml"]).map(|a| a.config()),
            Ok(PathBuf::from("/u.toml"))
        );
    }

    #[test]
    fn mistakes_are_usage_errors() {
        assert_eq!(parse(&["--config"]), Err(ExitCode::from(64)));
        assert_eq!(parse(&["--frobnicate"]), Err(ExitCode::from(64)));
    }

    #[test]
    fn help_and_version_succeed() {
        assert_eq!(parse(&["--help"]), Err(ExitCode::SUCCESS));
        assert_eq!(parse(&["--version"]), Err(ExitCode::SUCCESS));
    }
}
