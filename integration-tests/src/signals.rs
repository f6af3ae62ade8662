//! Recording every ferry signal on a bus, and waiting for them.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::watch;
use zbus::message::Type;
use zbus::zvariant::{Structure, Value};
use zbus::{Connection, MatchRule, Message, MessageStream};

use crate::METHOD_TIMEOUT;

/// One recorded signal.
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    /// e.g. `org.ferry.Led1`.
    pub interface: String,
    /// e.g. `ColorChanged`.
    pub member: String,
    /// The object path it was emitted on.
    pub path: String,
    /// The arguments as plain strings: strings as they are, numbers with
    /// `to_string`, booleans as `true`/`false`, object paths and signatures
    /// as their text, containers in zvariant's text format.
    pub args: Vec<String>,
    /// When the recorder received it.
    pub at: Instant,
}

impl fmt::Display for Recorded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}(", self.interface, self.member)?;
        for (i, arg) in self.args.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{arg:?}")?;
        }
        write!(f, ") on {}", self.path)
    }
}

/// Records every signal under the object path namespace `/org/ferry` seen on
/// a connection, from the moment [`SignalRecorder::new`] returns, in a
/// background task that reads the stream continuously. Needs a tokio runtime.
///
/// `wait_for` and `expect_none` look at everything recorded since `new`
/// (so a signal that came before the call is not missed); the `_from`
/// variants only at records from an index, taken with [`SignalRecorder::len`]
/// before triggering what should emit.
pub struct SignalRecorder {
    log: Arc<watch::Sender<Vec<Recorded>>>,
    started: Instant,
    task: tokio::task::JoinHandle<()>,
}

impl SignalRecorder {
    /// Subscribe on `conn`; the match rule is registered with the bus when
    /// this returns.
    pub async fn new(conn: &Connection) -> SignalRecorder {
        let rule = MatchRule::builder()
            .msg_type(Type::Signal)
            .path_namespace("/org/ferry")
            .expect("valid path namespace")
            .build();
        let mut stream = match tokio::time::timeout(
            METHOD_TIMEOUT,
            MessageStream::for_match_rule(rule, conn, Some(4096)),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => panic!("cannot subscribe to ferry signals: {e}"),
            Err(_) => panic!("subscribing to ferry signals timed out"),
        };
        let log = Arc::new(watch::Sender::new(Vec::new()));
        let sink = log.clone();
        let task = tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                if let Ok(msg) = msg {
                    if let Some(recorded) = decode(&msg) {
                        sink.send_modify(|log| log.push(recorded));
                    }
                }
            }
        });
        SignalRecorder {
            log,
            started: Instant::now(),
            task,
        }
    }

    /// A receiver that wakes on every new record (for printing them live).
    pub fn watch(&self) -> watch::Receiver<Vec<Recorded>> {
        self.log.subscribe()
    }

    /// When recording started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Everything recorded so far, oldest first.
    pub fn all(&self) -> Vec<Recorded> {
        self.log.borrow().clone()
    }

    /// How many signals have been recorded (an index for the `_from` methods).
    pub fn len(&self) -> usize {
        self.log.borrow().len()
    }

    /// Nothing recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many recorded `member` signals satisfy `pred`.
    pub fn count(&self, member: &str, pred: impl Fn(&Recorded) -> bool) -> usize {
        self.log
            .borrow()
            .iter()
            .filter(|r| r.member == member && pred(r))
            .count()
    }

    /// The first `member` signal (since `new`) that satisfies `pred`, waiting
    /// up to `timeout` for it. Panics on timeout, listing everything recorded.
    pub async fn wait_for(
        &self,
        member: &str,
        pred: impl Fn(&Recorded) -> bool,
        timeout: Duration,
    ) -> Recorded {
        self.wait_for_from(0, member, pred, timeout).await
    }

    /// Like [`wait_for`](Self::wait_for), but only records from index `start`
    /// on (see [`len`](Self::len)).
    pub async fn wait_for_from(
        &self,
        start: usize,
        member: &str,
        pred: impl Fn(&Recorded) -> bool,
        timeout: Duration,
    ) -> Recorded {
        match self.first_match(start, member, &pred, timeout).await {
            Some(found) => found,
            None => panic!(
                "no {member} signal matching the predicate (from record #{start}) within \
                 {timeout:?}; recorded so far:\n{}",
                self.listing()
            ),
        }
    }

    /// Panics if a `member` signal satisfying `pred` has been recorded (since
    /// `new`) or arrives within `within`; otherwise returns after `within`.
    pub async fn expect_none(
        &self,
        member: &str,
        pred: impl Fn(&Recorded) -> bool,
        within: Duration,
    ) {
        self.expect_none_from(0, member, pred, within).await
    }

    /// Like [`expect_none`](Self::expect_none), but only records from index
    /// `start` on.
    pub async fn expect_none_from(
        &self,
        start: usize,
        member: &str,
        pred: impl Fn(&Recorded) -> bool,
        within: Duration,
    ) {
        if let Some(found) = self.first_match(start, member, &pred, within).await {
            panic!(
                "unexpected signal {found}; recorded so far:\n{}",
                self.listing()
            );
        }
    }

    /// The first signal that is one of `members` and satisfies `pred`
    /// (for example a job's end: finished, failed or skipped), waiting up
    /// to `timeout`. Panics on timeout, listing everything recorded.
    pub async fn wait_for_any(
        &self,
        members: &[&str],
        pred: impl Fn(&Recorded) -> bool,
        timeout: Duration,
    ) -> Recorded {
        let any = |r: &Recorded| members.contains(&r.member.as_str()) && pred(r);
        match self.first_where(0, &any, timeout).await {
            Some(found) => found,
            None => panic!(
                "none of {members:?} matching the predicate within {timeout:?}; recorded so far:\n{}",
                self.listing()
            ),
        }
    }

    async fn first_match(
        &self,
        start: usize,
        member: &str,
        pred: &impl Fn(&Recorded) -> bool,
        timeout: Duration,
    ) -> Option<Recorded> {
        self.first_where(
            start,
            &|r: &Recorded| r.member == member && pred(r),
            timeout,
        )
        .await
    }

    async fn first_where(
        &self,
        start: usize,
        pred: &impl Fn(&Recorded) -> bool,
        timeout: Duration,
    ) -> Option<Recorded> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.log.subscribe();
        loop {
            let found = rx
                .borrow_and_update()
                .iter()
                .skip(start)
                .find(|r| pred(r))
                .cloned();
            if found.is_some() {
                return found;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// Everything recorded, one per line with its time since `new`.
    pub fn listing(&self) -> String {
        let log = self.log.borrow();
        if log.is_empty() {
            return "  (nothing)".to_string();
        }
        log.iter()
            .enumerate()
            .map(|(i, r)| {
                format!(
                    "  #{i} +{:.3}s {r}",
                    r.at.saturating_duration_since(self.started).as_secs_f64()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for SignalRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn decode(msg: &Message) -> Option<Recorded> {
    let header = msg.header();
    let at = Instant::now();
    Some(Recorded {
        interface: header.interface()?.to_string(),
        member: header.member()?.to_string(),
        path: header.path()?.to_string(),
        args: render_body(msg),
        at,
    })
}

fn render_body(msg: &Message) -> Vec<String> {
    let body = msg.body();
    if body.signature() == &zbus::zvariant::Signature::Unit {
        return Vec::new();
    }
    match body.deserialize::<Structure>() {
        Ok(fields) => fields.fields().iter().map(render).collect(),
        Err(e) => vec![format!("<undecodable body ({}): {e}>", body.signature())],
    }
}

/// One value as a plain string.
fn render(value: &Value) -> String {
    match value {
        Value::U8(v) => v.to_string(),
        Value::Bool(v) => v.to_string(),
        Value::I16(v) => v.to_string(),
        Value::U16(v) => v.to_string(),
        Value::I32(v) => v.to_string(),
        Value::U32(v) => v.to_string(),
        Value::I64(v) => v.to_string(),
        Value::U64(v) => v.to_string(),
        Value::F64(v) => v.to_string(),
        Value::Str(v) => v.to_string(),
        Value::Signature(v) => v.to_string(),
        Value::ObjectPath(v) => v.to_string(),
        Value::Value(v) => render(v),
        other => other.to_string(),
    }
}
