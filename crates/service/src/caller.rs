//! Who may change things. The D-Bus policy file already limits mutating
//! methods to root and the `ferry` group; every mutating method checks the
//! caller again itself and fails closed when the caller cannot be identified,
//! so a loose policy file is not the only lock on the door.

use ferry_interfaces::Error as FerryError;
use zbus::message::Header;

/// The group whose members may trigger and change things besides root.
pub const FERRY_GROUP: &str = "ferry";

/// Allows the call when the sender is root or in the `ferry` group.
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
    let uid = dbus
        .get_connection_unix_user(sender.clone().into())
        .await
        .map_err(|_| denied("the caller's user cannot be determined"))?;
    if uid == 0 || in_ferry_group(uid) {
        Ok(())
    } else {
        Err(denied(&format!("user {uid} is not allowed")))
    }
}

/// Whether `uid` is a member of the ferry group (primary or supplementary).
fn in_ferry_group(uid: u32) -> bool {
    let Ok(groups) = std::fs::read_to_string("/etc/group") else {
        return false;
    };
    let Some(line) = groups
        .lines()
        .find(|l| l.split(':').next() == Some(FERRY_GROUP))
    else {
        return false;
    };
    let fields: Vec<&str> = line.split(':').collect();
    let gid = fields.get(2).and_then(|g| g.parse::<u32>().ok());
    let members: Vec<&str> = fields
        .get(3)
        .map(|m| m.split(',').collect())
        .unwrap_or_default();
    let Some(user) = user_of(uid) else {
        return false;
    };
    members.contains(&user.name.as_str()) || Some(user.gid) == gid
}

struct User {
    name: String,
    gid: u32,
}

fn user_of(uid: u32) -> Option<User> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.get(2)?.parse::<u32>().ok()? == uid)
            .then(|| {
                Some(User {
                    name: fields.first()?.to_string(),
                    gid: fields.get(3)?.parse().ok()?,
                })
            })
            .flatten()
    })
}
