//! The contract holds together: every XML file parses, names the interface its
//! module says, and every proxy talks to the names its module defines.

use ferry_interfaces::zbus::proxy::Defaults;
use ferry_interfaces::{borg, crypt, drive_watcher, led, notifier, sync};

fn defaults<P: Defaults>() -> (String, String, String) {
    let text = |v: Option<String>| v.expect("proxy has a default");
    (
        text(P::INTERFACE.as_ref().map(|n| n.to_string())),
        text(P::DESTINATION.as_ref().map(|n| n.to_string())),
        text(P::PATH.as_ref().map(|n| n.to_string())),
    )
}

#[test]
fn proxies_agree_with_constants() {
    let cases = [
        (
            defaults::<drive_watcher::DriveWatcherProxy<'_>>(),
            drive_watcher::INTERFACE,
            drive_watcher::OBJECT_PATH,
        ),
        (
            defaults::<crypt::CryptProxy<'_>>(),
            crypt::INTERFACE,
            crypt::OBJECT_PATH,
        ),
        (
            defaults::<sync::SyncProxy<'_>>(),
            sync::INTERFACE,
            sync::OBJECT_PATH,
        ),
        (
            defaults::<borg::BorgProxy<'_>>(),
            borg::INTERFACE,
            borg::OBJECT_PATH,
        ),
        (
            defaults::<led::LedProxy<'_>>(),
            led::INTERFACE,
            led::OBJECT_PATH,
        ),
        (
            defaults::<notifier::NotifierProxy<'_>>(),
            notifier::INTERFACE,
            notifier::OBJECT_PATH,
        ),
    ];
    for ((interface, destination, path), name, object_path) in cases {
        assert_eq!(interface, name);
        assert_eq!(destination, name, "bus name equals interface name");
        assert_eq!(path, object_path);
        assert_eq!(path, format!("/{}", name.replace('.', "/")));
    }
}

#[test]
fn every_xml_parses_and_names_its_interface() {
    for (name, _path, xml) in ferry_interfaces::ALL {
        let node = zbus_xml::Node::from_reader(xml.as_bytes())
            .unwrap_or_else(|e| panic!("{name}: XML does not parse: {e}"));
        let names: Vec<String> = node
            .interfaces()
            .iter()
            .map(|i| i.name().to_string())
            .collect();
        assert_eq!(
            names,
            vec![name.to_string()],
            "{name}: one interface, named after the module"
        );
        let interface = &node.interfaces()[0];
        assert!(
            !interface.methods().is_empty() || !interface.signals().is_empty(),
            "{name}: an interface with no members"
        );
    }
}

#[test]
fn every_member_is_documented() {
    // udisks2 style: a comment precedes every method, property and signal.
    for (name, _path, xml) in ferry_interfaces::ALL {
        let lines: Vec<&str> = xml.lines().map(str::trim).collect();
        for (i, line) in lines.iter().enumerate() {
            let is_member = ["<method ", "<property ", "<signal "]
                .iter()
                .any(|m| line.starts_with(m));
            if !is_member {
                continue;
            }
            let previous = lines[..i]
                .iter()
                .rev()
                .find(|l| !l.is_empty())
                .copied()
                .unwrap_or("");
            assert!(
                previous.ends_with("-->"),
                "{name}: `{line}` has no doc comment before it"
            );
            let member = line.split('"').nth(1).unwrap_or_default();
            let comment_start = lines[..i]
                .iter()
                .rposition(|l| l.starts_with("<!--"))
                .unwrap_or(0);
            let comment = lines[comment_start..i].join(" ");
            assert!(
                comment.contains(member),
                "{name}: the comment before `{line}` does not name {member}"
            );
            // Every argument of a method or signal is documented as @arg.
            let mut j = i + 1;
            while j < lines.len() && lines[j].starts_with("<arg ") {
                let arg = lines[j].split('"').nth(1).unwrap_or_default();
                assert!(
                    comment.contains(&format!("@{arg}")),
                    "{name}.{member}: argument {arg} is undocumented"
                );
                j += 1;
            }
        }
    }
}
