//! The writer's input: a filesystem tree with hardlinks as shared nodes.
//!
//! The tree is a pure value: node 0 is the root directory, directories map
//! names to node indices, and a non-directory named twice is a hardlink.
//! [`FsTree::validate`] rejects what EROFS cannot hold, so the writer can
//! assume a well-formed tree.

use std::collections::BTreeMap;

use strata_digest::VerityDigest;

/// Metadata of a node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stat {
    /// Permission bits (incl. setuid/setgid/sticky); the type bits are
    /// ignored and come from the node kind.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Extended attributes, full names.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Where a regular file's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileData {
    /// Stored inside the image.
    Inline(Vec<u8>),
    /// Stored inside the image, read from the caller's [`DataSource`]
    /// when the image is written (`source` is the caller's key).
    ///
    /// [`DataSource`]: crate::DataSource
    Stream {
        /// Caller's key for the content.
        source: u64,
        /// Size in bytes.
        size: u64,
        /// The last `size % 4096` bytes when that is at most 2048 (they go
        /// into the inode); empty otherwise.
        tail: Vec<u8>,
    },
    /// Outside the image: an overlayfs redirect into a data-only lower.
    External {
        /// `trusted.overlay.redirect` value, e.g. `/ab/cdef…`.
        redirect: Vec<u8>,
        /// fs-verity digest for `trusted.overlay.metacopy` (empty metacopy
        /// when `None`).
        verity: Option<VerityDigest>,
        /// Size in bytes.
        size: u64,
    },
}

impl FileData {
    /// Logical size.
    pub fn size(&self) -> u64 {
        match self {
            FileData::Inline(d) => d.len() as u64,
            FileData::Stream { size, .. } | FileData::External { size, .. } => *size,
        }
    }
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Directory: name -> node index, bytewise order.
    Dir {
        /// Children.
        entries: BTreeMap<Vec<u8>, usize>,
        /// An overlayfs opaque directory (hides lower layers); written as
        /// `trusted.overlay.opaque=y` in layer images.
        opaque: bool,
    },
    /// Regular file.
    File(FileData),
    /// Symlink with its target.
    Symlink(Vec<u8>),
    /// Character device (major, minor).
    CharDev(u32, u32),
    /// Block device (major, minor).
    BlockDev(u32, u32),
    /// Named pipe.
    Fifo,
    /// Socket.
    Socket,
    /// An overlayfs whiteout (character device 0:0) that must act as one:
    /// only meaningful in layer images of a hybrid mount.
    Whiteout,
}

/// A node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Metadata.
    pub stat: Stat,
    /// Kind.
    pub kind: Kind,
}

/// A tree; node 0 is the root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsTree {
    /// All nodes.
    pub nodes: Vec<Node>,
}

/// Why a tree cannot become an EROFS image.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// A name EROFS cannot store.
    #[error("{path:?}: file name {why}")]
    BadName {
        /// Path of the entry.
        path: String,
        /// What is wrong.
        why: &'static str,
    },
    /// An xattr EROFS cannot store.
    #[error("{path:?}: extended attribute {name:?} {why}")]
    BadXattr {
        /// Path of the node.
        path: String,
        /// Attribute name.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A value out of EROFS's range.
    #[error("{path:?}: {what} out of range for EROFS")]
    OutOfRange {
        /// Path of the node.
        path: String,
        /// Which field.
        what: &'static str,
    },
    /// Broken structure (a bug in the caller, not bad input).
    #[error("malformed tree: {0}")]
    Malformed(String),
}

/// Longest name EROFS stores.
pub const NAME_MAX: usize = 255;
/// Largest xattr value (the kernel's XATTR_SIZE_MAX).
pub const XATTR_VALUE_MAX: usize = 65535;
/// Largest file: one chunk index of at most 2^43 bytes.
pub const FILE_MAX: u64 = 1 << 43;

impl FsTree {
    /// A tree with only a root directory of the given metadata.
    pub fn new(root: Stat) -> Self {
        FsTree {
            nodes: vec![Node {
                stat: root,
                kind: Kind::Dir {
                    entries: BTreeMap::new(),
                    opaque: false,
                },
            }],
        }
    }

    /// Add a node (not yet linked anywhere); returns its index.
    pub fn push(&mut self, node: Node) -> usize {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Link `child` into directory `dir` as `name` (replacing any entry).
    pub fn link(&mut self, dir: usize, name: &[u8], child: usize) {
        match &mut self.nodes[dir].kind {
            Kind::Dir { entries, .. } => {
                entries.insert(name.to_vec(), child);
            }
            _ => panic!("link into a non-directory"),
        }
    }

    /// Children of a directory (empty for other nodes).
    pub fn entries(&self, idx: usize) -> impl Iterator<Item = (&Vec<u8>, usize)> {
        let map = match &self.nodes[idx].kind {
            Kind::Dir { entries, .. } => Some(entries),
            _ => None,
        };
        map.into_iter().flat_map(|m| m.iter().map(|(k, v)| (k, *v)))
    }

    /// Check everything EROFS needs: names, xattrs, ranges, structure
    /// (every node reachable, directories named once, no cycles).
    pub fn validate(&self) -> Result<(), TreeError> {
        if !matches!(self.nodes.first().map(|n| &n.kind), Some(Kind::Dir { .. })) {
            return Err(TreeError::Malformed("node 0 is not a directory".into()));
        }
        let mut refs = vec![0u32; self.nodes.len()];
        refs[0] = 1;
        let mut stack = vec![(0usize, String::new())];
        while let Some((idx, path)) = stack.pop() {
            self.validate_node(idx, &path)?;
            for (name, child) in self.entries(idx) {
                let child_path = format!("{path}/{}", String::from_utf8_lossy(name));
                check_name(name, &child_path)?;
                let Some(slot) = refs.get_mut(child) else {
                    return Err(TreeError::Malformed(format!(
                        "{child_path:?}: no node {child}"
                    )));
                };
                *slot += 1;
                if matches!(self.nodes[child].kind, Kind::Dir { .. }) {
                    if *slot > 1 {
                        return Err(TreeError::Malformed(format!(
                            "{child_path:?}: directory linked twice"
                        )));
                    }
                    stack.push((child, child_path));
                } else if *slot == 1 {
                    self.validate_node(child, &child_path)?;
                } else if matches!(self.nodes[child].kind, Kind::Whiteout) {
                    return Err(TreeError::Malformed(format!(
                        "{child_path:?}: a whiteout cannot be hardlinked"
                    )));
                }
            }
        }
        if let Some(orphan) = refs.iter().position(|r| *r == 0) {
            return Err(TreeError::Malformed(format!("node {orphan} is not linked")));
        }
        Ok(())
    }

    fn validate_node(&self, idx: usize, path: &str) -> Result<(), TreeError> {
        let n = &self.nodes[idx];
        let shown = if path.is_empty() { "/" } else { path };
        let range = |what| TreeError::OutOfRange {
            path: shown.to_string(),
            what,
        };
        if n.stat.uid > u32::MAX as u64 {
            return Err(range("uid"));
        }
        if n.stat.gid > u32::MAX as u64 {
            return Err(range("gid"));
        }
        if n.stat.mtime_nsec >= 1_000_000_000 {
            return Err(range("mtime nanoseconds"));
        }
        match &n.kind {
            Kind::File(d) if d.size() > FILE_MAX => return Err(range("file size")),
            Kind::File(FileData::Stream { size, tail, .. }) => {
                let t = size % BLOCK;
                let want = if t <= BLOCK / 2 { t } else { 0 };
                if tail.len() as u64 != want {
                    return Err(TreeError::Malformed(format!(
                        "{shown:?}: stream tail of {} bytes, expected {want}",
                        tail.len()
                    )));
                }
            }
            Kind::Symlink(t) if t.is_empty() || t.len() > 4095 => {
                return Err(range("symlink target length"));
            }
            Kind::CharDev(ma, _) | Kind::BlockDev(ma, _) if *ma > 0xfff => {
                return Err(range("device major number"));
            }
            Kind::CharDev(_, mi) | Kind::BlockDev(_, mi) if *mi > 0xfffff => {
                return Err(range("device minor number"));
            }
            _ => {}
        }
        for (k, v) in &n.stat.xattrs {
            let bad = |why| TreeError::BadXattr {
                path: shown.to_string(),
                name: String::from_utf8_lossy(k).into_owned(),
                why,
            };
            if k.is_empty() || k.contains(&0) {
                return Err(bad("has an empty name or a NUL byte"));
            }
            if k.len() > NAME_MAX {
                return Err(bad("has a name longer than 255 bytes"));
            }
            if v.len() > XATTR_VALUE_MAX {
                return Err(bad("has a value longer than 65535 bytes"));
            }
        }
        Ok(())
    }
}

const BLOCK: u64 = crate::format::BLOCK;

fn check_name(name: &[u8], path: &str) -> Result<(), TreeError> {
    let bad = |why| TreeError::BadName {
        path: path.to_string(),
        why,
    };
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    if name == b"." || name == b".." {
        return Err(bad("is . or .."));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(bad("contains '/' or a NUL byte"));
    }
    if name.len() > NAME_MAX {
        return Err(bad("is longer than 255 bytes"));
    }
    Ok(())
}
