//! Getting spooled messages to the mail server, and knowing when to stop
//! trying.
//!
//! One task delivers: it wakes when a message is queued, on Flush, or when
//! the retry timer runs out, and sends the outbox oldest first. An accepted
//! message is deleted; a connection error, a timeout or a 4xx reply stops
//! the pass and retries later with exponential backoff; a 5xx reply (or a
//! sendmail exit other than EX_TEMPFAIL) moves that message to the
//! dead-letter folder and the pass goes on. Transports: SMTP through lettre
//! (STARTTLS, implicit TLS, or plain to localhost; the password is read
//! from its file for each pass and never logged) or a sendmail-compatible
//! binary fed on stdin.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use ferry_config::Mail;
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{Address, AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Notify};

use crate::compose::Spooled;
use crate::outbox::Outbox;

/// What a send attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server took responsibility for the message.
    Accepted,
    /// Try again later (connection, timeout, 4xx, EX_TEMPFAIL).
    Transient(String),
    /// Never going to work (5xx, bad address).
    Permanent(String),
}

/// What delivery tells the service loop.
#[derive(Debug, Clone)]
pub enum Report {
    /// Accepted and removed from the outbox.
    Sent {
        /// Event id.
        id: String,
        /// Its subject.
        subject: String,
    },
    /// Refused for good; moved to the dead-letter folder.
    Dead {
        /// Event id (or file name when unreadable).
        id: String,
        /// The server's answer.
        error: String,
    },
    /// A pass stopped on a temporary error; the next try is in `retry`.
    Deferred {
        /// The error.
        error: String,
        /// When the next attempt is made.
        retry: Duration,
    },
}

/// The handle the service keeps: wake the deliverer, or flush now.
#[derive(Clone)]
pub struct Deliverer {
    wake: Arc<Notify>,
    flush: Arc<Notify>,
}

impl Deliverer {
    /// Something was queued: deliver when the backoff allows.
    pub fn queued(&self) {
        self.wake.notify_one();
    }

    /// Try everything now, forgetting the backoff.
    pub fn flush(&self) {
        self.flush.notify_one();
    }
}

/// Starts the delivery task; it runs until the returned handle is aborted.
pub fn spawn(
    mail: Mail,
    outbox: Outbox,
    reports: mpsc::Sender<Report>,
) -> (Deliverer, tokio::task::JoinHandle<()>) {
    let handle = Deliverer {
        wake: Arc::new(Notify::new()),
        flush: Arc::new(Notify::new()),
    };
    let (wake, flush) = (handle.wake.clone(), handle.flush.clone());
    let task = tokio::spawn(async move {
        let min = Duration::from_secs(mail.retry_min_seconds);
        let max = Duration::from_secs(mail.retry_max_seconds);
        let mut backoff: Option<Duration> = None;
        loop {
            let retry = backoff;
            match pass(&mail, &outbox, &reports).await {
                Ok(()) => backoff = None,
                Err(error) => {
                    let next = retry.map_or(min, |b| (b * 2).min(max));
                    backoff = Some(next);
                    tracing::warn!(
                        "mail not delivered, retrying in {}s: {error}",
                        next.as_secs()
                    );
                    let _ = reports.send(Report::Deferred { error, retry: next }).await;
                }
            }
            match backoff {
                // Nothing pending: sleep until something is queued or flushed.
                None => {
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = flush.notified() => {}
                    }
                }
                // Waiting out a backoff: a new message waits with the rest;
                // Flush tries at once.
                Some(wait) => {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = flush.notified() => {}
                    }
                }
            }
        }
    });
    (handle, task)
}

/// Sends every queued message, oldest first. Err on a temporary failure.
async fn pass(mail: &Mail, outbox: &Outbox, reports: &mpsc::Sender<Report>) -> Result<(), String> {
    let files = outbox
        .pending()
        .map_err(|e| format!("cannot list {}: {e}", outbox.queue_dir().display()))?;
    if files.is_empty() {
        return Ok(());
    }
    let transport = Transport::new(mail)?;
    for path in files {
        let message = match Outbox::load(&path) {
            Ok(m) => m,
            Err(bad) => {
                let error = format!("unreadable outbox file: {}", bad.reason);
                bury(outbox, &path, &path.display().to_string(), &error, reports).await;
                continue;
            }
        };
        match transport.send(&message).await {
            Outcome::Accepted => {
                if let Err(e) = outbox.delete(&message.id) {
                    // It would be sent again after a restart: at most one duplicate.
                    tracing::error!(
                        "mail {} sent but not removed from the outbox: {e}",
                        message.id
                    );
                }
                tracing::info!("mail {} accepted: {}", message.id, message.subject);
                let _ = reports
                    .send(Report::Sent {
                        id: message.id,
                        subject: message.subject,
                    })
                    .await;
            }
            Outcome::Transient(e) => return Err(e),
            Outcome::Permanent(e) => bury(outbox, &path, &message.id, &e, reports).await,
        }
    }
    Ok(())
}

async fn bury(
    outbox: &Outbox,
    path: &std::path::Path,
    id: &str,
    error: &str,
    reports: &mpsc::Sender<Report>,
) {
    match outbox.bury(path, error) {
        Ok(target) => tracing::error!(
            "mail {id} refused for good ({error}); kept in {} for a person to look at",
            target.display()
        ),
        Err(e) => tracing::error!("mail {id} refused for good ({error}) and cannot be moved: {e}"),
    }
    let _ = reports
        .send(Report::Dead {
            id: id.to_string(),
            error: error.to_string(),
        })
        .await;
}

/// The configured way out.
/// The systemd credential `name` (LoadCredential= in the unit), from
/// `$CREDENTIALS_DIRECTORY`: only this service can read it.
fn read_credential(name: &str) -> Result<String, String> {
    let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") else {
        return Err(format!(
            "password-credential = \"{name}\" but systemd passed no credentials: \
             run ferry-notifier from its unit, which has LoadCredential={name}"
        ));
    };
    let path = std::path::Path::new(&dir).join(name);
    std::fs::read_to_string(&path)
        .map(|p| p.trim_end_matches(['\r', '\n']).to_string())
        .map_err(|e| {
            format!(
                "cannot read the SMTP password credential {}: {e} \
                 (put the password in /etc/credstore/{name}, mode 0600, and restart ferry-notifier)",
                path.display()
            )
        })
}

enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Sendmail {
        binary: std::path::PathBuf,
        timeout: Duration,
    },
}

impl Transport {
    /// Builds the transport; reads the password file. Err is temporary (a
    /// password file can be fixed without restarting).
    fn new(mail: &Mail) -> Result<Transport, String> {
        let timeout = Duration::from_secs(mail.timeout_seconds);
        if let Some(binary) = mail.sendmail_binary() {
            return Ok(Transport::Sendmail {
                binary: binary.to_path_buf(),
                timeout,
            });
        }
        let host = mail.smtp_host.as_str();
        let builder = if mail.implicit_tls() {
            AsyncSmtpTransport::<Tokio1Executor>::relay(host)
                .map_err(|e| format!("SMTP TLS setup for {host}: {e}"))?
        } else if mail.starttls() {
            AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host)
                .map_err(|e| format!("SMTP STARTTLS setup for {host}: {e}"))?
        } else {
            // Plain: the configuration only allows it to a loopback host.
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        };
        let mut builder = builder.port(mail.port()).timeout(Some(timeout));
        if let Some(user) = &mail.username {
            let password = match (&mail.password_file, &mail.password_credential) {
                (Some(file), _) => std::fs::read_to_string(file)
                    .map_err(|e| {
                        format!("cannot read the SMTP password file {}: {e}", file.display())
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
                (None, Some(name)) => read_credential(name)?,
                (None, None) => String::new(),
            };
            builder = builder.credentials(Credentials::new(user.clone(), password));
        }
        Ok(Transport::Smtp(builder.build()))
    }

    async fn send(&self, message: &Spooled) -> Outcome {
        match self {
            Transport::Smtp(smtp) => {
                let envelope = match envelope(message) {
                    Ok(e) => e,
                    Err(e) => return Outcome::Permanent(e),
                };
                match smtp.send_raw(&envelope, message.message.as_bytes()).await {
                    Ok(_) => Outcome::Accepted,
                    Err(e) if e.is_permanent() => Outcome::Permanent(format!("SMTP: {e}")),
                    Err(e) => Outcome::Transient(format!("SMTP: {e}")),
                }
            }
            Transport::Sendmail { binary, timeout } => sendmail(binary, *timeout, message).await,
        }
    }
}

fn envelope(message: &Spooled) -> Result<Envelope, String> {
    let parse = |a: &str| {
        a.parse::<Address>()
            .map_err(|e| format!("`{a}` is not a usable address: {e}"))
    };
    let to = message
        .to
        .iter()
        .map(|a| parse(a))
        .collect::<Result<Vec<_>, _>>()?;
    Envelope::new(Some(parse(&message.from)?), to).map_err(|e| format!("envelope: {e}"))
}

/// sysexits EX_TEMPFAIL: sendmail's "try again later".
const EX_TEMPFAIL: i32 = 75;

/// `sendmail -i -f FROM -- TO…` with the message on stdin.
async fn sendmail(binary: &std::path::Path, timeout: Duration, message: &Spooled) -> Outcome {
    let run = async {
        let mut child = tokio::process::Command::new(binary)
            .args(["-i", "-f", &message.from, "--"])
            .args(&message.to)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Outcome::Transient(format!("cannot run {}: {e}", binary.display())))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(message.message.as_bytes())
                .await
                .map_err(|e| {
                    Outcome::Transient(format!("{}: writing the message: {e}", binary.display()))
                })?;
        }
        child
            .wait_with_output()
            .await
            .map_err(|e| Outcome::Transient(format!("{}: {e}", binary.display())))
    };
    match tokio::time::timeout(timeout, run).await {
        Err(_) => Outcome::Transient(format!("{} did not finish in time", binary.display())),
        Ok(Err(outcome)) => outcome,
        Ok(Ok(output)) => {
            let said = String::from_utf8_lossy(&output.stderr).trim().to_string();
            match output.status.code() {
                Some(0) => Outcome::Accepted,
                Some(EX_TEMPFAIL) | None => Outcome::Transient(format!(
                    "{} exited with {}: {said}",
                    binary.display(),
                    output.status
                )),
                Some(_) => Outcome::Permanent(format!(
                    "{} exited with {}: {said}",
                    binary.display(),
                    output.status
                )),
            }
        }
    }
}
