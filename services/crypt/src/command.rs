//! Running the helper programs ferry-crypt drives (cryptsetup, mount,
//! umount, mkfs.ext4, wipefs).
//!
//! One place decides how: the program is looked up in the sbin directories
//! too (a service's PATH may lack them), the locale is C so messages are the
//! ones this code expects, standard input is closed, the child dies with
//! ferry-crypt (so a killed service leaves no `mount` finishing behind its
//! successor's back), and a run that takes longer than its timeout is
//! killed with its whole process group. Arguments are plain paths and options:
//! callers pass secrets only as `--key-file PATH`, never as an argument.

use std::ffi::OsStr;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Why a helper program did not succeed.
#[derive(Debug)]
pub enum CommandError {
    /// The program is not installed.
    NotFound {
        /// The program's name.
        program: String,
    },
    /// It could not be started or waited for.
    Start {
        /// The program's name.
        program: String,
        /// The operating system's reason.
        reason: String,
    },
    /// It ran longer than allowed and was killed.
    TimedOut {
        /// The program's name.
        program: String,
        /// How long it was given.
        after: Duration,
    },
    /// It exited unsuccessfully.
    Failed {
        /// The program's name.
        program: String,
        /// Its exit code; `None` when a signal ended it.
        code: Option<i32>,
        /// What it printed on stderr (and stdout), trimmed.
        output: String,
    },
}

impl CommandError {
    /// The exit code, when the program ran and failed.
    pub fn code(&self) -> Option<i32> {
        match self {
            CommandError::Failed { code, .. } => *code,
            _ => None,
        }
    }

    /// What the program printed, when it ran and failed.
    pub fn output(&self) -> &str {
        match self {
            CommandError::Failed { output, .. } => output,
            _ => "",
        }
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::NotFound { program } => {
                let package = match program.as_str() {
                    "cryptsetup" => "cryptsetup-bin",
                    "mkfs.ext4" => "e2fsprogs",
                    "dmsetup" => "dmsetup",
                    _ => "util-linux",
                };
                write!(f, "{program} is not installed (apt-get install {package})")
            }
            CommandError::Start { program, reason } => write!(f, "cannot run {program}: {reason}"),
            CommandError::TimedOut { program, after } => {
                write!(
                    f,
                    "{program} did not finish within {after:?} and was killed"
                )
            }
            CommandError::Failed {
                program,
                code,
                output,
            } => {
                match code {
                    Some(code) => write!(f, "{program} failed (exit {code})")?,
                    None => write!(f, "{program} was killed by a signal")?,
                }
                if !output.is_empty() {
                    write!(f, ": {output}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for CommandError {}

/// One argument of a helper program: anything that is an OS string (a
/// `&str`, a `&Path`, a `&String`), so argument lists can mix them.
pub type Arg<'a> = &'a (dyn AsRef<OsStr> + Sync);

/// Where `program` is: in PATH, else in the usual sbin and bin directories.
pub fn program_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Runs `program` with `args` to completion and returns its stdout.
pub async fn run<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    timeout: Duration,
) -> Result<String, CommandError> {
    let path = program_path(program).ok_or_else(|| CommandError::NotFound {
        program: program.to_string(),
    })?;
    let mut command = tokio::process::Command::new(path);
    command.args(args).env("LC_ALL", "C");
    ferry_service::process::prepare_child(&mut command, Default::default());
    let child = command.spawn().map_err(|e| CommandError::Start {
        program: program.to_string(),
        reason: e.to_string(),
    })?;
    let group = child.id();
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => {
            return Err(CommandError::Start {
                program: program.to_string(),
                reason: e.to_string(),
            })
        }
        // Dropping the future drops the child, which kills it; its
        // group (anything it started) goes too.
        Err(_) => {
            ferry_service::process::signal_group(group, libc::SIGKILL);
            return Err(CommandError::TimedOut {
                program: program.to_string(),
                after: timeout,
            });
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let said = format!("{} {}", stderr.trim(), stdout.trim());
    Err(CommandError::Failed {
        program: program.to_string(),
        code: output.status.code(),
        output: said.split_whitespace().collect::<Vec<_>>().join(" "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_failure_and_timeout() {
        let t = Duration::from_secs(5);
        assert_eq!(run("echo", &["hello"], t).await.expect("echo"), "hello\n");
        let err = run("ls", &["/nonexistent-ferry"], t)
            .await
            .expect_err("ls fails");
        assert_eq!(err.code(), Some(2));
        assert!(err.to_string().starts_with("ls failed (exit 2): "), "{err}");
        assert!(err.output().contains("nonexistent-ferry"), "{err}");
        let err = run("sleep", &["5"], Duration::from_millis(100))
            .await
            .expect_err("times out");
        assert!(matches!(err, CommandError::TimedOut { .. }), "{err}");
        let err = run("ferry-no-such-program", &["x"], t)
            .await
            .expect_err("missing");
        assert!(err.to_string().contains("not installed"), "{err}");
    }
}
