//! What the notifier hears on the bus, and the words it mails about it.
//!
//! Signals are matched by interface and member (never by sender) and parsed
//! with the contract's generated types. Each kind of event has one function
//! that writes its mail: what failed, where (drive or profile, stage), when,
//! the service's own message verbatim in the body, and what to look at next.

use ferry_interfaces::{
    borg, crypt, sync, BackupResult, DriveVerification, FerrySignal, SyncRecord,
};

use crate::compose::{human_bytes, human_duration, one_line, utc, Class, Draft};
use crate::ledger::ProfileSeen;

/// Which service reported a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// org.ferry.Crypt1 (DriveFailed).
    Crypt,
    /// org.ferry.Sync1 (SyncFailed).
    Sync,
    /// org.ferry.Borg1 (BackupFailed).
    Borg,
}

impl Source {
    /// The short interface name used in ledger keys.
    pub fn key(self) -> &'static str {
        match self {
            Source::Crypt => "Crypt1",
            Source::Sync => "Sync1",
            Source::Borg => "Borg1",
        }
    }

    /// The service's short name (`crypt`, `sync`, `borg`), a metrics label.
    pub fn service(self) -> &'static str {
        match self {
            Source::Crypt => "crypt",
            Source::Sync => "sync",
            Source::Borg => "borg",
        }
    }

    fn signal(self) -> &'static str {
        match self {
            Source::Crypt => "DriveFailed",
            Source::Sync => "SyncFailed",
            Source::Borg => "BackupFailed",
        }
    }

    fn interface(self) -> &'static str {
        match self {
            Source::Crypt => crypt::INTERFACE,
            Source::Sync => sync::INTERFACE,
            Source::Borg => borg::INTERFACE,
        }
    }
}

/// A failure reported by a peer, by signal or from its LastFailures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Who reported it.
    pub source: Source,
    /// The drive or profile.
    pub subject: String,
    /// The stage that failed.
    pub stage: String,
    /// The service's (or borg's, or the hook's) message.
    pub message: String,
    /// The job id, for borg.
    pub job: Option<String>,
}

impl Failure {
    /// `Sync1/offsite-a`: one entry per drive or profile and service.
    pub fn ledger_key(&self) -> String {
        format!("{}/{}", self.source.key(), self.subject)
    }

    /// What makes two failures "identical" for grouping.
    pub fn group_key(&self) -> String {
        format!(
            "{}\u{1f}{}\u{1f}{}\u{1f}{}",
            self.source.key(),
            self.subject,
            self.stage,
            self.message
        )
    }

    /// The mail. `when` is the failure's time; `late` says it happened
    /// while the notifier was not running.
    pub fn draft(&self, when: u64, late: bool, host: &str) -> Draft {
        let name = one_line(&self.subject, 64);
        let stage = one_line(&self.stage, 32);
        let (what, subject, advice) = match self.source {
            Source::Crypt => (
                "opening or closing a drive",
                format!("drive {name} failed at {stage}"),
                "The drive is left unmounted and locked wherever that was possible.\n\
                 State: busctl get-property org.ferry.Crypt1 /org/ferry/Crypt1 org.ferry.Crypt1 Drives",
            ),
            Source::Sync => (
                "copying the repositories onto a drive",
                format!("sync of drive {name} failed at {stage}"),
                "Which copy the drive holds now (the previous one or the new one) is in \
                 the message above, as ferry-sync found it after the failure.\n\
                 Try again: busctl call org.ferry.Sync1 /org/ferry/Sync1 org.ferry.Sync1 Start s DRIVE",
            ),
            Source::Borg => (
                "a borg backup",
                format!("backup {name} failed at {stage}"),
                "Run it again: busctl call org.ferry.Borg1 /org/ferry/Borg1 org.ferry.Borg1 Start s PROFILE",
            ),
        };
        let place = match self.source {
            Source::Borg => "profile",
            _ => "drive",
        };
        let mut body = format!("ferry on {host}: {what} failed.\n\n");
        body.push_str(&format!(
            "What:  {} ({})\n",
            self.source.signal(),
            self.source.interface()
        ));
        body.push_str(&format!(
            "Where: {place} {}, stage {}\n",
            self.subject, self.stage
        ));
        if let Some(job) = &self.job {
            body.push_str(&format!("Job:   {job}\n"));
        }
        body.push_str(&format!("When:  {}\n", utc(when)));
        if late {
            body.push_str(
                "\nThis happened while ferry-notifier was not running; it was found in the \
                 service's FailureHistory (or LastFailures) when the notifier started.\n",
            );
        }
        body.push_str(&format!(
            "\nThe service's own message:\n\n{}\n\n{advice}\n",
            self.message
        ));
        Draft::new(format!("{} {}", self.source.signal(), name), subject, body)
    }
}

/// A signal the notifier acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// DriveFailed, SyncFailed or BackupFailed.
    Failed(Failure),
    /// SyncFinished(drive, bytes, seconds).
    SyncFinished {
        /// The drive.
        drive: String,
        /// Bytes copied.
        bytes: u64,
        /// Duration.
        seconds: f64,
    },
    /// DriveClosed(drive): safe to remove.
    DriveClosed(String),
    /// BackupStarted(job, profile).
    BackupStarted {
        /// Job id.
        job: String,
        /// Profile.
        profile: String,
    },
    /// BackupFinishedWithWarnings(job, profile, archive, warnings).
    BackupFinishedWithWarnings {
        /// Job id.
        job: String,
        /// Profile.
        profile: String,
        /// The archive made.
        archive: String,
        /// borg's warning lines.
        warnings: String,
    },
    /// BackupSkipped(job, profile, reason).
    BackupSkipped {
        /// Job id.
        job: String,
        /// Profile.
        profile: String,
        /// Why.
        reason: String,
    },
    /// DriveOpened(drive, mountpoint): a drive's flow begins.
    DriveOpened(String),
    /// BackupFinished(job, profile, archive).
    BackupFinished {
        /// Job id.
        job: String,
        /// Profile.
        profile: String,
        /// The archive made.
        archive: String,
    },
}

/// What a decoded peer signal means to the notifier; None for members it
/// does not care about.
pub fn event_of(signal: FerrySignal) -> Option<Event> {
    let failure = |source, subject, stage, message, job| {
        Event::Failed(Failure {
            source,
            subject,
            stage,
            message,
            job,
        })
    };
    Some(match signal {
        FerrySignal::DriveFailed {
            drive,
            stage,
            message,
        } => failure(Source::Crypt, drive, stage, message, None),
        FerrySignal::SyncFailed {
            drive,
            stage,
            message,
        } => failure(Source::Sync, drive, stage, message, None),
        FerrySignal::BackupFailed {
            job,
            profile,
            stage,
            message,
        } => failure(Source::Borg, profile, stage, message, Some(job)),
        FerrySignal::SyncFinished {
            drive,
            bytes,
            seconds,
        } => Event::SyncFinished {
            drive,
            bytes,
            seconds,
        },
        FerrySignal::DriveClosed { drive } => Event::DriveClosed(drive),
        FerrySignal::BackupStarted { job, profile } => Event::BackupStarted { job, profile },
        FerrySignal::BackupFinishedWithWarnings {
            job,
            profile,
            archive,
            warnings,
        } => Event::BackupFinishedWithWarnings {
            job,
            profile,
            archive,
            warnings,
        },
        FerrySignal::BackupSkipped {
            job,
            profile,
            reason,
        } => Event::BackupSkipped {
            job,
            profile,
            reason,
        },
        FerrySignal::DriveOpened { drive, .. } => Event::DriveOpened(drive),
        FerrySignal::BackupFinished {
            job,
            profile,
            archive,
        } => Event::BackupFinished {
            job,
            profile,
            archive,
        },
        _ => return None,
    })
}

/// "offsite-a is safe to remove: 1.2 GiB copied in 3 min, newest archive …".
/// `record` is Sync1's LastSyncs entry for the drive, `verification` its
/// Verification entry ("repaired 1 file", not fully scrubbed), when it
/// answered.
pub fn sync_success_draft(
    drive: &str,
    bytes: u64,
    seconds: f64,
    record: Option<&SyncRecord>,
    verification: Option<&DriveVerification>,
    host: &str,
) -> Draft {
    let name = one_line(drive, 64);
    let mut summary = format!(
        "{name} is safe to remove: {} copied in {}",
        human_bytes(bytes),
        human_duration(seconds)
    );
    let mut body = format!("ferry on {host} brought drive {drive} up to date and closed it.\n\n");
    body.push_str(&format!("Copied:   {}\n", human_bytes(bytes)));
    body.push_str(&format!("Took:     {}\n", human_duration(seconds)));
    if let Some(r) = record {
        if !r.archive.is_empty() {
            summary.push_str(&format!(", newest archive {}", one_line(&r.archive, 80)));
            body.push_str(&format!("Newest archive on the drive: {}\n", r.archive));
        }
        body.push_str(&format!("Free on the drive: {}\n", human_bytes(r.free)));
    }
    if let Some(v) = verification {
        let files = if v.repaired == 1 { "file" } else { "files" };
        if v.repaired > 0 {
            summary.push_str(&format!(", repaired {} {files}", v.repaired));
            body.push_str(&format!(
                "Repaired: {} {files} found damaged on the drive, copied afresh from the source\n",
                v.repaired
            ));
        }
        body.push_str(&format!(
            "Read back from the drive: {}\n",
            human_bytes(v.read)
        ));
        if v.overdue {
            body.push_str(&format!("{}\n", scrub_overdue_sentence(v)));
        }
    }
    body.push_str("\nThe drive is unmounted and locked: it can be unplugged and taken away.\n");
    Draft::of(
        Class::Success,
        format!("SyncFinished {name}"),
        summary,
        body,
    )
}

/// A successful backup.
pub fn backup_success_draft(
    job: &str,
    profile: &str,
    archive: &str,
    result: Option<&BackupResult>,
    host: &str,
) -> Draft {
    let name = one_line(profile, 64);
    let mut body = format!(
        "ferry on {host} finished backup profile {profile} (job {job}).\n\nArchive: {archive}\n"
    );
    if let Some(r) = result {
        body.push_str(&format!("Took:    {}\n", human_duration(r.seconds)));
    }
    Draft::of(
        Class::Success,
        format!("BackupFinished {name}"),
        format!("backup {name} finished: {}", one_line(archive, 80)),
        body,
    )
}

/// "offsite-b was last synced 35 days ago".
pub fn stale_drive_draft(
    drive: &str,
    last: Option<u64>,
    now: u64,
    age_days: u32,
    host: &str,
) -> Draft {
    let name = one_line(drive, 64);
    let (subject, since) = match last {
        Some(t) => (
            format!(
                "{name} was last synced {} ago",
                human_duration(now.saturating_sub(t) as f64)
            ),
            format!("Its last successful sync finished at {}.", utc(t)),
        ),
        None => (
            format!("{name} has never been synced"),
            "ferry has no record of a successful sync of it.".to_string(),
        ),
    };
    let body = format!(
        "ferry on {host}: the off-site drive {drive} is out of date.\n\n{since}\n\
         The configured limit is {age_days} days ([notify] drive-stale-days).\n\n\
         Plug it in to bring it up to date; this reminder comes at most once a day.\n"
    );
    Draft::of(
        Class::Reminder,
        format!("stale drive {name}"),
        subject,
        body,
    )
}

/// "Not every byte on offsite-a has been re-read …".
fn scrub_overdue_sentence(v: &DriveVerification) -> String {
    let since = if v.verified_since == 0 {
        "some of its files have never been read back".to_string()
    } else {
        format!("the oldest re-read was at {}", utc(v.verified_since))
    };
    format!(
        "Not fully scrubbed: not every byte on {} was re-read within [sync] scrub-period-days ({since}); \
         give the scrub more time per sync ([sync] scrub-seconds) or plug the drive in more often.",
        v.drive
    )
}

/// A drive whose copies were not all re-read within the scrub period.
pub fn scrub_overdue_draft(v: &DriveVerification, host: &str) -> Draft {
    let name = one_line(&v.drive, 64);
    Draft::of(
        Class::Reminder,
        format!("scrub overdue {name}"),
        format!("{name} has not been fully scrubbed within the scrub period"),
        format!(
            "ferry on {host}: {}\n\nThis reminder comes at most once a day.\n",
            scrub_overdue_sentence(v)
        ),
    )
}

/// A backup profile without success in its interval.
pub fn stale_profile_draft(profile: &str, seen: ProfileSeen, now: u64, host: &str) -> Draft {
    let name = one_line(profile, 64);
    let last = if seen.last_success == 0 {
        "It has never finished successfully.".to_string()
    } else {
        format!(
            "Its last successful run finished at {} ({} ago).",
            utc(seen.last_success),
            human_duration(now.saturating_sub(seen.last_success) as f64)
        )
    };
    Draft::of(
        Class::Reminder,
        format!("stale profile {name}"),
        format!("backup {name} has not succeeded since it was due"),
        format!(
            "ferry on {host}: backup profile {profile} was due at {} and has not finished \
             successfully since.\n{last}\n\nLook at: busctl get-property org.ferry.Borg1 \
             /org/ferry/Borg1 org.ferry.Borg1 Schedule\nThis reminder comes at most once a day.\n",
            utc(seen.due)
        ),
    )
}

/// A drive that is failing or wearing out was opened anyway (its health
/// policy is `warn`); `record` is ferry-crypt's reading.
pub fn health_warning_draft(
    drive: &str,
    record: &ferry_service::health_ledger::HealthRecord,
    host: &str,
) -> Draft {
    let name = one_line(drive, 64);
    Draft::new(
        format!("health {name}"),
        format!("drive {name} health is {}", one_line(&record.verdict, 16)),
        format!(
            "ferry on {host}: drive {drive}'s SMART health is {} ({}).\n\n\
             Read from {} at {}. Its policy is health = \"warn\", so it was opened and is \
             being synced anyway.\n\nReplace it soon: it may hold your only other copy. \
             To refuse it instead, set health = \"refuse\" in [drives.{drive}] of ferry.toml.\n\
             Details: ferryctl status, or smartctl -a {}\n",
            record.verdict,
            record.summary,
            record.device,
            utc(record.time),
            record.device
        ),
    )
}

/// A ferry unit failed (OnFailure=).
pub fn unit_failed_draft(unit: &str, journal: &str, now: u64, host: &str) -> Draft {
    Draft::new(
        format!("UnitFailed {unit}"),
        format!("unit {unit} failed"),
        format!(
            "ferry on {host}: the systemd unit {unit} failed at {}.\n\n\
             Status: systemctl status {unit}\n\n{journal}\n",
            utc(now)
        ),
    )
}

/// The SendTest message.
pub fn test_draft(now: u64, host: &str) -> Draft {
    Draft::of(
        Class::Test,
        "test",
        format!("test message from {host}"),
        format!(
            "This is a test message from ferry on {host}, queued at {}.\n\
             If you read this, failures will reach you too.\n",
            utc(now)
        ),
    )
}

#[cfg(test)]
mod tests {

    #[test]
    fn decoded_signals_become_the_notifiers_events() {
        let failed = event_of(FerrySignal::BackupFailed {
            job: "j1".into(),
            profile: "home".into(),
            stage: "create".into(),
            message: "disk full".into(),
        });
        assert_eq!(
            failed,
            Some(Event::Failed(Failure {
                source: Source::Borg,
                subject: "home".into(),
                stage: "create".into(),
                message: "disk full".into(),
                job: Some("j1".into()),
            }))
        );
        assert_eq!(
            event_of(FerrySignal::DriveOpened {
                drive: "offsite-a".into(),
                mountpoint: "/run/ferry/offsite-a".into(),
            }),
            Some(Event::DriveOpened("offsite-a".into()))
        );
        let ignored = FerrySignal::ColorChanged {
            color: "green".into(),
            state: "done".into(),
        };
        assert_eq!(event_of(ignored), None, "the LED's own news is not mailed");
    }

    use super::*;

    #[test]
    fn a_failure_mail_says_what_where_and_the_message() {
        let f = Failure {
            source: Source::Sync,
            subject: "offsite-a".into(),
            stage: "space".into(),
            message: "need 900 MiB, drive has 12 MiB".into(),
            job: None,
        };
        let d = f.draft(1_700_000_000, true, "nas");
        assert_eq!(d.subject, "sync of drive offsite-a failed at space");
        assert_eq!(d.reason, "SyncFailed offsite-a");
        assert!(d.body.contains("need 900 MiB, drive has 12 MiB"));
        assert!(d.body.contains("Where: drive offsite-a, stage space"));
        assert!(d.body.contains("not running"));
        assert_eq!(f.ledger_key(), "Sync1/offsite-a");
    }

    #[test]
    fn success_and_staleness_wording() {
        let record = SyncRecord {
            drive: "offsite-a".into(),
            time: 1,
            bytes: 1,
            seconds: 1.0,
            archive: "nas-2024-05-01".into(),
            free: 1 << 30,
        };
        let d = sync_success_draft(
            "offsite-a",
            1_288_490_189,
            180.0,
            Some(&record),
            None,
            "nas",
        );
        assert_eq!(
            d.subject,
            "offsite-a is safe to remove: 1.2 GiB copied in 3 min, newest archive nas-2024-05-01"
        );
        let verification = DriveVerification {
            drive: "offsite-a".into(),
            time: 1,
            verified_since: 0,
            read: 1 << 20,
            total: 1 << 30,
            repaired: 1,
            overdue: true,
        };
        let d = sync_success_draft("offsite-a", 1, 1.0, None, Some(&verification), "nas");
        assert!(d.subject.ends_with(", repaired 1 file"), "{}", d.subject);
        assert!(d.body.contains("Not fully scrubbed"), "{}", d.body);
        let o = scrub_overdue_draft(&verification, "nas");
        assert!(o.body.contains("scrub-period-days"), "{}", o.body);
        let s = stale_drive_draft("offsite-b", Some(0), 35 * 86_400, 30, "nas");
        assert_eq!(s.subject, "offsite-b was last synced 35 days ago");
    }
}
