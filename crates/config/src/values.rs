//! Value types that check themselves while the file is parsed, so a bad
//! value is reported with its line like any other parse error.

use std::fmt;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A name of a drive, repository or profile: it becomes part of paths,
/// mountpoints, mail subjects and D-Bus arguments, so it is kept plain:
/// 1 to 64 of `a-z 0-9 - _ .`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Name(String);

impl Name {
    /// Checks a name; the error says what is allowed.
    pub fn new(name: &str) -> Result<Name, String> {
        let valid_char =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
        let first_ok = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if name.is_empty() || name.len() > 64 || !first_ok || !name.chars().all(valid_char) {
            return Err(format!(
                "`{}` is not a valid name: use 1 to 64 lowercase letters, digits, `-`, `_` or `.`, starting with a letter or digit",
                name.escape_debug()
            ));
        }
        Ok(Name(name.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Name::new(&value)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// A filesystem or LUKS UUID as udev's ID_FS_UUID reports it
/// (`1b2c3d4e-…` for ext4 and LUKS, `ABCD-1234` for FAT).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct FsUuid(String);

impl FsUuid {
    /// Checks a UUID: 4 to 64 hex digits and dashes.
    pub fn new(uuid: &str) -> Result<FsUuid, String> {
        let digits = uuid.chars().filter(|c| *c != '-').count();
        if !(4..=64).contains(&uuid.len())
            || digits < 4
            || !uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        {
            return Err(format!(
                "`{}` is not a UUID: copy ID_FS_UUID from `udevadm info --query=property /dev/sdX` (hex digits and dashes)",
                uuid.escape_debug()
            ));
        }
        Ok(FsUuid(uuid.to_string()))
    }

    /// Lowercase form, for comparisons.
    pub fn normalized(&self) -> String {
        self.0.to_ascii_lowercase()
    }

    /// Whether udev's `ID_FS_UUID` value is this UUID (case-insensitive).
    pub fn matches(&self, reported: &str) -> bool {
        self.0.eq_ignore_ascii_case(reported)
    }

    /// The UUID as written in the configuration.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for FsUuid {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        FsUuid::new(&value)
    }
}

impl fmt::Display for FsUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An absolute path: relative paths in a system service's config depend on
/// its working directory, which nobody should have to guess.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "PathBuf")]
pub struct AbsolutePath(PathBuf);

impl TryFrom<PathBuf> for AbsolutePath {
    type Error = String;
    fn try_from(path: PathBuf) -> Result<Self, Self::Error> {
        if !path.is_absolute() {
            return Err(format!(
                "`{}` is not an absolute path: write it from /",
                path.display()
            ));
        }
        Ok(AbsolutePath(path))
    }
}

impl AbsolutePath {
    /// A default path written in the code; it must be absolute.
    pub(crate) fn from_static(path: &'static str) -> AbsolutePath {
        debug_assert!(path.starts_with('/'));
        AbsolutePath(PathBuf::from(path))
    }
}

impl Deref for AbsolutePath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for AbsolutePath {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

/// An RGB colour, written `#rrggbb`, `rrggbb` or as one of a few names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Color {
    /// Red.
    pub r: u8,
    /// Green.
    pub g: u8,
    /// Blue.
    pub b: u8,
}

impl Color {
    /// All components zero: the LED is dark.
    pub const OFF: Color = Color { r: 0, g: 0, b: 0 };

    /// A colour from its components.
    pub const fn new(r: u8, g: u8, b: u8) -> Color {
        Color { r, g, b }
    }

    /// Names accepted besides hex: the CSS values blinkstick-python's
    /// `--set-color NAME` uses (so green is #008000).
    const NAMES: [(&'static str, [u8; 3]); 10] = [
        ("off", [0, 0, 0]),
        ("black", [0, 0, 0]),
        ("red", [255, 0, 0]),
        ("green", [0, 128, 0]),
        ("blue", [0, 0, 255]),
        ("white", [255, 255, 255]),
        ("yellow", [255, 255, 0]),
        ("orange", [255, 165, 0]),
        ("purple", [128, 0, 128]),
        ("cyan", [0, 255, 255]),
    ];

    /// Parses `#rrggbb`, `rrggbb` or a name.
    pub fn parse(text: &str) -> Result<Color, String> {
        let lower = text.trim().to_ascii_lowercase();
        if let Some((_, [r, g, b])) = Color::NAMES.iter().find(|(n, _)| *n == lower) {
            return Ok(Color {
                r: *r,
                g: *g,
                b: *b,
            });
        }
        let hex = lower.strip_prefix('#').unwrap_or(&lower);
        let byte = |i: usize| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        };
        let digits = hex.bytes().all(|c| c.is_ascii_hexdigit());
        match (hex.len(), digits, byte(0), byte(2), byte(4)) {
            (6, true, Some(r), Some(g), Some(b)) => Ok(Color { r, g, b }),
            _ => Err(format!(
                "`{}` is not a colour: write #rrggbb (for example #33c280) or one of {}",
                text.escape_debug(),
                Color::NAMES.map(|(n, _)| n).join(", ")
            )),
        }
    }

    /// `#rrggbb`.
    pub fn to_hex(self) -> String {
        format!("#{:02x}{:02x}{:02x}", self.r, self.g, self.b)
    }

    /// Off (#000000).
    pub fn off() -> Color {
        Color { r: 0, g: 0, b: 0 }
    }
    /// Seed 004's "in progress" colour, #33c280.
    pub fn working() -> Color {
        Color {
            r: 0x33,
            g: 0xc2,
            b: 0x80,
        }
    }
    /// CSS green, #008000, as `blinkstick --set-color green`.
    pub fn green() -> Color {
        Color { r: 0, g: 128, b: 0 }
    }
    /// #ff0000.
    pub fn red() -> Color {
        Color { r: 255, g: 0, b: 0 }
    }
}

impl TryFrom<String> for Color {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Color::parse(&value)
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- Color ----------------------------------------------------------------

    #[test]
    fn parse_hex_forms() {
        let c = Color::new(0x33, 0xc2, 0x80);
        assert_eq!(Color::parse("#33c280"), Ok(c));
        assert_eq!(Color::parse("33c280"), Ok(c));
        assert_eq!(Color::parse("33C280"), Ok(c));
        assert_eq!(Color::parse("  #33c280\n"), Ok(c));
        assert_eq!(Color::parse("#000000"), Ok(Color::OFF));
        assert_eq!(Color::parse("ffffff"), Ok(Color::new(255, 255, 255)));
    }

    #[test]
    fn parse_names() {
        assert_eq!(Color::parse("off"), Ok(Color::OFF));
        assert_eq!(Color::parse("Black"), Ok(Color::OFF));
        assert_eq!(Color::parse("RED"), Ok(Color::new(255, 0, 0)));
        assert_eq!(Color::parse("green"), Ok(Color::new(0, 0x80, 0)));
        assert_eq!(Color::parse("blue"), Ok(Color::new(0, 0, 255)));
        assert_eq!(Color::parse("white"), Ok(Color::new(255, 255, 255)));
        assert_eq!(Color::parse("yellow"), Ok(Color::new(255, 255, 0)));
        assert_eq!(Color::parse("orange"), Ok(Color::new(255, 0xa5, 0)));
        assert_eq!(Color::parse("purple"), Ok(Color::new(0x80, 0, 0x80)));
        assert_eq!(Color::parse("cyan"), Ok(Color::new(0, 255, 255)));
    }

    #[test]
    fn parse_rejects_bad_input() {
        for bad in [
            "", "#", "#33c28", "#33c2800", "33c2", "#gg0000", "##33c280", "magenta", "#fff",
            "+1c280", "0x33c280", "#ÿÿÿ", "é33c28",
        ] {
            let err = Color::parse(bad).expect_err(bad);
            assert!(err.contains("#rrggbb"), "{bad:?}: {err}");
            assert!(err.contains("cyan"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn to_hex_round_trips() {
        assert_eq!(Color::new(0x33, 0xc2, 0x80).to_hex(), "#33c280");
        assert_eq!(Color::OFF.to_hex(), "#000000");
        assert_eq!(Color::new(255, 10, 1).to_hex(), "#ff0a01");
        assert_eq!(Color::new(255, 10, 1).to_string(), "#ff0a01");
        for c in [
            Color::OFF,
            Color::new(1, 2, 3),
            Color::new(0xab, 0xcd, 0xef),
        ] {
            assert_eq!(Color::parse(&c.to_hex()), Ok(c));
        }
    }
}
