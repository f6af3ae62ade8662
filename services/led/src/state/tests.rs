//! The LED's rules, event by event, and a property test over random
//! interleavings of every event.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeSet;
use Event::*;

fn run(events: Vec<Event>) -> Indicator {
    let mut indicator = Indicator::default();
    for e in events {
        indicator.apply(e);
    }
    indicator
}

fn started(job: &str, profile: &str) -> Event {
    BackupStarted {
        job: job.into(),
        profile: profile.into(),
    }
}

fn finished(job: &str, profile: &str) -> Event {
    BackupFinished {
        job: job.into(),
        profile: profile.into(),
    }
}

fn failed(job: &str, profile: &str) -> Event {
    BackupFailed {
        job: job.into(),
        profile: profile.into(),
        reason: "create: lock".into(),
    }
}

#[test]
fn a_good_flow_goes_working_then_done_then_idle() {
    let mut i = run(vec![DriveAttached("a".into())]);
    assert_eq!(i.state(), LedState::Working);
    i.apply(DriveBusy("a".into()));
    i.apply(SyncFinished("a".into()));
    assert_eq!(i.state(), LedState::Working);
    i.apply(DriveClosed("a".into()));
    assert_eq!(i.state(), LedState::Done);
    assert_eq!(i.reason(), "safe to remove: a");
    i.apply(DriveDetached("a".into()));
    assert_eq!(i.state(), LedState::Idle);
}

#[test]
fn failed_wins_and_holds_until_acknowledged() {
    let mut i = run(vec![
        DriveAttached("a".into()),
        SyncFailed("a".into(), "sync space: disk full".into()),
    ]);
    assert_eq!(i.state(), LedState::Failed);
    assert_eq!(i.reason(), "a: sync space: disk full");
    i.apply(DriveClosed("a".into()));
    assert_eq!(i.state(), LedState::Failed, "closing does not clear it");
    i.apply(DriveDetached("a".into()));
    assert_eq!(i.state(), LedState::Failed, "failed holds past detach");
    i.apply(started("7", "nas"));
    assert_eq!(i.state(), LedState::Failed, "failed wins over working");
    i.apply(Acknowledge);
    assert_eq!(i.state(), LedState::Working);
}

/// Issue 12: a sync failed, then an unrelated backup finished: still red.
#[test]
fn only_the_same_subjects_success_clears_its_failure() {
    let mut i = run(vec![
        DriveBusy("a".into()),
        SyncFailed("a".into(), "sync space: full".into()),
        DriveClosed("a".into()),
        started("nas-1", "nas"),
        finished("nas-1", "nas"),
    ]);
    assert_eq!(i.state(), LedState::Failed, "a backup is not the drive");
    i.apply(DriveDetached("a".into()));
    i.apply(DriveAttached("b".into()));
    i.apply(SyncFinished("b".into()));
    i.apply(DriveClosed("b".into()));
    assert_eq!(
        i.state(),
        LedState::Failed,
        "another drive is not the drive"
    );
    i.apply(DriveAttached("a".into()));
    i.apply(SyncFinished("a".into()));
    i.apply(DriveClosed("a".into()));
    assert_eq!(i.state(), LedState::Done, "a's own good flow clears it");
    assert_eq!(i.reason(), "safe to remove: a, b");

    let mut i = run(vec![failed("1", "nas"), started("2", "home")]);
    i.apply(finished("2", "home"));
    assert_eq!(i.state(), LedState::Failed);
    i.apply(started("3", "nas"));
    i.apply(BackupSkipped { job: "3".into() });
    assert_eq!(i.state(), LedState::Failed, "a skip is no success");
    i.apply(started("4", "nas"));
    i.apply(finished("4", "nas"));
    assert_eq!(i.state(), LedState::Idle);
}

/// Issue 12: SyncFailed, the drive is pulled, then DriveClosed: red, never
/// green for a drive that is gone.
#[test]
fn a_close_after_a_pull_is_not_done() {
    let mut i = run(vec![
        DriveAttached("a".into()),
        DriveBusy("a".into()),
        SyncFailed("a".into(), "sync copy: EIO".into()),
        DriveDetached("a".into()),
        DriveClosed("a".into()),
    ]);
    assert_eq!(i.state(), LedState::Failed);
    i.apply(Acknowledge);
    assert_eq!(i.state(), LedState::Idle, "gone: not done");
    let i = run(vec![
        DriveAttached("a".into()),
        DriveDetached("a".into()),
        DriveClosed("a".into()),
    ]);
    assert_eq!(i.state(), LedState::Idle, "pulled mid-flow: not done");
}

/// Issue 12: the watcher restarts while a closed drive is plugged in and
/// announces it again; ferry-crypt does not reopen it: not working.
#[test]
fn a_reannounced_drive_starts_nothing() {
    let mut i = run(vec![
        DriveAttached("a".into()),
        DriveBusy("a".into()),
        SyncFinished("a".into()),
        DriveClosed("a".into()),
    ]);
    i.apply(DriveAttached("a".into()));
    assert_eq!(i.state(), LedState::Done);
    let mut i = run(vec![
        DriveAttached("a".into()),
        SyncFailed("a".into(), "x".into()),
        DriveClosed("a".into()),
        Acknowledge,
    ]);
    i.apply(DriveAttached("a".into()));
    assert_eq!(i.state(), LedState::Idle);
    let mut off = BTreeMap::new();
    off.insert(
        "m".to_string(),
        DrivePolicy {
            opens_on_attach: false,
            powers_off: false,
        },
    );
    let mut i = Indicator::new(off);
    i.apply(DriveAttached("m".into()));
    assert_eq!(
        i.state(),
        LedState::Idle,
        "a manual drive opens on Open only"
    );
}

/// Issue 13: with power-off the detach comes before DriveClosed: no idle in
/// between, and done says it was powered off.
#[test]
fn power_off_goes_working_then_done_powered_off() {
    let mut policies = BTreeMap::new();
    policies.insert(
        "a".to_string(),
        DrivePolicy {
            opens_on_attach: true,
            powers_off: true,
        },
    );
    let mut i = Indicator::new(policies.clone());
    let mut seen = Vec::new();
    for e in [
        DriveAttached("a".into()),
        DriveBusy("a".into()),
        SyncFinished("a".into()),
        DriveDetached("a".into()),
        DriveClosed("a".into()),
    ] {
        i.apply(e);
        seen.push(i.state());
    }
    assert_eq!(
        seen,
        [
            LedState::Working,
            LedState::Working,
            LedState::Working,
            LedState::Working,
            LedState::Done
        ]
    );
    assert_eq!(i.reason(), "powered off, safe to unplug: a");
    i.apply(DriveAttached("a".into()));
    assert_eq!(i.state(), LedState::Working, "plugged in again");
    let mut i = Indicator::new(policies);
    for e in [
        DriveAttached("a".into()),
        DriveBusy("a".into()),
        DriveDetached("a".into()),
    ] {
        i.apply(e);
    }
    assert_eq!(i.state(), LedState::Idle, "pulled before the sync finished");
}

#[test]
fn a_warning_is_shown_until_a_clean_run() {
    let mut i = run(vec![
        started("1", "nas"),
        BackupWarned {
            job: "1".into(),
            profile: "nas".into(),
            reason: "finished with warnings: /x: No such file".into(),
        },
    ]);
    assert_eq!(i.state(), LedState::Failed);
    assert_eq!(
        i.reason(),
        "backup nas: finished with warnings: /x: No such file"
    );
    i.apply(started("2", "nas"));
    i.apply(finished("2", "nas"));
    assert_eq!(i.state(), LedState::Idle);
}

#[test]
fn a_drive_failure_ends_the_flow() {
    let mut i = run(vec![
        DriveAttached("a".into()),
        DriveBusy("a".into()),
        DriveFailed("a".into(), "identity: not ours".into()),
    ]);
    assert_eq!(i.state(), LedState::Failed);
    i.apply(Acknowledge);
    assert_eq!(i.state(), LedState::Idle);
}

fn failure(subject: &str, time: u64, stage: &str) -> Failure {
    Failure {
        subject: subject.into(),
        time,
        stage: stage.into(),
        message: "went wrong".into(),
    }
}

fn closed(name: &str) -> CryptDrive {
    CryptDrive {
        name: name.into(),
        state: "closed".into(),
        mountpoint: String::new(),
        device: "/dev/loop1".into(),
        message: String::new(),
    }
}

/// Issue 12: a restarted ferry-led shows the failures its peers persisted,
/// unless the same subject succeeded since or a person acknowledged them.
#[test]
fn at_start_failures_come_from_the_peers_persisted_state() {
    let mut facts = PeerFacts {
        crypt_drives: Some(vec![closed("a")]),
        drive_failures: vec![failure("a", 100, "sync space")],
        drive_successes: BTreeMap::from([("a".to_string(), 90)]),
        ..PeerFacts::default()
    };
    let i = Indicator::from_peers(BTreeMap::new(), &facts);
    assert_eq!(i.state(), LedState::Failed);
    assert_eq!(i.reason(), "a: sync space: went wrong");

    facts.acknowledged = 100;
    let i = Indicator::from_peers(BTreeMap::new(), &facts);
    assert_eq!(
        i.state(),
        LedState::Idle,
        "acknowledged; and a closed drive whose last flow failed is not done"
    );
    facts.acknowledged = 0;
    facts.drive_successes.insert("a".into(), 120);
    let i = Indicator::from_peers(BTreeMap::new(), &facts);
    assert_eq!(i.state(), LedState::Done, "a later success");

    let facts = PeerFacts {
        backup_results: vec![BackupResult {
            profile: "nas".into(),
            outcome: "skipped".into(),
            time: 300,
            archive: String::new(),
            seconds: 0.0,
            message: "not on AC".into(),
        }],
        backup_failures: vec![failure("nas", 200, "create")],
        backup_successes: BTreeMap::from([("nas".to_string(), 100)]),
        ..PeerFacts::default()
    };
    let i = Indicator::from_peers(BTreeMap::new(), &facts);
    assert_eq!(i.reason(), "backup nas: create: went wrong");
    let mut later = facts.clone();
    later.backup_successes.insert("nas".into(), 250);
    assert_eq!(
        Indicator::from_peers(BTreeMap::new(), &later).state(),
        LedState::Idle
    );
}

#[test]
fn at_start_a_backup_warning_or_failure_shows_until_acknowledged() {
    let result = |outcome: &str, time: u64| BackupResult {
        profile: "nas".into(),
        outcome: outcome.into(),
        time,
        archive: String::new(),
        seconds: 1.0,
        message: "create: /x: No such file".into(),
    };
    for outcome in ["finished-with-warnings", "failed"] {
        let mut facts = PeerFacts {
            backup_results: vec![result(outcome, 50)],
            ..PeerFacts::default()
        };
        let i = Indicator::from_peers(BTreeMap::new(), &facts);
        assert_eq!(i.state(), LedState::Failed, "{outcome}");
        assert!(i.reason().starts_with("backup nas: "), "{}", i.reason());
        facts.acknowledged = 50;
        let i = Indicator::from_peers(BTreeMap::new(), &facts);
        assert_eq!(i.state(), LedState::Idle, "{outcome} acknowledged");
    }
    let facts = PeerFacts {
        backup_results: vec![result("finished", 50)],
        backup_failures: vec![failure("nas", 40, "create")],
        ..PeerFacts::default()
    };
    assert_eq!(
        Indicator::from_peers(BTreeMap::new(), &facts).state(),
        LedState::Idle
    );
}

#[test]
fn a_rebuild_forgets_lost_jobs_but_keeps_the_failure() {
    let i = run(vec![
        started("1", "nas"),
        SyncFailed("a".into(), "space".into()),
    ]);
    let facts = PeerFacts {
        crypt_drives: Some(vec![closed("a")]),
        ..PeerFacts::default()
    };
    let fresh = i.rebuilt(&facts);
    assert_eq!(
        fresh.state(),
        LedState::Failed,
        "red holds across a peer's restart"
    );
    let done = run(vec![DriveAttached("a".into()), DriveClosed("a".into())]);
    let watcher_only = PeerFacts {
        watcher_attached: vec!["a".into()],
        ..PeerFacts::default()
    };
    assert_eq!(done.rebuilt(&watcher_only).state(), LedState::Done);
    assert_eq!(
        done.rebuilt(&PeerFacts::default()).state(),
        LedState::Idle,
        "gone since"
    );
    let i = run(vec![started("lost", "nas")]);
    assert_eq!(
        i.rebuilt(&PeerFacts::default()).state(),
        LedState::Idle,
        "a job its service no longer runs is gone"
    );
}

// ---- the property test ----

const DRIVES: [&str; 2] = ["a", "p"];
const PROFILES: [&str; 2] = ["nas", "home"];

fn any_event() -> impl Strategy<Value = Event> {
    let drive = proptest::sample::select(DRIVES.to_vec()).prop_map(String::from);
    let profile = proptest::sample::select(PROFILES.to_vec()).prop_map(String::from);
    let job = (0u8..3, proptest::sample::select(PROFILES.to_vec()))
        .prop_map(|(n, p)| (format!("{p}-{n}"), p.to_string()));
    prop_oneof![
        drive.clone().prop_map(DriveAttached),
        drive.clone().prop_map(DriveDetached),
        drive.clone().prop_map(DriveBusy),
        drive.clone().prop_map(SyncFinished),
        drive.clone().prop_map(DriveClosed),
        drive
            .clone()
            .prop_map(|d| DriveFailed(d, "unlock: bad key".into())),
        drive
            .clone()
            .prop_map(|d| SyncFailed(d, "sync copy: EIO".into())),
        job.clone()
            .prop_map(|(job, profile)| BackupStarted { job, profile }),
        job.clone()
            .prop_map(|(job, profile)| BackupFinished { job, profile }),
        job.clone().prop_map(|(job, profile)| BackupWarned {
            job,
            profile,
            reason: "warn".into()
        }),
        job.clone().prop_map(|(job, profile)| BackupFailed {
            job,
            profile,
            reason: "fail".into()
        }),
        job.prop_map(|(job, _)| BackupSkipped { job }),
        profile.prop_map(|_| Acknowledge),
        (
            drive.clone(),
            0u64..4,
            proptest::sample::select(vec![
                ("passed", "open"),
                ("unavailable", "open"),
                ("degraded", "warn"),
                ("failing", "refuse"),
            ])
        )
            .prop_map(|(d, time, (verdict, decision))| Health(vec![reading(
                &d, time, verdict, decision
            )])),
    ]
}

/// A model written from the rules' wording, independent of the indicator.
#[derive(Default)]
struct Oracle {
    /// Subjects failed (or warned) with no success of theirs or Acknowledge since.
    unresolved: BTreeSet<Subject>,
    /// Drives between a flow's start and its end.
    in_flow: BTreeSet<String>,
    /// Drives whose sync finished in the flow now running.
    synced: BTreeSet<String>,
    /// Running job ids.
    jobs: BTreeSet<String>,
    attached: BTreeSet<String>,
}

impl Oracle {
    fn apply(&mut self, e: &Event, powers_off: bool) {
        match e {
            // A drive announced again while plugged in is not reopened.
            DriveAttached(d) => {
                if self.attached.insert(d.clone()) {
                    self.in_flow.insert(d.clone());
                }
            }
            DriveBusy(d) => {
                self.in_flow.insert(d.clone());
                self.attached.insert(d.clone());
            }
            DriveDetached(d) => {
                self.attached.remove(d);
                if !(powers_off && self.synced.contains(d)) {
                    self.in_flow.remove(d);
                    self.synced.remove(d);
                }
            }
            SyncFinished(d) => {
                self.unresolved.remove(&Subject::Drive(d.clone()));
                self.synced.insert(d.clone());
            }
            DriveClosed(d) => {
                self.in_flow.remove(d);
                self.synced.remove(d);
            }
            DriveFailed(d, _) => {
                self.unresolved.insert(Subject::Drive(d.clone()));
                self.in_flow.remove(d);
                self.synced.remove(d);
            }
            SyncFailed(d, _) => {
                self.unresolved.insert(Subject::Drive(d.clone()));
            }
            BackupStarted { job, .. } => {
                self.jobs.insert(job.clone());
            }
            BackupFinished { job, profile } => {
                self.jobs.remove(job);
                self.unresolved.remove(&Subject::Profile(profile.clone()));
            }
            BackupWarned { job, profile, .. } | BackupFailed { job, profile, .. } => {
                self.jobs.remove(job);
                self.unresolved.insert(Subject::Profile(profile.clone()));
            }
            BackupSkipped { job } => {
                self.jobs.remove(job);
            }
            Acknowledge => self.unresolved.clear(),
            // A health reading is a reason, never a colour.
            Health(_) => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Green (or anything but red) never follows a failure of a subject
    /// without a success of that subject or Acknowledge; "working" never
    /// outlives every flow and job; "done" names only drives that are
    /// plugged in (or powered off by ferry).
    #[test]
    fn the_led_never_lies(events in proptest::collection::vec(any_event(), 0..60)) {
        let mut policies = BTreeMap::new();
        policies.insert("p".to_string(), DrivePolicy { opens_on_attach: true, powers_off: true });
        let mut led = Indicator::new(policies);
        let mut oracle = Oracle::default();
        for e in events {
            oracle.apply(&e, matches!(&e, DriveDetached(d) if d == "p"));
            led.apply(e.clone());
            let state = led.state();
            if !oracle.unresolved.is_empty() {
                prop_assert_eq!(state, LedState::Failed, "after {:?}: {:?}", e, oracle.unresolved);
                let reason = led.reason();
                for s in &oracle.unresolved {
                    let name = match s { Subject::Drive(d) => d.clone(), Subject::Profile(p) => format!("backup {p}") };
                    prop_assert!(reason.contains(&name), "{} lacks {}", reason, name);
                }
            }
            if state == LedState::Working {
                prop_assert!(!oracle.in_flow.is_empty() || !oracle.jobs.is_empty(),
                    "working with no flow and no job after {:?}", e);
            }
            if state == LedState::Done {
                let reason = led.reason();
                for part in reason.split("; ") {
                    if let Some(names) = part.strip_prefix("safe to remove: ") {
                        for d in names.split(", ") {
                            prop_assert!(oracle.attached.contains(d), "done for absent {} after {:?}", d, e);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn signals_become_events_with_their_reasons() {
    let event = |s| Event::from_signal(s);
    assert_eq!(
        event(FerrySignal::DriveHeld {
            drive: "a".into(),
            mountpoint: "/m".into()
        }),
        Some(DriveBusy("a".into()))
    );
    assert_eq!(
        event(FerrySignal::DriveFailed {
            drive: "a".into(),
            stage: "identity".into(),
            message: "not ours".into()
        }),
        Some(DriveFailed("a".into(), "identity: not ours".into()))
    );
    assert_eq!(
        event(FerrySignal::SyncFailed {
            drive: "a".into(),
            stage: "verify".into(),
            message: "bad".into()
        }),
        Some(SyncFailed("a".into(), "sync verify: bad".into()))
    );
    assert_eq!(
        event(FerrySignal::BackupFinishedWithWarnings {
            job: "j".into(),
            profile: "p".into(),
            archive: "x".into(),
            warnings: "w".into()
        }),
        Some(BackupWarned {
            job: "j".into(),
            profile: "p".into(),
            reason: "finished with warnings: w".into()
        })
    );
    let progress = FerrySignal::SyncProgress {
        drive: "a".into(),
        done: 1,
        total: 2,
        phase: "copy".into(),
    };
    assert_eq!(event(progress), None);
}

fn reading(drive: &str, time: u64, verdict: &str, decision: &str) -> DriveHealth {
    DriveHealth {
        drive: drive.into(),
        verdict: verdict.into(),
        decision: decision.into(),
        device: "/dev/sdb".into(),
        time,
        summary: "SMART overall health passed, 3 reallocated sectors".into(),
        figures: Default::default(),
    }
}

/// A health warning is its own subject: a good flow still ends green,
/// with the warning in the reason, and nothing but a passing reading of
/// that drive, a refusal or Acknowledge clears it.
#[test]
fn a_health_warning_is_a_reason_never_a_colour_and_holds_until_its_own_reading() {
    let warned = vec![reading("a", 10, "degraded", "warn")];
    let mut i = run(vec![DriveAttached("a".into()), Health(warned.clone())]);
    assert_eq!(i.state(), LedState::Working);
    assert!(
        i.reason()
            .starts_with("busy: a; health warning: a: health degraded ("),
        "{}",
        i.reason()
    );
    for event in [
        DriveBusy("a".into()),
        SyncFinished("a".into()),
        DriveClosed("a".into()),
    ] {
        i.apply(event);
    }
    assert_eq!(
        i.state(),
        LedState::Done,
        "the warning does not turn it red"
    );
    assert!(
        i.reason()
            .starts_with("safe to remove: a; health warning: a: "),
        "{}",
        i.reason()
    );
    i.apply(DriveDetached("a".into()));
    i.apply(finished("n-1", "nas"));
    assert_eq!(i.state(), LedState::Idle);
    assert!(
        i.reason().starts_with("health warning: a: "),
        "{}",
        i.reason()
    );
    // Another drive's reading, and this one's repeated, change nothing;
    // a reading smartctl could not take says nothing new.
    i.apply(Health(vec![
        warned[0].clone(),
        reading("b", 11, "passed", "open"),
    ]));
    i.apply(Health(vec![reading("a", 12, "unavailable", "open")]));
    assert!(i.reason().contains("health warning: a: "), "{}", i.reason());
    // Its own reading that passes clears it.
    i.apply(Health(vec![reading("a", 13, "passed", "open")]));
    assert_eq!(i.reason(), "");
}

#[test]
fn an_acknowledged_health_warning_is_not_raised_again_by_its_repeat() {
    let warned = vec![reading("a", 10, "failing", "warn")];
    let mut i = run(vec![Health(warned.clone()), Acknowledge]);
    assert_eq!(i.reason(), "");
    i.apply(Health(warned));
    assert_eq!(i.reason(), "", "a repeat is not a new reading");
    i.apply(Health(vec![reading("a", 20, "failing", "warn")]));
    assert!(i.reason().contains("health failing"), "{}", i.reason());
    // A refusal is DriveFailed (red) instead; the warning goes.
    i.apply(Health(vec![reading("a", 30, "failing", "refuse")]));
    i.apply(DriveFailed("a".into(), "health: refused".into()));
    assert_eq!(i.state(), LedState::Failed);
    assert_eq!(i.reason(), "a: health: refused");
}

#[test]
fn at_start_a_health_warning_stands_unless_acknowledged_since() {
    let facts = |acknowledged| PeerFacts {
        crypt_drives: Some(Vec::new()),
        drive_health: vec![
            reading("a", 100, "degraded", "warn"),
            reading("b", 100, "passed", "open"),
        ],
        acknowledged,
        ..PeerFacts::default()
    };
    let i = Indicator::from_peers(BTreeMap::new(), &facts(50));
    assert_eq!(i.state(), LedState::Idle);
    assert!(
        i.reason().starts_with("health warning: a: health degraded"),
        "{}",
        i.reason()
    );
    let i = Indicator::from_peers(BTreeMap::new(), &facts(200));
    assert_eq!(i.reason(), "");
    // A peer restart keeps what this LED saw, and repeats change nothing.
    let mut seen = Indicator::from_peers(BTreeMap::new(), &facts(50));
    seen.apply(Acknowledge);
    assert_eq!(seen.rebuilt(&facts(0)).reason(), "");
    // Started before ferry-crypt, after an Acknowledge: the readings
    // ferry-crypt then publishes from its ledger are older than that.
    let mut early = Indicator::from_peers(
        BTreeMap::new(),
        &PeerFacts {
            acknowledged: 150,
            ..PeerFacts::default()
        },
    );
    early.apply(Health(facts(0).drive_health));
    assert_eq!(early.reason(), "");
    early.apply(Health(vec![reading("a", 300, "degraded", "warn")]));
    assert!(
        early.reason().starts_with("health warning: a: "),
        "{}",
        early.reason()
    );
    early.apply(Acknowledge);
    early.acknowledged_at(400);
    let restarted = early.rebuilt(&PeerFacts {
        drive_health: vec![reading("a", 300, "degraded", "warn")],
        ..PeerFacts::default()
    });
    assert_eq!(restarted.reason(), "");
}
