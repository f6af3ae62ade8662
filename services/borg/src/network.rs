//! "Is the network online?" for a profile's `network-online` precondition.
//!
//! Seed 000's unit waited with `After=network-online.target` and `sleep 1m`;
//! a user unit cannot even order itself after that system target. So the
//! job asks, in this order, whoever knows: NetworkManager's `State` over the
//! system bus (connected to a site or globally counts as online), else
//! systemd's `network-online.target` (active), else — neither on the bus —
//! the kernel's routing table (a default route). The answer is read when
//! the job starts, never polled; an offline network makes the run
//! "unreachable" (skipped and retried, see [`crate::remote`]).

use std::time::Duration;

/// How long the system bus gets to answer.
const BUS_TIMEOUT: Duration = Duration::from_secs(5);
/// NetworkManager's NM_STATE_CONNECTED_SITE: at least the local site.
const NM_CONNECTED_SITE: u32 = 60;

/// Why the network counts as offline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Offline {
    /// NetworkManager's state is below "connected (site)".
    #[error("NetworkManager reports state {0} ({1})")]
    NetworkManager(u32, &'static str),
    /// network-online.target is not active.
    #[error("systemd's network-online.target is {0}")]
    Systemd(String),
    /// No default route in the kernel's routing table.
    #[error("the kernel has no default route (no network link is up)")]
    NoDefaultRoute,
}

/// NetworkManager's `State` as a verdict.
pub fn nm_verdict(state: u32) -> Result<(), Offline> {
    if state >= NM_CONNECTED_SITE {
        return Ok(());
    }
    let name = match state {
        10 => "asleep",
        20 => "disconnected",
        30 => "disconnecting",
        40 => "connecting",
        50 => "connected to the machine only",
        _ => "unknown",
    };
    Err(Offline::NetworkManager(state, name))
}

/// Whether /proc/net/route (IPv4) or /proc/net/ipv6_route have a default route.
pub fn has_default_route(ipv4: &str, ipv6: &str) -> bool {
    let v4 = ipv4.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags …; RTF_UP is flag 0x1.
        fields.get(1) == Some(&"00000000")
            && fields
                .get(3)
                .and_then(|f| u32::from_str_radix(f, 16).ok())
                .is_some_and(|flags| flags & 1 == 1)
    });
    let v6 = ipv6.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // dest, dest prefix length, …, device last; skip loopback.
        fields.first() == Some(&"00000000000000000000000000000000")
            && fields.get(1) == Some(&"00")
            && fields.last().is_some_and(|dev| *dev != "lo")
    });
    v4 || v6
}

/// Asks who knows whether the network is online (see the module docs).
pub async fn online() -> Result<(), Offline> {
    if let Ok(Ok(bus)) = tokio::time::timeout(BUS_TIMEOUT, zbus::Connection::system()).await {
        if let Some(answer) = ask_bus(&bus).await {
            return answer;
        }
    }
    let ipv4 = tokio::fs::read_to_string("/proc/net/route")
        .await
        .unwrap_or_default();
    let ipv6 = tokio::fs::read_to_string("/proc/net/ipv6_route")
        .await
        .unwrap_or_default();
    if has_default_route(&ipv4, &ipv6) {
        Ok(())
    } else {
        Err(Offline::NoDefaultRoute)
    }
}

/// NetworkManager's, else systemd's answer; `None` when neither is there.
async fn ask_bus(bus: &zbus::Connection) -> Option<Result<(), Offline>> {
    let ask = async {
        let dbus = zbus::fdo::DBusProxy::new(bus).await.ok()?;
        let has = |name: &'static str| {
            let dbus = dbus.clone();
            async move {
                let name = zbus::names::BusName::try_from(name).ok()?;
                dbus.name_has_owner(name).await.ok()
            }
        };
        if has("org.freedesktop.NetworkManager").await == Some(true) {
            let state: u32 = property(
                bus,
                "org.freedesktop.NetworkManager",
                "/org/freedesktop/NetworkManager",
                "org.freedesktop.NetworkManager",
                "State",
            )
            .await?;
            return Some(nm_verdict(state));
        }
        if has("org.freedesktop.systemd1").await == Some(true) {
            let reply = bus
                .call_method(
                    Some("org.freedesktop.systemd1"),
                    "/org/freedesktop/systemd1",
                    Some("org.freedesktop.systemd1.Manager"),
                    "LoadUnit",
                    &("network-online.target",),
                )
                .await
                .ok()?;
            let unit: zbus::zvariant::OwnedObjectPath = reply.body().deserialize().ok()?;
            let state: String = property(
                bus,
                "org.freedesktop.systemd1",
                unit.as_str(),
                "org.freedesktop.systemd1.Unit",
                "ActiveState",
            )
            .await?;
            return Some(if state == "active" {
                Ok(())
            } else {
                Err(Offline::Systemd(state))
            });
        }
        None
    };
    tokio::time::timeout(BUS_TIMEOUT, ask).await.ok().flatten()
}

async fn property<T>(
    bus: &zbus::Connection,
    destination: &str,
    path: &str,
    interface: &str,
    name: &str,
) -> Option<T>
where
    T: TryFrom<zbus::zvariant::OwnedValue>,
{
    let reply = bus
        .call_method(
            Some(destination),
            path,
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &(interface, name),
        )
        .await
        .ok()?;
    let value: zbus::zvariant::OwnedValue = reply.body().deserialize().ok()?;
    T::try_from(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_manager_states() {
        assert_eq!(nm_verdict(70), Ok(()));
        assert_eq!(
            nm_verdict(60),
            Ok(()),
            "a LAN server is reachable at site level"
        );
        let e = nm_verdict(40).unwrap_err();
        assert!(e.to_string().contains("connecting"), "{e}");
        assert!(nm_verdict(20).is_err());
    }

    #[test]
    fn default_routes() {
        let header =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";
        let with = format!("{header}eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n");
        let link_only =
            format!("{header}eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n");
        assert!(has_default_route(&with, ""));
        assert!(!has_default_route(&link_only, ""));
        assert!(!has_default_route(header, ""));
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 wlan0\n";
        assert!(has_default_route(header, v6));
        let v6_lo = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n";
        assert!(!has_default_route(header, v6_lo));
    }
}
