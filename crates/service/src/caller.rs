//! Who may change things. The D-Bus policy file already limits mutating
//! methods to root and the `ferry` group; every mutating method checks the
//! caller again itself and fails closed when the caller cannot be identified,
//! so a loose policy file is not the only lock on the door.

use ferry_interfaces::Error as FerryError;
use zbus::message::Header;

/// The group whose members may trigger and change things besides root.
pub const FERRY_GROUP: &str = "ferry";

/// Allows the call when the sender is root or in the `ferry` group (its
/// primary or a supplementary group, as the bus saw it when it connected).
pub async fn authorize(
    connection: &zbus::Connection,
    header: &Header<'_>,
) -> Result<(), FerryError> {
    let denied = |why: &str| {
        FerryError::AccessDenied(format!(
            "{why}; only root and members of the `{FERRY_GROUP}` group may do this"
        ))
    };
    let sender = header
        .sender()
        .ok_or_else(|| denied("the caller cannot be identified"))?;
    let dbus = zbus::fdo::DBusProxy::new(connection)
        .await
        .map_err(|_| denied("the bus cannot be asked who the caller is"))?;
    let credentials = dbus
        .get_connection_credentials(sender.clone().into())
        .await
        .map_err(|_| denied("the caller's credentials cannot be determined"))?;
    let uid = credentials
        .unix_user_id()
        .ok_or_else(|| denied("the bus does not know the caller's user"))?;
    if uid == 0 {
        return Ok(());
    }
    // /etc/group and /etc/passwd are read off the runtime: a slow NSS
    // file system must not stall the service's bus answers.
    let groups = credentials.unix_group_ids().cloned();
    let membership = tokio::task::spawn_blocking(move || {
        let ferry_gid = group_id(FERRY_GROUP)?;
        Some(match groups {
            Some(groups) => groups.contains(&ferry_gid),
            None => listed_member(uid, ferry_gid),
        })
    })
    .await
    .map_err(|_| denied("the caller's groups cannot be read"))?;
    match membership {
        Some(true) => Ok(()),
        Some(false) => Err(denied(&format!(
            "user {uid} is not in the `{FERRY_GROUP}` group"
        ))),
        None => Err(denied(&format!(
            "user {uid} is not root and there is no `{FERRY_GROUP}` group"
        ))),
    }
}

/// [`authorize`] on the system bus; on a user's session bus (a user-level
/// service) the caller must be that same user (or root).
pub async fn authorize_on(
    bus: crate::Bus,
    connection: &zbus::Connection,
    header: &Header<'_>,
) -> Result<(), FerryError> {
    match bus {
        crate::Bus::System => authorize(connection, header).await,
        crate::Bus::Session => {
            // SAFETY: geteuid cannot fail.
            let me = unsafe { libc::geteuid() };
            let denied = |why: String| {
                FerryError::AccessDenied(format!(
                    "{why}; only user {me} (whose service this is) and root may do this"
                ))
            };
            let uid = caller_uid(connection, header)
                .await
                .map_err(|why| denied(why.to_string()))?;
            if uid == me || uid == 0 {
                Ok(())
            } else {
                Err(denied(format!("the caller is user {uid}")))
            }
        }
    }
}

/// Why the caller's user could not be found.
#[derive(Debug, thiserror::Error)]
enum Unidentified {
    #[error("the caller cannot be identified")]
    Sender,
    #[error("the bus cannot be asked who the caller is")]
    Bus,
    #[error("the caller's user cannot be determined")]
    User,
}

async fn caller_uid(
    connection: &zbus::Connection,
    header: &Header<'_>,
) -> Result<u32, Unidentified> {
    let sender = header.sender().ok_or(Unidentified::Sender)?;
    let dbus = zbus::fdo::DBusProxy::new(connection)
        .await
        .map_err(|_| Unidentified::Bus)?;
    dbus.get_connection_credentials(sender.clone().into())
        .await
        .map_err(|_| Unidentified::User)?
        .unix_user_id()
        .ok_or(Unidentified::User)
}

/// The gid of a group in /etc/group.
fn group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name)
            .then(|| fields.nth(1)?.parse().ok())
            .flatten()
    })
}

/// For a bus that does not report group ids: whether /etc/passwd and
/// /etc/group make `uid` a member of `gid`.
fn listed_member(uid: u32, gid: u32) -> bool {
    let Ok(passwd) = std::fs::read_to_string("/etc/passwd") else {
        return false;
    };
    let Some((name, primary)) = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.get(2)?.parse::<u32>().ok()? == uid)
            .then(|| {
                Some((
                    fields.first()?.to_string(),
                    fields.get(3)?.parse::<u32>().ok()?,
                ))
            })
            .flatten()
    }) else {
        return false;
    };
    if primary == gid {
        return true;
    }
    let Ok(groups) = std::fs::read_to_string("/etc/group") else {
        return false;
    };
    groups.lines().any(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(gid)
            && fields
                .get(3)
                .is_some_and(|members| members.split(',').any(|m| m == name))
    })
}
