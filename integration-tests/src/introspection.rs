//! Checking a running service's introspection against the contract XML.

use zbus::Connection;
use zbus_xml::{Arg, ArgDirection, Interface, Node, PropertyAccess};

use crate::METHOD_TIMEOUT;

/// Compare interface `interface` in `expected_xml` (the contract) with the
/// same interface in `actual_xml` (what a service reports): methods (name;
/// arguments' name, type and direction, in order), properties (name, type,
/// access) and signals (name; arguments' name and type, in order).
/// Annotations, docs and other interfaces are ignored. `Err` lists every
/// difference, one per line: missing, extra or changed.
pub fn compare(expected_xml: &str, actual_xml: &str, interface: &str) -> Result<(), String> {
    let expected = Node::from_reader(expected_xml.as_bytes())
        .map_err(|e| format!("the expected XML does not parse: {e}"))?;
    let actual = Node::from_reader(actual_xml.as_bytes())
        .map_err(|e| format!("the actual XML does not parse: {e}"))?;
    let expected = find(&expected, interface)
        .ok_or_else(|| format!("the expected XML has no interface {interface}"))?;
    let actual = find(&actual, interface).ok_or_else(|| {
        format!(
            "interface {interface} is missing (the object has: {})",
            names(&actual)
        )
    })?;

    let mut diffs = Vec::new();
    let methods = |i: &Interface| -> Vec<(String, Vec<String>)> {
        i.methods()
            .iter()
            .map(|m| {
                let args = m.args().iter().map(|a| describe(a, true)).collect();
                (m.name().to_string(), args)
            })
            .collect()
    };
    diff_members("method", &methods(expected), &methods(actual), &mut diffs);

    let properties = |i: &Interface| -> Vec<(String, Vec<String>)> {
        i.properties()
            .iter()
            .map(|p| {
                let access = match p.access() {
                    PropertyAccess::Read => "read",
                    PropertyAccess::Write => "write",
                    PropertyAccess::ReadWrite => "readwrite",
                };
                let detail = format!("type {}, access {access}", p.ty().inner());
                (p.name().to_string(), vec![detail])
            })
            .collect()
    };
    diff_members(
        "property",
        &properties(expected),
        &properties(actual),
        &mut diffs,
    );

    let signals = |i: &Interface| -> Vec<(String, Vec<String>)> {
        i.signals()
            .iter()
            .map(|s| {
                let args = s.args().iter().map(|a| describe(a, false)).collect();
                (s.name().to_string(), args)
            })
            .collect()
    };
    diff_members("signal", &signals(expected), &signals(actual), &mut diffs);

    if diffs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{interface} differs from the contract:\n{}",
            diffs
                .iter()
                .map(|d| format!("  - {d}"))
                .collect::<Vec<_>>()
                .join("\n")
        ))
    }
}

fn find<'a, 'n>(node: &'n Node<'a>, interface: &str) -> Option<&'n Interface<'a>> {
    node.interfaces().iter().find(|i| i.name() == interface)
}

fn names(node: &Node) -> String {
    let names: Vec<String> = node
        .interfaces()
        .iter()
        .map(|i| i.name().to_string())
        .collect();
    if names.is_empty() {
        "no interfaces".into()
    } else {
        names.join(", ")
    }
}

/// `` `name` type (in|out) ``; method args without a direction are "in".
fn describe(arg: &Arg, with_direction: bool) -> String {
    let name = arg
        .name()
        .map(|n| format!("`{n}`"))
        .unwrap_or_else(|| "(unnamed)".into());
    if with_direction {
        let dir = match arg.direction() {
            Some(ArgDirection::Out) => "out",
            _ => "in",
        };
        format!("{name} {} ({dir})", arg.ty().inner())
    } else {
        format!("{name} {}", arg.ty().inner())
    }
}

/// Members are compared by name; their details (args, type) in order.
fn diff_members(
    kind: &str,
    expected: &[(String, Vec<String>)],
    actual: &[(String, Vec<String>)],
    diffs: &mut Vec<String>,
) {
    let details_word = if kind == "property" { "" } else { "argument " };
    for (name, want) in expected {
        let Some((_, got)) = actual.iter().find(|(n, _)| n == name) else {
            diffs.push(format!("missing {kind} {name}"));
            continue;
        };
        for i in 0..want.len().max(got.len()) {
            match (want.get(i), got.get(i)) {
                (Some(w), Some(g)) if w != g => diffs.push(if details_word.is_empty() {
                    format!("{kind} {name} changed: expected {w}, actual {g}")
                } else {
                    format!("{kind} {name} {details_word}{i} changed: expected {w}, actual {g}")
                }),
                (Some(w), None) => {
                    diffs.push(format!("{kind} {name} is missing {details_word}{i}: {w}"))
                }
                (None, Some(g)) => {
                    diffs.push(format!("{kind} {name} has extra {details_word}{i}: {g}"))
                }
                _ => {}
            }
        }
    }
    for (name, _) in actual {
        if !expected.iter().any(|(n, _)| n == name) {
            diffs.push(format!("extra {kind} {name}"));
        }
    }
}

/// The introspection XML of `path` on `bus_name`
/// (`org.freedesktop.DBus.Introspectable.Introspect`); panics on error or
/// after [`METHOD_TIMEOUT`].
pub async fn introspect(conn: &Connection, bus_name: &str, path: &str) -> String {
    let call = async {
        zbus::fdo::IntrospectableProxy::builder(conn)
            .destination(bus_name)?
            .path(path)?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?
            .introspect()
            .await
            .map_err(zbus::Error::from)
    };
    match tokio::time::timeout(METHOD_TIMEOUT, call).await {
        Ok(Ok(xml)) => xml,
        Ok(Err(e)) => panic!("introspecting {path} on {bus_name}: {e}"),
        Err(_) => panic!("introspecting {path} on {bus_name} timed out"),
    }
}

/// Introspect the running service that owns `interface` (its bus name) at
/// its object path, and panic with the differences if it does not match
/// the contract XML in `ferry_interfaces::ALL`.
pub async fn assert_matches_contract(conn: &Connection, interface: &str) {
    let (_, path, xml) = ferry_interfaces::ALL
        .iter()
        .find(|(name, _, _)| *name == interface)
        .unwrap_or_else(|| panic!("{interface} is not one of ferry's interfaces"));
    let actual = introspect(conn, interface, path).await;
    if let Err(diff) = compare(xml, &actual, interface) {
        panic!("{diff}\n\nthe service reported:\n{actual}");
    }
}

/// Calls the running service that owns `interface` the wrong way and
/// checks it answers with the standard D-Bus errors: every method called
/// with arguments of the wrong signature gets
/// `org.freedesktop.DBus.Error.InvalidArgs`, and `Properties.Set` on every
/// read-only property `org.freedesktop.DBus.Error.PropertyReadOnly`.
pub async fn assert_standard_errors(conn: &Connection, interface: &str) {
    let (_, path, xml) = ferry_interfaces::ALL
        .iter()
        .find(|(name, _, _)| *name == interface)
        .unwrap_or_else(|| panic!("{interface} is not one of ferry's interfaces"));
    let node = Node::from_reader(xml.as_bytes()).expect("contract XML");
    let contract = find(&node, interface).expect("interface in its XML");
    let error_name = |result: zbus::Result<zbus::Message>| match result {
        Err(zbus::Error::MethodError(name, _, _)) => name.to_string(),
        Err(e) => format!("<{e}>"),
        Ok(_) => "<a reply>".to_string(),
    };
    // No ferry method takes two 64-bit floats.
    let wrong = (0.5f64, 0.25f64);
    for method in contract.methods() {
        let name = method.name().to_string();
        let result = tokio::time::timeout(
            METHOD_TIMEOUT,
            conn.call_method(
                Some(interface),
                *path,
                Some(interface),
                name.as_str(),
                &wrong,
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("{interface}.{name} did not answer"));
        assert_eq!(
            error_name(result),
            "org.freedesktop.DBus.Error.InvalidArgs",
            "{interface}.{name} called with (dd)"
        );
    }
    for property in contract.properties() {
        if property.access() != PropertyAccess::Read {
            continue;
        }
        let name = property.name().to_string();
        let value = zbus::zvariant::Value::from(0u32);
        let result = tokio::time::timeout(
            METHOD_TIMEOUT,
            conn.call_method(
                Some(interface),
                *path,
                Some("org.freedesktop.DBus.Properties"),
                "Set",
                &(interface, name.as_str(), value),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("Set {interface}.{name} did not answer"));
        assert_eq!(
            error_name(result),
            "org.freedesktop.DBus.Error.PropertyReadOnly",
            "Set on the read-only {interface}.{name}"
        );
    }
}
