//! The bounded failure history Sync1, Borg1 and Crypt1 expose as
//! `FailureHistory`, so that a notifier that was not running (crashed,
//! restarting, exit 78) mails every failure it missed, not only the last
//! one per subject that LastFailures keeps.
//!
//! Each failure gets an id that is unique across restarts of the service
//! (unix nanoseconds, process id and a counter), the newest
//! [`FAILURE_HISTORY`] are kept, oldest first. The services persist the list
//! with the rest of their state (ferry-crypt keeps it in memory).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_interfaces::FailureEvent;

/// How many failures a service keeps.
pub const FAILURE_HISTORY: usize = 64;

/// A new failure of `subject`, now, with a fresh id.
pub fn failure_event(subject: &str, stage: &str, message: &str, job: &str) -> FailureEvent {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    FailureEvent {
        id: format!("{:016x}-{:x}-{n}", now.as_nanos(), std::process::id()),
        subject: subject.to_string(),
        time: now.as_secs(),
        stage: stage.to_string(),
        message: message.to_string(),
        job: job.to_string(),
    }
}

/// Appends `event`, dropping the oldest beyond [`FAILURE_HISTORY`].
pub fn remember(history: &mut Vec<FailureEvent>, event: FailureEvent) {
    history.push(event);
    if history.len() > FAILURE_HISTORY {
        let excess = history.len() - FAILURE_HISTORY;
        history.drain(..excess);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_the_history_is_bounded() {
        let mut history = Vec::new();
        for k in 0..FAILURE_HISTORY + 5 {
            remember(
                &mut history,
                failure_event("home", "create", &format!("m{k}"), ""),
            );
        }
        assert_eq!(history.len(), FAILURE_HISTORY);
        assert_eq!(history[0].message, "m5");
        let mut ids: Vec<&str> = history.iter().map(|e| e.id.as_str()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), FAILURE_HISTORY);
    }
}
