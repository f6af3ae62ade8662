//! The Prometheus textfile: what ferry has done, for node_exporter's
//! textfile collector (`[metrics] textfile` in ferry.toml).
//!
//! The notifier already hears every outcome, so it keeps the file: after
//! every change (a backup or sync outcome, a failure, a delivery) it reads
//! the peers' persisted results (Borg1 LastResults, Schedule, LastFailures,
//! GetStats; Sync1 LastSyncs, LastFailures; Crypt1 LastFailures) into a
//! [`Snapshot`], renders it here (pure, unit-tested) and writes it with
//! `write_atomically` (temp file, fsync, rename), so node_exporter never
//! reads half a file. Nothing is polled: no change, no write.
//!
//! Names follow Prometheus' conventions: `ferry_` prefix, base units in
//! the name (`_seconds`, `_bytes`, `_timestamp_seconds`), counters end in
//! `_total`. A figure ferry does not know is left out, never written as 0
//! (a 0 timestamp would read as "1970" in an alert). Not there yet: the
//! time of a drive's last full scrub (ferry-sync does not publish one);
//! alert on `ferry_drive_last_sync_timestamp_seconds` meanwhile.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One profile's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileFigures {
    /// Unix time of the last run that made an archive.
    pub last_success: Option<u64>,
    /// Unix time of the last failure.
    pub last_failure: Option<u64>,
    /// How long the last run took.
    pub duration: Option<f64>,
    /// The last archive's original (uncompressed) size.
    pub original_bytes: Option<u64>,
    /// What the last archive added to the repository (deduplicated,
    /// compressed).
    pub deduplicated_bytes: Option<u64>,
}

/// One drive's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DriveFigures {
    /// Unix time the last successful sync finished.
    pub last_sync: Option<u64>,
    /// Bytes the last sync copied.
    pub copied_bytes: Option<u64>,
    /// How long the last sync took.
    pub duration: Option<f64>,
    /// Free bytes on the drive after the last sync.
    pub free_bytes: Option<u64>,
    /// Unix time of the last failure (crypt or sync).
    pub last_failure: Option<u64>,
}

/// Everything the file shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// By profile name.
    pub profiles: BTreeMap<String, ProfileFigures>,
    /// By drive name.
    pub drives: BTreeMap<String, DriveFigures>,
    /// Failures seen per service (`crypt`, `sync`, `borg`), counted once
    /// per failure event since the notifier's state was created.
    pub failures: BTreeMap<String, u64>,
    /// Messages waiting per channel (`mail`, `push`).
    pub pending: BTreeMap<String, u32>,
    /// Dead letters per channel.
    pub dead: BTreeMap<String, u32>,
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A float as the exposition format writes it.
fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{value}")
    }
}

/// One metric family: HELP, TYPE and a sample per labelled value; nothing
/// at all when no value is known.
fn family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    samples: &[(&str, f64)],
) {
    if samples.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (value_of_label, value) in samples {
        let _ = writeln!(
            out,
            "{name}{{{label}=\"{}\"}} {}",
            escape(value_of_label),
            number(*value)
        );
    }
}

/// `(name, figure)` for every entry that has the figure.
fn known<T>(entries: &BTreeMap<String, T>, figure: impl Fn(&T) -> Option<f64>) -> Vec<(&str, f64)> {
    entries
        .iter()
        .filter_map(|(name, e)| figure(e).map(|v| (name.as_str(), v)))
        .collect()
}

/// A gauge of one kind of subject: its name, its help text and how to
/// read it from the subject's figures.
type Gauge<T> = (&'static str, &'static str, fn(&T) -> Option<f64>);

const PROFILE_GAUGES: [Gauge<ProfileFigures>; 5] = [
    (
        "ferry_backup_last_success_timestamp_seconds",
        "Unix time the profile's last backup that made an archive ended.",
        |f| f.last_success.map(|v| v as f64),
    ),
    (
        "ferry_backup_last_failure_timestamp_seconds",
        "Unix time of the profile's last failed backup.",
        |f| f.last_failure.map(|v| v as f64),
    ),
    (
        "ferry_backup_last_duration_seconds",
        "How long the profile's last backup took.",
        |f| f.duration,
    ),
    (
        "ferry_backup_last_archive_original_bytes",
        "Original size of the profile's last archive.",
        |f| f.original_bytes.map(|v| v as f64),
    ),
    (
        "ferry_backup_last_archive_deduplicated_bytes",
        "What the profile's last archive added to its repository (deduplicated, compressed).",
        |f| f.deduplicated_bytes.map(|v| v as f64),
    ),
];

const DRIVE_GAUGES: [Gauge<DriveFigures>; 5] = [
    (
        "ferry_drive_last_sync_timestamp_seconds",
        "Unix time the drive's last successful sync finished.",
        |f| f.last_sync.map(|v| v as f64),
    ),
    (
        "ferry_drive_last_sync_copied_bytes",
        "Bytes the drive's last successful sync copied.",
        |f| f.copied_bytes.map(|v| v as f64),
    ),
    (
        "ferry_drive_last_sync_duration_seconds",
        "How long the drive's last successful sync took.",
        |f| f.duration,
    ),
    (
        "ferry_drive_free_bytes",
        "Free bytes on the drive after its last successful sync.",
        |f| f.free_bytes.map(|v| v as f64),
    ),
    (
        "ferry_drive_last_failure_timestamp_seconds",
        "Unix time of the drive's last failure (opening, syncing or closing).",
        |f| f.last_failure.map(|v| v as f64),
    ),
];

/// The file's text, in the Prometheus text exposition format.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    for (name, help, figure) in PROFILE_GAUGES {
        family(
            &mut out,
            name,
            "gauge",
            help,
            "profile",
            &known(&s.profiles, figure),
        );
    }
    for (name, help, figure) in DRIVE_GAUGES {
        family(
            &mut out,
            name,
            "gauge",
            help,
            "drive",
            &known(&s.drives, figure),
        );
    }
    family(
        &mut out,
        "ferry_service_failures_total",
        "counter",
        "Failures the service reported (DriveFailed, SyncFailed, BackupFailed), each counted once.",
        "service",
        &known(&s.failures, |v| Some(*v as f64)),
    );
    family(
        &mut out,
        "ferry_notifier_pending_messages",
        "gauge",
        "Messages waiting in ferry-notifier's outbox, per channel.",
        "channel",
        &known(&s.pending, |v| Some(f64::from(*v))),
    );
    family(
        &mut out,
        "ferry_notifier_dead_letters",
        "gauge",
        "Messages refused for good, per channel (ListDeadLetters).",
        "channel",
        &known(&s.dead, |v| Some(f64::from(*v))),
    );
    out
}

/// The original and deduplicated size from borg create's `--json` (what
/// Borg1.GetStats returns); None when the document has no such figures.
pub fn archive_sizes(stats: &str) -> Option<(u64, u64)> {
    let doc: serde_json::Value = serde_json::from_str(stats).ok()?;
    let s = doc.get("archive")?.get("stats")?;
    Some((
        s.get("original_size")?.as_u64()?,
        s.get("deduplicated_size")?.as_u64()?,
    ))
}

/// Adds Borg1's LastResults, Schedule and LastFailures to the profiles'
/// figures: the latest success and failure of each, and the last run's
/// duration.
pub fn add_profiles(
    s: &mut Snapshot,
    results: &[ferry_interfaces::BackupResult],
    schedule: &[ferry_interfaces::ScheduleEntry],
    failures: &[ferry_interfaces::Failure],
) {
    use ferry_interfaces::BackupOutcome;
    let latest = |at: &mut Option<u64>, time: u64| *at = Some(at.unwrap_or(0).max(time));
    for r in results {
        let f = s.profiles.entry(r.profile.clone()).or_default();
        f.duration = Some(r.seconds);
        match BackupOutcome::from_wire(&r.outcome) {
            Some(BackupOutcome::Failed) => latest(&mut f.last_failure, r.time),
            Some(BackupOutcome::Finished | BackupOutcome::FinishedWithWarnings) => {
                latest(&mut f.last_success, r.time)
            }
            Some(BackupOutcome::Skipped) | None => {}
        }
    }
    for e in schedule.iter().filter(|e| e.last_success > 0) {
        let f = s.profiles.entry(e.profile.clone()).or_default();
        latest(&mut f.last_success, e.last_success);
    }
    for e in failures {
        let f = s.profiles.entry(e.subject.clone()).or_default();
        latest(&mut f.last_failure, e.time);
    }
}

/// The profiles that have a success (their archive sizes are worth
/// asking for).
pub fn profiles_with_success(s: &Snapshot) -> Vec<String> {
    s.profiles
        .iter()
        .filter(|(_, f)| f.last_success.is_some())
        .map(|(n, _)| n.clone())
        .collect()
}

/// Adds Sync1's LastSyncs and the drives' failures (Sync1's and Crypt1's
/// LastFailures) to the drives' figures.
pub fn add_drives<'a>(
    s: &mut Snapshot,
    syncs: &[ferry_interfaces::SyncRecord],
    failures: impl Iterator<Item = &'a ferry_interfaces::Failure>,
) {
    for r in syncs {
        let f = s.drives.entry(r.drive.clone()).or_default();
        f.last_sync = Some(r.time);
        f.copied_bytes = Some(r.bytes);
        f.duration = Some(r.seconds);
        f.free_bytes = Some(r.free);
    }
    for e in failures {
        let f = s.drives.entry(e.subject.clone()).or_default();
        f.last_failure = Some(f.last_failure.unwrap_or(0).max(e.time));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_become_families_and_unknown_ones_are_left_out() {
        let mut s = Snapshot::default();
        s.profiles.insert(
            "nas".into(),
            ProfileFigures {
                last_success: Some(1_700_000_000),
                duration: Some(12.5),
                ..Default::default()
            },
        );
        s.drives.insert(
            "off\"site".into(),
            DriveFigures {
                free_bytes: Some(5 << 30),
                ..Default::default()
            },
        );
        s.failures.insert("sync".into(), 3);
        let text = render(&s);
        assert!(
            text.contains(
                "# TYPE ferry_backup_last_success_timestamp_seconds gauge\n\
             ferry_backup_last_success_timestamp_seconds{profile=\"nas\"} 1700000000\n"
            ),
            "{text}"
        );
        assert!(text.contains("ferry_backup_last_duration_seconds{profile=\"nas\"} 12.5\n"));
        assert!(text.contains("ferry_drive_free_bytes{drive=\"off\\\"site\"} 5368709120\n"));
        assert!(text.contains("# TYPE ferry_service_failures_total counter\nferry_service_failures_total{service=\"sync\"} 3\n"));
        assert!(
            !text.contains("last_failure"),
            "unknown figures are not written: {text}"
        );
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn archive_sizes_come_from_borgs_json() {
        let json = r#"{"archive":{"name":"a","stats":{"original_size":1000,"compressed_size":600,"deduplicated_size":20,"nfiles":3}}}"#;
        assert_eq!(archive_sizes(json), Some((1000, 20)));
        assert_eq!(archive_sizes("{}"), None);
        assert_eq!(archive_sizes("not json"), None);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }
}
