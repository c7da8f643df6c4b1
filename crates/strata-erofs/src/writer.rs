//! The EROFS writer.
//!
//! The byte layout follows composefs format version 1 (what C `mkcomposefs
//! --min-version=1` and composefs-rs `mkfs_erofs_versioned(.., V1)` write),
//! so the same tree gives the same bytes as those tools:
//!
//! ```text
//! 0      composefs header (32 bytes), zero padded to 1024
//! 1024   superblock (128 bytes)
//! 1152   inodes in breadth-first order, 32-byte slots; each inode is
//!        followed by its xattrs and its inline tail (dirents, file tail,
//!        chunk index or symlink target)
//!        shared xattr table (the block of the inode table's end is
//!        `xattr_blkaddr`)
//!        4 KiB-aligned blocks: directory blocks, file data blocks
//! ```
//!
//! Canonical rules (why two builds of one tree agree byte for byte):
//! children sorted bytewise; inodes numbered breadth-first; a hardlinked
//! inode is placed at its first name in depth-first sorted order; xattrs
//! sorted by full name, then value length, then value; an xattr (name and
//! value) used by two inodes goes to the shared table, written in descending
//! order; build time = the minimal mtime; a compact (32-byte) inode whenever
//! its mtime equals that minimum and uid, gid, nlink and size fit.
//!
//! The writer runs the same emission twice: the first pass only measures
//! (node ids and block addresses are unknown, written as zeros), the second
//! writes with the offsets the first pass recorded.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{self, Write};

use xxhash_rust::xxh32::xxh32;

use crate::format::{self as f, BLOCK, FileType, Layout, SLOT};
use crate::fs::{FileData, FsTree, Kind, Stat, TreeError};

/// Which kind of image to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// A composefs image of a whole tree (format version 1): the root is
    /// opaque, 256 whiteout stubs `00`..`ff` at the root, existing
    /// `trusted.overlay.*` xattrs and character devices 0:0 escaped.
    Composefs,
    /// One part of a hybrid (stacked) mount: like [`Flavor::Composefs`]
    /// but without stubs or an opaque root, and [`Kind::Whiteout`] nodes and
    /// opaque directories written in overlayfs's own format so that this
    /// image hides entries of the images below it.
    Layer,
    /// A self-contained image: no composefs header or overlay xattrs, file
    /// contents inside.
    Plain,
}

/// Feeds file contents of [`FileData::Stream`] files while an image is written.
pub trait DataSource {
    /// Write `len` bytes of content `source`, starting at `offset`, to `out`.
    fn copy(&mut self, source: u64, offset: u64, len: u64, out: &mut dyn Write) -> io::Result<()>;
}

/// A piece of a built image.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Bytes(Vec<u8>),
    Data { source: u64, len: u64 },
}

/// A built image: metadata bytes plus references to streamed contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    segments: Vec<Segment>,
    len: u64,
    inodes: u64,
}

impl Image {
    /// Total size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the image is empty (never: an image has at least a root).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of inodes.
    pub fn inodes(&self) -> u64 {
        self.inodes
    }

    /// The whole image, if it streams no contents.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self.segments.as_slice() {
            [Segment::Bytes(b)] => Some(b),
            _ => None,
        }
    }

    /// [`as_bytes`](Self::as_bytes), taken out of the image (no copy);
    /// the image back when it streams data.
    pub fn into_bytes(mut self) -> Result<Vec<u8>, Image> {
        match self.segments.as_mut_slice() {
            [Segment::Bytes(b)] => Ok(std::mem::take(b)),
            _ => Err(self),
        }
    }

    /// Write the image, pulling streamed contents from `src`.
    pub fn write_to(&self, out: &mut dyn Write, src: &mut dyn DataSource) -> io::Result<()> {
        for s in &self.segments {
            match s {
                Segment::Bytes(b) => out.write_all(b)?,
                Segment::Data { source, len } => src.copy(*source, 0, *len, out)?,
            }
        }
        Ok(())
    }
}

/// Build an image of `tree`.
pub fn build(tree: &FsTree, flavor: Flavor) -> Result<Image, TreeError> {
    if flavor == Flavor::Composefs {
        // its stubs are added to a copy
        return build_owned(tree.clone(), flavor);
    }
    tree.validate()?;
    emit(tree, flavor, &HashSet::new())
}

/// [`build`] of a tree the caller has no more use for: the composefs
/// flavor adds its stubs to it in place instead of to a copy.
pub fn build_owned(mut tree: FsTree, flavor: Flavor) -> Result<Image, TreeError> {
    tree.validate()?;
    let mut stubs = HashSet::new();
    if flavor == Flavor::Composefs {
        add_stubs(&mut tree, &mut stubs);
    }
    emit(&tree, flavor, &stubs)
}

fn emit(tree: &FsTree, flavor: Flavor, stubs: &HashSet<usize>) -> Result<Image, TreeError> {
    let mut p = Prepared::collect(tree, flavor, stubs)?;
    p.finish();
    let mut first = Emitter::default();
    p.emit(&mut first);
    let mut second = Emitter {
        layout: Some(first.into_layout()),
        ..Emitter::default()
    };
    p.emit(&mut second);
    second.flush();
    Ok(Image {
        len: second.pos,
        segments: second.segments,
        inodes: p.inodes.len() as u64,
    })
}

/// The 256 whiteout stubs `00`..`ff` composefs puts at the root (they hid
/// the object store's fan-out directories when it was a normal lower).
fn add_stubs(tree: &mut FsTree, stubs: &mut HashSet<usize>) {
    let root = tree.nodes[0].stat.clone();
    let mut xattrs = BTreeMap::new();
    if let Some(v) = root.xattrs.get(b"security.selinux".as_slice()) {
        xattrs.insert(b"security.selinux".to_vec(), v.clone());
    }
    let stat = Stat {
        mode: 0o644,
        uid: root.uid,
        gid: root.gid,
        mtime: root.mtime,
        mtime_nsec: root.mtime_nsec,
        xattrs,
    };
    for i in 0..=255u8 {
        let name = format!("{i:02x}").into_bytes();
        if tree.entries(0).any(|(n, _)| *n == name) {
            continue;
        }
        let idx = tree.push(crate::fs::Node {
            stat: stat.clone(),
            kind: Kind::CharDev(0, 0),
        });
        stubs.insert(idx);
        tree.link(0, &name, idx);
    }
}

// ---- xattrs -----------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct XAttr {
    prefix: u8,
    suffix: Vec<u8>,
    value: Vec<u8>,
}

impl XAttr {
    fn new(name: &[u8], value: &[u8]) -> (XAttr, u32) {
        for (idx, prefix) in f::XATTR_PREFIXES.iter().enumerate().rev() {
            if idx == 5 {
                continue;
            }
            if let Some(suffix) = name.strip_prefix(*prefix) {
                let bit = 1u32 << (xxh32(suffix, f::XATTR_FILTER_SEED + idx as u32) % 32);
                return (
                    XAttr {
                        prefix: idx as u8,
                        suffix: suffix.to_vec(),
                        value: value.to_vec(),
                    },
                    bit,
                );
            }
        }
        unreachable!("the empty prefix matches every name")
    }

    /// Full name, then value length, then value (C mkcomposefs's order).
    fn canonical_cmp(&self, o: &Self) -> std::cmp::Ordering {
        let a = f::XATTR_PREFIXES[self.prefix as usize]
            .iter()
            .chain(&self.suffix);
        let b = f::XATTR_PREFIXES[o.prefix as usize].iter().chain(&o.suffix);
        a.cmp(b)
            .then(self.value.len().cmp(&o.value.len()))
            .then_with(|| self.value.cmp(&o.value))
    }

    fn encoded_len(&self) -> u64 {
        (4 + self.suffix.len() + self.value.len()).next_multiple_of(4) as u64
    }

    fn encode(&self, e: &mut Emitter) {
        e.bytes(&[self.suffix.len() as u8, self.prefix]);
        e.bytes(&(self.value.len() as u16).to_le_bytes());
        e.bytes(&self.suffix);
        e.bytes(&self.value);
        e.pad(4);
    }
}

#[derive(Debug, Default)]
struct XAttrs {
    shared: Vec<usize>,
    local: Vec<XAttr>,
    filter: u32,
}

impl XAttrs {
    fn add(&mut self, name: &[u8], value: &[u8]) {
        let (x, bit) = XAttr::new(name, value);
        self.filter |= bit;
        self.local.push(x);
    }

    fn size(&self) -> u64 {
        if self.filter == 0 {
            return 0;
        }
        f::XATTR_IBODY_HEADER
            + 4 * self.shared.len() as u64
            + self.local.iter().map(XAttr::encoded_len).sum::<u64>()
    }

    fn icount(&self) -> u16 {
        match self.size() {
            0 => 0,
            n => (1 + (n - f::XATTR_IBODY_HEADER) / 4) as u16,
        }
    }
}

// ---- inodes -----------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Target {
    Inode(usize),
    /// A hardlink whose inode is placed later in breadth-first order.
    Node(usize),
}

#[derive(Debug)]
struct DirEnt<'a> {
    name: &'a [u8],
    target: Target,
    ftype: FileType,
}

#[derive(Debug, Default)]
struct DirBody<'a> {
    blocks: Vec<Vec<DirEnt<'a>>>,
    inline: Vec<DirEnt<'a>>,
    size: u64,
    nlink: u64,
}

impl<'a> DirBody<'a> {
    fn from_entries(entries: Vec<DirEnt<'a>>) -> Self {
        let mut d = DirBody::default();
        let mut used = 0u64;
        let mut cur = Vec::new();
        for e in entries {
            let len = f::DIRENT + e.name.len() as u64;
            if e.ftype == FileType::Directory {
                d.nlink += 1;
            }
            used += len;
            if used > BLOCK {
                d.blocks.push(std::mem::take(&mut cur));
                used = len;
            }
            cur.push(e);
        }
        if used > BLOCK / 2 {
            d.blocks.push(std::mem::take(&mut cur));
            used = 0;
        }
        d.inline = cur;
        d.size = BLOCK * d.blocks.len() as u64 + used;
        d
    }
}

#[derive(Debug)]
enum Body<'a> {
    Dir(DirBody<'a>),
    Leaf {
        kind: &'a Kind,
        nlink: u64,
        data_blocks: u64,
        tail: u64,
    },
}

#[derive(Debug)]
struct Inode<'a> {
    stat: &'a Stat,
    xattrs: XAttrs,
    body: Body<'a>,
    ftype: FileType,
}

struct Meta {
    layout: Layout,
    u: u32,
    size: u64,
    nlink: u64,
}

fn chunk_bits(size: u64) -> u32 {
    let bits = if size > 1 {
        64 - (size - 1).leading_zeros()
    } else {
        1
    };
    bits.clamp(f::BLOCK_BITS as u32, f::BLOCK_BITS as u32 + 31)
}

impl Inode<'_> {
    fn meta(&self, block_start: u64) -> Meta {
        let blkaddr = (block_start / BLOCK) as u32;
        match &self.body {
            Body::Dir(d) => {
                let (layout, u) = if d.inline.is_empty() {
                    (Layout::FlatPlain, blkaddr)
                } else if !d.blocks.is_empty() {
                    (Layout::FlatInline, blkaddr)
                } else {
                    (Layout::FlatInline, 0)
                };
                Meta {
                    layout,
                    u,
                    size: d.size,
                    nlink: d.nlink,
                }
            }
            Body::Leaf {
                kind,
                nlink,
                data_blocks,
                tail,
            } => {
                let (layout, u, size) = match kind {
                    Kind::File(FileData::External { size, .. }) => {
                        let fmt = chunk_bits(*size) - f::BLOCK_BITS as u32;
                        let u = if *data_blocks > 0 {
                            (blkaddr & 0xFFFF_0000) | fmt
                        } else {
                            fmt
                        };
                        (Layout::ChunkBased, u, *size)
                    }
                    Kind::File(d) => {
                        let size = d.size();
                        if size == 0 {
                            (Layout::FlatPlain, 0, 0)
                        } else if *data_blocks > 0 && *tail > 0 {
                            (Layout::FlatInline, blkaddr, size)
                        } else if *data_blocks > 0 {
                            (Layout::FlatPlain, blkaddr, size)
                        } else {
                            (Layout::FlatInline, 0, size)
                        }
                    }
                    Kind::Symlink(t) if *data_blocks > 0 => {
                        (Layout::FlatPlain, blkaddr, t.len() as u64)
                    }
                    Kind::Symlink(t) => (Layout::FlatInline, 0, t.len() as u64),
                    Kind::CharDev(ma, mi) | Kind::BlockDev(ma, mi) => {
                        (Layout::FlatPlain, f::encode_dev(*ma, *mi), 0)
                    }
                    Kind::Fifo | Kind::Socket | Kind::Whiteout => (Layout::FlatPlain, 0, 0),
                    Kind::Dir { .. } => unreachable!("directories have a Dir body"),
                };
                Meta {
                    layout,
                    u,
                    size,
                    nlink: *nlink,
                }
            }
        }
    }

    fn tail(&self) -> u64 {
        match &self.body {
            Body::Leaf { tail, .. } => *tail,
            Body::Dir(_) => 0,
        }
    }

    fn data_blocks(&self) -> u64 {
        match &self.body {
            Body::Leaf { data_blocks, .. } => *data_blocks,
            Body::Dir(_) => 0,
        }
    }

    fn compact(&self, min_mtime: (u64, u32), size: u64, nlink: u64) -> bool {
        (self.stat.mtime as u64, self.stat.mtime_nsec) == min_mtime
            && nlink <= u16::MAX as u64
            && self.stat.uid <= u16::MAX as u64
            && self.stat.gid <= u16::MAX as u64
            && size <= u32::MAX as u64
    }

    fn emit(&self, e: &mut Emitter, idx: usize, min_mtime: (u64, u32)) {
        let m = self.meta(e.block_start(idx));
        let xsize = self.xattrs.size();
        let compact = self.compact(min_mtime, m.size, m.nlink);
        let hsize = if compact {
            f::COMPACT_INODE
        } else {
            f::EXTENDED_INODE
        };
        e.pad(SLOT);
        let is_symlink = self.ftype == FileType::Symlink;
        // Keep inline tails from crossing a block boundary (the kernel
        // reads an inode's inline data from one block).
        if is_symlink && m.layout == Layout::FlatPlain {
            // A symlink target moved to a data block: C still aligns the
            // inode as if the target were inline.
            let total = hsize + xsize + m.size;
            if e.pos / BLOCK != (e.pos + total - 1) / BLOCK {
                e.pad(BLOCK);
            }
        }
        if m.layout == Layout::ChunkBased && self.tail() > 0 {
            pad_tail(e, hsize + xsize, self.tail());
        }
        if m.layout == Layout::FlatInline {
            let inline = m.size % BLOCK;
            if is_symlink {
                if e.pos % BLOCK + hsize + xsize + inline > BLOCK {
                    e.pad(BLOCK);
                }
            } else {
                pad_tail(e, hsize + xsize, inline);
            }
        }
        e.note_inode();
        let mode = (self.ftype.mode_bits() | (self.stat.mode & 0o7777)) as u16;
        let format = (if compact { 0u16 } else { 1 }) | m.layout as u16;
        let mut h = Vec::with_capacity(64);
        f::put_u16(&mut h, format);
        f::put_u16(&mut h, self.xattrs.icount());
        f::put_u16(&mut h, mode);
        if compact {
            f::put_u16(&mut h, m.nlink as u16);
            f::put_u32(&mut h, m.size as u32);
            f::put_u32(&mut h, 0);
            f::put_u32(&mut h, m.u);
            f::put_u32(&mut h, idx as u32);
            f::put_u16(&mut h, self.stat.uid as u16);
            f::put_u16(&mut h, self.stat.gid as u16);
            f::put_u32(&mut h, 0);
        } else {
            f::put_u16(&mut h, 0);
            f::put_u64(&mut h, m.size);
            f::put_u32(&mut h, m.u);
            f::put_u32(&mut h, idx as u32);
            f::put_u32(&mut h, self.stat.uid as u32);
            f::put_u32(&mut h, self.stat.gid as u32);
            f::put_u64(&mut h, self.stat.mtime as u64);
            f::put_u32(&mut h, self.stat.mtime_nsec);
            f::put_u32(&mut h, m.nlink as u32);
            h.resize(64, 0);
        }
        e.bytes(&h);
        if self.xattrs.filter != 0 {
            let mut x = Vec::with_capacity(12);
            f::put_u32(&mut x, !self.xattrs.filter);
            x.push(self.xattrs.shared.len() as u8);
            x.resize(12, 0);
            e.bytes(&x);
            for s in &self.xattrs.shared {
                let r = e.shared_xattr_ref(*s);
                e.bytes(&r.to_le_bytes());
            }
            for a in &self.xattrs.local {
                a.encode(e);
            }
        }
        match &self.body {
            Body::Dir(d) => write_dirents(e, &d.inline),
            Body::Leaf { kind, tail, .. } => match kind {
                Kind::File(FileData::Inline(data)) => e.bytes(&data[data.len() - *tail as usize..]),
                Kind::File(FileData::Stream { tail: t, .. }) if *tail > 0 => e.bytes(t),
                Kind::File(FileData::External { .. }) => {
                    for _ in 0..*tail / 4 {
                        e.bytes(&[0xff; 4]);
                    }
                }
                Kind::Symlink(t) if self.data_blocks() == 0 => e.bytes(t),
                _ => {}
            },
        }
        e.pad(SLOT);
    }

    fn emit_blocks(&self, e: &mut Emitter) {
        match &self.body {
            Body::Dir(d) => {
                for b in &d.blocks {
                    write_dirents(e, b);
                    e.pad(BLOCK);
                }
            }
            Body::Leaf {
                kind, data_blocks, ..
            } if *data_blocks > 0 => match kind {
                Kind::File(FileData::Inline(data)) => {
                    let end = (data.len() as u64).min(data_blocks * BLOCK) as usize;
                    e.bytes(&data[..end]);
                    e.pad(BLOCK);
                }
                Kind::File(FileData::Stream { source, size, .. }) => {
                    e.data(*source, (*size).min(data_blocks * BLOCK));
                    e.pad(BLOCK);
                }
                Kind::Symlink(t) => {
                    e.bytes(t);
                    e.pad(BLOCK);
                }
                Kind::File(FileData::External { .. }) => {
                    for _ in 0..1024 {
                        e.bytes(&[0xff; 4]);
                    }
                }
                _ => {}
            },
            Body::Leaf { .. } => {}
        }
    }
}

/// Pad so that `tail` bytes after `fixed` bytes of inode stay in one block.
fn pad_tail(e: &mut Emitter, fixed: u64, tail: u64) {
    let start = e.pos + fixed;
    let rem = start % BLOCK;
    if rem != 0 && BLOCK - rem < tail {
        e.zeros((BLOCK - rem).next_multiple_of(SLOT));
    }
}

fn write_dirents(e: &mut Emitter, ents: &[DirEnt]) {
    let mut name_off = f::DIRENT as usize * ents.len();
    let mut h = Vec::with_capacity(ents.len() * 12);
    for d in ents {
        let Target::Inode(i) = d.target else {
            unreachable!("hardlink targets are resolved before writing")
        };
        f::put_u64(&mut h, e.nid(i));
        f::put_u16(&mut h, name_off as u16);
        h.push(d.ftype as u8);
        h.push(0);
        name_off += d.name.len();
    }
    e.bytes(&h);
    for d in ents {
        e.bytes(d.name);
    }
}

// ---- collection -------------------------------------------------------

struct Prepared<'a> {
    inodes: Vec<Inode<'a>>,
    shared: Vec<XAttr>,
    min_mtime: (u64, u32),
    flavor: Flavor,
    flags: u32,
}

impl<'a> Prepared<'a> {
    /// Number inodes breadth-first and build their bodies and xattrs.
    fn collect(
        tree: &'a FsTree,
        flavor: Flavor,
        stubs: &HashSet<usize>,
    ) -> Result<Prepared<'a>, TreeError> {
        let escape = flavor != Flavor::Plain;
        // Names per node, and the directory of each hardlinked node's first
        // name in depth-first sorted order.
        let mut names = vec![0u64; tree.nodes.len()];
        let mut first_dir: HashMap<usize, usize> = HashMap::new();
        let mut stack = vec![0usize];
        while let Some(d) = stack.pop() {
            let kids: Vec<_> = tree.entries(d).collect();
            for (_, c) in &kids {
                names[*c] += 1;
            }
            for (_, c) in kids.iter().rev() {
                if matches!(tree.nodes[*c].kind, Kind::Dir { .. }) {
                    stack.push(*c);
                }
            }
        }
        // A second walk in true depth-first order (a directory's files are
        // seen before the files of its later sibling directories).
        dfs_first_dirs(tree, 0, &names, &mut first_dir);

        let mut p = Prepared {
            inodes: Vec::with_capacity(tree.nodes.len() + 256),
            shared: Vec::new(),
            min_mtime: (0, 0),
            flavor,
            flags: 0,
        };
        // the inode of each node numbered so far (usize::MAX: none yet)
        let mut inode_of = vec![usize::MAX; tree.nodes.len()];
        let root = p.push(tree, 0, &names, escape)?;
        let mut queue = VecDeque::from([(0usize, root, root)]);
        let mut dirs: Vec<(usize, Vec<DirEnt<'a>>)> = Vec::new();
        while let Some((node, parent, me)) = queue.pop_front() {
            let mut ents = vec![
                DirEnt {
                    name: b".",
                    target: Target::Inode(me),
                    ftype: FileType::Directory,
                },
                DirEnt {
                    name: b"..",
                    target: Target::Inode(parent),
                    ftype: FileType::Directory,
                },
            ];
            let mut has_whiteout = false;
            for (name, child) in tree.entries(node) {
                if let Kind::Dir { .. } = tree.nodes[child].kind {
                    let ci = p.push(tree, child, &names, escape)?;
                    queue.push_back((child, me, ci));
                    ents.push(DirEnt {
                        name,
                        target: Target::Inode(ci),
                        ftype: FileType::Directory,
                    });
                    continue;
                }
                let first_here = names[child] == 1 || first_dir.get(&child) == Some(&node);
                let target = if inode_of[child] != usize::MAX {
                    Target::Inode(inode_of[child])
                } else if first_here {
                    let i = p.push(tree, child, &names, escape)?;
                    inode_of[child] = i;
                    let user_whiteout = escape
                        && !stubs.contains(&child)
                        && matches!(tree.nodes[child].kind, Kind::CharDev(0, 0))
                        || flavor == Flavor::Composefs
                            && matches!(tree.nodes[child].kind, Kind::Whiteout);
                    if user_whiteout {
                        if names[child] > 1 {
                            return Err(TreeError::Malformed(format!(
                                "{:?}: a character device 0:0 (a whiteout) cannot be hardlinked",
                                String::from_utf8_lossy(name)
                            )));
                        }
                        // Escaped so that overlayfs shows it instead of
                        // treating it as a whiteout (composefs's xwhiteout).
                        let ino = &mut p.inodes[i];
                        ino.ftype = FileType::Regular;
                        ino.xattrs.add(b"trusted.overlay.overlay.whiteout", b"");
                        ino.xattrs.add(b"user.overlay.whiteout", b"");
                        has_whiteout = true;
                    }
                    Target::Inode(i)
                } else {
                    Target::Node(child)
                };
                let ftype = match target {
                    Target::Inode(i) => p.inodes[i].ftype,
                    Target::Node(_) => FileType::Regular,
                };
                ents.push(DirEnt {
                    name,
                    target,
                    ftype,
                });
            }
            if has_whiteout {
                let x = &mut p.inodes[me].xattrs;
                x.add(b"trusted.overlay.overlay.whiteouts", b"");
                x.add(b"user.overlay.whiteouts", b"");
                x.add(b"trusted.overlay.overlay.opaque", b"x");
                x.add(b"user.overlay.opaque", b"x");
            }
            ents.sort_unstable_by(|a, b| a.name.cmp(b.name));
            dirs.push((me, ents));
        }
        for (me, mut ents) in dirs {
            for d in &mut ents {
                if let Target::Node(n) = d.target {
                    let i = inode_of[n];
                    if i == usize::MAX {
                        return Err(TreeError::Malformed(format!(
                            "{:?}: a hard link whose first name was never reached",
                            String::from_utf8_lossy(d.name)
                        )));
                    }
                    d.target = Target::Inode(i);
                    d.ftype = p.inodes[i].ftype;
                }
            }
            p.inodes[me].body = Body::Dir(DirBody::from_entries(ents));
        }
        Ok(p)
    }

    fn push(
        &mut self,
        tree: &'a FsTree,
        node: usize,
        names: &[u64],
        escape: bool,
    ) -> Result<usize, TreeError> {
        let n = &tree.nodes[node];
        let mut x = XAttrs::default();
        if let Kind::File(FileData::External {
            redirect, verity, ..
        }) = &n.kind
        {
            match verity {
                Some(d) => {
                    let mut v = vec![0u8, 36, 0, 1];
                    v.extend_from_slice(d.as_bytes());
                    x.add(b"trusted.overlay.metacopy", &v);
                }
                None => x.add(b"trusted.overlay.metacopy", b""),
            }
            x.add(b"trusted.overlay.redirect", redirect);
        }
        for (k, v) in &n.stat.xattrs {
            match k.strip_prefix(b"trusted.overlay.".as_slice()) {
                Some(rest) if escape => {
                    let mut esc = b"trusted.overlay.overlay.".to_vec();
                    esc.extend_from_slice(rest);
                    x.add(&esc, v);
                }
                _ => x.add(k, v),
            }
        }
        let (body, ftype) = match &n.kind {
            Kind::Dir { opaque, .. } => {
                if *opaque && self.flavor == Flavor::Layer {
                    x.add(b"trusted.overlay.opaque", b"y");
                }
                (Body::Dir(DirBody::default()), FileType::Directory)
            }
            kind => {
                let (data_blocks, tail) = match kind {
                    Kind::File(FileData::External { size, .. }) => (
                        0,
                        if *size > 0 {
                            4 * size.div_ceil(1 << chunk_bits(*size))
                        } else {
                            0
                        },
                    ),
                    Kind::File(d) if d.size() > 0 => {
                        let (mut b, mut t) = (d.size() / BLOCK, d.size() % BLOCK);
                        if t > BLOCK / 2 {
                            b += 1;
                            t = 0;
                        }
                        (b, t)
                    }
                    Kind::Symlink(t) => (0, t.len() as u64),
                    _ => (0, 0),
                };
                let ftype = match kind {
                    Kind::File(_) => FileType::Regular,
                    Kind::Symlink(_) => FileType::Symlink,
                    Kind::CharDev(..) | Kind::Whiteout => FileType::CharDev,
                    Kind::BlockDev(..) => FileType::BlockDev,
                    Kind::Fifo => FileType::Fifo,
                    Kind::Socket => FileType::Socket,
                    Kind::Dir { .. } => unreachable!(),
                };
                (
                    Body::Leaf {
                        kind,
                        nlink: names[node],
                        data_blocks,
                        tail,
                    },
                    ftype,
                )
            }
        };
        self.inodes.push(Inode {
            stat: &n.stat,
            xattrs: x,
            body,
            ftype,
        });
        Ok(self.inodes.len() - 1)
    }

    /// Root opacity, ACL flag, shared xattrs, build time, symlink blocks.
    fn finish(&mut self) {
        if self.flavor == Flavor::Composefs {
            self.inodes[0].xattrs.add(b"trusted.overlay.opaque", b"y");
        }
        let acl = self.inodes.iter().any(|i| {
            i.xattrs.local.iter().any(|x| {
                x.prefix == f::XATTR_INDEX_ACL_ACCESS || x.prefix == f::XATTR_INDEX_ACL_DEFAULT
            })
        });
        self.flags = if acl { f::COMPOSEFS_FLAGS_HAS_ACL } else { 0 };

        for i in &mut self.inodes {
            i.xattrs.local.sort_by(XAttr::canonical_cmp);
        }
        // (foldhash, seeded per process: several times SipHash's speed
        // over the xattrs of every inode)
        let mut counts: HashMap<&XAttr, usize, foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(self.inodes.len(), Default::default());
        for i in &self.inodes {
            for a in &i.xattrs.local {
                *counts.entry(a).or_default() += 1;
            }
        }
        let mut shared: Vec<XAttr> = counts
            .into_iter()
            .filter(|(_, c)| *c > 1)
            .map(|(a, _)| a.clone())
            .collect();
        shared.sort_by(|a, b| b.canonical_cmp(a));
        let index: HashMap<XAttr, usize, foldhash::fast::RandomState> = shared
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, a)| (a, i))
            .collect();
        for i in &mut self.inodes {
            let x = &mut i.xattrs;
            let mut local = Vec::with_capacity(x.local.len());
            for a in x.local.drain(..) {
                match index.get(&a) {
                    Some(s) => x.shared.push(*s),
                    None => local.push(a),
                }
            }
            x.local = local;
        }
        self.shared = shared;

        self.min_mtime = self
            .inodes
            .iter()
            .map(|i| (i.stat.mtime as u64, i.stat.mtime_nsec))
            .min()
            .unwrap_or((0, 0));

        // A symlink whose inode, xattrs and target fill a block keeps its
        // target in a data block.
        for i in 0..self.inodes.len() {
            let ino = &self.inodes[i];
            let Body::Leaf {
                kind: Kind::Symlink(_),
                tail,
                nlink,
                ..
            } = ino.body
            else {
                continue;
            };
            let h = if ino.compact(self.min_mtime, tail, nlink) {
                f::COMPACT_INODE
            } else {
                f::EXTENDED_INODE
            };
            if h + ino.xattrs.size() + tail >= BLOCK
                && let Body::Leaf {
                    data_blocks, tail, ..
                } = &mut self.inodes[i].body
            {
                *data_blocks += 1;
                *tail = 0;
            }
        }
    }

    fn emit(&self, e: &mut Emitter) {
        if self.flavor == Flavor::Plain {
            e.zeros(1024);
        } else {
            let mut h = Vec::new();
            f::composefs_header(&mut h, self.flags, 1);
            e.bytes(&h);
            e.pad(1024);
        }
        let mut sb = Vec::with_capacity(128);
        f::Superblock {
            root_nid: e.nid(0) as u16,
            inos: self.inodes.len() as u64,
            build_time: self.min_mtime.0,
            build_time_nsec: self.min_mtime.1,
            blocks: (e.end() / BLOCK) as u32,
            xattr_blkaddr: (e.inodes_end() / BLOCK) as u32,
        }
        .encode(&mut sb);
        e.bytes(&sb);
        for (idx, ino) in self.inodes.iter().enumerate() {
            ino.emit(e, idx, self.min_mtime);
        }
        e.pad(SLOT);
        e.note_inodes_end();
        for x in &self.shared {
            e.note_xattr();
            x.encode(e);
        }
        e.pad(BLOCK);
        for ino in &self.inodes {
            e.note_block();
            ino.emit_blocks(e);
        }
        e.note_end();
    }
}

fn dfs_first_dirs(tree: &FsTree, dir: usize, names: &[u64], first: &mut HashMap<usize, usize>) {
    for (_, c) in tree.entries(dir) {
        if matches!(tree.nodes[c].kind, Kind::Dir { .. }) {
            dfs_first_dirs(tree, c, names, first);
        } else if names[c] > 1 {
            first.entry(c).or_insert(dir);
        }
    }
}

// ---- emission ---------------------------------------------------------

#[derive(Debug, Default)]
struct Layout2 {
    inodes: Vec<u64>,
    inodes_end: u64,
    xattrs: Vec<u64>,
    blocks: Vec<u64>,
    end: u64,
}

#[derive(Default)]
struct Emitter {
    /// Offsets from the first pass; `None` while measuring.
    layout: Option<Layout2>,
    rec: Layout2,
    pos: u64,
    buf: Vec<u8>,
    segments: Vec<Segment>,
}

impl Emitter {
    fn into_layout(self) -> Layout2 {
        self.rec
    }

    fn bytes(&mut self, b: &[u8]) {
        self.pos += b.len() as u64;
        if self.layout.is_some() {
            self.buf.extend_from_slice(b);
        }
    }

    fn zeros(&mut self, n: u64) {
        self.pos += n;
        if self.layout.is_some() {
            self.buf.resize(self.buf.len() + n as usize, 0);
        }
    }

    fn pad(&mut self, align: u64) {
        let n = self.pos.next_multiple_of(align) - self.pos;
        self.zeros(n);
    }

    fn data(&mut self, source: u64, len: u64) {
        self.pos += len;
        if self.layout.is_some() {
            self.flush();
            self.segments.push(Segment::Data { source, len });
        }
    }

    fn flush(&mut self) {
        if !self.buf.is_empty() {
            self.segments
                .push(Segment::Bytes(std::mem::take(&mut self.buf)));
        }
    }

    fn note_inode(&mut self) {
        self.rec.inodes.push(self.pos);
    }
    fn note_inodes_end(&mut self) {
        self.rec.inodes_end = self.pos;
    }
    fn note_xattr(&mut self) {
        self.rec.xattrs.push(self.pos);
    }
    fn note_block(&mut self) {
        self.rec.blocks.push(self.pos);
    }
    fn note_end(&mut self) {
        self.rec.end = self.pos;
    }

    fn nid(&self, idx: usize) -> u64 {
        self.layout.as_ref().map_or(0, |l| l.inodes[idx] / SLOT)
    }
    fn block_start(&self, idx: usize) -> u64 {
        self.layout.as_ref().map_or(0, |l| l.blocks[idx])
    }
    fn inodes_end(&self) -> u64 {
        self.layout.as_ref().map_or(0, |l| l.inodes_end)
    }
    fn end(&self) -> u64 {
        self.layout.as_ref().map_or(0, |l| l.end)
    }
    fn shared_xattr_ref(&self, idx: usize) -> u32 {
        self.layout.as_ref().map_or(0, |l| {
            ((l.inodes_end % BLOCK + (l.xattrs[idx] - l.inodes_end)) / 4) as u32
        })
    }
}
