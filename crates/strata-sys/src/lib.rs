//! Kernel access for strata: the only crate that mounts, unmounts or issues
//! ioctls.
//!
//! What it owns:
//! - [`mount_overlay`]: the composefs mount. Each EROFS image file is mounted
//!   detached (`fsopen("erofs")`, file-backed, no loop device), then one
//!   overlayfs is built with those detached mounts as `lowerdir+` layers (top
//!   first), the object store as a data-only lower (`datadir+`), `metacopy` and
//!   `redirect_dir` on, and optionally an upper/work pair and
//!   `verity=require`. The detached EROFS mounts are never attached anywhere,
//!   so `/proc/self/mountinfo` shows one overlay mount per image.
//! - [`unmount`] with errors that say busy / not a mount point.
//! - [`mounts`]: `/proc/self/mountinfo` parsed.
//! - [`measure_verity`] / [`enable_verity`]: the fs-verity ioctls, with
//!   "this kernel or filesystem has no fs-verity" as a distinct answer.
//! - [`start_writeback`]: `sync_file_range`, so a later sync waits less.
//!
//! - [`daemon`]: re-executing a command as a background process, its
//!   readiness report, and stopping it (wait, then kill).
//! - [`malloc`]: glibc malloc tuned for daemons (an arena limit, a fixed
//!   mmap threshold) and trimmed when they go quiet.
//!
//! What it does not own: deciding what to mount. Callers (the CLI) resolve
//! images in the store and hand over paths.

#![deny(missing_docs)]

pub mod daemon;
pub mod malloc;

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use rustix::fs::CWD;
use rustix::io::Errno;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, UnmountFlags, fsconfig_create,
    fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount,
};
use strata_digest::VerityDigest;

/// Errors from mounting and unmounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The target directory already has a mount on it.
    #[error(
        "{} is already a mount point; `strata umount {}` first or pick another directory",
        .0.display(),
        .0.display()
    )]
    AlreadyMounted(PathBuf),
    /// The mount is in use (open files, working directories).
    #[error(
        "{} is busy: a process has a file open or its working directory there (see `fuser -vm {}`); close it and retry",
        .0.display(),
        .0.display()
    )]
    Busy(PathBuf),
    /// A mount point asked for is not an existing directory.
    #[error("mount point {} is not an existing directory", .0.display())]
    NotADirectory(PathBuf),
    /// The path is not a mount point.
    #[error("{} is not a mount point", .0.display())]
    NotMounted(PathBuf),
    /// `verity=require` was asked for where fs-verity is unavailable.
    #[error("fs-verity is required but unavailable: {0}")]
    NoVerity(String),
    /// The kernel lacks a filesystem type strata needs.
    #[error(
        "this kernel cannot mount {fs}: {source} (is the {fs} module loaded? see /proc/filesystems)"
    )]
    NoFilesystem {
        /// The filesystem type.
        fs: &'static str,
        /// The errno from `fsopen`.
        source: io::Error,
    },
    /// A mount-API step failed; `step` names it and `log` holds what the
    /// kernel wrote to the filesystem context's message log.
    #[error("{step}: {source}{}", if .log.is_empty() { String::new() } else { format!(" (kernel: {})", .log) })]
    Kernel {
        /// What was being done, e.g. `mounting EROFS image /x/image.erofs`.
        step: String,
        /// The errno.
        source: io::Error,
        /// Kernel messages read from the fs context, joined by "; ".
        log: String,
    },
    /// Reading a file strata needs (mountinfo, an image) failed.
    #[error("{step}: {source}")]
    Io {
        /// What was being done.
        step: String,
        /// The error.
        source: io::Error,
    },
}

/// One composefs-style overlay mount.
#[derive(Debug, Clone)]
pub struct OverlayMount {
    /// Plain directories stacked above the EROFS layers, top first (the
    /// `--add` trees of a template build).
    pub dirs_above: Vec<PathBuf>,
    /// EROFS image files, top layer first.
    pub layers: Vec<PathBuf>,
    /// Data-only lower directories (the store's objects/) that redirects
    /// point into.
    pub data_dirs: Vec<PathBuf>,
    /// Upper and work directories for a writable mount.
    pub upper: Option<(PathBuf, PathBuf)>,
    /// Mount with `verity=require`: every redirected file must have
    /// fs-verity enabled with the digest recorded in the image.
    pub verity_require: bool,
    /// The mount source shown in mountinfo (e.g. `strata:sha256:...`).
    pub source: String,
}

/// A line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Mount ID.
    pub id: u32,
    /// Parent mount ID.
    pub parent: u32,
    /// Where it is mounted (octal escapes decoded).
    pub mount_point: PathBuf,
    /// Filesystem type, e.g. `overlay`.
    pub fs_type: String,
    /// Mount source, e.g. `strata:sha256:...`.
    pub source: String,
    /// Per-superblock options, e.g. `ro,lowerdir+=...`.
    pub super_options: String,
}

fn kernel_err(step: impl Into<String>, e: Errno, ctx: Option<&OwnedFd>) -> MountError {
    MountError::Kernel {
        step: step.into(),
        source: io::Error::from_raw_os_error(e.raw_os_error()),
        log: ctx.map(read_fs_log).unwrap_or_default(),
    }
}

/// Drain the filesystem context's message log (the reason a mount failed,
/// in the kernel's words).
fn read_fs_log(fd: &OwnedFd) -> String {
    let mut msgs = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = rustix::io::read(fd, &mut buf) {
        if n == 0 {
            break;
        }
        let s = String::from_utf8_lossy(&buf[..n]);
        msgs.push(s.trim_end().to_string());
        if msgs.len() > 16 {
            break;
        }
    }
    msgs.join("; ")
}

fn open_fs(fs: &'static str) -> Result<OwnedFd, MountError> {
    fsopen(fs, FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| {
        if e == Errno::NODEV {
            MountError::NoFilesystem {
                fs,
                source: io::Error::from_raw_os_error(e.raw_os_error()),
            }
        } else {
            kernel_err(format!("fsopen({fs})"), e, None)
        }
    })
}

/// Mount one EROFS image file detached (not attached to any path) and return
/// the mount's fd. The image file stays open through the mount.
pub fn mount_erofs_detached(image: &Path) -> Result<OwnedFd, MountError> {
    let step = || format!("mounting EROFS image {}", image.display());
    let ctx = open_fs("erofs")?;
    fsconfig_set_string(&ctx, "source", image).map_err(|e| kernel_err(step(), e, Some(&ctx)))?;
    fsconfig_set_flag(&ctx, "ro").map_err(|e| kernel_err(step(), e, Some(&ctx)))?;
    fsconfig_create(&ctx).map_err(|e| kernel_err(step(), e, Some(&ctx)))?;
    fsmount(
        &ctx,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_RDONLY | MountAttrFlags::MOUNT_ATTR_NODEV,
    )
    .map_err(|e| kernel_err(step(), e, Some(&ctx)))
}

/// `dir` as a canonical path, checked to be an existing directory with
/// nothing mounted on it: where a mount can go.
pub fn free_mount_point(dir: &Path) -> Result<PathBuf, MountError> {
    if !dir.is_dir() {
        return Err(MountError::NotADirectory(dir.to_path_buf()));
    }
    let target = dir.canonicalize().map_err(|e| MountError::Io {
        step: format!("resolving {}", dir.display()),
        source: e,
    })?;
    // mountinfo rather than a stat: a FUSE mount whose daemon died is
    // still a mount point
    if mounts()?.iter().any(|m| m.mount_point == target) {
        return Err(MountError::AlreadyMounted(target));
    }
    Ok(target)
}

/// Whether `path` is the root of a mount (its mount differs from its
/// parent's, or it is `/`).
pub fn is_mount_point(path: &Path) -> Result<bool, MountError> {
    let st = rustix::fs::statx(
        CWD,
        path,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        rustix::fs::StatxFlags::MNT_ID,
    )
    .map_err(|e| MountError::Io {
        step: format!("stat {}", path.display()),
        source: e.into(),
    })?;
    let Some(parent) = path.parent() else {
        return Ok(true);
    };
    let pst = rustix::fs::statx(
        CWD,
        parent,
        rustix::fs::AtFlags::empty(),
        rustix::fs::StatxFlags::MNT_ID,
    )
    .map_err(|e| MountError::Io {
        step: format!("stat {}", parent.display()),
        source: e.into(),
    })?;
    Ok(st.stx_mnt_id != pst.stx_mnt_id)
}

/// Mount `m` at `target` (an existing directory that is not a mount point).
///
/// Nothing is left behind on failure: the detached EROFS mounts vanish when
/// their fds close.
pub fn mount_overlay(m: &OverlayMount, target: &Path) -> Result<(), MountError> {
    if is_mount_point(target)? {
        return Err(MountError::AlreadyMounted(target.to_path_buf()));
    }
    let step = || format!("mounting overlayfs at {}", target.display());
    let mnt = overlay_fd(m, &step)?;
    move_mount(
        mnt.as_fd(),
        "",
        CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| kernel_err(step(), e, None))?;
    Ok(())
}

/// The overlay of `m`, mounted nowhere: reachable only through the returned
/// fd (as `/proc/self/fd/N`, also in children that inherit it) and gone
/// when the last fd closes, whatever happens to this process.
pub fn mount_overlay_detached(m: &OverlayMount) -> Result<OwnedFd, MountError> {
    overlay_fd(m, &|| "mounting a detached overlayfs".to_string())
}

fn overlay_fd(m: &OverlayMount, step: &dyn Fn() -> String) -> Result<OwnedFd, MountError> {
    if m.layers.is_empty() {
        return Err(MountError::Io {
            step: "building an overlay mount".into(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "no EROFS layers given"),
        });
    }
    if m.verity_require {
        for d in &m.data_dirs {
            verity_available(d).map_err(MountError::NoVerity)?;
        }
    }
    let lowers = m
        .layers
        .iter()
        .map(|l| mount_erofs_detached(l))
        .collect::<Result<Vec<_>, _>>()?;
    let ctx = open_fs("overlay")?;
    let set = |k: &str, v: &str| {
        fsconfig_set_string(&ctx, k, v)
            .map_err(|e| kernel_err(format!("{}: setting {k}={v}", step()), e, Some(&ctx)))
    };
    set("source", &m.source)?;
    set("metacopy", "on")?;
    set("redirect_dir", "on")?;
    for d in &m.dirs_above {
        set("lowerdir+", path_str(d)?)?;
    }
    for fd in &lowers {
        set("lowerdir+", &format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    }
    for d in &m.data_dirs {
        set("datadir+", path_str(d)?)?;
    }
    if let Some((upper, work)) = &m.upper {
        set("upperdir", path_str(upper)?)?;
        set("workdir", path_str(work)?)?;
    }
    if m.verity_require {
        set("verity", "require")?;
    }
    fsconfig_create(&ctx).map_err(|e| kernel_err(step(), e, Some(&ctx)))?;
    let attrs = if m.upper.is_some() {
        MountAttrFlags::MOUNT_ATTR_NODEV
    } else {
        MountAttrFlags::MOUNT_ATTR_RDONLY | MountAttrFlags::MOUNT_ATTR_NODEV
    };
    fsmount(&ctx, FsMountFlags::FSMOUNT_CLOEXEC, attrs)
        .map_err(|e| kernel_err(step(), e, Some(&ctx)))
}

fn path_str(p: &Path) -> Result<&str, MountError> {
    let s = p.to_str().ok_or_else(|| MountError::Io {
        step: format!("passing {} to the kernel", p.display()),
        source: io::Error::new(io::ErrorKind::InvalidInput, "path is not UTF-8"),
    })?;
    // overlayfs splits lowerdir lists on ':' and treats ',' as an option
    // separator in the legacy syntax; `lowerdir+`/`datadir+` take one path
    // each, but reject these anyway so a path never means two things.
    if s.contains([',', ':', '\\']) {
        return Err(MountError::Io {
            step: format!("passing {} to overlayfs", p.display()),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "path contains ',', ':' or '\\', which overlayfs options cannot carry",
            ),
        });
    }
    Ok(s)
}

/// Unmount `target`. Busy mounts are not detached lazily: the caller learns
/// they are busy.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    rustix::mount::unmount(target, UnmountFlags::NOFOLLOW).map_err(|e| match e {
        Errno::BUSY => MountError::Busy(target.to_path_buf()),
        Errno::INVAL => MountError::NotMounted(target.to_path_buf()),
        e => kernel_err(format!("unmounting {}", target.display()), e, None),
    })
}

/// Detach `target` now; the filesystem goes away once nothing uses it.
pub fn unmount_detach(target: &Path) -> Result<(), MountError> {
    rustix::mount::unmount(target, UnmountFlags::NOFOLLOW | UnmountFlags::DETACH).map_err(|e| {
        match e {
            Errno::INVAL => MountError::NotMounted(target.to_path_buf()),
            e => kernel_err(format!("detaching {}", target.display()), e, None),
        }
    })
}

/// The mounts of this mount namespace.
pub fn mounts() -> Result<Vec<MountInfo>, MountError> {
    let text = std::fs::read("/proc/self/mountinfo").map_err(|e| MountError::Io {
        step: "reading /proc/self/mountinfo".into(),
        source: e,
    })?;
    Ok(parse_mountinfo(&text))
}

/// Parse mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &[u8]) -> Vec<MountInfo> {
    text.split(|&b| b == b'\n').filter_map(parse_line).collect()
}

fn parse_line(line: &[u8]) -> Option<MountInfo> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let sep = fields.iter().position(|f| *f == b"-")?;
    if sep < 6 || fields.len() < sep + 3 {
        return None;
    }
    let num = |f: &[u8]| std::str::from_utf8(f).ok()?.parse::<u32>().ok();
    let text = |f: &[u8]| String::from_utf8_lossy(&unescape(f)).into_owned();
    Some(MountInfo {
        id: num(fields[0])?,
        parent: num(fields[1])?,
        mount_point: PathBuf::from(OsString::from_vec(unescape(fields[4]))),
        fs_type: text(fields[sep + 1]),
        source: text(fields[sep + 2]),
        super_options: fields.get(sep + 3).map(|f| text(f)).unwrap_or_default(),
    })
}

/// Decode mountinfo's `\ooo` octal escapes (space, tab, newline, backslash).
fn unescape(f: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        if f[i] == b'\\'
            && i + 3 < f.len()
            && f[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = f[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(f[i]);
            i += 1;
        }
    }
    out
}

// ---- fs-verity ----

/// Errors of the fs-verity ioctls.
#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    /// The kernel or the filesystem holding the file has no fs-verity.
    #[error("{}: fs-verity is not supported here ({source})", .path.display())]
    Unsupported {
        /// The file asked about.
        path: PathBuf,
        /// The errno (ENOTTY or EOPNOTSUPP).
        source: io::Error,
    },
    /// Another failure.
    #[error("{}: {step}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// The error.
        source: io::Error,
    },
}

const FS_VERITY_HASH_ALG_SHA256: u16 = 1;
const VERITY_BLOCK_SIZE: u32 = 4096;

/// `struct fsverity_digest` header followed by room for a SHA-256 digest.
#[repr(C)]
struct MeasureArg {
    digest_algorithm: u16,
    digest_size: u16,
    digest: [u8; 64],
}

/// `struct fsverity_enable_arg`.
#[repr(C)]
struct EnableArg {
    version: u32,
    hash_algorithm: u32,
    block_size: u32,
    salt_size: u32,
    salt_ptr: u64,
    sig_size: u32,
    reserved1: u32,
    sig_ptr: u64,
    reserved2: [u64; 11],
}

// _IOWR('f', 134, struct fsverity_digest) where sizeof is the 4-byte header.
const FS_IOC_MEASURE_VERITY: rustix::ioctl::Opcode =
    rustix::ioctl::opcode::read_write::<[u16; 2]>(b'f', 134);
// _IOW('f', 133, struct fsverity_enable_arg)
const FS_IOC_ENABLE_VERITY: rustix::ioctl::Opcode =
    rustix::ioctl::opcode::write::<EnableArg>(b'f', 133);

fn verity_errno(path: &Path, step: &'static str, e: Errno) -> VerityError {
    let source = io::Error::from_raw_os_error(e.raw_os_error());
    if e == Errno::NOTTY || e == Errno::OPNOTSUPP {
        VerityError::Unsupported {
            path: path.to_path_buf(),
            source,
        }
    } else {
        VerityError::Io {
            path: path.to_path_buf(),
            step,
            source,
        }
    }
}

/// The fs-verity (SHA-256) digest of `path`, or `None` when verity is not
/// enabled on it.
pub fn measure_verity(path: &Path) -> Result<Option<VerityDigest>, VerityError> {
    let f = File::open(path).map_err(|e| VerityError::Io {
        path: path.to_path_buf(),
        step: "opening",
        source: e,
    })?;
    let mut arg = MeasureArg {
        digest_algorithm: 0,
        digest_size: 64,
        digest: [0; 64],
    };
    // SAFETY: the opcode's direction and size match the kernel's
    // FS_IOC_MEASURE_VERITY; the buffer behind the header has room for
    // `digest_size` bytes, which the kernel checks before writing.
    let r = unsafe {
        rustix::ioctl::ioctl(
            &f,
            rustix::ioctl::Updater::<FS_IOC_MEASURE_VERITY, MeasureArg>::new(&mut arg),
        )
    };
    match r {
        Ok(()) => {
            if arg.digest_algorithm != FS_VERITY_HASH_ALG_SHA256 || arg.digest_size != 32 {
                return Err(VerityError::Io {
                    path: path.to_path_buf(),
                    step: "measuring",
                    source: io::Error::other(format!(
                        "file uses fs-verity algorithm {} with a {}-byte digest, not SHA-256",
                        arg.digest_algorithm, arg.digest_size
                    )),
                });
            }
            let mut d = [0u8; 32];
            d.copy_from_slice(&arg.digest[..32]);
            Ok(Some(VerityDigest::from_bytes(d)))
        }
        Err(Errno::NODATA) => Ok(None),
        Err(e) => Err(verity_errno(path, "measuring", e)),
    }
}

/// Enable fs-verity (SHA-256, 4 KiB blocks, no salt: the parameters composefs
/// digests assume) on `path`. Already enabled is fine.
pub fn enable_verity(path: &Path) -> Result<(), VerityError> {
    let f = File::open(path).map_err(|e| VerityError::Io {
        path: path.to_path_buf(),
        step: "opening",
        source: e,
    })?;
    let arg = EnableArg {
        version: 1,
        hash_algorithm: u32::from(FS_VERITY_HASH_ALG_SHA256),
        block_size: VERITY_BLOCK_SIZE,
        salt_size: 0,
        salt_ptr: 0,
        sig_size: 0,
        reserved1: 0,
        sig_ptr: 0,
        reserved2: [0; 11],
    };
    // SAFETY: the opcode is the kernel's FS_IOC_ENABLE_VERITY, whose argument
    // is exactly `struct fsverity_enable_arg` (128 bytes, mirrored above);
    // the salt and signature pointers are null with zero sizes.
    let r = unsafe {
        rustix::ioctl::ioctl(
            &f,
            rustix::ioctl::Setter::<FS_IOC_ENABLE_VERITY, EnableArg>::new(arg),
        )
    };
    match r {
        Ok(()) | Err(Errno::EXIST) => Ok(()),
        Err(e) => Err(verity_errno(path, "enabling fs-verity", e)),
    }
}

/// Start writing `f`'s dirty pages back to disk now, without waiting for
/// them (`sync_file_range(SYNC_FILE_RANGE_WRITE)`).
///
/// Not a durability point: a later `fsync`/`syncfs` still makes the data
/// durable, but finds most of it on its way already. The store calls this
/// as each staged object is written, so the sync at a batch's commit waits
/// for the last few files instead of writing the whole layer then.
pub fn start_writeback(f: &impl std::os::fd::AsFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a borrowed, open descriptor; offset 0 with
    // length 0 means "to the end of the file"; no memory is passed.
    let r =
        unsafe { libc::sync_file_range(f.as_fd().as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether fs-verity can be used for files in `dir`: `Err` says why not.
///
/// Probes with a scratch file: measuring it answers ENODATA where verity
/// exists but is off, ENOTTY/EOPNOTSUPP where the kernel or filesystem has
/// none.
pub fn verity_available(dir: &Path) -> Result<(), String> {
    let probe = dir.join(format!(".verity-probe-{}", std::process::id()));
    std::fs::write(&probe, b"strata").map_err(|e| format!("writing {}: {e}", probe.display()))?;
    let r = measure_verity(&probe);
    let _ = std::fs::remove_file(&probe);
    match r {
        Ok(_) => Ok(()),
        Err(VerityError::Unsupported { source, .. }) => Err(format!(
            "the kernel or the filesystem of {} has no fs-verity (FS_IOC_MEASURE_VERITY: {source})",
            dir.display()
        )),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = b"36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                     40 1 0:50 / /m rw shared:2 master:3 - overlay strata:sha256:ab ro,lowerdir+=x\n\
                     garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].fs_type, "ext3");
        assert_eq!(m[0].source, "/dev/root");
        assert_eq!((m[1].id, m[1].parent), (40, 1));
        assert_eq!(m[1].source, "strata:sha256:ab");
        assert_eq!(m[1].super_options, "ro,lowerdir+=x");
    }

    #[test]
    fn unescape_backslash_and_trailing() {
        assert_eq!(unescape(b"a\\134b"), b"a\\b");
        assert_eq!(unescape(b"a\\04"), b"a\\04");
        assert_eq!(unescape(b"\\011"), b"\t");
    }

    #[test]
    fn enable_arg_is_128_bytes() {
        assert_eq!(std::mem::size_of::<EnableArg>(), 128);
    }

    #[test]
    fn this_directory_is_not_a_mount_point() {
        let d = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(d.path()).unwrap());
        assert!(is_mount_point(Path::new("/")).unwrap());
        assert!(is_mount_point(Path::new("/proc")).unwrap());
    }

    #[test]
    fn paths_overlayfs_cannot_carry_are_refused() {
        assert!(path_str(Path::new("/a:b")).is_err());
        assert!(path_str(Path::new("/a,b")).is_err());
        assert!(path_str(Path::new("/a/b")).is_ok());
    }
}
