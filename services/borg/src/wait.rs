//! `ferry-borg start --wait PROFILE`: start a backup over the bus and exit
//! with its outcome.
//!
//! Why it exists: `ferry-backup@PROFILE.service` (run by the timer) must
//! tell the truth — `systemctl status`, `systemctl --failed` and OnFailure=
//! act on the unit's exit status, and a person reads the unit's journal. A
//! bare `busctl call … Start` only says the request was accepted. This
//! client subscribes to Borg1's signals *before* calling Start (so the end
//! cannot slip between the two), calls Start, waits for that job's end with
//! a time limit, prints the job's summary and exits:
//!
//! | outcome                 | exit |
//! |-------------------------|------|
//! | finished                | 0    |
//! | finished with warnings  | 2    |
//! | failed                  | 1    |
//! | skipped                 | 75 (the unit lists it in SuccessExitStatus=) |
//! | no end within --timeout, bus or argument trouble | 1 (64 for usage) |
//!
//! A later `ferryctl backup --wait` may replace it; it stays this small.

use std::process::ExitCode;
use std::time::Duration;

use ferry_interfaces::borg::{self, BorgProxy};
use futures_util::StreamExt;

/// The default bound on the wait: longer than borg's own command timeout
/// would allow a healthy job to take.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 3600);
/// Exit status for a job that made its archive with borg warnings.
pub const EXIT_WARNINGS: u8 = 2;
/// Exit status for a skipped job (EX_TEMPFAIL).
pub const EXIT_SKIPPED: u8 = 75;

/// The parsed command line of `start`.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    profile: String,
    timeout: Duration,
}

const USAGE: &str = "usage: ferry-borg start --wait [--timeout DURATION] PROFILE\n\n\
    Starts backup profile PROFILE through org.ferry.Borg1 on the system bus\n\
    (or DBUS_SYSTEM_BUS_ADDRESS), waits for the job's end and exits 0 when it\n\
    finished, 2 when it finished with borg warnings, 75 when it was skipped and\n\
    1 when it failed or did not end within the timeout (default 30 hours;\n\
    e.g. \"90s\", \"2 hours\"). The job's summary goes to stdout.";

fn parse(args: &[String]) -> Result<Request, String> {
    let mut wait = false;
    let mut timeout = DEFAULT_TIMEOUT;
    let mut profile = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--wait" => wait = true,
            "--timeout" => {
                let text = args.next().ok_or("--timeout needs a duration")?;
                timeout = ferry_config::Span::parse(text)?.duration();
            }
            other if other.starts_with('-') => {
                return Err(format!("unknown option `{}`", other.escape_debug()))
            }
            other if profile.is_none() => profile = Some(other.to_string()),
            other => return Err(format!("one profile only (got also `{other}`)")),
        }
    }
    if !wait {
        return Err("only `start --wait` is supported: it waits for the job's end".into());
    }
    Ok(Request {
        profile: profile.ok_or("name the profile to start")?,
        timeout,
    })
}

/// Runs `ferry-borg start ARGS` (the arguments after `start`).
pub fn main(args: &[String]) -> ExitCode {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let request = match parse(args) {
        Ok(request) => request,
        Err(e) => {
            eprintln!("ferry-borg start: {e}\n{USAGE}");
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ferry-borg start: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(start_and_wait(&request)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ferry-borg start: profile {}: {e}", request.profile);
            ExitCode::FAILURE
        }
    }
}

/// How a job ended, from its signal.
#[derive(Debug)]
enum JobEnd {
    Finished(String),
    Warned(String, String),
    Failed(String, String),
    Skipped(String),
}

async fn start_and_wait(request: &Request) -> Result<u8, String> {
    let connection = ferry_service::connect_system_bus()
        .await
        .map_err(|e| format!("cannot reach the system bus: {e}"))?;
    // Subscribe first: the job's end is never missed, however fast it is.
    let mut signals = ferry_service::subscribe(&connection, &[borg::INTERFACE])
        .await
        .map_err(|e| format!("cannot subscribe to {}: {e}", borg::INTERFACE))?;
    let proxy = BorgProxy::new(&connection)
        .await
        .map_err(|e| format!("cannot talk to {}: {e}", borg::BUS_NAME))?;
    let job = proxy
        .start(&request.profile)
        .await
        .map_err(|e| format!("Start failed: {e}"))?;
    println!(
        "job {job}: profile {} started; waiting for its end (at most {}s)",
        request.profile,
        request.timeout.as_secs()
    );
    let end = tokio::time::timeout(request.timeout, async {
        while let Some(message) = signals.next().await {
            let Ok(message) = message else { continue };
            if let Some(end) = end_of(&message, &job) {
                return Ok(end);
            }
        }
        Err("the bus connection closed before the job ended".to_string())
    })
    .await
    .map_err(|_| {
        format!(
            "job {job} did not end within {}s; it may still run (see Borg1.Jobs), or ferry-borg is stuck",
            request.timeout.as_secs()
        )
    })??;
    Ok(match end {
        JobEnd::Finished(archive) => {
            println!(
                "job {job}: finished: archive {archive}{}",
                size_of(&proxy, &request.profile).await
            );
            0
        }
        JobEnd::Warned(archive, warnings) => {
            println!(
                "job {job}: finished with warnings: archive {archive}{}; borg warned: {warnings}",
                size_of(&proxy, &request.profile).await
            );
            EXIT_WARNINGS
        }
        JobEnd::Failed(stage, message) => {
            println!("job {job}: failed at {stage}: {message}");
            1
        }
        JobEnd::Skipped(reason) => {
            println!("job {job}: skipped: {reason}");
            EXIT_SKIPPED
        }
    })
}

fn end_of(message: &zbus::Message, job: &str) -> Option<JobEnd> {
    let m = message.clone();
    if let Some(s) = borg::BackupFinished::from_message(m.clone()) {
        let a = s.args().ok()?;
        return (a.job == job).then(|| JobEnd::Finished(a.archive.to_string()));
    }
    if let Some(s) = borg::BackupFinishedWithWarnings::from_message(m.clone()) {
        let a = s.args().ok()?;
        return (a.job == job)
            .then(|| JobEnd::Warned(a.archive.to_string(), a.warnings.to_string()));
    }
    if let Some(s) = borg::BackupFailed::from_message(m.clone()) {
        let a = s.args().ok()?;
        return (a.job == job).then(|| JobEnd::Failed(a.stage.to_string(), a.message.to_string()));
    }
    if let Some(s) = borg::BackupSkipped::from_message(m) {
        let a = s.args().ok()?;
        return (a.job == job).then(|| JobEnd::Skipped(a.reason.to_string()));
    }
    None
}

/// ", 12.3 MB read, 42 files, 3.1 s" from GetStats, or nothing.
async fn size_of(proxy: &BorgProxy<'_>, profile: &str) -> String {
    let Ok(stats) = proxy.get_stats(profile).await else {
        return String::new();
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&stats) else {
        return String::new();
    };
    let s = &value["archive"]["stats"];
    match (s["original_size"].as_u64(), s["nfiles"].as_u64()) {
        (Some(bytes), Some(files)) => format!(
            " ({bytes} bytes read, {} deduplicated, {files} files, {:.1}s)",
            s["deduplicated_size"].as_u64().unwrap_or(0),
            value["archive"]["duration"].as_f64().unwrap_or(0.0)
        ),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_command_line() {
        assert_eq!(
            parse(&args(&["--wait", "nas"])),
            Ok(Request {
                profile: "nas".into(),
                timeout: DEFAULT_TIMEOUT
            })
        );
        assert_eq!(
            parse(&args(&["--wait", "--timeout", "90s", "nas"])).map(|r| r.timeout),
            Ok(Duration::from_secs(90))
        );
        assert!(parse(&args(&["nas"])).unwrap_err().contains("--wait"));
        assert!(parse(&args(&["--wait"])).unwrap_err().contains("profile"));
        assert!(parse(&args(&["--wait", "a", "b"])).is_err());
        assert!(parse(&args(&["--wait", "--timeout", "soon", "a"])).is_err());
    }
}
