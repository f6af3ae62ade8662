//! `ferryctl simulate plug DRIVE`: what would happen if the drive were
//! plugged in now — which repositories would be copied, about how many bytes,
//! whether they fit in the space the drive had at its last sync, which
//! backups are due — read from ferry.toml, the local repositories and the
//! services' properties. It writes nothing, anywhere.
//!
//! The estimate of what is new counts the files in each local repository
//! changed since the drive's last sync: borg 1.2 never rewrites a committed
//! segment, so new segments are what a sync copies.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ferry_config::Config;
use ferry_interfaces::{ScheduleEntry, SyncRecord};

use crate::words;

/// What one local repository would contribute to the copy.
#[derive(Debug, PartialEq)]
pub struct RepositoryEstimate {
    pub name: String,
    pub path: PathBuf,
    /// All its bytes, or why they could not be counted.
    pub total: Result<Files, String>,
    /// Its bytes changed since the last sync (all of them without one).
    pub new: Result<Files, String>,
}

/// A count of regular files and their bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Files {
    pub count: u64,
    pub bytes: u64,
}

/// Everything `simulate plug` says.
#[derive(Debug)]
pub struct Simulation {
    pub drive: String,
    pub key_file: Option<PathBuf>,
    pub mountpoint: PathBuf,
    pub open_on_attach: bool,
    pub power_off: bool,
    pub repositories: Vec<RepositoryEstimate>,
    pub last_sync: Option<SyncRecord>,
    pub reserve: u64,
    pub due: Vec<ScheduleEntry>,
}

/// Counts the regular files below `root` (not following links) changed
/// after `since` (unix seconds; 0 counts everything). Iterative: the
/// repository is the host's own, but a deep tree must not exhaust the stack.
pub fn count_files(root: &Path, since: u64) -> Result<Files, String> {
    let mut files = Files::default();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let entries =
            std::fs::read_dir(&dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
            let meta = entry
                .metadata()
                .map_err(|e| format!("cannot read {}: {e}", entry.path().display()))?;
            if meta.is_dir() {
                todo.push(entry.path());
            } else if meta.is_file() && meta.mtime().max(meta.ctime()) as u64 >= since {
                files.count += 1;
                files.bytes += meta.len();
            }
        }
    }
    Ok(files)
}

/// Plans the plug-in of `drive` from the configuration and what the
/// services report.
pub fn plan(
    config: &Config,
    drive: &str,
    syncs: &[SyncRecord],
    schedule: &[ScheduleEntry],
    now: u64,
) -> Result<Simulation, String> {
    let (name, entry) = config
        .drives
        .iter()
        .find(|(name, _)| name.as_str() == drive)
        .ok_or_else(|| {
            format!(
                "no drive named {drive} is enrolled in ferry.toml (enrolled: {})",
                config
                    .drives
                    .keys()
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let last_sync = syncs.iter().find(|s| s.drive == drive).cloned();
    let since = last_sync.as_ref().map(|s| s.time).unwrap_or(0);
    let repositories = entry
        .repositories
        .iter()
        .map(|repository| {
            let path: PathBuf = config
                .repositories
                .get(repository)
                .map(|r| r.path.to_path_buf())
                .unwrap_or_default();
            RepositoryEstimate {
                name: repository.to_string(),
                total: count_files(&path, 0),
                new: count_files(&path, since),
                path,
            }
        })
        .collect();
    Ok(Simulation {
        drive: name.to_string(),
        key_file: entry.key_file.as_ref().map(|k| k.to_path_buf()),
        mountpoint: entry.mountpoint(name),
        open_on_attach: entry.open_on_attach,
        power_off: entry.power_off,
        repositories,
        last_sync,
        reserve: config.sync.reserve_mib * 1024 * 1024,
        due: schedule
            .iter()
            .filter(|s| s.due > 0 && s.due <= now)
            .cloned()
            .collect(),
    })
}

/// The simulation in a person's words.
pub fn render(sim: &Simulation, now: u64) -> String {
    let mut out = format!("If {} were plugged in now:\n", sim.drive);
    let mut line = |text: String| {
        out.push_str("  ");
        out.push_str(&text);
        out.push('\n');
    };
    if !sim.open_on_attach {
        line(format!(
            "nothing would happen by itself (open-on-attach = false): `ferryctl open {}` starts the flow",
            sim.drive
        ));
    }
    match &sim.key_file {
        Some(key) => line(format!(
            "ferry-crypt would unlock it with {}, prove its identity and mount it at {}",
            key.display(),
            sim.mountpoint.display()
        )),
        None => line(format!(
            "ferry-crypt would prove its identity (a plain, unencrypted drive) and mount it at {}",
            sim.mountpoint.display()
        )),
    }
    let since = match &sim.last_sync {
        Some(s) => format!("since its last sync {}", words::ago(now, s.time)),
        None => "(never synced: everything)".to_string(),
    };
    let mut needed: Option<u64> = Some(0);
    if sim.repositories.is_empty() {
        line("ferry-sync would copy nothing: no repositories are assigned to it".into());
    } else {
        line("ferry-sync would copy:".into());
    }
    for repo in &sim.repositories {
        let text = match (&repo.total, &repo.new) {
            (Ok(total), Ok(new)) => {
                needed = needed.map(|n| n + new.bytes);
                format!(
                    "{} ({}): {} in all; about {} new {since} ({} files)",
                    repo.name,
                    repo.path.display(),
                    words::bytes(total.bytes),
                    words::bytes(new.bytes),
                    new.count
                )
            }
            (Err(e), _) | (_, Err(e)) => {
                needed = None;
                format!("{} ({}): {e}", repo.name, repo.path.display())
            }
        };
        line(format!("  {text}"));
    }
    match (needed, sim.last_sync.as_ref().map(|s| s.free)) {
        (Some(needed), Some(free)) if free > 0 => {
            let want = needed + sim.reserve;
            let verdict = if want <= free {
                "it fits"
            } else {
                "it does NOT fit: the sync would fail at `space` and keep the previous copy"
            };
            line(format!(
                "space: {} was free at the last sync; the copy needs about {} plus {} reserve: {verdict}",
                words::bytes(free),
                words::bytes(needed),
                words::bytes(sim.reserve)
            ));
        }
        (Some(needed), _) => line(format!(
            "space: the drive's free space is not known yet (no sync recorded); the copy needs about {} plus {} reserve",
            words::bytes(needed),
            words::bytes(sim.reserve)
        )),
        (None, _) => line("space: cannot be estimated (a repository could not be read)".into()),
    }
    line(format!(
        "then it would be unmounted and locked{}, and the LED would turn green",
        if sim.power_off {
            " and powered off"
        } else {
            ""
        }
    ));
    if !sim.due.is_empty() {
        let due: Vec<&str> = sim.due.iter().map(|s| s.profile.as_str()).collect();
        line(format!(
            "backups due now (their timers start them, not the plug-in): {}",
            due.join(", ")
        ));
    }
    out.push_str("Nothing was written.\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_files_are_those_changed_since_the_last_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("data/0")).expect("mkdir");
        std::fs::write(dir.path().join("data/0/1"), vec![0u8; 1000]).expect("write");
        std::fs::write(dir.path().join("config"), "c").expect("write");
        let all = count_files(dir.path(), 0).expect("count");
        assert_eq!(
            all,
            Files {
                count: 2,
                bytes: 1001
            }
        );
        let future = count_files(dir.path(), u64::MAX / 2).expect("count");
        assert_eq!(future, Files::default());
    }

    #[test]
    fn the_verdict_compares_the_new_bytes_with_the_last_free_space() {
        let sim = |free: u64| Simulation {
            drive: "a".into(),
            key_file: None,
            mountpoint: "/run/ferry/a".into(),
            open_on_attach: true,
            power_off: false,
            repositories: vec![RepositoryEstimate {
                name: "nas".into(),
                path: "/srv/nas".into(),
                total: Ok(Files {
                    count: 10,
                    bytes: 10 << 20,
                }),
                new: Ok(Files {
                    count: 2,
                    bytes: 2 << 20,
                }),
            }],
            last_sync: Some(SyncRecord {
                drive: "a".into(),
                time: 1000,
                bytes: 0,
                seconds: 0.0,
                archive: String::new(),
                free,
            }),
            reserve: 1 << 20,
            due: vec![],
        };
        let fits = render(&sim(4 << 20), 1000 + 86_400);
        assert!(
            fits.contains("about 2.0 MiB new since its last sync 1 day ago"),
            "{fits}"
        );
        assert!(fits.contains(": it fits"), "{fits}");
        let full = render(&sim(2 << 20), 1000);
        assert!(full.contains("it does NOT fit"), "{full}");
        assert!(full.ends_with("Nothing was written.\n"));
    }
}
