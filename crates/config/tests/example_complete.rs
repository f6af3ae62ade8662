//! `examples/ferry.toml` promises to show every option. This test holds it to
//! that: it lists every key the schema accepts — by walking the serde
//! `Deserialize` impls themselves, so a field added to a struct is seen
//! without anyone updating a list — and fails naming each key the example
//! does not show (set, or commented out as `# key = …`).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;

use ferry_config::Config;
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::Deserialize;

/// What sits at one key path of the schema.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// A table with these keys.
    Table(Vec<&'static str>),
    /// A table of named entries (`[drives.<name>]`): its keys are names.
    Named,
    /// A value.
    Value,
}

/// The walk stops at the node it was sent to; any error ends one attempt.
#[derive(Debug)]
struct Stop;
impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stop")
    }
}
impl std::error::Error for Stop {}
impl de::Error for Stop {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Stop
    }
}

/// A deserializer that follows `target` from the root and records what kind
/// of node it finds at its end.
struct Walk<'a> {
    target: &'a [String],
    found: &'a RefCell<Option<Node>>,
}

impl<'a> Walk<'a> {
    fn deeper(&self) -> Walk<'a> {
        Walk {
            target: &self.target[1..],
            found: self.found,
        }
    }
    fn value<T>(self) -> Result<T, Stop> {
        if self.target.is_empty() {
            *self.found.borrow_mut() = Some(Node::Value);
        }
        Err(Stop)
    }
}

/// A table with one entry: the next key on the path, and the rest of the walk.
struct OneEntry<'a> {
    key: Option<String>,
    value: Option<Walk<'a>>,
}

impl<'de> MapAccess<'de> for OneEntry<'_> {
    type Error = Stop;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Stop> {
        match self.key.take() {
            Some(key) => seed
                .deserialize(IntoDeserializer::<Stop>::into_deserializer(key))
                .map(Some),
            None => Ok(None),
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Stop> {
        seed.deserialize(self.value.take().ok_or(Stop)?)
    }
}

impl<'de> de::Deserializer<'de> for Walk<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        self.value()
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_some(self)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Stop> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Stop> {
        match self.target.first() {
            None => {
                *self.found.borrow_mut() = Some(Node::Table(fields.to_vec()));
                Err(Stop)
            }
            Some(key) => visitor.visit_map(OneEntry {
                key: Some(key.clone()),
                value: Some(self.deeper()),
            }),
        }
    }
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        match self.target.first() {
            None => {
                *self.found.borrow_mut() = Some(Node::Named);
                Err(Stop)
            }
            Some(_) => visitor.visit_map(OneEntry {
                key: Some("name".into()),
                value: Some(self.deeper()),
            }),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct enum identifier
        ignored_any
    }
}

/// What the schema has at `path` (`*` stands for a name in a named table).
fn node_at(path: &[String]) -> Node {
    let found = RefCell::new(None);
    let _ = Config::deserialize(Walk {
        target: path,
        found: &found,
    });
    let node = found.into_inner();
    node.unwrap_or_else(|| panic!("the schema walk did not reach {}", path.join(".")))
}

/// Every key path of the schema that holds a value, e.g.
/// `drives.*.key-file`.
fn schema_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    while let Some(path) = todo.pop() {
        match node_at(&path) {
            Node::Table(fields) => {
                for field in fields {
                    let mut deeper = path.clone();
                    deeper.push(field.to_string());
                    todo.push(deeper);
                }
            }
            Node::Named => {
                let mut deeper = path.clone();
                deeper.push("*".into());
                todo.push(deeper);
            }
            Node::Value => {
                keys.insert(path.join("."));
            }
        }
    }
    keys
}

/// The schema's spelling of a path from the file: names in named tables
/// become `*`.
fn normalise(segments: &[&str]) -> Vec<String> {
    let mut path: Vec<String> = Vec::new();
    for segment in segments {
        let named = matches!(node_at(&path), Node::Named);
        path.push(if named {
            "*".into()
        } else {
            segment.to_string()
        });
    }
    path
}

/// Every key the example shows, set or commented out (`# key = …`), under
/// the table header (set or commented out) it stands below.
fn example_keys(text: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut table: Vec<&str> = Vec::new();
    for line in text.lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some(header) = line.strip_prefix('[') {
            let Some((header, _)) = header.split_once(']') else {
                continue;
            };
            if header
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                table = header.split('.').collect();
            }
            continue;
        }
        let Some((key, _)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let plain = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !plain {
            continue;
        }
        let mut segments = table.clone();
        segments.push(key);
        keys.insert(normalise(&segments).join("."));
    }
    keys
}

#[test]
fn the_schema_walk_finds_known_keys() {
    let keys = schema_keys();
    for known in [
        "state-directory",
        "drives.*.uuid",
        "repositories.*.path",
        "led.backend",
    ] {
        assert!(keys.contains(known), "{known} missing from {keys:?}");
    }
}

#[test]
fn the_example_file_shows_every_option() {
    let shown = example_keys(include_str!("../../../examples/ferry.toml"));
    let missing: Vec<String> = schema_keys().difference(&shown).cloned().collect();
    assert!(
        missing.is_empty(),
        "examples/ferry.toml does not show these options (add each, set or as `# key = …` with a comment): {}",
        missing.join(", ")
    );
}
