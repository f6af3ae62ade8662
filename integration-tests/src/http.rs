//! A small HTTP/1.1 server on loopback that records every request, for the
//! notifier's pushes (healthchecks pings, ntfy): the real protocol over a
//! real socket, answered with a status the test chooses per path.
//!
//! One thread accepts; each request is read whole (headers, then
//! `Content-Length` bytes of body), recorded, answered and the connection
//! closed. [`HttpServer::stop`] closes the listening socket, so the port
//! refuses connections (a server that is down); [`HttpServer::start`] on
//! the same port brings it back.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A request as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// GET, POST, …
    pub method: String,
    /// The path (and query), as sent.
    pub path: String,
    /// Header names in lower case → value.
    pub headers: BTreeMap<String, String>,
    /// The body, as text.
    pub body: String,
}

/// The recording server.
pub struct HttpServer {
    /// The port it listens on.
    pub port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    status: Arc<Mutex<BTreeMap<String, u16>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Listens on 127.0.0.1:`port` (0: any free port).
    pub fn start(port: u16) -> HttpServer {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the test HTTP server");
        let port = listener.local_addr().expect("local address").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s, halt) = (requests.clone(), status.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if halt.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    serve(stream, &r, &s);
                }
            }
        });
        HttpServer {
            port,
            requests,
            status,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Answers requests for `path` with `status` (default 200).
    pub fn answer(&self, path: &str, status: u16) {
        self.status
            .lock()
            .expect("status lock")
            .insert(path.to_string(), status);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("requests lock").clone()
    }

    /// Waits until `n` requests matching `pred` arrived; returns them.
    pub async fn wait_for(
        &self,
        n: usize,
        pred: impl Fn(&Request) -> bool,
        within: Duration,
    ) -> Vec<Request> {
        let deadline = Instant::now() + within;
        loop {
            let found: Vec<Request> = self.requests().into_iter().filter(|r| pred(r)).collect();
            if found.len() >= n {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "{n} requests not reached within {within:?}; got {:#?}",
                self.requests()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Closes the socket: the port refuses connections from now on.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accepting thread so it sees the flag and drops the socket.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads one request, records it and answers it.
fn serve(stream: TcpStream, requests: &Mutex<Vec<Request>>, status: &Mutex<BTreeMap<String, u16>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 {
            return;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let code = status
        .lock()
        .ok()
        .and_then(|s| s.get(&path).copied())
        .unwrap_or(200);
    requests.lock().expect("requests lock").push(Request {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    let mut stream = &stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {code} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK"
    );
    let _ = stream.flush();
}
