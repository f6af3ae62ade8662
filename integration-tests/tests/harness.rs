//! Self-tests of the harness, on the real things: a private dbus-daemon,
//! processes, loop devices and udev.

use std::any::Any;
use std::io::{BufRead, BufReader};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_integration_tests::introspection::{compare, introspect};
use ferry_integration_tests::*;
use futures_util::FutureExt;
use zbus::zvariant::ObjectPath;

const T: Duration = Duration::from_secs(5);

fn panic_text(payload: Box<dyn Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "<non-string panic>".into()
    }
}

/// Run `fut`, expect it to panic, return the panic message.
async fn panics<F: std::future::Future>(fut: F) -> String {
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(_) => panic!("expected a panic"),
        Err(payload) => panic_text(payload),
    }
}

async fn bus_starts_and_answers_get_id() {
    let bus = TestBus::start();
    assert!(bus.address().starts_with("unix:path="), "{}", bus.address());
    assert!(bus
        .address()
        .contains(&bus.dir().join("bus").display().to_string()));
    assert_eq!(
        bus.env(),
        vec![(
            "DBUS_SYSTEM_BUS_ADDRESS".to_string(),
            bus.address().to_string()
        )]
    );
    let conn = bus.connect().await;
    let reply = conn
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus"),
            "GetId",
            &(),
        )
        .await
        .expect("GetId");
    let id: String = reply.body().deserialize().expect("GetId returns a string");
    assert_eq!(id.len(), 32, "bus id {id:?}");
    assert!(conn.unique_name().is_some());
}

async fn bus_drop_kills_daemon_and_removes_dir() {
    let bus = TestBus::start();
    let pid = bus.daemon_pid();
    let dir = bus.dir().to_path_buf();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let _conn = bus.connect().await;
    drop(bus);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "dbus-daemon {pid} is still there"
    );
    assert!(!dir.exists(), "{} is still there", dir.display());
}

async fn recorder_sees_a_signal_from_another_connection() {
    let bus = TestBus::start();
    let listener = bus.connect().await;
    let emitter = bus.connect().await;
    let signals = SignalRecorder::new(&listener).await;
    assert!(signals.is_empty());
    emitter
        .emit_signal(
            None::<&str>,
            "/org/ferry/Test",
            "org.ferry.Test1",
            "Ping",
            &("x", 5u64),
        )
        .await
        .unwrap();
    let ping = signals.wait_for("Ping", |s| s.args[0] == "x", T).await;
    assert_eq!(ping.interface, "org.ferry.Test1");
    assert_eq!(ping.member, "Ping");
    assert_eq!(ping.path, "/org/ferry/Test");
    assert_eq!(ping.args, ["x", "5"]);
    assert_eq!(signals.count("Ping", |_| true), 1);
    assert_eq!(signals.all(), vec![ping]);
}

async fn recorder_renders_arguments_and_ignores_other_paths() {
    let bus = TestBus::start();
    let listener = bus.connect().await;
    let emitter = bus.connect().await;
    let signals = SignalRecorder::new(&listener).await;
    let path = ObjectPath::try_from("/org/ferry/Crypt1").unwrap();
    emitter
        .emit_signal(None::<&str>, "/org/other", "org.other.X", "Noise", &("n",))
        .await
        .unwrap();
    emitter
        .emit_signal(
            None::<&str>,
            "/org/ferry/Sync1",
            "org.ferry.Sync1",
            "Mixed",
            &("drive", true, -3i32, 1.5f64, 7u32, path),
        )
        .await
        .unwrap();
    emitter
        .emit_signal(
            None::<&str>,
            "/org/ferry/Led1",
            "org.ferry.Led1",
            "Empty",
            &(),
        )
        .await
        .unwrap();
    emitter
        .emit_signal(
            None::<&str>,
            "/org/ferry/Led1",
            "org.ferry.Led1",
            "One",
            &("only",),
        )
        .await
        .unwrap();
    // Same sender: signals arrive in order, so after "One" the rest is in.
    signals.wait_for("One", |_| true, T).await;
    let mixed = signals.wait_for("Mixed", |_| true, T).await;
    assert_eq!(
        mixed.args,
        ["drive", "true", "-3", "1.5", "7", "/org/ferry/Crypt1"]
    );
    let empty = signals.wait_for("Empty", |_| true, T).await;
    assert!(empty.args.is_empty());
    let one = signals.wait_for("One", |_| true, T).await;
    assert_eq!(one.args, ["only"]);
    assert_eq!(signals.count("Noise", |_| true), 0, "{}", signals.listing());
    assert_eq!(signals.len(), 3);
}

async fn expect_none_passes_when_nothing_comes_and_fails_when_it_does() {
    let bus = TestBus::start();
    let listener = bus.connect().await;
    let emitter = bus.connect().await;
    let signals = SignalRecorder::new(&listener).await;
    let started = Instant::now();
    signals
        .expect_none("Ping", |_| true, Duration::from_millis(300))
        .await;
    assert!(started.elapsed() >= Duration::from_millis(300));

    emitter
        .emit_signal(
            None::<&str>,
            "/org/ferry/Test",
            "org.ferry.Test1",
            "Ping",
            &("y", 1u64),
        )
        .await
        .unwrap();
    // A non-matching predicate still passes …
    signals
        .expect_none("Ping", |s| s.args[0] == "z", Duration::from_millis(200))
        .await;
    // … a matching one fails, listing what was recorded.
    let message = panics(signals.expect_none("Ping", |_| true, T)).await;
    assert!(
        message.contains("unexpected signal org.ferry.Test1.Ping"),
        "{message}"
    );
    assert!(message.contains(r#"("y", "1")"#), "{message}");
}

async fn wait_for_times_out_with_the_recorded_list_and_from_skips_old_records() {
    let bus = TestBus::start();
    let listener = bus.connect().await;
    let emitter = bus.connect().await;
    let signals = SignalRecorder::new(&listener).await;
    emitter
        .emit_signal(
            None::<&str>,
            "/org/ferry/Test",
            "org.ferry.Test1",
            "Ping",
            &("a", 1u64),
        )
        .await
        .unwrap();
    signals.wait_for("Ping", |_| true, T).await;

    let started = Instant::now();
    let message = panics(signals.wait_for("Pong", |_| true, Duration::from_millis(300))).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(message.contains("no Pong signal"), "{message}");
    assert!(
        message.contains("org.ferry.Test1.Ping(\"a\", \"1\")"),
        "{message}"
    );

    let mark = signals.len();
    let message =
        panics(signals.wait_for_from(mark, "Ping", |_| true, Duration::from_millis(200))).await;
    assert!(message.contains("no Ping signal"), "{message}");
    let emitter2 = emitter.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        emitter2
            .emit_signal(
                None::<&str>,
                "/org/ferry/Test",
                "org.ferry.Test1",
                "Ping",
                &("b", 2u64),
            )
            .await
            .unwrap();
    });
    let second = signals.wait_for_from(mark, "Ping", |_| true, T).await;
    assert_eq!(second.args, ["b", "2"]);
    signals
        .expect_none_from(mark, "Ping", |s| s.args[0] == "a", Duration::ZERO)
        .await;
}

async fn service_process_logs_signals_and_exits() {
    let bus = TestBus::start();
    let svc = bus.spawn(
        "/bin/sh",
        &[
            "-c",
            "echo \"bus=$DBUS_SYSTEM_BUS_ADDRESS log=$RUST_LOG x=$X\" >&2; exec sleep 30",
        ],
        &[("X", "y")],
    );
    assert!(Path::new(&format!("/proc/{}", svc.pid())).exists());
    assert_eq!(svc.wait_exit(Duration::from_millis(100)).await, None);
    let deadline = Instant::now() + T;
    while !svc.log().contains("x=y") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        svc.log().trim(),
        format!("bus={} log=debug x=y", bus.address())
    );
    svc.signal(libc::SIGTERM);
    let status = svc.wait_exit(T).await.expect("exits on SIGTERM");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    svc.signal(libc::SIGKILL); // reaped already: a no-op
}

async fn service_process_drop_kills_one_that_ignores_sigterm() {
    let bus = TestBus::start();
    let svc = bus.spawn(
        "/bin/sh",
        &["-c", "trap '' TERM; echo ready; while :; do sleep 1; done"],
        &[],
    );
    let pid = svc.pid();
    let deadline = Instant::now() + T;
    while !svc.log().contains("ready") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    drop(svc);
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "{pid} is still there"
    );
}

async fn wait_for_name_sees_a_name_taken_later() {
    let bus = TestBus::start();
    let conn = bus.connect().await;
    let svc = bus.spawn("/bin/sleep", &["30"], &[]);
    let owner = bus.connect().await;
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        owner.request_name("org.ferry.Test1").await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let started = Instant::now();
    svc.wait_for_name(&conn, "org.ferry.Test1", T).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    // Already owned: returns at once.
    assert!(wait_for_name(&conn, "org.ferry.Test1", Duration::from_millis(100)).await);
    assert!(!wait_for_name(&conn, "org.ferry.Nobody1", Duration::from_millis(100)).await);
}

async fn wait_for_name_fails_at_once_when_the_service_dies() {
    let bus = TestBus::start();
    let conn = bus.connect().await;
    let svc = bus.spawn("/bin/sh", &["-c", "echo boom >&2; exit 3"], &[]);
    let started = Instant::now();
    let message =
        panics(svc.wait_for_name(&conn, "org.ferry.Test1", Duration::from_secs(20))).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        message.contains("exited before taking the bus name org.ferry.Test1"),
        "{message}"
    );
    assert!(message.contains("exit status: 3"), "{message}");
    assert_eq!(svc.log().trim(), "boom");
}

fn binary_lookup() {
    let dir = bin_dir();
    assert!(dir.is_dir(), "{}", dir.display());
    let message =
        panic_text(std::panic::catch_unwind(|| binary_path("ferry-no-such-binary")).unwrap_err());
    assert!(
        message.contains("build the binaries first: cargo build --workspace --bins"),
        "{message}"
    );
}

fn prerequisites() {
    assert!(require("never shown", true));
    let message =
        panic_text(std::panic::catch_unwind(|| require("thing X (install x)", false)).unwrap_err());
    assert!(message.contains("thing X (install x)"), "{message}");
    assert!(have_command("sh"));
    assert!(!have_command("ferry-no-such-command"));
    assert!(command_path("mkfs.ext4").is_none_or(|p| p.is_absolute()));
    assert_eq!(random_uuid().len(), 36);
    assert_ne!(random_uuid(), random_uuid());
}

fn loop_image_is_seen_by_udev_and_cleaned_up() {
    if !(require_root()
        && require_loop_devices()
        && require_udevd()
        && require_command("mkfs.ext4", "e2fsprogs")
        && require_command("udevadm", "udev")
        && require_command("losetup", "util-linux"))
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uuid = random_uuid();
    let mut image = LoopImage::ext4(dir.path(), 16, &uuid, "ferrytest");
    let image_path = image.path().to_path_buf();
    assert!(image_path.is_file());

    // Watch udev's events (after rule processing) before attaching.
    let mut monitor = Command::new("udevadm")
        .args(["monitor", "--udev", "--property", "--subsystem-match=block"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("udevadm monitor");
    let (tx, rx) = mpsc::channel();
    let stdout = monitor.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Its header says it is listening.
    let deadline = Instant::now() + T;
    loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        match line {
            Ok(l) if l.starts_with("UDEV") => break,
            Ok(_) => {}
            Err(_) => {
                let _ = monitor.kill();
                let _ = monitor.wait();
                panic!("udevadm monitor did not start");
            }
        }
    }

    let device = image.attach();
    assert!(device.starts_with("/dev/loop"));
    assert_eq!(image.device(), Some(device.as_str()));

    // An add/change event for the device carrying the file system's UUID.
    let wanted = format!("ID_FS_UUID={uuid}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut event = Vec::new();
    let mut seen = Vec::new();
    let found = loop {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            break false;
        };
        seen.push(line.clone());
        if line.is_empty() {
            event.clear();
            continue;
        }
        event.push(line.clone());
        if line == wanted
            && event.iter().any(|l| l == &format!("DEVNAME={device}"))
            && event
                .iter()
                .any(|l| l == "ACTION=add" || l == "ACTION=change")
        {
            break true;
        }
    };
    let _ = monitor.kill();
    let _ = monitor.wait();
    assert!(
        found,
        "no udev event with {wanted} for {device}; saw:\n{}",
        seen.join("\n")
    );

    udev_settle();
    assert_eq!(
        udev_property(&device, "ID_FS_UUID").as_deref(),
        Some(uuid.as_str())
    );
    assert_eq!(
        udev_property(&device, "ID_FS_LABEL").as_deref(),
        Some("ferrytest")
    );

    // Mount it; drop must unmount, detach and delete.
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run("mount", &[device.as_str(), mnt.to_str().unwrap()]);
    let mountinfo = || std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(mountinfo().contains(mnt.to_str().unwrap()));
    let sys = format!(
        "/sys/block/{}/loop/backing_file",
        device.trim_start_matches("/dev/")
    );
    drop(image);
    assert!(
        !mountinfo().contains(mnt.to_str().unwrap()),
        "still mounted"
    );
    let backing = std::fs::read_to_string(&sys).unwrap_or_default();
    assert!(
        !backing.contains(image_path.to_str().unwrap()),
        "{device} is still attached to the image"
    );
    assert!(!image_path.exists(), "image file not deleted");
    udev_settle();
}

fn loop_image_attach_detach_and_from_file() {
    if !(require_root() && require_loop_devices() && require_command("losetup", "util-linux")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("own.img");
    std::fs::write(&path, vec![0u8; 1024 * 1024]).unwrap();
    let mut image = LoopImage::from_file(&path);
    assert_eq!(image.device(), None);
    let device = image.attach();
    assert_eq!(image.attach(), device, "attach twice gives the same device");
    let sys = format!(
        "/sys/block/{}/loop/backing_file",
        device.trim_start_matches("/dev/")
    );
    assert!(std::fs::read_to_string(&sys).unwrap().contains("own.img"));
    image.detach();
    assert_eq!(image.device(), None);
    assert!(!std::fs::read_to_string(&sys)
        .unwrap_or_default()
        .contains("own.img"));
    assert!(path.exists(), "detach keeps the file");
    drop(image);
    assert!(!path.exists(), "drop deletes the file");
}

const EXPECTED: &str = r#"<node>
  <interface name="org.ferry.Test1">
    <method name="Start">
      <arg name="job" type="s" direction="in"/>
      <arg name="id" type="u" direction="out"/>
    </method>
    <property name="State" type="s" access="read"/>
    <signal name="Started">
      <arg name="job" type="s"/>
    </signal>
    <signal name="Finished">
      <arg name="job" type="s"/>
    </signal>
  </interface>
</node>"#;

fn compare_reports_extra_changed_and_missing() {
    assert_eq!(compare(EXPECTED, EXPECTED, "org.ferry.Test1"), Ok(()));
    // Annotations, docs, order of members and other interfaces do not matter.
    let same = r#"<node>
  <interface name="org.freedesktop.DBus.Peer"><method name="Ping"/></interface>
  <interface name="org.ferry.Test1">
    <signal name="Finished"><arg name="job" type="s"/></signal>
    <property name="State" type="s" access="read">
      <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="true"/>
    </property>
    <method name="Start">
      <arg name="job" type="s"/>
      <arg name="id" type="u" direction="out"/>
    </method>
    <signal name="Started"><arg name="job" type="s" direction="out"/></signal>
  </interface>
</node>"#;
    assert_eq!(compare(EXPECTED, same, "org.ferry.Test1"), Ok(()));

    let actual = r#"<node>
  <interface name="org.ferry.Test1">
    <method name="Start">
      <arg name="job" type="u" direction="in"/>
      <arg name="id" type="u" direction="out"/>
    </method>
    <method name="Stop"/>
    <property name="State" type="s" access="readwrite"/>
    <signal name="Started">
      <arg name="job" type="s"/>
    </signal>
  </interface>
</node>"#;
    let diff = compare(EXPECTED, actual, "org.ferry.Test1").unwrap_err();
    assert!(diff.contains("extra method Stop"), "{diff}");
    assert!(
        diff.contains(
            "method Start argument 0 changed: expected `job` s (in), actual `job` u (in)"
        ),
        "{diff}"
    );
    assert!(diff.contains("missing signal Finished"), "{diff}");
    assert!(
        diff.contains(
            "property State changed: expected type s, access read, actual type s, access readwrite"
        ),
        "{diff}"
    );
    assert_eq!(diff.lines().count(), 5, "{diff}");

    let missing = compare(EXPECTED, "<node/>", "org.ferry.Test1").unwrap_err();
    assert!(
        missing.contains("interface org.ferry.Test1 is missing"),
        "{missing}"
    );
    assert!(compare(EXPECTED, "<node", "org.ferry.Test1").is_err());
}

struct Served;

#[zbus::interface(name = "org.ferry.Test1")]
impl Served {
    async fn start(&self, job: &str) -> u32 {
        job.len() as u32
    }
    #[zbus(property)]
    async fn state(&self) -> String {
        "idle".into()
    }
    #[zbus(signal)]
    async fn started(
        emitter: &zbus::object_server::SignalEmitter<'_>,
        job: &str,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    async fn finished(
        emitter: &zbus::object_server::SignalEmitter<'_>,
        job: &str,
    ) -> zbus::Result<()>;
}

async fn introspect_a_served_object_and_compare() {
    let bus = TestBus::start();
    let server = bus.connect().await;
    server
        .object_server()
        .at("/org/ferry/Test1", Served)
        .await
        .unwrap();
    server.request_name("org.ferry.Test1").await.unwrap();
    let client = bus.connect().await;
    let xml = introspect(&client, "org.ferry.Test1", "/org/ferry/Test1").await;
    // zbus leaves out-arguments unnamed.
    let expected = EXPECTED.replace(
        r#"<arg name="id" type="u" direction="out"/>"#,
        r#"<arg type="u" direction="out"/>"#,
    );
    assert_eq!(compare(&expected, &xml, "org.ferry.Test1"), Ok(()), "{xml}");
    let diff = compare(EXPECTED, &xml, "org.ferry.Test1").unwrap_err();
    assert!(
        diff.contains("expected `id` u (out), actual (unnamed) u (out)"),
        "{diff}"
    );
}

/// With `harness = false` a `#[test]` function compiles and never runs: no
/// test file may carry one; each test is named in its file's
/// `integration_tests!` list instead.
fn no_test_hides_behind_a_test_attribute() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut offenders = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("tests dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("read");
            for (number, line) in text.lines().enumerate() {
                let line = line.trim_start();
                if line.starts_with("#[test]") || line.starts_with("#[tokio::test") {
                    offenders.push(format!("{}:{}", path.display(), number + 1));
                }
            }
            assert!(
                text.contains("ferry_integration_tests::integration_tests!"),
                "{} has no integration_tests! list",
                path.display()
            );
        }
    }
    assert!(offenders.is_empty(), "tests that never run: {offenders:?}");
}

ferry_integration_tests::integration_tests! {
    sync Machine: [
        prerequisites,
        loop_image_is_seen_by_udev_and_cleaned_up,
        loop_image_attach_detach_and_from_file,
    ],
    async Nothing: [
        bus_starts_and_answers_get_id,
        bus_drop_kills_daemon_and_removes_dir,
        recorder_sees_a_signal_from_another_connection,
        recorder_renders_arguments_and_ignores_other_paths,
        expect_none_passes_when_nothing_comes_and_fails_when_it_does,
        wait_for_times_out_with_the_recorded_list_and_from_skips_old_records,
        service_process_logs_signals_and_exits,
        service_process_drop_kills_one_that_ignores_sigterm,
        wait_for_name_sees_a_name_taken_later,
        wait_for_name_fails_at_once_when_the_service_dies,
        introspect_a_served_object_and_compare,
    ],
    sync Nothing: [
        no_test_hides_behind_a_test_attribute,
        binary_lookup,
        compare_reports_extra_changed_and_missing,
    ],
}
