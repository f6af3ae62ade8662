//! The domain's rules, each without a bus, a runtime or a disk.

use super::*;

const DELAY: u64 = 600;
const GRACE: u64 = 1000;

fn policy(retries: u32) -> Policy {
    Policy {
        retries,
        retry_delay: Duration::from_secs(DELAY),
        unreachable_grace: Duration::from_secs(GRACE),
    }
}

fn name(n: &str) -> Name {
    Name::new(n).expect("name")
}

fn fresh(retries: u32) -> Backups {
    let profiles = ["home", "etc"].map(name).into_iter().collect();
    let (backups, effects) = Backups::recover(policy(retries), profiles, Stored::default(), 0);
    assert!(effects.is_empty(), "nothing to recover: {effects:?}");
    backups
}

/// The job a Start launched.
fn launched(effects: &[Effect]) -> Launch {
    effects
        .iter()
        .find_map(|e| match e {
            Effect::Run(launch) => Some(launch.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no job started: {effects:?}"))
}

fn ends(effects: &[Effect]) -> Vec<End> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Emit(Signal::Ended { end, .. }) => Some(end.clone()),
            _ => None,
        })
        .collect()
}

fn failed(stage: Stage) -> End {
    End::Failed {
        stage,
        message: "it broke".into(),
    }
}

fn finished() -> End {
    End::Finished {
        archive: "a1".into(),
        stats: "{}".into(),
        checks: vec!["repository".into()],
        warnings: Vec::new(),
        repositories: Vec::new(),
    }
}

fn unreachable() -> End {
    End::Unreachable {
        reason: "the SSH server nas is unreachable".into(),
    }
}

#[test]
fn a_start_is_recorded_before_it_runs_and_answered_before_it_is_announced() {
    let mut backups = fresh(0);
    let effects = backups.start(name("home"), 100);
    assert!(
        matches!(&effects[0], Effect::Save(s) if s.running.contains_key("home-1")),
        "{effects:?}"
    );
    assert!(matches!(&effects[1], Effect::Run(l) if l.job == "home-1" && l.attempt == 1));
    assert_eq!(effects[2], Effect::Reply("home-1".into()));
    assert_eq!(
        effects.last(),
        Some(&Effect::Emit(Signal::Started {
            job: "home-1".into(),
            profile: "home".into()
        }))
    );
    assert_eq!(backups.jobs()[0].stage, "waiting");
    // A second Start of a running profile names the running job, nothing else.
    assert_eq!(
        backups.start(name("home"), 101),
        vec![Effect::Reply("home-1".into())]
    );
    // Another profile runs beside it, with the next number.
    assert_eq!(launched(&backups.start(name("etc"), 102)).job, "etc-2");
}

#[test]
fn job_numbers_go_on_after_a_restart() {
    let mut backups = fresh(0);
    let job = launched(&backups.start(name("home"), 100)).job;
    backups.ended(&job, finished(), 1.0, 110);
    let stored = backups.stored().clone();
    let profiles = [name("home")].into_iter().collect();
    let (mut again, _) = Backups::recover(policy(0), profiles, stored, 200);
    assert_eq!(launched(&again.start(name("home"), 201)).job, "home-2");
}

#[test]
fn progress_and_stages_show_in_jobs_and_progress_is_signalled() {
    let mut backups = fresh(0);
    let job = launched(&backups.start(name("home"), 100)).job;
    assert_eq!(
        backups.event(&job, Event::Stage(Stage::Create)),
        vec![Effect::Changed(Property::Jobs)]
    );
    let effects = backups.event(
        &job,
        Event::Progress {
            bytes: 10,
            files: 2,
        },
    );
    assert_eq!(
        effects[1],
        Effect::Emit(Signal::Progress {
            job: job.clone(),
            bytes: 10,
            files: 2
        })
    );
    let entry = &backups.jobs()[0];
    assert_eq!(
        (entry.stage.as_str(), entry.bytes, entry.files),
        ("create", 10, 2)
    );
    assert!(backups
        .event("other-9", Event::Stage(Stage::Create))
        .is_empty());
}

#[test]
fn a_failure_plans_a_retry_after_the_delay_until_the_attempts_run_out() {
    let mut backups = fresh(1);
    let job = launched(&backups.start(name("home"), 100)).job;
    let effects = backups.ended(&job, failed(Stage::Create), 5.0, 105);
    assert!(matches!(&effects[0], Effect::Save(s) if s.retries.contains_key("home")));
    assert_eq!(ends(&effects), vec![failed(Stage::Create)]);
    assert!(backups.jobs().is_empty());
    let retry = &backups.stored().retries["home"];
    assert_eq!((retry.at, retry.attempt), (105 + DELAY, 2));
    assert!(retry.reason.contains("attempt 2 of 2"), "{}", retry.reason);
    assert_eq!(backups.next_retry(), Some(105 + DELAY));
    let last = backups.stored().profiles["home"].last_failure.clone();
    assert_eq!(last.map(|f| f.stage).as_deref(), Some("create"));
    assert_eq!(backups.stored().failure_history.len(), 1);

    // Not due yet: nothing starts.
    let early = backups.retries_due(104 + DELAY);
    assert!(!early.iter().any(|e| matches!(e, Effect::Run(_))));
    let due = backups.retries_due(105 + DELAY);
    let retry = launched(&due);
    assert_eq!(retry.attempt, 2);
    assert!(backups.stored().retries.is_empty());
    // The last attempt fails too: no retry left.
    backups.ended(&retry.job, failed(Stage::Create), 5.0, 800);
    assert_eq!(backups.next_retry(), None);
}

#[test]
fn a_skip_is_retried_and_a_success_ends_the_series() {
    let mut backups = fresh(3);
    let job = launched(&backups.start(name("home"), 100)).job;
    let skipped = End::Skipped {
        reason: "/mnt is not mounted".into(),
    };
    backups.ended(&job, skipped, 0.1, 100);
    assert!(backups.stored().retries["home"].reason.contains("skipped"));
    let retry = launched(&backups.retries_due(100 + DELAY));
    backups.ended(&retry.job, finished(), 3.0, 800);
    assert_eq!(backups.next_retry(), None);
    let record = &backups.stored().profiles["home"];
    assert_eq!(record.last_success, Some(800));
    assert_eq!(record.checks["repository"], 800);
}

#[test]
fn a_person_s_start_replaces_the_planned_retry() {
    let mut backups = fresh(2);
    let job = launched(&backups.start(name("home"), 100)).job;
    backups.ended(&job, failed(Stage::Create), 1.0, 100);
    assert!(backups.next_retry().is_some());
    let again = launched(&backups.start(name("home"), 200));
    assert_eq!(again.attempt, 1, "a new series");
    assert_eq!(backups.next_retry(), None);
}

#[test]
fn a_due_retry_of_a_running_or_removed_profile_does_not_start() {
    let mut backups = fresh(2);
    let job = launched(&backups.start(name("home"), 100)).job;
    backups.ended(&job, failed(Stage::Create), 1.0, 100);
    let running = launched(&backups.start(name("home"), 200)).job;
    // (A Start cleared the retry; plant one as if it had survived.)
    backups.stored.retries.insert(
        "home".into(),
        PlannedRetry {
            at: 300,
            attempt: 2,
            reason: "r".into(),
        },
    );
    backups.stored.retries.insert(
        "gone".into(),
        PlannedRetry {
            at: 300,
            attempt: 2,
            reason: "r".into(),
        },
    );
    let effects = backups.retries_due(300);
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Run(_))),
        "{effects:?}"
    );
    assert!(backups.stored().retries.is_empty(), "both are dropped");
    assert_eq!(backups.running().collect::<Vec<_>>(), [running.as_str()]);
}

#[test]
fn unreachable_is_a_skip_until_the_grace_then_a_failure_and_reaching_forgets() {
    let mut backups = fresh(0);
    let run = |backups: &mut Backups, end: End, now: u64| {
        let job = launched(&backups.start(name("home"), now)).job;
        ends(&backups.ended(&job, end, 1.0, now)).remove(0)
    };
    let first = run(&mut backups, unreachable(), 1000);
    assert!(matches!(first, End::Skipped { .. }), "{first:?}");
    assert_eq!(
        backups.stored().profiles["home"].unreachable_since,
        Some(1000)
    );
    let within = run(&mut backups, unreachable(), 1000 + GRACE - 1);
    assert!(matches!(within, End::Skipped { .. }), "{within:?}");
    let past = run(&mut backups, unreachable(), 1000 + GRACE);
    assert!(
        matches!(&past, End::Failed { stage, message } if *stage == Stage::Unreachable && message.contains("unreachable-grace")),
        "{past:?}"
    );
    assert_eq!(
        backups.stored().profiles["home"]
            .last_failure
            .as_ref()
            .map(|f| f.stage.as_str()),
        Some("unreachable"),
        "mailed as a failure"
    );
    // A precondition's skip says nothing about the server.
    let skipped = End::Skipped { reason: "x".into() };
    run(&mut backups, skipped, 2100);
    assert_eq!(
        backups.stored().profiles["home"].unreachable_since,
        Some(1000)
    );
    // A refusal at create means the server answered.
    run(&mut backups, failed(Stage::Create), 2200);
    assert_eq!(backups.stored().profiles["home"].unreachable_since, None);
    let again = run(&mut backups, unreachable(), 2300);
    assert!(matches!(again, End::Skipped { .. }), "a new series starts");
}

#[test]
fn cancel_stops_a_queued_or_a_running_job_and_plans_no_retry() {
    let mut backups = fresh(3);
    let queued = launched(&backups.start(name("home"), 100)).job;
    let running = launched(&backups.start(name("etc"), 100)).job;
    backups.event(&running, Event::Stage(Stage::Create));
    assert_eq!(
        backups.cancel(&queued),
        Ok(vec![Effect::Stop(queued.clone())])
    );
    assert_eq!(
        backups.cancel(&running),
        Ok(vec![Effect::Stop(running.clone())])
    );
    // Asking is not ending: both still run until their tasks say so.
    assert_eq!(backups.jobs().len(), 2);
    let cancelled = End::Failed {
        stage: Stage::Cancelled,
        message: "cancelled during waiting".into(),
    };
    assert_eq!(
        ends(&backups.ended(&queued, cancelled.clone(), 0.5, 101)),
        vec![cancelled]
    );
    assert!(
        backups.stored().retries.is_empty(),
        "a cancel is not retried"
    );
    let refused = backups.cancel(&queued).expect_err("it ended");
    assert_eq!(
        refused.to_string(),
        format!("no running job `{queued}`; running: {running}")
    );
    assert!(matches!(
        refused.into_bus_error(),
        ferry_interfaces::Error::UnknownJob(_)
    ));
    assert_eq!(backups.stop_all(), vec![Effect::Stop(running)]);
}

#[test]
fn a_job_cut_short_by_a_kill_is_reported_once_after_the_restart() {
    let mut before = fresh(1);
    let job = launched(&before.start(name("home"), 100)).job;
    // The state as it was on disk when ferry-borg was killed.
    let on_disk = before.stored().clone();
    let profiles: BTreeSet<Name> = [name("home")].into_iter().collect();
    let (after, effects) = Backups::recover(policy(1), profiles.clone(), on_disk, 160);
    let Effect::Save(saved) = &effects[0] else {
        panic!("the verdict is persisted first: {effects:?}");
    };
    assert!(saved.running.is_empty());
    let reported: Vec<&Effect> = effects
        .iter()
        .filter(|e| matches!(e, Effect::Emit(_)))
        .collect();
    assert_eq!(reported.len(), 1, "{effects:?}");
    let Effect::Emit(Signal::Ended {
        job: ended,
        profile,
        end: End::Failed { stage, message },
    }) = reported[0]
    else {
        panic!("{reported:?}");
    };
    assert_eq!(
        (ended, profile.as_str(), stage.as_str()),
        (&job, "home", "interrupted")
    );
    assert!(message.contains("60 s after it started"), "{message}");
    assert_eq!(
        after.stored().retries["home"].attempt,
        2,
        "retried as any failure"
    );
    assert!(after.jobs().is_empty());
    // What was saved, found by the next start: nothing more to report.
    let (_, again) = Backups::recover(policy(1), profiles, (**saved).clone(), 200);
    assert!(again.is_empty(), "{again:?}");
}

#[test]
fn the_end_of_an_unknown_job_changes_nothing() {
    let mut backups = fresh(0);
    assert!(backups.ended("home-7", finished(), 1.0, 100).is_empty());
    assert!(backups.stored().profiles.is_empty());
}
