//! `ferryctl status`: the whole system at a glance.
//!
//! [`gather`] reads every service's properties (and nothing else: whatever
//! it shows, busctl can read too); [`render`] words them for a person. The
//! two are split so the wording is tested without a bus, and `--json` prints
//! what was gathered, unworded, for scripts.

use std::collections::BTreeSet;

use ferry_interfaces::borg::BorgProxy;
use ferry_interfaces::crypt::CryptProxy;
use ferry_interfaces::drive_watcher::DriveWatcherProxy;
use ferry_interfaces::led::LedProxy;
use ferry_interfaces::notifier::NotifierProxy;
use ferry_interfaces::sync::SyncProxy;
use ferry_interfaces::{
    BackupJob, BackupResult, CryptDrive, DriveHealth, DriveVerification, Failure, HealthDecision,
    HealthVerdict, ScheduleEntry, SyncJob, SyncRecord, WatchedDrive,
};
use serde::Serialize;
use zbus::proxy::CacheProperties;
use zbus::Connection;

use crate::words;

/// Everything `status` shows, as read from the services.
#[derive(Debug, Default, Serialize)]
pub struct Status {
    /// When it was read (unix seconds).
    pub now: u64,
    pub drives: Vec<DriveStatus>,
    pub profiles: Vec<ProfileStatus>,
    pub led: Option<LedStatus>,
    pub mail: Option<MailStatus>,
    /// Services that did not answer, with the error.
    pub unreachable: Vec<(String, String)>,
    /// ferry.toml's `[notify] drive-stale-days` (0: off), when it could be read.
    pub drive_stale_days: Option<u32>,
}

/// One enrolled drive, as the watcher, ferry-crypt and ferry-sync see it.
#[derive(Debug, Default, Serialize)]
pub struct DriveStatus {
    pub name: String,
    pub watched: Option<WatchedDrive>,
    pub crypt: Option<CryptDrive>,
    pub running: Option<SyncJob>,
    pub last_sync: Option<SyncRecord>,
    /// ferry-sync's Verification entry: read-back, scrub, repairs, overdue.
    pub verification: Option<DriveVerification>,
    pub failures: Vec<Failure>,
    /// ferry-crypt's latest SMART reading (Crypt1.Health).
    pub health: Option<DriveHealth>,
}

/// One backup profile, as ferry-borg sees it.
#[derive(Debug, Default, Serialize)]
pub struct ProfileStatus {
    pub name: String,
    pub running: Option<BackupJob>,
    pub last: Option<BackupResult>,
    pub schedule: Option<ScheduleEntry>,
    pub failure: Option<Failure>,
}

#[derive(Debug, Serialize)]
pub struct LedStatus {
    pub state: String,
    pub color: String,
    pub reason: String,
    pub device_present: bool,
}

#[derive(Debug, Serialize)]
pub struct MailStatus {
    pub pending: u32,
    pub dead_letters: u32,
    pub last_error: String,
}

/// Builds a proxy that reads properties afresh (a one-shot client has no
/// use for a cache kept up to date by signals).
macro_rules! proxy {
    ($proxy:ty, $conn:expr) => {
        <$proxy>::builder($conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await
    };
}

/// Reads the properties of all six services. A service that does not answer
/// is listed in `unreachable`; the rest is still shown.
pub async fn gather(conn: &Connection, now: u64) -> Status {
    let mut status = Status {
        now,
        ..Status::default()
    };
    let mut unreachable = Vec::new();

    let watched: Vec<WatchedDrive> = answer(
        &mut unreachable,
        "org.ferry.DriveWatcher1",
        async { proxy!(DriveWatcherProxy, conn)?.drives().await }.await,
    )
    .unwrap_or_default();
    let (crypt_drives, crypt_failures, health) = answer(
        &mut unreachable,
        "org.ferry.Crypt1",
        async {
            let p = proxy!(CryptProxy, conn)?;
            Ok((
                p.drives().await?,
                p.last_failures().await?,
                p.health().await?,
            ))
        }
        .await,
    )
    .unwrap_or_default();
    let (running, syncs, sync_failures, verifications) = answer(
        &mut unreachable,
        "org.ferry.Sync1",
        async {
            let p = proxy!(SyncProxy, conn)?;
            Ok((
                p.running().await?,
                p.last_syncs().await?,
                p.last_failures().await?,
                p.verification().await?,
            ))
        }
        .await,
    )
    .unwrap_or_default();
    let (profiles, jobs, results, schedule, borg_failures) = answer(
        &mut unreachable,
        "org.ferry.Borg1",
        async {
            let p = proxy!(BorgProxy, conn)?;
            Ok((
                p.profiles().await?,
                p.jobs().await?,
                p.last_results().await?,
                p.schedule().await?,
                p.last_failures().await?,
            ))
        }
        .await,
    )
    .unwrap_or_default();
    status.led = answer(
        &mut unreachable,
        "org.ferry.Led1",
        async {
            let p = proxy!(LedProxy, conn)?;
            Ok(LedStatus {
                state: p.state().await?,
                color: p.current_color().await?,
                reason: p.reason().await?,
                device_present: p.device_present().await?,
            })
        }
        .await,
    );
    status.mail = answer(
        &mut unreachable,
        "org.ferry.Notifier1",
        async {
            let p = proxy!(NotifierProxy, conn)?;
            Ok(MailStatus {
                pending: p.pending().await?,
                dead_letters: p.dead_letters().await?,
                last_error: p.last_error().await?,
            })
        }
        .await,
    );
    status.unreachable = unreachable;

    let names: BTreeSet<String> = watched
        .iter()
        .map(|d| d.name.clone())
        .chain(crypt_drives.iter().map(|d| d.name.clone()))
        .chain(syncs.iter().map(|s| s.drive.clone()))
        .collect();
    status.drives = names
        .into_iter()
        .map(|name| DriveStatus {
            watched: watched.iter().find(|d| d.name == name).cloned(),
            crypt: crypt_drives.iter().find(|d| d.name == name).cloned(),
            running: running.iter().find(|j| j.drive == name).cloned(),
            last_sync: syncs.iter().find(|s| s.drive == name).cloned(),
            verification: verifications.iter().find(|v| v.drive == name).cloned(),
            health: health.iter().find(|h| h.drive == name).cloned(),
            failures: crypt_failures
                .iter()
                .chain(sync_failures.iter())
                .filter(|f| f.subject == name)
                .cloned()
                .collect(),
            name,
        })
        .collect();
    status.profiles = profiles
        .into_iter()
        .map(|name| ProfileStatus {
            running: jobs.iter().find(|j| j.profile == name).cloned(),
            last: results.iter().find(|r| r.profile == name).cloned(),
            schedule: schedule.iter().find(|s| s.profile == name).cloned(),
            failure: borg_failures.iter().find(|f| f.subject == name).cloned(),
            name,
        })
        .collect();
    status
}

/// ferry-sync's verification of a drive in a sentence: since when every
/// byte on it was read back intact, what the last sync re-read and
/// repaired, and (in capitals, with what to do) an overdue scrub.
fn verification_words(now: u64, v: &DriveVerification) -> String {
    let mut text = if v.verified_since > 0 {
        format!(
            "every byte read back intact since {}",
            words::ago(now, v.verified_since)
        )
    } else {
        "not every byte read back yet".to_string()
    };
    text.push_str(&format!(
        " ({} of {} re-read by the last sync)",
        words::bytes(v.read),
        words::bytes(v.total)
    ));
    if v.repaired > 0 {
        text.push_str(&format!(
            ", repaired {} damaged file{}",
            v.repaired,
            if v.repaired == 1 { "" } else { "s" }
        ));
    }
    if v.overdue {
        text.push_str(
            "; SCRUB OVERDUE: not fully re-read within [sync] scrub-period-days: raise scrub-seconds or plug it in more often",
        );
    }
    text
}

/// What one service answered, or (noted in `unreachable`) nothing.
fn answer<T>(
    unreachable: &mut Vec<(String, String)>,
    service: &str,
    read: zbus::Result<T>,
) -> Option<T> {
    match read {
        Ok(v) => Some(v),
        Err(e) => {
            unreachable.push(status_unreachable(service, e));
            None
        }
    }
}

fn status_unreachable(service: &str, e: zbus::Error) -> (String, String) {
    let why = match &e {
        zbus::Error::MethodError(name, _, _)
            if name.as_str() == "org.freedesktop.DBus.Error.ServiceUnknown"
                || name.as_str() == "org.freedesktop.DBus.Error.NameHasNoOwner" =>
        {
            "not running".to_string()
        }
        _ => e.to_string(),
    };
    (service.to_string(), why)
}

/// A drive's last SMART reading in words; a bad one in capitals.
fn health_words(now: u64, h: &DriveHealth) -> String {
    let when = words::ago(now, h.time);
    match HealthVerdict::from_wire(&h.verdict) {
        Some(HealthVerdict::Passed) => format!("health passed ({}), read {when}", h.summary),
        Some(HealthVerdict::Unavailable) => {
            format!("health unknown, read {when}: {}", h.summary)
        }
        _ => {
            let what = match HealthDecision::from_wire(&h.decision) {
                Some(HealthDecision::Refuse) => "the drive is refused",
                _ => "used anyway",
            };
            format!(
                "HEALTH {} ({}), read {when}: {what}",
                h.verdict.to_uppercase(),
                h.summary
            )
        }
    }
}

/// The status in a person's words.
pub fn render(status: &Status) -> String {
    let now = status.now;
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };

    line("Drives".into());
    if status.drives.is_empty() {
        line("  none enrolled (or the drive watcher and ferry-crypt are not running)".into());
    }
    for drive in &status.drives {
        let attached = match &drive.watched {
            Some(w) if w.attached => format!("plugged in as {}", w.device),
            Some(_) => "not plugged in".to_string(),
            None => "attachment unknown".to_string(),
        };
        let state = match &drive.crypt {
            Some(c) if c.state == "open" => format!(", open at {}", c.mountpoint),
            Some(c) if ["closed", "absent", ""].contains(&c.state.as_str()) => String::new(),
            Some(c) => format!(", {}", c.state),
            None => String::new(),
        };
        line(format!("  {:<14} {attached}{state}", drive.name));
        if let Some(job) = &drive.running {
            let progress = if job.total > 0 {
                format!(
                    " — {} of {} ({}%)",
                    words::bytes(job.done),
                    words::bytes(job.total),
                    job.done * 100 / job.total
                )
            } else {
                String::new()
            };
            let mut phase = job.phase.clone();
            if job.since > 0 {
                phase.push_str(&format!(" since {}", words::ago(now, job.since)));
            }
            if !job.detail.is_empty() {
                phase.push_str(&format!(": {}", job.detail));
            }
            line(format!(
                "  {:<14} syncing {} ({phase}){progress}",
                "", job.repository
            ));
        }
        match &drive.last_sync {
            Some(s) => {
                let mut text = format!(
                    "last synced {} ({}): {} copied in {}",
                    words::ago(now, s.time),
                    words::local(s.time),
                    words::bytes(s.bytes),
                    words::duration(s.seconds)
                );
                if !s.archive.is_empty() {
                    text.push_str(&format!(", newest archive {}", s.archive));
                }
                if s.free > 0 {
                    text.push_str(&format!(", {} free", words::bytes(s.free)));
                }
                line(format!("  {:<14} {text}", ""));
            }
            None => line(format!("  {:<14} never synced", "")),
        }
        let last = drive.last_sync.as_ref().map(|s| s.time);
        if let Some(days) = status.drive_stale_days.filter(|d| *d > 0) {
            let limit = u64::from(days) * 86_400;
            if last.is_none_or(|t| now.saturating_sub(t) > limit) {
                line(format!(
                    "  {:<14} STALE: not synced within {days} days ([notify] drive-stale-days): plug it in",
                    ""
                ));
            }
        }
        if let Some(v) = &drive.verification {
            line(format!("  {:<14} {}", "", verification_words(now, v)));
        }
        if let Some(h) = &drive.health {
            line(format!("  {:<14} {}", "", health_words(now, h)));
        }
        for f in &drive.failures {
            line(format!(
                "  {:<14} FAILED at {} {}: {}",
                "",
                f.stage,
                words::ago(now, f.time),
                f.message
            ));
        }
    }

    line(String::new());
    line("Backups".into());
    if status.profiles.is_empty() {
        line("  no profiles (or ferry-borg is not running)".into());
    }
    for profile in &status.profiles {
        let last = match &profile.last {
            Some(r) => {
                let mut what = r.outcome.replace('-', " ");
                if !r.archive.is_empty() {
                    what.push_str(&format!(", archive {}", r.archive));
                }
                if r.outcome != "finished" && !r.message.is_empty() {
                    what.push_str(&format!(": {}", r.message));
                }
                format!(
                    "last run {} ({}): {what}",
                    words::ago(now, r.time),
                    words::local(r.time)
                )
            }
            None => "never run".to_string(),
        };
        line(format!("  {:<14} {last}", profile.name));
        if let Some(job) = &profile.running {
            line(format!(
                "  {:<14} running ({}) as {}: {} in {} files so far",
                "",
                job.stage,
                job.job,
                words::bytes(job.bytes),
                job.files
            ));
        }
        if let Some(s) = &profile.schedule {
            let mut text = if s.due > 0 {
                format!(
                    "next due {} ({})",
                    words::until(now, s.due),
                    words::local(s.due)
                )
            } else {
                "no interval configured (runs when its timer starts it)".to_string()
            };
            if !s.blocked.is_empty() {
                text.push_str(&format!(" — waiting: {}", s.blocked));
            }
            line(format!("  {:<14} {text}", ""));
            if s.retry > 0 {
                line(format!(
                    "  {:<14} retry {}: {}",
                    "",
                    words::until(now, s.retry),
                    s.retry_reason
                ));
            }
        }
        if let Some(f) = &profile.failure {
            line(format!(
                "  {:<14} FAILED at {} {}: {}",
                "",
                f.stage,
                words::ago(now, f.time),
                f.message
            ));
        }
    }

    line(String::new());
    match &status.led {
        Some(led) => {
            let device = if led.device_present {
                ""
            } else {
                " (no LED device found)"
            };
            let reason = if led.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", led.reason)
            };
            line(format!(
                "LED     {} {}{reason}{device}",
                led.state, led.color
            ));
        }
        None => line("LED     unknown".into()),
    }
    match &status.mail {
        Some(mail) => {
            let mut text = format!(
                "Mail    {} waiting to be sent, {} undeliverable",
                mail.pending, mail.dead_letters
            );
            if !mail.last_error.is_empty() {
                text.push_str(&format!(" — last error: {}", mail.last_error));
            }
            line(text);
        }
        None => line("Mail    unknown".into()),
    }
    if !status.unreachable.is_empty() {
        line(String::new());
        for (service, why) in &status.unreachable {
            line(format!("{service} did not answer: {why}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(now: u64) -> Status {
        Status {
            now,
            drives: vec![
                DriveStatus {
                    name: "offsite-a".into(),
                    watched: Some(WatchedDrive {
                        name: "offsite-a".into(),
                        uuid: "u".into(),
                        attached: true,
                        device: "/dev/sdb1".into(),
                        since: now - 60,
                    }),
                    crypt: Some(CryptDrive {
                        name: "offsite-a".into(),
                        state: "closed".into(),
                        mountpoint: String::new(),
                        device: String::new(),
                        message: String::new(),
                    }),
                    running: None,
                    last_sync: Some(SyncRecord {
                        drive: "offsite-a".into(),
                        time: now - 3 * 86_400,
                        bytes: 3 * 1024 * 1024 * 1024 / 2,
                        seconds: 42.0,
                        archive: "nas-2026".into(),
                        free: 200 * 1024 * 1024 * 1024,
                    }),
                    verification: Some(DriveVerification {
                        drive: "offsite-a".into(),
                        time: now - 3 * 86_400,
                        verified_since: now - 40 * 86_400,
                        read: 64 << 20,
                        total: 2 << 30,
                        repaired: 1,
                        overdue: true,
                    }),
                    failures: vec![],
                    health: Some(DriveHealth {
                        drive: "offsite-a".into(),
                        time: now - 120,
                        device: "/dev/sdb".into(),
                        decision: "warn".into(),
                        verdict: "degraded".into(),
                        summary: "SMART overall health passed, 3 reallocated sectors".into(),
                        figures: [("reallocated-sectors".to_string(), 3)].into(),
                    }),
                },
                DriveStatus {
                    name: "offsite-b".into(),
                    failures: vec![Failure {
                        subject: "offsite-b".into(),
                        time: now - 7200,
                        stage: "identity".into(),
                        message: "no token".into(),
                    }],
                    ..DriveStatus::default()
                },
            ],
            profiles: vec![ProfileStatus {
                name: "nas".into(),
                last: Some(BackupResult {
                    profile: "nas".into(),
                    outcome: "finished".into(),
                    time: now - 5 * 3600,
                    archive: "nas-1".into(),
                    seconds: 3.0,
                    message: String::new(),
                }),
                schedule: Some(ScheduleEntry {
                    profile: "nas".into(),
                    due: now + 19 * 3600,
                    retry: now + 600,
                    retry_reason: "attempt 2 of 3 after: create failed".into(),
                    ..ScheduleEntry::default()
                }),
                ..ProfileStatus::default()
            }],
            led: None,
            mail: Some(MailStatus {
                pending: 0,
                dead_letters: 1,
                last_error: String::new(),
            }),
            unreachable: vec![("org.ferry.Led1".into(), "not running".into())],
            drive_stale_days: Some(2),
        }
    }

    #[test]
    fn render_words_each_fact() {
        let text = render(&sample(2_000_000_000));
        for expected in [
            "offsite-a      plugged in as /dev/sdb1",
            "last synced 3 days ago",
            "1.5 GiB copied in 42 s, newest archive nas-2026, 200 GiB free",
            "offsite-b      attachment unknown",
            "STALE: not synced within 2 days",
            "never synced",
            "every byte read back intact since 40 days ago (64 MiB of 2.0 GiB re-read by the last sync), repaired 1 damaged file; SCRUB OVERDUE",
            "FAILED at identity 2 hours ago: no token",
            "HEALTH DEGRADED (SMART overall health passed, 3 reallocated sectors), read 2 minutes ago: used anyway",
            "nas            last run 5 hours ago",
            "finished, archive nas-1",
            "next due in 19 hours",
            "retry in 10 minutes: attempt 2 of 3 after: create failed",
            "Mail    0 waiting to be sent, 1 undeliverable",
            "org.ferry.Led1 did not answer: not running",
        ] {
            assert!(text.contains(expected), "{expected:?} not in:\n{text}");
        }
    }
}
