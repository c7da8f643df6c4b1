//! From a flattened [`strata_tree::Tree`] to the writer's [`FsTree`].

use std::collections::HashMap;
use std::io;

use strata_digest::{Digest, VerityDigest};
use strata_tree::{Meta, NodeKind, Tree};

use crate::fs::{FileData, FsTree, Kind, Node, Stat};

/// What the converter needs to know about objects.
pub trait Objects {
    /// The fs-verity digest of an object.
    fn verity(&mut self, digest: &Digest, size: u64) -> io::Result<VerityDigest>;
    /// `len` bytes of an object from `offset`.
    fn read(&mut self, digest: &Digest, offset: u64, len: u64) -> io::Result<Vec<u8>>;
}

/// Where file contents go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contents {
    /// composefs: files over [`crate::INLINE_MAX`] bytes redirect to
    /// `/<2 hex>/<62 hex>` of their SHA-256 (the store's objects/ layout).
    Redirect,
    /// Lazy mounts: every non-empty file redirects (nothing is read from
    /// objects, which may not have arrived), without an fs-verity digest;
    /// the lazy mount checks each chunk's SHA-256 as it arrives instead.
    RedirectUnfetched,
    /// Everything inside the image; [`FileData::Stream`] sources index the
    /// returned digest table.
    Embed,
}

/// The redirect path of an object in the store's layout.
pub fn redirect_path(d: &Digest) -> Vec<u8> {
    let hex = d.hex();
    format!("/{}/{}", &hex[..2], &hex[2..]).into_bytes()
}

/// Metadata in the writer's form.
pub fn stat_of(m: &Meta) -> Stat {
    Stat {
        mode: m.mode & 0o7777,
        uid: m.uid,
        gid: m.gid,
        mtime: m.mtime.secs,
        mtime_nsec: m.mtime.nanos,
        xattrs: m.xattrs.clone(),
    }
}

/// One file's content in the writer's form.
pub fn file_data(
    digest: &Digest,
    size: u64,
    contents: Contents,
    objects: &mut dyn Objects,
    table: &mut Vec<Digest>,
) -> io::Result<FileData> {
    Ok(match contents {
        Contents::RedirectUnfetched if size == 0 => FileData::Inline(Vec::new()),
        Contents::RedirectUnfetched => FileData::External {
            redirect: redirect_path(digest),
            verity: None,
            size,
        },
        Contents::Redirect if size <= crate::INLINE_MAX => {
            FileData::Inline(objects.read(digest, 0, size)?)
        }
        Contents::Redirect => FileData::External {
            redirect: redirect_path(digest),
            verity: Some(objects.verity(digest, size)?),
            size,
        },
        Contents::Embed => {
            let t = size % 4096;
            let tail = if t > 0 && t <= 2048 {
                objects.read(digest, size - t, t)?
            } else {
                Vec::new()
            };
            table.push(*digest);
            FileData::Stream {
                source: (table.len() - 1) as u64,
                size,
                tail,
            }
        }
    })
}

/// Kind of a non-file node.
pub fn kind_of(k: &NodeKind) -> Kind {
    match k {
        NodeKind::Dir => Kind::Dir {
            entries: Default::default(),
            opaque: false,
        },
        NodeKind::Symlink { target } => Kind::Symlink(target.clone()),
        NodeKind::CharDev { major, minor } => Kind::CharDev(*major, *minor),
        NodeKind::BlockDev { major, minor } => Kind::BlockDev(*major, *minor),
        NodeKind::Fifo => Kind::Fifo,
        NodeKind::Regular { .. } => unreachable!("files are converted by file_data"),
    }
}

/// Convert a whole tree. Returns the tree and, for [`Contents::Embed`],
/// the digest table that stream sources index.
pub fn from_tree(
    tree: &Tree,
    contents: Contents,
    objects: &mut dyn Objects,
) -> io::Result<(FsTree, Vec<Digest>)> {
    let mut table = Vec::new();
    let mut out: Option<FsTree> = None;
    // (foldhash, seeded per process: each entry looks its parent's path up)
    let mut dirs: HashMap<Vec<u8>, usize, foldhash::fast::RandomState> = HashMap::default();
    let mut by_ino: HashMap<u64, usize, foldhash::fast::RandomState> = HashMap::default();
    for (path, node) in tree.walk() {
        let stat = stat_of(&node.meta);
        let Some(fs) = out.as_mut() else {
            out = Some(FsTree::new(stat));
            dirs.insert(Vec::new(), 0);
            continue;
        };
        let (parent, name) = match path.iter().rposition(|b| *b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&path[..0], &path[..]),
        };
        let parent = dirs[parent];
        let idx = match &node.kind {
            _ if node.nlink > 1 && by_ino.contains_key(&node.ino) && node.kind != NodeKind::Dir => {
                by_ino[&node.ino]
            }
            NodeKind::Regular { digest, size } => {
                let data = file_data(digest, *size, contents, objects, &mut table)?;
                fs.push(Node {
                    stat,
                    kind: Kind::File(data),
                })
            }
            k => fs.push(Node {
                stat,
                kind: kind_of(k),
            }),
        };
        if node.kind == NodeKind::Dir {
            dirs.insert(path.clone(), idx);
        } else if node.nlink > 1 {
            by_ino.insert(node.ino, idx);
        }
        fs.link(parent, name, idx);
    }
    Ok((out.expect("a tree has a root"), table))
}
