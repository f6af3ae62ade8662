//! The notifier's rules, without a bus, a runtime or a disk.

use super::*;
use crate::compose::Class;

const NOW: u64 = 1_800_000_000;
const HOST: &str = "backup-host";

fn settings() -> Settings {
    Settings {
        mail: true,
        push: None,
        notify: NotifySettings::default(),
        drives: vec!["offsite-a".into()],
        host: HOST.into(),
    }
}

fn domain() -> Domain {
    Domain::rebuild(settings(), Ledger::default(), Vec::new(), NOW)
}

fn with_push() -> Domain {
    let text = "[profiles.nas]\nrepository = \"nas\"\nsources = [\"/srv\"]\n\
        [repositories.nas]\npath = \"/srv/borg\"\n\
        [drives.offsite-a]\nuuid = \"1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9\"\n\
        [push.drives]\noffsite-a = \"http://127.0.0.1:8000/d\"\n\
        [push.ntfy]\nurl = \"https://ntfy.sh/t\"\n";
    let config = ferry_config::Config::parse(text, std::path::Path::new("t")).expect("config");
    Domain::rebuild(
        Settings {
            push: config.push,
            ..settings()
        },
        Ledger::default(),
        Vec::new(),
        NOW,
    )
}

fn sync_failure(message: &str) -> Failure {
    Failure {
        source: Source::Sync,
        subject: "offsite-a".into(),
        stage: "copy".into(),
        message: message.into(),
        job: None,
    }
}

fn history_entry(id: &str, time: u64, message: &str) -> FailureEvent {
    FailureEvent {
        id: id.into(),
        subject: "offsite-a".into(),
        stage: "copy".into(),
        time,
        message: message.into(),
        job: String::new(),
    }
}

/// The mails among `effects`, as (subject, covers).
fn mails(effects: &[Effect]) -> Vec<(String, Covers)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Mail { draft, covers } => Some((draft.subject.clone(), covers.clone())),
            _ => None,
        })
        .collect()
}

fn bodies(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Mail { draft, .. } => Some(draft.body.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_failure_signal_mails_each_new_history_entry_once() {
    let mut d = domain();
    let history = vec![
        history_entry("s-1", NOW - 10, "disk full"),
        history_entry("s-2", NOW - 5, "read error"),
    ];
    let event = Event::Failed(sync_failure("read error"));
    assert_eq!(d.needs(&event).history, Some(Source::Sync));
    let looked = Looked {
        history: Some(history.clone()),
        ..Looked::default()
    };
    let first = d.signal(event.clone(), looked.clone(), NOW);
    let sent = mails(&first);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(sent[0].1.contains(&("Sync1#s-1".to_string(), NOW - 10)));
    assert!(sent[1].1.contains(&("Sync1#s-2".to_string(), NOW - 5)));
    assert!(first.contains(&Effect::Save));
    // The same signal again (a peer re-emitting, or a second listener):
    // nothing new in the history, nothing mailed.
    let again = d.signal(event, looked, NOW + 1);
    assert!(mails(&again).is_empty(), "{again:?}");
}

#[test]
fn a_failure_the_history_does_not_hold_is_mailed_from_the_signal() {
    let mut d = domain();
    let looked = Looked {
        history: Some(vec![history_entry("s-1", NOW - 10, "disk full")]),
        ..Looked::default()
    };
    let effects = d.signal(Event::Failed(sync_failure("lost the lock")), looked, NOW);
    let sent = mails(&effects);
    assert_eq!(sent.len(), 2, "the history entry and the signal: {sent:?}");
    assert_eq!(sent[1].1, vec![("Sync1/offsite-a".to_string(), NOW)]);
    assert_eq!(d.ledger().failures.get("sync"), Some(&2));
}

#[test]
fn a_peer_without_history_is_mailed_from_the_signal() {
    let mut d = domain();
    let effects = d.signal(
        Event::Failed(sync_failure("disk full")),
        Looked::default(),
        NOW,
    );
    let sent = mails(&effects);
    assert_eq!(sent.len(), 1);
    assert!(sent[0].0.contains("offsite-a"), "{}", sent[0].0);
    assert!(!d.ledger().is_new_failure("Sync1/offsite-a", NOW));
}

#[test]
fn identical_failures_within_the_window_become_one_follow_up() {
    let mut d = domain();
    let failure = || Event::Failed(sync_failure("disk full"));
    assert_eq!(mails(&d.signal(failure(), Looked::default(), NOW)).len(), 1);
    for later in 1..=3 {
        let effects = d.signal(failure(), Looked::default(), NOW + later * 60);
        assert!(
            mails(&effects).is_empty(),
            "repeat {later} mailed: {effects:?}"
        );
    }
    assert_eq!(
        d.ledger().failures.get("sync"),
        Some(&4),
        "every one counted"
    );
    let window = u64::from(NotifySettings::default().repeat_window_minutes) * 60;
    let due = d.next_due(NOW + 200).expect("a follow-up is due");
    assert!(due <= window, "due in {due} s");
    let follow_up = d.tick(&[], NOW + window + 1);
    let sent = mails(&follow_up);
    assert_eq!(sent.len(), 1, "one follow-up: {follow_up:?}");
    assert!(
        sent[0].0.contains("3 more times"),
        "it counts the repeats: {}",
        sent[0].0
    );
}

#[test]
fn the_hourly_limit_holds_mails_for_one_digest() {
    let mut d = Domain::rebuild(
        Settings {
            notify: NotifySettings {
                max_per_hour: 1,
                ..NotifySettings::default()
            },
            ..settings()
        },
        Ledger::default(),
        Vec::new(),
        NOW,
    );
    let mut mailed = 0;
    for (i, message) in ["one", "two", "three"].iter().enumerate() {
        let effects = d.signal(
            Event::Failed(sync_failure(message)),
            Looked::default(),
            NOW + i as u64,
        );
        mailed += mails(&effects).len();
    }
    assert_eq!(mailed, 1, "only the first within the hour");
    let digest = d.tick(&[], NOW + 3601);
    let sent = bodies(&digest);
    assert_eq!(sent.len(), 1, "{digest:?}");
    assert!(
        sent[0].contains("two") && sent[0].contains("three"),
        "{}",
        sent[0]
    );
}

#[test]
fn a_restart_mails_what_was_missed_and_nothing_twice() {
    let mut ledger = Ledger::default();
    ledger.mark_event("Sync1", "s-1");
    ledger.mark_mailed("Borg1/nas", NOW - 100);
    let mut d = Domain::rebuild(settings(), ledger, Vec::new(), NOW);
    let found = Found {
        syncs: vec![SyncRecord {
            drive: "offsite-a".into(),
            time: NOW - 50,
            bytes: 1,
            seconds: 1.0,
            archive: String::new(),
            free: 1,
        }],
        profiles: None,
        failures: vec![
            (Source::Crypt, PeerFailures::Absent),
            (
                Source::Sync,
                PeerFailures::History(vec![
                    history_entry("s-1", NOW - 300, "mailed before the restart"),
                    history_entry("s-2", NOW - 200, "while the notifier was down"),
                ]),
            ),
            (
                Source::Borg,
                PeerFailures::Last(vec![ferry_interfaces::Failure {
                    subject: "nas".into(),
                    time: NOW - 100,
                    stage: "create".into(),
                    message: "already mailed".into(),
                }]),
            ),
        ],
    };
    let effects = d.recover(found, NOW);
    let sent = bodies(&effects);
    assert_eq!(sent.len(), 1, "only s-2: {effects:?}");
    assert!(sent[0].contains("while the notifier was down"));
    assert!(
        sent[0].contains("not running"),
        "marked as late: {}",
        sent[0]
    );
    assert_eq!(d.ledger().last_sync.get("offsite-a"), Some(&(NOW - 50)));
}

#[test]
fn a_failure_covered_by_a_spooled_letter_is_not_mailed_again_after_a_crash() {
    // The mail was spooled, then the notifier died before writing its
    // ledger: the letter in the outbox covers the failure.
    let spooled = vec![("Borg1/nas".to_string(), NOW - 100)];
    let mut d = Domain::rebuild(settings(), Ledger::default(), spooled, NOW);
    let found = Found {
        syncs: Vec::new(),
        profiles: None,
        failures: vec![(
            Source::Borg,
            PeerFailures::Last(vec![ferry_interfaces::Failure {
                subject: "nas".into(),
                time: NOW - 100,
                stage: "create".into(),
                message: "x".into(),
            }]),
        )],
    };
    assert!(mails(&d.recover(found, NOW)).is_empty());
}

#[test]
fn a_closed_drive_gets_its_summary_only_after_a_sync_and_with_sync_success() {
    let mut d = Domain::rebuild(
        Settings {
            notify: NotifySettings {
                sync_success: true,
                ..NotifySettings::default()
            },
            ..settings()
        },
        Ledger::default(),
        Vec::new(),
        NOW,
    );
    let closed = Event::DriveClosed("offsite-a".into());
    assert!(!d.needs(&closed).syncs, "no sync, nothing to look up");
    assert!(mails(&d.signal(closed.clone(), Looked::default(), NOW)).is_empty());
    let finished = Event::SyncFinished {
        drive: "offsite-a".into(),
        bytes: 2048,
        seconds: 3.0,
    };
    d.signal(finished, Looked::default(), NOW);
    assert_eq!(d.ledger().last_sync.get("offsite-a"), Some(&NOW));
    assert!(d.needs(&closed).syncs);
    let sent = mails(&d.signal(closed.clone(), Looked::default(), NOW + 5));
    assert_eq!(sent.len(), 1);
    assert!(sent[0].0.contains("offsite-a"), "{}", sent[0].0);
    assert!(mails(&d.signal(closed, Looked::default(), NOW + 6)).is_empty());

    let mut quiet = domain();
    quiet.signal(
        Event::SyncFinished {
            drive: "offsite-a".into(),
            bytes: 1,
            seconds: 1.0,
        },
        Looked::default(),
        NOW,
    );
    let closed = Event::DriveClosed("offsite-a".into());
    assert!(mails(&quiet.signal(closed, Looked::default(), NOW)).is_empty());
}

#[test]
fn requests_without_mail_are_refused() {
    let mut d = Domain::rebuild(
        Settings {
            mail: false,
            ..settings()
        },
        Ledger::default(),
        Vec::new(),
        NOW,
    );
    assert_eq!(d.request(Request::Test, NOW), Err(Refusal::NoMail));
    let mut d = domain();
    let effects = d.request(Request::Test, NOW).expect("test mail");
    assert_eq!(mails(&effects).len(), 1);
}

#[test]
fn a_unit_failing_again_within_the_window_is_counted_not_mailed() {
    let mut d = domain();
    let failed = || Request::UnitFailed {
        unit: "ferry-sync.service".into(),
        journal: "lines".into(),
    };
    let first = d.request(failed(), NOW).expect("mailed");
    assert_eq!(mails(&first).len(), 1);
    let second = d.request(failed(), NOW + 60).expect("counted");
    assert!(mails(&second).is_empty());
    assert!(second.contains(&Effect::Save));
}

fn health(decision: &str, time: u64) -> HealthRecord {
    HealthRecord {
        time,
        device: "/dev/sdb".into(),
        decision: decision.into(),
        verdict: "degraded".into(),
        summary: "5 reallocated sectors".into(),
        reallocated: Some(5),
        pending: None,
        uncorrectable: None,
        power_on_hours: None,
        temperature: None,
    }
}

#[test]
fn a_health_warning_is_mailed_once_per_reading() {
    let mut d = with_push();
    let opened = Event::DriveOpened("offsite-a".into());
    assert_eq!(d.needs(&opened).health.as_deref(), Some("offsite-a"));
    let looked = |record| Looked {
        health: Some(record),
        ..Looked::default()
    };
    let first = d.signal(opened.clone(), looked(health("warn", NOW - 1)), NOW);
    assert_eq!(mails(&first).len(), 1);
    let ntfy = first.iter().any(|e| {
        matches!(e, Effect::Push(letters)
            if letters.iter().any(|l| matches!(l.target, push::Target::Ntfy { .. })))
    });
    assert!(ntfy, "and pushed to ntfy: {first:?}");
    let same = d.signal(opened.clone(), looked(health("warn", NOW - 1)), NOW + 10);
    assert!(mails(&same).is_empty(), "same reading: {same:?}");
    let next = d.signal(opened.clone(), looked(health("warn", NOW + 20)), NOW + 30);
    assert_eq!(mails(&next).len(), 1, "a new reading");
    let fine = d.signal(opened, looked(health("open", NOW + 40)), NOW + 50);
    assert!(mails(&fine).is_empty());
}

#[test]
fn a_failure_is_pushed_before_it_is_mailed() {
    let mut d = with_push();
    let effects = d.signal(
        Event::Failed(sync_failure("disk full")),
        Looked::default(),
        NOW,
    );
    let push_at = effects.iter().position(|e| matches!(e, Effect::Push(_)));
    let mail_at = effects
        .iter()
        .position(|e| matches!(e, Effect::Mail { .. }));
    assert!(push_at.is_some() && push_at < mail_at, "{effects:?}");
    let letters: Vec<&PushLetter> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Push(l) => Some(l),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(letters
        .iter()
        .all(|l| l.covers.contains(&("Sync1/offsite-a".to_string(), NOW))));
}

#[test]
fn a_scrub_overdue_is_mailed_at_most_once_a_day() {
    let mut d = domain();
    let overdue = DriveVerification {
        drive: "offsite-a".into(),
        time: NOW,
        verified_since: 0,
        read: 1,
        total: 10,
        repaired: 0,
        overdue: true,
    };
    let count = |effects: &[Effect]| {
        effects
            .iter()
            .filter(|e| matches!(e, Effect::Mail { draft, .. } if draft.class != Class::Failure && draft.subject.contains("offsite-a")))
            .count()
    };
    assert_eq!(count(&d.tick(std::slice::from_ref(&overdue), NOW)), 1);
    assert_eq!(
        count(&d.tick(std::slice::from_ref(&overdue), NOW + 3600)),
        0
    );
    assert_eq!(count(&d.tick(&[overdue], NOW + DAY)), 1);
}

#[test]
fn a_drive_never_synced_becomes_stale_after_the_configured_days() {
    let mut d = domain();
    let age = u64::from(NotifySettings::default().drive_stale_days) * DAY;
    assert!(mails(&d.tick(&[], NOW + 60)).is_empty());
    assert!(d.next_due(NOW + 60).is_some_and(|wait| wait <= age));
    let stale = d.tick(&[], NOW + age + 1);
    assert_eq!(mails(&stale).len(), 1, "{stale:?}");
}
