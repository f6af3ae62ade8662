//! One decoder for every org.ferry signal.
//!
//! Every service that listens to its peers (the LED, the notifier, crypt,
//! sync) needs the same thing: "is this message one of ferry's signals, and
//! which, with what arguments". [`FerrySignal::from_message`] answers it
//! once, from the interface and member in the header and the body's
//! signature, so a listener writes one `match` over owned values instead of
//! a chain of `from_message` + `args()` pairs, and a signal whose body does
//! not match the contract is an error it can log rather than a silent skip.

use zbus::message::Type as MessageType;

use crate::{borg, crypt, drive_watcher, led, notifier, sync};

/// A decoded org.ferry signal, with its arguments in wire order.
#[derive(Debug, Clone, PartialEq)]
pub enum FerrySignal {
    /// DriveWatcher1.DriveAttached(drive, device, uuid).
    DriveAttached {
        drive: String,
        device: String,
        uuid: String,
    },
    /// DriveWatcher1.DriveDetached(drive, uuid).
    DriveDetached { drive: String, uuid: String },
    /// Crypt1.DriveOpened(drive, mountpoint).
    DriveOpened { drive: String, mountpoint: String },
    /// Crypt1.DriveHeld(drive, mountpoint).
    DriveHeld { drive: String, mountpoint: String },
    /// Crypt1.DriveClosed(drive).
    DriveClosed { drive: String },
    /// Crypt1.DriveFailed(drive, stage, message); `stage` is a
    /// [`crate::CryptStage`] wire name (see [`FerrySignal::crypt_stage`]).
    DriveFailed {
        drive: String,
        stage: String,
        message: String,
    },
    /// Sync1.SyncStarted(drive, repository).
    SyncStarted { drive: String, repository: String },
    /// Sync1.SyncProgress(drive, done, total, phase).
    SyncProgress {
        drive: String,
        done: u64,
        total: u64,
        phase: String,
    },
    /// Sync1.SyncFinished(drive, bytes, seconds).
    SyncFinished {
        drive: String,
        bytes: u64,
        seconds: f64,
    },
    /// Sync1.SyncFailed(drive, stage, message).
    SyncFailed {
        drive: String,
        stage: String,
        message: String,
    },
    /// Borg1.BackupStarted(job, profile).
    BackupStarted { job: String, profile: String },
    /// Borg1.BackupProgress(job, bytes, files).
    BackupProgress { job: String, bytes: u64, files: u64 },
    /// Borg1.BackupFinished(job, profile, archive).
    BackupFinished {
        job: String,
        profile: String,
        archive: String,
    },
    /// Borg1.BackupFinishedWithWarnings(job, profile, archive, warnings).
    BackupFinishedWithWarnings {
        job: String,
        profile: String,
        archive: String,
        warnings: String,
    },
    /// Borg1.BackupFailed(job, profile, stage, message).
    BackupFailed {
        job: String,
        profile: String,
        stage: String,
        message: String,
    },
    /// Borg1.BackupSkipped(job, profile, reason).
    BackupSkipped {
        job: String,
        profile: String,
        reason: String,
    },
    /// Led1.ColorChanged(color, state).
    ColorChanged { color: String, state: String },
    /// Notifier1.NotificationSent(id, subject).
    NotificationSent { id: String, subject: String },
    /// Notifier1.NotificationQueued(id, reason).
    NotificationQueued { id: String, reason: String },
}

/// A message that claims to be an org.ferry signal but does not carry
/// what the contract says.
#[derive(Debug, thiserror::Error)]
#[error("{interface}.{member} does not carry the arguments the contract gives it: {source}")]
pub struct DecodeError {
    /// The signal's interface.
    pub interface: String,
    /// The signal's member.
    pub member: String,
    /// What deserialising the body said.
    #[source]
    pub source: Box<zbus::Error>,
}

impl FerrySignal {
    /// Decodes `message`: `Ok(None)` when it is not an org.ferry signal
    /// (another interface, a method call, a member the contract does not
    /// know), an error when it is one but its body does not match.
    pub fn from_message(message: &zbus::Message) -> Result<Option<FerrySignal>, DecodeError> {
        let header = message.header();
        if header.message_type() != MessageType::Signal {
            return Ok(None);
        }
        let (Some(interface), Some(member)) = (header.interface(), header.member()) else {
            return Ok(None);
        };
        let (interface, member) = (interface.as_str(), member.as_str());
        decode(message, interface, member).map_err(|source| DecodeError {
            interface: interface.to_string(),
            member: member.to_string(),
            source: Box::new(source),
        })
    }

    /// The signal's name, `Interface.Member` without the org.ferry prefix
    /// (for logs), e.g. `Crypt1.DriveOpened`.
    pub fn name(&self) -> &'static str {
        match self {
            FerrySignal::DriveAttached { .. } => "DriveWatcher1.DriveAttached",
            FerrySignal::DriveDetached { .. } => "DriveWatcher1.DriveDetached",
            FerrySignal::DriveOpened { .. } => "Crypt1.DriveOpened",
            FerrySignal::DriveHeld { .. } => "Crypt1.DriveHeld",
            FerrySignal::DriveClosed { .. } => "Crypt1.DriveClosed",
            FerrySignal::DriveFailed { .. } => "Crypt1.DriveFailed",
            FerrySignal::SyncStarted { .. } => "Sync1.SyncStarted",
            FerrySignal::SyncProgress { .. } => "Sync1.SyncProgress",
            FerrySignal::SyncFinished { .. } => "Sync1.SyncFinished",
            FerrySignal::SyncFailed { .. } => "Sync1.SyncFailed",
            FerrySignal::BackupStarted { .. } => "Borg1.BackupStarted",
            FerrySignal::BackupProgress { .. } => "Borg1.BackupProgress",
            FerrySignal::BackupFinished { .. } => "Borg1.BackupFinished",
            FerrySignal::BackupFinishedWithWarnings { .. } => "Borg1.BackupFinishedWithWarnings",
            FerrySignal::BackupFailed { .. } => "Borg1.BackupFailed",
            FerrySignal::BackupSkipped { .. } => "Borg1.BackupSkipped",
            FerrySignal::ColorChanged { .. } => "Led1.ColorChanged",
            FerrySignal::NotificationSent { .. } => "Notifier1.NotificationSent",
            FerrySignal::NotificationQueued { .. } => "Notifier1.NotificationQueued",
        }
    }

    /// DriveFailed's stage as a [`crate::CryptStage`]; `None` for another
    /// signal or a stage this build does not know.
    pub fn crypt_stage(&self) -> Option<crate::CryptStage> {
        match self {
            FerrySignal::DriveFailed { stage, .. } => crate::CryptStage::from_wire(stage),
            _ => None,
        }
    }
}

/// The signal `interface`.`member` with `message`'s body, if the contract
/// has it.
fn decode(
    message: &zbus::Message,
    interface: &str,
    member: &str,
) -> zbus::Result<Option<FerrySignal>> {
    let body = message.body();
    let signal = match (interface, member) {
        (drive_watcher::INTERFACE, "DriveAttached") => {
            let (drive, device, uuid) = body.deserialize()?;
            FerrySignal::DriveAttached {
                drive,
                device,
                uuid,
            }
        }
        (drive_watcher::INTERFACE, "DriveDetached") => {
            let (drive, uuid) = body.deserialize()?;
            FerrySignal::DriveDetached { drive, uuid }
        }
        (crypt::INTERFACE, _) => return decode_crypt(&body, member),
        (sync::INTERFACE, _) => return decode_sync(&body, member),
        (borg::INTERFACE, _) => return decode_borg(&body, member),
        (led::INTERFACE, "ColorChanged") => {
            let (color, state) = body.deserialize()?;
            FerrySignal::ColorChanged { color, state }
        }
        (notifier::INTERFACE, "NotificationSent") => {
            let (id, subject) = body.deserialize()?;
            FerrySignal::NotificationSent { id, subject }
        }
        (notifier::INTERFACE, "NotificationQueued") => {
            let (id, reason) = body.deserialize()?;
            FerrySignal::NotificationQueued { id, reason }
        }
        _ => return Ok(None),
    };
    Ok(Some(signal))
}

fn decode_crypt(body: &zbus::message::Body, member: &str) -> zbus::Result<Option<FerrySignal>> {
    Ok(Some(match member {
        "DriveOpened" => {
            let (drive, mountpoint) = body.deserialize()?;
            FerrySignal::DriveOpened { drive, mountpoint }
        }
        "DriveHeld" => {
            let (drive, mountpoint) = body.deserialize()?;
            FerrySignal::DriveHeld { drive, mountpoint }
        }
        "DriveClosed" => {
            let (drive,) = body.deserialize()?;
            FerrySignal::DriveClosed { drive }
        }
        "DriveFailed" => {
            let (drive, stage, message) = body.deserialize()?;
            FerrySignal::DriveFailed {
                drive,
                stage,
                message,
            }
        }
        _ => return Ok(None),
    }))
}

fn decode_sync(body: &zbus::message::Body, member: &str) -> zbus::Result<Option<FerrySignal>> {
    Ok(Some(match member {
        "SyncStarted" => {
            let (drive, repository) = body.deserialize()?;
            FerrySignal::SyncStarted { drive, repository }
        }
        "SyncProgress" => {
            let (drive, done, total, phase) = body.deserialize()?;
            FerrySignal::SyncProgress {
                drive,
                done,
                total,
                phase,
            }
        }
        "SyncFinished" => {
            let (drive, bytes, seconds) = body.deserialize()?;
            FerrySignal::SyncFinished {
                drive,
                bytes,
                seconds,
            }
        }
        "SyncFailed" => {
            let (drive, stage, message) = body.deserialize()?;
            FerrySignal::SyncFailed {
                drive,
                stage,
                message,
            }
        }
        _ => return Ok(None),
    }))
}

fn decode_borg(body: &zbus::message::Body, member: &str) -> zbus::Result<Option<FerrySignal>> {
    Ok(Some(match member {
        "BackupStarted" => {
            let (job, profile) = body.deserialize()?;
            FerrySignal::BackupStarted { job, profile }
        }
        "BackupProgress" => {
            let (job, bytes, files) = body.deserialize()?;
            FerrySignal::BackupProgress { job, bytes, files }
        }
        "BackupFinished" => {
            let (job, profile, archive) = body.deserialize()?;
            FerrySignal::BackupFinished {
                job,
                profile,
                archive,
            }
        }
        "BackupFinishedWithWarnings" => {
            let (job, profile, archive, warnings) = body.deserialize()?;
            FerrySignal::BackupFinishedWithWarnings {
                job,
                profile,
                archive,
                warnings,
            }
        }
        "BackupFailed" => {
            let (job, profile, stage, message) = body.deserialize()?;
            FerrySignal::BackupFailed {
                job,
                profile,
                stage,
                message,
            }
        }
        "BackupSkipped" => {
            let (job, profile, reason) = body.deserialize()?;
            FerrySignal::BackupSkipped {
                job,
                profile,
                reason,
            }
        }
        _ => return Ok(None),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal<B>(interface: &str, member: &str, body: &B) -> zbus::Message
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        zbus::Message::signal("/org/ferry/Test", interface, member)
            .expect("header")
            .build(body)
            .expect("body")
    }

    #[test]
    fn decodes_each_interface_and_skips_what_is_not_ferry() {
        let m = signal(
            drive_watcher::INTERFACE,
            "DriveAttached",
            &("a", "/dev/sdb1", "u"),
        );
        assert_eq!(
            FerrySignal::from_message(&m).expect("decodes"),
            Some(FerrySignal::DriveAttached {
                drive: "a".into(),
                device: "/dev/sdb1".into(),
                uuid: "u".into()
            })
        );
        let m = signal(crypt::INTERFACE, "DriveFailed", &("a", "identity", "no"));
        let decoded = FerrySignal::from_message(&m)
            .expect("decodes")
            .expect("known");
        assert_eq!(decoded.crypt_stage(), Some(crate::CryptStage::Identity));
        assert_eq!(decoded.name(), "Crypt1.DriveFailed");
        let m = signal(sync::INTERFACE, "SyncFinished", &("a", 7u64, 1.5f64));
        assert!(matches!(
            FerrySignal::from_message(&m),
            Ok(Some(FerrySignal::SyncFinished { bytes: 7, .. }))
        ));
        let m = signal(borg::INTERFACE, "BackupSkipped", &("j", "p", "r"));
        assert!(matches!(
            FerrySignal::from_message(&m),
            Ok(Some(FerrySignal::BackupSkipped { .. }))
        ));
        let m = signal("org.example.Other", "DriveOpened", &("a", "/m"));
        assert_eq!(FerrySignal::from_message(&m).expect("not ours"), None);
        let m = signal(crypt::INTERFACE, "DriveRenamed", &("a",));
        assert_eq!(FerrySignal::from_message(&m).expect("unknown member"), None);
    }

    #[test]
    fn a_body_that_breaks_the_contract_is_an_error() {
        let m = signal(crypt::INTERFACE, "DriveOpened", &(7u32,));
        let err = FerrySignal::from_message(&m).expect_err("wrong body");
        assert_eq!(err.member, "DriveOpened");
        assert!(
            err.to_string().contains("org.ferry.Crypt1.DriveOpened"),
            "{err}"
        );
    }
}
