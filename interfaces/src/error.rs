//! The named D-Bus errors every ferry service returns.
//!
//! A caller (a person with busctl, or another service) gets an error name it
//! can match on and a sentence it can act on, never one generic Failed.

/// Errors returned by ferry's D-Bus methods, named `org.ferry.Error.<Variant>`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.ferry.Error")]
pub enum Error {
    /// An error from zbus itself.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The drive name is not enrolled in ferry.toml.
    UnknownDrive(String),
    /// The profile name is not configured.
    UnknownProfile(String),
    /// No job with that id is known.
    UnknownJob(String),
    /// An argument is malformed.
    InvalidArgument(String),
    /// The drive is not plugged in.
    NotAttached(String),
    /// The drive is not open (unlocked and mounted).
    NotOpen(String),
    /// Nothing of that kind is running.
    NotRunning(String),
    /// Another operation on the same object is running.
    Busy(String),
    /// What was asked for does not exist (yet).
    NotFound(String),
    /// The caller may not do this.
    AccessDenied(String),
    /// The operation was attempted and failed.
    Failed(String),
}
