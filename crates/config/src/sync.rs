//! `[sync]`: how ferry-sync copies repositories onto drives. Owned by the
//! sync worker's issue.

use serde::Deserialize;

use crate::Config;

/// `[sync]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SyncSettings {}

/// Checks that need the whole configuration.
pub(crate) fn check(_config: &Config) -> Result<(), (Vec<String>, String)> {
    Ok(())
}
