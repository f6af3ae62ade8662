//! Which enrolled drives are present, decided from udev observations.
//!
//! Pure logic, no udev or bus: the service feeds it what udev reports and
//! announces what it returns. It is where the rules live: only enrolled
//! UUIDs count, a repeated change event announces nothing, a device that
//! loses its UUID (a loop device detached, a wiped signature) or is removed
//! is detached, and a second device claiming an attached drive's UUID is
//! not announced twice but kept: when the announced one goes, the other is
//! announced (a clone plugged in first must not hide the real drive).

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
    /// Order of appearance: the earliest waiting device is announced next.
    order: u64,
}

/// The enrolled drives and which devices carry them.
///
/// Every device carrying an enrolled UUID is tracked, not only the one
/// announced: a UUID can be copied, so a clone may come first and the real
/// drive second. One device per drive is announced (the holder); when it
/// goes, the drive is detached and the earliest other device with that
/// UUID is announced in its place, with no manual step.
#[derive(Debug)]
pub struct Tracker {
    enrolled: Vec<(Name, String)>,
    /// Every present device carrying an enrolled UUID, by syspath.
    present: BTreeMap<String, Present>,
    /// The announced device of each drive: drive name → syspath.
    holders: BTreeMap<String, String>,
    /// The next appearance number.
    next_order: u64,
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
            holders: BTreeMap::new(),
            next_order: 0,
        }
    }

    fn enrolled_drive(&self, uuid: &str) -> Option<&Name> {
        self.enrolled
            .iter()
            .find(|(_, u)| u.eq_ignore_ascii_case(uuid))
            .map(|(n, _)| n)
    }

    /// Removes a device; if it was its drive's announced one, the drive is
    /// detached. Returns the drive that lost its holder, if any.
    fn forget(&mut self, syspath: &str, changes: &mut Vec<Change>) -> Option<String> {
        let gone = self.present.remove(syspath)?;
        if self.holders.get(&gone.drive).map(String::as_str) != Some(syspath) {
            return None;
        }
        self.holders.remove(&gone.drive);
        changes.push(Change::Detached {
            drive: gone.drive.clone(),
            uuid: gone.uuid,
        });
        Some(gone.drive)
    }

    /// Announces the earliest waiting device of `drive`, if there is one
    /// and the drive has no holder.
    fn promote(&mut self, drive: &str, changes: &mut Vec<Change>) {
        if self.holders.contains_key(drive) {
            return;
        }
        let next = self
            .present
            .iter()
            .filter(|(_, p)| p.drive == drive)
            .min_by_key(|(_, p)| p.order)
            .map(|(s, p)| (s.clone(), p.clone()));
        if let Some((syspath, p)) = next {
            tracing::info!(
                "{:?} also carries the UUID of drive {drive} and is still attached; announcing it now",
                p.device
            );
            self.holders.insert(drive.to_string(), syspath);
            changes.push(Change::Attached {
                drive: p.drive,
                device: p.device,
                uuid: p.uuid,
            });
        }
    }

    /// Adds a device carrying `drive`'s UUID; announces it when the drive
    /// has no announced device yet.
    fn add(
        &mut self,
        observation: Observation,
        drive: String,
        uuid: String,
        now: u64,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        let order = self.next_order;
        self.next_order += 1;
        match self.holders.get(&drive) {
            Some(holder) => {
                let holder = self
                    .present
                    .get(holder)
                    .map(|p| p.device.clone())
                    .unwrap_or_default();
                tracing::warn!(
                    "{:?} carries the UUID of drive {drive}, which is already attached as {holder:?}; not announcing it while that one is attached (a cloned drive?)",
                    observation.device
                );
            }
            None => {
                self.holders
                    .insert(drive.clone(), observation.syspath.clone());
                changes.push(Change::Attached {
                    drive: drive.clone(),
                    device: observation.device.clone(),
                    uuid: uuid.clone(),
                });
            }
        }
        self.present.insert(
            observation.syspath,
            Present {
                drive,
                uuid,
                device: observation.device,
                since: now,
                order,
            },
        );
        changes
    }

    fn matched(&self, observation: &Observation) -> Option<(String, String)> {
        match (&observation.uuid, observation.removed) {
            (Some(uuid), false) => self
                .enrolled_drive(uuid)
                .map(|n| (n.to_string(), uuid.clone())),
            _ => None,
        }
    }

    /// Applies one udev event; returns what to announce.
    pub fn observe(&mut self, observation: Observation, now: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        let matched = self.matched(&observation);
        let mut lost = None;
        if let Some(previous) = self.present.get(&observation.syspath) {
            if matched
                .as_ref()
                .is_some_and(|(drive, _)| *drive == previous.drive)
            {
                return changes; // a repeated change event for a known device
            }
            lost = self.forget(&observation.syspath, &mut changes);
        }
        if let Some((drive, uuid)) = matched {
            changes.extend(self.add(observation, drive, uuid, now));
        }
        if let Some(drive) = lost {
            self.promote(&drive, &mut changes);
        }
        changes
    }

    /// Replaces what is known with a full enumeration (only ever a
    /// successful one: a failed enumeration must not detach anything).
    /// Devices gone since are forgotten, drives whose announced device went
    /// are detached (or announced with another device carrying their UUID),
    /// and every present drive is announced again, so a subscriber that
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
        let mut lost = Vec::new();
        for syspath in gone {
            lost.extend(self.forget(&syspath, &mut changes));
        }
        for device in devices {
            if !self.present.contains_key(&device.syspath) {
                // New devices go through the same rules as hotplug (and are announced there).
                changes.extend(self.observe(device, now));
            }
        }
        for drive in lost {
            self.promote(&drive, &mut changes);
        }
        let announced: Vec<String> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Attached { drive, .. } => Some(drive.clone()),
                Change::Detached { .. } => None,
            })
            .collect();
        for (drive, syspath) in &self.holders {
            let Some(p) = self.present.get(syspath) else {
                continue;
            };
            if !announced.contains(drive) {
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

    /// How many enrolled drives are present (announced).
    pub fn present_count(&self) -> usize {
        self.holders.len()
    }

    /// The Drives property: every enrolled drive, sorted by name, with the
    /// device it was announced as.
    pub fn snapshot(&self) -> Vec<WatchedDrive> {
        self.enrolled
            .iter()
            .map(|(name, uuid)| {
                let present = self
                    .holders
                    .get(name.as_str())
                    .and_then(|s| self.present.get(s));
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

    #[test]
    fn a_clone_plugged_in_first_does_not_hide_the_real_drive() {
        let mut t = tracker();
        assert_eq!(
            t.observe(seen("/sys/clone", "/dev/sdc1", Some(A)), 1),
            vec![attached("offsite-a", "/dev/sdc1", A)]
        );
        assert_eq!(
            t.observe(seen("/sys/real", "/dev/sdb1", Some(A)), 2),
            vec![]
        );
        let mut pulled = seen("/sys/clone", "/dev/sdc1", Some(A));
        pulled.removed = true;
        assert_eq!(
            t.observe(pulled, 3),
            vec![
                detached("offsite-a", A),
                attached("offsite-a", "/dev/sdb1", A)
            ]
        );
        assert_eq!(t.snapshot()[0].device, "/dev/sdb1");
        // The waiting device going first changes nothing on the bus.
        t.observe(seen("/sys/third", "/dev/sdd1", Some(A)), 4);
        let mut third = seen("/sys/third", "/dev/sdd1", Some(A));
        third.removed = true;
        assert_eq!(t.observe(third, 5), vec![]);
        assert_eq!(t.snapshot()[0].device, "/dev/sdb1");
    }

    #[test]
    fn rescan_announces_the_other_device_when_the_announced_one_vanished() {
        let mut t = tracker();
        t.observe(seen("/sys/clone", "/dev/sdc1", Some(A)), 1);
        t.observe(seen("/sys/real", "/dev/sdb1", Some(A)), 2);
        let changes = t.rescan(vec![seen("/sys/real", "/dev/sdb1", Some(A))], 3);
        assert_eq!(
            changes,
            vec![
                detached("offsite-a", A),
                attached("offsite-a", "/dev/sdb1", A)
            ]
        );
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        /// One udev event: a device (of four) gets a UUID (A, B, an unknown
        /// one or none) or is removed; or a full rescan.
        #[derive(Debug, Clone)]
        enum Step {
            Event {
                device: usize,
                uuid: Option<u8>,
                removed: bool,
            },
            Rescan,
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                4 => (0usize..4, proptest::option::of(0u8..3), any::<bool>())
                    .prop_map(|(device, uuid, removed)| Step::Event { device, uuid, removed }),
                1 => Just(Step::Rescan),
            ]
        }

        fn uuid_of(code: u8) -> &'static str {
            match code {
                0 => A,
                1 => B,
                _ => "99999999-0000-0000-0000-000000000000",
            }
        }

        proptest! {
            /// Whatever the order of plugging, unplugging, clones and
            /// rescans: a drive is announced exactly while some device
            /// carries its UUID, as one of those devices, and the bus
            /// never hears of a second device without a detach between.
            #[test]
            fn announced_iff_some_device_carries_the_uuid(steps in proptest::collection::vec(step(), 1..60)) {
                let mut t = tracker();
                // The truth: device index -> UUID it carries now.
                let mut truth: BTreeMap<usize, &'static str> = BTreeMap::new();
                // What the bus was told: drive -> device node.
                let mut told: BTreeMap<String, String> = BTreeMap::new();
                for (now, step) in steps.into_iter().enumerate() {
                    let changes = match step {
                        Step::Event { device, uuid, removed } => {
                            let uuid = uuid.map(uuid_of);
                            match (uuid, removed) {
                                (Some(u), false) => { truth.insert(device, u); }
                                _ => { truth.remove(&device); }
                            }
                            let mut o = seen(&format!("/sys/d{device}"), &format!("/dev/d{device}"), uuid);
                            o.removed = removed;
                            t.observe(o, now as u64)
                        }
                        Step::Rescan => {
                            let all = (0..4)
                                .map(|d| seen(&format!("/sys/d{d}"), &format!("/dev/d{d}"), truth.get(&d).copied()))
                                .collect();
                            t.rescan(all, now as u64)
                        }
                    };
                    for change in changes {
                        match change {
                            Change::Attached { drive, device, .. } => {
                                if let Some(before) = told.get(&drive) {
                                    prop_assert_eq!(before, &device, "a second device announced without a detach");
                                }
                                told.insert(drive, device);
                            }
                            Change::Detached { drive, .. } => {
                                prop_assert!(told.remove(&drive).is_some(), "detached {} that was never attached", drive);
                            }
                        }
                    }
                    for (drive, uuid) in [("offsite-a", A), ("offsite-b", B)] {
                        let carriers: Vec<String> = truth
                            .iter()
                            .filter(|(_, u)| **u == uuid)
                            .map(|(d, _)| format!("/dev/d{d}"))
                            .collect();
                        match told.get(drive) {
                            Some(device) => prop_assert!(carriers.contains(device), "{} announced as {} which does not carry it", drive, device),
                            None => prop_assert!(carriers.is_empty(), "{} not announced although {:?} carry it", drive, carriers),
                        }
                        let snapshot = t.snapshot().into_iter().find(|w| w.name == drive).expect("enrolled");
                        prop_assert_eq!(snapshot.attached, told.contains_key(drive));
                        prop_assert_eq!(snapshot.device, told.get(drive).cloned().unwrap_or_default());
                    }
                }
            }
        }
    }
}
