//! ferry as real systemd services: the units verify without a word, stay
//! under their exposure thresholds, name units and binaries that exist, and
//! the D-Bus policy (loaded by a dbus-daemon configured like the system bus)
//! lets root do everything and an unprivileged user only read; every
//! mutating method also checks the caller itself.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use ferry_integration_tests::{bin_dir, random_uuid, require_command, SignalRecorder, TestBus};

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../units")
}

/// Every unit file, with @BINDIR@ pointing at the binaries this build made.
fn rendered_units(into: &Path) -> Vec<PathBuf> {
    let mut rendered = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(units_dir())
        .expect("units/")
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        let is_unit = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("service" | "timer")
        );
        if !is_unit {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read unit");
        let target = into.join(path.file_name().expect("file name"));
        std::fs::write(
            &target,
            text.replace("@BINDIR@", &bin_dir().to_string_lossy()),
        )
        .expect("write unit");
        rendered.push(target);
    }
    rendered
}

fn every_unit_verifies_without_a_word() {
    if !require_command("systemd-analyze", "systemd") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let units = rendered_units(dir.path());
    assert!(units.len() >= 8, "{units:?}");
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // systemd-analyze verify exits 0 on warnings: any output is a failure.
    assert!(
        output.status.success() && said.trim().is_empty(),
        "systemd-analyze verify said:\n{said}"
    );
}

/// The user units (a user's own ferry-borg) verify as user units too.
fn every_user_unit_verifies_without_a_word() {
    if !require_command("systemd-analyze", "systemd") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).expect("runtime dir");
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let mut units = Vec::new();
    for entry in std::fs::read_dir(units_dir().join("user"))
        .expect("units/user")
        .flatten()
    {
        let text = std::fs::read_to_string(entry.path()).expect("read unit");
        let target = dir.path().join(entry.file_name());
        std::fs::write(
            &target,
            text.replace("@BINDIR@", &bin_dir().to_string_lossy()),
        )
        .expect("write unit");
        units.push(target);
    }
    assert_eq!(units.len(), 3, "{units:?}");
    let output = Command::new("systemd-analyze")
        .args(["--user", "verify"])
        .args(&units)
        .env("XDG_RUNTIME_DIR", &runtime)
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "systemd-analyze --user verify said:\n{said}"
    );
}

/// The exposure score each unit must stay under (`systemd-analyze security`,
/// 0 = locked down, 10 = exposed). The crypt manager and the sync worker run
/// as root without mount namespaces on purpose (their mounts must be shared);
/// the README lists the scores and why. ferry-crypt's 5.2 includes
/// CAP_SYS_RAWIO (0.2), without which smartctl cannot read a USB drive's
/// SMART health through its bridge.
const THRESHOLDS: [(&str, f64); 6] = [
    ("ferry-drive-watcher.service", 1.5),
    ("ferry-led.service", 1.5),
    ("ferry-notifier.service", 2.0),
    ("ferry-borg.service", 3.5),
    ("ferry-sync.service", 4.5),
    ("ferry-crypt.service", 5.2),
];

fn security_exposure_stays_under_each_units_threshold() {
    if !require_command("systemd-analyze", "systemd") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    rendered_units(dir.path());
    let mut report = String::new();
    for (unit, threshold) in THRESHOLDS {
        let output = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(format!("./{unit}"))
            .current_dir(dir.path())
            .output()
            .expect("systemd-analyze security");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no score for {unit}:\n{text}{}",
                    String::from_utf8_lossy(&output.stderr)
                )
            });
        report.push_str(&format!("{unit}: {score} (threshold {threshold})\n"));
        assert!(
            score <= threshold,
            "{unit} scores {score}, over its threshold {threshold}:\n{text}"
        );
    }
    eprintln!("{report}");
}

fn activation_files_name_units_that_exist_and_units_name_built_binaries() {
    let units = units_dir();
    let mut bus_names = Vec::new();
    for entry in std::fs::read_dir(units.join("dbus"))
        .expect("units/dbus")
        .flatten()
    {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("service") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read activation file");
        let value = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::trim)
                .unwrap_or_default()
                .to_string()
        };
        let (name, unit) = (value("Name="), value("SystemdService="));
        assert_eq!(
            path.file_stem().and_then(|s| s.to_str()),
            Some(name.as_str()),
            "{}: file named after its bus name",
            path.display()
        );
        let unit_text = std::fs::read_to_string(units.join(&unit))
            .unwrap_or_else(|_| panic!("{}: names {unit}, which is not in units/", path.display()));
        assert!(
            unit_text.contains(&format!("BusName={name}\n")),
            "{unit} does not say BusName={name}"
        );
        bus_names.push(name);
    }
    bus_names.sort();
    let mut contract: Vec<String> = ferry_interfaces::ALL
        .iter()
        .map(|(name, _, _)| name.to_string())
        .collect();
    contract.sort();
    assert_eq!(
        bus_names, contract,
        "one activation file per service of the contract"
    );

    for entry in std::fs::read_dir(&units).expect("units/").flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for exec in text.lines().filter_map(|l| l.strip_prefix("ExecStart=")) {
            let program = exec.split_whitespace().next().unwrap_or_default();
            if let Some(binary) = program.strip_prefix("@BINDIR@/") {
                assert!(
                    bin_dir().join(binary).is_file(),
                    "{}: {binary} is not built",
                    entry.path().display()
                );
            } else {
                assert!(
                    Path::new(program).is_absolute(),
                    "{}: ExecStart {program} is not absolute",
                    entry.path().display()
                );
            }
        }
    }
}

/// Runs busctl as `nobody` (uid 65534, no groups) against `address`.
fn busctl_as_nobody(address: &str, args: &[&str]) -> (bool, String) {
    busctl_as(
        &["--reuid=65534", "--regid=65534", "--clear-groups"],
        address,
        args,
    )
}

/// busctl on the bus at `address` as root (this test's own user).
fn busctl_as_root(address: &str, args: &[&str]) -> (bool, String) {
    busctl_as(&[], address, args)
}

/// busctl run through setpriv with `who` (empty: as this process is).
fn busctl_as(who: &[&str], address: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new("setpriv")
        .args(who)
        .args(["busctl", "--address", address])
        .args(args)
        .output()
        .expect("setpriv busctl");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// A running service's mutating methods, each with busctl's signature and
/// arguments for a call, and a property anyone may read.
struct Offer {
    binary: &'static str,
    name: &'static str,
    path: &'static str,
    mutating: Vec<(&'static str, &'static [&'static str])>,
    property: &'static str,
}

fn offers() -> Vec<Offer> {
    use ferry_interfaces::{borg, crypt, drive_watcher, led, notifier, sync};
    let offer = |binary, name, path, mutating, property| Offer {
        binary,
        name,
        path,
        mutating,
        property,
    };
    vec![
        offer(
            "ferry-drive-watcher",
            drive_watcher::BUS_NAME,
            drive_watcher::OBJECT_PATH,
            vec![("Rescan", &[])],
            "Drives",
        ),
        offer(
            "ferry-crypt",
            crypt::BUS_NAME,
            crypt::OBJECT_PATH,
            vec![
                ("Open", &["s", "offsite-a"]),
                (
                    "OpenWith",
                    &["sa{sv}", "offsite-a", "1", "hold", "b", "true"],
                ),
                ("Close", &["s", "offsite-a"]),
            ],
            "Drives",
        ),
        offer(
            "ferry-sync",
            sync::BUS_NAME,
            sync::OBJECT_PATH,
            vec![
                ("Start", &["s", "offsite-a"]),
                ("Cancel", &["s", "offsite-a"]),
            ],
            "LastSyncs",
        ),
        offer(
            "ferry-borg",
            borg::BUS_NAME,
            borg::OBJECT_PATH,
            vec![
                ("Start", &["s", "nightly"]),
                ("Cancel", &["s", "nightly-1"]),
            ],
            "Profiles",
        ),
        offer(
            "ferry-led",
            led::BUS_NAME,
            led::OBJECT_PATH,
            vec![("Acknowledge", &[]), ("Test", &[])],
            "State",
        ),
        offer(
            "ferry-notifier",
            notifier::BUS_NAME,
            notifier::OBJECT_PATH,
            vec![
                ("SendTest", &[]),
                ("UnitFailed", &["s", "ferry-sync.service"]),
                ("Flush", &[]),
                ("ListDeadLetters", &["a{sv}", "0"]),
                ("ResendDeadLetter", &["sa{sv}", "no-such-letter", "0"]),
            ],
            "Pending",
        ),
    ]
}

/// busctl's arguments for a call.
fn busctl_call<'a>(offer: &'a Offer, method: &'a str, arguments: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["call", offer.name, offer.path, offer.name, method];
    args.extend(arguments);
    args
}

/// Methods anyone may call: they only read.
const READ_ONLY_METHODS: [&str; 1] = ["GetStats"];

fn the_policy_tests_cover_every_method_of_the_contract() {
    for offer in offers() {
        let (_, _, xml) = ferry_interfaces::ALL
            .into_iter()
            .find(|(interface, _, _)| *interface == offer.name)
            .expect("the offer names an interface of the contract");
        for line in xml.lines() {
            let Some(rest) = line.trim().strip_prefix("<method name=\"") else {
                continue;
            };
            let method = rest.split('"').next().unwrap_or_default();
            assert!(
                READ_ONLY_METHODS.contains(&method)
                    || offer.mutating.iter().any(|(m, _)| *m == method),
                "{}.{method} is in the contract but not in the policy tests' offers(): add it (with busctl arguments) or to READ_ONLY_METHODS",
                offer.name
            );
        }
    }
}

fn config_for(dir: &Path) -> PathBuf {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    write_config(
        dir,
        &format!(
            "state-directory = \"{}\"\n\n{}{}",
            state.display(),
            drive_section("offsite-a", &random_uuid()),
            led_file_section(&dir.join("led"))
        ),
    )
}

async fn the_policy_lets_root_do_everything_and_others_only_read() {
    if !(ferry_integration_tests::require_root()
        && require_command("setpriv", "util-linux")
        && require_command("busctl", "systemd"))
    {
        return;
    }
    let bus = TestBus::start_system_like(
        &units_dir()
            .join("dbus/org.ferry.conf")
            .canonicalize()
            .expect("policy file"),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_for(dir.path());
    let conn = bus.connect().await;
    let led_file = dir.path().join("led");
    for offer in offers() {
        let (name, path) = (offer.name, offer.path);
        let service = bus.spawn(offer.binary, &["--config", &config.to_string_lossy()], &[]);
        service.wait_for_name(&conn, name, WAIT).await;
        for (method, arguments) in &offer.mutating {
            let before = std::fs::read_to_string(&led_file).unwrap_or_default();
            let (ok, said) =
                busctl_as_nobody(bus.address(), &busctl_call(&offer, method, arguments));
            assert!(
                !ok && said.contains("Access denied"),
                "nobody called {name}.{method}: {said}"
            );
            assert_eq!(
                std::fs::read_to_string(&led_file).unwrap_or_default(),
                before,
                "{name}.{method} had an effect"
            );
            let (ok, said) = busctl_as_root(bus.address(), &busctl_call(&offer, method, arguments));
            // Root is let through by the policy (the test runs as root): the
            // service itself answers, with success or its own error — never
            // a refusal, an unknown method or a wrong signature.
            let refused = [
                "Access denied",
                "root and members",
                "Unknown method",
                "nvalid arg",
            ]
            .iter()
            .any(|r| said.contains(r));
            assert!(
                ok || !refused,
                "root calling {name}.{method} was refused: {said}"
            );
        }
        let (ok, said) = busctl_as_nobody(bus.address(), &["introspect", name, path]);
        assert!(ok, "introspection is open to everyone: {said}");
        let (ok, said) = busctl_as_nobody(
            bus.address(),
            &["get-property", name, path, name, offer.property],
        );
        assert!(ok, "properties are open to everyone: {said}");
        drop(service);
    }
    // Nobody but root (and the service users) may own a ferry name.
    let (ok, said) = busctl_as_nobody(
        bus.address(),
        &[
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "RequestName",
            "su",
            ferry_interfaces::led::BUS_NAME,
            "4",
        ],
    );
    assert!(
        !ok || said.contains("AccessDenied"),
        "nobody could own org.ferry.Led1: {said}"
    );
}

async fn services_check_the_caller_themselves_when_the_policy_lets_anyone_through() {
    if !(ferry_integration_tests::require_root()
        && require_command("setpriv", "util-linux")
        && require_command("busctl", "systemd"))
    {
        return;
    }
    let bus = TestBus::start_open_to_everyone();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_for(dir.path());
    let conn = bus.connect().await;
    for offer in offers() {
        let name = offer.name;
        let service = bus.spawn(offer.binary, &["--config", &config.to_string_lossy()], &[]);
        service.wait_for_name(&conn, name, WAIT).await;
        for (method, arguments) in &offer.mutating {
            let (ok, said) =
                busctl_as_nobody(bus.address(), &busctl_call(&offer, method, arguments));
            assert!(
                !ok && said.contains("root and members of the `ferry` group"),
                "{name}.{method} as nobody: {said}"
            );
        }
        drop(service);
    }
}

fn install_puts_every_file_in_place_and_uninstall_removes_them() {
    let root = tempfile::tempdir().expect("temp dir");
    let script = units_dir().join("../scripts/install");
    let profile = bin_dir()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "debug".into());
    let install = |args: &[&str]| {
        let output = Command::new(&script)
            .args(args)
            .env("DESTDIR", root.path())
            .env("PREFIX", "/usr/local")
            .env("BUILD", &profile)
            .env("CARGO_TARGET_DIR", bin_dir().parent().expect("target dir"))
            .env("NO_BUILD", "1")
            .output()
            .expect("run scripts/install");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "scripts/install {args:?}:\n{said}");
        said
    };
    install(&[]);
    let at = |p: &str| root.path().join(p.trim_start_matches('/'));
    for binary in [
        "ferry-drive-watcher",
        "ferry-crypt",
        "ferry-sync",
        "ferry-borg",
        "ferry-led",
        "ferry-notifier",
    ] {
        assert!(
            at(&format!("/usr/local/bin/{binary}")).is_file(),
            "{binary} installed"
        );
        let unit = std::fs::read_to_string(at(&format!(
            "/usr/local/lib/systemd/system/{binary}.service"
        )))
        .expect("unit installed");
        assert!(
            unit.contains(&format!("ExecStart=/usr/local/bin/{binary} ")),
            "{binary}.service points at the installed binary"
        );
    }
    for file in [
        "/usr/local/share/dbus-1/system-services/org.ferry.Borg1.service",
        "/etc/dbus-1/system.d/org.ferry.conf",
        "/etc/udev/rules.d/70-ferry-blinkstick.rules",
        "/etc/sysusers.d/ferry.conf",
        "/etc/tmpfiles.d/ferry.conf",
        "/etc/ferry/ferry.toml.example",
        "/usr/local/lib/systemd/system/ferry-backup@.timer",
        "/usr/local/lib/systemd/user/ferry-borg.service",
        "/usr/local/lib/systemd/user/ferry-backup@.service",
        "/usr/local/lib/systemd/user/ferry-backup@.timer",
        "/usr/local/share/dbus-1/services/org.ferry.Borg1.service",
    ] {
        assert!(at(file).is_file(), "{file} installed");
    }
    let user_unit = std::fs::read_to_string(at("/usr/local/lib/systemd/user/ferry-borg.service"))
        .expect("user unit");
    assert!(
        user_unit.contains("ExecStart=/usr/local/bin/ferry-borg --user"),
        "the user unit runs the same binary with --user"
    );
    let example = std::fs::read_to_string(at("/etc/ferry/ferry.toml.example")).expect("example");
    ferry_config::Config::parse(&example, Path::new("ferry.toml.example"))
        .expect("the installed example parses");

    install(&["--uninstall"]);
    let left: Vec<_> = walk(root.path())
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    assert!(left.is_empty(), "uninstall left {left:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}

/// The uid and gid of a user or group the sysusers file created.
fn id_of(flag: &str, name: &str) -> String {
    let output = Command::new("id")
        .args([flag, name])
        .output()
        .expect("run id");
    assert!(
        output.status.success(),
        "no user {name} after systemd-sysusers"
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn group_id(name: &str) -> String {
    let output = Command::new("getent")
        .args(["group", name])
        .output()
        .expect("run getent");
    String::from_utf8_lossy(&output.stdout)
        .split(':')
        .nth(2)
        .unwrap_or_else(|| panic!("no group {name} after systemd-sysusers"))
        .to_string()
}

/// `busctl emit` as a user (uid, gid, supplementary groups) on `address`.
fn emit_as(address: &str, uid: &str, gid: &str, groups: &str, args: &[&str]) {
    let mut command = Command::new("setpriv");
    command.args([&format!("--reuid={uid}"), &format!("--regid={gid}")]);
    if groups.is_empty() {
        command.arg("--clear-groups");
    } else {
        command.arg(format!("--groups={groups}"));
    }
    let output = command
        .args(["busctl", "--address", address, "emit"])
        .args(args)
        .output()
        .expect("setpriv busctl emit");
    assert!(
        output.status.success(),
        "busctl emit {args:?} as {uid}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// dbus-daemon checks a broadcast signal against the sender's send rules once
/// per recipient, matching send_destination against the names the recipient
/// owns. The installed policy must let each service's user reach every ferry
/// service with its own signals (DriveAttached from ferry-watcher reaching
/// ferry-crypt is the whole plug-in flow), and must drop a ferry signal from
/// anyone else — an unprivileged user, a member of `ferry`, or one service
/// user speaking for another.
async fn the_policy_carries_each_service_users_signals_to_every_service_and_drops_forgeries() {
    if !(ferry_integration_tests::require_root()
        && require_command("setpriv", "util-linux")
        && require_command("busctl", "systemd")
        && require_command("systemd-sysusers", "systemd"))
    {
        return;
    }
    // The service users must exist before the bus reads the policy.
    let sysusers = Command::new("systemd-sysusers")
        .arg(units_dir().join("sysusers.d/ferry.conf"))
        .output()
        .expect("run systemd-sysusers");
    assert!(
        sysusers.status.success(),
        "systemd-sysusers: {}",
        String::from_utf8_lossy(&sysusers.stderr)
    );
    let bus = TestBus::start_system_like(
        &units_dir()
            .join("dbus/org.ferry.conf")
            .canonicalize()
            .expect("policy file"),
    );
    // One connection per ferry name, owning it (as the services do) and
    // recording every ferry signal delivered to it.
    let mut receivers = Vec::new();
    for (name, _, _) in ferry_interfaces::ALL.iter() {
        let conn = bus.connect().await;
        conn.request_name(*name)
            .await
            .expect("root owns a ferry name");
        let recorder = SignalRecorder::new(&conn).await;
        receivers.push((*name, conn, recorder));
    }
    let user = |name: &str| (id_of("-u", name), id_of("-g", name));
    let root = ("0".to_string(), "0".to_string());
    // (sender's uid and gid, busctl emit arguments, member, first argument)
    type Emit<'a> = ((String, String), Vec<&'a str>, &'a str, &'a str);
    let legit: Vec<Emit> = vec![
        (
            user("ferry-watcher"),
            vec![
                "/org/ferry/DriveWatcher1",
                "org.ferry.DriveWatcher1",
                "DriveAttached",
                "sss",
                "offsite-a",
                "/dev/sdz",
                "uuid-from-watcher",
            ],
            "DriveAttached",
            "offsite-a",
        ),
        (
            user("ferry-watcher"),
            vec![
                "/org/ferry/DriveWatcher1",
                "org.freedesktop.DBus.Properties",
                "PropertiesChanged",
                "sa{sv}as",
                "org.ferry.DriveWatcher1",
                "0",
                "1",
                "Drives",
            ],
            "PropertiesChanged",
            "org.ferry.DriveWatcher1",
        ),
        (
            user("ferry-led"),
            vec![
                "/org/ferry/Led1",
                "org.ferry.Led1",
                "ColorChanged",
                "ss",
                "#00ff00",
                "done",
            ],
            "ColorChanged",
            "#00ff00",
        ),
        (
            user("ferry-notifier"),
            vec![
                "/org/ferry/Notifier1",
                "org.ferry.Notifier1",
                "NotificationSent",
                "ss",
                "mail-1",
                "subject",
            ],
            "NotificationSent",
            "mail-1",
        ),
        (
            root.clone(),
            vec![
                "/org/ferry/Crypt1",
                "org.ferry.Crypt1",
                "DriveOpened",
                "ss",
                "offsite-a",
                "/run/ferry/offsite-a",
            ],
            "DriveOpened",
            "offsite-a",
        ),
    ];
    let ferry_gid = group_id("ferry");
    let (led_uid, led_gid) = user("ferry-led");
    let forged = |drive: &'static str| {
        vec![
            "/org/ferry/DriveWatcher1",
            "org.ferry.DriveWatcher1",
            "DriveAttached",
            "sss",
            drive,
            "/dev/sdz",
            "forged",
        ]
    };
    // Forgeries first: nobody, a member of ferry, ferry-led for the watcher.
    emit_as(
        bus.address(),
        "65534",
        "65534",
        "",
        &forged("forged-by-nobody"),
    );
    emit_as(
        bus.address(),
        "65534",
        "65534",
        &ferry_gid,
        &forged("forged-by-ferry-group"),
    );
    emit_as(
        bus.address(),
        &led_uid,
        &led_gid,
        "",
        &forged("forged-by-led"),
    );
    // Then each legitimate signal, which every service must receive; the bus
    // handled the forgeries (sent and flushed before) by then.
    for ((uid, gid), args, member, first) in &legit {
        emit_as(bus.address(), uid, gid, "", args);
        for (name, _, recorder) in &receivers {
            eprintln!("{name} waits for {member}({first}) emitted as uid {uid}");
            recorder
                .wait_for(
                    member,
                    |r| r.args.first().map(String::as_str) == Some(*first),
                    WAIT,
                )
                .await;
        }
    }
    for (name, _, recorder) in &receivers {
        let forgeries = recorder.count("DriveAttached", |r| {
            r.args.first().is_some_and(|a| a.starts_with("forged"))
        });
        assert_eq!(
            forgeries,
            0,
            "{name} received a forged DriveAttached:\n{}",
            recorder.listing()
        );
    }
}

ferry_integration_tests::integration_tests! {
    async Machine: [
        the_policy_lets_root_do_everything_and_others_only_read,
        services_check_the_caller_themselves_when_the_policy_lets_anyone_through,
        the_policy_carries_each_service_users_signals_to_every_service_and_drops_forgeries,
    ],
    sync Machine: [
        every_unit_verifies_without_a_word,
        security_exposure_stays_under_each_units_threshold,
        activation_files_name_units_that_exist_and_units_name_built_binaries,
        the_policy_tests_cover_every_method_of_the_contract,
        install_puts_every_file_in_place_and_uninstall_removes_them,
        every_user_unit_verifies_without_a_word,
    ],
}
