//! ferry.toml is strict: every mistake is reported with file, line, key and
//! reason, and the example file a person copies is itself valid.

use std::path::Path;

use ferry_config::{Config, ConfigError, LedBackend};

fn reject(text: &str) -> (Option<usize>, String, String) {
    match Config::parse(text, Path::new("/etc/ferry/ferry.toml")) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(ConfigError::Invalid {
            line, key, reason, ..
        }) => (line, key, reason),
        Err(other) => panic!("unexpected error {other}"),
    }
}

const MINIMAL: &str = r#"
[drives.offsite-a]
uuid = "1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9"
repositories = ["nas"]

[repositories.nas]
path = "/srv/borg/nas"
"#;

#[test]
fn the_example_file_parses_with_every_section() {
    let text = include_str!("../../../examples/ferry.toml");
    let config = Config::parse(text, Path::new("examples/ferry.toml")).expect("example parses");
    assert_eq!(config.drives.len(), 2);
    let (name, drive) = config
        .drive_by_uuid("1B2C3D4E-5F60-4718-8293-A4B5C6D7E8F9")
        .expect("case-insensitive match");
    assert_eq!(name.as_str(), "offsite-a");
    assert!(drive.key_file.is_some());
    assert_eq!(config.led.backend, LedBackend::Blinkstick);
    assert_eq!(config.led.index, Some(1));
    assert_eq!(config.led.colors.working.to_hex(), "#33c280");
    // The default mountpoint of a drive without one.
    let (b, drive_b) = config
        .drives
        .iter()
        .find(|(n, _)| n.as_str() == "offsite-b")
        .expect("offsite-b");
    assert_eq!(drive_b.mountpoint(b), Path::new("/run/ferry/offsite-b"));
}

#[test]
fn defaults_apply_to_a_minimal_file() {
    let config = Config::parse(MINIMAL, Path::new("x")).expect("minimal parses");
    let (name, drive) = config.drives.iter().next().expect("a drive");
    assert!(drive.open_on_attach);
    assert!(drive.key_file.is_none());
    assert_eq!(drive.mountpoint(name), Path::new("/run/ferry/offsite-a"));
    assert_eq!(config.led.brightness_limit, 100);
    assert_eq!(config.led.colors.done.to_hex(), "#008000");
    assert_eq!(config.led.colors.failed.to_hex(), "#ff0000");
    assert_eq!(config.led.colors.idle.to_hex(), "#000000");
}

#[test]
fn an_empty_file_is_a_valid_config_with_nothing_enrolled() {
    let config = Config::parse("", Path::new("x")).expect("empty parses");
    assert!(config.drives.is_empty());
}

#[test]
fn unknown_key_names_its_line_and_path() {
    let text =
        format!("{MINIMAL}\n[drives.offsite-b]\nuuid = \"aaaa-bbbb\"\nmount-point = \"/mnt\"\n");
    let (line, key, reason) = reject(&text);
    assert_eq!(line, Some(11), "{reason}");
    assert_eq!(key, "drives.offsite-b.mount-point");
    assert!(reason.contains("unknown field `mount-point`"), "{reason}");
    assert!(
        reason.contains("mountpoint"),
        "lists the valid keys: {reason}"
    );
}

#[test]
fn unknown_section_is_rejected() {
    let (line, key, reason) = reject("[drive.offsite-a]\nuuid = \"aaaa\"\n");
    assert_eq!(line, Some(1));
    assert!(key.starts_with("drive"), "{key}");
    assert!(reason.contains("unknown field `drive`"), "{reason}");
}

#[test]
fn wrong_type_names_its_line_and_path() {
    let text = MINIMAL.replace("repositories = [\"nas\"]", "repositories = \"nas\"");
    let (line, key, reason) = reject(&text);
    assert_eq!(line, Some(4));
    assert_eq!(key, "drives.offsite-a.repositories");
    assert!(reason.contains("invalid type"), "{reason}");
}

#[test]
fn bad_values_are_explained() {
    let cases = [
        (
            MINIMAL.replace("1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9", "not-a-uuid!"),
            "drives.offsite-a.uuid",
            "not a UUID",
        ),
        (
            MINIMAL.replace("/srv/borg/nas", "srv/borg/nas"),
            "repositories.nas.path",
            "not an absolute path",
        ),
        (
            MINIMAL.replace("[drives.offsite-a]", "[drives.Offsite_A]"),
            "drives",
            "not a valid name",
        ),
        (
            format!("{MINIMAL}[led.colors]\nworking = \"#33c28\"\n"),
            "led.colors.working",
            "not a colour",
        ),
        (
            format!("{MINIMAL}[led]\nbackend = \"usb\"\n"),
            "led.backend",
            "unknown variant",
        ),
        (format!("{MINIMAL}[led]\nindex = 300\n"), "led.index", ""),
    ];
    for (text, want_key, want_reason) in cases {
        let (line, key, reason) = reject(&text);
        assert!(line.is_some(), "{want_key}: no line");
        assert!(key.starts_with(want_key), "{key} vs {want_key}: {reason}");
        assert!(reason.contains(want_reason), "{want_key}: {reason}");
    }
}

#[test]
fn cross_section_mistakes_point_at_the_key() {
    let text = MINIMAL.replace("[\"nas\"]", "[\"nas\", \"photos\"]");
    let (line, key, reason) = reject(&text);
    assert_eq!(
        (line, key.as_str()),
        (Some(4), "drives.offsite-a.repositories")
    );
    assert!(reason.contains("no repository named `photos`"), "{reason}");

    let text =
        format!("{MINIMAL}\n[drives.offsite-b]\nuuid = \"1B2C3D4E-5F60-4718-8293-A4B5C6D7E8F9\"\n");
    let (line, key, reason) = reject(&text);
    assert_eq!((line, key.as_str()), (Some(10), "drives.offsite-b.uuid"));
    assert!(
        reason.contains("already enrolled as drive `offsite-a`"),
        "{reason}"
    );

    let text = format!("{MINIMAL}\n[drives.offsite-b]\nuuid = \"abcd-1234\"\nmountpoint = \"/run/ferry/offsite-a\"\n");
    let (_, key, reason) = reject(&text);
    assert_eq!(key, "drives.offsite-b.mountpoint");
    assert!(reason.contains("already the mountpoint"), "{reason}");

    let (_, key, reason) = reject(&format!("{MINIMAL}[led]\nbackend = \"file\"\n"));
    assert_eq!(key, "led.backend");
    assert!(reason.contains("needs `file"), "{reason}");
}

#[test]
fn messages_carry_file_line_key_and_reason() {
    let error = Config::parse(
        "[led]\nbrightness-limit = 0\n",
        Path::new("/etc/ferry/ferry.toml"),
    )
    .expect_err("rejected");
    assert_eq!(
        error.to_string(),
        "/etc/ferry/ferry.toml:2: led.brightness-limit: must be a percentage from 1 to 100"
    );
    let missing = Config::load(Path::new("/nonexistent/ferry.toml")).expect_err("missing file");
    assert!(
        missing
            .to_string()
            .contains("cannot read /nonexistent/ferry.toml"),
        "{missing}"
    );
}

#[test]
fn hostile_bytes_never_panic() {
    for text in [
        "\u{0}",
        "[[[",
        "a = \"\\u0000\"",
        "[drives.x]\nuuid = 5",
        "[drives.\"\u{202e}evil\"]\nuuid=\"abcd\"",
    ] {
        let _ = Config::parse(text, Path::new("x"));
    }
}

/// A drive's section with `mountpoint`, for the mountpoint checks.
fn with_mountpoint(mountpoint: &str, extra: &str) -> String {
    format!(
        "state-directory = \"/var/lib/ferry\"\n\n[crypt]\nkey-directory = \"/etc/ferry/keys\"\n\n[drives.offsite-a]\nuuid = \"1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9\"\nmountpoint = \"{mountpoint}\"\n\n{extra}"
    )
}

#[test]
fn mountpoints_are_compared_as_the_kernel_resolves_them() {
    let dir = tempfile::tempdir().expect("dir");
    let to_etc = dir.path().join("to-etc");
    std::os::unix::fs::symlink("/etc", &to_etc).expect("symlink");
    let cases = [
        ("/etc/ferry/keys".to_string(), String::new(), "is the key directory"),
        ("/etc/ferry".to_string(), String::new(), "contains the key directory"),
        ("/etc/ferry/keys/mnt".to_string(), String::new(), "lies inside the key directory"),
        ("/etc/../etc".to_string(), String::new(), "is the system directory /etc"),
        (to_etc.display().to_string(), String::new(), "symbolic link"),
        ("/var/lib/ferry/mnt".to_string(), String::new(), "lies inside the state directory"),
        (
            "/srv".to_string(),
            "[repositories.nas]\npath = \"/srv/borg/nas\"\n".to_string(),
            "contains repository nas",
        ),
        (
            "/srv/data/usb".to_string(),
            "[repositories.nas]\npath = \"/srv/borg/nas\"\n\n[profiles.p]\nrepository = \"nas\"\nsources = [\"/srv/data\"]\n".to_string(),
            "lies inside a source of profile p",
        ),
        (
            "/mnt/backup".to_string(),
            "[drives.offsite-b]\nuuid = \"9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a\"\nmountpoint = \"/mnt/backup/b\"\n".to_string(),
            "contains the mountpoint of drive offsite-b",
        ),
    ];
    for (mountpoint, extra, expected) in cases {
        let text = with_mountpoint(&mountpoint, &extra);
        let (line, key, reason) = reject(&text);
        assert_eq!(key, "drives.offsite-a.mountpoint", "{mountpoint}: {reason}");
        assert_eq!(line, Some(8), "{mountpoint}: {reason}");
        assert!(reason.contains(expected), "{mountpoint}: {reason}");
    }
    // A source the profile does not leave may hold a mountpoint (borg
    // --one-file-system does not enter the drive).
    let fine = with_mountpoint(
        "/srv/data/usb",
        "[repositories.nas]\npath = \"/srv/borg/nas\"\n\n[profiles.p]\nrepository = \"nas\"\nsources = [\"/srv/data\"]\none-file-system = true\n",
    );
    Config::parse(&fine, Path::new("ferry.toml")).expect("one-file-system");
    Config::parse(
        &with_mountpoint("/run/ferry/offsite-a", ""),
        Path::new("ferry.toml"),
    )
    .expect("the default place");
}

#[test]
fn the_config_file_must_be_a_bounded_regular_file() {
    let error = Config::load(Path::new("/dev/zero")).expect_err("/dev/zero");
    assert!(error.to_string().contains("not a regular file"), "{error}");
    let dir = tempfile::tempdir().expect("dir");
    let big = dir.path().join("big.toml");
    std::fs::write(&big, "#".repeat(2 * 1024 * 1024)).expect("write");
    let error = Config::load(&big).expect_err("too big");
    assert!(error.to_string().contains("at most"), "{error}");
}
