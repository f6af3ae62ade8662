//! Pushes: what the monitoring a person already runs is told, as letters
//! for the durable outbox.
//!
//! Two kinds. Healthchecks-style pings per profile and drive (the
//! protocol of healthchecks.io and its clones): `<url>/start` when a
//! backup starts or a drive is opened, `<url>` on success, `<url>/fail` on
//! a failure, `<url>/log` when a backup is skipped (recorded, no change of
//! state); the body is the outcome in words. And an ntfy message on every
//! failure (Title, Priority, Tags headers; the body says what failed).
//!
//! This module is pure: events in, [`PushLetter`]s out. [`crate::pushing`]
//! delivers them with the same outbox, in-doubt marks and retry policy as
//! mail. Pushes go strictly in the order they were queued (ids sort by
//! time), so `/start` never arrives after the outcome of the same run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_config::{Ntfy, Push};
use ferry_interfaces::DeadLetter;
use serde::{Deserialize, Serialize};

use crate::compose::{human_bytes, human_duration, one_line, utc};
use crate::events::{Event, Failure, Source};
use crate::outbox::Letter;

/// The longest body a push carries (healthchecks keeps 10 kB).
const BODY_MAX: usize = 8_000;

/// A healthchecks ping's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ping {
    /// `/start`: a run began.
    Start,
    /// The bare URL: the run succeeded.
    Success,
    /// `/fail`: the run failed.
    Fail,
    /// `/log`: something worth recording, no change of state.
    Log,
}

impl Ping {
    /// What is appended to the check's URL.
    pub fn suffix(self) -> &'static str {
        match self {
            Ping::Start => "/start",
            Ping::Success => "",
            Ping::Fail => "/fail",
            Ping::Log => "/log",
        }
    }
}

/// Where a push goes and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Target {
    /// A healthchecks ping: POST the body to `url` (suffix included).
    Ping {
        /// The full URL.
        url: String,
        /// Which ping.
        ping: Ping,
    },
    /// An ntfy message: POST the body to the topic URL; the access token
    /// is read from its file or credential when sent, never stored here.
    Ntfy {
        /// The topic URL.
        url: String,
        /// The Title header.
        title: String,
        /// The Priority header (min … urgent).
        priority: String,
        /// The Tags header, joined with commas.
        tags: Vec<String>,
    },
}

/// A push in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushLetter {
    /// `push-<unix nanoseconds>`: unique, and sorts in queueing order.
    pub id: String,
    /// Unix time it was queued.
    pub created: u64,
    /// What it is about, e.g. `fail profile nas` (NotificationQueued's
    /// reason, a dead letter's subject).
    pub reason: String,
    /// Where it goes.
    pub target: Target,
    /// The body, plain text.
    pub body: String,
    /// The failures it reports (as a failure mail's), so a restart knows
    /// they were pushed even if the ledger was not written yet.
    #[serde(default)]
    pub covers: Vec<(String, u64)>,
    /// Requests sent whose answer never came (ferry-notifier stopped); at
    /// [`crate::compose::MAX_IN_DOUBT`] it is not sent again.
    #[serde(default)]
    pub in_doubt: u32,
}

impl Letter for PushLetter {
    fn id(&self) -> &str {
        &self.id
    }
    fn urgent(&self) -> bool {
        // Strict order: an outcome must not overtake its /start.
        false
    }
    fn covers(&self) -> &[(String, u64)] {
        &self.covers
    }
    fn dead_letter(&self, error: String) -> DeadLetter {
        DeadLetter {
            id: self.id.clone(),
            subject: self.reason.clone(),
            reason: self.reason.clone(),
            created: self.created,
            error,
        }
    }
    fn reset_doubt(&mut self) {
        self.in_doubt = 0;
    }
}

/// A new push id: `push-` and the wall clock in nanoseconds, strictly
/// increasing within this process (and across restarts, as time moves on).
fn new_push_id() -> String {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut previous = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(previous + 1);
        match LAST.compare_exchange(previous, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return format!("push-{next:020}"),
            Err(seen) => previous = seen,
        }
    }
}

/// Which subject a ping is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A backup profile.
    Profile,
    /// A drive.
    Drive,
}

impl Subject {
    fn word(self) -> &'static str {
        match self {
            Subject::Profile => "profile",
            Subject::Drive => "drive",
        }
    }
}

/// The configured ping URL of a profile or drive.
fn check_url<'a>(push: &'a Push, subject: Subject, name: &str) -> Option<&'a str> {
    match subject {
        Subject::Profile => push.profiles.get(name),
        Subject::Drive => push.drives.get(name),
    }
    .map(String::as_str)
}

/// A ping of `name`'s check, when one is configured.
pub fn ping(
    push: &Push,
    subject: Subject,
    name: &str,
    kind: Ping,
    body: String,
    now: u64,
) -> Option<PushLetter> {
    let base = check_url(push, subject, name)?;
    let word = match kind {
        Ping::Start => "start",
        Ping::Success => "success",
        Ping::Fail => "fail",
        Ping::Log => "log",
    };
    Some(PushLetter {
        id: new_push_id(),
        created: now,
        reason: format!("{word} {} {}", subject.word(), one_line(name, 64)),
        target: Target::Ping {
            url: format!("{}{}", base.trim_end_matches('/'), kind.suffix()),
            ping: kind,
        },
        body: cut(body),
        covers: Vec::new(),
        in_doubt: 0,
    })
}

fn cut(mut body: String) -> String {
    if body.len() > BODY_MAX {
        let mut end = BODY_MAX;
        while !body.is_char_boundary(end) {
            end -= 1;
        }
        body.truncate(end);
        body.push_str("\n[cut]");
    }
    body
}

/// The ping an event (other than a failure) asks for: start, success or
/// log, with the outcome as the body.
pub fn ping_of_event(push: &Push, event: &Event, now: u64, host: &str) -> Option<PushLetter> {
    let (subject, name, kind, body) = match event {
        Event::BackupStarted { job, profile } => (
            Subject::Profile,
            profile,
            Ping::Start,
            format!("ferry on {host}: backup {profile} started (job {job})"),
        ),
        Event::BackupFinished {
            job,
            profile,
            archive,
        } => (
            Subject::Profile,
            profile,
            Ping::Success,
            format!("ferry on {host}: backup {profile} finished (job {job}), archive {archive}"),
        ),
        Event::BackupFinishedWithWarnings {
            job,
            profile,
            archive,
            warnings,
        } => (
            Subject::Profile,
            profile,
            Ping::Success,
            format!(
                "ferry on {host}: backup {profile} finished with warnings (job {job}), \
                 archive {archive}; some files were not read: {warnings}"
            ),
        ),
        Event::BackupSkipped {
            job,
            profile,
            reason,
        } => (
            Subject::Profile,
            profile,
            Ping::Log,
            format!("ferry on {host}: backup {profile} skipped (job {job}): {reason}"),
        ),
        Event::DriveOpened(drive) => (
            Subject::Drive,
            drive,
            Ping::Start,
            format!("ferry on {host}: drive {drive} opened, sync starting"),
        ),
        Event::SyncFinished {
            drive,
            bytes,
            seconds,
        } => (
            Subject::Drive,
            drive,
            Ping::Success,
            format!(
                "ferry on {host}: drive {drive} synced, {} copied in {}",
                human_bytes(*bytes),
                human_duration(*seconds)
            ),
        ),
        Event::Failed(_) | Event::DriveClosed(_) => return None,
    };
    ping(push, subject, name, kind, body, now)
}

/// The pushes a failure makes: its check's `/fail` ping and the ntfy
/// message. `when` is the failure's time; `late` says the notifier found
/// it at start. `covers` as the failure mail's.
pub fn pushes_of_failure(
    push: &Push,
    failure: &Failure,
    when: u64,
    late: bool,
    host: &str,
    covers: &[(String, u64)],
) -> Vec<PushLetter> {
    let subject = match failure.source {
        Source::Borg => Subject::Profile,
        Source::Crypt | Source::Sync => Subject::Drive,
    };
    let mut body = format!(
        "ferry on {host}: {} {} failed at stage {} ({}).\n{}",
        subject.word(),
        failure.subject,
        failure.stage,
        utc(when),
        failure.message
    );
    if late {
        body.push_str(
            "\n(found when ferry-notifier started: it happened while it was not running)",
        );
    }
    let mut out = Vec::new();
    out.extend(ping(
        push,
        subject,
        &failure.subject,
        Ping::Fail,
        body.clone(),
        when,
    ));
    if let Some(ntfy) = &push.ntfy {
        let draft = failure.draft(when, late, host);
        out.push(ntfy_letter(ntfy, &draft.subject, body, when));
    }
    for letter in &mut out {
        letter.covers = covers.to_vec();
    }
    out
}

/// An ntfy message titled `title`.
pub fn ntfy_letter(ntfy: &Ntfy, title: &str, body: String, now: u64) -> PushLetter {
    let title = format!("ferry: {}", one_line(title, 160));
    PushLetter {
        id: new_push_id(),
        created: now,
        reason: format!("ntfy {}", one_line(&title, 120)),
        target: Target::Ntfy {
            url: ntfy.url.clone(),
            title,
            priority: ntfy.priority.as_str().to_string(),
            tags: ntfy.tags.clone(),
        },
        body: cut(body),
        covers: Vec::new(),
        in_doubt: 0,
    }
}

/// What an HTTP answer means for a push: 2xx delivered; 408, 429 and 5xx
/// try again later; 3xx (redirects are not followed: the URL is wrong) and
/// other 4xx never work.
pub fn outcome_of_status(status: u16) -> crate::deliver::Outcome {
    use crate::deliver::Outcome;
    match status {
        200..=299 => Outcome::Accepted,
        408 | 429 | 500..=599 => Outcome::Transient(format!("HTTP {status}")),
        300..=399 => Outcome::Permanent(format!(
            "HTTP {status}: the server redirects, and ferry does not follow redirects; \
             put the final URL in ferry.toml"
        )),
        _ => Outcome::Permanent(format!("HTTP {status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::Outcome;

    fn push() -> Push {
        let text = "[profiles.nas]\nrepository = \"nas\"\nsources = [\"/srv\"]\n\
            [repositories.nas]\npath = \"/srv/borg\"\n\
            [drives.offsite-a]\nuuid = \"1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9\"\n\
            [push.profiles]\nnas = \"https://hc.example.org/p/nas/\"\n\
            [push.drives]\noffsite-a = \"http://127.0.0.1:8000/d\"\n\
            [push.ntfy]\nurl = \"https://ntfy.sh/t\"\ntags = [\"warning\", \"floppy_disk\"]\n";
        ferry_config::Config::parse(text, std::path::Path::new("t"))
            .expect("config")
            .push
            .expect("push")
    }

    fn url(letter: &PushLetter) -> &str {
        match &letter.target {
            Target::Ping { url, .. } | Target::Ntfy { url, .. } => url,
        }
    }

    #[test]
    fn each_event_pings_its_subjects_check() {
        let push = push();
        let started = Event::BackupStarted {
            job: "nas-1".into(),
            profile: "nas".into(),
        };
        let start = ping_of_event(&push, &started, 5, "h").expect("configured");
        assert_eq!(url(&start), "https://hc.example.org/p/nas/start");
        let done = Event::BackupFinished {
            job: "nas-1".into(),
            profile: "nas".into(),
            archive: "nas-2024".into(),
        };
        let done = ping_of_event(&push, &done, 6, "h").expect("configured");
        assert_eq!(url(&done), "https://hc.example.org/p/nas");
        assert!(done.body.contains("archive nas-2024"));
        assert!(start.id < done.id, "queueing order is id order");
        let synced = Event::SyncFinished {
            drive: "offsite-a".into(),
            bytes: 1 << 30,
            seconds: 60.0,
        };
        let synced = ping_of_event(&push, &synced, 7, "h").expect("configured");
        assert_eq!(url(&synced), "http://127.0.0.1:8000/d");
        assert!(synced.body.contains("1.0 GiB copied"), "{}", synced.body);
        let other = Event::DriveOpened("offsite-b".into());
        assert!(ping_of_event(&push, &other, 7, "h").is_none());
        assert!(ping_of_event(&push, &Event::DriveClosed("offsite-a".into()), 7, "h").is_none());
    }

    #[test]
    fn a_failure_pings_fail_and_tells_ntfy() {
        let push = push();
        let failure = Failure {
            source: Source::Sync,
            subject: "offsite-a".into(),
            stage: "space".into(),
            message: "need 900 MiB, drive has 12 MiB".into(),
            job: None,
        };
        let covers = vec![("Sync1/offsite-a".to_string(), 9)];
        let out = pushes_of_failure(&push, &failure, 9, false, "nas", &covers);
        assert_eq!(out.len(), 2);
        assert_eq!(url(&out[0]), "http://127.0.0.1:8000/d/fail");
        assert!(out[0].body.contains("failed at stage space"));
        assert!(out[0].body.contains("need 900 MiB"));
        match &out[1].target {
            Target::Ntfy {
                title,
                priority,
                tags,
                ..
            } => {
                assert_eq!(title, "ferry: sync of drive offsite-a failed at space");
                assert_eq!(priority, "high");
                assert_eq!(tags, &["warning", "floppy_disk"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(out.iter().all(|l| l.covers == covers));
    }

    #[test]
    fn statuses() {
        assert_eq!(outcome_of_status(200), Outcome::Accepted);
        assert!(matches!(outcome_of_status(429), Outcome::Transient(_)));
        assert!(matches!(outcome_of_status(503), Outcome::Transient(_)));
        assert!(matches!(outcome_of_status(404), Outcome::Permanent(_)));
        assert!(matches!(outcome_of_status(301), Outcome::Permanent(e) if e.contains("redirect")));
    }

    #[test]
    fn a_long_body_is_cut_on_a_character_boundary() {
        let body = cut("é".repeat(BODY_MAX));
        assert!(body.len() <= BODY_MAX + 6 && body.ends_with("[cut]"));
    }
}
