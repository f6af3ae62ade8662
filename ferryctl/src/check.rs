//! `ferryctl check-config`: ferry.toml and every file it names, checked
//! before anything runs, with every problem reported in one go.
//!
//! A backup system whose configuration is wrong finds out at 2 a.m.; this
//! finds out now. It reads only: nothing is created, mounted or changed.

use std::path::Path;

use ferry_borg::plan::Plan;
use ferry_config::Config;

/// One thing wrong, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The key (e.g. `drives.offsite-a.key-file`) or file it is about.
    pub place: String,
    pub text: String,
}

/// What a successful check found, for the summary line.
#[derive(Debug, Default)]
pub struct Summary {
    pub drives: usize,
    pub repositories: usize,
    pub profiles: usize,
}

/// Checks the file at `path` and everything it names.
pub fn check(path: &Path) -> Result<Summary, Vec<Problem>> {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            return Err(vec![Problem {
                place: path.display().to_string(),
                text: e.to_string(),
            }])
        }
    };
    let mut problems = Vec::new();
    let mut problem = |place: String, text: String| problems.push(Problem { place, text });

    for (name, drive) in &config.drives {
        if let Some(key) = &drive.key_file {
            if let Err(text) = secret_file(key.as_ref()) {
                problem(format!("drives.{name}.key-file"), text);
            }
        }
        let mountpoint = drive.mountpoint(name);
        if let Ok(meta) = std::fs::symlink_metadata(&mountpoint) {
            if meta.file_type().is_symlink() {
                problem(
                    format!("drives.{name}.mountpoint"),
                    format!("{} is a symbolic link; ferry-crypt refuses to mount on one: name a real directory", mountpoint.display()),
                );
            }
        }
    }
    for (name, repository) in &config.repositories {
        let path: &Path = repository.path.as_ref();
        if !path.join("config").is_file() {
            problem(
                format!("repositories.{name}.path"),
                format!("{} is not a borg repository (it has no `config` file): create it with `borg init`, or correct the path", path.display()),
            );
        }
        if let Some(file) = &repository.passphrase_file {
            if let Err(text) = secret_file(file.as_ref()) {
                problem(format!("repositories.{name}.passphrase-file"), text);
            }
        }
    }
    for (name, profile) in &config.profiles {
        let place = format!("profiles.{name}");
        let plans = match profile.borgmatic_config {
            Some(_) => {
                ferry_borg::borgmatic::load(&config, name, profile).map_err(|e| e.to_string())
            }
            None => Plan::of_profile(&config, name, profile)
                .map(|plan| vec![plan])
                .map_err(|e| e.to_string()),
        };
        match plans {
            Err(text) => problem(place, text),
            Ok(plans) => {
                for plan in plans {
                    if let Err(e) = plan.refuse_on_a_drive(&config) {
                        problem(place.clone(), e.to_string());
                    }
                    for source in &plan.sources {
                        if plan.sources_must_exist && std::fs::symlink_metadata(source).is_err() {
                            problem(
                            place.clone(),
                            format!("source {source} does not exist: borg would back up nothing from it"),
                        );
                        }
                    }
                }
            }
        }
    }
    if let Some(mail) = &config.mail {
        if let Some(file) = &mail.password_file {
            if let Err(text) = secret_file(file.as_ref()) {
                problem("mail.password-file".into(), text);
            }
        }
    }
    if problems.is_empty() {
        Ok(Summary {
            drives: config.drives.len(),
            repositories: config.repositories.len(),
            profiles: config.profiles.len(),
        })
    } else {
        Err(problems)
    }
}

/// A file holding a secret, checked as the services check it when they
/// open it (ferry_config::paths::open_secret): regular, root's, not
/// readable by others.
fn secret_file(path: &Path) -> Result<(), String> {
    ferry_config::paths::open_secret(path, "the secret file").map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_secret_readable_by_others_is_refused_with_its_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("key");
        std::fs::write(&file, "x").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o604)).expect("chmod");
        let text = secret_file(&file).expect_err("0604 refused");
        assert!(text.contains("mode 0604"), "{text}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        if nix_is_root() {
            assert_eq!(secret_file(&file), Ok(()));
        }
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            assert!(secret_file(&fifo)
                .expect_err("a FIFO")
                .contains("not a regular file"));
        }
    }

    fn nix_is_root() -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false)
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("a.key");
        std::fs::write(&key, "k").expect("write");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let config = dir.path().join("ferry.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[drives.a]
uuid = "1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9"
key-file = "{key}"
repositories = ["nas"]

[repositories.nas]
path = "{dir}/no-repo"

[profiles.home]
repository = "nas"
sources = ["{dir}/no-such-source"]
"#,
                key = key.display(),
                dir = dir.path().display()
            ),
        )
        .expect("write config");
        let problems = check(&config).expect_err("problems");
        let places: Vec<&str> = problems.iter().map(|p| p.place.as_str()).collect();
        assert!(places.contains(&"drives.a.key-file"), "{problems:?}");
        assert!(places.contains(&"repositories.nas.path"), "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.place == "profiles.home" && p.text.contains("no-such-source")),
            "{problems:?}"
        );
    }
}
