//! A drive's SMART health, read on every attach before the drive is
//! opened: is this drive about to die while it holds the only other copy?
//!
//! smartmontools' `smartctl --json` (through the USB bridge's SAT
//! pass-through where there is one) is run on the whole disk under the
//! attached partition. Its JSON is parsed here ([`parse`], pure): overall
//! health, reallocated and pending sectors, power-on hours, temperature.
//! [`decide`] applies the drive's policy (`health` in `[drives.<name>]`):
//! a failing or degraded drive is opened with a warning (`warn`, the
//! default) or refused with DriveFailed at stage `health` (`refuse`). A
//! drive whose health cannot be read (no smartctl, a bridge smartctl does
//! not know, no SMART) is never refused: the reading says "unavailable"
//! and why.
//!
//! Every reading is recorded in the health ledger
//! (`<state-directory>/crypt-health.json`, one entry per drive, written
//! durably, mode 0644: nothing in it is secret), from which Crypt1.Health
//! is rebuilt when ferry-crypt starts and which ferry-notifier reads on
//! DriveOpened to mail a warning.
//! smartctl runs as a child process under tokio with a timeout (killed
//! when it hangs on a bad bridge); the ledger is written on the blocking
//! pool, and each reading is handed to the service loop ([`Report`]),
//! which shows it as Crypt1.Health before the open's outcome is signalled.
//! The only call into this module is [`gate`], from `ops::open_for`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_config::HealthPolicy;
use ferry_interfaces::HealthDecision;
use ferry_service::health_ledger::{self, HealthRecord};

use crate::domain::Failed;

/// How long smartctl may take (a confused bridge can hang).
const SMARTCTL_TIMEOUT: Duration = Duration::from_secs(60);

/// What the reading says, worst last (Crypt1.Health's verdict).
pub use ferry_interfaces::HealthVerdict as Verdict;

/// One reading of a drive's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// The verdict.
    pub verdict: Verdict,
    /// Reallocated sectors (ATA attribute 5), when reported.
    pub reallocated: Option<u64>,
    /// Sectors pending reallocation (ATA 197), when reported.
    pub pending: Option<u64>,
    /// Offline uncorrectable sectors (ATA 198), when reported.
    pub uncorrectable: Option<u64>,
    /// Power-on hours.
    pub power_on_hours: Option<u64>,
    /// Temperature in °C.
    pub temperature: Option<i64>,
    /// One line for people: the figures, or why there are none.
    pub summary: String,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Open it; nothing to say.
    Open,
    /// Open it, and warn with this sentence.
    Warn(String),
    /// Do not open it: DriveFailed at stage `health` with this sentence.
    Refuse(String),
}

/// What [`gate`] needs: the drive's policy, smartctl, the ledger, and
/// where the service loop takes readings for Crypt1.Health.
#[derive(Debug, Clone)]
pub struct Check {
    /// The drive's policy.
    pub policy: HealthPolicy,
    /// The smartctl binary.
    pub smartctl: PathBuf,
    /// The health ledger; None: readings are not recorded.
    pub ledger: Option<PathBuf>,
    /// The service loop's end of the readings (drive, reading), sent
    /// before the open goes on; None: nobody shows them.
    pub report: Option<Report>,
}

/// Where readings go to be shown as Crypt1.Health: (drive, reading).
pub type Report = tokio::sync::mpsc::UnboundedSender<(String, HealthRecord)>;

fn unavailable(why: impl Into<String>) -> Reading {
    Reading {
        verdict: Verdict::Unavailable,
        reallocated: None,
        pending: None,
        uncorrectable: None,
        power_on_hours: None,
        temperature: None,
        summary: why.into(),
    }
}

/// The raw value of ATA attribute `id`.
fn attribute(doc: &serde_json::Value, id: u64) -> Option<u64> {
    doc.pointer("/ata_smart_attributes/table")?
        .as_array()?
        .iter()
        .find(|a| a.get("id").and_then(|i| i.as_u64()) == Some(id))?
        .pointer("/raw/value")?
        .as_u64()
}

/// Whether an ATA attribute is past its threshold now.
fn attribute_failing_now(doc: &serde_json::Value) -> Option<String> {
    doc.pointer("/ata_smart_attributes/table")?
        .as_array()?
        .iter()
        .find(|a| a.get("when_failed").and_then(|w| w.as_str()) == Some("now"))
        .and_then(|a| a.get("name")?.as_str().map(str::to_string))
}

/// smartctl's error messages, joined.
fn messages(doc: &serde_json::Value) -> String {
    doc.pointer("/smartctl/messages")
        .and_then(|m| m.as_array())
        .map(|m| {
            m.iter()
                .filter_map(|e| e.get("string")?.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

/// Reads `smartctl --json` output (`exit` its exit status, a bit mask).
pub fn parse(json: &[u8], exit: i32) -> Reading {
    let doc: serde_json::Value = match serde_json::from_slice(json) {
        Ok(d) => d,
        Err(e) => return unavailable(format!("smartctl printed no JSON ({e})")),
    };
    let passed = doc
        .pointer("/smart_status/passed")
        .and_then(|p| p.as_bool());
    let nvme = doc.pointer("/nvme_smart_health_information_log");
    let mut r = unavailable(String::new());
    r.reallocated = attribute(&doc, 5);
    r.pending = attribute(&doc, 197);
    r.uncorrectable =
        attribute(&doc, 198).or_else(|| nvme.and_then(|n| n.get("media_errors")?.as_u64()));
    r.power_on_hours = doc.pointer("/power_on_time/hours").and_then(|h| h.as_u64());
    r.temperature = doc.pointer("/temperature/current").and_then(|t| t.as_i64());
    let failing_attribute = attribute_failing_now(&doc);
    let Some(passed) = passed else {
        let said = messages(&doc);
        r.summary = if said.is_empty() {
            format!("smartctl reported no overall health (exit status {exit})")
        } else {
            format!("smartctl cannot read the drive's health: {said}")
        };
        return r;
    };
    let bad_sectors = [r.reallocated, r.pending, r.uncorrectable]
        .iter()
        .any(|n| n.is_some_and(|n| n > 0));
    r.verdict = if !passed || exit & 0b1000 != 0 || failing_attribute.is_some() {
        Verdict::Failing
    } else if bad_sectors {
        Verdict::Degraded
    } else {
        Verdict::Passed
    };
    r.summary = summary(&r, failing_attribute.as_deref());
    r
}

fn summary(r: &Reading, failing_attribute: Option<&str>) -> String {
    let mut parts = vec![match r.verdict {
        Verdict::Failing => "SMART overall health FAILED".to_string(),
        _ => "SMART overall health passed".to_string(),
    }];
    if let Some(name) = failing_attribute {
        parts.push(format!("{name} past its threshold now"));
    }
    let figures = [
        ("reallocated sectors", r.reallocated),
        ("pending sectors", r.pending),
        ("uncorrectable sectors", r.uncorrectable),
        ("power-on hours", r.power_on_hours),
    ];
    for (what, n) in figures {
        if let Some(n) = n {
            parts.push(format!("{n} {what}"));
        }
    }
    if let Some(t) = r.temperature {
        parts.push(format!("{t} °C"));
    }
    parts.join(", ")
}

/// What `policy` makes of `reading` for drive `drive`.
pub fn decide(policy: HealthPolicy, drive: &str, reading: &Reading) -> Decision {
    let bad = matches!(reading.verdict, Verdict::Failing | Verdict::Degraded);
    if !bad {
        return Decision::Open;
    }
    match policy {
        HealthPolicy::Refuse => Decision::Refuse(format!(
            "drive {drive} is not opened: its health is {} ({}). Copy what it holds onto a \
             healthy drive and retire it; to use it anyway set health = \"warn\" in \
             [drives.{drive}] of ferry.toml",
            reading.verdict.as_str(),
            reading.summary
        )),
        HealthPolicy::Warn | HealthPolicy::Off => Decision::Warn(format!(
            "drive {drive} health is {} ({}); it is used anyway (health = \"warn\"). Replace it \
             soon: it may hold your only other copy",
            reading.verdict.as_str(),
            reading.summary
        )),
    }
}

/// The whole disk under `device` (`/dev/sdb1` → `/dev/sdb`), as smartctl
/// needs it; `device` itself when it is not a partition.
pub fn whole_disk(device: &Path) -> PathBuf {
    let resolved = std::fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
    let Some(name) = resolved.file_name() else {
        return resolved;
    };
    let sys = Path::new("/sys/class/block").join(name);
    if !sys.join("partition").exists() {
        return resolved;
    }
    std::fs::canonicalize(&sys)
        .ok()
        .and_then(|p| {
            p.parent()
                .and_then(|d| d.file_name())
                .map(|n| Path::new("/dev").join(n))
        })
        .unwrap_or(resolved)
}

/// Runs smartctl on `disk` (under tokio, killed after the timeout).
pub async fn read(smartctl: &Path, disk: &Path) -> Reading {
    if !tokio::fs::try_exists(smartctl).await.unwrap_or(false) {
        return unavailable(format!(
            "{} is not installed (apt install smartmontools)",
            smartctl.display()
        ));
    }
    let run = tokio::process::Command::new(smartctl)
        .args(["--json", "--info", "--health", "--attributes"])
        .arg(disk)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(SMARTCTL_TIMEOUT, run).await {
        Err(_) => unavailable(format!(
            "{} did not finish within {SMARTCTL_TIMEOUT:?}",
            smartctl.display()
        )),
        Ok(Err(e)) => unavailable(format!("cannot run {}: {e}", smartctl.display())),
        Ok(Ok(out)) => parse(&out.stdout, out.status.code().unwrap_or(-1)),
    }
}

/// The ledger entry of a reading.
fn record_of(reading: &Reading, disk: &Path, decision: HealthDecision) -> HealthRecord {
    HealthRecord {
        time: ferry_service::unix_now(),
        device: disk.display().to_string(),
        decision: decision.as_str().into(),
        verdict: reading.verdict.as_str().into(),
        summary: reading.summary.clone(),
        reallocated: reading.reallocated,
        pending: reading.pending,
        uncorrectable: reading.uncorrectable,
        power_on_hours: reading.power_on_hours,
        temperature: reading.temperature,
    }
}

/// The health check before opening `drive` on `device`: reads, records
/// (the ledger, then the loop for Crypt1.Health), logs, and refuses (stage
/// `health`) when the policy says so.
pub async fn gate(check: &Check, drive: &str, device: &Path) -> Result<(), Failed> {
    if check.policy == HealthPolicy::Off {
        return Ok(());
    }
    let named = device.to_path_buf();
    let disk = tokio::task::spawn_blocking(move || whole_disk(&named))
        .await
        .unwrap_or_else(|_| device.to_path_buf());
    let reading = read(&check.smartctl, &disk).await;
    let decision = decide(check.policy, drive, &reading);
    let word = match &decision {
        Decision::Open => {
            tracing::info!(
                "{drive}: health {}: {}",
                reading.verdict.as_str(),
                reading.summary
            );
            HealthDecision::Open
        }
        Decision::Warn(w) => {
            tracing::warn!("{drive}: {w}");
            HealthDecision::Warn
        }
        Decision::Refuse(r) => {
            tracing::error!("{drive}: {r}");
            HealthDecision::Refuse
        }
    };
    let entry = record_of(&reading, &disk, word);
    if let Some(path) = check.ledger.clone() {
        let (drive_name, kept) = (drive.to_string(), entry.clone());
        let written =
            tokio::task::spawn_blocking(move || health_ledger::record(&path, &drive_name, kept))
                .await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::warn!("{drive}: the health reading could not be recorded in the ledger");
        }
    }
    if let Some(report) = &check.report {
        // The loop is gone only when the service stops.
        let _ = report.send((drive.to_string(), entry));
    }
    match decision {
        Decision::Refuse(message) => Err(Failed {
            stage: ferry_interfaces::CryptStage::Health,
            message,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEALTHY: &str = include_str!("../tests/smartctl/healthy.json");
    const FAILING: &str = include_str!("../tests/smartctl/failing.json");
    const BRIDGE: &str = include_str!("../tests/smartctl/unsupported-bridge.json");

    #[test]
    fn a_healthy_drive_passes_with_its_figures() {
        let r = parse(HEALTHY.as_bytes(), 0);
        assert_eq!(r.verdict, Verdict::Passed);
        assert_eq!((r.reallocated, r.pending), (Some(0), Some(0)));
        assert_eq!(r.power_on_hours, Some(8_766));
        assert_eq!(r.temperature, Some(34));
        assert!(r.summary.contains("8766 power-on hours"), "{}", r.summary);
        assert_eq!(decide(HealthPolicy::Refuse, "a", &r), Decision::Open);
    }

    #[test]
    fn a_failing_drive_is_refused_or_warned_about() {
        let r = parse(FAILING.as_bytes(), 8);
        assert_eq!(r.verdict, Verdict::Failing);
        assert_eq!(r.reallocated, Some(1_872));
        assert_eq!(r.pending, Some(24));
        assert!(r.summary.contains("FAILED"), "{}", r.summary);
        match decide(HealthPolicy::Refuse, "offsite-a", &r) {
            Decision::Refuse(m) => {
                assert!(
                    m.contains("1872 reallocated sectors") && m.contains("health = \"warn\""),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decide(HealthPolicy::Warn, "offsite-a", &r),
            Decision::Warn(_)
        ));
    }

    #[test]
    fn reallocated_sectors_alone_are_degraded() {
        let mut doc: serde_json::Value = serde_json::from_str(HEALTHY).expect("json");
        doc["ata_smart_attributes"]["table"][1]["raw"]["value"] = 3.into();
        let r = parse(doc.to_string().as_bytes(), 0);
        assert_eq!(r.verdict, Verdict::Degraded, "{r:?}");
        assert!(matches!(
            decide(HealthPolicy::Refuse, "a", &r),
            Decision::Refuse(_)
        ));
    }

    #[test]
    fn an_unknown_bridge_is_unavailable_and_never_refused() {
        let r = parse(BRIDGE.as_bytes(), 1);
        assert_eq!(r.verdict, Verdict::Unavailable);
        assert!(r.summary.contains("Unknown USB bridge"), "{}", r.summary);
        assert_eq!(decide(HealthPolicy::Refuse, "a", &r), Decision::Open);
        let garbage = parse(b"Segmentation fault", 139);
        assert_eq!(garbage.verdict, Verdict::Unavailable);
    }

    #[test]
    fn a_record_round_trips_through_the_ledger() {
        let dir = tempfile::tempdir().expect("dir");
        let path = health_ledger::path(dir.path());
        let entry = record_of(
            &parse(HEALTHY.as_bytes(), 0),
            Path::new("/dev/sdb"),
            HealthDecision::Open,
        );
        health_ledger::record(&path, "offsite-a", entry.clone()).expect("record");
        assert_eq!(
            health_ledger::load(&path).expect("load")["offsite-a"],
            entry
        );
        assert_eq!(entry.verdict, "passed");
    }
}
