//! Errors that point a person at the exact place in ferry.toml to fix.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::locate;

/// Why ferry.toml was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        reason: String,
    },
    /// The file was read and is wrong.
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending key or value, when known.
        line: Option<usize>,
        /// The dotted key path, for example `drives.offsite-a.uuid`.
        key: String,
        /// What is wrong and, where possible, what to do.
        reason: String,
    },
}

impl ConfigError {
    pub(crate) fn from_toml(path: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
        let span = error.span();
        let key = span
            .as_ref()
            .map(|s| locate::key_at(text, s.start))
            .unwrap_or_default();
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line: span.map(|s| locate::line_of(text, s.start)),
            key,
            reason: error.message().trim().to_string(),
        }
    }

    pub(crate) fn invalid(path: &Path, text: &str, key: &[String], reason: String) -> ConfigError {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line: locate::span_of(text, key).map(|s| locate::line_of(text, s.start)),
            key: key.join("."),
            reason,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, reason } => {
                write!(
                    f,
                    "cannot read {}: {reason} (pass --config to use another file)",
                    path.display()
                )
            }
            ConfigError::Invalid {
                path,
                line,
                key,
                reason,
            } => {
                write!(f, "{}", path.display())?;
                if let Some(line) = line {
                    write!(f, ":{line}")?;
                }
                if !key.is_empty() {
                    write!(f, ": {key}")?;
                }
                write!(f, ": {reason}")
            }
        }
    }
}

impl std::error::Error for ConfigError {}
