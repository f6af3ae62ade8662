//! Times, durations and sizes in a person's words.
//!
//! ferry's interfaces carry unix seconds and bytes; people read "3 days ago"
//! and "1.2 GiB". Pure functions of the values and of `now`, so they are
//! tested without a clock.

use chrono::{Local, TimeZone};

/// "just now", "5 minutes ago", "3 days ago" — how long before `now` `then` was.
pub fn ago(now: u64, then: u64) -> String {
    if then > now {
        return format!("in {}", span(then - now));
    }
    let seconds = now - then;
    if seconds < 60 {
        "just now".into()
    } else {
        format!("{} ago", span(seconds))
    }
}

/// "in 3 hours", or "overdue by 5 minutes" for a time before `now`.
pub fn until(now: u64, then: u64) -> String {
    if then >= now {
        if then - now < 60 {
            "now".into()
        } else {
            format!("in {}", span(then - now))
        }
    } else {
        format!("overdue by {}", span(now - then))
    }
}

/// The largest whole unit: "45 seconds", "1 minute", "3 hours", "12 days".
pub fn span(seconds: u64) -> String {
    let (count, unit) = match seconds {
        0..=59 => (seconds, "second"),
        60..=3599 => (seconds / 60, "minute"),
        3600..=86_399 => (seconds / 3600, "hour"),
        _ => (seconds / 86_400, "day"),
    };
    format!("{count} {unit}{}", if count == 1 { "" } else { "s" })
}

/// A duration given in seconds with a fraction: "0.4 s", "12 s", "3 minutes".
pub fn duration(seconds: f64) -> String {
    if seconds < 10.0 {
        format!("{seconds:.1} s")
    } else if seconds < 120.0 {
        format!("{seconds:.0} s")
    } else {
        span(seconds as u64)
    }
}

/// Unix seconds as the local date and time, "2026-11-24 14:03".
pub fn local(time: u64) -> String {
    match Local.timestamp_opt(time as i64, 0).single() {
        Some(t) => t.format("%Y-%m-%d %H:%M").to_string(),
        None => format!("@{time}"),
    }
}

/// Unix seconds as the local time of day, "14:03:22".
pub fn clock(time: u64) -> String {
    match Local.timestamp_opt(time as i64, 0).single() {
        Some(t) => t.format("%H:%M:%S").to_string(),
        None => format!("@{time}"),
    }
}

/// Bytes in binary units, "512 B", "3.4 MiB", "1.2 GiB".
pub fn bytes(count: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if count < 1024 {
        return format!("{count} B");
    }
    let mut value = count as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ago_uses_the_largest_whole_unit() {
        assert_eq!(ago(1000, 990), "just now");
        assert_eq!(ago(10_000, 10_000 - 60), "1 minute ago");
        assert_eq!(ago(10_000, 10_000 - 7200), "2 hours ago");
        assert_eq!(ago(1_000_000, 1_000_000 - 3 * 86_400 - 5), "3 days ago");
        assert_eq!(ago(100, 400), "in 5 minutes");
    }

    #[test]
    fn until_says_overdue_for_the_past() {
        assert_eq!(until(1000, 1000 + 3 * 3600), "in 3 hours");
        assert_eq!(until(1000, 1010), "now");
        assert_eq!(until(1000, 700), "overdue by 5 minutes");
    }

    #[test]
    fn bytes_in_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024 / 2), "1.5 GiB");
        assert_eq!(bytes(200 * 1024 * 1024), "200 MiB");
    }

    #[test]
    fn durations_keep_a_fraction_only_when_short() {
        assert_eq!(duration(0.42), "0.4 s");
        assert_eq!(duration(42.4), "42 s");
        assert_eq!(duration(600.0), "10 minutes");
    }
}
