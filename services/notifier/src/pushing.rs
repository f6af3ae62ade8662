//! Getting pushes (pings, ntfy) out over HTTP, with mail's guarantees.
//!
//! The push outbox (`<state>/notifier/push`) is delivered by the same
//! retry loop as mail ([`crate::deliver::retry_loop`], `[push]`'s retry
//! pacing), strictly oldest first. Each push is one blocking HTTP request
//! with ureq (rustls, no OpenSSL; connect and whole-request timeouts;
//! redirects are not followed; no proxy from the environment), run on
//! tokio's blocking pool together with the outbox writes around it, so
//! nothing blocks the service's runtime.
//!
//! At most twice, like mail: the letter is marked in doubt on disk before
//! the request and the mark is taken back on any answer, or when the
//! connection was never made; a push in doubt `MAX_IN_DOUBT` times becomes
//! a dead letter instead of being sent again. A 2xx removes it; 408, 429,
//! 5xx and network errors stop the pass and retry later (keeping the
//! order); any other answer dead-letters it (ListDeadLetters shows it).
//!
//! The ntfy token and the healthchecks ping key are read from their files
//! or credentials for each pass; the token only ever goes into the
//! Authorization header, the key only into the URL (`{ping-key}`) of the
//! request being sent, never into the outbox. URLs are not logged (a
//! healthchecks URL is a secret of its own): letters are named by id and
//! reason.

use std::time::Duration;

use ferry_config::{Push, PING_KEY};
use tokio::sync::mpsc;

use crate::compose::MAX_IN_DOUBT;
use crate::deliver::{bury, read_secret, retry_loop, Deliverer, Outcome, PassError, Report, Stop};
use crate::outbox::Outbox;
use crate::push::{outcome_of_status, PushLetter, Target};

/// The push delivery task (never ending), for the service to run as a
/// tracked task, and the handle that wakes it.
pub fn task(
    push: Push,
    outbox: Outbox<PushLetter>,
    reports: mpsc::Sender<Report>,
) -> (
    Deliverer,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let min = Duration::from_secs(push.retry_min_seconds);
    let max = Duration::from_secs(push.retry_max_seconds);
    let sender = reports.clone();
    retry_loop("push", min, max, reports, move |stop| {
        let (push, outbox, reports) = (push.clone(), outbox.clone(), sender.clone());
        async move { pass(&push, &outbox, &reports, &stop).await }
    })
}

/// What one letter came to.
enum Step {
    Sent,
    /// Refused for good, or unreadable: bury it with this reason.
    Dead(String),
    /// Stop the pass, try again later.
    Later(String),
}

/// Sends every queued push, oldest first. Err on a temporary failure.
async fn pass(
    push: &Push,
    outbox: &Outbox<PushLetter>,
    reports: &mpsc::Sender<Report>,
    stop: &Stop,
) -> Result<(), PassError> {
    let letters = outbox.queued().await.map_err(|source| PassError::List {
        dir: outbox.queue_dir().to_path_buf(),
        source,
    })?;
    if letters.is_empty() {
        return Ok(());
    }
    let secrets = Secrets::read(push).await?;
    let agent = agent(Duration::from_secs(push.timeout_seconds));
    for letter in letters {
        if stop.asked() {
            break;
        }
        let letter = match letter {
            Ok(l) => l,
            Err(bad) => {
                let error = format!("unreadable outbox file: {}", bad.reason);
                let name = bad.path.display().to_string();
                bury(outbox, &bad.path, &name, &error, reports).await;
                continue;
            }
        };
        let path = outbox.queue_dir().join(format!("{}.json", letter.id));
        let (o, a, k, l) = (
            outbox.clone(),
            agent.clone(),
            secrets.clone(),
            letter.clone(),
        );
        let step = tokio::task::spawn_blocking(move || deliver_one(&o, &a, &k, &l))
            .await
            .unwrap_or_else(|e| Step::Later(format!("internal error: {e}")));
        match step {
            Step::Sent => {
                tracing::info!("push {} delivered: {}", letter.id, letter.reason);
                let _ = reports
                    .send(Report::Sent {
                        id: letter.id,
                        subject: letter.reason,
                    })
                    .await;
            }
            Step::Dead(error) => bury(outbox, &path, &letter.id, &error, reports).await,
            Step::Later(error) => {
                return Err(PassError::Later(format!(
                    "{} ({}): {error}",
                    letter.id, letter.reason
                )))
            }
        }
    }
    Ok(())
}

/// The secrets a pass needs, read afresh for each pass (a file or a
/// credential can be fixed without a restart): the ntfy token and the
/// healthchecks ping key.
#[derive(Clone, Default)]
struct Secrets {
    ntfy_token: Option<String>,
    ping_key: Option<String>,
}

impl Secrets {
    async fn read(push: &Push) -> Result<Secrets, PassError> {
        let ntfy = push.ntfy.as_ref();
        let wanted = [
            (
                ntfy.and_then(|n| n.token_file.as_ref())
                    .map(|p| p.to_path_buf()),
                ntfy.and_then(|n| n.token_credential.clone()),
                "the ntfy token",
            ),
            (
                push.ping_key_file.as_ref().map(|p| p.to_path_buf()),
                push.ping_key_credential.clone(),
                "the healthchecks ping key",
            ),
        ];
        let [token, key] = tokio::task::spawn_blocking(move || {
            wanted.map(|(file, credential, what)| {
                read_secret(file.as_deref(), credential.as_deref(), what)
            })
        })
        .await
        .map_err(|e| PassError::Later(format!("internal error: {e}")))?;
        Ok(Secrets {
            ntfy_token: token?,
            ping_key: key?,
        })
    }
}

/// The HTTP client: rustls, timeouts, no redirects, no proxy, status codes
/// as answers (not errors).
fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .timeout_connect(Some(timeout))
        .max_redirects(0)
        .max_redirects_will_error(false)
        .http_status_as_error(false)
        .proxy(None)
        .user_agent(concat!("ferry-notifier/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent()
}

/// Marks, sends and settles one letter (blocking: run off the runtime).
fn deliver_one(
    outbox: &Outbox<PushLetter>,
    agent: &ureq::Agent,
    secrets: &Secrets,
    letter: &PushLetter,
) -> Step {
    if letter.in_doubt >= MAX_IN_DOUBT {
        return Step::Dead(format!(
            "not sent again: ferry-notifier stopped {} times while this push was being sent, so \
             it may have arrived; send it again with busctl call org.ferry.Notifier1 \
             /org/ferry/Notifier1 org.ferry.Notifier1 ResendDeadLetter sa{{sv}} {} 0",
            letter.in_doubt, letter.id
        ));
    }
    let mut marked = letter.clone();
    marked.in_doubt += 1;
    if let Err(e) = outbox.put(&marked) {
        return Step::Later(format!(
            "cannot mark it as being sent ({e}); not sending it"
        ));
    }
    let (outcome, answered) = request(agent, secrets, letter);
    if answered {
        if let Err(e) = outbox.put(letter) {
            tracing::warn!("cannot take back the in-doubt mark of {}: {e}", letter.id);
        }
    }
    match outcome {
        Outcome::Accepted => {
            if let Err(e) = outbox.delete(&letter.id) {
                tracing::error!(
                    "push {} delivered but not removed from the outbox: {e}",
                    letter.id
                );
            }
            Step::Sent
        }
        Outcome::Transient(e) => Step::Later(e),
        Outcome::Permanent(e) => Step::Dead(e),
    }
}

/// One POST; the outcome and whether the attempt is settled (an answer
/// came, or the request never left), so the in-doubt mark can go.
fn request(agent: &ureq::Agent, secrets: &Secrets, letter: &PushLetter) -> (Outcome, bool) {
    let request = match &letter.target {
        Target::Ping { url, .. } => match (&secrets.ping_key, url.contains(PING_KEY)) {
            (Some(key), true) => agent.post(url.replace(PING_KEY, key)),
            (None, true) => {
                return (
                    Outcome::Transient(format!(
                        "the URL needs {PING_KEY} but no ping key is configured in [push]"
                    )),
                    true,
                )
            }
            (_, false) => agent.post(url),
        },
        Target::Ntfy {
            url,
            title,
            priority,
            tags,
        } => {
            let mut r = agent
                .post(url)
                .header("Title", title.as_str())
                .header("Priority", priority.as_str())
                .header("Tags", tags.join(",").as_str());
            if let Some(token) = &secrets.ntfy_token {
                r = r.header("Authorization", format!("Bearer {token}").as_str());
            }
            r
        }
    };
    let request = request.header("Content-Type", "text/plain; charset=utf-8");
    match request.send(letter.body.as_bytes()) {
        Ok(response) => (outcome_of_status(response.status().as_u16()), true),
        Err(e) => {
            // Nothing reached the server when the connection was never made.
            let settled = matches!(e, ureq::Error::HostNotFound | ureq::Error::ConnectionFailed)
                || matches!(&e, ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused);
            match e {
                // The URL itself is wrong: it will never work.
                ureq::Error::BadUri(_) | ureq::Error::Http(_) => {
                    (Outcome::Permanent(describe(&e)), true)
                }
                _ => (Outcome::Transient(describe(&e)), settled),
            }
        }
    }
}

/// ureq's error in words, without the URL.
fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(what) => format!("no answer in time ({what})"),
        ureq::Error::HostNotFound => "the host name does not resolve".into(),
        ureq::Error::ConnectionFailed => "cannot connect".into(),
        ureq::Error::Io(io) => format!("network: {io}"),
        ureq::Error::BadUri(_) => "the URL is not valid; fix it in ferry.toml".into(),
        other => format!("HTTP: {other}"),
    }
}
