//! What the notifier remembers across restarts, and the rules that keep it
//! quiet without losing anything.
//!
//! - which failures were mailed (so peers' LastFailures at start mail only
//!   what is new),
//! - the last known sync per drive and schedule per profile (so staleness
//!   is still noticed while the sync or borg service is down),
//! - grouping: an identical failure within the repeat window of the first is
//!   counted, and one follow-up mail says how often it happened,
//! - the hourly limit, counted per [`Class`] of mail (so success summaries,
//!   reminders and test mails never hold a failure back): mails beyond it
//!   wait and leave together as a digest of their class.
//!
//! Everything here is plain data and arithmetic on unix times, so it is
//! tested without a clock; the service persists it with
//! `write_atomically` after every change.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::compose::{utc, Class, Draft};

/// Seconds in an hour and a day.
pub const HOUR: u64 = 3600;
/// See [`HOUR`].
pub const DAY: u64 = 86_400;

/// A failure already mailed once, whose repeats are being counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// When the first one was mailed.
    pub first: u64,
    /// Identical failures since, not mailed yet.
    pub repeats: u32,
    /// When the last repeat happened.
    pub last: u64,
    /// The first one's mail, to base the follow-up on.
    pub draft: Draft,
}

/// A backup profile as last seen on Borg1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileSeen {
    /// When it is next due (0: no interval, never stale).
    pub due: u64,
    /// When it last finished successfully (0: never).
    pub last_success: u64,
}

/// The persisted state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ledger {
    /// `Crypt1/offsite-a` → time of the newest failure already mailed.
    pub mailed: BTreeMap<String, u64>,
    /// `Sync1` → the FailureHistory ids already mailed (only those still in
    /// the peer's history are kept).
    pub mailed_ids: BTreeMap<String, BTreeSet<String>>,
    /// `drive/offsite-a`, `profile/home` → when staleness was last mailed.
    pub stale_mailed: BTreeMap<String, u64>,
    /// Drive → time of its last successful sync.
    pub last_sync: BTreeMap<String, u64>,
    /// Drive → when the notifier first knew of it (a never-synced drive
    /// becomes stale counting from here).
    pub first_seen: BTreeMap<String, u64>,
    /// Profile → its schedule and last success.
    pub profiles: BTreeMap<String, ProfileSeen>,
    /// When mails were queued within the last hour, before classes were
    /// counted apart (read from an old ledger, moved to `sent` at load).
    #[serde(skip_serializing)]
    pub recent: Vec<u64>,
    /// When mails of each class were queued within the last hour (the
    /// hourly limit).
    pub sent: Vec<(Class, u64)>,
    /// Failure key → repeats being counted.
    pub groups: BTreeMap<String, Group>,
    /// Mails held back by the hourly limit of their class, oldest first.
    pub held: Vec<Draft>,
    /// Service (`crypt`, `sync`, `borg`) → failure events seen, each once
    /// (the metrics' `ferry_service_failures_total`).
    pub failures: BTreeMap<String, u64>,
    /// Drive → time of the health reading last warned about.
    pub health_warned: BTreeMap<String, u64>,
}

/// Staleness settings in seconds; 0 turns a kind off.
#[derive(Debug, Clone, Copy)]
pub struct Staleness {
    /// A drive is stale this long after its last sync.
    pub drive_age: u64,
    /// A profile is stale this long after it was due without success.
    pub profile_grace: u64,
}

impl Ledger {
    /// Reads the ledger (blocking: call it off the runtime). A missing file
    /// is an empty ledger; one that does not parse is moved aside as
    /// `ledger.json.bad-<time>`, logged, and replaced by an empty one
    /// (`ferry_service::durable::load_or_move_aside`'s policy): that only
    /// makes mail more likely, never less.
    pub fn load(path: &Path) -> Ledger {
        let mut ledger = ferry_service::durable::load_or_move_aside(
            path,
            "the notifier's ledger (what was mailed)",
            |bytes| serde_json::from_slice::<Ledger>(bytes),
        )
        .unwrap_or_default();
        let legacy = std::mem::take(&mut ledger.recent);
        ledger
            .sent
            .extend(legacy.into_iter().map(|t| (Class::Other, t)));
        ledger
    }

    /// Whether a failure at `time` of `key` is newer than what was mailed.
    pub fn is_new_failure(&self, key: &str, time: u64) -> bool {
        self.mailed.get(key).is_none_or(|mailed| time > *mailed)
    }

    /// Whether the history entry `id` of `source` (failure `key` at
    /// `time`) still has to be mailed: its id was not mailed, and it is not
    /// older than a failure of the same subject mailed before ids existed.
    pub fn is_new_event(&self, source: &str, id: &str, key: &str, time: u64) -> bool {
        let mailed = self
            .mailed_ids
            .get(source)
            .is_some_and(|ids| ids.contains(id));
        !mailed && self.mailed.get(key).is_none_or(|floor| time >= *floor)
    }

    /// Records that history entry `id` of `source` is dealt with.
    pub fn mark_event(&mut self, source: &str, id: &str) {
        self.mailed_ids
            .entry(source.to_string())
            .or_default()
            .insert(id.to_string());
    }

    /// Forgets mailed ids `source` no longer reports: they cannot come back.
    pub fn keep_events(&mut self, source: &str, present: &BTreeSet<&str>) {
        if let Some(ids) = self.mailed_ids.get_mut(source) {
            ids.retain(|id| present.contains(id.as_str()));
        }
    }

    /// What a spooled message's `covers` entry says was mailed: a history
    /// entry (`Sync1#<id>`) or a failure time per subject.
    pub fn cover(&mut self, key: &str, time: u64) {
        match key.split_once('#') {
            Some((source, id)) => self.mark_event(source, id),
            None => self.mark_mailed(key, time),
        }
    }

    /// Records that the failure `key` at `time` is dealt with.
    pub fn mark_mailed(&mut self, key: &str, time: u64) {
        let entry = self.mailed.entry(key.to_string()).or_insert(0);
        *entry = (*entry).max(time);
    }

    /// A failure happened: returns the draft if it should be mailed now,
    /// or None when it repeats one mailed within `window` seconds (then it
    /// is counted for the follow-up).
    pub fn admit_failure(
        &mut self,
        group_key: &str,
        draft: Draft,
        now: u64,
        window: u64,
    ) -> Option<Draft> {
        if let Some(group) = self.groups.get_mut(group_key) {
            if now < group.first + window {
                group.repeats += 1;
                group.last = now;
                return None;
            }
        }
        if window > 0 {
            self.groups.insert(
                group_key.to_string(),
                Group {
                    first: now,
                    repeats: 0,
                    last: now,
                    draft: draft.clone(),
                },
            );
        }
        Some(draft)
    }

    /// Groups whose window ended: follow-up drafts for those that repeated.
    pub fn close_groups(&mut self, now: u64, window: u64) -> Vec<Draft> {
        let ended: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| now >= g.first + window)
            .map(|(k, _)| k.clone())
            .collect();
        let mut drafts = Vec::new();
        for key in ended {
            if let Some(group) = self.groups.remove(&key) {
                if group.repeats > 0 {
                    let times = if group.repeats == 1 { "time" } else { "times" };
                    drafts.push(Draft::new(
                        format!("{} (repeated)", group.draft.reason),
                        format!(
                            "{} (again, {} more {times})",
                            group.draft.subject, group.repeats
                        ),
                        format!(
                            "The failure below happened {} more {times} between {} and {}.\n\
                             Identical failures are grouped so a person is not flooded; the \
                             first one was mailed when it happened.\n\n{}",
                            group.repeats,
                            utc(group.first),
                            utc(group.last),
                            group.draft.body
                        ),
                    ));
                }
            }
        }
        drafts
    }

    /// Mails of `class` queued within the hour before `now`.
    fn sent_within_hour(&mut self, class: Class, now: u64) -> usize {
        self.sent.retain(|(_, t)| now < t + HOUR);
        self.sent.iter().filter(|(c, _)| *c == class).count()
    }

    /// Applies the hourly limit of the draft's class: Some(draft) to queue
    /// now, or None when it is held for the next digest of its class.
    pub fn rate_limit(&mut self, draft: Draft, now: u64, max_per_hour: u32) -> Option<Draft> {
        let class = draft.class;
        let held = self.held.iter().any(|d| d.class == class);
        if self.sent_within_hour(class, now) >= max_per_hour as usize || held {
            self.held.push(draft);
            return None;
        }
        self.sent.push((class, now));
        Some(draft)
    }

    /// One digest per class of every held mail, once its hourly limit
    /// allows; failures first.
    pub fn release_held(&mut self, now: u64, max_per_hour: u32) -> Vec<Draft> {
        let mut classes: Vec<Class> = self.held.iter().map(|d| d.class).collect();
        classes.sort();
        classes.dedup();
        let mut digests = Vec::new();
        for class in classes {
            if self.sent_within_hour(class, now) >= max_per_hour as usize {
                continue;
            }
            let (held, rest): (Vec<Draft>, Vec<Draft>) = std::mem::take(&mut self.held)
                .into_iter()
                .partition(|d| d.class == class);
            self.held = rest;
            self.sent.push((class, now));
            digests.push(digest(class, held));
        }
        digests
    }

    /// Drives that are stale now and were not told about today: (drive,
    /// the last sync or None if never synced). Marks them mailed.
    pub fn stale_drives(
        &mut self,
        drives: &[String],
        now: u64,
        s: Staleness,
    ) -> Vec<(String, Option<u64>)> {
        if s.drive_age == 0 {
            return Vec::new();
        }
        let mut stale = Vec::new();
        for drive in drives {
            if let Some(due) = self.drive_due(drive, s) {
                if now >= due {
                    stale.push((drive.clone(), self.last_sync.get(drive).copied()));
                    self.stale_mailed.insert(format!("drive/{drive}"), now);
                }
            }
        }
        stale
    }

    /// Profiles that had no success `profile_grace` after they were due and
    /// were not told about today: (profile, seen). Marks them mailed.
    pub fn stale_profiles(&mut self, now: u64, s: Staleness) -> Vec<(String, ProfileSeen)> {
        let due: Vec<(String, ProfileSeen)> = self
            .profiles
            .iter()
            .filter(|(name, _)| self.profile_due(name, s).is_some_and(|d| now >= d))
            .map(|(n, p)| (n.clone(), *p))
            .collect();
        for (name, _) in &due {
            self.stale_mailed.insert(format!("profile/{name}"), now);
        }
        due
    }

    fn drive_due(&self, drive: &str, s: Staleness) -> Option<u64> {
        if s.drive_age == 0 {
            return None;
        }
        let since = self
            .last_sync
            .get(drive)
            .or_else(|| self.first_seen.get(drive))?;
        let told = self
            .stale_mailed
            .get(&format!("drive/{drive}"))
            .map_or(0, |t| t + DAY);
        Some((since + s.drive_age).max(told))
    }

    fn profile_due(&self, profile: &str, s: Staleness) -> Option<u64> {
        let seen = self.profiles.get(profile)?;
        if s.profile_grace == 0 || seen.due == 0 || seen.last_success >= seen.due {
            return None;
        }
        let told = self
            .stale_mailed
            .get(&format!("profile/{profile}"))
            .map_or(0, |t| t + DAY);
        Some((seen.due + s.profile_grace).max(told))
    }

    /// The next moment something here is due: a group closes, the digest
    /// may go, a drive or profile turns stale.
    pub fn next_due(&self, drives: &[String], s: Staleness, window: u64) -> Option<u64> {
        let groups = self.groups.values().map(|g| g.first + window);
        let digest = self.held.iter().map(|d| {
            self.sent
                .iter()
                .filter(|(c, _)| *c == d.class)
                .map(|(_, t)| t + HOUR)
                .min()
                .unwrap_or(0)
        });
        let drives = drives.iter().filter_map(|d| self.drive_due(d, s));
        let profiles = self.profiles.keys().filter_map(|p| self.profile_due(p, s));
        groups.chain(digest).chain(drives).chain(profiles).min()
    }
}

/// The mail for `held` drafts of `class`: the draft itself when there is
/// one, else one digest of them all.
fn digest(class: Class, held: Vec<Draft>) -> Draft {
    if held.len() == 1 {
        if let Some(one) = held.into_iter().next() {
            return one;
        }
        return Draft::of(class, "digest of 0", "no notifications", String::new());
    }
    let mut body = format!(
        "More than the configured limit of mails per hour wanted to go out; these {} \
         were held back and are sent together.\n",
        held.len()
    );
    for (n, draft) in held.iter().enumerate() {
        body.push_str(&format!(
            "\n===== {} of {}: {} =====\n\n{}\n",
            n + 1,
            held.len(),
            crate::compose::one_line(&draft.subject, 160),
            draft.body
        ));
    }
    Draft::of(
        class,
        format!("digest of {}", held.len()),
        format!("{} notifications held back by the hourly limit", held.len()),
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(n: &str) -> Draft {
        Draft::new(n, format!("subject {n}"), format!("body {n}"))
    }

    const S: Staleness = Staleness {
        drive_age: 30 * DAY,
        profile_grace: DAY,
    };

    #[test]
    fn identical_failures_are_grouped_then_followed_up() {
        let mut l = Ledger::default();
        assert!(l.admit_failure("k", draft("a"), 100, HOUR).is_some());
        assert!(l.admit_failure("k", draft("a"), 200, HOUR).is_none());
        assert!(l.admit_failure("k", draft("a"), 300, HOUR).is_none());
        assert!(l.admit_failure("other", draft("b"), 300, HOUR).is_some());
        assert_eq!(l.next_due(&[], S, HOUR), Some(100 + HOUR));
        assert!(l.close_groups(100 + HOUR - 1, HOUR).is_empty());
        let follow = l.close_groups(100 + HOUR, HOUR);
        assert_eq!(follow.len(), 1);
        assert!(
            follow[0].subject.contains("2 more times"),
            "{:?}",
            follow[0]
        );
        assert!(follow[0].body.contains("body a"));
        // After the window a new identical failure is mailed again.
        assert!(l
            .admit_failure("k", draft("a"), 100 + HOUR + 5, HOUR)
            .is_some());
    }

    #[test]
    fn the_hourly_limit_holds_and_releases_a_digest() {
        let mut l = Ledger::default();
        assert!(l.rate_limit(draft("1"), 0, 2).is_some());
        assert!(l.rate_limit(draft("2"), 10, 2).is_some());
        assert!(l.rate_limit(draft("3"), 20, 2).is_none());
        assert!(l.rate_limit(draft("4"), 30, 2).is_none());
        assert_eq!(l.next_due(&[], S, HOUR), Some(HOUR));
        assert!(l.release_held(HOUR - 1, 2).is_empty());
        let digests = l.release_held(HOUR, 2);
        assert_eq!(digests.len(), 1);
        let digest = &digests[0];
        assert!(digest.body.contains("body 3") && digest.body.contains("body 4"));
        assert_eq!(digest.class, Class::Failure);
        assert!(l.held.is_empty());
    }

    #[test]
    fn each_class_has_its_own_hourly_limit() {
        let mut l = Ledger::default();
        let of = |class, n: &str| Draft::of(class, n, format!("subject {n}"), format!("body {n}"));
        assert!(l.rate_limit(of(Class::Success, "s1"), 0, 2).is_some());
        assert!(l.rate_limit(of(Class::Test, "t1"), 1, 2).is_some());
        assert!(l.rate_limit(of(Class::Success, "s2"), 2, 2).is_some());
        assert!(l.rate_limit(of(Class::Success, "s3"), 3, 2).is_none());
        // Success mails used up their limit; a failure still goes at once.
        assert!(l.rate_limit(draft("f1"), 4, 2).is_some());
        assert!(l.rate_limit(draft("f2"), 5, 2).is_some());
        assert!(l.rate_limit(draft("f3"), 6, 2).is_none());
        assert_eq!(l.next_due(&[], S, HOUR), Some(HOUR));
        let digests = l.release_held(HOUR + 4, 2);
        assert_eq!(digests.len(), 2, "{digests:?}");
        assert_eq!(digests[0].class, Class::Failure, "failures first");
        assert!(digests[0].body.contains("body f3"));
        assert!(digests[1].body.contains("body s3"));
    }

    #[test]
    fn an_old_ledger_keeps_its_counts() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("ledger.json");
        std::fs::write(
            &path,
            r#"{"recent": [5, 6], "held": [{"reason": "r", "subject": "s", "body": "b"}]}"#,
        )
        .expect("write");
        let l = Ledger::load(&path);
        assert_eq!(l.sent, vec![(Class::Other, 5), (Class::Other, 6)]);
        assert_eq!(l.held[0].class, Class::Other);
    }

    #[test]
    fn history_entries_are_new_once_by_id() {
        let mut l = Ledger::default();
        assert!(l.is_new_event("Borg1", "a", "Borg1/home", 10));
        l.cover("Borg1#a", 10);
        l.mark_mailed("Borg1/home", 10);
        assert!(!l.is_new_event("Borg1", "a", "Borg1/home", 10));
        // Another failure of the same subject in the same second is new.
        assert!(l.is_new_event("Borg1", "b", "Borg1/home", 10));
        // One older than what was mailed before ids existed is not.
        assert!(!l.is_new_event("Borg1", "c", "Borg1/home", 9));
        l.keep_events("Borg1", &BTreeSet::from(["b"]));
        assert!(l.mailed_ids["Borg1"].is_empty());
    }

    #[test]
    fn failures_at_start_are_new_only_once() {
        let mut l = Ledger::default();
        assert!(l.is_new_failure("Sync1/a", 50));
        l.mark_mailed("Sync1/a", 50);
        assert!(!l.is_new_failure("Sync1/a", 50));
        l.mark_mailed("Sync1/a", 10);
        assert!(!l.is_new_failure("Sync1/a", 40));
        assert!(l.is_new_failure("Sync1/a", 51));
    }

    #[test]
    fn a_stale_drive_is_mailed_once_a_day() {
        let mut l = Ledger::default();
        let drives = vec!["a".to_string(), "b".to_string()];
        l.last_sync.insert("a".into(), 1000);
        l.first_seen.insert("b".into(), 5000);
        assert_eq!(l.next_due(&drives, S, HOUR), Some(1000 + 30 * DAY));
        assert!(l.stale_drives(&drives, 1000 + 30 * DAY - 1, S).is_empty());
        let stale = l.stale_drives(&drives, 1000 + 30 * DAY, S);
        assert_eq!(stale, vec![("a".to_string(), Some(1000))]);
        assert!(l.stale_drives(&drives, 1000 + 30 * DAY + 10, S).is_empty());
        assert_eq!(
            l.next_due(&drives, S, HOUR),
            Some(5000 + 30 * DAY),
            "b is next"
        );
        let later = l.stale_drives(&drives, 1000 + 31 * DAY + 5000, S);
        assert_eq!(later.len(), 2, "{later:?}");
        // A sync makes it fresh again.
        l.last_sync.insert("a".into(), 1000 + 32 * DAY);
        assert!(l
            .stale_drives(&drives, 1000 + 33 * DAY, S)
            .iter()
            .all(|(d, _)| d != "a"));
    }

    #[test]
    fn a_profile_is_stale_after_its_due_time_and_grace() {
        let mut l = Ledger::default();
        l.profiles.insert(
            "home".into(),
            ProfileSeen {
                due: 10 * DAY,
                last_success: 9 * DAY,
            },
        );
        l.profiles.insert(
            "manual".into(),
            ProfileSeen {
                due: 0,
                last_success: 0,
            },
        );
        assert_eq!(l.next_due(&[], S, HOUR), Some(11 * DAY));
        assert!(l.stale_profiles(11 * DAY - 1, S).is_empty());
        assert_eq!(l.stale_profiles(11 * DAY, S).len(), 1);
        assert!(l.stale_profiles(11 * DAY + 1, S).is_empty());
        assert_eq!(l.stale_profiles(12 * DAY, S).len(), 1);
    }
}
