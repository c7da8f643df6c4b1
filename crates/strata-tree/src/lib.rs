//! The flattened tree of an image.
//!
//! [`Tree::apply_layer`] applies one layer's [`strata_tar::Entry`]s with OCI
//! semantics; applying every layer bottom-up gives the image's root
//! filesystem as a runtime would see it. [`export`] writes a tree to a
//! directory or a tar. The tree holds file contents only as object digests.
//!
//! Design notes (why, not what):
//! - Inodes live in an arena and names point at them, so a hardlink is a
//!   second name for the *current* inode at its target path. When a later
//!   layer replaces one name of a hardlink group, only that name moves to a
//!   new inode; the others keep the old content, as on a real filesystem
//!   that unpacked the layers one after another.
//! - Whiteouts and opaque markers hide only what *lower* layers put there:
//!   an opaque marker may come after the new children in the same layer
//!   (tar order is arbitrary), so we remember which names this layer added.
//! - A parent component that is a symlink is resolved inside the tree (as
//!   umoci does with securejoin), but where the resolution would climb above
//!   the root we refuse the layer instead of clamping: a layer that tries
//!   this is hostile or broken, and clamping would silently write elsewhere.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod export;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;

use strata_digest::Digest;
use strata_tar::{Entry, EntryKind, Timestamp};

/// Metadata of a node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// Permission bits incl. setuid/setgid/sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time.
    pub mtime: Timestamp,
    /// Extended attributes.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// Regular file with content in the object store.
    Regular {
        /// Object digest.
        digest: Digest,
        /// Size in bytes.
        size: u64,
    },
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink {
        /// Target, verbatim.
        target: Vec<u8>,
    },
    /// Character device.
    CharDev {
        /// Major.
        major: u32,
        /// Minor.
        minor: u32,
    },
    /// Block device.
    BlockDev {
        /// Major.
        major: u32,
        /// Minor.
        minor: u32,
    },
    /// Named pipe.
    Fifo,
}

/// An inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Kind.
    pub kind: NodeKind,
    /// Metadata.
    pub meta: Meta,
    /// Inode number in this tree (shared by hardlinked names).
    pub ino: u64,
    /// Number of names (for dirs: 2 + subdirectories).
    pub nlink: u32,
}

/// Errors applying a layer.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// A path resolution left the root through a symlink.
    #[error("path {path:?} passes through symlink {symlink:?} which leaves the root")]
    SymlinkEscape {
        /// The entry path.
        path: String,
        /// The symlink.
        symlink: String,
    },
    /// A hardlink whose target does not exist.
    #[error("hardlink {path:?} points to {target:?}, which does not exist")]
    HardlinkMissing {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
    /// A hardlink to a directory.
    #[error("hardlink {path:?} points to directory {target:?}")]
    HardlinkToDir {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
    /// A parent component that is not a directory.
    #[error("path {path:?}: parent {parent:?} is not a directory")]
    NotADirectory {
        /// The entry path.
        path: String,
        /// The offending component.
        parent: String,
    },
    /// A path whose own `..` components climb above the root.
    #[error("path {0:?} leaves the root")]
    PathEscape(String),
    /// Too many symlinks (a loop).
    #[error("path {0:?}: too many levels of symbolic links")]
    SymlinkLoop(String),
    /// An entry replacing the root with a non-directory.
    #[error("entry for the root directory is not a directory")]
    RootNotDir,
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

type Ino = usize;

/// Names (parent dir inode, name) written or entered by the current layer.
type Touched = HashSet<(Ino, Vec<u8>)>;

/// The flattened tree.
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Vec<Node>,
    /// Each node's names, by node number (empty but for directories).
    children: Vec<BTreeMap<Vec<u8>, Ino>>,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

const ROOT: Ino = 0;
const MAX_HOPS: usize = 40;

impl Tree {
    /// An empty root directory (0755, root:root, mtime 0).
    pub fn new() -> Self {
        let root = Node {
            kind: NodeKind::Dir,
            meta: Meta {
                mode: 0o755,
                ..Meta::default()
            },
            ino: 0,
            nlink: 2,
        };
        Tree {
            nodes: vec![root],
            children: vec![BTreeMap::new()],
        }
    }

    fn new_node(&mut self, kind: NodeKind, meta: Meta) -> Ino {
        let ino = self.nodes.len();
        self.nodes.push(Node {
            kind,
            meta,
            ino: ino as u64,
            nlink: 0,
        });
        self.children.push(BTreeMap::new());
        ino
    }

    /// A directory's names (`None` for anything else).
    fn kids(&self, ino: Ino) -> Option<&BTreeMap<Vec<u8>, Ino>> {
        (self.nodes.get(ino)?.kind == NodeKind::Dir).then(|| &self.children[ino])
    }

    fn is_dir(&self, ino: Ino) -> bool {
        self.nodes[ino].kind == NodeKind::Dir
    }

    /// Resolve the directory that holds an entry whose parent path is
    /// `parents` (`path` is the whole entry path, for messages), following
    /// symlinks in parent components inside the tree. Missing parents are
    /// created when `create` is set.
    ///
    /// With `touched`, every directory entered is recorded as touched by
    /// the current layer, so that an opaque marker later in the same layer
    /// keeps it (see [`Tree::apply_layer`]).
    fn resolve_parent(
        &mut self,
        path: &[u8],
        parents: &[u8],
        create: bool,
        mut touched: Option<&mut Touched>,
    ) -> Result<Option<Ino>, TreeError> {
        // the usual path: plain directory names, walked without copying
        // them; a symlink, `..` or a non-directory on the way goes to the
        // full walk, from the root again (what was made and recorded so
        // far is what it would make and record itself)
        let mut dir = ROOT;
        for c in components(parents) {
            if c.is_empty() || c == b"." {
                continue;
            }
            if c == b".." {
                return self.resolve_slow(path, parents, create, touched);
            }
            let ino = match self.children[dir].get(c) {
                Some(&ino) => ino,
                None if !create => return Ok(None),
                None => self.missing_parent(dir, c.to_vec()),
            };
            if !self.is_dir(ino) {
                return self.resolve_slow(path, parents, create, touched);
            }
            if let Some(t) = touched.as_deref_mut() {
                t.insert((dir, c.to_vec()));
            }
            dir = ino;
        }
        Ok(Some(dir))
    }

    /// [`resolve_parent`](Self::resolve_parent) following symlinks and
    /// `..`, and naming what is wrong.
    fn resolve_slow(
        &mut self,
        path: &[u8],
        parents: &[u8],
        create: bool,
        mut touched: Option<&mut Touched>,
    ) -> Result<Option<Ino>, TreeError> {
        let mut stack = vec![ROOT];
        // Names of the dirs on the stack below the root, for messages.
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut hops = 0;
        // Components still to walk, each tagged with the symlink (full
        // path) whose target it came from, if any.
        let mut todo: Vec<(Vec<u8>, Option<Vec<u8>>)> = components(parents)
            .rev()
            .map(|c| (c.to_vec(), None))
            .collect();
        while let Some((c, via)) = todo.pop() {
            if c.is_empty() || c == b"." {
                continue;
            }
            if c == b".." {
                if stack.len() == 1 {
                    return Err(match via {
                        Some(link) => TreeError::SymlinkEscape {
                            path: lossy(path),
                            symlink: lossy(&link),
                        },
                        None => TreeError::PathEscape(lossy(path)),
                    });
                }
                stack.pop();
                names.pop();
                continue;
            }
            let dir = *stack.last().expect("stack starts with root");
            let child = self.children[dir].get(&c).copied();
            let ino = match child {
                None if !create => return Ok(None),
                None => self.missing_parent(dir, c.clone()),
                Some(ino) => ino,
            };
            match &self.nodes[ino].kind {
                NodeKind::Dir => {
                    if let Some(t) = touched.as_deref_mut() {
                        t.insert((dir, c.clone()));
                    }
                    stack.push(ino);
                    names.push(c);
                }
                NodeKind::Symlink { target } => {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Err(TreeError::SymlinkLoop(lossy(path)));
                    }
                    let mut link = names.join(&b'/');
                    if !link.is_empty() {
                        link.push(b'/');
                    }
                    link.extend_from_slice(&c);
                    // Absolute targets are relative to the image root.
                    if target.first() == Some(&b'/') {
                        stack.truncate(1);
                        names.clear();
                    }
                    for t in target.split(|b| *b == b'/').rev() {
                        todo.push((t.to_vec(), Some(link.clone())));
                    }
                }
                _ => {
                    let mut parent = names.join(&b'/');
                    if !parent.is_empty() {
                        parent.push(b'/');
                    }
                    parent.extend_from_slice(&c);
                    return Err(TreeError::NotADirectory {
                        path: lossy(path),
                        parent: lossy(&parent),
                    });
                }
            }
        }
        Ok(stack.last().copied())
    }

    /// A parent directory an entry needs and no layer made: 0755,
    /// root:root, mtime 0.
    fn missing_parent(&mut self, dir: Ino, name: Vec<u8>) -> Ino {
        let ino = self.new_node(
            NodeKind::Dir,
            Meta {
                mode: 0o755,
                ..Meta::default()
            },
        );
        self.link(dir, name, ino);
        ino
    }

    fn link(&mut self, dir: Ino, name: Vec<u8>, ino: Ino) {
        self.nodes[ino].nlink += 1;
        if self.is_dir(ino) {
            self.nodes[ino].nlink += 1; // its own "."
            self.nodes[dir].nlink += 1; // its ".."
        }
        self.children[dir].insert(name, ino);
    }

    fn unlink(&mut self, dir: Ino, name: &[u8]) {
        let Some(ino) = self.children[dir].remove(name) else {
            return;
        };
        self.nodes[ino].nlink = self.nodes[ino].nlink.saturating_sub(1);
        if self.is_dir(ino) {
            self.nodes[dir].nlink -= 1;
            let names: Vec<Vec<u8>> = self.children[ino].keys().cloned().collect();
            for n in names {
                self.unlink(ino, &n);
            }
            self.nodes[ino].nlink = 0;
        }
    }

    /// Keep under `dir` only what the current layer touched: an opaque
    /// directory hides every lower entry below it, also inside
    /// subdirectories that this layer merged into (as overlayfs does with an
    /// opaque upper dir).
    fn prune_lower(&mut self, dir: Ino, touched: &Touched) {
        let names: Vec<(Vec<u8>, Ino)> = self.children[dir]
            .iter()
            .map(|(n, i)| (n.clone(), *i))
            .collect();
        for (name, ino) in names {
            if !touched.contains(&(dir, name.clone())) {
                self.unlink(dir, &name);
            } else if self.is_dir(ino) {
                self.prune_lower(ino, touched);
            }
        }
    }

    /// Apply one layer's entries in order, with OCI layer semantics.
    ///
    /// - `.wh.NAME` removes NAME (a whole subtree for a dir) as lower layers
    ///   left it; `.wh..wh..opq` in D hides everything lower layers put
    ///   under D but keeps what this layer adds, whatever the order of the
    ///   marker and the new children in the tar. Whiteouts never appear.
    /// - An entry replaces whatever is at its path; a dir over a dir keeps
    ///   the children and takes the new metadata. Missing parents are
    ///   created (0755, root, mtime 0). The empty path sets the root's
    ///   metadata.
    /// - A hardlink is a new name for the inode currently at its target
    ///   (in this or a lower layer); the target must exist and not be a dir.
    /// - Symlinks in parent components are followed inside the tree; a
    ///   resolution that would climb above the root is an error.
    pub fn apply_layer(&mut self, entries: &[Entry]) -> Result<(), TreeError> {
        // names this layer wrote or entered: only whiteouts of the same
        // layer ask, so a layer without any keeps no record
        let whiteouts = entries
            .iter()
            .any(|e| split_last(&e.path).1.starts_with(b".wh."));
        let mut added: Touched = HashSet::new();
        for e in entries {
            if e.path.is_empty() {
                if e.kind != EntryKind::Dir {
                    return Err(TreeError::RootNotDir);
                }
                self.nodes[ROOT].meta = meta_of(e);
                continue;
            }
            let (parents, name) = split_last(&e.path);
            if let Some(hidden) = name.strip_prefix(b".wh.") {
                // Whiteouts never create anything; a missing parent means
                // there is nothing to hide.
                let Some(dir) = self.resolve_parent(&e.path, parents, false, None)? else {
                    continue;
                };
                if hidden == b".wh..opq" {
                    self.prune_lower(dir, &added);
                } else if !added.contains(&(dir, hidden.to_vec())) {
                    self.unlink(dir, hidden);
                }
                continue;
            }
            let dir = self
                .resolve_parent(&e.path, parents, true, whiteouts.then_some(&mut added))?
                .expect("missing parents are created when writing");
            let existing = self.children[dir].get(name).copied();
            match &e.kind {
                EntryKind::Dir => {
                    if let Some(ino) = existing
                        && self.is_dir(ino)
                    {
                        self.nodes[ino].meta = meta_of(e);
                    } else {
                        self.unlink(dir, name);
                        let ino = self.new_node(NodeKind::Dir, meta_of(e));
                        self.link(dir, name.to_vec(), ino);
                    }
                }
                EntryKind::Hardlink { target } => {
                    let (tparents, tname) = split_last(target);
                    let missing = || TreeError::HardlinkMissing {
                        path: lossy(&e.path),
                        target: lossy(target),
                    };
                    let tdir = self
                        .resolve_parent(target, tparents, false, None)?
                        .ok_or_else(missing)?;
                    let tino = self.children[tdir]
                        .get(tname)
                        .copied()
                        .ok_or_else(missing)?;
                    if self.is_dir(tino) {
                        return Err(TreeError::HardlinkToDir {
                            path: lossy(&e.path),
                            target: lossy(target),
                        });
                    }
                    if existing == Some(tino) {
                        continue;
                    }
                    self.unlink(dir, name);
                    self.link(dir, name.to_vec(), tino);
                }
                other => {
                    let kind = match other {
                        EntryKind::Regular { digest, size } => NodeKind::Regular {
                            digest: *digest,
                            size: *size,
                        },
                        EntryKind::Symlink { target } => NodeKind::Symlink {
                            target: target.clone(),
                        },
                        EntryKind::CharDev { major, minor } => NodeKind::CharDev {
                            major: *major,
                            minor: *minor,
                        },
                        EntryKind::BlockDev { major, minor } => NodeKind::BlockDev {
                            major: *major,
                            minor: *minor,
                        },
                        EntryKind::Fifo => NodeKind::Fifo,
                        EntryKind::Dir | EntryKind::Hardlink { .. } => {
                            unreachable!("handled above")
                        }
                    };
                    self.unlink(dir, name);
                    let ino = self.new_node(kind, meta_of(e));
                    self.link(dir, name.to_vec(), ino);
                }
            }
            if whiteouts {
                added.insert((dir, name.to_vec()));
            }
        }
        Ok(())
    }

    /// Depth-first walk, names in bytewise order, root first (empty path).
    pub fn walk(&self) -> impl Iterator<Item = (Vec<u8>, &Node)> {
        self.walk_vec().into_iter()
    }

    fn walk_vec(&self) -> Vec<(Vec<u8>, &Node)> {
        let mut out = Vec::with_capacity(self.nodes.len());
        let mut stack: Vec<(Vec<u8>, Ino)> = vec![(Vec::new(), ROOT)];
        while let Some((path, ino)) = stack.pop() {
            out.push((path.clone(), &self.nodes[ino]));
            if let Some(kids) = self.kids(ino) {
                for (name, child) in kids.iter().rev() {
                    let mut p = path.clone();
                    if !p.is_empty() {
                        p.push(b'/');
                    }
                    p.extend_from_slice(name);
                    stack.push((p, *child));
                }
            }
        }
        out
    }

    /// The node numbered `ino` (0 is the root), if any.
    pub fn node(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(usize::try_from(ino).ok()?)
    }

    /// A directory's entries, name -> node number, in bytewise order.
    pub fn children(&self, ino: u64) -> Option<impl ExactSizeIterator<Item = (&[u8], u64)>> {
        let kids = self.kids(usize::try_from(ino).ok()?)?;
        Some(kids.iter().map(|(n, i)| (n.as_slice(), *i as u64)))
    }

    /// One entry of a directory.
    pub fn child(&self, dir: u64, name: &[u8]) -> Option<u64> {
        let kids = self.kids(usize::try_from(dir).ok()?)?;
        kids.get(name).map(|i| *i as u64)
    }

    /// Look a path up (no symlink following).
    pub fn lookup(&self, path: &[u8]) -> Option<&Node> {
        self.node(self.lookup_ino(path)?)
    }

    /// [`lookup`](Self::lookup), the node's number (for
    /// [`children`](Self::children)).
    pub fn lookup_ino(&self, path: &[u8]) -> Option<u64> {
        let mut ino = ROOT;
        for c in path.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
            ino = *self.kids(ino)?.get(c)?;
        }
        Some(ino as u64)
    }

    /// Every node reachable from the root, each once (hardlinked names
    /// share one), in no particular order: [`walk`](Self::walk) without
    /// building paths, for what needs only the nodes.
    pub fn reachable(&self) -> impl Iterator<Item = &Node> {
        let mut seen = vec![false; self.nodes.len()];
        let mut stack = vec![ROOT];
        std::iter::from_fn(move || {
            loop {
                let ino = stack.pop()?;
                if std::mem::replace(&mut seen[ino], true) {
                    continue;
                }
                if let Some(kids) = self.kids(ino) {
                    stack.extend(kids.values().copied());
                }
                return Some(&self.nodes[ino]);
            }
        })
    }

    /// Every object digest the tree references.
    pub fn objects(&self) -> BTreeSet<Digest> {
        self.reachable()
            .filter_map(|n| match n.kind {
                NodeKind::Regular { digest, .. } => Some(digest),
                _ => None,
            })
            .collect()
    }

    /// A canonical text dump: one line per path; equal trees give equal
    /// dumps whatever order they were built in. Hardlinks show the first
    /// name (in walk order) of their inode.
    pub fn dump(&self) -> String {
        let mut first_name: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut s = String::new();
        for (path, n) in self.walk() {
            let shown = escape(&path);
            let _ = write!(
                s,
                "/{shown} {:o} {}:{} {}.{:09}",
                n.meta.mode, n.meta.uid, n.meta.gid, n.meta.mtime.secs, n.meta.mtime.nanos
            );
            match &n.kind {
                NodeKind::Regular { digest, size } => {
                    if let Some(first) = first_name.get(&n.ino) {
                        let _ = write!(s, " hardlink=/{}", escape(first));
                    } else {
                        first_name.insert(n.ino, path.clone());
                        let _ = write!(s, " file {size} {digest} nlink={}", n.nlink);
                    }
                }
                NodeKind::Dir => {
                    let _ = write!(s, " dir nlink={}", n.nlink);
                }
                NodeKind::Symlink { target } => {
                    let _ = write!(s, " symlink {}", escape(target));
                }
                NodeKind::CharDev { major, minor } => {
                    let _ = write!(s, " char {major}:{minor}");
                }
                NodeKind::BlockDev { major, minor } => {
                    let _ = write!(s, " block {major}:{minor}");
                }
                NodeKind::Fifo => s.push_str(" fifo"),
            }
            if !matches!(n.kind, NodeKind::Regular { .. } | NodeKind::Dir)
                && let Some(first) = first_name.get(&n.ino)
            {
                let _ = write!(s, " hardlink=/{}", escape(first));
            } else if !matches!(n.kind, NodeKind::Regular { .. } | NodeKind::Dir) {
                first_name.insert(n.ino, path.clone());
            }
            for (k, v) in &n.meta.xattrs {
                let _ = write!(s, " xattr:{}={}", escape(k), hexs(v));
            }
            s.push('\n');
        }
        s
    }

    /// Number of names in the tree (incl. the root).
    pub fn len(&self) -> usize {
        self.walk().count()
    }

    /// Whether the tree has only its root.
    pub fn is_empty(&self) -> bool {
        self.children[ROOT].is_empty()
    }
}

/// A path's components (none for the empty path).
fn components(path: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    path.split(|b| *b == b'/').filter(move |_| !path.is_empty())
}

/// A non-empty path's parent path and last component.
fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn meta_of(e: &Entry) -> Meta {
    Meta {
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime: e.mtime,
        xattrs: e.xattrs.clone(),
    }
}

fn escape(b: &[u8]) -> String {
    let mut s = String::new();
    for c in b {
        if c.is_ascii_graphic() && *c != b'\\' && *c != b'=' {
            s.push(*c as char);
        } else {
            let _ = write!(s, "\\x{c:02x}");
        }
    }
    s
}

fn hexs(b: &[u8]) -> String {
    b.iter().map(|c| format!("{c:02x}")).collect()
}

#[cfg(test)]
mod tests;
