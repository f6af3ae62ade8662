//! ferry's Debian package (scripts/deb): it holds every file scripts/install
//! installs, in Debian's places and forms, with debhelper-style maintainer
//! scripts, and lintian finds no error in it. Installing it under real
//! systemd is the VM tier's `install` scenario (apt install ./ferry_….deb).

use std::path::Path;
use std::process::Command;

use ferry_integration_tests::{bin_dir, require_command};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn the_package_holds_everything_and_lintian_finds_no_error() {
    if !(require_command("dpkg-deb", "dpkg") && require_command("lintian", "lintian")) {
        return;
    }
    let out = tempfile::tempdir().expect("temp dir");
    // The binaries the other tests use (cargo build --bins), not a release build.
    let build = if bin_dir().ends_with("release") {
        "release"
    } else {
        "debug"
    };
    let built = Command::new(repo().join("scripts/deb"))
        .env("BUILD", build)
        .env("NO_BUILD", "1")
        .env("OUT", out.path())
        .env("COMPRESS", "gzip")
        .output()
        .expect("run scripts/deb");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    assert!(
        built.status.success(),
        "scripts/deb or lintian failed:\n{said}"
    );
    assert!(
        !said.lines().any(|l| l.starts_with("E: ")),
        "lintian errors:\n{said}"
    );
    let deb = said
        .lines()
        .find(|l| l.ends_with(".deb"))
        .map(str::to_string)
        .expect("scripts/deb prints the package's path");

    let listing = ferry_integration_tests::run("dpkg-deb", &["--contents", deb.as_str()]);
    for file in [
        "./usr/bin/ferry-crypt",
        "./usr/bin/ferry-notifier",
        "./usr/bin/ferryctl",
        "./usr/lib/systemd/system/ferry-crypt.service",
        "./usr/lib/systemd/system/ferry-backup@.timer",
        "./usr/share/dbus-1/system.d/org.ferry.conf",
        "./usr/share/dbus-1/system-services/org.ferry.Notifier1.service",
        "./usr/lib/udev/rules.d/70-ferry-blinkstick.rules",
        "./usr/lib/sysusers.d/ferry.conf",
        "./usr/lib/tmpfiles.d/ferry.conf",
        "./etc/ferry/ferry.toml.example",
        "./usr/share/man/man1/ferryctl.1.gz",
        "./usr/share/bash-completion/completions/ferryctl",
        "./usr/share/zsh/vendor-completions/_ferryctl",
        "./usr/share/fish/vendor_completions.d/ferryctl.fish",
        "./usr/share/doc/ferry/copyright",
        "./usr/share/doc/ferry/changelog.Debian.gz",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(file)),
            "{file} is not in the package:\n{listing}"
        );
    }
    // Units name the installed binaries.
    let unit = ferry_integration_tests::run(
        "sh",
        &["-c", &format!("dpkg-deb --fsys-tarfile '{deb}' | tar -xO ./usr/lib/systemd/system/ferry-crypt.service")],
    );
    assert!(unit.contains("ExecStart=/usr/bin/ferry-crypt "), "{unit}");

    let control = ferry_integration_tests::run("dpkg-deb", &["--field", deb.as_str()]);
    for field in [
        "Package: ferry",
        "Depends: ",
        "cryptsetup-bin",
        "borgbackup",
        "Recommends: smartmontools",
    ] {
        assert!(control.contains(field), "{field} not in:\n{control}");
    }
    let scripts = tempfile::tempdir().expect("temp dir");
    ferry_integration_tests::run(
        "dpkg-deb",
        &["--control", deb.as_str(), &scripts.path().to_string_lossy()],
    );
    let conffiles = std::fs::read_to_string(scripts.path().join("conffiles")).expect("conffiles");
    assert_eq!(conffiles, "/etc/ferry/ferry.toml.example\n");
    let postinst = std::fs::read_to_string(scripts.path().join("postinst")).expect("postinst");
    for step in [
        "systemd-sysusers",
        "systemd-tmpfiles --create",
        "daemon-reload",
        "deb-systemd-helper enable",
    ] {
        assert!(postinst.contains(step), "postinst lacks {step}");
    }
    for script in ["postinst", "prerm", "postrm"] {
        let checked = Command::new("sh")
            .arg("-n")
            .arg(scripts.path().join(script))
            .status()
            .expect("sh -n");
        assert!(checked.success(), "{script} is not valid sh");
    }
}

ferry_integration_tests::integration_tests! {
    sync Machine: [
        the_package_holds_everything_and_lintian_finds_no_error,
    ],
}
