//! The command line every service shares: `--config PATH`, `--help`, `--version`.

use std::path::PathBuf;
use std::process::ExitCode;

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// The configuration file.
    pub config: PathBuf,
}

impl Args {
    /// Parses the arguments after the program name. On `--help`,
    /// `--version` or a mistake it prints and returns the exit code.
    pub fn parse(service: &str, args: impl IntoIterator<Item = String>) -> Result<Args, ExitCode> {
        let mut config = PathBuf::from(ferry_config::DEFAULT_PATH);
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--config" | "-c" => match args.next() {
                    Some(path) => config = PathBuf::from(path),
                    None => return Err(usage(service, "--config needs a file")),
                },
                "--help" | "-h" => {
                    println!("{}", help(service));
                    return Err(ExitCode::SUCCESS);
                }
                "--version" | "-V" => {
                    println!("{service} {}", env!("CARGO_PKG_VERSION"));
                    return Err(ExitCode::SUCCESS);
                }
                other => match other.strip_prefix("--config=") {
                    Some(path) => config = PathBuf::from(path),
                    None => {
                        return Err(usage(
                            service,
                            &format!("unknown argument `{}`", other.escape_debug()),
                        ))
                    }
                },
            }
        }
        Ok(Args { config })
    }
}

fn help(service: &str) -> String {
    format!(
        "usage: {service} [--config FILE]\n\n  --config FILE  ferry's configuration (default {})\n\nLog filter: FERRY_LOG (or RUST_LOG), e.g. FERRY_LOG=debug.\nBus: the system bus, or DBUS_SYSTEM_BUS_ADDRESS.",
        ferry_config::DEFAULT_PATH
    )
}

fn usage(service: &str, problem: &str) -> ExitCode {
    eprintln!("{service}: {problem}\n{}", help(service));
    ExitCode::from(64)
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
            parse(&[]).map(|a| a.config),
            Ok(PathBuf::from("/etc/ferry/ferry.toml"))
        );
        assert_eq!(
            parse(&["--config", "/x.toml"]).map(|a| a.config),
            Ok(PathBuf::from("/x.toml"))
        );
        assert_eq!(
            parse(&["--config=/y.toml"]).map(|a| a.config),
            Ok(PathBuf::from("/y.toml"))
        );
    }

    #[test]
    fn mistakes_are_usage_errors() {
        assert_eq!(parse(&["--config"]), Err(ExitCode::from(64)));
        assert_eq!(parse(&["--frobnicate"]), Err(ExitCode::from(64)));
    }
}
