//! Getting spooled messages to the mail server, and knowing when to stop
//! trying.
//!
//! One task delivers: it wakes when a message is queued, on Flush, or when
//! the retry timer runs out, and sends the outbox failures first, each
//! class oldest first. An accepted
//! message is deleted; a connection error, a timeout or a 4xx reply stops
//! the pass and retries later with exponential backoff; a 5xx reply (or a
//! sendmail exit other than EX_TEMPFAIL) moves that message to the
//! dead-letter folder and the pass goes on. Transports: SMTP through
//! lettre's connection (STARTTLS, implicit TLS, or plain to localhost; the
//! password is read from its file for each pass and never logged) or a
//! sendmail-compatible binary fed on stdin.
//!
//! At most twice: just before the message's last byte goes to the server
//! (SMTP's end of DATA; for sendmail, before it runs), the spooled file is
//! rewritten durably with one more attempt "in doubt"; a definite answer
//! takes it back. A kill between the two leaves the mark, so after a
//! restart the message is sent once more; a message in doubt
//! [`MAX_IN_DOUBT`] times is not sent again but becomes a dead letter
//! saying so (ListDeadLetters shows it, ResendDeadLetter sends it anyway).

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use ferry_config::Mail;
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::Address;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Notify};

use crate::compose::{Spooled, MAX_IN_DOUBT};
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

/// The handle the service keeps: wake the deliverer, flush now, or stop.
#[derive(Clone)]
pub struct Deliverer {
    wake: Arc<Notify>,
    flush: Arc<Notify>,
    stop: Arc<Stop>,
}

/// Asked to stop: a pass ends after the letter it is settling (sent and
/// removed, buried, or left with its in-doubt mark), never in between.
#[derive(Default)]
pub struct Stop {
    asked: std::sync::atomic::AtomicBool,
    notify: Notify,
}

impl Stop {
    /// Whether the service is stopping.
    pub fn asked(&self) -> bool {
        self.asked.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Deliverer {
    /// The service stops: end after the letter being settled.
    pub fn stop(&self) {
        self.stop
            .asked
            .store(true, std::sync::atomic::Ordering::Release);
        self.stop.notify.notify_one();
    }

    /// Something was queued: deliver when the backoff allows.
    pub fn queued(&self) {
        self.wake.notify_one();
    }

    /// Try everything now, forgetting the backoff.
    pub fn flush(&self) {
        self.flush.notify_one();
    }
}

/// The mail delivery task (never ending), for the service to run as a
/// tracked task, and the handle that wakes it.
pub fn task(
    mail: Mail,
    outbox: Outbox,
    reports: mpsc::Sender<Report>,
) -> (
    Deliverer,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let min = Duration::from_secs(mail.retry_min_seconds);
    let max = Duration::from_secs(mail.retry_max_seconds);
    let sender = reports.clone();
    retry_loop("mail", min, max, reports, move |stop| {
        let (mail, outbox, reports) = (mail.clone(), outbox.clone(), sender.clone());
        async move { pass(&mail, &outbox, &reports, &stop).await }
    })
}

/// The retry policy every channel shares: run `pass` when something is
/// queued or flushed; after a temporary failure (Err) wait `min`, doubling
/// up to `max`, Flush cutting the wait short. Nothing pending: no timer.
/// [`Deliverer::stop`] ends it between letters (`pass` is handed the
/// [`Stop`] to look at).
pub fn retry_loop<F, Fut>(
    what: &'static str,
    min: Duration,
    max: Duration,
    reports: mpsc::Sender<Report>,
    mut pass: F,
) -> (
    Deliverer,
    impl std::future::Future<Output = ()> + Send + 'static,
)
where
    F: FnMut(Arc<Stop>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), PassError>> + Send,
{
    let handle = Deliverer {
        wake: Arc::new(Notify::new()),
        flush: Arc::new(Notify::new()),
        stop: Arc::default(),
    };
    let (wake, flush, stop) = (
        handle.wake.clone(),
        handle.flush.clone(),
        handle.stop.clone(),
    );
    let task = async move {
        let mut backoff: Option<Duration> = None;
        loop {
            if stop.asked() {
                return;
            }
            let retry = backoff;
            match pass(stop.clone()).await {
                Ok(()) => backoff = None,
                Err(error) => {
                    let error = error.to_string();
                    let next = retry.map_or(min, |b| (b * 2).min(max));
                    backoff = Some(next);
                    tracing::warn!(
                        "{what} not delivered, retrying in {}s: {error}",
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
                        _ = stop.notify.notified() => {}
                    }
                }
                // Waiting out a backoff: a new message waits with the rest;
                // Flush tries at once.
                Some(wait) => {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = flush.notified() => {}
                        _ = stop.notify.notified() => {}
                    }
                }
            }
        }
    };
    (handle, task)
}

/// Why a delivery pass stopped before the outbox was empty; the next
/// pass is after the backoff.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The outbox cannot be listed.
    #[error("cannot list {}: {source}", dir.display())]
    List {
        /// The outbox folder.
        dir: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A secret the transport needs cannot be read.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The server (or the network, or sendmail) said "later".
    #[error("{0}")]
    Later(String),
}

/// Sends every queued message, failures first. Err on a temporary failure.
async fn pass(
    mail: &Mail,
    outbox: &Outbox,
    reports: &mpsc::Sender<Report>,
    stop: &Stop,
) -> Result<(), PassError> {
    let messages = outbox.queued().await.map_err(|source| PassError::List {
        dir: outbox.queue_dir().to_path_buf(),
        source,
    })?;
    if messages.is_empty() {
        return Ok(());
    }
    let transport = {
        let mail = mail.clone();
        tokio::task::spawn_blocking(move || Transport::new(&mail))
            .await
            .map_err(|e| PassError::Later(format!("internal error: {e}")))??
    };
    for message in messages {
        if stop.asked() {
            break;
        }
        let message = match message {
            Ok(m) => m,
            Err(bad) => {
                let error = format!("unreadable outbox file: {}", bad.reason);
                let name = bad.path.display().to_string();
                bury(outbox, &bad.path, &name, &error, reports).await;
                continue;
            }
        };
        deliver_one(&transport, outbox, message, reports).await?;
    }
    Ok(())
}

/// Sends one message and settles it in the outbox (deleted, buried, or
/// left for the next pass: Err).
async fn deliver_one(
    transport: &Transport,
    outbox: &Outbox,
    message: Spooled,
    reports: &mpsc::Sender<Report>,
) -> Result<(), PassError> {
    let path = outbox.queue_dir().join(format!("{}.json", message.id));
    if message.in_doubt >= MAX_IN_DOUBT {
        let error = format!(
            "not sent again: ferry-notifier stopped {} times while the mail server was \
             accepting this message, so it may already have arrived (up to {} times); if it \
             did not, send it again with busctl call org.ferry.Notifier1 \
             /org/ferry/Notifier1 org.ferry.Notifier1 ResendDeadLetter sa{{sv}} {} 0",
            message.in_doubt, message.in_doubt, message.id
        );
        bury(outbox, &path, &message.id, &error, reports).await;
        return Ok(());
    }
    let mut marked = message.clone();
    marked.in_doubt += 1;
    let mark = outbox.spool(vec![marked]);
    match transport.send(&message, mark).await {
        Sent::Accepted => {
            if let Err(e) = outbox.remove(&message.id).await {
                // It would be sent again after a restart: it is marked
                // in doubt, so at most once more.
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
        Sent::Answered(outcome, marked) => {
            // The server answered: the attempt is not in doubt any more.
            if marked {
                if let Err(e) = outbox.spool(vec![message.clone()]).await {
                    tracing::warn!("cannot take back the in-doubt mark of {}: {e}", message.id);
                }
            }
            match outcome {
                Outcome::Transient(e) => return Err(PassError::Later(e)),
                Outcome::Permanent(e) => bury(outbox, &path, &message.id, &e, reports).await,
                Outcome::Accepted => {}
            }
        }
        // No answer after the whole message went out: it stays in doubt.
        Sent::Unknown(e) => return Err(PassError::Later(e)),
    }
    Ok(())
}

/// How an attempt ended, as far as the in-doubt mark is concerned.
#[derive(Debug)]
enum Sent {
    /// The server accepted the message.
    Accepted,
    /// The server (or sendmail) gave a definite answer other than
    /// acceptance, or the attempt failed before the message's last byte;
    /// `true` when the in-doubt mark was written and must be taken back.
    Answered(Outcome, bool),
    /// The whole message went out and no answer came: it may have arrived.
    Unknown(String),
}

pub(crate) async fn bury<L: crate::outbox::Letter + Send + 'static>(
    outbox: &Outbox<L>,
    path: &std::path::Path,
    id: &str,
    error: &str,
    reports: &mpsc::Sender<Report>,
) {
    match outbox.move_to_dead(path, error).await {
        Ok(target) => tracing::error!(
            "{id} refused for good ({error}); kept in {} for a person to look at",
            target.display()
        ),
        Err(e) => tracing::error!("{id} refused for good ({error}) and cannot be moved: {e}"),
    }
    let _ = reports
        .send(Report::Dead {
            id: id.to_string(),
            error: error.to_string(),
        })
        .await;
}

/// A secret (`what`: "the SMTP password") from its file (root, not
/// readable by others) or its systemd credential `name` (LoadCredential=
/// in the unit, from `$CREDENTIALS_DIRECTORY`: only this service can read
/// it); None with neither. Read for each delivery pass, never logged.
pub(crate) fn read_secret(
    file: Option<&std::path::Path>,
    credential: Option<&str>,
    what: &'static str,
) -> Result<Option<String>, SecretError> {
    let text = match (file, credential) {
        (Some(file), _) => {
            let mut text = String::new();
            let mut opened = ferry_config::paths::open_secret(file, &format!("{what} file"))
                .map_err(SecretError::Refused)?;
            std::io::Read::read_to_string(&mut opened, &mut text).map_err(|source| {
                SecretError::File {
                    what,
                    path: file.to_path_buf(),
                    source,
                }
            })?;
            text
        }
        (None, Some(name)) => {
            let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") else {
                return Err(SecretError::NoCredentials {
                    what,
                    name: name.to_string(),
                });
            };
            let path = std::path::Path::new(&dir).join(name);
            std::fs::read_to_string(&path).map_err(|source| SecretError::Credential {
                what,
                path: path.clone(),
                name: name.to_string(),
                source,
            })?
        }
        (None, None) => return Ok(None),
    };
    Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()))
}

/// Why a secret (a password, a token, a ping key) cannot be read. Never
/// holds the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file is refused (missing, readable by others, not a file).
    #[error("{0}")]
    Refused(String),
    /// The file cannot be read.
    #[error("cannot read {what} file {}: {source}", path.display())]
    File {
        /// Which secret.
        what: &'static str,
        /// Its file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A credential is configured but systemd passed none.
    #[error(
        "{what} is the credential \"{name}\" but systemd passed no credentials: \
         run ferry-notifier from its unit, which has LoadCredential={name}"
    )]
    NoCredentials {
        /// Which secret.
        what: &'static str,
        /// The credential's name.
        name: String,
    },
    /// The credential cannot be read.
    #[error(
        "cannot read {what} credential {}: {source} \
         (put it in /etc/credstore/{name}, mode 0600, and restart ferry-notifier)",
        path.display()
    )]
    Credential {
        /// Which secret.
        what: &'static str,
        /// Where systemd put it.
        path: std::path::PathBuf,
        /// The credential's name.
        name: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The configured way out.
enum Transport {
    Smtp(Smtp),
    Sendmail {
        binary: std::path::PathBuf,
        timeout: Duration,
    },
}

/// An SMTP server as `[mail]` describes it.
struct Smtp {
    host: String,
    port: u16,
    security: Security,
    timeout: Duration,
    credentials: Option<Credentials>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Security {
    Implicit,
    Starttls,
    /// Plain: the configuration only allows it to a loopback host.
    None,
}

impl Transport {
    /// Builds the transport; reads the password file. Err is temporary (a
    /// password file can be fixed without restarting).
    fn new(mail: &Mail) -> Result<Transport, SecretError> {
        let timeout = Duration::from_secs(mail.timeout_seconds);
        if let Some(binary) = mail.sendmail_binary() {
            return Ok(Transport::Sendmail {
                binary: binary.to_path_buf(),
                timeout,
            });
        }
        let security = if mail.implicit_tls() {
            Security::Implicit
        } else if mail.starttls() {
            Security::Starttls
        } else {
            Security::None
        };
        let credentials = match &mail.username {
            Some(user) => Some(Credentials::new(user.clone(), smtp_password(mail)?)),
            None => None,
        };
        Ok(Transport::Smtp(Smtp {
            host: mail.smtp_host.clone(),
            port: mail.port(),
            security,
            timeout,
            credentials,
        }))
    }

    /// Sends one message; `mark` durably records an attempt in doubt and
    /// is awaited right before the message's last byte leaves.
    async fn send(
        &self,
        message: &Spooled,
        mark: impl std::future::Future<Output = std::io::Result<()>>,
    ) -> Sent {
        match self {
            Transport::Smtp(smtp) => smtp.send(message, mark).await,
            Transport::Sendmail { binary, timeout } => {
                if let Err(e) = mark.await {
                    return not_marked(&message.id, e);
                }
                match sendmail(binary, *timeout, message).await {
                    Outcome::Accepted => Sent::Accepted,
                    other => Sent::Answered(other, true),
                }
            }
        }
    }
}

/// The in-doubt mark of `id` could not be written: not sent, try later.
fn not_marked(id: &str, e: std::io::Error) -> Sent {
    Sent::Answered(
        Outcome::Transient(format!(
            "cannot mark {id} as being sent ({e}); not sending it"
        )),
        false,
    )
}

/// The SMTP password from its file or its systemd credential (empty with
/// neither).
fn smtp_password(mail: &Mail) -> Result<String, SecretError> {
    read_secret(
        mail.password_file.as_deref(),
        mail.password_credential.as_deref(),
        "the SMTP password",
    )
    .map(Option::unwrap_or_default)
}

/// lettre's error as an outcome: permanent (5xx, bad address) or not.
fn smtp_outcome(e: &lettre::transport::smtp::Error) -> Outcome {
    if e.is_permanent() {
        Outcome::Permanent(format!("SMTP: {e}"))
    } else {
        Outcome::Transient(format!("SMTP: {e}"))
    }
}

impl Smtp {
    /// Connects, says hello, upgrades to TLS and logs in as configured.
    async fn connect(&self) -> Result<AsyncSmtpConnection, lettre::transport::smtp::Error> {
        let hello = ClientId::default();
        let tls = || TlsParameters::new(self.host.clone());
        let implicit = match self.security {
            Security::Implicit => Some(tls()?),
            _ => None,
        };
        let mut connection = AsyncSmtpConnection::connect_tokio1(
            (self.host.as_str(), self.port),
            Some(self.timeout),
            &hello,
            implicit,
            None,
        )
        .await?;
        if self.security == Security::Starttls {
            connection.starttls(tls()?, &hello).await?;
        }
        if let Some(credentials) = &self.credentials {
            connection
                .auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                .await?;
        }
        Ok(connection)
    }

    async fn send(
        &self,
        message: &Spooled,
        mark: impl std::future::Future<Output = std::io::Result<()>>,
    ) -> Sent {
        use lettre::transport::smtp::commands::{Data, Mail as MailCommand, Rcpt};
        let envelope = match envelope(message) {
            Ok(e) => e,
            Err(e) => return Sent::Answered(Outcome::Permanent(e.to_string()), false),
        };
        let before = async {
            let mut connection = self.connect().await?;
            connection
                .command(MailCommand::new(envelope.from().cloned(), vec![]))
                .await?;
            for to in envelope.to() {
                connection.command(Rcpt::new(to.clone(), vec![])).await?;
            }
            connection.command(Data).await?;
            Ok::<_, lettre::transport::smtp::Error>(connection)
        };
        let mut connection = match tokio::time::timeout(self.timeout * 4, before).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Sent::Answered(smtp_outcome(&e), false),
            Err(_) => {
                return Sent::Answered(
                    Outcome::Transient(format!(
                        "SMTP: {}:{} did not get to DATA within {:?}",
                        self.host,
                        self.port,
                        self.timeout * 4
                    )),
                    false,
                )
            }
        };
        if let Err(e) = mark.await {
            connection.abort().await;
            return not_marked(&message.id, e);
        }
        let answer =
            tokio::time::timeout(self.timeout, connection.message(message.message.as_bytes()))
                .await;
        match answer {
            Ok(Ok(_)) => {
                let _ = tokio::time::timeout(self.timeout, connection.quit()).await;
                Sent::Accepted
            }
            // A reply code: the server decided, the message is not there.
            Ok(Err(e)) if e.status().is_some() => Sent::Answered(smtp_outcome(&e), true),
            Ok(Err(e)) => Sent::Unknown(format!(
                "SMTP: no answer after the message was sent ({e}); it may have arrived"
            )),
            Err(_) => Sent::Unknown(format!(
                "SMTP: no answer within {:?} after the message was sent; it may have arrived",
                self.timeout
            )),
        }
    }
}

/// A spooled message whose addresses do not make an envelope.
#[derive(Debug, thiserror::Error)]
enum EnvelopeError {
    #[error("`{address}` is not a usable address: {source}")]
    Address {
        address: String,
        source: lettre::address::AddressError,
    },
    #[error("envelope: {0}")]
    Envelope(lettre::error::Error),
}

fn envelope(message: &Spooled) -> Result<Envelope, EnvelopeError> {
    let parse = |a: &str| {
        a.parse::<Address>()
            .map_err(|source| EnvelopeError::Address {
                address: a.to_string(),
                source,
            })
    };
    let to = message
        .to
        .iter()
        .map(|a| parse(a))
        .collect::<Result<Vec<_>, _>>()?;
    Envelope::new(Some(parse(&message.from)?), to).map_err(EnvelopeError::Envelope)
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
