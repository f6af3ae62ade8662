//! Stand-ins for ferry-sync's and ferry-borg's persisted properties, for
//! the notifier's tests (what it reads at start and for the metrics): the
//! real services would need drives and repositories to have these results.

use ferry_integration_tests::TestBus;
use ferry_interfaces::{BackupResult, Failure, ScheduleEntry, SyncRecord};

/// Sync1's LastSyncs and LastFailures.
pub struct FakeSync {
    pub last_syncs: Vec<SyncRecord>,
    pub last_failures: Vec<Failure>,
}

#[zbus::interface(name = "org.ferry.Sync1")]
impl FakeSync {
    #[zbus(property)]
    fn last_syncs(&self) -> Vec<SyncRecord> {
        self.last_syncs.clone()
    }
    #[zbus(property)]
    fn last_failures(&self) -> Vec<Failure> {
        self.last_failures.clone()
    }
}

/// Borg1's LastResults, Schedule, LastFailures and GetStats (`stats`, the
/// JSON borg create printed).
pub struct FakeBorg {
    pub results: Vec<BackupResult>,
    pub schedule: Vec<ScheduleEntry>,
    pub last_failures: Vec<Failure>,
    pub stats: String,
}

#[zbus::interface(name = "org.ferry.Borg1")]
impl FakeBorg {
    #[zbus(property)]
    fn last_results(&self) -> Vec<BackupResult> {
        self.results.clone()
    }
    #[zbus(property)]
    fn schedule(&self) -> Vec<ScheduleEntry> {
        self.schedule.clone()
    }
    #[zbus(property)]
    fn last_failures(&self) -> Vec<Failure> {
        self.last_failures.clone()
    }
    fn get_stats(&self, _profile: &str) -> String {
        self.stats.clone()
    }
}

/// Serves `object` at `path` under bus name `name` on its own connection.
pub async fn serve<I: zbus::object_server::Interface>(
    bus: &TestBus,
    name: &str,
    path: &str,
    object: I,
) -> zbus::Connection {
    zbus::connection::Builder::address(bus.address())
        .expect("address")
        .name(name.to_string())
        .expect("name")
        .serve_at(path.to_string(), object)
        .expect("serve")
        .build()
        .await
        .expect("fake peer")
}
