//! UnitFailed's two outside inputs: the unit name a caller passes (checked
//! before it goes anywhere near a command line) and the unit's recent
//! journal lines (from `journalctl` when the machine has it).

use std::process::Stdio;
use std::time::Duration;

/// How long journalctl may take.
const JOURNAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of its output goes into a mail.
const JOURNAL_MAX_BYTES: usize = 64 * 1024;
/// Unit types systemd knows.
const SUFFIXES: [&str; 11] = [
    "service",
    "socket",
    "target",
    "device",
    "mount",
    "automount",
    "swap",
    "timer",
    "path",
    "slice",
    "scope",
];

/// A UnitFailed argument that is not a systemd unit name.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{0}` is not a systemd unit name: pass the full name with its type, for example \
     ferry-sync.service (the OnFailure= template passes %i)"
)]
pub struct BadUnitName(String);

/// Checks a systemd unit name such as `ferry-sync.service` or
/// `ferry-borg@home.service`; the error says what is expected.
pub fn check_unit_name(unit: &str) -> Result<(), BadUnitName> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c);
    let suffix_ok = unit
        .rsplit_once('.')
        .is_some_and(|(stem, suffix)| !stem.is_empty() && SUFFIXES.contains(&suffix));
    if unit.is_empty()
        || unit.len() > 255
        || unit.starts_with(['-', '.'])
        || !unit.chars().all(allowed)
        || !suffix_ok
    {
        return Err(BadUnitName(unit.escape_debug().to_string()));
    }
    Ok(())
}

/// The unit's last 50 journal lines, or a sentence saying why there are none.
pub async fn recent_lines(unit: &str) -> String {
    let run = tokio::process::Command::new("journalctl")
        .arg(format!("--unit={unit}"))
        .args(["-n", "50", "--no-pager"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(JOURNAL_TIMEOUT, run).await {
        Err(_) => "(journalctl did not answer within 10 s; no journal lines)".into(),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            "(journalctl is not available on this machine; no journal lines)".into()
        }
        Ok(Err(e)) => format!("(cannot run journalctl: {e})"),
        Ok(Ok(output)) => {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            if text.len() > JOURNAL_MAX_BYTES {
                let mut cut = text.len() - JOURNAL_MAX_BYTES;
                while !text.is_char_boundary(cut) {
                    cut += 1;
                }
                text = format!("(… earlier lines cut)\n{}", &text[cut..]);
            }
            if !output.status.success() {
                text.push_str(&format!(
                    "\n(journalctl exited with {}: {})",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
            }
            format!("Last journal lines (journalctl -u {unit} -n 50):\n\n{text}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names() {
        for ok in [
            "ferry-sync.service",
            "ferry-borg@home.service",
            "dev-disk-by\\x2duuid-aa.device",
            "backup.timer",
        ] {
            assert!(check_unit_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "ferry-sync",
            ".service",
            "--help.service",
            "a b.service",
            "x.service\nBcc: evil@x",
            "x.exe",
            "../../etc/passwd",
        ] {
            assert!(check_unit_name(bad).is_err(), "{bad:?}");
        }
    }
}
