//! Standard D-Bus errors for what zbus 5 answers in its own words.
//!
//! zbus 5.19 answers a method call whose arguments do not match the
//! method's signature with `org.freedesktop.zbus.Error` (its generated code
//! maps the deserialisation failure itself, before any service code runs),
//! and `Properties.Set` on a read-only property with `UnknownProperty`.
//! Callers such as busctl, gdbus or a replacement service expect the
//! standard names `org.freedesktop.DBus.Error.InvalidArgs` and
//! `org.freedesktop.DBus.Error.PropertyReadOnly`. [`Strict`] wraps an
//! interface and answers those two cases itself, from the interface's own
//! introspection (so it can never disagree with it); everything else is
//! passed through unchanged. `ferry_service::serve` serves every interface
//! through it, and it dereferences to the interface, so callers use it as
//! before.

use std::collections::{HashMap, HashSet};
use std::ops::{Deref, DerefMut};

use zbus::message::{Header, Message};
use zbus::names::{InterfaceName, MemberName};
use zbus::object_server::{DispatchResult2, Interface, SignalEmitter};
use zbus::zvariant::{OwnedValue, Value};
use zbus::{fdo, Connection, ObjectServer};

/// An interface whose wrong calls get the standard D-Bus errors.
pub struct Strict<I> {
    inner: I,
    /// Method name → the signature of its in-arguments.
    methods: HashMap<String, String>,
    /// Properties that cannot be set.
    read_only: HashSet<String>,
}

impl<I: Interface> Strict<I> {
    /// Wraps `inner`, reading its methods and properties from its
    /// introspection.
    pub fn new(inner: I) -> Strict<I> {
        let mut xml = String::new();
        inner.introspect_to_writer(&mut xml, 0);
        let (methods, read_only) = parse(&xml);
        Strict {
            inner,
            methods,
            read_only,
        }
    }
}

impl<I> Deref for Strict<I> {
    type Target = I;
    fn deref(&self) -> &I {
        &self.inner
    }
}

impl<I> DerefMut for Strict<I> {
    fn deref_mut(&mut self) -> &mut I {
        &mut self.inner
    }
}

/// The value of attribute `name` in one XML tag.
fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let end = tag[start..].find('"')?;
    Some(&tag[start..start + end])
}

/// Methods with their in-signatures, and the read-only properties, of
/// zbus's introspection of one interface.
fn parse(xml: &str) -> (HashMap<String, String>, HashSet<String>) {
    let mut methods = HashMap::new();
    let mut read_only = HashSet::new();
    let mut method: Option<String> = None;
    for tag in xml.split('<').skip(1) {
        let tag = tag.split('>').next().unwrap_or("");
        let tag = format!(" {tag}");
        let element = tag.split_whitespace().next().unwrap_or("");
        match element {
            "method" => {
                let name = attribute(&tag, "name").unwrap_or("").to_string();
                methods.insert(name.clone(), String::new());
                method = (!tag.trim_end().ends_with('/')).then_some(name);
            }
            "/method" => method = None,
            "arg" => {
                let Some(name) = &method else { continue };
                let direction = attribute(&tag, "direction").unwrap_or("in");
                if direction == "in" {
                    if let (Some(signature), Some(kind)) =
                        (methods.get_mut(name), attribute(&tag, "type"))
                    {
                        signature.push_str(kind);
                    }
                }
            }
            "property" if attribute(&tag, "access") == Some("read") => {
                if let Some(name) = attribute(&tag, "name") {
                    read_only.insert(name.to_string());
                }
            }
            _ => {}
        }
    }
    (methods, read_only)
}

#[zbus::export::async_trait::async_trait]
impl<I: Interface> Interface for Strict<I> {
    fn name() -> InterfaceName<'static> {
        I::name()
    }

    fn spawn_tasks_for_methods(&self) -> bool {
        self.inner.spawn_tasks_for_methods()
    }

    async fn get(
        &self,
        property_name: &str,
        server: &ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &SignalEmitter<'_>,
    ) -> Option<fdo::Result<OwnedValue>> {
        self.inner
            .get(property_name, server, connection, header, emitter)
            .await
    }

    async fn get_all(
        &self,
        server: &ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &SignalEmitter<'_>,
    ) -> fdo::Result<HashMap<String, OwnedValue>> {
        self.inner
            .get_all(server, connection, header, emitter)
            .await
    }

    fn set<'call>(
        &'call self,
        property_name: &'call str,
        value: &'call Value<'_>,
        server: &'call ObjectServer,
        connection: &'call Connection,
        header: Option<&'call Header<'_>>,
        emitter: &'call SignalEmitter<'_>,
    ) -> DispatchResult2<'call> {
        if self.read_only.contains(property_name) {
            let message = format!(
                "{property_name} of {} is read-only: it shows state; use the interface's methods to change it",
                I::name()
            );
            return DispatchResult2::Async(Box::pin(async move {
                Err(fdo::Error::PropertyReadOnly(message))
            }));
        }
        self.inner
            .set(property_name, value, server, connection, header, emitter)
    }

    async fn set_mut(
        &mut self,
        property_name: &str,
        value: &Value<'_>,
        server: &ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &SignalEmitter<'_>,
    ) -> Option<fdo::Result<()>> {
        self.inner
            .set_mut(property_name, value, server, connection, header, emitter)
            .await
    }

    fn call<'call>(
        &'call self,
        server: &'call ObjectServer,
        connection: &'call Connection,
        msg: &'call Message,
        name: MemberName<'call>,
    ) -> DispatchResult2<'call> {
        if let Some(expected) = self.methods.get(name.as_str()) {
            let body = msg.body();
            let signature = body.signature();
            let given = signature.to_string_no_parens();
            if given != *expected && signature.to_string() != *expected {
                let message = format!(
                    "{}.{name} takes arguments of signature \"{expected}\", not \"{given}\"; see busctl introspect",
                    I::name()
                );
                return DispatchResult2::Async(Box::pin(async move {
                    Err(fdo::Error::InvalidArgs(message))
                }));
            }
        }
        self.inner.call(server, connection, msg, name)
    }

    fn call_mut<'call>(
        &'call mut self,
        server: &'call ObjectServer,
        connection: &'call Connection,
        msg: &'call Message,
        name: MemberName<'call>,
    ) -> DispatchResult2<'call> {
        self.inner.call_mut(server, connection, msg, name)
    }

    fn introspect_to_writer(&self, writer: &mut dyn std::fmt::Write, level: usize) {
        self.inner.introspect_to_writer(writer, level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_in_signatures_and_read_only_properties() {
        let xml = r#"<interface name="org.ferry.Sync1">
  <method name="Start">
    <arg name="drive" type="s" direction="in"/>
  </method>
  <method name="Rescan">
    <arg name="present" type="u" direction="out"/>
  </method>
  <method name="Pair">
    <arg name="a" type="s" direction="in"/>
    <arg name="b" type="a(st)" direction="in"/>
  </method>
  <method name="Ping"/>
  <signal name="SyncFailed">
    <arg name="drive" type="s"/>
  </signal>
  <property name="Running" type="a(sstt)" access="read"/>
  <property name="Level" type="u" access="readwrite"/>
</interface>"#;
        let (methods, read_only) = parse(xml);
        assert_eq!(methods["Start"], "s");
        assert_eq!(methods["Rescan"], "");
        assert_eq!(methods["Pair"], "sa(st)");
        assert_eq!(methods["Ping"], "");
        assert!(!methods.contains_key("SyncFailed"));
        assert!(read_only.contains("Running") && !read_only.contains("Level"));
    }
}
