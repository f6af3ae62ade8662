//! ferry's D-Bus contract.
//!
//! Services never link each other's code: they agree only on what is in this
//! crate and in the introspection XML beside it (`xml/`), which is the truth.
//! Every bus name, object path and interface name is defined once, as a
//! constant in its module below. The zbus proxy attributes need string
//! literals; the test `proxies_agree_with_constants` holds them equal.
//!
//! Each service's bus name equals its interface name.

mod error;
mod events;
mod types;
mod wire;

pub use error::Error;
pub use events::{DecodeError, FerrySignal};
pub use types::*;
pub use wire::{CryptStage, CryptState, HealthDecision, HealthVerdict, LedState};

/// Re-exported so users of the proxies need no direct zbus dependency.
pub use zbus;

/// org.ferry.DriveWatcher1: which enrolled drives are plugged in.
pub mod drive_watcher {
    use super::*;

    /// The well-known bus name the service owns.
    pub const BUS_NAME: &str = INTERFACE;
    /// The interface name (equal to the bus name).
    pub const INTERFACE: &str = "org.ferry.DriveWatcher1";
    /// The object path the interface is served at.
    pub const OBJECT_PATH: &str = "/org/ferry/DriveWatcher1";
    /// The introspection XML that is the contract for this interface.
    pub const XML: &str = include_str!("../xml/org.ferry.DriveWatcher1.xml");

    /// Client side of org.ferry.DriveWatcher1.
    #[zbus::proxy(
        interface = "org.ferry.DriveWatcher1",
        default_service = "org.ferry.DriveWatcher1",
        default_path = "/org/ferry/DriveWatcher1"
    )]
    pub trait DriveWatcher {
        /// Enumerate again; re-announce every present drive.
        fn rescan(&self) -> zbus::Result<u32>;
        /// Every enrolled drive with its attached state.
        #[zbus(property)]
        fn drives(&self) -> zbus::Result<Vec<WatchedDrive>>;
        /// An enrolled drive appeared.
        #[zbus(signal)]
        fn drive_attached(&self, drive: &str, device: &str, uuid: &str) -> zbus::Result<()>;
        /// An enrolled drive went away.
        #[zbus(signal)]
        fn drive_detached(&self, drive: &str, uuid: &str) -> zbus::Result<()>;
    }
}

/// org.ferry.Crypt1: unlock, mount, prove identity, unmount, lock.
pub mod crypt {
    use super::*;

    /// The well-known bus name the service owns.
    pub const BUS_NAME: &str = INTERFACE;
    /// The interface name (equal to the bus name).
    pub const INTERFACE: &str = "org.ferry.Crypt1";
    /// The object path the interface is served at.
    pub const OBJECT_PATH: &str = "/org/ferry/Crypt1";
    /// The introspection XML that is the contract for this interface.
    pub const XML: &str = include_str!("../xml/org.ferry.Crypt1.xml");

    /// Client side of org.ferry.Crypt1.
    #[zbus::proxy(
        interface = "org.ferry.Crypt1",
        default_service = "org.ferry.Crypt1",
        default_path = "/org/ferry/Crypt1"
    )]
    pub trait Crypt {
        /// Open a drive; the outcome arrives as a signal.
        fn open(&self, drive: &str) -> zbus::Result<()>;
        /// Open a drive with options ("hold": b — read-only, no sync, until
        /// Close); the outcome arrives as a signal.
        fn open_with(
            &self,
            drive: &str,
            options: std::collections::HashMap<&str, zbus::zvariant::Value<'_>>,
        ) -> zbus::Result<()>;
        /// Close a drive; the outcome arrives as a signal.
        fn close(&self, drive: &str) -> zbus::Result<()>;
        /// Every enrolled drive's state.
        #[zbus(property)]
        fn drives(&self) -> zbus::Result<Vec<CryptDrive>>;
        /// The most recent failure per drive.
        #[zbus(property)]
        fn last_failures(&self) -> zbus::Result<Vec<Failure>>;
        /// Every failure, oldest first, the newest 64, with unique ids.
        #[zbus(property)]
        fn failure_history(&self) -> zbus::Result<Vec<FailureEvent>>;
        /// Each drive's latest SMART health reading.
        #[zbus(property)]
        fn health(&self) -> zbus::Result<Vec<DriveHealth>>;
        /// A drive is open at `mountpoint`.
        #[zbus(signal)]
        fn drive_opened(&self, drive: &str, mountpoint: &str) -> zbus::Result<()>;
        /// The drive is open read-only for a person; nothing syncs it.
        #[zbus(signal)]
        fn drive_held(&self, drive: &str, mountpoint: &str) -> zbus::Result<()>;
        /// A drive is closed: safe to remove.
        #[zbus(signal)]
        fn drive_closed(&self, drive: &str) -> zbus::Result<()>;
        /// Opening or closing a drive failed.
        #[zbus(signal)]
        fn drive_failed(&self, drive: &str, stage: &str, message: &str) -> zbus::Result<()>;
    }
}

/// org.ferry.Sync1: copy borg repositories onto an opened drive.
pub mod sync {
    use super::*;

    /// The well-known bus name the service owns.
    pub const BUS_NAME: &str = INTERFACE;
    /// The interface name (equal to the bus name).
    pub const INTERFACE: &str = "org.ferry.Sync1";
    /// The object path the interface is served at.
    pub const OBJECT_PATH: &str = "/org/ferry/Sync1";
    /// The introspection XML that is the contract for this interface.
    pub const XML: &str = include_str!("../xml/org.ferry.Sync1.xml");

    /// Client side of org.ferry.Sync1.
    #[zbus::proxy(
        interface = "org.ferry.Sync1",
        default_service = "org.ferry.Sync1",
        default_path = "/org/ferry/Sync1"
    )]
    pub trait Sync {
        /// Sync an opened drive now.
        fn start(&self, drive: &str) -> zbus::Result<()>;
        /// Stop a running sync.
        fn cancel(&self, drive: &str) -> zbus::Result<()>;
        /// Running jobs.
        #[zbus(property)]
        fn running(&self) -> zbus::Result<Vec<SyncJob>>;
        /// The last successful sync per drive.
        #[zbus(property)]
        fn last_syncs(&self) -> zbus::Result<Vec<SyncRecord>>;
        /// The most recent failure per drive.
        #[zbus(property)]
        fn last_failures(&self) -> zbus::Result<Vec<Failure>>;
        /// Every failure, oldest first, the newest 64, with unique ids.
        #[zbus(property)]
        fn failure_history(&self) -> zbus::Result<Vec<FailureEvent>>;
        /// Per drive, how well its copies are verified.
        #[zbus(property)]
        fn verification(&self) -> zbus::Result<Vec<DriveVerification>>;
        /// Copying a repository began.
        #[zbus(signal)]
        fn sync_started(&self, drive: &str, repository: &str) -> zbus::Result<()>;
        /// Bytes copied so far, and each change of phase.
        #[zbus(signal)]
        fn sync_progress(
            &self,
            drive: &str,
            done: u64,
            total: u64,
            phase: &str,
        ) -> zbus::Result<()>;
        /// Every repository copied, verified and durable.
        #[zbus(signal)]
        fn sync_finished(&self, drive: &str, bytes: u64, seconds: f64) -> zbus::Result<()>;
        /// The sync stopped; the previous copy stands.
        #[zbus(signal)]
        fn sync_failed(&self, drive: &str, stage: &str, message: &str) -> zbus::Result<()>;
    }
}

/// org.ferry.Borg1: run borg backups.
pub mod borg {
    use super::*;

    /// The well-known bus name the service owns.
    pub const BUS_NAME: &str = INTERFACE;
    /// The interface name (equal to the bus name).
    pub const INTERFACE: &str = "org.ferry.Borg1";
    /// The object path the interface is served at.
    pub const OBJECT_PATH: &str = "/org/ferry/Borg1";
    /// The introspection XML that is the contract for this interface.
    pub const XML: &str = include_str!("../xml/org.ferry.Borg1.xml");

    /// Client side of org.ferry.Borg1.
    #[zbus::proxy(
        interface = "org.ferry.Borg1",
        default_service = "org.ferry.Borg1",
        default_path = "/org/ferry/Borg1"
    )]
    pub trait Borg {
        /// Run a profile now; returns the job id.
        fn start(&self, profile: &str) -> zbus::Result<String>;
        /// Stop a running job.
        fn cancel(&self, job: &str) -> zbus::Result<()>;
        /// borg's statistics of a profile's last archive, as JSON.
        fn get_stats(&self, profile: &str) -> zbus::Result<String>;
        /// Every configured profile.
        #[zbus(property)]
        fn profiles(&self) -> zbus::Result<Vec<String>>;
        /// Running jobs.
        #[zbus(property)]
        fn jobs(&self) -> zbus::Result<Vec<BackupJob>>;
        /// The last result per profile.
        #[zbus(property)]
        fn last_results(&self) -> zbus::Result<Vec<BackupResult>>;
        /// When each profile is next due, and what blocks it.
        #[zbus(property)]
        fn schedule(&self) -> zbus::Result<Vec<ScheduleEntry>>;
        /// The most recent failure per profile.
        #[zbus(property)]
        fn last_failures(&self) -> zbus::Result<Vec<Failure>>;
        /// Every failure, oldest first, the newest 64, with unique ids.
        #[zbus(property)]
        fn failure_history(&self) -> zbus::Result<Vec<FailureEvent>>;
        /// A job began.
        #[zbus(signal)]
        fn backup_started(&self, job: &str, profile: &str) -> zbus::Result<()>;
        /// borg create's progress.
        #[zbus(signal)]
        fn backup_progress(&self, job: &str, bytes: u64, files: u64) -> zbus::Result<()>;
        /// A job succeeded.
        #[zbus(signal)]
        fn backup_finished(&self, job: &str, profile: &str, archive: &str) -> zbus::Result<()>;
        /// A job failed.
        #[zbus(signal)]
        fn backup_failed(
            &self,
            job: &str,
            profile: &str,
            stage: &str,
            message: &str,
        ) -> zbus::Result<()>;
        /// A job was skipped, not failed.
        #[zbus(signal)]
        fn backup_skipped(&self, job: &str, profile: &str, reason: &str) -> zbus::Result<()>;
        /// A job made its archive but borg warned (exit 1).
        #[zbus(signal)]
        fn backup_finished_with_warnings(
            &self,
            job: &str,
            profile: &str,
            archive: &str,
            warnings: &str,
        ) -> zbus::Result<()>;
    }
}

/// org.ferry.Led1: the status LED.
pub mod led {
    use super::*;

    /// The well-known bus name the service owns.
    pub const BUS_NAME: &str = INTERFACE;
    /// The interface name (equal to the bus name).
    pub const INTERFACE: &str = "org.ferry.Led1";
    /// The object path the interface is served at.
    pub const OBJECT_PATH: &str = "/org/ferry/Led1";
    /// The introspection XML that is the contract for this interface.
    pub const XML: &str = include_str!("../xml/org.ferry.Led1.xml");

    /// Client side of org.ferry.Led1.
    #[zbus::proxy(
        interface = "org.ferry.Led1",
        default_service = "org.ferry.Led1",
        default_path = "/org/ferry/Led1"
    )]
    pub trait Led {
        /// Leave the failed state.
        fn acknowledge(&self) -> zbus::Result<()>;
        /// Cycle through the colours.
        fn test(&self) -> zbus::Result<()>;
        /// The colour shown now (the property Color; the Rust name avoids a
        /// clash with the ColorChanged signal's stream).
        #[zbus(property, name = "Color")]
        fn current_color(&self) -> zbus::Result<String>;
        /// idle, working, done or failed.
        #[zbus(property)]
        fn state(&self) -> zbus::Result<String>;
        /// Why the LED is in its state.
        #[zbus(property)]
        fn reason(&self) -> zbus::Result<String>;
        /// blinkstick, file or none.
        #[zbus(property)]
        fn backend(&self) -> zbus::Result<String>;
        /// Whether the backend's device is there.
        #[zbus(property)]
        fn device_present(&self) -> zbus::Result<bool>;
        /// The LED changed colour.
        #[zbus(signal)]
        fn color_changed(&self, color: &str, state: &str) -> zbus::Result<()>;
    }
}

/// org.ferry.Notifier1: mail a person.
pub mod notifier {
    use super::*;

    /// The well-known bus name the service owns.
    pub const BUS_NAME: &str = INTERFACE;
    /// The interface name (equal to the bus name).
    pub const INTERFACE: &str = "org.ferry.Notifier1";
    /// The object path the interface is served at.
    pub const OBJECT_PATH: &str = "/org/ferry/Notifier1";
    /// The introspection XML that is the contract for this interface.
    pub const XML: &str = include_str!("../xml/org.ferry.Notifier1.xml");

    /// Client side of org.ferry.Notifier1.
    #[zbus::proxy(
        interface = "org.ferry.Notifier1",
        default_service = "org.ferry.Notifier1",
        default_path = "/org/ferry/Notifier1"
    )]
    pub trait Notifier {
        /// Queue a test message.
        fn send_test(&self) -> zbus::Result<String>;
        /// A systemd unit failed.
        fn unit_failed(&self, unit: &str) -> zbus::Result<String>;
        /// Deliver pending messages now.
        fn flush(&self) -> zbus::Result<()>;
        /// The dead letters, oldest first.
        fn list_dead_letters(
            &self,
            options: std::collections::HashMap<&str, zbus::zvariant::Value<'_>>,
        ) -> zbus::Result<Vec<DeadLetter>>;
        /// Put a dead letter back into the outbox.
        fn resend_dead_letter(
            &self,
            id: &str,
            options: std::collections::HashMap<&str, zbus::zvariant::Value<'_>>,
        ) -> zbus::Result<()>;
        /// Messages waiting for delivery.
        #[zbus(property)]
        fn pending(&self) -> zbus::Result<u32>;
        /// Messages refused permanently.
        #[zbus(property)]
        fn dead_letters(&self) -> zbus::Result<u32>;
        /// The last delivery error.
        #[zbus(property)]
        fn last_error(&self) -> zbus::Result<String>;
        /// The server accepted a message.
        #[zbus(signal)]
        fn notification_sent(&self, id: &str, subject: &str) -> zbus::Result<()>;
        /// A message was written to the outbox.
        #[zbus(signal)]
        fn notification_queued(&self, id: &str, reason: &str) -> zbus::Result<()>;
    }
}

/// Every interface of the contract, as (interface name, object path, XML).
pub const ALL: [(&str, &str, &str); 6] = [
    (
        drive_watcher::INTERFACE,
        drive_watcher::OBJECT_PATH,
        drive_watcher::XML,
    ),
    (crypt::INTERFACE, crypt::OBJECT_PATH, crypt::XML),
    (sync::INTERFACE, sync::OBJECT_PATH, sync::XML),
    (borg::INTERFACE, borg::OBJECT_PATH, borg::XML),
    (led::INTERFACE, led::OBJECT_PATH, led::XML),
    (notifier::INTERFACE, notifier::OBJECT_PATH, notifier::XML),
];
