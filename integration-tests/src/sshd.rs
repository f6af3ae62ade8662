//! A real OpenSSH server on 127.0.0.1 for a test: Debian's sshd with its
//! own sshd_config, host key and port, key-only login, and the client key
//! restricted the way borg's docs recommend (`command="borg serve
//! --restrict-to-path …",restrict` in authorized_keys). It logs in as the
//! user the tests run as (root, `PermitRootLogin prohibit-password`).
//!
//! The test gets the client key, a known_hosts file holding the server's
//! host key, and the URL of a repository; it can stop the server (the
//! "network is gone" case), start it again on the same port, and give it a
//! new host key (the "changed host key" case). Drop stops it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::{command_path, require, require_root, run};

/// How long sshd may take to listen.
const START: Duration = Duration::from_secs(20);

/// [`require`] sshd (openssh-server), ssh and ssh-keygen, and root.
pub fn require_sshd() -> bool {
    require_root()
        && require(
            "sshd not found (apt-get install openssh-server; scripts/setup --tests does)",
            command_path("sshd").is_some(),
        )
        && require(
            "ssh or ssh-keygen not found (apt-get install openssh-client)",
            command_path("ssh").is_some() && command_path("ssh-keygen").is_some(),
        )
}

/// A running test sshd.
pub struct Sshd {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Sshd {
    /// Starts sshd with files under `dir` (created); the client key may
    /// only run `borg serve --restrict-to-path <restrict_to>`.
    pub fn start(dir: &Path, restrict_to: &Path) -> Sshd {
        std::fs::create_dir_all(dir).expect("sshd dir");
        // Privilege separation needs this directory (systemd's unit makes it).
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        keygen(&dir.join("host_key"));
        keygen(&dir.join("client_key"));
        let client = std::fs::read_to_string(dir.join("client_key.pub")).expect("client key");
        let base = dir.join("server-borg-base");
        std::fs::write(
            dir.join("authorized_keys"),
            format!(
                "command=\"env BORG_BASE_DIR={} borg serve --restrict-to-path {}\",restrict {}",
                base.display(),
                restrict_to.display(),
                client.trim()
            ),
        )
        .expect("authorized_keys");
        let mut sshd = Sshd {
            dir: dir.to_path_buf(),
            port: 0,
            child: None,
        };
        // Another test may take the free port before sshd binds it: then
        // sshd exits at once, and another port is tried.
        for _ in 0..5 {
            sshd.port = free_port();
            sshd.write_config();
            if sshd.try_spawn() {
                sshd.write_known_hosts(&dir.join("known_hosts"));
                return sshd;
            }
        }
        panic!("sshd did not start on any of 5 free ports:\n{}", sshd.log());
    }

    /// Starts sshd on its port; panics if it cannot.
    fn spawn(&mut self) {
        if !self.try_spawn() {
            panic!(
                "sshd did not start listening on 127.0.0.1:{}:\n{}",
                self.port,
                self.log()
            );
        }
    }

    fn write_config(&self) {
        let d = self.dir.display();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nLogLevel VERBOSE\n",
            port = self.port
        );
        std::fs::write(self.dir.join("sshd_config"), config).expect("sshd_config");
    }

    /// Starts sshd and returns once it listens (it says so on stderr):
    /// true, or false when it exited or stayed silent for [`START`].
    fn try_spawn(&mut self) -> bool {
        let sshd = command_path("sshd").expect("sshd");
        let mut child = Command::new(sshd)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(self.dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sshd");
        let stderr = child.stderr.take().expect("stderr");
        let log_path = self.dir.join("sshd.log");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log_path)
                .ok();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(log) = log.as_mut() {
                    let _ = writeln!(log, "{line}");
                }
                if line.contains("Server listening on") {
                    let _ = tx.send(true);
                }
            }
            // sshd closed stderr: it exited (a port taken, a bad config).
            let _ = tx.send(false);
        });
        if rx.recv_timeout(START) != Ok(true) {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        self.child = Some(child);
        true
    }

    /// Stops sshd: the server is gone (connection refused).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: our unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same keys.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Gives the server a new host key (as a reinstalled server, or a
    /// man in the middle, has) and restarts it; known_hosts keeps the old.
    pub fn change_host_key(&mut self) {
        self.stop();
        for file in ["host_key", "host_key.pub"] {
            let _ = std::fs::remove_file(self.dir.join(file));
        }
        keygen(&self.dir.join("host_key"));
        self.spawn();
    }

    /// Writes a known_hosts file with the server's current host key.
    pub fn write_known_hosts(&self, path: &Path) {
        let key = std::fs::read_to_string(self.dir.join("host_key.pub")).expect("host key");
        let key: Vec<&str> = key.split_whitespace().take(2).collect();
        std::fs::write(
            path,
            format!("[127.0.0.1]:{} {}\n", self.port, key.join(" ")),
        )
        .expect("known_hosts");
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client's private key (authorized, restricted).
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client_key")
    }

    /// A known_hosts file with the server's first host key.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }

    /// `ssh://root@127.0.0.1:<port><path>`.
    pub fn url(&self, path: &Path) -> String {
        format!("ssh://root@127.0.0.1:{}{}", self.port, path.display())
    }

    /// What sshd logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "----- sshd log -----\n{}----- end of sshd log -----",
                self.log()
            );
        }
    }
}

fn keygen(path: &Path) {
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "ferry-test",
            "-f",
            &path.to_string_lossy(),
        ],
    );
}

/// A port nobody listens on now (the kernel's pick for an ephemeral bind).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
