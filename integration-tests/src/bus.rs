//! A private dbus-daemon per test, and the service processes on it.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use zbus::Connection;

use crate::process;

/// The method-call timeout of every connection from [`TestBus::connect`]
/// (nothing on D-Bus times out by default), also used for the harness's own
/// calls.
pub const METHOD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the daemon may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a service gets between SIGTERM and SIGKILL in `Drop`.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// A private `dbus-daemon` with a permissive system-bus-like configuration,
/// listening on `unix:path=<tempdir>/bus`. The temp dir ([`TestBus::dir`]) is
/// also the place for a test's files; it is removed when the bus and every
/// [`ServiceProcess`] spawned on it are gone. Drop kills and reaps the daemon.
pub struct TestBus {
    dir: Arc<tempfile::TempDir>,
    address: String,
    daemon: Child,
    spawned: AtomicUsize,
    /// A session bus ([`TestBus::start_session`]) rather than a system one.
    session: bool,
}

/// Anyone may do anything: for tests of behaviour, not of policy.
const PERMISSIVE_POLICY: &str = r#"  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
    <allow eavesdrop="true"/>
  </policy>"#;

/// The default policy of Debian's system bus (/usr/share/dbus-1/system.conf):
/// deny owning names and calling methods unless a policy file allows it.
const SYSTEM_POLICY: &str = r#"  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Peer"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
  </policy>"#;

fn config_xml(socket: &Path, policy: &str, kind: &str) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>{kind}</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
{policy}
</busconfig>
"#,
        socket.display()
    )
}

impl TestBus {
    /// Start the daemon; returns once it accepts connections. Panics if
    /// `dbus-daemon` is missing or does not come up within 10 s.
    pub fn start() -> TestBus {
        TestBus::start_with_policy(PERMISSIVE_POLICY.to_string(), false)
    }

    /// A private session bus (`<type>session</type>`, as `dbus-daemon
    /// --session` runs for a user): services spawned on it get
    /// `DBUS_SESSION_BUS_ADDRESS` and no system bus address.
    pub fn start_session() -> TestBus {
        let mut bus = TestBus::start_kind(PERMISSIVE_POLICY.to_string(), false, "session");
        bus.session = true;
        bus
    }

    /// The permissive bus of [`TestBus::start`], reachable by unprivileged
    /// users too: for testing the checks services make themselves.
    pub fn start_open_to_everyone() -> TestBus {
        TestBus::start_with_policy(PERMISSIVE_POLICY.to_string(), true)
    }

    /// A bus configured like the system bus (deny by default, as Debian's
    /// system.conf) that includes the policy file `policy_file`, reachable by
    /// unprivileged users too: for testing ferry's own policy file.
    pub fn start_system_like(policy_file: &Path) -> TestBus {
        let policy = format!(
            "{SYSTEM_POLICY}\n  <include>{}</include>",
            policy_file.display()
        );
        TestBus::start_with_policy(policy, true)
    }

    fn start_with_policy(policy: String, open_to_everyone: bool) -> TestBus {
        TestBus::start_kind(policy, open_to_everyone, "system")
    }

    fn start_kind(policy: String, open_to_everyone: bool, kind: &str) -> TestBus {
        let dir = tempfile::Builder::new()
            .prefix("ferry-test-")
            .tempdir()
            .expect("create a temp dir for the test bus");
        if open_to_everyone {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
                .expect("open the bus dir");
        }
        let config = dir.path().join("bus.conf");
        fs::write(&config, config_xml(&dir.path().join("bus"), &policy, kind))
            .expect("write bus.conf");
        let log_path = dir.path().join("dbus-daemon.log");
        let log = fs::File::create(&log_path).expect("create dbus-daemon.log");
        let mut daemon =
            Command::new(crate::command_path("dbus-daemon").unwrap_or("dbus-daemon".into()))
                .arg(format!("--config-file={}", config.display()))
                .arg("--nofork")
                .arg("--print-address")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start dbus-daemon: {e} (apt-get install dbus)"));

        // The daemon prints its address once it listens.
        let stdout = daemon.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let address = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) if !line.trim().is_empty() => line.trim().to_string(),
            outcome => {
                let _ = daemon.kill();
                let status = daemon.wait();
                panic!(
                    "dbus-daemon did not start ({}): {:?}\n{}",
                    if outcome.is_err() {
                        "timed out"
                    } else {
                        "exited"
                    },
                    status,
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
        };
        TestBus {
            dir: Arc::new(dir),
            address,
            daemon,
            spawned: AtomicUsize::new(0),
            session: false,
        }
    }

    /// The bus address, e.g. `unix:path=/tmp/ferry-test-XXXX/bus,guid=…`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The temp dir of this test (bus socket, logs; put configs here too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The pid of the dbus-daemon.
    pub fn daemon_pid(&self) -> u32 {
        self.daemon.id()
    }

    /// `DBUS_SYSTEM_BUS_ADDRESS=<address>` (`DBUS_SESSION_BUS_ADDRESS` for
    /// a session bus), for `Command::envs`.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![(self.address_variable().to_string(), self.address.clone())]
    }

    fn address_variable(&self) -> &'static str {
        if self.session {
            "DBUS_SESSION_BUS_ADDRESS"
        } else {
            "DBUS_SYSTEM_BUS_ADDRESS"
        }
    }

    /// A new connection to the bus, with [`METHOD_TIMEOUT`] on method calls.
    pub async fn connect(&self) -> Connection {
        let build = async {
            zbus::connection::Builder::address(self.address.as_str())?
                .method_timeout(METHOD_TIMEOUT)
                .build()
                .await
        };
        match tokio::time::timeout(METHOD_TIMEOUT, build).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => panic!("cannot connect to the test bus {}: {e}", self.address),
            Err(_) => panic!(
                "connecting to the test bus {} timed out after {METHOD_TIMEOUT:?}",
                self.address
            ),
        }
    }

    /// Run `binary` on this bus: a ferry binary name (found with
    /// [`binary_path`]) or a path containing `/`. It gets
    /// `DBUS_SYSTEM_BUS_ADDRESS`, `RUST_LOG=debug` and `RUST_BACKTRACE=1`
    /// (`envs` override these), no journald or session bus variables, the
    /// bus's temp dir as working directory, and stdout and stderr go to a log
    /// file ([`ServiceProcess::log`]).
    pub fn spawn(&self, binary: &str, args: &[&str], envs: &[(&str, &str)]) -> ServiceProcess {
        let path = if binary.contains('/') {
            PathBuf::from(binary)
        } else {
            binary_path(binary)
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| binary.to_string());
        let n = self.spawned.fetch_add(1, Ordering::Relaxed);
        let log_path = self.dir().join(format!("{name}.{n}.log"));
        let log = fs::File::create(&log_path).expect("create service log");
        let child = Command::new(&path)
            .args(args)
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("INVOCATION_ID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .env(self.address_variable(), &self.address)
            .env("RUST_LOG", "debug")
            .env("RUST_BACKTRACE", "1")
            .envs(envs.iter().copied())
            .current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()));
        let pidfd = process::pidfd(&child);
        ServiceProcess {
            name,
            pid: child.id(),
            child: Mutex::new(child),
            pidfd,
            log_path,
            _dir: self.dir.clone(),
        }
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        if std::thread::panicking() {
            let log = fs::read_to_string(self.dir().join("dbus-daemon.log")).unwrap_or_default();
            // Not being allowed to raise its fd limit is normal here.
            let log: String = log
                .lines()
                .filter(|l| !l.contains("Failed to set fd limit"))
                .map(|l| format!("{l}\n"))
                .collect();
            if !log.trim().is_empty() {
                eprintln!("----- dbus-daemon log -----\n{log}----- end of dbus-daemon log -----");
            }
        }
    }
}

/// The directory the ferry binaries are in: `$FERRY_BIN_DIR` if set, else the
/// cargo profile dir of this test executable (`target/<profile>/deps/<test>`
/// → `target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("test executable has a directory")
        .to_path_buf();
    if dir
        .file_name()
        .is_some_and(|n| n == "deps" || n == "examples")
    {
        dir.pop();
    }
    dir
}

/// The path of the ferry binary `name` (see [`bin_dir`]); panics if it has not
/// been built.
pub fn binary_path(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    if !path.is_file() {
        panic!(
            "{} does not exist: build the binaries first: cargo build --workspace --bins \
             (or set FERRY_BIN_DIR)",
            path.display()
        );
    }
    path
}

/// Wait until `bus_name` has an owner on `conn`'s bus; `false` on timeout.
/// Event-based: subscribes to NameOwnerChanged, then asks NameHasOwner.
pub async fn wait_for_name(conn: &Connection, bus_name: &str, timeout: Duration) -> bool {
    let wait = async {
        let dbus = zbus::fdo::DBusProxy::builder(conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let mut changes = dbus
            .receive_name_owner_changed_with_args(&[(0, bus_name)])
            .await?;
        let name = zbus::names::BusName::try_from(bus_name)?;
        if dbus.name_has_owner(name).await? {
            return Ok::<bool, zbus::Error>(true);
        }
        while let Some(change) = changes.next().await {
            if change.args().is_ok_and(|a| a.new_owner().is_some()) {
                return Ok(true);
            }
        }
        Ok(false)
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(Ok(owned)) => owned,
        Ok(Err(e)) => panic!("waiting for {bus_name} on the bus: {e}"),
        Err(_) => false,
    }
}

/// A service binary running on a [`TestBus`]. Drop sends SIGTERM, then
/// SIGKILL after 3 s, and reaps it; if the test is panicking, it prints the
/// service's log.
pub struct ServiceProcess {
    name: String,
    pid: u32,
    child: Mutex<Child>,
    pidfd: Option<OwnedFd>,
    log_path: PathBuf,
    _dir: Arc<tempfile::TempDir>,
}

impl ServiceProcess {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The binary's file name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the service has logged so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Its exit status if it has exited (reaps it).
    pub fn try_exit_status(&self) -> Option<ExitStatus> {
        self.child.lock().unwrap().try_wait().ok().flatten()
    }

    /// Send `signal` (e.g. `libc::SIGTERM`); does nothing once it has exited
    /// and been reaped.
    pub fn signal(&self, signal: i32) {
        let mut child = self.child.lock().unwrap();
        if matches!(child.try_wait(), Ok(None)) {
            // SAFETY: the pid is our unreaped child (we hold the lock).
            unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        }
    }

    /// Wait up to `timeout` for it to exit; its status, or `None` if it is
    /// still running.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let _ = tokio::time::timeout(timeout, self.exited()).await;
        self.try_exit_status()
    }

    async fn exited(&self) {
        process::exited(self.pidfd.as_ref(), || self.try_exit_status().is_some()).await
    }

    /// Wait until `bus_name` is owned on the bus (normally: until this
    /// service is up). Panics on timeout, or at once if the service exits
    /// first; the log is printed as the test unwinds.
    pub async fn wait_for_name(&self, conn: &Connection, bus_name: &str, timeout: Duration) {
        tokio::select! {
            owned = wait_for_name(conn, bus_name, timeout) => {
                if !owned {
                    panic!(
                        "{} (pid {}) did not take the bus name {bus_name} within {timeout:?} \
                         (its log is printed below)",
                        self.name, self.pid
                    );
                }
            }
            _ = self.exited() => {
                let status = self.try_exit_status();
                panic!(
                    "{} (pid {}) exited before taking the bus name {bus_name}: {} \
                     (its log is printed below)",
                    self.name,
                    self.pid,
                    status.map(|s| s.to_string()).unwrap_or_else(|| "?".into())
                );
            }
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        if matches!(child.try_wait(), Ok(None)) {
            // SAFETY: the pid is our unreaped child.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
            if process::wait_blocking(child, self.pidfd.as_ref(), TERM_GRACE).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "----- log of {} (pid {}) -----\n{}\n----- end of {} log -----",
                self.name,
                self.pid,
                self.log().trim_end(),
                self.name
            );
        }
    }
}
