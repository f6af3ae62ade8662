//! `ferryctl watch`: every ferry signal, live, one readable line each.
//!
//! It adds an ordinary match rule (type=signal, path_namespace=/org/ferry),
//! which any user may do on the system bus, so it works without root —
//! unlike `busctl monitor`, which needs BecomeMonitor. [`describe`] words one
//! signal and is tested without a bus.

use futures_util::StreamExt;
use zbus::zvariant::{Structure, Value};
use zbus::{Connection, MatchRule, MessageStream};

use crate::words;

/// One signal's arguments as text (strings as they are, numbers in digits).
pub fn arguments(message: &zbus::Message) -> Vec<String> {
    let body = message.body();
    let Ok(structure) = body.deserialize::<Structure>() else {
        return vec![];
    };
    structure
        .fields()
        .iter()
        .map(|value| match value {
            Value::Str(s) => s.to_string(),
            Value::U64(n) => n.to_string(),
            Value::U32(n) => n.to_string(),
            Value::I64(n) => n.to_string(),
            Value::I32(n) => n.to_string(),
            Value::F64(n) => format!("{n:.1}"),
            Value::Bool(b) => b.to_string(),
            other => other.to_string(),
        })
        .collect()
}

/// A signal of `member` with `args` in a person's words; None for signals
/// that are not ferry's own (PropertiesChanged on ferry's paths, say).
pub fn describe(interface: &str, member: &str, args: &[String]) -> Option<String> {
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("?");
    let number = |i: usize| args.get(i).and_then(|a| a.parse::<u64>().ok()).unwrap_or(0);
    let text = match (interface, member) {
        ("org.ferry.DriveWatcher1", "DriveAttached") => {
            format!("drive {} plugged in as {}", arg(0), arg(1))
        }
        ("org.ferry.DriveWatcher1", "DriveDetached") => format!("drive {} unplugged", arg(0)),
        ("org.ferry.Crypt1", "DriveOpened") => format!("drive {} opened at {}", arg(0), arg(1)),
        ("org.ferry.Crypt1", "DriveHeld") => format!(
            "drive {} held read-only at {} (no sync; `ferryctl close {}` when done)",
            arg(0),
            arg(1),
            arg(0)
        ),
        ("org.ferry.Crypt1", "DriveClosed") => {
            format!("drive {} closed and locked: safe to remove", arg(0))
        }
        ("org.ferry.Crypt1", "DriveFailed") => {
            format!("drive {} FAILED at {}: {}", arg(0), arg(1), arg(2))
        }
        ("org.ferry.Sync1", "SyncStarted") => {
            format!("drive {}: copying repository {}", arg(0), arg(1))
        }
        ("org.ferry.Sync1", "SyncProgress") => {
            let (done, total) = (number(1), number(2));
            let percent = (done * 100).checked_div(total).unwrap_or(0);
            match args.get(3).map(String::as_str) {
                Some(phase) if phase != "copy" => format!("drive {}: {phase}", arg(0)),
                _ => format!(
                    "drive {}: {} of {} copied ({percent}%)",
                    arg(0),
                    words::bytes(done),
                    words::bytes(total)
                ),
            }
        }
        ("org.ferry.Sync1", "SyncFinished") => {
            let seconds: f64 = arg(2).parse().unwrap_or(0.0);
            format!(
                "drive {}: synced, {} copied in {}",
                arg(0),
                words::bytes(number(1)),
                words::duration(seconds)
            )
        }
        ("org.ferry.Sync1", "SyncFailed") => {
            format!("drive {}: sync FAILED at {}: {}", arg(0), arg(1), arg(2))
        }
        ("org.ferry.Borg1", "BackupStarted") => {
            format!("backup {} started as job {}", arg(1), arg(0))
        }
        ("org.ferry.Borg1", "BackupProgress") => format!(
            "backup job {}: {} in {} files so far",
            arg(0),
            words::bytes(number(1)),
            number(2)
        ),
        ("org.ferry.Borg1", "BackupFinished") => {
            format!("backup {} finished: archive {}", arg(1), arg(2))
        }
        ("org.ferry.Borg1", "BackupFinishedWithWarnings") => format!(
            "backup {} finished with warnings: archive {}; borg warned: {}",
            arg(1),
            arg(2),
            arg(3)
        ),
        ("org.ferry.Borg1", "BackupFailed") => {
            format!("backup {} FAILED at {}: {}", arg(1), arg(2), arg(3))
        }
        ("org.ferry.Borg1", "BackupSkipped") => {
            format!("backup {} skipped: {}", arg(1), arg(2))
        }
        ("org.ferry.Led1", "ColorChanged") => format!("LED {} ({})", arg(1), arg(0)),
        ("org.ferry.Notifier1", "NotificationSent") => format!("mail sent: {}", arg(1)),
        ("org.ferry.Notifier1", "NotificationQueued") => {
            format!("mail queued ({}): {}", arg(0), arg(1))
        }
        (i, m) if i.starts_with("org.ferry.") => format!("{i}.{m}({})", args.join(", ")),
        _ => return None,
    };
    Some(text)
}

/// A stream of every signal sent on ferry's object paths.
pub async fn signals(conn: &Connection) -> zbus::Result<MessageStream> {
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .path_namespace("/org/ferry")?
        .build();
    MessageStream::for_match_rule(rule, conn, Some(1024)).await
}

/// Prints every ferry signal until the bus connection ends.
pub async fn run(conn: &Connection, now: impl Fn() -> u64) -> zbus::Result<()> {
    let mut stream = signals(conn).await?;
    println!("watching ferry's signals (Ctrl-C to stop)");
    while let Some(message) = stream.next().await {
        let message = message?;
        let header = message.header();
        let (Some(interface), Some(member)) = (header.interface(), header.member()) else {
            continue;
        };
        if let Some(text) = describe(interface.as_str(), member.as_str(), &arguments(&message)) {
            println!("{}  {text}", words::clock(now()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn each_ferry_signal_reads_as_a_sentence() {
        assert_eq!(
            describe(
                "org.ferry.DriveWatcher1",
                "DriveAttached",
                &strings(&["offsite-a", "/dev/sdb1", "u"])
            )
            .as_deref(),
            Some("drive offsite-a plugged in as /dev/sdb1")
        );
        assert_eq!(
            describe("org.ferry.Crypt1", "DriveClosed", &strings(&["offsite-a"])).as_deref(),
            Some("drive offsite-a closed and locked: safe to remove")
        );
        assert_eq!(
            describe(
                "org.ferry.Sync1",
                "SyncProgress",
                &strings(&["a", "1048576", "2097152"])
            )
            .as_deref(),
            Some("drive a: 1.0 MiB of 2.0 MiB copied (50%)")
        );
        assert_eq!(
            describe(
                "org.ferry.Borg1",
                "BackupFailed",
                &strings(&["nas-1", "nas", "create", "disk full"])
            )
            .as_deref(),
            Some("backup nas FAILED at create: disk full")
        );
        assert_eq!(
            describe("org.ferry.Sync1", "SomethingNew", &strings(&["x", "1"])).as_deref(),
            Some("org.ferry.Sync1.SomethingNew(x, 1)")
        );
        assert_eq!(
            describe("org.freedesktop.DBus.Properties", "PropertiesChanged", &[]),
            None
        );
    }
}
