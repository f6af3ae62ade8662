//! The notifier's idea of "now". Staleness is about days and weeks, and a
//! test cannot wait weeks: production reads the system clock; a test sets
//! `FERRY_FAKE_NOW` (unix seconds) and the clock starts there and runs on at
//! real speed. The variable is a test hook and is read once, at start.

use std::time::Instant;

/// The environment variable tests use to set the starting time.
pub const FAKE_NOW_VAR: &str = "FERRY_FAKE_NOW";

/// Unix time, real or shifted for a test.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// (fake unix time at start, the instant it was taken) when faked.
    fake: Option<(u64, Instant)>,
}

/// `FERRY_FAKE_NOW` holds something that is not unix seconds.
#[derive(Debug, thiserror::Error)]
#[error("{FAKE_NOW_VAR}={0:?} is not unix seconds; unset it")]
pub struct BadFakeNow(String);

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock { fake: None }
    }

    /// A clock that starts at `unix` and runs at real speed.
    pub fn starting_at(unix: u64) -> Clock {
        Clock {
            fake: Some((unix, Instant::now())),
        }
    }

    /// The system clock, unless `FERRY_FAKE_NOW` is set (then it starts
    /// there). A value that is not a number is an error, not ignored.
    pub fn from_env() -> Result<Clock, BadFakeNow> {
        match std::env::var(FAKE_NOW_VAR) {
            Err(_) => Ok(Clock::system()),
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .map(|unix| {
                    tracing::warn!(
                        "{FAKE_NOW_VAR} is set: the clock starts at {unix} (a test hook)"
                    );
                    Clock::starting_at(unix)
                })
                .map_err(|_| BadFakeNow(text)),
        }
    }

    /// Seconds since the unix epoch.
    pub fn now(&self) -> u64 {
        match self.fake {
            None => ferry_service::unix_now(),
            Some((start, at)) => start + at.elapsed().as_secs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fake_clock_starts_where_told() {
        let clock = Clock::starting_at(1_000);
        assert!((1_000..1_002).contains(&clock.now()));
        assert!(Clock::system().now() > 1_600_000_000);
    }
}
