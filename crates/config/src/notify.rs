//! `[mail]` and `[notify]`: how ferry-notifier reaches a person. Owned by
//! the notifier's issue.

use serde::Deserialize;

use crate::Config;

/// `[mail]`: the transport.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Mail {}

/// `[notify]`: what is mailed and when.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NotifySettings {}

/// Checks that need the whole configuration.
pub(crate) fn check(_config: &Config) -> Result<(), (Vec<String>, String)> {
    Ok(())
}
