//! The drive health ledger: ferry-crypt's latest SMART reading of each
//! drive, `<state-directory>/crypt-health.json`, written durably (mode
//! 0644: nothing in it is secret) each time a drive is attached and
//! opened. ferryctl status shows it; ferry-notifier reads it on
//! DriveOpened to mail a health warning. One type for the writer and the
//! readers, so the file cannot drift from what they expect.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The ledger's file name under the state directory.
pub const FILE: &str = "crypt-health.json";

/// The ledger of the configuration's state directory.
pub fn path(state_directory: &Path) -> PathBuf {
    state_directory.join(FILE)
}

/// One drive's latest reading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRecord {
    /// Unix time of the reading.
    pub time: u64,
    /// The disk smartctl read (`/dev/sdb`).
    pub device: String,
    /// What the drive's policy made of it: `open`, `warn` or `refuse`.
    pub decision: String,
    /// `passed`, `degraded`, `failing` or `unavailable`.
    pub verdict: String,
    /// One line for people: the figures, or why there are none.
    pub summary: String,
    /// Reallocated sectors (ATA 5), when reported.
    pub reallocated: Option<u64>,
    /// Sectors pending reallocation (ATA 197), when reported.
    pub pending: Option<u64>,
    /// Uncorrectable sectors (ATA 198, NVMe media errors), when reported.
    pub uncorrectable: Option<u64>,
    /// Power-on hours, when reported.
    pub power_on_hours: Option<u64>,
    /// Temperature in °C, when reported.
    pub temperature: Option<i64>,
}

impl HealthRecord {
    /// The reading as Crypt1.Health shows it for `drive`: the figures
    /// reported, by their documented names.
    pub fn to_property(&self, drive: &str) -> ferry_interfaces::DriveHealth {
        let counts = [
            self.reallocated,
            self.pending,
            self.uncorrectable,
            self.power_on_hours,
        ];
        let figures = ferry_interfaces::HEALTH_FIGURES
            .iter()
            .zip(
                counts
                    .iter()
                    .map(|n| n.map(|n| i64::try_from(n).unwrap_or(i64::MAX))),
            )
            .chain(std::iter::once((
                &ferry_interfaces::HEALTH_FIGURES[4],
                self.temperature,
            )))
            .filter_map(|(name, value)| Some((name.to_string(), value?)))
            .collect();
        ferry_interfaces::DriveHealth {
            drive: drive.to_string(),
            verdict: self.verdict.clone(),
            decision: self.decision.clone(),
            device: self.device.clone(),
            time: self.time,
            summary: self.summary.clone(),
            figures,
        }
    }
}

/// Reads the ledger: drive → its latest reading. Empty when there is none
/// yet; Err says why an existing one cannot be read.
pub fn load(path: &Path) -> Result<BTreeMap<String, HealthRecord>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is not a health ledger: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Records `record` as `drive`'s latest reading (blocking: read, then
/// [`crate::durable::write_atomically`]).
pub fn record(path: &Path, drive: &str, record: HealthRecord) -> std::io::Result<()> {
    let mut all = load(path).unwrap_or_default();
    all.insert(drive.to_string(), record);
    let bytes = serde_json::to_vec_pretty(&all).map_err(std::io::Error::other)?;
    crate::durable::write_atomically(path, &bytes, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_property_names_only_the_figures_reported() {
        let record = HealthRecord {
            time: 7,
            device: "/dev/sdb".into(),
            decision: "warn".into(),
            verdict: "degraded".into(),
            summary: "3 reallocated sectors".into(),
            reallocated: Some(3),
            pending: None,
            uncorrectable: Some(0),
            power_on_hours: Some(8766),
            temperature: Some(-2),
        };
        let shown = record.to_property("offsite-a");
        assert_eq!((shown.drive.as_str(), shown.time), ("offsite-a", 7));
        assert_eq!(shown.figures.len(), 4, "{:?}", shown.figures);
        assert_eq!(shown.figures["reallocated-sectors"], 3);
        assert_eq!(shown.figures["uncorrectable-sectors"], 0);
        assert_eq!(shown.figures["power-on-hours"], 8766);
        assert_eq!(shown.figures["temperature-celsius"], -2);
        assert!(!shown.figures.contains_key("pending-sectors"));
    }
}
