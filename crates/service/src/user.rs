//! A user-level service: the same binary on the user's session bus, with
//! the user's own files (only ferry-borg has one; see `ferry-borg --user`).
//!
//! Seed 000 backs up a laptop from a *user* timer: `~` is the user's home,
//! the SSH key and agent are the user's, nothing runs as root. The places
//! follow the XDG base directories, so systemd's user manager and a shell
//! agree on them: the configuration is `$XDG_CONFIG_HOME/ferry/ferry.toml`
//! (`~/.config/ferry/ferry.toml`), the state `$XDG_STATE_HOME/ferry`
//! (`~/.local/state/ferry`) unless the file says `state-directory`.

use std::path::{Path, PathBuf};

/// Which bus a service is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    /// The system bus: root's services (the default).
    System,
    /// The user's session bus: a user-level service (`--user`).
    Session,
}

/// An XDG base directory: `$VAR` when it is absolute, else `~/<fallback>`.
fn base_directory(variable: &str, fallback: &str) -> PathBuf {
    std::env::var_os(variable)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| home().join(fallback))
}

/// The user's home: HOME (systemd sets it for user services).
fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// `~/.config/ferry/ferry.toml`.
pub fn config_path() -> PathBuf {
    base_directory("XDG_CONFIG_HOME", ".config").join("ferry/ferry.toml")
}

/// `~/.local/state/ferry`.
pub fn state_directory() -> PathBuf {
    base_directory("XDG_STATE_HOME", ".local/state").join("ferry")
}

/// The state directory a user-level service uses: the configured one, or
/// the user's own when the file left the system default.
pub fn user_state_directory(configured: &Path) -> PathBuf {
    if configured == Path::new(ferry_config::DEFAULT_STATE_DIRECTORY) {
        state_directory()
    } else {
        configured.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_users_places() {
        assert!(config_path().ends_with("ferry/ferry.toml"));
        assert!(state_directory().ends_with("ferry"));
        assert_eq!(
            user_state_directory(Path::new("/srv/mine")),
            Path::new("/srv/mine")
        );
        assert_eq!(
            user_state_directory(Path::new("/var/lib/ferry")),
            state_directory()
        );
    }
}
