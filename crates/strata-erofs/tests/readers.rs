//! Third-party EROFS readers accept every image the writer makes, and see
//! in it exactly the tree it was made from.
//!
//! Random trees (the composefs-compat generator, fixed seeds) are built in
//! every flavor and read back by two independent readers:
//!
//! - `fsck.erofs --extract` (erofs-utils, C): checks the whole image and
//!   unpacks it; the unpacked tree must hold exactly the tree's paths with
//!   their types, permissions, owners, mtimes, symlink targets, device
//!   numbers and file contents.
//! - the `erofs-rs` crate (Rust): every directory's entries with their
//!   names, dirent types and inodes (type, permissions, owner, mtime, link
//!   count, size), file contents, symlink targets, device numbers, extended
//!   attributes and hardlinks (one inode per node).
//!
//! What each reader cannot check is said where it is left out.
//! `checks_catch_wrong_images` shows that both checks fail on images of a
//! slightly different tree and on a corrupt image.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use erofs_rs::EroFS;
use erofs_rs::backend::SliceImage;
use erofs_rs::types::DirentFileType;
use strata_erofs::{DataSource, FileData, Flavor, FsTree, Kind, Node, Stat, build};

const SEEDS: std::ops::RangeInclusive<u64> = 1..=60;
const FLAVORS: [Flavor; 3] = [Flavor::Composefs, Flavor::Layer, Flavor::Plain];

/// Streamed files in plain images are at most this big (keeps the run short;
/// sizes below it still cover data blocks with and without an inline tail).
const STREAM_CAP: u64 = 1 << 16;

// ---- streamed contents --------------------------------------------------

/// Byte `pos` of streamed content `source`: depends on both, so a block
/// written at the wrong place or from the wrong file is seen.
fn stream_byte(source: u64, pos: u64) -> u8 {
    ((pos.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ source.wrapping_add(1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
        >> 56) as u8
}

fn stream_bytes(source: u64, start: u64, len: u64) -> Vec<u8> {
    (start..start + len)
        .map(|p| stream_byte(source, p))
        .collect()
}

/// The [`DataSource`] for a tree's [`FileData::Stream`] files.
struct Streams(HashMap<u64, u64>);

impl Streams {
    fn of(tree: &FsTree) -> Streams {
        let mut m = HashMap::new();
        for n in &tree.nodes {
            if let Kind::File(FileData::Stream { source, size, .. }) = n.kind {
                m.insert(source, size);
            }
        }
        Streams(m)
    }
}

impl DataSource for Streams {
    fn copy(&mut self, source: u64, offset: u64, len: u64, out: &mut dyn Write) -> io::Result<()> {
        let size = *self
            .0
            .get(&source)
            .ok_or_else(|| io::Error::other(format!("writer asked for unknown source {source}")))?;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(io::Error::other(format!(
                "writer asked for {len} bytes at {offset} of source {source} ({size} bytes)"
            )));
        }
        out.write_all(&stream_bytes(source, offset, len))
    }
}

// ---- trees per flavor ---------------------------------------------------

fn random_tree(seed: u64) -> FsTree {
    let mut g = common::Gen::new(seed);
    if seed.is_multiple_of(10) {
        g.fill(0, 1, 400); // directories that need blocks
    } else {
        g.fill(0, 4, 12);
    }
    g.tree
}

/// The generator's tree made fit for `flavor`: plain images hold contents,
/// so external files become streamed ones; layer images get real
/// whiteouts and opaque directories.
fn adapt(tree: &FsTree, flavor: Flavor) -> FsTree {
    let mut t = tree.clone();
    for (i, n) in t.nodes.iter_mut().enumerate() {
        let new_kind = match (&n.kind, flavor) {
            (Kind::File(FileData::External { size, .. }), Flavor::Plain) => {
                let size = if *size <= STREAM_CAP {
                    *size
                } else if size.is_power_of_two() {
                    STREAM_CAP
                } else {
                    size % STREAM_CAP
                };
                Kind::File(stream(i as u64, size))
            }
            (Kind::CharDev(0, 0), Flavor::Layer) if i % 2 == 0 => Kind::Whiteout,
            (Kind::Dir { entries, .. }, Flavor::Layer) if i % 3 == 1 => Kind::Dir {
                entries: entries.clone(),
                opaque: true,
            },
            _ => continue,
        };
        n.kind = new_kind;
    }
    t
}

// ---- what a reader must see ---------------------------------------------

type Xattrs = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Debug, Clone, PartialEq)]
enum Content {
    Bytes(Vec<u8>),
    Stream {
        source: u64,
        size: u64,
    },
    /// An overlay redirect: metadata only, all holes.
    Holes(u64),
}

impl Content {
    fn size(&self) -> u64 {
        match self {
            Content::Bytes(b) => b.len() as u64,
            Content::Stream { size, .. } | Content::Holes(size) => *size,
        }
    }

    fn bytes(&self) -> Option<Vec<u8>> {
        match self {
            Content::Bytes(b) => Some(b.clone()),
            Content::Stream { source, size } => Some(stream_bytes(*source, 0, *size)),
            Content::Holes(_) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Body {
    Dir,
    File(Content),
    Symlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
    Socket,
}

impl Body {
    fn type_bits(&self) -> u32 {
        match self {
            Body::Dir => 0o040000,
            Body::File(_) => 0o100000,
            Body::Symlink(_) => 0o120000,
            Body::Char(..) => 0o020000,
            Body::Block(..) => 0o060000,
            Body::Fifo => 0o010000,
            Body::Socket => 0o140000,
        }
    }

    fn dirent_type(&self) -> DirentFileType {
        match self {
            Body::Dir => DirentFileType::Directory,
            Body::File(_) => DirentFileType::RegularFile,
            Body::Symlink(_) => DirentFileType::Symlink,
            Body::Char(..) => DirentFileType::CharacterDevice,
            Body::Block(..) => DirentFileType::BlockDevice,
            Body::Fifo => DirentFileType::Fifo,
            Body::Socket => DirentFileType::Socket,
        }
    }

    /// Inode size; `None` for directories (their size is layout, not tree).
    fn size(&self) -> Option<u64> {
        match self {
            Body::Dir => None,
            Body::File(c) => Some(c.size()),
            Body::Symlink(t) => Some(t.len() as u64),
            _ => Some(0),
        }
    }
}

/// One path as a reader must see it.
#[derive(Debug, Clone)]
struct Want {
    /// The node (hardlinks share it); stubs get ids past the tree's nodes.
    id: usize,
    body: Body,
    perm: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    nlink: u32,
    /// Extended attributes a reader lists (see [`listed`]).
    xattrs: Xattrs,
}

/// Paths relative to the root (`""` is the root, `a/b` a nested entry).
type View = BTreeMap<Vec<u8>, Want>;

/// Whether a reader lists an xattr: names outside the known prefixes are
/// stored under EROFS prefix index 0 (as C mkcomposefs does for `lustre.`),
/// which the kernel and erofs-rs keep hidden.
fn listed(name: &[u8]) -> bool {
    [b"user.".as_slice(), b"trusted.", b"security."]
        .iter()
        .any(|p| name.starts_with(p) && name.len() > p.len())
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

fn escaped_whiteout(kind: &Kind, flavor: Flavor) -> bool {
    flavor != Flavor::Plain && matches!(kind, Kind::CharDev(0, 0))
        || flavor == Flavor::Composefs && matches!(kind, Kind::Whiteout)
}

/// The xattrs the writer's rules give a node (without per-flavor additions).
fn node_xattrs(n: &Node, flavor: Flavor) -> Xattrs {
    let mut x = Xattrs::new();
    for (k, v) in &n.stat.xattrs {
        let k = match k.strip_prefix(b"trusted.overlay.".as_slice()) {
            Some(rest) if flavor != Flavor::Plain => [b"trusted.overlay.overlay.", rest].concat(),
            _ => k.clone(),
        };
        x.insert(k, v.clone());
    }
    if let Kind::File(FileData::External {
        redirect, verity, ..
    }) = &n.kind
    {
        let metacopy = match verity {
            Some(d) => [&[0u8, 36, 0, 1][..], d.as_bytes()].concat(),
            None => Vec::new(),
        };
        x.insert(b"trusted.overlay.metacopy".to_vec(), metacopy);
        x.insert(b"trusted.overlay.redirect".to_vec(), redirect.clone());
    }
    if escaped_whiteout(&n.kind, flavor) {
        x.insert(b"trusted.overlay.overlay.whiteout".to_vec(), Vec::new());
        x.insert(b"user.overlay.whiteout".to_vec(), Vec::new());
    }
    x
}

fn want(n: &Node, id: usize, body: Body, nlink: u32, xattrs: Xattrs) -> Want {
    Want {
        id,
        body,
        perm: n.stat.mode & 0o7777,
        uid: n.stat.uid as u32,
        gid: n.stat.gid as u32,
        mtime: (n.stat.mtime, n.stat.mtime_nsec),
        nlink,
        xattrs: xattrs.into_iter().filter(|(k, _)| listed(k)).collect(),
    }
}

/// What readers must see in `build(tree, flavor)`.
fn expected(tree: &FsTree, flavor: Flavor) -> View {
    let mut names = vec![0u32; tree.nodes.len()];
    for i in 0..tree.nodes.len() {
        for (_, c) in tree.entries(i) {
            names[c] += 1;
        }
    }
    let mut view = View::new();
    let mut stack = vec![(0usize, Vec::new())];
    while let Some((dir, path)) = stack.pop() {
        let mut x = node_xattrs(&tree.nodes[dir], flavor);
        if dir == 0 && flavor == Flavor::Composefs {
            x.insert(b"trusted.overlay.opaque".to_vec(), b"y".to_vec());
        }
        if let Kind::Dir { opaque: true, .. } = tree.nodes[dir].kind
            && flavor == Flavor::Layer
        {
            x.insert(b"trusted.overlay.opaque".to_vec(), b"y".to_vec());
        }
        let mut subdirs = 0;
        for (name, c) in tree.entries(dir) {
            let p = if path.is_empty() {
                name.clone()
            } else {
                [&path[..], b"/", name].concat()
            };
            let n = &tree.nodes[c];
            let body = match &n.kind {
                Kind::Dir { .. } => {
                    subdirs += 1;
                    stack.push((c, p));
                    continue;
                }
                k if escaped_whiteout(k, flavor) => {
                    for k in [
                        b"trusted.overlay.overlay.whiteouts".as_slice(),
                        b"user.overlay.whiteouts",
                    ] {
                        x.insert(k.to_vec(), Vec::new());
                    }
                    for k in [
                        b"trusted.overlay.overlay.opaque".as_slice(),
                        b"user.overlay.opaque",
                    ] {
                        x.insert(k.to_vec(), b"x".to_vec());
                    }
                    Body::File(Content::Bytes(Vec::new()))
                }
                Kind::File(FileData::Inline(d)) => Body::File(Content::Bytes(d.clone())),
                Kind::File(FileData::Stream { source, size, .. }) => Body::File(Content::Stream {
                    source: *source,
                    size: *size,
                }),
                Kind::File(FileData::External { size, .. }) => Body::File(Content::Holes(*size)),
                Kind::Symlink(t) => Body::Symlink(t.clone()),
                Kind::CharDev(a, b) => Body::Char(*a, *b),
                Kind::Whiteout => Body::Char(0, 0),
                Kind::BlockDev(a, b) => Body::Block(*a, *b),
                Kind::Fifo => Body::Fifo,
                Kind::Socket => Body::Socket,
            };
            view.insert(p, want(n, c, body, names[c], node_xattrs(n, flavor)));
        }
        let root = &tree.nodes[0];
        if dir == 0 && flavor == Flavor::Composefs {
            // The 256 whiteout stubs composefs puts at the root.
            for i in 0..=255u8 {
                let name = format!("{i:02x}").into_bytes();
                if tree.entries(0).any(|(n, _)| *n == name) {
                    continue;
                }
                let stub = Node {
                    stat: Stat {
                        mode: 0o644,
                        xattrs: root
                            .stat
                            .xattrs
                            .iter()
                            .filter(|(k, _)| k.as_slice() == b"security.selinux")
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                        ..root.stat.clone()
                    },
                    kind: Kind::CharDev(0, 0),
                };
                let x = stub.stat.xattrs.clone();
                let id = tree.nodes.len() + i as usize;
                view.insert(name, want(&stub, id, Body::Char(0, 0), 1, x));
            }
        }
        view.insert(path, want(&tree.nodes[dir], dir, Body::Dir, 2 + subdirs, x));
    }
    view
}

// ---- images -------------------------------------------------------------

fn image_bytes(tree: &FsTree, flavor: Flavor) -> Vec<u8> {
    let img = build(tree, flavor).unwrap_or_else(|e| panic!("build {flavor:?}: {e}"));
    let mut out = Vec::with_capacity(img.len() as usize);
    img.write_to(&mut out, &mut Streams::of(tree))
        .expect("write image");
    assert_eq!(out.len() as u64, img.len(), "image length");
    out
}

/// Every random tree in every flavor: `(label, flavor, tree, image, view)`.
fn each_image(mut f: impl FnMut(&str, Flavor, &FsTree, &[u8], &View)) {
    for seed in SEEDS {
        let base = random_tree(seed);
        for flavor in FLAVORS {
            let tree = adapt(&base, flavor);
            let view = expected(&tree, flavor);
            let bytes = image_bytes(&tree, flavor);
            f(
                &format!("seed {seed} {flavor:?}"),
                flavor,
                &tree,
                &bytes,
                &view,
            );
        }
    }
}

/// Collects mismatches; a check reports them all (up to a limit) at once.
#[derive(Default)]
struct Errors(Vec<String>);

impl Errors {
    fn check(&mut self, ok: bool, path: &[u8], what: impl FnOnce() -> String) {
        if !ok {
            self.0
                .push(format!("{:?}: {}", String::from_utf8_lossy(path), what()));
        }
    }

    fn paths(&mut self, want: &View, got: impl Iterator<Item = Vec<u8>> + Clone) {
        for p in got.clone() {
            self.check(want.contains_key(&p), &p, || "unexpected entry".into());
        }
        let got: std::collections::BTreeSet<_> = got.collect();
        for p in want.keys() {
            self.check(got.contains(p), p, || "missing".into());
        }
    }

    fn finish(self) -> Result<(), String> {
        if self.0.is_empty() {
            return Ok(());
        }
        let n = self.0.len();
        let mut s = self.0.into_iter().take(20).collect::<Vec<_>>().join("\n  ");
        if n > 20 {
            s += &format!("\n  … {} more", n - 20);
        }
        Err(format!("{n} mismatches:\n  {s}"))
    }
}

// ---- fsck.erofs ---------------------------------------------------------

fn fsck_erofs() -> Command {
    match Command::new("fsck.erofs").arg("-V").output() {
        Ok(o) if o.status.success() => Command::new("fsck.erofs"),
        Ok(o) => panic!("fsck.erofs -V failed: {o:?}"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            panic!("fsck.erofs missing: apt install erofs-utils")
        }
        Err(e) => panic!("fsck.erofs: {e}"),
    }
}

fn scan(dir: &Path, rel: &[u8], out: &mut BTreeMap<Vec<u8>, fs::Metadata>) {
    for e in fs::read_dir(dir).expect("read extracted directory") {
        let e = e.expect("extracted entry");
        let name = e.file_name();
        let p = if rel.is_empty() {
            name.as_bytes().to_vec()
        } else {
            [rel, b"/", name.as_bytes()].concat()
        };
        let m = fs::symlink_metadata(e.path()).expect("lstat extracted entry");
        if m.is_dir() {
            scan(&e.path(), &p, out);
        }
        out.insert(p, m);
    }
}

fn decode_rdev(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// Run `fsck.erofs --extract=out image` and compare what it unpacked.
///
/// What fsck.erofs 1.5 (the Debian/Ubuntu package) cannot show, and is
/// left to the erofs-rs check:
/// - extended attributes: 1.5 parses and checks every inode's xattr body
///   but does not extract xattrs (upstream added that after 1.5);
/// - hardlinks: 1.5 unpacks every name as its own file (upstream added
///   hardlink extraction after 1.5), so link counts are not compared;
/// - redirect files (all holes): 1.5 writes nothing for an unmapped chunk
///   and leaves the file empty (fixed upstream in "fsck: extract
///   chunk-based file with hole correctly"); the size is checked only when
///   the unpacked file is not empty;
/// - setuid/setgid on non-directories: 1.5 chmods before it lchowns, and
///   chown drops these bits, so they may be missing (never added);
/// - symlink permissions: Linux symlinks are always 0777.
fn check_fsck(image: &Path, out: &Path, view: &View) -> Result<(), String> {
    let o = fsck_erofs()
        .arg(format!("--extract={}", out.display()))
        .arg(image)
        .output()
        .expect("run fsck.erofs");
    if !o.status.success() {
        return Err(format!(
            "fsck.erofs --extract failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let mut got = BTreeMap::new();
    got.insert(
        Vec::new(),
        fs::symlink_metadata(out).expect("extracted root"),
    );
    scan(out, b"", &mut got);

    let mut err = Errors::default();
    err.paths(view, got.keys().cloned());
    for (p, w) in view {
        let Some(m) = got.get(p) else { continue };
        let ft = m.file_type();
        let type_ok = match &w.body {
            Body::Dir => ft.is_dir(),
            Body::File(_) => ft.is_file(),
            Body::Symlink(_) => ft.is_symlink(),
            Body::Char(..) => ft.is_char_device(),
            Body::Block(..) => ft.is_block_device(),
            Body::Fifo => ft.is_fifo(),
            Body::Socket => ft.is_socket(),
        };
        err.check(type_ok, p, || {
            format!("type {ft:?}, want {:?}", w.body.dirent_type())
        });
        if !type_ok {
            continue;
        }
        err.check((m.uid(), m.gid()) == (w.uid, w.gid), p, || {
            format!("owner {}:{}, want {}:{}", m.uid(), m.gid(), w.uid, w.gid)
        });
        let mtime = (m.mtime(), m.mtime_nsec() as u32);
        err.check(mtime == w.mtime, p, || {
            format!("mtime {mtime:?}, want {:?}", w.mtime)
        });
        let perm = m.permissions().mode() & 0o7777;
        let perm_ok = match &w.body {
            Body::Symlink(_) => true,
            Body::Dir => perm == w.perm,
            _ => perm & !0o6000 == w.perm & !0o6000 && perm & 0o6000 & !w.perm == 0,
        };
        err.check(perm_ok, p, || format!("mode {perm:o}, want {:o}", w.perm));
        let fp = out.join(std::ffi::OsStr::from_bytes(p));
        match &w.body {
            Body::File(c) => {
                let len = m.len();
                match c.bytes() {
                    Some(b) => {
                        err.check(len == b.len() as u64, p, || {
                            format!("size {len}, want {}", b.len())
                        });
                        if len == b.len() as u64 {
                            let data = fs::read(&fp).expect("read extracted file");
                            err.check(data == b, p, || "contents differ".into());
                        }
                    }
                    None => err.check(len == 0 || len == c.size(), p, || {
                        format!("size {len}, want {}", c.size())
                    }),
                }
            }
            Body::Symlink(t) => {
                let l = fs::read_link(&fp).expect("readlink");
                err.check(l.as_os_str().as_bytes() == t.as_slice(), p, || {
                    "symlink target differs".into()
                });
            }
            Body::Char(a, b) | Body::Block(a, b) => {
                let d = decode_rdev(m.rdev());
                err.check(d == (*a, *b), p, || {
                    format!("device {d:?}, want {:?}", (a, b))
                });
            }
            Body::Dir | Body::Fifo | Body::Socket => {}
        }
    }
    err.finish()
}

fn show(x: &Xattrs) -> String {
    let items: Vec<_> = x
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={:?}",
                String::from_utf8_lossy(k),
                String::from_utf8_lossy(v)
            )
        })
        .collect();
    format!("{{{}}}", items.join(", "))
}

// ---- erofs-rs -----------------------------------------------------------

fn rs_err(what: &str) -> impl FnOnce(erofs_rs::Error) -> String + '_ {
    move |e| format!("erofs-rs: {what}: {e}")
}

/// Read `image` with erofs-rs and compare everything it shows.
fn check_erofs_rs(image: &[u8], view: &View) -> Result<(), String> {
    let fs = EroFS::new(SliceImage::new(image)).map_err(rs_err("open"))?;
    let root = fs
        .get_inode(fs.super_block().root_inode_id())
        .map_err(rs_err("root inode"))?;
    let mut got = BTreeMap::new();
    got.insert(Vec::new(), (DirentFileType::Directory, root));
    for e in fs.walk_dir("/").map_err(rs_err("walk"))? {
        let e = e.map_err(rs_err("walk"))?;
        let path = e.dir_entry.path();
        let p = path
            .as_bytes()
            .strip_prefix(b"/")
            .unwrap_or(path.as_bytes());
        if got
            .insert(p.to_vec(), (e.dir_entry.file_type(), e.inode))
            .is_some()
        {
            return Err(format!(
                "erofs-rs: {:?} listed twice",
                String::from_utf8_lossy(p)
            ));
        }
    }

    let mut err = Errors::default();
    err.paths(view, got.keys().cloned());
    let mut nid_of: HashMap<usize, u64> = HashMap::new();
    let mut id_of: HashMap<u64, usize> = HashMap::new();
    for (p, w) in view {
        let Some((dtype, ino)) = got.get(p) else {
            continue;
        };
        let ino = *ino;
        // Hardlinks: one inode per node, one node per inode.
        let nid = *nid_of.entry(w.id).or_insert(ino.id());
        let id = *id_of.entry(ino.id()).or_insert(w.id);
        err.check(nid == ino.id() && id == w.id, p, || {
            format!("inode {} shared wrongly (node {})", ino.id(), w.id)
        });
        err.check(*dtype == w.body.dirent_type(), p, || {
            format!("dirent type {dtype:?}, want {:?}", w.body.dirent_type())
        });
        let ty = ino.file_type().as_raw_mode() & 0o170000;
        err.check(ty == w.body.type_bits(), p, || {
            format!("inode type {ty:o}, want {:o}", w.body.type_bits())
        });
        if ty != w.body.type_bits() {
            continue;
        }
        let perm = ino.permissions().mode() & 0o7777;
        err.check(perm == w.perm, p, || {
            format!("mode {perm:o}, want {:o}", w.perm)
        });
        err.check((ino.uid(), ino.gid()) == (w.uid, w.gid), p, || {
            format!(
                "owner {}:{}, want {}:{}",
                ino.uid(),
                ino.gid(),
                w.uid,
                w.gid
            )
        });
        err.check(ino.modified_unix() == w.mtime, p, || {
            format!("mtime {:?}, want {:?}", ino.modified_unix(), w.mtime)
        });
        err.check(ino.nlink() == w.nlink, p, || {
            format!("nlink {}, want {}", ino.nlink(), w.nlink)
        });
        if let Some(size) = w.body.size() {
            err.check(ino.data_size() == size, p, || {
                format!("size {}, want {size}", ino.data_size())
            });
        }
        match fs.xattrs_inode(ino) {
            Ok(x) => err.check(x == w.xattrs, p, || {
                format!("xattrs {}, want {}", show(&x), show(&w.xattrs))
            }),
            Err(e) => err.check(false, p, || format!("xattrs: {e}")),
        }
        match &w.body {
            Body::File(c) if ino.data_size() == c.size() => match c.bytes() {
                Some(b) => {
                    let mut data = Vec::new();
                    let r = fs
                        .open_inode_file(ino)
                        .map_err(io::Error::other)
                        .and_then(|mut f| f.read_to_end(&mut data));
                    err.check(r.is_ok() && data == b, p, || match r {
                        Err(e) => format!("read: {e}"),
                        Ok(_) => "contents differ".into(),
                    });
                }
                None if c.size() > 0 => {
                    // Redirect files: the first and last byte read as holes
                    // (exercises the chunk index without reading gigabytes).
                    let f = fs.open_inode_file(ino).map_err(rs_err("open"))?;
                    for at in [0, c.size() - 1] {
                        let mut b = [0xaa];
                        let r = f.read_at(&mut b, at);
                        err.check(matches!(r, Ok(1)) && b == [0], p, || {
                            format!("byte {at} of a redirect file: {r:?} {b:?}")
                        });
                    }
                }
                None => {}
            },
            Body::Symlink(t) => match fs.read_link_inode(ino) {
                Ok(l) => err.check(l.as_bytes() == t.as_slice(), p, || {
                    "symlink target differs".into()
                }),
                Err(e) => err.check(false, p, || format!("readlink: {e}")),
            },
            Body::Char(a, b) | Body::Block(a, b) => {
                err.check(ino.device() == Some((*a, *b)), p, || {
                    format!("device {:?}, want {:?}", ino.device(), (a, b))
                });
            }
            _ => {}
        }
    }
    err.finish()
}

// ---- tests --------------------------------------------------------------

/// What the images held, so the checks are known to cover it.
#[derive(Default, Debug)]
struct Seen {
    images: usize,
    hardlinks: usize,
    redirects: usize,
    big_redirects: usize,
    streams_inline_tail: usize,
    streams_block_tail: usize,
    inline_block_files: usize,
    long_symlinks: usize,
    escaped_whiteouts: usize,
    layer_whiteouts: usize,
    opaque_dirs: usize,
    big_dirs: usize,
    setid: usize,
    xattrs: usize,
}

fn tally(tree: &FsTree, flavor: Flavor, view: &View, s: &mut Seen) {
    s.images += 1;
    let mut ids = HashMap::new();
    for w in view.values() {
        *ids.entry(w.id).or_insert(0) += 1;
        s.xattrs += w.xattrs.len();
        if w.perm & 0o6000 != 0 && w.body != Body::Dir {
            s.setid += 1;
        }
        match &w.body {
            Body::File(Content::Holes(n)) => {
                s.redirects += 1;
                s.big_redirects += (*n > 1 << 32) as usize;
            }
            Body::File(Content::Stream { size, .. }) if *size > 4096 => {
                if size % 4096 > 2048 {
                    s.streams_block_tail += 1;
                } else if size % 4096 > 0 {
                    s.streams_inline_tail += 1;
                }
            }
            Body::File(Content::Bytes(b)) if b.len() > 4096 => s.inline_block_files += 1,
            Body::File(Content::Bytes(b))
                if b.is_empty() && w.xattrs.contains_key(b"user.overlay.whiteout".as_slice()) =>
            {
                s.escaped_whiteouts += 1
            }
            Body::Char(0, 0) if flavor == Flavor::Layer => s.layer_whiteouts += 1,
            Body::Symlink(t) if t.len() > 3800 => s.long_symlinks += 1,
            _ => {}
        }
    }
    s.hardlinks += ids.values().filter(|n| **n > 1).count();
    s.big_dirs += (0..tree.nodes.len())
        .filter(|i| tree.entries(*i).count() > 150)
        .count();
    s.opaque_dirs += tree
        .nodes
        .iter()
        .filter(|n| flavor == Flavor::Layer && matches!(n.kind, Kind::Dir { opaque: true, .. }))
        .count();
}

fn assert_covered(s: &Seen) {
    assert!(
        s.images == SEEDS.count() * FLAVORS.len()
            && s.hardlinks > 20
            && s.redirects > 100
            && s.big_redirects > 5
            && s.streams_inline_tail > 5
            && s.streams_block_tail > 5
            && s.inline_block_files > 5
            && s.long_symlinks > 5
            && s.escaped_whiteouts > 20
            && s.layer_whiteouts > 5
            && s.opaque_dirs > 5
            && s.big_dirs > 5
            && s.setid > 20
            && s.xattrs > 100,
        "the trees stopped covering a case: {s:?}"
    );
}

#[test]
fn fsck_erofs_extracts_every_image() {
    fsck_erofs();
    // Unpacking thousands of files is many times faster on tmpfs.
    let shm = Path::new("/dev/shm");
    let tmp = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("tempdir");
    let mut seen = Seen::default();
    each_image(|label, flavor, tree, bytes, view| {
        let image = tmp.path().join("image.erofs");
        let out = tmp.path().join("out");
        fs::write(&image, bytes).expect("write image");
        let r = check_fsck(&image, &out, view);
        fs::remove_dir_all(&out).expect("clean up");
        if let Err(e) = r {
            panic!("{label}: {e}");
        }
        tally(tree, flavor, view, &mut seen);
    });
    assert_covered(&seen);
}

#[test]
fn erofs_rs_reads_every_image() {
    let mut seen = Seen::default();
    each_image(|label, flavor, tree, bytes, view| {
        if let Err(e) = check_erofs_rs(bytes, view) {
            panic!("{label}: {e}");
        }
        tally(tree, flavor, view, &mut seen);
    });
    assert_covered(&seen);
}

/// A small tree with one of everything the mutations below touch.
fn small_tree() -> FsTree {
    let stat = |mode| Stat {
        mode,
        mtime: 1_700_000_000,
        ..Stat::default()
    };
    let mut t = FsTree::new(stat(0o755));
    let add = |t: &mut FsTree, dir, name: &[u8], stat, kind| {
        let i = t.push(Node { stat, kind });
        t.link(dir, name, i);
        i
    };
    let a_stat = Stat {
        xattrs: [(b"user.x".to_vec(), b"1".to_vec())].into(),
        ..stat(0o4755)
    };
    let a = add(
        &mut t,
        0,
        b"a",
        a_stat,
        Kind::File(FileData::Inline((0..100).collect())),
    );
    add(
        &mut t,
        0,
        b"b",
        stat(0o777),
        Kind::Symlink(b"target".to_vec()),
    );
    add(&mut t, 0, b"c", stat(0o600), Kind::CharDev(5, 1));
    let d = add(
        &mut t,
        0,
        b"d",
        stat(0o700),
        Kind::Dir {
            entries: BTreeMap::new(),
            opaque: false,
        },
    );
    let e = stream(7, 5000);
    add(&mut t, d, b"e", stat(0o644), Kind::File(e));
    t.link(d, b"h", a);
    let r = FileData::External {
        redirect: b"/ab/cdef".to_vec(),
        verity: Some(strata_digest::VerityDigest::from_bytes([7; 32])),
        size: 1 << 20,
    };
    add(&mut t, 0, b"r", stat(0o644), Kind::File(r));
    t
}

fn stream(source: u64, size: u64) -> FileData {
    let t = size % 4096;
    FileData::Stream {
        source,
        size,
        tail: if t <= 2048 {
            stream_bytes(source, size - t, t)
        } else {
            Vec::new()
        },
    }
}

fn node_at(t: &FsTree, path: &[&[u8]]) -> usize {
    path.iter().fold(0, |dir, name| {
        t.entries(dir)
            .find(|(n, _)| n.as_slice() == *name)
            .map(|(_, c)| c)
            .expect("path in the small tree")
    })
}

fn node_mut<'a>(t: &'a mut FsTree, path: &[&[u8]]) -> &'a mut Node {
    let i = node_at(t, path);
    &mut t.nodes[i]
}

/// Both checks pass on the small tree's image, and fail (each where it can
/// see the difference) on images of a slightly different tree and on a
/// corrupt image: they are able to catch a writer bug.
#[test]
fn checks_catch_wrong_images() {
    fsck_erofs();
    let flavor = Flavor::Layer;
    let tree = small_tree();
    let view = expected(&tree, flavor);
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = |bytes: &[u8]| {
        let image = tmp.path().join("image.erofs");
        let out = tmp.path().join("out");
        fs::write(&image, bytes).expect("write image");
        let fsck = check_fsck(&image, &out, &view);
        if out.exists() {
            fs::remove_dir_all(&out).expect("clean up");
        }
        (fsck, check_erofs_rs(bytes, &view))
    };
    let (fsck, rs) = run(&image_bytes(&tree, flavor));
    fsck.expect("fsck.erofs on the small tree");
    rs.expect("erofs-rs on the small tree");

    type Mutation = fn(&mut FsTree);
    // (what changes, fsck.erofs must see it, erofs-rs must see it)
    let mutations: [(&str, Mutation, bool, bool); 11] = [
        (
            "a name",
            |t| {
                let b = node_at(t, &[b"b"]);
                if let Kind::Dir { entries, .. } = &mut t.nodes[0].kind {
                    entries.remove(b"b".as_slice());
                }
                t.link(0, b"B", b);
            },
            true,
            true,
        ),
        (
            "a permission bit",
            |t| node_mut(t, &[b"a"]).stat.mode = 0o4750,
            true,
            true,
        ),
        (
            "a symlink target",
            |t| node_mut(t, &[b"b"]).kind = Kind::Symlink(b"targex".to_vec()),
            true,
            true,
        ),
        (
            "a byte of an inline file",
            |t| {
                if let Kind::File(FileData::Inline(d)) = &mut node_mut(t, &[b"a"]).kind {
                    d[50] ^= 1;
                }
            },
            true,
            true,
        ),
        (
            "a streamed file's contents",
            |t| node_mut(t, &[b"d", b"e"]).kind = Kind::File(stream(8, 5000)),
            true,
            true,
        ),
        (
            "an owner",
            |t| node_mut(t, &[b"c"]).stat.uid = 1,
            true,
            true,
        ),
        (
            "a directory mtime",
            |t| node_mut(t, &[b"d"]).stat.mtime += 1,
            true,
            true,
        ),
        (
            "a device number",
            |t| node_mut(t, &[b"c"]).kind = Kind::CharDev(5, 2),
            true,
            true,
        ),
        (
            "an xattr value",
            |t| {
                node_mut(t, &[b"a"])
                    .stat
                    .xattrs
                    .insert(b"user.x".to_vec(), b"2".to_vec());
            },
            false,
            true,
        ),
        (
            "a hardlink split in two files",
            |t| {
                let copy = node_mut(t, &[b"a"]).clone();
                let i = t.push(copy);
                let d = node_at(t, &[b"d"]);
                t.link(d, b"h", i);
            },
            false,
            true,
        ),
        (
            "a redirect file's size",
            |t| {
                if let Kind::File(FileData::External { size, .. }) = &mut node_mut(t, &[b"r"]).kind
                {
                    *size += 1;
                }
            },
            false,
            true,
        ),
    ];
    for (what, mutate, by_fsck, by_rs) in mutations {
        let mut t = tree.clone();
        mutate(&mut t);
        assert_ne!(t, tree, "{what}: the mutation changed nothing");
        let (fsck, rs) = run(&image_bytes(&t, flavor));
        assert!(!by_fsck || fsck.is_err(), "fsck.erofs check missed {what}");
        assert!(!by_rs || rs.is_err(), "erofs-rs check missed {what}");
    }

    // Corrupt images: both readers must reject them.
    let good = image_bytes(&tree, flavor);
    let mut bad_magic = good.clone();
    bad_magic[1024] ^= 1;
    let mut truncated = good.clone();
    truncated.truncate(good.len() - 4096);
    for (what, bytes) in [("a bad magic", bad_magic), ("a truncated image", truncated)] {
        let (fsck, rs) = run(&bytes);
        assert!(fsck.is_err(), "fsck.erofs accepted {what}");
        assert!(rs.is_err(), "erofs-rs accepted {what}");
    }
}
