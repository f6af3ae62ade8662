//! Which enrolled drives are present, decided from udev observations.
//!
//! Pure logic, no udev or bus: the service feeds it what udev reports and
//! announces what it returns. It is where the rules live: only enrolled
//! UUIDs count, a repeated change event announces nothing, a device that
//! loses its UUID (a loop device detached, a wiped signature) or is removed
//! is detached, and a second device claiming an attached drive's UUID is
//! ignored rather than announced twice.

use std::collections::BTreeMap;

use ferry_config::{Config, Name};
use ferry_interfaces::WatchedDrive;

/// What udev says about one block device. Every string is untrusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The sysfs path: the device's identity while it exists.
    pub syspath: String,
    /// The device node, e.g. /dev/sdb1; may be empty.
    pub device: String,
    /// ID_FS_UUID, if present and valid UTF-8.
    pub uuid: Option<String>,
    /// The device is being removed.
    pub removed: bool,
}

/// A change to announce on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// DriveAttached(drive, device, uuid).
    Attached {
        drive: String,
        device: String,
        uuid: String,
    },
    /// DriveDetached(drive, uuid).
    Detached { drive: String, uuid: String },
}

#[derive(Debug, Clone)]
struct Present {
    drive: String,
    uuid: String,
    device: String,
    since: u64,
}

/// The enrolled drives and which of them are present.
#[derive(Debug)]
pub struct Tracker {
    enrolled: Vec<(Name, String)>,
    /// Present drives by syspath.
    present: BTreeMap<String, Present>,
}

impl Tracker {
    /// Tracks the drives enrolled in `config`.
    pub fn new(config: &Config) -> Tracker {
        let enrolled = config
            .drives
            .iter()
            .map(|(name, d)| (name.clone(), d.uuid.to_string()))
            .collect();
        Tracker {
            enrolled,
            present: BTreeMap::new(),
        }
    }

    fn enrolled_drive(&self, uuid: &str) -> Option<&Name> {
        self.enrolled
            .iter()
            .find(|(_, u)| u.eq_ignore_ascii_case(uuid))
            .map(|(n, _)| n)
    }

    fn holder_of(&self, drive: &str) -> Option<&str> {
        self.present
            .iter()
            .find(|(_, p)| p.drive == drive)
            .map(|(s, _)| s.as_str())
    }

    /// Applies one udev event; returns what to announce.
    pub fn observe(&mut self, observation: Observation, now: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        let matched = match (&observation.uuid, observation.removed) {
            (Some(uuid), false) => self
                .enrolled_drive(uuid)
                .map(|n| (n.to_string(), uuid.clone())),
            _ => None,
        };
        if let Some(previous) = self.present.get(&observation.syspath) {
            if matched
                .as_ref()
                .is_some_and(|(drive, _)| *drive == previous.drive)
            {
                return changes; // a repeated change event for a known drive
            }
            if let Some(gone) = self.present.remove(&observation.syspath) {
                changes.push(Change::Detached {
                    drive: gone.drive,
                    uuid: gone.uuid,
                });
            }
        }
        if let Some((drive, uuid)) = matched {
            if let Some(holder) = self.holder_of(&drive) {
                tracing::warn!(
                    "{:?} carries the UUID of drive {drive}, which is already attached as {holder:?}; ignoring it (a cloned drive?)",
                    observation.device
                );
                return changes;
            }
            changes.push(Change::Attached {
                drive: drive.clone(),
                device: observation.device.clone(),
                uuid: uuid.clone(),
            });
            self.present.insert(
                observation.syspath,
                Present {
                    drive,
                    uuid,
                    device: observation.device,
                    since: now,
                },
            );
        }
        changes
    }

    /// Replaces what is known with a full enumeration. Drives gone since are
    /// detached; every present drive is announced again, so a subscriber that
    /// missed the first announcement can act on it.
    pub fn rescan(&mut self, devices: Vec<Observation>, now: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        let still_there: Vec<String> = devices
            .iter()
            .filter(|o| self.matches_as_before(o))
            .map(|o| o.syspath.clone())
            .collect();
        let gone: Vec<String> = self
            .present
            .keys()
            .filter(|s| !still_there.contains(s))
            .cloned()
            .collect();
        for syspath in gone {
            if let Some(p) = self.present.remove(&syspath) {
                changes.push(Change::Detached {
                    drive: p.drive,
                    uuid: p.uuid,
                });
            }
        }
        for device in devices {
            if !self.present.contains_key(&device.syspath) {
                // New devices go through the same rules as hotplug (and are announced there).
                changes.extend(self.observe(device, now));
            }
        }
        let announced: Vec<String> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Attached { drive, .. } => Some(drive.clone()),
                Change::Detached { .. } => None,
            })
            .collect();
        for p in self.present.values() {
            if !announced.contains(&p.drive) {
                changes.push(Change::Attached {
                    drive: p.drive.clone(),
                    device: p.device.clone(),
                    uuid: p.uuid.clone(),
                });
            }
        }
        changes
    }

    fn matches_as_before(&self, observation: &Observation) -> bool {
        let Some(present) = self.present.get(&observation.syspath) else {
            return false;
        };
        !observation.removed
            && observation
                .uuid
                .as_deref()
                .and_then(|u| self.enrolled_drive(u))
                .is_some_and(|n| n.as_str() == present.drive)
    }

    /// How many enrolled drives are present.
    pub fn present_count(&self) -> usize {
        self.present.len()
    }

    /// The Drives property: every enrolled drive, sorted by name.
    pub fn snapshot(&self) -> Vec<WatchedDrive> {
        self.enrolled
            .iter()
            .map(|(name, uuid)| {
                let present = self.present.values().find(|p| p.drive == name.as_str());
                WatchedDrive {
                    name: name.to_string(),
                    uuid: present
                        .map(|p| p.uuid.clone())
                        .unwrap_or_else(|| uuid.clone()),
                    attached: present.is_some(),
                    device: present.map(|p| p.device.clone()).unwrap_or_default(),
                    since: present.map(|p| p.since).unwrap_or(0),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const A: &str = "11111111-2222-3333-4444-555555555555";
    const B: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

    fn tracker() -> Tracker {
        let text =
            format!("[drives.offsite-a]\nuuid = \"{A}\"\n[drives.offsite-b]\nuuid = \"{B}\"\n");
        Tracker::new(&Config::parse(&text, Path::new("t")).expect("config"))
    }

    fn seen(syspath: &str, device: &str, uuid: Option<&str>) -> Observation {
        Observation {
            syspath: syspath.into(),
            device: device.into(),
            uuid: uuid.map(str::to_string),
            removed: false,
        }
    }

    fn attached(drive: &str, device: &str, uuid: &str) -> Change {
        Change::Attached {
            drive: drive.into(),
            device: device.into(),
            uuid: uuid.into(),
        }
    }

    fn detached(drive: &str, uuid: &str) -> Change {
        Change::Detached {
            drive: drive.into(),
            uuid: uuid.into(),
        }
    }

    #[test]
    fn enrolled_uuid_attaches_once_and_detaches_when_the_uuid_goes() {
        let mut t = tracker();
        assert_eq!(
            t.observe(seen("/sys/loop0", "/dev/loop0", Some(A)), 5),
            vec![attached("offsite-a", "/dev/loop0", A)]
        );
        assert_eq!(
            t.observe(seen("/sys/loop0", "/dev/loop0", Some(A)), 6),
            vec![],
            "repeated change event"
        );
        assert_eq!(
            t.snapshot()[0],
            WatchedDrive {
                name: "offsite-a".into(),
                uuid: A.into(),
                attached: true,
                device: "/dev/loop0".into(),
                since: 5
            }
        );
        assert_eq!(
            t.observe(seen("/sys/loop0", "/dev/loop0", None), 7),
            vec![detached("offsite-a", A)]
        );
        assert_eq!(t.observe(seen("/sys/loop0", "/dev/loop0", None), 8), vec![]);
        assert!(!t.snapshot()[0].attached);
    }

    #[test]
    fn uuid_case_is_ignored_and_reported_as_udev_gave_it() {
        let mut t = tracker();
        let upper = A.to_uppercase();
        assert_eq!(
            t.observe(seen("/sys/sdb1", "/dev/sdb1", Some(&upper)), 1),
            vec![attached("offsite-a", "/dev/sdb1", &upper)]
        );
    }

    #[test]
    fn unknown_and_hostile_devices_produce_nothing() {
        let mut t = tracker();
        let long = "f".repeat(1 << 16);
        for uuid in [
            Some("99999999-0000-0000-0000-000000000000"),
            None,
            Some(""),
            Some(long.as_str()),
            Some("\u{0}\n' ; rm -rf /"),
        ] {
            assert_eq!(t.observe(seen("/sys/sdc1", "/dev/sdc1", uuid), 1), vec![]);
        }
        assert_eq!(t.present_count(), 0);
    }

    #[test]
    fn removal_detaches() {
        let mut t = tracker();
        t.observe(seen("/sys/sdb1", "/dev/sdb1", Some(B)), 1);
        let mut gone = seen("/sys/sdb1", "/dev/sdb1", Some(B));
        gone.removed = true;
        assert_eq!(t.observe(gone, 2), vec![detached("offsite-b", B)]);
    }

    #[test]
    fn a_second_device_with_the_same_uuid_is_ignored() {
        let mut t = tracker();
        t.observe(seen("/sys/sdb1", "/dev/sdb1", Some(A)), 1);
        assert_eq!(
            t.observe(seen("/sys/sdc1", "/dev/sdc1", Some(A)), 2),
            vec![]
        );
        assert_eq!(t.snapshot()[0].device, "/dev/sdb1");
    }

    #[test]
    fn a_device_that_changes_to_another_enrolled_uuid_is_detached_then_attached() {
        let mut t = tracker();
        t.observe(seen("/sys/loop0", "/dev/loop0", Some(A)), 1);
        assert_eq!(
            t.observe(seen("/sys/loop0", "/dev/loop0", Some(B)), 2),
            vec![
                detached("offsite-a", A),
                attached("offsite-b", "/dev/loop0", B)
            ]
        );
    }

    #[test]
    fn rescan_reannounces_present_and_detaches_vanished() {
        let mut t = tracker();
        t.observe(seen("/sys/loop0", "/dev/loop0", Some(A)), 1);
        t.observe(seen("/sys/loop1", "/dev/loop1", Some(B)), 1);
        let changes = t.rescan(
            vec![
                seen("/sys/loop0", "/dev/loop0", Some(A)),
                seen("/sys/loop2", "/dev/loop2", None),
            ],
            3,
        );
        assert_eq!(
            changes,
            vec![
                detached("offsite-b", B),
                attached("offsite-a", "/dev/loop0", A)
            ]
        );
        assert_eq!(t.present_count(), 1);
        // A drive found only by the rescan is announced once.
        let changes = t.rescan(
            vec![
                seen("/sys/loop0", "/dev/loop0", Some(A)),
                seen("/sys/loop3", "/dev/loop3", Some(B)),
            ],
            4,
        );
        assert_eq!(
            changes,
            vec![
                attached("offsite-b", "/dev/loop3", B),
                attached("offsite-a", "/dev/loop0", A)
            ]
        );
    }
}
