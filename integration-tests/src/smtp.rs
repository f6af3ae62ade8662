//! A real SMTP server on loopback for tests and the demo: python3-aiosmtpd
//! behind a small script that stores each message and can be told to answer
//! 4xx or 5xx, or to be slow.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::require;

/// How long the server gets to start.
const WAIT: Duration = Duration::from_secs(15);

/// The SMTP server: aiosmtpd on a socket bound to 127.0.0.1 (port 0 unless
/// given), printing `PORT n` once it listens. Each accepted message is
/// written to OUT as `<n>.eml` (raw) and `<n>.txt` (envelope, headers with
/// CR/LF made visible, decoded body). OUT/mode steers the answers:
/// `ok`, `4xx N` (refuse the next N with 451), `5xx` (refuse with 550),
/// `slow S` (wait S seconds, then store unless the client is gone), `delay S`
/// (store, then wait S seconds before answering 250), `slow-rcpt S` (wait S
/// seconds before accepting each recipient, before the message is sent).
pub const SMTP_SERVER: &str = r#"
import asyncio, email, email.policy, os, socket, sys
from aiosmtpd.smtp import SMTP

out = sys.argv[1]
port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
counter = [0]

def mode():
    try:
        with open(os.path.join(out, "mode")) as f:
            return f.read().split()
    except FileNotFoundError:
        return ["ok"]

def write(name, data):
    tmp = os.path.join(out, "." + name)
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, os.path.join(out, name))

class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        m = mode()
        if m[0] == "slow-rcpt":
            await asyncio.sleep(float(m[1]))
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        m = mode()
        if m[0] == "4xx":
            left = int(m[1])
            if left > 0:
                with open(os.path.join(out, "mode"), "w") as f:
                    f.write("4xx %d" % (left - 1))
                return "451 4.3.0 test server: try again later"
        if m[0] == "5xx":
            return "550 5.7.1 test server: refused for good"
        if m[0] == "slow":
            # Take a while before committing; a client that went away
            # meanwhile never gets its message stored.
            await asyncio.sleep(float(m[1]))
            if server.transport is None or server.transport.is_closing():
                return "451 4.4.2 client went away"
        raw = envelope.original_content
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        lines = ["MAIL-FROM: " + envelope.mail_from]
        lines += ["RCPT-TO: " + r for r in envelope.rcpt_tos]
        lines.append("HEADERS")
        for k, v in msg.items():
            v = str(v)
            lines.append(k + ": " + v.replace("\r", "\\r").replace("\n", "\\n"))
        lines.append("BODY")
        body = msg.get_body(preferencelist=("plain",))
        lines.append(body.get_content() if body is not None else "")
        counter[0] += 1
        name = "%d-%d" % (os.getpid(), counter[0])
        write(name + ".eml", raw)
        write(name + ".txt", "\n".join(lines).encode())
        if m[0] == "delay":
            await asyncio.sleep(float(m[1]))
        return "250 2.0.0 accepted"

sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", port))
sock.listen(16)
loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)
server = loop.run_until_complete(
    loop.create_server(lambda: SMTP(Handler(), hostname="smtp.test"), sock=sock))
print("PORT %d" % sock.getsockname()[1], flush=True)
loop.run_forever()
"#;

pub fn python() -> Option<PathBuf> {
    ["/usr/bin/python3", "python3"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| {
            Command::new(p)
                .args(["-c", "import aiosmtpd"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

pub fn require_aiosmtpd() -> bool {
    require(
        "python3 with aiosmtpd is needed for a real SMTP server (apt-get install python3-aiosmtpd)",
        python().is_some(),
    )
}

/// A running test SMTP server; killed in Drop.
pub struct Smtp {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
}

impl Smtp {
    pub fn start(dir: &Path, port: u16) -> Smtp {
        std::fs::create_dir_all(dir).expect("smtp dir");
        let script = dir.join("server.py");
        std::fs::write(&script, SMTP_SERVER).expect("write server.py");
        let mut child = Command::new(python().expect("python3 with aiosmtpd"))
            .arg(&script)
            .arg(dir)
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("server.log")).expect("log"))
            .spawn()
            .expect("start the SMTP server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(WAIT).unwrap_or_default();
        let Some(port) = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
        else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the SMTP server did not start: {line:?}\n{}",
                std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
            );
        };
        Smtp {
            child: Some(child),
            port,
            dir: dir.to_path_buf(),
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn set_mode(&self, mode: &str) {
        std::fs::write(self.dir.join("mode"), mode).expect("mode");
    }

    /// Every message received so far, parsed.
    pub fn mails(&self) -> Vec<Received> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .expect("smtp dir")
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "txt")
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        names.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        names
            .iter()
            .map(|p| {
                let raw = std::fs::read(p.with_extension("eml")).unwrap_or_default();
                Received::parse(&std::fs::read_to_string(p).expect("read mail"), raw)
            })
            .collect()
    }

    /// Waits until `n` mails satisfy `pred`; returns them.
    pub async fn wait_for(
        &self,
        n: usize,
        pred: impl Fn(&Received) -> bool,
        within: Duration,
    ) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let found: Vec<Received> = self.mails().into_iter().filter(&pred).collect();
            if found.len() >= n {
                return found;
            }
            if Instant::now() > deadline {
                panic!(
                    "expected {n} matching mails within {within:?}, have {}; all:\n{:#?}",
                    found.len(),
                    self.mails()
                );
            }
            // The server writes files; a short sleep between looks is the
            // test's own wait, not the service's.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One received mail.
#[derive(Debug, Clone)]
pub struct Received {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub raw: Vec<u8>,
}

impl Received {
    pub fn parse(text: &str, raw: Vec<u8>) -> Received {
        let mut mail = Received {
            mail_from: String::new(),
            rcpt_to: Vec::new(),
            headers: Vec::new(),
            body: String::new(),
            raw,
        };
        let mut lines = text.split('\n');
        for line in lines.by_ref() {
            if let Some(v) = line.strip_prefix("MAIL-FROM: ") {
                mail.mail_from = v.into();
            } else if let Some(v) = line.strip_prefix("RCPT-TO: ") {
                mail.rcpt_to.push(v.into());
            } else if line == "HEADERS" {
                break;
            }
        }
        for line in lines.by_ref() {
            if line == "BODY" {
                break;
            }
            let (k, v) = line.split_once(": ").unwrap_or((line, ""));
            mail.headers.push((k.to_string(), v.to_string()));
        }
        mail.body = lines.collect::<Vec<_>>().join("\n");
        mail
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn subject(&self) -> &str {
        self.header("Subject").unwrap_or("")
    }

    pub fn id(&self) -> &str {
        self.header("X-Ferry-Event-Id").unwrap_or("")
    }
}
