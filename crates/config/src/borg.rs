//! `[borg]` and `[profiles.<name>]`: the backups ferry-borg runs. Owned by
//! the borg runner's issue.

use serde::Deserialize;

use crate::Config;

/// `[borg]`: settings for every profile.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BorgSettings {}

/// `[profiles.<name>]`: one backup profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Profile {}

/// Checks that need the whole configuration.
pub(crate) fn check(_config: &Config) -> Result<(), (Vec<String>, String)> {
    Ok(())
}
