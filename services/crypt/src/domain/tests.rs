//! The rules of ferry-crypt, without a bus, a runtime or a disk.

use super::*;

fn name(s: &str) -> Name {
    Name::new(s).expect("name")
}

fn enrolled(drive: &str, open_on_attach: bool) -> Enrolled {
    Enrolled {
        name: name(drive),
        uuid: FsUuid::new("abcd-1234").expect("uuid"),
        open_on_attach,
        mountpoint: format!("/mnt/ferry/{drive}"),
    }
}

fn drives() -> Drives {
    Drives::new(vec![enrolled("a", true)], BTreeMap::new())
}

fn attached(drive: &str) -> FerrySignal {
    FerrySignal::DriveAttached {
        drive: drive.into(),
        device: "/dev/sdb1".into(),
        uuid: "ABCD-1234".into(),
    }
}

fn detached(drive: &str) -> FerrySignal {
    FerrySignal::DriveDetached {
        drive: drive.into(),
        uuid: "abcd-1234".into(),
    }
}

fn sync_finished(drive: &str) -> FerrySignal {
    FerrySignal::SyncFinished {
        drive: drive.into(),
        bytes: 1,
        seconds: 1.0,
    }
}

/// The operations `effects` start.
fn started(effects: &[Effect]) -> Vec<Operation> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Start { operation, .. } => Some(*operation),
            _ => None,
        })
        .collect()
}

/// The signals `effects` emit.
fn emitted(effects: &[Effect]) -> Vec<Signal> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Emit(signal) => Some(signal.clone()),
            _ => None,
        })
        .collect()
}

fn state(drives: &Drives) -> String {
    drives.view()[0].state.clone()
}

/// Drive `a` plugged in and opened.
fn opened() -> Drives {
    let mut d = drives();
    assert_eq!(started(&d.signal(&attached("a"))), [Operation::Open]);
    d.finished(&name("a"), Operation::Open, Ok(()), 5);
    assert_eq!(state(&d), "open");
    d
}

fn entry(state: CryptState, in_use: bool, running: bool) -> Entry {
    Entry {
        uuid: FsUuid::new("abcd-1234").expect("uuid"),
        open_on_attach: true,
        mountpoint: "/mnt/a".into(),
        state,
        device: None,
        message: String::new(),
        running: running.then_some(Operation::Open),
        in_use,
        removed_meanwhile: false,
        plugged_meanwhile: false,
        sync_lost: false,
    }
}

#[test]
fn plugging_in_opens_but_a_repeated_announcement_does_not() {
    use CryptState::*;
    let fresh = Trigger::Attached { was_absent: true };
    let again = Trigger::Attached { was_absent: false };
    assert_eq!(
        entry(Absent, false, false).reaction(fresh),
        Some(Operation::Open)
    );
    assert_eq!(
        entry(Attached, false, false).reaction(again),
        Some(Operation::Open)
    );
    assert_eq!(entry(Closed, false, false).reaction(again), None);
    assert_eq!(entry(Failed, false, false).reaction(again), None);
    assert_eq!(
        entry(Failed, false, false).reaction(fresh),
        Some(Operation::Open)
    );
    assert_eq!(entry(Open, true, false).reaction(again), None);
    assert_eq!(entry(Opening, false, true).reaction(fresh), None);
    let mut manual = entry(Absent, false, false);
    manual.open_on_attach = false;
    assert_eq!(manual.reaction(fresh), None);
}

#[test]
fn removal_and_sync_results_close_only_what_is_in_use() {
    use CryptState::*;
    let close = Some(Operation::Close);
    assert_eq!(
        entry(Open, true, false).reaction(Trigger::Detached),
        Some(Operation::Remove)
    );
    assert_eq!(
        entry(Attached, false, false).reaction(Trigger::Detached),
        None
    );
    assert_eq!(entry(Open, true, false).reaction(Trigger::SyncDone), close);
    assert_eq!(
        entry(Failed, true, false).reaction(Trigger::SyncDone),
        close
    );
    assert_eq!(
        entry(Closed, false, false).reaction(Trigger::SyncDone),
        None
    );
    assert_eq!(entry(Closing, true, true).reaction(Trigger::SyncDone), None);
    assert_eq!(entry(Held, true, false).reaction(Trigger::SyncDone), None);
}

#[test]
fn a_lost_sync_worker_closes_only_drives_open_for_a_flow() {
    use CryptState::*;
    let lost = Trigger::SyncLost;
    assert_eq!(
        entry(Open, true, false).reaction(lost),
        Some(Operation::Close)
    );
    assert_eq!(entry(Opening, false, true).reaction(lost), None);
    assert_eq!(entry(Closing, true, true).reaction(lost), None);
    assert_eq!(entry(Closed, false, false).reaction(lost), None);
    assert_eq!(entry(Failed, true, false).reaction(lost), None);
    assert_eq!(entry(Attached, false, false).reaction(lost), None);
}

#[test]
fn a_flow_opens_announces_closes_and_marks_the_drive_closed() {
    let mut d = drives();
    let effects = d.signal(&attached("a"));
    assert_eq!(state(&d), "opening");
    assert!(matches!(
        &effects[..],
        [Effect::Start { device: Some(dev), .. }, Effect::Publish] if dev == "/dev/sdb1"
    ));
    let effects = d.finished(&name("a"), Operation::Open, Ok(()), 5);
    assert_eq!(
        effects,
        [
            Effect::Publish,
            Effect::Emit(Signal::Opened {
                drive: name("a"),
                mountpoint: "/mnt/ferry/a".into()
            })
        ]
    );
    assert_eq!(started(&d.signal(&sync_finished("a"))), [Operation::Close]);
    let effects = d.finished(&name("a"), Operation::Close, Ok(()), 6);
    let marker = BTreeMap::from([("a".to_string(), "/dev/sdb1 abcd-1234".to_string())]);
    assert_eq!(
        effects,
        [
            Effect::SaveClosed(marker),
            Effect::Publish,
            Effect::Emit(Signal::Closed { drive: name("a") })
        ]
    );
    assert_eq!(state(&d), "closed");
    // Pulled out: the marker goes, the drive is absent.
    let effects = d.signal(&detached("a"));
    assert_eq!(
        effects,
        [Effect::SaveClosed(BTreeMap::new()), Effect::Publish]
    );
    assert_eq!(state(&d), "absent");
}

#[test]
fn a_failure_is_recorded_then_published_then_signalled() {
    let mut d = drives();
    d.signal(&attached("a"));
    let failed = Failed::new(CryptStage::Identity, "not ours");
    let effects = d.finished(&name("a"), Operation::Open, Err(failed.clone()), 9);
    assert_eq!(
        effects,
        [
            Effect::RecordFailure(Failure {
                subject: "a".into(),
                time: 9,
                stage: "identity".into(),
                message: "not ours".into()
            }),
            Effect::Publish,
            Effect::Emit(Signal::Failed {
                drive: name("a"),
                failed
            })
        ]
    );
    assert_eq!(d.view()[0].message, "not ours");
    // A failed open undid itself: a sync result closes nothing.
    assert!(started(&d.signal(&sync_finished("a"))).is_empty());
    assert!(d.in_use().is_empty());
}

#[test]
fn a_failed_close_leaves_the_drive_in_use() {
    let mut d = opened();
    d.signal(&sync_finished("a"));
    let busy = Failed::new(CryptStage::Close, "busy");
    d.finished(&name("a"), Operation::Close, Err(busy), 7);
    assert_eq!(d.in_use(), [&name("a")]);
    assert_eq!(
        d.request("a", Request::Open { hold: false }, None),
        Err(Refusal::LeftInUse { drive: name("a") })
    );
    // A failed reopen whose undoing part failed is in use too.
    let mut d = drives();
    d.signal(&attached("a"));
    let stuck = Failed::new(CryptStage::Close, "stuck");
    d.finished(&name("a"), Operation::Reopen, Err(stuck), 7);
    assert_eq!(d.in_use(), [&name("a")]);
}

#[test]
fn a_drive_pulled_while_opening_is_removed_once_open() {
    let mut d = drives();
    d.signal(&attached("a"));
    assert!(started(&d.signal(&detached("a"))).is_empty());
    let effects = d.finished(&name("a"), Operation::Open, Ok(()), 5);
    assert!(matches!(
        &effects[..],
        [
            Effect::Start {
                operation: Operation::Remove,
                device: None,
                ..
            },
            Effect::Publish
        ]
    ));
    let effects = d.finished(
        &name("a"),
        Operation::Remove,
        Err(Failed::new(CryptStage::Removed, "pulled")),
        6,
    );
    assert_eq!(emitted(&effects).len(), 1);
    assert!(d.in_use().is_empty());
    assert_eq!(state(&d), "failed");
}

#[test]
fn a_drive_pulled_and_plugged_in_again_while_opening_is_opened_anew() {
    let mut d = drives();
    d.signal(&attached("a"));
    d.signal(&detached("a"));
    // Back before the first open ended: nothing starts while it runs.
    assert!(started(&d.signal(&attached("a"))).is_empty());
    let effects = d.finished(&name("a"), Operation::Open, Ok(()), 5);
    assert_eq!(started(&effects), [Operation::Remove]);
    // The removal is said (red), then the drive that is back is opened.
    let effects = d.finished(
        &name("a"),
        Operation::Remove,
        Err(Failed::new(CryptStage::Removed, "pulled")),
        6,
    );
    assert!(matches!(&emitted(&effects)[..], [Signal::Failed { .. }]));
    assert_eq!(started(&effects), [Operation::Open]);
    d.finished(&name("a"), Operation::Open, Ok(()), 7);
    assert_eq!(state(&d), "open");
}

#[test]
fn a_drive_plugged_in_and_pulled_again_while_opening_is_not_reopened() {
    let mut d = drives();
    d.signal(&attached("a"));
    d.signal(&detached("a"));
    d.signal(&attached("a"));
    d.signal(&detached("a"));
    d.finished(&name("a"), Operation::Open, Ok(()), 5);
    let effects = d.finished(
        &name("a"),
        Operation::Remove,
        Err(Failed::new(CryptStage::Removed, "pulled")),
        6,
    );
    assert!(started(&effects).is_empty());
    assert_eq!(state(&d), "failed");
}

#[test]
fn a_lost_sync_worker_ends_the_flow_closed_and_failed() {
    let mut d = opened();
    assert_eq!(started(&d.sync_lost()), [Operation::Close]);
    let effects = d.finished(&name("a"), Operation::Close, Ok(()), 8);
    let signals = emitted(&effects);
    assert!(
        matches!(&signals[..], [Signal::Failed { failed, .. }] if failed.stage == CryptStage::Sync),
        "{signals:?}"
    );
    assert_eq!(state(&d), "failed");
    assert!(d.in_use().is_empty());
}

#[test]
fn requests_are_refused_with_the_reason() {
    let mut d = drives();
    let err = d.request("b\n", Request::Close, None).expect_err("unknown");
    assert_eq!(
        err.to_string(),
        "no drive named \"b\\n\" is enrolled in ferry.toml (enrolled: a)"
    );
    assert!(matches!(
        err.into_bus_error(),
        ferry_interfaces::Error::UnknownDrive(_)
    ));
    assert_eq!(d.needs_device("a"), FsUuid::new("abcd-1234").ok());
    let err = d
        .request("a", Request::Open { hold: false }, None)
        .expect_err("absent");
    assert!(matches!(err, Refusal::NotAttached { .. }));
    assert!(matches!(
        err.into_bus_error(),
        ferry_interfaces::Error::NotAttached(_)
    ));
    // Found by the adapter's udev lookup: it opens.
    let effects = d
        .request("a", Request::Open { hold: false }, Some("/dev/sdc1".into()))
        .expect("accepted");
    assert_eq!(started(&effects), [Operation::Open]);
    let err = d.request("a", Request::Close, None).expect_err("running");
    assert_eq!(
        err.to_string(),
        "drive a is opening now; wait for DriveOpened, DriveClosed or DriveFailed"
    );
    assert!(matches!(
        err.into_bus_error(),
        ferry_interfaces::Error::Busy(_)
    ));
}

#[test]
fn open_and_hold_do_not_mix_and_repeat_their_announcement() {
    let mut d = opened();
    let again = d
        .request("a", Request::Open { hold: false }, None)
        .expect("again");
    assert!(matches!(&emitted(&again)[..], [Signal::Opened { .. }]));
    assert!(started(&again).is_empty());
    let err = d
        .request("a", Request::Open { hold: true }, None)
        .expect_err("open, not held");
    assert_eq!(
        err.to_string(),
        "drive a is open now; close it first, then open it with hold"
    );
    let mut d = drives();
    d.signal(&FerrySignal::DriveAttached {
        drive: "a".into(),
        device: "/dev/sdb1".into(),
        uuid: "abcd-1234".into(),
    });
    d.finished(
        &name("a"),
        Operation::Open,
        Err(Failed::new(CryptStage::Unlock, "no")),
        1,
    );
    let effects = d
        .request("a", Request::Open { hold: true }, None)
        .expect("hold");
    assert_eq!(started(&effects), [Operation::Hold]);
    let effects = d.finished(&name("a"), Operation::Hold, Ok(()), 2);
    assert!(matches!(&emitted(&effects)[..], [Signal::Held { .. }]));
    assert_eq!(state(&d), "held");
    // A sync result never closes a held drive; holding again re-announces.
    assert!(started(&d.signal(&sync_finished("a"))).is_empty());
    let again = d
        .request("a", Request::Open { hold: true }, None)
        .expect("again");
    assert!(matches!(&emitted(&again)[..], [Signal::Held { .. }]));
    assert!(matches!(
        d.request("a", Request::Open { hold: false }, None),
        Err(Refusal::OpenedOtherwise { hold: false, .. })
    ));
}

#[test]
fn signals_for_strangers_and_wrong_uuids_change_nothing() {
    let mut d = drives();
    assert!(d.signal(&attached("b")).is_empty());
    let clone = FerrySignal::DriveAttached {
        drive: "a".into(),
        device: "/dev/sdz1".into(),
        uuid: "ffff-0000".into(),
    };
    assert!(d.signal(&clone).is_empty());
    assert_eq!(state(&d), "absent");
    assert!(d.signal(&sync_finished("b")).is_empty());
    let opened_elsewhere = FerrySignal::DriveOpened {
        drive: "a".into(),
        mountpoint: "/x".into(),
    };
    assert!(d.signal(&opened_elsewhere).is_empty());
}

fn finding(drive: &str, device: Option<&str>, leftover: Leftover) -> Finding {
    Finding {
        drive: name(drive),
        device: device.map(String::from),
        leftover,
    }
}

#[test]
fn recovery_adopts_reopens_closes_and_removes() {
    let mut d = Drives::new(
        vec![
            enrolled("adopt", true),
            enrolled("half", true),
            enrolled("manual", false),
            enrolled("gone", true),
        ],
        BTreeMap::new(),
    );
    let broken = || Leftover::Close("unlocked but not mounted".into());
    let effects = d.recover(vec![
        finding("adopt", Some("/dev/sdb1"), Leftover::Adopt),
        finding("half", Some("/dev/sdc1"), broken()),
        finding("manual", Some("/dev/sdd1"), broken()),
        finding("gone", None, broken()),
    ]);
    assert_eq!(
        started(&effects),
        [Operation::Reopen, Operation::Close, Operation::Remove]
    );
    // The adopted drive is announced before anything starts.
    assert!(matches!(
        &effects[0],
        Effect::Emit(Signal::Opened { drive, .. }) if drive.as_str() == "adopt"
    ));
    let states: Vec<String> = d.view().into_iter().map(|v| v.state).collect();
    assert_eq!(states, ["open", "closing", "opening", "closing"]);
    assert_eq!(d.in_use().len(), 4);
}

#[test]
fn recovery_keeps_a_closed_drive_closed_and_opens_a_new_plug_in() {
    let marker = BTreeMap::from([
        ("closed".to_string(), "/dev/sdb1 abcd-1234".to_string()),
        ("replugged".to_string(), "/dev/sdb9 abcd-1234".to_string()),
        ("away".to_string(), "/dev/sdc1 abcd-1234".to_string()),
    ]);
    let mut d = Drives::new(
        vec![
            enrolled("away", true),
            enrolled("closed", true),
            enrolled("manual", false),
            enrolled("replugged", true),
        ],
        marker,
    );
    let effects = d.recover(vec![
        finding("away", None, Leftover::Nothing),
        finding("closed", Some("/dev/sdb1"), Leftover::Nothing),
        finding("manual", Some("/dev/sdd1"), Leftover::Nothing),
        finding("replugged", Some("/dev/sdc1"), Leftover::Nothing),
    ]);
    // Only the drive on another device than it was closed on opens; the
    // one that went away leaves the markers.
    assert_eq!(started(&effects), [Operation::Open]);
    let kept = BTreeMap::from([
        ("closed".to_string(), "/dev/sdb1 abcd-1234".to_string()),
        ("replugged".to_string(), "/dev/sdb9 abcd-1234".to_string()),
    ]);
    assert_eq!(effects[0], Effect::SaveClosed(kept));
    let states: Vec<String> = d.view().into_iter().map(|v| v.state).collect();
    assert_eq!(states, ["absent", "closed", "attached", "opening"]);
    assert!(d.in_use().is_empty());
}

#[test]
fn a_drive_failing_its_health_check_is_failed_and_left_closed() {
    // Before opening, the drive's health is checked (ops::open_for): a
    // failure there is a failed open, which left nothing mounted.
    let mut d = drives();
    d.signal(&attached("a"));
    let sick = Failed::new(CryptStage::Health, "SMART says the drive is failing");
    let effects = d.finished(&name("a"), Operation::Open, Err(sick), 3);
    assert!(
        matches!(&emitted(&effects)[..], [Signal::Failed { failed, .. }] if failed.stage.as_str() == "health")
    );
    assert!(d.in_use().is_empty());
    assert_eq!(state(&d), "failed");
}

/// Pulled out while its close waits for a busy mount: the close is told
/// at once (not after close-timeout), and its end says what is true.
#[test]
fn a_drive_pulled_while_closing_interrupts_the_close_and_ends_truthfully() {
    let interrupted = |effects: &[Effect]| {
        effects
            .iter()
            .any(|e| matches!(e, Effect::Interrupt { drive } if drive.as_str() == "a"))
    };
    let mut d = opened();
    assert_eq!(started(&d.signal(&sync_finished("a"))), [Operation::Close]);
    let effects = d.signal(&detached("a"));
    assert!(interrupted(&effects), "{effects:?}");
    assert!(started(&effects).is_empty(), "one operation at a time");
    assert_eq!(state(&d), "closing");
    // The close stopped with the mount still busy: the drive is removed
    // (lazily detached), and that is its end, red, never "closed".
    let stopped = Failed::new(CryptStage::Removed, "pulled while busy");
    let effects = d.finished(&name("a"), Operation::Close, Err(stopped), 7);
    assert_eq!(started(&effects), [Operation::Remove]);
    assert!(emitted(&effects).is_empty(), "{effects:?}");
    let removed = Failed::new(CryptStage::Removed, "removed while open");
    let effects = d.finished(&name("a"), Operation::Remove, Err(removed), 8);
    assert!(
        matches!(&emitted(&effects)[..], [Signal::Failed { failed, .. }] if failed.stage == CryptStage::Removed),
        "{effects:?}"
    );
    assert!(d.in_use().is_empty());
    assert_eq!(state(&d), "failed");

    // The close got there before the pull mattered: unmounted and locked
    // is true, so DriveClosed, and the drive is absent.
    let mut d = opened();
    d.signal(&sync_finished("a"));
    assert!(interrupted(&d.signal(&detached("a"))));
    let effects = d.finished(&name("a"), Operation::Close, Ok(()), 7);
    assert_eq!(emitted(&effects), [Signal::Closed { drive: name("a") }]);
    assert_eq!(state(&d), "absent");

    // Pulled while opening: nothing retries there, nothing is interrupted.
    let mut d = drives();
    d.signal(&attached("a"));
    assert!(!interrupted(&d.signal(&detached("a"))));
}
