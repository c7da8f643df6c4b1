//! VM templates: ext4 root filesystems of an exact size, built from an image
//! or from another template, stored as content-addressed chunks plus a map.
//!
//! ```text
//! build --from IMAGE:    composefs overlay of the image (+ --add dirs above),
//!                        mounted detached -> mke2fs -d (fixed UUID, hash seed
//!                        and time from the build key) -> raw file in store tmp
//! build --from-template: export parent -> e2fsck -fp -> resize2fs (grow or
//!                        shrink, refusing below the minimum) -> --add dirs
//!                        copied in through a loop mount
//! both:                  raw -> 64 KiB chunks (zero chunks dropped, the rest
//!                        objects) -> map -> cache entry -> name
//! ```
//!
//! Nothing is visible in the store until the map is committed, and the raw
//! file lives in the process's staging dir: a failed or killed build leaves
//! no template behind.

pub mod artifact;
pub mod check;
mod chunks;
mod dirdigest;
pub mod packs;
pub mod serve;
pub mod served;
pub mod served_daemon;
mod summary;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use strata_digest::Digest;
use strata_store::{BLOCK_SIZE, SplitPolicy, Store, StoreError, TemplateMap};

pub use chunks::{ChunkStats, export, ingest};
pub use dirdigest::{dir_digest, ext4_comparable_digest};

/// Where chunks missing from the store come from (the registry a template
/// was pulled from).
pub trait ChunkSource: Send + Sync {
    /// The bytes of chunk `digest` (`len` bytes expected). Untrusted: the
    /// caller checks them against `digest` before using or storing them.
    fn fetch(&self, digest: &Digest, len: u64) -> io::Result<Vec<u8>>;

    /// The chunks stored right after `digest` at the source that one
    /// request can bring along with it (their lengths and `len` within
    /// `max` bytes), in order; none by default.
    fn followers(&self, digest: &Digest, max: u64) -> Vec<(Digest, u64)> {
        let _ = (digest, max);
        Vec::new()
    }

    /// The bytes of a run of chunks: `run[0]` and followers of it as
    /// [`followers`](Self::followers) named them. Untrusted, like
    /// [`fetch`](Self::fetch); by default one fetch each.
    fn fetch_run(&self, run: &[(Digest, u64)]) -> io::Result<Vec<Vec<u8>>> {
        run.iter().map(|(d, len)| self.fetch(d, *len)).collect()
    }
}

/// Bumped whenever the same inputs would give different bytes.
pub const BUILDER_VERSION: u32 = 1;

/// The filesystem options every build uses (part of the build key).
pub const FS_OPTIONS: &str =
    "ext4 -b 4096 -E root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0,nodiscard";

/// The time e2fsprogs writes into every template (`E2FSPROGS_FAKE_TIME`).
pub const FAKE_TIME: &str = "1700000000";

/// Errors of template work; each names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A mount failed.
    #[error(transparent)]
    Mount(#[from] strata_sys::MountError),
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A size argument is not usable.
    #[error("size {given:?}: {reason}")]
    BadSize {
        /// As given.
        given: String,
        /// Why not.
        reason: String,
    },
    /// A tree to add that is not a directory.
    #[error("tree to add {}: {reason}", .path.display())]
    BadAdd {
        /// As given.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// The files do not fit in the size asked for.
    #[error(
        "the files do not fit in {}: the filesystem needs at least {} ({min} bytes)",
        strata_ops::human_bytes(*.size),
        strata_ops::human_bytes(*.min)
    )]
    TooSmall {
        /// Size asked for.
        size: u64,
        /// The smallest size that holds them (whole blocks).
        min: u64,
    },
    /// A chunk the store lacks.
    #[error("chunk {chunk} ({digest}) is not in the store")]
    MissingChunk {
        /// Its index.
        chunk: u64,
        /// Its content.
        digest: Digest,
    },
    /// A registry failed (pushing, pulling, fetching chunks).
    #[error("{what}: {source}")]
    Oci {
        /// What was being done.
        what: String,
        /// The registry's error.
        #[source]
        source: strata_oci::OciError,
    },
    /// A build from an image was asked for without a size.
    #[error("a size is required when building from an image")]
    NoSize,
    /// Something is in use (a file served already).
    #[error("{0}")]
    Busy(String),
    /// A file that is not served by this store (or not writable).
    #[error("{}: {reason}", .file.display())]
    NotServed {
        /// The file.
        file: PathBuf,
        /// Why nothing can be done with it.
        reason: String,
    },
    /// The operation was cancelled; nothing of it is visible.
    #[error("cancelled")]
    Cancelled,
    /// An e2fsprogs tool (or mount/cp) failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The command.
        tool: String,
        /// Its exit status.
        status: String,
        /// The end of what it printed.
        stderr: String,
    },
}

/// Byte counts as people write them: `2GiB`, `512MiB`, `1G`, `4096`, `8K`,
/// `0`. Units are powers of 1024.
pub fn parse_bytes(s: &str) -> Result<u64, BlockError> {
    let bad = |reason: &str| BlockError::BadSize {
        given: s.to_string(),
        reason: reason.to_string(),
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| bad("expected a number with an optional unit (K, M, G, T; KiB... too)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        _ => {
            return Err(bad(
                "unknown unit (use K, M, G or T, or KiB, MiB, GiB, TiB)",
            ));
        }
    };
    n.checked_mul(mult).ok_or_else(|| bad("too large"))
}

/// Sizes of templates: [`parse_bytes`], and the result must be whole 4 KiB
/// blocks and at least 1 MiB.
pub fn parse_size(s: &str) -> Result<u64, BlockError> {
    let bad = |reason: &str| BlockError::BadSize {
        given: s.to_string(),
        reason: reason.to_string(),
    };
    let v = parse_bytes(s)?;
    if v == 0 {
        return Err(bad("must be more than zero"));
    }
    if !v.is_multiple_of(BLOCK_SIZE) {
        return Err(bad(&format!(
            "{v} bytes is not a whole number of 4096-byte blocks"
        )));
    }
    if v < 1 << 20 {
        return Err(bad("ext4 templates start at 1 MiB"));
    }
    Ok(v)
}

/// What a build starts from.
#[derive(Debug, Clone)]
pub enum Source {
    /// An image in the store (name or digest).
    Image(String),
    /// A template (name or id).
    Template(String),
}

/// A build request.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// From what.
    pub source: Source,
    /// Size in bytes; `None` keeps a template's size (required for images).
    pub size: Option<u64>,
    /// Trees laid over the result, in order (the last wins).
    pub adds: Vec<PathBuf>,
    /// Ignore the build cache.
    pub no_cache: bool,
}

/// The outcome of a build.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Built {
    /// The template id.
    pub id: Digest,
    /// The build key.
    pub key: Digest,
    /// Whether the cache answered.
    pub cached: bool,
    /// Size in bytes.
    pub size: u64,
    /// The template it derives from.
    pub parent: Option<Digest>,
    /// Chunk counts (zero when cached).
    pub stats: ChunkStats,
    /// Seconds the build took.
    pub seconds: f64,
}

/// Build (or find in the cache) the template `req` asks for. A cancel
/// (checked between steps and every 256 chunks) leaves no template and no
/// cache entry.
pub fn build(
    store: &Store,
    req: &BuildRequest,
    ctl: strata_ops::Ctl<'_>,
) -> Result<Built, BlockError> {
    let t0 = Instant::now();
    // one operation for gc: chunks, map and cache entry
    let _work = store.work()?;
    let op = match req.source {
        Source::Image(_) => strata_ops::Op::TemplateBuild,
        Source::Template(_) => strata_ops::Op::TemplateResize,
    };
    ctl.emit(strata_ops::Event::Started {
        op,
        subject: match &req.source {
            Source::Image(n) | Source::Template(n) => n.clone(),
        },
    });
    let mut adds = Vec::new();
    for a in &req.adds {
        let md = std::fs::metadata(a).map_err(|e| BlockError::BadAdd {
            path: a.clone(),
            reason: e.to_string(),
        })?;
        if !md.is_dir() {
            return Err(BlockError::BadAdd {
                path: a.clone(),
                reason: "not a directory".into(),
            });
        }
        let canon = a.canonicalize().map_err(|e| BlockError::BadAdd {
            path: a.clone(),
            reason: e.to_string(),
        })?;
        let d = dir_digest(&canon).map_err(|e| BlockError::BadAdd {
            path: a.clone(),
            reason: format!("reading the tree: {e}"),
        })?;
        adds.push((canon, d));
    }
    let mut key_doc = BTreeMap::new();
    key_doc.insert("builder", serde_json::json!(BUILDER_VERSION));
    key_doc.insert("fs", serde_json::json!(FS_OPTIONS));
    key_doc.insert("e2fsprogs", serde_json::json!(e2fsprogs_version()));
    key_doc.insert(
        "adds",
        serde_json::json!(adds.iter().map(|a| a.1.to_string()).collect::<Vec<_>>()),
    );
    let mut info = BTreeMap::new();
    let (size, parent, generation, from) = match &req.source {
        Source::Image(name) => {
            let digest = store.resolve_image(name)?;
            let size = req.size.ok_or(BlockError::NoSize)?;
            let (einfo, _) = store.image_erofs(&digest, SplitPolicy::Never)?;
            key_doc.insert("tree", serde_json::json!(einfo.tree_digest.to_string()));
            info.insert("image".to_string(), digest.to_string());
            info.insert("tree_digest".to_string(), einfo.tree_digest.to_string());
            (size, None, 0, Some(digest))
        }
        Source::Template(name) => {
            let id = store.resolve_template(name)?;
            let pmap = store.template_map(&id)?;
            key_doc.insert("template", serde_json::json!(id.to_string()));
            (req.size.unwrap_or(pmap.size), Some((id, pmap)), 0, None)
        }
    };
    let generation = parent
        .as_ref()
        .map(|(_, m)| m.generation + 1)
        .unwrap_or(generation);
    key_doc.insert("size", serde_json::json!(size));
    let key = Digest::sha256_of(&serde_json::to_vec(&key_doc).expect("serializable"));
    if !req.no_cache
        && let Some(id) = store.template_cache_get(&key)
    {
        return Ok(Built {
            id,
            key,
            cached: true,
            size,
            parent: parent.map(|p| p.0),
            stats: ChunkStats::default(),
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    info.insert("size".to_string(), size.to_string());
    info.insert("key".to_string(), key.to_string());
    for (i, (p, d)) in adds.iter().enumerate() {
        info.insert(format!("add.{i}"), format!("{d} {}", p.display()));
    }
    let raw = store.scratch_path("rootfs.raw")?;
    let result = (|| {
        match (&from, &parent) {
            (Some(image), _) => {
                ctl.cancel.check()?;
                mkfs_from_image(store, image, &adds, size, &key, &raw)?
            }
            (None, Some((id, pmap))) => {
                export(store, pmap, &raw).map_err(|e| match e {
                    BlockError::MissingChunk { chunk, digest } => BlockError::Io {
                        what: format!("template {id}"),
                        source: io::Error::other(format!(
                            "chunk {chunk} ({digest}) is not local: `strata rootfs pull` it in full first"
                        )),
                    },
                    e => e,
                })?;
                ctl.cancel.check()?;
                resize(&raw, pmap.size, size)?;
                ctl.cancel.check()?;
                add_through_loop(&raw, &adds)?;
            }
            (None, None) => unreachable!("a source is always set"),
        }
        ctl.cancel.check()?;
        let (map, stats) = ingest(
            store,
            &raw,
            parent.as_ref().map(|p| p.0),
            generation,
            info,
            ctl,
        )?;
        ctl.cancel.check()?;
        let id = store.commit_template(&map, None)?;
        store.template_cache_set(&key, &id)?;
        Ok::<_, BlockError>((id, map, stats))
    })();
    let _ = std::fs::remove_file(&raw);
    let (id, map, stats) = result?;
    ctl.emit(strata_ops::Event::Finished { op });
    Ok(Built {
        id,
        key,
        cached: false,
        size: map.size,
        parent: map.parent,
        stats,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn e2fsprogs_version() -> String {
    Command::new("mke2fs")
        .arg("-V")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A UUID (as text) from the first 16 bytes of `key`.
fn uuid_of(key: &Digest) -> String {
    let mut b: [u8; 16] = key.as_bytes()[..16].try_into().expect("16 bytes");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn run_tool(cmd: &mut Command, ok: &[i32]) -> Result<String, BlockError> {
    let tool = format!("{:?}", cmd).replace('"', "");
    let out = cmd.output().map_err(|e| BlockError::Io {
        what: format!("running {tool}"),
        source: e,
    })?;
    let code = out.status.code().unwrap_or(-1);
    if !ok.contains(&code) {
        let err = String::from_utf8_lossy(&out.stderr);
        let mut lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.len() > 6 {
            lines.drain(..lines.len() - 6);
        }
        return Err(BlockError::Tool {
            tool,
            status: out.status.to_string(),
            stderr: lines.join("; "),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn e2fs(tool: &str) -> Command {
    let mut c = Command::new(tool);
    c.env("E2FSPROGS_FAKE_TIME", FAKE_TIME);
    c
}

/// `image`'s tree (with `dirs_above` laid over it) as a composefs overlay
/// mounted nowhere: an fd, read as `/proc/self/fd/N`, gone with the fd.
fn image_tree_detached(
    store: &Store,
    image: &Digest,
    dirs_above: Vec<PathBuf>,
    what: &str,
) -> Result<std::os::fd::OwnedFd, BlockError> {
    let (_, layers) = store.image_erofs(image, SplitPolicy::Never)?;
    let m = strata_sys::OverlayMount {
        dirs_above,
        layers,
        data_dirs: vec![store.root().join("objects")],
        upper: None,
        verity_require: false,
        source: format!("{what}:{image}"),
    };
    Ok(strata_sys::mount_overlay_detached(&m)?)
}

fn mkfs_from_image(
    store: &Store,
    image: &Digest,
    adds: &[(PathBuf, Digest)],
    size: u64,
    key: &Digest,
    raw: &Path,
) -> Result<(), BlockError> {
    // mounted nowhere: mke2fs reads it as /proc/self/fd/N; it vanishes with
    // the fd, so a killed build leaves no mount behind
    let above = adds.iter().rev().map(|a| a.0.clone()).collect();
    let tree = image_tree_detached(store, image, above, "strata-build")?;
    rustix::io::fcntl_setfd(&tree, rustix::io::FdFlags::empty()).map_err(|e| BlockError::Io {
        what: "passing the image tree to mke2fs".into(),
        source: e.into(),
    })?;
    let f = File::create(raw).map_err(|e| BlockError::Io {
        what: format!("creating {}", raw.display()),
        source: e,
    })?;
    f.set_len(size).map_err(|e| BlockError::Io {
        what: format!("sizing {}", raw.display()),
        source: e,
    })?;
    drop(f);
    let uuid = uuid_of(key);
    let r = run_tool(
        e2fs("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-U", &uuid, "-E"])
            .arg(format!(
                "root_owner=0:0,hash_seed={uuid},lazy_itable_init=0,lazy_journal_init=0,nodiscard"
            ))
            .arg("-d")
            .arg(format!("/proc/self/fd/{}", tree.as_raw_fd()))
            .arg(raw),
        &[0],
    );
    match r {
        Ok(_) => Ok(()),
        Err(BlockError::Tool { stderr, .. })
            if stderr.contains("Could not allocate")
                || stderr.contains("No free space")
                || stderr.contains("Could not allocate inode") =>
        {
            // how small could it be? build it big (sparse) and ask resize2fs
            let min = minimum_for_tree(&tree, raw, size)?;
            Err(BlockError::TooSmall { size, min })
        }
        Err(e) => Err(e),
    }
}

/// The smallest size holding the tree behind `tree`: built at a generous
/// size, then `resize2fs -P`.
fn minimum_for_tree(tree: &impl AsRawFd, raw: &Path, tried: u64) -> Result<u64, BlockError> {
    let big = (tried * 4).max(8 << 30);
    let f = File::create(raw).map_err(|e| BlockError::Io {
        what: format!("creating {}", raw.display()),
        source: e,
    })?;
    f.set_len(big).map_err(|e| BlockError::Io {
        what: format!("sizing {}", raw.display()),
        source: e,
    })?;
    drop(f);
    run_tool(
        e2fs("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-E"])
            .arg("root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0,nodiscard")
            .arg("-d")
            .arg(format!("/proc/self/fd/{}", tree.as_raw_fd()))
            .arg(raw),
        &[0],
    )?;
    minimum_size(raw)
}

/// `resize2fs -P`: the smallest size the filesystem in `raw` shrinks to.
pub fn minimum_size(raw: &Path) -> Result<u64, BlockError> {
    let out = run_tool(e2fs("resize2fs").arg("-P").arg(raw), &[0])?;
    let blocks: u64 = out
        .lines()
        .find_map(|l| l.split("minimum size of the filesystem:").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| BlockError::Tool {
            tool: "resize2fs -P".into(),
            status: "ok".into(),
            stderr: format!("no minimum size in its output: {out}"),
        })?;
    Ok(blocks * BLOCK_SIZE)
}

/// Grow or shrink the ext4 filesystem in `raw` from `old` to `new` bytes.
fn resize(raw: &Path, old: u64, new: u64) -> Result<(), BlockError> {
    run_tool(e2fs("e2fsck").arg("-fp").arg(raw), &[0, 1])?;
    if new == old {
        return Ok(());
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(raw)
        .map_err(|e| BlockError::Io {
            what: format!("opening {}", raw.display()),
            source: e,
        })?;
    if new > old {
        f.set_len(new).map_err(|e| BlockError::Io {
            what: format!("growing {}", raw.display()),
            source: e,
        })?;
        run_tool(
            e2fs("resize2fs").arg(raw).arg(format!("{}K", new / 1024)),
            &[0],
        )?;
    } else {
        let min = minimum_size(raw)?;
        if new < min {
            return Err(BlockError::TooSmall { size: new, min });
        }
        run_tool(
            e2fs("resize2fs").arg(raw).arg(format!("{}K", new / 1024)),
            &[0],
        )?;
        f.set_len(new).map_err(|e| BlockError::Io {
            what: format!("shrinking {}", raw.display()),
            source: e,
        })?;
    }
    Ok(())
}

/// Copy each `--add` tree into the filesystem in `raw` through a loop
/// mount (the only way to change an existing ext4 in place with its
/// allocator; mount times make these builds not byte-reproducible, the
/// build cache makes them idempotent).
fn add_through_loop(raw: &Path, adds: &[(PathBuf, Digest)]) -> Result<(), BlockError> {
    if adds.is_empty() {
        return Ok(());
    }
    let mnt = tempfile::Builder::new()
        .prefix("strata-rootfs-")
        .tempdir()
        .map_err(|e| BlockError::Io {
            what: "creating a mount point".into(),
            source: e,
        })?;
    run_tool(
        Command::new("mount")
            .args(["-t", "ext4", "-o", "loop,rw"])
            .arg(raw)
            .arg(mnt.path()),
        &[0],
    )?;
    let copied = (|| {
        for (a, _) in adds {
            // each entry, not `DIR/.`: the root directory keeps its own
            // owner and mode, as with mke2fs -d
            let mut entries: Vec<PathBuf> = std::fs::read_dir(a)
                .and_then(|rd| rd.map(|e| e.map(|e| e.path())).collect())
                .map_err(|e| BlockError::BadAdd {
                    path: a.clone(),
                    reason: e.to_string(),
                })?;
            if entries.is_empty() {
                continue;
            }
            entries.sort();
            run_tool(
                Command::new("cp")
                    .args(["-a", "--remove-destination"])
                    .args(&entries)
                    .arg(mnt.path()),
                &[0],
            )?;
        }
        Ok::<_, BlockError>(())
    })();
    let unmounted = run_tool(Command::new("umount").arg(mnt.path()), &[0]);
    copied?;
    unmounted?;
    Ok(())
}

/// Write template `id` as a sparse raw file at `out`.
pub fn export_template(store: &Store, id: &Digest, out: &Path) -> Result<TemplateMap, BlockError> {
    let map = store.template_map(id)?;
    export(store, &map, out)?;
    Ok(map)
}

impl From<strata_ops::Cancelled> for BlockError {
    fn from(_: strata_ops::Cancelled) -> Self {
        BlockError::Cancelled
    }
}

impl strata_ops::HasKind for BlockError {
    fn kind(&self) -> strata_ops::ErrorKind {
        use strata_ops::ErrorKind as K;
        match self {
            BlockError::Store(e) => e.kind(),
            BlockError::Mount(strata_sys::MountError::Busy(_))
            | BlockError::Mount(strata_sys::MountError::AlreadyMounted(_)) => K::Busy,
            BlockError::Mount(_) => K::Internal,
            BlockError::Io { source, .. } => K::of_io(source),
            BlockError::BadSize { .. } | BlockError::BadAdd { .. } | BlockError::NoSize => {
                K::InvalidInput
            }
            BlockError::TooSmall { .. } => K::InvalidInput,
            BlockError::MissingChunk { .. } => K::NotFound,
            BlockError::Oci { source, .. } => source.kind(),
            BlockError::Busy(_) => K::Busy,
            BlockError::NotServed { .. } => K::NotFound,
            BlockError::Cancelled => K::Cancelled,
            BlockError::Tool { .. } => K::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_bad_ones_say_why() {
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert!(parse_size("8k").unwrap_err().to_string().contains("1 MiB"));
        let e = parse_size("1000001").unwrap_err().to_string();
        assert!(e.contains("whole number of 4096-byte blocks"), "{e}");
        assert!(
            parse_size("2PB")
                .unwrap_err()
                .to_string()
                .contains("unknown unit")
        );
        assert!(
            parse_size("big")
                .unwrap_err()
                .to_string()
                .contains("number")
        );
        assert!(
            parse_size("0")
                .unwrap_err()
                .to_string()
                .contains("more than zero")
        );
    }

    #[test]
    fn uuids_are_well_formed() {
        let u = uuid_of(&Digest::sha256_of(b"x"));
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
