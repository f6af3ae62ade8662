//! What ferry-borg decides, without doing any of it.
//!
//! The rules of the service live here, pure: one job per profile at a time,
//! job ids that never repeat (even across a restart), what a job's end makes
//! of the profile's record (LastResults, LastFailures, statistics, checks),
//! when a failed or skipped run is tried again (`[borg] retries`,
//! `retry-delay`), when an unreachable SSH server stops being a skip and
//! becomes a failure (`unreachable-grace`), and what a restart makes of the
//! jobs a killed predecessor left recorded as running ([`Backups::recover`]).
//!
//! Events come in as method calls (a Start or Cancel request, a job's stage
//! or progress, a job's end, the retry timer, the state found on disk);
//! effects go out as [`Effect`]s that the adapter (`lib.rs`) carries out in
//! order: run or stop a job (a tracked task), persist the state, publish
//! the properties, emit a signal, answer the caller. Nothing here touches
//! the bus, a runtime, a child process or the disk, so every rule is
//! unit-tested on its own, the way ferry-drive-watcher's tracker is.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferry_config::Name;
use ferry_interfaces::{BackupJob, BackupOutcome, BackupResult, Failure};

use crate::remote;
use crate::state::{PlannedRetry, RunningJob, Stored};

/// A job's stage: where it is now (Borg1.Jobs) or where it ended
/// (BackupFailed, LastFailures). On the wire each is its lower-case name
/// ([`Stage::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// `waiting`: for the repository's turn, a retry, or a busy lock.
    Waiting,
    /// `hook`: a before/after/on-error command.
    Hook,
    /// `sources`: checking that the sources exist.
    Sources,
    /// `create`: borg create.
    Create,
    /// `prune`: borg prune.
    Prune,
    /// `compact`: borg compact.
    Compact,
    /// `check`: borg check.
    Check,
    /// `config`: the profile or its borgmatic file cannot be used.
    Config,
    /// `cancelled`: stopped by Cancel or shutdown.
    Cancelled,
    /// `interrupted`: ferry-borg died during the job.
    Interrupted,
    /// `unreachable`: the SSH server was unreachable past the grace.
    Unreachable,
    /// `internal`: the job's task stopped unexpectedly.
    Internal,
}

impl Stage {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Waiting => "waiting",
            Stage::Hook => "hook",
            Stage::Sources => "sources",
            Stage::Create => "create",
            Stage::Prune => "prune",
            Stage::Compact => "compact",
            Stage::Check => "check",
            Stage::Config => "config",
            Stage::Cancelled => "cancelled",
            Stage::Interrupted => "interrupted",
            Stage::Unreachable => "unreachable",
            Stage::Internal => "internal",
        }
    }

    /// Whether borg talked to the repository's server at this stage: a
    /// failure there means the server was reachable.
    pub fn reaches_server(self) -> bool {
        matches!(
            self,
            Stage::Create | Stage::Prune | Stage::Compact | Stage::Check
        )
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a running job tells the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The job entered a stage (waiting, hook, sources, create, prune,
    /// compact, check).
    Stage(Stage),
    /// borg create's progress.
    Progress {
        /// Original bytes read.
        bytes: u64,
        /// Files processed.
        files: u64,
    },
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Every stage succeeded.
    Finished {
        /// The archive made.
        archive: String,
        /// borg create --json.
        stats: String,
        /// The check kinds that ran (`kind@repository` with several
        /// repositories).
        checks: Vec<String>,
        /// borg's warnings when a command exited 1 (warning), each with its
        /// stage; empty when every command exited 0.
        warnings: Vec<String>,
        /// With several repositories, what happened in each
        /// (`name: archive …` or `name: skipped: …`); empty with one.
        repositories: Vec<String>,
    },
    /// A stage failed, or the job was cancelled (stage "cancelled").
    Failed {
        /// Where.
        stage: Stage,
        /// What went wrong, in borg's or the hook's words.
        message: String,
    },
    /// Not run, and that is fine.
    Skipped {
        /// Why.
        reason: String,
    },
    /// The SSH server could not be reached (or the network is not online):
    /// the domain makes it a skip, or a failure once past the grace
    /// ([`crate::remote::settle_unreachable`]).
    Unreachable {
        /// Why.
        reason: String,
    },
}

/// `[borg]`'s rules for retries and unreachable servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How many times a failed or skipped run is tried again.
    pub retries: u32,
    /// How long after a failed or skipped run.
    pub retry_delay: Duration,
    /// How long an SSH server may be unreachable before that is a failure.
    pub unreachable_grace: Duration,
}

/// A job for the adapter to run as a tracked task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Its id.
    pub job: String,
    /// Its profile.
    pub profile: Name,
    /// When each check kind last ran for the profile.
    pub checks_last: BTreeMap<String, u64>,
    /// 1 for a run started by Start, n for the (n-1)th retry.
    pub attempt: u32,
}

/// A property of org.ferry.Borg1 whose value changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Property {
    /// Jobs.
    Jobs,
    /// LastResults.
    LastResults,
    /// LastFailures.
    LastFailures,
    /// FailureHistory.
    FailureHistory,
    /// Schedule.
    Schedule,
}

/// A signal of org.ferry.Borg1 to emit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// BackupStarted(job, profile).
    Started { job: String, profile: String },
    /// BackupProgress(job, bytes, files).
    Progress { job: String, bytes: u64, files: u64 },
    /// BackupFinished, BackupFinishedWithWarnings, BackupFailed or
    /// BackupSkipped, as `end` says.
    Ended {
        job: String,
        profile: String,
        end: End,
    },
}

/// What the adapter does, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Run a job as a tracked task.
    Run(Launch),
    /// Ask a running job to stop (borg checkpoints and releases its lock).
    Stop(String),
    /// Write the state durably (before what follows is published).
    Save(Box<Stored>),
    /// Answer Start with this job id.
    Reply(String),
    /// A property changed: emit PropertiesChanged.
    Changed(Property),
    /// Emit a signal (after the properties it follows).
    Emit(Signal),
}

/// Why a request is refused; mapped once to its named D-Bus error
/// ([`Refusal::into_bus_error`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// org.ferry.Error.UnknownJob.
    #[error("no running job `{job}`; running: {running}")]
    UnknownJob { job: String, running: String },
}

impl Refusal {
    /// The named D-Bus error for this refusal.
    pub fn into_bus_error(self) -> ferry_interfaces::Error {
        let message = self.to_string();
        match self {
            Refusal::UnknownJob { .. } => ferry_interfaces::Error::UnknownJob(message),
        }
    }
}

/// A job the service runs now.
#[derive(Debug, Clone)]
struct Running {
    profile: Name,
    attempt: u32,
}

/// ferry-borg's state: what it remembers ([`Stored`]) and the jobs running.
#[derive(Debug)]
pub struct Backups {
    policy: Policy,
    /// The configured profiles (a planned retry of another is dropped).
    profiles: BTreeSet<Name>,
    stored: Stored,
    running: BTreeMap<String, Running>,
    /// Borg1.Jobs, in start order.
    jobs: Vec<BackupJob>,
}

/// Every property a job's end may change, in the order they are announced.
const AFTER_AN_END: [Property; 5] = [
    Property::Jobs,
    Property::LastResults,
    Property::LastFailures,
    Property::FailureHistory,
    Property::Schedule,
];

impl Backups {
    /// The restart planner: the service as it starts from `stored` (what
    /// the state file held) at unix time `now`. A job the file still lists
    /// as running was cut short by its predecessor's death (every end is
    /// recorded, even on shutdown): each is recorded as failed at stage
    /// `interrupted`, with a retry planned as after any failure, persisted,
    /// and announced once.
    pub fn recover(
        policy: Policy,
        profiles: BTreeSet<Name>,
        mut stored: Stored,
        now: u64,
    ) -> (Backups, Vec<Effect>) {
        let found = std::mem::take(&mut stored.running);
        let mut backups = Backups {
            policy,
            profiles,
            stored,
            running: BTreeMap::new(),
            jobs: Vec::new(),
        };
        if found.is_empty() {
            return (backups, Vec::new());
        }
        let mut announce = Vec::new();
        for (job, running) in found {
            let took = now.saturating_sub(running.started);
            let end = End::Failed {
                stage: Stage::Interrupted,
                message: format!(
                    "ferry-borg stopped during the job (killed, crashed or the machine went down) \
                     {took} s after it started, so the backup did not complete; the next run will \
                     clean up borg's stale lock"
                ),
            };
            backups.record(
                &job,
                &running.profile,
                &end,
                running.attempt,
                took as f64,
                now,
            );
            announce.push(Signal::Ended {
                job,
                profile: running.profile,
                end,
            });
        }
        let mut effects = vec![backups.save()];
        for signal in announce {
            effects.extend(AFTER_AN_END.map(Effect::Changed));
            effects.push(Effect::Emit(signal));
        }
        (backups, effects)
    }

    /// What is remembered (for the properties).
    pub fn stored(&self) -> &Stored {
        &self.stored
    }

    /// Borg1.Jobs.
    pub fn jobs(&self) -> &[BackupJob] {
        &self.jobs
    }

    /// The ids of the jobs running now.
    pub fn running(&self) -> impl Iterator<Item = &str> {
        self.running.keys().map(String::as_str)
    }

    /// Start(profile) at `now`: a new job, or the id of the profile's
    /// running one (nothing else happens then).
    pub fn start(&mut self, profile: Name, now: u64) -> Vec<Effect> {
        if let Some(job) = self.job_of(&profile) {
            return vec![Effect::Reply(job.to_string())];
        }
        let mut effects = self.launch(profile, 1, now);
        let job = self.jobs.last().map(|j| j.job.clone()).unwrap_or_default();
        // Answered once the job is recorded and running, before it is announced.
        effects.insert(2, Effect::Reply(job));
        effects
    }

    /// Cancel(job): a job waiting its turn and one running borg or a hook
    /// are stopped alike; its end (failed at `cancelled`) follows.
    pub fn cancel(&self, job: &str) -> Result<Vec<Effect>, Refusal> {
        if self.running.contains_key(job) {
            return Ok(vec![Effect::Stop(job.to_string())]);
        }
        let running: Vec<&str> = self.running().collect();
        Err(Refusal::UnknownJob {
            job: job.to_string(),
            running: if running.is_empty() {
                "none".into()
            } else {
                running.join(", ")
            },
        })
    }

    /// A running job's stage or progress.
    pub fn event(&mut self, job: &str, event: Event) -> Vec<Effect> {
        let Some(entry) = self.jobs.iter_mut().find(|j| j.job == job) else {
            return Vec::new();
        };
        match event {
            Event::Stage(stage) => {
                entry.stage = stage.to_string();
                vec![Effect::Changed(Property::Jobs)]
            }
            Event::Progress { bytes, files } => {
                entry.bytes = bytes;
                entry.files = files;
                vec![
                    Effect::Changed(Property::Jobs),
                    Effect::Emit(Signal::Progress {
                        job: job.to_string(),
                        bytes,
                        files,
                    }),
                ]
            }
        }
    }

    /// A job ended as `end` after `seconds`, at unix time `now`: the grace
    /// applied, recorded, a retry planned if one is due, persisted,
    /// published, signalled.
    pub fn ended(&mut self, job: &str, end: End, seconds: f64, now: u64) -> Vec<Effect> {
        let Some(running) = self.running.remove(job) else {
            return Vec::new();
        };
        self.jobs.retain(|j| j.job != job);
        self.stored.running.remove(job);
        let profile = running.profile.to_string();
        let end = self.settle(&profile, end, now);
        self.record(job, &profile, &end, running.attempt, seconds, now);
        let mut effects = vec![self.save()];
        effects.extend(AFTER_AN_END.map(Effect::Changed));
        effects.push(Effect::Emit(Signal::Ended {
            job: job.to_string(),
            profile,
            end,
        }));
        effects
    }

    /// When the next planned retry is due (unix time).
    pub fn next_retry(&self) -> Option<u64> {
        self.stored.retries.values().map(|r| r.at).min()
    }

    /// The retry timer fired at `now`: every retry due is started, unless
    /// its profile is gone from the configuration or runs already.
    pub fn retries_due(&mut self, now: u64) -> Vec<Effect> {
        let due: Vec<(String, u32)> = self
            .stored
            .retries
            .iter()
            .filter(|(_, r)| r.at <= now)
            .map(|(p, r)| (p.clone(), r.attempt))
            .collect();
        let mut effects = Vec::new();
        for (profile, attempt) in due {
            self.stored.retries.remove(&profile);
            let Some(name) = self
                .profiles
                .iter()
                .find(|n| n.as_str() == profile)
                .cloned()
            else {
                tracing::warn!("a retry of `{profile}` is due, but it is no longer configured");
                continue;
            };
            if self.job_of(&name).is_some() {
                tracing::info!("profile {profile}: a retry is due but it runs already");
                continue;
            }
            tracing::info!("profile {profile}: retrying (attempt {attempt})");
            effects.extend(self.launch(name, attempt, now));
        }
        effects.push(self.save());
        effects.push(Effect::Changed(Property::Schedule));
        effects
    }

    /// Shutdown: every running job is asked to stop (and ends as cancelled).
    pub fn stop_all(&self) -> Vec<Effect> {
        self.running.keys().cloned().map(Effect::Stop).collect()
    }

    fn job_of(&self, profile: &Name) -> Option<&str> {
        self.running
            .iter()
            .find(|(_, r)| &r.profile == profile)
            .map(|(job, _)| job.as_str())
    }

    /// A new job of `profile`: recorded as running before it runs (if
    /// ferry-borg dies now, the next start reports it interrupted, and its
    /// number is never reused); it ends the profile's planned retry (this
    /// run is that retry, or a person's Start, a new series).
    fn launch(&mut self, profile: Name, attempt: u32, now: u64) -> Vec<Effect> {
        self.stored.last_job += 1;
        let job = format!("{profile}-{}", self.stored.last_job);
        self.stored.running.insert(
            job.clone(),
            RunningJob {
                profile: profile.to_string(),
                started: now,
                attempt,
            },
        );
        self.stored.retries.remove(profile.as_str());
        let checks_last = self
            .stored
            .profiles
            .get(profile.as_str())
            .map(|r| r.checks.clone())
            .unwrap_or_default();
        self.running.insert(
            job.clone(),
            Running {
                profile: profile.clone(),
                attempt,
            },
        );
        self.jobs.push(BackupJob {
            job: job.clone(),
            profile: profile.to_string(),
            stage: "waiting".into(),
            bytes: 0,
            files: 0,
        });
        vec![
            self.save(),
            Effect::Run(Launch {
                job: job.clone(),
                profile: profile.clone(),
                checks_last,
                attempt,
            }),
            Effect::Changed(Property::Jobs),
            Effect::Changed(Property::Schedule),
            Effect::Emit(Signal::Started {
                job,
                profile: profile.to_string(),
            }),
        ]
    }

    fn save(&self) -> Effect {
        Effect::Save(Box::new(self.stored.clone()))
    }

    /// Records the end of `job` (attempt `attempt` of `profile`, `seconds`
    /// long): its result, a retry if one is due, the failure history.
    fn record(
        &mut self,
        job: &str,
        profile: &str,
        end: &End,
        attempt: u32,
        seconds: f64,
        now: u64,
    ) {
        record_end(&mut self.stored, profile, end, seconds, now);
        plan_retry(&mut self.stored, profile, end, attempt, self.policy, now);
        if let Some(planned) = self.stored.retries.get(profile) {
            tracing::info!("profile {profile}: retry planned: {}", planned.reason);
        }
        if let End::Failed { stage, message } = end {
            let event =
                ferry_service::history::failure_event(profile, stage.as_str(), message, job);
            ferry_service::history::remember(&mut self.stored.failure_history, event);
        }
    }

    /// Applies `[borg] unreachable-grace`: an unreachable server is a skip
    /// until it has been unreachable that long, then a failure at stage
    /// `unreachable` (mailed). The profile remembers since when; a run that
    /// reached borg's server or made an archive forgets it.
    fn settle(&mut self, profile: &str, end: End, now: u64) -> End {
        let grace = self.policy.unreachable_grace;
        let record = self.stored.profile(profile);
        match end {
            End::Unreachable { reason } => {
                let (settled, since) =
                    remote::settle_unreachable(&reason, record.unreachable_since, now, grace);
                record.unreachable_since = Some(since);
                match settled {
                    remote::Settled::Skip { reason } => End::Skipped { reason },
                    remote::Settled::Fail { message } => End::Failed {
                        stage: Stage::Unreachable,
                        message,
                    },
                }
            }
            End::Finished { .. } => {
                record.unreachable_since = None;
                end
            }
            End::Failed { stage, .. } if stage.reaches_server() => {
                record.unreachable_since = None;
                end
            }
            other => other,
        }
    }
}

/// Plans the next attempt of `profile` after a run (attempt `attempt`)
/// that ended as `end`: after a failure (not a cancel) or a skip, while
/// attempts remain. A run that made an archive ends the series.
fn plan_retry(
    stored: &mut Stored,
    profile: &str,
    end: &End,
    attempt: u32,
    policy: Policy,
    now: u64,
) {
    stored.retries.remove(profile);
    let why = match end {
        End::Failed {
            stage: Stage::Cancelled,
            ..
        } => return,
        End::Failed { stage, message } => format!("failed: {stage}: {message}"),
        End::Skipped { reason } | End::Unreachable { reason } => format!("skipped: {reason}"),
        End::Finished { .. } => return,
    };
    let total = policy.retries.saturating_add(1);
    if attempt >= total {
        tracing::warn!("profile {profile}: attempt {attempt} of {total} {why}; no retry left");
        return;
    }
    let next = attempt + 1;
    stored.retries.insert(
        profile.to_string(),
        PlannedRetry {
            at: now.saturating_add(policy.retry_delay.as_secs()),
            attempt: next,
            reason: format!("attempt {next} of {total} after attempt {attempt} {why}"),
        },
    );
}

/// Records how a job of `profile` that ran `seconds` ended at `now`.
fn record_end(stored: &mut Stored, profile: &str, end: &End, seconds: f64, now: u64) {
    let (outcome, archive, message) = match end {
        End::Finished {
            archive, warnings, ..
        } if !warnings.is_empty() => (
            BackupOutcome::FinishedWithWarnings,
            archive.clone(),
            warnings.join("; "),
        ),
        End::Finished {
            archive,
            repositories,
            ..
        } => (
            BackupOutcome::Finished,
            archive.clone(),
            repositories.join("; "),
        ),
        End::Failed { stage, message } => (
            BackupOutcome::Failed,
            String::new(),
            format!("{stage}: {message}"),
        ),
        End::Skipped { reason } | End::Unreachable { reason } => {
            (BackupOutcome::Skipped, String::new(), reason.clone())
        }
    };
    let record = stored.profile(profile);
    record.last_result = Some(BackupResult {
        profile: profile.to_string(),
        outcome: outcome.as_str().into(),
        time: now,
        archive,
        seconds,
        message,
    });
    match end {
        End::Finished { stats, checks, .. } => {
            record.last_success = Some(now);
            record.stats = Some(stats.clone());
            for kind in checks {
                record.checks.insert(kind.to_string(), now);
            }
        }
        End::Failed { stage, message } => {
            record.last_failure = Some(Failure {
                subject: profile.to_string(),
                time: now,
                stage: stage.to_string(),
                message: message.clone(),
            })
        }
        End::Skipped { .. } | End::Unreachable { .. } => {}
    }
}

#[cfg(test)]
#[path = "domain_tests.rs"]
mod tests;
