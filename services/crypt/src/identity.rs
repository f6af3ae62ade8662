//! The identity token: proof that a filesystem is the drive ferry enrolled
//! under a name, on this host.
//!
//! UUID and label are hints that anyone can copy. At enrolment a random
//! secret is written twice: in a file at the drive's filesystem root
//! ([`TOKEN_FILE`]) and on the host, beside the key (`<drive>.token` in the
//! key directory, mode 0600). Opening a drive compares the two in constant
//! time. On an encrypted drive the token sits behind the LUKS key too.
//!
//! The drive's file is untrusted input: it is opened without following
//! symlinks (a link to the host's own token must not pass), only as a
//! regular file, and only its first few bytes are read.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ferry_config::Name;
use ferry_service::confined::Confined;

use crate::secrets::random_bytes;

/// The token's file name at the drive's filesystem root.
pub const TOKEN_FILE: &str = ".ferry-identity";

/// The first line of every token.
const MAGIC: &str = "ferry-identity 1";

/// Bytes of the secret (256 bits).
const SECRET_BYTES: usize = 32;

/// The most that is read of a token file.
const MAX_TOKEN_SIZE: u64 = 4096;

/// A drive's identity: its enrolled name and the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    drive: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({}, <secret>)", self.drive)
    }
}

impl Token {
    /// A new token for `drive` with a secret from the kernel's random source.
    pub fn generate(drive: &Name) -> io::Result<Token> {
        Ok(Token {
            drive: drive.to_string(),
            secret: random_bytes(SECRET_BYTES)?,
        })
    }

    /// The file contents.
    pub fn to_text(&self) -> String {
        let hex: String = self.secret.iter().map(|b| format!("{b:02x}")).collect();
        format!("{MAGIC}\ndrive {}\nsecret {hex}\n", self.drive)
    }

    /// Parses file contents; `None` when it is not a token.
    pub fn parse(text: &str) -> Option<Token> {
        let mut lines = text.lines();
        if lines.next()? != MAGIC {
            return None;
        }
        let drive = lines.next()?.strip_prefix("drive ")?;
        let hex = lines.next()?.strip_prefix("secret ")?;
        if hex.len() != SECRET_BYTES * 2 {
            return None;
        }
        let secret = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        Some(Token {
            drive: drive.to_string(),
            secret,
        })
    }

    /// The drive name written in the token.
    pub fn drive(&self) -> &str {
        &self.drive
    }
}

/// Reads a token file without following symlinks: `Ok(None)` when there is
/// no such file, an error when it is not a plain regular file.
pub fn read_token_file(path: &Path) -> io::Result<Option<String>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let file = match file {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(io::Error::other("it is a symbolic link"))
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("it is not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_TOKEN_SIZE).read_to_string(&mut text)?;
    Ok(Some(text))
}

/// Why a drive is not proven to be the enrolled one. Each message is a
/// sentence that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The host's half is unreadable as a token.
    #[error("this host's identity token {} for drive {drive} is damaged: restore it from your backup of the keys, or {}", host.display(), reenrol(drive))]
    HostTokenDamaged { drive: Name, host: PathBuf },
    /// The host's half is missing.
    #[error("this host has no identity token for drive {drive} ({} is missing): restore it from your backup of the keys, or {}", host.display(), reenrol(drive))]
    HostTokenMissing { drive: Name, host: PathBuf },
    /// The host's half cannot be read.
    #[error("cannot read this host's identity token {}: {source}", host.display())]
    HostTokenUnreadable { host: PathBuf, source: io::Error },
    /// The drive has no token.
    #[error("the drive carries no ferry identity token: it is not the drive enrolled as {drive} (a copy of its UUID or label?); plug in the right drive, or {}", reenrol(drive))]
    NoToken { drive: Name },
    /// The drive's token is a symlink, not a regular file, or unreadable.
    #[error("the drive's identity token is not usable ({source}), so it was not read: this is not the drive enrolled as {drive}; plug in the right drive, or {}", reenrol(drive))]
    TokenUnusable { drive: Name, source: io::Error },
    /// The drive's token does not parse.
    #[error(
        "the drive's identity token is damaged or forged: plug in the right drive, or {}",
        reenrol(drive)
    )]
    TokenDamaged { drive: Name },
    /// The drive carries another drive's identity.
    #[error(
        "wrong drive: it carries the identity of {other}, not {drive}; plug in {drive}, or {}",
        reenrol(drive)
    )]
    WrongDrive { drive: Name, other: String },
    /// Same drive name, another secret.
    #[error("the drive's identity token does not match this host's for {drive}: it was enrolled by another ferry or enrolled again elsewhere; plug in the right drive, or {}", reenrol(drive))]
    Mismatch { drive: Name },
}

/// The way out when the drive really is the right one.
fn reenrol(drive: &Name) -> String {
    format!(
        "if it is the right drive, enrol it again with `ferry-crypt enroll --drive {drive} …` (this erases it)"
    )
}

/// Checks the host's token for `drive` (file `host`) against the token
/// at the root of the drive whose confined root handle is `root`: read
/// through the handle, never following a symlink, only a regular file.
/// Blocking: it reads the drive.
pub fn verify_on(drive: &Name, host: &Path, root: &Confined) -> Result<(), IdentityError> {
    let found = match root.open_file(Path::new(TOKEN_FILE)) {
        Ok(file) => {
            let mut text = String::new();
            file.take(MAX_TOKEN_SIZE)
                .read_to_string(&mut text)
                .map(|_| Some(text))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    };
    check(drive, host, found)
}

/// Compares without an early exit, so the time taken says nothing about
/// where two secrets differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Checks the host's token for `drive` (file `host`) against the drive's
/// token file `on_drive` (in the mounted filesystem).
pub fn verify(drive: &Name, host: &Path, on_drive: &Path) -> Result<(), IdentityError> {
    check(drive, host, read_token_file(on_drive))
}

fn check(
    drive: &Name,
    host: &Path,
    on_drive: io::Result<Option<String>>,
) -> Result<(), IdentityError> {
    let drive = drive.clone();
    let expected = match read_token_file(host) {
        Ok(Some(text)) => Token::parse(&text).ok_or_else(|| IdentityError::HostTokenDamaged {
            drive: drive.clone(),
            host: host.to_path_buf(),
        })?,
        Ok(None) => {
            let host = host.to_path_buf();
            return Err(IdentityError::HostTokenMissing { drive, host });
        }
        Err(source) => {
            let host = host.to_path_buf();
            return Err(IdentityError::HostTokenUnreadable { host, source });
        }
    };
    let found = match on_drive {
        Ok(Some(text)) => Token::parse(&text),
        Ok(None) => return Err(IdentityError::NoToken { drive }),
        Err(source) => return Err(IdentityError::TokenUnusable { drive, source }),
    };
    let Some(found) = found else {
        return Err(IdentityError::TokenDamaged { drive });
    };
    if found.drive != expected.drive {
        let other = Name::new(found.drive())
            .map(|n| format!("drive {n}"))
            .unwrap_or_else(|_| "a drive with an invalid name".into());
        return Err(IdentityError::WrongDrive { drive, other });
    }
    if !constant_time_eq(&found.secret, &expected.secret) {
        return Err(IdentityError::Mismatch { drive });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).expect("name")
    }

    #[test]
    fn tokens_round_trip_and_differ() {
        let a = Token::generate(&name("offsite-a")).expect("token");
        let b = Token::generate(&name("offsite-a")).expect("token");
        assert_ne!(a, b);
        assert_eq!(Token::parse(&a.to_text()), Some(a.clone()));
        assert!(!format!("{a:?}").contains(&a.to_text()[30..]));
        for bad in [
            "",
            "ferry-identity 2\ndrive a\nsecret 00\n",
            "drive a\n",
            "ferry-identity 1\ndrive a\nsecret zz\n",
        ] {
            assert_eq!(Token::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn verify_accepts_only_the_same_token_as_a_regular_file() {
        let dir = tempfile::tempdir().expect("dir");
        let host = dir.path().join("offsite-a.token");
        let drive = dir.path().join(TOKEN_FILE);
        let n = name("offsite-a");
        let token = Token::generate(&n).expect("token");
        std::fs::write(&host, token.to_text()).expect("host");

        let err = verify(&n, &host, &drive).expect_err("missing").to_string();
        assert!(
            err.contains("carries no ferry identity token") && err.contains("enroll"),
            "{err}"
        );

        std::fs::write(&drive, token.to_text()).expect("drive");
        verify(&n, &host, &drive).expect("same token");

        let other = Token::generate(&n).expect("token");
        std::fs::write(&drive, other.to_text()).expect("drive");
        let err = verify(&n, &host, &drive).expect_err("other secret");
        assert!(matches!(err, IdentityError::Mismatch { .. }), "{err}");

        let b = Token::generate(&name("offsite-b")).expect("token");
        std::fs::write(&drive, b.to_text()).expect("drive");
        let err = verify(&n, &host, &drive)
            .expect_err("other drive")
            .to_string();
        assert!(err.contains("identity of drive offsite-b"), "{err}");

        std::fs::remove_file(&drive).expect("rm");
        std::os::unix::fs::symlink(&host, &drive).expect("symlink");
        let err = verify(&n, &host, &drive)
            .expect_err("symlink to the host's token")
            .to_string();
        assert!(err.contains("symbolic link"), "{err}");

        std::fs::remove_file(&drive).expect("rm");
        std::fs::create_dir(&drive).expect("dir");
        let err = verify(&n, &host, &drive)
            .expect_err("a directory")
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");

        std::fs::remove_file(&host).expect("rm");
        let err = verify(&n, &host, &drive)
            .expect_err("no host token")
            .to_string();
        assert!(err.contains("this host has no identity token"), "{err}");
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
