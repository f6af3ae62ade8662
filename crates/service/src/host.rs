//! The host id borg records in its locks, one definition for ferry-borg and
//! ferry-sync: both must name this machine the same way, or a lock left by a
//! killed borg of one is not recognised as stale by the other.

/// `configured` (`[borg] host-id`) when set, else the machine id (or, on a
/// machine without one, the hostname) followed by `@ferry`. Stable across
/// private network namespaces, unlike borg's default (hostname@pid-based).
pub fn borg_host_id(configured: Option<&str>) -> String {
    if let Some(id) = configured.filter(|id| !id.is_empty()) {
        return id.to_string();
    }
    format!("{}@ferry", machine_name(MACHINE_SOURCES))
}

/// Where the machine's name is read from, in order.
const MACHINE_SOURCES: &[&str] = &[
    "/etc/machine-id",
    "/var/lib/dbus/machine-id",
    "/proc/sys/kernel/hostname",
];

fn machine_name(sources: &[&str]) -> String {
    sources
        .iter()
        .find_map(|p| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_wins_else_the_first_non_empty_source() {
        assert_eq!(borg_host_id(Some("nas@ferry")), "nas@ferry");
        let dir = tempfile::tempdir().expect("dir");
        let empty = dir.path().join("empty");
        let named = dir.path().join("named");
        std::fs::write(&empty, "\n").expect("write");
        std::fs::write(&named, "abc123\n").expect("write");
        let missing = dir.path().join("missing");
        let sources = [
            missing.to_str().expect("utf-8"),
            empty.to_str().expect("utf-8"),
            named.to_str().expect("utf-8"),
        ];
        assert_eq!(machine_name(&sources), "abc123");
        assert_eq!(machine_name(&sources[..2]), "localhost");
        assert!(borg_host_id(None).ends_with("@ferry"));
        assert_eq!(borg_host_id(Some("")), borg_host_id(None));
    }
}
