//! What `~` means in a borgmatic file that ferry-borg reads.
//!
//! borgmatic runs as the user whose backup it is, and expands `~` with that
//! user's HOME. ferry-borg runs as a system service (root, HOME unset or
//! `/root` under systemd), so its own HOME would point every `~/x` source at
//! the wrong place (seed 000: `~/.gnupg` became `/root/.gnupg`, borg warned
//! "No such file", made an empty archive and ferry said "finished"). So
//! `~` and `~/x` mean the home directory of the user who **owns the file**,
//! and `~name/x` the home of user `name`, both looked up in the user
//! database (getpwuid_r / getpwnam_r, so NSS users work too). Only for a
//! file of the user ferry-borg itself runs as (a user-level ferry-borg)
//! is `~` that user's HOME, exactly as borgmatic run by them would read it.

use std::ffi::{CStr, CString};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Why `~` cannot be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TildeError {
    /// The file's owner is not in the user database.
    #[error(
        "`~` means the home of {file}'s owner, uid {uid}, who has no entry in the user database"
    )]
    OwnerUnknown {
        /// The borgmatic file.
        file: String,
        /// Its owner.
        uid: u32,
    },
    /// The file's owner cannot be found (the file cannot be looked at).
    #[error("cannot find {file}'s owner: {why}")]
    NoOwner {
        /// The borgmatic file.
        file: String,
        /// Why (the system's words).
        why: String,
    },
    /// `~name` names a user the database does not know.
    #[error("`{path}`: there is no user `{user}` in the user database")]
    NoSuchUser {
        /// The path as written.
        path: String,
        /// The user named.
        user: String,
    },
}

/// How `~` expands for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tilde {
    /// The owner's home, or why it is unknown.
    owner_home: Result<String, TildeError>,
}

impl Tilde {
    /// `~` is `home`.
    pub fn home(home: &str) -> Tilde {
        Tilde {
            owner_home: Ok(home.to_string()),
        }
    }

    /// `~` is the home of the user who owns `file`. When that is the user
    /// ferry-borg runs as (a user-level ferry-borg reading its user's own
    /// file), it is that user's HOME, as borgmatic would expand it
    /// ([`crate::remote::service_home`]).
    pub fn of_owner(file: &Path) -> Tilde {
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        let owner_home = match std::fs::metadata(file) {
            Ok(meta) if meta.uid() == me => {
                Ok(crate::remote::service_home().to_string_lossy().into_owned())
            }
            Ok(meta) => home_of_uid(meta.uid()).ok_or_else(|| TildeError::OwnerUnknown {
                file: file.display().to_string(),
                uid: meta.uid(),
            }),
            Err(e) => Err(TildeError::NoOwner {
                file: file.display().to_string(),
                why: e.to_string(),
            }),
        };
        Tilde { owner_home }
    }

    /// `path` with a leading `~` or `~name` expanded.
    pub fn expand(&self, path: &str) -> Result<String, TildeError> {
        let Some(rest) = path.strip_prefix('~') else {
            return Ok(path.to_string());
        };
        let (user, tail) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, ""),
        };
        let home = if user.is_empty() {
            self.owner_home.clone()?
        } else {
            home_of_user(user).ok_or_else(|| TildeError::NoSuchUser {
                path: path.to_string(),
                user: user.to_string(),
            })?
        };
        Ok(format!("{}{tail}", home.trim_end_matches('/')))
    }
}

/// The home directory of `uid` from the user database.
pub fn home_of_uid(uid: u32) -> Option<String> {
    lookup(|pwd, buf, len, result| {
        // SAFETY: every pointer is valid for the call; getpwuid_r fills `pwd` from `buf`.
        unsafe { libc::getpwuid_r(uid, pwd, buf, len, result) }
    })
}

/// The home directory of user `name` from the user database.
pub fn home_of_user(name: &str) -> Option<String> {
    let name = CString::new(name).ok()?;
    lookup(|pwd, buf, len, result| {
        // SAFETY: as above; `name` outlives the call.
        unsafe { libc::getpwnam_r(name.as_ptr(), pwd, buf, len, result) }
    })
}

fn lookup(
    call: impl Fn(
        *mut libc::passwd,
        *mut libc::c_char,
        libc::size_t,
        *mut *mut libc::passwd,
    ) -> libc::c_int,
) -> Option<String> {
    let mut size = 1024usize;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: passwd is plain data; zeroed is a valid initial value.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = call(&mut pwd, buf.as_mut_ptr(), size, &mut result);
        if rc == libc::ERANGE && size < 1 << 20 {
            size *= 4;
            continue;
        }
        if rc != 0 || result.is_null() || pwd.pw_dir.is_null() {
            return None;
        }
        // SAFETY: on success pw_dir points into `buf`, NUL-terminated.
        let dir = unsafe { CStr::from_ptr(pwd.pw_dir) };
        return Some(dir.to_string_lossy().into_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tilde_is_the_owners_home_never_home() {
        assert_eq!(home_of_uid(0).as_deref(), Some("/root"));
        assert_eq!(home_of_user("root").as_deref(), Some("/root"));
        let t = Tilde::home("/home/david/");
        assert_eq!(t.expand("~/.gnupg").as_deref(), Ok("/home/david/.gnupg"));
        assert_eq!(t.expand("~").as_deref(), Ok("/home/david"));
        assert_eq!(t.expand("/etc").as_deref(), Ok("/etc"));
        assert_eq!(t.expand("~root/x").as_deref(), Ok("/root/x"));
        assert_eq!(
            t.expand("~no-such-user-ferry/x")
                .map_err(|e| e.to_string())
                .unwrap_err(),
            "`~no-such-user-ferry/x`: there is no user `no-such-user-ferry` in the user database"
        );
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("b.yaml");
        std::fs::write(&file, "x").expect("write");
        // The file is owned by whoever runs the test: `~` is their HOME.
        let me = crate::remote::service_home();
        assert_eq!(
            Tilde::of_owner(&file).expand("~/a"),
            Ok(format!("{}/a", me.to_string_lossy().trim_end_matches('/')))
        );
        // Another owner's `~` is theirs, from the user database.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&file, Some(65534), None).expect("chown");
            let nobody = home_of_uid(65534).expect("nobody's home");
            assert_eq!(
                Tilde::of_owner(&file).expand("~/a"),
                Ok(format!("{}/a", nobody.trim_end_matches('/')))
            );
        }
        assert!(matches!(
            Tilde::of_owner(&dir.path().join("missing")).expand("~/a"),
            Err(TildeError::NoOwner { .. })
        ));
    }
}
