//! Turning what happened into a mail a person can act on, safely.
//!
//! Drive labels, borg's messages and hook output come from outside ferry's
//! control. They go into the body as they are; anything that reaches the
//! Subject is stripped of control characters first, and every header is
//! written by lettre's MIME builder (RFC 2047 encoding, folding), so no
//! input can start a header of its own. Each message carries its event id
//! in `X-Ferry-Event-Id` and a Message-ID derived from it, so a duplicate
//! after a crash is recognisable as one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_config::Mail;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::Mailbox;
use serde::{Deserialize, Serialize};

/// The header that carries a message's event id.
pub const EVENT_ID_HEADER: &str = "X-Ferry-Event-Id";

/// The longest subject ferry writes (before the prefix), in characters.
const SUBJECT_MAX: usize = 160;

/// What kind of mail a draft is. The hourly limit counts each class on
/// its own, and delivery sends failures first, so a failure is never held
/// behind success summaries, reminders or test mails.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// Something failed: DriveFailed, SyncFailed, BackupFailed, a failed
    /// unit, a repeated failure's follow-up.
    Failure,
    /// A reminder: a stale drive or profile.
    Reminder,
    /// A success summary.
    Success,
    /// A test mail (SendTest).
    Test,
    /// Anything written before classes existed (read from an old ledger
    /// or outbox).
    #[default]
    Other,
}

/// A mail before it has an id: what it is about and what it says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draft {
    /// What it is about, one short line for NotificationQueued, e.g.
    /// `SyncFailed offsite-a`.
    pub reason: String,
    /// The subject, before sanitising and the configured prefix.
    pub subject: String,
    /// The body, plain text.
    pub body: String,
    /// Its class (for the hourly limit and the delivery order).
    #[serde(default)]
    pub class: Class,
}

impl Draft {
    /// A draft of class `class`; `subject` is cleaned when the message is
    /// built.
    pub fn of(
        class: Class,
        reason: impl Into<String>,
        subject: impl Into<String>,
        body: String,
    ) -> Draft {
        Draft {
            reason: one_line(&reason.into(), SUBJECT_MAX),
            subject: subject.into(),
            body,
            class,
        }
    }

    /// A failure's draft.
    pub fn new(reason: impl Into<String>, subject: impl Into<String>, body: String) -> Draft {
        Draft::of(Class::Failure, reason, subject, body)
    }
}

/// A message ready for the outbox: the envelope and the whole RFC 5322
/// text, so delivery needs nothing but this file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spooled {
    /// The event id.
    pub id: String,
    /// The subject as sent (already clean).
    pub subject: String,
    /// What it is about.
    pub reason: String,
    /// Envelope sender.
    pub from: String,
    /// Envelope recipients.
    pub to: Vec<String>,
    /// Unix time it was queued.
    pub created: u64,
    /// Which failures this message reports (`Crypt1/offsite-a` → failure
    /// time), so a restart knows they were mailed even if the ledger was
    /// not written yet.
    #[serde(default)]
    pub covers: Vec<(String, u64)>,
    /// The message, formatted (ASCII: lettre encodes anything else).
    pub message: String,
    /// Its class: failures are delivered first.
    #[serde(default)]
    pub class: Class,
    /// Attempts whose outcome is unknown: the whole message had gone to
    /// the server and ferry-notifier stopped before hearing its answer.
    /// Written before the message's last byte is sent; a message is never
    /// sent once this reaches [`MAX_IN_DOUBT`], so it arrives at most twice.
    #[serde(default)]
    pub in_doubt: u32,
}

/// How many times a message may have reached the server without ferry
/// hearing the answer; beyond this it is not sent again but kept as a dead
/// letter for a person to look at (and re-send with ResendDeadLetter).
pub const MAX_IN_DOUBT: u32 = 2;

/// One line of printable text: control characters (CR, LF, tabs, escape
/// sequences, Unicode line separators) become spaces, runs of spaces
/// collapse, and it is cut at `max` characters.
pub fn one_line(text: &str, max: usize) -> String {
    let mut out = String::new();
    let mut last_space = true;
    for c in text.chars() {
        let c = if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{85}') {
            ' '
        } else {
            c
        };
        if c.is_whitespace() {
            if !last_space {
                out.push(' ');
            }
            last_space = true;
        } else {
            out.push(c);
            last_space = false;
        }
    }
    let trimmed = out.trim_end();
    match trimmed.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &trimmed[..cut]),
        None => trimmed.to_string(),
    }
}

/// A fresh event id: `ferry-<unix time>-<16 hex digits>`, sortable by time.
pub fn new_event_id(now: u64) -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != bytes.len() as isize {
        // Never expected; the time and pid still make a collision unlikely.
        let fallback = u64::from(std::process::id()) << 32
            ^ SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::from(d.subsec_nanos()))
                .unwrap_or(0);
        bytes = fallback.to_be_bytes();
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("ferry-{now:010}-{hex}")
}

/// This machine's host name, for Message-ID and bodies, reduced to
/// characters a header allows.
pub fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

/// Why a draft could not be made into a message.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    /// `from` or a `to` of `[mail]` does not parse.
    #[error("`{address}` is not a usable mail address: {source}; fix [mail] in ferry.toml")]
    Address {
        /// The address as configured.
        address: String,
        /// lettre's reason.
        source: lettre::address::AddressError,
    },
    /// lettre refused the message.
    #[error("cannot build the message: {0}")]
    Build(lettre::error::Error),
    /// The formatted message is not UTF-8 (never for a text draft).
    #[error("the formatted message is not text")]
    NotText,
}

/// Builds the message for `draft` with event id `id`, queued at `now`.
pub fn build(
    draft: &Draft,
    mail: &Mail,
    id: &str,
    now: u64,
    covers: Vec<(String, u64)>,
) -> Result<Spooled, ComposeError> {
    let address = |a: &str| {
        a.parse::<Mailbox>()
            .map_err(|source| ComposeError::Address {
                address: a.to_string(),
                source,
            })
    };
    let subject = format!(
        "{} {}",
        one_line(&mail.subject_prefix, 64),
        one_line(&draft.subject, SUBJECT_MAX)
    )
    .trim()
    .to_string();
    let mut builder = lettre::Message::builder()
        .from(address(&mail.from)?)
        .subject(subject.clone())
        .message_id(Some(format!("<{id}@{}>", hostname())))
        .date(UNIX_EPOCH + Duration::from_secs(now))
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str(EVENT_ID_HEADER),
            id.to_string(),
        ))
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str("Auto-Submitted"),
            "auto-generated".into(),
        ))
        .header(ContentType::TEXT_PLAIN);
    for to in &mail.to {
        builder = builder.to(address(to)?);
    }
    let message = builder
        .body(draft.body.clone())
        .map_err(ComposeError::Build)?;
    let message = String::from_utf8(message.formatted()).map_err(|_| ComposeError::NotText)?;
    Ok(Spooled {
        id: id.to_string(),
        subject,
        reason: draft.reason.clone(),
        from: mail.from.clone(),
        to: mail.to.clone(),
        created: now,
        covers,
        message,
        class: draft.class,
        in_doubt: 0,
    })
}

/// Bytes as a person reads them: 1.2 GiB.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A duration as a person reads it: 45 s, 3 min, 2 h 5 min, 35 days.
pub fn human_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        3600..=172_799 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        _ => format!("{} days", s / 86_400),
    }
}

/// A unix time in UTC, `2024-05-01 13:45:00 UTC`.
pub fn utc(unix: u64) -> String {
    let days = unix / 86_400;
    let rem = unix % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mail() -> Mail {
        let text = "[mail]\nfrom = \"ferry@nas\"\nto = [\"me@example.org\", \"you@example.org\"]\n";
        ferry_config::Config::parse(text, std::path::Path::new("t"))
            .expect("config")
            .mail
            .expect("mail")
    }

    fn header_block(message: &str) -> &str {
        message.split("\r\n\r\n").next().expect("headers")
    }

    #[test]
    fn one_line_strips_controls_and_cuts() {
        assert_eq!(one_line("a\r\nBcc: evil@x", 100), "a Bcc: evil@x");
        assert_eq!(one_line("\x1b[31mred\x1b[0m\t x", 100), "[31mred [0m x");
        assert_eq!(one_line("a\u{2028}b\u{85}c", 100), "a b c");
        assert_eq!(one_line("abcdef", 3), "abc…");
        assert_eq!(one_line("   ", 3), "");
    }

    #[test]
    fn a_hostile_subject_cannot_add_a_header() {
        let draft = Draft::new(
            "DriveFailed x",
            "drive evil\r\nBcc: evil@x\r\n\r\nbody",
            "label: evil\r\nBcc: evil@x\r\n".into(),
        );
        let spooled = build(&draft, &mail(), "ferry-1-ab", 1_700_000_000, vec![]).expect("build");
        let headers = header_block(&spooled.message);
        for line in headers.split("\r\n") {
            assert!(
                !line.to_ascii_lowercase().starts_with("bcc"),
                "{line:?} in\n{headers}"
            );
        }
        assert!(!spooled.subject.contains('\n') && !spooled.subject.contains('\r'));
        assert!(
            headers.contains("X-Ferry-Event-Id: ferry-1-ab"),
            "{headers}"
        );
        assert!(headers.contains("Message-ID: <ferry-1-ab@"), "{headers}");
        assert!(
            headers.contains("Auto-Submitted: auto-generated"),
            "{headers}"
        );
        assert!(spooled.message.is_ascii());
        assert_eq!(spooled.to, ["me@example.org", "you@example.org"]);
    }

    #[test]
    fn event_ids_are_unique_and_sortable() {
        let a = new_event_id(5);
        let b = new_event_id(5);
        assert_ne!(a, b);
        assert!(a.starts_with("ferry-0000000005-"), "{a}");
        assert!(new_event_id(1_700_000_000) > a);
    }

    #[test]
    fn humane_numbers() {
        assert_eq!(human_bytes(1_288_490_189), "1.2 GiB");
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_duration(180.4), "3 min");
        assert_eq!(human_duration(35.0 * 86_400.0), "35 days");
        assert_eq!(human_duration(7_500.0), "2 h 5 min");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_709_251_199), "2024-02-29 23:59:59 UTC");
    }
}
