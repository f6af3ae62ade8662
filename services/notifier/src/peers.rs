//! What the notifier reads of its peers on the bus (and of ferry-crypt's
//! health ledger on disk), for the domain's [`Needs`], a restart's
//! [`Found`] and the metrics' [`metrics::Snapshot`]. Every call has a
//! timeout; a peer that is not there, or does not answer in time, reads as
//! nothing, so the notifier goes on without it.

use ferry_service::peer_answer;
use std::path::PathBuf;

use ferry_interfaces::{borg, crypt, sync, DriveVerification, Failure, FailureEvent, SyncRecord};
use ferry_service::health_ledger::{self, HealthRecord};

use crate::domain::{Found, Looked, Needs, PeerFailures, Profiles};
use crate::events::Source;
use crate::metrics;

/// The peers on one connection.
#[derive(Clone)]
pub struct Peers {
    connection: zbus::Connection,
    /// Where ferry-crypt keeps its health ledger.
    health: PathBuf,
}

/// Builds the proxy `$proxy` without a property cache, or returns `$none`.
macro_rules! proxy {
    ($self:ident, $proxy:ty, $none:expr) => {
        match <$proxy>::builder(&$self.connection)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
        {
            Ok(proxy) => proxy,
            Err(_) => return $none,
        }
    };
    ($self:ident, $proxy:ty) => {
        proxy!($self, $proxy, {})
    };
}

impl Peers {
    /// The peers on `connection`; ferry-crypt's health ledger under `state`.
    pub fn new(connection: zbus::Connection, state: &std::path::Path) -> Peers {
        Peers {
            connection,
            health: health_ledger::path(state),
        }
    }

    /// What the domain asked for.
    pub async fn look(&self, needs: Needs) -> Looked {
        let mut looked = Looked::default();
        if let Some(source) = needs.history {
            looked.history = self.history(source).await;
        }
        if needs.profiles {
            looked.profiles = self.profiles().await;
        }
        if needs.syncs {
            looked.syncs = self.last_syncs().await.unwrap_or_default();
            looked.verification = self.verification().await.unwrap_or_default();
        }
        if let Some(drive) = needs.health {
            looked.health = self.health(&drive).await;
        }
        looked
    }

    /// What a restart needs: syncs, profiles, and each peer's failures.
    pub async fn found(&self) -> Found {
        let mut failures = Vec::new();
        for source in [Source::Crypt, Source::Sync, Source::Borg] {
            let reported = match self.history(source).await {
                Some(history) => PeerFailures::History(history),
                None => match self.last_failures(source).await {
                    Some(last) => PeerFailures::Last(last),
                    None => PeerFailures::Absent,
                },
            };
            failures.push((source, reported));
        }
        Found {
            syncs: self.last_syncs().await.unwrap_or_default(),
            profiles: self.profiles().await,
            failures,
        }
    }

    /// `source`'s FailureHistory; None when the peer is not there or has
    /// none (an older or replacement service).
    async fn history(&self, source: Source) -> Option<Vec<FailureEvent>> {
        match source {
            Source::Crypt => {
                peer_answer(proxy!(self, crypt::CryptProxy<'_>, None).failure_history()).await
            }
            Source::Sync => {
                peer_answer(proxy!(self, sync::SyncProxy<'_>, None).failure_history()).await
            }
            Source::Borg => {
                peer_answer(proxy!(self, borg::BorgProxy<'_>, None).failure_history()).await
            }
        }
    }

    /// `source`'s LastFailures.
    async fn last_failures(&self, source: Source) -> Option<Vec<Failure>> {
        match source {
            Source::Crypt => {
                peer_answer(proxy!(self, crypt::CryptProxy<'_>, None).last_failures()).await
            }
            Source::Sync => {
                peer_answer(proxy!(self, sync::SyncProxy<'_>, None).last_failures()).await
            }
            Source::Borg => {
                peer_answer(proxy!(self, borg::BorgProxy<'_>, None).last_failures()).await
            }
        }
    }

    /// Sync1.Verification.
    pub async fn verification(&self) -> Option<Vec<DriveVerification>> {
        peer_answer(proxy!(self, sync::SyncProxy<'_>, None).verification()).await
    }

    async fn last_syncs(&self) -> Option<Vec<SyncRecord>> {
        peer_answer(proxy!(self, sync::SyncProxy<'_>, None).last_syncs()).await
    }

    /// Borg1's LastResults and Schedule; None when Borg1 is not there.
    async fn profiles(&self) -> Option<Profiles> {
        let proxy = proxy!(self, borg::BorgProxy<'_>, None);
        let results = peer_answer(proxy.last_results()).await?;
        let schedule = peer_answer(proxy.schedule()).await.unwrap_or_default();
        Some(Profiles { results, schedule })
    }

    /// ferry-crypt's health record of `drive` (read off the runtime).
    async fn health(&self, drive: &str) -> Option<HealthRecord> {
        let path = self.health.clone();
        let read = tokio::task::spawn_blocking(move || health_ledger::load(&path))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match read {
            Ok(mut all) => all.remove(drive),
            Err(e) => {
                tracing::warn!("{drive}: cannot look at its health: {e}");
                None
            }
        }
    }

    /// The peers' figures for the metrics, added to `s`.
    pub async fn figures(&self, s: &mut metrics::Snapshot) {
        self.profile_figures(s).await;
        self.drive_figures(s).await;
    }

    async fn profile_figures(&self, s: &mut metrics::Snapshot) {
        let proxy = proxy!(self, borg::BorgProxy<'_>);
        let results = peer_answer(proxy.last_results()).await.unwrap_or_default();
        let schedule = peer_answer(proxy.schedule()).await.unwrap_or_default();
        let failures = peer_answer(proxy.last_failures()).await.unwrap_or_default();
        metrics::add_profiles(s, &results, &schedule, &failures);
        for name in metrics::profiles_with_success(s) {
            let sizes = peer_answer(proxy.get_stats(&name))
                .await
                .and_then(|json| metrics::archive_sizes(&json));
            if let (Some((original, dedup)), Some(f)) = (sizes, s.profiles.get_mut(&name)) {
                f.original_bytes = Some(original);
                f.deduplicated_bytes = Some(dedup);
            }
        }
    }

    async fn drive_figures(&self, s: &mut metrics::Snapshot) {
        let syncs = self.last_syncs().await.unwrap_or_default();
        let sync_failures = self.last_failures(Source::Sync).await.unwrap_or_default();
        let crypt_failures = self.last_failures(Source::Crypt).await.unwrap_or_default();
        metrics::add_drives(s, &syncs, sync_failures.iter().chain(&crypt_failures));
    }
}
