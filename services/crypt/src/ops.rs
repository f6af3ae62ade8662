//! The operations on one drive: open (unlock, mount read-only, prove
//! identity, remount read-write), close (unmount, lock, power off), remove
//! (the drive was pulled out: lazy unmount, deferred lock) and, on start,
//! inspect (what a crashed predecessor left behind).
//!
//! Each runs to completion in a task the service loop owns and reports a
//! [`Failed`] with the stage and a sentence a person can act on. A failure
//! undoes what the operation did, so a drive that failed to open is left
//! unmounted and locked. The identity check happens on a mount that writes
//! nothing and trusts nothing: only the filesystem type recorded at
//! enrolment (blkid probes it first, so a stranger's image of another type
//! never reaches a filesystem driver), `ro` plus no journal replay (ext4
//! `noload`, XFS `norecovery`: `ro` alone still replays a dirty journal),
//! nosuid, nodev, noexec, nosymfollow; the token is read through a handle
//! of the mount's root proven by its mount id. Only then is the drive
//! mounted read-write.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_config::{CryptSettings, Drive, Filesystem, Name};
use ferry_interfaces::CryptStage;
use ferry_service::confined::Confined;

use crate::command::{self, Arg, CommandError};
use crate::domain::{Failed, Leftover, Operation};
use crate::identity;
use crate::mounts::{self, Mount};
use crate::secrets;

/// The options every ferry mount has: the drive's files can never become
/// setuid programs, device nodes or executables on this machine, and no
/// symlink on it is followed by anyone.
pub const MOUNT_OPTIONS: &str = "nosuid,nodev,noexec,nosymfollow";

/// How long to wait between attempts to unmount a busy filesystem.
const BUSY_RETRY: Duration = Duration::from_secs(1);

/// Whether the drive was pulled out while its operation runs: the service
/// loop says so (the domain's `Effect::Interrupt`), and a close waiting
/// for a busy mount to be let go stops waiting at once.
#[derive(Debug)]
pub struct Gone(tokio::sync::watch::Receiver<bool>);

impl Gone {
    /// The loop's end (send `true` when the drive is gone) and the task's.
    pub fn channel() -> (tokio::sync::watch::Sender<bool>, Gone) {
        let (sender, receiver) = tokio::sync::watch::channel(false);
        (sender, Gone(receiver))
    }

    /// For an operation nobody interrupts.
    fn never() -> Gone {
        Gone::channel().1
    }

    /// Resolves once the drive is gone; never when nobody can say so.
    async fn wait(&mut self) {
        if self.0.wait_for(|gone| *gone).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Everything an operation on one drive needs, taken from the configuration
/// and the service's view of the drive.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The enrolled name.
    pub name: Name,
    /// The block device the drive was last seen as (kept after removal, to
    /// recognise its mount).
    pub device: Option<PathBuf>,
    /// The LUKS key file; `None` for a plain drive.
    pub key_file: Option<PathBuf>,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// This host's half of the identity token.
    pub host_token: PathBuf,
    /// The filesystem type recorded at enrolment: the only one mounted.
    pub filesystem: Filesystem,
    /// Power the drive off after closing.
    pub power_off: bool,
    /// How long a busy filesystem is retried.
    pub close_timeout: Duration,
    /// How long one helper program may run.
    pub command_timeout: Duration,
    /// The SMART health check before opening.
    pub health: crate::health::Check,
}

impl Plan {
    /// The plan for drive `name` as configured.
    pub fn new(name: &Name, drive: &Drive, settings: &CryptSettings) -> Plan {
        Plan {
            name: name.clone(),
            device: None,
            key_file: drive.key_file.as_ref().map(|k| k.to_path_buf()),
            mountpoint: canonical(&drive.mountpoint(name)),
            host_token: settings.token_path(name.as_str()),
            filesystem: drive.filesystem,
            power_off: drive.power_off,
            close_timeout: Duration::from_secs(settings.close_timeout),
            command_timeout: Duration::from_secs(settings.command_timeout),
            health: crate::health::Check {
                policy: drive.health,
                smartctl: settings.smartctl.to_path_buf(),
                ledger: None,
                report: None,
            },
        }
    }

    /// The device-mapper name of the unlocked drive.
    pub fn mapping_name(&self) -> String {
        format!("ferry-{}", self.name)
    }

    /// The device node of the unlocked drive.
    pub fn mapping_path(&self) -> PathBuf {
        Path::new("/dev/mapper").join(self.mapping_name())
    }

    /// Whether the unlocked mapping exists now.
    fn mapped(&self) -> bool {
        self.key_file.is_some() && self.mapping_path().exists()
    }

    /// What the filesystem is mounted from: the mapping or the device.
    fn source(&self) -> Option<PathBuf> {
        match self.key_file {
            Some(_) => Some(self.mapping_path()),
            None => self.device.clone(),
        }
    }

    /// The mount at the mountpoint if it is this drive's: its source is the
    /// drive's mapping or device (by path, or by device number while the
    /// node exists). Anything else mounted there is left alone.
    pub fn our_mount(&self) -> Option<Mount> {
        let mount = mounts::at(&self.mountpoint)?;
        let source = self.source()?;
        let same_path = Path::new(&mount.source) == source;
        let same_device = mounts::device_number(&source).is_some_and(|d| d == mount.majmin);
        (same_path || same_device).then_some(mount)
    }

    async fn run(&self, program: &str, args: &[Arg<'_>]) -> Result<String, CommandError> {
        command::run(program, args, self.command_timeout).await
    }

    /// [`Plan::our_mount`], read off the runtime.
    async fn mount_now(&self) -> Option<Mount> {
        let plan = self.clone();
        off_runtime(move || plan.our_mount()).await
    }

    /// [`Plan::mapped`], looked at off the runtime.
    async fn mapped_now(&self) -> bool {
        let plan = self.clone();
        off_runtime(move || plan.mapped()).await
    }
}

/// Runs `work` — a read of mountinfo, sysfs, /proc, the key file or the
/// mountpoint — on a blocking thread, so the service's runtime never waits
/// on the kernel or a wedged drive. A panic there is the operation's own
/// (its task becomes a DriveFailed).
async fn off_runtime<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("a blocking read of ferry-crypt was cancelled: {e}"),
        },
    }
}

/// Who holds anything under `point`, in words (a walk of /proc, off the
/// runtime).
async fn holders_now(point: &Path) -> String {
    let point = point.to_path_buf();
    off_runtime(move || mounts::describe(&mounts::holders(&point))).await
}

/// `path` with symlinks in its existing part resolved, as the kernel shows
/// mountpoints in mountinfo.
fn canonical(path: &Path) -> PathBuf {
    if let Ok(resolved) = path.canonicalize() {
        return resolved;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => canonical(parent).join(name),
        _ => path.to_path_buf(),
    }
}

/// How an opened drive is left mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read-write, for the sync worker.
    ReadWrite,
    /// Read-only, held for a person (restoring from it); nothing writes.
    ReadOnly,
}

/// Opens the drive on `device` read-write: unlock, mount, prove identity.
/// Everything it did is undone when it fails.
pub async fn open(plan: &Plan, device: &Path) -> Result<(), Failed> {
    open_for(plan, device, Access::ReadWrite).await
}

/// Runs `operation` on the drive (on `device`, for the opening ones); a
/// close stops retrying a busy mount once `gone` says the drive is gone.
pub async fn run(
    operation: Operation,
    plan: &Plan,
    device: Option<&Path>,
    gone: Gone,
) -> Result<(), Failed> {
    match (operation, device) {
        (Operation::Open, Some(device)) => open(plan, device).await,
        (Operation::Hold, Some(device)) => open_for(plan, device, Access::ReadOnly).await,
        (Operation::Reopen, Some(device)) => reopen(plan, device).await,
        (Operation::Open | Operation::Hold | Operation::Reopen, None) => Err(Failed::new(
            CryptStage::Unlock,
            format!("drive {} is not plugged in", plan.name),
        )),
        (Operation::Close, _) => close(plan, gone).await,
        (Operation::Remove, _) => Err(remove(plan).await),
    }
}

/// [`open`], leaving the drive mounted as `access` says.
pub async fn open_for(plan: &Plan, device: &Path, access: Access) -> Result<(), Failed> {
    // Before opening, check health: a drive that reports itself failing is
    // not opened when its policy says refuse (stage `health`).
    crate::health::gate(&plan.health, plan.name.as_str(), device).await?;
    let source = match &plan.key_file {
        Some(key) => {
            unlock(plan, device, key).await?;
            plan.mapping_path()
        }
        None => device.to_path_buf(),
    };
    let mounted = mount_and_prove(plan, &source, access).await;
    if mounted.is_err() && plan.key_file.is_some() {
        if let Err(e) = lock(plan, false).await {
            tracing::error!("{}: {}", plan.name, e.message);
        }
    }
    mounted
}

/// Opens again, from scratch, a drive a killed predecessor left half open
/// (or half closed): unmount and lock what is there, then [`open`], which
/// proves the identity again. Never powers the drive off.
pub async fn reopen(plan: &Plan, device: &Path) -> Result<(), Failed> {
    unmount(plan, false, &mut Gone::never()).await?;
    lock(plan, false).await?;
    open(plan, device).await
}

/// Checks the key file, then the key against the LUKS header (no mapping
/// needed), then maps the unlocked drive.
async fn unlock(plan: &Plan, device: &Path, key: &Path) -> Result<(), Failed> {
    let fail = |m: String| Failed::new(CryptStage::Unlock, m);
    let checked = key.to_path_buf();
    off_runtime(move || secrets::check_key_file(&checked).map_err(|e| e.to_string()))
        .await
        .map_err(fail)?;
    let test = plan
        .run(
            "cryptsetup",
            &[
                &"open",
                &"--test-passphrase",
                &"--type",
                &"luks",
                &"--key-file",
                &key,
                &device,
            ],
        )
        .await;
    match test {
        Ok(_) => {}
        // cryptsetup's exit code 2: no key slot opens with this key.
        Err(e) if e.code() == Some(2) => {
            return Err(fail(format!(
                "the key file {} does not unlock {}: this is not the drive enrolled as {}, or the key file was replaced; plug in the right drive, or restore the drive's key from your backup of the keys",
                key.display(),
                device.display(),
                plan.name
            )))
        }
        Err(e) => {
            return Err(fail(format!(
                "{} cannot be checked as a LUKS drive: {e}",
                device.display()
            )))
        }
    }
    let mapping = plan.mapping_name();
    if plan.mapped_now().await {
        match stale_mapping(plan, device).await {
            None => {
                // A killed predecessor's `cryptsetup open` finished late; the
                // key is proven above and the identity after mounting.
                tracing::warn!("{}: {mapping} is already unlocked; using it", plan.name);
                return Ok(());
            }
            Some(why) => set_aside(plan, &why).await?,
        }
    }
    let opened = plan
        .run(
            "cryptsetup",
            &[
                &"open",
                &"--type",
                &"luks",
                &"--key-file",
                &key,
                &device,
                &mapping,
            ],
        )
        .await;
    opened.map(drop).map_err(|e| {
        if e.output().contains("device-mapper") {
            fail(format!(
                "the key is right, but {} cannot be mapped: this kernel has no device-mapper (load dm_crypt: modprobe dm_crypt); {e}",
                device.display()
            ))
        } else {
            fail(format!("cannot unlock {}: {e}", device.display()))
        }
    })
}

/// Why the existing mapping `ferry-NAME` must not be used for `device`, or
/// `None` if it is `device` unlocked. A drive pulled while a process held
/// its mount leaves its mapping in deferred removal, backed by a device that
/// is gone; on replug that mapping is never the drive that came back.
async fn stale_mapping(plan: &Plan, device: &Path) -> Option<String> {
    let mapping = plan.mapping_name();
    let info = plan
        .run("dmsetup", &[&"info", &mapping])
        .await
        .unwrap_or_else(|e| e.to_string());
    if info.contains("DEFERRED REMOVE") {
        return Some(format!(
            "{mapping} is left over from when the drive was pulled out (in deferred removal)"
        ));
    }
    let (node, ours) = (plan.mapping_path(), device.to_path_buf());
    let (backing, ours) =
        off_runtime(move || (backing_devices(&node), mounts::device_number(&ours))).await;
    let ours = ours?;
    if backing.contains(&ours) {
        return None;
    }
    Some(match backing.is_empty() {
        true => format!("{mapping} is left over from a device that is gone"),
        false => format!(
            "{mapping} unlocks another device ({}), not {} ({ours})",
            backing.join(", "),
            device.display()
        ),
    })
}

/// The devices under the mapping `node` ("major:minor" each), from
/// /sys/block/dm-N/slaves/*/dev. Blocking: it reads sysfs.
fn backing_devices(node: &Path) -> Vec<String> {
    node.canonicalize()
        .ok()
        .and_then(|node| node.file_name().map(|n| n.to_owned()))
        .and_then(|dm| std::fs::read_dir(Path::new("/sys/block").join(dm).join("slaves")).ok())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|slave| std::fs::read_to_string(slave.path().join("dev")).ok())
        .map(|dev| dev.trim().to_string())
        .collect()
}

/// Gets a stale mapping out of the way of a fresh unlock by closing it. One
/// that something still holds (a lazily unmounted filesystem with an open
/// file or a working directory on it) cannot be closed, nor renamed aside:
/// its device-mapper UUID (from the LUKS UUID and the mapping name) would
/// clash with the fresh mapping's. The kernel removes it once the last user
/// lets go; until then the drive cannot be opened, and the message says who
/// holds it.
async fn set_aside(plan: &Plan, why: &str) -> Result<(), Failed> {
    let mapping = plan.mapping_name();
    let node = plan.mapping_path();
    let number = off_runtime(move || mounts::device_number(&node)).await;
    let closed = plan.run("cryptsetup", &[&"close", &mapping]).await;
    if closed.is_ok() || !plan.mapped_now().await {
        tracing::warn!("{}: {why}; closed it", plan.name);
        return Ok(());
    }
    let holders = off_runtime(move || {
        number
            .map(|n| mounts::holders_of_device(&n))
            .filter(|h| !h.is_empty())
            .map(|h| format!(" (held by {})", mounts::describe(&h)))
            .unwrap_or_default()
    })
    .await;
    Err(Failed::new(CryptStage::Unlock, format!(
        "{why} and still in use{holders}, so the drive cannot be unlocked again yet; stop what uses it (its files were on the drive when it was pulled), the kernel then removes {mapping} by itself, and plug the drive in again"
    )))
}

/// Mounts `source` read-only in a way that writes nothing (only as the
/// filesystem type recorded at enrolment, checked with blkid first; no
/// journal replay), checks the identity token, then mounts it again
/// read-write unless `access` is read-only. Unmounts again on any failure.
async fn mount_and_prove(plan: &Plan, source: &Path, access: Access) -> Result<(), Failed> {
    let mountpoint = &plan.mountpoint;
    // Already mounted there from this drive (a killed predecessor's `mount`
    // finished late): adopt the mount, proving the token again below.
    let mounted = match plan.mount_now().await {
        Some(_) => {
            tracing::warn!(
                "{}: already mounted at {}; checking and adopting that mount",
                plan.name,
                mountpoint.display()
            );
            Ok(String::new())
        }
        None => {
            let (prepared, at) = (plan.clone(), source.to_path_buf());
            off_runtime(move || prepare_mountpoint(&prepared, &at)).await?;
            check_filesystem(plan, source).await?;
            let read_only = identity_mount_options(plan.filesystem);
            let fstype = plan.filesystem.as_str();
            plan.run(
                "mount",
                &[&"-t", &fstype, &"-o", &read_only, &source, &mountpoint],
            )
            .await
        }
    };
    // A mount that failed because the drive got mounted there meanwhile
    // (that late `mount` again) adopts it too.
    let mounted = match mounted {
        Err(e) if plan.mount_now().await.is_none() => Err(e),
        _ => Ok(()),
    };
    if let Err(e) = mounted {
        remove_mountpoint(mountpoint).await;
        return Err(Failed::new(
            CryptStage::Mount,
            format!(
                "cannot mount {} at {}: {e}",
                source.display(),
                mountpoint.display()
            ),
        ));
    }
    let proven = prove(plan).await;
    let result = match proven {
        Ok(()) if access == Access::ReadOnly => Ok(()),
        Ok(()) => mount_read_write(plan, source).await,
        Err(failed) => Err(failed),
    };
    if result.is_err() {
        if let Err(e) = unmount(plan, false, &mut Gone::never()).await {
            tracing::error!("{}: cannot undo the mount: {}", plan.name, e.message);
        }
    }
    result
}

/// The options of the mount that proves identity: read-only, no journal
/// replay, nothing on the drive executable, no device node or symlink
/// usable.
pub fn identity_mount_options(filesystem: Filesystem) -> String {
    format!("ro,{},{MOUNT_OPTIONS}", filesystem.no_replay())
}

/// [`prove_now`] on a blocking thread: reading the token reads the drive,
/// and a slow or wedged drive must not stall the service's runtime.
async fn prove(plan: &Plan) -> Result<(), Failed> {
    let plan = plan.clone();
    tokio::task::spawn_blocking(move || prove_now(&plan))
        .await
        .unwrap_or_else(|e| {
            Err(Failed::new(
                CryptStage::Identity,
                format!("the identity check stopped unexpectedly: {e}"),
            ))
        })
}

/// Checks the drive's identity token through a handle of the mount's root
/// (proven to be the filesystem mounted at the mountpoint).
fn prove_now(plan: &Plan) -> Result<(), Failed> {
    let root = Confined::open_mount_root(&plan.mountpoint).map_err(|e| {
        Failed::new(
            CryptStage::Identity,
            format!("the drive cannot be checked: {e}"),
        )
    })?;
    identity::verify_on(&plan.name, &plan.host_token, &root)
        .map_err(|e| Failed::new(CryptStage::Identity, e.to_string()))
}

/// The identity is proven: the read-only mount gives way to a read-write
/// one (which may now replay the journal: it is our drive).
async fn mount_read_write(plan: &Plan, source: &Path) -> Result<(), Failed> {
    let mountpoint = &plan.mountpoint;
    let fail = |e: CommandError| {
        Failed::new(
            CryptStage::Mount,
            format!("cannot mount {} read-write: {e}", mountpoint.display()),
        )
    };
    let read_only = plan.mount_now().await.is_some_and(|m| m.has_option("ro"));
    if !read_only {
        let read_write = format!("remount,rw,{MOUNT_OPTIONS}");
        return plan
            .run("mount", &[&"-o", &read_write, &mountpoint])
            .await
            .map(drop)
            .map_err(fail);
    }
    plan.run("umount", &[&mountpoint]).await.map_err(fail)?;
    let read_write = format!("rw,{MOUNT_OPTIONS}");
    let fstype = plan.filesystem.as_str();
    plan.run(
        "mount",
        &[&"-t", &fstype, &"-o", &read_write, &source, &mountpoint],
    )
    .await
    .map(drop)
    .map_err(fail)?;
    // What is mounted now must be the drive just proven.
    prove(plan).await
}

/// Refuses a source whose filesystem (as blkid probes it, before any
/// filesystem driver sees it) is not the type recorded at enrolment.
async fn check_filesystem(plan: &Plan, source: &Path) -> Result<(), Failed> {
    let expected = plan.filesystem.as_str();
    let probed = plan
        .run("blkid", &[&"-p", &"-o", &"value", &"-s", &"TYPE", &source])
        .await;
    let found = match probed {
        Ok(out) => out.trim().to_string(),
        // blkid's exit code 2: nothing recognisable on the device.
        Err(e) if e.code() == Some(2) => String::new(),
        Err(e) => {
            return Err(Failed::new(
                CryptStage::Identity,
                format!(
                    "cannot tell which filesystem {} holds, so it is not mounted: {e}",
                    source.display()
                ),
            ))
        }
    };
    if found != expected {
        let holds = if found.is_empty() {
            "no filesystem blkid knows".to_string()
        } else {
            format!("a filesystem of type {}", found.escape_debug())
        };
        return Err(Failed::new(
            CryptStage::Identity,
            format!(
                "{} holds {holds}, but drive {} was enrolled with {expected}: this is not the enrolled drive (a copy of its UUID?), so it was not mounted; plug in the right drive (or, if this really is drive {}, set its `filesystem` in ferry.toml)",
                source.display(),
                plan.name,
                plan.name
            ),
        ));
    }
    Ok(())
}

/// Refuses a mountpoint that something else is mounted on, and a source
/// that is already mounted elsewhere; creates the mountpoint.
fn prepare_mountpoint(plan: &Plan, source: &Path) -> Result<(), Failed> {
    let mountpoint = &plan.mountpoint;
    let fail = |m: String| Failed::new(CryptStage::Mount, m);
    if let Some(other) = mounts::at(mountpoint) {
        return Err(fail(format!(
            "something else is already mounted at {} ({}); ferry never mounts over it: unmount it, or give drive {} another mountpoint in ferry.toml",
            mountpoint.display(),
            other.source.escape_debug(),
            plan.name
        )));
    }
    if let Some(majmin) = mounts::device_number(source) {
        if let Some(elsewhere) = mounts::of_device(&majmin).first() {
            return Err(fail(format!(
                "{} is already mounted at {} by something else (a desktop automounter?); unmount it there first",
                source.display(),
                elsewhere.point.display()
            )));
        }
    }
    create_directories(mountpoint).map_err(|e| {
        fail(format!(
            "cannot create the mountpoint {}: {e}",
            mountpoint.display()
        ))
    })?;
    // Never mount on a symlink (or through one made since ferry-crypt
    // started): the kernel would mount wherever it points.
    let resolved = mountpoint.canonicalize().ok();
    let is_link = std::fs::symlink_metadata(mountpoint).is_ok_and(|m| m.file_type().is_symlink());
    if is_link || resolved.as_deref() != Some(mountpoint.as_path()) {
        return Err(fail(format!(
            "the mountpoint {} is, or leads through, a symbolic link (to {}); ferry never mounts on a symlink: replace it with a directory",
            mountpoint.display(),
            resolved
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "nowhere".into())
        )));
    }
    if std::fs::read_dir(mountpoint).is_ok_and(|mut d| d.next().is_some()) {
        tracing::warn!(
            "{}: {} is not empty; its files are hidden while the drive is mounted over them",
            plan.name,
            mountpoint.display()
        );
    }
    Ok(())
}

/// Creates `dir` and its missing parents, each 0755 whatever the umask
/// (the service's is 0077): other services must reach the mounted drive.
fn create_directories(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_directories(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the (empty) mountpoint directory, so nothing writes into the
/// root filesystem believing it writes to the drive (off the runtime).
async fn remove_mountpoint(mountpoint: &Path) {
    let mountpoint = mountpoint.to_path_buf();
    off_runtime(move || {
        if mounts::at(&mountpoint).is_none() {
            let _ = std::fs::remove_dir(&mountpoint);
        }
    })
    .await
}

/// Unmounts this drive's mount (if there is one). `lazy` detaches it at
/// once even while busy (umount -l). Busy otherwise: retries until the
/// close timeout, naming the processes that hold it, or until `gone` says
/// the drive was pulled out (then the removal's lazy detach takes over).
async fn unmount(plan: &Plan, lazy: bool, gone: &mut Gone) -> Result<(), Failed> {
    let mountpoint = &plan.mountpoint;
    let started = Instant::now();
    let mut named = String::new();
    while plan.mount_now().await.is_some() {
        if started.elapsed() > plan.close_timeout + plan.command_timeout {
            return Err(Failed::new(
                CryptStage::Close,
                format!(
                    "{} stays mounted although umount succeeds; see `findmnt {}`",
                    plan.name,
                    mountpoint.display()
                ),
            ));
        }
        let args: Vec<Arg<'_>> = if lazy {
            vec![&"-l", &mountpoint]
        } else {
            vec![&mountpoint]
        };
        match plan.run("umount", &args).await {
            Ok(_) => {}
            Err(e) if e.output().contains("busy") => {
                let holders = holders_now(mountpoint).await;
                if started.elapsed() >= plan.close_timeout {
                    return Err(Failed::new(
                        CryptStage::Close,
                        format!(
                            "{} is still busy after {}s, so the drive stays mounted: held by {holders}; stop them, then close it again (busctl call org.ferry.Crypt1 /org/ferry/Crypt1 org.ferry.Crypt1 Close s {})",
                            mountpoint.display(),
                            plan.close_timeout.as_secs(),
                            plan.name
                        ),
                    ));
                }
                if holders != named {
                    tracing::warn!(
                        "{}: {} is busy, held by {holders}; retrying for up to {}s",
                        plan.name,
                        mountpoint.display(),
                        plan.close_timeout.as_secs()
                    );
                    named = holders;
                }
                tokio::select! {
                    _ = tokio::time::sleep(BUSY_RETRY) => {}
                    _ = gone.wait() => return Err(Failed::new(
                        CryptStage::Removed,
                        format!(
                            "{} was pulled out while {} was busy (held by {named}); the close stopped retrying",
                            plan.name,
                            mountpoint.display()
                        ),
                    )),
                }
            }
            Err(e) => {
                return Err(Failed::new(
                    CryptStage::Close,
                    format!("cannot unmount {}: {e}", mountpoint.display()),
                ))
            }
        }
    }
    remove_mountpoint(mountpoint).await;
    Ok(())
}

/// Closes the LUKS mapping if it exists. `deferred` lets the kernel remove
/// it once the last user (a lazily unmounted filesystem) lets go.
async fn lock(plan: &Plan, deferred: bool) -> Result<(), Failed> {
    if !plan.mapped_now().await {
        return Ok(());
    }
    let mapping = plan.mapping_name();
    let mut args: Vec<Arg<'_>> = vec![&"close"];
    if deferred {
        args.push(&"--deferred");
    }
    args.push(&mapping);
    plan.run("cryptsetup", &args)
        .await
        .map(drop)
        .map_err(|e| Failed::new(CryptStage::Close, format!("cannot lock {mapping}: {e}")))
}

/// Closes the drive: unmount (retrying while busy), lock, verify that
/// nothing of it is left, power it off if configured.
pub async fn close(plan: &Plan, mut gone: Gone) -> Result<(), Failed> {
    let looked = plan.clone();
    let other = off_runtime(move || {
        mounts::at(&looked.mountpoint).filter(|_| looked.our_mount().is_none())
    })
    .await;
    if let Some(other) = other {
        tracing::warn!(
            "{}: {} is mounted at {}, which is not this drive; leaving it alone",
            plan.name,
            other.source.escape_debug(),
            plan.mountpoint.display()
        );
    }
    unmount(plan, false, &mut gone).await?;
    lock(plan, false).await?;
    if plan.mount_now().await.is_some() || plan.mapped_now().await {
        return Err(Failed::new(
            CryptStage::Close,
            format!(
                "{} is still mounted or unlocked after closing; see `findmnt {}`",
                plan.name,
                plan.mountpoint.display()
            ),
        ));
    }
    if plan.power_off {
        let plan = plan.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || power_off(&plan)).await {
            tracing::warn!("the power-off stopped unexpectedly: {e}");
        }
    }
    Ok(())
}

/// The drive was pulled out while open: detach the mount lazily, have the
/// mapping removed once unused, and say what that means.
pub async fn remove(plan: &Plan) -> Failed {
    let point = plan.mountpoint.clone();
    let holders = off_runtime(move || mounts::holders(&point)).await;
    let mut problems = Vec::new();
    if let Err(e) = unmount(plan, true, &mut Gone::never()).await {
        problems.push(e.message);
    }
    if let Err(e) = lock(plan, true).await {
        problems.push(e.message);
    }
    // Say truthfully what became of the mapping: a filesystem still held
    // open keeps it alive after a lazy unmount, and the lock is only deferred.
    let what = match plan.mapped_now().await {
        true => format!(
            "it was detached from {} but is still in use, so its mapping {} is only scheduled for removal (the kernel removes it when the last process lets go)",
            plan.mountpoint.display(),
            plan.mapping_name()
        ),
        false => "it was unmounted and locked".to_string(),
    };
    let mut message = format!(
        "drive {} was removed while it was open: {what}, and whatever had not reached it yet is lost; plug it in again to check and update it",
        plan.name
    );
    if !holders.is_empty() {
        message.push_str(&format!(
            "; processes that were using it: {}",
            mounts::describe(&holders)
        ));
    }
    for problem in problems {
        message.push_str(&format!("; {problem}"));
    }
    Failed::new(CryptStage::Removed, message)
}

/// Looks at what is mounted and unlocked for the drive (after a crash).
/// Blocking: it reads the mount table and the token on the drive.
pub fn inspect(plan: &Plan) -> Leftover {
    let mapped = plan.mapped();
    let Some(mount) = plan.our_mount() else {
        return match mapped {
            true => Leftover::Close(format!(
                "{} is unlocked but not mounted",
                plan.mapping_name()
            )),
            false => Leftover::Nothing,
        };
    };
    let attached = plan.device.as_deref().is_some_and(Path::exists);
    if !attached {
        return Leftover::Close("it is mounted but no longer attached".into());
    }
    if mount.has_option("ro") || !MOUNT_OPTIONS.split(',').all(|o| mount.has_option(o)) {
        return Leftover::Close(format!(
            "it is mounted with options {} instead of rw,{MOUNT_OPTIONS}",
            mount.options
        ));
    }
    match prove_now(plan) {
        Ok(()) => Leftover::Adopt,
        Err(failed) => Leftover::Close(failed.message),
    }
}

/// Powers a USB drive off by removing its USB device (as udisks does); a
/// drive that is not on USB (a loop device, a SATA disk) is left running.
fn power_off(plan: &Plan) {
    let Some(device) = plan.device.as_deref() else {
        return;
    };
    let Some(block) = device
        .file_name()
        .map(|n| Path::new("/sys/class/block").join(n))
    else {
        return;
    };
    let usb = block.canonicalize().ok().and_then(|path| {
        path.ancestors()
            .find(|a| {
                a.join("remove").is_file()
                    && a.join("idVendor").is_file()
                    && a.to_string_lossy().contains("/usb")
            })
            .map(Path::to_path_buf)
    });
    match usb {
        Some(usb) => match std::fs::write(usb.join("remove"), "1") {
            Ok(()) => tracing::info!("{}: powered off ({})", plan.name, usb.display()),
            Err(e) => tracing::warn!("{}: cannot power off {}: {e}", plan.name, usb.display()),
        },
        None => tracing::info!(
            "{}: power-off: {} is not a USB drive; nothing to power off",
            plan.name,
            device.display()
        ),
    }
}
