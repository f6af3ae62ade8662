//! borg 1.2's exclusive repository lock, taken by ferry-sync itself.
//!
//! Why natively and not with borg's own code in a Python helper (as
//! before): starting borg's interpreter and importing its locking module
//! costs 0.3–1 s per repository per sync, more than copying and reading
//! back a typical day of new archives; the lock itself is a handful of
//! file operations. `borg with-lock` is not used either: it commits a
//! transaction of its own, and ferry-sync never writes to the source.
//!
//! The protocol is borg 1.2's `borg/locking.py`, step by step, so that
//! borg and ferry-sync exclude each other and agree on stale locks:
//!
//! - **`lock.exclusive`** is a directory holding one empty file named
//!   `<host>.<pid>-<thread>`. It is taken by making a temporary directory
//!   `lock.exclusive.<random>.tmp` beside it with that file inside and
//!   renaming it to `lock.exclusive`: the rename fails while another holds
//!   it.
//! - **A stale lock** is one whose host is ours and whose process is gone
//!   (`kill(pid, 0)` says ESRCH); it is removed (its file, then the
//!   directory) and the rename tried again. A lock of another host is
//!   never stale. Our host is `ferry_service::host::borg_host_id`, the
//!   `BORG_HOST_ID` every borg that ferry runs gets, so a lock left by a
//!   killed ferry-sync is stale to borg and one left by a killed borg is
//!   stale to ferry-sync. (borg's own default host id changes inside a
//!   private network namespace; the lesson is in DESIGN.md.)
//! - **`lock.roster`** is JSON: `{"exclusive": [[host, pid, thread]],
//!   "shared": [...]}`. Holding `lock.exclusive`, an exclusive locker
//!   drops stale entries, waits for `shared` to be empty (giving
//!   `lock.exclusive` back between tries, as borg does) and adds itself to
//!   `exclusive`. Release is the reverse: out of the roster (the file
//!   removed when empty), the file in `lock.exclusive`, the directory.
//!
//! The thread is always 0, as borg's is (borg treats any other thread
//! number as "maybe alive", so a lock with another number would never be
//! found stale). Two jobs of this process that lock one repository would
//! carry the same name, so a process-wide set keeps a repository locked at
//! most once at a time here; the second waits like any other locker.
//!
//! Waiting is by retrying every [`RETRY`], as borg does: the holder may be
//! a process that died, which no file event announces. The retries run
//! only while another holds the lock, within `[sync] lock-wait`.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// How often a held lock is tried again.
pub const RETRY: Duration = Duration::from_millis(100);

/// Who holds a lock, as borg names it: host id, process id, thread (0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockerId {
    /// borg's host id (BORG_HOST_ID).
    pub host: String,
    /// The process.
    pub pid: u32,
}

impl LockerId {
    /// This process on host `host`.
    pub fn this_process(host: &str) -> LockerId {
        LockerId {
            host: host.to_string(),
            pid: std::process::id(),
        }
    }

    /// The file name in `lock.exclusive`: borg's `"%s.%d-%x" % id`.
    fn file_name(&self) -> String {
        format!("{}.{}-0", self.host, self.pid)
    }

    fn roster_entry(&self) -> serde_json::Value {
        serde_json::json!([self.host, self.pid, 0])
    }
}

/// Repositories locked by this process now.
static LOCKED_HERE: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

fn locked_here() -> MutexGuard<'static, Option<HashSet<PathBuf>>> {
    LOCKED_HERE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why the lock could not be tried.
#[derive(Debug, thiserror::Error)]
#[error("cannot take borg's lock in {repo}: {source}")]
pub struct LockError {
    repo: PathBuf,
    source: io::Error,
}

/// One attempt's outcome.
#[derive(Debug)]
pub enum Attempt {
    /// Ours until [`HeldLock::release`].
    Locked(HeldLock),
    /// Another process holds it (or reads the repository).
    Held,
}

/// borg's exclusive lock on a repository, held by this process.
#[derive(Debug)]
pub struct HeldLock {
    repo: PathBuf,
    id: LockerId,
    released: bool,
}

/// Tries once to take borg's exclusive lock on `repo` as `id`, removing a
/// stale lock on the way as borg would. Blocking (file operations).
pub fn try_lock(repo: &Path, id: &LockerId) -> Result<Attempt, LockError> {
    let failed = |source| LockError {
        repo: repo.to_path_buf(),
        source,
    };
    {
        let mut here = locked_here();
        let set = here.get_or_insert_with(HashSet::new);
        if !set.insert(repo.to_path_buf()) {
            return Ok(Attempt::Held);
        }
    }
    let forget = || {
        if let Some(set) = locked_here().as_mut() {
            set.remove(repo);
        }
    };
    match take_exclusive(repo, id) {
        Ok(true) => {}
        Ok(false) => {
            forget();
            return Ok(Attempt::Held);
        }
        Err(e) => {
            forget();
            return Err(failed(e));
        }
    }
    let held = HeldLock {
        repo: repo.to_path_buf(),
        id: id.clone(),
        released: false,
    };
    // Holding lock.exclusive: wait for no reader, then enter the roster.
    let mut roster = load_roster(repo, &id.host);
    let readers = roster
        .get("shared")
        .and_then(|s| s.as_array())
        .is_some_and(|s| !s.is_empty());
    if readers {
        held.release_blocking().map_err(failed)?;
        return Ok(Attempt::Held);
    }
    modify(&mut roster, "exclusive", id, true);
    save_roster(repo, &roster).map_err(failed)?;
    Ok(Attempt::Locked(held))
}

/// `lock.exclusive` by renaming a prepared temporary directory onto it;
/// false when another holds it (after removing it once if stale).
fn take_exclusive(repo: &Path, id: &LockerId) -> io::Result<bool> {
    let temp = tempfile::Builder::new()
        .prefix("lock.exclusive.")
        .suffix(".tmp")
        .tempdir_in(repo)?;
    fs::File::create(temp.path().join(id.file_name()))?;
    let target = repo.join("lock.exclusive");
    for _ in 0..2 {
        match fs::rename(temp.path(), &target) {
            Ok(()) => {
                // The directory is lock.exclusive now: not ours to delete.
                let _ = temp.keep();
                return Ok(true);
            }
            Err(_) if kill_stale_lock(&target, id) => continue,
            Err(_) => break,
        }
    }
    Ok(false)
}

/// borg's `kill_stale_lock`: removes the lock's files when each names a
/// process of our host that is gone, then the directory; true when it is
/// gone. A file borg cannot parse, another host's lock or a live process
/// leave it alone.
fn kill_stale_lock(dir: &Path, us: &LockerId) -> bool {
    let names: Vec<String> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => return false,
    };
    for name in &names {
        let Some((host, pid)) = parse_name(name) else {
            tracing::error!(
                "borg's lock {} holds {name:?}, which is not a lock name; check it and remove it by hand",
                dir.display()
            );
            return false;
        };
        if !is_stale(&host, pid, us) {
            return false;
        }
        if fs::remove_file(dir.join(name)).is_err() {
            return false;
        }
        tracing::warn!("removed the stale borg lock {name} in {}", dir.display());
    }
    fs::remove_dir(dir).is_ok()
}

/// `<host>.<pid>-<thread>` → (host, pid), as borg splits it.
fn parse_name(name: &str) -> Option<(String, u32)> {
    let (host_pid, thread) = name.rsplit_once('-')?;
    let (host, pid) = host_pid.rsplit_once('.')?;
    u64::from_str_radix(thread, 16).ok()?;
    Some((host.to_string(), pid.parse().ok()?))
}

/// A locker is stale when it is of our host and its process is gone. Our
/// own pid is stale too: this process holds no lock it does not know of
/// ([`LOCKED_HERE`]), so such a lock was left by an earlier process that
/// had our pid.
fn is_stale(host: &str, pid: u32, us: &LockerId) -> bool {
    if host != us.host {
        return false;
    }
    if pid == us.pid {
        return true;
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks whether the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    !alive
}

/// The roster with stale lockers of our host dropped (borg's `load`); a
/// missing or unreadable one is empty, as borg takes it.
fn load_roster(repo: &Path, host: &str) -> serde_json::Map<String, serde_json::Value> {
    let us = LockerId {
        host: host.to_string(),
        pid: std::process::id(),
    };
    let mut roster = fs::read(repo.join("lock.roster"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    for key in ["shared", "exclusive"] {
        if let Some(entries) = roster.get_mut(key).and_then(|e| e.as_array_mut()) {
            entries.retain(|entry| match (entry[0].as_str(), entry[1].as_u64()) {
                (Some(h), Some(pid)) => {
                    let ours = h == us.host && pid == u64::from(us.pid);
                    ours || u32::try_from(pid).map_or(true, |pid| !is_stale(h, pid, &us))
                }
                _ => true,
            });
        }
    }
    roster
}

/// Adds `id` to, or removes it from, the roster's `key` list.
fn modify(
    roster: &mut serde_json::Map<String, serde_json::Value>,
    key: &str,
    id: &LockerId,
    add: bool,
) {
    let entry = id.roster_entry();
    let list = roster
        .entry(key)
        .or_insert_with(|| serde_json::Value::Array(Vec::new()));
    if !list.is_array() {
        *list = serde_json::Value::Array(Vec::new());
    }
    if let Some(list) = list.as_array_mut() {
        list.retain(|e| *e != entry);
        if add {
            list.push(entry);
        }
    }
}

/// Writes the roster as borg does (in place, under `lock.exclusive`), or
/// removes it when nobody is in it.
fn save_roster(repo: &Path, roster: &serde_json::Map<String, serde_json::Value>) -> io::Result<()> {
    let path = repo.join("lock.roster");
    let empty = ["shared", "exclusive"].iter().all(|k| {
        roster
            .get(*k)
            .and_then(|v| v.as_array())
            .is_none_or(|v| v.is_empty())
    });
    if empty {
        return match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let text = serde_json::to_vec(roster).map_err(io::Error::other)?;
    fs::write(path, text)
}

impl HeldLock {
    /// The repository locked.
    pub fn repo(&self) -> &Path {
        &self.repo
    }

    /// Lets go of the lock, as borg's `release`: out of the roster, then
    /// `lock.exclusive`. Blocking.
    pub fn release_blocking(mut self) -> io::Result<()> {
        self.released = true;
        let result = self.let_go();
        if let Some(set) = locked_here().as_mut() {
            set.remove(&self.repo);
        }
        result
    }

    fn let_go(&self) -> io::Result<()> {
        let mut roster = load_roster(&self.repo, &self.id.host);
        modify(&mut roster, "exclusive", &self.id, false);
        let saved = save_roster(&self.repo, &roster);
        let dir = self.repo.join("lock.exclusive");
        fs::remove_file(dir.join(self.id.file_name()))?;
        match fs::remove_dir(&dir) {
            // Someone else's file arrived, or the directory went: borg
            // takes both as a lost race, which is fine.
            Err(e)
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::ENOTEMPTY | libc::EEXIST | libc::ENOENT)
                ) =>
            {
                return Err(e)
            }
            _ => {}
        }
        saved
    }
}

impl Drop for HeldLock {
    /// A lock not released (an error on the way) is let go of here.
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Err(e) = self.let_go() {
            tracing::warn!("cannot release borg's lock on {}: {e}", self.repo.display());
        }
        if let Some(set) = locked_here().as_mut() {
            set.remove(&self.repo);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(pid: u32) -> LockerId {
        LockerId {
            host: "test@ferry".into(),
            pid,
        }
    }

    /// A pid that is not running: a child that has been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().expect("true");
        let pid = child.id();
        child.wait().expect("wait");
        pid
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .map(|e| {
                e.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[test]
    fn takes_and_releases_as_borg_lays_it_out() {
        let repo = tempfile::tempdir().expect("dir");
        let me = LockerId::this_process("test@ferry");
        let Attempt::Locked(lock) = try_lock(repo.path(), &me).expect("try") else {
            panic!("a free lock was held");
        };
        assert_eq!(
            names(&repo.path().join("lock.exclusive")),
            vec![format!("test@ferry.{}-0", std::process::id())]
        );
        let roster: serde_json::Value =
            serde_json::from_slice(&fs::read(repo.path().join("lock.roster")).expect("roster"))
                .expect("json");
        assert_eq!(
            roster["exclusive"],
            serde_json::json!([["test@ferry", std::process::id(), 0]])
        );
        // Held by this process: a second attempt here waits.
        assert!(matches!(try_lock(repo.path(), &me), Ok(Attempt::Held)));
        lock.release_blocking().expect("release");
        assert_eq!(names(repo.path()), Vec::<String>::new());
    }

    #[test]
    fn a_live_holder_keeps_it_and_a_dead_one_is_removed() {
        let repo = tempfile::tempdir().expect("dir");
        let dir = repo.path().join("lock.exclusive");
        fs::create_dir(&dir).expect("dir");
        // Our parent is alive: held.
        let parent = std::os::unix::process::parent_id();
        fs::write(dir.join(format!("test@ferry.{parent}-0")), "").expect("file");
        assert!(matches!(try_lock(repo.path(), &id(1)), Ok(Attempt::Held)));
        // Another host's lock is never stale, even of a dead pid.
        fs::remove_file(dir.join(format!("test@ferry.{parent}-0"))).expect("rm");
        let dead = dead_pid();
        fs::write(dir.join(format!("other@host.{dead}-0")), "").expect("file");
        assert!(matches!(try_lock(repo.path(), &id(1)), Ok(Attempt::Held)));
        // Our host's dead pid is stale: removed, and the lock taken.
        fs::remove_file(dir.join(format!("other@host.{dead}-0"))).expect("rm");
        fs::write(dir.join(format!("test@ferry.{dead}-0")), "").expect("file");
        fs::write(
            repo.path().join("lock.roster"),
            format!(r#"{{"shared": [], "exclusive": [["test@ferry", {dead}, 0]]}}"#),
        )
        .expect("roster");
        let me = LockerId::this_process("test@ferry");
        let Ok(Attempt::Locked(lock)) = try_lock(repo.path(), &me) else {
            panic!("a stale lock was not taken over");
        };
        let roster: serde_json::Value =
            serde_json::from_slice(&fs::read(repo.path().join("lock.roster")).expect("roster"))
                .expect("json");
        assert_eq!(
            roster["exclusive"],
            serde_json::json!([["test@ferry", std::process::id(), 0]])
        );
        lock.release_blocking().expect("release");
    }

    #[test]
    fn waits_for_a_live_reader_in_the_roster() {
        let repo = tempfile::tempdir().expect("dir");
        let parent = std::os::unix::process::parent_id();
        fs::write(
            repo.path().join("lock.roster"),
            format!(r#"{{"shared": [["test@ferry", {parent}, 0]], "exclusive": []}}"#),
        )
        .expect("roster");
        let me = LockerId::this_process("test@ferry");
        assert!(matches!(try_lock(repo.path(), &me), Ok(Attempt::Held)));
        // lock.exclusive was given back; the reader is still listed.
        assert!(!repo.path().join("lock.exclusive").exists());
        assert!(repo.path().join("lock.roster").exists());
    }

    #[test]
    fn parses_borgs_names() {
        assert_eq!(
            parse_name("nas@ferry.77-3f"),
            Some(("nas@ferry".to_string(), 77))
        );
        assert_eq!(parse_name("a.b@c.12-0"), Some(("a.b@c".to_string(), 12)));
        assert_eq!(parse_name("junk"), None);
        assert_eq!(parse_name("h.x-0"), None);
    }

    /// Against borg itself: a repository and a `borg` command line with
    /// our host id; None (a skip) where borg is not installed, except
    /// under CI=true.
    struct RealBorg {
        dir: tempfile::TempDir,
    }

    const HOST: &str = "locktest@ferry";

    impl RealBorg {
        fn new() -> Option<RealBorg> {
            let have = std::process::Command::new("borg")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success());
            if !have {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "borg is missing"
                );
                eprintln!("skipped: borg is not installed");
                return None;
            }
            let real = RealBorg {
                dir: tempfile::tempdir().expect("dir"),
            };
            let status = real
                .borg(&["init", "-e", "none"])
                .status()
                .expect("borg init");
            assert!(status.success());
            Some(real)
        }

        fn repo(&self) -> PathBuf {
            self.dir.path().join("repo")
        }

        fn borg(&self, args: &[&str]) -> std::process::Command {
            let mut command = std::process::Command::new("borg");
            command
                .args(args)
                .arg(self.repo())
                .env("BORG_HOST_ID", HOST)
                .env("BORG_BASE_DIR", self.dir.path().join("base"))
                .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes");
            command
        }

        /// `borg with-lock` holding the lock until its stdin closes;
        /// returned once it holds it.
        fn holding_the_lock(&self) -> std::process::Child {
            let ready = self.dir.path().join("ready");
            let borg = self
                .borg(&["with-lock"])
                .args(["sh", "-c", "touch \"$0\"; exec cat >/dev/null"])
                .arg(&ready)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("borg with-lock");
            self.wait_for("borg holding the lock", || ready.exists());
            borg
        }

        /// Waits (bounded) for `ready` to hold: a file borg makes.
        fn wait_for(&self, what: &str, ready: impl Fn() -> bool) {
            let until = std::time::Instant::now() + Duration::from_secs(60);
            while !ready() {
                assert!(std::time::Instant::now() < until, "{what} never happened");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    #[test]
    fn borg_waits_for_ferrys_lock() {
        let Some(real) = RealBorg::new() else { return };
        let me = LockerId::this_process(HOST);
        let Ok(Attempt::Locked(lock)) = try_lock(&real.repo(), &me) else {
            panic!("the free lock was not taken");
        };
        let mut borg = real
            .borg(&["with-lock", "--lock-wait", "20"])
            .args(["true"])
            .spawn()
            .expect("borg with-lock");
        // borg is trying: its temporary lock directory is there.
        let repo = real.repo();
        real.wait_for("borg trying the lock", || {
            names(&repo)
                .iter()
                .any(|n| n.starts_with("lock.exclusive.") && n.ends_with(".tmp"))
        });
        assert!(
            borg.try_wait().expect("wait").is_none(),
            "borg did not wait"
        );
        lock.release_blocking().expect("release");
        assert!(borg.wait().expect("borg").success());
        assert!(!repo.join("lock.exclusive").exists());
    }

    #[test]
    fn ferry_waits_for_borgs_lock() {
        let Some(real) = RealBorg::new() else { return };
        let mut borg = real.holding_the_lock();
        let me = LockerId::this_process(HOST);
        assert!(matches!(try_lock(&real.repo(), &me), Ok(Attempt::Held)));
        drop(borg.stdin.take());
        assert!(borg.wait().expect("borg").success());
        let Ok(Attempt::Locked(lock)) = try_lock(&real.repo(), &me) else {
            panic!("the lock borg let go of was not taken");
        };
        lock.release_blocking().expect("release");
    }

    #[test]
    fn stale_locks_are_stale_to_both() {
        let Some(real) = RealBorg::new() else { return };
        // ferry-sync killed while holding it: borg takes it over.
        let gone = LockerId {
            host: HOST.into(),
            pid: dead_pid(),
        };
        let Ok(Attempt::Locked(lock)) = try_lock(&real.repo(), &gone) else {
            panic!("the free lock was not taken");
        };
        // As if the process died: nothing released, and this process
        // does not remember holding it.
        std::mem::forget(lock);
        if let Some(set) = locked_here().as_mut() {
            set.remove(&real.repo());
        }
        let status = real
            .borg(&["with-lock", "--lock-wait", "30"])
            .arg("true")
            .status()
            .expect("borg with-lock");
        assert!(
            status.success(),
            "borg did not take over ferry's stale lock"
        );
        // borg killed while holding it: ferry-sync takes it over.
        let mut borg = real.holding_the_lock();
        borg.kill().expect("kill borg");
        borg.wait().expect("reap borg");
        let me = LockerId::this_process(HOST);
        let Ok(Attempt::Locked(lock)) = try_lock(&real.repo(), &me) else {
            panic!("borg's stale lock was not taken over");
        };
        lock.release_blocking().expect("release");
    }
}
