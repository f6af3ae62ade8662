//! `[crypt]`: how ferry-crypt opens and closes drives, and where enrolment
//! puts new key files. Owned by the crypt manager's issue.

use serde::Deserialize;

use crate::{AbsolutePath, Config};

/// `[crypt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CryptSettings {
    /// Where `ferry-crypt enroll` writes new key files and LUKS header backups.
    #[serde(default = "default_key_directory")]
    pub key_directory: AbsolutePath,
}

fn default_key_directory() -> AbsolutePath {
    AbsolutePath::from_static("/etc/ferry/keys")
}

impl Default for CryptSettings {
    fn default() -> Self {
        CryptSettings {
            key_directory: default_key_directory(),
        }
    }
}

/// Checks that need the whole configuration.
pub(crate) fn check(_config: &Config) -> Result<(), (Vec<String>, String)> {
    Ok(())
}
